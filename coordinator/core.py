"""The coordinator's decisions as one pure object: no network, no clock, no threads.

The shell (the MQTT side) feeds ``CoordinatorCore`` what arrives — update payloads, status
payloads, clock ticks, always with the current time ``now`` — and carries out the actions
it returns, in order:

- ``SendReceipt``: publish ``receipt`` on the device's receipt topic;
- ``NewModel``: a new global version exists; publish ``core.model_message(now)`` retained,
  evaluate it, log it.

Modes:

- ``fedbuff``: every accepted update is added, weighted, to a running sum (the buffer,
  ``aggregation.WeightedSum``: one model-sized array, whatever K); when it holds
  ``buffer_size`` (K) updates, or as many as devices are online if fewer, or at ``tick``
  once its oldest update has waited ``buffer_timeout`` seconds,
  ``aggregation.fedbuff_apply`` makes the next version.
- ``fedasync``: the same with K = 1.
- ``fedavg``: synchronous rounds. A round for version v starts with the devices online at
  that moment. While it has no update yet it stays open: devices coming online join it and
  devices going offline leave it; its clock starts when it first has a device. With its
  first update the set of devices is fixed. Only updates based on v (anything older is
  ``stale``), from a device of the round (else ``not_selected``), one per device (else
  ``duplicate_in_round``) are accepted. The round closes as soon as every device still
  online has reported (devices going offline stop being waited for), or at ``tick`` once
  ``round_deadline`` seconds have passed with at least ``min_round_updates`` updates; with
  fewer, its clock restarts and the version stays.

The global state is finite after any sequence of inputs: updates are validated
(``coordinator.validation``) and a step that would produce NaN or infinity is dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.aggregation import (
    AggregationError,
    WeightedSum,
    fedavg_step,
    fedbuff_apply,
    is_finite,
)
from coordinator.staleness import STALENESS_KINDS, staleness_weight
from coordinator.validation import (
    REJECT_REASONS,
    Accepted,
    Rejected,
    SeenIds,
    ValidationLimits,
    validate_update,
)
from fedbus.codec_spec import CodecSpec, parse_codec
from fedbus.envelope import DecodeLimits, unpack
from fedbus.errors import ProtocolError
from fedbus.messages import GlobalModel, Receipt, Status, Task
from fedbus.topics import DEVICE_ID_PATTERN
from fedbus.update_codec import encode_update_delta

__all__ = [
    "MODES",
    "ONLINE_STATES",
    "Action",
    "AggregationConfig",
    "CoordinatorCore",
    "NewModel",
    "SendReceipt",
]

_log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("fedbuff", "fedasync", "fedavg")
ONLINE_STATES: tuple[str, ...] = ("online", "training", "idle")
STATUS_LIMITS = DecodeLimits(
    max_bytes=4096, max_bin_len=0, max_str_len=256, max_array_len=16, max_map_len=32
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pos(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass(frozen=True)
class AggregationConfig:
    """How the coordinator aggregates; checked on construction (``ValueError``)."""

    mode: str = "fedbuff"
    buffer_size: int = 4  # K; fedasync always uses 1
    # fedbuff: apply a partial buffer once its oldest update has waited this long, so fewer
    # active devices than K cannot stall the model (0 disables the timeout)
    buffer_timeout: float = 60.0
    server_lr: float = 1.0
    server_momentum: float = 0.0  # fedbuff/fedasync only
    staleness: str = "sqrt"  # a kind of coordinator.staleness
    staleness_a: float = 0.5  # exponent of "poly", slope of "hinge"
    staleness_b: int = 4  # "hinge": full weight up to this staleness
    max_staleness: int = 10  # fedavg always uses 0
    max_norm: float = 100.0
    round_deadline: float = 30.0  # fedavg, seconds
    min_round_updates: int = 1  # fedavg: needed to close a round at its deadline

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (_is_int(self.buffer_size) and self.buffer_size >= 1):
            raise ValueError(f"buffer_size must be an integer >= 1, got {self.buffer_size!r}")
        t = self.buffer_timeout
        if not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
                and t >= 0):
            raise ValueError(f"buffer_timeout must be finite and >= 0, got {t!r}")
        if not _is_pos(self.server_lr):
            raise ValueError(f"server_lr must be finite and > 0, got {self.server_lr!r}")
        m = self.server_momentum
        if not (isinstance(m, int | float) and math.isfinite(m) and 0 <= m < 1):
            raise ValueError(f"server_momentum must be in [0, 1), got {m!r}")
        if self.mode == "fedavg" and m != 0:
            raise ValueError("server_momentum is not supported in fedavg mode; set it to 0")
        if self.staleness not in STALENESS_KINDS:
            raise ValueError(
                f"staleness must be one of {', '.join(STALENESS_KINDS)}, got {self.staleness!r}"
            )
        a = self.staleness_a
        if not (isinstance(a, int | float) and math.isfinite(a) and a >= 0):
            raise ValueError(f"staleness_a must be finite and >= 0, got {a!r}")
        if not (_is_int(self.staleness_b) and self.staleness_b >= 0):
            raise ValueError(f"staleness_b must be an integer >= 0, got {self.staleness_b!r}")
        if not (_is_int(self.max_staleness) and self.max_staleness >= 0):
            raise ValueError(f"max_staleness must be an integer >= 0, got {self.max_staleness!r}")
        if not _is_pos(self.max_norm):
            raise ValueError(f"max_norm must be finite and > 0, got {self.max_norm!r}")
        if not _is_pos(self.round_deadline):
            raise ValueError(f"round_deadline must be finite and > 0, got {self.round_deadline!r}")
        if not (_is_int(self.min_round_updates) and self.min_round_updates >= 1):
            raise ValueError(
                f"min_round_updates must be an integer >= 1, got {self.min_round_updates!r}"
            )

    @property
    def effective_buffer_size(self) -> int:
        """K actually used: 1 for fedasync, ``buffer_size`` otherwise (unused by fedavg)."""
        return 1 if self.mode == "fedasync" else self.buffer_size

    @property
    def effective_max_staleness(self) -> int:
        """Staleness bound actually used: 0 for fedavg, ``max_staleness`` otherwise."""
        return 0 if self.mode == "fedavg" else self.max_staleness


@dataclass(frozen=True)
class SendReceipt:
    """Publish ``receipt`` on ``device_id``'s receipt topic."""

    device_id: str
    receipt: Receipt


@dataclass(frozen=True)
class NewModel:
    """Global version ``version`` was made: publish ``model_message()``, evaluate, log."""

    version: int
    reason: str


Action = SendReceipt | NewModel


@dataclass
class _Round:
    """One FedAvg round (mutable, private to the core)."""

    number: int
    version: int
    started_at: float | None
    participants: set[str]
    waiting: set[str]
    reported: dict[str, tuple[dict[str, np.ndarray], int]] = field(default_factory=dict)

    @property
    def is_open(self) -> bool:
        """No update yet: devices may still join or leave."""
        return not self.reported


def _frozen(state: Mapping[str, np.ndarray], *, copy: bool = True) -> dict[str, np.ndarray]:
    """float32 C-contiguous read-only arrays; ``copy=False`` only for arrays nobody else holds."""
    out = {}
    for name, value in state.items():
        arr = np.array(value, dtype=np.float32, copy=True if copy else None, order="C")
        arr.setflags(write=False)
        out[name] = arr
    return out


class CoordinatorCore:
    """Validates updates, keeps presence and decides when to make a new global version."""

    def __init__(
        self,
        task: Task,
        initial_state: Mapping[str, np.ndarray],
        config: AggregationConfig,
        *,
        max_update_bytes: int | None = None,
        start_version: int = 0,
        model_codec: str | CodecSpec = "fp32",
    ) -> None:
        if not (_is_int(start_version) and start_version >= 0):
            raise ValueError(f"start_version must be an integer >= 0, got {start_version!r}")
        state = _frozen(initial_state)
        if not state:
            raise ValueError("initial_state has no tensors")
        empty = sorted(name for name, a in state.items() if a.size == 0)
        if empty:
            raise ValueError(f"initial_state has empty tensors: {empty}")
        if not is_finite(state):
            raise ValueError("initial_state holds NaN or infinity")
        self.task = task
        self.config = config
        self.model_codec = (
            model_codec if isinstance(model_codec, CodecSpec) else parse_codec(model_codec)
        )
        self._state = state
        self._version = start_version
        self._shapes = {name: a.shape for name, a in state.items()}
        self._limits = ValidationLimits(
            max_update_bytes=task.max_update_bytes
            if max_update_bytes is None
            else max_update_bytes,
            max_norm=config.max_norm,
            max_staleness=config.effective_max_staleness,
        )
        self._seen = SeenIds()
        self._buffer = WeightedSum(self._shapes)
        self._buffer_since: float | None = None  # when the oldest buffered update arrived
        self._velocity: dict[str, np.ndarray] | None = None
        self._devices: dict[str, str] = {}
        self._counters: dict[str, int] = dict.fromkeys(
            [
                "updates_received",
                "updates_accepted",
                "updates_rejected",
                "bytes_received",
                "bytes_accepted",
                "models_published",
                "aggregation_failed",
                "buffer_timeouts",
                "status_received",
                "status_malformed",
                "round_restarts",
                *(f"rejected_{reason}" for reason in REJECT_REASONS),
            ],
            0,
        )
        self._round: _Round | None = None
        if config.mode == "fedavg":
            self._round = _Round(0, start_version, None, set(), set())

    # -- read-only views -------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The current global version."""
        return self._version

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The current global model (a new dict of read-only arrays, never mutated later)."""
        return dict(self._state)

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the counters."""
        return dict(self._counters)

    @property
    def devices(self) -> dict[str, str]:
        """Presence: device id -> last reported state (cleared devices are absent)."""
        return dict(self._devices)

    def online_devices(self) -> set[str]:
        """Devices whose last state is online, training or idle."""
        return {d for d, s in self._devices.items() if s in ONLINE_STATES}

    # -- inputs ----------------------------------------------------------------------------

    def on_update(self, topic_device: str, payload: bytes, now: float) -> list[Action]:
        """An update payload arrived on ``topic_device``'s update topic."""
        result = validate_update(
            payload,
            topic_device=topic_device,
            task_id=self.task.task_id,
            expected_shapes=self._shapes,
            current_version=self._version,
            limits=self._limits,
            seen=self._seen,
        )
        self._counters["updates_received"] += 1
        self._counters["bytes_received"] += result.size
        if isinstance(result, Rejected):
            return self._reject(topic_device, result.reason, result.detail, result.update_id)
        if self._round is not None:
            return self._accept_in_round(topic_device, result, now)
        return self._accept_buffered(topic_device, result, now)

    def on_status(self, device_id: str, payload: bytes, now: float) -> list[Action]:
        """A (retained) status payload arrived for ``device_id``; empty means cleared."""
        self._counters["status_received"] += 1
        if not (isinstance(device_id, str) and DEVICE_ID_PATTERN.match(device_id)):
            return self._bad_status(device_id, "invalid device id")
        state: str | None
        if len(payload) == 0:
            state = None
        else:
            try:
                status = Status.from_wire(unpack(payload, "status", STATUS_LIMITS))
            except ProtocolError as exc:
                return self._bad_status(device_id, f"{exc.reason}: {exc.detail}")
            except Exception as exc:  # hostile input never escapes
                return self._bad_status(device_id, f"{type(exc).__name__}: {exc}")
            if status.device_id != device_id:
                return self._bad_status(device_id, f"status names device {status.device_id!r}")
            state = status.state
        if state is None:
            self._devices.pop(device_id, None)
        else:
            self._devices[device_id] = state
        if self._round is None:
            return []
        if state in ONLINE_STATES:
            self._round_device_online(device_id, now)
            return []
        return self._round_device_offline(device_id, now)

    def tick(self, now: float) -> list[Action]:
        """Time passes: applies a FedBuff buffer past its timeout; closes or restarts a
        FedAvg round whose deadline has passed."""
        timeout = self.config.buffer_timeout
        since = self._buffer_since
        if self._buffer.count and since is not None and timeout > 0 and now >= since + timeout:
            self._counters["buffer_timeouts"] += 1
            _log.info(
                "applying %d buffered update(s) after %.0f s without reaching K=%d",
                self._buffer.count, now - since, self.config.effective_buffer_size,
            )
            return self._apply_buffer()
        rnd = self._round
        if rnd is None or rnd.started_at is None:
            return []
        if now < rnd.started_at + self.config.round_deadline:
            return []
        if len(rnd.reported) >= self.config.min_round_updates:
            _log.info(
                "round %d closes at its deadline with %d of %d devices",
                rnd.number,
                len(rnd.reported),
                len(rnd.participants),
            )
            return self._close_round(now)
        self._counters["round_restarts"] += 1
        rnd.started_at = now
        _log.warning(
            "round %d (version %d) reached its deadline with %d of %d needed updates; "
            "restarting its clock",
            rnd.number,
            rnd.version,
            len(rnd.reported),
            self.config.min_round_updates,
        )
        return []

    # -- outputs ---------------------------------------------------------------------------

    def model_message(self, now: float) -> GlobalModel:
        """The current global model as a ``GlobalModel`` message, in ``model_codec``."""
        tensors, compression = encode_update_delta(
            self._state, self.model_codec, rng=np.random.default_rng(self._version)
        )
        return GlobalModel(
            task_id=self.task.task_id,
            version=self._version,
            tensors=tensors,
            created_at=now,
            compression=compression,
        )

    def snapshot(self) -> dict[str, Any]:
        """Plain values for metrics and reports."""
        rnd = self._round
        round_info = None
        if rnd is not None:
            round_info = {
                "number": rnd.number,
                "version": rnd.version,
                "participants": len(rnd.participants),
                "reported": len(rnd.reported),
                "waiting": len(rnd.waiting),
                "started_at": rnd.started_at,
                "deadline": None
                if rnd.started_at is None
                else rnd.started_at + self.config.round_deadline,
            }
        return {
            "mode": self.config.mode,
            "version": self._version,
            "buffered": self._buffer.count,
            "buffer_size": self.config.effective_buffer_size,
            "devices_known": len(self._devices),
            "devices_online": len(self.online_devices()),
            "seen_ids": len(self._seen),
            "counters": dict(self._counters),
            "round": round_info,
        }

    # -- internals -------------------------------------------------------------------------

    def _bad_status(self, device_id: str, detail: str) -> list[Action]:
        self._counters["status_malformed"] += 1
        _log.warning("ignored status of %r: %s", device_id, detail)
        return []

    def _reject(
        self, device_id: str, reason: str, detail: str, update_id: str | None
    ) -> list[Action]:
        self._counters["updates_rejected"] += 1
        key = f"rejected_{reason}"
        self._counters[key] = self._counters.get(key, 0) + 1
        _log.warning(
            "rejected update %s from %s: %s (%s)", update_id or "?", device_id, reason, detail
        )
        if update_id is None:  # nothing the device could correlate a receipt with
            return []
        receipt = Receipt(
            update_id=update_id,
            accepted=False,
            reason=reason,
            detail=detail,
            model_version=self._version,
        )
        return [SendReceipt(device_id, receipt)]

    def _accept(self, device_id: str, acc: Accepted, detail: str) -> SendReceipt:
        self._seen.add(acc.update.update_id)
        self._counters["updates_accepted"] += 1
        self._counters["bytes_accepted"] += acc.size
        receipt = Receipt(
            update_id=acc.update.update_id,
            accepted=True,
            reason=None,
            detail=detail,
            model_version=self._version,
            staleness=acc.staleness,
        )
        return SendReceipt(device_id, receipt)

    def _buffer_target(self) -> int:
        """K, but never more than the devices known to be online: each agent trains once per
        version, so a smaller fleet could otherwise fill the buffer only through the timeout.
        With no presence known (no status messages), K as configured."""
        online = len(self.online_devices())
        k = self.config.effective_buffer_size
        return min(k, online) if online else k

    def _accept_buffered(self, device_id: str, acc: Accepted, now: float) -> list[Action]:
        k = self._buffer_target()
        cfg = self.config
        if not self._buffer.count:
            self._buffer_since = now
        weight = staleness_weight(
            acc.staleness, cfg.staleness, a=cfg.staleness_a, b=cfg.staleness_b
        )
        n = acc.update.num_samples
        self._buffer.add(acc.delta, num_samples=n, coef=n * weight)
        actions: list[Action] = [
            self._accept(device_id, acc, f"buffered {self._buffer.count}/{k}")
        ]
        if self._buffer.count >= k:
            actions.extend(self._apply_buffer())
        return actions

    def _apply_buffer(self) -> list[Action]:
        count = self._buffer.count
        self._buffer_since = None
        cfg = self.config
        try:
            new_state, velocity = fedbuff_apply(
                self._state,
                self._buffer,
                server_lr=cfg.server_lr,
                momentum=cfg.server_momentum,
                velocity=self._velocity,
            )
        except AggregationError as exc:
            self._counters["aggregation_failed"] += 1
            _log.error(
                "dropped a buffer of %d updates at version %d: %s", count, self._version, exc
            )
            return []
        finally:
            self._buffer.clear()
        if cfg.server_momentum > 0:
            self._velocity = _frozen(velocity, copy=False)
        return [self._publish(new_state, f"{cfg.mode}: {count} update(s)")]

    def _publish(self, new_state: Mapping[str, np.ndarray], reason: str) -> NewModel:
        self._state = _frozen(new_state, copy=False)  # fresh arrays from aggregation
        self._version += 1
        self._counters["models_published"] += 1
        return NewModel(self._version, reason)

    # FedAvg rounds

    def _accept_in_round(self, device_id: str, acc: Accepted, now: float) -> list[Action]:
        rnd = self._round
        assert rnd is not None
        update_id = acc.update.update_id
        if device_id not in rnd.participants:
            return self._reject(
                device_id, "not_selected", f"device is not part of round {rnd.number}", update_id
            )
        if device_id in rnd.reported:
            return self._reject(
                device_id,
                "duplicate_in_round",
                f"device already reported in round {rnd.number}",
                update_id,
            )
        rnd.reported[device_id] = (acc.delta, acc.update.num_samples)
        rnd.waiting.discard(device_id)
        if rnd.started_at is None:
            rnd.started_at = now
        actions: list[Action] = [
            self._accept(
                device_id,
                acc,
                f"round {rnd.number}: {len(rnd.reported)}/{len(rnd.participants)} reported",
            )
        ]
        if not rnd.waiting:
            actions.extend(self._close_round(now))
        return actions

    def _round_device_online(self, device_id: str, now: float) -> None:
        rnd = self._round
        assert rnd is not None
        if rnd.is_open:
            rnd.participants.add(device_id)
            rnd.waiting.add(device_id)
            if rnd.started_at is None:
                rnd.started_at = now
        elif device_id in rnd.participants and device_id not in rnd.reported:
            rnd.waiting.add(device_id)  # came back during its round: wait for it again

    def _round_device_offline(self, device_id: str, now: float) -> list[Action]:
        rnd = self._round
        assert rnd is not None
        rnd.waiting.discard(device_id)
        if rnd.is_open:
            rnd.participants.discard(device_id)
            if not rnd.participants:
                rnd.started_at = None
            return []
        if not rnd.waiting:
            return self._close_round(now)
        return []

    def _close_round(self, now: float) -> list[Action]:
        rnd = self._round
        assert rnd is not None
        deltas = [delta for delta, _ in rnd.reported.values()]
        samples = [n for _, n in rnd.reported.values()]
        actions: list[Action] = []
        try:
            new_state = fedavg_step(self._state, deltas, samples, server_lr=self.config.server_lr)
        except AggregationError as exc:
            self._counters["aggregation_failed"] += 1
            _log.error(
                "dropped round %d (%d updates) at version %d: %s",
                rnd.number,
                len(deltas),
                self._version,
                exc,
            )
        else:
            actions.append(
                self._publish(new_state, f"fedavg: round {rnd.number}, {len(deltas)} update(s)")
            )
        online = self.online_devices()
        self._round = _Round(
            number=rnd.number + 1,
            version=self._version,
            started_at=now if online else None,
            participants=set(online),
            waiting=set(online),
        )
        return actions
