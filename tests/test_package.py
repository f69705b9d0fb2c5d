import enum
import subprocess
import sys

import pytest

import egresscore
from egresscore import _core


def test_drop_reason_registry_is_stable_and_unique():
    names = egresscore.DROP_REASON_NAMES
    assert names[0] == "none"
    assert len(set(names)) == len(names)


def test_cli_without_command_prints_help_and_fails():
    proc = subprocess.run([sys.executable, "-m", "egresscore"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "usage: egresscore" in proc.stderr


def test_the_public_api_is_about_twenty_names_and_each_resolves():
    assert 15 <= len(egresscore.__all__) <= 25 and len(set(egresscore.__all__)) == len(egresscore.__all__)
    for name in egresscore.__all__:
        assert getattr(egresscore, name) is not None, name
    for name in ("Agent", "EgressMap", "NatTable", "LPMTrie", "PacketRing", "Datapath", "FlowLog",
                 "EgressPolicy", "Cluster", "Node", "Pod", "load_inputs", "EgressError", "DropReason"):
        assert name in egresscore.__all__, name


def test_the_rest_stays_importable_from_its_module():
    from egresscore.compiler import EgressEntry
    from egresscore.control import ControlClient
    from egresscore.flowlog import FlowLogger
    from egresscore.policy import load_policies

    assert {"parse", "PacketBatch", "NAT_TUPLE_DTYPE", "EgressEntry", "ControlClient"}.isdisjoint(egresscore.__all__)
    assert egresscore.parse is _core.parse and egresscore.EgressEntry is EgressEntry
    assert egresscore.ControlClient is ControlClient and egresscore.FlowLogger is FlowLogger
    assert egresscore.load_policies is load_policies
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        egresscore.not_a_name  # noqa: B018


def test_drop_reason_is_the_core_table():
    from egresscore import DropReason

    assert issubclass(DropReason, enum.IntEnum)
    assert [r.label for r in DropReason] == list(_core.DROP_REASON_NAMES)
    assert [int(r) for r in DropReason] == list(range(len(_core.DROP_REASON_NAMES)))
    assert DropReason.NONE == 0 and DropReason["NO_GATEWAY"].label == "no_gateway"


def test_a_core_drop_carries_its_drop_reason_code():
    with pytest.raises(_core.PacketDropped) as exc:
        _core.parse(bytes(10))
    assert egresscore.DropReason(exc.value.code).label == exc.value.reason


def test_every_error_is_an_egress_error_and_keeps_its_builtin_base():
    from egresscore.cli import CLIError
    from egresscore.control import ControlError
    from egresscore.files import InputFileError

    for cls, base in ((egresscore.AgentError, RuntimeError), (egresscore.ClusterError, ValueError),
                      (egresscore.PolicyError, ValueError), (egresscore.InputError, ValueError),
                      (InputFileError, ValueError), (ControlError, Exception), (CLIError, Exception),
                      (_core.PacketDropped, ValueError), (_core.NatRefused, Exception)):
        assert issubclass(cls, egresscore.EgressError) and issubclass(cls, base), cls
    with pytest.raises(egresscore.EgressError, match="no network namespace"):
        egresscore.Agent("node1", _cluster(), netns="egc-no-such-namespace")


def _cluster():
    return egresscore.Cluster.from_dict({"nodes": [{"name": "node1", "internalIP": "192.168.1.1"}]})
