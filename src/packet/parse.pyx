# packet: everything the datapath does to one frame, in place.
#
#   pkt_parse          Ethernet (+802.1Q) / IPv4 (options) / IPv6 (extension
#                      headers) / TCP / UDP / ICMP / ICMPv6, ICMP error quotes
#   pkt_nat4/6         SNAT and reverse SNAT with RFC 1624 checksum updates,
#                      ICMP echo ids, ICMP errors inside and out (RFC 5508)
#   pkt_ttl_decrement  as a router does
#   pkt_icmp_too_big   ICMP fragmentation-needed / ICMPv6 packet-too-big
#   vxlan_*            RFC 7348 encap from a template, decap with validation
#
# Fragments: the first fragment carries the L4 header and is parsed and
# translated like a whole packet (its L4 checksum covers the whole datagram,
# and an incremental update stays right).  Later fragments carry no ports:
# pkt_parse accepts them (l4_off = -1, frag = PKT_FRAG_LATER) and pkt_nat*
# refuses them with DROP_FRAGMENT.  No reassembly and no fragment tracking
# (Cilium's optional IPv4 fragment map) yet.
#
# All functions here are nogil C over (pointer, length); the Python surface at
# the end of the file copies its input, calls them, and raises on a drop.
from libc.stdint cimport uint8_t, uint16_t, int32_t, int64_t
from libc.string cimport memset


# --------------------------------------------------------------------------
# Parsing

cdef inline bint _pkt_icmp_is_error(uint8_t version, uint8_t icmp_type) noexcept nogil:
    if version == 4:
        return icmp_type == 3 or icmp_type == 11 or icmp_type == 12
    return icmp_type >= 1 and icmp_type <= 4


cdef inline int _pkt_echo_side(uint8_t version, uint8_t icmp_type) noexcept nogil:
    """PKT_NAT_SRC for an echo request (the id acts as source port), PKT_NAT_DST
    for an echo reply, -1 for anything else."""
    if version == 4:
        if icmp_type == 8:
            return PKT_NAT_SRC
        if icmp_type == 0:
            return PKT_NAT_DST
    else:
        if icmp_type == 128:
            return PKT_NAT_SRC
        if icmp_type == 129:
            return PKT_NAT_DST
    return -1


cdef int _pkt_ip6_ext(const uint8_t *buf, int32_t off, int32_t end, uint8_t *nh,
                      int32_t *l4, uint8_t *frag) noexcept nogil:
    """Walk IPv6 extension headers from `off` (next header nh[0]) up to `end`.
    Sets nh[0] to the upper-layer protocol, l4[0] to its offset (-1 behind a
    later fragment) and frag[0]."""
    cdef int _hop
    cdef uint8_t h = nh[0]
    cdef int32_t hl
    cdef uint16_t fo
    frag[0] = PKT_FRAG_NONE
    for _hop in range(8):
        if h == 0 or h == 43 or h == 60:       # hop-by-hop, routing, destination
            if off + 8 > end:
                return DROP_MALFORMED
            hl = (<int32_t>buf[off + 1] + 1) * 8
        elif h == 44:                           # fragment
            if off + 8 > end:
                return DROP_MALFORMED
            hl = 8
            fo = be_load16(buf + off + 2)
            if fo & 0xfff8:
                frag[0] = PKT_FRAG_LATER
                nh[0] = buf[off]
                l4[0] = -1
                return 0
            if fo & 1:
                frag[0] = PKT_FRAG_FIRST
        elif h == 51:                           # authentication header
            if off + 8 > end:
                return DROP_MALFORMED
            hl = (<int32_t>buf[off + 1] + 2) * 4
        else:
            nh[0] = h
            l4[0] = off
            return 0
        if off + hl > end:
            return DROP_MALFORMED
        h = buf[off]
        off += hl
    return DROP_UNSUPPORTED                     # absurdly long header chain


cdef int _pkt_parse_quote(const uint8_t *buf, int32_t off, int32_t end, PktInfo *pi) noexcept nogil:
    """The packet quoted by an ICMP error: its IP header and >= 8 bytes of L4
    (RFC 792 / RFC 4443), possibly truncated beyond that."""
    cdef int32_t ihl, l4 = -1
    cdef uint8_t nh, frag, p
    cdef int rc, side
    pi.in_l3_off = off
    pi.in_end = end
    if pi.ip_version == 4:
        if off + 20 > end or (buf[off] >> 4) != 4:
            return DROP_MALFORMED
        ihl = (buf[off] & 0xf) * 4
        if ihl < 20 or off + ihl > end:
            return DROP_MALFORMED
        pi.in_proto = buf[off + 9]
        pi.in_src4 = be_load32(buf + off + 12)
        pi.in_dst4 = be_load32(buf + off + 16)
        if (be_load16(buf + off + 6) & 0x1fff) == 0:
            l4 = off + ihl
    else:
        if off + 40 > end or (buf[off] >> 4) != 6:
            return DROP_MALFORMED
        nh = buf[off + 6]
        rc = _pkt_ip6_ext(buf, off + 40, end, &nh, &l4, &frag)
        if rc:
            return rc
        pi.in_proto = nh
    pi.icmp_err = 1
    if l4 < 0:
        return 0                                # quoted a later fragment: no ports
    if l4 + 8 > end:
        return DROP_MALFORMED
    pi.in_l4_off = l4
    p = pi.in_proto
    if p == PKT_IPPROTO_TCP or p == PKT_IPPROTO_UDP:
        pi.in_sport = be_load16(buf + l4)
        pi.in_dport = be_load16(buf + l4 + 2)
        pi.in_has_ports = 1
    elif (p == PKT_IPPROTO_ICMP and pi.ip_version == 4) or \
         (p == PKT_IPPROTO_ICMPV6 and pi.ip_version == 6):
        side = _pkt_echo_side(pi.ip_version, buf[l4])
        if side == PKT_NAT_SRC:
            pi.in_sport = be_load16(buf + l4 + 4)
            pi.in_has_ports = 1
        elif side == PKT_NAT_DST:
            pi.in_dport = be_load16(buf + l4 + 4)
            pi.in_has_ports = 1
    return 0


cdef int _pkt_parse_l4(const uint8_t *buf, int32_t end, PktInfo *pi) noexcept nogil:
    cdef int32_t l4 = pi.l4_off, doff, ulen
    cdef uint8_t p = pi.proto, t
    cdef int side
    if p == PKT_IPPROTO_TCP:
        if l4 + 20 > end:
            return DROP_MALFORMED
        doff = (buf[l4 + 12] >> 4) * 4
        if doff < 20 or l4 + doff > end:
            return DROP_MALFORMED
        pi.sport = be_load16(buf + l4)
        pi.dport = be_load16(buf + l4 + 2)
        pi.tcp_flags = buf[l4 + 13]
        pi.has_ports = 1
    elif p == PKT_IPPROTO_UDP:
        if l4 + 8 > end:
            return DROP_MALFORMED
        ulen = be_load16(buf + l4 + 4)
        if pi.frag == PKT_FRAG_NONE and (ulen < 8 or l4 + ulen > end):
            return DROP_MALFORMED
        pi.sport = be_load16(buf + l4)
        pi.dport = be_load16(buf + l4 + 2)
        pi.has_ports = 1
    elif (p == PKT_IPPROTO_ICMP and pi.ip_version == 4) or \
         (p == PKT_IPPROTO_ICMPV6 and pi.ip_version == 6):
        if l4 + 8 > end:
            return DROP_MALFORMED
        t = buf[l4]
        pi.icmp_type = t
        pi.icmp_code = buf[l4 + 1]
        side = _pkt_echo_side(pi.ip_version, t)
        if side == PKT_NAT_SRC:
            pi.sport = be_load16(buf + l4 + 4)
            pi.has_ports = 1
        elif side == PKT_NAT_DST:
            pi.dport = be_load16(buf + l4 + 4)
            pi.has_ports = 1
        elif _pkt_icmp_is_error(pi.ip_version, t):
            return _pkt_parse_quote(buf, l4 + 8, end, pi)
    return 0


cdef int pkt_parse(const uint8_t *buf, int64_t length, PktInfo *pi) noexcept nogil:
    cdef int32_t l3, l4 = -1, end, ihl, tot
    cdef uint16_t et, fo
    cdef uint8_t nh, frag
    cdef int rc
    memset(pi, 0, sizeof(PktInfo))
    pi.l4_off = -1
    pi.in_l3_off = -1
    pi.in_l4_off = -1
    if length < PKT_ETH_LEN or length > PKT_MAX_FRAME:
        return DROP_MALFORMED
    l3 = PKT_ETH_LEN
    et = be_load16(buf + 12)
    if et == PKT_ETH_P_8021Q or et == PKT_ETH_P_8021AD:
        if length < PKT_ETH_LEN + 4:
            return DROP_MALFORMED
        pi.has_vlan = 1
        pi.vlan_tci = be_load16(buf + 14)
        et = be_load16(buf + 16)
        l3 = PKT_ETH_LEN + 4
        if et == PKT_ETH_P_8021Q or et == PKT_ETH_P_8021AD:
            return DROP_UNSUPPORTED             # stacked tags (QinQ)
    pi.ethertype = et
    pi.l3_off = l3
    if et == PKT_ETH_P_IP:
        if length < l3 + 20 or (buf[l3] >> 4) != 4:
            return DROP_MALFORMED
        ihl = (buf[l3] & 0xf) * 4
        tot = be_load16(buf + l3 + 2)
        if ihl < 20 or tot < ihl or l3 + tot > length:
            return DROP_MALFORMED
        if csum_fold(csum_ipv4_hdr(buf + l3, ihl)) != 0xffff:
            return DROP_CSUM
        end = l3 + tot
        pi.ip_version = 4
        pi.ttl = buf[l3 + 8]
        pi.proto = buf[l3 + 9]
        fo = be_load16(buf + l3 + 6)
        pi.df = (fo >> 14) & 1
        if fo & 0x1fff:
            pi.frag = PKT_FRAG_LATER
        elif fo & 0x2000:
            pi.frag = PKT_FRAG_FIRST
        pi.src4 = be_load32(buf + l3 + 12)
        pi.dst4 = be_load32(buf + l3 + 16)
        pi.l3_end = end
        if pi.frag == PKT_FRAG_LATER:
            return 0
        l4 = l3 + ihl
    elif et == PKT_ETH_P_IPV6:
        if length < l3 + 40 or (buf[l3] >> 4) != 6:
            return DROP_MALFORMED
        end = l3 + 40 + <int32_t>be_load16(buf + l3 + 4)
        if end > length:
            return DROP_MALFORMED
        pi.ip_version = 6
        pi.ttl = buf[l3 + 7]
        pi.df = 1
        pi.l3_end = end
        nh = buf[l3 + 6]
        rc = _pkt_ip6_ext(buf, l3 + 40, end, &nh, &l4, &frag)
        if rc:
            return rc
        pi.proto = nh
        pi.frag = frag
        if l4 < 0:
            return 0
    else:
        return DROP_UNSUPPORTED                 # ARP, LLDP, ...: not ours
    pi.l4_off = l4
    return _pkt_parse_l4(buf, end, pi)
