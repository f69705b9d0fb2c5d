"""The machine CPU clocks the benchmarks read from /proc/stat (egresscore.lab.traffic)."""
import os
import time

import pytest

from egresscore.lab import traffic

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")


HZ = os.sysconf("SC_CLK_TCK")


def _named_ticks():
    with open("/proc/stat") as f:
        name, *values = f.readline().split()
    assert name == "cpu"
    keys = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return dict(zip(keys, map(int, values), strict=False))


def test_cpu_seconds_counts_our_own_busy_time():
    before = traffic.cpu_seconds()
    start = time.process_time()
    while time.process_time() - start < 0.3:
        pass
    # the machine's user time includes ours; a tick is 10 ms, so allow two ticks of slack
    assert traffic.cpu_seconds() - before >= 0.3 - 0.02


def test_the_clocks_agree_with_the_named_fields_and_never_go_back():
    stat = _named_ticks()
    busy, stolen = round(traffic.cpu_seconds() * HZ), round(traffic.stolen_seconds() * HZ)
    assert busy >= stat["user"] + stat["system"] + stat["softirq"]
    assert stolen >= stat.get("steal", 0) >= 0
    # the next reading is no smaller, and close: nothing runs for long between them
    later = _named_ticks()
    assert later.get("steal", 0) >= stolen
    assert later.get("steal", 0) - stolen < HZ
