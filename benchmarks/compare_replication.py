"""NAT state replication in memory: its CPU cost on the active gateway beside the datapath's, one run.

The gateway of compare_datapath (node3, the seed policy, egress IP
192.168.1.100) meets new connections at RATE per second: every ROUND
(10 ms, the replication thread's interval) the datapath takes RATE * ROUND
VXLAN frames of new UDP flows from node1 through Datapath.process_batch
(decap, policy check, SNAT, a FLOW_START record each, out to the router)
and runs its bounded expiry (Datapath.gc: the connections of a round ago
EXPIRE seconds back end, with a FLOW_END record each).  The replication
round then does what the agent's replication thread does: drain the flow
log, turn the starts and ends into replication records
(egresscore.replication.from_flow_records), pack them into datagrams and
send them to a UDP socket on loopback.  Both are timed in CPU seconds of
this thread (time.thread_time; the machine is shared), the clock of the
datapath is the simulated one, so the figure is CPU per connection at the
given rate, not a wall-clock rate.

The standby's side, the same run: the datagrams are read from the socket,
checked (Receiver.datagram) and applied (nat_repl_apply) to a second table:
connections per second of one core it keeps up with.

The peer is the datapath itself: the issue's target is replication under
10% of the datapath's CPU at 100k new connections per second.
"""
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import compare_datapath as cd  # noqa: E402 - after sys.path
from egresscore._core import FlowLog, NatTable, nat_repl_apply  # noqa: E402

from egresscore.replication import Receiver, Sender, enable_gro, from_flow_records, recv_datagrams  # noqa: E402

RATE = 100_000              # new connections per second
ROUND = 0.01                # s: the replication thread's interval
EXPIRE = 0.5                # s: UDP timeout of the benchmark's table (ends start after it)
TARGET = 0.10               # replication CPU / datapath CPU


def tunnel_frames(n):
    """node1's VXLAN frames to node3 for n new flows (node1's datapath builds them)."""
    dp1, _, _ = cd.datapath("node1", n + 1024)
    pods = [cd.pod(k) for k in range(cd.N_PODS)]
    work = [(cd.udp_frame(pods[k][1], pods[k][2], pods[k][0], cd.POLICY_SERVERS[s], sp, 53), pods[k][3])
            for k, sp, s in cd.flows(n)]
    pk = cd.Packed(work)
    keep = []
    cd.feed_batch(dp1, pk, keep)
    assert len(keep) == n, len(keep)
    return cd.Packed([(f, 0) for _, _, f in sorted(keep)])


def gateway(n):
    em = cd.egress_map("node3")
    nat = NatTable([cd.EGRESS_IP], capacity=n + 1024, port_range=cd.NAT_PORTS, seed=7,
                   timeouts={"udp": EXPIRE})
    dp = cd.Datapath(cd.GATEWAY, cd.NODE_MAC[cd.GATEWAY], em, nat, nat_port_range=cd.NAT_PORTS)
    for i, (nip, cidr) in enumerate(cd.NODES):
        dp.add_node(i, nip, [cidr], cd.NODE_MAC[nip])
    dp.set_router(cd.ROUTER_MAC)
    log = FlowLog(1 << 16, drop_rate=0)
    dp.set_flow_log(log)
    return dp, nat, log


def one_run(pk, seconds, path="c", gro=True):
    """(datapath CPU s, replication CPU s, standby CPU s, connections, records, datagrams, bytes, standby table)."""
    n = pk.n
    per = int(RATE * ROUND)
    dp, nat, log = gateway(n)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    if gro:
        enable_gro(rx)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    sender = Sender(tx)
    sender.target = rx.getsockname()
    standby = NatTable([cd.EGRESS_IP], capacity=n + 1024, port_range=cd.NAT_PORTS, seed=8)
    applied = []
    recv = Receiver(lambda recs, t0: applied.append(recs), lambda ips: None, lambda src, epoch: None,
                    max_pending=1 << 30)
    gateways, mine = {"127.0.0.1"}, {cd.EGRESS_IP}
    dp_cpu = repl_cpu = sb_cpu = 0.0
    sender.reset([cd.EGRESS_IP])
    rounds = min(int(seconds / ROUND), n // per)
    for r in range(rounds):
        now = cd.T0 + r * ROUND
        b, e = r * per, (r + 1) * per
        t0 = time.thread_time()
        dp.process_batch(pk.frames, pk.offsets[b:e], pk.lengths[b:e], pk.verdicts[b:e], pk.out, pk.meta,
                         port=pk.ports[b:e], now=now)
        dp.gc(now=now)
        t1 = time.thread_time()
        if path == "c":             # the agent's own ring: drained and encoded in C, sent with UDP GSO
            sender.send_log(log, [cd.EGRESS_IP])
        elif path == "encode":      # the same without the send (what the send costs is the difference)
            sender.target = None
            sender.send_log(log, [cd.EGRESS_IP])
        else:                       # batches from a flow logger's drain, in NumPy
            recs, tmin = from_flow_records(log.drain(), [cd.EGRESS_IP])
            sender.send(recs, tmin)
        t2 = time.thread_time()
        while True:                               # the standby (another node in the agent)
            try:
                grams, (src, _) = recv_datagrams(rx)
            except BlockingIOError:
                break
            for data in grams:
                recv.datagram(data, src, gateways, mine)
        for a in applied:
            nat_repl_apply(standby, a, now=now)
        applied.clear()
        t3 = time.thread_time()
        dp_cpu += t1 - t0
        repl_cpu += t2 - t1
        sb_cpu += t3 - t2
    assert not log.stats["lost"], log.stats
    assert recv.dropped == dict.fromkeys(Receiver.REASONS, 0), recv.dropped
    if path == "encode":
        standby = nat                       # nothing was sent: nothing to compare
    # the standby holds exactly the connections the active holds (same egress port); listed at
    # the first round's time: the active's gc has not collected every expired one yet
    a_conns = {(e.src, e.sport, e.dst, e.dport, e.xport) for e in nat.entries(now=cd.T0)}
    b_conns = {(e.src, e.sport, e.dst, e.dport, e.xport) for e in standby.entries(now=cd.T0)}
    assert a_conns == b_conns, (len(a_conns), len(b_conns))
    tx.close()
    rx.close()
    records = sender.counters["records"]
    return (dp_cpu, repl_cpu, sb_cpu, rounds * per, records, sender.counters["datagrams"],
            sender.counters["bytes"], len(standby))


def run(quick=False):
    seconds = 1.0 if quick else 2.0
    reps = 3 if quick else 5
    n = int(RATE * seconds)
    pk = tunnel_frames(n)
    one_run(pk, min(seconds, 0.2))                 # warm up
    runs, nruns, eruns, gruns = [], [], [], []
    for _ in range(reps):
        runs.append(one_run(pk, seconds, "c"))
        gruns.append(one_run(pk, seconds, "c", gro=False))
        nruns.append(one_run(pk, seconds, "numpy"))
        eruns.append(one_run(pk, seconds, "encode"))
    conns = runs[0][3]
    dp_us = statistics.median(r[0] for r in runs + nruns) * 1e6 / conns
    repl_us = statistics.median(r[1] for r in runs) * 1e6 / conns
    np_us = statistics.median(r[1] for r in nruns) * 1e6 / conns
    enc_us = statistics.median(r[1] for r in eruns) * 1e6 / conns
    nogro_us = statistics.median(r[1] for r in gruns) * 1e6 / conns
    sb_us = statistics.median(r[2] for r in runs) * 1e6 / conns
    sb_nogro_us = statistics.median(r[2] for r in gruns) * 1e6 / conns
    dp_us = statistics.median(r[0] for r in runs + nruns + eruns + gruns) * 1e6 / conns
    rec, grams, nbytes = runs[0][4], runs[0][5], runs[0][6]
    ratio = repl_us / dp_us
    lines = [
        f"### NAT state replication at {RATE:,} new connections/s ({conns:,} connections, "
        f"{seconds:.0f} s simulated, median of {reps} runs)",
        "",
        (f"CPU of one core per new connection (time.thread_time), rounds of {ROUND * 1000:.0f} ms: the datapath "
         f"takes each connection's first frame (VXLAN in, SNAT, a flow record) and expires the connections of "
         f"{EXPIRE} s ago; replication drains the flow log and sends the starts and ends to a UDP socket on "
         f"loopback (on loopback the sender's CPU also pays the receiving kernel's work: with UDP_GRO on the "
         f"standby's socket a GSO send stays one buffer to the socket, without it the kernel segments it and "
         f"queues each datagram); the standby reads, checks and applies them."),
        "",
        "| work | µs per connection | CPU at 100k conn/s | share of the datapath |",
        "|---|---:|---:|---:|",
        f"| datapath (process_batch + gc) | {dp_us:.3f} | {dp_us * RATE / 1e4:.1f}% | 100% |",
        f"| replication on the active: drain and encode in C, UDP GSO send (the agent's own ring) | "
        f"{repl_us:.3f} | {repl_us * RATE / 1e4:.1f}% | {ratio * 100:.1f}% |",
        f"| of which the drain and the encoding (no send) | {enc_us:.3f} | {enc_us * RATE / 1e4:.1f}% | "
        f"{enc_us / dp_us * 100:.1f}% |",
        f"| the same, the standby's socket without UDP_GRO (each datagram segmented and queued alone) | "
        f"{nogro_us:.3f} | {nogro_us * RATE / 1e4:.1f}% | {nogro_us / dp_us * 100:.1f}% |",
        f"| replication on the active: batches in NumPy (when a flow logger drains the ring) | "
        f"{np_us:.3f} | {np_us * RATE / 1e4:.1f}% | {np_us / dp_us * 100:.1f}% |",
        f"| the standby (receive with UDP_GRO, check, apply) | {sb_us:.3f} | {sb_us * RATE / 1e4:.1f}% | "
        f"{sb_us / dp_us * 100:.1f}% |",
        f"| the standby without UDP_GRO | {sb_nogro_us:.3f} | {sb_nogro_us * RATE / 1e4:.1f}% | "
        f"{sb_nogro_us / dp_us * 100:.1f}% |",
        "",
        (f"{rec:,} records (starts and ends) in {grams:,} datagrams, {nbytes / (conns / RATE) / 1e6:.1f} MB/s on "
         f"the underlay ({nbytes / rec:.1f} bytes a record with headers). The standby keeps up with "
         f"{1e6 / sb_us / 1e3:,.0f}k new connections/s per core of its own (a start and an end each). "
         f"Target: replication under {TARGET * 100:.0f}% of the datapath's CPU: "
         f"{'met' if ratio < TARGET else 'missed'} ({ratio * 100:.1f}%)."),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    from compare import machine_summary

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 s simulated, 3 runs")
    quick = ap.parse_args().quick
    print(machine_summary())
    print(run(quick=quick))
