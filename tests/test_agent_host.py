"""The agent's host work (egresscore.agent.host) on real namespaces: the claims,
a datapath thread that makes no host call, neighbours from netlink events,
recovery after kill -9, a missing --netns.

One lab (egc-lab-agenthost-*) with an in-process Agent per node.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import needs_netns, running_agents, start_agent

ROOT = os.path.join(os.path.dirname(__file__), "..")
CLUSTER = os.path.join(ROOT, "examples", "cluster.yaml")
SAMPLE = os.path.join(ROOT, "examples", "egress-sample.yaml")
SERVER = "203.0.113.10"
EGRESS_IP, EXTRA_EGRESS_IP = "192.168.1.3", "192.168.1.100"
ROUTER_IP = "192.168.1.254"


def _missing_name():
    return f"egc-lab-missing-{os.getpid()}"


def test_agent_on_a_missing_netns_is_an_error_that_creates_nothing():
    from pyroute2 import netns

    from egresscore import Agent
    from egresscore.agent import AgentError

    name = _missing_name()
    with pytest.raises(AgentError, match=f"no network namespace named '{name}'"):
        Agent("node3", CLUSTER, [], netns=name)
    assert name not in netns.listnetns()


def test_cli_agent_on_a_missing_netns_is_an_error_that_creates_nothing(capsys):
    from pyroute2 import netns

    from egresscore.cli import main

    name = _missing_name()
    code = main(["agent", "--node", "node3", "--cluster", CLUSTER, "--policies", SAMPLE, "--netns", name])
    err = capsys.readouterr().err
    assert code != 0 and f"no network namespace named '{name}'" in err and "Traceback" not in err
    assert name not in netns.listnetns()


# -- in the lab ----------------------------------------------------------------------------

def _sample():
    import copy

    from egresscore.lab.kernel import SAMPLE_POLICY

    return copy.deepcopy(SAMPLE_POLICY)


@pytest.fixture(scope="module")
def lab():
    if (reason := __import__("conftest").netns_unavailable_reason()) is not None:
        pytest.skip(reason)
    from egresscore.lab import Lab
    from egresscore.lab.offloads import prepare_lab

    with Lab(tag="agenthost") as lab:
        prepare_lab(lab)
        lab.host_before = {name: _host_state(lab, name) for name in lab.nodes}
        with running_agents(lab, _sample()) as lab.agents:
            lab.servers_ = lab.start_servers()
            yield lab


def _rules(ns):
    return subprocess.run(["ip", "-n", ns, "rule"], capture_output=True, text=True, check=True).stdout


def _host_state(lab, name):
    """What an agent may change on node `name`: FIB rules, port range, links, files under /run/egresscore."""
    from egresscore.agent.host import PORT_RANGE, sysctl_get

    ns = lab.nodes[name].ns
    links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=True).stdout
    try:
        files = sorted(f for f in os.listdir("/run/egresscore") if f.startswith(f"{name}@{ns}"))
    except FileNotFoundError:
        files = []
    return {"rules": _rules(ns), "port_range": lab.call(name, sysctl_get, PORT_RANGE),
            "links": sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()),
            "files": files}


def _connect(dst, port, timeout):
    s = socket.socket()
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


@needs_netns
def test_node3_rules_while_the_agent_runs(lab):
    rules = _rules(lab.nodes["node3"].ns)
    print(rules)
    for ip in (EGRESS_IP, EXTRA_EGRESS_IP, "192.168.1.109"):
        for proto in ("tcp", "udp"):
            assert f"40:\tfrom all to {ip} iif eth0 ipproto {proto} dport 32768-65534 blackhole proto 236" in rules
    assert "40:\tfrom all to 192.168.1.3 iif eth0 ipproto udp dport 8472 blackhole proto 236" in rules
    assert "43:\tfrom all lookup local proto 236" in rules
    # node1 hosts app1: pod traffic leaving the cluster is claimed, inside destinations are not
    rules1 = _rules(lab.nodes["node1"].ns)
    assert "42:\tfrom all iif lxc-app1 blackhole proto 236" in rules1
    assert "41:\tfrom all to 10.0.3.0/24 goto 43 proto 236" in rules1
    assert "41:\tfrom all to 192.168.1.2 goto 43 proto 236" in rules1


@needs_netns
def test_syn_to_an_egress_ip_in_the_nat_range_gets_no_answer_from_the_kernel(lab):
    """The claim blackholes it: no RST for the sender, and the agent's ring still sees the SYN."""
    before = lab.agents["node3"].counters()["drops"].get("no_nat_entry", 0)
    assert lab.call("ext1", _connect, EXTRA_EGRESS_IP, 40000, 1.5) == "no answer"
    assert lab.agents["node3"].counters()["drops"].get("no_nat_entry", 0) > before
    # outside the NAT range the kernel still answers (nothing listens there: RST)
    assert lab.call("ext1", _connect, EXTRA_EGRESS_IP, 80, 1.5) == "refused"


_FORBIDDEN_C = {"fork", "posix_spawn", "waitpid", "setns", "socket", "recv", "recvfrom", "recv_into", "recvmsg",
                "send", "sendto", "sendmsg", "sendall", "connect", "select", "poll", "epoll", "sleep", "read",
                "write", "open", "system", "execv", "execve"}
_FORBIDDEN_FILES = ("pyroute2", "subprocess.py", "multiprocessing", os.sep + "socket.py",
                    os.path.join("agent", "host.py"))


class _LoopWatch:
    """sys.setprofile on an agent's loop thread: what it calls (Python and C)."""

    def __init__(self):
        self.bad = []
        self.runs = 0
        self.applied = 0

    def __call__(self, frame, event, arg):
        if event == "c_call":   # builtins (os, socket, select, time); the Cython core's methods are not traced
            name = getattr(arg, "__name__", "")
            if name in _FORBIDDEN_C:
                self.bad.append(f"{getattr(arg, '__qualname__', name)} from {frame.f_code.co_filename}:"
                                f"{frame.f_lineno}")
        elif event == "call":
            code = frame.f_code
            if code.co_name == "step":
                self.runs += 1
            if code.co_name == "_apply_neighbours":
                self.applied += 1
            if any(f in code.co_filename for f in _FORBIDDEN_FILES):
                self.bad.append(f"{code.co_name} in {code.co_filename}")


def _udp_ok(lab):
    return lab.udp_echo("app1", SERVER, count=1, timeout=0.3) == 1


@needs_netns
def test_datapath_thread_makes_no_host_call_and_follows_a_neighbour_change(lab):
    from pyroute2 import IPRoute

    agents = [lab.agents["node1"], lab.agents["node3"]]
    watches = [_LoopWatch() for _ in agents]
    for a, w in zip(agents, watches):
        a._submit(sys.setprofile, w)
    ns3 = lab.nodes["node3"].ns
    try:
        for _ in range(3):
            assert lab.tcp_request("app1", SERVER) == EGRESS_IP
            assert lab.udp_echo("app1", SERVER, count=3) == 3 and lab.ping("app1", SERVER, count=3) == 3
        with IPRoute(netns=ns3) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            real = next(n.get_attr("NDA_LLADDR") for n in ipr.get_neighbours(family=2, ifindex=eth0)
                        if n.get_attr("NDA_DST") == ROUTER_IP)
            applied = watches[1].applied
            t0 = time.monotonic()
            ipr.neigh("replace", dst=ROUTER_IP, lladdr="02:00:00:00:de:ad", ifindex=eth0, state=0x80)
            try:
                while _udp_ok(lab) and time.monotonic() - t0 < 5:
                    pass
                took = time.monotonic() - t0
                assert not _udp_ok(lab), "node3 still sends to the router's old MAC"
                assert watches[1].applied > applied   # the loop thread wrote it, from a queued job
            finally:
                ipr.neigh("replace", dst=ROUTER_IP, lladdr=real, ifindex=eth0, state=0x02)
            t1 = time.monotonic()
            while not _udp_ok(lab) and time.monotonic() - t1 < 5:
                pass
            back = time.monotonic() - t1
        assert _udp_ok(lab) and lab.tcp_request("app1", SERVER) == EGRESS_IP
        print(f"neighbour change followed in {took:.2f} s, back in {back:.2f} s")
    finally:
        for a in agents:
            a._submit(sys.setprofile, None)
    for w in watches:
        assert w.runs >= 1           # the profile saw the loop (back in Python once a second and per job)
        assert w.bad == [], w.bad[:10]


@needs_netns
def test_a_second_agent_for_a_running_node_is_refused_and_changes_nothing(lab):
    from egresscore import Agent
    from egresscore.agent import AgentError
    from egresscore.cluster import Cluster

    ns = lab.nodes["node3"].ns
    rules = _rules(ns)
    with pytest.raises(AgentError, match="another egresscore agent runs here"):
        Agent("node3", Cluster.from_dict(lab.cluster()), [], netns=ns)
    assert _rules(ns) == rules
    assert lab.tcp_request("app1", SERVER) == EGRESS_IP


def _add_old_nft_table():
    try:
        from pyroute2.nftables.main import NFTables

        nft = NFTables(nfgen_family=socket.AF_INET)
    except Exception:  # noqa: BLE001 - no nf_tables here: that part is skipped
        return False
    try:
        nft.table("add", name="egresscore")
        return True
    finally:
        nft.close()


@needs_netns
def test_kill_9_then_start_then_stop_leaves_the_host_as_before(lab, tmp_path):
    """An agent killed with SIGKILL leaves its claims, egc-tnl0, its socket and
    state files and the changed port range; the next one takes them over (one
    line on stderr) and, stopped with SIGTERM, restores the host."""
    from egresscore.demo import AgentProcess

    lab.agents.pop("node3").stop()
    before = _host_state(lab, "node3")
    assert before == lab.host_before["node3"]
    ns = lab.nodes["node3"].ns
    cluster_file, policy_file = tmp_path / "cluster.yaml", tmp_path / "policy.yaml"
    cluster_file.write_text(yaml.safe_dump(lab.cluster()))
    policy_file.write_text(yaml.safe_dump(_sample()))
    try:
        first = lab.track(AgentProcess("node3", str(cluster_file), str(policy_file), ns))
        assert lab.tcp_request("app1", SERVER) == EGRESS_IP
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        left = _host_state(lab, "node3")
        assert "proto 236" in left["rules"] and "egc-tnl0" in left["links"]
        assert left["port_range"] == "20000 32767"
        assert f"node3@{ns}.sock" in left["files"] and f"node3@{ns}.host.json" in left["files"]
        assert f"node3@{ns}.nat" in left["files"]          # the NAT table, for the next agent to adopt
        old_nft = lab.call("node3", _add_old_nft_table)
        for _ in range(2):   # crash twice: the original range survives any number of crashes
            second = lab.track(AgentProcess("node3", str(cluster_file), str(policy_file), ns))
            said = [line for line in second.lines if "taking over" in line]
            assert len(said) == 1 and "FIB rules" in said[0] and "egc-tnl0" in said[0], second.lines
            assert f"the original {before['port_range']} is kept" in said[0]
            assert ("nftables table egresscore" in said[0]) == old_nft
            assert any(f"node3@{ns}.nat: adopted" in line for line in second.lines), second.lines
            old_nft = False
            assert lab.tcp_request("app1", SERVER) == EGRESS_IP
            os.kill(second.proc.pid, signal.SIGKILL)
            second.proc.wait(10)
        third = lab.track(AgentProcess("node3", str(cluster_file), str(policy_file), ns))
        assert lab.tcp_request("app1", SERVER) == EGRESS_IP
        lines = third.stop()
        assert lines and "stopped" in lines[-1], lines
        assert _host_state(lab, "node3") == before
    finally:
        lab.agents["node3"] = start_agent(lab, "node3", _sample())


@needs_netns
def test_host_thread_reads_the_namespace_sysctl_without_a_fork(lab, monkeypatch):
    from egresscore.agent.host import PORT_RANGE, HostThread, sysctl_get

    forks = []
    monkeypatch.setattr(os, "fork", lambda: forks.append(threading.current_thread().name) or -1)
    host = HostThread(lab.nodes["node3"].ns).start()
    try:
        assert host.call(sysctl_get, PORT_RANGE) == "20000 32767"   # node3's, changed by its agent
        assert host.call(lambda: [link.get_attr("IFLA_IFNAME") for link in host.ipr.get_links()]).count("eth0") == 1
    finally:
        host.stop()
    assert forks == []
