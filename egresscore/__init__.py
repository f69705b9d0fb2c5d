"""egresscore: Cilium's egress gateway as an embeddable userspace datapath.

The public names are these few; everything else stays importable from its
module (egresscore.compiler, .control, .flowlog, .metrics, .show, .types,
the core's packet functions and constants from egresscore._core, ...).
"""

from ._core import Datapath, EgressMap, FlowLog, LPMTrie, NatTable, PacketRing
from .agent import Agent, AgentError
from .cluster import Cluster, ClusterError, Namespace, Node, Pod
from .compiler import Compiler
from .errors import EgressError
from .inputs import InputError, load_inputs
from .policy import EgressPolicy, PolicyError
from .verdicts import DropReason

__all__ = [  # the agent, the datapath parts it runs, the control plane, the errors
    "Agent",
    "AgentError",
    "Cluster",
    "ClusterError",
    "Compiler",
    "Datapath",
    "DropReason",
    "EgressError",
    "EgressMap",
    "EgressPolicy",
    "FlowLog",
    "InputError",
    "LPMTrie",
    "Namespace",
    "NatTable",
    "Node",
    "PacketRing",
    "Pod",
    "PolicyError",
    "load_inputs",
]
__version__ = "0.1.0"

# Names egresscore exported before its API shrank to __all__: still resolved
# here, from their modules, for existing callers (the benchmarks among them);
# new code imports them from the module named.
_FROM_MODULES = {
    "._core": (
        "DROP_REASON_NAMES", "EGRESS_IP_NOT_FOUND_V4", "EGRESS_IP_NOT_FOUND_V6", "EGRESS_STATUS_EXCLUDED",
        "EGRESS_STATUS_MATCH", "EGRESS_STATUS_NO_GATEWAY", "EGRESS_STATUS_NO_MATCH", "EXCLUDED_CIDR_V4",
        "EXCLUDED_CIDR_V6", "GATEWAY_NOT_FOUND_V4", "GATEWAY_NOT_FOUND_V6", "LPM_MAX_VALUE", "LPM_NO_VALUE",
        "EgressEntry", "PacketBatch", "PacketDropped", "PacketInfo", "VxlanTemplate", "dnat", "icmp_too_big",
        "parse", "snat", "ttl_decrement", "vxlan_decap", "vxlan_encap", "NAT_TUPLE_DTYPE", "NatEntry",
        "NatRefused", "nat_tuples", "FLOW_END_REASON_NAMES", "FLOW_KIND_NAMES", "FLOW_RECORD_DTYPE",
    ),
    "._bpf": ("bpf_all", "bpf_any", "bpf_compile", "bpf_dst", "bpf_not_outgoing", "bpf_vxlan", "pcap_available"),
    ".cluster": ("Interface", "load_cluster"),
    ".compiler": ("Conflict", "Problem"),
    ".control": ("ControlClient", "ControlError", "ControlServer", "default_socket_path"),
    ".flowlog": ("CallbackSink", "Enricher", "FlowLogger", "JsonLinesSink", "records_to_dicts"),
    ".metrics": ("MetricsServer", "StatsCollector"),  # needs prometheus_client (the "metrics" extra)
    ".policy": ("LabelSelector", "load_policies", "parse_policy"),
}
_MODULE_OF = {name: module for module, names in _FROM_MODULES.items() for name in names}


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'egresscore' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)
