# nat/table: NatTable, the Python class over the C table.

import ipaddress as _ipaddress
import os as _os
import threading as _threading
import time as _time
from collections import namedtuple as _namedtuple

import numpy as _np

# ---------------------------------------------------------------------------
# Python surface

NAT_TUPLE_DTYPE = _np.dtype({
    "names": ["family", "proto", "tcp_flags", "_pad", "sport", "dport", "src", "dst"],
    "formats": [_np.uint8, _np.uint8, _np.uint8, _np.uint8, "<u2", "<u2",
                (_np.uint8, 16), (_np.uint8, 16)],
    "offsets": [0, 1, 2, 3, 4, 6, 8, 24],
    "itemsize": 40,
})
assert (sizeof(nat_tuple) == 40 and sizeof(nat_entry) == 56 and sizeof(nat_mapping) == 16
        and sizeof(nat_addr6) == 32)
_NAT_ENTRY_SIZE = sizeof(nat_entry)
_NAT_ADDR6_SIZE = sizeof(nat_addr6)
POLICY_COUNTED_SLOTS = POLICY_COUNTED

NatEntry = _namedtuple(
    "NatEntry",
    "proto src sport dst dport egress_ip xport state expires_in age "
    "pkts_out pkts_in bytes_out bytes_in policy_id", defaults=(0, 0, 0, 0, 0))
NatEntry.__doc__ = ("One live connection: pod src:sport -> remote dst:dport, "
                    "SNATed to egress_ip:xport; times in seconds; packets and IP "
                    "bytes each way (since the last flow-log update record); the "
                    "policy id it was opened under (0: none).")


_NAT_PROTO_BY_NAME = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
_NAT_PROTO_NAME = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_NAT_STATE_NAME = ("free", "SYN_SENT", "ESTABLISHED", "CLOSING", "UDP", "ICMP")
_NAT_TCP_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10,
                      "U": 0x20, "E": 0x40, "C": 0x80}
_NAT_REFUSAL_REASONS = (DROP_NAT_EXHAUSTED, DROP_NAT_TABLE_FULL, DROP_NO_NAT_ENTRY,
                        DROP_UNSUPPORTED, DROP_NO_EGRESS_IP, DROP_POD_CONN_LIMIT)


def _nat_port(value, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 65535:
        raise ValueError(f"{what} {value} is out of range 0-65535")
    return value


def _nat_proto(value, family):
    if isinstance(value, str):
        p = _NAT_PROTO_BY_NAME.get(value.lower())
        if p is None:
            raise ValueError(f"proto {value!r} is not one of tcp, udp, icmp, icmpv6")
        if p == 1 and family == 6:
            p = 58
    elif isinstance(value, int) and not isinstance(value, bool):
        p = value
    else:
        raise TypeError(f"proto must be a name or a number, not {type(value).__name__}")
    if p not in _NAT_PROTO_NAME:
        raise ValueError(f"proto {value!r} is not supported (tcp, udp, icmp echo only)")
    if (p == 1 and family == 6) or (p == 58 and family == 4):
        raise ValueError(f"proto {_NAT_PROTO_NAME[p]} does not match IPv{family} addresses")
    return p


def _nat_flags(value):
    if isinstance(value, str):
        bits = 0
        for ch in value.upper():
            if ch not in _NAT_TCP_FLAG_BITS:
                raise ValueError(f"tcp_flags {value!r}: unknown flag {ch!r} (use FSRPAUEC)")
            bits |= _NAT_TCP_FLAG_BITS[ch]
        return bits
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"tcp_flags must be an int or a string like 'SA', not {type(value).__name__}")
    if not 0 <= value <= 255:
        raise ValueError(f"tcp_flags {value} is out of range 0-255")
    return value


def _nat_length(value):
    if value is None:
        return 0xFFFFFFFF           # NAT_NO_LEN: do not count
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"length must be an int, not {type(value).__name__}")
    if not 0 <= value <= 65535:
        raise ValueError(f"length {value} is out of range 0-65535")
    return value


def _nat_lens(lens, n):
    if lens is None:
        return None
    if (not isinstance(lens, _np.ndarray) or lens.dtype != _np.uint32 or lens.shape != (n,)):
        raise ValueError("lens must be a uint32 array with one length per tuple")
    return _np.ascontiguousarray(lens)


def _nat_range(value, what):
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a (low, high) pair, not {value!r}") from None
    lo = _nat_port(lo, f"{what} low")
    hi = _nat_port(hi, f"{what} high")
    if lo > hi:
        raise ValueError(f"{what} ({lo}, {hi}) is empty: low > high")
    if lo == 0:
        raise ValueError(f"{what} must not include port 0")
    return lo, hi


def nat_tuples(rows):
    """A NAT_TUPLE_DTYPE array from rows (src, sport, dst, dport, proto[, tcp_flags]).

    For building batches in tests and tools; the datapath fills the array
    from packets directly."""
    rows = list(rows)
    arr = _np.zeros(len(rows), dtype=NAT_TUPLE_DTYPE)
    for i, row in enumerate(rows):
        if not 5 <= len(row) <= 6:
            raise ValueError(f"row {i}: expected (src, sport, dst, dport, proto[, tcp_flags])")
        src, sport, dst, dport, proto = row[:5]
        fs, ps = addr_packed16(src, f"row {i} src")
        fd, pd = addr_packed16(dst, f"row {i} dst")
        if fs != fd:
            raise ValueError(f"row {i}: src and dst are of different address families")
        arr[i] = (fs, _nat_proto(proto, fs), _nat_flags(row[5] if len(row) == 6 else 0), 0,
                  _nat_port(sport, f"row {i} sport"), _nat_port(dport, f"row {i} dport"),
                  _np.frombuffer(ps, _np.uint8), _np.frombuffer(pd, _np.uint8))
    return arr


def _nat_fmt(family, packed, port):
    ip = _ipaddress.ip_address(bytes(packed[:4] if family == 4 else packed[:16]))
    return f"{ip}:{port}" if family == 4 else f"[{ip}]:{port}"


cdef class NatTable:
    """SNAT / connection table of a gateway or a masquerading node.

    NatTable(egress_ips=(), capacity=65536, port_range=(32768, 65535),
             port_ranges=None, timeouts=None, clock=time.monotonic, seed=None,
             per_source_limit=None, ipv6_capacity=None)

    `egress_ips` are the external addresses flows may be translated to (more
    with add_egress_ip); `port_range` applies to every (egress IP, protocol)
    unless `port_ranges` ({"tcp"|"udp"|"icmp": (lo, hi)}) or add_egress_ip say
    otherwise.  `timeouts` overrides DEFAULT_TIMEOUTS (seconds).  `clock()`
    returns monotonic seconds; every method also takes `now=` (seconds).
    `capacity` (at most 268,435,454: entries are indexed in 28 bits) costs
    about 90 bytes per connection (memory_bytes: the 56-byte entry, its
    16-byte mapping and the three indexes), backed by the kernel only as
    connections use it.  An IPv6 connection's addresses live out of line, in
    a pool of `ipv6_capacity` records (48 bytes each with its mapping's
    address; default: the capacity up to 65,536, then capacity / 16, at
    least 65,536): a new IPv6 connection beyond it is refused as
    nat_table_full (counted in stats["ipv6_full"]).  `per_source_limit` N: a source (pod) address
    holds at most N connections; more are refused ("pod_conn_limit", counted
    per source in stats); about 30 bytes more per connection of capacity.
    `state_path`: keep the connections (the entries) in that file, mapped
    shared, so they outlive the process (what is derived from them stays in
    process memory and is rebuilt): a table made later on the same path
    (same boot, same capacity) adopts them, checking each (see `state`); a
    file it cannot use is set aside as PATH.rejected and the table starts
    empty.  The file is locked while the table lives.
    """

    DEFAULT_TIMEOUTS = {"tcp_syn": 60.0, "tcp_established": 21600.0,
                        "tcp_closing": 10.0, "udp": 300.0, "icmp": 60.0}

    def __cinit__(self, *args, **kwargs):
        self.t = NULL

    def __init__(self, egress_ips=(), *, capacity=65536, port_range=(32768, 65535),
                 port_ranges=None, timeouts=None, clock=_time.monotonic, seed=None,
                 per_source_limit=None, state_path=None, ipv6_capacity=None):
        cdef nat_table* t
        cdef uint32_t i, cap
        cdef uint64_t nslots
        cdef list adopt = None
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        if not 1 <= capacity <= NAT_MAX_CAPACITY:
            raise ValueError(f"capacity {capacity} is out of range 1-{NAT_MAX_CAPACITY} "
                             f"(connections are indexed in 28 bits)")
        if per_source_limit is not None:
            if isinstance(per_source_limit, bool) or not isinstance(per_source_limit, int):
                raise TypeError(f"per_source_limit must be an int or None, "
                                f"not {type(per_source_limit).__name__}")
            if not 1 <= per_source_limit <= capacity:
                raise ValueError(f"per_source_limit {per_source_limit} is out of range "
                                 f"1-{capacity} (the capacity)")
        if ipv6_capacity is None:
            ipv6_capacity = _nat_ipv6_capacity(capacity)
        elif isinstance(ipv6_capacity, bool) or not isinstance(ipv6_capacity, int):
            raise TypeError(f"ipv6_capacity must be an int or None, not {type(ipv6_capacity).__name__}")
        elif not 0 <= ipv6_capacity <= capacity:
            raise ValueError(f"ipv6_capacity {ipv6_capacity} is out of range 0-{capacity} (the capacity)")
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        default = _nat_range(port_range, "port_range")
        ranges = {"tcp": default, "udp": default, "icmp": default}
        for name, rng in (port_ranges or {}).items():
            if name not in ranges:
                raise ValueError(f"port_ranges key {name!r} is not one of tcp, udp, icmp")
            ranges[name] = _nat_range(rng, f"port_ranges[{name!r}]")
        tmo = dict(self.DEFAULT_TIMEOUTS)
        for name, val in (timeouts or {}).items():
            if name not in tmo:
                raise ValueError(f"timeouts key {name!r} is not one of {sorted(tmo)}")
            if (isinstance(val, bool) or not isinstance(val, (int, float))
                    or not 0 < val <= 10 * 365 * 86400):
                raise ValueError(f"timeouts[{name!r}] must be a positive number of seconds "
                                 f"(at most 10 years)")
            tmo[name] = float(val)
        if seed is None:
            seed = int.from_bytes(_os.urandom(8), "little")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError("seed must be an int")
        if self.t != NULL:
            raise RuntimeError("NatTable.__init__ called twice")
        cap = capacity
        nslots = _nat_index_slots(cap)
        t = <nat_table*>calloc(1, sizeof(nat_table))
        if t == NULL:
            raise no_memory("NatTable")
        self.t = t
        t.pol = <nat_policy_conns*>calloc(POLICY_SLOTS, sizeof(nat_policy_conns))
        if t.pol == NULL:
            raise no_memory("NatTable")
        t.capacity = cap
        t.map_capacity = cap
        t.a6_capacity = ipv6_capacity
        t.a6_free_head = t.m6_free_head = NAT_NONE
        _nat_index_init(&t.fwd, nslots, cap)
        _nat_index_init(&t.rev, nslots, cap)
        _nat_index_init(&t.map, _nat_index_slots(t.map_capacity), t.map_capacity)
        t.src_limit = per_source_limit or 0
        s = seed & 0xffffffffffffffff
        t.seed = (s * 0xff51afd7ed558ccd + 0x632be59bd9b4e5b1) & 0xffffffffffffffff
        t.rng = _nat_rng_seed(s)
        t.timeout[NAT_STATE_SYN_SENT] = <uint64_t>round(tmo["tcp_syn"] * 1e9)
        t.timeout[NAT_STATE_ESTABLISHED] = <uint64_t>round(tmo["tcp_established"] * 1e9)
        t.timeout[NAT_STATE_CLOSING] = <uint64_t>round(tmo["tcp_closing"] * 1e9)
        t.timeout[NAT_STATE_UDP] = <uint64_t>round(tmo["udp"] * 1e9)
        t.timeout[NAT_STATE_ICMP] = <uint64_t>round(tmo["icmp"] * 1e9)
        self._timeouts = tmo
        self._ranges = ranges
        self._clock = clock
        self._lock = _threading.Lock()
        self._ext_names = []
        self._ext_index = {}
        # lazily backed: nothing is touched here (entries and mappings are
        # handed out from index 0 up, then from their free lists).  With a
        # state file the entries are the file's (nat/state.pyx); everything
        # derived from them stays in process memory, with huge pages
        if state_path is not None:
            adopt = self._state_map(state_path, cap, ranges, seed, self._now(None))
        else:
            t.entries = <nat_entry*>egc_alloc_big(cap * sizeof(nat_entry), 1)
            t.a6 = <nat_addr6*>egc_alloc_big(max(t.a6_capacity, 1) * sizeof(nat_addr6), 1)
        t.m6 = <uint8_t*>egc_alloc_big(max(t.a6_capacity, 1) * 16, 1)
        t.mappings = <nat_mapping*>egc_alloc_big(t.map_capacity * sizeof(nat_mapping), 1)
        t.fwd.slots = <uint32_t*>egc_alloc_big(nslots * 4, 1)
        t.rev.slots = <uint32_t*>egc_alloc_big(nslots * 4, 1)
        t.map.slots = <uint32_t*>egc_alloc_big(t.map.size * 4, 1)
        t.wheel = <uint32_t*>calloc(2 * NAT_WHEEL_SLOTS, sizeof(uint32_t))
        if per_source_limit is not None:
            t.src_size = _nat_index_slots(cap)
            t.src = <nat_src*>egc_alloc_big(t.src_size * sizeof(nat_src), 0)
        if (t.entries == NULL or t.mappings == NULL or t.a6 == NULL or t.m6 == NULL or t.fwd.slots == NULL
                or t.rev.slots == NULL or t.map.slots == NULL or t.wheel == NULL
                or (per_source_limit is not None and t.src == NULL)):
            raise no_memory(f"NatTable of capacity {capacity}")
        for i in range(NAT_WHEEL_SLOTS):
            t.wheel[2 * i] = t.wheel[2 * i + 1] = cap + i     # empty: the head itself
        t.wheel_cur = NAT_WHEEL_UNSET
        t.free_head = NAT_NONE
        t.map_free_head = NAT_NONE
        if state_path is not None:
            if adopt is not None:
                self._state_adopt(adopt, self._now(None))
            self._state_write_config(ranges)
        for ip in egress_ips:
            self.add_egress_ip(ip)

    def __dealloc__(self):
        cdef uint32_t i
        cdef int k
        if self.t == NULL:
            return
        cdef nat_table* t = self.t
        if self._smap != NULL or self._state is not None:
            # the entries live in the file: unmap them (the file stays for the next
            # process).  A C test: a cycle's clear may have set _state to None.
            if self._smap != NULL:
                _nat_state_munmap(self._smap, self._smap_size)
                self._smap = NULL
            if self._state is not None:
                self._state.close()
        else:
            egc_free_big(t.entries, t.capacity * sizeof(nat_entry))
            egc_free_big(t.a6, max(t.a6_capacity, 1) * sizeof(nat_addr6))
        egc_free_big(t.m6, max(t.a6_capacity, 1) * 16)
        for i in range(t.n_ext):
            for k in range(NAT_NPOOLS):
                free(t.ext[i].pools[k])
        egc_free_big(t.mappings, t.map_capacity * sizeof(nat_mapping))
        egc_free_big(t.fwd.slots, t.fwd.size * 4)
        egc_free_big(t.rev.slots, t.rev.size * 4)
        egc_free_big(t.map.slots, t.map.size * 4)
        egc_free_big(t.src, t.src_size * sizeof(nat_src))
        free(t.wheel)
        free(t.pol)
        free(t)
        self.t = NULL

    # -- the state file (nat/state.pyx) ---------------------------------------

    cdef list _state_map(self, object path, uint32_t cap, object ranges, uint64_t seed, uint64_t now):
        """Open, check and map the state file; point the table's arrays into
        it.  Returns the file's egress IP records to adopt, or None when the
        table starts empty (no file, or a refused one: state says why)."""
        cdef nat_table* t = self.t
        cdef nat_state_hdr hdr
        cdef nat_state_hdr* h
        st = _NatStateFile(path)
        regions, size = _nat_state_regions(cap, t.a6_capacity)
        st.regions = regions
        self._state = st
        have = st.open()
        seal = _nat_seal_take(st)          # nat/seal.pyx: the file changes from now on
        reason = None
        exts = None
        if have:
            raw = _st_os.pread(st.fd, NAT_STATE_HDR_SIZE, 0)
            if len(raw) < NAT_STATE_HDR_SIZE:
                reason = f"truncated: {have} bytes, shorter than the {NAT_STATE_HDR_SIZE}-byte header"
            else:
                memcpy(&hdr, <const char*>raw, sizeof(nat_state_hdr))
                reason = _nat_state_check(&hdr, have, cap, t.a6_capacity, size, _nat_boot_id(), now)
            if reason is None:
                rawx = _st_os.pread(st.fd, hdr.n_ext * sizeof(nat_state_ext), regions["ext"][0])
                reason = _nat_state_ext_check(<const nat_state_ext*><const char*>rawx, hdr.n_ext)
            if reason is None and hdr.version == 3:
                # main's format (80-byte entries): read its entries, then a fresh
                # file; _state_adopt inserts them one by one (its seal, of the old
                # layout, is not checked: every entry is, as an unsealed file's)
                reason = _nat_state_ranges_check(raw, ranges)
                if reason is None:
                    st.convert = _nat_state_read_v3(st, cap)
                    st.set_aside(".format3")
                    st.seal = None
                    st.seal_note = ""
            elif reason is None:
                reason = _nat_state_ranges_check(raw, ranges) or _nat_seal_check(st, seal, raw, rawx, cap)
            if reason is not None:
                st.reject(reason)
            else:
                st.old_timeout = [hdr.timeout[k] for k in range(NAT_NSTATES)]
                exts = []
                for i in range(hdr.n_ext):
                    rec = rawx[i * sizeof(nat_state_ext):(i + 1) * sizeof(nat_state_ext)]
                    exts.append(rec)
        if exts is None or st.convert is not None:
            st.fresh(size)
        self._smap = _nat_state_mmap(st.fd, size, st.path)
        self._smap_size = size
        t.entries = <nat_entry*>_st_at(self._smap, regions["entries"])
        t.a6 = <nat_addr6*>_st_at(self._smap, regions["a6"])
        h = <nat_state_hdr*>self._smap
        if exts is None or st.convert is not None:
            # a new header: the magic last, so a kill while writing leaves no valid file
            h.version = NAT_STATE_VERSION
            h.hdr_size = NAT_STATE_HDR_SIZE
            h.layout = NAT_STATE_LAYOUT
            h.file_size = size
            boot = _nat_boot_id()
            memcpy(h.boot_id, <const char*>boot, len(boot))
            h.created_unix_ns = _time.time_ns()
            h.created_mono_ns = now
            h.capacity = cap
            h.a6_capacity = t.a6_capacity
            h.index_slots = h.src_slots = _nat_index_slots(cap)
            if st.convert is not None:     # the converted file's egress IP records, as they were
                memcpy(_st_at(self._smap, regions["ext"]), <const char*>rawx, len(rawx))
                h.n_ext = hdr.n_ext
            magic = NAT_STATE_MAGIC
            memcpy(h.magic, <const char*>magic, 8)
            if st.status["reason"] is None and st.convert is None:
                st.status["message"] = f"NAT state file {st.path}: new, the table starts empty"
                _st_log.info("%s", st.status["message"])
        return exts

    cdef int _state_adopt(self, list exts, uint64_t now) except -1:
        """Take over the file's connections: its egress IPs at their indexes
        (port pools in memory), then every derived structure, empty in process
        memory, built from the entries (checked one by one; nat_state_rebuild)."""
        cdef nat_table* t = self.t
        cdef nat_state_ext x
        cdef nat_pool* pool
        cdef uint64_t maxt[6]
        cdef uint64_t counts[5]
        cdef uint32_t i, scan
        cdef int k
        st = self._state
        started = _time.perf_counter()
        off, nbytes = st.regions["entries"]
        scan = min(t.capacity, (_nat_state_data_end(st.fd, off, off + nbytes) - off + sizeof(nat_entry) - 1)
                   // sizeof(nat_entry))
        _nat_state_populate(self._smap, off, <uint64_t>scan * sizeof(nat_entry))
        for i, rec in enumerate(exts):
            memcpy(&x, <const char*>rec, sizeof(nat_state_ext))
            t.ext[i].family = x.family
            memcpy(t.ext[i].addr, x.addr, 16)
            t.n_ext = i + 1                 # its pools are freed with the table from here on
            for k in range(NAT_NPOOLS):
                pool = <nat_pool*>calloc(1, sizeof(nat_pool))
                if pool == NULL:
                    raise no_memory("egress IP port pools")
                _nat_pool_init(pool, x.lo[k], x.hi[k])
                t.ext[i].pools[k] = pool
            name = _nat_ip_str(x.family, x.addr)
            self._ext_names.append(name)
            self._ext_index[name] = i
        for k in range(NAT_NSTATES):
            maxt[k] = max(st.old_timeout[k], t.timeout[k]) + 1000000000
        corrupt = nat_seal_apply(t, st, scan)     # a sealed file: groups failing their checksum dropped
        memset(counts, 0, sizeof(counts))
        off, nbytes = st.regions["a6"]
        _nat_state_populate(self._smap, off, nbytes)
        t.a6_claim = <uint64_t*>calloc(t.a6_capacity // 64 + 1, 8)
        if t.a6_claim == NULL:
            raise no_memory("NAT state adoption")
        with nogil:
            nat_state_rebuild(t, now, maxt, scan, counts)
        free(t.a6_claim)
        t.a6_claim = NULL
        if st.convert is not None:
            return self._state_convert3(st, maxt, now, started)
        (<nat_state_hdr*>self._smap).adopted_count += 1
        ms = (_time.perf_counter() - started) * 1e3
        status = st.status
        status.update(adopted=True, connections=counts[NAT_ADOPT_OK], invalid=counts[NAT_ADOPT_INVALID],
                      expired=counts[NAT_ADOPT_EXPIRED], adopt_ms=ms)
        status["message"] = (f"NAT state file {st.path}: adopted {counts[NAT_ADOPT_OK]} connections "
                             f"in {ms:.1f} ms ({counts[NAT_ADOPT_INVALID]} invalid and "
                             f"{counts[NAT_ADOPT_EXPIRED]} expired dropped{st.seal_note})")
        (_st_log.warning if counts[NAT_ADOPT_INVALID] or corrupt else _st_log.info)("%s", status["message"])
        return 0

    cdef int _state_convert3(self, object st, const uint64_t* maxt, uint64_t now, object started) except -1:
        """Insert a format 3 file's connections (read by _state_map) into the
        fresh file; report converted and dropped ones; remove the old file."""
        cdef nat_table* t = self.t
        cdef uint64_t counts[5]
        cdef const unsigned char[:] raw = st.convert
        cdef uint64_t n = len(st.convert) // sizeof(nat_entry_v3)
        cdef uint64_t full0 = t.a6_full
        cdef const nat_entry_v3* old = <const nat_entry_v3*>&raw[0] if n else NULL
        memset(counts, 0, sizeof(counts))
        with nogil:
            nat_state_convert3(t, old, n, now, maxt, counts)
        ipv6_full = t.a6_full - full0
        t.a6_full = full0
        st.convert = None
        try:
            _st_os.unlink(st.path + ".format3")
        except OSError:
            pass
        (<nat_state_hdr*>self._smap).adopted_count += 1
        ms = (_time.perf_counter() - started) * 1e3
        status = st.status
        status.update(adopted=True, converted_from=3, connections=counts[NAT_ADOPT_OK],
                      invalid=counts[NAT_ADOPT_INVALID], expired=counts[NAT_ADOPT_EXPIRED],
                      full=counts[NAT_ADOPT_FULL], ipv6_full=ipv6_full, adopt_ms=ms)
        status["message"] = (f"NAT state file {st.path}: format 3 (80-byte entries) converted to format "
                             f"{NAT_STATE_VERSION}: {counts[NAT_ADOPT_OK]} connections in {ms:.1f} ms "
                             f"({counts[NAT_ADOPT_INVALID]} invalid, {counts[NAT_ADOPT_EXPIRED]} expired and "
                             f"{counts[NAT_ADOPT_FULL]} beyond the table, {ipv6_full} of them IPv6 beyond "
                             f"its IPv6 pool, dropped)")
        (_st_log.warning if counts[NAT_ADOPT_INVALID] or counts[NAT_ADOPT_FULL] else _st_log.info)(
            "%s", status["message"])
        return 0

    cdef void _state_write_config(self, object ranges):
        """The configuration in force, into the header (the next process checks against it)."""
        cdef nat_state_hdr* h = <nat_state_hdr*>self._smap
        cdef int k
        h.seed = self.t.seed
        for k in range(NAT_NSTATES):
            h.timeout[k] = self.t.timeout[k]
        h.src_limit = self.t.src_limit
        for k, key in enumerate(("tcp", "udp", "icmp")):
            h.port_lo[k] = ranges[key][0]
            h.port_hi[k] = ranges[key][1]

    @property
    def state(self):
        """How the state file was taken (None without state_path): path,
        adopted (bool), reason (why a file was refused, or None), message
        (one line saying what happened), connections adopted, invalid and
        expired ones dropped, adopt_ms."""
        return None if self._state is None else dict(self._state.status)

    def insert(self, src, sport, dst, dport, proto="tcp", *, egress_ip, xport, state=None, expires_in,
               now=None, policy_id=0):
        """Insert one connection made elsewhere (a replicated record): checked
        and linked as an adopted entry is (nat_state_insert).  `state` is a
        state name (default ESTABLISHED for TCP, else the protocol's), times
        in seconds, `policy_id` the policy it counts to (0: none).  Raises
        ValueError naming why it was not inserted."""
        cdef nat_tuple k
        cdef nat_entry e
        self._tuple(&k, src, sport, dst, dport, proto, 0)
        cdef int ext = self._egress(egress_ip, k.family)
        cdef uint64_t t_ns = self._now(now)
        cdef int rc
        if state is None:
            state = {6: "ESTABLISHED", 17: "UDP"}.get(k.proto, "ICMP")
        if state not in _NAT_STATE_NAME[1:]:
            raise ValueError(f"state {state!r} is not one of {', '.join(_NAT_STATE_NAME[1:])}")
        if (isinstance(expires_in, bool) or not isinstance(expires_in, (int, float))
                or not 0 < expires_in <= 10 * 365 * 86400):
            raise ValueError(f"expires_in {expires_in!r} must be a positive number of seconds")
        memset(&e, 0, sizeof(nat_entry))
        e.family = k.family
        e.proto = k.proto
        e.sport = k.sport
        e.dport = 0 if _nat_is_icmp(k.proto) else k.dport
        e.xport = _nat_port(xport, "xport")
        e.ext = ext
        e.state = _NAT_STATE_NAME.index(state)
        e.expires = t_ns + <uint64_t>round(expires_in * 1e9)
        e.created_ms = _nat_ms(t_ns)
        if isinstance(policy_id, bool) or not isinstance(policy_id, int) or not 0 <= policy_id <= 0xfffe:
            raise ValueError(f"policy_id {policy_id!r} must be an int in 0..65534")
        _nat_e_set_mapping(&e, 0, policy_id)
        with self._lock:
            rc = nat_state_insert(self.t, &e, k.src, k.dst, t_ns)
        if rc != NAT_ADOPT_OK:
            why = {NAT_ADOPT_FULL: "the table is full", NAT_ADOPT_EXPIRED: "it has expired"}.get(
                rc, "it is invalid here (state, port range, expiry beyond its timeout, or a port or flow "
                    "already taken)")
            raise ValueError(f"connection {_nat_fmt(k.family, k.src[:16], k.sport)} -> "
                             f"{_nat_fmt(k.family, k.dst[:16], k.dport)} not inserted: {why}")
        return True

    def seal_state(self):
        """Seal the state file for the next table (nat/seal.pyx): checksums of
        its header, egress IP records and entries, in PATH.seal.  Call once
        nothing writes the table any more (a clean stop that keeps the state);
        a dict (path, entries, groups, ms)."""
        return nat_seal_write(self)

    def discard_state(self):
        """Remove the state file (a clean stop that keeps no state): the table
        goes on working from its mapping until it is freed."""
        if self._state is not None:
            self._state.discard()

    # -- configuration -------------------------------------------------------

    def add_egress_ip(self, ip, port_range=None, *, tcp=None, udp=None, icmp=None):
        """Add an egress IP and return its index (the `ext` of the C API).

        `port_range` overrides the table's range for all protocols; `tcp`,
        `udp`, `icmp` override it per protocol.  Adding a known IP returns its
        index unchanged."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        family, packed = addr_packed16(ip, "egress IP")
        name = str(_ipaddress.ip_address(packed[:4] if family == 4 else packed))
        if name in self._ext_index:
            return self._ext_index[name]
        ranges = dict(self._ranges)
        if port_range is not None:
            r = _nat_range(port_range, "port_range")
            ranges = {"tcp": r, "udp": r, "icmp": r}
        for key, val in (("tcp", tcp), ("udp", udp), ("icmp", icmp)):
            if val is not None:
                ranges[key] = _nat_range(val, key)
        cdef nat_table* t = self.t
        if t.n_ext >= NAT_MAX_EXT:
            raise ValueError(f"a table holds at most {NAT_MAX_EXT} egress IPs")
        cdef uint32_t i = t.n_ext
        cdef int k
        cdef nat_pool* pools[3]
        cdef nat_state_ext* rec = NULL
        for k, key in enumerate(("tcp", "udp", "icmp")):
            pools[k] = <nat_pool*>calloc(1, sizeof(nat_pool))
            if pools[k] == NULL:
                while k > 0:
                    k -= 1
                    free(pools[k])
                raise no_memory("egress IP port pools")
            _nat_pool_init(pools[k], ranges[key][0], ranges[key][1])
        if self._smap != NULL:          # the record first, then the count (a kill between leaves no half IP)
            rec = <nat_state_ext*>_st_at(self._smap, self._state.regions["ext"]) + i
            memset(rec, 0, sizeof(nat_state_ext))
            rec.family = family
            memcpy(rec.addr, <const char*>packed, 16)
            for k, key in enumerate(("tcp", "udp", "icmp")):
                rec.lo[k] = ranges[key][0]
                rec.hi[k] = ranges[key][1]
        with self._lock:
            t.ext[i].family = family
            memcpy(t.ext[i].addr, <const char*>packed, 16)
            for k in range(3):
                t.ext[i].pools[k] = pools[k]
            t.n_ext = i + 1
            if rec != NULL:
                (<nat_state_hdr*>self._smap).n_ext = i + 1
        self._ext_names.append(name)
        self._ext_index[name] = i
        return i

    def set_spill(self, chains):
        """The spill chains, replacing all: {egress IP: [egress IPs, ...]}.

        A new connection through an egress IP with no free port for its
        protocol takes its port from the first IP of the chain with one
        (refused as nat_exhausted only when every one is full); an endpoint
        (pod address, port) with a mapping on any IP of the chain keeps it
        (endpoint-independent mapping).  Each IP must be configured here,
        of the same family, at most NAT_MAX_SPILL (8) per IP, no repeats nor
        the IP itself.  Connections already made keep their IP.  Checked
        whole first: a bad chain changes nothing."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        if not hasattr(chains, "items"):
            raise TypeError(f"chains must be a mapping of egress IP to a list of egress IPs, "
                            f"not {type(chains).__name__}")
        plan = {}
        for ip, spill in chains.items():
            fam, _ = addr_packed16(ip, "spill chain egress IP")
            i = self._egress(ip, fam)
            if isinstance(spill, (str, bytes)):
                raise TypeError(f"spill chain of {ip}: must be a list of egress IPs, not a string")
            idx = []
            for j, s in enumerate(spill):
                sfam, _ = addr_packed16(s, f"spill chain of {ip}[{j}]")
                if sfam != fam:
                    raise ValueError(f"spill chain of {ip}[{j}]: {s} is not IPv{fam} like {ip}")
                k = self._egress(s, sfam)
                if k == i or k in idx:
                    raise ValueError(f"spill chain of {ip}[{j}]: {s} is repeated")
                idx.append(k)
            if len(idx) > NAT_MAX_SPILL:
                raise ValueError(f"spill chain of {ip}: {len(idx)} egress IPs, at most {NAT_MAX_SPILL}")
            if i in plan:
                raise ValueError(f"spill chain of {ip}: given twice")
            plan[i] = idx
        cdef uint32_t e
        cdef int n
        with self._lock:
            for e in range(self.t.n_ext):
                idx = plan.get(e, ())
                for n, k in enumerate(idx):
                    self.t.ext[e].spill[n] = k
                self.t.ext[e].nspill = len(idx)

    @property
    def spill(self):
        """{egress IP: {"spill_to": [egress IPs], "spilled_in": mappings placed
        on it because an earlier IP was full}} for every IP with either."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        cdef nat_ext* x
        out = {}
        with self._lock:
            for i, name in enumerate(self._ext_names):
                x = &self.t.ext[i]
                if x.nspill or x.spilled_in:
                    out[name] = {"spill_to": [self._ext_names[x.spill[k]] for k in range(x.nspill)],
                                 "spilled_in": x.spilled_in}
        return out

    @property
    def egress_ips(self):
        """Egress IPs in index order."""
        return list(self._ext_names)

    @property
    def capacity(self):
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        return self.t.capacity

    @property
    def timeouts(self):
        """Timeouts in seconds by state."""
        return dict(self._timeouts)

    @property
    def memory_bytes(self):
        """Bytes allocated: entries, mappings, the IPv6 address pools, the
        three indexes, the expiry wheel, the per-source table and the port pools.  The large arrays are
        backed by the kernel as they are touched: resident memory starts near
        zero and grows with use (the indexes are touched where hashes land)."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        cdef nat_table* t = self.t
        return (sizeof(nat_table) + POLICY_SLOTS * sizeof(nat_policy_conns)
                + t.capacity * sizeof(nat_entry) + t.map_capacity * sizeof(nat_mapping)
                + max(t.a6_capacity, 1) * (sizeof(nat_addr6) + 16)
                + 4 * (t.fwd.size + t.rev.size + t.map.size)
                + 8 * NAT_WHEEL_SLOTS + t.src_size * sizeof(nat_src)
                + t.n_ext * NAT_NPOOLS * sizeof(nat_pool))

    @property
    def per_source_limit(self):
        """Connections one source address may hold (None: no limit)."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        return self.t.src_limit or None

    def __len__(self):
        """Entries held, including dead ones not collected yet."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        return self.t.used

    # -- helpers -------------------------------------------------------------

    cdef uint64_t _now(self, now) except? 0:
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        if now is None:
            now = self._clock()
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not now >= 0:
            raise ValueError(f"now must be a non-negative number of seconds, not {now!r}")
        return <uint64_t>round(now * 1e9)

    cdef int _egress(self, egress_ip, int family) except -1:
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        if egress_ip is None:
            found = [i for i in range(len(self._ext_names))
                     if self.t.ext[i].family == family]
            if len(found) != 1:
                raise ValueError(f"egress_ip is required: the table has {len(found)} "
                                 f"IPv{family} egress IPs")
            return found[0]
        if isinstance(egress_ip, int) and not isinstance(egress_ip, bool):
            if not 0 <= egress_ip < self.t.n_ext:
                raise ValueError(f"egress IP index {egress_ip} is not configured")
            idx = egress_ip
        else:
            fam, packed = addr_packed16(egress_ip, "egress_ip")
            name = str(_ipaddress.ip_address(packed[:4] if fam == 4 else packed))
            if name not in self._ext_index:
                raise ValueError(f"egress_ip {name} is not configured in this table")
            idx = self._ext_index[name]
        if self.t.ext[idx].family != family:
            raise ValueError(f"egress_ip {self._ext_names[idx]} is not IPv{family} "
                             f"like the flow")
        return idx

    cdef void _tuple(self, nat_tuple* k, src, sport, dst, dport, proto, tcp_flags) except *:
        fs, ps = addr_packed16(src, "src")
        fd, pd = addr_packed16(dst, "dst")
        if fs != fd:
            raise ValueError(f"src {src} and dst {dst} are of different address families")
        memset(k, 0, sizeof(nat_tuple))
        k.family = fs
        k.proto = _nat_proto(proto, fs)
        k.tcp_flags = _nat_flags(tcp_flags)
        k.sport = _nat_port(sport, "sport")
        k.dport = _nat_port(dport, "dport")
        memcpy(k.src, <const char*>ps, 16)
        memcpy(k.dst, <const char*>pd, 16)

    # -- per-flow calls --------------------------------------------------------

    def translate(self, src, sport, dst, dport, proto="tcp", *, egress_ip=None,
                  tcp_flags=0, now=None, length=None):
        """SNAT an outgoing flow; returns (egress_ip, xport).

        Known flows keep their mapping (and egress IP); new flows get one.
        `length` (IP bytes) counts the packet in the connection's counters.
        Raises NatRefused (reason "nat_exhausted" or "nat_table_full")."""
        cdef uint32_t ln = _nat_length(length)
        cdef nat_tuple k, out
        self._tuple(&k, src, sport, dst, dport, proto, tcp_flags)
        cdef int ext = self._egress(egress_ip, k.family)
        cdef uint64_t t_ns = self._now(now)
        cdef int rc
        with self._lock:
            rc = nat_translate_out_len(self.t, &k, ext, t_ns, &out, ln)
        if rc:
            raise nat_refused(rc)
        return self._ext_names[self._ext_of(&out)], out.sport

    cdef int _ext_of(self, nat_tuple* out) noexcept:
        return nat_ext_find(self.t, out.family, out.src)

    def reverse(self, src, sport, dst, dport, proto="tcp", *, tcp_flags=0, now=None,
                refresh=True, length=None):
        """Translate a reply remote src:sport -> egress dst:dport back.

        Returns (pod_ip, pod_port), or None when no live connection matches
        (the reply is unsolicited; counted as no_nat_entry).  refresh=False
        leaves the entry untouched (a tuple quoted in an ICMP error).  `length`
        (IP bytes) counts the packet in the connection's counters."""
        cdef uint32_t ln = _nat_length(length)
        cdef nat_tuple k, out
        self._tuple(&k, src, sport, dst, dport, proto, tcp_flags)
        cdef uint64_t t_ns = self._now(now)
        cdef int rc
        with self._lock:
            if refresh:
                rc = nat_translate_in_len(self.t, &k, t_ns, &out, ln)
            else:
                rc = nat_peek_in(self.t, &k, t_ns, &out)
        if rc:
            return None
        return str(_ipaddress.ip_address((<char*>out.dst)[:4 if out.family == 4 else 16])), out.dport

    def update_tcp(self, src, sport, dst, dport, tcp_flags, *, direction="out", now=None):
        """Apply a TCP packet's flags to its connection without translating it.

        The tuple is the original one for direction "out", the reply
        (remote -> egress IP:xport) for "in".  Returns False if no live
        connection matches."""
        if direction not in ("out", "in"):
            raise ValueError(f"direction must be 'out' or 'in', not {direction!r}")
        cdef nat_tuple k
        self._tuple(&k, src, sport, dst, dport, "tcp", tcp_flags)
        cdef uint64_t t_ns = self._now(now)
        cdef int rc
        with self._lock:
            rc = nat_update_tcp(self.t, &k, NAT_DIR_OUT if direction == "out" else NAT_DIR_IN,
                                t_ns)
        return rc == 0

    def get(self, src, sport, dst, dport, proto="tcp", *, now=None):
        """The live entry of an original tuple, or None (no refresh, no counters)."""
        cdef nat_tuple k
        self._tuple(&k, src, sport, dst, dport, proto, 0)
        cdef uint64_t t_ns = self._now(now)
        cdef uint16_t dp = 0 if _nat_is_icmp(k.proto) else k.dport
        cdef uint32_t idx
        with self._lock:
            idx = _nat_find_fwd(self.t, _nat_hash_fwd(self.t.seed, k.family, k.proto, k.sport,
                                                      dp, k.src, k.dst),
                                k.family, k.proto, k.sport, dp, k.src, k.dst)
            if idx == NAT_NONE or self.t.entries[idx].expires <= t_ns:
                return None
            return self._entry(idx, t_ns)

    cdef object _entry(self, uint32_t idx, uint64_t now):
        cdef nat_entry* e = &self.t.entries[idx]
        cdef uint8_t sbuf[16]
        cdef uint8_t dbuf[16]
        fam = e.family
        n = 4 if fam == 4 else 16
        return NatEntry(
            _NAT_PROTO_NAME[e.proto],
            str(_ipaddress.ip_address((<const char*>_nat_e_src(self.t, e, sbuf))[:n])), e.sport,
            str(_ipaddress.ip_address((<const char*>_nat_e_dst(self.t, e, dbuf))[:n])), e.dport,
            self._ext_names[e.ext], e.xport, _NAT_STATE_NAME[e.state],
            (e.expires - now) / 1e9, <uint32_t>(_nat_ms(now) - e.created_ms) / 1e3,
            e.npkts[0], e.npkts[1], e.nbytes[0], e.nbytes[1], _nat_e_policy(e))

    def entries(self, now=None):
        """Iterate over live connections (the data of a `nat list` view)."""
        cdef uint64_t t_ns = self._now(now)
        cdef uint32_t i
        for i in range(self.t.entries_hwm):
            if self.t.entries[i].state != NAT_STATE_FREE and self.t.entries[i].expires > t_ns:
                yield self._entry(i, t_ns)

    def __iter__(self):
        return self.entries()

    def nat_list(self, now=None):
        """Text like `cilium-dbg bpf nat list`: an OUT and an IN line per connection."""
        lines = []
        for e in self.entries(now):
            fam = 6 if ":" in e.src else 4
            pod = _nat_fmt(fam, addr_packed16(e.src, "")[1], e.sport)
            remote = _nat_fmt(fam, addr_packed16(e.dst, "")[1], e.dport)
            egress = _nat_fmt(fam, addr_packed16(e.egress_ip, "")[1], e.xport)
            tail = f"Created={int(e.age)}sec ago Expires={int(e.expires_in)}sec State={e.state}"
            p = e.proto.upper()
            lines.append(f"{p} OUT {pod} -> {remote} XLATE_SRC {egress} {tail}")
            lines.append(f"{p} IN {remote} -> {egress} XLATE_DST {pod} {tail}")
        return "\n".join(lines)

    def gc(self, max_scan=None, *, now=None):
        """Collect dead entries: a full sweep (max_scan None), or the expiry
        wheel's due work with at most `max_scan` entries examined (bounded
        work for a datapath tick; what is left waits for the next call).
        Returns the number collected."""
        cdef uint64_t t_ns = self._now(now)
        cdef uint32_t n, got
        cdef bint sweep = max_scan is None
        if not sweep:
            if isinstance(max_scan, bool) or not isinstance(max_scan, int) or max_scan < 0:
                raise ValueError(f"max_scan must be a non-negative int, not {max_scan!r}")
            n = min(max_scan, 0xffffffff)
        with self._lock:
            with nogil:
                got = nat_gc_sweep(self.t, t_ns) if sweep else nat_gc(self.t, t_ns, n)
        return got

    def port_usage(self):
        """{egress_ip: {"tcp"|"udp"|"icmp": (ports in use, ports in the range)}}:
        how close each egress IP is to exhaustion (for metrics)."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        cdef nat_pool* p
        out = {}
        with self._lock:
            for i, name in enumerate(self._ext_names):
                d = {}
                for k, proto in enumerate(("tcp", "udp", "icmp")):
                    p = self.t.ext[i].pools[k]
                    d[proto] = (p.used, p.hi - p.lo + 1)
                out[name] = d
        return out

    def policy_connections(self):
        """{slot: (opened, live)} of the policy slots with connections: what
        the datapath's per-policy counters take from the NAT table.  Slot N
        is policy id N for ids up to POLICY_COUNTED_SLOTS (4096); slot 0
        sums every larger id.  Opened counts this process's creations, live
        also the connections adopted from a state file."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        cdef uint32_t i
        cdef nat_policy_conns* p = self.t.pol
        return {i: (p[i].opened, p[i].live) for i in range(POLICY_SLOTS) if p[i].opened or p[i].live}

    @property
    def flow_log(self):
        """The FlowLog receiving this table's start/end/refusal records, or None."""
        return self._flow_log

    @flow_log.setter
    def flow_log(self, log):
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        if log is not None and not isinstance(log, FlowLog):
            raise TypeError(f"flow_log must be a FlowLog or None, not {type(log).__name__}")
        with self._lock:
            self.t.flog = NULL if log is None else (<FlowLog>log)._get()
            self._flow_log = log

    def flush(self, *, now=None):
        """Remove every connection (end records with reason "eviction" for the
        live ones); returns how many were removed.  For a clean stop."""
        cdef uint64_t t_ns = self._now(now)
        cdef uint32_t n
        with self._lock:
            with nogil:
                n = nat_flush(self.t, t_ns)
        return n

    def ports_in_use(self, egress_ip, proto="tcp"):
        """External ports (or echo ids) of `egress_ip` held by live mappings."""
        fam, _ = addr_packed16(egress_ip, "egress_ip")
        idx = self._egress(egress_ip, fam)
        p = _nat_proto(proto, fam)
        return self.t.ext[idx].pools[_nat_pool_of(p)].used

    @property
    def stats(self):
        """Counters: lookups, hits, created, expired, refused by reason, sizes;
        with a per-source limit, the sources holding connections and the
        refusals by source address (the first 256 sources refused by name,
        the others summed in refused_other_sources); spill: the spill chains
        and the mappings each IP took by spilling (see set_spill)."""
        if self.t == NULL:
            raise RuntimeError("NatTable was not initialised (__init__ not run)")
        cdef nat_table* t = self.t
        cdef uint32_t i
        by_source = {}
        with self._lock:
            for i in range(NAT_SRC_REFUSED_SLOTS):
                if t.refused_src[i].family:
                    by_source[_nat_ip_str(t.refused_src[i].family, t.refused_src[i].addr)] = \
                        t.refused_src[i].count
            out = {
                "capacity": t.capacity,
                "entries": t.used,
                "mappings": t.map_used,
                "ipv6_capacity": t.a6_capacity,
                "ipv6_entries": t.a6_used,
                "ipv6_full": t.a6_full,
                "lookups": t.lookups,
                "hits": t.hits,
                "created": t.created_count,
                "expired": t.expired,
                "gc_runs": t.gc_runs,
                "refused": {DROP_REASON_NAMES[r]: t.drops[r] for r in _NAT_REFUSAL_REASONS},
                "per_source_limit": t.src_limit or None,
                "sources": t.src_used,
                "refused_by_source": by_source,
                "refused_other_sources": t.refused_src_other,
            }
        out["spill"] = self.spill
        return out

    # -- batches -------------------------------------------------------------

    def _batch_args(self, tuples, out, codes):
        if not isinstance(tuples, _np.ndarray) or tuples.dtype != NAT_TUPLE_DTYPE:
            raise TypeError("tuples must be a NumPy array of egresscore.NAT_TUPLE_DTYPE")
        if tuples.ndim != 1 or not tuples.flags.c_contiguous:
            raise ValueError("tuples must be a one-dimensional C-contiguous array")
        n = tuples.shape[0]
        if out is None:
            out = _np.zeros(n, dtype=NAT_TUPLE_DTYPE)
        elif (not isinstance(out, _np.ndarray) or out.dtype != NAT_TUPLE_DTYPE
              or out.shape != (n,) or not out.flags.c_contiguous or not out.flags.writeable):
            raise ValueError("out must be a writable C-contiguous NAT_TUPLE_DTYPE array "
                             "the length of tuples")
        if codes is None:
            codes = _np.zeros(n, dtype=_np.uint8)
        elif (not isinstance(codes, _np.ndarray) or codes.dtype != _np.uint8
              or codes.shape != (n,) or not codes.flags.c_contiguous
              or not codes.flags.writeable):
            raise ValueError("codes must be a writable C-contiguous uint8 array "
                             "the length of tuples")
        if _np.shares_memory(out, tuples):
            raise ValueError("out must not overlap tuples")
        return n, out, codes

    def translate_batch(self, tuples, egress_ip, *, now=None, out=None, codes=None,
                        lens=None):
        """SNAT a batch of outgoing tuples; returns (out, codes).

        `egress_ip` is one egress IP (address or index) or a uint16 array of
        indexes, one per tuple.  codes[i] is 0 or a drop reason (index into
        DROP_REASON_NAMES); out[i] is valid where codes[i] == 0.  `lens`
        (uint32, IP bytes per tuple) counts the packets in the connections."""
        n, out, codes = self._batch_args(tuples, out, codes)
        lens_arr = _nat_lens(lens, n)
        cdef const uint32_t* lp = NULL if lens_arr is None else \
            <const uint32_t*>cnp.PyArray_DATA(lens_arr)
        cdef uint16_t one
        cdef cnp.ndarray ext_arr
        cdef const uint16_t* ext_p
        cdef Py_ssize_t stride
        if isinstance(egress_ip, _np.ndarray):
            if egress_ip.dtype != _np.uint16 or egress_ip.shape != (n,):
                raise ValueError("egress_ip array must be uint16 with one index per tuple")
            ext_arr = _np.ascontiguousarray(egress_ip)
            ext_p = <const uint16_t*>cnp.PyArray_DATA(ext_arr)
            stride = 1
        else:
            if isinstance(egress_ip, int) and not isinstance(egress_ip, bool):
                if not 0 <= egress_ip < self.t.n_ext:
                    raise ValueError(f"egress IP index {egress_ip} is not configured")
                one = egress_ip
            else:
                fam, _ = addr_packed16(egress_ip, "egress_ip")
                one = self._egress(egress_ip, fam)
            ext_p = &one
            stride = 0
        cdef uint64_t t_ns = self._now(now)
        cdef const nat_tuple* tin = <const nat_tuple*>cnp.PyArray_DATA(tuples)
        cdef nat_tuple* tout = <nat_tuple*>cnp.PyArray_DATA(out)
        cdef uint8_t* cp = <uint8_t*>cnp.PyArray_DATA(codes)
        cdef Py_ssize_t cn = n
        with self._lock:
            with nogil:
                nat_translate_batch_len(self.t, tin, ext_p, stride, tout, cp, cn, t_ns, lp)
        return out, codes

    def reverse_batch(self, tuples, *, now=None, out=None, codes=None, lens=None):
        """Reverse-translate a batch of replies; returns (out, codes).

        codes[i] is 0 (out[i] is addressed to the pod) or a drop reason such
        as no_nat_entry.  `lens` as in translate_batch."""
        n, out, codes = self._batch_args(tuples, out, codes)
        lens_arr = _nat_lens(lens, n)
        cdef const uint32_t* lp = NULL if lens_arr is None else \
            <const uint32_t*>cnp.PyArray_DATA(lens_arr)
        cdef uint64_t t_ns = self._now(now)
        cdef const nat_tuple* tin = <const nat_tuple*>cnp.PyArray_DATA(tuples)
        cdef nat_tuple* tout = <nat_tuple*>cnp.PyArray_DATA(out)
        cdef uint8_t* cp = <uint8_t*>cnp.PyArray_DATA(codes)
        cdef Py_ssize_t cn = n
        with self._lock:
            with nogil:
                nat_reverse_batch_len(self.t, tin, tout, cp, cn, t_ns, lp)
        return out, codes


def _nat_ipv6_capacity(capacity):
    """The default IPv6 address records of a table of `capacity`: every
    connection up to 65,536, then one in 16 (at least 65,536)."""
    return capacity if capacity <= 65536 else max(65536, capacity // 16)


def _nat_index_slots(capacity):
    """Slots of an index over `capacity` entries: 1.5 per entry (load < 2/3)."""
    return capacity + capacity // 2 + 1


cdef object _nat_ip_str(uint32_t family, const uint8_t* addr):
    return str(_ipaddress.ip_address((<const char*>addr)[:4 if family == 4 else 16]))


def _nat_rng_seed(seed):
    """Initial xorshift state of a table seeded with `seed` (never zero)."""
    x = (seed * 0x9E3779B97F4A7C15 + 0x7F4A7C15) & 0xFFFFFFFFFFFFFFFF
    return x or 1
