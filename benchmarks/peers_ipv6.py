"""The IPv6 rows of compare_agent_peers.py (`--ipv6`), kept apart from its IPv4 code.

With --ipv6 the lab is dual-stack (Lab(ipv6=True)) and the policy its
dual-stack sample (examples/egress-sample-dual.yaml: IPv4 still SNATed to
192.168.1.3, IPv6 to fd00:192:168:1::100), and each repetition measures, on
each side and right after the IPv4 figures, the same path over IPv6: app1
(node1, fd00:10:1::93) -> VXLAN (IPv4 underlay, as Cilium) -> node3 SNAT to
the IPv6 egress IP -> router -> 2001:db8:113::10.
- flood6: trafgen sends the smallest IPv6 UDP frame (no payload: 62 bytes,
  66 with FCS; IPv6's header is 20 bytes longer than IPv4's, so there is no
  64-byte one), UDP checksum set; counted as the IPv4 flood is;
- tcp6: iperf3 TCP, 1 stream, to the server's IPv6 address.
"""
import subprocess

POD, DST6 = "app1", "2001:db8:113::10"
FLOOD_SPORT, FLOOD_DPORT = 40000, 9
PAYLOAD6 = 0

# (key, label, format, lower is better), appended to compare_agent_peers.METRICS with --ipv6
METRICS6 = (
    ("flood6_kpps", "IPv6 smallest UDP flood (trafgen, 66-byte frames): delivered kpps", "{:,.1f}", False),
    ("flood6_loss_pct", "IPv6 UDP flood: loss (sent - delivered) %", "{:.1f}", True),
    ("flood6_cpu_per_mpkt", "IPv6 UDP flood: machine CPU s per M delivered", "{:.2f}", True),
    ("tcp6_gbps", "IPv6 iperf3 TCP 1 stream: Gbit/s", "{:.2f}", False),
    ("tcp6_cpu_per_gb", "IPv6 iperf3 TCP 1 stream: machine CPU s per GB", "{:.2f}", True),
)


def flood6(lab, count, seconds, flood):
    """trafgen sends `count` smallest IPv6 UDP frames (at most `seconds`) through
    compare_agent_peers' `flood`; delivery counted at the server's eth0."""
    from egresscore.lab import traffic

    pod = lab.pods[POD]
    frame = traffic.udp_frame6(pod.mac, pod.host_mac, pod.ip6, DST6, FLOOD_SPORT, FLOOD_DPORT, PAYLOAD6)
    return flood(lab, count, seconds, key="flood6", frame=frame)


def tcp6(lab, seconds, tcp):
    """iperf3 TCP, 1 stream, to the server's IPv6 address (compare_agent_peers' `tcp`):
    Gbit/s and machine CPU s per GB; nan with the reason when this side has no IPv6 path."""
    try:
        return tcp(lab, 1, seconds, "tcp6", dst=DST6, extra=("--connect-timeout", 3000))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"tcp6_gbps": float("nan"), "tcp6_cpu_per_gb": float("nan"), "tcp6_error": str(exc)[:200]}


def measure6(lab, p, flood, tcp):
    """The IPv6 figures of one side in one repetition (after a ping6 resolves the neighbours):
    flood6 with --only's flood, tcp6 with its tcp (compare_agent_peers' own `flood` and `tcp`)."""
    out = {}
    lab.ping(POD, DST6, count=1)
    if "flood" in p["parts"]:
        out.update(flood6(lab, p["flood_packets"], p["flood_seconds"], flood))
    if "tcp" in p["parts"]:
        out.update(tcp6(lab, p["tcp_seconds"], tcp))
    return out
