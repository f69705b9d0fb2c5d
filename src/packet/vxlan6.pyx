# --------------------------------------------------------------------------
# VXLAN (RFC 7348) over an IPv6 underlay
#
# Outer header as written: Ethernet 0..13, IPv6 14..53 (hop limit from the
# template, flow label 0), UDP 54..61 (checksum over the IPv6 pseudo-header,
# UDP, VXLAN and the inner frame: mandatory over IPv6, and what a Linux
# vxlan device checks by default), VXLAN 62..69.  Decap is
# vxlan_decap_frame's (its pkt_parse path takes an IPv6 underlay).

cdef void vxlan6_tmpl_init(Vxlan6Tmpl *t, const uint8_t *src_mac, const uint8_t *dst_mac,
                           const uint8_t *src6, const uint8_t *dst6, uint32_t vni, uint16_t port,
                           uint8_t hlim, uint32_t mtu, uint16_t port_min, uint16_t port_max) noexcept nogil:
    cdef uint8_t *h = t.hdr
    memset(t, 0, sizeof(Vxlan6Tmpl))
    memcpy(h, dst_mac, 6)
    memcpy(h + 6, src_mac, 6)
    be_store16(h + 12, PKT_ETH_P_IPV6)
    h[14] = 0x60
    h[20] = PKT_IPPROTO_UDP
    h[21] = hlim
    memcpy(h + 22, src6, 16)
    memcpy(h + 38, dst6, 16)
    be_store16(h + 56, port)
    h[62] = VXLAN_FLAG_I
    be_store32(h + 66, (vni & 0xffffff) << 8)
    t.sum = csum_partial(h + 22, 32, PKT_IPPROTO_UDP)
    t.port_min = port_min
    t.port_max = port_max
    t.mtu = mtu


cdef int64_t vxlan6_encap_frame(uint8_t *frame, int64_t length, const Vxlan6Tmpl *t,
                                uint16_t sport) noexcept nogil:
    """Write the outer header at frame - VXLAN6_OVERHEAD (the caller
    guarantees the headroom); returns the outer frame length."""
    cdef uint8_t *o = frame - VXLAN6_OVERHEAD
    cdef uint16_t ulen = <uint16_t>(length + 16)
    cdef uint16_t c
    memcpy(o, t.hdr, VXLAN6_OVERHEAD)
    be_store16(o + 18, ulen)                    # payload length: UDP and what it carries
    be_store16(o + 54, sport)
    be_store16(o + 58, ulen)
    c = csum_finish(csum_partial(o + 54, <size_t>ulen, t.sum + ulen))
    be_store16(o + 60, c if c != 0 else 0xffff)
    return length + VXLAN6_OVERHEAD
