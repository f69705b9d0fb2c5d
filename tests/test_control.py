"""The agent's control socket: owner-only access, the JSON protocol, the CLI."""
import json
import os
import socket
import stat
import pathlib
import re
import shutil
import tempfile

import pytest

from egresscore import (
    Compiler, ControlClient, ControlError, ControlServer, EgressMap, NatTable, default_socket_path,
    load_cluster, load_policies,
)
from egresscore.cli import main
from egresscore.control import inspection_handlers

from conftest import NOBODY, as_nobody

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
