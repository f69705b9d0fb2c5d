# ring: AF_PACKET TPACKET_V3 receive and transmit rings (C in ring.h).
#
# PacketRing owns one socket and one mapping; Python sees batches only.

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.errno cimport EINTR

import errno as _ring_errno
import os as _ring_os
import socket as _ring_socket
import struct as _ring_struct

_RING_FANOUT_MODES = {"hash": 0, "lb": 1, "cpu": 2, "rollover": 3, "random": 4, "qm": 5, "cbpf": 6}
_RING_FANOUT_FLAG_ROLLOVER = 0x1000
_RING_FANOUT_FLAG_UNIQUEID = 0x2000
_RING_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000
_RING_FANOUT_FLAG_DEFRAG = 0x8000
_RING_CLONE_NEWNET = 0x40000000


class _ring_in_netns:
    """Enter a named network namespace on this thread, then come back.

    setns(2) moves only the calling thread, so the socket is created inside
    the namespace and keeps working there after we return."""

    def __init__(self, name):
        self.name = name
        self.saved = -1

    def __enter__(self):
        if self.name is None:
            return self
        import ctypes
        path = self.name if str(self.name).startswith("/") else f"/run/netns/{self.name}"
        try:
            target = _ring_os.open(path, _ring_os.O_RDONLY | _ring_os.O_CLOEXEC)
        except FileNotFoundError:
            raise ValueError(f"netns {self.name!r}: no such network namespace ({path})") from None
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            self.saved = _ring_os.open("/proc/thread-self/ns/net", _ring_os.O_RDONLY | _ring_os.O_CLOEXEC)
            if libc.setns(target, _RING_CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                _ring_os.close(self.saved)
                self.saved = -1
                raise errno_error(e, f"setns({self.name!r})",
                                  "entering a network namespace needs CAP_SYS_ADMIN"
                                  if e == _ring_errno.EPERM else "")
        finally:
            _ring_os.close(target)
        self.libc = libc
        return self

    def __exit__(self, *exc):
        if self.saved >= 0:
            rc = self.libc.setns(self.saved, _RING_CLONE_NEWNET)
            _ring_os.close(self.saved)
            self.saved = -1
            if rc != 0:
                import ctypes
                raise errno_error(ctypes.get_errno(), "could not return to the original network namespace")
        return False


def _ring_mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


cdef inline int _ring_ms(timeout):
    """Seconds (None: forever) to poll() milliseconds."""
    if timeout is None:
        return -1
    t = float(timeout)
    if t != t or t < 0:
        raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
    return <int>min(t * 1000.0 + 0.999, 2147483647.0)


cdef class PacketRing:
    """A TPACKET_V3 AF_PACKET socket on one interface: RX blocks and a TX ring.

    PacketRing("eth0", netns="blue", fanout=7) opens the socket inside the
    named namespace, joins fanout group 7 (flow hash), and maps both rings.
    RX hands over a block of frames when it is full or retire_ms after its
    first frame: the most frames per wakeup, but a sparse flow waits.  With
    rx_frame_size > 0 the socket is TPACKET_V2 instead: fixed slots of that
    size carved from the blocks, each frame handed over as it lands (no
    wait; for request/response and TCP ACK latency); a frame larger than
    its slot is cut (its len < wire_len), unless rx_copy_size is larger
    than the slot: then such a frame is read whole from the socket (up to
    rx_copy_size bytes), so small slots absorb a long burst of small frames
    and a super-packet still passes (stats: rx_copied, rx_copy_lost).
    fanout_mode="cbpf" with fanout_prog (a classic BPF program, see
    egresscore._bpf) steers each frame to the member whose index the program
    returns (modulo the members; members are indexed in joining order):
    the datapath workers' steering (egresscore._bpf.bpf_steer_*).
    fanout="unique" asks the kernel for an unused group id (read it from
    fanout_group, and let the other members join that id).  A fanout
    group's socket sees no outgoing frames when ignore_outgoing is set (the
    group's own hook: PACKET_FANOUT_FLAG_IGNORE_OUTGOING).
    Use it as a context manager: leaving releases the mapping and the socket.
    Batch calls release the GIL; frames are copied out only by recv/recv_into.
    One thread per PacketRing: share an interface between workers with
    fanout, not by sharing the object.
    """

    def __cinit__(self):
        self.r.fd = -1
        self.r.dfd = -1
        self.frames = NULL

    def __init__(self, ifname, *, netns=None, rx=True, tx=True,
                 block_size=1 << 18, block_count=32, retire_ms=4, rx_frame_size=0, rx_copy_size=0,
                 tx_frame_size=2048, tx_frames=1024,
                 fanout=None, fanout_mode="hash", fanout_defrag=False, fanout_prog=None,
                 qdisc_bypass=False, ignore_outgoing=True, promisc=False,
                 vnet_hdr=False, filter=None, batch=256):
        cdef ring_cfg_t c
        cdef bytes prog = b""
        cdef bytes fprog = b""
        cdef int rc = 0
        if self.r.fd >= 0:
            raise RuntimeError("PacketRing is already open")
        if not isinstance(ifname, str) or not ifname or len(ifname) >= 16:
            raise ValueError(f"ifname must be an interface name (1-15 chars), got {ifname!r}")
        if not rx and not tx:
            raise ValueError("rx and tx are both off: nothing to open")
        page = _ring_os.sysconf("SC_PAGE_SIZE")
        block_size = int(block_size)
        block_count = int(block_count)
        tx_frame_size = int(tx_frame_size)
        tx_frames = int(tx_frames)
        if rx:
            if block_size < page or block_size % page or block_size & (block_size - 1):
                raise ValueError(f"block_size must be a power of two >= {page} (the page size), got {block_size}")
            if block_size > 1 << 30:
                raise ValueError(f"block_size must be <= 1 GiB, got {block_size}")
            if not 1 <= block_count <= 1 << 16:
                raise ValueError(f"block_count must be in 1..65536, got {block_count}")
            if not 0 <= int(retire_ms) <= 60000:
                raise ValueError(f"retire_ms must be in 0..60000 (0: kernel default), got {retire_ms}")
            rx_frame_size = int(rx_frame_size)
            if rx_frame_size and (rx_frame_size < 256 or rx_frame_size % 16 or rx_frame_size > block_size):
                raise ValueError(f"rx_frame_size must be 0 (TPACKET_V3 blocks) or a multiple of 16 in "
                                 f"256..block_size ({block_size}), got {rx_frame_size}")
            rx_copy_size = int(rx_copy_size)
            if rx_copy_size and (not rx_frame_size or not rx_frame_size < rx_copy_size <= 1 << 18):
                raise ValueError(f"rx_copy_size must be 0 or, with rx_frame_size > 0, in "
                                 f"rx_frame_size+1..262144, got {rx_copy_size}")
        if tx:
            if tx_frame_size < RING_TX_DATA_OFF + 64 or tx_frame_size % 16 or tx_frame_size > 1 << 18:
                raise ValueError(f"tx_frame_size must be a multiple of 16 in {RING_TX_DATA_OFF + 64}..262144, "
                                 f"got {tx_frame_size}")
            if not 1 <= tx_frames <= 1 << 20:
                raise ValueError(f"tx_frames must be in 1..1048576, got {tx_frames}")
        if fanout_mode not in _RING_FANOUT_MODES:
            raise ValueError(f"fanout_mode must be one of {sorted(_RING_FANOUT_MODES)}, got {fanout_mode!r}")
        unique = isinstance(fanout, str) and fanout == "unique"
        if fanout is not None and not unique and not (
                isinstance(fanout, int) and not isinstance(fanout, bool) and 0 <= fanout <= 0xffff):
            raise ValueError(f"fanout must be a group id in 0..65535, 'unique' or None, got {fanout!r}")
        if (fanout_prog is not None) != (fanout is not None and fanout_mode == "cbpf"):
            raise ValueError("fanout_prog goes with fanout_mode='cbpf' and a fanout group (both or neither)")
        if fanout_prog is not None:
            fprog = _bpf_pack(fanout_prog)
        if not isinstance(batch, int) or not 1 <= batch <= 1 << 16:
            raise ValueError(f"batch must be in 1..65536, got {batch!r}")
        rx_bytes = block_size * block_count if rx else 0
        tx_bytes = tx_frame_size * tx_frames if tx else 0
        if rx_bytes >= 1 << 32 or tx_bytes >= 1 << 32:
            raise MemoryError(
                f"ring too large: RX {rx_bytes >> 20} MiB / TX {tx_bytes >> 20} MiB; each ring "
                f"must stay below 4 GiB (the kernel's limit); lower block_size/block_count/tx_frames")
        avail = _ring_mem_available()
        if avail is not None and rx_bytes + tx_bytes > avail // 2:
            raise MemoryError(
                f"ring too large: RX {rx_bytes >> 20} MiB + TX {tx_bytes >> 20} MiB asked, "
                f"{avail >> 20} MiB available; lower block_size/block_count/tx_frames")
        if filter is not None:
            prog = _bpf_pack(filter)

        if self.frames != NULL:
            free(self.frames)
        self.frames = <ring_frame_t *>malloc(sizeof(ring_frame_t) * batch)
        if self.frames == NULL:
            raise no_memory("PacketRing batch scratch array")
        self.batch = batch
        c.rx_block_size = block_size if rx else 0
        c.rx_block_nr = block_count if rx else 0
        c.rx_retire_ms = int(retire_ms)
        c.rx_frame_size = rx_frame_size if rx else 0
        c.rx_copy_size = rx_copy_size if rx else 0
        c.tx_frame_size = tx_frame_size if tx else 0
        c.tx_frame_nr = tx_frames if tx else 0
        c.fanout_group = -1 if fanout is None else 0 if unique else fanout
        c.fanout_mode = _RING_FANOUT_MODES[fanout_mode] | (
            _RING_FANOUT_FLAG_DEFRAG if fanout_defrag else 0) | (
            _RING_FANOUT_FLAG_UNIQUEID if unique else 0) | (
            _RING_FANOUT_FLAG_IGNORE_OUTGOING if ignore_outgoing and fanout is not None else 0)
        c.fanout_prog = <const sock_filter *><const char *>fprog
        c.fanout_prog_len = <uint16_t>(len(fprog) // 8)
        c.qdisc_bypass = 1 if qdisc_bypass else 0
        c.ignore_outgoing = 1 if ignore_outgoing else 0
        c.promisc = 1 if promisc else 0
        c.vnet_hdr = 1 if vnet_hdr else 0
        c.filter = <const sock_filter *><const char *>prog
        c.filter_len = <uint16_t>(len(prog) // 8)
        self.ifname = ifname
        self.netns = netns
        self.has_rx = bool(rx)
        self.has_tx = bool(tx)
        where = f" in netns {netns!r}" if netns is not None else ""
        with _ring_in_netns(netns):
            try:
                c.ifindex = _ring_socket.if_nametoindex(ifname)
            except OSError:
                raise ValueError(f"interface {ifname!r} not found{where}") from None
            with nogil:
                rc = ring_open(&self.r, &c)
        if rc < 0:
            e = -rc
            step = (<bytes>self.r.err_where).decode() if self.r.err_where != NULL else "open"
            if e in (_ring_errno.EPERM, _ring_errno.EACCES):
                raise errno_error(e, f"{step} on {ifname!r}{where}",
                                  "AF_PACKET sockets need CAP_NET_RAW (run as root or grant the capability)")
            if e == _ring_errno.ENOMEM:
                raise errno_error(e, f"ring too large: {step} could not get RX {rx_bytes >> 20} MiB + "
                                     f"TX {tx_bytes >> 20} MiB", "lower block_size/block_count/tx_frames")
            if e in (_ring_errno.ENODEV, _ring_errno.ENXIO):
                raise ValueError(f"interface {ifname!r} not found{where} ({step})")
            if step == "PACKET_FANOUT_DATA":
                raise errno_input_error(e, "fanout_prog: the kernel rejected the steering program")
            if step == "SO_ATTACH_FILTER":
                raise errno_input_error(e, "filter: the kernel rejected the BPF program")
            if step == "PACKET_FANOUT":
                raise errno_input_error(e, f"fanout group {fanout} on {ifname!r}",
                                        f"{_ring_os.strerror(e)} (a group has one mode; members need "
                                        f"the same mode and flags)")
            raise errno_error(e, f"{step} on {ifname!r}{where}")

    def __dealloc__(self):
        ring_close(&self.r)
        if self.frames != NULL:
            free(self.frames)
            self.frames = NULL

    def close(self):
        """Unmap the rings and close the socket (idempotent)."""
        ring_close(&self.r)

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        state = "open" if self.r.fd >= 0 else "closed"
        ns = f", netns={self.netns!r}" if self.netns is not None else ""
        return f"<PacketRing {self.ifname!r}{ns} {state} rx={bool(self.has_rx)} tx={bool(self.has_tx)}>"

    cdef int _check_open(self) except -1:
        if self.r.fd < 0:
            raise ValueError("PacketRing is closed")
        return 0

    @property
    def closed(self):
        return self.r.fd < 0

    @property
    def ifindex(self):
        return self.r.ifindex

    @property
    def fanout_group(self):
        """The fanout group id this socket is in (None: none); the kernel's pick with fanout="unique"."""
        self._check_open()
        cdef int v = ring_fanout_id(&self.r)
        return None if v < 0 else v

    @property
    def vnet_hdr(self):
        """True when each frame carries a virtio_net_hdr (GSO metadata)."""
        return self.r.vnet != 0

    @property
    def tx_room(self):
        """Largest frame (bytes) one TX slot holds."""
        return self.r.tx_room

    def fileno(self):
        self._check_open()
        return self.r.fd

    # ---- receive ------------------------------------------------------

    def wait(self, timeout=None):
        """Block until a frame is ready or timeout seconds pass (None: forever).

        Returns True when frames are ready.  A signal ends the wait early
        (its handler runs; KeyboardInterrupt propagates)."""
        cdef int ms = _ring_ms(timeout), rc
        self._check_open()
        if not self.has_rx:
            raise ValueError("wait(): this PacketRing has no RX ring")
        with nogil:
            rc = ring_rx_wait(&self.r, ms)
        if rc == -EINTR:
            PyErr_CheckSignals()
            return False
        if rc < 0:
            raise errno_error(-rc, f"poll on {self.ifname!r}")
        return rc > 0

    def recv(self, int max_frames=256, timeout=0, bint vnet=False):
        """Up to max_frames received frames as a list of bytes (tests, tools).

        Waits up to timeout seconds for the first frame (None: forever).
        vnet=True (with vnet_hdr on) gives (virtio_net_hdr, frame) pairs."""
        cdef int n, i, got = 0
        cdef list out = []
        if max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        if max_frames == 0 or not self.wait(timeout):
            return out
        while got < max_frames:
            with nogil:
                n = ring_rx_batch(&self.r, self.frames, min(self.batch, max_frames - got))
            for i in range(n):
                frame = PyBytes_FromStringAndSize(<const char *>self.frames[i].data,
                                                  self.frames[i].len)
                if vnet and self.frames[i].vnet != NULL:
                    frame = (PyBytes_FromStringAndSize(<const char *>self.frames[i].vnet,
                                                       self.r.vnet), frame)
                out.append(frame)
            got += n
            ring_rx_release(&self.r)
            if n == 0:
                break
        return out

    def recv_into(self, uint8_t[:, ::1] data not None, uint32_t[::1] lengths not None, timeout=0):
        """Copy up to data.shape[0] frames into the rows of data (truncated to
        its width); lengths[i] gets frame i's captured length.  Returns the
        count.  No Python object per frame; the GIL is released."""
        cdef Py_ssize_t rows = data.shape[0], width = data.shape[1]
        cdef int n, i, rc, got = 0, ms = _ring_ms(timeout)
        cdef uint32_t ln
        self._check_open()
        if not self.has_rx:
            raise ValueError("recv_into(): this PacketRing has no RX ring")
        if lengths.shape[0] < rows:
            raise ValueError(f"lengths has {lengths.shape[0]} entries for {rows} rows of data")
        with nogil:
            rc = ring_rx_wait(&self.r, ms) if rows else 0
            while rc > 0 and got < rows:
                n = ring_rx_batch(&self.r, self.frames, <int>min(<Py_ssize_t>self.batch, rows - got))
                if n == 0:
                    break
                for i in range(n):
                    ln = self.frames[i].len
                    memcpy(&data[got + i, 0], self.frames[i].data, ln if ln < width else width)
                    lengths[got + i] = ln
                got += n
                ring_rx_release(&self.r)
        if rc == -EINTR:
            PyErr_CheckSignals()
        elif rc < 0:
            raise errno_error(-rc, f"poll on {self.ifname!r}")
        return got

    def drain(self, int max_frames=1 << 30, timeout=0):
        """Walk and hand back up to max_frames frames without copying them;
        returns the count (benchmarks, or discarding a backlog)."""
        cdef int n, rc, got = 0, ms = _ring_ms(timeout)
        self._check_open()
        if not self.has_rx:
            raise ValueError("drain(): this PacketRing has no RX ring")
        with nogil:
            rc = ring_rx_wait(&self.r, ms) if max_frames > 0 else 0
            while rc > 0 and got < max_frames:
                n = ring_rx_batch(&self.r, self.frames, min(self.batch, max_frames - got))
                ring_rx_release(&self.r)
                if n == 0:
                    break
                got += n
        if rc == -EINTR:
            PyErr_CheckSignals()
        elif rc < 0:
            raise errno_error(-rc, f"poll on {self.ifname!r}")
        return got

    def forward(self, PacketRing out not None, int max_frames=1 << 30, timeout=0):
        """Move received frames into out's TX ring at C level, one flush per
        batch: the fused datapath's loop with no processing in the middle
        (out may be self).  Frames longer than out's slot are truncated; frames
        left when out's TX ring stays full are counted in out's tx_dropped.
        Returns how many were forwarded."""
        cdef int n, i, rc, got = 0, ms = _ring_ms(timeout)
        cdef uint8_t *buf
        cdef uint32_t room = 0, ln
        self._check_open()
        out._check_open()
        if not self.has_rx or not out.has_tx:
            raise ValueError("forward() needs an RX ring here and a TX ring on out")
        with nogil:
            rc = ring_rx_wait(&self.r, ms) if max_frames > 0 else 0
            while rc > 0 and got < max_frames:
                n = ring_rx_batch(&self.r, self.frames, min(self.batch, max_frames - got))
                if n == 0:
                    break
                for i in range(n):
                    buf = ring_tx_claim(&out.r, &room)
                    if buf == NULL:
                        rc = ring_tx_flush(&out.r)
                        if rc >= 0:
                            rc = ring_tx_wait(&out.r, 1000)
                        if rc <= 0:
                            out.r.tx_dropped += n - i
                            break
                        buf = ring_tx_claim(&out.r, &room)
                    ln = self.frames[i].len if self.frames[i].len < room else room
                    memcpy(buf, self.frames[i].data, ln)
                    ring_tx_commit(&out.r, ln)
                    got += 1
                ring_rx_release(&self.r)
                if rc > 0:
                    rc = ring_tx_flush(&out.r)
                    rc = 1 if rc >= 0 else rc
        if rc == -EINTR:
            PyErr_CheckSignals()
        elif rc < 0:
            raise errno_error(-rc, f"forward {self.ifname!r} -> {out.ifname!r}")
        return got

    # ---- transmit -----------------------------------------------------

    def send(self, frames, timeout=1.0):
        """Queue each bytes-like frame in the TX ring and send them with one
        sendto() (more only when the ring fills).  Waits up to timeout
        seconds for free frames; returns how many were queued."""
        cdef uint8_t *buf
        cdef uint32_t room
        cdef const uint8_t[::1] view
        cdef int sent = 0, rc, ms = _ring_ms(timeout)
        self._check_open()
        if not self.has_tx:
            raise ValueError("send(): this PacketRing has no TX ring")
        try:
            for i, frame in enumerate(frames):
                try:
                    view = memoryview(frame).cast("B")
                except TypeError:
                    raise TypeError(f"frames[{i}] must be bytes-like, got {type(frame).__name__}") from None
                if view.shape[0] < 14 or view.shape[0] > self.r.tx_room:
                    raise ValueError(f"frames[{i}] is {view.shape[0]} bytes; a frame needs 14..{self.r.tx_room}")
                buf = ring_tx_claim(&self.r, &room)
                if buf == NULL:
                    with nogil:
                        rc = ring_tx_flush(&self.r)
                        if rc >= 0:
                            rc = ring_tx_wait(&self.r, ms)
                    if rc < 0:
                        self._tx_error(rc)
                    if rc <= 0:
                        break
                    buf = ring_tx_claim(&self.r, &room)
                memcpy(buf, &view[0], view.shape[0])
                ring_tx_commit(&self.r, <uint32_t>view.shape[0])
                sent += 1
        finally:
            # frames queued before an error still go out
            rc = ring_tx_flush(&self.r)
        if rc < 0:
            self._tx_error(rc)
        return sent

    def send_batch(self, const uint8_t[:, ::1] data not None, lengths=None, timeout=1.0):
        """Send the rows of data (row i holds lengths[i] bytes, default: the
        whole row) through the TX ring, one sendto() per ring-full.  Returns
        how many were queued.  The GIL is released."""
        import numpy
        rows, width = data.shape[0], data.shape[1]
        if lengths is None:
            lens = numpy.full(rows, width, dtype=numpy.int64)
        else:
            lens = numpy.asarray(lengths, dtype=numpy.int64)
            if lens.ndim != 1 or lens.shape[0] < rows:
                raise ValueError(f"lengths must be 1-D with >= {rows} entries (one per row), got shape {lens.shape}")
            lens = lens[:rows]
        self._check_open()
        if rows:
            lo, hi = int(lens.min()), int(lens.max())
            if lo < 14 or hi > width or hi > self.r.tx_room:
                raise ValueError(f"frame lengths must be in 14..{min(width, self.r.tx_room)} "
                                 f"(row width {width}, TX slot {self.r.tx_room}), got {lo}..{hi}")
        return self._send_rows(data, numpy.ascontiguousarray(lens, dtype=numpy.uint32),
                               _ring_ms(timeout))

    cdef int _send_rows(self, const uint8_t[:, ::1] data, const uint32_t[::1] lengths,
                        int timeout_ms) except -1:
        cdef Py_ssize_t rows = data.shape[0], i = 0
        cdef uint8_t *buf
        cdef uint32_t room
        cdef int rc = 0
        self._check_open()
        if not self.has_tx:
            raise ValueError("send_batch(): this PacketRing has no TX ring")
        with nogil:
            while i < rows:
                buf = ring_tx_claim(&self.r, &room)
                if buf == NULL:
                    rc = ring_tx_flush(&self.r)
                    if rc < 0:
                        break
                    rc = ring_tx_wait(&self.r, timeout_ms)
                    if rc <= 0:
                        break
                    continue
                memcpy(buf, &data[i, 0], lengths[i])
                ring_tx_commit(&self.r, lengths[i])
                i += 1
            if rc >= 0:
                rc = ring_tx_flush(&self.r)
        if rc < 0:
            self._tx_error(rc)
        return <int>i

    def _tx_error(self, int rc):
        if rc == -EINTR:
            PyErr_CheckSignals()
            return
        raise errno_error(-rc, f"sendto on {self.ifname!r}")

    def flush(self):
        """Send every committed frame now; returns how many went."""
        self._check_open()
        rc = ring_tx_flush(&self.r)
        if rc < 0:
            self._tx_error(rc)
        return max(rc, 0)

    # ---- control ------------------------------------------------------

    def set_filter(self, filter):
        """Attach a classic BPF filter (see egresscore.bpf_*), or None to detach."""
        cdef bytes prog = b"" if filter is None else _bpf_pack(filter)
        self._check_open()
        rc = ring_set_filter(&self.r, <const sock_filter *><const char *>prog,
                             <uint16_t>(len(prog) // 8))
        if rc < 0:
            raise errno_input_error(-rc, "filter: the kernel rejected the BPF program")

    def stats(self):
        """Counters: the kernel's PACKET_STATISTICS totals (packets seen,
        drops included; drops for a full ring; queue freezes) and ours
        (rx_blocks counts V3 blocks; rx_copied frames larger than their V2
        slot read whole, rx_copy_lost those the kernel could not queue; tx_direct frames sent by ring_tx_direct,
        whose full send buffer also counts in tx_full)."""
        self._check_open()
        rc = ring_stats_update(&self.r)
        if rc < 0:
            raise errno_error(-rc, "PACKET_STATISTICS")
        return {
            "kernel_packets": self.r.k_packets,
            "kernel_drops": self.r.k_drops,
            "kernel_freezes": self.r.k_freeze,
            "rx_frames": self.r.rx_frames,
            "rx_blocks": self.r.rx_blocks,
            "rx_copied": self.r.rx_copied,
            "rx_copy_lost": self.r.rx_copy_lost,
            "tx_frames": self.r.tx_frames,
            "tx_flushes": self.r.tx_flushes,
            "tx_full": self.r.tx_full,
            "tx_errors": self.r.tx_errors,
            "tx_dropped": self.r.tx_dropped,
            "tx_direct": self.r.tx_direct,
        }


def _bpf_pack(filter):
    """A filter (list of (code, jt, jf, k), a BpfProgram, or a pcap
    expression string) as packed struct sock_filter bytes."""
    if isinstance(filter, str):
        from egresscore._bpf import bpf_compile
        filter = bpf_compile(filter)
    try:
        insns = [tuple(int(v) for v in ins) for ins in filter]
    except (TypeError, ValueError):
        raise TypeError("filter must be a list of (code, jt, jf, k) instructions or a pcap expression") from None
    if not 1 <= len(insns) <= 4096:
        raise ValueError(f"filter must have 1..4096 instructions, got {len(insns)}")
    out = bytearray()
    for i, ins in enumerate(insns):
        if len(ins) != 4:
            raise ValueError(f"filter[{i}] must be (code, jt, jf, k), got {ins!r}")
        code, jt, jf, k = ins
        if not (0 <= code <= 0xffff and 0 <= jt <= 255 and 0 <= jf <= 255 and 0 <= k <= 0xffffffff):
            raise ValueError(f"filter[{i}] = {ins!r} is out of range")
        out += _ring_struct.pack("=HBBI", code, jt, jf, k)
    return bytes(out)
