import contextlib
import copy
import os

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


NOBODY = 65534


def as_nobody(path, cmd="stats"):
    """Send one control-socket request to `path` from a forked child running
    as nobody; returns "connect-error ERRNO" or "answer <the reply line>"."""
    import socket

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: no pytest, no exceptions out
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            try:
                s.connect(path)
            except OSError as e:
                msg = f"connect-error {e.errno}"
            else:
                s.sendall(b'{"cmd": "%s"}\n' % cmd.encode())
                msg = "answer " + s.makefile("rb").readline().decode().strip()
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


needs_netns = pytest.mark.skipif(
    netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason())
)


# CI runs a fixed set of examples (derandomized), so a submission's result does
# not depend on the draw; local runs keep exploring new examples each time.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")


def start_agent(lab, name, policy_doc, **kw):
    """An in-process Agent on lab node `name` for one policy document, started."""
    from egresscore import Agent
    from egresscore.cluster import Cluster
    from egresscore.policy import parse_policy

    policies = [parse_policy(copy.deepcopy(policy_doc))[0]]
    agent = Agent(name, Cluster.from_dict(lab.cluster()), policies, netns=lab.nodes[name].ns, **kw)
    try:
        agent.start()
    except BaseException:
        agent.close()
        raise
    return agent


@contextlib.contextmanager
def running_agents(lab, policy_doc, per_node=None):
    """An Agent on every lab node (per_node: extra Agent arguments by node
    name); all stopped and closed on exit, also when a test fails."""
    agents = {}
    try:
        for name in lab.nodes:
            agents[name] = start_agent(lab, name, policy_doc, **(per_node or {}).get(name, {}))
        yield agents
    finally:
        for a in agents.values():
            a.stop()
            a.close()
