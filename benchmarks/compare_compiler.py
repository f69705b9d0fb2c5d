"""Control plane, side by side: egresscore's compiler against Cilium's loop in plain Python.

The peer ("reference") is Cilium's algorithm written plainly (every policy x
every endpoint, selectors evaluated each time), measured in the same run on the
same synthetic cluster (benchmarks/compiler_workload.py).  Incremental changes
are compared with the alternative of recompiling everything.

Run alone: python benchmarks/compare_compiler.py [--quick]
"""

import argparse
import gc
import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compiler_workload import make_cluster, make_policies, naive_compile  # noqa: E402

from egresscore.cluster import Pod  # noqa: E402
from egresscore.compiler import Compiler  # noqa: E402

try:
    from egresscore import EgressMap
except ImportError:
    EgressMap = None


def _median(fn, repeat):
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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


def run(quick: bool = False) -> str:
    n_pods, n_policies = (1_000, 20) if quick else (10_000, 100)
    repeat = 3 if quick else 5
    cluster, policies = make_cluster(n_pods), make_policies(n_policies)
    entries = len(Compiler(cluster, policies).desired)

    full = _median(lambda: Compiler(cluster, policies), repeat)
    ref = _median(lambda: naive_compile(cluster, policies), 1 if not quick else 2)
    rows = [("full compile (desired state)", full, ref, "reference compile")]
    if EgressMap is not None:
        with_map = _median(lambda: Compiler(cluster, policies, egress_map=EgressMap()), repeat)
        rows.append(("full compile into EgressMap", with_map, ref, "reference compile"))

    def changes(em, label):
        c = Compiler(cluster.copy(), policies, egress_map=em)
        pod = c.cluster.pods[sorted(c._pod_policies)[len(c._pod_policies) // 2]]
        ips = itertools.cycle([("10.250.0.1",), ("10.250.0.2",)])
        n = 200 if quick else 1000
        change = _per_op(lambda: c.upsert_pod(Pod(pod.name, pod.namespace, pod.uid, pod.labels, next(ips), pod.node)),
                         n)
        new = Pod("bench-new", pod.namespace, "bench-uid", pod.labels, ("10.251.0.1",), pod.node)
        add_remove = _per_op(lambda: (c.upsert_pod(new), c.remove_pod(new.namespace, new.name)), n)
        rows.append((f"one pod changes IP ({label})", change, full, "full recompile"))
        rows.append((f"one pod added + removed ({label})", add_remove, full, "full recompile"))

    changes(None, "desired state")
    if EgressMap is not None:
        changes(EgressMap(), "EgressMap updated in place")

    lines = [
        f"### Control plane: compile {n_pods:,} pods x {n_policies} policies ({entries:,} egress map entries)",
        "",
        f"median of {repeat} runs (reference: 1); targets: full compile <= 1 s, one pod change <= 1 ms; "
        "EgressMap rows include the map's own writes (a full compile publishes once per family)",
        "",
        "| operation | egresscore | peer | peer time | speed-up |",
        "|---|---|---|---|---|",
    ]
    for name, ours, theirs, peer in rows:
        ratio = theirs / ours
        lines.append(f"| {name} | {_fmt(ours)} | {peer} | {_fmt(theirs)} | "
                     f"{ratio:,.0f}x |" if ratio >= 10 else f"| {name} | {_fmt(ours)} | {peer} | {_fmt(theirs)} | "
                     f"{ratio:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, for a smoke run")
    args = parser.parse_args(argv)
    print(run(quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
