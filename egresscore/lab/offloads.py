"""Offloads in the lab: for agents run without PACKET_VNET_HDR (vnet_hdr=False).

Such an agent sees every frame as the kernel would put it on the wire, so the
lab's senders must not hand over TSO/GSO super-packets or partial checksums:
prepare_lab turns those offloads off everywhere (pyroute2's ethtool).
"""
from pyroute2.ethtool import Ethtool

from . import _ns

_TX_OFFLOADS = ("tx-checksum-ip-generic", "tx-checksum-ipv4", "tx-tcp-segmentation",
                "tx-generic-segmentation", "tx-udp-segmentation", "tx-udp_tnl-segmentation",
                "tx-udp_tnl-csum-segmentation", "tx-tcp-ecn-segmentation",
                "tx-tcp-mangleid-segmentation", "tx-tcp6-segmentation", "tx-scatter-gather", "rx-gro")


def disable_offloads(ifname, netns=None, keys=_TX_OFFLOADS):
    """Turn offload features `keys` off on `ifname` (default: tx checksumming, TSO, GSO)."""

    def apply():
        e = Ethtool()
        try:
            feats = e.get_features(ifname)
            for key in keys:
                if key in feats.features:
                    feats.features[key].enable = False
            e.set_features(ifname, feats)
        finally:
            e.close()

    if netns is None:
        return apply()
    return _ns.call(netns, apply, timeout=30)


def prepare_lab(lab, plain=False):
    """Ready the lab for agents run with vnet_hdr=False (plain=True): tx
    checksumming, TSO and GSO off everywhere (pods, servers, nodes, router).

    With vnet_hdr (the default) nothing needs changing: super-packets,
    UDP-tunnel ones from kernel vxlan devices included, arrive whole with
    their virtio_net_hdr.
    """
    if not plain:
        return
    for pod in lab.pods.values():
        disable_offloads(pod.ifname, pod.ns)
    for s in lab.servers.values():
        disable_offloads("eth0", s.ns)
    for n in lab.nodes.values():
        disable_offloads(n.ifname, n.ns)
    disable_offloads("eth0", lab.router_ns)
    for s in lab.servers.values():
        disable_offloads(s.name, lab.router_ns)
