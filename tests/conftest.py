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


# CI runs a fixed set of examples (derandomized), so a submission's result does
# not depend on the draw; local runs keep exploring new examples each time.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")
