"""quorum's readiness check and its step share one computation (coordinator.robust
clipped_agreeing_mean, coordinator.aggregator_spec quorum_readiness, the core's reuse):
the shared path gives exactly what the separate functions give."""

from __future__ import annotations

import numpy as np

from coordinator.aggregator_spec import (
    QUORUM_AGREEMENT,
    QUORUM_NORM_MULTIPLE,
    parse_aggregator,
    quorum_readiness,
    quorum_step,
)
from coordinator.robust import agreeing_mean, clip_to_median_norm, clipped_agreeing_mean

F32 = np.float32


def _deltas() -> list[dict[str, np.ndarray]]:
    """Six deltas of two tensors: four along one direction, one reversed, one long (norm
    far above twice the median, so it is shortened)."""
    rng = np.random.default_rng(3)
    base = {"w": rng.standard_normal((4, 3)).astype(F32), "b": rng.standard_normal(3).astype(F32)}
    out = [{k: (v + 0.1 * rng.standard_normal(v.shape)).astype(F32) for k, v in base.items()}
           for _ in range(4)]
    out.append({k: (-v).astype(F32) for k, v in base.items()})
    out.append({k: (10 * v).astype(F32) for k, v in base.items()})
    return out


def test_clipped_agreeing_mean_is_agreeing_mean_of_the_clipped_deltas() -> None:
    deltas = _deltas()
    clipped, scales = clip_to_median_norm(deltas, QUORUM_NORM_MULTIPLE)
    assert scales[-1] < 1.0  # the long one is shortened: the clipping path is exercised
    want = agreeing_mean(clipped, QUORUM_AGREEMENT)
    got = clipped_agreeing_mean(deltas, QUORUM_NORM_MULTIPLE, QUORUM_AGREEMENT)
    assert got.kept == want.kept and 4 not in got.kept  # the reversed one is dropped
    assert got.dots == want.dots and got.cosines == want.cosines
    for name in want.aggregate:
        assert got.aggregate[name].dtype == want.aggregate[name].dtype
        np.testing.assert_array_equal(got.aggregate[name], want.aggregate[name])


def test_quorum_readiness_returns_the_step_it_decided_with() -> None:
    spec = parse_aggregator("quorum")
    deltas = _deltas()
    ready, step = quorum_readiness(spec, deltas, 5, 0)
    assert ready and step is not None
    want = quorum_step(deltas)
    assert step.kept == want.kept
    for name in want.aggregate:
        np.testing.assert_array_equal(step.aggregate[name], want.aggregate[name])
    # not ready: 5 agree, 6 wanted (limit 12); the step is still what it would be
    ready, step = quorum_readiness(spec, deltas, 6, 0)
    assert not ready and step is not None and step.kept == want.kept
    # nothing worked out: fewer than K, at the buffer limit, or another aggregator
    assert quorum_readiness(spec, deltas[:3], 5, 0) == (False, None)
    assert quorum_readiness(spec, deltas, 3, 3) == (True, None)
    assert quorum_readiness(parse_aggregator("agree"), deltas, 5, 0) == (True, None)
