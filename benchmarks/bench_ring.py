"""pytest-benchmark: one batch of 1024 64-byte frames over a veth pair in
egc-ring-* namespaces, PacketRing against a plain AF_PACKET socket loop.

    python -m pytest benchmarks/bench_ring.py
"""
import os
import socket
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from egresscore import PacketRing  # noqa: E402
from egresscore._ringlab import frame, link_mac, plain_socket, veth_pair  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
BATCH = 1024


@pytest.fixture(scope="module")
def pair():
    with veth_pair() as (na, ia, nb, ib):
        ma, mb = link_mac(na, ia), link_mac(nb, ib)
        data = np.stack([np.frombuffer(frame(mb, ma, i, size=64), dtype=np.uint8) for i in range(BATCH)])
        yield {"na": na, "ia": ia, "nb": nb, "ib": ib, "data": data}


def test_tx_ring_batch(benchmark, pair):
    with PacketRing(pair["ia"], netns=pair["na"], rx=False, tx_frames=4096) as tx:
        assert benchmark(tx.send_batch, pair["data"]) == BATCH


def test_tx_plain_socket_batch(benchmark, pair):
    s = plain_socket(pair["na"], pair["ia"], 0)
    frames = [bytes(row) for row in pair["data"]]

    def loop():
        for f in frames:
            s.send(f)
    try:
        benchmark(loop)
    finally:
        s.close()


def test_rx_ring_batch(benchmark, pair):
    out = np.empty((BATCH, 128), dtype=np.uint8)
    lens = np.empty(BATCH, dtype=np.uint32)
    with PacketRing(pair["ib"], netns=pair["nb"], tx=False, retire_ms=1, batch=BATCH) as rx, \
            PacketRing(pair["ia"], netns=pair["na"], rx=False, tx_frames=4096) as tx:
        def fill():
            rx.drain(timeout=0)
            tx.send_batch(pair["data"])
            time.sleep(0.005)  # the block retires
            return (), {}

        def take():
            got = 0
            while got < BATCH:
                got += rx.recv_into(out[got:], lens[got:], timeout=0.1)
            return got
        assert benchmark.pedantic(take, setup=fill, rounds=50) == BATCH


def test_rx_plain_socket_batch(benchmark, pair):
    s = plain_socket(pair["nb"], pair["ib"], 0x88B5)
    s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
    buf = bytearray(2048)
    with PacketRing(pair["ia"], netns=pair["na"], rx=False, tx_frames=4096) as tx:
        def fill():
            tx.send_batch(pair["data"])
            time.sleep(0.005)
            return (), {}

        def take():
            for _ in range(BATCH):
                s.recv_into(buf)
            return BATCH
        try:
            benchmark.pedantic(take, setup=fill, rounds=50)
        finally:
            s.close()
