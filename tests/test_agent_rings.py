"""The agent's ring plan (egresscore.agent.rings): how much a ring absorbs while its thread is off the CPU."""
import pytest

from egresscore.agent.rings import RingPlan


def test_pod_and_underlay_rings_hold_100_ms_of_a_100_kpps_stream():
    """A datapath thread kept off both cores for up to ~100 ms (the fair server's 50 ms, a sched
    gap of 86 ms measured) must not lose a 100 kpps stream at the ring: 10,000 frames or more."""
    plan = RingPlan()            # the agent's default (vnet_hdr, latency slots)
    assert plan.rx_slots("pod") >= 10_000 and plan.rx_slots("underlay") >= 10_000
    assert plan.rx_slots("pod") == 16_384


def test_pod_ring_size_is_an_option_in_mib_of_kernel_memory():
    """A node with many pods sizes its pod rings down (or up): frames follow the MiB given."""
    assert RingPlan(pod_ring_mib=4).rx_slots("pod") == 2_048            # 1 MiB blocks of 2 KiB slots
    assert RingPlan(pod_ring_mib=4, vnet_hdr=False).rx_slots("pod") == 2_048
    assert RingPlan(pod_ring_mib=4).rx_slots("underlay") == 16_384      # the underlay's ring is not affected


@pytest.mark.parametrize("bad", [0, -1, 1025, 2.5, "32", True, None])
def test_a_bad_pod_ring_size_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="pod_ring_mib must be an integer in 1..1024"):
        RingPlan(pod_ring_mib=bad)
