"""Which aggregator a task uses: the ``--aggregator`` spec, its parser and its dispatch.

Grammar (lower case, no spaces)::

    spec       := part ("+" part)*          at most one of each kind of part
    aggregator := "mean" | "median" | "agree" | "quorum" | "trimmed:" FRACTION
                | "krum:" F [":" M]
    cap        := "cap:" MULTIPLE               the mean only
    clip       := "clip:" BOUND

- ``mean`` (default): the sample-weighted mean of today (``coordinator.aggregation``).
- ``median``: coordinate-wise median; ``trimmed:0.2``: coordinate-wise trimmed mean dropping
  ``floor(0.2 · n)`` values from each end (``0 < FRACTION < 0.5``); ``krum:F[:M]``:
  multi-Krum assuming at most ``F`` hostile updates per step, averaging the ``M`` best
  (default ``n − F``; ``M = 1`` is Krum); ``agree``: the mean of the updates whose inner
  product with the coordinate-wise median is positive (``robust.agreeing_mean``);
  ``quorum`` (the default for a new run): every update of the step is first shortened to at
  most 2 × the median norm of the step's updates, then ``agree``'s mean is taken over the
  updates whose cosine with the median is also at least half the step's median cosine
  (``robust.relative_agreement``; ``quorum_step``); and a FedBuff buffer that is full
  (K updates) waits for more until K of them agree, up to 2K (``quorum_reached``; under
  ``--adaptive-k`` up to K, ``adaptive_k.quorum_devices``). See
  ``coordinator.robust``. These count each update once: the claimed sample count plays no
  part. A step of sparse updates (``topk``, ``sparse`` codecs: its median update at most
  ``sparse_agreement.SPARSE_DENSITY`` nonzero), whose coordinate-wise median is zero almost
  everywhere, is judged on each update's own support instead (``coordinator.sparse_agreement``):
  an update is left out only when it points against the median of the other updates that
  sent its coordinates, a value of the others counts only where it has the sign of the median
  at its coordinate, and each update weighs its claimed sample count capped at
  ``SPARSE_CLAIM_CAP`` × the step's lower median claim.

  Why ``quorum``: measured (BENCHMARKS.md, poisoning), most of what two hostile devices of ten
  cost ``agree`` is not what it lets through but what it leaves out: each hostile update it
  drops still took one of the K places of its step, which is then made of three or four
  honest updates instead of five. Waiting for K agreeing updates gives every step K honest
  ones while fewer than half are hostile, and a larger buffer gives the median a larger
  honest majority to agree with. The step's own norm bound matters when hostile updates are
  kept: the adaptive bound remembers the norms of 64 updates, so late in a run, when honest
  updates have become shorter, it still lets through updates several times their length
  (measured: 4 to 5 times on MNIST), and two of those kept in one step outweigh three honest
  ones. A clean step is unchanged (its K updates agree at once and differ by less than 2× in
  norm).
- ``cap:MULTIPLE`` (with the mean): the weight an update's claimed sample count buys is at
  most ``MULTIPLE`` (>= 1) × the lower median of the claims of the updates of its step
  (``robust.cap_sample_counts``), e.g. ``mean+cap:2``; a claim of 2^40 among honest claims
  of about 200 then weighs about 400.
- ``clip:BOUND``: every accepted update is first scaled down to an L2 norm of at most
  ``BOUND`` (updates above ``--max-norm`` are still rejected); composes with any
  aggregator, e.g. ``median+clip:5``. ``clip:5`` alone means ``mean+clip:5``.

``str(spec)`` is the canonical form (aggregator, cap, clip, numbers as Python writes them),
used to compare a run's aggregator on resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.aggregation import State, weighted_average
from coordinator.robust import (
    AgreeResult,
    agreeing_mean,
    cap_sample_counts,
    clip_to_median_norm,
    clipped_agreeing_mean,
    coordinate_median,
    krum_min_updates,
    multi_krum,
    trimmed_mean,
    trimmed_min_updates,
)
from coordinator.sparse_agreement import (
    sparse_agreeing_mean,
    sparse_step,
)

__all__ = [
    "AGGREGATOR_KINDS",
    "DEFAULT_AGGREGATOR",
    "QUORUM_AGREEMENT",
    "QUORUM_LIMIT",
    "QUORUM_NORM_MULTIPLE",
    "AggregatorSpec",
    "buffer_limit",
    "capped_mean",
    "parse_aggregator",
    "quorum_reached",
    "quorum_readiness",
    "quorum_step",
    "robust_aggregate",
]

AGGREGATOR_KINDS: tuple[str, ...] = ("mean", "median", "agree", "quorum", "trimmed", "krum")
# what a new run uses when no aggregator is asked for (docs/operations.md, "Choosing the
# defences", and BENCHMARKS.md, poisoning): defined for any number of updates per step, so it
# fits every mode and buffer size (a run started under an older default keeps its own)
DEFAULT_AGGREGATOR = "quorum"
# quorum: a full buffer waits for at most this many times K updates
QUORUM_LIMIT = 2
# quorum: each update of a step is first shortened to at most this many times the median
# norm of the step's updates
QUORUM_NORM_MULTIPLE = 2.0
# quorum: an update agrees when its cosine with the step's median is positive and at least
# this fraction of the step's median cosine (robust.relative_agreement)
QUORUM_AGREEMENT = 0.5
# quorum on a sparse step (sparse_agreement.sparse_agreeing_mean): an update is left out whole
# only when it points against the others (a negative cosine of at least QUORUM_AGREEMENT x the
# step's median cosine in size); each update's claimed sample count weighs at most this many
# times the step's lower median claim
SPARSE_CLAIM_CAP = 2.0
_SYNTAX = (
    "expected mean, median, agree, quorum, trimmed:FRACTION or krum:F[:M], optionally "
    "+clip:BOUND "
    "(and for the mean +cap:MULTIPLE)"
)


def _num(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class AggregatorSpec:
    """A parsed aggregator spec (build it with ``parse_aggregator``)."""

    kind: str = "mean"
    trim: float = 0.0  # trimmed
    f: int = 0  # krum: hostile updates assumed per step
    m: int | None = None  # krum: updates averaged (None: n - f)
    clip: float | None = None  # L2 bound every update is scaled down to
    cap: float | None = None  # the mean: n counts at most cap x the step's median claim

    def __post_init__(self) -> None:
        """The same rules as ``parse_aggregator``, for a spec built directly."""
        if self.kind not in AGGREGATOR_KINDS:
            raise ValueError(f"unknown aggregator {self.kind!r}; {_SYNTAX}")
        if self.kind == "trimmed" and not (math.isfinite(self.trim) and 0 < self.trim < 0.5):
            raise ValueError(f"the trim fraction must be in (0, 0.5), got {self.trim!r}")
        if self.kind != "trimmed" and self.trim != 0:
            raise ValueError(f"trim is for trimmed only, not {self.kind}")
        if not (isinstance(self.f, int) and self.f >= 0):
            raise ValueError(f"krum's F must be an integer >= 0, got {self.f!r}")
        if self.m is not None and not (isinstance(self.m, int) and self.m >= 1):
            raise ValueError(f"krum's M must be an integer >= 1, got {self.m!r}")
        if self.kind != "krum" and (self.f != 0 or self.m is not None):
            raise ValueError(f"F and M are for krum only, not {self.kind}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"the clip bound must be finite and > 0, got {self.clip!r}")
        if self.cap is not None:
            if not (math.isfinite(self.cap) and self.cap >= 1):
                raise ValueError(f"the cap multiple must be finite and >= 1, got {self.cap!r}")
            if self.kind != "mean":
                raise ValueError(
                    f"cap weighs the mean only; {self.kind} counts each update once already"
                )

    @property
    def robust(self) -> bool:
        """True for the aggregators that count each update once (not the mean)."""
        return self.kind != "mean"

    @property
    def keeps_deltas(self) -> bool:
        """True when a step needs the buffered deltas themselves, not a running sum: a
        robust aggregator, or a mean whose weights are capped by the step's claims."""
        return self.robust or self.cap is not None

    @property
    def min_updates(self) -> int:
        """The fewest updates one step of this aggregator is defined for."""
        if self.kind == "trimmed":
            return trimmed_min_updates(self.trim)
        if self.kind == "krum":
            return krum_min_updates(self.f)
        return 1

    def __str__(self) -> str:
        if self.kind == "trimmed":
            base = f"trimmed:{_num(self.trim)}"
        elif self.kind == "krum":
            base = f"krum:{self.f}" + ("" if self.m is None else f":{self.m}")
        else:
            base = self.kind
        if self.cap is not None:
            base += f"+cap:{_num(self.cap)}"
        return base if self.clip is None else f"{base}+clip:{_num(self.clip)}"


def _fraction(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {text!r}")
    return value


def _integer(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{what} must be a whole number >= 0, got {text!r}")
    return int(text)


def parse_aggregator(spec: str) -> AggregatorSpec:
    """Parse an aggregator spec; ``ValueError`` with one line saying what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{spec!r}: empty spec; {_SYNTAX}")
    kind: str | None = None
    trim = 0.0
    f = 0
    m: int | None = None
    clip: float | None = None
    cap: float | None = None
    for part in spec.strip().split("+"):
        name, _, rest = part.partition(":")
        args = rest.split(":") if rest else []
        if name == "cap":
            if cap is not None:
                raise ValueError(f"{spec!r}: cap given twice")
            if len(args) != 1:
                raise ValueError(f"{spec!r}: cap takes one multiple, e.g. cap:2")
            cap = _fraction(args[0], "the cap multiple")
            if cap < 1:
                raise ValueError(
                    f"{spec!r}: the cap multiple must be >= 1 (times the step's median claim)"
                )
            continue
        if name == "clip":
            if clip is not None:
                raise ValueError(f"{spec!r}: clip given twice")
            if len(args) != 1:
                raise ValueError(f"{spec!r}: clip takes one bound, e.g. clip:5")
            clip = _fraction(args[0], "the clip bound")
            if clip <= 0:
                raise ValueError(f"{spec!r}: the clip bound must be > 0")
            continue
        if name not in AGGREGATOR_KINDS:
            raise ValueError(f"{spec!r}: unknown part {part!r}; {_SYNTAX}")
        if kind is not None:
            raise ValueError(f"{spec!r}: more than one aggregator ({kind}, {name})")
        kind = name
        if name in ("mean", "median", "agree", "quorum"):
            if args:
                raise ValueError(f"{spec!r}: {name} takes no argument")
        elif name == "trimmed":
            if len(args) != 1:
                raise ValueError(f"{spec!r}: trimmed takes one fraction, e.g. trimmed:0.2")
            trim = _fraction(args[0], "the trim fraction")
            if not 0 < trim < 0.5:
                raise ValueError(
                    f"{spec!r}: the trim fraction must be in (0, 0.5) (dropped from each end)"
                )
        else:  # krum
            if len(args) not in (1, 2):
                raise ValueError(f"{spec!r}: krum takes F or F:M, e.g. krum:1 or krum:1:3")
            f = _integer(args[0], "krum's F")
            if len(args) == 2:
                m = _integer(args[1], "krum's M")
                if m < 1:
                    raise ValueError(f"{spec!r}: krum's M must be >= 1")
    kind = kind or "mean"
    if cap is not None and kind != "mean":
        raise ValueError(
            f"{spec!r}: cap weighs the mean only; {kind} counts each update once already"
        )
    return AggregatorSpec(kind, trim, f, m, clip, cap)


def capped_mean(
    spec: AggregatorSpec, deltas: Sequence[Mapping[str, np.ndarray]], claims: Sequence[int]
) -> State:
    """``Σ n'_i Δ_i / Σ n'_i`` with ``n'`` the ``claims`` capped at ``spec.cap`` × their
    lower median (``robust.cap_sample_counts``)."""
    if spec.cap is None or spec.robust:
        raise ValueError(f"{spec} is not a capped mean")
    return weighted_average(deltas, cap_sample_counts(claims, spec.cap))


def robust_aggregate(
    spec: AggregatorSpec, deltas: Sequence[Mapping[str, np.ndarray]],
    claims: Sequence[int] | None = None,
) -> tuple[State, bool]:
    """One step of a robust ``spec`` over ``deltas`` (each counting once; ``claims``, the
    claimed sample counts, weigh only a sparse ``quorum`` step, ``quorum_step``); returns
    ``(aggregate, fell_back)``.

    With fewer deltas than the aggregator is defined for (``spec.min_updates``: a partial
    buffer, a small FedAvg round), the coordinate-wise median of what there is is used
    instead (``fell_back`` True): it is defined for any count and is the most robust of the
    three for few updates. Krum's ``M`` is capped at ``n − F`` for the ``n`` at hand."""
    if not spec.robust:
        raise ValueError("the mean is not a robust aggregator: use coordinator.aggregation")
    if spec.kind == "agree":
        return agreeing_mean(deltas).aggregate, False
    if spec.kind == "quorum":
        return quorum_step(deltas, claims).aggregate, False
    if len(deltas) < spec.min_updates or spec.kind == "median":
        return coordinate_median(deltas), spec.kind != "median"
    if spec.kind == "trimmed":
        return trimmed_mean(deltas, spec.trim), False
    m = None if spec.m is None else min(spec.m, len(deltas) - spec.f)
    return multi_krum(deltas, spec.f, m).aggregate, False


def sparse_codec_warning(spec: AggregatorSpec, codec: str) -> str | None:
    """Why ``codec`` and ``spec`` work against each other, or None. A coordinate-wise median
    of sparse updates (``topk``, ``sparse``) is zero almost everywhere, so ``agree`` finds few
    updates that agree with it and throws most of each step away. ``quorum`` judges a sparse
    step on each update's own support instead (``coordinator.sparse_agreement``), but still
    leaves out honest updates that point against the others on the few coordinates they
    share, and with error feedback what it leaves out is lost: measured on digits with
    ``sparse:0.007:sign`` over five seeds, 1.11 points of accuracy lost against fp32 (median;
    3.06 with the rule before, three seeds), 1.39 under the plain mean in the same run
    (BENCHMARKS.md, bytes)."""
    sparse = codec.split(":", 1)[0] in ("topk", "sparse")
    if sparse and spec.kind == "agree":
        return (f"codec {codec} sends sparse updates, and the agree aggregator keeps only "
                "updates that agree with the step's coordinate-wise median, which is mostly "
                "zero for them: expect most updates to be left out; with sparse updates use "
                "--aggregator quorum or mean, see docs/operations.md")
    if sparse and spec.kind == "quorum":
        return (f"codec {codec} sends sparse updates: the quorum aggregator judges them on "
                "each update's own support and leaves out those that point against the "
                "others (measured on digits: about as accurate as --aggregator mean, which "
                "has no defence against poisoning, and 1 to 1.5 points below fp32); see "
                "docs/operations.md, \"Small updates and model deltas\"")
    return None


def buffer_limit(k: int, online: int) -> int:
    """The most updates a ``quorum`` buffer of target ``k`` holds before it is applied
    whatever they agree on: ``QUORUM_LIMIT`` × ``k``, but no more than the ``online`` devices
    (when known, i.e. > 0; each trains once per version) and never less than ``k``."""
    if k < 1 or online < 0:
        raise ValueError(f"need k >= 1 and online >= 0, got k={k}, online={online}")
    limit = QUORUM_LIMIT * k
    return max(k, min(limit, online)) if online else limit


def quorum_reached(
    spec: AggregatorSpec, deltas: Sequence[Mapping[str, np.ndarray]], k: int, online: int
) -> bool:
    """Whether a FedBuff buffer holding ``deltas`` (as kept, clipped and staleness-scaled) is
    ready for a step of target ``k`` (K, or fewer when fewer devices are ``online``; 0:
    unknown). Every aggregator but ``quorum``: when it holds ``k``. ``quorum``: when ``k`` of
    them agree (``robust.agreeing_mean``; for sparse deltas
    ``sparse_agreement.sparse_agreeing_mean``), or it holds ``buffer_limit(k, online)``."""
    return quorum_readiness(spec, deltas, k, online)[0]


def quorum_readiness(
    spec: AggregatorSpec, deltas: Sequence[Mapping[str, np.ndarray]], k: int, online: int,
    counts: Sequence[int] | None = None,
    claims: Sequence[int] | None = None,
) -> tuple[bool, AgreeResult | None]:
    """``quorum_reached``, and the ``quorum_step`` of ``deltas`` when it was worked out to
    decide (``quorum`` below its buffer limit; else None): the readiness check computes the
    step's median and agreement anyway, so a step made from the same deltas reuses it
    instead of stacking and sorting them again.

    ``counts`` (revision 2.12): how many device updates each delta stands for (a regional
    aggregator's partial update: its ``parts``; None: one each). ``k`` and the buffer limit
    then count device updates: the buffer is full when its deltas stand for ``k``, and
    ``quorum`` waits until the deltas that agree stand for ``k``. Each delta is still one
    vote in the median and the agreement, whatever it stands for. ``claims``: the claimed
    sample counts, in the order of ``deltas``, which weigh a sparse step (``quorum_step``)."""
    if counts is None:
        counts = [1] * len(deltas)
    if len(counts) != len(deltas) or any(c < 1 for c in counts):
        raise ValueError("counts must give a count >= 1 for every delta")
    count = sum(counts)
    if count < k:
        return False, None
    if spec.kind != "quorum" or count >= buffer_limit(k, online):
        return True, None
    step = quorum_step(deltas, claims)
    return sum(counts[i] for i in step.kept) >= k, step


def quorum_step(
    deltas: Sequence[Mapping[str, np.ndarray]], claims: Sequence[int] | None = None
) -> AgreeResult:
    """``quorum``'s step: every delta shortened to at most ``QUORUM_NORM_MULTIPLE`` × the
    median norm of the step (``robust.clip_to_median_norm``), then the mean of those that
    agree with their coordinate-wise median: a positive inner product, and a cosine with it
    of at least ``QUORUM_AGREEMENT`` × the step's median cosine (``robust.agreeing_mean``
    with ``relative``); ``claims`` play no part. A sparse step
    (``sparse_agreement.sparse_step``) is judged on each delta's own support instead:
    only deltas that point against the others are left out, values are outvoted coordinate
    by coordinate, and the deltas are weighed by their ``claims`` (the claimed sample counts,
    in the order of ``deltas``) capped at ``SPARSE_CLAIM_CAP`` × their lower median, each
    counting once without them (``sparse_agreement.sparse_agreeing_mean``)."""
    if sparse_step(deltas):
        clipped, _ = clip_to_median_norm(deltas, QUORUM_NORM_MULTIPLE)
        weights = None if claims is None else cap_sample_counts(claims, SPARSE_CLAIM_CAP)
        return sparse_agreeing_mean(clipped, QUORUM_AGREEMENT, weights=weights, whole=False)
    return clipped_agreeing_mean(deltas, QUORUM_NORM_MULTIPLE, QUORUM_AGREEMENT)
