import os
import textwrap

import pytest

from egresscore.policy import (
    LabelSelector,
    PolicyError,
    Requirement,
    load_policies,
    parse_label_selector,
    parse_policy,
)

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")

GOOD = """\
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata:
  name: {name}
spec:
  selectors:
    - podSelector:
        matchLabels: {{app: app1}}
  destinationCIDRs: ["203.0.113.0/24"]
  egressGateway:
    nodeSelector: {{matchLabels: {{node.kubernetes.io/name: node3}}}}
    egressIP: 192.168.1.3
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def doc(spec_extra=None, **spec):
    base = {
        "selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
        "destinationCIDRs": ["203.0.113.0/24"],
        "egressGateway": {"nodeSelector": {"matchLabels": {"node": "n3"}}, "egressIP": "192.168.1.3"},
    }
    base.update(spec)
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": {"name": "p"}, "spec": base}


def test_seed_example_loads():
    result = load_policies(os.path.join(EXAMPLES, "egress-sample.yaml"))
    assert result.errors == [] and result.warnings == []
    (p,) = result.policies
    assert p.name == "egress-sample"
    assert p.destination_cidrs == ("203.0.113.0/24",)
    assert p.excluded_cidrs == ("203.0.113.128/25",)
    (gw,) = p.gateways
    assert gw.egress_ip == "192.168.1.3" and gw.interface is None
    assert gw.node_selector.matches({"node.kubernetes.io/name": "node3"})
    assert p.matches_labels({"app": "app1", "io.kubernetes.pod.namespace": "default"})
    assert not p.matches_labels({"app": "app2"})


def test_multi_document_file_rejects_bad_document_alone(tmp_path):
    bad = GOOD.format(name="bad").replace("192.168.1.3", "192.168.1.300")
    path = write(tmp_path, "p.yaml", GOOD.format(name="one") + "---\n" + bad + "---\n" + GOOD.format(name="three"))
    result = load_policies(path)
    assert [p.name for p in result.policies] == ["one", "three"]
    (err,) = result.errors
    assert isinstance(err, PolicyError) and isinstance(err, ValueError)
    assert err.file == path and err.document == 2 and err.policy == "bad"
    assert err.path == "spec.egressGateway.egressIP"
    assert str(err) == (f"{path}: document 2 (line 25): policy 'bad': "
                        "spec.egressGateway.egressIP: '192.168.1.300' is not an IP address")


def test_bad_yaml_document_is_rejected_alone(tmp_path):
    path = write(tmp_path, "p.yaml", GOOD.format(name="one") + "---\nspec: [unclosed\n---\n" + GOOD.format(name="two"))
    result = load_policies(path)
    assert [p.name for p in result.policies] == ["one", "two"]
    (err,) = result.errors
    assert err.document == 2 and "invalid YAML" in str(err) and "line 1" in str(err)


def test_folder_recursive_sorted_and_duplicates(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "b.yaml", GOOD.format(name="same"))
    write(tmp_path, "sub/a.yml", GOOD.format(name="other"))
    write(tmp_path, "a.yaml", GOOD.format(name="same"))
    write(tmp_path, "notes.txt", "not yaml: [")
    result = load_policies(str(tmp_path))
    assert sorted(p.name for p in result.policies) == ["other", "same"]
    (err,) = result.errors
    assert err.file.endswith("b.yaml") and "duplicate policy name" in str(err) and "a.yaml" in str(err)


def test_list_kinds_and_missing_path(tmp_path):
    text = """\
    apiVersion: v1
    kind: List
    items:
      - {apiVersion: cilium.io/v2, kind: CiliumEgressGatewayPolicy, metadata: {name: a},
         spec: {selectors: [{podSelector: {}}], destinationCIDRs: [0.0.0.0/0],
                egressGateway: {nodeSelector: {}}}}
    """
    result = load_policies(write(tmp_path, "l.yaml", text), str(tmp_path / "missing.yaml"))
    assert [p.name for p in result.policies] == ["a"]
    (err,) = result.errors
    assert "no such file" in str(err)


@pytest.mark.parametrize(
    "mutate, path, message",
    [
        (lambda d: d.update(kind="Deployment"), "kind", "'Deployment' is not 'CiliumEgressGatewayPolicy'"),
        (lambda d: d.pop("kind"), "kind", "is required"),
        (lambda d: d.update(apiVersion="cilium.io/v2alpha1"), "apiVersion", "is not 'cilium.io/v2'"),
        (lambda d: d["metadata"].pop("name"), "metadata.name", "is required"),
        (lambda d: d["metadata"].update(name="Bad_Name"), "metadata.name", "not a valid Kubernetes object name"),
        (lambda d: d.update(extra=1), "extra", "unknown field"),
        (lambda d: d["spec"].update(destinationCIDR=[]), "spec.destinationCIDR", "unknown field"),
        (lambda d: d["spec"].pop("selectors"), "spec.selectors", "is required"),
        (lambda d: d["spec"].pop("destinationCIDRs"), "spec.destinationCIDRs", "is required"),
        (lambda d: d["spec"].update(destinationCIDRs=["10.0.0.0/33"]), "spec.destinationCIDRs[0]",
         "'10.0.0.0/33' is not a CIDR"),
        (lambda d: d["spec"].update(destinationCIDRs=["10.0.0.1"]), "spec.destinationCIDRs[0]", "is not a CIDR"),
        (lambda d: d["spec"].update(destinationCIDRs="10.0.0.0/8"), "spec.destinationCIDRs", "must be a list"),
        (lambda d: d["spec"].update(excludedCIDRs=["nope"]), "spec.excludedCIDRs[0]", "'nope' is not a CIDR"),
        (lambda d: d["spec"].pop("egressGateway"), "spec.egressGateway", "is required"),
        (lambda d: d["spec"]["egressGateway"].update(interface="eth1"), "spec.egressGateway",
         "can't specify both an interface and an egress IP"),
        (lambda d: d["spec"]["egressGateway"].pop("nodeSelector"), "spec.egressGateway.nodeSelector", "is required"),
        (lambda d: d["spec"]["egressGateway"].update(egressIP="192.168.1.300"), "spec.egressGateway.egressIP",
         "'192.168.1.300' is not an IP address"),
        (lambda d: d["spec"]["egressGateway"].update(egressIP=42), "spec.egressGateway.egressIP", "must be a string"),
        (lambda d: d["spec"]["egressGateway"].update(egressIPs=[]), "spec.egressGateway.egressIPs", "unknown field"),
        (lambda d: d["spec"].update(selectors=[{}]), "spec.selectors[0]", "needs a podSelector or a namespaceSelector"),
        (lambda d: d["spec"].update(selectors=[{"nodeSelector": {}}]), "spec.selectors[0]", "needs a podSelector"),
        (lambda d: d["spec"].update(selectors=[{"podSelector": {"matchLabels": {"a": True}}}]),
         "spec.selectors[0].podSelector.matchLabels.a", "must be a string"),
        (lambda d: d["spec"].update(
            selectors=[{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}]),
         "spec.selectors[0].podSelector.matchExpressions[0].operator", "'Is' is not one of"),
        (lambda d: d["spec"].update(
            selectors=[{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]),
         "spec.selectors[0].podSelector.matchExpressions[0].values", "must be non-empty"),
        (lambda d: d["spec"].update(
            selectors=[{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}]),
         "spec.selectors[0].podSelector.matchExpressions[0].values", "must be empty"),
        (lambda d: d["spec"].update(egressGateways=[{"nodeSelector": {}, "egressIP": "1.2.3.4"}] * 65),
         "spec.egressGateways", "at most 64"),
        (lambda d: d["spec"].update(egressGateways=[{"nodeSelector": {}, "interface": "a", "egressIP": "1.2.3.4"}]),
         "spec.egressGateways[0]", "can't specify both"),
    ],
)
def test_validation_errors_name_the_field(mutate, path, message):
    d = doc()
    mutate(d)
    with pytest.raises(PolicyError) as info:
        parse_policy(d)
    assert info.value.path == path
    assert message in info.value.message


def test_validation_error_of_non_mapping_document():
    with pytest.raises(PolicyError, match="must be a mapping"):
        parse_policy(["a", "list"])


def test_plural_gateways_win_over_singular_with_a_warning():
    d = doc(egressGateways=[{"nodeSelector": {"matchLabels": {"g": "1"}}, "interface": "eth1"},
                            {"nodeSelector": {"matchLabels": {"g": "2"}}}])
    policy, warnings = parse_policy(d)
    assert [g.interface for g in policy.gateways] == ["eth1", None]
    assert any("egressGateway is ignored" in w for w in warnings)


def test_cidrs_are_canonical_and_ipv6_accepted():
    d = doc(destinationCIDRs=["203.0.113.5/24", "2001:db8::/32", "203.0.113.0/24"],
            excludedCIDRs=["2001:db8:1::/48", "198.51.100.0/24"])
    d["spec"]["egressGateway"]["egressIP"] = "2001:db8::100"
    policy, warnings = parse_policy(d)
    assert policy.destination_cidrs == ("203.0.113.0/24", "2001:db8::/32")
    assert policy.excluded_cidrs == ("2001:db8:1::/48", "198.51.100.0/24")
    assert policy.gateways[0].egress_ip == "2001:db8::100"
    assert policy.families == {4, 6}
    assert any("198.51.100.0/24" in w and "not inside any destinationCIDR" in w for w in warnings)


# --- selector semantics (Kubernetes label selectors) ---------------------------

SEL_CASES = [
    # (selector, labels, matches)
    ({}, {}, True),
    ({}, {"a": "1"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchLabels": {"a": "1"}}, {}, False),
    ({"matchLabels": {"a": "1", "b": "2"}}, {"a": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "3"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "2"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"}, False),
    ({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"}, False),
    ({"matchLabels": {"k8s:a": "1"}}, {"a": "1"}, True),  # Cilium's label source prefix
]


@pytest.mark.parametrize("selector, labels, expected", SEL_CASES)
def test_label_selector_semantics(selector, labels, expected):
    assert parse_label_selector(selector).matches(labels) is expected


def test_namespace_and_node_selectors_follow_cilium():
    d = doc(selectors=[
        {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {"matchLabels": {"app": "x"}}},
        {"namespaceSelector": {}, "nodeSelector": {"matchLabels": {"zone": "z1"}}},
    ])
    policy, _ = parse_policy(d)
    ns_a = {"io.kubernetes.pod.namespace": "ns", "io.cilium.k8s.namespace.labels.team": "a"}
    assert policy.matches_labels({**ns_a, "app": "x"})
    assert policy.matches_labels({"io.kubernetes.pod.namespace": "other"})  # empty namespaceSelector: all
    # the nodeSelectors of all entries gate every pod (Cilium aggregates them)
    assert policy.matches_node({"zone": "z1"}) and not policy.matches_node({"zone": "z2"})
    only_pod, _ = parse_policy(doc())
    assert only_pod.matches_node({})


def test_requirement_and_selector_are_hashable_values():
    a = LabelSelector((("a", "1"),), (Requirement("b", "In", frozenset({"x"})),))
    assert a == parse_label_selector({"matchLabels": {"a": "1"},
                                      "matchExpressions": [{"key": "b", "operator": "In", "values": ["x"]}]})
    assert hash(a)


def test_bad_selector_outside_a_policy_is_a_value_error():
    with pytest.raises(ValueError, match="selector.matchLabels.a: must be a string"):
        parse_label_selector({"matchLabels": {"a": 1}})


# --- never crash on bad input ------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.text(max_size=12),
                    st.sampled_from(["203.0.113.0/24", "::/0", "192.168.1.3", "eth0", "In", "Exists", "app"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["matchLabels", "matchExpressions", "key", "operator", "values", "podSelector",
                                     "namespaceSelector", "nodeSelector", "egressIP", "interface", "app", "x"]),
                    inner, max_size=4)), max_leaves=12)
specs = st.fixed_dictionaries({}, optional={
    "selectors": values, "destinationCIDRs": values, "excludedCIDRs": values,
    "egressGateway": values, "egressGateways": values, "bogus": values})


@settings(max_examples=300, deadline=None)
@given(spec=st.one_of(specs, values), name=st.one_of(st.just("p"), scalars))
def test_parse_policy_only_raises_policy_error(spec, name):
    d = {"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": {"name": name}, "spec": spec}
    try:
        policy, _ = parse_policy(d)
    except PolicyError as exc:
        assert exc.path is None or isinstance(exc.path, str)
        assert str(exc)
    else:
        assert policy.name == "p"


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("-:{}[]\n ab01./'\"&*!%#|>")), max_size=80))
def test_load_policies_never_raises_on_garbage(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    path.write_text(text)
    result = load_policies(str(path))
    assert result.policies == [] or all(p.name for p in result.policies)
    assert all(isinstance(e, PolicyError) for e in result.errors)
