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
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_INVITE_TIMEOUT", "Invitations"]

# devices training at a time under fleet scaling unless told otherwise: a fleet of at most
# this many is invited whole (every idle device at once), as if there were no limit
DEFAULT_CONCURRENCY = 100
# seconds an invited device may take before its slot goes to another
DEFAULT_INVITE_TIMEOUT = 600.0


@dataclass
class Invitations:
    concurrency: int
    timeout: float = DEFAULT_INVITE_TIMEOUT
    open: dict[str, float] = field(default_factory=dict)  # device -> invited at, in order
    waiting: dict[str, None] = field(default_factory=dict)  # devices in line, in order
    # since the last ``drain_changes``: device -> whether it now holds an invitation, in the
    # order of the last change of each
    changes: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.timeout > 0:
            raise ValueError(f"invite timeout must be > 0, got {self.timeout}")

    @classmethod
    def restored(cls, concurrency: int, timeout: float, devices: list[str] | tuple[str, ...],
                 now: float) -> Invitations:
        """The invitations ``devices`` held when the coordinator stopped (oldest first), each
        open from ``now``; the waiting line is empty until statuses arrive."""
        made = cls(concurrency, timeout)
        made.open = dict.fromkeys(devices, now)
        return made

    def drain_changes(self) -> dict[str, bool]:
        """The invitations opened (True) and closed (False) since the last call."""
        changes, self.changes = self.changes, {}
        return changes

    def _open(self, device: str, now: float) -> None:
        self.open[device] = now
        self.changes.pop(device, None)  # moves to the end: its order is that of the last
        self.changes[device] = True

    def _close(self, device: str) -> bool:
        if self.open.pop(device, None) is None:
            return False
        self.changes.pop(device, None)
        self.changes[device] = False
        return True

    def holds(self, device: str) -> bool:
        """Whether ``device`` holds an open invitation."""
        return device in self.open

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
