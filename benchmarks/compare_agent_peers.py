"""The egress gateway path with peer traffic generators: the Linux kernel vs egresscore agents, same lab, one run.

Path: app1 (node1) -> VXLAN -> node3 SNAT to the egress IP -> router ->
203.0.113.10.  Each repetition measures the kernel baseline (vxlan + policy
routing + nftables SNAT, egresscore/lab/kernel.py), then one `egresscore
agent` process per node (default options), taking turns:
- 64-byte UDP flood: trafgen (netsniff-ng) sends a bounded count of one
  60-byte frame from app1's eth0; delivered = rx_packets of the server
  namespace's eth0 (pyroute2), sent = app1's eth0 tx_packets, loss = sent -
  delivered; rate = delivered / trafgen's run time; CPU = machine user +
  system + softirq seconds of all CPUs (/proc/stat) over the run, per
  million delivered packets;
- iperf3 TCP, 1 and 4 streams: received Gbit/s and machine CPU seconds per
  received GB;
- ping (iputils): median and p99 of per-reply round trips at 10 ms interval;
- paced UDP: RATE packets/s of 18-byte payloads (64-byte frames) for
  SECONDS, split over --paced-streams iperf3 -u clients (default 2) run at
  SCHED_FIFO --paced-rt (default 5: ahead of other work on the machine,
  behind the agents' datapath threads at 10); offered = app1's eth0 tx over
  the clients' send time, delivered = the server's eth0 rx, loss = the
  difference (the datapath's loss), iperf3's own receiver count beside it
  (which also counts the drops at the iperf3 servers' sockets).  Why so: one
  iperf3 at normal priority got 31-66 kpps out, not 100 (on the kernel path
  its send carries each packet through the whole path in its own softirq:
  one sender at SCHED_FIFO got 38-42 kpps out, two 100); iperf3 catches up
  after a stall (its rate is an average since the start).  trafgen cannot
  pace: -b sends the second's whole count at full speed and then sleeps
  out the second, and -t sleeps once per packet (17-23 kpps at -t 5-10us).
Median of the repetitions.  --only picks some of the measurements (e.g.
`--only ping,paced`, to keep a run short); --agent-args gives the agents more
options and --also ARGS adds another egresscore column with those options,
measured in the same repetitions (an A/B under the same load).  After each
egresscore paced run the agents' ring counters (kernel drops per interface,
TX ring full), the agents' drop reasons (`stats`) and the kernel's input-backlog drops (/proc/net/softnet_stat,
machine-wide) go into the raw figures (--json), so a loss can be placed; so do the load
average at each repetition (load1) and, per agent, what kept its datapath thread out of its C
loop (agent_loops: the longest GIL wait and time away, the longest GC pass per generation) and
how often its gateway health changed its mind.
Every load is bounded in packets and seconds and stays inside the lab's
namespaces.  /proc/stat counts the whole machine:
other work running meanwhile is counted too (the load average is printed).

--ipv6 adds IPv6 rows (benchmarks/peers_ipv6.py: the dual-stack lab, the
smallest IPv6 UDP flood and one TCP stream over IPv6, on each side in the
same repetitions).

Needs root and trafgen, iperf3, ping, nft (Debian: netsniff-ng iperf3
iputils-ping nftables); says which package is missing and exits 2 otherwise.
    python benchmarks/compare_agent_peers.py [--quick] [--reps N] [--json FILE]
        [--only flood,tcp,ping,paced] [--agent-args "ARGS"] [--also "ARGS"]... [--ipv6]
        [--workers 1,2] [--paced-at 0.5,0.8,1] [--plot FILE.png]
    python benchmarks/compare_agent_peers.py --from-json FILE [--plot FILE.png]

--workers 1,2 measures the agents with one datapath worker and with two
(agent --workers 2: a second column in the same repetitions).

--paced-at 0.5,0.8,1 paces the UDP stream at those fractions of the rate the
kernel delivered in the same repetition's flood (so "at any rate the kernel
delivers without loss" is asked at 50, 80 and 100% of it), each side in turn,
instead of the fixed 100 kpps; the offered rate is what the clients got out
(more --paced-streams get more out).
"""
import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's egresscore

# tool -> the Debian package that provides it
TOOLS = {"trafgen": "netsniff-ng", "iperf3": "iperf3", "ping": "iputils-ping", "nft": "nftables"}
POD, SERVER, DST = "app1", "ext1", "203.0.113.10"
FLOOD_SPORT, FLOOD_DPORT = 40000, 9
PAYLOAD = 18  # bytes of UDP payload: 64-byte frames with FCS
SIDES = ("kernel", "egresscore")  # and one "egresscore ARGS" per --also
PARTS = ("flood", "tcp", "ping", "paced")
PACED_STREAMS = 2  # iperf3 clients the paced rate is split over (one sender cannot offer 100 kpps)
PACED_RT_PRIORITY = 5  # their SCHED_FIFO priority: above other work, below the agents' datapath threads (10)
LAST = {}  # the last run's raw figures

# (key, label, format, lower is better)
METRICS = (
    ("flood_kpps", "64-byte UDP flood (trafgen): delivered kpps", "{:,.1f}", False),
    ("flood_loss_pct", "64-byte UDP flood: loss (sent - delivered) %", "{:.1f}", True),
    ("flood_cpu_per_mpkt", "64-byte UDP flood: machine CPU s per M delivered", "{:.2f}", True),
    ("tcp1_gbps", "iperf3 TCP 1 stream: Gbit/s", "{:.2f}", False),
    ("tcp1_cpu_per_gb", "iperf3 TCP 1 stream: machine CPU s per GB", "{:.2f}", True),
    ("tcp4_gbps", "iperf3 TCP 4 streams: Gbit/s", "{:.2f}", False),
    ("tcp4_cpu_per_gb", "iperf3 TCP 4 streams: machine CPU s per GB", "{:.2f}", True),
    ("ping_median_ms", "ping RTT median (ms)", "{:.3f}", True),
    ("ping_p99_ms", "ping RTT p99 (ms)", "{:.3f}", True),
    ("ping_lost", "ping replies missing", "{:.0f}", True),
    ("iperf3u_sent", "paced UDP (iperf3 -u): sent (app1's eth0 tx)", "{:,.0f}", False),
    ("iperf3u_sent_kpps", "paced UDP (iperf3 -u): sent kpps (offered)", "{:,.1f}", False),
    ("iperf3u_delivered", "paced UDP (iperf3 -u): delivered (the server's eth0 rx)", "{:,.0f}", False),
    ("iperf3u_lost_if", "paced UDP (iperf3 -u): lost packets (sent - delivered, interface counters)", "{:,.0f}",
     True),
    ("iperf3u_loss_if_pct", "paced UDP (iperf3 -u): loss % (interface counters)", "{:.3f}", True),
    ("iperf3u_loss_pct", "paced UDP (iperf3 -u): loss % seen by iperf3 (its socket drops too)", "{:.3f}", True),
    ("iperf3u_cpu_per_mpkt", "paced UDP: machine CPU s per M delivered (sender included)", "{:.2f}", True),
)


# issue 17's targets, as egresscore / kernel ratios: (key, "<=" or ">=", bound)
TARGETS = (
    ("flood_cpu_per_mpkt", "<=", 1.2),
    ("tcp1_gbps", ">=", 0.8), ("tcp4_gbps", ">=", 0.8),
    ("tcp1_cpu_per_gb", "<=", 1.5), ("tcp4_cpu_per_gb", "<=", 1.5),
    ("ping_median_ms", "<=", 3.0), ("ping_p99_ms", "<=", 2.0),
)


def target_lines(med, p):
    """Which of issue 17's targets each egresscore column meets in this run (ratios to the kernel's
    medians; paced: no loss wherever the kernel lost none)."""
    k = med["kernel"]
    out = []
    for side in list(med)[1:]:
        got = []
        for key, op, bound in TARGETS:
            if key in k and k[key]:
                r = med[side][key] / k[key]
                ok = r <= bound if op == "<=" else r >= bound
                got.append(f"{key} {r:.2f} ({op} {bound:g}: {'met' if ok else 'not met'})")
        for key in paced_keys(p):
            loss = key + "_lost_if"
            if loss in k and k[loss] <= 0:  # -1: a frame more arrived than was counted sent (not a loss)
                lost = max(0, med[side][loss])
                got.append(f"{key} loss {lost:,.0f} (0: {'met' if lost == 0 else 'not met'})")
        out.append(f"- {side}: " + "; ".join(got))
    return ["", "Issue 17 targets (egresscore / kernel, medians of this run):", *out] if out else []


def plot(path, med, p):
    """Bar chart of each egresscore column's ratio to the kernel per metric, the targets marked
    (matplotlib, the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bounds = {key: bound for key, _, bound in TARGETS}
    keys = [key for key, *_ in TARGETS if key in med["kernel"] and med["kernel"][key]]
    keys += [key for key, *_ in METRICS if key in ("flood_kpps",) and key in med["kernel"]]
    sides = list(med)[1:]
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * len(keys) * max(1, len(sides))))
    height = 0.8 / max(1, len(sides))
    for i, side in enumerate(sides):
        ax.barh([y + i * height for y in range(len(keys))],
                [med[side][key] / med["kernel"][key] for key in keys], height, label=side)
    for y, key in enumerate(keys):
        if key in bounds:
            ax.plot([bounds[key]] * 2, [y - height / 2, y + (len(sides) - 0.5) * height], color="black", linewidth=2)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yticks([y + (len(sides) - 1) * height / 2 for y in range(len(keys))])
    ax.set_yticklabels(keys)
    ax.invert_yaxis()
    ax.set_xlabel("egresscore / Linux kernel (same run; black: issue 17 target)")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def missing_tools():
    """{tool: Debian package} for every tool this benchmark needs and cannot find."""
    return {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}


def skip_reason():
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = missing_tools()
    if missing:
        return (f"missing {', '.join(sorted(missing))}: apt-get install "
                f"{' '.join(sorted(set(missing.values())))}")
    return None


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "load_average": os.getloadavg()[0]}


def _counters(lab):
    from egresscore.lab import traffic

    return lab.call(POD, traffic.link_counters, "eth0"), lab.call(SERVER, traffic.link_counters, "eth0")


def flood(lab, count, seconds, pps=None, key="flood", frame=None):
    """trafgen sends `count` copies of `frame` (default: the 64-byte IPv4 one; at most
    `seconds`; paced at `pps` if given); delivery counted at the server's eth0."""
    from egresscore.lab import traffic

    pod = lab.pods[POD]
    if frame is None:
        frame = traffic.udp_frame(pod.mac, pod.host_mac, pod.ip, DST, FLOOD_SPORT, FLOOD_DPORT, PAYLOAD)
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", prefix="egc-bench-trafgen-") as cfg:
        cfg.write(traffic.trafgen_config(frame))
        cfg.flush()
        argv = ["timeout", str(seconds), "trafgen", "-o", pod.ifname, "-i", cfg.name, "-n", str(count),
                "-P", "1", "--no-sock-mem", "--notouch-irq"] + (["-b", f"{pps}pps"] if pps else [])
        (tx0, rx0), cpu0, t0 = _counters(lab), traffic.cpu_seconds(), time.perf_counter()
        out = lab.run(POD, argv, timeout=seconds + 10, check=False)
        elapsed = time.perf_counter() - t0
        time.sleep(0.3)  # frames still in flight through the agents
        cpu, (tx1, rx1) = traffic.cpu_seconds() - cpu0, _counters(lab)
    if out.returncode not in (0, 124):  # 124: stopped by timeout, still bounded
        raise RuntimeError(f"trafgen ({key}) failed ({out.returncode}): {out.stderr.strip()[-300:]}")
    sent, delivered = tx1[1] - tx0[1], rx1[0] - rx0[0]
    return {f"{key}_sent": sent, f"{key}_delivered": delivered, f"{key}_lost": sent - delivered,
            f"{key}_seconds": elapsed, f"{key}_cpu_seconds": cpu, f"{key}_kpps": delivered / elapsed / 1e3,
            f"{key}_sent_kpps": sent / elapsed / 1e3,
            f"{key}_loss_pct": 100.0 * (sent - delivered) / sent if sent else float("nan"),
            f"{key}_cpu_per_mpkt": cpu / delivered * 1e6 if delivered else float("nan")}


def tcp(lab, streams, seconds, key, dst=DST, extra=()):
    """iperf3 TCP to `dst`: received Gbit/s and machine CPU seconds per received GB."""
    from egresscore.lab import traffic

    with lab.iperf3_server(dst):
        cpu0 = traffic.cpu_seconds()
        res = lab.iperf3_client(POD, dst, ["-t", seconds, "-P", streams, *extra], seconds)
        cpu = traffic.cpu_seconds() - cpu0
    got = res["end"]["sum_received"]
    per_gb = cpu / (got["bytes"] / 1e9) if got["bytes"] else float("nan")
    return {f"{key}_gbps": got["bits_per_second"] / 1e9, f"{key}_bytes": got["bytes"],
            f"{key}_cpu_seconds": cpu, f"{key}_cpu_per_gb": per_gb}


def ping(lab, count):
    """iputils ping at 10 ms: median and p99 of the per-reply round trips (ms)."""
    from egresscore.lab import traffic

    out = lab.run(POD, ["ping", "-n", "-i", "0.01", "-W", "1", "-c", str(count), DST],
                  timeout=count * 0.01 + 30, check=False)
    times = traffic.ping_times(out.stdout)
    if len(times) < 2:
        raise RuntimeError(f"ping from {POD} to {DST}: {len(times)} replies ({out.stderr.strip()[-200:]})")
    return {"ping_count": count, "ping_replies": len(times), "ping_lost": count - len(times),
            "ping_median_ms": statistics.median(times), "ping_p99_ms": statistics.quantiles(times, n=100)[98],
            "ping_max_ms": max(times),
            # where the tail lies (start-up or spread over the run): the 10 slowest, (reply index, ms)
            "ping_slowest": sorted(enumerate(times), key=lambda x: -x[1])[:10]}


def paced_iperf3(lab, pps, seconds, streams=PACED_STREAMS, rt_priority=PACED_RT_PRIORITY):
    """`streams` iperf3 UDP clients in parallel, each paced at pps/streams 18-byte datagrams/s
    for `seconds` (ports 5201.., one one-shot server each), under SCHED_FIFO `rt_priority`
    (chrt; 0: normal scheduling).  Offered = app1's eth0 tx over the run; delivered = the
    server's eth0 rx; iperf3's own receiver count beside them (its socket drops too)."""
    from egresscore.lab import traffic

    rate = pps // streams * PAYLOAD * 8  # bit/s of payload per stream
    prefix = ["chrt", "-f", str(rt_priority)] if rt_priority else []
    with contextlib.ExitStack() as stack:
        for k in range(streams):
            stack.enter_context(lab.iperf3_server(DST, 5201 + k))
        (tx0, rx0), cpu0, t0 = _counters(lab), traffic.cpu_seconds(), time.perf_counter()
        procs = [lab.popen(POD, prefix + ["iperf3", "-c", DST, "-p", str(5201 + k), "-u", "-l", str(PAYLOAD),
                                          "-b", str(rate), "-t", str(seconds), "-w", "4M", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k in range(streams)]
        outs = [proc.communicate(timeout=seconds + 20)[0] for proc in procs]
        elapsed = time.perf_counter() - t0
        time.sleep(0.3)  # datagrams still in flight through the agents
        (tx1, rx1), cpu = _counters(lab), traffic.cpu_seconds() - cpu0
    ends = []
    for out in outs:
        try:
            ends.append(json.loads(out)["end"]["sum"])
        except (ValueError, KeyError):
            raise RuntimeError(f"paced iperf3 from {POD} gave no result: {out.strip()[-200:]}") from None
    packets, lost = sum(e["packets"] for e in ends), sum(e["lost_packets"] for e in ends)
    duration = max(e["seconds"] for e in ends)  # the clients' own send time
    sent, delivered = tx1[1] - tx0[1], rx1[0] - rx0[0]
    return {"iperf3u_streams": streams, "iperf3u_rt_priority": rt_priority, "iperf3u_seconds": duration,
            "iperf3u_wall_seconds": elapsed, "iperf3u_packets": packets, "iperf3u_lost": lost,
            "iperf3u_loss_pct": 100.0 * lost / packets if packets else float("nan"),
            "iperf3u_sent": sent, "iperf3u_delivered": delivered,
            "iperf3u_sent_kpps": sent / duration / 1e3,
            "iperf3u_lost_if": sent - delivered,
            "iperf3u_loss_if_pct": 100.0 * (sent - delivered) / max(1, sent),
            "iperf3u_cpu_seconds": cpu,
            "iperf3u_cpu_per_mpkt": cpu / delivered * 1e6 if delivered else float("nan")}


def _agent_stats(lab, agents):
    """{node: its agent's `stats` reply} over each agent's control socket (nodes that do not answer left out)."""
    from egresscore.control import ControlClient, ControlError, default_socket_path

    out = {}
    for name, node in lab.nodes.items():
        if name not in agents:
            continue
        try:
            out[name] = ControlClient(default_socket_path(name, node.ns), timeout=5).call("stats")
        except ControlError:
            continue
    return out


def agent_drops(lab, agents):
    """{node: {drop reason: frames}} from each agent's `stats` (where the datapath itself dropped)."""
    return {name: {reason: n for reason, n in st["drops"].items() if isinstance(n, int)}
            for name, st in _agent_stats(lab, agents).items() if isinstance(st.get("drops"), dict)}


def _drops_delta(before, after):
    """{"node/reason": frames} that grew over the run."""
    return {f"{node}/{reason}": n - before.get(node, {}).get(reason, 0)
            for node, drops in after.items() for reason, n in drops.items()
            if n != before.get(node, {}).get(reason, 0)}


def ring_counters(lab, agents):
    """{node: {interface: (kernel drops, tx full, tx frames, tx flushes)}} from each agent's control socket."""
    return {name: {ifname: (r["kernel_drops"], r["tx_full"], r["tx_frames"], r["tx_flushes"])
                   for ifname, r in st["rings"].items()}
            for name, st in _agent_stats(lab, agents).items() if isinstance(st.get("rings"), dict)}


def softnet_dropped():
    """Frames the kernel dropped at its per-CPU input backlogs (netdev_max_backlog), all CPUs:
    /proc/net/softnet_stat's second column (machine-wide, not per namespace)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


def _ring_delta(before, after):
    """Each interface's counts over the run: {"node/if": [drops, tx full, tx frames, tx flushes]}
    (frames / flushes: frames sent per TX kick, about the frames taken per wake-up)."""
    out = {}
    for node, rings in after.items():
        for ifname, now in rings.items():
            then = before.get(node, {}).get(ifname, (0, 0, 0, 0))
            out[f"{node}/{ifname}"] = [a - b for a, b in zip(now, then)]
    return out


def agent_loops(lab, agents):
    """{node: what kept its datapath thread out of its C loop, and its gateway-health changes}
    (`stats`: datapath_loop's GIL wait / time away, python_gc's longest passes)."""
    out = {}
    for name, st in _agent_stats(lab, agents).items():
        loop, gc = st.get("datapath_loop") or {}, st.get("python_gc") or {}
        out[name] = {"gil_wait_max_us": loop.get("gil_wait_max_us"), "away_max_us": loop.get("away_max_us"),
                     "away_long": loop.get("away_long"), "gc_max_ms": gc.get("max_ms"),
                     "health_changes": (st.get("gateway_health") or {}).get("changes")}
    return out


def paced_key(fraction):
    """The figures' key prefix for a stream paced at `fraction` of the kernel's flood rate."""
    return f"iperf3u{round(fraction * 100)}"


def paced(lab, p, agents, pps, key="iperf3u"):
    """paced_iperf3 at `pps`, with where a loss was placed (the agents' rings and drop reasons,
    the kernel's input backlogs); the figures' "iperf3u" prefix becomes `key`."""
    before, backlog = ring_counters(lab, agents) if agents else {}, softnet_dropped()
    drops = agent_drops(lab, agents) if agents else {}
    out = paced_iperf3(lab, pps, p["paced_seconds"], p["paced_streams"], p["paced_rt"])
    out["iperf3u_pps"] = pps
    out["iperf3u_backlog_drops"] = softnet_dropped() - backlog
    if agents:
        out["iperf3u_ring_drops"] = _ring_delta(before, ring_counters(lab, agents))
        out["iperf3u_agent_drops"] = _drops_delta(drops, agent_drops(lab, agents))
    return {key + k[len("iperf3u"):]: v for k, v in out.items()}


def measure(lab, p, agents=None, kernel_kpps=None):
    """One side's figures; `kernel_kpps`: the kernel's flood rate in this repetition (None: this is
    the kernel's turn), which --paced-at paces against."""
    out = {"load1": os.getloadavg()[0]}
    parts = p["parts"]
    if p.get("ipv6"):  # the IPv6 rows (issue 18), kept in peers_ipv6.py
        import peers_ipv6

        out.update(peers_ipv6.measure6(lab, p, flood, tcp))
    if "flood" in parts:
        out.update(flood(lab, p["flood_packets"], p["flood_seconds"]))
    if "tcp" in parts:
        out.update(tcp(lab, 1, p["tcp_seconds"], "tcp1"))
        out.update(tcp(lab, 4, p["tcp_seconds"], "tcp4"))
    if "ping" in parts:
        out.update(ping(lab, p["ping_count"]))
    if "paced" in parts and not p["paced_at"]:
        out.update(paced(lab, p, agents, p["paced_pps"]))
    elif "paced" in parts:  # fractions of the kernel's flood rate, this repetition's
        ref_kpps = out["flood_kpps"] if kernel_kpps is None else kernel_kpps
        for fraction in p["paced_at"]:
            pps = max(p["paced_streams"], round(fraction * ref_kpps * 1e3))
            out.update(paced(lab, p, agents, pps, paced_key(fraction)))
    if agents:
        out["agent_loops"] = agent_loops(lab, agents)
    return out


def params(quick, reps=None, parts=PARTS, paced_streams=PACED_STREAMS, paced_rt=PACED_RT_PRIORITY, paced_at=()):
    if quick:
        p = dict(reps=1, flood_packets=300_000, flood_seconds=10, tcp_seconds=2, ping_count=200,
                 paced_pps=100_000, paced_seconds=3)
    else:
        p = dict(reps=3, flood_packets=2_000_000, flood_seconds=30, tcp_seconds=5, ping_count=1000,
                 paced_pps=100_000, paced_seconds=10)
    if reps:
        p["reps"] = reps
    p["paced_streams"], p["paced_rt"] = paced_streams, paced_rt
    p["paced_at"] = tuple(paced_at) if "paced" in parts else ()
    p["parts"] = tuple(parts)
    return p


def sides(agent_args=(), also=()):
    """{side name: the agents' extra options (None: the kernel)}."""
    out = {"kernel": None, "egresscore": list(agent_args)}
    for args in also:
        out[f"egresscore {' '.join(args)}"] = list(args)
    return out


def collect(p, variants):
    """Run the repetitions; {side: [figures of each repetition]}."""
    from egresscore.demo import SAMPLE, SAMPLE_DUAL, start_agents
    from egresscore.lab import Lab
    from egresscore.lab.kernel import SAMPLE_POLICY, SAMPLE_POLICY_DUAL

    samples = {side: [] for side in variants}
    ipv6 = bool(p.get("ipv6"))
    policy, policy_file = (SAMPLE_POLICY_DUAL, SAMPLE_DUAL) if ipv6 else (SAMPLE_POLICY, SAMPLE)
    with tempfile.TemporaryDirectory(prefix="egc-bench-") as tmp, \
            Lab(datapath="kernel", tag="bpeers", ipv6=ipv6) as lab:
        for rep in range(p["reps"]):
            if rep:
                lab.install_kernel_egress([policy])  # masquerade included
            lab.ping(POD, DST, count=1)  # neighbours resolved
            samples["kernel"].append(measure(lab, p))
            lab.remove_kernel_egress()
            lab.set_masquerade(False)
            for side, args in variants.items():
                if args is None:
                    continue
                _, agents = start_agents(lab, policy_file, tmp, extra_args=args)
                try:
                    lab.ping(POD, DST, count=1)
                    samples[side].append(measure(lab, p, agents, samples["kernel"][-1].get("flood_kpps")))
                finally:
                    for a in agents.values():
                        a.stop()
    return samples


def _median(values):
    values = list(values)
    return statistics.median(values) if all(isinstance(v, (int, float)) for v in values) else values


def paced_keys(p):
    """The key prefixes of this run's paced streams."""
    return tuple(paced_key(f) for f in p["paced_at"]) or ("iperf3u",)


def paced_metrics(fractions):
    """METRICS with the paced rows once per fraction of the kernel's flood rate."""
    plain = tuple(m for m in METRICS if not m[0].startswith("iperf3u_"))
    return plain + tuple((paced_key(f) + key[len("iperf3u"):], label.replace("paced UDP", f"paced UDP at {f:.0%}"),
                          fmt, lower)
                         for f in fractions for key, label, fmt, lower in METRICS if key.startswith("iperf3u_"))


def table(samples, p, m):
    names = list(samples)
    med = {side: {k: _median(s[k] for s in samples[side]) for k in samples[side][0]} for side in names}
    extra = names[2:]
    lines = [
        "### Egress gateway path with peer generators: Linux kernel vs egresscore (same lab, one run)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}; "
        f"load average {m['load_average']:.1f} at start. Path app1 (node1) -> VXLAN -> node3 SNAT -> "
        f"{DST}. Median of {p['reps']} repetition(s), kernel and egresscore taking turns. "
        f"Flood: trafgen, {p['flood_packets']:,} frames of 64 bytes (at most {p['flood_seconds']} s), "
        f"delivery counted at the server's eth0. TCP: iperf3 {p['tcp_seconds']} s. Ping: "
        f"{p['ping_count']} at 10 ms. Paced UDP: {p['paced_streams']} iperf3 -u clients, "
        + (f"{', '.join(f'{f:.0%}' for f in p['paced_at'])} of the kernel's flood rate in the same repetition "
           if p["paced_at"] else f"{p['paced_pps']:,} pkt/s ")
        + f"of {PAYLOAD}-byte payloads in all for {p['paced_seconds']} s, "
        f"SCHED_FIFO {p['paced_rt']} (0: normal), sent = app1's eth0 tx, "
        f"delivered = the server's eth0 rx. CPU: machine user + system + softirq (/proc/stat), all CPUs."
        + (f" Measured: {', '.join(p['parts'])}." if tuple(p["parts"]) != PARTS else ""),
        "",
        "| metric | Linux kernel | egresscore | egresscore / kernel |" + "".join(f" {s} | ratio |" for s in extra),
        "|---|---:|---:|---:|" + "---:|---:|" * len(extra),
    ]

    def cells(key, fmt, side):
        k, e = med["kernel"][key], med[side][key]
        ratio = f"{e / k:.2f}" if k and "los" not in key else "n/a"  # no ratio of losses
        return f" {fmt.format(e)} | {ratio} |"

    metrics = METRICS
    if p["paced_at"]:
        metrics = paced_metrics(p["paced_at"])
    if p.get("ipv6"):
        import peers_ipv6

        metrics = METRICS + peers_ipv6.METRICS6
    for key, label, fmt, lower in metrics:
        if key not in med["kernel"]:
            continue
        lines.append(f"| {label}{' (lower is better)' if lower else ''} | {fmt.format(med['kernel'][key])} |"
                     + "".join(cells(key, fmt, side) for side in names[1:]))
    each = ("ping_p99_ms",) + tuple(k + "_loss_if_pct" for k in paced_keys(p))
    runs = [f"{side}: {key}: " + ", ".join(f"{s[key]:{fmt[2:-1]}}" for s in samples[side])
            for key, _, fmt, _ in metrics if key in each and key in med["kernel"]
            for side in names]
    if runs and p["reps"] > 1:
        lines += ["", "Each repetition (ping p99 ms, paced loss %): " + "; ".join(runs) + "."]
    placed = [f"{side}: {key}: " + ", ".join(json.dumps(s[key + "_agent_drops"], sort_keys=True)
                                             for s in samples[side])
              for key in paced_keys(p) for side in names[1:] if key + "_agent_drops" in samples[side][0]]
    lines += target_lines(med, p)
    if placed:
        lines += ["", "Paced UDP, the agents' drop reasons per repetition (`stats`): " + "; ".join(placed) + "."]
    return "\n".join(lines) + "\n", med


def run(quick: bool = False, reps=None, json_path=None, parts=PARTS, agent_args=(), also=(),
        paced_streams=PACED_STREAMS, paced_rt=PACED_RT_PRIORITY, ipv6=False, paced_at=()) -> str:
    reason = skip_reason()
    if reason:
        return f"### Egress gateway path with peer generators\n\nskipped: {reason}\n"
    if paced_at and "paced" in parts and "flood" not in parts:
        raise ValueError("--paced-at paces against the kernel's flood rate: --only must include flood")
    p = params(quick, reps, parts, paced_streams, paced_rt, paced_at)
    p["ipv6"] = bool(ipv6)
    m = machine()
    variants = sides(agent_args, also)
    p["agent_args"] = {side: args for side, args in variants.items() if args is not None}
    samples = collect(p, variants)
    text, med = table(samples, p, m)
    LAST.clear()
    LAST.update(machine=m, params=p, samples=samples, medians=med)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(LAST, f, indent=1)
    return text


def _parts(text):
    parts = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"--only takes some of {','.join(PARTS)}, not {text!r}")
    return parts


def _fractions(text):
    try:
        out = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or not all(0 < f <= 2 for f in out):
        raise argparse.ArgumentTypeError(f"fractions in (0, 2], comma-separated, expected, not {text!r}")
    return out


def _workers(text):
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or not all(1 <= n <= 64 for n in counts):
        raise argparse.ArgumentTypeError(f"worker counts 1..64, comma-separated, expected, not {text!r}")
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short repetition of each measurement")
    parser.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="write the raw figures there (default: none; a run leaves no file behind unless asked)")
    parser.add_argument("--only", metavar="PARTS", type=_parts, default=PARTS,
                        help=f"comma-separated measurements among {','.join(PARTS)} (default all)")
    parser.add_argument("--agent-args", metavar="ARGS", type=shlex.split, default=[],
                        help="more `egresscore agent` options for the egresscore side (one string)")
    parser.add_argument("--also", metavar="ARGS", type=shlex.split, action="append", default=[],
                        help="one more egresscore column with these agent options (repeatable)")
    parser.add_argument("--paced-streams", metavar="N", type=int, default=PACED_STREAMS,
                        help="iperf3 clients the paced rate is split over (default %(default)s)")
    parser.add_argument("--paced-rt", metavar="PRIO", type=int, default=PACED_RT_PRIORITY,
                        help="their SCHED_FIFO priority, 0: normal scheduling (default %(default)s, "
                             "below the agents' datapath threads at 10)")
    parser.add_argument("--ipv6", action="store_true",
                        help="a dual-stack lab and IPv6 rows beside the IPv4 ones (benchmarks/peers_ipv6.py)")
    parser.add_argument("--workers", metavar="N[,N...]", type=_workers, default=None,
                        help="the agents' datapath worker counts (agent --workers): the first on the egresscore "
                             "side, each further one an --also column, e.g. 1,2")
    parser.add_argument("--paced-at", metavar="F[,F...]", type=_fractions, default=(),
                        help="pace the UDP stream at these fractions of the kernel's flood rate in the same "
                             "repetition (e.g. 0.5,0.8,1) instead of 100 kpps; needs flood in --only")
    parser.add_argument("--plot", metavar="FILE", help="also write a bar chart of the ratios (matplotlib)")
    parser.add_argument("--from-json", metavar="FILE",
                        help="print the table (and --plot) of a run saved with --json, measuring nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        saved["params"].setdefault("paced_at", ())
        text, med = table(saved["samples"], saved["params"], saved["machine"])
        print(text)
        if args.plot:
            plot(args.plot, med, saved["params"])
        return 0
    if args.paced_at and "paced" in args.only and "flood" not in args.only:
        parser.error("--paced-at paces against the kernel's flood rate: --only must include flood")
    if args.workers:
        first, *more = args.workers
        if first != 1:
            args.agent_args = [*args.agent_args, "--workers", str(first)]
        args.also = [[*args.agent_args, "--workers", str(n)] for n in more] + args.also
    reason = skip_reason()
    if reason:
        print(f"compare_agent_peers: {reason}", file=sys.stderr)
        return 2
    if args.reps is not None and not 1 <= args.reps <= 20:
        parser.error("--reps must be 1..20")
    if not 1 <= args.paced_streams <= 8 or not 0 <= args.paced_rt <= 99:
        parser.error("--paced-streams must be 1..8 and --paced-rt 0..99")
    try:
        print(run(quick=args.quick, reps=args.reps, json_path=args.json, parts=args.only,
                  agent_args=args.agent_args, also=args.also, paced_streams=args.paced_streams,
                  paced_rt=args.paced_rt, ipv6=args.ipv6, paced_at=args.paced_at))
    except subprocess.TimeoutExpired as e:
        print(f"compare_agent_peers: a bounded run overran: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(f"raw figures: {args.json}")
    if args.plot and LAST:
        plot(args.plot, LAST["medians"], LAST["params"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
