"""The core's shared tables and conversions (src/includes/): one drop-reason
table behind the enum, the names and every counter array; one address and
MAC parser for every concern."""
import os
import re

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

import egresscore
from egresscore import Datapath, EgressMap, NatTable, PacketBatch, VxlanTemplate, _core

DEF = os.path.join(os.path.dirname(__file__), os.pardir, "src", "includes", "drop_reasons.def")


def table():
    """(code, Python name) rows of src/includes/drop_reasons.def, the one list."""
    rows = []
    with open(DEF, encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                code, _cname, name = line.split()[:3]
                rows.append((int(code), name))
    return rows


def test_names_and_count_come_from_the_one_table():
    rows = table()
    assert [c for c, _ in rows] == list(range(len(rows)))
    assert _core.DROP_REASON_NAMES == tuple(name for _, name in rows)
    assert _core.DROP_REASON_COUNT == len(rows) == len(set(_core.DROP_REASON_NAMES))
    assert _core.DROP_REASON_NAMES[0] == "none" and _core.DROP_REASON_NAMES[17] == "spoofed"


def test_counters_are_sized_and_named_by_the_table():
    assert len(PacketBatch(4).counters) == _core.DROP_REASON_COUNT
    dp = Datapath("192.168.1.1", "02:00:00:00:00:01", EgressMap(), NatTable())
    dp.add_pod_port(1, "10.0.1.5", "02:00:00:00:01:01")
    # a pod frame from an address that is not the pod's: dropped as spoofed
    frame = bytes(Ether(src="02:00:00:00:01:05", dst="02:00:00:00:01:01")
                  / IP(src="10.0.1.99", dst="203.0.113.10") / UDP(sport=5000, dport=7) / b"hiya")
    verdict, reason, _ = dp.process(frame, 1)
    assert (verdict, reason) == ("drop", "spoofed")
    drops = dp.counters()["drops"]
    assert drops == {"spoofed": 1}
    assert set(drops) <= set(_core.DROP_REASON_NAMES)


@pytest.mark.parametrize("mac", ["02:ec:c0:a8:01:fe", "02-ec-c0-a8-01-fe", "02-EC-C0-A8-01-FE",
                                 bytes.fromhex("02ecc0a801fe")])
def test_one_mac_parser_takes_colons_and_dashes(mac):
    t = VxlanTemplate(mac, "02:00:00:00:00:02", "192.168.1.1", "192.168.1.2", 2)
    assert bytes(t.header[6:12]) == bytes.fromhex("02ecc0a801fe")
    dp = Datapath("192.168.1.1", mac, EgressMap(), NatTable())
    dp.set_router(mac)


@pytest.mark.parametrize("mac", ["02:ec:c0:a8:01", "02:ec:c0:a8:01:fe:00", "02:ec:c0:a8:01:xx",
                                 "02ec.c0a8.01fe", "002:ec:c0:a8:01:fe", b"\x02\xec"])
def test_a_bad_mac_is_refused_naming_the_argument(mac):
    with pytest.raises(ValueError, match="router mac"):
        Datapath("192.168.1.1", "02:00:00:00:00:01", EgressMap(), NatTable()).set_router(mac)


def test_one_address_parser_names_the_argument_and_the_family():
    with pytest.raises(ValueError, match=re.escape("node_ip must be an IPv4 address")):
        Datapath("2001:db8::1", "02:00:00:00:00:01", EgressMap(), NatTable())
    with pytest.raises(ValueError, match="egress IP"):
        NatTable().add_egress_ip("192.168.1.300")
    nat = NatTable()
    for ip in ("192.168.1.100", 0xC0A80165, bytes([192, 168, 1, 102]), "2001:db8::5"):
        nat.add_egress_ip(ip)


def test_c_errors_map_to_exceptions_in_one_place():
    """errno -> OSError subclass / MemoryError / ValueError; drop codes ->
    PacketDropped or NatRefused (src/includes/errors.pxi)."""
    with pytest.raises(egresscore.PacketDropped) as e:
        egresscore.parse(b"\x00" * 10)
    assert e.value.reason == _core.DROP_REASON_NAMES[e.value.code] == "malformed"
    nat = NatTable(capacity=1)
    nat.add_egress_ip("192.168.1.100")
    nat.translate("10.0.1.5", 1000, "203.0.113.1", 80, "udp", egress_ip="192.168.1.100", now=1.0)
    with pytest.raises(egresscore.NatRefused) as r:
        nat.translate("10.0.1.6", 1000, "203.0.113.1", 80, "udp", egress_ip="192.168.1.100", now=1.0)
    assert r.value.reason == "nat_table_full"
