"""End to end: an agent restarted under live traffic keeps every flow (issue 16, root).

One lab (namespaces egc-lab-restart-*) with real `egresscore agent` processes
on node1 (the pods' node) and node3 (the gateway), started with --keep-state,
so they can be killed with SIGKILL or stopped with SIGTERM and started again.
Four flows run through node3 meanwhile (egresscore.lab.restart): a paced
download and upload, a UDP echo stream and a download from a pod port outside
the NAT range.  Each restart must leave every flow intact (every byte, sha256
equal; UDP echoed after the restart) through the same egress address and
port, and the kernel claims in place while no agent runs.  The stalls are
printed, not asserted (no timed tests); benchmarks/compare_restart.py measures
them over 10 runs beside the same kill with the NAT state off.
"""
import os
import subprocess
import time

import pytest
import yaml
from conftest import needs_netns

pytestmark = needs_netns

EGRESS_IP = "192.168.1.3"


def _rules(ns):
    return subprocess.run(["ip", "-n", ns, "rule"], capture_output=True, text=True, check=True, timeout=10).stdout


def _files(lab, name):
    from egresscore.agent.host import SOCKET_DIR

    prefix = f"{name}@{lab.nodes[name].ns}."
    return {f[len(prefix):] for f in os.listdir(SOCKET_DIR) if f.startswith(prefix)} if os.path.isdir(
        SOCKET_DIR) else set()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from egresscore.demo import AgentProcess
    from egresscore.lab import Lab
    from egresscore.lab.kernel import SAMPLE_POLICY

    work = tmp_path_factory.mktemp("restart")
    with Lab(tag="restart") as lab:
        cluster, policy = str(work / "cluster.yaml"), str(work / "policy.yaml")
        with open(cluster, "w") as f:
            yaml.safe_dump(lab.cluster(), f)
        with open(policy, "w") as f:
            yaml.safe_dump(SAMPLE_POLICY, f)

        def start(name, keep_state=True):
            return lab.track(AgentProcess(name, cluster, policy, lab.nodes[name].ns,
                                          extra_args=("--keep-state",) if keep_state else ()))

        lab.start_agent = start
        lab.agents = {}
        try:
            for name in ("node1", "node3"):
                lab.agents[name] = start(name)
            lab.servers_ = lab.start_servers()
            assert lab.tcp_request("app1", "203.0.113.10") == EGRESS_IP
            yield lab
        finally:
            for p in lab.agents.values():
                if p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait(10)
            for name in ("node1", "node3"):     # what --keep-state left for an agent that will not come
                for suffix in _files(lab, name):
                    os.unlink(os.path.join("/run/egresscore", f"{name}@{lab.nodes[name].ns}.{suffix}"))


def _left_behind(lab, name):
    """What a stopped or killed agent leaves for the next one."""
    rules = _rules(lab.nodes[name].ns)
    return {"claims": "proto 236" in rules and "43:\tfrom all lookup local proto 236" in rules,
            "nat_state": "nat" in _files(lab, name)}


def _restart(lab, name, how, left):
    """restart() for flows_through_restart; `left` gets what the stopped agent left behind."""
    from egresscore.lab.restart import agent_restart

    def stopped(old):
        left.update(_left_behind(lab, name), code=old.proc.returncode)
    return agent_restart(lab.agents, name, lab.start_agent, how, stopped)


def _check(lab, r, left, name, how):
    from egresscore.lab.restart import OOR_PORT

    assert left["claims"], "the kernel claims went with the agent"
    assert left["nat_state"], "the NAT state file went with the agent"
    if name == "node3":
        lines = lab.agents[name].lines
        adopted = [line for line in lines if ": adopted " in line]
        assert adopted and "adopted 0 " not in adopted[0], lines
        # SIGTERM with --keep-state sealed the file: its checksums were verified; after kill -9 it was not
        assert ("checksums verified" if how == "term" else "not sealed (no clean stop)") in adopted[0], adopted
    for f in r.flows.values():
        assert f.ok, f"{f.name}: {f.detail}"
        assert len(f.seen) == 1 and next(iter(f.seen))[0] == EGRESS_IP, (f.name, f.seen)
    # the pod port outside the NAT range got a port from the range, and kept it
    assert next(iter(r.flows["oor"].seen))[1] != OOR_PORT
    print(f"{name} restart: agent back in {r.ready_at - r.restarted_at:.2f} s; stalls "
          + ", ".join(f"{f.name} {f.stall:.2f} s" for f in r.flows.values()))


@pytest.mark.parametrize("name,how", [("node3", "kill"), ("node3", "term"), ("node1", "kill"), ("node1", "term")])
def test_restart_keeps_every_flow(lab, name, how):
    from egresscore.lab.restart import flows_through_restart

    left = {}
    r = flows_through_restart(lab, _restart(lab, name, how, left))
    if how == "term":
        assert left["code"] == 0
    _check(lab, r, left, name, how)


def test_a_normal_stop_still_removes_everything(lab):
    """An agent without --keep-state, started over a kept state, adopts it and
    on SIGTERM removes the claims, the NAT state file and the host state."""
    lab.agents["node3"].proc.kill()
    lab.agents["node3"].proc.wait(15)
    assert _left_behind(lab, "node3") == {"claims": True, "nat_state": True}
    plain = lab.agents["node3"] = lab.start_agent("node3", keep_state=False)
    assert lab.tcp_request("app1", "203.0.113.10") == EGRESS_IP
    lines = plain.stop()
    assert lines and "stopped" in lines[-1], lines
    assert "proto 236" not in _rules(lab.nodes["node3"].ns)
    assert _files(lab, "node3") == set()
    lab.agents["node3"] = lab.start_agent("node3")
    t = time.monotonic()
    while time.monotonic() - t < 5:
        try:
            assert lab.tcp_request("app1", "203.0.113.10", timeout=1.0) == EGRESS_IP
            break
        except (OSError, ConnectionError):
            time.sleep(0.1)


def test_a_corrupt_state_file_is_refused_and_the_agent_starts_empty_and_says_so(lab):
    """kill -9, then garbage over the header of node3's state file: the new
    agent names the file and the reason, sets the file aside, starts empty,
    and forwards new connections."""
    from egresscore.agent.host import nat_state_path

    node3 = lab.agents["node3"]
    node3.proc.kill()
    node3.proc.wait(15)
    path = nat_state_path("node3", lab.nodes["node3"].ns)
    with open(path, "r+b") as f:
        f.write(b"\xde\xad\xbe\xef")
    new = lab.agents["node3"] = lab.start_agent("node3")
    refused = [line for line in new.lines if "refused" in line]
    assert refused and path in refused[0] and "bad magic" in refused[0] and "starts empty" in refused[0], new.lines
    assert new.proc.poll() is None
    assert os.path.exists(path + ".rejected")
    os.unlink(path + ".rejected")
    t = time.monotonic()
    while True:
        try:
            assert lab.tcp_request("app1", "203.0.113.10", timeout=1.0) == EGRESS_IP
            break
        except (OSError, ConnectionError):
            if time.monotonic() - t > 5:
                raise
            time.sleep(0.1)
