"""NAT table side by side: egresscore.NatTable vs the pure-Python reference
model (egresscore/_natref.py), same flows, same run.

Workload: N live TCP connections from pods in 10.0.0.0/16 (random source
ports) to random remotes in 203.0.0.0/8:443, spread over 32 egress IPs with
the default port range 32768-65535.  Operations, in batches of BATCH tuples:
  new flows   translate_batch into an empty table until N connections live
  replies     reverse_batch of one reply per connection, random order
  known flows translate_batch of every original tuple again (hits)
  gc stall    one Datapath-sized gc call (GC_BUDGET entries examined) at N
              live connections in the worst case: every entry it examines is
              dead and collected, in random memory order (the table has
              churned): the longest the datapath thread waits in gc
Rates are operations per second of CPU time of the calling thread (this
machine is shared, so wall-clock rates also suffer from other processes;
both are printed) and the median of several runs.  The two sides take turns
in every repetition (a change in the machine's load hits both alike) and run
with Python's cyclic GC paused: with it on, the model's million new flows
trigger full collections of its ever larger heap, which halved its rate and
flattered the ratio (egresscore's table is one C allocation, the GC never
sees it).  Each repetition builds a fresh table, so new flows include the
first touch of its preallocated memory, as a gateway's first fill does.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import egresscore as ec  # noqa: E402
from egresscore._natref import NatRef, tuples_from_array  # noqa: E402

BATCH = 1024
N_EGRESS = 32
GC_BUDGET = 1024        # Datapath.gc's default (DP_GC_BUDGET)


def workload(n, seed=1):
    """Original tuples, per-tuple egress index, and the replies they expect."""
    rng = np.random.default_rng(seed)
    arr = np.zeros(n, dtype=ec.NAT_TUPLE_DTYPE)
    arr["family"] = 4
    arr["proto"] = 6
    arr["tcp_flags"] = 0x02
    arr["dport"] = 443
    # unique (pod, port): pods 10.0.x.y, ports 32768-65535
    ids = rng.choice(1 << 16 << 15, size=n, replace=False)
    pods = ids >> 15
    arr["sport"] = 32768 + (ids & 0x7FFF)
    arr["src"][:, 0] = 10
    arr["src"][:, 2] = pods >> 8
    arr["src"][:, 3] = pods & 255
    rem = rng.integers(0, 1 << 24, n)
    arr["dst"][:, 0] = 203
    arr["dst"][:, 1] = rem >> 16
    arr["dst"][:, 2] = (rem >> 8) & 255
    arr["dst"][:, 3] = rem & 255
    ext = (rng.integers(0, N_EGRESS, n)).astype(np.uint16)
    return arr, ext


def egress_ips():
    return [f"192.0.2.{i}" for i in range(1, N_EGRESS + 1)]


def replies_of(out, order):
    rep = np.zeros(len(out), dtype=ec.NAT_TUPLE_DTYPE)
    rep["family"] = out["family"]
    rep["proto"] = out["proto"]
    rep["tcp_flags"] = 0x12
    rep["src"] = out["dst"]
    rep["sport"] = out["dport"]
    rep["dst"] = out["src"]
    rep["dport"] = out["sport"]
    return rep[order].copy()


def _buffers(n):
    """Output arrays with their pages already faulted in, as a datapath's
    reused buffers are (np.zeros maps them lazily)."""
    out = np.empty(n, dtype=ec.NAT_TUPLE_DTYPE)
    codes = np.empty(n, np.uint8)
    out.view(np.uint8).fill(0)
    codes.fill(0)
    return out, codes


def _timed(fn):
    """(CPU seconds of this thread, wall seconds) of one call, the cyclic GC paused."""
    gc.collect()
    paused = gc.isenabled()
    gc.disable()
    try:
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        return time.thread_time() - c0, time.perf_counter() - w0
    finally:
        if paused:
            gc.enable()


def run_egresscore(arr, ext, order, capacity):
    n = len(arr)
    t = ec.NatTable(egress_ips(), capacity=capacity, seed=3, clock=lambda: 1000.0)
    out, codes = _buffers(n)
    sl = [slice(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]
    args = [(arr[s], ext[s], out[s], codes[s]) for s in sl]

    def fill():
        for a, e, o, c in args:
            t.translate_batch(a, e, out=o, codes=c)

    res = {"new flows": _timed(fill)}
    assert not codes.any(), np.bincount(codes)
    rep = replies_of(out, order)
    rout, rcodes = _buffers(n)
    rargs = [(rep[s], rout[s], rcodes[s]) for s in sl]

    def reverse():
        for r, o, c in rargs:
            t.reverse_batch(r, out=o, codes=c)

    res["replies"] = _timed(reverse)
    assert not rcodes.any() and (rout["dst"] == arr[order]["src"]).all()

    def known():
        for a, e, o, c in args:
            t.translate_batch(a, e, out=o, codes=c)

    res["known flows"] = _timed(known)
    assert t.stats["created"] == n and t.stats["hits"] == 2 * n
    return res, t.memory_bytes / capacity


def churned_table(arr, ext, order, capacity):
    """A table holding len(arr) connections at slots in random order (a first
    fill collected in `order`, then the same flows again), all created at
    t=1000 s: dead together 60 s later (tcp_syn)."""
    t = ec.NatTable(egress_ips(), capacity=capacity, seed=3)
    n = len(arr)
    out, codes = _buffers(n)
    sl = [slice(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]
    for s in sl:
        t.translate_batch(arr[s], ext[s], out=out[s], codes=codes[s], now=900.0)
    rep = replies_of(out, order)
    rout, rcodes = _buffers(n)
    for s in sl:                      # dead: each reply collects its entry
        t.reverse_batch(rep[s], out=rout[s], codes=rcodes[s], now=1000.0)
    assert len(t) == 0
    for s in sl:
        t.translate_batch(arr[s], ext[s], out=out[s], codes=codes[s], now=1000.0)
    assert not codes.any() and len(t) == n
    return t


def run_gc_stall(arr, ext, order, capacity, calls=200):
    """Wall-clock seconds of `calls` gc calls that each collect GC_BUDGET
    connections (and the entries left afterwards)."""
    t = churned_table(arr, ext, order, capacity)
    times = []
    for _ in range(calls):
        w0 = time.perf_counter()
        got = t.gc(GC_BUDGET, now=1061.0)
        times.append(time.perf_counter() - w0)
        assert got == GC_BUDGET
    return times


def run_reference(arr, ext, order, capacity):
    tuples = tuples_from_array(arr)
    exts = ext.tolist()
    m = NatRef([(4, bytes([192, 0, 2, i]) + bytes(12)) for i in range(1, N_EGRESS + 1)],
               [[(32768, 65535)] * 3] * N_EGRESS, capacity, 3)
    now = 1000 * 10**9
    res = {}
    outs = []
    res["new flows"] = _timed(lambda: outs.extend(m.translate_many(tuples, exts, now)))
    assert all(code == 0 for code, _ in outs)
    out_arr = np.zeros(len(arr), dtype=ec.NAT_TUPLE_DTYPE)
    for i, (_, o) in enumerate(outs):
        out_arr[i] = (o[0], o[1], o[2], 0, o[3], o[4], np.frombuffer(o[5], np.uint8),
                      np.frombuffer(o[6], np.uint8))
    rep = tuples_from_array(replies_of(out_arr, order))
    res["replies"] = _timed(lambda: m.reverse_many(rep, now))
    res["known flows"] = _timed(lambda: m.translate_many(tuples, exts, now))
    return res


def run(quick: bool = False) -> str:
    n = 100_000 if quick else 1_000_000
    reps = 3 if quick else 5
    capacity = n + n // 20
    arr, ext = workload(n)
    order = np.random.default_rng(2).permutation(n)
    ours, ref = [], []
    for _ in range(reps):  # alternating
        ours.append(run_egresscore(arr, ext, order, capacity))
        ref.append(run_reference(arr, ext, order, capacity))
    bytes_per_conn = ours[0][1]
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "n/a"
    stalls = [x for _ in range(reps) for x in run_gc_stall(arr, ext, order, capacity)]
    lines = [
        f"### NAT table: {n:,} live TCP connections, {N_EGRESS} egress IPs, batches of {BATCH}",
        "",
        f"Median of {reps} alternating runs, cyclic GC paused for both; rate = operations per CPU-second "
        f"of the calling thread (wall-clock rate in brackets; the machine is shared, load average {load} "
        f"on {os.cpu_count()} cores); ratio range = lowest and highest of the per-run ratios.",
        "",
        "| operation | egresscore.NatTable | pure-Python reference model | ratio | ratio range |",
        "|---|---:|---:|---:|---:|",
    ]
    for op in ("new flows", "replies", "known flows"):
        cpu = statistics.median(n / r[0][op][0] for r in ours)
        wall = statistics.median(n / r[0][op][1] for r in ours)
        rcpu = statistics.median(n / r[op][0] for r in ref)
        rwall = statistics.median(n / r[op][1] for r in ref)
        per_run = [r[op][0] / o[0][op][0] for o, r in zip(ours, ref)]
        lines.append(f"| {op} | {cpu / 1e6:.1f} M/s ({wall / 1e6:.1f}) | "
                     f"{rcpu / 1e6:.2f} M/s ({rwall / 1e6:.2f}) | {cpu / rcpu:.0f}x | "
                     f"{min(per_run):.0f}-{max(per_run):.0f}x |")
    stalls.sort()
    lines += [
        "",
        f"GC stall: one gc call examining {GC_BUDGET} connections, every one dead and "
        f"collected (worst case), at {n:,} live: median {statistics.median(stalls) * 1e6:.0f} us, "
        f"p99 {stalls[int(len(stalls) * 0.99)] * 1e6:.0f} us, max {stalls[-1] * 1e6:.0f} us "
        f"({len(stalls)} calls, wall clock).",
        "",
        f"Memory: {bytes_per_conn:.1f} bytes per connection at capacity {capacity:,} "
        f"(entries 80 B, mapping 28 B, three indexes 3 x 6 B, port maps of "
        f"{N_EGRESS} egress IPs), allocated at creation and backed by the kernel as used.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100k connections, fewer runs")
    quick = p.parse_args().quick
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compare import machine_summary

    print(machine_summary())
    print(run(quick=quick))
