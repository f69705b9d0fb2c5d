# --------------------------------------------------------------------------
# Batch API: frames in one NumPy array, one nogil loop per step

from libc.string cimport memmove

import numpy as _pkt_np

cdef class PacketBatch:
    """N frames for batch processing without Python per packet.

    Frame i is frames[i, offsets[i]:offsets[i] + lengths[i]] in an (N,
    frame_size) uint8 array; `headroom` bytes in front leave room for the
    outer header.  Each step (decap, snat/dnat, ttl_decrement, encap) runs
    one loop with the GIL released over the frames not yet dropped, in
    place; relay() does decap + NAT + encap in one loop.  Addresses in a
    batch are IPv4 (the C functions also do IPv6).  One thread per batch.
    Per frame: verdicts[i] (VERDICT_PASS until encap makes it
    VERDICT_TX, VERDICT_DROP with reasons[i]); counters[r] counts drops per
    reason r (DROP_REASON_NAMES).  A frame dropped with frag_needed holds the
    ICMP too-big reply for its sender (length 0 when none may be sent)."""

    PASS = VERDICT_PASS
    TX = VERDICT_TX
    TX_LOCAL = VERDICT_TX_LOCAL
    DROP = VERDICT_DROP

    def __cinit__(self):
        self._info = NULL
        self._parsed = NULL

    def __init__(self, Py_ssize_t n, Py_ssize_t frame_size=2048, Py_ssize_t headroom=128):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not PKT_ETH_LEN <= frame_size <= PKT_MAX_FRAME + 4096:
            raise ValueError(f"frame_size must be in 14..{PKT_MAX_FRAME + 4096}, got {frame_size}")
        if not 0 <= headroom < frame_size:
            raise ValueError(f"headroom must be in 0..frame_size-1, got {headroom}")
        self.n = n
        self.headroom = headroom
        self.frames = _pkt_np.zeros((n, frame_size), _pkt_np.uint8)
        self.offsets = _pkt_np.full(n, headroom, _pkt_np.int32)
        self.lengths = _pkt_np.zeros(n, _pkt_np.int32)
        self.verdicts = _pkt_np.zeros(n, _pkt_np.uint8)
        self.reasons = _pkt_np.zeros(n, _pkt_np.uint8)
        self.vnis = _pkt_np.zeros(n, _pkt_np.uint32)
        self.counters = _pkt_np.zeros(DROP_REASON_MAX, _pkt_np.uint64)
        self._f = self.frames
        self._off = self.offsets
        self._len = self.lengths
        self._verd = self.verdicts
        self._reas = self.reasons
        self._vni = self.vnis
        self._cnt = self.counters
        self._info = <PktInfo *>calloc(n, sizeof(PktInfo))
        self._parsed = <uint8_t *>calloc(n, 1)
        if self._info == NULL or self._parsed == NULL:
            raise no_memory("PacketBatch")

    def __dealloc__(self):
        free(self._info)
        free(self._parsed)

    @classmethod
    def from_frames(cls, frames, Py_ssize_t frame_size=2048, Py_ssize_t headroom=128):
        """A batch holding copies of `frames` (bytes-like objects)."""
        frames = list(frames)
        batch = cls(len(frames), frame_size, headroom)
        batch.load(frames)
        return batch

    def load(self, frames):
        """Copy N frames in at the headroom offset and reset verdicts (not the
        counters).  A frame longer than the row raises ValueError."""
        frames = list(frames)
        if len(frames) != self.n:
            raise ValueError(f"frames must hold {self.n} frames, got {len(frames)}")
        cap = self.frames.shape[1] - self.headroom
        for i, fr in enumerate(frames):
            data = memoryview(fr).cast("B")
            if len(data) > cap:
                raise ValueError(f"frame {i} is {len(data)} bytes, more than frame_size - headroom = {cap}")
            self.frames[i, self.headroom:self.headroom + len(data)] = data
        self.offsets[:] = self.headroom
        self.lengths[:] = [len(memoryview(fr).cast("B")) for fr in frames]
        self.reset()

    def reset(self):
        """Forget verdicts (frames, offsets and counters stay)."""
        self.verdicts[:] = VERDICT_PASS
        self.reasons[:] = DROP_NONE
        memset(self._parsed, 0, self.n)

    def __len__(self):
        return self.n

    def frame(self, Py_ssize_t i):
        """Frame i as bytes."""
        if not 0 <= i < self.n:
            raise IndexError(f"frame index {i} out of range 0..{self.n - 1}")
        off = int(self.offsets[i])
        ln = int(self.lengths[i])
        if off < 0 or ln < 0 or off + ln > self.frames.shape[1]:
            raise ValueError(f"frame {i} has offset/length {off}/{ln} outside its row")
        return self.frames[i, off:off + ln].tobytes()

    def counts(self):
        """{drop reason name: count} for every reason seen so far."""
        return {DROP_REASON_NAMES[r]: int(c) for r, c in enumerate(self.counters) if c and r}

    # -- per-frame helpers (nogil) --

    cdef inline uint8_t *_row(self, Py_ssize_t i) noexcept nogil:
        return &self._f[0, 0] + i * self._f.shape[1]

    cdef inline void _drop(self, Py_ssize_t i, int reason) noexcept nogil:
        self._verd[i] = VERDICT_DROP
        self._reas[i] = reason
        self._cnt[reason] += 1

    cdef inline bint _live(self, Py_ssize_t i) noexcept nogil:
        """Not dropped yet, and its offset/length lie inside the row."""
        cdef int32_t off, ln
        if self._verd[i] == VERDICT_DROP:
            return 0
        off = self._off[i]
        ln = self._len[i]
        if off < 0 or ln < 0 or <Py_ssize_t>off + ln > self._f.shape[1]:
            self._drop(i, DROP_MALFORMED)
            return 0
        return 1

    cdef inline int _ensure_parsed(self, Py_ssize_t i, uint8_t *p) noexcept nogil:
        cdef int rc
        if self._parsed[i]:
            return 0
        rc = pkt_parse(p, self._len[i], &self._info[i])
        if rc == 0:
            self._parsed[i] = 1
        return rc

    cdef void _too_big_in_place(self, Py_ssize_t i, const VxlanTmpl *t) noexcept nogil:
        """Replace parsed frame i by the ICMP too-big reply for its sender
        (length 0 when none may be sent or it does not fit the row)."""
        cdef uint8_t reply[1400]
        cdef uint8_t *p = self._row(i) + self._off[i]
        cdef PktInfo *pi = &self._info[i]
        cdef int64_t n = pkt_icmp_too_big(p, pi, reply, sizeof(reply), _pkt_too_big_mtu(pi, t), NULL)
        if n > self._f.shape[1] - self._off[i]:
            n = 0
        memcpy(p, reply, n)
        self._len[i] = <int32_t>n
        self._parsed[i] = 0

    # -- steps --

    def parse(self):
        """Parse every live frame (the other steps parse on demand)."""
        cdef Py_ssize_t i
        cdef int rc
        with nogil:
            for i in range(self.n):
                if self._live(i):
                    rc = self._ensure_parsed(i, self._row(i) + self._off[i])
                    if rc:
                        self._drop(i, rc)

    def decap(self, port=VXLAN_DEFAULT_PORT, vni=None):
        """Strip and validate the VXLAN outer header of every live frame."""
        cdef Py_ssize_t i
        cdef int rc
        cdef VxlanDecapInfo d
        cdef uint16_t uport
        cdef int64_t want
        if not isinstance(port, int) or not 1 <= port <= 0xffff:
            raise ValueError(f"port must be an int in 1..65535, got {port!r}")
        if vni is not None and (not isinstance(vni, int) or not 0 <= vni < (1 << 24)):
            raise ValueError(f"vni must be None or an int in 0..2**24-1, got {vni!r}")
        uport = port
        want = -1 if vni is None else vni
        with nogil:
            for i in range(self.n):
                if not self._live(i):
                    continue
                rc = vxlan_decap_frame(self._row(i) + self._off[i], self._len[i], uport, want, &d)
                if rc:
                    self._drop(i, rc)
                    continue
                self._off[i] += d.inner_off
                self._len[i] = d.inner_len
                self._vni[i] = d.vni
                self._parsed[i] = 0

    cdef _nat(self, int side, addr, port):
        cdef uint32_t a0 = 0
        cdef int32_t pt0 = -1
        cdef uint32_t[::1] a
        cdef int32_t[::1] pt
        cdef const uint32_t *ap = &a0
        cdef const int32_t *pp = &pt0
        cdef Py_ssize_t a_step = 0, p_step = 0
        # one value for all frames stays a C scalar (stride 0); arrays give one per frame
        if isinstance(addr, (str, int, bytes, _ipaddress.IPv4Address, _ipaddress.IPv6Address)):
            a0 = addr_v4(addr, "addr")
        else:
            a = _pkt_np.ascontiguousarray(addr, dtype=_pkt_np.uint32)
            if a.shape[0] != self.n or _pkt_np.ndim(addr) != 1:
                raise ValueError(f"addr must be one address or {self.n} uint32 addresses")
            ap = &a[0]
            a_step = 1
        if port is None or isinstance(port, int):
            pt0 = _pkt_port(port)
        else:
            port = _pkt_np.asarray(port)
            if port.shape != (self.n,):
                raise ValueError(f"port must be one port or {self.n} ports")
            if ((port < -1) | (port > 0xffff)).any():
                raise ValueError("port must be in 0..65535 (or -1 to keep)")
            pt = _pkt_np.ascontiguousarray(port, dtype=_pkt_np.int32)
            pp = &pt[0]
            p_step = 1
        with nogil:
            self._nat_loop(side, ap, a_step, pp, p_step)

    cdef void _nat_loop(self, int side, const uint32_t *a, Py_ssize_t a_step,
                        const int32_t *pt, Py_ssize_t p_step) noexcept nogil:
        cdef Py_ssize_t i
        cdef int rc
        cdef uint8_t *p
        for i in range(self.n):
            if not self._live(i):
                continue
            p = self._row(i) + self._off[i]
            rc = self._ensure_parsed(i, p)
            if rc == 0:
                rc = pkt_nat4(p, &self._info[i], side, a[i * a_step], pt[i * p_step])
            if rc:
                self._drop(i, rc)

    def snat(self, addr, port=None):
        """Rewrite sources to addr[:port] (one value, or one per frame: uint32
        addresses in host order and int ports, -1 = keep)."""
        self._nat(PKT_NAT_SRC, addr, port)

    def dnat(self, addr, port=None):
        """Rewrite destinations (reverse SNAT), same arguments as snat."""
        self._nat(PKT_NAT_DST, addr, port)

    def relay(self, VxlanTemplate template not None, addr, port=None, *, side="dst",
              vxlan_port=VXLAN_DEFAULT_PORT, vni=None, ttl=False):
        """decap + NAT rewrite (+ TTL decrement) + encap in one pass per frame:
        the gateway's relay between two tunnels (side="dst": the reply path's
        reverse SNAT; "src": SNAT).  Same per-frame C functions and verdicts
        as the separate steps, one loop instead of three."""
        cdef uint32_t a0
        cdef int32_t pt0 = _pkt_port(port)
        cdef int nat_side
        cdef uint16_t uport
        cdef int64_t want
        cdef bint dec_ttl = bool(ttl)
        if side not in ("src", "dst"):
            raise ValueError(f"side must be 'src' or 'dst', got {side!r}")
        nat_side = PKT_NAT_SRC if side == "src" else PKT_NAT_DST
        if not isinstance(vxlan_port, int) or not 1 <= vxlan_port <= 0xffff:
            raise ValueError(f"vxlan_port must be an int in 1..65535, got {vxlan_port!r}")
        if vni is not None and (not isinstance(vni, int) or not 0 <= vni < (1 << 24)):
            raise ValueError(f"vni must be None or an int in 0..2**24-1, got {vni!r}")
        a0 = addr_v4(addr, "addr")
        uport = vxlan_port
        want = -1 if vni is None else vni
        with nogil:
            self._relay_loop(&template.t, uport, want, nat_side, a0, pt0, dec_ttl)

    cdef void _relay_loop(self, const VxlanTmpl *t, uint16_t uport, int64_t want, int side,
                          uint32_t addr, int32_t port, bint dec_ttl) noexcept nogil:
        cdef Py_ssize_t i
        cdef int rc
        cdef int32_t off, ln
        cdef uint8_t *row
        cdef uint8_t *p
        cdef PktInfo *pi
        cdef VxlanDecapInfo d
        for i in range(self.n):
            if not self._live(i):
                continue
            row = self._row(i)
            rc = vxlan_decap_frame(row + self._off[i], self._len[i], uport, want, &d)
            if rc:
                self._drop(i, rc)
                continue
            off = self._off[i] + d.inner_off
            ln = d.inner_len
            self._off[i] = off
            self._len[i] = ln
            self._vni[i] = d.vni
            p = row + off
            pi = &self._info[i]
            rc = pkt_parse(p, ln, pi)
            if rc == 0:
                # before the rewrite, so a too-big reply quotes the packet
                # as its sender sent it and comes from the address it used
                rc = vxlan_check_mtu(pi, ln, t)
            if rc == 0:
                rc = pkt_nat4(p, pi, side, addr, port)
            if rc == 0 and dec_ttl:
                rc = pkt_ttl_decrement(p, pi)
            if rc:
                self._parsed[i] = 1
                self._drop(i, rc)
                if rc == DROP_FRAG_NEEDED:
                    self._too_big_in_place(i, t)
                continue
            # the inner frame starts exactly where the old outer header did
            # (off >= VXLAN_OVERHEAD after any decap): no copy
            self._len[i] = <int32_t>vxlan_encap_frame(p, ln, t, vxlan_src_port(p, pi, t))
            self._off[i] = off - VXLAN_OVERHEAD
            self._verd[i] = VERDICT_TX
            self._parsed[i] = 0

    def ttl_decrement(self):
        """Decrement TTL / hop limit; drop ttl_exceeded where it would hit 0."""
        cdef Py_ssize_t i
        cdef int rc
        cdef uint8_t *p
        with nogil:
            for i in range(self.n):
                if not self._live(i):
                    continue
                p = self._row(i) + self._off[i]
                rc = self._ensure_parsed(i, p)
                if rc == 0:
                    rc = pkt_ttl_decrement(p, &self._info[i])
                if rc:
                    self._drop(i, rc)

    def encap(self, VxlanTemplate template not None):
        """VXLAN-encapsulate every live frame with the template (verdict TX),
        or replace a too-big one by the ICMP reply for its sender.  The reply
        quotes the frame as it is now: after a dnat() step it quotes the
        translated packet (use relay(), which checks before rewriting)."""
        cdef Py_ssize_t i, fs = self._f.shape[1]
        cdef int rc
        cdef int32_t off, ln
        cdef uint8_t *row
        cdef uint8_t *p
        cdef PktInfo *pi
        cdef const VxlanTmpl *t = &template.t
        with nogil:
            for i in range(self.n):
                if not self._live(i):
                    continue
                row = self._row(i)
                off = self._off[i]
                ln = self._len[i]
                p = row + off
                pi = &self._info[i]
                if self._parsed[i]:
                    rc = vxlan_check_mtu(pi, ln, t)
                else:
                    rc = _pkt_encap_prepare(p, ln, pi, t)
                if rc:
                    self._drop(i, rc)
                    if rc == DROP_FRAG_NEEDED:
                        self._too_big_in_place(i, t)
                    continue
                if off < VXLAN_OVERHEAD:
                    # short headroom: move the frame back (a copy, the rare case)
                    if VXLAN_OVERHEAD + ln > fs:
                        self._drop(i, DROP_MALFORMED)
                        continue
                    memmove(row + VXLAN_OVERHEAD, p, ln)
                    off = VXLAN_OVERHEAD
                    p = row + off
                self._len[i] = <int32_t>vxlan_encap_frame(p, ln, t, vxlan_src_port(p, pi, t))
                self._off[i] = off - VXLAN_OVERHEAD
                self._verd[i] = VERDICT_TX
                self._parsed[i] = 0
