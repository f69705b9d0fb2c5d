"""Per-policy counters by name: the datapath's policy slots, named through the compiler's policy ids.

The datapath counts in C, per policy id (Datapath.policy_counters: slot N is
id N up to 4096, slot 0 sums larger ids).  This module turns those slots
into {policy name: counters} for the agent's stats, the Prometheus metrics
and `egresscore stats --by-policy`, adds each policy's egress IPs on this
node with their port use (the NAT pools), and subtracts what a slot held
when its id was handed to a new policy (ids of removed policies are reused),
so a policy's counters start at zero.
"""
from __future__ import annotations

POLICY_COUNTED = 4096   # ids with a slot of their own (src/includes/policy.pxd)
DIRECTIONS = ("redirect", "egress", "reply")

__all__ = ["DIRECTIONS", "PolicyCounters", "policy_slot"]


def policy_slot(policy_id: int) -> int:
    """The counter slot of a policy id (the C policy_slot)."""
    return policy_id if policy_id <= POLICY_COUNTED else 0


def _minus(rec, base):
    if not base:
        return rec
    out = {d: {k: max(0, rec[d][k] - base[d][k]) for k in ("packets", "bytes")} for d in DIRECTIONS}
    out["drops"] = {r: n - base["drops"].get(r, 0) for r, n in rec["drops"].items()
                    if n - base["drops"].get(r, 0) > 0}
    for k in ("connections_opened", "connections_live"):
        out[k] = max(0, rec[k] - base[k])
    return out


def _empty():
    rec = {d: {"packets": 0, "bytes": 0} for d in DIRECTIONS}
    rec.update(drops={}, connections_opened=0, connections_live=0)
    return rec


class PolicyCounters:
    """Names a datapath's per-policy slots for one compiler.

    `counters(slots=None)` is Datapath.policy_counters; `compiler` gives the
    policy ids and the gateways (with `node`, the egress IPs this node SNATs
    each policy to); `port_usage()` is NatTable.port_usage.  Hook
    `on_policy_id` into the compiler (Compiler.on_policy_id) so a reused id
    starts from the counts it had when reused."""

    def __init__(self, counters, compiler, *, node=None, port_usage=None):
        self._counters = counters
        self.compiler = compiler
        self.node = node
        self._port_usage = port_usage
        self._base = {}         # slot -> counters at the time its id went to a new policy
        self._seen = {}         # policy id -> the name it was last given

    def on_policy_id(self, name, policy_id):
        """Compiler hook: `name` got `policy_id`; a reused id's slot is
        baselined now, before the policy's entries reach the map."""
        old = self._seen.get(policy_id)
        self._seen[policy_id] = name
        if old is None or old == name:
            return
        slot = policy_slot(policy_id)
        if slot == 0:
            return              # the overflow slot is shared: never baselined
        self._base[slot] = self._counters([slot]).get(slot)

    def egress_ips(self, name):
        """The egress IPs this node SNATs policy `name`'s traffic to."""
        if self.node is None:
            return []
        out = []
        for g in self.compiler.gateways(name):
            if g.node == self.node:
                for ip in (g.egress_ip4, g.egress_ip6):
                    if ip and ip not in ("0.0.0.0", "::") and ip not in out:
                        out.append(ip)
        return out

    def by_policy(self):
        """{policy name: {"id", "redirect" | "egress" | "reply": {"packets",
        "bytes"}, "drops": {reason: n}, "connections_opened",
        "connections_live", "egress_ips": {ip: {proto: (in use, in range)}}}}
        for every policy in force; ids above 4096 share one slot, shown
        under the name "(overflow)"."""
        ids = self.compiler.policy_ids
        for name, pid in ids.items():
            self._seen.setdefault(pid, name)
        slots = self._counters()
        ports = self._port_usage() if self._port_usage is not None else {}
        out = {}
        for name, pid in sorted(ids.items()):
            slot = policy_slot(pid)
            if slot == 0:
                continue
            rec = _minus(slots.get(slot) or _empty(), self._base.get(slot))
            rec["id"] = pid
            rec["egress_ips"] = {ip: ports.get(ip, {}) for ip in self.egress_ips(name)}
            out[name] = rec
        if 0 in slots:
            rec = dict(slots[0])
            rec["id"] = 0
            rec["egress_ips"] = {}
            out["(overflow)"] = rec
        return out
