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

cimport numpy as cnp

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

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

cdef inline bint _nat_v4_clean(uint8_t family, const uint8_t* a) noexcept nogil:
    """An IPv4 address in 16 bytes has zeros past its first 4 (IPv6: any)."""
    return family == 6 or (nat_load64(a + 8) == 0 and (nat_load64(a) >> 32) == 0)

cdef inline uint32_t _nat_load32(const uint8_t* a) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, a, 4)
    return v

cdef inline int _nat_check(const nat_tuple* k) noexcept nogil:
    """0 if family and protocol are ones the table handles (and an IPv4
    tuple's addresses are zero past their 4 bytes), else DROP_UNSUPPORTED."""
    if k.family == 4:
        if k.proto == NAT_PROTO_TCP or k.proto == NAT_PROTO_UDP or k.proto == NAT_PROTO_ICMP:
            if _nat_v4_clean(4, k.src) and _nat_v4_clean(4, k.dst):
                return 0
    elif k.family == 6:
        if k.proto == NAT_PROTO_TCP or k.proto == NAT_PROTO_UDP or k.proto == NAT_PROTO_ICMPV6:
            return 0
    return DROP_UNSUPPORTED

cdef inline uint64_t _nat_hash_fwd_w(uint64_t seed, uint8_t family, uint8_t proto,
                                     uint16_t sport, uint16_t dport, uint64_t s0, uint64_t s1,
                                     uint64_t d0, uint64_t d1) noexcept nogil:
    return nat_hash5(seed, _nat_w0(family, proto, sport, dport, 0), s0, s1, d0, d1)

cdef inline uint64_t _nat_hash_fwd(uint64_t seed, uint8_t family, uint8_t proto,
                                   uint16_t sport, uint16_t dport,
                                   const uint8_t* src, const uint8_t* dst) noexcept nogil:
    return _nat_hash_fwd_w(seed, family, proto, sport, dport, nat_load64(src), nat_load64(src + 8),
                           nat_load64(dst), nat_load64(dst + 8))

cdef inline uint64_t _nat_hash_rev_ww(uint64_t seed, uint8_t family, uint8_t proto,
                                      uint16_t rport, uint16_t xport, uint64_t r0, uint64_t r1,
                                      uint64_t x0, uint64_t x1) noexcept nogil:
    return nat_hash5(seed ^ 0x5bd1e9955bd1e995ULL, _nat_w0(family, proto, rport, xport, 1),
                     r0, r1, x0, x1)

cdef inline uint64_t _nat_hash_rev_w(uint64_t seed, uint8_t family, uint8_t proto,
                                     uint16_t rport, uint16_t xport, uint64_t r0, uint64_t r1,
                                     const uint8_t* extaddr) noexcept nogil:
    return _nat_hash_rev_ww(seed, family, proto, rport, xport, r0, r1,
                            nat_load64(extaddr), nat_load64(extaddr + 8))

cdef inline uint64_t _nat_hash_rev(uint64_t seed, uint8_t family, uint8_t proto,
                                   uint16_t rport, uint16_t xport,
                                   const uint8_t* remote, const uint8_t* extaddr) noexcept nogil:
    return _nat_hash_rev_w(seed, family, proto, rport, xport, nat_load64(remote),
                           nat_load64(remote + 8), extaddr)

cdef inline uint64_t _nat_hash_map_w(uint64_t seed, uint8_t family, uint8_t proto, uint16_t port,
                                     uint16_t ext, uint64_t a0, uint64_t a1) noexcept nogil:
    return nat_hash3(seed ^ 0x9e3779b97f4a7c15ULL, _nat_w0(family, proto, port, ext, 2), a0, a1)

cdef inline uint64_t _nat_hash_map(uint64_t seed, uint8_t family, uint8_t proto,
                                   uint16_t port, uint16_t ext, const uint8_t* addr) noexcept nogil:
    return _nat_hash_map_w(seed, family, proto, port, ext, nat_load64(addr), nat_load64(addr + 8))

# ---------------------------------------------------------------------------
# an entry's addresses: in it (IPv4) or in its nat_addr6 record (IPv6)

cdef inline const uint8_t* _nat_e_addr(nat_table* t, const nat_entry* e, bint remote,
                                       uint8_t* buf) noexcept nogil:
    """The entry's pod (remote: its remote) address, 16 bytes: its IPv6
    record's, or buf filled with the IPv4 address (zeros after it)."""
    if e.family == 6:
        if remote:
            return t.a6[e.a0].dst
        return t.a6[e.a0].src
    memset(buf, 0, 16)
    memcpy(buf, &e.a1 if remote else &e.a0, 4)
    return buf

cdef inline const uint8_t* _nat_e_src(nat_table* t, const nat_entry* e, uint8_t* buf) noexcept nogil:
    return _nat_e_addr(t, e, False, buf)

cdef inline const uint8_t* _nat_e_dst(nat_table* t, const nat_entry* e, uint8_t* buf) noexcept nogil:
    return _nat_e_addr(t, e, True, buf)

cdef inline const uint8_t* _nat_m_addr(nat_table* t, const nat_mapping* m, uint8_t* buf) noexcept nogil:
    """The mapping's pod address, 16 bytes (as _nat_e_src)."""
    if m.family == 6:
        return &t.m6[<uint64_t>m.addr * 16]
    memset(buf, 0, 16)
    memcpy(buf, &m.addr, 4)
    return buf

cdef inline uint64_t _nat_e_hash_fwd(nat_table* t, const nat_entry* e) noexcept nogil:
    cdef const nat_addr6* a
    if e.family == 6:
        a = &t.a6[e.a0]
        return _nat_hash_fwd(t.seed, 6, e.proto, e.sport, e.dport, a.src, a.dst)
    return _nat_hash_fwd_w(t.seed, e.family, e.proto, e.sport, e.dport, e.a0, 0, e.a1, 0)

cdef inline uint64_t _nat_e_hash_rev(nat_table* t, const nat_entry* e) noexcept nogil:
    cdef const nat_addr6* a
    if e.family == 6:
        a = &t.a6[e.a0]
        return _nat_hash_rev(t.seed, 6, e.proto, e.dport, e.xport, a.dst, t.ext[e.ext].addr)
    return _nat_hash_rev_w(t.seed, e.family, e.proto, e.dport, e.xport, e.a1, 0, t.ext[e.ext].addr)

cdef inline uint64_t _nat_e_hash_map(nat_table* t, const nat_entry* e) noexcept nogil:
    cdef const nat_addr6* a
    if e.family == 6:
        a = &t.a6[e.a0]
        return _nat_hash_map(t.seed, 6, e.proto, e.sport, e.ext, a.src)
    return _nat_hash_map_w(t.seed, e.family, e.proto, e.sport, e.ext, e.a0, 0)

cdef inline uint64_t _nat_entry_hash(nat_table* t, int kind, uint32_t idx) noexcept nogil:
    cdef nat_mapping* m
    if kind == 0:
        return _nat_e_hash_fwd(t, &t.entries[idx])
    if kind == 1:
        return _nat_e_hash_rev(t, &t.entries[idx])
    m = &t.mappings[idx]
    if m.family == 6:
        return _nat_hash_map(t.seed, 6, m.proto, m.port, m.ext, &t.m6[<uint64_t>m.addr * 16])
    return _nat_hash_map_w(t.seed, m.family, m.proto, m.port, m.ext, m.addr, 0)

# ---------------------------------------------------------------------------
# open-addressing index: uint32 slots = hash tag | (entry index + 1), the
# index in the low ix.ibits bits (24 up to 16,777,214 entries: an 8-bit tag;
# one more per doubling of the capacity, down to a 4-bit tag at 2**28 - 2,
# see _nat_index_bits), linear probing, 1.5 slots per entry of capacity
# (load < 2/3 when full: about 5 slots, one cache line, probed for a miss),
# backward-shift deletion (no tombstones).

cdef inline uint64_t _nat_home(const nat_index* ix, uint64_t h) noexcept nogil:
    return ((h >> 32) * ix.size) >> 32

cdef inline uint32_t _nat_tag(const nat_index* ix, uint64_t h) noexcept nogil:
    return (<uint32_t>h) & ix.tmask

cdef inline uint32_t _nat_slot_idx(const nat_index* ix, uint32_t s) noexcept nogil:
    """The entry (or mapping) index a non-empty slot holds."""
    return (s & ix.imask) - 1

cdef inline void _nat_index_init(nat_index* ix, uint64_t size, uint32_t capacity) noexcept nogil:
    """Size an index over `capacity` entries: index bits for capacity + 1 values, at least 24."""
    cdef uint32_t ibits = 24
    while ibits < 32 and (<uint64_t>capacity) >= (<uint64_t>1 << ibits):
        ibits += 1
    ix.size = size
    ix.imask = <uint32_t>((<uint64_t>1 << ibits) - 1)
    ix.tmask = ~ix.imask

cdef inline void _nat_index_insert(nat_index* ix, uint64_t h, uint32_t idx) noexcept nogil:
    cdef uint64_t pos = _nat_home(ix, h)
    while ix.slots[pos] != 0:
        pos += 1
        if pos == ix.size:
            pos = 0
    ix.slots[pos] = _nat_tag(ix, h) | (idx + 1)

cdef void _nat_index_delete(nat_table* t, int kind, nat_index* ix, uint64_t h,
                            uint32_t idx) noexcept nogil:
    cdef uint32_t want = _nat_tag(ix, h) | (idx + 1)
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
        k = _nat_home(ix, _nat_entry_hash(t, kind, _nat_slot_idx(ix, s)))
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
    cdef uint32_t tag = _nat_tag(&t.fwd, h)
    cdef uint32_t tmask = t.fwd.tmask
    cdef uint32_t s
    cdef nat_entry* e
    while True:
        s = t.fwd.slots[pos]
        if s == 0:
            return NAT_NONE
        if (s & tmask) == tag:
            e = &t.entries[(s & t.fwd.imask) - 1]
            if (e.sport == sport and e.dport == dport and e.proto == proto
                    and e.family == family):
                if family == 4:
                    if e.a0 == _nat_load32(src) and e.a1 == _nat_load32(dst):
                        return (s & t.fwd.imask) - 1
                elif nat_eq16(t.a6[e.a0].src, src) and nat_eq16(t.a6[e.a0].dst, dst):
                    return (s & t.fwd.imask) - 1
        pos += 1
        if pos == t.fwd.size:
            pos = 0

cdef inline uint32_t _nat_find_rev(nat_table* t, uint64_t h, uint8_t family, uint8_t proto,
                                   uint16_t rport, uint16_t xport, const uint8_t* remote,
                                   const uint8_t* extaddr) noexcept nogil:
    cdef uint64_t pos = _nat_home(&t.rev, h)
    cdef uint32_t tag = _nat_tag(&t.rev, h)
    cdef uint32_t tmask = t.rev.tmask
    cdef uint32_t s
    cdef nat_entry* e
    while True:
        s = t.rev.slots[pos]
        if s == 0:
            return NAT_NONE
        if (s & tmask) == tag:
            e = &t.entries[(s & t.rev.imask) - 1]
            if (e.xport == xport and e.dport == rport and e.proto == proto
                    and e.family == family and nat_eq16(t.ext[e.ext].addr, extaddr)):
                if family == 4:
                    if e.a1 == _nat_load32(remote):
                        return (s & t.rev.imask) - 1
                elif nat_eq16(t.a6[e.a0].dst, remote):
                    return (s & t.rev.imask) - 1
        pos += 1
        if pos == t.rev.size:
            pos = 0

cdef inline uint32_t _nat_find_map(nat_table* t, uint64_t h, uint8_t family, uint8_t proto,
                                   uint16_t port, uint16_t ext, const uint8_t* addr) noexcept nogil:
    cdef uint64_t pos = _nat_home(&t.map, h)
    cdef uint32_t tag = _nat_tag(&t.map, h)
    cdef uint32_t tmask = t.map.tmask
    cdef uint32_t s
    cdef nat_mapping* m
    while True:
        s = t.map.slots[pos]
        if s == 0:
            return NAT_NONE
        if (s & tmask) == tag:
            m = &t.mappings[(s & t.map.imask) - 1]
            if m.port == port and m.ext == ext and m.proto == proto and m.family == family:
                if family == 4:
                    if m.addr == _nat_load32(addr):
                        return (s & t.map.imask) - 1
                elif nat_eq16(&t.m6[<uint64_t>m.addr * 16], addr):
                    return (s & t.map.imask) - 1
        pos += 1
        if pos == t.map.size:
            pos = 0
