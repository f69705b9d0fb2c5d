"""The network-namespace lab: the seed's cluster (three nodes, pods, a router,
external servers) on one machine, plus the Linux kernel's own egress gateway as
the baseline datapath.  Needs root; everything lives in `egc-lab-*` namespaces.

    from egresscore.lab import Lab
    with Lab(datapath="kernel") as lab:
        servers = lab.start_servers()
        lab.tcp_request("app1", "203.0.113.10")   # -> '192.168.1.3' (the egress IP)
"""
from . import kernel, traffic
from ._ns import PREFIX, remove_stale
from .kernel import SAMPLE_POLICY, compile_entries, format_egress_list
from .topology import (
    CLUSTER_CIDR,
    DEFAULT_PODS,
    EGRESS_IPS,
    NODE_NAMES,
    ROUTER_IP,
    SERVERS,
    Lab,
    Node,
    Pod,
    Server,
    mac_for,
)

__all__ = [
    "CLUSTER_CIDR", "DEFAULT_PODS", "EGRESS_IPS", "Lab", "NODE_NAMES", "Node", "PREFIX", "Pod",
    "ROUTER_IP", "SAMPLE_POLICY", "SERVERS", "Server", "compile_entries", "format_egress_list",
    "kernel", "mac_for", "remove_stale", "traffic",
]
