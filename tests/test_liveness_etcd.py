"""Liveness from etcd leases (EtcdSource.liveness(): EtcdLiveness), against a real etcd.

Each agent's source keeps leases/<node> under a lease it refreshes; an agent
killed stops refreshing and etcd deletes the key when the lease expires, a
clean stop revokes it.  The source's one watch sees the key go: its node is
down, and the compiler (fed by GatewayHealth) chooses the next gateway of the
HA policy (node3, then node4, then none)."""
import threading
import time

import pytest
from etcd_helper import etcd_server  # noqa: F401 - the fixture

pytest.importorskip("etcd3gw")

from egresscore.agent.feed import CompilingSink  # noqa: E402
from egresscore.cluster import load_cluster  # noqa: E402
from egresscore.compiler import GATEWAY_NOT_FOUND  # noqa: E402
from egresscore.health import GatewayHealth  # noqa: E402
from egresscore.sources.etcd import EtcdSource, EtcdStore  # noqa: E402


class NullSink:
    def resync(self, snapshot):
        pass

    def apply(self, changes):
        pass

    def disconnected(self, reason):
        pass

    def rejected(self, key, error):
        pass


@pytest.fixture
def store(etcd_server):  # noqa: F811
    s = EtcdStore.from_url(etcd_server.url, cluster="lab")
    cluster = load_cluster("examples/cluster.yaml")
    s.put_many([("nodes", n) for n in cluster.nodes.values()] + [("pods", p) for p in cluster.pods.values()]
               + [("namespaces", ns) for ns in cluster.namespaces.values()])
    s.apply_file("examples/egress-ha.yaml")
    return s


@pytest.fixture
def run(etcd_server):  # noqa: F811
    running = []

    def start(node, sink=None):
        source = EtcdSource.from_url(etcd_server.url, cluster="lab", node=node)
        live = source.liveness()
        stop = threading.Event()
        t = threading.Thread(target=source.run, args=(sink or NullSink(), stop), daemon=True)
        t.start()
        running.append((stop, t))
        assert source.watching.wait(10), "no watch on etcd"
        return source, live, lambda: (stop.set(), t.join(10))

    yield start
    for stop, t in running:
        stop.set()
        t.join(10)
        assert not t.is_alive(), "the source thread did not stop"


def test_an_expired_or_revoked_lease_moves_the_gateway_to_the_next_node(store, run):
    sink = CompilingSink(node="node1")
    source, live, _ = run("node1", sink)
    _, _, stop_node4 = run("node4")
    # node3's agent: its lease, refreshed by hand here, so that the test can "kill" it
    lease = store.grant(2)
    store.put_lease("node3", lease)

    def set_down(down):
        with sink.lock:
            sink.compiler.set_down(down)

    def gateway():
        with sink.lock:
            return sink.compiler.gateways("egress-ha")[0]

    def wait(pred, timeout=15):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with sink.lock:
                if pred():
                    return
            time.sleep(0.02)
        raise AssertionError(f"not within {timeout} s: gateway {gateway()}, down {sorted(live.down())}")

    health = GatewayHealth(set_down, liveness=[live], interval=0.05).start()
    try:
        wait(lambda: source.live_nodes() >= {"node1", "node3", "node4"})
        # the health thread hands the down set on every 0.05 s: wait for it, do not race it
        wait(lambda: sink.compiler.gateways("egress-ha")[0].node == "node3")
        assert live.down() == {"node2"}                  # node2 runs no agent

        # killed: nobody refreshes node3's lease; etcd expires it (2 s) and deletes the key
        wait(lambda: sink.compiler.gateways("egress-ha")[0].node == "node4")
        assert gateway().gateway_ip == "192.168.1.4" and "node3" in live.down()

        # back: a new lease, a new key
        lease = store.grant(10)
        store.put_lease("node3", lease)
        wait(lambda: sink.compiler.gateways("egress-ha")[0].node == "node3")

        # a clean stop revokes at once
        store.revoke(lease)
        wait(lambda: sink.compiler.gateways("egress-ha")[0].node == "node4")
        stop_node4()
        wait(lambda: sink.compiler.gateways("egress-ha")[0].gateway_ip == GATEWAY_NOT_FOUND)
        assert {"node3", "node4"} <= live.down() and "node1" not in live.down()
    finally:
        health.stop()
