"""Flow logs: drain the datapath's record ring, enrich the records, write them.

The datapath (and the NAT table) append fixed-size records to a
`FlowLog` ring in C.  A `FlowLogger` moves them out in batches on a drain
thread into a bounded queue, and a writer thread turns them into JSON-able
dicts (with the node, the pod and the policy) and hands them to sinks: JSON
lines on stdout (the default) or in a file rotated by size, or a Python
callback.  Nothing here ever makes the datapath wait: a full ring loses
records in C (counted), a full queue loses whole batches here (counted, and
logged at most every `warn_every` seconds).
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import logging.handlers
import socket
import sys
import threading
import time

from ._core import DROP_REASON_NAMES, FLOW_END_REASON_NAMES, FLOW_KIND_NAMES, FlowLog

__all__ = ["FlowLog", "FlowLogger", "Enricher", "JsonLinesSink", "CallbackSink", "records_to_dicts"]

log = logging.getLogger("egresscore.flowlog")

_PROTO = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_NO_POLICY = 0xFFFF


_IP_CACHE = {}


def _ip(family, raw16):
    """Text form of a 16-byte address field (cached: flows repeat addresses)."""
    key = (family, raw16)
    text = _IP_CACHE.get(key)
    if text is None:
        if len(_IP_CACHE) > 100_000:
            _IP_CACHE.clear()
        text = socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6,
                                raw16[:4] if family == 4 else raw16)
        _IP_CACHE[key] = text
    return text


def _wall_offset():
    """Seconds to add to CLOCK_MONOTONIC to get the Unix time."""
    return time.time() - time.monotonic()


_ISO_SEC = {}


def _iso(t):
    sec = int(t)
    prefix = _ISO_SEC.get(sec)
    if prefix is None:
        if len(_ISO_SEC) > 4096:
            _ISO_SEC.clear()
        prefix = _ISO_SEC[sec] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
    return f"{prefix}{int((t - sec) * 1e6):06d}Z"


_KIND = {k: name for k, name in enumerate(FLOW_KIND_NAMES)}
_END = {k: name for k, name in enumerate(FLOW_END_REASON_NAMES)}
_DROP = {k: name for k, name in enumerate(DROP_REASON_NAMES)}
_ZERO16 = bytes(16)


def records_to_dicts(records, *, node=None, enrich=None, offset=None):
    """FLOW_RECORD_DTYPE records -> list of JSON-able dicts.

    `enrich(d)` (e.g. an Enricher) may add fields in place; `offset` converts
    the records' monotonic times to Unix time (now's offset by default)."""
    off = _wall_offset() if offset is None else offset
    n = len(records)
    if n == 0:
        return []
    times = (records["time"] / 1e9 + off).tolist()
    kinds = records["kind"].tolist()
    fams = records["family"].tolist()
    reasons = records["reason"].tolist()
    protos = records["proto"].tolist()
    sports = records["sport"].tolist()
    dports = records["dport"].tolist()
    xports = records["xport"].tolist()
    policies = records["policy"].tolist()
    src = records["src"].tobytes()
    dst = records["dst"].tobytes()
    xsrc = records["xsrc"].tobytes()
    gws = records["gateway"].tobytes()
    out = []
    append = out.append
    for i in range(n):
        kind = kinds[i]
        fam = fams[i]
        d = {"time": _iso(times[i]), "kind": _KIND.get(kind, str(kind))}
        if node is not None:
            d["node"] = node
        if kind == 3:
            d["reason"] = _DROP.get(reasons[i], str(reasons[i]))
        elif kind == 2:
            d["reason"] = _END.get(reasons[i], str(reasons[i]))
        d["proto"] = _PROTO.get(protos[i]) or str(protos[i])
        if fam == 4 or fam == 6:
            o = 16 * i
            d["family"] = fam
            d["src"] = _ip(fam, src[o:o + 16])
            d["sport"] = sports[i]
            d["dst"] = _ip(fam, dst[o:o + 16])
            d["dport"] = dports[i]
            if kind != 3:
                d["egress_ip"] = _ip(fam, xsrc[o:o + 16])
                d["egress_port"] = xports[i]
            gw = gws[o:o + 16]
            if gw != _ZERO16:
                d["gateway"] = _ip(fam, gw)
        if policies[i] != _NO_POLICY:
            d["policy_id"] = policies[i]
        if kind == 2 or kind == 4:
            r = records[i]
            d["duration"] = round(int(r["duration"]) / 1e9, 3)
            d["packets_out"] = int(r["pkts_out"])
            d["bytes_out"] = int(r["bytes_out"])
            d["packets_in"] = int(r["pkts_in"])
            d["bytes_in"] = int(r["bytes_in"])
        elif kind == 3:
            flags = int(records[i]["tcp_flags"])
            if flags:
                d["tcp_flags"] = flags
        if enrich is not None:
            enrich(d)
        append(d)
    return out


class Enricher:
    """Adds the pod (namespace, name, labels) and the policy name to records.

    Enricher(cluster=None, compiler=None, policy_names=None)

    `cluster` (egresscore.Cluster) finds the pod by its IP; `compiler` (an
    egresscore.Compiler) finds the policy whose destination CIDRs the flow
    matched and its gateway; `policy_names` maps the datapath's policy ids to
    names.  Call refresh() after the cluster or the policies changed."""

    def __init__(self, cluster=None, compiler=None, policy_names=None):
        self.cluster = cluster if cluster is not None else getattr(compiler, "cluster", None)
        self.compiler = compiler
        self.policy_names = dict(policy_names or {})
        self.refresh()

    def refresh(self):
        self._pods = {}
        if self.cluster is not None:
            for pod in self.cluster.pods.values():
                info = {"namespace": pod.namespace, "name": pod.name, "labels": dict(pod.labels)}
                for ip in pod.ips:
                    self._pods[ip] = info
        self._rules = collections.defaultdict(list)    # pod IP -> [(net, excluded nets, policy, cidr)]
        if self.compiler is not None:
            for pol in self.compiler.policies:
                nets = [ipaddress.ip_network(c) for c in pol.destination_cidrs]
                excl = [ipaddress.ip_network(c) for c in pol.excluded_cidrs]
                for pod in self.compiler.matched_pods(pol.name):
                    for ip in pod.ips:
                        for net, cidr in zip(nets, pol.destination_cidrs):
                            self._rules[ip].append((net, excl, pol.name, cidr))
        self._cache = {}

    def pod(self, ip):
        """{"namespace", "name", "labels"} of the pod with this IP, or None."""
        return self._pods.get(ip)

    def policy(self, src, dst):
        """(policy name, gateway IP or None) of a flow from pod `src` to `dst`, or None."""
        key = (src, dst)
        if key in self._cache:
            return self._cache[key]
        found = None
        rules = self._rules.get(src)
        if rules:
            d = ipaddress.ip_address(dst)
            best = -1
            for net, excl, name, cidr in rules:
                if d.version == net.version and d in net and net.prefixlen > best \
                        and not any(d.version == x.version and d in x for x in excl):
                    best = net.prefixlen
                    gw = None
                    t = self.compiler.desired.get((src, cidr)) if hasattr(self.compiler, "desired") else None
                    if t is not None:
                        gw = t.gateway_ip
                    found = (name, gw)
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[key] = found
        return found

    def __call__(self, d):
        src = d.get("src")
        if src is None:
            return d
        pod = self._pods.get(src)
        if pod is not None:
            d["pod"] = pod
        pid = d.get("policy_id")
        if pid is not None and pid in self.policy_names:
            d["policy"] = self.policy_names[pid]
        elif "dst" in d:
            p = self.policy(src, d["dst"])
            if p is not None:
                d["policy"] = p[0]
                if p[1] and "gateway" not in d:
                    d["gateway"] = p[1]
        return d


class JsonLinesSink:
    """One JSON object per line, to stdout (the default, or path "-"), a
    stream, or a file rotated by size (`max_bytes`, keeping `backup_count`
    old files as path.1, path.2, ...; logging's RotatingFileHandler)."""

    def __init__(self, path=None, *, max_bytes=100 * 1024 * 1024, backup_count=5):
        self.path = path
        self._handler = None
        self._stream = None
        if path is None or path == "-":
            self._stream = sys.stdout
        elif hasattr(path, "write"):
            self._stream = path
        else:
            if not isinstance(max_bytes, int) or max_bytes < 0:
                raise ValueError(f"max_bytes must be a non-negative int, not {max_bytes!r}")
            self._handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
            self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, records):
        if self._handler is not None:
            for d in records:
                self._handler.handle(logging.makeLogRecord(
                    {"msg": json.dumps(d, separators=(",", ":")), "levelno": logging.INFO}))
            self._handler.flush()
        else:
            self._stream.write("".join(json.dumps(d, separators=(",", ":")) + "\n" for d in records))
            self._stream.flush()

    def close(self):
        if self._handler is not None:
            self._handler.close()


class CallbackSink:
    """Calls `fn(record_dict)` for each record (for programs embedding egresscore)."""

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError("CallbackSink needs a callable")
        self.fn = fn

    def write(self, records):
        for d in records:
            self.fn(d)

    def close(self):
        pass


class FlowLogger:
    """Moves records from a FlowLog ring to sinks without ever blocking the datapath.

    FlowLogger(flow_log, sinks=None, *, node=None, enrich=None,
               queue_records=65536, interval=0.05, warn_every=10.0)

    start() runs a drain thread (ring -> bounded queue, every `interval`
    seconds) and a writer thread (queue -> enrich -> sinks); stop() drains
    what is left and joins them.  Without threads, poll() does one round in
    the caller's thread.  When the writer falls behind by more than
    `queue_records`, new batches are dropped and counted ("dropped")."""

    def __init__(self, flow_log, sinks=None, *, node=None, enrich=None, queue_records=65536,
                 interval=0.05, warn_every=10.0):
        if not isinstance(flow_log, FlowLog):
            raise TypeError(f"flow_log must be an egresscore.FlowLog, not {type(flow_log).__name__}")
        if sinks is None:
            sinks = [JsonLinesSink()]
        elif not isinstance(sinks, (list, tuple)):
            sinks = [sinks]
        for s in sinks:
            if not hasattr(s, "write"):
                raise TypeError(f"sink {s!r} has no write(records) method")
        if not isinstance(queue_records, int) or queue_records < 1:
            raise ValueError(f"queue_records must be a positive int, not {queue_records!r}")
        self.flow_log = flow_log
        self.sinks = list(sinks)
        self.node = node
        self.enrich = enrich
        self.queue_records = queue_records
        self.interval = float(interval)
        self.warn_every = float(warn_every)
        self._queue = collections.deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = []
        self._last_warn = 0.0
        self.counters = {"drained": 0, "written": 0, "dropped": 0, "sink_errors": 0}
        # fn(batch) for each raw batch, on the drain thread, before the queue (state
        # replication reads connection starts and ends here); must not block
        self.taps = []
        self._by_policy = {}
        self._policy_lock = threading.Lock()

    # ---------------------------------------------------------------- stages

    def _drain_once(self):
        """Ring -> queue; returns the number of records taken."""
        taken = 0
        while True:
            batch = self.flow_log.drain(4096)
            n = len(batch)
            if not n:
                return taken
            taken += n
            self.counters["drained"] += n
            for tap in self.taps:
                tap(batch)
            with self._cond:
                if self._queued + n > self.queue_records:
                    self.counters["dropped"] += n
                    self._warn_drop()
                    continue
                self._queue.append((batch, _wall_offset()))
                self._queued += n
                self._cond.notify()
            if n < 4096:
                return taken

    def _warn_drop(self):
        now = time.monotonic()
        if now - self._last_warn >= self.warn_every:
            self._last_warn = now
            log.warning("flow log sink is too slow: %d records dropped so far",
                        self.counters["dropped"])

    def _write_pending(self, block=False):
        """Queue -> sinks; returns the number of records written."""
        written = 0
        while True:
            with self._cond:
                if not self._queue:
                    if not block or self._stop.is_set():
                        return written
                    self._cond.wait(self.interval)
                    if not self._queue:
                        return written
                batch, offset = self._queue.popleft()
                self._queued -= len(batch)
            recs = records_to_dicts(batch, node=self.node, enrich=self.enrich, offset=offset)
            self._account(recs)
            for sink in self.sinks:
                try:
                    sink.write(recs)
                except Exception:   # a broken sink must not kill the logger
                    self.counters["sink_errors"] += 1
                    log.exception("flow log sink %r failed", sink)
            written += len(recs)
            self.counters["written"] += len(recs)

    def _account(self, recs):
        with self._policy_lock:
            for d in recs:
                name = d.get("policy")
                if name is None:
                    continue
                c = self._by_policy.get(name)
                if c is None:
                    c = self._by_policy[name] = {"connections": 0, "packets_out": 0, "bytes_out": 0,
                                                 "packets_in": 0, "bytes_in": 0, "drops": 0}
                kind = d["kind"]
                if kind == "start":
                    c["connections"] += 1
                elif kind == "drop":
                    c["drops"] += 1
                else:
                    for k in ("packets_out", "bytes_out", "packets_in", "bytes_in"):
                        c[k] += d.get(k, 0)

    def policy_stats(self):
        """Traffic by policy name, from the records written so far: connections
        started, packets and bytes each way of those that ended (or reported
        an update), drop records.  The metrics' per-policy figures."""
        with self._policy_lock:
            out = {}
            for name, c in self._by_policy.items():
                d = dict(c)
                d["packets"] = c["packets_out"] + c["packets_in"]
                d["bytes"] = c["bytes_out"] + c["bytes_in"]
                out[name] = d
            return out

    def poll(self):
        """One synchronous round: drain the ring and write everything."""
        self._drain_once()
        return self._write_pending()

    # --------------------------------------------------------------- threads

    def start(self):
        if self._threads:
            return self
        self._stop.clear()

        def drainer():
            while not self._stop.wait(self.interval):
                self._drain_once()

        def writer():
            while not self._stop.is_set():
                self._write_pending(block=True)

        for fn, name in ((drainer, "egresscore-flowlog-drain"), (writer, "egresscore-flowlog-write")):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, flush=True):
        """Stop the threads; with `flush`, write what is still buffered."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []
        if flush:
            self.poll()
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()

    @property
    def stats(self):
        """Our counters plus the ring's (lost in C, suppressed drop records)."""
        s = dict(self.counters)
        s["queued"] = self._queued
        s["ring"] = self.flow_log.stats
        return s

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
