"""EgressMap's C-only rows: sources small (rows scanned) and large (an LPM
table over more than EGRESS_SMALL rows), written in place, removed (tombs)
and re-added, the slot table regrown, sync and update against one oracle."""
import ipaddress
import random

import numpy as np
import pytest
from egresscore._core import EgressMap

GW = ("192.168.1.3", "192.168.1.4", "0.0.0.0", "0.0.0.1")


def _oracle_lookup(oracle, src, dst):
    best = None
    for (s, net), value in oracle.items():
        if s == src and dst in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, value)
    return best


def _check(em, oracle, rng, sources):
    assert len(em) == len(oracle)
    got = {(str(e.source), str(e.destination)): (str(e.egress_ip), str(e.gateway_ip), e.policy_id)
           for e in em.entries()}
    assert got == {(s, str(n)): v for (s, n), v in oracle.items()}
    srcs, dsts, want = [], [], []
    for _ in range(400):
        s = rng.choice(sources)
        d = ipaddress.ip_address(rng.choice((0xCB000000, 0xC6336400)) + rng.randrange(1 << 16))
        srcs.append(int(ipaddress.ip_address(s)))
        dsts.append(int(d))
        want.append(_oracle_lookup(oracle, s, d))
        e = em.lookup(s, d)
        w = want[-1]
        assert (e is None) == (w is None)
        if w is not None:
            assert (str(e.destination), str(e.gateway_ip), e.policy_id) == (str(w[0]), w[1][1], w[1][2])
    egress, gateway, status, pol = em.lookup_batch(np.array(srcs, np.uint32), np.array(dsts, np.uint32),
                                                   policy_ids=True)
    for i, w in enumerate(want):
        if w is None:
            assert status[i] == 0
        else:
            assert str(ipaddress.ip_address(int(gateway[i]))) == w[1][1] and pol[i] == w[1][2]
            assert status[i] == {"0.0.0.0": 3, "0.0.0.1": 2}.get(w[1][1], 1)


def _rand_row(rng, sources):
    s = rng.choice(sources)
    plen = rng.choice((16, 20, 24, 25, 28, 32))
    base = rng.choice((0xCB000000, 0xC6336400)) + rng.randrange(1 << 16)
    net = ipaddress.ip_network((base >> (32 - plen) << (32 - plen), plen))
    return s, net, ("192.168.1.100", rng.choice(GW), rng.randrange(0, 50))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_small_and_large_sources_against_an_oracle(seed):
    rng = random.Random(seed)
    # few sources with many rows (crossing EGRESS_SMALL both ways), and many with few
    sources = [f"10.0.0.{i}" for i in range(1, 4)] + [f"10.1.{i // 250}.{1 + i % 250}" for i in range(300)]
    em, oracle = EgressMap(), {}
    for step in range(12):
        sets, removes, keys = [], [], set()
        for _ in range(rng.randrange(1, 120)):
            s, net, v = _rand_row(rng, sources[:3] if rng.random() < 0.5 else sources)
            if (s, net) in keys:
                continue
            keys.add((s, net))
            sets.append((s, str(net)) + v)
        present = [k for k in oracle if k not in keys]
        for k in rng.sample(present, min(len(present), rng.randrange(0, 80))):
            removes.append((k[0], str(k[1])))
        if step % 3 == 0:   # one write at a time
            for r in sets:
                em.set(*r)
            for r in removes:
                em.remove(*r)
        else:
            em.update(sets, removes)
        for r in sets:
            oracle[(r[0], ipaddress.ip_network(r[1]))] = (r[2], r[3], r[4])
        for s, d in removes:
            del oracle[(s, ipaddress.ip_network(d))]
        _check(em, oracle, rng, sources)
    assert max(sum(1 for k in oracle if k[0] == s) for s in sources[:3]) > 16   # some LPM-table sources
    # every row of a large source removed, then added back (its slot revived)
    big = sources[0]
    for (s, n) in [k for k in oracle if k[0] == big]:
        em.remove(s, str(n))
        del oracle[(s, n)]
    assert all(str(e.source) != big for e in em.entries())
    em.set(big, "203.0.0.0/16", "192.168.1.100", "192.168.1.3", 7)
    oracle[(big, ipaddress.ip_network("203.0.0.0/16"))] = ("192.168.1.100", "192.168.1.3", 7)
    _check(em, oracle, rng, sources)
    # sync to the oracle's state from a fresh map, and back again: nothing changes
    fresh = EgressMap()
    rows = [(s, str(n)) + v for (s, n), v in oracle.items()]
    assert fresh.sync(rows) == (len(rows), 0, 0)
    _check(fresh, oracle, rng, sources)
    assert fresh.sync(rows) == (0, 0, 0)
    assert em.sync(rows) == (0, 0, 0)
    assert fresh.nbytes > 0


def test_sync_counts_and_drops_whole_sources():
    em = EgressMap()
    em.sync([("10.0.0.1", "203.0.113.0/24", "192.168.1.100", "192.168.1.3"),
             ("10.0.0.2", "203.0.113.0/24", "192.168.1.100", "192.168.1.3"),
             ("fd00::1", "2001:db8::/32", "fd00::100", "192.168.1.3")])
    assert len(em) == 3
    added, removed, changed = em.sync([("10.0.0.1", "203.0.113.0/24", "192.168.1.100", "192.168.1.4"),
                                       ("10.0.0.3", "198.51.100.0/24", "192.168.1.100", "0.0.0.1")])
    assert (added, removed, changed) == (1, 2, 1) and len(em) == 2
    assert em.get("10.0.0.2", "203.0.113.0/24") is None and em.lookup("fd00::1", "2001:db8::1") is None
    assert str(em.get("10.0.0.1", "203.0.113.0/24").gateway_ip) == "192.168.1.4"
    assert em.lookup("10.0.0.3", "198.51.100.7").excluded
    em.clear()
    assert len(em) == 0 and em.entries() == [] and em.nbytes == 0


def test_many_sources_churn_regrows_the_slot_table():
    em = EgressMap()
    for rnd in range(3):
        em.update([(0x0A000000 + i, "203.0.113.0/24", "192.168.1.100", "192.168.1.3", rnd) for i in range(3000)])
        em.update([], [(0x0A000000 + i, "203.0.113.0/24") for i in range(0, 3000, 2)])
        assert len(em) == 1500
        src = np.arange(0x0A000000, 0x0A000000 + 3000, dtype=np.uint32)
        status = em.lookup_batch(src, np.full(3000, 0xCB007101, np.uint32))[2]
        assert status.tolist() == [0, 1] * 1500
        em.update([], [(0x0A000000 + i, "203.0.113.0/24") for i in range(1, 3000, 2)])
        assert len(em) == 0


def test_large_ipv6_source():
    rng = random.Random(5)
    em, oracle = EgressMap(), {}
    for i in range(40):
        plen = rng.choice((32, 48, 56, 64, 72, 96, 128))
        a = (0x20010DB8 << 96) | rng.randrange(1 << 20) << 80 | rng.randrange(1 << 64)
        net = ipaddress.ip_network((a >> (128 - plen) << (128 - plen), plen))
        em.set("fd00:10:1::5", str(net), "fd00:192:168:1::100", "192.168.1.3", i)
        oracle[("fd00:10:1::5", net)] = i
    for _ in range(300):
        net = rng.choice([n for _, n in oracle])
        d = net.network_address + rng.randrange(min(net.num_addresses, 1 << 40))
        w = _oracle_lookup(oracle, "fd00:10:1::5", d)
        e = em.lookup("fd00:10:1::5", d)
        assert e.policy_id == w[1] and e.destination == w[0]
        assert str(e.gateway_ip) == "::ffff:c0a8:103"
