"""`egresscore apply -f` / `delete` / `get` against a real etcd, and `agent --source etcd://` at start."""
import json

import pytest
from etcd_helper import (
    EtcdServer,
    etcd_server,  # noqa: F401 - the fixture
)

pytest.importorskip("etcd3gw")

from egresscore.cli import main  # noqa: E402


def test_apply_get_delete(etcd_server, capsys):  # noqa: F811
    store = ["--store", etcd_server.url + "/egc", "--cluster-name", "lab"]
    assert main(["apply", "-f", "examples/cluster.yaml", "-f", "examples/egress-sample.yaml", *store]) == 0
    out = capsys.readouterr().out
    assert "policies/egress-sample configured" in out and "pods/default/app1 configured" in out
    assert main(["get", "policies", *store]) == 0
    assert capsys.readouterr().out.split() == ["NAME", "PROBLEM", "egress-sample"]
    assert main(["get", "nodes", "-o", "json", *store]) == 0
    assert [n["name"] for n in json.loads(capsys.readouterr().out)] == ["node1", "node2", "node3", "node4"]
    assert main(["delete", "policy", "egress-sample", *store]) == 0
    assert main(["delete", "policy", "egress-sample", *store]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["get", "policies", *store]) == 0
    assert capsys.readouterr().out.split() == ["NAME", "PROBLEM"]


def test_apply_of_a_bad_file_writes_nothing(etcd_server, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "bad.yaml"
    bad.write_text(open("examples/egress-sample.yaml").read() + "---\nkind: CiliumEgressGatewayPolicy\n"
                   "apiVersion: cilium.io/v2\nmetadata: {name: two}\nspec: {destinationCIDRs: [x]}\n")
    assert main(["apply", "-f", str(bad), "--store", etcd_server.url]) == 1
    assert "policies/two" in capsys.readouterr().err
    assert main(["get", "policies", "--store", etcd_server.url]) == 0
    assert capsys.readouterr().out.split() == ["NAME", "PROBLEM"]


def test_agent_with_an_unreachable_store_names_it_and_does_not_fall_back(tmp_path, capsys):
    server = EtcdServer(tmp_path)  # not started
    code = main(["agent", "--node", "node1", "--source", server.url, "--no-control-socket"])
    err = capsys.readouterr().err
    assert code == 1 and f"127.0.0.1:{server.port}" in err and "unreachable" in err
    assert main(["agent", "--node", "node1", "--source", server.url, "--cluster", "examples/cluster.yaml"]) == 2


def test_source_counters_in_the_metrics():
    pytest.importorskip("prometheus_client")
    from egresscore.metrics import StatsCollector

    stats = {"source": {"name": "etcd", "connected": True, "disconnects": 2, "resyncs": 3, "changes_applied": 7,
                        "objects_rejected": 1, "last_revision": "42"}}
    got = {(s.name, s.labels.get("source")): s.value for m in StatsCollector(lambda: stats, node="n1").collect()
           for s in m.samples}
    assert got[("egresscore_source_connected", "etcd")] == 1
    assert got[("egresscore_source_disconnects_total", "etcd")] == 2
    assert got[("egresscore_source_resyncs_total", "etcd")] == 3
    assert got[("egresscore_source_changes_applied_total", "etcd")] == 7
    assert got[("egresscore_source_objects_rejected_total", "etcd")] == 1
    assert got[("egresscore_source_last_revision", "etcd")] == 42
