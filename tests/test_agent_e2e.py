"""End to end: egresscore agents on the lab's nodes carry real traffic (root).

One lab (namespaces egc-lab-agente2e-*) with an in-process Agent per node,
each in its own thread; the tests share it and restore the seed policy.
"""
import copy
import socket
import time

import pytest
from conftest import needs_netns, requires_tools, running_agents, start_agent

pytestmark = needs_netns

SERVER, EXCLUDED, OTHER = "203.0.113.10", "203.0.113.200", "198.51.100.10"
EGRESS_IP = "192.168.1.3"
NODE_IP = {"node1": "192.168.1.1", "node2": "192.168.1.2", "node3": "192.168.1.3"}


def _policies(doc):
    from egresscore.policy import parse_policy

    return [parse_policy(copy.deepcopy(doc))[0]]


def _sample():
    from egresscore.lab.kernel import SAMPLE_POLICY

    return copy.deepcopy(SAMPLE_POLICY)


def _start_agent(lab, name):
    return start_agent(lab, name, _sample())


@pytest.fixture(scope="module")
def lab():
    from egresscore.lab import Lab
    from egresscore.lab.offloads import prepare_lab

    with Lab(tag="agente2e") as lab:
        prepare_lab(lab)
        with running_agents(lab, _sample()) as lab.agents:
            lab.servers_ = lab.start_servers()
            yield lab


def set_policy(lab, doc):
    for a in lab.agents.values():
        a.set_policies(_policies(doc))


def test_sources_seen_by_the_servers(lab):
    assert lab.tcp_request("app1", SERVER) == EGRESS_IP
    assert lab.tcp_request("app2", SERVER) == NODE_IP["node2"]
    assert lab.tcp_request("app1", EXCLUDED) == NODE_IP["node1"]
    assert lab.tcp_request("app1", OTHER) == NODE_IP["node1"]
    for pod, dst in (("app1", SERVER), ("app2", SERVER), ("app1", EXCLUDED)):
        assert lab.udp_echo(pod, dst, count=3) == 3
        assert lab.ping(pod, dst, count=3) == 3
    lab.servers_.clear()
    lab.udp_echo("app1", SERVER, count=1)
    lab.ping("app1", SERVER, count=1)
    assert lab.servers_.sources("udp", SERVER) == {EGRESS_IP}
    assert lab.servers_.sources("icmp", SERVER) == {EGRESS_IP}
    c3 = lab.agents["node3"].counters()
    assert c3["snat_egress"] > 0 and c3["decap"] > 0 and c3["encap"] > 0


def test_pod_on_the_gateway_node(lab):
    from egresscore.cluster import Pod
    from egresscore.lab.offloads import disable_offloads

    pod = lab.add_pod("app3", "node3", {"app": "app1"})
    disable_offloads(pod.ifname, pod.ns)
    for a in lab.agents.values():
        a.upsert_pod(Pod("app3", "default", "uid-app3", {"app": "app1"}, (pod.ip,), "node3"))
    assert lab.tcp_request("app3", SERVER) == EGRESS_IP
    assert lab.tcp_request("app3", OTHER) == NODE_IP["node3"]
    assert lab.udp_echo("app3", SERVER) == 3 and lab.ping("app3", SERVER) == 3


def test_20_mb_both_ways_intact_with_pmtud_through_vxlan(lab):
    from egresscore.lab import traffic

    n = 20 << 20
    before = lab.agents["node3"].counters()["icmp_too_big"]
    tunneled3 = lab.agents["node3"].counters()["gso"]["tunneled"]
    got, ok = lab.call("app1", traffic.tcp_download, SERVER, n, timeout=90)
    assert (got, ok) == (n, True)
    # the server's 1500-byte segments do not fit the tunnel back: it was told so
    assert lab.agents["node3"].counters()["icmp_too_big"] > before
    # the server's super-packets went into the tunnel whole (the kernel vxlan device cut them)
    assert lab.agents["node3"].counters()["gso"]["tunneled"] > tunneled3
    before1 = lab.agents["node1"].counters()["icmp_too_big"]
    c1, c3 = lab.agents["node1"].counters()["gso"], lab.agents["node3"].counters()["gso"]
    got, ok = lab.call("app1", traffic.tcp_upload, SERVER, n, timeout=90)
    assert (got, ok) == (n, True)
    assert lab.agents["node1"].counters()["icmp_too_big"] >= before1
    # app1's super-packets: whole into the tunnel on node1, decapsulated whole on node3
    assert lab.agents["node1"].counters()["gso"]["tunneled"] > c1["tunneled"]
    assert lab.agents["node3"].counters()["gso"]["whole"] > c3["whole"]
    assert lab.agents["node1"].counters()["gso"]["segmented"] == c1["segmented"]


def test_without_the_tunnel_device_super_packets_are_cut_and_still_arrive(lab):
    """Another vxlan device holds the VNI and port: the agent says why it has no
    tunnel offload and cuts tunnel-bound super-packets itself."""
    from pyroute2 import IPRoute

    from egresscore.lab import traffic

    ns = lab.nodes["node1"].ns
    lab.agents.pop("node1").stop()
    with IPRoute(netns=ns) as ipr:
        eth = ipr.link_lookup(ifname="eth0")[0]
        ipr.link("add", ifname="other-vx", kind="vxlan", vxlan_id=2, vxlan_port=8472, vxlan_link=eth,
                 vxlan_local=NODE_IP["node1"], vxlan_learning=0)
    try:
        agent = lab.agents["node1"] = _start_agent(lab, "node1")
        assert agent.tunnel_error and "egc-tnl0" in agent.tunnel_error
        got, ok = lab.call("app1", traffic.tcp_upload, SERVER, 4 << 20, timeout=60)
        assert (got, ok) == (4 << 20, True)
        gso = agent.counters()["gso"]
        assert gso["segmented"] > 0 and gso["tunneled"] == 0
    finally:
        lab.agents.pop("node1").stop()
        with IPRoute(netns=ns) as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname="other-vx")[0])
        lab.agents["node1"] = _start_agent(lab, "node1")
    assert lab.agents["node1"].tunnel_error is None


def test_gateway_moved_at_run_time_then_no_gateway(lab):
    moved = _sample()
    moved["spec"]["egressGateway"] = {"nodeSelector": {"matchLabels": {"node.kubernetes.io/name": "node2"}},
                                      "egressIP": NODE_IP["node2"]}
    try:
        set_policy(lab, moved)
        assert lab.tcp_request("app1", SERVER) == NODE_IP["node2"]
        nowhere = _sample()
        nowhere["spec"]["egressGateway"]["nodeSelector"] = {"matchLabels": {"node.kubernetes.io/name": "node9"}}
        set_policy(lab, nowhere)
        before = lab.agents["node1"].counters()["drops"].get("no_gateway", 0)
        with pytest.raises(Exception):
            lab.tcp_request("app1", SERVER, timeout=1.0)
        assert lab.ping("app1", SERVER, count=1, timeout=0.5) == 0
        assert lab.agents["node1"].counters()["drops"]["no_gateway"] > before
        # traffic the policy does not cover is untouched
        assert lab.tcp_request("app1", OTHER) == NODE_IP["node1"]
    finally:
        set_policy(lab, _sample())
    assert lab.tcp_request("app1", SERVER) == EGRESS_IP


def _send_raw(frame_ip, dst):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        s.sendto(frame_ip, (dst, 0))
    finally:
        s.close()


def _spoofed_udp(src, dst, sport, dport, payload=b"spoof"):
    from scapy.layers.inet import IP, UDP

    return bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)


def _vxlan_from_router():
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    inner = Ether(src="02:ee:c0:a8:01:01", dst="02:ee:c0:a8:01:03") / IP(src="10.0.1.93", dst=SERVER) / UDP(
        sport=4444, dport=7) / b"vx"
    return bytes(IP(src="192.168.1.254", dst=EGRESS_IP) / UDP(sport=5555, dport=8472)
                 / VXLAN(vni=2, flags=0x08) / inner)


def test_spoofing_gets_nothing(lab):
    lab.servers_.clear()
    before2 = lab.agents["node2"].counters()["drops"].get("spoofed", 0)
    before3 = lab.agents["node3"].counters()["drops"].get("not_cluster_node", 0)
    # app2 pretending to be app1 (whose traffic to SERVER leaves with the egress IP)
    lab.call("app2", _send_raw, _spoofed_udp("10.0.1.93", SERVER, 4444, 7), SERVER)
    # a host on the underlay that is not a cluster node tunnelling app1's traffic to the gateway
    lab.call("router", _send_raw, _vxlan_from_router(), EGRESS_IP)
    time.sleep(0.5)
    assert lab.agents["node2"].counters()["drops"].get("spoofed", 0) == before2 + 1
    assert lab.agents["node3"].counters()["drops"].get("not_cluster_node", 0) == before3 + 1
    assert not [r for r in lab.servers_.seen("udp") if r["sport"] in (4444,)]


def test_unsolicited_inbound_is_dropped_and_counted(lab):
    before = lab.agents["node3"].counters()["drops"].get("no_nat_entry", 0)
    lab.call("ext1", _send_raw, _spoofed_udp(SERVER, EGRESS_IP, 7, 40000), EGRESS_IP)
    time.sleep(0.3)
    assert lab.agents["node3"].counters()["drops"].get("no_nat_entry", 0) == before + 1


@requires_tools("nft")
def test_interop_with_linux_vxlan_both_ways(lab):
    """A kernel source node tunnelling to our gateway, then our source node tunnelling to a kernel gateway."""
    policy = [_sample()]
    try:
        lab.agents.pop("node1").stop()
        lab.install_kernel_egress(policy, nodes=["node1"])
        assert lab.tcp_request("app1", SERVER) == EGRESS_IP
        assert lab.ping("app1", SERVER) == 3
        assert lab.agents["node3"].counters()["decap"] > 0
        lab.remove_kernel_egress(nodes=["node1"])
        # a kernel gateway answers no heartbeat: node1 takes Cilium's choice (gateway health off)
        lab.agents["node1"] = start_agent(lab, "node1", _sample(), gateway_health=False)
        lab.agents.pop("node3").stop()
        lab.install_kernel_egress(policy, nodes=["node3"])
        before = lab.agents["node1"].counters()["decap"]
        assert lab.tcp_request("app1", SERVER) == EGRESS_IP
        assert lab.udp_echo("app1", SERVER) == 3
        assert lab.agents["node1"].counters()["decap"] > before
    finally:
        for name in ("node1", "node3"):
            try:
                lab.remove_kernel_egress(nodes=[name])
            except Exception:
                pass


def _rules(ns):
    import subprocess

    return subprocess.run(["ip", "-n", ns, "rule"], capture_output=True, text=True, check=True).stdout


def _port_range(lab, name):
    from egresscore.agent.host import PORT_RANGE, sysctl_get

    return lab.call(name, sysctl_get, PORT_RANGE)


def test_agent_removes_what_it_installed(lab):
    import subprocess

    ns = lab.nodes["node2"].ns
    agent = lab.agents.pop("node2")
    rules = _rules(ns)
    # the claims: tagged blackhole rules before the local table's rule, moved from priority 0
    assert "iif lxc-app2 blackhole proto 236" in rules
    assert "to 192.168.1.2 iif eth0 ipproto udp dport 8472 blackhole proto 236" in rules
    assert "43:\tfrom all lookup local proto 236" in rules and "0:\tfrom all lookup local" not in rules
    assert _port_range(lab, "node2") == "20000 32767"
    links = lambda: subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout  # noqa: E731
    assert "egc-tnl0" in links()
    agent.stop()
    rules = _rules(ns)
    assert "proto 236" not in rules and rules.startswith("0:\tfrom all lookup local\n")
    assert "egc-tnl0" not in links()
    assert _port_range(lab, "node2") != "20000 32767"


def test_demo_command_runs(capsys):
    from egresscore.cli import main

    assert main(["demo", "-q"]) == 0
    out = capsys.readouterr().out
    assert "192.168.1.3" in out and "Egress list" in out


def test_batch_ring_mode_carries_traffic_too(lab):
    from egresscore import Agent
    from egresscore.cluster import Cluster
    from egresscore.lab import traffic

    with pytest.raises(ValueError, match="ring_mode must be one of latency, batch"):
        Agent("node1", Cluster.from_dict(lab.cluster()), [], netns=lab.nodes["node1"].ns, ring_mode="fast")
    for name in ("node1", "node3"):   # the tests before may have stopped some
        if name in lab.agents:
            lab.agents.pop(name).stop()
    try:
        for name in ("node1", "node3"):
            lab.agents[name] = start_agent(lab, name, _sample(), ring_mode="batch")
        assert lab.agents["node1"].ring_mode == "batch"
        assert lab.tcp_request("app1", SERVER) == EGRESS_IP
        got, ok = lab.call("app1", traffic.tcp_upload, SERVER, 4 << 20, timeout=60)
        assert (got, ok) == (4 << 20, True)
        assert lab.agents["node1"].counters()["gso"]["tunneled"] > 0
    finally:
        for name in ("node1", "node3"):
            if name in lab.agents:
                lab.agents.pop(name).stop()
            lab.agents[name] = _start_agent(lab, name)


def test_daemon_reloads_policy_files_on_sighup(lab, tmp_path):
    """The `egresscore agent` daemon: SIGHUP re-reads the policy file (gateway moved), SIGTERM cleans up."""
    import yaml

    from egresscore.demo import start_agents

    for a in list(lab.agents.values()):
        a.stop()
    lab.agents.clear()
    for name in lab.nodes:
        lab.remove_kernel_egress(nodes=[name]) if lab.kernel_entries else None
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(_sample()))
    _, procs = start_agents(lab, str(policy_file), str(tmp_path))
    try:
        assert lab.tcp_request("app1", SERVER) == EGRESS_IP
        moved = _sample()
        moved["spec"]["egressGateway"] = {"nodeSelector": {"matchLabels": {"node.kubernetes.io/name": "node2"}},
                                          "egressIP": NODE_IP["node2"]}
        policy_file.write_text(yaml.safe_dump(moved))
        for p in procs.values():
            p.reload()
        deadline = time.monotonic() + 10
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = lab.tcp_request("app1", SERVER, timeout=1.0)
            except Exception:  # noqa: BLE001 - agents converging on the new policy
                seen = None
            if seen == NODE_IP["node2"]:
                break
            time.sleep(0.3)
        assert seen == NODE_IP["node2"]
    finally:
        lines = {name: p.stop() for name, p in procs.items()}
    assert all(ls and "stopped" in ls[-1] for ls in lines.values()), lines
    assert "proto 236" not in _rules(lab.nodes["node1"].ns)

