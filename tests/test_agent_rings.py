"""The agent's ring plan (egresscore.agent.rings): how much a ring absorbs while its thread is off the CPU."""
from egresscore.agent.rings import RingPlan


def test_pod_and_underlay_rings_hold_100_ms_of_a_100_kpps_stream():
    """A datapath thread kept off both cores for up to ~100 ms (the fair server's 50 ms, a sched
    gap of 86 ms measured) must not lose a 100 kpps stream at the ring: 10,000 frames or more."""
    plan = RingPlan()            # the agent's default (vnet_hdr, latency slots)
    assert plan.rx_slots("pod") >= 10_000 and plan.rx_slots("underlay") >= 10_000
    assert plan.rx_slots("pod") == 16_384
