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
                      (InputFileError, ValueError), (ControlError, Exception), (CLIError, Exception)):
        assert issubclass(cls, egresscore.EgressError) and issubclass(cls, base), cls
    with pytest.raises(egresscore.EgressError, match="no network namespace"):
        egresscore.Agent("node1", _cluster(), netns="egc-no-such-namespace")


def _cluster():
    return egresscore.Cluster.from_dict({"nodes": [{"name": "node1", "internalIP": "192.168.1.1"}]})
