"""The lab the HA tests share (test_ha_e2e, test_failover_stateful_e2e, test_mbb_e2e).

ha_lab() builds one Lab, writes its cluster file, optionally starts node3 as
a real `egresscore agent` process (so a test can kill it with SIGKILL),
starts in-process Agents on the other nodes it names, starts the servers
and waits until every agent sees every gateway up and answering.  At
teardown it stops the agents, closes the lab, and removes the agents' files
in /run/egresscore named for the lab's namespaces (<node>@<netns>.host.json,
.lock, .sock, .nat, .nat.rejected): an agent killed with SIGKILL leaves
them by design (a restarted agent takes its leftovers over, and the NAT
state file outlives even a clean stop), but once the lab's namespaces are
gone they describe nothing, so every test leaves /run/egresscore as it
found it.
"""
import contextlib
import glob
import os
import time

import pytest
import yaml


def wait(cond, timeout, what):
    """Poll cond() every 20 ms until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    pytest.fail(f"not within {timeout} s: {what}")


def state_files(directory, lab):
    """The agents' files in `directory` named for the lab's namespaces."""
    found = []
    for name, node in lab.nodes.items():
        found += glob.glob(os.path.join(glob.escape(directory), glob.escape(f"{name}@{node.ns}") + ".*"))
    return sorted(found)


@contextlib.contextmanager
def ha_lab(tmp_path_factory, tag, policy, agents, node3_args=None, **agent_kw):
    """A lab tagged `tag` running `policy` (a file): in-process Agents on the
    nodes named in `agents` (with agent_kw), and, unless node3_args is None,
    node3 as an `egresscore agent` process with those extra arguments
    (lab.node3; lab.start_node3() starts another, tracked by the lab).
    Also sets lab.work (a temporary folder), lab.cluster_file, lab.agents
    and lab.servers_."""
    from egresscore import Agent
    from egresscore.control import SOCKET_DIR
    from egresscore.demo import AgentProcess
    from egresscore.lab import Lab

    had_dir = os.path.isdir(SOCKET_DIR)
    work = tmp_path_factory.mktemp(tag)
    lab = Lab(tag=tag)
    try:
        with lab:
            lab.work = work
            lab.cluster_file = str(work / "cluster.yaml")
            with open(lab.cluster_file, "w") as f:
                yaml.safe_dump(lab.cluster(), f)
            if node3_args is not None:
                lab.start_node3 = lambda: lab.track(AgentProcess("node3", lab.cluster_file, policy,
                                                                 lab.nodes["node3"].ns, extra_args=tuple(node3_args)))
                lab.node3 = lab.start_node3()
            lab.agents = {}
            try:
                for name in agents:
                    lab.agents[name] = Agent(name, lab.cluster_file, [policy], netns=lab.nodes[name].ns, **agent_kw)
                    lab.agents[name].start()
                lab.servers_ = lab.start_servers()
                # agents started one after another: each sees the others answer within a few rounds
                wait(lambda: all(g["state"] == "up" and not g.get("missed")
                                 for a in lab.agents.values() for g in a.gateway_health()["gateways"]),
                     5.0, "every gateway up and answering")
                yield lab
            finally:
                for a in lab.agents.values():
                    a.stop()
                    a.close()
    finally:
        # the lab is closed: its agent processes are stopped (or were killed) and its namespaces gone
        if getattr(lab, "nodes", None):
            for path in state_files(SOCKET_DIR, lab):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if not had_dir:
            with contextlib.suppress(OSError):
                os.rmdir(SOCKET_DIR)        # only if empty: someone else's files stay
