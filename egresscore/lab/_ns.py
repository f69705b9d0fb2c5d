"""Network-namespace primitives: create, remove, enter, run code and commands inside.

The one namespace helper of the project: the lab's namespaces (PREFIX), and
the throwaway ones of the ring tests, the ring benchmarks and the
host-reading tests (scratch(), SCRATCH_PREFIXES); a lock file (Lock) names
each live owner's, so what a killed process left is found and removed.

Namespaces are the bind mounts under /run/netns that `ip netns` and pyroute2
share.  Code runs inside one in a forked child (setns is per thread, so the
parent never changes namespace: an interrupt cannot leave it in the wrong one).
"""
import contextlib
import fcntl
import json
import multiprocessing
import os
import pickle
import subprocess
import traceback
import uuid

from pyroute2 import netns as _netns

from .._netns import NETNS_DIR, setns  # noqa: F401 - part of this module's surface

PREFIX = "egc-lab-"
SCRATCH_PREFIXES = ("egc-ring-", "egc-ctl-")  # egresscore._ringlab's pairs, tests/netns_helper's hosts
LOCK_DIR = "/run/egc-lab"

_fork = multiprocessing.get_context("fork")


def create(name):
    if not name.startswith(PREFIX):
        raise ValueError(f"namespace name {name!r} must start with {PREFIX!r}")
    _netns.create(name)


def remove(name):
    """Remove one lab namespace; missing is fine.  Interfaces die with it."""
    if not name.startswith(PREFIX):
        raise ValueError(f"refusing to remove {name!r}: not a lab namespace")
    try:
        _netns.remove(name)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def scratch(*names):
    """Throwaway namespaces `names` (each with one of SCRATCH_PREFIXES) for
    one with block, removed after it, also on error.  Their names are listed
    in a held lock file (as a lab's are) before they are made, so what a
    killed run left behind, whatever its names, is found and removed by the
    next scratch() (remove_stale_scratch); one of `names` left over is
    removed first.  Yields the names."""
    for name in names:
        if not name.startswith(SCRATCH_PREFIXES):
            raise ValueError(f"namespace name {name!r} must start with one of {SCRATCH_PREFIXES}")
    lock = Lock(f"scratch-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    made = []
    try:
        lock.write(names)
        remove_stale_scratch()
        present = set(_netns.listnetns())
        for name in names:
            if name in present:
                _netns.remove(name)
            _netns.create(name)
            made.append(name)
        yield names
    finally:
        for name in made:
            with contextlib.suppress(OSError):
                _netns.remove(name)
        lock.release()


def lab_namespaces():
    return sorted(n for n in _netns.listnetns() if n.startswith(PREFIX))


class Lock:
    """An flock'ed file naming a live lab's or scratch() block's namespaces (its manifest).

    A namespace with the lab prefix (or a scratch prefix) that no live lock
    lists is stale: left by a process that died without cleaning up.
    """

    def __init__(self, tag):
        os.makedirs(LOCK_DIR, exist_ok=True)
        self.path = os.path.join(LOCK_DIR, f"{tag}.lock")
        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                self.fd = -1
                raise RuntimeError(f"a lab tagged {tag!r} is already running ({self.path} is locked)") from None
            # live_namespaces() unlinks a file nobody holds: if it took this
            # one between our open and flock, ours is no longer the path's
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    return
            except FileNotFoundError:
                pass
            os.close(self.fd)

    def write(self, namespaces):
        data = json.dumps({"pid": os.getpid(), "namespaces": sorted(namespaces)}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self):
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1


def live_namespaces():
    """Namespaces listed by labs whose lock is held by a live process."""
    live = set()
    try:
        names = os.listdir(LOCK_DIR)
    except FileNotFoundError:
        return live
    for fname in names:
        path = os.path.join(LOCK_DIR, fname)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held exclusively: that lab is alive
                try:
                    with open(path, "rb") as f:
                        live.update(json.loads(f.read() or b"{}").get("namespaces", ()))
                except (OSError, ValueError):
                    pass
            else:  # nobody holds it: the lab died
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
    return live


def remove_stale():
    """Remove every lab namespace that no live lab owns; return their names."""
    live = live_namespaces()
    stale = [n for n in lab_namespaces() if n not in live]
    for name in stale:
        remove(name)
    return stale


def remove_stale_scratch():
    """Remove every scratch namespace (SCRATCH_PREFIXES) that no live run's
    lock lists: a killed test's or benchmark's; return their names."""
    live = live_namespaces()
    stale = [n for n in _netns.listnetns() if n.startswith(SCRATCH_PREFIXES) and n not in live]
    for name in stale:
        with contextlib.suppress(OSError):
            _netns.remove(name)
    return stale


def _child_main(conn, name, func, args, kwargs):
    try:
        setns(name)
        result = (True, func(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - shipped to the parent
        result = (False, _portable(exc))
    try:
        conn.send(result)
    except Exception as exc:  # unpicklable result
        conn.send((False, RuntimeError(f"result of {func!r} could not be sent back: {exc}")))
    conn.close()


def _portable(exc):
    try:
        pickle.dumps(exc)
        exc.__notes__ = getattr(exc, "__notes__", []) + ["in the namespace child:\n" + traceback.format_exc()]
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def call(name, func, *args, timeout=60.0, **kwargs):
    """Run func(*args, **kwargs) in a forked child inside namespace `name`; return its result.

    The result and any exception travel back pickled.  The child is killed
    after `timeout` seconds (TimeoutError).
    """
    parent, child = _fork.Pipe(duplex=False)
    proc = _fork.Process(target=_child_main, args=(child, name, func, args, kwargs), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{getattr(func, '__name__', func)} in {name} did not finish in {timeout} s")
        ok, value = parent.recv()
    except EOFError:
        proc.join(1)
        raise RuntimeError(f"child in {name} died (exit code {proc.exitcode})") from None
    finally:
        parent.close()
        if proc.is_alive():
            proc.kill()
        proc.join(5)
    if not ok:
        raise value
    return value


def spawn(name, func, *args, **kwargs):
    """Start func in a long-lived forked child inside `name`; return the Process (daemon)."""

    def main():
        setns(name)
        func(*args, **kwargs)

    proc = _fork.Process(target=main, daemon=True)
    proc.start()
    return proc


def command(name, argv):
    """argv run inside namespace `name` (through `ip netns exec`, which also remounts /sys)."""
    return ["ip", "netns", "exec", name, *argv]


def run(name, argv, timeout=60.0, check=True, **kwargs):
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(command(name, argv), timeout=timeout, check=check, **kwargs)


def popen(name, argv, **kwargs):
    return subprocess.Popen(command(name, argv), **kwargs)


def _write_sysctls(values):
    for key, value in values.items():
        path = "/proc/sys/" + key.replace(".", "/")
        with open(path, "w") as f:
            f.write(str(value))


def sysctl(name, values, timeout=30.0):
    """Write sysctls ({'net.ipv4.ip_forward': 1, ...}) inside namespace `name`.

    Keys use dots; an interface name containing a dot is not supported.
    """
    call(name, _write_sysctls, dict(values), timeout=timeout)
