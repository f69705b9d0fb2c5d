"""The one network-namespace primitive the library needs: move a thread into a namespace.

Namespaces are the bind mounts under /run/netns that `ip netns` and pyroute2
share.  The agent's host thread enters the node's namespace with setns (per
thread, so the rest of the process stays where it is); the lab builds its
namespace helpers on the same call.
"""
import ctypes
import os

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def setns(name):
    """Move the calling thread into namespace `name` (a /run/netns name)."""
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name!r} failed: {os.strerror(err)}")
    finally:
        os.close(fd)
