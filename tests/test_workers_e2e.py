"""End to end with two datapath workers per agent (Agent(workers=2), root).

One lab (namespaces egc-lab-workerse2e-*) with an in-process two-worker Agent
per node: app1 leaves as the egress IP for TCP, UDP and ping, the replies
come back, both of node3's workers translate connections (the fanout
programs spread pod ports over them and bring every reply to its owner:
a reply at the wrong worker would be dropped as no_nat_entry), and a stop
that keeps the state leaves per-worker NAT state files that an agent with
another worker count sets aside.
"""
import copy
import os

import pytest
from conftest import needs_netns, running_agents, start_agent

pytestmark = [needs_netns]

SERVER, OTHER = "203.0.113.10", "198.51.100.10"
EGRESS_IP = "192.168.1.3"


def _sample():
    from egresscore.lab.kernel import SAMPLE_POLICY

    return copy.deepcopy(SAMPLE_POLICY)


@pytest.fixture(scope="module")
def lab():
    from egresscore.lab import Lab
    from egresscore.lab.offloads import prepare_lab

    with Lab(tag="workerse2e") as lab:
        prepare_lab(lab)
        with running_agents(lab, _sample(), per_node={n: {"workers": 2} for n in lab.nodes}) as lab.agents:
            lab.servers_ = lab.start_servers()
            yield lab


def test_app1_leaves_as_the_egress_ip_and_replies_come_back(lab):
    from egresscore.lab import traffic

    for _ in range(16):   # new connections, new source ports: both workers get some
        assert lab.tcp_request("app1", SERVER) == EGRESS_IP
    assert lab.tcp_request("app2", SERVER) == "192.168.1.2"
    assert lab.tcp_request("app1", OTHER) == "192.168.1.1"
    for _ in range(4):
        assert lab.udp_echo("app1", SERVER, count=3) == 3
    assert lab.ping("app1", SERVER, count=3) == 3
    lab.servers_.clear()
    for _ in range(4):
        lab.udp_echo("app1", SERVER, count=1)
    assert lab.servers_.sources("udp", SERVER) == {EGRESS_IP}
    got, ok = lab.call("app1", traffic.tcp_upload, SERVER, 4 << 20, timeout=60)
    assert (got, ok) == (4 << 20, True)
    s3 = lab.agents["node3"].stats()
    assert s3["datapath"]["snat_egress"] > 0 and s3["datapath"]["reverse_nat"] > 0
    assert "no_nat_entry" not in s3["drops"], s3["drops"]
    workers = s3["workers"]
    assert len(workers) == 2 and all(w["rx"] > 0 for w in workers), workers
    per = [len(t) for t in lab.agents["node3"].nat.members]
    assert all(n > 0 for n in per), per   # connections in both partitions
    lo, hi = lab.agents["node3"].nat_port_range
    assert s3["nat"]["ports"][EGRESS_IP]["tcp"][1] == hi - lo + 1


def test_state_of_two_workers_is_not_adopted_by_one(lab, capfd):
    a = lab.agents.pop("node3")
    paths = [t.state["path"] for t in a.nat.members]
    a.stop(keep_state=True)
    assert all(os.path.exists(p) for p in paths), paths
    try:
        lab.agents["node3"] = start_agent(lab, "node3", _sample(), workers=1)
        err = capfd.readouterr().err
        assert "saved by an agent with another worker count" in err
        assert not any(os.path.exists(p) for p in paths)
        assert lab.tcp_request("app1", SERVER) == EGRESS_IP
    finally:
        if "node3" in lab.agents:
            lab.agents.pop("node3").stop()
        for p in paths:
            if os.path.exists(p + ".other-workers"):
                os.remove(p + ".other-workers")
        lab.agents["node3"] = start_agent(lab, "node3", _sample(), workers=2)
