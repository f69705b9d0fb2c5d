"""What a compile-only agent's changes leave for the cyclic GC to scan, and what each change costs.

    python benchmarks/gc_tracked.py            # 10,000 pods, 1,000 policies, 100 changes
    python benchmarks/gc_tracked.py 100000 1000 400

One Compiler over a real EgressMap (the full compile frozen, as an agent's
resync is), then the changes of compare_store.py (half pod relabels, half
policy edits) applied straight to it; after a full collection, the objects
still tracked that were not before, by type: what every later collection
scans.  Also each change's time in the compiler (the policy parsed first,
not timed), by kind, p50 and max, with the collections that ran inside it.
"""
import collections
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_store import _policy, make_world  # noqa: E402
from egresscore._core import EgressMap  # noqa: E402

from egresscore.cluster import Cluster, Pod  # noqa: E402
from egresscore.compiler import Compiler  # noqa: E402
from egresscore.policy import parse_policy  # noqa: E402


def main(n_pods=10_000, n_policies=1000, n_changes=100):
    nodes, nss, pods, pols = make_world(1000, n_pods, n_policies)
    c = Compiler(Cluster(nodes, nss, pods), [parse_policy(p)[0] for p in pols], node="node0000",
                 egress_map=EgressMap())
    gc.collect()
    before = {id(o) for o in gc.get_objects()}
    times = {"pod": [], "policy": []}
    collections_in = []
    gc.callbacks.append(lambda phase, info: phase == "start" and collections_in.append(info["generation"]))
    for k in range(n_changes):
        if k % 2 == 0:
            i = (k * 7919) % n_pods
            p = pods[i]
            app = f"app{(i + 1 + k) % n_policies}"
            pod = Pod(p.name, p.namespace, p.uid, {"app": app, "tier": "web"}, p.ips, p.node)
            pods[i] = pod
            t = time.perf_counter()
            c.upsert_pod(pod)
            times["pod"].append((time.perf_counter() - t) * 1000)
        else:
            i = (k * 104729) % n_policies
            policy = parse_policy(_policy(i, i % 50, change=k))[0]
            t = time.perf_counter()
            c.upsert_policy(policy)
            times["policy"].append((time.perf_counter() - t) * 1000)
    gc.callbacks.pop()
    gc.collect()
    new = [o for o in gc.get_objects() if id(o) not in before]
    print(f"{n_pods:,} pods, {n_policies:,} policies, {gc.get_freeze_count():,} frozen by the full compile; "
          f"after {n_changes} changes and a full collection, {len(new):,} more objects tracked:")
    print("  " + ", ".join(f"{t} {n:,}" for t, n in collections.Counter(type(o).__name__ for o in new).most_common(8)))
    print("  each change in the compiler, p50 / max: " + "; ".join(
        f"{kind} changes {statistics.median(v):.2f} / {max(v):.2f} ms" for kind, v in times.items() if v)
        + "; collections during the changes, by generation: "
        + ", ".join(f"{g}: {collections_in.count(g)}" for g in range(3)))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
