"""Control plane, side by side: egresscore's compiler against Cilium's reconciliation in plain Python.

The peer is `cilium_reconcile` (benchmarks/compiler_workload.py): Cilium's
pkg/egressgateway reconcile after the k8s sync, step by step (every policy x
every endpoint, selectors evaluated each time, gateways regenerated, missing
entries written, then a pass that keeps only entries a policy still produces),
into a Python dict.  Both run on the same synthetic cluster, turn about in each
repetition (so a change in the machine's load hits both alike), with the
cyclic GC paused for both (egresscore's compiler pauses it itself).  A single
pod change is compared with what Cilium runs for one endpoint event: the same
whole reconcile, over a map that already holds every entry.

Run alone: python benchmarks/compare_compiler.py [--quick]
"""

import argparse
import gc
import itertools
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's egresscore, not an installed one

from compiler_workload import cilium_reconcile, make_cluster, make_policies  # noqa: E402

from egresscore.cluster import Pod  # noqa: E402
from egresscore.compiler import Compiler  # noqa: E402

try:
    from egresscore import EgressMap
except ImportError:
    EgressMap = None


def _timed(fn):
    """Seconds of one call, the cyclic GC paused (as the compiler pauses it)."""
    gc.collect()
    paused = gc.isenabled()
    gc.disable()
    try:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    finally:
        if paused:
            gc.enable()


def _per_op(fn, n, repeat=5):
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n)
    return statistics.median(runs)


def _fmt(seconds):
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _ratio(theirs, ours):
    r = theirs / ours
    return f"{r:,.0f}x" if r >= 10 else f"{r:.2f}x"


def run(quick: bool = False) -> str:
    n_pods, n_policies = (1_000, 20) if quick else (10_000, 100)
    repeat = 3 if quick else 5
    cluster, policies = make_cluster(n_pods), make_policies(n_policies)
    desired = Compiler(cluster, policies).desired
    full_map = cilium_reconcile(cluster, policies)
    if full_map != desired:
        raise AssertionError("the peer and egresscore disagree on the egress map: the comparison would be void")

    sides = {"ours": lambda: Compiler(cluster, policies),
             "peer": lambda: cilium_reconcile(cluster, policies),
             "peer steady": lambda: cilium_reconcile(cluster, policies, dict(full_map))}
    if EgressMap is not None:
        sides["ours map"] = lambda: Compiler(cluster, policies, egress_map=EgressMap())
    times = {k: [] for k in sides}
    for _ in range(repeat):  # alternating, so load changes hit every side alike
        for k, fn in sides.items():
            times[k].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}

    peer_full = "Cilium reconcile, empty map"
    rows = [("full compile (desired state)", med["ours"], peer_full, med["peer"])]
    if EgressMap is not None:
        rows.append(("full compile into EgressMap", med["ours map"], peer_full, med["peer"]))

    def changes(em, label):
        c = Compiler(cluster.copy(), policies, egress_map=em)
        pod = c.cluster.pods[sorted(c._pod_policies)[len(c._pod_policies) // 2]]
        ips = itertools.cycle([("10.250.0.1",), ("10.250.0.2",)])
        n = 200 if quick else 1000
        change = _per_op(lambda: c.upsert_pod(Pod(pod.name, pod.namespace, pod.uid, pod.labels, next(ips), pod.node)),
                         n)
        new = Pod("bench-new", pod.namespace, "bench-uid", pod.labels, ("10.251.0.1",), pod.node)
        add_remove = _per_op(lambda: (c.upsert_pod(new), c.remove_pod(new.namespace, new.name)), n)
        peer = "Cilium reconcile, full map (per endpoint event)"
        rows.append((f"one pod changes IP ({label})", change, peer, med["peer steady"]))
        rows.append((f"one pod added + removed ({label})", add_remove, peer, med["peer steady"]))

    changes(None, "desired state")
    if EgressMap is not None:
        changes(EgressMap(), "EgressMap updated in place")

    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "n/a"
    lines = [
        f"### Control plane: compile {n_pods:,} pods x {n_policies} policies ({len(desired):,} egress map entries)",
        "",
        f"median of {repeat} alternating runs (min-max: egresscore {_fmt(spread['ours'][0])}-"
        f"{_fmt(spread['ours'][1])}, peer {_fmt(spread['peer'][0])}-{_fmt(spread['peer'][1])}); "
        f"load average {load} on {os.cpu_count()} cores; peer: Cilium's reconcile (pkg/egressgateway "
        "manager.go) in plain Python into a dict, same output checked; EgressMap rows include the map's own "
        "writes (a full compile publishes once per family)",
        "",
        "| operation | egresscore | peer | peer time | speed-up |",
        "|---|---|---|---|---|",
    ]
    for name, ours, peer, theirs in rows:
        lines.append(f"| {name} | {_fmt(ours)} | {peer} | {_fmt(theirs)} | {_ratio(theirs, ours)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, for a smoke run")
    args = parser.parse_args(argv)
    from compare import machine_summary

    print(machine_summary())
    print(run(quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
