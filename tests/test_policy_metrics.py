"""Per-policy metrics (issue 15 point 4): the policy id from the compiler
through the egress map and the NAT entry, counted in C by the datapath.

Frames are built with scapy and driven through Datapath.process_batch (the
ring loop's per-batch step); the expected counts are computed from the
frames themselves (their lengths, their number, the flows among them).
"""
import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from test_compiler import lab, policy
from test_datapath import APP1, APP1_HOST, APP1_MAC, MAC, NODES, POD3, POD3_HOST, POD3_MAC, ROUTER_MAC, from_app1
from test_datapath_batch import run_batch

from egresscore import Datapath, EgressMap, NatTable
from egresscore.compiler import Compiler
from egresscore.metrics import StatsCollector
from egresscore.policystats import PolicyCounters
from egresscore.show import policy_stats_table

NOW = 500.0
EGRESS_A, EGRESS_B = "192.168.1.100", "192.168.1.101"
NET_A, NET_B, NET_C, NET_X = "203.0.113.0/24", "198.51.100.0/25", "198.51.100.128/25", "192.0.2.0/24"
SERVER_A, SERVER_B, SERVER_C, OTHER = "203.0.113.10", "198.51.100.10", "198.51.100.200", "192.0.2.9"
PID_A, PID_B, PID_C, PID_BIG = 7, 9, 11, 5000      # 5000: beyond the 4096 counted slots


def egress_map(view):
    """app1 (node1) and pod3 (node3): A and B through gateway node3 (egress IPs .100 / .101),
    C matched without a gateway, X excluded; PID_BIG on OTHER's /24 for app1."""
    em = EgressMap()
    for src in (APP1, POD3):
        local = view == "node3"
        em.set(src, NET_A, EGRESS_A if local else "0.0.0.0", "192.168.1.3", PID_A)
        em.set(src, NET_B, EGRESS_B if local else "0.0.0.0", "192.168.1.3", PID_B)
        em.set(src, NET_C, "0.0.0.0", "0.0.0.0", PID_C)
        em.set_excluded(src, "203.0.113.128/25", policy_id=PID_A)
    em.set(APP1, NET_X, "0.0.0.0", "192.168.1.3", PID_BIG)
    return em


def node(view, nat=None):
    ip = {"node1": "192.168.1.1", "node3": "192.168.1.3"}[view]
    if nat is None:
        nat = NatTable([EGRESS_A, EGRESS_B], port_range=(32768, 65534), seed=5)
    dp = Datapath(ip, MAC[ip], egress_map(view), nat)
    for i, (nip, cidr) in enumerate(NODES):
        dp.add_node(i, nip, [cidr], MAC[nip])
    dp.set_router(ROUTER_MAC)
    if view == "node1":
        dp.add_pod_port(1, APP1, APP1_HOST, APP1_MAC)
    else:
        dp.add_pod_port(1, POD3, POD3_HOST, POD3_MAC)
    return dp


def udp(dst, sport, size, src=APP1):
    return from_app1((dst, UDP(sport=sport, dport=53) / (b"q" * size)), src=src)


def flows(dst, n, sizes=(5, 100, 700)):
    """n frames to dst over n // 2 flows (each flow twice), of varied sizes."""
    return [udp(dst, 20000 + i // 2, sizes[i % len(sizes)]) for i in range(n)]


def test_source_node_counts_redirects_and_drops_per_policy():
    dp = node("node1")
    a, b, c = flows(SERVER_A, 30), flows(SERVER_B, 11), flows(SERVER_C, 4)
    big = flows(OTHER, 3)
    excluded = [udp("203.0.113.200", 30000, 10)]
    masq = [udp("192.168.50.1", 30001, 10)]
    got = run_batch(dp, a + b + c + big + excluded + masq, 1)
    assert {v for v, _, _ in got[:41]} == {"tx"}
    assert {(v, r) for v, r, _ in got[41:45]} == {("drop", "no_gateway")}
    pc = dp.policy_counters()
    assert set(pc) == {PID_A, PID_B, PID_C, 0}          # excluded and masqueraded traffic: no policy
    for pid, frames in ((PID_A, a), (PID_B, b), (0, big)):
        assert pc[pid]["redirect"] == {"packets": len(frames), "bytes": sum(len(f) for f in frames)}
        assert pc[pid]["egress"] == pc[pid]["reply"] == {"packets": 0, "bytes": 0}
        assert pc[pid]["drops"] == {} and pc[pid]["connections_opened"] == 0
    assert pc[PID_C]["drops"] == {"no_gateway": 4}
    assert pc[PID_C]["redirect"]["packets"] == 0
    # the totals agree with the node's own counters
    assert dp.counters()["encap"] == 44 and dp.counters()["drops"] == {"no_gateway": 4}


def tunnel(frames):
    """What node1 sends to node3 for app1's frames (the VXLAN frames), and the inner frames."""
    n1 = node("node1")
    out = [o[0][1] for _, _, o in run_batch(n1, frames, 1)]
    return out, [bytes(Ether(f)[VXLAN].payload) for f in out]


def reply_to(snat, size):
    p = Ether(snat)
    return bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.3"]) / IP(src=p[IP].dst, dst=p[IP].src)
                 / UDP(sport=p[UDP].dport, dport=p[UDP].sport) / (b"r" * size))


def test_gateway_counts_snat_replies_and_connections_per_policy():
    a, b = flows(SERVER_A, 40), flows(SERVER_B, 9)
    outer, inner = tunnel(a + b)
    gw = node("node3")
    got = run_batch(gw, outer, 0)
    assert {(v, r) for v, r, _ in got} == {("tx", "none")}
    snat = [o[0][1] for _, _, o in got]
    assert {Ether(f)[IP].src for f in snat[:40]} == {EGRESS_A} and {Ether(f)[IP].src for f in snat[40:]} == {EGRESS_B}
    replies = [reply_to(f, 3 + 50 * (i % 4)) for i, f in enumerate(snat)]
    got = run_batch(gw, replies, 0)
    assert {(v, r) for v, r, _ in got} == {("tx", "none")}
    pc = gw.policy_counters()
    assert set(pc) == {PID_A, PID_B}
    for pid, lo, hi in ((PID_A, 0, 40), (PID_B, 40, 49)):
        rec = pc[pid]
        assert rec["egress"] == {"packets": hi - lo, "bytes": sum(len(f) for f in inner[lo:hi])}
        assert rec["reply"] == {"packets": hi - lo, "bytes": sum(len(f) for f in replies[lo:hi])}
        assert rec["redirect"] == {"packets": 0, "bytes": 0}
        n_flows = len({Ether(f)[UDP].sport for f in inner[lo:hi]})
        assert rec["connections_opened"] == rec["connections_live"] == n_flows
    # the pod-side bytes: what node1 delivers to app1 is the reply frame's length
    n1 = node("node1")
    back = [o[0][1] for _, _, o in run_batch(gw, replies[:3], 0)]
    delivered = run_batch(n1, back, 0)
    assert [len(o[0][1]) for _, _, o in delivered] == [len(f) for f in replies[:3]]
    # connections end: live goes to zero, opened stays; the NAT entries carry the policy id
    nat = gw.nat
    assert {e.policy_id for e in nat.entries(now=NOW)} == {PID_A, PID_B}
    assert gw.gc(100000, now=NOW + 301) == 20 + 5
    pc = gw.policy_counters()
    assert (pc[PID_A]["connections_opened"], pc[PID_A]["connections_live"]) == (20, 0)
    assert (pc[PID_B]["connections_opened"], pc[PID_B]["connections_live"]) == (5, 0)


def test_local_pod_on_the_gateway_and_tcp_close():
    gw = node("node3")
    syn = bytes(Ether(src=POD3_MAC, dst=POD3_HOST) / IP(src=POD3, dst=SERVER_A) / TCP(sport=4000, dport=80, flags="S"))
    fin = bytes(Ether(src=POD3_MAC, dst=POD3_HOST) / IP(src=POD3, dst=SERVER_A)
                / TCP(sport=4000, dport=80, flags="FA") / b"bye")
    got = run_batch(gw, [syn, fin], 1)
    assert {v for v, _, _ in got} == {"tx"}
    xport = Ether(got[0][2][0][1])[TCP].sport
    synack = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.3"]) / IP(src=SERVER_A, dst=EGRESS_A)
                   / TCP(sport=80, dport=xport, flags="SA"))
    finack = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.3"]) / IP(src=SERVER_A, dst=EGRESS_A)
                   / TCP(sport=80, dport=xport, flags="FA"))
    got = run_batch(gw, [synack, finack], 0)
    assert [(v, o[0][0]) for v, _, o in got] == [("tx_local", 1)] * 2
    rec = gw.policy_counters()[PID_A]
    assert rec["egress"] == {"packets": 2, "bytes": len(syn) + len(fin)}
    assert rec["reply"] == {"packets": 2, "bytes": len(synack) + len(finack)}
    assert (rec["connections_opened"], rec["connections_live"]) == (1, 1)
    gw.gc(100000, now=NOW + 11)                 # closed both ways: gone after the closing timeout
    rec = gw.policy_counters()[PID_A]
    assert (rec["connections_opened"], rec["connections_live"]) == (1, 0)


def test_gateway_drops_count_to_the_policy():
    nat = NatTable(port_range=(32768, 65534), seed=5)
    nat.add_egress_ip(EGRESS_A, port_range=(40000, 40000))      # one port: the second pod port is refused
    nat.add_egress_ip(EGRESS_B)
    outer, _ = tunnel([udp(SERVER_A, 1000, 10), udp(SERVER_A, 1001, 10), udp(SERVER_A, 1002, 10)])
    gw = node("node3", nat)
    got = run_batch(gw, outer, 0)
    assert [(v, r) for v, r, _ in got] == [("tx", "none"), ("drop", "nat_exhausted"), ("drop", "nat_exhausted")]
    rec = gw.policy_counters()[PID_A]
    assert rec["drops"] == {"nat_exhausted": 2}
    assert rec["egress"]["packets"] == 1 and rec["connections_opened"] == 1
    # an unsolicited reply has no connection, so no policy: counted only globally
    stray = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.3"]) / IP(src=SERVER_A, dst=EGRESS_B)
                  / UDP(sport=53, dport=50000))
    assert run_batch(gw, [stray], 0)[0][:2] == ("drop", "no_nat_entry")
    assert set(gw.policy_counters()) == {PID_A}


def test_counting_agrees_between_process_and_process_batch():
    frames = flows(SERVER_A, 20) + flows(SERVER_C, 3)
    one, many = node("node1"), node("node1")
    for f in frames:
        one.process(f, 1, NOW)
    run_batch(many, frames, 1)
    assert one.policy_counters() == many.policy_counters()
    many.reset_counters()
    assert many.policy_counters() == {}


# --- the policy id: compiler, egress map ---------------------------------------------


def test_compiler_ids_are_stable_and_reused_only_after_removal():
    c = Compiler(lab(), [policy("b", dst=("198.51.100.0/24",)), policy("a")], egress_map=EgressMap())
    assert c.policy_ids == {"a": 1, "b": 2}
    assert c.desired[("10.0.1.93", "203.0.113.0/24")].policy_id == 1
    assert {e.policy_id for e in c.egress_map.entries()} == {1, 2}
    c.compile()
    c.upsert_policy(policy("c", dst=("192.0.2.0/24",)))
    assert c.policy_ids == {"a": 1, "b": 2, "c": 3}
    c.upsert_policy(policy("a", dst=("203.0.113.0/25",)))            # an edit keeps the id
    assert c.policy_ids["a"] == 1
    c.remove_policy("b")
    c.remove_policy("a")
    c.upsert_policy(policy("d", dst=("192.0.2.128/25",)))
    assert c.policy_ids == {"c": 3, "d": 2}                            # the oldest freed id first
    c.reset(c.cluster.copy(), [policy("c", dst=("192.0.2.0/24",)), policy("e", dst=("10.9.0.0/16",))])
    assert c.policy_ids == {"c": 3, "e": 1}
    assert {(str(e.destination), e.policy_id) for e in c.egress_map.entries()} == {
        ("192.0.2.0/24", 3), ("10.9.0.0/16", 1)}


def test_a_key_won_by_another_policy_takes_its_id_without_a_conflict():
    c = Compiler(lab(), [policy("z")], egress_map=EgressMap())
    key = ("10.0.1.93", "203.0.113.0/24")
    assert c.desired[key].policy_id == c.policy_id("z")
    c.upsert_policy(policy("m"))                                      # same value, sorts first: wins
    assert c.desired[key].policy_id == c.policy_id("m")
    assert c.conflicts() == []
    assert c.egress_map.get(*key).policy_id == c.policy_id("m")


def test_egress_map_carries_the_policy_id_through_set_update_sync_and_lookups():
    em = EgressMap()
    em.set("10.0.1.5", "203.0.113.0/24", "192.168.1.3", "192.168.1.3")          # old signature: id 0
    assert em.get("10.0.1.5", "203.0.113.0/24").policy_id == 0
    em.update([("10.0.1.5", "203.0.113.0/24", "192.168.1.3", "192.168.1.3", 12),
               ("10.0.1.6", "198.51.100.0/24", "192.168.1.3", "192.168.1.3", 4095)], [])
    em.set("fd00::5", "2001:db8::/32", "fd00:1::100", "192.168.1.3", 300)
    src = np.array([int.from_bytes(bytes(map(int, a.split("."))), "big") for a in ("10.0.1.5", "10.0.1.6", "10.0.1.7")],
                   np.uint32)
    dst = np.array([0xCB007101, 0xC6336401, 0xCB007101], np.uint32)
    e, g, st, pol = em.lookup_batch(src, dst, policy_ids=True)
    assert st.tolist() == [1, 1, 0] and pol.tolist() == [12, 4095, 0]
    assert len(em.lookup_batch(src, dst)) == 3                                     # unchanged without it
    assert em.lookup("fd00::5", "2001:db8::1").policy_id == 300
    added, removed, changed = em.sync([("10.0.1.5", "203.0.113.0/24", "192.168.1.3", "192.168.1.3", 13)])
    assert (added, removed, changed) == (0, 2, 1)
    assert em.lookup("10.0.1.5", "203.0.113.9").policy_id == 13
    for bad in (-1, 65535, "7", 1.0, True):
        with pytest.raises(ValueError, match="policy_id"):
            em.set("10.0.1.5", "203.0.113.0/24", "192.168.1.3", "192.168.1.3", bad)
    assert em.lookup("10.0.1.5", "203.0.113.9").policy_id == 13                   # kept


# --- by name: stats, metrics, the table ----------------------------------------------


def test_policy_counters_by_name_metrics_and_table():
    cluster = lab()
    c = Compiler(cluster, [policy("web", gw={"nodeSelector": {"matchLabels": {"name": "node3"}},
                                             "egressIP": EGRESS_A})], node="node3", egress_map=EgressMap())
    nat = NatTable([EGRESS_A], port_range=(32768, 65534), seed=5)
    dp = Datapath("192.168.1.3", MAC["192.168.1.3"], c.egress_map, nat)
    for i, (nip, cidr) in enumerate(NODES):
        dp.add_node(i, nip, [cidr], MAC[nip])
    dp.set_router(ROUTER_MAC)
    pcs = PolicyCounters(dp.policy_counters, c, node="node3", port_usage=nat.port_usage)
    c.on_policy_id = pcs.on_policy_id
    frames = flows(SERVER_A, 6)
    n1 = Datapath("192.168.1.1", MAC["192.168.1.1"], Compiler(cluster.copy(), c.policies, node="node1",
                                                               egress_map=EgressMap()).egress_map, NatTable())
    for i, (nip, cidr) in enumerate(NODES):
        n1.add_node(i, nip, [cidr], MAC[nip])
    n1.add_pod_port(1, APP1, APP1_HOST, APP1_MAC)
    outer = [o[0][1] for _, _, o in run_batch(n1, frames, 1)]
    inner = [bytes(Ether(f)[VXLAN].payload) for f in outer]
    run_batch(dp, outer, 0)
    by = pcs.by_policy()
    assert list(by) == ["web"]
    web = by["web"]
    assert web["id"] == 1 and web["egress"] == {"packets": 6, "bytes": sum(map(len, inner))}
    assert web["connections_live"] == 3 and web["egress_ips"] == {EGRESS_A: nat.port_usage()[EGRESS_A]}
    assert web["egress_ips"][EGRESS_A]["udp"][0] == 3
    # metrics
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in StatsCollector(lambda: {"policy_counters": by}).collect() for s in fam.samples}
    assert samples[("egresscore_policy_bytes_total", (("direction", "egress"), ("policy", "web")))] == \
        sum(map(len, inner))
    assert samples[("egresscore_policy_packets_total", (("direction", "reply"), ("policy", "web")))] == 0
    assert samples[("egresscore_policy_connections_live", (("policy", "web"),))] == 3
    assert samples[("egresscore_policy_egress_ip_ports_in_use",
                    (("egress_ip", EGRESS_A), ("policy", "web"), ("proto", "udp")))] == 3
    table = policy_stats_table(by)
    assert table.splitlines()[0].startswith("Policy") and f"6/{sum(map(len, inner))}" in table
    # the id is reused by a new policy: it starts from zero
    c.remove_policy("web")
    c.upsert_policy(policy("api", gw={"nodeSelector": {"matchLabels": {"name": "node3"}}, "egressIP": EGRESS_A}))
    assert c.policy_id("api") == 1
    api = pcs.by_policy()["api"]
    assert api["egress"] == {"packets": 0, "bytes": 0} and api["connections_opened"] == 0
    run_batch(dp, outer[:2], 0)                  # known flows: still counted to slot 1, now api's
    assert pcs.by_policy()["api"]["egress"]["packets"] == 2


def test_nat_state_file_keeps_the_policy_of_adopted_connections(tmp_path):
    path = str(tmp_path / "nat.state")
    clock = [100.0]
    t = NatTable([EGRESS_A], capacity=4096, state_path=path, clock=lambda: clock[0])
    t.insert(APP1, 4000, SERVER_A, 80, "tcp", egress_ip=EGRESS_A, xport=40000, expires_in=100, policy_id=33)
    t.insert(APP1, 4001, SERVER_A, 80, "tcp", egress_ip=EGRESS_A, xport=40001, expires_in=100, policy_id=5000)
    assert t.policy_connections() == {33: (0, 1), 0: (0, 1)}
    del t
    t2 = NatTable([EGRESS_A], capacity=4096, state_path=path, clock=lambda: clock[0])
    assert t2.state["adopted"] and t2.state["connections"] == 2
    assert sorted(e.policy_id for e in t2.entries()) == [33, 5000]
    assert t2.policy_connections() == {33: (0, 1), 0: (0, 1)}
    clock[0] += 200
    t2.gc()
    assert t2.policy_connections() == {}
