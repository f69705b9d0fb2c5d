"""Per-policy metrics end to end in the lab (root; namespaces egc-lab-polm-*).

An Agent per node and the seed policy (app1 -> 203.0.113.0/24 through
node3).  app1 exchanges UDP datagrams and uploads over TCP to the server
while an AF_PACKET socket in app1's namespace captures its own interface:
the per-policy counters of node1 (redirected to the gateway) and of node3
(SNATed out, replies back) must equal, packet for packet and byte for byte,
the frames of those flows that app1's interface saw (Ethernet frames: IP
length + 14).  app1's offloads are off, so the capture sees wire-sized
frames.
"""
import socket
import struct
import time

import pytest
from conftest import needs_netns, running_agents

pytestmark = needs_netns

SERVER = "203.0.113.10"
POLICY = "egress-sample"


# -- run inside app1's namespace ------------------------------------------------------------

def _capture():
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))   # ETH_P_ALL
    cap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    cap.bind(("eth0", 0))
    cap.setblocking(False)
    return cap


def exchange(dst, udp_count, udp_size, tcp_bytes):
    """UDP echoes and a TCP upload to dst: (echoes, [[packets, bytes] to dst, [packets, bytes] from dst])
    of what app1's interface carried."""
    cap = _capture()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    u.connect((dst, 7))
    echoes = 0
    for i in range(udp_count):
        u.send(struct.pack("!I", i) + b"u" * (udp_size - 4))
        try:
            u.recv(65535)
            echoes += 1
        except socket.timeout:
            pass
    u.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
    s.settimeout(10)
    s.connect((dst, 80))
    s.sendall(f"PUT /sha256 HTTP/1.0\r\nContent-Length: {tcp_bytes}\r\n\r\n".encode() + b"z" * tcp_bytes)
    while s.recv(65536):
        pass
    s.close()
    time.sleep(0.5)                         # the last ACK of the close
    return echoes, _tally(cap, dst)


def _tally(cap, dst):
    """[packets, frame bytes] to dst and from dst, as app1's eth0 saw them."""
    out, inn = [0, 0], [0, 0]
    remote = socket.inet_aton(dst)
    while True:
        try:
            data, addr = cap.recvfrom(65535)
        except BlockingIOError:
            break
        if addr[1] != 0x0800 or len(data) < 20:
            continue
        frame = struct.unpack("!H", data[2:4])[0] + 14
        if data[16:20] == remote:
            out[0] += 1
            out[1] += frame
        elif data[12:16] == remote:
            inn[0] += 1
            inn[1] += frame
    return out, inn


# -- the lab --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab():
    from egresscore.lab import Lab
    from egresscore.lab.kernel import SAMPLE_POLICY
    from egresscore.lab.offloads import disable_offloads, prepare_lab

    with Lab(tag="polm") as lab:
        prepare_lab(lab)
        app1 = lab.pods["app1"]
        disable_offloads(app1.ifname, app1.ns)
        with running_agents(lab, SAMPLE_POLICY) as lab.agents:
            lab.servers_ = lab.start_servers()
            yield lab


def _counters(lab):
    n1 = lab.agents["node1"].stats()["policy_counters"][POLICY]
    n3 = lab.agents["node3"].stats()["policy_counters"][POLICY]
    return n1, n3


def _delta(after, before, direction):
    return [after[direction]["packets"] - before[direction]["packets"],
            after[direction]["bytes"] - before[direction]["bytes"]]


def test_per_policy_counts_equal_what_the_pods_interface_carried(lab):
    lab.udp_echo("app1", SERVER, count=1)             # neighbours resolved, the policy warm
    n1_before, n3_before = _counters(lab)
    echoes, (out, inn) = lab.call("app1", exchange, SERVER, 20, 300, 30000)
    assert echoes == 20
    time.sleep(0.3)
    n1, n3 = _counters(lab)
    assert out[0] > 20 + 30 and out[1] > 20 * 342 + 30000
    # node1 redirected every frame app1 sent to the server; node3 SNATed them and sent every reply back
    assert _delta(n1, n1_before, "redirect") == out
    assert _delta(n3, n3_before, "egress") == out
    assert _delta(n3, n3_before, "reply") == inn
    assert _delta(n1, n1_before, "egress") == _delta(n1, n1_before, "reply") == [0, 0]
    # two connections (the UDP flow and the TCP one) opened under the policy on the gateway
    assert n3["connections_opened"] - n3_before["connections_opened"] == 2
    assert n3["id"] == lab.agents["node3"].compiler.policy_id(POLICY)
    assert "192.168.1.3" in n3["egress_ips"] and n3["egress_ips"]["192.168.1.3"]["udp"][1] > 0
    # nothing of the exchange was dropped (the warm-up may meet a gateway not yet probed up)
    assert n1["drops"] == n1_before["drops"] and n3["drops"] == n3_before["drops"]


def test_stats_by_policy_and_egress_list_through_the_control_socket(lab, capsys, tmp_path):
    from egresscore.cli import main
    from egresscore.control import ControlServer, inspection_handlers

    node3 = lab.agents["node3"]
    sock = str(tmp_path / "node3.sock")

    handlers = inspection_handlers(egress_map=node3.egress_map, stats=node3.stats,
                                   policy_names=lambda: {i: n for n, i in node3.compiler.policy_ids.items()})
    server = ControlServer(sock, handlers).start()
    try:
        capsys.readouterr()
        assert main(["stats", "--socket", sock, "--by-policy"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0].startswith("Policy") and POLICY in out and "192.168.1.3" in out
        assert main(["egress", "list", "--socket", sock, "--show-policy"]) == 0
        out = capsys.readouterr().out
        assert f"{POLICY} ({node3.compiler.policy_id(POLICY)})" in out
    finally:
        server.stop()
