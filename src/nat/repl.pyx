# nat/repl: a NatTable's side of state replication (egresscore.replication).
#
# Replication records are fixed 60-byte structs (REPL_RECORD_DTYPE): one
# connection's identity and translation, nothing else.  The active gateway
# turns the flow log's start/end records into them (in NumPy, no Python per
# record) and exports its live connections for a full resync; the standby
# applies them to its own table.  All three calls here write or walk the
# table in C under its lock, so the caller must be the table's one writer
# (the agent's loop thread, between batches): the datapath's C loop takes no
# lock.  They are bounded by their arguments (one datagram's records, one
# export chunk), so the loop thread is held for microseconds.

from libc.string cimport memcmp

REPL_RECORD_DTYPE = _np.dtype({
    "names": ["op", "family", "proto", "state", "sport", "dport", "xport", "src", "dst", "xsrc"],
    "formats": [_np.uint8, _np.uint8, _np.uint8, _np.uint8, "<u2", "<u2", "<u2",
                (_np.uint8, 16), (_np.uint8, 16), (_np.uint8, 16)],
    "offsets": [0, 1, 2, 3, 4, 6, 8, 12, 28, 44],
    "itemsize": 60,
})

cdef enum:
    REPL_ADD = 1
    REPL_DEL = 2

REPL_OP_ADD = REPL_ADD
REPL_OP_DEL = REPL_DEL


cdef packed struct repl_record:
    uint8_t op                  # REPL_OP_ADD / REPL_OP_DEL
    uint8_t family
    uint8_t proto
    uint8_t state               # the active's state (informational: TCP is kept ESTABLISHED)
    uint16_t sport
    uint16_t dport
    uint16_t xport
    uint16_t _pad
    uint8_t src[16]
    uint8_t dst[16]
    uint8_t xsrc[16]            # the egress IP


cdef uint32_t _repl_without_log(nat_table* t, uint32_t idx, uint64_t now) noexcept nogil:
    """Collect entry idx without an end record: a replicated connection that
    ends here did not end on this node."""
    cdef flow_log* fl = t.flog
    t.flog = NULL
    _nat_collect(t, idx, now)
    t.flog = fl
    return 1


cdef void _repl_apply(nat_table* t, const repl_record* r, Py_ssize_t n, uint64_t now,
                      uint64_t* counts) noexcept nogil:
    """counts: [added, removed, known (refreshed), not found, unknown egress IP, invalid, full]."""
    cdef Py_ssize_t i
    cdef nat_entry e
    cdef nat_entry* e2
    cdef int ext, rc
    cdef uint8_t st
    cdef uint16_t dp
    cdef uint32_t idx
    for i in range(n):
        if r[i].family != 4 and r[i].family != 6:
            counts[5] += 1
            continue
        dp = 0 if _nat_is_icmp(r[i].proto) else r[i].dport
        idx = _nat_find_fwd(t, _nat_hash_fwd(t.seed, r[i].family, r[i].proto, r[i].sport, dp,
                                             r[i].src, r[i].dst),
                            r[i].family, r[i].proto, r[i].sport, dp, r[i].src, r[i].dst)
        if r[i].op == REPL_DEL:
            if idx == NAT_NONE or t.entries[idx].xport != r[i].xport:
                counts[3] += 1
            else:
                counts[1] += _repl_without_log(t, idx, now)
            continue
        if r[i].op != REPL_ADD:
            counts[5] += 1
            continue
        if idx != NAT_NONE:
            # known (a resync or refresh repeats it): the active still has it, so
            # its expiry starts over (later expiries are re-bucketed lazily)
            e2 = &t.entries[idx]
            if e2.xport == r[i].xport and e2.expires < now + t.timeout[e2.state]:
                e2.expires = now + t.timeout[e2.state]
            counts[2] += 1
            continue
        ext = nat_ext_find(t, r[i].family, r[i].xsrc)
        if ext < 0:
            counts[4] += 1
            continue
        if r[i].proto == NAT_PROTO_TCP:
            st = NAT_STATE_ESTABLISHED     # until its end record (or takeover traffic) says otherwise
        elif r[i].proto == NAT_PROTO_UDP:
            st = NAT_STATE_UDP
        else:
            st = NAT_STATE_ICMP
        memset(&e, 0, sizeof(nat_entry))
        e.family = r[i].family
        e.proto = r[i].proto
        e.sport = r[i].sport
        e.dport = dp
        e.xport = r[i].xport
        e.ext = <uint16_t>ext
        e.state = st
        e.expires = now + t.timeout[st]
        e.created_ms = _nat_ms(now)
        rc = nat_state_insert(t, &e, r[i].src, r[i].dst, now)
        if rc == NAT_ADOPT_OK:
            counts[0] += 1
        elif rc == NAT_ADOPT_FULL:
            counts[6] += 1
        else:
            counts[5] += 1


def nat_repl_apply(NatTable table, records, now=None):
    """Apply REPL_RECORD_DTYPE records to `table` (call on its one writer):
    {added, removed, known, not_found, unknown_egress_ip, invalid, full}.
    An add becomes an inactive connection (ESTABLISHED for TCP, with the
    table's timeout; one already there has its expiry started over), a
    delete removes it without an end record."""
    cdef cnp.ndarray arr = _np.ascontiguousarray(records, dtype=REPL_RECORD_DTYPE)
    cdef uint64_t counts[7]
    cdef uint64_t t_ns = table._now(now)
    cdef const repl_record* r = <const repl_record*>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t n = arr.shape[0]
    memset(counts, 0, sizeof(counts))
    with table._lock:
        with nogil:
            _repl_apply(table.t, r, n, t_ns, counts)
    return dict(zip(("added", "removed", "known", "not_found", "unknown_egress_ip", "invalid", "full"),
                    [counts[k] for k in range(7)]))


def nat_repl_export(NatTable table, egress_ips, Py_ssize_t start, Py_ssize_t max_scan, now=None):
    """Live connections of the given egress IPs among entries [start,
    start + max_scan), as REPL_OP_ADD records; returns (records, next start),
    next start None at the end of the table.  One chunk of a full resync."""
    cdef nat_table* t = table.t
    cdef uint64_t t_ns = table._now(now)
    cdef uint8_t want[NAT_MAX_EXT]
    cdef Py_ssize_t i, end, k = 0
    cdef uint64_t hwm
    cdef nat_entry* e
    cdef repl_record* o
    cdef bytes packed
    cdef uint8_t buf[16]
    memset(want, 0, sizeof(want))
    for ip in egress_ips:
        fam, packed = addr_packed16(ip, "egress IP")
        i = nat_ext_find(t, fam, <const uint8_t*><char*>packed)
        if i >= 0:
            want[i] = 1
    if start < 0 or max_scan < 1:
        raise ValueError("start must be >= 0 and max_scan >= 1")
    out = _np.zeros(max_scan, dtype=REPL_RECORD_DTYPE)
    o = <repl_record*>cnp.PyArray_DATA(out)
    with table._lock:
        hwm = t.entries_hwm
        end = start + max_scan
        if end > <Py_ssize_t>hwm:
            end = <Py_ssize_t>hwm
        with nogil:
            for i in range(start, end):
                e = &t.entries[i]
                if e.state == NAT_STATE_FREE or e.expires <= t_ns or not want[e.ext]:
                    continue
                o[k].op = REPL_ADD
                o[k].family = e.family
                o[k].proto = e.proto
                o[k].state = e.state
                o[k].sport = e.sport
                o[k].dport = e.dport
                o[k].xport = e.xport
                memcpy(o[k].src, _nat_e_src(t, e, buf), 16)
                memcpy(o[k].dst, _nat_e_dst(t, e, buf), 16)
                memcpy(o[k].xsrc, t.ext[e.ext].addr, 16)
                k += 1
        nxt = None if end >= <Py_ssize_t>hwm else end
    return out[:k].copy(), nxt


def nat_repl_clear(NatTable table, egress_ip, now=None):
    """Remove every connection of `egress_ip` without end records (a standby
    dropping what a resync replaces); returns how many."""
    cdef nat_table* t = table.t
    cdef uint64_t t_ns = table._now(now)
    cdef uint32_t i, n = 0
    cdef bytes packed
    cdef int ext
    fam, packed = addr_packed16(egress_ip, "egress IP")
    ext = nat_ext_find(t, fam, <const uint8_t*><char*>packed)
    if ext < 0:
        return 0
    with table._lock:
        with nogil:
            for i in range(t.entries_hwm):
                if t.entries[i].state != NAT_STATE_FREE and t.entries[i].ext == ext:
                    n += _repl_without_log(t, i, t_ns)
    return n


# ---------------------------------------------------------------------------
# the active's encoder: flow ring -> wire datagrams, in C (egresscore.replication
# describes the wire; its Python encode() is the reference this must equal)

cdef enum:
    REPL_HDR = 32               # header bytes
    REPL_GRAM = 1400            # bytes of a full IPv4 datagram (57 records)
    REPL_REC4 = 24
    REPL_REC6 = 60
    REPL_PER4 = 57              # (REPL_GRAM - REPL_HDR) // REPL_REC4
    REPL_PER6 = 22              # (REPL_GRAM - REPL_HDR) // REPL_REC6
    REPL_MAX_WANT = 64          # egress IPs one stream replicates

REPL_DATAGRAM_BYTES = {4: REPL_HDR + REPL_PER4 * REPL_REC4, 6: REPL_HDR + REPL_PER6 * REPL_REC6}


cdef inline void _repl_header(uint8_t* p, uint8_t family, uint32_t count, uint32_t epoch, uint64_t seq,
                              uint64_t t0) noexcept nogil:
    p[0] = 69        # "EGCR"
    p[1] = 71
    p[2] = 67
    p[3] = 82
    p[4] = 1         # version
    p[5] = 1         # DATA
    p[6] = family
    p[7] = 0
    be_store32(p + 8, count)
    be_store32(p + 12, epoch)
    be_store64(p + 16, seq)
    be_store64(p + 24, t0)


cdef struct _repl_out:
    uint8_t* buf
    Py_ssize_t cap              # datagrams the buffer holds
    Py_ssize_t grams            # datagrams started
    uint32_t n                  # records in the open one
    uint64_t t0                 # its oldest record
    uint32_t per
    uint32_t size               # bytes of a full datagram


cdef inline uint8_t* _repl_slot(_repl_out* o, const flow_record* r) noexcept nogil:
    """Where the next record goes (a new datagram when the open one is full),
    NULL when the buffer is full."""
    if o.grams == 0 or o.n == o.per:
        if o.grams == o.cap:
            return NULL
        o.grams += 1
        o.n = 0
        o.t0 = r.time
    if r.time < o.t0:
        o.t0 = r.time
    o.n += 1
    return o.buf + (o.grams - 1) * o.size + REPL_HDR + (o.n - 1) * (o.size - REPL_HDR) // o.per


cdef inline void _repl_close(_repl_out* o, uint8_t family, uint32_t epoch, uint64_t* seq,
                             uint64_t* t0s) noexcept nogil:
    cdef Py_ssize_t g
    for g in range(o.grams):
        _repl_header(o.buf + g * o.size, family, o.per if g < o.grams - 1 else o.n, epoch, seq[0],
                     t0s[g] if g < o.grams - 1 else o.t0)
        seq[0] += 1


def repl_encode_log(FlowLog log, egress_ips, uint32_t epoch, uint64_t seq, unsigned char[::1] buf4,
                    unsigned char[::1] buf6):
    """Drain `log` (the active's flow records) straight into wire datagrams:
    the starts and ends of connections of `egress_ips` become DATA records
    in buf4 (IPv4 datagrams of REPL_DATAGRAM_BYTES[4] bytes, the last one
    shorter) and buf6, numbered from `seq` (IPv4 first).  Stops when either
    buffer is full (the rest stays in the ring).  Returns (bytes of buf4,
    bytes of buf6, datagrams, records drained, records kept)."""
    cdef flow_log* fl = log._get()
    cdef uint8_t want[REPL_MAX_WANT][16]
    cdef int nwant = 0, w
    cdef _repl_out o4, o6
    cdef _repl_out* o
    cdef uint64_t pos, taken = 0, kept = 0, s = seq
    cdef const flow_record* r
    cdef uint8_t* p
    cdef uint64_t t0s4[1024]
    cdef uint64_t t0s6[1024]
    cdef bint match
    cdef bytes packed
    for ip in egress_ips:
        if nwant == REPL_MAX_WANT:
            raise ValueError(f"at most {REPL_MAX_WANT} egress IPs a stream")
        _, packed = addr_packed16(ip, "egress IP")
        memcpy(want[nwant], <const char*>packed, 16)
        nwant += 1
    if buf4.shape[0] < REPL_HDR + REPL_PER4 * REPL_REC4 or buf6.shape[0] < REPL_HDR + REPL_PER6 * REPL_REC6:
        raise ValueError("buf4 and buf6 must hold a datagram each")
    memset(&o4, 0, sizeof(o4))
    memset(&o6, 0, sizeof(o6))
    o4.buf = &buf4[0]
    o4.per = REPL_PER4
    o4.size = REPL_HDR + REPL_PER4 * REPL_REC4
    o4.cap = min(buf4.shape[0] // o4.size, 1024)
    o6.buf = &buf6[0]
    o6.per = REPL_PER6
    o6.size = REPL_HDR + REPL_PER6 * REPL_REC6
    o6.cap = min(buf6.shape[0] // o6.size, 1024)
    with log._lock:
        with nogil:
            pos = fl.deq
            while flow_ring_ready(fl.seq, fl.mask, pos):
                r = &fl.recs[pos & fl.mask]
                if (r.kind == FLOW_START or r.kind == FLOW_END) and (r.family == 4 or r.family == 6):
                    match = False
                    for w in range(nwant):
                        if memcmp(r.xsrc, want[w], 16) == 0:
                            match = True
                            break
                    if match:
                        o = &o4 if r.family == 4 else &o6
                        if o.grams > 0 and o.n == o.per:
                            if o.grams == o.cap:
                                break               # full: this record waits for the next call
                            if r.family == 4:
                                t0s4[o.grams - 1] = o.t0
                            else:
                                t0s6[o.grams - 1] = o.t0
                        p = _repl_slot(o, r)
                        if p == NULL:
                            break
                        p[0] = REPL_ADD if r.kind == FLOW_START else REPL_DEL
                        p[1] = r.proto
                        p[2] = 0
                        p[3] = 0
                        be_store16(p + 4, r.sport)
                        be_store16(p + 6, r.dport)
                        be_store16(p + 8, r.xport)
                        p[10] = 0
                        p[11] = 0
                        if r.family == 4:
                            memcpy(p + 12, r.src, 4)
                            memcpy(p + 16, r.dst, 4)
                            memcpy(p + 20, r.xsrc, 4)
                        else:
                            memcpy(p + 12, r.src, 16)
                            memcpy(p + 28, r.dst, 16)
                            memcpy(p + 44, r.xsrc, 16)
                        kept += 1
                flow_ring_release(fl.seq, fl.mask, pos)
                pos += 1
                taken += 1
            fl.deq = pos
            _repl_close(&o4, 4, epoch, &s, t0s4)
            _repl_close(&o6, 6, epoch, &s, t0s6)
    n4 = 0 if o4.grams == 0 else (o4.grams - 1) * o4.size + REPL_HDR + o4.n * REPL_REC4
    n6 = 0 if o6.grams == 0 else (o6.grams - 1) * o6.size + REPL_HDR + o6.n * REPL_REC6
    return n4, n6, o4.grams + o6.grams, taken, kept
