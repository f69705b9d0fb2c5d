"""The Linux kernel's own egress gateway in the lab: the peer figures for egresscore's agent.

Builds the namespace lab with the kernel baseline datapath (vxlan devices +
policy routing + nftables SNAT on the gateway, nftables masquerade elsewhere;
see egresscore/lab/kernel.py) and measures, from a pod to an external server:
- small-packet UDP rate: 18-byte payloads (64-byte frames) sent as fast as one
  Python sender can for a bounded time; the figure is what the server received
  per second;
- iperf3 TCP throughput with 1 and 4 streams (received Gbit/s).
Two paths: app1 -> 203.0.113.10 (the egress-gateway path: vxlan to node3,
SNAT to the egress IP) and app2 -> 203.0.113.10 (plain per-node masquerade).
Median of several runs.  Needs root; runnable alone:
    python benchmarks/compare_lab.py [--quick]
"""
import argparse
import os
import shutil
import statistics
import sys

PATHS = (
    ("egress gateway: app1 (node1) -> vxlan -> node3 SNAT", "app1", "203.0.113.10"),
    ("masquerade: app2 (node2) -> node2 masquerade", "app2", "203.0.113.10"),
)
PAYLOAD = 18  # bytes of UDP payload: 64-byte Ethernet frames with FCS


def measure_once(lab, pod, dst, udp_seconds, tcp_seconds):
    """One small-UDP rate (pkt/s received) and iperf3 TCP Gbit/s (1 and 4 streams) from pod to dst."""
    return {
        "udp_pps": lab.udp_rate(pod, dst, seconds=udp_seconds, size=PAYLOAD)["rx_pps"],
        "tcp1_gbps": lab.iperf3(pod, dst, seconds=tcp_seconds, streams=1),
        "tcp4_gbps": lab.iperf3(pod, dst, seconds=tcp_seconds, streams=4),
    }


def medians(samples):
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _skip_reason():
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("iperf3") is None or shutil.which("nft") is None:
        return "needs iperf3 and nft (apt-get install iperf3 nftables)"
    return None


def run(quick: bool = False) -> str:
    reason = _skip_reason()
    if reason:
        return f"### Lab datapaths (kernel baseline)\n\nskipped: {reason}\n"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from egresscore.lab import Lab

    reps = 1 if quick else 3
    udp_seconds = 1.0 if quick else 2.5
    tcp_seconds = 1 if quick else 3
    samples = {label: [] for label, _, _ in PATHS}
    load = load_average()
    with Lab(datapath="kernel") as lab:
        for _ in range(reps):  # paths interleaved, so a change in machine load hits both alike
            for label, pod, dst in PATHS:
                samples[label].append(measure_once(lab, pod, dst, udp_seconds, tcp_seconds))
    rows = [("Linux kernel (vxlan + nftables)", label, medians(samples[label])) for label, _, _ in PATHS]
    lines = [
        "### Lab datapaths: the Linux kernel baseline",
        "",
        f"Small UDP: {PAYLOAD}-byte payloads (64-byte frames), one sender, {udp_seconds} s, received rate. "
        f"TCP: iperf3, {tcp_seconds} s. Median of {reps} run(s). "
        f"Load average at start: {load:.1f} on {os.cpu_count()} cores (other work on the machine skews these).",
        "",
        "| datapath | path | small UDP (pkt/s) | TCP 1 stream (Gbit/s) | TCP 4 streams (Gbit/s) |",
        "|---|---|---:|---:|---:|",
    ]
    for datapath, label, m in rows:
        lines.append(f"| {datapath} | {label} | {m['udp_pps']:,.0f} | {m['tcp1_gbps']:.2f} | {m['tcp4_gbps']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run of each measurement")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from compare import machine_summary
        print(machine_summary())
    except ImportError:
        pass
    print(run(quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
