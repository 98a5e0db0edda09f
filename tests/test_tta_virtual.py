"""The virtual-time model of the time-to-accuracy benchmark (bench.tta_virtual)."""

from __future__ import annotations

from bench.tta_virtual import run


def test_equal_speeds_with_k_the_fleet_size_makes_synchronous_rounds_without_a_barrier():
    sync = run("equal", mode="fedavg", seed=0, horizon=1.1)
    full_buffer = run("equal", mode="fedbuff", k=10, seed=0, horizon=1.1)
    # rounds close at 0.5 and 1.0 virtual seconds, each with every device's update
    assert (sync.versions, sync.updates) == (2, 20)
    assert full_buffer == sync
    # a smaller buffer makes more, smaller versions from the same updates
    partial = run("equal", mode="fedbuff", k=4, seed=0, horizon=1.1)
    assert partial.updates == 20 and partial.versions > sync.versions
