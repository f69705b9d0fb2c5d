"""The agent's side of a cluster-state source: snapshots and changes applied to its compiler.

Pure control-plane work, run on the thread that delivers the change (a
source's thread, or the caller of reload/set_policies), under the agent's
control lock: never on the datapath thread.  The agent hands the datapath
only the results (node table rows, local pod ports).

- `Feed.reconcile`: make the compiler hold exactly a snapshot (what it lacks is
  removed); a large difference is one full compile (one publish per family),
  a small one is the incremental calls (upsert_pod, remove_pod, ...).
- `Feed.apply`: one Change, incrementally.  Pod deletes come keyed by UID
  (Change.key): a pod recreated under the same name keeps its entries when
  the old one's delete arrives late.
- `OwnNodeError`: a change that would drop this agent's node or change its
  IP (the datapath is built on it) is refused alone.
- `FeedStats`: the source counters in stats()["source"].
"""
from __future__ import annotations

import threading
import time

from ..cluster import Cluster, ClusterError
from ..errors import EgressError

__all__ = ["Feed", "FeedStats", "OwnNodeError", "SourceRunner", "SourceStartError", "check_own_node"]

FULL_COMPILE_FRACTION = 0.25  # a resync changing more than this share of objects recompiles in full


class OwnNodeError(ClusterError):
    """A change to this agent's own node that the running datapath cannot follow."""


def check_own_node(me, ip, node):
    """OwnNodeError if `node` (None: gone) cannot stand for this agent's node `me` with IP `ip`."""
    if node is None:
        raise OwnNodeError(f"this agent's node {me!r} is not in it", field="nodes")
    if node.gateway_ip != ip:
        raise OwnNodeError(f"this agent's node {me!r} changed its internal IP from {ip} to {node.gateway_ip} "
                           "(restart the agent to change it)", field="nodes")


class Feed:
    """A compiler fed by snapshots and changes (pods keyed by UID, as the compiler keys them)."""

    def __init__(self, compiler):
        self.compiler = compiler

    def reconcile(self, fresh: Cluster, policies, *, before_nodes=None) -> int:
        """Bring the compiler to exactly `fresh` and `policies` (None: keep
        the policies); returns the number of objects that changed.
        `before_nodes(nodes)` is called with the new node set before any map
        entry may point at a new node (make before break)."""
        compiler = self.compiler
        cluster = compiler.cluster
        changed_nodes = [n for n in fresh.nodes.values() if cluster.nodes.get(n.name) != n]
        gone_nodes = [name for name in cluster.nodes if name not in fresh.nodes]
        changed_ns = [ns for ns in fresh.namespaces.values() if cluster.namespaces.get(ns.name) != ns]
        gone_ns = [name for name in cluster.namespaces if name not in fresh.namespaces]
        changed_pods = [p for p in fresh.pods.values() if cluster.pods.get(p.uid) != p]
        gone_pods = [p for key, p in cluster.pods.items() if key not in fresh.pods]
        changed_pol, gone_pol = [], []
        if policies is not None:
            new = {p.name: p for p in policies}
            old = {p.name: p for p in compiler.policies}
            changed_pol = [p for name, p in new.items() if old.get(name) != p]
            gone_pol = [name for name in old if name not in new]
        n = (len(changed_nodes) + len(gone_nodes) + len(changed_ns) + len(gone_ns) + len(changed_pods)
             + len(gone_pods) + len(changed_pol) + len(gone_pol))
        if not n:
            return 0
        if before_nodes is not None and changed_nodes:
            before_nodes({**cluster.nodes, **{x.name: x for x in changed_nodes}})
        total = len(cluster.pods) + len(cluster.nodes) + len(compiler.policies) + 1
        if n > FULL_COMPILE_FRACTION * total:
            compiler.reset(fresh, policies if policies is not None else compiler.policies)
            return n
        for p in gone_pods:
            compiler.remove_pod(uid=p.uid)
        for name in gone_pol:
            compiler.remove_policy(name)
        for name in gone_ns:
            compiler.remove_namespace(name)
        for name in gone_nodes:
            compiler.remove_node(name)
        for x in changed_nodes:
            compiler.upsert_node(x)
        for x in changed_ns:
            compiler.upsert_namespace(x)
        for p in changed_pol:
            compiler.upsert_policy(p)
        for p in changed_pods:
            compiler.upsert_pod(p)
        return n

    def apply(self, change, *, before_nodes=None) -> bool:
        """One Change applied incrementally; False when it changed nothing (an
        unknown object deleted, a late delete of a replaced pod)."""
        compiler = self.compiler
        cluster = compiler.cluster
        kind, key = change.kind, change.key
        if kind not in ("pod", "node", "namespace", "policy"):
            raise ValueError(f"unknown kind {kind!r}")
        if change.op == "upsert":
            if kind == "node" and before_nodes is not None:
                before_nodes({**cluster.nodes, change.obj.name: change.obj})
            getattr(compiler, f"upsert_{kind}")(change.obj)
            return True
        present = {"pod": cluster.pods, "node": cluster.nodes, "namespace": cluster.namespaces,
                   "policy": {p.name for p in compiler.policies}}[kind]
        if key not in present:  # unknown, or the late delete of a pod already replaced (pods: by UID)
            return False
        if kind == "pod":
            compiler.remove_pod(uid=key)
        else:
            getattr(compiler, f"remove_{kind}")(key)
        return True


class FeedStats:
    """Counters of the source feeding an agent (stats()["source"]); any thread."""

    def __init__(self, name="files", where=""):
        self._lock = threading.Lock()
        self._s = {"name": name, "address": where, "connected": False, "disconnects": 0, "resyncs": 0,
                   "changes_applied": 0, "objects_rejected": 0, "last_revision": "", "last_change_at": None,
                   "last_error": None}
        self._logged = {}

    def update(self, **kw):
        with self._lock:
            for k, v in kw.items():
                if k in ("disconnects", "resyncs", "changes_applied", "objects_rejected"):
                    self._s[k] += v
                else:
                    self._s[k] = v

    def first_report(self, key, message) -> bool:
        """True the first time this (key, message) is reported: log it once."""
        with self._lock:
            if self._logged.get(key) == message:
                return False
            self._logged[key] = message
            if len(self._logged) > 10000:
                self._logged.clear()
            return True

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._s)

    @staticmethod
    def now():
        return time.time()


class SourceRunner:
    """Runs a Source on its own thread for an agent being built.

    start() returns the source's first snapshot (the agent is built on it),
    or raises SourceStartError with the source's address and the reason when
    the source fails first or sends nothing in time: no fallback to files.
    Until attach(sink) the source's further calls wait (rejections are
    kept and replayed); after it, everything goes to the sink."""

    def __init__(self, source):
        self.source = source
        self.stop_event = threading.Event()
        self._first = threading.Event()
        self._ready = threading.Event()
        self._snapshot = None
        self._error = None
        self._sink = None
        self._early = []
        self._thread = None

    def start(self, timeout=10.0):
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"egresscore-source-{self.source.name}")
        self._thread.start()
        self._first.wait(timeout)
        if self._snapshot is None:
            self.stop()
            why = self._error or f"no snapshot within {timeout:g} s"
            raise SourceStartError(f"cluster source {self.source.describe()}: {why}")
        return self._snapshot

    def _run(self):
        try:
            self.source.run(self, self.stop_event)
        except Exception as exc:  # noqa: BLE001 - reported to start() or the sink
            self.disconnected(f"the source stopped: {type(exc).__name__}: {exc}")

    def attach(self, sink):
        self._sink = sink
        for key, error in self._early:
            sink.rejected(key, error)
        self._early = []
        self._ready.set()

    def stop(self):
        self.stop_event.set()
        self._ready.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(10)

    # the SourceSink the source sees
    def resync(self, snapshot):
        if self._snapshot is None:
            self._snapshot = snapshot
            self._first.set()
            return
        self._ready.wait()
        if self._sink is not None and not self.stop_event.is_set():
            self._sink.resync(snapshot)

    def apply(self, changes):
        self._ready.wait()
        if self._sink is not None and not self.stop_event.is_set():
            self._sink.apply(changes)

    def disconnected(self, reason):
        if self._snapshot is None:
            self._error = str(reason)
            self._first.set()
            return
        self._ready.wait()
        if self._sink is not None:
            self._sink.disconnected(reason)

    def connected(self, revision):
        if self._sink is not None:
            self._sink.connected(revision)

    def rejected(self, key, error):
        if self._sink is None:
            self._early.append((key, error))
        else:
            self._sink.rejected(key, error)


class SourceStartError(EgressError, RuntimeError):
    """A cluster source that could not give the agent its first snapshot (the address and why)."""


class CompilingSink:
    """A SourceSink that only compiles: a Compiler over an EgressMap, no
    datapath (tests, benchmarks, tools).  node: the view (None: cluster-wide)."""

    def __init__(self, node=None, egress_map=None):
        from .._core import EgressMap
        from ..compiler import Compiler

        self.egress_map = egress_map if egress_map is not None else EgressMap()
        self.compiler = Compiler(node=node, egress_map=self.egress_map)
        self.feed = Feed(self.compiler)
        self.stats = FeedStats()
        self.errors = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.version = 0

    def _done(self, **kw):
        self.stats.update(last_change_at=FeedStats.now(), **kw)
        self.version += 1
        self.changed.notify_all()

    def resync(self, snapshot):
        with self.lock:
            self.feed.reconcile(Cluster(snapshot.nodes, snapshot.namespaces, snapshot.pods), list(snapshot.policies))
            self._done(connected=True, resyncs=1, last_revision=snapshot.revision)

    def apply(self, changes):
        with self.lock:
            n = 0
            for ch in changes:
                try:
                    n += bool(self.feed.apply(ch))
                except Exception as exc:  # noqa: BLE001 - one bad change never stops the others
                    self.rejected(f"{ch.kind}s/{ch.key}", exc)
            self._done(connected=True, changes_applied=n, last_revision=changes[-1].revision if changes else "")

    def disconnected(self, reason):
        self.stats.update(connected=False, disconnects=1, last_error=str(reason))

    def connected(self, revision):
        self.stats.update(connected=True, last_revision=str(revision))

    def rejected(self, key, error):
        self.errors.append((key, error))
        self.stats.update(objects_rejected=1, last_error=f"{key}: {error}")

    def wait(self, predicate, timeout=10.0):
        """Wait until predicate() (called under the lock) is true; returns its last value."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                value = predicate()
                left = deadline - time.monotonic()
                if value or left <= 0:
                    return value
                self.changed.wait(min(left, 0.1))
