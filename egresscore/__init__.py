"""egresscore: Cilium's egress gateway as an embeddable userspace datapath."""

from ._core import DROP_REASON_NAMES
from ._core import (
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
)

__all__ = [
    "DROP_REASON_NAMES",
    # packet engine
    "PacketBatch",
    "PacketDropped",
    "PacketInfo",
    "VxlanTemplate",
    "dnat",
    "icmp_too_big",
    "parse",
    "snat",
    "ttl_decrement",
    "vxlan_decap",
    "vxlan_encap",
]
__version__ = "0.1.0"
