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


def test_jitter_stretches_each_period_by_at_most_its_factor():
    exact = run("equal", mode="fedavg", seed=0, horizon=0.9)
    late = run("equal", mode="fedavg", seed=0, horizon=0.9, jitter=0.3)
    # a round closes when its last device is done: exactly 0.5 s, or within 0.5-0.65 s
    assert exact.history[1].at == 0.5
    assert 0.5 < late.history[1].at <= 0.65
    assert (late.versions, late.updates) == (1, 10)


def test_int8_updates_and_the_norm_bound_change_the_steps_not_the_timing():
    plain = run("1:2:4", k=4, seed=0, horizon=3.0)
    int8 = run("1:2:4", k=4, seed=0, horizon=3.0, codec="int8")
    bound = run("1:2:4", k=4, seed=0, horizon=3.0, norm_multiple=1.0)
    assert plain.clipped == 0 and int8.clipped == 0
    assert bound.clipped > 0  # above the median of the accepted norms: scaled down
    for other in (int8, bound):
        assert [e.at for e in other.history] == [e.at for e in plain.history]
        assert [e.accuracy for e in other.history] != [e.accuracy for e in plain.history]


def test_adaptive_k_limits_quorum_to_k_or_to_the_whole_fleet(monkeypatch):
    import bench.tta_virtual as virtual

    seen: list[tuple[int, int]] = []
    real_ready = virtual.quorum_ready

    def spy(deltas, k, online):
        seen.append((k, online))
        return real_ready(deltas, k, online)

    monkeypatch.setattr(virtual, "quorum_ready", spy)
    run("1:2:4", k="auto", seed=0, horizon=1.1)
    assert seen and all(online == k for k, online in seen)
    seen.clear()
    run("1:2:4", k="auto", seed=0, horizon=1.1, limit_k=False)
    assert seen and all(online == 10 for _, online in seen)
