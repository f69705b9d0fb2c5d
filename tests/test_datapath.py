"""The fused datapath in memory: scapy-built frames through Datapath.process().

Node1 (192.168.1.1) hosts app1 (10.0.1.93, port 1); node3 (192.168.1.3) is
the gateway of the seed policy (app1 -> 203.0.113.0/24 minus .128/25, egress
IP 192.168.1.3).  Frames go through both datapaths as the wire would carry
them, and scapy checks every header and checksum on the way.
"""
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

import egresscore
from egresscore import Datapath, EgressMap, NatTable

NODES = [("192.168.1.1", "10.0.1.0/24"), ("192.168.1.2", "10.0.2.0/24"), ("192.168.1.3", "10.0.3.0/24")]
MAC = {ip: "02:ec:c0:a8:01:%02x" % int(ip.rsplit(".", 1)[1]) for ip, _ in NODES}
ROUTER_MAC = "02:ec:c0:a8:01:fe"
APP1, APP1_MAC, APP1_HOST = "10.0.1.93", "02:ec:0a:00:01:5d", "02:ed:0a:00:01:5d"
APP2 = "10.0.2.32"
POD3, POD3_MAC, POD3_HOST = "10.0.3.10", "02:ec:0a:00:03:0a", "02:ed:0a:00:03:0a"
SERVER, EXCLUDED_SERVER, OTHER_SERVER = "203.0.113.10", "203.0.113.200", "198.51.100.10"
EGRESS = "192.168.1.3"


def egress_map(view):
    em = EgressMap()
    for src in (APP1, POD3):
        em.set(src, "203.0.113.0/24", EGRESS if view == "node3" else "0.0.0.0", EGRESS)
        em.set_excluded(src, "203.0.113.128/25")
    return em


def datapath(view, em=None):
    ip = {"node1": "192.168.1.1", "node2": "192.168.1.2", "node3": "192.168.1.3"}[view]
    nat = NatTable(port_range=(32768, 65534))
    dp = Datapath(ip, MAC[ip], em if em is not None else egress_map(view), nat)
    for i, (nip, cidr) in enumerate(NODES):
        dp.add_node(i, nip, [cidr], MAC[nip])
    dp.set_router(ROUTER_MAC)
    if view == "node1":
        dp.add_pod_port(1, APP1, APP1_HOST, APP1_MAC)
    if view == "node3":
        dp.add_pod_port(1, POD3, POD3_HOST, POD3_MAC)
    return dp


def from_app1(payload, src=APP1, ttl=64):
    return bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=src, dst=payload[0], ttl=ttl) / payload[1])


def check(frame):
    """Re-serialise with scapy: every checksum must already be right."""
    pkt = Ether(frame)
    for layer in (IP, TCP, UDP, ICMP):
        if layer in pkt and hasattr(pkt[layer], "chksum"):
            got = pkt[layer].chksum
            if layer is UDP and got == 0:      # no UDP checksum (VXLAN's outer header)
                continue
            again = Ether(bytes(pkt))
            del again[layer].chksum
            assert Ether(bytes(again))[layer].chksum == got, f"{layer.__name__} checksum"
    return pkt


def test_public_names():
    assert "Datapath" in egresscore.__all__
    assert "spoofed" in egresscore.DROP_REASON_NAMES


def test_app1_to_policy_cidr_goes_through_the_gateway_and_back():
    n1, n3 = datapath("node1"), datapath("node3")
    syn = from_app1((SERVER, TCP(sport=40000, dport=80, flags="S", seq=1)))
    verdict, reason, out = n1.process(syn, 1)
    assert (verdict, reason) == ("tx", "none") and out[0] == 0
    outer = check(out[1])
    assert outer[Ether].dst == MAC["192.168.1.3"] and outer[IP].src == "192.168.1.1" and outer[IP].dst == EGRESS
    assert outer[UDP].dport == 8472 and outer[VXLAN].vni == 2
    inner = check(bytes(outer[VXLAN].payload))
    assert inner[Ether].dst == "02:ee:c0:a8:01:03" and inner[Ether].src == "02:ee:c0:a8:01:01"
    assert inner[IP].src == APP1 and inner[IP].ttl == 63
    # gateway: decap, SNAT to the egress IP, out to the router
    verdict, reason, out = n3.process(out[1], 0)
    assert (verdict, reason) == ("tx", "none")
    snat = check(out[1])
    assert snat[Ether].dst == ROUTER_MAC and snat[Ether].src == MAC[EGRESS]
    assert snat[IP].src == EGRESS and snat[IP].dst == SERVER and snat[IP].ttl == 62
    xport = snat[TCP].sport
    assert 32768 <= xport <= 65534
    # the reply: reverse NAT on the gateway, VXLAN back to node1, delivered to app1
    reply = bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS, ttl=60)
                  / TCP(sport=80, dport=xport, flags="SA", seq=100, ack=2))
    verdict, reason, out = n3.process(reply, 0)
    assert (verdict, reason) == ("tx", "none")
    back = check(out[1])
    assert back[IP].dst == "192.168.1.1" and back[VXLAN].payload[IP].dst == APP1
    verdict, reason, out = n1.process(out[1], 0)
    assert (verdict, reason, out[0]) == ("tx_local", "none", 1)
    pkt = check(out[1])
    assert pkt[Ether].dst == APP1_MAC and pkt[Ether].src == APP1_HOST
    assert pkt[IP].src == SERVER and pkt[IP].dst == APP1 and pkt[TCP].dport == 40000
    c1, c3 = n1.counters(), n3.counters()
    assert c1["encap"] == 1 and c1["decap"] == 1 and c1["tx_local"] == 1
    assert c3["snat_egress"] == 1 and c3["reverse_nat"] == 1 and c3["encap"] == 1


def test_excluded_and_unmatched_traffic_is_masqueraded_to_the_node_ip():
    n1 = datapath("node1")
    for dst in (EXCLUDED_SERVER, OTHER_SERVER):
        verdict, reason, out = n1.process(from_app1((dst, UDP(sport=5000, dport=7) / b"hi")), 1)
        assert verdict == "tx"
        pkt = check(out[1])
        assert pkt[IP].src == "192.168.1.1" and pkt[IP].dst == dst and pkt[Ether].dst == ROUTER_MAC
        assert VXLAN not in pkt
        reply = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.1"]) / IP(src=dst, dst="192.168.1.1")
                      / UDP(sport=7, dport=pkt[UDP].sport) / b"hi")
        verdict, reason, out = n1.process(reply, 0)
        assert (verdict, out[0]) == ("tx_local", 1)
        assert check(out[1])[IP].dst == APP1 and Ether(out[1])[UDP].dport == 5000
    assert n1.counters()["masquerade"] == 2


def test_ping_through_the_gateway():
    n1, n3 = datapath("node1"), datapath("node3")
    _, _, out = n1.process(from_app1((SERVER, ICMP(type=8, id=77, seq=1) / (b"x" * 8))), 1)
    _, _, out = n3.process(out[1], 0)
    req = check(out[1])
    assert req[IP].src == EGRESS
    reply = bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS)
                  / ICMP(type=0, id=req[ICMP].id, seq=1) / (b"x" * 8))
    _, _, out = n3.process(reply, 0)
    verdict, _, out = n1.process(out[1], 0)
    pkt = check(out[1])
    assert verdict == "tx_local" and pkt[ICMP].id == 77 and pkt[IP].dst == APP1


def test_pod_on_the_gateway_node_is_snated_locally():
    n3 = datapath("node3")
    frame = bytes(Ether(src=POD3_MAC, dst=POD3_HOST) / IP(src=POD3, dst=SERVER) / UDP(sport=999, dport=7))
    verdict, _, out = n3.process(frame, 1)
    pkt = check(out[1])
    assert verdict == "tx" and pkt[IP].src == EGRESS and VXLAN not in pkt
    reply = bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS)
                  / UDP(sport=7, dport=pkt[UDP].sport))
    verdict, _, out = n3.process(reply, 0)
    assert (verdict, out[0]) == ("tx_local", 1) and Ether(out[1])[IP].dst == POD3


def test_no_gateway_is_dropped_and_counted():
    em = EgressMap()
    em.set(APP1, "203.0.113.0/24", "0.0.0.0", "0.0.0.0")
    n1 = datapath("node1", em)
    verdict, reason, out = n1.process(from_app1((SERVER, UDP(sport=1, dport=7))), 1)
    assert (verdict, reason, out) == ("drop", "no_gateway", None)
    assert n1.counters()["drops"] == {"no_gateway": 1}


def test_gateway_without_egress_ip_drops():
    em = EgressMap()
    em.set(APP1, "203.0.113.0/24", "0.0.0.0", EGRESS)
    n3 = datapath("node3", em)
    n1 = datapath("node1")
    _, _, out = n1.process(from_app1((SERVER, UDP(sport=1, dport=7))), 1)
    assert n3.process(out[1], 0)[:2] == ("drop", "no_egress_ip")


def test_spoofed_source_is_dropped():
    n1 = datapath("node1")
    frame = from_app1((SERVER, UDP(sport=1, dport=7)), src="10.0.1.94")
    assert n1.process(frame, 1)[:2] == ("drop", "spoofed")


def test_gateway_refuses_vxlan_from_outside_the_cluster_and_unselected_pods():
    n3 = datapath("node3")
    inner = Ether(src="02:ee:c0:a8:01:01", dst="02:ee:c0:a8:01:03") / IP(src=APP1, dst=SERVER) / UDP(sport=1, dport=7)
    outside = (Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src="192.168.1.50", dst=EGRESS) / UDP(sport=5, dport=8472)
               / VXLAN(vni=2, flags=0x08) / inner)
    assert n3.process(bytes(outside), 0)[:2] == ("drop", "not_cluster_node")
    # app2 is not selected by any policy
    inner2 = Ether(src="02:ee:c0:a8:01:02", dst="02:ee:c0:a8:01:03") / IP(src=APP2, dst=SERVER) / UDP(sport=1, dport=7)
    frame = (Ether(src=MAC["192.168.1.2"], dst=MAC[EGRESS]) / IP(src="192.168.1.2", dst=EGRESS)
             / UDP(sport=5, dport=8472) / VXLAN(vni=2, flags=0x08) / inner2)
    assert n3.process(bytes(frame), 0)[:2] == ("drop", "policy_denied")
    # node2 claiming app1's address (app1 lives on node1)
    frame = (Ether(src=MAC["192.168.1.2"], dst=MAC[EGRESS]) / IP(src="192.168.1.2", dst=EGRESS)
             / UDP(sport=5, dport=8472) / VXLAN(vni=2, flags=0x08) / inner)
    assert n3.process(bytes(frame), 0)[:2] == ("drop", "policy_denied")


def test_unsolicited_inbound_is_dropped_and_other_traffic_passes():
    n3 = datapath("node3")
    probe = Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS) / TCP(sport=80, dport=40000, flags="S")
    assert n3.process(bytes(probe), 0)[:2] == ("drop", "no_nat_entry")
    # outside the NAT port range, pings to the node, ARP: the kernel's
    low = Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS) / TCP(sport=80, dport=22, flags="S")
    ping = Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS) / ICMP(type=8)
    arp = bytes.fromhex("ffffffffffff02ecc0a801fe0806") + bytes(28)
    for f in (low, ping):
        assert n3.process(bytes(f), 0)[0] == "pass"
    assert n3.process(arp, 0)[0] == "pass"
    assert n3.counters()["drops"] == {"no_nat_entry": 1}


def test_pod_to_cluster_addresses_is_left_to_the_kernel():
    n1 = datapath("node1")
    for dst in (APP2, "192.168.1.2", "10.0.1.1"):
        assert n1.process(from_app1((dst, UDP(sport=1, dport=7))), 1)[0] == "pass"


def test_too_big_for_the_tunnel_gets_frag_needed_to_the_pod():
    n1 = datapath("node1")
    frame = bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst=SERVER, flags="DF")
                  / TCP(sport=40000, dport=80, flags="A") / (b"z" * 1460))
    verdict, reason, out = n1.process(frame, 1)
    assert (verdict, reason, out[0]) == ("drop", "frag_needed", 1)
    icmp = check(out[1])
    assert icmp[Ether].dst == APP1_MAC and icmp[IP].dst == APP1
    assert icmp[ICMP].type == 3 and icmp[ICMP].code == 4 and icmp[ICMP].nexthopmtu == 1450
    # 1450 fits
    ok = bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst=SERVER, flags="DF")
               / TCP(sport=40000, dport=80, flags="A") / (b"z" * 1410))
    assert n1.process(ok, 1)[0] == "tx"


def test_big_reply_towards_the_tunnel_gets_frag_needed_to_the_sender():
    n1, n3 = datapath("node1"), datapath("node3")
    _, _, out = n1.process(from_app1((SERVER, TCP(sport=40000, dport=80, flags="S"))), 1)
    _, _, out = n3.process(out[1], 0)
    xport = Ether(out[1])[TCP].sport
    big = bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS, flags="DF")
                / TCP(sport=80, dport=xport, flags="A") / (b"z" * 1460))
    verdict, reason, out = n3.process(big, 0)
    assert (verdict, reason, out[0]) == ("drop", "frag_needed", 0)
    icmp = check(out[1])
    assert icmp[IP].src == EGRESS and icmp[IP].dst == SERVER and icmp[ICMP].nexthopmtu == 1450
    assert icmp[Ether].dst == ROUTER_MAC


def test_icmp_error_about_a_translated_flow_reaches_the_pod():
    n1 = datapath("node1")
    _, _, out = n1.process(from_app1((OTHER_SERVER, UDP(sport=5000, dport=9))), 1)
    sent = Ether(out[1])
    err = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.1"]) / IP(src=OTHER_SERVER, dst="192.168.1.1")
                / ICMP(type=3, code=3) / bytes(sent[IP])[:28])
    verdict, _, out = n1.process(err, 0)
    pkt = check(out[1])
    assert verdict == "tx_local" and pkt[IP].dst == APP1
    quoted = IP(bytes(pkt[ICMP].payload))
    assert quoted.src == APP1 and quoted.sport == 5000
    assert n1.counters()["icmp_errors"] == 1


def test_ttl_expiring_is_dropped():
    n1 = datapath("node1")
    assert n1.process(from_app1((OTHER_SERVER, UDP(sport=1, dport=7)), ttl=1), 1)[:2] == ("drop", "ttl_exceeded")


def test_bad_input_raises_cleanly():
    n1 = datapath("node1")
    with pytest.raises(ValueError):
        n1.process(b"", 1)
    with pytest.raises(ValueError):
        n1.process(b"x" * 60, 9)
    assert n1.process(b"\x00" * 20, 1)[0] in ("drop", "pass")
    with pytest.raises(ValueError):
        Datapath("nope", MAC[EGRESS], EgressMap(), NatTable())
    with pytest.raises(ValueError):
        n1.add_pod_port(0, APP1, APP1_HOST)


def _pseudo(src, dst, length, proto=6):
    import ipaddress

    s = sum(int.from_bytes(ipaddress.ip_address(a).packed[i:i + 2], "big") for a in (src, dst) for i in (0, 2))
    s += proto + length
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _super_packet(dst, payload_len, mss=1400):
    """A TSO super-packet as a pod's veth hands it over: pseudo-header checksum, virtio_net_hdr."""
    payload = bytes(i % 251 for i in range(payload_len))
    pkt = Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst=dst, flags="DF", id=100) / TCP(
        sport=40000, dport=80, flags="PA", seq=1000) / payload
    raw = bytearray(bytes(pkt))
    tcplen = len(raw) - 34
    raw[34 + 16:34 + 18] = _pseudo(APP1, dst, tcplen).to_bytes(2, "big")
    vnet = {"flags": 1, "gso_type": 1, "hdr_len": 54, "gso_size": mss, "csum_start": 34, "csum_offset": 16}
    return bytes(raw), vnet, payload


def test_gso_super_packet_leaves_whole_on_the_masquerade_path():
    n1 = datapath("node1")
    frame, vnet, payload = _super_packet(OTHER_SERVER, 20000)
    [(port, out, vh)] = n1.process_frames(frame, 1, vnet=vnet)
    assert port == 0 and vh["gso_type"] == 1 and vh["gso_size"] == 1400 and vh["csum_start"] == 34
    pkt = Ether(out)
    assert pkt[IP].src == "192.168.1.1" and bytes(pkt[TCP].payload) == payload
    assert pkt[TCP].chksum == _pseudo("192.168.1.1", OTHER_SERVER, len(out) - 34)
    assert n1.gso_frames == 1


def test_gso_super_packet_is_cut_into_segments_for_the_tunnel():
    n1 = datapath("node1")
    frame, vnet, payload = _super_packet(SERVER, 5000)
    outs = n1.process_frames(frame, 1, vnet=vnet)
    assert len(outs) == 4 and all(p == 0 and vh is None for p, _, vh in outs)
    got = b""
    seqs = []
    for _, out, _ in outs:
        inner = check(bytes(Ether(out)[VXLAN].payload))
        assert inner[IP].src == APP1 and inner[IP].ttl == 63
        seqs.append(inner[TCP].seq)
        got += bytes(inner[TCP].payload)
    assert got == payload and seqs == [1000, 2400, 3800, 5200]
    assert Ether(bytes(Ether(outs[-1][1])[VXLAN].payload))[TCP].flags == "PA"
    assert Ether(bytes(Ether(outs[0][1])[VXLAN].payload))[TCP].flags == "A"


def _as_linux_vxlan(inner, src_node, dst_node, vnet):
    """What a kernel vxlan device's UDP-tunnel GSO packet looks like in the
    receiving node's ring: one frame, the inner TCP segmentation in its
    virtio_net_hdr (offsets moved by the 50 outer bytes)."""
    outer = (Ether(src=MAC[src_node], dst=MAC[dst_node]) / IP(src=src_node, dst=dst_node, flags="DF")
             / UDP(sport=50000, dport=8472, chksum=0) / VXLAN(flags="Instance", vni=2) / Ether(inner))
    return bytes(outer), dict(vnet, hdr_len=vnet["hdr_len"] + 50, csum_start=vnet["csum_start"] + 50)


def _ip_checksum_ok(frame):
    pkt = Ether(frame)
    again = Ether(frame)
    del again[IP].chksum
    return Ether(bytes(again))[IP].chksum == pkt[IP].chksum


def test_gso_super_packet_goes_whole_through_the_tunnel_offload_and_the_gateway():
    n1, n3 = datapath("node1"), datapath("node3")
    n1.tunnel_offload = True
    frame, vnet, payload = _super_packet(SERVER, 20000)
    [(port, out, vh)] = n1.process_frames(frame, 1, vnet=vnet)
    assert port == Datapath.TUNNEL_PORT
    assert vh == {"flags": 1, "gso_type": 1, "hdr_len": 54, "gso_size": 1400, "csum_start": 34, "csum_offset": 16}
    inner = Ether(out)
    # the kernel vxlan device's FDB maps 02:ee:<node IP> to the node
    assert inner[Ether].dst == "02:ee:c0:a8:01:03" and inner[Ether].src == "02:ee:c0:a8:01:01"
    assert inner[IP].src == APP1 and inner[IP].ttl == 63 and _ip_checksum_ok(out)
    assert bytes(inner[TCP].payload) == payload and inner[TCP].chksum == _pseudo(APP1, SERVER, len(out) - 34)
    assert n1.counters()["gso"] == {"whole": 1, "tunneled": 1, "segmented": 0}
    assert n1.counters()["encap"] == 1
    # node3's ring gets the kernel's tunnel super-packet: decap, SNAT, out whole
    wire, wvh = _as_linux_vxlan(out, "192.168.1.1", "192.168.1.3", vh)
    [(port, out3, vh3)] = n3.process_frames(wire, 0, vnet=wvh)
    assert port == 0 and vh3["gso_type"] == 1 and vh3["gso_size"] == 1400 and vh3["csum_start"] == 34
    pkt = Ether(out3)
    assert pkt[Ether].dst == ROUTER_MAC and pkt[IP].src == EGRESS and pkt[IP].dst == SERVER
    assert pkt[IP].ttl == 62 and _ip_checksum_ok(out3)
    assert bytes(pkt[TCP].payload) == payload and pkt[TCP].chksum == _pseudo(EGRESS, SERVER, len(out3) - 34)
    assert n3.counters()["decap"] == 1 and n3.counters()["snat_egress"] == 1


def test_gso_too_big_for_the_tunnel_gets_frag_needed_from_the_offload():
    n1 = datapath("node1")
    n1.tunnel_offload = True
    frame, vnet, _ = _super_packet(SERVER, 20000, mss=1448)   # 1488-byte segments, the tunnel takes 1450
    [(port, reply, vh)] = n1.process_frames(frame, 1, vnet=vnet)
    icmp = check(reply)
    assert port == 1 and vh is None
    assert (icmp[ICMP].type, icmp[ICMP].code, icmp[ICMP].nexthopmtu) == (3, 4, 1450)
    assert icmp[IP].dst == APP1
    c = n1.counters()
    assert c["gso"]["tunneled"] == 0 and c["drops"]["frag_needed"] == 1


def test_gso_reply_at_the_gateway_goes_whole_into_the_tunnel():
    n1, n3 = datapath("node1"), datapath("node3")
    n3.tunnel_offload = True
    syn = from_app1((SERVER, TCP(sport=40000, dport=80, flags="S", seq=1)))
    _, _, out = n1.process(syn, 1)
    _, _, out = n3.process(out[1], 0)
    xport = Ether(out[1])[TCP].sport

    def download(mss):
        payload = bytes(i % 249 for i in range(30000))
        raw = bytearray(bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS, flags="DF", ttl=60)
                              / TCP(sport=80, dport=xport, flags="A", seq=5000, ack=2) / payload))
        raw[50:52] = _pseudo(SERVER, EGRESS, len(raw) - 34).to_bytes(2, "big")
        vnet = {"flags": 1, "gso_type": 1, "hdr_len": 54, "gso_size": mss, "csum_start": 34, "csum_offset": 16}
        return bytes(raw), vnet, payload

    frame, vnet, payload = download(1400)
    [(port, out, vh)] = n3.process_frames(frame, 0, vnet=vnet)
    assert port == Datapath.TUNNEL_PORT and vh["gso_size"] == 1400 and vh["csum_start"] == 34
    inner = Ether(out)
    assert inner[Ether].dst == "02:ee:c0:a8:01:01" and inner[IP].dst == APP1 and inner[TCP].dport == 40000
    assert bytes(inner[TCP].payload) == payload and inner[TCP].chksum == _pseudo(SERVER, APP1, len(out) - 34)
    # too big for the tunnel: the server is told, quoting what it sent (to the egress IP)
    frame, big_vnet, _ = download(1460)
    [(port, reply, reply_vh)] = n3.process_frames(frame, 0, vnet=big_vnet)
    icmp = check(reply)
    assert port == 0 and reply_vh is None and icmp[IP].dst == SERVER and icmp[ICMP].nexthopmtu == 1450
    assert icmp[IPerror].dst == EGRESS
    # node1 delivers the tunnel super-packet to app1 whole
    wire, wvh = _as_linux_vxlan(out, "192.168.1.3", "192.168.1.1", vh)
    [(port, out1, vh1)] = n1.process_frames(wire, 0, vnet=wvh)
    assert port == 1 and vh1["gso_size"] == 1400 and Ether(out1)[IP].dst == APP1
    assert bytes(Ether(out1)[TCP].payload) == payload


def test_gso_without_df_is_cut_even_with_the_offload():
    n1 = datapath("node1")
    n1.tunnel_offload = True
    frame, vnet, payload = _super_packet(SERVER, 3000, mss=1448)
    raw = bytearray(frame)
    raw[20] &= ~0x40                       # DF off
    ip = Ether(bytes(raw))
    del ip[IP].chksum
    outs = n1.process_frames(bytes(Ether(bytes(ip))), 1, vnet=vnet)
    assert outs and all(p == 0 for p, _, _ in outs)
    assert n1.counters()["gso"]["segmented"] == 1 and n1.counters()["gso"]["tunneled"] == 0


def test_partial_checksum_is_completed():
    n1 = datapath("node1")
    pkt = Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst=OTHER_SERVER) / UDP(sport=5, dport=7) / b"abc"
    raw = bytearray(bytes(pkt))
    raw[34 + 6:34 + 8] = _pseudo(APP1, OTHER_SERVER, 11, 17).to_bytes(2, "big")
    [(port, out, vh)] = n1.process_frames(bytes(raw), 1, vnet={"flags": 1, "csum_start": 34, "csum_offset": 6})
    assert vh is None and check(out)[IP].src == "192.168.1.1"


def test_loop_counters_show_the_time_spent_out_of_the_c_loop():
    """run()'s loop_counters: how long the thread stayed in Python between two run() calls
    (control work, the GIL): a 20 ms sleep between them counts as at least 20 ms away."""
    import time

    dp = Datapath(EGRESS, MAC[EGRESS], EgressMap(), NatTable())
    dp.run(0.0)
    c = dp.loop_counters()
    assert c["away_max_us"] == 0 and c["away_long"] == 0      # one call: never away yet
    time.sleep(0.02)
    dp.run(0.0)
    c = dp.loop_counters()
    assert c["away_max_us"] >= 20_000 and c["away_long"] >= 1
