"""AF_PACKET rings side by side: 64-byte frames over a veth pair.

One veth pair across two throwaway namespaces (egc-ring-bench-*), and on it,
in the same run:
  - TX: frames handed to the kernel per second by a plain Python
    socket.send loop, a pure-Python TPACKET_V3 TX ring (mmap + struct), the
    egresscore PacketRing (with and without PACKET_QDISC_BYPASS), and the
    pair's ceiling: netsniff-ng's trafgen (C, TX_RING, one CPU).
  - RX drain: N frames queued first (nobody reading), then the time to take
    them all: plain socket.recv_into loop, pure-Python V3 ring walk, PacketRing.
  - RX live: trafgen pushes N frames while each receiver reads; frames
    received per second, and what it missed.
Rounds are interleaved (every peer once per round); rates are medians over
rounds and ratios are medians of the per-round ratios, so load from other
jobs drifting between rounds cancels out.
Bounded: N frames per measurement (--quick: fewer), every run time-boxed.
Needs root (namespaces) and trafgen (Debian: apt-get install netsniff-ng).
"""
import argparse
import mmap
import os
import re
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from egresscore._core import _ring_in_netns  # noqa: E402

from egresscore import PacketRing  # noqa: E402
from egresscore._ringlab import link_mac, plain_socket, veth_pair  # noqa: E402

ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5
SOL_PACKET = 263
PACKET_RX_RING, PACKET_TX_RING, PACKET_VERSION, PACKET_LOSS = 5, 13, 10, 14
PACKET_QDISC_BYPASS = 20
TPACKET_V3 = 2
SO_RCVBUFFORCE = 33
FRAME = 64
SECONDS_CAP = 20.0  # no single measurement runs longer


def frame_bytes(dst, src, i=0):
    return dst + src + ETHERTYPE.to_bytes(2, "big") + bytes((i + k) & 0xFF for k in range(FRAME - 14))


# ---- the pure-Python TPACKET_V3 ring (the peer) ----------------------------

class PyV3Ring:
    """TPACKET_V3 with mmap + struct only: what a Python program gets
    without a native core."""

    def __init__(self, ns, ifname, rx_blocks=0, block_size=1 << 20, tx_frames=0, retire_ms=2):
        with _ring_in_netns(ns):
            self.s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        s = self.s
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        rx_len = tx_len = 0
        if tx_frames:
            s.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
        if rx_blocks:
            s.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack(
                "7I", block_size, rx_blocks, 2048, block_size // 2048 * rx_blocks, retire_ms, 0, 0))
            rx_len = block_size * rx_blocks
        if tx_frames:
            self.tx_fpb = (1 << 16) // 2048
            blocks = (tx_frames + self.tx_fpb - 1) // self.tx_fpb
            self.tx_nr = blocks * self.tx_fpb
            s.setsockopt(SOL_PACKET, PACKET_TX_RING, struct.pack(
                "7I", 1 << 16, blocks, 2048, self.tx_nr, 0, 0, 0))
            tx_len = blocks << 16
        self.mm = mmap.mmap(s.fileno(), rx_len + tx_len, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        self.block_size, self.nr, self.cur = block_size, rx_blocks, 0
        self.tx_base, self.tx_cur = rx_len, 0
        self.poll = select.poll()
        self.poll.register(s.fileno(), select.POLLIN)
        s.bind((ifname, ETH_P_ALL if rx_blocks else 0))

    def recv(self, max_frames, timeout_ms):
        """Walk ready blocks, copying each frame out; returns the frames."""
        out, mm, unpack = [], self.mm, struct.unpack_from
        while len(out) < max_frames:
            bd = self.cur * self.block_size
            if not unpack("I", mm, bd + 8)[0] & 1:  # TP_STATUS_USER
                if out or not self.poll.poll(timeout_ms):
                    break
                if not unpack("I", mm, bd + 8)[0] & 1:
                    break
            num, off = unpack("II", mm, bd + 12)
            pos = bd + off
            for _ in range(num):
                nxt, snap, mac = unpack("I8xI8xH", mm, pos)
                out.append(mm[pos + mac:pos + mac + snap])
                pos += nxt
            struct.pack_into("I", mm, bd + 8, 0)  # TP_STATUS_KERNEL
            self.cur = (self.cur + 1) % self.nr
        return out

    def send(self, frames):
        mm, unpack, pack = self.mm, struct.unpack_from, struct.pack_into
        for f in frames:
            i = self.tx_cur
            base = self.tx_base + (i // self.tx_fpb << 16) + (i % self.tx_fpb) * 2048
            while unpack("I", mm, base + 20)[0] != 0:  # TP_STATUS_AVAILABLE
                self.s.send(b"", socket.MSG_DONTWAIT)
                select.select([], [self.s], [], 0.01)
            n = len(f)
            mm[base + 48:base + 48 + n] = f
            pack("II", mm, base + 12, n, n)
            pack("I", mm, base + 20, 1)  # TP_STATUS_SEND_REQUEST
            self.tx_cur = (i + 1) % self.tx_nr
        try:
            self.s.send(b"", socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass

    def close(self):
        self.mm.close()
        self.s.close()


# ---- measurements ----------------------------------------------------------

def tx_plain(p, n):
    s = plain_socket(p["na"], p["ia"], 0)
    f = p["frame"]
    send = s.send
    t = time.perf_counter()
    for _ in range(n):
        send(f)
    dt = time.perf_counter() - t
    s.close()
    return n / dt


def tx_pyring(p, n, batch=1024):
    r = PyV3Ring(p["na"], p["ia"], tx_frames=4096)
    frames = [p["frame"]] * batch
    t = time.perf_counter()
    for _ in range(n // batch):
        r.send(frames)
    dt = time.perf_counter() - t
    r.close()
    return n // batch * batch / dt


def tx_ring(p, n, bypass, batch=1024):
    data = np.frombuffer(p["frame"] * batch, dtype=np.uint8).reshape(batch, FRAME).copy()
    with PacketRing(p["ia"], netns=p["na"], rx=False, tx_frames=batch, qdisc_bypass=bypass) as r:
        t = time.perf_counter()
        sent = 0
        for _ in range(n // batch):
            sent += r.send_batch(data)
        dt = time.perf_counter() - t
    return sent / dt


def trafgen(p, n, qdisc=False):
    """Run trafgen on the pair's first end; returns (pps on its CPU clock, wall pps)."""
    cfg = "{ " + ", ".join(f"0x{b:02x}" for b in p["frame"][:14]) + ", fill(0x41, %d) }\n" % (FRAME - 14)
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", prefix="egc-ring-") as f:
        f.write(cfg)
        f.flush()
        argv = ["ip", "netns", "exec", p["na"], "trafgen", "-o", p["ia"], "-i", f.name, "-n", str(n),
                "-P", "1", "--no-sock-mem", "--notouch-irq"] + (["-q"] if qdisc else [])
        t = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=SECONDS_CAP + 10)
        wall = time.perf_counter() - t
    m = re.search(r"(\d+) sec, (\d+) usec on CPU\d+ \((\d+) packets\)", out.stdout + out.stderr)
    if not m:
        raise RuntimeError(f"trafgen output not understood: {out.stdout[-300:]} {out.stderr[-300:]}")
    secs = int(m.group(1)) + int(m.group(2)) / 1e6
    return int(m.group(3)) / secs, n / wall


def rx_drain_plain(p, n):
    s = plain_socket(p["nb"], p["ib"], ETHERTYPE)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 30)
    with PacketRing(p["ia"], netns=p["na"], rx=False, tx_frames=4096) as tx:
        sent = tx.send_batch(p["batch"][np.arange(n) % len(p["batch"])])
    time.sleep(0.05)
    buf = bytearray(2048)
    s.setblocking(False)
    recv_into = s.recv_into
    got = 0
    t = time.perf_counter()
    try:
        while True:
            recv_into(buf)
            got += 1
    except BlockingIOError:
        pass
    dt = time.perf_counter() - t
    s.close()
    return got / dt, got, sent


def _prefill(p, n):
    with PacketRing(p["ia"], netns=p["na"], rx=False, tx_frames=4096) as tx:
        sent = tx.send_batch(p["batch"][np.arange(n) % len(p["batch"])])
    time.sleep(2 * DRAIN_RETIRE_MS / 1000)  # let the last, partly filled block retire
    return sent


# Long enough that blocks close full while the queue is filled (a short
# timeout closes a block per tick and the ring runs out of blocks).
DRAIN_RETIRE_MS = 100


def rx_drain_pyring(p, n):
    r = PyV3Ring(p["nb"], p["ib"], rx_blocks=max(8, n * 160 // (1 << 20) + 8),
                 retire_ms=DRAIN_RETIRE_MS)
    sent = _prefill(p, n)
    got = 0
    t = time.perf_counter()
    while True:
        k = len(r.recv(1 << 30, 0))
        if not k:
            break
        got += k
    dt = time.perf_counter() - t
    r.close()
    return got / dt, got, sent


def rx_drain_ring(p, n):
    blocks = max(8, n * 160 // (1 << 20) + 8)
    with PacketRing(p["ib"], netns=p["nb"], tx=False, block_size=1 << 20, block_count=blocks,
                    retire_ms=DRAIN_RETIRE_MS, batch=4096) as r:
        sent = _prefill(p, n)
        out = np.empty((4096, 128), dtype=np.uint8)
        lens = np.empty(4096, dtype=np.uint32)
        got = 0
        t = time.perf_counter()
        while True:
            k = r.recv_into(out, lens, timeout=0)
            if not k:
                break
            got += k
        dt = time.perf_counter() - t
    return got / dt, got, sent


def rx_live(p, n, receiver):
    """trafgen pushes n frames while the receiver (a callable returning the
    frames taken per call, 0 when idle) reads until the sender is done and
    the queue is empty.  Returns (received/s from first to last frame, got,
    trafgen's own send rate in this run)."""
    done = threading.Event()
    result = {}

    def gen():
        try:
            result["tg"] = trafgen(p, n)
        finally:
            done.set()

    got = 0
    th = threading.Thread(target=gen)
    th.start()
    deadline = time.perf_counter() + SECONDS_CAP
    t_first = t_last = idle_since = None
    while time.perf_counter() < deadline:
        k = receiver()
        now = time.perf_counter()
        if k:
            t_first = t_first or now
            t_last = now
            got += k
            idle_since = None
        elif done.is_set():
            idle_since = idle_since or now
            if now - idle_since > 0.1:
                break
    th.join()
    if "tg" not in result or not t_first or t_last == t_first:
        raise RuntimeError("rx_live: trafgen or the receiver did not run")
    return got / (t_last - t_first), got, result["tg"][0]


def rx_live_plain(p, n):
    s = plain_socket(p["nb"], p["ib"], ETHERTYPE)
    s.settimeout(0.01)
    buf = bytearray(2048)
    recv_into = s.recv_into

    def take():
        k = 0
        try:
            for _ in range(1024):
                recv_into(buf)
                k += 1
        except (TimeoutError, BlockingIOError, socket.timeout):
            pass
        return k
    try:
        return rx_live(p, n, take)
    finally:
        s.close()


def rx_live_pyring(p, n):
    r = PyV3Ring(p["nb"], p["ib"], rx_blocks=64)
    try:
        return rx_live(p, n, lambda: len(r.recv(1 << 16, 10)))
    finally:
        r.close()


def rx_live_ring(p, n):
    out = np.empty((4096, 128), dtype=np.uint8)
    lens = np.empty(4096, dtype=np.uint32)
    with PacketRing(p["ib"], netns=p["nb"], tx=False, block_size=1 << 20, block_count=64,
                    retire_ms=1, batch=4096) as r:
        return rx_live(p, n, lambda: r.recv_into(out, lens, timeout=0.01))


# ---- the table -------------------------------------------------------------

def rounds(fns, runs):
    """Run every measurement once per round, rounds interleaved: the
    machine's load drifts, so neighbours in a round see the same load."""
    vals = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            vals[i].append(fn())
    return vals


def med(v, i=None):
    return statistics.median(v if i is None else [x[i] for x in v])


def ratio(a, b, i=None, j=None):
    """Median of the per-round ratios a/b (robust to load drifting between rounds)."""
    return statistics.median((x if i is None else x[i]) / (y if j is None else y[j])
                             for x, y in zip(a, b))


def kpps(x):
    return f"{x / 1e3:,.0f}"


def run(quick=False):
    if os.geteuid() != 0:
        return "### AF_PACKET rings\n\nskipped: needs root to create network namespaces\n"
    have_tg = shutil.which("trafgen") is not None
    n_tx = 100_000 if quick else 1_000_000
    n_plain = 50_000 if quick else 300_000
    n_rx = 50_000 if quick else 200_000
    runs = 1 if quick else 7
    lines = []
    with veth_pair("bench") as (na, ia, nb, ib):
        ma, mb = link_mac(na, ia), link_mac(nb, ib)
        p = {"na": na, "ia": ia, "nb": nb, "ib": ib, "frame": frame_bytes(mb, ma)}
        p["batch"] = np.stack([np.frombuffer(frame_bytes(mb, ma, i), dtype=np.uint8) for i in range(256)])
        # TX
        fns = [lambda: tx_plain(p, n_plain), lambda: tx_pyring(p, n_plain),
               lambda: tx_ring(p, n_tx, False), lambda: tx_ring(p, n_tx, True)]
        if have_tg:
            fns += [lambda: trafgen(p, n_tx)[0], lambda: trafgen(p, n_tx, qdisc=True)[0]]
        plain, pyr, ring, ring_b, *tgs = rounds(fns, runs)
        tg, tg_q = tgs if have_tg else (None, None)
        lines.append("| TX, 64-byte frames | kpps | vs plain socket | vs trafgen |")
        lines.append("|---|---:|---:|---:|")

        def row(name, v, ceiling):
            c = f"{ratio(v, ceiling):.2f}" if ceiling else "n/a"
            lines.append(f"| {name} | {kpps(med(v))} | {ratio(v, plain):.1f}x | {c} |")
        row("plain Python `socket.send` loop", plain, tg)
        row("pure-Python TPACKET_V3 ring (mmap+struct)", pyr, tg)
        row("egresscore `PacketRing.send_batch` (qdisc)", ring, tg_q)
        row("egresscore `PacketRing.send_batch` (qdisc bypass)", ring_b, tg)
        if have_tg:
            row("trafgen -q (qdisc path; ceiling for the qdisc row)", tg_q, tg_q)
            row("trafgen (qdisc bypass; the pair's ceiling)", tg, tg)
        # RX drain
        lines.append("")
        lines.append("| RX drain (queued first), 64-byte frames | kpps | vs plain socket |")
        lines.append("|---|---:|---:|")
        d_plain, d_pyr, d_ring = rounds([lambda: rx_drain_plain(p, n_rx), lambda: rx_drain_pyring(p, n_rx),
                                         lambda: rx_drain_ring(p, n_rx)], runs)
        for name, v in (("plain Python `socket.recv_into` loop", d_plain),
                        ("pure-Python TPACKET_V3 ring walk", d_pyr),
                        ("egresscore `PacketRing.recv_into` (NumPy)", d_ring)):
            lines.append(f"| {name} ({int(med(v, 1)):,} frames) | {kpps(med(v, 0))} | "
                         f"{ratio(v, d_plain, 0, 0):.1f}x |")
        # RX live
        if have_tg:
            lines.append("")
            lines.append("| RX live, trafgen sending | kpps received | got / sent | vs plain socket "
                         "| trafgen kpps (same run) | vs trafgen |")
            lines.append("|---|---:|---:|---:|---:|---:|")
            l_plain, l_pyr, l_ring = rounds([lambda: rx_live_plain(p, n_rx), lambda: rx_live_pyring(p, n_rx),
                                             lambda: rx_live_ring(p, n_rx)], runs)
            for name, v in (("plain Python `socket.recv_into` loop", l_plain),
                            ("pure-Python TPACKET_V3 ring walk", l_pyr),
                            ("egresscore `PacketRing.recv_into` (NumPy)", l_ring)):
                got = statistics.median(x[1] / n_rx for x in v)
                lines.append(f"| {name} | {kpps(med(v, 0))} | {got:.0%} | "
                             f"{ratio(v, l_plain, 0, 0):.1f}x | {kpps(med(v, 2))} | "
                             f"{ratio(v, v, 0, 2):.2f} |")
    head = (f"### AF_PACKET rings ({'quick' if quick else 'full'}: TX {n_tx:,} frames "
            f"(plain/pure-Python {n_plain:,}), RX {n_rx:,} frames, median of {runs} interleaved rounds)\n")
    if not have_tg:
        head += "\ntrafgen not found (apt-get install netsniff-ng): no ceiling column\n"
    return head + "\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    print(run(quick=ap.parse_args().quick))
