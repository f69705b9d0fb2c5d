"""Datapath.process_batch, the ring loop's per-batch step over NumPy arrays,
against Datapath.process() one frame at a time: the same verdicts, output
frames and counters on twin datapaths, for every path (pod to remote
gateway, gateway SNAT, reply reverse NAT and encap, masquerade) and for
drops, replies to drops and frames left to the kernel."""
import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from test_datapath import (
    APP1,
    APP1_HOST,
    APP1_MAC,
    APP2,
    EGRESS,
    MAC,
    NODES,
    OTHER_SERVER,
    POD3,
    POD3_HOST,
    POD3_MAC,
    ROUTER_MAC,
    SERVER,
    egress_map,
    from_app1,
)

from egresscore import Datapath, DropReason, NatTable

VERDICTS = ("pass", "tx", "tx_local", "drop")
NOW = 500.0
FLOWS = 300                 # more than one DP_BATCH (256): the batch is cut as poll() cuts it


def twin(view):
    """A Datapath of node1 or node3 whose NAT picks ports as its twin's does (seeded)."""
    ip = {"node1": "192.168.1.1", "node3": "192.168.1.3"}[view]
    dp = Datapath(ip, MAC[ip], egress_map(view), NatTable(port_range=(32768, 65534), seed=3))
    for i, (nip, cidr) in enumerate(NODES):
        dp.add_node(i, nip, [cidr], MAC[nip])
    dp.set_router(ROUTER_MAC)
    if view == "node1":
        dp.add_pod_port(1, APP1, APP1_HOST, APP1_MAC)
    else:
        dp.add_pod_port(1, POD3, POD3_HOST, POD3_MAC)
    return dp


def pack(frames):
    lengths = np.array([len(f) for f in frames], np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    return np.frombuffer(b"".join(frames) or b"\0", np.uint8), offsets, lengths


def run_batch(dp, frames, port, max_out=None, out_bytes=None):
    """process_batch over frames: [(verdict, reason, [(port, bytes)])] per frame."""
    data, offsets, lengths = pack(frames)
    verdicts = np.full(len(frames), -1, np.int32)
    max_out = len(frames) if max_out is None else max_out
    out = np.zeros(out_bytes if out_bytes is not None else 4096 * max(1, max_out), np.uint8)
    meta = np.zeros((max_out, 4), np.int64)
    n = dp.process_batch(data, offsets, lengths, verdicts, out, meta, port=port, now=NOW)
    outs = [[] for _ in frames]
    for frame, oport, off, ln in meta[:n].tolist():
        outs[frame].append((oport, out[off:off + ln].tobytes()))
    return [(VERDICTS[v & 0xff], DropReason(v >> 8).label, o) for v, o in zip(verdicts.tolist(), outs)]


def run_each(dp, frames, port):
    results = []
    ports = [port] * len(frames) if isinstance(port, int) else port
    for f, p in zip(frames, ports):
        verdict, reason, out = dp.process(f, p, NOW)
        results.append((verdict, reason, [] if out is None else [out]))
    return results


def same(view, frames, port, setup=()):
    """Both ways on twin datapaths (after the same set-up frames): the same
    results and counters.  Returns the results."""
    a, b = twin(view), twin(view)
    for f, p in setup:
        assert a.process(f, p, NOW) == b.process(f, p, NOW)
    each, batch = run_each(a, frames, port), run_batch(b, frames, port)
    assert batch == each
    assert b.counters() == a.counters()
    return batch


def to_server(dst, n=FLOWS, proto=UDP):
    return [from_app1((dst, proto(sport=10000 + i, dport=53) / b"query")) for i in range(n)]


def test_pod_to_remote_gateway_and_masquerade():
    got = same("node1", to_server(SERVER), 1)
    assert {(v, r, o[0][0]) for v, r, o in got} == {("tx", "none", 0)}
    assert all(Ether(o[0][1])[IP].dst == EGRESS for _, _, o in got)           # VXLAN to the gateway
    got = same("node1", to_server(OTHER_SERVER), 1)
    assert {(v, r, o[0][0]) for v, r, o in got} == {("tx", "none", 0)}
    assert all(Ether(o[0][1])[IP].src == "192.168.1.1" for _, _, o in got)    # masqueraded


def test_gateway_snat_and_reply():
    n1 = twin("node1")
    tunnel = [n1.process(f, 1, NOW)[2][1] for f in to_server(SERVER)]
    got = same("node3", tunnel, 0)
    assert {(v, r) for v, r, _ in got} == {("tx", "none")}
    snat = [Ether(o[0][1]) for _, _, o in got]
    assert {p[IP].src for p in snat} == {EGRESS}
    replies = [bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS)
                     / UDP(sport=53, dport=p[UDP].sport) / b"answer") for p in snat]
    got = same("node3", replies, 0, setup=[(f, 0) for f in tunnel])
    assert {(v, r, o[0][0]) for v, r, o in got} == {("tx", "none", 0)}
    assert all(Ether(o[0][1])[IP].dst == "192.168.1.1" for _, _, o in got)    # VXLAN back to node1


def test_a_nat_table_beyond_the_caches_is_prefetched_ahead_without_changing_a_verdict():
    """Past 4,096 live connections the batch loop prefetches each frame's
    NAT slot and entry a few frames ahead, reading the key from the frame
    (datapath/nat_ahead.pyx): every verdict and output stays process()'s,
    also for frames cut short anywhere in the headers it reads."""
    n = 5000
    n1 = twin("node1")
    sent = to_server(SERVER, n // 2) + [from_app1((SERVER, TCP(sport=20000 + i, dport=443, flags="S")))
                                        for i in range(n - n // 2)]
    tunnel = [n1.process(f, 1, NOW)[2][1] for f in sent]
    cut = [f[:k] for f in tunnel[:3] for k in range(1, 80, 3)]             # outer and inner headers cut
    got = same("node3", tunnel + cut + tunnel, 0)                          # new, broken, then established
    assert {(v, r) for v, r, _ in got[:n]} == {("tx", "none")}
    assert "tx" not in {v for v, _, _ in got[n:n + len(cut)]}
    assert got[n + len(cut):] == got[:n]                                   # each connection as it was opened
    snat = [Ether(o[0][1]) for _, _, o in got[:n]]
    replies = [bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS)
                     / p[IP].payload.__class__(sport=p[IP].payload.dport, dport=p[IP].payload.sport,
                                               **({"flags": "SA"} if TCP in p else {})))
               for p in snat]
    replies += [r[:k] for r in replies[:2] for k in range(1, 60, 3)]
    got = same("node3", replies, 0, setup=[(f, 0) for f in tunnel])
    assert {(v, o[0][0]) for v, _, o in got[:n]} == {("tx", 0)}
    assert {Ether(o[0][1])[IP].dst for _, _, o in got[:n]} == {"192.168.1.1"}   # VXLAN back to node1


def test_frames_of_several_ports_in_one_call():
    ref = twin("node1")
    sent = to_server(OTHER_SERVER, 20)
    xports = [Ether(ref.process(f, 1, NOW)[2][1])[UDP].sport for f in sent]
    replies = [bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.1"]) / IP(src=OTHER_SERVER, dst="192.168.1.1")
                     / UDP(sport=53, dport=x) / b"answer") for x in xports]
    frames = [f for pair in zip(sent, replies) for f in pair]
    ports = [1, 0] * len(sent)
    a, b = twin("node1"), twin("node1")
    each, batch = run_each(a, frames, ports), run_batch(b, frames, np.array(ports, np.int32))
    assert batch == each
    assert [(v, o[0][0]) for v, _, o in batch] == [("tx", 0), ("tx_local", 1)] * len(sent)
    assert b.counters() == a.counters()
    with pytest.raises(ValueError, match="each of the 40 frames"):
        run_batch(b, frames, np.array(ports[:-1], np.int32))


def test_drops_replies_to_drops_and_passes():
    big = bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst=SERVER, flags="DF")
                / TCP(sport=40000, dport=80, flags="A") / (b"z" * 1460))
    frames = [from_app1((SERVER, UDP(sport=1, dport=7)), src="10.0.1.99"),   # spoofed
              big,                                                           # frag_needed, with a reply
              from_app1((APP2, UDP(sport=1, dport=7))),                       # left to the kernel
              b"\x01" * 10,                                                  # runt
              from_app1((OTHER_SERVER, UDP(sport=1, dport=7)), ttl=1)]       # ttl_exceeded
    got = same("node1", frames, 1)
    assert [(v, r, len(o)) for v, r, o in got] == [
        ("drop", "spoofed", 0), ("drop", "frag_needed", 1), ("pass", "none", 0), ("drop", "malformed", 0),
        ("drop", "ttl_exceeded", 0)]
    dp = twin("node1")                          # an empty frame (process() refuses one): counted as poll() does
    assert run_batch(dp, [b""], 1) == [("drop", "malformed", [])] and dp.counters()["rx"] == 1
    unsolicited = [bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS)
                         / UDP(sport=53, dport=40000 + i)) for i in range(3)]
    got = same("node3", unsolicited, 0)
    assert {(v, r) for v, r, _ in got} == {("drop", "no_nat_entry")}


def test_outputs_that_do_not_fit_count_as_a_full_tx_ring():
    frames = to_server(SERVER, 10)
    dp = twin("node1")
    got = run_batch(dp, frames, 1, max_out=4)
    assert [len(o) for _, _, o in got] == [1] * 4 + [0] * 6
    c = dp.counters()
    assert c["tx_errors"] == 6 and c["drops"] == {"tx_full": 6} and c["encap"] == 10
    dp = twin("node1")
    got = run_batch(dp, frames, 1, out_bytes=len(frames[0]) + 50)            # room for one encapsulated frame
    assert [len(o) for _, _, o in got] == [1] + [0] * 9 and dp.counters()["tx_errors"] == 9


def test_bad_arrays_are_refused_naming_the_problem():
    dp = twin("node1")
    data, offsets, lengths = pack(to_server(SERVER, 2))
    verdicts, out, meta = np.zeros(2, np.int32), np.zeros(4096, np.uint8), np.zeros((2, 4), np.int64)
    with pytest.raises(ValueError, match="frame 1"):
        dp.process_batch(data, offsets, lengths + 1, verdicts, out, meta, port=1)
    with pytest.raises(ValueError, match="same 2 frames"):
        dp.process_batch(data, offsets, lengths[:1], verdicts, out, meta, port=1)
    with pytest.raises(ValueError, match="4 columns"):
        dp.process_batch(data, offsets, lengths, verdicts, out, np.zeros((2, 3), np.int64), port=1)
    with pytest.raises(ValueError, match="port 5 .frame 0. is not configured"):
        dp.process_batch(data, offsets, lengths, verdicts, out, meta, port=5)
    with pytest.raises((ValueError, TypeError)):
        dp.process_batch(data, offsets.astype(np.int32), lengths, verdicts, out, meta, port=1)
    assert dp.counters()["rx"] == 0
