"""The EgressMap the compiler tests write into, and its content as the compiler's Targets."""

import ipaddress

from egresscore.compiler import EXCLUDED_CIDR, Target

try:
    from egresscore import EgressMap  # the LPM core
except ImportError:  # pragma: no cover - only until the LPM branch is merged
    from typing import NamedTuple

    class _Entry(NamedTuple):
        source: str
        destination: str
        egress_ip: str
        gateway_ip: str

        @property
        def excluded(self):
            return self.gateway_ip == EXCLUDED_CIDR

        @property
        def no_gateway(self):
            return self.gateway_ip == "0.0.0.0"

    class EgressMap:
        """A dict with the EgressMap contract, for the tests only."""

        def __init__(self):
            self._d = {}

        def set(self, source, destination, egress_ip, gateway_ip):
            self._d[(source, destination)] = _Entry(source, destination, egress_ip, gateway_ip)

        def set_excluded(self, source, destination):
            egress = "::" if ":" in source else "0.0.0.0"
            self._d[(source, destination)] = _Entry(source, destination, egress, EXCLUDED_CIDR)

        def remove(self, source, destination):
            del self._d[(source, destination)]

        def lookup(self, source, destination):
            ip = ipaddress.ip_address(destination)
            best = None
            for (s, d), e in self._d.items():
                net = ipaddress.ip_network(d)
                if s == source and net.version == ip.version and ip in net:
                    if best is None or net.prefixlen > ipaddress.ip_network(best.destination).prefixlen:
                        best = e
            return best

        def entries(self):
            return sorted(self._d.values())

        def clear(self):
            self._d.clear()

        def __len__(self):
            return len(self._d)

        def __contains__(self, key):
            return key in self._d


def map_state(em):
    """{(source, destination): Target} read back from an EgressMap."""
    out = {}
    for e in em.entries():
        src, dst = str(e.source), str(e.destination)
        if e.excluded:
            t = Target("::" if ":" in src else "0.0.0.0", EXCLUDED_CIDR)
        else:
            t = Target(str(e.egress_ip), str(e.gateway_ip))
        out[(src, dst)] = t
    assert len(out) == len(em)
    return out
