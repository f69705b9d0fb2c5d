# nat/conntrack: the expiry wheel, per-source counts, flow records and the
# per-connection state machine with translate out/in (nat.pyx rules at the top of nat/index.pyx).

# ---------------------------------------------------------------------------
# the IPv6 address pools (t.a6 of the entries, t.m6 of the mappings; the
# caller checked there is room: a6_used, m6_used < a6_capacity)

cdef inline uint32_t _nat_a6_take(nat_table* t, const uint8_t* src, const uint8_t* dst) noexcept nogil:
    """A record holding src and dst (16 bytes each); its index."""
    cdef uint32_t r = t.a6_free_head
    if r != NAT_NONE:
        memcpy(&t.a6_free_head, t.a6[r].src, 4)      # next-free link
    else:
        r = t.a6_hwm
        t.a6_hwm += 1
    memcpy(t.a6[r].src, src, 16)
    memcpy(t.a6[r].dst, dst, 16)
    t.a6_used += 1
    return r

cdef inline void _nat_a6_put(nat_table* t, uint32_t r) noexcept nogil:
    memset(&t.a6[r], 0, sizeof(nat_addr6))
    memcpy(t.a6[r].src, &t.a6_free_head, 4)
    t.a6_free_head = r
    t.a6_used -= 1

cdef inline uint32_t _nat_m6_take(nat_table* t, const uint8_t* addr) noexcept nogil:
    cdef uint32_t r = t.m6_free_head
    if r != NAT_NONE:
        memcpy(&t.m6_free_head, &t.m6[<uint64_t>r * 16], 4)
    else:
        r = t.m6_hwm
        t.m6_hwm += 1
    memcpy(&t.m6[<uint64_t>r * 16], addr, 16)
    t.m6_used += 1
    return r

cdef inline void _nat_m6_put(nat_table* t, uint32_t r) noexcept nogil:
    memcpy(&t.m6[<uint64_t>r * 16], &t.m6_free_head, 4)
    t.m6_free_head = r
    t.m6_used -= 1

# ---------------------------------------------------------------------------
# the policy id packed into a live entry (see nat_entry in nat.pxd)

cdef inline uint32_t _nat_e_mapping(nat_table* t, const nat_entry* e) noexcept nogil:
    """A live entry's mapping index: kept in the entry's 24 bits, or, in a
    table with more mappings than 24 bits hold, found by its key."""
    cdef uint8_t buf[16]
    if t.map_capacity <= NAT_MAP_MASK:
        return e.mapping & NAT_MAP_MASK
    return _nat_find_map(t, _nat_e_hash_map(t, e), e.family, e.proto, e.sport, e.ext,
                         _nat_e_src(t, e, buf))

cdef inline uint32_t _nat_e_policy(const nat_entry* e) noexcept nogil:
    """A live entry's policy id (0: none)."""
    return (e.mapping >> 24) | (<uint32_t>(e.flags >> 3) << 8)

cdef inline void _nat_e_set_mapping(nat_entry* e, uint32_t m, uint32_t policy) noexcept nogil:
    """Make a live entry's mapping index m and its policy id `policy`."""
    if policy > NAT_POLICY_STORED:
        policy = NAT_POLICY_STORED
    e.mapping = (m & NAT_MAP_MASK) | ((policy & 0xff) << 24)
    e.flags = <uint8_t>((e.flags & NAT_F_MASK) | ((policy >> 8) << 3))

# ---------------------------------------------------------------------------
# expiry wheel: intrusive doubly linked bucket lists (see the header)

cdef inline uint32_t* _nat_link(nat_table* t, uint32_t i) noexcept nogil:
    """The (next, prev) pair of entry i, or of bucket i - capacity's head."""
    if i < t.capacity:
        return t.entries[i].wl
    return &t.wheel[2 * (i - t.capacity)]

cdef inline void _nat_wheel_unlink(nat_table* t, uint32_t i) noexcept nogil:
    cdef uint32_t* link = t.entries[i].wl
    _nat_link(t, link[1])[0] = link[0]
    _nat_link(t, link[0])[1] = link[1]

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
    cdef int _probe
    for _probe in range(NAT_SRC_REFUSED_SLOTS):
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
    cdef uint8_t buf[16]
    memcpy(r.src, _nat_e_src(t, e, buf), 16)
    memcpy(r.dst, _nat_e_dst(t, e, buf), 16)
    memcpy(r.xsrc, t.ext[e.ext].addr, 16)
    r.xport = e.xport
    r.policy = <uint16_t>_nat_e_policy(e) if _nat_e_policy(e) else FLOW_NO_POLICY
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
                e.flags &= ~NAT_F_MASK
                if _nat_e_policy(e):
                    t.pol[policy_slot(_nat_e_policy(e))].opened += 1
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
    cdef uint32_t mi = _nat_e_mapping(t, e)
    cdef nat_mapping* m = &t.mappings[mi]
    cdef uint8_t buf[16]
    if t.flog != NULL:
        _nat_flow(t, e, FLOW_END, reason if reason else _nat_end_reason(e), now)
    _nat_wheel_unlink(t, idx)
    if _nat_e_policy(e):
        t.pol[policy_slot(_nat_e_policy(e))].live -= 1
    if t.src_limit:
        _nat_src_release(t, e.family, _nat_e_src(t, e, buf))
    _nat_index_delete(t, 0, &t.fwd, _nat_entry_hash(t, 0, idx), idx)
    _nat_index_delete(t, 1, &t.rev, _nat_entry_hash(t, 1, idx), idx)
    m.refcnt -= 1
    if m.refcnt == 0:
        _nat_index_delete(t, 2, &t.map, _nat_entry_hash(t, 2, mi), mi)
        _nat_port_put(t.ext[m.ext].pools[_nat_pool_of(m.proto)], m.xport)
        if m.family == 6:
            _nat_m6_put(t, m.addr)
        m.addr = t.map_free_head                  # next-free link
        t.map_free_head = mi
        t.map_used -= 1
    if e.family == 6:
        _nat_a6_put(t, e.a0)
        e.a0 = 0
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
    if e.family == 6:
        memcpy(out.dst, t.a6[e.a0].dst, 16)
    else:
        memset(out.dst, 0, 16)
        memcpy(out.dst, &e.a1, 4)

cdef inline int _nat_refuse(nat_table* t, const nat_tuple* o, int reason,
                            uint64_t now) noexcept nogil:
    t.drops[drop_slot(reason)] += 1
    if t.flog != NULL:
        flow_drop(t.flog, now, <uint8_t>reason, o.family, o.proto, o.sport, o.dport,
                  o.src, o.dst, FLOW_NO_POLICY, o.tcp_flags)
    return reason

cdef int _nat_create(nat_table* t, const nat_tuple* o, uint16_t dport, uint64_t h,
                     uint64_t mh, uint32_t ext, uint64_t now, nat_tuple* out,
                     uint64_t* defer, uint32_t length, uint32_t policy=0) noexcept nogil:
    """Create the connection (and its mapping if new: on `ext`, or on the
    first IP of ext's spill chain with a free port when ext has none; the
    endpoint's mapping on a spill IP is reused first), counted to `policy`
    (0: none).  With `defer`, the
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
    if o.family == 6 and (t.a6_used >= t.a6_capacity or t.m6_used >= t.a6_capacity):
        t.a6_full += 1          # the IPv6 address pool is full: a table-full refusal
        return _nat_refuse(t, o, DROP_NAT_TABLE_FULL, now)
    m = _nat_find_map(t, mh, o.family, o.proto, o.sport, <uint16_t>ext, o.src)
    if m == NAT_NONE and t.ext[ext].nspill:
        m = _nat_spill_find_map(t, o, &ext, &mh)
    if m == NAT_NONE:
        pool = t.ext[ext].pools[_nat_pool_of(o.proto)]
        if pool.nfree == 0:
            # full: the next egress IP of its spill chain with a free port, if any
            ext = _nat_spill_pool(t, o, ext, &mh) if t.ext[ext].nspill else NAT_NONE
            if ext == NAT_NONE:
                return _nat_refuse(t, o, DROP_NAT_EXHAUSTED, now)
            pool = t.ext[ext].pools[_nat_pool_of(o.proto)]
        xport = o.sport
        if xport < pool.lo or xport > pool.hi or not _nat_port_free(pool, xport):
            start = pool.lo + <uint32_t>((_nat_rand(t) >> 32) % (pool.hi - pool.lo + 1))
            xport = _nat_port_find(pool, start)
        _nat_port_take(pool, xport)
        m = t.map_free_head
        if m != NAT_NONE:
            mp = &t.mappings[m]
            t.map_free_head = mp.addr             # next-free link
        else:
            m = t.mappings_hwm                    # never used: no more than entries
            t.mappings_hwm += 1
            mp = &t.mappings[m]
        if o.family == 6:
            mp.addr = _nat_m6_take(t, o.src)
        else:
            mp.addr = _nat_load32(o.src)
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
    if o.family == 6:
        e.a0 = _nat_a6_take(t, o.src, o.dst)
        e.a1 = 0
    else:
        e.a0 = _nat_load32(o.src)
        e.a1 = _nat_load32(o.dst)
    e.sport = o.sport
    e.dport = dport
    e.xport = mp.xport
    e.ext = <uint16_t>ext
    e.family = o.family
    e.proto = o.proto
    e.flags = 0
    _nat_e_set_mapping(e, m, policy)
    e.created_ms = _nat_ms(now)
    e.npkts[0] = e.npkts[1] = 0
    e.nbytes[0] = e.nbytes[1] = 0
    if policy:
        t.pol[policy_slot(_nat_e_policy(e))].opened += 1
        t.pol[policy_slot(_nat_e_policy(e))].live += 1
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
                           uint64_t* defer=NULL, uint32_t length=NAT_NO_LEN,
                           uint32_t policy=0) noexcept nogil:
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
                       ext, now, out, defer, length, policy)

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
    index or family), DROP_NAT_TABLE_FULL or DROP_NAT_EXHAUSTED (no free port
    on `ext` nor on any IP of its spill chain) otherwise, and then `out` is
    untouched.  An existing connection keeps its egress IP; a new one may
    leave through a spill IP of `ext` (out.src says which)."""
    return nat_translate_out_pol(t, orig, ext, 0, now, out, length)

cdef int nat_translate_out_pol(nat_table* t, const nat_tuple* orig, uint32_t ext, uint32_t policy,
                               uint64_t now, nat_tuple* out, uint32_t length) noexcept nogil:
    """nat_translate_out_len whose new connection is opened under policy id
    `policy` (0: none).  An existing connection keeps the policy it was
    opened under, as it keeps its egress IP."""
    cdef int err = _nat_out_check(t, orig, ext)
    cdef uint16_t dport
    if err:
        return err
    dport = 0 if _nat_is_icmp(orig.proto) else orig.dport
    return _nat_out_h(t, orig, ext, now, out,
                      _nat_hash_fwd(t.seed, orig.family, orig.proto, orig.sport, dport,
                                    orig.src, orig.dst), dport, NULL, length, policy)

cdef inline int _nat_in_h(nat_table* t, const nat_tuple* r, uint64_t now, nat_tuple* out,
                          uint64_t h, uint16_t rport, bint touch=True,
                          uint32_t length=NAT_NO_LEN, uint32_t* policy=NULL) noexcept nogil:
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
            if e.family == 6:
                memcpy(out.dst, t.a6[e.a0].src, 16)
            else:
                memset(out.dst, 0, 16)
                memcpy(out.dst, &e.a0, 4)
            if policy != NULL:
                policy[0] = _nat_e_policy(e)
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
    return nat_translate_in_pol(t, reply, now, out, length, NULL)

cdef int nat_translate_in_pol(nat_table* t, const nat_tuple* reply, uint64_t now,
                              nat_tuple* out, uint32_t length, uint32_t* policy) noexcept nogil:
    """nat_translate_in_len that also sets *policy (when not NULL) to the
    connection's policy id on success."""
    cdef int err = _nat_check(reply)
    cdef uint16_t rport
    if err:
        t.drops[err] += 1
        return err
    rport = 0 if _nat_is_icmp(reply.proto) else reply.sport
    return _nat_in_h(t, reply, now, out,
                     _nat_hash_rev(t.seed, reply.family, reply.proto, rport, reply.dport,
                                   reply.src, reply.dst), rport, True, length, policy)

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
