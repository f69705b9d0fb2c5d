"""pytest-benchmark suite for the LPM trie and the egress map.

python -m pytest benchmarks/bench_lpm.py   (per-operation cost; the side-by-
side ratios against pytricia/py-radix come from compare_lpm.py)
"""
import ipaddress

import numpy as np
import pytest

import egresscore

pytricia = pytest.importorskip("pytricia")
radix = pytest.importorskip("radix")

N_PREFIXES = 100_000
N_LOOKUPS = 1_000_000


def _v4_table():
    rng = np.random.default_rng(1)
    seen = {}
    while len(seen) < N_PREFIXES:
        plen = int(rng.integers(8, 33))
        a = int(rng.integers(0, 2**32)) >> (32 - plen) << (32 - plen)
        seen[(a, plen)] = len(seen)
    seen[(0, 0)] = len(seen)
    return seen


@pytest.fixture(scope="module")
def v4():
    prefixes = _v4_table()
    t = egresscore.LPMTrie(4, prefixes)
    strs = {f"{ipaddress.IPv4Address(a)}/{p}": v for (a, p), v in prefixes.items()}
    pt = pytricia.PyTricia(32)
    rt = radix.Radix()
    for s, v in strs.items():
        pt.insert(s, v)
        rt.add(s)
    rng = np.random.default_rng(2)
    q = rng.integers(0, 2**32, N_LOOKUPS, dtype=np.uint64).astype(np.uint32)
    qs = [str(ipaddress.IPv4Address(x)) for x in q[:10_000].tolist()]
    return t, pt, rt, q, qs, strs


@pytest.fixture(scope="module")
def v6():
    rng = np.random.default_rng(3)
    prefixes = {}
    while len(prefixes) < N_PREFIXES:
        plen = int(rng.integers(16, 65))
        hi = int(rng.integers(0, 2**64, dtype=np.uint64)) >> (64 - plen) << (64 - plen)
        prefixes[(hi << 64, plen)] = len(prefixes)
    t = egresscore.LPMTrie(6, prefixes)
    keys = rng.integers(0, 2**64, (N_LOOKUPS, 2), dtype=np.uint64)
    return t, keys.byteswap().view(np.uint8).reshape(N_LOOKUPS, 16)


def test_v4_batch_1m(benchmark, v4):
    t, _, _, q, _, _ = v4
    values, found = benchmark(t.lookup_batch, q)
    assert found.all()


def test_v4_per_call_egresscore_10k(benchmark, v4):
    t, _, _, _, qs, _ = v4
    look = t.lookup
    benchmark(lambda: [look(s) for s in qs])


def test_v4_per_call_pytricia_10k(benchmark, v4):
    _, pt, _, _, qs, _ = v4
    get = pt.get
    benchmark(lambda: [get(s) for s in qs])


def test_v4_per_call_pyradix_10k(benchmark, v4):
    _, _, rt, _, qs, _ = v4
    best = rt.search_best
    benchmark(lambda: [best(s) for s in qs])


def test_v4_single_update_100k_table(benchmark, v4):
    t = v4[0]
    state = {"i": 0}

    def flip():
        state["i"] += 1
        t["198.51.100.0/24"] = state["i"] & 0xFFFF

    benchmark(flip)


def test_v6_batch_1m(benchmark, v6):
    t, packed = v6
    benchmark(t.lookup_batch, packed)


def test_egress_map_batch_1m(benchmark):
    em = egresscore.EgressMap()
    for i in range(1000):
        em.set(0x0A000000 + i, "203.0.113.0/24", "192.168.1.100", "192.168.1.3")
        em.set_excluded(0x0A000000 + i, "203.0.113.128/25")
    rng = np.random.default_rng(4)
    src = (0x0A000000 + rng.integers(0, 2000, N_LOOKUPS)).astype(np.uint32)
    dst = (0xCB007100 + rng.integers(0, 256, N_LOOKUPS)).astype(np.uint32)
    egress, gateway, status = benchmark(em.lookup_batch, src, dst)
    assert set(np.unique(status).tolist()) == {0, 1, 2}


def test_egress_map_single_set_1k_sources(benchmark):
    em = egresscore.EgressMap()
    for i in range(1000):
        em.set(0x0A000000 + i, "203.0.113.0/24", "192.168.1.100", "192.168.1.3")
    state = {"i": 0}

    def flip():
        state["i"] += 1
        em.set("10.0.0.7", "203.0.113.0/24", "192.168.1.100", "192.168.1.2" if state["i"] & 1 else "192.168.1.3")

    benchmark(flip)
