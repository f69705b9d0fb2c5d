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
import tempfile
import time

POD, SERVER, DST6 = "app1", "ext1", "2001:db8:113::10"
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


def _counters(lab):
    from egresscore.lab import traffic

    return lab.call(POD, traffic.link_counters, "eth0"), lab.call(SERVER, traffic.link_counters, "eth0")


def flood6(lab, count, seconds):
    """trafgen sends `count` smallest IPv6 UDP frames (at most `seconds`); delivery counted at the server's eth0."""
    from egresscore.lab import traffic

    pod = lab.pods[POD]
    frame = traffic.udp_frame6(pod.mac, pod.host_mac, pod.ip6, DST6, FLOOD_SPORT, FLOOD_DPORT, PAYLOAD6)
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", prefix="egc-bench-trafgen6-") as cfg:
        cfg.write(traffic.trafgen_config(frame))
        cfg.flush()
        argv = ["timeout", str(seconds), "trafgen", "-o", pod.ifname, "-i", cfg.name, "-n", str(count),
                "-P", "1", "--no-sock-mem", "--notouch-irq"]
        (tx0, rx0), cpu0, t0 = _counters(lab), traffic.cpu_seconds(), time.perf_counter()
        out = lab.run(POD, argv, timeout=seconds + 10, check=False)
        elapsed = time.perf_counter() - t0
        time.sleep(0.3)  # frames still in flight through the agents
        cpu, (tx1, rx1) = traffic.cpu_seconds() - cpu0, _counters(lab)
    if out.returncode not in (0, 124):  # 124: stopped by timeout, still bounded
        raise RuntimeError(f"trafgen (IPv6) failed ({out.returncode}): {out.stderr.strip()[-300:]}")
    sent, delivered = tx1[1] - tx0[1], rx1[0] - rx0[0]
    return {"flood6_sent": sent, "flood6_delivered": delivered, "flood6_lost": sent - delivered,
            "flood6_seconds": elapsed, "flood6_cpu_seconds": cpu, "flood6_kpps": delivered / elapsed / 1e3,
            "flood6_loss_pct": 100.0 * (sent - delivered) / sent if sent else float("nan"),
            "flood6_cpu_per_mpkt": cpu / delivered * 1e6 if delivered else float("nan")}


def tcp6(lab, seconds):
    """iperf3 TCP, 1 stream, to the server's IPv6 address: Gbit/s and machine CPU s per GB."""
    from egresscore.lab import traffic

    try:
        with lab.iperf3_server(DST6):
            cpu0 = traffic.cpu_seconds()
            res = lab.iperf3_client(POD, DST6, ["-t", seconds, "-P", 1, "--connect-timeout", 3000], seconds)
            cpu = traffic.cpu_seconds() - cpu0
    except (RuntimeError, subprocess.TimeoutExpired) as exc:   # no IPv6 path on this side: nan, the reason kept
        return {"tcp6_gbps": float("nan"), "tcp6_cpu_per_gb": float("nan"), "tcp6_error": str(exc)[:200]}
    got = res["end"]["sum_received"]
    return {"tcp6_gbps": got["bits_per_second"] / 1e9, "tcp6_bytes": got["bytes"], "tcp6_cpu_seconds": cpu,
            "tcp6_cpu_per_gb": cpu / (got["bytes"] / 1e9) if got["bytes"] else float("nan")}


def measure6(lab, p):
    """The IPv6 figures of one side in one repetition (after a ping6 resolves the neighbours):
    flood6 with --only's flood, tcp6 with its tcp."""
    out = {}
    lab.ping(POD, DST6, count=1)
    if "flood" in p["parts"]:
        out.update(flood6(lab, p["flood_packets"], p["flood_seconds"]))
    if "tcp" in p["parts"]:
        out.update(tcp6(lab, p["tcp_seconds"]))
    return out
