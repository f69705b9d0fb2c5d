# datapath/pins: make-before-break on the datapath, over the gateway pin
# table (gwpin) and the NAT table.
#
#   source node: a connection from a local pod keeps the gateway it started
#   on (dp_pin_pick) while that gateway is usable and the pin lives, when the
#   egress map now chooses another; a pin on this node itself keeps the
#   connection's local SNAT (its NAT entry) going.
#   gateway node: a connection it already translates (a live NAT entry) keeps
#   flowing when the map no longer sends that pod here (dp_nat_kept4); a new
#   connection still needs the map.  Only ever to the address of that entry:
#   an egress IP of this node's NAT table.
# Both only while c.pins is set (Datapath.set_make_before_break).

cdef enum:
    DP_PIN_AHEAD = 16            # frames ahead whose pin bucket is prefetched


cdef inline bint dp_pin_usable(dp_ctx *c, uint32_t node) noexcept nogil:
    """A pinned gateway can take the connection: a known node, this one or one with a MAC."""
    cdef dp_node *n = &c.nodes[node]
    return n.valid and (n.ip == c.node_ip or n.has_mac)


cdef inline uint32_t dp_pin_pick(dp_ctx *c, const PktInfo *pi, uint32_t node, uint64_t now,
                                 gwpin_rec **rec) noexcept nogil:
    """The connection's gateway (node index): its live, usable pin, else
    `node` (the egress map's choice now), which becomes its pin (*rec)."""
    cdef uint32_t p = gwpin_pick(c.pins, gwpin_key0(pi.src4, pi.dst4), gwpin_key1(pi.proto, pi.sport, pi.dport),
                                 pi.tcp_flags, now, node, rec)      # flags: 0 unless TCP (pkt_parse)
    if p != node and not dp_pin_usable(c, p):
        gwpin_repin(c.pins, rec[0], node)
        return node
    return p


cdef inline void dp_pin_prefetch(dp_ctx *c, const uint8_t *f, uint32_t n) noexcept nogil:
    """Prefetch the pin bucket of a frame from a pod (plain IPv4 TCP, UDP or
    ICMP echo; anything else is left alone): the key as dp_pin_pick makes it."""
    cdef uint16_t sport, dport
    cdef int proto = dp_peek_flow4(f, n, PKT_ETH_LEN, &sport, &dport)
    if proto < 0:
        return
    gwpin_prefetch(c.pins, gwpin_key0(be_load32(f + 26), be_load32(f + 30)),
                   gwpin_key1(<uint8_t>proto, sport, dport))


cdef inline uint32_t dp_nat_kept4(dp_ctx *c, const PktInfo *pi, uint64_t now) noexcept nogil:
    """The egress IP (host order) of the live NAT entry of this outgoing
    IPv4 packet's connection, or 0: none, or a TCP SYN alone on a closing
    entry (a new connection on the tuple: it needs the egress map).  A SYN
    on an entry still opening is a retransmission: kept.  Counts nothing."""
    cdef nat_table *t = c.nat_c
    cdef nat_entry *e
    cdef uint8_t src[16]
    cdef uint8_t dst[16]
    cdef uint16_t dport
    cdef uint32_t idx
    if not pi.has_ports or pi.icmp_err:
        return 0
    _dp_memset(src, 0, 16)
    _dp_memset(dst, 0, 16)
    be_store32(src, pi.src4)
    be_store32(dst, pi.dst4)
    dport = 0 if pi.proto == PKT_IPPROTO_ICMP else pi.dport
    idx = _nat_find_fwd(t, _nat_hash_fwd(t.seed, 4, pi.proto, pi.sport, dport, src, dst),
                        4, pi.proto, pi.sport, dport, src, dst)
    if idx == NAT_NONE:
        return 0
    e = &t.entries[idx]
    if e.expires <= now:
        return 0
    if (e.state == NAT_STATE_CLOSING and pi.proto == PKT_IPPROTO_TCP
            and (pi.tcp_flags & (NAT_TCP_SYN | NAT_TCP_ACK)) == NAT_TCP_SYN):
        return 0
    return be_load32(t.ext[e.ext].addr)
