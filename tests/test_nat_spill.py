"""Spill to more egress IPs when ports run out (NatTable.set_spill; issue 15 point 5).

A tiny port range on the first egress IP: new connections fill it, then
continue on the next IPs of its chain in order; a pod endpoint keeps its
mapping (IP and port) for every destination wherever it landed; refusals
count only when every IP of the chain is full; port use per IP shows it.
(The random model check is tests/test_nat_stateful.py, NatMachineSpill.)"""
import numpy as np
import pytest

from egresscore import DROP_REASON_NAMES, NatRefused, NatTable, nat_tuples

FIRST, SECOND, THIRD = "192.168.1.3", "192.168.1.111", "192.168.1.112"
POD = "10.0.1.5"


def table(first=(40000, 40001), second=(40000, 40001), third=(40000, 40000)):
    t = NatTable(capacity=64, seed=1, clock=lambda: 0.0, timeouts={"tcp_syn": 3600.0})
    t.add_egress_ip(FIRST, first)
    t.add_egress_ip(SECOND, second)
    t.add_egress_ip(THIRD, third)
    t.add_egress_ip("2001:db8::3")
    return t


def test_new_connections_fill_the_first_ip_then_spill_in_chain_order():
    t = table()
    t.set_spill({FIRST: [SECOND, THIRD]})
    got = [t.translate(POD, 1000 + i, "203.0.113.10", 80, egress_ip=FIRST, now=1.0) for i in range(5)]
    assert [ip for ip, _ in got] == [FIRST, FIRST, SECOND, SECOND, THIRD]
    assert len(set(got)) == 5                               # five distinct (IP, port)
    assert t.stats["refused"]["nat_exhausted"] == 0         # nothing refused while one IP had a port
    with pytest.raises(NatRefused) as exc:
        t.translate(POD, 2000, "203.0.113.10", 80, egress_ip=FIRST, now=1.0)
    assert exc.value.reason == "nat_exhausted"
    assert t.stats["refused"]["nat_exhausted"] == 1
    use = t.port_usage()
    assert use[FIRST]["tcp"] == (2, 2) and use[SECOND]["tcp"] == (2, 2) and use[THIRD]["tcp"] == (1, 1)
    assert t.spill == {FIRST: {"spill_to": [SECOND, THIRD], "spilled_in": 0},
                       SECOND: {"spill_to": [], "spilled_in": 2},
                       THIRD: {"spill_to": [], "spilled_in": 1}}
    assert t.stats["spill"] == t.spill
    # the reply to a spilled connection comes back to the pod
    ip, port = got[3]
    assert t.reverse("203.0.113.10", 80, ip, port, now=1.0) == (POD, 1003)


def test_an_endpoint_keeps_its_mapping_across_the_chain():
    t = table()
    t.set_spill({FIRST: [SECOND, THIRD]})
    for i in range(2):
        t.translate(POD, 1000 + i, "203.0.113.10", 80, egress_ip=FIRST, now=1.0)
    spilled = t.translate(POD, 5000, "203.0.113.10", 80, egress_ip=FIRST, now=1.0, tcp_flags="S")
    assert spilled[0] == SECOND
    # the first IP gets a free port back (a connection ends with a RST and expires)
    t.translate(POD, 1000, "203.0.113.10", 80, egress_ip=FIRST, now=1.0, tcp_flags="R")
    assert t.gc(now=100.0) >= 1
    assert t.port_usage()[FIRST]["tcp"][0] < 2
    # the same pod endpoint to another destination: the same IP and port (EIM), not the free one
    assert t.translate(POD, 5000, "198.51.100.7", 443, egress_ip=FIRST, now=100.0) == spilled
    # a new endpoint takes the freed port on the first IP again
    assert t.translate(POD, 6000, "198.51.100.7", 443, egress_ip=FIRST, now=100.0)[0] == FIRST


def test_no_chain_no_spill_and_chains_are_per_ip():
    t = table()
    for i in range(2):
        t.translate(POD, 1000 + i, "203.0.113.10", 80, egress_ip=FIRST, now=1.0)
    with pytest.raises(NatRefused):
        t.translate(POD, 1002, "203.0.113.10", 80, egress_ip=FIRST, now=1.0)
    # a chain on FIRST does not make SECOND spill to THIRD
    t.set_spill({FIRST: [SECOND]})
    for i in range(2):
        assert t.translate(POD, 3000 + i, "203.0.113.10", 80, egress_ip=SECOND, now=1.0)[0] == SECOND
    with pytest.raises(NatRefused):
        t.translate(POD, 3002, "203.0.113.10", 80, egress_ip=SECOND, now=1.0)
    with pytest.raises(NatRefused):         # FIRST's chain is full too now
        t.translate(POD, 1003, "203.0.113.10", 80, egress_ip=FIRST, now=1.0)
    assert t.stats["refused"]["nat_exhausted"] == 3
    assert t.port_usage()[THIRD]["tcp"] == (0, 1)


def test_protocols_spill_on_their_own_pools():
    t = table()
    t.set_spill({FIRST: [SECOND]})
    for i in range(2):
        t.translate(POD, 1000 + i, "203.0.113.10", 80, "tcp", egress_ip=FIRST, now=1.0)
    # UDP still has ports on the first IP
    assert t.translate(POD, 1000, "203.0.113.10", 53, "udp", egress_ip=FIRST, now=1.0)[0] == FIRST
    assert t.translate(POD, 1002, "203.0.113.10", 80, "tcp", egress_ip=FIRST, now=1.0)[0] == SECOND


def test_batches_spill_like_single_calls():
    t = table()
    t.set_spill({FIRST: [SECOND, THIRD]})
    tuples = nat_tuples([(POD, 1000 + i, "203.0.113.10", 80, "tcp", "S") for i in range(6)])
    out, codes = t.translate_batch(tuples, FIRST, now=1.0)
    assert [DROP_REASON_NAMES[c] for c in codes[:5]] == ["none"] * 5
    assert DROP_REASON_NAMES[codes[5]] == "nat_exhausted"
    srcs = [".".join(map(str, row["src"][:4])) for row in out[:5]]
    assert srcs == [FIRST, FIRST, SECOND, SECOND, THIRD]
    assert len({(s, int(p)) for s, p in zip(srcs, out["sport"][:5])}) == 5
    assert np.all(codes[:5] == 0)


def test_connections_keep_their_ip_when_the_chain_changes():
    t = table()
    t.set_spill({FIRST: [SECOND]})
    for i in range(3):
        t.translate(POD, 1000 + i, "203.0.113.10", 80, egress_ip=FIRST, now=1.0)
    t.set_spill({})
    assert t.spill == {SECOND: {"spill_to": [], "spilled_in": 1}}
    assert t.translate(POD, 1002, "203.0.113.10", 80, egress_ip=FIRST, now=2.0)[0] == SECOND
    with pytest.raises(NatRefused):
        t.translate(POD, 1003, "203.0.113.10", 80, egress_ip=FIRST, now=2.0)


@pytest.mark.parametrize("chains, message", [
    ({FIRST: ["192.168.1.200"]}, "192.168.1.200 is not configured"),
    ({FIRST: ["2001:db8::3"]}, "is not IPv4 like 192.168.1.3"),
    ({FIRST: [FIRST]}, "192.168.1.3[0]: 192.168.1.3 is repeated"),
    ({FIRST: [SECOND, SECOND]}, "[1]: 192.168.1.111 is repeated"),
    ({"192.168.9.9": [SECOND]}, "192.168.9.9 is not configured"),
    ({FIRST: SECOND}, "not a string"),
])
def test_a_bad_chain_is_refused_whole_and_the_one_in_force_stays(chains, message):
    t = table()
    t.set_spill({FIRST: [SECOND]})
    with pytest.raises((ValueError, TypeError)) as exc:
        t.set_spill({THIRD: [SECOND], **chains})
    assert message in str(exc.value)
    assert t.spill == {FIRST: {"spill_to": [SECOND], "spilled_in": 0}}


def test_at_most_eight_spill_ips():
    t = NatTable(capacity=8, clock=lambda: 0.0)
    ips = [f"192.168.1.{100 + i}" for i in range(10)]
    for ip in ips:
        t.add_egress_ip(ip)
    t.set_spill({ips[0]: ips[1:9]})
    with pytest.raises(ValueError, match="at most 8"):
        t.set_spill({ips[0]: ips[1:10]})
    assert t.spill[ips[0]]["spill_to"] == ips[1:9]
