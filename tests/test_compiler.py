import os
from dataclasses import replace

import pytest
from egressmap_helper import EgressMap, map_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egresscore.cluster import Cluster, Interface, Namespace, Node, Pod, load_cluster
from egresscore.compiler import (
    EXCLUDED_CIDR,
    GATEWAY_NOT_FOUND,
    Compiler,
    EgressEntry,
    fnv1a_32,
    resolve_gateways,
)
from egresscore.policy import load_policies, parse_policy

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def node(name, ip, *addrs, labels=None, default="eth0", default6=None, ifaces=None):
    if ifaces is None:
        ifaces = (Interface("eth0", (f"{ip}/24",) + tuple(addrs)),)
    return Node(name, {"name": name, **(labels or {})}, ip, ifaces, default, default6)


def policy(name="p", *, pods=None, dst=("203.0.113.0/24",), excl=(), gw=None, gws=None, selectors=None):
    spec = {
        "selectors": selectors or [{"podSelector": {"matchLabels": pods or {"app": "app1"}}}],
        "destinationCIDRs": list(dst),
    }
    if excl:
        spec["excludedCIDRs"] = list(excl)
    if gws is not None:
        spec["egressGateways"] = gws
    else:
        spec["egressGateway"] = gw or {"nodeSelector": {"matchLabels": {"name": "node3"}}, "egressIP": "192.168.1.3"}
    p, _ = parse_policy({"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy",
                         "metadata": {"name": name}, "spec": spec})
    return p


def entry(*fields, policy_id=1):
    """An expected entry of a test's first policy: ids are handed out in name order from 1."""
    return EgressEntry(*fields, policy_id)


def renumbered(desired, ids, to_ids):
    """`desired` with policy ids `ids` ({name: id}) given as `to_ids` has them."""
    names = {i: n for n, i in ids.items()}
    return {k: v._replace(policy_id=to_ids[names[v.policy_id]]) for k, v in desired.items()}


def lab(*extra_pods):
    nodes = [node("node1", "192.168.1.1"), node("node2", "192.168.1.2"),
             node("node3", "192.168.1.3", *(f"192.168.1.{i}/24" for i in range(100, 110)))]
    pods = [Pod("app1", "default", "uid-app1", {"app": "app1"}, ("10.0.1.93",), "node1"),
            Pod("app2", "default", "uid-app2", {"app": "app2"}, ("10.0.2.32",), "node2")] + list(extra_pods)
    return Cluster(nodes, [Namespace("default")], pods)


# --- the seed's example -------------------------------------------------------------


def test_seed_example_reproduces_the_seed():
    cluster = load_cluster(os.path.join(EXAMPLES, "cluster.yaml"))
    policies = load_policies(os.path.join(EXAMPLES, "egress-sample.yaml")).policies
    c = Compiler(cluster, policies)
    assert c.desired == {
        ("10.0.1.93", "203.0.113.0/24"): entry("10.0.1.93", "203.0.113.0/24", "192.168.1.3", "192.168.1.3"),
        ("10.0.1.93", "203.0.113.128/25"): entry(  # as Cilium writes it
            "10.0.1.93", "203.0.113.128/25", "192.168.1.3", EXCLUDED_CIDR),
    }
    assert c.problems() == [] and c.conflicts() == []
    # as Cilium's agents see it: only the gateway node knows the egress IP
    on_node1 = Compiler(cluster, policies, node="node1").desired
    assert on_node1[("10.0.1.93", "203.0.113.0/24")] == entry(
        "10.0.1.93", "203.0.113.0/24", "0.0.0.0", "192.168.1.3")
    assert on_node1[("10.0.1.93", "203.0.113.128/25")] == entry(
        "10.0.1.93", "203.0.113.128/25", "0.0.0.0", EXCLUDED_CIDR)
    on_node3 = Compiler(cluster, policies, node="node3").desired
    assert on_node3 == c.desired


def test_seed_example_in_the_egress_map():
    cluster = load_cluster(os.path.join(EXAMPLES, "cluster.yaml"))
    policies = load_policies(os.path.join(EXAMPLES, "egress-sample.yaml")).policies
    em = EgressMap()
    c = Compiler(cluster, policies, egress_map=em)
    assert map_state(em) == c.desired
    # the datapath's view: longest prefix wins, excluded half, other pods unmatched
    assert str(em.lookup("10.0.1.93", "203.0.113.7").gateway_ip) == "192.168.1.3"
    assert em.lookup("10.0.1.93", "203.0.113.200").excluded
    assert em.lookup("10.0.2.32", "203.0.113.7") is None
    assert em.lookup("10.0.1.93", "198.51.100.1") is None


# --- gateway choice -----------------------------------------------------------------


def test_gateway_is_first_matching_node_in_name_order():
    cluster = lab()
    p = policy(gw={"nodeSelector": {"matchExpressions": [{"key": "name", "operator": "In",
                                                          "values": ["node3", "node2"]}]}})
    c = Compiler(cluster, [p])
    assert c.desired[("10.0.1.93", "203.0.113.0/24")].gateway_ip == "192.168.1.2"
    c.upsert_node(node("node0", "192.168.1.50", labels={"name": "node2"}))  # sorts first, matches
    assert c.desired[("10.0.1.93", "203.0.113.0/24")].gateway_ip == "192.168.1.50"


def test_node_without_ipv4_internal_ip_is_skipped():
    cluster = lab()
    cluster.nodes["node2"] = Node("node2", {"name": "node2", "gw": "y"}, None)
    cluster.nodes["node3"] = Node("node3", {"name": "node3", "gw": "y"}, "192.168.1.3",
                                  (Interface("eth0", ("192.168.1.3/24",)),), "eth0")
    c = Compiler(cluster, [policy(gw={"nodeSelector": {"matchLabels": {"gw": "y"}}})])
    assert c.desired[("10.0.1.93", "203.0.113.0/24")] == entry(
        "10.0.1.93", "203.0.113.0/24", "192.168.1.3", "192.168.1.3")


def test_no_matching_node_gives_gateway_not_found_and_a_problem():
    c = Compiler(lab(), [policy(gw={"nodeSelector": {"matchLabels": {"name": "node9"}}, "egressIP": "1.2.3.4"})])
    t = c.desired[("10.0.1.93", "203.0.113.0/24")]
    assert t == entry("10.0.1.93", "203.0.113.0/24", "0.0.0.0", GATEWAY_NOT_FOUND) and t.no_gateway
    (problem,) = c.problems()
    assert problem.policy == "p" and "no node matches" in problem.message and "no gateway" in problem.message


# --- egress IP ------------------------------------------------------------------------


def two_iface_node(name="node3"):
    return Node(name, {"name": name}, "192.168.1.3",
                (Interface("eth0", ("192.168.1.3/24", "2001:db8:1::3/64")),
                 Interface("eth1", ("fe80::1/64", "10.99.0.3/24", "10.99.0.4/24", "2001:db8:2::3/64"))),
                "eth0", "eth0")


@pytest.mark.parametrize(
    "gw, dst, expected4, expected6",
    [
        ({"egressIP": "10.99.0.4"}, ("203.0.113.0/24",), "10.99.0.4", None),
        ({"interface": "eth1"}, ("203.0.113.0/24", "2001:db8:ff::/48"), "10.99.0.3", "2001:db8:2::3"),
        ({}, ("203.0.113.0/24", "2001:db8:ff::/48"), "192.168.1.3", "2001:db8:1::3"),
        ({"egressIP": "2001:db8:2::3"}, ("2001:db8:ff::/48",), None, "2001:db8:2::3"),
        ({"egressIP": "2001:db8:2::3"}, ("203.0.113.0/24", "2001:db8:ff::/48"), "10.99.0.3", "2001:db8:2::3"),
        # unresolvable: the entry stays, egress IP unspecified (the gateway drops: no egress IP)
        ({"egressIP": "192.168.1.200"}, ("203.0.113.0/24",), "0.0.0.0", None),
        ({"interface": "eth9"}, ("203.0.113.0/24",), "0.0.0.0", None),
    ],
)
def test_egress_ip_resolution(gw, dst, expected4, expected6):
    cluster = Cluster([two_iface_node()], [], [Pod("a", uid="u", labels={"app": "app1"},
                                                   ips=("10.0.1.5", "fd00::5"), node="node3")])
    p = policy(dst=dst, gw={"nodeSelector": {"matchLabels": {"name": "node3"}}, **gw})
    c = Compiler(cluster, [p])
    if expected4:
        assert c.desired[("10.0.1.5", "203.0.113.0/24")] == entry(
            "10.0.1.5", "203.0.113.0/24", expected4, "192.168.1.3")
    if expected6:
        # IPv6 entries keep the IPv4 node IP as gateway (the tunnel underlay is IPv4)
        assert c.desired[("fd00::5", "2001:db8:ff::/48")] == entry(
            "fd00::5", "2001:db8:ff::/48", expected6, "192.168.1.3")
    if expected4 == "0.0.0.0":
        (problem,) = c.problems()
        assert "no egress IP" in problem.message


def test_interface_without_needed_family_and_mismatched_default_routes():
    n = two_iface_node()
    cluster = Cluster([Node(n.name, n.labels, n.internal_ip, n.interfaces, "eth0", "eth1")], [],
                      [Pod("a", uid="u", labels={"app": "app1"}, ips=("fd00::5",), node="node3")])
    c = Compiler(cluster, [policy(dst=("2001:db8:ff::/48", "203.0.113.0/24"),
                                  gw={"nodeSelector": {"matchLabels": {"name": "node3"}}})])
    assert c.desired[("fd00::5", "2001:db8:ff::/48")] == entry("fd00::5", "2001:db8:ff::/48", "::", "192.168.1.3")
    assert "doesn't match IPv4 default route interface" in c.problems()[0].message


def dual_pod_cluster(*ifaces, default4="eth0", default6="eth0"):
    node = Node("node3", {"name": "node3"}, "192.168.1.3", tuple(Interface(n, a) for n, a in ifaces),
                default4, default6)
    return Cluster([node], [], [Pod("a", uid="u", labels={"app": "app1"}, ips=("10.0.1.5", "fd00::5"),
                                    node="node3")])


GW3 = {"nodeSelector": {"matchLabels": {"name": "node3"}}}
DUAL = ("203.0.113.0/24", "2001:db8:ff::/48")


def test_explicit_ipv4_egress_ip_without_ipv6_on_its_interface_keeps_ipv4_programmed():
    """cilium/cilium#48660: an IPv4 egressIP with dual-stack destinations, on an interface
    without IPv6, programs the IPv4 entries with that IP; only IPv6 is unresolved."""
    cluster = dual_pod_cluster(("eth0", ("192.168.1.3/24", "2001:db8:1::3/64")),
                               ("eth1", ("10.99.0.4/24", "fe80::4/64")))
    c = Compiler(cluster, [policy(dst=DUAL, gw={**GW3, "egressIP": "10.99.0.4"})])
    assert c.desired[("10.0.1.5", "203.0.113.0/24")] == entry("10.0.1.5", "203.0.113.0/24", "10.99.0.4",
                                                              "192.168.1.3")
    assert c.desired[("fd00::5", "2001:db8:ff::/48")] == entry("fd00::5", "2001:db8:ff::/48", "::", "192.168.1.3")
    (problem,) = c.problems()
    assert "has no IPv6 address" in problem.message and "IPv6 traffic" in problem.message
    assert "10.99.0.4 is programmed" in problem.message
    # the same interface with an IPv6 address: both programmed, the IPv6 one derived from it
    cluster = dual_pod_cluster(("eth1", ("10.99.0.4/24", "fe80::4/64", "2001:db8:2::4/64")))
    c = Compiler(cluster, [policy(dst=DUAL, gw={**GW3, "egressIP": "10.99.0.4"})])
    assert c.desired[("fd00::5", "2001:db8:ff::/48")].egress_ip == "2001:db8:2::4" and not c.problems()


def test_explicit_ipv6_egress_ip_without_ipv4_on_its_interface_keeps_ipv6_programmed():
    """The reverse of cilium/cilium#48660: an IPv6 egressIP on an interface without IPv4."""
    cluster = dual_pod_cluster(("eth0", ("192.168.1.3/24",)), ("eth1", ("fe80::4/64", "2001:db8:2::4/64")))
    c = Compiler(cluster, [policy(dst=DUAL, gw={**GW3, "egressIP": "2001:db8:2::4"})])
    assert c.desired[("fd00::5", "2001:db8:ff::/48")] == entry("fd00::5", "2001:db8:ff::/48", "2001:db8:2::4",
                                                              "192.168.1.3")
    assert c.desired[("10.0.1.5", "203.0.113.0/24")] == entry("10.0.1.5", "203.0.113.0/24", "0.0.0.0",
                                                              "192.168.1.3")
    (problem,) = c.problems()
    assert "has no IPv4 address" in problem.message and "IPv4 traffic" in problem.message


def test_ipv6_egress_ip_serves_ipv6_destination_cidrs_only():
    """An IPv6 egressIP on a policy without IPv6 destination CIDRs only picks the
    interface: the IPv4 entries get its first IPv4, nothing is SNATed to the IPv6
    address (its excluded IPv6 entries carry ::), and the parser warns."""
    cluster = dual_pod_cluster(("eth0", ("192.168.1.3/24",)),
                               ("eth1", ("10.99.0.3/24", "2001:db8:2::4/64")))
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": {"name": "p"},
           "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
                    "destinationCIDRs": ["203.0.113.0/24"], "excludedCIDRs": ["2001:db8:ff::/48"],
                    "egressGateway": {**GW3, "egressIP": "2001:db8:2::4"}}}
    p, warnings = parse_policy(doc)
    assert any("egressIP 2001:db8:2::4 is IPv6 but no destinationCIDR is" in w for w in warnings)
    c = Compiler(cluster, [p])
    assert c.desired[("10.0.1.5", "203.0.113.0/24")].egress_ip == "10.99.0.3"
    assert c.desired[("fd00::5", "2001:db8:ff::/48")] == entry("fd00::5", "2001:db8:ff::/48", "::", EXCLUDED_CIDR)
    assert not any(t.egress_ip == "2001:db8:2::4" for t in c.desired.values())
    # with an IPv6 destination CIDR the same egressIP is programmed
    doc["spec"]["destinationCIDRs"].append("2001:db8::/32")
    p, warnings = parse_policy(doc)
    assert not warnings
    assert Compiler(cluster, [p]).desired[("fd00::5", "2001:db8::/32")].egress_ip == "2001:db8:2::4"


@pytest.mark.parametrize("gw", [{"interface": "eth0"}, {"egressIP": "192.168.1.3"}, {}])
def test_ipv6_excluded_entries_of_an_ipv4_only_policy_carry_unresolved_egress(gw):
    """Whatever the interface holds, an IPv4-only policy needs no IPv6 egress IP:
    its IPv6 excluded entries carry :: (Cilium sets egressIP6 only when v6Needed)."""
    cluster = dual_pod_cluster(("eth0", ("192.168.1.3/24", "2001:db8:1::3/64")))
    c = Compiler(cluster, [policy(dst=("203.0.113.0/24",), excl=("203.0.113.128/25", "2001:db8:1::/48"),
                                  gw={**GW3, **gw})])
    assert c.desired[("fd00::5", "2001:db8:1::/48")] == entry("fd00::5", "2001:db8:1::/48", "::", EXCLUDED_CIDR)
    assert c.desired[("10.0.1.5", "203.0.113.128/25")].egress_ip == "192.168.1.3"
    assert c.gateways("p")[0].egress_ip6 == "::" and not c.problems()


# --- multiple gateways ----------------------------------------------------------------


def test_fnv1a_32_matches_go_hash_fnv():
    assert fnv1a_32("") == 0x811C9DC5
    assert fnv1a_32("a") == 0xE40C292C
    assert fnv1a_32("foobar") == 0xBF9CF968


def test_egress_gateways_place_each_pod_by_uid_hash_over_gateways_sorted_by_ip():
    pods = [Pod(f"p{i}", uid=f"5c0b3a2e-uid-{i}", labels={"app": "app1"}, ips=(f"10.0.1.{i}",), node="node1")
            for i in range(1, 40)]
    cluster = lab(*pods)
    gws = [{"nodeSelector": {"matchLabels": {"name": n}}} for n in ("node3", "node1", "node2")]
    c = Compiler(cluster, [policy(gws=gws)])
    by_ip = ["192.168.1.1", "192.168.1.2", "192.168.1.3"]
    assert [g.gateway_ip for g in c.gateways("p")] == by_ip
    for pod in pods:
        want = by_ip[fnv1a_32(pod.uid) % 3]
        assert c.desired[(pod.ips[0], "203.0.113.0/24")] == entry(pod.ips[0], "203.0.113.0/24", want, want)
    assert len({c.desired[(p.ips[0], "203.0.113.0/24")].gateway_ip for p in pods}) == 3


def test_egress_gateways_skip_unmatched_gateways():
    cluster = lab()
    gws = [{"nodeSelector": {"matchLabels": {"name": "nodeX"}}}, {"nodeSelector": {"matchLabels": {"name": "node2"}}}]
    c = Compiler(cluster, [policy(gws=gws)])
    assert [g.gateway_ip for g in c.gateways("p")] == ["192.168.1.2"]
    assert c.desired[("10.0.1.93", "203.0.113.0/24")].gateway_ip == "192.168.1.2"
    none = [{"nodeSelector": {"matchLabels": {"name": "nodeX"}}}, {"nodeSelector": {"matchLabels": {"name": "nodeY"}}}]
    c = Compiler(cluster, [policy(gws=none)])
    assert [g.gateway_ip for g in c.gateways("p")] == [GATEWAY_NOT_FOUND]


def test_singular_gateway_ignored_when_plural_present():
    p = policy(gws=[{"nodeSelector": {"matchLabels": {"name": "node2"}}}])
    assert Compiler(lab(), [p]).desired[("10.0.1.93", "203.0.113.0/24")].gateway_ip == "192.168.1.2"


# --- selectors, exclusions, families -------------------------------------------------------


def test_selectors_namespace_match_expressions_and_node_selector():
    nodes = [node("node1", "192.168.1.1", labels={"zone": "a"}), node("node2", "192.168.1.2", labels={"zone": "b"}),
             node("node3", "192.168.1.3")]
    pods = [
        Pod("w1", "prod", "u1", {"app": "web", "tier": "front"}, ("10.0.1.1",), "node1"),
        Pod("w2", "prod", "u2", {"app": "web", "tier": "back"}, ("10.0.2.1",), "node2"),
        Pod("w3", "dev", "u3", {"app": "web"}, ("10.0.1.2",), "node1"),
        Pod("db", "prod", "u4", {"app": "db"}, ("10.0.1.3",), "node1"),
    ]
    cluster = Cluster(nodes, [Namespace("prod", {"env": "prod"}), Namespace("dev", {"env": "dev"})], pods)
    cases = [
        ([{"podSelector": {"matchLabels": {"app": "web"}}}], {"10.0.1.1", "10.0.2.1", "10.0.1.2"}),
        ([{"namespaceSelector": {"matchLabels": {"env": "prod"}}}], {"10.0.1.1", "10.0.2.1", "10.0.1.3"}),
        ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dev"}}}], {"10.0.1.2"}),
        ([{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchLabels": {"app": "web"}}}],
         {"10.0.1.1", "10.0.2.1"}),
        ([{"namespaceSelector": {}}], {"10.0.1.1", "10.0.2.1", "10.0.1.2", "10.0.1.3"}),
        ([{"podSelector": {"matchLabels": {"io.kubernetes.pod.namespace": "dev"}}}], {"10.0.1.2"}),
        ([{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["back"]},
                                                {"key": "app", "operator": "In", "values": ["web", "db"]}]}}],
         {"10.0.1.1", "10.0.1.2", "10.0.1.3"}),
        ([{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}}],
         {"10.0.1.2", "10.0.1.3"}),
        ([{"podSelector": {"matchLabels": {"app": "web"}}, "nodeSelector": {"matchLabels": {"zone": "a"}}}],
         {"10.0.1.1", "10.0.1.2"}),
        ([{"podSelector": {"matchLabels": {"app": "db"}}}, {"podSelector": {"matchLabels": {"tier": "back"}}}],
         {"10.0.1.3", "10.0.2.1"}),
    ]
    for selectors, want in cases:
        c = Compiler(cluster, [policy(selectors=selectors)])
        assert {s for s, _ in c.desired} == want, selectors


def test_excluded_cidrs_and_families():
    pod = Pod("a", uid="u", labels={"app": "app1"}, ips=("10.0.1.5", "fd00::5"), node="node1")
    p = policy(dst=("203.0.113.0/24", "2001:db8::/32"), excl=("203.0.113.128/25", "2001:db8:1::/48"))
    c = Compiler(lab(pod), [p])
    d = c.desired
    assert d[("10.0.1.5", "203.0.113.128/25")].excluded
    assert d[("fd00::5", "2001:db8:1::/48")] == entry("fd00::5", "2001:db8:1::/48", "::", EXCLUDED_CIDR)
    em = EgressMap()
    c.attach(em)
    assert map_state(em) == d
    e = em.lookup("fd00::5", "2001:db8::1")
    assert str(e.gateway_ip) == "::ffff:c0a8:103" and not e.excluded  # IPv4 gateway, mapped
    assert em.lookup("fd00::5", "2001:db8:1::1").excluded
    assert ("10.0.1.5", "2001:db8::/32") not in d and ("fd00::5", "203.0.113.0/24") not in d
    assert len([k for k in d if k[0] in pod.ips]) == 4
    # the v4 egress IP sits on an interface without IPv6: only IPv6 is unresolved (cilium/cilium#48660)
    assert d[("10.0.1.5", "203.0.113.0/24")] == entry("10.0.1.5", "203.0.113.0/24", "192.168.1.3", "192.168.1.3")
    assert d[("fd00::5", "2001:db8::/32")].egress_ip == "::"


def test_excluded_equal_to_destination_wins_inside_a_policy():
    c = Compiler(lab(), [policy(dst=("203.0.113.0/24",), excl=("203.0.113.0/24",))])
    assert c.desired[("10.0.1.93", "203.0.113.0/24")].excluded
    assert c.conflicts() == []


def test_conflicting_policies_resolve_by_name_and_are_reported():
    a = policy("a-policy", gw={"nodeSelector": {"matchLabels": {"name": "node2"}}})
    b = policy("b-policy", gw={"nodeSelector": {"matchLabels": {"name": "node3"}}})
    wide = policy("c-wide", dst=("203.0.0.0/16",), gw={"nodeSelector": {"matchLabels": {"name": "node1"}}})
    for order in ([a, b, wide], [wide, b, a]):
        c = Compiler(lab(), order)
        assert c.desired[("10.0.1.93", "203.0.113.0/24")].gateway_ip == "192.168.1.2"
        assert c.desired[("10.0.1.93", "203.0.0.0/16")].gateway_ip == "192.168.1.1"  # no clash: other prefix
        (conflict,) = c.conflicts()
        assert conflict.policy == "a-policy" and [p for p, _ in conflict.others] == ["b-policy"]
        assert "a-policy" in str(conflict) and "wins over" in str(conflict)
    c.remove_policy("a-policy")
    assert c.desired[("10.0.1.93", "203.0.113.0/24")].gateway_ip == "192.168.1.3"
    assert c.conflicts() == []


def test_same_value_from_two_policies_is_not_a_conflict():
    c = Compiler(lab(), [policy("a"), policy("b")])
    assert c.conflicts() == [] and len(c.desired) == 1


# --- incremental updates, in place -----------------------------------------------------------


class CountingMap(EgressMap):
    def __init__(self):
        super().__init__()
        self.writes = []

    def set(self, *a):
        self.writes.append(("set",) + a)
        return super().set(*a)

    def set_excluded(self, *a):
        self.writes.append(("excluded",) + a)
        return super().set_excluded(*a)

    def remove(self, *a):
        self.writes.append(("remove",) + a)
        return super().remove(*a)

    def update(self, sets=(), removes=()):
        """A batch (Compiler writes many keys at once): recorded as its writes."""
        for s in sets:
            excluded = str(s[3]) in ("0.0.0.1", "::1")
            self.writes.append(("excluded", s[0], s[1], s[2]) if excluded else ("set",) + tuple(s))
        for r in removes:
            self.writes.append(("remove",) + tuple(r))
        return super().update(sets, removes)


def test_incremental_updates_touch_only_affected_entries():
    pods = [Pod(f"p{i}", uid=f"u{i}", labels={"app": "app1"}, ips=(f"10.0.1.{i}",), node="node1")
            for i in range(10, 20)]
    em = CountingMap()
    c = Compiler(lab(*pods), [policy(excl=("203.0.113.128/25",)),
                              policy("other", pods={"app": "app2"}, dst=("198.51.100.0/24",))], egress_map=em)
    em.writes.clear()
    c.upsert_pod(Pod("new", uid="un", labels={"app": "app1"}, ips=("10.0.1.50",), node="node2"))
    assert sorted(w[0] for w in em.writes) == ["excluded", "set"]
    em.writes.clear()
    c.upsert_pod(Pod("new", uid="un", labels={"app": "app1"}, ips=("10.0.1.51",), node="node2"))  # IP changed
    assert sorted(w[0] for w in em.writes) == ["excluded", "remove", "remove", "set"]
    em.writes.clear()
    c.upsert_pod(Pod("new", uid="un", labels={"app": "app1", "x": "y"}, ips=("10.0.1.51",), node="node2"))
    assert em.writes == []  # same entries: nothing rewritten
    em.writes.clear()
    c.remove_pod("default", "new")
    assert sorted(w[0] for w in em.writes) == ["remove", "remove"]
    em.writes.clear()
    c.remove_policy("other")
    assert em.writes == [("remove", "10.0.2.32", "198.51.100.0/24")]
    em.writes.clear()
    # node3 loses the egress IP: only the gateway entries change (excluded ones stay)
    c.upsert_node(node("node3", "192.168.1.3", ifaces=(Interface("eth0", ("192.168.1.3/24",)),)))
    assert em.writes == []
    c.upsert_node(node("node3", "192.168.1.33"))  # 192.168.1.3 gone: egress IP unresolved (0.0.0.0)
    assert sorted(w[0] for w in em.writes) == ["excluded"] * 11 + ["set"] * 11
    full = Compiler(c.cluster.copy(), c.policies)
    assert map_state(em) == c.desired == renumbered(full.desired, full.policy_ids, c.policy_ids)
    with pytest.raises(KeyError):
        c.remove_pod("default", "nope")



def test_a_policy_edit_rewrites_only_the_entries_whose_value_changed():
    """Same selectors, one destination CIDR moved: only that CIDR's entries are written (each selected
    pod's other entries stay, the same objects); a gateway edit rewrites them all; a selector edit
    re-matches the pods."""
    pods = [Pod(f"p{i}", uid=f"u{i}", labels={"app": "app1"}, ips=(f"10.0.1.{i}",), node="node1")
            for i in range(10, 20)]
    em = CountingMap()
    excl = ("203.0.113.128/25",)
    c = Compiler(lab(*pods), [policy(dst=("203.0.113.0/24", "198.51.100.0/24"), excl=excl)], egress_map=em)
    kept = {k: v for k, v in c.desired.items() if k[1] != "198.51.100.0/24"}
    em.writes.clear()
    assert c.upsert_policy(policy(dst=("203.0.113.0/24", "198.18.7.0/24"), excl=excl)) == 22
    assert sorted((w[0], w[2]) for w in em.writes) == (
        [("remove", "198.51.100.0/24")] * 11 + [("set", "198.18.7.0/24")] * 11)
    assert all(c.desired[k] is v for k, v in kept.items())
    full = Compiler(c.cluster.copy(), c.policies)
    assert map_state(em) == c.desired == full.desired
    em.writes.clear()   # the egress IP moved: every entry carries it
    gw = {"nodeSelector": {"matchLabels": {"name": "node3"}}, "egressIP": "192.168.1.104"}
    assert c.upsert_policy(policy(dst=("203.0.113.0/24", "198.18.7.0/24"), excl=excl, gw=gw)) == 33
    assert {w[3] for w in em.writes} == {"192.168.1.104"}
    em.writes.clear()   # the same policy again: nothing
    assert c.upsert_policy(policy(dst=("203.0.113.0/24", "198.18.7.0/24"), excl=excl, gw=gw)) == 0
    assert em.writes == []
    # a selector edit: app2's pod in, app1's out; a later pod upsert sees the new selector
    assert c.upsert_policy(policy(pods={"app": "app2"}, dst=("203.0.113.0/24",), gw=gw)) == 34
    assert set(c.desired) == {("10.0.2.32", "203.0.113.0/24")}
    c.upsert_pod(Pod("late", uid="ul", labels={"app": "app2"}, ips=("10.0.2.40",), node="node2"))
    full = Compiler(c.cluster.copy(), c.policies)
    assert map_state(em) == c.desired == full.desired and len(c.desired) == 2


# --- property: incremental == full recompile == a plain oracle ------------------------------------


def oracle(cluster, policies, view=None, ids=None):
    """Cilium's semantics spelled out plainly: every policy, every pod, first writer by (namespace,
    name, uid) wins (a recreated pod beside its old self: the compiler's order among a key's writers);
    `ids` the policy ids ({name: id}; default: 1, 2, ... in name order)."""
    out = {}
    if ids is None:
        ids = {p.name: i for i, p in enumerate(sorted(policies, key=lambda p: p.name), 1)}
    for p in sorted(policies, key=lambda p: p.name):
        gws = resolve_gateways(p, cluster, view)
        for pod in sorted(cluster.pods.values(), key=lambda p: (p.namespace, p.name, p.uid)):
            if not p.matches_labels(cluster.pod_labels(pod)):
                continue
            if not p.matches_node(cluster.node_labels(pod.node)):
                continue
            g = gws[fnv1a_32(pod.uid) % len(gws)]
            mine = {}
            for ip in pod.ips:
                v6 = ":" in ip
                for d in p.destination_cidrs:
                    if (":" in d) == v6:
                        mine[(ip, d)] = EgressEntry(ip, d, g.egress_ip6 if v6 else g.egress_ip4, g.gateway_ip,
                                                    ids[p.name])
                for d in p.excluded_cidrs:
                    if (":" in d) == v6:
                        mine[(ip, d)] = EgressEntry(ip, d, g.egress_ip6 if v6 else g.egress_ip4, EXCLUDED_CIDR,
                                                    ids[p.name])
            for key, t in mine.items():
                out.setdefault(key, t)
    return out


def _without_ips(cluster, down):
    """The oracle's view of down nodes: Cilium passes over a node without an IPv4 node IP, the same way."""
    out = cluster.copy()
    for name in down:
        if name in out.nodes:
            out.nodes[name] = replace(out.nodes[name], internal_ip=None)
    return out


NODE_POOL = [
    node("n1", "192.168.1.1", labels={"gw": "y"}),
    node("n2", "192.168.1.2", "192.168.1.100/24", labels={"gw": "y", "zone": "a"}),
    node("n2", "192.168.1.22", labels={"zone": "b"}),
    node("n3", "192.168.1.3", "192.168.1.100/24", "2001:db8::3/64", labels={"gw": "y", "zone": "b"}, default6="eth0"),
    node("n4", "192.168.1.4", labels={"zone": "a"}),
]
POLICY_POOL = [
    policy("p-a", pods={"app": "a"}, dst=("203.0.113.0/24", "2001:db8:f::/48"), excl=("203.0.113.128/25",),
           gw={"nodeSelector": {"matchLabels": {"gw": "y"}}, "egressIP": "192.168.1.100"}),
    policy("p-b", selectors=[{"namespaceSelector": {"matchLabels": {"team": "t1"}}}], dst=("203.0.113.0/24",),
           gws=[{"nodeSelector": {"matchLabels": {"name": n}}} for n in ("n1", "n2", "n3", "n4")]),
    policy("p-c", selectors=[{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In",
                                                                   "values": ["a", "b"]}]},
                              "nodeSelector": {"matchLabels": {"zone": "a"}}}],
           dst=("203.0.113.0/25", "198.51.100.0/24"), gw={"nodeSelector": {"matchLabels": {"zone": "b"}}}),
    policy("p-d", selectors=[{"podSelector": {}}], dst=("0.0.0.0/0", "::/0"), excl=("198.51.100.0/24",),
           gw={"nodeSelector": {"matchLabels": {"name": "n3"}}, "interface": "eth0"}),
    policy("p-a", pods={"app": "b"}, dst=("203.0.113.0/24",), gw={"nodeSelector": {"matchLabels": {"name": "n9"}}}),
    # edits keeping a policy's selectors (only the entries whose value changed are rewritten): CIDRs moved,
    # an excluded CIDR equal to a destination, other gateways, another family
    policy("p-a", pods={"app": "a"}, dst=("203.0.113.0/25", "2001:db8:f::/48"),
           gw={"nodeSelector": {"matchLabels": {"zone": "b"}}, "egressIP": "192.168.1.100"}),
    policy("p-b", selectors=[{"namespaceSelector": {"matchLabels": {"team": "t1"}}}],
           dst=("203.0.113.0/24", "198.51.100.0/24", "2001:db8:f::/48"), excl=("198.51.100.0/24",),
           gws=[{"nodeSelector": {"matchLabels": {"name": n}}} for n in ("n2", "n3")]),
    policy("p-c", selectors=[{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In",
                                                                   "values": ["a", "b"]}]},
                              "nodeSelector": {"matchLabels": {"zone": "a"}}}],
           dst=("198.51.100.0/24",), gw={"nodeSelector": {"matchLabels": {"gw": "y"}}, "egressIP": "192.168.1.100"}),
    policy("p-d", selectors=[{"podSelector": {}}], dst=("0.0.0.0/0",), excl=("198.51.100.0/24", "::/0"),
           gw={"nodeSelector": {"matchLabels": {"name": "n2"}}, "egressIP": "192.168.1.100"}),
]

pod_st = st.builds(
    lambda name, ns, app, ips, node_name, uid: Pod(name, ns, uid, {"app": app}, tuple(ips), node_name),
    st.sampled_from(["a", "b", "c", "d", "e"]),
    st.sampled_from(["ns1", "ns2"]),
    st.sampled_from(["a", "b", "c"]),
    st.lists(st.sampled_from(["10.0.1.1", "10.0.1.2", "10.0.2.1", "10.0.2.2", "fd00::1", "fd00::2"]),
             max_size=2, unique=True),
    st.sampled_from(["n1", "n2", "n3", "n4", "gone"]),
    st.sampled_from(["uid-1", "uid-2", "uid-3", "3f2a9c1e-aa"]),
)
op_st = st.one_of(
    st.tuples(st.just("upsert_pod"), pod_st),
    st.tuples(st.just("remove_pod"), st.sampled_from(["ns1", "ns2"]), st.sampled_from(["a", "b", "c", "d", "e"])),
    st.tuples(st.just("upsert_node"), st.sampled_from(NODE_POOL)),
    st.tuples(st.just("remove_node"), st.sampled_from(["n1", "n2", "n3", "n4"])),
    st.tuples(st.just("upsert_policy"), st.sampled_from(POLICY_POOL)),
    st.tuples(st.just("remove_policy"), st.sampled_from(["p-a", "p-b", "p-c", "p-d"])),
    st.tuples(st.just("set_down"), st.frozensets(st.sampled_from(["n1", "n2", "n3", "n4"]))),
    st.tuples(st.just("upsert_namespace"),
              st.builds(Namespace, st.sampled_from(["ns1", "ns2"]),
                        st.sampled_from([{}, {"team": "t1"}, {"team": "t2"}]))),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_st, max_size=25), view=st.sampled_from([None, "n2", "n3"]))
def test_incremental_equals_full_recompile(ops, view):
    em = EgressMap()
    c = Compiler(Cluster(NODE_POOL[:2], [Namespace("ns1", {"team": "t1"})]), POLICY_POOL[:2], node=view,
                 egress_map=em)
    for op, *args in ops:
        try:
            getattr(c, op)(*args)
        except KeyError:
            assert op.startswith("remove")
    full = Compiler(c.cluster.copy(), c.policies, node=view, down=c.down)
    assert c.desired == renumbered(full.desired, full.policy_ids, c.policy_ids)
    assert c.desired == oracle(_without_ips(c.cluster, c.down), c.policies, view, c.policy_ids)
    assert map_state(em) == c.desired
    assert sorted(map(str, c.conflicts())) == sorted(map(str, full.conflicts()))


# --- gateway health: Cilium's rules over the nodes that are up ------------------------


def _ha_cluster(*pods):
    nodes = [node("node1", "192.168.1.1"), node("node2", "192.168.1.2"),
             node("node3", "192.168.1.3", labels={"egress-gateway": "true"}),
             node("node4", "192.168.1.4", "192.168.1.110/24", labels={"egress-gateway": "true"})]
    pods = [Pod("app1", "default", "uid-app1", {"app": "app1"}, ("10.0.1.93",), "node1"), *pods]
    return Cluster(nodes, [Namespace("default")], pods)


HA_GW = {"nodeSelector": {"matchLabels": {"egress-gateway": "true"}}, "interface": "eth0"}
KEY = ("10.0.1.93", "203.0.113.0/24")


def test_a_down_gateway_is_skipped_for_the_next_matching_node_with_its_own_egress_ip():
    em = EgressMap()
    c = Compiler(_ha_cluster(), [policy(gw=HA_GW)], egress_map=em)
    assert c.desired[KEY] == entry(*KEY, "192.168.1.3", "192.168.1.3")
    assert c.set_down({"node3"}) == 1
    # node4's egress IP from its own interface: the first address of eth0
    assert c.desired[KEY] == entry(*KEY, "192.168.1.4", "192.168.1.4")
    assert map_state(em) == c.desired
    (g,) = c.gateways("p")
    assert (g.node, g.skipped, g.problem) == ("node4", ("node3",), None)
    assert c.set_down({"node3"}) == 0                      # no change, no write
    assert c.set_down(set()) == 1                          # node3 is back: it is first by name again
    assert c.desired[KEY] == entry(*KEY, "192.168.1.3", "192.168.1.3") and map_state(em) == c.desired


def test_every_matching_node_down_is_no_gateway_and_says_why():
    c = Compiler(_ha_cluster(), [policy(gw=HA_GW)])
    c.set_down({"node3", "node4"})
    assert c.desired[KEY] == entry(*KEY, "0.0.0.0", GATEWAY_NOT_FOUND)
    assert [str(p) for p in c.problems()] == [
        "policy 'p': every node matching nodeSelector {'matchLabels': {'egress-gateway': 'true'}} is down "
        "(node3, node4): source nodes drop this traffic (no gateway)"]


def test_source_node_view_keeps_cilium_egress_ip_rules_after_failover():
    """On node1 the egress IP stays unknown (0.0.0.0); on node4 it is node4's own, once node3 is down."""
    on1, on4 = (Compiler(_ha_cluster(), [policy(gw=HA_GW)], node=n) for n in ("node1", "node4"))
    assert on4.desired[KEY] == entry(*KEY, "0.0.0.0", "192.168.1.3")
    for c in (on1, on4):
        c.set_down({"node3"})
    assert on1.desired[KEY] == entry(*KEY, "0.0.0.0", "192.168.1.4")
    assert on4.desired[KEY] == entry(*KEY, "192.168.1.4", "192.168.1.4")


def test_egress_gateways_repin_over_the_gateways_that_are_up():
    pods = [Pod(f"p{i}", uid=f"uid-{i}", labels={"app": "app1"}, ips=(f"10.0.1.{i}",), node="node1")
            for i in range(1, 30)]
    cluster = _ha_cluster(*pods)
    gws = [{"nodeSelector": {"matchLabels": {"name": n}}} for n in ("node2", "node3", "node4")]
    c = Compiler(cluster, [policy(gws=gws)])
    up = ["192.168.1.2", "192.168.1.3", "192.168.1.4"]
    for pod in pods:
        assert c.desired[(pod.ips[0], "203.0.113.0/24")].gateway_ip == up[fnv1a_32(pod.uid) % 3]
    c.set_down({"node3"})
    up = ["192.168.1.2", "192.168.1.4"]
    assert [g.gateway_ip for g in c.gateways("p")] == up
    for pod in pods:
        assert c.desired[(pod.ips[0], "203.0.113.0/24")].gateway_ip == up[fnv1a_32(pod.uid) % 2]


def test_health_change_rewrites_only_the_affected_policies():
    cluster = _ha_cluster(Pod("app2", "default", "uid-app2", {"app": "app2"}, ("10.0.2.32",), "node2"))
    seed = policy("seed", pods={"app": "app2"}, gw={"nodeSelector": {"matchLabels": {"name": "node2"}},
                                                     "egressIP": "192.168.1.2"})
    writes = []

    class Recording:
        def __init__(self, em):
            self.em = em

        def sync(self, rows):
            self.em.sync(rows)

        def set(self, *a):
            writes.append(a)
            self.em.set(*a)

        set_excluded = remove = set

    c = Compiler(cluster, [policy("ha", gw=HA_GW), seed], egress_map=Recording(EgressMap()))
    assert c.set_down({"node3"}) == 1
    # app2's entry untouched
    assert writes == [("10.0.1.93", "203.0.113.0/24", "192.168.1.4", "192.168.1.4", c.policy_id("ha"))]
    assert c.gateway_candidates() == {"node2": "192.168.1.2", "node3": "192.168.1.3", "node4": "192.168.1.4"}


def test_without_a_down_set_the_choice_is_ciliums():
    c = Compiler(_ha_cluster(), [policy(gw=HA_GW)], down=())
    assert c.down == frozenset() and c.desired[KEY].gateway_ip == "192.168.1.3"
