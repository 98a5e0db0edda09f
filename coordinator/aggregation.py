"""Aggregation over ``{name: float32 array}`` model states and deltas.

The steps are pure functions: nothing mutates its inputs and every returned array is a new
float32 array. A step whose result would contain NaN or infinity raises
``AggregationError`` so that the caller keeps the old model instead of publishing a broken
one.

``WeightedSum`` is the one stateful piece: the running FedBuff numerator the coordinator
adds each accepted update to as it arrives, so a buffer costs one model-sized array however
large K is, and the step at the K-th update is a single pass instead of K.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.staleness import staleness_weight
from fedbus.errors import FedbusError

__all__ = [
    "AggregationError",
    "BufferedUpdate",
    "WeightedSum",
    "apply_step",
    "fedavg_step",
    "fedbuff_apply",
    "fedbuff_step",
    "is_finite",
    "l2_norm",
    "server_step",
    "weighted_average",
]

State = dict[str, np.ndarray]


class AggregationError(FedbusError):
    """An aggregation step would have produced a non-finite model; nothing was changed."""


@dataclass(frozen=True, eq=False)
class BufferedUpdate:
    """One accepted update waiting in the FedBuff buffer."""

    delta: Mapping[str, np.ndarray]
    num_samples: int
    staleness: int

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over all tensors; the tensors' sums of squares add up in float64.

    Each tensor's sum of squares is one float32 dot product over the array as it is (no
    copy, one pass). Only when that overflows float32 (a sum of squares above ~3.4e38) is
    the tensor summed again in float64, so values up to float32's maximum give a finite
    norm. A NaN anywhere makes the norm NaN and an infinity makes it infinite: a finite
    norm therefore means every value is finite.
    """
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for value in delta.values():
            flat = np.ascontiguousarray(value, dtype=np.float32).reshape(-1)
            squares = float(np.dot(flat, flat))
            if not math.isfinite(squares):
                wide = flat.astype(np.float64)
                squares = float(np.dot(wide, wide))
            total += squares
    return math.sqrt(total)


def is_finite(state: Mapping[str, np.ndarray]) -> bool:
    """True if no tensor holds NaN or infinity."""
    return all(bool(np.isfinite(value).all()) for value in state.values())


def _check_like(
    reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], what: str
) -> None:
    if set(other) != set(reference):
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        raise ValueError(f"{what}: tensor names differ (missing {missing}, extra {extra})")
    for name, ref in reference.items():
        if np.shape(other[name]) != np.shape(ref):
            raise ValueError(
                f"{what}: tensor {name!r} has shape {np.shape(other[name])}, "
                f"expected {np.shape(ref)}"
            )


def _linear_combination(
    deltas: Sequence[Mapping[str, np.ndarray]], coefs: Sequence[float]
) -> State:
    """``Σ coefs[i] * deltas[i]`` in float32 (coefficients computed by the caller)."""
    first = deltas[0]
    for i, delta in enumerate(deltas[1:], start=1):
        _check_like(first, delta, f"delta {i}")
    out: State = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for name, ref in first.items():
            acc = np.zeros(np.shape(ref), dtype=np.float32)
            scratch = np.empty_like(acc)
            for delta, coef in zip(deltas, coefs, strict=True):
                np.multiply(
                    np.asarray(delta[name], dtype=np.float32), np.float32(coef), out=scratch
                )
                acc += scratch
            out[name] = acc
    return out


def _check_weights(weights: Sequence[float], count: int, what: str) -> list[float]:
    if count == 0:
        raise ValueError("nothing to aggregate")
    if len(weights) != count:
        raise ValueError(f"{len(weights)} {what} for {count} deltas")
    values = [float(w) for w in weights]
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(f"{what} must be finite and >= 0, got {values}")
    if sum(values) <= 0:
        raise ValueError(f"{what} sum to zero")
    return values


def weighted_average(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> State:
    """``Σ w_i Δ_i / Σ w_i`` (weights finite, >= 0, not all zero; same names and shapes)."""
    values = _check_weights(weights, len(deltas), "weights")
    total = math.fsum(values)
    return _linear_combination(deltas, [w / total for w in values])


def _apply(
    global_state: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray], server_lr: float
) -> State:
    _check_like(global_state, step, "step")
    out: State = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for name, value in global_state.items():
            out[name] = (
                np.asarray(value, dtype=np.float32) + np.float32(server_lr) * step[name]
            ).astype(np.float32, copy=False)
    if not is_finite(out):
        raise AggregationError("aggregation step produced a non-finite model; model kept")
    return out


def _check_lr(server_lr: float) -> None:
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr must be finite and > 0, got {server_lr!r}")


class WeightedSum:
    """The running FedBuff numerator: ``Σ c_i · Δ_i`` in float32, and ``Σ n_i``.

    The coordinator adds each accepted update once, as it arrives (one pass over the update
    into a preallocated array), and forgets the update; ``mean()`` divides by the samples
    added. Every delta added must have exactly the names and shapes given at construction
    (``ValueError``). Inputs are never mutated.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        if not shapes:
            raise ValueError("a WeightedSum needs at least one tensor")
        self._sum: State = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        self._scratch: State = {name: np.empty_like(a) for name, a in self._sum.items()}
        self.count = 0
        self.samples = 0

    def add(self, delta: Mapping[str, np.ndarray], *, num_samples: int, coef: float) -> None:
        """Add ``coef · delta`` to the sum and ``num_samples`` to the sample count."""
        if not (_is_count(num_samples) and num_samples >= 1):
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if not (math.isfinite(coef) and coef >= 0):
            raise ValueError(f"coef must be finite and >= 0, got {coef!r}")
        _check_like(self._sum, delta, "delta")
        c = np.float32(coef)
        with np.errstate(over="ignore", invalid="ignore"):
            for name, total in self._sum.items():
                scratch = self._scratch[name]
                np.multiply(delta[name], c, out=scratch, casting="same_kind")
                total += scratch
        self.count += 1
        self.samples += num_samples

    def mean(self) -> State:
        """``Σ c_i · Δ_i / Σ n_i`` as new float32 arrays (``ValueError`` when empty)."""
        if self.count == 0:
            raise ValueError("nothing to aggregate")
        scale = np.float32(1.0 / self.samples)
        with np.errstate(over="ignore", invalid="ignore"):
            return {name: total * scale for name, total in self._sum.items()}

    def total(self) -> State:
        """``Σ c_i · Δ_i`` as new float32 arrays (differential privacy divides it by a fixed
        count instead of the samples: ``coordinator.privacy``)."""
        if self.count == 0:
            raise ValueError("nothing to aggregate")
        return {name: total.copy() for name, total in self._sum.items()}

    def clear(self) -> None:
        for total in self._sum.values():
            total.fill(0.0)
        self.count = 0
        self.samples = 0


def _is_count(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def server_step(
    global_state: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    *,
    server_lr: float,
    momentum: float = 0.0,
    velocity: Mapping[str, np.ndarray] | None = None,
) -> tuple[State, State]:
    """``v = momentum · v + aggregate; new = global + server_lr · v``; returns
    ``(new_state, new_velocity)`` (``v`` starts at zero when ``velocity`` is None). Used with
    the FedBuff mean (``fedbuff_apply``) and with a robust aggregate alike."""
    _check_lr(server_lr)
    if not (math.isfinite(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    _check_like(global_state, aggregate, "update")
    if velocity is None or momentum == 0.0:
        new_velocity = {
            name: np.asarray(agg, dtype=np.float32) for name, agg in aggregate.items()
        }
    else:
        _check_like(global_state, velocity, "velocity")
        new_velocity = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for name, agg in aggregate.items():
                new_velocity[name] = (
                    np.float32(momentum) * np.asarray(velocity[name], dtype=np.float32) + agg
                ).astype(np.float32, copy=False)
    if not is_finite(new_velocity):
        raise AggregationError("server velocity became non-finite; model kept")
    return _apply(global_state, new_velocity, server_lr), new_velocity


def fedbuff_apply(
    global_state: Mapping[str, np.ndarray],
    buffered: WeightedSum,
    *,
    server_lr: float,
    momentum: float = 0.0,
    velocity: Mapping[str, np.ndarray] | None = None,
) -> tuple[State, State]:
    """The FedBuff step from a filled ``WeightedSum`` (``c_i = n_i · w(s_i)``); returns
    ``(new_state, new_velocity)``. See ``fedbuff_step`` for the formula; ``buffered`` is
    only read."""
    _check_lr(server_lr)
    if not (math.isfinite(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return server_step(
        global_state, buffered.mean(), server_lr=server_lr, momentum=momentum,
        velocity=velocity,
    )


def apply_step(
    global_state: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray], *, server_lr: float
) -> State:
    """``global + server_lr · step`` (``AggregationError`` if the result is not finite)."""
    _check_lr(server_lr)
    return _apply(global_state, step, server_lr)


def fedbuff_step(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[BufferedUpdate],
    *,
    server_lr: float,
    staleness_kind: str,
    momentum: float = 0.0,
    velocity: Mapping[str, np.ndarray] | None = None,
    staleness_a: float = 0.5,
    staleness_b: int = 4,
) -> tuple[State, State]:
    """One FedBuff step over the buffered ``updates``; returns ``(new_state, new_velocity)``.

    With ``n_i`` samples, staleness ``s_i`` and weight ``w(s) = staleness_weight(s,
    staleness_kind, a=staleness_a, b=staleness_b)``::

        aggregate = Σ_i n_i · w(s_i) · Δ_i / Σ_i n_i
        v ← momentum · v + aggregate          (v starts at zero when velocity is None)
        new = global + server_lr · v

    The mean is sample-weighted, and staleness down-weights *absolutely*: a buffer of stale
    updates makes a smaller step instead of being renormalised back to full size. With
    ``momentum == 0`` this is a plain step and ``new_velocity == aggregate``. FedAsync is
    the same step with a buffer of one update. The coordinator computes the same thing
    incrementally (``WeightedSum`` + ``fedbuff_apply``).

    Raises ``ValueError`` for bad arguments (empty buffer, mismatched tensors, momentum
    outside ``[0, 1)``) and ``AggregationError`` if the result would not be finite.
    """
    _check_lr(server_lr)
    if not updates:
        raise ValueError("nothing to aggregate")
    _check_like(global_state, updates[0].delta, "update")
    buffered = WeightedSum({name: np.shape(a) for name, a in global_state.items()})
    for u in updates:
        weight = staleness_weight(u.staleness, staleness_kind, a=staleness_a, b=staleness_b)
        buffered.add(u.delta, num_samples=u.num_samples, coef=u.num_samples * weight)
    return fedbuff_apply(
        global_state, buffered, server_lr=server_lr, momentum=momentum, velocity=velocity
    )


def fedavg_step(
    global_state: Mapping[str, np.ndarray],
    deltas: Sequence[Mapping[str, np.ndarray]],
    num_samples: Sequence[int],
    *,
    server_lr: float = 1.0,
) -> State:
    """``global + server_lr · Σ n_i Δ_i / Σ n_i`` (synchronous FedAvg).

    Raises ``ValueError`` for bad arguments and ``AggregationError`` if the result would
    not be finite.
    """
    _check_lr(server_lr)
    values = _check_weights(num_samples, len(deltas), "num_samples")
    _check_like(global_state, deltas[0], "update")
    mean = weighted_average(deltas, values)
    return _apply(global_state, mean, server_lr)
