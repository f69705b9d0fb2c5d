"""The datapath thread's scheduling (egresscore.agent.sched): SCHED_FIFO and a
CPU on that thread alone, a clear fallback without the privilege, and a
real-time loop that blocks when idle (an idle agent takes no CPU).

Unit tests on plain threads, then one lab (egc-lab-sched-*) with an in-process
Agent per node, where the scheduler's view (sched_getscheduler and
/proc/self/task/<tid>/sched) of every thread is read.
"""
import errno
import os
import threading
import time

import pytest
from conftest import needs_netns, running_agents

from egresscore.agent.sched import DEFAULT_RT_PRIORITY, ThreadSched, check_sched

POLICY_MASK = ~os.SCHED_RESET_ON_FORK
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root (CAP_SYS_NICE)")


def _policy(tid):
    return os.sched_getscheduler(tid) & POLICY_MASK


def _proc_policy(tid):
    """The `policy` and `prio` lines of /proc/self/task/<tid>/sched (the kernel's own view)."""
    fields = {}
    with open(f"/proc/self/task/{tid}/sched") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return int(fields["policy"]), int(fields["prio"])


def _on_thread(fn):
    """fn() on a fresh thread; what it returned (or raised)."""
    out = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_bad_options_are_rejected_naming_the_field():
    for bad in (-1, 100, 1.5, True, "10"):
        with pytest.raises(ValueError, match="rt_priority"):
            check_sched(bad, None)
    with pytest.raises(ValueError, match="cpu must be one of the CPUs"):
        check_sched(0, max(os.sched_getaffinity(0)) + 1)
    assert check_sched(DEFAULT_RT_PRIORITY, None) == (DEFAULT_RT_PRIORITY, None)


@needs_root
def test_fifo_and_cpu_on_the_calling_thread_only_and_not_inherited():
    main_tid = threading.get_native_id()
    cpu = min(os.sched_getaffinity(0))

    def body():
        s = ThreadSched(7, cpu).apply()
        tid = threading.get_native_id()
        inside = (_policy(tid), os.sched_getparam(tid).sched_priority, os.sched_getaffinity(tid),
                  _proc_policy(tid)[0])
        child = _on_thread(lambda: (_policy(0), os.sched_getparam(0).sched_priority))  # a thread it starts
        main = _policy(main_tid)
        stats = s.stats()
        s.restore()
        return inside, child, main, stats, (_policy(tid), os.sched_getaffinity(tid))

    inside, child, main, stats, after = _on_thread(body)
    assert inside == (os.SCHED_FIFO, 7, {cpu}, os.SCHED_FIFO)
    assert child == (os.SCHED_OTHER, 0)          # SCHED_RESET_ON_FORK: a reload thread is normal again
    assert main == os.SCHED_OTHER
    assert stats["policy"] == "fifo" and stats["priority"] == 7 and stats["cpu"] == cpu
    assert after == (os.SCHED_OTHER, os.sched_getaffinity(0))


def test_not_permitted_is_one_line_and_normal_priority(monkeypatch, capsys):
    def refuse(*args):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    s = _on_thread(lambda: ThreadSched(10, label="egresscore agent nodeX").apply())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("egresscore agent nodeX: SCHED_FIFO priority 10 for the datapath thread not permitted")
    assert "normal priority" in err[0]
    assert s.stats()["policy"] == "other" and s.stats()["priority"] == 0


def test_rt_priority_zero_changes_nothing(capsys):
    s = _on_thread(lambda: (ThreadSched(0).apply(), _policy(0))[::-1])
    assert s[0] == os.SCHED_OTHER and s[1].stats()["policy"] == "other"
    assert capsys.readouterr().err == ""


def test_cli_flags_reach_the_agent_and_bad_values_name_the_flag(capsys, monkeypatch):
    import egresscore.agent as agent_mod
    from egresscore.cli import main

    seen = {}

    def fake_agent(node, cluster, policies, **kw):
        seen.update(kw)
        raise agent_mod.AgentError("stopped by the test")

    monkeypatch.setattr(agent_mod, "Agent", fake_agent)
    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    base = ["agent", "--node", "node3", "--cluster", os.path.join(root, "cluster.yaml"),
            "--policies", os.path.join(root, "egress-sample.yaml"), "--no-control-socket"]
    assert main(base) == 1
    assert (seen["rt_priority"], seen["cpu"]) == (DEFAULT_RT_PRIORITY, None)
    cpu = max(os.sched_getaffinity(0))
    assert main([*base, "--rt-priority", "0", "--cpu", str(cpu)]) == 1
    assert (seen["rt_priority"], seen["cpu"]) == (0, cpu)
    capsys.readouterr()
    for flag, value, msg in (("--rt-priority", "100", "rt_priority must be an integer in 0..99"),
                             ("--rt-priority", "high", "not a whole number"),
                             ("--cpu", str(cpu + 1), "cpu must be one of the CPUs")):
        with pytest.raises(SystemExit) as exc:
            main([*base, flag, value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: " in err and msg in err


# -- in the lab ----------------------------------------------------------------------------

def _sample():
    import copy

    from egresscore.lab.kernel import SAMPLE_POLICY

    return copy.deepcopy(SAMPLE_POLICY)


@pytest.fixture(scope="module")
def lab():
    if (reason := __import__("conftest").netns_unavailable_reason()) is not None:
        pytest.skip(reason)
    from egresscore.lab import Lab

    with Lab(tag="sched") as lab:
        yield lab


def _cpu_seconds(tid):
    """utime + stime of one thread (/proc/self/task/<tid>/stat), in seconds."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@needs_netns
def test_the_datapath_thread_alone_is_fifo_and_idle_agents_do_not_spin(lab):
    per_node = {"node3": {"cpu": min(os.sched_getaffinity(0))}}
    with running_agents(lab, _sample(), per_node=per_node) as agents:
        loops = {}
        for name, a in agents.items():
            st = a.stats()["datapath_thread"]
            assert st["tid"] == a._thread.native_id          # the thread running the loop
            assert (st["policy"], st["priority"]) == ("fifo", DEFAULT_RT_PRIORITY)
            loops[st["tid"]] = name
        assert os.sched_getaffinity(agents["node3"]._thread.native_id) == {min(os.sched_getaffinity(0))}
        assert os.sched_getaffinity(agents["node1"]._thread.native_id) == os.sched_getaffinity(0)
        beats = {t.native_id for a in agents.values() for t in (a.responder._thread, a.health._thread)}
        others = fifo_beats = 0
        for tid in map(int, os.listdir("/proc/self/task")):
            try:
                policy, prio = _proc_policy(tid), os.sched_getparam(tid).sched_priority
            except (FileNotFoundError, ProcessLookupError):
                continue  # a short-lived thread ended
            if tid in loops:
                assert _policy(tid) == os.SCHED_FIFO and policy[0] == os.SCHED_FIFO
                assert prio == DEFAULT_RT_PRIORITY and policy[1] == 99 - DEFAULT_RT_PRIORITY
            elif tid in beats:  # heartbeats: one below the loop, so a loaded host does not starve them
                assert _policy(tid) == os.SCHED_FIFO and prio == DEFAULT_RT_PRIORITY - 1, tid
                fifo_beats += 1
            else:   # host, control, flow-log threads and pytest's own
                assert _policy(tid) == os.SCHED_OTHER and policy[0] == os.SCHED_OTHER, tid
                others += 1
        assert fifo_beats == len(beats) == 2 * len(agents) and others >= len(agents)
        lab.ping("app1", "203.0.113.10", count=1)               # the first one may wait for ARP
        assert lab.ping("app1", "203.0.113.10", count=3) == 3   # forwarding at real-time priority
        time.sleep(0.2)
        before = {tid: _cpu_seconds(tid) for tid in loops}
        time.sleep(1.0)
        used = {loops[tid]: _cpu_seconds(tid) - t0 for tid, t0 in before.items()}
        # idle: a wake-up per heartbeat frame and one return to Python every poll_ms,
        # blocked in poll() in between; a loop that spun would use about 1 s here
        assert all(v < 0.1 for v in used.values()), used
    for a in agents.values():
        assert a._sched.stats()["policy"] == "other"    # restored when the loop ended
