"""What the coordinator knows about each device and the run, for operators: pure.

``FleetStats`` folds three inputs into per-device statistics, with the wall-clock time
``now`` given by the caller (no clock here, no network):

- ``on_judged``: the core's judgement of one update (``coordinator.core.Judged``): accepted
  or rejected by reason, its bytes, its staleness, and for an accepted update the training
  metrics the device claims in ``m`` (``loss``, ``acc``, ``acc_int8``);
- ``on_status``: a status payload (decoded here with the core's small limits), which gives
  the state, the agent's version, the model version it last finished and its last error;
  it returns ``"joined"`` or ``"left"`` when the device's presence changes, for one log line;
- ``revision``: bumped by every change, so the shell publishes only what changed.

``fleet_snapshot`` turns the statistics and the run's own figures into a plain dict, the
``fleet`` message of docs/protocol.md section 7.7 (``coordinator.fleet_view`` reads and
shows it); ``fleet_snapshot_payload`` gives the same message packed, byte for byte, packing
again only the devices that changed since the last snapshot (the coordinator publishes one
every 2 s, and with 5,000 devices building and packing every entry each time cost 0.6-0.8
ms of CPU per applied update, measured side by side: BENCHMARKS.md, "Fleet"). Everything a
device says is a claim: strings are bounded by the status decoder, numbers are shown, never
trusted for a decision.

The statistics cover what this coordinator process has seen since it started; presence is
rebuilt at once from the retained status messages the broker replays on subscribe.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from coordinator.core import ONLINE_STATES, STATUS_LIMITS, Judged
from fedbus.envelope import PROTOCOL_VERSION, pack
from fedbus.messages import Status
from fedbus.topics import DEVICE_ID_PATTERN

__all__ = [
    "MAX_FLEET_DEVICES",
    "RATE_WINDOW",
    "DeviceStats",
    "FleetStats",
    "fleet_snapshot",
    "fleet_snapshot_payload",
]

RATE_WINDOW = 60.0  # seconds over which updates per second are counted
MAX_FLEET_DEVICES = 10_000  # devices listed in one snapshot (the most recently seen)
# the training metrics of an update that the snapshot keeps (agent names, section 7.3)
_METRICS = ("loss", "acc", "acc_int8")


@dataclass
class DeviceStats:
    """One device as the coordinator saw it (mutable; only ``FleetStats`` changes it)."""

    state: str = "unknown"  # online, training, idle, offline; unknown before a status
    last_seen: float | None = None  # wall time of its last update or live status
    agent: str | None = None
    model_version: int | None = None  # the version it last finished (its status says)
    run: str | None = None
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    repeated: int = 0
    bytes: int = 0  # update bytes received, repeats excluded
    staleness_sum: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # of the last accepted update
    error: dict[str, Any] | None = None  # {"kind", "text", "ts"}: the last one reported

    @property
    def online(self) -> bool:
        return self.state in ONLINE_STATES


class FleetStats:
    """Per-device statistics folded from judgements and status messages."""

    def __init__(self) -> None:
        self.devices: dict[str, DeviceStats] = {}
        self.revision = 0
        self.status_ignored = 0
        self._accepted_at: deque[float] = deque()
        # each device's packed snapshot entry, dropped when the device changes
        self._packed: dict[str, bytes] = {}
        self._order: list[str] | None = None  # the device ids sorted, until one comes or goes

    def _device(self, device_id: str) -> DeviceStats:
        self._packed.pop(device_id, None)  # every caller changes it
        stats = self.devices.get(device_id)
        if stats is None:
            stats = self.devices[device_id] = DeviceStats()
            self._order = None
        return stats

    def sorted_ids(self) -> list[str]:
        """Every device id, sorted (kept until a device comes or goes; do not change it)."""
        if self._order is None:
            self._order = sorted(self.devices)
        return self._order

    def packed_entry(self, device_id: str) -> bytes:
        """The device's entry of the snapshot, packed (once per change of the device)."""
        entry = self._packed.get(device_id)
        if entry is None:
            entry = self._packed[device_id] = pack(
                _device_dict(device_id, self.devices[device_id]))
        return entry

    def on_judged(self, judged: Judged, now: float) -> None:
        """The core judged one update of ``judged.device_id`` at wall time ``now``."""
        stats = self._device(judged.device_id)
        stats.last_seen = now
        if judged.outcome == "accepted":
            stats.accepted += 1
            stats.bytes += judged.size
            stats.staleness_sum += judged.staleness or 0
            stats.metrics = {k: float(judged.metrics[k]) for k in _METRICS
                             if k in judged.metrics and math.isfinite(judged.metrics[k])}
            self._accepted_at.append(now)
        elif judged.outcome == "rejected":
            reason = judged.reason or "unknown"
            stats.rejected[reason] = stats.rejected.get(reason, 0) + 1
            stats.bytes += judged.size
        else:
            stats.repeated += 1
        self._forget_before(now - RATE_WINDOW)
        self.revision += 1

    def on_status(self, device_id: str, payload: bytes, now: float) -> str | None:
        """A status payload for ``device_id`` (empty: cleared, the device is forgotten).
        Returns ``"joined"`` or ``"left"`` when its presence changed, else None. A status
        the core would ignore (unreadable, naming another device) is ignored here too."""
        if not DEVICE_ID_PATTERN.match(device_id):
            return None
        before = self.devices.get(device_id)
        was_online = before is not None and before.online
        if not payload:
            if before is None:
                return None
            del self.devices[device_id]
            self._packed.pop(device_id, None)
            self._order = None
            self.revision += 1
            return "left" if was_online else None
        try:
            status = Status.read(payload, STATUS_LIMITS)
        except Exception:  # hostile input never escapes; the core counts and logs it
            self.status_ignored += 1
            return None
        if status.device_id != device_id:
            self.status_ignored += 1
            return None
        stats = self._device(device_id)
        stats.state = status.state
        if status.agent is not None:
            stats.agent = status.agent
        if status.run_id is not None or status.state != "offline":
            # a Will says offline with no run or version: keep what the device last said
            stats.run, stats.model_version = status.run_id, status.model_version
        if stats.online:
            stats.last_seen = now
        if status.error is not None:
            error = {"kind": status.error_kind, "text": status.error}
            if stats.error is None or {k: stats.error[k] for k in ("kind", "text")} != error:
                stats.error = {**error, "ts": now}
        self.revision += 1
        if stats.online and not was_online:
            return "joined"
        if was_online and not stats.online:
            return "left"
        return None

    def updates_per_second(self, now: float, started: float) -> float:
        """Accepted updates per second over the last ``RATE_WINDOW`` seconds (or since
        ``started``, the run's start on this process, when that is shorter)."""
        self._forget_before(now - RATE_WINDOW)
        span = min(RATE_WINDOW, max(1.0, now - started))
        return len(self._accepted_at) / span

    def _forget_before(self, cutoff: float) -> None:
        while self._accepted_at and self._accepted_at[0] < cutoff:
            self._accepted_at.popleft()


def _device_dict(device_id: str, stats: DeviceStats) -> dict[str, Any]:
    return {
        "id": device_id,
        "state": stats.state,
        "online": stats.online,
        "last_seen": stats.last_seen,
        "agent": stats.agent,
        "run": stats.run,
        "model_version": stats.model_version,
        "accepted": stats.accepted,
        "rejected": dict(sorted(stats.rejected.items())),
        "repeated": stats.repeated,
        "bytes": stats.bytes,
        "mean_staleness": (stats.staleness_sum / stats.accepted) if stats.accepted else None,
        "loss": stats.metrics.get("loss"),
        "acc": stats.metrics.get("acc"),
        "acc_int8": stats.metrics.get("acc_int8"),
        "error": dict(stats.error) if stats.error is not None else None,
    }


def _shown(stats: FleetStats) -> list[str]:
    """The ids a snapshot lists, sorted: every device, or the ``MAX_FLEET_DEVICES`` most
    recently seen."""
    devices = stats.devices
    if len(devices) <= MAX_FLEET_DEVICES:
        return stats.sorted_ids()
    recent = sorted(devices, key=lambda d: devices[d].last_seen or 0.0, reverse=True)
    return sorted(recent[:MAX_FLEET_DEVICES])


def _head(stats: FleetStats, run: Mapping[str, Any], now: float,
          started: float) -> dict[str, Any]:
    devices = stats.devices
    return {
        "v": PROTOCOL_VERSION,
        "kind": "fleet",
        "ts": now,
        "run": {
            **run,
            "updates_per_second": round(stats.updates_per_second(now, started), 4),
            "devices_known": len(devices),
            "devices_online": sum(1 for s in devices.values() if s.online),
            "started_at": started,
        },
    }


def fleet_snapshot(stats: FleetStats, run: Mapping[str, Any], *, now: float,
                   started: float) -> dict[str, Any]:
    """The ``fleet`` message: ``run`` (the shell's figures: ``task``, ``run``, ``mode``,
    ``version``, ``accuracy``, ``loss``, ``evaluated_version``, ``updates_accepted``,
    ``updates_rejected``, ``bytes_received``, ``bytes_model_published``, ``ended``) plus
    ``updates_per_second`` and the device counts, and every device, sorted by id (at most
    ``MAX_FLEET_DEVICES``: the most recently seen). ``now``: wall time; ``started``: when
    this process started serving the run (wall time)."""
    devices = stats.devices
    return {**_head(stats, run, now, started),
            "devices": [_device_dict(d, devices[d]) for d in _shown(stats)]}


def fleet_snapshot_payload(stats: FleetStats, run: Mapping[str, Any], *, now: float,
                           started: float) -> bytes:
    """``pack(fleet_snapshot(...))``, byte for byte, from each device's packed entry
    (``FleetStats.packed_entry``): a snapshot after a few changes packs only the devices
    that changed. The message is a map whose last key is ``devices``: the head's map of four
    keys becomes one of five (both msgpack fixmaps, one byte), followed by the key and an
    array of the entries."""
    head = pack(_head(stats, run, now, started))
    if head[0] != 0x84:  # a fixmap of the four head keys: anything else is a bug here
        raise AssertionError(f"unexpected fleet snapshot head 0x{head[0]:02x}")
    shown = _shown(stats)
    return b"".join([b"\x85", head[1:], msgpack.packb("devices", use_bin_type=True),
                     msgpack.Packer(use_bin_type=True).pack_array_header(len(shown)),
                     *(stats.packed_entry(d) for d in shown)])
