"""Failover in the lab: app1 streams UDP through a gateway that is killed.

One measurement, shared by tests/test_ha_e2e.py and benchmarks/compare_failover.py:
a receiver on the external server records every datagram (machine-wide
monotonic time, source address, sequence number); app1 sends one datagram
every 10 ms on one flow; `kill()` is called mid-stream.  The gap is the
time from the kill to the first datagram the server sees from another source
address (the next gateway's egress IP).
"""
import time
from typing import NamedTuple

from . import _ns, traffic


class Failover(NamedTuple):
    killed_at: float
    arrivals: list          # [(time, source IP, seq)]
    before: set             # source addresses seen before the kill
    after: str | None       # the first other source address after the kill
    gap: float | None       # kill -> first datagram from `after` (s)
    lost: int               # datagrams sent but never seen

    def sources_after(self):
        return {src for t, src, _ in self.arrivals if t > self.killed_at}


def stream_through_failover(lab, kill, *, pod="app1", server="203.0.113.10", port=9100, before=1.0, after=2.0,
                            interval=0.01):
    """Stream from `pod` to `server`, call kill() after `before` s (it returns
    the kill's time.monotonic()), stream `after` s more; a Failover."""
    seconds = before + after
    ext = lab._server_of(server)
    parent, child = _ns._fork.Pipe()
    recv = _ns.spawn(ext.ns, traffic.udp_arrivals, child, server, port, seconds + 1.5)
    child.close()
    sender = None
    try:
        if not parent.poll(10) or parent.recv() != "ready":
            raise RuntimeError("the UDP receiver did not start")
        sender = _ns.spawn(lab.ns(pod), traffic.udp_stream, server, port, seconds, interval)
        time.sleep(before)
        killed_at = kill()
        if not parent.poll(seconds + 10):
            raise TimeoutError("the UDP receiver did not report")
        arrivals = parent.recv()
    finally:
        parent.close()
        for proc in (sender, recv):
            if proc is not None:
                proc.join(seconds + 5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(2)
    old = {src for t, src, _ in arrivals if t <= killed_at}
    first = next(((t, src) for t, src, _ in arrivals if t > killed_at and src not in old), None)
    sent = min(int(seconds / interval), 100_000)
    return Failover(killed_at, arrivals, old, first[1] if first else None,
                    (first[0] - killed_at) if first else None, sent - len({s for _, _, s in arrivals}))
