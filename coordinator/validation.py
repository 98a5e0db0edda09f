"""Validation of one raw update payload, exactly as it came off the broker.

Every update is hostile input. ``validate_update`` runs the checks cheapest first and stops
at the first failure, in this order:

1. ``too_large``      payload longer than ``max_update_bytes``
2. ``malformed``      not msgpack, or msgpack over the decode limits
3. ``schema``         not a v1 ``update`` envelope with well-typed fields
4. ``device_mismatch`` ``device_id`` is not the device of the topic (the broker ACL
   guarantees who may write a topic, so the topic is the identity)
4b. ``wrong_task``    ``task_id`` is not the running task: a field compare, so it comes
   before any tensor is decoded (an update for another task's model would otherwise be
   reported as a ``shape`` error)
5. ``future_version`` / ``stale``  base version newer than the current one, or more than
   ``max_staleness`` versions behind it
6. ``duplicate``      ``update_id`` already used
   (5 and 6 read only the envelope: a replayed or outdated update is refused before any
   tensor is decompressed or decoded)
7. ``too_large`` / ``malformed``  a ``"compression": "zstd"`` delta that does not
   decompress within ``decompressed_bound(expected_shapes)`` bytes (the largest legitimate
   encoding of the model's tensors; the output buffer never grows past it), is not one
   zstd frame, or does not hold msgpack within the same limits
8. ``dtype`` / ``shape`` / ``schema`` while decoding the tensors (``update_codec``); a
   ``topk`` entry's shape is compared with the model's before it is expanded, and its
   indices must be in range, ascending and distinct
9. ``shape``          tensor names or shapes differ from the global model's
10. ``non_finite``    NaN or infinity anywhere in the delta
11. ``norm``          global L2 norm above ``max_norm``
    (10 and 11 take one pass: the norm, which is finite only when every value is)

Codecs: any valid entry codec and compression is accepted, whatever the task's ``codec``
asks for (an ``int4`` update under an ``int8`` task, a plain update under a ``+zstd`` one).
The spec is a request that saves the device's bandwidth; accepting any valid encoding
costs the coordinator nothing it does not already bound (``max_update_bytes`` caps the
bytes, the decoders cap the work), keeps updates already in flight usable when the
operator changes the codec of a running task, and keeps ``validate_update`` free of the
task description.

``validate_update`` only *reads* ``seen``: the caller adds an update's id once it has
really used the update (accepted it into a buffer or round). A rejected id is therefore
never remembered, so a device may retry it after fixing the problem, and a QoS 1
redelivery of a used update is rejected as ``duplicate``.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from coordinator.aggregation import is_finite, l2_norm
from fedbus.envelope import DecodeLimits, unpack
from fedbus.errors import ProtocolError
from fedbus.messages import Update
from fedbus.update_codec import decode_update_delta

__all__ = [
    "REJECT_REASONS",
    "Accepted",
    "Rejected",
    "SeenIds",
    "ValidationLimits",
    "validate_update",
]

REJECT_REASONS: tuple[str, ...] = (
    "too_large",
    "malformed",
    "schema",
    "device_mismatch",
    "dtype",
    "shape",
    "non_finite",
    "norm",
    "wrong_task",
    "stale",
    "future_version",
    "duplicate",
    # Decided by the coordinator's FedAvg rounds (coordinator.core), not by validate_update.
    "not_selected",
    "duplicate_in_round",
)

MAX_DETAIL = 300  # characters of detail kept in a rejection (it may quote hostile input)
_UPDATE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # same shape as messages' ids


@dataclass(frozen=True)
class ValidationLimits:
    """Bounds for one update.

    ``decode`` left as None becomes ``DecodeLimits`` whose ``max_bytes`` and ``max_bin_len``
    are ``max_update_bytes`` (so after construction it is always set).
    """

    max_update_bytes: int
    max_norm: float
    max_staleness: int
    decode: DecodeLimits | None = None

    def __post_init__(self) -> None:
        if self.max_update_bytes < 1:
            raise ValueError(f"max_update_bytes must be >= 1, got {self.max_update_bytes}")
        if not (np.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError(f"max_norm must be finite and > 0, got {self.max_norm!r}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.decode is None:
            object.__setattr__(
                self,
                "decode",
                DecodeLimits(max_bytes=self.max_update_bytes, max_bin_len=self.max_update_bytes),
            )


@dataclass(frozen=True, eq=False)
class Accepted:
    """An update that passed every check; ``delta`` holds decoded float32 arrays."""

    update: Update
    delta: dict[str, np.ndarray]
    staleness: int
    norm: float
    size: int


@dataclass(frozen=True)
class Rejected:
    """An update that failed a check; ``update_id`` is None when it could not be read."""

    reason: str
    detail: str
    size: int
    update_id: str | None = None
    device_id: str | None = None


class SeenIds:
    """Bounded memory of used update ids: insertion-ordered, the oldest evicted past capacity."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, update_id: object) -> bool:
        return update_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def add(self, update_id: str) -> None:
        """Remember ``update_id`` (a no-op if already known); evict the oldest past capacity."""
        if update_id in self._ids:
            return
        self._ids[update_id] = None
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


def _short(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def _salvage_id(obj: object, key: str) -> str | None:
    """A well-formed id from a message that failed its schema check, for the receipt."""
    if isinstance(obj, dict):
        value = obj.get(key)
        if isinstance(value, str) and _UPDATE_ID.match(value):
            return value
    return None


def validate_update(
    payload: bytes,
    *,
    topic_device: str,
    task_id: str,
    expected_shapes: Mapping[str, tuple[int, ...]],
    current_version: int,
    limits: ValidationLimits,
    seen: SeenIds,
) -> Accepted | Rejected:
    """Check one raw update payload; never raises, whatever the bytes (see module doc)."""
    try:
        size = len(payload)
    except Exception as exc:  # not even a bytes-like object
        return Rejected("malformed", _short(f"payload has no length: {exc}"), 0)
    update_id: str | None = None
    device_id: str | None = None

    def reject(reason: str, detail: str) -> Rejected:
        return Rejected(reason, _short(detail), size, update_id, device_id)

    try:
        if size > limits.max_update_bytes:
            return reject(
                "too_large", f"payload of {size} bytes exceeds limit {limits.max_update_bytes}"
            )
        obj = unpack(payload, "update", limits.decode)
        try:
            update = Update.from_wire(obj)
        except ProtocolError:
            update_id = _salvage_id(obj, "update_id")
            raise
        update_id, device_id = update.update_id, update.device_id
        if update.device_id != topic_device:
            return reject(
                "device_mismatch",
                f"update names device {update.device_id!r} but came on the topic of "
                f"{topic_device!r}",
            )
        if update.task_id != task_id:
            return reject(
                "wrong_task", f"update is for task {update.task_id!r}, running {task_id!r}"
            )
        # Envelope-only checks before any tensor is touched: a stale, future or repeated
        # update costs one msgpack decode, not a decompression and a dequantisation.
        if update.base_version > current_version:
            return reject(
                "future_version",
                f"base version {update.base_version} is newer than current {current_version}",
            )
        staleness = current_version - update.base_version
        if staleness > limits.max_staleness:
            return reject(
                "stale",
                f"base version {update.base_version} is {staleness} versions behind "
                f"{current_version} (max {limits.max_staleness})",
            )
        if update.update_id in seen:
            return reject("duplicate", f"update id {update.update_id} was already used")
        # decompression (bounded by the expected shapes), decoding, then names and shapes
        delta = decode_update_delta(
            update.delta, update.compression, expected_shapes=expected_shapes
        )
        # One pass: a finite norm means every value is finite (l2_norm); only a non-finite
        # norm needs the second look that tells NaN/infinity from a mere overflow.
        norm = l2_norm(delta)
        if not math.isfinite(norm) and not is_finite(delta):
            bad = sorted(name for name, a in delta.items() if not np.isfinite(a).all())
            return reject("non_finite", f"NaN or infinity in {bad}")
        if not norm <= limits.max_norm:
            return reject("norm", f"L2 norm {norm:.6g} exceeds bound {limits.max_norm:g}")
        return Accepted(update=update, delta=delta, staleness=staleness, norm=norm, size=size)
    except ProtocolError as exc:
        return reject(exc.reason, exc.detail)
    except Exception as exc:  # hostile input must never escape as an exception
        return reject("malformed", f"{type(exc).__name__}: {exc}")
