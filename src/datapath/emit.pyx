# datapath/emit: one batch from the rings through the stages and into the
# TX rings: dp_rx_frames handles one port's batch, dp_handle picks the
# direction, dp_emit queues the output (or dp_capture, into a caller's buffer:
# process_frames, process_batch), dp_segment cuts super-packets.

cdef Py_ssize_t dp_poll(dp_ctx *c, int max_frames) noexcept nogil:
    cdef ring_frame_t fr[DP_BATCH]
    cdef int port, n, k
    cdef Py_ssize_t total = 0
    cdef uint64_t now = dp_now()
    if max_frames > DP_BATCH:
        max_frames = DP_BATCH
    _dp_memset(c.dirty, 0, sizeof(c.dirty))
    c.rx_writable = 1
    for port in range(c.n_rings):
        if c.rings[port] == NULL:
            continue
        n = ring_rx_batch(c.rings[port], fr, max_frames)
        dp_rx_frames(c, fr, n, port, now, NULL)
        if n:
            ring_rx_release(c.rings[port])
        total += n
    c.rx_writable = 0
    for k in range(c.n_rings):
        if c.dirty[k] and c.rings[k] != NULL:
            ring_tx_flush(c.rings[k])
    if c.dirty[DP_TUNNEL_PORT] and c.rings[DP_TUNNEL_PORT] != NULL:
        ring_tx_flush(c.rings[DP_TUNNEL_PORT])
    return total


cdef void dp_rx_frames(dp_ctx *c, const ring_frame_t *fr, int n, int port, uint64_t now,
                       int32_t *verdicts) noexcept nogil:
    """n frames received on `port`: the loop's step for one ring's batch
    (dp_poll), and process_batch's over caller arrays (same frames, same
    path).  verdicts (or NULL) gets each frame's dp_ret code.  From a pod
    with make-before-break on, each frame's pin bucket is prefetched
    DP_PIN_AHEAD frames ahead when the table outgrows the caches (the first
    ones by the caller when c.pin_ahead: process_batch, whose batches may
    be short).  Once the NAT table outgrows the caches, each frame's NAT
    index slot and entry are prefetched a few frames ahead while the port's
    frames use the table (nat_ahead.pyx).
    The whole batch is one RCU read section (dp_read_begin, stages.pyx): the
    lookups inside take no atomic operation; or the caller's (c.read_held)."""
    cdef int i, r, j, k
    cdef bint pins = c.pins != NULL and port != 0 and c.pins.prefetch
    cdef bint nat_ahead = dp_nat_ahead_on(c, port)
    cdef uint64_t lookups = c.nat_c.lookups if c.nat_c != NULL else 0
    cdef uint64_t nat_hash[DP_NAT_RING]
    cdef uint8_t nat_kind[DP_NAT_RING]
    if n <= 0:
        return
    if not c.read_held:
        dp_read_begin()
    if pins and not c.pin_ahead:
        for i in range(min(n, DP_PIN_AHEAD)):
            dp_pin_prefetch(c, fr[i].data, fr[i].len)
    if nat_ahead:
        for i in range(min(n, DP_NAT_SLOT_AHEAD)):
            nat_kind[i] = dp_nat_slot_ahead(c, fr[i].data, fr[i].len, port, &nat_hash[i])
        for i in range(min(n, DP_NAT_ENTRY_AHEAD)):
            dp_nat_entry_ahead(c, nat_kind[i], nat_hash[i])
    for i in range(n):
        if pins and i + DP_PIN_AHEAD < n:
            dp_pin_prefetch(c, fr[i + DP_PIN_AHEAD].data, fr[i + DP_PIN_AHEAD].len)
        if nat_ahead:
            j = i + DP_NAT_SLOT_AHEAD
            if j < n:
                k = j & (DP_NAT_RING - 1)
                nat_kind[k] = dp_nat_slot_ahead(c, fr[j].data, fr[j].len, port, &nat_hash[k])
            j = i + DP_NAT_ENTRY_AHEAD
            if j < n:
                k = j & (DP_NAT_RING - 1)
                dp_nat_entry_ahead(c, nat_kind[k], nat_hash[k])
        if c.sink != NULL:
            c.sink.cur += 1
        if fr[i].len < fr[i].wire_len:
            c.cur_pol = 0
            r = dp_ret(VERDICT_DROP, DROP_TRUNCATED)
            dp_done(c, fr[i].data, fr[i].len, port, now, r)
        else:
            r = dp_rx_frame(c, fr[i].data, fr[i].len, port, now, fr[i].vnet)
        if verdicts != NULL:
            verdicts[i] = r
    dp_nat_ahead_learn(c, port, lookups, n)
    if not c.read_held:
        dp_read_end()


cdef int dp_rx_frame(dp_ctx *c, const uint8_t *frame, int64_t length, int in_port, uint64_t now,
                     const uint8_t *vnet) noexcept nogil:
    """One received frame: handle it; a GSO frame bound for the tunnel is cut
    into segments first, each handled as a frame of its own.  Returns the
    dp_ret code (DP_SEGMENT for a frame cut into segments)."""
    cdef dp_out o
    cdef int r
    r = dp_handle(c, frame, length, in_port, now, vnet, &o)
    if (r & 0xff) == DP_SEGMENT:
        dp_segment(c, frame, length, in_port, now, NULL, 0)
        return r
    c.emit(c, &o)
    return r


cdef int dp_handle(dp_ctx *c, const uint8_t *frame, int64_t length, int in_port, uint64_t now,
                   const uint8_t *vnet, dp_out *out) noexcept nogil:
    cdef uint8_t *f = c.scratch + DP_HEADROOM
    cdef int r
    cdef dp_vnet v
    cdef uint32_t at
    _dp_memset(out, 0, sizeof(dp_out))
    out.port = -1
    c.gso = 0
    c.cur_pol = 0
    if length < PKT_ETH_LEN or length > DP_SCRATCH - DP_HEADROOM:
        # a runt or an oversize frame: not ours from the underlay, a
        # malformed one from a pod
        r = dp_ret(VERDICT_PASS, 0) if in_port == 0 else dp_ret(VERDICT_DROP, DROP_MALFORMED)
        dp_done(c, frame, length, in_port, now, r)
        return r
    _dp_memset(&v, 0, sizeof(dp_vnet))
    if vnet != NULL:
        _dp_memcpy(&v, vnet, sizeof(dp_vnet))
    if v.gso_type != 0 and c.rx_writable:
        # a super-packet is rewritten where it lies (its RX slot) and sent
        # from there (dp_emit): 64 KiB copies saved.  It needs no headroom:
        # into the tunnel it goes whole to the vxlan device, or is cut.
        f = <uint8_t *>frame
    else:
        _dp_memcpy(f, frame, length)
    if vnet != NULL:
        if v.gso_type != 0:
            if not dp_gso_type_ok(c, v.gso_type, f, length, in_port):    # TCPV4, TCPV6 (v6.pyx)
                r = dp_ret(VERDICT_DROP, DROP_UNSUPPORTED)
                dp_done(c, frame, length, in_port, now, r)
                return r
            c.gso = 1
            c.gso_type = v.gso_type
            c.gso_size = v.gso_size
        elif (v.flags & 1) and <int64_t>v.csum_start + v.csum_offset + 2 <= length:
            # CHECKSUM_PARTIAL from a local sender: finish it here
            at = v.csum_start + v.csum_offset
            be_store16(f + at, csum_finish(csum_partial(f + v.csum_start, length - v.csum_start, 0)))
            if be_load16(f + at) == 0 and dp_is_udp(f, length):
                be_store16(f + at, 0xffff)
    if in_port == 0:
        r = dp_from_underlay(c, f, length, now, out)
    else:
        r = dp_from_pod(c, f, length, in_port, now, out)
    if (r & 0xff) == DP_SEGMENT:
        return r                             # counted per segment (or once if refused)
    dp_done(c, frame, length, in_port, now, r)
    return r


cdef void dp_emit(dp_ctx *c, dp_out *o) noexcept nogil:
    """Copy an output frame into its port's TX ring (with its virtio_net_hdr)."""
    cdef uint8_t *buf
    cdef uint8_t *vh
    cdef uint32_t room
    cdef dp_vnet v
    cdef ring_t *r
    if o.port < 0:
        return
    if c.rings[o.port] == NULL:
        return
    # the underlay and the tunnel device both lead to other nodes: what
    # is queued on one goes out before the other takes a frame (order)
    if o.port == 0 and c.dirty[DP_TUNNEL_PORT]:
        ring_tx_flush(c.rings[DP_TUNNEL_PORT])
        c.dirty[DP_TUNNEL_PORT] = 0
    elif o.port == DP_TUNNEL_PORT and c.dirty[0] and c.rings[0] != NULL:
        ring_tx_flush(c.rings[0])
        c.dirty[0] = 0
    r = c.rings[o.port]
    if o.gso_type and r.dfd >= 0:
        # a super-packet: sent straight from where it lies (ring_tx_direct)
        v.flags = 1 if o.csum_offset else 0
        v.gso_type = o.gso_type
        v.hdr_len = o.hdr_len
        v.gso_size = o.gso_size
        v.csum_start = o.csum_start
        v.csum_offset = o.csum_offset
        if ring_tx_direct(r, &v, o.data, <uint32_t>o.length) < 0:
            c.st.tx_errors += 1
            c.st.drops[<int>DROP_TX_FULL] += 1
            dp_policy_tx_full(c)
        return
    buf = ring_tx_claim(r, &room)
    if buf == NULL:
        ring_tx_flush(r)                     # flush what is queued and retry once
        buf = ring_tx_claim(r, &room)
    if buf == NULL or room < o.length:
        c.st.tx_errors += 1
        c.st.drops[<int>DROP_TX_FULL] += 1
        dp_policy_tx_full(c)
        return
    _dp_memcpy(buf, o.data, o.length)
    if o.gso_type or o.csum_offset:
        vh = ring_tx_vnet(r)
        if vh != NULL:
            v.flags = 1 if o.csum_offset else 0          # VIRTIO_NET_HDR_F_NEEDS_CSUM
            v.gso_type = o.gso_type
            v.hdr_len = o.hdr_len
            v.gso_size = o.gso_size
            v.csum_start = o.csum_start
            v.csum_offset = o.csum_offset
            _dp_memcpy(vh, &v, sizeof(dp_vnet))
    ring_tx_commit(r, <uint32_t>o.length)          # a plain frame: copied whole (ring.h)
    c.dirty[o.port] = 1


cdef void dp_capture(dp_ctx *c, dp_out *o) noexcept nogil:
    """c.emit while process_frames() or process_batch() runs: output frames
    are copied to c.sink instead of a TX ring, so dp_emit carries no test
    path.  A full sink counts as a full TX ring does."""
    cdef dp_sink *s = c.sink
    if o.port < 0:
        return
    if s.n >= s.max or s.used + o.length > s.size:
        c.st.tx_errors += 1
        c.st.drops[<int>DROP_TX_FULL] += 1
        dp_policy_tx_full(c)
        return
    s.outs[s.n] = o[0]
    s.outs[s.n].data = s.buf + s.used
    _dp_memcpy(s.buf + s.used, o.data, o.length)
    s.used += o.length
    if s.frame != NULL:
        s.frame[s.n] = s.cur
    s.n += 1


cdef int dp_segment(dp_ctx *c, const uint8_t *frame, int64_t length, int in_port, uint64_t now,
                    dp_out *outs, int max_outs) noexcept nogil:
    """Cut a TCP GSO frame (IPv4, or IPv6 without a fragment header) into
    gso_size segments with full checksums and run each through the pipeline;
    outputs are copied to outs (staging in c.reply is avoided: each output
    is emitted before the next segment)."""
    cdef PktInfo pi
    cdef int32_t hdr, l3, tcplen
    cdef int64_t payload, off, n
    cdef uint16_t mss = c.gso_size, id0
    cdef uint32_t seq0, sum
    cdef uint8_t *seg = c.segbuf
    cdef uint8_t *ip
    cdef uint8_t *tcp
    cdef int i = 0
    cdef dp_out o
    cdef int rc = pkt_parse(frame, length, &pi)
    cdef bint v6 = rc == 0 and pi.ip_version == 6
    if rc or not (pi.ip_version == 4 or v6) or pi.proto != PKT_IPPROTO_TCP or pi.l4_off < 0:
        dp_done(c, frame, length, in_port, now, dp_ret(VERDICT_DROP, DROP_UNSUPPORTED))
        return 0
    hdr = pi.l4_off + ((frame[pi.l4_off + 12] >> 4) << 2)
    l3 = pi.l3_off
    payload = pi.l3_end - hdr
    if mss == 0 or hdr + mss > 9216 or payload <= 0 or (v6 and pi.frag != PKT_FRAG_NONE):
        dp_done(c, frame, length, in_port, now, dp_ret(VERDICT_DROP, DROP_UNSUPPORTED))
        return 0
    c.gso_segmented += 1
    id0 = be_load16(frame + l3 + 4)
    seq0 = be_load32(frame + pi.l4_off + 4)
    off = 0
    while off < payload:
        n = payload - off
        if n > mss:
            n = mss
        _dp_memcpy(seg, frame, hdr)
        _dp_memcpy(seg + hdr, frame + hdr + off, n)
        ip = seg + l3
        tcp = seg + pi.l4_off
        if v6:
            be_store16(ip + 4, <uint16_t>(hdr - l3 - 40 + n))
        else:
            be_store16(ip + 2, <uint16_t>(hdr - l3 + n))
            be_store16(ip + 4, <uint16_t>(id0 + i))
            be_store16(ip + 10, 0)
            be_store16(ip + 10, csum_finish(csum_ipv4_hdr(ip, pi.l4_off - l3)))
        be_store32(tcp + 4, <uint32_t>(seq0 + off))
        if off + n < payload:
            tcp[13] &= ~0x09                 # FIN, PSH only on the last
        if i > 0:
            tcp[13] &= ~0x80                 # CWR only on the first
        tcplen = <int32_t>(hdr - pi.l4_off + n)
        be_store16(tcp + 16, 0)
        if v6:
            sum = csum_partial(ip + 8, 32, PKT_IPPROTO_TCP + <uint32_t>tcplen)
        else:
            sum = csum_partial(ip + 12, 8, PKT_IPPROTO_TCP + <uint32_t>tcplen)
        be_store16(tcp + 16, csum_finish(csum_partial(tcp, tcplen, sum)))
        dp_handle(c, seg, hdr + n, in_port, now, NULL, &o)
        # dp_handle worked on its own copy (c.scratch / c.reply): emit
        # now, before the next segment reuses them
        c.emit(c, &o)
        off += n
        i += 1
    return 0
