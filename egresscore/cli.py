"""The `egresscore` command line: one subcommand per job.

To add a subcommand, write `def _add_<name>(subparsers)` that creates its
parser and sets `func` (called with the parsed args, returns the exit code),
then append it to COMMANDS.  Raise CLIError for a clean one-line error.

Exit codes: 0 success, 1 an error in the input or the host (message on
stderr), 2 bad usage.
"""

import argparse
import json
import sys

from . import show
from ._steer import MAX_WORKERS, check_workers
from .errors import EgressError
from .files import MAX_INPUT_BYTES

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class CLIError(EgressError):
    """An error to print on stderr as one line, without a traceback."""

    def __init__(self, message, code=EXIT_ERROR):
        super().__init__(message)
        self.code = code


def _warn(message):
    print(f"egresscore: {message}", file=sys.stderr)


# ---------------------------------------------------------------- shared input


def _add_input_options(parser, *, node_required, files_required=True):
    parser.add_argument("--cluster", required=files_required, metavar="FILE",
                        help="YAML cluster file: nodes, namespaces, pods (see examples/cluster.yaml); a "
                             f"regular file of at most {MAX_INPUT_BYTES >> 20} MiB")
    parser.add_argument("--policies", required=files_required, action="extend", nargs="+", metavar="PATH",
                        help="CiliumEgressGatewayPolicy YAML file(s) or folder(s); may be repeated.  "
                             f"Regular files of at most {MAX_INPUT_BYTES >> 20} MiB each; one bad file or "
                             "document rejects the whole set")
    parser.add_argument("--node", required=node_required, metavar="NAME",
                        help="the node whose view to take" if not node_required else "this host's node name")


def _load_inputs(args):
    """(cluster, policies) through the agent's own loading path
    (egresscore.inputs: all or nothing; an InputError is reported by main)."""
    from .inputs import load_inputs

    loaded = load_inputs(args.cluster, args.policies)
    for w in loaded.warnings:
        _warn(f"warning: {w}")
    if args.node is not None and args.node not in loaded.cluster.nodes:
        known = ", ".join(sorted(loaded.cluster.nodes)) or "none"
        raise CLIError(f"no node {args.node!r} in {args.cluster} (nodes: {known})")
    return loaded.cluster, loaded.policies


# ------------------------------------------------------------- egress list


def _cmd_egress_list(args):
    from .compiler import Compiler

    if args.socket is not None or (args.cluster is None and args.policies is None):
        return _egress_list_live(args)
    if args.cluster is None or args.policies is None:
        missing = "--policies" if args.policies is None else "--cluster"
        args.parser.error(f"the following arguments are required: {missing} (or give --socket / "
                          f"--node alone to ask a running agent)")
    cluster, policies = _load_inputs(args)
    unknown = sorted(set(args.down or ()) - set(cluster.nodes))
    if unknown:
        raise CLIError(f"--down: no node {', '.join(map(repr, unknown))} in {args.cluster}")
    compiler = Compiler(cluster, policies, node=args.node, down=args.down or ())
    for problem in compiler.problems():
        _warn(f"warning: {problem}")
    for conflict in compiler.conflicts():
        _warn(f"warning: {conflict}")
    em = show.EgressMap()
    compiler.attach(em)
    entries = em.entries()
    rows = [e.row() for e in entries]
    if args.output == "json":
        names = {i: n for n, i in compiler.policy_ids.items()}
        dicts = show.egress_dicts(rows)
        if args.show_policy:
            dicts = [dict(d, PolicyID=e.policy_id, Policy=names.get(e.policy_id)) for d, e in zip(dicts, entries)]
        sys.stdout.write(json.dumps(dicts, indent=2) + "\n")
    elif rows:
        if args.show_policy:
            rows = show.egress_policy_rows(rows, [e.policy_id for e in entries],
                                           {i: n for n, i in compiler.policy_ids.items()})
        sys.stdout.write(show.egress_table(rows))
        if args.down:
            sys.stdout.write(show.gateway_health_table(show.offline_gateway_health(compiler)))
    else:
        print("No entries found.", file=sys.stderr)
    return EXIT_OK


def _egress_list_live(args):
    rows = _agent_call(args, "egress_list")
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    if rows:
        table = show.rows_of_dicts(rows)
        if args.show_policy:
            table = show.egress_policy_rows(table, [d.get("PolicyID", 0) for d in rows],
                                            {d.get("PolicyID"): d.get("Policy") for d in rows})
        sys.stdout.write(show.egress_table(table))
    else:
        print("No entries found.", file=sys.stderr)
    try:
        health = _agent_call(args, "gateway_health")
    except CLIError:      # an agent without gateway health: the egress list alone
        return EXIT_OK
    sys.stdout.write(show.gateway_health_table(health))
    return EXIT_OK


# ------------------------------------------------------- the running agent


def _add_agent_options(parser):
    parser.add_argument("--socket", metavar="PATH",
                        help="the agent's control socket (default /run/egresscore/NODE.sock)")
    if not any(a.dest == "node" for a in parser._actions):
        parser.add_argument("--node", metavar="NAME", help="the node whose agent to ask")
    if not any(a.dest == "netns" for a in parser._actions):
        parser.add_argument("--netns", metavar="NAME",
                            help="the agent runs with --netns NAME (socket NODE@NAME.sock)")


def _agent_call(args, cmd, **kw):
    from .control import ControlClient, ControlError, default_socket_path

    path = args.socket
    if path is None:
        if not args.node:
            raise CLIError("give --socket PATH or --node NAME to reach a running agent", EXIT_USAGE)
        path = default_socket_path(args.node, getattr(args, "netns", None))
    try:
        return ControlClient(path).call(cmd, **kw)
    except ControlError as exc:
        raise CLIError(str(exc)) from None


def _cmd_nat_list(args):
    entries = _agent_call(args, "nat_list")
    if args.output == "json":
        sys.stdout.write(json.dumps(entries, indent=2) + "\n")
    elif entries:
        sys.stdout.write("\n".join(show.nat_list_lines(entries)) + "\n")
    else:
        print("No entries found.", file=sys.stderr)
    return EXIT_OK


def _add_nat(sub):
    nat = sub.add_parser("nat", help="the running agent's NAT table",
                         description="Inspect the NAT (connection) table of a running agent.")
    nat.set_defaults(func=lambda args: _usage(nat))
    nsub = nat.add_subparsers(dest="nat_command", metavar="COMMAND")
    ls = nsub.add_parser("list", aliases=["ls"], help="list connections, like `cilium-dbg bpf nat list`",
                         description="List the live connections of a running agent (through its control "
                                     "socket): an OUT and an IN line each, with their packet and byte counts.")
    _add_agent_options(ls)
    ls.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format (text)")
    ls.set_defaults(func=_cmd_nat_list)


def _cmd_stats(args):
    stats = _agent_call(args, "stats")
    if args.output == "json":
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return EXIT_OK
    if args.by_policy:
        sys.stdout.write(show.policy_stats_table(stats.get("policy_counters") or {}))
        return EXIT_OK
    for line in show.stats_lines(stats):
        print(line)
    return EXIT_OK


def _add_stats(sub):
    st = sub.add_parser("stats", help="the running agent's counters",
                        description="Print the counters of a running agent (verdicts, drops by reason, "
                                    "NAT table, rings, flow log), read through its control socket.")
    _add_agent_options(st)
    st.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format (text)")
    st.add_argument("--by-policy", action="store_true",
                    help="a table of the datapath's per-policy counters: connections opened and live, packets "
                         "and bytes redirected, SNATed and replied, drops by reason, each egress IP's port use")
    st.set_defaults(func=_cmd_stats)


def _add_egress(sub):
    egress = sub.add_parser("egress", help="the compiled egress map",
                            description="Inspect the egress map compiled from the policies and the cluster.")
    egress.set_defaults(func=lambda args: _usage(egress))
    esub = egress.add_subparsers(dest="egress_command", metavar="COMMAND")
    ls = esub.add_parser(
        "list", aliases=["ls"], help="list egress map entries, like `cilium-dbg bpf egress list`",
        description="List the egress map entries compiled from the policies, as `cilium-dbg bpf egress list` "
                    "prints them on the given node (the egress IP is only known on the gateway node itself; "
                    "without --node every gateway's egress IP is shown as its gateway node sees it).",
        epilog="Gateway IP 'Not Found': no node matches the gateway's nodeSelector (source nodes drop); "
               "'Excluded CIDR': an excludedCIDRs entry (normal masquerade). "
               "Exit status 1, with one line per problem and nothing listed, if an input file or document "
               "is bad: the files are loaded as a running agent would load them, all or nothing. "
               "With --socket, or --node without --cluster/--policies, the live map of a running "
               "agent is listed instead, followed by its gateways and which of them are down.",
    )
    _add_input_options(ls, node_required=False, files_required=False)
    _add_agent_options(ls)
    ls.add_argument("--down", action="append", metavar="NODE",
                    help="compile as if NODE were down (gateway health: the next matching node takes its "
                         "place); may be repeated; with --cluster/--policies only")
    ls.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format (table)")
    ls.add_argument("--show-policy", action="store_true",
                    help="add a column with the policy that wrote each entry and its policy id (the number the "
                         "datapath counts it under; in JSON the PolicyID and Policy keys, which a running "
                         "agent's list always has)")
    ls.set_defaults(func=_cmd_egress_list, parser=ls)


# ---------------------------------------------------------------- validate


def _cmd_validate(args):
    from .cluster import ClusterError
    from .compiler import Compiler

    cluster, policies = _load_inputs(args)
    try:
        host = cluster.nodes[args.node].with_host_interfaces(args.netns)
    except ImportError as exc:
        raise CLIError(f"cannot read interfaces: {exc}") from None
    except (OSError, ValueError, ClusterError) as exc:
        where = f"network namespace {args.netns!r}" if args.netns else "this host"
        raise CLIError(f"cannot read the interfaces of {where}: {exc}") from None
    cluster.nodes[args.node] = host
    compiler = Compiler(cluster, policies, node=args.node)
    served = failed = 0
    for policy in compiler.policies:
        for g in compiler.gateways(policy.name):
            if g.node != args.node:
                continue
            served += 1
            if g.problem:
                failed += 1
                _warn(f"error: policy {policy.name!r}: {g.problem}; SNAT cannot work without it")
                continue
            ips = [ip for ip, fam in ((g.egress_ip4, 4), (g.egress_ip6, 6)) if fam in policy.families]
            print(f"ok: policy {policy.name!r}: egress IP {', '.join(ips)} on interface {g.interface}")
    if not served:
        print(f"node {args.node} is the gateway of no egress gateway policy")
    return EXIT_ERROR if failed else EXIT_OK


def _add_validate(sub):
    v = sub.add_parser(
        "validate", help="check that this host holds the egress IPs it must serve",
        description="For every policy whose gateway is NODE, check with netlink (pyroute2) that the egress IP "
                    "it must SNAT to exists on one of this host's interfaces (or the namespace's, with --netns).",
        epilog="Exit status 0 if every egress IP is present, 1 otherwise or if an input file is bad "
               "(loaded as the agent loads them: all or nothing).",
    )
    _add_input_options(v, node_required=True)
    v.add_argument("--netns", metavar="NAME", help="read the interfaces of this network namespace instead")
    v.set_defaults(func=_cmd_validate)



# ------------------------------------------------------------------- agent


def _cmd_agent(args):
    import signal

    from .agent import DEFAULT_NAT_CAPACITY, DEFAULT_PIN_CAPACITY, DEFAULT_RT_PRIORITY, Agent, AgentError
    from .agent.rings import DEFAULT_RX_COALESCE_US, POD_RING_MIB
    from .health import FileLiveness, LivenessError, StaticLiveness

    source = _source(args)
    if source is None and (not args.cluster or not args.policies):
        raise CLIError("--cluster and --policies are required with --source file", EXIT_USAGE)
    if source is not None and (args.cluster or args.policies):
        raise CLIError(f"--cluster and --policies are for --source file, not {args.source}", EXIT_USAGE)
    nat_capacity = args.nat_capacity or DEFAULT_NAT_CAPACITY
    if args.nat_ipv6_capacity is not None and args.nat_ipv6_capacity > nat_capacity:
        raise CLIError(f"--nat-ipv6-capacity {args.nat_ipv6_capacity} is more than --nat-capacity "
                       f"{nat_capacity}", EXIT_USAGE)
    liveness = _liveness(args, FileLiveness, StaticLiveness, LivenessError)
    label_filter = _label_filter(args.labels)
    try:
        control = False if args.no_control_socket else (args.control_socket or True)
        agent = Agent(args.node, args.cluster, args.policies or (), source=source, netns=args.netns,
                      flow_log=args.flow_log,
                      flow_drop_rate=args.flow_drop_rate, metrics_port=args.metrics_port,
                      metrics_addr=args.metrics_addr, control_socket=control, ring_mode=args.ring_mode,
                      rx_coalesce_us=DEFAULT_RX_COALESCE_US if args.rx_coalesce_us is None else args.rx_coalesce_us,
                      pod_ring_mib=args.pod_ring_mib or POD_RING_MIB,
                      nat_capacity=nat_capacity,
                      nat_ipv6_capacity=args.nat_ipv6_capacity, pod_conn_limit=args.pod_conn_limit,
                      gateway_health=args.gateway_health == "on", liveness=liveness,
                      probe_interval=args.probe_interval, probe_misses=args.probe_misses,
                      stateful_failover=args.stateful_failover,
                      nat_state=False if args.no_nat_state else (args.nat_state or True),
                      label_filter=label_filter, cluster_name=args.cluster_name,
                      make_before_break=args.make_before_break,
                      pin_capacity=args.pin_capacity or DEFAULT_PIN_CAPACITY,
                      rt_priority=DEFAULT_RT_PRIORITY if args.rt_priority is None else args.rt_priority,
                      cpu=args.cpu, ipv6=not args.no_ipv6, underlay6=args.underlay6, workers=args.workers)
    except (AgentError, PermissionError, EgressError) as exc:
        raise CLIError(str(exc)) from None
    signal.signal(signal.SIGINT, lambda *a: agent.stop())
    signal.signal(signal.SIGTERM, lambda *a: agent.stop(keep_state=args.keep_state))
    signal.signal(signal.SIGHUP, lambda *a: agent.request_reload())
    status = sys.stderr if args.flow_log == "-" else sys.stdout   # stdout carries the flow log
    extra = "".join(f", {what} {where}" for what, where in (
        ("metrics", agent.metrics.url if agent.metrics else None),
        ("control socket", agent.control.path if agent.control else None)) if where)
    print(f"egresscore agent: node {args.node} ({agent.node_ip}), {len(agent.egress_map)} egress entries, "
          f"pods on {', '.join(agent.pod_interfaces) or 'none'}{extra}: ready",
          file=status, flush=True)
    try:
        agent.run()
    finally:
        agent.close()
    c = agent.counters()
    drops = ", ".join(f"{k} {v}" for k, v in c["drops"].items()) or "none"
    print(f"egresscore agent: node {args.node} stopped: rx {c['rx']}, tx {c['tx']}, "
          f"tx_local {c['tx_local']}, drops: {drops}", file=status, flush=True)
    return EXIT_OK


def _label_filter(rules):
    """--labels RULE...: Cilium's default label filter plus these rules (as Cilium's --labels)."""
    from .cluster import ClusterError, LabelFilter

    try:
        return LabelFilter(rules or ())
    except ClusterError as exc:
        raise CLIError(f"--labels: {exc}", EXIT_USAGE) from None


def _liveness(args, FileLiveness, StaticLiveness, LivenessError):
    """The agent's liveness providers from --liveness (auto: the source's own), --liveness-file and --down."""
    if args.liveness == "file" and not args.liveness_file:
        raise CLIError("--liveness file needs --liveness-file FILE", EXIT_USAGE)
    if args.liveness == "static" and not args.down:
        raise CLIError("--liveness static needs --down NODE[,NODE...]", EXIT_USAGE)
    out = ["auto"] if args.liveness == "auto" else []
    if args.liveness_file:
        try:
            out.append(FileLiveness(args.liveness_file))
        except LivenessError as exc:
            raise CLIError(f"--liveness-file: {exc}") from None
    if args.down:
        names = [n.strip() for n in args.down.split(",")]
        if not all(names):
            raise CLIError(f"--down {args.down!r}: a comma-separated list of node names", EXIT_USAGE)
        out.append(StaticLiveness(names))
    return out


def _source(args):
    """The --source of `egresscore agent`: None for the files (the Agent's own path)."""
    spec = args.source
    if spec in ("file", "files"):
        return None
    if spec.startswith("etcd://"):
        from .sources.etcd import EtcdSource

        return EtcdSource.from_url(spec, cluster=args.cluster_name, node=args.node)
    if spec in ("kubernetes", "k8s"):
        try:
            from .sources.kubernetes import KubernetesSource
        except ImportError as exc:
            raise CLIError(f"--source kubernetes: {exc}") from None
        try:
            return KubernetesSource(args.kubeconfig, context=args.context, node=args.node,
                                    lease_namespace=args.lease_namespace, lease_duration=args.lease_duration)
        except (ValueError, OSError) as exc:
            raise CLIError(f"--source kubernetes: {exc}") from None
    raise CLIError(f"--source {spec!r}: use file, etcd://HOST:PORT[/prefix] or kubernetes", EXIT_USAGE)


NAT_MAX_CAPACITY = 268_435_454  # the NAT table indexes connections in 28 bits


def _pin_count(text):
    """An argparse type: a pin table's capacity (4 to 2**24)."""
    n = _count(text, 1 << 24)
    if n < 4:
        raise argparse.ArgumentTypeError(f"{n} is out of range 4-{1 << 24}")
    return n


def _count(text, most=None):
    """An argparse type: a whole number from 1 to `most`."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1 or (most is not None and n > most):
        raise argparse.ArgumentTypeError(f"{n} is out of range 1-{most}" if most else f"{n} must be at least 1")
    return n


def _ipv6_count(text):
    """An argparse type for --nat-ipv6-capacity: a whole number from 0 (no
    IPv6 connections) to the table's most; checked against --nat-capacity
    when the agent starts."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= n <= NAT_MAX_CAPACITY:
        raise argparse.ArgumentTypeError(f"{n} is out of range 0-{NAT_MAX_CAPACITY}")
    return n


def _sched_arg(which):
    """An argparse type for --rt-priority / --cpu, checked as the Agent checks them."""
    def parse(text):
        from .agent.sched import check_sched

        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        try:
            check_sched(v, None) if which == "rt_priority" else check_sched(0, v)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return v
    return parse


def _pod_ring_mib(text):
    """An argparse type for --pod-ring-mib: whole MiB 1..1024."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= 1024:
        raise argparse.ArgumentTypeError(f"MiB 1..1024 expected, not {text!r}")
    return v


def _coalesce_us(text):
    """An argparse type for --rx-coalesce-us: whole microseconds 0..1000."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= 1000:
        raise argparse.ArgumentTypeError(f"microseconds 0..1000 expected, not {text!r}")
    return v


def _workers(text):
    """An argparse type for --workers: datapath threads 1..MAX_WORKERS."""
    try:
        return check_workers(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a worker count 1..{MAX_WORKERS} expected, not {text!r}") from None


def _seconds(text):
    """An argparse type: a positive number of seconds (at most 60)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v <= 60:
        raise argparse.ArgumentTypeError(f"{v} is out of range (0, 60]")
    return v


def _add_agent(sub):
    a = sub.add_parser(
        "agent", help="run this node's egress gateway datapath (daemon)",
        description="Run the userspace egress gateway for NODE: AF_PACKET rings on the underlay and the pod "
                    "veths (lxc-<pod>), the egress map compiled from the policies, SNAT, VXLAN to and from the "
                    "gateway.  SIGHUP re-reads the policy and cluster files, all or nothing: a bad file is logged "
                    "on one line and counted (stats: reloads.rejected), and the policies and cluster in force "
                    "keep working.  SIGINT/SIGTERM stop it and remove everything it installed (FIB rules tagged "
                    "proto 236, ip_local_port_range, egc-tnl0).  Started over a killed agent's leftovers, it "
                    "takes them over and restores the host's originals when it stops.  Needs no system tool.",
    )
    _add_input_options(a, node_required=True, files_required=False)
    a.add_argument("--source", default="file", metavar="file|etcd://HOST:PORT[/prefix]|kubernetes",
                   help="where the cluster and policies come from: the --cluster and --policies files "
                        "(default), etcd (the key layout is in egresscore.sources.etcd; an unreachable store "
                        "is an error, never a fallback to files), or the Kubernetes API")
    a.add_argument("--cluster-name", default="default", metavar="NAME",
                   help="the cluster's name: in the store's keys (<prefix>/v1/NAME/...) and as the "
                        "io.cilium.k8s.policy.cluster label selectors see (default 'default')")
    a.add_argument("--kubeconfig", metavar="FILE",
                   help="--source kubernetes: this kubeconfig (default: the in-cluster service account)")
    a.add_argument("--context", metavar="NAME", help="--source kubernetes: this kubeconfig context")
    a.add_argument("--lease-namespace", default="kube-node-lease", metavar="NS",
                   help="--source kubernetes: the namespace of the agents' Leases egresscore-NODE "
                        "(default kube-node-lease)")
    a.add_argument("--lease-duration", type=_count, default=10, metavar="SECONDS",
                   help="--source kubernetes: this agent's Lease leaseDurationSeconds (default 10; renewed "
                        "every third of it)")
    a.add_argument("--labels", action="append", metavar="RULE",
                   help="identity label rule added to Cilium's default filter, as Cilium's --labels: "
                        "'[source:][!]regexp' (e.g. 'k8s:!team', 'k8s:app'); repeatable")
    a.add_argument("--netns", metavar="NAME", help="run on the interfaces of this network namespace")
    a.add_argument("--flow-log", metavar="FILE",
                   help="write flow records (connection start/end, drops) as JSON lines to FILE "
                        "(rotated at 100 MB), or '-' for stdout; off by default")
    a.add_argument("--flow-drop-rate", type=float, default=100.0, metavar="N",
                   help="at most N drop records per second per drop reason (default 100)")
    a.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on PORT (off by default)")
    a.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                   help="address of the metrics endpoint (default 127.0.0.1)")
    a.add_argument("--control-socket", metavar="PATH",
                   help="the control socket for `egresscore nat list/stats` (default /run/egresscore/NODE.sock)")
    a.add_argument("--no-control-socket", action="store_true", help="do not open the control socket")
    a.add_argument("--nat-capacity", type=lambda v: _count(v, NAT_MAX_CAPACITY), metavar="N",
                   help="connections the NAT table holds (default 1000000, at most 268435454): 90 bytes "
                        "each plus the IPv6 pool, 93 MB of address space at the default, backed by the "
                        "kernel only as connections use it")
    a.add_argument("--nat-ipv6-capacity", type=_ipv6_count, metavar="N",
                   help="IPv6 connections the NAT table holds, at most --nat-capacity: 48 bytes each "
                        "(default: every connection up to 65536, then one in 16, at least 65536); a new "
                        "IPv6 connection beyond it is refused (nat_table_full) while IPv4 ones still fit")
    a.add_argument("--pod-conn-limit", type=_count, metavar="N",
                   help="at most N connections per source (pod) IP; more are refused (drop reason "
                        "pod_conn_limit, counted per pod in `egresscore stats`); off by default; "
                        "30 bytes more per connection of capacity")
    a.add_argument("--gateway-health", choices=("on", "off"), default="on",
                   help="'on' (default): gateways are chosen by Cilium's rules over the nodes that are up "
                        "(UDP heartbeats on port 4799 and --liveness); 'off': Cilium's exact choice")
    a.add_argument("--liveness", choices=("auto", "file", "static", "probes"), default="auto",
                   help="where gateways' liveness comes from, besides the probes (a gateway is down when "
                        "either says so): 'auto' (default): the source's own (etcd: the node's lease key; "
                        "kubernetes: its Lease egresscore-NODE; file: none); 'file': --liveness-file; "
                        "'static': --down; 'probes': the probes alone")
    a.add_argument("--no-ipv6", action="store_true",
                   help="leave the IPv6 datapath off: IPv6 pod traffic leaving the cluster is dropped (claimed) "
                        "instead of forwarded (default: on when the node has an IPv6 address on its underlay)")
    a.add_argument("--underlay6", action="store_true",
                   help="VXLAN between the nodes over their IPv6 addresses (default IPv4, as Cilium)")
    a.add_argument("--make-before-break", action="store_true",
                   help="connections keep the gateway they started on when a policy edit or a change of "
                        "the gateway set moves their pod (until they end or idle out; a gateway that goes "
                        "down releases them at once); new connections take the new gateway. Off by default "
                        "(one lookup per packet from a pod); turn it on on every node")
    a.add_argument("--pin-capacity", type=_pin_count, metavar="N",
                   help="with --make-before-break: connections remembered (default 65536, 16 bytes each)")
    a.add_argument("--liveness-file", metavar="FILE",
                   help="YAML/JSON {down: [node, ...]}: nodes whose liveness has expired, re-read when it changes")
    a.add_argument("--down", metavar="NODE[,NODE...]",
                   help="nodes to count as down (drained by hand), with any --liveness")
    a.add_argument("--probe-interval", type=_seconds, default=0.1, metavar="SECONDS",
                   help="heartbeat rounds to each gateway candidate (default 0.1: 10 a second)")
    a.add_argument("--probe-misses", type=_count, default=3, metavar="N",
                   help="a gateway missing N rounds in a row is down (default 3)")
    a.add_argument("--stateful-failover", action="store_true",
                   help="floating egress IPs (a policy's fixed egressIP that no node records and several "
                        "nodes match): the first node up holds it and replicates its connections to the next "
                        "(UDP 4800), which takes the address and the connections over when it fails")
    a.add_argument("--nat-state", metavar="PATH",
                   help="keep the NAT table in this file so connections outlive the agent (default "
                        "/run/egresscore/NODE.nat): a restarted agent adopts them")
    a.add_argument("--no-nat-state", action="store_true",
                   help="keep the NAT table in process memory only: a restart loses every connection")
    a.add_argument("--keep-state", action="store_true",
                   help="on SIGTERM, leave the NAT state file and the kernel claims for the next agent (an "
                        "upgrade: stop, start the new one, which adopts them); SIGINT still removes everything")
    a.add_argument("--ring-mode", choices=("latency", "batch"), default="latency",
                   help="RX rings: 'latency' hands each frame over as it lands (default); 'batch' hands "
                        "over blocks, at most 1 ms late: fewer wake-ups, more small packets per CPU second")
    a.add_argument("--pod-ring-mib", type=_pod_ring_mib, metavar="MIB",
                   help="kernel memory of each pod veth's RX ring, per worker (default 32: 16,384 frames at MTU "
                        "1500, 164 ms of a 100 kpps burst while the datapath thread waits for a core); a node "
                        "with many pods may want less")
    a.add_argument("--rx-coalesce-us", type=_coalesce_us, metavar="US",
                   help="under dense traffic the datapath thread naps US microseconds between batches instead "
                        "of being woken per frame (default 100; 0: off): fewer wake-ups "
                        "and TX kicks per small packet, at most US more per hop; idle, it sleeps in poll()")
    a.add_argument("--rt-priority", type=_sched_arg("rt_priority"), metavar="N",
                   help="SCHED_FIFO priority of the datapath thread alone (default 10; 0: normal "
                        "scheduling), so a woken loop does not wait behind other work; it blocks in poll() when "
                        "idle, and kernel.sched_rt_runtime_us bounds it; not permitted: one line, normal priority")
    a.add_argument("--cpu", type=_sched_arg("cpu"), metavar="N",
                   help="pin the datapath thread to CPU N (default: not pinned)")
    a.add_argument("--workers", type=_workers, default=1, metavar="N",
                   help="datapath threads (default 1), "
                        "each with its own rings (a fanout group per interface) and NAT table over a slice "
                        "of the NAT port range; replies are steered "
                        "to the owner of their port, a pod's traffic by its (IP, port); not with "
                        "--stateful-failover")
    a.set_defaults(func=_cmd_agent)


# ------------------------------------------------- the store: apply, delete, get


def _store(args):
    from .sources.etcd import EtcdStore

    return EtcdStore.from_url(args.store, cluster=args.cluster_name)


def _add_store_options(p):
    import os

    p.add_argument("--store", default=os.environ.get("EGRESSCORE_STORE", "etcd://127.0.0.1:2379"),
                   metavar="etcd://HOST:PORT[/prefix]", help="the cluster store (default $EGRESSCORE_STORE or "
                   "etcd://127.0.0.1:2379)")
    p.add_argument("--cluster-name", default="default", metavar="NAME", help="the cluster's name in the keys")


def _cmd_apply(args):
    store = _store(args)
    for path in args.file:
        for key in store.apply_file(path):
            print(f"{key[len(store.root):]} configured")
    return EXIT_OK


def _cmd_delete(args):
    store = _store(args)
    if not store.delete(args.kind, args.name, args.namespace):
        raise CLIError(f"{args.kind} {args.name!r} not found in {store.address}")
    print(f"{args.kind} {args.name!r} deleted")
    return EXIT_OK


def _cmd_get(args):
    store = _store(args)
    items = store.get(args.kind)
    if args.output == "json":
        print(json.dumps([doc for _, doc in items], indent=2, sort_keys=True))
        return EXIT_OK
    rows = [(key[len(store.root):].split("/", 1)[1], doc.get("error", "")) for key, doc in items]
    width = max([len(r[0]) for r in rows] + [4])
    print(f"{'NAME':<{width}}  PROBLEM")
    for name, problem in rows:
        print(f"{name:<{width}}  {problem}".rstrip())
    return EXIT_OK


def _add_store(sub):
    a = sub.add_parser("apply", help="write policies and cluster objects from a file into the store (kubectl-style)",
                       description="Every CiliumEgressGatewayPolicy document and every node, namespace and pod "
                                   "of a cluster file in FILE, checked whole first (one bad object: nothing is "
                                   "written), then written to the store; agents following it apply them.")
    a.add_argument("-f", "--file", action="append", required=True, metavar="FILE")
    _add_store_options(a)
    a.set_defaults(func=_cmd_apply)
    d = sub.add_parser("delete", help="delete one object from the store")
    d.add_argument("kind", choices=("policy", "node", "pod", "namespace", "policies", "nodes", "pods", "namespaces"))
    d.add_argument("name")
    d.add_argument("-n", "--namespace", default="default", help="a pod's namespace (default 'default')")
    _add_store_options(d)
    d.set_defaults(func=_cmd_delete)
    g = sub.add_parser("get", help="list the objects of one kind in the store")
    g.add_argument("kind", choices=("policies", "nodes", "pods", "namespaces", "policy", "node", "pod",
                                    "namespace"))
    g.add_argument("-o", "--output", choices=("names", "json"), default="names")
    _add_store_options(g)
    g.set_defaults(func=_cmd_get)


# -------------------------------------------------------------------- demo


def _cmd_demo(args):
    from .demo import run_demo

    return run_demo(quiet=args.quiet, store=args.store, ipv6=not args.ipv4_only)


def _add_demo(sub):
    d = sub.add_parser(
        "demo", help="the egress gateway end to end in a network-namespace lab (root)",
        description="Build the dual-stack lab (four nodes, two pods, a router, external servers in network "
                    "namespaces), apply examples/egress-sample-dual.yaml, start an agent per node, send TCP, UDP "
                    "and ping from app1 and app2 over IPv4 and IPv6, print the egress list and the source address "
                    "each server saw, tear down.",
    )
    d.add_argument("-q", "--quiet", action="store_true", help="only the result tables")
    d.add_argument("--store", choices=("files", "etcd"), default="files",
                   help="etcd: start an etcd on 127.0.0.1 for the lab, load the cluster and policy into it, run "
                        "the agents on it (--source etcd://), then `egresscore apply` a second policy and "
                        "`egresscore delete` it while app1's requests run, and show the source address change")
    d.add_argument("--ipv4-only", action="store_true",
                   help="the IPv4 lab and examples/egress-sample.yaml (default: the dual-stack lab and "
                        "examples/egress-sample-dual.yaml, IPv6 rows beside the IPv4 ones)")
    d.set_defaults(func=_cmd_demo)


# -------------------------------------------------------------------- main


COMMANDS = [_add_egress, _add_validate, _add_agent, _add_demo, _add_nat, _add_stats, _add_store]


def _usage(parser):
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="egresscore",
        description="A userspace egress gateway compatible with Cilium's CiliumEgressGatewayPolicy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None):
    from .inputs import InputError

    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except CLIError as exc:
        _warn(f"error: {exc}")
        return exc.code
    except InputError as exc:  # one line per rejected file or document
        for err in exc.errors:
            _warn(f"error: {err}")
        return EXIT_ERROR
    except (ValueError, OSError, EgressError) as exc:  # bad input files, unreadable paths, a store away
        _warn(f"error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
