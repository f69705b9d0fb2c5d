"""The agent: one node's egress gateway, the datapath plus everything around it.

    agent = egresscore.Agent(node="node1", cluster="cluster.yaml",
                             policies=["policies/"], netns=None)
    agent.run()          # until agent.stop(), SIGINT or SIGTERM (CLI)
    agent.counters()     # any time, from any thread

An Agent owns, for its node:
- the control plane: the cluster model, the policies, a Compiler filling an
  EgressMap (changes are applied in place while the datapath reads it);
- the NatTable (masquerade to the node IP and SNAT to this node's egress IPs);
- the fused Datapath and its AF_PACKET rings: one on the underlay interface
  (eth0) and one per local pod veth (`lxc-<pod name>` by default), TPACKET_V2
  so each frame is handed over as it lands (no block timer in the latency);
  RX slots of one MTU-sized frame, 32 MiB (16,384 frames) on the underlay and
  on each pod (egresscore.agent.rings); super-packets come whole through the socket;
  the loop runs in C (Datapath.run: NAT gc every 20 ms in C, naps under
  dense traffic), back in Python only when woken for control work (and
  every poll_ms, 60 s, as a backstop), so its thread rarely waits for the
  GIL (Datapath.loop_counters: gil_wait_max_us, away_max_us); the
  thread in run() alone is SCHED_FIFO, priority 10 (rt_priority,
  egresscore.agent.sched), so a woken loop does not wait for a core;
- the host work, on a host thread that lives in the node's namespace
  (egresscore.agent.host; netlink through pyroute2 and /proc/sys, no system tool,
  no subprocess): the claims on the kernel stack, removed again by close()
  (blackhole FIB rules, tagged protocol 236, before the `local` table's rule,
  which moves from priority 0 to 43: pod traffic leaving the cluster, VXLAN to
  the node, the NAT port range on every local address; a kernel
  `ip_local_port_range` disjoint from the NAT port range; the tunnel offload
  device `egc-tnl0`, below), and the host's originals in a state file,
  /run/egresscore/<node>[@<netns>].host.json, so that an agent started over a
  killed one's leftovers takes them over (one line on stderr) and the last one
  to stop restores the true originals.  A second agent for the same node and
  namespace is refused (the state file's lock).

Neighbour MACs (router, other nodes) and the default route come from netlink
events (after one dump) on the host thread; missing ones are probed once a
second with an empty UDP datagram to the discard port (the kernel ARPs).  Each
change is queued for the loop thread, like control changes, so the datapath
thread only moves packets: its one blocking call is the ring poll in C.  Pod
veths are looked up and their rings opened and claimed on the host thread too;
the loop thread only attaches them.  Pod MACs are learnt by the datapath from
the pods' own frames.

Offloads: pods' veths hand over TSO/GSO super-packets (up to 64 KiB) with a
partial checksum.  The rings use PACKET_VNET_HDR (vnet_hdr=True, the default):
each frame comes with its virtio_net_hdr; a partial checksum is completed, a
TCP super-packet leaving towards the router or a local pod passes whole (the
kernel segments it on transmit, from the virtio_net_hdr we write; it is
rewritten in its RX slot and sent from there with one copy), and one
bound for the VXLAN tunnel passes whole too, through the tunnel offload
(tunnel_offload=True, the default): a TX ring on a kernel vxlan device,
`egc-tnl0`, that the agent creates with a static FDB entry per node
(egresscore.agent.tunnel).  The kernel encapsulates and cuts the super-packet
after encapsulation; the receiving agent gets it as one frame and
decapsulates it whole.  If the device cannot be created (another vxlan
device holds the VNI and port), the agent says so and cuts tunnel-bound
super-packets into MTU-sized segments in C instead.  With vnet_hdr=False,
turn tx checksumming, TSO and GSO off on the pod side instead
(egresscore.lab.offloads.disable_offloads).

Observability (all off by default; egresscore.flowlog, .metrics, .control, wired by
egresscore.agent.services):
- flow_log: connection start/end records (from the NAT table) and
  rate-limited drop records (from the datapath), enriched with the pod and the
  policy, to stdout (True or "-"), a rotating file (a path), a callback, or
  sink objects; drained by two threads that never make the datapath wait.
- metrics_port: a Prometheus endpoint on metrics_addr (loopback by default).
- control_socket: a Unix socket (True: /run/egresscore/<node>.sock, or
  <node>@<netns>.sock with netns) for
  `egresscore nat list`, `egresscore egress list --node`, `egresscore stats`.
stats() is the one counters dict behind all three.

Inputs (egresscore.inputs): start, set_policies, reload and SIGHUP load the
cluster and policy files through one path, all or nothing.  A bad file at
start is an error and the agent does not start; on reload or set_policies the
policies and cluster in force keep working, one line on stderr says why, and
stats()["reloads"] counts accepted and rejected reloads (with the time and
error of the last rejection; metrics egresscore_config_reloads_total{result}).
reload() and set_policies() raise InputError; SIGHUP only logs and counts.
A cluster file may not drop this agent's node nor change its IP.

Gateway health (egresscore.health; gateway_health=True by default): the
agent answers heartbeats on its node IP, UDP HEARTBEAT_PORT (4799), on its own
thread, and probes every node that matches some policy's gateway selector
(10 rounds a second, down after 3 missed rounds, up after 2 answered ones),
on a health thread that also asks the liveness providers (by default the
source's own: with etcd, a node whose lease key is gone; with Kubernetes, a
node whose Lease egresscore-<node> is not renewed within its duration;
egresscore.sources).  A gateway is down when its liveness expired or its
probes failed.  A change of the
down set recompiles there (Compiler.set_down: only the affected policies'
entries are rewritten, in place, while the datapath reads the map), under
the control lock as every control change; the loop thread only receives
results.  gateway_health=False is Cilium's exact choice (the agent still
answers heartbeats).  gateway_health() says who is down and why.

Stateful failover (egresscore.agent.failover; stateful_failover=True): the
floating egress IPs move with the health layer's choice, and the active
gateway's connections are replicated to its standby on UDP REPLICATION_PORT
(4800) from a replication thread; the table writes that replication needs
(the standby's applies, the active's export chunks) are loop-thread jobs.
Spill (policy annotation egresscore.io/extra-egress-ips): on a gateway, the
NAT's spill chains follow the compiled policies (Compiler.spill_chains), set
on the loop thread when they change: a new connection whose egress IP has no
free port takes one on the next extra IP (NatTable.set_spill);
stats()["nat"]["spill"] and the per-IP port use show it.
Make-before-break (make_before_break=True): the datapath pins each
connection from a local pod to the gateway it started on, and as a gateway
keeps translating connections it has a NAT entry for after the map moved
them away; when the health thread finds a gateway down, the loop thread
drops that gateway's pins (Datapath.flush_gateway) right after the
recompile, so its connections take the next gateway at their next packet.

Thread model: the datapath and the NAT table have one writer, the thread in
run()/step().  Control changes (set_policies, reload, upsert_pod, a source's
snapshots and changes, a gateway-health change) may come from any thread:
they are compiled on that thread under the control lock (the compiler writes
the egress map in place, each write published atomically for the datapath's
lock-free readers), and only their results for the datapath (node rows, pod
ports) are queued for the loop thread between batches (applied directly when
no loop runs).  Files are read and parsed on the
calling thread (for SIGHUP, a short-lived reload thread; with step() and no
run(), on the thread calling step()), never by the loop thread of run().
Host work runs on the host thread and hands its datapath writes to the loop
thread the same way.
"""
import os
import queue
import signal
import socket
import sys
import threading
import time

from pyroute2.netlink.exceptions import NetlinkError

from .._core import Datapath, EgressMap, NatStateError
from .._gcpause import freeze_heap, gc_watch
from .._steer import check_workers
from ..cluster import DEFAULT_CLUSTER_NAME, Cluster, ClusterError, Pod
from ..compiler import Compiler
from ..control import default_socket_path
from ..health import HEARTBEAT_PORT, GatewayHealth, LivenessProvider, Prober, Responder
from ..inputs import InputError, check_policies, load_inputs
from ..policystats import PolicyCounters
from ..replication import REPLICATION_PORT
from . import ipv6
from .feed import Feed, FeedStats, OwnNodeError, SourceRunner, check_own_node
from .host import (
    AgentError,
    HostThread,
    Neighbours,
    check_netns,
    link_facts,
    nat_state_path,
    set_up_host,
    where,
)
from .rings import DEFAULT_RX_COALESCE_US, POD_RING_MIB, RING_MODES, RingPlan
from .sched import DEFAULT_RT_PRIORITY, ThreadSched
from .services import start_services
from .tunnel import TunnelDevice
from .workers import DatapathGroup, Parking, WorkerRings, make_nat

DEFAULT_NAT_PORTS = (32768, 65534)
# Connections the NAT table holds: a gateway's worth.  About 93 bytes each
# (NatTable.memory_bytes / capacity, indexes and IPv6 pool included): 93 MB allocated at the
# default, backed by the kernel only as connections use it.
DEFAULT_NAT_CAPACITY = 1_000_000
DEFAULT_PIN_CAPACITY = 65536    # make-before-break: connections from this node's pods that keep their gateway
DEFAULT_KERNEL_PORTS = (20000, 32767)
PORT_RANGE_SYSCTL = "net.ipv4.ip_local_port_range"
__all__ = ["DEFAULT_KERNEL_PORTS", "DEFAULT_NAT_CAPACITY", "DEFAULT_NAT_PORTS", "DEFAULT_PIN_CAPACITY", "RING_MODES",
           "Agent", "AgentError"]


def _pod_ifname(pod):
    return "lxc-" + pod.name


class Agent:
    """One node's egress gateway agent (see the module docstring).

    node: this node's name in `cluster`; cluster: a Cluster or a cluster YAML
    path; policies: EgressPolicy objects or policy file/folder paths.
    source: instead of cluster and policies, a cluster-state source
    (egresscore.sources: FilesSource, EtcdSource, KubernetesSource): the agent
    is built on its first snapshot (a source that fails first, or sends none
    within source_timeout seconds, is a SourceStartError naming its address)
    and then follows it as a SourceSink (resync, apply) on the source's thread.
    netns: run on this network namespace's interfaces (the lab's nodes); one
    that does not exist (/run/netns/NAME) is an AgentError, and nothing is created.
    ring_mode: "latency" (default; RX frames handed over one by one: about
    0.1 ms per hop) or "batch" (in blocks, at most 1 ms late: fewer wake-ups,
    more small packets per CPU second; see the README's agent benchmark).
    pod_ring_mib: kernel memory of each pod veth's RX ring (default
    POD_RING_MIB, 32: 16,384 frames at MTU 1500, 164 ms of a 100 kpps burst
    while the datapath thread waits for a core; one ring per worker).
    rx_coalesce_us: under dense traffic the loop naps this long between
    batches instead of being woken per frame (Datapath.run; default
    DEFAULT_RX_COALESCE_US, 0: off): fewer wake-ups and TX kicks per small
    packet, a frame waits at most this much more; idle, it sleeps in poll().
    tunnel_offload: hand tunnel-bound TCP super-packets to a kernel vxlan
    device (egc-tnl0) instead of cutting them here.
    nat_capacity: connections the NAT table holds (default 1,000,000, at most
    268,435,454); 90 bytes each plus the IPv6 pool (93 MB of address space at the
    default), touched only as connections use them: an idle agent stays small.
    nat_ipv6_capacity: IPv6 connections the NAT table's address pool holds
    (48 bytes each; default None: every connection up to 65,536, then one in
    16, at least 65,536); at most nat_capacity.  A new IPv6 connection beyond
    it is refused (nat_table_full) while IPv4 ones still fit.
    pod_conn_limit: at most this many connections per source (pod) IP (off
    by default); refusals are counted per pod in stats()["nat"]; 30 bytes
    more per connection of capacity.
    gateway_health: choose gateways over the nodes that are up (default);
    False: Cilium's exact choice.  liveness: LivenessProvider(s) consulted
    besides the probes, and "auto" (the default) for the source's own: its
    etcd leases, its Kubernetes Leases (files: none); probe_interval (s), probe_misses, probe_rises: the
    heartbeat rounds (egresscore.health); heartbeat_port: UDP port answered
    and probed.
    make_before_break: when a pod's gateway changes while the old one is up
    (a policy edit, a label change, a gateway added), its connections keep
    the old gateway until they end or idle out (the NAT timeouts) and new
    ones take the new (Datapath.set_make_before_break; off by default: one
    pin lookup per packet from a pod, see the README's datapath figures);
    a gateway that goes down releases its connections at once.  Turn it on
    on every node: a gateway keeps translating the connections it holds
    only with it.  pin_capacity: connections remembered (16 bytes each).
    nat_state: where the NAT table lives so that its connections outlive the
    agent (True, the default: /run/egresscore/<node>[@<netns>].nat; a path;
    False: in anonymous memory, lost with the process).  An agent started on
    it adopts the connections of the one before (killed, or stopped with
    stop(keep_state=True)); a file it cannot use is set aside and the table
    starts empty (one line on stderr either way).
    label_filter (a cluster.LabelFilter; default Cilium's default filter) and
    cluster_name (io.cilium.k8s.policy.cluster): the identity labels the
    policies' selectors see, as Compiler takes them.
    stateful_failover: floating egress IPs (a fixed egressIP no node records,
    matched by several nodes) held by the first node up and replicated to
    the next, which takes them and their connections over
    (egresscore.agent.failover; needs gateway health); replication_port:
    its UDP port on the node IP.
    rt_priority: SCHED_FIFO priority of the datapath thread alone (default
    10; 0: normal scheduling), so that a woken loop does not wait behind
    other work; cpu: pin that thread to this CPU (default: not pinned).
    Not permitted: one line on stderr, normal priority (egresscore.agent.sched).
    ipv6: forward IPv6 pod traffic too (default) when the node has an IPv6
    address (egresscore.agent.ipv6.node_ip6: the first global IPv6 of its
    underlay interface in the cluster) that is on its underlay; otherwise
    IPv6 pod traffic leaving the cluster is only claimed (dropped: the kernel
    never forwards it).  underlay6: VXLAN between the nodes over their IPv6
    addresses (every node needs one; no tunnel offload); default IPv4, as
    Cilium.  See docs/ipv6-datapath.md.
    workers: datapath threads (default 1), each with its own rings (one
    cBPF fanout group per interface), Datapath and NAT table over a slice of
    nat_port_range and nat_capacity / workers connections; replies are
    steered to the worker owning their port, a pod's traffic by its (IP,
    port) (egresscore.agent.workers, egresscore._steer).  rt_priority
    applies to every worker, cpu pins worker 0 only; not with
    stateful_failover.
    """

    def __init__(self, node, cluster=None, policies=(), *, netns=None, underlay="eth0", vni=2,
                 vxlan_port=8472, mtu=1500, nat_port_range=DEFAULT_NAT_PORTS,
                 kernel_port_range=DEFAULT_KERNEL_PORTS, nat_capacity=DEFAULT_NAT_CAPACITY,
                 nat_ipv6_capacity=None, pod_conn_limit=None,
                 pod_ifname=_pod_ifname, claim=True, poll_ms=60000, vnet_hdr=True, tunnel_offload=True,
                 ring_mode="latency", rx_coalesce_us=DEFAULT_RX_COALESCE_US, pod_ring_mib=POD_RING_MIB,
                 nat_timeouts=None, nat_state=True,
                 flow_log=None, flow_log_capacity=65536, flow_drop_rate=100.0,
                 metrics_port=None, metrics_addr="127.0.0.1", control_socket=None,
                 gateway_health=True, liveness="auto", probe_interval=0.1, probe_misses=3, probe_rises=2,
                 heartbeat_port=HEARTBEAT_PORT, source=None, source_timeout=10.0,
                 label_filter=None, cluster_name=DEFAULT_CLUSTER_NAME, stateful_failover=False,
                 replication_port=REPLICATION_PORT, make_before_break=False, pin_capacity=DEFAULT_PIN_CAPACITY,
                 rt_priority=DEFAULT_RT_PRIORITY, cpu=None, ipv6=True, underlay6=False, workers=1):
        self.workers = check_workers(workers)
        if workers > 1 and stateful_failover:
            raise ValueError("stateful_failover replicates one NAT table: not with workers > 1 (yet)")
        if nat_ipv6_capacity is not None and (isinstance(nat_ipv6_capacity, bool)
                                              or not isinstance(nat_ipv6_capacity, int)
                                              or not 0 <= nat_ipv6_capacity <= nat_capacity):
            raise ValueError(f"nat_ipv6_capacity must be an integer in 0..nat_capacity ({nat_capacity}) "
                             f"or None, not {nat_ipv6_capacity!r}")
        if not isinstance(rx_coalesce_us, int) or not 0 <= rx_coalesce_us <= 1000:
            raise ValueError(f"rx_coalesce_us must be an integer in 0..1000, not {rx_coalesce_us!r}")
        liveness = self._liveness_of(liveness, source, node, gateway_health)
        # the datapath thread's scheduling (egresscore.agent.sched), checked before any work
        self._sched = ThreadSched(rt_priority, cpu, label=f"egresscore agent {node}")
        gc_watch()  # GC passes counted from the start (stats: python_gc)
        runner = None
        if source is not None:  # the first snapshot is the cluster and policies at start (no file fallback)
            if cluster is not None or policies:
                raise TypeError("give either a source or a cluster and policies, not both")
            runner = SourceRunner(source)
            snap = runner.start(source_timeout)
            cluster, policies = Cluster(snap.nodes, snap.namespaces, snap.pods), list(snap.policies)
        try:
            self._build(node, cluster, policies, runner, netns=netns, underlay=underlay, vni=vni,
                        vxlan_port=vxlan_port, mtu=mtu, nat_port_range=nat_port_range,
                        kernel_port_range=kernel_port_range, nat_capacity=nat_capacity,
                        nat_ipv6_capacity=nat_ipv6_capacity, pod_conn_limit=pod_conn_limit,
                        pod_ifname=pod_ifname, claim=claim, poll_ms=poll_ms,
                        vnet_hdr=vnet_hdr, tunnel_offload=tunnel_offload, ring_mode=ring_mode,
                        pod_ring_mib=pod_ring_mib, nat_timeouts=nat_timeouts, nat_state=nat_state, flow_log=flow_log,
                        flow_log_capacity=flow_log_capacity, flow_drop_rate=flow_drop_rate,
                        metrics_port=metrics_port, metrics_addr=metrics_addr, control_socket=control_socket,
                        health=dict(gateway_health=gateway_health, liveness=liveness,
                                    probe_interval=probe_interval, probe_misses=probe_misses,
                                    probe_rises=probe_rises, heartbeat_port=heartbeat_port,
                                    stateful_failover=stateful_failover, replication_port=replication_port,
                                    make_before_break=make_before_break, pin_capacity=pin_capacity),
                        identity=dict(label_filter=label_filter, cluster_name=cluster_name),
                        families=dict(ipv6=ipv6, underlay6=underlay6))
        except BaseException:
            if runner is not None:
                runner.stop()
            raise
        self.datapath.rx_coalesce_us = rx_coalesce_us
        if runner is None:
            self._source_stats.update(address=f"files {self._cluster_path or '(objects)'}", connected=True)
        else:
            self._source = runner
            self._source_stats.update(name=source.name, address=source.describe(), connected=True, resyncs=1,
                                      last_revision=snap.revision, last_change_at=FeedStats.now())
            runner.attach(self)

    @staticmethod
    def _liveness_of(liveness, source, node, wanted=True):
        """The liveness providers: "auto" is the source's own (etcd leases,
        Kubernetes Leases; none for files), asked for before the source runs
        (a Kubernetes source then also watches the Leases); a source without
        a node of its own publishes this one's liveness."""
        if isinstance(liveness, (LivenessProvider, str)):
            liveness = [liveness]
        out = []
        for p in liveness:
            if isinstance(p, str):
                if p != "auto":
                    raise ValueError(f"liveness: {p!r} is not 'auto' nor a LivenessProvider")
                if source is not None:
                    if getattr(source, "node", node) is None:
                        source.node = node
                    own = source.liveness() if wanted else None
                    if own is not None:
                        out.append(own)
            elif isinstance(p, LivenessProvider):
                out.append(p)
            else:
                raise TypeError(f"liveness: {type(p).__name__} is not a LivenessProvider")
        return out

    def _build(self, node, cluster, policies, runner, *, netns, underlay, vni, vxlan_port, mtu, nat_port_range,
               kernel_port_range, nat_capacity, nat_ipv6_capacity, pod_conn_limit, pod_ifname, claim, poll_ms, vnet_hdr,
               tunnel_offload, ring_mode, pod_ring_mib, nat_timeouts, nat_state, flow_log, flow_log_capacity,
               flow_drop_rate, metrics_port, metrics_addr, control_socket, health, identity, families):
        # the one loading path (egresscore.inputs): a bad input is an error, the agent does not start
        self._cluster_path = os.fspath(cluster) if isinstance(cluster, (str, os.PathLike)) else None
        self._policy_paths, policies = self._policies_from(policies)
        cluster, policies = self._check_arguments(node, cluster, policies, netns, nat_port_range,
                                                  kernel_port_range)
        self.node = node
        self.netns = netns
        self.underlay = underlay
        self.nat_port_range = tuple(nat_port_range)
        self.kernel_port_range = tuple(kernel_port_range)
        self.claim = claim
        self.poll_ms = poll_ms
        self._vxlan_port = vxlan_port
        self._rings_plan = RingPlan(vnet_hdr=vnet_hdr, mtu=mtu, ring_mode=ring_mode, pod_ring_mib=pod_ring_mib)
        self.vnet_hdr = self._rings_plan.vnet_hdr
        if self.workers > 1:  # a ring per worker on every interface, in one cBPF fanout group
            self._rings_plan = WorkerRings(self._rings_plan, self.workers, self.nat_port_range, vxlan_port)
        self.ring_mode = ring_mode
        self._pod_ifname = pod_ifname
        self._init_state()
        self.gateway_health_on = bool(health["gateway_health"])
        self._liveness = list(health["liveness"])
        probe_interval, probe_misses = health["probe_interval"], health["probe_misses"]
        probe_rises, heartbeat_port = health["probe_rises"], health["heartbeat_port"]
        if probe_interval <= 0 or probe_misses < 1 or probe_rises < 1:
            raise ValueError("probe_interval must be positive, probe_misses and probe_rises at least 1")
        if nat_port_range[0] <= heartbeat_port <= nat_port_range[1] or heartbeat_port == vxlan_port:
            # the claims blackhole those ports: heartbeats would never reach the responder
            raise ValueError(f"heartbeat_port {heartbeat_port} must be outside nat_port_range {nat_port_range} "
                             f"and not the VXLAN port")
        self.node_ip = cluster.nodes[node].gateway_ip
        socket_path = (os.fspath(control_socket) if control_socket and control_socket is not True
                       else default_socket_path(node, netns))
        self._host = HostThread(netns, name=f"egresscore-host-{node}").start()
        try:
            host = set_up_host(self._host, node, netns, underlay=underlay, node_ip=self.node_ip,
                               socket_path=socket_path, claim=claim, vxlan_port=vxlan_port,
                               nat_port_range=self.nat_port_range, kernel_port_range=self.kernel_port_range)
            self._state, self._claims = host.state, host.claims
            self._underlay_index, self.node_mac, local = host.underlay_index, host.node_mac, host.local_ips
            self.egress_map = EgressMap()
            try:
                # one table, or one per worker over its slice of the port range (egresscore.agent.workers)
                self.nat = make_nat(self.workers, self.nat_port_range, nat_state_path(node, netns, nat_state),
                                    f"egresscore agent {node}", capacity=-(-nat_capacity // self.workers),
                                    timeouts=nat_timeouts, per_source_limit=pod_conn_limit,
                                    ipv6_capacity=(None if nat_ipv6_capacity is None
                                                   else -(-nat_ipv6_capacity // self.workers)))
            except NatStateError as exc:   # held by another process, or not creatable
                raise AgentError(str(exc)) from None
            if self.nat.state is not None:
                print(f"egresscore agent {node}: {self.nat.state['message']}", file=sys.stderr, flush=True)
            for ip in local + host.local_ips6:
                self.nat.add_egress_ip(ip)
            self._local_ips = set(local)
            self.node_ip6 = self._ipv6_facts(cluster, families, host.local_ips6)
            self.underlay6 = bool(families["underlay6"])
            dps = [Datapath(self.node_ip, self.node_mac, self.egress_map, nat, vni=vni,
                            vxlan_port=vxlan_port, mtu=mtu, nat_port_range=self.nat_port_range,
                            node_ip6=self.node_ip6, underlay6=self.underlay6)
                   for nat in (self.nat.members if self.workers > 1 else [self.nat])]
            self.datapath = DatapathGroup(dps) if self.workers > 1 else dps[0]
            if health["make_before_break"]:
                self.datapath.set_make_before_break(True, capacity=health["pin_capacity"])
            self.compiler = Compiler(cluster, policies, node=node, egress_map=self.egress_map, **identity)
            self.policy_counters = PolicyCounters(self.datapath.policy_counters, self.compiler, node=node,
                                                  port_usage=self.nat.port_usage)
            self.compiler.on_policy_id = self.policy_counters.on_policy_id
            self.cluster = self.compiler.cluster
            self._feed = Feed(self.compiler)
            self._open_underlay(underlay)
            if tunnel_offload and self.vnet_hdr and not self.underlay6:  # the offload device is IPv4's
                self._open_tunnel(vni, vxlan_port, mtu)
            self._start_forwarding(claim)
            self._start_health(heartbeat_port, probe_interval, probe_misses, probe_rises)
            start_services(self, flow_log=flow_log, capacity=flow_log_capacity, drop_rate=flow_drop_rate,
                           metrics_port=metrics_port, metrics_addr=metrics_addr, control_socket=control_socket)
            if health["stateful_failover"]:
                self._start_failover(health["replication_port"])
        except BaseException:
            self._keep_nat_file = True  # an adopted table stays for the next try
            self.close()  # nothing half-installed stays behind
            raise

    def _ipv6_facts(self, cluster, families, local6):
        """The node's IPv6 address for the datapath (None: IPv6 off), from the cluster, checked
        against the underlay's addresses; underlay6 without one is an AgentError."""
        ip6 = ipv6.node_ip6(cluster.nodes[self.node]) if families["ipv6"] or families["underlay6"] else None
        if ip6 is not None and ip6 not in local6:
            print(f"egresscore agent {self.node}: {ip6} (the node's IPv6 address in the cluster) is not on "
                  f"{self.underlay}{self._where()}: IPv6 pod traffic is dropped, not forwarded",
                  file=sys.stderr, flush=True)
            ip6 = None
        if families["underlay6"] and ip6 is None:
            raise AgentError(f"underlay6: node {self.node} has no IPv6 address on {self.underlay}{self._where()}")
        return ip6

    def _check_arguments(self, node, cluster, policies, netns, nat_port_range, kernel_port_range):
        """The cluster and policies in force at start, once every argument is
        checked: a bad one raises before anything is touched."""
        loaded = load_inputs(self._cluster_path, self._policy_paths)
        if loaded.cluster is not None:
            cluster = loaded.cluster
        if not isinstance(cluster, Cluster):
            raise TypeError(f"cluster must be a Cluster or a path, not {type(cluster).__name__}")
        if node not in cluster.nodes:
            raise ValueError(f"node {node!r} is not in the cluster (nodes: {', '.join(sorted(cluster.nodes))})")
        if loaded.policies is not None:
            policies = loaded.policies
        check_netns(netns)  # before anything: pyroute2 would create a missing namespace
        if nat_port_range[1] >= 65535:
            raise ValueError("nat_port_range must end at 65534 or below")
        lo, hi = kernel_port_range
        if not (hi < nat_port_range[0] or lo > nat_port_range[1]):
            raise ValueError(f"kernel_port_range {kernel_port_range} overlaps nat_port_range {nat_port_range}")
        if not cluster.nodes[node].gateway_ip:
            raise ValueError(f"node {node!r} has no IPv4 internal IP")
        return cluster, policies

    def _init_state(self):
        """The agent's own state, empty: ports, queues, reload counters, rings, services."""
        self._ports = {}  # pod key -> (port, ifname)
        self._node_index = {}
        self._queue = queue.Queue()
        self._stop = threading.Event()
        self._reload = threading.Event()  # SIGHUP: reload at the next loop iteration
        self._reload_lock = threading.Lock()  # one reload / set_policies at a time
        self._reload_thread = None
        self._reloads = {"accepted": 0, "rejected": 0, "last_accepted_at": None,
                         "last_rejected_at": None, "last_error": None}
        self._reloads_lock = threading.Lock()  # guards _reloads (read by stats() from any thread)
        self._loop_thread = None
        self._closed = False
        self._keep_state = False       # close(): leave the NAT state file and the claims to the next agent
        self._keep_nat_file = False    # close() after a failed start: leave the NAT state file
        self.nat = None
        self._rings = []
        self.datapath = None
        # host work (egresscore.agent.host), on the host thread inside the namespace
        self._host = self._state = self._claims = self._neighbours = None
        self._claims_on = False        # host thread: claims are being kept
        self._claim_inside = []        # host thread: inside destinations for the claims
        self._claim_pods = set()       # host thread: pod veths claimed
        # loop thread: the last neighbours the host thread handed over, pods being opened
        self._router_ip = None
        self._router6_ip = None        # the IPv6 default router (NDP), when the underlay has one
        self._neigh_macs = {}
        self._opening = set()
        self._port_macs = {}           # pod key -> our end's MAC
        self._tunnel = None
        self.tunnel_error = None  # why the tunnel offload is off, when it was asked for
        self._wake_r = self._wake_w = -1  # the wake pipe, made with the rings
        self._worker_wakes = []        # workers 1..N-1: their wake pipes (read end, write end)
        self._parking = None           # run() with workers: where workers 1..N-1 wait for control writes
        self._services = []            # how to stop the services (egresscore.agent.services), in start order
        self._control = threading.RLock()  # one control change at a time, on the thread that makes it
        self._node_rows = {}           # loop thread: node name -> (IPv4, pod CIDRs, IPv6) in the datapath
        self._wanted = {}              # loop thread: pod key -> (IPv4, veth, IPv6) the datapath should forward
        self.node_ip6 = None           # the node's IPv6 address when the IPv6 datapath is on
        self.underlay6 = False
        self._feed = None              # egresscore.agent.feed.Feed over the compiler
        self._source = None            # the cluster-state source (egresscore.sources), when one feeds us
        self._source_stats = FeedStats("files", "")
        self.health = None
        self.failover = None
        self.responder = None
        self._candidates = {}          # gateway candidates {name: ip}, this node included
        self._candidates_gen = None    # the compiler generation they were computed at
        self._spill = {}               # the NAT's spill chains in force {egress IP: [egress IPs]}
        self._spill_gen = None         # the compiler generation they were computed at
        self._spill_missing = set()    # extra egress IPs the NAT does not hold (said once)
        self.flow_log = None
        self.flow_logger = None
        self.metrics = None
        self.control = None
        self.ready = threading.Event()

    def _open_underlay(self, underlay):
        try:
            ring = self._host.call(lambda: self._rings_plan.underlay(underlay))
        except Exception as exc:
            raise AgentError(f"cannot open a ring on {underlay}{self._where()}: {exc}") from exc
        self._rings.append(ring)
        # written to by control changes and stop(): the datapath's C loop returns at once
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._worker_wakes = [os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for _ in range(self.workers - 1)]
        self.datapath.attach_ring(0, ring)

    def _start_forwarding(self, claim):
        """Neighbours watched, nodes and pods synced, claims on: ready for the first packet."""
        self._neighbours = Neighbours(self._host, self._underlay_index, self._neighbours_changed)
        self._host.call(self._neighbours.start)
        self._claims_on = bool(claim)
        self._publish()
        self._neighbours.wait(1.0)  # let the kernel resolve them before the first packet
        self._settle()
        if claim:
            self._host.call(self._host_settle_claims, self._inside())

    # -- observability -------------------------------------------------------------
    def stats(self):
        """Every counter, as egresscore.metrics and `egresscore stats` read them:
        verdicts (packets, bytes), drops by reason, the datapath's own counters,
        the NAT table (with port use per egress IP), the egress map, the rings,
        the flow log and traffic by policy (from the flow records), and the
        datapath's own per-policy counters (policy_counters: by policy name,
        egresscore.policystats)."""
        return self._submit(self._stats)

    def _stats(self):
        c = self.datapath.counters()
        nat = self.nat.stats
        nat["ports"] = self.nat.port_usage()
        rings = {}
        for r in self._rings:
            if not r.closed:
                try:
                    rings[r.ifname] = r.stats()
                except OSError:
                    pass
        out = {
            "node": self.node,
            "verdicts": c.pop("verdicts"),
            "drops": c.pop("drops"),
            "datapath": c,
            "nat": nat,
            "egress_map": {"entries": len(self.egress_map)},
            "policy_counters": self.policy_counters.by_policy(),
            "rings": rings,
            "reloads": self.reload_stats(),
            "gateway_health": self.gateway_health(),
            **({"failover": self.failover.stats()} if self.failover is not None else {}),
            "source": self._source_stats.snapshot(),
            "datapath_thread": self._sched.stats(),
            "datapath_loop": self.datapath.loop_counters(),
            "python_gc": gc_watch().stats(),
            "workers": (self.datapath.worker_counters() if self.workers > 1
                        else [{"rx": c["rx"], **self.datapath.loop_counters()}]),
        }
        if self.flow_logger is not None:
            out["flow_log"] = self.flow_logger.stats
            out["policies"] = self.flow_logger.policy_stats()
        return out

    @property
    def pod_interfaces(self):
        """The pod veths whose rings the datapath forwards now (loop thread's view)."""
        return [ifname for _, ifname in list(self._ports.values())]

    # -- small helpers -------------------------------------------------------------
    def _where(self):
        return where(self.netns)

    def _to_loop(self, fn, *args):
        """Queue fn for the loop thread (from the host thread): only it writes the datapath."""
        def job():
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - a host result must not end the loop
                print(f"egresscore agent {self.node}: {getattr(fn, '__name__', fn)}: {exc}", file=sys.stderr)
        self._queue.put(job)
        self._wake()

    def _run_jobs(self):
        ran = False
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return ran
            job()
            ran = True

    def _settle(self):
        """Wait until the host work queued so far is done and its datapath
        writes are applied (callers other than the loop thread)."""
        if self._loop_thread is threading.current_thread():
            return
        self._host.call(lambda: None)
        if self._loop_thread is None:
            self._run_jobs()
        else:
            self._submit(lambda: None)

    @staticmethod
    def _policies_from(policies):
        """(paths, None) for file/folder paths, (None, checked EgressPolicy list) for objects."""
        if isinstance(policies, (str, os.PathLike)):
            policies = [policies]
        policies = list(policies)
        if policies and all(isinstance(p, (str, os.PathLike)) for p in policies):
            return [os.fspath(p) for p in policies], None
        return None, check_policies(policies)

    # -- gateway health (egresscore.health) ------------------------------------------------
    def _health_sched(self, what):
        """The heartbeat threads' scheduling: one SCHED_FIFO priority below the datapath
        thread's (none if it has none), so a loaded host (real-time senders, the datapath
        threads) cannot starve them into missed heartbeats and a gateway marked down; each
        sleeps between 100 ms rounds and does a few syscalls per round."""
        prio = max(1, self._sched.rt_priority - 1) if self._sched.rt_priority else 0
        return ThreadSched(prio, None, label=f"egresscore agent {self.node}", thread=f"the {what} thread").apply

    def _start_health(self, port, interval, misses, rises):
        """The heartbeat responder (always) and, with gateway health on, the
        health thread probing the gateway candidates; sockets opened inside
        the node's namespace, on the host thread."""
        try:
            sock = self._host.call(Responder.open_socket, self.node_ip, port)
        except OSError as exc:
            raise AgentError(f"cannot answer heartbeats on {self.node_ip}:{port}{self._where()}: {exc}") from exc
        self.responder = Responder(sock, name=f"egresscore-heartbeat-{self.node}",
                                   on_start=self._health_sched("heartbeat responder")).start()
        self._services.append(self.responder.stop)
        if not self.gateway_health_on:
            return

        def probe_socket():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            s.bind((self.node_ip, 0))
            return s

        prober = Prober(self._host.call(probe_socket), port=port, misses=misses, rises=rises)
        self.health = GatewayHealth(self._health_changed, prober=prober, liveness=self._liveness,
                                    interval=interval, name=f"egresscore-health-{self.node}",
                                    on_start=self._health_sched("gateway health"))
        self._candidates_gen = None     # computed before there was a prober: hand them over now
        self._update_health_targets()
        self.health.start()
        self._services.append(self.health.stop)

    def _start_failover(self, port):
        """Floating egress IPs and their replication (egresscore.agent.failover)."""
        if not self.gateway_health_on:
            raise AgentError("stateful_failover needs gateway_health: the standby takes over when health says "
                             "the active is down")
        if port == self._vxlan_port or self.nat_port_range[0] <= port <= self.nat_port_range[1]:
            raise ValueError(f"replication_port {port} must be outside nat_port_range {self.nat_port_range} "
                             f"and not the VXLAN port")
        from .failover import StatefulFailover

        try:
            fo = StatefulFailover(self, port=port)
        except OSError as exc:
            raise AgentError(f"cannot replicate on {self.node_ip}:{port}{self._where()}: {exc}") from exc
        self._services.append(fo.stop)
        with self._control:
            fo.update()
        self.failover = fo.start()

    def _update_health_targets(self):
        """The nodes to probe: every gateway candidate but this node (control
        lock held); recomputed only when the compiler changed."""
        if self._candidates_gen == self.compiler.generation:
            return
        self._candidates_gen = self.compiler.generation
        self._candidates = self.compiler.gateway_candidates()
        if self.health is not None:
            self.health.set_targets({n: ip for n, ip in self._candidates.items() if n != self.node})

    def _health_changed(self, down):
        """Health thread: the down set moved; recompile here (never on the datapath thread).
        With make-before-break, the pins on a gateway now down are dropped
        next (on the loop thread, woken): its connections move at once."""
        down = frozenset(down) - {self.node}
        t0 = time.monotonic()
        with self._control:
            gone = down - self.compiler.down
            n = self.compiler.set_down(down)
            self._update_health_targets()
            if self.failover is not None:
                self.failover.update()     # a standby whose active is down takes its floating IPs
            self._update_spill()
            if self.flow_logger is not None:
                self._enricher.refresh()
            ips = sorted(self._candidates[g] for g in gone if g in self._candidates)
        ms = (time.monotonic() - t0) * 1000
        print(f"egresscore agent {self.node}: gateways down: {', '.join(sorted(down)) or 'none'} "
              f"({n} egress entries rewritten in {ms:.1f} ms)", file=sys.stderr, flush=True)
        if ips and self.datapath.make_before_break:
            self._to_loop(self._flush_pins, ips)

    def _flush_pins(self, ips):
        """Loop thread: drop the pins on gateways `ips` (down): their connections follow the map now."""
        n = sum(self.datapath.flush_gateway(ip) for ip in ips)
        if n:
            print(f"egresscore agent {self.node}: {n} connections pinned to {', '.join(ips)} (down) released",
                  file=sys.stderr, flush=True)

    # -- spill to extra egress IPs (policy annotation egresscore.io/extra-egress-ips) -------
    def _update_spill(self):
        """Control thread: the NAT's spill chains from the policies this node is
        the gateway of (Compiler.spill_chains), set on the loop thread when they
        change.  Only addresses the NAT table holds (this node's, claimed at
        start) are used; one line on stderr names any other."""
        if self._spill_gen == self.compiler.generation or self.nat is None:
            return
        self._spill_gen = self.compiler.generation
        known = set(self.nat.egress_ips)
        chains, missing = {}, set()
        for ip, extra in self.compiler.spill_chains().items():
            if ip not in known:
                continue
            missing.update(x for x in extra if x not in known)
            usable = [x for x in extra if x in known]
            if usable:
                chains[ip] = usable
        if missing - self._spill_missing:
            print(f"egresscore agent {self.node}: extra egress IPs {', '.join(sorted(missing))} were not on this "
                  f"node when the agent started: not used", file=sys.stderr, flush=True)
        self._spill_missing = missing
        if chains != self._spill:
            self._submit(self.nat.set_spill, chains)
            self._spill = chains

    def gateway_health(self):
        """{"enabled", "down", "gateways": [{node, ip, state, why}], "probes", "changes"}:
        what gateway selection passes over now, and why (any thread); probes' late: pongs
        that came after a later ping had gone out (counted all the same); changes: how
        often the down set moved."""
        cands = dict(self._candidates)
        if self.health is None:
            rows = [{"node": n, "ip": ip, "state": "up" if n == self.node else "not probed", "why": ""}
                    for n, ip in sorted(cands.items())]
            return {"enabled": False, "down": [], "gateways": rows, "probes": {}}
        rows = self.health.state(cands)
        for r in rows:
            if r["node"] == self.node:
                r["state"], r["why"] = "up", "this node"
        p = self.health.prober
        return {"enabled": True, "down": sorted(self.compiler.down), "gateways": rows,
                "probes": {"sent": p.sent, "received": p.received, "late": p.late,
                           "interval_s": self.health.interval,
                           "misses": p.misses, "rises": p.rises, "port": p.port,
                           "answered": self.responder.answered if self.responder else 0},
                "changes": self.health.changes}

    # -- cluster facts -> datapath ---------------------------------------------------
    # The control thread (under self._control) computes the facts from the
    # compiler's cluster; the loop thread only writes them into the datapath.
    def _commit(self, fn, *args, nodes=True, pods=True):
        """Run the control change fn(*args) on this thread (the compiler
        writes the egress map in place: it publishes every change atomically
        for the datapath's lock-free readers), then hand the loop the node
        rows and pod ports that follow from it."""
        with self._control:
            out = fn(*args)
            self._publish(nodes=nodes, pods=pods)
            return out

    def _publish(self, nodes=True, pods=True):
        """Control thread: the datapath's facts (node rows, local pod ports) to the loop, the rest to the host."""
        if nodes:
            self._publish_nodes(self.cluster.nodes)
        if pods:
            wanted = {}
            for p in self.cluster.pods.values():
                if p.node == self.node:
                    ip4 = next((ip for ip in p.ips if ":" not in ip), None)
                    ip6 = ipv6.pod_ip6(p) if self.node_ip6 else None
                    if ip4 is not None or ip6 is not None:
                        wanted[p.uid] = (ip4, self._pod_ifname(p), ip6)
            self._submit(self._apply_pods, wanted, self._inside())
        if self.flow_logger is not None:
            self._enricher.refresh()
        self._update_health_targets()
        if self.failover is not None:
            self.failover.update()
        self._update_spill()

    def _publish_nodes(self, nodes):
        """Control thread: node rows for the loop; tunnel peers, neighbours and claims for the host."""
        if self.node_ip6:   # both families (egresscore.agent.ipv6)
            rows = ipv6.node_rows(nodes)
        else:
            rows = {n.name: (n.gateway_ip, tuple(c for c in n.pod_cidrs if ":" not in c), None)
                    for n in nodes.values() if n.gateway_ip}
        self._submit(self._apply_nodes, rows)
        ips = [ip for ip, _, _ in rows.values()]
        if self._tunnel is not None:
            self._host.post(self._tunnel.set_peers, ips)
        if self._neighbours is not None:
            peers = [ip for ip in ips if ip not in self._local_ips]
            if self.underlay6:   # the tunnel's next hops are the nodes' IPv6 addresses: NDP for them too
                peers += [ip6 for _, _, ip6 in rows.values() if ip6 and ip6 != self.node_ip6]
            self._host.post(self._neighbours.want, peers)
        self._host.post(self._host_sync_claims, self._inside(nodes))

    def _apply_nodes(self, rows):
        """Loop thread: the datapath's node table to `rows` (changed rows only)."""
        for name, idx in list(self._node_index.items()):
            if name not in rows:
                self.datapath.remove_node(idx)
                del self._node_index[name]
        for name in sorted(rows):
            if name in self._node_index:
                if self._node_rows.get(name) == rows[name]:
                    continue
                idx = self._node_index[name]
                self.datapath.remove_node(idx)
            else:
                used = set(self._node_index.values())
                idx = next(i for i in range(256) if i not in used)
            ip, cidrs, ip6 = rows[name]
            self._node_index[name] = idx
            mac = None if ip in self._local_ips else self._node_mac_of(ip, ip6, self._neigh_macs)
            self.datapath.add_node(idx, ip, cidrs, mac=mac, ip6=ip6)
        self._node_rows = dict(rows)

    def _inside(self, nodes=None):
        """The cluster's own destinations (pod CIDRs, node IPs, IPv4 and IPv6): pod traffic to
        them stays the kernel's (the claims keep IPv6 ones only on a host with IPv6)."""
        nodes = (self.cluster.nodes if nodes is None else nodes).values()
        return sorted({c for n in nodes for c in n.pod_cidrs}
                      | {n.gateway_ip + "/32" for n in nodes if n.gateway_ip}
                      | {ip + "/128" for n in nodes if (ip := ipv6.node_ip6(n))})

    # -- neighbours (learnt on the host thread, written here) -----------------------------
    def _neighbours_changed(self, router, macs, router6=None):
        """Host thread: a new neighbour snapshot (ARP and NDP), for the loop thread."""
        self._to_loop(self._apply_neighbours, router, macs, router6)

    def _apply_neighbours(self, router, macs, router6=None):
        self._router_ip = router
        self._router6_ip = router6
        self._neigh_macs = macs
        self.datapath.set_router(macs.get(router) if router else None)
        self.datapath.set_router6(macs.get(router6) if router6 else None)
        for name, idx in self._node_index.items():
            ip, _, ip6 = self._node_rows[name]
            if ip not in self._local_ips:
                self.datapath.set_node_mac(idx, self._node_mac_of(ip, ip6, macs))

    def _node_mac_of(self, ip, ip6, macs):
        """A node's underlay MAC: by NDP for its IPv6 address over the IPv6 underlay (by ARP while NDP
        has none yet), by ARP otherwise."""
        if self.underlay6 and ip6:
            return macs.get(ip6) or macs.get(ip)
        return macs.get(ip)

    def _open_tunnel(self, vni, port, mtu):
        """The tunnel offload (egresscore.agent.tunnel); off, with the reason in
        tunnel_error, when the kernel refuses the device."""
        dev = self._host.call(lambda: TunnelDevice(netns=self.netns, underlay_index=self._underlay_index,
                                                   local_ip=self.node_ip, vni=vni, port=port, mtu=mtu,
                                                   ipr=self._host.ipr))
        try:
            self._host.call(dev.create)
            self._tunnel = dev
            self._host.post(dev.set_peers, [n.gateway_ip for n in self.cluster.nodes.values() if n.gateway_ip])
            ring = self._host.call(lambda: self._rings_plan.tunnel(dev.ifname))
        except (NetlinkError, OSError) as exc:
            self._host.call(dev.remove)
            self._tunnel = None
            self.tunnel_error = f"no tunnel offload device {dev.ifname}{self._where()}: {exc}"
            print(f"egresscore agent {self.node}: {self.tunnel_error}; tunnel-bound super-packets "
                  "are cut into segments instead", file=sys.stderr)
            return
        self._rings.append(ring)
        self.datapath.attach_tunnel(ring)

    def _apply_pods(self, wanted, inside):
        """Loop thread: forward exactly the local pods in `wanted` (key -> (IPv4, veth, IPv6));
        new ones are opened on the host thread and attached later."""
        self._wanted = wanted
        for key in list(self._ports):
            if key not in wanted:
                self._drop_port(key)
        opening = []
        for key, (ip4, ifname, ip6) in wanted.items():
            if key in self._ports:
                port, _ = self._ports[key]
                self.datapath.add_pod_port(port, ip4, self._port_macs[key], pod_ip6=ip6)
            elif key not in self._opening:
                self._opening.add(key)
                opening.append((key, ifname))
        if opening:
            self._host.post(self._host_open_pods, opening, inside)

    def _host_open_pods(self, pods, inside):
        """Host thread: a ring on each pod veth, the claims for it, then the
        datapath writes queued for the loop thread (a veth not plugged yet is
        picked up by a later sync)."""
        opened = []
        for key, ifname in pods:
            facts = link_facts(self._host.ipr, ifname)
            if facts is None:
                opened.append((key, ifname, None, None))
                continue
            ring = self._rings_plan.pod(ifname)
            self._claim_pods.add(ifname)
            opened.append((key, ifname, facts[1], ring))
        # claimed before the datapath forwards: the kernel never sends a pod's packet out with its own address
        self._host_sync_claims(inside)
        self._to_loop(self._attach_pods, opened)

    def _attach_pods(self, opened):
        for key, ifname, mac, ring in opened:
            self._opening.discard(key)
            row = self._wanted.get(key)
            if ring is None:
                continue
            if row is None or key in self._ports:   # gone (or attached) meanwhile
                self._host.post(self._host_close_pod, ifname, ring)
                continue
            used = {p for p, _ in self._ports.values()}
            port = next(i for i in range(1, 64) if i not in used)
            self.datapath.add_pod_port(port, row[0], mac, pod_ip6=row[2])
            self._rings.append(ring)
            self.datapath.attach_ring(port, ring)
            self._ports[key] = (port, ifname)
            self._port_macs[key] = mac

    def _drop_port(self, key):
        port, ifname = self._ports.pop(key)
        self._port_macs.pop(key, None)
        ring = self.datapath.rings_attached.get(port)
        self.datapath.remove_pod_port(port)
        if ring is not None:
            self._rings.remove(ring)
        self._host.post(self._host_close_pod, ifname, ring)

    def _host_close_pod(self, ifname, ring):
        self._claim_pods.discard(ifname)
        self._host_sync_claims()
        if ring is not None:
            ring.close()

    def _host_settle_claims(self, inside):
        """Host thread: the pods known at start are claimed; leftovers of a
        stopped agent that no pod needs go now (Claims.settle)."""
        self._claims.settle()
        self._host_sync_claims(inside)

    def _host_sync_claims(self, inside=None):
        """Host thread: the claims for the inside destinations and pod veths known now."""
        if inside is not None:
            self._claim_inside = inside
        if self._claims_on:
            self._claims.sync(self._claim_inside, self._claim_pods)

    # -- control (any thread) ------------------------------------------------------------
    def _submit(self, fn, *args):
        if self._loop_thread is None or self._loop_thread is threading.current_thread():
            return fn(*args)
        done = threading.Event()
        box = {}

        def job():
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            done.set()

        self._queue.put(job)
        self._wake()
        if not done.wait(10):
            raise TimeoutError("the agent loop did not apply the change within 10 s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    # -- reloads: all or nothing (egresscore.inputs) ---------------------------------
    def set_policies(self, policies):
        """Replace the policy set (EgressPolicy objects, or file/folder paths
        that later reloads re-read); applied in place, all or nothing.  A bad
        set raises InputError and changes nothing (counted in stats()["reloads"])."""
        with self._reload_lock:
            try:
                paths, objs = self._policies_from(policies)
                new = load_inputs(policies=paths).policies if paths is not None else objs
                n = self._commit(self._set_policies, new, nodes=False, pods=False)
            except Exception as exc:
                self._rejected("set_policies", exc)
                raise
            if paths is not None:
                self._policy_paths = paths
            self._accepted()
            return n

    def _set_policies(self, policies):
        new = {p.name: p for p in policies}
        for name in [p.name for p in self.compiler.policies]:
            if name not in new:
                self.compiler.remove_policy(name)
        for p in policies:
            self.compiler.upsert_policy(p)
        return len(new)

    def reload(self):
        """Re-read the cluster file and the policy files given at start, all
        or nothing (rules in egresscore.inputs).  The files are read on the
        calling thread, the result applied by the loop between batches.  A bad
        input raises InputError and changes nothing: the policies and cluster
        in force keep working (counted in stats()["reloads"])."""
        with self._reload_lock:
            try:
                loaded = load_inputs(self._cluster_path, self._policy_paths)
                if loaded.cluster is not None:
                    self._check_own_node(loaded.cluster)
                self._commit(self._apply_inputs, loaded)
            except Exception as exc:
                self._rejected("reload", exc)
                raise
            self._accepted()
            return loaded

    def _check_own_node(self, cluster):
        """A cluster file may not drop this agent's node or change its IP (the datapath is built on it)."""
        try:
            check_own_node(self.node, self.node_ip, cluster.nodes.get(self.node))
        except OwnNodeError as exc:
            raise InputError([ClusterError(exc.message, file=self._cluster_path, field="nodes")]) from None

    def _apply_inputs(self, loaded):
        """Control thread: the cluster and policies of a reload, reconciled (egresscore.agent.feed)."""
        fresh = loaded.cluster if loaded.cluster is not None else self.cluster.copy()
        self._feed.reconcile(fresh, loaded.policies, before_nodes=self._publish_nodes)

    def _accepted(self):
        with self._reloads_lock:
            self._reloads["accepted"] += 1
            self._reloads["last_accepted_at"] = time.time()

    def _rejected(self, how, exc):
        """Count a rejected reload and say why, on one line."""
        message = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        with self._reloads_lock:
            self._reloads["rejected"] += 1
            self._reloads["last_rejected_at"] = time.time()
            self._reloads["last_error"] = message
        print(f"egresscore agent {self.node}: {how} rejected, the policies and cluster in force are kept: "
              f"{message}", file=sys.stderr, flush=True)

    def reload_stats(self):
        """{"accepted", "rejected", "last_accepted_at", "last_rejected_at" (Unix
        time or None), "last_error"}: reloads and set_policies calls so far."""
        with self._reloads_lock:
            return dict(self._reloads)

    def _reload_on_signal(self):
        """SIGHUP: reload, and only log and count the outcome (the agent stays up)."""
        try:
            loaded = self.reload()
        except Exception:  # noqa: BLE001 - logged and counted by reload(); never take the agent down
            return
        n = "unchanged" if loaded.policies is None else len(loaded.policies)
        print(f"egresscore agent {self.node}: reloaded (SIGHUP): policies {n}, "
              f"{len(self.egress_map)} egress entries", file=sys.stderr, flush=True)

    def request_reload(self):
        """Async-signal-safe: reload at the next loop iteration (SIGHUP)."""
        self._reload.set()
        self._wake()

    def _wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _wake_workers(self):
        """Workers 1..N-1 out of their C loop (to park, or to stop)."""
        for _, w in self._worker_wakes:
            try:
                os.write(w, b"\0")
            except OSError:
                pass

    def _worker_loop(self, k, parking):
        """Worker k's thread (k >= 1): its own Datapath's C loop, parked while worker 0 writes."""
        dp, wake_r = self.datapath.members[k], self._worker_wakes[k - 1][0]
        sched = ThreadSched(self._sched.rt_priority, None, label=f"egresscore agent {self.node}",
                            thread=f"datapath worker {k}").apply()
        parking.joined(1)
        try:
            while not self._stop.is_set():
                parking.check()
                dp.run(self.poll_ms / 1000.0, wake_r)
                dp.gc()
        finally:
            parking.joined(-1)
            sched.restore()

    def _run_jobs_parked(self):
        """Worker 0 with others: the queued jobs run while every other worker is parked."""
        if self._queue.empty():
            return False
        self._parking.hold(self._wake_workers)
        try:
            return self._run_jobs()
        finally:
            self._parking.release()

    def upsert_pod(self, pod: Pod):
        """Add or change a pod; returns once its veth (if plugged) is forwarded and claimed."""
        out = self._commit(self.compiler.upsert_pod, pod, nodes=False)
        self._settle()
        return out

    def remove_pod(self, namespace=None, name=None, *, uid=None):
        """Remove a pod by uid (`uid=`), or every pod named namespace/name
        (Compiler.remove_pod); KeyError if there is none."""
        if uid is not None:
            if name is not None:
                raise TypeError("remove_pod: give a uid or a namespace and name, not both")
            pods = [self.cluster.pods[uid]] if uid in self.cluster.pods else []
        else:
            pods = list(self.cluster.pods.named(namespace, name))
        if not pods:
            raise KeyError(f"no pod {uid if uid is not None else f'{namespace}/{name}'}")
        out = 0
        for pod in pods:
            out = self._commit(self.compiler.remove_pod, pod.uid, nodes=False)
        self._settle()
        return out

    def upsert_node(self, node):
        """Add or change a node (not this agent's own IP: OwnNodeError)."""
        if node.name == self.node:
            check_own_node(self.node, self.node_ip, node)
        with self._control:
            self._publish_nodes({**self.cluster.nodes, node.name: node})  # make before break
            return self._commit(self.compiler.upsert_node, node, pods=False)

    # -- the agent as a SourceSink (egresscore.sources.base); called on the source's thread --
    def resync(self, snapshot):
        """Reconcile to a source's full snapshot: what it lacks is removed.
        This agent's own node stays as it is when the snapshot drops it or
        changes its IP (rejected alone, counted)."""
        fresh = Cluster(snapshot.nodes, snapshot.namespaces, snapshot.pods)
        try:
            check_own_node(self.node, self.node_ip, fresh.nodes.get(self.node))
        except OwnNodeError as exc:
            self.rejected(f"nodes/{self.node}", exc)
            fresh.nodes[self.node] = self.cluster.nodes[self.node]
        self._commit(self._feed.reconcile, fresh, list(snapshot.policies), before_nodes=self._publish_nodes)
        self._source_stats.update(connected=True, resyncs=1, last_revision=snapshot.revision,
                                  last_change_at=FeedStats.now())

    def apply(self, changes):
        """A batch of a source's changes, in order, in one publish to the
        datapath; a change that cannot be applied is rejected alone."""
        applied = 0
        nodes = pods = False
        with self._control:
            for ch in changes:
                try:
                    if ch.kind == "node" and ch.key == self.node:
                        check_own_node(self.node, self.node_ip, ch.obj if ch.op == "upsert" else None)
                    if self._feed.apply(ch, before_nodes=self._publish_nodes):
                        applied += 1
                        nodes = nodes or ch.kind == "node"
                        pods = pods or ch.kind in ("pod", "node")
                except Exception as exc:  # noqa: BLE001 - one bad change never stops the others
                    self.rejected(f"{ch.kind}s/{ch.key}", exc)
            self._publish(nodes=nodes, pods=pods)
        revision = changes[-1].revision if changes else None
        self._source_stats.update(connected=True, changes_applied=applied, last_change_at=FeedStats.now(),
                                  **({"last_revision": revision} if revision else {}))
        return applied

    def disconnected(self, reason):
        """The source lost its store: the state in force stays in force."""
        self._source_stats.update(connected=False, disconnects=1, last_error=str(reason))
        if self._source_stats.first_report("<disconnected>", str(reason)):
            print(f"egresscore agent {self.node}: source {self._source_stats.snapshot()['address']} "
                  f"disconnected, the state in force is kept: {reason}", file=sys.stderr, flush=True)

    def connected(self, revision):
        """The source reached its store again and follows it from `revision` (no resync needed)."""
        self._source_stats.update(connected=True, last_revision=str(revision))

    def rejected(self, key, error):
        """One object was left out (malformed, too large, or this node's own
        node made invalid); logged once per key and error, counted."""
        self._source_stats.update(objects_rejected=1, last_error=f"{key}: {error}")
        if self._source_stats.first_report(key, str(error)):
            print(f"egresscore agent {self.node}: {key} rejected, the rest is applied: {error}",
                  file=sys.stderr, flush=True)

    def counters(self):
        """Datapath counters (verdicts, drops by reason) plus NAT and ring figures."""
        out = self.datapath.counters()
        out["nat_entries"] = len(self.nat)
        out["egress_entries"] = len(self.egress_map)
        return out

    # -- the loop ------------------------------------------------------------------------
    def step(self, timeout=0.0):
        """One iteration: pending changes, then forwarding, then housekeeping.
        Returns frames handled.  timeout 0: one batch per ring; > 0: the
        datapath's own C loop forwards for up to timeout seconds (returning
        early on a control change or stop())."""
        if self._parking is not None:
            self._run_jobs_parked()
        else:
            self._run_jobs()
        if self._reload.is_set() and (self._reload_thread is None or not self._reload_thread.is_alive()):
            self._reload.clear()
            if self._loop_thread is None:
                self._reload_on_signal()  # step() driven by the caller: no loop to hand the result to
            else:
                # files are read and parsed off the datapath thread; the loop applies the result
                self._reload_thread = threading.Thread(target=self._reload_on_signal, daemon=True,
                                                       name=f"egresscore-reload-{self.node}")
                self._reload_thread.start()
        dp = self.datapath
        if self._parking is not None:
            dp = dp.members[0]  # run() with workers: this thread drives worker 0 only, the others their own
        elif self.workers > 1:
            timeout = 0         # step() driven by the caller: one batch per ring of every worker, in turn
        if timeout > 0:
            n = dp.run(timeout, self._wake_r)
        else:
            n = dp.poll()
        dp.gc()  # bounded NAT expiry work, pure C, every return (run() does it every 20 ms too)
        return n

    def run(self):
        """Forward until stop() (or a signal handler calling it); then close()."""
        self._loop_thread = threading.current_thread()
        freeze_heap()  # later GC passes scan what changes, not the start-up heap (each holds the GIL)
        self._sched.apply()  # SCHED_FIFO / CPU for this thread only (egresscore.agent.sched)
        threads = []
        if self.workers > 1:  # workers 1..N-1 on threads of their own (egresscore.agent.workers)
            self._parking = Parking(self.workers - 1)
            for k in range(1, self.workers):
                t = threading.Thread(target=self._worker_loop, args=(k, self._parking), daemon=True,
                                     name=f"egresscore-worker{k}-{self.node}")
                t.start()
                threads.append(t)
        self.ready.set()
        wakeup = self._signals_wake_loop()
        try:
            while not self._stop.is_set():
                self.step(self.poll_ms / 1000.0)
        finally:
            if wakeup is not None:
                signal.set_wakeup_fd(wakeup)
            self._stop.set()
            if self._parking is not None:
                self._parking.release()
                self._wake_workers()
                for t in threads:
                    t.join(10)
                self._parking = None
            self._sched.restore()
            self._loop_thread = None
            self.close()

    def _signals_wake_loop(self):
        """run() on the main thread: a signal also writes to the wake pipe.

        Python runs a signal's handler (the CLI's SIGTERM: stop()) only once
        this thread is back from the C loop, and the loop returns early on a
        signal only when it lands in poll(); one that lands while a batch is
        forwarded would wait for the poll_ms backstop (60 s).  The wake pipe
        ends the C loop within one pass.  Returns the fd to restore, or None."""
        if self._wake_w < 0 or threading.current_thread() is not threading.main_thread():
            return None
        return signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def start(self):
        """run() in a background thread; returns the thread."""
        t = threading.Thread(target=self.run, name=f"egresscore-agent-{self.node}", daemon=True)
        t.start()
        self.ready.wait(5)
        self._thread = t
        return t

    def stop(self, keep_state=False):
        """Ask the loop to end (async-signal-safe); run() cleans up.  With
        keep_state, as close(keep_state=True): the next agent takes over."""
        self._keep_state = self._keep_state or bool(keep_state)
        self._stop.set()
        self._wake()
        self._wake_workers()
        t = getattr(self, "_thread", None)
        if t is not None and t is not threading.current_thread():
            t.join(10)

    def close(self, keep_state=None):
        """Remove the claims, restore the host, close the rings (idempotent).

        keep_state=True (or stop(keep_state=True) before): an upgrade's stop.
        The NAT state file and the kernel claims stay as they are (the kernel
        keeps off the agent's traffic, answering nothing), and the next agent
        adopts both; open connections are not ended in the flow log."""
        if keep_state is not None:
            self._keep_state = bool(keep_state)
        if self._closed:
            return
        self._closed = True
        if self._source is not None:
            self._source.stop()  # no control change after this
        try:
            for stop in reversed(self._services):
                try:
                    stop()
                except Exception as exc:  # noqa: BLE001 - keep tearing down
                    print(f"egresscore agent: stopping {stop!r}: {exc}", file=sys.stderr)
            self._services = []
        finally:
            if self.datapath is not None:
                for port in list(self.datapath.rings_attached):
                    self.datapath.detach_ring(port)
            self._seal_nat()
            try:
                if self._host is not None:
                    self._host.call(self._host_teardown, timeout=30)
            finally:
                for r in self._rings:
                    r.close()
                self._rings = []
                if self._host is not None:
                    self._host.stop()
                for fd in (self._wake_r, self._wake_w, *(fd for p in self._worker_wakes for fd in p)):
                    if fd >= 0:
                        os.close(fd)
                self._wake_r = self._wake_w = -1
                self._worker_wakes = []

    def _seal_nat(self):
        """A stop that keeps the state: nothing writes the table any more, so seal
        its file (checksums the next agent verifies: NatTable.seal_state)."""
        if not self._keep_state or self.nat is None or self.nat.state is None:
            return
        try:
            s = self.nat.seal_state()
            print(f"egresscore agent {self.node}: NAT state sealed for the next agent ({s['entries']} entries, "
                  f"{s['groups']} checksums, {s['ms']:.1f} ms)", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - unsealed, the next agent checks entry by entry
            print(f"egresscore agent {self.node}: NAT state not sealed: {exc}", file=sys.stderr, flush=True)

    def _host_teardown(self):
        """Host thread: claims off and the host as it was (state file gone), tunnel device removed."""
        self._claims_on = False
        try:
            if self._neighbours is not None:
                self._neighbours.close()
            if self._claims is not None and not self._keep_state:
                self._claims.remove()
        finally:
            if self._tunnel is not None:
                self._tunnel.remove()
                self._tunnel = None
            if self._state is not None:
                self._state.release()
            if self.nat is not None and not (self._keep_state or self._keep_nat_file):
                self.nat.discard_state()   # a clean stop keeps no connections

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        self.close()
        return False
