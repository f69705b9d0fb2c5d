# datapath/ingress: frames from the underlay (port 0), in three stages over
# the one context struct, chosen by dp_from_underlay:
#   dp_in_vxlan        VXLAN to this node: decapsulate; a reply for a local
#                      pod is delivered, else the gateway role (SNAT out;
#                      with make-before-break, also a connection the map no
#                      longer sends here that has a live NAT entry)
#   dp_in_icmp_error   an ICMP error quoting a translated flow (RFC 5508)
#   dp_in_reverse_nat  a reply to an egress / node IP: reverse NAT, then to
#                      the pod (locally or through the tunnel)
# Anything else is not ours: VERDICT_PASS (the kernel has its own copy).

cdef int dp_in_vxlan(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, uint64_t now,
                     dp_out *out) noexcept nogil:
    """VXLAN from a cluster node (else DROP_NOT_CLUSTER_NODE), decapsulated."""
    cdef uint32_t sender = dp_lpm4(c.node_ips_c, pi.src4)
    if sender == LPM_NONE:
        return dp_ret(VERDICT_DROP, DROP_NOT_CLUSTER_NODE)
    return dp_in_vxlan_from(c, f, length, sender, now, out)


cdef int dp_in_vxlan_from(dp_ctx *c, uint8_t *f, int64_t length, uint32_t sender, uint64_t now,
                          dp_out *out) noexcept nogil:
    """VXLAN from cluster node `sender` (over either underlay), decapsulated."""
    cdef PktInfo ipi
    cdef VxlanDecapInfo d
    cdef int rc, status
    cdef uint32_t src_node, egress = 0, gw = 0, port
    cdef uint8_t *g
    cdef int64_t glen
    rc = vxlan_decap_frame(f, length, c.vxlan_port, c.vni, &d)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    g = f + d.inner_off
    glen = d.inner_len
    rc = pkt_parse(g, glen, &ipi)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    if ipi.ip_version != 4:
        c.st.decap += 1
        return dp_in_vxlan6(c, g, glen, &ipi, sender, now, out)
    c.st.decap += 1
    port = dp_lpm4(c.local_pods_c, ipi.dst4)
    if port != LPM_NONE:
        # a gateway's reply (or a relayed ICMP error) for a pod here
        return dp_to_pod_or_node(c, g, glen, &ipi, out)
    # gateway role: the sender must host the inner source, and a
    # policy must send (source, destination) to this node
    src_node = dp_lpm4(c.pod_nodes_c, ipi.src4)
    if src_node == LPM_NONE or src_node != sender:
        return dp_ret(VERDICT_DROP, DROP_POLICY_DENIED)
    status = dp_policy_lookup4(c, ipi.src4, ipi.dst4, &egress, &gw, glen)
    if status != EGRESS_MATCH or gw != c.node_ip:
        # make-before-break: a connection translated here already keeps
        # flowing (to its own entry's egress IP); a new one needs the map
        egress = dp_nat_kept4(c, &ipi, now) if c.pins != NULL else 0
        if egress == 0:
            return dp_ret(VERDICT_DROP, DROP_POLICY_DENIED)
        c.pins.kept_nat += 1
        return dp_egress(c, g, glen, &ipi, egress, True, now, out)
    if egress == 0:
        return dp_ret(VERDICT_DROP, DROP_NO_EGRESS_IP)
    return dp_egress(c, g, glen, &ipi, egress, True, now, out)


cdef int dp_in_icmp_error(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, uint64_t now,
                          dp_out *out) noexcept nogil:
    """An ICMP error to an egress / node IP: the quote is our translated
    packet, looked up as a reply; translated back and sent to the pod."""
    cdef nat_tuple k, o
    cdef int rc
    if not pi.in_has_ports:
        return dp_ret(VERDICT_PASS, 0)
    dp_tuple4(&k, pi.in_proto, 0, pi.in_dst4, pi.in_dport, pi.in_src4, pi.in_sport)
    if nat_peek_in(c.nat_c, &k, now, &o):
        return dp_ret(VERDICT_PASS, 0)
    rc = pkt_nat4(f, pi, PKT_NAT_DST, be_load32(o.dst), o.dport)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    c.st.icmp_errors += 1
    return dp_to_pod_or_node(c, f, length, pi, out)


cdef int dp_in_reverse_nat(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, uint64_t now,
                           dp_out *out) noexcept nogil:
    """A reply to an egress / node IP in the NAT port range (or an echo
    reply): reverse NAT (DROP_NO_NAT_ENTRY), then to the pod."""
    cdef nat_tuple k, o
    cdef int rc
    cdef uint32_t node, pol = 0
    if pi.proto == PKT_IPPROTO_ICMP:
        if pi.icmp_type != 0 or not pi.has_ports:
            return dp_ret(VERDICT_PASS, 0)      # echo requests etc.: the kernel's
    elif pi.proto == PKT_IPPROTO_TCP or pi.proto == PKT_IPPROTO_UDP:
        if pi.l4_off < 0 or pi.dport < c.nat_lo or pi.dport > c.nat_hi:
            return dp_ret(VERDICT_PASS, 0)
    else:
        return dp_ret(VERDICT_PASS, 0)
    dp_tuple4(&k, pi.proto, pi.tcp_flags, pi.src4, pi.sport, pi.dst4, pi.dport)
    rc = nat_translate_in_pol(c.nat_c, &k, now, &o, <uint32_t>(pi.l3_end - pi.l3_off), &pol)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    if pol != 0:
        c.cur_pol = pol                     # the connection's policy: the reply counts to it
        c.cur_pol_dir = DP_POL_REPLY
        c.cur_pol_len = length
    # too big for the tunnel back to the pod's node: tell the sender now,
    # quoting the packet as it sent it (from the address it talked to)
    if dp_lpm4(c.local_pods_c, be_load32(o.dst)) == LPM_NONE:
        if c.gso:
            # checked before the translation, so a frag-needed quotes what the sender sent
            rc = dp_gso_fit(c, f, pi)
            if not c.tnl_on or rc == 2:
                return dp_ret(DP_SEGMENT, 0)
            if rc == 1:
                return dp_too_big(c, f, pi, 0, vxlan_inner_mtu(c.mtu, pi), out)
        else:
            node = dp_lpm4(c.pod_nodes_c, be_load32(o.dst))
            if node != LPM_NONE and c.nodes[node].has_mac:
                rc = vxlan_check_mtu(pi, length, &c.nodes[node].tmpl)
                if rc == DROP_FRAG_NEEDED:
                    return dp_too_big(c, f, pi, 0, vxlan_inner_mtu(c.mtu, pi), out)
                if rc:
                    return dp_ret(VERDICT_DROP, rc)
    rc = pkt_nat4(f, pi, PKT_NAT_DST, be_load32(o.dst), o.dport)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    c.st.reverse_nat += 1
    return dp_to_pod_or_node(c, f, length, pi, out)


cdef int dp_from_underlay(dp_ctx *c, uint8_t *f, int64_t length, uint64_t now,
                          dp_out *out) noexcept nogil:
    """Pick the ingress stage of a frame from the underlay."""
    cdef PktInfo pi
    cdef uint8_t a16[16]
    if pkt_parse(f, length, &pi):
        return dp_ret(VERDICT_PASS, 0)
    if pi.ip_version != 4:
        return dp_from_underlay6(c, f, length, &pi, now, out)
    if (pi.dst4 == c.node_ip and pi.proto == PKT_IPPROTO_UDP and pi.l4_off >= 0
            and pi.dport == c.vxlan_port):
        return dp_in_vxlan(c, f, length, &pi, now, out)
    _dp_memset(a16, 0, 16)
    be_store32(a16, pi.dst4)
    if nat_ext_find(c.nat_c, 4, a16) < 0:
        return dp_ret(VERDICT_PASS, 0)
    if pi.icmp_err:
        return dp_in_icmp_error(c, f, length, &pi, now, out)
    return dp_in_reverse_nat(c, f, length, &pi, now, out)
