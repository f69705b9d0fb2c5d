"""Stateful property test: NatTable against the pure-Python model
(egresscore/_natref.py) over random new flows, replies, TCP flags, batches,
time jumps and GC (the full sweep and the bounded expiry wheel), with small
port ranges and a small capacity so collisions, exhaustion and a full table
happen often; the same with a per-source connection limit; and with spill
chains (egress IP 0 spills to 3 then 4, the IPv6 one to 5)."""
import ipaddress

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from egresscore import DROP_REASON_NAMES, NAT_TUPLE_DTYPE, NatRefused, NatTable
from egresscore._natref import STATE_NAMES, NatRef

EGRESS = [("192.168.1.100", {"tcp": (40000, 40005), "udp": (40000, 40002), "icmp": (1, 3)}),
          ("192.168.1.101", {"tcp": (32768, 65535), "udp": (32768, 65535), "icmp": (32768, 65535)}),
          ("2001:db8::100", {"tcp": (40000, 40003), "udp": (40000, 40003), "icmp": (40000, 40003)}),
          # spill IPs (NatMachineSpill): as small, so their chains fill too
          ("192.168.1.102", {"tcp": (40000, 40002), "udp": (40000, 40001), "icmp": (1, 2)}),
          ("192.168.1.103", {"tcp": (40010, 40011), "udp": (40010, 40010), "icmp": (5, 5)}),
          ("2001:db8::101", {"tcp": (40000, 40001), "udp": (40000, 40001), "icmp": (40000, 40001)})]
PODS = {4: ["10.0.1.1", "10.0.1.2"], 6: ["fd00::1", "fd00::2"]}
REMOTES = {4: ["203.0.113.1", "198.51.100.2"], 6: ["2001:db8::a", "2001:db8::b"]}
EXT_OF = {4: [0, 1], 6: [2]}
PROTO = {4: {"tcp": 6, "udp": 17, "icmp": 1}, 6: {"tcp": 6, "udp": 17, "icmp": 58}}
PROTO_NAME = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
FLAGS = {"": 0, "S": 2, "SA": 0x12, "A": 0x10, "FA": 0x11, "R": 4, "RA": 0x14}
CAPACITY = 10
SEED = 7


def packed(ip):
    a = ipaddress.ip_address(ip).packed
    return a + bytes(16 - len(a))


def unpacked(family, addr):
    return str(ipaddress.ip_address(addr[:4] if family == 4 else addr))


flows = st.tuples(
    st.sampled_from([4, 6]), st.integers(0, 1), st.sampled_from([0, 1, 1000, 40000, 40001, 60000]),
    st.integers(0, 1), st.sampled_from([80, 443]), st.sampled_from(["tcp", "udp", "icmp"]),
    st.sampled_from(sorted(FLAGS)), st.integers(0, 1))
steps_ms = st.sampled_from([1, 1000, 9990, 10000, 59000, 60000, 61000, 299000, 300000,
                            3600000, 21600000])


class NatMachine(RuleBasedStateMachine):
    LIMIT = None
    IPV6_CAPACITY = None

    def __init__(self):
        super().__init__()
        self.now_ms = 1_000_000
        self.t = NatTable(capacity=CAPACITY, seed=SEED, clock=lambda: 0.0, per_source_limit=self.LIMIT,
                          ipv6_capacity=self.IPV6_CAPACITY)
        for ip, ranges in EGRESS:
            self.t.add_egress_ip(ip, **ranges)
        self.m = NatRef([(4 if ":" not in ip else 6, packed(ip)) for ip, _ in EGRESS],
                        [[r["tcp"], r["udp"], r["icmp"]] for _, r in EGRESS], CAPACITY, SEED,
                        per_source_limit=self.LIMIT, ipv6_capacity=self.IPV6_CAPACITY)

    @property
    def now(self):
        return self.now_ms / 1000

    @property
    def now_ns(self):
        return self.now_ms * 1_000_000

    def _flow(self, f):
        fam, pod, sport, rem, rport, proto, flags, ext = f
        exts = EXT_OF[fam]
        return (fam, PROTO[fam][proto], FLAGS[flags], sport, rport,
                packed(PODS[fam][pod]), packed(REMOTES[fam][rem])), exts[ext % len(exts)]

    @rule(f=flows)
    def translate(self, f):
        tup, ext = self._flow(f)
        fam, proto, flags, sport, dport, src, dst = tup
        code, out = self.m.translate(tup, ext, self.now_ns)
        try:
            got = self.t.translate(unpacked(fam, src), sport, unpacked(fam, dst), dport,
                                   PROTO_NAME[proto], egress_ip=ext, tcp_flags=flags, now=self.now)
        except NatRefused as exc:
            assert exc.reason == DROP_REASON_NAMES[code]
            return
        assert code == 0
        assert got == (unpacked(fam, out[5]), out[3])

    def _reply_of(self, pick, f, spoof):
        conns = list(self.m.conns.values())
        if conns and not spoof:
            c = conns[pick % len(conns)]
            tup = (c.family, c.proto, FLAGS[f[6]], c.dport, c.xport, c.dst,
                   self.m.egress[c.ext][1])
        else:
            (fam, proto, flags, sport, dport, src, dst), ext = self._flow(f)
            tup = (fam, proto, flags, dport, sport, dst, self.m.egress[ext][1])
        return tup

    @rule(pick=st.integers(0, 100), f=flows, spoof=st.booleans())
    def reply(self, pick, f, spoof):
        tup = self._reply_of(pick, f, spoof)
        fam, proto, flags, sport, dport, src, dst = tup
        code, out = self.m.reverse(tup, self.now_ns)
        got = self.t.reverse(unpacked(fam, src), sport, unpacked(fam, dst), dport,
                             PROTO_NAME[proto], tcp_flags=flags, now=self.now)
        if code:
            assert got is None
        else:
            assert got == (unpacked(fam, out[6]), out[4])

    @staticmethod
    def _array(tuples):
        arr = np.zeros(len(tuples), dtype=NAT_TUPLE_DTYPE)
        for i, (fam, proto, flags, sport, dport, src, dst) in enumerate(tuples):
            arr[i] = (fam, proto, flags, 0, sport, dport, np.frombuffer(src, np.uint8),
                      np.frombuffer(dst, np.uint8))
        return arr

    @staticmethod
    def _check(out, codes, want):
        for i, (code, o) in enumerate(want):
            assert codes[i] == code
            if code == 0:
                r = out[i]
                assert (int(r["family"]), int(r["proto"]), int(r["tcp_flags"]), int(r["sport"]),
                        int(r["dport"]), bytes(r["src"]), bytes(r["dst"])) == o

    @rule(fs=st.lists(flows, min_size=1, max_size=6), wrong=st.integers(0, 7))
    def translate_batch(self, fs, wrong):
        pairs = [self._flow(f) for f in fs]
        tuples = [p[0] for p in pairs]
        exts = [p[1] for p in pairs]
        if wrong < len(exts):
            exts[wrong] = 2 if tuples[wrong][0] == 4 else 0    # egress IP of the other family
        want = [self.m.translate(tp, e, self.now_ns) for tp, e in zip(tuples, exts)]
        out, codes = self.t.translate_batch(self._array(tuples), np.array(exts, np.uint16),
                                            now=self.now)
        self._check(out, codes, want)

    @rule(picks=st.lists(st.tuples(st.integers(0, 100), flows, st.booleans()), min_size=1,
                         max_size=6))
    def reverse_batch(self, picks):
        tuples = [self._reply_of(*p) for p in picks]
        want = [self.m.reverse(tp, self.now_ns) for tp in tuples]
        out, codes = self.t.reverse_batch(self._array(tuples), now=self.now)
        self._check(out, codes, want)

    @rule(ms=steps_ms)
    def advance(self, ms):
        self.now_ms += ms

    @rule()
    def gc(self):
        assert self.t.gc(now=self.now) == self.m.gc(self.now_ns)

    @rule(budget=st.sampled_from([1, 2, 1000]))
    def gc_wheel(self, budget):
        """The expiry wheel collects dead entries only, at most `budget`, and
        with room enough every entry dead for more than a second."""
        got = self.t.gc(budget, now=self.now)
        assert got <= budget
        held = {(PROTO[6 if ":" in e.src else 4][e.proto if e.proto != "icmpv6" else "icmp"],
                 packed(e.src), e.sport, packed(e.dst), e.dport) for e in self.t.entries(now=0)}
        gone = [k for k, c in self.m.conns.items()
                if (c.proto, c.src, c.sport, c.dst, c.dport) not in held]
        assert len(gone) == got
        for k in gone:
            self.m.collect(k, self.now_ns)      # asserts the entry was dead
        if budget == 1000:
            assert all(c.expires > self.now_ns - 1_000_000_000 for c in self.m.conns.values())

    @invariant()
    def same_counters(self):
        s = self.t.stats
        del s["capacity"], s["gc_runs"]
        assert s == self.m.stats()

    @invariant()
    def same_live_entries(self):
        want = sorted(
            (PROTO_NAME[c.proto], unpacked(c.family, c.src), c.sport, unpacked(c.family, c.dst),
             c.dport, unpacked(c.family, self.m.egress[c.ext][1]), c.xport,
             STATE_NAMES[c.state], (c.expires - self.now_ns) / 1e9)
            for c in self.m.live(self.now_ns))
        got = sorted(tuple(e[:9]) for e in self.t.entries(now=self.now))
        assert got == want


NatMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestNatAgainstModel = NatMachine.TestCase


class NatMachineSpill(NatMachine):
    """The small egress IPs spill: new mappings move on down the chain when
    one is full, an endpoint keeps its mapping across the chain, and
    refusals come only when the whole chain is full."""
    CHAINS = {0: [3, 4], 2: [5]}

    def __init__(self):
        super().__init__()
        self.t.set_spill({EGRESS[e][0]: [EGRESS[x][0] for x in c] for e, c in self.CHAINS.items()})
        self.m.set_spill(self.CHAINS)


NatMachineSpill.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestNatWithSpillAgainstModel = NatMachineSpill.TestCase


class NatMachineLimited(NatMachine):
    """Two pods per family and at most 3 connections each: the limit and
    the table's capacity (10) both bite."""
    LIMIT = 3


NatMachineLimited.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestNatWithSourceLimitAgainstModel = NatMachineLimited.TestCase


class NatMachineIPv6Pool(NatMachine):
    """Room for 3 IPv6 connections in a table of 10: a new IPv6 connection
    beyond the out-of-line address pool is refused (nat_table_full, counted
    as ipv6_full) while IPv4 ones still fit, and a collected one's record is
    handed out again."""
    IPV6_CAPACITY = 3


NatMachineIPv6Pool.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestNatWithSmallIPv6PoolAgainstModel = NatMachineIPv6Pool.TestCase
