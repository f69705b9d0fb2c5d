"""The fused Datapath, path by path, beside the per-stage figures of the old benchmarks, one run.

Two nodes of the lab's cluster in memory: node1 (192.168.1.1) hosts N_PODS
pods (10.0.1.10.., one veth port each), node3 (192.168.1.3) is their egress
gateway (the seed policy: 203.0.113.0/24 minus .128/25, egress IP
192.168.1.100).  Prebuilt frames (dpkt builds them once, outside the timing;
UDP with a 64-byte payload) take each path through the real Datapath:

  pod -> remote gateway  node1: egress map hit, VXLAN encap to node3
  gateway SNAT           node3: VXLAN from node1, decap, policy check, SNAT
                         to the egress IP, out to the router
  reply                  node3: server -> egress IP, reverse NAT, VXLAN back
                         to node1
  masquerade             node1: pod -> a non-policy destination, SNAT to the
                         node IP, out to the router
  drop (no NAT entry)    node3 with an empty NAT table: the replies again,
                         each dropped with no_nat_entry (for contrast)
  pod -> remote gateway, node1 with make-before-break on
  make-before-break      (Datapath.set_make_before_break, PIN_ROOM pins a
                         flow): the first path's frames again, each also
                         looked up in the gateway pin table (its cost is the
                         difference from the first row, both in this run)
  IPv6: the first four   dual-stack node1 and node3 (node_ip6, pods
  paths again            fd00:10:1::10.., the policy 2001:db8::/64 minus
                         its upper /65, IPv6 egress IP fd00:192:168:1::100):
                         the same flows as IPv6 frames (the same 64-byte
                         payload: 126 bytes, 176 in VXLAN over the IPv4
                         underlay), beside the IPv4 rows of the same run

Many flows (FLOWS: N_PODS pods x ports x 4 servers; the NAT table then
holds one connection per flow), flows in a random order (not the order they
were created in, so NAT entries are not met in memory order).  Every path is
checked once before timing, both ways in: every frame's verdict, the
output's addresses, and the counters; the batch entry's output frames must
equal process()'s.  The timed passes meet known flows.

The figure is Datapath.process_batch: the frames of a path packed in one
NumPy array, CALL frames per call, run by the ring loop's own per-batch step
(dp_rx_frames: the loop cuts them into batches of at most BATCH frames of
one port, as one ring's) with the GIL released and no Python per frame,
output frames copied into a reused output buffer where the loop copies them
into a TX ring.  The clock is fixed (now=T0), so the loop's one clock
reading per batch is not in the figure.  Beside it, the same frames through
Datapath.process(), one Python call per frame (the old figure, dominated by
the call), and, measured in the same run with the old benchmarks' code:
EgressMap.lookup_batch on the same flows, NatTable.translate_batch /
reverse_batch (compare_nat's workload and runner at the same number of
connections) and PacketBatch.relay (compare_packet's frames and runner),
summed as each path uses them.  Times are CPU seconds of this thread
(time.thread_time; the machine is shared), median of several runs.

--mbb: only the first row and its make-before-break twin, at 1,000 and
100,000 flows, run by run in turn (--reps runs each), the cost as the median
of the runs' ratios: the figure of issue 15's target, less exposed to the
load of a shared machine than two rows measured minutes apart.
"""
import os
import socket
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from egresscore._core import DROP_REASON_NAMES, Datapath, EgressMap, NatTable  # noqa: E402 - after sys.path

BATCH = 256                 # frames per ring per poll() in the agent (DP_BATCH)
CALL = 4096                 # frames per process_batch() call
OUT_ROOM = 256              # output bytes per frame (the largest output: 156-byte VXLAN frames)
N_PODS = 50
N_SERVERS = 4
NODES = [("192.168.1.1", "10.0.1.0/24"), ("192.168.1.2", "10.0.2.0/24"), ("192.168.1.3", "10.0.3.0/24")]
NODE_MAC = {ip: f"02:ec:c0:a8:01:{int(ip.rsplit('.', 1)[1]):02x}" for ip, _ in NODES}
ROUTER_MAC = "02:ec:c0:a8:01:fe"
NODE1, GATEWAY = "192.168.1.1", "192.168.1.3"
EGRESS_IP = "192.168.1.100"
POLICY_CIDR, EXCLUDED_CIDR = "203.0.113.0/24", "203.0.113.128/25"
POLICY_SERVERS = [f"203.0.113.{10 + i}" for i in range(N_SERVERS)]
OTHER_SERVERS = [f"198.51.100.{10 + i}" for i in range(N_SERVERS)]
NAT_PORTS = (32768, 65534)
PAYLOAD = bytes(range(64))
T0 = 1000.0                 # the clock (seconds) at the first batch
TARGET_MPPS = 15.0          # issue 17: gateway SNAT path, per core
PIN_ROOM = 2                # pin table capacity per flow (rounded up to a power of two)
MBB_TARGET = 0.05           # issue 15: make-before-break costs under 5% on the pod -> gateway path
V6_TARGET = 0.10            # issue 18: IPv6 within 10% of IPv4, path by path
NODE6 = {ip: f"fd00:192:168:1::{ip.rsplit('.', 1)[1]}" for ip, _ in NODES}
POD_CIDR6 = {ip: f"fd00:10:{ip.rsplit('.', 1)[1]}::/64" for ip, _ in NODES}
EGRESS_IP6 = "fd00:192:168:1::100"
POLICY_CIDR6, EXCLUDED_CIDR6 = "2001:db8::/64", "2001:db8:0:0:8000::/65"
POLICY_SERVERS6 = [f"2001:db8::{10 + i:x}" for i in range(N_SERVERS)]
OTHER_SERVERS6 = [f"2001:db8:1::{10 + i:x}" for i in range(N_SERVERS)]

PATHS = (  # name, node, port kind, expected (verdict, reason), output port
    ("pod -> remote gateway (egress map hit, VXLAN encap)", "node1", "pod", ("tx", "none"), 0),
    ("gateway SNAT (VXLAN in, decap, SNAT, out to the router)", "node3", "underlay", ("tx", "none"), 0),
    ("reply (reverse NAT, VXLAN back to node1)", "node3", "underlay", ("tx", "none"), 0),
    ("masquerade (pod -> non-policy destination)", "node1", "pod", ("tx", "none"), 0),
    ("drop: reply without a NAT entry (no_nat_entry)", "empty node3", "underlay",
     ("drop", "no_nat_entry"), None),
    ("pod -> remote gateway, make-before-break on (+ pin lookup)", "mbb node1", "pod", ("tx", "none"), 0),
    ("IPv6 pod -> remote gateway (VXLAN over IPv4)", "v6 node1", "pod", ("tx", "none"), 0),
    ("IPv6 gateway SNAT (to the IPv6 egress IP)", "v6 node3", "underlay", ("tx", "none"), 0),
    ("IPv6 reply (reverse NAT, VXLAN back)", "v6 node3", "underlay", ("tx", "none"), 0),
    ("IPv6 masquerade (to the node's IPv6 address)", "v6 node1", "pod", ("tx", "none"), 0),
)
SNAT_PATH = PATHS[1][0]
MBB_PATH = PATHS[5][0]
V6_OF = {PATHS[6][0]: PATHS[0][0], PATHS[7][0]: PATHS[1][0], PATHS[8][0]: PATHS[2][0],
         PATHS[9][0]: PATHS[3][0]}   # each IPv6 path's IPv4 counterpart


def pod(k):
    """The k-th pod of node1 (k from 0): its address, MAC, host-side MAC and veth port."""
    return f"10.0.1.{10 + k}", f"02:ec:0a:00:01:{10 + k:02x}", f"02:ed:0a:00:01:{10 + k:02x}", k + 1


def pod6(k):
    """The k-th pod's IPv6 address."""
    return f"fd00:10:1::{10 + k:x}"


def udp_frame(src_mac, dst_mac, src, dst, sport, dport, ttl=64):
    """Ethernet/IPv4/UDP with PAYLOAD, checksums filled in by dpkt."""
    import dpkt
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=PAYLOAD)
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=17, ttl=ttl, data=udp)
    return bytes(dpkt.ethernet.Ethernet(src=bytes.fromhex(src_mac.replace(":", "")),
                                        dst=bytes.fromhex(dst_mac.replace(":", "")),
                                        type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def udp6_frame(src_mac, dst_mac, src, dst, sport, dport, hlim=64):
    """Ethernet/IPv6/UDP with PAYLOAD, the UDP checksum (pseudo-header) filled in by dpkt."""
    import dpkt
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=PAYLOAD)
    udp.ulen = len(udp)
    ip = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src), dst=socket.inet_pton(socket.AF_INET6, dst),
                      nxt=17, hlim=hlim, plen=len(udp), data=udp)
    return bytes(dpkt.ethernet.Ethernet(src=bytes.fromhex(src_mac.replace(":", "")),
                                        dst=bytes.fromhex(dst_mac.replace(":", "")),
                                        type=dpkt.ethernet.ETH_TYPE_IP6, data=ip))


def flows(n):
    """n flows (pod index, pod port, server index): N_PODS pods x ports x N_SERVERS
    servers, so the mappings (pod, port) stay within one egress IP's ports."""
    per_pod = N_PODS * N_SERVERS
    return [(i % N_PODS, 10000 + i // per_pod, (i // N_PODS) % N_SERVERS) for i in range(n)]


POLICY_ID = 1               # the entries' policy id, as the compiler writes it (0: no per-policy counting)


def egress_map(view, v6=False):
    """The seed policy for every pod; node1 does not know the egress IP (0.0.0.0).
    Dual-stack (v6): the IPv6 policy beside it (gateway node3's IPv4, as Cilium)."""
    em = EgressMap()
    for k in range(N_PODS):
        em.set(pod(k)[0], POLICY_CIDR, EGRESS_IP if view == "node3" else "0.0.0.0", GATEWAY, POLICY_ID)
        em.set_excluded(pod(k)[0], EXCLUDED_CIDR, policy_id=POLICY_ID)
        if v6:
            em.set(pod6(k), POLICY_CIDR6, EGRESS_IP6 if view == "node3" else "::", GATEWAY, POLICY_ID)
            em.set_excluded(pod6(k), EXCLUDED_CIDR6, policy_id=POLICY_ID)
    return em


def datapath(view, capacity, v6=False):
    """(Datapath, its EgressMap, its NatTable) of node1 or node3 (dual-stack with v6)."""
    ip = NODE1 if view == "node1" else GATEWAY
    em = egress_map(view, v6)
    egress = ([EGRESS_IP] + ([EGRESS_IP6] if v6 else [])) if view == "node3" else []
    # Every IPv6 flow of the workload is held, so the IPv6 pool is the whole table.
    nat = NatTable(egress, capacity=capacity, port_range=NAT_PORTS, seed=7,
                   ipv6_capacity=capacity if v6 else None)
    dp = Datapath(ip, NODE_MAC[ip], em, nat, nat_port_range=NAT_PORTS, node_ip6=NODE6[ip] if v6 else None)
    for i, (nip, cidr) in enumerate(NODES):
        if v6:
            dp.add_node(i, nip, [cidr, POD_CIDR6[nip]], NODE_MAC[nip], ip6=NODE6[nip])
        else:
            dp.add_node(i, nip, [cidr], NODE_MAC[nip])
    dp.set_router(ROUTER_MAC)
    if view == "node1":
        for k in range(N_PODS):
            addr, mac, host_mac, port = pod(k)
            dp.add_pod_port(port, addr, host_mac, mac, pod_ip6=pod6(k) if v6 else None)
    return dp, em, nat


def feed(dp, work, check=None):
    """One pass over work [(frame, port)] as the agent feeds it: batches of
    BATCH with one clock reading each.  check(i, result) sees every result."""
    proc = dp.process
    for b in range(0, len(work), BATCH):
        now = T0 + b * 1e-6
        if check is None:
            for frame, port in work[b:b + BATCH]:
                proc(frame, port, now)
        else:
            for i in range(b, min(b + BATCH, len(work))):
                check(i, proc(work[i][0], work[i][1], now))


class Packed:
    """work [(frame, port)] as process_batch takes it: one frame array, offsets,
    lengths, ports, and reused verdict and output arrays for CALL frames."""

    def __init__(self, work):
        self.n = len(work)
        self.lengths = np.array([len(f) for f, _ in work], np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)[:-1])).astype(np.int64)
        self.frames = np.frombuffer(b"".join(f for f, _ in work), np.uint8)
        self.ports = np.array([p for _, p in work], np.int32)
        self.verdicts = np.zeros(self.n, np.int32)
        self.out = np.zeros(CALL * OUT_ROOM, np.uint8)
        self.meta = np.zeros((CALL, 4), np.int64)


def feed_batch(dp, pk, keep=None):
    """One pass over pk through process_batch, CALL frames a call.  keep (a
    list) gets every output as (frame index, port, bytes)."""
    run = dp.process_batch
    for b in range(0, pk.n, CALL):
        e = min(b + CALL, pk.n)
        k = run(pk.frames, pk.offsets[b:e], pk.lengths[b:e], pk.verdicts[b:e], pk.out, pk.meta,
                port=pk.ports[b:e], now=T0)
        if keep is not None:
            keep += [(b + i, p, pk.out[o:o + n].tobytes()) for i, p, o, n in pk.meta[:k].tolist()]


def _ip(frame, at):
    return socket.inet_ntoa(frame[at:at + 4])


def _ip6(frame, at):
    return socket.inet_ntop(socket.AF_INET6, frame[at:at + 16])


class Workload:
    """The datapaths and the prebuilt frames of every path for n flows, each
    path checked once (verdicts, output addresses, counters)."""

    def __init__(self, n, seed=1):
        self.n = n
        cap = n + n // 4 + 1024
        self.tables = {view: datapath(view.split()[-1], cap, v6=view.startswith("v6"))
                       for view in ("node1", "node3", "empty node3", "mbb node1", "v6 node1", "v6 node3")}
        self.dps = {view: dp for view, (dp, _, _) in self.tables.items()}
        self.pin_capacity = PIN_ROOM * n
        self.dps["mbb node1"].set_make_before_break(True, capacity=self.pin_capacity, seed=5)
        fl = flows(n)
        order = np.random.default_rng(seed).permutation(n).tolist()
        pods = [pod(k) for k in range(N_PODS)]
        to_gw = [(udp_frame(pods[k][1], pods[k][2], pods[k][0], POLICY_SERVERS[s], sp, 53), pods[k][3])
                 for k, sp, s in fl]
        masq = [(udp_frame(pods[k][1], pods[k][2], pods[k][0], OTHER_SERVERS[s], sp, 53), pods[k][3])
                for k, sp, s in fl]
        outs = {}
        tunnel = self._check(PATHS[0], to_gw, outs)
        # the gateway meets node1's VXLAN frames as the wire carries them
        self._check(PATHS[1], [(f, 0) for f in tunnel], outs)
        xports = [int.from_bytes(f[34:36], "big") for f in outs[PATHS[1][0]]]
        replies = [(udp_frame(ROUTER_MAC, NODE_MAC[GATEWAY], POLICY_SERVERS[s], EGRESS_IP, 53, x), 0)
                   for (_, _, s), x in zip(fl, xports)]
        self._check(PATHS[2], replies, outs)
        self._check(PATHS[3], masq, outs)
        self._check(PATHS[4], replies, outs)
        self._check(PATHS[5], to_gw, outs)
        assert outs[PATHS[5][0]] == outs[PATHS[0][0]]              # the pins change nothing here
        pins = self.dps["mbb node1"].pins.stats()
        assert pins["pinned"] == n and pins["kept"] == 0 and pins["evicted"] <= n // 100, pins
        self.pin_evicted = pins["evicted"]
        self._check_outputs(fl, outs, xports)
        # IPv6: the same flows through the dual-stack pair
        to_gw6 = [(udp6_frame(pods[k][1], pods[k][2], pod6(k), POLICY_SERVERS6[s], sp, 53), pods[k][3])
                  for k, sp, s in fl]
        masq6 = [(udp6_frame(pods[k][1], pods[k][2], pod6(k), OTHER_SERVERS6[s], sp, 53), pods[k][3])
                 for k, sp, s in fl]
        tunnel6 = self._check(PATHS[6], to_gw6, outs)
        self._check(PATHS[7], [(f, 0) for f in tunnel6], outs)
        xports6 = [int.from_bytes(f[54:56], "big") for f in outs[PATHS[7][0]]]
        replies6 = [(udp6_frame(ROUTER_MAC, NODE_MAC[GATEWAY], POLICY_SERVERS6[s], EGRESS_IP6, 53, x), 0)
                    for (_, _, s), x in zip(fl, xports6)]
        self._check(PATHS[8], replies6, outs)
        self._check(PATHS[9], masq6, outs)
        self._check_outputs6(fl, outs, xports6)
        # timed passes: the flows in another order than they were created in
        self.work = {PATHS[0][0]: [to_gw[i] for i in order],
                     PATHS[1][0]: [(tunnel[i], 0) for i in order],
                     PATHS[2][0]: [replies[i] for i in order],
                     PATHS[3][0]: [masq[i] for i in order],
                     PATHS[4][0]: [replies[i] for i in order],
                     PATHS[5][0]: [to_gw[i] for i in order],
                     PATHS[6][0]: [to_gw6[i] for i in order],
                     PATHS[7][0]: [(tunnel6[i], 0) for i in order],
                     PATHS[8][0]: [replies6[i] for i in order],
                     PATHS[9][0]: [masq6[i] for i in order]}
        self.packed = {name: Packed(w) for name, w in self.work.items()}
        for path in PATHS:
            self._check_batch(path, outs[path[0]], order)
        # stage inputs: the egress map lookups this gateway does for these flows
        self.lookup_src = np.array([int.from_bytes(socket.inet_aton(pods[k][0]), "big") for k, _, _ in fl],
                                   np.uint32)
        self.lookup_dst = np.array([int.from_bytes(socket.inet_aton(POLICY_SERVERS[s]), "big")
                                    for _, _, s in fl], np.uint32)

    def _check(self, path, work, outs):
        name, node, _, want, out_port = path
        dp = self.dps[node]
        dp.reset_counters()
        got = []

        def check(i, result):
            assert result[:2] == want, (name, i, result[:2])
            if out_port is None:
                assert result[2] is None, (name, i)
            else:
                assert result[2][0] == out_port, (name, i, result[2][0])
                got.append(result[2][1])

        feed(dp, work, check)
        c = dp.counters()
        n = len(work)
        verdict = {"tx": "tx", "drop": "dropped"}[want[0]]
        assert c["rx"] == c[verdict] == n, (name, c)
        expect = {PATHS[0][0]: {"encap": n},
                  PATHS[1][0]: {"decap": n, "snat_egress": n},
                  PATHS[2][0]: {"reverse_nat": n, "encap": n},
                  PATHS[3][0]: {"masquerade": n},
                  PATHS[4][0]: {},
                  PATHS[5][0]: {"encap": n},
                  PATHS[6][0]: {"encap": n},
                  PATHS[7][0]: {"decap": n, "snat_egress": n},
                  PATHS[8][0]: {"reverse_nat": n, "encap": n},
                  PATHS[9][0]: {"masquerade": n}}[name]
        for key in ("encap", "decap", "snat_egress", "masquerade", "reverse_nat"):
            assert c[key] == expect.get(key, 0), (name, key, c)
        assert c["drops"] == ({want[1]: n} if want[0] == "drop" else {}), (name, c["drops"])
        outs[name] = got
        return got

    def _check_batch(self, path, outs, order):
        """process_batch on the timed frames: each verdict, output frame and port
        as process() gave them (outs, in creation order), and the counters."""
        name, node, _, (verdict, reason), out_port = path
        dp, pk = self.dps[node], self.packed[name]
        dp.reset_counters()
        got = []
        feed_batch(dp, pk, got)
        code = {"tx": 1, "drop": 3}[verdict] | (DROP_REASON_NAMES.index(reason) << 8)
        assert (pk.verdicts == code).all(), (name, set(pk.verdicts.tolist()))
        if out_port is None:
            assert got == [], name
        else:
            assert [(i, p) for i, p, _ in got] == [(i, out_port) for i in range(pk.n)], name
            assert all(f == outs[order[i]] for i, _, f in got), name
        c = dp.counters()
        assert c["rx"] == c[{"tx": "tx", "drop": "dropped"}[verdict]] == pk.n and c["tx_errors"] == 0, (name, c)

    def _check_outputs(self, fl, outs, xports):
        """Where each path's frames went: outer and inner addresses (offsets of
        Ethernet/IPv4 without options: 26 src, 30 dst; VXLAN's inner IPv4 at 64)."""
        n = self.n
        for (k, _, s), f in zip(fl, outs[PATHS[0][0]]):
            assert (_ip(f, 26), _ip(f, 30), int.from_bytes(f[36:38], "big")) == (NODE1, GATEWAY, 8472)
            assert (_ip(f, 50 + 26), _ip(f, 50 + 30)) == (pod(k)[0], POLICY_SERVERS[s])
        for (k, _, s), f in zip(fl, outs[PATHS[1][0]]):
            assert f[:6] == bytes.fromhex(ROUTER_MAC.replace(":", ""))
            assert (_ip(f, 26), _ip(f, 30)) == (EGRESS_IP, POLICY_SERVERS[s])
        assert len(set(zip(xports, (s for _, _, s in fl)))) == n       # one reply tuple per flow
        for (k, sp, s), f in zip(fl, outs[PATHS[2][0]]):
            assert (_ip(f, 26), _ip(f, 30)) == (GATEWAY, NODE1)
            assert (_ip(f, 50 + 26), _ip(f, 50 + 30), int.from_bytes(f[50 + 36:50 + 38], "big")) == (
                POLICY_SERVERS[s], pod(k)[0], sp)
        for (k, _, s), f in zip(fl, outs[PATHS[3][0]]):
            assert (_ip(f, 26), _ip(f, 30)) == (NODE1, OTHER_SERVERS[s])
        nat = {view: t[2] for view, t in self.tables.items()}
        assert len(nat["node3"]) == len(nat["node1"]) == n and len(nat["empty node3"]) == len(nat["mbb node1"]) == 0

    def _check_outputs6(self, fl, outs, xports):
        """The IPv6 paths' outputs (Ethernet/IPv6: 22 src, 38 dst, UDP at 54;
        in VXLAN the inner frame at 50)."""
        n = self.n
        for (k, _, s), f in zip(fl, outs[PATHS[6][0]]):
            assert (_ip(f, 26), _ip(f, 30), int.from_bytes(f[36:38], "big")) == (NODE1, GATEWAY, 8472)
            assert (_ip6(f, 50 + 22), _ip6(f, 50 + 38)) == (pod6(k), POLICY_SERVERS6[s])
        for (k, _, s), f in zip(fl, outs[PATHS[7][0]]):
            assert f[:6] == bytes.fromhex(ROUTER_MAC.replace(":", ""))
            assert (_ip6(f, 22), _ip6(f, 38)) == (EGRESS_IP6, POLICY_SERVERS6[s])
        assert len(set(zip(xports, (s for _, _, s in fl)))) == n
        for (k, sp, s), f in zip(fl, outs[PATHS[8][0]]):
            assert (_ip(f, 26), _ip(f, 30)) == (GATEWAY, NODE1)
            assert (_ip6(f, 50 + 22), _ip6(f, 50 + 38), int.from_bytes(f[50 + 56:50 + 58], "big")) == (
                POLICY_SERVERS6[s], pod6(k), sp)
        for (k, _, s), f in zip(fl, outs[PATHS[9][0]]):
            assert (_ip6(f, 22), _ip6(f, 38)) == (NODE6[NODE1], OTHER_SERVERS6[s])
        nat = {view: t[2] for view, t in self.tables.items()}
        assert len(nat["v6 node3"]) == len(nat["v6 node1"]) == n

    def node_of(self, name):
        return self.dps[next(node for p, node, *_ in PATHS if p == name)]



def cpu_seconds(fn, *args):
    """CPU seconds of this thread spent in fn(*args)."""
    t0 = time.thread_time()
    fn(*args)
    return time.thread_time() - t0


def measure_datapath(wl, reps):
    """{path: (ns/frame through process_batch(), ns/frame through process())},
    each the median of `reps` runs."""
    runs = {name: [] for name, *_ in PATHS}
    for _ in range(reps):
        for name, *_ in PATHS:
            dp = wl.node_of(name)
            b = cpu_seconds(feed_batch, dp, wl.packed[name])
            t = cpu_seconds(feed, dp, wl.work[name])
            runs[name].append((b * 1e9 / wl.n, t * 1e9 / wl.n))
    return {name: (statistics.median(b for b, _ in r), statistics.median(t for _, t in r))
            for name, r in runs.items()}


def measure_pairs(wl, reps):
    """{IPv6 path: (IPv4 ns/frame, IPv6 ns/frame)} through process_batch, each
    IPv6 pass right after its IPv4 counterpart's (the machine's load moves
    both alike), median of `reps` pairs."""
    runs = {name: [] for name in V6_OF}
    for _ in range(reps):
        for v6, v4 in V6_OF.items():
            a = cpu_seconds(feed_batch, wl.node_of(v4), wl.packed[v4])
            b = cpu_seconds(feed_batch, wl.node_of(v6), wl.packed[v6])
            runs[v6].append((a * 1e9 / wl.n, b * 1e9 / wl.n))
    return {name: (statistics.median(a for a, _ in r), statistics.median(b for _, b in r),
                   statistics.median((b - a) / a for a, b in r)) for name, r in runs.items()}


def run_ipv6(quick: bool = False) -> str:
    """The IPv6 paths beside their IPv4 counterparts, interleaved (--ipv6)."""
    sizes = (1_000, 10_000) if quick else (1_000, 100_000)
    reps = 5 if quick else 15
    lines = [f"### IPv6 beside IPv4 through the real Datapath ({' and '.join(f'{n:,}' for n in sizes)} flows)",
             "",
             (f"ns per frame of one core's CPU time through process_batch, each IPv6 pass right after its "
              f"IPv4 counterpart's, median of {reps} pairs (and the median of the pairs' ratios); the same "
              f"flows and 64-byte UDP payload (IPv4 106-byte frames, IPv6 126). Issue 18 target: IPv6 within "
              f"{V6_TARGET:.0%} of IPv4."),
             "", "| path | flows | IPv4 ns/frame | IPv6 ns/frame | IPv6 / IPv4 | Mpps IPv4 / IPv6 |",
             "|---|---:|---:|---:|---:|---:|"]
    for n in sizes:
        wl = Workload(n)
        measure_pairs(wl, 1)                           # warm up
        for name, (a, b, r) in measure_pairs(wl, reps).items():
            lines.append(f"| {name} | {n:,} | {a:,.0f} | {b:,.0f} | {r:+.1%} | {1e3 / a:.1f} / {1e3 / b:.1f} |")
        del wl
    return "\n".join(lines)


def measure_stages(wl, reps):
    """ns per operation of the stages the old benchmarks time, at wl.n flows."""
    import compare_nat as cn
    import compare_packet as cp
    em = wl.tables["node3"][1]
    src, dst = wl.lookup_src, wl.lookup_dst
    lookups = max(1, 1_000_000 // wl.n)
    lk = [cpu_seconds(lambda: [em.lookup_batch(src, dst) for _ in range(lookups)]) * 1e9 / (wl.n * lookups)
          for _ in range(reps)]
    arr, ext = cn.workload(wl.n)
    order = np.random.default_rng(2).permutation(wl.n)
    nat = [cn.run_egresscore(arr, ext, order, wl.n + wl.n // 20)[0] for _ in range(reps)]
    frames = cp.make_frames(1024)
    batch, tmpl = cp.egresscore_setup(frames)
    rounds = 200
    relay = [cpu_seconds(lambda: [cp.egresscore_relay(batch, tmpl) for _ in range(rounds)]) * 1e9
             / (len(frames) * rounds) for _ in range(reps)]
    assert batch.counts() == {}, batch.counts()
    return {"EgressMap.lookup_batch": statistics.median(lk),
            "NatTable.translate_batch (known flows)": statistics.median(
                r["known flows"][0] * 1e9 / wl.n for r in nat),
            "NatTable.translate_batch (new flows)": statistics.median(r["new flows"][0] * 1e9 / wl.n for r in nat),
            "NatTable.reverse_batch (replies)": statistics.median(r["replies"][0] * 1e9 / wl.n for r in nat),
            "PacketBatch.relay (decap, reverse SNAT, encap)": statistics.median(relay)}


STAGES_OF = {  # which old stages a path's work is made of (relay stands for the packet work)
    PATHS[0][0]: ("EgressMap.lookup_batch", "PacketBatch.relay (decap, reverse SNAT, encap)"),
    PATHS[1][0]: ("EgressMap.lookup_batch", "NatTable.translate_batch (known flows)",
                  "PacketBatch.relay (decap, reverse SNAT, encap)"),
    PATHS[2][0]: ("NatTable.reverse_batch (replies)", "PacketBatch.relay (decap, reverse SNAT, encap)"),
    PATHS[3][0]: ("EgressMap.lookup_batch", "NatTable.translate_batch (known flows)",
                  "PacketBatch.relay (decap, reverse SNAT, encap)"),
    PATHS[4][0]: (),
    PATHS[5][0]: ("EgressMap.lookup_batch", "PacketBatch.relay (decap, reverse SNAT, encap)"),
    PATHS[6][0]: (), PATHS[7][0]: (), PATHS[8][0]: (), PATHS[9][0]: (),   # the stage figures are IPv4's
}
SHORT = {"EgressMap.lookup_batch": "lookup", "NatTable.translate_batch (known flows)": "translate",
         "NatTable.reverse_batch (replies)": "reverse", "PacketBatch.relay (decap, reverse SNAT, encap)": "relay"}


def run(quick: bool = False) -> str:
    sizes = (1_000, 10_000) if quick else (1_000, 100_000)
    reps = 3 if quick else 7
    results = []
    for n in sizes:
        wl = Workload(n)
        measure_datapath(wl, 1)                       # warm up
        results.append((n, measure_datapath(wl, reps), measure_stages(wl, reps), wl.dps["mbb node1"].pins.stats()))
        del wl
    lines = [
        f"### Fused Datapath per path: {' and '.join(f'{n:,}' for n in sizes)} flows, batches of {BATCH}",
        "",
        (f"ns per frame of one core's CPU time, median of {reps} runs; 106-byte UDP frames (64-byte payload; "
         f"156 bytes in VXLAN), one prebuilt frame per flow, flows in random order. process_batch = "
         f"Datapath.process_batch, {CALL:,} frames a call, through the ring loop's per-batch step (batches of "
         f"at most {BATCH} frames of one port) with the GIL released, output copied to a buffer where the loop "
         f"copies it to a TX ring; process() = one Python call per frame (the old figure). Stages: the old "
         f"benchmarks' per-operation figures at the same number of flows, same run, summed as the path uses "
         f"them."),
        "",
        ("| path | flows | process_batch ns/frame | Mpps per core | process() ns/frame | "
         "sum of stages ns | stages |"),
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    snat, mbb = [], []
    for n, dp, st, pins in results:
        mbb.append((n, dp[PATHS[0][0]][0], dp[MBB_PATH][0], pins))
        for name, *_ in PATHS:
            b, t = dp[name]
            used = STAGES_OF[name]
            total = f"{sum(st[s] for s in used):,.0f}" if used else "–"
            lines.append(f"| {name} | {n:,} | {b:,.0f} | {1e3 / b:.1f} | {t:,.0f} | {total} | "
                         f"{' + '.join(SHORT[s] for s in used) or '–'} |")
            if name == SNAT_PATH:
                snat.append((n, b))
    lines += ["", "| old stage (per operation) | flows | ns/op | M ops/s |", "|---|---:|---:|---:|"]
    for n, _, st, _ in results:
        for s, v in st.items():
            lines.append(f"| {s} | {n:,} | {v:,.1f} | {1e3 / v:.1f} |")
    lines += ["", "Gateway SNAT path through the real Datapath: "
              + ", ".join(f"{1e3 / p:.1f} Mpps per core at {n:,} flows (process_batch)" for n, p in snat)
              + f"; issue 17 target: {TARGET_MPPS:.0f} Mpps per core ({1e3 / TARGET_MPPS:.0f} ns/frame).",
              "", "Make-before-break (a gateway pin lookup per frame from a pod): pod -> remote gateway "
              + ", ".join(f"{a:,.0f} -> {b:,.0f} ns/frame ({(b - a) / a:+.1%}) at {n:,} flows "
                          f"({p['capacity']:,} pins, {p['evicted']} evicted)" for n, a, b, p in mbb)
              + f"; issue 15 target: under {MBB_TARGET:.0%} slower.",
              "", "IPv6 beside IPv4 (the same flows, this run; issue 18 target: within "
              f"{V6_TARGET:.0%}): "
              + "; ".join(f"{name.split(' (')[0][5:]} {dp[v4][0]:,.0f} -> {dp[name][0]:,.0f} ns/frame "
                          f"({(dp[name][0] - dp[v4][0]) / dp[v4][0]:+.1%}) at {n:,} flows"
                          for n, dp, _, _ in results for name, v4 in V6_OF.items())]
    return "\n".join(lines)


def run_mbb(sizes=(1_000, 100_000), reps=15) -> str:
    """Only the make-before-break pair (pod -> remote gateway without and with
    pins), interleaved run by run, so both meet the same machine load."""
    a_name, b_name = PATHS[0][0], MBB_PATH
    lines = ["| flows | without pins ns/frame | with pins ns/frame | cost (median of the run pairs) | pins |",
             "|---:|---:|---:|---:|---|"]
    for n in sizes:
        wl = Workload(n)
        a_dp, b_dp = wl.node_of(a_name), wl.node_of(b_name)
        for _ in range(2):                            # warm up
            feed_batch(a_dp, wl.packed[a_name])
            feed_batch(b_dp, wl.packed[b_name])
        a, b = [], []
        for _ in range(reps):
            a.append(cpu_seconds(feed_batch, a_dp, wl.packed[a_name]) * 1e9 / n)
            b.append(cpu_seconds(feed_batch, b_dp, wl.packed[b_name]) * 1e9 / n)
        p = b_dp.pins.stats()
        lines.append(f"| {n:,} | {statistics.median(a):,.1f} | {statistics.median(b):,.1f} | "
                     f"{statistics.median(y / x - 1 for x, y in zip(a, b)):+.1%} | "
                     f"{p['capacity']:,} pins, {p['evicted']} evicted |")
        del wl
    return "\n".join([f"### Make-before-break cost, process_batch, median of {reps} interleaved runs "
                      f"(issue 15 target: under {MBB_TARGET:.0%})", ""] + lines)


if __name__ == "__main__":
    import argparse

    from compare import machine_summary

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1k and 10k flows, fewer runs")
    ap.add_argument("--ipv6", action="store_true", help="only the IPv6 paths beside IPv4, interleaved")
    ap.add_argument("--mbb", action="store_true",
                    help="only pod -> remote gateway without and with make-before-break, interleaved")
    ap.add_argument("--reps", type=int, default=15, help="runs of each with --mbb")
    args = ap.parse_args()
    print(machine_summary())
    if args.ipv6:
        print(run_ipv6(quick=args.quick))
    elif args.mbb:
        print(run_mbb(reps=args.reps))
    else:
        print(run(quick=args.quick))
