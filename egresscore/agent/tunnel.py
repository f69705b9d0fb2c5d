"""The tunnel offload device: a kernel vxlan device the agent hands TCP super-packets to.

A packet socket cannot give the kernel a UDP-tunnel GSO frame, but it can
give a vxlan device an inner TCP super-packet (PACKET_VNET_HDR).  The vxlan
device encapsulates it and the kernel cuts the UDP-tunnel GSO packet after
encapsulation (in software, or in a NIC with tunnel TSO): the way Cilium's
BPF datapath reaches cilium_vxlan.  The device only transmits; the agent's
claim (a blackhole FIB rule, egresscore.agent.host) keeps VXLAN from reaching its
UDP socket, so it never decapsulates.

The FDB maps 02:ee:<node IP> (the inner destination MAC the datapath writes)
to each other node; no learning, no default entry, so nothing else leaves.
"""
import contextlib
import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import states as _nud

TUNNEL_IF = "egc-tnl0"
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8


def tunnel_mac(ip):
    """The inner MAC the datapath writes for node `ip` (dp_vxlan_mac): 02:ee:<ip>."""
    return "02:ee:" + ":".join("%02x" % int(b) for b in ip.split("."))


class TunnelDevice:
    """Create, keep the FDB of, and remove the offload vxlan device in a namespace."""

    def __init__(self, *, netns, underlay_index, local_ip, vni, port, mtu, ifname=TUNNEL_IF, ipr=None):
        self.netns = netns
        self._own_ipr = ipr  # an open IPRoute to use (the agent's host thread's), else one per call
        self.ifname = ifname
        self.local_ip = local_ip
        self._spec = dict(vxlan_id=vni, vxlan_port=port, vxlan_local=local_ip, vxlan_link=underlay_index,
                          vxlan_learning=0, vxlan_udp_csum=0)  # outer checksum 0, as our own encap
        self._mtu = mtu - VXLAN_OVERHEAD
        self._peers = set()
        self.index = None

    def _ipr(self):
        if self._own_ipr is not None:
            return contextlib.nullcontext(self._own_ipr)
        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def create(self):
        """Create the device (a stale one of ours is replaced).  Raises NetlinkError
        when the kernel refuses, e.g. another vxlan device already has this VNI and port."""
        with self._ipr() as ipr:
            for idx in ipr.link_lookup(ifname=self.ifname):
                ipr.link("del", index=idx)
            ipr.link("add", ifname=self.ifname, kind="vxlan", **self._spec)
            self.index = ipr.link_lookup(ifname=self.ifname)[0]
            ipr.link("set", index=self.index, address=tunnel_mac(self.local_ip), mtu=self._mtu, state="up")
        return self

    def set_peers(self, ips):
        """The other nodes' underlay IPs: one static FDB entry each."""
        ips = {ip for ip in ips if ip != self.local_ip}
        with self._ipr() as ipr:
            for ip in self._peers - ips:
                try:
                    ipr.fdb("del", ifindex=self.index, lladdr=tunnel_mac(ip), dst=ip)
                except NetlinkError:
                    pass
            for ip in ips - self._peers:
                try:
                    ipr.fdb("add", ifindex=self.index, lladdr=tunnel_mac(ip), dst=ip, state=_nud["permanent"])
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
        self._peers = ips

    def remove(self):
        if self.index is None:
            return
        try:
            with self._ipr() as ipr:
                ipr.link("del", index=self.index)
        except NetlinkError:
            pass
        self.index = None
