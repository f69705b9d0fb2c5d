# lpm: longest-prefix match for IPv4 and IPv6, and Cilium's egress policy map.
#
# Structure: a poptrie-style compressed multibit trie (Asai & Ohara,
# SIGCOMM 2015); the C code is in lpm_core.h (trie) and lpm_egress.h (map).
#   * The top `dbits` bits of an address index a direct array (IPv4: 8..18
#     bits chosen from the table size, IPv6: 10 or 16), then 6-bit strides.
#     An internal node is 24 bytes: a 64-bit `vector` marking which of its 64
#     slots are child nodes, a 64-bit `leafvec` marking where a run of equal
#     leaf values starts, and two base indices.  Children and leaves are
#     stored contiguously and found by popcount (the POPCNT instruction), so a
#     node costs 24 bytes plus 4 bytes per distinct leaf run, not 64 pointers.
#   * Leaf pushing: every leaf holds the value of the longest prefix covering
#     it, so a lookup is one direct-array read, then one node per 6 bits until
#     a leaf, without backtracking.  Random IPv4 lookups into 100k prefixes
#     end in the direct array ~80% of the time.
#   * IPv6 tables fold chains of single-child nodes into one 24-byte skip
#     node that compares up to 60 key bits at once, and a subtree holding a
#     single prefix (a lone /48 under its /16) into a terminal node that
#     returns the prefix's value or the inherited one: no leaf read.  Deep
#     random IPv6 lookups visit ~2 nodes instead of ~5.
#   * Batch lookups walk 16 keys level by level so their cache misses
#     overlap; tables of 2 MB or more sit on transparent huge pages.
#   * Why not DIR-24-8: its first level alone is 2^24 entries (64 MB at 32-bit
#     entries) and every /24 holding a longer prefix costs a 1 KB tbl8, which
#     breaks 64 B/prefix at 1M prefixes.  This structure: about 55 B/prefix
#     at 1M random IPv4 prefixes /8../32, of which 24 B is the prefix store
#     below and ~31 B the lookup table (README has the measured table).
#   * Memory: direct 4 B * 2^dbits (1 MB at most for IPv4, 256 KB for IPv6),
#     nodes 24 B each, leaves 4 B each, 1/16 spare room for in-place patches,
#     plus the source of truth: a sorted array of 24-byte (key, length, value)
#     entries that gives exact get, ordered iteration and every rebuild's input.
#
# Updates and concurrent readers (a datapath thread doing lookups with the
# GIL released while the control plane writes):
#   * update()/update_arrays()/clear() and structural changes rebuild a fresh
#     table and publish it with one atomic pointer store; the old table is
#     freed only after a grace period (per-thread epoch slots in lpm_core.h:
#     a reader's section writes only its own cache line, no atomic per
#     lookup), so a whole lookup_batch sees either the old table or the new one.
#   * A single insert/replace/delete patches in place: the affected direct
#     slot's subtree is rebuilt into the table's unused tail and published by
#     one atomic 32-bit store of the slot (tens of microseconds at 100k
#     prefixes instead of a ~20 ms rebuild).  Every lookup sees a slot either
#     before or after the change, never a half-made subtree; a prefix shorter
#     than dbits spans several slots, published one after another, so a batch
#     running during that update may see some of its slots already changed
#     (the same as a BPF LPM map updated under a running datapath).  When the
#     tail is full, or the table outgrows its direct array, the update falls
#     back to a full rebuild.  Readers never lock; writers hold the GIL.
#
# Values: unsigned ints 0..2**31-2 (LPM_MAX_VALUE) stored in the leaves, so a
# batch lookup returns them without touching a Python object.  Store an index
# into your own list to map prefixes to arbitrary objects.
#
# Host bits: a prefix with host bits set ("10.0.0.1/8") is rejected with a
# ValueError naming it and the network meant, like ip_network(strict=True):
# silently masking would hide a mistyped policy.

import ipaddress as _ipaddress
from operator import index as _operator_index

import numpy as _np
from egresscore import types as _types

from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memchr, memcpy
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

_IPv4Network = _ipaddress.IPv4Network
_IPv6Network = _ipaddress.IPv6Network

LPM_MAX_VALUE = LPM_VALUE_MAX
LPM_NO_VALUE = LPM_NONE


# ---- parsing addresses and prefixes at the Python boundary ----------------

cdef inline int _host_bits_set(int fam, uint64_t hi, uint64_t lo, unsigned plen) noexcept nogil:
    cdef unsigned width = 32 if fam == 4 else 128
    if plen >= width:
        return 0
    cdef uint64_t all64 = ~(<uint64_t>0)
    if fam == 4:
        return (hi & (<uint64_t>0xFFFFFFFF >> plen)) != 0
    if plen == 0:
        return hi != 0 or lo != 0
    if plen < 64:
        return (hi & (all64 >> plen)) != 0 or lo != 0
    if plen == 64:
        return lo != 0
    return (lo & (all64 >> (plen - 64))) != 0


cdef int _parse_prefix(object x, int hint, uint64_t* hi, uint64_t* lo, unsigned* plen) except -1:
    """Family of a prefix: "10.0.0.0/8", an ip_network, (address, length),
    or an address (a host route).  Host bits set raise ValueError."""
    cdef Py_ssize_t n, alen, k
    cdef const char* s
    cdef const char* slash
    cdef char buf[64]
    cdef int fam
    cdef unsigned width, L
    if isinstance(x, str):
        x = str(x)
        s = PyUnicode_AsUTF8AndSize(x, &n)
        slash = <const char*>memchr(s, 47, n)
        if slash == NULL:
            fam = addr_parse_chars(s, n, hi, lo) if n < 64 else 0
            if fam == 0:
                raise ValueError(f"{x!r} is not a valid IP prefix")
            plen[0] = 32 if fam == 4 else 128
            return fam
        alen = slash - s
        if alen >= 63 or n - alen - 1 < 1 or n - alen - 1 > 3:
            raise ValueError(f"{x!r} is not a valid IP prefix")
        memcpy(buf, s, alen)
        buf[alen] = 0
        fam = addr_parse_chars(buf, alen, hi, lo)
        if fam == 0:
            raise ValueError(f"{x!r} is not a valid IP prefix: bad address")
        L = 0
        for k in range(alen + 1, n):
            if s[k] < 48 or s[k] > 57:
                raise ValueError(f"{x!r} is not a valid IP prefix: bad length")
            L = L * 10 + <unsigned>(s[k] - 48)
        width = 32 if fam == 4 else 128
        if L > width:
            raise ValueError(f"{x!r} is not a valid IP prefix: length {L} > {width}")
        plen[0] = L
    elif isinstance(x, _IPv4Network):
        hi[0] = <uint32_t>int(x.network_address)
        lo[0] = 0
        plen[0] = x.prefixlen
        return 4
    elif isinstance(x, _IPv6Network):
        addr_split128(int(x.network_address), hi, lo)
        plen[0] = x.prefixlen
        return 6
    elif isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"{x!r}: a prefix tuple is (address, length)")
        fam = addr_parse(x[0], hint, hi, lo)
        width = 32 if fam == 4 else 128
        try:
            length = _operator_index(x[1])
        except TypeError:
            length = -1
        if isinstance(x[1], bool) or not 0 <= length <= width:
            raise ValueError(f"{x!r}: prefix length must be an int in 0..{width}")
        plen[0] = length
    elif isinstance(x, (_ipaddress.IPv4Interface, _ipaddress.IPv6Interface)):
        raise TypeError(f"{x!r} is an interface (address with host bits); pass its .network")
    else:
        try:
            fam = addr_parse(x, hint, hi, lo)
        except TypeError:
            raise TypeError(f"expected an IP prefix (str, ip_network, (address, length) or an address), "
                            f"got {type(x).__name__}: {x!r}") from None
        plen[0] = 32 if fam == 4 else 128
        return fam
    if _host_bits_set(fam, hi[0], lo[0], plen[0]):
        raise ValueError(f"{x!r} has host bits set (did you mean "
                         f"{_masked_network(fam, hi[0], lo[0], plen[0])}?)")
    return fam


cdef object _masked_network(int fam, uint64_t hi, uint64_t lo, unsigned plen):
    if fam == 4:
        return _IPv4Network(((<uint32_t>hi) >> (32 - plen) << (32 - plen) if plen else 0, plen))
    x = (<object>hi << 64) | lo
    return _IPv6Network((x >> (128 - plen) << (128 - plen), plen))


cdef object _ip_int(int fam, uint64_t hi, uint64_t lo):
    if fam == 4:
        return <uint32_t>hi
    return (<object>hi << 64) | lo


cdef int _family_arg(object family) except -1:
    if family not in (4, 6) or isinstance(family, bool):
        raise ValueError(f"family must be 4 or 6, got {family!r}")
    return family


def _wrong_family(x, int fam, int want, str what):
    return ValueError(f"{x!r} is an IPv{fam} {what} but this {'trie' if what != 'source' else 'entry'} "
                      f"holds IPv{want}")


cdef object _as_keys4(object keys, str name):
    if not isinstance(keys, _np.ndarray):
        try:
            keys = _np.asarray(keys, dtype=_np.uint32)
        except (OverflowError, ValueError, TypeError) as e:
            raise TypeError(f"{name} must be a uint32 array of host-order IPv4 addresses: {e}") from None
    if keys.dtype != _np.uint32:
        raise TypeError(f"{name} must have dtype uint32 (host-order IPv4 addresses), got {keys.dtype}")
    if keys.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {keys.shape}")
    return _np.ascontiguousarray(keys)


cdef object _as_keys6(object keys, str name, int* as_bytes):
    if not isinstance(keys, _np.ndarray):
        raise TypeError(f"{name} must be a NumPy array of IPv6 addresses: (N, 16) uint8 "
                        f"network order or (N, 2) uint64 host-order halves, got {type(keys).__name__}")
    if keys.ndim == 2 and keys.shape[1] == 16 and keys.dtype == _np.uint8:
        as_bytes[0] = 1
    elif keys.ndim == 2 and keys.shape[1] == 2 and keys.dtype == _np.uint64:
        as_bytes[0] = 0
    else:
        raise TypeError(f"{name} must be (N, 16) uint8 network-order or (N, 2) uint64 host-order "
                        f"IPv6 addresses, got shape {keys.shape} dtype {keys.dtype}")
    return _np.ascontiguousarray(keys)


def _lpm_value(value):
    if not isinstance(value, (int, bool)) and hasattr(value, "__index__"):   # NumPy integers
        value = _operator_index(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"LPMTrie values are ints 0..{LPM_VALUE_MAX}, got "
                        f"{type(value).__name__}: {value!r} (store an index into your own list)")
    if not 0 <= value <= LPM_VALUE_MAX:
        raise ValueError(f"LPMTrie value {value!r} is out of range 0..{LPM_VALUE_MAX}")
    return value


def _check_out(out, Py_ssize_t n):
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(f"out must be a (values, found) tuple of arrays, got {type(out).__name__}")
    values, found = out
    for arr, dt, name in ((values, _np.uint32, "values"), (found, _np.bool_, "found")):
        if not isinstance(arr, _np.ndarray) or arr.dtype != dt or arr.shape != (n,) \
                or not arr.flags.c_contiguous or not arr.flags.writeable:
            raise TypeError(f"out {name} must be a writable contiguous {_np.dtype(dt).name} array "
                            f"of shape ({n},), got {getattr(arr, 'dtype', type(arr).__name__)} "
                            f"{getattr(arr, 'shape', '')}")
    return values, found


# ---- LPMTrie ----------------------------------------------------------------

cdef class LPMTrie:
    """Longest-prefix-match table of IPv4 or IPv6 prefixes to small ints.

    t = LPMTrie(4); t["10.0.0.0/8"] = 1; t.lookup("10.1.2.3") -> 1.
    Keys: "10.0.0.0/8" strings, ip_network objects, (address, length) tuples,
    or plain addresses (host routes).  Values: ints 0..LPM_MAX_VALUE
    (2**31 - 2) kept in C so lookup_batch returns them without Python
    objects.  Prefixes with host bits set raise ValueError.  Iteration is in
    (network address, prefix length) order.  A lookup running in another
    thread (lookup_batch releases the GIL) never sees a half-made update:
    bulk updates swap whole tables, single updates swap one direct slot at a
    time (see the notes at the top of lpm.pyx).
    """

    def __cinit__(self, family=4, items=None):
        self.family = _family_arg(family)
        self.c = <lpm_trie*>calloc(1, sizeof(lpm_trie))
        if self.c == NULL:
            raise no_memory("LPM table")
        self.c.width = 32 if self.family == 4 else 128
        if lpm_trie_publish(self.c) < 0:
            raise no_memory("LPM table")

    def __init__(self, family=4, items=None):
        if items is not None:
            self.update(items)

    def __dealloc__(self):
        if self.c != NULL:
            lpm_table_free(self.c.cur)
            free(self.c.e)
            free(self.c)
            self.c = NULL

    cdef int _entry(self, object prefix, lpm_entry* out) except -1:
        cdef uint64_t hi, lo
        cdef unsigned plen
        cdef int fam = _parse_prefix(prefix, self.family, &hi, &lo, &plen)
        if fam != self.family:
            raise _wrong_family(prefix, fam, self.family, "prefix")
        if fam == 4:
            out.hi = hi << 32
            out.lo = 0
        else:
            out.hi = hi
            out.lo = lo
        out.len = plen
        out.val = 0
        return 0

    cdef object _network(self, const lpm_entry* e):
        if self.family == 4:
            return _IPv4Network((<uint32_t>(e.hi >> 32), e.len))
        return _IPv6Network(((<object>e.hi << 64) | e.lo, e.len))

    def __setitem__(self, prefix, value):
        cdef lpm_entry e
        self._entry(prefix, &e)
        e.val = _lpm_value(value)
        if lpm_trie_store(self.c, &e) < 0:
            raise no_memory("LPM table")

    def __getitem__(self, prefix):
        cdef lpm_entry e
        self._entry(prefix, &e)
        cdef long i = lpm_trie_find(self.c, &e)
        if i < 0:
            raise KeyError(prefix)
        return self.c.e[i].val

    def get(self, prefix, default=None):
        """Exact-match value of `prefix`, or default."""
        cdef lpm_entry e
        self._entry(prefix, &e)
        cdef long i = lpm_trie_find(self.c, &e)
        return default if i < 0 else self.c.e[i].val

    def __delitem__(self, prefix):
        cdef lpm_entry e
        self._entry(prefix, &e)
        cdef int r = lpm_trie_delete(self.c, &e)
        if r == 0:
            raise KeyError(prefix)
        if r < 0:
            raise no_memory("LPM table")

    def pop(self, prefix, *default):
        """Remove `prefix` and return its value (or default if absent)."""
        cdef lpm_entry e
        self._entry(prefix, &e)
        cdef long i = lpm_trie_find(self.c, &e)
        if i < 0:
            if default:
                return default[0]
            raise KeyError(prefix)
        v = self.c.e[i].val
        if lpm_trie_delete(self.c, &e) < 0:
            raise no_memory("LPM table")
        return v

    def lookup(self, address, default=None):
        """Value of the longest prefix containing `address`, or default."""
        cdef uint64_t hi, lo
        cdef uint32_t v
        cdef int fam = addr_parse(address, self.family, &hi, &lo)
        if fam != self.family:
            raise _wrong_family(address, fam, self.family, "address")
        lpm_rcu_read_lock()
        if fam == 4:
            v = lpm4_table_lookup(lpm_trie_table(self.c), <uint32_t>hi)
        else:
            v = lpm6_table_lookup(lpm_trie_table(self.c), hi, lo)
        lpm_rcu_read_unlock()
        return default if v == LPM_NONE else v

    def lookup_prefix(self, address):
        """(network, value) of the longest prefix containing `address`
        (an address or a network), or None."""
        cdef lpm_entry e
        cdef long i
        cdef int L
        cdef uint64_t hi, lo
        cdef uint64_t all64 = ~(<uint64_t>0)
        self._entry(address, &e)
        hi, lo = e.hi, e.lo
        for L in range(e.len, -1, -1):
            if L == 0:
                e.hi = 0
                e.lo = 0
            elif L < 64:
                e.hi = hi & ~(all64 >> L)
                e.lo = 0
            elif L == 64:
                e.hi = hi
                e.lo = 0
            elif L == 128:
                e.hi = hi
                e.lo = lo
            else:
                e.hi = hi
                e.lo = lo & ~(all64 >> (L - 64))
            e.len = L
            i = lpm_trie_find(self.c, &e)
            if i >= 0:
                return self._network(&self.c.e[i]), self.c.e[i].val
        return None

    def __contains__(self, item):
        """True when a stored prefix covers `item` (an address or a network),
        as in pytricia; use has_key for an exact prefix."""
        if isinstance(item, (str, _IPv4Network, _IPv6Network, tuple)) and (
                not isinstance(item, str) or "/" in item):
            return self.lookup_prefix(item) is not None
        return self.lookup(item) is not None

    def has_key(self, prefix):
        """True when exactly `prefix` is stored."""
        cdef lpm_entry e
        self._entry(prefix, &e)
        return lpm_trie_find(self.c, &e) >= 0

    def __len__(self):
        return self.c.n

    def __iter__(self):
        return iter(self.keys())

    def keys(self):
        """Stored prefixes (ip_network objects) in order."""
        cdef size_t i
        return [self._network(&self.c.e[i]) for i in range(self.c.n)]

    def values(self):
        cdef size_t i
        return [self.c.e[i].val for i in range(self.c.n)]

    def items(self):
        """(ip_network, value) pairs in (address, length) order."""
        cdef size_t i
        return [(self._network(&self.c.e[i]), self.c.e[i].val) for i in range(self.c.n)]

    def update(self, items):
        """Insert or replace many prefixes with one rebuild (a mapping or an
        iterable of (prefix, value)); later duplicates win.  All or nothing."""
        if hasattr(items, "items"):
            items = items.items()
        items = list(items)
        cdef size_t m = len(items), k, out_n = 0
        if m == 0:
            return
        cdef lpm_seq_entry* add = <lpm_seq_entry*>malloc(m * sizeof(lpm_seq_entry))
        cdef lpm_entry* merged
        if add == NULL:
            raise no_memory("LPM table")
        try:
            for k in range(m):
                pair = items[k]
                if not isinstance(pair, tuple) or len(pair) != 2:
                    raise TypeError(f"update() wants (prefix, value) pairs, got {pair!r}")
                self._entry(pair[0], &add[k].ent)
                add[k].ent.val = _lpm_value(pair[1])
                add[k].seq = k
            merged = lpm_entries_merge(self.c.e, self.c.n, add, m, &out_n)
            if merged == NULL:
                raise no_memory("LPM table")
        finally:
            free(add)
        cdef lpm_entry* old_e = self.c.e
        cdef size_t old_n = self.c.n, old_cap = self.c.cap
        self.c.e = merged
        self.c.n = out_n
        self.c.cap = out_n + 1
        if lpm_trie_publish(self.c) < 0:
            self.c.e, self.c.n, self.c.cap = old_e, old_n, old_cap
            free(merged)
            raise no_memory("LPM table")
        free(old_e)

    def update_arrays(self, networks, lengths, values):
        """Bulk insert from NumPy arrays (one rebuild, no Python object per
        prefix): networks as lookup_batch takes addresses (IPv4 1-D uint32
        host order, IPv6 (N, 16) uint8 or (N, 2) uint64), lengths uint8-able
        ints, values ints 0..LPM_MAX_VALUE.  Same rules as update()."""
        cdef int as_bytes = 0
        if self.family == 4:
            nets = _as_keys4(networks, "networks")
        else:
            nets = _as_keys6(networks, "networks", &as_bytes)
        cdef Py_ssize_t m = nets.shape[0], k
        lens = _np.ascontiguousarray(lengths)
        vals = _np.ascontiguousarray(values)
        if lens.shape != (m,) or vals.shape != (m,):
            raise ValueError(f"networks ({m}), lengths {lens.shape} and values {vals.shape} must match")
        if lens.dtype.kind not in "iu" or vals.dtype.kind not in "iu":
            raise TypeError(f"lengths and values must be integer arrays, got {lens.dtype} and {vals.dtype}")
        if m == 0:
            return
        if lens.min() < 0 or lens.max() > self.c.width:
            raise ValueError(f"lengths must be in 0..{self.c.width}")
        if vals.min() < 0 or vals.max() > LPM_VALUE_MAX:
            raise ValueError(f"values must be in 0..{LPM_VALUE_MAX}")
        cdef const uint32_t[::1] n4
        cdef const uint8_t[:, ::1] n8
        cdef const uint64_t[:, ::1] n64
        cdef const int64_t[::1] L = lens.astype(_np.int64)
        cdef const int64_t[::1] V = vals.astype(_np.int64)
        cdef lpm_seq_entry* add = <lpm_seq_entry*>malloc(m * sizeof(lpm_seq_entry))
        cdef lpm_entry* merged = NULL
        cdef size_t out_n = 0
        cdef uint64_t hi, lo
        cdef Py_ssize_t bad = -1
        if add == NULL:
            raise no_memory("LPM table")
        if self.family == 4:
            n4 = nets
        elif as_bytes:
            n8 = nets
        else:
            n64 = nets
        with nogil:
            for k in range(m):
                if self.family == 4:
                    hi = <uint64_t>n4[k]
                    lo = 0
                elif as_bytes:
                    hi = be_load64(&n8[k, 0])
                    lo = be_load64(&n8[k, 8])
                else:
                    hi = n64[k, 0]
                    lo = n64[k, 1]
                if _host_bits_set(self.family, hi, lo, <unsigned>L[k]):
                    bad = k
                    break
                add[k].ent.hi = hi << 32 if self.family == 4 else hi
                add[k].ent.lo = lo
                add[k].ent.len = <uint32_t>L[k]
                add[k].ent.val = <uint32_t>V[k]
                add[k].seq = k
        # The merge reads the entry store, which another writer thread may
        # realloc: it runs with the GIL held, like every other writer.
        if bad < 0:
            merged = lpm_entries_merge(self.c.e, self.c.n, add, m, &out_n)
        free(add)
        if bad >= 0:
            raise ValueError(f"networks[{bad}] with length {L[bad]} has host bits set")
        if merged == NULL:
            raise no_memory("LPM table")
        cdef lpm_entry* old_e = self.c.e
        cdef size_t old_n = self.c.n, old_cap = self.c.cap
        self.c.e = merged
        self.c.n = out_n
        self.c.cap = out_n + 1
        if lpm_trie_publish(self.c) < 0:
            self.c.e, self.c.n, self.c.cap = old_e, old_n, old_cap
            free(merged)
            raise no_memory("LPM table")
        free(old_e)

    def clear(self):
        free(self.c.e)
        self.c.e = NULL
        self.c.n = 0
        self.c.cap = 0
        if lpm_trie_publish(self.c) < 0:
            raise no_memory("LPM table")

    def lookup_batch(self, addresses, out=None):
        """Longest-prefix match of many addresses, GIL released.

        IPv4: a 1-D uint32 array of host-order addresses.  IPv6: (N, 16)
        uint8 network-order bytes or (N, 2) uint64 host-order (high, low)
        halves.  Returns (values uint32, found bool); values[i] is
        LPM_NO_VALUE (2**31 - 1) where found[i] is False.  out=(values,
        found) reuses caller arrays (a datapath loop allocates nothing).
        """
        cdef int as_bytes = 0
        cdef const uint32_t[::1] k4
        cdef const uint8_t[:, ::1] k8
        cdef const uint64_t[:, ::1] k64
        cdef uint32_t[::1] o
        cdef uint8_t[::1] f
        cdef const void* p6
        if self.family == 4:
            keys = _as_keys4(addresses, "addresses")
        else:
            keys = _as_keys6(addresses, "addresses", &as_bytes)
        cdef Py_ssize_t n = keys.shape[0]
        if out is None:
            values = _np.empty(n, dtype=_np.uint32)
            found = _np.empty(n, dtype=_np.bool_)
        else:
            values, found = _check_out(out, n)
        if n == 0:
            return values, found
        o = values
        f = found.view(_np.uint8)
        if self.family == 4:
            k4 = keys
            with nogil:
                lpm_rcu_read_lock()
                lpm4_table_lookup_batch(lpm_trie_table(self.c), &k4[0], n, &o[0], &f[0])
                lpm_rcu_read_unlock()
        else:
            if as_bytes:
                k8 = keys
                p6 = &k8[0, 0]
            else:
                k64 = keys
                p6 = &k64[0, 0]
            with nogil:
                lpm_rcu_read_lock()
                lpm6_table_lookup_batch(lpm_trie_table(self.c), p6, as_bytes, n, &o[0], &f[0])
                lpm_rcu_read_unlock()
        return values, found

    @property
    def readers(self):
        """Threads inside an RCU read section now (0 when none is).  Sections
        are per thread and cover every table (lpm_core.h), so this counts
        the readers of every LPMTrie and EgressMap of the process."""
        return lpm_rcu_readers()

    @property
    def nbytes(self):
        """Bytes of C memory held: the published table plus the prefix store."""
        return lpm_table_bytes(self.c.cur) + self.c.cap * sizeof(lpm_entry) + sizeof(lpm_trie)

    @property
    def stats(self):
        """Shape of the published table: direct bits, nodes, leaves, bytes."""
        cdef const lpm_table* t = self.c.cur
        return {"prefixes": self.c.n, "direct_bits": t.dbits, "nodes": t.n_nodes,
                "leaves": t.n_leaves, "table_bytes": lpm_table_bytes(t),
                "store_bytes": self.c.cap * sizeof(lpm_entry)}

    def __repr__(self):
        return f"LPMTrie(family={self.family}, prefixes={self.c.n})"


# ---- the egress policy map --------------------------------------------------

# The sentinels and the entry type are egresscore.types' (one definition);
# the C side's raw gateway values (lpm_egress.h) are checked equal by a test.
GATEWAY_NOT_FOUND_V4 = _IPv4Address(_types.GATEWAY_NOT_FOUND)
EXCLUDED_CIDR_V4 = _IPv4Address(_types.EXCLUDED_CIDR)
EGRESS_IP_NOT_FOUND_V4 = _IPv4Address(_types.EGRESS_IP_NOT_FOUND_V4)
GATEWAY_NOT_FOUND_V6 = _IPv6Address(_types.GATEWAY_NOT_FOUND_V6)
EXCLUDED_CIDR_V6 = _IPv6Address(_types.EXCLUDED_CIDR_V6)
EGRESS_IP_NOT_FOUND_V6 = _IPv6Address(_types.EGRESS_IP_NOT_FOUND_V6)
EGRESS_GATEWAY_RAW_NOT_FOUND = EGRESS_GW_NOT_FOUND
EGRESS_GATEWAY_RAW_EXCLUDED = EGRESS_GW_EXCLUDED

EGRESS_STATUS_NO_MATCH = EGRESS_NO_MATCH
EGRESS_STATUS_MATCH = EGRESS_MATCH
EGRESS_STATUS_EXCLUDED = EGRESS_EXCLUDED
EGRESS_STATUS_NO_GATEWAY = EGRESS_NO_GATEWAY

EgressEntry = _types.EgressEntry


POLICY_ID_MAX = _types.POLICY_ID_MAX
cdef long long POLICY_ID_MAX_C = _types.POLICY_ID_MAX


def _policy_id(value, key):
    """An entry's policy id, checked: an int in 0..POLICY_ID_MAX (the
    datapath's counters and the flow log hold it in 16 bits)."""
    if not isinstance(value, (int, bool)) and hasattr(value, "__index__"):   # NumPy integers
        value = _operator_index(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _types.POLICY_ID_MAX:
        raise ValueError(f"egress entry {key!r}: policy_id must be an int in 0..{_types.POLICY_ID_MAX}, "
                         f"not {value!r}")
    return value


cdef class EgressMap:
    """Cilium's egress policy map: (source IP, destination CIDR) ->
    (egress IP, gateway IP), exact source and longest destination prefix,
    IPv4 and IPv6 side by side.

    Layout: a hash table from source IP to that source's rows (destination
    prefix, egress IP, gateway IP, policy id), kept in C only: no Python
    object per entry (get/lookup/entries make EgressEntry objects on
    demand).  Not one LPM over source||destination as in Cilium's BPF map:
    an exact source match is one hash probe, and a change rewrites only that
    source's rows, swapped into its slot with one atomic store (the cost of
    a change does not grow with the map).  Lookups never see a half-made
    update of a source.

    Gateway sentinels follow Cilium (pkg/egressgateway): gateway 0.0.0.0 /
    :: means a policy matched but no gateway node exists (status 3, drop);
    0.0.0.1 / ::1 marks an excluded CIDR (status 2, default path).
    """

    def __cinit__(self):
        self.c = <egress_map*>calloc(1, sizeof(egress_map))
        if self.c == NULL:
            raise no_memory("LPM table")
        self._count = 0

    def __dealloc__(self):
        if self.c != NULL:
            egress_map_free_all(self.c)
            free(self.c)
            self.c = NULL

    cdef int _row(self, object item, egress_wrow* w, int op) except -1:
        """Parse (source, destination[, egress IP, gateway IP[, policy id]])
        into *w (op 0: a set, all four or five; op 1: a remove, the key)."""
        cdef uint64_t hi, lo
        cdef unsigned plen
        cdef int fs, fd, f
        cdef Py_ssize_t n
        cdef const char* s
        source_ip = item[0]
        destination_cidr = item[1]
        if type(source_ip) is str:
            s = PyUnicode_AsUTF8AndSize(source_ip, &n)
            if memchr(s, 47, n) != NULL:
                raise ValueError(f"source {source_ip!r} must be an IP address, not a prefix")
        elif isinstance(source_ip, str) and "/" in source_ip:
            raise ValueError(f"source {source_ip!r} must be an IP address, not a prefix")
        fs = addr_parse(source_ip, 0, &w.s_hi, &w.s_lo)
        fd = _parse_prefix(destination_cidr, fs, &w.d_hi, &w.d_lo, &plen)
        if fs != fd:
            raise ValueError(f"source {source_ip!r} is IPv{fs} but destination "
                             f"{destination_cidr!r} is IPv{fd}")
        w.plen = plen
        w.v6 = fs == 6
        w.op = op
        w.e_hi = w.e_lo = w.g_hi = w.g_lo = 0
        w.policy = 0
        if op:
            return 0
        x = item[2]
        f = addr_parse(x, fs, &w.e_hi, &w.e_lo)
        if f != fs:
            raise ValueError(f"egress IP {x!r} is IPv{f} but the entry is IPv{fs}")
        x = item[3]
        f = addr_parse(x, fs if isinstance(x, int) else 0, &hi, &lo)
        if f == 4 and fs == 6:
            # an IPv6 entry's IPv4 gateway (the compiler's form, as Cilium
            # lists its IPv6 map): kept as ::ffff:a.b.c.d, the sentinels
            # 0.0.0.0 / 0.0.0.1 as :: / ::1
            if hi != EGRESS_GW_NOT_FOUND and hi != EGRESS_GW_EXCLUDED:
                hi |= 0xffff00000000
            w.g_hi, w.g_lo = 0, hi
        elif f != fs:
            raise ValueError(f"gateway IP {x!r} is IPv{f} but the entry is IPv{fs}")
        else:
            w.g_hi, w.g_lo = hi, lo
        if len(item) > 4:
            p = item[4]
            if type(p) is int and 0 <= <long long>p <= POLICY_ID_MAX_C:
                w.policy = <uint32_t>p
            else:
                w.policy = _policy_id(p, item)
        return 0

    cdef long _write(self, egress_wrow* w, size_t n) except? -9:
        """Apply n parsed sets/removes (sorted here) in one batch: the rows
        written, or -2 - j when the j-th (sorted) removes an absent key."""
        cdef long delta = 0
        cdef long r
        egress_wrows_sort(w, n)
        r = egress_map_update_rows(self.c, w, n, &delta)
        if r == -1:
            raise no_memory("LPM table")
        if r < -1:
            return r
        self._count += delta
        return 0

    cdef object _entry(self, int v6, uint64_t s_hi, uint64_t s_lo, const egress_src* es, long i):
        cdef const egress_row4* r4
        cdef const egress_row6* r6
        if not v6:
            r4 = EGRESS_ROWS4(es) + i
            return EgressEntry(_IPv4Address(<uint32_t>s_hi), _IPv4Network((r4.dst, r4.plen)),
                               _IPv4Address(r4.egress), _IPv4Address(r4.gateway), r4.policy)
        r6 = EGRESS_ROWS6(es) + i
        return EgressEntry(_IPv6Address((<object>s_hi << 64) | s_lo),
                           _IPv6Network(((<object>r6.d_hi << 64) | r6.d_lo, r6.plen)),
                           _IPv6Address((<object>r6.e_hi << 64) | r6.e_lo),
                           _IPv6Address((<object>r6.g_hi << 64) | r6.g_lo), r6.policy)

    def sync(self, entries):
        """Make the map hold exactly `entries` (EgressEntry or (source,
        destination, egress_ip, gateway_ip[, policy_id]) tuples), the way Cilium's
        reconciler diffs its BPF map: only sources whose entries changed get
        new rows, and each family that changed is published once.  Parsed
        and compared in C (no Python object per row).  All or nothing.
        Returns (added, removed, changed) entry counts."""
        cdef size_t n, i = 0
        cdef size_t counts[3]
        cdef egress_wrow* w
        cdef int r
        if not isinstance(entries, (list, tuple)):
            entries = list(entries)
        n = len(entries)
        w = <egress_wrow*>malloc((n + 1) * sizeof(egress_wrow))
        if w == NULL:
            raise no_memory("LPM table")
        try:
            for item in entries:
                if not isinstance(item, tuple) or not 4 <= len(item) <= 5:
                    raise TypeError(f"sync() wants (source, destination, egress_ip, gateway_ip[, policy_id]) "
                                    f"tuples, got {item!r}")
                self._row(item, &w[i], 0)
                w[i].seq = i
                i += 1
            egress_wrows_sort(w, n)
            counts[0] = counts[1] = counts[2] = 0
            r = egress_map_sync_rows(self.c, w, n, counts)
            if r < 0:
                raise no_memory("LPM table")
        finally:
            free(w)
        self._count += <Py_ssize_t>counts[0] - <Py_ssize_t>counts[1]
        return counts[0], counts[1], counts[2]

    def update(self, sets=(), removes=()):
        """Many writes at once: `sets` are (source, destination, egress IP,
        gateway IP[, policy id]) rows as sync() takes them (the excluded and
        no-gateway sentinels included), `removes` (source, destination) pairs of present
        entries (KeyError otherwise).  Each touched source gets its new rows
        once and one grace period covers the batch (a policy that moves 100
        pods' entries in a map of 100,000 sources).  Sets apply before
        removes.  All or nothing."""
        cdef size_t ns, n, i = 0
        cdef egress_wrow* w
        cdef long r
        sets = sets if isinstance(sets, (list, tuple)) else list(sets)
        removes = removes if isinstance(removes, (list, tuple)) else list(removes)
        ns = len(sets)
        n = ns + len(removes)
        if n == 0:
            return 0
        w = <egress_wrow*>malloc(n * sizeof(egress_wrow))
        if w == NULL:
            raise no_memory("LPM table")
        try:
            for item in sets:
                self._row(item, &w[i], 0)
                w[i].seq = i
                i += 1
            for item in removes:
                self._row(item, &w[i], 1)
                w[i].seq = i
                i += 1
            r = self._write(w, n)
            if r < -1:
                src_ip, dst = removes[w[-2 - r].seq - ns]
                raise KeyError(f"no egress entry for source {src_ip} destination {dst}")
        finally:
            free(w)
        return n

    def set(self, source_ip, destination_cidr, egress_ip, gateway_ip, policy_id=0):
        """Insert or replace the entry for (source IP, destination CIDR).

        All four in one family (an IPv6 entry's gateway may be IPv4, as
        Cilium's); str, ipaddress objects or ints.  A gateway of
        GATEWAY_NOT_FOUND_V4/V6 means "matched, no gateway: drop",
        EXCLUDED_CIDR_V4/V6 an excluded CIDR.  policy_id (0..POLICY_ID_MAX,
        0: none) is the number the datapath counts the entry's traffic under.
        """
        cdef egress_wrow w
        pid = _policy_id(policy_id, (source_ip, destination_cidr))
        self._row((source_ip, destination_cidr, egress_ip, gateway_ip, pid), &w, 0)
        w.seq = 0
        self._write(&w, 1)

    def set_excluded(self, source_ip, destination_cidr, egress_ip=None, policy_id=0):
        """Mark destination_cidr as excluded for source_ip (Cilium's
        excludedCIDRs): gateway EXCLUDED_CIDR_V4/V6, traffic stays on the
        default path.  egress_ip defaults to 0.0.0.0 / ::."""
        cdef egress_wrow w
        pid = _policy_id(policy_id, (source_ip, destination_cidr))
        self._row((source_ip, destination_cidr), &w, 1)
        fam = 6 if w.v6 else 4
        if egress_ip is None:
            egress_ip = EGRESS_IP_NOT_FOUND_V4 if fam == 4 else EGRESS_IP_NOT_FOUND_V6
        self._row((source_ip, destination_cidr, egress_ip, EXCLUDED_CIDR_V4 if fam == 4 else EXCLUDED_CIDR_V6,
                   pid), &w, 0)
        w.seq = 0
        self._write(&w, 1)

    def remove(self, source_ip, destination_cidr):
        """Remove the entry; KeyError naming the key if absent."""
        cdef egress_wrow w
        self._row((source_ip, destination_cidr), &w, 1)
        w.seq = 0
        if self._write(&w, 1) < -1:
            raise KeyError(f"no egress entry for source {source_ip} destination {destination_cidr}")

    def get(self, source_ip, destination_cidr, default=None):
        """The entry stored exactly for (source IP, destination CIDR)."""
        cdef egress_wrow w
        cdef const egress_src* es
        cdef long i
        self._row((source_ip, destination_cidr), &w, 1)
        es = egress_snap_find(self.c.snap[w.v6], w.s_hi, w.s_lo)
        if es == NULL:
            return default
        i = egress_src_find_row(es, w.d_hi, w.d_lo, w.plen)
        return default if i < 0 else self._entry(w.v6, w.s_hi, w.s_lo, es, i)

    def lookup(self, source_ip, destination_ip):
        """The entry for exact source and longest destination prefix, or None.
        Check .excluded / .no_gateway (or .status) before redirecting."""
        cdef uint64_t shi, slo, dhi, dlo
        cdef int fs = addr_parse(source_ip, 0, &shi, &slo)
        cdef int fd = addr_parse(destination_ip, fs, &dhi, &dlo)
        cdef const egress_src* es
        cdef long i
        if fs != fd:
            raise ValueError(f"source {source_ip!r} is IPv{fs} but destination "
                             f"{destination_ip!r} is IPv{fd}")
        es = egress_snap_find(self.c.snap[fs == 6], shi, slo)
        if es == NULL:
            return None
        i = egress_src_match4(es, <uint32_t>dhi) if fs == 4 else egress_src_match6(es, dhi, dlo)
        return None if i < 0 else self._entry(fs == 6, shi, slo, es, i)

    def lookup_batch(self, sources, destinations, *, policy_ids=False):
        """Look up many (source, destination) pairs at once, GIL released.

        IPv4: two 1-D uint32 arrays of host-order addresses -> (egress_ips
        uint32, gateway_ips uint32, status uint8).  IPv6: two (N, 16) uint8
        network-order arrays -> (egress (N, 16) uint8, gateway (N, 16) uint8,
        status uint8).  status: 0 no match (default path), 1 match (redirect
        to gateway_ips, SNAT to egress_ips), 2 excluded CIDR (default path),
        3 matched but no gateway (drop).  Addresses are 0 where status is 0.
        policy_ids=True adds a fourth array: each entry's policy id (uint32).
        """
        cdef int as_bytes = 0
        cdef const uint32_t[::1] s4, d4
        cdef const uint8_t[:, ::1] s6, d6
        cdef uint32_t[::1] e4, g4
        cdef uint8_t[:, ::1] e6, g6
        cdef uint8_t[::1] st
        cdef uint32_t[::1] pv
        cdef uint32_t* pp = NULL
        cdef Py_ssize_t n
        if isinstance(sources, _np.ndarray) and sources.ndim == 2:
            sources = _as_keys6(sources, "sources", &as_bytes)
            destinations = _as_keys6(destinations, "destinations", &as_bytes)
            if sources.dtype != _np.uint8 or destinations.dtype != _np.uint8:
                raise TypeError("IPv6 sources and destinations must both be (N, 16) uint8 network order")
            v6 = True
        else:
            sources = _as_keys4(sources, "sources")
            destinations = _as_keys4(destinations, "destinations")
            v6 = False
        if sources.shape[0] != destinations.shape[0]:
            raise ValueError(f"sources ({sources.shape[0]}) and destinations "
                             f"({destinations.shape[0]}) differ in length")
        n = sources.shape[0]
        status = _np.zeros(n, dtype=_np.uint8)
        if v6:
            egress = _np.zeros((n, 16), dtype=_np.uint8)
            gateway = _np.zeros((n, 16), dtype=_np.uint8)
        else:
            egress = _np.zeros(n, dtype=_np.uint32)
            gateway = _np.zeros(n, dtype=_np.uint32)
        pol = _np.zeros(n, dtype=_np.uint32) if policy_ids else None
        if n == 0:
            return (egress, gateway, status, pol) if policy_ids else (egress, gateway, status)
        st = status
        if policy_ids:
            pv = pol
            pp = &pv[0]
        if v6:
            s6, d6, e6, g6 = sources, destinations, egress, gateway
            with nogil:
                egress_map_lookup6_batch(self.c, &s6[0, 0], &d6[0, 0], n, &e6[0, 0], &g6[0, 0], &st[0], pp)
        else:
            s4, d4, e4, g4 = sources, destinations, egress, gateway
            with nogil:
                egress_map_lookup4_batch(self.c, &s4[0], &d4[0], n, &e4[0], &g4[0], &st[0], pp)
        return (egress, gateway, status, pol) if policy_ids else (egress, gateway, status)

    def entries(self):
        """All entries sorted by (family, source IP, destination network): the
        order `egresscore egress list` prints."""
        cdef const egress_snap* s
        cdef const egress_slot* sl
        cdef const egress_src* es
        cdef size_t x
        cdef long i
        out = []
        for fam in (0, 1):
            s = self.c.snap[fam]
            if s == NULL:
                continue
            found = []
            for x in range((<size_t>1) << s.bits):
                sl = &s.slots[x]
                if sl.src != NULL and sl.src != EGRESS_TOMB:
                    found.append((sl.hi, sl.lo, <size_t>sl.src))
            found.sort()
            for hi, lo, p in found:
                es = <const egress_src*><size_t>p
                for i in range(es.n):
                    out.append(self._entry(fam, hi, lo, es, i))
        return out

    @property
    def readers(self):
        """Threads inside an RCU read section now (0 when none is; every
        table's: see LPMTrie.readers)."""
        return lpm_rcu_readers()

    @property
    def nbytes(self):
        """C memory the map's rows, LPM tables and slot tables hold."""
        cdef const egress_snap* s
        cdef size_t x, total = 0
        for fam in (0, 1):
            s = self.c.snap[fam]
            if s == NULL:
                continue
            total += sizeof(egress_snap) + ((<size_t>1) << s.bits) * sizeof(egress_slot)
            for x in range((<size_t>1) << s.bits):
                total += egress_src_bytes(s.slots[x].src)
        return total

    def __iter__(self):
        return iter(self.entries())

    def __len__(self):
        return self._count

    def __contains__(self, key):
        if not isinstance(key, tuple) or len(key) != 2:
            raise TypeError(f"EgressMap keys are (source_ip, destination_cidr) tuples, got {key!r}")
        return self.get(key[0], key[1]) is not None

    def clear(self):
        """Remove every entry (published atomically per family)."""
        egress_map_clear(self.c)
        self._count = 0

    def __repr__(self):
        return f"EgressMap(entries={self._count})"


# ---- probes of the C API (the fused datapath calls these at C level) -------

def _c_lpm4_lookup(LPMTrie t, uint32_t addr):
    """Test hook: lpm4_lookup through the nogil C API -> value or None."""
    cdef uint32_t v
    cdef int ok
    with nogil:
        ok = lpm4_lookup(t, addr, &v)
    return v if ok else None


def _c_lpm6_lookup(LPMTrie t, bytes addr16):
    cdef uint32_t v
    if len(addr16) != 16:
        raise ValueError("addr16 must be 16 bytes")
    cdef const uint8_t* p = addr16
    cdef int ok
    with nogil:
        ok = lpm6_lookup(t, p, &v)
    return v if ok else None


def _c_egress_lookup4(EgressMap m, uint32_t src, uint32_t dst):
    """Test hook: egress_lookup4 -> (status, egress, gateway)."""
    cdef uint32_t e = 0, g = 0
    cdef int st
    with nogil:
        st = egress_lookup4(m, src, dst, &e, &g)
    return st, e, g


def _c_egress_lookup6(EgressMap m, bytes src16, bytes dst16):
    cdef uint8_t e[16]
    cdef uint8_t g[16]
    if len(src16) != 16 or len(dst16) != 16:
        raise ValueError("addresses must be 16 bytes")
    cdef const uint8_t* s = src16
    cdef const uint8_t* d = dst16
    cdef int st
    with nogil:
        st = egress_lookup6(m, s, d, e, g)
    if st == EGRESS_NO_MATCH:
        return st, None, None
    return st, bytes(e[:16]), bytes(g[:16])


def _c_egress_lookup4_section(EgressMap m, uint32_t[::1] src, uint32_t[::1] dst):
    """Test hook: a batch through one read section -> (status, egress, gateway) lists."""
    cdef Py_ssize_t i, n = src.shape[0]
    cdef uint32_t e, g
    cdef unsigned sec
    out = []
    sec = egress_read_begin(m)
    for i in range(n):
        e = g = 0
        st = egress_lookup4_in(m, src[i], dst[i], &e, &g)
        out.append((st, e, g))
    egress_read_end(m, sec)
    return out


# ---- probes of the read sections (tests/test_rcu.py) ------------------------

cdef extern from *:
    """
    #include <time.h>
    #include <unistd.h>
    /* A reader held in one section for `hold` seconds: a lookup in the
     * published table, a byte to entered_fd, a sleep, a lookup in the same
     * table pointer again, the clock, and out. */
    static void lpm_rcu_hold_lookup(lpm_trie *t, uint32_t addr, int entered_fd, double hold,
                                    uint32_t *v1, uint32_t *v2, uint64_t *left) {
        struct timespec ts, now;
        const lpm_table *tb;
        char one = 'x';
        ts.tv_sec = (time_t)hold;
        ts.tv_nsec = (long)((hold - (double)ts.tv_sec) * 1e9);
        lpm_rcu_read_lock();
        tb = lpm_trie_table(t);
        *v1 = lpm4_table_lookup(tb, addr);
        if (write(entered_fd, &one, 1) != 1) { /* the test sees no byte and fails */ }
        nanosleep(&ts, NULL);
        *v2 = lpm4_table_lookup(tb, addr);
        clock_gettime(CLOCK_MONOTONIC, &now);
        *left = (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
        lpm_rcu_read_unlock();
    }
    """
    void lpm_rcu_hold_lookup(lpm_trie* t, uint32_t addr, int entered_fd, double hold,
                             uint32_t* v1, uint32_t* v2, uint64_t* left) nogil


def _rcu_hold_lookup(LPMTrie t, uint32_t addr, int entered_fd, double hold):
    """Test hook: a reader that stays in one read section for `hold` seconds
    (GIL released): it looks `addr` up in t's published table, writes one
    byte to entered_fd, sleeps, then looks up again in the SAME table
    pointer it loaded and leaves.  Returns (first value, second value,
    time.monotonic_ns() just before it left)."""
    cdef uint32_t v1, v2
    cdef uint64_t left
    if t.family != 4:
        raise ValueError("_rcu_hold_lookup takes an IPv4 trie")
    with nogil:
        lpm_rcu_hold_lookup(t.c, addr, entered_fd, hold, &v1, &v2, &left)
    return v1, v2, left


def _rcu_section(int depth=1):
    """Test hook: enter `depth` nested read sections and leave them; returns
    (reading inside the innermost, reading after the last leave)."""
    cdef int _i
    for _i in range(depth):
        lpm_rcu_read_lock()
    inside = bool(lpm_rcu_reading())
    for _i in range(depth - 1):
        lpm_rcu_read_unlock()
    still = bool(lpm_rcu_reading())
    lpm_rcu_read_unlock()
    return inside and still, bool(lpm_rcu_reading())


def _rcu_slot():
    """Test hook: the address of the calling thread's reader slot (claimed now if need be)."""
    lpm_rcu_read_lock()
    lpm_rcu_read_unlock()
    return <size_t>lpm_rcu_my_slot()


def _rcu_slots():
    """Test hook: (slots claimed by live threads, slots in the registry)."""
    cdef uint64_t owned, total
    lpm_rcu_slots(&owned, &total)
    return owned, total
