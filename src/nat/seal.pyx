# nat/seal: checksums of a NAT state file, written at a clean stop, checked at adoption.
#
# Entry-by-entry checks (nat_state_link) catch an entry whose fields cannot
# be, not one whose pod address or port was changed to another that can: a
# flipped byte there would translate with garbage.  Checksumming the entries
# as they change would cost work per packet (their counters and expiry move
# with every packet), so the file is sealed instead when nothing writes it
# any more: NatTable.seal_state() (the agent's stop with keep_state) writes
# PATH.seal, a checksum of the header, of the egress IP records and of every
# group of NAT_SEAL_GROUP entries below the high-water mark, and of every
# group of NAT_SEAL_GROUP IPv6 address records below theirs.  The next table
# that opens the file takes the seal (and removes it at once: from then on
# the file changes again, and a crash must not leave a stale seal):
#
#   - no seal (a crash, kill -9): the entries are checked one by one as before;
#   - a seal of this file (same creation time and adoption count) whose
#     header or egress IP checksum differs: the file is refused;
#   - a group whose checksum differs: its entries are dropped (counted as
#     "corrupt"), the others adopted; an entry above the sealed high-water
#     mark that is not free is dropped too; so is an IPv6 entry whose address
#     record lies in a group whose checksum differs, or above the records'
#     sealed high-water mark;
#   - a seal that is not one (its own checksum, its size) or of another
#     file: ignored, said so, the entries checked one by one.
#
# The checksum: four 64-bit lanes over the words, each step h = (h ^ w) * P,
# h ^= h >> 29 (a bijection of h for a fixed word and of the word for a fixed
# h), so any change to one word changes the sum; ~1 ns per 32 bytes.

import struct as _seal_struct
import time as _seal_time

NAT_SEAL_MAGIC = b"EGCSEAL1"
cdef enum:
    _SEAL_VERSION = 2            # 2: the IPv6 address records are sealed too (state format 4)
cdef enum:
    _SEAL_GROUP = 64             # entries per checksum: one bad byte costs at most 64 connections
NAT_SEAL_GROUP = _SEAL_GROUP
# magic, version, group, capacity, hwm, hdr, ext, created, adopted, IPv6 records' hwm
_SEAL_HEAD = _seal_struct.Struct("<8sIIIIQQQQII")


cdef inline uint64_t _seal_step(uint64_t h, uint64_t w) noexcept nogil:
    h = (h ^ w) * <uint64_t>0x9e3779b97f4a7c15
    return h ^ (h >> 29)


cdef uint64_t nat_seal_sum(const uint8_t* p, size_t n) noexcept nogil:
    """The checksum of n bytes at p (n a multiple of 8)."""
    cdef uint64_t h0 = 0x243f6a8885a308d3, h1 = 0x13198a2e03707344
    cdef uint64_t h2 = 0xa4093822299f31d0, h3 = 0x082efa98ec4e6c89
    cdef size_t i = 0, words = n // 8
    while i + 4 <= words:
        h0 = _seal_step(h0, nat_load64(p + 8 * i))
        h1 = _seal_step(h1, nat_load64(p + 8 * i + 8))
        h2 = _seal_step(h2, nat_load64(p + 8 * i + 16))
        h3 = _seal_step(h3, nat_load64(p + 8 * i + 24))
        i += 4
    while i < words:
        h0 = _seal_step(h0, nat_load64(p + 8 * i))
        i += 1
    h0 = _seal_step(h0, <uint64_t>n)
    return _seal_step(_seal_step(_seal_step(h0, h1), h2), h3)


def _nat_seal_bytes(data):
    """nat_seal_sum of a bytes object (its length padded to 8 with zeros)."""
    cdef bytes b = bytes(data) + bytes((8 - len(data) % 8) % 8)
    return nat_seal_sum(<const uint8_t*><const char*>b, len(b))


cdef bytes _nat_seal_groups(const uint8_t* base, size_t size, uint32_t hwm):
    """The checksums (u64 little-endian) of records [0, hwm) of `size` bytes
    at base (entries, IPv6 address records) in groups of _SEAL_GROUP."""
    cdef uint32_t ng = (hwm + _SEAL_GROUP - 1) // _SEAL_GROUP
    cdef bytearray out = bytearray(8 * ng)
    cdef uint64_t* o = <uint64_t*><char*>out
    cdef uint32_t g, n
    with nogil:
        for g in range(ng):
            n = min(<uint32_t>_SEAL_GROUP, hwm - g * _SEAL_GROUP)
            o[g] = nat_seal_sum(base + <size_t>g * _SEAL_GROUP * size, n * size)
    return bytes(out)


def _nat_seal_path(path):
    return path + ".seal"


cdef object nat_seal_write(NatTable table):
    """Seal the table's state file (nothing may write the table from now on):
    PATH.seal, written whole then renamed.  Returns its status dict."""
    cdef nat_table* t = table.t
    cdef nat_state_hdr* h
    st = table._state
    if st is None or table._smap == NULL:
        raise NatStateError("seal_state: this table has no state file")
    started = _seal_time.perf_counter()
    h = <nat_state_hdr*>table._smap
    hdr = (<char*>table._smap)[:sizeof(nat_state_hdr)]
    ext = (<char*>_st_at(table._smap, st.regions["ext"]))[:h.n_ext * sizeof(nat_state_ext)]
    with table._lock:
        hwm = t.entries_hwm
        a6hwm = t.a6_hwm
        sums = _nat_seal_groups(<const uint8_t*>t.entries, sizeof(nat_entry), hwm)
        sums6 = _nat_seal_groups(<const uint8_t*>t.a6, sizeof(nat_addr6), a6hwm)
    body = _SEAL_HEAD.pack(NAT_SEAL_MAGIC, _SEAL_VERSION, _SEAL_GROUP, t.capacity, hwm, _nat_seal_bytes(hdr),
                           _nat_seal_bytes(ext), h.created_mono_ns, h.adopted_count, a6hwm, 0) + sums + sums6
    body += _seal_struct.pack("<Q", _nat_seal_bytes(body))
    path = _nat_seal_path(st.path)
    tmp = path + ".tmp"
    fd = _st_os.open(tmp, _st_os.O_WRONLY | _st_os.O_CREAT | _st_os.O_TRUNC | _st_os.O_CLOEXEC, 0o600)
    try:
        _st_os.write(fd, body)
    finally:
        _st_os.close(fd)
    _st_os.replace(tmp, path)
    ms = (_seal_time.perf_counter() - started) * 1e3
    return {"path": path, "entries": hwm, "groups": len(sums) // 8, "ms": ms}


def _nat_seal_take(st):
    """Read and remove PATH.seal (the file is about to change); its raw bytes or None."""
    path = _nat_seal_path(st.path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    try:
        _st_os.unlink(path)
    except OSError:
        pass
    return raw


def _nat_seal_check(st, raw, hdr_raw, ext_raw, capacity):
    """Compare a taken seal with the file's header and egress IP records.
    Returns the reason to refuse the file, or None; st.seal is set to
    (hwm, group sums) for a seal that holds, else None (with st.seal_note)."""
    cdef const nat_state_hdr* h = <const nat_state_hdr*><const char*>hdr_raw
    st.seal = None
    st.seal_note = ""
    if raw is None:
        st.seal_note = "; not sealed (no clean stop): checked entry by entry"
        return None
    n = _SEAL_HEAD.size
    ok = len(raw) >= n + 8 and (len(raw) - n - 8) % 8 == 0
    if ok:
        magic, version, group, cap, hwm, hsum, xsum, created, adopted, a6hwm, _ = _SEAL_HEAD.unpack_from(raw)
        (own,) = _seal_struct.unpack_from("<Q", raw, len(raw) - 8)
        ok = (magic == NAT_SEAL_MAGIC and version == _SEAL_VERSION and own == _nat_seal_bytes(raw[:len(raw) - 8])
              and group == _SEAL_GROUP and hwm <= cap and a6hwm <= cap
              and len(raw) - n - 8 == 8 * ((hwm + group - 1) // group + (a6hwm + group - 1) // group))
    if not ok:
        st.seal_note = "; its seal is corrupt (ignored): checked entry by entry"
        _st_log.warning("NAT state file %s: seal %s is corrupt, ignored", st.path, _nat_seal_path(st.path))
        return None
    if cap != capacity or created != h.created_mono_ns or adopted != h.adopted_count:
        st.seal_note = "; its seal is of another file (ignored): checked entry by entry"
        return None
    if hsum != _nat_seal_bytes(hdr_raw[:sizeof(nat_state_hdr)]):
        return "header checksum differs from the one sealed at its clean stop (corrupt header)"
    if xsum != _nat_seal_bytes(ext_raw):
        return "egress IP records' checksum differs from the one sealed at its clean stop (corrupt records)"
    ng = (hwm + _SEAL_GROUP - 1) // _SEAL_GROUP
    st.seal = (hwm, raw[n:n + 8 * ng], a6hwm, raw[n + 8 * ng:len(raw) - 8])
    return None


cdef uint64_t nat_seal_apply(nat_table* t, object st, uint32_t scan):
    """Before the rebuild: drop (zero) every group of entries [0, scan) whose
    checksum differs from the seal, every non-free entry above the sealed
    high-water mark, and every IPv6 entry whose address record is in a group
    whose checksum differs or above the records' sealed high-water mark.
    Returns the non-free entries dropped."""
    cdef uint32_t hwm, a6hwm, g, ng, n, i, r
    cdef uint64_t dropped = 0, bad = 0
    cdef const uint64_t* sums
    cdef const uint64_t* sums6
    cdef bytes raw, raw6
    cdef bytearray bad6
    cdef uint8_t* b6
    if st.seal is None:
        st.status.update(sealed=False, corrupt=0)
        return 0
    hwm = min(<uint32_t>st.seal[0], t.capacity)
    raw = st.seal[1]
    sums = <const uint64_t*><const char*>raw
    ng = (hwm + _SEAL_GROUP - 1) // _SEAL_GROUP
    a6hwm = min(<uint32_t>st.seal[2], t.a6_capacity)
    raw6 = st.seal[3]
    sums6 = <const uint64_t*><const char*>raw6
    bad6 = bytearray((a6hwm + _SEAL_GROUP - 1) // _SEAL_GROUP + 1)
    b6 = <uint8_t*><char*>bad6
    with nogil:
        for g in range((a6hwm + _SEAL_GROUP - 1) // _SEAL_GROUP):
            n = min(<uint32_t>_SEAL_GROUP, a6hwm - g * _SEAL_GROUP)
            if nat_seal_sum(<const uint8_t*>&t.a6[g * _SEAL_GROUP], n * sizeof(nat_addr6)) != sums6[g]:
                bad += 1
                b6[g] = 1
        for g in range(ng):
            if g * _SEAL_GROUP >= scan:
                break
            n = min(<uint32_t>_SEAL_GROUP, hwm - g * _SEAL_GROUP)
            if nat_seal_sum(<const uint8_t*>&t.entries[g * _SEAL_GROUP], n * sizeof(nat_entry)) != sums[g]:
                bad += 1
                for i in range(g * _SEAL_GROUP, g * _SEAL_GROUP + n):
                    if t.entries[i].state != NAT_STATE_FREE:
                        dropped += 1
                    memset(&t.entries[i], 0, sizeof(nat_entry))
        for i in range(hwm, scan):
            if t.entries[i].state != NAT_STATE_FREE:
                dropped += 1
                memset(&t.entries[i], 0, sizeof(nat_entry))
        # then (the entries' checksums are over what they were sealed as) the
        # IPv6 entries whose address record is corrupt or was never sealed
        for i in range(scan):
            if t.entries[i].state != NAT_STATE_FREE and t.entries[i].family == 6:
                r = t.entries[i].a0
                if r >= a6hwm or b6[r // _SEAL_GROUP]:
                    dropped += 1
                    memset(&t.entries[i], 0, sizeof(nat_entry))
    st.status.update(sealed=True, corrupt=dropped)
    if bad or dropped:
        st.seal_note = (f"; sealed at a clean stop: {bad} group(s) of {_SEAL_GROUP} entries failed their "
                        f"checksum, {dropped} corrupt entries dropped")
        _st_log.warning("NAT state file %s%s", st.path, st.seal_note)
    else:
        st.seal_note = "; sealed at a clean stop: checksums verified"
    return dropped


def _nat_state_ranges_check(hdr_raw, ranges):
    """Why a file built with other default port ranges cannot be adopted by a
    table of `ranges`, or None.  Its egress IPs keep the ranges they were
    made with, while the agent claims (and keeps the kernel's ephemeral
    ports off) the new one: adopted, the old ports could meet the kernel's."""
    cdef const nat_state_hdr* h = <const nat_state_hdr*><const char*>hdr_raw
    cdef int k
    for k, key in enumerate(("tcp", "udp", "icmp")):
        lo, hi = h.port_lo[k], h.port_hi[k]
        if lo == 0 and hi == 0:
            continue                     # not written yet (killed while the table was being made)
        if (lo, hi) != tuple(ranges[key]):
            return (f"built for {key} ports {lo}-{hi}, this table asks for {ranges[key][0]}-{ranges[key][1]} "
                    f"(the port range changed)")
    return None
