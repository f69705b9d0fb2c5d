"""Stateful failover stall: SIGKILL of the active gateway's agent mid-transfer, replication on vs off.

The lab.  Replication on: examples/egress-ha-stateful.yaml (the floating
egress IP 192.168.1.120, held by node3, replicated to node4), node3 an
`egresscore agent --stateful-failover` process, node1 and node4 in-process
Agents with stateful_failover=True.  Each run: app1 downloads and uploads
20 MB paced at 5 MB/s each and opens a new UDP flow every 5 ms; 1.5 s in,
node3's agent gets SIGKILL; the stall is the longest pause of each transfer
(egresscore.lab.stateful), the window the lost fraction of the flows opened
in the last moments before the kill.  node3's agent is started again and
the next run waits until node4 stands by for it, synced.  Side by side in
the same lab, replication off: examples/egress-ha.yaml (each gateway SNATs
to its own address, as Cilium would), the same kill.
Needs root:
    python benchmarks/compare_failover_stateful.py [--runs 10] [--quick]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

ROOT = os.path.dirname(HERE)
STATEFUL = os.path.join(ROOT, "examples", "egress-ha-stateful.yaml")
PLAIN = os.path.join(ROOT, "examples", "egress-ha.yaml")
NODE3 = "192.168.1.3"


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _side(lab, cluster_file, runs, stateful):
    from egresscore import Agent
    from egresscore.demo import AgentProcess
    from egresscore.lab import stateful as st

    policy = STATEFUL if stateful else PLAIN
    extra = ("--stateful-failover",) if stateful else ()
    start3 = lambda: lab.track(AgentProcess("node3", cluster_file, policy, lab.nodes["node3"].ns,  # noqa: E731
                                            extra_args=extra))
    node3 = start3()
    agents = {n: Agent(n, cluster_file, [policy], netns=lab.nodes[n].ns, stateful_failover=stateful)
              for n in ("node1", "node4")}
    for a in agents.values():
        a.start()
    node4 = agents["node4"]
    out = []
    try:
        for _ in range(runs):
            ok = _wait(lambda: all(not a.gateway_health()["down"] for a in agents.values()), 10)
            if stateful:
                ok = ok and _wait(lambda: node4.failover.receiver.synced(NODE3)
                                  and not node4.failover.stats()["resyncs_under_way"]
                                  and node4.failover.standby_for, 10)
            if not ok:
                raise RuntimeError("node3 not up (and node4 not synced to it) within 10 s")

            def kill():
                node3.proc.kill()
                t = time.monotonic()
                node3.proc.wait(5)
                return t

            f = st.transfers_through_failure(lab, kill)
            lag = node4.failover.stats()["lag"] if stateful else {}
            out.append((f, lag))
            node3 = start3()
    finally:
        node3.stop()
        for a in agents.values():
            a.stop()
            a.close()
    return out


def _fmt_stall(fs, key):
    ok = [f for f, _ in fs if f._asdict()[key]["intact"] and not f._asdict()[key]["error"]]
    if not ok:
        return f"0 of {len(fs)} intact"
    stalls = [f._asdict()[key]["stall"] for f in ok]
    return f"{statistics.median(stalls) * 1000:.0f} / {max(stalls) * 1000:.0f} ms ({len(ok)} of {len(fs)} intact)"


def run(runs=10, plain_runs=3):
    if os.geteuid() != 0:
        return "### Stateful failover (lab)\n\nskipped: needs root (network namespaces)\n"
    import yaml

    from egresscore.lab import Lab

    with tempfile.TemporaryDirectory() as work, Lab(tag="hb") as lab:
        cluster_file = os.path.join(work, "cluster.yaml")
        with open(cluster_file, "w") as f:
            yaml.safe_dump(lab.cluster(), f)
        lab.servers_ = lab.start_servers()
        on = _side(lab, cluster_file, runs, True)
        off = _side(lab, cluster_file, plain_runs, False)
    windows = [w for w, _, _ in on[0][0].losses]
    lost = {w: (sum(r[1] for f, _ in on for r in f.losses if r[0] == w),
                sum(r[2] for f, _ in on for r in f.losses if r[0] == w)) for w in windows}
    nan = float("nan")
    p99 = [lag.get("p99_ms") for _, lag in on if lag.get("p99_ms") is not None]
    p50 = [lag.get("p50_ms") for _, lag in on if lag.get("p50_ms") is not None]
    lines = [
        f"### Stateful failover: SIGKILL of node3's agent mid-transfer, {runs} runs (replication off: {plain_runs})",
        "",
        "| | download stall, median / max | upload stall, median / max |",
        "|---|---:|---:|",
        f"| replication on (`--stateful-failover`, floating egress IP) | {_fmt_stall(on, 'download')} | "
        f"{_fmt_stall(on, 'upload')} |",
        f"| replication off (egress-ha.yaml: each gateway its own IP) | {_fmt_stall(off, 'download')} | "
        f"{_fmt_stall(off, 'upload')} |",
        "",
        "UDP flows opened before the kill and lost (their next datagram did not come from the same egress IP "
        "and port), all runs: " + ", ".join(f"last {w * 1000:.0f} ms {lost[w][1]}/{lost[w][0]}" for w in windows)
        + ".",
        f"Replication lag on node4 (flow record written on node3 -> applied on node4), per run: p50 median "
        f"{statistics.median(p50) if p50 else nan:.1f} ms, p99 median "
        f"{statistics.median(p99) if p99 else nan:.1f} ms, p99 max {max(p99) if p99 else nan:.1f} ms.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="3 runs, 1 without replication")
    args = ap.parse_args()
    from compare import machine_summary

    print(machine_summary())
    print(run(3, 1) if args.quick else run(args.runs))
