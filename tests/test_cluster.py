import os

import pytest
from conftest import needs_netns

from egresscore.cluster import Cluster, ClusterError, Interface, Namespace, Node, Pod, load_cluster

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_example_cluster_follows_the_lab_address_plan():
    c = load_cluster(os.path.join(EXAMPLES, "cluster.yaml"))
    assert c.node_names() == ["node1", "node2", "node3", "node4"]
    for i, name in enumerate(c.node_names(), 1):
        n = c.nodes[name]
        assert n.internal_ip == n.gateway_ip == f"192.168.1.{i}"
        assert n.pod_cidrs == (f"10.0.{i}.0/24",)
        assert n.labels["node.kubernetes.io/name"] == name
    node3 = c.nodes["node3"]
    assert {f"192.168.1.{i}" for i in range(100, 110)} <= node3.all_ips()
    assert node3.interface_with_ip("192.168.1.100").name == "eth0"
    assert {f"192.168.1.{i}" for i in range(110, 120)} <= c.nodes["node4"].all_ips()
    assert [n for n in c.node_names() if c.nodes[n].labels.get("egress-gateway") == "true"] == ["node3", "node4"]
    app1 = c.pods[("default", "app1")]
    assert app1.labels == {"app": "app1"} and app1.node == "node1" and app1.ips == ("10.0.1.93",)
    assert c.pods[("default", "app2")].labels == {"app": "app2"}


def test_pod_labels_carry_namespace_like_cilium():
    c = Cluster([], [Namespace("prod", {"env": "prod"})], [Pod("a", "prod", labels={"app": "x"})])
    labels = c.pod_labels(c.pods[("prod", "a")])
    assert labels == {
        "app": "x",
        "io.kubernetes.pod.namespace": "prod",
        "io.cilium.k8s.namespace.labels.env": "prod",
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "prod",
    }
    # a pod in an unknown namespace still has the namespace label
    assert c.pod_labels(Pod("b", "ghost"))["io.kubernetes.pod.namespace"] == "ghost"


def test_models_canonicalise_and_default():
    n = Node("n", {}, " 192.168.1.1 ", ({"name": "eth0", "addresses": ["2001:DB8::1/64", "fe80::1/64"]},),
             pod_cidrs=("10.0.1.7/24",))
    assert n.interfaces[0].addresses == ("2001:db8::1/64", "fe80::1/64")
    assert n.pod_cidrs == ("10.0.1.0/24",)
    assert Interface("x", ("fe80::1/64", "2001:db8::1/64")).first_ip(6) == "2001:db8::1"
    assert Node("v6", {}, "fd00::1").gateway_ip is None
    assert Pod("p", "ns").uid == "ns/p"


def test_to_dict_round_trips():
    c = load_cluster(os.path.join(EXAMPLES, "cluster.yaml"))
    again = Cluster.from_dict(c.to_dict())
    assert again.nodes == c.nodes and again.pods == c.pods and again.namespaces == c.namespaces


@pytest.mark.parametrize(
    "text, message",
    [
        ("nodes: [{name: a, internalIP: 300.1.1.1}]", "'300.1.1.1' is not an IP address"),
        ("nodes: [{name: a, interfaces: [{name: e, addresses: [1.2.3.4/40]}]}]", "not an interface address"),
        ("nodes: [{name: a, podCIDRs: [nope]}]", "'nope' is not a CIDR"),
        ("nodes: [{name: a, colour: red}]", "unknown field 'colour'"),
        ("nodes: [{labels: {}}]", "name is required"),
        ("nodes: [{name: a}, {name: a}]", "duplicate node names"),
        ("pods: [{name: p, labels: {on: true}}]", "must be a string"),
        ("pods: [{name: p, ips: [10.0.0.999]}]", "pod default/p: ips: '10.0.0.999' is not an IP address"),
        ("pods: {name: p}", "pods: must be a list"),
        ("wat: 1", "unknown field(s) wat"),
        ("- a list", "must be a mapping"),
        ("nodes: [unclosed", "line 2: invalid YAML: "),
    ],
)
def test_bad_cluster_files_say_what_and_where(tmp_path, text, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ClusterError) as info:
        load_cluster(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_cluster_file(tmp_path):
    with pytest.raises(ClusterError, match="nope.yaml: no such file"):
        load_cluster(tmp_path / "nope.yaml")


@needs_netns
def test_node_from_host_reads_interfaces_and_default_route():
    from netns_helper import dummy_netns

    addrs = ["192.168.1.3/24", "192.168.1.100/24", "2001:db8::3/64"]
    with dummy_netns("host", addrs, gateway="192.168.1.254") as ns:
        n = Node.from_host("node3", labels={"a": "b"}, netns=ns)
    assert n.default_route_interface == "eth0"
    assert n.internal_ip == "192.168.1.3"
    eth0 = n.interface("eth0")
    assert [a for a in eth0.addresses if not a.startswith("fe80")] == addrs
    assert n.interface("lo") is not None and n.labels == {"a": "b"}
    base = Node("node3", {}, "192.168.1.3")
    with dummy_netns("host2", ["10.9.9.9/24"]) as ns:
        replaced = base.with_host_interfaces(ns)
    assert replaced.interface("eth0").addresses[0] == "10.9.9.9/24"
    assert replaced.default_route_interface is None and replaced.internal_ip == "192.168.1.3"
