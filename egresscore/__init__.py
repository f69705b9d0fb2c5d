"""egresscore: Cilium's egress gateway as an embeddable userspace datapath."""

from ._core import DROP_REASON_NAMES
from ._core import NAT_TUPLE_DTYPE, NatEntry, NatRefused, NatTable, nat_tuples

__all__ = ["DROP_REASON_NAMES", "NAT_TUPLE_DTYPE", "NatEntry", "NatRefused", "NatTable", "nat_tuples"]
__version__ = "0.1.0"
