"""The one interface between a cluster-state source and the agent.

A source runs on its own thread (`Source.run`), never on the datapath thread.
It hands the sink a full `Snapshot` first and after every reconnect (the sink
reconciles to it: whatever the snapshot lacks is removed), and then batches of
`Change`.  A source that loses its store calls `disconnected(reason)` and
keeps retrying with backoff; the state in force stays in force meanwhile.  An
object that fails to parse is reported with `rejected(key, error)` and is left
out alone: it never removes the state in force for other objects.
"""
from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from egresscore.cluster import Namespace, Node, Pod
from egresscore.policy import EgressPolicy

Kind = Literal["node", "namespace", "pod", "policy"]
Op = Literal["upsert", "delete"]


@dataclass(frozen=True)
class Change:
    """One add/update ("upsert") or delete of one object.

    `key` names the object in its kind: a node's name, a namespace's name, a
    pod's UID (Cilium keys endpoints by UID, so a recreated pod's late delete
    does not remove the new one) and a policy's name.  `obj` is the parsed
    object for an upsert and None for a delete.  `revision`: the store's
    version that made the change ("" when the source has none)."""

    kind: Kind
    op: Op
    key: str
    obj: Node | Namespace | Pod | EgressPolicy | None = None
    revision: str = ""


class Snapshot(NamedTuple):
    """The whole state of a source at one moment (`revision`: the store's own
    version of that moment, e.g. an etcd revision or a resourceVersion)."""

    nodes: tuple[Node, ...] = ()
    namespaces: tuple[Namespace, ...] = ()
    pods: tuple[Pod, ...] = ()
    policies: tuple[EgressPolicy, ...] = ()
    revision: str = ""


class SourceSink(Protocol):
    """What a source feeds (the agent; tests use a recording sink)."""

    def resync(self, snapshot: Snapshot) -> None:
        """Reconcile to `snapshot`: objects it lacks are removed."""

    def apply(self, changes: list[Change]) -> None:
        """Apply changes in order (all of one batch in one compile pass)."""

    def disconnected(self, reason: str) -> None:
        """The store was lost; the state in force is kept."""

    def rejected(self, key: str, error: Exception) -> None:
        """One object was malformed or too large and was left out."""

    def connected(self, revision: str) -> None:
        """Optional (sources call it when the sink has it): the store is
        reached again and followed from `revision` on, without a resync."""


class Source(abc.ABC):
    """A cluster-state source; `name` is "files", "etcd" or "kubernetes"."""

    name: str = "source"

    @abc.abstractmethod
    def run(self, sink: SourceSink, stop: threading.Event) -> None:
        """Feed `sink` until `stop` is set: a snapshot, then changes; on a lost
        connection, `disconnected`, backoff, and a fresh snapshot."""

    def describe(self) -> str:
        """Where the source reads from, for logs and `stats()`."""
        return self.name

    def liveness(self):
        """The agents' liveness as this store keeps it (a health.LivenessProvider
        over this source's own watch), or None: the store keeps none (files)."""
        return None
