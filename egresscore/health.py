"""Gateway health: which gateway nodes are up, from liveness providers and direct probes.

Two inputs, one answer (the set of nodes that are down, handed to
Compiler.set_down):

- a LivenessProvider: where the cluster keeps each agent's liveness.  The
  stores' own come with their sources (Source.liveness(): EtcdLiveness, a
  node whose lease key is gone, in egresscore.sources.etcd; LeaseLiveness, a
  node whose Lease egresscore-<node> is not renewed in time, in
  egresscore.sources.k8s_lease).  Here the interface and two providers:
  StaticLiveness (a fixed set) and FileLiveness (a YAML/JSON file
  `down: [node, ...]`, re-read when it changes);
- direct probes (Prober): this node sends a small UDP heartbeat to every
  gateway it may use, over the underlay, every `interval` seconds (10 per
  second by default); a gateway is down when its last `misses` pings (3) are
  unanswered and the first of them went out `misses` - 1/2 intervals ago or
  more (0.25 s; counted in time, not in rounds: a round that ran late
  judges no sooner, and the half round is the time a send takes to come
  after its round's start),
  up again when it answers `rises` pings in a row (2).  A late pong counts
  for its ping, and the socket is read before each judgment, so answers
  delayed by a loaded prober or gateway, up to those 0.25 s, never mark a
  gateway down.  The gateway's agent answers with a Responder: a UDP socket
  on the node IP and HEARTBEAT_PORT served from C with the GIL released (no
  Python thread of the agent can hold a pong back).  Nodes start up (as
  Cilium assumes them): a gateway that is dead when this agent starts is
  found within `misses` rounds.

HEARTBEAT_PORT is UDP 4799, below the NAT port range (32768-65534) and off
the VXLAN port (8472): the agent's FIB claims (egresscore.agent.host) blackhole
only VXLAN to the node IP and the NAT range on local addresses, so the
kernel delivers heartbeats to the responder's socket and the answers to the
prober's (its source port comes from the kernel's ip_local_port_range, which
the agent keeps disjoint from the NAT range).  The datapath passes both (not
VXLAN, below the NAT range), and nothing here runs on the datapath thread:
the prober and the responder each have their own thread.

A heartbeat is 16 bytes: b"EGCH", a kind byte (1 ping, 2 pong), 3 zero
bytes, and a 64-bit round number that the pong echoes.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
import threading
import time

import yaml

from ._core import HeartbeatAnswerer
from .errors import EgressError

__all__ = ["HEARTBEAT_PORT", "FileLiveness", "GatewayHealth", "LivenessError", "LivenessProvider", "Prober",
           "Responder", "StaticLiveness"]

HEARTBEAT_PORT = 4799
_MAGIC = b"EGCH"
_PING, _PONG = 1, 2
_FMT = struct.Struct("!4sB3xQ")
# errors a UDP socket reports for an earlier datagram (an ICMP error came back): read on
_TRANSIENT = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN)


class LivenessError(EgressError, ValueError):
    """A liveness input that cannot be read: the path and what is wrong."""


class LivenessProvider:
    """Where agents' liveness is kept (etcd lease, Kubernetes Lease, a file).

    down() returns, now, the names of the nodes this provider knows to be
    down (a node it does not judge is not in it); called on the health
    thread every probe round, so it must be cheap (keep a set updated from a
    watch on your own thread and return it).  close() releases what it holds."""

    def down(self) -> frozenset:
        raise NotImplementedError

    def close(self):
        pass


class StaticLiveness(LivenessProvider):
    """A fixed set of down nodes (tests, operators draining a gateway by hand)."""

    def __init__(self, down=()):
        self._down = frozenset(down)

    def down(self):
        return self._down


class FileLiveness(LivenessProvider):
    """Down nodes from a YAML or JSON file `{down: [node3, ...]}`, re-read when
    its mtime or size changes.  A bad file at start raises LivenessError; later
    the last good set stays in force and one line on stderr says why."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._stamp = None
        self._down = self._read()

    def _read(self):
        try:
            st = os.stat(self.path)
            with open(self.path) as f:
                text = f.read(1 << 20)
        except OSError as exc:
            raise LivenessError(f"{self.path}: {exc.strerror}") from None
        self._stamp = (st.st_mtime_ns, st.st_size)
        try:
            data = yaml.safe_load(text) if text.strip() else {}
        except yaml.YAMLError as exc:
            raise LivenessError(f"{self.path}: invalid YAML: {str(exc).splitlines()[0]}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict) or set(data) - {"down"}:
            raise LivenessError(f"{self.path}: must be a mapping with one field, down (a list of node names)")
        names = data.get("down") or []
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise LivenessError(f"{self.path}: down: must be a list of node names")
        return frozenset(names)

    def down(self):
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                self._down = self._read()
        except LivenessError as exc:
            print(f"egresscore health: {exc}; keeping down={sorted(self._down)}", file=sys.stderr, flush=True)
        except OSError:
            pass
        return self._down


class Prober:
    """Heartbeats to `targets` ({name: IP}) over one UDP socket, judged in time.

    send() sends one ping per target (round numbers count up); read() takes
    the pongs waiting on the socket; close_round() judges: a target is down
    when its last `misses` pings in a row are unanswered and the first of
    them was sent at least `timeout` seconds ago (GatewayHealth sets it to
    `misses` - 1/2 of its rounds: 0.25 s by default).  A pong counts for any ping
    still unanswered, however late it comes (up to KEPT_ROUNDS rounds), and
    the socket is read before each judgment: a prober or a gateway delayed
    by a loaded CPU only delays the answers, and a gateway whose answers
    still come within `timeout` is never marked down; one that is down is up
    again after `rises` pings in a row answered.  The socket is passed in
    (the agent opens it inside the node's network namespace)."""

    KEPT_ROUNDS = 64     # send times kept: a pong later than this many rounds is ignored

    def __init__(self, sock, *, port=HEARTBEAT_PORT, misses=3, rises=2, timeout=None):
        if misses < 1 or rises < 1:
            raise ValueError("misses and rises must be at least 1")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
        self.sock = sock
        self.sock.setblocking(False)
        self.port = port
        self.misses = misses
        self.rises = rises
        self.timeout = timeout  # None: set by the GatewayHealth driving it (0 if none)
        self._targets = {}      # name -> ip
        self._by_ip = {}
        self._answered = {}     # name -> the newest round it answered (a new target: the round it came in)
        self._streak = {}       # name -> rounds in a row answered, up to that one
        self._miss = {}         # name -> pings unanswered at the last judgment
        self._sent_at = {}      # round -> monotonic send time (the last KEPT_ROUNDS)
        self._down = set()
        self._round = 0
        self.sent = self.received = self.late = 0

    def set_targets(self, targets):
        """New targets; a new one starts up (as Cilium assumes), a kept one keeps its state."""
        targets = dict(targets)
        for name in list(self._answered):
            if name not in targets:
                for d in (self._answered, self._streak, self._miss):
                    d.pop(name, None)
                self._down.discard(name)
        for name in targets:
            if name not in self._answered:
                self._answered[name] = self._round
                self._streak[name] = self.rises
                self._miss[name] = 0
        self._targets = targets
        self._by_ip = {ip: name for name, ip in targets.items()}

    def down(self) -> frozenset:
        return frozenset(self._down)

    def missed(self, name) -> int:
        """Pings in a row `name` had not answered at the last judgment (0 for a node not probed)."""
        return self._miss.get(name, 0)

    def close_round(self, now=None):
        """Judge now (monotonic seconds): who is down, who is up again."""
        now = time.monotonic() if now is None else now
        timeout = self.timeout or 0.0
        for name in self._targets:
            last = self._answered[name]
            out = self._round - last
            self._miss[name] = out
            if name in self._down:
                if out == 0 and self._streak[name] >= self.rises:
                    self._down.discard(name)
            elif out >= self.misses and now - self._sent_at.get(last + 1, now) >= timeout:
                self._down.add(name)
                self._streak[name] = 0

    def send(self, now=None):
        self._round += 1
        self._sent_at[self._round] = time.monotonic() if now is None else now
        self._sent_at.pop(self._round - self.KEPT_ROUNDS, None)
        ping = _FMT.pack(_MAGIC, _PING, self._round)
        for ip in self._targets.values():
            try:
                self.sock.sendto(ping, (ip, self.port))
                self.sent += 1
            except OSError:     # no route / neighbour yet: counts as unanswered
                pass

    def read(self):
        """Take every pending pong (non-blocking)."""
        while True:
            try:
                data, (ip, _) = self.sock.recvfrom(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT:     # an ICMP error queued on the socket: read on
                    continue
                return
            if len(data) != _FMT.size:
                continue
            magic, kind, rnd = _FMT.unpack(data)
            name = self._by_ip.get(ip)
            if magic != _MAGIC or kind != _PONG or name is None:
                continue
            last = self._answered[name]
            # the answer to a ping still unanswered (a later one than the last answered, not from
            # the future, not older than the send times kept), however late it comes
            if last < rnd <= self._round and rnd in self._sent_at:
                self._streak[name] = self._streak[name] + 1 if rnd == last + 1 else 1
                self._answered[name] = rnd
                self.received += 1
                if rnd < self._round:
                    self.late += 1


class Responder:
    """Answers heartbeats on (ip, port): each ping goes back as a pong, on its own thread.

    The thread serves from C with the GIL released (egresscore._core.HeartbeatAnswerer):
    another thread holding the GIL (a GC pass, a control job) cannot delay a pong."""

    def __init__(self, sock, name="egresscore-heartbeat", on_start=None):
        self.sock = sock
        self._answerer = HeartbeatAnswerer()
        self.on_start = on_start    # called first on the thread (the agent sets its scheduling)
        self.error = None           # the errno that ended serving, if the socket failed
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def answered(self):
        return self._answerer.answered

    @staticmethod
    def open_socket(ip, port=HEARTBEAT_PORT):
        """The responder's socket (call inside the node's network namespace)."""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        return s

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        if self.on_start is not None:
            self.on_start()
        self.sock.setblocking(False)
        rc = self._answerer.serve(self.sock.fileno(), self._stop_r)
        if rc:
            self.error = rc
            print(f"egresscore heartbeat: {self.sock.getsockname()}: {os.strerror(rc)}; no longer answering",
                  file=sys.stderr, flush=True)

    def stop(self):
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
            self._thread.join(5)
            for fd in (self._stop_r, self._stop_w):
                os.close(fd)
            self._stop_r = self._stop_w = -1
        self.sock.close()


class GatewayHealth:
    """The nodes that are down (probes and liveness), on its own thread.

    on_change(down) is called on this thread with the new frozenset each time
    it changes (the agent recompiles there, never on its datapath thread).
    set_targets() may be called from any thread."""

    def __init__(self, on_change, *, prober=None, liveness=(), interval=0.1, name="egresscore-health",
                 on_start=None):
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.on_change = on_change
        self.on_start = on_start    # called first on the thread (the agent sets its scheduling)
        self.prober = prober
        self.liveness = list(liveness)
        self.interval = interval
        if prober is not None and prober.timeout is None:
            # `misses` rounds counted in time, less the half round a send may come after its
            # round's start (at the close of the misses-th round the first one went out just
            # under misses rounds ago)
            prober.timeout = (prober.misses - 0.5) * interval
        self._targets = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._down = frozenset()
        self.changes = 0
        self.last_change = None      # (time.time(), frozenset)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def down(self) -> frozenset:
        return self._down

    def set_targets(self, targets):
        with self._lock:
            self._targets = dict(targets)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for p in self.liveness:
            p.close()
        if self.prober is not None:
            self.prober.sock.close()

    def evaluate(self):
        """The down set now, from the probes and every provider; on_change if it moved."""
        down = set(self.prober.down()) if self.prober is not None else set()
        for p in self.liveness:
            down |= p.down()
        down = frozenset(down)
        if down != self._down:
            self.on_change(down)      # raises: the change is tried again next round
            self._down = down
            self.changes += 1
            self.last_change = (time.time(), down)
        return down

    def _run(self):
        if self.on_start is not None:
            self.on_start()
        p = self.prober
        poller = select.poll()      # not select(): the agent's process may hold more than 1024 descriptors
        if p is not None:
            poller.register(p.sock, select.POLLIN)
        next_round = time.monotonic()
        while not self._stop.is_set():
            try:
                next_round = self._round(p, poller, next_round)
            except Exception as exc:  # noqa: BLE001 - health must keep running: say why, go on
                print(f"egresscore health: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                self._stop.wait(self.interval)
                next_round = time.monotonic()

    def _round(self, p, poller, next_round):
        """One probe round: send, read until the round ends, account, evaluate."""
        with self._lock:
            targets, self._targets = self._targets, None
        if targets is not None and p is not None:
            p.set_targets(targets)
        if p is not None:
            p.send()
        next_round += self.interval
        while True:
            left = next_round - time.monotonic()
            if left <= 0 or self._stop.is_set():
                break
            if p is None:
                self._stop.wait(left)
                continue
            if poller.poll(left * 1000):
                p.read()
        if p is not None:
            p.read()            # a round that ran late (this thread waited for a core or the GIL): the pongs wait here
            p.close_round()
        self.evaluate()
        if time.monotonic() - next_round > 10 * self.interval:   # fell far behind (suspended): resync
            next_round = time.monotonic()
        return next_round

    def state(self, candidates) -> list:
        """[{node, ip, state, why, missed}] for `candidates` ({name: ip}), sorted by
        name; missed: the rounds in a row without an answer, now."""
        probe = self.prober.down() if self.prober is not None else frozenset()
        live = frozenset().union(*(p.down() for p in self.liveness)) if self.liveness else frozenset()
        out = []
        for name in sorted(candidates):
            why = [w for w, s in (("probes", probe), ("liveness", live)) if name in s]
            missed = self.prober.missed(name) if self.prober is not None else 0
            out.append({"node": name, "ip": candidates[name], "state": "down" if name in self._down else "up",
                        "why": ", ".join(why), "missed": missed})
        return out

