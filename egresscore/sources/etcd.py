"""etcd v3 as the cluster store: the source agents follow and the store `egresscore apply` writes.

Key layout (every value one JSON or YAML document, at most
egresscore.sources.objects.MAX_OBJECT_BYTES):

    <prefix>/v1/<cluster>/nodes/<name>               a node, as one entry of a cluster file's `nodes`
    <prefix>/v1/<cluster>/namespaces/<name>          a namespace (`namespaces` entry)
    <prefix>/v1/<cluster>/pods/<namespace>/<name>    a pod (`pods` entry)
    <prefix>/v1/<cluster>/policies/<name>            a CiliumEgressGatewayPolicy document
    <prefix>/v1/<cluster>/leases/<node>              liveness: written by that node's agent under a lease

The prefix defaults to "egresscore", the cluster name to "default".

Client: etcd3gw (over etcd's JSON gateway, plain HTTP with requests; the
OpenStack-maintained client) for ranges, puts, transactions and leases.
Its watch helper drops the response header, the compaction revision and the
end of the stream, so the watch stream (the same gateway endpoint, through
the same client session and URL) is read here, line by line.

EtcdSource: list the prefix at one revision (paged; the next page is
fetched on a helper thread while this one is parsed), hand the agent a
Snapshot, then watch from that revision + 1, one batch of Changes per watch
response.  A lost connection: `disconnected` once, retries with exponential
backoff (capped), and the watch resumes from the last revision seen; a
revision compacted meanwhile means a full list and resync.  A malformed or
oversized value is `rejected` alone (its key and field); the last good
version of that key stays in force.  With `node`, the source keeps
`leases/<node>` alive under a lease it refreshes (the node's liveness);
live_nodes() reads them and liveness() is the agents' liveness provider
(EtcdLiveness: a node whose lease key is gone is down), from the same watch.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import queue
import random
import socket
import threading
import time
from urllib.parse import urlsplit

from .._gcpause import gc_paused
from ..errors import EgressError
from ..health import LivenessProvider
from .base import Change, Snapshot, Source
from .objects import KINDS, MAX_OBJECT_BYTES, ObjectError, decode_document, object_document, parse_object

__all__ = ["DEFAULT_PREFIX", "MAX_OBJECT_BYTES", "EtcdError", "EtcdLiveness", "EtcdSource", "EtcdStore", "parse_url"]

DEFAULT_PREFIX = "egresscore"
DEFAULT_CLUSTER = "default"
PAGE = 5000                 # keys per range request while listing
LEASE_TTL = 10              # seconds; refreshed every TTL/3
BACKOFF = (0.1, 5.0)        # first retry, cap (seconds), doubled with jitter
TXN_OPS = 100               # puts per transaction when loading many objects


class EtcdError(EgressError, RuntimeError):
    """The store could not be reached or refused a request (the address and why)."""


class _Compacted(Exception):
    pass


def parse_url(url, default_port=2379):
    """(host, port, prefix) of etcd://HOST:PORT[/prefix]."""
    parts = urlsplit(url if "://" in url else f"etcd://{url}")
    if parts.scheme != "etcd" or not parts.hostname:
        raise ValueError(f"{url!r} is not etcd://HOST:PORT[/prefix]")
    prefix = parts.path.strip("/") or DEFAULT_PREFIX
    return parts.hostname, parts.port or default_port, prefix


def _b64(data) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text) -> bytes:
    return binascii.a2b_base64(text) if text else b""


def _range_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdStore:
    """The cluster's objects in etcd, kubectl-style: apply, delete, get (also the CLI's)."""

    def __init__(self, host="127.0.0.1", port=2379, *, prefix=DEFAULT_PREFIX, cluster=DEFAULT_CLUSTER, timeout=5.0):
        import etcd3gw  # the "etcd" extra

        self.host, self.port, self.cluster = host, int(port), cluster
        self.prefix = prefix.strip("/")
        self.root = f"{self.prefix}/v1/{cluster}/"
        self.timeout = timeout
        self.client = etcd3gw.client(host=host, port=self.port, timeout=timeout, api_path="/v3/")

    @classmethod
    def from_url(cls, url, **kw):
        host, port, prefix = parse_url(url)
        return cls(host, port, prefix=prefix, **kw)

    @property
    def address(self):
        return f"etcd://{self.host}:{self.port}/{self.prefix} (cluster {self.cluster})"

    def _post(self, path, body, timeout=None):
        import requests

        try:
            r = self.client.session.post(self.client.get_url(path), data=json.dumps(body),
                                         timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            raise EtcdError(f"etcd at {self.host}:{self.port} is unreachable: {type(exc).__name__}") from None
        if r.status_code != 200:
            raise EtcdError(f"etcd at {self.host}:{self.port}: {path}: HTTP {r.status_code}: {r.text[:200]}")
        return r.json()

    # -- keys ----------------------------------------------------------------------------
    def key(self, kind, name, namespace=None) -> str:
        kind = _plural(kind)
        if kind == "pods":
            return f"{self.root}pods/{namespace or 'default'}/{name}"
        return f"{self.root}{kind}/{name}"

    def split(self, key: str):
        """(kind, names) of one of our keys, or None for a key outside the layout's kinds."""
        rest = key[len(self.root):] if key.startswith(self.root) else None
        if rest is None:
            return None
        kind, _, tail = rest.partition("/")
        return kind, tail.split("/") if tail else []

    # -- reads ---------------------------------------------------------------------------
    def revision(self) -> int:
        return int(self._post("/kv/range", {"key": _b64(self.root), "count_only": True})["header"]["revision"])

    def list(self, revision=None, page=PAGE, under=""):
        """(revision, [(key, value bytes, mod revision)]) of every key under the root (or the root's
        `under` folder, e.g. "policies/"), at one revision."""
        out = []
        for revision, kvs in self.pages(revision, page, under, prefetch=False):
            out.extend((_unb64(kv["key"]).decode("utf-8", "replace"), _unb64(kv.get("value")),
                        int(kv.get("mod_revision", 0))) for kv in kvs)
        return revision, out

    def pages(self, revision=None, page=PAGE, under="", *, prefetch=True):
        """Yield (revision, kvs) one range response at a time (kvs: etcd's own
        mappings, key and value base64), every page at one revision (the
        first page's, unless `revision` is given).  With `prefetch`, a thread
        asks for the next page while the caller works on this one (etcd
        answers on its own core); it stops when the caller does."""
        if not prefetch:
            yield from self._pages(revision, page, under, threading.Event())
            return
        q = queue.Queue(maxsize=2)
        cancel = threading.Event()

        def fetch():
            try:
                for item in self._pages(revision, page, under, cancel):
                    while not cancel.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                item = None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                item = exc
            while not cancel.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    pass

        t = threading.Thread(target=fetch, daemon=True, name="egresscore-etcd-list")
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            t.join(self.timeout + 30)

    def _pages(self, revision, page, under, cancel):
        start = (self.root + under).encode()
        end = _range_end(start)
        while not cancel.is_set():
            body = {"key": _b64(start), "range_end": _b64(end), "limit": page}
            if revision is not None:
                body["revision"] = revision
            r = self._post("/kv/range", body, timeout=max(self.timeout, 30))
            if revision is None:
                revision = int(r["header"]["revision"])
            kvs = r.get("kvs", [])
            yield revision, kvs
            if not r.get("more") or not kvs:
                return
            start = _unb64(kvs[-1]["key"]) + b"\0"

    def get(self, kind):
        """The documents of one kind ("policies", "nodes", "pods", "namespaces"), by key."""
        kind = _plural(kind)
        _, items = self.list(under=f"{kind}/")
        out = []
        for key, raw, _ in items:
            parts = self.split(key)
            if parts and parts[0] == kind:
                try:
                    out.append((key, decode_document(key, raw)))
                except ObjectError as exc:
                    out.append((key, {"error": str(exc)}))
        return out

    def live_nodes(self) -> set:
        """The nodes whose agents hold a live lease (leases/<node>)."""
        _, items = self.list(under="leases/")
        out = set()
        for key, _, _ in items:
            names = self.split(key)[1]
            if names and names[0]:
                out.add(names[0])
        return out

    # -- writes --------------------------------------------------------------------------
    def put(self, kind, doc) -> str:
        """Write one object (a document mapping, or a Node/Namespace/Pod); checked
        first as the source will parse it: ObjectError names the field."""
        kind = _plural(kind)
        if not isinstance(doc, dict):
            doc = object_document(doc)
        key, raw = self._encoded(kind, doc)
        self._post("/kv/put", {"key": _b64(key), "value": _b64(raw)})
        return key

    def _encoded(self, kind, doc):
        if kind == "policies":
            name, ns = (doc.get("metadata") or {}).get("name"), None
        else:
            name, ns = doc.get("name"), doc.get("namespace") or "default"
        if not isinstance(name, str) or not name or "/" in name:
            field = "metadata.name" if kind == "policies" else "name"
            raise ObjectError(f"{kind}/{name}", "a name (without '/') is required", field)
        key = self.key(kind, name, ns)
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        parse_object(kind, self.split(key)[1], key, raw)
        return key, raw

    def put_many(self, items):
        """Write many (kind, doc) in transactions of TXN_OPS puts; returns the keys."""
        keys, ops = [], []
        for kind, doc in items:
            kind = _plural(kind)
            key, raw = self._encoded(kind, doc if isinstance(doc, dict) else object_document(doc))
            keys.append(key)
            ops.append({"request_put": {"key": _b64(key), "value": _b64(raw)}})
            if len(ops) == TXN_OPS:
                self._post("/kv/txn", {"success": ops})
                ops = []
        if ops:
            self._post("/kv/txn", {"success": ops})
        return keys

    def put_raw(self, key, raw: bytes):
        """Write bytes under a key unchecked (tests: a malformed object as another writer might)."""
        self._post("/kv/put", {"key": _b64(key), "value": _b64(raw)})

    def delete(self, kind, name, namespace=None) -> bool:
        """Delete one object; False if there was none."""
        key = self.key(kind, name, namespace)
        return int(self._post("/kv/deleterange", {"key": _b64(key)}).get("deleted", 0)) > 0

    def apply_file(self, path):
        """`egresscore apply -f FILE`: every policy document and every cluster object in the file, checked
        whole first (nothing is written if one is bad); returns the keys written."""
        from ..files import read_input_file
        from ..policy import LIST_KINDS, _split_documents

        text = read_input_file(path)
        items = []
        for _, chunk in _split_documents(text):
            doc = decode_document(path, chunk.encode())  if chunk.strip() else None
            if doc is None:
                continue
            if doc.get("kind") in LIST_KINDS:
                items += [("policies", d) for d in doc.get("items") or []]
            elif "kind" in doc or "apiVersion" in doc:
                items.append(("policies", doc))
            else:
                for section in ("nodes", "namespaces", "pods"):
                    items += [(section, d) for d in doc.get(section) or []]
                extra = set(doc) - {"nodes", "namespaces", "pods"}
                if extra:
                    raise ObjectError(path, f"unknown field(s) {', '.join(sorted(extra))}")
        for kind, doc in items:
            self._encoded(kind, doc)  # all checked before anything is written
        return self.put_many(items)

    def compact(self, revision=None):
        """Compact the store's history up to `revision` (default: now); tests and the benchmark."""
        revision = revision or self.revision()
        self._post("/kv/compaction", {"revision": revision, "physical": True})
        return revision

    # -- liveness ------------------------------------------------------------------------
    def grant(self, ttl) -> int:
        return int(self._post("/lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease_id) -> int:
        r = self._post("/lease/keepalive", {"ID": lease_id})
        return int(r.get("result", {}).get("TTL", -1))

    def revoke(self, lease_id):
        self._post("/kv/lease/revoke", {"ID": lease_id})

    def delete_lease(self, node) -> bool:
        """Delete a node's liveness key: its agent is down for every other agent
        (EtcdLiveness) until it puts the key back, within a third of its lease
        TTL (tests; an operator forcing a failover check)."""
        key = f"{self.root}leases/{node}"
        return int(self._post("/kv/deleterange", {"key": _b64(key)}).get("deleted", 0)) > 0

    def put_lease(self, node, lease_id):
        key = f"{self.root}leases/{node}"
        doc = {"node": node, "pid": os.getpid(), "since": time.time()}
        self._post("/kv/put", {"key": _b64(key), "value": _b64(json.dumps(doc)), "lease": lease_id})


class EtcdLiveness(LivenessProvider):
    """Down: the nodes in the store whose agent holds no live lease (its
    `leases/<node>` key, under a lease the agent refreshes, is gone: revoked
    by a clean stop, or expired `lease_ttl` seconds after the agent last
    refreshed it).  A view over the source's one watch (no request of its
    own, nothing per gateway): down() reads a set the watch keeps.  A node
    with no agent at all is down too (nothing could SNAT there).  While the
    store is unreachable the last state seen stays (the probes still run)."""

    def __init__(self, source: EtcdSource):
        self.source = source

    def down(self):
        return self.source._down()


def _plural(kind):
    kind = {"node": "nodes", "namespace": "namespaces", "ns": "namespaces", "pod": "pods", "policy": "policies",
            "cegp": "policies", "ciliumegressgatewaypolicy": "policies"}.get(kind.lower(), kind.lower())
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (nodes, namespaces, pods, policies)")
    return kind


class EtcdSource(Source):
    """The agent's source on etcd (see the module docstring)."""

    name = "etcd"

    def __init__(self, host="127.0.0.1", port=2379, *, prefix=DEFAULT_PREFIX, cluster=DEFAULT_CLUSTER, node=None,
                 lease_ttl=LEASE_TTL, backoff=BACKOFF, timeout=5.0):
        self.store = EtcdStore(host, port, prefix=prefix, cluster=cluster, timeout=timeout)
        self.node, self.lease_ttl, self.backoff = node, lease_ttl, backoff
        self.revision = 0
        self._good = {}        # etcd key -> (kind, change key, object): the last good version in force
        self._live = set()
        self._nodes = set()        # node names in the store (their keys), as the watch saw them
        self._down_set = frozenset()   # _nodes - _live, kept with them
        self._lock = threading.Lock()
        self._resp = None
        self.watching = threading.Event()  # set while a watch stream is established
        self._relet = threading.Event()    # our liveness key was deleted: grant and put it again
        self.stats = {"resyncs": 0, "compactions": 0, "disconnects": 0, "resumes": 0, "retries": 0}

    @classmethod
    def from_url(cls, url, **kw):
        host, port, prefix = parse_url(url)
        return cls(host, port, prefix=prefix, **kw)

    def describe(self):
        return self.store.address

    def live_nodes(self) -> set:
        """The nodes holding a live lease, as this source's watch last saw them."""
        with self._lock:
            return set(self._live)

    def liveness(self):
        """The agents' leases as a liveness provider (EtcdLiveness over this source's watch)."""
        return EtcdLiveness(self)

    def _down(self) -> frozenset:
        with self._lock:
            return self._down_set

    # -- the loop ------------------------------------------------------------------------
    def run(self, sink, stop):
        keeper = threading.Thread(target=self._keep_lease, args=(stop,), daemon=True,
                                  name=f"egresscore-etcd-lease-{self.node or '-'}")
        keeper.start()
        state = {"delay": self.backoff[0], "connected": True}

        def up():
            if not state["connected"]:
                self.stats["resumes"] += 1
            state["connected"], state["delay"] = True, self.backoff[0]
            self.watching.set()
            connected = getattr(sink, "connected", None)
            if connected is not None:
                connected(str(self.revision))

        listed = False
        try:
            while not stop.is_set():
                try:
                    if not listed:
                        self._resync(sink)
                        listed = True
                    self._watch(sink, stop, up)
                except _Compacted:
                    self.watching.clear()
                    self.stats["compactions"] += 1
                    listed = False
                except Exception as exc:  # noqa: BLE001 - any failure: keep the state, back off, retry
                    self.watching.clear()
                    if stop.is_set():
                        break
                    if state["connected"]:
                        state["connected"] = False
                        self.stats["disconnects"] += 1
                        sink.disconnected(f"{self.describe()}: {exc}")
                    self.stats["retries"] += 1
                    stop.wait(state["delay"] * random.uniform(0.8, 1.2))
                    state["delay"] = min(state["delay"] * 2, self.backoff[1])
        finally:
            stop.set()
            keeper.join(5)

    def _resync(self, sink):
        """List the prefix (paged, the next page fetched while this one is
        parsed), parse every object alone, hand the sink one Snapshot."""
        good, live, nodes = {}, set(), set()
        old_good = self._good
        revision = None
        root, n_root = self.store.root, len(self.store.root)
        with gc_paused():   # ~10^5 small objects built, none cycles: the cyclic GC would rescan them
            for revision, kvs in self.store.pages():
                for kv in kvs:
                    key = _unb64(kv["key"]).decode("utf-8", "replace")
                    if not key.startswith(root):
                        continue
                    kind, _, tail = key[n_root:].partition("/")
                    names = tail.split("/") if tail else []
                    if kind == "leases" or kind == "nodes":
                        if names:
                            (live if kind == "leases" else nodes).add(names[0])
                        if kind == "leases":
                            continue
                    parsed = self._parse_split(sink, key, kind, names, _unb64(kv.get("value")))
                    if parsed is not None:
                        good[key] = parsed
                    elif key in old_good:
                        good[key] = old_good[key]  # a bad new value: the last good one stays
        with self._lock:
            self._live, self._nodes = live, nodes
            self._down_set = frozenset(nodes - live)
        self._good = good
        by = {"node": [], "namespace": [], "pod": [], "policy": []}
        for kind, _, obj in good.values():
            by[kind].append(obj)
        self.revision = revision
        self.stats["resyncs"] += 1
        sink.resync(Snapshot(tuple(by["node"]), tuple(by["namespace"]), tuple(by["pod"]), tuple(by["policy"]),
                             str(revision)))

    def _parse(self, sink, key, raw):
        parts = self.store.split(key)
        if parts is None or parts[0] == "leases":
            return None
        return self._parse_split(sink, key, parts[0], parts[1], raw)

    def _parse_split(self, sink, key, kind, names, raw):
        if kind not in KINDS:
            sink.rejected(key, ObjectError(key, f"unknown kind {kind!r} (nodes, namespaces, pods, policies)"))
            return None
        try:
            ckey, obj = parse_object(kind, names, key, raw)
        except ObjectError as exc:
            sink.rejected(key, exc)
            return None
        return KINDS[kind], ckey, obj

    def _watch(self, sink, stop, on_created):
        import requests

        store = self.store
        root = store.root.encode()
        body = {"create_request": {"key": _b64(root), "range_end": _b64(_range_end(root)),
                                   "start_revision": self.revision + 1, "progress_notify": True}}
        try:
            resp = store.client.session.post(store.client.get_url("/watch"), data=json.dumps(body), stream=True,
                                              timeout=(store.timeout, None))
        except requests.RequestException as exc:
            raise EtcdError(f"unreachable: {type(exc).__name__}") from None
        if resp.status_code != 200:
            raise EtcdError(f"watch: HTTP {resp.status_code}")
        with self._lock:
            self._resp = resp
        try:
            if stop.is_set():
                return
            for line in resp.iter_lines(chunk_size=None):
                if not line:
                    continue
                msg = json.loads(line)
                if "error" in msg:
                    raise EtcdError(f"watch: {msg['error'].get('message', msg['error'])}")
                r = msg.get("result", {})
                if int(r.get("compact_revision", 0) or 0) > 0:
                    raise _Compacted()
                if r.get("canceled"):
                    raise EtcdError(f"watch canceled: {r.get('cancel_reason', '')}")
                if r.get("created"):
                    on_created()
                    continue
                self._events(sink, r.get("events") or (), int(r.get("header", {}).get("revision", 0)))
        except (requests.RequestException, OSError, ValueError) as exc:
            if stop.is_set():
                return
            raise EtcdError(f"the watch stream broke: {type(exc).__name__}") from None
        finally:
            with self._lock:
                self._resp = None
            resp.close()
        if not stop.is_set():
            raise EtcdError("the watch stream ended (the server went away)")

    def _events(self, sink, events, header_rev):
        changes, top = [], 0
        for ev in events:
            kv = ev["kv"]
            key = _unb64(kv["key"]).decode("utf-8", "replace")
            rev = int(kv.get("mod_revision", 0))
            top = max(top, rev)
            parts = self.store.split(key)
            if parts is not None and parts[0] in ("leases", "nodes") and parts[1]:
                track = self._live if parts[0] == "leases" else self._nodes
                with self._lock:
                    if ev.get("type") == "DELETE":
                        track.discard(parts[1][0])
                        if parts[0] == "leases" and parts[1][0] == self.node:
                            self._relet.set()   # our key went while our lease lives: the keeper puts it back
                    else:
                        track.add(parts[1][0])
                    self._down_set = frozenset(self._nodes - self._live)
                if parts[0] == "leases":
                    continue
            if ev.get("type") == "DELETE":
                old = self._good.pop(key, None)
                if old is not None:
                    changes.append(Change(old[0], "delete", old[1], None, str(rev)))
                continue
            parsed = self._parse(sink, key, _unb64(kv.get("value")))
            if parsed is None:
                continue
            old = self._good.get(key)
            if old is not None and old[1] != parsed[1]:  # a pod recreated under its name: a new UID
                changes.append(Change(old[0], "delete", old[1], None, str(rev)))
            if old is None or old[2] != parsed[2]:
                self._good[key] = parsed
                changes.append(Change(parsed[0], "upsert", parsed[1], parsed[2], str(rev)))
        self.revision = max(self.revision, top, header_rev if not events else 0)
        if changes:
            sink.apply(changes)

    def _abort_watch(self):
        """From another thread: end the watch stream's blocking read."""
        with self._lock:
            resp = self._resp
        if resp is None:
            return
        try:
            fd = resp.raw._fp.fp.raw._sock.fileno()
            s = socket.socket(fileno=os.dup(fd))
            s.shutdown(socket.SHUT_RDWR)
            s.close()
        except (AttributeError, OSError, ValueError):
            pass

    def _keep_lease(self, stop):
        """The liveness key under a lease refreshed every TTL/3; a failure breaks the watch too (a
        store that stopped answering is a lost store); a key deleted under a live lease is put
        back under a new one.  On stop the lease is revoked."""
        lease = None
        store = EtcdStore(  # its own HTTP session: the watch owns the other
                          self.store.host, self.store.port, prefix=self.store.prefix, cluster=self.store.cluster,
                       timeout=max(1.0, self.lease_ttl / 3))
        try:
            while True:
                if self.node is not None:
                    try:
                        if self._relet.is_set():
                            self._relet.clear()
                            if lease is not None:
                                store.revoke(lease)
                                lease = None
                        if lease is None:
                            lease = store.grant(self.lease_ttl)
                            store.put_lease(self.node, lease)
                        elif store.keepalive(lease) <= 0:
                            lease = None
                            continue
                    except EtcdError:
                        lease = None
                        self._abort_watch()
                if stop.wait(self.lease_ttl / 3 if self.node is not None else 3600):
                    break
        finally:
            self._abort_watch()
            if lease is not None:
                try:
                    store.revoke(lease)
                except EtcdError:
                    pass

