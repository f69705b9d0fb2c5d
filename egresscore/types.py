"""The egress map's vocabulary: Cilium's sentinels and the value of an entry.

One place for what "no gateway", "excluded" and "egress IP not found" are
(pkg/egressgateway's GatewayNotFoundIPv4, ExcludedCIDRIPv4; the egress IP
left unset), for the compiler, the renderers and the lab.  Strings, because
the compiler works on address strings (it is benchmarked).  Imports nothing
from the package, so every layer (and the core) may use it.
"""
from typing import NamedTuple

__all__ = [
    "EGRESS_IP_NOT_FOUND_V4",
    "EGRESS_IP_NOT_FOUND_V6",
    "EGRESS_JSON_KEYS",
    "EXCLUDED_CIDR",
    "EXCLUDED_CIDR_V6",
    "GATEWAY_LABELS",
    "GATEWAY_NOT_FOUND",
    "GATEWAY_NOT_FOUND_V6",
    "Target",
    "egress_row",
    "map_row",
    "target_of",
]

GATEWAY_NOT_FOUND = "0.0.0.0"  # Cilium's GatewayNotFoundIPv4: a policy matched, no gateway node
EXCLUDED_CIDR = "0.0.0.1"  # Cilium's ExcludedCIDRIPv4 (also the IPv6 map's gateway IP, as Cilium lists it)
# egresscore.EgressMap keeps an entry's four addresses in one family: an IPv6
# entry stores these two as :: and ::1 (an IPv4 gateway IP as ::ffff:a.b.c.d)
GATEWAY_NOT_FOUND_V6 = "::"
EXCLUDED_CIDR_V6 = "::1"
EGRESS_IP_NOT_FOUND_V4 = "0.0.0.0"  # the egress IP is known on the gateway node only
EGRESS_IP_NOT_FOUND_V6 = "::"

# how `cilium-dbg bpf egress list` shows the sentinel gateway IPs (mapGatewayIP), and its JSON keys
GATEWAY_LABELS = {GATEWAY_NOT_FOUND: "Not Found", EXCLUDED_CIDR: "Excluded CIDR"}
EGRESS_JSON_KEYS = ("SourceIP", "DestCIDR", "EgressIP", "GatewayIP")

_V6_GATEWAY = {EXCLUDED_CIDR: EXCLUDED_CIDR_V6, GATEWAY_NOT_FOUND: GATEWAY_NOT_FOUND_V6}


class Target(NamedTuple):
    """The value of one egress map entry, as Cilium lists it: the egress IP
    and the IPv4 gateway IP (or a sentinel).  The key is (source IP,
    destination CIDR)."""

    egress_ip: str
    gateway_ip: str

    @property
    def excluded(self) -> bool:
        return self.gateway_ip == EXCLUDED_CIDR

    @property
    def no_gateway(self) -> bool:
        return self.gateway_ip == GATEWAY_NOT_FOUND


def map_row(key, t: Target):
    """(source, destination, egress IP, gateway IP) for egresscore.EgressMap:
    an IPv6 entry's gateway IP IPv4-mapped, its sentinels :: / ::1."""
    gw = t.gateway_ip
    if ":" in key[0]:
        gw = _V6_GATEWAY.get(gw) or "::ffff:" + gw
    return key[0], key[1], t.egress_ip, gw


def target_of(entry) -> Target:
    """An egresscore.EgressEntry read back as the compiler's Target (IPv4 gateway IP)."""
    gw = entry.gateway_ip
    if gw.version == 6:
        if entry.excluded:
            return Target(str(entry.egress_ip), EXCLUDED_CIDR)
        if entry.no_gateway:
            return Target(str(entry.egress_ip), GATEWAY_NOT_FOUND)
        if gw.ipv4_mapped is not None:
            gw = gw.ipv4_mapped
    return Target(str(entry.egress_ip), str(gw))


def egress_row(entry):
    """(source IP, destination CIDR, egress IP, gateway IP) strings of one
    egresscore.EgressEntry, as `cilium-dbg bpf egress list` shows them."""
    t = target_of(entry)
    return str(entry.source), str(entry.destination), t.egress_ip, GATEWAY_LABELS.get(t.gateway_ip, t.gateway_ip)
