"""--adaptive-k: the pure rule (coordinator.adaptive_k) and the core pacing its steps by it."""

from __future__ import annotations

from typing import Any

import pytest

from bench.tta import PROFILES
from coordinator.adaptive_k import (
    WINDOW,
    DevicePeriods,
    adaptive_k,
    period_sample,
    quorum_devices,
)
from coordinator.aggregator_spec import buffer_limit
from coordinator.core import AggregationConfig, CoordinatorCore, NewModel
from coordinator.privacy import PrivacySpec
from tests.test_core import TASK, core, status, upd


def measured(speeds: list[float]) -> list[tuple[float | None, float]]:
    """Devices of these relative speeds, every period known, none busy."""
    return [(0.5 * s, 0.0) for s in speeds]


@pytest.mark.parametrize(("profile", "expected"),
                         [("equal", 10), ("1:2:4", 4), ("long_tail", 9), ("quick", 4)])
def test_k_is_the_group_about_as_fast_as_the_fastest(profile: str, expected: int) -> None:
    speeds = PROFILES[profile]
    assert adaptive_k(measured(speeds), 4, len(speeds)) == min(expected, len(speeds))


def test_the_bounds() -> None:
    # fewer known periods than the floor: the floor
    assert adaptive_k([(0.5, 0.0)] * 3 + [(None, 0.0)] * 7, 4, 10) == 4
    # the ceiling (devices online) wins over the floor
    assert adaptive_k(measured([1.0] * 10), 4, 3) == 3
    # a fast group smaller than the floor: the floor-th fastest sets the pace
    assert adaptive_k(measured([1.0, 1.0, 4.0, 4.0, 4.0, 4.0, 9.0]), 4, 7) == 6
    with pytest.raises(ValueError, match="floor"):
        adaptive_k([], 0, 4)
    with pytest.raises(ValueError, match="factor"):
        adaptive_k([], 1, 4, factor=0.5)


def test_unmeasured_and_busy_devices_count_until_they_take_too_long() -> None:
    known = [(0.5, 0.0)] * 4
    assert adaptive_k(known + [(None, 0.5)] * 6, 4, 10) == 10  # not measured, not late
    assert adaptive_k(known + [(None, 1.0)] * 6, 4, 10) == 4  # over 1.5 x 0.5
    # a measured fast device whose current update is long overdue is not fast now
    assert adaptive_k([(0.5, 0.0)] * 9 + [(0.5, 2.0)], 4, 10) == 9


def test_a_few_liars_move_k_by_at_most_their_number() -> None:
    honest = measured(PROFILES["1:2:4"])  # K = 4
    for liars in range(1, 4):  # fewer than the floor
        fast = adaptive_k(honest + [(0.001, 0.0)] * liars, 4, 20)
        assert 4 <= fast <= 4 + liars
    # devices feigning slowness leave the fast group, never below the floor
    assert adaptive_k(measured([1.0] * 8 + [50.0] * 2), 4, 10) == 8
    assert adaptive_k(measured([1.0] * 4 + [50.0] * 6), 4, 10) == 4


def test_period_samples_use_the_coordinators_own_times() -> None:
    assert period_sample(5.0, None, 1.0) == 4.0  # a device's first update: from its base
    assert period_sample(5.0, 3.0, None) is None  # a base made before a restart
    assert period_sample(5.0, 3.0, 4.0) == 1.0  # it started when its base was made
    assert period_sample(5.0, 4.5, 4.0) == 0.5  # it started when its last update went
    periods = DevicePeriods()
    assert periods.observe("d", 1.0, 0, None) is None
    for i, at in enumerate([2.0, 3.0, 9.0, 10.0, 11.0, 12.0]):
        periods.observe("d", at, i + 1, at - 1.0)
    assert periods.samples["d"] == (1.0,) * WINDOW  # the last WINDOW, each 1 s
    assert periods.period("d") == 1.0 and periods.period("other") is None
    # waiting for a newer version is not busy; training on one is
    assert periods.busy("d", 13.0, 6, {}, 0.0) == 0.0
    assert periods.busy("d", 13.0, 7, {7: 12.5}, 0.0) == 0.5
    assert periods.busy("new", 13.0, 7, {}, 10.0) == 3.0


@pytest.mark.parametrize("kwargs", [
    {"mode": "fedavg"},
    {"fleet_scaling": True},
    {"privacy": PrivacySpec(noise=1.0, clip=1.0, delta=1e-5)},
])
def test_config_refuses_adaptive_k_where_k_is_fixed_elsewhere(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="adaptive K"):
        AggregationConfig(adaptive_k=True, **kwargs)


DEVICES = [f"d{i}" for i in range(6)]


def wave(c: Any, now: float) -> list[int]:
    """Every device sends one update based on the version current when the wave starts;
    the number of updates after which each new version was made."""
    base = c.version
    made = []
    for i, device in enumerate(DEVICES):
        actions = c.on_update(device, upd(device, 1.0, base=base), now=now)
        made += [i + 1] * sum(isinstance(a, NewModel) for a in actions)
    return made


def test_equal_devices_step_together_and_a_resumed_core_decides_the_same() -> None:
    c = core(buffer_size=2, adaptive_k=True)
    for device in DEVICES:
        c.on_status(device, status(device, "online"), now=0.0)
    # the first two took 1 s, the others are no later yet: K is the fleet
    assert wave(c, 1.0) == [6]
    assert wave(c, 2.0) == [6]
    snap = c.store.load()
    assert sorted(snap.periods) == DEVICES and snap.periods["d0"] == (1.0, 1.0)

    def resumed(periods: Any) -> CoordinatorCore:
        again = CoordinatorCore.resume(
            TASK, c.core.config, ledger=c.store, version=snap.version, state=snap.state,
            velocity=snap.velocity, counters=snap.counters, pending=snap.pending,
            round_fixed=snap.round, ended=snap.ended, now=10.0, norms=snap.norms,
            periods=periods,
        )
        for device in DEVICES:
            again.on_status(device, status(device, "online"), now=10.0)
        return again

    assert wave(resumed(snap.periods), 11.0) == [6]
    # forgotten, K would be the floor (the base was made before the restart: no sample)
    assert wave(resumed({}), 11.0) == [2, 4, 6]


def test_k_goes_down_while_a_fast_device_is_overdue() -> None:
    c = core(buffer_size=2, adaptive_k=True)
    for device in DEVICES:
        c.on_status(device, status(device, "online"), now=0.0)
    assert wave(c, 1.0) == [6] and wave(c, 2.0) == [6]  # every device 1 s: K = 6
    assert c.snapshot()["buffer_size"] == 6  # the K in force
    base = c.version
    for device in DEVICES[:4]:  # two of them are late this time
        assert not any(isinstance(a, NewModel)
                       for a in c.on_update(device, upd(device, 1.0, base=base), now=3.0))
    assert c.tick(3.4) == []  # 1.4 s: still within 1.5 x 1 s
    assert [type(a) for a in c.tick(3.6)] == [NewModel]  # overdue: K = 4, the step is made


def test_quorum_under_adaptive_k_waits_for_no_device_slower_than_the_fast_group() -> None:
    for k, online in [(9, 10), (4, 10), (10, 10), (3, 0)]:
        assert buffer_limit(k, quorum_devices(k, online)) == k
    assert quorum_devices(6, 4) == 4  # never more than the devices online
    with pytest.raises(ValueError):
        quorum_devices(0, 4)


def test_a_fast_buffer_that_does_not_all_agree_is_stepped_without_the_straggler() -> None:
    c = core(buffer_size=2, adaptive_k=True, aggregator="quorum")
    for device in DEVICES:
        c.on_status(device, status(device, "online"), now=0.0)
    fast, straggler = DEVICES[:5], DEVICES[5]
    for device in fast:  # the straggler sends nothing: overdue at the tick, K = 5
        assert not any(isinstance(a, NewModel)
                       for a in c.on_update(device, upd(device, 1.0, base=0), now=1.0))
    assert [type(a) for a in c.tick(1.6)] == [NewModel]
    made = []
    for device in fast:  # one of the five disagrees: 4 of K = 5 agree
        value = -1.0 if device == fast[-1] else 1.0
        made += [a for a in c.on_update(device, upd(device, value, base=1), now=2.6)
                 if isinstance(a, NewModel)]
    assert c.snapshot()["buffer_size"] == 5 and straggler not in fast
    # counted on every device online, the limit would be 6: the step would wait for d5
    assert len(made) == 1 and c.version == 2
