"""Contract tests of the Kubernetes source against kmock's Kubernetes emulator
(on 127.0.0.1): list, watch add/modify/delete of each kind, 410 Gone -> relist
-> reconcile, disconnect -> backoff -> resync, a malformed object rejected alone.

No real API server runs here; kmock's emulator stands in for it.  It serves
lists and watches from memory, ignores resourceVersion (each watch replays the
objects as ADDED, which the source's upserts absorb) and never answers 410 by
itself: the 410 test arms a kmock reaction that answers one watch with the
ERROR event (code 410) an API server sends for a too old resourceVersion."""
import threading
import time

import pytest

kmock = pytest.importorskip("kmock", reason="the kubernetes source's tests need kmock (pip install kmock)")
pytest.importorskip("lightkube", reason="the kubernetes source needs lightkube (the kubernetes extra)")

import yaml  # noqa: E402
from k8s_emulator import Emulator  # noqa: E402
from lightkube import Client, KubeConfig  # noqa: E402

from egresscore.cluster import ClusterError  # noqa: E402
from egresscore.policy import PolicyError  # noqa: E402
from egresscore.sources.kubernetes import KubernetesSource, _resources, convert  # noqa: E402

RES = _resources()


class RecordingSink:
    """Records what the source hands over; `wait(pred)` until it holds."""

    def __init__(self):
        self.events = []
        self.cond = threading.Condition()

    def _add(self, *event):
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def resync(self, snapshot):
        self._add("resync", snapshot, time.monotonic())

    def apply(self, changes):
        for c in changes:
            self._add("apply", c, time.monotonic())

    def disconnected(self, reason):
        self._add("disconnected", reason, time.monotonic())

    def rejected(self, key, error):
        self._add("rejected", (key, error), time.monotonic())

    def of(self, what):
        with self.cond:
            return [e[1] for e in self.events if e[0] == what]

    def wait(self, pred, timeout=10):
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self), timeout), self.events
            return list(self.events)


def node(name, ip, labels=None, cidrs=("10.0.1.0/24",)):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {"name": name}},
            "spec": {"podCIDRs": list(cidrs)},
            "status": {"addresses": [{"type": "Hostname", "address": name},
                                     {"type": "InternalIP", "address": "2001:db8::1"},
                                     {"type": "InternalIP", "address": ip}]}}


def pod(name, uid, ip, ns="default", labels=None, node_name="node1", **spec):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels or {"app": name}},
            "spec": {"nodeName": node_name, "serviceAccountName": "default", **spec},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def namespace(name, labels=None):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def policy(name, dst="203.0.113.0/24"):
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": {"name": name},
            "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "web"}}}], "destinationCIDRs": [dst],
                     "egressGateway": {"nodeSelector": {"matchLabels": {"name": "node1"}}}}}


KIND_OF = {"Node": "node", "Pod": "pod", "Namespace": "namespace", "CiliumEgressGatewayPolicy": "policy"}


@pytest.fixture
def emulator():
    emu = Emulator()
    yield emu
    emu.close()


class Api:
    """Writes to the emulator through its HTTP API (so watches see them), with lightkube."""

    def __init__(self, emu):
        self.client = Client(config=KubeConfig.from_dict(emu.config_dict()))

    def create(self, obj):
        self.client.create(RES[KIND_OF[obj["kind"]]](obj))

    def patch(self, kind, name, patch, namespace=None):
        self.client.patch(RES[kind], name, patch, namespace=namespace)

    def delete(self, kind, name, namespace=None):
        self.client.delete(RES[kind], name, namespace=namespace)


@pytest.fixture
def running(emulator, tmp_path):
    """Start a source (via a kubeconfig file) on a thread; yields (api, sink, source); stops and joins it."""
    threads = []
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(emulator.config_dict()))

    def start(**kw):
        sink = RecordingSink()
        src = KubernetesSource(str(kubeconfig), **kw)
        stop = threading.Event()
        t = threading.Thread(target=src.run, args=(sink, stop), daemon=True)
        t.start()
        threads.append((t, stop))
        return sink, src

    yield Api(emulator), start
    for t, stop in threads:
        stop.set()
        t.join(10)
        assert not t.is_alive(), "the source did not stop"


def changes(sink, kind=None):
    return [c for c in sink.of("apply") if kind is None or c.kind == kind]


def test_list_converts_every_kind(running):
    api, start = running
    api.create(node("node1", "192.168.1.1", {"name": "node1", "zone": "a"}))
    api.create(namespace("prod", {"env": "prod"}))
    api.create(pod("web-0", "uid-1", "10.0.1.5", ns="prod", labels={"app": "web"}, serviceAccountName="billing"))
    api.create(policy("egress-a"))
    sink, src = start()
    sink.wait(lambda s: s.of("resync"))
    snap = sink.of("resync")[0]
    (n,) = snap.nodes
    assert (n.name, n.internal_ip, n.pod_cidrs, n.labels) == ("node1", "192.168.1.1", ("10.0.1.0/24",),
                                                              {"name": "node1", "zone": "a"})
    (p,) = snap.pods
    assert (p.uid, p.name, p.namespace, p.ips, p.node, p.labels, p.service_account) == (
        "uid-1", "web-0", "prod", ("10.0.1.5",), "node1", {"app": "web"}, "billing")
    assert [(ns.name, ns.labels["env"]) for ns in snap.namespaces] == [("prod", "prod")]
    (pol,) = snap.policies
    assert pol.name == "egress-a" and pol.destination_cidrs == ("203.0.113.0/24",)
    assert src.resyncs == 1 and src.disconnects == 0 and sink.of("rejected") == []


@pytest.mark.parametrize("kind", ["node", "namespace", "pod", "policy"])
def test_watch_add_modify_delete(running, kind):
    api, start = running
    sink, src = start()
    sink.wait(lambda s: s.of("resync"))
    ns = "default" if kind == "pod" else None
    make = {"node": lambda: node("node9", "192.168.1.9"), "namespace": lambda: namespace("team"),
            "pod": lambda: pod("web-1", "uid-9", "10.0.1.9"), "policy": lambda: policy("egress-b")}[kind]
    obj = make()
    name = obj["metadata"]["name"]
    key = "uid-9" if kind == "pod" else name
    api.create(obj)
    sink.wait(lambda s: any(c.op == "upsert" and c.key == key for c in changes(s, kind)))
    patch = ({"spec": {"destinationCIDRs": ["198.51.100.0/24"]}} if kind == "policy"
             else {"metadata": {"labels": {"tier": "x"}}})
    api.patch(kind, name, patch, namespace=ns)

    def modified(s):
        for c in changes(s, kind):
            if c.op == "upsert" and c.key == key:
                if kind == "policy" and c.obj.destination_cidrs == ("198.51.100.0/24",):
                    return True
                if kind != "policy" and c.obj.labels.get("tier") == "x":
                    return True
        return False

    sink.wait(modified)
    api.delete(kind, name, namespace=ns)
    sink.wait(lambda s: any(c.op == "delete" and c.key == key for c in changes(s, kind)))
    assert sink.of("disconnected") == [] and src.resyncs == 1


def test_pod_that_is_no_endpoint_is_a_delete(running):
    api, start = running
    sink, _ = start()
    sink.wait(lambda s: s.of("resync"))
    api.create(pod("web-2", "uid-2", "10.0.1.2"))
    sink.wait(lambda s: any(c.key == "uid-2" and c.op == "upsert" for c in changes(s)))
    api.patch("pod", "web-2", {"status": {"phase": "Succeeded"}}, namespace="default")
    sink.wait(lambda s: any(c.key == "uid-2" and c.op == "delete" for c in changes(s)))
    api.create(pod("host-1", "uid-h", "192.168.1.1", hostNetwork=True))
    api.create(pod("after", "uid-a", "10.0.1.3"))
    sink.wait(lambda s: any(c.key == "uid-a" for c in changes(s)))
    assert [c.op for c in changes(sink) if c.key == "uid-h"] == ["delete"]  # never an upsert with the node's IP


def test_410_gone_relists_and_reconciles(emulator, running):
    api, start = running
    api.create(pod("web-0", "uid-1", "10.0.1.5"))
    api.create(pod("web-1", "uid-2", "10.0.1.6"))
    served = []

    def gone(request):
        # the event the source would have seen is lost (the store compacted past it) ...
        del emulator.kmock.objects[kmock.resource("v1/pods"), "default", "web-0"]
        served.append(dict(request.params))
        # ... and the watch from the old resourceVersion answers as the API server does
        return {"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                                            "reason": "Expired", "message": "too old resource version: 1 (5)"}}

    emulator.call(lambda: emulator.kmock["watch", kmock.resource("v1/pods")][:1] << gone)
    sink, src = start()
    sink.wait(lambda s: len(s.of("resync")) == 2)
    first, second = sink.of("resync")[:2]
    assert {p.uid for p in first.pods} == {"uid-1", "uid-2"}
    assert {p.uid for p in second.pods} == {"uid-2"}  # the relist: the sink reconciles uid-1 away
    assert served and served[0].get("resourceVersion")  # the watch resumed from the list's version
    assert sink.of("disconnected") == [] and src.disconnects == 0 and src.resyncs == 2


def test_disconnect_backs_off_keeps_state_and_resyncs(running, emulator):
    api, start = running
    api.create(pod("web-0", "uid-1", "10.0.1.5"))
    sink, src = start(backoff=0.2, max_backoff=0.4)
    sink.wait(lambda s: s.of("resync"))
    port = emulator.port
    emulator.close()  # the API server goes away
    sink.wait(lambda s: len(s.of("disconnected")) >= 3)
    assert len(sink.of("resync")) == 1  # nothing is reconciled while the store is gone
    times = [e[2] for e in sink.events if e[0] == "disconnected"]
    assert times[2] - times[1] >= 0.35  # the backoff doubled (0.2, then 0.4)
    back = Emulator(port=port)  # back, with other state (what happened meanwhile)
    try:
        Api(back).create(pod("web-1", "uid-2", "10.0.1.6"))
        sink.wait(lambda s: len(s.of("resync")) == 2)
        assert {p.uid for p in sink.of("resync")[1].pods} == {"uid-2"}
        assert src.disconnects >= 3 and "kubernetes" in sink.of("disconnected")[0]
    finally:
        back.close()


def test_watch_ended_by_server_timeout_resumes_from_last_version(emulator, running):
    api, start = running
    def timed_out(request):
        # the server ends the watch at timeoutSeconds, after a bookmark with the version it had reached
        meta = {"resourceVersion": "77"}
        return {"type": "BOOKMARK", "object": {"apiVersion": "v1", "kind": "Pod", "metadata": meta}}

    emulator.call(lambda: emulator.kmock["watch", kmock.resource("v1/pods")][:1] << timed_out)
    sink, src = start(watch_timeout=5)
    sink.wait(lambda s: s.of("resync"))
    api.create(pod("web-1", "uid-2", "10.0.1.6"))
    sink.wait(lambda s: any(c.key == "uid-2" for c in changes(s, "pod")))
    requests = emulator.call(lambda: list(emulator.kmock["watch", kmock.resource("v1/pods")]))
    first, second = (dict(r.params) for r in requests[:2])
    assert 5 <= int(first["timeoutSeconds"]) < 10 and second["timeoutSeconds"] == first["timeoutSeconds"]
    assert second["resourceVersion"] == "77"  # resumed where the ended watch was, not relisted
    assert src.resyncs == 1 and src.disconnects == 0 and sink.of("disconnected") == []


def test_silent_server_ends_the_watch_by_read_timeout(running):
    # kmock ignores timeoutSeconds and sends nothing on a quiet watch: a server gone silent
    _api, start = running
    sink, src = start(watch_timeout=1, read_timeout=2.5, backoff=0.1, max_backoff=0.1)
    sink.wait(lambda s: s.of("resync"))
    began = time.monotonic()
    sink.wait(lambda s: s.of("disconnected"))
    took = sink.events[[e[0] for e in sink.events].index("disconnected")][2] - began
    assert 2.0 <= took < 6, took
    assert "ReadTimeout" in sink.of("disconnected")[0]
    sink.wait(lambda s: len(s.of("resync")) >= 2)  # backed off and relisted


def test_timeouts_are_validated():
    with pytest.raises(ValueError, match="watch_timeout"):
        KubernetesSource(watch_timeout=0)
    with pytest.raises(ValueError, match="read_timeout"):
        KubernetesSource(watch_timeout=10, read_timeout=15)
    assert KubernetesSource(watch_timeout=10).read_timeout == 50


def test_malformed_object_is_rejected_alone(running):
    api, start = running
    api.create(pod("good", "uid-g", "10.0.1.5"))
    api.create(pod("bad-ip", "uid-b", "10.0.1.999"))
    api.create(policy("bad-cidr", dst="203.0.113.0/33"))
    api.create(policy("good-policy"))
    sink, src = start(max_object_bytes=4096)
    sink.wait(lambda s: s.of("resync"))
    snap = sink.of("resync")[0]
    assert [p.uid for p in snap.pods] == ["uid-g"] and [p.name for p in snap.policies] == ["good-policy"]
    rejected = dict(sink.of("rejected"))
    assert "pod default/bad-ip" in rejected and "policy bad-cidr" in rejected
    assert isinstance(rejected["pod default/bad-ip"], ClusterError)
    assert "status.podIPs" in str(rejected["pod default/bad-ip"])
    assert isinstance(rejected["policy bad-cidr"], PolicyError)
    assert "spec.destinationCIDRs[0]" in str(rejected["policy bad-cidr"])
    # on the watch: a malformed update and a too large object are left out alone; the rest flows
    api.patch("pod", "good", {"metadata": {"labels": {"app": 7}}}, namespace="default")
    api.create(pod("huge", "uid-h", "10.0.1.7", labels={f"k{i}": "v" * 64 for i in range(100)}))
    api.create(pod("after", "uid-a", "10.0.1.8"))
    sink.wait(lambda s: any(c.key == "uid-a" for c in changes(s)))
    rejected = dict(sink.of("rejected"))
    assert "metadata.labels.app" in str(rejected["pod default/good"])
    assert "over the limit of 4096 bytes" in str(rejected["pod default/huge"])
    assert not any(c.key in ("uid-h",) for c in changes(sink))
    assert not any(c.key == "uid-g" and c.op == "delete" for c in changes(sink))  # the good pod stays in force
    assert sink.of("disconnected") == [] and src.resyncs == 1


def test_convert_names_the_field():
    with pytest.raises(ClusterError, match="metadata.uid"):
        convert("pod", {"metadata": {"name": "x", "namespace": "d"}})
    with pytest.raises(ClusterError, match="status.addresses"):
        convert("node", {"metadata": {"name": "n"}, "status": {"addresses": [{"type": "InternalIP",
                                                                             "address": "nope"}]}})
    with pytest.raises(ClusterError, match="spec.podCIDRs"):
        convert("node", {"metadata": {"name": "n"}, "spec": {"podCIDRs": ["10.0.0.0/99"]}})
    assert convert("node", {"metadata": {"name": "n"}, "spec": {"podCIDR": "10.0.2.0/24"}}).pod_cidrs == (
        "10.0.2.0/24",)
