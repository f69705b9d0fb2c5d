"""A veth pair across two throwaway network namespaces, for ring tests and
benchmarks.  Nothing here touches the root namespace's links: the pair is
created inside the first namespace and its peer moved to the second, both
namespaces carry the `egc-ring-` prefix and are removed on exit (also on
error; egresscore.lab._ns.scratch).  IPv6 is off on the pair so no neighbour
discovery adds stray frames.
"""
import contextlib
import uuid

PREFIX = "egc-ring-"
_NO_IPV6 = {"net.ipv6.conf.default.disable_ipv6": 1, "net.ipv6.conf.all.disable_ipv6": 1}


@contextlib.contextmanager
def veth_pair(tag=None, mtu=1500):
    """Yield (ns_a, if_a, ns_b, if_b): if_a in ns_a wired to if_b in ns_b."""
    from pyroute2 import NetNS

    from egresscore.lab import _ns

    tag = tag or uuid.uuid4().hex[:6]
    ns_a, ns_b = f"{PREFIX}{tag}-a", f"{PREFIX}{tag}-b"
    if_a, if_b = "egcr0", "egcr1"
    with _ns.scratch(ns_a, ns_b):
        for name in (ns_a, ns_b):
            _ns.sysctl(name, _NO_IPV6)
        with NetNS(ns_a) as ipr:
            ipr.link("add", ifname=if_a, kind="veth", peer=if_b)
            idx_b = ipr.link_lookup(ifname=if_b)[0]
            ipr.link("set", index=idx_b, net_ns_fd=ns_b)
            idx_a = ipr.link_lookup(ifname=if_a)[0]
            ipr.link("set", index=idx_a, mtu=mtu, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        with NetNS(ns_b) as ipr:
            idx_b = ipr.link_lookup(ifname=if_b)[0]
            ipr.link("set", index=idx_b, mtu=mtu, state="up")
        yield ns_a, if_a, ns_b, if_b


def link_mac(ns, ifname):
    from pyroute2 import NetNS
    with NetNS(ns) as ipr:
        link = ipr.get_links(ifname=ifname)[0]
        return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))


def frame(dst, src, seq, size=64, ethertype=0x88B5):
    """A test frame: Ethernet header, a 4-byte sequence number, filler."""
    body = seq.to_bytes(4, "big") + bytes((seq + i) & 0xFF for i in range(size - 18))
    return dst + src + ethertype.to_bytes(2, "big") + body


__all__ = ["PREFIX", "veth_pair", "link_mac", "frame"]


def plain_socket(ns, ifname, proto):
    """A plain AF_PACKET socket on `ifname` inside `ns`: the benchmarks' peer."""
    import socket

    from egresscore._core import _ring_in_netns
    with _ring_in_netns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    s.bind((ifname, proto))
    return s
