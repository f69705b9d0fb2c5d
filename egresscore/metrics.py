"""Prometheus metrics of an agent, read at scrape time from a stats provider.

Nothing is counted here: the datapath keeps its counters in C and a scrape
asks `provider()` (e.g. the agent's `counters`) for a fresh dict, so the
metrics cost nothing between scrapes.  The dict's keys (all optional):

    "verdicts":   {verdict name: {"packets": n, "bytes": n}}  forwarded / passed / dropped
    "drops":      {drop reason name: packets}                 (DROP_REASON_NAMES)
    "policies":   {policy name: {"packets": n, "bytes": n, "connections": n}}
                  traffic steered by a policy (the agent counts it from the flow
                  records: ended connections' packets and bytes)
    "policy_counters": {policy name: {"redirect" | "egress" | "reply":
                  {"packets": n, "bytes": n}, "drops": {reason: n},
                  "connections_opened": n, "connections_live": n,
                  "egress_ips": {ip: {proto: (in use, in range)}}}}
                  the datapath's own per-policy counters, counted in C
                  (egresscore.policystats.PolicyCounters.by_policy)
    "nat":        NatTable.stats, plus "ports": NatTable.port_usage()
    "egress_map": {"entries": n}  (or the number itself)
    "rings":      {ring name: PacketRing.stats}
    "flow_log":   FlowLogger.stats (or FlowLog.stats)
    "reloads":    Agent.reload_stats(): {"accepted": n, "rejected": n,
                  "last_accepted_at": t, "last_rejected_at": t, "last_error": str}
                  (t: Unix time or None), policy/cluster reloads and set_policies
    "gateway_health": Agent.gateway_health(): {"gateways": [{node, ip, state}],
                  "probes": {"sent": n, "received": n, "answered": n}}
    "source":     Agent's cluster-state source (egresscore.agent.feed.FeedStats): name,
                  connected, disconnects, resyncs, changes_applied, objects_rejected,
                  last_revision

Metric names follow Cilium's where one exists (cilium_forward_count_total,
cilium_drop_count_total, ...), with the prefix egresscore_ and a `node` label.
"""

from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

__all__ = ["StatsCollector", "MetricsServer"]

log = logging.getLogger("egresscore.metrics")


def _n(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class StatsCollector:
    """A prometheus_client collector over `provider()` (a callable returning
    the counters dict described in this module's docstring)."""

    def __init__(self, provider, *, node=None, prefix="egresscore"):
        if not callable(provider):
            raise TypeError("provider must be a callable returning a counters dict")
        self.provider = provider
        self.node = node
        self.prefix = prefix

    def describe(self):
        return []       # metrics vary with the provider: collect at scrape time only

    def _family(self, cls, name, doc, labels=()):
        base = ["node"] if self.node is not None else []
        return cls(f"{self.prefix}_{name}", doc, labels=base + list(labels))

    def _add(self, fam, value, *labels):
        base = [self.node] if self.node is not None else []
        fam.add_metric(base + [str(x) for x in labels], _n(value))

    def collect(self):
        try:
            s = self.provider() or {}
        except Exception:
            log.exception("metrics: the stats provider failed")
            fam = self._family(GaugeMetricFamily, "stats_up", "1 if the agent's counters could be read")
            self._add(fam, 0)
            yield fam
            return
        up = self._family(GaugeMetricFamily, "stats_up", "1 if the agent's counters could be read")
        self._add(up, 1)
        yield up
        yield from self._verdicts(s.get("verdicts"))
        yield from self._drops(s.get("drops"))
        yield from self._policies(s.get("policies"))
        yield from self._policy_counters(s.get("policy_counters"))
        yield from self._nat(s.get("nat"))
        yield from self._egress_map(s.get("egress_map"))
        yield from self._rings(s.get("rings"))
        yield from self._flow_log(s.get("flow_log"))
        yield from self._reloads(s.get("reloads"))
        yield from self._gateway_health(s.get("gateway_health"))
        yield from self._source(s.get("source"))

    # ------------------------------------------------------------ families

    def _verdicts(self, v):
        if not v:
            return
        pk = self._family(CounterMetricFamily, "forward_count",
                          "Packets handled by the datapath, by verdict", ["verdict"])
        by = self._family(CounterMetricFamily, "forward_bytes",
                          "Bytes handled by the datapath, by verdict", ["verdict"])
        for name, c in sorted(v.items()):
            if isinstance(c, dict):
                self._add(pk, c.get("packets", 0), name)
                if "bytes" in c:
                    self._add(by, c["bytes"], name)
            else:
                self._add(pk, c, name)
        yield pk
        yield by

    def _drops(self, d):
        if not d:
            return
        fam = self._family(CounterMetricFamily, "drop_count",
                           "Packets dropped by the datapath, by reason", ["reason"])
        for reason, n in sorted(d.items()):
            if reason != "none":
                self._add(fam, n, reason)
        yield fam

    def _policies(self, p):
        if not p:
            return
        pk = self._family(CounterMetricFamily, "policy_forward_count",
                          "Packets steered by an egress gateway policy", ["policy"])
        by = self._family(CounterMetricFamily, "policy_forward_bytes",
                          "Bytes steered by an egress gateway policy", ["policy"])
        conns = self._family(CounterMetricFamily, "policy_connections",
                             "Connections started under an egress gateway policy (flow log)",
                             ["policy"])
        for name, c in sorted(p.items()):
            if isinstance(c, dict):
                self._add(pk, c.get("packets", 0), name)
                self._add(by, c.get("bytes", 0), name)
                if "connections" in c:
                    self._add(conns, c["connections"], name)
            else:
                self._add(pk, c, name)
        yield pk
        yield by
        if conns.samples:
            yield conns

    def _policy_counters(self, p):
        """The datapath's per-policy counters: direction redirect (source
        node, through the tunnel to the gateway), egress (gateway, SNATed to
        the destination), reply (gateway, back to the pod); bytes as the
        pod's interface counts them."""
        if not p:
            return
        pk = self._family(CounterMetricFamily, "policy_packets",
                          "Packets of an egress gateway policy, by direction (redirect: source node to the "
                          "gateway; egress: SNATed to the destination; reply: back to the pod)",
                          ["policy", "direction"])
        by = self._family(CounterMetricFamily, "policy_bytes",
                          "Bytes of an egress gateway policy (pod-side frames), by direction",
                          ["policy", "direction"])
        opened = self._family(CounterMetricFamily, "policy_connections_opened",
                              "Connections SNATed under an egress gateway policy", ["policy"])
        live = self._family(GaugeMetricFamily, "policy_connections_live",
                            "Connections of an egress gateway policy in the NAT table", ["policy"])
        drops = self._family(CounterMetricFamily, "policy_drops",
                             "Packets of an egress gateway policy dropped, by reason", ["policy", "reason"])
        used = self._family(GaugeMetricFamily, "policy_egress_ip_ports_in_use",
                            "SNAT ports in use on an egress IP of the policy (shared by the policies using "
                            "that IP), by protocol", ["policy", "egress_ip", "proto"])
        size = self._family(GaugeMetricFamily, "policy_egress_ip_ports",
                            "SNAT ports in the range of an egress IP of the policy, by protocol",
                            ["policy", "egress_ip", "proto"])
        for name, c in sorted(p.items()):
            for d in ("redirect", "egress", "reply"):
                v = c.get(d) or {}
                self._add(pk, v.get("packets", 0), name, d)
                self._add(by, v.get("bytes", 0), name, d)
            self._add(opened, c.get("connections_opened", 0), name)
            self._add(live, c.get("connections_live", 0), name)
            for reason, n in sorted((c.get("drops") or {}).items()):
                self._add(drops, n, name, reason)
            for ip, by_proto in sorted((c.get("egress_ips") or {}).items()):
                for proto, (u, total) in sorted(by_proto.items()):
                    self._add(used, u, name, ip, proto)
                    self._add(size, total, name, ip, proto)
        yield from (pk, by, opened, live, drops, used, size)

    def _nat(self, n):
        if not n:
            return
        for key, name, doc in (("entries", "nat_entries", "Connections in the NAT table"),
                               ("capacity", "nat_capacity", "Connections the NAT table can hold"),
                               ("mappings", "nat_mappings", "Endpoint-independent SNAT mappings")):
            if key in n:
                g = self._family(GaugeMetricFamily, name, doc)
                self._add(g, n[key])
                yield g
        for key, name, doc in (("created", "nat_created", "Connections created"),
                               ("expired", "nat_expired", "Connections collected after expiry"),
                               ("gc_runs", "nat_gc_runs", "NAT garbage-collection passes"),
                               ("lookups", "nat_lookups", "NAT lookups"),
                               ("hits", "nat_hits", "NAT lookups that found a live connection")):
            if key in n:
                c = self._family(CounterMetricFamily, name, doc)
                self._add(c, n[key])
                yield c
        refused = n.get("refused")
        if refused:
            c = self._family(CounterMetricFamily, "nat_refused",
                             "Packets the NAT table refused, by reason (nat_exhausted: no free port)",
                             ["reason"])
            for reason, v in sorted(refused.items()):
                self._add(c, v, reason)
            yield c
        by_source = n.get("refused_by_source")
        if by_source or n.get("refused_other_sources"):
            c = self._family(CounterMetricFamily, "nat_pod_conn_refused",
                             "New connections refused by the per-pod limit, by source (pod) IP "
                             "(source \"other\": pods beyond the 256 counted by name)", ["source"])
            for src, v in sorted((by_source or {}).items()):
                self._add(c, v, src)
            if n.get("refused_other_sources"):
                self._add(c, n["refused_other_sources"], "other")
            yield c
        ports = n.get("ports")
        if ports:
            used = self._family(GaugeMetricFamily, "nat_ports_in_use",
                                "SNAT ports (echo ids) in use, by egress IP and protocol",
                                ["egress_ip", "proto"])
            size = self._family(GaugeMetricFamily, "nat_ports",
                                "SNAT ports in the range, by egress IP and protocol",
                                ["egress_ip", "proto"])
            for ip, by_proto in sorted(ports.items()):
                for proto, (u, total) in sorted(by_proto.items()):
                    self._add(used, u, ip, proto)
                    self._add(size, total, ip, proto)
            yield used
            yield size
        spill = n.get("spill")
        if spill:
            c = self._family(CounterMetricFamily, "nat_spilled_mappings",
                             "New SNAT mappings placed on this egress IP because the policy's egress IP had no "
                             "free port (egresscore.io/extra-egress-ips)", ["egress_ip"])
            for ip, s in sorted(spill.items()):
                self._add(c, s.get("spilled_in", 0), ip)
            yield c

    def _egress_map(self, e):
        if e is None:
            return
        g = self._family(GaugeMetricFamily, "egress_map_entries", "Entries in the egress policy map")
        self._add(g, e.get("entries", 0) if isinstance(e, dict) else e)
        yield g

    def _rings(self, r):
        if not r:
            return
        drops = self._family(CounterMetricFamily, "ring_kernel_drops",
                             "Packets the kernel dropped because an AF_PACKET ring was full",
                             ["ring"])
        pkts = self._family(CounterMetricFamily, "ring_kernel_packets",
                            "Packets the kernel passed to an AF_PACKET ring", ["ring"])
        txf = self._family(CounterMetricFamily, "ring_tx_full",
                           "Frames not sent because the TX ring was full", ["ring"])
        for name, st in sorted(r.items()):
            self._add(drops, st.get("kernel_drops", 0), name)
            self._add(pkts, st.get("kernel_packets", 0), name)
            self._add(txf, st.get("tx_full", 0), name)
        yield drops
        yield pkts
        yield txf

    def _flow_log(self, f):
        if not f:
            return
        ring = f.get("ring", f)
        rec = self._family(CounterMetricFamily, "flowlog_records",
                           "Flow-log records written by the datapath, by kind", ["kind"])
        for kind, v in sorted(ring.get("appended", {}).items()):
            self._add(rec, v, kind)
        yield rec
        lost = self._family(CounterMetricFamily, "flowlog_lost",
                            "Flow-log records lost: ring full (ring) or sink too slow (queue)",
                            ["stage"])
        self._add(lost, ring.get("lost", 0), "ring")
        if "dropped" in f:
            self._add(lost, f["dropped"], "queue")
        yield lost
        sup = self._family(CounterMetricFamily, "flowlog_drops_suppressed",
                           "Drop records left out by the rate limit, by drop reason", ["reason"])
        for reason, v in sorted(ring.get("suppressed", {}).items()):
            self._add(sup, v, reason)
        yield sup


    def _reloads(self, r):
        # named after Prometheus's own prometheus_config_last_reload_* metrics
        if not r:
            return
        c = self._family(CounterMetricFamily, "config_reloads",
                         "Policy and cluster reloads (reload, SIGHUP, set_policies), by result: a rejected "
                         "one changed nothing", ["result"])
        self._add(c, r.get("accepted", 0), "accepted")
        self._add(c, r.get("rejected", 0), "rejected")
        yield c
        acc, rej = r.get("last_accepted_at"), r.get("last_rejected_at")
        if acc is not None or rej is not None:
            ok = self._family(GaugeMetricFamily, "config_last_reload_successful",
                              "1 if the last reload was accepted, 0 if it was rejected")
            self._add(ok, 1 if rej is None or (acc is not None and acc > rej) else 0)
            yield ok
        for value, name, doc in ((acc, "config_last_reload_success_timestamp_seconds",
                                  "When the last reload was accepted (Unix time)"),
                                 (rej, "config_last_reload_rejected_timestamp_seconds",
                                  "When the last reload was rejected (Unix time)")):
            if value is not None:
                g = self._family(GaugeMetricFamily, name, doc)
                self._add(g, value)
                yield g

    def _source(self, src):
        """The cluster-state source (egresscore.sources): connection, resyncs, changes, rejections."""
        if not src:
            return
        name = src.get("name", "files")
        up = self._family(GaugeMetricFamily, "source_connected", "1 while the cluster-state source is connected",
                          ["source"])
        self._add(up, 1 if src.get("connected") else 0, name)
        yield up
        for key, doc in (("disconnects", "Times the source lost its store (the state in force was kept)"),
                         ("resyncs", "Full snapshots reconciled (start, compaction, relist)"),
                         ("changes_applied", "Object changes applied incrementally"),
                         ("objects_rejected", "Objects left out: malformed, too large, or this node made invalid")):
            c = self._family(CounterMetricFamily, f"source_{key}", doc, ["source"])
            self._add(c, src.get(key, 0), name)
            yield c
        rev = str(src.get("last_revision") or "")
        if rev.isdigit():
            g = self._family(GaugeMetricFamily, "source_last_revision", "The store revision last applied",
                             ["source"])
            self._add(g, int(rev), name)
            yield g


    def _gateway_health(self, h):
        if not h:
            return
        up = self._family(GaugeMetricFamily, "gateway_up",
                          "1 if gateway selection counts this gateway candidate as up (probes and liveness), "
                          "0 if it passes it over", ["gateway", "gateway_ip"])
        for g in h.get("gateways", ()):
            if g.get("state") in ("up", "down"):
                self._add(up, 1 if g["state"] == "up" else 0, g["node"], g["ip"])
        yield up
        probes = h.get("probes") or {}
        hb = self._family(CounterMetricFamily, "gateway_heartbeats",
                          "Gateway heartbeats: sent and answered (received) by this node's prober, and "
                          "answered for other nodes (answered)", ["kind"])
        for kind in ("sent", "received", "answered"):
            if kind in probes:
                self._add(hb, probes[kind], kind)
        yield hb


class MetricsServer:
    """Serves StatsCollector(provider) over HTTP (prometheus_client) on
    addr:port; port 0 picks a free port (see .port).  stop() closes it."""

    def __init__(self, provider, port, addr="127.0.0.1", *, node=None):
        from prometheus_client import start_http_server

        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be an int in 0-65535, not {port!r}")
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = StatsCollector(provider, node=node)
        self.registry.register(self.collector)
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        self.addr = addr
        self.port = self._server.server_address[1]

    @property
    def url(self):
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
