"""Aggregation functions against hand-computed values on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.aggregation import (
    AggregationError,
    BufferedUpdate,
    WeightedSum,
    fedavg_step,
    fedbuff_apply,
    fedbuff_step,
    is_finite,
    l2_norm,
    weighted_average,
)
from fedbus.errors import FedbusError

F32 = np.float32


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=F32)


def copies(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in state.items()}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# -- l2_norm / is_finite ---------------------------------------------------------------


def test_l2_norm_over_all_tensors() -> None:
    # sqrt(3² + 4² + 12²) = sqrt(169) = 13
    assert l2_norm({"a": arr(3, 4), "b": np.array([[12]], F32)}) == pytest.approx(13.0)
    assert l2_norm({"a": arr()}) == 0.0


def test_l2_norm_is_computed_in_float64() -> None:
    # (1e20)² overflows float32 (max ~3.4e38) but not float64: sqrt(2) * 1e20
    norm = l2_norm({"a": arr(1e20, 1e20)})
    assert math.isfinite(norm)
    assert norm == pytest.approx(math.sqrt(2) * 1e20, rel=1e-6)


def test_is_finite() -> None:
    assert is_finite({"a": arr(1, 2), "b": np.zeros((2, 2), F32)})
    assert is_finite({})
    assert not is_finite({"a": arr(1, 2), "b": arr(np.nan)})
    assert not is_finite({"a": arr(np.inf)})
    assert not is_finite({"a": arr(-np.inf)})


# -- weighted_average -------------------------------------------------------------------


def test_weighted_average_by_hand() -> None:
    d1 = {"w": arr(1, 2), "b": np.array([[4.0]], F32)}
    d2 = {"w": arr(3, -2), "b": np.array([[0.0]], F32)}
    before = [copies(d1), copies(d2)]
    out = weighted_average([d1, d2], [1, 3])
    # w: (1*[1, 2] + 3*[3, -2]) / 4 = [10, -4] / 4 = [2.5, -1.0]
    # b: (1*4 + 3*0) / 4 = 1.0
    np.testing.assert_allclose(out["w"], [2.5, -1.0])
    np.testing.assert_allclose(out["b"], [[1.0]])
    assert all(v.dtype == F32 for v in out.values())
    assert_same(d1, before[0])
    assert_same(d2, before[1])


def test_weighted_average_of_one_is_the_delta_as_new_float32() -> None:
    d = {"w": np.array([1.5, -2.0], dtype=np.float64)}
    out = weighted_average([d], [7])
    np.testing.assert_array_equal(out["w"], arr(1.5, -2.0))
    assert out["w"].dtype == F32
    assert out["w"] is not d["w"]


@pytest.mark.parametrize(
    ("deltas", "weights"),
    [
        ([], []),
        ([{"w": arr(1)}], [1, 2]),
        ([{"w": arr(1)}, {"w": arr(2)}], [0, 0]),
        ([{"w": arr(1)}, {"w": arr(2)}], [1, -1]),
        ([{"w": arr(1)}, {"w": arr(2)}], [1, math.nan]),
        ([{"w": arr(1)}, {"v": arr(2)}], [1, 1]),
        ([{"w": arr(1)}, {"w": arr(1, 2)}], [1, 1]),
    ],
)
def test_weighted_average_rejects_bad_input(deltas: list, weights: list) -> None:
    with pytest.raises(ValueError):
        weighted_average(deltas, weights)


# -- fedbuff_step -----------------------------------------------------------------------

GLOBAL = {"w": arr(1, 1)}
U1 = BufferedUpdate({"w": arr(2, 0)}, num_samples=1, staleness=0)
U2 = BufferedUpdate({"w": arr(4, -8)}, num_samples=3, staleness=3)


def test_fedbuff_step_by_hand_sqrt() -> None:
    g = copies(GLOBAL)
    new, velocity = fedbuff_step(g, [U1, U2], server_lr=0.5, staleness_kind="sqrt")
    # w(0) = 1, w(3) = 1/sqrt(4) = 0.5; Σn = 4
    # aggregate = (1*1*[2, 0] + 3*0.5*[4, -8]) / 4 = ([2, 0] + [6, -12]) / 4 = [2, -3]
    # new = [1, 1] + 0.5*[2, -3] = [2, -0.5]
    np.testing.assert_allclose(new["w"], [2.0, -0.5])
    np.testing.assert_allclose(velocity["w"], [2.0, -3.0])
    assert new["w"].dtype == F32 and velocity["w"].dtype == F32
    assert_same(g, GLOBAL)
    np.testing.assert_array_equal(U2.delta["w"], arr(4, -8))


def test_fedbuff_step_by_hand_constant() -> None:
    new, _ = fedbuff_step(GLOBAL, [U1, U2], server_lr=0.5, staleness_kind="constant")
    # aggregate = (1*[2, 0] + 3*[4, -8]) / 4 = [14, -24] / 4 = [3.5, -6]
    # new = [1, 1] + 0.5*[3.5, -6] = [2.75, -2]
    np.testing.assert_allclose(new["w"], [2.75, -2.0])


def test_staleness_shrinks_the_step_instead_of_being_renormalised() -> None:
    # FedAsync (K = 1): one update of staleness 3 under sqrt weighs 0.5
    # new = [0] + 1.0 * (1*0.5*[4]) / 1 = [2]  (not [4])
    new, _ = fedbuff_step(
        {"w": arr(0)},
        [BufferedUpdate({"w": arr(4)}, num_samples=5, staleness=3)],
        server_lr=1.0,
        staleness_kind="sqrt",
    )
    np.testing.assert_allclose(new["w"], [2.0])


def test_fedbuff_step_hinge_parameters_are_passed() -> None:
    # hinge a=1, b=1: w(3) = 1 / (1*(3-1) + 1) = 1/3; new = 0 + 1 * (1/3)*[3] = [1]
    new, _ = fedbuff_step(
        {"w": arr(0)},
        [BufferedUpdate({"w": arr(3)}, num_samples=1, staleness=3)],
        server_lr=1.0,
        staleness_kind="hinge",
        staleness_a=1.0,
        staleness_b=1,
    )
    np.testing.assert_allclose(new["w"], [1.0])


def test_fedbuff_step_with_momentum_by_hand() -> None:
    v0 = {"w": arr(1, 1)}
    before = copies(v0)
    new, v1 = fedbuff_step(
        GLOBAL, [U1, U2], server_lr=0.5, staleness_kind="sqrt", momentum=0.9, velocity=v0
    )
    # aggregate = [2, -3] (as above); v = 0.9*[1, 1] + [2, -3] = [2.9, -2.1]
    # new = [1, 1] + 0.5*[2.9, -2.1] = [2.45, -0.05]
    np.testing.assert_allclose(v1["w"], [2.9, -2.1], rtol=1e-6)
    np.testing.assert_allclose(new["w"], [2.45, -0.05], rtol=1e-5)
    assert_same(v0, before)


def test_fedbuff_momentum_without_velocity_starts_from_zero() -> None:
    new, v = fedbuff_step(GLOBAL, [U1, U2], server_lr=0.5, staleness_kind="sqrt", momentum=0.9)
    np.testing.assert_allclose(v["w"], [2.0, -3.0])
    np.testing.assert_allclose(new["w"], [2.0, -0.5])
    # second step: v = 0.9*[2, -3] + [2, -3] = [3.8, -5.7]; new = [2, -0.5] + 0.5*v
    new2, v2 = fedbuff_step(
        new, [U1, U2], server_lr=0.5, staleness_kind="sqrt", momentum=0.9, velocity=v
    )
    np.testing.assert_allclose(v2["w"], [3.8, -5.7], rtol=1e-6)
    np.testing.assert_allclose(new2["w"], [3.9, -3.35], rtol=1e-6)


def test_fedbuff_step_several_tensors() -> None:
    g = {"w": np.zeros((2, 2), F32), "b": arr(10)}
    ups = [
        BufferedUpdate({"w": np.ones((2, 2), F32), "b": arr(1)}, num_samples=2, staleness=0),
        BufferedUpdate({"w": -np.ones((2, 2), F32), "b": arr(3)}, num_samples=2, staleness=0),
    ]
    new, _ = fedbuff_step(g, ups, server_lr=1.0, staleness_kind="constant")
    # w: (2*1 + 2*(-1)) / 4 = 0; b: 10 + (2*1 + 2*3) / 4 = 12
    np.testing.assert_allclose(new["w"], np.zeros((2, 2)))
    np.testing.assert_allclose(new["b"], [12.0])


def test_fedbuff_step_non_finite_raises_aggregation_error() -> None:
    g = {"w": arr(3e38)}
    big = BufferedUpdate({"w": arr(3e38)}, num_samples=1, staleness=0)
    with pytest.raises(AggregationError) as info:
        fedbuff_step(g, [big], server_lr=1.0, staleness_kind="constant")
    assert isinstance(info.value, FedbusError)
    np.testing.assert_array_equal(g["w"], arr(3e38))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"server_lr": 0.0},
        {"server_lr": math.inf},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"staleness_kind": "nope"},
    ],
)
def test_fedbuff_step_rejects_bad_arguments(kwargs: dict) -> None:
    args = {"server_lr": 1.0, "staleness_kind": "sqrt", **kwargs}
    with pytest.raises(ValueError):
        fedbuff_step(GLOBAL, [U1], **args)


def test_fedbuff_step_rejects_empty_buffer_and_mismatch() -> None:
    with pytest.raises(ValueError):
        fedbuff_step(GLOBAL, [], server_lr=1.0, staleness_kind="sqrt")
    with pytest.raises(ValueError):
        fedbuff_step({"w": arr(1, 1), "b": arr(0)}, [U1], server_lr=1.0, staleness_kind="sqrt")


def test_buffered_update_checks_fields() -> None:
    with pytest.raises(ValueError):
        BufferedUpdate({"w": arr(1)}, num_samples=0, staleness=0)
    with pytest.raises(ValueError):
        BufferedUpdate({"w": arr(1)}, num_samples=1, staleness=-1)


# -- fedavg_step ------------------------------------------------------------------------


def test_fedavg_step_by_hand() -> None:
    g = {"w": arr(1, 2)}
    deltas = [{"w": arr(1, 1)}, {"w": arr(-1, 3)}]
    before = copies(g)
    # mean = (3*[1, 1] + 1*[-1, 3]) / 4 = [2, 6] / 4 = [0.5, 1.5]
    out = fedavg_step(g, deltas, [3, 1])
    np.testing.assert_allclose(out["w"], [1.5, 3.5])  # [1, 2] + 1.0*[0.5, 1.5]
    out2 = fedavg_step(g, deltas, [3, 1], server_lr=2.0)
    np.testing.assert_allclose(out2["w"], [2.0, 5.0])  # [1, 2] + 2*[0.5, 1.5]
    assert out["w"].dtype == F32
    assert_same(g, before)


def test_fedavg_step_errors() -> None:
    with pytest.raises(ValueError):
        fedavg_step({"w": arr(1)}, [{"w": arr(1)}], [0])
    with pytest.raises(ValueError):
        fedavg_step({"w": arr(1)}, [{"w": arr(1)}], [1, 1])
    with pytest.raises(ValueError):
        fedavg_step({"w": arr(1)}, [{"v": arr(1)}], [1])
    with pytest.raises(AggregationError):
        fedavg_step({"w": arr(-3e38)}, [{"w": arr(-3e38)}], [1])


# -- WeightedSum / fedbuff_apply -----------------------------------------------------------


def test_weighted_sum_matches_the_explicit_formula() -> None:
    rng = np.random.default_rng(3)
    shapes = {"w": (5, 4), "b": (4,)}
    deltas = [{k: rng.standard_normal(s).astype(F32) for k, s in shapes.items()} for _ in range(7)]
    samples = [3, 1, 8, 2, 5, 5, 1]
    coefs = [n * w for n, w in zip(samples, [1.0, 0.5, 0.25, 1.0, 0.7, 0.1, 1.0], strict=True)]
    total = WeightedSum(shapes)
    before = [copies(d) for d in deltas]
    for d, n, c in zip(deltas, samples, coefs, strict=True):
        total.add(d, num_samples=n, coef=c)
    mean = total.mean()
    for name in shapes:
        expected = sum(c * d[name].astype(np.float64) for d, c in zip(deltas, coefs, strict=True))
        np.testing.assert_allclose(mean[name], expected / sum(samples), rtol=1e-5, atol=1e-6)
        assert mean[name].dtype == F32
    for d, b in zip(deltas, before, strict=True):
        assert_same(d, b)  # inputs untouched
    assert (total.count, total.samples) == (7, 25)
    mean["w"][0, 0] = 99.0  # the mean is a new array, not a view of the running sum
    total.clear()
    assert (total.count, total.samples) == (0, 0)
    with pytest.raises(ValueError, match="nothing to aggregate"):
        total.mean()
    total.add(deltas[0], num_samples=2, coef=2.0)
    np.testing.assert_allclose(total.mean()["w"], deltas[0]["w"], rtol=1e-6)


def test_weighted_sum_rejects_mismatched_deltas_and_bad_weights() -> None:
    total = WeightedSum({"w": (2,)})
    with pytest.raises(ValueError, match="tensor names differ"):
        total.add({"v": arr(1, 2)}, num_samples=1, coef=1.0)
    with pytest.raises(ValueError, match="shape"):
        total.add({"w": arr(1, 2, 3)}, num_samples=1, coef=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        total.add({"w": arr(1, 2)}, num_samples=0, coef=1.0)
    with pytest.raises(ValueError, match="coef"):
        total.add({"w": arr(1, 2)}, num_samples=1, coef=math.nan)
    assert total.count == 0


def test_fedbuff_apply_equals_fedbuff_step() -> None:
    total = WeightedSum({"w": (2,)})
    total.add(U1.delta, num_samples=1, coef=1 * 1.0)  # staleness 0 under sqrt: weight 1
    total.add(U2.delta, num_samples=3, coef=3 * 0.5)  # staleness 3 under sqrt: weight 1/2
    v0 = {"w": arr(1, 1)}
    new, v1 = fedbuff_apply(GLOBAL, total, server_lr=0.5, momentum=0.9, velocity=v0)
    ref_new, ref_v1 = fedbuff_step(
        GLOBAL, [U1, U2], server_lr=0.5, staleness_kind="sqrt", momentum=0.9, velocity=v0
    )
    np.testing.assert_allclose(new["w"], ref_new["w"], rtol=1e-6)
    np.testing.assert_allclose(v1["w"], ref_v1["w"], rtol=1e-6)
    assert total.count == 2  # apply only reads the sum


def test_l2_norm_is_finite_exactly_when_the_values_are() -> None:
    assert not math.isfinite(l2_norm({"a": arr(1, np.nan)}))
    assert l2_norm({"a": arr(1, np.inf)}) == math.inf
    # float32's largest value squared overflows float32, not the float64 fallback
    assert math.isfinite(l2_norm({"a": arr(3.4e38, -3.4e38)}))
