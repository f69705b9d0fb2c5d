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
"""
import ipaddress

import yaml
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ndmsg import states as _nud

from ..show import egress_table

VXLAN_PORT = 8472
VXLAN_VNI = 2
VXLAN_IF = "vxlan0"
VXLAN_MTU = 1450  # 1500 - 50 bytes of outer Ethernet/IP/UDP/VXLAN
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


def vxlan_mac(node_ip):
    """02:ee:<node IP>: the inner MAC egresscore's datapath writes for a node."""
    from ..agent.tunnel import tunnel_mac

    return tunnel_mac(node_ip)


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
    pod_of = {p.ip: p.name for p in lab.pods.values()}
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


def masquerade_ruleset(node, cluster_cidr, enabled=True, snat_rules=()):
    """The node's whole nftables table (replaced atomically)."""
    rules = list(snat_rules)
    if enabled:
        rules.append(f'oifname "{node.ifname}" ip saddr {node.pod_cidr} ip daddr != {cluster_cidr} masquerade')
    body = "\n".join("        " + r for r in rules)
    return (f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"
            f"table ip {NFT_TABLE} {{\n    chain postrouting {{\n"
            f"        type nat hook postrouting priority srcnat; policy accept;\n{body}\n    }}\n}}\n")


def _flush(ipr):
    for rule in ipr.get_rules(family=2):
        prio = rule.get("FRA_PRIORITY")
        if prio is not None and RULE_PRIO_BASE <= prio <= RULE_PRIO_RETURN:
            ipr.rule("del", priority=prio, table=rule.get("FRA_TABLE") or rule["table"])
    for table in [TABLE_DROP, TABLE_RETURN, *range(TABLE_GW_BASE, TABLE_GW_BASE + 10)]:
        ipr.flush_routes(table=table)


def _ensure_vxlan(ipr, lab, node):
    links = ipr.link_lookup(ifname=VXLAN_IF)
    if not links:
        eth = ipr.link_lookup(ifname=node.ifname)[0]
        ipr.link("add", ifname=VXLAN_IF, kind="vxlan", vxlan_id=lab.vni, vxlan_port=VXLAN_PORT,
                 vxlan_local=node.ip, vxlan_link=eth, vxlan_learning=0)
        vx = ipr.link_lookup(ifname=VXLAN_IF)[0]
        ipr.link("set", index=vx, address=vxlan_mac(node.ip), mtu=VXLAN_MTU, state="up")
        for other in lab.nodes.values():
            if other.name == node.name:
                continue
            mac = vxlan_mac(other.ip)
            ipr.fdb("add", ifindex=vx, lladdr=mac, dst=other.ip, state=_nud["permanent"])
            ipr.neigh("add", dst=other.pod_gateway, lladdr=mac, ifindex=vx, state=_nud["permanent"])
    return ipr.link_lookup(ifname=VXLAN_IF)[0]


def install(lab, policies, nodes=None):
    """Install (or replace) the kernel egress gateway for `policies`; return the entries.

    nodes: the node names to configure (default all); the others are left
    untouched, e.g. for a userspace agent to play their part (interop tests).
    """
    from .topology import CLUSTER_CIDR

    entries = compile_entries(lab, policies)
    node_index = {name: i for i, name in enumerate(sorted(lab.nodes))}
    selected = _select_nodes(lab, nodes)
    for node in selected:
        snat = []
        with IPRoute(netns=node.ns) as ipr:
            _flush(ipr)
            vx = _ensure_vxlan(ipr, lab, node)
            ipr.route("add", table=TABLE_DROP, dst="0.0.0.0/0", type="blackhole")
            for other in lab.nodes.values():
                if other.name != node.name:
                    ipr.route("add", table=TABLE_GW_BASE + node_index[other.name], dst="0.0.0.0/0",
                              gateway=other.pod_gateway, oif=vx, flags=ONLINK)
                    ipr.route("add", table=TABLE_RETURN, dst=other.pod_cidr,
                              gateway=other.pod_gateway, oif=vx, flags=ONLINK)
            prio = RULE_PRIO_BASE
            is_gateway = False
            for e in entries:
                pod = lab.pods[e["pod"]]
                net = ipaddress.ip_network(e["cidr"])
                local = pod.node == node.name
                if local:
                    if e["kind"] == "drop":
                        table = TABLE_DROP
                    elif e["kind"] == "gateway" and e["gateway"] != node.name:
                        table = TABLE_GW_BASE + node_index[e["gateway"]]
                    else:
                        table = 254  # main: out of eth0, SNAT or masquerade below
                    ipr.rule("add", priority=prio, table=table, src=pod.ip, src_len=32,
                             dst=str(net.network_address), dst_len=net.prefixlen, iifname=pod.host_ifname)
                    prio += 1
                    match = f'ip saddr {pod.ip} ip daddr {net} oifname "{node.ifname}"'
                    if e["kind"] == "excluded":
                        snat.append(f"{match} masquerade")
                    elif e["kind"] == "gateway" and e["gateway"] == node.name:
                        snat.append(f"{match} snat to {e['egress_ip']}")
                elif e["kind"] == "gateway" and e["gateway"] == node.name:
                    is_gateway = True
                    snat.append(f'iifname "{VXLAN_IF}" ip saddr {pod.ip} ip daddr {net} '
                                f'oifname "{node.ifname}" snat to {e["egress_ip"]}')
            if prio >= RULE_PRIO_RETURN:
                raise ValueError(f"too many egress entries for {node.name}: {prio - RULE_PRIO_BASE}")
            if is_gateway:
                ipr.rule("add", priority=RULE_PRIO_RETURN, table=TABLE_RETURN, iifname=node.ifname)
        lab.nft(node.name, masquerade_ruleset(node, CLUSTER_CIDR, True, snat))
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
    from .topology import CLUSTER_CIDR

    for node in _select_nodes(lab, nodes):
        with IPRoute(netns=node.ns) as ipr:
            _flush(ipr)
            for idx in ipr.link_lookup(ifname=VXLAN_IF):
                ipr.link("del", index=idx)
        lab.nft(node.name, masquerade_ruleset(node, CLUSTER_CIDR, lab.masquerade))
