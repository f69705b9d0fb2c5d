# --------------------------------------------------------------------------
# ICMP fragmentation-needed / packet-too-big

cdef int64_t pkt_icmp_too_big(const uint8_t *buf, const PktInfo *pi, uint8_t *out,
                              int64_t cap, uint32_t mtu, const uint8_t *src) noexcept nogil:
    cdef int32_t l2 = pi.l3_off, q, n
    cdef const uint8_t *ip0 = buf + pi.l3_off
    cdef uint8_t *ip = out + l2
    cdef uint8_t *icmp
    cdef uint32_t sum
    # RFC 1122 / 4443: never about an ICMP error, a later fragment, a frame
    # sent to a link-layer group address, or an unspecified source.
    if pi.ip_version == 0 or pi.frag == PKT_FRAG_LATER or (buf[0] & 1):
        return 0
    if (pi.proto == PKT_IPPROTO_ICMP and pi.ip_version == 4 and
            pi.l4_off >= 0 and pi.icmp_type != 8 and pi.icmp_type != 0 and
            pi.icmp_type != 13 and pi.icmp_type != 14):
        return 0
    if pi.proto == PKT_IPPROTO_ICMPV6 and pi.ip_version == 6 and pi.l4_off >= 0 and pi.icmp_type < 128:
        return 0
    # Ethernet (and 802.1Q tag) back to the sender
    if cap < l2:
        return 0
    memcpy(out, buf + 6, 6)
    memcpy(out + 6, buf, 6)
    memcpy(out + 12, buf + 12, l2 - 12)
    if pi.ip_version == 4:
        # RFC 1812 4.3.2.7: not to an unspecified, multicast or broadcast
        # source, nor about a packet sent to a multicast or broadcast address
        if (pi.src4 == 0 or (pi.src4 >> 28) == 14 or pi.src4 == 0xffffffffu or
                (pi.dst4 >> 28) == 14 or pi.dst4 == 0xffffffffu):
            return 0
        q = pi.l3_end - pi.l3_off
        if q > 576 - 28:                         # RFC 1812: reply within 576 bytes
            q = 576 - 28
        n = l2 + 28 + q
        if n > cap:
            return 0
        memset(ip, 0, 28)
        ip[0] = 0x45
        ip[1] = 0xc0                             # internetwork control
        be_store16(ip + 2, <uint16_t>(28 + q))
        ip[8] = 64
        ip[9] = PKT_IPPROTO_ICMP
        if src != NULL:
            memcpy(ip + 12, src, 4)
        else:
            memcpy(ip + 12, ip0 + 16, 4)
        memcpy(ip + 16, ip0 + 12, 4)
        be_store16(ip + 10, csum_finish(csum_partial(ip, 20, 0)))
        icmp = ip + 20
        icmp[0] = 3
        icmp[1] = 4
        be_store16(icmp + 6, <uint16_t>(mtu if mtu < 0xffff else 0xffff))
        memcpy(icmp + 8, ip0, q)
        be_store16(icmp + 2, csum_finish(csum_partial(icmp, 8 + q, 0)))
        return n
    # IPv6, RFC 4443 2.4 (e): never to an unspecified or multicast source
    if ip0[8] == 0xff:
        return 0
    for q in range(16):
        if ip0[8 + q] != 0:
            break
    else:
        return 0
    # the reply must fit the IPv6 minimum MTU (RFC 4443 2.4 (c))
    q = pi.l3_end - pi.l3_off
    if q > 1280 - 48:
        q = 1280 - 48
    n = l2 + 48 + q
    if n > cap:
        return 0
    memset(ip, 0, 48)
    ip[0] = 0x60
    be_store16(ip + 4, <uint16_t>(8 + q))
    ip[6] = PKT_IPPROTO_ICMPV6
    ip[7] = 64
    if src != NULL:
        memcpy(ip + 8, src, 16)
    else:
        memcpy(ip + 8, ip0 + 24, 16)
    memcpy(ip + 24, ip0 + 8, 16)
    icmp = ip + 40
    icmp[0] = 2
    be_store32(icmp + 4, mtu)
    memcpy(icmp + 8, ip0, q)
    sum = csum_partial(ip + 8, 32, 0) + <uint32_t>(8 + q) + PKT_IPPROTO_ICMPV6
    be_store16(icmp + 2, csum_finish(csum_partial(icmp, 8 + q, sum)))
    return n
