"""How the datapath thread is scheduled: SCHED_FIFO and a CPU, for that thread alone.

Why: the kernel's own forwarding runs in softirq, which no user task
preempts; a datapath thread under SCHED_OTHER waits behind every runnable
task on a loaded machine (a scheduler tick or more), and its RX rings fill
meanwhile.  A modest real-time priority lets a woken datapath thread run at
once, ahead of builds and generators, but below the kernel's threaded IRQ
handlers (priority 50).

Only the thread calling apply() changes (its own TID: the loop thread of
Agent.run()), never the process, so the control, host and source threads
stay SCHED_OTHER; the two heartbeat threads (gateway health's prober and the
responder, egresscore.health) take one priority below the loop's, since a
heartbeat starved for 3 rounds marks a live gateway down (measured: a paced
100 kpps stream lost 56-66% as no_gateway with them at normal priority);
they sleep between 100 ms rounds, though a down-set change recompiles on
the prober's thread at that priority; SCHED_RESET_ON_FORK makes any thread it starts
(a SIGHUP reload thread) SCHED_OTHER again.  A runaway guard: the loop
blocks in poll() on its rings whenever a batch comes back empty (an idle
agent takes no CPU), and the kernel's RT throttling is the backstop:
real-time tasks get at most kernel.sched_rt_runtime_us of every
kernel.sched_rt_period_us (950,000 of 1,000,000 by default) on a CPU, so
other tasks keep at least 5% even if the loop never slept.  Without the
privilege (EPERM: no CAP_SYS_NICE, RLIMIT_RTPRIO 0, or an RT cgroup with no
runtime) the agent logs one line and runs at normal priority.
"""
import errno
import os
import sys
import threading

DEFAULT_RT_PRIORITY = 10  # SCHED_FIFO 1..99; 0 is off (SCHED_OTHER)
RT_PRIORITY_MAX = 99
RT_RUNTIME = "/proc/sys/kernel/sched_rt_runtime_us"


def check_sched(rt_priority, cpu):
    """(rt_priority, cpu) checked: rt_priority an int in 0..99, cpu None or one this process may use."""
    if isinstance(rt_priority, bool) or not isinstance(rt_priority, int) or not 0 <= rt_priority <= RT_PRIORITY_MAX:
        raise ValueError(f"rt_priority must be an integer in 0..{RT_PRIORITY_MAX} (0: off), not {rt_priority!r}")
    if cpu is not None:
        allowed = os.sched_getaffinity(0)
        if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu not in allowed:
            raise ValueError(f"cpu must be one of the CPUs this process may run on "
                             f"({', '.join(map(str, sorted(allowed)))}), not {cpu!r}")
    return rt_priority, cpu


def rt_throttle():
    """The kernel's RT runtime per period in µs (-1: throttling off), or None if unreadable."""
    try:
        with open(RT_RUNTIME) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class ThreadSched:
    """The datapath thread's scheduling: apply() on that thread, restore() on the same thread after."""

    def __init__(self, rt_priority=DEFAULT_RT_PRIORITY, cpu=None, *, label="egresscore agent",
                 thread="the datapath thread"):
        self.rt_priority, self.cpu = check_sched(rt_priority, cpu)
        self.label = label
        self.thread = thread
        self.tid = None
        self.applied = {"policy": "other", "priority": 0, "cpu": None}
        self._saved = None

    def apply(self):
        """Set this thread's policy and CPU; one line on stderr for what could not be set."""
        self.tid = tid = threading.get_native_id()
        self._saved = (os.sched_getscheduler(tid), os.sched_getparam(tid), os.sched_getaffinity(tid))
        if self.rt_priority:
            try:
                os.sched_setscheduler(tid, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                                      os.sched_param(self.rt_priority))
                self.applied.update(policy="fifo", priority=self.rt_priority)
            except OSError as exc:
                why = ("not permitted (needs CAP_SYS_NICE or RLIMIT_RTPRIO)" if exc.errno == errno.EPERM
                       else os.strerror(exc.errno or 0))
                self._log(f"SCHED_FIFO priority {self.rt_priority} for {self.thread} {why}; "
                          f"it runs at normal priority")
        if self.cpu is not None:
            try:
                os.sched_setaffinity(tid, {self.cpu})
                self.applied["cpu"] = self.cpu
            except OSError as exc:
                self._log(f"cannot pin {self.thread} to CPU {self.cpu}: {os.strerror(exc.errno or 0)}")
        return self

    def restore(self):
        """Back to what the thread had before apply() (the thread may run Python after the loop)."""
        if self._saved is None:
            return
        policy, param, cpus = self._saved
        self._saved = None
        try:
            os.sched_setscheduler(self.tid, policy, param)
            os.sched_setaffinity(self.tid, cpus)
        except OSError:
            pass  # leaving a policy the thread was allowed to take is always permitted; an offlined CPU is not ours
        self.applied = {"policy": "other", "priority": 0, "cpu": None}

    def stats(self):
        """{"tid", "policy", "priority", "cpu", "rt_runtime_us"}: what is in force now."""
        return {"tid": self.tid, **self.applied, "rt_runtime_us": rt_throttle()}

    def _log(self, text):
        print(f"{self.label}: {text}", file=sys.stderr, flush=True)
