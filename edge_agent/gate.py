"""Applies the device training policy (``edge_agent.policy``) in the agent's thread.

The gate observes what the pure policy needs (local time, the pause file, the check
command's exit status, CPU time, resident memory), asks ``policy.decide`` and friends, logs
one line per change of decision, and paces training:

- ``poll()`` between trainings: may the device train now? Evaluated at most every
  ``policy.interval`` seconds; the command is run without a shell (unless asked), with a
  timeout, and not at all outside the windows.
- ``begin_training()`` / ``between_batches()`` around a local training: the CPU cap sleeps
  after a batch until the training's CPU time is at most ``cpu_share`` x its wall time; the
  memory ceiling is checked against the peak resident memory since the training began; the
  policy is polled, so a pause stops the training at the next batch.
- ``start()`` sets the nice value of the calling thread (the agent's, which trains): threads
  it starts afterwards (torch's) inherit it, the MQTT network thread started before keeps its
  own priority, so keepalives and receipts are not starved by a low training priority.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.policy import (
    CheckResult,
    Decision,
    TrainingPolicy,
    cpu_pacing_delay,
    decide,
    memory_block,
    transition_message,
)
from fedbus.errors import ConfigError

__all__ = ["TrainingGate", "apply_nice", "local_minute", "run_check"]

log = logging.getLogger(__name__)

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def local_minute() -> int:
    """The local wall-clock minute of the day (0 .. 1439), in the process's time zone."""
    now = time.localtime()
    return now.tm_hour * 60 + now.tm_min


def run_check(argv: tuple[str, ...], timeout: float) -> CheckResult:
    """Run the operator's check command (no shell unless ``argv`` names one); its output is
    discarded. A command still running after ``timeout`` seconds is killed."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return CheckResult(timed_out=True)
    except OSError as exc:
        return CheckResult(error=exc.strerror or str(exc))
    return CheckResult(returncode=done.returncode)


def apply_nice(value: int) -> None:
    """Set the nice value of the calling thread (Linux; elsewhere of the process).

    ``ConfigError`` (one line) when the system refuses, e.g. a value below the current one
    without the privilege to raise priority."""
    target = threading.get_native_id() if sys.platform.startswith("linux") else 0
    try:
        os.setpriority(os.PRIO_PROCESS, target, value)
    except PermissionError:
        current = os.getpriority(os.PRIO_PROCESS, target)
        raise ConfigError(
            f"cannot set nice {value} (now {current}): a nice value below the current one "
            "needs root or CAP_SYS_NICE"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot set nice {value}: {exc.strerror or exc}") from None


def _status_kib(field: str) -> int | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's peak resident memory (``VmHWM``); False where Linux refuses."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class TrainingGate:
    """The policy applied to one agent. Every observation is injectable for tests;
    ``sleep(seconds)`` should return early when the agent stops (an ``Event.wait``)."""

    def __init__(
        self,
        policy: TrainingPolicy,
        *,
        sleep: Callable[[float], Any],
        on_change: Callable[[Decision], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        minute: Callable[[], int] = local_minute,
        path_exists: Callable[[Path], bool] = os.path.exists,
        check: Callable[[tuple[str, ...], float], CheckResult] = run_check,
        cpu_time: Callable[[], float] = time.process_time,
        resident_kib: Callable[[str], int | None] = _status_kib,
        reset_peak: Callable[[], bool] = _reset_peak,
    ) -> None:
        self.policy = policy
        self._sleep = sleep
        self._on_change = on_change
        self._clock = clock
        self._minute = minute
        self._path_exists = path_exists
        self._check = check
        self._cpu_time = cpu_time
        self._resident_kib = resident_kib
        self._reset_peak = reset_peak
        self._decision: Decision | None = None
        self._checked_at = 0.0
        self._peak_field = "VmRSS"
        self._cpu0 = self._wall0 = 0.0
        self.interruption: str | None = None  # why between_batches() stopped the training
        self.over_memory = False  # ... and whether that was the memory ceiling
        self.last_cpu_share: float | None = None  # CPU / wall time of the last training
        if policy.check:
            program = policy.check[0]
            if "/" not in program and shutil.which(program) is None:
                raise ConfigError(f"train_check: command {program!r} not found in PATH")
            if "/" in program and not (os.path.isfile(program) and os.access(program, os.X_OK)):
                raise ConfigError(f"train_check: {program} is not an executable file")

    def start(self) -> None:
        """Apply the nice value to the calling thread and log the policy; ``ConfigError``
        when the policy cannot work here. (A check command that is not an executable file,
        or not in ``PATH``, is refused when the gate is made.)"""
        policy = self.policy
        resident = self._resident_kib("VmRSS")
        if policy.memory_bytes and resident is None:
            raise ConfigError("max_memory_mib needs /proc/self/status (Linux) to read the "
                              "resident memory")
        if policy.nice is not None:
            apply_nice(policy.nice)
        if policy.restricts_when or policy.nice is not None or policy.cpu_share or (
            policy.memory_bytes
        ):
            now = f" (resident memory now {resident // 1024} MiB)" if policy.memory_bytes and (
                resident is not None) else ""
            log.info("training policy: %s%s", policy.describe(), now)

    # -- between trainings -------------------------------------------------------------

    def poll(self, *, force: bool = False) -> Decision:
        """May the device train now? Re-evaluated when ``policy.interval`` has passed since
        the last evaluation (or with ``force``); a change is logged once."""
        now = self._clock()
        if (self._decision is not None and not force
                and now - self._checked_at < self.policy.interval):
            return self._decision
        self._checked_at = now
        decision = self._evaluate()
        message = transition_message(self._decision, decision)
        self._decision = decision
        if message is not None:  # a change (or paused from the start)
            log.info("%s", message)
            if self._on_change is not None:
                self._on_change(decision)
        return decision

    def _evaluate(self) -> Decision:
        policy = self.policy
        if not policy.restricts_when:
            return Decision(True)
        minute = self._minute()
        outside = decide(policy=policy, minute=minute)
        if not outside.train:
            return outside  # neither the file nor the command matters outside the window
        exists = self._path_exists(policy.pause_file) if policy.pause_file else None
        if exists:
            return decide(policy=policy, minute=minute, pause_file_exists=True)
        result = self._check(policy.check, policy.check_timeout) if policy.check else None
        return decide(policy=policy, minute=minute, pause_file_exists=exists, check=result)

    # -- around one training ------------------------------------------------------------

    def begin_training(self) -> str | None:
        """Start measuring a training; the reason it must not start (memory), or None."""
        self.interruption, self.over_memory = None, False
        if self.policy.memory_bytes:
            self._peak_field = "VmHWM" if self._reset_peak() else "VmRSS"
            blocked = self._memory_block()
            if blocked is not None:
                self.interruption, self.over_memory = blocked, True
                return blocked
        self._cpu0, self._wall0 = self._cpu_time(), self._clock()
        return None

    def between_batches(self) -> bool:
        """Pace, check memory and the policy; True when the training must stop now
        (``interruption`` says why)."""
        policy = self.policy
        if policy.cpu_share:
            delay = cpu_pacing_delay(self._cpu_time() - self._cpu0,
                                     self._clock() - self._wall0, policy.cpu_share)
            if delay > 0:
                self._sleep(delay)
        if policy.memory_bytes:
            blocked = self._memory_block()
            if blocked is not None:
                self.interruption, self.over_memory = blocked, True
                return True
        if policy.restricts_when:
            decision = self.poll()
            if not decision.train:
                self.interruption = decision.reason
                return True
        return False

    def end_training(self) -> None:
        """Record (and log at debug level) the CPU share the training used."""
        wall = self._clock() - self._wall0
        cpu = self._cpu_time() - self._cpu0
        self.last_cpu_share = cpu / wall if wall > 0 else None
        log.debug("training used %.2f s of CPU in %.2f s (%.2f of a core; cap %s)", cpu, wall,
                  self.last_cpu_share or 0.0, self.policy.cpu_share or "none")

    def _memory_block(self) -> str | None:
        kib = self._resident_kib(self._peak_field)
        if kib is None:
            return None
        return memory_block(kib * 1024, self.policy.memory_bytes)
