"""NAT table at scale: the reply lookup's cost at 1M and 16M live connections
(and beyond 16.7M when the build allows it), memory per connection, two
builds side by side in one run.

Workload: N live TCP connections, each from its own pod endpoint (10.x.y.z,
24-bit pod number, 128 ports each) to a random remote in 203.0.0.0/8:443,
over 512 egress IPs with the port range 1024-65535 (33M ports, so every
connection has its own mapping: the worst case for memory).  The table's
capacity is N + 5% (at most 16,777,214 when N is below it, the old limit, so
both builds hold the same table).  Measured: reverse_batch of one reply per connection in
random order, batches of 1024, CPU time of the calling thread, ns per reply;
the median of --runs fills.  memory_bytes / capacity is the table's memory
per connection: entries, mappings, the three indexes, the expiry wheel and
the port pools.

Each (build, size) measurement runs in its own process (a fresh address
space, the builds never share a process); the builds take turns in every
repetition.  `--peer DIR` is a directory holding another build's
`egresscore` package (for example a copy of main's, with its built _core
module); the build under test is this checkout's.

    python benchmarks/compare_nat_scale.py --peer /tmp/egc-base --sizes 1000000,16000000
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BATCH = 1024
N_EGRESS = 512


def child(n, runs):
    import gc

    import numpy as np

    import egresscore as ec

    gc.disable()
    i = np.arange(n, dtype=np.uint64)
    ids = (i * np.uint64(2654435761)) & np.uint64((1 << 31) - 1)     # a bijection of [0, 2**31)
    arr = np.zeros(n, dtype=ec.NAT_TUPLE_DTYPE)
    arr["family"] = 4
    arr["proto"] = 6
    arr["tcp_flags"] = 0x02
    arr["dport"] = 443
    pods = ids >> np.uint64(7)
    arr["sport"] = 32768 + (ids & np.uint64(127))
    arr["src"][:, 0] = 10
    arr["src"][:, 1] = pods >> np.uint64(16)
    arr["src"][:, 2] = (pods >> np.uint64(8)) & np.uint64(255)
    arr["src"][:, 3] = pods & np.uint64(255)
    rng = np.random.default_rng(1)
    rem = rng.integers(0, 1 << 24, n)
    arr["dst"][:, 0] = 203
    arr["dst"][:, 1] = rem >> 16
    arr["dst"][:, 2] = (rem >> 8) & 255
    arr["dst"][:, 3] = rem & 255
    ext = rng.integers(0, N_EGRESS, n).astype(np.uint16)
    order = rng.permutation(n)
    cap = n + n // 20
    if n <= 16_777_214 < cap:
        cap = 16_777_214        # the old build's limit: the same table for both
    res = {"ns": [], "fill_ns": []}
    for _ in range(runs):
        t = ec.NatTable([f"100.64.{k >> 8}.{k & 255}" for k in range(N_EGRESS)], capacity=cap,
                        port_range=(1024, 65535), seed=3, clock=lambda: 1000.0)
        out = np.zeros(n, dtype=ec.NAT_TUPLE_DTYPE)
        codes = np.zeros(n, np.uint8)
        c0 = time.thread_time()
        for s in range(0, n, BATCH):
            t.translate_batch(arr[s:s + BATCH], ext[s:s + BATCH], out=out[s:s + BATCH],
                              codes=codes[s:s + BATCH])
        res["fill_ns"].append((time.thread_time() - c0) / n * 1e9)
        assert not codes.any(), np.bincount(codes)
        rep = np.zeros(n, dtype=ec.NAT_TUPLE_DTYPE)
        rep["family"] = 4
        rep["proto"] = 6
        rep["tcp_flags"] = 0x10
        rep["src"] = out["dst"]
        rep["sport"] = out["dport"]
        rep["dst"] = out["src"]
        rep["dport"] = out["sport"]
        rep = rep[order]
        rout = np.zeros(n, dtype=ec.NAT_TUPLE_DTYPE)
        rcodes = np.zeros(n, np.uint8)
        c0 = time.thread_time()
        for s in range(0, n, BATCH):
            t.reverse_batch(rep[s:s + BATCH], out=rout[s:s + BATCH], codes=rcodes[s:s + BATCH])
        res["ns"].append((time.thread_time() - c0) / n * 1e9)
        assert not rcodes.any() and (rout["dst"] == arr["src"][order]).all()
        res["bpc"] = t.memory_bytes / cap
        del t, out, codes, rep, rout, rcodes
    print(json.dumps(res))


def measure(build, n, runs):
    env = dict(os.environ, PYTHONPATH=build, OPENBLAS_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n),
                        "--runs", str(runs)], env=env, capture_output=True, text=True, cwd="/")
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", action="append", default=[], metavar="[NAME=]DIR",
                    help="a directory holding a peer build's egresscore package (repeatable)")
    ap.add_argument("--this", default=ROOT,
                    help="directory holding the build under test (default: this checkout)")
    ap.add_argument("--sizes", default="1000000,16000000")
    ap.add_argument("--runs", type=int, default=3, help="fills per (build, size)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.runs)
        return
    sys.path.insert(0, HERE)
    from compare import machine_summary

    builds = [("this build", os.path.abspath(a.this))]
    for k, spec in enumerate(a.peer):
        name, _, path = spec.rpartition("=")
        builds.append((name or ("peer" if k == 0 else f"peer {k + 1}"), os.path.abspath(path)))
    sizes = [int(s) for s in a.sizes.split(",")]
    got = {}
    for n in sizes:
        for name, path in builds:
            got[name, n] = measure(path, n, a.runs)
    print(machine_summary())
    print(f"### NAT at scale: reply lookup, {N_EGRESS} egress IPs, batches of {BATCH}, "
          f"median of {a.runs} fills per cell, ns per reply (CPU time)")
    print()
    print("| connections | " + " | ".join(f"{nm}: ns/reply, B/conn, fill ns/conn" for nm, _ in builds)
          + " |")
    print("|---:|" + "---:|" * len(builds))
    for n in sizes:
        cells = []
        for name, _ in builds:
            r = got[name, n]
            if "error" in r:
                cells.append("refused: " + r["error"][:90])
            else:
                cells.append(f"{statistics.median(r['ns']):.1f} ({min(r['ns']):.1f}-{max(r['ns']):.1f}),"
                             f" {r['bpc']:.1f} B, {statistics.median(r['fill_ns']):.0f}")
        print(f"| {n:,} | " + " | ".join(cells) + " |")
    base = sizes[0]
    for name, _ in builds:
        for n in sizes[1:]:
            a0, a1 = got[name, base], got[name, n]
            if "error" not in a0 and "error" not in a1:
                print(f"\n{name}: reply cost at {n:,} / at {base:,} = "
                      f"{statistics.median(a1['ns']) / statistics.median(a0['ns']):.2f}x")


if __name__ == "__main__":
    main()
