"""egresscore agents versus the Linux kernel's own egress datapath, same lab, one run.

The lab is built once.  Each repetition measures, in turn, the kernel
baseline (vxlan devices + policy routing + nftables SNAT/masquerade, with the
veths' default offloads: GSO super-packets cross the whole path), then one
`egresscore agent` process per node with `--ring-mode latency` (the default),
then with `--ring-mode batch` (offloads left on: the agents' rings take
super-packets whole and hand tunnel-bound ones to their kernel vxlan device,
the tunnel offload).  From a pod to an external server: small-packet UDP rate
(18-byte payloads, one Python sender, bounded time, rate received by the
server), iperf3 TCP with 1 and 4 streams, and ping round trip.  Paths:
app1 -> 203.0.113.10 (VXLAN to node3, SNAT to the egress IP) and app2 ->
203.0.113.10 (per-node masquerade).  Median of the repetitions.  Needs root:
    python benchmarks/compare_agent.py [--quick] [--plot FILE.png]
"""
import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from compare_lab import PATHS, PAYLOAD, _skip_reason, load_average, measure_once  # noqa: E402

LAST = {}  # the last run's medians, for the plot
SIDES = ("kernel", "egresscore latency", "egresscore batch")
METRICS = (("udp_pps", "small UDP (pkt/s)", "{:,.0f}"), ("tcp1_gbps", "TCP 1 stream (Gbit/s)", "{:.2f}"),
           ("tcp4_gbps", "TCP 4 streams (Gbit/s)", "{:.2f}"), ("rtt_ms", "ping RTT (ms, lower is better)", "{:.3f}"))


def ping_rtt_ms(lab, pod, dst, count=20):
    """Mean round trip of `count` pings 20 ms apart (sparse traffic: what a
    request/response or a TCP ACK waits in each datapath)."""
    out = lab.run(pod, ["ping", "-q", "-c", str(count), "-i", "0.02", dst], check=False).stdout
    line = next((ln for ln in out.splitlines() if "min/avg/max" in ln), None)
    if line is None:
        return float("nan")
    return float(line.split("=")[1].split("/")[1])


def measure(lab, pod, dst, udp_s, tcp_s):
    return dict(measure_once(lab, pod, dst, udp_s, tcp_s), rtt_ms=ping_rtt_ms(lab, pod, dst))


def _medians(samples):
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def run(quick: bool = False) -> str:
    reason = _skip_reason()
    if reason:
        return f"### egresscore agents vs the Linux kernel (lab)\n\nskipped: {reason}\n"
    from egresscore.demo import SAMPLE, start_agents
    from egresscore.lab import Lab

    reps = 1 if quick else 3
    udp_s = 1.0 if quick else 2.0
    tcp_s = 1 if quick else 2
    load = load_average()
    samples = {side: {label: [] for label, _, _ in PATHS} for side in SIDES}
    from egresscore.lab.kernel import SAMPLE_POLICY

    with tempfile.TemporaryDirectory(prefix="egc-bench-") as tmp, Lab(datapath="kernel", tag="bagent") as lab:
        # the three take turns within each repetition, so a change in the
        # machine's load hits them alike
        for rep in range(reps):
            if rep:
                lab.install_kernel_egress([SAMPLE_POLICY])  # masquerade included
            for label, pod, dst in PATHS:
                samples["kernel"][label].append(measure(lab, pod, dst, udp_s, tcp_s))
            lab.remove_kernel_egress()
            lab.set_masquerade(False)
            for side in SIDES[1:]:
                _, agents = start_agents(lab, SAMPLE, tmp, extra_args=("--ring-mode", side.split()[-1]))
                try:
                    for label, pod, dst in PATHS:
                        lab.ping(pod, dst, count=1)  # neighbours warm
                        samples[side][label].append(measure(lab, pod, dst, udp_s, tcp_s))
                finally:
                    for a in agents.values():
                        a.stop()
    res = {side: {label: _medians(v) for label, v in by_path.items()} for side, by_path in samples.items()}
    LAST.clear()
    LAST.update(res)
    lines = [
        "### egresscore agents vs the Linux kernel datapath (same lab, one run)",
        "",
        f"Small UDP: {PAYLOAD}-byte payloads, one sender, {udp_s} s, rate received. TCP: iperf3 {tcp_s} s. "
        f"Median of {reps} run(s), the three alternating. Load average at start {load:.1f} on "
        f"{os.cpu_count()} cores. Kernel: default veth offloads (GSO end to end). egresscore: PACKET_VNET_HDR, "
        "super-packets pass whole, into the tunnel through the agent's kernel vxlan device (tunnel offload); "
        "`--ring-mode latency` (the default: TPACKET_V2, each frame handed over as it lands) and "
        "`--ring-mode batch` (TPACKET_V3 blocks, at most 1 ms late). Ratios: egresscore / kernel.",
        "",
        "| path | metric | Linux kernel | egresscore latency | ratio | egresscore batch | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, _, _ in PATHS:
        k = res["kernel"][label]
        for key, name, fmt in METRICS:
            cells = [fmt.format(k[key])]
            for side in SIDES[1:]:
                e = res[side][label][key]
                cells += [fmt.format(e), f"{e / k[key]:.2f}" if k[key] else "nan"]
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path):
    """Bar chart of the last run (matplotlib, the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _, _ in PATHS]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(16, 3.6))
    xs = list(range(len(labels)))
    for ax, (key, title, _) in zip(axes, METRICS):
        for i, side in enumerate(SIDES):
            ax.bar([x + (i - 1) * 0.27 for x in xs], [LAST[side][lb][key] for lb in labels], 0.27,
                   label="Linux kernel" if side == "kernel" else side)
        ax.set_xticks(xs)
        ax.set_xticklabels(["egress gateway" if "gateway" in lb else "masquerade" for lb in labels])
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run of each measurement")
    parser.add_argument("--plot", metavar="FILE", help="also write a bar chart (matplotlib)")
    args = parser.parse_args(argv)
    try:
        from compare import machine_summary

        print(machine_summary())
    except ImportError:
        pass
    print(run(quick=args.quick))
    if args.plot and LAST:
        plot(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
