"""Cilium's pod identity: pods keyed by uid, identity labels, the label filter."""
import pytest
from egressmap_helper import EgressMap, map_state

from egresscore.cluster import Cluster, ClusterError, Interface, LabelFilter, Namespace, Node, Pod
from egresscore.compiler import Compiler
from egresscore.policy import parse_policy
from egresscore.types import EgressEntry

DST = "203.0.113.0/24"
def gw(src, dst, policy_id=1):
    """The entry of `src` to `dst` through node3, egress IP 192.168.1.3, of the
    policy with `policy_id` (ids are handed out in name order from 1)."""
    return EgressEntry(src, dst, "192.168.1.3", "192.168.1.3", policy_id)


def cegp(name="p", selectors=None, **spec):
    spec = {"selectors": selectors or [{"podSelector": {"matchLabels": {"app": "web"}}}],
            "destinationCIDRs": [DST], **spec}
    spec.setdefault("egressGateway", {"nodeSelector": {"matchLabels": {"name": "gw"}}, "egressIP": "192.168.1.3"})
    p, warnings = parse_policy({"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy",
                                "metadata": {"name": name}, "spec": spec})
    return p


def cluster(*pods, namespaces=(Namespace("default"), Namespace("prod", {"env": "prod"}))):
    nodes = [Node("node1", {"name": "node1"}, "192.168.1.1", (Interface("eth0", ("192.168.1.1/24",)),), "eth0"),
             Node("gw", {"name": "gw"}, "192.168.1.3", (Interface("eth0", ("192.168.1.3/24",)),), "eth0")]
    return Cluster(nodes, list(namespaces), list(pods))


def sources(c):
    return {src for src, _ in c.desired}


# --- pods by uid ---------------------------------------------------------------------


def test_recreated_pod_keeps_its_entries_when_the_old_delete_arrives_late():
    old = Pod("web-0", "default", "uid-old", {"app": "web"}, ("10.0.1.5",), "node1")
    new = Pod("web-0", "default", "uid-new", {"app": "web"}, ("10.0.1.6",), "node1")
    em = EgressMap()
    c = Compiler(cluster(old), [cegp()], egress_map=em)
    assert c.desired == {("10.0.1.5", DST): gw("10.0.1.5", DST)}
    c.upsert_pod(new)  # the new pod's add is seen before the old pod's delete
    assert sources(c) == {"10.0.1.5", "10.0.1.6"}
    c.remove_pod(uid="uid-old")  # the late delete of the predecessor
    assert c.desired == {("10.0.1.6", DST): gw("10.0.1.6", DST)}
    assert map_state(em) == map_state_of(c)
    assert [p.uid for p in c.matched_pods("p")] == ["uid-new"]
    # the same end state as compiling from scratch
    assert Compiler(c.cluster.copy(), [cegp()]).desired == c.desired


def test_recreated_pod_with_the_same_ip_keeps_it_after_the_late_delete():
    old = Pod("web-0", "default", "uid-old", {"app": "web"}, ("10.0.1.5",), "node1")
    new = Pod("web-0", "default", "uid-new", {"app": "other"}, ("10.0.1.5",), "node1")
    c = Compiler(cluster(old), [cegp(), cegp("q", [{"podSelector": {"matchLabels": {"app": "other"}}}],
                                             destinationCIDRs=["198.51.100.0/24"])])
    c.upsert_pod(new)
    c.remove_pod("uid-old")  # one positional argument is a uid
    assert c.desired == {("10.0.1.5", "198.51.100.0/24"): gw("10.0.1.5", "198.51.100.0/24", c.policy_id("q"))}


def map_state_of(c):
    em = EgressMap()
    Compiler(c.cluster.copy(), c.policies, egress_map=em)
    return map_state(em)


def test_remove_pod_by_namespace_and_name_still_works_and_unknown_is_a_key_error():
    c = Compiler(cluster(Pod("a", "default", "", {"app": "web"}, ("10.0.1.5",), "node1")), [cegp()])
    assert c.cluster.pods[("default", "a")].uid == "default/a"  # a file's pod without uid
    c.remove_pod("default", "a")
    assert c.desired == {}
    with pytest.raises(KeyError):
        c.remove_pod("default", "a")
    with pytest.raises(KeyError):
        c.remove_pod(uid="nope")
    with pytest.raises(TypeError):
        c.remove_pod(name="a", uid="x")


def test_cluster_file_rejects_duplicate_uids():
    with pytest.raises(ClusterError, match="duplicate pod uid"):
        Cluster.from_dict({"pods": [{"name": "a", "uid": "u"}, {"name": "b", "uid": "u"}]})


# --- identity labels -----------------------------------------------------------------


def test_selectors_see_service_account_cluster_and_namespace_labels():
    pods = [Pod("a", "prod", "u1", {"app": "web"}, ("10.0.1.5",), "node1", service_account="billing"),
            Pod("b", "prod", "u2", {"app": "web"}, ("10.0.1.6",), "node1", service_account="default"),
            Pod("c", "default", "u3", {"app": "web"}, ("10.0.1.7",), "node1", service_account="billing")]
    by_sa = cegp("sa", [{"namespaceSelector": {"matchLabels": {"env": "prod"}},
                         "podSelector": {"matchLabels": {"io.cilium.k8s.policy.serviceaccount": "billing"}}}])
    assert sources(Compiler(cluster(*pods), [by_sa])) == {"10.0.1.5"}
    by_cluster = cegp("cl", [{"podSelector": {"matchLabels": {"io.cilium.k8s.policy.cluster": "east"}}}])
    assert sources(Compiler(cluster(*pods), [by_cluster])) == set()
    assert sources(Compiler(cluster(*pods), [by_cluster], cluster_name="east")) == {"10.0.1.5", "10.0.1.6",
                                                                                     "10.0.1.7"}
    labels = Compiler(cluster(*pods), [], cluster_name="east").pod_labels(pods[0])
    assert labels == {"app": "web", "io.kubernetes.pod.namespace": "prod",
                      "io.cilium.k8s.namespace.labels.env": "prod",
                      "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "prod",
                      "io.cilium.k8s.policy.serviceaccount": "billing", "io.cilium.k8s.policy.cluster": "east"}


def test_pod_labels_posing_as_derived_labels_are_dropped():
    impostor = Pod("x", "default", "u1", {
        "app": "web",
        "io.kubernetes.pod.namespace": "prod",
        "io.cilium.k8s.namespace.labels.env": "prod",
        "io.cilium.k8s.policy.serviceaccount": "billing",
        "io.cilium.k8s.policy.cluster": "east",
    }, ("10.0.1.5",), "node1")
    honest = Pod("y", "prod", "u2", {"app": "web"}, ("10.0.1.6",), "node1")
    policies = [
        cegp("ns", [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}]),
        cegp("nsname", [{"podSelector": {"matchLabels": {"io.kubernetes.pod.namespace": "prod"}}}],
             destinationCIDRs=["198.51.100.0/24"]),
        cegp("sa", [{"podSelector": {"matchLabels": {"io.cilium.k8s.policy.serviceaccount": "billing"}}}],
             destinationCIDRs=["192.0.2.0/24"]),
    ]
    c = Compiler(cluster(impostor, honest), policies)
    assert sources(c) == {"10.0.1.6"}
    assert c.pod_labels(impostor) == {"app": "web", "io.kubernetes.pod.namespace": "default",
                                      "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "default",
                                      "io.cilium.k8s.policy.cluster": "default"}


# --- the label filter ----------------------------------------------------------------

NOISY = {"pod-template-hash": "5d9f", "controller-revision-hash": "7b8c", "statefulset.kubernetes.io/pod-name": "web-0",
         "apps.kubernetes.io/pod-index": "0", "batch.kubernetes.io/job-completion-index": "1",
         "pod-template-generation": "2", "kubernetes.io/os": "linux", "k8s.io/x": "y",
         "failure-domain.beta.kubernetes.io/zone": "a", "annotation.foo": "bar", "io.kubernetes.container": "c"}


def test_default_label_filter_leaves_out_what_cilium_leaves_out():
    f = LabelFilter()
    for key in NOISY:
        assert not f.keep(key), key
    for key in ("app", "app.kubernetes.io/name", "io.kubernetes.pod.namespace", "io.cilium.k8s.policy.cluster",
                "io.cilium.k8s.policy.serviceaccount", "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
                "tier", "job-name"):
        assert f.keep(key), key


def test_selector_on_a_filtered_label_selects_nothing_unless_the_filter_is_changed():
    pod = Pod("web-0", "default", "u1", {"app": "web", **NOISY}, ("10.0.1.5",), "node1")
    by_hash = cegp("h", [{"podSelector": {"matchLabels": {"pod-template-hash": "5d9f"}}}])
    assert Compiler(cluster(pod), [by_hash]).desired == {}
    assert sources(Compiler(cluster(pod), [by_hash], label_filter=LabelFilter(defaults=False))) == {"10.0.1.5"}
    # like Cilium's --labels: an include rule turns the filter into an allow list
    only_tier = LabelFilter(["k8s:tier"])
    assert only_tier.keep("tier") and only_tier.keep("io.kubernetes.pod.namespace") and not only_tier.keep("app")
    # an include as long as a default ignore does not beat it (Cilium: the include must match more)
    assert not LabelFilter(["k8s:pod-template-hash"]).keep("pod-template-hash")
    tiered = Pod("web-1", "default", "u2", {"app": "web", "tier": "front"}, ("10.0.1.6",), "node1")
    by_tier = cegp("t", [{"podSelector": {"matchLabels": {"tier": "front"}}}])
    by_app = cegp("a", [{"podSelector": {"matchLabels": {"app": "web"}}}], destinationCIDRs=["198.51.100.0/24"])
    c = Compiler(cluster(pod, tiered), [by_tier, by_app], label_filter=only_tier)
    assert c.desired == {("10.0.1.6", DST): gw("10.0.1.6", DST, c.policy_id("t"))}
    # an extra ignore rule keeps the rest
    no_tier = LabelFilter(["!tier"])
    assert not no_tier.keep("tier") and no_tier.keep("app")
    # a longer include beats a shorter ignore
    assert LabelFilter(["!foo", "foo.bar"]).keep("foo.bar.baz")
    assert not LabelFilter(["container:app"]).keep("app")  # another source's rule matches no k8s label


def test_bad_label_rules_are_rejected_with_the_rule():
    for bad in ("", "k8s:", "k8s:!", "k8s:(unclosed"):
        with pytest.raises(ClusterError, match="label rule"):
            LabelFilter([bad])


# --- egressGateways ------------------------------------------------------------------


def test_egress_gateways_ignores_the_singular_entirely_even_when_malformed():
    p = cegp(egressGateways=[{"nodeSelector": {"matchLabels": {"name": "gw"}}, "egressIP": "192.168.1.3"}],
             egressGateway={"nodeSelector": {"matchLabels": {"name": "gw"}}, "egressIP": "not-an-ip"})
    assert len(p.gateways) == 1 and p.gateways[0].egress_ip == "192.168.1.3"
    c = Compiler(cluster(Pod("a", "default", "u1", {"app": "web"}, ("10.0.1.5",), "node1")), [p])
    assert c.desired == {("10.0.1.5", DST): gw("10.0.1.5", DST)}
    with pytest.raises(ValueError, match="egressGateway"):  # alone, the singular is parsed as before
        cegp(egressGateway={"nodeSelector": {"matchLabels": {"name": "gw"}}, "egressIP": "not-an-ip"})


def test_pod_table_keeps_its_name_index_through_every_change():
    c = Cluster()
    a = Pod("web", "default", "u1")
    b = Pod("web", "default", "u2")
    c.pods["u1"] = a
    c.pods.update({"u2": b})
    assert c.pods.named("default", "web") == [a, b] and c.pods[("default", "web")] is b
    c.pods["u2"] = Pod("web2", "default", "u2")  # renamed under the same uid
    assert c.pods.named("default", "web") == [a] and c.pods.named("default", "web2")[0].uid == "u2"
    del c.pods["u1"]
    assert c.pods.named("default", "web") == [] and c.pods.pop("u2").name == "web2" and not c.pods
    assert c.pods.pop("nope", None) is None
    with pytest.raises(KeyError):
        c.pods[("default", "web")]
    assert Cluster(pods=[a, b]).copy().pods.named("default", "web") == [a, b]
