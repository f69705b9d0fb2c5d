"""Failover gap: SIGKILL of the gateway's agent while app1 streams UDP, gateway health on vs off.

The lab with the HA sample policy (examples/egress-ha.yaml: node3 and node4
match, node3 is first by name); one `egresscore agent` process on node1,
node3 and node4.  Each kill: app1 streams one datagram every 10 ms to
203.0.113.10, node3's agent gets SIGKILL, and the gap is the time from the
kill to the first datagram the server sees from node4's address; node3's
agent is started again and the next kill waits until node1 and node4 see it
up.  Side by side, in the same lab: the agents with --gateway-health=off
(Cilium's choice: the first matching node by name, never re-chosen).
Needs root:
    python benchmarks/compare_failover.py [--kills 10] [--quick]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

HA_POLICY = os.path.join(os.path.dirname(HERE), "examples", "egress-ha.yaml")


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _run_side(lab, cluster_file, kills, health):
    from egresscore.control import ControlClient, default_socket_path
    from egresscore.demo import AgentProcess
    from egresscore.lab.ha import stream_through_failover

    extra = ("--gateway-health", "on" if health else "off")
    start = {n: (lambda n=n: lab.track(AgentProcess(n, cluster_file, HA_POLICY, lab.nodes[n].ns,
                                                    extra_args=extra)))
             for n in ("node1", "node3", "node4")}
    procs = {n: make() for n, make in start.items()}

    def all_up():
        try:
            return all(not ControlClient(default_socket_path(n, lab.nodes[n].ns)).call("gateway_health")["down"]
                       for n in ("node1", "node4"))
        except Exception:  # noqa: BLE001 - an agent still starting
            return False

    gaps, lost = [], []
    try:
        for _ in range(kills):
            if not _wait(all_up, 10):
                raise RuntimeError("node3 not up again on node1 and node4 within 10 s")

            def kill():
                procs["node3"].proc.kill()
                t = time.monotonic()
                procs["node3"].proc.wait(5)
                return t

            f = stream_through_failover(lab, kill, before=0.5, after=2.0 if health else 3.0)
            gaps.append(f.gap)
            lost.append(f.lost)
            procs["node3"] = start["node3"]()
            if not health:
                break           # no failover to time: one run says it
    finally:
        for p in procs.values():
            p.stop()
    return gaps, lost


def run(kills=10):
    if os.geteuid() != 0:
        return "### Failover gap (lab)\n\nskipped: needs root (network namespaces)\n"
    import yaml

    from egresscore.lab import Lab

    with tempfile.TemporaryDirectory(prefix="egc-failover-") as tmp, Lab(tag="failover") as lab:
        cluster_file = os.path.join(tmp, "cluster.yaml")
        with open(cluster_file, "w") as f:
            yaml.safe_dump(lab.cluster(), f)
        on, on_lost = _run_side(lab, cluster_file, kills, True)
        off, _ = _run_side(lab, cluster_file, 1, False)
    ok = [g for g in on if g is not None]
    lines = ["### Failover gap (lab): SIGKILL of node3's agent, app1 streaming UDP every 10 ms", "",
             f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; probes every 0.1 s, down after 3 "
             "missed rounds", "",
             "| agents | kills | failed over | gap median (ms) | gap max (ms) | datagrams lost (median) |",
             "|---|---|---|---|---|---|"]
    if ok:
        lines.append(f"| egresscore, gateway health on | {len(on)} | {len(ok)} | "
                     f"{statistics.median(ok) * 1000:.0f} | {max(ok) * 1000:.0f} | {statistics.median(on_lost):.0f} |")
    else:
        lines.append(f"| egresscore, gateway health on | {len(on)} | 0 | - | - | - |")
    lines.append(f"| egresscore, --gateway-health=off (Cilium's choice) | {len(off)} | "
                 f"{sum(g is not None for g in off)} | never (3 s watched) | - | all after the kill |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="3 kills")
    args = ap.parse_args()
    print(run(3 if args.quick else args.kills))


if __name__ == "__main__":
    main()
