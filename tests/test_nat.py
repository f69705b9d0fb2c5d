"""NAT table: RFC 4787 / RFC 5382 behaviours by name, bad input, batches."""
import threading

import numpy as np
import pytest

import egresscore
from egresscore import DROP_REASON_NAMES, NAT_TUPLE_DTYPE, NatRefused, NatTable, nat_tuples

EGRESS = "192.168.1.100"
EGRESS2 = "192.168.1.101"
EGRESS6 = "2001:db8:1::100"
POD = "10.0.1.5"
POD2 = "10.0.2.7"
REMOTE = "203.0.113.10"
REMOTE2 = "198.51.100.20"


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


@pytest.fixture
def clock():
    return Clock()


def table(clock, egress=(EGRESS,), **kw):
    kw.setdefault("capacity", 1024)
    kw.setdefault("seed", 1)
    return NatTable(list(egress), clock=clock, **kw)


# -- endpoint-independent mapping and port preservation --------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_endpoint_independent_mapping(clock, proto):
    """RFC 4787 REQ-1 / RFC 5382 REQ-1: same pod endpoint, same external port."""
    t = table(clock)
    a = t.translate(POD, 1234, REMOTE, 80, proto)
    b = t.translate(POD, 1234, REMOTE2, 53, proto)
    c = t.translate(POD, 1234, REMOTE, 8080, proto)
    assert a == b == c
    assert t.stats["mappings"] == 1 and t.stats["entries"] == 3


def test_mapping_released_when_last_connection_dies(clock):
    t = table(clock)
    t.translate(POD, 1234, REMOTE, 80, "udp")
    clock.advance(200)
    t.translate(POD, 1234, REMOTE2, 80, "udp")      # keeps the mapping alive
    clock.advance(200)                              # first flow dead, second alive
    t.gc()
    assert t.ports_in_use(EGRESS, "udp") == 1
    clock.advance(200)
    t.gc()
    assert t.ports_in_use(EGRESS, "udp") == 0 and t.stats["mappings"] == 0


def test_port_preservation(clock):
    t = table(clock)
    assert t.translate(POD, 40000, REMOTE, 80) == (EGRESS, 40000)
    # outside the range: a port from the range
    _, x = t.translate(POD, 1234, REMOTE, 80)
    assert 32768 <= x <= 65535


def test_collision_gets_another_port_and_replies_reach_each_pod(clock):
    """Two pods with one source port: the second is moved; reverse lookups
    after the collision return each reply to its own pod."""
    t = table(clock)
    _, x1 = t.translate(POD, 40000, REMOTE, 443)
    _, x2 = t.translate(POD2, 40000, REMOTE, 443)
    assert x1 == 40000 and x2 != 40000 and 32768 <= x2 <= 65535
    assert t.reverse(REMOTE, 443, EGRESS, x1) == (POD, 40000)
    assert t.reverse(REMOTE, 443, EGRESS, x2) == (POD2, 40000)


def test_reverse_after_many_collisions(clock):
    t = table(clock, port_range=(40000, 40063), capacity=256)
    pods = [f"10.0.1.{i}" for i in range(1, 65)]
    xs = [t.translate(p, 40000, REMOTE, 80)[1] for p in pods]
    assert sorted(xs) == list(range(40000, 40064))
    for p, x in zip(pods, xs):
        assert t.reverse(REMOTE, 80, EGRESS, x) == (p, 40000)


def test_egress_ips_have_independent_port_spaces(clock):
    t = table(clock, egress=(EGRESS, EGRESS2))
    assert t.translate(POD, 40000, REMOTE, 80, egress_ip=EGRESS) == (EGRESS, 40000)
    assert t.translate(POD2, 40000, REMOTE, 80, egress_ip=EGRESS2) == (EGRESS2, 40000)
    assert t.reverse(REMOTE, 80, EGRESS2, 40000) == (POD2, 40000)
    assert t.reverse(REMOTE, 80, EGRESS, 40000) == (POD, 40000)


def test_existing_flow_keeps_its_egress_ip(clock):
    t = table(clock, egress=(EGRESS, EGRESS2))
    assert t.translate(POD, 40000, REMOTE, 80, egress_ip=EGRESS)[0] == EGRESS
    assert t.translate(POD, 40000, REMOTE, 80, egress_ip=EGRESS2)[0] == EGRESS


def test_address_and_port_dependent_filtering(clock):
    """Only the remote a connection was opened to can answer it."""
    t = table(clock)
    _, x = t.translate(POD, 40000, REMOTE, 80, "udp")
    assert t.reverse(REMOTE2, 80, EGRESS, x, "udp") is None
    assert t.reverse(REMOTE, 81, EGRESS, x, "udp") is None
    assert t.reverse(REMOTE, 80, EGRESS, x, "tcp") is None
    assert t.reverse(REMOTE, 80, EGRESS, x, "udp") == (POD, 40000)
    assert t.stats["refused"]["no_nat_entry"] == 3


def test_per_protocol_port_ranges(clock):
    t = table(clock, port_ranges={"udp": (50000, 50009)})
    t.add_egress_ip(EGRESS2, tcp=(1024, 2047))
    assert t.translate(POD, 40000, REMOTE, 80, "udp", egress_ip=EGRESS)[1] in range(50000, 50010)
    assert t.translate(POD, 40000, REMOTE, 80, "tcp", egress_ip=EGRESS)[1] == 40000
    assert t.translate(POD, 40000, REMOTE, 80, "tcp", egress_ip=EGRESS2)[1] == 40000  # known flow
    assert t.translate(POD, 40001, REMOTE, 80, "tcp", egress_ip=EGRESS2)[1] in range(1024, 2048)


# -- refusals ----------------------------------------------------------------

def test_exhaustion_refuses_new_flows_and_spares_existing_ones(clock):
    t = table(clock, port_range=(40000, 40003))
    pods = [f"10.0.1.{i}" for i in range(1, 5)]
    got = [t.translate(p, 1000, REMOTE, 80) for p in pods]
    assert sorted(x for _, x in got) == [40000, 40001, 40002, 40003]
    with pytest.raises(NatRefused) as exc:
        t.translate("10.0.1.99", 1000, REMOTE, 80)
    assert exc.value.reason == "nat_exhausted"
    assert t.stats["refused"]["nat_exhausted"] == 1
    # existing flows keep working, and a known pod endpoint reuses its port
    for p, (_, x) in zip(pods, got):
        assert t.reverse(REMOTE, 80, EGRESS, x) == (p, 1000)
    assert t.translate(pods[0], 1000, REMOTE2, 443) == got[0]
    # other protocols have their own ports
    t.translate("10.0.1.99", 1000, REMOTE, 80, "udp")
    # once a mapping dies its port is free again
    t.translate(pods[2], 1000, REMOTE, 80, tcp_flags="R")
    clock.advance(11)
    assert t.gc() == 1
    assert t.translate("10.0.1.99", 1000, REMOTE, 80) == got[2]


def test_table_full_refuses_new_flows(clock):
    t = table(clock, capacity=3)
    for i in range(3):
        t.translate(POD, 40000 + i, REMOTE, 80)
    with pytest.raises(NatRefused) as exc:
        t.translate(POD, 41000, REMOTE, 80)
    assert exc.value.reason == "nat_table_full"
    assert t.stats["refused"]["nat_table_full"] == 1 and len(t) == 3
    assert t.reverse(REMOTE, 80, EGRESS, 40001) == (POD, 40001)
    clock.advance(61)
    t.gc()
    assert t.translate(POD, 41000, REMOTE, 80) == (EGRESS, 41000)


# -- timeouts ----------------------------------------------------------------

def _alive(t, proto="tcp"):
    return t.get(POD, 40000, REMOTE, 80 if proto != "icmp" else 0, proto) is not None


def test_expiry_tcp_syn_sent_60s(clock):
    t = table(clock)
    t.translate(POD, 40000, REMOTE, 80, tcp_flags="S")
    assert t.get(POD, 40000, REMOTE, 80).state == "SYN_SENT"
    clock.advance(59.9)
    assert _alive(t)
    clock.advance(0.1)
    assert not _alive(t)
    assert t.reverse(REMOTE, 80, EGRESS, 40000, tcp_flags="SA") is None
    assert t.stats["expired"] == 1


def test_expiry_tcp_established_6h(clock):
    t = table(clock)
    t.translate(POD, 40000, REMOTE, 80, tcp_flags="S")
    assert t.reverse(REMOTE, 80, EGRESS, 40000, tcp_flags="SA") == (POD, 40000)
    assert t.get(POD, 40000, REMOTE, 80).state == "ESTABLISHED"
    assert t.timeouts["tcp_established"] >= 2 * 3600 + 4 * 60      # RFC 5382 REQ-5
    clock.advance(6 * 3600 - 1)
    assert _alive(t)
    t.translate(POD, 40000, REMOTE, 80, tcp_flags="A")              # refresh
    clock.advance(6 * 3600 - 1)
    assert _alive(t)
    clock.advance(1)
    assert not _alive(t)


@pytest.mark.parametrize("closer", ["fin", "rst_out", "rst_in"])
def test_expiry_tcp_closing_10s(clock, closer):
    t = table(clock)
    t.translate(POD, 40000, REMOTE, 80, tcp_flags="S")
    t.reverse(REMOTE, 80, EGRESS, 40000, tcp_flags="SA")
    if closer == "fin":
        t.translate(POD, 40000, REMOTE, 80, tcp_flags="FA")
        assert t.get(POD, 40000, REMOTE, 80).state == "ESTABLISHED"   # half closed
        t.reverse(REMOTE, 80, EGRESS, 40000, tcp_flags="FA")
    elif closer == "rst_out":
        t.translate(POD, 40000, REMOTE, 80, tcp_flags="R")
    else:
        t.reverse(REMOTE, 80, EGRESS, 40000, tcp_flags="R")
    assert t.get(POD, 40000, REMOTE, 80).state == "CLOSING"
    clock.advance(9.9)
    assert _alive(t)
    clock.advance(0.1)
    assert not _alive(t)


def test_tcp_syn_reopens_closing_entry(clock):
    t = table(clock)
    t.translate(POD, 40000, REMOTE, 80, tcp_flags="S")
    t.reverse(REMOTE, 80, EGRESS, 40000, tcp_flags="R")
    t.translate(POD, 40000, REMOTE, 80, tcp_flags="S")
    e = t.get(POD, 40000, REMOTE, 80)
    assert e.state == "SYN_SENT" and e.expires_in == 60


def test_expiry_udp_at_least_2_minutes(clock):
    t = table(clock)
    t.translate(POD, 40000, REMOTE, 80, "udp")
    assert t.timeouts["udp"] >= 120                              # RFC 4787 REQ-5
    clock.advance(299)
    assert t.reverse(REMOTE, 80, EGRESS, 40000, "udp") == (POD, 40000)   # inbound refreshes
    clock.advance(299)
    assert _alive(t, "udp")
    clock.advance(1)
    assert not _alive(t, "udp")


@pytest.mark.parametrize("family", [4, 6])
def test_expiry_icmp_echo_60s(clock, family):
    pod, remote, egress = (POD, REMOTE, EGRESS) if family == 4 else ("fd00::5", "2001:db8::10", EGRESS6)
    t = table(clock, egress=(egress,))
    ext, xid = t.translate(pod, 40000, remote, 0, "icmp")      # echo id 40000
    assert (ext, xid) == (egress, 40000)
    assert t.reverse(remote, 0, egress, 40000, "icmp") == (pod, 40000)
    assert t.get(pod, 40000, remote, 0, "icmp").proto == ("icmp" if family == 4 else "icmpv6")
    clock.advance(60)
    assert t.reverse(remote, 0, egress, 40000, "icmp") is None


def test_timeouts_configurable(clock):
    t = table(clock, timeouts={"udp": 30})
    t.translate(POD, 40000, REMOTE, 80, "udp")
    clock.advance(30)
    assert not _alive(t, "udp")


# -- IPv6, GC, inspection -----------------------------------------------------

def test_ipv6_and_ipv4_in_one_table(clock):
    t = table(clock, egress=(EGRESS, EGRESS6))
    assert t.translate("fd00::5", 40000, "2001:db8::10", 443) == (EGRESS6, 40000)
    assert t.translate(POD, 40000, REMOTE, 443) == (EGRESS, 40000)
    assert t.reverse("2001:db8::10", 443, EGRESS6, 40000) == ("fd00::5", 40000)
    assert "[2001:db8:1::100]:40000" in t.nat_list()


def test_incremental_gc_is_bounded_and_spares_live_entries(clock):
    t = table(clock, capacity=1000)
    for i in range(400):
        t.translate(POD, 10000 + i, REMOTE, 80, "udp" if i % 2 else "tcp")
    clock.advance(100)                  # TCP SYN_SENT entries dead, UDP alive
    total = 0
    for _ in range(10):
        got = t.gc(max_scan=100)
        assert got <= 100
        total += got
    assert total == 200 and len(t) == 200
    assert all(e.proto == "udp" for e in t)
    assert t.gc() == 0


def test_entries_and_nat_list(clock):
    t = table(clock)
    t.translate(POD, 40000, REMOTE, 80, tcp_flags="S")
    clock.advance(5)
    (e,) = list(t)
    assert e == egresscore.NatEntry("tcp", POD, 40000, REMOTE, 80, EGRESS, 40000,
                                    "SYN_SENT", 55.0, 5.0)
    lines = t.nat_list().splitlines()
    assert lines[0].startswith(f"TCP OUT {POD}:40000 -> {REMOTE}:80 XLATE_SRC {EGRESS}:40000")
    assert lines[1].startswith(f"TCP IN {REMOTE}:80 -> {EGRESS}:40000 XLATE_DST {POD}:40000")


def test_stats_counters(clock):
    t = table(clock)
    t.translate(POD, 40000, REMOTE, 80)
    t.translate(POD, 40000, REMOTE, 80)
    t.reverse(REMOTE, 80, EGRESS, 40000)
    t.reverse(REMOTE, 80, EGRESS, 40001)
    s = t.stats
    assert (s["lookups"], s["hits"], s["created"], s["expired"]) == (4, 2, 1, 0)
    assert s["refused"]["no_nat_entry"] == 1


def test_memory_per_connection_at_most_128_bytes():
    t = NatTable([f"192.0.2.{i}" for i in range(1, 33)], capacity=1_000_000)
    assert t.memory_bytes / t.capacity <= 128


# -- batches ----------------------------------------------------------------

def test_batches_match_single_calls(clock):
    rows = [(f"10.0.{i % 3}.{i % 7 + 1}", 40000 + i % 5, REMOTE if i % 2 else REMOTE2,
             80 + i % 3, ("tcp", "udp", "icmp")[i % 3], "S") for i in range(200)]
    a = table(clock, capacity=150, port_range=(40000, 40099))
    b = table(clock, capacity=150, port_range=(40000, 40099))
    out, codes = a.translate_batch(nat_tuples(rows), EGRESS)
    for i, r in enumerate(rows):
        try:
            want = b.translate(*r[:5], tcp_flags=r[5])
        except NatRefused as exc:
            assert DROP_REASON_NAMES[codes[i]] == exc.reason
            continue
        assert codes[i] == 0
        assert (out[i]["sport"], bytes(out[i]["src"][:4])) == (want[1], bytes([192, 168, 1, 100]))
    assert a.stats == b.stats
    replies = out[codes == 0].copy()
    replies["src"], replies["dst"] = out[codes == 0]["dst"], out[codes == 0]["src"]
    replies["sport"], replies["dport"] = out[codes == 0]["dport"], out[codes == 0]["sport"]
    rout, rcodes = a.reverse_batch(replies)
    assert (rcodes == 0).all()
    assert (rout["dst"] == nat_tuples(rows)[codes == 0]["src"]).all()
    assert (rout["dport"] == nat_tuples(rows)[codes == 0]["sport"]).all()


def test_batch_per_tuple_egress_index_and_bad_rows(clock):
    t = table(clock, egress=(EGRESS, EGRESS6))
    arr = nat_tuples([(POD, 40000, REMOTE, 80, "tcp"), (POD, 40001, REMOTE, 80, "tcp"),
                      (POD, 40002, REMOTE, 80, "tcp"), (POD, 40003, REMOTE, 80, "tcp")])
    arr[2]["family"] = 9          # garbage row
    arr[3]["proto"] = 132         # SCTP: unsupported
    out, codes = t.translate_batch(arr, np.array([0, 1, 0, 0], np.uint16))
    assert [DROP_REASON_NAMES[c] for c in codes] == ["none", "no_egress_ip", "unsupported",
                                                     "unsupported"]
    assert len(t) == 1
    _, rc = t.reverse_batch(arr)
    assert DROP_REASON_NAMES[rc[2]] == "unsupported"


def test_batch_threads_share_a_table(clock):
    t = table(clock, capacity=20000)
    arrays = [nat_tuples([(f"10.0.{k}.{i % 250 + 1}", 40000 + i // 250, REMOTE, 80, "udp")
                          for i in range(2000)]) for k in range(4)]
    threads = [threading.Thread(target=t.translate_batch, args=(a, EGRESS)) for a in arrays]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(t) == 8000 and t.stats["created"] == 8000


# -- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, exc, words", [
    ((POD, 40000, "2001:db8::1", 80), {}, ValueError, "address families"),
    ((POD, 70000, REMOTE, 80), {}, ValueError, "sport 70000"),
    ((POD, -1, REMOTE, 80), {}, ValueError, "sport -1"),
    ((POD, 40000, REMOTE, "80"), {}, TypeError, "dport"),
    ((POD, 40000, REMOTE, 80, "sctp"), {}, ValueError, "proto 'sctp'"),
    ((POD, 40000, REMOTE, 80, 132), {}, ValueError, "not supported"),
    ((POD, 40000, REMOTE, 80, "icmpv6"), {}, ValueError, "IPv4"),
    (("10.0.1.300", 40000, REMOTE, 80), {}, ValueError, "src"),
    ((POD, 40000, REMOTE, 80), {"tcp_flags": "SX"}, ValueError, "tcp_flags"),
    ((POD, 40000, REMOTE, 80), {"egress_ip": "192.168.1.99"}, ValueError, "not configured"),
    (("fd00::1", 40000, "2001:db8::1", 80), {}, ValueError, "IPv6 egress"),
    ((POD, 40000, REMOTE, 80), {"now": -1}, ValueError, "now"),
])
def test_bad_input_raises_and_changes_nothing(clock, args, kwargs, exc, words):
    t = table(clock)
    t.translate(POD, 1, REMOTE, 1)
    before = (t.stats, list(t))
    with pytest.raises(exc, match=words):
        t.translate(*args, **kwargs)
    assert (t.stats, list(t)) == before


@pytest.mark.parametrize("kwargs, exc", [
    ({"capacity": 0}, ValueError), ({"capacity": 1.5}, TypeError),
    ({"capacity": 2 ** 28 - 1}, ValueError), ({"port_range": (2000, 1000)}, ValueError),
    ({"port_range": (0, 1000)}, ValueError), ({"port_range": 5}, TypeError),
    ({"port_ranges": {"sctp": (1, 2)}}, ValueError), ({"timeouts": {"udp": 0}}, ValueError),
    ({"timeouts": {"udp": 1e12}}, ValueError),
    ({"timeouts": {"tcp_fin": 1}}, ValueError), ({"clock": 5}, TypeError),
])
def test_bad_construction(kwargs, exc):
    with pytest.raises(exc):
        NatTable([EGRESS], **kwargs)


def test_bad_batch_arrays(clock):
    t = table(clock)
    good = nat_tuples([(POD, 1, REMOTE, 1, "tcp")] * 4)
    with pytest.raises(TypeError, match="NAT_TUPLE_DTYPE"):
        t.translate_batch(np.zeros(4, np.uint8), EGRESS)
    with pytest.raises(ValueError, match="contiguous"):
        t.reverse_batch(np.zeros(8, NAT_TUPLE_DTYPE)[::2])
    with pytest.raises(ValueError, match="out"):
        t.reverse_batch(good, out=np.zeros(3, NAT_TUPLE_DTYPE))
    with pytest.raises(ValueError, match="codes"):
        t.reverse_batch(good, codes=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="egress_ip array"):
        t.translate_batch(good, np.zeros(3, np.uint16))
    with pytest.raises(ValueError, match="not configured"):
        t.translate_batch(good, 5)
    with pytest.raises(ValueError, match="overlap"):
        t.reverse_batch(good, out=good)
    assert len(t) == 0 and t.stats["lookups"] == 0


def test_reverse_without_refresh_leaves_entry_alone(clock):
    """A tuple quoted in an ICMP error neither refreshes nor advances state."""
    t = table(clock)
    t.translate(POD, 40000, REMOTE, 80, tcp_flags="S")
    clock.advance(30)
    assert t.reverse(REMOTE, 80, EGRESS, 40000, tcp_flags="SA", refresh=False) == (POD, 40000)
    e = t.get(POD, 40000, REMOTE, 80)
    assert (e.state, e.expires_in) == ("SYN_SENT", 30.0)
    clock.advance(30)
    assert t.reverse(REMOTE, 80, EGRESS, 40000, refresh=False) is None
    assert len(t) == 1          # not collected either


def test_update_tcp_hook_drives_the_state_machine(clock):
    t = table(clock)
    t.translate(POD, 40000, REMOTE, 80, tcp_flags="S")
    assert t.update_tcp(REMOTE, 80, EGRESS, 40000, "SA", direction="in")
    assert t.get(POD, 40000, REMOTE, 80).state == "ESTABLISHED"
    assert t.update_tcp(POD, 40000, REMOTE, 80, "FA")
    assert t.update_tcp(REMOTE, 80, EGRESS, 40000, "FA", direction="in")
    assert t.get(POD, 40000, REMOTE, 80).state == "CLOSING"
    assert not t.update_tcp(REMOTE, 81, EGRESS, 40000, "A", direction="in")
    with pytest.raises(ValueError, match="direction"):
        t.update_tcp(POD, 40000, REMOTE, 80, "A", direction="up")


def test_uninitialised_table_raises_instead_of_crashing():
    t = NatTable.__new__(NatTable)
    for call in (lambda: t.translate(POD, 1, REMOTE, 1), lambda: t.stats, lambda: len(t),
                 lambda: t.reverse_batch(nat_tuples([(REMOTE, 1, EGRESS, 1, "tcp")])),
                 lambda: t.add_egress_ip(EGRESS), lambda: t.gc(), lambda: list(t)):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()
