"""The datapath's one RCU read section per batch (issue 17): every batch
leaves the sections it entered, on every path (drops, malformed frames,
replies, passes), so a writer's update (lpm_rcu_sync) never waits for
ever; and tables updated from another thread while process_batch runs are
never read after they are freed (run it under the checked ASan build of
tests/test_packet_malformed.py for the use-after-free part)."""
import threading

import numpy as np
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from test_datapath import APP1, APP1_HOST, APP1_MAC, APP2, EGRESS, MAC, OTHER_SERVER, ROUTER_MAC, SERVER, from_app1
from test_datapath_batch import NOW, pack, run_batch, twin

VERDICTS = ("pass", "tx", "tx_local", "drop")


def tables(dp):
    return (dp.egress_map, dp.pod_nodes, dp.node_ips, dp.local_pods, dp.pod_nodes6, dp.node_ips6, dp.local_pods6)


def readers(dp):
    return [t.readers for t in tables(dp)]


def drop_paths():
    """Frames of every outcome from a pod: tx, masquerade, each drop reason
    the pod side has, a reply to a drop, a pass, runts and garbage."""
    big = bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst=SERVER, flags="DF")
                / TCP(sport=40000, dport=80, flags="A") / (b"z" * 1460))
    good = from_app1((SERVER, UDP(sport=1, dport=7)))
    return [good,
            from_app1((OTHER_SERVER, UDP(sport=2, dport=7))),
            from_app1((SERVER, UDP(sport=1, dport=7)), src="10.0.1.99"),        # spoofed
            big,                                                               # frag_needed + reply
            from_app1((APP2, UDP(sport=1, dport=7))),                           # left to the kernel
            from_app1((OTHER_SERVER, UDP(sport=1, dport=7)), ttl=1),            # ttl_exceeded
            b"", b"\x01" * 10, b"\xff" * 14, good[:20], good[:34], good[:-10],   # malformed / truncated
            good[:14] + b"\x60" + good[15:],                                   # IPv6 version nibble
            bytes(range(256)) * 4]


def test_every_batch_leaves_its_read_sections_and_writers_complete():
    dp = twin("node1")
    n3 = twin("node3")
    frames = drop_paths()
    tunnel = [o for _, o in (dp.process(f, 1, NOW)[1:] for f in frames if f) if o is not None and o[0] == 0]
    unsolicited = [bytes(Ether(src=ROUTER_MAC, dst=MAC[EGRESS]) / IP(src=SERVER, dst=EGRESS)
                         / UDP(sport=53, dport=40000 + i)) for i in range(3)]
    for rnd in range(200):                      # many batches, every path, both directions
        got = run_batch(dp, frames, 1)
        assert {v for v, _, _ in got} == {"tx", "drop", "pass"}
        run_batch(n3, [f for _, f in tunnel] + unsolicited + frames, 0)
        dp.process(frames[rnd % len(frames)] or b"\0", 1, NOW)
        dp.process_frames(frames[rnd % len(frames)], 1)
        assert readers(dp) == [0] * 7 and readers(n3) == [0] * 7
    # writers: each waits for a grace period (lpm_rcu_sync); they complete and take effect
    dp.egress_map.set(APP1, "203.0.113.0/24", "0.0.0.0", "192.168.1.2")
    dp.add_node(5, "192.168.1.5", ["10.0.5.0/24"], "02:00:00:00:05:05")
    dp.remove_node(5)
    got = run_batch(dp, [frames[0]], 1)
    assert got[0][0] == "tx" and Ether(got[0][2][0][1])[IP].dst == "192.168.1.2"
    assert readers(dp) == [0] * 7


GATEWAYS = ("192.168.1.2", "192.168.1.3")


def batch_arrays(frames):
    """process_batch's arrays for frames: packed input, verdicts, outputs."""
    data, offsets, lengths = pack(frames)
    return (data, offsets, lengths, np.zeros(len(frames), np.int32), np.zeros(len(frames) * 256, np.uint8),
            np.zeros((len(frames), 4), np.int64))


def against_writers(dp, batch_once, rounds, pods=True):
    """batch_once() in a thread, over and over (process_batch, GIL released),
    while this one swaps the egress map's gateway and adds and removes a
    node (and a pod port) `rounds` times; returns how often it ran."""
    errors, stop, calls = [], threading.Event(), [0]

    def datapath_thread():
        try:
            while not stop.is_set():
                batch_once()
                calls[0] += 1
        except Exception as exc:            # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=datapath_thread)
    t.start()
    try:
        for i in range(rounds):
            dp.egress_map.set(APP1, "203.0.113.0/24", "0.0.0.0", GATEWAYS[i % 2])
            dp.add_node(6, "192.168.1.6", [f"10.0.{6 + i % 50}.0/24"], "02:00:00:00:06:06")
            dp.remove_node(6)
            if pods:
                dp.add_pod_port(2, "10.0.1.20", "02:00:00:00:00:20")
                dp.remove_pod_port(2)
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive() and not errors, errors
    return calls[0]


def test_updates_concurrent_with_process_batch():
    """A thread runs process_batch (GIL released) while this one swaps the
    egress map's gateway and adds/removes nodes and pods: every frame goes
    to one of the two gateways, nothing crashes, and every section is left."""
    dp = twin("node1")
    frames = [from_app1((SERVER, UDP(sport=10000 + i, dport=53) / b"q")) for i in range(600)]
    data, offsets, lengths, verdicts, out, meta = batch_arrays(frames)
    seen = set()

    def batch_once():
        n = dp.process_batch(data, offsets, lengths, verdicts, out, meta, port=1, now=NOW)
        assert n == len(frames) and {VERDICTS[v & 0xff] for v in verdicts.tolist()} == {"tx"}
        for _, _, off, ln in meta[:n].tolist():
            seen.add(Ether(out[off:off + ln].tobytes())[IP].dst)

    against_writers(dp, batch_once, 300)
    assert seen and seen <= set(GATEWAYS)
    assert readers(dp) == [0] * 7


def test_interleaved_ports_share_a_section_and_writers_still_complete():
    """process_batch holds one read section per DP_BATCH input frames, not
    one per run of a port (frames from a pod and from the underlay in turn,
    runs of one frame): a writer swapping the egress map meanwhile completes,
    every pod frame goes to one of the two gateways, each underlay frame
    gets its own verdict, and no section is left open."""
    dp = twin("node1")
    pod = [from_app1((SERVER, UDP(sport=10000 + i, dport=53) / b"q")) for i in range(700)]
    wire = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.1"]) / IP(src=SERVER, dst="192.168.1.1")
                 / UDP(sport=53, dport=40000))
    wire_verdict = dp.process(wire, 0, NOW)[0]
    frames = [f for p in pod for f in (p, wire)]
    ports = np.array([1, 0] * len(pod), np.int32)
    data, offsets, lengths, verdicts, out, meta = batch_arrays(frames)
    seen = set()

    def batch_once():
        n = dp.process_batch(data, offsets, lengths, verdicts, out, meta, port=ports, now=NOW)
        got = [VERDICTS[v & 0xff] for v in verdicts.tolist()]
        assert set(got[0::2]) == {"tx"} and set(got[1::2]) == {wire_verdict}
        for i, _, off, ln in meta[:n].tolist():
            if i % 2 == 0:
                seen.add(Ether(out[off:off + ln].tobytes())[IP].dst)

    calls = against_writers(dp, batch_once, 200, pods=False)
    assert calls > 0 and seen and seen <= set(GATEWAYS)
    assert readers(dp) == [0] * 7
