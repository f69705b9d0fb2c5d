"""The etcd source against a real etcd v3 server (127.0.0.1, free ports, temp dir; see etcd_helper).

Each test writes with EtcdStore (the API behind `egresscore apply`), follows
with an EtcdSource feeding a compile-only sink (a Compiler over a real
EgressMap), and checks the egress map the datapath would read.
"""
import threading

import pytest
from etcd_helper import (
    EtcdServer,
    etcd_server,  # noqa: F401 - the fixture
)

pytest.importorskip("etcd3gw")

from egresscore.agent.feed import CompilingSink, Feed, SourceRunner, SourceStartError  # noqa: E402
from egresscore.cluster import Cluster, Pod, load_cluster  # noqa: E402
from egresscore.compiler import Compiler  # noqa: E402
from egresscore.sources.base import Change  # noqa: E402
from egresscore.sources.etcd import EtcdSource, EtcdStore  # noqa: E402
from egresscore.sources.objects import MAX_OBJECT_BYTES, ObjectError  # noqa: E402

APP1, SERVER = "10.0.1.93", "203.0.113.10"
POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": {"name": "egress-sample"},
    "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
             "destinationCIDRs": ["203.0.113.0/24"],
             "egressGateway": {"nodeSelector": {"matchLabels": {"node.kubernetes.io/name": "node3"}},
                               "egressIP": "192.168.1.3"}},
}


def _policy(name, app="app1", cidr="203.0.113.0/24", egress_ip="192.168.1.3", node="node3"):
    doc = {**POLICY, "metadata": {"name": name}}
    doc["spec"] = {**POLICY["spec"], "selectors": [{"podSelector": {"matchLabels": {"app": app}}}],
                   "destinationCIDRs": [cidr],
                   "egressGateway": {"nodeSelector": {"matchLabels": {"node.kubernetes.io/name": node}},
                                     "egressIP": egress_ip}}
    return doc


def _egress(sink, src=APP1, dst=SERVER):
    e = sink.egress_map.lookup(src, dst)
    return None if e is None else (str(e.egress_ip), str(e.gateway_ip))


@pytest.fixture
def store(etcd_server):  # noqa: F811
    s = EtcdStore.from_url(etcd_server.url, cluster="lab")
    cluster = load_cluster("examples/cluster.yaml")
    s.put_many([("nodes", n) for n in cluster.nodes.values()] + [("pods", p) for p in cluster.pods.values()]
               + [("namespaces", ns) for ns in cluster.namespaces.values()] + [("policies", POLICY)])
    return s


@pytest.fixture
def follow(etcd_server):  # noqa: F811
    """follow(**source options) -> (sink, source): an EtcdSource running on its thread, stopped after."""
    running = []

    def start(**kw):
        sink = CompilingSink(node=kw.pop("view", None))
        source = EtcdSource.from_url(etcd_server.url, cluster="lab", **kw)
        stop = threading.Event()
        t = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
        t.start()
        running.append((stop, t))
        assert sink.wait(lambda: sink.version > 0), "no snapshot from etcd"
        assert source.watching.wait(10), "no watch on etcd"
        return sink, source

    yield start
    for stop, t in running:
        stop.set()
        t.join(10)
        assert not t.is_alive(), "the source thread did not stop"


def test_snapshot_then_watch_of_each_kind(store, follow):
    sink, source = follow()
    c = sink.compiler.cluster
    assert set(c.nodes) == {"node1", "node2", "node3", "node4"} and c.pods.named("default", "app1")
    assert [p.name for p in sink.compiler.policies] == ["egress-sample"]
    assert _egress(sink) == ("192.168.1.3", "192.168.1.3")
    assert sink.stats.snapshot()["resyncs"] == 1 and source.revision == store.revision()

    # pod add / remove
    store.put("pods", Pod("app1b", "default", "u-app1b", {"app": "app1"}, ("10.0.2.50",), "node2"))
    assert sink.wait(lambda: _egress(sink, "10.0.2.50") == ("192.168.1.3", "192.168.1.3"))
    assert store.delete("pods", "app1b", "default")
    assert sink.wait(lambda: _egress(sink, "10.0.2.50") is None)
    # label change: app1 relabelled out of the policy, then back
    store.put("pods", Pod("app1", "default", "6f1c2a4e-0d3b-4c1e-9a53-5d2f7b8e1a01", {"app": "other"},
                          (APP1,), "node1"))
    assert sink.wait(lambda: _egress(sink) is None)
    store.put("pods", Pod("app1", "default", "6f1c2a4e-0d3b-4c1e-9a53-5d2f7b8e1a01", {"app": "app1"},
                          (APP1,), "node1"))
    assert sink.wait(lambda: _egress(sink) is not None)
    # namespace label change is seen by a namespaceSelector policy
    ns_policy = _policy("by-ns", cidr="198.51.100.0/24")
    ns_policy["spec"]["selectors"] = [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]
    store.put("policies", ns_policy)
    store.put("namespaces", {"name": "default", "labels": {"team": "a"}})
    assert sink.wait(lambda: _egress(sink, APP1, "198.51.100.7") == ("192.168.1.3", "192.168.1.3"))
    # policy apply / delete: a second policy moves app1's 203.0.113.0/25 to another egress IP
    store.put("policies", _policy("moved", cidr="203.0.113.0/25", egress_ip="192.168.1.100"))
    assert sink.wait(lambda: _egress(sink) == ("192.168.1.100", "192.168.1.3"))
    store.delete("policies", "moved")
    assert sink.wait(lambda: _egress(sink) == ("192.168.1.3", "192.168.1.3"))
    # node leave / join: the gateway node goes -> "no gateway" (0.0.0.0), comes back -> gateway again
    node3 = store.get("nodes")
    node3 = dict(next(d for k, d in node3 if k.endswith("/node3")))
    store.delete("nodes", "node3")
    assert sink.wait(lambda: _egress(sink) == ("0.0.0.0", "0.0.0.0"))
    store.put("nodes", node3)
    assert sink.wait(lambda: _egress(sink) == ("192.168.1.3", "192.168.1.3"))
    s = sink.stats.snapshot()
    assert s["resyncs"] == 1 and s["changes_applied"] == 10 and s["objects_rejected"] == 0
    assert int(s["last_revision"]) == store.revision()


def test_a_malformed_object_is_rejected_alone_with_its_key_and_field(store, follow):
    bad_key = store.key("policies", "broken")
    store.put_raw(bad_key, b'{"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy",'
                           b' "metadata": {"name": "broken"}, "spec": {"selectors": [],'
                           b' "destinationCIDRs": ["not-a-cidr"], "egressGateway": {"nodeSelector": {}}}}')
    sink, _ = follow()
    assert _egress(sink) == ("192.168.1.3", "192.168.1.3"), "the good policy must stay in force"
    (key, err), = sink.errors
    assert key == bad_key and "spec.destinationCIDRs[0]" in str(err) and "not-a-cidr" in str(err)
    # a bad update of a good object: the last good version stays, the others keep changing
    store.put_raw(store.key("pods", "app1", "default"), b"name: app1\nips: [10.0.1.999]\n")
    store.put("pods", Pod("app1c", "default", "u-c", {"app": "app1"}, ("10.0.3.7",), "node3"))
    assert sink.wait(lambda: _egress(sink, "10.0.3.7") is not None)
    assert _egress(sink) == ("192.168.1.3", "192.168.1.3")
    assert len(sink.errors) == 2 and "10.0.1.999" in str(sink.errors[1][1])
    assert sink.errors[1][0] == store.key("pods", "app1", "default")
    # a key outside the layout, and a document whose name differs from its key
    store.put_raw(store.root + "pods/only-a-name", b'{"name": "x"}')
    store.put_raw(store.key("nodes", "node9"), b'{"name": "node8"}')
    assert sink.wait(lambda: len(sink.errors) == 4)
    assert "layout pods/<namespace>/<name>" in str(sink.errors[2][1])
    assert "name" in str(sink.errors[3][1]) and "node8" in str(sink.errors[3][1])
    assert sink.stats.snapshot()["objects_rejected"] == 4


def test_an_oversized_object_is_refused(store, follow):
    big = _policy("big")
    big["metadata"]["annotations"] = {"x": "y" * MAX_OBJECT_BYTES}
    with pytest.raises(ObjectError, match="over the limit"):
        store.put("policies", big)
    with pytest.raises(ObjectError, match="spec.egressGateway"):
        store.put("policies", {**POLICY, "metadata": {"name": "nogw"},
                               "spec": {**POLICY["spec"], "egressGateway": None}})
    sink, _ = follow()
    store.put_raw(store.key("policies", "big"), b"{" + b" " * (MAX_OBJECT_BYTES + 1) + b"}")
    store.put("pods", Pod("app1d", "default", "u-d", {"app": "app1"}, ("10.0.3.8",), "node3"))
    assert sink.wait(lambda: _egress(sink, "10.0.3.8") is not None)
    (key, err), = sink.errors
    assert key.endswith("policies/big") and "over the limit" in str(err)


def test_compaction_while_disconnected_means_a_full_resync(store, follow):
    sink, source = follow(backoff=(0.2, 0.5))
    events = []

    def on_disconnect(reason, _orig=sink.disconnected):
        _orig(reason)
        if not events:  # while the source is away: changes, then the history compacted past them
            events.append(reason)
            store.delete("policies", "egress-sample")
            store.put("pods", Pod("late", "default", "u-late", {"app": "app1"}, ("10.0.2.60",), "node2"))
            store.compact()

    sink.disconnected = on_disconnect
    source._abort_watch()
    assert sink.wait(lambda: sink.stats.snapshot()["resyncs"] == 2, timeout=15)
    assert source.stats["compactions"] == 1
    assert _egress(sink) is None and sink.compiler.cluster.pods.named("default", "late")
    assert sink.compiler.policies == []


def test_etcd_killed_and_restarted_keeps_state_and_converges(store, follow, etcd_server):  # noqa: F811
    sink, source = follow(backoff=(0.1, 0.5), node="node1", lease_ttl=3)
    assert _egress(sink) is not None
    etcd_server.kill()
    assert sink.wait(lambda: not sink.stats.snapshot()["connected"], timeout=10)
    assert _egress(sink) == ("192.168.1.3", "192.168.1.3"), "the state in force stays while etcd is down"
    etcd_server.start()
    store.put("policies", _policy("after-restart", cidr="203.0.113.0/25", egress_ip="192.168.1.101"))
    assert sink.wait(lambda: _egress(sink) == ("192.168.1.101", "192.168.1.3"), timeout=15)
    s = sink.stats.snapshot()
    assert s["connected"] and s["disconnects"] == 1 and s["resyncs"] == 1, s
    assert source.stats["resumes"] == 1
    assert sink.wait(lambda: "node1" in store.live_nodes(), timeout=10)


def test_liveness_lease_per_node(store, follow):
    sink, source = follow(node="node2", lease_ttl=3)
    assert sink.wait(lambda: "node2" in store.live_nodes(), timeout=5)
    assert sink.wait(lambda: source.live_nodes() == {"node2"}, timeout=5)


def test_an_unreachable_store_at_start_is_an_error_naming_the_address(tmp_path):
    server = EtcdServer(tmp_path)  # never started: nothing listens on its port
    runner = SourceRunner(EtcdSource.from_url(server.url, cluster="lab", timeout=1.0))
    with pytest.raises(SourceStartError, match=f"127.0.0.1:{server.port}.*unreachable"):
        runner.start(timeout=5)


def test_apply_file_and_get(store, tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("---\n" + __import__("yaml").safe_dump(_policy("p-two", cidr="198.51.100.0/24")))
    keys = store.apply_file(str(path))
    assert keys == [store.key("policies", "p-two")]
    assert {k.rsplit("/", 1)[1] for k, _ in store.get("policies")} == {"egress-sample", "p-two"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(__import__("yaml").safe_dump(_policy("ok-one")) + "---\n"
                   + __import__("yaml").safe_dump({**_policy("bad-one"), "spec": {"selectors": []}}))
    with pytest.raises(ObjectError, match="bad-one"):
        store.apply_file(str(bad))
    assert "ok-one" not in {k.rsplit("/", 1)[1] for k, _ in store.get("policies")}, "all or nothing"


def test_a_late_delete_of_a_recreated_pod_keeps_the_new_one():
    cluster = load_cluster("examples/cluster.yaml")
    from egresscore.inputs import load_inputs

    feed = Feed(Compiler(cluster, load_inputs(policies=["examples/egress-sample.yaml"]).policies))
    old = cluster.pods[("default", "app1")]
    new = Pod(old.name, old.namespace, "new-uid", old.labels, old.ips, old.node)
    feed.apply(Change("pod", "upsert", new.uid, new))
    # pods are keyed by uid (as Cilium's endpoints): the late delete removes only the old pod
    assert feed.apply(Change("pod", "delete", old.uid)) is True
    assert [p.uid for p in feed.compiler.cluster.pods.named("default", "app1")] == ["new-uid"]
    assert (APP1, "203.0.113.0/24") in feed.compiler.desired
    assert feed.apply(Change("pod", "delete", old.uid)) is False  # and once more: unknown, nothing changes
    assert feed.apply(Change("pod", "delete", "new-uid")) is True
    assert (APP1, "203.0.113.0/24") not in feed.compiler.desired
    assert Cluster is not None
