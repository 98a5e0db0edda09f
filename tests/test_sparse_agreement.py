"""quorum on sparse updates (coordinator.sparse_agreement): agreement measured on each
update's own support, and the dense rule left as it was."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregator_spec import (
    QUORUM_AGREEMENT,
    QUORUM_NORM_MULTIPLE,
    parse_aggregator,
    quorum_reached,
    quorum_step,
    sparse_codec_warning,
)
from coordinator.robust import agreeing_mean, clip_to_median_norm
from coordinator.sparse_agreement import (
    SPARSE_DENSITY,
    SparseAgreement,
    density,
    opposed,
    others_median,
    sign_agreement,
    sparse_agreeing_mean,
    sparse_agreement,
    sparse_step,
)

F32 = np.float32


def brute_others_median(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, u = columns.shape
    medians = np.zeros((n, u))
    evidence = np.zeros((n, u), dtype=bool)
    for i in range(n):
        for j in range(u):
            others = [columns[r, j] for r in range(n) if r != i and columns[r, j] != 0]
            if columns[i, j] != 0 and others:
                evidence[i, j] = True
                medians[i, j] = np.median(others)
    return medians, evidence


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7), st.integers(1, 6), st.data())
def test_others_median_is_the_median_of_the_other_contributors(
    n: int, u: int, data: st.DataObject
) -> None:
    # small integers with many zeros: ties, absent rows and all-absent columns are common
    cells = data.draw(st.lists(st.sampled_from([0, 0, 0, -3, -1, 1, 2, 5]),
                               min_size=n * u, max_size=n * u))
    columns = np.array(cells, dtype=np.float64).reshape(n, u)
    medians, evidence = others_median(columns)
    want_medians, want_evidence = brute_others_median(columns)
    assert (evidence == want_evidence).all()
    np.testing.assert_allclose(medians, want_medians)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7), st.integers(1, 6), st.data())
def test_sign_agreement_keeps_the_values_with_the_sign_of_their_column_median(
    n: int, u: int, data: st.DataObject
) -> None:
    cells = data.draw(st.lists(st.sampled_from([0, 0, 0, -3, -1, 1, 2, 5]),
                               min_size=n * u, max_size=n * u))
    columns = np.array(cells, dtype=np.float64).reshape(n, u)
    want = np.zeros((n, u), dtype=bool)
    for j in range(u):
        sent = [v for v in columns[:, j] if v != 0]
        median = float(np.median(sent)) if sent else 0.0
        want[:, j] = (columns[:, j] != 0) & (np.sign(columns[:, j]) == np.sign(median))
    assert (sign_agreement(columns) == want).all()


def sparse(size: int, values: dict[int, float]) -> dict[str, np.ndarray]:
    w = np.zeros(size, F32)
    for j, v in values.items():
        w[j] = v
    return {"w": w}


def honest_step(rng: np.random.Generator, n: int = 10, size: int = 400, k: int = 6,
                ) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """``n`` sparse updates of one direction: each sends ``k`` coordinates, half of them from
    a small shared set of large coordinates, half its own (mostly no one else's)."""
    direction = rng.choice([-1.0, 1.0], size)
    shared = np.arange(8)  # the coordinates every device's largest changes fall on
    deltas = []
    for _ in range(n):
        picks = np.concatenate([rng.choice(shared, k // 2, replace=False),
                                rng.choice(np.arange(8, size), k - k // 2, replace=False)])
        deltas.append(sparse(size, {int(j): float(direction[j]) for j in picks}))
    return deltas, direction


def test_a_sparse_step_keeps_its_honest_updates_where_the_dense_rule_drops_them() -> None:
    rng = np.random.default_rng(3)
    deltas, _ = honest_step(rng)
    clipped, _ = clip_to_median_norm(deltas, QUORUM_NORM_MULTIPLE)
    dense = agreeing_mean(clipped, QUORUM_AGREEMENT)  # what quorum did before
    assert len(dense.kept) < len(deltas)
    result = quorum_step(deltas)
    assert result.kept == tuple(range(len(deltas)))
    np.testing.assert_allclose(result.aggregate["w"], np.mean([d["w"] for d in deltas], 0),
                               rtol=1e-6)


def test_a_reversed_sparse_update_is_left_out() -> None:
    rng = np.random.default_rng(5)
    deltas, direction = honest_step(rng, n=8)
    # sign flipped, on the shared large coordinates and some of its own
    flipped = sparse(400, {0: -direction[0], 1: -direction[1], 2: -direction[2],
                           300: 1.0, 301: -1.0, 302: 1.0})
    result = quorum_step([*deltas, flipped])
    assert result.kept == tuple(range(8))
    assert result.cosines[8] < 0
    honest = np.sum([d["w"] for d in deltas], axis=0)
    np.testing.assert_allclose(result.aggregate["w"], honest / 8, rtol=1e-6)


def test_a_value_against_its_coordinate_median_is_left_out_not_its_update() -> None:
    honest = [sparse(20, {0: 1.0, 1: 1.0, 2: 1.0}) for _ in range(5)]
    mild = sparse(20, {0: -1.0, 1: -1.0, 2: 1.0, 3: 1.0})  # cosine -1/3 with the others
    result = sparse_agreeing_mean([*honest, mild], 0.5, whole=False)
    assert result.kept == tuple(range(6))
    assert result.cosines[5] == pytest.approx(-1 / 3)
    # its values at 0 and 1 are outvoted, the others count
    np.testing.assert_allclose(result.aggregate["w"][:5], [5 / 6, 5 / 6, 1, 1 / 6, 0])
    # judged whole (as the dense rule does), it is left out with its coordinate 3
    judged = sparse_agreeing_mean([*honest, mild], 0.5)
    assert judged.kept == tuple(range(5))
    np.testing.assert_allclose(judged.aggregate["w"][:5], [1, 1, 1, 0, 0])
    # pointing against the others at least half as much as they agree: left out whole
    reversed_ = sparse(20, {0: -1.0, 1: -1.0, 2: -1.0, 3: 1.0})
    assert sparse_agreeing_mean([*honest, reversed_], 0.5, whole=False).kept == tuple(range(5))


def test_claimed_samples_weigh_a_sparse_step_capped_at_twice_the_lower_median() -> None:
    deltas = [sparse(8, {0: 1.0}), sparse(8, {1: 1.0}), sparse(8, {2: 1.0})]
    result = quorum_step(deltas, [100, 200, 2**40])
    # weights 100, 200 and 400 (2^40 capped at 2 x 200, the lower median)
    np.testing.assert_allclose(result.aggregate["w"][:4], [1 / 7, 2 / 7, 4 / 7, 0], rtol=1e-6)
    np.testing.assert_allclose(quorum_step(deltas).aggregate["w"][:3], [1 / 3] * 3,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        sparse_agreeing_mean(deltas, 0.5, weights=[1.0, 0.0, 1.0], whole=False)


def test_an_update_is_never_its_own_evidence() -> None:
    # update 2 alone at coordinates 5 and 6: nothing judges it; the others agree at 0 and 1
    deltas = [sparse(10, {0: 1.0, 1: 1.0}), sparse(10, {0: 1.0, 1: 1.0}),
              sparse(10, {5: -4.0, 6: 4.0})]
    stacks = {"w": np.stack([d["w"].astype(np.float64) for d in deltas])}
    verdict = sparse_agreement(stacks, 0.5)
    assert verdict.judged == (True, True, False)
    assert verdict.cosines[2] == 0.0
    assert verdict.kept == (0, 1, 2)
    assert sparse_agreement(stacks, 0.5, keep_unjudged=False).kept == (0, 1)


def test_two_contributors_that_disagree_judge_each_other_negative() -> None:
    deltas = [sparse(10, {0: 1.0}), sparse(10, {0: -1.0}), sparse(10, {0: 2.0, 1: 1.0}),
              sparse(10, {1: 1.0})]
    stacks = {"w": np.stack([d["w"].astype(np.float64) for d in deltas])}
    verdict = sparse_agreement(stacks, 0.5)
    # update 1: the others at 0 are {1, 2}, median 1.5; its value -1 points against it
    assert verdict.cosines[1] == pytest.approx(-1.0)
    assert 1 not in verdict.kept and {0, 2, 3} <= set(verdict.kept)


def test_the_step_density_decides_the_rule_by_its_median() -> None:
    dense = {"w": np.ones(100, F32)}
    thin = sparse(100, {3: 1.0})
    assert density(dense) == 1.0 and density(thin) == 0.01
    assert sparse_step([thin] * 3)
    assert not sparse_step([dense] * 3)
    assert sparse_step([thin, thin, dense])  # a minority cannot move the step
    assert not sparse_step([dense, dense, thin])
    edge = sparse(100, {j: 1.0 for j in range(int(SPARSE_DENSITY * 100))})
    assert sparse_step([edge])


def test_a_dense_step_is_judged_as_before() -> None:
    rng = np.random.default_rng(11)
    deltas = [{"w": rng.standard_normal(50).astype(F32) + 0.5,
               "b": rng.standard_normal(3).astype(F32)} for _ in range(6)]
    deltas.append({"w": -10 * deltas[0]["w"], "b": -deltas[0]["b"]})
    deltas[1]["w"][:10] = 0  # a few zeros do not make a step sparse
    clipped, _ = clip_to_median_norm(deltas, QUORUM_NORM_MULTIPLE)
    before = agreeing_mean(clipped, QUORUM_AGREEMENT)
    now = quorum_step(deltas)
    assert now.kept == before.kept and now.cosines == before.cosines
    weighed = quorum_step(deltas, [10, 20, 30, 40, 50, 60, 2**40])  # dense: claims unused
    assert weighed.kept == now.kept
    for name in ("w", "b"):
        assert np.array_equal(now.aggregate[name], before.aggregate[name])


def test_a_quorum_buffer_of_sparse_updates_is_ready_when_k_are_kept() -> None:
    rng = np.random.default_rng(3)
    deltas, direction = honest_step(rng, n=5)
    spec = parse_aggregator("quorum")
    assert quorum_reached(spec, deltas, 5, 0)
    flipped = sparse(400, {0: -direction[0], 1: -direction[1], 2: -direction[2]})
    assert not quorum_reached(spec, [*deltas[:4], flipped], 5, 0)
    assert not quorum_reached(spec, [*deltas[:4], sparse(400, {})], 5, 0)


def test_sparse_codecs_under_quorum_are_warned_of_without_sending_users_to_the_mean() -> None:
    text = sparse_codec_warning(parse_aggregator("quorum"), "sparse:0.007:sign")
    assert text is not None and "own support" in text
    assert "use --aggregator mean" not in text


def test_the_core_weighs_a_sparse_quorum_step_by_capped_claims() -> None:
    from tests.test_core import core, models, upd

    c = core(aggregator="quorum", buffer_size=3)
    one_hot = [np.zeros(6, F32) for _ in range(3)]
    for i, flat in enumerate(one_hot):
        flat[i] = 1.0  # 1 of 6 values nonzero: a sparse step, no coordinate shared

    def delta(flat: np.ndarray) -> dict[str, np.ndarray]:
        return {"w": flat[:4].reshape(2, 2), "b": flat[4:]}

    claims = (100, 200, 2**40)
    actions = [c.on_update(f"d{i}", upd(f"d{i}", delta=delta(flat), n=n), now=1.0)
               for i, (flat, n) in enumerate(zip(one_hot, claims, strict=True))]
    assert [len(models(a)) for a in actions] == [0, 0, 1]
    # weights 100, 200 and 400 (2^40 capped at 2 x 200, the step's lower median claim)
    np.testing.assert_allclose(c.state["w"], [[1 / 7, 2 / 7], [4 / 7, 0]], rtol=1e-6)
    np.testing.assert_allclose(c.state["b"], [0, 0], atol=1e-7)


def test_opposed_is_a_negative_cosine_of_at_least_fraction_times_the_typical() -> None:
    def verdict(*cosines: float, judged: tuple[bool, ...] | None = None) -> SparseAgreement:
        j = judged if judged is not None else tuple(True for _ in cosines)
        return SparseAgreement((), tuple(0.0 for _ in cosines), cosines, j)

    assert opposed(verdict(-0.2, -0.25, -0.3, 0.5, 0.5, 0.5, 0.6), 0.5) == (1, 2)  # typical 0.5
    assert opposed(verdict(-0.9, 0.5, 0.6, judged=(False, True, True)), 0.5) == ()
    assert opposed(verdict(-0.01, -0.2, 0.1), 0.5) == (0, 1)  # typical <= 0: any negative
    with pytest.raises(ValueError, match="fraction"):
        opposed(verdict(0.5), 1.5)
