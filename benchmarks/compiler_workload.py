"""A synthetic cluster for the compiler benchmarks: N pods, P policies, a few gateways.

Every pod is selected by about one policy (by app label, namespace, or a
matchExpressions In), each policy has two destination CIDRs and one excluded
CIDR, a fifth of the policies spread pods over three gateways: about
3 * N egress map entries.  `cilium_reconcile` is the peer the compiler is
measured against: Cilium's own reconciliation, step by step, in plain Python.
"""

from egresscore.cluster import Cluster, Interface, Namespace, Node, Pod
from egresscore.policy import parse_policy


def make_cluster(n_pods=10_000, n_nodes=50, n_namespaces=20, n_apps=200):
    nodes = []
    for i in range(n_nodes):
        ip = f"192.168.{1 + i // 250}.{1 + i % 250}"
        addrs = (f"{ip}/16",) + ((f"172.16.{i}.100/24", f"172.16.{i}.101/24") if i % 10 == 0 else ())
        labels = {"kubernetes.io/hostname": f"node{i:03d}", "zone": "ab"[i % 2]}
        if i % 10 == 0:
            labels["egress-gateway"] = "true"
        nodes.append(Node(f"node{i:03d}", labels, ip, (Interface("eth0", addrs),), "eth0"))
    namespaces = [Namespace(f"ns{i}", {"team": f"team{i % 5}"}) for i in range(n_namespaces)]
    pods = []
    for i in range(n_pods):
        node = i % n_nodes
        pods.append(Pod(
            f"pod{i}", f"ns{i % n_namespaces}", f"{i:08x}-5c0b-4f6e-9d1a-{i * 7919 % 16**12:012x}",
            {"app": f"app{i % n_apps}", "tier": ("web", "db", "cache")[i % 3], "pod-template-hash": f"h{i % 997}"},
            (f"10.{node}.{(i // n_nodes) // 250}.{1 + (i // n_nodes) % 250}",), f"node{node:03d}",
        ))
    return Cluster(nodes, namespaces, pods)


def make_policies(n_policies=100, n_apps=200, n_gateway_nodes=5):
    out = []
    for i in range(n_policies):
        kind = i % 4
        if kind == 0:
            selectors = [{"podSelector": {"matchLabels": {"app": f"app{2 * i % n_apps}"}}},
                         {"podSelector": {"matchLabels": {"app": f"app{(2 * i + 1) % n_apps}"}}}]
        elif kind == 1:
            selectors = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": f"ns{i % 20}"}},
                          "podSelector": {"matchLabels": {"tier": "web"}}}]
        elif kind == 2:
            selectors = [{"podSelector": {"matchExpressions": [
                {"key": "app", "operator": "In", "values": [f"app{2 * i % n_apps}", f"app{(2 * i + 1) % n_apps}"]},
                {"key": "tier", "operator": "NotIn", "values": ["cache"]}]}}]
        else:
            selectors = [{"podSelector": {"matchLabels": {"app": f"app{2 * i % n_apps}"}}}]
        gw = i % n_gateway_nodes * 10
        spec = {
            "selectors": selectors,
            "destinationCIDRs": [f"203.0.{i % 256}.0/24", f"198.{18 + i % 2}.{i % 256}.0/24"],
            "excludedCIDRs": [f"203.0.{i % 256}.128/25"],
        }
        if i % 5 == 4:
            spec["egressGateways"] = [
                {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": f"node{(gw + 10 * k) % 50:03d}"}},
                 "egressIP": f"172.16.{(gw + 10 * k) % 50}.100"} for k in range(3)]
        else:
            spec["egressGateway"] = {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": f"node{gw:03d}"}},
                                     "egressIP": f"172.16.{gw}.101"}
        policy, _ = parse_policy({"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy",
                                  "metadata": {"name": f"policy-{i:03d}"}, "spec": spec})
        out.append(policy)
    return out


def cilium_reconcile(cluster, policies, policy_map=None, view=None):
    """The peer: Cilium's reconciliation (pkg/egressgateway, manager.go reconcileLocked
    after the k8s sync) rendered step by step in plain Python; returns the policy map.

    Same algorithm, no extra work: the endpoint store (getEndpointMetadata:
    labels with the namespace's, IPs, the UID hash; Cilium builds it as endpoint
    events arrive, so it is timed here too), then
    updatePoliciesMatchedEndpointIDs (every policy x every endpoint, selectors
    evaluated), updatePoliciesBySourceIP, regenerateGatewayConfigs (first
    matching node by name, gateways sorted by IP), addMissingEgressRules (dump
    the map, write each missing or different entry) and removeUnusedEgressRules
    (dump the map again, keep an entry only if policyMatches finds a policy
    endpoint and CIDR that produce it).  The map is a Python dict: cheaper than
    Cilium's BPF map, which costs a syscall per write and per dumped entry.
    Policies are visited in reverse name order so that, as in egresscore, the
    name that sorts first writes last and wins a clash (Cilium's own order is
    Go's random map order).
    """
    from egresscore.compiler import EXCLUDED_CIDR, EgressEntry, fnv1a_32, resolve_gateways

    policy_map = {} if policy_map is None else policy_map
    # the endpoint store: endpointMetadata per CiliumEndpoint
    ep_store = {}
    for key, pod in cluster.pods.items():
        ep_store[key] = (pod.ips, cluster.pod_labels(pod), cluster.node_labels(pod.node), fnv1a_32(pod.uid))
    configs = sorted(policies, key=lambda p: p.name, reverse=True)
    # updatePoliciesMatchedEndpointIDs
    matched = {}
    for p in configs:
        matched[p.name] = {key: ep for key, ep in ep_store.items()
                           if p.matches_labels(ep[1]) and p.matches_node(ep[2])}
    # updatePoliciesBySourceIP
    by_source_ip = {}
    for p in configs:
        for ep in matched[p.name].values():
            for ip in ep[0]:
                by_source_ip.setdefault(ip, []).append(p)
    # regenerateGatewayConfigs (resolve_gateways: nodes by name, several gateways sorted by IP)
    gateways = {p.name: resolve_gateways(p, cluster, view) for p in configs}

    def select_gateway(gws, ep):
        return gws[0] if len(gws) == 1 else gws[ep[3] % len(gws)]

    def values(p, ep, ip):
        """forEachEndpointAndCIDR for one endpoint IP: (cidr, value) pairs."""
        g = select_gateway(gateways[p.name], ep)
        v6 = ":" in ip
        for d in p.destination_cidrs:
            if (":" in d) == v6:
                yield d, EgressEntry(ip, d, g.egress_ip6 if v6 else g.egress_ip4, g.gateway_ip)
        for d in p.excluded_cidrs:
            if (":" in d) == v6:
                yield d, EgressEntry(ip, d, g.egress_ip6 if v6 else g.egress_ip4, EXCLUDED_CIDR)

    # addMissingEgressRules
    present = dict(policy_map)
    for p in configs:
        for ep in matched[p.name].values():
            for ip in ep[0]:
                for d, value in values(p, ep, ip):
                    if present.get((ip, d)) != value:
                        policy_map[(ip, d)] = value
    # removeUnusedEgressRules: policyMatches walks every matched endpoint of the source IP's policies
    present = dict(policy_map)
    for (src, cidr), value in present.items():
        found = False
        for p in by_source_ip.get(src, ()):
            for ep in matched[p.name].values():
                for ip in ep[0]:
                    if ip != src:
                        continue
                    if any(d == cidr and v == value for d, v in values(p, ep, ip)):
                        found = True
                        break
                if found:
                    break
            if found:
                break
        if not found:
            del policy_map[(src, cidr)]
    return policy_map
