"""The lab: the seed's three-node cluster, plus a second gateway, in network namespaces.

    app1 (10.0.1.93)   app2 (10.0.2.32)                                        ext1: 203.0.113.10, .200
        | lxc-app1         | lxc-app2                                              |
      node1              node2          node3                node4             router (.254) -- ext2: 198.51.100.10
    192.168.1.1        192.168.1.2    192.168.1.3            192.168.1.4            |
                                      (+ .100-.109)          (+ .110-.119)          |
        +------------------+--------------+---- br0 ------------+-------------------+
                                  (bridge in egc-lab-lan)

node3 and node4 carry the label egress-gateway: "true" (the HA sample policy,
examples/egress-ha.yaml, selects both); the seed's policy names node3 alone.

Every piece lives in a namespace named `egc-lab-*`; nothing touches the root
namespace, so the lab has no path off the machine.  Nodes route the other
nodes' pod CIDRs over the underlay and default to the router; the router knows
no pod CIDR, so pod traffic that leaves without SNAT cannot come back (SNAT is
observable).  `datapath="kernel"` adds the Linux baseline (vxlan + policy
routing + nftables SNAT, see kernel.py).

Dual-stack (`Lab(ipv6=True)`; off by default, so the IPv4 lab keeps IPv6
disabled and its wires free of neighbour discovery and MLD): pods get
fd00:10:N::<last IPv4 octet>/128 beside their IPv4 (node N's pod CIDR
fd00:10:N::/64, their gateway fd00:10:N::1), nodes fd00:192:168:1::N/64 on
the underlay (router ::fe), node3's IPv6 egress IPs are
fd00:192:168:1::100-::109 and node4's ::110-::119, and the servers sit in
2001:db8::/32 (ext1: 2001:db8:113::10 and 2001:db8:113:0:8000::200, the
IPv6 twins of .10 and .200: the upper half of ext1's /64 plays
203.0.113.128/25; ext2: 2001:db8:100::10).  Duplicate address detection and
router advertisements stay out of the way: accept_dad=0, accept_ra=0 and
autoconf=0 everywhere, every address added nodad.  `tunnel_underlay=6`
runs the kernel baseline's vxlan over the IPv6 underlay (default: IPv4, as
Cilium).
"""
import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from . import _ns, kernel, traffic

UNDERLAY = ipaddress.ip_network("192.168.1.0/24")
ROUTER_IP = "192.168.1.254"
CLUSTER_CIDR = ipaddress.ip_network("10.0.0.0/16")
NODE_NAMES = ("node1", "node2", "node3", "node4")
EGRESS_NODE = "node3"
EGRESS_IPS = tuple(f"192.168.1.{i}" for i in range(100, 110))
# the gateways (label egress-gateway: "true") and their extra egress IPs
GATEWAY_EGRESS_IPS = {"node3": EGRESS_IPS, "node4": tuple(f"192.168.1.{i}" for i in range(110, 120))}
# the dual-stack plan (Lab(ipv6=True))
UNDERLAY6 = ipaddress.ip_network("fd00:192:168:1::/64")
ROUTER_IP6 = "fd00:192:168:1::fe"
CLUSTER_CIDR6 = ipaddress.ip_network("fd00:10::/32")
EGRESS_IPS6 = tuple(f"fd00:192:168:1::{i}" for i in range(100, 110))
GATEWAY_EGRESS_IPS6 = {"node3": EGRESS_IPS6, "node4": tuple(f"fd00:192:168:1::{i}" for i in range(110, 120))}
# external servers, IPv6: namespace role -> (router-side address/len, server addresses)
SERVERS6 = {
    "ext1": ("2001:db8:113::fe/64", ("2001:db8:113::10", "2001:db8:113:0:8000::200")),
    "ext2": ("2001:db8:100::fe/64", ("2001:db8:100::10",)),
}
IFA_F_NODAD = 0x02
DEFAULT_PODS = (
    ("app1", "node1", {"app": "app1"}, "10.0.1.93"),
    ("app2", "node2", {"app": "app2"}, "10.0.2.32"),
)
# the uids examples/cluster.yaml gives the seed's pods (a uid places a pod among several gateways)
POD_UIDS = {
    "app1": "6f1c2a4e-0d3b-4c1e-9a53-5d2f7b8e1a01",
    "app2": "0b7d9e3c-6a2f-4e8b-b1c4-2e5a9f3d7c02",
}
# external servers: namespace role -> (router-side address/len, server addresses)
SERVERS = {
    "ext1": ("203.0.113.254/24", ("203.0.113.10", "203.0.113.200")),
    "ext2": ("198.51.100.254/24", ("198.51.100.10",)),
}
RESERVED = {"lan", "router", *NODE_NAMES, *SERVERS}
UNDERLAY_IF = "eth0"


def node_ip6(i):
    """Node i's IPv6 underlay address (fd00:192:168:1::i)."""
    return str(UNDERLAY6.network_address + i)


def pod_cidr6(i):
    return f"fd00:10:{i}::/64"


def pod_ip6(ip4):
    """A pod's IPv6 address, from its IPv4 10.0.N.X: fd00:10:N::X (X in decimal digits)."""
    a = ipaddress.ip_address(ip4).packed
    return f"fd00:10:{a[2]}::{a[3]}"


def mac_for(ip, kind=0xEC):
    """A stable, locally administered MAC derived from an IPv4 address."""
    b = ipaddress.ip_address(ip).packed
    return "02:%02x:%02x:%02x:%02x:%02x" % (kind, *b)


@dataclass
class Node:
    name: str
    ns: str
    ip: str
    pod_cidr: str
    mac: str
    pod_gateway: str  # the pods' default gateway: 10.0.N.1/32 on every lxc-* veth of the node
    labels: dict
    egress_ips: tuple = ()
    ifname: str = UNDERLAY_IF
    # dual-stack lab only (None / () otherwise)
    ip6: str | None = None
    pod_cidr6: str | None = None
    pod_gateway6: str | None = None
    egress_ips6: tuple = ()


@dataclass
class Pod:
    name: str
    node: str
    ip: str
    labels: dict
    ns: str
    mac: str
    host_ifname: str  # the veth end on the node (lxc-<name>)
    host_mac: str
    ifname: str = "eth0"
    ip6: str | None = None  # dual-stack lab only


@dataclass
class Server:
    name: str
    ns: str
    addresses: tuple
    gateway: str
    mac: str
    addresses6: tuple = ()  # dual-stack lab only
    gateway6: str | None = None


@dataclass
class _State:
    namespaces: list = field(default_factory=list)
    processes: list = field(default_factory=list)


class Lab:
    """The cluster in namespaces; a context manager that always tears down.

    datapath: None (nodes only route) or "kernel" (Linux vxlan + nftables egress
    gateway baseline for `policies`, plus per-node masquerade).
    masquerade: per-node nftables masquerade of pod traffic leaving the cluster
    (forced on with the kernel datapath).
    policies: CiliumEgressGatewayPolicy documents (dicts) for the kernel datapath;
    default: the seed's policy on the lab's addresses (kernel.SAMPLE_POLICY; with
    ipv6, its dual-stack twin kernel.SAMPLE_POLICY_DUAL).
    tag: runs several labs side by side (namespaces egc-lab-<tag>-*).
    ipv6: build the dual-stack lab (module docstring); tunnel_underlay: 4 or 6,
    the family of the kernel baseline's vxlan underlay (6 needs ipv6).
    SIGINT, SIGTERM and SIGHUP unwind the `with` block and tear down; a signal
    the process inherited as ignored stays ignored (a background job of a
    non-interactive shell ignores SIGINT, and Python keeps that), so there
    SIGTERM is the one that stops it.
    """

    def __init__(self, datapath=None, *, masquerade=False, policies=None, pods=DEFAULT_PODS,
                 pod_mtu=1500, tag=None, vni=kernel.VXLAN_VNI, ipv6=False, tunnel_underlay=4):
        if datapath not in (None, "kernel"):
            raise ValueError(f"datapath must be None or 'kernel', not {datapath!r}")
        if tag is not None and (not isinstance(tag, str) or not tag.isalnum()):
            raise ValueError(f"tag must be an alphanumeric string, not {tag!r}")
        if not isinstance(pod_mtu, int) or not 576 <= pod_mtu <= 9000:
            raise ValueError(f"pod_mtu must be in 576..9000, not {pod_mtu!r}")
        if tunnel_underlay not in (4, 6) or (tunnel_underlay == 6 and not ipv6):
            raise ValueError(f"tunnel_underlay must be 4, or 6 with ipv6=True, not {tunnel_underlay!r}")
        self.ipv6 = bool(ipv6)
        self.tunnel_underlay = tunnel_underlay
        self.datapath = datapath
        self.masquerade = bool(masquerade) or datapath == "kernel"
        self.policies = policies
        self.pod_mtu = int(pod_mtu)
        self.tag = tag
        self.vni = vni
        self.prefix = _ns.PREFIX + (f"{tag}-" if tag else "")
        self._initial_pods = list(pods)
        self.nodes = {}
        self.pods = {}
        self.servers = {}
        self.router_ns = self.prefix + "router"
        self.lan_ns = self.prefix + "lan"
        self._state = _State()
        self._lock = None
        self._built = False
        self._old_handlers = {}
        self._kernel_policies = None
        self._kernel_nodes = None
        self.kernel_entries = []  # the egress list the kernel baseline implements
        self._owner_pid = os.getpid()

    # -- lifecycle --------------------------------------------------------
    def __enter__(self):
        self._install_signal_handlers()
        try:
            self.build()
        except BaseException:
            if os.getpid() != self._owner_pid:
                os._exit(1)
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        if os.getpid() != self._owner_pid:
            # a forked helper child (pyroute2 forks some) unwinding on a signal: it must not
            # run the rest of its parent's program
            os._exit(1)
        self.close()
        return False

    def build(self):
        """Create every namespace, link and route (stale labs removed first)."""
        if self._built:
            return self
        _ns.remove_stale()
        self._lock = _ns.Lock(self.tag or "default")
        atexit.register(self.close)
        self._built = True
        plan = [self.lan_ns, self.router_ns]
        plan += [self.prefix + n for n in NODE_NAMES]
        plan += [self.prefix + s for s in SERVERS]
        plan += [self.prefix + p[0] for p in self._initial_pods]
        self._lock.write(plan)  # claim the names before they exist
        for name in (self.lan_ns, self.router_ns):
            self._new_ns(name)
        self._build_lan()
        self._build_router()
        for i, name in enumerate(NODE_NAMES, start=1):
            self._build_node(name, i)
        for name, (router_addr, addresses) in SERVERS.items():
            self._build_server(name, router_addr, addresses, *(SERVERS6[name] if self.ipv6 else (None, ())))
        for pod in self._initial_pods:
            self.add_pod(*pod)
        if self.datapath == "kernel":
            sample = kernel.SAMPLE_POLICY_DUAL if self.ipv6 else kernel.SAMPLE_POLICY
            self.install_kernel_egress(self.policies if self.policies is not None else [sample])
        elif self.masquerade:
            self.set_masquerade(True)
        return self

    def close(self):
        """Stop every process the lab started and remove its namespaces (idempotent)."""
        if os.getpid() != self._owner_pid:  # a forked child unwinding: not its lab to remove
            return
        held = self._hold_signals()
        try:
            self._close()
        finally:
            for sig, old in held.items():
                signal.signal(sig, old)
        self._restore_signal_handlers()

    teardown = close

    @staticmethod
    def _hold_signals():
        """Ignore SIGINT/SIGTERM/SIGHUP while tearing down: a second Ctrl-C must not strand namespaces."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _close(self):
        for proc in reversed(self._state.processes):
            try:
                stop = getattr(proc, "stop", None)
                if stop is not None:
                    stop()
                elif proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
            except Exception:
                pass
        self._state.processes.clear()
        for name in reversed(self._state.namespaces):
            try:
                _ns.remove(name)
            except Exception:
                pass
        self._state.namespaces.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._built:
            atexit.unregister(self.close)
            self._built = False

    def _install_signal_handlers(self):
        """SIGTERM (and SIGHUP) become KeyboardInterrupt, so `with` blocks unwind and tear down
        (SIGINT already is one, unless inherited ignored); an ignored or handled signal is left alone."""
        if threading.current_thread() is not threading.main_thread():
            return

        owner = os.getpid()

        def interrupt(signum, frame):
            if os.getpid() != owner:  # a forked helper child: die as the signal says
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._old_handlers[sig] = signal.signal(sig, interrupt)

    def _restore_signal_handlers(self):
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()

    # -- namespace helpers ------------------------------------------------
    def ns(self, name):
        """Namespace name of a lab member ('node1', 'app1', 'router', 'ext1', 'lan')."""
        if name in self.nodes:
            return self.nodes[name].ns
        if name in self.pods:
            return self.pods[name].ns
        if name in self.servers:
            return self.servers[name].ns
        if name in ("router", "lan"):
            return self.prefix + name
        if name.startswith(self.prefix) and name in self._state.namespaces:
            return name
        raise KeyError(f"no lab member named {name!r}")

    def ipr(self, name):
        """An IPRoute bound to a member's namespace (use as a context manager)."""
        return IPRoute(netns=self.ns(name))

    def call(self, name, func, *args, timeout=60.0, **kwargs):
        """Run a Python callable inside a member's namespace (forked child); return its result."""
        return _ns.call(self.ns(name), func, *args, timeout=timeout, **kwargs)

    def run(self, name, argv, timeout=60.0, check=True, **kwargs):
        """Run a command inside a member's namespace; a CompletedProcess (text, captured)."""
        return _ns.run(self.ns(name), list(argv), timeout=timeout, check=check, **kwargs)

    def popen(self, name, argv, **kwargs):
        """Start a command inside a member's namespace; the lab kills it at teardown."""
        proc = _ns.popen(self.ns(name), list(argv), **kwargs)
        self._state.processes.append(proc)
        return proc

    def spawn(self, name, func, *args, **kwargs):
        """Start a long-lived Python callable in a member's namespace (killed at teardown)."""
        proc = _ns.spawn(self.ns(name), func, *args, **kwargs)
        self._state.processes.append(_ProcessHandle(proc))
        return proc

    def track(self, obj):
        """Have the lab stop `obj` (anything with stop()) at teardown."""
        self._state.processes.append(obj)
        return obj

    def sysctl(self, name, values):
        _ns.sysctl(self.ns(name), values)

    def nft(self, name, ruleset):
        """Load an nftables ruleset (text) inside a member's namespace."""
        self.run(name, ["nft", "-f", "-"], input=ruleset)

    # -- building ---------------------------------------------------------
    def _new_ns(self, name):
        if self._lock is None:
            raise RuntimeError("the lab is not built (use `with Lab() as lab:` or lab.build())")
        if name not in self._state.namespaces:
            names = set(self._state.namespaces) | {name}
            self._lock.write(names | set(self._planned()))
        _ns.remove(name)
        _ns.create(name)
        self._state.namespaces.append(name)
        if self.ipv6:  # no DAD, no router advertisements, no autoconfiguration
            _ns.sysctl(name, _ipv6_sysctls())
        else:  # no IPv6: keeps neighbour discovery and MLD chatter off the wires the agent taps
            _ns.sysctl(name, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    def _planned(self):
        return [self.prefix + p[0] for p in self._initial_pods]

    @staticmethod
    def _veth(ns_a, name_a, ns_b, name_b, mac_a, mac_b, mtu=1500):
        """A veth pair with one end in each namespace, both up."""
        tmp = "egc" + format(abs(hash((ns_b, name_b))) % 16**8, "08x")
        with IPRoute(netns=ns_a) as ipr:
            ipr.link("add", ifname=name_a, kind="veth", peer={"ifname": tmp})
            peer = ipr.link_lookup(ifname=tmp)[0]
            ipr.link("set", index=peer, net_ns_fd=ns_b)
            idx = ipr.link_lookup(ifname=name_a)[0]
            ipr.link("set", index=idx, address=mac_a, mtu=mtu, state="up")
        with IPRoute(netns=ns_b) as ipr:
            idx = ipr.link_lookup(ifname=tmp)[0]
            ipr.link("set", index=idx, ifname=name_b, address=mac_b, mtu=mtu, state="up")

    def _build_lan(self):
        with IPRoute(netns=self.lan_ns) as ipr:
            extra = {"br_mcast_snooping": 0} if self.ipv6 else {}  # NDP multicast floods, no MLD querier needed
            ipr.link("add", ifname="br0", kind="bridge", br_stp_state=0, br_forward_delay=0, **extra)
            ipr.link("set", index=ipr.link_lookup(ifname="br0")[0], state="up")

    def _plug_lan(self, ns, port, ip):
        """A veth from `ns` (eth0, MAC derived from its underlay ip) to a port of the LAN bridge."""
        self._veth(self.lan_ns, port, ns, UNDERLAY_IF, mac_for(ip, 0xEF), mac_for(ip))
        with IPRoute(netns=self.lan_ns) as ipr:
            br = ipr.link_lookup(ifname="br0")[0]
            ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=br)

    def _build_router(self):
        ns = self.router_ns
        self._plug_lan(ns, "p-router", ROUTER_IP)
        with IPRoute(netns=ns) as ipr:
            eth = ipr.link_lookup(ifname=UNDERLAY_IF)[0]
            ipr.addr("add", index=eth, address=ROUTER_IP, prefixlen=24)
            if self.ipv6:
                _addr6(ipr, eth, ROUTER_IP6, UNDERLAY6.prefixlen)
        self.sysctl("router", _forwarding_sysctls(self.ipv6))

    def _build_node(self, name, i):
        ns = self._new_ns(self.prefix + name)
        ip = str(UNDERLAY.network_address + i)
        node = Node(
            name=name, ns=ns, ip=ip, pod_cidr=f"10.0.{i}.0/24", mac=mac_for(ip),
            pod_gateway=f"10.0.{i}.1",
            labels={"node.kubernetes.io/name": name, "kubernetes.io/hostname": name,
                    **({"egress-gateway": "true"} if name in GATEWAY_EGRESS_IPS else {})},
            egress_ips=GATEWAY_EGRESS_IPS.get(name, ()),
        )
        if self.ipv6:
            node.ip6, node.pod_cidr6, node.pod_gateway6 = node_ip6(i), pod_cidr6(i), f"fd00:10:{i}::1"
            node.egress_ips6 = GATEWAY_EGRESS_IPS6.get(name, ())
        self._plug_lan(ns, "p-" + name, ip)
        _ns.sysctl(ns, _forwarding_sysctls(self.ipv6))
        with IPRoute(netns=ns) as ipr:
            eth = ipr.link_lookup(ifname=UNDERLAY_IF)[0]
            ipr.addr("add", index=eth, address=ip, prefixlen=24)
            for extra in node.egress_ips:
                ipr.addr("add", index=eth, address=extra, prefixlen=24)
            ipr.route("add", dst="0.0.0.0/0", gateway=ROUTER_IP, oif=eth)
            ipr.route("add", dst=node.pod_cidr, type="unreachable")
            for j, other in enumerate(NODE_NAMES, start=1):
                if j != i:
                    ipr.route("add", dst=f"10.0.{j}.0/24", gateway=str(UNDERLAY.network_address + j), oif=eth)
            if self.ipv6:
                # the node's own address last: the kernel lists (and picks as a source, for
                # masquerade too) the newest IPv6 address of a scope first
                for a in (*node.egress_ips6, node.ip6):
                    _addr6(ipr, eth, a, UNDERLAY6.prefixlen)
                ipr.route("add", dst="::/0", gateway=ROUTER_IP6, oif=eth)
                ipr.route("add", dst=node.pod_cidr6, type="unreachable")
                for j, other in enumerate(NODE_NAMES, start=1):
                    if j != i:
                        ipr.route("add", dst=pod_cidr6(j), gateway=node_ip6(j), oif=eth)
        self.nodes[name] = node

    def _build_server(self, name, router_addr, addresses, router_addr6=None, addresses6=()):
        ns = self._new_ns(self.prefix + name)
        gw, plen = router_addr.split("/")
        self._veth(self.router_ns, name, ns, "eth0", mac_for(gw), mac_for(addresses[0]))
        with IPRoute(netns=self.router_ns) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=name)[0], address=gw, prefixlen=int(plen))
        with IPRoute(netns=ns) as ipr:
            eth = ipr.link_lookup(ifname="eth0")[0]
            for a in addresses:
                ipr.addr("add", index=eth, address=a, prefixlen=int(plen))
            ipr.route("add", dst="0.0.0.0/0", gateway=gw, oif=eth)
        gw6 = None
        if router_addr6:
            gw6, plen6 = router_addr6.split("/")
            with IPRoute(netns=self.router_ns) as ipr:
                _addr6(ipr, ipr.link_lookup(ifname=name)[0], gw6, int(plen6))
            with IPRoute(netns=ns) as ipr:
                eth = ipr.link_lookup(ifname="eth0")[0]
                for a in addresses6:
                    _addr6(ipr, eth, a, int(plen6))
                ipr.route("add", dst="::/0", gateway=gw6, oif=eth)
        self.servers[name] = Server(name=name, ns=ns, addresses=tuple(addresses), gateway=gw,
                                    mac=mac_for(addresses[0]), addresses6=tuple(addresses6), gateway6=gw6)

    def add_pod(self, name, node, labels=None, ip=None):
        """Add a pod namespace behind `node` (veth lxc-<name>); return the Pod.

        ip defaults to the lowest free address from .10 in the node's pod CIDR.
        """
        if not isinstance(name, str) or not name or len(name) > 11 or not all(
                c.isalnum() or c == "-" for c in name):
            raise ValueError(f"pod name must be 1-11 letters, digits or '-', not {name!r}")
        if name in RESERVED or name in self.pods:
            raise ValueError(f"pod name {name!r} is taken")
        if node not in self.nodes:
            raise ValueError(f"node must be one of {sorted(self.nodes)}, not {node!r}")
        n = self.nodes[node]
        cidr = ipaddress.ip_network(n.pod_cidr)
        used = {p.ip for p in self.pods.values()} | {n.pod_gateway}
        if ip is None:
            ip = next(str(a) for a in cidr.hosts() if int(a) - int(cidr.network_address) >= 10 and str(a) not in used)
        elif ipaddress.ip_address(ip) not in cidr or ip in used or ip == str(cidr.broadcast_address):
            raise ValueError(f"pod ip {ip!r} is not a free address of {node}'s pod CIDR {cidr}")
        labels = dict(labels or {})
        ns = self._new_ns(self.prefix + name)
        pod = Pod(name=name, node=node, ip=ip, labels=labels, ns=ns, mac=mac_for(ip),
                  host_ifname="lxc-" + name, host_mac=mac_for(ip, 0xED), ip6=pod_ip6(ip) if self.ipv6 else None)
        self._veth(n.ns, pod.host_ifname, ns, pod.ifname, pod.host_mac, pod.mac, self.pod_mtu)
        with IPRoute(netns=ns) as ipr:
            eth = ipr.link_lookup(ifname=pod.ifname)[0]
            ipr.addr("add", index=eth, address=ip, prefixlen=32)
            ipr.route("add", dst=n.pod_gateway + "/32", oif=eth, scope=253)
            ipr.route("add", dst="0.0.0.0/0", gateway=n.pod_gateway, oif=eth)
            if pod.ip6:
                _addr6(ipr, eth, pod.ip6, 128)
                ipr.route("add", dst=n.pod_gateway6 + "/128", oif=eth)
                ipr.route("add", dst="::/0", gateway=n.pod_gateway6, oif=eth)
        with IPRoute(netns=n.ns) as ipr:
            lxc = ipr.link_lookup(ifname=pod.host_ifname)[0]
            ipr.addr("add", index=lxc, address=n.pod_gateway, prefixlen=32)
            ipr.route("add", dst=ip + "/32", oif=lxc, scope=253)
            if pod.ip6:
                _addr6(ipr, lxc, n.pod_gateway6, 128)
                ipr.route("add", dst=pod.ip6 + "/128", oif=lxc)
        _ns.sysctl(n.ns, {f"net.ipv4.conf.{pod.host_ifname}.rp_filter": 0})
        self.pods[name] = pod
        if self._kernel_policies is not None:
            self.kernel_entries = kernel.install(self, self._kernel_policies, self._kernel_nodes)
        return pod

    # -- datapaths --------------------------------------------------------
    def set_masquerade(self, on=True):
        """Per-node nftables masquerade of the node's pods leaving the cluster (no egress policy).

        It replaces the nodes' lab nftables table: with the kernel egress
        gateway installed, its SNAT rules go too (install_kernel_egress
        already masquerades).
        """
        for node in self.nodes.values():
            self.nft(node.name, kernel.masquerade_ruleset(node, CLUSTER_CIDR, enabled=on,
                                                          cluster_cidr6=CLUSTER_CIDR6 if self.ipv6 else None))
        self.masquerade = bool(on)

    def install_kernel_egress(self, policies, nodes=None):
        """Install the Linux baseline egress gateway for `policies` (replacing any previous one).

        nodes: only these nodes (default all), e.g. to pair a kernel node with an agent.
        Returns the egress list: dicts with src, cidr, egress_ip, gateway_ip (kernel.compile_entries).
        """
        entries = kernel.install(self, policies, nodes)
        self._kernel_nodes = nodes
        self.kernel_entries = entries
        self._kernel_policies = policies
        self.masquerade = True
        self.datapath = "kernel"
        return entries

    def remove_kernel_egress(self, nodes=None):
        """Take the kernel baseline out again (nodes keep routing, masquerade as `self.masquerade`)."""
        kernel.uninstall(self, nodes)
        self._kernel_policies = None
        self.kernel_entries = []
        self.datapath = None

    # -- facts --------------------------------------------------------------
    def cluster(self):
        """The lab as a cluster file (the schema of examples/cluster.yaml, egresscore.cluster).

        For the seed's pods this equals examples/cluster.yaml; the dual-stack
        lab adds each node's IPv6 pod CIDR, underlay and egress addresses and
        IPv6 default route interface, and each pod's IPv6 address.
        """
        nodes = []
        for n in self.nodes.values():
            addrs = [f"{a}/{UNDERLAY.prefixlen}" for a in (n.ip, *n.egress_ips)]
            node = {"name": n.name, "labels": dict(n.labels), "internalIP": n.ip, "podCIDRs": [n.pod_cidr],
                    "defaultRouteInterface": n.ifname,
                    "interfaces": [{"name": n.ifname, "addresses": addrs}]}
            if n.ip6:
                node["podCIDRs"].append(n.pod_cidr6)
                node["defaultRouteInterfaceV6"] = n.ifname
                addrs += [f"{a}/{UNDERLAY6.prefixlen}" for a in (n.ip6, *n.egress_ips6)]
            nodes.append(node)
        return {
            "nodes": nodes,
            "namespaces": [{"name": "default", "labels": {}}],
            "pods": [
                {"name": p.name, "namespace": "default", "uid": POD_UIDS.get(p.name, f"default/{p.name}"),
                 "labels": dict(p.labels), "ips": [p.ip, *([p.ip6] if p.ip6 else [])], "node": p.node}
                for p in self.pods.values()
            ],
        }

    def cluster_facts(self):
        """Nodes, pods and servers with their addresses and MACs (plain dicts, YAML-ready);
        the dual-stack lab adds the IPv6 ones (keys ending in 6)."""
        facts = {
            "nodes": [
                {"name": n.name, "internalIP": n.ip, "podCIDR": n.pod_cidr, "labels": dict(n.labels),
                 "egressIPs": list(n.egress_ips), "interface": n.ifname, "mac": n.mac,
                 "podGateway": n.pod_gateway, "namespace": n.ns}
                for n in self.nodes.values()
            ],
            "pods": [
                {"name": p.name, "node": p.node, "ip": p.ip, "labels": dict(p.labels), "mac": p.mac,
                 "hostInterface": p.host_ifname, "hostMAC": p.host_mac, "namespace": p.ns}
                for p in self.pods.values()
            ],
            "router": {"ip": ROUTER_IP, "mac": mac_for(ROUTER_IP), "namespace": self.router_ns},
            "servers": [
                {"name": s.name, "addresses": list(s.addresses), "namespace": s.ns}
                for s in self.servers.values()
            ],
        }
        if self.ipv6:
            for d, n in zip(facts["nodes"], self.nodes.values()):
                d.update(internalIP6=n.ip6, podCIDR6=n.pod_cidr6, podGateway6=n.pod_gateway6,
                         egressIPs6=list(n.egress_ips6))
            for d, p in zip(facts["pods"], self.pods.values()):
                d["ip6"] = p.ip6
            for d, s in zip(facts["servers"], self.servers.values()):
                d["addresses6"] = list(s.addresses6)
            facts["router"]["ip6"] = ROUTER_IP6
        return facts

    # -- traffic --------------------------------------------------------------
    def start_servers(self, **kwargs):
        """Start the external servers (TCP HTTP-like :80, UDP echo :7, ping log) in every server namespace."""
        return self.track(traffic.ServerSet(self, **kwargs))

    def tcp_request(self, pod, dst, port=traffic.HTTP_PORT, timeout=3.0):
        """One HTTP-like GET from `pod`; returns the source address the server reports having seen."""
        return self.call(pod, traffic.tcp_request, dst, port, timeout, timeout=timeout + 5)

    def udp_echo(self, pod, dst, port=traffic.UDP_PORT, count=3, timeout=2.0):
        """`count` UDP datagrams from `pod`; returns how many echoes came back."""
        return self.call(pod, traffic.udp_echo, dst, port, count, timeout, timeout=timeout * count + 5)

    def ping(self, pod, dst, count=3, timeout=2.0):
        """`count` ICMP echo requests from `pod`; returns how many replies came back."""
        return self.call(pod, traffic.ping, dst, count, timeout, timeout=timeout * count + 5)

    def iperf3(self, pod, dst, seconds=2.0, streams=1, port=5201):
        """iperf3 TCP from `pod` to the server address `dst`; returns received Gbit/s.

        A one-shot iperf3 server is started in the server's namespace for the run.
        """
        result = self.iperf3_json(pod, dst, ["-t", str(seconds), "-P", str(int(streams))], seconds, port)
        return result["end"]["sum_received"]["bits_per_second"] / 1e9

    def iperf3_json(self, pod, dst, args, seconds, port=5201):
        """One iperf3 client run from `pod` against a one-shot server on `dst`
        (args: more client options, e.g. ["-u", "-b", "10M"]); its parsed --json result."""
        with self.iperf3_server(dst, port):
            return self.iperf3_client(pod, dst, args, seconds, port)

    @contextlib.contextmanager
    def iperf3_server(self, dst, port=5201):
        """A one-shot iperf3 server on the external server address `dst`, listening when entered."""
        if shutil.which("iperf3") is None:
            raise RuntimeError("iperf3 is not installed (apt-get install iperf3)")
        server = self._server_of(dst)
        srv = self.popen(server.name, ["iperf3", "-s", "-1", "-B", dst, "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.call(server.name, traffic.wait_listening, port, 10.0, timeout=15)
            yield srv
        finally:
            try:
                srv.wait(5)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
            self._state.processes.remove(srv)

    def iperf3_client(self, pod, dst, args, seconds, port=5201):
        """The client half of iperf3_json (a server must listen on `dst`): the parsed --json result."""
        argv = ["iperf3", "-c", dst, "-p", str(port), *map(str, args), "--json"]
        out = self.run(pod, argv, timeout=seconds + 20, check=False)
        try:
            result = json.loads(out.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 from {pod} to {dst} gave no JSON: {out.stderr.strip()[:200]}") from None
        if "error" in result:
            raise RuntimeError(f"iperf3 from {pod} to {dst}: {result['error']}")
        return result

    def _server_of(self, dst):
        server = next((s for s in self.servers.values() if dst in s.addresses or dst in s.addresses6), None)
        if server is None:
            raise ValueError(f"dst must be an external server address, not {dst!r}")
        return server

    def udp_rate(self, pod, dst, seconds=2.0, size=18, port=9000, max_packets=5_000_000):
        """Flood small UDP datagrams from `pod` to the server address `dst` for `seconds`.

        Returns {'sent', 'received', 'seconds', 'rx_pps'}: rx_pps is what the
        server received per second between its first and last datagram.
        """
        server = self._server_of(dst)
        parent, child = _ns._fork.Pipe()
        proc = _ns.spawn(server.ns, _count_into, child, dst, port, seconds + 5.0)
        child.close()
        try:
            if not parent.poll(10) or parent.recv() != "ready":
                raise RuntimeError("UDP counter did not start")
            sent = self.call(pod, traffic.udp_flood, dst, port, seconds, size, max_packets,
                             timeout=seconds + 10)
            if not parent.poll(seconds + 10):
                raise TimeoutError("UDP counter did not report")
            received, span = parent.recv()
        finally:
            parent.close()
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        return {"sent": sent, "received": received, "seconds": span,
                "rx_pps": received / span if span > 0 else 0.0}


class _ProcessHandle:
    def __init__(self, proc):
        self.proc = proc

    def stop(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


def _addr6(ipr, index, address, prefixlen):
    """An IPv6 address added without duplicate address detection (IFA_F_NODAD)."""
    ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)


def _ipv6_sysctls():
    """IPv6 on, without DAD, router advertisements or autoconfiguration (all, default)."""
    out = {}
    for scope in ("all", "default"):
        out.update({f"net.ipv6.conf.{scope}.disable_ipv6": 0, f"net.ipv6.conf.{scope}.accept_dad": 0,
                    f"net.ipv6.conf.{scope}.accept_ra": 0, f"net.ipv6.conf.{scope}.autoconf": 0,
                    f"net.ipv6.conf.{scope}.dad_transmits": 0})
    return out


def _forwarding_sysctls(ipv6=False):
    if ipv6:
        return {**_forwarding_sysctls(), "net.ipv6.conf.all.forwarding": 1, "net.ipv6.conf.default.forwarding": 1,
                "net.ipv6.conf.all.accept_redirects": 0, "net.ipv6.conf.default.accept_redirects": 0,
                "net.ipv6.conf.all.accept_ra": 0, "net.ipv6.conf.default.accept_ra": 0,
                "net.ipv6.conf.eth0.accept_ra": 0, "net.ipv6.conf.eth0.accept_dad": 0}
    return {
        "net.ipv4.ip_forward": 1,
        "net.ipv4.conf.all.rp_filter": 0,
        "net.ipv4.conf.default.rp_filter": 0,
        "net.ipv4.conf.eth0.rp_filter": 0,
        "net.ipv4.conf.all.send_redirects": 0,
        "net.ipv4.conf.default.send_redirects": 0,
        "net.ipv4.conf.eth0.send_redirects": 0,
        "net.ipv4.conf.all.accept_redirects": 0,
    }


def _count_into(conn, addr, port, seconds):
    conn.send(traffic.udp_count(addr, port, seconds, ready=conn))
