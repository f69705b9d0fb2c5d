"""Flow records and verdict byte counters of the fused datapath, in memory.

Uses the frames and the two-node setup of test_datapath: node1 hosts app1,
node3 is the seed policy's gateway."""
import ipaddress

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from test_datapath import APP1, EGRESS, MAC, ROUTER_MAC, SERVER, datapath, egress_map, from_app1

from egresscore import DROP_REASON_NAMES, FLOW_END_REASON_NAMES, FLOW_KIND_NAMES, FlowLog


def ip(rec, field):
    return str(ipaddress.ip_address(bytes(rec[field])[:4]))


def kinds(recs):
    return [FLOW_KIND_NAMES[k] for k in recs["kind"]]


def through_gateway(n1, n3, payload, now):
    verdict, _, out = n1.process(from_app1(payload), 1, now=now)
    assert verdict == "tx"
    verdict, _, out = n3.process(out[1], 0, now=now)
    assert verdict == "tx"
    return Ether(out[1])


def test_connection_records_count_ip_bytes_each_way():
    n1, n3 = datapath("node1"), datapath("node3")
    fl = FlowLog(64)
    n3.set_flow_log(fl)
    assert n3.flow_log is fl and n3.nat.flow_log is fl
    sent = 0
    for i, data in enumerate((b"a" * 100, b"b" * 300)):
        pkt = through_gateway(n1, n3, (SERVER, UDP(sport=5000, dport=53) / data), now=10.0 + i)
        sent += pkt[IP].len
    xport = pkt[UDP].sport
    reply = bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS)
                  / UDP(sport=53, dport=xport) / (b"r" * 50))
    assert n3.process(reply, 0, now=12.0)[0] == "tx"
    start = fl.drain()
    assert kinds(start) == ["start"]
    assert (ip(start[0], "src"), ip(start[0], "dst"), ip(start[0], "xsrc")) == (APP1, SERVER, EGRESS)
    assert (start[0]["sport"], start[0]["dport"], start[0]["xport"]) == (5000, 53, xport)
    n3.gc(now=12.0 + 301)
    (end,) = fl.drain()
    assert FLOW_END_REASON_NAMES[end["reason"]] == "expiry"
    assert (end["pkts_out"], end["bytes_out"]) == (2, sent)
    assert (end["pkts_in"], end["bytes_in"]) == (1, 20 + 8 + 50)
    v = n3.counters()["verdicts"]
    assert v["tx"]["packets"] == 3 and v["tx"]["bytes"] > sent


def test_drop_records_with_the_dropped_flow_and_rate_limit():
    n1 = datapath("node1", egress_map("node1"))
    fl = FlowLog(64, drop_rate=1, drop_burst=2)
    n1.set_flow_log(fl)
    em = n1.egress_map
    em.set(APP1, "198.51.100.0/24", "0.0.0.0", "0.0.0.0")      # matched, no gateway
    for i in range(5):
        r = n1.process(from_app1(("198.51.100.7", UDP(sport=6000 + i, dport=9))), 1, now=5.0)
        assert r[:2] == ("drop", "no_gateway")
    recs = fl.drain()
    assert kinds(recs) == ["drop", "drop"]
    assert DROP_REASON_NAMES[recs[0]["reason"]] == "no_gateway"
    assert (ip(recs[0], "src"), ip(recs[0], "dst"), recs[0]["sport"], recs[0]["dport"], recs[0]["proto"]) == (
        APP1, "198.51.100.7", 6000, 9, 17)
    assert fl.stats["suppressed"] == {"no_gateway": 3}
    assert n1.counters()["verdicts"]["drop"]["packets"] == 5


def test_drop_record_of_vxlan_names_the_inner_flow():
    n1, n3 = datapath("node1"), datapath("node3")
    fl = FlowLog(16)
    n3.set_flow_log(fl)
    _, _, out = n1.process(from_app1((SERVER, UDP(sport=7000, dport=53))), 1, now=1.0)
    outer = Ether(out[1])
    outer[IP].src = "192.168.1.77"                          # not a cluster node
    del outer[IP].chksum
    assert n3.process(bytes(outer), 0, now=1.0)[:2] == ("drop", "not_cluster_node")
    (r,) = fl.drain()
    assert DROP_REASON_NAMES[r["reason"]] == "not_cluster_node"
    assert (ip(r, "src"), ip(r, "dst"), r["sport"], r["dport"]) == (APP1, SERVER, 7000, 53)


def test_unsolicited_inbound_makes_a_drop_record_and_refusals_are_not_doubled():
    n3 = datapath("node3")
    fl = FlowLog(16)
    n3.set_flow_log(fl)
    pkt = bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS)
                / UDP(sport=53, dport=40000))
    assert n3.process(pkt, 0, now=1.0)[:2] == ("drop", "no_nat_entry")
    (r,) = fl.drain()
    assert DROP_REASON_NAMES[r["reason"]] == "no_nat_entry" and ip(r, "dst") == EGRESS
    n3.set_flow_log(None)
    assert n3.flow_log is None and n3.nat.flow_log is None
    assert n3.process(pkt, 0, now=1.0)[1] == "no_nat_entry" and len(fl.drain()) == 0
    with pytest.raises(TypeError):
        n3.set_flow_log("file.log")
