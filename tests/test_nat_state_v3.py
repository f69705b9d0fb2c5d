"""Upgrade across the 56-byte entries: a format 3 NAT state file (80-byte
entries, as main wrote it) is converted on adoption, keeping its connections.

The fixture tests/data/nat_state_v3.bin.gz was written by main's format 3
build (tests/data/make_nat_state_v3.py says how); its flows and their egress
ports are in nat_state_v3.json.  A state file is adopted only on the boot and
monotonic clock it was written on, so the test rebases those onto this boot
(the header's boot id and creation time, each live entry's expiry) through
the format 3 layout, written out here rather than taken from the code under test."""

import gzip
import json
import logging
import os
import struct
import time
from pathlib import Path

import pytest

from egresscore import NatTable

DATA = Path(__file__).parent / "data"
FLOWS = json.loads((DATA / "nat_state_v3.json").read_text())
CAP = FLOWS["capacity"]
FLOWS = FLOWS["flows"]
# format 3: a 4 KiB header, 1024 egress IP records of 44 bytes (page aligned),
# then the entries, 80 bytes each: src[16] dst[16] expires(u64 at 32) ...
# state(u8 at 54) ...; the header's boot id at 32 (40 bytes), created_mono_ns at 80
V3_ENTRIES = 4096 + 45056
V3_ENTRY = 80
V3_SIZE = V3_ENTRIES + 20480


def boot_id():
    with open("/proc/sys/kernel/random/boot_id", "rb") as f:
        return f.read().strip()[:39]


def v3_file(tmp_path, edit=None):
    """The fixture, rebased onto this boot and clock; `edit(bytearray)` changes it."""
    raw = bytearray(gzip.decompress((DATA / "nat_state_v3.bin.gz").read_bytes()))
    assert len(raw) == V3_SIZE and struct.unpack_from("<I", raw, 8)[0] == 3
    (created,) = struct.unpack_from("<Q", raw, 80)
    shift = time.monotonic_ns() - 1_000_000_000 - created
    struct.pack_into("<Q", raw, 80, created + shift)
    raw[32:72] = boot_id().ljust(40, b"\0")
    for i in range(CAP):
        off = V3_ENTRIES + i * V3_ENTRY
        if raw[off + 54]:                                    # not free
            (exp,) = struct.unpack_from("<Q", raw, off + 32)
            struct.pack_into("<Q", raw, off + 32, exp + shift)
    if edit is not None:
        edit(raw)
    path = tmp_path / "node.nat"
    path.write_bytes(bytes(raw))
    return path


def held(t):
    """The fixture's flows that translate to their old egress IP and port and
    whose replies map back to the pod (nothing new created)."""
    n = len(t)
    got = []
    for src, sport, dst, dport, proto, eip, xport in FLOWS:
        back = t.reverse(dst, dport, eip, xport, proto)
        if back is None:                                     # not held
            continue
        assert back == (src, sport), (back, src, sport)
        assert t.translate(src, sport, dst, dport, proto, egress_ip=eip) == (eip, xport)
        got.append(src)
    assert len(t) == n
    return got


def test_a_format_3_file_is_converted_with_its_connections_and_ports(tmp_path, caplog):
    path = v3_file(tmp_path)
    with caplog.at_level(logging.INFO, logger="egresscore"):
        t = NatTable(capacity=CAP, state_path=path)
    st = t.state
    assert st["adopted"] and st["converted_from"] == 3 and st["reason"] is None, st
    assert (st["connections"], st["invalid"], st["expired"], st["full"], st["ipv6_full"]) == (17, 0, 0, 0, 0)
    assert st["message"].startswith(f"NAT state file {path}: format 3 (80-byte entries) converted to format 4: "
                                    f"17 connections")
    assert st["message"] in caplog.text
    assert len(t) == 17 and t.egress_ips == ["198.51.100.1", "198.51.100.2", "2001:db8:e::1"]
    # counters and expiry carried over (the fixture's first flow: one 100-byte
    # packet out, one 60-byte reply)
    e = next(e for e in t.entries() if e.src == "10.0.0.1")
    assert (e.pkts_out, e.bytes_out, e.pkts_in, e.bytes_in) == (1, 100, 1, 60), e
    assert e.expires_in > 0 and e.age >= 0
    assert len(held(t)) == 17
    # the file is format 4 now (the old one is gone): the next table adopts it as such
    assert not os.path.exists(str(path) + ".format3") and not os.path.exists(str(path) + ".rejected")
    del t
    with open(path, "rb") as f:
        assert struct.unpack_from("<I", f.read(12), 8)[0] == 4
    t2 = NatTable(capacity=CAP, state_path=path)
    assert t2.state["adopted"] and "converted_from" not in t2.state and t2.state["connections"] == 17
    assert len(held(t2)) == 17


def test_ipv6_connections_beyond_the_pool_are_dropped_and_counted(tmp_path):
    t = NatTable(capacity=CAP, ipv6_capacity=2, state_path=v3_file(tmp_path))
    st = t.state
    assert (st["connections"], st["full"], st["ipv6_full"], st["invalid"]) == (14, 3, 3, 0), st
    assert "3 beyond the table, 3 of them IPv6 beyond its IPv6 pool" in st["message"]
    got = held(t)
    assert len(got) == 14 and all(":" not in s for s in got[:12]) and len([s for s in got if ":" in s]) == 2
    assert t.stats["ipv6_full"] == 0                  # not new connections refused


def test_an_invalid_entry_is_dropped_the_others_converted(tmp_path):
    def bad_state(raw):
        raw[V3_ENTRIES + 3 * V3_ENTRY + 54] = 99        # entry 3: no such state
    t = NatTable(capacity=CAP, state_path=v3_file(tmp_path, bad_state))
    st = t.state
    assert (st["connections"], st["invalid"]) == (16, 1), st
    assert len(held(t)) == 16


@pytest.mark.parametrize("how, why", [
    ("truncated", f"truncated: 60000 bytes, a table of capacity {CAP} needs {V3_SIZE}"),
    ("ext", "egress IP record 1 is corrupt (family 9)"),
    ("capacity", f"capacity {CAP}, this table asks for 512"),
])
def test_a_truncated_or_corrupt_format_3_file_is_refused(tmp_path, how, why):
    def edit(raw):
        if how == "ext":
            raw[4096 + 44] = 9                          # egress IP record 1's family
    path = v3_file(tmp_path, edit)
    if how == "truncated":
        os.truncate(path, 60000)
    t = NatTable(capacity=512 if how == "capacity" else CAP, state_path=path)
    st = t.state
    assert st["adopted"] is False and why in st["reason"], st
    assert f"NAT state file {path} refused: " in st["message"] and "the table starts empty" in st["message"]
    assert os.path.exists(str(path) + ".rejected") and len(t) == 0


def test_a_format_2_file_is_refused_by_name(tmp_path):
    def v2(raw):
        struct.pack_into("<I", raw, 8, 2)
    t = NatTable(capacity=CAP, state_path=v3_file(tmp_path, v2))
    assert t.state["adopted"] is False and "format version 2" in t.state["reason"]
