"""pytest-benchmark suite of the NAT table (per-batch cost; the side-by-side
table with rates and ratios is benchmarks/compare_nat.py).

    python -m pytest benchmarks/bench_nat.py
Set EGRESSCORE_BENCH_NAT_N to change the number of live connections
(default 1,000,000)."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_nat import BATCH, GC_BUDGET, churned_table, egress_ips, replies_of, workload  # noqa: E402

import egresscore as ec  # noqa: E402
from egresscore._natref import NatRef, tuples_from_array  # noqa: E402

N = int(os.environ.get("EGRESSCORE_BENCH_NAT_N", "1000000"))


@pytest.fixture(scope="module")
def loaded():
    """A table with N live connections, the tuples and the replies."""
    arr, ext = workload(N)
    t = ec.NatTable(egress_ips(), capacity=N + N // 20, seed=3, clock=lambda: 1000.0)
    out, codes = t.translate_batch(arr, ext)
    assert not codes.any()
    rep = replies_of(out, np.random.default_rng(2).permutation(N))
    return t, arr, ext, rep


def _cycler(items):
    state = {"i": 0}

    def nxt():
        i = state["i"]
        state["i"] = (i + 1) % len(items)
        return items[i]
    return nxt


def test_reverse_batch_1m_live(benchmark, loaded):
    t, _, _, rep = loaded
    out = np.zeros(BATCH, ec.NAT_TUPLE_DTYPE)
    codes = np.zeros(BATCH, np.uint8)
    nxt = _cycler([rep[i:i + BATCH] for i in range(0, N - BATCH + 1, BATCH)])
    benchmark(lambda: t.reverse_batch(nxt(), out=out, codes=codes))
    assert not codes.any()


def test_translate_known_batch_1m_live(benchmark, loaded):
    t, arr, ext, _ = loaded
    out = np.zeros(BATCH, ec.NAT_TUPLE_DTYPE)
    codes = np.zeros(BATCH, np.uint8)
    nxt = _cycler([(arr[i:i + BATCH], ext[i:i + BATCH]) for i in range(0, N - BATCH + 1, BATCH)])

    def one():
        a, e = nxt()
        t.translate_batch(a, e, out=out, codes=codes)
    benchmark(one)
    assert not codes.any()


def test_translate_new_flows_batch(benchmark):
    """New flows into a table that ends with 1M live connections."""
    arr, ext = workload(N, seed=5)
    chunks = [(arr[i:i + BATCH], ext[i:i + BATCH]) for i in range(0, N - BATCH + 1, BATCH)]
    out = np.zeros(BATCH, ec.NAT_TUPLE_DTYPE)
    codes = np.zeros(BATCH, np.uint8)
    tables = []

    def setup():
        tables[:] = [ec.NatTable(egress_ips(), capacity=N + N // 20, seed=3,
                                 clock=lambda: 1000.0)]
        return (), {}

    def fill():
        t = tables[0]
        for a, e in chunks:
            t.translate_batch(a, e, out=out, codes=codes)
    benchmark.pedantic(fill, setup=setup, rounds=3)
    assert len(tables[0]) == len(chunks) * BATCH


def test_gc_call_worst_case_1m_live(benchmark):
    """One Datapath-sized gc call (GC_BUDGET entries examined, every one dead
    and collected, in random memory order) among N connections: the longest
    the datapath thread stalls in gc."""
    order = np.random.default_rng(2).permutation(N)
    arr, ext = workload(N)
    t = churned_table(arr, ext, order, N + N // 20)
    rounds = min(200, N // GC_BUDGET)
    benchmark.pedantic(lambda: t.gc(GC_BUDGET, now=1061.0), rounds=rounds, iterations=1)
    assert len(t) == N - rounds * GC_BUDGET


def test_reference_model_reverse(benchmark):
    """The pure-Python peer, per batch of BATCH replies, 100k live connections."""
    n = min(N, 100_000)
    arr, ext = workload(n)
    m = NatRef([(4, bytes([192, 0, 2, i]) + bytes(12)) for i in range(1, 33)],
               [[(32768, 65535)] * 3] * 32, n, 3)
    t = ec.NatTable(egress_ips(), capacity=n, seed=3, clock=lambda: 1000.0)
    out, _ = t.translate_batch(arr, ext)
    m.translate_many(tuples_from_array(arr), ext.tolist(), 10**12)
    rep = tuples_from_array(replies_of(out, np.random.default_rng(2).permutation(n)))
    nxt = _cycler([rep[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)])
    benchmark(lambda: m.reverse_many(nxt(), 10**12))
