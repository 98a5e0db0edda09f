"""Robust aggregation (coordinator.robust) and the aggregator spec, with values worked out
by hand in the comments."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.aggregation import l2_norm
from coordinator.aggregator_spec import (
    AggregatorSpec,
    buffer_limit,
    capped_mean,
    parse_aggregator,
    quorum_reached,
    quorum_step,
    robust_aggregate,
    sparse_codec_warning,
)
from coordinator.robust import (
    agreeing_mean,
    cap_sample_counts,
    clip_norm,
    clip_to_median_norm,
    clipped_agreeing_mean,
    column_median,
    coordinate_median,
    krum_min_updates,
    multi_krum,
    relative_agreement,
    trim_count,
    trimmed_mean,
    trimmed_min_updates,
)

F32 = np.float32
MAX32 = float(np.finfo(np.float32).max)


def d(w: list[float], b: list[float] | None = None) -> dict[str, np.ndarray]:
    out = {"w": np.array(w, F32)}
    if b is not None:
        out["b"] = np.array(b, F32)
    return out


def points(*xs: float) -> list[dict[str, np.ndarray]]:
    """One-coordinate deltas on a line: easy squared distances."""
    return [{"x": np.array([x], F32)} for x in xs]


# -- coordinate-wise median -----------------------------------------------------------------


def test_median_of_an_odd_count_is_the_middle_value_per_coordinate() -> None:
    deltas = [d([1, 5, 3], [1]), d([2, 2, 2], [2]), d([9, 0, 4], [100])]
    out = coordinate_median(deltas)
    # w: sorted (1,2,9) (0,2,5) (2,3,4) -> 2 2 3; b: (1,2,100) -> 2
    np.testing.assert_array_equal(out["w"], [2, 2, 3])
    np.testing.assert_array_equal(out["b"], [2])


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    deltas = [d([1, 5, 3], [1]), d([2, 2, 2], [2]), d([9, 0, 4], [100]), d([0, 1, 10], [-1])]
    out = coordinate_median(deltas)
    # w: (0,1,2,9)->1.5 (0,1,2,5)->1.5 (2,3,4,10)->3.5; b: (-1,1,2,100)->1.5
    np.testing.assert_array_equal(out["w"], [1.5, 1.5, 3.5])
    np.testing.assert_array_equal(out["b"], [1.5])


def test_median_of_one_is_that_delta_and_of_two_their_mean() -> None:
    one = d([1.25, -3], [7])
    out = coordinate_median([one])
    for name in one:
        assert out[name].tobytes() == one[name].tobytes()
        assert out[name] is not one[name]
    two = coordinate_median([d([0, 4]), d([2, -4])])
    np.testing.assert_array_equal(two["w"], [1, 0])


def test_median_with_ties_keeps_the_tied_value() -> None:
    out = coordinate_median([d([1, 3]), d([1, 3]), d([1, 3]), d([5, -9])])
    np.testing.assert_array_equal(out["w"], [1, 3])


def test_median_resists_one_outlier_of_any_size() -> None:
    honest = [d([1.0, 1.0]), d([1.1, 0.9]), d([0.9, 1.1])]
    out = coordinate_median([*honest, d([1e30, -1e30])])
    # w: (0.9, 1.0, 1.1, 1e30) -> 1.05; second coordinate likewise 0.95... sorted
    # (-1e30, 0.9, 1.0, 1.1) -> 0.95
    np.testing.assert_allclose(out["w"], [1.05, 0.95], rtol=1e-6)



@pytest.mark.parametrize("rows", [1, 2, 3, 10, 31, 32, 64])
def test_column_median_is_numpys_median_to_the_bit(rows: int) -> None:
    rng = np.random.default_rng(rows)
    stack = rng.standard_normal((rows, 257)) * rng.choice([1e-30, 1.0, 1e30], size=(rows, 1))
    stack[:, :20] = rng.integers(-2, 3, size=(rows, 20))  # ties, zeros of both signs
    stack[:, 20:25] = -0.0
    expected = np.median(stack, axis=0)
    got = column_median(stack)
    assert got.dtype == np.float64 and got.shape == (257,)
    assert got.tobytes() == expected.tobytes()


def test_column_median_of_no_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="no rows"):
        column_median(np.zeros((0, 3)))

# -- trimmed mean ---------------------------------------------------------------------------


def test_trimmed_mean_drops_floor_trim_n_from_each_end() -> None:
    deltas = [d([1, -50]), d([2, 0]), d([3, 1]), d([4, 2]), d([100, 3])]
    out = trimmed_mean(deltas, 0.2)  # k = floor(0.2 * 5) = 1
    # (1,2,3,4,100) -> mean(2,3,4) = 3; (-50,0,1,2,3) -> mean(0,1,2) = 1
    np.testing.assert_array_equal(out["w"], [3, 1])
    out = trimmed_mean(deltas, 0.4)  # k = 2: only the middle value is left (the median)
    np.testing.assert_array_equal(out["w"], [3, 1])


def test_trimmed_mean_of_four_with_a_quarter_trimmed() -> None:
    out = trimmed_mean([d([1]), d([2]), d([3]), d([40])], 0.25)  # k = 1: mean(2, 3)
    np.testing.assert_array_equal(out["w"], [2.5])


def test_trimmed_mean_refuses_a_trim_that_drops_nothing() -> None:
    four = [d([1]), d([2]), d([3]), d([40])]
    with pytest.raises(ValueError, match=r"too few deltas .* needs at least 5"):
        trimmed_mean(four, 0.2)  # floor(0.2 * 4) = 0
    out = trimmed_mean(four, 0.2, strict=False)  # asked for: the plain mean
    np.testing.assert_array_equal(out["w"], [11.5])
    np.testing.assert_array_equal(trimmed_mean([d([7])], 0.0)["w"], [7])


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.7, float("nan"), float("inf")])
def test_trimmed_mean_refuses_a_bad_fraction(trim: float) -> None:
    with pytest.raises(ValueError, match="trim must be a fraction"):
        trimmed_mean([d([1])] * 5, trim)


def test_trim_count_and_minimum_counts() -> None:
    assert trim_count(5, 0.2) == 1  # 0.2 * 5 is 1.0000000000000002 or 0.9999...: still 1
    assert trim_count(10, 0.3) == 3
    assert trim_count(4, 0.2) == 0
    assert trimmed_min_updates(0.2) == 5
    assert trimmed_min_updates(0.25) == 4
    assert trimmed_min_updates(0.1) == 10
    assert trimmed_min_updates(0.4) == 3  # floor(1.2) = 1
    assert trimmed_min_updates(0.49) == 3
    assert krum_min_updates(0) == 3 and krum_min_updates(1) == 5 and krum_min_updates(2) == 7


# -- multi-Krum -----------------------------------------------------------------------------


def test_krum_scores_are_sums_of_squared_distances_to_the_nearest_others() -> None:
    # points 0, 1, 2, 3, 100 with f = 1: each score sums the n - f - 2 = 2 nearest
    # 0: 1 + 4 = 5    1: 1 + 1 = 2    2: 1 + 1 = 2    3: 1 + 4 = 5
    # 100: 97^2 + 98^2 = 9409 + 9604 = 19013
    result = multi_krum(points(0, 1, 2, 3, 100), f=1)
    assert result.scores == (5.0, 2.0, 2.0, 5.0, 19013.0)
    # ties go to the lower index: order 1, 2, 0, 3; m defaults to n - f = 4
    assert result.selected == (1, 2, 0, 3)
    np.testing.assert_array_equal(result.aggregate["x"], [1.5])  # (1 + 2 + 0 + 3) / 4
    assert multi_krum(points(0, 1, 2, 3, 100), f=1, m=1).aggregate["x"][0] == 1.0  # Krum
    assert multi_krum(points(0, 1, 2, 3, 100), f=1, m=3).aggregate["x"][0] == 1.0  # (1+2+0)/3


def test_krum_distances_add_up_over_tensors() -> None:
    # x as above; y = (3, 4) for delta 0, (0, 0) for the others: 25 more from 0 to anyone
    deltas = [
        {"x": np.array([x], F32), "y": np.array([3, 4] if i == 0 else [0, 0], F32)}
        for i, x in enumerate((0, 1, 2, 3, 100))
    ]
    # 0: to 1: 1 + 25 = 26, to 2: 4 + 25 = 29 -> 55
    # 1: to 2: 1, to 3: 4 -> 5     2: to 1: 1, to 3: 1 -> 2     3: to 2: 1, to 1: 4 -> 5
    # 4: 9409 + 9604 = 19013
    result = multi_krum(deltas, f=1, m=3)
    assert result.scores == (55.0, 5.0, 2.0, 5.0, 19013.0)
    assert result.selected == (2, 1, 3)
    np.testing.assert_array_equal(result.aggregate["x"], [2])  # (2 + 1 + 3) / 3
    np.testing.assert_array_equal(result.aggregate["y"], [0, 0])


def test_krum_needs_more_than_2f_plus_2_deltas() -> None:
    with pytest.raises(ValueError, match=r"needs n >= 2f \+ 3 = 5"):
        multi_krum(points(0, 1, 2, 3), f=1)
    result = multi_krum(points(0, 1, 5), f=0)  # n - f - 2 = 1 nearest: scores 1, 1, 16
    assert result.scores == (1.0, 1.0, 16.0) and result.selected == (0, 1, 2)
    with pytest.raises(ValueError, match="m must be an integer in"):
        multi_krum(points(0, 1, 2, 3, 4), f=1, m=5)
    with pytest.raises(ValueError, match="f must be an integer"):
        multi_krum(points(0, 1, 2), f=-1)


# -- norm clipping --------------------------------------------------------------------------


def test_clip_scales_down_to_the_bound_and_leaves_small_deltas_alone() -> None:
    delta = {"a": np.array([3, 0], F32), "b": np.array([4], F32)}  # norm 5
    clipped, scale = clip_norm(delta, 2.5)
    assert scale == 0.5
    np.testing.assert_array_equal(clipped["a"], [1.5, 0])
    np.testing.assert_array_equal(clipped["b"], [2])
    assert clipped["a"].dtype == F32
    same, scale = clip_norm(delta, 10)
    assert scale == 1.0 and same["a"] is not delta["a"]
    np.testing.assert_array_equal(same["b"], [4])
    big = {"a": np.full(1000, 7.3, F32)}
    assert l2_norm(clip_norm(big, 1.0)[0]) <= 1.0 * (1 + 1e-6)
    with pytest.raises(ValueError, match="bound must be finite"):
        clip_norm(delta, 0)
    with pytest.raises(ValueError, match="NaN or infinity"):
        clip_norm({"a": np.array([np.nan], F32)}, 1.0)


# -- capped sample counts ----------------------------------------------------------------------


def test_claims_are_capped_at_a_multiple_of_the_lower_median() -> None:
    # the attack: one honest claim of 200 and one of 2^40 in a step of two
    assert cap_sample_counts([200, 2**40], 2) == [200.0, 400.0]
    # lower median of (1, 2, 3, 4) is 2: cap 3
    assert cap_sample_counts([4, 1, 3, 2], 1.5) == [3.0, 1.0, 3.0, 2.0]
    assert cap_sample_counts([5], 1) == [5.0]
    assert cap_sample_counts(np.array([7, 7, 7]), 1) == [7.0, 7.0, 7.0]
    # a low claim only pulls everyone towards equal weights
    assert cap_sample_counts([1, 300], 1) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("claims", "multiple", "match"),
    [
        ([], 2, "no claims"),
        ([0, 5], 2, "integer >= 1"),
        ([True, 5], 2, "integer >= 1"),
        ([1.5, 5], 2, "integer >= 1"),
        ([1, 5], 0.5, "multiple must be"),
        ([1, 5], float("inf"), "multiple must be"),
    ],
)
def test_bad_claims_or_multiples_are_refused(claims: list, multiple: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cap_sample_counts(claims, multiple)


# -- what every function guarantees ---------------------------------------------------------

FUNCTIONS = {
    "median": coordinate_median,
    "trimmed": lambda ds: trimmed_mean(ds, 0.2),
    "krum": lambda ds: multi_krum(ds, 1).aggregate,
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_empty_mismatched_and_non_finite_inputs_are_refused(name: str) -> None:
    fn = FUNCTIONS[name]
    with pytest.raises(ValueError, match="nothing to aggregate"):
        fn([])
    five = [d([1, 2], [0]) for _ in range(5)]
    with pytest.raises(ValueError, match="shape"):
        fn([*five[:4], d([1, 2, 3], [0])])
    with pytest.raises(ValueError, match="names differ"):
        fn([*five[:4], d([1, 2])])
    with pytest.raises(ValueError, match=r"delta\(s\) \[2\] holds NaN"):
        fn([*five[:2], d([1, np.nan], [0]), *five[3:]])
    with pytest.raises(ValueError, match="floating dtype"):
        fn([{"w": np.array([1, 2])} for _ in range(5)])


@pytest.mark.parametrize("name", FUNCTIONS)
def test_dtype_kept_inputs_untouched_and_extremes_stay_finite(name: str) -> None:
    fn = FUNCTIONS[name]
    deltas = [d([MAX32, -MAX32, 1e-45], [i]) for i in range(5)]
    before = [{k: v.copy() for k, v in x.items()} for x in deltas]
    out = fn(deltas)
    assert {k: v.dtype for k, v in out.items()} == {"w": F32, "b": F32}
    assert all(np.isfinite(v).all() for v in out.values())
    np.testing.assert_array_equal(out["w"], np.array([MAX32, -MAX32, 1e-45], F32))
    for x, y in zip(deltas, before, strict=True):
        for k in x:
            assert x[k].tobytes() == y[k].tobytes()
    wide = fn([{"w": np.array([0.1, 0.2], np.float64)} for _ in range(5)])
    assert wide["w"].dtype == np.float64
    # a 0-d tensor (an activation range) stays 0-d
    scalar = fn([{"act": np.array(v, F32)} for v in (1.0, 2.0, 3.0, 4.0, 50.0)])
    assert scalar["act"].shape == () and scalar["act"].dtype == F32


# -- the spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec", "canonical"),
    [
        ("mean", AggregatorSpec(), "mean"),
        ("median", AggregatorSpec("median"), "median"),
        ("trimmed:0.2", AggregatorSpec("trimmed", trim=0.2), "trimmed:0.2"),
        ("krum:1", AggregatorSpec("krum", f=1), "krum:1"),
        ("krum:2:3", AggregatorSpec("krum", f=2, m=3), "krum:2:3"),
        ("clip:5", AggregatorSpec(clip=5.0), "mean+clip:5"),
        ("clip:2.5+median", AggregatorSpec("median", clip=2.5), "median+clip:2.5"),
        (" krum:0+clip:1e3 ", AggregatorSpec("krum", clip=1000.0), "krum:0+clip:1000"),
        ("cap:2", AggregatorSpec(cap=2.0), "mean+cap:2"),
        ("clip:3+mean+cap:1.5", AggregatorSpec(cap=1.5, clip=3.0), "mean+cap:1.5+clip:3"),
    ],
)
def test_specs_parse_to_a_canonical_form(text: str, spec: AggregatorSpec, canonical: str) -> None:
    assert parse_aggregator(text) == spec
    assert str(spec) == canonical
    assert parse_aggregator(canonical) == spec


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty spec"),
        ("average", "unknown part 'average'; expected mean, median"),
        ("Median", "unknown part"),
        ("median:3", "median takes no argument"),
        ("trimmed", "trimmed takes one fraction"),
        ("trimmed:0.5", r"must be in \(0, 0.5\)"),
        ("trimmed:0", r"must be in \(0, 0.5\)"),
        ("trimmed:x", "must be a number"),
        ("trimmed:nan", "must be finite"),
        ("krum", "krum takes F or F:M"),
        ("krum:-1", "whole number"),
        ("krum:1.5", "whole number"),
        ("krum:\u00b2", "whole number"),
        ("krum:1:0", "M must be >= 1"),
        ("median+krum:1", "more than one aggregator"),
        ("clip:0", "must be > 0"),
        ("clip:inf", "must be finite"),
        ("clip:1+clip:2", "clip given twice"),
        ("median+", "unknown part ''"),
        ("cap:0.5", "must be >= 1"),
        ("cap", "cap takes one multiple"),
        ("cap:2+cap:3", "cap given twice"),
        ("median+cap:2", "cap weighs the mean only; median counts each update once"),
    ],
)
def test_bad_specs_get_one_line(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_aggregator(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "mode"},
        {"kind": "trimmed", "trim": 0.5},
        {"kind": "median", "trim": 0.2},
        {"kind": "krum", "f": -1},
        {"kind": "krum", "m": 0},
        {"kind": "median", "f": 1},
        {"clip": 0.0},
        {"clip": float("nan")},
        {"cap": 0.9},
        {"kind": "median", "cap": 2.0},
    ],
)
def test_a_spec_built_directly_is_checked_like_a_parsed_one(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AggregatorSpec(**kwargs)


def test_spec_minimum_counts() -> None:
    assert parse_aggregator("mean").min_updates == 1
    assert parse_aggregator("median").min_updates == 1
    assert parse_aggregator("trimmed:0.2").min_updates == 5
    assert parse_aggregator("krum:1:1").min_updates == 5
    assert not parse_aggregator("mean+clip:3").robust
    assert parse_aggregator("median").robust


def test_robust_aggregate_falls_back_to_the_median_below_the_minimum() -> None:
    krum = parse_aggregator("krum:1")
    out, fell_back = robust_aggregate(krum, points(0, 1, 2, 3, 100))
    assert not fell_back and out["x"][0] == 1.5
    out, fell_back = robust_aggregate(krum, points(0, 1, 100))  # 3 < 5: the median
    assert fell_back and out["x"][0] == 1.0
    out, fell_back = robust_aggregate(parse_aggregator("trimmed:0.2"), points(0, 1, 2, 90))
    assert fell_back and out["x"][0] == 1.5
    out, fell_back = robust_aggregate(parse_aggregator("median"), points(4))
    assert not fell_back and out["x"][0] == 4.0
    # krum's M is capped at n - f: krum:1:9 over 5 deltas averages the best 4
    out, _ = robust_aggregate(parse_aggregator("krum:1:9"), points(0, 1, 2, 3, 100))
    assert out["x"][0] == 1.5
    with pytest.raises(ValueError, match="not a robust aggregator"):
        robust_aggregate(parse_aggregator("mean"), points(1))


def test_capped_mean_weighs_by_capped_claims() -> None:
    spec = parse_aggregator("mean+cap:1")
    # claims 100, 200, 2^40: lower median 200, weights 100, 200, 200
    out = capped_mean(spec, points(1, 1, 4), [100, 200, 2**40])
    assert out["x"][0] == pytest.approx((100 + 200 + 800) / 500)
    with pytest.raises(ValueError, match="not a capped mean"):
        capped_mean(parse_aggregator("mean"), points(1), [1])


# -- agree: the mean of the deltas on the median's side --------------------------------------


def test_agreeing_mean_drops_the_deltas_against_the_median() -> None:
    deltas = [{"w": np.array([1.0, 1.0], np.float32)}, {"w": np.array([2.0, 0.0], np.float32)},
              {"w": np.array([-3.0, -3.0], np.float32)}]
    # median per coordinate: (1, 0); inner products 1, 2, -3: the third is dropped
    result = agreeing_mean(deltas)
    assert result.kept == (0, 1) and result.dots == (1.0, 2.0, -3.0)
    np.testing.assert_array_equal(result.aggregate["w"], np.array([1.5, 0.5], np.float32))
    assert result.aggregate["w"].dtype == np.float32
    spec = parse_aggregator("agree+clip:2")
    assert str(spec) == "agree+clip:2" and spec.robust and spec.min_updates == 1
    agg, fell_back = robust_aggregate(spec, deltas)
    assert not fell_back
    np.testing.assert_array_equal(agg["w"], result.aggregate["w"])


def test_agreeing_mean_with_nothing_agreeing_is_the_median() -> None:
    deltas = [{"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([-1.0, 0.0], np.float32)}]
    result = agreeing_mean(deltas)  # median (0, 0): no positive inner product
    assert result.kept == ()
    np.testing.assert_array_equal(result.aggregate["w"], np.zeros(2, np.float32))
    one = agreeing_mean([{"w": np.array([3.0, -4.0], np.float32)}])
    assert one.kept == (0,)
    np.testing.assert_array_equal(one.aggregate["w"], np.array([3.0, -4.0], np.float32))


def test_relative_agreement_keeps_what_agrees_half_as_much_as_the_typical_delta() -> None:
    # median cosine 0.6 (of 0.2, 0.6, 0.8): floor 0.3, so 0.2 goes
    assert relative_agreement([0.2, 0.6, 0.8], 0.5) == (1, 2)
    # even count: median (0.4 + 0.6) / 2 = 0.5, floor 0.25; the floor itself is kept
    assert relative_agreement([0.25, 0.4, 0.6, -0.1], 0.5) == (0, 1, 2)
    # fraction 0: every positive one; a median at or below 0 gives no floor but 0
    assert relative_agreement([0.01, 0.6, -0.3], 0.0) == (0, 1)
    assert relative_agreement([0.1, -0.2, -0.3], 0.5) == (0,)
    assert relative_agreement([], 0.5) == ()
    with pytest.raises(ValueError, match="fraction"):
        relative_agreement([0.5], 1.5)
    with pytest.raises(ValueError, match="NaN"):
        relative_agreement([float("nan")], 0.5)


def test_agreeing_mean_relative_drops_a_delta_that_barely_agrees() -> None:
    # median per coordinate (1, 1); cosines: (1, 1) -> 1, (1, 2) -> 3/sqrt(10) = 0.949,
    # (3, -2) -> 1/sqrt(26) = 0.196. Median cosine 0.949, floor 0.474: the third goes,
    # though its inner product (1) is positive, so plain agree keeps it
    deltas = [d([1.0, 1.0]), d([1.0, 2.0]), d([3.0, -2.0])]
    plain = agreeing_mean(deltas)
    assert plain.kept == (0, 1, 2)
    result = agreeing_mean(deltas, 0.5)
    assert result.kept == (0, 1)
    assert result.cosines == pytest.approx((1.0, 3 / np.sqrt(10), 1 / np.sqrt(26)))
    np.testing.assert_array_equal(result.aggregate["w"], np.array([1.0, 1.5], F32))
    # quorum's step uses the relative rule (norms 1.41, 2.24, 3.61: median 2.24, bound 4.47,
    # nothing shortened)
    assert quorum_step(deltas).kept == (0, 1)


# -- quorum: agree, and a full buffer waits for K that agree ---------------------------------


def test_quorum_is_agree_with_a_buffer_that_waits() -> None:
    spec = parse_aggregator("quorum")
    assert str(spec) == "quorum" and spec.robust and spec.min_updates == 1
    assert str(parse_aggregator("quorum+clip:2")) == "quorum+clip:2"
    with pytest.raises(ValueError, match="quorum takes no argument"):
        parse_aggregator("quorum:2")
    # norms sqrt(2), 2, 3 sqrt(2): median 2, bound 4, the third shortened to (-2.83, -2.83);
    # median (1, 0), inner products 1, 2, -2.83: agree's step over the first two, (1.5, 0.5)
    deltas = [d([1.0, 1.0]), d([2.0, 0.0]), d([-3.0, -3.0])]
    agg, fell_back = robust_aggregate(spec, deltas)
    assert not fell_back
    np.testing.assert_array_equal(agg["w"], np.array([1.5, 0.5], F32))
    assert quorum_step(deltas).kept == (0, 1)
    # a long update that agrees counts as at most twice the median one: norms 1, 1, 10 ->
    # bound 2 -> mean(1, 1, 2) = 4/3
    step = quorum_step([d([1.0]), d([1.0]), d([10.0])])
    assert step.kept == (0, 1, 2)
    assert step.aggregate["w"][0] == pytest.approx(4.0 / 3.0)
    # K = 2: two of the three agree -> ready; K = 3: not yet (limit 6)
    assert quorum_reached(spec, deltas, 2, 0)
    assert not quorum_reached(spec, deltas, 3, 0)
    assert not quorum_reached(spec, deltas[:2], 3, 0)  # fewer than K: never
    # three devices online: no fourth update can come, so three are enough
    assert quorum_reached(spec, deltas, 3, 3)
    # any other aggregator: K updates, whatever they agree on
    assert quorum_reached(parse_aggregator("agree"), deltas, 3, 0)



def _agreeing_mean_by_numpys_median(deltas: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """agree's step written out plainly (np.median, every tensor stacked as needed)."""
    names = list(deltas[0])
    median = {k: np.median(np.stack([x[k].astype(np.float64).ravel() for x in deltas]), axis=0)
              .reshape(deltas[0][k].shape).astype(deltas[0][k].dtype) for k in names}
    dots = np.zeros(len(deltas))
    for k in names:
        stack = np.stack([x[k].astype(np.float64).ravel() for x in deltas])
        dots += stack @ median[k].astype(np.float64).ravel()
    kept = [i for i in range(len(deltas)) if dots[i] > 0]
    return {k: np.stack([deltas[i][k].astype(np.float64).ravel() for i in kept]).mean(axis=0)
            .reshape(deltas[0][k].shape).astype(deltas[0][k].dtype) for k in names}


@pytest.mark.parametrize("count", [4, 10, 33, 64])
def test_quorum_check_keeps_what_its_step_keeps(count: int) -> None:
    rng = np.random.default_rng(count)
    honest = rng.standard_normal(40).astype(F32)
    deltas = []
    for i in range(count):
        sign = -1.0 if i % 4 == 3 else 1.0  # a quarter push the other way
        length = 10.0 if i % 3 == 1 else rng.uniform(0.5, 4.0)  # a third get shortened
        flat = (sign * honest * length
                + rng.standard_normal(40).astype(F32) * 0.8).astype(F32)
        deltas.append({"w": flat[:30].reshape(5, 6), "b": flat[30:]})
    kept = quorum_step(deltas).kept
    assert 0 < len(kept) < count
    clipped, scales = clip_to_median_norm(deltas, 2.0)
    assert min(scales) < 1.0
    assert agreeing_mean(clipped, 0.5).kept == kept
    assert clipped_agreeing_mean(deltas, 2.0, 0.5).kept == kept
    spec = parse_aggregator("quorum")
    assert quorum_reached(spec, deltas, len(kept), 0)
    if len(kept) < count:  # one more than agree: only a buffer at its limit is ready
        more = len(kept) + 1
        assert quorum_reached(spec, deltas, more, 0) == (count >= buffer_limit(more, 0))
    reference = _agreeing_mean_by_numpys_median(deltas)
    plain = agreeing_mean(deltas)
    for name, value in reference.items():
        assert plain.aggregate[name].tobytes() == value.tobytes()

def test_the_quorum_buffer_limit() -> None:
    assert buffer_limit(5, 0) == 10  # presence unknown: 2K
    assert buffer_limit(5, 7) == 7  # seven online: at most seven updates per version
    assert buffer_limit(5, 20) == 10
    assert buffer_limit(3, 3) == 3  # never below K
    with pytest.raises(ValueError, match="need k >= 1"):
        buffer_limit(0, 0)


def test_clip_to_median_norm() -> None:
    # norms 3, 4, 5, 100: median (4 + 5) / 2 = 4.5, x2 = 9: only the last is shortened
    out, scales = clip_to_median_norm(points(3, 4, -5, 100), 2.0)
    assert scales == (1.0, 1.0, 1.0, pytest.approx(0.09))
    assert [float(o["x"][0]) for o in out] == [3.0, 4.0, -5.0, pytest.approx(9.0)]
    assert out[3]["x"].dtype == F32
    # most deltas zero: median 0, no bound, copies
    zeros, scales = clip_to_median_norm(points(0, 0, 7), 2.0)
    assert scales == (1.0, 1.0, 1.0) and float(zeros[2]["x"][0]) == 7.0
    with pytest.raises(ValueError, match="multiple must be finite and >= 1"):
        clip_to_median_norm(points(1), 0.5)
    with pytest.raises(ValueError, match="no deltas"):
        clip_to_median_norm([], 2.0)


@pytest.mark.parametrize(("aggregator", "codec", "warned"), [
    ("quorum", "sparse:0.007:sign", True),
    ("agree", "topk:0.01:int8+zstd", True),
    ("quorum", "int8", False),
    ("mean", "sparse:0.007:sign", False),
    ("mean+cap:4", "topk:0.01:int8", False),
    ("median", "sparse:0.01", False),
])
def test_sparse_updates_under_an_agreement_aggregator_are_warned_of(
    aggregator: str, codec: str, warned: bool
) -> None:
    text = sparse_codec_warning(parse_aggregator(aggregator), codec)
    assert (text is not None) == warned
    if text is not None:
        assert codec in text and "--aggregator" in text
