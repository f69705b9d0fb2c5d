# nat: the SNAT / connection-tracking table.
#
# Rules (the pure-Python model egresscore/_natref.py states the same rules):
#
# * A connection is keyed by its original tuple (family, proto, pod address and
#   port, remote address and port) and found from the reply tuple (remote ->
#   egress IP:xport) in O(1): both directions have an open-addressing index.
# * Endpoint-independent mapping (RFC 4787 REQ-1, RFC 5382 REQ-1): all
#   connections from one pod (address, port) through one egress IP and protocol
#   share one external port while any of them lives.  Filtering is
#   address-and-port dependent (only the remote a connection was opened to can
#   answer it), like Cilium; RFC 4787 REQ-8 allows it.
# * Port choice: the pod's port when it lies in the (egress IP, proto) range
#   and is free (port preservation, as Cilium); otherwise the first free port at
#   or after a pseudo-random start, circularly within the range.  A two-level
#   bitmap finds it in bounded work, and exhaustion is exact: a flow is refused
#   (DROP_NAT_EXHAUSTED, counted) only when no port is free.  A full table
#   refuses with DROP_NAT_TABLE_FULL.  Live flows are never evicted.
# * Timeouts by state, refreshed by every packet in either direction: TCP
#   SYN_SENT (no reply yet) 60 s, ESTABLISHED (a reply seen) 6 h, CLOSING (FIN
#   both ways, or RST) 10 s; an outgoing SYN reopens a CLOSING entry.  UDP
#   300 s (RFC 4787 REQ-5 asks >= 2 min and recommends 5 min; Cilium's 60 s
#   breaks that).  ICMP echo 60 s.  An entry is dead at `expires`; dead entries
#   are collected lazily when a lookup meets them, by nat_gc (bounded work per
#   call, below) and by nat_gc_sweep (every entry).  A dead entry occupies its
#   slot (and keeps its mapping and port) until collected.
# * Expiry: a timing wheel of NAT_WHEEL_SLOTS buckets of 134 ms, each an
#   intrusive doubly linked list through the entries.  An entry sits in the
#   bucket of its expiry or an earlier one: a packet that extends it does not
#   move it (lazy); when its bucket comes due and it is still alive, nat_gc
#   moves it to the bucket of its real expiry.  A change to a SHORTER timeout
#   (FIN both ways, RST) moves it at once.  nat_gc looks at the buckets that
#   have fully passed, examines at most max_scan entries per call (leftovers
#   wait for the next call) and costs O(what expires + what is re-bucketed),
#   whatever the table's size.  Called every 20 ms, it frees a closed flow's
#   port within its timeout plus ~0.16 s.
# * Per-source limit (off unless per_source_limit is set): a source (pod)
#   address holds at most that many connections; a new one beyond it is
#   refused (DROP_POD_CONN_LIMIT), counted for that source, so one pod cannot
#   fill the shared table.  A fixed table of sources counts connections (up
#   on create, down on collect); no allocation per packet.
# * Memory: the arrays are anonymous mappings the kernel backs on first touch
#   (entries and mappings are handed out in index order, the indexes are
#   touched where hashes land), so a large, lightly used table is cheap to
#   create and to hold.
#
# Thread model: a table is single-writer.  The C functions take no lock; the
# fused datapath gives each worker its own table.  Flows are steered so that a
# connection's both directions reach the same worker: give each worker a
# disjoint slice of every egress IP's port range, steer outgoing packets by a
# hash of (pod address, pod port) (endpoint-independent mapping needs all
# flows of one pod endpoint on one worker) and replies by destination port
# slice (PACKET_FANOUT_CBPF programs).  A plain PACKET_FANOUT_HASH cannot do it:
# the reply tuple differs from the original after SNAT.  The Python methods
# take a per-table lock, so one NatTable may also be shared by threads; batch
# calls hold it for the whole batch and release the GIL.

import ipaddress as _ipaddress
import threading as _threading
import time as _time
from collections import namedtuple as _namedtuple
import os as _os

import numpy as _np
cimport numpy as cnp

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport calloc, free

cnp.import_array()

# ---------------------------------------------------------------------------
# keys and hashes

cdef inline uint64_t _nat_w0(uint8_t family, uint8_t proto, uint16_t a, uint16_t b,
                             uint16_t c) noexcept nogil:
    return (<uint64_t>family | (<uint64_t>proto << 8) | (<uint64_t>a << 16)
            | (<uint64_t>b << 32) | (<uint64_t>c << 48))

cdef inline bint _nat_is_icmp(uint8_t proto) noexcept nogil:
    return proto == NAT_PROTO_ICMP or proto == NAT_PROTO_ICMPV6

cdef inline int _nat_pool_of(uint8_t proto) noexcept nogil:
    if proto == NAT_PROTO_TCP:
        return 0
    if proto == NAT_PROTO_UDP:
        return 1
    return 2

cdef inline int _nat_check(const nat_tuple* k) noexcept nogil:
    """0 if family and protocol are ones the table handles, else DROP_UNSUPPORTED."""
    if k.family == 4:
        if k.proto == NAT_PROTO_TCP or k.proto == NAT_PROTO_UDP or k.proto == NAT_PROTO_ICMP:
            return 0
    elif k.family == 6:
        if k.proto == NAT_PROTO_TCP or k.proto == NAT_PROTO_UDP or k.proto == NAT_PROTO_ICMPV6:
            return 0
    return DROP_UNSUPPORTED

cdef inline uint64_t _nat_hash_fwd(uint64_t seed, uint8_t family, uint8_t proto,
                                   uint16_t sport, uint16_t dport,
                                   const uint8_t* src, const uint8_t* dst) noexcept nogil:
    return nat_hash5(seed, _nat_w0(family, proto, sport, dport, 0),
                     nat_load64(src), nat_load64(src + 8),
                     nat_load64(dst), nat_load64(dst + 8))

cdef inline uint64_t _nat_hash_rev(uint64_t seed, uint8_t family, uint8_t proto,
                                   uint16_t rport, uint16_t xport,
                                   const uint8_t* remote, const uint8_t* extaddr) noexcept nogil:
    return nat_hash5(seed ^ 0x5bd1e9955bd1e995ULL, _nat_w0(family, proto, rport, xport, 1),
                     nat_load64(remote), nat_load64(remote + 8),
                     nat_load64(extaddr), nat_load64(extaddr + 8))

cdef inline uint64_t _nat_hash_map(uint64_t seed, uint8_t family, uint8_t proto,
                                   uint16_t port, uint16_t ext, const uint8_t* addr) noexcept nogil:
    return nat_hash3(seed ^ 0x9e3779b97f4a7c15ULL, _nat_w0(family, proto, port, ext, 2),
                     nat_load64(addr), nat_load64(addr + 8))

cdef inline uint64_t _nat_entry_hash(nat_table* t, int kind, uint32_t idx) noexcept nogil:
    cdef nat_entry* e
    cdef nat_mapping* m
    if kind == 0:
        e = &t.entries[idx]
        return _nat_hash_fwd(t.seed, e.family, e.proto, e.sport, e.dport, e.src, e.dst)
    if kind == 1:
        e = &t.entries[idx]
        return _nat_hash_rev(t.seed, e.family, e.proto, e.dport, e.xport, e.dst,
                             t.ext[e.ext].addr)
    m = &t.mappings[idx]
    return _nat_hash_map(t.seed, m.family, m.proto, m.port, m.ext, m.addr)

# ---------------------------------------------------------------------------
# open-addressing index: uint32 slots = 8-bit hash tag | (entry index + 1),
# linear probing, 1.5 slots per entry of capacity (load < 2/3 when full:
# about 5 slots, one cache line, probed for a miss), backward-shift deletion
# (no tombstones).

cdef inline uint64_t _nat_home(const nat_index* ix, uint64_t h) noexcept nogil:
    return ((h >> 32) * ix.size) >> 32

cdef inline uint32_t _nat_tag(uint64_t h) noexcept nogil:
    return <uint32_t>(h & 0xff) << 24

cdef inline void _nat_index_insert(nat_index* ix, uint64_t h, uint32_t idx) noexcept nogil:
    cdef uint64_t pos = _nat_home(ix, h)
    while ix.slots[pos] != 0:
        pos += 1
        if pos == ix.size:
            pos = 0
    ix.slots[pos] = _nat_tag(h) | (idx + 1)

cdef void _nat_index_delete(nat_table* t, int kind, nat_index* ix, uint64_t h,
                            uint32_t idx) noexcept nogil:
    cdef uint32_t want = _nat_tag(h) | (idx + 1)
    cdef uint64_t i = _nat_home(ix, h)
    cdef uint64_t j, k
    cdef uint32_t s
    while ix.slots[i] != want:
        if ix.slots[i] == 0:
            return      # not indexed: nothing to do (never happens)
        i += 1
        if i == ix.size:
            i = 0
    j = i
    while True:
        j += 1
        if j == ix.size:
            j = 0
        s = ix.slots[j]
        if s == 0:
            break
        k = _nat_home(ix, _nat_entry_hash(t, kind, (s & 0xffffff) - 1))
        # leave s where it is if its home lies cyclically in (i, j]
        if i <= j:
            if i < k and k <= j:
                continue
        elif i < k or k <= j:
            continue
        ix.slots[i] = s
        i = j
    ix.slots[i] = 0

cdef inline uint32_t _nat_find_fwd(nat_table* t, uint64_t h, uint8_t family, uint8_t proto,
                                   uint16_t sport, uint16_t dport, const uint8_t* src,
                                   const uint8_t* dst) noexcept nogil:
    cdef uint64_t pos = _nat_home(&t.fwd, h)
    cdef uint32_t tag = _nat_tag(h)
    cdef uint32_t s
    cdef nat_entry* e
    while True:
        s = t.fwd.slots[pos]
        if s == 0:
            return NAT_NONE
        if (s & NAT_TAG_MASK) == tag:
            e = &t.entries[(s & 0xffffff) - 1]
            if (e.sport == sport and e.dport == dport and e.proto == proto
                    and e.family == family and nat_eq16(e.src, src) and nat_eq16(e.dst, dst)):
                return (s & 0xffffff) - 1
        pos += 1
        if pos == t.fwd.size:
            pos = 0

cdef inline uint32_t _nat_find_rev(nat_table* t, uint64_t h, uint8_t family, uint8_t proto,
                                   uint16_t rport, uint16_t xport, const uint8_t* remote,
                                   const uint8_t* extaddr) noexcept nogil:
    cdef uint64_t pos = _nat_home(&t.rev, h)
    cdef uint32_t tag = _nat_tag(h)
    cdef uint32_t s
    cdef nat_entry* e
    while True:
        s = t.rev.slots[pos]
        if s == 0:
            return NAT_NONE
        if (s & NAT_TAG_MASK) == tag:
            e = &t.entries[(s & 0xffffff) - 1]
            if (e.xport == xport and e.dport == rport and e.proto == proto
                    and e.family == family and nat_eq16(e.dst, remote)
                    and nat_eq16(t.ext[e.ext].addr, extaddr)):
                return (s & 0xffffff) - 1
        pos += 1
        if pos == t.rev.size:
            pos = 0

cdef inline uint32_t _nat_find_map(nat_table* t, uint64_t h, uint8_t family, uint8_t proto,
                                   uint16_t port, uint16_t ext, const uint8_t* addr) noexcept nogil:
    cdef uint64_t pos = _nat_home(&t.map, h)
    cdef uint32_t tag = _nat_tag(h)
    cdef uint32_t s
    cdef nat_mapping* m
    while True:
        s = t.map.slots[pos]
        if s == 0:
            return NAT_NONE
        if (s & NAT_TAG_MASK) == tag:
            m = &t.mappings[(s & 0xffffff) - 1]
            if (m.port == port and m.ext == ext and m.proto == proto
                    and m.family == family and nat_eq16(m.addr, addr)):
                return (s & 0xffffff) - 1
        pos += 1
        if pos == t.map.size:
            pos = 0

# ---------------------------------------------------------------------------
# port pools

cdef inline bint _nat_port_free(const nat_pool* p, uint32_t port) noexcept nogil:
    return ((p.bits[port >> 6] >> (port & 63)) & 1) == 0

cdef inline void _nat_port_take(nat_pool* p, uint32_t port) noexcept nogil:
    cdef uint32_t w = port >> 6
    p.bits[w] |= (<uint64_t>1) << (port & 63)
    if p.bits[w] == <uint64_t>0xffffffffffffffffULL:
        p.full[w >> 6] |= (<uint64_t>1) << (w & 63)
    p.nfree -= 1
    p.used += 1

cdef inline void _nat_port_put(nat_pool* p, uint32_t port) noexcept nogil:
    cdef uint32_t w = port >> 6
    p.bits[w] &= ~((<uint64_t>1) << (port & 63))
    p.full[w >> 6] &= ~((<uint64_t>1) << (w & 63))
    p.nfree += 1
    p.used -= 1

cdef uint32_t _nat_port_find(const nat_pool* p, uint32_t start) noexcept nogil:
    """First free port at or after `start`, circularly; NAT_NONE if none.

    Out-of-range ports are pre-set in the map, so the circular order over all
    65536 ports visits the range in circular order from `start`."""
    cdef uint32_t w = start >> 6
    cdef uint64_t bits = ~p.bits[w] & ((<uint64_t>0xffffffffffffffffULL) << (start & 63))
    cdef uint32_t cw, sw, wi
    cdef uint64_t fb
    cdef int n
    if bits:
        return (w << 6) | nat_ctz64(bits)
    cw = (w + 1) & 1023
    for n in range(17):
        sw = cw >> 6
        fb = ~p.full[sw] & ((<uint64_t>0xffffffffffffffffULL) << (cw & 63))
        if fb:
            wi = (sw << 6) | nat_ctz64(fb)
            return (wi << 6) | nat_ctz64(~p.bits[wi])
        cw = ((sw + 1) & 15) << 6
    return NAT_NONE

cdef void _nat_pool_init(nat_pool* p, uint32_t lo, uint32_t hi) noexcept nogil:
    cdef uint32_t port, w
    memset(p, 0, sizeof(nat_pool))
    p.lo = lo
    p.hi = hi
    for port in range(65536):
        if port < lo or port > hi:
            p.bits[port >> 6] |= (<uint64_t>1) << (port & 63)
    for w in range(1024):
        if p.bits[w] == <uint64_t>0xffffffffffffffffULL:
            p.full[w >> 6] |= (<uint64_t>1) << (w & 63)
    p.nfree = hi - lo + 1
    p.used = 0

cdef inline uint64_t _nat_rand(nat_table* t) noexcept nogil:
    # xorshift64*: cheap, and reproduced bit for bit by the Python model
    cdef uint64_t x = t.rng
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    t.rng = x
    return x * <uint64_t>0x2545F4914F6CDD1DULL

# ---------------------------------------------------------------------------
# expiry wheel: intrusive doubly linked bucket lists (see the header)

cdef inline uint32_t* _nat_link(nat_table* t, uint32_t i) noexcept nogil:
    """The (next, prev) pair of entry i, or of bucket i - capacity's head."""
    if i < t.capacity:
        return t.entries[i].wl
    return &t.wheel[2 * (i - t.capacity)]

cdef inline void _nat_wheel_unlink(nat_table* t, uint32_t i) noexcept nogil:
    cdef uint32_t* l = t.entries[i].wl
    _nat_link(t, l[1])[0] = l[0]
    _nat_link(t, l[0])[1] = l[1]

cdef inline void _nat_wheel_add(nat_table* t, uint32_t i) noexcept nogil:
    """Link entry i into the bucket of its expiry, clamped to the wheel's
    window [wheel_cur, wheel_cur + NAT_WHEEL_SLOTS - 1] (never later than its
    expiry, so gc meets it no later than due)."""
    cdef uint64_t b = t.entries[i].expires >> NAT_WHEEL_SHIFT
    cdef uint32_t s, head
    if b < t.wheel_cur:
        b = t.wheel_cur
    elif b > t.wheel_cur + (NAT_WHEEL_SLOTS - 1):
        b = t.wheel_cur + (NAT_WHEEL_SLOTS - 1)
    s = <uint32_t>(b & (NAT_WHEEL_SLOTS - 1))
    head = t.wheel[2 * s]
    t.entries[i].wl[0] = head
    t.entries[i].wl[1] = t.capacity + s
    _nat_link(t, head)[1] = i
    t.wheel[2 * s] = i

# ---------------------------------------------------------------------------
# per-source connection counts (per_source_limit)

cdef inline uint64_t _nat_src_home(nat_table* t, uint8_t family, const uint8_t* addr) noexcept nogil:
    cdef uint64_t h = nat_hash3(t.seed ^ 0xc2b2ae3d27d4eb4fULL, family,
                                nat_load64(addr), nat_load64(addr + 8))
    return ((h >> 32) * t.src_size) >> 32

cdef inline nat_src* _nat_src_find(nat_table* t, uint8_t family, const uint8_t* addr) noexcept nogil:
    """The slot of source (family, addr): its record, or the empty slot where
    it goes (meta == 0)."""
    cdef uint64_t pos = _nat_src_home(t, family, addr)
    cdef uint32_t fam = NAT_SRC_V6 if family == 6 else 0
    cdef nat_src* r
    while True:
        r = &t.src[pos]
        if r.meta == 0 or ((r.meta & NAT_SRC_V6) == fam and nat_eq16(r.addr, addr)):
            return r
        pos += 1
        if pos == t.src_size:
            pos = 0

cdef void _nat_src_release(nat_table* t, uint8_t family, const uint8_t* addr) noexcept nogil:
    """One connection of the source fewer; its slot is emptied at zero
    (backward-shift deletion, as the indexes)."""
    cdef nat_src* r = _nat_src_find(t, family, addr)
    cdef uint64_t i, j, k
    if r.meta == 0:
        return          # not counted (never happens)
    r.meta -= 1
    if (r.meta & NAT_SRC_COUNT) != 0:
        return
    t.src_used -= 1
    i = <uint64_t>(r - t.src)
    j = i
    while True:
        j += 1
        if j == t.src_size:
            j = 0
        if t.src[j].meta == 0:
            break
        k = _nat_src_home(t, 6 if t.src[j].meta & NAT_SRC_V6 else 4, t.src[j].addr)
        if i <= j:
            if i < k and k <= j:
                continue
        elif i < k or k <= j:
            continue
        t.src[i] = t.src[j]
        i = j
    t.src[i].meta = 0

cdef void _nat_src_refused(nat_table* t, uint8_t family, const uint8_t* addr) noexcept nogil:
    """Count a refusal for the source (first NAT_SRC_REFUSED_SLOTS sources by
    name, the rest together)."""
    cdef uint32_t pos = <uint32_t>(nat_hash3(t.seed, family, nat_load64(addr),
                                             nat_load64(addr + 8)) & (NAT_SRC_REFUSED_SLOTS - 1))
    cdef nat_src_refusal* r
    cdef int n
    for n in range(NAT_SRC_REFUSED_SLOTS):
        r = &t.refused_src[pos]
        if r.family == family and nat_eq16(r.addr, addr):
            r.count += 1
            return
        if r.family == 0:
            r.family = family
            memcpy(r.addr, addr, 16)
            r.count = 1
            t.refused_src_used += 1
            return
        pos = (pos + 1) & (NAT_SRC_REFUSED_SLOTS - 1)
    t.refused_src_other += 1

# ---------------------------------------------------------------------------
# flow records and per-connection counters

cdef inline uint32_t _nat_ms(uint64_t now) noexcept nogil:
    return <uint32_t>(now // 1000000)

cdef void _nat_flow(nat_table* t, const nat_entry* e, uint8_t kind, uint8_t reason,
                    uint64_t now) noexcept nogil:
    """Append a record of connection e (caller checked t.flog)."""
    cdef flow_record r
    memset(&r, 0, sizeof(flow_record))
    r.time = now
    if kind != FLOW_START:
        r.duration = <uint64_t>(<uint32_t>(_nat_ms(now) - e.created_ms)) * 1000000
        r.pkts_out = e.npkts[0]
        r.pkts_in = e.npkts[1]
        r.bytes_out = e.nbytes[0]
        r.bytes_in = e.nbytes[1]
    r.kind = kind
    r.reason = reason
    r.family = e.family
    r.proto = e.proto
    r.sport = e.sport
    r.dport = e.dport
    memcpy(r.src, e.src, 16)
    memcpy(r.dst, e.dst, 16)
    memcpy(r.xsrc, t.ext[e.ext].addr, 16)
    r.xport = e.xport
    r.policy = FLOW_NO_POLICY
    flow_append(t.flog, &r)

cdef inline uint8_t _nat_end_reason(const nat_entry* e) noexcept nogil:
    if e.flags & NAT_F_RST:
        return FLOW_END_RST
    if (e.flags & (NAT_F_FIN_OUT | NAT_F_FIN_IN)) == (NAT_F_FIN_OUT | NAT_F_FIN_IN):
        return FLOW_END_FIN
    return FLOW_END_EXPIRY

cdef inline void _nat_count(nat_table* t, nat_entry* e, int d, uint32_t length,
                            uint64_t now) noexcept nogil:
    """Count one packet of `length` IP bytes in direction d."""
    if length == NAT_NO_LEN:
        return
    if e.npkts[d] == 0xffff or e.nbytes[d] > 0xffffffffU - length:
        if t.flog == NULL:              # saturate
            if e.npkts[d] != 0xffff:
                e.npkts[d] += 1
            e.nbytes[d] = 0xffffffffU if e.nbytes[d] > 0xffffffffU - length \
                else e.nbytes[d] + length
            return
        _nat_flow(t, e, FLOW_UPDATE, 0, now)
        e.npkts[0] = e.npkts[1] = 0
        e.nbytes[0] = e.nbytes[1] = 0
    e.npkts[d] += 1
    e.nbytes[d] += length

cdef inline void _nat_touch(nat_table* t, nat_entry* e, int direction, uint8_t flags,
                            uint64_t now) noexcept nogil:
    """Apply one packet's TCP flags to the state and refresh the expiry."""
    if e.proto == NAT_PROTO_TCP:
        if flags & NAT_TCP_RST:
            e.state = NAT_STATE_CLOSING
            e.flags |= NAT_F_RST
        elif e.state == NAT_STATE_CLOSING:
            if direction == NAT_DIR_OUT and (flags & (NAT_TCP_SYN | NAT_TCP_ACK)) == NAT_TCP_SYN:
                # port reuse after close: the old connection ended, a new one starts
                if t.flog != NULL:
                    _nat_flow(t, e, FLOW_END, _nat_end_reason(e), now)
                e.npkts[0] = e.npkts[1] = 0
                e.nbytes[0] = e.nbytes[1] = 0
                e.created_ms = _nat_ms(now)
                e.state = NAT_STATE_SYN_SENT
                e.flags = 0
                if t.flog != NULL:
                    _nat_flow(t, e, FLOW_START, 0, now)
        else:
            if flags & NAT_TCP_FIN:
                e.flags |= NAT_F_FIN_OUT if direction == NAT_DIR_OUT else NAT_F_FIN_IN
            if (e.flags & (NAT_F_FIN_OUT | NAT_F_FIN_IN)) == (NAT_F_FIN_OUT | NAT_F_FIN_IN):
                e.state = NAT_STATE_CLOSING
            elif e.state == NAT_STATE_SYN_SENT and direction == NAT_DIR_IN:
                e.state = NAT_STATE_ESTABLISHED
    cdef uint64_t expires = now + t.timeout[e.state]
    cdef uint32_t idx
    if e.expires != expires:        # do not dirty the line for nothing
        if expires < e.expires:
            # a shorter timeout (FIN, RST): into an earlier bucket now, so the
            # port comes back on time (longer ones are re-bucketed lazily)
            idx = <uint32_t>(e - t.entries)
            e.expires = expires
            _nat_wheel_unlink(t, idx)
            _nat_wheel_add(t, idx)
        else:
            e.expires = expires

cdef int nat_update_tcp(nat_table* t, const nat_tuple* k, int direction,
                        uint64_t now) noexcept nogil:
    """State hook: apply k.tcp_flags of a packet seen in `direction` to its
    connection (k is the original tuple for NAT_DIR_OUT, the reply tuple for
    NAT_DIR_IN) and refresh it.  Returns 0, or DROP_NO_NAT_ENTRY / DROP_UNSUPPORTED.

    nat_translate_out/in already do this for the packets they translate; the
    datapath calls it for packets it forwards without translating (e.g. after a
    nat_peek_*)."""
    cdef uint32_t idx
    cdef uint16_t p
    if _nat_check(k):
        return DROP_UNSUPPORTED
    if direction == NAT_DIR_OUT:
        p = 0 if _nat_is_icmp(k.proto) else k.dport
        idx = _nat_find_fwd(t, _nat_hash_fwd(t.seed, k.family, k.proto, k.sport, p, k.src, k.dst),
                            k.family, k.proto, k.sport, p, k.src, k.dst)
    else:
        p = 0 if _nat_is_icmp(k.proto) else k.sport
        idx = _nat_find_rev(t, _nat_hash_rev(t.seed, k.family, k.proto, p, k.dport, k.src, k.dst),
                            k.family, k.proto, p, k.dport, k.src, k.dst)
    if idx == NAT_NONE or t.entries[idx].expires <= now:
        return DROP_NO_NAT_ENTRY
    _nat_touch(t, &t.entries[idx], direction, k.tcp_flags, now)
    return 0

cdef void _nat_collect(nat_table* t, uint32_t idx, uint64_t now,
                       uint8_t reason=0) noexcept nogil:
    """Remove entry idx from both indexes; drop its mapping's last reference.
    With a flow log, write its end record (reason 0: from its state)."""
    cdef nat_entry* e = &t.entries[idx]
    cdef nat_mapping* m = &t.mappings[e.mapping]
    if t.flog != NULL:
        _nat_flow(t, e, FLOW_END, reason if reason else _nat_end_reason(e), now)
    _nat_wheel_unlink(t, idx)
    if t.src_limit:
        _nat_src_release(t, e.family, e.src)
    _nat_index_delete(t, 0, &t.fwd, _nat_entry_hash(t, 0, idx), idx)
    _nat_index_delete(t, 1, &t.rev, _nat_entry_hash(t, 1, idx), idx)
    m.refcnt -= 1
    if m.refcnt == 0:
        _nat_index_delete(t, 2, &t.map, _nat_entry_hash(t, 2, e.mapping), e.mapping)
        _nat_port_put(t.ext[m.ext].pools[_nat_pool_of(m.proto)], m.xport)
        memcpy(m.addr, &t.map_free_head, 4)       # next-free link
        t.map_free_head = e.mapping
        t.map_used -= 1
    e.state = NAT_STATE_FREE
    e.mapping = t.free_head
    t.free_head = idx
    t.used -= 1

cdef inline void _nat_fill_out(nat_table* t, const nat_entry* e, const nat_tuple* o,
                               nat_tuple* out) noexcept nogil:
    out.family = e.family
    out.proto = e.proto
    out.tcp_flags = o.tcp_flags
    out._pad = 0
    out.sport = e.xport
    out.dport = e.dport
    memcpy(out.src, t.ext[e.ext].addr, 16)
    memcpy(out.dst, e.dst, 16)

cdef inline int _nat_refuse(nat_table* t, const nat_tuple* o, int reason,
                             uint64_t now) noexcept nogil:
    t.drops[drop_slot(reason)] += 1
    if t.flog != NULL:
        flow_drop(t.flog, now, <uint8_t>reason, o.family, o.proto, o.sport, o.dport,
                  o.src, o.dst, FLOW_NO_POLICY, o.tcp_flags)
    return reason

cdef int _nat_create(nat_table* t, const nat_tuple* o, uint16_t dport, uint64_t h,
                     uint64_t mh, uint32_t ext, uint64_t now, nat_tuple* out,
                     uint64_t* defer, uint32_t length) noexcept nogil:
    """Create the connection (and its mapping if new).  With `defer`, the
    reply-index insert is left to the caller: defer[0] = its hash (the slot is
    prefetched), defer[1] = entry index + 1; batches insert it a few tuples
    later, when the slot is in cache."""
    cdef nat_pool* pool
    cdef uint32_t m, idx, start, xport
    cdef nat_mapping* mp
    cdef nat_entry* e
    cdef nat_src* sr = NULL
    if t.src_limit:
        sr = _nat_src_find(t, o.family, o.src)
        if (sr.meta & NAT_SRC_COUNT) >= t.src_limit:
            _nat_src_refused(t, o.family, o.src)
            return _nat_refuse(t, o, DROP_POD_CONN_LIMIT, now)
    if t.free_head == NAT_NONE and t.entries_hwm == t.capacity:
        return _nat_refuse(t, o, DROP_NAT_TABLE_FULL, now)
    m = _nat_find_map(t, mh, o.family, o.proto, o.sport, <uint16_t>ext, o.src)
    if m == NAT_NONE:
        pool = t.ext[ext].pools[_nat_pool_of(o.proto)]
        if pool.nfree == 0:
            return _nat_refuse(t, o, DROP_NAT_EXHAUSTED, now)
        xport = o.sport
        if xport < pool.lo or xport > pool.hi or not _nat_port_free(pool, xport):
            start = pool.lo + <uint32_t>((_nat_rand(t) >> 32) % (pool.hi - pool.lo + 1))
            xport = _nat_port_find(pool, start)
        _nat_port_take(pool, xport)
        m = t.map_free_head
        if m != NAT_NONE:
            mp = &t.mappings[m]
            memcpy(&t.map_free_head, mp.addr, 4)  # next-free link
        else:
            m = t.mappings_hwm                    # never used: no more than entries
            t.mappings_hwm += 1
            mp = &t.mappings[m]
        memcpy(mp.addr, o.src, 16)
        mp.port = o.sport
        mp.xport = <uint16_t>xport
        mp.ext = <uint16_t>ext
        mp.family = o.family
        mp.proto = o.proto
        mp.refcnt = 0
        _nat_index_insert(&t.map, mh, m)
        t.map_used += 1
    else:
        mp = &t.mappings[m]
    mp.refcnt += 1
    idx = t.free_head
    if idx != NAT_NONE:
        e = &t.entries[idx]
        t.free_head = e.mapping
    else:
        idx = t.entries_hwm
        t.entries_hwm += 1
        e = &t.entries[idx]
    if sr != NULL:
        if sr.meta == 0:
            memcpy(sr.addr, o.src, 16)
            sr.meta = NAT_SRC_V6 if o.family == 6 else 0
            t.src_used += 1
        sr.meta += 1
    memcpy(e.src, o.src, 16)
    memcpy(e.dst, o.dst, 16)
    e.sport = o.sport
    e.dport = dport
    e.xport = mp.xport
    e.ext = <uint16_t>ext
    e.mapping = m
    e.family = o.family
    e.proto = o.proto
    e.flags = 0
    e.created_ms = _nat_ms(now)
    e.npkts[0] = e.npkts[1] = 0
    e.nbytes[0] = e.nbytes[1] = 0
    if o.proto == NAT_PROTO_TCP:
        e.state = NAT_STATE_SYN_SENT
    elif o.proto == NAT_PROTO_UDP:
        e.state = NAT_STATE_UDP
    else:
        e.state = NAT_STATE_ICMP
    _nat_index_insert(&t.fwd, h, idx)
    if defer == NULL:
        _nat_index_insert(&t.rev, _nat_entry_hash(t, 1, idx), idx)
    else:
        defer[0] = _nat_entry_hash(t, 1, idx)
        defer[1] = <uint64_t>idx + 1
        nat_prefetch_w(&t.rev.slots[_nat_home(&t.rev, defer[0])])
    t.used += 1
    t.created_count += 1
    e.expires = 0
    _nat_touch(t, e, NAT_DIR_OUT, o.tcp_flags, now)
    if t.wheel_cur == NAT_WHEEL_UNSET:
        t.wheel_cur = now >> NAT_WHEEL_SHIFT
    _nat_wheel_add(t, idx)
    if t.flog != NULL:
        _nat_flow(t, e, FLOW_START, 0, now)
    _nat_count(t, e, NAT_DIR_OUT, length, now)
    _nat_fill_out(t, e, o, out)
    return 0

cdef inline int _nat_out_h(nat_table* t, const nat_tuple* o, uint32_t ext, uint64_t now,
                           nat_tuple* out, uint64_t h, uint16_t dport,
                           uint64_t* defer=NULL, uint32_t length=NAT_NO_LEN) noexcept nogil:
    cdef uint32_t idx
    cdef nat_entry* e
    t.lookups += 1
    idx = _nat_find_fwd(t, h, o.family, o.proto, o.sport, dport, o.src, o.dst)
    if idx != NAT_NONE:
        e = &t.entries[idx]
        if e.expires > now:
            t.hits += 1
            _nat_touch(t, e, NAT_DIR_OUT, o.tcp_flags, now)
            _nat_count(t, e, NAT_DIR_OUT, length, now)
            _nat_fill_out(t, e, o, out)
            return 0
        _nat_collect(t, idx, now)
        t.expired += 1
    return _nat_create(t, o, dport, h,
                       _nat_hash_map(t.seed, o.family, o.proto, o.sport, <uint16_t>ext, o.src),
                       ext, now, out, defer, length)

cdef inline int _nat_out_check(nat_table* t, const nat_tuple* o, uint32_t ext) noexcept nogil:
    cdef int err = _nat_check(o)
    if err == 0 and (ext >= t.n_ext or t.ext[ext].family != o.family):
        err = DROP_NO_EGRESS_IP
    if err:
        t.drops[err] += 1
    return err

cdef int nat_translate_out(nat_table* t, const nat_tuple* orig, uint32_t ext,
                           uint64_t now, nat_tuple* out) noexcept nogil:
    return nat_translate_out_len(t, orig, ext, now, out, NAT_NO_LEN)

cdef int nat_translate_out_len(nat_table* t, const nat_tuple* orig, uint32_t ext,
                               uint64_t now, nat_tuple* out, uint32_t length) noexcept nogil:
    """SNAT an outgoing packet's tuple through egress IP index `ext`.

    Returns 0 and fills `out` (source = egress IP:xport) for a known or new
    connection; DROP_UNSUPPORTED (family/protocol), DROP_NO_EGRESS_IP (bad
    index or family), DROP_NAT_TABLE_FULL or DROP_NAT_EXHAUSTED otherwise, and
    then `out` is untouched.  An existing connection keeps its egress IP."""
    cdef int err = _nat_out_check(t, orig, ext)
    cdef uint16_t dport
    if err:
        return err
    dport = 0 if _nat_is_icmp(orig.proto) else orig.dport
    return _nat_out_h(t, orig, ext, now, out,
                      _nat_hash_fwd(t.seed, orig.family, orig.proto, orig.sport, dport,
                                    orig.src, orig.dst), dport, NULL, length)

cdef inline int _nat_in_h(nat_table* t, const nat_tuple* r, uint64_t now, nat_tuple* out,
                          uint64_t h, uint16_t rport, bint touch=True,
                          uint32_t length=NAT_NO_LEN) noexcept nogil:
    cdef uint32_t idx
    cdef nat_entry* e
    t.lookups += 1
    idx = _nat_find_rev(t, h, r.family, r.proto, rport, r.dport, r.src, r.dst)
    if idx != NAT_NONE:
        e = &t.entries[idx]
        if e.expires > now:
            t.hits += 1
            if touch:
                _nat_touch(t, e, NAT_DIR_IN, r.tcp_flags, now)
                _nat_count(t, e, NAT_DIR_IN, length, now)
            out.family = r.family
            out.proto = r.proto
            out.tcp_flags = r.tcp_flags
            out._pad = 0
            out.sport = rport
            out.dport = e.sport
            memcpy(out.src, r.src, 16)
            memcpy(out.dst, e.src, 16)
            return 0
        if touch:
            _nat_collect(t, idx, now)
            t.expired += 1
    t.drops[<int>DROP_NO_NAT_ENTRY] += 1
    return DROP_NO_NAT_ENTRY

cdef int nat_translate_in(nat_table* t, const nat_tuple* reply, uint64_t now,
                          nat_tuple* out) noexcept nogil:
    return nat_translate_in_len(t, reply, now, out, NAT_NO_LEN)

cdef int nat_translate_in_len(nat_table* t, const nat_tuple* reply, uint64_t now,
                              nat_tuple* out, uint32_t length) noexcept nogil:
    """Reverse-translate a reply (remote -> egress IP:xport) towards the pod.

    Returns 0 and fills `out` (destination = pod address:port), or
    DROP_UNSUPPORTED / DROP_NO_NAT_ENTRY (unknown or expired connection: an
    unsolicited inbound packet)."""
    cdef int err = _nat_check(reply)
    cdef uint16_t rport
    if err:
        t.drops[err] += 1
        return err
    rport = 0 if _nat_is_icmp(reply.proto) else reply.sport
    return _nat_in_h(t, reply, now, out,
                     _nat_hash_rev(t.seed, reply.family, reply.proto, rport, reply.dport,
                                   reply.src, reply.dst), rport, True, length)

cdef int nat_peek_in(nat_table* t, const nat_tuple* reply, uint64_t now,
                     nat_tuple* out) noexcept nogil:
    """nat_translate_in without side effects on the entry: no state change, no
    refresh, no collection.  For the packet quoted in an ICMP error sent to an
    egress IP (RFC 5508: errors do not keep a session alive)."""
    cdef int err = _nat_check(reply)
    cdef uint16_t rport
    if err:
        t.drops[err] += 1
        return err
    rport = 0 if _nat_is_icmp(reply.proto) else reply.sport
    return _nat_in_h(t, reply, now, out,
                     _nat_hash_rev(t.seed, reply.family, reply.proto, rport, reply.dport,
                                   reply.src, reply.dst), rport, False)

cdef int nat_peek_out(nat_table* t, const nat_tuple* orig, uint64_t now,
                      nat_tuple* out) noexcept nogil:
    """The translation of a known, live original tuple without creating,
    refreshing or changing anything; DROP_NO_NAT_ENTRY if there is none.  For
    the packet quoted in an ICMP error a pod sends about a reply."""
    cdef int err = _nat_check(orig)
    cdef uint16_t dport
    cdef uint32_t idx
    if err:
        t.drops[err] += 1
        return err
    dport = 0 if _nat_is_icmp(orig.proto) else orig.dport
    t.lookups += 1
    idx = _nat_find_fwd(t, _nat_hash_fwd(t.seed, orig.family, orig.proto, orig.sport, dport,
                                         orig.src, orig.dst),
                        orig.family, orig.proto, orig.sport, dport, orig.src, orig.dst)
    if idx == NAT_NONE or t.entries[idx].expires <= now:
        t.drops[<int>DROP_NO_NAT_ENTRY] += 1
        return DROP_NO_NAT_ENTRY
    t.hits += 1
    _nat_fill_out(t, &t.entries[idx], orig, out)
    return 0

cdef int nat_ext_find(nat_table* t, uint8_t family, const uint8_t* addr) noexcept nogil:
    """Index of egress IP `addr` (16 bytes) in the table, or -1."""
    cdef uint32_t i
    for i in range(t.n_ext):
        if t.ext[i].family == family and nat_eq16(t.ext[i].addr, addr):
            return <int>i
    return -1

cdef uint32_t nat_gc(nat_table* t, uint64_t now, uint32_t max_scan) noexcept nogil:
    """Work through the wheel's buckets that have fully passed: collect their
    dead entries, move the live ones to the bucket of their expiry.  At most
    `max_scan` entries are examined (plus at most NAT_WHEEL_SLOTS empty
    buckets, a load each); the rest waits for the next call.  Returns how many
    entries were collected."""
    cdef uint64_t target = now >> NAT_WHEEL_SHIFT
    cdef uint32_t work = 0, collected = 0, i, s
    t.gc_runs += 1
    if t.wheel_cur == NAT_WHEEL_UNSET or t.used == 0:
        if t.wheel_cur == NAT_WHEEL_UNSET or target > t.wheel_cur:
            t.wheel_cur = target        # nothing linked: nothing to catch up on
        return 0
    if target > t.wheel_cur + NAT_WHEEL_SLOTS:
        t.wheel_cur = target - NAT_WHEEL_SLOTS    # a revolution visits every bucket
    while t.wheel_cur < target and work < max_scan:
        s = <uint32_t>(t.wheel_cur & (NAT_WHEEL_SLOTS - 1))
        i = t.wheel[2 * s]
        if i == t.capacity + s:
            t.wheel_cur += 1            # bucket empty: the next one
            continue
        work += 1
        if t.entries[i].expires <= now:
            _nat_collect(t, i, now)
            t.expired += 1
            collected += 1
        else:
            # alive (refreshed since it was bucketed): to a later bucket, never
            # this one (its expiry lies after now, so after this bucket)
            _nat_wheel_unlink(t, i)
            _nat_wheel_add(t, i)
    t.gc_examined += work
    return collected

cdef uint32_t nat_gc_sweep(nat_table* t, uint64_t now) noexcept nogil:
    """Collect every dead entry (a scan of all entries ever used); returns how
    many.  For tests and tools: its work grows with the table."""
    cdef uint32_t i, collected = 0
    cdef nat_entry* e
    for i in range(t.entries_hwm):
        e = &t.entries[i]
        if e.state != NAT_STATE_FREE and e.expires <= now:
            _nat_collect(t, i, now)
            t.expired += 1
            collected += 1
    t.gc_runs += 1
    return collected

cdef uint32_t nat_flush(nat_table* t, uint64_t now) noexcept nogil:
    """Remove every connection, live or dead; open ones end with reason
    "eviction", dead or closed (FIN, RST) ones with theirs.  Returns how
    many were removed."""
    cdef uint32_t i, n = 0
    cdef nat_entry* e
    for i in range(t.entries_hwm):
        e = &t.entries[i]
        if e.state != NAT_STATE_FREE:
            _nat_collect(t, i, now, FLOW_END_EVICTION
                         if e.expires > now and e.state != NAT_STATE_CLOSING else 0)
            n += 1
    return n

# ---------------------------------------------------------------------------
# batches: a three-stage software pipeline (hash + prefetch slot, prefetch
# entry, translate) hides the two cache misses of each lookup.

cdef inline uint32_t _nat_peek(const nat_index* ix, uint64_t h) noexcept nogil:
    """Slot of the first tag match among the next few slots from home (0 if
    none): a hint for prefetching the entry, read from an already fetched line."""
    cdef uint64_t pos = _nat_home(ix, h)
    cdef uint32_t tag = _nat_tag(h)
    cdef uint32_t s
    cdef int k
    for k in range(4):
        s = ix.slots[pos]
        if s == 0 or (s & NAT_TAG_MASK) == tag:
            return s
        pos += 1
        if pos == ix.size:
            pos = 0
    return 0

cdef void nat_reverse_batch(nat_table* t, const nat_tuple* tin, nat_tuple* tout,
                             uint8_t* codes, Py_ssize_t n, uint64_t now) noexcept nogil:
    nat_reverse_batch_len(t, tin, tout, codes, n, now, NULL)

cdef void nat_reverse_batch_len(nat_table* t, const nat_tuple* tin, nat_tuple* tout,
                                uint8_t* codes, Py_ssize_t n, uint64_t now,
                                const uint32_t* lens) noexcept nogil:
    cdef uint64_t hring[32]
    cdef Py_ssize_t i, j
    cdef uint64_t h
    cdef uint32_t s
    cdef const nat_tuple* r
    cdef uint16_t rport
    for i in range(n + NAT_PF_SLOT):
        if i < n:
            r = &tin[i]
            rport = 0 if _nat_is_icmp(r.proto) else r.sport
            h = _nat_hash_rev(t.seed, r.family, r.proto, rport, r.dport, r.src, r.dst)
            hring[i & 31] = h
            nat_prefetch(&t.rev.slots[_nat_home(&t.rev, h)])
        j = i - NAT_PF_ENTRY
        if 0 <= j < n:
            s = _nat_peek(&t.rev, hring[j & 31])
            if s != 0:
                nat_prefetch_w(&t.entries[(s & 0xffffff) - 1])
                nat_prefetch_w(<char*>&t.entries[(s & 0xffffff) - 1] + sizeof(nat_entry) - 1)
        j = i - NAT_PF_SLOT
        if j >= 0:
            r = &tin[j]
            if _nat_check(r):
                t.drops[<int>DROP_UNSUPPORTED] += 1
                codes[j] = DROP_UNSUPPORTED
                continue
            rport = 0 if _nat_is_icmp(r.proto) else r.sport
            codes[j] = <uint8_t>_nat_in_h(t, r, now, &tout[j], hring[j & 31], rport, True,
                                          NAT_NO_LEN if lens == NULL else lens[j])

cdef void nat_translate_batch(nat_table* t, const nat_tuple* tin, const uint16_t* ext,
                               Py_ssize_t ext_stride, nat_tuple* tout, uint8_t* codes,
                               Py_ssize_t n, uint64_t now) noexcept nogil:
    nat_translate_batch_len(t, tin, ext, ext_stride, tout, codes, n, now, NULL)

cdef void nat_translate_batch_len(nat_table* t, const nat_tuple* tin, const uint16_t* ext,
                                  Py_ssize_t ext_stride, nat_tuple* tout, uint8_t* codes,
                                  Py_ssize_t n, uint64_t now,
                                  const uint32_t* lens) noexcept nogil:
    cdef uint64_t hring[32]
    cdef uint64_t pending[NAT_PF_ENTRY][2]     # deferred reply-index inserts
    cdef Py_ssize_t i, j, k
    cdef uint64_t h
    cdef uint32_t s, x
    cdef const nat_tuple* o
    cdef uint16_t dport
    cdef int err
    cdef uint64_t* slot
    for k in range(NAT_PF_ENTRY):
        pending[k][1] = 0
    for i in range(n + NAT_PF_SLOT):
        if i < n:
            o = &tin[i]
            dport = 0 if _nat_is_icmp(o.proto) else o.dport
            h = _nat_hash_fwd(t.seed, o.family, o.proto, o.sport, dport, o.src, o.dst)
            hring[i & 31] = h
            nat_prefetch(&t.fwd.slots[_nat_home(&t.fwd, h)])
        j = i - NAT_PF_ENTRY
        if 0 <= j < n:
            h = hring[j & 31]
            s = _nat_peek(&t.fwd, h)
            if s != 0:
                nat_prefetch_w(&t.entries[(s & 0xffffff) - 1])
                nat_prefetch_w(<char*>&t.entries[(s & 0xffffff) - 1] + sizeof(nat_entry) - 1)
            else:
                # no tag match near home: a new flow.  Fetch the mapping slot,
                # and the reply slot assuming the pod's port is preserved
                o = &tin[j]
                x = ext[j * ext_stride]
                if x < t.n_ext:
                    dport = 0 if _nat_is_icmp(o.proto) else o.dport
                    nat_prefetch_w(&t.map.slots[_nat_home(&t.map, _nat_hash_map(
                        t.seed, o.family, o.proto, o.sport, <uint16_t>x, o.src))])
                    nat_prefetch_w(&t.rev.slots[_nat_home(&t.rev, _nat_hash_rev(
                        t.seed, o.family, o.proto, dport, o.sport, o.dst, t.ext[x].addr))])
                    nat_prefetch(&t.ext[x].pools[_nat_pool_of(o.proto)].bits[o.sport >> 6])
        j = i - NAT_PF_SLOT
        if j >= 0:
            slot = pending[j % NAT_PF_ENTRY]
            if slot[1]:
                _nat_index_insert(&t.rev, slot[0], <uint32_t>(slot[1] - 1))
                slot[1] = 0
            o = &tin[j]
            x = ext[j * ext_stride]
            err = _nat_out_check(t, o, x)
            if err:
                codes[j] = <uint8_t>err
                continue
            dport = 0 if _nat_is_icmp(o.proto) else o.dport
            codes[j] = <uint8_t>_nat_out_h(t, o, x, now, &tout[j], hring[j & 31], dport, slot,
                                           NAT_NO_LEN if lens == NULL else lens[j])
    for k in range(NAT_PF_ENTRY):
        if pending[k][1]:
            _nat_index_insert(&t.rev, pending[k][0], <uint32_t>(pending[k][1] - 1))

# ---------------------------------------------------------------------------
# Python surface

NAT_TUPLE_DTYPE = _np.dtype({
    "names": ["family", "proto", "tcp_flags", "_pad", "sport", "dport", "src", "dst"],
    "formats": [_np.uint8, _np.uint8, _np.uint8, _np.uint8, "<u2", "<u2",
                (_np.uint8, 16), (_np.uint8, 16)],
    "offsets": [0, 1, 2, 3, 4, 6, 8, 24],
    "itemsize": 40,
})
assert sizeof(nat_tuple) == 40 and sizeof(nat_entry) == 80 and sizeof(nat_mapping) == 28

NatEntry = _namedtuple(
    "NatEntry",
    "proto src sport dst dport egress_ip xport state expires_in age "
    "pkts_out pkts_in bytes_out bytes_in", defaults=(0, 0, 0, 0))
NatEntry.__doc__ = ("One live connection: pod src:sport -> remote dst:dport, "
                    "SNATed to egress_ip:xport; times in seconds; packets and IP "
                    "bytes each way (since the last flow-log update record).")


class NatRefused(Exception):
    """A new flow was refused; `.reason` is its drop-reason name."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


_NAT_PROTO_BY_NAME = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
_NAT_PROTO_NAME = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_NAT_STATE_NAME = ("free", "SYN_SENT", "ESTABLISHED", "CLOSING", "UDP", "ICMP")
_NAT_TCP_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10,
                  "U": 0x20, "E": 0x40, "C": 0x80}
_NAT_REFUSAL_REASONS = (DROP_NAT_EXHAUSTED, DROP_NAT_TABLE_FULL, DROP_NO_NAT_ENTRY,
                        DROP_UNSUPPORTED, DROP_NO_EGRESS_IP, DROP_POD_CONN_LIMIT)





def _nat_port(value, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 65535:
        raise ValueError(f"{what} {value} is out of range 0-65535")
    return value


def _nat_proto(value, family):
    if isinstance(value, str):
        p = _NAT_PROTO_BY_NAME.get(value.lower())
        if p is None:
            raise ValueError(f"proto {value!r} is not one of tcp, udp, icmp, icmpv6")
        if p == 1 and family == 6:
            p = 58
    elif isinstance(value, int) and not isinstance(value, bool):
        p = value
    else:
        raise TypeError(f"proto must be a name or a number, not {type(value).__name__}")
    if p not in _NAT_PROTO_NAME:
        raise ValueError(f"proto {value!r} is not supported (tcp, udp, icmp echo only)")
    if (p == 1 and family == 6) or (p == 58 and family == 4):
        raise ValueError(f"proto {_NAT_PROTO_NAME[p]} does not match IPv{family} addresses")
    return p


def _nat_flags(value):
    if isinstance(value, str):
        bits = 0
        for ch in value.upper():
            if ch not in _NAT_TCP_FLAG_BITS:
                raise ValueError(f"tcp_flags {value!r}: unknown flag {ch!r} (use FSRPAUEC)")
            bits |= _NAT_TCP_FLAG_BITS[ch]
        return bits
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"tcp_flags must be an int or a string like 'SA', not {type(value).__name__}")
    if not 0 <= value <= 255:
        raise ValueError(f"tcp_flags {value} is out of range 0-255")
    return value


def _nat_length(value):
    if value is None:
        return 0xFFFFFFFF           # NAT_NO_LEN: do not count
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"length must be an int, not {type(value).__name__}")
    if not 0 <= value <= 65535:
        raise ValueError(f"length {value} is out of range 0-65535")
    return value


def _nat_lens(lens, n):
    if lens is None:
        return None
    if (not isinstance(lens, _np.ndarray) or lens.dtype != _np.uint32 or lens.shape != (n,)):
        raise ValueError("lens must be a uint32 array with one length per tuple")
    return _np.ascontiguousarray(lens)


def _nat_range(value, what):
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a (low, high) pair, not {value!r}") from None
    lo = _nat_port(lo, f"{what} low")
    hi = _nat_port(hi, f"{what} high")
    if lo > hi:
        raise ValueError(f"{what} ({lo}, {hi}) is empty: low > high")
    if lo == 0:
        raise ValueError(f"{what} must not include port 0")
    return lo, hi


def nat_tuples(rows):
    """A NAT_TUPLE_DTYPE array from rows (src, sport, dst, dport, proto[, tcp_flags]).

    For building batches in tests and tools; the datapath fills the array
    from packets directly."""
    rows = list(rows)
    arr = _np.zeros(len(rows), dtype=NAT_TUPLE_DTYPE)
    for i, row in enumerate(rows):
        if not 5 <= len(row) <= 6:
            raise ValueError(f"row {i}: expected (src, sport, dst, dport, proto[, tcp_flags])")
        src, sport, dst, dport, proto = row[:5]
        fs, ps = addr_packed16(src, f"row {i} src")
        fd, pd = addr_packed16(dst, f"row {i} dst")
        if fs != fd:
            raise ValueError(f"row {i}: src and dst are of different address families")
        arr[i] = (fs, _nat_proto(proto, fs), _nat_flags(row[5] if len(row) == 6 else 0), 0,
                  _nat_port(sport, f"row {i} sport"), _nat_port(dport, f"row {i} dport"),
                  _np.frombuffer(ps, _np.uint8), _np.frombuffer(pd, _np.uint8))
    return arr


def _nat_fmt(family, packed, port):
    ip = _ipaddress.ip_address(bytes(packed[:4] if family == 4 else packed[:16]))
    return f"{ip}:{port}" if family == 4 else f"[{ip}]:{port}"


cdef class NatTable:
    """SNAT / connection table of a gateway or a masquerading node.

    NatTable(egress_ips=(), capacity=65536, port_range=(32768, 65535),
             port_ranges=None, timeouts=None, clock=time.monotonic, seed=None,
             per_source_limit=None)

    `egress_ips` are the external addresses flows may be translated to (more
    with add_egress_ip); `port_range` applies to every (egress IP, protocol)
    unless `port_ranges` ({"tcp"|"udp"|"icmp": (lo, hi)}) or add_egress_ip say
    otherwise.  `timeouts` overrides DEFAULT_TIMEOUTS (seconds).  `clock()`
    returns monotonic seconds; every method also takes `now=` (seconds).
    `capacity` (at most 16,777,214: entries are indexed in 24 bits) costs
    about 127 bytes per connection (memory_bytes), backed by the kernel only
    as connections use it.  `per_source_limit` N: a source (pod) address
    holds at most N connections; more are refused ("pod_conn_limit", counted
    per source in stats); about 30 bytes more per connection of capacity.
    """

    DEFAULT_TIMEOUTS = {"tcp_syn": 60.0, "tcp_established": 21600.0,
                        "tcp_closing": 10.0, "udp": 300.0, "icmp": 60.0}

    def __cinit__(self, *args, **kwargs):
        self.t = NULL

    def __init__(self, egress_ips=(), *, capacity=65536, port_range=(32768, 65535),
                 port_ranges=None, timeouts=None, clock=_time.monotonic, seed=None,
                 per_source_limit=None):
        cdef nat_table* t
        cdef uint32_t i, cap
        cdef uint64_t nslots
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        if not 1 <= capacity <= NAT_MAX_CAPACITY:
            raise ValueError(f"capacity {capacity} is out of range 1-{NAT_MAX_CAPACITY} "
                             f"(connections are indexed in 24 bits)")
        if per_source_limit is not None:
            if isinstance(per_source_limit, bool) or not isinstance(per_source_limit, int):
                raise TypeError(f"per_source_limit must be an int or None, "
                                f"not {type(per_source_limit).__name__}")
            if not 1 <= per_source_limit <= capacity:
                raise ValueError(f"per_source_limit {per_source_limit} is out of range "
                                 f"1-{capacity} (the capacity)")
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        default = _nat_range(port_range, "port_range")
        ranges = {"tcp": default, "udp": default, "icmp": default}
        for name, rng in (port_ranges or {}).items():
            if name not in ranges:
                raise ValueError(f"port_ranges key {name!r} is not one of tcp, udp, icmp")
            ranges[name] = _nat_range(rng, f"port_ranges[{name!r}]")
        tmo = dict(self.DEFAULT_TIMEOUTS)
        for name, val in (timeouts or {}).items():
            if name not in tmo:
                raise ValueError(f"timeouts key {name!r} is not one of {sorted(tmo)}")
            if (isinstance(val, bool) or not isinstance(val, (int, float))
                    or not 0 < val <= 10 * 365 * 86400):
                raise ValueError(f"timeouts[{name!r}] must be a positive number of seconds "
                                 f"(at most 10 years)")
            tmo[name] = float(val)
        if seed is None:
            seed = int.from_bytes(_os.urandom(8), "little")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError("seed must be an int")
        if self.t != NULL:
            raise RuntimeError("NatTable.__init__ called twice")
        cap = capacity
        nslots = _nat_index_slots(cap)
        t = <nat_table*>calloc(1, sizeof(nat_table))
        if t == NULL:
            raise MemoryError("NatTable")
        self.t = t
        t.capacity = cap
        t.fwd.size = t.rev.size = t.map.size = nslots
        # lazily backed: nothing is touched here (entries and mappings are
        # handed out from index 0 up, then from their free lists)
        t.entries = <nat_entry*>egc_alloc_big(cap * sizeof(nat_entry), 1)
        t.mappings = <nat_mapping*>egc_alloc_big(cap * sizeof(nat_mapping), 1)
        t.fwd.slots = <uint32_t*>egc_alloc_big(nslots * 4, 1)
        t.rev.slots = <uint32_t*>egc_alloc_big(nslots * 4, 1)
        t.map.slots = <uint32_t*>egc_alloc_big(nslots * 4, 1)
        t.wheel = <uint32_t*>calloc(2 * NAT_WHEEL_SLOTS, sizeof(uint32_t))
        if per_source_limit is not None:
            t.src_size = _nat_index_slots(cap)
            t.src = <nat_src*>egc_alloc_big(t.src_size * sizeof(nat_src), 0)
        if (t.entries == NULL or t.mappings == NULL or t.fwd.slots == NULL
                or t.rev.slots == NULL or t.map.slots == NULL or t.wheel == NULL
                or (per_source_limit is not None and t.src == NULL)):
            raise MemoryError(f"NatTable of capacity {capacity}")
        t.src_limit = per_source_limit or 0
        for i in range(NAT_WHEEL_SLOTS):
            t.wheel[2 * i] = t.wheel[2 * i + 1] = cap + i     # empty: the head itself
        t.wheel_cur = NAT_WHEEL_UNSET
        t.free_head = NAT_NONE
        t.map_free_head = NAT_NONE
        s = seed & 0xffffffffffffffff
        t.seed = (s * 0xff51afd7ed558ccd + 0x632be59bd9b4e5b1) & 0xffffffffffffffff
        t.rng = _nat_rng_seed(s)
        t.timeout[NAT_STATE_SYN_SENT] = <uint64_t>round(tmo["tcp_syn"] * 1e9)
        t.timeout[NAT_STATE_ESTABLISHED] = <uint64_t>round(tmo["tcp_established"] * 1e9)
        t.timeout[NAT_STATE_CLOSING] = <uint64_t>round(tmo["tcp_closing"] * 1e9)
        t.timeout[NAT_STATE_UDP] = <uint64_t>round(tmo["udp"] * 1e9)
        t.timeout[NAT_STATE_ICMP] = <uint64_t>round(tmo["icmp"] * 1e9)
        self._timeouts = tmo
        self._ranges = ranges
        self._clock = clock
        self._lock = _threading.Lock()
        self._ext_names = []
        self._ext_index = {}
        for ip in egress_ips:
            self.add_egress_ip(ip)

    def __dealloc__(self):
        cdef uint32_t i
        cdef int k
        if self.t == NULL:
            return
        cdef nat_table* t = self.t
        for i in range(t.n_ext):
            for k in range(NAT_NPOOLS):
                free(t.ext[i].pools[k])
        egc_free_big(t.entries, t.capacity * sizeof(nat_entry))
        egc_free_big(t.mappings, t.capacity * sizeof(nat_mapping))
        egc_free_big(t.fwd.slots, t.fwd.size * 4)
        egc_free_big(t.rev.slots, t.rev.size * 4)
        egc_free_big(t.map.slots, t.map.size * 4)
        egc_free_big(t.src, t.src_size * sizeof(nat_src))
        free(t.wheel)
        free(t)
        self.t = NULL

    # -- configuration -------------------------------------------------------

    def add_egress_ip(self, ip, port_range=None, *, tcp=None, udp=None, icmp=None):
        """Add an egress IP and return its index (the `ext` of the C API).

        `port_range` overrides the table's range for all protocols; `tcp`,
        `udp`, `icmp` override it per protocol.  Adding a known IP returns its
        index unchanged."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        family, packed = addr_packed16(ip, "egress IP")
        name = str(_ipaddress.ip_address(packed[:4] if family == 4 else packed))
        if name in self._ext_index:
            return self._ext_index[name]
        ranges = dict(self._ranges)
        if port_range is not None:
            r = _nat_range(port_range, "port_range")
            ranges = {"tcp": r, "udp": r, "icmp": r}
        for key, val in (("tcp", tcp), ("udp", udp), ("icmp", icmp)):
            if val is not None:
                ranges[key] = _nat_range(val, key)
        cdef nat_table* t = self.t
        if t.n_ext >= NAT_MAX_EXT:
            raise ValueError(f"a table holds at most {NAT_MAX_EXT} egress IPs")
        cdef uint32_t i = t.n_ext
        cdef int k
        cdef nat_pool* pools[3]
        for k, key in enumerate(("tcp", "udp", "icmp")):
            pools[k] = <nat_pool*>calloc(1, sizeof(nat_pool))
            if pools[k] == NULL:
                while k > 0:
                    k -= 1
                    free(pools[k])
                raise MemoryError("egress IP port pools")
            _nat_pool_init(pools[k], ranges[key][0], ranges[key][1])
        with self._lock:
            t.ext[i].family = family
            memcpy(t.ext[i].addr, <const char*>packed, 16)
            for k in range(3):
                t.ext[i].pools[k] = pools[k]
            t.n_ext = i + 1
        self._ext_names.append(name)
        self._ext_index[name] = i
        return i

    @property
    def egress_ips(self):
        """Egress IPs in index order."""
        return list(self._ext_names)

    @property
    def capacity(self):
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        return self.t.capacity

    @property
    def timeouts(self):
        """Timeouts in seconds by state."""
        return dict(self._timeouts)

    @property
    def memory_bytes(self):
        """Bytes allocated: entries, mappings, the three indexes, the expiry
        wheel, the per-source table and the port pools.  The large arrays are
        backed by the kernel as they are touched: resident memory starts near
        zero and grows with use (the indexes are touched where hashes land)."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        cdef nat_table* t = self.t
        return (sizeof(nat_table) + t.capacity * (sizeof(nat_entry) + sizeof(nat_mapping))
                + 4 * (t.fwd.size + t.rev.size + t.map.size)
                + 8 * NAT_WHEEL_SLOTS + t.src_size * sizeof(nat_src)
                + t.n_ext * NAT_NPOOLS * sizeof(nat_pool))

    @property
    def per_source_limit(self):
        """Connections one source address may hold (None: no limit)."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        return self.t.src_limit or None

    def __len__(self):
        """Entries held, including dead ones not collected yet."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        return self.t.used

    # -- helpers -------------------------------------------------------------

    cdef uint64_t _now(self, now) except? 0:
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        if now is None:
            now = self._clock()
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not now >= 0:
            raise ValueError(f"now must be a non-negative number of seconds, not {now!r}")
        return <uint64_t>round(now * 1e9)

    cdef int _egress(self, egress_ip, int family) except -1:
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        if egress_ip is None:
            found = [i for i, n in enumerate(self._ext_names)
                     if self.t.ext[i].family == family]
            if len(found) != 1:
                raise ValueError(f"egress_ip is required: the table has {len(found)} "
                                 f"IPv{family} egress IPs")
            return found[0]
        if isinstance(egress_ip, int) and not isinstance(egress_ip, bool):
            if not 0 <= egress_ip < self.t.n_ext:
                raise ValueError(f"egress IP index {egress_ip} is not configured")
            idx = egress_ip
        else:
            fam, packed = addr_packed16(egress_ip, "egress_ip")
            name = str(_ipaddress.ip_address(packed[:4] if fam == 4 else packed))
            if name not in self._ext_index:
                raise ValueError(f"egress_ip {name} is not configured in this table")
            idx = self._ext_index[name]
        if self.t.ext[idx].family != family:
            raise ValueError(f"egress_ip {self._ext_names[idx]} is not IPv{family} "
                             f"like the flow")
        return idx

    cdef void _tuple(self, nat_tuple* k, src, sport, dst, dport, proto, tcp_flags) except *:
        fs, ps = addr_packed16(src, "src")
        fd, pd = addr_packed16(dst, "dst")
        if fs != fd:
            raise ValueError(f"src {src} and dst {dst} are of different address families")
        memset(k, 0, sizeof(nat_tuple))
        k.family = fs
        k.proto = _nat_proto(proto, fs)
        k.tcp_flags = _nat_flags(tcp_flags)
        k.sport = _nat_port(sport, "sport")
        k.dport = _nat_port(dport, "dport")
        memcpy(k.src, <const char*>ps, 16)
        memcpy(k.dst, <const char*>pd, 16)

    # -- per-flow calls --------------------------------------------------------

    def translate(self, src, sport, dst, dport, proto="tcp", *, egress_ip=None,
                  tcp_flags=0, now=None, length=None):
        """SNAT an outgoing flow; returns (egress_ip, xport).

        Known flows keep their mapping (and egress IP); new flows get one.
        `length` (IP bytes) counts the packet in the connection's counters.
        Raises NatRefused (reason "nat_exhausted" or "nat_table_full")."""
        cdef uint32_t ln = _nat_length(length)
        cdef nat_tuple k, out
        self._tuple(&k, src, sport, dst, dport, proto, tcp_flags)
        cdef int ext = self._egress(egress_ip, k.family)
        cdef uint64_t t_ns = self._now(now)
        cdef int rc
        with self._lock:
            rc = nat_translate_out_len(self.t, &k, ext, t_ns, &out, ln)
        if rc:
            raise NatRefused(DROP_REASON_NAMES[rc],
                             f"new flow refused: {DROP_REASON_NAMES[rc]}")
        return self._ext_names[self._ext_of(&out)], out.sport

    cdef int _ext_of(self, nat_tuple* out) noexcept:
        return nat_ext_find(self.t, out.family, out.src)

    def reverse(self, src, sport, dst, dport, proto="tcp", *, tcp_flags=0, now=None,
                refresh=True, length=None):
        """Translate a reply remote src:sport -> egress dst:dport back.

        Returns (pod_ip, pod_port), or None when no live connection matches
        (the reply is unsolicited; counted as no_nat_entry).  refresh=False
        leaves the entry untouched (a tuple quoted in an ICMP error).  `length`
        (IP bytes) counts the packet in the connection's counters."""
        cdef uint32_t ln = _nat_length(length)
        cdef nat_tuple k, out
        self._tuple(&k, src, sport, dst, dport, proto, tcp_flags)
        cdef uint64_t t_ns = self._now(now)
        cdef int rc
        with self._lock:
            if refresh:
                rc = nat_translate_in_len(self.t, &k, t_ns, &out, ln)
            else:
                rc = nat_peek_in(self.t, &k, t_ns, &out)
        if rc:
            return None
        return str(_ipaddress.ip_address((<char*>out.dst)[:4 if out.family == 4 else 16])), out.dport

    def update_tcp(self, src, sport, dst, dport, tcp_flags, *, direction="out", now=None):
        """Apply a TCP packet's flags to its connection without translating it.

        The tuple is the original one for direction "out", the reply
        (remote -> egress IP:xport) for "in".  Returns False if no live
        connection matches."""
        if direction not in ("out", "in"):
            raise ValueError(f"direction must be 'out' or 'in', not {direction!r}")
        cdef nat_tuple k
        self._tuple(&k, src, sport, dst, dport, "tcp", tcp_flags)
        cdef uint64_t t_ns = self._now(now)
        cdef int rc
        with self._lock:
            rc = nat_update_tcp(self.t, &k, NAT_DIR_OUT if direction == "out" else NAT_DIR_IN,
                                t_ns)
        return rc == 0

    def get(self, src, sport, dst, dport, proto="tcp", *, now=None):
        """The live entry of an original tuple, or None (no refresh, no counters)."""
        cdef nat_tuple k
        self._tuple(&k, src, sport, dst, dport, proto, 0)
        cdef uint64_t t_ns = self._now(now)
        cdef uint16_t dp = 0 if _nat_is_icmp(k.proto) else k.dport
        cdef uint32_t idx
        with self._lock:
            idx = _nat_find_fwd(self.t, _nat_hash_fwd(self.t.seed, k.family, k.proto, k.sport,
                                                      dp, k.src, k.dst),
                                k.family, k.proto, k.sport, dp, k.src, k.dst)
            if idx == NAT_NONE or self.t.entries[idx].expires <= t_ns:
                return None
            return self._entry(idx, t_ns)

    cdef object _entry(self, uint32_t idx, uint64_t now):
        cdef nat_entry* e = &self.t.entries[idx]
        fam = e.family
        n = 4 if fam == 4 else 16
        return NatEntry(
            _NAT_PROTO_NAME[e.proto],
            str(_ipaddress.ip_address((<char*>e.src)[:n])), e.sport,
            str(_ipaddress.ip_address((<char*>e.dst)[:n])), e.dport,
            self._ext_names[e.ext], e.xport, _NAT_STATE_NAME[e.state],
            (e.expires - now) / 1e9, <uint32_t>(_nat_ms(now) - e.created_ms) / 1e3,
            e.npkts[0], e.npkts[1], e.nbytes[0], e.nbytes[1])

    def entries(self, now=None):
        """Iterate over live connections (the data of a `nat list` view)."""
        cdef uint64_t t_ns = self._now(now)
        cdef uint32_t i
        for i in range(self.t.entries_hwm):
            if self.t.entries[i].state != NAT_STATE_FREE and self.t.entries[i].expires > t_ns:
                yield self._entry(i, t_ns)

    def __iter__(self):
        return self.entries()

    def nat_list(self, now=None):
        """Text like `cilium-dbg bpf nat list`: an OUT and an IN line per connection."""
        lines = []
        for e in self.entries(now):
            fam = 6 if ":" in e.src else 4
            pod = _nat_fmt(fam, addr_packed16(e.src, "")[1], e.sport)
            remote = _nat_fmt(fam, addr_packed16(e.dst, "")[1], e.dport)
            egress = _nat_fmt(fam, addr_packed16(e.egress_ip, "")[1], e.xport)
            tail = f"Created={int(e.age)}sec ago Expires={int(e.expires_in)}sec State={e.state}"
            p = e.proto.upper()
            lines.append(f"{p} OUT {pod} -> {remote} XLATE_SRC {egress} {tail}")
            lines.append(f"{p} IN {remote} -> {egress} XLATE_DST {pod} {tail}")
        return "\n".join(lines)

    def gc(self, max_scan=None, *, now=None):
        """Collect dead entries: a full sweep (max_scan None), or the expiry
        wheel's due work with at most `max_scan` entries examined (bounded
        work for a datapath tick; what is left waits for the next call).
        Returns the number collected."""
        cdef uint64_t t_ns = self._now(now)
        cdef uint32_t n, got
        cdef bint sweep = max_scan is None
        if not sweep:
            if isinstance(max_scan, bool) or not isinstance(max_scan, int) or max_scan < 0:
                raise ValueError(f"max_scan must be a non-negative int, not {max_scan!r}")
            n = min(max_scan, 0xffffffff)
        with self._lock:
            with nogil:
                got = nat_gc_sweep(self.t, t_ns) if sweep else nat_gc(self.t, t_ns, n)
        return got

    def port_usage(self):
        """{egress_ip: {"tcp"|"udp"|"icmp": (ports in use, ports in the range)}}:
        how close each egress IP is to exhaustion (for metrics)."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        cdef nat_pool* p
        out = {}
        with self._lock:
            for i, name in enumerate(self._ext_names):
                d = {}
                for k, proto in enumerate(("tcp", "udp", "icmp")):
                    p = self.t.ext[i].pools[k]
                    d[proto] = (p.used, p.hi - p.lo + 1)
                out[name] = d
        return out

    @property
    def flow_log(self):
        """The FlowLog receiving this table's start/end/refusal records, or None."""
        return self._flow_log

    @flow_log.setter
    def flow_log(self, log):
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        if log is not None and not isinstance(log, FlowLog):
            raise TypeError(f"flow_log must be a FlowLog or None, not {type(log).__name__}")
        with self._lock:
            self.t.flog = NULL if log is None else (<FlowLog>log)._get()
            self._flow_log = log

    def flush(self, *, now=None):
        """Remove every connection (end records with reason "eviction" for the
        live ones); returns how many were removed.  For a clean stop."""
        cdef uint64_t t_ns = self._now(now)
        cdef uint32_t n
        with self._lock:
            with nogil:
                n = nat_flush(self.t, t_ns)
        return n

    def ports_in_use(self, egress_ip, proto="tcp"):
        """External ports (or echo ids) of `egress_ip` held by live mappings."""
        fam, _ = addr_packed16(egress_ip, "egress_ip")
        idx = self._egress(egress_ip, fam)
        p = _nat_proto(proto, fam)
        return self.t.ext[idx].pools[_nat_pool_of(p)].used

    @property
    def stats(self):
        """Counters: lookups, hits, created, expired, refused by reason, sizes;
        with a per-source limit, the sources holding connections and the
        refusals by source address (the first 256 sources refused by name,
        the others summed in refused_other_sources)."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        cdef nat_table* t = self.t
        cdef uint32_t i
        by_source = {}
        with self._lock:
            for i in range(NAT_SRC_REFUSED_SLOTS):
                if t.refused_src[i].family:
                    by_source[_nat_ip_str(t.refused_src[i].family, t.refused_src[i].addr)] = \
                        t.refused_src[i].count
            return {
                "capacity": t.capacity,
                "entries": t.used,
                "mappings": t.map_used,
                "lookups": t.lookups,
                "hits": t.hits,
                "created": t.created_count,
                "expired": t.expired,
                "gc_runs": t.gc_runs,
                "refused": {DROP_REASON_NAMES[r]: t.drops[r] for r in _NAT_REFUSAL_REASONS},
                "per_source_limit": t.src_limit or None,
                "sources": t.src_used,
                "refused_by_source": by_source,
                "refused_other_sources": t.refused_src_other,
            }

    # -- batches -------------------------------------------------------------

    def _batch_args(self, tuples, out, codes):
        if not isinstance(tuples, _np.ndarray) or tuples.dtype != NAT_TUPLE_DTYPE:
            raise TypeError("tuples must be a NumPy array of egresscore.NAT_TUPLE_DTYPE")
        if tuples.ndim != 1 or not tuples.flags.c_contiguous:
            raise ValueError("tuples must be a one-dimensional C-contiguous array")
        n = tuples.shape[0]
        if out is None:
            out = _np.zeros(n, dtype=NAT_TUPLE_DTYPE)
        elif (not isinstance(out, _np.ndarray) or out.dtype != NAT_TUPLE_DTYPE
              or out.shape != (n,) or not out.flags.c_contiguous or not out.flags.writeable):
            raise ValueError("out must be a writable C-contiguous NAT_TUPLE_DTYPE array "
                             "the length of tuples")
        if codes is None:
            codes = _np.zeros(n, dtype=_np.uint8)
        elif (not isinstance(codes, _np.ndarray) or codes.dtype != _np.uint8
              or codes.shape != (n,) or not codes.flags.c_contiguous
              or not codes.flags.writeable):
            raise ValueError("codes must be a writable C-contiguous uint8 array "
                             "the length of tuples")
        if _np.shares_memory(out, tuples):
            raise ValueError("out must not overlap tuples")
        return n, out, codes

    def translate_batch(self, tuples, egress_ip, *, now=None, out=None, codes=None,
                        lens=None):
        """SNAT a batch of outgoing tuples; returns (out, codes).

        `egress_ip` is one egress IP (address or index) or a uint16 array of
        indexes, one per tuple.  codes[i] is 0 or a drop reason (index into
        DROP_REASON_NAMES); out[i] is valid where codes[i] == 0.  `lens`
        (uint32, IP bytes per tuple) counts the packets in the connections."""
        n, out, codes = self._batch_args(tuples, out, codes)
        lens_arr = _nat_lens(lens, n)
        cdef const uint32_t* lp = NULL if lens_arr is None else \
            <const uint32_t*>cnp.PyArray_DATA(lens_arr)
        cdef uint16_t one
        cdef cnp.ndarray ext_arr
        cdef const uint16_t* ext_p
        cdef Py_ssize_t stride
        if isinstance(egress_ip, _np.ndarray):
            if egress_ip.dtype != _np.uint16 or egress_ip.shape != (n,):
                raise ValueError("egress_ip array must be uint16 with one index per tuple")
            ext_arr = _np.ascontiguousarray(egress_ip)
            ext_p = <const uint16_t*>cnp.PyArray_DATA(ext_arr)
            stride = 1
        else:
            if isinstance(egress_ip, int) and not isinstance(egress_ip, bool):
                if not 0 <= egress_ip < self.t.n_ext:
                    raise ValueError(f"egress IP index {egress_ip} is not configured")
                one = egress_ip
            else:
                fam, _ = addr_packed16(egress_ip, "egress_ip")
                one = self._egress(egress_ip, fam)
            ext_p = &one
            stride = 0
        cdef uint64_t t_ns = self._now(now)
        cdef const nat_tuple* tin = <const nat_tuple*>cnp.PyArray_DATA(tuples)
        cdef nat_tuple* tout = <nat_tuple*>cnp.PyArray_DATA(out)
        cdef uint8_t* cp = <uint8_t*>cnp.PyArray_DATA(codes)
        cdef Py_ssize_t cn = n
        with self._lock:
            with nogil:
                nat_translate_batch_len(self.t, tin, ext_p, stride, tout, cp, cn, t_ns, lp)
        return out, codes

    def reverse_batch(self, tuples, *, now=None, out=None, codes=None, lens=None):
        """Reverse-translate a batch of replies; returns (out, codes).

        codes[i] is 0 (out[i] is addressed to the pod) or a drop reason such
        as no_nat_entry.  `lens` as in translate_batch."""
        n, out, codes = self._batch_args(tuples, out, codes)
        lens_arr = _nat_lens(lens, n)
        cdef const uint32_t* lp = NULL if lens_arr is None else \
            <const uint32_t*>cnp.PyArray_DATA(lens_arr)
        cdef uint64_t t_ns = self._now(now)
        cdef const nat_tuple* tin = <const nat_tuple*>cnp.PyArray_DATA(tuples)
        cdef nat_tuple* tout = <nat_tuple*>cnp.PyArray_DATA(out)
        cdef uint8_t* cp = <uint8_t*>cnp.PyArray_DATA(codes)
        cdef Py_ssize_t cn = n
        with self._lock:
            with nogil:
                nat_reverse_batch_len(self.t, tin, tout, cp, cn, t_ns, lp)
        return out, codes


def _nat_index_slots(capacity):
    """Slots of an index over `capacity` entries: 1.5 per entry (load < 2/3)."""
    return capacity + capacity // 2 + 1


cdef object _nat_ip_str(uint32_t family, const uint8_t* addr):
    return str(_ipaddress.ip_address((<const char*>addr)[:4 if family == 4 else 16]))


def _nat_rng_seed(seed):
    """Initial xorshift state of a table seeded with `seed` (never zero)."""
    x = (seed * 0x9E3779B97F4A7C15 + 0x7F4A7C15) & 0xFFFFFFFFFFFFFFFF
    return x or 1
