"""The device training policy as pure decisions: no clock, no files, no processes.

An operator restricts when and how hard a device trains (docs/operations.md, "Device training
policy"): inside local time windows only, not while a pause file exists or a check command
says no, at most a share of one core, under a memory ceiling. This module parses those
settings and turns observations into decisions; ``edge_agent.gate`` observes (reads the
clock, looks for the file, runs the command, reads CPU time and memory) and applies them.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CheckResult",
    "Decision",
    "TimeWindow",
    "TrainingPolicy",
    "cpu_pacing_delay",
    "decide",
    "memory_block",
    "parse_window",
    "parse_windows",
    "transition_message",
]

_DAY = 24 * 60  # minutes
_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class TimeWindow:
    """Local wall-clock minutes ``[start, end)`` of a day; ``end < start`` crosses midnight
    (``22:00-06:00``), ``00:00-24:00`` is the whole day."""

    start: int  # 0 .. 1439
    end: int  # 0 .. 1440, != start

    def contains(self, minute: int) -> bool:
        """Whether minute-of-day ``minute`` (0 .. 1439) lies inside the window."""
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"


def parse_window(text: str) -> TimeWindow:
    """``"HH:MM-HH:MM"`` (24-hour local time; ``24:00`` only as an end) as a window.

    ``ValueError`` with a one-line message for anything else, including an empty window
    (start equal to end).
    """
    match = _WINDOW.match(text.strip())
    if match is None:
        raise ValueError(f"training window {text!r} is not HH:MM-HH:MM (e.g. 22:00-06:00)")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        raise ValueError(
            f"training window {text!r}: hours must be 00-23 (24:00 only as an end), "
            "minutes 00-59"
        )
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % _DAY and end != _DAY:
        raise ValueError(
            f"training window {text!r} is empty (start equals end); 00:00-24:00 is the whole day"
        )
    return TimeWindow(start, end)


def parse_windows(texts: Iterable[str]) -> tuple[TimeWindow, ...]:
    """Several windows; training may happen inside any of them. None: any time."""
    return tuple(parse_window(t) for t in texts)


@dataclass(frozen=True)
class TrainingPolicy:
    """The parsed, validated policy of one agent (from ``AgentConfig.training_policy()``)."""

    windows: tuple[TimeWindow, ...] = ()  # empty: any time of day
    pause_file: Path | None = None  # training pauses while this path exists
    check: tuple[str, ...] = ()  # argv; exit status 0 = may train; empty: no command
    check_timeout: float = 10.0  # seconds; a check that takes longer counts as "no"
    interval: float = 5.0  # seconds between evaluations
    nice: int | None = None  # nice value of the training thread; None: left as started
    cpu_share: float = 0.0  # most CPU time per wall time while training (1.0 = one core); 0: off
    memory_bytes: int = 0  # ceiling on resident memory while training; 0: off

    @classmethod
    def from_settings(
        cls, *, windows: Iterable[str] = (), pause_file: Path | None = None,
        check: str | None = None, check_shell: bool = False, check_timeout: float = 10.0,
        interval: float = 5.0, nice: int | None = None, cpu_share: float = 0.0,
        memory_mib: int = 0,
    ) -> TrainingPolicy:
        """Validate the agent's settings; ``ValueError`` (one line) names the bad one.

        ``check`` is split like a POSIX shell would split words (``shlex``) and run without
        a shell; with ``check_shell`` it is run by ``/bin/sh -c`` as it is.
        """
        argv: tuple[str, ...] = ()
        if check is not None and check.strip():
            if check_shell:
                argv = ("/bin/sh", "-c", check)
            else:
                try:
                    argv = tuple(shlex.split(check))
                except ValueError as exc:
                    raise ValueError(f"train_check {check!r}: {exc}") from None
        elif check_shell:
            raise ValueError("train_check_shell needs a train_check command")
        if not (math.isfinite(check_timeout) and check_timeout > 0):
            raise ValueError(f"train_check_timeout must be a number > 0, got {check_timeout}")
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"policy_interval must be a number > 0, got {interval}")
        if nice is not None and not -20 <= nice <= 19:
            raise ValueError(f"nice must be -20 .. 19, got {nice}")
        if not (math.isfinite(cpu_share) and cpu_share >= 0):
            raise ValueError(
                f"max_cpu_share must be 0 (no cap) or a share of one core > 0, got {cpu_share}"
            )
        if memory_mib < 0:
            raise ValueError(f"max_memory_mib must be 0 (no ceiling) or more, got {memory_mib}")
        return cls(
            windows=parse_windows(windows), pause_file=pause_file, check=argv,
            check_timeout=check_timeout, interval=interval, nice=nice, cpu_share=cpu_share,
            memory_bytes=memory_mib * 1024 * 1024,
        )

    @property
    def restricts_when(self) -> bool:
        """Whether anything can pause training (windows, pause file, check command)."""
        return bool(self.windows) or self.pause_file is not None or bool(self.check)

    def describe(self) -> str:
        """One line for the log at start-up."""
        parts = []
        if self.windows:
            parts.append("windows " + ",".join(str(w) for w in self.windows))
        if self.pause_file is not None:
            parts.append(f"pause file {self.pause_file}")
        if self.check:
            parts.append(f"check {shlex.join(self.check)} (timeout {self.check_timeout:g} s)")
        if self.nice is not None:
            parts.append(f"nice {self.nice}")
        if self.cpu_share:
            parts.append(f"at most {self.cpu_share:g} of a core")
        if self.memory_bytes:
            parts.append(f"memory ceiling {self.memory_bytes // (1024 * 1024)} MiB")
        return "; ".join(parts) if parts else "none"


@dataclass(frozen=True)
class CheckResult:
    """What running the check command gave: its exit status, or why there is none."""

    returncode: int | None = None  # None: it timed out or could not be run
    timed_out: bool = False
    error: str | None = None  # could not be started (e.g. not found, not executable)


@dataclass(frozen=True)
class Decision:
    """Whether the device may train now; ``reason`` says why not (empty when it may)."""

    train: bool
    reason: str = ""


def _next_opening(windows: tuple[TimeWindow, ...], minute: int) -> str:
    ahead = min((w.start - minute) % _DAY for w in windows)
    return _hhmm((minute + ahead) % _DAY)


def decide(
    *, policy: TrainingPolicy, minute: int, pause_file_exists: bool | None = None,
    check: CheckResult | None = None,
) -> Decision:
    """The decision for local minute-of-day ``minute`` (0 .. 1439).

    The window is judged first, then the pause file, then the command: the first that says
    no gives the reason, so the caller need not look at the file or run the command (pass
    None) while outside every window. A check that timed out or could not run says no.
    """
    if policy.windows and not any(w.contains(minute) for w in policy.windows):
        shown = ",".join(str(w) for w in policy.windows)
        return Decision(False, f"outside the training window {shown} "
                               f"(next opens at {_next_opening(policy.windows, minute)})")
    if policy.pause_file is not None and pause_file_exists:
        return Decision(False, f"pause file {policy.pause_file} exists")
    if policy.check and check is not None:
        if check.error is not None:
            return Decision(False, f"cannot run the check command: {check.error}")
        if check.timed_out or check.returncode is None:
            return Decision(False, f"the check command took more than "
                                   f"{policy.check_timeout:g} s")
        if check.returncode != 0:
            return Decision(False, f"the check command exited with {check.returncode}")
    return Decision(True)


def transition_message(previous: Decision | None, current: Decision) -> str | None:
    """The log line for a change of decision, or None when nothing changed (or at start,
    when training is allowed: that is the default and says nothing new)."""
    if previous is None:
        return None if current.train else f"training paused: {current.reason}"
    if previous == current:
        return None
    if current.train:
        return f"training resumed (was paused: {previous.reason})"
    if previous.train:
        return f"training paused: {current.reason}"
    return f"training still paused: {current.reason}"


def cpu_pacing_delay(cpu_seconds: float, wall_seconds: float, share: float) -> float:
    """Seconds to sleep so that ``cpu_seconds`` of CPU used over ``wall_seconds`` of wall time
    is at most ``share`` of one core: ``cpu / share - wall``, or 0 when within the cap (or
    no cap, ``share`` 0)."""
    if share <= 0:
        return 0.0
    return max(0.0, cpu_seconds / share - wall_seconds)


def memory_block(resident_bytes: int, ceiling_bytes: int) -> str | None:
    """Why training must stop at ``resident_bytes`` of resident memory, or None."""
    if ceiling_bytes <= 0 or resident_bytes <= ceiling_bytes:
        return None
    mib = 1024 * 1024
    return (f"resident memory {resident_bytes / mib:.0f} MiB is over the ceiling of "
            f"{ceiling_bytes / mib:.0f} MiB (max_memory_mib)")
