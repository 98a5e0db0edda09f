"""Validation of one raw update payload, exactly as it came off the broker.

Every update is hostile input. ``validate_update`` runs the checks cheapest first and stops
at the first failure, in this order:

1. ``too_large``      payload longer than ``max_update_bytes``
2. ``malformed``      not msgpack, or msgpack over the decode limits; the envelope is read by
   schema (``Update.read``): only its known fields are built, unknown values are skipped
   unread (at most ``MAX_UNKNOWN_BYTES`` of unknown keys and values in the envelope), and
   the ``delta`` is left packed (a view of the payload) without being parsed
3. ``schema``         not a v2 ``update`` envelope with well-typed fields
4. ``device_mismatch`` the update's ``dev`` is not the device of the topic (the broker ACL
   guarantees who may write a topic, so the topic is the identity)
4a. ``signature``    only when signed updates are required (revision 2.8): the payload
   does not carry a valid Ed25519 signature by the key registered for the topic's device
   (``signature_check``; docs/protocol.md section 11.10)
5. ``retained``       the message came with the retain flag: a device never publishes an
   update retained, and the broker would hand a retained copy to every new subscriber
6. ``wrong_run``      the update was made for another run of the coordinator (the receipt
   names the current run, so the device re-joins it)
7. ``wrong_task``     ``task`` is not the running task
8. a known ``update_id`` (the ledger remembers every verdict): the same bytes from the same
   device are a copy of a message already judged (a QoS 1 redelivery, an outbox re-send),
   answered with the first verdict again (``Repeated``: not judged, not counted, never
   applied twice); other bytes or another device under a used id are ``duplicate``
9. ``future_version`` / ``stale``  base version newer than the current one, or more than
   ``max_staleness`` versions behind it
10. ``duplicate_work`` the device already had an update accepted for this base version: a
   retrained copy of the same work (an agent restarted before it got its receipt); not for
   a regional aggregator's partial updates (``partial``, revision 2.11), which must carry
   ``parts`` where a device's update must not (``schema``, checked with 4)
   (4 to 10 read only the envelope: a replayed or outdated update is refused before any
   tensor is decompressed, parsed or decoded)
11. ``too_large`` / ``malformed``  a zstd delta that does not decompress within
   ``decompressed_bound(expected_shapes)`` bytes or is not one zstd frame; a delta (inline
   or decompressed) that is not msgpack within the same limits (its unknown keys and
   values too: at most ``MAX_UNKNOWN_BYTES`` in all the delta's maps)
12. ``shape``          tensor names differ from the global model's (a delta with more entries
   than the model has tensors is refused from its map header; an entry the model lacks is
   skipped unread)
13. ``dtype`` / ``shape`` / ``schema`` an entry's content (``update_codec``): its dtypes, its
   shape against the model's, lengths, scale layout, int4 padding, top-k indices (in range,
   ascending, distinct). 11 to 13 are one pass over the delta, in wire order; every entry
   passes them before any is converted to float32, so a refused update costs about one copy
   of its bytes (``python -m bench.decode_worst``)
14. ``non_finite``    NaN or infinity anywhere in the delta
15. ``norm``          global L2 norm above ``max_norm``
    (14 and 15 take one pass: the norm, which is finite only when every value is)

Codecs: any valid entry codec and compression is accepted, whatever the task's ``codec``
asks for (an ``int4`` update under an ``int8`` task, a plain update under a ``+zstd`` one).
The spec is a request that saves the device's bandwidth; accepting any valid encoding
costs the coordinator nothing it does not already bound (``max_update_bytes`` caps the
bytes, the decoders cap the work), keeps updates already in flight usable when the
operator changes the codec of a running task, and keeps ``validate_update`` free of the
task description.

``validate_update`` only *reads* the ledger; the core records the verdict.

Steps 11 to 15 depend on nothing but the payload, the model's shapes and the limits, never
on the run's state: ``check_delta`` works them out on their own (an ingest worker process
does, ``coordinator.ingest_workers``) and ``validate_update(prechecked=...)`` then uses its
outcome at step 11 instead of decoding again. The verdict is the same either way, and the
order of the checks too: a stale update whose delta is also corrupt is still ``stale``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from coordinator.aggregation import is_finite, l2_norm
from coordinator.journal import Ledger, Verdict
from fedbus.envelope import DecodeLimits
from fedbus.errors import ProtocolError
from fedbus.messages import Update, read_update_fields
from fedbus.update_codec import decode_update_delta
from fedbus.wire_reader import MAX_UNKNOWN_BYTES

__all__ = [
    "REJECT_REASONS",
    "Accepted",
    "DeltaChecked",
    "Rejected",
    "Repeated",
    "ValidationLimits",
    "check_delta",
    "payload_digest",
    "validate_update",
]

REJECT_REASONS: tuple[str, ...] = (
    "too_large",
    "malformed",
    "schema",
    "device_mismatch",
    "signature",
    "dtype",
    "shape",
    "non_finite",
    "norm",
    "wrong_task",
    "wrong_run",
    "retained",
    "stale",
    "future_version",
    "duplicate",
    "duplicate_work",
    # Decided by the coordinator core, not by validate_update: FedAvg rounds, and updates
    # that arrive after the run has ended.
    "not_selected",
    "duplicate_in_round",
    "run_ended",
    # revision 2.12: a region's partials on one base version past its quota
    "region_quota",
)

MAX_DETAIL = 300  # characters of detail kept in a rejection (it may quote hostile input)
_UPDATE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # same shape as messages' ids


@dataclass(frozen=True)
class ValidationLimits:
    """Bounds for one update.

    ``decode`` left as None becomes ``DecodeLimits`` whose ``max_bytes`` and ``max_bin_len``
    are ``max_update_bytes`` and whose ``max_unknown_bytes`` is ``MAX_UNKNOWN_BYTES`` (so
    after construction it is always set). The same unknown-bytes budget applies to the
    delta, separately.
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
                DecodeLimits(max_bytes=self.max_update_bytes, max_bin_len=self.max_update_bytes,
                             max_unknown_bytes=MAX_UNKNOWN_BYTES),
            )


@dataclass(frozen=True, eq=False)
class Accepted:
    """An update that passed every check; ``delta`` holds decoded float32 arrays."""

    update: Update
    delta: dict[str, np.ndarray]
    staleness: int
    norm: float
    size: int
    digest: bytes = b""
    payload: bytes = b""  # the raw message, kept until the update is applied


@dataclass(frozen=True)
class Rejected:
    """An update that failed a check; ``update_id`` is None when it could not be read.
    ``base_version`` is set when the envelope was read."""

    reason: str
    detail: str
    size: int
    update_id: str | None = None
    device_id: str | None = None
    base_version: int | None = None
    digest: bytes = b""


@dataclass(frozen=True)
class Repeated:
    """A copy of an update already judged: answer with ``verdict`` again, change nothing."""

    verdict: Verdict
    size: int


@dataclass(frozen=True, eq=False)
class DeltaChecked:
    """The outcome of steps 11 to 15 for one payload (``check_delta``): the decoded delta
    and its L2 norm, or the reason and detail that refuse it (``delta`` None); and the
    payload's digest (``payload_digest``, b"": not worked out)."""

    delta: dict[str, np.ndarray] | None
    norm: float
    reason: str = ""
    detail: str = ""
    digest: bytes = b""


def payload_digest(payload: bytes) -> bytes:
    """8 bytes that tell one update's bytes from another's (blake2b)."""
    return hashlib.blake2b(payload, digest_size=8).digest()


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
    run_id: str,
    task_id: str,
    expected_shapes: Mapping[str, tuple[int, ...]],
    current_version: int,
    limits: ValidationLimits,
    ledger: Ledger,
    retained: bool = False,
    signature_check: Callable[[str, bytes], str | None] | None = None,
    partial: bool = False,
    prechecked: DeltaChecked | None = None,
) -> Accepted | Rejected | Repeated:
    """Check one raw update payload; never raises, whatever the bytes (see module doc).

    ``partial``: the topic is a regional aggregator's (revision 2.11): the update must
    carry ``parts`` (a device's must not: ``schema``), and ``duplicate_work`` does not
    apply (a region sends as many partials on one base version as it fills).

    ``signature_check(topic_device, payload)``, when given, says why the payload is not
    signed by that device's key (None: it is); the coordinator gives it only when it
    requires signed updates.

    ``prechecked``: ``check_delta`` of this same payload with these same shapes and limits,
    worked out ahead (by an ingest worker); used at step 11 instead of decoding here."""
    try:
        size = len(payload)
    except Exception as exc:  # not even a bytes-like object
        return Rejected("malformed", _short(f"payload has no length: {exc}"), 0)
    update_id: str | None = None
    device_id: str | None = None
    base: int | None = None
    digest = b""

    def reject(reason: str, detail: str) -> Rejected:
        return Rejected(reason, _short(detail), size, update_id, device_id, base, digest)

    try:
        if size > limits.max_update_bytes:
            return reject(
                "too_large", f"payload of {size} bytes exceeds limit {limits.max_update_bytes}"
            )
        # by schema: only the envelope's known fields are built, the delta stays packed
        obj = read_update_fields(payload, limits.decode)
        try:
            update = Update.from_wire(obj)
        except ProtocolError:
            update_id = _salvage_id(obj, "update_id")
            raise
        update_id, device_id, base = update.update_id, update.device_id, update.base_version
        digest = (prechecked.digest if prechecked is not None and prechecked.digest
                  else payload_digest(payload))
        if (update.parts is not None) != partial:
            return reject(
                "schema", "only a regional aggregator's partial update carries 'parts'"
                if not partial else "a partial update must say how many updates it folds "
                "('parts')",
            )
        if update.device_id != topic_device:
            return reject(
                "device_mismatch",
                f"update names device {update.device_id!r} but came on the topic of "
                f"{topic_device!r}",
            )
        if signature_check is not None:
            problem = signature_check(topic_device, payload)
            if problem is not None:
                return reject("signature", problem)
        if retained:
            return reject(
                "retained", "updates must not be published with the retain flag (the broker "
                "would hand the copy to every new subscriber)",
            )
        if update.run_id != run_id:
            return reject(
                "wrong_run",
                f"update was made for run {update.run_id}, the coordinator runs {run_id}: "
                "re-join with the current task",
            )
        if update.task_id != task_id:
            return reject(
                "wrong_task", f"update is for task {update.task_id!r}, running {task_id!r}"
            )
        known = ledger.verdict(update.update_id)
        if known is not None:
            if known.device_id == update.device_id and known.digest == digest:
                return Repeated(known, size)
            return reject(
                "duplicate", f"update id {update.update_id} was already used by another update"
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
        earlier = None if partial else ledger.work(update.device_id, update.base_version)
        if earlier is not None:
            return reject(
                "duplicate_work",
                f"device already contributed update {earlier} trained on base version "
                f"{update.base_version}",
            )
        checked = prechecked if prechecked is not None else _check_delta(
            update, expected_shapes, limits)
        if checked.delta is None:
            return reject(checked.reason, checked.detail)
        return Accepted(update=update, delta=checked.delta, staleness=staleness,
                        norm=checked.norm, size=size, digest=digest, payload=bytes(payload))
    except ProtocolError as exc:
        return reject(exc.reason, exc.detail)
    except Exception as exc:  # hostile input must never escape as an exception
        return reject("malformed", f"{type(exc).__name__}: {exc}")


def check_delta(
    payload: bytes, *, expected_shapes: Mapping[str, tuple[int, ...]], limits: ValidationLimits,
) -> DeltaChecked | None:
    """Steps 11 to 15 of ``validate_update`` for ``payload`` alone: its delta decoded and
    checked against the shapes and limits, with the payload's digest. None when the
    envelope itself fails (steps 1 to 3: too large, unreadable, not an update), which
    ``validate_update`` refuses before it would come to the delta. Never raises, whatever
    the bytes."""
    try:
        if len(payload) > limits.max_update_bytes:
            return None
        update = Update.from_wire(read_update_fields(payload, limits.decode))
    except Exception:  # ProtocolError, or anything hostile bytes could provoke
        return None
    return replace(_check_delta(update, expected_shapes, limits),
                   digest=payload_digest(payload))


def _check_delta(update: Update, expected_shapes: Mapping[str, tuple[int, ...]],
                 limits: ValidationLimits) -> DeltaChecked:
    """Steps 11 to 15 on a read envelope (never raises)."""
    try:
        # decompression (bounded by the expected shapes), decoding, then names and shapes
        assert limits.decode is not None
        delta = decode_update_delta(
            update.delta, update.compression, expected_shapes=expected_shapes,
            max_bin_len=limits.decode.max_bin_len,
            max_unknown_bytes=limits.decode.max_unknown_bytes,
        )
        # One pass: a finite norm means every value is finite (l2_norm); only a non-finite
        # norm needs the second look that tells NaN/infinity from a mere overflow.
        norm = l2_norm(delta)
        if not math.isfinite(norm) and not is_finite(delta):
            bad = sorted(name for name, a in delta.items() if not np.isfinite(a).all())
            return DeltaChecked(None, norm, "non_finite", _short(f"NaN or infinity in {bad}"))
        if not norm <= limits.max_norm:
            return DeltaChecked(None, norm, "norm",
                                _short(f"L2 norm {norm:.6g} exceeds bound {limits.max_norm:g}"))
        return DeltaChecked(delta, norm)
    except ProtocolError as exc:
        return DeltaChecked(None, math.nan, exc.reason, _short(exc.detail))
    except Exception as exc:  # hostile input must never escape as an exception
        return DeltaChecked(None, math.nan, "malformed", _short(f"{type(exc).__name__}: {exc}"))
