"""End to end (root): lab agents follow a live etcd; the source address each server sees follows it.

One lab (namespaces egc-lab-etcd-*) and one real etcd on 127.0.0.1 (the
lab's control plane); each node's in-process Agent is built on an
EtcdSource (`egresscore agent --source etcd://...` in-process).  Changes are
written with EtcdStore (what `egresscore apply`/`delete` use).
"""
import copy
import time

import pytest
import yaml
from conftest import needs_netns
from etcd_helper import server as EtcdServer

pytestmark = needs_netns
pytest.importorskip("etcd3gw")

SERVER, EGRESS_IP, MOVED_IP, NODE1 = "203.0.113.10", "192.168.1.3", "192.168.1.100", "192.168.1.1"


def _moved():
    from egresscore.lab.kernel import SAMPLE_POLICY

    doc = copy.deepcopy(SAMPLE_POLICY)
    doc["metadata"] = {"name": "moved"}
    doc["spec"]["destinationCIDRs"] = ["203.0.113.0/28"]
    doc["spec"].pop("excludedCIDRs", None)
    doc["spec"]["egressGateway"]["egressIP"] = MOVED_IP
    return doc


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from egresscore import Agent
    from egresscore.cluster import Cluster
    from egresscore.lab import Lab
    from egresscore.lab.kernel import SAMPLE_POLICY
    from egresscore.lab.offloads import prepare_lab
    from egresscore.sources.etcd import EtcdSource, EtcdStore

    etcd = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    try:
        with Lab(tag="etcd") as lab:
            prepare_lab(lab)
            lab.etcd = etcd
            lab.store = EtcdStore.from_url(etcd.url, cluster="lab")
            c = Cluster.from_dict(lab.cluster())
            lab.store.put_many([("nodes", n) for n in c.nodes.values()] + [("pods", p) for p in c.pods.values()]
                               + [("namespaces", n) for n in c.namespaces.values()]
                               + [("policies", SAMPLE_POLICY)])
            lab.agents = {}
            try:
                for name in lab.nodes:
                    # lease TTL 30 s: an agent refreshes (and puts a deleted key back) every 10 s, the
                    # window in which the lease test must see new connections go through node4
                    src = EtcdSource.from_url(etcd.url, cluster="lab", node=name, backoff=(0.1, 0.5), lease_ttl=30)
                    lab.agents[name] = Agent(name, source=src, netns=lab.nodes[name].ns)
                    lab.agents[name].start()
                lab.servers_ = lab.start_servers()
                yield lab
            finally:
                for a in lab.agents.values():
                    a.stop()
                    a.close()
    finally:
        etcd.stop()


def _converged(lab, want, src="10.0.1.93", dst=SERVER, timeout=10.0):
    """Wait until every agent's egress map gives `want` ((egress IP, gateway IP) or None) for src -> dst."""
    deadline = time.monotonic() + timeout
    while True:
        got = {}
        for name, a in lab.agents.items():
            e = a.egress_map.lookup(src, dst)
            got[name] = None if e is None else (str(e.egress_ip), str(e.gateway_ip))
        node1 = got["node1"]
        if (node1 if want is None else node1 and node1[1]) == (want if want is None else want[1]) and \
                (want is None or got["node3"] == want):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"agents did not converge on {want}: {got}")
        time.sleep(0.02)


def test_policy_apply_and_delete_follow_etcd(lab):
    assert lab.tcp_request("app1", SERVER) == EGRESS_IP
    lab.store.put("policies", _moved())
    _converged(lab, (MOVED_IP, EGRESS_IP))
    assert lab.tcp_request("app1", SERVER) == MOVED_IP
    assert lab.store.delete("policies", "moved")
    _converged(lab, (EGRESS_IP, EGRESS_IP))
    assert lab.tcp_request("app1", SERVER) == EGRESS_IP
    s = lab.agents["node1"].stats()["source"]
    assert s["name"] == "etcd" and s["connected"] and s["changes_applied"] >= 2 and s["objects_rejected"] == 0


def test_pod_label_change_follows_etcd(lab):
    from egresscore.cluster import Pod

    app1 = lab.agents["node1"].cluster.pods[("default", "app1")]
    lab.store.put("pods", Pod(app1.name, app1.namespace, app1.uid, {"app": "none"}, app1.ips, app1.node))
    _converged(lab, None)
    assert lab.tcp_request("app1", SERVER) == NODE1
    lab.store.put("pods", app1)
    _converged(lab, (EGRESS_IP, EGRESS_IP))
    assert lab.tcp_request("app1", SERVER) == EGRESS_IP


def test_etcd_down_keeps_forwarding_and_the_agents_converge_after(lab):
    lab.etcd.kill()
    deadline = time.monotonic() + 10
    while lab.agents["node1"].stats()["source"]["connected"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lab.agents["node1"].stats()["source"]["connected"]
    assert lab.tcp_request("app1", SERVER) == EGRESS_IP, "the state in force keeps forwarding"
    lab.etcd.start()
    lab.store.put("policies", _moved())
    _converged(lab, (MOVED_IP, EGRESS_IP), timeout=15)
    assert lab.tcp_request("app1", SERVER) == MOVED_IP
    s = lab.agents["node3"].stats()["source"]
    assert s["connected"] and s["disconnects"] == 1 and s["resyncs"] == 1, s
    lab.store.delete("policies", "moved")
    _converged(lab, (EGRESS_IP, EGRESS_IP))
    assert lab.store.live_nodes() >= {"node1", "node2", "node3"}


def test_a_malformed_object_is_rejected_alone_and_counted_once(lab, capfd):
    key = lab.store.key("policies", "egress-sample")
    lab.store.put_raw(key, b'{"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy",'
                           b' "metadata": {"name": "egress-sample"}, "spec": {"destinationCIDRs": ["x"]}}')
    deadline = time.monotonic() + 10
    while any(a.stats()["source"]["objects_rejected"] < 1 for a in lab.agents.values()):
        assert time.monotonic() < deadline, "not every agent counted the rejection"
        time.sleep(0.05)
    assert lab.tcp_request("app1", SERVER) == EGRESS_IP, "the last good version stays in force"
    err = capfd.readouterr().err
    assert err.count(f"{key} rejected") == len(lab.agents), err
    from egresscore.lab.kernel import SAMPLE_POLICY

    lab.store.put("policies", SAMPLE_POLICY)
    _converged(lab, (EGRESS_IP, EGRESS_IP))
    assert lab.agents["node1"].stats()["source"]["objects_rejected"] == 1


def test_a_gateway_whose_lease_key_is_gone_is_passed_over_although_its_probes_answer(lab):
    """Liveness from the store joins the probes (down when either says so):
    node3's key deleted, node1's agent passes node3 over for node4 (the HA
    policy's next gateway) while node3 still answers heartbeats; node3's agent
    puts its key back (within TTL/3) and new connections return to node3."""

    other = "198.51.100.10"
    with open("examples/egress-ha.yaml") as f:
        ha = yaml.safe_load(f)
    ha["spec"]["destinationCIDRs"] = ["198.51.100.0/24"]
    ha["spec"].pop("excludedCIDRs", None)
    node1 = lab.agents["node1"]

    def wait(cond, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    def through():
        try:
            return lab.tcp_request("app1", other)
        except Exception:   # a connection that met the policy half applied (node1 has it, node3 not yet)
            return None     # or node4 before its own view has node3 down: reset, and the next one is clean

    lab.store.put("policies", ha)
    try:
        wait(lambda: through() == "192.168.1.3", "the HA policy through node3")
        assert lab.store.delete_lease("node3")
        wait(lambda: "node3" in node1.gateway_health()["down"], "node3 down by liveness")
        # its probes still answer: down because of liveness (the row's reason follows the down set)
        wait(lambda: next(g for g in node1.gateway_health()["gateways"] if g["node"] == "node3")["why"] == "liveness",
             "node3's reason: liveness")
        wait(lambda: through() == "192.168.1.4", "new connections through node4")
        wait(lambda: "node3" in lab.store.live_nodes() and "node3" not in node1.gateway_health()["down"],
             "node3's agent put its key back", timeout=15.0)
        assert lab.tcp_request("app1", other) == "192.168.1.3"
    finally:
        lab.store.delete("policies", "egress-ha")
