"""The lab benchmark's report: the paced rows per fraction of the kernel's flood rate and the
issue 17 verdicts come from the figures measured, not from the labels."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compare_agent_peers as peers  # noqa: E402


def _side(flood_cpu, tcp1, ping_p99, lost50, lost100):
    out = {"load1": 1.0, "flood_kpps": 100.0, "flood_loss_pct": 0.0, "flood_cpu_per_mpkt": flood_cpu,
           "tcp1_gbps": tcp1, "tcp1_cpu_per_gb": 1.0, "ping_median_ms": 0.2, "ping_p99_ms": ping_p99}
    for key, lost in (("iperf3u50", lost50), ("iperf3u100", lost100)):
        out.update({f"{key}_sent": 1000, f"{key}_sent_kpps": 50.0, f"{key}_delivered": 1000 - lost,
                    f"{key}_lost_if": lost, f"{key}_loss_if_pct": lost / 10, f"{key}_loss_pct": 0.0,
                    f"{key}_cpu_per_mpkt": 10.0, f"{key}_agent_drops": {}})
    return out


def test_the_verdicts_follow_the_ratios_of_this_run():
    p = peers.params(False, 2, ("flood", "tcp", "ping", "paced"), paced_at=(0.5, 1.0))
    samples = {"kernel": [_side(10.0, 10.0, 0.2, 0, 0)] * 2,
               "egresscore": [_side(11.0, 9.0, 0.3, 0, -1)] * 2,  # -1: one more arrived than counted sent
               "egresscore --workers 2": [_side(13.0, 7.0, 0.5, 0, 4)] * 2}
    text, med = peers.table(samples, p, {"cpu": "x", "cores": 2, "kernel": "6.18", "python": "3.11",
                                         "load_average": 1.0})
    one = next(line for line in text.splitlines() if line.startswith("- egresscore:"))
    two = next(line for line in text.splitlines() if line.startswith("- egresscore --workers 2:"))
    assert "flood_cpu_per_mpkt 1.10 (<= 1.2: met)" in one and "tcp1_gbps 0.90 (>= 0.8: met)" in one
    assert "ping_p99_ms 1.50 (<= 2: met)" in one and "iperf3u100 loss 0 (0: met)" in one
    assert "flood_cpu_per_mpkt 1.30 (<= 1.2: not met)" in two and "tcp1_gbps 0.70 (>= 0.8: not met)" in two
    assert "ping_p99_ms 2.50 (<= 2: not met)" in two
    assert "iperf3u50 loss 0 (0: met)" in two and "iperf3u100 loss 4 (0: not met)" in two
    # one set of paced rows per fraction, none for the fixed-rate stream
    assert "| paced UDP at 50% (iperf3 -u): lost packets" in text and "| paced UDP at 100% (iperf3 -u)" in text
    assert "| paced UDP (iperf3 -u)" not in text
    assert med["egresscore --workers 2"]["iperf3u100_lost_if"] == 4


def test_a_fraction_names_its_own_figures():
    assert peers.paced_key(0.5) == "iperf3u50" and peers.paced_key(1) == "iperf3u100"
    keys = [key for key, *_ in peers.paced_metrics((0.8,))]
    assert "iperf3u80_loss_if_pct" in keys and "iperf3u_loss_if_pct" not in keys
    assert "flood_kpps" in keys
