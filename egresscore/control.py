"""The agent's local control socket: read-only inspection for the CLI.

A Unix stream socket, never a network listener.  Access is the owner's only,
checked twice: the socket file is mode 0600 inside a directory of mode 0700
that we own, and every connection's peer credentials (SO_PEERCRED) must carry
our uid (or the uids given in `allow_uids`) or it is answered with an error
and closed.

Protocol: one JSON object per line each way.  Request {"cmd": NAME,
"args": {...}}; response {"ok": true, "result": ...} or {"ok": false,
"error": "..."}.  A connection may send several requests.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import threading

__all__ = ["ControlServer", "ControlClient", "ControlError", "default_socket_path"]

log = logging.getLogger("egresscore.control")

SOCKET_DIR = "/run/egresscore"
MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """The agent answered with an error, or could not be reached."""


def default_socket_path(node, netns=None, directory=SOCKET_DIR):
    """/run/egresscore/<node>.sock: where an agent for `node` listens
    (<node>@<netns>.sock for an agent running on a network namespace's
    interfaces, so that several labs on one host do not collide)."""
    for what, name in (("node", node), ("netns", netns)):
        if name is None and what == "netns":
            continue
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"{what} name {name!r} cannot name a socket file")
    return os.path.join(directory, f"{node}@{netns}.sock" if netns else f"{node}.sock")


def _peer_uid(conn):
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _private_dir(directory):
    """Create `directory` (0700) or check that an existing one is ours and private."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{directory} belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)


class ControlServer:
    """Serves `handlers` ({cmd: callable(**args) -> JSON-able}) on a Unix socket.

    ControlServer(path, handlers, allow_uids=None)

    start() binds and runs the accept thread; stop() closes it and removes
    the socket file.  Handlers run on the server's threads: they must only
    read state (or take the owner's locks)."""

    def __init__(self, path, handlers, *, allow_uids=None):
        self.path = os.fspath(path)
        self.handlers = dict(handlers)
        self.handlers.setdefault("ping", lambda: "pong")
        self.handlers.setdefault("commands", lambda: sorted(self.handlers))
        self.allow_uids = {os.geteuid()} if allow_uids is None else set(allow_uids)
        self._sock = None
        self._thread = None
        self._stop = threading.Event()
        self.refused = 0

    def start(self):
        _private_dir(os.path.dirname(self.path) or ".")
        if os.path.exists(self.path):
            # a stale socket from a previous run: remove it only if nobody answers
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)
            else:
                raise OSError(f"another agent is listening on {self.path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)       # the file is created 0600: no window with wider rights
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="egresscore-control", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            threading.Thread(target=self._client, args=(conn,), daemon=True,
                             name="egresscore-control-client").start()

    def _client(self, conn):
        with conn:
            try:
                uid = _peer_uid(conn)
            except OSError:
                return
            if uid not in self.allow_uids:
                self.refused += 1
                log.warning("control socket: refused a connection from uid %d", uid)
                self._send(conn, {"ok": False, "error": f"permission denied for uid {uid}"})
                return
            conn.settimeout(30)
            buf = b""
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                if len(buf) > MAX_REQUEST:
                    self._send(conn, {"ok": False, "error": "request too long"})
                    return
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip() and not self._send(conn, self._answer(line)):
                        return

    def _answer(self, line):
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'request must be {"cmd": NAME, "args": {...}}'}
        fn = self.handlers.get(req["cmd"])
        if fn is None:
            return {"ok": False, "error": f"unknown command {req['cmd']!r} "
                                          f"(known: {', '.join(sorted(self.handlers))})"}
        args = req.get("args") or {}
        if not isinstance(args, dict):
            return {"ok": False, "error": "args must be an object"}
        try:
            return {"ok": True, "result": fn(**args)}
        except TypeError as exc:
            return {"ok": False, "error": f"bad arguments for {req['cmd']}: {exc}"}
        except Exception as exc:    # report, keep serving
            log.exception("control command %s failed", req["cmd"])
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    @staticmethod
    def _send(conn, doc):
        try:
            conn.sendall(json.dumps(doc, default=str).encode() + b"\n")
            return True
        except OSError:
            return False


class ControlClient:
    """Talks to a running agent's control socket: call(cmd, **args) -> result."""

    def __init__(self, path, timeout=10.0):
        self.path = os.fspath(path)
        self.timeout = timeout

    def call(self, cmd, **args):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(self.path)
            except FileNotFoundError:
                raise ControlError(f"no agent socket at {self.path} (is the agent running?)") from None
            except PermissionError:
                raise ControlError(f"permission denied on {self.path} "
                                   f"(the socket is for the agent's user only)") from None
            except OSError as exc:
                raise ControlError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
            sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            raise ControlError(f"the agent at {self.path} did not answer in {self.timeout:g} s") from None
        finally:
            sock.close()
        if not buf:
            raise ControlError(f"the agent at {self.path} closed the connection")
        try:
            resp = json.loads(buf.split(b"\n", 1)[0])
        except ValueError:
            raise ControlError("the agent's answer is not JSON") from None
        if not resp.get("ok"):
            raise ControlError(resp.get("error", "unknown error"))
        return resp.get("result")


def _egress_rows(egress_map):
    from .cli import GATEWAY_LABELS
    from .compiler import target_of

    rows = []
    for e in egress_map.entries():
        t = target_of(e)
        rows.append({"SourceIP": str(e.source), "DestCIDR": str(e.destination),
                     "EgressIP": t.egress_ip,
                     "GatewayIP": GATEWAY_LABELS.get(t.gateway_ip, t.gateway_ip)})
    return rows


def inspection_handlers(*, nat=None, egress_map=None, stats=None):
    """The read-only commands an agent serves: "nat_list", "egress_list", "stats".

    `nat` is a NatTable, a list of them, or a callable returning either;
    `egress_map` an EgressMap or a callable returning one; `stats` a callable
    returning the counters dict."""

    def _tables():
        t = nat() if callable(nat) and not hasattr(nat, "entries") else nat
        if t is None:
            return []
        return list(t) if isinstance(t, (list, tuple)) else [t]

    def nat_list():
        out = []
        for t in _tables():
            out.extend(e._asdict() for e in t.entries())
        return out

    def egress_list():
        em = egress_map() if callable(egress_map) and not hasattr(egress_map, "entries") else egress_map
        return [] if em is None else _egress_rows(em)

    def stats_():
        return stats() if stats is not None else {}

    return {"nat_list": nat_list, "egress_list": egress_list, "stats": stats_}
