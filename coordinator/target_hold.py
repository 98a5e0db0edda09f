"""A stable target: when ``--target-accuracy`` ends a run (pure; times are given).

Held-out accuracy of an asynchronous run is noisy: a version can reach the target and the
next ones fall back below it. So a version that reaches the target (accuracy >= ``target``)
is only a *candidate*; the target *held* once ``hold`` seconds have passed since the
candidate was evaluated and at least ``fraction`` (90%) of the versions evaluated in those
seconds reached the target too. Precisely, for a candidate evaluated at time ``t``:

- the window is the evaluations made at times in ``(t, t + hold]`` (the candidate itself
  is not counted);
- it is judged once ``now >= t + hold``; it held when ``above >= fraction x versions``
  (``above``: evaluations in the window at or above the target). An empty window (no
  version was evaluated in those seconds) holds: the candidate stayed the evaluated
  model throughout;
- candidates are judged oldest first; the first that held decides. One that did not hold
  is dropped, and the next candidate (a later version at or above the target) is judged
  on its own window.

"Versions evaluated": when versions come faster than evaluation, the coordinator evaluates
only the newest waiting one (``CoordinatorService._record_made``); versions it did not
evaluate have no accuracy and count neither way. ``hold = 0`` is the first hit: the
window ``(t, t]`` is empty, so the first candidate holds at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["HOLD_FRACTION", "Evaluated", "Judgement", "TargetWatch", "first_held"]

HOLD_FRACTION = 0.9


@dataclass(frozen=True)
class Evaluated:
    """One evaluated version: when it was evaluated (seconds, any clock), its accuracy."""

    at: float
    version: int
    accuracy: float


@dataclass(frozen=True)
class Judgement:
    """A candidate judged once its window closed: it reached ``target``, and ``above`` of
    the ``versions`` evaluated in the ``hold`` seconds after it reached it too; ``held``
    says whether that is enough."""

    candidate: Evaluated
    target: float
    hold: float
    versions: int
    above: int
    held: bool

    @property
    def decided_at(self) -> float:
        return self.candidate.at + self.hold

    def describe(self) -> str:
        """E.g. ``reached accuracy 0.934 (v41): target 0.93 held by 93% of 14 versions
        over 20 s``; ``reached accuracy 0.934 (v41)`` when ``hold`` is 0."""
        c = self.candidate
        head = f"reached accuracy {c.accuracy:.3f} (v{c.version})"
        if self.hold <= 0:
            return head
        share = "no newer version evaluated" if self.versions == 0 else (
            f"{100.0 * self.above / self.versions:.0f}% of {self.versions} "
            f"version{'' if self.versions == 1 else 's'}")
        verb = "held by" if self.held else "not held: only"
        return f"{head}: target {self.target:g} {verb} {share} over {self.hold:g} s"


def _judge(evaluations: Sequence[Evaluated], i: int, target: float, hold: float,
           fraction: float) -> Judgement:
    """Candidate ``i``, whose window has closed."""
    c = evaluations[i]
    end = c.at + hold
    window = [e for e in evaluations[i + 1:] if c.at < e.at <= end]
    above = sum(e.accuracy >= target for e in window)
    return Judgement(c, target, hold, len(window), above, above >= fraction * len(window))


def first_held(evaluations: Sequence[Evaluated], target: float, hold: float, *,
               fraction: float = HOLD_FRACTION, now: float = float("inf")) -> Judgement | None:
    """The first candidate of ``evaluations`` (in time order) whose target held by ``now``.
    For a finished run's history pass its end as ``now``, so that windows still open at
    the end are not judged on part of their seconds."""
    for i, e in enumerate(evaluations):
        if e.accuracy < target:
            continue
        if now < e.at + hold:
            return None  # the windows of later candidates close later still
        judged = _judge(evaluations, i, target, hold, fraction)
        if judged.held:
            return judged
    return None


class TargetWatch:
    """``first_held`` fed one evaluation at a time, keeping only what a decision still
    needs (from the oldest open candidate on), so a long run costs no memory."""

    def __init__(self, target: float, hold: float, fraction: float = HOLD_FRACTION) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if hold < 0:
            raise ValueError(f"hold must be >= 0 seconds, got {hold}")
        self.target, self.hold, self.fraction = target, hold, fraction
        self._kept: list[Evaluated] = []
        self.held: Judgement | None = None
        self.missed: list[Judgement] = []  # candidates that did not hold, oldest first

    def add(self, evaluations: Iterable[Evaluated]) -> None:
        self._kept.extend(evaluations)

    def decide(self, now: float) -> Judgement | None:
        """The decision at ``now`` (once held, it stays held)."""
        if self.held is not None:
            return self.held
        kept = self._kept
        while kept:
            if kept[0].accuracy < self.target:
                kept.pop(0)
                continue
            if now < kept[0].at + self.hold:
                return None
            judged = _judge(kept, 0, self.target, self.hold, self.fraction)
            if judged.held:
                self.held = judged
                return judged
            self.missed.append(judged)
            kept.pop(0)
        return None

    @property
    def pending(self) -> Evaluated | None:
        """The oldest candidate whose window is still open."""
        return next((e for e in self._kept if e.accuracy >= self.target), None)
