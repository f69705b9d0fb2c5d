# Per-policy counting: the fixed array of slots a policy id is counted in.
#
# Policy ids come from the compiler (egresscore.types.POLICY_ID_MAX at most,
# 0 = none) through the egress map and the NAT entry.  The counters are
# arrays of POLICY_SLOTS records indexed by policy_slot(id): ids
# 1..POLICY_COUNTED own their slot, every larger id shares slot 0 (the
# overflow slot: id 0 itself is never counted), so the arrays stay bounded
# and a lookup never leaves them.
from libc.stdint cimport uint32_t

cdef enum:
    POLICY_COUNTED = 4096
    POLICY_SLOTS = 4097
    POLICY_OVERFLOW = 0


cdef inline uint32_t policy_slot(uint32_t policy) noexcept nogil:
    """The counter slot of a (non-zero) policy id."""
    return policy if policy <= POLICY_COUNTED else POLICY_OVERFLOW
