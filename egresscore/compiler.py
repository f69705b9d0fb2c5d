"""The compiler: policies + cluster -> egress map entries, with Cilium's semantics.

Reference: Cilium's pkg/egressgateway (policy.go, manager.go).  For every
policy, every selected pod IP and every destination CIDR of the same family
there is one entry (source IP, destination CIDR) -> (egress IP, gateway IP);
every excluded CIDR gets an entry with the excluded marker as gateway IP.
The egress map does longest-prefix match on the destination, so the longest
destination prefix wins across policies.

Gateway choice (regenerateGatewayConfig): for each gateway of the policy, the
first node in name order whose labels match its nodeSelector and that has an
IPv4 internal IP; none -> gateway 0.0.0.0 ("Not Found", source nodes drop).
With `egressGateways`, gateways that match no node are skipped (one "Not
Found" gateway remains if none match; cilium/cilium#44705), the rest are
sorted by gateway IP and each pod gets
gateways[fnv1a_32(CiliumEndpoint UID) % len(gateways)] (forEachEndpointAndCIDR);
our Pod.uid plays the CiliumEndpoint UID.

Egress IP (deriveFromPolicyGatewayConfig), resolved on the gateway node only:
`egressIP` if one of the node's interfaces holds it; `interface`: its first
address of each needed family; neither: the first address of the interface
holding the default route.  Any failure leaves the egress IP unresolved
(0.0.0.0 / ::): the gateway then drops the traffic ("no egress IP") and the
reason is listed by `problems()`.

Deliberate differences from Cilium, and why:
- Two policies (or two pods sharing an IP) writing the same (source,
  destination) key: Cilium's result depends on Go map iteration order.  Here
  the policy whose name sorts first wins (then the pod key), always, and the
  clash is listed by `conflicts()`.  Inside one policy an excluded CIDR equal
  to a destination CIDR wins, as in Cilium (excluded entries are written last).
- A view: `node=None` resolves every gateway's egress IP as its gateway node
  would (a cluster-wide view); `node="node1"` is exactly what Cilium's agent on
  node1 holds (egress IP 0.0.0.0 unless node1 is the gateway).
- egresscore.EgressMap keeps all four addresses of an entry in one family,
  so an IPv6 entry stores its IPv4 gateway IP as an IPv4-mapped address
  (::ffff:192.168.1.3) and the sentinels as :: / ::1; `desired` and
  `egress list` show the IPv4 gateway as Cilium does.
- With several gateways sharing one gateway IP, ties keep spec order (a stable
  sort); Go's slices.SortFunc is stable only for up to 12 elements.
- IPv6 link-local addresses are never picked as an interface's first IPv6.
- An `egressIP` that no interface of the gateway node holds stays unresolved
  (gateway drops, `problems()` says why).  Upstream Cilium versions differ
  here (some program the configured IP anyway, newer ones fall back to the
  default-route interface); we refuse to SNAT to an address whose replies
  the node would never receive.
"""

from __future__ import annotations

import gc
import ipaddress
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

from .cluster import Cluster, Namespace, Node, Pod
from .policy import EgressPolicy
from .types import (
    EGRESS_IP_NOT_FOUND_V4,
    EGRESS_IP_NOT_FOUND_V6,
    EXCLUDED_CIDR,
    GATEWAY_NOT_FOUND,
    EgressEntry,
)

__all__ = [
    "GATEWAY_NOT_FOUND",
    "EXCLUDED_CIDR",
    "EGRESS_IP_NOT_FOUND_V4",
    "EGRESS_IP_NOT_FOUND_V6",
    "EgressEntry",
    "ResolvedGateway",
    "Conflict",
    "Problem",
    "Compiler",
    "fnv1a_32",
    "resolve_gateways",
]


@dataclass(frozen=True)
class ResolvedGateway:
    """One gateway of a policy, resolved against the cluster (and the view node)."""

    gateway_ip: str
    node: str | None
    egress_ip4: str
    egress_ip6: str
    interface: str | None = None
    problem: str | None = None


class Conflict(NamedTuple):
    """Several writers for one key: who won (deterministically) and who lost."""

    source: str
    destination: str
    policy: str
    target: EgressEntry
    others: tuple  # ((policy, EgressEntry), ...)

    def __str__(self):
        lost = ", ".join(f"{p!r} ({_show(t)})" for p, t in self.others)
        return (f"conflict on {self.source} -> {self.destination}: policy {self.policy!r} "
                f"({_show(self.target)}) wins over {lost}")


class Problem(NamedTuple):
    """Why some entries of a policy cannot carry traffic."""

    policy: str
    message: str

    def __str__(self):
        return f"policy {self.policy!r}: {self.message}"


def _show(t: EgressEntry) -> str:
    if t.excluded:
        return "excluded"
    return f"egress {t.egress_ip} via {t.gateway_ip}"


def fnv1a_32(data: str | bytes) -> int:
    """FNV-1a 32 (Go's hash/fnv New32a), the hash Cilium places endpoints with."""
    if isinstance(data, str):
        data = data.encode()
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def _derive_egress(policy: EgressPolicy, gw, node: Node):
    """(egress IPv4, egress IPv6, interface, problem) on the gateway node itself."""
    fams = policy.families
    v4, v6 = 4 in fams, 6 in fams
    e4 = e6 = None
    ifname = None
    if gw.interface:
        dev = node.interface(gw.interface)
        if dev is None:
            return None, None, None, f"interface {gw.interface!r} does not exist on node {node.name}"
        ifname = dev.name
        e4, e6 = dev.first_ip(4), dev.first_ip(6)
        if v4 and e4 is None:
            return None, None, ifname, f"interface {ifname!r} on node {node.name} has no IPv4 address"
        if v6 and e6 is None:
            return None, None, ifname, f"interface {ifname!r} on node {node.name} has no IPv6 address"
    elif gw.egress_ip:
        dev = node.interface_with_ip(gw.egress_ip)
        if dev is None:
            return None, None, None, f"egress IP {gw.egress_ip} is not on any interface of node {node.name}"
        ifname = dev.name
        if ":" in gw.egress_ip:
            e6 = gw.egress_ip
            if v4:
                e4 = dev.first_ip(4)
                if e4 is None:
                    return None, None, ifname, f"interface {ifname!r} on node {node.name} has no IPv4 address"
        else:
            e4 = gw.egress_ip
            if v6:
                e6 = dev.first_ip(6)
                if e6 is None:
                    return None, None, ifname, f"interface {ifname!r} on node {node.name} has no IPv6 address"
    else:
        if v4:
            dev = node.interface(node.default_route_interface) if node.default_route_interface else None
            if dev is None:
                return None, None, None, f"node {node.name} has no interface with an IPv4 default route"
            ifname = dev.name
            e4 = dev.first_ip(4)
            if e4 is None:
                return None, None, ifname, f"default-route interface {ifname!r} on node {node.name} has no IPv4 address"
        if v6:
            dev = node.interface(node.default_route_interface_v6) if node.default_route_interface_v6 else None
            if dev is None:
                return None, None, ifname, f"node {node.name} has no interface with an IPv6 default route"
            if ifname is not None and dev.name != ifname:
                return None, None, ifname, (f"node {node.name}: IPv6 default route interface {dev.name!r} "
                                            f"doesn't match IPv4 default route interface {ifname!r}")
            ifname = dev.name
            e6 = dev.first_ip(6)
            if e6 is None:
                return None, None, ifname, f"default-route interface {ifname!r} on node {node.name} has no IPv6 address"
    return e4, e6, ifname, None


def resolve_gateways(policy: EgressPolicy, cluster: Cluster, view: str | None = None, node_names=None) -> tuple:
    """The policy's gateways, in the order placement hashes over."""
    names = node_names if node_names is not None else sorted(cluster.nodes)
    out = []
    for gw in policy.gateways:
        resolved = None
        for name in names:
            node = cluster.nodes[name]
            if not gw.node_selector.matches(node.labels):
                continue
            gip = node.gateway_ip
            if gip is None:  # Cilium skips a node without an IPv4 node IP
                continue
            if view is None or view == name:
                e4, e6, ifname, problem = _derive_egress(policy, gw, node)
                if problem is not None:
                    problem += ": the gateway drops this traffic (no egress IP)"
                resolved = ResolvedGateway(gip, name, e4 or EGRESS_IP_NOT_FOUND_V4, e6 or EGRESS_IP_NOT_FOUND_V6,
                                           ifname, problem)
                if problem is not None:  # both families unresolved, as in Cilium
                    resolved = ResolvedGateway(gip, name, EGRESS_IP_NOT_FOUND_V4, EGRESS_IP_NOT_FOUND_V6,
                                               ifname, problem)
            else:  # only the gateway node itself knows its egress IP
                resolved = ResolvedGateway(gip, name, EGRESS_IP_NOT_FOUND_V4, EGRESS_IP_NOT_FOUND_V6)
            break
        if resolved is None:
            resolved = ResolvedGateway(
                GATEWAY_NOT_FOUND, None, EGRESS_IP_NOT_FOUND_V4, EGRESS_IP_NOT_FOUND_V6,
                problem=(f"no node matches nodeSelector {gw.node_selector.to_dict() or '{}'}"
                         ": source nodes drop this traffic (no gateway)"),
            )
        out.append(resolved)
    if len(out) > 1:
        found = [g for g in out if g.node is not None]
        if found:
            out = sorted(found, key=lambda g: ipaddress.ip_address(g.gateway_ip))
        else:
            out = out[:1]
    return tuple(out)


def _split_family(cidrs):
    v4 = tuple(c for c in cidrs if ":" not in c)
    v6 = tuple(c for c in cidrs if ":" in c)
    return v4, v6


class Compiler:
    """Keeps the desired egress map for a cluster and its policies, in sync.

    `desired` maps (source IP, destination CIDR) -> EgressEntry.  With an attached
    EgressMap, every change (pod, node, namespace, policy) rewrites only the
    entries whose value changed, in place: the datapath keeps reading.
    """

    def __init__(self, cluster: Cluster | None = None, policies=(), *, node: str | None = None, egress_map=None):
        self.cluster = cluster if cluster is not None else Cluster()
        self.node = node
        self._policies = {}
        for p in policies:
            self._policies[p.name] = p
        self.egress_map = None
        self.compile()
        if egress_map is not None:
            self.attach(egress_map)

    # ------------------------------------------------------------------ state

    @property
    def policies(self) -> list:
        return [self._policies[n] for n in sorted(self._policies)]

    def gateways(self, policy_name) -> tuple:
        """The resolved gateways of a policy (sorted as placement uses them)."""
        return self._gateways[policy_name]

    def matched_pods(self, policy_name) -> list:
        return [self.cluster.pods[k] for k in sorted(self._matched.get(policy_name, ()))]

    def problems(self) -> list:
        """Gateways without a node or without an egress IP, per policy."""
        out = []
        for name in sorted(self._gateways):
            seen = set()
            for g in self._gateways[name]:
                if g.problem and g.problem not in seen:
                    seen.add(g.problem)
                    out.append(Problem(name, g.problem))
        return out

    def conflicts(self) -> list:
        """Keys written by several policies (or pods) with different values."""
        out = []
        for key in sorted(self._multi):
            c = self._contrib.get(key)
            if not c or len(c) < 2:
                continue
            writers = sorted(c.items())
            (wp, _), wt = writers[0]
            others = tuple((p, t) for (p, _), t in writers[1:] if t != wt)
            if others:
                out.append(Conflict(key[0], key[1], wp, wt, others))
        return out

    # ---------------------------------------------------------- full compile

    def compile(self) -> dict:
        """Recompute everything from scratch; returns `desired`.

        With an attached map, the map is brought to the new state with the
        fewest writes.
        """
        # building ~10^5 small containers: the cyclic GC would rescan the
        # growing heap many times over (about half the time); none are cycles.
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._compile()
        finally:
            if paused:
                gc.enable()

    def _compile(self):
        self._names = sorted(self.cluster.nodes)
        self._labels = {}
        self._index = defaultdict(set)
        self._identity_cache = {}
        self._gateways = {}
        self._prepared = {}
        self._matched = {}
        self._pod_policies = defaultdict(set)
        self._owned = {}
        self._contrib = {}
        self._multi = set()
        self.desired = {}
        labels_of = self.cluster.pod_labels
        index = self._index
        for key, pod in self.cluster.pods.items():
            labels = labels_of(pod)
            self._labels[key] = labels
            for item in labels.items():
                index[item].add(key)
        for name in sorted(self._policies):
            self._prepare_policy(self._policies[name])
        contrib = self._contrib
        for name in sorted(self._policies):
            matched = self._match_policy(self._policies[name])
            self._matched[name] = matched
            pods = self.cluster.pods
            for pkey in matched:
                self._pod_policies[pkey].add(name)
                self._add_contrib(name, pods[pkey], None)
        desired = self.desired
        for key, c in contrib.items():
            if len(c) == 1:
                for t in c.values():
                    desired[key] = t
            else:
                desired[key] = c[min(c)]
        if self.egress_map is not None:
            self._sync_map(None)
        return desired

    def attach(self, egress_map):
        """Write the desired state into `egress_map` (replacing what it held) and keep it in sync."""
        self.egress_map = egress_map
        self._sync_map(None)
        return egress_map

    def _sync_map(self, old):
        """Bring the map to the desired state.  A full compile (`old` None)
        reconciles in one publish per family; an incremental one writes the
        changed keys, new and changed ones before removals, so a datapath
        lookup never falls into a gap (a /24 replaced by a /25 never leaves
        the destination unmatched in between)."""
        em = self.egress_map
        desired = self.desired
        if old is None:
            em.sync(desired.values())
            return
        for key, t in desired.items():
            if old.get(key) != t:
                _write(em, t)
        for key in old:
            if key not in desired:
                em.remove(key[0], key[1])

    # ------------------------------------------------------------- internals

    def _prepare_policy(self, policy):
        self._gateways[policy.name] = resolve_gateways(policy, self.cluster, self.node, self._names)
        dst4, dst6 = _split_family(policy.destination_cidrs)
        ex4, ex6 = _split_family(policy.excluded_cidrs)
        self._prepared[policy.name] = (dst4, dst6, ex4, ex6)

    def _match_policy(self, policy) -> set:
        labels = self._labels
        index = self._index
        result = set()
        for parts in policy.endpoint_selectors:
            cands = None
            for sel in parts:
                hint = sel.index_hint()
                if hint is not None:
                    key, values = hint
                    if len(values) == 1:
                        s = index.get((key, values[0]), set())
                    else:
                        s = set()
                        for v in values:
                            s |= index.get((key, v), set())
                    if cands is None or len(s) < len(cands):
                        cands = s
            if cands is None:
                cands = labels.keys()
            for pkey in cands:
                if pkey in result:
                    continue
                lab = labels[pkey]
                for sel in parts:
                    if not sel.matches(lab):
                        break
                else:
                    result.add(pkey)
        if policy.node_selectors and result:
            pods = self.cluster.pods
            node_labels = self.cluster.node_labels
            result = {k for k in result if policy.matches_node(node_labels(pods[k].node))}
        return result

    def _policies_for_pod(self, pod, labels) -> set:
        ident = frozenset(labels.items())
        names = self._identity_cache.get(ident)
        if names is None:
            names = tuple(n for n, p in self._policies.items() if p.matches_labels(labels))
            self._identity_cache[ident] = names
        out = set()
        node_labels = None
        for n in names:
            p = self._policies[n]
            if p.node_selectors:
                if node_labels is None:
                    node_labels = self.cluster.node_labels(pod.node)
                if not p.matches_node(node_labels):
                    continue
            out.add(n)
        return out

    def _add_contrib(self, pname, pod, changed):
        dst4, dst6, ex4, ex6 = self._prepared[pname]
        gws = self._gateways[pname]
        g = gws[0] if len(gws) == 1 else gws[fnv1a_32(pod.uid) % len(gws)]
        writer = (pname, pod.key)
        contrib = self._contrib
        keys = []
        for ip in pod.ips:
            if ":" in ip:
                dsts, exs, egress = dst6, ex6, g.egress_ip6
            else:
                dsts, exs, egress = dst4, ex4, g.egress_ip4
            # Cilium writes the policy's egress IP into excluded entries too
            for cidrs, gw in ((dsts, g.gateway_ip), (exs, EXCLUDED_CIDR)):
                for d in cidrs:
                    key = (ip, d)
                    value = EgressEntry(ip, d, egress, gw)
                    c = contrib.get(key)
                    if c is None:
                        contrib[key] = {writer: value}
                    else:
                        if writer not in c and c:
                            self._multi.add(key)
                        c[writer] = value
                    keys.append(key)
        self._owned[writer] = keys
        if changed is not None:
            changed.update(keys)

    def _remove_contrib(self, pname, pkey, changed):
        writer = (pname, pkey)
        keys = self._owned.pop(writer, ())
        contrib = self._contrib
        for key in keys:
            c = contrib.get(key)
            if c is None:
                continue
            c.pop(writer, None)
            if not c:
                del contrib[key]
                self._multi.discard(key)
            elif len(c) == 1:
                self._multi.discard(key)
        changed.update(keys)

    def _resolve(self, changed) -> int:
        """Recompute the winners of `changed` keys; write the map; count writes."""
        contrib = self._contrib
        desired = self.desired
        em = self.egress_map
        writes = 0
        for key in changed:
            c = contrib.get(key)
            if not c:
                if key in desired:
                    del desired[key]
                    if em is not None:
                        em.remove(key[0], key[1])
                    writes += 1
                continue
            new = c[min(c)] if len(c) > 1 else next(iter(c.values()))
            if desired.get(key) != new:
                desired[key] = new
                if em is not None:
                    _write(em, new)
                writes += 1
        return writes

    def _index_pod(self, pod):
        labels = self.cluster.pod_labels(pod)
        self._labels[pod.key] = labels
        for item in labels.items():
            self._index[item].add(pod.key)
        return labels

    def _unindex_pod(self, key):
        labels = self._labels.pop(key, None)
        if labels:
            for item in labels.items():
                s = self._index.get(item)
                if s is not None:
                    s.discard(key)
                    if not s:
                        del self._index[item]

    def _drop_pod(self, key, changed):
        for pname in self._pod_policies.pop(key, ()):
            self._remove_contrib(pname, key, changed)
            self._matched[pname].discard(key)
        self._unindex_pod(key)

    def _place_pod(self, pod, changed):
        labels = self._index_pod(pod)
        names = self._policies_for_pod(pod, labels)
        if names:
            self._pod_policies[pod.key] = names
            for pname in names:
                self._matched[pname].add(pod.key)
                self._add_contrib(pname, pod, changed)

    def _drop_policy(self, name, changed):
        for pkey in self._matched.pop(name, ()):
            self._remove_contrib(name, pkey, changed)
            s = self._pod_policies.get(pkey)
            if s is not None:
                s.discard(name)
                if not s:
                    del self._pod_policies[pkey]
        self._gateways.pop(name, None)
        self._prepared.pop(name, None)

    def _place_policy(self, policy, changed):
        self._prepare_policy(policy)
        matched = self._match_policy(policy)
        self._matched[policy.name] = matched
        pods = self.cluster.pods
        for pkey in matched:
            self._pod_policies[pkey].add(policy.name)
            self._add_contrib(policy.name, pods[pkey], changed)

    # ----------------------------------------------------------- incremental

    def upsert_pod(self, pod: Pod) -> int:
        """Add or replace a pod; returns the number of map entries written."""
        changed = set()
        if pod.key in self.cluster.pods:
            self._drop_pod(pod.key, changed)
        self.cluster.pods[pod.key] = pod
        self._place_pod(pod, changed)
        return self._resolve(changed)

    def remove_pod(self, namespace: str, name: str) -> int:
        """Remove a pod (KeyError if unknown)."""
        key = (namespace, name)
        if key not in self.cluster.pods:
            raise KeyError(f"no pod {namespace}/{name}")
        changed = set()
        self._drop_pod(key, changed)
        del self.cluster.pods[key]
        return self._resolve(changed)

    def upsert_namespace(self, namespace: Namespace) -> int:
        """Add or relabel a namespace: its pods are re-matched."""
        self.cluster.namespaces[namespace.name] = namespace
        return self._rematch_namespace(namespace.name)

    def remove_namespace(self, name: str) -> int:
        if name not in self.cluster.namespaces:
            raise KeyError(f"no namespace {name}")
        del self.cluster.namespaces[name]
        return self._rematch_namespace(name)

    def _rematch_namespace(self, name):
        changed = set()
        for pod in [p for p in self.cluster.pods.values() if p.namespace == name]:
            self._drop_pod(pod.key, changed)
            self._place_pod(pod, changed)
        return self._resolve(changed)

    def upsert_node(self, node: Node) -> int:
        """Add or replace a node: gateways are re-chosen, affected policies rewritten."""
        self.cluster.nodes[node.name] = node
        return self._nodes_changed()

    def remove_node(self, name: str) -> int:
        if name not in self.cluster.nodes:
            raise KeyError(f"no node {name}")
        del self.cluster.nodes[name]
        return self._nodes_changed()

    def _nodes_changed(self):
        self._names = sorted(self.cluster.nodes)
        changed = set()
        for name in sorted(self._policies):
            policy = self._policies[name]
            gws = resolve_gateways(policy, self.cluster, self.node, self._names)
            if gws != self._gateways.get(name) or policy.node_selectors:
                self._drop_policy(name, changed)
                self._place_policy(policy, changed)
        return self._resolve(changed)

    def upsert_policy(self, policy: EgressPolicy) -> int:
        """Add or replace a policy (by name)."""
        changed = set()
        if policy.name in self._policies:
            self._drop_policy(policy.name, changed)
        self._policies[policy.name] = policy
        self._identity_cache = {}
        self._place_policy(policy, changed)
        return self._resolve(changed)

    def remove_policy(self, name: str) -> int:
        if name not in self._policies:
            raise KeyError(f"no policy {name}")
        changed = set()
        self._drop_policy(name, changed)
        del self._policies[name]
        self._identity_cache = {}
        return self._resolve(changed)


def _write(em, e: EgressEntry):
    if e.gateway_ip == EXCLUDED_CIDR:
        em.set_excluded(e.source, e.destination, e.egress_ip)
    else:
        em.set(*e)
