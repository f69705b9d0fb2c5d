# Verdicts, and the drop reasons generated from includes/drop_reasons.def.
#
# Every packet ends with a verdict: forwarded somewhere, or dropped with one
# of the reasons (DropReason, DROP_REASON_MAX of them).

cdef enum Verdict:
    VERDICT_PASS = 0            # hand to the kernel / leave alone
    VERDICT_TX = 1              # queued for transmit on the underlay
    VERDICT_TX_LOCAL = 2        # delivered to a local pod
    VERDICT_DROP = 3            # dropped: see the reason

include "drop_reasons.pxd"


cdef inline unsigned drop_slot(int reason) noexcept nogil:
    """Counter index of a drop reason: a code outside the table (a bug) lands
    in slot DROP_NONE instead of past the end of a counter array."""
    return <unsigned>reason if <unsigned>reason < DROP_REASON_MAX else DROP_NONE
