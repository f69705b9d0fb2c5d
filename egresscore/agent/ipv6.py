"""The IPv6 routing facts an agent gives its Datapath, read from the cluster.

The datapath half of IPv6 (src/datapath/v6.pyx) takes:

- the node's IPv6 address: ``Datapath(..., node_ip6=node_ip6(node))``
  (default masquerade of IPv6 pod traffic; None leaves IPv6 to the kernel);
- each cluster node's IPv6 pod CIDRs and IPv6 address:
  ``add_node(index, ip, pod_cidrs, mac, ip6=...)`` with ``pod_cidrs`` holding
  both families (``node_rows`` gives them per node);
- each local pod's IPv6 address: ``add_pod_port(port, ip4, mac,
  pod_ip6=pod_ip6(pod))``;
- the IPv6 next hop's MAC, if it is not the IPv4 router's:
  ``set_router6(mac)``.

The cluster model has one internal IP per node (the IPv4 one Cilium tunnels
to); a node's IPv6 address is taken from its interfaces: the first global
IPv6 address of the interface holding its internal IP (the underlay), else of
its IPv6 default-route interface (Cilium's GetNodeIP(true) is the node's IPv6
InternalIP, which on the lab's nodes is that address).  Pure functions, no
netlink: the agent calls them where it reads the IPv4 facts
(lifecycle.py: _publish_nodes, _apply_nodes, the pods' `wanted` rows).
See docs/ipv6-datapath.md.
"""
import ipaddress

__all__ = ["node_ip6", "node_rows", "pod_cidrs6", "pod_ip6"]


def _global6(iface):
    for a in iface.addresses if iface is not None else ():
        ip = ipaddress.ip_interface(a).ip
        if ip.version == 6 and not (ip.is_link_local or ip.is_loopback or ip.is_multicast):
            return str(ip)
    return None


def node_ip6(node):
    """The node's IPv6 address (str), or None when it has none."""
    if node is None:
        return None
    if node.internal_ip and ":" in node.internal_ip:
        return str(ipaddress.ip_address(node.internal_ip))
    found = None
    if node.internal_ip:
        found = _global6(node.interface_with_ip(node.internal_ip))
    if found is None and node.default_route_interface_v6:
        found = _global6(node.interface(node.default_route_interface_v6))
    return found


def pod_cidrs6(node):
    """The node's IPv6 pod CIDRs (a tuple of str)."""
    return tuple(c for c in node.pod_cidrs if ":" in c)


def pod_ip6(pod):
    """The pod's IPv6 address (str), or None (an IPv4-only pod)."""
    return next((ip for ip in pod.ips if ":" in ip), None)


def node_rows(nodes):
    """{node name: (IPv4 gateway IP, pod CIDRs of both families, IPv6 address
    or None)} for the nodes that have an IPv4 gateway IP (the tunnel's
    underlay is IPv4): what Datapath.add_node takes."""
    return {n.name: (n.gateway_ip, tuple(n.pod_cidrs), node_ip6(n)) for n in nodes.values() if n.gateway_ip}
