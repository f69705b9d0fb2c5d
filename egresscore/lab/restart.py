"""Hitless restart in the lab: four flows through the gateway while an agent restarts.

One measurement, shared by tests/test_restart_e2e.py and benchmarks/compare_restart.py.
From app1 (on node1) to a flow server on ext1 (203.0.113.10), through the
gateway node3 (VXLAN node1 -> node3, SNAT to 192.168.1.3), all at once:

    download  server -> pod, paced, from an ephemeral pod port (inside the NAT range)
    upload    pod -> server, paced
    udp       an echo stream, one datagram every 10 ms, from pod port 15001
    oor       a paced download from pod port 15000

15000 and 15001 lie outside the agents' NAT port range (32768-65534), so the
gateway picks their external ports: only a gateway that kept its NAT table
gives them the same ports after a restart.  `restart()` is called after
`before` seconds; the flows last `seconds` in all.  Each flow reports what
it moved (bytes and sha256 for TCP, echoes for UDP), the (address, port) the
server saw, and its stall: the longest gap between two consecutive arrivals
(at the pod for the downloads and the echoes, at the server for the upload).
Every clock is CLOCK_MONOTONIC, the machine's, so times compare across
namespaces.
"""
import hashlib
import selectors
import signal
import socket
import threading
import time
from typing import NamedTuple

from . import _ns
from .traffic import _pattern, payload_sha256

SERVER = "203.0.113.10"
TCP_PORT, UDP_PORT = 9300, 9301
OOR_PORT, UDP_SPORT = 15000, 15001     # pod ports outside the NAT port range
CHUNK = 8192


class Flow(NamedTuple):
    name: str
    ok: bool                 # moved everything intact (TCP: every byte, sha256 equal; UDP: echoes after the restart)
    seen: frozenset          # (address, port) pairs the server saw for this flow
    stall: float | None      # longest gap between arrivals (s); None if the flow broke
    detail: str


class Restart(NamedTuple):
    restarted_at: float      # restart() called (monotonic)
    ready_at: float          # restart() returned: the new agent forwards
    flows: dict              # name -> Flow

    @property
    def intact(self):
        return all(f.ok for f in self.flows.values())

    @property
    def stall(self):
        """The longest stall of any flow (None if one broke)."""
        stalls = [f.stall for f in self.flows.values()]
        return None if None in stalls else max(stalls)


def _gap(times):
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def _span(times):
    return (times[0], times[-1]) if times else (None, None)


# -- the flow server (in the server's namespace) ---------------------------------------
def _serve_tcp(c, results, lock):
    peer = c.getpeername()
    try:
        c.settimeout(20.0)
        head = b""
        while not head.endswith(b"\n") and len(head) < 256:
            chunk = c.recv(1)
            if not chunk:
                return
            head += chunk
        kind, name, *args = head.decode().split()
        if kind == "DOWN":            # DOWN name n rate: n pattern bytes at `rate` bytes/s
            n, rate = int(args[0]), float(args[1])
            data, start = _pattern(n), time.monotonic()
            for off in range(0, n, CHUNK):
                delay = start + off / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                c.sendall(data[off:off + CHUNK])
            rec = {"name": name, "peer": peer, "sent": n}
        else:                         # UP name n: receive n bytes, answer "<got> <sha256>"
            n, got, h, times = int(args[0]), 0, hashlib.sha256(), []
            while got < n:
                chunk = c.recv(min(1 << 16, n - got))
                if not chunk:
                    break
                times.append(time.monotonic())
                h.update(chunk)
                got += len(chunk)
            c.sendall(f"{got} {h.hexdigest()}\n".encode())
            rec = {"name": name, "peer": peer, "got": got, "stall": _gap(times), "span": _span(times)}
    except (OSError, ValueError) as exc:
        rec = {"name": None, "peer": peer, "error": repr(exc)}
    finally:
        c.close()
    with lock:
        results.append(rec)


def flow_server(conn, addr, seconds):
    """TCP (DOWN/UP) on TCP_PORT and a UDP echo recording (time, source,
    port, sequence) on UDP_PORT, for at most `seconds`: sends "ready",
    "flowing" once three TCP connections and a datagram came, then
    {"tcp": [...], "udp": [...]} over `conn` when told "stop"."""
    results, udp, lock = [], [], threading.Lock()
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((addr, TCP_PORT))
    lst.listen(16)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((addr, UDP_PORT))
    sel = selectors.DefaultSelector()
    sel.register(lst, selectors.EVENT_READ, "tcp")
    sel.register(u, selectors.EVENT_READ, "udp")
    sel.register(conn, selectors.EVENT_READ, "ctl")
    conn.send("ready")
    accepted, flowing = 0, False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        kinds = {key.data for key, _ in sel.select(timeout=0.2)}
        if "ctl" in kinds:
            conn.recv()
            break
        if "tcp" in kinds:
            c, _ = lst.accept()
            accepted += 1
            threading.Thread(target=_serve_tcp, args=(c, results, lock), daemon=True).start()
        if "udp" in kinds:
            data, (src, sport) = u.recvfrom(64)
            udp.append((time.monotonic(), src, sport, int.from_bytes(data[:4], "big")))
            u.sendto(data, (src, sport))
        if not flowing and accepted >= 3 and udp:
            flowing = True
            conn.send("flowing")      # every flow has begun
    time.sleep(0.2)                   # the last TCP threads finish their record
    with lock:
        conn.send({"tcp": list(results), "udp": udp})


# -- the clients (in the pod's namespace) ----------------------------------------------
def _download(name, dst, n, rate, sport, out):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(15.0)
            if sport:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", sport))
            s.connect((dst, TCP_PORT))
            port = s.getsockname()[1]
            s.sendall(f"DOWN {name} {n} {rate}\n".encode())
            h, got, times = hashlib.sha256(), 0, []
            while got < n:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                times.append(time.monotonic())
                h.update(chunk)
                got += len(chunk)
        out.update(port=port, got=got, ok=got == n and h.hexdigest() == payload_sha256(n), stall=_gap(times),
                   span=_span(times))
    except OSError as exc:
        out.update(error=repr(exc))


def _upload(dst, n, rate, out):
    try:
        data = _pattern(n)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(15.0)
            s.connect((dst, TCP_PORT))
            out["port"] = s.getsockname()[1]
            s.sendall(f"UP upload {n}\n".encode())
            start = time.monotonic()
            for off in range(0, n, CHUNK):
                delay = start + off / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                s.sendall(data[off:off + CHUNK])
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                reply += chunk
        got, digest = reply.decode().split()
        out.update(got=int(got), ok=int(got) == n and digest == hashlib.sha256(data).hexdigest())
    except (OSError, ValueError) as exc:
        out.update(error=repr(exc))


def _udp(dst, seconds, interval, out):
    n = int(seconds / interval)
    echoes = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", UDP_SPORT))
        s.settimeout(0.002)
        start = time.monotonic()
        i = 0
        while i < n or time.monotonic() < start + seconds + 0.3:
            if i < n and time.monotonic() >= start + i * interval:
                try:
                    s.sendto(i.to_bytes(4, "big"), (dst, UDP_PORT))
                except OSError:
                    pass
                i += 1
            try:
                data = s.recv(64)
                echoes.append((time.monotonic(), int.from_bytes(data[:4], "big")))
            except (socket.timeout, BlockingIOError):
                pass
    out.update(sent=n, echoes=echoes)


def flow_clients(dst, seconds, rate):
    """The four flows at once, for `seconds`; their results (a dict by flow)."""
    n = int(rate * seconds)
    res = {name: {} for name in ("download", "upload", "udp", "oor")}
    threads = [threading.Thread(target=_download, args=("download", dst, n, rate, 0, res["download"])),
               threading.Thread(target=_upload, args=(dst, n, rate, res["upload"])),
               threading.Thread(target=_udp, args=(dst, seconds, 0.01, res["udp"])),
               threading.Thread(target=_download, args=("oor", dst, n, rate, OOR_PORT, res["oor"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 40)
    res["n"] = n
    return res


# -- one measurement ------------------------------------------------------------------
def agent_restart(agents, name, start, how="kill", stopped=None):
    """restart() for flows_through_restart: stop the `egresscore agent`
    process agents[name] (`how`: "kill" SIGKILL, "term" SIGTERM), call
    stopped(old process) if given (what it left behind is still in place),
    then agents[name] = start(name) (it returns once the new agent is ready)."""
    def restart():
        old = agents[name]
        if how == "kill":
            old.proc.kill()
        else:
            old.proc.send_signal(signal.SIGTERM)
        old.proc.wait(15)
        if stopped is not None:
            stopped(old)
        agents[name] = start(name)
    return restart


def flows_through_restart(lab, restart, *, pod="app1", server=SERVER, before=1.5, seconds=7.0, rate=1 << 20):
    """Run the four flows from `pod` to `server`, call restart() after `before`
    s (it returns once the new agent forwards), and wait for the flows to end;
    a Restart."""
    ext = lab._server_of(server)
    parent, child = _ns._fork.Pipe()
    srv = _ns.spawn(ext.ns, flow_server, child, server, seconds + 60)
    child.close()
    got = {}
    clients = None
    try:
        if not parent.poll(10) or parent.recv() != "ready":
            raise RuntimeError("the flow server did not start")
        clients = threading.Thread(target=lambda: got.update(
            lab.call(pod, flow_clients, server, seconds, rate, timeout=seconds + 50)))
        clients.start()
        if not parent.poll(30) or parent.recv() != "flowing":
            raise RuntimeError("the flows did not begin")
        time.sleep(before)
        restarted_at = time.monotonic()
        restart()
        ready_at = time.monotonic()
        clients.join(seconds + 55)
        parent.send("stop")
        if not parent.poll(10):
            raise TimeoutError("the flow server did not report")
        seen = parent.recv()
    finally:
        parent.close()
        srv.join(5)
        if srv.is_alive():
            srv.kill()
            srv.join(2)
    if "n" not in got:
        raise RuntimeError("the flow clients did not report")
    return Restart(restarted_at, ready_at, _judge(got, seen, restarted_at))


def _fmt_span(span):
    return "-" if not span or span[0] is None else f"{span[0]:.2f} to {span[1]:.2f}"


def _judge(got, seen, restarted_at):
    n, flows = got["n"], {}
    peers = {}
    for r in seen["tcp"]:
        peers.setdefault(r["name"], set()).add(tuple(r["peer"]))
    upload = next((r for r in seen["tcp"] if r["name"] == "upload"), {})
    for name in ("download", "oor", "upload"):
        r = got[name]
        ok = bool(r.get("ok"))
        stall = upload.get("stall") if name == "upload" else r.get("stall")
        flows[name] = Flow(name, ok, frozenset(peers.get(name, ())), stall if ok else None,
                           r.get("error") or f"{r.get('got', 0)} of {n} bytes, pod port {r.get('port')}, "
                           f"data from {_fmt_span((upload if name == 'upload' else r).get('span'))}")
    u = got["udp"]
    echoes = [t for t, _ in u["echoes"]]
    after = [t for t in echoes if t > restarted_at]
    pairs = frozenset((src, sport) for _, src, sport, _ in seen["udp"])
    ok = bool(after) and len(pairs) == 1
    flows["udp"] = Flow("udp", ok, pairs, _gap(echoes) if ok else None,
                        f"{len(echoes)} of {u['sent']} echoed, {len(after)} after the restart, "
                        f"the server saw {sorted(pairs)}")
    return flows
