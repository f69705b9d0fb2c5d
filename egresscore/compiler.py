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

Gateway health (an egresscore extension; egresscore.health says which nodes
are down): with a set of down nodes, the same rules run over the nodes that
are up.  A down node is skipped and the next matching node by name takes its
place, with its own egress IP (resolved as on that node); a gateway of
`egressGateways` whose matching nodes are all down is skipped like one that
matches no node, so pods re-pin over the rest; nothing up -> "Not Found"
(source nodes drop, "no gateway").  No down set (the default, and the agent's
--gateway-health=off) is Cilium's exact behaviour.  `set_down` rewrites only
the entries of the policies whose gateways changed.

Held addresses (an egresscore extension for stateful failover,
egresscore.agent.failover): `set_held({IP: interface})` tells the compiler
of a node view which addresses the node holds beyond those its cluster
record lists (a floating `egressIP` its agent added on takeover).  Resolution
is unchanged: an `egressIP` resolves when an interface of the node holds it,
as in Cilium, which reads the node's interfaces; egresscore's cluster record
is read once, so the agent says what it added.

Pod identity, as Cilium's: pods are keyed by uid throughout (a recreated pod
and its predecessor coexist until the predecessor's delete arrives, and that
late delete removes only the predecessor's entries).  Selectors see a pod's
identity labels (egresscore.cluster.identity_labels): its own labels less
those posing as derived ones, io.kubernetes.pod.namespace, its namespace's
labels under io.cilium.k8s.namespace.labels., io.cilium.k8s.policy.serviceaccount
and io.cilium.k8s.policy.cluster, through Cilium's default label filter
(`label_filter`, like Cilium's --labels: egresscore.cluster.LabelFilter).

Egress IP (deriveFromPolicyGatewayConfig), resolved on the gateway node only:
`egressIP` if one of the node's interfaces holds it; `interface`: its first
address of each needed family; neither: the first address of the interface
holding the default route.  Any failure leaves the egress IP unresolved
(0.0.0.0 / ::): the gateway then drops the traffic ("no egress IP") and the
reason is listed by `problems()`.  Dual-stack, as current upstream:
- a family is needed when a destination CIDR of the policy is of it; the
  egress IP of a family not needed stays unresolved, so the IPv6 excluded
  entries of an IPv4-only policy carry `::` (and the IPv4 ones of an
  IPv6-only policy 0.0.0.0);
- an explicit `egressIP` is programmed for its own family whatever the
  other: when its interface lacks an address of the other needed family,
  only that family stays unresolved (cilium/cilium#48660);
- an IPv6 `egressIP` is used for IPv6 destination CIDRs only: on a policy
  without one it merely picks the interface, whose first IPv4 serves the
  IPv4 entries (the parser warns).

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
- Policy ids (an egresscore extension): every policy gets a small number,
  carried in its entries (EgressEntry.policy_id) so the datapath counts
  traffic per policy in C.  A policy keeps its id as long as it exists
  (across recompiles, resets and edits); a removed policy's id is reused,
  oldest freed first, only by a policy added later (`policy_ids`).
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

import ipaddress
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from typing import NamedTuple

from ._gcpause import gc_paused, untrack
from .cluster import DEFAULT_CLUSTER_NAME, Cluster, Interface, LabelFilter, Namespace, Node, Pod, PodTable
from .policy import EXTRA_EGRESS_IPS, EgressPolicy
from .types import (
    EGRESS_IP_NOT_FOUND_V4,
    EGRESS_IP_NOT_FOUND_V6,
    EXCLUDED_CIDR,
    GATEWAY_NOT_FOUND,
    POLICY_ID_MAX,
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
    skipped: tuple = ()  # matching nodes passed over because they are down (gateway health)
    extra_ips: tuple = ()  # the policy's extra egress IPs on this gateway (spill), checked on its node
    extra_problem: str | None = None  # why they are not used there


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
    """(egress IPv4, egress IPv6, interface, problem, partial) on the gateway
    node itself: `problem` leaves both families unresolved; `partial` (an
    explicit `egressIP` whose interface lacks the other needed family) only
    that other one, the egress IP's own family is programmed."""
    fams = policy.families
    v4, v6 = 4 in fams, 6 in fams
    e4 = e6 = None
    ifname = None
    partial = None
    if gw.interface:
        dev = node.interface(gw.interface)
        if dev is None:
            return None, None, None, f"interface {gw.interface!r} does not exist on node {node.name}", None
        ifname = dev.name
        e4, e6 = dev.first_ip(4), dev.first_ip(6)
        if v4 and e4 is None:
            return None, None, ifname, f"interface {ifname!r} on node {node.name} has no IPv4 address", None
        if v6 and e6 is None:
            return None, None, ifname, f"interface {ifname!r} on node {node.name} has no IPv6 address", None
    elif gw.egress_ip:
        dev = node.interface_with_ip(gw.egress_ip)
        if dev is None:
            return None, None, None, f"egress IP {gw.egress_ip} is not on any interface of node {node.name}", None
        ifname = dev.name
        six = ":" in gw.egress_ip
        e4, e6 = (dev.first_ip(4), gw.egress_ip) if six else (gw.egress_ip, dev.first_ip(6))
        other, missing = (4, v4 and e4 is None) if six else (6, v6 and e6 is None)
        if missing:
            why = f"interface {ifname!r} on node {node.name} has no IPv{other} address"
            if (6 if six else 4) in fams:
                partial = why
            else:  # the egressIP's own family is not needed: nothing is left to program
                return None, None, ifname, why, None
    else:
        if v4:
            dev = node.interface(node.default_route_interface) if node.default_route_interface else None
            if dev is None:
                return None, None, None, f"node {node.name} has no interface with an IPv4 default route", None
            ifname = dev.name
            e4 = dev.first_ip(4)
            if e4 is None:
                return (None, None, ifname,
                        f"default-route interface {ifname!r} on node {node.name} has no IPv4 address", None)
        if v6:
            dev = node.interface(node.default_route_interface_v6) if node.default_route_interface_v6 else None
            if dev is None:
                return None, None, ifname, f"node {node.name} has no interface with an IPv6 default route", None
            if ifname is not None and dev.name != ifname:
                return None, None, ifname, (f"node {node.name}: IPv6 default route interface {dev.name!r} "
                                            f"doesn't match IPv4 default route interface {ifname!r}"), None
            ifname = dev.name
            e6 = dev.first_ip(6)
            if e6 is None:
                return (None, None, ifname,
                        f"default-route interface {ifname!r} on node {node.name} has no IPv6 address", None)
    # a family no destination CIDR needs stays unresolved (its excluded entries carry 0.0.0.0 / ::)
    return (e4 if v4 else None), (e6 if v6 else None), ifname, None, partial


def _holding(node: Node, held) -> Node:
    """`node` with the addresses it holds beyond its recorded interfaces
    (`held`: {IP: interface}, a floating egress IP it took over) appended to
    those interfaces, so the egress IP resolves as Cilium resolves it: from
    the addresses on the node's interfaces."""
    extra = {ip: dev for ip, dev in held.items() if node.interface_with_ip(ip) is None}
    if not extra:
        return node
    ifaces = list(node.interfaces)
    for ip, dev in sorted(extra.items()):
        addr = f"{ip}/{128 if ':' in ip else 32}"
        at = next((k for k, i in enumerate(ifaces) if i.name == dev), None)
        if at is None:
            ifaces.append(Interface(dev, (addr,)))
        else:
            ifaces[at] = Interface(dev, ifaces[at].addresses + (addr,))
    return replace(node, interfaces=tuple(ifaces))
def _extra_ips(policy: EgressPolicy, node: Node, primary) -> dict:
    """The policy's extra egress IPs on its gateway `node` (the spill chain
    of its egress IP), or why none is used: every one must be an address of
    the node; one that is not turns the whole annotation off there (the
    egress IP alone carries the traffic: never an address the node does not
    hold)."""
    held = node.all_ips()
    missing = [ip for ip in policy.extra_egress_ips if ip not in held]
    if missing:
        return {"extra_problem": (f"metadata.annotations.{EXTRA_EGRESS_IPS}: {', '.join(missing)} "
                                  f"{'is' if len(missing) == 1 else 'are'} not an address of node {node.name}: "
                                  f"no spill, the egress IP alone is used")}
    return {"extra_ips": tuple(ip for ip in policy.extra_egress_ips if ip not in primary)}


def resolve_gateways(policy: EgressPolicy, cluster: Cluster, view: str | None = None, node_names=None,
                     down=frozenset(), held=None) -> tuple:
    """The policy's gateways, in the order placement hashes over; nodes in
    `down` are passed over (gateway health; empty: Cilium's exact rules);
    `held` ({IP: interface}) are addresses the view node holds beyond its
    recorded interfaces (Compiler.set_held)."""
    names = node_names if node_names is not None else sorted(cluster.nodes)
    out = []
    for gw in policy.gateways:
        resolved = None
        skipped = []
        for name in names:
            node = cluster.nodes[name]
            if not gw.node_selector.matches(node.labels):
                continue
            gip = node.gateway_ip
            if gip is None:  # Cilium skips a node without an IPv4 node IP
                continue
            if name in down:
                skipped.append(name)
                continue
            if view is None or view == name:
                if held and view == name:
                    node = _holding(node, held)
                e4, e6, ifname, problem, partial = _derive_egress(policy, gw, node)
                if problem is not None:
                    problem += ": the gateway drops this traffic (no egress IP)"
                elif partial is not None:
                    fam, kept = ("IPv6", e4) if e4 else ("IPv4", e6)
                    problem = (f"{partial}: the gateway drops this policy's {fam} traffic (no {fam} egress IP); "
                               f"its egress IP {kept} is programmed")
                resolved = ResolvedGateway(gip, name, e4 or EGRESS_IP_NOT_FOUND_V4, e6 or EGRESS_IP_NOT_FOUND_V6,
                                           ifname, problem)
                if problem is not None and partial is None:  # both families unresolved, as in Cilium
                    resolved = ResolvedGateway(gip, name, EGRESS_IP_NOT_FOUND_V4, EGRESS_IP_NOT_FOUND_V6,
                                               ifname, problem)
                elif policy.extra_egress_ips:
                    resolved = replace(resolved, **_extra_ips(policy, node, (e4, e6)))
            else:  # only the gateway node itself knows its egress IP
                resolved = ResolvedGateway(gip, name, EGRESS_IP_NOT_FOUND_V4, EGRESS_IP_NOT_FOUND_V6)
            break
        if resolved is None:
            sel = gw.node_selector.to_dict() or "{}"
            why = (f"every node matching nodeSelector {sel} is down ({', '.join(skipped)})" if skipped
                   else f"no node matches nodeSelector {sel}")
            resolved = ResolvedGateway(
                GATEWAY_NOT_FOUND, None, EGRESS_IP_NOT_FOUND_V4, EGRESS_IP_NOT_FOUND_V6,
                problem=f"{why}: source nodes drop this traffic (no gateway)",
            )
        if skipped:
            resolved = replace(resolved, skipped=tuple(skipped))
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
    `label_filter` (a LabelFilter; default Cilium's default filter) and
    `cluster_name` (io.cilium.k8s.policy.cluster) shape the labels selectors see.
    """

    def __init__(self, cluster: Cluster | None = None, policies=(), *, node: str | None = None, egress_map=None,
                 down=(), label_filter: LabelFilter | None = None, cluster_name: str = DEFAULT_CLUSTER_NAME):
        self.cluster = cluster if cluster is not None else Cluster()
        self.node = node
        self._down = frozenset(down)
        self._held = {}
        self.generation = 0   # bumped by every change: tells a reader its cached view is stale
        self.label_filter = label_filter if label_filter is not None else LabelFilter()
        self.cluster_name = cluster_name
        self._policies = {}
        for p in policies:
            self._policies[p.name] = p
        self._policy_ids = {}       # policy name -> id (1..POLICY_ID_MAX)
        self._free_ids = deque()    # ids of removed policies, oldest freed first
        self._next_id = 1
        self.on_policy_id = None    # called (name, id) when a policy gets its id
        self.egress_map = None
        self.compile()
        if egress_map is not None:
            self.attach(egress_map)

    # ------------------------------------------------------------------ state

    @property
    def policies(self) -> list:
        return [self._policies[n] for n in sorted(self._policies)]

    @property
    def policy_ids(self) -> dict:
        """{policy name: policy id}: the number its entries carry and the
        datapath counts it under (stable while the policy exists)."""
        return dict(self._policy_ids)

    def policy_id(self, policy_name) -> int:
        """The id of a policy (KeyError if there is none of that name)."""
        return self._policy_ids[policy_name]

    def _assign_id(self, name):
        if name in self._policy_ids:
            return
        if self._free_ids:
            pid = self._free_ids.popleft()
        elif self._next_id <= POLICY_ID_MAX:
            pid = self._next_id
            self._next_id += 1
        else:
            pid = POLICY_ID_MAX  # more policies than ids: the rest share the last (counted together)
        self._policy_ids[name] = pid
        if self.on_policy_id is not None:
            self.on_policy_id(name, pid)

    def _release_id(self, name):
        pid = self._policy_ids.pop(name, None)
        if pid is not None and (pid != POLICY_ID_MAX or POLICY_ID_MAX not in self._policy_ids.values()):
            self._free_ids.append(pid)

    def gateways(self, policy_name) -> tuple:
        """The resolved gateways of a policy (sorted as placement uses them)."""
        return self._gateways[policy_name]

    @property
    def down(self) -> frozenset:
        """The nodes gateway selection passes over (empty: Cilium's exact rules)."""
        return self._down

    def gateway_candidates(self) -> dict:
        """{node name: gateway IP} of every node that matches some policy's
        gateway nodeSelector, up or down: the nodes whose health matters."""
        out = {}
        for p in self._policies.values():
            for gw in p.gateways:
                for name, n in self.cluster.nodes.items():
                    if n.gateway_ip and name not in out and gw.node_selector.matches(n.labels):
                        out[name] = n.gateway_ip
        return out

    def spill_chains(self) -> dict:
        """{egress IP: (extra egress IP, ...)} of the policies this node is
        the gateway of (the EXTRA_EGRESS_IPS annotation, resolved here): the
        NAT's spill chains (NatTable.set_spill).  The NAT spills per egress
        IP, so policies sharing an egress IP share its chain: the IPs every
        one of them lists, in the order of the first by name (a policy's
        traffic never leaves with an address it did not list)."""
        chains = {}
        if not any(p.extra_egress_ips for p in self._policies.values()):
            return chains       # the common case, cheap: the agent asks after every change
        for name in sorted(self._gateways):
            policy = self._policies[name]
            for g in self._gateways[name]:
                if g.node is None or (self.node is not None and g.node != self.node):
                    continue
                for primary in (g.egress_ip4, g.egress_ip6):
                    if primary in (EGRESS_IP_NOT_FOUND_V4, EGRESS_IP_NOT_FOUND_V6):
                        continue
                    if (4 if ":" not in primary else 6) not in policy.families:
                        continue
                    mine = tuple(ip for ip in g.extra_ips if (":" in ip) == (":" in primary))
                    key = (g.node, primary)
                    chains[key] = mine if key not in chains else tuple(ip for ip in chains[key] if ip in mine)
        return {primary: c for (_, primary), c in sorted(chains.items()) if c}

    def matched_pods(self, policy_name) -> list:
        """The pods a policy selects, by namespace, name and uid."""
        order = self._order
        return [self.cluster.pods[k] for k in sorted(self._matched.get(policy_name, ()), key=order.__getitem__)]

    def pod_labels(self, pod: Pod) -> dict:
        """The identity labels this compiler's selectors see for `pod`."""
        return self.cluster.pod_labels(pod, label_filter=self.label_filter, cluster_name=self.cluster_name)

    def problems(self) -> list:
        """Gateways without a node or without an egress IP, per policy."""
        out = []
        for name in sorted(self._gateways):
            seen = set()
            for g in self._gateways[name]:
                for problem in (g.problem, g.extra_problem):
                    if problem and problem not in seen:
                        seen.add(problem)
                        out.append(Problem(name, problem))
        return out

    def conflicts(self) -> list:
        """Keys written by several policies (or pods) with different values."""
        out = []
        for key in sorted(self._multi):
            c = self._contrib.get(key)
            if type(c) is not dict or len(c) < 2:
                continue
            writers = sorted(c.items())
            (wp, _), wt = writers[0]
            others = tuple((p, t) for (p, _), t in writers[1:] if t[:4] != wt[:4])
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
        with gc_paused(freeze=lambda: len(self.desired) + len(self.cluster.pods) >= FREEZE_AFTER):
            return self._compile()

    def _compile(self):
        self.generation += 1
        self._names = sorted(self.cluster.nodes)
        # Pods are indexed by identity (their identity labels, shared by the
        # pods that carry the same set): selectors are matched once per
        # identity, and one labels dict serves all its pods.
        self._ident_by_key = {}     # (namespace, service account, own labels) -> identity id
        self._ident_by_labels = {}  # frozenset(identity labels) -> identity id
        self._idents = {}           # identity id -> identity labels (one dict, never mutated)
        self._ident_pods = {}       # identity id -> {uid}
        self._pod_ident = {}        # uid -> identity id
        self._next_ident = 1
        self._order = {}  # uid -> (namespace, name, uid): the deterministic order among a key's writers
        self._index = defaultdict(set)  # (label key, value) -> {identity id}
        self._identity_cache = {}       # identity id -> names of the policies whose pod selectors match
        self._gateways = {}
        self._prepared = {}
        self._matched = {}
        # the per-pod state a change leaves behind is tuples of strings and tuples, which the cyclic GC
        # stops tracking the first time it sees them (sets and lists it scans in every collection):
        self._pod_policies = {}     # uid -> (policy name, ...)
        self._owned = {}            # (policy name, order) -> ((ip, cidr), ...): the map keys that writer wrote
        self._contrib = {}
        self._multi = set()
        self.desired = {}
        for name in [n for n in self._policy_ids if n not in self._policies]:
            self._release_id(name)
        for name in sorted(self._policies):
            self._assign_id(name)
        ident_of = self._ident_of
        order = self._order
        pod_ident = self._pod_ident
        ident_pods = self._ident_pods
        for key, pod in self.cluster.pods.items():
            i = ident_of(pod)
            pod_ident[key] = i
            ident_pods[i].add(key)
            order[key] = (pod.namespace, pod.name, key)
        for name in sorted(self._policies):
            self._prepare_policy(self._policies[name])
        contrib = self._contrib
        pod_policies = self._pod_policies
        for name in sorted(self._policies):
            matched = self._match_policy(self._policies[name])
            self._matched[name] = matched
            pods = self.cluster.pods
            for pkey in matched:
                pod_policies[pkey] = pod_policies.get(pkey, ()) + (name,)
                self._add_contrib(name, pods[pkey], None)
        desired = self.desired
        for key, c in contrib.items():
            desired[key] = c[1] if type(c) is tuple else c[min(c)]
        if self.egress_map is not None:
            self._sync_map(None)
        return desired

    def reset(self, cluster: Cluster, policies) -> dict:
        """Replace every node, namespace, pod and policy and recompile in full
        (one publish per family with an attached map): a source's full resync.
        `self.cluster` stays the same object."""
        self.cluster.nodes = dict(cluster.nodes)
        self.cluster.namespaces = dict(cluster.namespaces)
        self.cluster.pods = PodTable(cluster.pods)
        self._policies = {p.name: p for p in policies}
        return self.compile()

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
        self._gateways[policy.name] = resolve_gateways(policy, self.cluster, self.node, self._names, self._down,
                                                       self._held)
        dst4, dst6 = _split_family(policy.destination_cidrs)
        ex4, ex6 = _split_family(policy.excluded_cidrs)
        self._prepared[policy.name] = (dst4, dst6, ex4, ex6)

    def _match_policy(self, policy) -> set:
        labels = self._idents
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
            for ident in cands:
                if ident in result:
                    continue
                lab = labels[ident]
                for sel in parts:
                    if not sel.matches(lab):
                        break
                else:
                    result.add(ident)
        ident_pods = self._ident_pods
        if len(result) == 1:
            result = set(ident_pods[next(iter(result))])
        else:
            result = set().union(*(ident_pods[i] for i in result))
        if policy.node_selectors and result:
            pods = self.cluster.pods
            node_labels = self.cluster.node_labels
            result = {k for k in result if policy.matches_node(node_labels(pods[k].node))}
        return result

    def _policies_for_pod(self, pod, ident) -> set:
        names = self._identity_cache.get(ident)
        if names is None:
            labels = self._idents[ident]
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

    def _add_contrib(self, pname, pod, changed, edit=False):
        """Write the entries of writer (policy `pname`, `pod`) into the
        contributions; `changed` (a set, or None: a full compile) gets the
        keys written.  `edit`: the writer wrote before (its policy was edited,
        its selectors unchanged): a key whose value stays is left as it is
        (the same object, not counted changed) and the keys it no longer
        writes are taken back, so an edit that moves one destination CIDR
        touches only that CIDR's keys."""
        dst4, dst6, ex4, ex6 = self._prepared[pname]
        gws = self._gateways[pname]
        g = gws[0] if len(gws) == 1 else gws[fnv1a_32(pod.uid) % len(gws)]
        pid = self._policy_ids[pname]
        writer = (pname, self._order[pod.uid])
        if changed is not None:
            untrack(writer)     # holds the pod's order, a tuple a frozen compile left tracked
        contrib = self._contrib
        keys = []
        touched = [] if edit else keys
        for ip in pod.ips:
            if ":" in ip:
                dsts, exs, egress = dst6, ex6, g.egress_ip6
            else:
                dsts, exs, egress = dst4, ex4, g.egress_ip4
            # Cilium writes the policy's egress IP into excluded entries too
            for cidrs, gw in ((dsts, g.gateway_ip), (exs, EXCLUDED_CIDR)):
                for d in cidrs:
                    key = (ip, d)
                    value = _new_tuple(EgressEntry, (ip, d, egress, gw, pid))   # EgressEntry(...), without its __new__
                    c = contrib.get(key)
                    if c is None:       # one writer: (writer, value), no dict per key
                        contrib[key] = c = (writer, value)
                        if changed is not None:   # a change: out of the collector for good (_gcpause.untrack)
                            untrack(value)
                            untrack(c)
                    elif type(c) is tuple:
                        if c[0] == writer:
                            if edit and c[1] == value:
                                keys.append(key)
                                continue
                            contrib[key] = c = (writer, value)
                            if changed is not None:
                                untrack(value)
                                untrack(c)
                        else:
                            contrib[key] = {c[0]: c[1], writer: value}
                            self._multi.add(key)
                    else:
                        if edit and c.get(writer) == value:
                            keys.append(key)
                            continue
                        c[writer] = value
                    keys.append(key)
                    if edit:
                        touched.append(key)
        if edit:
            written = set(keys)
            for key in self._owned.get(writer, ()):
                if key not in written:
                    self._unwrite(writer, key)
                    touched.append(key)
        self._owned[writer] = tuple(keys)
        if changed is not None:
            changed.update(touched)

    def _unwrite(self, writer, key):
        """Take writer's contribution to `key` back."""
        contrib = self._contrib
        c = contrib.get(key)
        if c is None:
            return
        if type(c) is tuple:
            if c[0] == writer:
                del contrib[key]
                self._multi.discard(key)
            return
        c.pop(writer, None)
        if len(c) == 1:
            contrib[key] = next(iter(c.items()))
            self._multi.discard(key)
        elif not c:
            del contrib[key]
            self._multi.discard(key)

    def _remove_contrib(self, pname, pkey, changed):
        writer = (pname, self._order[pkey])
        keys = self._owned.pop(writer, ())
        unwrite = self._unwrite
        for key in keys:
            unwrite(writer, key)
        changed.update(keys)

    def _resolve(self, changed) -> int:
        """Recompute the winners of `changed` keys; write the map; count writes."""
        self.generation += 1
        contrib = self._contrib
        desired = self.desired
        em = self.egress_map
        if em is not None and len(changed) > _BATCH:
            return self._resolve_batch(changed)
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
            new = c[1] if type(c) is tuple else c[min(c)]
            if desired.get(key) != new:
                desired[key] = new
                if em is not None:
                    _write(em, new)
                writes += 1
        return writes

    def _resolve_batch(self, changed) -> int:
        """_resolve for many keys: one EgressMap.update (one publish per family,
        new and changed entries in the same step as removals)."""
        contrib, desired = self._contrib, self.desired
        sets, removes = [], []
        for key in changed:
            c = contrib.get(key)
            if not c:
                if key in desired:
                    del desired[key]
                    removes.append(key)
                continue
            new = c[1] if type(c) is tuple else c[min(c)]
            if desired.get(key) != new:
                desired[key] = new
                sets.append(new)
        if sets or removes:
            self.egress_map.update(sets, removes)
        return len(sets) + len(removes)

    def _ident_of(self, pod) -> int:
        """The identity id of `pod`'s identity labels (made on first sight)."""
        key = (pod.namespace, pod.service_account, tuple(pod.labels.items()))
        i = self._ident_by_key.get(key)
        if i is not None and i in self._idents:
            return i
        labels = self.pod_labels(pod)
        fs = frozenset(labels.items())
        i = self._ident_by_labels.get(fs)
        if i is None:
            i = self._next_ident
            self._next_ident += 1
            self._ident_by_labels[fs] = i
            self._idents[i] = labels
            self._ident_pods[i] = set()
            for item in labels.items():
                self._index[item].add(i)
        self._ident_by_key[key] = i
        return i

    def _forget_ident(self, i):
        """Drop identity i, which no pod carries any more."""
        labels = self._idents.pop(i)
        del self._ident_pods[i]
        del self._ident_by_labels[frozenset(labels.items())]
        self._identity_cache.pop(i, None)
        for item in labels.items():
            s = self._index.get(item)
            if s is not None:
                s.discard(i)
                if not s:
                    del self._index[item]

    def _index_pod(self, pod):
        i = self._ident_of(pod)
        self._pod_ident[pod.uid] = i
        self._ident_pods[i].add(pod.uid)
        self._order[pod.uid] = (pod.namespace, pod.name, pod.uid)
        return i

    def _unindex_pod(self, key):
        self._order.pop(key, None)
        i = self._pod_ident.pop(key, None)
        if i is not None:
            pods = self._ident_pods[i]
            pods.discard(key)
            if not pods:
                self._forget_ident(i)

    def _drop_pod(self, key, changed):
        for pname in self._pod_policies.pop(key, ()):
            self._remove_contrib(pname, key, changed)
            self._matched[pname].discard(key)
        self._unindex_pod(key)

    def _place_pod(self, pod, changed):
        ident = self._index_pod(pod)
        names = self._policies_for_pod(pod, ident)
        if names:
            self._pod_policies[pod.uid] = tuple(sorted(names))
            for pname in names:
                self._matched[pname].add(pod.uid)
                self._add_contrib(pname, pod, changed)

    def _drop_policy(self, name, changed):
        for pkey in self._matched.pop(name, ()):
            self._remove_contrib(name, pkey, changed)
            s = self._pod_policies.get(pkey)
            if s is not None:
                s = tuple(n for n in s if n != name)
                if s:
                    self._pod_policies[pkey] = s
                else:
                    del self._pod_policies[pkey]
        self._gateways.pop(name, None)
        self._prepared.pop(name, None)

    def _place_policy(self, policy, changed):
        self._prepare_policy(policy)
        matched = self._match_policy(policy)
        self._matched[policy.name] = matched
        pods = self.cluster.pods
        pod_policies = self._pod_policies
        for pkey in matched:
            pod_policies[pkey] = pod_policies.get(pkey, ()) + (policy.name,)
            self._add_contrib(policy.name, pods[pkey], changed)

    # ----------------------------------------------------------- incremental

    def upsert_pod(self, pod: Pod) -> int:
        """Add or replace a pod (by uid); returns the number of map entries written.

        A pod of the same namespace/name but another uid is another pod (a
        recreated one): both stay until each one's own removal."""
        changed = set()
        if pod.uid in self.cluster.pods:
            self._drop_pod(pod.uid, changed)
        self.cluster.pods[pod.uid] = pod
        self._place_pod(pod, changed)
        return self._resolve(changed)

    def remove_pod(self, namespace: str | None = None, name: str | None = None, *, uid: str | None = None) -> int:
        """Remove a pod by uid: `remove_pod(uid=UID)` or `remove_pod(UID)`; or
        `remove_pod(namespace, name)`: every pod of that name (a cluster file's
        pods, keyed "namespace/name").  KeyError if there is none."""
        if uid is None and name is None:
            uid = namespace
        if uid is not None:
            if name is not None:
                raise TypeError("remove_pod: give a uid or a namespace and name, not both")
            if uid not in self.cluster.pods:
                raise KeyError(f"no pod with uid {uid}")
            keys = [uid]
        else:
            keys = [p.uid for p in self.cluster.pods.named(namespace, name)]
            if not keys:
                raise KeyError(f"no pod {namespace}/{name}")
        changed = set()
        for key in keys:
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
        self._ident_by_key = {}   # keyed by namespace name: its labels changed
        changed = set()
        for pod in [p for p in self.cluster.pods.values() if p.namespace == name]:
            self._drop_pod(pod.uid, changed)
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

    def set_down(self, down) -> int:
        """The nodes that are down now (gateway health): the gateways are
        re-chosen and only the policies whose gateways changed are rewritten;
        returns the number of map entries written."""
        down = frozenset(down)
        if down == self._down:
            return 0
        self._down = down
        return self._nodes_changed(relabelled=False)

    @property
    def held(self) -> dict:
        """{IP: interface} the view node holds beyond its recorded interfaces."""
        return dict(self._held)

    def set_held(self, held) -> int:
        """Addresses the view node holds now beyond its recorded interfaces
        ({IP: interface}: a floating egress IP this node's agent took over,
        egresscore.agent.failover); a policy's `egressIP` among them resolves
        on this node as if the node's interface listed it.  Returns the
        number of map entries written."""
        held = dict(held)
        if held == self._held:
            return 0
        self._held = held
        return self._nodes_changed(relabelled=False)

    def _nodes_changed(self, relabelled=True):
        self._names = sorted(self.cluster.nodes)
        changed = set()
        for name in sorted(self._policies):
            policy = self._policies[name]
            gws = resolve_gateways(policy, self.cluster, self.node, self._names, self._down, self._held)
            if gws != self._gateways.get(name) or (relabelled and policy.node_selectors):
                self._drop_policy(name, changed)
                self._place_policy(policy, changed)
        return self._resolve(changed)

    def upsert_policy(self, policy: EgressPolicy) -> int:
        """Add or replace a policy (by name).  A replacement with the same
        selectors (its CIDRs, gateways or egress IP edited) selects the same
        pods: each of them rewrites only the entries whose value changed."""
        changed = set()
        old = self._policies.get(policy.name)
        self._policies[policy.name] = policy
        self._assign_id(policy.name)
        if old is not None and old.selectors == policy.selectors:
            self._prepare_policy(policy)
            pods = self.cluster.pods
            add = self._add_contrib
            for pkey in self._matched[policy.name]:
                add(policy.name, pods[pkey], changed, edit=True)
        else:
            if old is not None:
                self._drop_policy(policy.name, changed)
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
        writes = self._resolve(changed)
        self._release_id(name)
        return writes


_new_tuple = tuple.__new__

# A full compile this large (map entries + pods) ends with its objects frozen (egresscore._gcpause):
# ~10^6 containers at 100,000 pods, which later collections, started by some single change, would scan.
FREEZE_AFTER = 10_000

_BATCH = 8  # more changed keys than this: one EgressMap.update instead of a write each


def _write(em, e: EgressEntry):
    if e.gateway_ip == EXCLUDED_CIDR:
        em.set_excluded(e.source, e.destination, e.egress_ip, e.policy_id)
    else:
        em.set(*e)
