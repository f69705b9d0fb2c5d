"""Pure-Python reference model of the NAT table (egresscore.NatTable).

It states the same rules as src/nat.pyx with dicts and sets and no attention
to speed: the oracle of the stateful property test and the peer of the NAT
benchmark.  Tuples are (family, proto, tcp_flags, sport, dport, src, dst) with
16-byte addresses (IPv4 in the first 4 bytes), ports in host order, times in
nanoseconds; codes are the drop reasons of src/verdict.pxi.
"""
import ipaddress

OK = 0
DROP_UNSUPPORTED = 2
DROP_NO_EGRESS_IP = 5
DROP_NAT_EXHAUSTED = 6
DROP_NAT_TABLE_FULL = 7
DROP_NO_NAT_ENTRY = 8
DROP_POD_CONN_LIMIT = 19
REFUSED_SOURCE_SLOTS = 256

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
SYN_SENT, ESTABLISHED, CLOSING, UDP_STATE, ICMP_STATE = 1, 2, 3, 4, 5
STATE_NAMES = {1: "SYN_SENT", 2: "ESTABLISHED", 3: "CLOSING", 4: "UDP", 5: "ICMP"}
F_FIN_OUT, F_FIN_IN = 1, 2
M64 = 0xFFFFFFFFFFFFFFFF
DEFAULT_TIMEOUTS = {"tcp_syn": 60.0, "tcp_established": 21600.0,
                    "tcp_closing": 10.0, "udp": 300.0, "icmp": 60.0}


def rng_seed(seed):
    x = (seed * 0x9E3779B97F4A7C15 + 0x7F4A7C15) & M64
    return x or 1


def _valid(family, proto, src=None, dst=None):
    """A family and protocol the table handles; an IPv4 tuple's 16-byte
    addresses are zero past their first 4 (the table keeps 4 bytes)."""
    if family == 4:
        return proto in (TCP, UDP, ICMP) and all(a is None or not any(a[4:]) for a in (src, dst))
    if family == 6:
        return proto in (TCP, UDP, ICMPV6)
    return False


def _pool_of(proto):
    return 0 if proto == TCP else 1 if proto == UDP else 2


class _Conn:
    __slots__ = ("family", "proto", "src", "sport", "dst", "dport", "ext", "xport",
                 "state", "flags", "expires", "created")


class NatRef:
    """The reference table.  `egress` is a list of (family, addr16) and
    `ranges[i]` a list of three (lo, hi) pairs (tcp, udp, icmp) per egress IP.
    `per_source_limit`: connections one source address may hold (None: any).
    `ipv6_capacity`: IPv6 connections the table's out-of-line address pool
    holds (None: NatTable's default for `capacity`); a new one beyond it is
    refused as nat_table_full."""

    def __init__(self, egress, ranges, capacity, seed, timeouts=None, per_source_limit=None,
                 ipv6_capacity=None):
        tmo = dict(DEFAULT_TIMEOUTS, **(timeouts or {}))
        self.timeout = {
            SYN_SENT: round(tmo["tcp_syn"] * 1e9),
            ESTABLISHED: round(tmo["tcp_established"] * 1e9),
            CLOSING: round(tmo["tcp_closing"] * 1e9),
            UDP_STATE: round(tmo["udp"] * 1e9),
            ICMP_STATE: round(tmo["icmp"] * 1e9),
        }
        self.egress = []
        self.ext_by_addr = {}
        self.ranges = []
        self.used_ports = []
        for (fam, addr), rng in zip(egress, ranges):
            self.add_egress(fam, addr, rng)
        self.capacity = capacity
        if ipv6_capacity is None:
            ipv6_capacity = capacity if capacity <= 65536 else max(65536, capacity // 16)
        self.ipv6_capacity = ipv6_capacity
        self.ipv6_full = 0
        self.rng = rng_seed(seed & M64)
        self.conns = {}     # fwd key -> _Conn (dead ones too, until collected)
        self.rev = {}       # reply key -> fwd key
        self.maps = {}      # (family, proto, ext, src, sport) -> [xport, refcnt]
        self.lookups = self.hits = self.created = self.expired = 0
        self.drops = {}
        self.per_source_limit = per_source_limit
        self.by_source = {}         # (family, src) -> connections held (dead ones too)
        self.refused_by_source = {}  # (family, src) -> refusals, the first REFUSED_SOURCE_SLOTS
        self.refused_other = 0
        self.spill = {}             # ext -> [ext, ...]: its spill chain (NatTable.set_spill)
        self.spilled_in = {}        # ext -> mappings placed on it because an earlier IP was full

    def set_spill(self, chains):
        """{ext: [ext, ...]} replacing every chain (indexes, checked by the caller)."""
        self.spill = {e: list(c) for e, c in chains.items() if c}

    def add_egress(self, family, addr, ranges):
        self.egress.append((family, addr))
        self.ext_by_addr[(family, addr)] = len(self.egress) - 1
        self.ranges.append(list(ranges))
        self.used_ports.append([set(), set(), set()])
        return len(self.egress) - 1

    # -- helpers -------------------------------------------------------------

    def _drop(self, code):
        self.drops[code] = self.drops.get(code, 0) + 1
        return code, None

    def _rand(self):
        x = self.rng
        x ^= x >> 12
        x ^= (x << 25) & M64
        x ^= x >> 27
        self.rng = x
        return (x * 0x2545F4914F6CDD1D) & M64

    def _alloc_port(self, ext, proto, want):
        lo, hi = self.ranges[ext][_pool_of(proto)]
        used = self.used_ports[ext][_pool_of(proto)]
        if len(used) == hi - lo + 1:
            return None
        if lo <= want <= hi and want not in used:
            return want
        n = hi - lo + 1
        start = lo + ((self._rand() >> 32) % n)
        for k in range(n):
            p = start + k
            if p > hi:
                p -= n
            if p not in used:
                return p
        return None  # unreachable

    def _full(self, ext, proto):
        lo, hi = self.ranges[ext][_pool_of(proto)]
        return len(self.used_ports[ext][_pool_of(proto)]) == hi - lo + 1

    def _touch(self, c, direction, flags, now):
        if c.proto == TCP:
            if flags & RST:
                c.state = CLOSING
            elif c.state == CLOSING:
                if direction == "out" and (flags & (SYN | ACK)) == SYN:
                    c.state = SYN_SENT
                    c.flags = 0
            else:
                if flags & FIN:
                    c.flags |= F_FIN_OUT if direction == "out" else F_FIN_IN
                if c.flags == F_FIN_OUT | F_FIN_IN:
                    c.state = CLOSING
                elif c.state == SYN_SENT and direction == "in":
                    c.state = ESTABLISHED
        c.expires = now + self.timeout[c.state]

    def _rev_key(self, c):
        return (c.family, c.proto, c.dst, c.dport, c.ext, c.xport)

    def _collect(self, key):
        c = self.conns.pop(key)
        del self.rev[self._rev_key(c)]
        mkey = (c.family, c.proto, c.ext, c.src, c.sport)
        m = self.maps[mkey]
        m[1] -= 1
        if m[1] == 0:
            del self.maps[mkey]
            self.used_ports[c.ext][_pool_of(c.proto)].discard(m[0])
        if self.per_source_limit is not None:
            skey = (c.family, c.src)
            self.by_source[skey] -= 1
            if self.by_source[skey] == 0:
                del self.by_source[skey]

    def _ext_index(self, family, addr):
        return self.ext_by_addr.get((family, addr))

    # -- operations ----------------------------------------------------------

    def translate(self, tup, ext, now):
        """SNAT an outgoing tuple: (0, out tuple) or (drop code, None)."""
        family, proto, flags, sport, dport, src, dst = tup
        if not _valid(family, proto, src, dst):
            return self._drop(DROP_UNSUPPORTED)
        if not 0 <= ext < len(self.egress) or self.egress[ext][0] != family:
            return self._drop(DROP_NO_EGRESS_IP)
        self.lookups += 1
        if proto in (ICMP, ICMPV6):
            dport = 0
        key = (family, proto, src, sport, dst, dport)
        c = self.conns.get(key)
        if c is not None:
            if c.expires > now:
                self.hits += 1
                self._touch(c, "out", flags, now)
                return OK, self._out(c, flags)
            self._collect(key)
            self.expired += 1
        skey = (family, src)
        if self.per_source_limit is not None and self.by_source.get(skey, 0) >= self.per_source_limit:
            if skey in self.refused_by_source:
                self.refused_by_source[skey] += 1
            elif len(self.refused_by_source) < REFUSED_SOURCE_SLOTS:
                self.refused_by_source[skey] = 1
            else:
                self.refused_other += 1
            return self._drop(DROP_POD_CONN_LIMIT)
        if len(self.conns) >= self.capacity:
            return self._drop(DROP_NAT_TABLE_FULL)
        if family == 6 and self._ipv6_held() >= self.ipv6_capacity:
            self.ipv6_full += 1
            return self._drop(DROP_NAT_TABLE_FULL)
        mkey = (family, proto, ext, src, sport)
        m = self.maps.get(mkey)
        if m is None:       # the endpoint's mapping on a spill IP is its mapping
            for x in self.spill.get(ext, ()):
                m = self.maps.get((family, proto, x, src, sport))
                if m is not None:
                    ext, mkey = x, (family, proto, x, src, sport)
                    break
        if m is None:
            if self._full(ext, proto):      # the first IP of the chain with a free port
                ext = next((x for x in self.spill.get(ext, ()) if not self._full(x, proto)), None)
                if ext is None:
                    return self._drop(DROP_NAT_EXHAUSTED)
                self.spilled_in[ext] = self.spilled_in.get(ext, 0) + 1
                mkey = (family, proto, ext, src, sport)
            xport = self._alloc_port(ext, proto, sport)
            self.used_ports[ext][_pool_of(proto)].add(xport)
            m = self.maps[mkey] = [xport, 0]
        m[1] += 1
        c = _Conn()
        c.family, c.proto, c.src, c.sport, c.dst, c.dport = family, proto, src, sport, dst, dport
        c.ext, c.xport, c.flags, c.created = ext, m[0], 0, now
        c.state = SYN_SENT if proto == TCP else UDP_STATE if proto == UDP else ICMP_STATE
        self.conns[key] = c
        self.rev[self._rev_key(c)] = key
        if self.per_source_limit is not None:
            self.by_source[skey] = self.by_source.get(skey, 0) + 1
        self.created += 1
        self._touch(c, "out", flags, now)
        return OK, self._out(c, flags)

    def _out(self, c, flags):
        return (c.family, c.proto, flags, c.xport, c.dport, self.egress[c.ext][1], c.dst)

    def reverse(self, tup, now):
        """Reverse-translate a reply: (0, tuple towards the pod) or (code, None)."""
        family, proto, flags, sport, dport, src, dst = tup
        if not _valid(family, proto, src, dst):
            return self._drop(DROP_UNSUPPORTED)
        self.lookups += 1
        if proto in (ICMP, ICMPV6):
            sport = 0
        ext = self._ext_index(family, dst)
        key = self.rev.get((family, proto, src, sport, ext, dport)) if ext is not None else None
        if key is not None:
            c = self.conns[key]
            if c.expires > now:
                self.hits += 1
                self._touch(c, "in", flags, now)
                return OK, (family, proto, flags, sport, c.sport, src, c.src)
            self._collect(key)
            self.expired += 1
        return self._drop(DROP_NO_NAT_ENTRY)

    def get(self, key, now):
        """The live _Conn of fwd key (family, proto, src, sport, dst, dport)."""
        c = self.conns.get(key)
        return c if c is not None and c.expires > now else None

    def gc(self, now):
        """Full sweep: collect every dead entry; returns how many."""
        dead = [k for k, c in self.conns.items() if c.expires <= now]
        for k in dead:
            self._collect(k)
        self.expired += len(dead)
        return len(dead)

    def collect(self, key, now):
        """Collect the dead entry of fwd key (family, proto, src, sport, dst,
        dport) as an incremental gc may: the real table's expiry wheel decides
        which dead entries a bounded call reaches, the model follows it."""
        c = self.conns[key]
        assert c.expires <= now, "only a dead entry may be collected"
        self._collect(key)
        self.expired += 1

    def live(self, now):
        return [c for c in self.conns.values() if c.expires > now]

    def _ipv6_held(self):
        return sum(1 for c in self.conns.values() if c.family == 6)

    def stats(self):
        return {
            "entries": len(self.conns),
            "mappings": len(self.maps),
            "ipv6_capacity": self.ipv6_capacity,
            "ipv6_entries": self._ipv6_held(),
            "ipv6_full": self.ipv6_full,
            "lookups": self.lookups,
            "hits": self.hits,
            "created": self.created,
            "expired": self.expired,
            "refused": {
                "nat_exhausted": self.drops.get(DROP_NAT_EXHAUSTED, 0),
                "nat_table_full": self.drops.get(DROP_NAT_TABLE_FULL, 0),
                "no_nat_entry": self.drops.get(DROP_NO_NAT_ENTRY, 0),
                "unsupported": self.drops.get(DROP_UNSUPPORTED, 0),
                "no_egress_ip": self.drops.get(DROP_NO_EGRESS_IP, 0),
                "pod_conn_limit": self.drops.get(DROP_POD_CONN_LIMIT, 0),
            },
            "per_source_limit": self.per_source_limit,
            "sources": len(self.by_source),
            "refused_by_source": {_ip(fam, src): n for (fam, src), n in self.refused_by_source.items()},
            "refused_other_sources": self.refused_other,
            "spill": {_ip(*self.egress[e]): {"spill_to": [_ip(*self.egress[x]) for x in self.spill.get(e, ())],
                                             "spilled_in": self.spilled_in.get(e, 0)}
                      for e in range(len(self.egress)) if self.spill.get(e) or self.spilled_in.get(e)},
        }

    # -- batches (the benchmark peer of translate_batch / reverse_batch) -----

    def translate_many(self, tuples, ext, now):
        translate = self.translate
        return [translate(t, e, now) for t, e in zip(tuples, ext)]

    def reverse_many(self, tuples, now):
        reverse = self.reverse
        return [reverse(t, now) for t in tuples]


def _ip(family, addr):
    return str(ipaddress.ip_address(addr[:4] if family == 4 else addr))


def tuples_from_array(arr):
    """Python tuples of a NAT_TUPLE_DTYPE array (outside any timed section)."""
    fam = arr["family"].tolist()
    proto = arr["proto"].tolist()
    flags = arr["tcp_flags"].tolist()
    sport = arr["sport"].tolist()
    dport = arr["dport"].tolist()
    src = [bytes(r) for r in arr["src"]]
    dst = [bytes(r) for r in arr["dst"]]
    return list(zip(fam, proto, flags, sport, dport, src, dst))
