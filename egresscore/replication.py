"""NAT state replication: the active gateway streams its connections to its standby.

The source of events is the flow-record ring the NAT table already writes
(egresscore.flowlog): a connection's creation is a FLOW_START record, its
end a FLOW_END record, both written in C by the datapath thread.  Nothing is
added per packet.  On a control thread the active turns a drained batch into
replication records (REPL_RECORD_DTYPE, in NumPy: no Python per record),
keeps those of the egress IPs it replicates, and sends them to the standby
in UDP datagrams over the underlay on REPLICATION_PORT.

The wire.  Every datagram starts with a 32-byte header

    magic b"EGCR" | version 1 | kind | family | 0 | count (u32) |
    stream epoch (u32) | sequence (u64) | oldest record time (u64)

(network order).  kind DATA carries `count` records of one family: 24 bytes
for IPv4 (op, proto, state, 0, sport, dport, xport, 0, pod address, remote
address, egress IP) and 60 for IPv6 (16-byte addresses); RESET (a full
resync begins: drop what you hold for these egress IPs) carries `count`
16-byte egress IPs; RESYNC (standby -> active: please resync) carries
nothing; PULL (a node about to take egress IPs back -> the node that holds
them or stands by for them: send me your connections of these) carries
`count` egress IPs, and is answered by a stream of its own: RESET, the
connections as DATA, then DONE (the export is complete; `count` egress
IPs).  A stream is (sender, epoch): a sender picks a random epoch at
start, and every DATA or RESET datagram takes the next sequence number.

Fail closed on the standby (Receiver): a datagram from an address that is
not a cluster gateway, a malformed one, one of another stream before its
RESET, a repeated or late sequence number, and records for an egress IP
this node is not standby for are dropped and counted by reason.  A gap in
the sequence or a full pending buffer makes the standby ask for a resync
(at most every `resync_every` s); the active answers with RESET and its
live connections, exported in chunks.  Memory is bounded on both sides: the
active sends as it drains (no queue) and walks its table one chunk per
round; the standby holds at most `max_pending` records not yet applied.

What this cannot save: a connection opened less than about one drain
interval plus one network trip before the active fails is not on the
standby yet (the replication window; `lag` measures it), and a datagram
lost on the underlay costs a resync.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time

import numpy as np

from ._core import REPL_DATAGRAM_BYTES, REPL_RECORD_DTYPE, repl_encode_log

__all__ = ["REPLICATION_PORT", "REPL_RECORD_DTYPE", "Receiver", "Sender", "decode", "enable_gro", "encode",
           "from_flow_records", "recv_datagrams"]

REPLICATION_PORT = 4800
MAGIC = b"EGCR"
VERSION = 1
DATA, RESET, RESYNC, PULL, DONE = 1, 2, 3, 4, 5
_HDR = struct.Struct("!4sBBBxIIQQ")
HEADER_SIZE = _HDR.size
MAX_DATAGRAM = 1400          # under the underlay's MTU: never fragmented
GSO_DATAGRAMS = 44           # datagrams one send hands the kernel (UDP_SEGMENT), under 64 KB
_SOL_UDP, _UDP_SEGMENT, _UDP_GRO = 17, 103, 104
_GRO_CMSG = socket.CMSG_SPACE(4)
_FLOW_START, _FLOW_END = 1, 2
_OP_ADD, _OP_DEL = 1, 2

_WIRE = {
    fam: np.dtype([("op", "u1"), ("proto", "u1"), ("state", "u1"), ("_z", "u1"), ("sport", ">u2"),
                   ("dport", ">u2"), ("xport", ">u2"), ("_z2", ">u2"), ("src", "u1", (n,)), ("dst", "u1", (n,)),
                   ("xsrc", "u1", (n,))])
    for fam, n in ((4, 4), (6, 16))
}
PER_DATAGRAM = {fam: (MAX_DATAGRAM - HEADER_SIZE) // dt.itemsize for fam, dt in _WIRE.items()}


def _packed16(ip):
    fam = 6 if ":" in ip else 4
    raw = socket.inet_pton(socket.AF_INET6 if fam == 6 else socket.AF_INET, ip)
    return fam, raw + bytes(16 - len(raw))


def _keys(addr16):
    """(n, 16) uint8 addresses -> (n,) void keys comparable with np.isin."""
    return np.ascontiguousarray(addr16).view("V16").ravel()


def _select(records, egress_ips):
    """The records whose egress IP is one of `egress_ips` (text)."""
    if not len(records) or not egress_ips:
        return records[:0]
    want = np.frombuffer(b"".join(_packed16(ip)[1] for ip in egress_ips), dtype="V16")
    return records[np.isin(_keys(records["xsrc"]), want)]


def from_flow_records(flows, egress_ips):
    """FLOW_RECORD_DTYPE records -> (REPL_RECORD_DTYPE records, oldest time ns):
    starts become adds, ends deletes, for connections of `egress_ips` only."""
    kinds = flows["kind"]
    f = flows[(kinds == _FLOW_START) | (kinds == _FLOW_END)]
    f = _select(f, egress_ips)
    out = np.zeros(len(f), REPL_RECORD_DTYPE)
    if not len(f):
        return out, 0
    out["op"] = np.where(f["kind"] == _FLOW_START, _OP_ADD, _OP_DEL)
    for name in ("family", "proto", "sport", "dport", "xport", "src", "dst", "xsrc"):
        out[name] = f[name]
    return out, int(f["time"].min())


def encode(records, *, epoch, seq, t0=0):
    """REPL_RECORD_DTYPE records -> [(seq, datagram)], numbered from `seq`,
    one family per datagram, at most PER_DATAGRAM records each."""
    out = []
    for fam in (4, 6):
        r = records[records["family"] == fam]
        n = PER_DATAGRAM[fam]
        w = 4 if fam == 4 else 16
        for i in range(0, len(r), n):
            part = r[i:i + n]
            wire = np.zeros(len(part), _WIRE[fam])
            for name in ("op", "proto", "state", "sport", "dport", "xport"):
                wire[name] = part[name]
            for name in ("src", "dst", "xsrc"):
                wire[name] = part[name][:, :w]
            out.append((seq, _HDR.pack(MAGIC, VERSION, DATA, fam, len(part), epoch, seq, t0) + wire.tobytes()))
            seq += 1
    return out


def enable_gro(sock):
    """Ask the kernel to hand `sock` a sender's GSO datagrams (and, from a
    NIC, runs of one flow's datagrams) coalesced, one buffer per run
    (UDP_GRO): one receive, and no segmentation on loopback or veth, for up
    to GSO_DATAGRAMS datagrams.  Read it with recv_datagrams.  False when
    the kernel refuses (each datagram then arrives alone)."""
    try:
        sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
    except OSError:
        return False
    return True


def recv_datagrams(sock):
    """One receive from `sock` -> ([datagram, ...], (src ip, port)): a
    coalesced buffer (UDP_GRO) is split at the segment size the kernel
    gives; raises what recvmsg raises (BlockingIOError when empty)."""
    data, anc, _, addr = sock.recvmsg(65535, _GRO_CMSG)
    for level, kind, val in anc:
        if level == _SOL_UDP and kind == _UDP_GRO and len(val) >= 4:
            size = struct.unpack_from("=i", val)[0]          # the kernel's int gso_size
            if 0 < size < len(data):
                return [data[i:i + size] for i in range(0, len(data), size)], addr
    return [data], addr


def header(data):
    """(kind, family, count, epoch, seq, t0) of a datagram, or None when it is not one of ours."""
    if len(data) < HEADER_SIZE:
        return None
    magic, version, kind, fam, count, epoch, seq, t0 = _HDR.unpack_from(data)
    if magic != MAGIC or version != VERSION or kind not in (DATA, RESET, RESYNC, PULL, DONE):
        return None
    return kind, fam, count, epoch, seq, t0


def decode(data, fam, count):
    """The records of a DATA datagram, or None when its size or fields are wrong."""
    if fam not in _WIRE or len(data) != HEADER_SIZE + count * _WIRE[fam].itemsize:
        return None
    wire = np.frombuffer(data, _WIRE[fam], count, HEADER_SIZE)
    if not np.isin(wire["op"], (_OP_ADD, _OP_DEL)).all() or not np.isin(wire["proto"], (1, 6, 17, 58)).all():
        return None
    out = np.zeros(count, REPL_RECORD_DTYPE)
    out["family"] = fam
    for name in ("op", "proto", "state", "sport", "dport", "xport"):
        out[name] = wire[name]
    w = 4 if fam == 4 else 16
    for name in ("src", "dst", "xsrc"):
        out[name][:, :w] = wire[name]
    return out


def _reset_datagram(egress_ips, *, epoch, seq, kind=RESET):
    fam = 4
    body = b"".join(_packed16(ip)[1] for ip in egress_ips)
    return _HDR.pack(MAGIC, VERSION, kind, fam, len(egress_ips), epoch, seq, 0) + body


def pull_request(egress_ips):
    """'Send me your connections of these egress IPs' (a node about to take them back)."""
    return _reset_datagram(sorted(egress_ips), epoch=0, seq=0, kind=PULL)


def egress_ips_of(data, count):
    """The `count` egress IPs (text) of a RESET, PULL or DONE datagram, or None when its size is wrong."""
    if len(data) != HEADER_SIZE + 16 * count:
        return None
    return [_text16(data[HEADER_SIZE + 16 * i:HEADER_SIZE + 16 * (i + 1)]) for i in range(count)]


def resync_request(epoch):
    """The standby's 'resync me' (the epoch it last followed, 0 for none)."""
    return _HDR.pack(MAGIC, VERSION, RESYNC, 0, 0, epoch, 0, 0)


class Sender:
    """The active side of one stream: numbers and sends datagrams to `target`.

    send(records, t0) and reset(egress_ips) are called from one control
    thread; the socket is the caller's (opened in the node's namespace)."""

    def __init__(self, sock, *, epoch=None):
        self.sock = sock
        self.epoch = epoch if epoch is not None else (int.from_bytes(os.urandom(4), "little") or 1)
        self.seq = 0
        self.target = None
        self.gso = True              # UDP_SEGMENT until the kernel refuses it
        self._buf = {fam: bytearray(GSO_DATAGRAMS * REPL_DATAGRAM_BYTES[fam]) for fam in (4, 6)}
        self.counters = {"datagrams": 0, "records": 0, "bytes": 0, "send_errors": 0, "resets": 0}

    def send_log(self, flow_log, egress_ips):
        """Drain `flow_log` and send the starts and ends of `egress_ips` (C:
        repl_encode_log, then one send per GSO_DATAGRAMS datagrams of a
        family); returns the records drained.  The one consumer of that ring."""
        drained = 0
        ips = sorted(egress_ips)
        while True:
            n4, n6, grams, taken, kept = repl_encode_log(flow_log, ips, self.epoch, self.seq,
                                                         self._buf[4], self._buf[6])
            drained += taken
            if self.target is not None:
                self.seq += grams
                self.counters["records"] += kept
                for fam, n in ((4, n4), (6, n6)):
                    if n:
                        self._send_many(memoryview(self._buf[fam])[:n], REPL_DATAGRAM_BYTES[fam])
            if not taken or (n4 < len(self._buf[4]) and n6 < len(self._buf[6])):
                return drained

    def _send_many(self, data, size):
        """Datagrams of `size` bytes (the last shorter) in one send when the kernel segments them."""
        count = -(-len(data) // size)
        if count > 1 and self.gso:
            try:
                self.sock.sendmsg([data], [(_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", size))], 0, self.target)
                self.counters["datagrams"] += count
                self.counters["bytes"] += len(data)
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    self.counters["send_errors"] += 1
                    return
                self.gso = False
        for off in range(0, len(data), size):
            self._send(data[off:off + size])

    def _send(self, data):
        if self.target is None:
            return
        try:
            self.sock.sendto(data, self.target)
            self.counters["datagrams"] += 1
            self.counters["bytes"] += len(data)
        except OSError:      # no neighbour yet, buffer full: the standby sees a gap and asks again
            self.counters["send_errors"] += 1

    def send(self, records, t0=0):
        if self.target is None or not len(records):
            return 0
        grams = encode(records, epoch=self.epoch, seq=self.seq, t0=t0)
        for seq, data in grams:
            self._send(data)
        self.seq += len(grams)
        self.counters["records"] += len(records)
        return len(grams)

    def reset(self, egress_ips):
        """Begin a full resync of `egress_ips` (their chunks follow as DATA)."""
        if self.target is None:
            return
        self._send(_reset_datagram(sorted(egress_ips), epoch=self.epoch, seq=self.seq))
        self.seq += 1
        self.counters["resets"] += 1

    def done(self, egress_ips):
        """End an export of `egress_ips` (an answer to a PULL): everything was sent."""
        if self.target is None:
            return
        self._send(_reset_datagram(sorted(egress_ips), epoch=self.epoch, seq=self.seq, kind=DONE))
        self.seq += 1


class Receiver:
    """The standby side: checks every datagram, hands good records to `apply`.

    Receiver(apply, reset, request, *, max_pending=65536, resync_every=0.5, finished=None)

    datagram(data, src_ip, gateways, egress_ips) takes one datagram from
    `src_ip`; `gateways` is the set of cluster gateway IPs, `egress_ips` the
    egress IPs this node is standby for.  Good records go to apply(records,
    t0, done) (done(n) must be called once they are applied: the pending
    count); a reset goes to apply as reset(egress_ips).  When it falls
    behind, request(src_ip, epoch) asks the active for a resync.  A DONE
    (the end of an export asked for with PULL) goes to finished(src_ip,
    egress_ips), in sequence like the records before it."""

    REASONS = ("not_gateway", "malformed", "other_stream", "out_of_sequence", "gap", "foreign_egress_ip",
               "overflow")

    def __init__(self, apply, reset, request, *, max_pending=65536, resync_every=0.5, clock=time.monotonic,
                 finished=None):
        self.apply = apply
        self.finished = finished
        self.reset = reset
        self.request = request
        self.max_pending = max_pending
        self.resync_every = resync_every
        self.clock = clock
        self._streams = {}          # src ip -> [epoch, next seq, synced]
        self._asked = {}            # src ip -> last request time
        self._lock = threading.Lock()
        self.pending = 0
        self.dropped = dict.fromkeys(self.REASONS, 0)
        self.counters = {"datagrams": 0, "records": 0, "resets": 0, "resync_requests": 0, "done": 0}

    def done(self, n):
        with self._lock:
            self.pending -= n

    def ask(self, src, epoch):
        """Ask `src` for a resync, at most every resync_every s."""
        now = self.clock()
        if now - self._asked.get(src, -1e9) >= self.resync_every:
            self._asked[src] = now
            self.counters["resync_requests"] += 1
            self.request(src, epoch)

    def synced(self, src):
        s = self._streams.get(src)
        return bool(s and s[2])

    def datagram(self, data, src, gateways, egress_ips):
        """Take one datagram; returns the reason it was dropped, or None."""
        if src not in gateways:
            return self._drop("not_gateway")
        h = header(data)
        if h is None or h[0] in (RESYNC, PULL):
            return self._drop("malformed")
        kind, fam, count, epoch, seq, t0 = h
        if kind in (RESET, DONE):           # checked whole before it counts in the sequence
            ips = egress_ips_of(data, count)
            if ips is None:
                return self._drop("malformed")
        else:
            recs = decode(data, fam, count)
            if recs is None:
                return self._drop("malformed")
        s = self._streams.get(src)
        if s is None or s[0] != epoch:
            if kind != RESET:               # a stream joined midway: nothing of it counts before its reset
                self._streams[src] = [epoch, seq + 1, False]
                self.ask(src, epoch)
                return self._drop("other_stream")
            s = self._streams[src] = [epoch, seq, False]
        if seq < s[1]:
            return self._drop("out_of_sequence")
        if seq > s[1] and kind != RESET:        # a reset starts over: what it follows was missed anyway
            s[1] = seq + 1
            s[2] = False
            self.ask(src, epoch)
            return self._drop("gap")
        s[1] = seq + 1
        if kind == RESET:
            s[2] = True
            self.counters["resets"] += 1
            self.reset([ip for ip in ips if ip in egress_ips])
            return None
        if kind == DONE:
            self.counters["done"] += 1
            if s[2] and self.finished is not None:     # a complete export: its reset and every record since
                self.finished(src, [ip for ip in ips if ip in egress_ips])
            return None
        good = _select(recs, egress_ips)
        if len(good) < len(recs):
            self.dropped["foreign_egress_ip"] += len(recs) - len(good)
        self.counters["datagrams"] += 1
        if not len(good):
            return None
        with self._lock:
            if self.pending + len(good) > self.max_pending:
                full = True
            else:
                full = False
                self.pending += len(good)
        if full:
            s[2] = False
            self.ask(src, epoch)
            return self._drop("overflow")
        self.counters["records"] += len(good)
        self.apply(good, t0)
        return None

    def _drop(self, reason):
        self.dropped[reason] += 1
        return reason


def _text16(raw):
    if raw[4:] == bytes(12):
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


class LagWindow:
    """The last `size` replication lags (s): record written on the active ->
    applied here.  Both ends read CLOCK_MONOTONIC, so the figure is exact
    only when they share a clock (the lab: one kernel); across machines it
    includes their clocks' offset."""

    def __init__(self, size=4096):
        self._buf = np.zeros(size)
        self._n = 0
        self._lock = threading.Lock()

    def add(self, seconds):
        with self._lock:
            self._buf[self._n % len(self._buf)] = seconds
            self._n += 1

    def summary(self):
        with self._lock:
            v = self._buf[:min(self._n, len(self._buf))].copy()
        if not len(v):
            return {"samples": 0}
        return {"samples": int(self._n), "p50_ms": round(float(np.percentile(v, 50)) * 1e3, 3),
                "p99_ms": round(float(np.percentile(v, 99)) * 1e3, 3), "max_ms": round(float(v.max()) * 1e3, 3)}
