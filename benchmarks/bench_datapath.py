"""pytest-benchmark suite of the fused Datapath, path by path (python -m pytest benchmarks/bench_datapath.py).

Per call: one batch of BATCH prebuilt frames through Datapath.process(), as
the agent feeds them (one clock reading per batch), for each path of
benchmarks/compare_datapath.py (pod to remote gateway, gateway SNAT, reply,
masquerade, no_nat_entry drop) at each number of flows, and the same call on
runts (the Python call floor).  Divide by BATCH (extra_info) for ns per
frame.  The workload checks every path's verdicts and counters before any
timing.  The side-by-side table (pipeline = path - floor, Mpps per core, the
old per-stage figures) is compare_datapath.py.
Set EGRESSCORE_BENCH_DP_FLOWS (comma-separated; default 1000,100000).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("dpkt")

import compare_datapath as cd

FLOWS = [int(x) for x in os.environ.get("EGRESSCORE_BENCH_DP_FLOWS", "1000,100000").split(",")]
PATH_IDS = ["to_gateway", "gateway_snat", "reply", "masquerade", "drop_no_nat_entry"]


@pytest.fixture(scope="module", params=FLOWS, ids=lambda n: f"{n}flows")
def workload(request):
    return cd.Workload(request.param)


def _batches(work):
    """A callable feeding the next BATCH frames of work on every call (cycling)."""
    chunks = [work[i:i + cd.BATCH] for i in range(0, len(work), cd.BATCH)]
    state = {"i": 0}

    def next_batch(dp):
        i = state["i"]
        state["i"] = (i + 1) % len(chunks)
        cd.feed(dp, chunks[i])
    return next_batch, len(chunks[0])


@pytest.mark.parametrize("path", cd.PATHS, ids=PATH_IDS)
def test_datapath_path(benchmark, workload, path):
    name, _, _, (verdict, reason), _ = path
    dp = workload.node_of(name)
    dp.reset_counters()
    next_batch, per_call = _batches(workload.work[name])
    benchmark(next_batch, dp)
    c = dp.counters()
    counted = {"tx": "tx", "drop": "dropped"}[verdict]
    assert c["rx"] == c[counted] > 0, c                     # the timed frames took the path
    assert c["drops"] == ({reason: c["rx"]} if verdict == "drop" else {}), c["drops"]
    benchmark.extra_info.update(frames_per_call=per_call, flows=workload.n)


@pytest.mark.parametrize("kind", ["pod", "underlay"])
def test_call_floor(benchmark, workload, kind):
    name = cd.PATHS[0][0] if kind == "pod" else cd.PATHS[1][0]
    dp = workload.node_of(name)
    dp.reset_counters()
    next_batch, per_call = _batches(workload.floor_of(name))
    benchmark(next_batch, dp)
    c = dp.counters()
    assert c["rx"] > 0 and c["tx"] == c["tx_local"] == 0, c   # runts: counted, nothing sent
    benchmark.extra_info.update(frames_per_call=per_call, flows=workload.n)
