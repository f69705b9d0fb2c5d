import subprocess
import sys

import egresscore


def test_drop_reason_registry_is_stable_and_unique():
    names = egresscore.DROP_REASON_NAMES
    assert names[0] == "none"
    assert len(set(names)) == len(names)


def test_cli_without_command_prints_help_and_fails():
    proc = subprocess.run([sys.executable, "-m", "egresscore"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage: egresscore" in proc.stderr
