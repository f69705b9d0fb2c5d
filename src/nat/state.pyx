# nat/state: a NatTable kept in a shared-memory file, so that its connections
# outlive the process (NatTable(state_path=...)).
#
# One file, mapped MAP_SHARED, holds what the other structures are derived
# from: the header, the egress IP records and the entries (holes are never
# backed, so a big, lightly used table costs what it holds).  Everything
# derived from the entries (mappings, the three indexes, the wheel, the
# per-source table, the port pools) and the nat_table struct itself stay in
# process memory, anonymous and with huge pages.
#
# A process killed mid-update may leave any entry half written, so adoption
# trusts nothing but what it checks: nat_state_rebuild builds every derived
# structure afresh from the entries, re-linking each one that passes
# nat_state_link's checks and dropping (and counting) the others.  Keeping the
# derived structures out of the file is what makes that cheap: their random
# writes land on huge pages (a 1M-connection table: 18 MB of indexes and 28 MB
# of mappings, a few dozen TLB entries), where in a tmpfs file (4 KiB pages:
# shmem_enabled is "never" by default) every one of them missed the TLB.
# nat_state_insert is the same check and link for one entry from elsewhere
# (a replication stream).

import errno as _st_errno
import fcntl as _st_fcntl
import logging as _st_logging
import os as _st_os

from libc.errno cimport errno
cdef extern from *:
    """
    #include <sys/mman.h>
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    #define EGC_MADV_POPULATE_WRITE MADV_POPULATE_WRITE
    """
    int EGC_MADV_POPULATE_WRITE

from posix.mman cimport MADV_HUGEPAGE, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, madvise, mmap, munmap

_st_log = _st_logging.getLogger("egresscore.nat.state")

NAT_STATE_MAGIC = b"EGCNAT\0\0"


class NatStateError(_EgressError):
    """A state file that cannot be used at all (held by another process, not
    creatable); a bad one is discarded instead (NatTable.state says why)."""


# ---------------------------------------------------------------------------
# entry validation and linking (C, nogil)

cdef inline void _nat_state_hashes(nat_table* t, const nat_entry* e, uint64_t* hs) noexcept nogil:
    """The entry's forward, reply and mapping hashes, whatever its bytes (a
    garbage egress index gives reply hash 0, a garbage IPv6 record index all
    0: the entry is refused anyway)."""
    hs[0] = hs[1] = hs[2] = 0
    if e.family == 6 and e.a0 >= t.a6_capacity:
        return
    hs[0] = _nat_e_hash_fwd(t, e)
    if e.ext < t.n_ext:
        hs[1] = _nat_e_hash_rev(t, e)
    hs[2] = _nat_e_hash_map(t, e)


cdef int nat_state_link(nat_table* t, uint32_t idx, uint64_t now,
                        const uint64_t* max_timeout) noexcept nogil:
    """Check entry idx (in place) and link it into the rebuilt table: indexes,
    mapping (found or made), port bitmap, per-source count, wheel.  Returns
    NAT_ADOPT_OK, or NAT_ADOPT_FREE/EXPIRED/INVALID with nothing linked.
    `max_timeout[state]` bounds a believable expiry (now + it)."""
    cdef uint64_t hs[3]
    _nat_state_hashes(t, &t.entries[idx], hs)
    return _nat_state_link_h(t, idx, now, max_timeout, hs)


cdef int _nat_state_link_h(nat_table* t, uint32_t idx, uint64_t now,
                           const uint64_t* max_timeout, const uint64_t* hs) noexcept nogil:
    """nat_state_link with the entry's hashes computed (_nat_state_hashes)."""
    cdef nat_entry* e = &t.entries[idx]
    cdef nat_pool* pool
    cdef nat_mapping* mp
    cdef nat_src* sr
    cdef uint64_t h = hs[0], mh = hs[2]
    cdef uint32_t m
    cdef uint8_t st = e.state
    cdef uint8_t sbuf[16]
    cdef uint8_t dbuf[16]
    cdef const uint8_t* src
    cdef const uint8_t* dst
    if st == NAT_STATE_FREE:
        return NAT_ADOPT_FREE
    if st >= NAT_NSTATES:
        return NAT_ADOPT_INVALID
    if e.family == 4:
        if e.proto != NAT_PROTO_TCP and e.proto != NAT_PROTO_UDP and e.proto != NAT_PROTO_ICMP:
            return NAT_ADOPT_INVALID
    elif e.family == 6:
        if e.proto != NAT_PROTO_TCP and e.proto != NAT_PROTO_UDP and e.proto != NAT_PROTO_ICMPV6:
            return NAT_ADOPT_INVALID
    else:
        return NAT_ADOPT_INVALID
    if e.proto == NAT_PROTO_TCP:
        if st != NAT_STATE_SYN_SENT and st != NAT_STATE_ESTABLISHED and st != NAT_STATE_CLOSING:
            return NAT_ADOPT_INVALID
    elif e.proto == NAT_PROTO_UDP:
        if st != NAT_STATE_UDP:
            return NAT_ADOPT_INVALID
    elif st != NAT_STATE_ICMP or e.dport != 0:
        return NAT_ADOPT_INVALID
    if (e.flags & NAT_F_MASK & ~(NAT_F_FIN_OUT | NAT_F_FIN_IN | NAT_F_RST)) != 0:
        return NAT_ADOPT_INVALID
    if e.family == 6:
        # its addresses' record: in the pool, and no other entry's
        if e.a0 >= t.a6_capacity or e.a1 != 0:
            return NAT_ADOPT_INVALID
        if t.a6_claim != NULL and (t.a6_claim[e.a0 >> 6] >> (e.a0 & 63)) & 1:
            return NAT_ADOPT_INVALID
    src = _nat_e_src(t, e, sbuf)
    dst = _nat_e_dst(t, e, dbuf)
    if e.ext >= t.n_ext or t.ext[e.ext].family != e.family:
        return NAT_ADOPT_INVALID
    pool = t.ext[e.ext].pools[_nat_pool_of(e.proto)]
    if e.xport < pool.lo or e.xport > pool.hi:
        return NAT_ADOPT_INVALID
    if e.expires <= now:
        return NAT_ADOPT_EXPIRED
    if e.expires - now > max_timeout[st]:
        return NAT_ADOPT_INVALID
    if _nat_find_fwd(t, h, e.family, e.proto, e.sport, e.dport, src, dst) != NAT_NONE:
        return NAT_ADOPT_INVALID                     # the same flow twice
    # endpoint-independent mapping: every connection of (pod address, port,
    # egress IP, proto) has one xport, and no other endpoint holds it
    m = _nat_find_map(t, mh, e.family, e.proto, e.sport, e.ext, src)
    if m != NAT_NONE:
        mp = &t.mappings[m]
        if mp.xport != e.xport:
            return NAT_ADOPT_INVALID
    else:
        if not _nat_port_free(pool, e.xport):
            return NAT_ADOPT_INVALID                 # another endpoint's port
        if t.mappings_hwm >= t.map_capacity:
            return NAT_ADOPT_INVALID                 # never: at most one per entry
        if e.family == 6 and t.m6_used >= t.a6_capacity:
            return NAT_ADOPT_INVALID                 # never: at most one per IPv6 entry
        m = t.mappings_hwm
        t.mappings_hwm += 1
        mp = &t.mappings[m]
        mp.addr = _nat_m6_take(t, src) if e.family == 6 else e.a0
        mp.port = e.sport
        mp.xport = e.xport
        mp.ext = e.ext
        mp.family = e.family
        mp.proto = e.proto
        mp.refcnt = 0
        _nat_port_take(pool, e.xport)
        _nat_index_insert(&t.map, mh, m)
        t.map_used += 1
    mp.refcnt += 1
    _nat_e_set_mapping(e, m, _nat_e_policy(e))       # the policy id stays
    if t.src_limit:
        sr = _nat_src_find(t, e.family, src)
        if sr.meta == 0:
            memcpy(sr.addr, src, 16)
            sr.meta = NAT_SRC_V6 if e.family == 6 else 0
            t.src_used += 1
        sr.meta += 1
    _nat_index_insert(&t.fwd, h, idx)
    _nat_index_insert(&t.rev, hs[1], idx)
    _nat_wheel_add(t, idx)
    t.used += 1
    if e.family == 6:
        t.a6_used += 1
        if t.a6_claim != NULL:
            t.a6_claim[e.a0 >> 6] |= (<uint64_t>1) << (e.a0 & 63)
    if _nat_e_policy(e):
        t.pol[policy_slot(_nat_e_policy(e))].live += 1
    return NAT_ADOPT_OK


cdef void nat_state_rebuild(nat_table* t, uint64_t now, const uint64_t* max_timeout,
                            uint32_t scan, uint64_t* counts) noexcept nogil:
    """Build everything but the entries from the entries [0, scan) (the
    caller gives empty indexes, wheel and per-source table, in process
    memory, and initialised pools).  counts[NAT_ADOPT_*] += entries of each kind.

    One pass, a software pipeline as in the batch translation: entry i is
    hashed and its three index slots (and per-source slot) prefetched,
    entry i - NAT_PF_ENTRY's mapping is prefetched from its map slot, and
    entry i - NAT_PF_SLOT is checked and linked from cached lines.  The free
    list (lowest index first) is threaded on the way."""
    cdef uint64_t ring[32][3]
    cdef uint64_t* hs
    cdef uint64_t i, j
    cdef uint32_t s, last = 0
    cdef uint32_t tail = NAT_NONE, tail_last = NAT_NONE
    cdef nat_entry* e
    cdef int rc
    cdef uint32_t r, a6_last = 0
    cdef uint8_t buf[16]
    t.used = t.map_used = t.src_used = 0
    t.mappings_hwm = 0
    t.map_free_head = NAT_NONE
    t.free_head = NAT_NONE
    t.a6_used = t.m6_used = t.m6_hwm = 0
    t.m6_free_head = t.a6_free_head = NAT_NONE
    t.wheel_cur = now >> NAT_WHEEL_SHIFT
    for i in range(<uint64_t>scan + NAT_PF_SLOT):
        if i < scan:
            if i + NAT_PF_SLOT < scan:
                nat_prefetch(&t.entries[i + NAT_PF_SLOT])
                nat_prefetch(<char*>&t.entries[i + NAT_PF_SLOT] + sizeof(nat_entry) - 1)
            e = &t.entries[i]
            hs = ring[i & 31]
            if e.state != NAT_STATE_FREE:
                _nat_state_hashes(t, e, hs)
                nat_prefetch_w(&t.fwd.slots[_nat_home(&t.fwd, hs[0])])
                nat_prefetch_w(&t.rev.slots[_nat_home(&t.rev, hs[1])])
                nat_prefetch_w(&t.map.slots[_nat_home(&t.map, hs[2])])
                if e.ext < t.n_ext:
                    nat_prefetch_w(&t.ext[e.ext].pools[_nat_pool_of(e.proto)].bits[e.xport >> 6])
                if t.src_limit and (e.family != 6 or e.a0 < t.a6_capacity):
                    nat_prefetch_w(&t.src[_nat_src_home(t, e.family, _nat_e_src(t, e, buf))])
        j = i - NAT_PF_ENTRY
        if NAT_PF_ENTRY <= i and j < scan and t.entries[j].state != NAT_STATE_FREE:
            s = _nat_peek(&t.map, ring[j & 31][2])
            if s != 0:
                nat_prefetch_w(&t.mappings[_nat_slot_idx(&t.map, s)])
        j = i - NAT_PF_SLOT
        if i < NAT_PF_SLOT:
            continue
        e = &t.entries[j]
        if e.state == NAT_STATE_FREE:
            rc = NAT_ADOPT_FREE
        else:
            rc = _nat_state_link_h(t, <uint32_t>j, now, max_timeout, ring[j & 31])
        counts[rc] += 1
        if rc == NAT_ADOPT_OK:
            last = <uint32_t>j + 1
            tail_last = tail
            if e.family == 6 and e.a0 + 1 > a6_last:
                a6_last = e.a0 + 1
            continue
        if rc != NAT_ADOPT_FREE:
            memset(e, 0, sizeof(nat_entry))
        # a free slot: appended to the free list (cut back to below `last` at the end)
        e.mapping = NAT_NONE
        if tail == NAT_NONE:
            t.free_head = <uint32_t>j
        else:
            t.entries[tail].mapping = <uint32_t>j
        tail = <uint32_t>j
    t.entries_hwm = last
    # entries [last, scan) that were free or dropped are zero-state: handed out
    # again by the high-water mark, not the free list
    if tail_last == NAT_NONE:
        t.free_head = NAT_NONE
    else:
        t.entries[tail_last].mapping = NAT_NONE
    # the IPv6 address records: those of adopted entries taken, the others
    # below the last taken one free (lowest first), the rest never used
    t.a6_hwm = a6_last
    r = a6_last
    while r > 0:
        r -= 1
        if not (t.a6_claim[r >> 6] >> (r & 63)) & 1:
            memset(&t.a6[r], 0, sizeof(nat_addr6))
            memcpy(t.a6[r].src, &t.a6_free_head, 4)
            t.a6_free_head = r


cdef int nat_state_insert(nat_table* t, const nat_entry* e, const uint8_t* src,
                          const uint8_t* dst, uint64_t now) noexcept nogil:
    """Insert one connection from outside (a replication record): checked and
    linked as at adoption, against the table's own timeouts.  `e` holds
    everything but the addresses, src and dst (16 bytes each, IPv4 zero past
    its 4).  Returns NAT_ADOPT_OK, NAT_ADOPT_FULL, or
    NAT_ADOPT_INVALID/EXPIRED (nothing kept)."""
    return _nat_state_insert_t(t, e, src, dst, now, t.timeout)


cdef void nat_state_convert3(nat_table* t, const nat_entry_v3* old, uint64_t n, uint64_t now,
                             const uint64_t* max_timeout, uint64_t* counts) noexcept nogil:
    """Insert the live entries of a format 3 file's entries [0, n) (80 bytes,
    addresses in line), each checked and linked as at adoption (with the
    adoption's timeouts `max_timeout`); counts[rc] += 1 per non-free entry.
    Keeps ports, policy id, state, flags, expiry, creation time and counters;
    the expiry links and the mapping index are rebuilt."""
    cdef nat_entry e
    cdef uint64_t i
    cdef uint64_t created = t.created_count
    cdef int rc
    for i in range(n):
        if old[i].state == NAT_STATE_FREE:
            continue
        memset(&e, 0, sizeof(nat_entry))
        e.expires = old[i].expires
        e.sport = old[i].sport
        e.dport = old[i].dport
        e.xport = old[i].xport
        e.ext = old[i].ext
        e.family = old[i].family
        e.proto = old[i].proto
        e.state = old[i].state
        e.flags = old[i].flags
        e.mapping = old[i].mapping          # its policy id's low bits (top byte)
        _nat_e_set_mapping(&e, 0, _nat_e_policy(&e))
        e.created_ms = old[i].created_ms
        e.nbytes[0] = old[i].nbytes[0]
        e.nbytes[1] = old[i].nbytes[1]
        e.npkts[0] = old[i].npkts[0]
        e.npkts[1] = old[i].npkts[1]
        rc = _nat_state_insert_t(t, &e, old[i].src, old[i].dst, now, max_timeout)
        counts[rc] += 1
    t.created_count = created                # carried over, not created here


cdef int _nat_state_insert_t(nat_table* t, const nat_entry* e, const uint8_t* src,
                             const uint8_t* dst, uint64_t now, const uint64_t* max_timeout) noexcept nogil:
    """nat_state_insert against the timeouts `max_timeout`."""
    cdef uint32_t idx
    cdef bint from_hwm = False
    cdef int rc
    if e.state == NAT_STATE_FREE:
        return NAT_ADOPT_INVALID
    if e.family == 4:
        if not _nat_v4_clean(4, src) or not _nat_v4_clean(4, dst):
            return NAT_ADOPT_INVALID
    elif e.family == 6:
        if t.a6_used >= t.a6_capacity or t.m6_used >= t.a6_capacity:
            t.a6_full += 1
            return NAT_ADOPT_FULL
    else:
        return NAT_ADOPT_INVALID
    idx = t.free_head
    if idx != NAT_NONE:
        t.free_head = t.entries[idx].mapping
    elif t.entries_hwm < t.capacity:
        idx = t.entries_hwm
        t.entries_hwm += 1
        from_hwm = True
    else:
        return NAT_ADOPT_FULL
    if t.wheel_cur == NAT_WHEEL_UNSET:
        t.wheel_cur = now >> NAT_WHEEL_SHIFT
    memcpy(&t.entries[idx], e, sizeof(nat_entry))
    if e.family == 6:
        t.entries[idx].a0 = _nat_a6_take(t, src, dst)
        t.entries[idx].a1 = 0
        t.a6_used -= 1              # counted again by nat_state_link
    else:
        t.entries[idx].a0 = _nat_load32(src)
        t.entries[idx].a1 = _nat_load32(dst)
    rc = nat_state_link(t, idx, now, max_timeout)
    if rc == NAT_ADOPT_OK:
        t.created_count += 1
        return rc
    if e.family == 6:
        t.a6_used += 1
        _nat_a6_put(t, t.entries[idx].a0)
    memset(&t.entries[idx], 0, sizeof(nat_entry))
    if from_hwm:
        t.entries_hwm -= 1
    else:
        t.entries[idx].mapping = t.free_head
        t.free_head = idx
    return rc


# ---------------------------------------------------------------------------
# the file: layout, header, open / create / adopt (Python, at table creation)

cdef inline uint64_t _st_page(uint64_t x) noexcept nogil:
    return (x + 4095) & ~(<uint64_t>4095)


def _nat_state_regions(capacity, a6_capacity=None):
    """{region: (offset, bytes)} and the file size for a table of `capacity`
    with `a6_capacity` IPv6 address records (None: the default for `capacity`)."""
    if a6_capacity is None:
        a6_capacity = _nat_ipv6_capacity(capacity)
    off = NAT_STATE_HDR_SIZE
    regions = {}
    for name, size in (("ext", NAT_MAX_EXT * sizeof(nat_state_ext)),
                       ("entries", capacity * sizeof(nat_entry)),
                       ("a6", a6_capacity * sizeof(nat_addr6))):
        regions[name] = (off, size)
        off = _st_page(off + size)
    return regions, off


def _nat_state_regions_v3(capacity):
    """{region: (offset, bytes)} and the file size of a format 3 file of
    `capacity` (80-byte entries, no a6 region)."""
    off = NAT_STATE_HDR_SIZE
    regions = {}
    for name, size in (("ext", NAT_MAX_EXT * sizeof(nat_state_ext)),
                       ("entries", capacity * sizeof(nat_entry_v3))):
        regions[name] = (off, size)
        off = _st_page(off + size)
    return regions, off


def _nat_state_read_v3(st, capacity):
    """The data of a format 3 file's entries region (up to its last
    non-hole byte: entries are handed out from index 0)."""
    off, nbytes = _nat_state_regions_v3(capacity)[0]["entries"]
    end = _nat_state_data_end(st.fd, off, off + nbytes)
    n = min(capacity, (end - off + sizeof(nat_entry_v3) - 1) // sizeof(nat_entry_v3))
    raw = _st_os.pread(st.fd, n * sizeof(nat_entry_v3), off)
    if len(raw) != n * sizeof(nat_entry_v3):
        raise NatStateError(f"NAT state file {st.path}: short read of its format 3 entries")
    return raw


def _nat_state_layout():
    """Checksum (FNV-1a 64) of the sizes and field offsets the file depends
    on, as this build compiled them: a build whose structs differ refuses
    another's file."""
    cdef nat_entry e
    cdef nat_mapping m
    cdef nat_addr6 a
    cdef nat_pool p
    cdef nat_src s
    cdef nat_state_hdr hd
    cdef nat_state_ext x
    cdef char* b = <char*>&e
    cdef list vals
    cdef object h, v, byte
    vals = [NAT_STATE_VERSION, NAT_STATE_HDR_SIZE, NAT_MAX_EXT, NAT_NPOOLS, NAT_NSTATES,
            NAT_WHEEL_SLOTS, NAT_WHEEL_SHIFT,
            sizeof(nat_entry), <char*>&e.a0 - b, <char*>&e.a1 - b, <char*>&e.expires - b,
            <char*>&e.sport - b, <char*>&e.dport - b, <char*>&e.xport - b, <char*>&e.ext - b,
            <char*>&e.mapping - b, <char*>&e.family - b, <char*>&e.proto - b,
            <char*>&e.state - b, <char*>&e.flags - b, <char*>&e.created_ms - b,
            <char*>&e.nbytes - b, <char*>&e.npkts - b, <char*>&e.wl - b]
    b = <char*>&m
    vals += [sizeof(nat_mapping), <char*>&m.addr - b, <char*>&m.port - b, <char*>&m.xport - b,
             <char*>&m.ext - b, <char*>&m.family - b, <char*>&m.proto - b, <char*>&m.refcnt - b]
    b = <char*>&a
    vals += [sizeof(nat_addr6), <char*>&a.src - b, <char*>&a.dst - b]
    b = <char*>&p
    vals += [sizeof(nat_pool), <char*>&p.lo - b, <char*>&p.hi - b, <char*>&p.nfree - b,
             <char*>&p.used - b, <char*>&p.bits - b, <char*>&p.full - b]
    b = <char*>&s
    vals += [sizeof(nat_src), <char*>&s.addr - b, <char*>&s.meta - b]
    b = <char*>&hd
    vals += [sizeof(nat_state_hdr), <char*>&hd.layout - b, <char*>&hd.boot_id - b,
             <char*>&hd.capacity - b, <char*>&hd.n_ext - b, <char*>&hd.timeout - b,
             <char*>&hd.port_hi - b, <char*>&hd.a6_capacity - b]
    b = <char*>&x
    vals += [sizeof(nat_state_ext), <char*>&x.addr - b, <char*>&x.lo - b, <char*>&x.hi - b]
    h = 0xcbf29ce484222325
    for v in vals:
        for byte in int(v).to_bytes(8, "little"):
            h = ((h ^ byte) * 0x100000001b3) & 0xffffffffffffffff
    return h


NAT_STATE_LAYOUT = _nat_state_layout()


def _nat_boot_id():
    """This boot's id: CLOCK_MONOTONIC (the expiry clock) restarts with it."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()[:39]
    except OSError:
        return b"unknown"


cdef str _nat_state_check(const nat_state_hdr* h, uint64_t size, uint32_t capacity,
                          uint32_t a6_capacity, uint64_t expect_size, bytes boot, uint64_t now):
    """Why the header cannot be adopted by a table of `capacity`, or None."""
    if bytes(h.magic[:8]) != NAT_STATE_MAGIC:
        return f"bad magic {bytes(h.magic[:8])!r} (not a NAT state file)"
    cdef bint v3 = h.version == 3         # converted (80-byte entries): checked as format 3 was
    if h.version == 2:
        return (f"format version 2 (80-byte entries, the indexes in the file), this build reads "
                f"version {NAT_STATE_VERSION} and converts version 3")
    if h.version != NAT_STATE_VERSION and not v3:
        return f"format version {h.version}, this build reads version {NAT_STATE_VERSION} (and converts 3)"
    if v3:
        expect_size = _nat_state_regions_v3(capacity)[1]
    elif h.layout != NAT_STATE_LAYOUT:
        return (f"layout checksum {h.layout:#018x} differs from this build's {NAT_STATE_LAYOUT:#018x} "
                f"(written by a build with other structs)")
    if h.hdr_size != NAT_STATE_HDR_SIZE:
        return f"header size {h.hdr_size}, expected {NAT_STATE_HDR_SIZE}"
    file_boot = bytes(h.boot_id[:40]).rstrip(b"\0")
    if file_boot != boot:
        return (f"written under boot {file_boot.decode(errors='replace')!r}, this is boot "
                f"{boot.decode(errors='replace')!r} (expiry times are on the old boot's monotonic clock)")
    if h.capacity != capacity:
        return f"capacity {h.capacity}, this table asks for {capacity} (a table is not resized)"
    if not v3 and h.a6_capacity != a6_capacity:
        return (f"IPv6 capacity {h.a6_capacity}, this table asks for {a6_capacity} "
                f"(a table is not resized)")
    if h.index_slots != _nat_index_slots(capacity) or h.src_slots != h.index_slots:
        return f"index sizes {h.index_slots}/{h.src_slots} do not match capacity {capacity}"
    if h.file_size != expect_size:
        return f"header says {h.file_size} bytes, a table of capacity {capacity} needs {expect_size}"
    if size < expect_size:
        return f"truncated: {size} bytes, a table of capacity {capacity} needs {expect_size}"
    if size > expect_size:
        return f"{size} bytes, longer than the {expect_size} a table of capacity {capacity} needs"
    if h.n_ext > NAT_MAX_EXT:
        return f"{h.n_ext} egress IPs recorded, at most {NAT_MAX_EXT}"
    if h.created_mono_ns > now:
        return f"created at monotonic {h.created_mono_ns} ns, after now ({now} ns)"
    for k in range(NAT_NSTATES):
        if h.timeout[k] > <uint64_t>(10 * 365 * 86400) * 1000000000:
            return f"timeout of state {k} is {h.timeout[k]} ns (corrupt)"
    return None


cdef str _nat_state_ext_check(const nat_state_ext* x, uint32_t n):
    """Why the egress IP records [0, n) are unusable, or None."""
    cdef uint32_t i
    cdef int k
    cdef set seen = set()
    cdef tuple key
    for i in range(n):
        if x[i].family not in (4, 6) or not _nat_v4_clean(x[i].family, x[i].addr):
            return f"egress IP record {i} is corrupt (family {x[i].family})"
        key = (x[i].family, bytes(x[i].addr[:16]))
        if key in seen:
            return f"egress IP record {i} repeats {_nat_ip_str(x[i].family, x[i].addr)}"
        seen.add(key)
        for k in range(NAT_NPOOLS):
            if not 1 <= x[i].lo[k] <= x[i].hi[k] <= 65535:
                return f"egress IP record {i} has port range {x[i].lo[k]}-{x[i].hi[k]}"
    return None


def _nat_state_data_end(fd, start, end):
    """Offset past the last byte of data (not a hole) in [start, end): the
    entries are handed out from index 0, so holes after them are never read."""
    last = start
    pos = start
    try:
        while pos < end:
            data = _st_os.lseek(fd, pos, _st_os.SEEK_DATA)
            if data >= end:
                break
            hole = _st_os.lseek(fd, data, _st_os.SEEK_HOLE)
            last = min(hole, end)
            pos = hole
    except OSError as exc:
        if exc.errno == _st_errno.ENXIO:      # no data after pos
            return last
        return end                             # no SEEK_DATA here: scan it all
    return last


class _NatStateFile:
    """The open state file: its descriptor (locked for the table's life) and
    what happened at open (NatTable.state)."""

    def __init__(self, path):
        self.path = _st_os.fspath(path)
        self.fd = -1
        self.convert = None             # a format 3 file's entries, until converted
        self.status = {"path": self.path, "adopted": False, "reason": None, "message": "",
                       "connections": 0, "invalid": 0, "expired": 0, "adopt_ms": 0.0}

    def open(self):
        """Open (creating) and lock the file; its size."""
        parent = _st_os.path.dirname(self.path)
        if parent:
            _st_os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            self.fd = _st_os.open(self.path, _st_os.O_RDWR | _st_os.O_CREAT | _st_os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise NatStateError(f"NAT state file {self.path}: cannot open: {exc.strerror}") from None
        try:
            _st_fcntl.flock(self.fd, _st_fcntl.LOCK_EX | _st_fcntl.LOCK_NB)
        except OSError:
            _st_os.close(self.fd)
            self.fd = -1
            raise NatStateError(f"NAT state file {self.path} is in use by another process "
                                f"(locked): one table per file") from None
        return _st_os.fstat(self.fd).st_size

    def reject(self, reason):
        """Set the bad file aside (PATH.rejected) and open a fresh one."""
        _st_os.close(self.fd)
        self.fd = -1
        try:
            _st_os.replace(self.path, self.path + ".rejected")
        except OSError:
            _st_os.unlink(self.path)
        self.status["reason"] = reason
        self.status["message"] = (f"NAT state file {self.path} refused: {reason}; set aside as "
                                  f"{self.path}.rejected, the table starts empty")
        _st_log.warning("%s", self.status["message"])
        return self.open()

    def set_aside(self, suffix):
        """Move the file (read) aside as PATH + suffix and open a fresh one."""
        _st_os.close(self.fd)
        self.fd = -1
        _st_os.replace(self.path, self.path + suffix)
        return self.open()

    def fresh(self, size):
        """Empty the file and size it (sparse: nothing is backed)."""
        _st_os.ftruncate(self.fd, 0)
        _st_os.ftruncate(self.fd, size)

    def close(self):
        if self.fd >= 0:
            _st_os.close(self.fd)
            self.fd = -1

    __del__ = close

    def discard(self):
        """Remove the file (a clean stop that does not keep the state)."""
        try:
            _st_os.unlink(self.path)
        except FileNotFoundError:
            pass


cdef char* _nat_state_mmap(int fd, size_t size, str path) except NULL:
    """The whole file mapped shared (readable, writable)."""
    cdef void* p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if p == MAP_FAILED:
        raise errno_error(errno, f"NAT state file {path}: mapping {size} bytes")
    madvise(p, size, MADV_HUGEPAGE)     # honoured on tmpfs when shmem_enabled says "advise"
    return <char*>p


cdef void _nat_state_munmap(char* p, size_t size) noexcept:
    munmap(p, size)


cdef inline char* _st_at(char* base, object region):
    """The address of a region (offset, bytes) of the mapping at base."""
    return base + <size_t>region[0]


cdef void _nat_state_populate(char* base, uint64_t off, uint64_t size) noexcept:
    """Map [off, off + size) of the shared mapping writable in one call
    (backing holes); a kernel without MADV_POPULATE_WRITE faults them later."""
    cdef uint64_t o = off & ~(<uint64_t>4095)
    if size:
        madvise(base + o, _st_page(off + size) - o, EGC_MADV_POPULATE_WRITE)
