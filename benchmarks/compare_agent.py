"""egresscore agents versus the Linux kernel's own egress datapath, same lab, one run.

The lab is built once.  First the kernel baseline (vxlan devices + policy
routing + nftables SNAT/masquerade, with the veths' default offloads: GSO
super-packets cross the whole path), then the same nodes with the kernel
datapath removed and one `egresscore agent` process per node (offloads left
on: the agents' rings take super-packets whole, and hand tunnel-bound ones to
their kernel vxlan device, the tunnel offload).  From a pod to an external server:
small-packet UDP rate (18-byte payloads, one Python sender, bounded time,
rate received by the server) and iperf3 TCP with 1 and 4 streams.  Paths:
app1 -> 203.0.113.10 (VXLAN to node3, SNAT to the egress IP) and app2 ->
203.0.113.10 (per-node masquerade).  Median of several runs.  Needs root:
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
METRICS = (("udp_pps", "small UDP (pkt/s)", "{:,.0f}"), ("tcp1_gbps", "TCP 1 stream (Gbit/s)", "{:.2f}"),
           ("tcp4_gbps", "TCP 4 streams (Gbit/s)", "{:.2f}"))


def _medians(samples):
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def run(quick: bool = False) -> str:
    reason = _skip_reason()
    if reason:
        return f"### egresscore agents vs the Linux kernel (lab)\n\nskipped: {reason}\n"
    from egresscore.agent import prepare_lab
    from egresscore.demo import SAMPLE, start_agents
    from egresscore.lab import Lab

    reps = 1 if quick else 3
    udp_s = 1.0 if quick else 2.0
    tcp_s = 1 if quick else 2
    load = load_average()
    res = {"kernel": {}, "egresscore": {}}
    with tempfile.TemporaryDirectory(prefix="egc-bench-") as tmp, Lab(datapath="kernel", tag="bagent") as lab:
        for label, pod, dst in PATHS:
            res["kernel"][label] = _medians([measure_once(lab, pod, dst, udp_s, tcp_s) for _ in range(reps)])
        lab.remove_kernel_egress()
        lab.set_masquerade(False)
        prepare_lab(lab)
        _, agents = start_agents(lab, SAMPLE, tmp)
        try:
            for label, pod, dst in PATHS:
                lab.ping(pod, dst, count=1)  # neighbours warm
                res["egresscore"][label] = _medians([measure_once(lab, pod, dst, udp_s, tcp_s) for _ in range(reps)])
        finally:
            for a in agents.values():
                a.stop()
    LAST.clear()
    LAST.update(res)
    lines = [
        "### egresscore agents vs the Linux kernel datapath (same lab, one run)",
        "",
        f"Small UDP: {PAYLOAD}-byte payloads, one sender, {udp_s} s, rate received. TCP: iperf3 {tcp_s} s. "
        f"Median of {reps} run(s). Load average at start {load:.1f} on {os.cpu_count()} cores. "
        "Kernel: default veth offloads (GSO end to end). egresscore: TPACKET_V2 RX slots, PACKET_VNET_HDR; "
        "super-packets pass whole, into the tunnel through the agent's kernel vxlan device (tunnel offload).",
        "",
        "| path | metric | Linux kernel | egresscore | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for label, _, _ in PATHS:
        k, e = res["kernel"][label], res["egresscore"][label]
        for key, name, fmt in METRICS:
            ratio = e[key] / k[key] if k[key] else float("nan")
            lines.append(f"| {label} | {name} | {fmt.format(k[key])} | {fmt.format(e[key])} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def plot(path):
    """Bar chart of the last run (matplotlib, the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _, _ in PATHS]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    xs = list(range(len(labels)))
    for ax, (key, title, _) in zip(axes, METRICS):
        ax.bar([x - 0.2 for x in xs], [LAST["kernel"][lb][key] for lb in labels], 0.4, label="Linux kernel")
        ax.bar([x + 0.2 for x in xs], [LAST["egresscore"][lb][key] for lb in labels], 0.4, label="egresscore")
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
