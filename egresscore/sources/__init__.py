"""Where the agent's cluster state comes from: files (the default), etcd, the Kubernetes API.

Every source speaks the one interface in `egresscore.sources.base`: a full
snapshot (on start and on every resync), then batches of changes, handed to a
`SourceSink` (the agent) from the source's own thread.
"""
from egresscore.sources.base import Change, Snapshot, Source, SourceSink

__all__ = ["Change", "Snapshot", "Source", "SourceSink"]
