"""The egress map's vocabulary: Cilium's sentinels and the type of an entry.

One place for what "no gateway", "excluded" and "egress IP not found" are
(pkg/egressgateway's GatewayNotFoundIPv4, ExcludedCIDRIPv4; the egress IP
left unset) and for the lookup statuses, for the compiler, the core's
EgressMap (its ipaddress constants are made from these strings; the C
values are checked equal by tests/test_egress_map.py), the renderers and
the lab.  Strings, because the compiler works on address strings (it is
benchmarked).  Imports nothing from the package, so every layer (and the
core) may use it.
"""
import ipaddress
from typing import NamedTuple

__all__ = [
    "EGRESS_IP_NOT_FOUND_V4",
    "EGRESS_IP_NOT_FOUND_V6",
    "EGRESS_JSON_KEYS",
    "EGRESS_STATUS_EXCLUDED",
    "EGRESS_STATUS_MATCH",
    "EGRESS_STATUS_NO_GATEWAY",
    "EGRESS_STATUS_NO_MATCH",
    "EgressEntry",
    "EXCLUDED_CIDR",
    "EXCLUDED_CIDR_V6",
    "GATEWAY_LABELS",
    "GATEWAY_NOT_FOUND",
    "GATEWAY_NOT_FOUND_V6",
    "POLICY_ID_MAX",
    "POLICY_ID_NONE",
]

GATEWAY_NOT_FOUND = "0.0.0.0"  # Cilium's GatewayNotFoundIPv4: a policy matched, no gateway node
EXCLUDED_CIDR = "0.0.0.1"  # Cilium's ExcludedCIDRIPv4 (also the IPv6 map's gateway IP, as Cilium lists it)
# an IPv6 entry's gateway IP is IPv4 as Cilium's (these two sentinels
# included); egresscore.EgressMap stores it as :: / ::1 / ::ffff:a.b.c.d and
# also takes an IPv6 gateway, these two its sentinels
GATEWAY_NOT_FOUND_V6 = "::"
EXCLUDED_CIDR_V6 = "::1"
EGRESS_IP_NOT_FOUND_V4 = "0.0.0.0"  # the egress IP is known on the gateway node only
EGRESS_IP_NOT_FOUND_V6 = "::"

# how `cilium-dbg bpf egress list` shows the sentinel gateway IPs (mapGatewayIP), and its JSON keys
GATEWAY_LABELS = {GATEWAY_NOT_FOUND: "Not Found", EXCLUDED_CIDR: "Excluded CIDR"}
EGRESS_JSON_KEYS = ("SourceIP", "DestCIDR", "EgressIP", "GatewayIP")

# an entry's policy id: the compiler's small number for the policy that wrote
# it (stable while the policy exists), carried by the egress map so the
# datapath counts traffic per policy; 0 is "none" (entries written by hand),
# 0xffff the flow log's "no policy"
POLICY_ID_NONE = 0
POLICY_ID_MAX = 0xfffe

# what a lookup finds (EgressMap.lookup_batch's status; the core's EGRESS_STATUS_*)
EGRESS_STATUS_NO_MATCH = 0  # no policy: default path (masquerade)
EGRESS_STATUS_MATCH = 1  # redirect to the gateway, SNAT to the egress IP
EGRESS_STATUS_EXCLUDED = 2  # excluded CIDR: default path
EGRESS_STATUS_NO_GATEWAY = 3  # policy matched, no gateway: drop

_NOT_FOUND = (GATEWAY_NOT_FOUND, GATEWAY_NOT_FOUND_V6)
_EXCLUDED = (EXCLUDED_CIDR, EXCLUDED_CIDR_V6)


class EgressEntry(NamedTuple):
    """One egress map entry, like a line of `cilium-dbg bpf egress list`:
    the key (source IP, destination CIDR) and the value (egress IP, gateway
    IP or a sentinel), and the id of the policy that wrote it (0: none).
    The compiler makes them of strings (an IPv6 entry's gateway IPv4, as
    Cilium lists it), egresscore.EgressMap returns them of ipaddress
    objects, all four in the entry's family (listed() reads them back as the
    compiler's)."""

    source: object
    destination: object
    egress_ip: object
    gateway_ip: object
    policy_id: int = POLICY_ID_NONE

    @property
    def excluded(self) -> bool:
        """An excluded-CIDR entry (gateway 0.0.0.1 / ::1): the traffic stays on the default path."""
        g = self.gateway_ip
        return g in _EXCLUDED if isinstance(g, str) else int(g) == 1

    @property
    def no_gateway(self) -> bool:
        """A policy matched but no gateway node exists (gateway 0.0.0.0 / ::): the datapath drops it."""
        g = self.gateway_ip
        return g in _NOT_FOUND if isinstance(g, str) else int(g) == 0

    @property
    def status(self) -> int:
        """The EGRESS_STATUS_* a lookup that lands on this entry returns."""
        return (EGRESS_STATUS_NO_GATEWAY if self.no_gateway else EGRESS_STATUS_EXCLUDED if self.excluded
                else EGRESS_STATUS_MATCH)

    def listed(self) -> "EgressEntry":
        """This entry of strings as Cilium lists it and the compiler makes it:
        an IPv6 entry's gateway IPv4 (:: / ::1 / ::ffff:a.b.c.d, as
        egresscore.EgressMap stores it, read as 0.0.0.0 / 0.0.0.1 / a.b.c.d)."""
        g = ipaddress.ip_address(self.gateway_ip)
        if g.version == 6:
            g = (EXCLUDED_CIDR if self.excluded else GATEWAY_NOT_FOUND if self.no_gateway
                 else g.ipv4_mapped or g)
        return EgressEntry(str(self.source), str(self.destination), str(self.egress_ip), str(g), self.policy_id)

    def row(self):
        """(source IP, destination CIDR, egress IP, gateway IP) strings as
        `cilium-dbg bpf egress list` shows them (the sentinels by name)."""
        e = self.listed()
        return e.source, e.destination, e.egress_ip, GATEWAY_LABELS.get(e.gateway_ip, e.gateway_ip)
