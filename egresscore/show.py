"""Rows and tables: the one renderer of what the CLI, the demo and the lab print.

Tables are aligned like Go's tabwriter.NewWriter(out, 5, 0, 3, ' ', 0), as
cilium-dbg prints them; the egress list, the NAT list and the stats lines
are built here from the data the compiler, the egress map or a running
agent's control socket hand over.
"""
from ._core import EgressMap
from .types import EGRESS_JSON_KEYS

EGRESS_HEADER = ("Source IP", "Destination CIDR", "Egress IP", "Gateway IP")
EGRESS_POLICY_HEADER = EGRESS_HEADER + ("Policy (ID)",)


def format_table(rows, header):
    """Aligned like Go's tabwriter.NewWriter(out, 5, 0, 3, ' ', 0), as cilium-dbg prints."""
    lines = [tuple(header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(5, max(len(line[i]) for line in lines) + 3) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        out.append("".join(cell.ljust(w) for cell, w in zip(line, widths)) + line[-1])
    return "\n".join(out) + "\n"


def egress_table(rows):
    """`cilium-dbg bpf egress list` text of (source, destination, egress IP, gateway IP) rows;
    rows with a fifth column (egress_policy_rows) get a Policy (ID) column."""
    return format_table(rows, EGRESS_POLICY_HEADER if rows and len(rows[0]) == 5 else EGRESS_HEADER)


GATEWAY_HEALTH_HEADER = ("Gateway node", "Node IP", "State", "Why")


def gateway_health_table(health):
    """The gateway candidates of an agent's gateway_health answer (or of
    `--down`), as a table under the egress list: which gateways are down."""
    rows = [(g["node"], g["ip"], g["state"], g.get("why") or "-") for g in health.get("gateways", ())]
    if not rows:
        return ""
    title = "Gateways" + ("" if health.get("enabled", True) else " (gateway health off: Cilium's choice)")
    return f"\n{title}:\n" + format_table(rows, GATEWAY_HEALTH_HEADER)


def offline_gateway_health(compiler):
    """gateway_health_table's input for a compiler with a `down` set (egress list --down)."""
    down = compiler.down
    return {"enabled": True, "gateways": [
        {"node": n, "ip": ip, "state": "down" if n in down else "up", "why": "--down" if n in down else ""}
        for n, ip in sorted(compiler.gateway_candidates().items())]}


def egress_map_rows(egress_map):
    """The rows of an egresscore.EgressMap, as `cilium-dbg bpf egress list` shows them."""
    return [e.row() for e in egress_map.entries()]


def egress_rows(compiler):
    """(source, destination, egress IP, gateway IP) rows as `cilium-dbg bpf egress list` shows them,
    read back from an egresscore.EgressMap the compiler filled."""
    em = EgressMap()
    compiler.attach(em)
    return egress_map_rows(em)


def egress_dicts(rows):
    """The rows as cilium-dbg's JSON objects (SourceIP, DestCIDR, EgressIP, GatewayIP)."""
    return [dict(zip(EGRESS_JSON_KEYS, r)) for r in rows]


def rows_of_dicts(dicts):
    """egress_dicts' inverse: a running agent's egress_list answer as rows."""
    return [tuple(d[k] for k in EGRESS_JSON_KEYS) for d in dicts]


def _fmt_endpoint(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def nat_list_lines(entries):
    """`cilium-dbg bpf nat list` lines (an OUT and an IN line per connection)
    from the agent's nat_list answer."""
    lines = []
    for e in entries:
        pod = _fmt_endpoint(e["src"], e["sport"])
        remote = _fmt_endpoint(e["dst"], e["dport"])
        egress = _fmt_endpoint(e["egress_ip"], e["xport"])
        tail = (f"Created={int(e['age'])}sec ago Expires={int(e['expires_in'])}sec "
                f"State={e['state']}")
        p = e["proto"].upper()
        lines.append(f"{p} OUT {pod} -> {remote} XLATE_SRC {egress} {tail} "
                     f"Packets={e.get('pkts_out', 0)} Bytes={e.get('bytes_out', 0)}")
        lines.append(f"{p} IN {remote} -> {egress} XLATE_DST {pod} {tail} "
                     f"Packets={e.get('pkts_in', 0)} Bytes={e.get('bytes_in', 0)}")
    return lines


def _flatten(prefix, value, out):
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out.append((prefix, value))


POLICY_STATS_HEADER = ("Policy", "ID", "Egress IPs (TCP ports in use)", "Opened", "Live", "Redirect pkts/bytes",
                       "Egress pkts/bytes", "Reply pkts/bytes", "Drops")


def policy_stats_table(by_policy):
    """`egresscore stats --by-policy`: one row per policy of an agent's
    policy_counters (the datapath's per-policy counters)."""
    rows = []
    for name in sorted(by_policy):
        c = by_policy[name]
        ips = ", ".join(f"{ip} ({(ports.get('tcp') or (0, 0))[0]}/{(ports.get('tcp') or (0, 0))[1]})"
                        for ip, ports in sorted((c.get("egress_ips") or {}).items())) or "-"
        dirs = [f"{(c.get(d) or {}).get('packets', 0)}/{(c.get(d) or {}).get('bytes', 0)}"
                for d in ("redirect", "egress", "reply")]
        drops = ", ".join(f"{r}={n}" for r, n in sorted((c.get("drops") or {}).items())) or "-"
        rows.append((name, c.get("id", "-"), ips, c.get("connections_opened", 0), c.get("connections_live", 0),
                     *dirs, drops))
    return format_table(rows, POLICY_STATS_HEADER)


def egress_policy_rows(rows, policy_ids, names):
    """Egress rows with the policy that wrote each entry appended: `names`
    maps a policy id to its name (0: written by hand, "-")."""
    return [(*r, f"{names.get(pid, '?')} ({pid})" if pid else "-") for r, pid in zip(rows, policy_ids)]


def stats_lines(stats):
    """The agent's stats dict as `dotted.key  value` lines, keys sorted and aligned."""
    rows = []
    _flatten("", stats, rows)
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{k.ljust(width)}  {v}" for k, v in rows]
