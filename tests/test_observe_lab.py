"""Audit and observability end to end in the lab (root; namespaces egc-lab-observe-*).

An Agent per node; node3 (the seed policy's gateway) also writes flow
records to a callback, serves metrics on 127.0.0.1 and a control socket.
What the pod saw on its own interface (captured with AF_PACKET inside its
namespace) is compared with the records the gateway wrote.
"""
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import urllib.request

import pytest
from conftest import as_nobody, needs_netns, running_agents

pytestmark = needs_netns

SERVER = "203.0.113.10"
EGRESS_IP = "192.168.1.3"
APP1 = "10.0.1.93"
POLICY = "egress-sample"


# -- run inside app1's namespace ------------------------------------------------------------

def _capture_socket():
    # ETH_P_ALL: a protocol-specific packet socket does not see outgoing frames
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
    cap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    cap.bind(("eth0", 0))
    cap.setblocking(False)
    return cap


def _tally(cap, proto, me, lport):
    """Packets and IP bytes of our flow each way, from what the capture holds."""
    out = [0, 0]
    inn = [0, 0]
    mine = socket.inet_aton(me)
    while True:
        try:
            data, addr = cap.recvfrom(65535)
        except BlockingIOError:
            break
        if addr[1] != 0x0800 or len(data) < 24 or data[9] != proto:
            continue
        ihl = (data[0] & 15) * 4
        length = struct.unpack("!H", data[2:4])[0]
        sport, dport = struct.unpack("!HH", data[ihl:ihl + 4])
        if data[12:16] == mine and sport == lport:
            out[0] += 1
            out[1] += length
        elif data[16:20] == mine and dport == lport:
            inn[0] += 1
            inn[1] += length
    return out, inn


def tcp_upload_counted(dst, nbytes, port=80):
    """PUT nbytes (1000-byte segments: nothing needs PMTUD); what went each way."""
    cap = _capture_socket()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
    s.settimeout(10)
    s.connect((dst, port))
    me, lport = s.getsockname()
    body = b"z" * nbytes
    s.sendall(f"PUT /sha256 HTTP/1.0\r\nContent-Length: {nbytes}\r\n\r\n".encode() + body)
    reply = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    s.close()
    time.sleep(0.5)                         # the last ACK of the close
    out, inn = _tally(cap, 6, me, lport)
    return lport, out, inn, reply.split(b"\r\n\r\n", 1)[1].split()[0].decode()


def udp_exchange_counted(dst, count=3, size=100, port=7):
    cap = _capture_socket()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    u.connect((dst, port))
    me, lport = u.getsockname()
    echoes = 0
    for i in range(count):
        u.send(struct.pack("!I", i) + b"u" * (size - 4))
        try:
            u.recv(65535)
            echoes += 1
        except socket.timeout:
            pass
    u.close()
    time.sleep(0.2)
    out, inn = _tally(cap, 17, me, lport)
    return lport, out, inn, echoes


def send_unsolicited(dst, dport):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("203.0.113.10", 4444))
    u.sendto(b"knock", (dst, dport))
    u.close()


# -- the lab --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab():
    from egresscore.lab import Lab
    from egresscore.lab.kernel import SAMPLE_POLICY
    from egresscore.lab.offloads import disable_offloads, prepare_lab

    sockdir = tempfile.mkdtemp(prefix="egresscore-observe-")
    os.chmod(sockdir, 0o755)                # so that "nobody" reaches the socket's own directory
    with Lab(tag="observe") as lab:
        prepare_lab(lab)
        # app1's capture must see packets as they go on the wire, not TSO
        # super-packets that the agent would cut up after the capture
        app1 = lab.pods["app1"]
        disable_offloads(app1.ifname, app1.ns)
        lab.records = []
        lab.sock = os.path.join(sockdir, "run", "node3.sock")
        node3 = dict(flow_log=lab.records.append, metrics_port=0, control_socket=lab.sock,
                     nat_capacity=4096, nat_ipv6_capacity=1000,
                     nat_timeouts={"tcp_closing": 1, "udp": 3})
        try:
            with running_agents(lab, SAMPLE_POLICY, {"node3": node3}) as lab.agents:
                lab.servers_ = lab.start_servers()
                yield lab
        finally:
            shutil.rmtree(sockdir, ignore_errors=True)


def test_nat_ipv6_capacity_reaches_the_table(lab):
    """Agent(nat_ipv6_capacity=N) sizes the NAT table's IPv6 pool (the
    default would be all 4096 of its connections)."""
    st = lab.agents["node3"].nat.stats
    assert (st["capacity"], st["ipv6_capacity"]) == (4096, 1000)


def wait_for(lab, pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [r for r in list(lab.records) if pred(r)]
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"no such record; have {lab.records[-5:]}")


def flow(proto, lport):
    return lambda r: r.get("proto") == proto and r.get("src") == APP1 and r.get("sport") == lport


def test_tcp_connection_start_and_end_records(lab):
    lport, out, inn, got = lab.call("app1", tcp_upload_counted, SERVER, 20000)
    assert got == "20000"
    (start,) = wait_for(lab, lambda r: flow("tcp", lport)(r) and r["kind"] == "start")
    (end,) = wait_for(lab, lambda r: flow("tcp", lport)(r) and r["kind"] == "end")
    for r in (start, end):
        assert (r["dst"], r["dport"], r["egress_ip"], r["node"]) == (SERVER, 80, EGRESS_IP, "node3")
        assert r["policy"] == POLICY and r["gateway"] == EGRESS_IP
        assert r["pod"] == {"namespace": "default", "name": "app1", "labels": {"app": "app1"}}
    assert end["reason"] == "fin"
    # exactly what app1 put on the wire, and what came back to it
    assert [end["packets_out"], end["bytes_out"]] == out
    assert [end["packets_in"], end["bytes_in"]] == inn
    assert out[1] > 20000


def test_udp_exchange_records_and_nat_list(lab, capsys):
    from egresscore.cli import main

    lport, out, inn, echoes = lab.call("app1", udp_exchange_counted, SERVER, 3, 100)
    assert echoes == 3 and out == [3, 3 * 128] and inn == [3, 3 * 128]
    # the live connection, through the control socket, like `cilium-dbg bpf nat list`
    assert main(["nat", "list", "--socket", lab.sock]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"UDP OUT {APP1}:{lport} -> {SERVER}:7 XLATE_SRC {EGRESS_IP}:\d+ .*Packets=3 Bytes=384",
                     text), text
    (start,) = wait_for(lab, lambda r: flow("udp", lport)(r) and r["kind"] == "start")
    (end,) = wait_for(lab, lambda r: flow("udp", lport)(r) and r["kind"] == "end")
    assert start["egress_ip"] == EGRESS_IP and start["policy"] == POLICY
    assert end["reason"] == "expiry"
    assert (end["packets_out"], end["bytes_out"], end["packets_in"], end["bytes_in"]) == (3, 384, 3, 384)


def test_unsolicited_inbound_makes_a_drop_record(lab):
    lab.call("ext1", send_unsolicited, EGRESS_IP, 40000)
    (drop,) = wait_for(lab, lambda r: r["kind"] == "drop" and r.get("dport") == 40000)
    assert (drop["reason"], drop["src"], drop["sport"], drop["dst"], drop["proto"]) == (
        "no_nat_entry", SERVER, 4444, EGRESS_IP, "udp")


def test_metrics_over_http_show_the_counts(lab):
    lab.call("app1", udp_exchange_counted, SERVER, 2, 60)
    ended = [r for r in list(lab.records) if r["kind"] == "end" and r.get("policy") == POLICY]
    m = lab.agents["node3"].metrics
    assert m.addr == "127.0.0.1"
    body = urllib.request.urlopen(m.url, timeout=5).read().decode()

    def value(name, **labels):
        want = {"node": "node3", **labels}
        for line in body.splitlines():
            mm = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
            if mm and mm.group(1) == name:
                got = dict(re.findall(r'(\w+)="([^"]*)"', mm.group(2)))
                if got == want:
                    return float(mm.group(3))
        raise AssertionError(f"{name}{labels} not in the metrics")

    stats = lab.agents["node3"].stats()
    assert value("egresscore_nat_created_total") >= 3
    assert value("egresscore_forward_count_total", verdict="tx") >= 10
    assert value("egresscore_drop_count_total", reason="no_nat_entry") >= 1
    assert value("egresscore_nat_capacity") == 4096
    assert value("egresscore_nat_ports_in_use", egress_ip=EGRESS_IP, proto="udp") >= 1
    assert value("egresscore_egress_map_entries") == stats["egress_map"]["entries"] > 0
    assert value("egresscore_flowlog_records_total", kind="start") >= 3
    assert value("egresscore_ring_kernel_drops_total", ring="eth0") >= 0
    assert value("egresscore_policy_connections_total", policy=POLICY) >= 2
    assert value("egresscore_policy_forward_bytes_total", policy=POLICY) >= sum(
        r["bytes_out"] + r["bytes_in"] for r in ended) > 0


def test_control_socket_refuses_other_users(lab, capsys):
    from egresscore.cli import main

    assert as_nobody(lab.sock, "nat_list") == "connect-error 13"
    st = os.stat(lab.sock)
    assert oct(st.st_mode & 0o777) == "0o600"
    # even with the permissions opened up, the peer credentials say no
    os.chmod(os.path.dirname(lab.sock), 0o755)
    os.chmod(lab.sock, 0o666)
    try:
        out = as_nobody(lab.sock, "nat_list")
    finally:
        os.chmod(lab.sock, 0o600)
        os.chmod(os.path.dirname(lab.sock), 0o700)
    assert out == 'answer {"ok": false, "error": "permission denied for uid 65534"}'
    assert main(["stats", "--socket", lab.sock, "-o", "json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["node"] == "node3" and stats["nat"]["capacity"] == 4096
    assert main(["egress", "list", "--socket", lab.sock]) == 0
    assert f"{APP1}" in capsys.readouterr().out
