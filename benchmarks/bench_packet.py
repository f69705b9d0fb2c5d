"""pytest-benchmark suite for the packet engine (python -m pytest benchmarks/bench_packet.py).

Per-operation cost of the single-frame Python functions and of the batch
steps on the gateway's reply path (VXLAN in, reverse SNAT, VXLAN out), with
the dpkt and scapy implementations of benchmarks/compare_packet.py beside
them.  The side-by-side table with ratios comes from compare_packet.py.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare_packet as cp  # noqa: E402

import egresscore  # noqa: E402

N = 1024


@pytest.fixture(scope="module")
def frames():
    return cp.make_frames(N)


@pytest.fixture
def batch(frames):
    return cp.egresscore_setup(frames)


def test_batch_relay(benchmark, batch):
    b, tmpl = batch
    benchmark(cp.egresscore_relay, b, tmpl)
    assert b.counts() == {}
    benchmark.extra_info["packets_per_call"] = N


def test_batch_three_steps(benchmark, batch):
    b, tmpl = batch
    benchmark(cp.egresscore_step, b, tmpl)
    assert b.counts() == {}
    benchmark.extra_info["packets_per_call"] = N


def test_batch_parse_only(benchmark, batch):
    b, _ = batch

    def parse():
        b.reset()
        b.parse()

    benchmark(parse)
    assert b.counts() == {}


def test_single_parse(benchmark, frames):
    benchmark(egresscore.parse, frames[0])


def test_single_decap_dnat_encap(benchmark, frames):
    _, tmpl = cp.egresscore_setup(frames[:1])
    benchmark(cp.egresscore_single, frames[:1], tmpl)


def test_dpkt_decap_dnat_encap(benchmark, frames):
    benchmark(cp.dpkt_pipeline, frames[:1])


def test_scapy_decap_dnat_encap(benchmark, frames):
    benchmark.pedantic(cp.scapy_pipeline, args=(frames[:1],), rounds=20)
