"""FedAdam and FedYogi server steps (coordinator.server_opt), values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.server_opt import adaptive_step, fits_moments

F32 = np.float32
MODEL = {"w": np.array([1.0, 0.0], F32)}
DELTA = {"w": np.array([1.0, -0.5], F32)}
# beta1 0.5, beta2 0.75, tau 0.5 (v starts at tau^2 = 0.25), lr 1
SETTINGS = {"server_lr": 1.0, "beta1": 0.5, "beta2": 0.75, "tau": 0.5}


def test_first_adam_step_by_hand() -> None:
    new, mom = adaptive_step(MODEL, DELTA, kind="adam", **SETTINGS)
    # m = 0.5 * delta = [0.5, -0.25]
    np.testing.assert_allclose(mom["m:w"], [0.5, -0.25], rtol=1e-6)
    # v = 0.75 * 0.25 + 0.25 * delta^2 = [0.1875 + 0.25, 0.1875 + 0.0625]
    np.testing.assert_allclose(mom["v:w"], [0.4375, 0.25], rtol=1e-6)
    # step = m / (sqrt(v) + 0.5) = [0.5 / (0.661438 + 0.5), -0.25 / (0.5 + 0.5)]
    np.testing.assert_allclose(new["w"], [1.0 + 0.5 / (math.sqrt(0.4375) + 0.5), -0.25],
                               rtol=1e-6)
    assert new["w"].dtype == F32 and mom["v:w"].dtype == F32


def test_first_yogi_step_by_hand() -> None:
    new, mom = adaptive_step(MODEL, DELTA, kind="yogi", **SETTINGS)
    # v = 0.25 - 0.25 * delta^2 * sign(0.25 - delta^2): [0.25 + 0.25 * 1, 0.25 - 0]
    np.testing.assert_allclose(mom["v:w"], [0.5, 0.25], rtol=1e-6)
    # step [0.5 / (sqrt(0.5) + 0.5), -0.25 / 1] = [sqrt(2) - 1, -0.25]
    np.testing.assert_allclose(new["w"], [1.0 + math.sqrt(2) - 1, -0.25], rtol=1e-6)


def test_second_step_uses_the_moments() -> None:
    _, mom = adaptive_step(MODEL, DELTA, kind="adam", **SETTINGS)
    zero = {"w": np.zeros(2, F32)}
    new, mom2 = adaptive_step(MODEL, zero, kind="adam", moments=mom, **SETTINGS)
    # m = 0.5 * [0.5, -0.25]; v = 0.75 * [0.4375, 0.25]: the model still moves
    np.testing.assert_allclose(mom2["m:w"], [0.25, -0.125], rtol=1e-6)
    np.testing.assert_allclose(mom2["v:w"], [0.328125, 0.1875], rtol=1e-6)
    np.testing.assert_allclose(
        new["w"], [1.0 + 0.25 / (math.sqrt(0.328125) + 0.5),
                   -0.125 / (math.sqrt(0.1875) + 0.5)], rtol=1e-6)
    # yogi: a zero aggregate leaves v as it was
    _, ymom = adaptive_step(MODEL, DELTA, kind="yogi", **SETTINGS)
    _, ymom2 = adaptive_step(MODEL, zero, kind="yogi", moments=ymom, **SETTINGS)
    np.testing.assert_allclose(ymom2["v:w"], ymom["v:w"], rtol=1e-6)


def test_yogi_second_moment_moves_by_at_most_its_share_of_a_huge_aggregate() -> None:
    _, mom = adaptive_step(MODEL, DELTA, kind="yogi", **SETTINGS)
    huge = {"w": np.array([100.0, 0.0], F32)}
    _, adam = adaptive_step(MODEL, huge, kind="adam", moments=mom, **SETTINGS)
    _, yogi = adaptive_step(MODEL, huge, kind="yogi", moments=mom, **SETTINGS)
    # adam: 0.75 * 0.5 + 0.25 * 1e4; yogi: 0.5 + 0.25 * 1e4 (sign(0.5 - 1e4) = -1)
    assert adam["v:w"][0] == pytest.approx(0.375 + 2500.0)
    assert yogi["v:w"][0] == pytest.approx(0.5 + 2500.0)
    # a v below delta^2 grows, one above it shrinks: yogi with delta 0 and v 0.25 stays
    assert yogi["v:w"][1] == pytest.approx(0.25)


def test_inputs_are_not_mutated() -> None:
    model = {"w": MODEL["w"].copy()}
    _, mom = adaptive_step(model, DELTA, kind="adam", **SETTINGS)
    before = {k: v.copy() for k, v in mom.items()}
    adaptive_step(model, DELTA, kind="yogi", moments=mom, **SETTINGS)
    np.testing.assert_array_equal(model["w"], MODEL["w"])
    for k in before:
        np.testing.assert_array_equal(mom[k], before[k])


@pytest.mark.parametrize("kwargs", [
    {"kind": "sgd"}, {"server_lr": 0.0}, {"server_lr": math.inf}, {"beta1": 1.0},
    {"beta2": -0.1}, {"tau": 0.0}, {"moments": {"w": np.zeros(2, F32)}},
])
def test_bad_arguments(kwargs: dict) -> None:
    args = {"kind": "adam", **SETTINGS, **kwargs}
    with pytest.raises(ValueError):
        adaptive_step(MODEL, DELTA, **args)
    with pytest.raises(ValueError):
        adaptive_step(MODEL, {"x": np.zeros(2, F32)}, kind="adam", server_lr=0.1)


def test_fits_moments() -> None:
    _, mom = adaptive_step(MODEL, DELTA, kind="adam", **SETTINGS)
    assert fits_moments(MODEL, mom)
    assert not fits_moments(MODEL, {"w": np.zeros(2, F32)})
    assert not fits_moments(MODEL, {"m:w": np.zeros(2, F32), "v:w": np.zeros(3, F32)})
