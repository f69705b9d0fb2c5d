"""BPF filter helpers against a plain-Python predicate, on scapy-built frames,
run through a small classic-BPF interpreter (and libpcap's compiler when the
system has it)."""

import pytest
from conftest import requires_library
from hypothesis import given, settings
from hypothesis import strategies as st

from egresscore import bpf_all, bpf_any, bpf_compile, bpf_dst, bpf_not_outgoing, bpf_vxlan, pcap_available
from egresscore._bpf import PACKET_OUTGOING, bpf_run

scapy = pytest.importorskip("scapy.all")
Ether, IP, UDP, TCP, ICMP, ARP, IPv6 = (scapy.Ether, scapy.IP, scapy.UDP, scapy.TCP, scapy.ICMP,
                                        scapy.ARP, scapy.IPv6)

HOSTS = ["192.168.1.3", "192.168.1.100", "203.0.113.7", "10.0.1.93"]


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["udp", "tcp", "icmp", "arp", "ipv6", "frag"]))
    dst = draw(st.sampled_from(HOSTS))
    port = draw(st.sampled_from([8472, 4789, 4790, 53, 32768, 40000, 65534, 65535, 1]))
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    ihl = draw(st.sampled_from([5, 6]))
    opts = [] if ihl == 5 else [scapy.IPOption(b"\x01\x01\x01\x01")]
    if kind == "udp":
        pkt = eth / IP(dst=dst, options=opts) / UDP(sport=1234, dport=port) / (b"x" * 8)
    elif kind == "tcp":
        pkt = eth / IP(dst=dst, options=opts) / TCP(sport=1234, dport=port)
    elif kind == "icmp":
        pkt = eth / IP(dst=dst) / ICMP()
    elif kind == "arp":
        pkt = eth / ARP(pdst=dst)
    elif kind == "ipv6":
        pkt = eth / IPv6(dst="2001:db8::1") / UDP(dport=port)
    else:
        pkt = eth / IP(dst=dst, frag=draw(st.integers(1, 100)), proto=17) / (
            b"\x04\xd2" + port.to_bytes(2, "big") + b"\x00" * 12)
    return bytes(pkt), kind, dst, port


def info(kind, dst, port):
    """(is IPv4, ip proto, dst, dport or None)"""
    proto = {"udp": 17, "tcp": 6, "icmp": 1, "frag": 17}.get(kind)
    has_ports = kind in ("udp", "tcp")
    return kind in ("udp", "tcp", "icmp", "frag"), proto, dst, port if has_ports else None


@settings(max_examples=300, deadline=None)
@given(frames(), st.sampled_from([4789, 53, 65535]))
def test_vxlan_filter_matches_oracle(f, vport):
    raw, kind, dst, port = f
    ipv4, proto, _, dport = info(kind, dst, port)
    want = ipv4 and proto == 17 and dport == vport
    assert bool(bpf_run(bpf_vxlan(vport), raw)) == want


@settings(max_examples=300, deadline=None)
@given(frames(), st.sampled_from([None, "192.168.1.100", "203.0.113.7"]),
       st.sampled_from([None, 4789, (32768, 65534), (1, 53), (65535, 65535)]),
       st.sampled_from([None, "tcp", "udp"]))
def test_dst_filter_matches_oracle(f, host, ports, proto):
    raw, kind, dst, port = f
    ipv4, p, d, dport = info(kind, dst, port)
    want = ipv4 and (host is None or d == host)
    if ports is not None:
        lo, hi = (ports, ports) if isinstance(ports, int) else ports
        want = want and p in ((6, 17) if proto is None else ({"tcp": 6, "udp": 17}[proto],))
        want = want and dport is not None and lo <= dport <= hi
    elif proto is not None:
        want = want and p == {"tcp": 6, "udp": 17}[proto]
    assert bool(bpf_run(bpf_dst(host, ports, proto), raw)) == want


@settings(max_examples=200, deadline=None)
@given(frames())
def test_any_all_compose(f):
    raw, kind, dst, port = f
    a, b = bpf_vxlan(4789), bpf_dst("192.168.1.100")
    ra, rb = bool(bpf_run(a, raw)), bool(bpf_run(b, raw))
    assert bool(bpf_run(bpf_any(a, b), raw)) == (ra or rb)
    assert bool(bpf_run(bpf_all(a, b), raw)) == (ra and rb)
    to_app1 = dst == "10.0.1.93" and kind != "arp" and kind != "ipv6"
    assert bool(bpf_run(bpf_any(b, a, bpf_dst("10.0.1.93")), raw)) == (ra or rb or to_app1)


def test_not_outgoing():
    raw = bytes(Ether() / IP() / UDP())
    prog = bpf_not_outgoing()
    assert bpf_run(prog, raw, pkttype=0)
    assert not bpf_run(prog, raw, pkttype=PACKET_OUTGOING)


@pytest.mark.parametrize("bad, kw", [
    ("port", {"ports": 70000}), ("host", {"host": "2001:db8::1"}), ("host", {"host": "nope"}),
    ("empty", {"ports": (10, 5)}), ("proto", {"proto": "sctp"}), ("proto", {"ports": 5, "proto": 1}),
    ("ports", {"ports": (1, 2, 3)}),
])
def test_dst_rejects_bad_input(bad, kw):
    with pytest.raises(ValueError, match=bad):
        bpf_dst(**kw)


def test_vxlan_rejects_bad_port():
    with pytest.raises(ValueError, match="port"):
        bpf_vxlan(-1)
    with pytest.raises(ValueError):
        bpf_any()


needs_pcap = requires_library(pcap_available, "libpcap", "libpcap0.8")


@needs_pcap
@settings(max_examples=200, deadline=None)
@given(frames())
def test_pcap_expression_agrees_with_helpers(f):
    raw, kind, dst, port = f
    assert bool(bpf_run(bpf_compile("ip and udp dst port 8472"), raw)) == bool(bpf_run(bpf_vxlan(), raw))
    assert bool(bpf_run(bpf_compile("ip dst host 192.168.1.100"), raw)) == bool(
        bpf_run(bpf_dst("192.168.1.100"), raw))


@needs_pcap
def test_pcap_bad_expression():
    with pytest.raises(ValueError, match="expression"):
        bpf_compile("udp dst port banana")
    with pytest.raises(TypeError):
        bpf_compile(42)


def test_pcap_absent_is_clear(monkeypatch):
    import egresscore._bpf as b
    monkeypatch.setattr(b, "_pcap", (None, None, "libpcap is not installed"))
    assert not b.pcap_available()
    with pytest.raises(RuntimeError, match="libpcap"):
        b.bpf_compile("udp")


def test_pack_rejects_garbage():
    from egresscore._core import _bpf_pack
    with pytest.raises(TypeError):
        _bpf_pack(42)
    with pytest.raises(ValueError):
        _bpf_pack([(1, 2, 3)])
    with pytest.raises(ValueError):
        _bpf_pack([(0x10000, 0, 0, 0)])
    with pytest.raises(ValueError):
        _bpf_pack([])
    assert len(_bpf_pack(bpf_vxlan())) == 8 * len(bpf_vxlan())
