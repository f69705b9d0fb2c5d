"""egresscore: Cilium's egress gateway as an embeddable userspace datapath."""

from ._core import (
    DROP_REASON_NAMES,
    # LPM trie and egress map
    EGRESS_IP_NOT_FOUND_V4,
    EGRESS_IP_NOT_FOUND_V6,
    EGRESS_STATUS_EXCLUDED,
    EGRESS_STATUS_MATCH,
    EGRESS_STATUS_NO_GATEWAY,
    EGRESS_STATUS_NO_MATCH,
    EXCLUDED_CIDR_V4,
    EXCLUDED_CIDR_V6,
    GATEWAY_NOT_FOUND_V4,
    GATEWAY_NOT_FOUND_V6,
    LPM_MAX_VALUE,
    LPM_NO_VALUE,
    EgressEntry,
    EgressMap,
    LPMTrie,
    # packet engine
    PacketBatch,
    PacketDropped,
    PacketInfo,
    VxlanTemplate,
    dnat,
    icmp_too_big,
    parse,
    snat,
    ttl_decrement,
    vxlan_decap,
    vxlan_encap,
    # AF_PACKET rings
    PacketRing,
    # NAT / connection table
    NAT_TUPLE_DTYPE,
    NatEntry,
    NatRefused,
    NatTable,
    nat_tuples,
    # flow log
    FLOW_END_REASON_NAMES,
    FLOW_KIND_NAMES,
    FLOW_RECORD_DTYPE,
    FlowLog,
    # fused datapath
    Datapath,
)
from ._bpf import bpf_all, bpf_any, bpf_compile, bpf_dst, bpf_not_outgoing, bpf_vxlan, pcap_available
from .cluster import Cluster, ClusterError, Interface, Namespace, Node, Pod, load_cluster
from .compiler import Compiler, Conflict, Problem, Target
from .control import ControlClient, ControlError, ControlServer, default_socket_path
from .inputs import InputError, load_inputs
from .flowlog import CallbackSink, Enricher, FlowLogger, JsonLinesSink, records_to_dicts
from .agent import Agent, AgentError
from .errors import EgressError
from .policy import EgressPolicy, LabelSelector, PolicyError, load_policies, parse_policy
from .verdicts import DropReason

__all__ = [
    "EgressError", "DropReason",
    "DROP_REASON_NAMES",
    # LPM trie and egress map
    "LPMTrie", "LPM_MAX_VALUE", "LPM_NO_VALUE",
    "EgressMap", "EgressEntry",
    "GATEWAY_NOT_FOUND_V4", "GATEWAY_NOT_FOUND_V6", "EXCLUDED_CIDR_V4", "EXCLUDED_CIDR_V6",
    "EGRESS_IP_NOT_FOUND_V4", "EGRESS_IP_NOT_FOUND_V6",
    "EGRESS_STATUS_NO_MATCH", "EGRESS_STATUS_MATCH", "EGRESS_STATUS_EXCLUDED", "EGRESS_STATUS_NO_GATEWAY",
    # packet engine
    "PacketBatch", "PacketDropped", "PacketInfo", "VxlanTemplate",
    "parse", "snat", "dnat", "ttl_decrement", "icmp_too_big", "vxlan_encap", "vxlan_decap",
    # AF_PACKET rings
    "PacketRing", "bpf_all", "bpf_any", "bpf_compile", "bpf_dst", "bpf_not_outgoing", "bpf_vxlan",
    "pcap_available",
    # NAT / connection table
    "NatTable", "NatEntry", "NatRefused", "NAT_TUPLE_DTYPE", "nat_tuples",
    # flow log, metrics, control socket
    "FlowLog", "FLOW_RECORD_DTYPE", "FLOW_KIND_NAMES", "FLOW_END_REASON_NAMES",
    "FlowLogger", "Enricher", "JsonLinesSink", "CallbackSink", "records_to_dicts",
    "StatsCollector", "MetricsServer",
    "ControlServer", "ControlClient", "ControlError", "default_socket_path",
    # fused datapath and agent
    "Datapath", "Agent", "AgentError",
    # control plane
    "load_inputs", "InputError",
    "load_policies", "parse_policy", "EgressPolicy", "LabelSelector", "PolicyError",
    "Cluster", "Node", "Namespace", "Pod", "Interface", "load_cluster", "ClusterError",
    "Compiler", "Target", "Conflict", "Problem",
]
__version__ = "0.1.0"


def __getattr__(name):
    # metrics need prometheus_client (the "metrics" extra): import on first use
    if name in ("MetricsServer", "StatsCollector"):
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'egresscore' has no attribute {name!r}")
