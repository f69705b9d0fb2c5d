import json
import os
import subprocess
import sys

import pytest
from conftest import needs_netns

from egresscore.cli import main
from egresscore.show import format_table

ROOT = os.path.join(os.path.dirname(__file__), "..")
CLUSTER = os.path.join(ROOT, "examples", "cluster.yaml")
SAMPLE = os.path.join(ROOT, "examples", "egress-sample.yaml")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def agent_kwargs(monkeypatch):
    """The keyword arguments `egresscore agent` passes to Agent: a stand-in records them and
    stops the command (exit 1) before anything starts."""
    import egresscore.agent as agent_mod

    seen = {}

    def fake_agent(node, cluster, policies, **kw):
        seen.update(kw)
        raise agent_mod.AgentError("stopped by the test")

    monkeypatch.setattr(agent_mod, "Agent", fake_agent)
    return seen


def test_egress_list_prints_cilium_dbg_table(capsys):
    code, out, err = run(capsys, "egress", "list", "--cluster", CLUSTER, "--policies", SAMPLE)
    assert code == 0 and err == ""
    assert out == (
        "Source IP   Destination CIDR   Egress IP     Gateway IP\n"
        "10.0.1.93   203.0.113.0/24     192.168.1.3   192.168.1.3\n"
        "10.0.1.93   203.0.113.128/25   192.168.1.3   Excluded CIDR\n"
    )


def test_egress_list_as_seen_from_a_source_node_and_as_json(capsys):
    code, out, err = run(capsys, "egress", "ls", "--cluster", CLUSTER, "--policies", SAMPLE,
                         "--node", "node1", "-o", "json")
    assert code == 0
    assert json.loads(out) == [
        {"SourceIP": "10.0.1.93", "DestCIDR": "203.0.113.0/24", "EgressIP": "0.0.0.0", "GatewayIP": "192.168.1.3"},
        {"SourceIP": "10.0.1.93", "DestCIDR": "203.0.113.128/25", "EgressIP": "0.0.0.0",
         "GatewayIP": "Excluded CIDR"},
    ]


NOWHERE = """
---
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata: {name: nowhere}
spec:
  selectors: [{podSelector: {}}]
  destinationCIDRs: ["198.51.100.0/24"]
  egressGateway: {nodeSelector: {matchLabels: {role: none}}}
"""


def test_egress_list_sorted_and_not_found(capsys, tmp_path):
    policies = tmp_path / "p.yaml"
    policies.write_text(open(SAMPLE).read() + NOWHERE)
    code, out, err = run(capsys, "egress", "list", "--cluster", CLUSTER, "--policies", str(policies))
    assert code == 0
    assert "policy 'nowhere': no node matches" in err
    lines = out.splitlines()
    assert lines[1:] == [
        "10.0.1.93   198.51.100.0/24    0.0.0.0       Not Found",
        "10.0.1.93   203.0.113.0/24     192.168.1.3   192.168.1.3",
        "10.0.1.93   203.0.113.128/25   192.168.1.3   Excluded CIDR",
        "10.0.2.32   198.51.100.0/24    0.0.0.0       Not Found",
    ]


def test_egress_list_rejects_the_whole_set_for_one_bad_document(capsys, tmp_path):
    """As the agent would: nothing is listed, one line says which document and field."""
    policies = tmp_path / "p.yaml"
    policies.write_text(open(SAMPLE).read() + NOWHERE + """
---
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata: {name: broken}
spec:
  selectors: [{podSelector: {}}]
  destinationCIDRs: ["198.51.100.0/24"]
  egressGateway: {nodeSelector: {}, interface: eth1, egressIP: 192.168.1.100}
""")
    code, out, err = run(capsys, "egress", "list", "--cluster", CLUSTER, "--policies", str(policies))
    assert (code, out) == (1, "")
    assert err == (f"egresscore: error: {policies}: document 3 (line 42): policy 'broken': spec.egressGateway: "
                   "can't specify both an interface and an egress IP\n")


def test_no_entries_and_unknown_node(capsys, tmp_path):
    folder = tmp_path / "policies"
    folder.mkdir()  # an empty folder: no policies (a file removed from a folder removes its policies)
    code, out, err = run(capsys, "egress", "list", "--cluster", CLUSTER, "--policies", str(folder))
    assert (code, out, err) == (0, "", "No entries found.\n")
    code, out, err = run(capsys, "egress", "list", "--cluster", CLUSTER, "--policies", SAMPLE, "--node", "node9")
    assert code == 1 and "no node 'node9'" in err and "node1, node2, node3" in err


def test_format_table_follows_go_tabwriter():
    assert format_table([("a", "b", "c", "d")], header=("h1", "header2", "x", "last")) == (
        "h1   header2   x    last\n"
        "a    b         c    d\n"
    )


@pytest.mark.parametrize("argv", [["--help"], ["egress", "--help"], ["egress", "list", "--help"],
                                  ["validate", "--help"]])
def test_help_everywhere(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: egresscore" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    assert main(["egress"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["egress", "list", "--cluster", CLUSTER])
    assert info.value.code == 2
    assert "--policies" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cluster_text, message",
    [
        (None, "cluster.yaml: no such file"),
        ("nodes: [{name: a, internalIP: 1.2.3}]", "'1.2.3' is not an IP address"),
        ("nodes: [", "invalid YAML"),
    ],
)
def test_bad_input_errors_go_to_stderr_without_traceback(tmp_path, cluster_text, message):
    cluster = tmp_path / "cluster.yaml"
    if cluster_text is not None:
        cluster.write_text(cluster_text)
    proc = subprocess.run([sys.executable, "-m", "egresscore", "egress", "list", "--cluster", str(cluster),
                           "--policies", SAMPLE], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("egresscore: error: ")


def test_bad_policy_files_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n---\n: [\n")
    proc = subprocess.run([sys.executable, "-m", "egresscore", "egress", "list", "--cluster", CLUSTER,
                           "--policies", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "document 1 (line 2): kind: 'Pod' is not 'CiliumEgressGatewayPolicy'" in proc.stderr
    assert "document 2 (line 4): invalid YAML" in proc.stderr


@needs_netns
def test_validate_checks_the_host_interfaces(capsys, tmp_path):
    from netns_helper import dummy_netns

    policies = tmp_path / "p.yaml"
    policies.write_text(open(SAMPLE).read().replace("egressIP: 192.168.1.3", "egressIP: 192.168.1.100"))
    args = ["validate", "--cluster", CLUSTER, "--policies", str(policies), "--node", "node3"]
    with dummy_netns("ok", ["192.168.1.3/24", "192.168.1.100/24"]) as ns:
        code, out, err = run(capsys, *args, "--netns", ns)
    assert code == 0, err
    assert out == "ok: policy 'egress-sample': egress IP 192.168.1.100 on interface eth0\n"
    with dummy_netns("missing", ["192.168.1.3/24"]) as ns:
        code, out, err = run(capsys, *args, "--netns", ns)
    assert code == 1
    assert ("policy 'egress-sample': egress IP 192.168.1.100 is not on any interface of node node3" in err
            and "SNAT cannot work" in err)
    with dummy_netns("node1", ["192.168.1.1/24"]) as ns:
        code, out, err = run(capsys, "validate", "--cluster", CLUSTER, "--policies", SAMPLE, "--node", "node1",
                             "--netns", ns)
    assert code == 0 and "node node1 is the gateway of no egress gateway policy" in out


def test_validate_unknown_netns_is_a_clean_error(capsys):
    code, out, err = run(capsys, "validate", "--cluster", CLUSTER, "--policies", SAMPLE, "--node", "node3",
                         "--netns", "egc-ctl-does-not-exist")
    assert code == 1 and "no network namespace named 'egc-ctl-does-not-exist'" in err
    from pyroute2 import netns
    assert "egc-ctl-does-not-exist" not in netns.listnetns()  # reading never creates one


def _cli(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "egresscore", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def _bad_policy_cases():
    from input_cases import POLICY_CASES

    return POLICY_CASES


# a file removed from a folder is no error: it removes its policies (tested in test_inputs)
_CLI_BAD_CASES = [(case, command) for case in _bad_policy_cases()
                  for command in ("egress list", "validate", "folder")
                  if not (command == "folder" and case[0] == "removed")]


@pytest.mark.parametrize(("case", "command"), _CLI_BAD_CASES, ids=[f"{c[0]}-{cmd}" for c, cmd in _CLI_BAD_CASES])
def test_each_bad_policy_kind_is_one_line_and_exit_1(tmp_path, case, command):
    """`egress list` and `validate` (a file, or a folder holding it): one line naming the file, no
    traceback, nothing listed, never a hang (a FIFO) nor a MemoryError (/dev/zero)."""
    from input_cases import GOOD_POLICY

    name, make, message, _ = case
    bad = tmp_path / "p.yaml"
    bad.write_text(GOOD_POLICY)
    make(str(bad))
    target = str(tmp_path) if command == "folder" else str(bad)
    argv = (["validate", "--node", "node3"] if command == "validate" else ["egress", "list"])
    proc = _cli(*argv, "--cluster", CLUSTER, "--policies", target)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"egresscore: error: {bad}") and message in line


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "cluster_unknown_field", "cluster_duplicate_node",
                                  "cluster_broken_yaml"])
def test_each_bad_cluster_kind_is_one_line_and_exit_1(tmp_path, kind):
    import yaml
    from input_cases import CLUSTER_CASES, POLICY_CASES

    path = tmp_path / "cluster.yaml"
    path.write_text(open(CLUSTER).read())
    cases = {c[0]: c for c in CLUSTER_CASES}
    if kind in cases:
        cases[kind][1](str(path), yaml.safe_load(open(CLUSTER)))
        message = cases[kind][2]
    else:
        _, make, message, _ = {c[0]: c for c in POLICY_CASES}[kind]
        make(str(path))
    for argv in (["egress", "list"], ["validate", "--node", "node3"]):
        proc = _cli(*argv, "--cluster", str(path), "--policies", SAMPLE)
        assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"egresscore: error: {path}: ") and message in line


def test_dev_zero_as_policies_is_a_clean_error():
    proc = _cli("egress", "list", "--cluster", CLUSTER, "--policies", "/dev/zero")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert proc.stderr == "egresscore: error: /dev/zero: not a regular file (a character device)\n"


def test_agent_with_a_bad_policy_file_does_not_start(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(open(SAMPLE).read().replace("203.0.113.0/24", "203.0.113.0/33"))
    proc = _cli("agent", "--node", "node1", "--cluster", CLUSTER, "--policies", str(bad), "--no-control-socket")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == (f"egresscore: error: {bad}: document 1 (line 15): policy 'egress-sample': "
                           "spec.destinationCIDRs[0]: '203.0.113.0/33' is not a CIDR\n")


def test_agent_nat_capacity_and_pod_limit_flags(capsys, agent_kwargs):
    """--nat-capacity and --pod-conn-limit reach the Agent; bad values are
    usage errors that name the flag (nothing is started)."""
    import egresscore.agent as agent_mod

    seen = agent_kwargs
    base = ("agent", "--node", "node3", "--cluster", CLUSTER, "--policies", SAMPLE, "--no-control-socket")
    assert run(capsys, *base)[0] == 1
    assert seen["nat_capacity"] == agent_mod.DEFAULT_NAT_CAPACITY >= 1_000_000 and seen["pod_conn_limit"] is None
    assert run(capsys, *base, "--nat-capacity", "2000000", "--pod-conn-limit", "500")[0] == 1
    assert (seen["nat_capacity"], seen["pod_conn_limit"]) == (2_000_000, 500)
    for flag, value, msg in (("--nat-capacity", "268435455", "out of range 1-268435454"),
                             ("--nat-capacity", "lots", "not a whole number"),
                             ("--pod-conn-limit", "0", "must be at least 1")):
        with pytest.raises(SystemExit) as exc:
            main([*base, flag, value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: " in err and msg in err


def test_agent_nat_ipv6_capacity_flag(capsys, agent_kwargs):
    """--nat-ipv6-capacity reaches the Agent (None: the table's default; 0:
    no IPv6 connections); a bad value, or one over --nat-capacity, is a usage
    error naming the flag."""
    seen = agent_kwargs
    base = ("agent", "--node", "node3", "--cluster", CLUSTER, "--policies", SAMPLE, "--no-control-socket")
    assert run(capsys, *base)[0] == 1 and seen["nat_ipv6_capacity"] is None
    for value, want in (("300000", 300_000), ("0", 0)):
        assert run(capsys, *base, "--nat-ipv6-capacity", value)[0] == 1
        assert seen["nat_ipv6_capacity"] == want
    for value, msg in (("-1", "out of range 0-268435454"), ("268435455", "out of range 0-268435454"),
                       ("many", "not a whole number")):
        with pytest.raises(SystemExit) as exc:
            main([*base, "--nat-ipv6-capacity", value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "argument --nat-ipv6-capacity: " in err and msg in err
    seen.clear()
    code, _out, err = run(capsys, *base, "--nat-capacity", "1000", "--nat-ipv6-capacity", "1001")
    assert code == 2 and not seen
    assert "--nat-ipv6-capacity 1001 is more than --nat-capacity 1000" in err


def test_agent_refuses_a_bad_nat_ipv6_capacity():
    """Agent(nat_ipv6_capacity=...) is checked before anything is set up."""
    from egresscore.agent import Agent
    for bad in (-1, 1_000_001, 2.5, True, "10"):
        with pytest.raises(ValueError, match=r"nat_ipv6_capacity must be an integer in 0\.\.nat_capacity"):
            Agent("node3", CLUSTER, [SAMPLE], nat_ipv6_capacity=bad)


def test_agent_pod_ring_mib_reaches_the_agent(capsys, agent_kwargs):
    """--pod-ring-mib sizes each pod veth's RX ring (default 32 MiB); a bad size is a usage error naming it."""
    seen = agent_kwargs
    base = ("agent", "--node", "node3", "--cluster", CLUSTER, "--policies", SAMPLE, "--no-control-socket")
    assert run(capsys, *base)[0] == 1 and seen["pod_ring_mib"] == 32
    assert run(capsys, *base, "--pod-ring-mib", "4")[0] == 1 and seen["pod_ring_mib"] == 4
    for value in ("0", "1025", "lots"):
        with pytest.raises(SystemExit) as exc:
            main([*base, "--pod-ring-mib", value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "argument --pod-ring-mib: " in err and "MiB 1..1024 expected" in err


def test_agent_labels_and_cluster_name_reach_the_compiler(capsys, agent_kwargs):
    """--labels adds rules to Cilium's default label filter and --cluster-name
    names the cluster selectors see; a bad rule is a usage error naming --labels."""
    seen = agent_kwargs
    base = ("agent", "--node", "node3", "--cluster", CLUSTER, "--policies", SAMPLE, "--no-control-socket")
    assert run(capsys, *base)[0] == 1
    default = seen["label_filter"]
    assert seen["cluster_name"] == "default"
    assert default.keep("app") and not default.keep("pod-template-hash")
    assert run(capsys, *base, "--labels", "k8s:!team", "--cluster-name", "prod")[0] == 1
    assert seen["cluster_name"] == "prod"
    assert not seen["label_filter"].keep("team") and seen["label_filter"].keep("app")
    code, _, err = run(capsys, *base, "--labels", "k8s:!")
    assert code == 2 and err.startswith("egresscore: error: --labels: ") and "has no prefix" in err


HA = os.path.join(ROOT, "examples", "egress-ha.yaml")


def test_egress_list_with_a_down_gateway_shows_the_next_one_and_who_is_down(capsys):
    code, out, err = run(capsys, "egress", "list", "--cluster", CLUSTER, "--policies", HA)
    assert code == 0 and "10.0.1.93   203.0.113.0/24     192.168.1.3   192.168.1.3" in out
    code, out, err = run(capsys, "egress", "list", "--cluster", CLUSTER, "--policies", HA, "--down", "node3")
    assert code == 0 and err == ""
    assert out == (
        "Source IP   Destination CIDR   Egress IP     Gateway IP\n"
        "10.0.1.93   203.0.113.0/24     192.168.1.4   192.168.1.4\n"
        "10.0.1.93   203.0.113.128/25   192.168.1.4   Excluded CIDR\n"
        "\n"
        "Gateways:\n"
        "Gateway node   Node IP       State   Why\n"
        "node3          192.168.1.3   down    --down\n"
        "node4          192.168.1.4   up      -\n"
    )
    code, out, err = run(capsys, "egress", "list", "--cluster", CLUSTER, "--policies", HA,
                         "--down", "node3", "--down", "node4")
    assert code == 0 and "Not Found" in out and "every node matching nodeSelector" in err
    code, _, err = run(capsys, "egress", "list", "--cluster", CLUSTER, "--policies", HA, "--down", "node7")
    assert code == 1 and "--down: no node 'node7'" in err


def test_agent_liveness_options_pick_the_providers(capsys, tmp_path, agent_kwargs):
    """--liveness auto (default) asks for the source's own liveness; file and
    static add theirs; a mode without its input is a usage error naming it."""
    from egresscore.health import FileLiveness, StaticLiveness

    seen = agent_kwargs
    base = ("agent", "--node", "node1", "--cluster", CLUSTER, "--policies", HA, "--no-control-socket")
    assert run(capsys, *base)[0] == 1
    assert seen["liveness"] == ["auto"]
    assert run(capsys, *base, "--liveness", "probes")[0] == 1
    assert seen["liveness"] == []
    down = tmp_path / "down.yaml"
    down.write_text("down: [node3]\n")
    assert run(capsys, *base, "--liveness", "file", "--liveness-file", str(down), "--down", "node4, node2")[0] == 1
    file_p, static_p = seen["liveness"]
    assert isinstance(file_p, FileLiveness) and file_p.down() == {"node3"}
    assert isinstance(static_p, StaticLiveness) and static_p.down() == {"node4", "node2"}
    for extra, msg in ((("--liveness", "file"), "--liveness file needs --liveness-file"),
                       (("--liveness", "static"), "--liveness static needs --down"),
                       (("--down", "node3,,node4"), "--down 'node3,,node4'")):
        code, _, err = run(capsys, *base, *extra)
        assert code == 2 and msg in err
