"""EgressMap.update: many writes in one publish per family, the same result as one write at a time."""
import random

import pytest
from egresscore._core import EgressMap


def _rows(rng, n):
    out = []
    for _ in range(n):
        src = f"10.0.{rng.randrange(4)}.{rng.randrange(1, 40)}"
        dst = f"203.0.{rng.randrange(8)}.0/{rng.choice((24, 25, 26))}"
        dst = dst if not dst.endswith("/25") else dst.replace(".0/25", ".128/25")
        out.append((src, dst, "192.168.1.3", rng.choice(("192.168.1.3", "0.0.0.0", "0.0.0.1"))))
    # an IPv6 entry takes an IPv4 gateway (the compiler's form, IPv4 underlay) and the IPv4 sentinels
    v6 = [(f"fd00:10:1::{rng.randrange(1, 30):x}", "2001:db8::/32", "fd00:192:168:1::100",
           rng.choice(("::ffff:192.168.1.3", "192.168.1.3", "0.0.0.0", "0.0.0.1")))
          for _ in range(n // 4)]
    return out + v6


def _state(em):
    return sorted((str(e.source), str(e.destination), str(e.egress_ip), str(e.gateway_ip)) for e in em.entries())


def test_update_equals_one_write_at_a_time():
    rng = random.Random(7)
    batched, single = EgressMap(), EgressMap()
    for _ in range(30):
        sets = list({(r[0], r[1]): r for r in _rows(rng, 40)}.values())
        present = [(str(e.source), str(e.destination)) for e in single.entries()]
        setkeys = {(s, d) for s, d, _, _ in sets}
        removes = [k for k in rng.sample(present, min(len(present), 15)) if k not in setkeys]
        batched.update(sets, removes)
        for s in sets:
            single.set(*s)
        for k in removes:
            single.remove(*k)
        assert _state(batched) == _state(single) and len(batched) == len(single)
        for s, d, _, _ in sets[:10]:
            ip = d.split("/")[0]
            ip = ip[:-1] + "1" if ":" not in ip else "2001:db8::1"
            a, b = batched.lookup(s, ip), single.lookup(s, ip)
            assert (a is None) == (b is None) and (a is None or a == b)


def test_update_is_all_or_nothing():
    em = EgressMap()
    em.update([("10.0.1.1", "203.0.113.0/24", "192.168.1.3", "192.168.1.3")])
    before = _state(em)
    with pytest.raises(KeyError, match="10.0.9.9"):
        em.update([("10.0.1.2", "203.0.113.0/24", "192.168.1.3", "192.168.1.3")], [("10.0.9.9", "1.2.3.0/24")])
    assert _state(em) == before and len(em) == 1
    em.update([], [("10.0.1.1", "203.0.113.0/24")])
    assert len(em) == 0 and em.lookup("10.0.1.1", "203.0.113.5") is None
