"""End to end over IPv6: egresscore agents in the dual-stack lab (root).

One dual-stack lab (Lab(ipv6=True), namespaces egc-lab-ipv6e2e-*) with an
in-process Agent per node on the dual-stack sample policy
(examples/egress-sample-dual.yaml), the IPv6 datapath on (the default when a
node has an IPv6 address), VXLAN over the IPv4 underlay as Cilium; and a
second one whose tunnel runs over the IPv6 underlay, for the interop with
Linux vxlan devices there.
"""
import copy
import socket
import time

import pytest
from conftest import needs_netns, requires_tools, running_agents, start_agent

pytestmark = needs_netns

SERVER6, EXCLUDED6, OTHER6 = "2001:db8:113::10", "2001:db8:113:0:8000::200", "2001:db8:100::10"
SERVER4 = "203.0.113.10"
EGRESS_IP6 = "fd00:192:168:1::100"   # the dual sample's egressIP
EGRESS_IP4 = "192.168.1.3"           # derived from its interface (eth0's first IPv4)
NODE6 = {f"node{i}": f"fd00:192:168:1::{i}" for i in range(1, 5)}
APP1_6, APP2_6 = "fd00:10:1::93", "fd00:10:2::32"


def _sample():
    from egresscore.lab.kernel import SAMPLE_POLICY_DUAL

    return copy.deepcopy(SAMPLE_POLICY_DUAL)


@pytest.fixture(scope="module")
def lab():
    from egresscore.lab import Lab
    from egresscore.lab.offloads import prepare_lab

    with Lab(tag="ipv6e2e", ipv6=True) as lab:
        prepare_lab(lab)
        with running_agents(lab, _sample()) as lab.agents:
            lab.servers_ = lab.start_servers()
            yield lab


def _drops(agent, reason):
    return agent.counters()["drops"].get(reason, 0)


@pytest.mark.parametrize("pod, dst, expected", [
    ("app1", SERVER6, EGRESS_IP6),            # in the policy: the IPv6 egress IP
    ("app2", SERVER6, NODE6["node2"]),        # not selected: its node's IPv6 address
    ("app1", EXCLUDED6, NODE6["node1"]),      # the excluded half: the node's
    ("app1", OTHER6, NODE6["node1"]),         # no policy: the node's
])
def test_sources_seen_by_the_servers_tcp_udp_ping6(lab, pod, dst, expected):
    lab.servers_.clear()
    assert lab.tcp_request(pod, dst) == expected
    assert lab.udp_echo(pod, dst, count=3) == 3
    assert lab.ping(pod, dst, count=3) == 3
    for proto in ("tcp", "udp", "icmp"):
        assert lab.servers_.sources(proto, dst) == {expected}, proto


def test_both_families_side_by_side(lab):
    c3 = lab.agents["node3"].counters()
    assert lab.tcp_request("app1", SERVER4) == EGRESS_IP4
    assert lab.tcp_request("app1", SERVER6) == EGRESS_IP6
    assert lab.tcp_request("app2", SERVER4) == "192.168.1.2"
    after = lab.agents["node3"].counters()
    assert after["snat_egress"] > c3["snat_egress"] and after["decap"] > c3["decap"]


def test_20_mb_both_ways_intact_with_pmtud_through_vxlan(lab):
    from egresscore.lab import traffic

    n = 20 << 20
    before3 = lab.agents["node3"].counters()["icmp_too_big"]
    assert lab.call("app1", traffic.tcp_download, SERVER6, n, timeout=120) == (n, True)
    # the server's 1500-byte segments do not fit the tunnel back to node1: node3 said so (packet too big)
    assert lab.agents["node3"].counters()["icmp_too_big"] > before3
    before1 = lab.agents["node1"].counters()["icmp_too_big"]
    assert lab.call("app1", traffic.tcp_upload, SERVER6, n, timeout=120) == (n, True)
    assert lab.agents["node1"].counters()["icmp_too_big"] >= before1


def _send_frame(ifname, frame):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        s.bind((ifname, 0))
        s.send(frame)
    finally:
        s.close()


def _send_raw4(packet, dst):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        s.sendto(packet, (dst, 0))
    finally:
        s.close()


def test_spoofed_ipv6_sources_get_nothing(lab):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    lab.servers_.clear()
    app2 = lab.pods["app2"]
    before2 = _drops(lab.agents["node2"], "spoofed")
    before3 = _drops(lab.agents["node3"], "not_cluster_node")
    # app2 pretending to be app1 (whose IPv6 traffic to SERVER6 leaves with the egress IP)
    spoof = Ether(src=app2.mac, dst=app2.host_mac) / IPv6(src=APP1_6, dst=SERVER6) / UDP(sport=4444, dport=7) / b"s"
    lab.call("app2", _send_frame, app2.ifname, bytes(spoof))
    # a host on the underlay that is not a cluster node tunnelling app1's IPv6 traffic to the gateway
    inner = (Ether(src="02:ee:c0:a8:01:01", dst="02:ee:c0:a8:01:03") / IPv6(src=APP1_6, dst=SERVER6)
             / UDP(sport=4445, dport=7) / b"vx")
    lab.call("router", _send_raw4, bytes(IP(src="192.168.1.254", dst="192.168.1.3") / UDP(sport=5555, dport=8472)
                                         / VXLAN(vni=2, flags=0x08) / inner), "192.168.1.3")
    time.sleep(0.5)
    assert _drops(lab.agents["node2"], "spoofed") == before2 + 1
    assert _drops(lab.agents["node3"], "not_cluster_node") == before3 + 1
    assert not [r for r in lab.servers_.seen("udp") if r["sport"] in (4444, 4445)]


def _udp6_from(src, dst, sport, dport):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.bind((src, sport))
        s.sendto(b"unsolicited", (dst, dport))
    finally:
        s.close()


def test_unsolicited_inbound_ipv6_is_dropped_and_counted(lab):
    before = _drops(lab.agents["node3"], "no_nat_entry")
    lab.call("ext1", _udp6_from, SERVER6, EGRESS_IP6, 4446, 40000)
    time.sleep(0.3)
    assert _drops(lab.agents["node3"], "no_nat_entry") == before + 1


# -- VXLAN over the IPv6 underlay, with Linux vxlan devices --------------------------------

@pytest.fixture(scope="module")
def lab6u():
    from egresscore.lab import Lab
    from egresscore.lab.offloads import prepare_lab

    with Lab(tag="ipv6u", ipv6=True, tunnel_underlay=6) as lab:
        prepare_lab(lab)
        with running_agents(lab, _sample(), per_node={n: {"underlay6": True} for n in lab.nodes}) as lab.agents:
            lab.servers_ = lab.start_servers()
            yield lab


def test_agents_tunnel_over_the_ipv6_underlay(lab6u):
    lab = lab6u
    assert all(a.underlay6 and a.datapath.underlay6 for a in lab.agents.values())
    assert lab.tcp_request("app1", SERVER6) == EGRESS_IP6
    assert lab.tcp_request("app1", SERVER4) == EGRESS_IP4   # IPv4 pods ride the IPv6 underlay too
    assert lab.udp_echo("app1", SERVER6) == 3 and lab.ping("app1", SERVER6) == 3


@requires_tools("nft")
def test_interop_with_linux_vxlan_over_the_ipv6_underlay_both_ways(lab6u):
    """A kernel source node tunnelling to our gateway over IPv6, then our source node tunnelling
    to a kernel gateway over IPv6; IPv6 and IPv4 pods' traffic alike."""
    lab = lab6u
    policy = [_sample()]
    try:
        lab.agents.pop("node1").stop()
        lab.install_kernel_egress(policy, nodes=["node1"])
        before = lab.agents["node3"].counters()["decap"]
        assert lab.tcp_request("app1", SERVER6) == EGRESS_IP6
        assert lab.tcp_request("app1", SERVER4) == EGRESS_IP4
        assert lab.ping("app1", SERVER6) == 3
        assert lab.agents["node3"].counters()["decap"] > before
        lab.remove_kernel_egress(nodes=["node1"])
        # a kernel gateway answers no heartbeat: node1 takes Cilium's choice (gateway health off)
        lab.agents["node1"] = start_agent(lab, "node1", _sample(), gateway_health=False, underlay6=True)
        lab.agents.pop("node3").stop()
        lab.install_kernel_egress(policy, nodes=["node3"])
        before = lab.agents["node1"].counters()["decap"]
        assert lab.tcp_request("app1", SERVER6) == EGRESS_IP6
        assert lab.udp_echo("app1", SERVER6) == 3
        assert lab.tcp_request("app1", SERVER4) == EGRESS_IP4
        assert lab.agents["node1"].counters()["decap"] > before
    finally:
        for name in ("node1", "node3"):
            try:
                lab.remove_kernel_egress(nodes=[name])
            except Exception:
                pass
