# --------------------------------------------------------------------------
# VXLAN (RFC 7348)
#
#    0                   1                   2                   3
#    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
#   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#   |R|R|R|R|I|R|R|R|            Reserved                           |
#   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#   |                VXLAN Network Identifier (VNI) |   Reserved    |
#   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#
# Outer header as written: Ethernet 0..13, IPv4 14..33 (DF set, so the IP ID
# may stay 0 per RFC 6864; TTL from the template), UDP 34..41 (checksum 0 as
# RFC 7348 allows over IPv4), VXLAN 42..49.

cdef void vxlan_tmpl_init(VxlanTmpl *t, const uint8_t *src_mac, const uint8_t *dst_mac,
                          uint32_t src4, uint32_t dst4, uint32_t vni, uint16_t port,
                          uint8_t ttl, uint32_t mtu, uint16_t port_min, uint16_t port_max) noexcept nogil:
    cdef uint8_t *h = t.hdr
    memset(t, 0, sizeof(VxlanTmpl))
    memcpy(h, dst_mac, 6)
    memcpy(h + 6, src_mac, 6)
    be_store16(h + 12, PKT_ETH_P_IP)
    h[14] = 0x45
    be_store16(h + 20, 0x4000)                  # DF
    h[22] = ttl
    h[23] = PKT_IPPROTO_UDP
    be_store32(h + 26, src4)
    be_store32(h + 30, dst4)
    # checksum of the header with total length 0; encap adds the length
    be_store16(h + 24, csum_finish(csum_partial(h + 14, 20, 0)))
    be_store16(h + 36, port)
    h[42] = VXLAN_FLAG_I
    be_store32(h + 46, (vni & 0xffffff) << 8)
    t.port_min = port_min
    t.port_max = port_max
    t.mtu = mtu
    t.src4 = src4


cdef uint16_t vxlan_src_port(const uint8_t *buf, const PktInfo *pi, const VxlanTmpl *t) noexcept nogil:
    """Outer UDP source port from the inner flow, so underlay ECMP spreads
    flows and keeps each on one path (the inner 5-tuple; MACs for non-IP).
    Two independent 64-bit multiplies (Fibonacci / murmur constants) folded
    to 32 bits: short dependency chain, good spread over the port range."""
    cdef uint32_t a = 0, b = 0
    cdef uint64_t x
    cdef const uint8_t *ip
    cdef int i
    if pi.ip_version == 4:
        a = pi.src4
        b = pi.dst4
    elif pi.ip_version == 6:
        ip = buf + pi.l3_off
        for i in range(4):
            a ^= be_load32(ip + 8 + 4 * i)
            b ^= be_load32(ip + 24 + 4 * i)
    else:
        a = be_load32(buf) ^ be_load16(buf + 4)
        b = be_load32(buf + 6) ^ be_load16(buf + 10)
    x = (((<uint64_t>a << 32) | b) * 0x9E3779B97F4A7C15ULL) ^ \
        ((((<uint64_t>pi.sport << 24) | (<uint64_t>pi.dport << 8) | pi.proto) + 1) * 0xC2B2AE3D27D4EB4FULL)
    x ^= x >> 29
    return <uint16_t>(t.port_min + (((x >> 32) * (<uint32_t>t.port_max - t.port_min + 1)) >> 32))


cdef inline int64_t vxlan_inner_mtu(uint32_t mtu, const PktInfo *pi) noexcept nogil:
    """The largest inner IP packet that fits an underlay of `mtu` once
    encapsulated: the outer IPv4 + UDP + VXLAN headers take 36 bytes and the
    inner Ethernet header (l3_off) travels inside."""
    return <int64_t>mtu - 36 - pi.l3_off


cdef int vxlan_check_mtu(const PktInfo *pi, int64_t length, const VxlanTmpl *t) noexcept nogil:
    if length + 36 <= t.mtu:
        return 0
    if pi.ip_version == 6 or (pi.ip_version == 4 and pi.df):
        return DROP_FRAG_NEEDED
    return DROP_UNSUPPORTED


cdef int64_t vxlan_encap_frame(uint8_t *frame, int64_t length, const VxlanTmpl *t, uint16_t sport) noexcept nogil:
    cdef uint8_t *o = frame - VXLAN_OVERHEAD
    cdef uint16_t tot = <uint16_t>(length + 36)
    memcpy(o, t.hdr, VXLAN_OVERHEAD)
    be_store16(o + 16, tot)
    csum_apply(o + 24, csum_delta16(0, tot))
    be_store16(o + 34, sport)
    be_store16(o + 38, <uint16_t>(length + 16))
    return length + VXLAN_OVERHEAD


cdef int vxlan_decap_frame(const uint8_t *buf, int64_t length, uint16_t port, int64_t vni,
                           VxlanDecapInfo *out) noexcept nogil:
    cdef PktInfo pi
    cdef int rc
    cdef int32_t l4, ulen, tot
    cdef const uint8_t *vx
    cdef uint32_t v
    if (length >= VXLAN_OVERHEAD + PKT_ETH_LEN and length <= PKT_MAX_FRAME and
            be_load16(buf + 12) == PKT_ETH_P_IP and buf[14] == 0x45 and
            buf[23] == PKT_IPPROTO_UDP and (be_load16(buf + 20) & 0x3fff) == 0):
        # fast path, the common underlay: untagged, unfragmented IPv4/UDP
        # without options.  Same checks, same verdicts as pkt_parse below.
        tot = be_load16(buf + 16)
        if tot < 20 or PKT_ETH_LEN + tot > length:
            return DROP_MALFORMED
        if csum_fold(csum_ipv4_hdr(buf + 14, 20)) != 0xffff:
            return DROP_CSUM
        l4 = PKT_ETH_LEN + 20
        if tot < 28:
            return DROP_MALFORMED
        ulen = be_load16(buf + l4 + 4)
        if ulen < 8 or 20 + ulen > tot:
            return DROP_MALFORMED
        if be_load16(buf + l4 + 2) != port:
            return DROP_BAD_VXLAN
        out.outer_src4 = be_load32(buf + 26)
        out.outer_dst4 = be_load32(buf + 30)
        out.outer_sport = be_load16(buf + l4)
    else:
        rc = pkt_parse(buf, length, &pi)
        if rc:
            return rc
        if pi.proto != PKT_IPPROTO_UDP:
            return DROP_UNSUPPORTED
        if pi.frag != PKT_FRAG_NONE:
            return DROP_FRAGMENT                 # no reassembly of the underlay
        if pi.dport != port:
            return DROP_BAD_VXLAN
        l4 = pi.l4_off
        ulen = be_load16(buf + l4 + 4)          # parse checked l4 + ulen <= l3_end
        out.outer_src4 = pi.src4
        out.outer_dst4 = pi.dst4
        out.outer_sport = pi.sport
    if ulen < 8 + VXLAN_HDR_LEN:
        return DROP_MALFORMED
    vx = buf + l4 + 8
    # The I flag must be set; like Linux (and so Cilium) reserved bits must be
    # zero (RFC 7348 says "ignore": a deliberate, stricter choice).
    if vx[0] != VXLAN_FLAG_I or vx[1] or vx[2] or vx[3] or vx[7]:
        return DROP_BAD_VXLAN
    v = be_load32(vx + 4) >> 8
    if vni >= 0 and v != vni:
        return DROP_BAD_VXLAN
    if ulen < 8 + VXLAN_HDR_LEN + PKT_ETH_LEN:
        return DROP_MALFORMED
    out.inner_off = l4 + 16
    out.inner_len = ulen - 16
    out.vni = v
    return 0
