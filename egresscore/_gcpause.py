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
import time
from contextlib import contextmanager

__all__ = ["freeze_heap", "gc_paused", "gc_watch", "untrack"]

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


_watch = None


class _GcWatch:
    """Counts the cyclic GC's passes per generation and the longest one (wall ms)."""

    def __init__(self):
        self.count = [0, 0, 0]
        self.max_ms = [0.0, 0.0, 0.0]
        self._t0 = None

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            gen = info.get("generation", 2)
            ms = (time.perf_counter() - self._t0) * 1000
            self._t0 = None
            self.count[gen] += 1
            if ms > self.max_ms[gen]:
                self.max_ms[gen] = ms

    def reset(self):
        self.count = [0, 0, 0]
        self.max_ms = [0.0, 0.0, 0.0]

    def stats(self):
        return {"collections": list(self.count), "max_ms": [round(m, 2) for m in self.max_ms],
                "frozen": gc.get_freeze_count()}


def gc_watch():
    """The process's one GC watch (installed on first call): {collections, max_ms, frozen}
    per generation from its stats(), since the heap was last frozen (freeze_heap).  A pass
    holds the GIL throughout, so its length is how long every other Python thread of the
    process may wait."""
    global _watch
    with _lock:
        if _watch is None:
            _watch = _GcWatch()
            gc.callbacks.append(_watch)
    return _watch


def freeze_heap():
    """Collect once, then freeze everything alive (gc.freeze()): what a process built to start
    (modules, its cluster and compiled state) is no longer scanned by later generation-2 passes,
    which then take the time of what changed since, not of the whole heap (an agent's gen-2 pass:
    28 ms on a quiet machine, each one holding the GIL).  Frozen objects are still freed by
    reference counting.  Skipped while a gc_paused() block runs (it freezes at its end)."""
    with _lock:
        if _depth:
            return False
        gc.collect()
        gc.freeze()
        if _watch is not None:
            _watch.reset()      # the watch shows the passes the running process makes, not this one
        return True
