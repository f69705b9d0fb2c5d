"""An agent's datapath workers (Agent(workers=N), N > 1): N Datapaths, N NAT tables, N rings per interface.

Each worker is one thread driving one Datapath over its own NAT table, whose
port range is the worker's slice of the agent's (egresscore._steer.
worker_slices); every interface gets one ring per worker, joined in one
PACKET_FANOUT_CBPF group whose program sends a reply to the worker owning
its port and a pod's frame to the worker its (IP, port) hashes to
(egresscore._steer).  Nothing is shared on the hot path but the egress map,
which its readers enter lock-free (RCU; the compiler is its one writer), and
worker 0's table of pod MACs (Datapath.share_pod_macs: one word per port,
read and written whole), since a reply may be steered to another worker
than the one that learned the pod's MAC from its frames.

The rest of the agent sees one datapath, one NAT table and one ring per
interface: DatapathGroup, NatGroup and RingSet write to every member and
sum what they read.  Control writes (nodes, neighbours, pods, spill chains)
run on worker 0's thread, the loop thread, while the other workers are
parked (Parking) between two of their C loop returns: each Datapath keeps
one writer at a time and no worker takes a lock per packet.
"""
import glob
import os
import sys
import threading

from .._core import Datapath, NatTable
from .._steer import steer_pod, steer_underlay, worker_slices


def _sum_into(out, d):
    """Add the numbers of d into out (nested dicts; other values: the first one's)."""
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
            out.setdefault(k, v)
        elif isinstance(v, dict):
            _sum_into(out.setdefault(k, {}), v)
        else:
            out[k] = out.get(k, 0) + v
    return out


def summed(dicts):
    out = {}
    for d in dicts:
        _sum_into(out, d)
    return out


class RingSet(tuple):
    """One ring per worker on one interface (a fanout group), used as one ring."""

    @property
    def ifname(self):
        return self[0].ifname

    @property
    def closed(self):
        return all(r.closed for r in self)

    def close(self):
        for r in self:
            r.close()

    def stats(self):
        return summed(r.stats() for r in self)


def open_fanout(open_ring, workers, prog):
    """`workers` rings from open_ring(**fanout options), joined in order in one new cBPF group."""
    rings = [open_ring(fanout="unique", fanout_mode="cbpf", fanout_prog=prog)]
    try:
        gid = rings[0].fanout_group
        for _ in range(workers - 1):
            rings.append(open_ring(fanout=gid, fanout_mode="cbpf", fanout_prog=prog))
    except BaseException:
        for r in rings:
            r.close()
        raise
    return RingSet(rings)


class WorkerRings:
    """RingPlan for N workers: a RingSet per interface (the tunnel: one TX ring per worker)."""

    def __init__(self, plan, workers, nat_port_range, vxlan_port):
        self.plan = plan
        self.workers = workers
        self._under = steer_underlay(workers, nat_port_range, vxlan_port)
        self._pod = steer_pod(workers)

    def underlay(self, ifname):
        return open_fanout(lambda **kw: self.plan.underlay(ifname, **kw), self.workers, self._under)

    def pod(self, ifname):
        return open_fanout(lambda **kw: self.plan.pod(ifname, **kw), self.workers, self._pod)

    def tunnel(self, ifname):
        rings = []
        try:
            for _ in range(self.workers):
                rings.append(self.plan.tunnel(ifname))
        except BaseException:
            for r in rings:
                r.close()
            raise
        return RingSet(rings)


class DatapathGroup:
    """N Datapaths as one: configuration to all, counters summed."""

    def __init__(self, members):
        self.members = list(members)
        self._rings = {}
        for dp in self.members[1:]:   # a pod's MAC, learned by the worker its frames go to, is everyone's
            dp.share_pod_macs(self.members[0])

    def __getattr__(self, name):
        # anything not written here is worker 0's (read-only uses: pins, underlay6, ...)
        return getattr(self.members[0], name)

    def _all(self, name, *args, **kw):
        return [getattr(dp, name)(*args, **kw) for dp in self.members]

    def add_node(self, *a, **kw):
        self._all("add_node", *a, **kw)

    def remove_node(self, *a, **kw):
        self._all("remove_node", *a, **kw)

    def set_router(self, *a, **kw):
        self._all("set_router", *a, **kw)

    def set_router6(self, *a, **kw):
        self._all("set_router6", *a, **kw)

    def set_node_mac(self, *a, **kw):
        self._all("set_node_mac", *a, **kw)

    def add_pod_port(self, *a, **kw):
        self._all("add_pod_port", *a, **kw)

    def remove_pod_port(self, port):
        self._all("remove_pod_port", port)
        self._rings.pop(port, None)

    def set_flow_log(self, log):
        self._all("set_flow_log", log)

    def set_make_before_break(self, *a, **kw):
        self._all("set_make_before_break", *a, **kw)

    def flush_gateway(self, ip):
        return sum(self._all("flush_gateway", ip))

    def gc(self, *a, **kw):
        """Every member's (only when no worker thread runs them: Agent.step() without run())."""
        return sum(self._all("gc", *a, **kw))

    def run(self, *a, **kw):
        raise TypeError("DatapathGroup.run: each worker's thread runs its own Datapath (members[k].run)")

    def poll(self, *a, **kw):
        """One batch per ring of every member in turn (as gc)."""
        return sum(self._all("poll", *a, **kw))

    @property
    def rx_coalesce_us(self):
        return self.members[0].rx_coalesce_us

    @rx_coalesce_us.setter
    def rx_coalesce_us(self, value):
        for dp in self.members:
            dp.rx_coalesce_us = value

    def attach_ring(self, port, rings):
        for dp, r in zip(self.members, rings, strict=True):
            dp.attach_ring(port, r)
        self._rings[port] = rings

    def attach_tunnel(self, rings):
        for dp, r in zip(self.members, rings, strict=True):
            dp.attach_tunnel(r)
        self._rings[Datapath.TUNNEL_PORT] = rings

    def detach_ring(self, port):
        self._all("detach_ring", port)
        self._rings.pop(port, None)

    @property
    def rings_attached(self):
        return dict(self._rings)

    def counters(self):
        return summed(dp.counters() for dp in self.members)

    def loop_counters(self):
        return summed(dp.loop_counters() for dp in self.members)

    def worker_counters(self):
        """Per worker: its frames and loop counters (how evenly the steering spreads the load)."""
        return [{"rx": dp.counters()["rx"], **dp.loop_counters()} for dp in self.members]

    def policy_counters(self, slots=None):
        out = {}
        for dp in self.members:
            for slot, rec in dp.policy_counters(slots).items():
                _sum_into(out.setdefault(slot, {}), rec)
        return out


class NatGroup:
    """N NAT tables (one per worker, disjoint port slices) as one."""

    def __init__(self, members, slices):
        self.members = list(members)
        self.slices = slices

    def __len__(self):
        return sum(len(t) for t in self.members)

    def __iter__(self):
        for t in self.members:
            yield from t

    def entries(self):
        for t in self.members:
            yield from t.entries()

    def add_egress_ip(self, ip, *a, **kw):
        return [t.add_egress_ip(ip, *a, **kw) for t in self.members][0]

    def set_spill(self, chains):
        for t in self.members:
            t.set_spill(chains)

    def flush(self):
        for t in self.members:
            t.flush()

    def discard_state(self):
        for t in self.members:
            t.discard_state()

    @property
    def egress_ips(self):
        return self.members[0].egress_ips

    @property
    def state(self):
        s = self.members[0].state
        if s is None:
            return None
        return {**s, "message": "; ".join(f"worker {k}: {t.state['message']}" for k, t in enumerate(self.members))}

    @property
    def stats(self):
        return summed(t.stats for t in self.members)

    def port_usage(self):
        """As NatTable.port_usage, over the slices: ports in use and in the whole range."""
        out = {}
        for t in self.members:
            for ip, d in t.port_usage().items():
                o = out.setdefault(ip, {})
                for proto, (used, size) in d.items():
                    u, s = o.get(proto, (0, 0))
                    o[proto] = (u + used, s + size)
        return out

    def seal_state(self):
        return summed(t.seal_state() for t in self.members)

    def policy_connections(self):
        return summed(t.policy_connections() for t in self.members)


def worker_state_paths(path, workers, label):
    """The NAT state file of each worker: `path` itself with one worker, else
    <path without .nat>.<k>of<N>.nat.  Files another worker count left are
    not adopted (their ports are sliced otherwise): set aside as *.other-workers,
    one line on stderr each."""
    if path is None:
        return [None] * workers
    stem = path[:-4] if path.endswith(".nat") else path
    mine = [path] if workers == 1 else [f"{stem}.{k}of{workers}.nat" for k in range(workers)]
    others = ([path] if workers != 1 else []) + glob.glob(glob.escape(stem) + ".*of*.nat")
    for f in others:
        if f in mine or not os.path.exists(f):
            continue
        try:
            os.replace(f, f + ".other-workers")
        except OSError:
            continue
        print(f"{label}: NAT state {f} was saved by an agent with another worker count "
              f"(this one has {workers}): not adopted, its connections are lost (set aside as "
              f"{f}.other-workers)", file=sys.stderr, flush=True)
    return mine


def make_nat(workers, nat_port_range, state_path, label, **kw):
    """One NatTable (workers 1) or a NatGroup of `workers` tables over the range's slices."""
    if workers == 1:
        return NatTable(port_range=nat_port_range, state_path=worker_state_paths(state_path, 1, label)[0], **kw)
    slices = worker_slices(*nat_port_range, workers)
    tables = []
    try:
        for rng, path in zip(slices, worker_state_paths(state_path, workers, label), strict=True):
            tables.append(NatTable(port_range=rng, state_path=path, **kw))
    except BaseException:
        tables.clear()
        raise
    return NatGroup(tables, slices)


class Parking:
    """Workers 1..N-1 stop between two C loop returns while worker 0 writes the datapaths."""

    def __init__(self, others):
        self.others = others
        self.cond = threading.Condition()
        self.want = False
        self.parked = 0
        self.live = 0

    def hold(self, wake, timeout=5.0):
        """Worker 0: park every live worker (woken through `wake`); False if one did not come."""
        with self.cond:
            self.want = True
        wake()
        with self.cond:
            return self.cond.wait_for(lambda: self.parked >= self.live, timeout)

    def release(self):
        with self.cond:
            self.want = False
            self.cond.notify_all()

    def check(self):
        """A worker between two loop returns: wait here while worker 0 holds the others."""
        if not self.want:
            return
        with self.cond:
            self.parked += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: not self.want)
            self.parked -= 1

    def joined(self, delta):
        with self.cond:
            self.live += delta
            self.cond.notify_all()
