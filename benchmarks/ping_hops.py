"""Where a slow ping waits: each echo's kernel timestamps at every hop of the lab's egress path.

    flock /run/egc-test.lock python benchmarks/ping_hops.py [--reps 3] [--count 1000]

Path app1 (node1) -> VXLAN -> node3 SNAT -> 203.0.113.10 and back, through
`egresscore agent` processes (default options).  A packet socket with
SO_TIMESTAMPNS on app1's eth0, node1's and node3's underlay and the server's
eth0 stamps each echo request and reply as the kernel sees it pass (VXLAN
frames are opened to their inner ICMP), so a round trip splits into hops:
the node1 agent (pod -> tunnel, tunnel -> pod), the node3 agent (each way),
the server and the wires.  Each slow ping (over --slow-ms) is put down to
its longest hop.

Three ways to run the same agents, taking turns in each repetition:
- default: as deployed;
- awake: two SCHED_IDLE spinners (plain CPU loops, no packets) keep both
  vCPUs from halting; any runnable thread preempts them at once;
- cpu0: every agent's datapath thread on CPU 0 (`--cpu 0`).
Why: an agent sleeps in poll() until the sender's softirq wakes it, and on a
virtual machine a halted vCPU can take milliseconds to resume; the kernel's
own path runs the whole hop in the sender's softirq and never hands a
packet to a sleeping thread.  The spinners and the pinning take that wake-up
away two ways; they are diagnostics, not settings to deploy.

Every load is bounded (--count pings at 10 ms) and stays inside the lab's
namespaces; the spinners are bounded in time and ended by PID.
"""
import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POD, DST = "app1", "203.0.113.10"
VXLAN_PORT = 8472
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4
# hops of a round trip: (name, from event, to event)
HOPS = [("node1 agent, pod -> tunnel", "app1 req out", "node1 req out"),
        ("wire node1 -> node3", "node1 req out", "node3 req in"),
        ("node3 agent, tunnel -> out", "node3 req in", "node3 req out"),
        ("wire node3 -> server", "node3 req out", "server req in"),
        ("server", "server req in", "server rep out"),
        ("wire server -> node3", "server rep out", "node3 rep in"),
        ("node3 agent, in -> tunnel", "node3 rep in", "node3 rep out"),
        ("wire node3 -> node1", "node3 rep out", "node1 rep in"),
        ("node1 agent, tunnel -> pod", "node1 rep in", "app1 rep in")]
MODES = ("default", "awake", "cpu0")


def _echo(data):
    """(request or reply, sequence) of an ICMP echo frame, plain or in VXLAN; None otherwise."""
    off = 14
    if data[12:14] != b"\x08\x00" or len(data) < off + 28:
        return None
    if data[off + 9] == 17 and len(data) >= off + 28 + 8 + 14 + 28 and \
            struct.unpack("!H", data[off + 22:off + 24])[0] == VXLAN_PORT:
        off += 20 + 8 + 8 + 14
        if data[off - 2:off] != b"\x08\x00":
            return None
    if data[off + 9] != 1:
        return None
    icmp = off + (data[off] & 15) * 4
    if data[icmp] not in (0, 8):
        return None
    return ("req" if data[icmp] == 8 else "rep"), struct.unpack("!H", data[icmp + 6:icmp + 8])[0]


class Stamps:
    """Packet sockets in the lab's namespaces: {sequence: {event: kernel time}}."""

    def __init__(self, points):
        from egresscore._core import _ring_in_netns

        self.events, self.stop, self.threads, self.socks = {}, threading.Event(), [], []
        for tag, ns, ifname in points:
            with _ring_in_netns(ns):
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
                s.bind((ifname, 0))
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.settimeout(0.2)
            self.socks.append(s)
            t = threading.Thread(target=self._read, args=(tag, s), daemon=True)
            t.start()
            self.threads.append(t)

    def _read(self, tag, s):
        while not self.stop.is_set():
            try:
                data, anc, _, addr = s.recvmsg(2048, 64)
            except socket.timeout:
                continue
            echo = _echo(data)
            stamp = [struct.unpack("qq", d[:16]) for _, typ, d in anc if typ == SO_TIMESTAMPNS]
            if echo and stamp:
                way = "out" if addr[2] == PACKET_OUTGOING else "in"
                self.events.setdefault(echo[1], {})[f"{tag} {echo[0]} {way}"] = stamp[0][0] + stamp[0][1] * 1e-9

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()
        for s in self.socks:
            s.close()


def spinners(seconds):
    """Two SCHED_IDLE CPU loops (no packets) that end themselves after `seconds`.  chrt execs the
    loop itself, so the PID killed is the loop's (a `timeout` between them, killed, left its child
    spinning)."""
    loop = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    return [subprocess.Popen(["chrt", "-i", "0", sys.executable, "-c", loop]) for _ in range(2)]


def one_run(lab, sample, tmp, mode, count, slow_ms):
    from egresscore.demo import start_agents
    from egresscore.lab import traffic

    _, agents = start_agents(lab, sample, tmp, extra_args=("--cpu", "0") if mode == "cpu0" else ())
    spin = []
    try:
        lab.ping(POD, DST, count=1)
        server = next(s for s in lab.servers.values() if DST in s.addresses)
        stamps = Stamps([("app1", lab.pods[POD].ns, "eth0"),
                         ("node1", lab.nodes["node1"].ns, lab.nodes["node1"].ifname),
                         ("node3", lab.nodes["node3"].ns, lab.nodes["node3"].ifname),
                         ("server", server.ns, "eth0")])
        if mode == "awake":
            spin = spinners(count * 0.01 + 20)
        time.sleep(0.3)
        out = lab.run(POD, ["ping", "-n", "-i", "0.01", "-W", "1", "-c", str(count), DST],
                      timeout=count * 0.01 + 30, check=False)
        time.sleep(0.2)
        stamps.close()
    finally:
        for p in spin:
            p.kill()
            p.wait()
        for a in agents.values():
            a.stop()
    times = traffic.ping_times(out.stdout)
    seqs = [int(line.split("icmp_seq=")[1].split()[0]) for line in out.stdout.splitlines() if " time=" in line]
    held = {}
    for seq, ms in zip(seqs, times):
        ev = stamps.events.get(seq, {})
        if ms <= slow_ms or not all(a in ev and b in ev for _, a, b in HOPS):
            continue
        name = max(HOPS, key=lambda h: ev[h[2]] - ev[h[1]])[0]
        held[name] = held.get(name, 0) + 1
    return {"median_ms": statistics.median(times), "p99_ms": statistics.quantiles(times, n=100)[98],
            "max_ms": max(times), "replies": len(times), "slow": sum(held.values()), "held": held,
            "load1": os.getloadavg()[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--slow-ms", type=float, default=1.0, help="a ping slower than this is put down to a hop")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    from egresscore.demo import SAMPLE
    from egresscore.lab import Lab

    load0 = os.getloadavg()[0]
    runs = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="egc-hops-") as tmp, Lab(datapath="kernel", tag="bhops") as lab:
        lab.remove_kernel_egress()
        lab.set_masquerade(False)
        for _ in range(args.reps):
            for m in modes:
                runs[m].append(one_run(lab, SAMPLE, tmp, m, args.count, args.slow_ms))
    print(f"ping_hops: {args.count} pings at 10 ms, {args.reps} repetition(s) taking turns, "
          f"load {load0:.1f} at start\n")
    print("| agents | median ms | p99 ms (each repetition) | max ms | pings over "
          f"{args.slow_ms:g} ms | the hop that held them |")
    print("|---|---:|---:|---:|---:|---|")
    for m, rs in runs.items():
        held = {}
        for r in rs:
            for k, v in r["held"].items():
                held[k] = held.get(k, 0) + v
        print(f"| {m} | {statistics.median(r['median_ms'] for r in rs):.3f} | "
              f"{statistics.median(r['p99_ms'] for r in rs):.2f} ({', '.join('%.2f' % r['p99_ms'] for r in rs)}) | "
              f"{max(r['max_ms'] for r in rs):.1f} | {sum(r['slow'] for r in rs)} | "
              + ", ".join(f"{k} {v}" for k, v in sorted(held.items(), key=lambda x: -x[1])) + " |")


if __name__ == "__main__":
    main()
