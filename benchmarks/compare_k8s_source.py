"""The Kubernetes source against kmock's Kubernetes emulator (on 127.0.0.1):
a functional comparison only, not an API server's figures.

Measures, side by side in one run: a relist of N pods by the source (lightkube
lists + conversion to egresscore's types + the snapshot) against the peer, the
same lightkube lists bare (no conversion); the time from starting a source to
its snapshot at the sink; and the time from a pod's
create request (sent over HTTP to the emulator) to its upsert reaching the
sink through the source's watch (median, p99).

    python benchmarks/compare_k8s_source.py [--pods 1000] [--events 200]
"""
import argparse
import asyncio
import os
import platform
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from k8s_emulator import Emulator  # noqa: E402
from lightkube import ALL_NS, Client, KubeConfig  # noqa: E402

from egresscore.sources.kubernetes import KubernetesSource, _resources  # noqa: E402


def pod(i):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"web-{i}", "namespace": f"ns{i % 10}", "uid": f"uid-{i}",
                         "labels": {"app": f"app{i % 50}", "pod-template-hash": "5d9f"}},
            "spec": {"nodeName": f"node{i % 20}", "serviceAccountName": "default"},
            "status": {"phase": "Running", "podIPs": [{"ip": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"}]}}


class Sink:
    def __init__(self):
        self.cond = threading.Condition()
        self.snapshots = []
        self.seen = {}

    def resync(self, snapshot):
        with self.cond:
            self.snapshots.append((time.perf_counter(), snapshot))
            self.cond.notify_all()

    def apply(self, changes):
        now = time.perf_counter()
        with self.cond:
            for c in changes:
                self.seen.setdefault(c.key, now)
            self.cond.notify_all()

    def disconnected(self, reason):
        print("disconnected:", reason, file=sys.stderr)

    def rejected(self, key, error):
        print("rejected:", key, error, file=sys.stderr)

    def wait(self, pred, timeout=120):
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                raise TimeoutError("the source did not deliver in time")


async def list_side_by_side(config, res, n):
    """Best of 3, one warm client: the source's relist (four lists, each object
    converted, the snapshot) against the peer, the same four lists bare."""
    from lightkube import AsyncClient

    client = AsyncClient(config=config)
    src = KubernetesSource(config=config)
    ours, peer = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        snap = await src._list_all(client, res, Sink())
        ours.append(time.perf_counter() - t0)
        assert len(snap.pods) == n
        t0 = time.perf_counter()
        count = 0
        for kind in ("node", "namespace", "pod", "policy"):
            kw = {"namespace": ALL_NS} if kind == "pod" else {}
            async for _ in client.list(res[kind], chunk_size=500, **kw):
                count += 1
        peer.append(time.perf_counter() - t0)
        assert count == n
    await client.close()
    return min(ours), min(peer)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--events", type=int, default=200)
    args = ap.parse_args()
    emu = Emulator()
    res = _resources()
    config = KubeConfig.from_dict(emu.config_dict())
    client = Client(config=config)
    try:
        t0 = time.perf_counter()
        for i in range(args.pods):
            client.create(res["pod"](pod(i)))
        load = time.perf_counter() - t0

        lists = asyncio.run(list_side_by_side(config, res, args.pods))

        starts = []
        for _ in range(3):
            sink, stop = Sink(), threading.Event()
            src = KubernetesSource(config=config)
            t0 = time.perf_counter()
            th = threading.Thread(target=src.run, args=(sink, stop), daemon=True)
            th.start()
            sink.wait(lambda: sink.snapshots)
            starts.append(sink.snapshots[0][0] - t0)
            assert len(sink.snapshots[0][1].pods) == args.pods
            stop.set()
            th.join(10)

        # watch latency: one source running; the emulator's watch first replays every pod as ADDED
        sink, stop = Sink(), threading.Event()
        src = KubernetesSource(config=config)
        th = threading.Thread(target=src.run, args=(sink, stop), daemon=True)
        th.start()
        sink.wait(lambda: len(sink.seen) >= args.pods)
        lat, rtt = [], []
        for j in range(args.events):
            i = args.pods + j
            t0 = time.perf_counter()
            client.create(res["pod"](pod(i)))
            rtt.append((time.perf_counter() - t0) * 1e3)
            sink.wait(lambda: f"uid-{i}" in sink.seen, timeout=10)
            lat.append((sink.seen[f"uid-{i}"] - t0) * 1e3)
        stop.set()
        th.join(10)
    finally:
        emu.close()
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"# {platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"kmock emulator on 127.0.0.1 (not an API server)")
    print(f"loaded {args.pods} pods over HTTP in {load:.2f} s")
    ours, peer = lists
    print(f"relist {args.pods} pods (4 kinds, one warm client, best of 3): source (list + convert + snapshot) "
          f"{ours * 1e3:.1f} ms, peer bare lightkube lists {peer * 1e3:.1f} ms, ratio {ours / peer:.2f}x")
    print(f"source start -> snapshot at the sink (new client, thread, loop): best of 3 {min(starts) * 1e3:.1f} ms")
    print(f"watch: create request -> upsert at the sink, {args.events} pods: median {statistics.median(lat):.2f} ms, "
          f"p99 {p99:.2f} ms, max {lat[-1]:.2f} ms")
    rtt.sort()
    print(f"peer: the create request's own round trip to the emulator: median {statistics.median(rtt):.2f} ms, "
          f"p99 {rtt[min(len(rtt) - 1, int(len(rtt) * 0.99))]:.2f} ms "
          f"(the emulator emits the watch event while it serves the create)")


if __name__ == "__main__":
    main()
