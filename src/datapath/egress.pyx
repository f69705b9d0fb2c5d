# datapath/egress: frames from a local pod (ports 1..63), out of the node:
# SNAT to an egress IP or the node IP, or VXLAN to the gateway node.  With
# make-before-break on (c.pins), a connection keeps the gateway it started
# on (datapath/pins.pyx).

cdef int dp_from_pod(dp_ctx *c, uint8_t *f, int64_t length, int in_port, uint64_t now,
                     dp_out *out) noexcept nogil:
    cdef PktInfo pi
    cdef dp_port *p = &c.ports[in_port]
    cdef int rc, status
    cdef uint32_t egress = 0, gw = 0, node = LPM_NONE, pinned
    cdef gwpin_rec *rec
    rc = pkt_parse(f, length, &pi)
    if rc:
        # ARP and the like are the kernel's (it answers for the pod gateway)
        return dp_ret(VERDICT_PASS, 0) if rc == DROP_UNSUPPORTED else dp_ret(VERDICT_DROP, rc)
    if pi.ip_version != 4:
        return dp_from_pod6(c, f, length, in_port, &pi, now, out)
    # inside the cluster (pods, nodes): the kernel routes it
    if dp_lpm4(c.pod_nodes_c, pi.dst4) != LPM_NONE or dp_lpm4(c.node_ips_c, pi.dst4) != LPM_NONE:
        return dp_ret(VERDICT_PASS, 0)
    if pi.src4 != p.pod_ip:
        return dp_ret(VERDICT_DROP, DROP_SPOOFED)
    dp_podmac_learn(&c.pod_macs[in_port], f + 6)
    status = dp_policy_lookup4(c, pi.src4, pi.dst4, &egress, &gw, length)
    if status == EGRESS_NO_GATEWAY:
        return dp_ret(VERDICT_DROP, DROP_NO_GATEWAY)
    if status != EGRESS_MATCH:
        return dp_egress(c, f, length, &pi, c.node_ip, False, now, out)
    if gw != c.node_ip or c.pins != NULL:
        node = dp_lpm4(c.node_ips_c, gw)
    if c.pins != NULL and node != LPM_NONE and pi.has_ports:
        pinned = dp_pin_pick(c, &pi, node, now, &rec)
        if pinned != node:
            return dp_pod_kept(c, f, length, &pi, rec, pinned, node, egress, gw, in_port, now, out)
    return dp_pod_via(c, f, length, &pi, egress, gw, node, in_port, now, out)


cdef int dp_pod_kept(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, gwpin_rec *rec, uint32_t pinned,
                     uint32_t node, uint32_t egress, uint32_t gw, int in_port, uint64_t now,
                     dp_out *out) noexcept nogil:
    """A connection pinned to another gateway than the map's `node`: on to
    it.  Pinned to this node: its own NAT entry's egress IP (none left: the
    pin moves to the map's choice)."""
    cdef uint32_t kept
    if c.nodes[pinned].ip == c.node_ip:
        kept = dp_nat_kept4(c, pi, now)
        if kept == 0:
            gwpin_repin(c.pins, rec, node)       # its connection is gone here
            return dp_pod_via(c, f, length, pi, egress, gw, node, in_port, now, out)
        c.pins.kept += 1
        return dp_egress(c, f, length, pi, kept, True, now, out)
    c.pins.kept += 1
    return dp_pod_via(c, f, length, pi, 0, c.nodes[pinned].ip, pinned, in_port, now, out)


cdef int dp_pod_via(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, uint32_t egress, uint32_t gw,
                    uint32_t node, int in_port, uint64_t now, dp_out *out) noexcept nogil:
    """Out through gateway `gw` (node index `node`): SNAT to `egress` here
    when it is this node, else VXLAN to it."""
    cdef int rc
    if gw == c.node_ip:
        if egress == 0:
            return dp_ret(VERDICT_DROP, DROP_NO_EGRESS_IP)
        return dp_egress(c, f, length, pi, egress, True, now, out)
    if node == LPM_NONE or not c.nodes[node].has_mac:
        return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
    if c.gso:
        return dp_gso_tunnel(c, f, length, pi, node, in_port, out)
    rc = vxlan_check_mtu(pi, length, &c.nodes[node].tmpl)
    if rc == DROP_FRAG_NEEDED:
        return dp_too_big(c, f, pi, in_port, vxlan_inner_mtu(c.mtu, pi), out)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    return dp_encap(c, f, length, pi, node, out)
