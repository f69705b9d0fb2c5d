"""The cyclic GC paused while a bulk build runs, correctly across threads.

`gc.disable()` / `gc.enable()` are process-wide: two threads that each
pause and restore it (two sources resyncing, a compile beside a parse) can
leave it disabled for good, or enable it under the other's feet.  Here the
pauses are counted: the first one in disables the collector, the last one
out restores it as it found it.  `freeze=True`: the last one out also calls
gc.freeze() first, so the containers built meanwhile (10^6 for a 100,000-pod
compile, none of them cycles) never fill the young generations at once: the
generation-1 and -2 collections that would follow, started by some later
single change, scanned them for 0.3-1 s.  Frozen objects are still freed by
reference counting.

`untrack(obj)`: take one object that cannot be part of a reference cycle
(a tuple, or a NamedTuple such as EgressEntry, of strings and ints, or of
such tuples) out of the collector's lists.  CPython stops tracking an exact
tuple of untracked items at its first collection, never a tuple subclass
(an EgressEntry), nor a tuple holding one: each map entry a change writes
would stay in the generations for good, and every later generation-2
collection would scan them all.  Reference counting still frees it.
"""
from __future__ import annotations

import gc
import threading
from contextlib import contextmanager

__all__ = ["gc_paused", "untrack"]

try:   # CPython's own PyObject_GC_UnTrack (a no-op on an object not tracked)
    import ctypes

    untrack = ctypes.pythonapi.PyObject_GC_UnTrack
    untrack.argtypes = [ctypes.py_object]
    untrack.restype = None
except (ImportError, AttributeError):   # not CPython: the collector keeps them (correct, only slower)
    def untrack(obj):
        pass

_lock = threading.Lock()
_depth = 0
_was_enabled = False
_freeze = False


@contextmanager
def gc_paused(freeze=None):
    """Pause the cyclic GC for the block.  `freeze`: a callable (or bool) asked
    at the block's end: true means the objects of this build are frozen when
    the last pause ends."""
    global _depth, _was_enabled, _freeze
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            _freeze = False
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        want = freeze() if callable(freeze) else bool(freeze)
        with _lock:
            _freeze = _freeze or want
            _depth -= 1
            if _depth == 0:
                if _freeze:
                    gc.freeze()
                if _was_enabled:
                    gc.enable()
