"""Agents' liveness in Kubernetes: one coordination.k8s.io/v1 Lease per node, as kubelet keeps its node Lease.

Each agent (KubernetesSource with `node`) keeps `egresscore-<node>` in the
lease namespace (kube-node-lease by default, beside kubelet's own):
spec.holderIdentity = the node, leaseDurationSeconds, acquireTime and
renewTime (MicroTime, RFC 3339 with microseconds), renewed every third of
the duration, and deleted when the agent stops (its gateways fail over at
once, as the etcd lease's revoke does).

The source's liveness() watches every Lease of the namespace (one watch,
nothing per gateway; LeaseTracker keeps them).  A node is down when its
Lease has not been renewed within its leaseDurationSeconds, or was deleted
after being seen.  As Kubernetes' node lifecycle controller does, a Lease's
age is measured on this agent's monotonic clock from when it saw the
renewTime change, so the nodes' clocks need not agree; only a Lease's first
sighting trusts the wall-clock age of its renewTime (a Lease already stale
when this agent starts is down at once; a skewed one comes up at its next
renewal).  A node that has no Lease is not judged here (the probes are).
"""
from __future__ import annotations

import asyncio
import datetime
import sys
import threading
import time
from typing import Mapping

from ..health import LivenessProvider

__all__ = ["LEASE_PREFIX", "LeaseLiveness", "LeaseTracker", "keep_lease", "lease_name", "watch_leases"]

LEASE_PREFIX = "egresscore-"
LABELS = {"app.kubernetes.io/managed-by": "egresscore"}


def lease_name(node: str) -> str:
    return LEASE_PREFIX + node


def micro_time(when: float | None = None) -> str:
    """A Kubernetes MicroTime (what kubelet writes in renewTime)."""
    dt = datetime.datetime.fromtimestamp(time.time() if when is None else when, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _lease(obj):
    """(node, renewTime text, renewTime as Unix seconds, duration) of one of our Leases, or None."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    spec = obj.get("spec") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        return None
    name = meta.get("name")
    if not isinstance(name, str) or not name.startswith(LEASE_PREFIX) or len(name) == len(LEASE_PREFIX):
        return None
    holder = spec.get("holderIdentity")
    node = holder if isinstance(holder, str) and holder else name[len(LEASE_PREFIX):]
    renew, duration = spec.get("renewTime"), spec.get("leaseDurationSeconds")
    if not isinstance(renew, str) or isinstance(duration, bool) or not isinstance(duration, int) or duration < 1:
        return node, None, None, None
    try:
        at = datetime.datetime.fromisoformat(renew)
    except ValueError:
        return node, None, None, None
    if at.tzinfo is None:
        at = at.replace(tzinfo=datetime.timezone.utc)
    return node, renew, at.timestamp(), duration


class LeaseTracker:
    """The agents' Leases as this agent saw them: {node: (renewTime, duration,
    monotonic time it was seen renewed)}; fed by the watch, read by down()."""

    def __init__(self, clock=time.monotonic, wall=time.time):
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._seen = {}
        self.rejects = 0            # Leases of ours without a usable renewTime / duration

    def observe(self, obj):
        """An added or modified Lease."""
        parsed = _lease(obj)
        if parsed is None:
            return
        node, renew, at, duration = parsed
        now = self._clock()
        with self._lock:
            if renew is None:           # unreadable: judged as not renewed from now on
                self.rejects += 1
                old = self._seen.get(node)
                if old is None or old[0] is None:
                    self._seen[node] = ("", 1, now - 2)
                return
            old = self._seen.get(node)
            if old is None or old[0] is None:
                seen = now - max(0.0, self._wall() - at)     # first sighting: its wall-clock age
            elif old[0] != renew:
                seen = now
            else:
                seen = old[2]
            self._seen[node] = (renew, duration, seen)

    def deleted(self, obj):
        parsed = _lease(obj)
        if parsed is not None:
            with self._lock:
                if parsed[0] in self._seen:
                    self._seen[parsed[0]] = (None, 0, 0.0)

    def resync(self, objs):
        """A full list: every Lease in it observed, every other one seen before deleted."""
        present = set()
        for obj in objs:
            parsed = _lease(obj)
            if parsed is not None:
                present.add(parsed[0])
                self.observe(obj)
        with self._lock:
            for node in self._seen:
                if node not in present:
                    self._seen[node] = (None, 0, 0.0)

    def nodes(self) -> frozenset:
        """The nodes judged (a Lease of theirs was seen)."""
        with self._lock:
            return frozenset(self._seen)

    def down(self) -> frozenset:
        now = self._clock()
        with self._lock:
            return frozenset(n for n, (renew, duration, seen) in self._seen.items()
                             if renew is None or now - seen > duration)


class LeaseLiveness(LivenessProvider):
    """The down nodes of a LeaseTracker (KubernetesSource.liveness())."""

    def __init__(self, tracker: LeaseTracker):
        self.tracker = tracker

    def down(self):
        return self.tracker.down()


def _resource():
    from .kubernetes import _resources

    return _resources()["lease"]


def _say(src, what, exc):
    print(f"egresscore kubernetes {src.describe()}: {what}: {type(exc).__name__}: {exc}", file=sys.stderr,
          flush=True)


async def keep_lease(src, stop: threading.Event):
    """This node's Lease: created (or taken over), renewed every duration/3,
    deleted on stop; a failed renewal is said once and retried next period."""
    from lightkube import ApiError
    from lightkube.types import PatchType

    from .kubernetes import _sleep

    res, name, ns = _resource(), lease_name(src.node), src.lease_namespace
    client = src._client()
    exists, failing = False, False
    try:
        while not stop.is_set():
            spec = {"holderIdentity": src.node, "leaseDurationSeconds": src.lease_duration, "renewTime": micro_time()}
            try:
                if not exists:
                    obj = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                           "metadata": {"name": name, "namespace": ns, "labels": dict(LABELS)},
                           "spec": {**spec, "acquireTime": spec["renewTime"]}}
                    try:
                        await client.create(res(obj), namespace=ns)
                    except ApiError as exc:
                        if exc.status.code != 409:
                            raise
                        await client.patch(res, name, {"spec": spec}, namespace=ns, patch_type=PatchType.MERGE)
                    exists = True
                else:
                    await client.patch(res, name, {"spec": spec}, namespace=ns, patch_type=PatchType.MERGE)
                failing = False
            except Exception as exc:  # noqa: BLE001 - keep trying: the Lease expires meanwhile, as it should
                if isinstance(exc, ApiError) and exc.status.code == 404 and exists:
                    exists = False      # deleted under us: create it again at once
                    continue
                if not failing:
                    _say(src, f"cannot renew Lease {ns}/{name}", exc)
                failing = True
            await _sleep(stop, src.lease_duration / 3)
    finally:
        try:
            await asyncio.wait_for(client.delete(res, name, namespace=ns), 2)
        except Exception:  # noqa: BLE001 - best effort: otherwise it expires
            pass
        try:
            await client.close()
        except Exception:  # noqa: BLE001
            pass


async def watch_leases(src, tracker: LeaseTracker, stop: threading.Event):
    """List then watch the Leases of the namespace into `tracker` until stop;
    a failure backs off (doubling, capped) and relists."""
    from .kubernetes import _sleep

    res, ns = _resource(), src.lease_namespace
    client = src._client()
    failures = 0
    try:
        while not stop.is_set():
            waiter = asyncio.ensure_future(_sleep(stop, None))
            follow = asyncio.ensure_future(_follow(client, res, ns, tracker))
            try:
                done, _ = await asyncio.wait([waiter, follow], return_when=asyncio.FIRST_COMPLETED)
                if follow in done:
                    follow.result()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the last state stays in force; back off, relist
                if failures == 0:
                    _say(src, f"the Lease watch in {ns} failed", exc)
                await _sleep(stop, min(src.max_backoff, src.backoff * (2 ** failures)))
                failures += 1
            finally:
                for t in (waiter, follow):
                    t.cancel()
                await asyncio.gather(waiter, follow, return_exceptions=True)
    finally:
        try:
            await client.close()
        except Exception:  # noqa: BLE001
            pass


async def _follow(client, res, ns, tracker):
    items = []
    it = client.list(res, namespace=ns)
    async for obj in it:
        items.append(obj)
    try:
        version = it.resourceVersion
    except Exception:  # noqa: BLE001 - an empty list: no version
        version = None
    tracker.resync(items)
    async for typ, obj in client.watch(res, namespace=ns, resource_version=version):
        if typ == "DELETED":
            tracker.deleted(obj)
        elif typ in ("ADDED", "MODIFIED"):
            tracker.observe(obj)
    raise ConnectionError("the Lease watch ended")
