"""NAT state replication in memory: records, wire, sequence checks, the table side."""
import queue
import socket
import struct
import threading

import numpy as np
import pytest
from egresscore._core import REPL_RECORD_DTYPE, nat_repl_apply, nat_repl_clear, nat_repl_export

from egresscore import FlowLog, NatTable
from egresscore import replication as R

X, X6, OWN = "192.168.1.120", "fd00:192:168:1::120", "192.168.1.3"
ACTIVE, OTHER = "192.168.1.3", "192.168.1.1"
GATEWAYS = frozenset({"192.168.1.3", "192.168.1.4"})


def _active(n=10, now=100.0):
    a = NatTable([X, OWN, X6], seed=1)   # one seed: two calls pick the same ports
    a.flow_log = FlowLog(4096)
    for i in range(n):
        a.translate("10.0.1.93", 20000 + i, "203.0.113.10", 80, "tcp", egress_ip=X, now=now)
    a.translate("10.0.1.93", 30000, "203.0.113.10", 80, "tcp", egress_ip=OWN, now=now)   # not replicated
    a.translate("fd00:10:1::93", 5353, "2001:db8::10", 53, "udp", egress_ip=X6, now=now)
    return a


def _standby():
    b = NatTable(["192.168.1.4"])
    b.add_egress_ip(X)
    b.add_egress_ip(X6)
    return b


def _conns(table, egress_ips, now=100.0):
    return {(e.proto, e.src, e.sport, e.dst, e.dport): (e.egress_ip, e.xport)
            for e in table.entries(now=now) if e.egress_ip in egress_ips}


class Rx:
    """A Receiver with its callbacks recorded."""

    def __init__(self, **kw):
        self.applied, self.resets, self.asked = [], [], []
        self.r = R.Receiver(lambda recs, t0: self.applied.append(recs), self.resets.append,
                            lambda src, epoch: self.asked.append((src, epoch)), **kw)

    def feed(self, data, src=ACTIVE, mine=frozenset({X, X6})):
        return self.r.datagram(data, src, GATEWAYS, mine)


def test_flow_starts_and_ends_become_records_of_the_replicated_egress_ips_only():
    a = _active()
    recs, t0 = R.from_flow_records(a.flow_log.drain(), [X, X6])
    assert len(recs) == 11 and set(recs["op"]) == {1} and t0 > 0
    assert sorted(set(recs["family"])) == [4, 6]
    a.flush(now=101.0)
    ends, _ = R.from_flow_records(a.flow_log.drain(), [X])
    assert len(ends) == 10 and set(ends["op"]) == {2}


@pytest.mark.parametrize("n", [0, 1, R.PER_DATAGRAM[4], R.PER_DATAGRAM[4] + 1, 500])
def test_encode_decode_round_trip_in_datagrams_under_the_mtu(n):
    a = _active(n)
    recs, t0 = R.from_flow_records(a.flow_log.drain(), [X, X6])
    grams = R.encode(recs, epoch=9, seq=5, t0=t0)
    assert [s for s, _ in grams] == list(range(5, 5 + len(grams)))
    assert all(len(d) <= R.MAX_DATAGRAM for _, d in grams)
    back = []
    for _, d in grams:
        kind, fam, count, epoch, seq, t = R.header(d)
        assert (kind, epoch, t) == (R.DATA, 9, t0)
        back.append(R.decode(d, fam, count))
    back = np.concatenate(back).astype(REPL_RECORD_DTYPE) if back else np.zeros(0, REPL_RECORD_DTYPE)

    def key(a):     # each record's fields (not its padding), in any order (records are grouped by family)
        return sorted(b"".join(np.asarray(a[f][i]).tobytes() for f in REPL_RECORD_DTYPE.names) for i in range(len(a)))

    assert key(back) == key(recs)
    # IPv4 records are 24 bytes on the wire: an IPv4 datagram of k records is header + 24 k
    v4 = [d for _, d in grams if R.header(d)[1] == 4]
    assert all(len(d) == R.HEADER_SIZE + 24 * R.header(d)[2] for d in v4)


def test_standby_applies_the_stream_with_the_same_egress_port():
    a, b = _active(50), _standby()
    rx = Rx()
    s = R.Sender(None, epoch=3)
    sent = []
    s.sock = type("S", (), {"sendto": lambda self, d, t: sent.append(d)})()
    s.target = (ACTIVE, R.REPLICATION_PORT)
    s.reset([X, X6])
    recs, t0 = R.from_flow_records(a.flow_log.drain(), [X, X6])
    s.send(recs, t0)
    for d in sent:
        assert rx.feed(d) is None
    assert rx.resets == [[X, X6]] and rx.r.synced(ACTIVE)
    for recs in rx.applied:
        nat_repl_apply(b, recs, now=100.0)
    assert _conns(b, {X, X6}) == _conns(a, {X, X6}) and len(_conns(b, {X, X6})) == 51
    e = b.get("10.0.1.93", 20001, "203.0.113.10", 80, now=100.0)
    assert e.state == "ESTABLISHED" and e.pkts_in == 0      # inactive until takeover
    # the standby translates a reply to the same pod and a new packet with the same port
    assert b.reverse("203.0.113.10", 80, X, a.get("10.0.1.93", 20001, "203.0.113.10", 80, now=100.0).xport,
                     "tcp", now=100.5) == ("10.0.1.93", 20001)


def test_ends_remove_without_an_end_record_and_repeats_refresh():
    a, b = _active(5), _standby()
    b.flow_log = FlowLog(64)
    recs, _ = R.from_flow_records(a.flow_log.drain(), [X])
    assert nat_repl_apply(b, recs, now=100.0)["added"] == 5
    again = nat_repl_apply(b, recs, now=200.0)
    assert again["known"] == 5 and again["added"] == 0
    assert b.get("10.0.1.93", 20000, "203.0.113.10", 80, now=200.0).expires_in == pytest.approx(21600.0)
    a.flush(now=101.0)
    ends, _ = R.from_flow_records(a.flow_log.drain(), [X])
    c = nat_repl_apply(b, ends, now=201.0)
    assert c["removed"] == 5 and len(b) == 0
    assert nat_repl_apply(b, ends, now=201.0)["not_found"] == 5
    assert b.flow_log.stats["appended"]["end"] == 0       # it did not end here


def test_records_for_an_unknown_egress_ip_or_a_taken_port_are_not_applied():
    a, b = _active(3), NatTable(["192.168.1.4"])
    recs, _ = R.from_flow_records(a.flow_log.drain(), [X])
    assert nat_repl_apply(b, recs, now=100.0)["unknown_egress_ip"] == 3 and len(b) == 0
    b.add_egress_ip(X)
    bad = recs.copy()
    bad["xport"] = 10          # outside the port range
    assert nat_repl_apply(b, bad, now=100.0)["invalid"] == 3 and len(b) == 0


def test_export_in_chunks_covers_the_live_connections_of_the_asked_egress_ips():
    a = _active(300)
    got, start, chunks = [], 0, 0
    while start is not None:
        recs, start = nat_repl_export(a, [X], start, 64, now=100.0)
        got.append(recs)
        chunks += 1
    recs = np.concatenate(got).astype(REPL_RECORD_DTYPE)
    assert chunks >= 300 // 64 and len(recs) == 300 and set(recs["op"]) == {1}
    b = _standby()
    assert nat_repl_apply(b, recs, now=100.0)["added"] == 300
    assert _conns(b, {X}) == _conns(a, {X})
    assert nat_repl_clear(b, X, now=100.0) == 300 and len(b) == 0


def test_datagrams_from_a_host_that_is_not_a_gateway_are_dropped():
    rx = Rx()
    assert rx.feed(R._reset_datagram([X], epoch=1, seq=0), src=OTHER) == "not_gateway"
    assert rx.resets == [] and rx.r.dropped["not_gateway"] == 1


def test_a_stream_joined_midway_asks_for_a_resync_and_waits_for_its_reset():
    a = _active(5)
    recs, t0 = R.from_flow_records(a.flow_log.drain(), [X])
    (_, d), = R.encode(recs, epoch=4, seq=7, t0=t0)
    rx = Rx()
    assert rx.feed(d) == "other_stream" and rx.asked == [(ACTIVE, 4)] and rx.applied == []
    assert not rx.r.synced(ACTIVE)
    assert rx.feed(R._reset_datagram([X], epoch=4, seq=12)) is None      # a reset after a gap is fine
    assert rx.r.synced(ACTIVE)
    (_, d), = R.encode(recs, epoch=4, seq=13, t0=t0)
    assert rx.feed(d) is None and len(rx.applied) == 1


def test_out_of_sequence_and_gaps_are_dropped_and_counted_and_a_gap_asks_again():
    a = _active(5)
    recs, t0 = R.from_flow_records(a.flow_log.drain(), [X])
    rx = Rx(resync_every=0.0)
    rx.feed(R._reset_datagram([X], epoch=4, seq=0))
    g = {s: R.encode(recs, epoch=4, seq=s, t0=t0)[0][1] for s in range(1, 5)}
    assert rx.feed(g[1]) is None
    assert rx.feed(g[1]) == "out_of_sequence"
    assert rx.feed(g[3]) == "gap" and not rx.r.synced(ACTIVE) and rx.asked == [(ACTIVE, 4)]
    assert rx.feed(g[4]) is None            # followed again from there, while the resync comes
    assert rx.r.dropped["out_of_sequence"] == 1 and rx.r.dropped["gap"] == 1 and len(rx.applied) == 2


def test_malformed_datagrams_are_dropped():
    a = _active(2)
    recs, t0 = R.from_flow_records(a.flow_log.drain(), [X])
    rx = Rx()
    rx.feed(R._reset_datagram([X], epoch=4, seq=0))
    (_, good), = R.encode(recs, epoch=4, seq=1, t0=t0)
    assert rx.feed(b"EGCH" + good[4:]) == "malformed"                 # another protocol
    assert rx.feed(good[:-3]) == "malformed"                          # truncated
    bad = bytearray(good)
    bad[R.HEADER_SIZE] = 9                                            # no such op
    assert rx.feed(bytes(bad)) == "malformed"
    assert rx.feed(R.resync_request(4)) == "malformed"                 # a request is not data
    assert rx.feed(R.pull_request([X])) == "malformed"                 # nor is a pull
    assert rx.r.dropped["malformed"] == 5 and rx.applied == []
    assert rx.feed(good) is None                                      # the stream goes on


def test_records_for_egress_ips_this_node_does_not_stand_by_for_are_counted():
    a = _active(4)
    recs, t0 = R.from_flow_records(a.flow_log.drain(), [X, X6])
    rx = Rx()
    rx.feed(R._reset_datagram([X], epoch=4, seq=0), mine=frozenset({X}))
    for _, d in R.encode(recs, epoch=4, seq=1, t0=t0):
        rx.feed(d, mine=frozenset({X}))
    assert sum(len(r) for r in rx.applied) == 4 and rx.r.dropped["foreign_egress_ip"] == 1


def test_a_full_pending_buffer_drops_and_asks_for_a_resync():
    a = _active(20)
    recs, t0 = R.from_flow_records(a.flow_log.drain(), [X])
    rx = Rx(max_pending=30)
    rx.feed(R._reset_datagram([X], epoch=4, seq=0))
    for seq in (1, 2):
        rx.feed(R.encode(recs, epoch=4, seq=seq, t0=t0)[0][1])
    assert rx.r.pending == 20 and rx.r.dropped["overflow"] == 1 and rx.asked and not rx.r.synced(ACTIVE)
    rx.r.done(20)
    assert rx.r.pending == 0


def test_sender_and_receiver_over_udp_on_loopback():
    a, b = _active(400), _standby()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rxs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rxs.bind(("127.0.0.1", 0))
    rxs.settimeout(1.0)
    try:
        s = R.Sender(tx)
        s.target = rxs.getsockname()
        s.reset([X])
        recs, t0 = R.from_flow_records(a.flow_log.drain(), [X])
        n = s.send(recs, t0)
        rx = Rx()
        for _ in range(n + 1):
            data, _ = rxs.recvfrom(2048)
            assert rx.r.datagram(data, "127.0.0.1", {"127.0.0.1"}, {X}) is None
        for r in rx.applied:
            nat_repl_apply(b, r, now=100.0)
        assert _conns(b, {X}) == _conns(a, {X}) and s.counters["datagrams"] == n + 1
    finally:
        tx.close()
        rxs.close()


def test_lag_window_percentiles():
    w = R.LagWindow(size=100)
    for i in range(1, 201):
        w.add(i / 1000)
    s = w.summary()
    assert s["samples"] == 200 and s["max_ms"] == 200.0 and 195 <= s["p99_ms"] <= 200


def test_gratuitous_arp_frame():
    from egresscore.agent.failover import gratuitous_arp

    f = gratuitous_arp("02:ec:c0:a8:01:04", X, op=1)
    assert len(f) == 42 and f[:6] == b"\xff" * 6 and f[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", f[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    assert f[22:28] == bytes.fromhex("02ecc0a80104") and f[28:32] == f[38:42] == socket.inet_aton(X)


def _ha_cluster():
    from egresscore import Cluster
    from egresscore.cluster import Node, Pod

    nodes = [Node(f"node{i}", labels={"egress-gateway": "true"} if i >= 3 else {}, internal_ip=f"192.168.1.{i}",
                  interfaces=[{"name": "eth0", "addresses": [f"192.168.1.{i}/24"]}], default_route_interface="eth0",
                  pod_cidrs=[f"10.0.{i}.0/24"]) for i in (1, 3, 4)]
    pods = [Pod("app1", "default", uid="u1", labels={"app": "app1"}, ips=("10.0.1.93",), node="node1")]
    return Cluster(nodes, [], pods)


def _stateful_policy(egress_ip=X):
    from egresscore.policy import parse_policy

    p, _ = parse_policy({"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy",
                         "metadata": {"name": "p"},
                         "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
                                  "destinationCIDRs": ["203.0.113.0/24"],
                                  "egressGateway": {"nodeSelector": {"matchLabels": {"egress-gateway": "true"}},
                                                    "egressIP": egress_ip}}})
    return p


def test_a_held_floating_egress_ip_resolves_on_the_node_that_holds_it():
    from egresscore import Compiler
    from egresscore.agent.failover import floating_egress_ips

    c = Compiler(_ha_cluster(), [_stateful_policy()], node="node4", down={"node3"})
    assert floating_egress_ips(c) == {X: ["node3", "node4"]}
    (e,) = c.desired.values()
    assert str(e.gateway_ip) == "192.168.1.4" and str(e.egress_ip) == "0.0.0.0"
    assert any("not on any interface" in str(p) for p in c.problems())
    assert c.set_held({X: "eth0"}) == 1
    (e,) = c.desired.values()
    assert (str(e.egress_ip), str(e.gateway_ip)) == (X, "192.168.1.4") and not c.problems()
    assert c.set_held({}) == 1 and str(next(iter(c.desired.values())).egress_ip) == "0.0.0.0"


def test_an_egress_ip_a_node_records_never_floats():
    from egresscore import Compiler
    from egresscore.agent.failover import floating_egress_ips

    assert floating_egress_ips(Compiler(_ha_cluster(), [_stateful_policy("192.168.1.3")])) == {}


@pytest.mark.parametrize("n", [0, 1, 57, 58, 3000])
def test_the_c_encoder_writes_what_the_reference_encoder_writes(n):
    from egresscore._core import REPL_DATAGRAM_BYTES, repl_encode_log

    a, b = _active(n), _active(n)
    recs, _ = R.from_flow_records(b.flow_log.drain(), [X, X6])
    buf4, buf6 = bytearray(64 * REPL_DATAGRAM_BYTES[4]), bytearray(64 * REPL_DATAGRAM_BYTES[6])
    grams, seq = [], 7
    while True:
        n4, n6, k, taken, kept = repl_encode_log(a.flow_log, [X, X6], 3, seq, buf4, buf6)
        for buf, size, used in ((buf4, REPL_DATAGRAM_BYTES[4], n4), (buf6, REPL_DATAGRAM_BYTES[6], n6)):
            grams += [bytes(buf[o:min(o + size, used)]) for o in range(0, used, size)]
        seq += k
        if not taken:
            break
    assert len(a.flow_log) == 0
    got = sorted((R.header(g)[1], R.decode(g, R.header(g)[1], R.header(g)[2]).tobytes()) for g in grams)
    # the reference, per family, in the same datagram sizes (records keep their ring order)
    ref = sorted((R.header(d)[1], R.decode(d, R.header(d)[1], R.header(d)[2]).tobytes())
                 for _, d in R.encode(recs, epoch=3, seq=7))
    assert got == ref
    assert sorted(R.header(g)[4] for g in grams) == list(range(7, 7 + len(grams)))
    assert all(R.header(g)[3] == 3 and R.header(g)[5] > 0 for g in grams)


@pytest.mark.parametrize("gro", [True, False])
def test_send_log_with_gro_on_the_standby_socket_gives_every_datagram_in_order(gro):
    """Segmented datagrams, whole and in order, read one by one (gro=False) or coalesced."""
    a, b = _active(2000), _standby()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rxs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rxs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if gro and not R.enable_gro(rxs):
        pytest.skip("this kernel refuses UDP_GRO")
    rxs.bind(("127.0.0.1", 0))
    rxs.settimeout(0.5)
    try:
        s = R.Sender(tx)
        s.target = rxs.getsockname()
        s.reset([X, X6])
        assert s.send_log(a.flow_log, [X, X6]) == 2002
        rx, got, reads = Rx(), [], 0
        while len(got) < s.counters["datagrams"]:
            grams, (src, _) = R.recv_datagrams(rxs)
            reads += 1
            got += grams
        assert len(got) == s.counters["datagrams"]
        assert sum(len(g) for g in got) == s.counters["bytes"]
        for data in got:
            assert len(data) <= R.MAX_DATAGRAM
            assert rx.r.datagram(data, src, {"127.0.0.1"}, {X, X6}) is None      # in sequence, whole
        if gro and s.gso:
            assert reads < len(got)           # coalesced: fewer receives than datagrams
        else:
            assert reads == len(got)
        for r in rx.applied:
            nat_repl_apply(b, r, now=100.0)
        assert _conns(b, {X, X6}) == _conns(a, {X, X6}) and len(b) == 2001
    finally:
        tx.close()
        rxs.close()


class _FakeHost:
    """The agent's host thread, inline: pyroute2 calls recorded."""

    def __init__(self):
        self.addrs = []
        self.ipr = self

    def call(self, fn, *args, timeout=None):
        return fn(*args)

    def post(self, fn, *args):
        return fn(*args)

    def addr(self, op, **kw):
        self.addrs.append((op, kw["address"]))


class _FakeClaims:
    def __init__(self):
        self._local_ips = ["192.168.1.4"]

    def set_local_ips(self, ips):
        self._local_ips = sorted(ips)


class _FakeAgent:
    """What StatefulFailover uses of an Agent, without namespaces."""

    def __init__(self, node, down):
        from egresscore import Compiler

        self.node, self.node_ip, self.node_mac, self.underlay = node, "127.0.0.1", "02:00:00:00:00:04", "lo"
        self._underlay_index = 1
        self._host, self._claims = _FakeHost(), _FakeClaims()
        self.compiler = Compiler(_ha_cluster(), [_stateful_policy()], node=node, down=down)
        self.nat = NatTable([f"192.168.1.{node[-1]}"])
        self.flow_logger, self.flow_log, self._keep_state = None, None, False
        self.datapath = type("D", (), {"set_flow_log": lambda self, log: None})()
        self.synced_claims = 0
        self._queue = queue.Queue()          # the loop thread's jobs, run by run_jobs()
        self._control = threading.RLock()

    def _submit(self, fn, *args):
        return fn(*args)

    def _wake(self):
        pass

    def run_jobs(self):
        while not self._queue.empty():
            self._queue.get()()

    def _host_sync_claims(self):
        self.synced_claims += 1


def test_roles_the_standby_holds_the_ip_in_its_table_and_takes_it_when_the_active_is_down(monkeypatch):
    from egresscore.agent import failover as F

    monkeypatch.setattr(F.StatefulFailover, "_garp", lambda self, ip: None)   # no raw socket here
    a = _FakeAgent("node4", down=())
    fo = F.StatefulFailover(a, port=0, garp_times=(0.0,))
    try:
        fo.update()
        assert fo.standby_for == {X: "192.168.1.3"} and fo.owned == set()
        assert X in a.nat.egress_ips and a._host.addrs == [] and a.compiler.held == {}
        # node3 down: node4 holds the address, claims it, resolves it, and has no standby to stream to
        a.compiler.set_down({"node3"})
        fo.update()
        assert fo.owned == {X} and fo.standby_for == {} and a._host.addrs == [("add", X)]
        assert X in a._claims._local_ips and a.compiler.held == {X: "lo"}
        (e,) = a.compiler.desired.values()
        assert (str(e.egress_ip), str(e.gateway_ip)) == (X, "192.168.1.4")
        # node3 back: node4 gives the address back and stands by again
        a.compiler.set_down(())
        fo.update()
        assert fo.owned == set() and fo.standby_for == {X: "192.168.1.3"}
        assert a._host.addrs[-1] == ("del", X) and X not in a._claims._local_ips and a.compiler.held == {}
    finally:
        fo.stop()


def test_roles_the_active_streams_to_the_next_node_up():
    from egresscore.agent import failover as F

    a = _FakeAgent("node3", down=())
    a._host.post = lambda fn, *args: None
    fo = F.StatefulFailover(a, port=0, garp_times=(0.0,))
    fo._garp = lambda ip: None
    try:
        fo.update()
        # node3 starts while node4 is up: it first pulls what node4 may hold (failback, below)
        assert fo.owned == set() and fo.stats()["pulling"] == {X: "192.168.1.4"} and fo._senders == {}
        fo._pulling[X][1] = 0.0                               # no answer: given up on at its deadline
        fo._check_pulls()
        assert fo.counters["pull_timeouts"] == 1
        assert fo.owned == {X} and set(fo._senders) == {"192.168.1.4"}
        assert fo._resync == {"192.168.1.4": [0, True]}     # a new standby: a full resync first
        a.compiler.set_down({"node4"})
        fo.update()
        assert fo.owned == {X} and fo._senders == {}        # no standby up: nothing to stream to
    finally:
        fo.stop()


def test_failback_the_returning_active_pulls_the_connections_before_it_takes_the_ip(monkeypatch):
    """node4 holds X (node3 was down) and carries connections; node3 comes back:
    it pulls them (PULL -> RESET, records, DONE), applies them, then holds X
    and translates them with node4's egress ports; node4 stands by again."""
    from egresscore.agent import failover as F

    monkeypatch.setattr(F.StatefulFailover, "_garp", lambda self, ip: None)
    a4 = _FakeAgent("node4", down={"node3"})
    fo4 = F.StatefulFailover(a4, port=0, garp_times=(0.0,))
    a3 = _FakeAgent("node3", down=())
    a3._host.post = lambda fn, *args: None
    fo3 = F.StatefulFailover(a3, port=0, garp_times=(0.0,))
    rxs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rxs.bind(("127.0.0.1", 0))
    rxs.settimeout(1.0)
    try:
        fo4.update()
        assert fo4.owned == {X}
        carried = {20000 + i: a4.nat.translate("10.0.1.93", 20000 + i, "203.0.113.10", 80, "tcp", egress_ip=X)[1]
                   for i in range(300)}
        # node3's stale copy of one of them (adopted from its state file) is replaced, not kept
        a3.nat.add_egress_ip(X)
        a3.nat.insert("10.0.1.93", 20000, "203.0.113.10", 80, egress_ip=X, xport=carried[20001], expires_in=100)
        fo3.update()
        assert fo3.owned == set() and fo3.stats()["pulling"] == {X: "192.168.1.4"} and a3.compiler.held == {}
        # node4 gets the PULL from node3 (a gateway) and answers on a stream of its own
        data = R.pull_request([X])
        fo4._answer_pull(data, R.header(data), "192.168.1.3")
        fo4._answer_pull(data, R.header(data), "192.168.1.3")     # a repeat while answering: one answer
        assert fo4.counters["pulls_received"] == 1
        fo4._pulls["192.168.1.3"][0].target = rxs.getsockname()
        fo4.chunk = 128
        while fo4._pulls:
            fo4._round_pulls()
        assert fo4.counters["pulls_answered"] == 1
        grams = []
        while True:
            try:
                grams.append(rxs.recv(2048))
            except socket.timeout:
                break
        kinds = [R.header(g)[0] for g in grams]
        assert kinds[0] == R.RESET and kinds[-1] == R.DONE and set(kinds[1:-1]) == {R.DATA}
        for g in grams:
            assert fo3.receiver.datagram(g, "192.168.1.4", {"192.168.1.3", "192.168.1.4"},
                                         {X} | set(fo3.standby_for)) is None
        assert fo3.owned == set()                 # not before the records are applied
        a3.run_jobs()
        fo3._check_pulls()
        assert fo3.counters["pulls_completed"] == 1 and fo3.owned == {X} and a3.compiler.held == {X: "lo"}
        assert a3._host.addrs == [("add", X)] and set(fo3._senders) == {"192.168.1.4"}
        for sport, xport in carried.items():
            assert a3.nat.reverse("203.0.113.10", 80, X, xport, "tcp") == ("10.0.1.93", sport)
        assert len(_conns(a3.nat, {X})) == 300
        # a PULL from a host that is not a gateway is refused
        fo4._answer_pull(data, R.header(data), "192.168.1.1")
        assert fo4.counters["pulls_refused"] == 1 and not fo4._pulls
        # node4 sees node3 up: it gives the address back and stands by
        a4.compiler.set_down(())
        fo4.update()
        assert fo4.owned == set() and fo4.standby_for == {X: "192.168.1.3"}
    finally:
        rxs.close()
        fo3.stop()
        fo4.stop()


def test_a_done_after_a_gap_does_not_finish_the_pull():
    done = []
    rx = R.Receiver(lambda r, t0: None, lambda ips: None, lambda src, e: None, finished=lambda s, ips: done.append(ips))
    s = R.Sender(None, epoch=9)
    sent = []
    s.sock = type("S", (), {"sendto": lambda self, d, t: sent.append(d)})()
    s.target = (ACTIVE, 1)
    s.reset([X])
    s.send(R.from_flow_records(_active(3).flow_log.drain(), [X])[0], 0)
    s.done([X])
    assert rx.datagram(sent[0], ACTIVE, GATEWAYS, {X}) is None
    assert rx.datagram(sent[2], ACTIVE, GATEWAYS, {X}) == "gap"        # the records' datagram lost
    assert done == [] and not rx.synced(ACTIVE)
    rx2 = R.Receiver(lambda r, t0: None, lambda ips: None, lambda src, e: None,
                     finished=lambda s, ips: done.append(ips))
    for d in sent:
        assert rx2.datagram(d, ACTIVE, GATEWAYS, {X}) is None
    assert done == [[X]]
