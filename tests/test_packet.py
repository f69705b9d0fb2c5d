"""Packet engine against scapy: parse, SNAT, reverse SNAT, TTL, ICMP errors.

A packet is described by a plain dict of parameters; `build()` turns it into
bytes with scapy (which computes every length and checksum).  The oracle for
a rewrite is `build(rewritten parameters)`: scapy recomputes all checksums
from scratch, egresscore updates them incrementally, and the bytes must be
identical.
"""
import copy
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import egresscore
from egresscore import PacketDropped

scapy_all = pytest.importorskip("scapy.all")
from scapy.all import (  # noqa: E402
    ICMP,
    IP,
    TCP,
    UDP,
    Dot1Q,
    Ether,
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPOption_Router_Alert,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    Raw,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MAC_A = "02:00:00:00:00:01"
MAC_B = "02:00:00:00:00:02"
L4_KINDS = ("tcp", "udp", "udp0", "echo_req", "echo_rep")


# --------------------------------------------------------------------------
# Parametric packet builder (the oracle)

def build_l3(pr):
    """IP packet (no Ethernet) from parameters."""
    v6 = pr["ver"] == 6
    if v6:
        ip = IPv6(src=pr["src"], dst=pr["dst"], hlim=pr["ttl"], tc=pr.get("tos", 0))
        if pr.get("ext"):
            ip = ip / IPv6ExtHdrDestOpt()
        if pr.get("mf"):
            ip = ip / IPv6ExtHdrFragment(m=1, offset=0, id=7)
    else:
        ip = IP(src=pr["src"], dst=pr["dst"], ttl=pr["ttl"], tos=pr.get("tos", 0), id=pr.get("id", 1),
                flags=(2 if pr.get("df") else 0) | (1 if pr.get("mf") else 0))
        if pr.get("opts"):
            ip.options = [IPOption_Router_Alert()]
    kind = pr["l4"]
    payload = Raw(pr.get("payload", b""))
    if kind == "tcp":
        l4 = TCP(sport=pr["sport"], dport=pr["dport"], flags=pr.get("flags", "S"), seq=pr.get("seq", 1)) / payload
    elif kind in ("udp", "udp0"):
        l4 = UDP(sport=pr["sport"], dport=pr["dport"]) / payload
        if kind == "udp0":
            l4[UDP].chksum = 0
    elif kind == "echo_req":
        l4 = (ICMPv6EchoRequest(id=pr["sport"], seq=5, data=pr.get("payload", b"")) if v6
              else ICMP(type=8, id=pr["sport"], seq=5) / payload)
    elif kind == "echo_rep":
        l4 = (ICMPv6EchoReply(id=pr["dport"], seq=5, data=pr.get("payload", b"")) if v6
              else ICMP(type=0, id=pr["dport"], seq=5) / payload)
    elif kind == "err":
        err = pr["err"]
        quote = _quote(err)
        if v6:
            layer = {1: ICMPv6DestUnreach(code=err["code"] % 7), 2: ICMPv6PacketTooBig(mtu=1400),
                     3: ICMPv6TimeExceeded(code=err["code"] % 2)}[err["type"]]
        else:
            layer = ICMP(type=err["type"], code=err["code"], nexthopmtu=1400 if err["type"] == 3 else 0)
        l4 = layer / Raw(quote)
    else:
        raise AssertionError(kind)
    return bytes(ip / l4)


def _l4_csum_offset(raw, ver):
    """Offset of the L4 checksum field in an IP packet's bytes."""
    if ver == 4:
        off, proto = (raw[0] & 15) * 4, raw[9]
    else:
        off, proto = 40, raw[6]
        while proto in (0, 43, 44, 60):          # extension headers
            proto, off = raw[off], off + (8 if proto == 44 else (raw[off + 1] + 1) * 8)
    return off + {6: 16, 17: 6}.get(proto, 2)


def _quote(err):
    """The first k bytes of the quoted packet, as the ICMP error carries them.
    A quote that cuts the quoted L4 checksum in half keeps those bytes as
    they were before any NAT (a NAT cannot update half a checksum)."""
    full = build_l3(err["inner"])
    quote = full[: err["k"]]
    before = err.get("quoted_before_nat")
    if before is not None:
        off = _l4_csum_offset(full, err["inner"]["ver"])
        if off < err["k"] < off + 2:
            quote = quote[:off] + before[off:err["k"]]
    return quote


def build_frame(pr):
    frame = bytearray(bytes(Ether(src=MAC_A, dst=MAC_B, type=0x86DD if pr["ver"] == 6 else 0x0800)))
    if pr.get("vlan") is not None:
        frame = bytearray(bytes(Ether(src=MAC_A, dst=MAC_B, type=0x8100)
                                / Dot1Q(vlan=pr["vlan"], type=0x86DD if pr["ver"] == 6 else 0x0800)))
    return bytes(frame) + build_l3(pr)


def nat_params(pr, side, addr, port):
    """Plain-Python model of a NAT rewrite on the parameters."""
    pr = copy.deepcopy(pr)
    pr["src" if side == "src" else "dst"] = addr
    kind = pr["l4"]
    if port is None:
        pass
    elif kind in ("tcp", "udp", "udp0"):
        pr["sport" if side == "src" else "dport"] = port
    elif kind == "echo_req" and side == "src":
        pr["sport"] = port
    elif kind == "echo_rep" and side == "dst":
        pr["dport"] = port
    if kind == "err":
        # RFC 5508: the quoted packet went the other way
        pr["err"]["quoted_before_nat"] = _quote(pr["err"])
        pr["err"]["inner"] = nat_params(pr["err"]["inner"], "dst" if side == "src" else "src", addr, port)
    return pr


# --------------------------------------------------------------------------
# Strategies

v4 = st.integers(1, 0xDFFFFFFF).map(lambda n: str(ipaddress.IPv4Address(n)))
v6 = st.integers(1, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
ports = st.integers(0, 65535)


@st.composite
def l3_params(draw, ver, kinds=L4_KINDS, allow_frag=True):
    addr = v4 if ver == 4 else v6
    kind = draw(st.sampled_from([k for k in kinds if not (ver == 6 and k == "udp0")]))
    pr = {
        "ver": ver, "src": draw(addr), "dst": draw(addr), "ttl": draw(st.integers(2, 255)),
        "tos": draw(st.integers(0, 255)), "l4": kind,
        "sport": draw(ports), "dport": draw(ports),
        "payload": draw(st.binary(max_size=80)),
    }
    if ver == 4:
        pr["df"] = draw(st.booleans())
        pr["opts"] = draw(st.booleans())
        pr["id"] = draw(st.integers(0, 65535))
    else:
        pr["ext"] = draw(st.booleans())
    if kind == "tcp":
        pr["flags"] = draw(st.sampled_from(["S", "SA", "A", "PA", "FA", "R"]))
        pr["seq"] = draw(st.integers(0, 2**32 - 1))
    if allow_frag and kind in ("tcp", "udp") and draw(st.integers(0, 5)) == 0:
        pr["mf"] = True
    return pr


@st.composite
def packet_params(draw, ver=None):
    ver = ver or draw(st.sampled_from([4, 6]))
    if draw(st.integers(0, 3)) == 0:
        pr = draw(l3_params(ver, kinds=("tcp",)))
        inner = draw(l3_params(ver, kinds=("tcp", "udp", "udp0", "echo_req", "echo_rep"), allow_frag=False))
        inner_len = len(build_l3(inner))
        ihl = 40 + (8 if inner.get("ext") else 0) if ver == 6 else (24 if inner.get("opts") else 20)
        k = draw(st.integers(min(ihl + 8, inner_len), inner_len))
        pr.update(l4="err", err={"type": draw(st.sampled_from([3, 11, 12] if ver == 4 else [1, 2, 3])),
                                 "code": draw(st.integers(0, 5)), "inner": inner, "k": k})
        pr.pop("mf", None)
    else:
        pr = draw(l3_params(ver))
    pr["vlan"] = draw(st.one_of(st.none(), st.integers(1, 4094)))
    return pr


# --------------------------------------------------------------------------
# Tests

@SETTINGS
@given(packet_params())
def test_parse_reports_what_scapy_built(pr):
    info = egresscore.parse(build_frame(pr))
    assert info.ip_version == pr["ver"]
    assert info.src == ipaddress.ip_address(pr["src"])
    assert info.dst == ipaddress.ip_address(pr["dst"])
    assert info.ttl == pr["ttl"]
    assert info.vlan == pr["vlan"]
    assert info.l3_offset == (18 if pr["vlan"] is not None else 14)
    assert info.frag == ("first" if pr.get("mf") else "none")
    kind = pr["l4"]
    if kind in ("tcp", "udp", "udp0"):
        assert (info.sport, info.dport) == (pr["sport"], pr["dport"])
        assert info.proto == (6 if kind == "tcp" else 17)
    elif kind == "echo_req":
        assert (info.sport, info.dport) == (pr["sport"], 0)
    elif kind == "echo_rep":
        assert (info.sport, info.dport) == (0, pr["dport"])
    else:
        inner = pr["err"]["inner"]
        assert info.inner is not None
        proto, isrc, idst, isport, idport = info.inner
        assert (isrc, idst) == (ipaddress.ip_address(inner["src"]), ipaddress.ip_address(inner["dst"]))
        if inner["l4"] in ("tcp", "udp", "udp0"):
            assert (isport, idport) == (inner["sport"], inner["dport"])


@SETTINGS
@given(packet_params(), st.data())
def test_snat_and_reverse_snat_match_scapy_checksums(pr, data):
    addr = data.draw(v4 if pr["ver"] == 4 else v6)
    port = data.draw(st.one_of(st.none(), ports))
    frame = build_frame(pr)
    out = egresscore.snat(frame, addr, port)
    assert out == build_frame(nat_params(pr, "src", addr, port))
    # the reply direction: reverse SNAT restores the original endpoint
    if pr["l4"] != "err":
        back = egresscore.snat(out, pr["src"], pr["sport"] if port is not None else None)
        assert back == frame
    rev = egresscore.dnat(frame, addr, port)
    assert rev == build_frame(nat_params(pr, "dst", addr, port))


@SETTINGS
@given(packet_params(ver=4), st.data())
def test_icmp_error_reverse_snat_rfc5508(pr, data):
    """An ICMP error from the Internet about a packet the gateway SNATed:
    outer destination and quoted source go back to the pod, with the quoted
    IP/L4 checksums and the ICMP checksum."""
    if pr["l4"] != "err":
        return
    pod, pod_port = data.draw(v4), data.draw(ports)
    out = egresscore.dnat(build_frame(pr), pod, pod_port)
    want = nat_params(pr, "dst", pod, pod_port)
    assert want["err"]["inner"]["src"] == pod
    assert out == build_frame(want)
    parsed = scapy_all.Ether(out)
    assert parsed[IP].dst == pod


def test_zero_udp_checksum_stays_zero_over_ipv4():
    pr = {"ver": 4, "src": "10.0.1.5", "dst": "203.0.113.9", "ttl": 64, "l4": "udp0",
          "sport": 1000, "dport": 53, "payload": b"q" * 30}
    out = egresscore.snat(build_frame(pr), "192.168.1.100", 40000)
    assert scapy_all.Ether(out)[UDP].chksum == 0
    assert out == build_frame(nat_params(pr, "src", "192.168.1.100", 40000))


def test_udp_checksum_that_becomes_zero_is_sent_as_ffff():
    # search a port that makes the recomputed checksum 0x0000 -> 0xffff
    pr = {"ver": 4, "src": "10.0.1.5", "dst": "203.0.113.9", "ttl": 64, "l4": "udp",
          "sport": 1000, "dport": 53, "payload": b"abc"}
    frame = build_frame(pr)
    c0 = scapy_all.Ether(build_frame(nat_params(pr, "src", "192.168.1.100", 0)))[UDP].chksum
    port = 0xFFFF - (~c0 & 0xFFFF)   # one's-complement sum becomes 0xffff
    want = build_frame(nat_params(pr, "src", "192.168.1.100", port))
    assert scapy_all.Ether(want)[UDP].chksum == 0xFFFF
    assert egresscore.snat(frame, "192.168.1.100", port) == want


@SETTINGS
@given(packet_params())
def test_ttl_decrement_matches_scapy(pr):
    out = egresscore.ttl_decrement(build_frame(pr))
    assert out == build_frame(dict(pr, ttl=pr["ttl"] - 1))


@pytest.mark.parametrize("ver", [4, 6])
def test_ttl_one_is_dropped_ttl_exceeded(ver):
    pr = {"ver": ver, "src": "10.0.1.5" if ver == 4 else "fd00::5", "dst": "203.0.113.9" if ver == 4 else "2001:db8::9",
          "ttl": 1, "l4": "udp", "sport": 1, "dport": 2}
    with pytest.raises(PacketDropped) as e:
        egresscore.ttl_decrement(build_frame(pr))
    assert e.value.reason == "ttl_exceeded"


def test_later_fragment_is_parsed_but_not_translated():
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.1.5", dst="203.0.113.9", frag=100, proto=17)
                  / Raw(b"x" * 40))
    info = egresscore.parse(frame)
    assert info.frag == "later" and info.sport is None and info.l4_offset is None
    with pytest.raises(PacketDropped) as e:
        egresscore.snat(frame, "192.168.1.100", 40000)
    assert e.value.reason == "fragment"
    frame6 = bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="fd00::5", dst="2001:db8::9")
                   / IPv6ExtHdrFragment(offset=10, m=0, nh=17) / Raw(b"y" * 24))
    assert egresscore.parse(frame6).frag == "later"
    with pytest.raises(PacketDropped) as e:
        egresscore.snat(frame6, "fd00::1", 1)
    assert e.value.reason == "fragment"


def test_icmp_echo_id_is_the_port():
    req = bytes(Ether() / IP(src="10.0.1.5", dst="203.0.113.9") / ICMP(type=8, id=77, seq=1) / Raw(b"ping"))
    out = egresscore.snat(req, "192.168.1.100", 5000)
    p = scapy_all.Ether(out)
    assert (p[IP].src, p[ICMP].id) == ("192.168.1.100", 5000)
    rep = bytes(Ether() / IP(src="203.0.113.9", dst="192.168.1.100") / ICMP(type=0, id=5000, seq=1) / Raw(b"ping"))
    p = scapy_all.Ether(egresscore.dnat(rep, "10.0.1.5", 77))
    assert (p[IP].dst, p[ICMP].id) == ("10.0.1.5", 77)
    chk = p[ICMP].chksum
    del p[ICMP].chksum
    assert scapy_all.Ether(bytes(p))[ICMP].chksum == chk


def test_unsupported_protocol_and_family_mismatch():
    gre = bytes(Ether() / IP(src="10.0.1.5", dst="203.0.113.9", proto=47) / Raw(b"\x00" * 8))
    with pytest.raises(PacketDropped) as e:
        egresscore.snat(gre, "192.168.1.100")
    assert e.value.reason == "unsupported"
    udp = bytes(Ether() / IP(src="10.0.1.5", dst="203.0.113.9") / UDP())
    with pytest.raises(ValueError, match="IPv6"):
        egresscore.snat(udp, "fd00::1")
    with pytest.raises(ValueError, match="port"):
        egresscore.snat(udp, "192.168.1.100", 70000)
    with pytest.raises(TypeError, match="bytes-like"):
        egresscore.parse(12)


def test_batch_matches_single_packet_functions():
    prs = [{"ver": 4, "src": f"10.0.1.{i + 1}", "dst": "203.0.113.9", "ttl": 64 if i else 1, "l4": "udp",
            "sport": 1000 + i, "dport": 53, "payload": bytes([i]) * 20} for i in range(8)]
    frames = [build_frame(pr) for pr in prs]
    batch = egresscore.PacketBatch.from_frames(frames, frame_size=256, headroom=64)
    batch.snat("192.168.1.100", [40000 + i for i in range(8)])
    batch.ttl_decrement()
    for i, fr in enumerate(frames):
        want = egresscore.snat(fr, "192.168.1.100", 40000 + i)
        if i == 0:
            assert batch.verdicts[0] == egresscore.PacketBatch.DROP
            assert egresscore.DROP_REASON_NAMES[batch.reasons[0]] == "ttl_exceeded"
        else:
            assert batch.frame(i) == egresscore.ttl_decrement(want)
            assert batch.verdicts[i] == egresscore.PacketBatch.PASS
    assert batch.counts() == {"ttl_exceeded": 1}
