"""EgressMap against a plain-Python oracle of Cilium's egress policy map:
exact source, longest destination prefix, the no-gateway and excluded-CIDR
sentinels, IPv4 and IPv6, single and batch lookups."""
import ipaddress
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import egresscore
from egresscore import (
    EGRESS_STATUS_EXCLUDED,
    EGRESS_STATUS_MATCH,
    EGRESS_STATUS_NO_GATEWAY,
    EGRESS_STATUS_NO_MATCH,
    EXCLUDED_CIDR_V4,
    EXCLUDED_CIDR_V6,
    GATEWAY_NOT_FOUND_V4,
    GATEWAY_NOT_FOUND_V6,
    EgressEntry,
    EgressMap,
)

W = {4: 32, 6: 128}
NET = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}
ADDR = {4: ipaddress.IPv4Address, 6: ipaddress.IPv6Address}
SOURCES = {4: ["10.0.1.93", "10.0.1.94", "10.0.2.7", "10.0.3.1"],
           6: ["fd00:10:0:1::93", "fd00:10:0:1::94", "fd00:10:0:2::7"]}
BASES = {4: [0xCB007100, 0xC6336400, 0x0A000000, 0], 6: [0x20010DB8 << 96, 0xFD00 << 112, 0]}
GATEWAYS = {4: ["192.168.1.3", "192.168.1.2", "0.0.0.0"], 6: ["fd00:1::3", "fd00:1::2", "::"]}


def test_cilium_sentinels():
    # pkg/egressgateway: GatewayNotFoundIPv4 = 0.0.0.0, ExcludedCIDRIPv4 = 0.0.0.1,
    # GatewayNotFoundIPv6 = ::, ExcludedCIDRIPv6 = ::1.
    assert GATEWAY_NOT_FOUND_V4 == ipaddress.ip_address("0.0.0.0")
    assert EXCLUDED_CIDR_V4 == ipaddress.ip_address("0.0.0.1")
    assert GATEWAY_NOT_FOUND_V6 == ipaddress.ip_address("::")
    assert EXCLUDED_CIDR_V6 == ipaddress.ip_address("::1")
    assert (EGRESS_STATUS_NO_MATCH, EGRESS_STATUS_MATCH, EGRESS_STATUS_EXCLUDED,
            EGRESS_STATUS_NO_GATEWAY) == (0, 1, 2, 3)


def test_one_definition_of_the_sentinels_and_the_entry_type():
    from egresscore import _core, compiler, types

    # the core's constants are made from egresscore.types, and its C raw values match them
    assert str(GATEWAY_NOT_FOUND_V4) == types.GATEWAY_NOT_FOUND and str(EXCLUDED_CIDR_V4) == types.EXCLUDED_CIDR
    assert str(GATEWAY_NOT_FOUND_V6) == types.GATEWAY_NOT_FOUND_V6 and str(EXCLUDED_CIDR_V6) == types.EXCLUDED_CIDR_V6
    assert int(ipaddress.ip_address(types.GATEWAY_NOT_FOUND)) == _core.EGRESS_GATEWAY_RAW_NOT_FOUND
    assert int(ipaddress.ip_address(types.EXCLUDED_CIDR)) == _core.EGRESS_GATEWAY_RAW_EXCLUDED
    assert int(ipaddress.ip_address(types.EXCLUDED_CIDR_V6)) == _core.EGRESS_GATEWAY_RAW_EXCLUDED
    assert (types.EGRESS_STATUS_NO_MATCH, types.EGRESS_STATUS_MATCH, types.EGRESS_STATUS_EXCLUDED,
            types.EGRESS_STATUS_NO_GATEWAY) == (EGRESS_STATUS_NO_MATCH, EGRESS_STATUS_MATCH,
                                                EGRESS_STATUS_EXCLUDED, EGRESS_STATUS_NO_GATEWAY)
    assert EgressEntry is types.EgressEntry is compiler.EgressEntry
    # the compiler's form of an IPv6 entry (an IPv4 gateway, Cilium's sentinels) goes in as it is
    em = EgressMap()
    em.set("fd00::5", "2001:db8::/32", "fd00:1::100", "192.168.1.3")
    em.set("fd00::5", "2001:db8:1::/48", "fd00:1::100", types.EXCLUDED_CIDR)
    em.set("fd00::6", "2001:db8::/32", "::", types.GATEWAY_NOT_FOUND)
    hit, ex, ng = em.lookup("fd00::5", "2001:db8::1"), em.lookup("fd00::5", "2001:db8:1::1"), em.lookup(
        "fd00::6", "2001:db8::1")
    assert hit.row() == ("fd00::5", "2001:db8::/32", "fd00:1::100", "192.168.1.3") and hit.status == 1
    assert hit.gateway_ip == ipaddress.ip_address("::ffff:192.168.1.3")     # one family per entry
    assert ex.listed() == ("fd00::5", "2001:db8:1::/48", "fd00:1::100", types.EXCLUDED_CIDR, 0)
    assert ex.excluded and ex.row()[3] == "Excluded CIDR" and ng.no_gateway and ng.row()[3] == "Not Found"
    _, gateway, status = em.lookup_batch(
        np.frombuffer(ipaddress.ip_address("fd00::5").packed * 2 + ipaddress.ip_address("fd00::6").packed,
                      np.uint8).reshape(3, 16),
        np.frombuffer(b"".join(ipaddress.ip_address(a).packed for a in ("2001:db8::1", "2001:db8:1::1",
                                                                         "2001:db8::1")), np.uint8).reshape(3, 16))
    assert bytes(gateway[0]) == ipaddress.ip_address("::ffff:192.168.1.3").packed
    assert bytes(gateway[1]) == EXCLUDED_CIDR_V6.packed and bytes(gateway[2]) == GATEWAY_NOT_FOUND_V6.packed
    assert list(status) == [1, 2, 3]
    with pytest.raises(ValueError, match="gateway IP 'fd00::1' is IPv6 but the entry is IPv4"):
        em.set("10.0.1.5", "203.0.113.0/24", "192.168.1.3", "fd00::1")


def test_seed_example():
    em = EgressMap()
    em.set("10.0.1.93", "203.0.113.0/24", "192.168.1.3", "192.168.1.3")
    em.set_excluded("10.0.1.93", "203.0.113.128/25", egress_ip="192.168.1.3")
    em.set("10.0.1.94", "203.0.113.0/24", "192.168.1.3", GATEWAY_NOT_FOUND_V4)
    assert len(em) == 3
    assert ("10.0.1.93", "203.0.113.0/24") in em and ("10.0.1.93", "203.0.113.0/25") not in em
    hit = em.lookup("10.0.1.93", "203.0.113.10")
    assert hit == EgressEntry(ipaddress.ip_address("10.0.1.93"), ipaddress.ip_network("203.0.113.0/24"),
                              ipaddress.ip_address("192.168.1.3"), ipaddress.ip_address("192.168.1.3"))
    assert not hit.excluded and not hit.no_gateway and hit.status == EGRESS_STATUS_MATCH
    ex = em.lookup("10.0.1.93", "203.0.113.200")
    assert ex.excluded and ex.destination == ipaddress.ip_network("203.0.113.128/25")
    assert ex.status == EGRESS_STATUS_EXCLUDED
    ng = em.lookup("10.0.1.94", "203.0.113.200")
    assert ng.no_gateway and ng.status == EGRESS_STATUS_NO_GATEWAY
    assert em.lookup("10.0.1.95", "203.0.113.10") is None      # source is exact
    assert em.lookup("10.0.1.93", "198.51.100.1") is None
    src = np.array([0x0A00015D, 0x0A00015D, 0x0A00015E, 0x0A00015D, 0x0A00015F], dtype=np.uint32)
    dst = np.array([0xCB00710A, 0xCB0071C8, 0xCB0071C8, 0xC6336401, 0xCB00710A], dtype=np.uint32)
    egress, gateway, status = em.lookup_batch(src, dst)
    assert status.tolist() == [1, 2, 3, 0, 0]
    assert egress.tolist() == [0xC0A80103, 0xC0A80103, 0xC0A80103, 0, 0]
    assert gateway.tolist() == [0xC0A80103, 1, 0, 0, 0]
    assert [(str(e.source), str(e.destination)) for e in em.entries()] == [
        ("10.0.1.93", "203.0.113.0/24"), ("10.0.1.93", "203.0.113.128/25"), ("10.0.1.94", "203.0.113.0/24")]
    em.remove("10.0.1.93", "203.0.113.128/25")
    assert em.lookup("10.0.1.93", "203.0.113.200").gateway_ip == ipaddress.ip_address("192.168.1.3")
    with pytest.raises(KeyError, match="10.0.1.93.*203.0.113.128/25"):
        em.remove("10.0.1.93", "203.0.113.128/25")
    em.clear()
    assert len(em) == 0 and em.entries() == [] and em.lookup("10.0.1.93", "203.0.113.10") is None
    assert em.lookup_batch(src, dst)[2].tolist() == [0] * 5


def test_ipv6_and_dual_stack_order():
    em = EgressMap()
    em.set("fd00:10:0:1::93", "2001:db8::/32", "fd00:1::100", "fd00:1::3")
    em.set_excluded("fd00:10:0:1::93", "2001:db8:ff::/48")
    em.set("10.0.1.93", "0.0.0.0/0", "192.168.1.100", "192.168.1.3")
    assert [e.source.version for e in em.entries()] == [4, 6, 6]
    assert em.lookup("fd00:10:0:1::93", "2001:db8:1::1").egress_ip == ipaddress.ip_address("fd00:1::100")
    assert em.lookup("fd00:10:0:1::93", "2001:db8:ff::1").excluded
    assert em.lookup("10.0.1.93", "8.8.8.8").gateway_ip == ipaddress.ip_address("192.168.1.3")

    def packed(addrs):
        return np.frombuffer(b"".join(ipaddress.ip_address(a).packed for a in addrs), np.uint8).reshape(-1, 16)

    src = packed(["fd00:10:0:1::93"] * 3 + ["fd00:10:0:1::94"])
    dst = packed(["2001:db8:1::1", "2001:db8:ff::1", "2001:db9::", "2001:db8:1::1"])
    egress, gateway, status = em.lookup_batch(src, dst)
    assert status.tolist() == [1, 2, 0, 0]
    assert egress.shape == (4, 16) and gateway.shape == (4, 16)
    assert bytes(egress[0]) == ipaddress.ip_address("fd00:1::100").packed
    assert bytes(gateway[0]) == ipaddress.ip_address("fd00:1::3").packed
    assert bytes(gateway[1]) == EXCLUDED_CIDR_V6.packed
    assert bytes(gateway[2]) == bytes(16)


class Oracle:
    def __init__(self):
        self.d = {}   # (src addr, dst net) -> EgressEntry

    def lookup(self, src, dst):
        best = None
        for (s, net), e in self.d.items():
            if s == src and net.version == dst.version and dst in net:
                if best is None or net.prefixlen > best.destination.prefixlen:
                    best = e
        return best


def ops(family):
    w = W[family]

    @st.composite
    def dst(draw):
        plen = draw(st.one_of(st.sampled_from([0, w, 8, 16, 24]), st.integers(0, w)))
        base = draw(st.sampled_from(BASES[family]))
        noise = draw(st.integers(0, (1 << w) - 1)) >> draw(st.integers(0, w))
        addr = (base ^ noise) >> (w - plen) << (w - plen) if plen else 0
        return NET[family]((addr, plen))

    src = st.sampled_from(SOURCES[family]).map(ipaddress.ip_address)
    one = st.one_of(
        st.tuples(st.just("set"), src, dst(), st.sampled_from(GATEWAYS[family])),
        st.tuples(st.just("excl"), src, dst(), st.just(None)),
        st.tuples(st.just("del"), src, dst(), st.just(None)),
    )
    return st.lists(one, min_size=1, max_size=30)


@pytest.mark.parametrize("family", [4, 6])
def test_property_against_oracle(family):
    egress_ip = ipaddress.ip_address("192.168.1.100" if family == 4 else "fd00:1::100")
    excl = EXCLUDED_CIDR_V4 if family == 4 else EXCLUDED_CIDR_V6
    unspec = ipaddress.ip_address("0.0.0.0" if family == 4 else "::")

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops(family), st.lists(st.integers(0, (1 << W[family]) - 1), max_size=10))
    def run(operations, extra):
        em = EgressMap()
        oracle = Oracle()
        for kind, s, net, gw in operations:
            key = (s, net)
            if kind == "set":
                em.set(s, net, egress_ip, gw)
                oracle.d[key] = EgressEntry(s, net, egress_ip, ipaddress.ip_address(gw))
            elif kind == "excl":
                em.set_excluded(str(s), str(net))
                oracle.d[key] = EgressEntry(s, net, unspec, excl)
            elif key in oracle.d:
                em.remove(s, net)
                del oracle.d[key]
            else:
                with pytest.raises(KeyError):
                    em.remove(s, net)
        assert len(em) == len(oracle.d)
        assert em.entries() == sorted(oracle.d.values(), key=lambda e: (
            int(e.source), int(e.destination.network_address), e.destination.prefixlen))
        probes = set(extra)
        for _, _, net, _ in operations:
            a, b = int(net.network_address), int(net.broadcast_address)
            probes.update({a, b, max(a - 1, 0), min(b + 1, (1 << W[family]) - 1)})
        pairs = [(ipaddress.ip_address(s), ADDR[family](p)) for s in SOURCES[family] + [SOURCES[family][0]]
                 for p in sorted(probes)]
        want = [oracle.lookup(s, d) for s, d in pairs]
        for (s, d), w in zip(pairs, want):
            assert em.lookup(s, d) == w, (s, d)
        if family == 4:
            src = np.array([int(s) for s, _ in pairs], dtype=np.uint32)
            dst = np.array([int(d) for _, d in pairs], dtype=np.uint32)
        else:
            src = np.frombuffer(b"".join(s.packed for s, _ in pairs), np.uint8).reshape(-1, 16)
            dst = np.frombuffer(b"".join(d.packed for _, d in pairs), np.uint8).reshape(-1, 16)
        egress, gateway, status = em.lookup_batch(src, dst)
        for i, w in enumerate(want):
            if w is None:
                assert status[i] == EGRESS_STATUS_NO_MATCH
                continue
            assert status[i] == w.status
            if family == 4:
                assert (int(egress[i]), int(gateway[i])) == (int(w.egress_ip), int(w.gateway_ip))
            else:
                assert (bytes(egress[i]), bytes(gateway[i])) == (w.egress_ip.packed, w.gateway_ip.packed)

    run()


def test_replace_and_many_sources():
    em = EgressMap()
    for i in range(300):
        em.set(0x0A000000 + i, "203.0.113.0/24", "192.168.1.100", "192.168.1.3")
    em.set("10.0.0.7", "203.0.113.0/24", "192.168.1.101", "192.168.1.2")   # replace
    assert len(em) == 300
    src = np.arange(0x0A000000, 0x0A000000 + 301, dtype=np.uint32)
    egress, gateway, status = em.lookup_batch(src, np.full(301, 0xCB007101, np.uint32))
    assert status.tolist() == [1] * 300 + [0]
    assert egress[7] == 0xC0A80165 and gateway[7] == 0xC0A80102 and egress[8] == 0xC0A80164
    for i in range(0, 300, 2):
        em.remove(0x0A000000 + i, "203.0.113.0/24")
    status = em.lookup_batch(src, np.full(301, 0xCB007101, np.uint32))[2]
    assert status.tolist() == [0, 1] * 150 + [0]


def test_bad_input_names_the_input():
    em = EgressMap()
    with pytest.raises(ValueError, match="IPv4.*IPv6|IPv6.*IPv4"):
        em.set("10.0.1.93", "2001:db8::/32", "192.168.1.3", "192.168.1.3")
    with pytest.raises(ValueError, match="fd00::1"):
        em.set("10.0.1.93", "203.0.113.0/24", "fd00::1", "192.168.1.3")
    with pytest.raises(ValueError, match="10.0.1.0/24"):
        em.set("10.0.1.0/24", "203.0.113.0/24", "192.168.1.3", "192.168.1.3")
    with pytest.raises(ValueError, match="203.0.113.1/24"):
        em.set("10.0.1.93", "203.0.113.1/24", "192.168.1.3", "192.168.1.3")
    with pytest.raises(ValueError, match="nonsense"):
        em.set("nonsense", "203.0.113.0/24", "192.168.1.3", "192.168.1.3")
    with pytest.raises(TypeError, match="list"):
        em.set([1], "203.0.113.0/24", "192.168.1.3", "192.168.1.3")
    with pytest.raises(KeyError, match="10.0.1.93"):
        em.remove("10.0.1.93", "203.0.113.0/24")
    with pytest.raises(TypeError, match="int64"):
        em.lookup_batch(np.zeros(3, np.int64), np.zeros(3, np.uint32))
    with pytest.raises(ValueError, match="differ"):
        em.lookup_batch(np.zeros(3, np.uint32), np.zeros(4, np.uint32))
    with pytest.raises(TypeError, match="shape"):
        em.lookup_batch(np.zeros((3, 4), np.uint8), np.zeros((3, 16), np.uint8))
    with pytest.raises(TypeError):
        ("10.0.1.93",) in em
    assert len(em) == 0 and em.entries() == []


def test_concurrent_batch_lookups_see_whole_updates():
    em = EgressMap()
    srcs = np.arange(0x0A000100, 0x0A000100 + 50, dtype=np.uint32)
    for s in srcs.tolist():
        em.set(s, "203.0.113.0/24", "192.168.1.100", "192.168.1.3")
    dst = np.full(len(srcs), 0xCB007101, np.uint32)
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            egress, gateway, status = em.lookup_batch(srcs, dst)
            if not (status == 1).all() or not set(gateway.tolist()) <= {0xC0A80103, 0xC0A80102}:
                errors.append((status.tolist(), gateway.tolist()))
                return

    th = threading.Thread(target=reader)
    th.start()
    try:
        for gen in range(40):
            gw = "192.168.1.2" if gen % 2 else "192.168.1.3"
            for s in srcs.tolist():
                em.set(s, "203.0.113.0/24", "192.168.1.100", gw)
                em.set(s, "203.0.113.0/25", "192.168.1.100", gw)
                em.remove(s, "203.0.113.0/25")
    finally:
        stop.set()
        th.join()
    assert not errors, errors[:1]


def test_exports():
    from egresscore import _core

    for name in ("EgressMap", "LPMTrie"):
        assert name in egresscore.__all__ and hasattr(egresscore, name)
    for name in ("EgressEntry", "GATEWAY_NOT_FOUND_V4", "EXCLUDED_CIDR_V4", "GATEWAY_NOT_FOUND_V6",
                 "EXCLUDED_CIDR_V6"):
        assert name not in egresscore.__all__ and hasattr(_core, name)


def test_c_api_for_the_fused_datapath():
    from egresscore import _core

    em = EgressMap()
    em.set("10.0.1.93", "203.0.113.0/24", "192.168.1.100", "192.168.1.3")
    em.set_excluded("10.0.1.93", "203.0.113.128/25")
    em.set("fd00:10:0:1::93", "2001:db8::/32", "fd00:1::100", "::")
    assert _core._c_egress_lookup4(em, 0x0A00015D, 0xCB007101) == (1, 0xC0A80164, 0xC0A80103)
    assert _core._c_egress_lookup4(em, 0x0A00015D, 0xCB007181)[::2] == (2, 1)
    assert _core._c_egress_lookup4(em, 0x0A00015E, 0xCB007101)[0] == 0
    src = ipaddress.ip_address("fd00:10:0:1::93").packed
    st, egress, gateway = _core._c_egress_lookup6(em, src, ipaddress.ip_address("2001:db8::5").packed)
    assert st == EGRESS_STATUS_NO_GATEWAY and egress == ipaddress.ip_address("fd00:1::100").packed
    assert gateway == bytes(16)
    assert _core._c_egress_lookup6(em, src, ipaddress.ip_address("2001:db9::5").packed)[0] == 0
    t4 = egresscore.LPMTrie(4, {"10.0.0.0/8": 5})
    assert _core._c_lpm4_lookup(t4, 0x0A010101) == 5 and _core._c_lpm4_lookup(t4, 0x0B000000) is None
    t6 = egresscore.LPMTrie(6, {"2001:db8::/32": 6})
    assert _core._c_lpm6_lookup(t6, ipaddress.ip_address("2001:db8::1").packed) == 6
    assert _core._c_lpm6_lookup(t6, ipaddress.ip_address("2001:db9::1").packed) is None


def test_sync_reconciles_to_exactly_the_given_entries():
    rng = np.random.default_rng(9)

    def desired(k):
        out = []
        for i in rng.choice(60, size=k, replace=False).tolist():
            src = f"10.0.{i % 7}.{i}"
            plen = int(rng.integers(8, 33))
            dst = ipaddress.ip_network((int(rng.integers(0, 2**32)) >> (32 - plen) << (32 - plen), plen))
            gw = ["192.168.1.3", "0.0.0.0", "0.0.0.1"][i % 3]
            out.append((src, str(dst), "192.168.1.100", gw))
        out.append(("fd00:10::1", "2001:db8::/32", "fd00:1::100", "fd00:1::3"))
        return out

    em = EgressMap()
    em.set("10.0.9.9", "0.0.0.0/0", "192.168.1.100", "192.168.1.3")     # will be removed
    prev = {("10.0.9.9", "0.0.0.0/0")}
    for round_ in range(6):
        want = desired(int(rng.integers(0, 40)))
        ref = EgressMap()
        for s, d, e, g in want:
            ref.set(s, d, e, g)
        keys = {(s, d) for s, d, _, _ in want}
        added, removed, changed = em.sync(want)
        assert em.entries() == ref.entries() and len(em) == len(ref)
        assert added == len(keys - prev) and removed == len(prev - keys)
        prev = keys
        src = np.array([int(ipaddress.ip_address(s)) for s, *_ in want if ":" not in s] * 4, np.uint32)
        dst = rng.integers(0, 2**32, len(src), dtype=np.uint64).astype(np.uint32)
        dst[: len(src) // 4] = [int(ipaddress.ip_network(d).network_address) for s, d, *_ in want if ":" not in s]
        for a, b in zip(em.lookup_batch(src, dst), ref.lookup_batch(src, dst)):
            assert (a == b).all()
    assert em.sync(want) == (0, 0, 0)
    before = len(em)
    assert em.sync([]) == (0, before, 0) and len(em) == 0 and em.entries() == []
    with pytest.raises(TypeError, match="tuples"):
        em.sync(["10.0.0.1"])
    with pytest.raises(ValueError, match="host bits"):
        em.sync([("10.0.0.1", "203.0.113.1/24", "192.168.1.3", "192.168.1.3")])


def test_c_read_section_matches_batch():
    from egresscore import _core

    em = EgressMap()
    em.set("10.0.1.93", "203.0.113.0/24", "192.168.1.100", "192.168.1.3")
    em.set_excluded("10.0.1.93", "203.0.113.128/25")
    src = np.array([0x0A00015D, 0x0A00015D, 0x0A00015E], np.uint32)
    dst = np.array([0xCB007101, 0xCB007181, 0xCB007101], np.uint32)
    egress, gateway, status = em.lookup_batch(src, dst)
    assert _core._c_egress_lookup4_section(em, src, dst) == list(zip(status.tolist(), egress.tolist(),
                                                                      gateway.tolist()))
