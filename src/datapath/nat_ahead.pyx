# datapath/nat_ahead: the NAT table's two cache misses per frame (its index
# slot, then its entry), fetched a few frames ahead by the batch loop
# (dp_rx_frames) once the table's live entries outgrow the caches, as
# nat/batch.pyx's pipeline does for the batch calls.  At 100,000 flows the
# gateway SNAT path spent four fifths of nat_translate_out_pol on those two
# loads.  A hint only: the key is read from the frame as the stages will
# read it (dp_peek_flow4: IPv4 TCP, UDP, ICMP echo; VXLAN from the underlay
# by its inner packet), a frame it does not match costs a hash, and a wrong
# guess costs a line, never a verdict.

cdef enum:
    DP_NAT_SLOT_AHEAD = 6        # frames ahead whose index slot is prefetched
    DP_NAT_ENTRY_AHEAD = 3       # frames ahead whose entry is (the slot read by then)
    DP_NAT_RING = 8              # hashes in flight (> DP_NAT_SLOT_AHEAD, a power of two)
    DP_NAT_FWD = 1               # the original direction: fwd index
    DP_NAT_REV = 2               # a reply: rev index
    DP_NAT_AHEAD_ENTRIES = 4096  # live entries (about 256 KiB) above which the loop prefetches


cdef inline bint dp_nat_ahead_on(dp_ctx *c, int port) noexcept nogil:
    """Whether the batch loop prefetches for a batch from `port`: the live
    entries outgrow the caches, and the port's last batch used the table
    (a source node's pod -> gateway frames and VXLAN replies do not)."""
    return c.nat_c != NULL and c.nat_c.used > DP_NAT_AHEAD_ENTRIES and not c.ports[port].nat_cold


cdef inline void dp_nat_ahead_learn(dp_ctx *c, int port, uint64_t lookups, int n) noexcept nogil:
    """After a batch of n frames from `port` (the table's lookup count was
    `lookups` before it): prefetch for its next batch while at least half
    of its frames look the table up."""
    if c.nat_c != NULL:
        c.ports[port].nat_cold = (c.nat_c.lookups - lookups) * 2 < <uint64_t>n


cdef inline uint8_t dp_nat_slot_ahead(dp_ctx *c, const uint8_t *f, uint32_t n, int port,
                                      uint64_t *hash) noexcept nogil:
    """Prefetch the index slot of a frame's NAT lookup; returns which index
    (DP_NAT_FWD / DP_NAT_REV, *hash its key's hash) or 0: no key.  From a
    pod (masquerade, local SNAT) and VXLAN from a node (the gateway role) the
    original tuple; anything else from the underlay is looked up as a reply."""
    cdef nat_table *t = c.nat_c
    cdef uint32_t l3 = PKT_ETH_LEN
    cdef uint16_t sport, dport
    cdef uint8_t kind = DP_NAT_FWD if port != 0 else DP_NAT_REV
    cdef uint64_t src0 = 0, dst0 = 0
    cdef int proto = dp_peek_flow4(f, n, l3, &sport, &dport)
    if port == 0 and proto == PKT_IPPROTO_UDP and dport == c.vxlan_port:
        l3 += ((f[l3] & 0xf) << 2) + 8 + 8 + PKT_ETH_LEN     # UDP, VXLAN, inner Ethernet
        kind = DP_NAT_FWD
        proto = dp_peek_flow4(f, n, l3, &sport, &dport)
    if proto < 0:
        return 0
    # the ports as the lookups hash them: an echo's id is the pod's port
    # (fwd: no destination port; rev: no remote port)
    if proto == PKT_IPPROTO_ICMP:
        if kind == DP_NAT_FWD:
            dport = 0
        else:
            sport = 0
    # the words nat_load64 reads from a tuple's zero-padded address (built
    # in registers: a 4-byte store read back as 8 would stall the load)
    _dp_memcpy(&src0, f + l3 + 12, 4)
    _dp_memcpy(&dst0, f + l3 + 16, 4)
    if kind == DP_NAT_FWD:
        hash[0] = _nat_hash_fwd_w(t.seed, 4, <uint8_t>proto, sport, dport, src0, 0, dst0, 0)
        nat_prefetch(&t.fwd.slots[_nat_home(&t.fwd, hash[0])])
    else:
        hash[0] = _nat_hash_rev_ww(t.seed, 4, <uint8_t>proto, sport, dport, src0, 0, dst0, 0)
        nat_prefetch(&t.rev.slots[_nat_home(&t.rev, hash[0])])
    return kind


cdef inline void dp_nat_entry_ahead(dp_ctx *c, uint8_t kind, uint64_t hash) noexcept nogil:
    """Prefetch (for writing: touched, counted) the entry whose tag matches
    near the home of `hash` in index `kind`, its slot line fetched by now."""
    cdef nat_table *t = c.nat_c
    cdef nat_index *ix
    cdef uint32_t s
    if kind == 0:
        return
    ix = &t.fwd if kind == DP_NAT_FWD else &t.rev
    s = _nat_peek(ix, hash)
    if s != 0:
        nat_prefetch_w(&t.entries[_nat_slot_idx(ix, s)])
        nat_prefetch_w(<char *>&t.entries[_nat_slot_idx(ix, s)] + sizeof(nat_entry) - 1)
