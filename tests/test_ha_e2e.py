"""End to end: a gateway agent killed with SIGKILL fails over to the next matching node (root).

One lab (namespaces egc-lab-ha-*) and the HA sample policy
(examples/egress-ha.yaml: gateways are the nodes labelled egress-gateway,
node3 and node4, egress IP from each gateway's eth0).  node3 runs a real
`egresscore agent` process (so it can be killed with SIGKILL); node1 and
node4 run in-process Agents with gateway health on (the default).  app1
streams UDP (one datagram every 10 ms) to the server: node3's agent is
killed, the stream resumes through node4, seen as node4's address, within
1 s; node3's agent comes back and new connections use node3 again.
"""
import os
import time

import pytest
from conftest import needs_netns
from ha_lab import ha_lab
from ha_lab import wait as _wait

pytestmark = needs_netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HA_POLICY = os.path.join(ROOT, "examples", "egress-ha.yaml")
SERVER, OTHER = "203.0.113.10", "198.51.100.10"
NODE3, NODE4 = "192.168.1.3", "192.168.1.4"


def _down(agent):
    return set(agent.gateway_health()["down"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with ha_lab(tmp_path_factory, "ha", HA_POLICY, ("node1", "node4"), node3_args=(), control_socket=True) as lab:
        yield lab


def test_kill_9_of_the_gateway_agent_fails_over_to_node4_within_a_second(lab, capsys):
    from egresscore.lab.ha import stream_through_failover

    node1, node4 = lab.agents["node1"], lab.agents["node4"]
    assert lab.tcp_request("app1", SERVER) == NODE3
    assert _down(node1) == set() and node1.gateway_health()["probes"]["received"] > 0
    assert node4.egress_map.lookup("10.0.1.93", SERVER).gateway_ip.exploded == NODE3

    def kill():
        lab.node3.proc.kill()              # SIGKILL: no cleanup, the claims stay (blackholing node3's VXLAN)
        t = time.monotonic()
        lab.node3.proc.wait(5)
        return t

    f = stream_through_failover(lab, kill, before=1.0, after=2.5)
    assert f.before == {NODE3}, f.before
    assert f.after == NODE4 and f.sources_after() == {NODE4}
    assert f.gap is not None and f.gap <= 1.0, f"failover gap {f.gap:.3f} s"
    # both the source node and the new gateway pass node3 over, and say so
    assert _down(node1) == {"node3"} and _down(node4) == {"node3"}
    rows = {g["node"]: g for g in node1.gateway_health()["gateways"]}
    assert (rows["node3"]["state"], rows["node3"]["why"], rows["node4"]["state"]) == ("down", "probes", "up")
    assert node1.stats()["gateway_health"]["down"] == ["node3"]
    # `egresscore egress list` on node1 (its control socket): the map through node4, node3 listed down
    from egresscore.cli import main

    capsys.readouterr()
    assert main(["egress", "list", "--node", "node1", "--netns", lab.nodes["node1"].ns]) == 0
    out = capsys.readouterr().out
    assert "10.0.1.93   203.0.113.0/24     0.0.0.0     192.168.1.4" in out
    assert "node3          192.168.1.3   down    probes" in out and "node4          192.168.1.4   up" in out
    # new connections take node4 too; traffic the policy does not cover is untouched
    assert lab.tcp_request("app1", SERVER) == NODE4
    assert lab.tcp_request("app1", OTHER) == "192.168.1.1"
    lab.failover_gap = f.gap


def test_node3_coming_back_takes_new_connections_again(lab):
    node1, node4 = lab.agents["node1"], lab.agents["node4"]
    if getattr(lab, "failover_gap", None) is None:
        pytest.skip("needs the failover of the test before")
    lab.node3 = lab.start_node3()           # takes over the killed agent's leftovers
    _wait(lambda: _down(node1) == set() and _down(node4) == set(), 5.0, "node3 up again on node1 and node4")
    assert lab.tcp_request("app1", SERVER) == NODE3
    lab.servers_.clear()
    assert lab.udp_echo("app1", SERVER, count=3) == 3
    assert lab.servers_.sources("udp", SERVER) == {NODE3}


def test_gateway_health_off_is_ciliums_choice(lab):
    """node1 with --gateway-health=off keeps node3 even when node3's agent is gone."""
    from egresscore import Agent

    lab.agents.pop("node1").stop()
    lab.agents["node1"] = Agent("node1", lab.cluster_file, [HA_POLICY], netns=lab.nodes["node1"].ns,
                                gateway_health=False)
    lab.agents["node1"].start()
    assert lab.agents["node1"].gateway_health()["enabled"] is False
    lab.node3.proc.kill()
    lab.node3.proc.wait(5)
    _wait(lambda: _down(lab.agents["node4"]) == {"node3"}, 3.0, "node4 sees node3 down")
    time.sleep(0.5)
    assert lab.agents["node1"].egress_map.lookup("10.0.1.93", SERVER).gateway_ip.exploded == NODE3
    with pytest.raises(Exception):
        lab.tcp_request("app1", SERVER, timeout=1.0)
