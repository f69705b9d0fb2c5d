"""CPU cost of gateway probing at 10, 100 and 1,000 gateways per node (simulated).

In one throwaway network namespace: the simulated gateways are UDP
heartbeat responders bound to 127.0.x.y:4799 (one per gateway, all served by
one selector loop in a separate process, as many agents would be); the
prober is egresscore.health's GatewayHealth + Prober in a process of its
own, at the agent's defaults (10 rounds a second, 3 misses).  Reported: the
prober process's CPU time per wall second (percent of one core), and per
heartbeat sent and answered.  There is no peer to set beside it here (Cilium
OSS does not probe gateways; Antrea's memberlist gossips with a few random
members per round, not with every gateway): the figure is absolute.  Needs root:
    python benchmarks/compare_probing.py [--seconds 5]
"""
import argparse
import os
import resource
import selectors
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

NS = "egc-ctl-probebench"


def _addr(i):
    return f"127.1.{i // 250}.{i % 250 + 1}"


def _responders(n, seconds, ready):
    from egresscore.health import HEARTBEAT_PORT, Responder

    sel = selectors.DefaultSelector()
    socks = [Responder.open_socket(_addr(i), HEARTBEAT_PORT) for i in range(n)]
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    ready.send("ready")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _ in sel.select(0.1):
            s = key.fileobj
            try:
                data, addr = s.recvfrom(64)
            except BlockingIOError:
                continue
            s.sendto(data[:4] + b"\x02" + data[5:], addr)


def _prober(n, seconds):
    """In a child of its own (RUSAGE_SELF counts the prober alone)."""
    from egresscore.health import GatewayHealth, Prober

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    changes = []
    health = GatewayHealth(changes.append, prober=Prober(s), interval=0.1)
    health.set_targets({f"gw{i}": _addr(i) for i in range(n)})
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    health.start()
    time.sleep(seconds)
    health.stop()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return ({"cpu": cpu, "wall": t1 - t0, "sent": health.prober.sent, "received": health.prober.received,
             "down": len(health.down)})


def measure(n, seconds):
    from egresscore.lab import _ns

    parent, child = _ns._fork.Pipe()
    resp = _ns.spawn(NS, _responders, n, seconds + 5, child)
    try:
        if not parent.poll(20) or parent.recv() != "ready":
            raise RuntimeError("responders did not start")
        return _ns.call(NS, _prober, n, seconds, timeout=seconds + 30)
    finally:
        resp.kill()
        resp.join(2)


def run(seconds=5.0):
    if os.geteuid() != 0:
        return "### Probing cost\n\nskipped: needs root (a network namespace)\n"
    from egresscore.lab import _ns

    rows = []
    with _ns.scratch(NS):
        _ns.call(NS, _lo_up)
        for n in (10, 100, 1000):
            m = measure(n, seconds)
            rows.append((n, m))
    lines = ["### Gateway probing cost (simulated gateways on loopback in a namespace)", "",
             f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; 10 rounds/s, {seconds:.0f} s each", "",
             "| gateways | heartbeats/s | answered | CPU (% of one core) | CPU per heartbeat (us) | judged down |",
             "|---|---|---|---|---|---|"]
    for n, m in rows:
        rate = m["sent"] / m["wall"]
        lines.append(f"| {n:,} | {rate:,.0f} | {m['received'] / max(1, m['sent']):.1%} | "
                     f"{100 * m['cpu'] / m['wall']:.1f} | {1e6 * m['cpu'] / max(1, m['sent']):.1f} | {m['down']} |")
    return "\n".join(lines) + "\n"


def _lo_up():
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    print(run(args.seconds))


if __name__ == "__main__":
    main()
