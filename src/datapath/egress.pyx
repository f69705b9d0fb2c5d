# datapath/egress: frames from a local pod (ports 1..63), out of the node:
# SNAT to an egress IP or the node IP, or VXLAN to the gateway node.

cdef int dp_from_pod(dp_ctx *c, uint8_t *f, int64_t length, int in_port, uint64_t now,
                     dp_out *out) noexcept nogil:
    cdef PktInfo pi
    cdef dp_port *p = &c.ports[in_port]
    cdef int rc, status
    cdef uint32_t egress = 0, gw = 0, node
    rc = pkt_parse(f, length, &pi)
    if rc:
        # ARP and the like are the kernel's (it answers for the pod gateway)
        return dp_ret(VERDICT_PASS, 0) if rc == DROP_UNSUPPORTED else dp_ret(VERDICT_DROP, rc)
    if pi.ip_version != 4:
        return dp_ret(VERDICT_PASS, 0)
    # inside the cluster (pods, nodes): the kernel routes it
    if dp_lpm4(c.pod_nodes_c, pi.dst4) != LPM_NONE or dp_lpm4(c.node_ips_c, pi.dst4) != LPM_NONE:
        return dp_ret(VERDICT_PASS, 0)
    if pi.src4 != p.pod_ip:
        return dp_ret(VERDICT_DROP, DROP_SPOOFED)
    if not p.has_pod_mac or dp_mac_differs(p.pod_mac, f + 6):
        _dp_memcpy(p.pod_mac, f + 6, 6)
        p.has_pod_mac = 1
    status = dp_policy_lookup4(c, pi.src4, pi.dst4, &egress, &gw, length)
    if status == EGRESS_NO_GATEWAY:
        return dp_ret(VERDICT_DROP, DROP_NO_GATEWAY)
    if status != EGRESS_MATCH:
        return dp_egress(c, f, length, &pi, c.node_ip, False, now, out)
    if gw == c.node_ip:
        if egress == 0:
            return dp_ret(VERDICT_DROP, DROP_NO_EGRESS_IP)
        return dp_egress(c, f, length, &pi, egress, True, now, out)
    node = dp_lpm4(c.node_ips_c, gw)
    if node == LPM_NONE or not c.nodes[node].has_mac:
        return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
    if c.gso:
        return dp_gso_tunnel(c, f, length, &pi, node, in_port, out)
    rc = vxlan_check_mtu(&pi, length, &c.nodes[node].tmpl)
    if rc == DROP_FRAG_NEEDED:
        return dp_too_big(c, f, &pi, in_port, vxlan_inner_mtu(c.mtu, &pi), out)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    return dp_encap(c, f, length, &pi, node, out)
