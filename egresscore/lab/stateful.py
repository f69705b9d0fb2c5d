"""Stateful failover in the lab: transfers and fresh connections across a gateway failure.

Shared by tests/test_failover_stateful_e2e.py and benchmarks/compare_failover_stateful.py.
The policy is examples/egress-ha-stateful.yaml: the floating egress IP
FLOATING_EGRESS_IP is held by node3 and replicated to node4.

- paced_download / paced_upload: one TCP transfer through the gateway at a
  bounded rate (so it is still running when the gateway fails), with the
  time of every chunk read or written; the stall is the longest pause.
- udp_pairs / udp_churn: a new UDP flow every few ms from a pod port outside
  the NAT range (the gateway picks a random egress port), each sending one
  datagram, then, after the failure, one more on the same socket.  A flow
  survived when both datagrams reached the server from the same egress IP
  and port: the standby had its connection.  Flows opened just before the
  failure show the replication window.

Times are CLOCK_MONOTONIC, one clock for every namespace of the machine.
"""
import hashlib
import socket
import time
from typing import NamedTuple

from . import _ns, traffic

FLOATING_EGRESS_IP = "192.168.1.120"
CHURN_PORT = 9200
CHURN_BASE_SPORT = 20000       # below the NAT range: the gateway does not keep the pod's port
_CHUNK = 65536


def _gap(times):
    """(longest pause between consecutive times, when it began)."""
    best, at = 0.0, None
    for a, b in zip(times, times[1:]):
        if b - a > best:
            best, at = b - a, a
    return best, at


def paced_download(conn, dst, n, rate, port=traffic.HTTP_PORT, timeout=30.0):
    """GET n pattern bytes reading at most `rate` bytes/s; sends over `conn`
    {received, intact, started, ended, stall, stall_at}."""
    out = {"received": 0, "intact": False, "started": time.monotonic(), "error": None}
    times = []
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)   # the sender is held back by the window
        s.settimeout(timeout)
        s.connect((dst, port))
        s.sendall(f"GET /bytes/{int(n)} HTTP/1.0\r\nHost: {dst}\r\n\r\n".encode())
        data = bytearray()
        deadline = time.monotonic() + timeout
        start = time.monotonic()
        while time.monotonic() < deadline:
            chunk = s.recv(_CHUNK)
            if not chunk:
                break
            data += chunk
            now = time.monotonic()
            times.append(now)
            ahead = start + len(data) / rate - now
            if ahead > 0:
                time.sleep(ahead)
        s.close()
        body = bytes(data.partition(b"\r\n\r\n")[2])
        out["received"] = len(body)
        out["intact"] = len(body) == n and hashlib.sha256(body).hexdigest() == traffic.payload_sha256(n)
    except OSError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["ended"] = time.monotonic()
    out["stall"], out["stall_at"] = _gap(times)
    conn.send(out)


def paced_upload(conn, dst, n, rate, port=traffic.HTTP_PORT, timeout=30.0):
    """PUT n pattern bytes writing at most `rate` bytes/s; sends over `conn`
    {sent, intact (the server's count and sha256 match), started, ended, stall, stall_at}."""
    body = traffic._pattern(int(n))
    out = {"sent": 0, "intact": False, "started": time.monotonic(), "error": None}
    times = []
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)   # a stall blocks the writes
        s.settimeout(timeout)
        s.connect((dst, port))
        s.sendall(f"PUT /sha256 HTTP/1.0\r\nHost: {dst}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        start = time.monotonic()
        for off in range(0, len(body), _CHUNK):
            s.sendall(body[off:off + _CHUNK])
            now = time.monotonic()
            times.append(now)
            out["sent"] = off + len(body[off:off + _CHUNK])
            ahead = start + out["sent"] / rate - now
            if ahead > 0:
                time.sleep(ahead)
        reply = traffic._read_reply(s, timeout)
        s.close()
        got, digest = reply.partition(b"\r\n\r\n")[2].decode().split()
        out["intact"] = int(got) == len(body) and digest == hashlib.sha256(body).hexdigest()
    except (OSError, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["ended"] = time.monotonic()
    out["stall"], out["stall_at"] = _gap(times)
    conn.send(out)


def udp_pairs(conn, addr, port, seconds):
    """Server side of udp_churn: sends "ready", then {flow id: [(phase, time, src, sport)]}."""
    seen = {}
    for data, src, sport in traffic.datagrams_for(conn, addr, port, seconds):
        if len(data) == 5:
            seen.setdefault(int.from_bytes(data[1:5], "big"), []).append(
                (data[:1].decode(), time.monotonic(), src, sport))
    conn.send(seen)


def udp_churn(conn, dst, port, seconds, interval, second_at):
    """A new flow (socket, pod port CHURN_BASE_SPORT + i) every `interval` s for
    `seconds`, one datagram "A" each; at time.monotonic() `second_at`, one "B"
    on every socket.  Sends {flow id: opened at} over `conn`."""
    n = min(int(seconds / interval), 10_000)
    socks, opened = [], {}
    start = time.monotonic()
    try:
        for i in range(n):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", CHURN_BASE_SPORT + i))
            socks.append((i, s))
            opened[i] = time.monotonic()
            try:
                s.sendto(b"A" + i.to_bytes(4, "big"), (dst, port))
            except OSError:
                pass
        delay = second_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for i, s in socks:
            try:
                s.sendto(b"B" + i.to_bytes(4, "big"), (dst, port))
            except OSError:
                pass
            time.sleep(0.001)
    finally:
        for _, s in socks:
            s.close()
    conn.send(opened)


def churn_losses(opened, seen, failed_at, bins=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0)):
    """[(window s, flows opened in the last `window` s before failed_at, lost)]:
    a flow is lost when its second datagram did not arrive from the same
    egress IP and port as its first."""
    rows = []
    for w in bins:
        ids = [i for i, t in opened.items() if failed_at - w <= t < failed_at]
        lost = 0
        for i in ids:
            got = {phase: (src, sport) for phase, _, src, sport in seen.get(i, ())}
            if "A" not in got or got.get("B") != got["A"]:
                lost += 1
        rows.append((w, len(ids), lost))
    return rows


def spawn(ns, fn, *args):
    """Run fn(conn, *args) in namespace `ns`; returns (process, parent end)."""
    parent, child = _ns._fork.Pipe()
    proc = _ns.spawn(ns, fn, child, *args)
    child.close()
    return proc, parent


def collect(proc, parent, timeout):
    """fn's one message, then the process joined (killed after `timeout`)."""
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"no result within {timeout} s")
        return parent.recv()
    finally:
        parent.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(2)


class Failure(NamedTuple):
    failed_at: float
    download: dict          # paced_download's result
    upload: dict            # paced_upload's result
    losses: list            # churn_losses rows
    tcp: list               # the server's TCP records {src, sport, ...} of the two transfers


def transfers_through_failure(lab, fail, *, pod="app1", server="203.0.113.10", size=20_000_000, rate=5_000_000,
                              before=1.5, churn_seconds=1.5, churn_interval=0.005):
    """A paced download and upload of `size` bytes and the UDP churn from
    `pod` while fail() (returning its time.monotonic()) takes the gateway
    out `before` s into them; a Failure.  The servers' records are cleared
    first (lab.servers_)."""
    lab.servers_.clear()
    ext = lab.ns(lab._server_of(server).name)
    ns = lab.ns(pod)
    t0 = time.monotonic()
    transfer = size / rate
    pairs = spawn(ext, udp_pairs, server, CHURN_PORT, transfer + 8.0)
    if not pairs[1].poll(10) or pairs[1].recv() != "ready":
        raise RuntimeError("the churn receiver did not start")
    down = spawn(ns, paced_download, server, size, rate)
    up = spawn(ns, paced_upload, server, size, rate)
    churn = spawn(ns, udp_churn, server, CHURN_PORT, churn_seconds, churn_interval, t0 + transfer + 1.0)
    time.sleep(before)
    failed_at = fail()
    res_down = collect(*down, transfer + 30)
    res_up = collect(*up, transfer + 30)
    opened = collect(*churn, transfer + 20)
    seen = collect(*pairs, transfer + 20)
    return Failure(failed_at, res_down, res_up, churn_losses(opened, seen, failed_at),
                   list(lab.servers_.seen("tcp", server)))
