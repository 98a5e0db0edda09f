"""Agreement among sparse updates: ``quorum``'s test, measured on each update's own support.

``quorum`` (``coordinator.aggregator_spec``) keeps an update when its cosine with the step's
coordinate-wise median is positive and at least half the step's median cosine. Sparse
updates (``topk``, ``sparse`` codecs: each device sends its largest ~1% of changes, the rest
zero) defeat that test: at most coordinates only one or two of ten updates are nonzero, so
the median there is zero, every cosine is near 0 and the relative threshold throws away
updates at random (about ten points of accuracy lost on digits).

Here a coordinate is judged only by the updates that sent it (its *contributors*), and an
update only by the coordinates it sent:

- for update ``i`` and a coordinate ``j`` of its support, the *others' median* is the median
  of the nonzero values that the other updates sent at ``j`` (the mean of the two middle
  ones for an even count); a coordinate that no other update sent says nothing about ``i``;
- ``i``'s cosine is taken between its values and the others' medians over the coordinates of
  its support that at least one other update sent (its *evidence*), so an update is never
  compared with itself and a zero coordinate is never counted as disagreement
  (``sparse_agreement``);
- an update is left out whole only when it points against the others: a negative cosine at
  least ``fraction`` × the median cosine of the updates with evidence in size (any negative
  cosine when that median is not positive; ``opposed``). Every other update that sends
  anything is kept, whether or not it has evidence;
- of the kept updates, a value counts only where it has the sign of the median of the
  values the kept updates sent at its coordinate (``sign_agreement``): a minority that
  points the other way at a coordinate is outvoted there, and the rest of its update still
  counts;
- the step is the sum of the values that count, each update weighted, divided by the kept
  updates' total weight (``sparse_agreeing_mean``); ``quorum`` weighs each update by its
  claimed sample count capped at twice the step's lower median claim
  (``robust.cap_sample_counts``).

Why an update is no longer left out whenever it agrees less than half as well as the typical
one, as the dense test does: its cosine rests on the few coordinates it shares with others,
on which honest non-IID devices often disagree, and with error feedback what a left-out
update carried is never sent again. Measured in an exploration copy of
``bench.codecs_virtual`` (the bytes benchmark in process: digits, ten devices, 30 FedAvg
versions, ``sparse:0.007:sign``, eight seeds, mean held-out accuracy; the plain
sample-weighted mean 0.938, fp32 0.952): judging whole updates that way (the rule before)
kept 8.0 of 10 per step and ended at 0.924; this rule kept 9.0 and ended at 0.930
(``bench.codecs_virtual`` itself: 0.9363 against the mean's 0.9359; the bytes benchmark over
five seeds: 1.11 points lost against fp32 under this rule, 1.39 under the mean, median).
Every update kept (values still outvoted per coordinate) ended at 0.938, but let
sign-flipped updates through where two hostile devices were most of a coordinate's
contributors (poisoning_sparse, seeds 0 and 1: sign flip × 10 cost 4.9 and 20 points,
reversed updates with inflated claims 2.2 and 12), so reversed updates are still left out
whole. Each update counting once instead of by capped claims
cost about half a point (0.931 against 0.938 with every update kept).

A reversed update (a flipped sign, flipped labels, an inflated claim with a reversed delta)
shares the large coordinates of the honest ones, and there its values point against the
honest contributors' median, so its cosine is clearly negative as long as the honest
contributors are the majority at those coordinates, and it is left out whole; what is left
of a milder one is outvoted where honest updates send the same coordinates. Random noise at
the norm bound sends coordinates the honest ones rarely send, with a cosine near 0: it is
kept, shortened to the step's norm bound and weighed at most twice a typical update, so it
adds noise of at most that size.

What it does not do well (BENCHMARKS.md, "Poisoning with sparse updates", digits, two hostile
devices of ten, FedBuff K=5, seeds 0-4): sign flip × 10 still costs 3.0 points on average and
up to 7.5 on one seed, where an honest update that points against the others is sometimes
the one left out and the hostile pair outvotes it at the coordinates they share. On MNIST
(12 versions, seeds 0-4) it is not yet a defence: label flipping costs 16.7 points on
average, sign flip x 10 9.7 (one seed down to 0.10 accuracy), random updates 8.7.

Which rule a step takes (``sparse_step``): the median of the updates' densities (nonzero
fraction). A dense step (int8, fp16, fp32 updates: most values nonzero) keeps the dense test
unchanged, bit for bit; a step whose typical update is at most ``SPARSE_DENSITY`` nonzero is
judged here. The median decides, so fewer than half of the updates cannot move a step from
one rule to the other.

Pure functions: the deltas are stacked once per tensor in float64 (``robust._stack``), and
the medians are taken over the columns that some update sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from coordinator.aggregation import State
from coordinator.robust import AgreeResult, _checked, _out, _stack, column_median

__all__ = [
    "SPARSE_DENSITY",
    "SparseAgreement",
    "density",
    "opposed",
    "others_median",
    "sign_agreement",
    "sparse_agreeing_mean",
    "sparse_agreement",
    "sparse_step",
]

# a step is judged on supports when its median update has at most this nonzero fraction.
# Measured on one real delta of the demo's network: sparse:0.007:sign 0.7% nonzero,
# topk:0.01 1%, topk:0.1 10%, topk:0.2:int4 19%, topk:0.5:int4 41%, int4 59%, int8 75%,
# fp16 77% (first-layer weights of always-blank pixels never change)
SPARSE_DENSITY = 0.25


def density(delta: Mapping[str, np.ndarray]) -> float:
    """The nonzero fraction of one delta's values over all its tensors."""
    size = sum(int(np.size(v)) for v in delta.values())
    return sum(int(np.count_nonzero(v)) for v in delta.values()) / max(1, size)


def sparse_step(deltas: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Whether a step's updates are sparse: their median density is at most
    ``SPARSE_DENSITY`` (the median: fewer than half of them cannot change the answer)."""
    if len(deltas) == 0:
        return False
    return bool(float(np.median([density(d) for d in deltas])) <= SPARSE_DENSITY)


def others_median(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a finite ``(n, u)`` array: ``(medians, evidence)``, both ``(n, u)``.

    ``medians[i, j]``: the median of the nonzero values of column ``j`` in the rows other
    than ``i`` (the mean of the two middle ones for an even count). ``evidence[i, j]``: row
    ``i`` is nonzero at ``j`` and at least one other row is too; ``medians`` is 0 wherever
    ``evidence`` is False."""
    n, u = columns.shape
    present = columns != 0
    count = present.sum(axis=0)  # contributors per column
    # nonzero values first in ascending order, the zeros (absent) after them: sort with
    # absent values as +inf, then the k-th present value of column j is ordered[k, j]
    keyed = np.where(present, columns, np.inf)
    order = np.argsort(keyed, axis=0, kind="stable")
    ordered = np.take_along_axis(keyed, order, axis=0)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n)[:, None], (n, u)), axis=0)
    others = count[None, :] - 1  # contributors other than row i (row i present)
    evidence = present & (others >= 1)
    safe = np.maximum(others, 1)
    low = (safe - 1) // 2  # middle position(s) among the others, 0-based
    high = safe // 2
    # the others' p-th value is the p-th of all contributors, skipping row i's own rank
    low = low + (low >= rank)
    high = high + (high >= rank)
    low = np.minimum(low, n - 1)
    high = np.minimum(high, n - 1)
    a = np.take_along_axis(ordered, low, axis=0)
    b = np.take_along_axis(ordered, high, axis=0)
    medians = np.where(evidence, (np.where(evidence, a, 0.0) + np.where(evidence, b, 0.0)) / 2,
                       0.0)
    return medians, evidence


@dataclass(frozen=True)
class SparseAgreement:
    """``sparse_agreement``'s answer: the indices kept; for every update its inner product and
    cosine with the others' medians over its evidence (0 without evidence), and whether it
    had any evidence."""

    kept: tuple[int, ...]
    dots: tuple[float, ...]
    cosines: tuple[float, ...]
    judged: tuple[bool, ...]


def sparse_agreement(
    stacks: Mapping[str, np.ndarray], fraction: float, *, keep_unjudged: bool = True
) -> SparseAgreement:
    """Which rows of the step agree (module doc), from each tensor's finite ``(n, size)``
    float64 stack. Requires ``0 <= fraction <= 1`` (``ValueError``)."""
    if not (isinstance(fraction, int | float) and math.isfinite(fraction)
            and 0 <= fraction <= 1):
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if not stacks:
        raise ValueError("no tensors")
    n = next(iter(stacks.values())).shape[0]
    dots = np.zeros(n)
    own = np.zeros(n)
    theirs = np.zeros(n)
    judged = np.zeros(n, dtype=bool)
    sends = np.zeros(n, dtype=bool)  # a zero update is never kept
    for stack in stacks.values():
        sent = np.flatnonzero(np.any(stack != 0, axis=0))
        if sent.size == 0:
            continue
        columns = stack[:, sent]
        sends |= np.any(columns != 0, axis=1)
        medians, evidence = others_median(columns)
        mine = np.where(evidence, columns, 0.0)
        dots += np.einsum("ij,ij->i", mine, medians)
        own += np.einsum("ij,ij->i", mine, mine)
        theirs += np.einsum("ij,ij->i", medians, medians)
        judged |= evidence.any(axis=1)
    scale = np.sqrt(own) * np.sqrt(theirs)
    cosines = np.where(judged & (scale > 0), dots / np.where(scale > 0, scale, 1.0), 0.0)
    rated = [float(c) for c, j in zip(cosines, judged, strict=True) if j]
    typical = float(np.median(rated)) if rated else 0.0
    floor = fraction * typical if typical > 0 else 0.0
    kept = tuple(
        i for i in range(n)
        if (judged[i] and cosines[i] > 0 and cosines[i] >= floor)
        or (not judged[i] and keep_unjudged and sends[i])
    )
    return SparseAgreement(kept, tuple(float(x) for x in dots),
                           tuple(float(c) for c in cosines),
                           tuple(bool(j) for j in judged))


def sign_agreement(columns: np.ndarray) -> np.ndarray:
    """For a finite ``(n, u)`` array: a boolean ``(n, u)`` mask, True where row ``i`` is
    nonzero at column ``j`` and has the sign of the median of column ``j``'s nonzero values
    (the mean of the two middle ones for an even count; a median of 0 agrees with nothing)."""
    n = columns.shape[0]
    present = columns != 0
    count = present.sum(axis=0)
    ordered = np.sort(np.where(present, columns, np.inf), axis=0)  # present values first
    low = np.maximum(count - 1, 0) // 2
    high = np.minimum(count // 2, n - 1)
    a = np.take_along_axis(ordered, low[None, :], axis=0)[0]
    b = np.take_along_axis(ordered, high[None, :], axis=0)[0]
    median = np.where(count > 0, (np.where(count > 0, a, 0.0) + np.where(count > 0, b, 0.0)) / 2,
                      0.0)
    return present & (np.sign(columns) == np.sign(median)[None, :])


def opposed(verdict: SparseAgreement, fraction: float) -> tuple[int, ...]:
    """The updates that point against the others: judged, with a negative cosine of at least
    ``fraction`` × the median cosine of the judged updates in size (any negative cosine when
    that median is not positive). Requires ``0 <= fraction <= 1`` (``ValueError``)."""
    if not (isinstance(fraction, int | float) and math.isfinite(fraction)
            and 0 <= fraction <= 1):
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    rated = [c for c, j in zip(verdict.cosines, verdict.judged, strict=True) if j]
    typical = float(np.median(rated)) if rated else 0.0
    floor = -fraction * typical if typical > 0 else 0.0
    return tuple(i for i, (c, j) in enumerate(zip(verdict.cosines, verdict.judged, strict=True))
                 if j and c < 0 and c <= floor)


def sparse_agreeing_mean(
    deltas: Sequence[Mapping[str, np.ndarray]], fraction: float, *,
    keep_unjudged: bool = True, weights: Sequence[float] | None = None,
    whole: bool = True,
) -> AgreeResult:
    """A sparse step's aggregate (module doc). The updates kept: with ``whole``, those
    ``sparse_agreement`` keeps with ``fraction``; without it, every update that sends
    anything but the ``opposed`` ones (``fraction`` × the median cosine against the
    others). Of the kept updates' values only those that agree in sign with the median of the
    kept updates' nonzero values at the same coordinate count (``sign_agreement``); they are
    summed with ``weights`` (each update counting once without them) and divided by the
    kept updates' total weight, in the inputs' dtype. The coordinate-wise median if no
    update is kept (as ``agreeing_mean``). ``dots`` of the result are the inner products
    with the others' medians."""
    dtypes = _checked(deltas)
    w = np.ones(len(deltas)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(deltas),) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be {len(deltas)} finite values > 0")
    stacks = {name: _stack(deltas, name) for name in dtypes}
    verdict = sparse_agreement(stacks, fraction, keep_unjudged=keep_unjudged)
    if not whole:
        against = set(opposed(verdict, fraction))
        verdict = replace(verdict, kept=tuple(
            i for i in range(len(deltas))
            if i not in against and any(np.any(stack[i] != 0) for stack in stacks.values())))
    kept = list(verdict.kept)
    out: State = {}
    for name, dtype in dtypes.items():
        shape = np.shape(deltas[0][name])
        if not kept:
            out[name] = _out(column_median(stacks[name]), shape, dtype)
            continue
        rows = stacks[name][kept]
        agreed = np.where(sign_agreement(rows), rows, 0.0)
        out[name] = _out(w[kept] @ agreed / float(w[kept].sum()), shape, dtype)
    return AgreeResult(out, verdict.kept, verdict.dots, verdict.cosines)
