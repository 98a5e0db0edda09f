"""The operator's run commands (protocol revision 2.5): what the coordinator makes of one
``control`` message, as a pure decision.

Only the operator account may write ``<prefix>/control`` (broker ACL), yet the message is
treated as a claim like any other: it is decoded by schema within small limits, a
malformed one is ignored with a logged reason, and a command sent more than
``MAX_CONTROL_AGE`` seconds before (or after) the coordinator's clock says now is refused
as stale, so a command that waited in a queue while no coordinator listened is not carried
out by the next one to start. ``pause`` and ``resume`` are idempotent: pausing a paused run
(or resuming a running one) is answered ``done`` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedbus.errors import ProtocolError
from fedbus.messages import Control

__all__ = [
    "MAX_CONTROL_AGE",
    "ControlDecision",
    "Malformed",
    "judge_control",
    "operator_answer",
    "run_state",
]

MAX_CONTROL_AGE = 60.0  # seconds between a command's ts and the coordinator's clock
STOP_REASON = "stopped by operator"


@dataclass(frozen=True)
class Malformed:
    """Not a control message this coordinator can read: ignored (no answer, it has no id
    to answer under)."""

    detail: str


@dataclass(frozen=True)
class ControlDecision:
    """The answer to one command: ``outcome`` ``done`` (carry out ``command`` unless
    ``change`` is False) or ``refused``; ``detail`` says why, for the log and the operator.
    ``end_reason``: for ``stop``, the ended task's ``end_reason``."""

    request_id: str
    command: str
    outcome: str
    detail: str
    change: bool = False
    reason: str | None = None

    @property
    def end_reason(self) -> str:
        return STOP_REASON if not self.reason else f"{STOP_REASON}: {self.reason}"

    def answer(self, ts: float) -> dict[str, object]:
        """What the fleet snapshot's ``run.control`` says about it."""
        return {"id": self.request_id, "command": self.command, "outcome": self.outcome,
                "detail": self.detail, "ts": ts}


def run_state(*, ended: bool, paused: bool) -> str:
    """The run's state as the task and the fleet snapshot name it."""
    return "ended" if ended else "paused" if paused else "running"


def judge_control(payload: bytes, *, retained: bool, now: float,
                  state: str) -> ControlDecision | Malformed:
    """What to do with ``payload`` from ``<prefix>/control``: ``now`` the coordinator's
    wall clock, ``state`` the run's (``run_state``)."""
    if retained:
        return Malformed("a retained control message (commands are never retained)")
    try:
        control = Control.read(payload)
    except ProtocolError as exc:
        return Malformed(f"{exc.reason}: {exc.detail}")
    except Exception as exc:  # hostile input never escapes
        return Malformed(f"{type(exc).__name__}: {exc}")

    def answer(outcome: str, detail: str, change: bool = False) -> ControlDecision:
        return ControlDecision(control.request_id, control.command, outcome, detail, change,
                               control.reason)

    age = now - control.ts
    if abs(age) > MAX_CONTROL_AGE:
        return answer("refused", f"stale command: sent {age:.0f} s from the coordinator's "
                      f"clock (at most {MAX_CONTROL_AGE:g} s)")
    if state == "ended":
        return answer("refused", "the run has ended")
    if control.command == "pause":
        if state == "paused":
            return answer("done", "the run was paused already")
        return answer("done", "paused", change=True)
    if control.command == "resume":
        if state == "running":
            return answer("done", "the run was not paused")
        return answer("done", "resumed", change=True)
    return answer("done", "the run ends", change=True)  # stop


# the run's state a command leads to, once carried out
_STATE_AFTER = {"pause": "paused", "resume": "running", "stop": "ended"}


def operator_answer(snapshot: Mapping[str, Any], request_id: str,
                    command: str) -> tuple[bool, str] | None:
    """``fedbus run``'s reading of a checked fleet snapshot (``fleet_view.read_fleet``):
    None while it does not answer request ``request_id`` yet, else (carried out, one line
    for the operator). A stop is answered once the run has ended."""
    run = snapshot.get("run") or {}
    control = run.get("control")
    if not isinstance(control, Mapping) or control.get("id") != request_id:
        return None
    detail = str(control.get("detail") or "")
    if control.get("outcome") != "done":
        return False, f"the coordinator refused to {command} run {run.get('run')}: {detail}"
    state = run.get("state")
    if state != _STATE_AFTER[command]:
        return None  # a stop is done when the run has ended
    where = f"run {run.get('run')} of task {run.get('task')} at version {run.get('version')}"
    if command == "stop":
        return True, f"{where} has ended: {run.get('ended') or detail}"
    return True, f"{where} is {state} ({detail})"
