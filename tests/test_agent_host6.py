"""The agent's host work on a dual-stack host (Lab(ipv6=True)): NDP learnt
through netlink as ARP is, and the claims extended to IPv6 so the kernel never
answers nor forwards the agent's IPv6 traffic; all of it undone at stop.

These need no IPv6 datapath: they check what the agent asks of the host.
"""
import socket
import subprocess
import time

import pytest
from conftest import needs_netns, running_agents

from egresscore.lab.kernel import SAMPLE_POLICY_DUAL
from egresscore.lab.topology import ROUTER_IP, ROUTER_IP6, mac_for

EGRESS_IP6 = "fd00:192:168:1::100"
OTHER6 = "2001:db8:100::10"


def _rules6(ns):
    return subprocess.run(["ip", "-n", ns, "-6", "rule"], capture_output=True, text=True, check=True).stdout


def _connect6(dst, port, timeout):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((dst, port))
        return "connected"
    except TimeoutError:
        return "no answer"
    except ConnectionRefusedError:
        return "refused"
    finally:
        s.close()


@pytest.fixture(scope="module")
def lab():
    if (reason := __import__("conftest").netns_unavailable_reason()) is not None:
        pytest.skip(reason)
    from egresscore.lab import Lab

    with Lab(ipv6=True, tag="agenthost6") as lab:
        lab.rules6_before = {name: _rules6(n.ns) for name, n in lab.nodes.items()}
        with running_agents(lab, SAMPLE_POLICY_DUAL) as lab.agents:
            lab.servers_ = lab.start_servers()
            yield lab


@needs_netns
def test_ipv6_claims_while_the_agent_runs(lab):
    rules = _rules6(lab.nodes["node3"].ns)
    print(rules)
    for ip in (EGRESS_IP6, "fd00:192:168:1::109", "fd00:192:168:1::3"):
        for proto in ("tcp", "udp"):
            assert f"40:\tfrom all to {ip} iif eth0 ipproto {proto} dport 32768-65534 blackhole proto 236" in rules
    assert "40:\tfrom all to fd00:192:168:1::3 iif eth0 ipproto udp dport 8472 blackhole proto 236" in rules
    assert "43:\tfrom all lookup local proto 236" in rules
    assert "0:\tfrom all lookup local" not in rules   # IPv6's own local rule moved after the band
    rules1 = _rules6(lab.nodes["node1"].ns)
    assert "42:\tfrom all iif lxc-app1 blackhole proto 236" in rules1
    for inside in ("fd00:10:3::/64", "fd00:192:168:1::2", "fe80::/10", "ff00::/8"):
        assert f"41:\tfrom all to {inside} goto 43 proto 236" in rules1, inside


@needs_netns
def test_syn_to_an_ipv6_egress_ip_in_the_nat_range_gets_no_answer_from_the_kernel(lab):
    assert lab.call("ext1", _connect6, EGRESS_IP6, 40000, 1.5) == "no answer"
    assert lab.call("ext1", _connect6, EGRESS_IP6, 80, 1.5) == "refused"   # outside the range: the kernel's


@needs_netns
def test_the_kernel_never_forwards_a_pods_ipv6_traffic_with_the_pods_address(lab):
    servers = lab.servers_
    servers.clear()
    lab.udp_echo("app1", OTHER6, count=2, timeout=0.5)
    assert lab.pods["app1"].ip6 not in servers.sources("udp")
    # inside the cluster the kernel still carries it (pod CIDRs, neighbour discovery on the veth)
    assert lab.ping("app1", lab.pods["app2"].ip6, count=1) == 1
    assert lab.ping("app1", lab.nodes["node1"].pod_gateway6, count=1) == 1


def _neighbours(agent):
    n = agent._neighbours
    return agent._host.call(lambda: (n.router, n.router6, dict(n.macs)))


@needs_netns
def test_ndp_neighbours_are_learnt_as_arp_ones(lab):
    agent = lab.agents["node1"]
    router, router6, macs = _neighbours(agent)
    assert (router, router6) == (ROUTER_IP, ROUTER_IP6)
    assert macs[ROUTER_IP6] == macs[ROUTER_IP] == mac_for(ROUTER_IP)   # the router's eth0, by NDP and ARP
    # a new IPv6 neighbour arrives as a netlink event
    ns = lab.nodes["node1"].ns
    subprocess.run(["ip", "-n", ns, "-6", "neigh", "replace", "fd00:192:168:1::77", "lladdr", "02:aa:bb:cc:dd:ee",
                    "dev", "eth0", "nud", "permanent"], check=True)
    try:
        deadline = time.monotonic() + 5
        while _neighbours(agent)[2].get("fd00:192:168:1::77") != "02:aa:bb:cc:dd:ee":
            assert time.monotonic() < deadline, "the NDP entry never reached the agent"
            time.sleep(0.05)
    finally:
        subprocess.run(["ip", "-n", ns, "-6", "neigh", "del", "fd00:192:168:1::77", "dev", "eth0"], check=False)


@needs_netns
def test_stop_gives_the_ipv6_rules_back(lab):
    for agent in lab.agents.values():
        agent.stop()
        agent.close()
    for name, n in lab.nodes.items():
        assert _rules6(n.ns) == lab.rules6_before[name], name
