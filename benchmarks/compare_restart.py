"""Hitless restart stall: SIGKILL of an agent mid-transfer, then a new one, NAT state kept vs off.

The lab of tests/test_restart_e2e.py: real `egresscore agent` processes on
node1 (the pods' node) and node3 (the gateway, SNAT to 192.168.1.3), the
seed policy.  Each run (egresscore.lab.restart.flows_through_restart): from
app1, a paced download, a paced upload, a UDP echo stream and a download
from a pod port outside the NAT range, all at once for 7 s; 1.5 s in, one
agent gets SIGKILL and a new one is started on the same node (restart()
returns when it says "ready").  The stall of a flow is the longest gap
between two arrivals; a flow survived when it moved everything intact
through the same egress address and port.  Kills of node3's agent, then of
node1's.  Side by side in the same lab, the agents run with
`--no-nat-state` (the table in process memory: a new agent starts empty),
the same kills.
Needs root:
    python benchmarks/compare_restart.py [--runs 10] [--off-runs 3] [--quick]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

EGRESS_IP = "192.168.1.3"
FLOWS = ("download", "upload", "udp", "oor")
NODES = ("node1", "node3")


def _ready(lab, timeout=5.0):
    """A request through node3 gets the egress IP (the agents forward)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if lab.tcp_request("app1", "203.0.113.10", timeout=1.0) == EGRESS_IP:
                return True
        except (OSError, ConnectionError, RuntimeError):
            pass
        time.sleep(0.1)
    return False


def _side(lab, cluster, policy, runs, state):
    """{node: [Restart]} for `runs` kills of each node's agent; state: NAT state kept (default) or off."""
    from egresscore.demo import AgentProcess
    from egresscore.lab.restart import agent_restart, flows_through_restart

    extra = () if state else ("--no-nat-state",)

    def start(name):
        return lab.track(AgentProcess(name, cluster, policy, lab.nodes[name].ns, extra_args=extra))

    agents = {name: start(name) for name in NODES}
    out = {name: [] for name in NODES}
    try:
        for name in NODES:
            for _ in range(runs):
                if not _ready(lab):
                    raise RuntimeError("no request through node3 within 5 s")
                out[name].append(flows_through_restart(lab, agent_restart(agents, name, start, "kill")))
    finally:
        for a in agents.values():
            a.stop()       # SIGTERM without --keep-state: claims and state file removed
    return out


def _stat(rs, flow):
    ok = [r.flows[flow] for r in rs if r.flows[flow].ok and r.flows[flow].stall is not None]
    if not ok:
        return f"0 of {len(rs)} survived"
    stalls = [f.stall for f in ok]
    return f"{statistics.median(stalls) * 1000:.0f} / {max(stalls) * 1000:.0f} ms ({len(ok)} of {len(rs)})"


def _same_port(rs, flow):
    """Runs in which the server saw the flow from one (egress IP, port) only."""
    return sum(1 for r in rs if len(r.flows[flow].seen) == 1 and next(iter(r.flows[flow].seen))[0] == EGRESS_IP)


def run(runs=10, off_runs=3):
    if os.geteuid() != 0:
        return "### Hitless restart (lab)\n\nskipped: needs root (network namespaces)\n"
    import yaml

    from egresscore.lab import Lab
    from egresscore.lab.kernel import SAMPLE_POLICY

    with tempfile.TemporaryDirectory() as work, Lab(tag="rb") as lab:
        cluster, policy = os.path.join(work, "cluster.yaml"), os.path.join(work, "policy.yaml")
        with open(cluster, "w") as f:
            yaml.safe_dump(lab.cluster(), f)
        with open(policy, "w") as f:
            yaml.safe_dump(SAMPLE_POLICY, f)
        lab.servers_ = lab.start_servers()
        on = _side(lab, cluster, policy, runs, True)
        off = _side(lab, cluster, policy, off_runs, False)
    lines = [f"### Hitless restart: SIGKILL of an agent mid-transfer, then a new one; {runs} runs "
             f"(NAT state off: {off_runs})", "",
             "Stall (longest gap between arrivals) median / max, and in how many runs the flow survived "
             "(every byte, sha256 equal, one egress address and port):", "",
             "| agent killed | NAT state | agent back in, median / max | download | upload | UDP echo stream | "
             "download from a pod port outside the NAT range |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in NODES:
        for label, rs in (("kept (default)", on[name]), ("off (`--no-nat-state`)", off[name])):
            back = [r.ready_at - r.restarted_at for r in rs]
            lines.append(f"| {name} | {label} | {statistics.median(back) * 1000:.0f} / {max(back) * 1000:.0f} ms | "
                         + " | ".join(_stat(rs, fl) for fl in FLOWS) + " |")
    lines += ["", "Flows seen by the server from one egress address and port only, runs: " + "; ".join(
        f"{name} {label}: " + ", ".join(f"{fl} {_same_port(rs, fl)}/{len(rs)}" for fl in FLOWS)
        for name in NODES for label, rs in (("kept", on[name]), ("off", off[name])))]
    broken = [(name, r.flows[fl].detail) for name in NODES for r in off[name] for fl in FLOWS if not r.flows[fl].ok]
    if broken:
        lines += ["", f"State off, what a broken flow looked like (first): {broken[0][0]}: {broken[0][1]}"]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--off-runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 runs, 1 with the NAT state off")
    args = ap.parse_args()
    from compare import machine_summary

    print(machine_summary())
    print(run(2, 1) if args.quick else run(args.runs, args.off_runs))
