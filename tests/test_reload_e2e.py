"""End to end: bad policy and cluster files never make app1 leave with the wrong address (root).

One lab (namespaces egc-lab-reload-*): node1 runs a real `egresscore agent`
process (reloaded with SIGHUP, read through its control socket), node2 and
node3 in-process Agents (reloaded with Agent.reload()).  For each bad-file
kind the reload is rejected and counted, every egress map keeps its entries,
and the server still sees app1's traffic come from the egress IP; a good
edit at the end is applied.
"""
import os
import time

import pytest
import yaml
from conftest import needs_netns
from input_cases import CLUSTER_CASES, GOOD_POLICY, POLICY_CASES, policy_text

pytestmark = needs_netns

SERVER, EGRESS_IP, NEW_EGRESS_IP = "203.0.113.10", "192.168.1.3", "192.168.1.100"


def _put(path, text):
    """Write `path` as an operator should: a new file renamed over the old one."""
    if os.path.lexists(path) and not os.path.isfile(path):
        os.unlink(path)                            # a FIFO or a symlink to a device left by a case
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from egresscore import Agent
    from egresscore.control import default_socket_path
    from egresscore.demo import AgentProcess
    from egresscore.lab import Lab
    from egresscore.lab.offloads import prepare_lab

    work = tmp_path_factory.mktemp("reload")
    with Lab(tag="reload") as lab:
        prepare_lab(lab)
        lab.policy_file = str(work / "sample.yaml")
        lab.cluster_file = str(work / "cluster.yaml")
        lab.good_cluster = lab.cluster()
        _put(lab.policy_file, GOOD_POLICY)
        _put(lab.cluster_file, yaml.safe_dump(lab.good_cluster, sort_keys=False))
        lab.proc = lab.track(AgentProcess("node1", lab.cluster_file, lab.policy_file, lab.nodes["node1"].ns))
        lab.socket = default_socket_path("node1", lab.nodes["node1"].ns)
        lab.agents = {}
        try:
            for name in ("node2", "node3"):
                lab.agents[name] = Agent(name, lab.cluster_file, [lab.policy_file], netns=lab.nodes[name].ns)
                lab.agents[name].start()
            lab.servers_ = lab.start_servers()
            yield lab
        finally:
            for a in lab.agents.values():
                a.stop()
                a.close()


def _node1_stats(lab):
    from egresscore.control import ControlClient

    return ControlClient(lab.socket).call("stats")


def _entries(lab):
    out = {"node1": _node1_stats(lab)["egress_map"]["entries"]}
    out.update((name, len(a.egress_map)) for name, a in lab.agents.items())
    return out


def _sighup_node1(lab, field, expect):
    """SIGHUP node1's agent and wait (bounded) until it has counted one more `field` reload."""
    lab.proc.reload()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = _node1_stats(lab)["reloads"]
        if r[field] >= expect:
            return r
        time.sleep(0.05)
    pytest.fail(f"node1's agent did not count a {field} reload after SIGHUP: {r}")


def test_every_bad_file_kind_keeps_app1_on_the_egress_ip(lab):
    from egresscore.inputs import InputError

    assert lab.tcp_request("app1", SERVER) == EGRESS_IP
    before = _entries(lab)
    assert all(n > 0 for n in before.values()), before
    rejected = 0
    cases = [(name, lab.policy_file, (lambda make: lambda p: make(p))(make), message)
             for name, make, message, _ in POLICY_CASES]
    cases += [(name, lab.cluster_file, (lambda make: lambda p: make(p, lab.good_cluster))(make), message)
              for name, make, message, _ in CLUSTER_CASES]
    for name, path, make, message in cases:
        make(path)
        rejected += 1
        for a in lab.agents.values():
            with pytest.raises(InputError) as info:
                a.reload()
            assert path in str(info.value) and message in str(info.value), name
            r = a.stats()["reloads"]
            assert (r["rejected"], r["accepted"]) == (rejected, 0), name
            assert path in r["last_error"] and r["last_rejected_at"] is not None
        r = _sighup_node1(lab, "rejected", rejected)
        assert r["accepted"] == 0 and path in r["last_error"] and message in r["last_error"], (name, r)
        assert _entries(lab) == before, name
        assert lab.tcp_request("app1", SERVER) == EGRESS_IP, name
        # the cluster in force still works too: app2 masquerades to its node
        if name.startswith("cluster"):
            assert lab.tcp_request("app2", SERVER) == "192.168.1.2", name
        _put(lab.policy_file, GOOD_POLICY)
        _put(lab.cluster_file, yaml.safe_dump(lab.good_cluster, sort_keys=False))

    # set_policies: a bad path or a duplicate set raises and changes nothing
    broken = lab.policy_file + ".broken.yaml"
    _put(broken, GOOD_POLICY.replace("/24", "/33"))
    node3 = lab.agents["node3"]
    with pytest.raises(InputError, match=r"is not a CIDR"):
        node3.set_policies([broken])
    with pytest.raises(InputError, match=r"duplicate policy name"):
        node3.set_policies(list(node3.compiler.policies) * 2)
    assert node3.stats()["reloads"]["rejected"] == rejected + 2
    assert lab.tcp_request("app1", SERVER) == EGRESS_IP

    # a good edit is applied everywhere
    doc = yaml.safe_load(GOOD_POLICY)
    doc["spec"]["egressGateway"]["egressIP"] = NEW_EGRESS_IP
    _put(lab.policy_file, policy_text(doc))
    for a in lab.agents.values():
        a.reload()
        assert a.stats()["reloads"]["accepted"] == 1
    _sighup_node1(lab, "accepted", 1)
    assert lab.tcp_request("app1", SERVER) == NEW_EGRESS_IP
    lines = lab.proc.stop()
    rejections = [line for line in lines if "reload rejected" in line]
    assert len(rejections) == rejected and all("in force are kept" in line for line in rejections)
    assert any("reloaded (SIGHUP)" in line for line in lines)
    assert not any("Traceback" in line for line in lines)
