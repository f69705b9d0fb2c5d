"""The agent's control socket: owner-only access, the JSON protocol, the CLI."""
import json
import os
import pathlib
import re
import shutil
import socket
import stat
import tempfile

import pytest
from conftest import NOBODY, as_nobody

from egresscore import (
    Compiler,
    ControlClient,
    ControlError,
    ControlServer,
    EgressMap,
    NatTable,
    default_socket_path,
    load_cluster,
    load_policies,
)
from egresscore.cli import main
from egresscore.control import inspection_handlers

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "..", "examples")


@pytest.fixture
def agent_state():
    cluster = load_cluster(os.path.join(EXAMPLES, "cluster.yaml"))
    policies = load_policies(os.path.join(EXAMPLES, "egress-sample.yaml")).policies
    em = EgressMap()
    Compiler(cluster, policies, node="node3", egress_map=em)
    t = NatTable(["192.168.1.3"], capacity=64, seed=1)
    t.translate("10.0.1.93", 40000, "203.0.113.10", 80, tcp_flags="S", length=60)
    stats = {"drops": {"no_gateway": 3}, "nat": t.stats}
    return inspection_handlers(nat=t, egress_map=em, stats=lambda: stats)


@pytest.fixture
def server(tmp_path, agent_state):
    path = tmp_path / "run" / "node3.sock"
    with ControlServer(str(path), agent_state) as srv:
        yield srv


def test_socket_and_directory_are_owner_only(server):
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o700


def test_requests_and_errors(server):
    c = ControlClient(server.path)
    assert c.call("ping") == "pong"
    assert set(c.call("commands")) >= {"nat_list", "egress_list", "stats", "ping"}
    (e,) = c.call("nat_list")
    assert (e["src"], e["sport"], e["egress_ip"], e["state"], e["pkts_out"], e["bytes_out"]) == (
        "10.0.1.93", 40000, "192.168.1.3", "SYN_SENT", 1, 60)
    rows = c.call("egress_list")
    assert {"SourceIP": "10.0.1.93", "DestCIDR": "203.0.113.0/24", "EgressIP": "192.168.1.3",
            "GatewayIP": "192.168.1.3"} in rows
    assert c.call("stats")["drops"] == {"no_gateway": 3}
    with pytest.raises(ControlError, match="unknown command"):
        c.call("shutdown")
    with pytest.raises(ControlError, match="bad arguments"):
        c.call("stats", verbose=True)
    # raw protocol: garbage gets an error line, the connection keeps serving
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.path)
    s.sendall(b"not json\n" + json.dumps({"cmd": "ping"}).encode() + b"\n")
    f = s.makefile("rb")
    assert json.loads(f.readline()) == {"ok": False, "error": "request is not JSON"}
    assert json.loads(f.readline()) == {"ok": True, "result": "pong"}
    s.close()


def test_no_agent_and_stale_socket(tmp_path, agent_state):
    with pytest.raises(ControlError, match="is the agent running"):
        ControlClient(str(tmp_path / "none.sock")).call("ping")
    path = tmp_path / "d" / "n.sock"
    os.makedirs(path.parent, mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                                   # a leftover file, nobody listening
    with ControlServer(str(path), agent_state) as srv:
        assert ControlClient(srv.path).call("ping") == "pong"
        with pytest.raises(OSError, match="another agent"):
            ControlServer(str(path), agent_state).start()
    assert not path.exists()


def test_default_path():
    assert default_socket_path("node3") == "/run/egresscore/node3.sock"
    assert default_socket_path("node3", "lab-node3") == "/run/egresscore/node3@lab-node3.sock"
    for bad in ("", "../x", "a/b", None):
        with pytest.raises(ValueError):
            default_socket_path(bad)


@pytest.fixture
def open_dir():
    """A directory nobody may traverse (pytest's tmp_path lies in a private one)."""
    d = tempfile.mkdtemp(prefix="egresscore-ctl-")
    os.chmod(d, 0o755)
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")


@needs_root
def test_other_users_cannot_connect(open_dir, agent_state):
    path = open_dir / "run" / "node3.sock"
    with ControlServer(str(path), agent_state) as srv:
        out = as_nobody(srv.path)
        assert out == "connect-error 13"             # EACCES: the 0700 directory
        assert ControlClient(srv.path).call("ping") == "pong"


@needs_root
def test_peer_credentials_refuse_other_uids_even_with_open_permissions(open_dir, agent_state):
    path = open_dir / "run" / "node3.sock"
    with ControlServer(str(path), agent_state) as srv:
        os.chmod(path.parent, 0o755)                # an operator widened the permissions:
        os.chmod(path, 0o666)                       # SO_PEERCRED still says no
        out = as_nobody(srv.path)
        assert out.startswith("answer ")
        doc = json.loads(out[len("answer "):])
        assert doc == {"ok": False, "error": f"permission denied for uid {NOBODY}"}
        assert srv.refused == 1
    with ControlServer(str(path), agent_state, allow_uids={0, NOBODY}) as srv:
        os.chmod(path.parent, 0o755)
        os.chmod(path, 0o666)
        assert '"ok": true' in as_nobody(srv.path)


def test_cli_against_a_running_agent(server, capsys):
    assert main(["nat", "list", "--socket", server.path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("TCP OUT 10.0.1.93:40000 -> 203.0.113.10:80 XLATE_SRC 192.168.1.3:40000")
    assert out[0].endswith("Packets=1 Bytes=60")
    assert out[1].startswith("TCP IN 203.0.113.10:80 -> 192.168.1.3:40000 XLATE_DST 10.0.1.93:40000")
    assert main(["egress", "list", "--socket", server.path]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["Source", "IP", "Destination", "CIDR", "Egress", "IP",
                                           "Gateway", "IP"]
    assert "10.0.1.93" in out and "203.0.113.0/24" in out
    assert main(["stats", "--socket", server.path]) == 0
    assert re.search(r"^drops\.no_gateway\s+3$", capsys.readouterr().out, re.M)
    assert main(["stats", "--socket", server.path, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["drops"] == {"no_gateway": 3}


def test_cli_errors(tmp_path, capsys):
    assert main(["nat", "list", "--socket", str(tmp_path / "x.sock")]) == 1
    assert "is the agent running" in capsys.readouterr().err
    assert main(["stats"]) == 2
    assert main(["nat"]) == 2


# -- bounds: request size, nesting, connections, idle time, handler errors ---------------

def _raw(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s, s.makefile("rb")


def _closed(sock):
    """True once the server has closed the connection (read returns EOF)."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("newline", [b"", b"\n"])
def test_over_long_request_gets_an_error_and_is_closed(server, newline):
    from egresscore.control import MAX_REQUEST

    s, f = _raw(server.path)
    try:
        s.sendall(b'{"cmd": "ping", "pad": "' + b"x" * (MAX_REQUEST + 10) + b'"}' + newline)
    except BrokenPipeError:
        pass
    assert json.loads(f.readline()) == {"ok": False,
                                        "error": f"request too long (at most {MAX_REQUEST} bytes per line)"}
    assert _closed(s)
    assert ControlClient(server.path).call("ping") == "pong"    # the server is fine


def test_deeply_nested_request_is_refused_before_parsing(server):
    from egresscore.control import MAX_DEPTH

    s, f = _raw(server.path)
    deep = b'{"cmd": "stats", "args": {"x": ' + b"[" * 100000 + b"]" * 100000 + b"}}"
    s.sendall(deep[:60000] + b"\n")          # within MAX_REQUEST, far deeper than MAX_DEPTH
    assert json.loads(f.readline()) == {"ok": False,
                                        "error": f"request is too deeply nested (at most {MAX_DEPTH} levels)"}
    ok = b'{"cmd": "ping", "args": {"a": ' + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"}}"
    s.sendall(ok.replace(b'"ping", "args": {"a"', b'"ping", "x": {"a"') + b"\n")
    assert json.loads(f.readline()) == {"ok": True, "result": "pong"}    # the same connection still serves
    s.sendall(b'{"cmd": "ping", "note": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}\n')
    assert json.loads(f.readline()) == {"ok": True, "result": "pong"}    # brackets in strings do not count
    s.sendall(b"\xff\xfe garbage\n")
    assert json.loads(f.readline()) == {"ok": False, "error": "request is not JSON"}
    s.close()


def test_connection_cap_and_no_thread_per_connection(tmp_path, agent_state):
    import threading

    path = str(tmp_path / "run" / "cap.sock")
    def server_threads():
        return sum(t.name.startswith("egresscore-control") for t in threading.enumerate())

    with ControlServer(path, agent_state, max_connections=4, workers=2) as srv:
        idle = [_raw(path) for _ in range(4)]
        for s, f in idle:                           # each is accepted and served
            s.sendall(b'{"cmd": "ping"}\n')
            assert json.loads(f.readline())["ok"] is True
        # idle connections cost no thread: 4 open, the accept thread and at
        # most its 2 pool workers (the pool may start its second one on a
        # request that comes before the first worker is idle again)
        assert 2 <= server_threads() <= 1 + srv.workers
        s5, f5 = _raw(path)
        assert json.loads(f5.readline()) == {"ok": False, "error": "too many connections (at most 4 open)"}
        assert _closed(s5) and srv.refused_busy == 1
        with pytest.raises(ControlError, match=r"too many connections \(at most 4 open\)"):
            ControlClient(path).call("ping")        # the CLI's client says why
        gone, gone_f = idle.pop()
        gone_f.close()
        gone.close()
        for _ in range(100):                        # the server notices the close, then has room
            try:
                assert ControlClient(path).call("ping") == "pong"
                break
            except ControlError:
                continue
        else:
            pytest.fail("no room after a connection closed")
        for s, _ in idle:
            s.close()


def test_idle_connections_are_closed(tmp_path, agent_state):
    path = str(tmp_path / "run" / "idle.sock")
    with ControlServer(path, agent_state, idle_timeout=0.3):
        s, f = _raw(path)
        s.sendall(b'{"cmd": "ping"}\n')
        assert json.loads(f.readline())["ok"] is True
        assert _closed(s)                           # nothing more sent: closed (within the 10 s read timeout)


def test_handler_errors_are_replies_and_a_slow_handler_stalls_nobody(tmp_path, caplog):
    import threading

    release = threading.Event()

    def boom():
        raise RuntimeError("broken handler")

    def slow():
        release.wait(10)
        return "done"

    path = str(tmp_path / "run" / "h.sock")
    with ControlServer(path, {"boom": boom, "slow": slow}) as srv:
        s, f = _raw(path)
        s.sendall(b'{"cmd": "boom"}\n{"cmd": "ping"}\n')            # pipelined: answered in order
        assert json.loads(f.readline()) == {"ok": False, "error": "RuntimeError: broken handler"}
        assert json.loads(f.readline()) == {"ok": True, "result": "pong"}
        assert sum("control command boom failed" in r.getMessage() for r in caplog.records) == 1
        slow_sock, slow_f = _raw(path)
        slow_sock.sendall(b'{"cmd": "slow"}\n')
        assert ControlClient(srv.path).call("ping") == "pong"      # served while `slow` runs
        release.set()
        assert json.loads(slow_f.readline()) == {"ok": True, "result": "done"}
        s.close()
        slow_sock.close()
