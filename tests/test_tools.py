"""conftest's require_* helpers: a missing system tool skips a test, or fails it under CI=true."""
import pytest
from conftest import TOOL_PACKAGES, require_tool


def test_missing_tool_skips_with_the_package_to_install(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="egc-no-such-tool.*Debian package egc-pkg"):
        require_tool("egc-no-such-tool", package="egc-pkg")


def test_missing_tool_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_tool("egc-no-such-tool", package="egc-pkg")


def test_present_tool_passes(monkeypatch):
    monkeypatch.setenv("CI", "true")
    require_tool("sh")  # in every Debian base system


def test_tool_packages_name_the_debian_packages():
    assert TOOL_PACKAGES["nft"] == "nftables" and TOOL_PACKAGES["trafgen"] == "netsniff-ng"
    assert TOOL_PACKAGES["ping"] == "iputils-ping"
