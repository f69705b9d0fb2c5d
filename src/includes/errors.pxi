# The core's one map from C error codes to Python exceptions (as uvloop's
# errors.pyx): C functions return a code and never raise; the Python-facing
# method that called them raises what these functions build, once, outside
# the nogil section.
#
#   errno (from the kernel or libc)   errno_error: OSError of the errno's own
#                                     subclass (PermissionError for EPERM, ...),
#                                     MemoryError for ENOMEM; errno_input_error:
#                                     ValueError when the kernel refused a
#                                     caller's input; no_memory: a NULL alloc
#   a drop-reason code of the core    drop_error: PacketDropped (a frame);
#                                     nat_refused: NatRefused (a new NAT flow)

import os as _errors_os
import errno as _errors_errno

from egresscore.errors import EgressError as _EgressError   # the package's one error root (imports nothing)


class PacketDropped(_EgressError, ValueError):
    """The datapath would drop this frame; .reason names the drop reason
    (one of DROP_REASON_NAMES), .code is its number.  .reply holds the ICMP
    too-big frame to send back when the reason is frag_needed, else None."""

    def __init__(self, code, what="frame", reply=None):
        self.code = int(code)
        self.reason = DROP_REASON_NAMES[self.code]
        self.reply = reply
        super().__init__(f"{what} dropped: {self.reason}")


class NatRefused(_EgressError):
    """A new flow was refused; `.reason` is its drop-reason name."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


cdef object errno_error(int err, str what, str hint=""):
    """The exception for errno `err` (positive) met while doing `what`;
    `hint` (what to do about it) replaces the errno's text when given."""
    detail = hint or _errors_os.strerror(err)
    if err == _errors_errno.ENOMEM:
        return MemoryError(f"{what}: {detail}")
    return OSError(err, f"{what}: {detail}")      # OSError picks the errno's subclass


cdef object errno_input_error(int err, str what, str hint=""):
    """The exception when the kernel refused, with errno `err`, a value the
    caller passed (a filter program, a fanout mode): a ValueError."""
    return ValueError(f"{what}: {hint or _errors_os.strerror(err)}")


cdef object no_memory(str what):
    """The exception for an allocation (malloc, mmap) that returned NULL."""
    return MemoryError(f"{what}: out of memory")


cdef object drop_error(int code, str what="frame", object reply=None):
    """The exception for a frame refused with the core's drop-reason `code`."""
    return PacketDropped(code, what, reply)


cdef object nat_refused(int code):
    """The exception for a new NAT flow refused with drop-reason `code`."""
    return NatRefused(DROP_REASON_NAMES[code], f"new flow refused: {DROP_REASON_NAMES[code]}")
