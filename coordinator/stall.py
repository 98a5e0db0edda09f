"""Noticing a run that makes no progress because every update is rejected.

A fleet whose every update is refused makes no new model version, and without a new version
the devices have nothing new to train on: the run sits still and nothing more is logged. The
typical cause is data: features that are not scaled make huge first updates, all rejected for
their norm. ``StallDetector`` is fed every verdict and says, at most once per window, when
no update has been accepted for a whole window while some were rejected. Pure: the caller
passes the clock.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["OPERATIONS_ANCHOR", "StallDetector"]

OPERATIONS_ANCHOR = "docs/operations.md#a-run-that-stalls"


class StallDetector:
    """Counts rejections since the last accepted update; ``check`` returns a warning once
    the first of them is ``window`` seconds old with nothing accepted since, then at most
    once per ``window`` while that lasts. ``window`` 0 switches it off."""

    def __init__(self, window: float) -> None:
        if not window >= 0:
            raise ValueError(f"the stall window must be >= 0 seconds, got {window}")
        self.window = window
        self._since: float | None = None  # first rejection after the last acceptance
        self._reasons: Counter[str] = Counter()
        self._devices: set[str] = set()
        self._detail = ""
        self._warned_at: float | None = None

    def record(self, now: float, device: str, accepted: bool, reason: str | None,
               detail: str = "") -> None:
        """One verdict (not a repeated one) on ``device``'s update at ``now``."""
        if accepted:
            self._since = None
            self._reasons.clear()
            self._devices.clear()
            self._warned_at = None
            return
        if self._since is None:
            self._since = now
        self._reasons[reason or "unknown"] += 1
        self._devices.add(device)
        self._detail = detail

    def check(self, now: float) -> str | None:
        """The warning to log now, or None."""
        if not self.window or self._since is None or now - self._since < self.window:
            return None
        if self._warned_at is not None and now - self._warned_at < self.window:
            return None
        self._warned_at = now
        total = sum(self._reasons.values())
        devices = len(self._devices)
        who = f"{devices} device{'s' if devices != 1 else ''}"
        seconds = f"{now - self._since:.0f} s"
        if set(self._reasons) == {"norm"}:
            return (
                f"no update accepted for {seconds}: every update of {who} ({total}) was "
                f"rejected for its norm ({self._detail}): are the features scaled? Give the "
                "task an input normalisation (--normalize) and check a device's data with "
                f"`fedbus data check`; see {OPERATIONS_ANCHOR}"
            )
        reasons = ", ".join(f"{r} {n}" for r, n in self._reasons.most_common())
        return (
            f"no update accepted for {seconds}: every update of {who} ({total}) was rejected "
            f"({reasons}; last: {self._detail}); the run makes no progress: see "
            f"{OPERATIONS_ANCHOR}"
        )
