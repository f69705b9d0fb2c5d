"""kmock's Kubernetes emulator on 127.0.0.1, in a thread of its own, for the
Kubernetes source's contract tests and benchmark.

kmock 0.8 parses `/api/v1/namespaces[/NAME]` as a namespace prefix with no
resource (a 500); `_parse_path` reads it as the Namespace resource, as the
API server does, and leaves every other path to kmock."""
import asyncio
import threading

import kmock
from kmock._internal import parsing

RESOURCES = (("cilium.io/v2", "ciliumegressgatewaypolicies"), ("v1", "nodes"), ("v1", "namespaces"), ("v1", "pods"),
             ("coordination.k8s.io/v1", "leases"))
_kmock_parse_path = parsing.parse_path


def _parse_path(path):
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path


def _drop(server):
    """Close the listening sockets and abort every open connection (a dying API
    server's resets), so kmock's orderly shutdown has no watch to wait for."""
    runner = server.runner
    for site in runner.sites:
        if site._server is not None:  # aiohttp keeps the asyncio.Server private
            site._server.close()
    for handler in list(runner.server.connections):
        if handler.transport is not None:
            handler.transport.abort()


class Emulator:
    """The emulator with its server on 127.0.0.1 (a free port); `kubeconfig(path)` writes a kubeconfig for it."""

    def __init__(self, port=None):
        self.port = port
        self._ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._serve, daemon=True, name="kmock")
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("kmock emulator did not start")
        if self._error is not None:
            raise self._error

    def _serve(self):
        try:
            asyncio.run(self._main())
        except Exception as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as k, kmock.Server(k, host="127.0.0.1", port=self.port) as srv:
            for group_version, plural in RESOURCES:
                k.resources[f"{group_version}/{plural}"] = {}
            self.kmock = k
            self.url = str(srv.url).rstrip("/")
            self.port = srv.port
            assert srv.host == "127.0.0.1", srv.host
            self._ready.set()
            await self._stop.wait()
            _drop(srv.server)

    def call(self, fn, *args):
        """Run fn(*args) (sync) on the emulator's loop thread."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def config_dict(self):
        return {"apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                "users": [{"name": "test", "user": {"token": "test"}}],
                "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}],
                "current-context": "emulator"}

    def close(self):
        """Stop the server abruptly: open connections are reset, not drained."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("kmock emulator did not stop within 10 s")
