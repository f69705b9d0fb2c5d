"""The agent's local control socket: read-only inspection for the CLI.

A Unix stream socket, never a network listener.  Access is the owner's only,
checked twice: the socket file is mode 0600 inside a directory of mode 0700
that we own, and every connection's peer credentials (SO_PEERCRED) must carry
our uid (or the uids given in `allow_uids`) or it is answered with an error
and closed.

Protocol: one JSON object per line each way.  Request {"cmd": NAME,
"args": {...}}; response {"ok": true, "result": ...} or {"ok": false,
"error": "..."}.  A connection may send several requests; they are answered
in order.

Bounded: one selector thread serves every connection (handlers run on a
small fixed pool, so a slow one does not stall the others); at most
`max_connections` are open (one more gets an error line and is closed), a
connection idle for `idle_timeout` seconds is closed, a request line is at
most MAX_REQUEST bytes and nests at most MAX_DEPTH levels (checked before the
JSON parser sees it).  Every bad request gets {"ok": false, "error": ...};
a handler's exception is an error reply, logged once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import selectors
import socket
import stat
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .errors import ControlError
from .types import EGRESS_JSON_KEYS

__all__ = ["ControlServer", "ControlClient", "ControlError", "default_socket_path"]

log = logging.getLogger("egresscore.control")

SOCKET_DIR = "/run/egresscore"
MAX_REQUEST = 64 * 1024   # bytes per request line
MAX_DEPTH = 32            # nesting of arrays/objects in a request
MAX_CONNECTIONS = 16      # open at once; one more is answered with an error and closed
IDLE_TIMEOUT = 30.0       # seconds without a byte from a client (no request running): closed
LINGER = 1.0              # seconds a connection answered with a final error may still send


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


def json_depth_exceeds(data: bytes, limit: int) -> bool:
    """Does the JSON text `data` nest arrays/objects deeper than `limit`?
    A scan over the brackets outside strings, cheap enough to run before
    json.loads (whose recursion a deep document would exhaust)."""
    depth = 0
    for m in _BRACKETS_RE.finditer(data):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif c in (b"]", b"}"):
            depth -= 1
    return False


_BRACKETS_RE = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]')  # a string (skipped) or a bracket


class _Conn:
    """One client connection's buffers and state, owned by the selector thread."""

    __slots__ = ("sock", "inbuf", "outbuf", "busy", "closing", "eof", "last", "events", "linger", "refused")

    def __init__(self, sock, now):
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.busy = False      # a request is with a handler: read nothing more until it is answered
        self.closing = False   # close once outbuf is sent
        self.eof = False       # the peer closed its side
        self.last = now
        self.events = 0        # what the selector waits for on it (0: not registered)
        self.linger = None     # closing, reply sent: close at this time (or at the peer's EOF)
        self.refused = False   # answered with an error at accept (uid, too many connections)


class ControlServer:
    """Serves `handlers` ({cmd: callable(**args) -> JSON-able}) on a Unix socket.

    ControlServer(path, handlers, allow_uids=None, max_connections=16,
                  idle_timeout=30.0, workers=2)

    start() binds and runs the selector thread; stop() closes it and removes
    the socket file.  Handlers run on `workers` pool threads: they must only
    read state (or take the owner's locks)."""

    def __init__(self, path, handlers, *, allow_uids=None, max_connections=MAX_CONNECTIONS,
                 idle_timeout=IDLE_TIMEOUT, workers=2):
        self.path = os.fspath(path)
        self.handlers = dict(handlers)
        self.handlers.setdefault("ping", lambda: "pong")
        self.handlers.setdefault("commands", lambda: sorted(self.handlers))
        self.allow_uids = {os.geteuid()} if allow_uids is None else set(allow_uids)
        self.max_connections = int(max_connections)
        self.idle_timeout = float(idle_timeout)
        self.workers = int(workers)
        self._sock = None
        self._thread = None
        self._stop = threading.Event()
        self._pool = None
        self._done = queue.SimpleQueue()  # (conn, reply) from the pool to the selector thread
        self._wake_r = self._wake_w = None
        self.refused = 0   # connections refused: not an allowed uid
        self.refused_busy = 0   # connections refused: max_connections open
        self._busy_logged = False

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
        sock.setblocking(False)
        self._sock = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="egresscore-control-worker")
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="egresscore-control", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._wake()
            self._thread.join(timeout=5)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            for s in (self._wake_r, self._wake_w):
                s.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- the selector thread -----------------------------------------------------
    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:     # full: a wake-up is pending anyway
            pass

    def _serve(self):
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        conns = set()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                deadlines = {c: c.linger if c.linger is not None else c.last + self.idle_timeout
                             for c in conns if not c.busy}
                for c, t in deadlines.items():
                    if now >= t:
                        self._close(sel, conns, c)
                deadline = min((t for t in deadlines.values() if t > now), default=now + 1.0)
                for key, events in sel.select(max(0.0, min(deadline - now, 1.0))):
                    if key.fileobj is self._sock:
                        self._accept(sel, conns)
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        try:
                            self._io(sel, conns, key.data, events)
                        except Exception:  # a bug must cost one connection, not the server
                            log.exception("control socket: closing a connection after an error")
                            self._close(sel, conns, key.data)
                while True:
                    try:
                        conn, reply = self._done.get_nowait()
                    except queue.Empty:
                        break
                    if conn in conns:
                        conn.busy = False
                        self._queue_reply(conn, reply)
                        self._advance(sel, conns, conn)
        finally:
            for c in list(conns):
                self._close(sel, conns, c)
            sel.close()

    def _drain_wake(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self, sel, conns):
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            try:
                uid = _peer_uid(sock)
            except OSError:
                sock.close()
                continue
            conn = _Conn(sock, time.monotonic())
            refused = sum(c.refused for c in conns)
            if uid not in self.allow_uids:
                self.refused += 1
                log.warning("control socket: refused a connection from uid %d", uid)
                error = f"permission denied for uid {uid}"
            elif len(conns) - refused >= self.max_connections:
                self.refused_busy += 1
                if not self._busy_logged:   # once per time at the cap, not once per connection
                    self._busy_logged = True
                    log.warning("control socket: %d connections open (the most allowed), refusing more",
                                len(conns) - refused)
                error = f"too many connections (at most {self.max_connections} open)"
            else:
                conns.add(conn)
                self._want(sel, conn, selectors.EVENT_READ)
                continue
            if refused >= self.max_connections:     # a flood: no lingering for these
                sock.close()
                continue
            # answer, then linger briefly so that the client's request does not meet a closed socket
            conn.refused = conn.closing = True
            self._queue_reply(conn, {"ok": False, "error": error})
            conns.add(conn)
            self._advance(sel, conns, conn)

    def _io(self, sel, conns, conn, events):
        conn.last = time.monotonic()
        if events & selectors.EVENT_WRITE and conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._close(sel, conns, conn)
                return
            del conn.outbuf[:n]
        if events & selectors.EVENT_READ and not conn.busy:
            try:
                chunk = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                chunk = None
            except OSError:
                self._close(sel, conns, conn)
                return
            if chunk == b"":
                conn.eof = True
            elif chunk and not conn.closing:    # a closing one's input is read and dropped
                conn.inbuf += chunk
        self._advance(sel, conns, conn)

    def _advance(self, sel, conns, conn):
        """Start the next request if none is running; then set what to wait for."""
        while not conn.busy and not conn.closing:
            nl = conn.inbuf.find(b"\n")
            if nl < 0:
                if len(conn.inbuf) > MAX_REQUEST:
                    self._queue_reply(conn, _too_long())
                    conn.closing = True
                break
            line = bytes(conn.inbuf[:nl])
            del conn.inbuf[:nl + 1]
            if len(line) > MAX_REQUEST:
                self._queue_reply(conn, _too_long())
                conn.closing = True
                break
            if line.strip():
                self._dispatch(conn, line)
        if conn.eof and not conn.busy and not conn.outbuf:
            self._close(sel, conns, conn)
            return
        if conn.closing and not conn.outbuf and conn.linger is None:
            # the error is sent: no more from us; read the peer's rest until it closes (or LINGER)
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(sel, conns, conn)
                return
            conn.linger = time.monotonic() + LINGER
        events = selectors.EVENT_WRITE if conn.outbuf else 0
        if not conn.busy and not conn.eof:
            events |= selectors.EVENT_READ
        self._want(sel, conn, events)

    @staticmethod
    def _want(sel, conn, events):
        """Wait for `events` on conn (0: for nothing, while its handler runs)."""
        if events == conn.events:
            return
        if not conn.events:
            sel.register(conn.sock, events, conn)
        elif not events:
            sel.unregister(conn.sock)
        else:
            sel.modify(conn.sock, events, conn)
        conn.events = events

    def _dispatch(self, conn, line):
        req = _parse(line)
        if "error" in req:
            self._queue_reply(conn, req)
            return
        fn = self.handlers.get(req["cmd"])
        if fn is None:
            self._queue_reply(conn, {"ok": False, "error": f"unknown command {req['cmd']!r} "
                                                         f"(known: {', '.join(sorted(self.handlers))})"})
            return
        conn.busy = True
        self._pool.submit(self._run_handler, conn, req["cmd"], fn, req["args"])

    def _run_handler(self, conn, cmd, fn, args):
        self._done.put((conn, _call(cmd, fn, args)))
        self._wake()

    @staticmethod
    def _queue_reply(conn, doc):
        conn.outbuf += _encode(doc)

    def _close(self, sel, conns, conn):
        if conn.events:
            sel.unregister(conn.sock)
            conn.events = 0
        conns.discard(conn)
        conn.sock.close()
        self._busy_logged = False


def _too_long():
    return {"ok": False, "error": f"request too long (at most {MAX_REQUEST} bytes per line)"}


def _parse(line):
    """{"cmd", "args"} of a request line, or an error reply."""
    if json_depth_exceeds(line, MAX_DEPTH):
        return {"ok": False, "error": f"request is too deeply nested (at most {MAX_DEPTH} levels)"}
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        return {"ok": False, "error": "request is not JSON"}
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        return {"ok": False, "error": 'request must be {"cmd": NAME, "args": {...}}'}
    args = req.get("args") or {}
    if not isinstance(args, dict):
        return {"ok": False, "error": "args must be an object"}
    return {"cmd": req["cmd"], "args": args}


def _call(cmd, fn, args):
    try:
        return {"ok": True, "result": fn(**args)}
    except TypeError as exc:
        return {"ok": False, "error": f"bad arguments for {cmd}: {exc}"}
    except Exception as exc:    # report, keep serving
        log.exception("control command %s failed", cmd)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _encode(doc):
    try:
        return json.dumps(doc, default=str).encode() + b"\n"
    except (ValueError, TypeError, RecursionError) as exc:
        log.error("control socket: cannot encode a reply: %s", exc)
        return json.dumps({"ok": False, "error": f"the reply cannot be encoded: {exc}"}).encode() + b"\n"


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
        except OSError as exc:
            raise ControlError(f"lost the connection to {self.path}: {exc.strerror or exc}") from None
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


def inspection_handlers(*, nat=None, egress_map=None, stats=None, policy_names=None):
    """The read-only commands an agent serves: "nat_list", "egress_list", "stats".

    `nat` is a NatTable, a list of them, or a callable returning either;
    `egress_map` an EgressMap or a callable returning one; `stats` a callable
    returning the counters dict; `policy_names` a callable returning {policy
    id: name} (egress_list's PolicyID and Policy keys)."""

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
        if em is None:
            return []
        if policy_names is None:
            return [dict(zip(EGRESS_JSON_KEYS, e.row())) for e in em.entries()]
        names = policy_names()
        return [dict(zip(EGRESS_JSON_KEYS, e.row()), PolicyID=e.policy_id, Policy=names.get(e.policy_id))
                for e in em.entries()]

    def stats_():
        return stats() if stats is not None else {}

    return {"nat_list": nat_list, "egress_list": egress_list, "stats": stats_}
