"""parse_object (one stored node, namespace or pod) against the cluster file's loader as its oracle.

The store parses each object alone with the loader's per-object builders
(cluster.node_from_dict, ...) and a C fast path for canonical IPv4
addresses; what it accepts, and the key, field and message it rejects with,
must be what parsing the object as the only entry of a cluster file gives.
"""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egresscore.cluster import Cluster, ClusterError, _ip
from egresscore.sources.objects import ObjectError, parse_object


def _reference(kind, names, key, doc):
    """The object, or (field, message): the whole-file loader on a one-object cluster file."""
    doc = dict(doc)
    if kind == "pods":
        doc.setdefault("namespace", names[0])
        if doc["namespace"] != names[0]:
            return ("namespace", f"{doc['namespace']!r} does not match the key's namespace {names[0]!r}")
    try:
        cluster = Cluster.from_dict({kind: [doc]}, key)
    except ClusterError as exc:
        field = exc.field or ""
        prefix = f"{kind}[0]"
        field = field[len(prefix):].lstrip(".") if field.startswith(prefix) else field
        return (field or None, exc.message)
    obj = next(iter(getattr(cluster, kind).values()))
    if obj.name != names[-1]:
        return ("name", f"{obj.name!r} does not match the key's name {names[-1]!r}")
    return obj


def _check(kind, names, doc):
    key = f"egresscore/v1/t/{kind}/{'/'.join(names)}"
    want = _reference(kind, names, key, doc)
    try:
        _, got = parse_object(kind, names, key, json.dumps(doc).encode())
    except ObjectError as exc:
        assert exc.key == key
        assert isinstance(want, tuple), f"{doc!r}: rejected ({exc}) but the loader accepts it"
        assert (exc.field, exc.message) == want
        return
    assert got == want, f"{doc!r}"


def _mostly(good, bad):
    """Good values half the time (an object must get past its other fields for a late check to be reached)."""
    return st.one_of(st.sampled_from(good), st.sampled_from(bad))


IPS = _mostly(["10.0.1.5", "10.0.1.6", "fd00:10:1::5", "FD00:10:1:0::5", "0.0.0.0"],
              ["010.0.1.5", "10.0.1", "10.0.1.256", " 10.0.1.7", "::ffff:10.0.1.5", "1.2.3.4\u0000", "x", 5, None])
LABELS = st.one_of(st.none(), st.just([]), st.dictionaries(st.sampled_from(["app", "tier", "io.k8s"]),
                                                           _mostly(["a", "b", ""], [0, 1, None]), max_size=3))
NAMES = _mostly(["p1", "p2"], ["", None, 7])
POD = st.fixed_dictionaries({"name": NAMES}, optional={
    "namespace": _mostly(["default", "other"], [None, ""]), "uid": st.sampled_from(["u1", "", None]),
    "labels": LABELS, "ips": st.one_of(st.lists(IPS, max_size=3), IPS), "node": st.sampled_from(["node1", None]),
    "serviceAccountName": st.sampled_from(["sa", None]), "bogus": st.just(1)})
NODE = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["node1", "node2", "", None]), "labels": LABELS, "internalIP": IPS,
    "podCIDRs": st.lists(st.sampled_from(["10.0.1.0/24", "10.0.1.5/24", "fd00:10:1::/64", "nope"]), max_size=2),
    "interfaces": st.lists(st.fixed_dictionaries({}, optional={
        "name": st.sampled_from(["eth0", None, 3]),
        "addresses": st.lists(st.sampled_from(["192.168.1.3/24", "192.168.1.3", "bad/24"]), max_size=2),
        "mtu": st.just(1500)}), max_size=2),
    "defaultRouteInterface": st.sampled_from(["eth0", None]), "extra": st.just(0)})
NAMESPACE = st.fixed_dictionaries({}, optional={"name": st.sampled_from(["default", "", None]), "labels": LABELS,
                                                "x": st.just(1)})


@settings(max_examples=600, deadline=None)
@given(POD, st.sampled_from([["default", "p1"], ["other", "p2"]]))
def test_a_pod_parses_as_the_file_loader_parses_it(doc, names):
    _check("pods", names, doc)


@settings(max_examples=300, deadline=None)
@given(NODE)
def test_a_node_parses_as_the_file_loader_parses_it(doc):
    _check("nodes", ["node1"], doc)


@settings(max_examples=100, deadline=None)
@given(NAMESPACE)
def test_a_namespace_parses_as_the_file_loader_parses_it(doc):
    _check("namespaces", ["default"], doc)


def test_a_pod_with_one_ip_twice_is_rejected_naming_the_ip():
    with pytest.raises(ObjectError, match=r"ips: duplicate pod IP '10.0.1.5'"):
        parse_object("pods", ["default", "p1"], "k", b'{"name": "p1", "ips": ["10.0.1.5", "10.0.1.5"]}')
    with pytest.raises(ObjectError, match=r"ips: duplicate pod IP 'fd00:10:1::5'"):
        parse_object("pods", ["default", "p1"], "k", b'{"name": "p1", "ips": ["fd00:10:1::5", "FD00:10:1:0::5"]}')


@pytest.mark.parametrize("text,want", [
    ("10.0.1.5", "10.0.1.5"), (" 10.0.1.5 ", "10.0.1.5"), ("FD00::1", "fd00::1"), ("0.0.0.0", "0.0.0.0"),
    ("010.0.1.5", None), ("10.0.1", None), ("10.0.1.256", None), ("1.2.3.4\u0000", None), ("", None),
])
def test_ip_fast_path_agrees_with_ipaddress(text, want):
    if want is None:
        with pytest.raises(ClusterError, match="is not an IP address"):
            _ip(text, "here")
    else:
        assert _ip(text, "here") == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "del", "copy"]), st.sampled_from(["u1", "u2", "u3", "u4"]),
                          st.sampled_from(["web", "db"])), max_size=30))
def test_pod_table_name_index_against_a_plain_model(ops):
    """PodTable's (namespace, name) index (a lone uid, or a dict while names are shared) against a list model."""
    from egresscore.cluster import Pod, PodTable

    table, model = PodTable(), {}   # model: uid -> pod, in the order of their last write
    for op, uid, name in ops:
        if op == "set":
            model.pop(uid, None)
            model[uid] = table[uid] = Pod(name, "default", uid)
        elif op == "del" and uid in model:
            del model[uid], table[uid]
        elif op == "copy" and uid in ("u1", "u2"):
            table = PodTable(table)   # keeps the index as it is
        elif op == "copy":            # rebuilt from the pods in the table's order: that order is the age
            model = {u: model[u] for u in list(table)}
            table = Cluster(pods=table.values()).pods
        for n in ("web", "db"):
            want = [p for p in model.values() if p.name == n]
            assert table.named("default", n) == want
            assert (table[("default", n)] if want else None) == (want[-1] if want else None)
        assert dict(table) == model
