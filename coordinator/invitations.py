"""Who may train now: at most ``concurrency`` devices at a time, whatever the fleet's size
(protocol revision 2.10). Pure: no clock (times are given), no network.

Why: in asynchronous FedBuff an update is about as many versions old as the versions made
while its device trained, ``T / K`` with ``T`` devices training at once. If every device
trains whenever it can, ``T`` is the fleet, and staleness (and with it what an applied
update is worth) grows with the fleet. FedBuff's own answer is a concurrency limit: the
server keeps about ``C`` devices training. Here the coordinator invites devices one by one
(an ``invite`` on the device's receipt topic), keeps ``C`` invitations open, and takes an
update only from a device holding one; the staleness of an update then depends on ``C`` and
``K``, not on the fleet.

``Invitations`` keeps the open invitations (device -> when invited, in that order) and the
devices waiting for one, in the order they began to wait (first come, first invited: each
device gets its turn, and no device can push itself forward by saying so). Every call is
O(1) amortized per device it touches, whatever the fleet's size.

- ``on_presence``: a status arrived. A device that cannot take part (offline, aside) leaves
  both; an online one joins the waiting line; one that says ``training`` while holding no
  invitation takes a free slot (a coordinator resumed from its state has no invitations: the
  devices it invited before go on and are counted; an agent older than 2.10, which trains
  without invitation, takes a slot when one is free).
- ``consume``: an update of the device was judged: its invitation (if any) is used up, and
  the device waits again at the end of the line. True if it held one.
- ``expire``: invitations open longer than ``timeout`` are withdrawn (a device that went
  quiet without going offline must not hold a slot for ever); the device waits again.
- ``invite``: as many waiting devices as there are free slots, first in line first.

The open invitations are durable (``coordinator.store``, table ``invitations``): every
invitation opened or closed is noted in ``changes`` until the core drains them into its
journal, so they are committed before the ``invite`` leaves, and ``restored`` rebuilds them
after a restart in the order they were made. Their times are not kept: a restored invitation
gets a whole ``timeout`` from the restart (the clock of a stopped coordinator says nothing of
how long its devices have been training). The waiting line is not stored: every device's
retained status arrives again when the coordinator subscribes, and the line forms anew.

Revision 2.13: every invitation has an id (``ids``, random, stored with it), sent in the
``invite``; a device of revision 2.13 names in its status the newest invitation it knows
(held or used). ``resend``: when a device whose invitation is open says ``online`` or
``idle`` and names another invitation (or none), it lost this one (a restart between
receiving and using it): the same invitation, same id, goes to it again. Not at once if it
was sent less than ``grace`` seconds ago: a status the device published before the
invitation reached it says the same (the ``idle`` that follows every update crosses the
next invitation on the way), and the agent names a new invitation in a status as soon as
it gets one. So such a claim is only noted (``unknown``), a later status naming the
invitation clears it, and ``resends_due`` (at every tick) sends it once ``grace`` has
passed. An agent acts on an id at most once, so a status repeated or reordered makes no
second training; a device whose status says nothing of invitations (older than 2.13) is
never sent one again. A device's claims only ever bring its own invitation back to itself,
at most once per ``grace``: a resend opens no slot and moves no one in the line.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_INVITE_TIMEOUT", "Invitations", "new_invite_id",
           "resend_due"]

# devices training at a time under fleet scaling unless told otherwise: a fleet of at most
# this many is invited whole (every idle device at once), as if there were no limit
DEFAULT_CONCURRENCY = 100
# seconds an invited device may take before its slot goes to another
DEFAULT_INVITE_TIMEOUT = 600.0
# seconds after an invitation was sent (or sent again) before it is sent again: longer than a
# status and an invite take to cross (milliseconds), shorter than an agent takes to restart
RESEND_GRACE = 3.0
# the states in which a device that does not know its open invitation is sent it again:
# not ``training`` (it trains on something; its next status says ``idle``)
_RESEND_STATES = ("online", "idle")


def new_invite_id() -> str:
    """A fresh invitation id (revision 2.13): 16 hex digits, 64 random bits, so that no
    two invitations of a run share one whatever the restarts."""
    return secrets.token_hex(8)


def resend_due(open_id: str | None, state: str | None, aware: bool, known: str | None) -> bool:
    """Whether a device holding the open invitation ``open_id`` is sent it again, given its
    status: ``state``, ``aware`` (its status has the key ``invite``: revision 2.13) and
    ``known`` (the invitation it names there). Only when it says it is ``online`` or
    ``idle`` and names another invitation, or none: it never got this one or lost it."""
    return (open_id is not None and aware and state in _RESEND_STATES
            and known != open_id)


@dataclass
class Invitations:
    concurrency: int
    timeout: float = DEFAULT_INVITE_TIMEOUT
    open: dict[str, float] = field(default_factory=dict)  # device -> invited at, in order
    waiting: dict[str, None] = field(default_factory=dict)  # devices in line, in order
    # since the last ``drain_changes``: device -> whether it now holds an invitation, in the
    # order of the last change of each
    changes: dict[str, bool] = field(default_factory=dict)
    # revision 2.13: device -> the id of its open invitation
    ids: dict[str, str] = field(default_factory=dict)
    new_id: Callable[[], str] = new_invite_id
    grace: float = RESEND_GRACE
    sent: dict[str, float] = field(default_factory=dict)  # device -> last sent (or again)
    # devices whose last status said they do not know their open invitation, sent too
    # recently to send again (``resends_due``)
    unknown: dict[str, None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.timeout > 0:
            raise ValueError(f"invite timeout must be > 0, got {self.timeout}")

    @classmethod
    def restored(cls, concurrency: int, timeout: float, devices: list[str] | tuple[str, ...],
                 now: float, ids: Mapping[str, str] | None = None) -> Invitations:
        """The invitations ``devices`` held when the coordinator stopped (oldest first), each
        open from ``now`` with its id in ``ids`` (a fresh one where none was stored: written
        by a coordinator before revision 2.13); the waiting line is empty until statuses
        arrive."""
        made = cls(concurrency, timeout)
        made.open = dict.fromkeys(devices, now)
        known = ids or {}
        made.ids = {device: known.get(device) or made.new_id() for device in devices}
        made.sent = dict.fromkeys(devices, now - made.grace)  # sent before the restart
        return made

    def drain_changes(self) -> dict[str, bool]:
        """The invitations opened (True) and closed (False) since the last call."""
        changes, self.changes = self.changes, {}
        return changes

    def _open(self, device: str, now: float) -> None:
        self.open[device] = now
        self.ids[device] = self.new_id()
        self.sent[device] = now
        self.unknown.pop(device, None)
        self.changes.pop(device, None)  # moves to the end: its order is that of the last
        self.changes[device] = True

    def _close(self, device: str) -> bool:
        if self.open.pop(device, None) is None:
            return False
        self.ids.pop(device, None)
        self.sent.pop(device, None)
        self.unknown.pop(device, None)
        self.changes.pop(device, None)
        self.changes[device] = False
        return True

    def holds(self, device: str) -> bool:
        """Whether ``device`` holds an open invitation."""
        return device in self.open

    def id_of(self, device: str) -> str | None:
        """The id of ``device``'s open invitation (None: it holds none)."""
        return self.ids.get(device)

    def resend(self, device: str, state: str | None, aware: bool, known: str | None,
               now: float) -> str | None:
        """After ``on_presence``: the id of the open invitation to send ``device`` again now
        (``resend_due``, and sent at least ``grace`` ago), or None; a claim too early is
        noted for ``resends_due``, and a status that does not claim so clears it."""
        open_id = self.ids.get(device)
        if open_id is None or not resend_due(open_id, state, aware, known):
            self.unknown.pop(device, None)
            return None
        if now - self.sent[device] < self.grace:
            self.unknown[device] = None
            return None
        self.unknown.pop(device, None)
        self.sent[device] = now
        return open_id

    def resends_due(self, now: float) -> list[tuple[str, str]]:
        """(device, invitation id) to send again now: noted by ``resend`` too early, and
        still not known to the device ``grace`` after it was last sent."""
        due = [d for d in self.unknown if now - self.sent[d] >= self.grace]
        for device in due:
            del self.unknown[device]
            self.sent[device] = now
        return [(device, self.ids[device]) for device in due]

    def on_presence(self, device: str, contributes: bool, training: bool, now: float) -> None:
        """A status of ``device``: ``contributes`` (online and able to take part),
        ``training`` (its state says so)."""
        if not contributes:
            self._close(device)
            self.waiting.pop(device, None)
            return
        if device in self.open:
            return
        if training and len(self.open) < self.concurrency:
            self.waiting.pop(device, None)
            self._open(device, now)
            return
        self.waiting.setdefault(device, None)

    def consume(self, device: str) -> bool:
        """An update of ``device`` was judged; True if it held an invitation (now used)."""
        held = self._close(device)
        if held:
            self.waiting[device] = None
        return held

    def expire(self, now: float) -> list[str]:
        """Withdraw the invitations open longer than ``timeout``; the devices affected."""
        gone: list[str] = []
        for device, since in self.open.items():  # oldest first
            if now - since < self.timeout:
                break
            gone.append(device)
        for device in gone:
            self._close(device)
            self.waiting[device] = None
        return gone

    def invite(self, now: float) -> list[str]:
        """Fill the free slots from the front of the line; the devices invited."""
        chosen: list[str] = []
        while len(self.open) < self.concurrency and self.waiting:
            device = next(iter(self.waiting))
            del self.waiting[device]
            self._open(device, now)
            chosen.append(device)
        return chosen
