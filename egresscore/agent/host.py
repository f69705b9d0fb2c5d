"""The agent's host work: one thread inside the node's network namespace.

Everything an agent asks of the host stack runs on a HostThread, never on the
datapath thread and never through a system tool or a subprocess:

- netlink through pyroute2 (one IPRoute opened once on the thread, so it
  lives in the namespace; pyroute2 0.9 keeps one socket per thread and its
  IPRoute(netns=...) forks on every open, so neither is used elsewhere);
- sysctls through /proc/sys, opened on the thread (the file belongs to the
  opener's namespace);
- Neighbours: the underlay's neighbour MACs and default routers, kept from
  netlink events (RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE) after
  one dump, ARP and NDP alike (IPv4 and IPv6 neighbours, the IPv4 and the
  IPv6 default router); missing ones are probed once a second with an empty
  UDP datagram to the discard port (the kernel ARPs, or solicits the
  neighbour, for it).  Each change is handed to `publish` (the agent queues
  it for its datapath thread);
- Claims: the FIB rules that keep the kernel off the traffic the agent
  forwards (below), the kernel's ip_local_port_range, and the HostState
  file that remembers the host's originals across crashes.

Claims.  AF_PACKET taps see a frame before the IP layer, so a FIB rule that
blackholes it still leaves it to the agent's ring, and the kernel neither
forwards it nor answers it (no RST, no ICMP: a blackhole rule drops
silently).  Rules are tagged with protocol RULE_PROTOCOL and sit in a band
before the `local` table's rule, which moves from priority 0 to PRIO_LOCAL
(and back on close):

    PRIO_UNDERLAY  iif <underlay> to <node IP> ipproto udp dport <vxlan> blackhole
                   iif <underlay> to <each local IP> ipproto tcp|udp dport <NAT range> blackhole
    PRIO_INSIDE    to <each pod CIDR and node IP> goto PRIO_LOCAL
    PRIO_PODS      iif <each pod veth> blackhole

so pod traffic leaving the cluster is the agent's, pod traffic inside it
the kernel's.  IPv6 has the same band in its own rule table (`ip -6 rule`),
when the host has IPv6 on (net.ipv6.conf.all.disable_ipv6 = 0): the NAT
range of each global IPv6 address of the underlay, the VXLAN port on the
node's IPv6 address (the IPv6 underlay), the IPv6 inside destinations, and
the pod veths; link-local and multicast destinations (fe80::/10, ff00::/8)
always go to the local table, since neighbour discovery and MLD travel in
IPv6 packets (ARP is not IP, so IPv4 needs no such exception).  IPv6's own
`local` rule moves from 0 to PRIO_LOCAL as IPv4's does.  ICMP echo replies to egress IPs need no claim: the kernel
never answers an echo reply (it only hands it to a ping socket with that
identifier, if one exists).  The kernel refuses a port range ending at
65535, hence NAT port ranges end at 65534.
"""
import errno
import fcntl
import json
import os
import queue
import selectors
import socket
import sys
import threading
import time
from concurrent.futures import Future
from typing import NamedTuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from .._netns import NETNS_DIR, setns
from ..control import SOCKET_DIR, _private_dir
from ..errors import AgentError

RULE_PROTOCOL = 236              # FRA_PROTOCOL of every rule the agent installs (unassigned in rt_protos)
PRIO_UNDERLAY, PRIO_INSIDE, PRIO_PODS, PRIO_LOCAL = 40, 41, 42, 43
LOCAL_TABLE = 255
RTPROT_KERNEL = 2
PORT_RANGE = "net.ipv4.ip_local_port_range"
KERNEL_DEFAULT_PORTS = "32768 60999"
NFT_TABLE = "egresscore"         # claimed traffic through nftables in older versions

_RTMGRP_NEIGH, _RTMGRP_IPV4_ROUTE, _RTMGRP_IPV6_ROUTE = 0x4, 0x40, 0x400
_FAMILIES = (socket.AF_INET, socket.AF_INET6)
IPV6_ALWAYS_LOCAL = ("fe80::/10", "ff00::/8")   # neighbour discovery, MLD: never claimed
DISABLE_IPV6 = "net.ipv6.conf.all.disable_ipv6"
_NUD_INCOMPLETE, _NUD_FAILED = 0x01, 0x20
_FR_ACT_TO_TBL, _FR_ACT_GOTO, _FR_ACT_BLACKHOLE = 1, 2, 6


def check_netns(name):
    """Raise AgentError unless network namespace `name` exists (/run/netns/NAME).
    Checked first: pyroute2 would create a missing one."""
    if name is None:
        return
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise AgentError(f"network namespace name {name!r} is not valid")
    if not os.path.exists(os.path.join(NETNS_DIR, name)):
        raise AgentError(f"no network namespace named {name!r} ({NETNS_DIR}/{name} does not exist)")


def where(netns):
    return f" in network namespace {netns!r}" if netns else ""


# -- the thread -----------------------------------------------------------------------

class HostThread:
    """A thread inside `netns` (None: this one) running posted jobs, file
    descriptor readers and periodic jobs; its IPRoute is opened once, there.

    call(fn, *args) runs fn there and returns its result (or raises);
    post(fn, *args) queues it and returns at once."""

    def __init__(self, netns=None, name="egresscore-host"):
        self.netns = netns
        self._jobs = queue.SimpleQueue()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._timers = []          # [next time, period, fn]
        self._stopping = False
        self._ipr = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._started = Future()

    def start(self):
        self._thread.start()
        self._started.result(30)   # raises what entering the namespace raised
        return self

    @property
    def on_thread(self):
        return threading.current_thread() is self._thread

    @property
    def ipr(self):
        """The thread's IPRoute (host thread only)."""
        assert self.on_thread, "netlink is used from the host thread only"
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def post(self, fn, *args):
        self._jobs.put((fn, args, None))
        self._wake()

    def call(self, fn, *args, timeout=60.0):
        if self.on_thread:
            return fn(*args)
        if not self._thread.is_alive():
            raise RuntimeError("the host thread is not running")
        fut = Future()
        self._jobs.put((fn, args, fut))
        self._wake()
        return fut.result(timeout)

    def add_reader(self, fd, fn):
        self._sel.register(fd, selectors.EVENT_READ, fn)

    def remove_reader(self, fd):
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def every(self, seconds, fn):
        self._timers.append([time.monotonic() + seconds, seconds, fn])

    def stop(self):
        if self._thread.is_alive():
            self._stopping = True
            self._wake()
            self._thread.join(30)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except OSError:   # full: a wake-up is pending anyway
            pass

    def _main(self):
        try:
            if self.netns is not None:
                setns(self.netns)
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._started.set_exception(AgentError(f"cannot enter network namespace {self.netns!r}: {exc}"))
            return
        self._started.set_result(True)
        try:
            while not self._stopping:
                now = time.monotonic()
                due = min((t[0] for t in self._timers), default=now + 3600)
                for key, _ in self._sel.select(max(0.0, due - now)):
                    if key.data is None:
                        try:
                            while os.read(self._wake_r, 512):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        self._guard(key.data)
                self._run_jobs()
                now = time.monotonic()
                for t in self._timers:
                    if now >= t[0]:
                        t[0] = now + t[1]
                        self._guard(t[2])
            self._run_jobs()
        finally:
            if self._ipr is not None:
                self._ipr.close()
            self._sel.close()

    def _run_jobs(self):
        while True:
            try:
                fn, args, fut = self._jobs.get_nowait()
            except queue.Empty:
                return
            if fut is None:
                self._guard(fn, *args)
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    @staticmethod
    def _guard(fn, *args):
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - host work must not end the thread
            print(f"egresscore host thread: {getattr(fn, '__name__', fn)}: {exc}", file=sys.stderr)


# -- sysctls ---------------------------------------------------------------------------

def _sysctl_path(key):
    return "/proc/sys/" + key.replace(".", "/")


def sysctl_get(key):
    """A sysctl's value, whitespace collapsed (call on the host thread)."""
    with open(_sysctl_path(key)) as f:
        return " ".join(f.read().split())


def sysctl_set(key, value):
    with open(_sysctl_path(key), "w") as f:
        f.write(str(value))


# -- host facts ------------------------------------------------------------------------

def link_facts(ipr, ifname):
    """(index, MAC, IPv4 addresses) of interface `ifname`, or None when it does not exist."""
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        return None
    link = ipr.get_links(idx[0])[0]
    addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET, index=idx[0])]
    return idx[0], link.get_attr("IFLA_ADDRESS"), addrs


def link_addrs6(ipr, index):
    """The global IPv6 addresses of interface `index` (link-local and host scope left out), kernel order."""
    return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET6, index=index)
            if a["scope"] == 0]


def ipv6_on():
    """Whether this namespace has IPv6 (host thread: the sysctl file is the opener's namespace's)."""
    try:
        return sysctl_get(DISABLE_IPV6) == "0"
    except OSError:    # no IPv6 in this kernel
        return False


# -- neighbours ------------------------------------------------------------------------

class Neighbours:
    """The underlay's neighbour MACs and default routers, from netlink events
    (ARP and NDP: both families).

    publish(router_ip, macs, router6) is called on the host thread after
    every change that matters, with macs {ip: MAC} holding the last valid MAC
    of every underlay neighbour, IPv4 and IPv6 (an IPv6 key is a string with
    ':'): an entry that goes away or fails keeps its last MAC (what the
    datapath keeps sending to) and is probed again.  router6 is the IPv6
    default router (often link-local), None without one."""

    def __init__(self, host, underlay_index, publish, probe_every=1.0):
        self._host = host
        self._index = underlay_index
        self._publish = publish
        self._probe_every = probe_every
        self.router = None
        self.router6 = None
        self.macs = {}
        self._valid = set()       # IPs in a usable state right now
        self._wanted = set()
        self._events = None
        self._probe = None
        self._probe6 = None
        self._marshal = MarshalRtnl()
        self._changed = threading.Condition()

    def start(self):
        """Open the event socket and the probe socket, dump (host thread)."""
        self._events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                     0)  # NETLINK_ROUTE
        self._events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._events.bind((0, _RTMGRP_NEIGH | _RTMGRP_IPV4_ROUTE | _RTMGRP_IPV6_ROUTE))
        self._probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self._probe6 = socket.socket(socket.AF_INET6,
                                         socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError:   # no IPv6 in this kernel
            self._probe6 = None
        self._host.add_reader(self._events.fileno(), self._on_events)
        self._host.every(self._probe_every, self.probe)
        self._dump()

    def close(self):
        for s in (self._events, self._probe, self._probe6):
            if s is not None:
                self._host.remove_reader(s.fileno())
                s.close()
        self._events = self._probe = self._probe6 = None

    def want(self, ips):
        """The IPs the datapath needs (other nodes); missing ones are probed now."""
        self._wanted = set(ips)
        self.probe()

    def missing(self):
        need = set(self._wanted) | {r for r in (self.router, self.router6) if r}
        return sorted(need - self._valid)

    def wait(self, timeout):
        """Until every wanted neighbour is known or `timeout` s (any thread)."""
        deadline = time.monotonic() + timeout
        while self._host.call(self.missing) and time.monotonic() < deadline:
            with self._changed:
                self._changed.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    def probe(self):
        if self._probe is None:
            return
        for ip in self.missing():
            try:
                if ":" not in ip:
                    self._probe.sendto(b"", (ip, 9))
                elif self._probe6 is not None:   # a link-local router needs the underlay as its scope
                    self._probe6.sendto(b"", (ip, 9, 0, self._index if ip.lower().startswith("fe80") else 0))
            except OSError:
                pass

    def _dump(self):
        ipr = self._host.ipr
        self._valid.clear()
        for family in _FAMILIES:
            for n in ipr.get_neighbours(family=family, ifindex=self._index):
                self._neigh(n, deleted=False)
        self._read_router()
        self._emit()

    def _read_router(self):
        self.router = self._default_gateway(socket.AF_INET)
        self.router6 = self._default_gateway(socket.AF_INET6)

    def _default_gateway(self, family):
        try:
            for r in self._host.ipr.get_default_routes(family=family):
                gw = r.get_attr("RTA_GATEWAY")
                if gw:
                    return gw
        except NetlinkError:    # no IPv6
            pass
        return None

    def _neigh(self, msg, deleted):
        if msg["ifindex"] != self._index:
            return False
        ip, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
        if not ip:
            return False
        if deleted or not mac or msg["state"] & (_NUD_INCOMPLETE | _NUD_FAILED):
            self._valid.discard(ip)
            return False
        self._valid.add(ip)
        if self.macs.get(ip) == mac:
            return False
        self.macs[ip] = mac
        return True

    def _on_events(self):
        changed, route = False, False
        while True:
            try:
                data = self._events.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:   # events were lost: read the whole table again
                    self._dump()
                    return
                raise
            for msg in self._marshal.parse(data):
                event = msg.get("event")
                if event in ("RTM_NEWNEIGH", "RTM_DELNEIGH") and msg.get("family") in _FAMILIES:
                    changed |= self._neigh(msg, event == "RTM_DELNEIGH")
                elif event in ("RTM_NEWROUTE", "RTM_DELROUTE") and msg.get("dst_len") == 0:
                    route = True
        if route:
            old = (self.router, self.router6)
            self._read_router()
            changed |= (self.router, self.router6) != old
        if changed:
            self._emit()
        with self._changed:
            self._changed.notify_all()

    def _emit(self):
        self._publish(self.router, dict(self.macs), self.router6)
        with self._changed:
            self._changed.notify_all()


# -- the state file ----------------------------------------------------------------------

class HostState:
    """What the host had before the first agent changed it, kept in
    /run/egresscore/<node>[@<netns>].host.json across crashes (JSON, 0600,
    written tmp + rename), and a lock (<...>.lock, flock'ed while the agent
    lives) that tells a live agent from a crashed one's leftovers."""

    def __init__(self, node, netns=None, directory=SOCKET_DIR):
        base = f"{node}@{netns}" if netns else node
        if "/" in base or base.startswith("."):
            raise AgentError(f"node name {node!r} cannot name a state file")
        self.path = os.path.join(directory, base + ".host.json")
        self.lock_path = os.path.join(directory, base + ".lock")
        self.directory = directory
        self.original = None       # {"port_range": "...", "local_priority": int, "local_protocol": int}
        self._fd = -1

    def acquire(self):
        _private_dir(self.directory)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AgentError(f"another egresscore agent runs here ({self.lock_path} is locked)") from None
        self._fd = fd
        try:
            with open(self.path) as f:
                self.original = json.load(f)
        except FileNotFoundError:
            self.original = None
        except (OSError, ValueError) as exc:
            print(f"egresscore agent: ignoring unreadable {self.path}: {exc}", file=sys.stderr)
            self.original = None
        return self

    def record(self, original):
        """Write the originals (before the first change to the host)."""
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(original, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)
        self.original = dict(original)

    def forget(self):
        """The host is restored: no state file."""
        for path in (self.path, self.path + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.original = None

    def release(self):
        if self._fd >= 0:
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = -1


def nat_state_path(node, netns=None, setting=True, directory=SOCKET_DIR):
    """The NAT state file of the node's agent (the `nat_state` argument):
    True: <directory>/<node>[@<netns>].nat, beside the host state; a path:
    that path; False or None: no file."""
    if setting is None or setting is False:
        return None
    if setting is True:
        base = f"{node}@{netns}" if netns else node
        if "/" in base or base.startswith("."):
            raise AgentError(f"node name {node!r} cannot name a state file")
        return os.path.join(directory, base + ".nat")
    return os.fspath(setting)


# -- claims ------------------------------------------------------------------------------

_SELECTORS = (("FRA_IIFNAME", "iifname"), ("FRA_IP_PROTO", "ip_proto"), ("FRA_DPORT_RANGE", "dport_range"),
              ("FRA_GOTO", "goto"))


def _spec(priority, action, table=0, dst=None, dst_len=0, iifname=None, ip_proto=None, dport=None, goto=None,
          family=socket.AF_INET):
    """A rule we want, shaped like a dumped fibmsg (its FRA_ attributes and header fields)."""
    return {"FRA_PRIORITY": priority, "action": action, "FRA_TABLE": table, "FRA_DST": dst,
            "dst_len": dst_len, "FRA_IIFNAME": iifname, "FRA_IP_PROTO": ip_proto,
            "FRA_DPORT_RANGE": f"{dport[0]}:{dport[1]}" if dport else None, "FRA_GOTO": goto, "family": family}


def _rule_kwargs(r):
    """pyroute2 rule() arguments for a _spec dict or a dumped fibmsg (protocol aside)."""
    get = r.get_attr if hasattr(r, "get_attr") else r.get
    kw = {"family": r["family"], "priority": get("FRA_PRIORITY") or 0, "action": r["action"]}
    table = get("FRA_TABLE") or r.get("table", 0)
    if table:
        kw["table"] = table
    if get("FRA_DST"):
        kw.update(dst=get("FRA_DST"), dst_len=r["dst_len"])
    for key, arg in _SELECTORS:
        if get(key) is not None:
            kw[arg] = get(key)
    return kw


def _rule_key(r):
    return tuple(sorted(_rule_kwargs(r).items()))


def _add_rule(ipr, r, protocol=RULE_PROTOCOL):
    try:
        ipr.rule("add", protocol=protocol, **_rule_kwargs(r))
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def _del_rule(ipr, msg):
    kw = _rule_kwargs(msg)
    if msg.get_attr("FRA_PROTOCOL") is not None:
        kw["protocol"] = msg.get_attr("FRA_PROTOCOL")
    try:
        ipr.rule("del", **kw)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ESRCH):
            raise


def _is_local_rule(msg):
    """The plain `lookup local` rule (no selector)."""
    return ((msg.get_attr("FRA_TABLE") or msg["table"]) == LOCAL_TABLE and msg["action"] == _FR_ACT_TO_TBL
            and not msg.get_attr("FRA_DST") and not msg.get_attr("FRA_SRC") and not msg.get_attr("FRA_IIFNAME")
            and not msg.get_attr("FRA_IP_PROTO") and not msg.get_attr("FRA_FWMARK"))


class Claims:
    """The FIB rules and the port range that keep the kernel off the agent's
    traffic (see the module docstring); host thread only.

    sync(inside, pods) makes the rules what they must be for those inside
    destinations and pod veths, adding before deleting so no packet slips
    through; remove() puts the host back as the HostState file says it was.
    Rules taken over from a stopped agent are only added to until settle():
    a starting agent syncs before its pod veths are open, and deleting a
    leftover pod blackhole then would let the kernel forward that pod's
    packets with the pod's own address."""

    def __init__(self, host, state, *, underlay, node_ip, local_ips, vxlan_port, nat_port_range,
                 kernel_port_range, node_ip6=None):
        self._host = host
        self._state = state
        self._underlay = underlay
        self._node_ip = node_ip
        self._node_ip6 = node_ip6      # the VXLAN port is claimed on it too (the IPv6 underlay)
        self._local_ips = sorted(local_ips)   # both families: each claims its NAT range in its own rules
        self._vxlan_port = vxlan_port
        self._nat = tuple(nat_port_range)
        self._kernel_ports = "{} {}".format(*kernel_port_range)
        self._local_prio = {socket.AF_INET: PRIO_LOCAL, socket.AF_INET6: PRIO_LOCAL}
        self._moved = {socket.AF_INET: False, socket.AF_INET6: False}
        self._v6 = False           # IPv6 on here: claims in the IPv6 rules too (_begin)
        self._inherited = False    # take_over found rules: sync deletes none until settle()
        self.installed = False

    # leftovers
    def _rules(self, family):
        try:
            return self._host.ipr.get_rules(family=family)
        except NetlinkError:   # no IPv6 in this kernel
            return []

    def ours(self):
        return [r for family in _FAMILIES for r in self._rules(family) if r.get_attr("FRA_PROTOCOL") == RULE_PROTOCOL]

    def take_over(self, socket_path=None):
        """Find what a crashed agent left (tagged rules, egc-tnl0, an old
        nftables table, a socket file, a changed port range); return a one-line
        description, or None when there is nothing."""
        from .tunnel import TUNNEL_IF

        found = []
        rules = self.ours()
        if rules:
            found.append(f"{len(rules)} FIB rules (protocol {RULE_PROTOCOL})")
            self._inherited = True
        ipr = self._host.ipr
        for idx in ipr.link_lookup(ifname=TUNNEL_IF):
            ipr.link("del", index=idx)
            found.append(f"tunnel device {TUNNEL_IF} (removed)")
        if _drop_nft_table():
            found.append(f"nftables table {NFT_TABLE} (removed)")
        if socket_path and os.path.exists(socket_path) and not _answers(socket_path):
            os.unlink(socket_path)
            found.append(f"socket file {socket_path} (removed)")
        orig = self._state.original
        now = sysctl_get(PORT_RANGE)
        if orig is None and rules:
            # rules but no record (the state file was removed): assume the kernel's defaults
            orig = {"port_range": KERNEL_DEFAULT_PORTS if now == self._kernel_ports else now,
                    "local_priority": 0, "local_protocol": RTPROT_KERNEL}
            self._state.record(orig)
            found.append(f"no state file: the original port range is taken to be {orig['port_range']}")
        if orig is not None and now != orig["port_range"]:
            found.append(f"port range {now} (the original {orig['port_range']} is kept in {self._state.path})")
        return ", ".join(found) or None

    def set_local_ips(self, ips):
        """The local addresses whose NAT range is claimed (a floating egress
        IP taken over or given back); the next sync() applies them."""
        self._local_ips = sorted(set(ips))

    # rules
    def _wanted(self, inside, pods):
        lo, hi = self._nat
        u = self._underlay
        v4, v6 = socket.AF_INET, socket.AF_INET6
        vxlan = (self._vxlan_port, self._vxlan_port)
        rules = [_spec(PRIO_UNDERLAY, _FR_ACT_BLACKHOLE, dst=self._node_ip, dst_len=32, iifname=u,
                       ip_proto=socket.IPPROTO_UDP, dport=vxlan)]
        if self._v6 and self._node_ip6:
            rules.append(_spec(PRIO_UNDERLAY, _FR_ACT_BLACKHOLE, dst=self._node_ip6, dst_len=128, iifname=u,
                               ip_proto=socket.IPPROTO_UDP, dport=vxlan, family=v6))
        for ip in self._local_ips:
            family = v6 if ":" in ip else v4
            if family == v6 and not self._v6:
                continue
            for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                rules.append(_spec(PRIO_UNDERLAY, _FR_ACT_BLACKHOLE, dst=ip, dst_len=128 if family == v6 else 32,
                                   iifname=u, ip_proto=proto, dport=(lo, hi), family=family))
        if pods:
            families = (v4, v6) if self._v6 else (v4,)
            always = IPV6_ALWAYS_LOCAL if self._v6 else ()
            for cidr in sorted(set(inside)) + list(always):
                net, _, plen = cidr.partition("/")
                family = v6 if ":" in net else v4
                if family not in families:
                    continue
                rules.append(_spec(PRIO_INSIDE, _FR_ACT_GOTO, dst=net,
                                   dst_len=int(plen or (128 if family == v6 else 32)),
                                   goto=self._local_prio[family], family=family))
            for family in families:
                for ifname in sorted(pods):
                    rules.append(_spec(PRIO_PODS, _FR_ACT_BLACKHOLE, iifname=ifname, family=family))
        return rules

    def sync(self, inside, pods):
        ipr = self._host.ipr
        if not self.installed:
            self._begin()
        have = self.ours()
        keys = {_rule_key(r) for r in have}
        wanted = self._wanted(inside, pods)
        local = [_spec(self._local_prio[f], _FR_ACT_TO_TBL, table=LOCAL_TABLE, family=f) for f in self._families()
                 if self._moved[f]]
        for r in local + wanted:
            if _rule_key(r) not in keys:
                _add_rule(ipr, r)
        for family in self._families():
            if not self._moved[family]:
                continue
            for r in self._rules(family):
                if (_is_local_rule(r) and r.get_attr("FRA_PROTOCOL") != RULE_PROTOCOL
                        and (r.get_attr("FRA_PRIORITY") or 0) < PRIO_LOCAL):
                    _del_rule(ipr, r)      # the host's own local rule, now that ours is in place
        keep = {_rule_key(r) for r in wanted} | {_rule_key(r) for r in local}
        for r in reversed(have):   # pod blackholes before the gotos that skip them
            if _rule_key(r) not in keep and not self._inherited:
                _del_rule(ipr, r)
        if sysctl_get(PORT_RANGE) != self._kernel_ports:
            sysctl_set(PORT_RANGE, self._kernel_ports)

    def settle(self):
        """The agent forwards for every pod it has: leftover rules it does not
        want may go at the next sync."""
        self._inherited = False

    def _families(self):
        return _FAMILIES if self._v6 else (socket.AF_INET,)

    def _host_local(self, family):
        """(priority, protocol) of the host's own first `lookup local` rule of `family`, or (None, kernel)."""
        host_local = [r for r in self._rules(family)
                      if _is_local_rule(r) and r.get_attr("FRA_PROTOCOL") != RULE_PROTOCOL]
        first = min(host_local, key=lambda r: r.get_attr("FRA_PRIORITY") or 0, default=None)
        if first is None:
            return None, RTPROT_KERNEL
        return first.get_attr("FRA_PRIORITY") or 0, first.get_attr("FRA_PROTOCOL") or 0

    def _begin(self):
        """Record the originals (once per host, kept across crashes), then the first change."""
        self._v6 = ipv6_on()
        if self._state.original is None:
            prio, proto = self._host_local(socket.AF_INET)
            self._state.record({"port_range": sysctl_get(PORT_RANGE), "local_priority": prio,
                                "local_protocol": proto})
        if self._v6 and "local_priority6" not in self._state.original:
            # IPv6's local rule, recorded the first time the claims cover IPv6 (a state file
            # from before that, or IPv6 turned on since, has none): ours were never in that table
            prio, proto = self._host_local(socket.AF_INET6)
            if prio is None and any(_is_local_rule(r) for r in self.ours() if r["family"] == socket.AF_INET6):
                prio, proto = 0, RTPROT_KERNEL   # a stopped agent moved it, unrecorded: the kernel's default
            self._state.record({**self._state.original, "local_priority6": prio, "local_protocol6": proto})
        for family, key in ((socket.AF_INET, "local_priority"), (socket.AF_INET6, "local_priority6")):
            orig = self._state.original.get(key)
            self._moved[family] = orig is not None and orig < PRIO_LOCAL and family in self._families()
            if not self._moved[family] and orig is not None:
                self._local_prio[family] = orig   # already after our band: the gotos jump to it
        self.installed = True

    def remove(self):
        """Restore the host from the state file and delete it (also with nothing installed)."""
        orig = self._state.original
        ipr = self._host.ipr
        if orig is not None:
            for family, sfx in ((socket.AF_INET, ""), (socket.AF_INET6, "6")):
                if orig.get("local_priority" + sfx) is None:
                    continue
                have = [r for r in self._rules(family)
                        if _is_local_rule(r) and r.get_attr("FRA_PROTOCOL") != RULE_PROTOCOL]
                if not have:
                    _add_rule(ipr, _spec(orig["local_priority" + sfx], _FR_ACT_TO_TBL, table=LOCAL_TABLE,
                                         family=family),
                              protocol=orig.get("local_protocol" + sfx, RTPROT_KERNEL))
            if sysctl_get(PORT_RANGE) != orig["port_range"]:
                sysctl_set(PORT_RANGE, orig["port_range"])
        for r in self.ours():
            _del_rule(ipr, r)
        self._state.forget()
        self.installed = self._inherited = False


def _answers(path):
    """Whether something listens on Unix socket `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _drop_nft_table():
    """Delete an nftables table `egresscore` (older versions claimed with it),
    through netlink; False when there is none or no nf_tables."""
    try:
        from pyroute2.nftables.main import NFTables

        nft = NFTables(nfgen_family=socket.AF_INET)
    except Exception:  # noqa: BLE001 - no nf_tables in this kernel
        return False
    try:
        names = [t.get_attr("NFTA_TABLE_NAME") for t in nft.get_tables()]
        if NFT_TABLE not in names:
            return False
        nft.table("del", name=NFT_TABLE)
        return True
    except Exception:  # noqa: BLE001 - best effort
        return False
    finally:
        nft.close()


class HostFacts(NamedTuple):
    """What an agent's start learnt from and took on the host (set_up_host)."""

    state: HostState
    claims: Claims
    underlay_index: int
    node_mac: str
    local_ips: list
    local_ips6: list = []   # the underlay's global IPv6 addresses (kernel order), claimed as local_ips are


def set_up_host(host, node, netns, *, underlay, node_ip, socket_path, claim, vxlan_port, nat_port_range,
                kernel_port_range):
    """An agent's start on the host thread `host`: the node's state lock
    first (a live agent here is an error before anything is touched), the
    underlay's facts, a stopped agent's leftovers taken over (one line on
    stderr); without `claim`, what a crashed agent changed is restored.
    Raises AgentError; then nothing stays claimed or locked."""
    state = host.call(HostState(node, netns).acquire)
    claims = None
    try:
        facts = host.call(lambda: link_facts(host.ipr, underlay))
        if facts is None:
            raise AgentError(f"no interface {underlay!r}{where(netns)}")
        underlay_index, node_mac, local = facts
        if node_ip not in local:
            raise AgentError(f"{node_ip} (node {node}'s internal IP) is not on {underlay}{where(netns)}")
        local6 = host.call(lambda: link_addrs6(host.ipr, underlay_index) if ipv6_on() else [])
        claims = Claims(host, state, underlay=underlay, node_ip=node_ip, local_ips=local + local6,
                        vxlan_port=vxlan_port, nat_port_range=nat_port_range, kernel_port_range=kernel_port_range,
                        node_ip6=local6[0] if local6 else None)
        leftovers = host.call(claims.take_over, socket_path)
        if leftovers:
            print(f"egresscore agent {node}: taking over a stopped agent's leftovers{where(netns)}: "
                  f"{leftovers}", file=sys.stderr, flush=True)
        if not claim:
            host.call(claims.remove)  # restore what a crashed agent changed
    except BaseException:
        try:
            if claims is not None:
                host.call(claims.remove)
        finally:
            host.call(state.release)
        raise
    return HostFacts(state, claims, underlay_index, node_mac, local, local6)
