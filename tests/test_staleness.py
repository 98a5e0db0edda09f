"""Staleness weights against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest

from coordinator.staleness import STALENESS_KINDS, staleness_weight


def test_kinds_are_the_documented_set() -> None:
    assert STALENESS_KINDS == ("sqrt", "poly", "constant", "hinge")


@pytest.mark.parametrize(
    ("staleness", "expected"),
    [(0, 1.0), (3, 0.5), (8, 1 / 3), (99, 0.1)],  # 1/sqrt(1+s)
)
def test_sqrt_is_the_default(staleness: int, expected: float) -> None:
    assert staleness_weight(staleness) == pytest.approx(expected)
    assert staleness_weight(staleness, "sqrt") == pytest.approx(expected)


@pytest.mark.parametrize(
    ("staleness", "a", "expected"),
    [(0, 1.0, 1.0), (3, 1.0, 0.25), (1, 2.0, 0.25), (3, 0.5, 0.5), (7, 1 / 3, 0.5)],
)
def test_poly(staleness: int, a: float, expected: float) -> None:
    # (1 + s) ** -a: 4**-1 = 0.25, 2**-2 = 0.25, 4**-0.5 = 0.5, 8**(-1/3) = 0.5
    assert staleness_weight(staleness, "poly", a=a) == pytest.approx(expected)


def test_constant_never_down_weights() -> None:
    assert [staleness_weight(s, "constant") for s in (0, 1, 1000)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("staleness", "a", "b", "expected"),
    [
        (0, 0.5, 4, 1.0),
        (4, 0.5, 4, 1.0),  # s <= b keeps full weight
        (6, 0.5, 4, 0.5),  # 1 / (0.5 * 2 + 1)
        (5, 10.0, 4, 1 / 11),  # 1 / (10 * 1 + 1)
        (1, 1.0, 0, 0.5),  # 1 / (1 * 1 + 1)
    ],
)
def test_hinge(staleness: int, a: float, b: int, expected: float) -> None:
    assert staleness_weight(staleness, "hinge", a=a, b=b) == pytest.approx(expected)


@pytest.mark.parametrize("kind", STALENESS_KINDS)
def test_weights_are_in_unit_interval_and_non_increasing(kind: str) -> None:
    weights = [staleness_weight(s, kind) for s in range(60)]
    assert weights[0] == 1.0
    assert all(0 < w <= 1 for w in weights)
    assert all(later <= earlier for earlier, later in itertools.pairwise(weights))


def test_sqrt_decreases_strictly() -> None:
    assert staleness_weight(10) < staleness_weight(9)
    assert math.isclose(staleness_weight(15), 0.25)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((-1,), {}),
        ((0, "linear"), {}),
        ((1.5,), {}),
        ((True,), {}),
        (("3",), {}),
        ((1, "poly"), {"a": -1.0}),
        ((1, "poly"), {"a": math.nan}),
        ((1, "hinge"), {"b": -2}),
    ],
)
def test_bad_arguments_raise_value_error(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        staleness_weight(*args, **kwargs)
