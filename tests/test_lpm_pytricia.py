"""LPMTrie cross-checked against pytricia on 100,000-prefix tables."""
import ipaddress

import numpy as np
import pytest

from egresscore import LPMTrie

pytricia = pytest.importorskip("pytricia")


def random_prefixes(rng, n, width, lo, hi):
    out = {}
    while len(out) < n:
        k = n - len(out)
        lens = rng.integers(lo, hi + 1, k)
        for plen in lens.tolist():
            a = int(rng.integers(0, 2**63)) << 1 | int(rng.integers(0, 2))
            a = (a << (width - 64)) if width > 64 else a >> (64 - width)
            a = a >> (width - plen) << (width - plen)
            out[(a, plen)] = len(out)
    return out


def test_ipv4_100k_against_pytricia():
    rng = np.random.default_rng(2024)
    prefixes = random_prefixes(rng, 100_000, 32, 8, 32)
    prefixes[(0, 0)] = 100_000
    t = LPMTrie(4, prefixes)
    pt = pytricia.PyTricia(32)
    for (a, plen), v in prefixes.items():
        pt.insert(ipaddress.IPv4Network((a, plen)), v)
    assert len(t) == len(pt) == 100_001
    queries = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    # Also every prefix's first and last address, where boundaries bite.
    firsts = np.array([a for a, _ in prefixes], dtype=np.uint32)
    lasts = np.array([a | ((1 << (32 - p)) - 1) for a, p in prefixes], dtype=np.uint32)
    queries = np.concatenate([queries, firsts, lasts])
    values, found = t.lookup_batch(queries)
    assert found.all()
    want = np.array([pt.get_key(ipaddress.IPv4Address(int(q))) and pt.get(ipaddress.IPv4Address(int(q)))
                     for q in queries.tolist()], dtype=np.int64)
    assert (values.astype(np.int64) == want).all()
    # Delete a tenth, one at a time through the patch path, then compare again.
    victims = list(prefixes)[:: 10][:2000]
    for a, plen in victims:
        del t[(a, plen)]
        pt.delete(ipaddress.IPv4Network((a, plen)))
    sample = queries[::3]
    values, found = t.lookup_batch(sample)
    for q, v, f in zip(sample.tolist(), values.tolist(), found.tolist()):
        w = pt.get(ipaddress.IPv4Address(q))
        assert (v if f else None) == w


def test_ipv6_100k_against_pytricia():
    rng = np.random.default_rng(6)
    prefixes = random_prefixes(rng, 100_000, 128, 16, 64)
    t = LPMTrie(6, prefixes)
    pt = pytricia.PyTricia(128)
    for (a, plen), v in prefixes.items():
        pt.insert(ipaddress.IPv6Network((a, plen)), v)
    # Random addresses inside random prefixes (uniform ones would almost never match).
    keys = list(prefixes)
    picks = rng.integers(0, len(keys), 50_000)
    addrs = []
    for i in picks.tolist():
        a, plen = keys[i]
        addrs.append(a | (int(rng.integers(0, 2**63)) << 65 | int(rng.integers(0, 2**63))) >> plen)
    addrs += [int(rng.integers(0, 2**63)) << 65 for _ in range(10_000)]
    packed = np.frombuffer(b"".join(x.to_bytes(16, "big") for x in addrs), np.uint8).reshape(-1, 16)
    values, found = t.lookup_batch(packed)
    for x, v, f in zip(addrs, values.tolist(), found.tolist()):
        assert (v if f else None) == pt.get(ipaddress.IPv6Address(x))
