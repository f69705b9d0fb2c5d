"""End to end: make-before-break across a policy edit and a grown gateway list (root).

One lab (namespaces egc-lab-mbb-*), an agent on every node with
make_before_break=True.  app1 downloads 20 MB over one TCP connection, read
slowly (flow control paces the server), while the policy moves app1 to
another gateway: the download completes intact through the gateway it
started on, and a connection opened after the edit is seen by the server
from the new gateway's address.  Then an `egressGateways` list of two
gateways grows to three, which moves app1 (FNV placement of its UID) to the
third: the transfers running across the change complete intact.  Last, a
gateway found down releases its pinned connections at once.
"""
import hashlib
import os
import socket
import time

import pytest
import yaml
from conftest import needs_netns
from ha_lab import ha_lab
from ha_lab import wait as _wait

pytestmark = needs_netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HA_POLICY = os.path.join(ROOT, "examples", "egress-ha.yaml")
SERVER = "203.0.113.10"
APP1 = "10.0.1.93"
NODE2, NODE3, NODE4 = "192.168.1.2", "192.168.1.3", "192.168.1.4"
SIZE = 20 << 20
RATE = 5 << 20              # bytes/s the client reads: about 4 s of transfer


def _paced_download(conn, dst, n, rate):
    """In the pod: GET /bytes/n from dst over one connection, read at about
    `rate` bytes/s through a small receive buffer; report ("started", local
    port), then ("done", body bytes, sha256 matches, seconds) or ("error", why)."""
    from egresscore.lab import traffic

    t0 = time.monotonic()
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)    # before connect: a small window
        s.settimeout(10.0)
        s.connect((dst, traffic.HTTP_PORT))
        s.sendall(f"GET /bytes/{n} HTTP/1.0\r\nHost: {dst}\r\n\r\n".encode())
        conn.send(("started", s.getsockname()[1]))
        data = bytearray()
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
            ahead = len(data) / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        s.close()
        body = bytes(data).partition(b"\r\n\r\n")[2]
        conn.send(("done", len(body), hashlib.sha256(body).hexdigest() == traffic.payload_sha256(n),
                   time.monotonic() - t0))
    except OSError as exc:
        conn.send(("error", repr(exc)))


class Download:
    """A paced download from app1 running in the background."""

    def __init__(self, lab, n=SIZE, rate=RATE):
        from egresscore.lab import _ns

        self.parent, child = _ns._fork.Pipe()
        self.proc = lab.spawn("app1", _paced_download, child, SERVER, n, rate)
        child.close()
        assert self.parent.poll(10), "the download did not start"
        msg = self.parent.recv()
        assert msg[0] == "started", msg
        self.n = n

    def result(self, timeout=60):
        assert self.parent.poll(timeout), "the download did not finish"
        msg = self.parent.recv()
        self.proc.join(5)
        return msg


def _policy(path, name, gateways):
    """A policy like the HA sample's for app1, through `gateways` (node names, egressGateways)."""
    with open(HA_POLICY) as f:
        doc = yaml.safe_load(f)
    doc["metadata"]["name"] = name
    spec = doc["spec"]
    del spec["egressGateway"]
    spec["egressGateways"] = [{"nodeSelector": {"matchLabels": {"node.kubernetes.io/name": g}}, "interface": "eth0"}
                              for g in gateways]
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return str(path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with ha_lab(tmp_path_factory, "mbb", HA_POLICY, ("node1", "node2", "node3", "node4"),
                control_socket=False, nat_state=False, make_before_break=True) as lab:
        yield lab


def _set_policies(lab, path):
    for a in lab.agents.values():
        a.set_policies([path])


def _gateway(lab):
    return lab.agents["node1"].egress_map.lookup(APP1, SERVER).gateway_ip.exploded


def test_a_policy_edit_keeps_a_running_transfer_on_the_old_gateway_and_moves_new_connections(lab):
    node1, node3 = lab.agents["node1"], lab.agents["node3"]
    _set_policies(lab, HA_POLICY)
    assert _gateway(lab) == NODE3 and lab.tcp_request("app1", SERVER) == NODE3
    kept0, nat0 = node1.datapath.pins.stats()["kept"], node3.datapath.pins.stats()["kept_nat"]
    lab.servers_.clear()
    dl = Download(lab)
    time.sleep(1.0)                                     # about a quarter of the transfer
    _set_policies(lab, _policy(lab.work / "moved.yaml", "egress-ha", ["node4"]))
    assert _gateway(lab) == NODE4
    assert lab.tcp_request("app1", SERVER) == NODE4     # a connection opened after the edit: the new gateway
    status, got, intact, seconds = dl.result()
    assert (status, got, intact) == ("done", SIZE, True)
    assert seconds > 2.0, f"the transfer took {seconds:.2f} s: it did not run across the edit"
    # the transfer was seen from node3 only; after the edit both ends kept it there
    seen = [(r["src"], r["sport"]) for r in lab.servers_.seen("tcp", SERVER)]
    assert [src for src, _ in seen] == [NODE3, NODE4], seen
    assert node1.datapath.pins.stats()["kept"] > kept0
    assert node3.datapath.pins.stats()["kept_nat"] > nat0
    assert node3.counters()["drops"].get("policy_denied", 0) == 0


def test_growing_egress_gateways_from_two_to_three_breaks_no_connection(lab):
    two = _policy(lab.work / "two.yaml", "egress-ha", ["node2", "node3"])
    three = _policy(lab.work / "three.yaml", "egress-ha", ["node2", "node3", "node4"])
    _set_policies(lab, two)
    # gateways sorted by IP, app1's UID picks the second of two and the third of three (FNV, as Cilium)
    assert _gateway(lab) == NODE3 and lab.tcp_request("app1", SERVER) == NODE3
    lab.servers_.clear()
    downloads = [Download(lab), Download(lab, n=SIZE // 2, rate=RATE // 2)]
    time.sleep(1.0)
    _set_policies(lab, three)
    assert _gateway(lab) == NODE4
    assert lab.tcp_request("app1", SERVER) == NODE4
    for dl in downloads:
        status, got, intact, _ = dl.result()
        assert (status, got, intact) == ("done", dl.n, True)
    seen = sorted(r["src"] for r in lab.servers_.seen("tcp", SERVER))
    assert seen == [NODE3, NODE3, NODE4], seen
    drops = {n: a.counters()["drops"] for n, a in lab.agents.items()}
    assert all(d.get("policy_denied", 0) == 0 for d in drops.values()), drops


def test_a_gateway_found_down_releases_its_pinned_connections_at_once(lab):
    node1 = lab.agents["node1"]
    _set_policies(lab, HA_POLICY)
    assert lab.udp_echo("app1", SERVER, count=2) == 2          # a UDP flow pinned to node3 (300 s idle timeout)
    pinned = [r for r in node1.datapath.pins.records() if r["proto"] == 17 and r["node"] == 2]
    assert pinned, node1.datapath.pins.records()
    before = node1.counters()["pins"]["flushed"]
    views = [lab.agents["node1"], lab.agents["node4"]]       # the source node and the standby agree node3 is down
    try:
        for a in views:
            a._health_changed(frozenset({"node3"}))           # what the health thread does when node3 stops answering
        _wait(lambda: node1.counters()["pins"]["flushed"] >= before + len(pinned), 2.0, "node3's pins released")
        assert not [r for r in node1.datapath.pins.records() if r["node"] == 2]
        assert _gateway(lab) == NODE4 and lab.tcp_request("app1", SERVER) == NODE4
    finally:
        for a in views:
            a._health_changed(frozenset())
    assert _gateway(lab) == NODE3
