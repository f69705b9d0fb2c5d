"""NatTable(state_path=...): a table in a shared-memory file that a later
table adopts (issue 16), and every kind of bad file it refuses."""

import os
import random
import shutil
import struct

import pytest
from egresscore._core import _NAT_ENTRY_SIZE as E
from egresscore._core import NAT_STATE_LAYOUT, NatStateError, NatTable, _nat_state_regions

EGRESS = "192.0.2.10"
EGRESS2 = "192.0.2.11"
REMOTE = "203.0.113.5"
T0 = 1000.0           # the tables' clock (seconds), after the file's creation time


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


def table(path, clock, **kw):
    kw.setdefault("capacity", 4096)
    kw.setdefault("port_range", (40000, 40999))
    return NatTable([EGRESS], state_path=path, clock=clock, **kw)


def copy_of(path, tmp_path, name="copy.nat"):
    """The file as a kill -9 leaves it: copied while its table is still live."""
    dst = tmp_path / name
    shutil.copyfile(path, dst)
    return dst


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def flows(tmp_path, clock):
    """A table in a file with 300 TCP flows (100 from pods on ports inside the
    NAT range), 50 UDP, 20 ICMP echo; returns (path, table, translations)."""
    path = tmp_path / "node.nat"
    t = table(path, clock)
    got = {}
    for i in range(300):
        sport = 40000 + i if i < 100 else 10000 + i
        key = (f"10.0.{i // 200}.{i % 200 + 1}", sport, REMOTE, 443, "tcp")
        got[key] = t.translate(*key[:4], "tcp", tcp_flags="S")
        t.reverse(REMOTE, 443, EGRESS, got[key][1], "tcp", tcp_flags="SA")
    for i in range(50):
        key = ("10.1.0.1", 5000 + i, "198.51.100.1", 53, "udp")
        got[key] = t.translate(*key)
    for i in range(20):
        key = ("10.2.0.1", 7 + i, REMOTE, 0, "icmp")
        got[key] = t.translate(*key)
    return path, t, got


def test_new_file_says_it_starts_empty(tmp_path, clock):
    path = tmp_path / "sub" / "n.nat"
    t = table(path, clock, capacity=1 << 20)   # big enough that a file system's large folios stay small beside it
    st = t.state
    assert st["adopted"] is False and st["reason"] is None
    assert "new, the table starts empty" in st["message"] and str(path) in st["message"]
    size = _nat_state_regions(1 << 20)[1]
    assert os.path.getsize(path) == size
    assert os.stat(path).st_blocks * 512 < size // 4      # sparse: holes are not backed
    assert len(t) == 0


def test_adoption_keeps_every_mapping_and_replies(tmp_path, clock, flows):
    path, t, got = flows
    snap = copy_of(path, tmp_path)
    clock.t += 5
    t2 = table(snap, clock)
    st = t2.state
    assert st["adopted"] and st["reason"] is None, st
    assert st["connections"] == len(got) and st["invalid"] == 0 and st["expired"] == 0
    assert len(t2) == len(got) and t2.egress_ips == [EGRESS]
    for (src, sport, dst, dport, proto), (eip, xport) in got.items():
        assert t2.translate(src, sport, dst, dport, proto) == (eip, xport)
        if proto != "icmp":
            assert t2.reverse(dst, dport, eip, xport, proto) == (src, sport)
        else:
            assert t2.reverse(dst, 0, eip, xport, "icmp") == (src, sport)
    # ports inside the range kept their own port (preservation survives)
    assert got[("10.0.0.1", 40000, REMOTE, 443, "tcp")] == (EGRESS, 40000)
    assert t2.stats["created"] == 0 and t2.stats["entries"] == len(got)
    assert t2.port_usage()[EGRESS]["tcp"][0] == 300
    assert t2.port_usage()[EGRESS]["udp"][0] == 50


def test_new_flows_after_adoption_do_not_collide(tmp_path, clock, flows):
    path, t, got = flows
    t2 = table(copy_of(path, tmp_path), clock)
    taken = {x for (k, (_, x)) in got.items() if k[4] == "tcp"}
    fresh = set()
    for i in range(600):          # 300 + 600 of the 1000 ports: the rest must be new ones
        _, x = t2.translate(f"10.9.{i // 200}.{i % 200 + 1}", 20000 + i, REMOTE, 443, "tcp")
        fresh.add(x)
    assert len(fresh) == 600 and not fresh & taken
    # a new connection of an adopted pod endpoint shares its mapping (EIM)
    assert t2.translate("10.0.0.151", 10150, "198.51.100.9", 80)[1] == \
        got[("10.0.0.151", 10150, REMOTE, 443, "tcp")][1]


def test_expiry_continues_from_the_adopted_times(tmp_path, clock, flows):
    path, t, got = flows
    t2 = table(copy_of(path, tmp_path), clock)
    clock.t += 301                    # UDP (300 s) and ICMP (60 s) are dead, TCP established is not
    assert t2.gc() == 70
    assert len(t2) == 300
    clock.t += 10
    t3 = table(copy_of(path, tmp_path, "again.nat"), clock)
    assert t3.state["connections"] == 300 and t3.state["expired"] == 70


def test_garbage_over_entries_drops_the_invalid_and_keeps_the_valid(tmp_path, clock, flows):
    path, t, got = flows
    snap = copy_of(path, tmp_path)
    regions, _ = _nat_state_regions(4096)
    off, _ = regions["entries"]
    rnd = random.Random(16)
    with open(snap, "r+b") as f:
        for idx in (3, 77, 150, 301, 360):       # random bytes over five entries
            f.seek(off + idx * E)
            f.write(bytes(rnd.randrange(256) for _ in range(E)))
    t2 = table(snap, clock)
    st = t2.state
    assert st["adopted"]
    assert st["connections"] + st["invalid"] + st["expired"] >= len(got) - 5
    assert st["invalid"] >= 4 and st["connections"] >= len(got) - 5
    kept = 0
    for (src, sport, dst, dport, proto), (eip, xport) in got.items():
        e = t2.get(src, sport, dst, dport, proto)
        if e is not None:
            kept += 1
            assert (e.egress_ip, e.xport) == (eip, xport)
            assert t2.reverse(dst, dport if proto != "icmp" else 0, eip, xport, proto) == (src, sport)
    assert kept == st["connections"] == len(t2)
    t2.gc()
    assert len(t2) == kept


def _header(path):
    with open(path, "rb") as f:
        return bytearray(f.read(4096))


def _refused(tmp_path, clock, snap, words):
    t2 = table(snap, clock)
    st = t2.state
    assert not st["adopted"] and len(t2) == 0
    for w in words:
        assert w in st["reason"], st["reason"]
    assert str(snap) in st["message"] and "starts empty" in st["message"]
    assert os.path.exists(str(snap) + ".rejected")
    # the empty table works, and the new file is adopted next time
    assert t2.translate("10.0.0.1", 1234, REMOTE, 80)[0] == EGRESS
    again = copy_of(snap, tmp_path, "again.nat")
    assert table(again, clock).state["connections"] == 1


@pytest.mark.parametrize("kind", ["magic", "version", "layout", "boot", "truncated", "short", "capacity",
                                  "egress_record", "future"])
def test_bad_file_refused_with_reason_then_empty(tmp_path, clock, flows, kind):
    path, t, _ = flows
    snap = copy_of(path, tmp_path)
    h = _header(snap)
    kw = {}
    words = {"magic": ["magic"], "version": ["version 7"], "layout": ["layout checksum"],
             "boot": ["boot"], "truncated": ["truncated"], "short": ["truncated", "header"],
             "capacity": ["capacity 4096", "8192"], "egress_record": ["egress IP record 0"],
             "future": ["after now"]}[kind]
    if kind == "magic":
        h[0] ^= 0xFF
    elif kind == "version":
        h[8:12] = struct.pack("<I", 7)
    elif kind == "layout":
        h[16:24] = struct.pack("<Q", NAT_STATE_LAYOUT ^ 1)
    elif kind == "boot":
        h[32:72] = b"00000000-0000-0000-0000-000000000000".ljust(40, b"\0")
    elif kind == "capacity":
        kw["capacity"] = 8192
    elif kind == "future":
        h[80:88] = struct.pack("<Q", int((T0 + 100) * 1e9))
    if kind in ("magic", "version", "layout", "boot", "future"):
        with open(snap, "r+b") as f:
            f.write(h)
    elif kind == "truncated":
        os.truncate(snap, os.path.getsize(snap) - 4096)
    elif kind == "short":
        os.truncate(snap, 100)
    elif kind == "egress_record":
        with open(snap, "r+b") as f:
            f.seek(_nat_state_regions(4096)[0]["ext"][0])
            f.write(b"\x09")                     # family 9
    if kw:
        t2 = table(snap, clock, **kw)
        st = t2.state
        assert not st["adopted"] and all(w in st["reason"] for w in words), st
        assert len(t2) == 0
    else:
        _refused(tmp_path, clock, snap, words)


def test_random_garbage_file_is_refused(tmp_path, clock):
    snap = tmp_path / "junk.nat"
    snap.write_bytes(os.urandom(_nat_state_regions(4096)[1]))
    _refused(tmp_path, clock, snap, ["magic"])


def test_one_table_per_file(tmp_path, clock):
    path = tmp_path / "n.nat"
    t = table(path, clock)
    with pytest.raises(NatStateError, match="in use by another process"):
        table(path, clock)
    del t
    assert table(path, clock).state["adopted"]     # the lock went with the table


def test_configuration_changes_that_are_adopted(tmp_path, clock, flows):
    """New timeouts, seed, egress IPs and a per-source limit apply to the
    adopted table; the file's egress IPs keep their indexes."""
    path, t, got = flows
    snap = copy_of(path, tmp_path)
    t2 = NatTable([EGRESS2, EGRESS], capacity=4096, port_range=(40000, 40999), state_path=snap, clock=clock,
                  timeouts={"udp": 30}, seed=99, per_source_limit=400)
    assert t2.state["connections"] == len(got)
    assert t2.egress_ips == [EGRESS, EGRESS2]
    assert t2.stats["sources"] == len({k[0] for k in got})
    udp = ("10.1.0.1", 5000, "198.51.100.1", 53, "udp")
    assert t2.translate(*udp, egress_ip=EGRESS) == got[udp]
    assert t2.translate("10.3.0.1", 1, REMOTE, 80, egress_ip=EGRESS2)[0] == EGRESS2
    clock.t += 31                             # the new, shorter UDP timeout applies from the next packet
    assert t2.get("10.1.0.1", 5000, "198.51.100.1", 53, "udp") is None
    assert t2.get("10.1.0.1", 5001, "198.51.100.1", 53, "udp") is not None


def test_discard_state_removes_the_file(tmp_path, clock):
    path = tmp_path / "n.nat"
    t = table(path, clock)
    t.translate("10.0.0.1", 1, REMOTE, 80)
    t.discard_state()
    assert not path.exists()
    assert t.translate("10.0.0.1", 1, REMOTE, 80)[0] == EGRESS     # still works from its mapping


def test_adoption_after_churn_reuses_free_slots(tmp_path, clock):
    """Entries freed before the kill (a free list the file no longer
    trusts) are reused after adoption without touching live ones."""
    path = tmp_path / "n.nat"
    t = table(path, clock)
    keys = [(f"10.0.0.{i % 250 + 1}", 1000 + i, REMOTE, 80) for i in range(500)]
    got = {k: t.translate(*k) for k in keys}
    for k in keys[::2]:
        t.update_tcp(*k, "R")
    clock.t += 11
    t.gc()
    assert len(t) == 250
    t2 = table(copy_of(path, tmp_path), clock)
    assert t2.state["connections"] == 250
    new = [t2.translate(f"10.5.0.{i % 250 + 1}", 3000 + i, REMOTE, 80) for i in range(250)]
    assert len({x for _, x in new} | {got[k][1] for k in keys[1::2]}) == 500
    for k in keys[1::2]:
        assert t2.translate(*k) == got[k]
    assert t2.stats["entries"] == 500


def test_agent_state_path_and_cli_options():
    import argparse

    from egresscore.agent.host import nat_state_path
    from egresscore.cli import _add_agent

    assert nat_state_path("node3") == "/run/egresscore/node3.nat"
    assert nat_state_path("node3", "egc-lab-node3") == "/run/egresscore/node3@egc-lab-node3.nat"
    assert nat_state_path("node3", None, "/dev/shm/x.nat") == "/dev/shm/x.nat"
    assert nat_state_path("node3", None, False) is None
    p = argparse.ArgumentParser()
    _add_agent(p.add_subparsers())
    a = p.parse_args(["agent", "--node", "n", "--cluster", "c", "--policies", "p", "--keep-state",
                      "--nat-state", "/dev/shm/n.nat"])
    assert a.keep_state and a.nat_state == "/dev/shm/n.nat" and not a.no_nat_state


def test_insert_one_replicated_connection(clock):
    """NatTable.insert (nat_state_insert): a connection made elsewhere is
    checked like an adopted one, then translates both ways; a clash is refused."""
    t = NatTable([EGRESS], capacity=64, port_range=(40000, 40099), clock=clock)
    assert t.insert("10.0.0.1", 5555, REMOTE, 443, egress_ip=EGRESS, xport=40050, expires_in=100)
    assert t.translate("10.0.0.1", 5555, REMOTE, 443) == (EGRESS, 40050)
    assert t.reverse(REMOTE, 443, EGRESS, 40050) == ("10.0.0.1", 5555)
    assert t.translate("10.0.0.1", 5555, "198.51.100.7", 80)[1] == 40050       # EIM: the same mapping
    with pytest.raises(ValueError, match="invalid here"):                       # another endpoint's port
        t.insert("10.0.0.2", 1, REMOTE, 443, egress_ip=EGRESS, xport=40050, expires_in=100)
    with pytest.raises(ValueError, match="invalid here"):                       # outside the range
        t.insert("10.0.0.3", 1, REMOTE, 443, egress_ip=EGRESS, xport=39999, expires_in=100)
    with pytest.raises(ValueError, match="invalid here"):                       # longer than its timeout
        t.insert("10.0.0.4", 1, REMOTE, 53, "udp", egress_ip=EGRESS, xport=40001, expires_in=3600)
    assert len(t) == 2 and t.ports_in_use(EGRESS) == 1
    clock.t += 61              # the second (SYN_SENT, 60 s) dies; the inserted one, refreshed, lives on
    assert t.gc() == 1 and t.ports_in_use(EGRESS) == 1
    assert t.get("10.0.0.1", 5555, REMOTE, 443).state == "ESTABLISHED"


# -- bad state (issue 16, item 4): truncation mid-entry, another port range, flipped bytes, the seal ----------

# nat_state_hdr's fields (offset, bytes): the first and the last byte of each are flipped
_HDR = {"magic": (0, 8), "version": (8, 4), "hdr_size": (12, 4), "layout": (16, 8), "file_size": (24, 8),
        "boot_id": (32, 40), "created_unix": (72, 8), "created_mono": (80, 8), "adopted": (88, 8),
        "capacity": (96, 4), "n_ext": (100, 4), "index_slots": (104, 8), "src_slots": (112, 8), "seed": (120, 8),
        "timeouts": (128, 48), "src_limit": (176, 4), "port_lo": (180, 12), "port_hi": (192, 12)}
HDR_BYTES = sorted({o for off, n in _HDR.values() for o in (off, off + n - 1)} | {off + 3 for off, _ in _HDR.values()})
IDENTITY = range(80, 96)  # created_mono_ns, adopted_count: what ties a seal to its file


def _same_or_gone(t2, got):
    """Every connection of t2 is one of `got` with its mapping, and translates
    both ways as before: nothing translates with garbage.  Returns how many."""
    kept = 0
    for (src, sport, dst, dport, proto), (eip, xport) in got.items():
        e = t2.get(src, sport, dst, dport, proto)
        if e is None:
            continue
        kept += 1
        assert (e.egress_ip, e.xport) == (eip, xport)
        assert t2.reverse(dst, dport if proto != "icmp" else 0, eip, xport, proto) == (src, sport)
    assert kept == len(t2)
    return kept


def _sealed_copy(path, t, tmp_path, name="sealed.nat"):
    """A clean stop's file: sealed by its table, then copied with its seal."""
    s = t.seal_state()
    assert s["entries"] == 370 and s["groups"] == 6 and os.path.exists(str(path) + ".seal")
    dst = copy_of(path, tmp_path, name)
    shutil.copyfile(str(path) + ".seal", str(dst) + ".seal")
    return dst


def test_truncated_mid_entry_is_refused(tmp_path, clock, flows):
    path, t, _ = flows
    snap = copy_of(path, tmp_path)
    off, _ = _nat_state_regions(4096)[0]["entries"]
    os.truncate(snap, off + 37 * E + 17)           # the 38th entry cut in two
    _refused(tmp_path, clock, snap, ["truncated"])


def test_another_port_range_is_refused(tmp_path, clock, flows):
    """The agent claims the new range from the kernel: the file's ports, in the old one, would not be."""
    path, t, _ = flows
    snap = copy_of(path, tmp_path)
    t2 = table(snap, clock, port_range=(40000, 41999))
    st = t2.state
    assert not st["adopted"] and len(t2) == 0
    assert "tcp ports 40000-40999" in st["reason"] and "40000-41999" in st["reason"], st
    assert "starts empty" in st["message"] and os.path.exists(str(snap) + ".rejected")
    assert t2.translate("10.0.0.1", 1234, REMOTE, 80)[0] == EGRESS


def test_every_flipped_header_byte_is_refused_or_harmless(tmp_path, clock, flows):
    """A crash's file (no seal): each of the header's bytes flipped in turn is
    either refused with a reason (the table starts empty) or changes nothing
    a connection depends on (adopted, each one translating as before)."""
    path, t, got = flows
    base = copy_of(path, tmp_path, "base.nat")
    refused = harmless = 0
    for off in HDR_BYTES:
        snap = tmp_path / f"h{off}.nat"
        shutil.copyfile(base, snap)
        with open(snap, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x10]))
        t2 = table(snap, clock)
        st = t2.state
        if st["adopted"]:
            assert st["sealed"] is False and "checked entry by entry" in st["message"]
            _same_or_gone(t2, got)
            harmless += 1
        else:
            assert st["reason"] and "starts empty" in st["message"] and len(t2) == 0
            refused += 1
        del t2
    assert refused > len(HDR_BYTES) // 2 and harmless > 0, (refused, harmless)


def test_a_sealed_file_refuses_any_flipped_header_byte(tmp_path, clock, flows):
    path, t, got = flows
    base = _sealed_copy(path, t, tmp_path, "base.nat")
    for off in HDR_BYTES:
        snap = tmp_path / f"s{off}.nat"
        shutil.copyfile(base, snap)
        shutil.copyfile(str(base) + ".seal", str(snap) + ".seal")
        with open(snap, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x01]))
        t2 = table(snap, clock)
        st = t2.state
        assert not os.path.exists(str(snap) + ".seal")             # taken at open, whatever it says
        if off in IDENTITY and st["adopted"]:   # the seal is not this file's: ignored, entries checked one by one
            assert "seal is of another file" in st["message"], (off, st)
            assert _same_or_gone(t2, got) == len(got)
        else:
            assert not st["adopted"] and st["reason"] and len(t2) == 0, (off, st)
        del t2


def test_a_sealed_file_with_a_flipped_egress_record_byte_is_refused(tmp_path, clock, flows):
    path, t, _ = flows
    snap = _sealed_copy(path, t, tmp_path)
    with open(snap, "r+b") as f:
        f.seek(_nat_state_regions(4096)[0]["ext"][0] + 20)         # inside record 0's port range
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    _refused(tmp_path, clock, snap, ["egress IP records' checksum"])


def test_a_clean_stops_seal_is_verified_and_removed(tmp_path, clock, flows):
    path, t, got = flows
    snap = _sealed_copy(path, t, tmp_path)
    t2 = table(snap, clock)
    st = t2.state
    assert st["adopted"] and st["sealed"] and st["corrupt"] == 0 and st["connections"] == len(got)
    assert "sealed at a clean stop: checksums verified" in st["message"]
    assert not os.path.exists(str(snap) + ".seal")      # the file changes from now on: a crash leaves no seal
    assert _same_or_gone(t2, got) == len(got)


@pytest.mark.parametrize("field,at", [("pod address", 9), ("remote address", 13), ("expiry", 2),
                                      ("pod port", 16), ("remote port", 18), ("egress port", 20),
                                      ("counters", 41)])
def test_a_flipped_entry_byte_in_a_sealed_file_drops_its_group_only(tmp_path, clock, flows, field, at):
    """A byte the entry checks cannot catch (another pod address, another
    port that is free) would translate with garbage: the seal catches it."""
    path, t, got = flows
    snap = _sealed_copy(path, t, tmp_path)
    off, _ = _nat_state_regions(4096)[0]["entries"]
    victim = 100                                       # group 1: entries 64-127
    with open(snap, "r+b") as f:
        f.seek(off + victim * E + at)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x04]))
    t2 = table(snap, clock)
    st = t2.state
    assert st["adopted"] and st["sealed"] and st["corrupt"] == 64, st
    assert "1 group(s) of 64 entries failed their checksum, 64 corrupt entries dropped" in st["message"]
    assert _same_or_gone(t2, got) == len(got) - 64 == st["connections"]


def test_a_flipped_byte_in_a_free_slot_above_the_sealed_high_water_mark_is_dropped(tmp_path, clock, flows):
    path, t, got = flows
    snap = _sealed_copy(path, t, tmp_path)
    off, _ = _nat_state_regions(4096)[0]["entries"]
    with open(snap, "r+b") as f:                     # entry 400 (never used) made to look like a live one
        f.seek(off + 370 * E)
        f.write(open(snap, "rb").read()[off:off + E])
    t2 = table(snap, clock)
    assert t2.state["corrupt"] == 1 and _same_or_gone(t2, got) == len(got)


def test_a_corrupt_seal_is_ignored_and_said_so(tmp_path, clock, flows):
    path, t, got = flows
    snap = _sealed_copy(path, t, tmp_path)
    with open(str(snap) + ".seal", "r+b") as f:
        f.seek(50)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    t2 = table(snap, clock)
    st = t2.state
    assert st["adopted"] and st["sealed"] is False and "seal is corrupt (ignored)" in st["message"]
    assert _same_or_gone(t2, got) == len(got)
