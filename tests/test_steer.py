"""The workers' cBPF fanout programs (egresscore._steer) against their plain-Python
model, on scapy-built frames (forward, reply, VXLAN-encapsulated, ICMP echo
and errors, IPv4 and IPv6), run through the classic-BPF interpreter; and the
rules themselves: a reply reaches the worker whose slice holds its port, a
pod's (IP, port) always lands on one worker."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egresscore._bpf import bpf_run
from egresscore._steer import (
    steer_hash,
    steer_pod,
    steer_pod_model,
    steer_slice,
    steer_underlay,
    steer_underlay_model,
    worker_slices,
)

scapy = pytest.importorskip("scapy.all")
Ether, IP, UDP, TCP, ICMP, IPv6 = scapy.Ether, scapy.IP, scapy.UDP, scapy.TCP, scapy.ICMP, scapy.IPv6
ICMPv6EchoRequest, ICMPv6EchoReply, ICMPv6DestUnreach = (scapy.ICMPv6EchoRequest, scapy.ICMPv6EchoReply,
                                                         scapy.ICMPv6DestUnreach)
VXLAN = scapy.VXLAN

NAT = (32768, 65534)
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
PODS4 = ["10.0.1.93", "10.0.1.94", "10.0.2.7"]
PODS6 = ["fd00:10:1::93", "fd00:10:2::7"]
EXT4 = ["203.0.113.10", "198.51.100.3"]
EXT6 = ["2001:db8::10"]
PORTS = [1, 53, 80, 5201, 32767, 32768, 40000, 49151, 49152, 60000, 65534, 65535]


@st.composite
def inner(draw):
    """A pod's packet (forward): scapy layers from IP up."""
    v6 = draw(st.booleans())
    src = draw(st.sampled_from(PODS6 if v6 else PODS4))
    dst = draw(st.sampled_from(EXT6 if v6 else EXT4))
    opts = [] if draw(st.booleans()) else [scapy.IPOption(b"\x01\x01\x01\x01")]   # IHL 5 or 6
    ipl = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst, options=opts)
    sport, dport = draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))
    kind = draw(st.sampled_from(["tcp", "udp", "echo", "error", "other"]))
    if kind == "tcp":
        return ipl / TCP(sport=sport, dport=dport)
    if kind == "udp":
        return ipl / UDP(sport=sport, dport=dport) / b"payload"
    if kind == "echo":
        return ipl / (ICMPv6EchoRequest(id=sport) if v6 else ICMP(type=8, id=sport))
    if kind == "error":  # the pod's error about a reply it got: quotes (ext -> pod)
        quoted = (IPv6(src=dst, dst=src) if v6 else IP(src=dst, dst=src)) / UDP(sport=dport, dport=sport)
        return ipl / (ICMPv6DestUnreach(code=4) if v6 else ICMP(type=3, code=3)) / quoted
    if v6:
        return IPv6(src=src, dst=dst, nh=47) / (b"\x00" * 8)
    return IP(src=src, dst=dst, proto=47) / (b"\x00" * 8)


@st.composite
def from_outside(draw):
    """A frame on the underlay from outside: a reply, an echo reply, an ICMP error."""
    v6 = draw(st.booleans())
    ours = draw(st.sampled_from(["192.168.1.3", "192.168.1.100"] if not v6 else ["fd00:192:168:1::100"]))
    ext = draw(st.sampled_from(EXT6 if v6 else EXT4))
    ipl = IPv6(src=ext, dst=ours) if v6 else IP(src=ext, dst=ours)
    port, other = draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))
    kind = draw(st.sampled_from(["tcp", "udp", "echo_reply", "echo_request", "error", "frag"]))
    if kind == "tcp":
        return ipl / TCP(sport=other, dport=port, flags="SA")
    if kind == "udp":
        return ipl / UDP(sport=other, dport=port)
    if kind == "echo_reply":
        return ipl / (ICMPv6EchoReply(id=port) if v6 else ICMP(type=0, id=port))
    if kind == "echo_request":
        return ipl / (ICMPv6EchoRequest(id=port) if v6 else ICMP(type=8, id=port))
    if kind == "error":  # quotes our translated packet (ours:port -> ext)
        quoted = (IPv6(src=ours, dst=ext) if v6 else IP(src=ours, dst=ext)) / TCP(sport=port, dport=other)
        return ipl / (ICMPv6DestUnreach() if v6 else ICMP(type=3, code=4)) / quoted
    if v6:
        return ipl / UDP(sport=other, dport=port)
    return IP(src=ext, dst=ours, frag=draw(st.integers(1, 100)), proto=17) / (b"\x00" * 16)


def vxlan(pkt, v6_underlay=False, port=8472):
    outer = IPv6(src="fd00:192:168:1::1", dst="fd00:192:168:1::3") if v6_underlay else \
        IP(src="192.168.1.1", dst="192.168.1.3")
    return outer / UDP(sport=51000, dport=port) / VXLAN(vni=2) / Ether(src="02:ee:c0:a8:01:01",
                                                                         dst="02:ee:c0:a8:01:03") / pkt


@settings(max_examples=400, deadline=None)
@given(inner(), st.sampled_from([1, 2, 3, 4, 7]))
def test_pod_program_matches_model(pkt, workers):
    raw = bytes(ETH / pkt)
    assert bpf_run(steer_pod(workers), raw, fanout=True) == steer_pod_model(raw, workers)


@settings(max_examples=400, deadline=None)
@given(st.one_of(from_outside(), inner().map(vxlan), inner().map(lambda p: vxlan(p, True))),
       st.sampled_from([1, 2, 3, 4]), st.sampled_from([NAT, (40000, 40999), (1024, 1031)]))
def test_underlay_program_matches_model(pkt, workers, nat):
    raw = bytes(ETH / pkt)
    want = steer_underlay_model(raw, workers, nat)
    assert 0 <= want < workers
    assert bpf_run(steer_underlay(workers, nat), raw, fanout=True) == want


def test_short_and_foreign_frames_go_to_worker_0():
    prog = steer_underlay(2, NAT)
    for raw in (b"", b"\x00" * 13, bytes(ETH / scapy.ARP(pdst="192.168.1.3")),
                bytes(ETH / IP(dst="192.168.1.3") / TCP(dport=40000))[:36]):
        assert bpf_run(prog, raw, fanout=True) == 0
        assert steer_underlay_model(raw, 2, NAT) == 0


def test_slices_are_disjoint_and_cover_the_range():
    for lo, hi, n in ((32768, 65534, 2), (32768, 65534, 3), (1024, 1031, 8), (5, 5, 1)):
        s = worker_slices(lo, hi, n)
        assert s[0][0] == lo and s[-1][1] == hi and len(s) == n
        for (a, b), (c, _) in zip(s, s[1:]):
            assert a <= b and c == b + 1
        for k, (a, b) in enumerate(s):
            assert steer_slice(a, lo, hi, n) == k == steer_slice(b, lo, hi, n)
    with pytest.raises(ValueError, match="too small"):
        worker_slices(1024, 1026, 4)
    with pytest.raises(ValueError, match="workers"):
        worker_slices(1024, 2000, 0)


@pytest.mark.parametrize("v6", [False, True])
def test_reply_goes_to_the_slice_owner(v6):
    """Every port of worker k's slice brings TCP and UDP replies, echo replies and ICMP errors to k."""
    prog = steer_underlay(2, NAT)
    ours, ext = ("fd00:192:168:1::100", "2001:db8::10") if v6 else ("192.168.1.100", "203.0.113.10")
    ipl = IPv6(src=ext, dst=ours) if v6 else IP(src=ext, dst=ours)
    for k, (lo, hi) in enumerate(worker_slices(*NAT, 2)):
        for port in (lo, lo + 1, (lo + hi) // 2, hi):
            quoted = (IPv6(src=ours, dst=ext) if v6 else IP(src=ours, dst=ext)) / UDP(sport=port, dport=53)
            for pkt in (ipl / TCP(sport=80, dport=port), ipl / UDP(sport=53, dport=port),
                        ipl / (ICMPv6EchoReply(id=port) if v6 else ICMP(type=0, id=port)),
                        ipl / (ICMPv6DestUnreach() if v6 else ICMP(type=3, code=3)) / quoted):
                assert bpf_run(prog, bytes(ETH / pkt), fanout=True) == k, pkt.summary()


def test_forward_keys_on_pod_address_and_port_only():
    """Endpoint-independent mapping: one (pod IP, pod port) is one worker whatever the
    destination, on the pod's veth and inside VXLAN on the gateway; both workers get some pods."""
    pod, under = steer_pod(2), steer_underlay(2, NAT)
    seen = set()
    for src in PODS4:
        for sport in range(1000, 1040):
            w = {bpf_run(pod, bytes(ETH / IP(src=src, dst=d) / proto(sport=sport, dport=dp)), fanout=True)
                 for d in EXT4 for dp in (80, 40000, 60000) for proto in (TCP, UDP)}
            w |= {bpf_run(under, bytes(ETH / vxlan(IP(src=src, dst=d) / proto(sport=sport, dport=dp))),
                          fanout=True) for d in EXT4 for dp in (80, 40000) for proto in (TCP, UDP)}
            assert len(w) == 1
            assert w == {steer_hash(int.from_bytes(bytes(map(int, src.split("."))), "big"), sport, 2)}
            seen |= w
    assert seen == {0, 1}
