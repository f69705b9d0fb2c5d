"""Drop reasons as a Python enum, made from the core's own table.

DropReason's members are the core's DROP_REASON_NAMES upper-cased, its
values their codes (the table's indexes): the numbers in PacketDropped.code,
in the datapath's drop counters and in flow-log drop records.  Built at
import, so it cannot drift from the core.

    DropReason.NO_GATEWAY == 4;  DropReason(exc.code).label == exc.reason
"""
import enum

from ._core import DROP_REASON_NAMES

__all__ = ["DropReason"]


class _Named(enum.IntEnum):
    @property
    def label(self):
        """The core's own name of this reason ("no_gateway"), as counters and flow records show it."""
        return DROP_REASON_NAMES[self]


DropReason = _Named("DropReason", [(name.upper(), code) for code, name in enumerate(DROP_REASON_NAMES)],
                    module=__name__, qualname="DropReason")
DropReason.__doc__ = "A datapath drop reason: its code (IntEnum value) and name (`.label`)."
