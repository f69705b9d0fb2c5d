"""Gateway health (egresscore.health): heartbeats with miss counts, liveness providers.

On loopback in this process's network namespace (no root needed): a real
Responder answers real UDP heartbeats from a Prober driven by GatewayHealth's
own thread; stopping the responder makes its node down after the miss count,
starting it again brings it back after the rise count.
"""
import os
import select
import socket
import threading
import time

import pytest

from egresscore.health import (
    FileLiveness,
    GatewayHealth,
    LivenessError,
    Prober,
    Responder,
    StaticLiveness,
)


def _free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _prober(port, **kw):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return Prober(s, port=port, **kw)


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_a_gateway_that_stops_answering_is_down_after_the_misses_and_back_after_the_rises():
    port = _free_port()
    gw1 = Responder(Responder.open_socket("127.0.0.1", port)).start()
    gw2 = Responder(Responder.open_socket("127.0.0.2", port)).start()
    changes = []
    seen = threading.Event()

    def on_change(down):
        changes.append((time.monotonic(), down))
        seen.set()

    health = GatewayHealth(on_change, prober=_prober(port, misses=3, rises=2), interval=0.05)
    health.set_targets({"node3": "127.0.0.1", "node4": "127.0.0.2"})
    health.start()
    try:
        assert _wait(lambda: gw1.answered >= 3 and gw2.answered >= 3, 2.0)
        assert health.down == frozenset() and changes == []       # both answer: nobody down
        t0 = time.monotonic()
        gw1.stop()
        assert seen.wait(2.0)
        when, down = changes[-1]
        assert down == {"node3"}
        # three missed rounds of 50 ms: no sooner than 2 rounds, no later than ~5
        assert 0.09 <= when - t0 <= 0.4, when - t0
        rows = {r["node"]: r for r in health.state({"node3": "127.0.0.1", "node4": "127.0.0.2"})}
        assert (rows["node3"]["state"], rows["node3"]["why"]) == ("down", "probes")
        assert rows["node3"]["missed"] >= 3 and rows["node4"]["missed"] == 0
        assert rows["node4"]["state"] == "up"
        seen.clear()
        gw1 = Responder(Responder.open_socket("127.0.0.1", port)).start()
        assert seen.wait(2.0)
        assert changes[-1][1] == frozenset()
        assert health.prober.received > 0 and health.prober.sent >= health.prober.received
    finally:
        health.stop()
        gw1.stop()
        gw2.stop()


def test_liveness_providers_join_the_probes_and_a_removed_target_forgets_its_state(tmp_path):
    path = tmp_path / "liveness.yaml"
    path.write_text("down: [node4]\n")
    live = FileLiveness(path)
    changes = []
    health = GatewayHealth(changes.append, liveness=[live, StaticLiveness({"node9"})], interval=0.02)
    assert health.evaluate() == {"node4", "node9"} and changes == [{"node4", "node9"}]
    path.write_text("down: []\n")
    assert health.evaluate() == {"node9"}
    path.write_text("down: {node4: x}\n")            # bad: the last good set stays, one line says why
    assert health.evaluate() == {"node9"} and len(changes) == 2
    p = _prober(_free_port(), misses=1, rises=1)
    p.set_targets({"a": "127.0.0.1"})
    p.send()
    p.close_round()
    assert p.down() == {"a"}
    p.set_targets({})
    assert p.down() == frozenset()
    p.sock.close()


@pytest.mark.parametrize("text, message", [
    ("down: node3\n", "down: must be a list of node names"),
    ("up: [node3]\n", "must be a mapping with one field, down"),
    ("down: [\n", "invalid YAML"),
])
def test_a_bad_liveness_file_at_start_is_an_error_naming_it(tmp_path, text, message):
    path = tmp_path / "live.yaml"
    path.write_text(text)
    with pytest.raises(LivenessError, match=message) as info:
        FileLiveness(path)
    assert str(path) in str(info.value)
    with pytest.raises(LivenessError, match="No such file"):
        FileLiveness(tmp_path / "missing.yaml")


def _pong(ping, rnd=None):
    """The pong a responder would send for `ping` (or for round `rnd`)."""
    tail = ping[5:] if rnd is None else ping[5:8] + rnd.to_bytes(8, "big")
    return ping[:4] + b"\x02" + tail


def _pending(sock):
    """Bytes waiting on a socket (FIONREAD)."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]


def test_prober_ignores_foreign_future_and_duplicate_answers():
    port = _free_port()
    p = _prober(port, misses=1, rises=1, timeout=0)
    p.set_targets({"gw": "127.0.0.1"})
    fake = Responder.open_socket("127.0.0.1", port)
    try:
        p.send(now=0.0)
        data, addr = fake.recvfrom(64)
        fake.sendto(b"junk", addr)
        fake.sendto(_pong(data, 999), addr)                   # a round not sent yet
        fake.sendto(data, addr)                               # a ping, not a pong
        assert _wait(lambda: _pending(p.sock) > 0, 2.0)
        time.sleep(0.05)
        p.read()
        p.close_round(now=0.1)
        assert p.down() == {"gw"} and p.received == 0
        p.send(now=0.1)
        data, addr = fake.recvfrom(64)
        fake.sendto(_pong(data), addr)                        # a true pong
        fake.sendto(_pong(data), addr)                        # and the same again
        assert _wait(lambda: _pending(p.sock) > 0, 2.0)
        time.sleep(0.05)
        p.read()
        p.close_round(now=0.2)
        assert p.down() == frozenset() and p.received == 1   # the duplicate did not count
        p.send(now=0.2)
        fake.recvfrom(64)
        fake.sendto(_pong(data), addr)                        # round 2's pong again: round 3 still unanswered
        time.sleep(0.05)
        p.read()
        p.close_round(now=0.3)
        assert p.down() == {"gw"} and p.missed("gw") == 1
    finally:
        fake.close()
        p.sock.close()


def _answered_round(p, fake, sent, judged):
    """One round at time `sent` that `fake` answers; judged at time `judged`."""
    p.send(now=sent)
    data, addr = fake.recvfrom(64)
    fake.sendto(_pong(data), addr)
    assert _wait(lambda: _pending(p.sock) > 0, 2.0)
    p.read()
    p.close_round(now=judged)


def test_answers_delayed_within_the_timeout_never_mark_a_gateway_down():
    """A loaded gateway answers late, a loaded prober reads late: neither is a dead gateway.
    Time is given to the prober (now=), so the verdicts do not depend on this machine's speed."""
    port = _free_port()
    p = _prober(port, misses=3, rises=2, timeout=0.3)
    p.set_targets({"gw": "127.0.0.1"})
    fake = Responder.open_socket("127.0.0.1", port)
    try:
        pings = []
        for i in range(3):                                   # 3 rounds of 0.1 s, no answer yet
            p.send(now=i * 0.1)
            pings.append(fake.recvfrom(64))
            p.read()
            p.close_round(now=i * 0.1 + 0.099)
            assert p.down() == frozenset(), i                # 3 unanswered, but the first is < 0.3 s old
        for data, addr in pings:                             # the gateway's answers, 0.15-0.35 s late
            fake.sendto(_pong(data), addr)
        assert _wait(lambda: _pending(p.sock) > 0, 2.0)
        time.sleep(0.05)
        p.read()
        p.close_round(now=0.45)
        assert p.down() == frozenset() and p.missed("gw") == 0 and p.late == 2
        # the prober's own thread stalls 0.5 s after a send; the pong waited on its socket
        _answered_round(p, fake, sent=0.5, judged=1.0)
        assert p.down() == frozenset()
        # a gateway that stops answering: down once 3 pings are unanswered and the first is 0.3 s old
        for i in range(3):
            p.send(now=1.1 + i * 0.1)
            fake.recvfrom(64)
        p.close_round(now=1.39)
        assert p.down() == frozenset()
        p.close_round(now=1.41)
        assert p.down() == {"gw"} and p.missed("gw") == 3
        # up again after `rises` (2) answered pings in a row
        _answered_round(p, fake, sent=1.5, judged=1.55)
        assert p.down() == {"gw"}
        _answered_round(p, fake, sent=1.6, judged=1.65)
        assert p.down() == frozenset()
    finally:
        fake.close()
        p.sock.close()


def test_a_round_that_closes_late_reads_the_pongs_waiting_first():
    """GatewayHealth's thread that ran late (no core, the GIL held elsewhere) closes its rounds at
    once to catch up: the pongs that came meanwhile are read before it judges."""
    port = _free_port()
    gw = Responder(Responder.open_socket("127.0.0.1", port)).start()
    changes = []
    health = GatewayHealth(changes.append, prober=_prober(port, misses=1, rises=1), interval=0.1)
    assert health.prober.timeout == pytest.approx(0.05)
    health.prober.set_targets({"gw": "127.0.0.1"})
    poller = select.poll()
    poller.register(health.prober.sock, select.POLLIN)
    try:
        for _ in range(3):
            time.sleep(0.05)              # the last round's own ping answered (loopback) and taken, so
            health.prober.read()          # the pong waited for below is the late ping's, not that one's
            health.prober.send(now=time.monotonic() - 1.0)   # a ping sent a second ago, its pong waiting
            assert _wait(lambda: _pending(health.prober.sock) > 0, 2.0)
            health._round(health.prober, poller, time.monotonic() - 1.0)   # a round due a second ago
            assert health.down == frozenset() and changes == []
        assert health.prober.received >= 3
    finally:
        health.stop()
        gw.stop()


def test_the_responder_answers_while_another_thread_holds_the_gil():
    """The responder serves from C: pongs go out while this thread holds the GIL in one long C call."""
    import subprocess
    import sys

    port = _free_port()
    gw = Responder(Responder.open_socket("127.0.0.1", port)).start()
    pinger = subprocess.Popen([sys.executable, "-c", _PINGER, str(port)])
    try:
        assert _wait(lambda: gw.answered > 10, 10.0)
        for _ in range(20):
            before = gw.answered
            sum(range(20_000_000))                           # C code that never lets the GIL go
            if gw.answered > before:
                break
        assert gw.answered > before, "no pong while the GIL was held"
    finally:
        pinger.kill()
        pinger.wait()
        gw.stop()


_PINGER = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
end = time.monotonic() + 60
n = 0
while time.monotonic() < end:
    n += 1
    s.sendto(struct.pack("!4sB3xQ", b"EGCH", 1, n), ("127.0.0.1", int(sys.argv[1])))
    try:
        while s.recv(64):
            pass
    except BlockingIOError:
        pass
    time.sleep(0.001)
"""


def test_probing_works_in_a_process_holding_more_than_1024_descriptors():
    """An agent's process holds many rings and sockets: no select() (FD_SETSIZE) anywhere."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.dup(0) for _ in range(1100)]
    port = _free_port()
    gw = Responder(Responder.open_socket("127.0.0.1", port)).start()
    assert gw.sock.fileno() > 1024
    changes = []
    health = GatewayHealth(changes.append, prober=_prober(port, misses=2, rises=1), interval=0.03)
    health.set_targets({"gw": "127.0.0.1"})
    health.start()
    try:
        assert _wait(lambda: health.prober.received >= 3, 2.0), health.prober.received
        gw.stop()
        assert _wait(lambda: health.down == {"gw"}, 2.0)
    finally:
        health.stop()
        gw.stop()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_failing_recompile_is_tried_again_next_round():
    calls = []

    def on_change(down):
        calls.append(down)
        if len(calls) == 1:
            raise RuntimeError("compile failed")

    health = GatewayHealth(on_change, liveness=[StaticLiveness({"node3"})], interval=0.02)
    with pytest.raises(RuntimeError):
        health.evaluate()
    assert health.down == frozenset()              # not taken as applied
    assert health.evaluate() == {"node3"} and health.down == {"node3"} and len(calls) == 2
