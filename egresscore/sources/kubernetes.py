"""The Kubernetes API as a source: CiliumEgressGatewayPolicy, Node, Pod, Namespace.

Lists the four kinds (a `Snapshot`), then watches each from its list's
resourceVersion, with lightkube (the `kubernetes` extra).  A watch that
answers 410 Gone (the version is too old) relists all four and hands a fresh
snapshot (the sink reconciles); a lost or silent connection (see the class
docstring for the watch and read timeouts) calls `sink.disconnected`,
backs off (doubling, capped) and relists.  Every object is converted here to
egresscore's types with the existing parsers; one that is malformed or over
`max_object_bytes` is reported with `sink.rejected("kind namespace/name",
error naming the field)` and left out alone (a malformed update leaves the
last good version in force).

Liveness (egresscore.sources.k8s_lease): with `node`, the source keeps
that node's coordination.k8s.io/v1 Lease `egresscore-<node>` in
`lease_namespace` renewed, as kubelet keeps its node Lease; liveness()
watches every agent's Lease: one not renewed within its
leaseDurationSeconds is a node that is down.

Pods as Cilium sees them: keyed by metadata.uid; a pod without an IP, with
hostNetwork (Cilium makes no endpoint for it: its IP is the node's) or done
(phase Succeeded/Failed: its IP is released) is not an endpoint, so its
update is a delete.

All four kinds are read as lightkube generic resources (plain dicts), so a
malformed object reaches the converter instead of failing the watch inside
lightkube's typed models.  Not run against a real API server here: the
contract tests use kmock's Kubernetes emulator.
"""
from __future__ import annotations

import asyncio
import functools
import json
import random
import threading
import time
from typing import Any, Mapping

from egresscore.cluster import ClusterError, Namespace, Node, Pod, built_at
from egresscore.policy import API_VERSION, KIND, PolicyError, parse_policy
from egresscore.sources.base import Change, Snapshot, Source, SourceSink

__all__ = ["LEASE_DURATION", "LEASE_NAMESPACE", "KubernetesSource", "MAX_OBJECT_BYTES", "convert"]

MAX_OBJECT_BYTES = 512 * 1024
"""The largest object accepted, as compact JSON.  Real pods, nodes and
policies are a few KiB; the API server's own ceiling is etcd's 1.5 MiB."""

KINDS = ("node", "namespace", "pod", "policy")
LEASE_NAMESPACE = "kube-node-lease"   # beside kubelet's node Leases; ours are egresscore-<node>
LEASE_DURATION = 10                   # seconds (leaseDurationSeconds); renewed every third of it


class _Meta:
    """What lightkube's watch driver reads of an object (its resourceVersion),
    without validating the rest: a malformed object is ours to reject alone."""

    def __init__(self, meta):
        self._meta = meta if isinstance(meta, Mapping) else {}

    def __getattr__(self, item):  # resourceVersion, name, namespace: None when absent or odd
        value = self._meta.get(item)
        return value if isinstance(value, str) else None


@functools.cache
def _resources():
    """lightkube generic resources for the four kinds and the agents' Leases (one set per process:
    lightkube registers them)."""
    from lightkube.generic_resource import create_global_resource, create_namespaced_resource

    out = {
        "policy": create_global_resource("cilium.io", "v2", "CiliumEgressGatewayPolicy",
                                         "ciliumegressgatewaypolicies"),
        "node": create_global_resource("", "v1", "Node", "nodes"),
        "namespace": create_global_resource("", "v1", "Namespace", "namespaces"),
        "pod": create_namespaced_resource("", "v1", "Pod", "pods"),
        "lease": create_namespaced_resource("coordination.k8s.io", "v1", "Lease", "leases"),  # k8s_lease
    }
    for res in out.values():
        res.metadata = property(lambda self: _Meta(self.get("metadata")))
    return out


class _Gone(Exception):
    """A watch's resourceVersion is too old (410): relist."""


def _name_of(obj) -> str:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return "?"
    name = meta.get("name") if isinstance(meta.get("name"), str) else "?"
    ns = meta.get("namespace")
    return f"{ns}/{name}" if isinstance(ns, str) and ns else name


def _map(obj, where) -> Mapping:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise ClusterError("must be a mapping", field=where)
    return obj


def _list(obj, where) -> list:
    if obj is None:
        return []
    if not isinstance(obj, list):
        raise ClusterError("must be a list", field=where)
    return obj


def _str_map(obj, where) -> dict:
    out = {}
    for k, v in _map(obj, where).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ClusterError(f"{v!r} must be a string", field=f"{where}.{k}")
        out[k] = v
    return out


def _str(obj, where, *, required=True) -> str:
    if obj is None and not required:
        return ""
    if not isinstance(obj, str) or (required and not obj):
        raise ClusterError(f"{obj!r} must be a non-empty string", field=where)
    return obj


def _node(obj) -> Node:
    meta = _map(obj.get("metadata"), "metadata")
    spec = _map(obj.get("spec"), "spec")
    status = _map(obj.get("status"), "status")
    internal = []
    for i, a in enumerate(_list(status.get("addresses"), "status.addresses")):
        a = _map(a, f"status.addresses[{i}]")
        if a.get("type") == "InternalIP":
            internal.append((i, _str(a.get("address"), f"status.addresses[{i}].address")))
    # Cilium's node IP for egress is the IPv4 InternalIP (GetNodeIP(false)); else the first one
    chosen = next((x for x in internal if ":" not in x[1]), internal[0] if internal else (None, None))
    cidrs = _list(spec.get("podCIDRs"), "spec.podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    name = _str(meta.get("name"), "metadata.name")
    labels = _str_map(meta.get("labels"), "metadata.labels")
    node = built_at(f"status.addresses[{chosen[0]}].address", lambda: Node(name, labels, chosen[1]))
    if cidrs:
        node = built_at("spec.podCIDRs", lambda: Node(name, labels, chosen[1], pod_cidrs=tuple(str(c) for c in cidrs)))
    return node


def _namespace(obj) -> Namespace:
    meta = _map(obj.get("metadata"), "metadata")
    return Namespace(_str(meta.get("name"), "metadata.name"), _str_map(meta.get("labels"), "metadata.labels"))


def _pod(obj) -> Pod | None:
    """The pod as an endpoint, or None when it is not one (no IP, host network, done)."""
    meta = _map(obj.get("metadata"), "metadata")
    spec = _map(obj.get("spec"), "spec")
    status = _map(obj.get("status"), "status")
    name = _str(meta.get("name"), "metadata.name")
    namespace = _str(meta.get("namespace"), "metadata.namespace")
    uid = _str(meta.get("uid"), "metadata.uid")
    labels = _str_map(meta.get("labels"), "metadata.labels")
    ips = []
    for i, entry in enumerate(_list(status.get("podIPs"), "status.podIPs")):
        ips.append(_str(_map(entry, f"status.podIPs[{i}]").get("ip"), f"status.podIPs[{i}].ip"))
    if not ips and status.get("podIP"):
        ips.append(_str(status.get("podIP"), "status.podIP"))
    node = _str(spec.get("nodeName"), "spec.nodeName", required=False) or None
    sa = _str(spec.get("serviceAccountName") or spec.get("serviceAccount"), "spec.serviceAccountName", required=False)
    pod = built_at("status.podIPs", lambda: Pod(name, namespace, uid, labels, tuple(ips), node, sa))
    if spec.get("hostNetwork") is True or status.get("phase") in ("Succeeded", "Failed") or not pod.ips:
        return None
    return pod


def _policy(obj):
    meta = _map(obj.get("metadata"), "metadata")
    metadata = {"name": meta.get("name")}
    if meta.get("annotations") is not None:  # egresscore.io/extra-egress-ips (egresscore.policy)
        metadata["annotations"] = meta["annotations"]
    doc = {"apiVersion": obj.get("apiVersion", API_VERSION), "kind": obj.get("kind", KIND),
           "metadata": metadata, "spec": obj.get("spec")}
    policy, _warnings = parse_policy(doc, source="kubernetes")
    return policy


_CONVERT = {"node": _node, "namespace": _namespace, "pod": _pod, "policy": _policy}


def convert(kind: str, obj: Any, max_bytes: int = MAX_OBJECT_BYTES):
    """One API object as egresscore's type (a Pod may be None: not an
    endpoint); ClusterError or PolicyError naming the field if malformed,
    ClusterError if larger than `max_bytes` of compact JSON."""
    if not isinstance(obj, Mapping):
        raise ClusterError("must be a mapping")
    size = len(json.dumps(obj, separators=(",", ":"), default=str))
    if size > max_bytes:
        raise ClusterError(f"object is {size} bytes, over the limit of {max_bytes} bytes")
    return _CONVERT[kind](obj)


def _key(kind, obj) -> str | None:
    """The Change key a delete names (pod: its uid), or None if unreadable."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    key = meta.get("uid") if kind == "pod" else meta.get("name")
    return key if isinstance(key, str) and key else None


class KubernetesSource(Source):
    """Cluster state from the Kubernetes API (see the module docstring).

    `kubeconfig`: a kubeconfig path (with `context`), or None for the
    in-cluster service account.  `config`: a lightkube KubeConfig instead.
    Backoff after a lost connection: `backoff` seconds, doubling up to
    `max_backoff`.  Counters: `resyncs`, `disconnects`, `rejects`.

    A dead or silent API server is noticed as client-go's reflector does:
    each watch asks the server to end it after `timeoutSeconds`, drawn from
    [`watch_timeout`, 2 x `watch_timeout`) (spreading the agents' rewatches),
    and lightkube then rewatches from the last resourceVersion (no
    disconnect, no resync).  A watch connection that delivers no byte for
    `read_timeout` seconds (default 2 x `watch_timeout` + 30, longer than
    any healthy server's silence) ends with a read timeout: that, like any
    connection error, counts a disconnect, backs off and relists."""

    name = "kubernetes"

    def __init__(self, kubeconfig=None, *, context=None, config=None, backoff=0.5, max_backoff=30.0,
                 max_object_bytes=MAX_OBJECT_BYTES, list_chunk=500, watch_timeout=150.0, read_timeout=None,
                 node=None, lease_namespace=LEASE_NAMESPACE, lease_duration=LEASE_DURATION):
        if not lease_duration >= 1:
            raise ValueError(f"lease_duration: {lease_duration!r} must be at least 1 second")
        if not watch_timeout >= 1:
            raise ValueError(f"watch_timeout: {watch_timeout!r} must be at least 1 second")
        if read_timeout is None:
            read_timeout = 2 * watch_timeout + 30
        if not read_timeout > 2 * watch_timeout:
            raise ValueError(f"read_timeout: {read_timeout!r} must exceed the longest watch, 2 x watch_timeout")
        self.watch_timeout = watch_timeout
        self.read_timeout = read_timeout
        self._kubeconfig = kubeconfig
        self._context = context
        self._config = config
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_object_bytes = max_object_bytes
        self.list_chunk = list_chunk
        self.resyncs = 0
        self.disconnects = 0
        self.rejects = 0
        self.revisions = {}  # kind -> last resourceVersion seen
        self.node = node
        self.lease_namespace = lease_namespace
        self.lease_duration = int(lease_duration)
        self._leases = None  # liveness(): the agents' Leases (egresscore.sources.k8s_lease.LeaseTracker)

    def describe(self) -> str:
        where = self._kubeconfig or ("config" if self._config is not None else "in-cluster")
        return f"kubernetes ({where})"

    def _client(self):
        from lightkube import AsyncClient, KubeConfig

        config = self._config
        if config is None:
            if self._kubeconfig is not None:
                config = KubeConfig.from_file(self._kubeconfig)
            else:
                config = KubeConfig.from_service_account()
        if self._context is not None:
            config = config.get(context_name=self._context)
        import httpx2

        client = AsyncClient(config=config, timeout=httpx2.Timeout(10.0))
        # lightkube gives watches a timeout of their own with no read limit; a silent server must end a watch
        generic = getattr(client, "_client", None)
        if not isinstance(getattr(generic, "_watch_timeout", None), httpx2.Timeout):
            raise RuntimeError("this lightkube has no watch timeout to set (lightkube 1.x expected)")
        generic._watch_timeout = httpx2.Timeout(10.0, read=self.read_timeout)
        return client

    # ------------------------------------------------------------------ run

    def liveness(self):
        """The agents' Leases as a liveness provider (call before run()): this
        source then also watches the Leases in `lease_namespace` (see
        egresscore.sources.k8s_lease)."""
        from .k8s_lease import LeaseLiveness, LeaseTracker

        if self._leases is None:
            self._leases = LeaseTracker()
        return LeaseLiveness(self._leases)

    def run(self, sink: SourceSink, stop: threading.Event) -> None:
        asyncio.run(self._run(sink, stop))

    async def _run(self, sink, stop):
        from .k8s_lease import keep_lease, watch_leases

        tasks = []
        if self.node is not None:    # this node's liveness: its Lease, renewed (and deleted on stop)
            tasks.append(asyncio.ensure_future(keep_lease(self, stop)))
        if self._leases is not None:
            tasks.append(asyncio.ensure_future(watch_leases(self, self._leases, stop)))
        try:
            await self._follow(sink, stop)
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, sink, stop):
        from lightkube import ApiError

        res = _resources()
        client = self._client()
        failures = 0
        while not stop.is_set():
            try:
                snapshot = await self._list_all(client, res, sink)
                sink.resync(snapshot)
                self.resyncs += 1
                failures = 0
                await self._watch_all(client, res, sink, stop)
            except _Gone:
                continue  # relist at once: the versions we hold are too old
            except Exception as exc:  # noqa: BLE001 - any failure of the store: keep state, back off, relist
                if isinstance(exc, ApiError) and exc.status.code == 410:
                    continue
                self.disconnects += 1
                sink.disconnected(f"{self.describe()}: {type(exc).__name__}: {exc}")
                delay = min(self.max_backoff, self.backoff * (2 ** failures))
                failures += 1
                await _sleep(stop, delay)
        try:
            await client.close()
        except Exception:  # noqa: BLE001 - closing a broken client
            pass

    def _convert(self, kind, obj, sink):
        """(ok, converted): a malformed or too large object is rejected alone."""
        try:
            return True, convert(kind, obj, self.max_object_bytes)
        except (ClusterError, PolicyError) as exc:
            self.rejects += 1
            sink.rejected(f"{kind} {_name_of(obj)}", exc)
            return False, None

    async def _list_all(self, client, res, sink) -> Snapshot:
        from lightkube import ALL_NS

        found = {k: [] for k in KINDS}
        versions = {}
        for kind in KINDS:
            kw = {"namespace": ALL_NS} if kind == "pod" else {}
            it = client.list(res[kind], chunk_size=self.list_chunk, **kw)
            async for obj in it:
                ok, out = self._convert(kind, obj, sink)
                if ok and out is not None:
                    found[kind].append(out)
            try:
                versions[kind] = it.resourceVersion
            except Exception:  # noqa: BLE001 - an empty list before the first page: no version
                versions[kind] = None
        self.revisions = versions
        return Snapshot(tuple(found["node"]), tuple(found["namespace"]), tuple(found["pod"]),
                        tuple(found["policy"]), json.dumps(versions, sort_keys=True))

    async def _watch_all(self, client, res, sink, stop):
        tasks = [asyncio.ensure_future(self._watch(client, res, kind, sink)) for kind in KINDS]
        tasks.append(asyncio.ensure_future(_sleep(stop, None)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, client, res, kind, sink):
        from lightkube import ALL_NS, ApiError

        kw = {"namespace": ALL_NS} if kind == "pod" else {}
        version = self.revisions.get(kind)
        server_timeout = int(self.watch_timeout * (1 + random.random()))
        try:
            async for typ, obj in client.watch(res[kind], resource_version=version, server_timeout=server_timeout,
                                               **kw):
                rv = obj.metadata.resourceVersion
                if rv:
                    self.revisions[kind] = rv
                change = self._change(kind, typ, obj, sink)
                if change is not None:
                    sink.apply([change])
        except ApiError as exc:
            if exc.status.code == 410:
                raise _Gone(str(exc)) from None
            raise
        raise ConnectionError(f"the {kind} watch ended")

    def _change(self, kind, typ, obj, sink) -> Change | None:
        if typ == "BOOKMARK":
            return None
        key = _key(kind, obj)
        if typ == "DELETED":
            if key is None:
                self.rejects += 1
                sink.rejected(f"{kind} {_name_of(obj)}", ClusterError("a delete without metadata.name/uid",
                                                                      field="metadata"))
                return None
            return Change(kind, "delete", key)
        ok, out = self._convert(kind, obj, sink)
        if not ok:
            return None
        if out is None:  # a pod that is no endpoint (any more)
            return Change(kind, "delete", key)
        return Change(kind, "upsert", out.uid if kind == "pod" else out.name, out)


async def _sleep(stop: threading.Event, seconds):
    """Sleep `seconds` (None: forever) or until `stop` is set."""
    end = None if seconds is None else time.monotonic() + seconds
    while not stop.is_set():
        left = 0.05 if end is None else min(0.05, end - time.monotonic())
        if left <= 0:
            return
        await asyncio.sleep(left)
