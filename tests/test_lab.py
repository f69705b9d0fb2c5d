"""The namespace lab and the Linux kernel baseline egress gateway.

Root tests build real `egc-lab-*` namespaces; every lab is torn down by its
`with` block (checked: nothing with the prefix is left behind).
"""
import copy
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import needs_netns, require_tool, requires_tools

from egresscore.lab import (
    EGRESS_IPS,
    PREFIX,
    SAMPLE_POLICY,
    Lab,
    _ns,
    compile_entries,
    format_egress_list,
    mac_for,
    traffic,
)

IN_POLICY = "203.0.113.10"  # in 203.0.113.0/24, outside the excluded /25
EXCLUDED = "203.0.113.200"  # in the excluded 203.0.113.128/25
OTHER = "198.51.100.10"  # not in any policy
EGRESS_IP = "192.168.1.100"  # an extra egress IP of node3: tells SNAT apart from node3's masquerade
POLICY = copy.deepcopy(SAMPLE_POLICY)
POLICY["spec"]["egressGateway"]["egressIP"] = EGRESS_IP
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lab_namespaces():
    return _ns.lab_namespaces()


def interface_names():
    return [name for _, name in socket.if_nameindex()]


# -- no root needed ------------------------------------------------------------------
def test_mac_for_is_stable_and_local():
    assert mac_for("192.168.1.3") == "02:ec:c0:a8:01:03"
    assert mac_for("10.0.1.93", 0xED) == "02:ed:0a:00:01:5d"
    assert int(mac_for("1.2.3.4").split(":")[0], 16) & 0b11 == 0b10  # unicast, locally administered


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="datapath"):
        Lab(datapath="ebpf")
    with pytest.raises(ValueError, match="tag"):
        Lab(tag="a-b")
    with pytest.raises(ValueError, match="pod_mtu"):
        Lab(pod_mtu=100)


def test_format_egress_list_looks_like_cilium():
    text = format_egress_list([dict(src="10.0.1.93", cidr="203.0.113.0/24", egress_ip="192.168.1.100",
                                    gateway_ip="192.168.1.3")])
    lines = text.splitlines()
    assert lines[0].split() == ["Source", "IP", "Destination", "CIDR", "Egress", "IP", "Gateway", "IP"]
    assert lines[1].split() == ["10.0.1.93", "203.0.113.0/24", "192.168.1.100", "192.168.1.3"]


def test_traffic_pattern_is_a_prefix_family():
    assert len(traffic._pattern(100_000)) == 100_000
    assert traffic._pattern(100_000)[:65_537] == traffic._pattern(65_537)
    assert traffic.payload_sha256(10) != traffic.payload_sha256(11)


# -- namespaces ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_lab():
    require_tool("nft")
    with Lab(datapath="kernel", policies=[POLICY]) as lab:
        lab.add_pod("gwpod", "node3", {"app": "app1"})  # selected pod on the gateway node itself
        servers = lab.start_servers()
        yield lab, servers
    assert lab_namespaces() == []


@needs_netns
def test_build_and_teardown_leave_nothing():
    with Lab() as lab:
        names = set(lab_namespaces())
        expected = {PREFIX + n for n in ("lan", "router", "node1", "node2", "node3", "node4", "ext1", "ext2",
                                            "app1", "app2")}
        assert expected <= names
        facts = lab.cluster_facts()
    assert lab_namespaces() == []
    assert [n["internalIP"] for n in facts["nodes"]] == ["192.168.1.1", "192.168.1.2", "192.168.1.3",
                                                         "192.168.1.4"]
    assert [n["podCIDR"] for n in facts["nodes"]] == ["10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24", "10.0.4.0/24"]
    assert facts["nodes"][2]["egressIPs"] == list(EGRESS_IPS)
    assert facts["nodes"][3]["egressIPs"] == [f"192.168.1.{i}" for i in range(110, 120)]
    assert [n["name"] for n in facts["nodes"] if n["labels"].get("egress-gateway") == "true"] == ["node3", "node4"]
    assert facts["nodes"][0]["labels"]["node.kubernetes.io/name"] == "node1"
    pods = {p["name"]: p for p in facts["pods"]}
    assert pods["app1"]["node"] == "node1" and pods["app1"]["ip"].startswith("10.0.1.")
    assert pods["app2"]["node"] == "node2" and pods["app2"]["ip"].startswith("10.0.2.")
    assert pods["app1"]["labels"] == {"app": "app1"}
    assert pods["app1"]["mac"] == mac_for(pods["app1"]["ip"])


@needs_netns
def test_cluster_file_matches_the_example():
    with Lab() as lab:
        cluster = lab.cluster()
    example = os.path.join(ROOT, "examples", "cluster.yaml")
    if os.path.exists(example):
        import yaml
        with open(example) as f:
            assert cluster == yaml.safe_load(f)
    try:
        from egresscore.cluster import Cluster
    except ImportError:
        return
    assert Cluster.from_dict(cluster).to_dict()["pods"] == cluster["pods"]


@needs_netns
def test_exception_inside_the_with_block_tears_down():
    with pytest.raises(RuntimeError, match="boom"):
        with Lab():
            assert lab_namespaces()
            raise RuntimeError("boom")
    assert lab_namespaces() == []


@needs_netns
def test_stale_namespaces_are_removed_at_start():
    _ns.create(PREFIX + "stale")
    try:
        with Lab(tag="t1") as lab:
            assert PREFIX + "stale" not in lab_namespaces()
            # a second live lab keeps its namespaces when another one starts
            with Lab(tag="t2"):
                assert lab.ns("node1") in lab_namespaces()
            assert lab.ns("node1") in lab_namespaces()
    finally:
        _ns.remove(PREFIX + "stale")
    assert lab_namespaces() == []


@needs_netns
def test_a_killed_labs_namespaces_are_removed_by_the_next_lab():
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from egresscore.lab import Lab
        with Lab(tag="dead") as lab:
            print("up", flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
    finally:
        proc.kill()  # no chance to clean up
        proc.wait()
    assert PREFIX + "dead-node1" in lab_namespaces()
    with Lab():
        assert not [n for n in lab_namespaces() if n.startswith(PREFIX + "dead-")]
    assert lab_namespaces() == []


@needs_netns
def test_a_killed_runs_scratch_namespaces_are_removed_by_the_next_scratch_block():
    # a ring pair's names are random per run: only the killed run's lock file said they were its
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from egresscore._ringlab import veth_pair
        with veth_pair() as (ns_a, _, ns_b, _):
            print(ns_a, ns_b, flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        left = proc.stdout.readline().split()
    finally:
        proc.kill()  # no chance to clean up
        proc.wait()
    assert len(left) == 2 and set(left) <= set(_ns._netns.listnetns())
    try:
        with _ns.scratch("egc-ctl-sweeper") as mine:
            # a live block's namespaces are listed by its own lock: another block keeps them
            with _ns.scratch("egc-ctl-sweeper2"):
                assert set(mine) <= set(_ns._netns.listnetns())
            assert not set(left) & set(_ns._netns.listnetns())
    finally:
        for name in left:
            if name in _ns._netns.listnetns():
                _ns._netns.remove(name)
    assert not {"egc-ctl-sweeper", "egc-ctl-sweeper2"} & set(_ns._netns.listnetns())
    assert not [f for f in os.listdir(_ns.LOCK_DIR) if f.startswith(f"scratch-{os.getpid()}-")]


def _lab_child(prelude=""):
    """A Python child that builds a Lab, says "up" and sleeps.  Its SIGINT and
    SIGTERM start at their defaults, as in a shell's foreground job: a run
    started from a background job of a non-interactive shell (a CI script's
    `cmd &`) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler; `prelude` may set other dispositions."""
    script = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        {prelude}
        sys.path.insert(0, {ROOT!r})
        from egresscore.lab import Lab
        with Lab() as lab:
            print("up", flush=True)
            time.sleep(30)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_tear_down(sig):
    proc = _lab_child()
    try:
        assert proc.stdout.readline().strip() == "up"
        assert lab_namespaces()
        proc.send_signal(sig)
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lab_namespaces() == []


@needs_netns
def test_an_ignored_sigint_stays_ignored():
    """A lab in a process that ignores SIGINT (a background job) leaves it
    ignored, as Python does; SIGTERM still tears it down."""
    proc = _lab_child("signal.signal(signal.SIGINT, signal.SIG_IGN)")
    try:
        assert proc.stdout.readline().strip() == "up"
        proc.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1.0)
        assert lab_namespaces()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lab_namespaces() == []


@needs_netns
@requires_tools("nft")
def test_snat_is_observable_without_masquerade():
    with Lab(masquerade=False) as lab:
        servers = lab.start_servers()
        assert lab.udp_echo("app1", OTHER, count=1, timeout=0.5) == 0  # the router cannot return it
        assert servers.sources("udp") == {lab.pods["app1"].ip}
        lab.set_masquerade(True)
        servers.clear()
        assert lab.udp_echo("app1", OTHER, count=2, timeout=1.0) == 2
        assert servers.sources("udp") == {"192.168.1.1"}
        assert lab.tcp_request("app2", IN_POLICY) == "192.168.1.2"
        assert lab.ping("app2", IN_POLICY, count=1) == 1
        assert lab.ping("app1", lab.pods["app2"].ip, count=1) == 1  # pod to pod over the underlay
        # the kernel baseline goes in and out again on a running lab
        lab.install_kernel_egress([POLICY])
        assert lab.tcp_request("app1", IN_POLICY) == EGRESS_IP
        lab.remove_kernel_egress()
        assert lab.tcp_request("app1", IN_POLICY) == "192.168.1.1"
        assert "vxlan0" not in lab.call("node1", interface_names)


@needs_netns
def test_kernel_egress_list(kernel_lab):
    lab, _ = kernel_lab
    rows = {(e["src"], e["cidr"]): (e["egress_ip"], e["gateway_ip"]) for e in lab.kernel_entries}
    app1 = lab.pods["app1"].ip
    assert rows[(app1, "203.0.113.0/24")] == (EGRESS_IP, "192.168.1.3")
    assert rows[(app1, "203.0.113.128/25")][1] == "0.0.0.1"  # Cilium's "excluded" sentinel
    assert all(src != lab.pods["app2"].ip for src, _ in rows)


@needs_netns
@pytest.mark.parametrize("pod, dst, expected", [
    ("app1", IN_POLICY, EGRESS_IP),
    ("app1", EXCLUDED, "192.168.1.1"),
    ("app1", OTHER, "192.168.1.1"),
    ("app2", IN_POLICY, "192.168.1.2"),
    ("app2", EXCLUDED, "192.168.1.2"),
    ("gwpod", IN_POLICY, EGRESS_IP),
    ("gwpod", EXCLUDED, "192.168.1.3"),
])
def test_kernel_baseline_source_addresses(kernel_lab, pod, dst, expected):
    lab, servers = kernel_lab
    servers.clear()
    assert lab.tcp_request(pod, dst) == expected
    assert lab.udp_echo(pod, dst, count=2, timeout=1.0) == 2
    assert lab.ping(pod, dst, count=2, timeout=1.0) == 2
    for proto in ("tcp", "udp", "icmp"):
        assert servers.sources(proto, dst) == {expected}, proto


@needs_netns
def test_kernel_baseline_replies_come_back_through_vxlan(kernel_lab):
    lab, _ = kernel_lab

    def rx_packets():
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            link = ipr.get_links(ifname="vxlan0")[0]
            return link.get("IFLA_STATS64")["rx_packets"]

    before = lab.call("node1", rx_packets)
    assert lab.udp_echo("app1", IN_POLICY, count=3, timeout=1.0) == 3
    assert lab.call("node1", rx_packets) - before >= 3


@needs_netns
def test_kernel_baseline_bulk_tcp_intact(kernel_lab):
    lab, _ = kernel_lab
    assert lab.call("app1", traffic.tcp_download, IN_POLICY, 5_000_000, timeout=30) == (5_000_000, True)
    # upload: full-size segments from the pod (MTU 1500) meet vxlan0 (MTU 1450): PMTU discovery
    assert lab.call("app1", traffic.tcp_upload, IN_POLICY, 5_000_000, timeout=30) == (5_000_000, True)


@needs_netns
def test_kernel_baseline_no_gateway_drops(kernel_lab):
    lab, servers = kernel_lab
    policy = {"metadata": {"name": "nowhere"}, "spec": {
        "selectors": [{"podSelector": {"matchLabels": {"app": "app2"}}}],
        "destinationCIDRs": ["198.51.100.0/24"],
        "egressGateway": {"nodeSelector": {"matchLabels": {"node.kubernetes.io/name": "node9"}}},
    }}
    try:
        entries = lab.install_kernel_egress([POLICY, policy])
        assert (lab.pods["app2"].ip, "198.51.100.0/24", "0.0.0.0", "0.0.0.0") in {
            (e["src"], e["cidr"], e["egress_ip"], e["gateway_ip"]) for e in entries}
        servers.clear()
        assert lab.udp_echo("app2", OTHER, count=1, timeout=0.5) == 0
        assert servers.sources("udp", OTHER) == set()
        assert lab.tcp_request("app1", IN_POLICY) == EGRESS_IP  # the other policy still works
    finally:
        lab.install_kernel_egress([POLICY])
    assert lab.udp_echo("app2", OTHER, count=1, timeout=1.0) == 1


@needs_netns
def test_kernel_policy_errors_are_named(kernel_lab):
    lab, _ = kernel_lab
    bad = {"spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
                    "destinationCIDRs": ["203.0.113.0/24"],
                    "egressGateway": {"nodeSelector": {"matchLabels": {"node.kubernetes.io/name": "node3"}},
                                      "egressIP": "192.168.1.200"}}}
    with pytest.raises(ValueError, match="192.168.1.200 is not an address of node3"):
        compile_entries(lab, [bad])
    with pytest.raises(TypeError, match="policies"):
        compile_entries(lab, 42)
    same = copy.deepcopy(POLICY)
    same["spec"]["excludedCIDRs"] = ["203.0.113.0/24"]  # excluded equal to a destination: excluded wins
    assert {e["gateway_ip"] for e in compile_entries(lab, [same]) if e["pod"] == "app1"} == {"0.0.0.1"}


@needs_netns
def test_kernel_baseline_entries_match_the_independent_oracle(kernel_lab):
    """The baseline's egress list comes from the real Compiler; the lab's old hand-written one agrees."""
    from kernel_oracle import oracle_entries

    lab, _ = kernel_lab
    nowhere = {"metadata": {"name": "nowhere"}, "spec": {
        "selectors": [{"podSelector": {"matchLabels": {"app": "app2"}}}],
        "destinationCIDRs": ["198.51.100.0/24"], "excludedCIDRs": ["198.51.100.0/28"],
        "egressGateway": {"nodeSelector": {"matchLabels": {"node.kubernetes.io/name": "node9"}}},
    }}
    same = copy.deepcopy(POLICY)
    same["spec"]["excludedCIDRs"] = ["203.0.113.0/24"]
    for policies in ([POLICY], [POLICY, nowhere], [same], [nowhere]):
        entries = compile_entries(lab, policies)
        assert entries and entries == oracle_entries(lab, policies), policies


@needs_netns
def test_add_pod_checks_its_arguments(kernel_lab):
    lab, _ = kernel_lab
    with pytest.raises(ValueError, match="taken"):
        lab.add_pod("app1", "node1")
    with pytest.raises(ValueError, match="node must be one of"):
        lab.add_pod("x", "node7")
    with pytest.raises(ValueError, match="not a free address"):
        lab.add_pod("x", "node1", ip="10.0.2.50")
    with pytest.raises(ValueError, match="pod name"):
        lab.add_pod("a-very-long-pod-name", "node1")
