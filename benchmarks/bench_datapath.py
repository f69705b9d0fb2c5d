"""pytest-benchmark suite of the fused Datapath, path by path (python -m pytest benchmarks/bench_datapath.py).

Per call: one pass of prebuilt frames through Datapath.process_batch (the
ring loop's per-batch step, no Python per frame; CALL frames a call), for
each path of benchmarks/compare_datapath.py (pod to remote gateway, gateway
SNAT, reply, masquerade, no_nat_entry drop, make-before-break, and the first
four again over IPv6) at each number of flows, and the
same frames through Datapath.process(), one Python call per frame (the old
figure).  Divide by frames_per_call (extra_info) for ns per frame.  The
workload checks every path's verdicts, outputs and counters, both ways, before
any timing.  The side-by-side table with the old per-stage figures is
compare_datapath.py.
Set EGRESSCORE_BENCH_DP_FLOWS (comma-separated; default 1000,100000).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("dpkt")

import compare_datapath as cd

FLOWS = [int(x) for x in os.environ.get("EGRESSCORE_BENCH_DP_FLOWS", "1000,100000").split(",")]
PATH_IDS = ["to_gateway", "gateway_snat", "reply", "masquerade", "drop_no_nat_entry", "to_gateway_mbb",
            "v6_to_gateway", "v6_gateway_snat", "v6_reply", "v6_masquerade"]


@pytest.fixture(scope="module", params=FLOWS, ids=lambda n: f"{n}flows")
def workload(request):
    return cd.Workload(request.param)


def _checked(benchmark, dp, path, n):
    c = dp.counters()
    _, _, _, (verdict, reason), _ = path
    counted = {"tx": "tx", "drop": "dropped"}[verdict]
    assert c["rx"] == c[counted] > 0 and c["tx_errors"] == 0, c     # the timed frames took the path
    assert c["drops"] == ({reason: c["rx"]} if verdict == "drop" else {}), c["drops"]
    benchmark.extra_info.update(frames_per_call=n)


@pytest.mark.parametrize("path", cd.PATHS, ids=PATH_IDS)
def test_datapath_batch(benchmark, workload, path):
    dp, pk = workload.node_of(path[0]), workload.packed[path[0]]
    dp.reset_counters()
    benchmark(cd.feed_batch, dp, pk)
    _checked(benchmark, dp, path, pk.n)
    benchmark.extra_info.update(flows=workload.n, frames_per_process_batch=cd.CALL)


@pytest.mark.parametrize("path", cd.PATHS, ids=PATH_IDS)
def test_datapath_process_per_frame(benchmark, workload, path):
    dp, work = workload.node_of(path[0]), workload.work[path[0]]
    dp.reset_counters()
    benchmark(cd.feed, dp, work)
    _checked(benchmark, dp, path, len(work))
    benchmark.extra_info.update(flows=workload.n)
