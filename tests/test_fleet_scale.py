"""coordinator.fleet_scale and AggregationConfig.scaled: values computed by hand."""

from __future__ import annotations

import pytest

from coordinator.core import AggregationConfig
from coordinator.fleet_scale import STALENESS_CAP, STALENESS_TARGET, FleetScale, fleet_scale


@pytest.mark.parametrize(("devices", "expected"), [
    (0, FleetScale(4, 50)),  # nobody known: the floors
    (10, FleetScale(4, 50)),  # the demo's fleet: exactly the fixed defaults
    (16, FleetScale(4, 50)),  # sqrt 16 = 4; 4·16/4 = 16 < 50
    (17, FleetScale(5, 50, "sqrt")),  # ceil(sqrt 17) = 5
    (100, FleetScale(10, 50, "sqrt")),  # sqrt 100 = 10; 400 / 10 = 40 < 50
    (1000, FleetScale(32, 125, "sqrt")),  # ceil 31.6 = 32; ceil(4000 / 32) = 125
    (5000, FleetScale(71, 282, "sqrt")),  # ceil 70.7 = 71; ceil(20000 / 71) = 282
    (1_000_000, FleetScale(1000, STALENESS_CAP, "sqrt")),  # 4·10⁶ / 1000 = 4000, capped
])
def test_fleet_scale_by_hand(devices: int, expected: FleetScale) -> None:
    assert fleet_scale(devices, 4, 50) == expected


@pytest.mark.parametrize(("devices", "expected"), [
    (16, FleetScale(4, 50)),  # sqrt 16 = 4 ≥ ⌈16 / 7⌉ = 3: as without a limit
    (49, FleetScale(7, 50, "sqrt")),  # sqrt and 49 / 7 agree
    (100, FleetScale(15, 50, "sqrt")),  # ⌈100 / 7⌉ = 15 > sqrt 100; ⌈400 / 15⌉ = 27 < 50
    (1000, FleetScale(143, 50, "sqrt")),  # a limit of 1,000: 143; ⌈4000 / 143⌉ = 28 < 50
])
def test_under_a_concurrency_limit_k_keeps_updates_about_7_versions_old(
        devices: int, expected: FleetScale) -> None:
    assert STALENESS_TARGET == 7
    assert fleet_scale(devices, 4, 50, bounded=True) == expected


def test_floors_win_while_larger() -> None:
    assert fleet_scale(100, 16, 60) == FleetScale(16, 60)  # 400 / 16 = 25 < 60


@pytest.mark.parametrize("args", [(-1, 4, 50), (10, 0, 50), (10, 4, -1), (10, 4, 1001)])
def test_fleet_scale_refuses_bad_input(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        fleet_scale(*args)


def test_config_scaled() -> None:
    fixed = AggregationConfig()
    assert fixed.scaled(5000) == FleetScale(4, 50)  # off: the fixed settings
    assert fixed.effective_max_staleness == 50
    auto = AggregationConfig(fleet_scaling=True)
    assert auto.scaled(5000) == FleetScale(71, 282, "sqrt")
    assert auto.scaled(10) == FleetScale(4, 50)
    assert auto.effective_max_staleness == STALENESS_CAP  # what the task announces


@pytest.mark.parametrize("kwargs", [
    {"mode": "fedasync"}, {"mode": "fedavg"}, {"max_staleness": STALENESS_CAP + 1},
])
def test_config_refuses_fleet_scaling_outside_fedbuff(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AggregationConfig(fleet_scaling=True, **kwargs)  # type: ignore[arg-type]
