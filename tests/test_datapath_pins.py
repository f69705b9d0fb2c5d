"""Make-before-break through Datapath.process_batch: the gateway pins.

Four nodes in memory: node1 (192.168.1.1) hosts app1, node3 and node4 are
gateways, node2 is neither.  With make-before-break on, a connection from a
pod keeps the gateway it started on when the egress map moves the pod to
another (until it ends or idles out, or its gateway is flushed), while a new
connection takes the map's choice; a gateway keeps translating connections
it has a live NAT entry for.  Each behaviour is checked against a twin with
make-before-break off (Cilium's: every packet follows the map).
"""
import numpy as np
import pytest
from egresscore._core import GatewayPins
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from test_datapath_batch import run_batch, run_each

from egresscore import Datapath, EgressMap, NatTable

NODES = [("192.168.1.1", "10.0.1.0/24"), ("192.168.1.2", "10.0.2.0/24"), ("192.168.1.3", "10.0.3.0/24"),
         ("192.168.1.4", "10.0.4.0/24")]
NODE1, NODE3, NODE4 = "192.168.1.1", "192.168.1.3", "192.168.1.4"
MAC = {ip: "02:ec:c0:a8:01:%02x" % int(ip.rsplit(".", 1)[1]) for ip, _ in NODES}
ROUTER_MAC = "02:ec:c0:a8:01:fe"
APP1, APP1_MAC, APP1_HOST = "10.0.1.93", "02:ec:0a:00:01:5d", "02:ed:0a:00:01:5d"
POD3, POD3_MAC, POD3_HOST = "10.0.3.10", "02:ec:0a:00:03:0a", "02:ed:0a:00:03:0a"
SERVER, CIDR = "203.0.113.10", "203.0.113.0/24"
NOW = 500.0
TIMEOUTS = {"udp": 5.0, "tcp_closing": 2.0, "icmp": 3.0}


def node(view, gateway=NODE3, mbb=True, capacity=1024, egress=None):
    """The datapath of node1 (source), node3 or node4 (gateways) with the
    policy app1/pod3 -> CIDR through `gateway`; egress: the egress IP in the map."""
    ip = {"node1": NODE1, "node3": NODE3, "node4": NODE4}[view]
    em = EgressMap()
    for src in (APP1, POD3):
        em.set(src, CIDR, egress or (gateway if ip == gateway else "0.0.0.0"), gateway)
    dp = Datapath(ip, MAC[ip], em, NatTable(port_range=(32768, 65534), timeouts=TIMEOUTS, seed=3))
    for i, (nip, cidr) in enumerate(NODES):
        dp.add_node(i, nip, [cidr], MAC[nip])
    dp.set_router(ROUTER_MAC)
    if view == "node1":
        dp.add_pod_port(1, APP1, APP1_HOST, APP1_MAC)
    if view == "node3":
        dp.add_pod_port(1, POD3, POD3_HOST, POD3_MAC)
    if mbb:
        dp.set_make_before_break(True, capacity=capacity, seed=11)
    return dp


def move(dp, own_ip, gateway):
    """The policy edit on the node `own_ip`: its map now sends app1 and pod3 through `gateway`."""
    for src in (APP1, POD3):
        dp.egress_map.set(src, CIDR, gateway if gateway == own_ip else "0.0.0.0", gateway)


def udp(sport, src=APP1, mac=APP1_MAC, host=APP1_HOST):
    return bytes(Ether(src=mac, dst=host) / IP(src=src, dst=SERVER) / UDP(sport=sport, dport=53) / b"query")


def tcp(sport, flags="A", src=APP1, mac=APP1_MAC, host=APP1_HOST):
    return bytes(Ether(src=mac, dst=host) / IP(src=src, dst=SERVER) / TCP(sport=sport, dport=80, flags=flags)
                 / b"data")


def where(dp, frames, now=NOW, port=1):
    """Where each frame went: the VXLAN destination (a gateway's IP), 'snat:<source>'
    for a frame SNATed here, or the drop reason."""
    from egresscore import DropReason
    out = []
    data, offsets, lengths = _pack(frames)
    verdicts = np.full(len(frames), -1, np.int32)
    buf = np.zeros(4096 * len(frames), np.uint8)
    meta = np.zeros((len(frames), 4), np.int64)
    n = dp.process_batch(data, offsets, lengths, verdicts, buf, meta, port=port, now=now)
    got = {int(i): buf[o:o + ln].tobytes() for i, _, o, ln in meta[:n].tolist()}
    for i, v in enumerate(verdicts.tolist()):
        if v & 0xff == 3:
            out.append(DropReason(v >> 8).label)
            continue
        pkt = Ether(got[i])
        out.append(pkt[IP].dst if VXLAN in pkt else f"snat:{pkt[IP].src}")
    return out


def _pack(frames):
    lengths = np.array([len(f) for f in frames], np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    return np.frombuffer(b"".join(frames), np.uint8), offsets, lengths


def ping(ident, src=APP1, mac=APP1_MAC, host=APP1_HOST):
    return bytes(Ether(src=mac, dst=host) / IP(src=src, dst=SERVER) / ICMP(type=8, id=ident, seq=1) / b"ping")


def from_pod3(frame_fn, *args):
    return frame_fn(*args, src=POD3, mac=POD3_MAC, host=POD3_HOST)


FLOWS = 300                 # more than one DP_BATCH (256): the batch loop's prefetch window crosses batches
TICK = 2 ** 30 / 1e9        # the pins' coarse clock


def test_a_connection_keeps_its_gateway_when_the_map_moves_and_a_new_one_takes_the_new():
    on, off = node("node1"), node("node1", mbb=False)
    old = [udp(10000 + i) for i in range(FLOWS)]
    assert where(on, old) == where(off, old) == [NODE3] * FLOWS
    st = on.pins.stats()
    assert st["records"] == st["pinned"] == FLOWS and st["kept"] == 0
    recs = on.pins.records(now=NOW)
    assert {(r["src"], r["dst"], r["proto"], r["dport"], r["node"], r["closing"]) for r in recs} == {
        (APP1, SERVER, 17, 53, 2, False)}                                  # node index 2: node3
    assert sorted(r["sport"] for r in recs) == list(range(10000, 10000 + FLOWS))
    for dp in (on, off):
        move(dp, NODE1, NODE4)
    new = [udp(20000 + i) for i in range(10)]
    assert where(on, old + new, NOW + 1) == [NODE3] * FLOWS + [NODE4] * 10
    assert where(off, old + new, NOW + 1) == [NODE4] * (FLOWS + 10)       # Cilium's: every packet follows the map
    st = on.pins.stats()
    assert (st["kept"], st["pinned"], st["records"], st["evicted"]) == (FLOWS, FLOWS + 10, FLOWS + 10, 0)
    assert on.counters()["pins"] == st and "pins" not in off.counters()
    assert on.make_before_break and not off.make_before_break and off.pins is None


def test_process_batch_and_process_agree_with_pins_on():
    a, b = node("node1", capacity=1 << 15), node("node1", capacity=1 << 15)   # 512 KiB: prefetched ahead
    old = [udp(10000 + i) for i in range(FLOWS)] + [tcp(3000 + i, "S") for i in range(20)]
    assert run_batch(b, old, 1) == run_each(a, old, 1)
    for dp in (a, b):
        move(dp, NODE1, NODE4)
    frames = old + [udp(20000 + i) for i in range(20)] + [tcp(3000 + i, "F") for i in range(20)]
    got = run_batch(b, frames, 1)
    assert got == run_each(a, frames, 1)
    assert [Ether(o[0][1])[IP].dst for _, _, o in got] == [NODE3] * (FLOWS + 20) + [NODE4] * 20 + [NODE3] * 20
    assert a.counters() == b.counters() and a.pins.stats()["kept"] == FLOWS + 40


def test_fin_or_rst_closes_a_pin_and_a_new_syn_on_its_tuple_takes_the_new_gateway():
    dp = node("node1")
    assert where(dp, [tcp(1000, "S"), tcp(1001, "S"), tcp(1002, "S")]) == [NODE3] * 3
    move(dp, NODE1, NODE4)
    # the connections end on their gateway: data, FIN, RST, a retransmitted SYN
    assert where(dp, [tcp(1000, "A"), tcp(1001, "FA"), tcp(1002, "R"), tcp(1000, "S")], NOW + 1) == [NODE3] * 4
    assert {r["sport"]: r["closing"] for r in dp.pins.records(now=NOW + 1)} == {1000: False, 1001: True, 1002: True}
    # a SYN on a closed tuple is a new connection: the map's gateway now; the open one stays
    assert where(dp, [tcp(1001, "S"), tcp(1000, "A")], NOW + 1.5) == [NODE4, NODE3]
    # a closed pin lives tcp_closing (2 s) idle, an open one tcp_established (6 h)
    assert where(dp, [tcp(1002, "A"), tcp(1000, "A")], NOW + 5) == [NODE4, NODE3]
    assert where(dp, [tcp(1000, "A")], NOW + 3600) == [NODE3]


def test_idle_pins_expire_with_the_nat_timeouts_and_gc_sweeps_them():
    dp = node("node1")
    assert dp.pins.timeouts == {"tcp_established": pytest.approx(20117 * TICK), "tcp_closing": pytest.approx(2 * TICK),
                                "udp": pytest.approx(5 * TICK), "icmp": pytest.approx(3 * TICK)}
    assert where(dp, [udp(1), udp(2), ping(7)]) == [NODE3] * 3
    move(dp, NODE1, NODE4)
    # 4 s idle: the UDP pins (5 s) live, the ICMP one (3 s) has expired
    assert where(dp, [udp(1), ping(7)], NOW + 4) == [NODE3, NODE4]
    # 7 s: udp(2), idle since the start, has expired; udp(1), seen at 4 s, has not
    assert where(dp, [udp(1), udp(2)], NOW + 7) == [NODE3, NODE4]
    st = dp.pins.stats()
    assert (st["expired"], st["records"], st["kept"]) == (2, 3, 2)
    # the sweep (each gc call) clears what expired; a live pin stays
    assert where(dp, [tcp(5, "S")], NOW + 30) == [NODE4]
    assert len(dp.pins) == 4
    dp.gc(now=NOW + 30)
    assert len(dp.pins) == 1 and dp.pins.stats()["expired"] == 5
    assert [r["sport"] for r in dp.pins.records(now=NOW + 30)] == [5]


def test_flush_gateway_moves_its_connections_at_once():
    dp = node("node1")
    flows = [udp(10000 + i) for i in range(FLOWS)]
    assert where(dp, flows) == [NODE3] * FLOWS
    move(dp, NODE1, NODE4)
    assert where(dp, [udp(20000)]) == [NODE4]
    assert dp.flush_gateway("192.168.1.2") == 0 and dp.flush_gateway("192.0.2.1") == 0   # none there; not a node
    assert dp.flush_gateway(NODE3) == FLOWS
    assert where(dp, flows + [udp(20000)]) == [NODE4] * (FLOWS + 1)
    st = dp.pins.stats()
    assert (st["flushed"], st["records"], st["kept"]) == (FLOWS, FLOWS + 1, 0)
    assert node("node1", mbb=False).flush_gateway(NODE3) == 0
    with pytest.raises(ValueError, match="gateway ip"):
        dp.flush_gateway("not an address")


def test_a_pin_on_a_gateway_that_cannot_be_used_moves_to_the_map_choice():
    dp = node("node1")
    assert where(dp, [udp(1), udp(2)]) == [NODE3, NODE3]
    move(dp, NODE1, NODE4)
    dp.set_node_mac(2, None)                    # node3's MAC unknown: no way to it
    assert where(dp, [udp(1)]) == [NODE4] and dp.pins.stats()["repinned"] == 1
    dp.set_node_mac(2, MAC[NODE3])
    assert where(dp, [udp(1), udp(2)]) == [NODE4, NODE3]      # udp(1) keeps its new pin
    dp.remove_node(2)                           # node3 gone: its pins go with it
    assert len(dp.pins) == 1 and dp.pins.stats()["flushed"] == 1
    assert where(dp, [udp(2)]) == [NODE4]
    dp.add_node(2, NODE3, ["10.0.3.0/24"], MAC[NODE3])
    move(dp, NODE1, NODE3)
    assert where(dp, [udp(3)]) == [NODE3]
    dp.add_node(2, "192.168.1.5", ["10.0.5.0/24"], MAC[NODE3])   # another node at node3's index
    assert dp.pins.stats()["flushed"] == 2


def test_a_full_table_evicts_counted_and_never_hands_a_flow_another_flows_gateway():
    dp = node("node1", capacity=4)              # one bucket: every flow meets every other
    assert dp.pins.capacity == 4
    a = [udp(1000 + i) for i in range(4)]
    assert where(dp, a) == [NODE3] * 4
    move(dp, NODE1, NODE4)
    b = [udp(2000 + i) for i in range(4)]
    assert where(dp, b) == [NODE4] * 4          # same bucket as a's pins: never their gateway
    st = dp.pins.stats()
    assert (st["records"], st["evicted"], st["pinned"]) == (4, 4, 8)
    assert where(dp, a) == [NODE4] * 4          # a's pins are gone: they follow the map
    # the record nearest its expiry goes first: a UDP pin (5 s) before TCP ones (6 h)
    dp = node("node1", capacity=4)
    assert where(dp, [tcp(1, "S"), tcp(2, "S"), tcp(3, "S"), udp(4)]) == [NODE3] * 4
    move(dp, NODE1, NODE4)
    assert where(dp, [udp(5)]) == [NODE4]
    assert where(dp, [tcp(1), tcp(2), tcp(3), udp(4)]) == [NODE3] * 3 + [NODE4]
    # an expired record goes before a live one, and counts as expired
    dp = node("node1", capacity=4)
    assert where(dp, [udp(1), tcp(2, "S"), tcp(3, "S"), tcp(4, "S")]) == [NODE3] * 4
    assert where(dp, [udp(5)], NOW + 10) == [NODE3]
    st = dp.pins.stats()
    assert (st["expired"], st["evicted"]) == (1, 0)


def test_a_connection_snated_here_keeps_its_egress_ip_when_the_map_moves_it_away():
    on, off = node("node3"), node("node3", mbb=False)
    old = [from_pod3(udp, 1000), from_pod3(tcp, 1001, "S")]
    for dp in (on, off):
        assert where(dp, old) == [f"snat:{NODE3}"] * 2
        move(dp, NODE3, NODE4)
    new = [from_pod3(udp, 2000)]
    assert where(on, old + new, NOW + 1) == [f"snat:{NODE3}"] * 2 + [NODE4]
    assert where(off, old + new, NOW + 1) == [NODE4] * 3
    assert on.pins.stats()["kept"] == 2
    # its NAT entry gone (expired), the pin follows the map
    on.nat.flush()
    assert where(on, old[:1], NOW + 2) == [NODE4] and on.pins.stats()["repinned"] == 1


def test_the_old_gateway_keeps_translating_its_connections_but_not_new_ones():
    n1 = node("node1", mbb=False)

    def tunnel(frame):
        return n1.process(frame, 1, NOW)[2][1]        # as node1 sends it to node3

    on, off = node("node3"), node("node3", mbb=False)
    first = [tunnel(tcp(1000, "S")), tunnel(tcp(1002, "S")), tunnel(udp(3000))]
    for dp in (on, off):
        assert where(dp, first, port=0) == [f"snat:{NODE3}"] * 3
        move(dp, NODE3, NODE4)
    later = [tunnel(tcp(1000, "A")), tunnel(udp(3000)), tunnel(tcp(1000, "S")),   # existing (a SYN retransmitted)
             tunnel(tcp(1001, "S")), tunnel(udp(3001)),                          # new connections
             tunnel(tcp(1002, "R")), tunnel(tcp(1002, "S"))]                     # closed, then a new SYN on it
    assert where(on, later, NOW + 1, port=0) == [f"snat:{NODE3}"] * 3 + ["policy_denied"] * 2 + [
        f"snat:{NODE3}", "policy_denied"]
    assert where(off, later, NOW + 1, port=0) == ["policy_denied"] * 7
    assert on.pins.stats()["kept_nat"] == 4
    # replies still come back through it
    xport = Ether(on.process(tunnel(tcp(1000, "A")), 0, NOW + 1)[2][1])[TCP].sport
    reply = bytes(Ether(src=ROUTER_MAC, dst=MAC[NODE3]) / IP(src=SERVER, dst=NODE3)
                  / TCP(sport=80, dport=xport, flags="A"))
    assert on.process(reply, 0, NOW + 1)[:2] == ("tx", "none")


def test_make_before_break_switches_and_its_arguments():
    dp = node("node1")
    dp.set_make_before_break(False)
    assert dp.pins is None and not dp.make_before_break
    assert where(dp, [udp(1)]) == [NODE3]
    dp.set_make_before_break(True, capacity=100)
    assert dp.pins.capacity == 128 and len(dp.pins) == 0
    with pytest.raises(ValueError, match="capacity 2 is out of range"):
        GatewayPins(2)
    with pytest.raises(TypeError, match="capacity must be an int"):
        GatewayPins("64")
    with pytest.raises(ValueError, match="timeouts key 'tcp'"):
        GatewayPins(64, {"tcp": 1.0})
    with pytest.raises(ValueError, match=r"timeouts\['udp'\] must be a positive"):
        GatewayPins(64, {"udp": 0})
    # a timeout beyond what the 16-bit clock can age is capped (9.7 h)
    assert GatewayPins(64, {"tcp_established": 86400}).timeouts["tcp_established"] == pytest.approx(32767 * TICK)
    p = GatewayPins(64)
    assert p.flush_node(3) == 0 and p.clear() == 0 and p.sweep(100) == 0
    with pytest.raises(ValueError, match="node index"):
        p.flush_node(256)
