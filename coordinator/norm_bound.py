"""The adaptive norm bound: how large an update may be, decided from the updates accepted
before it. Pure functions, no state of their own: the caller keeps the window.

The window holds the global L2 norms of the most recently accepted updates (at most
``NormRule.window`` of them, oldest first), as they arrived (before any clipping). From it:

- the **clip bound** ``B = multiple × median(window)``: an update whose norm is above ``B``
  is scaled down to ``B`` (``clip``) and aggregated like any other;
- the **reject bound** ``R = reject × B``: an update above ``R`` is refused (``reject``,
  reason ``norm``).

Why clip between ``B`` and ``R`` and reject above ``R``: honest updates of one step differ
by about 2× in norm (measured on digits and MNIST: the largest of a step of five is at most
1.9× their median), and an honest device may legitimately send a larger one (more local
data, an unusual shard, a phase of training where norms grow while the window still
remembers smaller ones). Clipping keeps such an update's direction and its information and
bounds its influence to that of a typical update; refusing it would waste honest work.
Far above the bound (``R`` is 8× the median with the defaults), no honest update of the
same task comes near: that is a broken or hostile device, and a refusal with a reason is
what its operator needs to see. Whatever a device sends, the most it can put into a step
is an update of norm ``B``.

Before the window holds ``min_samples`` norms (the start of a run, when a hostile device
may be the first to report), there is no median to trust yet, and the rule is relative to
the current global model instead: ``B = warmup_fraction × ‖θ‖`` (an update may move the
model by at most that multiple of its own length), and nothing is refused, only clipped.
Measured at the first version, honest updates are 0.35–0.65 × the model's norm on digits
(mlp), 0.44–0.53 × on MNIST (cnn) and 2.2–3.8 × on the motions windows (cnn1d, whose
first steps grow the weights from a small start), so the default ``4`` lets every honest
first update through and bounds a hostile one to a few times an honest one. (``0.5``,
tried first, cut the motions model's first steps by 5–7× and left it at 0.5 accuracy for
eight versions.) Refusing in the warm-up could stall a run for good: if every honest update
were above a model-relative reject bound (many local epochs, a large learning rate), no
norm would ever enter the window and the bound would never adapt. A model whose norm is 0
(an all-zero start) gives no warm-up bound: until the window fills, only the fixed ceiling
(``--max-norm``) applies.

Once the window is full enough, a refusal does not enter it, so honest updates that all
become more than ``reject × multiple`` times longer than the remembered ones (training
settings changed on resume, say 100× the epochs) are all refused until ``--norm-reject`` is
raised; the receipts' ``detail`` names the bound and where it came from.

A window with fewer than half of its entries hostile keeps its median between honest norms
(20% hostile entries move it at most to the 62.5th percentile of honest norms, whatever
values they hold), so hostile devices can neither raise the bound without limit nor push
honest updates over the reject bound.

Everything is a function of the window, the model's norm and the rule, which the caller
keeps in durable state, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_NORM_MULTIPLE",
    "NormDecision",
    "NormRule",
    "decide_norm",
    "pushed",
    "window_median",
]


def _finite_pos(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


# the clip bound's multiple of the window's median norm when none is given
DEFAULT_NORM_MULTIPLE = 2.0


@dataclass(frozen=True)
class NormRule:
    """The adaptive bound's settings; checked on construction (``ValueError``).

    ``multiple`` 0 switches the adaptive bound off (only the fixed ceiling applies)."""

    multiple: float = DEFAULT_NORM_MULTIPLE  # clip bound: this x the window's median norm
    reject: float = 4.0  # reject bound: this x the clip bound
    window: int = 64  # accepted norms remembered
    min_samples: int = 8  # fewer in the window: the warm-up rule
    warmup_fraction: float = 4.0  # warm-up clip bound: this x the global model's norm

    def __post_init__(self) -> None:
        m = self.multiple
        if not (isinstance(m, int | float) and not isinstance(m, bool) and math.isfinite(m)
                and (m == 0 or m >= 1)):
            raise ValueError(f"the norm multiple must be 0 (off) or >= 1, got {m!r}")
        if not (_finite_pos(self.reject) and self.reject >= 1):
            raise ValueError(f"the norm reject factor must be >= 1, got {self.reject!r}")
        for name in ("window", "min_samples"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"the norm {name.replace('_', ' ')} must be an integer >= 1, "
                                 f"got {value!r}")
        if self.min_samples > self.window:
            raise ValueError(
                f"the norm window ({self.window}) must hold at least min_samples "
                f"({self.min_samples}) norms"
            )
        if not _finite_pos(self.warmup_fraction):
            raise ValueError(
                f"the warm-up fraction must be finite and > 0, got {self.warmup_fraction!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.multiple > 0


@dataclass(frozen=True)
class NormDecision:
    """What to do with one update: ``keep``, ``clip`` (to ``clip_bound``) or ``reject``.

    ``clip_bound``/``reject_bound`` are the bounds in force (None when no adaptive bound
    applies; no reject bound in the warm-up) and ``basis`` says where they came from, for
    receipts and logs."""

    action: str
    clip_bound: float | None
    reject_bound: float | None
    basis: str


def window_median(window: Sequence[float]) -> float:
    """The median of the window (mean of the two middle values for an even count)."""
    if not window:
        raise ValueError("the window is empty")
    ordered = sorted(float(v) for v in window)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2.0


def decide_norm(
    rule: NormRule, norm: float, window: Sequence[float], model_norm: float
) -> NormDecision:
    """The decision for an update of global L2 norm ``norm`` (finite, >= 0), given the norms
    of the updates accepted before it (``window``, oldest first; only the newest
    ``rule.window`` count) and the current global model's norm."""
    if not (math.isfinite(norm) and norm >= 0):
        raise ValueError(f"the norm must be finite and >= 0, got {norm!r}")
    if not rule.enabled:
        return NormDecision("keep", None, None, "adaptive bound off")
    recent = list(window)[-rule.window:]
    if len(recent) >= rule.min_samples:
        median = window_median(recent)
        clip = rule.multiple * median
        basis = (f"{rule.multiple:g} x the median norm {median:.4g} of the last "
                 f"{len(recent)} accepted updates")
    elif math.isfinite(model_norm) and model_norm > 0:
        clip = rule.warmup_fraction * model_norm
        basis = (f"warm-up ({len(recent)} of {rule.min_samples} norms known): "
                 f"{rule.warmup_fraction:g} x the model's norm {model_norm:.4g}")
        return NormDecision("clip" if norm > clip else "keep", clip, None, basis)
    else:
        return NormDecision("keep", None, None, "warm-up with a zero model: no bound yet")
    if clip <= 0:  # every remembered norm was 0: nothing but a zero update is typical
        return NormDecision("keep", None, None, "every remembered norm is 0: no bound")
    reject = rule.reject * clip
    if norm > reject:
        return NormDecision("reject", clip, reject, basis)
    if norm > clip:
        return NormDecision("clip", clip, reject, basis)
    return NormDecision("keep", clip, reject, basis)


def pushed(window: Sequence[float], norm: float, size: int) -> tuple[float, ...]:
    """The window after one more accepted update of norm ``norm``: its newest ``size``."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return (*tuple(window)[-(size - 1):], float(norm)) if size > 1 else (float(norm),)
