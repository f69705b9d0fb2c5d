# gwpin: the gateway pin table's Python surface (the C is gwpin.h).
import ipaddress as _gwpin_ipaddress
import math as _gwpin_math
import os as _gwpin_os
import time as _gwpin_time

from libc.stdlib cimport calloc as _gwpin_calloc, free as _gwpin_free

GWPIN_DEFAULT_CAPACITY = 65536
GWPIN_TICK_S = (1 << GWPIN_TICK_SHIFT) / 1e9        # the coarse clock's tick (1.07 s)
_GWPIN_KINDS = ("tcp_established", "tcp_closing", "udp", "icmp")   # NatTable's timeout names, tmo[] order


cdef class GatewayPins:
    """The gateway each connection from this node's pods started on (make-before-break).

    GatewayPins(capacity=65536, timeouts=None, seed=None)

    A Datapath with make-before-break on (Datapath.set_make_before_break)
    looks every packet from a local pod up here after the egress map: a live
    pin keeps the connection on its gateway when the map now chooses another;
    a flow without one is pinned to the map's choice.  `capacity`: records,
    16 bytes each, rounded up to a power of two (4 to 16,777,216), in buckets
    of 4 (one cache line); a flow has two buckets to choose from, and when
    both are full the record nearest its expiry is replaced (evicted, or
    expired, in stats()): at half load about 0.4% of flows are refused a
    lasting pin, at 40% under 0.1%.
    `timeouts` (seconds, NatTable's names: tcp_established, tcp_closing, udp,
    icmp; default NatTable.DEFAULT_TIMEOUTS): how long an idle pin lives,
    rounded up to the coarse clock's tick (GWPIN_TICK_S) and capped at 32,767
    ticks (9.7 hours).  One writer: the datapath's thread (these methods run
    there, between batches); stats() may be read from any thread.
    """

    def __cinit__(self):
        self.t = NULL

    def __init__(self, capacity=GWPIN_DEFAULT_CAPACITY, timeouts=None, seed=None):
        cdef uint64_t records, buckets
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        if not GWPIN_WAYS <= capacity <= GWPIN_MAX_RECORDS:
            raise ValueError(f"capacity {capacity} is out of range {GWPIN_WAYS}-{GWPIN_MAX_RECORDS}")
        tmo = dict(NatTable.DEFAULT_TIMEOUTS)
        for name, val in (timeouts or {}).items():
            if name not in tmo:
                raise ValueError(f"timeouts key {name!r} is not one of {sorted(tmo)}")
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
                raise ValueError(f"timeouts[{name!r}] must be a positive number of seconds")
            tmo[name] = float(val)
        if seed is None:
            seed = int.from_bytes(_gwpin_os.urandom(8), "little")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError("seed must be an int")
        if self.t != NULL:
            raise RuntimeError("GatewayPins.__init__ called twice")
        records = 1 << (capacity - 1).bit_length()
        buckets = records // GWPIN_WAYS
        self.t = <gwpin_table *>_gwpin_calloc(1, sizeof(gwpin_table))
        if self.t == NULL:
            raise no_memory("GatewayPins")
        self._bytes = buckets * sizeof(gwpin_bucket)
        self.t.b = <gwpin_bucket *>egc_alloc_big(self._bytes, 1)
        if self.t.b == NULL:
            raise no_memory(f"GatewayPins of {records} records")
        self.t.mask = buckets - 1
        self.t.prefetch = self._bytes > GWPIN_PREFETCH_BYTES
        self.t.seed = (seed * 0x9e3779b97f4a7c15 + 0x2545f4914f6cdd1d) & 0xffffffffffffffff
        self._timeouts = {}
        for i, name in enumerate(_GWPIN_KINDS):
            ticks = min(GWPIN_MAX_TICKS, max(1, _gwpin_math.ceil(tmo[name] / GWPIN_TICK_S)))
            self.t.tmo[i] = ticks
            self._timeouts[name] = ticks * GWPIN_TICK_S

    def __dealloc__(self):
        if self.t != NULL:
            egc_free_big(self.t.b, self._bytes)
            _gwpin_free(self.t)
            self.t = NULL

    @property
    def capacity(self):
        """Records the table holds (a power of two)."""
        return (self.t.mask + 1) * GWPIN_WAYS

    @property
    def timeouts(self):
        """{kind: seconds} an idle pin lives, as applied (whole ticks)."""
        return dict(self._timeouts)

    def __len__(self):
        """Records held (live, or expired and not yet swept)."""
        return self.t.used

    def stats(self):
        """{capacity, records, pinned, kept, kept_nat, repinned, expired,
        evicted, flushed}: kept counts packets from local pods sent to their
        pinned gateway while the egress map chose another, kept_nat packets
        this node translated as a gateway for connections the map no longer
        sends here (make-before-break at work on either side)."""
        t = self.t
        return {"capacity": self.capacity, "records": t.used, "pinned": t.pinned, "kept": t.kept,
                "kept_nat": t.kept_nat, "repinned": t.repinned, "expired": t.expired, "evicted": t.evicted,
                "flushed": t.flushed}

    def records(self, now=None):
        """[{src, dst, proto, sport, dport, node, idle_s, closing}] of the live
        pins (node: the Datapath's node index of the gateway).  A full scan:
        for tests and inspection, not for a busy loop."""
        cdef uint64_t i
        cdef int j
        cdef uint64_t w
        cdef uint32_t tick = gwpin_tick(_gwpin_time.monotonic_ns() if now is None else <uint64_t>(float(now) * 1e9))
        out = []
        for i in range(self.t.mask + 1):
            for j in range(GWPIN_WAYS):
                w = self.t.b[i].r[j].k1
                if w == 0 or gwpin_age(w, tick) > gwpin_tmo(self.t, w):
                    continue
                k0 = self.t.b[i].r[j].k0
                out.append({"src": str(_gwpin_ipaddress.IPv4Address(k0 & 0xffffffff)),
                            "dst": str(_gwpin_ipaddress.IPv4Address(k0 >> 32)),
                            "proto": (w >> 32) & 0x7f, "sport": w & 0xffff, "dport": (w >> 16) & 0xffff,
                            "node": gwpin_node(w), "idle_s": gwpin_age(w, tick) * GWPIN_TICK_S,
                            "closing": bool(w & GWPIN_CLOSING)})
        return out

    def flush_node(self, int node):
        """Drop the pins on node index `node` (0..255); returns how many."""
        if not 0 <= node < 256:
            raise ValueError(f"node index must be in 0..255, not {node}")
        with nogil:
            n = gwpin_flush_node(self.t, <uint32_t>node)
        return n

    def clear(self):
        """Drop every pin; returns how many."""
        return gwpin_clear(self.t)

    def sweep(self, uint64_t buckets, now=None):
        """Clear the expired records of the next `buckets` buckets; returns how many."""
        cdef uint64_t t = _gwpin_time.monotonic_ns() if now is None else <uint64_t>(float(now) * 1e9)
        cdef uint64_t n
        with nogil:
            n = gwpin_sweep(self.t, t, buckets)
        return n
