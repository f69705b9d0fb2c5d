"""Every frame counted: rx = passed + tx + tx_local + dropped, the
per-verdict packet and byte counters agree, and every drop has a named
reason, over the whole malformed corpus (tests/test_packet_malformed.py),
runts (0-13 bytes) and super-packets the datapath refuses, fed through the
real Datapath from a pod port and from the underlay."""
import pytest

from egresscore import DROP_REASON_NAMES

pytest.importorskip("scapy.all")

from test_datapath import SERVER, datapath, from_app1  # noqa: E402
from test_packet_malformed import build_corpus  # noqa: E402

VERDICT_OF = {"pass": "passed", "tx": "tx", "tx_local": "tx_local", "drop": "dropped"}


def assert_every_frame_counted(dp, frames, nbytes):
    c = dp.counters()
    assert c["rx"] == frames
    assert c["rx"] == c["passed"] + c["tx"] + c["tx_local"] + c["dropped"]
    for verdict, name in VERDICT_OF.items():
        assert c["verdicts"][verdict]["packets"] == c[name], verdict
    assert sum(v["bytes"] for v in c["verdicts"].values()) == nbytes
    assert sum(c["drops"].values()) == c["dropped"]
    assert set(c["drops"]) <= set(DROP_REASON_NAMES[1:])
    return c


@pytest.fixture(scope="module")
def corpus_frames():
    seen, frames = set(), []
    for _, frame, _ in build_corpus():
        if frame not in seen:
            seen.add(frame)
            frames.append(frame)
    return frames


@pytest.mark.parametrize("view, port", [("node1", 1), ("node1", 0), ("node3", 1)])
def test_malformed_corpus_every_frame_counted(corpus_frames, view, port):
    dp = datapath(view)
    n = nbytes = 0
    for frame in corpus_frames:
        before = dp.counters()["rx"]
        if frame:
            dp.process(frame, port, now=1.0)
        else:
            dp.process_frames(frame, port, now=1.0)
        assert dp.counters()["rx"] == before + 1, f"{len(frame)} bytes {frame[:40].hex()}"
        n += 1
        nbytes += len(frame)
    c = assert_every_frame_counted(dp, n, nbytes)
    assert c["dropped"] > 0


@pytest.mark.parametrize("port, verdict, reason", [(0, "passed", None), (1, "dropped", "malformed")])
def test_runts_are_counted(port, verdict, reason):
    dp = datapath("node1")
    for size in range(14):
        frame = bytes(range(size))
        if size:
            assert dp.process(frame, port, now=1.0)[:2] == (
                ("pass", "none") if port == 0 else ("drop", "malformed"))
        else:
            assert dp.process_frames(frame, port, now=1.0) == []
    c = assert_every_frame_counted(dp, 14, sum(range(14)))
    assert c[verdict] == 14
    assert c["drops"] == ({reason: 14} if reason else {})


def test_refused_super_packets_are_counted():
    """GSO types other than TCPv4 (UDP, TCPv6, UDP_L4), and TCPv4 super-packets
    the datapath cannot cut on the way into the tunnel (not TCP, no MSS):
    each one frame, one drop, reason unsupported."""
    from scapy.layers.inet import TCP, UDP

    dp = datapath("node1")
    tcp = from_app1((SERVER, TCP(sport=40000, dport=443, flags="A") / (b"x" * 4000)))
    udp = from_app1((SERVER, UDP(sport=40000, dport=443) / (b"x" * 4000)))
    frames = [(tcp, {"gso_type": t, "gso_size": 1400}) for t in (3, 4, 5, 0x83)]
    frames += [(udp, {"gso_type": 1, "gso_size": 1400}), (tcp, {"gso_type": 1, "gso_size": 0})]
    for frame, vnet in frames:
        assert dp.process_frames(frame, 1, vnet=vnet, now=1.0) == []
    c = assert_every_frame_counted(dp, len(frames), sum(len(f) for f, _ in frames))
    assert c["drops"] == {"unsupported": len(frames)}
    # a super-packet the datapath can cut counts as its segments, each a frame
    out = dp.process_frames(tcp, 1, vnet={"gso_type": 1, "gso_size": 1400}, now=1.0)
    assert len(out) == 3
    c = dp.counters()
    assert c["rx"] == len(frames) + 3 == c["passed"] + c["tx"] + c["tx_local"] + c["dropped"]
    assert c["encap"] == 3
