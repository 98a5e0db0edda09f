"""What the coordinator's decisions change in its durable state, as plain records.

``CoordinatorCore`` stays free of I/O: every input it judges appends records to its
journal (``CoordinatorCore.drain_journal()``), and the service writes them to the store in
one transaction *before* it publishes a receipt or a model and before paho acknowledges the
message to the broker. Reads go the other way through the small :class:`Ledger` protocol
(has this update id been judged, has this device already contributed this work), which
``coordinator.store.Store`` answers from SQLite.

The records:

- :class:`Verdict`: the first judgement of an update id (accepted or the reject reason);
  a later copy of the same message gets the same verdict again (``repeat``), never a
  second judgement.
- :class:`Pending`: an accepted update not yet applied: the raw payload (the compact wire
  form, a few hundred bytes to a few KB) with its weight, so a restarted coordinator
  rebuilds the FedBuff buffer or the open FedAvg round exactly, in the same order.
- :class:`VersionMade`: a new global version, its model, server momentum and the ids of
  the updates it applied; the pending rows of those ids leave the buffer in the same
  transaction.
- :class:`RoundFixed`: a FedAvg round's participants, fixed by its first update.
- :class:`RunEnded`: the run is over (``max_versions``, target accuracy, duration).
- :class:`PauseChanged`: the operator paused the run (no new version until it resumes)
  or resumed it.
- :class:`PeriodWindow`: with ``--adaptive-k``, a device's last period samples.
- :class:`InvitationsChanged`: under a concurrency limit, the invitations opened and closed
  by an input (``coordinator.invitations``), so a restarted coordinator keeps its promises.
- :class:`NormWindow`: the norms of the most recently accepted updates, from which the
  adaptive norm bound is decided (``coordinator.norm_bound``); rewritten with every
  accepted update, so a resumed run decides as the stopped one would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = [
    "BufferDropped",
    "InvitationsChanged",
    "Ledger",
    "NormWindow",
    "Pending",
    "PeriodWindow",
    "Record",
    "RoundFixed",
    "RunEnded",
    "Verdict",
    "VersionMade",
]


@dataclass(frozen=True)
class Verdict:
    """The judgement of one update id, as its receipt said it."""

    update_id: str
    device_id: str
    digest: bytes  # blake2b-64 of the payload: the same id with other bytes is another update
    base_version: int
    accepted: bool
    reason: str | None
    detail: str
    model_version: int  # the global version when it was judged
    staleness: int | None
    size: int | None = None  # the payload's bytes, for reports (None: not known)
    # an accepted partial's parts (revision 2.12: the region quota is rebuilt from them on
    # resume); None for a device's update and a rejection
    parts: int | None = None


@dataclass(frozen=True)
class Pending:
    """An accepted update waiting in the FedBuff buffer or the open FedAvg round."""

    update_id: str
    device_id: str
    base_version: int
    num_samples: int
    staleness: int
    # FedBuff: its weight in the running sum (n x staleness weight) with the plain mean, its
    # staleness weight alone when the buffer keeps deltas (a robust aggregator, a capped
    # mean: coordinator.aggregator_spec) and under differential privacy
    # (coordinator.privacy); FedAvg: n
    coef: float
    payload: bytes
    round_number: int | None = None  # FedAvg only
    # the adaptive norm bound it was clipped to when accepted (coordinator.norm_bound), None
    # if it was not: applied again on resume, so the buffer is rebuilt with the same bytes
    clip: float | None = None


@dataclass(frozen=True, eq=False)
class VersionMade:
    version: int
    state: dict[str, np.ndarray]
    velocity: dict[str, np.ndarray] | None
    applied: tuple[str, ...]  # update ids folded into this version, in order
    reason: str


@dataclass(frozen=True)
class BufferDropped:
    """Accepted updates that could not be applied (the step would not have been finite):
    they leave the buffer without making a version."""

    update_ids: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class RoundFixed:
    number: int
    version: int
    participants: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RunEnded:
    reason: str


@dataclass(frozen=True)
class PauseChanged:
    """The run was paused (``paused``, with the operator's ``reason``) or resumed."""

    paused: bool
    reason: str = ""


@dataclass(frozen=True)
class PeriodWindow:
    """``--adaptive-k``: a device's last period samples (``coordinator.adaptive_k``)."""

    device_id: str
    samples: tuple[float, ...]


@dataclass(frozen=True)
class InvitationsChanged:
    """Invitations opened (``True``) or closed (``False``), in the order they changed; ``ids``:
    the id of each invitation opened (revision 2.13)."""

    changes: tuple[tuple[str, bool], ...]
    ids: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NormWindow:
    """The L2 norms of the most recently accepted updates, oldest first."""

    norms: tuple[float, ...]


Record = (
    Verdict | Pending | VersionMade | BufferDropped | RoundFixed | RunEnded | NormWindow
    | PauseChanged | PeriodWindow | InvitationsChanged
)


class Ledger(Protocol):
    """What the core asks of its durable state while judging an update."""

    def verdict(self, update_id: str) -> Verdict | None:
        """The verdict already given to ``update_id``, if it is still remembered."""

    def work(self, device_id: str, base_version: int) -> str | None:
        """The id of the update this device already had accepted for this base version."""
