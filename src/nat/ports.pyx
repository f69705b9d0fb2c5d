# nat/ports: the per-egress-IP port pools (bitmap of free external ports).

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
    cdef int _word
    if bits:
        return (w << 6) | nat_ctz64(bits)
    cw = (w + 1) & 1023
    for _word in range(17):
        sw = cw >> 6
        fb = ~p.full[sw] & ((<uint64_t>0xffffffffffffffffULL) << (cw & 63))
        if fb:
            wi = (sw << 6) | nat_ctz64(fb)
            return (wi << 6) | nat_ctz64(~p.bits[wi])
        cw = ((sw + 1) & 15) << 6
    return NAT_NONE

cdef void _nat_pool_init(nat_pool* p, uint32_t lo, uint32_t hi) noexcept nogil:
    """An empty pool of ports [lo, hi]: every other port pre-set, a word at a time."""
    cdef uint32_t w, base
    cdef uint64_t inside
    memset(p, 0, sizeof(nat_pool))
    p.lo = lo
    p.hi = hi
    for w in range(1024):
        base = w << 6
        if base + 63 < lo or base > hi:
            inside = 0
        else:
            inside = <uint64_t>0xffffffffffffffffULL
            if lo > base:
                inside &= (<uint64_t>0xffffffffffffffffULL) << (lo - base)
            if hi < base + 63:
                inside &= (<uint64_t>0xffffffffffffffffULL) >> (base + 63 - hi)
        p.bits[w] = ~inside
        if inside == 0:
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
# spill: more egress IPs for one (nat_ext.spill, set by NatTable.set_spill)

cdef uint32_t _nat_spill_find_map(nat_table* t, const nat_tuple* o, uint32_t* ext,
                                  uint64_t* mh) noexcept nogil:
    """The endpoint's mapping on one of *ext's spill IPs, or NAT_NONE.

    Endpoint-independent mapping holds across the chain: a pod port that
    spilled keeps its egress IP and port for every destination while it
    has a connection.  On a hit *ext and *mh become that IP's."""
    cdef const nat_ext* x = &t.ext[ext[0]]
    cdef uint32_t i, m
    cdef uint16_t s
    cdef uint64_t h
    for i in range(x.nspill):
        s = x.spill[i]
        h = _nat_hash_map(t.seed, o.family, o.proto, o.sport, s, o.src)
        m = _nat_find_map(t, h, o.family, o.proto, o.sport, s, o.src)
        if m != NAT_NONE:
            ext[0] = s
            mh[0] = h
            return m
    return NAT_NONE

cdef uint32_t _nat_spill_pool(nat_table* t, const nat_tuple* o, uint32_t ext,
                              uint64_t* mh) noexcept nogil:
    """The first spill IP of `ext` (whose own pool is full) with a free port
    for o's protocol, or NAT_NONE when every one is full too; *mh becomes
    the mapping hash on it."""
    cdef const nat_ext* x = &t.ext[ext]
    cdef uint32_t i
    cdef uint16_t s
    for i in range(x.nspill):
        s = x.spill[i]
        if t.ext[s].pools[_nat_pool_of(o.proto)].nfree:
            mh[0] = _nat_hash_map(t.seed, o.family, o.proto, o.sport, s, o.src)
            t.ext[s].spilled_in += 1
            return s
    return NAT_NONE
