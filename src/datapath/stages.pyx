# datapath/stages: the steps both directions share, over the one context
# struct (dp_ctx): counting a verdict (and its policy's), SNAT out to the
# router, VXLAN towards a node, delivery to a pod, ICMP too-big replies and
# GSO super-packets.
from libc.string cimport memcpy as _dp_memcpy, memset as _dp_memset
from posix.time cimport (clock_gettime as _dp_clock_gettime, timespec as _dp_timespec,
                         CLOCK_MONOTONIC as _DP_CLOCK_MONOTONIC)


# One RCU read section per batch: dp_rx_frames (every batch of the ring loop
# and of process_batch) and process() / process_frames enter the calling
# thread's read section once (lpm_core.h: a store to the thread's own slot
# and one fence), and every lookup inside (dp_lpm4, dp_lpm6,
# dp_policy_lookup4/6, any table) is plain loads, no atomic operation.  A
# writer's grace period waits for at most the batch in progress: nothing in
# one waits without bound (no GIL; TX kicks are non-blocking sendto; a
# super-packet sent direct waits at most 2 ms for socket room,
# ring_tx_direct) and a batch is at most DP_BATCH frames.  Between batches the worker is outside, so a
# parked or idle worker holds no writer up.  Checked builds abort when one of
# these lookups runs outside a section.

cdef inline void dp_read_begin() noexcept nogil:
    lpm_rcu_read_lock()


cdef inline void dp_read_end() noexcept nogil:
    lpm_rcu_read_unlock()


cdef inline int dp_peek_flow4(const uint8_t *f, uint32_t n, uint32_t l3, uint16_t *sport,
                              uint16_t *dport) noexcept nogil:
    """The flow of the unfragmented IPv4 packet at f + l3 (f is n bytes, its
    Ethernet type at l3 - 2), read straight from the bytes for a prefetch
    ahead of pkt_parse and keyed as pkt_parse keys it: returns its protocol
    with TCP / UDP ports in *sport, *dport, an ICMP echo request's id in
    *sport or a reply's in *dport (the other 0); -1 for anything else."""
    cdef uint32_t l4
    cdef uint8_t proto
    if l3 + 20 > n or f[l3 - 2] != 0x08 or f[l3 - 1] != 0x00 or (be_load16(f + l3 + 6) & 0x1fff) != 0:
        return -1
    l4 = l3 + ((f[l3] & 0xf) << 2)
    if l4 + 8 > n:
        return -1
    proto = f[l3 + 9]
    sport[0] = 0
    dport[0] = 0
    if proto == PKT_IPPROTO_TCP or proto == PKT_IPPROTO_UDP:
        sport[0] = be_load16(f + l4)
        dport[0] = be_load16(f + l4 + 2)
    elif proto == PKT_IPPROTO_ICMP and f[l4] == 8:
        sport[0] = be_load16(f + l4 + 4)
    elif proto == PKT_IPPROTO_ICMP and f[l4] == 0:
        dport[0] = be_load16(f + l4 + 4)
    else:
        return -1
    return proto


cdef inline uint32_t dp_lpm4(lpm_trie *t, uint32_t addr) noexcept nogil:
    """Longest-prefix match in t, inside the batch's read section."""
    lpm_rcu_assert_reading()
    return lpm4_table_lookup(lpm_trie_table(t), addr)


cdef inline void dp_tuple4(nat_tuple *k, uint8_t proto, uint8_t flags, uint32_t src, uint16_t sport,
                           uint32_t dst, uint16_t dport) noexcept nogil:
    _dp_memset(k, 0, sizeof(nat_tuple))
    k.family = 4
    k.proto = proto
    k.tcp_flags = flags
    k.sport = sport
    k.dport = dport
    be_store32(k.src, src)
    be_store32(k.dst, dst)


cdef inline void dp_vxlan_mac(uint8_t *mac, uint32_t ip) noexcept nogil:
    mac[0] = 0x02
    mac[1] = 0xee
    be_store32(mac + 2, ip)


cdef inline uint64_t dp_now() noexcept nogil:
    cdef _dp_timespec ts
    _dp_clock_gettime(_DP_CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef enum:
    DP_SEGMENT = 0xfe             # internal: cut the GSO frame and handle each segment


cdef inline int dp_ret(int verdict, int reason) noexcept nogil:
    return (reason << 8) | verdict


cdef void dp_count(dp_ctx *c, int verdict, int reason) noexcept nogil:
    if verdict == VERDICT_PASS:
        c.st.passed += 1
    elif verdict == VERDICT_TX:
        c.st.tx += 1
    elif verdict == VERDICT_TX_LOCAL:
        c.st.tx_local += 1
    else:
        c.st.dropped += 1
        c.st.drops[drop_slot(reason)] += 1


cdef inline int dp_policy_lookup4(dp_ctx *c, uint32_t src, uint32_t dst, uint32_t *egress,
                                  uint32_t *gw, int64_t length) noexcept nogil:
    """egress_map_lookup4 that also makes a matched (or no-gateway) entry's
    policy the frame's, for the per-policy counters: redirected when the
    gateway is another node, SNATed here when it is this one; `length` is
    the frame as the pod sent it."""
    cdef uint32_t pol = 0
    cdef int status = egress_map_lookup4p_in(c.em_c, src, dst, egress, gw, &pol)
    if pol != 0 and (status == EGRESS_MATCH or status == EGRESS_NO_GATEWAY):
        c.cur_pol = pol
        c.cur_pol_dir = DP_POL_EGRESS if gw[0] == c.node_ip else DP_POL_REDIRECT
        c.cur_pol_len = length
    return status


cdef inline void dp_policy_done(dp_ctx *c, int r) noexcept nogil:
    """Count verdict r to the frame's policy (c.cur_pol, not 0)."""
    cdef dp_policy *p = &c.pol[policy_slot(c.cur_pol)]
    if (r & 0xff) == VERDICT_DROP:
        p.drops[drop_slot(r >> 8)] += 1
    elif (r & 0xff) != VERDICT_PASS:
        p.pkts[c.cur_pol_dir] += 1
        p.bytes[c.cur_pol_dir] += <uint64_t>c.cur_pol_len


cdef inline void dp_policy_tx_full(dp_ctx *c) noexcept nogil:
    """A forwarded frame lost at transmit: also its policy's tx_full drop."""
    if c.cur_pol != 0:
        c.pol[policy_slot(c.cur_pol)].drops[<int>DROP_TX_FULL] += 1


cdef void dp_done(dp_ctx *c, const uint8_t *frame, int64_t length, int in_port, uint64_t now,
                  int r) noexcept nogil:
    """Count a frame's verdict r (dp_ret), every path's one place: rx =
    passed + tx + tx_local + dropped, and the per-verdict packets and bytes,
    hold for every frame (runts, refused super-packets, truncated ones); and
    the frame's policy's, when its stage found one."""
    c.st.rx += 1
    dp_count(c, r & 0xff, r >> 8)
    c.st.vpkts[r & 3] += 1
    c.st.vbytes[r & 3] += <uint64_t>length
    if c.cur_pol != 0:
        dp_policy_done(c, r)
    if c.flog != NULL and (r & 0xff) == VERDICT_DROP:
        dp_flow_drop(c, frame, length, in_port, r >> 8, now)


cdef void dp_flow_drop(dp_ctx *c, const uint8_t *frame, int64_t length, int in_port, int reason,
                       uint64_t now) noexcept nogil:
    """A drop record (rate-limited per reason) with the dropped packet's
    flow; for VXLAN from the underlay, the inner packet's.  The NAT table
    already logged its own refusals (exhausted, full, pod limit)."""
    cdef PktInfo pi
    cdef const uint8_t *p = frame
    cdef int64_t n = length
    cdef uint8_t src[16]
    cdef uint8_t dst[16]
    if reason == DROP_NAT_EXHAUSTED or reason == DROP_NAT_TABLE_FULL or reason == DROP_POD_CONN_LIMIT:
        return
    if not flow_drop_allow(c.flog, <uint8_t>reason, now):
        return
    _dp_memset(src, 0, 16)
    _dp_memset(dst, 0, 16)
    if pkt_parse(p, n, &pi) or (pi.ip_version != 4 and pi.ip_version != 6):
        flow_drop_record(c.flog, now, <uint8_t>reason, 0, 0, 0, 0, NULL, NULL,
                         FLOW_NO_POLICY, 0)
        return
    if (in_port == 0 and pi.proto == PKT_IPPROTO_UDP and pi.l4_off >= 0
            and pi.dport == c.vxlan_port and pi.l4_off + 16 + PKT_ETH_LEN < n):
        p = frame + pi.l4_off + 16          # UDP 8 + VXLAN 8: the inner frame
        n = length - (pi.l4_off + 16)
        if pkt_parse(p, n, &pi) or (pi.ip_version != 4 and pi.ip_version != 6):
            p = frame
            n = length
            pkt_parse(p, n, &pi)
    if pi.ip_version == 6:
        _dp_memcpy(src, p + pi.l3_off + 8, 16)
        _dp_memcpy(dst, p + pi.l3_off + 24, 16)
    else:
        be_store32(src, pi.src4)
        be_store32(dst, pi.dst4)
    flow_drop_record(c.flog, now, <uint8_t>reason, pi.ip_version, pi.proto,
                     pi.sport if pi.has_ports else 0, pi.dport if pi.has_ports else 0,
                     src, dst, FLOW_NO_POLICY, pi.tcp_flags)


cdef int dp_too_big(dp_ctx *c, const uint8_t *f, PktInfo *pi, int port, uint32_t mtu,
                    dp_out *out) noexcept nogil:
    """Queue the ICMP frag-needed reply for the sender of f (back out of `port`)."""
    cdef int64_t n = pkt_icmp_too_big(f, pi, c.reply, 2048, mtu, NULL)
    if n > 0:
        out.port = port
        out.data = c.reply
        out.length = n
        c.st.icmp_too_big += 1
    return dp_ret(VERDICT_DROP, DROP_FRAG_NEEDED)


cdef void dp_gso_out(dp_ctx *c, uint8_t *f, PktInfo *pi, dp_out *out) noexcept nogil:
    """A GSO super-packet leaves whole: the TCP checksum field becomes the
    pseudo-header sum of the new addresses (what NEEDS_CSUM expects), and
    the TX virtio_net_hdr carries the segmentation the kernel will do."""
    cdef uint8_t *ip = f + pi.l3_off
    cdef uint32_t tcplen = <uint32_t>(pi.l3_end - pi.l4_off)
    if pi.ip_version == 6:                   # the IPv6 pseudo-header: both addresses
        be_store16(f + pi.l4_off + 16, csum_fold(csum_partial(ip + 8, 32, PKT_IPPROTO_TCP + tcplen)))
    else:
        be_store16(f + pi.l4_off + 16, csum_fold(csum_partial(ip + 12, 8, PKT_IPPROTO_TCP + tcplen)))
    out.gso_type = c.gso_type
    out.gso_size = c.gso_size
    out.hdr_len = <uint16_t>(pi.l4_off + ((f[pi.l4_off + 12] >> 4) << 2))
    out.csum_start = <uint16_t>pi.l4_off
    out.csum_offset = 16
    c.gso_frames += 1


cdef int dp_gso_fit(dp_ctx *c, const uint8_t *f, PktInfo *pi) noexcept nogil:
    """Whether the super-packet's segments fit the tunnel: 0 yes, 1 no and DF
    set or IPv6 (frag-needed / packet-too-big), 2 no and DF clear (cut here,
    as without the offload)."""
    cdef int64_t hdr, seg
    if pi.proto != PKT_IPPROTO_TCP or pi.l4_off < 0 or pi.l4_off + 20 > pi.l3_end:
        return 2                             # not a TCP super-packet: dp_segment refuses it
    hdr = pi.l4_off + ((f[pi.l4_off + 12] >> 4) << 2)
    seg = <int64_t>c.gso_size + hdr - pi.l3_off
    if seg <= <int64_t>vxlan_inner_mtu(c.mtu, pi):
        return 0
    return 1 if pi.df or pi.ip_version == 6 else 2


cdef int dp_gso_tunnel(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, int node, int back_port,
                       dp_out *out) noexcept nogil:
    """A super-packet into the tunnel: whole to the kernel vxlan device
    (DP_TUNNEL_PORT) when the offload is on, else DP_SEGMENT.  Too big for
    the tunnel with DF: frag-needed back out of back_port."""
    cdef dp_node *n = &c.nodes[node]
    cdef int rc
    if not c.tnl_on:
        return dp_ret(DP_SEGMENT, 0)
    rc = dp_gso_fit(c, f, pi)
    if rc == 1:
        return dp_too_big(c, f, pi, back_port, vxlan_inner_mtu(c.mtu, pi), out)
    if rc == 2:
        return dp_ret(DP_SEGMENT, 0)
    rc = pkt_ttl_decrement(f, pi)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    dp_vxlan_mac(f, n.ip)
    dp_vxlan_mac(f + 6, c.node_ip)
    dp_gso_out(c, f, pi, out)
    out.port = DP_TUNNEL_PORT
    out.data = f
    out.length = length
    c.st.encap += 1
    c.gso_tunneled += 1
    return dp_ret(VERDICT_TX, 0)


cdef int dp_encap(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, int node,
                  dp_out *out) noexcept nogil:
    """TTL, inner MACs (02:ee:<node IPv4>, over either underlay), VXLAN
    towards cluster node `node` (its IPv6 address over the IPv6 underlay),
    out of the underlay."""
    cdef dp_node *n = &c.nodes[node]
    cdef int rc
    cdef int64_t ln
    if not n.valid or not n.has_mac or (c.underlay6 and not n.has_ip6):
        return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
    if c.gso:
        return dp_gso_tunnel(c, f, length, pi, node, 0, out)
    rc = pkt_ttl_decrement(f, pi)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    dp_vxlan_mac(f, n.ip)
    dp_vxlan_mac(f + 6, c.node_ip)
    if c.underlay6:
        ln = vxlan6_encap_frame(f, length, &n.tmpl6, vxlan_src_port(f, pi, &n.tmpl))
        out.data = f - VXLAN6_OVERHEAD
    else:
        ln = vxlan_encap_frame(f, length, &n.tmpl, vxlan_src_port(f, pi, &n.tmpl))
        out.data = f - VXLAN_OVERHEAD
    out.port = 0
    out.length = ln
    c.st.encap += 1
    return dp_ret(VERDICT_TX, 0)


cdef int dp_egress(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, uint32_t egress_ip,
                   bint policy, uint64_t now, dp_out *out) noexcept nogil:
    """SNAT to egress_ip (the node IP: masquerade) and out to the router."""
    cdef uint8_t a16[16]
    cdef int ext, rc
    cdef nat_tuple k, o
    _dp_memset(a16, 0, 16)
    be_store32(a16, egress_ip)
    ext = c.node_ext if egress_ip == c.node_ip else nat_ext_find(c.nat_c, 4, a16)
    if ext < 0:
        return dp_ret(VERDICT_DROP, DROP_NO_EGRESS_IP)
    if not c.has_router:
        return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
    if not pi.has_ports:
        return dp_ret(VERDICT_DROP, DROP_FRAGMENT if pi.frag == PKT_FRAG_LATER else DROP_UNSUPPORTED)
    rc = pkt_ttl_decrement(f, pi)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    dp_tuple4(&k, pi.proto, pi.tcp_flags, pi.src4, pi.sport, pi.dst4, pi.dport)
    rc = nat_translate_out_pol(c.nat_c, &k, <uint32_t>ext, c.cur_pol if policy else 0, now, &o,
                               <uint32_t>(pi.l3_end - pi.l3_off))
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    rc = pkt_nat4(f, pi, PKT_NAT_SRC, be_load32(o.src), o.sport)
    if rc:
        return dp_ret(VERDICT_DROP, rc)
    return dp_to_router(c, f, length, pi, c.router_mac, policy, out)


cdef int dp_to_router(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, const uint8_t *router_mac,
                      bint policy, dp_out *out) noexcept nogil:
    """A translated packet (either family) out of the underlay to the router,
    whole if it is a super-packet (the kernel cuts it on the underlay)."""
    _dp_memcpy(f, router_mac, 6)
    _dp_memcpy(f + 6, c.node_mac, 6)
    if c.gso:
        dp_gso_out(c, f, pi, out)
    out.port = 0
    out.data = f
    out.length = length
    if policy:
        c.st.snat_egress += 1
    else:
        c.st.masquerade += 1
    return dp_ret(VERDICT_TX, 0)


cdef int dp_to_pod_or_node(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi,
                           dp_out *out) noexcept nogil:
    """Deliver an already translated packet to its pod: the local veth, or
    VXLAN to the pod's node."""
    cdef uint32_t port = dp_lpm4(c.local_pods_c, pi.dst4)
    return dp_deliver(c, f, length, pi, port, dp_lpm4(c.pod_nodes_c, pi.dst4) if port == LPM_NONE else LPM_NONE,
                      out)


cdef int dp_deliver(dp_ctx *c, uint8_t *f, int64_t length, PktInfo *pi, uint32_t port, uint32_t node,
                    dp_out *out) noexcept nogil:
    """dp_to_pod_or_node (IPv4 or IPv6) with the lookups done: local veth
    `port`, else VXLAN to cluster node `node` (LPM_NONE: DROP_NO_ROUTE)."""
    cdef int rc
    cdef dp_port *p
    cdef uint64_t mac
    if port != LPM_NONE:
        p = &c.ports[port]
        mac = dp_podmac_load(&c.pod_macs[port])   # learned by whichever worker saw the pod's frame
        if not mac:
            return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
        rc = pkt_ttl_decrement(f, pi)
        if rc:
            return dp_ret(VERDICT_DROP, rc)
        dp_podmac_put(f, mac)
        _dp_memcpy(f + 6, p.host_mac, 6)
        if c.gso:
            dp_gso_out(c, f, pi, out)
        out.port = <int>port
        out.data = f
        out.length = length
        return dp_ret(VERDICT_TX_LOCAL, 0)
    if node == LPM_NONE:
        return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
    return dp_encap(c, f, length, pi, node, out)
