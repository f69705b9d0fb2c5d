"""Flow-log cost, side by side in one run: new NAT flows with and without a
flow log attached (one start record each, written by C), draining the ring
into NumPy, and turning records into JSON lines (the Python sink stage).

    python benchmarks/compare_flowlog.py [--quick]
"""
import io
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import egresscore as ec  # noqa: E402
from egresscore.flowlog import JsonLinesSink, records_to_dicts  # noqa: E402

BATCH = 1024


def flows(n):
    rng = np.random.default_rng(7)
    arr = np.zeros(n, dtype=ec.NAT_TUPLE_DTYPE)
    arr["family"] = 4
    arr["proto"] = 17
    arr["sport"] = rng.integers(1024, 65535, n)
    arr["dport"] = 53
    src = rng.integers(0, 1 << 16, n)
    arr["src"][:, 0] = 10
    arr["src"][:, 2] = src >> 8
    arr["src"][:, 3] = src & 255
    arr["dst"][:, :4] = (203, 0, 113, 10)
    return arr


def new_flows(arr, log):
    n = len(arr)
    t = ec.NatTable([f"192.168.1.{100 + i}" for i in range(8)], capacity=n + 1, seed=1,
                    clock=lambda: 10.0)
    if log:
        t.flow_log = ec.FlowLog(n)
    ext = (np.arange(n) % 8).astype(np.uint16)
    lens = np.full(n, 100, dtype=np.uint32)
    out = np.zeros(n, dtype=ec.NAT_TUPLE_DTYPE)
    codes = np.zeros(n, dtype=np.uint8)
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        s = slice(i, i + BATCH)
        t.translate_batch(arr[s], ext[s], out=out[s], codes=codes[s], lens=lens[s])
    dt = time.perf_counter() - t0
    return dt, t


def run(quick=False):
    n = 100_000 if quick else 1_000_000
    reps = 3 if quick else 5
    arr = flows(n)
    plain, logged, drain, js = [], [], [], []
    for _ in range(reps):
        plain.append(n / new_flows(arr, False)[0])
        dt, t = new_flows(arr, True)
        logged.append(n / dt)
        t0 = time.perf_counter()
        recs = t.flow_log.drain()
        drain.append(len(recs) / (time.perf_counter() - t0))
        m = min(len(recs), 20_000)
        sink = JsonLinesSink(io.StringIO())
        t0 = time.perf_counter()
        sink.write(records_to_dicts(recs[:m], node="node3"))
        js.append(m / (time.perf_counter() - t0))
    p, lg = statistics.median(plain), statistics.median(logged)
    rows = [
        ("NAT new flows, no flow log (C)", p, "1.00x"),
        ("NAT new flows + start record (C)", lg, f"{lg / p:.2f}x"),
        ("drain ring -> NumPy records", statistics.median(drain), ""),
        ("records -> JSON lines (Python sink)", statistics.median(js), ""),
    ]
    out = [f"Flow log: {n:,} new UDP flows over 8 egress IPs, batches of {BATCH}, "
           f"median of {reps} runs; {platform.processor() or platform.machine()}, "
           f"Python {platform.python_version()}", "",
           "| stage | rate | vs. no flow log |", "|---|---:|---:|"]
    for name, rate, ratio in rows:
        out.append(f"| {name} | {rate / 1e6:.2f} M/s | {ratio} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
