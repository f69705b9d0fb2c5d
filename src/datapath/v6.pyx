# datapath/v6: the IPv6 stages, both roles, over the same dp_ctx as IPv4.
#
#   dp_from_pod6        a local pod's IPv6 frame (from dp_from_pod): NDP,
#                       multicast, link-local and cluster destinations are
#                       the kernel's; source check (DROP_SPOOFED); egress map
#                       (src, dst): match here -> SNAT to the IPv6 egress IP;
#                       match elsewhere -> VXLAN (IPv6 inner frame, IPv4
#                       underlay, as Cilium) to the gateway; no gateway ->
#                       DROP_NO_GATEWAY; excluded / no match -> masquerade to
#                       the node's IPv6 address
#   dp_in_vxlan6        an IPv6 inner frame decapsulated by dp_in_vxlan: to a
#                       local pod (a gateway's reply), else the gateway role:
#                       the sender must host the source (its IPv6 pod CIDR)
#                       and a policy must send (src, dst) here
#                       (DROP_POLICY_DENIED), egress IP set
#                       (DROP_NO_EGRESS_IP) -> SNAT out
#   dp_from_underlay6   an IPv6 frame from the underlay (from
#                       dp_from_underlay) to an IPv6 egress / node address:
#                       ICMPv6 errors quoting a translated flow are
#                       translated inside and out (dp_in_icmp_error6), replies
#                       reverse-NATed (dp_in_reverse_nat6), then to the pod,
#                       locally or through the tunnel (IPv6 pod CIDR -> node)
#   (a TCP/IPv6 super-packet is cut into segments by emit.pyx's dp_segment,
#    as an IPv4 one is, only where the kernel has no offload for it:
#    tunnel-bound with the tunnel offload off)
#
# TCP/IPv6 super-packets (SKB_GSO_TCPV6) pass whole as IPv4 ones do: to the
# router after SNAT / masquerade, to a local pod after reverse NAT, and into
# the tunnel through the tunnel offload (dp_gso_tunnel: the kernel vxlan
# device encapsulates and cuts them); a VXLAN super-packet whose inner frame
# is IPv6 (virtio_net_hdr TCPV6 on an IPv4 or IPv6 outer frame) is
# decapsulated whole.  dp_gso_out leaves the TCP checksum field as the IPv6
# pseudo-header sum for CHECKSUM_PARTIAL (csum_start = TCP, offset 16).
#
# IPv6 is off (every IPv6 frame left to the kernel, as before) unless the
# Datapath was given node_ip6.  The NAT table is the IPv4 one: its entries
# are family-tagged with 16-byte addresses (nat.pxd), so IPv6 connections
# take the same 80-byte entries and IPv4 ones do not grow.  Make-before-break
# pins are IPv4-only: with them on, IPv6 connections follow the map.
# Packet-too-big for the tunnel reports the inner MTU, never below 1280
# (the Datapath refuses an underlay MTU under 1280 + VXLAN_OVERHEAD).
#
# VXLAN over an IPv6 underlay (Datapath(underlay6=True), an option): the
# tunnel between nodes runs over their IPv6 addresses (add_node ip6=), for
# IPv4 and IPv6 pods alike (dp_encap, packet/vxlan6.pyx); VXLAN in IPv6 to
# node_ip6 from a node's IPv6 address is decapsulated as over IPv4
# (dp_in_vxlan_from).  The 20 extra bytes of the outer header are taken off
# c.mtu, so every "fits the tunnel" check stays the IPv4 one.

cdef extern from "lpm/lpm_egress.h" nogil:
    int egress_map_lookup6p_in(egress_map *m, const uint8_t *src16, const uint8_t *dst16,
                               uint8_t *egress16, uint64_t *g_hi, uint64_t *g_lo, uint32_t *policy)


cdef extern from "datapath/dp6.h" nogil:
    uint32_t dp_lpm6(lpm_trie *t, const uint8_t *a16)
    int dp_eq16(const uint8_t *a, const uint8_t *b)
    int dp_zero16(const uint8_t *a)

cdef enum:
    DP_IPV6_MIN_MTU = 1280


cdef inline void dp_tuple6(nat_tuple *k, uint8_t proto, uint8_t flags, const uint8_t *src, uint16_t sport,
                           const uint8_t *dst, uint16_t dport) noexcept nogil:
    k.family = 6
    k.proto = proto
    k.tcp_flags = flags
    k._pad = 0
    k.sport = sport
    k.dport = dport
    _dp_memcpy(k.src, src, 16)
    _dp_memcpy(k.dst, dst, 16)


cdef inline int dp_policy_lookup6(dp_ctx *c, const uint8_t *src, const uint8_t *dst, uint8_t *egress,
                                  uint32_t *gw, int64_t length) noexcept nogil:
    """The egress map's IPv6 entry for (src, dst): an EGRESS_* status, the
    egress IP (16 bytes) and the gateway's IPv4 underlay address (host
    order; 0 when the entry's gateway is not an IPv4-mapped address); a
    matched (or no-gateway) entry's policy becomes the frame's, as
    dp_policy_lookup4 does."""
    cdef uint64_t g_hi = 0, g_lo = 0
    cdef uint32_t pol = 0
    cdef int status = egress_map_lookup6p_in(c.em_c, src, dst, egress, &g_hi, &g_lo, &pol)
    gw[0] = 0
    if status == EGRESS_MATCH and g_hi == 0 and (g_lo >> 32) == 0xffff:
        gw[0] = <uint32_t>(g_lo & 0xffffffffu)
    if pol != 0 and (status == EGRESS_MATCH or status == EGRESS_NO_GATEWAY):
        c.cur_pol = pol
        c.cur_pol_dir = DP_POL_EGRESS if gw[0] == c.node_ip else DP_POL_REDIRECT
        c.cur_pol_len = length
    return status


cdef inline int dp_too_big6(dp_ctx *c, const uint8_t *f, PktInfo *pi, int port, int64_t mtu,
                            dp_out *out) noexcept nogil:
    """Packet-too-big for the tunnel, reporting at least the IPv6 minimum MTU."""
    if mtu < DP_IPV6_MIN_MTU:
        mtu = DP_IPV6_MIN_MTU
    return dp_too_big(c, f, pi, port, <uint32_t>mtu, out)


cdef int dp_from_pod6(dp_ctx *c, uint8_t *f, int64_t length, int in_port, PktInfo *pi, uint64_t now,
                      dp_out *out) noexcept nogil:
    cdef dp_port *p = &c.ports[in_port]
    cdef uint8_t *ip = f + pi.l3_off
    cdef uint8_t egress[16]
    cdef uint32_t gw = 0, node
    cdef int status, rc
    if not c.has_ip6:
        return dp_ret(VERDICT_PASS, 0)
    # multicast (NDP, MLD), link-local and unspecified destinations, NDP to
    # a unicast address (NUD): the kernel's
    if ip[24] == 0xff or (ip[24] == 0xfe and (ip[25] & 0xc0) == 0x80) or dp_zero16(ip + 24):
        return dp_ret(VERDICT_PASS, 0)
    if pi.proto == PKT_IPPROTO_ICMPV6 and pi.l4_off >= 0 and 133 <= pi.icmp_type <= 137:
        return dp_ret(VERDICT_PASS, 0)
    # inside the cluster (pods, nodes): the kernel routes it
    if (dp_lpm6(c.pod_nodes6_c, ip + 24) != LPM_NONE or dp_lpm6(c.node_ips6_c, ip + 24) != LPM_NONE
            or dp_eq16(ip + 24, c.node_ip6)):
        return dp_ret(VERDICT_PASS, 0)
    if not p.has_ip6 or not dp_eq16(ip + 8, p.pod_ip6):
        return dp_ret(VERDICT_DROP, DROP_SPOOFED)
    dp_podmac_learn(&c.pod_macs[in_port], f + 6)
    status = dp_policy_lookup6(c, ip + 8, ip + 24, egress, &gw, length)
    if status == EGRESS_NO_GATEWAY:
        return dp_ret(VERDICT_DROP, DROP_NO_GATEWAY)
    if status != EGRESS_MATCH:
        return dp_egress6(c, f, length, pi, c.node_ip6, False, now, out)
    if gw == c.node_ip:
        if dp_zero16(egress):
            return dp_ret(VERDICT_DROP, DROP_NO_EGRESS_IP)
        return dp_egress6(c, f, length, pi, egress, True, now, out)
    node = dp_lpm4(c.node_ips_c, gw) if gw != 0 else LPM_NONE
    if node == LPM_NONE or not c.nodes[node].has_mac:
        return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
    if c.gso:
        return dp_gso_tunnel(c, f, length, pi, node, in_port, out)   # whole, or DP_SEGMENT
    rc = vxlan_check_mtu(pi, length, &c.nodes[node].tmpl)
    if rc == DROP_FRAG_NEEDED:
        return dp_too_big6(c, f, pi, in_port, vxlan_inner_mtu(c.mtu, pi), out)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    return dp_encap(c, f, length, pi, node, out)


cdef int dp_egress6(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, const uint8_t *egress_ip,
                    bint policy, uint64_t now, dp_out *out) noexcept nogil:
    """SNAT to egress_ip (the node's IPv6 address: masquerade) and out to the router."""
    cdef uint8_t *ip = f + pi.l3_off
    cdef int ext, rc
    cdef nat_tuple k, o
    if c.has_ip6 and dp_eq16(egress_ip, c.node_ip6):
        ext = c.node_ext6
    else:
        ext = nat_ext_find(c.nat_c, 6, egress_ip)
    if ext < 0:
        return dp_ret(VERDICT_DROP, DROP_NO_EGRESS_IP)
    if not c.has_router6 and not c.has_router:
        return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
    if not pi.has_ports:
        return dp_ret(VERDICT_DROP, DROP_FRAGMENT if pi.frag == PKT_FRAG_LATER else DROP_UNSUPPORTED)
    rc = pkt_ttl_decrement(f, pi)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    dp_tuple6(&k, pi.proto, pi.tcp_flags, ip + 8, pi.sport, ip + 24, pi.dport)
    rc = nat_translate_out_pol(c.nat_c, &k, <uint32_t>ext, c.cur_pol if policy else 0, now, &o,
                               <uint32_t>(pi.l3_end - pi.l3_off))
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    rc = pkt_nat6(f, pi, PKT_NAT_SRC, o.src, o.sport)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    if c.has_router6:
        return dp_to_router(c, f, length, pi, c.router6_mac, policy, out)
    return dp_to_router(c, f, length, pi, c.router_mac, policy, out)


cdef int dp_to_pod_or_node6(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi,
                            dp_out *out) noexcept nogil:
    """Deliver an already translated IPv6 packet to its pod: the local veth,
    or VXLAN to the pod's node."""
    cdef const uint8_t *dst = f + pi.l3_off + 24
    cdef uint32_t port = dp_lpm6(c.local_pods6_c, dst)
    return dp_deliver(c, f, length, pi, port, dp_lpm6(c.pod_nodes6_c, dst) if port == LPM_NONE else LPM_NONE,
                      out)


cdef int dp_in_vxlan6(dp_ctx *c, uint8_t *g, int64_t glen, PktInfo *ipi, uint32_t sender, uint64_t now,
                      dp_out *out) noexcept nogil:
    """An IPv6 inner frame from cluster node `sender` (dp_in_vxlan checked
    the sender and counted the decap)."""
    cdef uint8_t *ip = g + ipi.l3_off
    cdef uint8_t egress[16]
    cdef uint32_t src_node, gw = 0
    cdef int status
    # a super-packet (c.gso): dp_gso_type_ok saw TCPV6 for this inner frame
    if dp_lpm6(c.local_pods6_c, ip + 24) != LPM_NONE:
        # a gateway's reply (or a relayed ICMPv6 error) for a pod here
        return dp_to_pod_or_node6(c, g, glen, ipi, out)
    src_node = dp_lpm6(c.pod_nodes6_c, ip + 8)
    if src_node == LPM_NONE or src_node != sender:
        return dp_ret(VERDICT_DROP, DROP_POLICY_DENIED)
    status = dp_policy_lookup6(c, ip + 8, ip + 24, egress, &gw, glen)
    if status != EGRESS_MATCH or gw != c.node_ip:
        return dp_ret(VERDICT_DROP, DROP_POLICY_DENIED)
    if dp_zero16(egress):
        return dp_ret(VERDICT_DROP, DROP_NO_EGRESS_IP)
    return dp_egress6(c, g, glen, ipi, egress, True, now, out)


cdef int dp_in_icmp_error6(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, uint64_t now,
                           dp_out *out) noexcept nogil:
    """An ICMPv6 error to an egress / node address: the quote is our
    translated packet, looked up as a reply; translated back inside and out
    (the ICMPv6 checksum covers the pseudo-header) and sent to the pod."""
    cdef const uint8_t *q
    cdef nat_tuple k, o
    cdef int rc
    if not pi.in_has_ports:
        return dp_ret(VERDICT_PASS, 0)
    q = f + pi.in_l3_off
    dp_tuple6(&k, pi.in_proto, 0, q + 24, pi.in_dport, q + 8, pi.in_sport)
    if nat_peek_in(c.nat_c, &k, now, &o):
        return dp_ret(VERDICT_PASS, 0)
    rc = pkt_nat6(f, pi, PKT_NAT_DST, o.dst, o.dport)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    c.st.icmp_errors += 1
    return dp_to_pod_or_node6(c, f, length, pi, out)


cdef int dp_in_reverse_nat6(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, uint64_t now,
                            dp_out *out) noexcept nogil:
    """A reply to an IPv6 egress / node address in the NAT port range (or an
    echo reply): reverse NAT (DROP_NO_NAT_ENTRY), then to the pod."""
    cdef uint8_t *ip = f + pi.l3_off
    cdef nat_tuple k, o
    cdef int rc
    cdef uint32_t port, node = LPM_NONE, pol = 0
    if pi.proto == PKT_IPPROTO_ICMPV6:
        if pi.icmp_type != 129 or not pi.has_ports:
            return dp_ret(VERDICT_PASS, 0)      # NDP, echo requests etc.: the kernel's
    elif pi.proto == PKT_IPPROTO_TCP or pi.proto == PKT_IPPROTO_UDP:
        if pi.l4_off < 0 or pi.dport < c.nat_lo or pi.dport > c.nat_hi:
            return dp_ret(VERDICT_PASS, 0)
    else:
        return dp_ret(VERDICT_PASS, 0)
    dp_tuple6(&k, pi.proto, pi.tcp_flags, ip + 8, pi.sport, ip + 24, pi.dport)
    rc = nat_translate_in_pol(c.nat_c, &k, now, &o, <uint32_t>(pi.l3_end - pi.l3_off), &pol)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    if pol != 0:
        c.cur_pol = pol
        c.cur_pol_dir = DP_POL_REPLY
        c.cur_pol_len = length
    # too big for the tunnel back to the pod's node: packet-too-big to the
    # sender now, quoting the packet as it sent it
    port = dp_lpm6(c.local_pods6_c, o.dst)
    if port == LPM_NONE:
        node = dp_lpm6(c.pod_nodes6_c, o.dst)
        if c.gso:
            # checked before the translation, so a packet-too-big quotes what the sender sent
            rc = dp_gso_fit(c, f, pi)
            if not c.tnl_on or rc == 2:
                return dp_ret(DP_SEGMENT, 0)    # each segment comes back here
            if rc == 1:
                return dp_too_big6(c, f, pi, 0, vxlan_inner_mtu(c.mtu, pi), out)
        elif node != LPM_NONE and c.nodes[node].has_mac:
            rc = vxlan_check_mtu(pi, length, &c.nodes[node].tmpl)
            if rc == DROP_FRAG_NEEDED:
                return dp_too_big6(c, f, pi, 0, vxlan_inner_mtu(c.mtu, pi), out)
            if rc:
                return dp_ret(VERDICT_DROP, rc)
    rc = pkt_nat6(f, pi, PKT_NAT_DST, o.dst, o.dport)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    c.st.reverse_nat += 1
    return dp_deliver(c, f, length, pi, port, node, out)


cdef int dp_from_underlay6(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, uint64_t now,
                           dp_out *out) noexcept nogil:
    """Pick the ingress stage of an IPv6 frame from the underlay."""
    cdef uint32_t sender
    if (c.underlay6 and pi.proto == PKT_IPPROTO_UDP and pi.l4_off >= 0 and pi.dport == c.vxlan_port
            and dp_eq16(f + pi.l3_off + 24, c.node_ip6)):
        # VXLAN over the IPv6 underlay, from a cluster node only
        sender = dp_lpm6(c.node_ips6_c, f + pi.l3_off + 8)
        if sender == LPM_NONE:
            return dp_ret(VERDICT_DROP, DROP_NOT_CLUSTER_NODE)
        return dp_in_vxlan_from(c, f, length, sender, now, out)
    if nat_ext_find(c.nat_c, 6, f + pi.l3_off + 24) < 0:
        return dp_ret(VERDICT_PASS, 0)
    if pi.icmp_err:
        return dp_in_icmp_error6(c, f, length, pi, now, out)
    return dp_in_reverse_nat6(c, f, length, pi, now, out)


cdef inline bint dp_gso_type_ok(dp_ctx *c, uint8_t gso_type, const uint8_t *f, int64_t length,
                                int in_port) noexcept nogil:
    """A super-packet dp_handle takes: TCPV4 (1) on an IPv4 frame, TCPV6 (4)
    on an IPv6 one (untagged; the ECN bit aside).  From the underlay, a
    VXLAN frame's gso_type describes its inner frame (the sender's tunnel
    offload): the inner family must match, over either underlay."""
    cdef uint16_t et = be_load16(f + 12)
    cdef int64_t u = 0
    if in_port == 0:
        if et == PKT_ETH_P_IP and length >= 34 and f[23] == PKT_IPPROTO_UDP:
            u = 14 + ((f[14] & 0x0f) << 2)
        elif et == PKT_ETH_P_IPV6 and length >= 84 and f[20] == PKT_IPPROTO_UDP:
            u = 54
        if u and length >= u + 30 and be_load16(f + u + 2) == c.vxlan_port:
            et = be_load16(f + u + 28)       # UDP 8 + VXLAN 8 + inner Ethernet type
    if (gso_type & 0x7f) == 1:
        return et != PKT_ETH_P_IPV6
    return (gso_type & 0x7f) == 4 and et == PKT_ETH_P_IPV6


cdef inline bint dp_is_udp(const uint8_t *f, int64_t length) noexcept nogil:
    """An untagged IPv4 or IPv6 frame whose IP header says UDP (the
    checksum a CHECKSUM_PARTIAL sender left: 0 is sent as 0xffff)."""
    cdef uint16_t et = be_load16(f + 12)
    if et == PKT_ETH_P_IP:
        return length > 23 and f[23] == PKT_IPPROTO_UDP
    return et == PKT_ETH_P_IPV6 and length > 20 and f[20] == PKT_IPPROTO_UDP
