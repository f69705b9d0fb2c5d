"""An independent oracle for the kernel baseline's egress list (egresscore.lab.kernel.compile_entries).

The lab's first, hand-written reading of Cilium's rules, kept beside the real
Compiler that the baseline now uses: podSelector and nodeSelector matchLabels
only, one gateway per policy, the first policy to claim a (pod, CIDR) keeps
it, an excluded CIDR equal to a destination wins.  Tests compare the two.
"""
import ipaddress

from egresscore.lab.kernel import _policy_docs
from egresscore.types import EXCLUDED_CIDR, GATEWAY_NOT_FOUND


def _match_labels(selector, labels, what):
    if not isinstance(selector, dict):
        raise ValueError(f"{what} must be a mapping")
    unknown = set(selector) - {"matchLabels"}
    if unknown:
        raise ValueError(f"{what}: only matchLabels is supported by the lab baseline, not {sorted(unknown)}")
    wanted = selector.get("matchLabels") or {}
    return all(labels.get(k) == str(v) for k, v in wanted.items())


def oracle_entries(lab, policies):
    """The egress map the kernel baseline implements, as Cilium would list it.

    Returns a list of dicts {pod, src, cidr, kind ('gateway'|'excluded'|'drop'),
    gateway (node name or None), egress_ip, gateway_ip}, one per (pod, CIDR).
    """
    entries = {}
    for name, spec in _policy_docs(policies):
        selectors = spec.get("selectors") or []
        if not selectors:
            raise ValueError(f"policy {name}: needs at least one selector")
        pods = []
        for sel in selectors:
            if set(sel) - {"podSelector"}:
                raise ValueError(f"policy {name}: only podSelector is supported by the lab baseline")
            pods += [p for p in lab.pods.values()
                     if _match_labels(sel.get("podSelector") or {}, p.labels, f"policy {name} podSelector")
                     and p not in pods]
        gw_spec = spec.get("egressGateway") or {}
        gateway = next((n for n in sorted(lab.nodes)
                        if _match_labels(gw_spec.get("nodeSelector") or {}, lab.nodes[n].labels,
                                         f"policy {name} nodeSelector")), None)
        egress_ip = GATEWAY_NOT_FOUND
        gateway_ip = GATEWAY_NOT_FOUND
        if gateway is not None:
            node = lab.nodes[gateway]
            gateway_ip = node.ip
            if gw_spec.get("egressIP"):
                egress_ip = str(ipaddress.ip_address(gw_spec["egressIP"]))
                if egress_ip != node.ip and egress_ip not in node.egress_ips:
                    raise ValueError(f"policy {name}: egressIP {egress_ip} is not an address of {gateway}")
            elif gw_spec.get("interface") not in (None, node.ifname):
                raise ValueError(f"policy {name}: {gateway} has no interface {gw_spec['interface']!r}")
            else:
                egress_ip = node.ip
        dests = [ipaddress.ip_network(c) for c in spec.get("destinationCIDRs") or []]
        excluded = [ipaddress.ip_network(c) for c in spec.get("excludedCIDRs") or []]
        # the first policy to claim a (pod, CIDR) keeps it; inside one policy an excluded
        # CIDR equal to a destination CIDR wins (Cilium writes excluded entries last)
        mine = {}
        for pod in pods:
            for cidr in dests:
                kind = "gateway" if gateway is not None else "drop"
                mine[(pod.name, cidr)] = dict(pod=pod.name, src=pod.ip, cidr=str(cidr), kind=kind,
                                              gateway=gateway, egress_ip=egress_ip, gateway_ip=gateway_ip)
            for cidr in excluded:
                mine[(pod.name, cidr)] = dict(pod=pod.name, src=pod.ip, cidr=str(cidr), kind="excluded",
                                              gateway=None, egress_ip=egress_ip, gateway_ip=EXCLUDED_CIDR)
        for key, entry in mine.items():
            entries.setdefault(key, entry)
    # longest prefix first: ip rules and nft rules are evaluated in order
    return sorted(entries.values(),
                  key=lambda e: (-ipaddress.ip_network(e["cidr"]).prefixlen, e["src"], e["cidr"]))
