"""The cluster model: nodes, namespaces and pods, as the compiler sees them.

Built in code, loaded from a YAML cluster file (see examples/cluster.yaml), or,
for the local node, read from the host with pyroute2 (`Node.from_host`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from gc import is_tracked as _gc_is_tracked
from socket import AF_INET as _AF_INET
from socket import inet_ntop as _ntop
from socket import inet_pton as _pton
from sys import intern as _intern
from typing import Mapping

import yaml

from ._gcpause import gc_paused, untrack
from .errors import EgressError
from .files import InputFileError, load_yaml, read_input_file, yaml_line_of
from .policy import NAMESPACE_LABEL_PREFIX, POD_NAMESPACE_LABEL

__all__ = ["Interface", "Node", "Namespace", "Pod", "Cluster", "ClusterError", "LabelFilter", "load_cluster"]

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
DEFAULT_CLUSTER_NAME = "default"  # Cilium's --cluster-name default
# a pod's own labels under these keys would pose as what Cilium derives (its namespace, its
# namespace's labels, its service account, its cluster): dropped, as Cilium sanitizes pod labels
_RESERVED_PREFIXES = (NAMESPACE_LABEL_PREFIX, "io.cilium.k8s.policy.")

# Cilium's default identity-relevant label prefixes (pkg/labelsfilter/filter.go,
# defaultLabelPrefixCfg); "!" ignores.  Regular expressions matched at the start of the key.
DEFAULT_LABEL_PREFIXES = (
    "reserved:.*",
    re.escape(POD_NAMESPACE_LABEL),
    re.escape(NAMESPACE_LABEL_PREFIX.rstrip(".")),
    re.escape("app.kubernetes.io"),
    re.escape(CLUSTER_LABEL),
    r"!io\.kubernetes",
    r"!kubernetes\.io",
    "!" + re.escape("statefulset.kubernetes.io/pod-name"),
    "!" + re.escape("apps.kubernetes.io/pod-index"),
    "!" + re.escape("batch.kubernetes.io/job-completion-index"),
    r"!.*beta\.kubernetes\.io",
    r"!k8s\.io",
    "!pod-template-generation",
    "!pod-template-hash",
    "!controller-revision-hash",
    "!annotation.*",
    "!etcd_node",
)


class LabelFilter:
    """Which labels are identity-relevant, as Cilium's label filter decides.

    Rules are Cilium's `--labels` strings, `[source:][!]regexp`, matched at
    the start of a label key; `!` ignores.  A key is kept when no ignore rule
    matches and no user rule includes (the default list alone), or when the
    longest matching include is longer than the shortest matching ignore.  A
    user include rule (like Cilium's) turns the filter into an allow list.
    `extra` is added to the default list (as `--labels` is); `defaults=False`
    starts from nothing (every label kept unless `extra` says otherwise).
    Sources: egresscore's labels are all Kubernetes labels, so rules with
    source `k8s`, `any` or none apply and other sources match nothing."""

    def __init__(self, extra=(), *, defaults=True):
        self.rules = []
        self.allow_list = False
        for i, spec in enumerate(tuple(DEFAULT_LABEL_PREFIXES if defaults else ()) + tuple(extra)):
            rule = _label_rule(spec)
            self.rules.append(rule)
            if i >= (len(DEFAULT_LABEL_PREFIXES) if defaults else 0) and not rule[0]:
                self.allow_list = True
        self._cache = {}

    def keep(self, key: str) -> bool:
        kept = self._cache.get(key)
        if kept is None:
            included = ignored = 0
            for ignore, expr in self.rules:
                if expr is None:
                    continue
                m = expr.match(key)
                if m is None:
                    continue
                if ignore:
                    if ignored == 0 or m.end() < ignored:
                        ignored = m.end()
                elif m.end() > included:
                    included = m.end()
            kept = (not self.allow_list and ignored == 0) or included > ignored
            if len(self._cache) < 65536:
                self._cache[key] = kept
        return kept

    def filter(self, labels: Mapping) -> dict:
        keep = self.keep
        return {k: v for k, v in labels.items() if keep(k)}


def _label_rule(spec):
    """(ignore, compiled regexp or None for another source) from "[source:][!]prefix"."""
    if not isinstance(spec, str) or not spec:
        raise ClusterError(f"label rule {spec!r} must be a non-empty string like 'k8s:!pod-template-hash'",
                           field="labels")
    source, sep, prefix = spec.partition(":")
    if not sep:
        source, prefix = "", spec
    ignore = prefix.startswith("!")
    if ignore:
        prefix = prefix[1:]
    if not prefix:
        raise ClusterError(f"label rule {spec!r} has no prefix", field="labels")
    try:
        expr = re.compile(prefix)
    except re.error as exc:
        raise ClusterError(f"label rule {spec!r}: bad regular expression: {exc}", field="labels") from None
    return ignore, (expr if source in ("", "k8s", "any") else None)


def identity_labels(pod, namespace, *, label_filter=None, cluster_name=None) -> dict:
    """The labels Cilium's selectors see for `pod` (its identity labels): its
    own labels less those posing as derived ones, its namespace's labels under
    io.cilium.k8s.namespace.labels., io.kubernetes.pod.namespace, its service
    account and cluster (when known); then `label_filter`, if given."""
    labels = {k: v for k, v in pod.labels.items()
              if k != POD_NAMESPACE_LABEL and not k.startswith(_RESERVED_PREFIXES)}
    labels[POD_NAMESPACE_LABEL] = pod.namespace
    for k, v in namespace.labels.items():
        labels[NAMESPACE_LABEL_PREFIX + k] = v
    if pod.service_account:
        labels[SERVICE_ACCOUNT_LABEL] = pod.service_account
    if cluster_name:
        labels[CLUSTER_LABEL] = cluster_name
    return label_filter.filter(labels) if label_filter is not None else labels


class ClusterError(EgressError, ValueError):
    """A bad cluster file or object: the file, the field (e.g. "nodes[1].name"),
    its line in the file when known, and what is wrong."""

    def __init__(self, message, *, file=None, field=None, line=None):
        self.message = message
        self.file = file
        self.field = field
        self.line = line
        super().__init__(message)

    def __str__(self):
        where = [] if self.file is None else [str(self.file)]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.field:
            where.append(self.field)
        return ": ".join(where + [self.message])


def _labels(obj, where) -> dict:
    if obj is None:
        return {}
    if type(obj) is not dict and not isinstance(obj, Mapping):  # (a plain dict skips typing's slow check)
        raise ClusterError("must be a mapping", field=f"{where}.labels")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ClusterError(f"{v!r} must be a string (quote it)", field=f"{where}.labels.{k}")
        out[_intern(k)] = _intern(v)  # a label's key and value are shared by many objects: one copy each
    return out


def _ip(value, where) -> str:
    if type(value) is str:  # the common case, a canonical IPv4 address: the C parser says so (and only so)
        try:
            if _ntop(_AF_INET, _pton(_AF_INET, value)) == value:
                return value
        except (OSError, ValueError):
            pass
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise ClusterError(f"{where}: {value!r} is not an IP address") from None


def _iface_addr(value, where) -> str:
    try:
        return str(ipaddress.ip_interface(str(value).strip()))
    except ValueError:
        raise ClusterError(f"{where}: {value!r} is not an interface address like 192.168.1.3/24") from None


def _cidr(value, where) -> str:
    try:
        return str(ipaddress.ip_network(str(value).strip(), strict=False))
    except ValueError:
        raise ClusterError(f"{where}: {value!r} is not a CIDR") from None


@dataclass(frozen=True)
class Interface:
    """A network interface and its addresses ("192.168.1.3/24"), in kernel order."""

    name: str
    addresses: tuple = ()

    def ips(self, version=None):
        for a in self.addresses:
            ip = ipaddress.ip_interface(a).ip
            if version is None or ip.version == version:
                yield str(ip)

    def first_ip(self, version):
        """The first usable address of a family (IPv6 link-local is skipped)."""
        for a in self.addresses:
            ip = ipaddress.ip_interface(a).ip
            if ip.version == version and not (version == 6 and ip.is_link_local):
                return str(ip)
        return None

    def has_ip(self, ip: str) -> bool:
        return any(ip == x for x in self.ips())


@dataclass(frozen=True)
class Node:
    """A cluster node: its internal IP is the gateway IP other nodes tunnel to."""

    name: str
    labels: Mapping = field(default_factory=dict)
    internal_ip: str | None = None
    interfaces: tuple = ()  # (Interface, ...)
    default_route_interface: str | None = None
    default_route_interface_v6: str | None = None
    pod_cidrs: tuple = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ClusterError(f"node name must be a non-empty string, not {self.name!r}")
        object.__setattr__(self, "labels", dict(self.labels))
        if self.internal_ip is not None:
            object.__setattr__(self, "internal_ip", _ip(self.internal_ip, f"node {self.name}: internalIP"))
        ifaces = tuple(
            i if isinstance(i, Interface) else Interface(i["name"], tuple(i.get("addresses", ())))
            for i in self.interfaces
        )
        ifaces = tuple(
            Interface(i.name, tuple(_iface_addr(a, f"node {self.name}: interface {i.name}") for a in i.addresses))
            for i in ifaces
        )
        object.__setattr__(self, "interfaces", ifaces)
        object.__setattr__(self, "pod_cidrs", tuple(_cidr(c, f"node {self.name}: podCIDRs") for c in self.pod_cidrs))

    @property
    def gateway_ip(self) -> str | None:
        """The IPv4 internal IP (Cilium's GetNodeIP(false)); None if it has none."""
        if self.internal_ip and ":" not in self.internal_ip:
            return self.internal_ip
        return None

    def interface(self, name):
        for i in self.interfaces:
            if i.name == name:
                return i
        return None

    def interface_with_ip(self, ip):
        for i in self.interfaces:
            if i.has_ip(ip):
                return i
        return None

    def all_ips(self):
        return {ip for i in self.interfaces for ip in i.ips()}

    @classmethod
    def from_host(cls, name, *, labels=None, internal_ip=None, pod_cidrs=(), netns=None):
        """This host's node: interfaces, addresses and default routes read with pyroute2.

        `netns` names a network namespace to read instead of the current one.
        Without `internal_ip`, the first IPv4 of the default-route interface is used.
        """
        ifaces, dflt4, dflt6 = read_host_interfaces(netns)
        if internal_ip is None and dflt4:
            for i in ifaces:
                if i.name == dflt4:
                    internal_ip = i.first_ip(4)
        return cls(name, labels or {}, internal_ip, ifaces, dflt4, dflt6, tuple(pod_cidrs))

    def with_host_interfaces(self, netns=None) -> "Node":
        """This node with interfaces and default routes replaced by the host's."""
        ifaces, dflt4, dflt6 = read_host_interfaces(netns)
        return replace(self, interfaces=ifaces, default_route_interface=dflt4, default_route_interface_v6=dflt6)

    def to_dict(self) -> dict:
        out = {"name": self.name, "labels": dict(self.labels)}
        if self.internal_ip:
            out["internalIP"] = self.internal_ip
        if self.pod_cidrs:
            out["podCIDRs"] = list(self.pod_cidrs)
        if self.default_route_interface:
            out["defaultRouteInterface"] = self.default_route_interface
        if self.default_route_interface_v6:
            out["defaultRouteInterfaceV6"] = self.default_route_interface_v6
        out["interfaces"] = [{"name": i.name, "addresses": list(i.addresses)} for i in self.interfaces]
        return out


def read_host_interfaces(netns=None):
    """(interfaces, IPv4 default-route interface, IPv6 default-route interface) via netlink."""
    from pyroute2 import IPRoute, NetNS
    from pyroute2 import netns as _netns

    if netns and netns not in _netns.listnetns():  # NetNS() would create it
        raise ClusterError(f"no network namespace named {netns!r}")
    ipr = NetNS(netns, flags=0) if netns else IPRoute()
    try:
        names = {}
        for link in ipr.get_links():
            names[link["index"]] = link.get_attr("IFLA_IFNAME")
        addrs = {idx: [] for idx in names}
        for msg in ipr.get_addr():
            idx = msg["index"]
            ip = msg.get_attr("IFA_ADDRESS")
            if msg["family"] == 2:
                ip = msg.get_attr("IFA_LOCAL") or ip
            if ip is None or idx not in addrs:
                continue
            addrs[idx].append(f"{ip}/{msg['prefixlen']}")
        default = {}
        for family, ver in ((2, 4), (10, 6)):
            best = None
            for route in ipr.get_routes(family=family, table=254):
                if route["dst_len"] != 0 or route.get_attr("RTA_DST") is not None:
                    continue
                oif = route.get_attr("RTA_OIF")
                if oif is None:
                    mp = route.get_attr("RTA_MULTIPATH")
                    if mp:
                        oif = mp[0]["oif"]
                prio = route.get_attr("RTA_PRIORITY") or 0
                if oif in names and (best is None or prio < best[0]):
                    best = (prio, names[oif])
            default[ver] = best[1] if best else None
        ifaces = tuple(Interface(names[i], tuple(addrs[i])) for i in sorted(names))
        return ifaces, default[4], default[6]
    finally:
        ipr.close()


@dataclass(frozen=True)
class Namespace:
    """A Kubernetes namespace; its labels are visible to namespaceSelectors."""

    name: str
    labels: Mapping = field(default_factory=dict)

    def __post_init__(self):
        labels = dict(self.labels)
        labels.setdefault(NAMESPACE_NAME_LABEL, self.name)  # as the API server does
        object.__setattr__(self, "labels", labels)


@dataclass(frozen=True)
class Pod:
    """A pod (Cilium endpoint), keyed by its uid (as Cilium keys endpoints:
    a recreated pod's late delete does not remove the new one); the uid also
    places it among several gateways.  Without one (a cluster file may omit
    it) the uid is "namespace/name"."""

    name: str
    namespace: str = "default"
    uid: str = ""
    labels: Mapping = field(default_factory=dict)
    ips: tuple = ()
    node: str | None = None
    service_account: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ClusterError(f"pod name must be a non-empty string, not {self.name!r}")
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "ips", tuple(_ip(ip, f"pod {self.namespace}/{self.name}: ips") for ip in self.ips))
        if not self.uid:
            object.__setattr__(self, "uid", f"{self.namespace}/{self.name}")

    @property
    def key(self):
        """(namespace, name): how people name a pod; not unique over time (see uid)."""
        return (self.namespace, self.name)


class PodTable(dict):
    """Pods by uid, with an index by (namespace, name): `table[(namespace,
    name)]` also finds one by name (the newest of that name), for callers
    that name pods as people do; `named()` lists them all.  The index holds
    a name's one uid as itself, and a tuple (uids in insertion order) only
    while several pods share the name (a recreated pod before its
    predecessor's delete): a container per pod would cost ~230 B each.
    Nothing in it is tracked by the cyclic GC (see __setitem__)."""

    def __init__(self, pods=()):
        super().__init__()
        self._named = {}
        if type(pods) is PodTable:   # a copy (a full resync's): no per-pod bookkeeping to redo
            dict.update(self, pods)
            self._named = dict(pods._named)   # its values: strings and tuples, shared
            return
        self._fill(dict(pods).items())

    @classmethod
    def of(cls, pods) -> "PodTable":
        """A table of `pods` (an iterable of Pod, keyed by their uid; a later one replaces an earlier one)."""
        table = cls()
        table._fill((p.uid, p) for p in pods)
        return table

    def _fill(self, items):
        """Many __setitem__ at once (a full resync's 10^5 pods), with the cyclic GC paused (none
        of this is a cycle, and collections would rescan the growing heap)."""
        with gc_paused():
            for uid, pod in items:
                self[uid] = pod

    def __setitem__(self, uid, pod):
        old = dict.get(self, uid)
        if old is not None:
            self._unname(old, uid)
        dict.__setitem__(self, uid, pod)
        key = (pod.namespace, pod.name)
        uids = self._named.get(key)
        if uids is None:
            self._name(key, uid)
        elif type(uids) is not tuple:
            if uids != uid:
                self._name(key, (uids, uid))
        elif uid not in uids:
            self._name(key, uids + (uid,))

    def _name(self, key, uids):
        """index[key] = uids, leaving an untracked index untracked.  A collection untracks the
        index (strings, and tuples of them, that it untracked too): one tracked key or value
        stored, even under a key it already has, would track it again, and every later
        collection would scan all its entries (5 ms a pass at 100,000 pods)."""
        named = self._named
        if not _gc_is_tracked(named):
            untrack(key)
            if type(uids) is tuple:
                untrack(uids)
        named[key] = uids

    def __delitem__(self, uid):
        self._unname(dict.__getitem__(self, uid), uid)
        super().__delitem__(uid)

    def _unname(self, pod, uid):
        key = pod.key
        uids = self._named.get(key)
        if uids is None:
            return
        if type(uids) is not tuple:
            if uids == uid:
                del self._named[key]
            return
        rest = tuple(u for u in uids if u != uid)
        self._name(key, rest[0] if len(rest) == 1 else rest)

    def pop(self, uid, *default):
        if uid in self:
            pod = self[uid]
            del self[uid]
            return pod
        if default:
            return default[0]
        raise KeyError(uid)

    def clear(self):
        super().clear()
        self._named.clear()

    def update(self, *args, **kw):
        for uid, pod in dict(*args, **kw).items():
            self[uid] = pod

    def setdefault(self, uid, pod=None):
        if uid not in self:
            self[uid] = pod
        return self[uid]

    def popitem(self):
        raise TypeError("PodTable.popitem is not supported (use pop(uid))")

    def __missing__(self, key):
        if isinstance(key, tuple) and len(key) == 2:
            found = self.named(*key)
            if found:
                return found[-1]
        raise KeyError(key)

    def named(self, namespace, name) -> list:
        """The pods (oldest first) called namespace/name: several while a
        recreated pod's predecessor is not deleted yet."""
        uids = self._named.get((namespace, name))
        if uids is None:
            return []
        if type(uids) is tuple:
            return [dict.__getitem__(self, u) for u in uids]
        return [dict.__getitem__(self, uids)]


class Cluster:
    """Nodes, namespaces and pods (by uid); mutated by the compiler's incremental calls."""

    def __init__(self, nodes=(), namespaces=(), pods=()):
        self.nodes = {}
        self.namespaces = {}
        for n in nodes:
            self.nodes[n.name] = n
        for ns in namespaces:
            self.namespaces[ns.name] = ns
        self.pods = PodTable.of(pods)

    def node_names(self):
        return sorted(self.nodes)

    def namespace(self, name) -> Namespace:
        ns = self.namespaces.get(name)
        return ns if ns is not None else Namespace(name)

    def pod_labels(self, pod: Pod, *, label_filter=None, cluster_name=None) -> dict:
        """The labels Cilium's selectors see for a pod (`identity_labels`): its
        own, its namespace's, the namespace name, its service account; the
        cluster name and the label filter when given (the compiler gives both)."""
        return identity_labels(pod, self.namespace(pod.namespace), label_filter=label_filter,
                               cluster_name=cluster_name)

    def node_labels(self, name) -> dict:
        node = self.nodes.get(name)
        return node.labels if node is not None else {}

    def copy(self) -> "Cluster":
        return Cluster(self.nodes.values(), self.namespaces.values(), self.pods.values())

    def to_dict(self) -> dict:
        return {
            "nodes": [n.to_dict() for n in self.nodes.values()],
            "namespaces": [{"name": ns.name, "labels": dict(ns.labels)} for ns in self.namespaces.values()],
            "pods": [
                {"name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": dict(p.labels),
                 "ips": list(p.ips), "node": p.node,
                 **({"serviceAccountName": p.service_account} if p.service_account else {})}
                for p in self.pods.values()
            ],
        }

    @classmethod
    def from_dict(cls, data, source="cluster") -> "Cluster":
        """A Cluster from a cluster file's mapping; ClusterError(file=source, field=...) if bad.

        Duplicates are errors (node names, node internal IPs, namespace names,
        pod namespace/name, pod IPs): which one was meant cannot be guessed."""
        try:
            if not isinstance(data, Mapping):
                raise ClusterError("must be a mapping with nodes, namespaces and pods")
            unknown = set(data) - {"nodes", "namespaces", "pods"}
            if unknown:
                raise ClusterError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))} "
                                   "(allowed: nodes, namespaces, pods)", field=str(sorted(map(str, unknown))[0]))
            return cls._from_dict(data)
        except ClusterError as exc:
            if exc.file is None:
                exc.file = source
            raise

    @classmethod
    def _from_dict(cls, data):
        nodes = [node_from_dict(n, f"nodes[{i}]") for i, n in enumerate(_list(data.get("nodes"), "nodes"))]
        namespaces = [namespace_from_dict(ns, f"namespaces[{i}]")
                      for i, ns in enumerate(_list(data.get("namespaces"), "namespaces"))]
        pods = [pod_from_dict(p, f"pods[{i}]") for i, p in enumerate(_list(data.get("pods"), "pods"))]
        _unique("nodes", "name", "duplicate node names", [n.name for n in nodes])
        _unique("nodes", "internalIP", "duplicate node internal IP", [n.internal_ip for n in nodes])
        _unique("namespaces", "name", "duplicate namespace", [ns.name for ns in namespaces])
        _unique("pods", "name", "duplicate pod", ["/".join(p.key) for p in pods])
        _unique("pods", "ips", "duplicate pod IP", [p.ips for p in pods], many=True)
        _unique("pods", "uid", "duplicate pod uid", [p.uid for p in pods])
        return cls(nodes, namespaces, pods)


# One object of a cluster file's `nodes`, `namespaces` or `pods` list, checked
# and built; ClusterError fields start with `where` ("pods[3]").  The file's
# loader builds its lists with these; a store (etcd) builds each object alone.
_NODE_FIELDS = ("name", "labels", "internalIP", "interfaces", "defaultRouteInterface", "defaultRouteInterfaceV6",
                "podCIDRs")
_NAMESPACE_FIELDS = ("name", "labels")
_POD_FIELDS = ("name", "namespace", "uid", "labels", "ips", "node", "serviceAccountName")


def node_from_dict(n, where) -> Node:
    _fields(n, where, _NODE_FIELDS)
    ifaces = []
    for j, iface in enumerate(_list(n.get("interfaces"), f"{where}.interfaces")):
        _fields(iface, f"{where}.interfaces[{j}]", ("name", "addresses"))
        if not isinstance(iface.get("name"), str):
            raise ClusterError("is required", field=f"{where}.interfaces[{j}].name")
        ifaces.append(Interface(iface["name"], tuple(_list(iface.get("addresses"),
                                                          f"{where}.interfaces[{j}].addresses"))))
    return built_at(where, lambda: Node(
        _name(n, where), _labels(n.get("labels"), where), n.get("internalIP"), tuple(ifaces),
        n.get("defaultRouteInterface"), n.get("defaultRouteInterfaceV6"),
        tuple(_list(n.get("podCIDRs"), f"{where}.podCIDRs")),
    ))


def namespace_from_dict(ns, where) -> Namespace:
    _fields(ns, where, _NAMESPACE_FIELDS)
    return built_at(where, lambda: Namespace(_name(ns, where), _labels(ns.get("labels"), where)))


def pod_from_dict(p, where) -> Pod:
    _fields(p, where, _POD_FIELDS)
    node = p.get("node")
    return built_at(where, lambda: Pod(
        _name(p, where), _intern(str(p.get("namespace") or "default")), str(p.get("uid") or ""),
        _labels(p.get("labels"), where), tuple(_list(p.get("ips"), f"{where}.ips")),
        _intern(node) if type(node) is str else node, _intern(str(p.get("serviceAccountName") or "")),
    ))


def built_at(where, make):
    """make(); a model's own ClusterError (which names no field) gets the field
    it came from (the cluster file's loader and the sources share this)."""
    try:
        return make()
    except ClusterError as exc:
        if exc.field is None:
            exc.field = where
        raise


def _unique(section, key, what, values, many=False):
    seen = {}
    for i, value in enumerate(values):
        for v in (value if many else (value,)):
            if v is None:
                continue
            if v in seen:
                raise ClusterError(f"{what} {v!r} (also in {section}[{seen[v]}])", field=f"{section}[{i}].{key}")
            seen[v] = i


def _list(obj, where):
    if obj is None:
        return []
    if not isinstance(obj, list):
        raise ClusterError("must be a list", field=where)
    return obj


def _fields(obj, where, allowed):
    if type(obj) is not dict and not isinstance(obj, Mapping):
        raise ClusterError("must be a mapping", field=where)
    for k in obj:
        if k not in allowed:
            raise ClusterError(f"unknown field {k!r} (allowed: {', '.join(allowed)})", field=f"{where}.{k}")


def _name(obj, where):
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ClusterError("name is required", field=f"{where}.name")
    return name


def load_cluster(path) -> Cluster:
    """Read a YAML cluster file (a regular file of at most
    egresscore.files.MAX_INPUT_BYTES); ClusterError (a ValueError) names the
    file, the field and its line.  An empty file is an error (what a
    half-written edit looks like), not an empty cluster."""
    path = os.fspath(path)
    try:
        text = read_input_file(path)
    except InputFileError as exc:
        raise ClusterError(exc.message, file=path) from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ClusterError(f"invalid YAML: {problem}", file=path,
                           line=mark.line + 1 if mark is not None else None) from None
    if data is None:
        raise ClusterError("no cluster document (the file is empty or only comments)", file=path)
    try:
        return Cluster.from_dict(data, path)
    except ClusterError as exc:
        if exc.field and exc.line is None:
            exc.line = yaml_line_of(text, exc.field)
        raise
    except (TypeError, AttributeError) as exc:  # defensive: odd shapes
        raise ClusterError(str(exc), file=path) from None
