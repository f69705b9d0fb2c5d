"""The files as a Source: a cluster file and policy files/folders, re-read on request (SIGHUP).

The same loading path as the agent's own (egresscore.inputs.load_inputs: all
or nothing): the first load is the snapshot, and every reload() that passes
is a new full snapshot (the sink reconciles to it; a file removed from a
policy folder removes its policies).  A reload that fails changes nothing:
the sink hears `rejected("files", InputError)` and the state in force stays.
The agent's default (`egresscore agent --cluster --policies`) keeps its
built-in file path (Agent.reload, SIGHUP, stats()["reloads"]); this class is
that behaviour behind the Source interface, for embedding.
"""
from __future__ import annotations

import os
import threading

from ..inputs import load_inputs
from .base import Snapshot, Source

__all__ = ["FilesSource"]


class FilesSource(Source):
    """FilesSource(cluster="cluster.yaml", policies=["policies/"])."""

    name = "files"

    def __init__(self, cluster, policies):
        self.cluster_path = os.fspath(cluster)
        self.policy_paths = [os.fspath(p) for p in ([policies] if isinstance(policies, (str, os.PathLike))
                                                    else policies)]
        self._reload = threading.Event()
        self.loads = 0

    def describe(self):
        return f"files {self.cluster_path} + {', '.join(self.policy_paths)}"

    def request_reload(self):
        """Async-signal-safe: re-read the files (SIGHUP)."""
        self._reload.set()

    def _snapshot(self):
        loaded = load_inputs(self.cluster_path, self.policy_paths)
        c = loaded.cluster
        self.loads += 1
        return Snapshot(tuple(c.nodes.values()), tuple(c.namespaces.values()), tuple(c.pods.values()),
                        tuple(loaded.policies), str(self.loads))

    def run(self, sink, stop):
        try:
            first = self._snapshot()
        except Exception as exc:  # noqa: BLE001 - a bad file at start: the agent does not start
            sink.disconnected(f"{self.describe()}: {exc}")
            return
        sink.resync(first)
        while not stop.is_set():
            if not self._reload.wait(0.2):
                continue
            self._reload.clear()
            try:
                snap = self._snapshot()
            except Exception as exc:  # noqa: BLE001 - all or nothing: the state in force stays
                sink.rejected("files", exc)
                continue
            sink.resync(snap)
