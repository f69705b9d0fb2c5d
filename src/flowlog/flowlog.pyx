# flowlog: fixed-size flow records appended by C, drained by Python in batches.
#
# The datapath and the NAT table call flow_append / flow_drop without the GIL
# and without ever waiting: the ring is a bounded multi-producer,
# single-consumer queue (flow_ring.h).  When it is full the record is lost and
# counted (FlowLog.stats["lost"]); the consumer (a drain thread) reads batches
# into a NumPy structured array.
#
# Drop records go through a token bucket per drop reason (rate records/s,
# burst records), so a flood of one kind of drop cannot drown the log or the
# other reasons; the refused records are counted by reason.  The bucket is
# exact with one producer and approximate with several (its updates are not
# atomic: a race can let one extra record through or refuse one).

from libc.stdint cimport uint8_t, uint16_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport calloc, free

import threading as _threading
import numpy as _np
cimport numpy as cnp

FLOW_RECORD_DTYPE = _np.dtype({
    "names": ["time", "duration", "kind", "reason", "family", "proto", "sport", "dport",
              "src", "dst", "xsrc", "xport", "policy", "pkts_out", "pkts_in", "gateway",
              "bytes_out", "bytes_in", "tcp_flags"],
    "formats": ["<u8", "<u8", _np.uint8, _np.uint8, _np.uint8, _np.uint8, "<u2", "<u2",
                (_np.uint8, 16), (_np.uint8, 16), (_np.uint8, 16), "<u2", "<u2", "<u4", "<u4",
                (_np.uint8, 16), "<u8", "<u8", _np.uint8],
    "offsets": [0, 8, 16, 17, 18, 19, 20, 22, 24, 40, 56, 72, 74, 76, 80, 84, 100, 108, 116],
    "itemsize": 128,
})
assert sizeof(flow_record) == 128

FLOW_KIND_NAMES = ("none", "start", "end", "drop", "update")
FLOW_END_REASON_NAMES = ("none", "expiry", "fin", "rst", "eviction")
FLOW_NO_POLICY_ID = FLOW_NO_POLICY


cdef int flow_append(flow_log* fl, const flow_record* rec) noexcept nogil:
    """Copy `rec` into the ring: 0, or -1 (ring full; counted in fl.lost)."""
    cdef int64_t pos = flow_ring_claim(&fl.enq, fl.seq, fl.mask)
    if pos < 0:
        flow_atomic_add(&fl.lost, 1)
        return -1
    memcpy(&fl.recs[<uint64_t>pos & fl.mask], rec, sizeof(flow_record))
    flow_ring_publish(fl.seq, fl.mask, <uint64_t>pos)
    if rec.kind < FLOW_NKINDS:
        flow_atomic_add(&fl.appended[rec.kind], 1)
    return 0


cdef inline bint _flow_take_token(flow_log* fl, uint8_t reason, uint64_t now) noexcept nogil:
    cdef uint64_t c, elapsed
    if fl.drop_interval == 0:
        return False
    c = fl.credit[reason]
    if now > fl.last[reason]:
        elapsed = now - fl.last[reason]
        c = fl.drop_burst if elapsed >= fl.drop_burst - c else c + elapsed
        fl.last[reason] = now
    if c >= fl.drop_interval:
        fl.credit[reason] = c - fl.drop_interval
        return True
    fl.credit[reason] = c
    return False


cdef bint flow_drop_allow(flow_log* fl, uint8_t reason, uint64_t now) noexcept nogil:
    """Take a token from the bucket of `reason`; False (and the record counted
    as suppressed) when it is empty."""
    reason = <uint8_t>drop_slot(reason)
    if not _flow_take_token(fl, reason, now):
        flow_atomic_add(&fl.suppressed[reason], 1)
        return False
    return True


cdef int flow_drop(flow_log* fl, uint64_t now, uint8_t reason, uint8_t family,
                   uint8_t proto, uint16_t sport, uint16_t dport, const uint8_t* src,
                   const uint8_t* dst, uint16_t policy, uint8_t tcp_flags) noexcept nogil:
    """A drop record for one packet, if the reason's bucket has a token.

    Returns 0 (written), 1 (suppressed by the rate limit, counted) or -1
    (ring full, counted).  src/dst may be NULL (packet too short to tell)."""
    if not flow_drop_allow(fl, reason, now):
        return 1
    return flow_drop_record(fl, now, reason, family, proto, sport, dport, src, dst, policy,
                            tcp_flags)


cdef int flow_drop_record(flow_log* fl, uint64_t now, uint8_t reason, uint8_t family,
                          uint8_t proto, uint16_t sport, uint16_t dport, const uint8_t* src,
                          const uint8_t* dst, uint16_t policy, uint8_t tcp_flags) noexcept nogil:
    """A drop record without the rate limit: 0, or -1 (ring full, counted)."""
    cdef flow_record r
    memset(&r, 0, sizeof(flow_record))
    r.time = now
    r.kind = FLOW_DROP
    r.reason = reason
    r.family = family
    r.proto = proto
    r.sport = sport
    r.dport = dport
    r.policy = policy
    r.tcp_flags = tcp_flags
    if src != NULL:
        memcpy(r.src, src, 16)
    if dst != NULL:
        memcpy(r.dst, dst, 16)
    return flow_append(fl, &r)


cdef class FlowLog:
    """Ring of flow records shared by the datapath (C producers) and a reader.

    FlowLog(capacity=65536, drop_rate=100.0, drop_burst=200)

    `capacity` records (rounded up to a power of two) are buffered between
    drains; `drop_rate` drop records per second per drop reason are kept (at
    most `drop_burst` in a burst), the rest counted as suppressed; drop_rate=0
    keeps none.  Attach it to a NatTable (`table.flow_log = log`) for start and
    end records of connections; drain() from one thread.
    """

    def __cinit__(self, *args, **kwargs):
        self.fl = NULL

    def __init__(self, capacity=65536, *, drop_rate=100.0, drop_burst=200):
        cdef uint64_t cap = 1, i
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        if not 1 <= capacity <= (1 << 24):
            raise ValueError(f"capacity {capacity} is out of range 1-{1 << 24}")
        if (isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float))
                or not 0 <= drop_rate <= 1e7):
            raise ValueError(f"drop_rate must be a number of records per second in 0-1e7, "
                             f"not {drop_rate!r}")
        if (isinstance(drop_burst, bool) or not isinstance(drop_burst, (int, float))
                or not 1 <= drop_burst <= 1e7):
            raise ValueError(f"drop_burst must be a number of records in 1-1e7, "
                             f"not {drop_burst!r}")
        if self.fl != NULL:
            raise RuntimeError("FlowLog.__init__ called twice")
        while cap < <uint64_t>capacity:
            cap <<= 1
        fl = <flow_log*>calloc(1, sizeof(flow_log))
        if fl == NULL:
            raise no_memory("FlowLog")
        self.fl = fl
        fl.recs = <flow_record*>calloc(cap, sizeof(flow_record))
        fl.seq = <uint64_t*>calloc(cap, sizeof(uint64_t))
        if fl.recs == NULL or fl.seq == NULL:
            raise no_memory(f"FlowLog of capacity {cap}")
        for i in range(cap):
            fl.seq[i] = i
        fl.mask = cap - 1
        self._lock = _threading.Lock()
        self.set_drop_rate(drop_rate, drop_burst)

    def __dealloc__(self):
        if self.fl != NULL:
            free(self.fl.recs)
            free(self.fl.seq)
            free(self.fl)
            self.fl = NULL

    cdef flow_log* _get(self) except NULL:
        if self.fl == NULL:
            raise RuntimeError("FlowLog was not initialised (__init__ not run)")
        return self.fl

    def set_drop_rate(self, drop_rate, drop_burst=None):
        """Change the drop-record limit (records/s per reason, burst); buckets refill."""
        cdef flow_log* fl = self._get()
        if drop_burst is None:
            drop_burst = self._burst
        rate = float(drop_rate)
        burst = float(drop_burst)
        if not (0 <= rate <= 1e7 and 1 <= burst <= 1e7):
            raise ValueError("drop_rate must be in 0-1e7 and drop_burst in 1-1e7")
        self._rate = rate
        self._burst = burst
        cdef uint64_t interval = 0 if rate == 0 else max(1, <uint64_t>(1e9 / rate))
        fl.drop_interval = interval
        fl.drop_burst = <uint64_t>(burst * interval)
        for r in range(<int>DROP_REASON_MAX):
            fl.credit[r] = fl.drop_burst
            fl.last[r] = 0

    @property
    def capacity(self):
        return self._get().mask + 1

    def __len__(self):
        """Records waiting to be drained (approximate while producers run)."""
        cdef flow_log* fl = self._get()
        cdef uint64_t enq = flow_atomic_load(&fl.enq)
        return enq - fl.deq if enq > fl.deq else 0

    def drain(self, max_records=None):
        """Take up to `max_records` (all by default) waiting records, oldest
        first, as a FLOW_RECORD_DTYPE array (a copy; the slots are reused)."""
        cdef flow_log* fl = self._get()
        cdef uint64_t n, k, pos
        cdef uint64_t cap = fl.mask + 1
        if max_records is None:
            n = cap
        else:
            if isinstance(max_records, bool) or not isinstance(max_records, int) \
                    or max_records < 0:
                raise ValueError(f"max_records must be a non-negative int, "
                                 f"not {max_records!r}")
            n = min(<uint64_t>max_records, cap)
        out = _np.empty(n, dtype=FLOW_RECORD_DTYPE)
        cdef flow_record* dst = <flow_record*>cnp.PyArray_DATA(out)
        with self._lock:
            with nogil:
                k = 0
                pos = fl.deq
                while k < n and flow_ring_ready(fl.seq, fl.mask, pos):
                    memcpy(&dst[k], &fl.recs[pos & fl.mask], sizeof(flow_record))
                    flow_ring_release(fl.seq, fl.mask, pos)
                    pos += 1
                    k += 1
                fl.deq = pos
        return out[:k].copy() if k < n // 2 else out[:k]

    def _append(self, kind, reason=0, **fields):
        """Append one record built from Python values (for tests and embedders
        that log their own events); returns True if it was written."""
        cdef flow_log* fl = self._get()
        rec = _np.zeros(1, dtype=FLOW_RECORD_DTYPE)
        rec["kind"] = kind
        rec["reason"] = reason
        for name, value in fields.items():
            if name in ("src", "dst", "xsrc", "gateway"):
                fam, packed = addr_packed16(value, name)
                rec[name] = _np.frombuffer(packed, _np.uint8)
                rec["family"] = fam
            else:
                rec[name] = value
        cdef flow_record* r = <flow_record*>cnp.PyArray_DATA(rec)
        return flow_append(fl, r) == 0

    def _drop(self, reason, src, sport, dst, dport, proto=17, *, now):
        """flow_drop from Python (tests): 0 written, 1 suppressed, -1 ring full."""
        cdef flow_log* fl = self._get()
        fs, ps = addr_packed16(src, "src")
        _, pd = addr_packed16(dst, "dst")
        cdef bytes bs = ps, bd = pd
        return flow_drop(fl, <uint64_t>round(now * 1e9), reason, fs, proto, sport, dport,
                         <const uint8_t*><char*>bs, <const uint8_t*><char*>bd,
                         FLOW_NO_POLICY, 0)

    @property
    def stats(self):
        """Counters: records appended by kind, lost (ring full), drop records
        suppressed by the rate limit (by reason name), waiting."""
        cdef flow_log* fl = self._get()
        return {
            "capacity": fl.mask + 1,
            "appended": {FLOW_KIND_NAMES[k]: flow_atomic_load(&fl.appended[k])
                         for k in range(1, FLOW_NKINDS)},
            "lost": flow_atomic_load(&fl.lost),
            "suppressed": {DROP_REASON_NAMES[r]: flow_atomic_load(&fl.suppressed[r])
                           for r in range(len(DROP_REASON_NAMES))
                           if flow_atomic_load(&fl.suppressed[r])},
            "waiting": len(self),
            "drop_rate": self._rate,
            "drop_burst": self._burst,
        }
