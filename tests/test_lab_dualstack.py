"""The dual-stack lab (Lab(ipv6=True)) and the kernel baseline's IPv6 half.

IPv6 pods, underlay and servers, no DAD or router advertisements in the way,
and the Linux baseline (vxlan + `ip -6 rule` + nftables `ip6` SNAT) giving the
same source addresses for IPv6 as the IPv4 lab does for IPv4, over the IPv4
and over the IPv6 underlay.
"""
import copy

import pytest
from conftest import needs_netns, require_tool

from egresscore.cluster import Cluster
from egresscore.compiler import Compiler
from egresscore.lab import Lab, _ns, traffic
from egresscore.lab.kernel import SAMPLE_POLICY_DUAL, masquerade_ruleset
from egresscore.lab.topology import EGRESS_IPS6, SERVERS6, pod_ip6
from egresscore.policy import load_policies, parse_policy

IN_POLICY6 = "2001:db8:113::10"              # in 2001:db8:113::/64, outside the excluded /65
EXCLUDED6 = "2001:db8:113:0:8000::200"       # in the excluded upper half
OTHER6 = "2001:db8:100::10"                  # in no policy
EGRESS_IP6 = "fd00:192:168:1::100"           # node3's first IPv6 egress IP (the dual sample's egressIP)
NODE6 = {f"node{i}": f"fd00:192:168:1::{i}" for i in range(1, 5)}


# -- no root needed ------------------------------------------------------------------
def test_dual_stack_arguments_and_plan():
    with pytest.raises(ValueError, match="tunnel_underlay"):
        Lab(tunnel_underlay=6)          # an IPv6 underlay needs the dual-stack lab
    with pytest.raises(ValueError, match="tunnel_underlay"):
        Lab(ipv6=True, tunnel_underlay=5)
    assert pod_ip6("10.0.1.93") == "fd00:10:1::93"
    assert EGRESS_IPS6[0] == EGRESS_IP6 and len(EGRESS_IPS6) == 10
    assert IN_POLICY6 in SERVERS6["ext1"][1] and EXCLUDED6 in SERVERS6["ext1"][1]


def test_dual_sample_policy_is_the_example_file():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (p,) = load_policies(os.path.join(root, "examples", "egress-sample-dual.yaml")).policies
    assert p.name == SAMPLE_POLICY_DUAL["metadata"]["name"]
    assert list(p.destination_cidrs) == SAMPLE_POLICY_DUAL["spec"]["destinationCIDRs"]
    assert list(p.excluded_cidrs) == SAMPLE_POLICY_DUAL["spec"]["excludedCIDRs"]
    assert p.gateways[0].egress_ip == EGRESS_IP6


def test_masquerade_ruleset_gains_an_ip6_table_only_when_asked():
    class N:
        ifname, pod_cidr, pod_cidr6 = "eth0", "10.0.1.0/24", "fd00:10:1::/64"
    v4 = masquerade_ruleset(N, "10.0.0.0/16")
    assert "table ip6" not in v4 and "ip saddr 10.0.1.0/24" in v4
    both = masquerade_ruleset(N, "10.0.0.0/16", cluster_cidr6="fd00:10::/32", snat_rules6=["ip6 saddr x snat to y"])
    assert both.startswith(v4)  # the ip table as before, the ip6 one after it
    assert 'oifname "eth0" ip6 saddr fd00:10:1::/64 ip6 daddr != fd00:10::/32 masquerade' in both
    assert "ip6 saddr x snat to y" in both


# -- namespaces ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[4, 6], ids=["underlay4", "underlay6"])
def dual_lab(request):
    require_tool("nft")
    with Lab(datapath="kernel", ipv6=True, tunnel_underlay=request.param, tag="dual") as lab:
        lab.add_pod("gwpod", "node3", {"app": "app1"})  # a selected pod on the gateway node itself
        servers = lab.start_servers()
        yield lab, servers
    assert _ns.lab_namespaces() == []


@needs_netns
def test_addresses_are_in_place_without_dad(dual_lab):
    lab, _ = dual_lab
    facts = lab.cluster_facts()
    assert [n["internalIP6"] for n in facts["nodes"]] == list(NODE6.values())
    assert [n["podCIDR6"] for n in facts["nodes"]] == [f"fd00:10:{i}::/64" for i in range(1, 5)]
    assert facts["nodes"][2]["egressIPs6"] == list(EGRESS_IPS6)
    assert {p["name"]: p["ip6"] for p in facts["pods"]}["app1"] == "fd00:10:1::93"
    for member in ("app1", "node3", "router", "ext1"):
        out = lab.run(member, ["ip", "-6", "addr", "show"]).stdout
        assert "tentative" not in out and "dadfailed" not in out, (member, out)
        assert lab.run(member, ["sysctl", "-n", "net.ipv6.conf.all.accept_ra"]).stdout.strip() == "0"
    assert EGRESS_IP6 in lab.run("node3", ["ip", "-6", "addr", "show", "dev", "eth0"]).stdout
    # the lab's cluster file is dual-stack: the compiler derives the IPv4 egress IP from the IPv6 one's interface
    cluster = Cluster.from_dict(lab.cluster(), source="lab")
    assert cluster.nodes["node3"].pod_cidrs == ("10.0.3.0/24", "fd00:10:3::/64")
    p, _ = parse_policy(copy.deepcopy(SAMPLE_POLICY_DUAL))
    d = Compiler(cluster, [p]).desired
    assert d[("fd00:10:1::93", "2001:db8:113::/64")].egress_ip == EGRESS_IP6
    assert d[("10.0.1.93", "203.0.113.0/24")].egress_ip == "192.168.1.3"


@needs_netns
def test_tunnel_runs_over_the_asked_underlay(dual_lab):
    lab, _ = dual_lab
    details = lab.run("node1", ["ip", "-d", "link", "show", "vxlan0"]).stdout
    local = "local fd00:192:168:1::1" if lab.tunnel_underlay == 6 else "local 192.168.1.1"
    assert local in details, details


@needs_netns
@pytest.mark.parametrize("pod, dst, expected", [
    ("app1", IN_POLICY6, EGRESS_IP6),
    ("app1", EXCLUDED6, NODE6["node1"]),
    ("app1", OTHER6, NODE6["node1"]),
    ("app2", IN_POLICY6, NODE6["node2"]),
    ("app2", EXCLUDED6, NODE6["node2"]),
    ("gwpod", IN_POLICY6, EGRESS_IP6),
    ("gwpod", EXCLUDED6, NODE6["node3"]),
    # IPv4 in the same lab, as the IPv4 lab gives it
    ("app1", "203.0.113.10", "192.168.1.3"),
    ("app1", "203.0.113.200", "192.168.1.1"),
    ("app2", "203.0.113.10", "192.168.1.2"),
])
def test_kernel_baseline_source_addresses_dual_stack(dual_lab, pod, dst, expected):
    lab, servers = dual_lab
    servers.clear()
    assert lab.tcp_request(pod, dst) == expected
    assert lab.udp_echo(pod, dst, count=2, timeout=1.0) == 2
    assert lab.ping(pod, dst, count=2, timeout=1.0) == 2
    for proto in ("tcp", "udp", "icmp"):
        assert servers.sources(proto, dst) == {expected}, proto


@needs_netns
def test_kernel_baseline_ipv6_bulk_tcp_intact_through_the_tunnel(dual_lab):
    lab, _ = dual_lab
    assert lab.call("app1", traffic.tcp_download, IN_POLICY6, 5_000_000, timeout=30) == (5_000_000, True)
    # upload: full-size segments from the pod (MTU 1500) meet vxlan0 (1450 / 1430): IPv6 PMTU discovery
    assert lab.call("app1", traffic.tcp_upload, IN_POLICY6, 5_000_000, timeout=30) == (5_000_000, True)


def test_udp_frame6_is_the_frame_scapy_builds():
    scapy = pytest.importorskip("scapy.all")
    frame = traffic.udp_frame6("02:00:00:00:00:01", "02:00:00:00:00:02", "fd00:10:1::93", IN_POLICY6, 40000, 9)
    want = (scapy.Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
            / scapy.IPv6(src="fd00:10:1::93", dst=IN_POLICY6, hlim=64) / scapy.UDP(sport=40000, dport=9))
    assert frame == bytes(want) and len(frame) == 62   # the smallest IPv6 UDP frame, checksum set
    assert traffic.udp_frame6("02:00:00:00:00:01", "02:00:00:00:00:02", "fd00::1", "fd00::2", 1, 2, 18) == bytes(
        scapy.Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01") / scapy.IPv6(src="fd00::1", dst="fd00::2")
        / scapy.UDP(sport=1, dport=2) / bytes(18))
