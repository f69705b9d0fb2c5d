"""One round of an A/B of two builds: compare_datapath's paths through process_batch, one checkout's build.

Run it alternately on two checkouts (each with its own built egresscore/_core), so the
machine's load moves both alike; each call prints the median ns/frame of `reps` passes per
path (CPU time of this thread, as compare_datapath.py measures it):

    for r in 1 2 3 4 5; do for root in /path/to/main /path/to/branch; do
      python benchmarks/ab_datapath.py $root 1000 301; python benchmarks/ab_datapath.py $root 100000 9
    done; done

    python benchmarks/ab_datapath.py ROOT FLOWS REPS [PATH ...]   (default: the first three paths)
"""
import os
import statistics
import sys


def main():
    root, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sys.path[:0] = [os.path.join(root, "benchmarks"), root]
    os.chdir(root)
    import compare_datapath as cd
    wl = cd.Workload(n)
    names = sys.argv[4:] or [p[0] for p in cd.PATHS[:3]]
    for name in names:                              # warm
        cd.feed_batch(wl.node_of(name), wl.packed[name])
    runs = {name: [] for name in names}
    for _ in range(reps):
        for name in names:
            runs[name].append(cd.cpu_seconds(cd.feed_batch, wl.node_of(name), wl.packed[name]) * 1e9 / wl.n)
    for name in names:
        print(f"{name}\t{n}\t{statistics.median(runs[name]):.1f}")


if __name__ == "__main__":
    main()
