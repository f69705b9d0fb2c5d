"""The cost of per-policy counting (issue 15) in the fused Datapath, side by side in one run.

compare_datapath's workload (node1 with 50 pods, node3 their gateway, UDP
frames with a 64-byte payload, one per flow, flows in random order,
process_batch, CPU time of this thread) built twice: once with the egress
map entries carrying a policy id, as the compiler writes them (every frame
counted to its policy in C: packets and bytes by direction, connections
opened and live in the NAT table), and once with policy id 0 (nothing
counted per policy: the datapath's work before issue 15, apart from
copying the id out of the lookup).  The two are timed alternately, path by
path, and the median of several runs is compared.
"""
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import compare_datapath as cd  # noqa: E402 - after sys.path

COUNTED_PATHS = cd.PATHS[:3]   # the paths a policy's traffic takes: redirect, SNAT, reply


def workloads(n):
    out = {}
    for pid in (0, 1):
        cd.POLICY_ID = pid
        out[pid] = cd.Workload(n)
    cd.POLICY_ID = 1
    # the Workload's checks reset the counters path by path: count one SNAT
    # pass and one reply pass afresh on each gateway
    for pid, wl in out.items():
        dp = wl.dps["node3"]
        dp.reset_counters()
        for name in (cd.PATHS[1][0], cd.PATHS[2][0]):
            cd.feed_batch(dp, wl.packed[name])
    counted = out[1].dps["node3"].policy_counters()
    assert counted[1]["egress"]["packets"] == n and counted[1]["reply"]["packets"] == n, counted
    assert out[0].dps["node3"].policy_counters() == {}
    return out


def measure(wls, reps):
    runs = {(pid, name): [] for pid in wls for name, *_ in COUNTED_PATHS}
    for _ in range(reps):
        for name, *_ in COUNTED_PATHS:
            for pid, wl in wls.items():
                dp = wl.node_of(name)
                runs[(pid, name)].append(cd.cpu_seconds(cd.feed_batch, dp, wl.packed[name]) * 1e9 / wl.n)
    return {k: statistics.median(v) for k, v in runs.items()}


def run(quick=False):
    sizes = (1_000, 10_000) if quick else (1_000, 100_000)
    reps = 5 if quick else 15
    lines = [f"### Per-policy counting: process_batch ns per frame with and without it, median of {reps} runs",
             "", "| path | flows | policy id 0 (not counted) | policy id 1 (counted) | change |",
             "|---|---:|---:|---:|---:|"]
    for n in sizes:
        wls = workloads(n)
        measure(wls, 1)                            # warm up
        m = measure(wls, reps)
        for name, *_ in COUNTED_PATHS:
            a, b = m[(0, name)], m[(1, name)]
            lines.append(f"| {name} | {n:,} | {a:,.0f} | {b:,.0f} | {100 * (b - a) / a:+.1f}% |")
        del wls
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    from compare import machine_summary

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1k and 10k flows, fewer runs")
    quick = ap.parse_args().quick
    print(machine_summary())
    print(run(quick=quick))
