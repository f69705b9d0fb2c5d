"""pytest-benchmark suite for the control plane: full compile and single changes.

Run: python -m pytest benchmarks/bench_compiler.py
Targets (issue 6): 10,000 pods x 100 policies compile in <= 1 s; one pod change <= 1 ms.
"""

import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compiler_workload import cilium_reconcile, make_cluster, make_policies  # noqa: E402

from egresscore.cluster import Pod  # noqa: E402
from egresscore.compiler import Compiler  # noqa: E402

try:
    from egresscore import EgressMap
except ImportError:  # the LPM core not built
    EgressMap = None


@pytest.fixture(scope="module")
def workload():
    return make_cluster(10_000), make_policies(100)


def test_compile_10k_pods_100_policies(benchmark, workload):
    cluster, policies = workload
    c = benchmark(Compiler, cluster, policies)
    assert len(c.desired) > 25_000


@pytest.mark.skipif(EgressMap is None, reason="egresscore.EgressMap not built")
def test_compile_into_egress_map(benchmark, workload):
    cluster, policies = workload
    c = benchmark(lambda: Compiler(cluster, policies, egress_map=EgressMap()))
    assert len(c.egress_map) == len(c.desired)


def test_cilium_reconcile_peer(benchmark, workload):
    """The peer: Cilium's reconcile in plain Python, into an empty map; same entries as the compiler."""
    cluster, policies = workload
    out = benchmark.pedantic(cilium_reconcile, args=(cluster, policies), rounds=2, iterations=1)
    assert out == Compiler(cluster, policies).desired


def _matched_pod(c):
    return c.cluster.pods[sorted(c._pod_policies)[len(c._pod_policies) // 2]]


TARGETS = ["desired", pytest.param("egressmap", marks=pytest.mark.skipif(EgressMap is None, reason="no EgressMap"))]


@pytest.mark.parametrize("target", TARGETS)
def test_single_pod_change(benchmark, workload, target):
    cluster, policies = workload
    c = Compiler(cluster.copy(), policies, egress_map=EgressMap() if target == "egressmap" else None)
    pod = _matched_pod(c)
    ips = itertools.cycle([("10.250.0.1",), ("10.250.0.2",)])

    def change():
        return c.upsert_pod(Pod(pod.name, pod.namespace, pod.uid, pod.labels, next(ips), pod.node))

    writes = benchmark(change)
    assert writes >= 6  # 3 entries removed, 3 written


@pytest.mark.parametrize("target", TARGETS)
def test_single_pod_add_remove(benchmark, workload, target):
    cluster, policies = workload
    c = Compiler(cluster.copy(), policies, egress_map=EgressMap() if target == "egressmap" else None)
    pod = _matched_pod(c)
    new = Pod("bench-new", pod.namespace, "bench-uid", pod.labels, ("10.251.0.1",), pod.node)

    def add_remove():
        c.upsert_pod(new)
        c.remove_pod(new.namespace, new.name)

    benchmark(add_remove)
