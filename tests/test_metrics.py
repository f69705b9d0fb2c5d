"""Prometheus metrics: the collector over a fake stats provider, and over HTTP."""
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from egresscore import FlowLog, NatTable
from egresscore.metrics import MetricsServer, StatsCollector


def fake_stats():
    t = NatTable(["192.168.1.3", "192.168.1.100"], capacity=100, seed=1,
                 port_ranges={"udp": (40000, 40099)})
    for p in range(7):
        t.translate("10.0.1.93", 1000 + p, "203.0.113.10", 53, "udp", egress_ip="192.168.1.3")
    nat = t.stats
    nat["ports"] = t.port_usage()
    fl = FlowLog(16)
    fl._append(1)
    return {
        "verdicts": {"tx": {"packets": 10, "bytes": 1500}, "drop": {"packets": 3, "bytes": 180}},
        "drops": {"none": 0, "no_gateway": 2, "nat_exhausted": 1},
        "policies": {"egress-sample": {"packets": 8, "bytes": 1200}},
        "nat": nat,
        "egress_map": {"entries": 4},
        "rings": {"eth0": {"kernel_packets": 13, "kernel_drops": 5, "tx_full": 0}},
        "flow_log": {"dropped": 2, "ring": fl.stats},
    }


def samples(provider, node="node3"):
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(provider, node=node))
    text = generate_latest(reg).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "node")))] = s.value
            assert s.labels.get("node") == node
    return out


def test_collector_maps_every_counter():
    s = samples(fake_stats)
    assert s[("egresscore_stats_up", ())] == 1
    assert s[("egresscore_forward_count_total", (("verdict", "tx"),))] == 10
    assert s[("egresscore_forward_bytes_total", (("verdict", "drop"),))] == 180
    assert s[("egresscore_drop_count_total", (("reason", "no_gateway"),))] == 2
    assert ("egresscore_drop_count_total", (("reason", "none"),)) not in s
    assert s[("egresscore_policy_forward_bytes_total", (("policy", "egress-sample"),))] == 1200
    assert s[("egresscore_nat_entries", ())] == 7 and s[("egresscore_nat_capacity", ())] == 100
    assert s[("egresscore_nat_created_total", ())] == 7
    assert s[("egresscore_nat_gc_runs_total", ())] == 0
    assert s[("egresscore_nat_refused_total", (("reason", "nat_exhausted"),))] == 0
    assert s[("egresscore_nat_ports_in_use", (("egress_ip", "192.168.1.3"), ("proto", "udp")))] == 7
    assert s[("egresscore_nat_ports", (("egress_ip", "192.168.1.3"), ("proto", "udp")))] == 100
    assert s[("egresscore_nat_ports_in_use", (("egress_ip", "192.168.1.100"), ("proto", "tcp")))] == 0
    assert s[("egresscore_egress_map_entries", ())] == 4
    assert s[("egresscore_ring_kernel_drops_total", (("ring", "eth0"),))] == 5
    assert s[("egresscore_flowlog_records_total", (("kind", "start"),))] == 1
    assert s[("egresscore_flowlog_lost_total", (("stage", "queue"),))] == 2


def test_a_failing_provider_reports_down():
    def broken():
        raise RuntimeError("agent gone")

    assert samples(broken) == {("egresscore_stats_up", ()): 0}


def test_partial_stats_and_bad_provider():
    assert samples(lambda: {"drops": {"ttl_exceeded": 4}})[
        ("egresscore_drop_count_total", (("reason", "ttl_exceeded"),))] == 4
    with pytest.raises(TypeError):
        StatsCollector(42)
    with pytest.raises(ValueError):
        MetricsServer(dict, 70000)


def test_http_endpoint_on_loopback():
    with MetricsServer(fake_stats, 0, "127.0.0.1", node="node3") as m:
        assert m.url.startswith("http://127.0.0.1:")
        body = urllib.request.urlopen(m.url, timeout=5).read().decode()
    assert 'egresscore_drop_count_total{node="node3",reason="no_gateway"} 2.0' in body
    assert 'egresscore_nat_entries{node="node3"} 7.0' in body


def test_reload_counters():
    reloads = {"accepted": 3, "rejected": 2, "last_accepted_at": 100.0, "last_rejected_at": 200.5,
               "last_error": "p.yaml: no such file or folder"}
    s = samples(lambda: {"reloads": reloads})
    assert s[("egresscore_config_reloads_total", (("result", "accepted"),))] == 3
    assert s[("egresscore_config_reloads_total", (("result", "rejected"),))] == 2
    assert s[("egresscore_config_last_reload_successful", ())] == 0
    assert s[("egresscore_config_last_reload_rejected_timestamp_seconds", ())] == 200.5
    assert s[("egresscore_config_last_reload_success_timestamp_seconds", ())] == 100.0
    reloads.update(last_accepted_at=300.0)
    assert samples(lambda: {"reloads": reloads})[("egresscore_config_last_reload_successful", ())] == 1
    fresh = samples(lambda: {"reloads": {"accepted": 0, "rejected": 0, "last_accepted_at": None,
                                         "last_rejected_at": None, "last_error": None}})
    assert fresh[("egresscore_config_reloads_total", (("result", "rejected"),))] == 0
    assert ("egresscore_config_last_reload_successful", ()) not in fresh


def test_pod_conn_refusals_by_source():
    stats = {"nat": {"refused_by_source": {"10.0.1.93": 5, "10.0.2.32": 1}, "refused_other_sources": 2}}
    s = samples(lambda: stats)
    assert s[("egresscore_nat_pod_conn_refused_total", (("source", "10.0.1.93"),))] == 5
    assert s[("egresscore_nat_pod_conn_refused_total", (("source", "10.0.2.32"),))] == 1
    assert s[("egresscore_nat_pod_conn_refused_total", (("source", "other"),))] == 2
    assert not any(k[0].startswith("egresscore_nat_pod_conn") for k in samples(lambda: {"nat": {
        "refused_by_source": {}, "refused_other_sources": 0}}))


def test_spilled_mappings_by_egress_ip():
    stats = {"nat": {"spill": {"192.168.1.100": {"spill_to": ["192.168.1.101"], "spilled_in": 0},
                               "192.168.1.101": {"spill_to": [], "spilled_in": 4}}}}
    s = samples(lambda: stats)
    assert s[("egresscore_nat_spilled_mappings_total", (("egress_ip", "192.168.1.101"),))] == 4
    assert s[("egresscore_nat_spilled_mappings_total", (("egress_ip", "192.168.1.100"),))] == 0
    assert not any(k[0].startswith("egresscore_nat_spilled") for k in samples(lambda: {"nat": {"spill": {}}}))


def test_gateway_health_series():
    health = {"enabled": True, "down": ["node3"],
              "gateways": [{"node": "node3", "ip": "192.168.1.3", "state": "down", "why": "probes"},
                           {"node": "node4", "ip": "192.168.1.4", "state": "up", "why": ""}],
              "probes": {"sent": 40, "received": 31, "answered": 7}}
    s = samples(lambda: {"gateway_health": health})
    assert s[("egresscore_gateway_up", (("gateway", "node3"), ("gateway_ip", "192.168.1.3")))] == 0
    assert s[("egresscore_gateway_up", (("gateway", "node4"), ("gateway_ip", "192.168.1.4")))] == 1
    assert s[("egresscore_gateway_heartbeats_total", (("kind", "received"),))] == 31
    off = samples(lambda: {"gateway_health": {"enabled": False, "gateways": [
        {"node": "node3", "ip": "192.168.1.3", "state": "not probed"}], "probes": {}}})
    assert not any(k[0] == "egresscore_gateway_up" for k in off)
