"""LPM side by side: egresscore.LPMTrie against pytricia and py-radix, one run.

IPv4: 100,000 distinct random prefixes /8../32 (seed 1) plus a default route,
1,000,000 uniformly random lookups.  IPv6: 100,000 distinct random prefixes
/16../64 (seed 2), 1,000,000 uniformly random lookups, and 1,000,000 lookups
of addresses inside random stored prefixes (deep walks).  Rates are medians of several runs; per-call lookups
take address
strings (what a control plane holds); batch lookups take NumPy arrays.
Memory: RSS growth while building, and bytes/prefix for 1,000,000 IPv4
prefixes.  Run alone: python benchmarks/compare_lpm.py [--quick]
"""
import argparse
import gc
import ipaddress
import os
import statistics
import sys
import time

import numpy as np

try:
    import egresscore
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import egresscore

import pytricia
import radix

try:
    import ctypes
    _trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _trim = None


def rss_bytes():
    """Resident set size, after handing the allocator's free pages back (so
    garbage from building the inputs does not count against anyone)."""
    gc.collect()
    if _trim is not None:
        _trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def median_rate(fn, n, runs):
    """Operations per second of one core's CPU time (thread_time: the work
    runs in this thread, GIL released or not), median of `runs`, so other
    jobs on a shared machine do not count against anyone."""
    times = []
    for _ in range(runs):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return n / statistics.median(times)


def timed(fn):
    gc.collect()
    r0 = rss_bytes()
    t0 = time.thread_time()
    obj = fn()
    dt = time.thread_time() - t0
    gc.collect()
    return obj, dt, rss_bytes() - r0


def random_v4(rng, n):
    seen = set()
    nets, lens = [], []
    while len(seen) < n:
        k = n - len(seen)
        a = rng.integers(0, 2**32, k, dtype=np.uint64)
        plen = rng.integers(8, 33, k)
        a = (a >> (32 - plen).astype(np.uint64)) << (32 - plen).astype(np.uint64)
        for x, p in zip(a.tolist(), plen.tolist()):
            if (x, p) not in seen:
                seen.add((x, p))
                nets.append(x)
                lens.append(p)
    return np.array(nets, np.uint32), np.array(lens, np.uint8)


def random_v6(rng, n):
    seen = set()
    out = []
    while len(seen) < n:
        plen = int(rng.integers(16, 65))
        hi = int(rng.integers(0, 2**64, dtype=np.uint64)) >> (64 - plen) << (64 - plen)
        if (hi, plen) not in seen:
            seen.add((hi, plen))
            out.append((hi, plen))
    return out


def fmt_rate(r):
    return f"{r / 1e6:.2f} M/s" if r >= 1e5 else f"{r / 1e3:.1f} k/s"


def run(quick: bool = False) -> str:
    n_pfx = 10_000 if quick else 100_000
    n_look = 100_000 if quick else 1_000_000
    n_call = 50_000 if quick else 300_000
    runs = 3 if quick else 7
    n_big = 100_000 if quick else 1_000_000
    rng = np.random.default_rng(1)
    rows = []

    # ---- IPv4 ----
    nets, lens = random_v4(rng, n_pfx)
    strs = [f"{ipaddress.IPv4Address(int(a))}/{p}" for a, p in zip(nets.tolist(), lens.tolist())]
    strs.append("0.0.0.0/0")
    values = list(range(len(strs)))

    def build_eg():
        t = egresscore.LPMTrie(4)
        t.update(zip(strs, values))
        return t

    def build_pt():
        pt = pytricia.PyTricia(32)
        for s, v in zip(strs, values):
            pt.insert(s, v)
        return pt

    def build_rx():
        rt = radix.Radix()
        for s, v in zip(strs, values):
            rt.add(s).data["v"] = v
        return rt

    eg, eg_build, eg_rss = timed(build_eg)
    pt, pt_build, pt_rss = timed(build_pt)
    rx, rx_build, rx_rss = timed(build_rx)

    q = rng.integers(0, 2**32, n_look, dtype=np.uint64).astype(np.uint32)
    qs = [str(ipaddress.IPv4Address(x)) for x in q[:n_call].tolist()]
    # Same answers from all three before timing anything.
    v, f = eg.lookup_batch(q[:2000])
    for s, x in zip(qs[:2000], v.tolist()):
        assert pt.get(s) == x == rx.search_best(s).data["v"], s

    eg_batch = median_rate(lambda: eg.lookup_batch(q), n_look, runs)
    out = (np.empty(n_look, np.uint32), np.empty(n_look, np.bool_))
    eg_batch_out = median_rate(lambda: eg.lookup_batch(q, out=out), n_look, runs)
    look = eg.lookup
    eg_call = median_rate(lambda: [look(s) for s in qs], n_call, runs)
    get = pt.get
    pt_call = median_rate(lambda: [get(s) for s in qs], n_call, runs)
    best = rx.search_best
    rx_call = median_rate(lambda: [best(s) for s in qs], n_call, runs)

    # Single updates into the full table (the control plane's case).
    ups = [f"{ipaddress.IPv4Address(int(a) >> (32 - p) << (32 - p))}/{p}"
           for a, p in zip(rng.integers(0, 2**32, 500).tolist(), rng.integers(8, 33, 500).tolist())]

    def single(setter):
        ts = []
        for s in ups:
            t0 = time.thread_time_ns()
            setter(s)
            ts.append((time.thread_time_ns() - t0) / 1e9)
        return statistics.median(ts) * 1e6, sorted(ts)[int(len(ts) * 0.99)] * 1e6

    eg_up = single(lambda s: eg.__setitem__(s, 7))
    pt_up = single(lambda s: pt.insert(s, 7))
    rx_up = single(lambda s: rx.add(s))

    rows.append(("IPv4 lookups, batch (NumPy)", fmt_rate(eg_batch), "–", "–",
                 f"**{eg_batch / pt_call:.0f}x**"))
    rows.append(("IPv4 lookups, batch into reused arrays (out=)", fmt_rate(eg_batch_out), "–", "–",
                 f"**{eg_batch_out / pt_call:.0f}x**"))
    rows.append(("IPv4 lookups, per call (str)", fmt_rate(eg_call), fmt_rate(pt_call), fmt_rate(rx_call),
                 f"{eg_call / pt_call:.1f}x"))
    rows.append(("IPv4 build (s)", f"{eg_build:.2f}", f"{pt_build:.2f}", f"{rx_build:.2f}",
                 f"{pt_build / eg_build:.1f}x faster"))
    rows.append(("IPv4 RSS growth (MB)", f"{eg_rss / 2**20:.1f}", f"{pt_rss / 2**20:.1f}",
                 f"{rx_rss / 2**20:.1f}", f"{pt_rss / max(eg_rss, 1):.1f}x smaller"))
    rows.append(("IPv4 single insert, median / p99 (µs)", f"{eg_up[0]:.0f} / {eg_up[1]:.0f}",
                 f"{pt_up[0]:.1f} / {pt_up[1]:.1f}", f"{rx_up[0]:.1f} / {rx_up[1]:.1f}", ""))
    pt = rx = eg = None  # freed before the big tables (the lambdas above hold the names)
    gc.collect()

    # ---- IPv6 ----
    rng6 = np.random.default_rng(2)
    p6 = random_v6(rng6, n_pfx)
    strs6 = [f"{ipaddress.IPv6Address(hi << 64)}/{p}" for hi, p in p6]

    def build_eg6():
        t = egresscore.LPMTrie(6)
        t.update(zip(strs6, range(len(strs6))))
        return t

    def build_pt6():
        pt = pytricia.PyTricia(128)
        for i, s in enumerate(strs6):
            pt.insert(s, i)
        return pt

    eg6, eg6_build, eg6_rss = timed(build_eg6)
    pt6, pt6_build, pt6_rss = timed(build_pt6)
    # Uniformly random addresses (as the IPv4 case), and the harder case of
    # addresses inside random stored prefixes, which walk the deep /17../64
    # paths instead of ending near the top.
    uni = np.empty((n_look, 2), np.uint64)
    uni[:, 0] = rng6.integers(0, 2**64, n_look, dtype=np.uint64)
    uni[:, 1] = rng6.integers(0, 2**64, n_look, dtype=np.uint64)
    picks = rng6.integers(0, len(p6), n_look)
    his = np.array([p6[i][0] for i in picks.tolist()], dtype=np.uint64)
    plen = np.array([p6[i][1] for i in picks.tolist()], dtype=np.uint64)
    noise = rng6.integers(0, 2**63, n_look, dtype=np.uint64) >> (plen - np.uint64(1))
    inside = np.empty((n_look, 2), np.uint64)
    inside[:, 0] = his | noise
    inside[:, 1] = rng6.integers(0, 2**63, n_look, dtype=np.uint64)
    for label, keys in (("random", uni), ("inside stored prefixes", inside)):
        packed = keys.byteswap().view(np.uint8).reshape(n_look, 16)
        qs6 = [str(ipaddress.IPv6Address((int(h) << 64) | int(lo))) for h, lo in keys[:n_call].tolist()]
        v, f = eg6.lookup_batch(packed[:2000])
        for s, x, ok in zip(qs6[:2000], v.tolist(), f.tolist()):
            assert pt6.get(s) == (x if ok else None), s
        eg6_batch = median_rate(lambda: eg6.lookup_batch(packed), n_look, runs)
        look6 = eg6.lookup
        eg6_call = median_rate(lambda: [look6(s) for s in qs6], n_call, runs)
        get6 = pt6.get
        pt6_call = median_rate(lambda: [get6(s) for s in qs6], n_call, runs)
        rows.append((f"IPv6 lookups ({label}), batch ((N,16) uint8)", fmt_rate(eg6_batch), "–", "",
                     f"**{eg6_batch / pt6_call:.0f}x**"))
        rows.append((f"IPv6 lookups ({label}), per call (str)", fmt_rate(eg6_call), fmt_rate(pt6_call), "",
                     f"{eg6_call / pt6_call:.1f}x"))
    rows.append(("IPv6 build (s)", f"{eg6_build:.2f}", f"{pt6_build:.2f}", "", f"{pt6_build / eg6_build:.1f}x faster"))
    rows.append(("IPv6 RSS growth (MB)", f"{eg6_rss / 2**20:.1f}", f"{pt6_rss / 2**20:.1f}", "",
                 f"{pt6_rss / max(eg6_rss, 1):.1f}x smaller"))
    eg6 = pt6 = None
    gc.collect()

    # ---- memory at 1M IPv4 prefixes ----
    bnets, blens = random_v4(np.random.default_rng(3), n_big)
    bvals = np.arange(n_big, dtype=np.uint32)
    gc.collect()
    r0 = rss_bytes()
    t0 = time.thread_time()
    big = egresscore.LPMTrie(4)
    big.update_arrays(bnets, blens, bvals)
    big_build = time.thread_time() - t0
    big_rss = rss_bytes() - r0
    big_bytes = big.nbytes
    rows.append((f"{n_big:,} IPv4 prefixes: bytes/prefix (C heap / RSS)",
                 f"{big_bytes / n_big:.1f} / {big_rss / n_big:.1f}", "", "",
                 f"build {big_build:.2f} s (update_arrays)"))

    head = (f"LPM: {len(strs):,} IPv4 prefixes (/8-/32 + default), {n_pfx:,} IPv6 (/16-/64); "
            f"{n_look:,} batch and {n_call:,} per-call lookups; rates per CPU-second of one core, "
            f"median of {runs} runs\n\n")
    lines = ["| workload | egresscore | pytricia | py-radix | egresscore vs pytricia |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return head + "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small inputs, for a smoke run")
    print(run(quick=ap.parse_args().quick))
