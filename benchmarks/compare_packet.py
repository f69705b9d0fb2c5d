"""Packet engine side by side: the gateway's reply path, egresscore vs dpkt vs scapy.

Work per packet, the same for every implementation: a VXLAN frame from the
underlay (outer Ethernet/IPv4/UDP 8472/VXLAN, inner Ethernet/IPv4/UDP with a
64-byte payload: an external server answering the egress IP) is validated
and decapsulated, the inner packet is reverse-SNATed (destination address
and port back to the pod, IPv4 and UDP checksums updated), and it is
re-encapsulated towards the pod's node (new outer header, source port from
a hash of the inner flow, outer UDP checksum 0).  In memory, one core.

egresscore runs its batch API, either PacketBatch.relay (one nogil pass per
batch) or the separate steps decap/dnat/encap (three passes); the
re-encapsulated frames are valid input again, so the batch is processed over
and over in place.  dpkt and scapy parse, rewrite and rebuild each frame
with their object APIs.  The outputs of all of them are checked to be
identical (but for the outer source port, each hashes its own way) before
timing.  Rates are packets per second of process CPU time (time.process_time),
so other load on a shared machine does not count against anyone; median of
several runs.
"""
import os
import platform
import statistics
import struct
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import egresscore  # noqa: E402

POD, POD_PORT = "10.0.1.93", 1234
GW_MAC, NODE1_MAC = "02:00:00:00:01:03", "02:00:00:00:01:01"
GW_IP, NODE1_IP, NODE2_IP = "192.168.1.3", "192.168.1.1", "192.168.1.2"
VXLAN_PORT = 8472


def make_frames(n):
    """n VXLAN frames (node2 -> gateway) carrying replies from n flows."""
    from scapy.all import IP, UDP, VXLAN, Ether, Raw
    frames = []
    for i in range(n):
        inner = (Ether(src="02:00:00:00:02:01", dst="02:00:00:00:02:02")
                 / IP(src=f"203.0.113.{1 + i % 200}", dst="192.168.1.100", ttl=60)
                 / UDP(sport=53 + i % 7, dport=40000 + i % 20000) / Raw(bytes(range(64))))
        frames.append(bytes(Ether(src="02:00:00:00:01:02", dst=GW_MAC)
                            / IP(src=NODE2_IP, dst=GW_IP, flags="DF", ttl=64)
                            / UDP(sport=50000 + i % 1000, dport=VXLAN_PORT, chksum=0)
                            / VXLAN(vni=2) / Raw(inner)))
    return frames


def src_port_of(inner_tuple):
    """The peers' flow hash for the outer source port (zlib.crc32)."""
    return 32768 + zlib.crc32(inner_tuple) % (60999 - 32768 + 1)


# --- dpkt ------------------------------------------------------------------

def dpkt_pipeline(frames):
    import dpkt
    pod = bytes(map(int, POD.split(".")))
    gw, node1 = (bytes(map(int, a.split("."))) for a in (GW_IP, NODE1_IP))
    gw_mac, n1_mac = (bytes.fromhex(m.replace(":", "")) for m in (GW_MAC, NODE1_MAC))
    out = []
    for buf in frames:
        eth = dpkt.ethernet.Ethernet(buf)
        ip = eth.data
        udp = ip.data
        if not isinstance(udp, dpkt.udp.UDP) or udp.dport != VXLAN_PORT:
            continue
        vx = udp.data
        flags, vni = struct.unpack_from("!B3xI", vx)
        if flags != 0x08 or vni & 0xFF:
            continue
        inner = dpkt.ethernet.Ethernet(vx[8:])
        iip = inner.data
        iudp = iip.data
        iip.dst = pod
        iudp.dport = POD_PORT
        iip.sum = 0
        iudp.sum = 0                              # dpkt recomputes both
        inner_bytes = bytes(inner)
        sport = src_port_of(iip.src + iip.dst + struct.pack("!BHH", iip.p, iudp.sport, iudp.dport))
        o_udp = dpkt.udp.UDP(sport=sport, dport=VXLAN_PORT, sum=0,
                             data=struct.pack("!B3xI", 0x08, 9 << 8) + inner_bytes)
        o_udp.ulen = len(o_udp)
        o_ip = dpkt.ip.IP(src=gw, dst=node1, ttl=64, p=17, df=1, id=0, data=bytes(o_udp))
        o_eth = dpkt.ethernet.Ethernet(src=gw_mac, dst=n1_mac, type=dpkt.ethernet.ETH_TYPE_IP, data=o_ip)
        out.append(bytes(o_eth))
    return out


# --- scapy -----------------------------------------------------------------

def scapy_pipeline(frames):
    from scapy.all import IP, UDP, VXLAN, Ether
    out = []
    for buf in frames:
        p = Ether(buf)
        if UDP not in p or p[UDP].dport != VXLAN_PORT or VXLAN not in p or p[VXLAN].flags != 0x08:
            continue
        inner = p[VXLAN].payload
        inner[IP].dst = POD
        inner[UDP].dport = POD_PORT
        del inner[IP].chksum
        del inner[UDP].chksum
        iip, iudp = inner[IP], inner[UDP]
        key = (bytes(map(int, iip.src.split("."))) + bytes(map(int, iip.dst.split(".")))
               + struct.pack("!BHH", iip.proto, iudp.sport, iudp.dport))
        o = (Ether(src=GW_MAC, dst=NODE1_MAC) / IP(src=GW_IP, dst=NODE1_IP, flags="DF", id=0, ttl=64)
             / UDP(sport=src_port_of(key), dport=VXLAN_PORT, chksum=0) / VXLAN(vni=9, flags=0x08) / inner)
        out.append(bytes(o))
    return out


# --- egresscore --------------------------------------------------------------

def egresscore_setup(frames):
    tmpl = egresscore.VxlanTemplate(GW_MAC, NODE1_MAC, GW_IP, NODE1_IP, 9)
    batch = egresscore.PacketBatch.from_frames(frames, frame_size=256, headroom=64)
    return batch, tmpl


def egresscore_step(batch, tmpl):
    batch.decap(port=VXLAN_PORT)
    batch.dnat(POD, POD_PORT)
    batch.encap(tmpl)


def egresscore_relay(batch, tmpl):
    batch.relay(tmpl, POD, POD_PORT, vxlan_port=VXLAN_PORT)


def egresscore_single(frames, tmpl):
    """The same work through the per-packet Python functions (for reference)."""
    out = []
    for buf in frames:
        vni, inner = egresscore.vxlan_decap(buf, port=VXLAN_PORT)
        out.append(egresscore.vxlan_encap(egresscore.dnat(inner, POD, POD_PORT), tmpl))
    return out


def check_same_work(frames):
    """All implementations produce the same inner frames and outer fields."""
    batch, tmpl = egresscore_setup(frames)
    egresscore_relay(batch, tmpl)
    ours = [batch.frame(i) for i in range(len(frames))]
    assert all(v == egresscore.PacketBatch.TX for v in batch.verdicts), batch.counts()
    steps, _ = egresscore_setup(frames)
    egresscore_step(steps, tmpl)
    for peer in (dpkt_pipeline(frames), scapy_pipeline(frames), egresscore_single(frames, tmpl),
                 [steps.frame(i) for i in range(len(frames))]):
        assert len(peer) == len(ours)
        for a, b in zip(ours, peer):
            # identical except the outer UDP source port (each hashes its own way)
            assert a[:34] == b[:34] and a[36:] == b[36:], (a.hex(), b.hex())


def _rate(fn, packets, repeat):
    """Median packets/s over `repeat` timed calls of fn()."""
    rates = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        rates.append(packets / (time.process_time() - t0))
    return statistics.median(rates)


def run(quick: bool = False) -> str:
    n = 256 if quick else 1024
    rounds = 50 if quick else 1000           # egresscore: batch passes per timed run
    n_dpkt = 500 if quick else 5000
    n_scapy = 50 if quick else 500
    repeat = 3 if quick else 7
    frames = make_frames(max(n, n_dpkt, n_scapy))
    check_same_work(frames[:64])

    batch, tmpl = egresscore_setup(frames[:n])

    def relay():
        for _ in range(rounds):
            egresscore_relay(batch, tmpl)

    def steps():
        for _ in range(rounds):
            egresscore_step(batch, tmpl)

    relay()                                  # warm up
    r_ours = _rate(relay, n * rounds, repeat)
    r_steps = _rate(steps, n * rounds, repeat)
    assert batch.counts() == {}, batch.counts()
    r_single = _rate(lambda: egresscore_single(frames[:n_dpkt], tmpl), n_dpkt, repeat)
    r_dpkt = _rate(lambda: dpkt_pipeline(frames[:n_dpkt]), n_dpkt, repeat)
    r_scapy = _rate(lambda: scapy_pipeline(frames[:n_scapy]), n_scapy, repeat)

    def row(name, rate, packets):
        return (f"| {name} | {packets:,} | {rate / 1e6:.3f} | {1e9 / rate:,.0f} | "
                f"{r_ours / rate:,.1f}x |")

    import dpkt
    import scapy
    lines = [
        "### Packet engine: VXLAN decap + reverse SNAT + re-encap (gateway reply path)",
        "",
        f"Inner UDP with a 64-byte payload in 156-byte VXLAN frames, one core, in memory; "
        f"packets per CPU-second, median of {repeat} runs. egresscore: a batch of {n} frames, "
        f"{rounds} passes per run. dpkt {dpkt.__version__}, scapy {scapy.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "| implementation | packets per run | Mpps | ns/packet | PacketBatch.relay is |",
        "|---|---:|---:|---:|---:|",
        row("egresscore PacketBatch.relay (one pass)", r_ours, n * rounds),
        row("egresscore PacketBatch decap, dnat, encap (3 passes)", r_steps, n * rounds),
        row("egresscore per-packet Python functions", r_single, n_dpkt),
        row("dpkt (parse, rewrite, rebuild)", r_dpkt, n_dpkt),
        row("scapy (parse, rewrite, rebuild)", r_scapy, n_scapy),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv[1:]))
