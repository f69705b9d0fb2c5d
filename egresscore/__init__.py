"""egresscore: Cilium's egress gateway as an embeddable userspace datapath."""

from ._core import (
    EGRESS_STATUS_EXCLUDED,
    EGRESS_STATUS_MATCH,
    EGRESS_STATUS_NO_GATEWAY,
    EGRESS_STATUS_NO_MATCH,
    EXCLUDED_CIDR_V4,
    EXCLUDED_CIDR_V6,
    GATEWAY_NOT_FOUND_V4,
    GATEWAY_NOT_FOUND_V6,
    EGRESS_IP_NOT_FOUND_V4,
    EGRESS_IP_NOT_FOUND_V6,
    LPM_MAX_VALUE,
    LPM_NO_VALUE,
    EgressEntry,
    DROP_REASON_NAMES,
    EgressMap,
    LPMTrie,
)

from .cluster import Cluster, ClusterError, Interface, Namespace, Node, Pod, load_cluster
from .compiler import Compiler, Conflict, Problem, Target
from .policy import EgressPolicy, LabelSelector, PolicyError, load_policies, parse_policy

__all__ = [
    "DROP_REASON_NAMES",
    "LPMTrie", "LPM_MAX_VALUE", "LPM_NO_VALUE",
    "EgressMap", "EgressEntry",
    "GATEWAY_NOT_FOUND_V4", "GATEWAY_NOT_FOUND_V6", "EXCLUDED_CIDR_V4", "EXCLUDED_CIDR_V6",
    "EGRESS_IP_NOT_FOUND_V4", "EGRESS_IP_NOT_FOUND_V6",
    "EGRESS_STATUS_NO_MATCH", "EGRESS_STATUS_MATCH", "EGRESS_STATUS_EXCLUDED", "EGRESS_STATUS_NO_GATEWAY",
    # control plane
    "load_policies", "parse_policy", "EgressPolicy", "LabelSelector", "PolicyError",
    "Cluster", "Node", "Namespace", "Pod", "Interface", "load_cluster", "ClusterError",
    "Compiler", "Target", "Conflict", "Problem",
]
from ._core import PacketRing
from ._bpf import (bpf_all, bpf_any, bpf_compile, bpf_dst, bpf_not_outgoing, bpf_vxlan,
                   pcap_available)

__all__ += ["PacketRing", "bpf_all", "bpf_any", "bpf_compile", "bpf_dst",
           "bpf_not_outgoing", "bpf_vxlan", "pcap_available"]
__version__ = "0.1.0"
