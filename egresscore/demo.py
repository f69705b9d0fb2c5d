"""`egresscore demo`: the egress gateway end to end in the network-namespace lab.

Builds the lab (no kernel egress datapath), applies the seed's policy
(examples/egress-sample.yaml), starts one `egresscore agent` process per node,
sends a TCP request, UDP datagrams and pings from app1 and app2 to the external
servers, prints the egress list and what each server saw, and tears down.
With ipv6 (the default; `egresscore demo --ipv4-only` turns it off) the lab
is dual-stack, the policy the seed's dual-stack twin
(examples/egress-sample-dual.yaml) and every flow is also sent to the
servers' IPv6 addresses: IPv6 rows beside the IPv4 ones.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(os.path.dirname(HERE), "examples", "egress-sample.yaml")
SAMPLE_DUAL = os.path.join(os.path.dirname(HERE), "examples", "egress-sample-dual.yaml")

FLOWS = (  # pod, destination, what the policy says
    ("app1", "203.0.113.10", "egress IP (policy CIDR)"),
    ("app1", "203.0.113.200", "node IP (excluded CIDR)"),
    ("app1", "198.51.100.10", "node IP (no policy)"),
    ("app2", "203.0.113.10", "node IP (not selected)"),
)
FLOWS6 = (  # the same, to the servers' IPv6 addresses (the dual-stack lab)
    ("app1", "2001:db8:113::10", "egress IP (policy CIDR)"),
    ("app1", "2001:db8:113:0:8000::200", "node IP (excluded CIDR)"),
    ("app1", "2001:db8:100::10", "node IP (no policy)"),
    ("app2", "2001:db8:113::10", "node IP (not selected)"),
)
EXPECTED = {4: {"egress": "192.168.1.3", "app1": "192.168.1.1", "app2": "192.168.1.2"},
            6: {"egress": "fd00:192:168:1::100", "app1": "fd00:192:168:1::1", "app2": "fd00:192:168:1::2"}}


def expected_source(pod, dst, expect):
    """The source address the server should see for a FLOWS / FLOWS6 row."""
    table = EXPECTED[6 if ":" in dst else 4]
    return table["egress"] if expect.startswith("egress") else table[pod]


class AgentProcess:
    """An `egresscore agent` subprocess for one lab node; stop() sends SIGTERM."""

    def __init__(self, node, cluster_file, policy_file, netns, timeout=20.0, extra_args=(), source=None):
        env = dict(os.environ)
        root = os.path.dirname(HERE)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.node = node
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "egresscore", "agent", "--node", node,
             *(("--cluster", cluster_file, "--policies", policy_file) if source is None else ("--source", source)),
             "--netns", netns, *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip())
            if line.rstrip().endswith("ready"):
                return
        self.stop()
        raise RuntimeError(f"agent for {node} did not start: " + " | ".join(self.lines[-5:]))

    def reload(self):
        self.proc.send_signal(signal.SIGHUP)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = self.proc.communicate(timeout=10)
                self.lines += out.splitlines()
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.lines


def start_agents(lab, policy_file, workdir, extra_args=(), source=None):
    """Write the lab's cluster file and start an agent per node (extra_args: more
    `egresscore agent` options; source: `--source` instead of the files);
    returns (cluster file, {node: AgentProcess})."""
    cluster_file = os.path.join(workdir, "cluster.yaml")
    with open(cluster_file, "w") as f:
        yaml.safe_dump(lab.cluster(), f)
    agents = {}
    for name, node in lab.nodes.items():
        agents[name] = lab.track(AgentProcess(name, cluster_file, policy_file, node.ns, extra_args=extra_args,
                                              source=source))
    return cluster_file, agents


MOVED = {"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": {"name": "egress-moved"},
         "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "app1"}}}],
                  "destinationCIDRs": ["203.0.113.0/28"],
                  "egressGateway": {"nodeSelector": {"matchLabels": {"node.kubernetes.io/name": "node3"}},
                                    "egressIP": "192.168.1.100"}}}


def _cli(*args):
    """`egresscore ARGS` as its own process (what an operator types), not waited for."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-m", "egresscore", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def store_changes(lab, store_args, workdir, out, n=40, every=0.1):
    """While app1 keeps making requests to 203.0.113.10, `egresscore apply` a second policy
    (203.0.113.0/28 via 192.168.1.100), then `egresscore delete` it; returns the sources seen in order."""
    moved = os.path.join(workdir, "egress-moved.yaml")
    with open(moved, "w") as f:
        yaml.safe_dump(MOVED, f)
    seen, steps, procs = [], {}, []
    t0 = time.monotonic()
    for i in range(n):
        if i == n // 4:
            procs.append(_cli("apply", "-f", moved, *store_args))
            steps[i] = "apply -f egress-moved.yaml"
        if i == 5 * n // 8:
            procs.append(_cli("delete", "policy", "egress-moved", *store_args))
            steps[i] = "delete policy egress-moved"
        try:
            src = lab.tcp_request("app1", "203.0.113.10", timeout=2.0)
        except Exception as exc:  # noqa: BLE001 - shown
            src = f"failed ({type(exc).__name__})"
        seen.append((time.monotonic() - t0, steps.get(i, ""), src))
        time.sleep(every)
    for p in procs:
        p.communicate(timeout=20)
    rows, last = [], None
    for t, step, src in seen:
        if step or src != last:
            rows.append((f"{t:.1f} s", step, src))
        last = src
    from .show import format_table

    print("\nWhile app1 sends a request to 203.0.113.10 every 0.1 s, the store changes (egresscore apply/delete):\n"
          + format_table(rows, ("Time", "Store change", "Source the server saw")), file=out)
    return [src for _, _, src in seen]


def run_demo(quiet=False, out=None, store="files", ipv6=True):
    out = out or sys.stdout
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=out, flush=True))
    if os.geteuid() != 0:
        print("egresscore demo: needs root (network namespaces, AF_PACKET)", file=sys.stderr)
        return 1
    from .cluster import Cluster
    from .compiler import Compiler
    from .lab import Lab
    from .lab.kernel import SAMPLE_POLICY, SAMPLE_POLICY_DUAL
    from .lab.offloads import prepare_lab
    from .policy import load_policies
    from .show import egress_rows, egress_table, format_table

    t0 = time.monotonic()
    sample_doc = SAMPLE_POLICY_DUAL if ipv6 else SAMPLE_POLICY
    with tempfile.TemporaryDirectory(prefix="egresscore-demo-") as tmp, Lab(tag="demo", ipv6=ipv6) as lab:
        policy_file = SAMPLE_DUAL if ipv6 else SAMPLE
        if not os.path.exists(policy_file):
            policy_file = os.path.join(tmp, os.path.basename(policy_file))
            with open(policy_file, "w") as f:
                yaml.safe_dump(sample_doc, f)
        say(f"lab up: nodes {', '.join(f'{n.name} {n.ip}' for n in lab.nodes.values())}; "
            f"pods {', '.join(f'{p.name} {p.ip} on {p.node}' for p in lab.pods.values())}")
        prepare_lab(lab)
        source = etcd = None
        if store == "etcd":  # the lab's control plane: an etcd on 127.0.0.1 holding the cluster and the policy
            from .lab.etcd import EtcdServer
            from .sources.etcd import EtcdStore

            etcd = lab.track(EtcdServer(tmp).start())
            source = f"{etcd.url}/egresscore"
            store_args = ("--store", source, "--cluster-name", "default")
            c = Cluster.from_dict(lab.cluster())
            keys = EtcdStore.from_url(source).put_many(
                [("nodes", n) for n in c.nodes.values()] + [("namespaces", n) for n in c.namespaces.values()]
                + [("pods", p) for p in c.pods.values()] + [("policies", sample_doc)])
            say(f"etcd on 127.0.0.1:{etcd.port}: {len(keys)} objects under egresscore/v1/default/")
        _, agents = start_agents(lab, policy_file, tmp, source=source)
        say(f"agents running on {', '.join(agents)} ({time.monotonic() - t0:.1f} s)")
        policies = load_policies(policy_file).policies
        rows = egress_rows(Compiler(Cluster.from_dict(lab.cluster()), policies))
        print("\nEgress list (" + os.path.relpath(policy_file) + "):\n" + egress_table(rows), file=out)
        servers = lab.start_servers()
        results = []
        for pod, dst, expect in FLOWS + (FLOWS6 if ipv6 else ()):
            servers.clear()
            try:
                tcp = lab.tcp_request(pod, dst)
            except Exception as exc:  # noqa: BLE001 - shown in the table
                tcp = f"failed ({type(exc).__name__})"
            udp = lab.udp_echo(pod, dst, count=3)
            icmp = lab.ping(pod, dst, count=3)
            seen = lambda proto: ",".join(sorted(servers.sources(proto, dst))) or "-"  # noqa: E731
            results.append((pod, dst, expect, tcp, f"{seen('udp')} ({udp}/3 echoed)",
                            f"{seen('icmp')} ({icmp}/3 replied)"))
        print("\nSource address each external server saw:\n" + format_table(
            results, ("Pod", "Server", "Expected", "TCP (HTTP GET)", "UDP", "ping")), file=out)
        moved_ok = True
        if etcd is not None:
            sources = store_changes(lab, store_args, tmp, out)
            moved_ok = ("192.168.1.100" in sources and sources[0] == sources[-1] == "192.168.1.3"
                        and set(sources) <= {"192.168.1.3", "192.168.1.100"})
        finals = {name: a.stop() for name, a in agents.items()}
        say("")
        for name, lines in finals.items():
            say(lines[-1] if lines else f"{name}: no output")
    say(f"\nlab torn down; {time.monotonic() - t0:.1f} s in all")
    ok = all(r[3] == expected_source(r[0], r[1], r[2]) for r in results)
    return 0 if ok and moved_ok else 1
