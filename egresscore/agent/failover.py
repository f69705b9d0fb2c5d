"""Stateful gateway failover: floating egress IPs, their NAT state replicated to the standby.

A policy whose egressGateway names a fixed `egressIP` that no node records
as its own, and whose nodeSelector matches several nodes, has a floating
egress IP (the agent's stateful_failover=True, `--stateful-failover`).  Of
the matching nodes that are up (gateway health), in Cilium's order (by
name), the first is the active gateway and the second its standby:

- the active holds the address: it adds it to its underlay interface
  (pyroute2, on the host thread, inside the node's namespace), claims its
  NAT port range from the kernel, sends gratuitous ARP (a raw frame on an
  AF_PACKET socket, several times) so the router learns the new MAC at
  once, and tells its compiler it holds it (Compiler.set_held), so the
  egress IP resolves there as Cilium resolves it: from the node's
  interfaces.  It streams its connection creations and ends for that IP to
  the standby (egresscore.replication);
- the standby keeps the address in its NAT table (no traffic reaches it:
  the router's ARP entry points at the active) and applies the stream: the
  connections are in its table, inactive, with the same egress port;
- when the active is declared down, the standby is the first node up: it
  takes the address over as above and translates the replicated
  connections with the same egress IP and port.  The source nodes switch to
  it through gateway health; a node that is neither gives the address back;
- failback: a node that becomes the active for an address it was not the
  standby for (it comes back, and a node after it in the order may have
  held the address meanwhile) first pulls that node's connections of the
  address (PULL; the answer is a stream of its own: RESET, the connections,
  DONE), applies them, and only then takes the address, at most
  `pull_timeout` s later (then without them, saying so).  The other node
  gives the address up as soon as it sees the returning node up, and keeps
  translating the replies the router still sends it until the gratuitous
  ARP moves them.

Threads.  One replication thread (never the datapath's) drains the flow
records (or receives them from the flow logger's drain), encodes, sends,
receives and checks.  The table has one writer, the agent's loop thread:
the standby's applies and the active's export chunks are handed to it as
jobs between batches, each bounded (one datagram's records, one chunk).
Role changes run on the thread that changed the health or the cluster,
under the agent's control lock.

Not covered: a standby that was not synced when the active died has only
what it received; connections the other node opens between its answer to
the PULL and its seeing the returning node up are not pulled; a partition
that leaves both nodes believing they are active (split brain) leaves the
router's last ARP answer in charge, and when it heals the node that comes
first in the order keeps the address without the other's connections.
"""
from __future__ import annotations

import collections
import select
import socket
import struct
import sys
import threading
import time

from .._core import FlowLog, nat_repl_apply, nat_repl_clear, nat_repl_export
from ..replication import (
    PULL,
    REPLICATION_PORT,
    RESYNC,
    LagWindow,
    Receiver,
    Sender,
    egress_ips_of,
    enable_gro,
    from_flow_records,
    header,
    pull_request,
    recv_datagrams,
    resync_request,
)

__all__ = ["StatefulFailover", "floating_egress_ips", "gratuitous_arp"]

PULL_TIMEOUT = 1.0          # s a returning node waits for the connections it pulls before it takes the IP
PULL_EVERY = 0.2            # s between two PULL requests while no answer is complete

_ETH_P_ARP = 0x0806


def floating_egress_ips(compiler):
    """{egress IP: [matching node names, by name]} of the policies' fixed
    egressIPs that may float: several nodes match, none records the IP."""
    cl = compiler.cluster
    recorded = set()
    for n in cl.nodes.values():
        recorded |= n.all_ips()
        if n.internal_ip:
            recorded.add(n.internal_ip)
    out = {}
    for p in compiler.policies:
        for gw in p.gateways:
            ip = gw.egress_ip
            if not ip or ip in recorded:
                continue
            names = [name for name in sorted(cl.nodes)
                     if cl.nodes[name].gateway_ip and gw.node_selector.matches(cl.nodes[name].labels)]
            if len(names) >= 2:
                out.setdefault(ip, names)
    return out


def gratuitous_arp(mac, ip, op=1):
    """A broadcast gratuitous ARP frame (request: op 1, reply: op 2) announcing ip at mac."""
    m = bytes.fromhex(mac.replace(":", ""))
    a = socket.inet_aton(ip)
    tha = b"\xff" * 6 if op == 2 else bytes(6)
    return (b"\xff" * 6 + m + struct.pack("!H", _ETH_P_ARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + m + a + tha + a)


class StatefulFailover:
    """The agent's floating egress IPs: roles, takeover, the replication thread.

    StatefulFailover(agent, port=REPLICATION_PORT, interval=0.01, chunk=4096,
    max_pending=65536).  update() (control lock held) recomputes the roles;
    stats() says what it holds and what it counted."""

    def __init__(self, agent, *, port=REPLICATION_PORT, interval=0.01, chunk=4096, max_pending=65536,
                 refresh_every=60.0, garp_times=(0.0, 0.1, 0.3, 0.7, 1.5), pull_timeout=PULL_TIMEOUT):
        self.agent = agent
        self.pull_timeout = pull_timeout
        self.refresh_every = refresh_every
        self.port = port
        self.interval = interval
        self.chunk = chunk
        self.garp_times = garp_times
        self.owned = set()              # floating IPs this node holds
        self.standby_for = {}           # floating IP -> the active's node IP (this node is its standby)
        self._targets = {}              # standby node IP -> floating IPs this node replicates to it
        self._senders = {}              # standby node IP -> Sender
        self._resync = {}               # standby node IP -> [next export index, reset first] (a walk under way)
        self._refreshed = {}            # standby node IP -> time.monotonic() of the last walk's start
        self._gateways = frozenset()
        self._down_seen = frozenset()
        self._key = None                # what the roles were computed from
        self._lock = threading.Lock()   # roles: written under the control lock, read by the thread
        self._events = collections.deque()
        self._queued = 0
        self._qlock = threading.Lock()
        self._holding = set()           # host thread: the addresses added
        self._pulling = {}              # floating IP -> [node IP pulled from, deadline, done, next request]
        self._pulled = set()            # floating IPs pulled (or given up on): taken at the next update
        self._pulls = {}                # node IP -> [Sender, floating IPs, next export index] (answers to PULL)
        self._max_queue = max_pending
        self._ring_lost = 0
        self.lag = LagWindow()
        self.applied = collections.Counter()
        self.counters = collections.Counter()
        self.takeovers = []             # (time.monotonic(), IP, ms to hold it)
        self._stop = threading.Event()
        self.sock = agent._host.call(self._open_socket)
        self.receiver = Receiver(self._apply, self._reset, self._request, max_pending=max_pending,
                                 finished=self._pull_finished)
        self._epoch = Sender(self.sock).epoch   # one epoch for every stream of this agent
        if agent.flow_logger is not None:       # the flow logger drains the ring: take its batches
            self.flow_log = None
            agent.flow_logger.taps.append(self._tap)
        else:
            self.flow_log = FlowLog(65536, drop_rate=0)
            agent.datapath.set_flow_log(self.flow_log)
        self._thread = threading.Thread(target=self._run, name=f"egresscore-replication-{agent.node}", daemon=True)

    def _open_socket(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        enable_gro(s)       # an active's GSO send arrives as one buffer (recv_datagrams splits it)
        s.bind((self.agent.node_ip, self.port))
        s.setblocking(False)
        return s

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.flow_log is not None and self.agent.datapath is not None:
            self.agent.datapath.set_flow_log(self.agent.flow_log)
        if self.agent.flow_logger is not None and self._tap in self.agent.flow_logger.taps:
            self.agent.flow_logger.taps.remove(self._tap)
        if not self.agent._keep_state:
            for ip in sorted(self.owned):
                self.agent._host.call(self._host_release, ip)
        self.sock.close()

    # -- roles (control lock held) ----------------------------------------------------
    def update(self):
        """Recompute who holds each floating IP and who stands by; act on the changes."""
        a = self.agent
        comp = a.compiler
        down = comp.down
        nodes = comp.cluster.nodes
        # pod changes publish too: the roles depend only on the policies, the nodes and who is down
        key = (down, tuple(comp.policies), tuple(nodes.items()))
        if key == self._key:
            return
        floating = floating_egress_ips(comp)
        owned, standby_for, targets, pull = set(), {}, {}, {}
        for ip, names in floating.items():
            up = [n for n in names if n not in down]
            if not up:
                continue
            active, standby = up[0], (up[1] if len(up) > 1 else None)
            if active == a.node:
                if (ip not in self.owned and ip not in self.standby_for and ip not in self._pulled
                        and standby is not None):
                    # this node comes back: the standby may have held the address meanwhile
                    pull[ip] = nodes[standby].gateway_ip
                    continue
                owned.add(ip)
                if standby is not None:
                    targets.setdefault(nodes[standby].gateway_ip, set()).add(ip)
            elif standby == a.node:
                standby_for[ip] = nodes[active].gateway_ip
        self._pulled &= owned
        gateways = frozenset(ip for ip in comp.gateway_candidates().values())
        if down != self._down_seen:
            # a node came back (or went): it may have held our address meanwhile, and the
            # router may still point at it, so say again where the address is
            self._down_seen = down
            for ip in sorted(owned & self.owned):
                a._host.post(self._host_announce, ip)
        new_owned = owned - self.owned
        gone = self.owned - owned
        for ip in sorted(new_owned):
            self._take(ip)
        for ip in sorted(gone):
            a._host.call(self._host_release, ip)
        if new_owned or gone:
            comp.set_held({ip: a.underlay for ip in owned})
        for ip in sorted(set(standby_for) - set(self.standby_for) - owned):
            self._ensure_nat(ip)
        for ip in sorted(set(pull) - set(self._pulling)):
            self._ensure_nat(ip)
        for ip in sorted((set(self.standby_for) | self.owned | set(self._pulling)) - set(standby_for) - owned
                         - set(pull)):
            a._submit(nat_repl_clear, a.nat, ip)      # neither role now: its replicated connections go
        with self._lock:
            now = time.monotonic()
            for ip in set(self._pulling) - set(pull):
                del self._pulling[ip]
            for ip, src in pull.items():
                if self._pulling.get(ip, (None,))[0] != src:
                    self._pulling[ip] = [src, now + self.pull_timeout, False, now]
                    print(f"egresscore agent {a.node}: pulling the connections of floating egress IP {ip} "
                          f"from {src} before holding it", file=sys.stderr, flush=True)
            old_targets = self._targets
            self.owned, self.standby_for, self._targets, self._gateways = owned, standby_for, targets, gateways
            for dst, ips in targets.items():
                if dst not in self._senders:
                    s = self._senders[dst] = Sender(self.sock, epoch=self._epoch)
                    s.target = (dst, self.port)
                if old_targets.get(dst) != ips:
                    self._resync[dst] = [0, True]       # a new standby (or new IPs): a full resync
            for dst in list(self._senders):
                if dst not in targets:
                    del self._senders[dst]
                    self._resync.pop(dst, None)
        for active in set(standby_for.values()):
            if not self.receiver.synced(active):
                self.receiver.ask(active, 0)
        self._send_pulls()
        self._key = key

    # -- failback: pull before taking ---------------------------------------------------
    def _send_pulls(self):
        """PULL to each node pulled from whose answer is due (at most every PULL_EVERY s)."""
        now = time.monotonic()
        with self._lock:
            due = {}
            for ip, p in self._pulling.items():
                if not p[2] and now >= p[3]:
                    due.setdefault(p[0], []).append(ip)
                    p[3] = now + PULL_EVERY
        for src, ips in due.items():
            try:
                self.sock.sendto(pull_request(ips), (src, self.port))
                self.counters["pulls_sent"] += 1
            except OSError:
                self.counters["send_errors"] += 1

    def _pull_finished(self, src, ips):
        """Receiver: `src`'s export is complete; once its records are applied
        (a job queued after them on the loop thread), the pulls from it are done."""
        def job():
            with self._lock:
                for p in self._pulling.values():
                    if p[0] == src:
                        p[2] = True

        self.agent._queue.put(job)
        self.agent._wake()

    def _check_pulls(self):
        """Replication thread: take the addresses whose pull is done or overdue."""
        now = time.monotonic()
        with self._lock:
            ready = [ip for ip, p in self._pulling.items() if p[2] or now >= p[1]]
        if not ready:
            self._send_pulls()
            return
        a = self.agent
        with a._control:
            with self._lock:
                for ip in ready:
                    p = self._pulling.pop(ip, None)
                    if p is None:
                        continue
                    self._pulled.add(ip)
                    if p[2]:
                        self.counters["pulls_completed"] += 1
                    else:
                        self.counters["pull_timeouts"] += 1
                        print(f"egresscore agent {a.node}: no complete answer from {p[0]} within "
                              f"{self.pull_timeout} s: holding {ip} without its connections there",
                              file=sys.stderr, flush=True)
            self._key = None
            self.update()

    def _answer_pull(self, data, h, src):
        """A node about to take floating IPs back asks for our connections of them."""
        ips = egress_ips_of(data, h[2])
        with self._lock:
            if ips is None or src not in self._gateways:
                self.counters["pulls_refused"] += 1
                return
            have = sorted(set(ips) & (self.owned | set(self.standby_for)))
            cur = self._pulls.get(src)
            if cur is not None and cur[1] == have:
                return                                 # a repeat while its answer is under way
            s = Sender(self.sock)                      # a stream (epoch) of its own
            s.target = (src, self.port)
            self._pulls[src] = [s, have, 0]
            self.counters["pulls_received"] += 1

    def _round_pulls(self):
        with self._lock:
            pulls = {d: list(v) for d, v in self._pulls.items()}
        for dst, (s, ips, start) in pulls.items():
            if start == 0:
                s.reset(ips)
            recs, nxt = ([], None) if not ips else self.agent._submit(nat_repl_export, self.agent.nat, ips,
                                                                        start, self.chunk)
            if len(recs):
                s.send(recs, 0)
            with self._lock:
                cur = self._pulls.get(dst)
                if cur is None or cur[0] is not s:
                    continue                           # asked again meanwhile: that answer goes on
                if nxt is None:
                    s.done(ips)
                    del self._pulls[dst]
                    self.counters["pulls_answered"] += 1
                else:
                    cur[2] = nxt

    def _ensure_nat(self, ip):
        a = self.agent
        if ip not in a.nat.egress_ips:
            a._submit(a.nat.add_egress_ip, ip)

    def _take(self, ip):
        """Hold `ip`: NAT table, claims, the address, gratuitous ARP (control lock held)."""
        t0 = time.monotonic()
        self._ensure_nat(ip)
        self.agent._host.call(self._host_take, ip)
        ms = (time.monotonic() - t0) * 1000
        self.takeovers.append((t0, ip, ms))
        print(f"egresscore agent {self.agent.node}: holding floating egress IP {ip} "
              f"({ms:.1f} ms)", file=sys.stderr, flush=True)

    # -- host thread --------------------------------------------------------------------
    def _host_take(self, ip):
        a = self.agent
        claims = a._claims
        claims.set_local_ips(set(claims._local_ips) | {ip})
        a._host_sync_claims()                         # claimed before the kernel owns it: no RST
        ipr = a._host.ipr
        try:
            ipr.addr("add", index=a._underlay_index, address=ip, prefixlen=32)
        except Exception as exc:  # noqa: BLE001 - already there (a restart): keep it
            if "exists" not in str(exc).lower() and getattr(exc, "code", None) != 17:
                raise
        self._holding.add(ip)
        self._host_announce(ip)

    def _host_announce(self, ip):
        """Gratuitous ARP now and after each of garp_times (keepalived sends a burst too)."""
        self._garp(ip)
        for delay in self.garp_times[1:]:
            t = threading.Timer(delay, self.agent._host.post, (self._garp, ip))
            t.daemon = True
            t.start()

    def _garp(self, ip):
        a = self.agent
        if ip not in self._holding:
            return
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.htons(_ETH_P_ARP))
        try:
            s.bind((a.underlay, 0))
            for op in (1, 2):
                s.send(gratuitous_arp(a.node_mac, ip, op))
            self.counters["garp_sent"] += 2
        finally:
            s.close()

    def _host_release(self, ip):
        a = self.agent
        self._holding.discard(ip)
        try:
            a._host.ipr.addr("del", index=a._underlay_index, address=ip, prefixlen=32)
        except Exception:  # noqa: BLE001 - not there
            pass
        claims = a._claims
        claims.set_local_ips(set(claims._local_ips) - {ip})
        a._host_sync_claims()

    # -- the standby's receiving side (replication thread) -------------------------------
    def _apply(self, records, t0):
        a = self.agent

        def job():
            try:
                c = nat_repl_apply(a.nat, records)
                self.applied.update(c)
                if t0:
                    self.lag.add(time.monotonic() - t0 / 1e9)
            finally:
                self.receiver.done(len(records))

        a._queue.put(job)
        a._wake()

    def _reset(self, ips):
        a = self.agent

        def job():
            for ip in ips:
                self.applied["cleared"] += nat_repl_clear(a.nat, ip)

        a._queue.put(job)
        a._wake()

    def _request(self, src, epoch):
        try:
            self.sock.sendto(resync_request(epoch), (src, self.port))
            self.counters["resync_requests_sent"] += 1
        except OSError:
            self.counters["send_errors"] += 1

    # -- flow records (replication thread, or the flow logger's drain thread) -------------
    def _tap(self, batch):
        with self._qlock:
            full = self._queued + len(batch) > self._max_queue
            if not full:
                self._events.append(batch)
                self._queued += len(batch)
        if full:
            self.counters["events_overflow"] += len(batch)
            with self._lock:
                for dst in self._senders:
                    self._resync[dst] = [0, True]     # events lost: the standby needs the table again

    def _check_lost(self):
        lost = self.flow_log.stats["lost"]
        if lost != self._ring_lost:          # records the ring could not take: the standby misses them
            self._ring_lost = lost
            self.counters["ring_lost"] = lost
            with self._lock:
                for dst in self._senders:
                    self._resync[dst] = [0, True]

    def _drain(self):
        if self.flow_log is not None:
            while True:
                b = self.flow_log.drain(8192)
                if len(b):
                    self._tap(b)
                if len(b) < 8192:
                    break
            self._check_lost()
        with self._qlock:
            batches = list(self._events)
            self._events.clear()
            self._queued = 0
        return batches

    def _round(self):
        with self._lock:
            senders = dict(self._senders)
            targets = {d: set(ips) for d, ips in self._targets.items()}
            now = time.monotonic()
            for dst in self._senders:
                # the standby's copies expire on its own clock: the live ones are sent again
                # (no reset) every refresh_every s, so an old flow outlives its idle timeout there
                if dst not in self._resync and now - self._refreshed.get(dst, now) >= self.refresh_every:
                    self._resync[dst] = [0, False]
                self._refreshed.setdefault(dst, now)
            resync = {d: list(v) for d, v in self._resync.items()}
            actives = set(self.standby_for.values())
        for active in actives:
            if not self.receiver.synced(active):
                self.receiver.ask(active, 0)          # joined, or fell behind: until a reset comes
        if self.flow_log is not None and len(senders) == 1 and not self._events:
            # the usual case: our own ring, one standby: drained and encoded in C
            (dst, s), = senders.items()
            s.send_log(self.flow_log, targets.get(dst, ()))
            self._check_lost()
        else:
            for b in self._drain():
                for dst, s in senders.items():
                    recs, t0 = from_flow_records(b, targets.get(dst, ()))
                    if len(recs):
                        s.send(recs, t0)
        for dst, (start, reset) in resync.items():
            s = senders.get(dst)
            if s is None:
                continue
            if start == 0:
                self._refreshed[dst] = time.monotonic()
                if reset:
                    s.reset(targets.get(dst, ()))
                    with self._lock:
                        if self._resync.get(dst) == [0, True]:
                            self._resync[dst][1] = False
            recs, nxt = self.agent._submit(nat_repl_export, self.agent.nat, sorted(targets.get(dst, ())),
                                           start, self.chunk)
            if len(recs):
                s.send(recs, 0)
            with self._lock:
                cur = self._resync.get(dst)
                if cur is not None and cur[0] == start and not cur[1]:   # not restarted meanwhile
                    if nxt is None:
                        del self._resync[dst]
                        self.counters["resyncs_done" if reset else "refreshes_done"] += 1
                    else:
                        cur[0] = nxt

    def _receive(self):
        with self._lock:
            gateways, mine = self._gateways, set(self.standby_for)
            pulling = {}
            for ip, p in self._pulling.items():
                pulling.setdefault(p[0], set()).add(ip)
        for _ in range(4096):
            try:
                grams, (src, _) = recv_datagrams(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            for data in grams:
                h = header(data)
                if h is not None and h[0] == PULL:
                    self._answer_pull(data, h, src)
                    continue
                if h is not None and h[0] == RESYNC:
                    with self._lock:
                        if src in self._senders:
                            self._resync[src] = [0, True]
                            self.counters["resync_requests_received"] += 1
                        else:
                            self.counters["resync_requests_refused"] += 1
                    continue
                self.receiver.datagram(data, src, gateways, mine | pulling[src] if src in pulling else mine)

    def _run(self):
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        next_round = time.monotonic()
        while not self._stop.is_set():
            left = next_round - time.monotonic()
            if left > 0 and poller.poll(left * 1000):
                self._receive()
                continue
            next_round = time.monotonic() + self.interval
            try:
                self._receive()
                self._round()
                self._round_pulls()
                if self._pulling:
                    self._check_pulls()
            except Exception as exc:  # noqa: BLE001 - replication must keep running: say why, go on
                self.counters["errors"] += 1
                print(f"egresscore replication {self.agent.node}: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)

    def stats(self):
        """What this node holds and stands by for, and every counter."""
        with self._lock:
            senders = {d: dict(s.counters, seq=s.seq, egress_ips=sorted(self._targets.get(d, ())))
                       for d, s in self._senders.items()}
            resync = {d: v[0] for d, v in self._resync.items()}
            pulling = {ip: p[0] for ip, p in self._pulling.items()}
        return {"owned": sorted(self.owned), "standby_for": dict(self.standby_for), "pulling": pulling,
                "senders": senders,
                "resyncs_under_way": resync, "received": dict(self.receiver.counters),
                "dropped": dict(self.receiver.dropped), "pending": self.receiver.pending,
                "applied": dict(self.applied), "lag": self.lag.summary(), "counters": dict(self.counters),
                "takeovers": [{"ip": ip, "ms": round(ms, 1)} for _, ip, ms in self.takeovers]}
