"""The Linux kernel's own egress gateway: the baseline egresscore is measured against.

What Cilium does in eBPF, done with stock kernel parts on the lab's nodes:
- every node gets a vxlan device (`vxlan0`, VNI `VXLAN_VNI`, UDP port 8472
  like Cilium) with static FDB and neighbour entries for the other nodes;
- on a pod's node, policy routing (`ip rule from <pod> iif lxc-<pod> to
  <cidr>`, longest prefix first) sends selected traffic into vxlan0 towards
  its gateway node; excluded CIDRs go to the main table, a policy whose node
  selector matches no node to a blackhole (Cilium drops that traffic too);
- on the gateway node, nftables SNATs it to the egress IP, and replies (which
  conntrack turns back to the pod's address) go back through vxlan0 to the
  pod's node (`ip rule iif eth0 lookup 200`);
- everything else leaving a node is masqueraded to the node IP (nftables).
The gateway among several matching nodes is the first by name, as in Cilium.

In the dual-stack lab (Lab(ipv6=True)) the same is done for IPv6: `ip -6
rule`s and IPv6 routes through the same vxlan0 (an L2 tunnel carries both
families), an `ip6` nftables table beside the `ip` one (SNAT to the IPv6
egress IP, masquerade to the node's IPv6), and IPv6 next hops on vxlan0
that are link-local (`tunnel_gw6`, with permanent neighbours): the kernel
refuses an `onlink` IPv6 gateway that the main table routes through another
device, as it does the other nodes' pod gateways.  With Lab(tunnel_underlay=6) vxlan0 runs
over the IPv6 underlay (local and FDB destinations the nodes' IPv6
addresses, MTU VXLAN6_MTU).
"""
import ipaddress
import socket

import yaml
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ndmsg import states as _nud

from ..show import egress_table

VXLAN_PORT = 8472
VXLAN_VNI = 2
VXLAN_IF = "vxlan0"
VXLAN_MTU = 1450  # 1500 - 50 bytes of outer Ethernet/IP/UDP/VXLAN
VXLAN6_MTU = 1430  # over the IPv6 underlay: 1500 - 70
NFT_TABLE = "egc_lab"
TABLE_DROP = 99
TABLE_GW_BASE = 100  # + gateway node index: default route into vxlan0 towards that node
TABLE_RETURN = 200  # on gateways: other nodes' pod CIDRs through vxlan0
RULE_PRIO_BASE = 1000
RULE_PRIO_RETURN = 2000
ONLINK = 4  # RTNH_F_ONLINK

# the seed's policy on the lab's addresses (= examples/egress-sample.yaml)
SAMPLE_POLICY = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumEgressGatewayPolicy",
    "metadata": {"name": "egress-sample"},
    "spec": {
        "selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
        "destinationCIDRs": ["203.0.113.0/24"],
        "excludedCIDRs": ["203.0.113.128/25"],
        "egressGateway": {
            "nodeSelector": {"matchLabels": {"node.kubernetes.io/name": "node3"}},
            "egressIP": "192.168.1.3",
        },
    },
}

# the same, dual-stack, on the dual-stack lab's addresses (= examples/egress-sample-dual.yaml)
SAMPLE_POLICY_DUAL = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumEgressGatewayPolicy",
    "metadata": {"name": "egress-sample-dual"},
    "spec": {
        "selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
        "destinationCIDRs": ["203.0.113.0/24", "2001:db8:113::/64"],
        "excludedCIDRs": ["203.0.113.128/25", "2001:db8:113:0:8000::/65"],
        "egressGateway": {
            "nodeSelector": {"matchLabels": {"node.kubernetes.io/name": "node3"}},
            "egressIP": "fd00:192:168:1::100",
        },
    },
}


def vxlan_mac(node_ip):
    """02:ee:<node IP>: the inner MAC egresscore's datapath writes for a node."""
    from ..agent.tunnel import tunnel_mac

    return tunnel_mac(node_ip)


def tunnel_gw6(node):
    """fe80::ee:<last octet of the node IPv4>: the IPv6 next hop on vxlan0 towards `node`."""
    return "fe80::ee:%x" % ipaddress.ip_address(node.ip).packed[3]


def _policy_docs(policies):
    if isinstance(policies, str):
        policies = [d for d in yaml.safe_load_all(policies) if d]
    if isinstance(policies, dict):
        policies = [policies]
    if not isinstance(policies, (list, tuple)):
        raise TypeError(f"policies must be a policy dict, a list of them or YAML text, not {type(policies).__name__}")
    docs = []
    for p in policies:
        if not isinstance(p, dict):
            raise TypeError(f"a policy must be a dict, not {type(p).__name__}")
        spec = p.get("spec", p)
        name = (p.get("metadata") or {}).get("name", f"policy{len(docs)}")
        docs.append((name, spec))
    return docs


def compile_entries(lab, policies):
    """The egress map the kernel baseline implements, as Cilium would list it:
    the real Compiler (egresscore.compiler) over the lab's cluster file.

    Returns a list of dicts {pod, src, cidr, kind ('gateway'|'excluded'|'drop'),
    gateway (node name or None), egress_ip, gateway_ip}, one per (pod, CIDR),
    longest prefix first (ip rules and nft rules are evaluated in order).  A
    gateway node without the policy's egress IP is a ValueError naming the
    policy: the kernel has no "no egress IP" drop to put in its place.
    """
    from ..cluster import Cluster
    from ..compiler import Compiler
    from ..policy import parse_policy

    parsed = []
    for name, spec in _policy_docs(policies):
        doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": {"name": name},
               "spec": spec}
        parsed.append(parse_policy(doc, source="lab")[0])
    compiler = Compiler(Cluster.from_dict(lab.cluster(), source="lab"), parsed)
    for policy in parsed:
        for g in compiler.gateways(policy.name):
            if g.problem and g.node is not None:
                ip = policy.gateways[0].egress_ip if len(policy.gateways) == 1 else None
                what = f"egressIP {ip} is not an address of {g.node}" if ip else g.problem
                raise ValueError(f"policy {policy.name}: {what} ({g.problem})")
    pod_of = {ip: p.name for p in lab.pods.values() for ip in (p.ip, getattr(p, "ip6", None)) if ip}
    node_of = {n.ip: n.name for n in lab.nodes.values()}
    entries = []
    for (src, cidr), t in compiler.desired.items():
        kind = "excluded" if t.excluded else "drop" if t.no_gateway else "gateway"
        entries.append({"pod": pod_of[src], "src": src, "cidr": cidr, "kind": kind,
                        "gateway": node_of.get(t.gateway_ip) if kind == "gateway" else None,
                        "egress_ip": t.egress_ip, "gateway_ip": t.gateway_ip})
    return sorted(entries, key=lambda e: (-ipaddress.ip_network(e["cidr"]).prefixlen, e["src"], e["cidr"]))


def format_egress_list(entries):
    """`cilium-dbg bpf egress list`-style text of compile_entries' dicts (egresscore.show)."""
    return egress_table([(e["src"], e["cidr"], e["egress_ip"], e["gateway_ip"]) for e in entries])


def masquerade_ruleset(node, cluster_cidr, enabled=True, snat_rules=(), cluster_cidr6=None, snat_rules6=()):
    """The node's whole nftables table (replaced atomically); with `cluster_cidr6`
    and an IPv6 pod CIDR on the node (the dual-stack lab) an `ip6` table too."""
    rules = list(snat_rules)
    if enabled:
        rules.append(f'oifname "{node.ifname}" ip saddr {node.pod_cidr} ip daddr != {cluster_cidr} masquerade')
    out = _nat_table("ip", rules)
    pod_cidr6 = getattr(node, "pod_cidr6", None)
    if cluster_cidr6 is not None and pod_cidr6:
        rules6 = list(snat_rules6)
        if enabled:
            rules6.append(f'oifname "{node.ifname}" ip6 saddr {pod_cidr6} ip6 daddr != {cluster_cidr6} masquerade')
        out += _nat_table("ip6", rules6)
    return out


def _nat_table(family, rules):
    body = "\n".join("        " + r for r in rules)
    return (f"table {family} {NFT_TABLE}\ndelete table {family} {NFT_TABLE}\n"
            f"table {family} {NFT_TABLE} {{\n    chain postrouting {{\n"
            f"        type nat hook postrouting priority srcnat; policy accept;\n{body}\n    }}\n}}\n")


def _flush(ipr, ipv6=False):
    for family in (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,):
        for rule in ipr.get_rules(family=family):
            prio = rule.get("FRA_PRIORITY")
            if prio is not None and RULE_PRIO_BASE <= prio <= RULE_PRIO_RETURN:
                ipr.rule("del", family=family, priority=prio, table=rule.get("FRA_TABLE") or rule["table"])
        for table in [TABLE_DROP, TABLE_RETURN, *range(TABLE_GW_BASE, TABLE_GW_BASE + 10)]:
            ipr.flush_routes(table=table, family=family)


def _ensure_vxlan(ipr, lab, node):
    links = ipr.link_lookup(ifname=VXLAN_IF)
    if not links:
        eth = ipr.link_lookup(ifname=node.ifname)[0]
        six = getattr(lab, "tunnel_underlay", 4) == 6
        local = {"vxlan_local6": node.ip6} if six else {"vxlan_local": node.ip}
        ipr.link("add", ifname=VXLAN_IF, kind="vxlan", vxlan_id=lab.vni, vxlan_port=VXLAN_PORT,
                 vxlan_link=eth, vxlan_learning=0, **local)
        vx = ipr.link_lookup(ifname=VXLAN_IF)[0]
        ipr.link("set", index=vx, address=vxlan_mac(node.ip), mtu=VXLAN6_MTU if six else VXLAN_MTU, state="up")
        for other in lab.nodes.values():
            if other.name == node.name:
                continue
            mac = vxlan_mac(other.ip)
            ipr.fdb("add", ifindex=vx, lladdr=mac, dst=other.ip6 if six else other.ip, state=_nud["permanent"])
            ipr.neigh("add", dst=other.pod_gateway, lladdr=mac, ifindex=vx, state=_nud["permanent"])
            if getattr(other, "pod_gateway6", None):
                ipr.neigh("add", family=socket.AF_INET6, dst=tunnel_gw6(other), lladdr=mac, ifindex=vx,
                          state=_nud["permanent"])
    return ipr.link_lookup(ifname=VXLAN_IF)[0]


def install(lab, policies, nodes=None):
    """Install (or replace) the kernel egress gateway for `policies`; return the entries.

    nodes: the node names to configure (default all); the others are left
    untouched, e.g. for a userspace agent to play their part (interop tests).
    """
    from .topology import CLUSTER_CIDR, CLUSTER_CIDR6

    entries = compile_entries(lab, policies)
    node_index = {name: i for i, name in enumerate(sorted(lab.nodes))}
    selected = _select_nodes(lab, nodes)
    ipv6 = bool(getattr(lab, "ipv6", False))
    for node in selected:
        snat = {4: [], 6: []}
        with IPRoute(netns=node.ns) as ipr:
            _flush(ipr, ipv6)
            vx = _ensure_vxlan(ipr, lab, node)
            for fam in (4, 6) if ipv6 else (4,):
                family, anywhere = (socket.AF_INET6, "::/0") if fam == 6 else (socket.AF_INET, "0.0.0.0/0")
                ipr.route("add", family=family, table=TABLE_DROP, dst=anywhere, type="blackhole")
                for other in lab.nodes.values():
                    if other.name != node.name:
                        gw, cidr = (tunnel_gw6(other), other.pod_cidr6) if fam == 6 else (other.pod_gateway,
                                                                                       other.pod_cidr)
                        ipr.route("add", family=family, table=TABLE_GW_BASE + node_index[other.name], dst=anywhere,
                                  gateway=gw, oif=vx, flags=ONLINK)
                        ipr.route("add", family=family, table=TABLE_RETURN, dst=cidr, gateway=gw, oif=vx,
                                  flags=ONLINK)
            prio = RULE_PRIO_BASE
            is_gateway = set()
            for e in entries:
                pod = lab.pods[e["pod"]]
                net = ipaddress.ip_network(e["cidr"])
                fam = net.version
                ip, family = ("ip6", socket.AF_INET6) if fam == 6 else ("ip", socket.AF_INET)
                local = pod.node == node.name
                if local:
                    if e["kind"] == "drop":
                        table = TABLE_DROP
                    elif e["kind"] == "gateway" and e["gateway"] != node.name:
                        table = TABLE_GW_BASE + node_index[e["gateway"]]
                    else:
                        table = 254  # main: out of eth0, SNAT or masquerade below
                    ipr.rule("add", family=family, priority=prio, table=table, src=e["src"],
                             src_len=net.max_prefixlen, dst=str(net.network_address), dst_len=net.prefixlen,
                             iifname=pod.host_ifname)
                    prio += 1
                    match = f'{ip} saddr {e["src"]} {ip} daddr {net} oifname "{node.ifname}"'
                    if e["kind"] == "excluded":
                        snat[fam].append(f"{match} masquerade")
                    elif e["kind"] == "gateway" and e["gateway"] == node.name:
                        snat[fam].append(f"{match} snat to {e['egress_ip']}")
                elif e["kind"] == "gateway" and e["gateway"] == node.name:
                    is_gateway.add(family)
                    snat[fam].append(f'iifname "{VXLAN_IF}" {ip} saddr {e["src"]} {ip} daddr {net} '
                                     f'oifname "{node.ifname}" snat to {e["egress_ip"]}')
            if prio >= RULE_PRIO_RETURN:
                raise ValueError(f"too many egress entries for {node.name}: {prio - RULE_PRIO_BASE}")
            for family in sorted(is_gateway):
                ipr.rule("add", family=family, priority=RULE_PRIO_RETURN, table=TABLE_RETURN, iifname=node.ifname)
        lab.nft(node.name, masquerade_ruleset(node, CLUSTER_CIDR, True, snat[4],
                                              CLUSTER_CIDR6 if ipv6 else None, snat[6]))
    return entries


def _select_nodes(lab, nodes):
    if nodes is None:
        return list(lab.nodes.values())
    if isinstance(nodes, str):
        nodes = [nodes]
    unknown = [n for n in nodes if n not in lab.nodes]
    if unknown:
        raise ValueError(f"nodes must be among {sorted(lab.nodes)}, not {unknown}")
    return [lab.nodes[n] for n in nodes]


def uninstall(lab, nodes=None):
    """Remove the kernel egress gateway (rules, tables, vxlan0); keep masquerade as lab.masquerade says."""
    from .topology import CLUSTER_CIDR, CLUSTER_CIDR6

    ipv6 = bool(getattr(lab, "ipv6", False))
    for node in _select_nodes(lab, nodes):
        with IPRoute(netns=node.ns) as ipr:
            _flush(ipr, ipv6)
            for idx in ipr.link_lookup(ifname=VXLAN_IF):
                ipr.link("del", index=idx)
        lab.nft(node.name, masquerade_ruleset(node, CLUSTER_CIDR, lab.masquerade,
                                              cluster_cidr6=CLUSTER_CIDR6 if ipv6 else None))
