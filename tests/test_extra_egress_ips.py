"""The egresscore.io/extra-egress-ips annotation (issue 15 point 5): parsed and
checked with the policy (field named, the policy rejected alone, the rest of
the CRD as Cilium reads it), resolved on the gateway node (every address must
be the node's), and turned into the NAT's spill chains (Compiler.spill_chains)."""
import pytest

from egresscore.cluster import Cluster, Interface, Node, Pod
from egresscore.compiler import Compiler
from egresscore.policy import EXTRA_EGRESS_IPS, PolicyError, parse_policy
from egresscore.sources.kubernetes import convert

EXTRA = ["192.168.1.111", "192.168.1.112"]


def doc(name="p", extra=",".join(EXTRA), dst=("203.0.113.0/24",), gw=None, annotations=None):
    meta = {"name": name}
    if annotations is not None:
        meta["annotations"] = annotations
    elif extra is not None:
        meta["annotations"] = {EXTRA_EGRESS_IPS: extra, "kubectl.kubernetes.io/last-applied-configuration": "{}"}
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": meta,
            "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
                     "destinationCIDRs": list(dst),
                     "egressGateway": gw or {"nodeSelector": {"matchLabels": {"gw": "yes"}},
                                             "egressIP": "192.168.1.3"}}}


def cluster(node3_addrs=("192.168.1.3/24", "192.168.1.111/24", "192.168.1.112/24")):
    return Cluster(
        nodes=[Node("node1", {"name": "node1"}, "192.168.1.1", (Interface("eth0", ("192.168.1.1/24",)),), "eth0"),
               Node("node3", {"name": "node3", "gw": "yes"}, "192.168.1.3",
                    (Interface("eth0", tuple(node3_addrs)),), "eth0")],
        pods=[Pod("app1", "default", "uid-1", {"app": "app1"}, ("10.0.1.5",), "node1")])


def policy(**kw):
    return parse_policy(doc(**kw))[0]


def test_the_annotation_is_parsed_in_order_and_other_annotations_are_ignored():
    p = policy(extra=" 192.168.1.112 ,192.168.1.111")
    assert p.extra_egress_ips == ("192.168.1.112", "192.168.1.111")
    assert policy(extra=None).extra_egress_ips == ()
    assert policy(annotations={"other": "x"}).extra_egress_ips == ()


@pytest.mark.parametrize("extra, field, message", [
    ("192.168.1.111,nope", "[1]", "'nope' is not an IP address"),
    ("192.168.1.111,,192.168.1.112", "[1]", "is empty"),
    ("2001:db8::1", "[0]", "is IPv6, but the policy has no IPv6 destinationCIDRs"),
    ("192.168.1.111,192.168.1.111", "[1]", "listed twice"),
    ("192.168.1.3", "[0]", "is the policy's egressIP already"),
    (",".join(f"192.168.1.{100 + i}" for i in range(9)), "", "more than 8 IPv4"),
    (7, "", "must be a string"),
])
def test_a_bad_annotation_rejects_the_policy_naming_it_and_the_field(extra, field, message):
    with pytest.raises(PolicyError) as exc:
        parse_policy(doc(name="spill", extra=extra))
    assert exc.value.policy == "spill"
    assert exc.value.path == f"metadata.annotations.{EXTRA_EGRESS_IPS}{field}"
    assert message in str(exc.value) and "policy 'spill'" in str(exc.value)


def test_annotations_must_be_a_mapping():
    with pytest.raises(PolicyError, match="metadata.annotations: must be a mapping"):
        parse_policy(doc(annotations=["x"]))


def test_the_gateway_node_gets_the_chain_and_source_nodes_get_none():
    c = Compiler(cluster(), [policy()], node="node3")
    assert c.spill_chains() == {"192.168.1.3": tuple(EXTRA)}
    assert c.gateways("p")[0].extra_ips == tuple(EXTRA)
    assert c.problems() == []
    # the egress map is Cilium's: the annotation changes no entry
    assert [(e.egress_ip, e.gateway_ip) for e in c.desired.values()] == [("192.168.1.3", "192.168.1.3")]
    assert Compiler(cluster(), [policy()], node="node1").spill_chains() == {}


def test_an_address_not_on_the_gateway_node_turns_the_annotation_off_there():
    c = Compiler(cluster(("192.168.1.3/24", "192.168.1.111/24")), [policy()], node="node3")
    assert c.spill_chains() == {}
    (problem,) = c.problems()
    assert problem.policy == "p"
    assert f"metadata.annotations.{EXTRA_EGRESS_IPS}: 192.168.1.112 is not an address of node node3" in str(problem)
    # the egress IP alone still carries the policy's traffic
    assert [e.egress_ip for e in c.desired.values()] == ["192.168.1.3"]


def test_the_chain_of_an_interface_egress_ip_leaves_the_primary_out():
    gw = {"nodeSelector": {"matchLabels": {"gw": "yes"}}, "interface": "eth0"}
    c = Compiler(cluster(), [policy(gw=gw, extra="192.168.1.3,192.168.1.112")], node="node3")
    assert c.spill_chains() == {"192.168.1.3": ("192.168.1.112",)}


def test_policies_sharing_an_egress_ip_share_only_what_they_all_list():
    a = policy(name="a", extra="192.168.1.112,192.168.1.111")
    b = policy(name="b", extra="192.168.1.111")
    c = Compiler(cluster(), [a, b], node="node3")
    assert c.spill_chains() == {"192.168.1.3": ("192.168.1.111",)}
    c.upsert_policy(policy(name="b", extra=None))      # b's traffic must never leave with an extra IP
    assert c.spill_chains() == {}
    c.remove_policy("b")
    assert c.spill_chains() == {"192.168.1.3": ("192.168.1.112", "192.168.1.111")}


def test_the_kubernetes_source_keeps_the_annotation():
    obj = doc()
    obj["metadata"].update(uid="u1", resourceVersion="7")
    assert convert("policy", obj).extra_egress_ips == tuple(EXTRA)
    obj["metadata"]["annotations"][EXTRA_EGRESS_IPS] = "bad"
    with pytest.raises(PolicyError, match=EXTRA_EGRESS_IPS):
        convert("policy", obj)
