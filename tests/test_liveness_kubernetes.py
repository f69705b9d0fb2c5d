"""Liveness from Kubernetes Leases (egresscore.sources.k8s_lease), against kmock's emulator.

The source with `node` keeps its coordination.k8s.io/v1 Lease renewed (and
deletes it on stop); liveness() watches the others': a Lease not renewed
past its leaseDurationSeconds marks its node down, a renewal brings it back,
and the compiler then chooses the next gateway.  LeaseTracker's clock rules
(age from when a renewal was seen, not from the writer's clock) are checked
with a fake clock."""
import threading
import time

import pytest

pytest.importorskip("kmock", reason="the kubernetes source's tests need kmock (pip install kmock)")
pytest.importorskip("lightkube", reason="the kubernetes source needs lightkube (the kubernetes extra)")

import yaml  # noqa: E402
from k8s_emulator import Emulator  # noqa: E402
from lightkube import Client, KubeConfig  # noqa: E402
from lightkube.types import PatchType  # noqa: E402

from egresscore.cluster import Cluster, Interface, Node, Pod  # noqa: E402
from egresscore.compiler import Compiler  # noqa: E402
from egresscore.health import GatewayHealth  # noqa: E402
from egresscore.policy import parse_policy  # noqa: E402
from egresscore.sources.k8s_lease import LeaseTracker, micro_time  # noqa: E402
from egresscore.sources.kubernetes import KubernetesSource, _resources  # noqa: E402

LEASE = _resources()["lease"]
NS = "kube-node-lease"


class Sink:
    def resync(self, snapshot):
        pass

    def apply(self, changes):
        pass

    def disconnected(self, reason):
        pass

    def rejected(self, key, error):
        pass


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {pred}")


@pytest.fixture
def emulator():
    emu = Emulator()
    yield emu
    emu.close()


@pytest.fixture
def api(emulator):
    return Client(config=KubeConfig.from_dict(emulator.config_dict()))


@pytest.fixture
def start(emulator, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(emulator.config_dict()))
    running = []

    def start(**kw):
        src = KubernetesSource(str(kubeconfig), backoff=0.1, **kw)
        live = src.liveness()
        stop = threading.Event()
        t = threading.Thread(target=src.run, args=(Sink(), stop), daemon=True)
        t.start()
        running.append((t, stop))
        return src, live, lambda: (stop.set(), t.join(10))

    yield start
    for t, stop in running:
        stop.set()
        t.join(10)
        assert not t.is_alive(), "the source did not stop"


def lease(node, duration, renew=None):
    return LEASE({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                  "metadata": {"name": f"egresscore-{node}", "namespace": NS},
                  "spec": {"holderIdentity": node, "leaseDurationSeconds": duration,
                           "renewTime": renew or micro_time()}})


def renew(api, node):
    api.patch(LEASE, f"egresscore-{node}", {"spec": {"renewTime": micro_time()}}, namespace=NS,
              patch_type=PatchType.MERGE)


def get_lease(api, node):
    try:
        return api.get(LEASE, f"egresscore-{node}", namespace=NS)
    except Exception:  # noqa: BLE001 - absent
        return None


def test_the_agent_keeps_its_lease_renewed_and_deletes_it_on_stop(api, start):
    _, _, stop = start(node="node1", lease_duration=3)
    first = wait_for(lambda: get_lease(api, "node1"))
    spec = first["spec"]
    assert spec["holderIdentity"] == "node1" and spec["leaseDurationSeconds"] == 3
    assert first["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "egresscore"}
    wait_for(lambda: (get_lease(api, "node1") or {}).get("spec", {}).get("renewTime") != spec["renewTime"])
    stop()
    assert get_lease(api, "node1") is None


def test_a_lease_not_renewed_past_its_duration_is_down_and_renewal_brings_it_back(api, start):
    _, live, _ = start(node="node1", lease_duration=10)
    wait_for(lambda: "node1" in live.tracker.nodes())    # the watch sees the source's own Lease
    api.create(lease("node3", 2), namespace=NS)
    wait_for(lambda: "node3" in live.tracker.nodes())
    assert "node3" not in live.down()                   # just renewed
    wait_for(lambda: "node3" in live.down(), timeout=5)
    assert "node1" not in live.down()                # renewed by its source every 3.3 s
    renew(api, "node3")
    wait_for(lambda: "node3" not in live.down(), timeout=5)
    api.delete(LEASE, "egresscore-node3", namespace=NS)
    wait_for(lambda: "node3" in live.down(), timeout=5)


def test_a_stale_lease_at_start_is_down_at_once(api, start):
    api.create(lease("node4", 10, micro_time(time.time() - 3600)), namespace=NS)
    _, live, _ = start()
    wait_for(lambda: "node4" in live.down(), timeout=5)


def cluster():
    nodes = [Node("node1", {"name": "node1"}, "192.168.1.1", (Interface("eth0", ("192.168.1.1/24",)),), "eth0")]
    nodes += [Node(n, {"name": n, "egress-gateway": "true"}, ip, (Interface("eth0", (f"{ip}/24",)),), "eth0")
              for n, ip in (("node3", "192.168.1.3"), ("node4", "192.168.1.4"))]
    return Cluster(nodes=nodes, pods=[Pod("app1", "default", "u1", {"app": "app1"}, ("10.0.1.5",), "node1")])


HA = parse_policy({"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": {"name": "ha"},
                   "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
                            "destinationCIDRs": ["203.0.113.0/24"],
                            "egressGateway": {"nodeSelector": {"matchLabels": {"egress-gateway": "true"}},
                                              "interface": "eth0"}}})[0]


def gateway(compiler):
    return compiler.gateways("ha")[0].node


def test_the_compiler_chooses_the_next_gateway_when_a_lease_expires(api, start):
    compiler = Compiler(cluster(), [HA], node="node1")
    assert gateway(compiler) == "node3"
    api.create(lease("node3", 1), namespace=NS)
    api.create(lease("node4", 30), namespace=NS)
    _, live, _ = start()
    health = GatewayHealth(compiler.set_down, liveness=[live], interval=0.05).start()
    try:
        wait_for(lambda: gateway(compiler) == "node4", timeout=5)
        assert compiler.down == {"node3"}
        renew(api, "node3")
        wait_for(lambda: gateway(compiler) == "node3", timeout=5)
    finally:
        health.stop()


def test_tracker_ages_leases_on_its_own_clock():
    now = [1000.0]
    wall = [5000.0]
    t = LeaseTracker(clock=lambda: now[0], wall=lambda: wall[0])

    def obj(renew, duration=10, node="node3"):
        return {"metadata": {"name": f"egresscore-{node}"},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": duration, "renewTime": micro_time(renew)}}

    t.observe(obj(4996.0))                # first sighting: 4 s old by its renewTime
    now[0] += 5.5                          # 9.5 s since its renewal
    assert t.down() == set()
    now[0] += 0.6                          # 10.1 s
    assert t.down() == {"node3"}
    # the writer's clock is an hour behind: a change of renewTime is a renewal all the same
    t.observe(obj(1400.0))
    assert t.down() == set()
    t.observe(obj(1400.0))                 # the same renewTime again (a rewatch): no renewal
    now[0] += 10.5
    assert t.down() == {"node3"}
    # not ours, or malformed: not judged / not renewed
    t.observe({"metadata": {"name": "node7"}, "spec": {"holderIdentity": "node7"}})
    t.observe({"metadata": {"name": "egresscore-node8"}, "spec": {"renewTime": "yesterday"}})
    assert t.down() == {"node3", "node8"} and t.rejects == 1
    t.resync([obj(wall[0], node="node9")])     # node3 is gone from the list: deleted
    assert t.down() == {"node3", "node8"}


def test_the_agent_takes_the_sources_own_liveness_for_auto(tmp_path):
    from egresscore.agent import Agent
    from egresscore.health import StaticLiveness
    from egresscore.sources.files import FilesSource
    from egresscore.sources.k8s_lease import LeaseLiveness

    src = KubernetesSource(str(tmp_path / "kubeconfig"))
    static = StaticLiveness({"node9"})
    got = Agent._liveness_of(["auto", static], src, "node1")
    assert isinstance(got[0], LeaseLiveness) and got[1] is static
    assert src.node == "node1"                       # the source publishes this node's Lease
    assert Agent._liveness_of("auto", None, "node1") == []
    assert Agent._liveness_of("auto", FilesSource("examples/cluster.yaml", ["examples/egress-ha.yaml"]),
                              "node1") == []
    with pytest.raises(ValueError, match="'etcd' is not 'auto'"):
        Agent._liveness_of(["etcd"], src, "node1")
