"""VXLAN (RFC 7348) encap/decap and the path-MTU answer, against scapy."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, UDP, VXLAN, Ether, ICMPv6PacketTooBig, IPv6, Raw  # noqa: E402
from test_packet import build_frame, nat_params, packet_params

import egresscore
from egresscore import PacketBatch, PacketDropped, VxlanTemplate

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NODE3_MAC, NODE1_MAC = "02:00:00:00:01:03", "02:00:00:00:01:01"


def template(vni=7, port=8472, mtu=9000):
    return VxlanTemplate(NODE3_MAC, NODE1_MAC, "192.168.1.3", "192.168.1.1", vni, port=port, mtu=mtu)


def scapy_vxlan(inner, sport, vni=7, dport=8472, ttl=64):
    return bytes(Ether(src=NODE3_MAC, dst=NODE1_MAC)
                 / IP(src="192.168.1.3", dst="192.168.1.1", flags="DF", id=0, ttl=ttl)
                 / UDP(sport=sport, dport=dport, chksum=0) / VXLAN(vni=vni, flags=0x08) / Raw(inner))


@SETTINGS
@given(packet_params(), st.integers(0, 2**24 - 1), st.sampled_from([8472, 4789]))
def test_encap_matches_scapy_and_decap_inverts_it(pr, vni, port):
    inner = build_frame(pr)
    t = template(vni=vni, port=port)
    out = egresscore.vxlan_encap(inner, t)
    sport = t.source_port(inner)
    assert 32768 <= sport <= 60999
    assert out == scapy_vxlan(inner, sport, vni, port)
    p = Ether(out)
    assert p[UDP].chksum == 0                      # RFC 7348: zero over IPv4
    assert egresscore.vxlan_decap(out, port=port, vni=vni) == (vni, inner)
    assert egresscore.vxlan_decap(out, port=port) == (vni, inner)


@SETTINGS
@given(packet_params(ver=4), st.data())
def test_gateway_reply_path_decap_reverse_snat_reencap(pr, data):
    """Reply direction on the gateway: VXLAN in, reverse SNAT, TTL, VXLAN out
    to the pod's node; the batch agrees with scapy on every byte."""
    if pr["l4"] == "err":
        pr = nat_params(pr, "dst", "192.168.1.100", 40000)
    pod = data.draw(st.sampled_from(["10.0.1.93", "10.0.2.7"]))
    pod_port = data.draw(st.integers(0, 65535))
    inner = build_frame(pr)
    wire = scapy_vxlan(inner, 50000, vni=2, ttl=63)
    t = template(vni=9)
    batch = PacketBatch.from_frames([wire, wire], frame_size=512, headroom=16)
    batch.decap(vni=2)
    batch.dnat(pod, pod_port)
    batch.ttl_decrement()
    batch.encap(t)
    want_inner = build_frame(dict(nat_params(pr, "dst", pod, pod_port), ttl=pr["ttl"] - 1))
    for i in range(2):
        assert batch.verdicts[i] == PacketBatch.TX, egresscore.DROP_REASON_NAMES[batch.reasons[i]]
        assert batch.frame(i) == scapy_vxlan(want_inner, t.source_port(want_inner), vni=9)
    assert list(batch.vnis) == [2, 2]
    assert batch.counts() == {}


def test_source_port_spreads_flows_and_is_stable():
    t = template()
    ports = set()
    for i in range(200):
        inner = bytes(Ether() / IP(src="10.0.1.5", dst="203.0.113.9") / UDP(sport=10000 + i, dport=53))
        p = t.source_port(inner)
        assert p == t.source_port(inner)
        ports.add(p)
    assert len(ports) > 180
    narrow = VxlanTemplate(NODE3_MAC, NODE1_MAC, "192.168.1.3", "192.168.1.1", 1, port_range=(5000, 5003))
    assert {narrow.source_port(bytes(Ether() / IP() / UDP(sport=s))) for s in range(100)} == {5000, 5001, 5002, 5003}


def test_template_header_is_rfc7348():
    t = template(vni=0x123456)
    h = t.header
    assert len(h) == 50
    assert h[42:50] == bytes([0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0])
    with pytest.raises(ValueError, match="vni"):
        VxlanTemplate(NODE3_MAC, NODE1_MAC, "192.168.1.3", "192.168.1.1", 1 << 24)
    with pytest.raises(ValueError, match="src_mac"):
        VxlanTemplate("nope", NODE1_MAC, "192.168.1.3", "192.168.1.1", 1)
    with pytest.raises(ValueError, match="IPv4"):
        VxlanTemplate(NODE3_MAC, NODE1_MAC, "fd00::3", "192.168.1.1", 1)


def test_decap_validates_flags_port_vni():
    inner = bytes(Ether() / IP(src="10.0.1.5", dst="203.0.113.9") / UDP(sport=1, dport=2))
    good = scapy_vxlan(inner, 40000, vni=5)
    assert egresscore.vxlan_decap(good, vni=5)[0] == 5

    def reason(frame, **kw):
        with pytest.raises(PacketDropped) as e:
            egresscore.vxlan_decap(frame, **kw)
        return e.value.reason

    assert reason(good, vni=6) == "bad_vxlan"
    assert reason(good, port=4789) == "bad_vxlan"
    for flags in (0x00, 0x0C, 0x88, 0x09):
        p = Ether(good)
        p[VXLAN].flags = flags
        assert reason(bytes(p)) == "bad_vxlan", flags
    p = Ether(good)
    p[VXLAN].reserved1 = 1
    assert reason(bytes(p)) == "bad_vxlan"
    p = Ether(good)
    p[VXLAN].reserved2 = 1
    assert reason(bytes(p)) == "bad_vxlan"
    # VXLAN header cut short inside a consistent UDP datagram
    short = bytes(Ether(src=NODE3_MAC, dst=NODE1_MAC) / IP(src="192.168.1.3", dst="192.168.1.1")
                  / UDP(sport=1, dport=8472) / Raw(b"\x08\x00\x00\x00"))
    assert reason(short) == "malformed"
    tcp = bytes(Ether() / IP(src="192.168.1.3", dst="192.168.1.1") / Raw(b"\x00" * 20))
    assert reason(tcp) == "unsupported"


def test_decap_over_ipv6_underlay():
    inner = bytes(Ether() / IP(src="10.0.1.5", dst="203.0.113.9") / UDP(sport=1, dport=2))
    wire = bytes(Ether() / IPv6(src="fd00::3", dst="fd00::1") / UDP(sport=40000, dport=8472)
                 / VXLAN(vni=3) / Raw(inner))
    assert egresscore.vxlan_decap(wire) == (3, inner)


def test_too_big_with_df_answers_icmp_frag_needed():
    inner = bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
                  / IP(src="10.0.1.93", dst="203.0.113.9", flags="DF") / UDP(sport=1234, dport=80) / Raw(b"z" * 1452))
    t = template(mtu=1500)
    with pytest.raises(PacketDropped) as e:
        egresscore.vxlan_encap(inner, t)
    assert e.value.reason == "frag_needed"
    r = Ether(e.value.reply)
    assert (r.src, r.dst) == ("02:00:00:00:00:0b", "02:00:00:00:00:0a")
    assert (r[IP].src, r[IP].dst, r[ICMP].type, r[ICMP].code) == ("203.0.113.9", "10.0.1.93", 3, 4)
    assert r[ICMP].nexthopmtu == 1500 - 50
    assert len(e.value.reply) == 14 + 576
    assert e.value.reply[14 + 28:] == inner[14:14 + 548]
    # scapy recomputes both checksums to the same values
    r2 = r.copy()
    del r2[IP].chksum, r2[ICMP].chksum
    assert bytes(r2) == e.value.reply
    # one byte less fits exactly: inner IP packet of 1450 bytes
    fits = bytes(Ether() / IP(src="10.0.1.93", dst="203.0.113.9", flags="DF") / UDP(sport=1234, dport=80)
                 / Raw(b"z" * 1422))
    assert len(fits) - 14 == 1450
    assert Ether(egresscore.vxlan_encap(fits, t))[IP].len == 1500
    # without DF: not fragmented by us, dropped as unsupported (no ICMP)
    nodf = bytes(Ether() / IP(src="10.0.1.93", dst="203.0.113.9") / UDP() / Raw(b"z" * 1480))
    with pytest.raises(PacketDropped) as e:
        egresscore.vxlan_encap(nodf, t)
    assert e.value.reason == "unsupported" and e.value.reply is None


def test_too_big_ipv6_answers_packet_too_big_and_batch_replaces_frame():
    inner = bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
                  / IPv6(src="fd00:10::93", dst="2001:db8::9") / UDP(sport=5, dport=6) / Raw(b"q" * 1500))
    t = template(mtu=1500)
    reply = egresscore.icmp_too_big(inner, 1450)
    r = Ether(reply)
    assert r[ICMPv6PacketTooBig].mtu == 1450
    assert (r[IPv6].src, r[IPv6].dst) == ("2001:db8::9", "fd00:10::93")
    assert len(reply) == 14 + 1280
    r2 = r.copy()
    del r2[ICMPv6PacketTooBig].cksum
    assert bytes(r2) == reply
    batch = PacketBatch.from_frames([inner], frame_size=2048, headroom=64)
    batch.encap(t)
    assert batch.verdicts[0] == PacketBatch.DROP
    assert egresscore.DROP_REASON_NAMES[batch.reasons[0]] == "frag_needed"
    assert batch.frame(0) == reply
    assert batch.counts() == {"frag_needed": 1}


def test_no_icmp_about_icmp_errors_or_broadcast():
    err = bytes(Ether(dst="02:00:00:00:00:01") / IP(src="10.0.1.5", dst="203.0.113.9", flags="DF")
                / ICMP(type=3, code=1) / Raw(bytes(IP(src="203.0.113.9", dst="10.0.1.5") / UDP()) + b"x" * 1500))
    assert egresscore.icmp_too_big(err, 1450) == b""
    bcast = bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / IP(src="10.0.1.5", dst="203.0.113.9", flags="DF") / UDP())
    assert egresscore.icmp_too_big(bcast, 1450) == b""


@pytest.mark.parametrize("src,dst", [
    ("0.0.0.0", "203.0.113.9"),            # unspecified source
    ("224.0.0.5", "203.0.113.9"),          # multicast source
    ("10.0.1.5", "224.0.0.5"),             # about a multicast destination
    ("10.0.1.5", "255.255.255.255"),       # about a broadcast destination
    ("::", "2001:db8::9"),                 # RFC 4443 2.4 (e): unspecified source
    ("ff02::1", "2001:db8::9"),            # multicast source
])
def test_no_too_big_to_unspecified_multicast_or_broadcast(src, dst):
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst, flags="DF")
    frame = bytes(Ether(dst="02:00:00:00:00:01") / ip / UDP(sport=1, dport=2) / Raw(b"x" * 1500))
    assert egresscore.icmp_too_big(frame, 1450) == b""
    with pytest.raises(PacketDropped) as e:
        egresscore.vxlan_encap(frame, template(mtu=1500))
    assert e.value.reason == "frag_needed" and not e.value.reply


def test_ipv6_too_big_never_reports_below_the_minimum_mtu():
    inner = bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
                  / IPv6(src="fd00:10::93", dst="2001:db8::9") / UDP(sport=5, dport=6) / Raw(b"q" * 1300))
    with pytest.raises(PacketDropped) as e:
        egresscore.vxlan_encap(inner, template(mtu=1300))
    assert Ether(e.value.reply)[ICMPv6PacketTooBig].mtu == 1280


def test_batch_encap_moves_frames_with_short_headroom():
    inner = bytes(Ether() / IP(src="10.0.1.5", dst="203.0.113.9") / UDP(sport=1, dport=2) / Raw(b"a" * 64))
    t = template()
    batch = PacketBatch.from_frames([inner], frame_size=512, headroom=0)
    batch.encap(t)
    assert batch.verdicts[0] == PacketBatch.TX
    assert batch.frame(0) == egresscore.vxlan_encap(inner, t)


@SETTINGS
@given(st.lists(packet_params(ver=4), min_size=1, max_size=6), st.booleans())
def test_relay_one_pass_equals_the_separate_steps(prs, ttl):
    t = template(vni=9, mtu=1500)
    wires = [scapy_vxlan(build_frame(pr), 50000 + i, vni=2) for i, pr in enumerate(prs)]
    wires.append(scapy_vxlan(b"\x00" * 20, 1, vni=3))           # inner too short to parse
    steps = PacketBatch.from_frames(wires, frame_size=512, headroom=16)
    steps.decap(vni=None)
    steps.dnat("10.0.1.93", 1234)
    if ttl:
        steps.ttl_decrement()
    steps.encap(t)
    fused = PacketBatch.from_frames(wires, frame_size=512, headroom=16)
    fused.relay(t, "10.0.1.93", 1234, ttl=ttl)
    for i in range(len(wires)):
        assert (fused.verdicts[i], fused.reasons[i]) == (steps.verdicts[i], steps.reasons[i])
        assert fused.frame(i) == steps.frame(i)
    assert fused.counts() == steps.counts()


def test_relay_answers_too_big_and_validates_arguments():
    big = bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
                / IP(src="203.0.113.9", dst="192.168.1.100", flags="DF") / UDP(sport=53, dport=40000)
                / Raw(b"b" * 1460))
    batch = PacketBatch.from_frames([scapy_vxlan(big, 50000, vni=2)], frame_size=2048, headroom=0)
    batch.relay(template(mtu=1500), "10.0.1.93", 1234)
    assert egresscore.DROP_REASON_NAMES[batch.reasons[0]] == "frag_needed"
    r = Ether(batch.frame(0))
    # from the egress IP, quoting the packet as the external host sent it
    assert (r[IP].src, r[IP].dst) == ("192.168.1.100", "203.0.113.9")
    assert (r[ICMP].type, r[ICMP].code, r[ICMP].nexthopmtu) == (3, 4, 1450)
    assert batch.frame(0)[14 + 28:] == big[14:14 + 548]
    with pytest.raises(ValueError, match="side"):
        batch.relay(template(), "10.0.1.93", side="both")
    with pytest.raises(ValueError, match="IPv4"):
        batch.relay(template(), "fd00::1")
