"""Adoption of a NAT state file (issue 16): a 1M-connection table taken over by a new table, one run.

A table of capacity 1,000,000 in a state file on tmpfs (/dev/shm) is filled
with N connections (TCP, pods 10.x.y.z on random ports, 32 egress IPs,
SYN sent), then closed as a kill leaves it (the entries stay in the file;
the lock goes with the process).  A new NatTable on the same file adopts it:
every entry checked, the indexes, mappings, port bitmaps, wheel and free
list rebuilt.  Printed beside it, from the same run: creating an empty table
of the same capacity (in a file and in anonymous memory), and re-creating the
N connections by translating them into an empty table (what a restart
without state would have to do, if it even knew the flows).  Then every
connection is checked to translate to its old port.

    python benchmarks/compare_nat_state.py [--connections N] [--runs R]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from egresscore._core import NatTable, nat_tuples  # noqa: E402

CAPACITY = 1_000_000
EGRESS = [f"192.0.2.{i}" for i in range(1, 33)]   # 32 x 64512 ports: room for 1M pod endpoints


def flows(n, seed=16):
    rnd = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append((f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", int(rnd.integers(1024, 65535)),
                     f"203.0.113.{i % 200 + 1}", 443, "tcp", "S"))
    return nat_tuples(rows)


def fill(table, tuples, now):
    ext = np.arange(len(tuples), dtype=np.uint16) % len(EGRESS)
    out, codes = table.translate_batch(tuples, ext, now=now)
    assert not codes.any(), "filling refused flows"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=CAPACITY)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(base, f"egc-bench-{os.getpid()}.nat")
    kw = dict(capacity=CAPACITY, port_range=(1024, 65535))
    now = 100.0
    tuples = flows(args.connections)
    try:
        t = NatTable(EGRESS, state_path=path, clock=lambda: now, **kw)
        out = fill(t, tuples, now)
        del t
        adopt, results = [], None
        for _ in range(args.runs):
            t0 = time.perf_counter()
            t2 = NatTable(EGRESS, state_path=path, clock=lambda: now + 1, **kw)
            adopt.append((time.perf_counter() - t0) * 1e3)
            st = t2.state
            assert st["adopted"] and st["connections"] == args.connections, st
            results = st
            check = t2.translate_batch(tuples, np.arange(len(tuples), dtype=np.uint16) % len(EGRESS),
                                       now=now + 1)
            assert not check[1].any() and (check[0]["sport"] == out["sport"]).all(), "a port changed"
            del t2, check
        inner = results["adopt_ms"]
        fresh_file, fresh_mem, refill = [], [], []
        for _ in range(args.runs):
            p2 = path + ".fresh"
            t0 = time.perf_counter()
            t3 = NatTable(EGRESS, state_path=p2, clock=lambda: now, **kw)
            fresh_file.append((time.perf_counter() - t0) * 1e3)
            del t3
            os.unlink(p2)
            t0 = time.perf_counter()
            t4 = NatTable(EGRESS, clock=lambda: now, **kw)
            fresh_mem.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            fill(t4, tuples, now)
            refill.append((time.perf_counter() - t0) * 1e3)
            del t4
    finally:
        for p in (path, path + ".fresh", path + ".rejected"):
            if os.path.exists(p):
                os.unlink(p)
    med = statistics.median
    n = args.connections
    print(f"NAT state adoption, capacity {CAPACITY:,}, {n:,} connections, {args.runs} runs, file on {base}")
    print(f"  adopt (NatTable() on the file, total)     median {med(adopt):8.1f} ms   max {max(adopt):8.1f} ms"
          f"   {med(adopt) * 1e6 / n:6.1f} ns/connection")
    print(f"    of which check + rebuild (state adopt_ms, last run) {inner:8.1f} ms")
    print(f"  empty table, in a file                    median {med(fresh_file):8.1f} ms")
    print(f"  empty table, anonymous memory             median {med(fresh_mem):8.1f} ms")
    print(f"  re-translating the {n:,} flows (batch)   median {med(refill):8.1f} ms   "
          f"adoption takes {med(adopt) / med(refill):.2f}x its time")
    print("  every adopted connection translated to its old port: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
