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
#
# IPv6 pods (node_ip6 given): the same roles for IPv6 sources and
# destinations, IPv6 inner frames in VXLAN over the IPv4 underlay (or over
# the IPv6 one with underlay6), NAT66 in the same NAT table: v6.pyx.
#
# Files: stages.pyx (shared steps), egress.pyx (from pods), ingress.pyx (from
# the underlay), v6.pyx (the IPv6 stages), emit.pyx (batch, TX,
# segmentation); this file: the Datapath class (configuration, counters, the
# loop) over one dp_ctx.
from libc.stdlib cimport malloc as _dp_malloc, calloc as _dp_calloc, free as _dp_free

cdef extern from "<poll.h>" nogil:
    struct _dp_pollfd "pollfd":
        int fd
        short events
        short revents
    int _dp_poll "poll"(_dp_pollfd *fds, unsigned long nfds, int timeout)
    short _DP_POLLIN "POLLIN"

cdef extern from "<unistd.h>" nogil:
    ssize_t _dp_read "read"(int fd, void *buf, size_t n)

cdef extern from "<time.h>" nogil:
    # _dp_timespec and _DP_CLOCK_MONOTONIC come from stages.pyx (posix.time)
    int _dp_clock_nanosleep "clock_nanosleep"(int clock, int flags, const _dp_timespec *t, _dp_timespec *rem)


cdef enum:
    DP_GC_SCAN = 1024           # connections one gc pass examines at most
    DP_GC_EVERY_NS = 20000000   # run() does a gc pass itself this often (20 ms)
    DP_AWAY_LONG_NS = 10000000  # loop_counters() away_long: out of the C loop longer than this (10 ms)

DP_GC_BUDGET = DP_GC_SCAN     # Datapath.gc's default


cdef inline bint dp_drain_wake(int wake_fd) noexcept nogil:
    """Empty the wake pipe (none: wake_fd < 0); 1 if it held anything.  run()
    does it whatever ends it: a byte left behind (a signal's, written to the
    wakeup fd while the loop napped) would end the next run() at its first gc
    pass for nothing."""
    cdef char drain[64]
    cdef ssize_t n
    cdef bint got = 0
    if wake_fd < 0:
        return 0
    while True:
        n = _dp_read(wake_fd, drain, sizeof(drain))
        got = got or n > 0
        if n != sizeof(drain):
            return got


def _dp_addr6(value, what):
    """The 16 bytes (network order) of an IPv6 address, else ValueError naming `what`."""
    fam, packed = addr_packed16(value, what)
    if fam != 6:
        raise ValueError(f"{what} must be an IPv6 address, not {value!r}")
    return packed


_DP_STAT_NAMES = ("rx", "passed", "tx", "tx_local", "dropped", "encap", "decap", "snat_egress",
                  "masquerade", "reverse_nat", "icmp_too_big", "icmp_errors", "tx_errors")


cdef class Datapath:
    """One node's fused egress-gateway datapath (see datapath.pyx's header).

    Datapath(node_ip, node_mac, egress_map, nat, *, vni=2, vxlan_port=8472,
             mtu=1500, nat_port_range=(32768, 65534), node_ip6=None)

    The NAT table must hold the node IP (masquerade) and this node's egress
    IPs.  node_ip6 (the node's IPv6 address) turns the IPv6 datapath on
    (datapath/v6.pyx): IPv6 pod traffic is masqueraded to it by default;
    without it every IPv6 frame is left to the kernel.  IPv6 pods, pod
    CIDRs and node addresses come with add_pod_port(pod_ip6=),
    add_node(pod_cidrs with IPv6 ones, ip6=) and set_router6().
    underlay6=True (with node_ip6) carries VXLAN over the nodes' IPv6
    addresses instead of their IPv4 ones (a node without ip6 is then
    unreachable: no_route); the tunnel offload is then refused.
    Configure with add_node / set_router / add_pod_port, then either
    process() frames (tests, embedding) or attach PacketRings and run()
    (or poll() one batch at a time).
    One thread per Datapath.
    """

    @property
    def gso_frames(self):
        """Super-packets passed through whole."""
        return self.c.gso_frames

    @property
    def gso_segmented(self):
        """Super-packets cut into segments (for VXLAN)."""
        return self.c.gso_segmented

    @property
    def gso_tunneled(self):
        """Super-packets handed whole to the kernel vxlan device."""
        return self.c.gso_tunneled

    def __cinit__(self):
        self.c.scratch = <uint8_t *>_dp_malloc(DP_SCRATCH)
        self.c.reply = <uint8_t *>_dp_malloc(2048)
        self.c.segbuf = <uint8_t *>_dp_malloc(9216 + 128)
        self.c.pol = <dp_policy *>_dp_calloc(POLICY_SLOTS, sizeof(dp_policy))
        if self.c.scratch == NULL or self.c.reply == NULL or self.c.segbuf == NULL or self.c.pol == NULL:
            raise no_memory("Datapath scratch buffers")
        _dp_memset(&self.c.st, 0, sizeof(dp_stats))
        _dp_memset(self.c.ports, 0, sizeof(self.c.ports))
        _dp_memset(self.c.pod_mac_own, 0, sizeof(self.c.pod_mac_own))
        self.c.pod_macs = self.c.pod_mac_own
        _dp_memset(self.c.nodes, 0, sizeof(self.c.nodes))
        _dp_memset(self.c.rings, 0, sizeof(self.c.rings))
        self.c.emit = dp_emit

    def __dealloc__(self):
        _dp_free(self.c.scratch)
        _dp_free(self.c.reply)
        _dp_free(self.c.segbuf)
        _dp_free(self.c.pol)

    def __init__(self, node_ip, node_mac, EgressMap egress_map not None, NatTable nat not None, *,
                 vni=2, vxlan_port=8472, mtu=1500, nat_port_range=(32768, 65534), node_ip6=None,
                 underlay6=False):
        self.c.node_ip = addr_v4(node_ip, "node_ip")
        mac = mac_bytes(node_mac, "node_mac")
        _dp_memcpy(self.c.node_mac, <const char *>mac, 6)
        if not isinstance(vni, int) or not 0 <= vni < 1 << 24:
            raise ValueError(f"vni must be in 0..16777215, not {vni!r}")
        if not isinstance(vxlan_port, int) or not 1 <= vxlan_port <= 65535:
            raise ValueError(f"vxlan_port must be in 1..65535, not {vxlan_port!r}")
        if not isinstance(mtu, int) or not 576 <= mtu <= 9000:
            raise ValueError(f"mtu must be in 576..9000, not {mtu!r}")
        lo, hi = nat_port_range
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"nat_port_range must be (lo, hi) within 1..65535, not {nat_port_range!r}")
        self.c.vni = vni
        self.c.vxlan_port = vxlan_port
        self.c.mtu = mtu
        self.c.nat_lo = lo
        self.c.nat_hi = hi
        self.egress_map = egress_map
        self.nat = nat
        self.c.em_c = egress_map.c
        self.c.nat_c = nat.t
        if self.c.nat_c == NULL or self.c.em_c == NULL:
            raise ValueError("egress_map and nat must be initialised tables")
        self.c.node_ext = nat.add_egress_ip(str(_ipaddress.IPv4Address(self.c.node_ip)))
        self.pod_nodes = LPMTrie(4)
        self.node_ips = LPMTrie(4)
        self.local_pods = LPMTrie(4)
        self.c.pod_nodes_c = self.pod_nodes.c
        self.c.node_ips_c = self.node_ips.c
        self.c.local_pods_c = self.local_pods.c
        self.pod_nodes6 = LPMTrie(6)
        self.node_ips6 = LPMTrie(6)
        self.local_pods6 = LPMTrie(6)
        self.c.pod_nodes6_c = self.pod_nodes6.c
        self.c.node_ips6_c = self.node_ips6.c
        self.c.local_pods6_c = self.local_pods6.c
        if underlay6 and node_ip6 is None:
            raise ValueError("underlay6 (VXLAN over IPv6) needs node_ip6")
        if node_ip6 is not None:
            over = VXLAN6_OVERHEAD if underlay6 else VXLAN_OVERHEAD
            if mtu < 1280 + over:
                raise ValueError(f"an IPv6 datapath needs mtu >= {1280 + over} (the IPv6 minimum "
                                 f"1280 through VXLAN), not {mtu}")
            if underlay6:
                self.c.underlay6 = 1
                self.c.mtu = mtu - (VXLAN6_OVERHEAD - VXLAN_OVERHEAD)
            packed = _dp_addr6(node_ip6, "node_ip6")
            _dp_memcpy(self.c.node_ip6, <const char *>packed, 16)
            self.c.node_ext6 = nat.add_egress_ip(str(_ipaddress.IPv6Address(packed)))
            self.c.has_ip6 = 1
        self._rings = {}
        self.c.ports[0].used = 1
        _dp_memcpy(self.c.ports[0].host_mac, self.c.node_mac, 6)

    # -- configuration (Python, between batches) --------------------------------

    @property
    def underlay6(self):
        """True: VXLAN between nodes runs over their IPv6 addresses."""
        return bool(self.c.underlay6)

    @property
    def node_ip6(self):
        """The node's IPv6 address (str), or None: the IPv6 datapath is off."""
        return str(_ipaddress.IPv6Address(bytes(self.c.node_ip6[:16]))) if self.c.has_ip6 else None

    def add_node(self, int index, ip, pod_cidrs=(), mac=None, ip6=None):
        """Cluster node `index` (0..255): underlay IP, pod CIDRs (IPv4 and
        IPv6), MAC (None: not yet known), IPv6 address (ip6: pod traffic to
        it stays the kernel's, as to the IPv4 one)."""
        if not 0 <= index < DP_MAX_NODES:
            raise ValueError(f"node index must be in 0..{DP_MAX_NODES - 1}, not {index}")
        cdef dp_node *n = &self.c.nodes[index]
        new_ip = addr_v4(ip, "node ip")
        if n.valid and n.ip != new_ip and self.pins is not None:
            self.pins.flush_node(index)          # pins name the node by index: not another node's
        n.ip = new_ip
        n.valid = 1
        self.node_ips[f"{_ipaddress.IPv4Address(n.ip)}/32"] = index
        if ip6 is not None:
            packed = _dp_addr6(ip6, "node ip6")
            _dp_memcpy(n.ip6, <const char *>packed, 16)
            n.has_ip6 = 1
            self.node_ips6[f"{_ipaddress.IPv6Address(packed)}/128"] = index
        for cidr in pod_cidrs:
            net = _ipaddress.ip_network(cidr)
            if net.version == 4:
                self.pod_nodes[str(net)] = index
            else:
                self.pod_nodes6[str(net)] = index
        self.set_node_mac(index, mac)

    def remove_node(self, int index):
        if not 0 <= index < DP_MAX_NODES or not self.c.nodes[index].valid:
            return
        for key, v in list(self.pod_nodes.items()):
            if v == index:
                del self.pod_nodes[key]
        for key, v in list(self.node_ips.items()):
            if v == index:
                del self.node_ips[key]
        for trie in (self.pod_nodes6, self.node_ips6):
            for key, v in list(trie.items()):
                if v == index:
                    del trie[key]
        _dp_memset(&self.c.nodes[index], 0, sizeof(dp_node))
        if self.pins is not None:
            self.pins.flush_node(index)

    def set_node_mac(self, int index, mac):
        """The underlay MAC of node `index` (None: unknown, VXLAN to it is DROP_NO_ROUTE)."""
        if not 0 <= index < DP_MAX_NODES or not self.c.nodes[index].valid:
            raise ValueError(f"no node {index}")
        cdef dp_node *n = &self.c.nodes[index]
        if mac is None:
            n.has_mac = 0
            return
        m = mac_bytes(mac, "node mac")
        _dp_memcpy(n.mac, <const char *>m, 6)
        vxlan_tmpl_init(&n.tmpl, self.c.node_mac, n.mac, self.c.node_ip, n.ip, self.c.vni, self.c.vxlan_port,
                        64, self.c.mtu, 32768, 61000)
        if self.c.underlay6 and n.has_ip6:
            vxlan6_tmpl_init(&n.tmpl6, self.c.node_mac, n.mac, self.c.node_ip6, n.ip6, self.c.vni,
                             self.c.vxlan_port, 64, self.c.mtu + VXLAN6_OVERHEAD - VXLAN_OVERHEAD, 32768, 61000)
        n.has_mac = 1

    def set_router(self, mac):
        """The MAC of the underlay's default next hop (traffic leaving the cluster)."""
        if mac is None:
            self.c.has_router = 0
            return
        m = mac_bytes(mac, "router mac")
        _dp_memcpy(self.c.router_mac, <const char *>m, 6)
        self.c.has_router = 1

    def set_router6(self, mac):
        """The MAC of the underlay's IPv6 default next hop (None: IPv6 traffic
        leaving the cluster uses set_router's)."""
        if mac is None:
            self.c.has_router6 = 0
            return
        m = mac_bytes(mac, "router6 mac")
        _dp_memcpy(self.c.router6_mac, <const char *>m, 6)
        self.c.has_router6 = 1

    def add_pod_port(self, int port, pod_ip, host_mac, pod_mac=None, pod_ip6=None):
        """Veth `port` (1..63) leads to the local pod `pod_ip` (IPv4, or None
        for an IPv6-only pod) and `pod_ip6` (its IPv6 address, or None);
        host_mac is our end's MAC."""
        if not 1 <= port < DP_MAX_PORTS:
            raise ValueError(f"pod port must be in 1..{DP_MAX_PORTS - 1}, not {port}")
        if pod_ip is None and pod_ip6 is None:
            raise ValueError("a pod port needs pod_ip or pod_ip6")
        cdef dp_port *p = &self.c.ports[port]
        new4 = 0 if pod_ip is None else addr_v4(pod_ip, "pod_ip")
        new6 = None if pod_ip6 is None else _dp_addr6(pod_ip6, "pod_ip6")
        old = p.pod_ip
        if p.used and old:
            self.local_pods.pop(f"{_ipaddress.IPv4Address(old)}/32", None)
        if p.used and p.has_ip6:
            self.local_pods6.pop(f"{_ipaddress.IPv6Address(bytes(p.pod_ip6[:16]))}/128", None)
        p.has_ip6 = 0
        if new6 is not None:
            _dp_memcpy(p.pod_ip6, <const char *>new6, 16)
            p.has_ip6 = 1
        p.pod_ip = new4
        hm = mac_bytes(host_mac, "host_mac")
        _dp_memcpy(p.host_mac, <const char *>hm, 6)
        if pod_mac is None:
            dp_podmac_store(&self.c.pod_macs[port], 0)   # learned from the pod's first frame
        else:
            pm = mac_bytes(pod_mac, "pod_mac")
            dp_podmac_store(&self.c.pod_macs[port], dp_podmac_word(<const uint8_t *><const char *>pm))
        p.used = 1
        if p.pod_ip:
            self.local_pods[f"{_ipaddress.IPv4Address(p.pod_ip)}/32"] = port
        if p.has_ip6:
            self.local_pods6[f"{_ipaddress.IPv6Address(new6)}/128"] = port

    def share_pod_macs(self, Datapath owner not None):
        """Use owner's table of pod MACs from now on (the workers of one
        agent): the MAC one worker learns from a pod's frame is the one every
        worker delivers the pod's replies with, whichever worker the fanout
        steers a reply to.  MACs this one knows and owner does not are
        carried over.  Call it while neither forwards."""
        cdef int k
        if self.c.pod_macs == owner.c.pod_macs:
            return
        for k in range(DP_MAX_PORTS):
            if not owner.c.pod_macs[k]:
                owner.c.pod_macs[k] = self.c.pod_macs[k]
        self._mac_owner = owner     # its table (or the one it shares) lives as long as this Datapath
        self.c.pod_macs = owner.c.pod_macs

    def remove_pod_port(self, int port):
        if not 1 <= port < DP_MAX_PORTS or not self.c.ports[port].used:
            return
        if self.c.ports[port].pod_ip:
            self.local_pods.pop(f"{_ipaddress.IPv4Address(self.c.ports[port].pod_ip)}/32", None)
        if self.c.ports[port].has_ip6:
            self.local_pods6.pop(f"{_ipaddress.IPv6Address(bytes(self.c.ports[port].pod_ip6[:16]))}/128", None)
        self.detach_ring(port)
        _dp_memset(&self.c.ports[port], 0, sizeof(dp_port))
        dp_podmac_store(&self.c.pod_macs[port], 0)

    def attach_ring(self, int port, PacketRing ring not None):
        """Receive and transmit port `port`'s frames through `ring` (poll())."""
        if not 0 <= port < DP_MAX_PORTS or not self.c.ports[port].used:
            raise ValueError(f"port {port} is not configured")
        if not (ring.has_rx and ring.has_tx):
            raise ValueError("the ring must have both RX and TX")
        self._rings[port] = ring
        self.c.rings[port] = &ring.r
        self.c.n_rings = max(self.c.n_rings, port + 1)

    def detach_ring(self, int port):
        if port == DP_TUNNEL_PORT:
            self.detach_tunnel()
        elif 0 <= port < DP_MAX_PORTS:
            self._rings.pop(port, None)
            self.c.rings[port] = NULL

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
        if self.c.underlay6:
            raise ValueError("the tunnel offload is IPv4's: not with underlay6")
        self._rings[DP_TUNNEL_PORT] = ring
        self.c.rings[DP_TUNNEL_PORT] = &ring.r
        self.c.tnl_on = 1

    def detach_tunnel(self):
        self._rings.pop(DP_TUNNEL_PORT, None)
        self.c.rings[DP_TUNNEL_PORT] = NULL
        self.c.tnl_on = 0

    @property
    def tunnel_offload(self):
        """True: tunnel-bound super-packets go whole to TUNNEL_PORT; False: cut here.
        Settable without a ring for process_frames() (tests)."""
        return bool(self.c.tnl_on)

    @tunnel_offload.setter
    def tunnel_offload(self, bint on):
        self.c.tnl_on = on

    @property
    def rings_attached(self):
        return dict(self._rings)

    # -- counters -----------------------------------------------------------------

    def counters(self):
        """{'rx': .., 'tx': .., ..., 'drops': {reason name: count}} (non-zero drop reasons)."""
        cdef uint64_t *v = &self.c.st.rx
        out = {name: v[i] for i, name in enumerate(_DP_STAT_NAMES)}
        out["drops"] = {DROP_REASON_NAMES[i]: self.c.st.drops[i]
                        for i in range(1, DROP_REASON_MAX) if self.c.st.drops[i]}
        out["verdicts"] = {name: {"packets": self.c.st.vpkts[i], "bytes": self.c.st.vbytes[i]}
                           for i, name in enumerate(("pass", "tx", "tx_local", "drop"))}
        out["gso"] = {"whole": self.c.gso_frames, "tunneled": self.c.gso_tunneled, "segmented": self.c.gso_segmented}
        if self.pins is not None:
            out["pins"] = self.pins.stats()
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
        self.c.flog = NULL if log is None else (<FlowLog>log)._get()
        self._flow_log = log

    # -- make-before-break ------------------------------------------------------------

    def set_make_before_break(self, bint on=True, capacity=GWPIN_DEFAULT_CAPACITY, seed=None):
        """Make-before-break on (a new, empty GatewayPins of `capacity` records
        with the NAT table's timeouts) or off (pins dropped).  On, a connection
        from a local pod keeps the gateway it started on while that gateway is
        usable and its pin lives (idle timeouts as the NAT table's), when the
        egress map now chooses another; as a gateway, this node keeps
        translating connections it has a live NAT entry for when the map no
        longer sends them here (new connections still need the map).  Costs
        one pin lookup per packet from a pod (benchmarks/compare_datapath.py).
        Call on the datapath's thread (between batches)."""
        if not on:
            self.c.pins = NULL
            self.pins = None
            return
        pins = GatewayPins(capacity, {k: v for k, v in self.nat.timeouts.items() if k != "tcp_syn"}, seed)
        self.pins = pins
        self.c.pins = pins.t

    @property
    def make_before_break(self):
        return self.pins is not None

    def flush_gateway(self, ip):
        """Drop the pins on gateway `ip` (a cluster node's underlay IP): it is
        down, so its connections move to the map's choice at their next
        packet.  Returns how many were dropped (0 when off or not a node).
        Call on the datapath's thread (between batches)."""
        addr = addr_v4(ip, "gateway ip")
        if self.pins is None:
            return 0
        index = self.node_ips.get(f"{_ipaddress.IPv4Address(addr)}/32")
        if index is None:
            return 0
        return self.pins.flush_node(index)

    def policy_counters(self, slots=None):
        """Per-policy counters of the policy slots that saw traffic (or of
        the given `slots`, each present even when zero):
        {slot: {"redirect" | "egress" | "reply": {"packets": n, "bytes": n},
        "drops": {reason name: n}, "connections_opened": n,
        "connections_live": n}}.  Slot N is policy id N (the egress map's)
        up to POLICY_COUNTED_SLOTS (4096); slot 0 sums every larger id.
        redirect: frames a pod here sent through the tunnel to its gateway;
        egress: frames SNATed here to the policy's egress IP; reply: replies
        translated back to the pod; bytes are the pod-side frames (Ethernet
        header included, no VXLAN).  Connections come from the NAT table
        (opened and live under the policy); drops are the policy's frames
        dropped, by reason."""
        cdef Py_ssize_t i, d, k
        cdef dp_policy *p
        cdef uint64_t any_
        conns = self.nat.policy_connections()
        wanted = None if slots is None else {int(x) for x in slots}
        if wanted is not None and not all(0 <= x < POLICY_SLOTS for x in wanted):
            raise ValueError(f"policy slots are 0..{POLICY_SLOTS - 1}, not {sorted(wanted)!r}")
        out = {}
        for i in (range(POLICY_SLOTS) if wanted is None else sorted(wanted)):
            p = &self.c.pol[i]
            any_ = 0
            for d in range(DP_POL_DIRS):
                any_ |= p.pkts[d]
            for k in range(DROP_REASON_MAX):
                any_ |= p.drops[k]
            if not any_ and i not in conns and wanted is None:
                continue
            opened, live = conns.get(i, (0, 0))
            rec = {name: {"packets": p.pkts[d], "bytes": p.bytes[d]}
                   for d, name in enumerate(("redirect", "egress", "reply"))}
            rec["drops"] = {DROP_REASON_NAMES[k]: p.drops[k] for k in range(1, DROP_REASON_MAX) if p.drops[k]}
            rec["connections_opened"] = opened
            rec["connections_live"] = live
            out[i] = rec
        return out

    def reset_counters(self):
        """Zero the datapath's counters, the per-policy ones included (not the NAT table's)."""
        _dp_memset(&self.c.st, 0, sizeof(dp_stats))
        _dp_memset(self.c.pol, 0, POLICY_SLOTS * sizeof(dp_policy))

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
        if not 0 <= port < DP_MAX_PORTS or not self.c.ports[port].used:
            raise ValueError(f"port {port} is not configured")
        t = dp_now() if now is None else <uint64_t>(float(now) * 1e9)
        with nogil:
            dp_read_begin()
            r = dp_handle(&self.c, &b[0], b.shape[0], port, t, NULL, &o)
            dp_read_end()
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
        if not 0 <= port < DP_MAX_PORTS or not self.c.ports[port].used:
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
        cdef dp_out outs[256]
        cdef dp_sink sink
        _dp_memset(&sink, 0, sizeof(dp_sink))
        sink.buf = <uint8_t *>_dp_malloc(1 << 20)
        if sink.buf == NULL:
            raise no_memory("capture buffer")
        sink.size = 1 << 20
        sink.outs = outs
        sink.max = 256
        self.c.sink = &sink
        self.c.emit = dp_capture
        try:
            with nogil:
                dp_read_begin()
                dp_rx_frame(&self.c, &b[0], b.shape[0] - 1, port, t, vp)
                dp_read_end()
            out = []
            for i in range(sink.n):
                o = outs[i]
                vh = None
                if o.gso_type or o.csum_offset:
                    vh = {"flags": 1 if o.csum_offset else 0, "gso_type": o.gso_type, "hdr_len": o.hdr_len,
                          "gso_size": o.gso_size, "csum_start": o.csum_start, "csum_offset": o.csum_offset}
                out.append((o.port, bytes((<char *>o.data)[:o.length]), vh))
            return out
        finally:
            self.c.emit = dp_emit
            self.c.sink = NULL
            _dp_free(sink.buf)

    def process_batch(self, const uint8_t[::1] frames, const int64_t[::1] offsets, const int64_t[::1] lengths,
                      int32_t[::1] verdicts, uint8_t[::1] out, int64_t[:, ::1] out_meta, port=0, now=None):
        """Run frames received on `port` through the ring loop's per-batch
        step (dp_rx_frames, GIL released, no Python per frame), with the
        output going to `out` instead of a TX ring.  `port` is one port for
        all frames, or an int32 array of each frame's port (each run of one
        port is a batch, as one ring's is).

        Frame i is frames[offsets[i]:offsets[i] + lengths[i]] (NumPy arrays:
        uint8, int64, int64).  verdicts[i] (int32) gets its code: verdict =
        code & 0xff (0 pass, 1 tx, 2 tx_local, 3 drop), reason = code >> 8 (a
        DropReason).  Output frames are packed into `out` (uint8); row j of
        out_meta (int64, shape (max outputs, 4)) is (input frame, port,
        offset in out, length).  Outputs that do not fit are counted as a
        full TX ring's (tx_errors, tx_full).  The clock is read once per
        DP_BATCH frames, as poll() does, unless `now` (seconds) is given.
        Returns the number of outputs."""
        cdef Py_ssize_t n = offsets.shape[0], i, b, k, m, pf = 0, held
        cdef ring_frame_t fr[DP_BATCH]
        cdef dp_sink sink
        cdef bint fixed = now is not None
        cdef uint64_t t = <uint64_t>(float(now) * 1e9) if fixed else 0
        cdef uint8_t dummy = 0
        cdef int32_t one
        cdef const int32_t[::1] ports
        cdef Py_ssize_t step = 0
        if lengths.shape[0] != n or verdicts.shape[0] < n:
            raise ValueError(f"offsets, lengths and verdicts must cover the same {n} frames")
        if out_meta.shape[1] != 4:
            raise ValueError(f"out_meta must have 4 columns, not {out_meta.shape[1]}")
        if isinstance(port, int):
            one = port if 0 <= port < DP_MAX_PORTS else -1
            ports = <int32_t[:1]>&one
        else:
            ports = port
            step = 1
            if ports.shape[0] != n:
                raise ValueError(f"ports must give the port of each of the {n} frames")
        for i in range(ports.shape[0]):
            if not 0 <= ports[i] < DP_MAX_PORTS or not self.c.ports[ports[i]].used:
                raise ValueError(f"port {port if step == 0 else ports[i]} (frame {i}) is not configured")
        for i in range(n):
            if offsets[i] < 0 or lengths[i] < 0 or lengths[i] > 0xffffffff or offsets[i] + lengths[i] > frames.shape[0]:
                raise ValueError(f"frame {i} (offset {offsets[i]}, length {lengths[i]}) is outside frames")
        _dp_memset(&sink, 0, sizeof(dp_sink))
        sink.buf = &out[0] if out.shape[0] else &dummy
        sink.size = out.shape[0]
        sink.max = out_meta.shape[0]
        sink.cur = -1
        sink.outs = <dp_out *>_dp_malloc(sizeof(dp_out) * (sink.max + 1))
        sink.frame = <int32_t *>_dp_malloc(sizeof(int32_t) * (sink.max + 1))
        if sink.outs == NULL or sink.frame == NULL:
            _dp_free(sink.outs)
            _dp_free(sink.frame)
            raise no_memory("process_batch outputs")
        self.c.sink = &sink
        self.c.emit = dp_capture
        self.c.pin_ahead = self.c.pins != NULL and self.c.pins.prefetch
        try:
            with nogil:
                # One read section per DP_BATCH input frames (a writer waits
                # for no more), not one per run of one port: a run may be one
                # frame long (pods interleaved), and each section costs a fence.
                b = 0
                held = 0
                dp_read_begin()
                self.c.read_held = 1
                while b < n:
                    m = 1
                    while m < DP_BATCH and b + m < n and ports[(b + m) * step] == ports[b * step]:
                        m += 1
                    if b + m - held > DP_BATCH:         # a section covers at most DP_BATCH frames
                        dp_read_end()
                        dp_read_begin()
                        held = b
                    for k in range(m):
                        fr[k].data = &frames[offsets[b + k]] if lengths[b + k] else &dummy
                        fr[k].vnet = NULL
                        fr[k].len = <uint32_t>lengths[b + k]
                        fr[k].wire_len = fr[k].len
                    if self.c.pin_ahead:
                        # pins DP_PIN_AHEAD frames ahead across batches (one-port runs may be short)
                        pf = max(pf, b)
                        while pf < n and pf < b + DP_PIN_AHEAD:
                            if ports[pf * step] != 0:
                                dp_pin_prefetch(&self.c, &frames[offsets[pf]] if lengths[pf] else &dummy,
                                                <uint32_t>lengths[pf])
                            pf += 1
                    dp_rx_frames(&self.c, fr, <int>m, ports[b * step], t if fixed else dp_now(), &verdicts[b])
                    b += m
                self.c.read_held = 0
                dp_read_end()
                for k in range(sink.n):
                    out_meta[k, 0] = sink.frame[k]
                    out_meta[k, 1] = sink.outs[k].port
                    out_meta[k, 2] = sink.outs[k].data - sink.buf
                    out_meta[k, 3] = sink.outs[k].length
            return sink.n
        finally:
            self.c.emit = dp_emit
            self.c.sink = NULL
            self.c.pin_ahead = 0
            self.c.read_held = 0
            _dp_free(sink.outs)
            _dp_free(sink.frame)

    def poll(self, int max_frames=DP_BATCH):
        """One batch from every attached ring (GIL released); returns frames handled."""
        cdef Py_ssize_t n
        with nogil:
            n = dp_poll(&self.c, max_frames)
        return n

    def run(self, double seconds, int wake_fd=-1):
        """Forward for up to `seconds` without coming back to Python (GIL
        released): batches from every ring while frames come, poll() on the
        rings when none do.  Returns early when wake_fd (a pipe or eventfd;
        drained here) becomes readable or a signal arrives, so control
        changes and SIGTERM are not kept waiting.  Returns frames handled.

        Dense traffic (rx_coalesce_us > 0): when the rings run dry soon after
        a wake-up (the poll() waited less than rx_coalesce_us), the loop naps
        rx_coalesce_us on a timer instead of going back to poll(), and keeps
        napping while every nap finds frames: one timer wake-up per nap
        instead of one socket wake-up (the sender's softirq waking this
        thread on another CPU) per frame or two, and a TX kick per nap's
        batch.  The first nap that finds nothing returns to poll(), so an
        idle loop sleeps in poll() and uses no CPU; a frame waits at most
        rx_coalesce_us more than it would have (see loop_counters()).

        The NAT expiry work of gc() is done here too, every 20 ms, so a
        caller need not come back to Python (and wait for the GIL) more
        often than it has control work for: `seconds` may be long.  A
        write to wake_fd ends the call within one such pass (20 ms) even
        when frames keep the loop from ever reaching poll()."""
        cdef Py_ssize_t n
        cdef uint64_t t
        if not 0 <= seconds <= 3600:
            raise ValueError(f"seconds must be in 0..3600, not {seconds!r}")
        if self.loop_left_ns:
            t = dp_now() - self.loop_left_ns        # out of the C loop since it last ended
            if t > self.loop_away_max_ns:
                self.loop_away_max_ns = t
            if t > DP_AWAY_LONG_NS:
                self.loop_away_long += 1
        with nogil:
            n = self.dp_run(<uint64_t>(seconds * 1e9), wake_fd)
            self.loop_left_ns = dp_now()
        t = dp_now() - self.loop_left_ns            # waiting for the GIL to come back to Python
        if t > self.loop_gil_max_ns:
            self.loop_gil_max_ns = t
        return n

    @property
    def rx_coalesce_us(self):
        """run()'s nap under dense traffic, in microseconds (0: off, every
        empty ring waits in poll()); 0..1000."""
        return self.nap_ns // 1000

    @rx_coalesce_us.setter
    def rx_coalesce_us(self, value):
        if not isinstance(value, int) or not 0 <= value <= 1000:
            raise ValueError(f"rx_coalesce_us must be an integer in 0..1000, not {value!r}")
        self.nap_ns = <uint64_t>value * 1000

    def loop_counters(self):
        """run()'s own counters: {'polls': poll() waits, 'wakeups': those
        that returned with a ring ready, 'naps': timed naps under dense
        traffic, 'naps_empty': naps that found nothing (each one ends a dense
        stretch), 'batches': passes over the rings that found frames,
        'gil_wait_max_us': the longest wait for the GIL when the C loop
        ended, 'away_max_us': the longest time out of the C loop between two
        run() calls (GIL wait and Python work), 'away_long': such times over
        10 ms}.  TX
        kicks are one sendto() per ring per pass: frames per kick is a TX
        ring's tx_frames / tx_flushes (PacketRing.stats)."""
        return {"polls": self.loop_polls, "wakeups": self.loop_wakeups, "naps": self.loop_naps,
                "naps_empty": self.loop_naps_empty, "batches": self.loop_batches,
                "gil_wait_max_us": self.loop_gil_max_ns // 1000, "away_max_us": self.loop_away_max_ns // 1000,
                "away_long": self.loop_away_long}

    cdef Py_ssize_t dp_run(self, uint64_t ns, int wake_fd) noexcept nogil:
        cdef _dp_pollfd fds[DP_MAX_PORTS + 1]
        cdef int nfds, port, rc, ms
        cdef uint64_t now = dp_now(), end = now + ns, nap, next_gc = now + DP_GC_EVERY_NS, until
        cdef Py_ssize_t total = 0, n
        cdef bint dense = 0, napped = 0
        cdef _dp_timespec ts
        while True:
            n = dp_poll(&self.c, DP_BATCH)
            total += n
            now = dp_now()
            if n:
                self.loop_batches += 1
            if now >= next_gc:
                nat_gc(self.c.nat_c, now, DP_GC_SCAN)        # bounded (see gc())
                if self.c.pins != NULL:
                    gwpin_sweep(self.c.pins, now, DP_GC_SCAN // 4 + 1)
                next_gc = now + DP_GC_EVERY_NS
                # frames that never let the loop reach poll() must not hold
                # control work back: look at the wake pipe here too (20 ms)
                if dp_drain_wake(wake_fd):
                    break
            if now >= end:
                break
            if n:
                napped = 0
                continue
            if napped:
                self.loop_naps_empty += 1        # the dense stretch is over: back to poll()
                dense = 0
                napped = 0
            elif dense and self.nap_ns:
                nap = self.nap_ns if end - now > self.nap_ns else end - now
                ts.tv_sec = <long>(nap // 1000000000)
                ts.tv_nsec = <long>(nap % 1000000000)
                self.loop_naps += 1
                napped = 1
                if _dp_clock_nanosleep(_DP_CLOCK_MONOTONIC, 0, &ts, NULL) != 0:
                    dp_drain_wake(wake_fd)       # EINTR: a signal handler wants to run
                    break
                continue
            nfds = 0
            for port in range(self.c.n_rings):
                if self.c.rings[port] != NULL and self.c.rings[port].rx_block_nr:
                    fds[nfds].fd = self.c.rings[port].fd
                    fds[nfds].events = _DP_POLLIN
                    fds[nfds].revents = 0
                    nfds += 1
            if wake_fd >= 0:
                fds[nfds].fd = wake_fd
                fds[nfds].events = _DP_POLLIN
                fds[nfds].revents = 0
                nfds += 1
            until = end if end < next_gc else next_gc
            ms = <int>((until - now + 999999) // 1000000)
            self.loop_polls += 1
            rc = _dp_poll(fds, nfds, ms)
            if rc < 0:
                dp_drain_wake(wake_fd)           # EINTR: a signal handler wants to run
                break
            if rc > 0:
                self.loop_wakeups += 1
                # woken soon after the last frames: they come faster than a nap
                dense = dp_now() - now < self.nap_ns
            if wake_fd >= 0 and fds[nfds - 1].revents:
                dp_drain_wake(wake_fd)
                total += dp_poll(&self.c, DP_BATCH)
                break
        return total

    def gc(self, int max_scan=DP_GC_BUDGET, now=None):
        """Bounded NAT expiry work: the expiry wheel's due buckets, at most
        `max_scan` connections examined (collected or re-bucketed), the rest
        left for the next call.  Call it every loop return (at least every
        20 ms): a closed flow's port is free within its timeout + ~0.2 s, and
        one call stalls the datapath thread no longer than max_scan
        collections (benchmarks/bench_nat.py measures it).  With
        make-before-break on, also the expired pins of max_scan // 4 pin
        buckets.  Returns how many connections were collected."""
        cdef uint64_t t = dp_now() if now is None else <uint64_t>(float(now) * 1e9)
        cdef uint32_t n
        with nogil:
            n = nat_gc(self.c.nat_c, t, max_scan)
            if self.c.pins != NULL:
                gwpin_sweep(self.c.pins, t, <uint64_t>max_scan // 4 + 1)
        return n

    # -- the pipeline ---------------------------------------------------------------
