"""egresscore: Cilium's egress gateway as an embeddable userspace datapath."""

from ._core import DROP_REASON_NAMES

__all__ = ["DROP_REASON_NAMES"]
__version__ = "0.1.0"
