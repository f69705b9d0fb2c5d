import os
import shutil

import pytest


def netns_unavailable_reason():
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not os.path.isdir("/proc/self/ns") or not os.path.exists("/proc/self/ns/net"):
        return "kernel has no network namespaces"
    if not os.path.isdir("/run") or not os.access("/run", os.W_OK):
        return "cannot write /run/netns"
    return None


needs_netns = pytest.mark.skipif(
    netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason())
)
