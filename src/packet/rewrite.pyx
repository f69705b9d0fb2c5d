# --------------------------------------------------------------------------
# NAT rewrite

cdef uint32_t _pkt_nat_quote(uint8_t *buf, PktInfo *pi, int side, uint32_t addr4,
                             const uint8_t *addr6, int32_t port) noexcept nogil:
    """Translate the packet quoted in an ICMP error: its `side` address and
    port, its IP and L4 checksums.  Returns the delta for the outer ICMP
    checksum, which covers every byte changed here."""
    cdef uint8_t *ip = buf + pi.in_l3_off
    cdef uint8_t *l4
    cdef uint32_t d_addr, d_port = 0, d_icmp
    cdef uint8_t p = pi.in_proto
    if pi.ip_version == 4:
        d_addr = csum_set32(ip + (16 if side == PKT_NAT_DST else 12), addr4)
        d_icmp = d_addr + csum_apply(ip + 10, d_addr)
        if side == PKT_NAT_DST:
            pi.in_dst4 = addr4
        else:
            pi.in_src4 = addr4
    else:
        d_addr = csum_set_bytes(ip + (24 if side == PKT_NAT_DST else 8), addr6, 16)
        d_icmp = d_addr
    if pi.in_l4_off < 0:
        return d_icmp
    l4 = buf + pi.in_l4_off
    if p == PKT_IPPROTO_TCP or p == PKT_IPPROTO_UDP:
        if port >= 0:
            d_port = csum_set16(l4 + (2 if side == PKT_NAT_DST else 0), <uint16_t>port)
            d_icmp += d_port
            if side == PKT_NAT_DST:
                pi.in_dport = <uint16_t>port
            else:
                pi.in_sport = <uint16_t>port
        if p == PKT_IPPROTO_UDP:
            d_icmp += csum_apply_udp(l4 + 6, d_addr + d_port)
        elif pi.in_l4_off + 18 <= pi.in_end:   # TCP checksum inside the quote
            d_icmp += csum_apply(l4 + 16, d_addr + d_port)
    elif pi.in_has_ports:                        # quoted ICMP echo
        if port >= 0 and _pkt_echo_side(pi.ip_version, l4[0]) == side:
            d_port = csum_set16(l4 + 4, <uint16_t>port)
            d_icmp += d_port
            if side == PKT_NAT_DST:
                pi.in_dport = <uint16_t>port
            else:
                pi.in_sport = <uint16_t>port
        if pi.ip_version == 4:
            d_icmp += csum_apply(l4 + 2, d_port)
        else:
            d_icmp += csum_apply(l4 + 2, d_addr + d_port)
    return d_icmp


cdef inline int _pkt_nat_check(const PktInfo *pi, uint8_t version) noexcept nogil:
    cdef uint8_t p = pi.proto
    if pi.ip_version != version:
        return DROP_UNSUPPORTED
    if pi.frag == PKT_FRAG_LATER:
        return DROP_FRAGMENT
    if p == PKT_IPPROTO_TCP or p == PKT_IPPROTO_UDP:
        return 0
    if (p == PKT_IPPROTO_ICMP and version == 4) or (p == PKT_IPPROTO_ICMPV6 and version == 6):
        return 0
    return DROP_UNSUPPORTED                      # GRE, SCTP, ...: as Cilium's SNAT


cdef int _pkt_nat_l4(uint8_t *buf, PktInfo *pi, int side, uint32_t d_addr, uint32_t addr4,
                     const uint8_t *addr6, int32_t port) noexcept nogil:
    """L4 part of a rewrite whose address delta (pseudo-header) is d_addr."""
    cdef uint8_t *l4 = buf + pi.l4_off
    cdef uint32_t d = d_addr
    cdef uint8_t p = pi.proto
    cdef bint set_port = port >= 0 and pi.has_ports
    if p == PKT_IPPROTO_TCP or p == PKT_IPPROTO_UDP:
        if set_port:
            d += csum_set16(l4 + (2 if side == PKT_NAT_DST else 0), <uint16_t>port)
        if p == PKT_IPPROTO_TCP:
            csum_apply(l4 + 16, d)
        else:
            csum_apply_udp(l4 + 6, d)
    else:
        if pi.ip_version == 4:
            d = 0                                # ICMPv4: no pseudo-header
        if pi.icmp_err:
            d += _pkt_nat_quote(buf, pi, 1 - side, addr4, addr6, port)
            set_port = 0
        elif set_port and _pkt_echo_side(pi.ip_version, pi.icmp_type) == side:
            d += csum_set16(l4 + 4, <uint16_t>port)
        else:
            set_port = 0
        csum_apply(l4 + 2, d)
    if set_port:
        if side == PKT_NAT_DST:
            pi.dport = <uint16_t>port
        else:
            pi.sport = <uint16_t>port
    return 0


cdef int pkt_nat4(uint8_t *buf, PktInfo *pi, int side, uint32_t addr, int32_t port) noexcept nogil:
    cdef int rc = _pkt_nat_check(pi, 4)
    cdef uint8_t *ip
    cdef uint32_t d_addr
    if rc:
        return rc
    ip = buf + pi.l3_off
    d_addr = csum_set32(ip + (16 if side == PKT_NAT_DST else 12), addr)
    csum_apply(ip + 10, d_addr)
    if side == PKT_NAT_DST:
        pi.dst4 = addr
    else:
        pi.src4 = addr
    return _pkt_nat_l4(buf, pi, side, d_addr, addr, NULL, port)


cdef int pkt_nat6(uint8_t *buf, PktInfo *pi, int side, const uint8_t *addr, int32_t port) noexcept nogil:
    cdef int rc = _pkt_nat_check(pi, 6)
    cdef uint32_t d_addr
    if rc:
        return rc
    d_addr = csum_set_bytes(buf + pi.l3_off + (24 if side == PKT_NAT_DST else 8), addr, 16)
    return _pkt_nat_l4(buf, pi, side, d_addr, 0, addr, port)


cdef int pkt_snat4(uint8_t *buf, PktInfo *pi, uint32_t addr, int32_t port) noexcept nogil:
    return pkt_nat4(buf, pi, PKT_NAT_SRC, addr, port)


cdef int pkt_dnat4(uint8_t *buf, PktInfo *pi, uint32_t addr, int32_t port) noexcept nogil:
    return pkt_nat4(buf, pi, PKT_NAT_DST, addr, port)


cdef int pkt_ttl_decrement(uint8_t *buf, PktInfo *pi) noexcept nogil:
    cdef uint8_t *ip = buf + pi.l3_off
    cdef uint16_t old
    if pi.ttl <= 1:
        return DROP_TTL_EXCEEDED
    if pi.ip_version == 4:
        old = be_load16(ip + 8)
        ip[8] -= 1
        csum_apply(ip + 10, csum_delta16(old, be_load16(ip + 8)))
    elif pi.ip_version == 6:
        ip[7] -= 1
    else:
        return DROP_UNSUPPORTED
    pi.ttl -= 1
    return 0
