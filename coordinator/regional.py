"""A regional aggregator's decisions (protocol revision 2.11): device updates in, partial
updates out. Pure: no network, no clock, no store (callers pass ``now``, monotonic seconds).

A regional aggregator runs beside a regional broker. It judges every update of its region's
devices exactly as the root coordinator does (``coordinator.validation.validate_update``
with its own ledger, then the adaptive norm bound of ``coordinator.norm_bound``), answers
each device with a receipt, and folds the accepted ones into *partial updates* that it
sends to the root as one weighted contribution each (docs/protocol.md section 7.3.1).

``RegionBook`` keeps the open partials, one per base version (a partial folds updates made
on one global version only, so the root weighs its staleness exactly). An accepted update
is clipped to the adaptive clip bound it was given and kept as it is (a model copy each, at
most ``partial_size`` per open partial). A partial closes when it holds ``partial_size``
updates, when its oldest waited ``partial_timeout`` seconds, or as soon as a newer global
version is known and its oldest waited ``stale_grace`` seconds (late updates of its version
open a new partial). ``fold`` then makes its delta and weight:

- each update's claimed sample count ``n_i`` capped at ``cap`` x the lower median claim of
  the partial (``coordinator.robust.cap_sample_counts``), so one device claiming 2^40
  samples weighs at most ``cap`` times a typical one;
- the delta ``Σ w_i Δ_i / Σ w_i`` (``aggregation.weighted_average``) and the weight
  ``n = max(parts, round(Σ w_i))``;
- metrics: the mean of every metric all its updates report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from coordinator.aggregation import State, weighted_average
from coordinator.robust import cap_sample_counts

__all__ = [
    "DEFAULT_CAP",
    "ClosedPartial",
    "Part",
    "RegionBook",
    "fold",
    "mean_metrics",
    "partial_id",
]

DEFAULT_CAP = 4.0  # a device's sample claim: at most this x the partial's lower median
_MAX_SEQ_DIGITS = 20


def partial_id(region: str, seq: int) -> str:
    """The update id of a region's ``seq``-th partial: ``<region>.<seq>`` (at most 53
    characters, within the 64 of an update id)."""
    if not (isinstance(seq, int) and 0 <= seq < 10**_MAX_SEQ_DIGITS):
        raise ValueError(f"seq must be an integer in [0, 10^20), got {seq!r}")
    return f"{region}.{seq}"


@dataclass(frozen=True, eq=False)
class Part:
    """One accepted device update inside an open partial: its delta already clipped."""

    update_id: str
    device_id: str
    base_version: int
    num_samples: int
    delta: Mapping[str, np.ndarray]
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ClosedPartial:
    """A partial ready to send: what ``fold`` made of ``parts``, and why it closed."""

    base_version: int
    parts: tuple[Part, ...]
    delta: State
    weight: int
    metrics: dict[str, float]
    reason: str  # "full", "timeout", "newer_version" or "flush"

    @property
    def update_ids(self) -> tuple[str, ...]:
        return tuple(p.update_id for p in self.parts)


def mean_metrics(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric that every one of ``metrics`` reports (sorted by name)."""
    if not metrics:
        return {}
    common = set(metrics[0]).intersection(*metrics[1:])
    return {name: math.fsum(float(m[name]) for m in metrics) / len(metrics)
            for name in sorted(common)}


def fold(parts: Sequence[Part], cap: float = DEFAULT_CAP) -> tuple[State, int]:
    """The delta and the weight of a partial of ``parts`` (see the module doc)."""
    if not parts:
        raise ValueError("a partial folds at least one update")
    weights = cap_sample_counts([p.num_samples for p in parts], cap)
    delta = weighted_average([p.delta for p in parts], weights)
    return delta, max(len(parts), round(math.fsum(weights)))


@dataclass
class _Open:
    opened_at: float
    parts: list[Part]


class RegionBook:
    """The open partials of one region, one per base version; see the module doc."""

    def __init__(self, partial_size: int, partial_timeout: float, *,
                 stale_grace: float = 1.0, cap: float = DEFAULT_CAP) -> None:
        if not (isinstance(partial_size, int) and partial_size >= 1):
            raise ValueError(f"partial_size must be an integer >= 1, got {partial_size!r}")
        for name, value in (("partial_timeout", partial_timeout), ("stale_grace", stale_grace)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not (math.isfinite(cap) and cap >= 1):
            raise ValueError(f"cap must be finite and >= 1, got {cap!r}")
        self.partial_size = partial_size
        self.partial_timeout = partial_timeout
        self.stale_grace = stale_grace
        self.cap = cap
        self._open: dict[int, _Open] = {}

    @property
    def held(self) -> int:
        """Accepted updates waiting in open partials."""
        return sum(len(o.parts) for o in self._open.values())

    def held_ids(self) -> set[str]:
        return {p.update_id for o in self._open.values() for p in o.parts}

    def add(self, part: Part, now: float) -> list[ClosedPartial]:
        """Fold ``part`` into the open partial of its base version; the partial if that
        filled it."""
        entry = self._open.setdefault(part.base_version, _Open(now, []))
        entry.parts.append(part)
        if len(entry.parts) >= self.partial_size:
            return [self._close(part.base_version, "full")]
        return []

    def due(self, now: float, current_version: int | None) -> list[ClosedPartial]:
        """The partials that timed out, or whose version a newer one replaced, oldest
        version first."""
        out = []
        for base in sorted(self._open):
            waited = now - self._open[base].opened_at
            if waited >= self.partial_timeout:
                out.append(self._close(base, "timeout"))
            elif (current_version is not None and base < current_version
                  and waited >= self.stale_grace):
                out.append(self._close(base, "newer_version"))
        return out

    def flush(self) -> list[ClosedPartial]:
        """Every open partial, closed now (the aggregator stops)."""
        return [self._close(base, "flush") for base in sorted(self._open)]

    def drop_older_than(self, oldest: int) -> list[Part]:
        """Give up the open partials of base versions below ``oldest`` (they could only be
        refused as stale); their parts."""
        gone = [b for b in self._open if b < oldest]
        return [p for b in sorted(gone) for p in self._open.pop(b).parts]

    def clear(self) -> list[Part]:
        """Give up everything open (a new run); the parts that were held."""
        parts = [p for b in sorted(self._open) for p in self._open[b].parts]
        self._open.clear()
        return parts

    def _close(self, base: int, reason: str) -> ClosedPartial:
        parts = tuple(self._open.pop(base).parts)
        delta, weight = fold(parts, self.cap)
        return ClosedPartial(base, parts, delta, weight,
                             mean_metrics([p.metrics for p in parts]), reason)
