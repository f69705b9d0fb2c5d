"""Flow-log ring (C) and the NAT table's flow records and per-connection counters."""
import ipaddress
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import egresscore
from egresscore import (
    DROP_REASON_NAMES,
    FLOW_END_REASON_NAMES,
    FLOW_KIND_NAMES,
    FLOW_RECORD_DTYPE,
    FlowLog,
    NatRefused,
    NatTable,
    nat_tuples,
)

EGRESS = "192.168.1.100"
POD = "10.0.1.5"
REMOTE = "203.0.113.10"
START, END, DROP, UPDATE = (FLOW_KIND_NAMES.index(k) for k in ("start", "end", "drop", "update"))


def ip(rec, field):
    b = bytes(rec[field])
    return str(ipaddress.ip_address(b[:4] if rec["family"] == 4 else b))


def end_reason(rec):
    return FLOW_END_REASON_NAMES[rec["reason"]]


def logged_table(capacity=64, log_capacity=1024, **kw):
    kw.setdefault("seed", 1)
    t = NatTable([EGRESS], capacity=capacity, **kw)
    fl = FlowLog(log_capacity)
    t.flow_log = fl
    return t, fl


# ---------------------------------------------------------------- the ring


def test_record_layout_and_capacity():
    assert FLOW_RECORD_DTYPE.itemsize == 128
    assert FlowLog(1000).capacity == 1024 and FlowLog(1).capacity == 1
    fl = FlowLog(8)
    assert len(fl) == 0 and len(fl.drain()) == 0 and fl.drain().dtype == FLOW_RECORD_DTYPE


def test_append_drain_in_order_and_full_ring_counts_lost():
    fl = FlowLog(4)
    for i in range(6):
        assert fl._append(START, sport=i, src=POD, dst=REMOTE) == (i < 4)
    assert len(fl) == 4
    assert fl.stats["lost"] == 2 and fl.stats["appended"]["start"] == 4
    got = fl.drain(3)
    assert list(got["sport"]) == [0, 1, 2]
    assert fl._append(START, sport=9, src=POD, dst=REMOTE)
    assert list(fl.drain()["sport"]) == [3, 9]
    assert len(fl) == 0


@pytest.mark.parametrize("kw", [dict(capacity=0), dict(capacity=1 << 25), dict(capacity="8"),
                                dict(drop_rate=-1), dict(drop_burst=0), dict(drop_rate="x")])
def test_bad_arguments(kw):
    with pytest.raises((TypeError, ValueError)):
        FlowLog(**kw)


def test_nat_table_rejects_other_objects_as_flow_log():
    t = NatTable([EGRESS], capacity=4)
    with pytest.raises(TypeError, match="FlowLog"):
        t.flow_log = object()
    t.flow_log = None
    assert t.flow_log is None


def test_drop_rate_limit_per_reason():
    fl = FlowLog(1024, drop_rate=10, drop_burst=5)
    ok = [fl._drop(6, POD, 1, REMOTE, 2, now=100.0) for _ in range(20)]
    assert ok.count(0) == 5 and ok.count(1) == 15          # burst, then suppressed
    # another reason has its own bucket
    assert fl._drop(8, POD, 1, REMOTE, 2, now=100.0) == 0
    # 0.3 s later: 3 more tokens (10/s)
    ok = [fl._drop(6, POD, 1, REMOTE, 2, now=100.3) for _ in range(10)]
    assert ok.count(0) == 3
    s = fl.stats
    assert s["suppressed"] == {"nat_exhausted": 22} and s["appended"]["drop"] == 9
    recs = fl.drain()
    assert (recs["kind"] == DROP).all() and {DROP_REASON_NAMES[r] for r in recs["reason"]} == {
        "nat_exhausted", "no_nat_entry"}
    fl.set_drop_rate(0)
    assert fl._drop(6, POD, 1, REMOTE, 2, now=200.0) == 1


def test_concurrent_producers_lose_nothing_silently():
    """Several tables appending to one ring from threads (GIL released) while
    a reader drains: every record is either drained once or counted lost."""
    fl = FlowLog(256)
    tables = []
    for k in range(3):
        t = NatTable([f"192.168.1.{100 + k}"], capacity=4096, seed=k)
        t.flow_log = fl
        tables.append(t)
    got = []
    done = threading.Event()

    def reader():
        while not done.is_set():
            got.append(fl.drain())
        got.append(fl.drain())

    def producer(t, k):
        rows = [(f"10.0.{k}.{i % 250 + 1}", 1000 + i, REMOTE, 80, "udp") for i in range(3000)]
        t.translate_batch(nat_tuples(rows), 0, now=10.0)

    r = threading.Thread(target=reader)
    r.start()
    ps = [threading.Thread(target=producer, args=(t, k)) for k, t in enumerate(tables)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    done.set()
    r.join()
    recs = np.concatenate(got)
    s = fl.stats
    assert s["appended"]["start"] + s["lost"] == 9000
    assert len(recs) == s["appended"]["start"]
    keys = {(ip(r, "src"), int(r["sport"])) for r in recs}
    assert len(keys) == len(recs)                          # no record twice, none torn
    assert (recs["kind"] == START).all() and (recs["dport"] == 80).all()


# ------------------------------------------------------ records from the NAT


def test_start_and_end_records_with_counts():
    t, fl = logged_table()
    x_ip, xport = t.translate(POD, 40000, REMOTE, 80, "udp", now=10.0, length=128)
    t.translate(POD, 40000, REMOTE, 80, "udp", now=10.5, length=100)
    assert t.reverse(REMOTE, 80, x_ip, xport, "udp", now=11.0, length=300) == (POD, 40000)
    (s,) = fl.drain()
    assert s["kind"] == START and s["time"] == 10_000_000_000
    assert (ip(s, "src"), s["sport"], ip(s, "dst"), s["dport"], s["proto"]) == (POD, 40000, REMOTE, 80, 17)
    assert (ip(s, "xsrc"), s["xport"]) == (EGRESS, xport)
    (e,) = list(t.entries(now=11.0))
    assert (e.pkts_out, e.bytes_out, e.pkts_in, e.bytes_in) == (2, 228, 1, 300)
    assert t.gc(now=11.0 + 301) == 1                       # UDP idle timeout
    (end,) = fl.drain()
    assert end["kind"] == END and end_reason(end) == "expiry"
    assert (end["pkts_out"], end["bytes_out"], end["pkts_in"], end["bytes_in"]) == (2, 228, 1, 300)
    assert end["duration"] == 302_000_000_000 and (ip(end, "xsrc"), end["xport"]) == (EGRESS, xport)


def test_fin_rst_and_lookup_collection_reasons():
    t, fl = logged_table(timeouts={"tcp_closing": 1})
    a = t.translate(POD, 1, REMOTE, 80, tcp_flags="S", now=1.0, length=60)
    t.reverse(REMOTE, 80, *a, tcp_flags="SA", now=1.0, length=60)
    t.translate(POD, 1, REMOTE, 80, tcp_flags="FA", now=2.0, length=52)
    t.reverse(REMOTE, 80, *a, tcp_flags="FA", now=2.0, length=52)
    b = t.translate(POD, 2, REMOTE, 80, tcp_flags="S", now=2.0)
    t.reverse(REMOTE, 80, *b, tcp_flags="R", now=2.0)
    c = t.translate(POD, 3, REMOTE, 80, tcp_flags="S", now=2.0)
    t.gc(now=3.5)                                          # FIN and RST close after 1 s
    # the SYN-only flow expires later and is collected by a lookup meeting it
    t.translate(POD, 3, REMOTE, 80, tcp_flags="S", now=2.0 + 61)
    recs = fl.drain()
    ends = {int(r["sport"]): end_reason(r) for r in recs if r["kind"] == END}
    assert ends == {1: "fin", 2: "rst", 3: "expiry"}
    starts = [int(r["sport"]) for r in recs if r["kind"] == START]
    assert starts == [1, 2, 3, 3]
    fin = next(r for r in recs if r["kind"] == END and r["sport"] == 1)
    assert (fin["pkts_out"], fin["bytes_out"], fin["pkts_in"], fin["bytes_in"]) == (2, 112, 2, 112)
    assert c[1] > 0


def test_port_reuse_after_close_ends_the_old_connection():
    t, fl = logged_table()
    a = t.translate(POD, 5, REMOTE, 80, tcp_flags="S", now=1.0, length=60)
    t.reverse(REMOTE, 80, *a, tcp_flags="R", now=1.5, length=40)
    t.translate(POD, 5, REMOTE, 80, tcp_flags="S", now=2.0, length=60)   # reopens
    kinds = [(FLOW_KIND_NAMES[r["kind"]], int(r["pkts_in"])) for r in fl.drain()]
    assert kinds == [("start", 0), ("end", 1), ("start", 0)]
    (e,) = list(t.entries(now=2.0))
    assert (e.pkts_out, e.pkts_in, e.age) == (1, 0, 0.0)


def test_flush_evicts_live_connections():
    t, fl = logged_table()
    for p in range(5):
        t.translate(POD, 100 + p, REMOTE, 53, "udp", now=1.0, length=70)
    assert t.flush(now=2.0) == 5 and len(t) == 0
    recs = fl.drain()
    ends = recs[recs["kind"] == END]
    assert len(ends) == 5 and {end_reason(r) for r in ends} == {"eviction"}
    assert (ends["bytes_out"] == 70).all()
    # a connection already closed by FIN keeps its reason
    x = t.translate(POD, 9, REMOTE, 80, tcp_flags="FA", now=3.0)
    t.reverse(REMOTE, 80, *x, tcp_flags="FA", now=3.0)
    t.translate(POD, 10, REMOTE, 80, tcp_flags="S", now=3.0)
    t.flush(now=3.5)
    ends = {int(r["sport"]): end_reason(r) for r in fl.drain() if r["kind"] == END}
    assert ends == {9: "fin", 10: "eviction"}


def test_refusals_make_rate_limited_drop_records():
    t, fl = logged_table(capacity=2)
    fl.set_drop_rate(1, 3)
    t.translate(POD, 1, REMOTE, 80, now=1.0)
    t.translate(POD, 2, REMOTE, 80, now=1.0)
    for p in range(10):
        with pytest.raises(NatRefused):
            t.translate(POD, 3 + p, REMOTE, 80, now=1.0)
    drops = [r for r in fl.drain() if r["kind"] == DROP]
    assert len(drops) == 3
    assert {DROP_REASON_NAMES[r["reason"]] for r in drops} == {"nat_table_full"}
    assert (ip(drops[0], "src"), drops[0]["sport"]) == (POD, 3)
    assert fl.stats["suppressed"] == {"nat_table_full": 7}


def test_counter_wrap_writes_update_records():
    t, fl = logged_table()
    n = 70000
    rows = nat_tuples([(POD, 7, REMOTE, 9, "udp")] * n)
    lens = np.full(n, 1000, dtype=np.uint32)
    out, codes = t.translate_batch(rows, 0, now=5.0, lens=lens)
    assert not codes.any()
    t.flush(now=6.0)
    recs = fl.drain()
    kinds = [FLOW_KIND_NAMES[k] for k in recs["kind"]]
    assert kinds == ["start", "update", "end"]
    # the counts of a flow are the sum of its update and end records
    assert int(recs["pkts_out"].sum()) == n and int(recs["bytes_out"].sum()) == n * 1000
    assert recs[1]["pkts_out"] == 65535


def test_counters_saturate_without_a_flow_log():
    t = NatTable([EGRESS], capacity=8, seed=1)
    n = 70000
    rows = nat_tuples([(POD, 7, REMOTE, 9, "udp")] * n)
    t.translate_batch(rows, 0, now=5.0, lens=np.full(n, 65535, dtype=np.uint32))
    (e,) = list(t.entries(now=5.0))
    assert e.pkts_out == 65535 and e.bytes_out == 2**32 - 1


def test_reverse_batch_counts_and_python_calls_without_length_do_not():
    t, fl = logged_table()
    a = t.translate(POD, 9, REMOTE, 80, "udp", now=1.0)     # no length: not counted
    replies = nat_tuples([(REMOTE, 80, a[0], a[1], "udp")] * 3)
    out, codes = t.reverse_batch(replies, now=1.0, lens=np.array([10, 20, 30], np.uint32))
    assert not codes.any()
    (e,) = list(t.entries(now=1.0))
    assert (e.pkts_out, e.bytes_out, e.pkts_in, e.bytes_in) == (0, 0, 3, 60)
    with pytest.raises(ValueError, match="lens"):
        t.reverse_batch(replies, now=1.0, lens=np.array([1, 2], np.uint32))
    with pytest.raises(ValueError):
        t.translate(POD, 9, REMOTE, 80, "udp", now=1.0, length=70000)


def test_ipv6_records():
    t = NatTable(["2001:db8:1::100"], capacity=8, seed=1)
    fl = FlowLog(16)
    t.flow_log = fl
    t.translate("fd00::5", 4000, "2001:db8:ff::1", 443, "tcp", tcp_flags="S", now=1.0, length=80)
    (r,) = fl.drain()
    assert r["family"] == 6 and ip(r, "src") == "fd00::5" and ip(r, "xsrc") == "2001:db8:1::100"


def test_memory_per_connection_with_counters():
    t = NatTable([f"192.0.2.{i}" for i in range(1, 33)], capacity=1_000_000)
    assert t.memory_bytes / t.capacity <= 128


ops = st.lists(st.tuples(st.sampled_from(["out", "in", "gc", "tick"]),
                         st.integers(0, 5), st.integers(20, 1500)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_records_account_for_every_counted_byte(seq):
    """Oracle: after a flush, each connection has one start and one end (plus
    updates), and the bytes in its records equal the lengths fed to it."""
    t, fl = logged_table(capacity=4, log_capacity=4096, timeouts={"udp": 5})
    now = 1.0
    fed = {}
    xlate = {}
    for op, k, ln in seq:
        if op == "out":
            try:
                xlate[k] = t.translate(POD, 1000 + k, REMOTE, 53, "udp", now=now, length=ln)
            except NatRefused:
                continue
            fed.setdefault(k, [0, 0])[0] += ln
        elif op == "in" and k in xlate:
            if t.reverse(REMOTE, 53, *xlate[k], "udp", now=now, length=ln) is not None:
                fed.setdefault(k, [0, 0])[1] += ln
        elif op == "gc":
            t.gc(now=now)
        else:
            now += 3
    t.flush(now=now)
    recs = fl.drain()
    assert fl.stats["lost"] == 0
    got = {}
    open_ = {}
    for r in recs:
        k = int(r["sport"]) - 1000
        if r["kind"] == START:
            assert k not in open_
            open_[k] = True
        elif r["kind"] in (END, UPDATE):
            assert k in open_
            g = got.setdefault(k, [0, 0])
            g[0] += int(r["bytes_out"])
            g[1] += int(r["bytes_in"])
            if r["kind"] == END:
                del open_[k]
    assert not open_
    assert got == {k: v for k, v in fed.items() if v != [0, 0] or k in got}


def test_flow_log_exported():
    assert egresscore.FlowLog is FlowLog and "FlowLog" in egresscore.__all__
