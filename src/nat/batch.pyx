# nat/batch: batch translation as a software pipeline.

# ---------------------------------------------------------------------------
# batches: a three-stage software pipeline (hash + prefetch slot, prefetch
# entry, translate) hides the two cache misses of each lookup.

cdef inline uint32_t _nat_peek(const nat_index* ix, uint64_t h) noexcept nogil:
    """Slot of the first tag match among the next few slots from home (0 if
    none): a hint for prefetching the entry, read from an already fetched line."""
    cdef uint64_t pos = _nat_home(ix, h)
    cdef uint32_t tag = _nat_tag(ix, h)
    cdef uint32_t s
    cdef int _probe
    for _probe in range(4):
        s = ix.slots[pos]
        if s == 0 or (s & ix.tmask) == tag:
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
    cdef uint64_t hring[NAT_RPF_RING]
    cdef Py_ssize_t i, j
    cdef uint64_t h
    cdef uint32_t s
    cdef const nat_tuple* r
    cdef uint16_t rport
    # the entry's bytes a reply touches: expiry, addresses, ports, family to
    # flags and the policy id (the first 32), and with lengths the counters
    # (the first 48): one line more only when they straddle one (3 of 8
    # entries, 5 of 8 with lengths), where the whole 56 would take 6 of 8
    cdef size_t hot = (48 if lens != NULL else 32) - 1
    for i in range(n + NAT_RPF_SLOT):
        if i < n:
            r = &tin[i]
            rport = 0 if _nat_is_icmp(r.proto) else r.sport
            h = _nat_hash_rev(t.seed, r.family, r.proto, rport, r.dport, r.src, r.dst)
            hring[i & (NAT_RPF_RING - 1)] = h
            nat_prefetch(&t.rev.slots[_nat_home(&t.rev, h)])
        j = i - NAT_RPF_ENTRY
        if 0 <= j < n:
            s = _nat_peek(&t.rev, hring[j & (NAT_RPF_RING - 1)])
            if s != 0:
                nat_prefetch_w(&t.entries[_nat_slot_idx(&t.rev, s)])
                nat_prefetch_w(<char*>&t.entries[_nat_slot_idx(&t.rev, s)] + hot)
        j = i - NAT_RPF_SLOT
        if j >= 0:
            r = &tin[j]
            if _nat_check(r):
                t.drops[<int>DROP_UNSUPPORTED] += 1
                codes[j] = DROP_UNSUPPORTED
                continue
            rport = 0 if _nat_is_icmp(r.proto) else r.sport
            codes[j] = <uint8_t>_nat_in_h(t, r, now, &tout[j], hring[j & (NAT_RPF_RING - 1)], rport, True,
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
                nat_prefetch_w(&t.entries[_nat_slot_idx(&t.fwd, s)])
                nat_prefetch_w(<char*>&t.entries[_nat_slot_idx(&t.fwd, s)] + sizeof(nat_entry) - 1)
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
