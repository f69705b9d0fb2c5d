"""Malformed input: always a drop with the right reason, never a crash.

The corpus: every valid frame (several protocols, VLAN, IPv4 options, IPv6
extension headers and chains of them, ICMP and ICMPv6 errors, VXLAN with
IPv4 and IPv6 inner frames) truncated at every byte offset; bad IHL, IP and
UDP lengths, TCP data offsets; IPv6 extension-header chains too long or cut,
jumbograms (payload length 0 and a Jumbo Payload option: refused as
malformed, frames stop at 64 KiB), ICMPv6 errors whose quote is truncated
inside its IPv6 header, its extension headers or its first 8 L4 bytes; bad
VXLAN flags; zero-length and oversize frames; batches whose offsets/lengths
lie about their rows; and a seeded set of random byte mutations (any verdict
is fine there, a crash or an out-of-bounds access is not).  Every frame of
the corpus also goes through a dual-stack Datapath (both roles: from a pod
and from the underlay), whose counters must add up.

The same corpus also runs in a subprocess against a copy of the extension
built with Cython bounds checking (EGRESSCORE_CHECKED=1) and, when gcc has
it, AddressSanitizer: every frame is copied into an exactly sized malloc
block first, so any read or write past a frame's end is caught.  That build
is cached in build/checked-asan (the first run takes a minute).
"""
import os
import pickle
import random
import shutil
import subprocess
import sys
import sysconfig

import pytest
from conftest import require_module, require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANY = None  # any outcome but a crash


def valid_frames():
    """Valid frames (name, bytes) covering the parser's paths."""
    from scapy.all import (
        ICMP,
        IP,
        TCP,
        UDP,
        VXLAN,
        Dot1Q,
        Ether,
        ICMPv6DestUnreach,
        ICMPv6EchoRequest,
        IPOption_Router_Alert,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
        Raw,
    )
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    ip = IP(src="10.0.1.93", dst="203.0.113.9", flags="DF")
    ip6 = IPv6(src="fd00:10::93", dst="2001:db8::9")
    frames = {
        "udp4": e / ip / UDP(sport=1234, dport=53) / Raw(b"u" * 16),
        "tcp4_opts": e / IP(src="10.0.1.93", dst="203.0.113.9", options=[IPOption_Router_Alert()])
        / TCP(sport=40000, dport=443, flags="S", options=[("MSS", 1460)]),
        "vlan_udp4": e / Dot1Q(vlan=12) / ip / UDP(sport=1, dport=2) / Raw(b"v" * 4),
        "echo4": e / ip / ICMP(type=8, id=7) / Raw(b"ping"),
        "icmp4_err": e / IP(src="203.0.113.9", dst="192.168.1.100") / ICMP(type=3, code=4, nexthopmtu=1400)
        / Raw(bytes(IP(src="192.168.1.100", dst="203.0.113.9") / TCP(sport=40000, dport=443))[:28]),
        "first_frag4": e / IP(src="10.0.1.93", dst="203.0.113.9", flags="MF") / UDP(sport=1, dport=2) / Raw(b"f" * 24),
        "udp6_ext": e / ip6 / IPv6ExtHdrDestOpt() / UDP(sport=3, dport=4) / Raw(b"6" * 8),
        "frag6": e / ip6 / IPv6ExtHdrFragment(m=1, offset=0) / TCP(sport=5, dport=6),
        "echo6": e / ip6 / ICMPv6EchoRequest(id=9, data=b"p6"),
        "icmp6_err": e / ip6 / ICMPv6DestUnreach(code=4) / Raw(bytes(IPv6(src="2001:db8::9", dst="fd00:10::93")
                                                                    / UDP(sport=9, dport=10))),
        "udp6_chain": e / ip6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt()
        / UDP(sport=3, dport=4) / Raw(b"c" * 8),
        "tcp6_frag_chain": e / ip6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment(m=1)
        / TCP(sport=40000, dport=443, flags="S"),
        "ah6": e / IPv6(src="fd00:10::93", dst="2001:db8::9", nh=51)
        / Raw(bytes([17, 1, 0, 0]) + b"\x00\x00\x01\x00" + b"\x00" * 4 + bytes(UDP(sport=7, dport=8) / Raw(b"a"))),
        "icmp6_err_nat": e / IPv6(src="2001:db8::1", dst="fd00::100") / ICMPv6DestUnreach(code=4)
        / Raw(bytes(IPv6(src="fd00::100", dst="2001:db8::9") / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=443))[:56]),
        "echo6_err": e / IPv6(src="2001:db8::1", dst="fd00::100") / ICMPv6DestUnreach()
        / Raw(bytes(IPv6(src="fd00::100", dst="2001:db8::9") / ICMPv6EchoRequest(id=40000))),
    }
    frames = {k: bytes(v) for k, v in frames.items()}
    frames["vxlan"] = bytes(e / IP(src="192.168.1.3", dst="192.168.1.1") / UDP(sport=50000, dport=8472)
                            / VXLAN(vni=5) / Raw(frames["udp4"]))
    frames["vxlan6"] = bytes(e / IP(src="192.168.1.3", dst="192.168.1.1") / UDP(sport=50000, dport=8472)
                             / VXLAN(vni=5) / Raw(frames["udp6_chain"]))
    # VXLAN over the IPv6 underlay (UDP checksum filled in, as a Linux vxlan device sends it)
    frames["vxlan_u6"] = bytes(e / IPv6(src="fd00:192:168:1::3", dst="fd00:192:168:1::1")
                               / UDP(sport=50000, dport=8472) / VXLAN(vni=5) / Raw(frames["echo6"]))
    return frames


def ipv6_cases():
    """Malformed IPv6 with a known verdict: [(op, frame, allowed reasons)]."""
    from scapy.all import (
        UDP,
        Ether,
        ICMPv6DestUnreach,
        ICMPv6PacketTooBig,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrHopByHop,
        Jumbo,
        Raw,
    )
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    ip6 = dict(src="fd00:10::93", dst="2001:db8::9")
    items = []
    # a jumbogram (RFC 2675): payload length 0, the length in a hop-by-hop option
    jumbo = (e / IPv6(plen=0, **ip6) / IPv6ExtHdrHopByHop(options=[Jumbo(jumboplen=8 + 8 + 100)]) / UDP()
             / Raw(b"j" * 100))
    for op in ("parse", "snat", "encap"):
        items.append((op, bytes(jumbo), {"malformed"}))
    # a hop-by-hop header claiming more than the packet holds
    items.append(("parse", bytes(e / IPv6(**ip6) / IPv6ExtHdrHopByHop(len=40) / UDP()), {"malformed"}))
    # nine destination-options headers: a chain longer than the parser walks
    chain = IPv6(**ip6)
    for _ in range(9):
        chain = chain / IPv6ExtHdrDestOpt()
    items.append(("parse", bytes(e / chain / UDP()), {"unsupported"}))
    # eight walk fine
    chain = IPv6(**ip6)
    for _ in range(7):
        chain = chain / IPv6ExtHdrDestOpt()
    items.append(("parse", bytes(e / chain / UDP()), {"none"}))
    # ICMPv6 errors whose quote stops inside its IPv6 header, inside its
    # extension headers, or before 8 bytes of its L4 header
    quoted = bytes(IPv6(src="fd00::100", dst="2001:db8::9") / IPv6ExtHdrDestOpt() / UDP(sport=40000, dport=53))
    for cut in (0, 1, 39, 40, 41, 47, 48, 49, 55):
        for err in (ICMPv6DestUnreach(code=4), ICMPv6PacketTooBig(mtu=1280)):
            f = bytes(e / IPv6(src="2001:db8::1", dst="fd00::100") / err / Raw(quoted[:cut]))
            items.append(("parse", f, {"malformed"}))
            items.append(("snat", f, {"malformed"}))
    items.append(("parse", bytes(e / IPv6(src="2001:db8::1", dst="fd00::100") / ICMPv6DestUnreach()
                                 / Raw(quoted[:56])), {"none"}))
    return items


def build_corpus():
    """[(op, frame, allowed reasons or ANY)]."""
    from scapy.all import IP, TCP, UDP, VXLAN, Ether, Raw
    frames = valid_frames()
    items = []
    for name, f in frames.items():
        for cut in range(len(f)):
            items.append(("parse", f[:cut], {"malformed"}))
            items.append(("snat", f[:cut], {"malformed"}))
            items.append(("encap", f[:cut], {"malformed"}))
        items.append(("parse", f, {"none"}))
    for vx in (frames["vxlan"], frames["vxlan6"], frames["vxlan_u6"]):
        for cut in range(len(vx)):
            items.append(("decap", vx[:cut], {"malformed"}))
        items.append(("decap", vx, {"none"}))
    vx = frames["vxlan"]
    items += ipv6_cases()
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    udp = bytes(e / IP(src="10.0.1.93", dst="203.0.113.9") / UDP(sport=1, dport=2) / Raw(b"x" * 60))
    # bad IHL: below 5, or beyond the total length
    for ihl in range(5):
        b = bytearray(udp)
        b[14] = 0x40 | ihl
        items.append(("parse", bytes(b), {"malformed"}))
    small = bytes(e / IP(src="10.0.1.93", dst="203.0.113.9", ihl=15, len=40, options=[]) / Raw(b"\x00" * 40))
    items.append(("parse", small, {"malformed"}))
    # IHL within the packet but wrong: the header checksum no longer matches
    for ihl in (6, 7, 15):
        b = bytearray(udp)
        b[14] = 0x40 | ihl
        items.append(("parse", bytes(b), {"bad_checksum"}))
    # bad IP version behind an IPv4 ethertype
    b = bytearray(udp)
    b[14] = 0x65
    items.append(("parse", bytes(b), {"malformed"}))
    # IP total length: too long, shorter than the header, cutting UDP
    for tot in (len(udp) - 14 + 1, 19, 0, 27):
        items.append(("parse", bytes(e / IP(src="10.0.1.93", dst="203.0.113.9", len=tot, proto=17) / Raw(udp[34:])),
                      {"malformed"}))
    # UDP length below 8 / beyond the packet
    for ulen in (0, 7, 69, 0xFFFF):
        items.append(("parse", bytes(e / IP(src="10.0.1.93", dst="203.0.113.9") / UDP(len=ulen) / Raw(b"x" * 60)),
                      {"malformed"}))
    # TCP data offset below 5 / beyond the packet
    for doff in (0, 4, 15):
        items.append(("parse", bytes(e / IP(src="10.0.1.93", dst="203.0.113.9") / TCP(dataofs=doff)), {"malformed"}))
    # IPv6 payload length beyond the frame
    v6_header = b"\x60" + b"\x00" * 3 + b"\x04\x00\x11\x40" + b"\x00" * 32
    items.append(("parse", bytes(Ether(type=0x86DD) / Raw(v6_header)), {"malformed"}))
    # not IP / stacked VLAN tags
    items.append(("parse", bytes(Ether(type=0x0806) / Raw(b"\x00" * 28)), {"unsupported"}))
    items.append(("parse", bytes(Ether(type=0x8100) / Raw(b"\x00\x01\x81\x00\x00\x02\x08\x00" + udp[14:])),
                  {"unsupported"}))
    # zero-length and oversize frames
    for op in ("parse", "snat", "decap", "encap", "ttl"):
        items.append((op, b"", {"malformed"}))
        items.append((op, udp + b"\x00" * (65535 + 18 + 1 - len(udp)), {"malformed"}))
    # VXLAN: flags, reserved bits, port, short header
    for flags in (0x00, 0x0C, 0x80, 0x09, 0xFF):
        p = Ether(vx)
        p[VXLAN].flags = flags
        items.append(("decap", bytes(p), {"bad_vxlan"}))
    p = Ether(vx)
    p[VXLAN].reserved1 = 0xABCD
    items.append(("decap", bytes(p), {"bad_vxlan"}))
    p = Ether(vx)
    p[UDP].dport = 4789
    items.append(("decap", bytes(p), {"bad_vxlan"}))
    for inner_len in (0, 4, 13):
        items.append(("decap", bytes(e / IP(src="192.168.1.3", dst="192.168.1.1") / UDP(sport=1, dport=8472)
                                     / VXLAN(vni=5) / Raw(b"\x00" * inner_len)), {"malformed"}))
    items.append(("decap", bytes(e / IP(src="192.168.1.3", dst="192.168.1.1", flags="MF") / UDP(dport=8472)
                                 / VXLAN(vni=5) / Raw(frames["udp4"])), {"fragment"}))
    # seeded random mutations of every valid frame through every operation
    rng = random.Random(4)
    pool = list(frames.values())
    for _ in range(1500):
        b = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        if rng.random() < 0.3:
            del b[rng.randrange(len(b)):]
        for op in ("parse", "snat", "dnat", "ttl", "encap", "decap", "too_big"):
            items.append((op, bytes(b), ANY))
    return items


def corpus_datapath(ec, underlay6=False):
    """A dual-stack Datapath of node1 (192.168.1.1) serving both roles for
    the corpus's flows: pod 10.0.1.93 / fd00:10::93 on port 1, node3
    (192.168.1.3, VNI 5) hosting the same CIDRs, every policy through this
    node to egress IPs 192.168.1.100 / fd00::100; its tunnel over IPv4, or
    over IPv6 (underlay6)."""
    em = ec.EgressMap()
    em.set("10.0.1.93", "203.0.113.0/24", "192.168.1.100", "192.168.1.1")
    em.set("fd00:10::93", "2001:db8::/64", "fd00::100", "192.168.1.1")
    nat = ec.NatTable(["192.168.1.100", "fd00::100"], capacity=4096)
    dp = ec.Datapath("192.168.1.1", "02:00:00:00:00:02", em, nat, vni=5, node_ip6="fd00:192:168:1::1",
                     underlay6=underlay6)
    dp.add_node(0, "192.168.1.1", ["10.0.9.0/24", "fd00:10:9::/64"], ip6="fd00:192:168:1::1")
    dp.add_node(1, "192.168.1.3", ["10.0.1.0/24", "fd00:10::/64"], "02:00:00:00:00:01", ip6="fd00:192:168:1::3")
    dp.set_router("02:00:00:00:00:fe")
    dp.add_pod_port(1, "10.0.1.93", "02:00:00:00:00:02", "02:00:00:00:00:01", pod_ip6="fd00:10::93")
    return dp


def run_corpus(ec, items):
    """Run the corpus through egresscore module `ec`; return failure messages."""
    import numpy as np

    tmpl = ec.VxlanTemplate("02:00:00:00:01:03", "02:00:00:00:01:01", "192.168.1.3", "192.168.1.1", 5, mtu=1500)
    dps = (corpus_datapath(ec), corpus_datapath(ec, underlay6=True))
    seen = 0

    def do(op, frame):
        if op == "parse":
            ec.parse(frame)
        elif op in ("snat", "dnat"):
            info = ec.parse(frame)
            addr = "192.168.1.100" if info.ip_version == 4 else "fd00::100"
            getattr(ec, op)(frame, addr, 40000)
        elif op == "ttl":
            ec.ttl_decrement(frame)
        elif op == "encap":
            ec.vxlan_encap(frame, tmpl)
        elif op == "decap":
            ec.vxlan_decap(frame)
        elif op == "too_big":
            ec.icmp_too_big(frame, 1450)

    failures = []
    for op, frame, allowed in items:
        try:
            do(op, frame)
            got = "none"
        except ec.PacketDropped as exc:
            got = exc.reason
        if allowed is not ANY and got not in allowed:
            failures.append(f"{op} on {len(frame)} bytes {frame[:40].hex()}...: {got}, want {sorted(allowed)}")
        if op in ("parse", "decap", "dnat"):
            # the whole pipeline, both roles: any verdict, every frame counted once
            for port in (0, 1):
                for dp in dps:
                    for _, out, _ in dp.process_frames(frame, port):
                        if not 14 <= len(out) <= 65535 + 18 + 70:
                            failures.append(f"datapath port {port} on {frame[:40].hex()}: {len(out)}-byte output")
                seen += 1
    for dp in dps:
        c = dp.counters()
        if not c["rx"] == seen == c["passed"] + c["tx"] + c["tx_local"] + c["dropped"]:
            failures.append(f"datapath counters do not add up over {seen} frames: {c}")

    # the ring loop's batch step (process_batch) over the corpus, both ports:
    # every batch must leave the RCU read sections it entered, or a writer's
    # grace period (lpm_rcu_sync) would wait for ever
    frames = [f for op, f, _ in items if op in ("parse", "decap", "dnat")]
    lengths = np.array([len(f) for f in frames], np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    data = np.frombuffer(b"".join(frames) + b"\0", np.uint8)
    verdicts = np.zeros(len(frames), np.int32)
    out, meta = np.zeros(1 << 20, np.uint8), np.zeros((4096, 4), np.int64)
    for dp in dps:
        for port in (0, 1):
            dp.process_batch(data, offsets, lengths, verdicts, out, meta, port=port)
        tables = (dp.egress_map, dp.pod_nodes, dp.node_ips, dp.local_pods, dp.pod_nodes6, dp.node_ips6,
                  dp.local_pods6)
        if any(t.readers for t in tables):
            failures.append(f"read sections left entered: {[t.readers for t in tables]}")
        else:                                   # writers complete (a grace period each)
            dp.egress_map.set("10.0.1.93", "198.51.100.0/24", "192.168.1.100", "192.168.1.1")
            dp.add_node(2, "192.168.1.5", ["10.0.5.0/24"], "02:00:00:00:00:05")
            dp.remove_node(2)

    # the batch API on the same frames (those that fit a row), each step
    fits = [(op, f, allowed) for op, f, allowed in items if len(f) <= 2048 - 128]
    batch = ec.PacketBatch.from_frames([f for _, f, _ in fits], frame_size=2048, headroom=128)
    batch.parse()
    for i, (op, f, allowed) in enumerate(fits):
        got = ec.DROP_REASON_NAMES[batch.reasons[i]]
        if op == "parse" and allowed is not ANY and got not in allowed:
            failures.append(f"batch parse on {len(f)} bytes: {got}, want {sorted(allowed)}")
    for step in ("decap", "dnat", "ttl_decrement", "encap"):
        batch.load([f for _, f, _ in fits])
        if step == "decap":
            batch.decap()
        elif step == "dnat":
            batch.dnat("10.0.1.93", 1234)
        elif step == "ttl_decrement":
            batch.ttl_decrement()
        else:
            batch.encap(tmpl)
        for i, (op, f, allowed) in enumerate(fits):
            got = ec.DROP_REASON_NAMES[batch.reasons[i]]
            if op == step.split("_")[0] and allowed is not ANY and got not in allowed:
                failures.append(f"batch {step} on {len(f)} bytes: {got}, want {sorted(allowed)}")
    # offsets and lengths that lie about the rows: malformed, no access
    batch = ec.PacketBatch(4, frame_size=256, headroom=64)
    batch.offsets[:] = [-1, 200, 0, 255]
    batch.lengths[:] = [10, 100, 257, -5]
    for step in (batch.parse, batch.decap, batch.ttl_decrement, lambda: batch.encap(tmpl),
                 lambda: batch.snat("192.168.1.100", 1)):
        batch.reset()
        step()
        if list(batch.reasons) != [1, 1, 1, 1]:
            failures.append(f"lying offsets/lengths: reasons {list(batch.reasons)}")
    if batch.counts() != {"malformed": 20}:
        failures.append(f"counters {batch.counts()}")
    assert np is not None
    return failures


@pytest.fixture(scope="module")
def corpus():
    pytest.importorskip("scapy.all")
    return build_corpus()


def test_malformed_corpus_drops_with_the_right_reason(corpus):
    import egresscore
    failures = run_corpus(egresscore, corpus)
    assert not failures, "\n".join(failures[:30])


def _compiler():
    """The C compiler setup.py will use (Python's CC), or None if absent."""
    cc = (sysconfig.get_config_var("CC") or "gcc").split()[0]
    return shutil.which(os.environ.get("CC", cc).split()[0]) or shutil.which("gcc")


def _asan_runtime():
    cc = _compiler()
    if not cc:
        return None
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def test_malformed_corpus_under_bounds_checked_asan_build(corpus, tmp_path):
    require_tool("gcc")
    for module in ("Cython", "setuptools", "numpy"):
        require_module(module, f"{module} (pip install -e '.[test]'; setup.py builds the checked copy with it)")
    asan = _asan_runtime()
    out = os.path.join(ROOT, "build", "checked-asan" if asan else "checked")
    env = dict(os.environ, EGRESSCORE_CHECKED="1")
    if asan:
        env["CFLAGS"] = "-fsanitize=address -fno-omit-frame-pointer"
        env["LDFLAGS"] = "-fsanitize=address"
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-b", out, "-t", os.path.join(out, "tmp"),
                            "-j", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    # a package copy whose _core is the checked build
    shutil.copytree(os.path.join(ROOT, "egresscore"), os.path.join(out, "egresscore"), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    data = tmp_path / "corpus.pickle"
    data.write_bytes(pickle.dumps(corpus))
    child_env = dict(os.environ, PYTHONPATH=os.pathsep.join([out, os.path.join(ROOT, "tests")]))
    if asan:
        child_env.update(LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99",
                         PYTHONMALLOC="malloc")
    code = (
        "import pickle, sys, egresscore, egresscore._core as c\n"
        f"assert c.__file__.startswith({out!r}), c.__file__\n"
        "from test_packet_malformed import run_corpus\n"
        "failures = run_corpus(egresscore, pickle.load(open(sys.argv[1], 'rb')))\n"
        "print('\\n'.join(failures[:30])); sys.exit(1 if failures else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(data)], cwd=str(tmp_path), env=child_env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
