"""coordinator.fleet_scale and the core's fleet scaling: values computed by hand."""

from __future__ import annotations

import pytest

from coordinator.core import AggregationConfig
from coordinator.fleet_scale import STALENESS_CAP, FleetScale, fleet_scale
from coordinator.staleness import staleness_weight


@pytest.mark.parametrize(("devices", "expected"), [
    (0, FleetScale(4, 1, 50)),  # nobody known: the floors
    (10, FleetScale(4, 1, 50)),  # the demo's fleet: exactly the fixed defaults
    (15, FleetScale(4, 1, 50)),  # 15 // 8 = 1; 4·15/4 = 15 < 50
    (16, FleetScale(4, 2, 50)),  # 16 // 8 = 2
    (17, FleetScale(5, 1, 50)),  # ceil(sqrt 17) = 5; 17 // 10 = 1
    (100, FleetScale(10, 5, 50)),  # sqrt 100 = 10; 100 // 20 = 5; 400 / 10 = 40 < 50
    (1000, FleetScale(32, 15, 125)),  # ceil 31.6 = 32; 1000 // 64 = 15; ceil(4000 / 32) = 125
    (5000, FleetScale(71, 35, 282)),  # ceil 70.7 = 71; 5000 // 142 = 35; ceil(20000/71) = 282
    (1_000_000, FleetScale(1000, 500, STALENESS_CAP)),  # 4·10⁶/1000 = 4000, capped
])
def test_fleet_scale_by_hand(devices: int, expected: FleetScale) -> None:
    assert fleet_scale(devices, 4, 50) == expected


def test_floors_win_while_larger() -> None:
    assert fleet_scale(100, 16, 60) == FleetScale(16, 3, 60)  # 100 // 32 = 3; 400/16 = 25


@pytest.mark.parametrize("args", [(-1, 4, 50), (10, 0, 50), (10, 4, -1), (10, 4, 1001)])
def test_fleet_scale_refuses_bad_input(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        fleet_scale(*args)


def test_staleness_unit_divides_the_age() -> None:
    # 1/(1 + 30/15) = 1/3: a 1,000-device fleet's typical update weighs what a fresh
    # fleet of 10 gives an update 2 versions old
    assert staleness_weight(30, "poly", a=1.0, unit=15) == pytest.approx(1 / 3)
    assert staleness_weight(2, "poly", a=1.0) == pytest.approx(1 / 3)
    assert staleness_weight(8, "sqrt", unit=2) == pytest.approx(1 / 5 ** 0.5)
    assert staleness_weight(9, "hinge", a=1.0, b=4, unit=2) == pytest.approx(1 / 1.5)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            staleness_weight(3, "poly", unit=bad)  # type: ignore[arg-type]


def test_config_scaled() -> None:
    fixed = AggregationConfig()
    assert fixed.scaled(5000) == FleetScale(4, 1, 50)  # off: the fixed settings
    assert fixed.effective_max_staleness == 50
    auto = AggregationConfig(fleet_scaling=True)
    assert auto.scaled(5000) == FleetScale(71, 35, 282)
    assert auto.scaled(10) == FleetScale(4, 1, 50)
    assert auto.effective_max_staleness == STALENESS_CAP  # what the task announces


@pytest.mark.parametrize("kwargs", [
    {"mode": "fedasync"}, {"mode": "fedavg"}, {"max_staleness": STALENESS_CAP + 1},
])
def test_config_refuses_fleet_scaling_outside_fedbuff(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AggregationConfig(fleet_scaling=True, **kwargs)  # type: ignore[arg-type]
