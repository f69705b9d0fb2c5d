"""egresscore: Cilium's egress gateway as an embeddable userspace datapath."""

from ._core import DROP_REASON_NAMES, PacketRing
from ._bpf import (bpf_all, bpf_any, bpf_compile, bpf_dst, bpf_not_outgoing, bpf_vxlan,
                   pcap_available)

__all__ = ["DROP_REASON_NAMES", "PacketRing", "bpf_all", "bpf_any", "bpf_compile", "bpf_dst",
           "bpf_not_outgoing", "bpf_vxlan", "pcap_available"]
__version__ = "0.1.0"
