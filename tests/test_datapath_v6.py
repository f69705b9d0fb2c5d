"""The IPv6 datapath in memory: scapy-built frames through Datapath.process().

The dual-stack lab's plan: node1 (192.168.1.1, fd00:192:168:1::1) hosts app1
(10.0.1.93, fd00:10:1::93, port 1); node3 (192.168.1.3, fd00:192:168:1::3)
is the gateway of a policy sending app1 to 2001:db8::/64 (minus
2001:db8::8000:0:0:0/65) out as the IPv6 egress IP fd00:192:168:1::100.
IPv6 frames travel in VXLAN over the IPv4 underlay, as Cilium's do.  Every
frame the datapath emits is re-serialised by scapy: each checksum (IPv6
pseudo-header for TCP, UDP and ICMPv6) must already be right.
"""
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    TCPerror,
    UDPerror,
)
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import NoPayload

from egresscore import Datapath, EgressMap, NatTable

NODES = [("192.168.1.1", "fd00:192:168:1::1", ["10.0.1.0/24", "fd00:10:1::/64"]),
         ("192.168.1.2", "fd00:192:168:1::2", ["10.0.2.0/24", "fd00:10:2::/64"]),
         ("192.168.1.3", "fd00:192:168:1::3", ["10.0.3.0/24", "fd00:10:3::/64"])]
MAC = {ip: "02:ec:c0:a8:01:%02x" % int(ip.rsplit(".", 1)[1]) for ip, _, _ in NODES}
ROUTER_MAC = "02:ec:c0:a8:01:fe"
APP1, APP1_6, APP1_MAC, APP1_HOST = "10.0.1.93", "fd00:10:1::93", "02:ec:0a:00:01:5d", "02:ed:0a:00:01:5d"
APP2_6 = "fd00:10:2::32"
POD3, POD3_6, POD3_MAC, POD3_HOST = "10.0.3.10", "fd00:10:3::10", "02:ec:0a:00:03:0a", "02:ed:0a:00:03:0a"
SERVER6, EXCLUDED6, OTHER6 = "2001:db8::10", "2001:db8::8000:0:0:10", "2001:db8:1::10"
EGRESS6 = "fd00:192:168:1::100"
NODE6 = {ip: ip6 for ip, ip6, _ in NODES}
POLICY = 7


def egress_map(view, egress=EGRESS6):
    em = EgressMap()
    for src in (APP1_6, POD3_6):
        em.set(src, "2001:db8::/64", egress if view == "node3" else "::", "192.168.1.3", policy_id=POLICY)
        em.set_excluded(src, "2001:db8:0:0:8000::/65", policy_id=POLICY)
    return em


def datapath(view, em=None, mtu=1500, ip6=True):
    ip = {"node1": "192.168.1.1", "node2": "192.168.1.2", "node3": "192.168.1.3"}[view]
    nat = NatTable(port_range=(32768, 65534))
    if view == "node3":
        nat.add_egress_ip(EGRESS6)
    dp = Datapath(ip, MAC[ip], em if em is not None else egress_map(view), nat, mtu=mtu,
                  node_ip6=NODE6[ip] if ip6 else None)
    for i, (nip, nip6, cidrs) in enumerate(NODES):
        dp.add_node(i, nip, cidrs, MAC[nip], ip6=nip6)
    dp.set_router(ROUTER_MAC)
    if view == "node1":
        dp.add_pod_port(1, APP1, APP1_HOST, APP1_MAC, pod_ip6=APP1_6)
    if view == "node3":
        dp.add_pod_port(1, POD3, POD3_HOST, POD3_MAC, pod_ip6=POD3_6)
    return dp


def from_app1(dst, l4, src=APP1_6, hlim=64, ext=None):
    ip = IPv6(src=src, dst=dst, hlim=hlim)
    if ext is not None:
        ip = ip / ext
    return bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / ip / l4)


def from_server(src, dst, l4, hlim=60, node="192.168.1.3"):
    return bytes(Ether(src=ROUTER_MAC, dst=MAC[node]) / IPv6(src=src, dst=dst, hlim=hlim) / l4)


def _layers(p):
    out = []
    while not isinstance(p, NoPayload):
        out.append(p)
        if isinstance(p, (VXLAN, IPerror6)):
            break                            # the inner frame / the quote: checked on their own
        p = p.payload
    return out


def check(frame):
    """Re-serialise with scapy, each checksum field recomputed in turn: every
    one must already be right.  The frame inside VXLAN is checked too."""
    pkt = Ether(frame)
    for i, layer in enumerate(_layers(pkt)):
        for name in ("chksum", "cksum"):
            if name not in [f.name for f in layer.fields_desc]:
                continue
            got = getattr(layer, name)
            if isinstance(layer, UDP) and got == 0 and isinstance(layer.underlayer, IP):
                continue                     # no UDP checksum over IPv4 (VXLAN's outer header)
            again = Ether(frame)
            target = _layers(again)[i]
            setattr(target, name, None)
            assert getattr(_layers(Ether(bytes(again)))[i], name) == got, f"{type(layer).__name__}.{name}"
    if VXLAN in pkt:
        check(bytes(pkt[VXLAN].payload))
    return pkt


def inner(frame):
    pkt = check(frame)
    assert VXLAN in pkt and pkt[IP].version == 4
    return Ether(bytes(pkt[VXLAN].payload))


def test_app1_tcp_to_the_policy_goes_through_the_gateway_as_the_egress_ip_and_back():
    n1, n3 = datapath("node1"), datapath("node3")
    syn = from_app1(SERVER6, TCP(sport=40000, dport=80, flags="S", seq=1) / b"hello")
    verdict, reason, out = n1.process(syn, 1)
    assert (verdict, reason, out[0]) == ("tx", "none", 0)
    outer = check(out[1])
    assert outer[Ether].dst == MAC["192.168.1.3"] and outer[IP].src == "192.168.1.1"
    assert outer[IP].dst == "192.168.1.3" and outer[UDP].dport == 8472 and outer[VXLAN].vni == 2
    i = inner(out[1])
    assert i[Ether].dst == "02:ee:c0:a8:01:03" and i[Ether].src == "02:ee:c0:a8:01:01"
    assert i[IPv6].src == APP1_6 and i[IPv6].dst == SERVER6 and i[IPv6].hlim == 63
    # the gateway: decap, allowed source, SNAT to the IPv6 egress IP, out to the router
    verdict, reason, out = n3.process(out[1], 0)
    assert (verdict, reason, out[0]) == ("tx", "none", 0)
    snat = check(out[1])
    assert snat[Ether].dst == ROUTER_MAC and snat[Ether].src == MAC["192.168.1.3"]
    assert snat[IPv6].src == EGRESS6 and snat[IPv6].dst == SERVER6 and snat[IPv6].hlim == 62
    assert snat[TCP].sport == 40000          # port preserved
    assert bytes(snat[TCP].payload) == b"hello"
    # the reply: reverse NAT, VXLAN back to node1, delivered to app1
    reply = from_server(SERVER6, EGRESS6, TCP(sport=80, dport=40000, flags="SA", seq=100, ack=7))
    verdict, reason, out = n3.process(reply, 0)
    assert (verdict, reason, out[0]) == ("tx", "none", 0)
    back = check(out[1])
    assert back[IP].dst == "192.168.1.1" and back[Ether].dst == MAC["192.168.1.1"]
    assert inner(out[1])[IPv6].dst == APP1_6
    verdict, reason, out = n1.process(out[1], 0)
    assert (verdict, reason, out[0]) == ("tx_local", "none", 1)
    pkt = check(out[1])
    assert pkt[Ether].dst == APP1_MAC and pkt[Ether].src == APP1_HOST
    assert pkt[IPv6].src == SERVER6 and pkt[IPv6].dst == APP1_6 and pkt[TCP].dport == 40000
    c1, c3 = n1.counters(), n3.counters()
    assert (c1["encap"], c1["decap"], c1["tx_local"]) == (1, 1, 1)
    assert (c3["decap"], c3["snat_egress"], c3["reverse_nat"], c3["encap"]) == (1, 1, 1, 1)
    # per-policy counters, as for IPv4
    assert n1.policy_counters()[POLICY]["redirect"]["packets"] == 1
    p3 = n3.policy_counters()[POLICY]
    assert p3["egress"]["packets"] == 1 and p3["reply"]["packets"] == 1
    assert p3["connections_opened"] == 1 and p3["connections_live"] == 1
    e = n3.nat.get(APP1_6, 40000, SERVER6, 80, "tcp")
    assert e.state == "ESTABLISHED" and str(e.egress_ip) == EGRESS6


@pytest.mark.parametrize("proto", ["udp", "icmpv6"])
def test_udp_and_ping6_through_the_gateway(proto):
    n1, n3 = datapath("node1"), datapath("node3")
    if proto == "udp":
        req, port = UDP(sport=5353, dport=53) / b"query", 5353
    else:
        req, port = ICMPv6EchoRequest(id=0x4242, seq=1, data=b"ping"), 0x4242
    _, _, out = n1.process(from_app1(SERVER6, req), 1)
    verdict, reason, out = n3.process(out[1], 0)
    assert (verdict, reason) == ("tx", "none")
    snat = check(out[1])
    assert snat[IPv6].src == EGRESS6
    if proto == "udp":
        # 5353 is below the NAT port range: a port of the range instead
        xport = snat[UDP].sport
        assert 32768 <= xport <= 65534
        reply = UDP(sport=53, dport=xport) / b"answer"
    else:
        xport = snat[ICMPv6EchoRequest].id
        assert 32768 <= xport <= 65534
        reply = ICMPv6EchoReply(id=xport, seq=1, data=b"ping")
    verdict, reason, out = n3.process(from_server(SERVER6, EGRESS6, reply), 0)
    assert (verdict, reason) == ("tx", "none")
    verdict, reason, out = n1.process(out[1], 0)
    assert (verdict, reason, out[0]) == ("tx_local", "none", 1)
    pkt = check(out[1])
    assert pkt[IPv6].dst == APP1_6
    if proto == "udp":
        assert pkt[UDP].dport == port and bytes(pkt[UDP].payload) == b"answer"
    else:
        assert pkt[ICMPv6EchoReply].id == port


def test_endpoint_independent_mapping_and_port_preservation():
    n3 = datapath("node3")
    ports = set()
    for dst in (SERVER6, "2001:db8::11", "2001:db8::12"):
        verdict, _, out = n3.process(bytes(Ether(src=POD3_MAC, dst=POD3_HOST) / IPv6(src=POD3_6, dst=dst)
                                           / UDP(sport=40001, dport=9)), 1)
        assert verdict == "tx"
        pkt = check(out[1])
        assert pkt[IPv6].src == EGRESS6
        ports.add(pkt[UDP].sport)
    assert ports == {40001}
    # any remote may answer the mapping (endpoint-independent filtering is not
    # promised: a reply needs a connection), a known remote does
    verdict, reason, _ = n3.process(from_server("2001:db8::11", EGRESS6, UDP(sport=9, dport=40001)), 0)
    assert (verdict, reason) == ("tx_local", "none")
    assert n3.counters()["snat_egress"] == 3


def test_excluded_and_unmatched_ipv6_is_masqueraded_to_the_node_ipv6():
    n1 = datapath("node1")
    for dst in (EXCLUDED6, OTHER6):
        verdict, reason, out = n1.process(from_app1(dst, UDP(sport=40002, dport=7) / b"hi"), 1)
        assert (verdict, reason) == ("tx", "none")
        pkt = check(out[1])
        assert VXLAN not in pkt and pkt[Ether].dst == ROUTER_MAC
        assert pkt[IPv6].src == NODE6["192.168.1.1"] and pkt[IPv6].dst == dst and pkt[UDP].sport == 40002
        reply = from_server(dst, NODE6["192.168.1.1"], UDP(sport=7, dport=40002) / b"hi", node="192.168.1.1")
        verdict, reason, out = n1.process(reply, 0)
        assert (verdict, reason, out[0]) == ("tx_local", "none", 1)
        assert check(out[1])[IPv6].dst == APP1_6
    assert n1.counters()["masquerade"] == 2 and n1.counters()["reverse_nat"] == 2


def test_ipv6_router_mac_is_used_when_set():
    n1 = datapath("node1")
    n1.set_router6("02:ec:00:00:00:fe")
    _, _, out = n1.process(from_app1(OTHER6, UDP(sport=40002, dport=7)), 1)
    assert Ether(out[1]).dst == "02:ec:00:00:00:fe"


def test_pod_on_the_gateway_node_is_snated_locally():
    n3 = datapath("node3")
    frame = bytes(Ether(src=POD3_MAC, dst=POD3_HOST) / IPv6(src=POD3_6, dst=SERVER6) / TCP(sport=41000, dport=443))
    verdict, reason, out = n3.process(frame, 1)
    assert (verdict, reason) == ("tx", "none")
    pkt = check(out[1])
    assert pkt[IPv6].src == EGRESS6 and pkt[TCP].sport == 41000 and VXLAN not in pkt
    assert n3.policy_counters()[POLICY]["egress"]["packets"] == 1


def test_no_gateway_and_no_egress_ip_are_dropped_and_counted():
    em = EgressMap()
    em.set(APP1_6, "2001:db8::/64", "::", "0.0.0.0", policy_id=POLICY)
    n1 = datapath("node1", em)
    verdict, reason, out = n1.process(from_app1(SERVER6, UDP(sport=40003, dport=9)), 1)
    assert (verdict, reason, out) == ("drop", "no_gateway", None)
    assert n1.counters()["drops"] == {"no_gateway": 1}
    assert n1.policy_counters()[POLICY]["drops"] == {"no_gateway": 1}
    # the gateway has no IPv6 egress IP for the policy (unresolved ::)
    n1, n3 = datapath("node1"), datapath("node3", egress_map("node3", egress="::"))
    _, _, out = n1.process(from_app1(SERVER6, UDP(sport=40003, dport=9)), 1)
    verdict, reason, _ = n3.process(out[1], 0)
    assert (verdict, reason) == ("drop", "no_egress_ip")
    # an egress IP the NAT table does not hold
    n3 = datapath("node3", egress_map("node3", egress="fd00:192:168:1::109"))
    frame = bytes(Ether(src=POD3_MAC, dst=POD3_HOST) / IPv6(src=POD3_6, dst=SERVER6) / UDP(sport=40004, dport=9))
    assert n3.process(frame, 1)[:2] == ("drop", "no_egress_ip")


def test_spoofed_ipv6_source_is_dropped():
    n1 = datapath("node1")
    for src in ("fd00:10:1::94", APP2_6):
        verdict, reason, _ = n1.process(from_app1(SERVER6, UDP(sport=40005, dport=9), src=src), 1)
        assert (verdict, reason) == ("drop", "spoofed")
    # a pod without an IPv6 address sends none
    n1.add_pod_port(2, "10.0.1.94", "02:ed:0a:00:01:5e", "02:ec:0a:00:01:5e")
    frame = bytes(Ether(src="02:ec:0a:00:01:5e", dst="02:ed:0a:00:01:5e") / IPv6(src="fd00:10:1::94", dst=SERVER6)
                  / UDP(sport=1, dport=2))
    assert n1.process(frame, 2)[:2] == ("drop", "spoofed")
    assert n1.counters()["drops"] == {"spoofed": 3}


def _vxlan(inner_frame, src_ip, dst_ip="192.168.1.3", src_mac=None):
    return bytes(Ether(src=src_mac or MAC.get(src_ip, "02:00:00:00:00:09"), dst=MAC[dst_ip])
                 / IP(src=src_ip, dst=dst_ip) / UDP(sport=50000, dport=8472) / VXLAN(vni=2, flags=0x08) / inner_frame)


def test_gateway_refuses_ipv6_from_outside_the_cluster_and_unselected_pods():
    n3 = datapath("node3")
    inner_ok = Ether(src="02:ee:c0:a8:01:01", dst="02:ee:c0:a8:01:03") / IPv6(src=APP1_6, dst=SERVER6) / UDP(
        sport=40006, dport=9)
    assert n3.process(_vxlan(inner_ok, "192.168.1.9"), 0)[:2] == ("drop", "not_cluster_node")
    # node2 does not host app1's IPv6 address
    assert n3.process(_vxlan(inner_ok, "192.168.1.2"), 0)[:2] == ("drop", "policy_denied")
    # app2 (on node2) has no policy through node3
    inner_app2 = Ether() / IPv6(src=APP2_6, dst=SERVER6) / UDP(sport=40006, dport=9)
    assert n3.process(_vxlan(inner_app2, "192.168.1.2"), 0)[:2] == ("drop", "policy_denied")
    # excluded destination: not this gateway's to translate
    inner_ex = Ether() / IPv6(src=APP1_6, dst=EXCLUDED6) / UDP(sport=40006, dport=9)
    assert n3.process(_vxlan(inner_ex, "192.168.1.1"), 0)[:2] == ("drop", "policy_denied")
    assert n3.process(_vxlan(inner_ok, "192.168.1.1"), 0)[:2] == ("tx", "none")


def test_unsolicited_ipv6_inbound_is_dropped_and_other_traffic_passes():
    n3 = datapath("node3")
    assert n3.process(from_server(SERVER6, EGRESS6, UDP(sport=9, dport=40000)), 0)[:2] == ("drop", "no_nat_entry")
    # below the NAT port range, NDP, echo requests, other addresses: the kernel's
    for l4, dst in ((UDP(sport=9, dport=22), EGRESS6), (ICMPv6ND_NS(tgt=EGRESS6), EGRESS6),
                    (ICMPv6EchoRequest(id=1), EGRESS6), (UDP(sport=9, dport=40000), "fd00:192:168:1::77")):
        assert n3.process(from_server(SERVER6, dst, l4), 0)[0] == "pass"


def test_pod_ipv6_to_cluster_link_local_and_multicast_is_left_to_the_kernel():
    n1 = datapath("node1")
    for dst, l4 in ((APP2_6, UDP(sport=1, dport=2)), ("fd00:192:168:1::2", UDP(sport=1, dport=2)),
                    (NODE6["192.168.1.1"], UDP(sport=1, dport=2)), ("fe80::1", UDP(sport=1, dport=2)),
                    ("ff02::1:ff00:1", ICMPv6ND_NS(tgt="fe80::1")), ("fd00:10:1::1", ICMPv6ND_NS(tgt="fd00:10:1::1"))):
        assert n1.process(from_app1(dst, l4), 1)[0] == "pass", dst
    # IPv6 off (no node_ip6): every IPv6 frame is the kernel's, as before
    off = datapath("node1", ip6=False)
    assert off.process(from_app1(SERVER6, UDP(sport=40007, dport=9)), 1)[0] == "pass"
    assert off.node_ip6 is None and n1.node_ip6 == "fd00:192:168:1::1"


def test_extension_headers_are_walked_and_the_pseudo_header_is_right():
    n1 = datapath("node1")
    ext = IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    verdict, reason, out = n1.process(from_app1(OTHER6, TCP(sport=40008, dport=80, flags="S") / b"x", ext=ext), 1)
    assert (verdict, reason) == ("tx", "none")
    pkt = check(out[1])
    assert IPv6ExtHdrHopByHop in pkt and IPv6ExtHdrDestOpt in pkt
    assert pkt[IPv6].src == NODE6["192.168.1.1"] and pkt[TCP].sport == 40008
    # and through the tunnel to the gateway
    n3 = datapath("node3")
    _, _, out = n1.process(from_app1(SERVER6, UDP(sport=40009, dport=9) / b"y", ext=IPv6ExtHdrDestOpt()), 1)
    verdict, reason, out = n3.process(out[1], 0)
    assert (verdict, reason) == ("tx", "none")
    pkt = check(out[1])
    assert pkt[IPv6].src == EGRESS6 and IPv6ExtHdrDestOpt in pkt


def test_too_big_for_the_tunnel_gets_packet_too_big_to_the_pod():
    n1 = datapath("node1")
    big = from_app1(SERVER6, UDP(sport=40010, dport=9) / (b"x" * 1420))    # 1468-byte IPv6 packet
    verdict, reason, out = n1.process(big, 1)
    assert (verdict, reason, out[0]) == ("drop", "frag_needed", 1)
    ptb = check(out[1])
    assert ptb[IPv6].dst == APP1_6 and ptb[IPv6].src == SERVER6
    assert ptb[ICMPv6PacketTooBig].mtu == 1500 - 50
    assert ptb[IPerror6].src == APP1_6 and len(bytes(ptb[IPv6])) <= 1280
    assert n1.counters()["icmp_too_big"] == 1
    # what fits goes through
    assert n1.process(from_app1(SERVER6, UDP(sport=40010, dport=9) / (b"x" * 1402)), 1)[0] == "tx"
    # the smallest MTU an IPv6 datapath takes: 1280 fits, 1281 gets 1280
    n1 = datapath("node1", mtu=1330)
    assert n1.process(from_app1(SERVER6, UDP(sport=40011, dport=9) / (b"x" * (1280 - 48))), 1)[0] == "tx"
    _, reason, out = n1.process(from_app1(SERVER6, UDP(sport=40011, dport=9) / (b"x" * (1281 - 48))), 1)
    assert reason == "frag_needed" and check(out[1])[ICMPv6PacketTooBig].mtu == 1280
    with pytest.raises(ValueError, match="1330"):
        datapath("node1", mtu=1329)
    assert datapath("node1", mtu=1329, ip6=False).node_ip6 is None


def test_big_reply_towards_the_tunnel_gets_packet_too_big_to_the_sender():
    n1, n3 = datapath("node1"), datapath("node3")
    _, _, out = n1.process(from_app1(SERVER6, TCP(sport=40012, dport=80, flags="S")), 1)
    n3.process(out[1], 0)
    big = from_server(SERVER6, EGRESS6, TCP(sport=80, dport=40012, flags="A") / (b"y" * 1420))
    verdict, reason, out = n3.process(big, 0)
    assert (verdict, reason, out[0]) == ("drop", "frag_needed", 0)
    ptb = check(out[1])
    assert ptb[Ether].dst == ROUTER_MAC and ptb[IPv6].src == EGRESS6 and ptb[IPv6].dst == SERVER6
    assert ptb[ICMPv6PacketTooBig].mtu == 1450
    # the quote is the packet as the sender sent it (to the egress IP)
    assert ptb[IPerror6].dst == EGRESS6 and ptb[TCPerror].dport == 40012


def _quote(frame):
    """The packet an ICMPv6 error quotes, as bytes."""
    return bytes(Ether(frame)[IPerror6])


@pytest.mark.parametrize("kind", ["udp", "tcp", "echo"])
def test_icmpv6_error_about_a_translated_flow_is_translated_inside_and_out(kind):
    n1, n3 = datapath("node1"), datapath("node3")
    l4 = {"udp": UDP(sport=40013, dport=9) / b"data", "tcp": TCP(sport=40013, dport=80, flags="S", seq=5),
          "echo": ICMPv6EchoRequest(id=40013, seq=3, data=b"ping")}[kind]
    _, _, out = n1.process(from_app1(SERVER6, l4), 1)
    _, _, out = n3.process(out[1], 0)
    sent = Ether(out[1])[IPv6]                   # as it left the gateway (SNATed)
    err = from_server("2001:db8::1", EGRESS6, ICMPv6DestUnreach(code=4) / bytes(sent))
    verdict, reason, out = n3.process(err, 0)
    assert (verdict, reason) == ("tx", "none")
    verdict, reason, out = n1.process(out[1], 0)
    assert (verdict, reason, out[0]) == ("tx_local", "none", 1)
    pkt = check(out[1])
    assert pkt[IPv6].dst == APP1_6 and pkt[IPv6].src == "2001:db8::1"
    # the quote is the pod's own packet again (as the gateway received it,
    # one hop later), every checksum inside recomputed by scapy to match
    want = IPv6(src=APP1_6, dst=SERVER6, hlim=62) / l4
    assert _quote(out[1]) == bytes(IPv6(bytes(want)))
    assert n3.counters()["icmp_errors"] == 1


def test_icmpv6_error_with_a_truncated_quote_on_the_masquerade_path():
    n1 = datapath("node1")
    payload = b"z" * 1300
    _, _, out = n1.process(from_app1(OTHER6, UDP(sport=40014, dport=9) / payload), 1)
    sent = bytes(Ether(out[1])[IPv6])
    quoted = sent[:1280 - 48]                    # an error fits the minimum MTU: the quote is cut
    err = from_server("2001:db8:1::1", NODE6["192.168.1.1"], ICMPv6PacketTooBig(mtu=1280) / quoted,
                      node="192.168.1.1")
    verdict, reason, out = n1.process(err, 0)
    assert (verdict, reason, out[0]) == ("tx_local", "none", 1)
    pkt = check(out[1])
    q = pkt[IPerror6]
    assert q.src == APP1_6 and q[UDPerror].sport == 40014 and pkt[ICMPv6PacketTooBig].mtu == 1280
    # the quoted UDP checksum still covers the whole datagram: incremental,
    # so it equals the checksum of the pod's original packet
    orig = IPv6(bytes(IPv6(src=APP1_6, dst=OTHER6, hlim=63) / UDP(sport=40014, dport=9) / payload))
    assert q[UDPerror].chksum == orig[UDP].chksum
    # an error quoting nothing we translated stays the kernel's
    other = IPv6(src=NODE6["192.168.1.1"], dst=OTHER6) / UDP(sport=40099, dport=9)
    err = from_server("2001:db8:1::1", NODE6["192.168.1.1"], ICMPv6DestUnreach() / bytes(other), node="192.168.1.1")
    assert n1.process(err, 0)[0] == "pass"


def _pseudo6(src, dst, length, proto=6):
    """The IPv6 pseudo-header sum (folded, not complemented): what a
    CHECKSUM_PARTIAL TCP checksum field holds."""
    import ipaddress

    raw = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    s = sum(int.from_bytes(raw[i:i + 2], "big") for i in range(0, 32, 2)) + proto + length
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _csum_add(a, b):
    s = a + b
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def kernel_segments(frame, vh):
    """What the kernel's TCP GSO makes of a super-packet sent with this TX
    virtio_net_hdr (tcp_gso_segment, then the checksum finished from
    csum_start): the checksum field is taken as the pseudo-header sum of the
    whole length, moved to each segment's length, and the segment summed
    over it.  A wrong field gives wrong segment checksums (check() fails)."""
    assert vh["flags"] == 1 and vh["csum_offset"] == 16
    l4, hdr, mss = vh["csum_start"], vh["hdr_len"], vh["gso_size"]
    assert Ether(frame)[IPv6].nh == 6 and l4 == 54 and hdr == l4 + (frame[l4 + 12] >> 4) * 4
    field = int.from_bytes(frame[l4 + 16:l4 + 18], "big")
    full = len(frame) - l4
    seq0 = int.from_bytes(frame[l4 + 4:l4 + 8], "big")
    segs = []
    for k, off in enumerate(range(0, len(frame) - hdr, mss)):
        data = frame[hdr + off:hdr + off + mss]
        seg = bytearray(frame[:hdr] + data)
        seg[18:20] = (hdr - 54 + len(data)).to_bytes(2, "big")
        seg[l4 + 4:l4 + 8] = ((seq0 + off) & 0xFFFFFFFF).to_bytes(4, "big")
        if hdr + off + len(data) < len(frame):
            seg[l4 + 13] &= ~0x09
        if k:
            seg[l4 + 13] &= ~0x80
        tcplen = len(seg) - l4
        start = _csum_add(_csum_add(field, 0xFFFF - full), tcplen)      # field - full + tcplen
        seg[l4 + 16:l4 + 18] = start.to_bytes(2, "big")
        body = bytes(seg[l4:]) + b"\0" * (tcplen & 1)
        total = 0
        for i in range(0, len(body), 2):
            total = _csum_add(total, int.from_bytes(body[i:i + 2], "big"))
        seg[l4 + 16:l4 + 18] = ((~total) & 0xFFFF).to_bytes(2, "big")
        segs.append(check(bytes(seg)))
    return segs


def _super6(src, dst, sport, dport, payload, mss, seq=1000, ack=1, src_mac=APP1_MAC, dst_mac=APP1_HOST):
    """A TSO super-packet as a veth hands it over: the pseudo-header sum in
    the TCP checksum, its virtio_net_hdr (TCPV6)."""
    raw = bytearray(bytes(Ether(src=src_mac, dst=dst_mac) / IPv6(src=src, dst=dst, hlim=64)
                          / TCP(sport=sport, dport=dport, flags="PA", seq=seq, ack=ack) / payload))
    raw[70:72] = _pseudo6(src, dst, len(raw) - 54).to_bytes(2, "big")
    vnet = {"flags": 1, "gso_type": 4, "gso_size": mss, "hdr_len": 74, "csum_start": 54, "csum_offset": 16}
    return bytes(raw), vnet


def _as_linux_vxlan(inner_frame, src_node, dst_node, vh):
    """A kernel vxlan device's UDP-tunnel GSO packet as the receiving node's
    ring sees it: one IPv4 frame whose virtio_net_hdr describes the inner
    TCPV6 segmentation (offsets moved by the 50 outer bytes)."""
    outer = (Ether(src=MAC[src_node], dst=MAC[dst_node]) / IP(src=src_node, dst=dst_node, flags="DF")
             / UDP(sport=50000, dport=8472, chksum=0) / VXLAN(flags="Instance", vni=2) / Ether(inner_frame))
    return bytes(outer), dict(vh, hdr_len=vh["hdr_len"] + 50, csum_start=vh["csum_start"] + 50)


def _assert_whole(vh, mss):
    assert vh == {"flags": 1, "gso_type": 4, "hdr_len": 74, "gso_size": mss, "csum_start": 54, "csum_offset": 16}


def test_gso_tcpv6_super_packet_leaves_whole_on_the_masquerade_path():
    n1 = datapath("node1")
    payload = bytes(range(256)) * 16             # 4096 bytes, mss 1000: 5 segments
    frame, vnet = _super6(APP1_6, OTHER6, 40015, 80, payload, 1000)
    [(port, data, vh)] = n1.process_frames(frame, 1, vnet=vnet)
    _assert_whole(vh, 1000)
    pkt = Ether(data)
    assert port == 0 and pkt[Ether].dst == ROUTER_MAC and pkt[IPv6].src == NODE6["192.168.1.1"]
    assert pkt[IPv6].hlim == 63 and pkt[IPv6].plen == 20 + len(payload)
    assert pkt[TCP].chksum == _pseudo6(NODE6["192.168.1.1"], OTHER6, 20 + len(payload))
    segs = kernel_segments(data, vh)
    assert [s[TCP].seq for s in segs] == [1000 + 1000 * k for k in range(5)]
    assert b"".join(bytes(s[TCP].payload) for s in segs) == payload
    assert str(segs[0][TCP].flags) == "A" and str(segs[-1][TCP].flags) == "PA"
    assert n1.counters()["gso"] == {"whole": 1, "tunneled": 0, "segmented": 0}
    assert n1.counters()["masquerade"] == 1
    # a TCPV6 type on an IPv4 frame (or the reverse) is refused
    assert n1.process_frames(frame, 1, vnet=dict(vnet, gso_type=1)) == []
    assert n1.counters()["drops"] == {"unsupported": 1}


def test_gso_tcpv6_without_the_tunnel_offload_is_cut_into_checked_segments():
    n1 = datapath("node1")
    payload = bytes(range(256)) * 16
    frame, vnet = _super6(APP1_6, SERVER6, 40016, 80, payload, 1000)
    outs = n1.process_frames(frame, 1, vnet=vnet)
    assert len(outs) == 5
    got = b""
    for k, (port, data, vh) in enumerate(outs):
        i = inner(data)
        assert port == 0 and vh is None and i[IPv6].src == APP1_6 and i[TCP].seq == 1000 + 1000 * k
        got += bytes(i[TCP].payload)
    assert got == payload and n1.counters()["gso"]["segmented"] == 1


def test_gso_tcpv6_goes_whole_through_the_tunnel_offload_and_the_gateway():
    n1, n3 = datapath("node1"), datapath("node3")
    n1.tunnel_offload = True
    payload = bytes(i % 251 for i in range(20000))
    frame, vnet = _super6(APP1_6, SERVER6, 40017, 80, payload, 1380)
    [(port, out, vh)] = n1.process_frames(frame, 1, vnet=vnet)
    assert port == Datapath.TUNNEL_PORT
    _assert_whole(vh, 1380)
    i = Ether(out)
    assert i[Ether].dst == "02:ee:c0:a8:01:03" and i[Ether].src == "02:ee:c0:a8:01:01"
    assert i[IPv6].src == APP1_6 and i[IPv6].hlim == 63
    assert i[TCP].chksum == _pseudo6(APP1_6, SERVER6, 20 + len(payload))
    assert b"".join(bytes(s[TCP].payload) for s in kernel_segments(out, vh)) == payload
    assert n1.counters()["gso"] == {"whole": 1, "tunneled": 1, "segmented": 0}
    # node3's ring: the kernel's tunnel super-packet, TCPV6 inside IPv4:
    # decap, SNAT to the IPv6 egress IP, out whole
    wire, wvh = _as_linux_vxlan(out, "192.168.1.1", "192.168.1.3", vh)
    [(port, out3, vh3)] = n3.process_frames(wire, 0, vnet=wvh)
    assert port == 0
    _assert_whole(vh3, 1380)
    pkt = Ether(out3)
    assert pkt[Ether].dst == ROUTER_MAC and pkt[IPv6].src == EGRESS6 and pkt[IPv6].dst == SERVER6
    assert pkt[IPv6].hlim == 62 and pkt[TCP].sport == 40017
    assert pkt[TCP].chksum == _pseudo6(EGRESS6, SERVER6, 20 + len(payload))
    segs = kernel_segments(out3, vh3)
    assert len(segs) == 15 and b"".join(bytes(s[TCP].payload) for s in segs) == payload
    c = n3.counters()
    assert c["decap"] == 1 and c["snat_egress"] == 1 and c["gso"]["whole"] == 1
    # the outer frame's type must match: TCPV4 for an IPv6 inner frame is refused
    assert n3.process_frames(wire, 0, vnet=dict(wvh, gso_type=1)) == []
    assert n3.counters()["drops"] == {"unsupported": 1}


def test_gso_tcpv6_too_big_for_the_tunnel_gets_packet_too_big_from_the_offload():
    n1 = datapath("node1")
    n1.tunnel_offload = True
    frame, vnet = _super6(APP1_6, SERVER6, 40018, 80, b"x" * 8000, 1400)   # 1460-byte packets, the tunnel takes 1450
    [(port, reply, vh)] = n1.process_frames(frame, 1, vnet=vnet)
    pkt = check(reply)
    assert port == 1 and vh is None and pkt[ICMPv6PacketTooBig].mtu == 1450 and pkt[IPv6].dst == APP1_6
    assert n1.counters()["gso"]["tunneled"] == 0 and n1.counters()["drops"]["frag_needed"] == 1


def test_gso_tcpv6_reply_at_the_gateway_goes_whole_into_the_tunnel_and_to_the_pod():
    n1, n3 = datapath("node1"), datapath("node3")
    n3.tunnel_offload = True
    _, _, out = n1.process(from_app1(SERVER6, TCP(sport=40041, dport=80, flags="S")), 1)
    _, _, out = n3.process(out[1], 0)
    xport = Ether(out[1])[TCP].sport
    payload = bytes(i % 249 for i in range(30000))
    frame, vnet = _super6(SERVER6, EGRESS6, 80, xport, payload, 1380, seq=5000, ack=2,
                          src_mac=ROUTER_MAC, dst_mac=MAC["192.168.1.3"])
    [(port, out, vh)] = n3.process_frames(frame, 0, vnet=vnet)
    assert port == Datapath.TUNNEL_PORT
    _assert_whole(vh, 1380)
    i = Ether(out)
    assert i[Ether].dst == "02:ee:c0:a8:01:01" and i[IPv6].dst == APP1_6 and i[TCP].dport == 40041
    assert i[TCP].chksum == _pseudo6(SERVER6, APP1_6, 20 + len(payload))
    assert b"".join(bytes(s[TCP].payload) for s in kernel_segments(out, vh)) == payload
    assert n3.counters()["reverse_nat"] == 1 and n3.counters()["gso"]["tunneled"] == 1
    # too big for the tunnel: the server is told, quoting what it sent (to the egress IP)
    big, big_vnet = _super6(SERVER6, EGRESS6, 80, xport, payload, 1440, seq=5000, ack=2,
                            src_mac=ROUTER_MAC, dst_mac=MAC["192.168.1.3"])
    [(port, reply, reply_vh)] = n3.process_frames(big, 0, vnet=big_vnet)
    pkt = check(reply)
    assert port == 0 and reply_vh is None and pkt[IPv6].dst == SERVER6 and pkt[ICMPv6PacketTooBig].mtu == 1450
    assert pkt[IPerror6].dst == EGRESS6
    # node1 delivers the tunnel super-packet to app1 whole
    wire, wvh = _as_linux_vxlan(out, "192.168.1.3", "192.168.1.1", vh)
    [(port, out1, vh1)] = n1.process_frames(wire, 0, vnet=wvh)
    assert port == 1
    _assert_whole(vh1, 1380)
    p1 = Ether(out1)
    assert p1[Ether].dst == APP1_MAC and p1[IPv6].dst == APP1_6 and p1[IPv6].hlim == 62
    assert b"".join(bytes(s[TCP].payload) for s in kernel_segments(out1, vh1)) == payload


def test_nat66_timeouts_and_gc():
    n3 = datapath("node3")
    frame = bytes(Ether(src=POD3_MAC, dst=POD3_HOST) / IPv6(src=POD3_6, dst=SERVER6) / UDP(sport=40016, dport=9))
    assert n3.process(frame, 1, now=100.0)[0] == "tx"
    assert n3.nat.get(POD3_6, 40016, SERVER6, 9, "udp", now=100.0) is not None
    udp_timeout = n3.nat.timeouts["udp"]
    reply = from_server(SERVER6, EGRESS6, UDP(sport=9, dport=40016))
    assert n3.process(reply, 0, now=100.0 + udp_timeout - 1)[0] == "tx_local"
    # idle past the timeout: collected, and a late reply is unsolicited
    later = 100.0 + 2 * udp_timeout + 1
    n3.nat.gc(now=later)
    assert n3.nat.get(POD3_6, 40016, SERVER6, 9, "udp", now=later) is None
    assert n3.process(reply, 0, now=later)[:2] == ("drop", "no_nat_entry")
    assert n3.nat.stats["expired"] >= 1


def test_counters_add_up_over_every_ipv6_path():
    """rx = passed + tx + tx_local + dropped, and the verdict packets sum to rx."""
    n1, n3 = datapath("node1"), datapath("node3")
    frames1 = [(from_app1(SERVER6, UDP(sport=40017, dport=9)), 1), (from_app1(OTHER6, UDP(sport=1, dport=9)), 1),
               (from_app1("fe80::1", UDP(sport=1, dport=9)), 1),
               (from_app1(SERVER6, UDP(sport=1, dport=9), src=APP2_6), 1),
               (from_app1(SERVER6, UDP(sport=1, dport=9) / (b"x" * 1450)), 1),
               (from_server(SERVER6, EGRESS6, UDP(sport=9, dport=40000)), 0), (b"\x00" * 10, 0)]
    for f, port in frames1:
        n1.process(f, port)
        n3.process(f, port)
    _, _, out = n1.process(from_app1(SERVER6, UDP(sport=40018, dport=9)), 1)
    n3.process(out[1], 0)
    n3.process(from_server(SERVER6, EGRESS6, UDP(sport=9, dport=40018)), 0)
    for dp in (n1, n3):
        c = dp.counters()
        assert c["rx"] == c["passed"] + c["tx"] + c["tx_local"] + c["dropped"]
        assert sum(v["packets"] for v in c["verdicts"].values()) == c["rx"]
        assert c["dropped"] == sum(c["drops"].values())
    assert n1.counters()["rx"] == len(frames1) + 1 and n3.counters()["rx"] == len(frames1) + 2


def test_remove_pod_and_node_forget_their_ipv6_entries():
    n1 = datapath("node1")
    assert len(n1.local_pods6) == 1 and len(n1.pod_nodes6) == 3 and len(n1.node_ips6) == 3
    n1.remove_pod_port(1)
    n1.remove_node(2)
    assert len(n1.local_pods6) == 0 and len(n1.pod_nodes6) == 2 and len(n1.node_ips6) == 2
    n1.add_pod_port(3, None, APP1_HOST, APP1_MAC, pod_ip6=APP1_6)      # an IPv6-only pod
    assert n1.process(from_app1(OTHER6, UDP(sport=40019, dport=9)), 3)[0] == "tx"
    with pytest.raises(ValueError):
        n1.add_pod_port(4, None, APP1_HOST)
    with pytest.raises(ValueError, match="IPv6"):
        n1.add_pod_port(4, None, APP1_HOST, pod_ip6="10.0.1.5")


def test_the_checksum_oracle_catches_a_wrong_checksum():
    n1 = datapath("node1")
    _, _, out = n1.process(from_app1(OTHER6, TCP(sport=40020, dport=80, flags="S")), 1)
    check(out[1])
    bad = bytearray(out[1])
    bad[14 + 40 + 16] ^= 0x01                    # the TCP checksum
    with pytest.raises(AssertionError, match="TCP.chksum"):
        check(bytes(bad))


def test_the_agents_ipv6_facts_come_from_the_cluster_model():
    from egresscore.agent import ipv6
    from egresscore.cluster import Node, Pod
    nodes = {f"node{n}": Node(f"node{n}", {}, f"192.168.1.{n}",
                              ({"name": "eth0", "addresses": [f"192.168.1.{n}/24", f"fe80::{n}/64",
                                                              f"fd00:192:168:1::{n}/64"]},),
                              pod_cidrs=(f"10.0.{n}.0/24", f"fd00:10:{n}::/64")) for n in (1, 2, 3)}
    nodes["v4only"] = Node("v4only", {}, "192.168.1.7", ({"name": "eth0", "addresses": ["192.168.1.7/24"]},),
                           pod_cidrs=("10.0.7.0/24",))
    rows = ipv6.node_rows(nodes)
    assert rows["node1"] == ("192.168.1.1", ("10.0.1.0/24", "fd00:10:1::/64"), "fd00:192:168:1::1")
    assert rows["v4only"] == ("192.168.1.7", ("10.0.7.0/24",), None)
    assert ipv6.pod_cidrs6(nodes["node3"]) == ("fd00:10:3::/64",)
    # the default-route interface when the underlay has no global IPv6 address
    other = Node("n", {}, "192.168.1.9", ({"name": "eth0", "addresses": ["192.168.1.9/24", "fe80::9/64"]},
                                          {"name": "eth1", "addresses": ["2001:db8:9::9/64"]}),
                 default_route_interface_v6="eth1")
    assert ipv6.node_ip6(other) == "2001:db8:9::9"
    app1 = Pod("app1", ips=(APP1, APP1_6), node="node1")
    assert ipv6.pod_ip6(app1) == APP1_6 and ipv6.pod_ip6(Pod("p", ips=(APP1,))) is None
    # wired as the agent would: the pipeline works end to end from these facts
    em = egress_map("node1")
    dp = Datapath("192.168.1.1", MAC["192.168.1.1"], em, NatTable(), node_ip6=ipv6.node_ip6(nodes["node1"]))
    for i, name in enumerate(sorted(rows)):
        ip, cidrs, ip6 = rows[name]
        dp.add_node(i, ip, cidrs, MAC.get(ip, "02:00:00:00:00:07"), ip6=ip6)
    dp.set_router(ROUTER_MAC)
    dp.add_pod_port(1, APP1, APP1_HOST, APP1_MAC, pod_ip6=ipv6.pod_ip6(app1))
    verdict, _, out = dp.process(from_app1(SERVER6, UDP(sport=40021, dport=9)), 1)
    assert verdict == "tx" and inner(out[1])[IPv6].src == APP1_6
    assert dp.process(from_app1("fd00:10:2::5", UDP(sport=1, dport=9)), 1)[0] == "pass"


def test_ipv6_drop_records_and_connection_records_name_the_ipv6_flow():
    import ipaddress

    from egresscore import DROP_REASON_NAMES, FLOW_KIND_NAMES, FlowLog

    def a6(rec, field):
        return str(ipaddress.ip_address(bytes(rec[field])))

    n1, n3 = datapath("node1"), datapath("node3")
    fl1, fl3 = FlowLog(16), FlowLog(16)
    n1.set_flow_log(fl1)
    n3.set_flow_log(fl3)
    assert n1.process(from_app1(SERVER6, UDP(sport=40022, dport=9), src=APP2_6), 1, now=1.0)[1] == "spoofed"
    (r,) = fl1.drain()
    assert (DROP_REASON_NAMES[r["reason"]], r["family"], a6(r, "src"), a6(r, "dst"), r["sport"]) == (
        "spoofed", 6, APP2_6, SERVER6, 40022)
    # VXLAN from outside the cluster: the inner IPv6 flow
    inner_frame = Ether() / IPv6(src=APP1_6, dst=SERVER6) / UDP(sport=40023, dport=9)
    assert n3.process(_vxlan(inner_frame, "192.168.1.9"), 0, now=1.0)[1] == "not_cluster_node"
    # a connection's start record, translated to the IPv6 egress IP
    _, _, out = n1.process(from_app1(SERVER6, UDP(sport=40024, dport=9)), 1, now=1.0)
    assert n3.process(out[1], 0, now=1.0)[0] == "tx"
    drop, start = fl3.drain()
    assert DROP_REASON_NAMES[drop["reason"]] == "not_cluster_node" and drop["family"] == 6
    assert (a6(drop, "src"), a6(drop, "dst"), drop["sport"]) == (APP1_6, SERVER6, 40023)
    assert FLOW_KIND_NAMES[start["kind"]] == "start" and start["family"] == 6
    assert (a6(start, "src"), a6(start, "xsrc"), start["xport"]) == (APP1_6, EGRESS6, 40024)


def datapath_u6(view, em=None, mtu=1500):
    """A node whose tunnel runs over the IPv6 underlay (underlay6=True)."""
    ip = {"node1": "192.168.1.1", "node3": "192.168.1.3"}[view]
    nat = NatTable(port_range=(32768, 65534))
    if view == "node3":
        nat.add_egress_ip(EGRESS6)
        nat.add_egress_ip("192.168.1.100")
    if em is None:
        em = egress_map(view)
        em.set(APP1, "203.0.113.0/24", "192.168.1.100" if view == "node3" else "0.0.0.0", "192.168.1.3")
    dp = Datapath(ip, MAC[ip], em, nat, mtu=mtu, node_ip6=NODE6[ip], underlay6=True)
    for i, (nip, nip6, cidrs) in enumerate(NODES):
        dp.add_node(i, nip, cidrs, MAC[nip], ip6=nip6)
    dp.set_router(ROUTER_MAC)
    if view == "node1":
        dp.add_pod_port(1, APP1, APP1_HOST, APP1_MAC, pod_ip6=APP1_6)
    return dp


def outer6(frame, src, dst):
    """The VXLAN-in-IPv6 frame, its outer UDP checksum verified by check()."""
    pkt = check(frame)
    o = pkt[IPv6]
    assert o.nh == 17
    assert (o.src, o.dst, o.hlim, pkt[UDP].dport, pkt[VXLAN].vni, pkt[VXLAN].flags) == (src, dst, 64, 8472, 2, 0x08)
    assert pkt[UDP].chksum != 0 and o.plen == len(frame) - 14 - 40
    return Ether(bytes(pkt[VXLAN].payload))


@pytest.mark.parametrize("family", [6, 4])
def test_vxlan_over_the_ipv6_underlay_both_ways(family):
    n1, n3 = datapath_u6("node1"), datapath_u6("node3")
    assert n1.underlay6 and not datapath("node1").underlay6
    if family == 6:
        req = from_app1(SERVER6, TCP(sport=40030, dport=80, flags="S") / b"six")
        server, egress, L3 = SERVER6, EGRESS6, IPv6
    else:
        req = bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst="203.0.113.10") / TCP(
            sport=40030, dport=80, flags="S") / b"four")
        server, egress, L3 = "203.0.113.10", "192.168.1.100", IP
    verdict, reason, out = n1.process(req, 1)
    assert (verdict, reason) == ("tx", "none")
    i = outer6(out[1], NODE6["192.168.1.1"], NODE6["192.168.1.3"])
    assert i[Ether].dst == "02:ee:c0:a8:01:03" and i[L3].dst == server
    verdict, reason, out = n3.process(out[1], 0)
    assert (verdict, reason) == ("tx", "none")
    snat = check(out[1])
    assert snat[L3].src == egress and snat[TCP].sport == 40030
    reply = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.3"]) / L3(src=server, dst=egress)
                  / TCP(sport=80, dport=40030, flags="SA"))
    verdict, reason, out = n3.process(reply, 0)
    assert (verdict, reason) == ("tx", "none")
    assert outer6(out[1], NODE6["192.168.1.3"], NODE6["192.168.1.1"])[L3].dst == (APP1_6 if family == 6 else APP1)
    verdict, reason, out = n1.process(out[1], 0)
    assert (verdict, reason, out[0]) == ("tx_local", "none", 1)
    assert check(out[1])[TCP].dport == 40030
    assert n1.counters()["encap"] == n1.counters()["decap"] == 1


def test_ipv6_underlay_takes_a_linux_style_frame_and_refuses_strangers():
    n3 = datapath_u6("node3")
    inner_frame = (Ether(src="02:ee:c0:a8:01:01", dst="02:ee:c0:a8:01:03") / IPv6(src=APP1_6, dst=SERVER6)
                   / UDP(sport=40031, dport=9) / b"k")
    linux = bytes(Ether(src=MAC["192.168.1.1"], dst=MAC["192.168.1.3"])
                  / IPv6(src=NODE6["192.168.1.1"], dst=NODE6["192.168.1.3"])
                  / UDP(sport=51000, dport=8472) / VXLAN(vni=2, flags=0x08) / inner_frame)
    assert n3.process(linux, 0)[:2] == ("tx", "none")
    s = Ether(linux)
    s[IPv6].src = "fd00:192:168:1::9"
    del s[UDP].chksum
    assert n3.process(bytes(s), 0)[:2] == ("drop", "not_cluster_node")
    # VXLAN over IPv6 to a node without underlay6 is not ours
    assert datapath("node3").process(linux, 0)[0] == "pass"


def test_ipv6_underlay_mtu_and_arguments():
    n1 = datapath_u6("node1")
    # 1500 - 70: the largest inner IPv6 packet is 1430 bytes
    assert n1.process(from_app1(SERVER6, UDP(sport=40032, dport=9) / (b"x" * (1430 - 48))), 1)[0] == "tx"
    _, reason, out = n1.process(from_app1(SERVER6, UDP(sport=40032, dport=9) / (b"x" * (1431 - 48))), 1)
    assert reason == "frag_needed" and check(out[1])[ICMPv6PacketTooBig].mtu == 1430
    assert datapath_u6("node1", mtu=1350).process(
        from_app1(SERVER6, UDP(sport=40033, dport=9) / (b"x" * (1280 - 48))), 1)[0] == "tx"
    with pytest.raises(ValueError, match="1350"):
        datapath_u6("node1", mtu=1349)
    with pytest.raises(ValueError, match="node_ip6"):
        Datapath("192.168.1.1", MAC["192.168.1.1"], EgressMap(), NatTable(), underlay6=True)
    # a node without an IPv6 address is out of reach
    n1.remove_node(2)
    n1.add_node(2, "192.168.1.3", NODES[2][2], MAC["192.168.1.3"])
    assert n1.process(from_app1(SERVER6, UDP(sport=40034, dport=9)), 1)[:2] == ("drop", "no_route")


def test_gso_tcpv6_reply_at_the_gateway_is_cut_and_each_segment_tunnelled_back():
    n1, n3 = datapath("node1"), datapath("node3")
    _, _, out = n1.process(from_app1(SERVER6, TCP(sport=40040, dport=80, flags="S")), 1)
    assert n3.process(out[1], 0)[0] == "tx"
    payload = b"r" * 3000
    frame = from_server(SERVER6, EGRESS6, TCP(sport=80, dport=40040, flags="A", seq=7, ack=2) / payload)
    vnet = {"flags": 1, "gso_type": 4, "gso_size": 1200, "hdr_len": 74, "csum_start": 54, "csum_offset": 16}
    outs = n3.process_frames(frame, 0, vnet=vnet)
    assert len(outs) == 3
    got = b""
    for port, data, vh in outs:
        i = inner(data)
        assert port == 0 and vh is None and i[IPv6].dst == APP1_6 and i[TCP].dport == 40040
        got += bytes(i[TCP].payload)
    assert got == payload
    c = n3.counters()
    assert c["reverse_nat"] == 3 and c["gso"]["segmented"] == 1
    assert c["rx"] == c["passed"] + c["tx"] + c["tx_local"] + c["dropped"]


def test_gso_tcpv6_super_packet_over_the_ipv6_underlay_is_decapsulated_whole():
    n3 = datapath_u6("node3")
    payload = bytes(i % 253 for i in range(12000))
    frame, vnet = _super6(APP1_6, SERVER6, 40042, 80, payload, 1380,
                          src_mac="02:ee:c0:a8:01:01", dst_mac="02:ee:c0:a8:01:03")
    wire = bytes(Ether(src=MAC["192.168.1.1"], dst=MAC["192.168.1.3"])
                 / IPv6(src=NODE6["192.168.1.1"], dst=NODE6["192.168.1.3"])
                 / UDP(sport=51000, dport=8472) / VXLAN(vni=2, flags=0x08) / Ether(frame))
    wvh = dict(vnet, hdr_len=vnet["hdr_len"] + 70, csum_start=vnet["csum_start"] + 70)
    [(port, out, vh)] = n3.process_frames(wire, 0, vnet=wvh)
    assert port == 0
    _assert_whole(vh, 1380)
    pkt = Ether(out)
    assert pkt[IPv6].src == EGRESS6 and pkt[IPv6].dst == SERVER6 and pkt[IPv6].hlim == 63
    assert b"".join(bytes(s[TCP].payload) for s in kernel_segments(out, vh)) == payload
    assert n3.process_frames(wire, 0, vnet=dict(wvh, gso_type=1)) == []
    assert n3.counters()["drops"] == {"unsupported": 1} and n3.counters()["gso"]["whole"] == 1
