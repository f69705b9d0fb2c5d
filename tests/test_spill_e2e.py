"""End to end: new connections spill to a second egress IP when the first has no free port (root).

One lab (namespaces egc-lab-spill-*), an agent on every node.  The policy
SNATs app1's traffic to 192.168.1.100 on node3 and lists 192.168.1.101 (also
node3's) in the egresscore.io/extra-egress-ips annotation; node3's agent
has a tiny NAT port range (4 ports per egress IP).  app1 opens TCP
connections one after another (each keeps its port for the closing timeout,
10 s): the first four are seen by the server from .100, the next four from
.101, and only the ninth, with both IPs full, is refused.
"""
import copy

import pytest
from conftest import needs_netns, running_agents

pytestmark = needs_netns

SERVER = "203.0.113.10"
FIRST, SECOND = "192.168.1.100", "192.168.1.101"
PORTS = (40000, 40003)
SPILL = {"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy",
         "metadata": {"name": "egress-spill", "annotations": {"egresscore.io/extra-egress-ips": SECOND}},
         "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
                  "destinationCIDRs": ["203.0.113.0/24"],
                  "egressGateway": {"nodeSelector": {"matchLabels": {"node.kubernetes.io/name": "node3"}},
                                    "egressIP": FIRST}}}


@pytest.fixture(scope="module")
def lab():
    from egresscore.lab import Lab
    from egresscore.lab.offloads import prepare_lab

    with Lab(tag="spill") as lab:
        prepare_lab(lab)
        with running_agents(lab, copy.deepcopy(SPILL), per_node={"node3": {"nat_port_range": PORTS}}) as lab.agents:
            lab.servers_ = lab.start_servers()
            yield lab


def test_new_connections_continue_on_the_second_egress_ip_and_are_seen_with_it(lab):
    node3 = lab.agents["node3"]
    n = PORTS[1] - PORTS[0] + 1
    assert node3.stats()["nat"]["spill"] == {FIRST: {"spill_to": [SECOND], "spilled_in": 0}}
    assert lab.agents["node1"].stats()["nat"]["spill"] == {}        # a source node spills nothing
    first = [lab.tcp_request("app1", SERVER) for _ in range(n)]
    assert first == [FIRST] * n
    then = [lab.tcp_request("app1", SERVER) for _ in range(n)]
    assert then == [SECOND] * n                          # seen by the server with the second address
    nat = node3.stats()["nat"]
    assert nat["ports"][FIRST]["tcp"] == (n, n) and nat["ports"][SECOND]["tcp"] == (n, n)
    assert nat["spill"][SECOND]["spilled_in"] == n
    assert nat["refused"]["nat_exhausted"] == 0          # nothing refused while one IP had a port
    # both full: now a new connection is refused, and counted
    with pytest.raises(Exception):  # noqa: B017 - the pod's connect times out (its SYNs are dropped)
        lab.tcp_request("app1", SERVER, timeout=1.0)
    assert node3.stats()["nat"]["refused"]["nat_exhausted"] >= 1


def test_the_chain_follows_policy_edits_and_an_address_not_on_the_node_turns_it_off(lab):
    from egresscore.policy import parse_policy

    node3 = lab.agents["node3"]

    def edit(annotation):
        doc = copy.deepcopy(SPILL)
        if annotation is None:
            del doc["metadata"]["annotations"]
        else:
            doc["metadata"]["annotations"]["egresscore.io/extra-egress-ips"] = annotation
        for a in lab.agents.values():
            a.set_policies([parse_policy(doc)[0]])

    def chain():
        return node3.stats()["nat"]["spill"].get(FIRST, {}).get("spill_to", [])

    try:
        edit("192.168.1.102,192.168.1.101")
        assert chain() == ["192.168.1.102", SECOND]
        edit("192.168.1.102,192.168.1.150")       # .150 is no address of node3: no spill at all there
        assert chain() == []
        assert any("192.168.1.150 is not an address of node node3" in str(p) for p in node3.compiler.problems())
        edit(None)
        assert chain() == []
    finally:
        edit(SECOND)
    assert chain() == [SECOND]
