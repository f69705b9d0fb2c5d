"""PacketRing over a veth pair across two namespaces (egc-ring-*) that each
test module creates and removes.  Frames are sent only on that pair."""
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import needs_netns, requires_library, requires_tools
from egresscore._core import _ring_in_netns

import egresscore
from egresscore import PacketRing, bpf_dst, bpf_vxlan, pcap_available
from egresscore._ringlab import frame, link_mac, veth_pair

pytestmark = needs_netns
scapy = pytest.importorskip("scapy.all")


@pytest.fixture(scope="module")
def pair():
    with veth_pair() as (na, ia, nb, ib):
        yield {"na": na, "ia": ia, "nb": nb, "ib": ib,
               "ma": link_mac(na, ia), "mb": link_mac(nb, ib)}


def rx_ring(p, **kw):
    kw.setdefault("tx", False)
    kw.setdefault("retire_ms", 1)
    return PacketRing(p["ib"], netns=p["nb"], **kw)


def tx_ring(p, **kw):
    kw.setdefault("rx", False)
    return PacketRing(p["ia"], netns=p["na"], **kw)


def collect(ring, n, timeout=2.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += ring.recv(n - len(got), timeout=0.05)
    return got


def plain_socket(ns, ifname):
    with _ring_in_netns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        s.bind((ifname, 0x88B5))
    return s


def udp_frame(p, dst="192.168.1.100", dport=4789, sport=1234, proto="udp", size=0):
    eth = scapy.Ether(src=p["ma"], dst=p["mb"]) / scapy.IP(src="192.168.1.1", dst=dst)
    l4 = scapy.UDP(sport=sport, dport=dport) if proto == "udp" else scapy.TCP(sport=sport, dport=dport)
    return bytes(eth / l4 / (b"\0" * size))


def test_plain_send_arrives_in_order_byte_for_byte(pair):
    frames = [frame(pair["mb"], pair["ma"], i, size=60 + (i * 37) % 1455) for i in range(3000)]
    s = plain_socket(pair["na"], pair["ia"])
    try:
        with rx_ring(pair, block_size=1 << 16, block_count=64) as rx:
            for f in frames:
                s.send(f)
            got = collect(rx, len(frames))
            assert len(got) == len(frames)
            assert got == frames
            st = rx.stats()
            assert st["rx_frames"] == len(frames) and st["kernel_drops"] == 0
            assert st["rx_blocks"] > 1  # the walk crossed blocks
    finally:
        s.close()


def test_tx_ring_delivers_to_plain_socket(pair):
    frames = [frame(pair["mb"], pair["ma"], i, size=64 + i % 200) for i in range(500)]
    s = plain_socket(pair["nb"], pair["ib"])
    s.settimeout(2)
    try:
        with tx_ring(pair, tx_frames=64) as tx:  # smaller than the batch: wraps and waits
            assert tx.send(frames) == len(frames)
            got = [s.recv(2048) for _ in frames]
        assert got == frames
        assert tx.closed
    finally:
        s.close()


def test_v2_slots_hand_each_frame_over_as_it_lands(pair):
    """rx_frame_size: TPACKET_V2 slots; frames arrive in order, the ring wraps,
    and a lone frame is handed over at once (no block timer to wait for)."""
    frames = [frame(pair["mb"], pair["ma"], i, size=60 + (i * 37) % 1455) for i in range(1000)]
    s = plain_socket(pair["na"], pair["ia"])
    try:
        with rx_ring(pair, block_size=1 << 16, block_count=2, rx_frame_size=2048, retire_ms=60000) as rx:
            s.send(frames[0])
            assert rx.recv(1, timeout=10) == [frames[0]]   # V3 would hold it for the 60 s timer
            got = [frames[0]]
            for i in range(1, len(frames), 50):             # 64 slots: wraps many times
                for f in frames[i:i + 50]:
                    s.send(f)
                got += collect(rx, len(frames[i:i + 50]))
            assert got == frames
            st = rx.stats()
            assert st["rx_frames"] == len(frames) and st["kernel_drops"] == 0
    finally:
        s.close()


def test_v2_small_slots_take_larger_frames_whole(pair):
    """rx_copy_size: a frame larger than its V2 slot is read whole from the
    socket, in order with the ones that fit; none is cut."""
    sizes = [60 + (i * 211) % 340 if i % 3 else 600 + (i * 97) % 900 for i in range(300)]
    frames = [frame(pair["mb"], pair["ma"], i, size=n) for i, n in enumerate(sizes)]
    s = plain_socket(pair["na"], pair["ia"])
    try:
        with rx_ring(pair, block_size=4096, block_count=4, rx_frame_size=512, rx_copy_size=2048) as rx:
            got = []
            for i in range(0, len(frames), 20):                # 32 slots: wraps many times
                for f in frames[i:i + 20]:
                    s.send(f)
                got += collect(rx, len(frames[i:i + 20]))
            assert got == frames
            st = rx.stats()
            assert st["rx_copied"] == sum(len(f) > 512 for f in frames) and st["rx_copy_lost"] == 0
            assert st["kernel_drops"] == 0
    finally:
        s.close()
    with pytest.raises(ValueError, match="rx_copy_size"):
        rx_ring(pair, block_size=4096, rx_frame_size=512, rx_copy_size=256)
    with pytest.raises(ValueError, match="rx_copy_size"):
        rx_ring(pair, rx_copy_size=4096)                         # V3: no slots to outgrow


def test_v2_socket_transmits_with_its_own_header(pair):
    frames = [frame(pair["mb"], pair["ma"], i, size=64 + i % 300) for i in range(300)]
    with rx_ring(pair, block_size=1 << 16, block_count=8) as rx, \
            tx_ring(pair, rx=True, rx_frame_size=2048, block_size=1 << 16, block_count=1, tx_frames=32) as tx:
        assert tx.send(frames) == len(frames)
        assert collect(rx, len(frames)) == frames


def test_datapath_drops_frames_cut_short_by_the_slot(pair):
    from egresscore import Datapath, EgressMap, NatTable

    dp = Datapath("192.168.1.1", pair["mb"], EgressMap(), NatTable())
    s = plain_socket(pair["na"], pair["ia"])
    try:
        with PacketRing(pair["ib"], netns=pair["nb"], rx_frame_size=512, block_size=4096, block_count=2) as ring:
            dp.attach_ring(0, ring)
            s.send(frame(pair["mb"], pair["ma"], 1, size=1000))   # longer than a 512-byte slot
            s.send(frame(pair["mb"], pair["ma"], 2, size=100))
            deadline = time.monotonic() + 5
            while dp.counters()["rx"] < 2 and time.monotonic() < deadline:
                ring.wait(0.1)
                dp.poll()
            c = dp.counters()
            assert c["rx"] == 2 and c["drops"] == {"truncated": 1} and c["passed"] == 1
            dp.detach_ring(0)
    finally:
        s.close()


@pytest.mark.parametrize("bypass", [False, True])
def test_ring_to_ring_numpy_batches(pair, bypass):
    n, width = 5000, 64
    data = np.zeros((n, width), dtype=np.uint8)
    for i in range(n):
        data[i] = np.frombuffer(frame(pair["mb"], pair["ma"], i, size=width), dtype=np.uint8)
    with rx_ring(pair) as rx, tx_ring(pair, qdisc_bypass=bypass, tx_frames=256) as tx:
        sent = tx.send_batch(data)
        assert sent == n
        out = np.zeros((n, 128), dtype=np.uint8)
        lens = np.zeros(n, dtype=np.uint32)
        got, deadline = 0, time.monotonic() + 3
        while got < n and time.monotonic() < deadline:
            got += rx.recv_into(out[got:], lens[got:], timeout=0.05)
        assert got == n
        assert (lens == width).all()
        assert (out[:, :width] == data).all()
        assert tx.stats()["tx_flushes"] >= n // 256


def test_filter_keeps_out_what_it_should(pair):
    keep = [udp_frame(pair, dport=4789, sport=i) for i in range(20)]
    other = ([udp_frame(pair, dport=4790, sport=i) for i in range(20)]
             + [udp_frame(pair, dport=4789, proto="tcp", sport=i) for i in range(20)]
             + [frame(pair["mb"], pair["ma"], i) for i in range(20)])
    mixed = [f for pair_ in zip(keep, other[:20], other[20:40], other[40:]) for f in pair_]
    with rx_ring(pair, filter=bpf_vxlan(4789)) as rx, tx_ring(pair) as tx:
        tx.send(mixed)
        got = collect(rx, len(mixed), timeout=0.5)
        assert got == keep
        # swap the filter at run time: destination host and a port range
        rx.set_filter(bpf_dst("192.168.1.100", ports=(4000, 4790), proto="udp"))
        tx.send(mixed)
        got = collect(rx, len(mixed), timeout=0.5)
        assert got == [f for f in mixed if f in keep or f in other[:20]]
        rx.set_filter(None)
        tx.send(other[40:])
        assert collect(rx, 20) == other[40:]


@requires_library(pcap_available, "libpcap", "libpcap0.8")
def test_pcap_expression_filter(pair):
    frames = [udp_frame(pair, dport=53 + (i % 2), sport=i) for i in range(40)]
    with rx_ring(pair, filter="udp dst port 53") as rx, tx_ring(pair) as tx:
        tx.send(frames)
        assert collect(rx, 40, timeout=0.5) == frames[::2]


def test_fanout_spreads_flows_across_two_sockets(pair):
    flows = 64
    frames = [udp_frame(pair, sport=10000 + i, dport=4789) for i in range(flows) for _ in range(4)]
    with rx_ring(pair, fanout=4242) as r1, rx_ring(pair, fanout=4242) as r2, tx_ring(pair) as tx:
        tx.send(frames)
        g1 = collect(r1, len(frames), timeout=0.5)
        g2 = collect(r2, len(frames), timeout=0.5)
    assert len(g1) + len(g2) == len(frames)
    assert g1 and g2, "hash fanout sent every flow to one socket"
    # a flow sticks to one socket
    s1, s2 = {f[34:36] for f in g1}, {f[34:36] for f in g2}
    assert not s1 & s2
    assert len(s1) + len(s2) == flows


def _fanout_worker(ib, nb, group, ready, conn):
    with PacketRing(ib, netns=nb, tx=False, retire_ms=1, fanout=group) as r:
        ready.set()
        got = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            got += r.drain(timeout=0.05)
        conn.send(got)


def test_fanout_across_processes(pair):
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    procs = []
    for _ in range(2):
        ready = ctx.Event()
        parent, child = ctx.Pipe()
        pr = ctx.Process(target=_fanout_worker, args=(pair["ib"], pair["nb"], 999, ready, child))
        pr.start()
        procs.append((pr, parent))
        assert ready.wait(10)
    frames = [udp_frame(pair, sport=20000 + i) for i in range(128)]
    with tx_ring(pair) as tx:
        tx.send(frames)
    counts = []
    for pr, parent in procs:
        assert parent.poll(10)
        counts.append(parent.recv())
        pr.join(5)
    assert sum(counts) == len(frames) and min(counts) > 0, counts


def test_fanout_mode_mismatch_is_clear(pair):
    with rx_ring(pair, fanout=77):
        with pytest.raises(ValueError, match="fanout group 77"):
            rx_ring(pair, fanout=77, fanout_mode="lb")


def test_kernel_drop_counter_rises_when_not_drained(pair):
    frames = [frame(pair["mb"], pair["ma"], i, size=1000) for i in range(3000)]
    with rx_ring(pair, block_size=1 << 14, block_count=2) as rx, tx_ring(pair) as tx:
        tx.send(frames)
        time.sleep(0.05)
        st = rx.stats()
        assert st["kernel_drops"] > 0
        assert st["kernel_packets"] >= st["kernel_drops"]
        drained = rx.drain(timeout=0.1)
        assert 0 < drained < len(frames)
        # the ring works again after being drained
        rx.drain(timeout=0.05)
        tx.send(frames[:5])
        assert collect(rx, 5) == frames[:5]


def test_ignore_outgoing(pair):
    # The kernel never loops a socket's own frames back to it; the option
    # hides every other sender's outgoing frames too (the host stack's).
    f = [frame(pair["mb"], pair["ma"], i) for i in range(10)]
    with PacketRing(pair["ia"], netns=pair["na"], tx=False, retire_ms=1) as mine, \
            PacketRing(pair["ia"], netns=pair["na"], tx=False, retire_ms=1,
                       ignore_outgoing=False) as all_, tx_ring(pair) as tx:
        tx.send(f)
        assert collect(all_, 10, timeout=0.5) == f
        assert mine.recv(100, timeout=0.05) == []


def test_promisc_option_opens(pair):
    with rx_ring(pair, promisc=True) as rx:
        assert not rx.closed


def test_wait_times_out_promptly(pair):
    with rx_ring(pair) as rx:
        t = time.monotonic()
        assert rx.wait(timeout=0.05) is False
        assert time.monotonic() - t < 1.0
        assert rx.recv(10, timeout=0) == []


def test_wait_stops_on_signal(pair):
    import signal

    class Stop(Exception):
        pass

    def handler(*_):
        raise Stop

    old = signal.signal(signal.SIGALRM, handler)
    try:
        with rx_ring(pair) as rx:
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            t = time.monotonic()
            with pytest.raises(Stop):
                rx.wait(timeout=5)
            assert time.monotonic() - t < 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_clear_errors(pair):
    with pytest.raises(ValueError, match="'nosuch0' not found in netns"):
        PacketRing("nosuch0", netns=pair["na"])
    with pytest.raises(ValueError, match="no such network namespace"):
        PacketRing("lo", netns="egc-ring-does-not-exist")
    with pytest.raises(MemoryError, match="ring too large"):
        rx_ring(pair, block_size=1 << 30, block_count=1 << 16)
    with pytest.raises(ValueError, match="block_size"):
        rx_ring(pair, block_size=5000)
    with pytest.raises(ValueError, match="rx_frame_size"):
        rx_ring(pair, block_size=4096, rx_frame_size=8192)
    with pytest.raises(ValueError, match="rx_frame_size"):
        rx_ring(pair, rx_frame_size=1000)
    with pytest.raises(ValueError, match="fanout_mode"):
        rx_ring(pair, fanout=1, fanout_mode="nope")
    with pytest.raises(ValueError, match="filter"):
        rx_ring(pair, filter=[(0x06, 0, 0, 0)] + [(0x15, 200, 200, 0)])  # jump past the end
    with pytest.raises(ValueError, match="nothing to open"):
        PacketRing("lo", rx=False, tx=False)
    r = tx_ring(pair)
    with pytest.raises(ValueError, match="frames\\[0\\]"):
        r.send([b"short"])
    with pytest.raises(TypeError, match="frames\\[0\\]"):
        r.send([42])
    with pytest.raises(ValueError, match="no RX ring"):
        r.recv_into(np.zeros((1, 64), np.uint8), np.zeros(1, np.uint32))
    r.close()
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.send([b"\0" * 64])


@requires_tools("setpriv")
def test_needs_cap_net_raw_message():
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import egresscore\n"
            "try:\n    egresscore.PacketRing('lo')\n"
            "except PermissionError as e:\n    print('PERM', e)\n"
            % os.path.dirname(os.path.dirname(egresscore.__file__)))
    out = subprocess.run(["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw", "--",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "PERM" in out.stdout and "CAP_NET_RAW" in out.stdout, out.stdout + out.stderr


def test_exports():
    assert "PacketRing" in egresscore.__all__ and egresscore.PacketRing is PacketRing


def test_vnet_hdr_tx_plain_frames_arrive(pair):
    frames = [frame(pair["mb"], pair["ma"], i, size=64 + i) for i in range(100)]
    with rx_ring(pair) as rx, tx_ring(pair, vnet_hdr=True) as tx:
        assert tx.vnet_hdr and tx.tx_room == 2048 - 48 - 10
        assert tx.send(frames) == len(frames)
        assert collect(rx, len(frames)) == frames


@pytest.mark.parametrize("layout", [
    {"block_size": 1 << 20, "block_count": 8},                                        # V3 blocks
    {"block_size": 1 << 20, "block_count": 2, "rx_frame_size": 2048, "rx_copy_size": 69632},  # V2, small slots
], ids=["v3", "v2-copy"])
def test_vnet_hdr_rx_sees_gso_super_packets(pair, layout):
    """TCP over the veth pair (TSO on): with PACKET_VNET_HDR the ring gets
    unsegmented super-packets and their GSO metadata, also through 2 KiB V2
    slots (the super-packet read whole from the socket)."""
    import struct
    import threading

    from pyroute2 import NetNS
    from pyroute2.netlink.exceptions import NetlinkError
    for ns, ifname, addr in ((pair["na"], pair["ia"], "192.0.2.1"), (pair["nb"], pair["ib"], "192.0.2.2")):
        with NetNS(ns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            try:
                ipr.addr("add", index=idx, address=addr, prefixlen=24)
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST: the other layout's run added it
                    raise
    with _ring_in_netns(pair["nb"]):
        srv = socket.socket()
        srv.bind(("192.0.2.2", 5001))
        srv.listen(1)
        srv.settimeout(5)
    with _ring_in_netns(pair["na"]):
        cli = socket.socket()
    sink = threading.Thread(target=lambda: [c.recv(1 << 20) for c in [srv.accept()[0]] for _ in range(64)],
                            daemon=True)
    try:
        with rx_ring(pair, vnet_hdr=True, filter=bpf_dst("192.0.2.2", ports=5001, proto="tcp"), **layout) as rx:
            sink.start()
            cli.settimeout(5)
            cli.connect(("192.0.2.2", 5001))
            cli.sendall(b"x" * (1 << 20))
            got = []
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                got += rx.recv(1024, timeout=0.05, vnet=True)
                if any(len(f) > 1514 for _, f in got):
                    break
            copied = rx.stats()["rx_copied"]
        big = [(struct.unpack("<BBHHHH", v), f) for v, f in got if len(f) > 1514]
        assert big, "no super-packet seen"
        (flags, gso_type, hdr_len, gso_size, csum_start, csum_off), f = big[0]
        assert gso_type & 0x7f == 1  # VIRTIO_NET_HDR_GSO_TCPV4
        assert 0 < gso_size <= 1460
        assert (copied > 0) == ("rx_copy_size" in layout)
    finally:
        cli.close()
        srv.close()
        sink.join(timeout=5)


def test_forward_in_c_bounces_frames_back(pair):
    """B's ring forwards what it receives out of the same port (C level, no
    Python per frame); A's ring gets every frame back, byte for byte."""
    frames = [frame(pair["mb"], pair["ma"], i, size=64 + i % 300) for i in range(2000)]
    with PacketRing(pair["ib"], netns=pair["nb"], retire_ms=1, tx_frames=256) as bounce, \
            PacketRing(pair["ia"], netns=pair["na"], retire_ms=1) as a:
        a.send(frames)
        moved, deadline = 0, time.monotonic() + 3
        while moved < len(frames) and time.monotonic() < deadline:
            moved += bounce.forward(bounce, timeout=0.05)
        assert moved == len(frames)
        assert collect(a, len(frames)) == frames


def test_cbpf_fanout_steers_as_the_program_says(pair):
    """PACKET_FANOUT_CBPF with the workers' underlay program (egresscore._steer): the
    kernel delivers each frame to the member the Python model names (loads relative
    to the link-layer header work on a real skb), members indexed in joining order;
    a kernel-picked group id ("unique") is joined by the second member."""
    from egresscore._steer import steer_underlay, steer_underlay_model, worker_slices
    nat = (32768, 65534)
    prog = steer_underlay(2, nat)
    with rx_ring(pair, fanout="unique", fanout_mode="cbpf", fanout_prog=prog) as r0:
        gid = r0.fanout_group
        assert gid is not None
        with rx_ring(pair, fanout=gid, fanout_mode="cbpf", fanout_prog=prog) as r1:
            assert r1.fanout_group == gid
            eth = scapy.Ether(src=pair["ma"], dst=pair["mb"])
            frames = []
            for (lo, hi) in worker_slices(*nat, 2):
                for port in (lo, hi, (lo + hi) // 2):
                    frames.append(bytes(eth / scapy.IP(src="203.0.113.10", dst="192.168.1.100")
                                        / scapy.TCP(sport=80, dport=port)))
            for sport in range(1000, 1016):  # VXLAN from a source node: by the inner source
                inner = scapy.Ether() / scapy.IP(src="10.0.1.93", dst="203.0.113.10") / scapy.UDP(sport=sport)
                frames.append(bytes(eth / scapy.IP(src="192.168.1.1", dst="192.168.1.100")
                                    / scapy.UDP(sport=50000, dport=8472) / scapy.VXLAN(vni=2) / inner))
            with tx_ring(pair) as tx:
                tx.send(frames)
            g0 = collect(r0, len(frames), timeout=0.5)
            g1 = collect(r1, len(frames), timeout=0.5)
    want0 = [f for f in frames if steer_underlay_model(f, 2, nat) == 0]
    want1 = [f for f in frames if steer_underlay_model(f, 2, nat) == 1]
    assert want0 and want1
    assert sorted(g0) == sorted(want0) and sorted(g1) == sorted(want1)
