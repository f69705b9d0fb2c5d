# datapath: the fused egress-gateway pipeline (dp_), one C pass per batch.
#
# A Datapath is one node's forwarding state: its underlay address and MACs,
# the cluster's nodes (pod CIDR -> node, node IP -> node), its local pods
# (pod IP -> veth port), the egress map and the NAT table.  Per frame:
#
#   from a pod (port >= 1), to outside the cluster:
#       source check (DROP_SPOOFED) -> egress map (src, dst):
#         match, gateway = this node  -> SNAT to the egress IP -> router
#         match, gateway elsewhere    -> VXLAN to the gateway node
#         match, gateway 0.0.0.0      -> DROP_NO_GATEWAY
#         excluded / no match         -> masquerade to the node IP -> router
#   from the underlay (port 0):
#       VXLAN to this node from a cluster node (else DROP_NOT_CLUSTER_NODE):
#         inner dst is a local pod    -> deliver (a gateway's reply)
#         else gateway role: the inner source's pod CIDR must belong to the
#         sender and a policy must send that (pod, dst) here
#         (DROP_POLICY_DENIED), egress IP set (DROP_NO_EGRESS_IP) -> SNAT
#       to an egress / node IP, in the NAT port range (or an echo reply):
#         reverse NAT (DROP_NO_NAT_ENTRY) -> local pod, or VXLAN to its node
#       ICMP errors about translated flows are translated (RFC 5508).
#       anything else: not ours, VERDICT_PASS (the kernel has its own copy).
#
# Frames are copied once into a scratch buffer with headroom (VXLAN encap
# writes 50 bytes in front), rewritten there and copied into a TX ring frame;
# super-packets are rewritten in their RX slot and sent from there
# (ring_tx_direct).  poll() takes one batch per ring; run() loops in C.
# TTL is decremented on every forward; a packet too big for the underlay with
# DF gets an ICMP fragmentation-needed reply (to the pod, or to the remote
# sender for replies headed into the tunnel), so PMTUD works through VXLAN.
# Inner Ethernet addresses in the tunnel are 02:ee:<node IP> (the lab's
# kernel vxlan MACs), so Linux vxlan devices interoperate both ways.
#
# TCP super-packets (GSO, up to 64 KiB, from PACKET_VNET_HDR rings) pass
# whole where they can: to the router and to local pods with a TX
# virtio_net_hdr (the kernel cuts them on transmit), and into the tunnel
# through the tunnel offload: a TX ring on a kernel vxlan device
# (DP_TUNNEL_PORT, attach_tunnel) whose FDB maps 02:ee:<node IP> to the node.
# The kernel encapsulates the super-packet as a UDP-tunnel GSO packet and
# cuts it after encapsulation (in software, or in a NIC that can), as it
# does for Cilium's BPF datapath when it redirects to cilium_vxlan.  Such
# packets arrive at the other node's ring as one frame whose virtio_net_hdr
# describes the inner TCP segmentation, and are decapsulated whole.  Without
# the offload, a tunnel-bound super-packet is cut into segments here.
#
# Thread model: one thread drives a Datapath (it is the NAT table's writer).
from libc.stdlib cimport malloc as _dp_malloc, free as _dp_free
from libc.string cimport memcpy as _dp_memcpy, memset as _dp_memset
from posix.time cimport clock_gettime as _dp_clock_gettime, timespec as _dp_timespec, CLOCK_MONOTONIC as _DP_CLOCK_MONOTONIC



cdef extern from "<poll.h>" nogil:
    struct _dp_pollfd "pollfd":
        int fd
        short events
        short revents
    int _dp_poll "poll"(_dp_pollfd *fds, unsigned long nfds, int timeout)
    short _DP_POLLIN "POLLIN"

cdef extern from "<unistd.h>" nogil:
    ssize_t _dp_read "read"(int fd, void *buf, size_t n)


cdef inline uint32_t dp_lpm4(lpm_trie *t, uint32_t addr) noexcept nogil:
    cdef unsigned idx = lpm_rcu_enter(&t.rcu)
    cdef uint32_t v = lpm4_table_lookup(lpm_trie_table(t), addr)
    lpm_rcu_exit(&t.rcu, idx)
    return v


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


cdef inline bint dp_mac_differs(const uint8_t *a, const uint8_t *b) noexcept nogil:
    cdef int i
    for i in range(6):
        if a[i] != b[i]:
            return True
    return False


cdef enum:
    DP_SEGMENT = 0xfe             # internal: cut the GSO frame and handle each segment


cdef inline int dp_ret(int verdict, int reason) noexcept nogil:
    return (reason << 8) | verdict


DP_GC_BUDGET = 1024     # connections one Datapath.gc call examines at most

_DP_STAT_NAMES = ("rx", "passed", "tx", "tx_local", "dropped", "encap", "decap", "snat_egress",
                  "masquerade", "reverse_nat", "icmp_too_big", "icmp_errors", "tx_errors")


cdef class Datapath:
    """One node's fused egress-gateway datapath (see datapath.pyx's header).

    Datapath(node_ip, node_mac, egress_map, nat, *, vni=2, vxlan_port=8472,
             mtu=1500, nat_port_range=(32768, 65534))

    The NAT table must hold the node IP (masquerade) and this node's egress
    IPs.  Configure with add_node / set_router / add_pod_port, then either
    process() frames (tests, embedding) or attach PacketRings and run()
    (or poll() one batch at a time).
    One thread per Datapath.
    """

    def __cinit__(self):
        self.scratch = <uint8_t *>_dp_malloc(DP_SCRATCH)
        self.reply = <uint8_t *>_dp_malloc(2048)
        self.segbuf = <uint8_t *>_dp_malloc(9216 + 128)
        if self.scratch == NULL or self.reply == NULL or self.segbuf == NULL:
            raise MemoryError("Datapath scratch buffers")
        _dp_memset(&self.st, 0, sizeof(dp_stats))
        _dp_memset(self.ports, 0, sizeof(self.ports))
        _dp_memset(self.nodes, 0, sizeof(self.nodes))
        _dp_memset(self.rings, 0, sizeof(self.rings))

    def __dealloc__(self):
        _dp_free(self.scratch)
        _dp_free(self.reply)
        _dp_free(self.segbuf)

    def __init__(self, node_ip, node_mac, EgressMap egress_map not None, NatTable nat not None, *,
                 vni=2, vxlan_port=8472, mtu=1500, nat_port_range=(32768, 65534)):
        self.node_ip = addr_v4(node_ip, "node_ip")
        mac = mac_bytes(node_mac, "node_mac")
        _dp_memcpy(self.node_mac, <const char *>mac, 6)
        if not isinstance(vni, int) or not 0 <= vni < 1 << 24:
            raise ValueError(f"vni must be in 0..16777215, not {vni!r}")
        if not isinstance(vxlan_port, int) or not 1 <= vxlan_port <= 65535:
            raise ValueError(f"vxlan_port must be in 1..65535, not {vxlan_port!r}")
        if not isinstance(mtu, int) or not 576 <= mtu <= 9000:
            raise ValueError(f"mtu must be in 576..9000, not {mtu!r}")
        lo, hi = nat_port_range
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"nat_port_range must be (lo, hi) within 1..65535, not {nat_port_range!r}")
        self.vni = vni
        self.vxlan_port = vxlan_port
        self.mtu = mtu
        self.nat_lo = lo
        self.nat_hi = hi
        self.egress_map = egress_map
        self.nat = nat
        self.em_c = egress_map.c
        self.nat_c = nat.t
        if self.nat_c == NULL or self.em_c == NULL:
            raise ValueError("egress_map and nat must be initialised tables")
        self.node_ext = nat.add_egress_ip(str(_ipaddress.IPv4Address(self.node_ip)))
        self.pod_nodes = LPMTrie(4)
        self.node_ips = LPMTrie(4)
        self.local_pods = LPMTrie(4)
        self.pod_nodes_c = self.pod_nodes.c
        self.node_ips_c = self.node_ips.c
        self.local_pods_c = self.local_pods.c
        self._rings = {}
        self.ports[0].used = 1
        _dp_memcpy(self.ports[0].host_mac, self.node_mac, 6)

    # -- configuration (Python, between batches) --------------------------------

    def add_node(self, int index, ip, pod_cidrs=(), mac=None):
        """Cluster node `index` (0..255): underlay IP, pod CIDRs, MAC (None: not yet known)."""
        if not 0 <= index < DP_MAX_NODES:
            raise ValueError(f"node index must be in 0..{DP_MAX_NODES - 1}, not {index}")
        cdef dp_node *n = &self.nodes[index]
        n.ip = addr_v4(ip, "node ip")
        n.valid = 1
        self.node_ips[f"{_ipaddress.IPv4Address(n.ip)}/32"] = index
        for cidr in pod_cidrs:
            net = _ipaddress.ip_network(cidr)
            if net.version == 4:
                self.pod_nodes[str(net)] = index
        self.set_node_mac(index, mac)

    def remove_node(self, int index):
        if not 0 <= index < DP_MAX_NODES or not self.nodes[index].valid:
            return
        for key, v in list(self.pod_nodes.items()):
            if v == index:
                del self.pod_nodes[key]
        for key, v in list(self.node_ips.items()):
            if v == index:
                del self.node_ips[key]
        _dp_memset(&self.nodes[index], 0, sizeof(dp_node))

    def set_node_mac(self, int index, mac):
        """The underlay MAC of node `index` (None: unknown, VXLAN to it is DROP_NO_ROUTE)."""
        if not 0 <= index < DP_MAX_NODES or not self.nodes[index].valid:
            raise ValueError(f"no node {index}")
        cdef dp_node *n = &self.nodes[index]
        if mac is None:
            n.has_mac = 0
            return
        m = mac_bytes(mac, "node mac")
        _dp_memcpy(n.mac, <const char *>m, 6)
        vxlan_tmpl_init(&n.tmpl, self.node_mac, n.mac, self.node_ip, n.ip, self.vni, self.vxlan_port,
                        64, self.mtu, 32768, 61000)
        n.has_mac = 1

    def set_router(self, mac):
        """The MAC of the underlay's default next hop (traffic leaving the cluster)."""
        if mac is None:
            self.has_router = 0
            return
        m = mac_bytes(mac, "router mac")
        _dp_memcpy(self.router_mac, <const char *>m, 6)
        self.has_router = 1

    def add_pod_port(self, int port, pod_ip, host_mac, pod_mac=None):
        """Veth `port` (1..63) leads to the local pod `pod_ip`; host_mac is our end's MAC."""
        if not 1 <= port < DP_MAX_PORTS:
            raise ValueError(f"pod port must be in 1..{DP_MAX_PORTS - 1}, not {port}")
        cdef dp_port *p = &self.ports[port]
        old = p.pod_ip
        if p.used and old:
            self.local_pods.pop(f"{_ipaddress.IPv4Address(old)}/32", None)
        p.pod_ip = addr_v4(pod_ip, "pod_ip")
        hm = mac_bytes(host_mac, "host_mac")
        _dp_memcpy(p.host_mac, <const char *>hm, 6)
        p.has_pod_mac = 0
        if pod_mac is not None:
            pm = mac_bytes(pod_mac, "pod_mac")
            _dp_memcpy(p.pod_mac, <const char *>pm, 6)
            p.has_pod_mac = 1
        p.used = 1
        self.local_pods[f"{_ipaddress.IPv4Address(p.pod_ip)}/32"] = port

    def remove_pod_port(self, int port):
        if not 1 <= port < DP_MAX_PORTS or not self.ports[port].used:
            return
        self.local_pods.pop(f"{_ipaddress.IPv4Address(self.ports[port].pod_ip)}/32", None)
        self.detach_ring(port)
        _dp_memset(&self.ports[port], 0, sizeof(dp_port))

    def attach_ring(self, int port, PacketRing ring not None):
        """Receive and transmit port `port`'s frames through `ring` (poll())."""
        if not 0 <= port < DP_MAX_PORTS or not self.ports[port].used:
            raise ValueError(f"port {port} is not configured")
        if not (ring.has_rx and ring.has_tx):
            raise ValueError("the ring must have both RX and TX")
        self._rings[port] = ring
        self.rings[port] = &ring.r
        self.n_rings = max(self.n_rings, port + 1)

    def detach_ring(self, int port):
        if port == DP_TUNNEL_PORT:
            self.detach_tunnel()
        elif 0 <= port < DP_MAX_PORTS:
            self._rings.pop(port, None)
            self.rings[port] = NULL

    TUNNEL_PORT = DP_TUNNEL_PORT

    def attach_tunnel(self, PacketRing ring not None):
        """Hand tunnel-bound TCP super-packets whole to a kernel vxlan device.

        `ring` is a TX ring with vnet_hdr on a vxlan device (this node's
        VNI, port and underlay address; no learning) whose FDB has
        02:ee:<node IP> -> <node IP> for every other node.  Other frames
        into the tunnel keep the datapath's own encapsulation; the two TX
        rings are flushed in order, so a flow's packets stay in order."""
        if not ring.has_tx or not ring.vnet_hdr:
            raise ValueError("the tunnel ring must have TX and vnet_hdr=True")
        self._rings[DP_TUNNEL_PORT] = ring
        self.rings[DP_TUNNEL_PORT] = &ring.r
        self.tnl_on = 1

    def detach_tunnel(self):
        self._rings.pop(DP_TUNNEL_PORT, None)
        self.rings[DP_TUNNEL_PORT] = NULL
        self.tnl_on = 0

    @property
    def tunnel_offload(self):
        """True: tunnel-bound super-packets go whole to TUNNEL_PORT; False: cut here.
        Settable without a ring for process_frames() (tests)."""
        return bool(self.tnl_on)

    @tunnel_offload.setter
    def tunnel_offload(self, bint on):
        self.tnl_on = on

    @property
    def rings_attached(self):
        return dict(self._rings)

    # -- counters -----------------------------------------------------------------

    def counters(self):
        """{'rx': .., 'tx': .., ..., 'drops': {reason name: count}} (non-zero drop reasons)."""
        cdef uint64_t *v = &self.st.rx
        out = {name: v[i] for i, name in enumerate(_DP_STAT_NAMES)}
        out["drops"] = {DROP_REASON_NAMES[i]: self.st.drops[i]
                        for i in range(1, DROP_REASON_MAX) if self.st.drops[i]}
        out["verdicts"] = {name: {"packets": self.st.vpkts[i], "bytes": self.st.vbytes[i]}
                           for i, name in enumerate(("pass", "tx", "tx_local", "drop"))}
        out["gso"] = {"whole": self.gso_frames, "tunneled": self.gso_tunneled, "segmented": self.gso_segmented}
        return out

    @property
    def flow_log(self):
        """The FlowLog receiving drop records (and, through the NAT table,
        connection start/end records), or None."""
        return self._flow_log

    def set_flow_log(self, log):
        """Send flow records to `log` (an egresscore.FlowLog; None: stop).

        The NAT table writes start/end records of connections and refusals;
        the datapath writes a rate-limited drop record for every other drop."""
        if log is not None and not isinstance(log, FlowLog):
            raise TypeError(f"flow log must be a FlowLog or None, not {type(log).__name__}")
        self.nat.flow_log = log
        self.flog = NULL if log is None else (<FlowLog>log)._get()
        self._flow_log = log

    def reset_counters(self):
        _dp_memset(&self.st, 0, sizeof(dp_stats))

    # -- Python entry points ------------------------------------------------------

    def process(self, frame, int port=0, now=None):
        """Run one frame received on `port` through the pipeline.

        Returns (verdict, reason, out): verdict 'pass' | 'tx' | 'tx_local' |
        'drop', the drop reason name ('none' otherwise), and out = (port,
        bytes) of the frame to transmit or None.  A drop with a reply (ICMP
        frag-needed) carries the reply in out."""
        cdef const uint8_t[::1] b = bytes(frame)
        cdef dp_out o
        if b.shape[0] == 0:
            raise ValueError("frame is empty")
        cdef uint64_t t
        cdef int r
        if not 0 <= port < DP_MAX_PORTS or not self.ports[port].used:
            raise ValueError(f"port {port} is not configured")
        t = dp_now() if now is None else <uint64_t>(float(now) * 1e9)
        with nogil:
            r = self.dp_handle(&b[0], b.shape[0], port, t, NULL, &o)
        verdict = ("pass", "tx", "tx_local", "drop")[r & 0xff]
        out = None
        if o.port >= 0:
            out = (o.port, bytes((<char *>o.data)[:o.length]))
        return verdict, DROP_REASON_NAMES[r >> 8], out

    def process_frames(self, frame, int port=0, vnet=None, now=None):
        """Run one received frame as poll() does, with an optional
        virtio_net_hdr (dict: flags, gso_type, hdr_len, gso_size, csum_start,
        csum_offset), and return what would be transmitted: a list of
        (port, bytes, vnet dict or None).  A GSO frame bound for the tunnel
        comes back as several segments.  Any length is taken, 0 included (a
        runt is counted as poll() counts it)."""
        cdef const uint8_t[::1] b = bytes(frame) + b"\0"    # a byte to point at when empty
        cdef dp_vnet v
        cdef uint64_t t
        cdef const uint8_t *vp = NULL
        if not 0 <= port < DP_MAX_PORTS or not self.ports[port].used:
            raise ValueError(f"port {port} is not configured")
        if vnet is not None:
            d = dict(vnet)
            v.flags = d.get("flags", 0)
            v.gso_type = d.get("gso_type", 0)
            v.hdr_len = d.get("hdr_len", 0)
            v.gso_size = d.get("gso_size", 0)
            v.csum_start = d.get("csum_start", 0)
            v.csum_offset = d.get("csum_offset", 0)
            vp = <const uint8_t *>&v
        t = dp_now() if now is None else <uint64_t>(float(now) * 1e9)
        self.cap_buf = <uint8_t *>_dp_malloc(1 << 20)
        if self.cap_buf == NULL:
            raise MemoryError("capture buffer")
        self.cap_used = 0
        self.cap_n = 0
        try:
            with nogil:
                self.dp_rx_frame(&b[0], b.shape[0] - 1, port, t, vp)
            out = []
            for i in range(self.cap_n):
                o = self.cap_out[i]
                vh = None
                if o.gso_type or o.csum_offset:
                    vh = {"flags": 1 if o.csum_offset else 0, "gso_type": o.gso_type, "hdr_len": o.hdr_len,
                          "gso_size": o.gso_size, "csum_start": o.csum_start, "csum_offset": o.csum_offset}
                out.append((o.port, bytes((<char *>o.data)[:o.length]), vh))
            return out
        finally:
            _dp_free(self.cap_buf)
            self.cap_buf = NULL

    def poll(self, int max_frames=DP_BATCH):
        """One batch from every attached ring (GIL released); returns frames handled."""
        cdef Py_ssize_t n
        with nogil:
            n = self.dp_poll(max_frames)
        return n

    def run(self, double seconds, int wake_fd=-1):
        """Forward for up to `seconds` without coming back to Python (GIL
        released): batches from every ring while frames come, poll() on the
        rings when none do.  Returns early when wake_fd (a pipe or eventfd;
        drained here) becomes readable or a signal arrives, so control
        changes and SIGTERM are not kept waiting.  Returns frames handled."""
        cdef Py_ssize_t n
        if not 0 <= seconds <= 3600:
            raise ValueError(f"seconds must be in 0..3600, not {seconds!r}")
        with nogil:
            n = self.dp_run(<uint64_t>(seconds * 1e9), wake_fd)
        return n

    cdef Py_ssize_t dp_run(self, uint64_t ns, int wake_fd) noexcept nogil:
        cdef _dp_pollfd fds[DP_MAX_PORTS + 1]
        cdef int nfds, port, rc, ms
        cdef uint64_t now = dp_now(), end = now + ns
        cdef Py_ssize_t total = 0, n
        cdef char drain[64]
        while True:
            n = self.dp_poll(DP_BATCH)
            total += n
            now = dp_now()
            if now >= end:
                break
            if n:
                continue
            nfds = 0
            for port in range(self.n_rings):
                if self.rings[port] != NULL and self.rings[port].rx_block_nr:
                    fds[nfds].fd = self.rings[port].fd
                    fds[nfds].events = _DP_POLLIN
                    fds[nfds].revents = 0
                    nfds += 1
            if wake_fd >= 0:
                fds[nfds].fd = wake_fd
                fds[nfds].events = _DP_POLLIN
                fds[nfds].revents = 0
                nfds += 1
            ms = <int>((end - now + 999999) // 1000000)
            rc = _dp_poll(fds, nfds, ms)
            if rc < 0:
                break                            # EINTR: a signal handler wants to run
            if wake_fd >= 0 and fds[nfds - 1].revents:
                while _dp_read(wake_fd, drain, sizeof(drain)) == sizeof(drain):
                    pass
                total += self.dp_poll(DP_BATCH)
                break
        return total

    def gc(self, int max_scan=DP_GC_BUDGET, now=None):
        """Bounded NAT expiry work: the expiry wheel's due buckets, at most
        `max_scan` connections examined (collected or re-bucketed), the rest
        left for the next call.  Call it every loop return (at least every
        20 ms): a closed flow's port is free within its timeout + ~0.2 s, and
        one call stalls the datapath thread no longer than max_scan
        collections (benchmarks/bench_nat.py measures it).  Returns how many
        connections were collected."""
        cdef uint64_t t = dp_now() if now is None else <uint64_t>(float(now) * 1e9)
        cdef uint32_t n
        with nogil:
            n = nat_gc(self.nat_c, t, max_scan)
        return n

    # -- the pipeline ---------------------------------------------------------------

    cdef void dp_count(self, int verdict, int reason) noexcept nogil:
        if verdict == VERDICT_PASS:
            self.st.passed += 1
        elif verdict == VERDICT_TX:
            self.st.tx += 1
        elif verdict == VERDICT_TX_LOCAL:
            self.st.tx_local += 1
        else:
            self.st.dropped += 1
            self.st.drops[drop_slot(reason)] += 1

    cdef Py_ssize_t dp_poll(self, int max_frames) noexcept nogil:
        cdef ring_frame_t fr[DP_BATCH]
        cdef int port, n, i, k
        cdef Py_ssize_t total = 0
        cdef uint64_t now = dp_now()
        if max_frames > DP_BATCH:
            max_frames = DP_BATCH
        _dp_memset(self.dirty, 0, sizeof(self.dirty))
        self.rx_writable = 1
        for port in range(self.n_rings):
            if self.rings[port] == NULL:
                continue
            n = ring_rx_batch(self.rings[port], fr, max_frames)
            for i in range(n):
                if fr[i].len < fr[i].wire_len:
                    self.dp_done(fr[i].data, fr[i].len, port, now, dp_ret(VERDICT_DROP, DROP_TRUNCATED))
                    continue
                self.dp_rx_frame(fr[i].data, fr[i].len, port, now, fr[i].vnet)
            if n:
                ring_rx_release(self.rings[port])
            total += n
        self.rx_writable = 0
        for k in range(self.n_rings):
            if self.dirty[k] and self.rings[k] != NULL:
                ring_tx_flush(self.rings[k])
        if self.dirty[DP_TUNNEL_PORT] and self.rings[DP_TUNNEL_PORT] != NULL:
            ring_tx_flush(self.rings[DP_TUNNEL_PORT])
        return total

    cdef void dp_rx_frame(self, const uint8_t *frame, int64_t length, int in_port, uint64_t now,
                          const uint8_t *vnet) noexcept nogil:
        """One received frame: handle it; a GSO frame bound for the tunnel is cut
        into segments first, each handled as a frame of its own."""
        cdef dp_out o
        cdef int r
        r = self.dp_handle(frame, length, in_port, now, vnet, &o)
        if (r & 0xff) == DP_SEGMENT:
            self.dp_segment(frame, length, in_port, now, NULL, 0)
            return
        self.dp_emit(&o)

    cdef void dp_emit(self, dp_out *o) noexcept nogil:
        """Copy an output frame into its port's TX ring (with its virtio_net_hdr)."""
        cdef uint8_t *buf
        cdef uint8_t *vh
        cdef uint32_t room
        cdef dp_vnet v
        cdef ring_t *r
        if o.port < 0:
            return
        if self.cap_buf != NULL:
            if self.cap_n < 256 and self.cap_used + o.length <= (1 << 20):
                self.cap_out[self.cap_n] = o[0]
                self.cap_out[self.cap_n].data = self.cap_buf + self.cap_used
                _dp_memcpy(self.cap_buf + self.cap_used, o.data, o.length)
                self.cap_used += o.length
                self.cap_n += 1
            return
        if self.rings[o.port] == NULL:
            return
        # the underlay and the tunnel device both lead to other nodes: what
        # is queued on one goes out before the other takes a frame (order)
        if o.port == 0 and self.dirty[DP_TUNNEL_PORT]:
            ring_tx_flush(self.rings[DP_TUNNEL_PORT])
            self.dirty[DP_TUNNEL_PORT] = 0
        elif o.port == DP_TUNNEL_PORT and self.dirty[0] and self.rings[0] != NULL:
            ring_tx_flush(self.rings[0])
            self.dirty[0] = 0
        r = self.rings[o.port]
        if o.gso_type and r.dfd >= 0:
            # a super-packet: sent straight from where it lies (ring_tx_direct)
            v.flags = 1 if o.csum_offset else 0
            v.gso_type = o.gso_type
            v.hdr_len = o.hdr_len
            v.gso_size = o.gso_size
            v.csum_start = o.csum_start
            v.csum_offset = o.csum_offset
            if ring_tx_direct(r, &v, o.data, <uint32_t>o.length) < 0:
                self.st.tx_errors += 1
                self.st.drops[<int>DROP_TX_FULL] += 1
            return
        buf = ring_tx_claim(r, &room)
        if buf == NULL:
            ring_tx_flush(r)                     # flush what is queued and retry once
            buf = ring_tx_claim(r, &room)
        if buf == NULL or room < o.length:
            self.st.tx_errors += 1
            self.st.drops[<int>DROP_TX_FULL] += 1
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
        self.dirty[o.port] = 1

    cdef int dp_segment(self, const uint8_t *frame, int64_t length, int in_port, uint64_t now,
                        dp_out *outs, int max_outs) noexcept nogil:
        """Cut a TCP/IPv4 GSO frame into gso_size segments with full checksums and
        run each through the pipeline; outputs are copied to outs (staging in
        self.reply is avoided: each output is emitted before the next segment)."""
        cdef PktInfo pi
        cdef int32_t hdr, l3, tcplen
        cdef int64_t payload, off, n
        cdef uint16_t mss = self.gso_size, id0
        cdef uint32_t seq0, sum
        cdef uint8_t *seg = self.segbuf
        cdef uint8_t *ip
        cdef uint8_t *tcp
        cdef int i = 0
        cdef dp_out o
        if pkt_parse(frame, length, &pi) or pi.ip_version != 4 or pi.proto != PKT_IPPROTO_TCP or pi.l4_off < 0:
            self.dp_done(frame, length, in_port, now, dp_ret(VERDICT_DROP, DROP_UNSUPPORTED))
            return 0
        hdr = pi.l4_off + ((frame[pi.l4_off + 12] >> 4) << 2)
        l3 = pi.l3_off
        payload = pi.l3_end - hdr
        if mss == 0 or hdr + mss > 9216 or payload <= 0:
            self.dp_done(frame, length, in_port, now, dp_ret(VERDICT_DROP, DROP_UNSUPPORTED))
            return 0
        self.gso_segmented += 1
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
            sum = csum_partial(ip + 12, 8, PKT_IPPROTO_TCP + <uint32_t>tcplen)
            be_store16(tcp + 16, csum_finish(csum_partial(tcp, tcplen, sum)))
            self.dp_handle(seg, hdr + n, in_port, now, NULL, &o)
            # dp_handle worked on its own copy (self.scratch / self.reply): emit
            # now, before the next segment reuses them
            self.dp_emit(&o)
            off += n
            i += 1
        return 0

    cdef void dp_gso_out(self, uint8_t *f, PktInfo *pi, dp_out *out) noexcept nogil:
        """A GSO super-packet leaves whole: the TCP checksum field becomes the
        pseudo-header sum of the new addresses (what NEEDS_CSUM expects), and
        the TX virtio_net_hdr carries the segmentation the kernel will do."""
        cdef uint8_t *ip = f + pi.l3_off
        cdef uint32_t tcplen = <uint32_t>(pi.l3_end - pi.l4_off)
        be_store16(f + pi.l4_off + 16, csum_fold(csum_partial(ip + 12, 8, PKT_IPPROTO_TCP + tcplen)))
        out.gso_type = self.gso_type
        out.gso_size = self.gso_size
        out.hdr_len = <uint16_t>(pi.l4_off + ((f[pi.l4_off + 12] >> 4) << 2))
        out.csum_start = <uint16_t>pi.l4_off
        out.csum_offset = 16
        self.gso_frames += 1

    cdef int dp_gso_fit(self, const uint8_t *f, PktInfo *pi) noexcept nogil:
        """Whether the super-packet's segments fit the tunnel: 0 yes, 1 no and DF
        set (frag-needed), 2 no and DF clear (cut here, as without the offload)."""
        cdef int64_t hdr, seg
        if pi.proto != PKT_IPPROTO_TCP or pi.l4_off < 0 or pi.l4_off + 20 > pi.l3_end:
            return 2                             # not a TCP super-packet: dp_segment refuses it
        hdr = pi.l4_off + ((f[pi.l4_off + 12] >> 4) << 2)
        seg = <int64_t>self.gso_size + hdr - pi.l3_off
        if seg <= <int64_t>self.mtu - 36 - pi.l3_off:
            return 0
        return 1 if pi.df else 2

    cdef int dp_gso_tunnel(self, uint8_t *f, int64_t length, PktInfo *pi, int node, int back_port,
                           dp_out *out) noexcept nogil:
        """A super-packet into the tunnel: whole to the kernel vxlan device
        (DP_TUNNEL_PORT) when the offload is on, else DP_SEGMENT.  Too big for
        the tunnel with DF: frag-needed back out of back_port."""
        cdef dp_node *n = &self.nodes[node]
        cdef int rc
        if not self.tnl_on:
            return dp_ret(DP_SEGMENT, 0)
        rc = self.dp_gso_fit(f, pi)
        if rc == 1:
            return self.dp_too_big(f, pi, back_port, self.mtu - 36 - pi.l3_off, out)
        if rc == 2:
            return dp_ret(DP_SEGMENT, 0)
        rc = pkt_ttl_decrement(f, pi)
        if rc:
            return dp_ret(VERDICT_DROP, rc)
        dp_vxlan_mac(f, n.ip)
        dp_vxlan_mac(f + 6, self.node_ip)
        self.dp_gso_out(f, pi, out)
        out.port = DP_TUNNEL_PORT
        out.data = f
        out.length = length
        self.st.encap += 1
        self.gso_tunneled += 1
        return dp_ret(VERDICT_TX, 0)

    cdef int dp_handle(self, const uint8_t *frame, int64_t length, int in_port, uint64_t now,
                       const uint8_t *vnet, dp_out *out) noexcept nogil:
        cdef uint8_t *f = self.scratch + DP_HEADROOM
        cdef int r
        cdef dp_vnet v
        cdef uint32_t at
        _dp_memset(out, 0, sizeof(dp_out))
        out.port = -1
        self.gso = 0
        if length < PKT_ETH_LEN or length > DP_SCRATCH - DP_HEADROOM:
            # a runt or an oversize frame: not ours from the underlay, a
            # malformed one from a pod
            r = dp_ret(VERDICT_PASS, 0) if in_port == 0 else dp_ret(VERDICT_DROP, DROP_MALFORMED)
            self.dp_done(frame, length, in_port, now, r)
            return r
        _dp_memset(&v, 0, sizeof(dp_vnet))
        if vnet != NULL:
            _dp_memcpy(&v, vnet, sizeof(dp_vnet))
        if v.gso_type != 0 and self.rx_writable:
            # a super-packet is rewritten where it lies (its RX slot) and sent
            # from there (dp_emit): 64 KiB copies saved.  It needs no headroom:
            # into the tunnel it goes whole to the vxlan device, or is cut.
            f = <uint8_t *>frame
        else:
            _dp_memcpy(f, frame, length)
        if vnet != NULL:
            if v.gso_type != 0:
                if (v.gso_type & 0x7f) != 1:     # only TCPV4 super-packets
                    r = dp_ret(VERDICT_DROP, DROP_UNSUPPORTED)
                    self.dp_done(frame, length, in_port, now, r)
                    return r
                self.gso = 1
                self.gso_type = v.gso_type
                self.gso_size = v.gso_size
            elif (v.flags & 1) and <int64_t>v.csum_start + v.csum_offset + 2 <= length:
                # CHECKSUM_PARTIAL from a local sender: finish it here
                at = v.csum_start + v.csum_offset
                be_store16(f + at, csum_finish(csum_partial(f + v.csum_start, length - v.csum_start, 0)))
                if be_load16(f + at) == 0 and f[23] == PKT_IPPROTO_UDP:
                    be_store16(f + at, 0xffff)
        if in_port == 0:
            r = self.dp_from_underlay(f, length, now, out)
        else:
            r = self.dp_from_pod(f, length, in_port, now, out)
        if (r & 0xff) == DP_SEGMENT:
            return r                             # counted per segment (or once if refused)
        self.dp_done(frame, length, in_port, now, r)
        return r

    cdef void dp_done(self, const uint8_t *frame, int64_t length, int in_port, uint64_t now,
                      int r) noexcept nogil:
        """Count a frame's verdict r (dp_ret), every path's one place: rx =
        passed + tx + tx_local + dropped, and the per-verdict packets and bytes,
        hold for every frame (runts, refused super-packets, truncated ones)."""
        self.st.rx += 1
        self.dp_count(r & 0xff, r >> 8)
        self.st.vpkts[r & 3] += 1
        self.st.vbytes[r & 3] += <uint64_t>length
        if self.flog != NULL and (r & 0xff) == VERDICT_DROP:
            self.dp_flow_drop(frame, length, in_port, r >> 8, now)

    cdef void dp_flow_drop(self, const uint8_t *frame, int64_t length, int in_port, int reason,
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
        if not flow_drop_allow(self.flog, <uint8_t>reason, now):
            return
        _dp_memset(src, 0, 16)
        _dp_memset(dst, 0, 16)
        if pkt_parse(p, n, &pi) or pi.ip_version != 4:
            flow_drop_record(self.flog, now, <uint8_t>reason, 0, 0, 0, 0, NULL, NULL,
                             FLOW_NO_POLICY, 0)
            return
        if (in_port == 0 and pi.proto == PKT_IPPROTO_UDP and pi.l4_off >= 0
                and pi.dport == self.vxlan_port and pi.l4_off + 16 + PKT_ETH_LEN < n):
            p = frame + pi.l4_off + 16          # UDP 8 + VXLAN 8: the inner frame
            n = length - (pi.l4_off + 16)
            if pkt_parse(p, n, &pi) or pi.ip_version != 4:
                p = frame
                n = length
                pkt_parse(p, n, &pi)
        be_store32(src, pi.src4)
        be_store32(dst, pi.dst4)
        flow_drop_record(self.flog, now, <uint8_t>reason, 4, pi.proto,
                         pi.sport if pi.has_ports else 0, pi.dport if pi.has_ports else 0,
                         src, dst, FLOW_NO_POLICY, pi.tcp_flags)

    cdef int dp_too_big(self, const uint8_t *f, PktInfo *pi, int port, uint32_t mtu,
                        dp_out *out) noexcept nogil:
        """Queue the ICMP frag-needed reply for the sender of f (back out of `port`)."""
        cdef int64_t n = pkt_icmp_too_big(f, pi, self.reply, 2048, mtu, NULL)
        if n > 0:
            out.port = port
            out.data = self.reply
            out.length = n
            self.st.icmp_too_big += 1
        return dp_ret(VERDICT_DROP, DROP_FRAG_NEEDED)

    cdef int dp_encap(self, uint8_t *f, int64_t length, PktInfo *pi, int node,
                      dp_out *out) noexcept nogil:
        """TTL, inner MACs, VXLAN towards cluster node `node`, out of the underlay."""
        cdef dp_node *n = &self.nodes[node]
        cdef int rc
        cdef int64_t ln
        if not n.valid or not n.has_mac:
            return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
        if self.gso:
            return self.dp_gso_tunnel(f, length, pi, node, 0, out)
        rc = pkt_ttl_decrement(f, pi)
        if rc:
            return dp_ret(VERDICT_DROP, rc)
        dp_vxlan_mac(f, n.ip)
        dp_vxlan_mac(f + 6, self.node_ip)
        ln = vxlan_encap_frame(f, length, &n.tmpl, vxlan_src_port(f, pi, &n.tmpl))
        out.port = 0
        out.data = f - VXLAN_OVERHEAD
        out.length = ln
        self.st.encap += 1
        return dp_ret(VERDICT_TX, 0)

    cdef int dp_egress(self, uint8_t *f, int64_t length, PktInfo *pi, uint32_t egress_ip,
                       bint policy, uint64_t now, dp_out *out) noexcept nogil:
        """SNAT to egress_ip (the node IP: masquerade) and out to the router."""
        cdef uint8_t a16[16]
        cdef int ext, rc
        cdef nat_tuple k, o
        _dp_memset(a16, 0, 16)
        be_store32(a16, egress_ip)
        ext = self.node_ext if egress_ip == self.node_ip else nat_ext_find(self.nat_c, 4, a16)
        if ext < 0:
            return dp_ret(VERDICT_DROP, DROP_NO_EGRESS_IP)
        if not self.has_router:
            return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
        if not pi.has_ports:
            return dp_ret(VERDICT_DROP, DROP_FRAGMENT if pi.frag == PKT_FRAG_LATER else DROP_UNSUPPORTED)
        rc = pkt_ttl_decrement(f, pi)
        if rc:
            return dp_ret(VERDICT_DROP, rc)
        dp_tuple4(&k, pi.proto, pi.tcp_flags, pi.src4, pi.sport, pi.dst4, pi.dport)
        rc = nat_translate_out_len(self.nat_c, &k, <uint32_t>ext, now, &o,
                                   <uint32_t>(pi.l3_end - pi.l3_off))
        if rc:
            return dp_ret(VERDICT_DROP, rc)
        rc = pkt_nat4(f, pi, PKT_NAT_SRC, be_load32(o.src), o.sport)
        if rc:
            return dp_ret(VERDICT_DROP, rc)
        _dp_memcpy(f, self.router_mac, 6)
        _dp_memcpy(f + 6, self.node_mac, 6)
        if self.gso:
            self.dp_gso_out(f, pi, out)
        out.port = 0
        out.data = f
        out.length = length
        if policy:
            self.st.snat_egress += 1
        else:
            self.st.masquerade += 1
        return dp_ret(VERDICT_TX, 0)

    cdef int dp_from_pod(self, uint8_t *f, int64_t length, int in_port, uint64_t now,
                         dp_out *out) noexcept nogil:
        cdef PktInfo pi
        cdef dp_port *p = &self.ports[in_port]
        cdef int rc, status
        cdef uint32_t egress = 0, gw = 0, node
        rc = pkt_parse(f, length, &pi)
        if rc:
            # ARP and the like are the kernel's (it answers for the pod gateway)
            return dp_ret(VERDICT_PASS, 0) if rc == DROP_UNSUPPORTED else dp_ret(VERDICT_DROP, rc)
        if pi.ip_version != 4:
            return dp_ret(VERDICT_PASS, 0)
        # inside the cluster (pods, nodes): the kernel routes it
        if dp_lpm4(self.pod_nodes_c, pi.dst4) != LPM_NONE or dp_lpm4(self.node_ips_c, pi.dst4) != LPM_NONE:
            return dp_ret(VERDICT_PASS, 0)
        if pi.src4 != p.pod_ip:
            return dp_ret(VERDICT_DROP, DROP_SPOOFED)
        if not p.has_pod_mac or dp_mac_differs(p.pod_mac, f + 6):
            _dp_memcpy(p.pod_mac, f + 6, 6)
            p.has_pod_mac = 1
        status = egress_map_lookup4(self.em_c, pi.src4, pi.dst4, &egress, &gw)
        if status == EGRESS_NO_GATEWAY:
            return dp_ret(VERDICT_DROP, DROP_NO_GATEWAY)
        if status != EGRESS_MATCH:
            return self.dp_egress(f, length, &pi, self.node_ip, False, now, out)
        if gw == self.node_ip:
            if egress == 0:
                return dp_ret(VERDICT_DROP, DROP_NO_EGRESS_IP)
            return self.dp_egress(f, length, &pi, egress, True, now, out)
        node = dp_lpm4(self.node_ips_c, gw)
        if node == LPM_NONE or not self.nodes[node].has_mac:
            return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
        if self.gso:
            return self.dp_gso_tunnel(f, length, &pi, node, in_port, out)
        rc = vxlan_check_mtu(&pi, length, &self.nodes[node].tmpl)
        if rc == DROP_FRAG_NEEDED:
            return self.dp_too_big(f, &pi, in_port, self.mtu - 36 - pi.l3_off, out)
        if rc:
            return dp_ret(VERDICT_DROP, rc)
        return self.dp_encap(f, length, &pi, node, out)

    cdef int dp_to_pod_or_node(self, uint8_t *f, int64_t length, PktInfo *pi,
                               dp_out *out) noexcept nogil:
        """Deliver an already translated packet to its pod: the local veth, or
        VXLAN to the pod's node."""
        cdef uint32_t port = dp_lpm4(self.local_pods_c, pi.dst4)
        cdef uint32_t node
        cdef int rc
        cdef dp_port *p
        if port != LPM_NONE:
            p = &self.ports[port]
            if not p.has_pod_mac:
                return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
            rc = pkt_ttl_decrement(f, pi)
            if rc:
                return dp_ret(VERDICT_DROP, rc)
            _dp_memcpy(f, p.pod_mac, 6)
            _dp_memcpy(f + 6, p.host_mac, 6)
            if self.gso:
                self.dp_gso_out(f, pi, out)
            out.port = <int>port
            out.data = f
            out.length = length
            return dp_ret(VERDICT_TX_LOCAL, 0)
        node = dp_lpm4(self.pod_nodes_c, pi.dst4)
        if node == LPM_NONE:
            return dp_ret(VERDICT_DROP, DROP_NO_ROUTE)
        return self.dp_encap(f, length, pi, node, out)

    cdef int dp_from_underlay(self, uint8_t *f, int64_t length, uint64_t now,
                              dp_out *out) noexcept nogil:
        cdef PktInfo pi, ipi
        cdef VxlanDecapInfo d
        cdef int rc, status
        cdef uint32_t sender, src_node, egress = 0, gw = 0, port, node
        cdef uint8_t *g
        cdef int64_t glen
        cdef uint8_t a16[16]
        cdef nat_tuple k, o
        rc = pkt_parse(f, length, &pi)
        if rc or pi.ip_version != 4:
            return dp_ret(VERDICT_PASS, 0)
        # ---- VXLAN to this node
        if (pi.dst4 == self.node_ip and pi.proto == PKT_IPPROTO_UDP and pi.l4_off >= 0
                and pi.dport == self.vxlan_port):
            sender = dp_lpm4(self.node_ips_c, pi.src4)
            if sender == LPM_NONE:
                return dp_ret(VERDICT_DROP, DROP_NOT_CLUSTER_NODE)
            rc = vxlan_decap_frame(f, length, self.vxlan_port, self.vni, &d)
            if rc:
                return dp_ret(VERDICT_DROP, rc)
            g = f + d.inner_off
            glen = d.inner_len
            rc = pkt_parse(g, glen, &ipi)
            if rc:
                return dp_ret(VERDICT_DROP, rc)
            if ipi.ip_version != 4:
                return dp_ret(VERDICT_DROP, DROP_UNSUPPORTED)
            self.st.decap += 1
            port = dp_lpm4(self.local_pods_c, ipi.dst4)
            if port != LPM_NONE:
                # a gateway's reply (or a relayed ICMP error) for a pod here
                return self.dp_to_pod_or_node(g, glen, &ipi, out)
            # gateway role: the sender must host the inner source, and a
            # policy must send (source, destination) to this node
            src_node = dp_lpm4(self.pod_nodes_c, ipi.src4)
            if src_node == LPM_NONE or src_node != sender:
                return dp_ret(VERDICT_DROP, DROP_POLICY_DENIED)
            status = egress_map_lookup4(self.em_c, ipi.src4, ipi.dst4, &egress, &gw)
            if status != EGRESS_MATCH or gw != self.node_ip:
                return dp_ret(VERDICT_DROP, DROP_POLICY_DENIED)
            if egress == 0:
                return dp_ret(VERDICT_DROP, DROP_NO_EGRESS_IP)
            return self.dp_egress(g, glen, &ipi, egress, True, now, out)
        # ---- replies to an egress IP / the node IP
        _dp_memset(a16, 0, 16)
        be_store32(a16, pi.dst4)
        if nat_ext_find(self.nat_c, 4, a16) < 0:
            return dp_ret(VERDICT_PASS, 0)
        if pi.icmp_err:
            if not pi.in_has_ports:
                return dp_ret(VERDICT_PASS, 0)
            # the quote is our translated packet: look its flow up as a reply
            dp_tuple4(&k, pi.in_proto, 0, pi.in_dst4, pi.in_dport, pi.in_src4, pi.in_sport)
            if nat_peek_in(self.nat_c, &k, now, &o):
                return dp_ret(VERDICT_PASS, 0)
            rc = pkt_nat4(f, &pi, PKT_NAT_DST, be_load32(o.dst), o.dport)
            if rc:
                return dp_ret(VERDICT_DROP, rc)
            self.st.icmp_errors += 1
            return self.dp_to_pod_or_node(f, length, &pi, out)
        if pi.proto == PKT_IPPROTO_ICMP:
            if pi.icmp_type != 0 or not pi.has_ports:
                return dp_ret(VERDICT_PASS, 0)      # echo requests etc.: the kernel's
        elif pi.proto == PKT_IPPROTO_TCP or pi.proto == PKT_IPPROTO_UDP:
            if pi.l4_off < 0 or pi.dport < self.nat_lo or pi.dport > self.nat_hi:
                return dp_ret(VERDICT_PASS, 0)
        else:
            return dp_ret(VERDICT_PASS, 0)
        dp_tuple4(&k, pi.proto, pi.tcp_flags, pi.src4, pi.sport, pi.dst4, pi.dport)
        rc = nat_translate_in_len(self.nat_c, &k, now, &o, <uint32_t>(pi.l3_end - pi.l3_off))
        if rc:
            return dp_ret(VERDICT_DROP, rc)
        # too big for the tunnel back to the pod's node: tell the sender now,
        # quoting the packet as it sent it (from the address it talked to)
        if dp_lpm4(self.local_pods_c, be_load32(o.dst)) == LPM_NONE:
            if self.gso:
                # checked before the translation, so a frag-needed quotes what the sender sent
                rc = self.dp_gso_fit(f, &pi)
                if not self.tnl_on or rc == 2:
                    return dp_ret(DP_SEGMENT, 0)
                if rc == 1:
                    return self.dp_too_big(f, &pi, 0, self.mtu - 36 - pi.l3_off, out)
            else:
                node = dp_lpm4(self.pod_nodes_c, be_load32(o.dst))
                if node != LPM_NONE and self.nodes[node].has_mac:
                    rc = vxlan_check_mtu(&pi, length, &self.nodes[node].tmpl)
                    if rc == DROP_FRAG_NEEDED:
                        return self.dp_too_big(f, &pi, 0, self.mtu - 36 - pi.l3_off, out)
                    if rc:
                        return dp_ret(VERDICT_DROP, rc)
        rc = pkt_nat4(f, &pi, PKT_NAT_DST, be_load32(o.dst), o.dport)
        if rc:
            return dp_ret(VERDICT_DROP, rc)
        self.st.reverse_nat += 1
        return self.dp_to_pod_or_node(f, length, &pi, out)

