"""A gateway-sized NAT table: capacity, lazily backed memory, the expiry
wheel at a million connections (simulated time, no sleeps) and the
per-source (pod) connection limit."""
import numpy as np
import pytest

from egresscore import DROP_REASON_NAMES, NAT_TUPLE_DTYPE, NatRefused, NatTable

BULK_EGRESS = "192.168.1.100"
EGRESS = "192.168.1.101"
POD_A, POD_B = "10.0.1.5", "10.0.2.7"
REMOTE = "203.0.113.10"
MAX_CAPACITY = 268_435_454
GC_BUDGET = 1024        # what Datapath.gc examines per call
TICK = 0.02             # the agent's loop returns at least this often


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def bulk_flows(n_pods, n_remotes):
    """n_pods * n_remotes TCP SYNs: pods 10.1.x.y:50000 to 203.0.x.y:443."""
    p = np.repeat(np.arange(n_pods), n_remotes)
    r = np.tile(np.arange(n_remotes), n_pods)
    arr = np.zeros(n_pods * n_remotes, NAT_TUPLE_DTYPE)
    arr["family"], arr["proto"], arr["tcp_flags"] = 4, 6, 0x02
    arr["sport"], arr["dport"] = 50000, 443
    arr["src"][:, 0], arr["src"][:, 1] = 10, 1
    arr["src"][:, 2], arr["src"][:, 3] = p >> 8, p & 255
    arr["dst"][:, 0], arr["dst"][:, 1] = 203, 0
    arr["dst"][:, 2], arr["dst"][:, 3] = r >> 8, r & 255
    return arr


def test_capacity_is_capped_by_the_28_bit_index_with_a_clear_error():
    with pytest.raises(ValueError, match=r"out of range 1-268435454 \(connections are indexed in 28 bits\)"):
        NatTable(capacity=MAX_CAPACITY + 1)
    t = NatTable([EGRESS], capacity=20_000_000, seed=1)
    assert t.capacity == 20_000_000
    assert t.translate(POD_A, 40000, REMOTE, 80, now=1.0) == (EGRESS, 40000)


def test_a_table_beyond_16_7m_entries_translates_replies_and_collects():
    """Above 16,777,214 the index slots carry 25+ index bits (a 7-bit tag and
    fewer) and an entry's mapping is found by its key when it is collected:
    every flow is found from both directions, collected (its port freed),
    found again."""
    t = NatTable([BULK_EGRESS, EGRESS], capacity=(1 << 24) + 1000, seed=7)
    bulk = bulk_flows(300, 1000)
    out, codes = t.translate_batch(bulk, BULK_EGRESS, now=10.0)
    assert not codes.any() and len(t) == 300_000
    again, codes = t.translate_batch(bulk, BULK_EGRESS, now=10.5)
    assert not codes.any() and (again == out).all() and len(t) == 300_000
    rep = np.zeros(len(out), NAT_TUPLE_DTYPE)
    rep["family"], rep["proto"], rep["tcp_flags"] = 4, 6, 0x12
    rep["src"], rep["sport"], rep["dst"], rep["dport"] = out["dst"], out["dport"], out["src"], out["sport"]
    back, codes = t.reverse_batch(rep, now=11.0)
    assert not codes.any() and (back["dst"] == bulk["src"]).all() and (back["dport"] == bulk["sport"]).all()
    assert t.ports_in_use(BULK_EGRESS) == 300 == t.stats["mappings"]     # one per pod endpoint
    assert t.gc(now=11.0 + 21601.0) == 300_000 and len(t) == 0    # established: 6 h
    assert t.ports_in_use(BULK_EGRESS) == 0 and t.stats["mappings"] == 0
    _, codes = t.reverse_batch(rep, now=21700.0)
    assert (codes != 0).all()
    out2, codes = t.translate_batch(bulk[::-1].copy(), BULK_EGRESS, now=21700.0)
    assert not codes.any() and len(t) == 300_000


def test_a_large_table_costs_no_resident_memory_until_used():
    before = _rss_kib()
    t = NatTable([EGRESS], capacity=4_000_000, seed=1)
    grown = _rss_kib() - before
    # allocated (at most 96 bytes per connection, indexes and IPv6 pool included) ...
    assert 4_000_000 * 80 < t.memory_bytes <= 4_000_000 * 96
    assert grown < 8 * 1024, f"RSS grew {grown} KiB"  # ... but not touched
    for i in range(100):
        t.translate(POD_A, 1000 + i, REMOTE, 80, now=1.0)
    assert len(t) == 100 and t.gc(now=1.0) == 0       # the full sweep visits used entries only


def test_closed_flow_port_is_free_within_timeout_plus_one_second_at_1m():
    """900,000 live connections in a 1,000,000 table; one flow closes with FIN
    both ways; with gc called every 20 ms of simulated time (the agent's
    cadence and budget), its port is free again 10 s (tcp_closing) + 1 s later,
    and no live connection is collected."""
    t = NatTable([BULK_EGRESS, EGRESS], capacity=1_000_000, seed=5)
    now = 1000.0
    bulk = bulk_flows(900, 1000)
    out, codes = t.translate_batch(bulk, BULK_EGRESS, now=now)
    assert not codes.any() and len(t) == 900_000
    assert t.translate(POD_A, 40000, REMOTE, 80, egress_ip=EGRESS, tcp_flags="S", now=now) == (EGRESS, 40000)
    assert t.reverse(REMOTE, 80, EGRESS, 40000, tcp_flags="SA", now=now) == (POD_A, 40000)
    now += 1.0
    t.translate(POD_A, 40000, REMOTE, 80, egress_ip=EGRESS, tcp_flags="FA", now=now)
    t.reverse(REMOTE, 80, EGRESS, 40000, tcp_flags="FA", now=now)
    closed = now
    assert t.get(POD_A, 40000, REMOTE, 80, now=now).state == "CLOSING"
    steps = 0
    while now < closed + 10.0 + 1.0:
        now = closed + (steps + 1) * TICK
        steps += 1
        assert t.gc(GC_BUDGET, now=now) <= GC_BUDGET
        if now < closed + 10.0:
            assert t.ports_in_use(EGRESS) == 1, f"port freed early, {now - closed:.2f} s after close"
    assert t.ports_in_use(EGRESS) == 0, "the closed flow's port is still held 11 s after close"
    # another pod endpoint gets that very port (it is the pod's own, preserved)
    assert t.translate(POD_B, 40000, REMOTE, 443, egress_ip=EGRESS, now=now) == (EGRESS, 40000)
    assert len(t) == 900_001 and t.stats["expired"] == 1
    assert t.get("10.1.3.131", 50000, "203.0.3.231", 443, now=now) is not None


def test_wheel_collects_refreshed_and_shortened_entries_on_time():
    """An entry refreshed after it was bucketed is re-bucketed, not collected;
    one whose timeout shrinks (RST) is moved forward at once."""
    t = NatTable([EGRESS], capacity=1000, seed=1)
    t.translate(POD_A, 40000, REMOTE, 80, "udp", now=100.0)          # udp: 300 s
    t.translate(POD_A, 40001, REMOTE, 80, tcp_flags="S", now=100.0)  # SYN_SENT: 60 s
    t.reverse(REMOTE, 80, EGRESS, 40001, tcp_flags="SA", now=100.0)  # ESTABLISHED: 6 h
    t.translate(POD_A, 40000, REMOTE, 80, "udp", now=350.0)          # refreshed: dies at 650 s
    t.translate(POD_A, 40001, REMOTE, 80, tcp_flags="R", now=350.0)  # RST: CLOSING, dies at 360 s
    now = 350.0
    while now < 361.0:
        now += TICK
        t.gc(GC_BUDGET, now=now)
    assert t.ports_in_use(EGRESS, "tcp") == 0 and t.ports_in_use(EGRESS, "udp") == 1
    while now < 649.0:
        now += 0.5
        t.gc(GC_BUDGET, now=now)
    assert t.ports_in_use(EGRESS, "udp") == 1     # refreshed: alive until 650 s
    while now < 651.0:
        now += TICK
        t.gc(GC_BUDGET, now=now)
    assert len(t) == 0 and t.stats["expired"] == 2


def test_gc_work_per_call_is_bounded_and_leftovers_come_next():
    t = NatTable([EGRESS], capacity=10_000, seed=1)
    out, codes = t.translate_batch(bulk_flows(10, 500), EGRESS, now=10.0)
    assert not codes.any()
    got = [t.gc(100, now=80.0) for _ in range(60)]
    assert max(got) == 100 and sum(got) == 5000 and len(t) == 0


# -- per-source (pod) connection limit --------------------------------------

def test_one_pod_cannot_starve_the_others():
    """Without a limit pod A fills the shared table and pod B is refused;
    with per_source_limit A is refused at its limit and B still connects."""
    t = NatTable([EGRESS], capacity=100, seed=1)
    for i in range(100):
        t.translate(POD_A, 1000 + i, REMOTE, 80, now=1.0)
    with pytest.raises(NatRefused) as exc:
        t.translate(POD_B, 1000, REMOTE, 80, now=1.0)
    assert exc.value.reason == "nat_table_full"

    t = NatTable([EGRESS], capacity=100, seed=1, per_source_limit=60)
    refused = 0
    first = t.translate(POD_A, 1000, REMOTE, 80, now=1.0)
    for i in range(1, 100):
        try:
            t.translate(POD_A, 1000 + i, REMOTE, 80, now=1.0)
        except NatRefused as e:
            assert e.reason == "pod_conn_limit"
            refused += 1
    assert refused == 40
    for i in range(40):
        t.translate(POD_B, 1000 + i, REMOTE, 80, now=1.0)
    s = t.stats
    assert s["entries"] == 100 and s["sources"] == 2 and s["per_source_limit"] == 60
    assert s["refused"]["pod_conn_limit"] == 40
    assert s["refused_by_source"] == {POD_A: 40} and s["refused_other_sources"] == 0
    # known flows of a pod at its limit keep working
    assert t.translate(POD_A, 1000, REMOTE, 80, now=2.0) == first
    assert t.reverse(REMOTE, 80, EGRESS, first[1], now=2.0) == (POD_A, 1000)


def test_pod_limit_counts_down_on_collect_and_in_batches():
    t = NatTable([EGRESS, "2001:db8::1"], capacity=1000, seed=1, per_source_limit=3)
    for i in range(3):
        t.translate(POD_A, 1000 + i, REMOTE, 80, "udp", now=1.0)
        t.translate("fd00::5", 1000 + i, "2001:db8::10", 80, "udp", now=1.0)
    rows = np.zeros(2, NAT_TUPLE_DTYPE)
    rows["family"], rows["proto"], rows["sport"], rows["dport"] = 4, 17, 2000, 53
    rows["src"][0, :4] = [10, 0, 1, 5]      # POD_A: over its limit
    rows["src"][1, :4] = [10, 0, 2, 7]      # POD_B
    rows["dst"][:, :4] = [203, 0, 113, 10]
    _, codes = t.translate_batch(rows, EGRESS, now=1.0)
    assert [DROP_REASON_NAMES[c] for c in codes] == ["pod_conn_limit", "none"]
    assert t.stats["refused_by_source"] == {POD_A: 1}
    t.gc(GC_BUDGET, now=1.0 + 300.5)        # all of them expire: the counts drop to zero
    assert len(t) == 0 and t.stats["sources"] == 0
    for i in range(3):
        t.translate(POD_A, 3000 + i, REMOTE, 80, "udp", now=400.0)
    with pytest.raises(NatRefused):
        t.translate(POD_A, 4000, REMOTE, 80, "udp", now=400.0)


def test_refusals_by_source_are_bounded():
    t = NatTable([EGRESS], capacity=2000, seed=1, per_source_limit=1)
    for i in range(300):
        pod = f"10.9.{i // 256}.{i % 256}"
        t.translate(pod, 1000, REMOTE, 80, now=1.0)
        with pytest.raises(NatRefused):
            t.translate(pod, 1001, REMOTE, 80, now=1.0)
    s = t.stats
    assert len(s["refused_by_source"]) == 256 and s["refused_other_sources"] == 44
    assert sum(s["refused_by_source"].values()) + 44 == s["refused"]["pod_conn_limit"] == 300


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                      (True, TypeError), (101, ValueError)])
def test_bad_per_source_limit(bad, err):
    with pytest.raises(err, match="per_source_limit"):
        NatTable(capacity=100, per_source_limit=bad)
