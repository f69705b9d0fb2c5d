"""LPMTrie against a brute-force `ipaddress` oracle: property tests over random
tables with /0, host routes and overlapping prefixes, IPv4 and IPv6."""
import ipaddress
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egresscore import LPM_MAX_VALUE, LPM_NO_VALUE, LPMTrie

WIDTH = {4: 32, 6: 128}
NET = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}
ADDR = {4: ipaddress.IPv4Address, 6: ipaddress.IPv6Address}


class Oracle:
    """A dict of networks; lookup scans every prefix."""

    def __init__(self, family):
        self.family = family
        self.d = {}

    def lookup(self, addr):
        # Longest first: mask the address to each stored length and probe the dict.
        w = WIDTH[self.family]
        addr = int(addr)
        for plen in sorted({n.prefixlen for n in self.d}, reverse=True):
            net = NET[self.family]((addr >> (w - plen) << (w - plen) if plen else 0, plen))
            if net in self.d:
                return net, self.d[net]
        return None


def bases(family):
    # A few base addresses so random prefixes overlap and nest often.
    w = WIDTH[family]
    return st.sampled_from([0, (1 << w) - 1, 0x0A000000 << (w - 32), 0xC0A80100 << (w - 32),
                            0x20010DB8 << (w - 32), 0x7F000001 << (w - 32)])


def prefixes(family):
    w = WIDTH[family]
    length = st.one_of(st.sampled_from([0, w, w - 1, 8, 16, 24]), st.integers(0, w))

    @st.composite
    def make(draw):
        base = draw(bases(family))
        noise = draw(st.integers(0, (1 << w) - 1)) >> draw(st.integers(0, w))
        plen = draw(length)
        addr = (base ^ noise) >> (w - plen) << (w - plen) if plen else 0
        return NET[family]((addr, plen))

    return make()


def ops(family):
    op = st.one_of(
        st.tuples(st.just("set"), prefixes(family), st.integers(0, 1000)),
        st.tuples(st.just("del"), prefixes(family), st.just(0)),
    )
    return st.lists(op, min_size=1, max_size=40)


def probe_addresses(family, nets, extra):
    w = WIDTH[family]
    out = set(extra)
    for n in nets:
        a = int(n.network_address)
        b = int(n.broadcast_address)
        out.update({a, b, max(a - 1, 0), min(b + 1, (1 << w) - 1)})
    out.update({0, (1 << w) - 1})
    return sorted(out)


def check_against(t, oracle, probes):
    family = oracle.family
    assert len(t) == len(oracle.d)
    assert t.items() == sorted(oracle.d.items(), key=lambda kv: (int(kv[0].network_address), kv[0].prefixlen))
    for a in probes:
        want = oracle.lookup(a)
        assert t.lookup(a) == (None if want is None else want[1]), ADDR[family](a)
        assert t.lookup_prefix(a) == want, ADDR[family](a)
        assert (a in t) == (want is not None)
    if family == 4:
        keys = np.array(probes, dtype=np.uint32)
    else:
        keys = np.array([[a >> 64, a & (2**64 - 1)] for a in probes], dtype=np.uint64)
    values, found = t.lookup_batch(keys)
    for a, v, f in zip(probes, values, found):
        want = oracle.lookup(a)
        assert bool(f) == (want is not None)
        assert int(v) == (LPM_NO_VALUE if want is None else want[1])
    if family == 6:
        packed = np.frombuffer(b"".join(a.to_bytes(16, "big") for a in probes), dtype=np.uint8)
        v2, f2 = t.lookup_batch(packed.reshape(-1, 16))
        assert (v2 == values).all() and (f2 == found).all()


@pytest.mark.parametrize("family", [4, 6])
def test_property_against_ipaddress_oracle(family):
    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops(family), st.lists(st.integers(0, (1 << WIDTH[family]) - 1), max_size=20))
    def run(operations, extra):
        t = LPMTrie(family)
        oracle = Oracle(family)
        for kind, net, value in operations:
            if kind == "set":
                t[net] = value
                oracle.d[net] = value
            elif net in oracle.d:
                del t[net]
                del oracle.d[net]
            else:
                with pytest.raises(KeyError):
                    del t[net]
        check_against(t, oracle, probe_addresses(family, [op[1] for op in operations], extra))

    run()


@pytest.mark.parametrize("family", [4, 6])
def test_bulk_update_matches_single_inserts(family):
    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(prefixes(family), st.integers(0, LPM_MAX_VALUE)), max_size=60),
           st.lists(st.tuples(prefixes(family), st.integers(0, 9)), max_size=30))
    def run(first, second):
        bulk = LPMTrie(family, first)
        bulk.update(dict(second))
        one = LPMTrie(family)
        oracle = Oracle(family)
        for net, v in first + list(dict(second).items()):
            one[net] = v
            oracle.d[net] = v
        assert bulk.items() == one.items()
        probes = probe_addresses(family, [n for n, _ in first + second], [])
        check_against(bulk, oracle, probes)

    run()


def test_big_random_table_every_depth():
    # Many long prefixes force several node levels under the 18-bit direct array.
    rng = np.random.default_rng(7)
    t = LPMTrie(4)
    oracle = Oracle(4)
    items = {}
    for _ in range(3000):
        plen = int(rng.integers(0, 33))
        base = int(rng.choice([0x0A000000, 0x0A010000, 0xC0A80000]))
        addr = (base ^ int(rng.integers(0, 1 << 20))) >> (32 - plen) << (32 - plen) if plen else 0
        items[ipaddress.IPv4Network((addr, plen))] = int(rng.integers(0, LPM_MAX_VALUE + 1))
    t.update(items)
    oracle.d = dict(items)
    assert t.stats["direct_bits"] >= 12
    probes = probe_addresses(4, list(items)[:400], rng.integers(0, 2**32, 500).tolist())
    check_against(t, oracle, probes)


def test_pythonic_surface():
    t = LPMTrie()
    assert t.family == 4 and len(t) == 0 and t.lookup("1.2.3.4") is None
    t["10.0.0.0/8"] = 1
    t[ipaddress.ip_network("10.1.0.0/16")] = 2
    t[("10.1.2.0", 24)] = 3
    t["10.1.2.3"] = 4                      # an address is a host route
    t[ipaddress.ip_address("10.9.9.9")] = 5
    assert t["10.1.2.3/32"] == 4 and t[(0x0A090909, 32)] == 5
    assert t.lookup("10.1.2.3") == 4
    assert t.lookup(ipaddress.ip_address("10.1.2.4")) == 3
    assert t.lookup(0x0A010505) == 2
    assert t.lookup(b"\x0a\x05\x05\x05") == 1
    assert t.lookup("11.0.0.0", default=-1) == -1
    assert "10.200.0.1" in t and "11.0.0.1" not in t
    assert "10.1.2.0/24" in t and "11.0.0.0/15" not in t and "10.0.0.0/7" not in t  # coverage, like pytricia
    assert t.has_key("10.1.0.0/16") and not t.has_key("10.1.0.0/17")
    assert t.get("10.2.0.0/16") is None and t.get("10.0.0.0/8") == 1
    assert [str(n) for n in t] == ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.9.9.9/32"]
    assert t.values() == [1, 2, 3, 4, 5]
    del t["10.1.2.0/24"]
    assert t.lookup("10.1.2.4") == 2
    assert t.pop("10.9.9.9/32") == 5 and t.pop("10.9.9.9/32", None) is None
    with pytest.raises(KeyError):
        t["10.1.2.0/24"]
    t["10.0.0.0/8"] = 7                    # replace
    assert t.lookup("10.5.5.5") == 7 and len(t) == 3
    t.clear()
    assert len(t) == 0 and t.lookup("10.5.5.5") is None
    assert repr(t) == "LPMTrie(family=4, prefixes=0)"


def test_ipv6_surface_and_layouts():
    t = LPMTrie(6, {"2001:db8::/32": 1, "2001:db8:1::/48": 2, "::/0": 0, "2001:db8::1": 3})
    assert t.lookup("2001:db8:1::5") == 2 and t.lookup("2001:db8::1") == 3 and t.lookup("fe80::1") == 0
    addrs = [ipaddress.ip_address(a) for a in ("2001:db8:1::5", "2001:db8::1", "fe80::1", "2001:db8:2::")]
    packed = np.frombuffer(b"".join(a.packed for a in addrs), dtype=np.uint8).reshape(-1, 16)
    halves = np.array([[int(a) >> 64, int(a) & (2**64 - 1)] for a in addrs], dtype=np.uint64)
    for keys in (packed, halves):
        values, found = t.lookup_batch(keys)
        assert values.tolist() == [2, 3, 0, 1] and found.all()


def test_empty_and_default_route():
    for family in (4, 6):
        t = LPMTrie(family)
        keys = np.zeros(5, np.uint32) if family == 4 else np.zeros((5, 16), np.uint8)
        values, found = t.lookup_batch(keys)
        assert not found.any() and (values == LPM_NO_VALUE).all()
        t["0.0.0.0/0" if family == 4 else "::/0"] = 9
        values, found = t.lookup_batch(keys)
        assert found.all() and (values == 9).all()
        empty = keys[:0]
        v0, f0 = t.lookup_batch(empty)
        assert v0.shape == (0,) and f0.shape == (0,)


def test_max_value_roundtrip():
    t = LPMTrie(4)
    t["1.0.0.0/8"] = LPM_MAX_VALUE
    t["2.0.0.0/8"] = 0
    v, f = t.lookup_batch(np.array([0x01000001, 0x02000002, 0x03000003], dtype=np.uint32))
    assert v.tolist()[:2] == [LPM_MAX_VALUE, 0] and f.tolist() == [True, True, False]


def test_concurrent_lookups_never_see_half_made_updates():
    """Reader threads (GIL released) see whole tables: each batch's results
    match exactly one published generation."""
    rng = np.random.default_rng(3)
    nets = set()
    while len(nets) < 2000:
        plen = int(rng.integers(8, 33))
        nets.add(ipaddress.IPv4Network((int(rng.integers(0, 2**32)) >> (32 - plen) << (32 - plen), plen)))
    nets = sorted(nets, key=lambda n: (int(n.network_address), n.prefixlen))
    t = LPMTrie(4, {n: 0 for n in nets})
    keys = np.array([int(n.network_address) for n in nets], dtype=np.uint32)
    stop = threading.Event()
    errors = []
    seen = set()

    def reader():
        while not stop.is_set():
            values, found = t.lookup_batch(keys)
            gens = set(values.tolist())
            if len(gens) != 1 or not found.all():
                errors.append(sorted(gens)[:5])
                return
            seen.add(gens.pop())

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        for gen in range(1, 60):
            t.update({n: gen for n in nets})          # one atomic generation
            t["0.0.0.0/0"] = gen                      # single updates publish too
            del t["0.0.0.0/0"]
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, errors
    assert len(seen) >= 1


@pytest.mark.parametrize("family", [4, 6])
def test_single_updates_on_a_big_table_patch_in_place(family):
    """Single inserts/deletes on a table with a wide direct array take the
    in-place patch path (one slot, or a repaint of many slots for short
    prefixes) and fall back to a rebuild when the spare tail runs out."""
    rng = np.random.default_rng(11 + family)
    w = WIDTH[family]
    nets = {}
    while len(nets) < 6000:
        plen = int(rng.integers(1, 33 if family == 4 else 65))
        hi = int(rng.integers(0, 2**32)) << (w - 32)
        if family == 6:
            hi |= int(rng.integers(0, 2**32)) << (w - 64)
        nets[NET[family]((hi >> (w - plen) << (w - plen), plen))] = int(rng.integers(0, 1000))
    t = LPMTrie(family, nets)
    oracle = Oracle(family)
    oracle.d = dict(nets)
    assert t.stats["direct_bits"] == (15 if family == 4 else 16)
    touched = []
    for i in range(400):
        if i % 3 == 2:
            victim = list(oracle.d)[int(rng.integers(0, len(oracle.d)))]
            del t[victim]
            del oracle.d[victim]
            touched.append(victim)
            continue
        plen = int(rng.choice([0, 2, 5, 8, 12, 15, 16, 17, 18, 19, 24, 30, 32]))
        base = list(nets)[int(rng.integers(0, len(nets)))]
        a = int(base.network_address)
        net = NET[family]((a >> (w - plen) << (w - plen) if plen else 0, plen))
        t[net] = i
        oracle.d[net] = i
        touched.append(net)
    probes = probe_addresses(family, touched + list(nets)[:200], [])
    check_against(t, oracle, probes)


def test_many_single_inserts_exhaust_the_patch_tail():
    t = LPMTrie(4)
    oracle = Oracle(4)
    for i in range(1500):
        net = ipaddress.IPv4Network(((0x0A000000 + i * 64) & 0xFFFFFFC0, 26 + i % 7))
        t[net] = i
        oracle.d[net] = i
    probes = probe_addresses(4, list(oracle.d)[::5], [])
    check_against(t, oracle, probes)


@pytest.mark.parametrize("family", [4, 6])
def test_update_arrays_matches_update(family):
    rng = np.random.default_rng(5)
    w = WIDTH[family]
    nets = {}
    for _ in range(3000):
        plen = int(rng.integers(0, w + 1))
        a = int(rng.integers(0, 2**63)) << (w - 63) if family == 6 else int(rng.integers(0, 2**32))
        nets[NET[family]((a >> (w - plen) << (w - plen) if plen else 0, plen))] = int(rng.integers(0, 99))
    items = list(nets.items())
    lens = np.array([n.prefixlen for n, _ in items], dtype=np.uint8)
    vals = np.array([v for _, v in items], dtype=np.uint32)
    if family == 4:
        arr = np.array([int(n.network_address) for n, _ in items], dtype=np.uint32)
    else:
        arr = np.frombuffer(b"".join(n.network_address.packed for n, _ in items), np.uint8).reshape(-1, 16)
    a = LPMTrie(family)
    a.update_arrays(arr, lens, vals)
    assert a.items() == LPMTrie(family, nets).items()
    bad_lens = lens.copy()
    k = next(i for i, (n, _) in enumerate(items) if int(n.network_address))
    bad_lens[k] = 0                       # a non-zero network as /0: host bits set
    with pytest.raises(ValueError, match=rf"networks\[{k}\]"):
        LPMTrie(family).update_arrays(arr, bad_lens, vals)
    with pytest.raises(ValueError, match="must match"):
        LPMTrie(family).update_arrays(arr, lens[:-1], vals)


def test_lookup_batch_into_caller_arrays():
    t = LPMTrie(4, {"10.0.0.0/8": 3})
    keys = np.array([0x0A000001, 0x0B000001], np.uint32)
    values = np.zeros(2, np.uint32)
    found = np.zeros(2, np.bool_)
    v, f = t.lookup_batch(keys, out=(values, found))
    assert v is values and f is found and values.tolist() == [3, LPM_NO_VALUE] and found.tolist() == [True, False]
    with pytest.raises(TypeError, match="out values"):
        t.lookup_batch(keys, out=(np.zeros(3, np.uint32), found))
    with pytest.raises(TypeError, match="out found"):
        t.lookup_batch(keys, out=(values, np.zeros(2, np.uint8)))
    with pytest.raises(TypeError, match="tuple"):
        t.lookup_batch(keys, out=values)


def test_ipv6_skip_chains_across_the_64_bit_halves():
    # Lone long prefixes fold into skip nodes; a chain must stop at bit 64.
    for plen in (65, 70, 100, 127, 128):
        t = LPMTrie(6, {"2001:db8::/%d" % plen: 1})
        assert t.lookup("2001:db8::") == 1
        assert t.lookup("2001:db8:0:0:8000::") is None
        assert t.lookup("2001:db8::1") == (1 if plen < 128 else None)
        assert t.lookup("2001:db9::") is None
    t = LPMTrie(6, {"2001:db8::/128": 1, "::/0": 0})
    assert t.lookup("2001:db8:0:0:8000::") == 0 and t.lookup("2001:db8::") == 1


def test_single_update_patches_under_concurrent_readers():
    """Readers (GIL released) racing single-update patches, including short
    prefixes that repaint many direct slots: every lookup returns a value its
    address had before or after some update, never garbage."""
    rng = np.random.default_rng(21)
    base = {}
    while len(base) < 20000:                       # dbits 16: a wide direct array
        plen = int(rng.integers(8, 33))
        a = int(rng.integers(0, 2**32)) >> (32 - plen) << (32 - plen)
        if (a >> 20) != 0x0A0:                     # keep 10.0.0.0/12 for the race
            base[(a, plen)] = 1
    t = LPMTrie(4, base)
    hosts = [(0x0A000000 + i * 4096 + 1, 24) for i in range(64)]   # /24s inside 10.0.0.0/12
    allowed = {}
    probes = []
    for i, (a, _) in enumerate(hosts):
        probes.append(a)                           # inside a toggled /24
        allowed[a] = {1000 + 2 * i, 1001 + 2 * i}
        probes.append(a + 256)                     # only under the toggled /12 (or a base cover)
        allowed[a + 256] = {5, 6, t.lookup(a + 256)}
    keys = np.array(probes, dtype=np.uint32)
    for i, (a, plen) in enumerate(hosts):
        t[(a & 0xFFFFFF00, plen)] = 1000 + 2 * i
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            values, found = t.lookup_batch(keys)
            for a, v, f in zip(probes, values.tolist(), found.tolist()):
                if (v if f else None) not in allowed[a]:
                    errors.append((hex(a), v, f))
                    return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        for gen in range(30):
            for i, (a, plen) in enumerate(hosts):
                t[(a & 0xFFFFFF00, plen)] = 1000 + 2 * i + (gen & 1)
            t["10.0.0.0/12"] = 5 + (gen & 1)       # 16 slots repainted, subtrees rebuilt
            if gen % 3 == 2:
                del t["10.0.0.0/12"]
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, errors[:3]
