"""Message schemas of protocol v2 (see docs/protocol.md).

Each message is a frozen dataclass with ``to_wire()`` (a dict for ``envelope.pack``) and
``from_wire(obj)`` (checks every field's type and range, raising ``ProtocolError`` with
reason ``schema``). The messages a coordinator or agent receives from a possibly hostile
sender (``Update``, ``Status``, ``GlobalModel``) also have ``read(payload, limits)``: the
payload read by schema (``envelope.read``), so that only the fields named here are built;
an update's delta and a model's inline tensors stay packed (``update_codec.PackedMap``).
Tensor payloads are left encoded by ``from_wire``; the receiver decodes them with
``update_codec.decode_update_delta`` as a separate, counted validation step.

``Update.delta`` and ``GlobalModel.tensors`` are an entry map, or a bin holding the
zstd-compressed packed entry map (``fedbus.update_codec``). A model says so in its optional
``compression`` field (left out when uncompressed). An update has no such field: the msgpack
type of its delta decides (a map is plain, a bin is one zstd frame or, from revision 2.7, a
``sparse`` delta, told apart by its first byte: ``update_codec.bin_format``), and
``Update.compression`` is derived from it.

The update is the one message every device sends after every training run, so it has a
compact form: short keys (``dev``, ``task``, ``base``, ``n``, ``m``, ``ts``) and, from
``Update.pack``, metric values as float32. ``update_id`` and ``delta`` keep their names:
they are the two fields receivers and tools read straight off an unchecked envelope (to
address a receipt to a message that failed its schema check, to time decoding).
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from fedbus.codec_spec import COMPRESSIONS, parse_codec
from fedbus.envelope import PROTOCOL_VERSION, DecodeLimits, read
from fedbus.errors import ProtocolError
from fedbus.model_delta import SHA_BYTES
from fedbus.preprocess import InputNorm, parse_classes
from fedbus.topics import DEVICE_ID_PATTERN
from fedbus.update_codec import DELTA_FORMATS, PackedMap, bin_format, delta_wire_bound
from fedbus.wire_reader import FieldReader, Reader, Unread

__all__ = [
    "CONTROL_COMMANDS",
    "CONTROL_LIMITS",
    "ERROR_KINDS",
    "MAX_STATUS_AGENT",
    "MAX_STATUS_ERROR",
    "RUN_STATES",
    "STATUS_STATES",
    "UPDATE_FIELDS_BOUND",
    "Control",
    "GlobalModel",
    "Invite",
    "ModelDelta",
    "ModelSpec",
    "Receipt",
    "Status",
    "Task",
    "TrainSpec",
    "Update",
    "new_run_id",
    "new_update_id",
    "peek_update_id",
    "read_update_fields",
    "update_size_bound",
]

_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
STATUS_STATES = ("online", "training", "idle", "offline")
RUN_STATES = ("running", "paused", "ended")  # "paused": revision 2.5
_FLOAT32_MAX = 3.4028234663852886e38  # largest finite float32


def new_update_id() -> str:
    """A fresh update id: 96 random bits as 16 base64url characters (``[A-Za-z0-9_-]``).

    Ids must be unique across the fleet; with 96 random bits, even 10^9 updates collide
    with a probability below 10^-10.
    """
    return secrets.token_urlsafe(12)


def new_run_id() -> str:
    """A fresh run id, made once when a coordinator starts a new run: 96 random bits as 16
    base64url characters, like an update id. Every task, model, update and receipt of the
    run carries it, so nothing made for one run is ever taken for another."""
    return secrets.token_urlsafe(12)


def _get(obj: dict, key: str, types: type | tuple[type, ...], what: str) -> Any:
    if key not in obj:
        raise ProtocolError("schema", f"{what}: missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; never accept it where a number is meant.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ProtocolError("schema", f"{what}: field {key!r} has type bool")
    if not isinstance(value, types):
        name = value.wire_type if isinstance(value, Unread) else type(value).__name__
        raise ProtocolError("schema", f"{what}: field {key!r} has type {name}")
    return value


def _get_id(obj: dict, key: str, what: str, pattern: re.Pattern[str] = _ID) -> str:
    value = _get(obj, key, str, what)
    if not pattern.match(value):
        raise ProtocolError("schema", f"{what}: field {key!r} is not a valid id")
    return value


def _nonneg_int(obj: dict, key: str, what: str, maximum: int = 2**53) -> int:
    value = _get(obj, key, int, what)
    if not 0 <= value <= maximum:
        raise ProtocolError("schema", f"{what}: field {key!r} out of range")
    return value


def _positive_int(obj: dict, key: str, what: str) -> int:
    value = _nonneg_int(obj, key, what)
    if value < 1:
        raise ProtocolError("schema", f"{what}: field {key!r} must be at least 1")
    return value


def _finite_float(obj: dict, key: str, what: str) -> float:
    value = float(_get(obj, key, (int, float), what))
    if not math.isfinite(value):
        raise ProtocolError("schema", f"{what}: field {key!r} is not finite")
    return value


def _encoded(
    obj: dict, key: str, what: str
) -> tuple[dict[str, Any] | bytes | PackedMap, str | None]:
    """An encoded tensor map and its ``compression``: a map if none, else a bin."""
    compression = obj.get("compression")
    if compression is None:
        return _get(obj, key, (dict, PackedMap), what), None
    if compression not in COMPRESSIONS:
        raise ProtocolError("schema", f"{what}: unknown compression {compression!r}")
    return _get(obj, key, bytes, what), compression


def _check_kind(obj: dict, kind: str) -> None:
    if obj.get("v") != PROTOCOL_VERSION or obj.get("kind") != kind:
        raise ProtocolError("schema", f"not a v{PROTOCOL_VERSION} {kind} message")


_ARG_SCALARS = (int, float, str, bool)


def _check_args(args: Any, what: str) -> dict[str, Any]:
    if not isinstance(args, dict) or len(args) > 32:
        raise ProtocolError("schema", f"{what}: args must be a small map")
    for k, v in args.items():
        ok = isinstance(v, _ARG_SCALARS) or (
            isinstance(v, list) and len(v) <= 32 and all(isinstance(i, _ARG_SCALARS) for i in v)
        )
        if not isinstance(k, str) or not ok:
            raise ProtocolError("schema", f"{what}: bad argument {k!r}")
    return dict(args)


@dataclass(frozen=True)
class ModelSpec:
    """An architecture from the model zoo, by name, with its constructor arguments."""

    arch: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"arch": self.arch, "args": dict(self.args)}

    @classmethod
    def from_wire(cls, obj: Any) -> ModelSpec:
        if not isinstance(obj, dict):
            raise ProtocolError("schema", "task.model must be a map")
        return cls(
            arch=_get_id(obj, "arch", "task.model"),
            args=_check_args(obj.get("args", {}), "task.model"),
        )


@dataclass(frozen=True)
class TrainSpec:
    """Local training settings every device uses for this task."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    qat: bool = True

    def to_wire(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "qat": self.qat,
        }

    @classmethod
    def from_wire(cls, obj: Any) -> TrainSpec:
        what = "task.train"
        if not isinstance(obj, dict):
            raise ProtocolError("schema", f"{what} must be a map")
        spec = cls(
            epochs=_nonneg_int(obj, "epochs", what, 1000),
            batch_size=_nonneg_int(obj, "batch_size", what, 1 << 16),
            lr=_finite_float(obj, "lr", what),
            momentum=_finite_float(obj, "momentum", what),
            weight_decay=_finite_float(obj, "weight_decay", what),
            qat=_get(obj, "qat", bool, what),
        )
        if spec.momentum < 0 or spec.weight_decay < 0:
            raise ProtocolError("schema", f"{what}: momentum and weight_decay must be >= 0")
        if spec.epochs < 1 or spec.batch_size < 1 or spec.lr <= 0:
            raise ProtocolError("schema", f"{what}: epochs, batch_size and lr must be positive")
        return spec


@dataclass(frozen=True)
class Task:
    """What the fleet is learning: published retained on ``<prefix>/task``.

    ``run_id`` names one run of the coordinator: a coordinator that resumes from its state
    directory keeps it, a new run gets a new one. ``created_at`` is when the run began (it
    stays the same when the task is re-published). ``state`` is ``running`` or ``ended``;
    an ended task tells agents to stop training, with ``end_reason`` saying why.
    ``max_staleness`` is the coordinator's staleness bound, so an agent can drop an update
    that would only be rejected as ``stale``.

    Revision 2.2: ``classes`` names the classes (labels are then names), ``input_norm`` is
    the normalisation every device applies to its inputs (``fedbus.preprocess``), and
    ``requires`` lists what an agent must implement to take part (``input_norm`` whenever
    the task has one); an agent skips a task requiring something it does not know.
    """

    task_id: str
    model: ModelSpec
    train: TrainSpec
    codec: str = "int8"  # a codec spec (fedbus.codec_spec), e.g. "topk:0.01:int8+zstd"
    max_update_bytes: int = 4 * 1024 * 1024
    created_at: float = 0.0
    max_staleness: int = 10
    state: str = "running"
    end_reason: str | None = None
    classes: tuple[str, ...] | None = None
    input_norm: InputNorm | None = None
    requires: tuple[str, ...] = ()
    run_id: str = field(kw_only=True)
    # revision 2.10: a device trains only when invited (``Invite``), so that about
    # ``--concurrency`` devices train at a time whatever the size of the fleet
    by_invitation: bool = field(default=False, kw_only=True)

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    @property
    def paused(self) -> bool:
        """Revision 2.5: the operator paused the run; agents stay connected and idle."""
        return self.state == "paused"

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "kind": "task",
            "task_id": self.task_id,
            "run": self.run_id,
            "model": self.model.to_wire(),
            "train": self.train.to_wire(),
            "codec": self.codec,
            "max_update_bytes": self.max_update_bytes,
            "max_staleness": self.max_staleness,
            "state": self.state,
            "created_at": self.created_at,
        }
        if self.requires:
            wire["requires"] = list(self.requires)
        if self.classes is not None:
            wire["classes"] = list(self.classes)
        if self.input_norm is not None:
            wire["input_norm"] = self.input_norm.to_wire()
        if self.end_reason is not None:
            wire["end_reason"] = self.end_reason
        if self.by_invitation:
            wire["by_invitation"] = True
        return wire

    @classmethod
    def from_wire(cls, obj: dict) -> Task:
        _check_kind(obj, "task")
        codec = _get(obj, "codec", str, "task")
        try:
            parse_codec(codec)
        except ValueError as exc:
            raise ProtocolError("schema", f"task: {exc}") from None
        state = _get(obj, "state", str, "task")
        if state not in RUN_STATES:
            raise ProtocolError("schema", f"task: unknown state {state!r}")
        end_reason = obj.get("end_reason")
        if end_reason is not None and not isinstance(end_reason, str):
            raise ProtocolError("schema", "task: end_reason must be a string or nil")
        requires = obj.get("requires", [])
        if not isinstance(requires, list) or len(requires) > 16 or not all(
            isinstance(r, str) and _ID.match(r) for r in requires
        ):
            raise ProtocolError("schema", "task: requires must be an array of at most 16 ids")
        by_invitation = obj.get("by_invitation", False)
        if not isinstance(by_invitation, bool):
            raise ProtocolError("schema", "task: by_invitation must be a boolean")
        classes: tuple[str, ...] | None = None
        input_norm: InputNorm | None = None
        try:
            if "classes" in obj:
                if not isinstance(obj["classes"], list):
                    raise ValueError("classes must be an array of strings")
                classes = parse_classes(obj["classes"])
            if "input_norm" in obj:
                input_norm = InputNorm.from_wire(obj["input_norm"])
        except ValueError as exc:
            raise ProtocolError("schema", f"task: {exc}") from None
        return cls(
            task_id=_get_id(obj, "task_id", "task"),
            run_id=_get_id(obj, "run", "task"),
            model=ModelSpec.from_wire(obj.get("model")),
            train=TrainSpec.from_wire(obj.get("train")),
            codec=codec,
            max_update_bytes=_positive_int(obj, "max_update_bytes", "task"),
            max_staleness=_nonneg_int(obj, "max_staleness", "task"),
            state=state,
            end_reason=end_reason,
            created_at=_finite_float(obj, "created_at", "task"),
            classes=classes,
            input_norm=input_norm,
            requires=tuple(requires),
            by_invitation=by_invitation,
        )


@dataclass(frozen=True)
class GlobalModel:
    """One version of the global model, retained on ``<prefix>/model``.

    ``tensors`` is encoded as by ``update_codec.encode_update_delta`` with the coordinator's
    model codec (``fp32`` by default): an entry map, or a zstd bin when ``compression``.
    A model is identified by ``(run_id, version)``.
    """

    task_id: str
    version: int
    tensors: dict[str, Any] | bytes | PackedMap
    created_at: float = 0.0
    compression: str | None = None
    run_id: str = field(kw_only=True)

    def to_wire(self) -> dict[str, Any]:
        tensors: Any = self.tensors
        if isinstance(tensors, PackedMap):  # as read off the wire: the map itself again
            tensors = msgpack.unpackb(tensors.data, raw=False)
        wire = {
            "v": PROTOCOL_VERSION,
            "kind": "model",
            "task_id": self.task_id,
            "run": self.run_id,
            "version": self.version,
            "tensors": tensors,
            "created_at": self.created_at,
        }
        if self.compression is not None:
            wire["compression"] = self.compression
        return wire

    @classmethod
    def from_wire(cls, obj: dict) -> GlobalModel:
        _check_kind(obj, "model")
        tensors, compression = _encoded(obj, "tensors", "model")
        return cls(
            task_id=_get_id(obj, "task_id", "model"),
            run_id=_get_id(obj, "run", "model"),
            version=_nonneg_int(obj, "version", "model"),
            tensors=tensors,
            created_at=_finite_float(obj, "created_at", "model"),
            compression=compression,
        )

    @classmethod
    def read(cls, payload: bytes, limits: DecodeLimits | None = None) -> GlobalModel:
        """Decode and check a model payload by schema (``envelope.read``); ``tensors``
        stays packed (a ``PackedMap`` view of the payload, or the zstd frame's bytes)
        for ``update_codec.decode_update_delta``."""
        return cls.from_wire(read(payload, "model", MODEL_FIELDS, limits))


@dataclass(frozen=True)
class ModelDelta:
    """What turns version ``base`` of a run's model into version ``version`` (revision 2.7),
    retained on ``<prefix>/model_delta``: ``delta`` is the zstd frame of
    ``fedbus.model_delta`` and ``sha`` the digest of the model it rebuilds."""

    task_id: str
    base: int
    version: int
    delta: bytes
    sha: bytes
    created_at: float = 0.0
    run_id: str = field(kw_only=True)

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "kind": "model_delta",
            "task_id": self.task_id,
            "run": self.run_id,
            "base": self.base,
            "version": self.version,
            "delta": self.delta,
            "sha": self.sha,
            "created_at": self.created_at,
        }

    @classmethod
    def from_wire(cls, obj: dict) -> ModelDelta:
        _check_kind(obj, "model_delta")
        base = _nonneg_int(obj, "base", "model_delta")
        version = _nonneg_int(obj, "version", "model_delta")
        if version != base + 1:
            raise ProtocolError("schema", "model_delta: version must be base + 1")
        sha = bytes(_get(obj, "sha", (bytes, memoryview), "model_delta"))
        if len(sha) != SHA_BYTES:
            raise ProtocolError("schema", f"model_delta: sha must be {SHA_BYTES} bytes")
        return cls(
            task_id=_get_id(obj, "task_id", "model_delta"),
            run_id=_get_id(obj, "run", "model_delta"),
            base=base,
            version=version,
            delta=bytes(_get(obj, "delta", (bytes, memoryview), "model_delta")),
            sha=sha,
            created_at=_finite_float(obj, "created_at", "model_delta"),
        )

    @classmethod
    def read(cls, payload: bytes, limits: DecodeLimits | None = None) -> ModelDelta:
        """Decode and check a model delta payload by schema (``envelope.read``)."""
        return cls.from_wire(read(payload, "model_delta", MODEL_DELTA_FIELDS, limits))


@dataclass(frozen=True)
class Update:
    """One device's contribution: an encoded delta against global version ``base_version``
    of run ``run_id``.

    ``delta`` is an entry map, or a zstd bin when ``compression`` is ``"zstd"``
    (``update_codec.encode_update_delta`` returns both). The wire form has short keys
    (``update_id``, ``dev``, ``run``, ``task``, ``base``, ``n``, ``m``, ``delta``, ``ts``)
    and no compression field: the delta's msgpack type says whether it is compressed.
    ``pack()`` gives the bytes an agent sends (metric values as float32);
    ``envelope.pack(to_wire())`` is also valid, only longer.
    """

    update_id: str
    device_id: str
    task_id: str
    base_version: int
    num_samples: int
    delta: dict[str, Any] | bytes | PackedMap
    metrics: dict[str, float] = field(default_factory=dict)
    sent_at: float = 0.0
    compression: str | None = None
    run_id: str = field(kw_only=True)
    # revision 2.11: a regional aggregator's partial update (docs/protocol.md 7.3.1) says
    # how many device updates it folds; None (absent on the wire) for a device's own update
    parts: int | None = field(default=None, kw_only=True)

    def to_wire(self) -> dict[str, Any]:
        """The envelope as a dict; ``ValueError`` if ``delta`` and ``compression`` disagree."""
        compressed = isinstance(self.delta, (bytes, bytearray, memoryview))
        delta: Any = self.delta
        if isinstance(delta, PackedMap):  # as read off the wire: the map itself again
            delta = msgpack.unpackb(delta.data, raw=False)
        if compressed != (self.compression is not None) or (
            self.compression is not None and (
                self.compression not in DELTA_FORMATS
                or self.compression != bin_format(delta)
            )
        ):
            raise ValueError(
                f"update {self.update_id}: compression {self.compression!r} does not match "
                f"a delta of type {type(self.delta).__name__}"
            )
        wire = {
            "v": PROTOCOL_VERSION,
            "kind": "update",
            "update_id": self.update_id,
            "dev": self.device_id,
            "run": self.run_id,
            "task": self.task_id,
            "base": self.base_version,
            "n": self.num_samples,
            "m": dict(self.metrics),
            "delta": delta,
            "ts": self.sent_at,
        }
        if self.parts is not None:
            wire["parts"] = self.parts
        return wire

    def pack(self) -> bytes:
        """The message as an agent sends it: metric values as float32 (4 bytes, not 8).

        A metric too large for float32 keeps float64. Receivers accept either width.
        """
        wire = self.to_wire()
        wide = msgpack.Packer(use_bin_type=True)  # what envelope.pack uses
        narrow = msgpack.Packer(use_bin_type=True, use_single_float=True)
        parts = [wide.pack_map_header(len(wire))]
        for key, value in wire.items():
            parts.append(wide.pack(key))
            if key != "m":
                parts.append(wide.pack(value))
                continue
            parts.append(wide.pack_map_header(len(value)))
            for name, number in value.items():
                fits = isinstance(number, float) and abs(number) <= _FLOAT32_MAX
                parts.append(wide.pack(name))
                parts.append((narrow if fits else wide).pack(number))
        return b"".join(parts)

    @classmethod
    def from_wire(cls, obj: dict) -> Update:
        _check_kind(obj, "update")
        metrics = _get(obj, "m", dict, "update")
        if len(metrics) > _MAX_METRICS or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)
            for k, v in metrics.items()
        ):
            raise ProtocolError("schema", "update: metrics must map names to finite numbers")
        num_samples = _nonneg_int(obj, "n", "update", 1 << 40)
        if num_samples < 1:
            raise ProtocolError("schema", "update: field 'n' (num_samples) must be at least 1")
        delta = _get(obj, "delta", (dict, bytes, PackedMap), "update")
        parts = None
        if obj.get("parts") is not None:
            parts = _positive_int(obj, "parts", "update")
            if parts > num_samples:
                raise ProtocolError("schema", "update: 'parts' (updates folded) must not "
                                    "exceed 'n' (their weight)")
        return cls(
            update_id=_get_id(obj, "update_id", "update"),
            device_id=_get_id(obj, "dev", "update", DEVICE_ID_PATTERN),
            run_id=_get_id(obj, "run", "update"),
            task_id=_get_id(obj, "task", "update"),
            base_version=_nonneg_int(obj, "base", "update"),
            num_samples=num_samples,
            delta=delta,
            metrics={k: float(v) for k, v in metrics.items()},
            sent_at=_finite_float(obj, "ts", "update"),
            compression=bin_format(delta) if isinstance(delta, bytes) else None,
            parts=parts,
        )

    @classmethod
    def read(cls, payload: bytes, limits: DecodeLimits | None = None) -> Update:
        """Decode and check an update payload by schema (``envelope.read``): its ``delta``
        stays unread, a ``PackedMap`` view of the payload (or the bytes of a zstd frame),
        for ``update_codec.decode_update_delta``. ``ProtocolError`` as ``from_wire``;
        ``read_fields`` gives the fields it read when the check fails."""
        return cls.from_wire(read_update_fields(payload, limits))


def _read_metrics(reader: Reader) -> Any:
    """``m``: a map of at most 32 str -> number (a longer one is skipped and refused by
    ``from_wire``); bin keys are kept as bytes so that ``from_wire`` refuses them."""
    kind, n = reader.peek()
    if kind != "map" or n > _MAX_METRICS:
        return reader.leaf()
    metrics: dict[Any, Any] = {}
    for _ in range(reader.map_header(_MAX_METRICS)):
        if reader.peek()[0] == "bin":
            key: Any = bytes(reader.bin_view())
        else:
            key = reader.key()
        if key in metrics:
            raise ProtocolError("malformed", f"key {key!r} appears twice in one map")
        metrics[key] = reader.leaf()
    return metrics


def _read_delta(reader: Reader) -> Any:
    """``delta``: a map is left packed (a view of the payload), a bin copied out."""
    kind, _ = reader.peek()
    if kind == "map":
        return PackedMap(reader.span())
    if kind == "bin":
        return bytes(reader.bin_view())
    return reader.leaf()


_MAX_METRICS = 32


def _fields_bound() -> int:
    """Most bytes the fields of an update other than ``delta`` take within this module's
    checks and the coordinator's decode limits (docs/protocol.md 4.2, 7.3): a map16 header,
    the eleven keys, ``v`` and ``kind``, four ids of at most 64 ASCII characters (str8),
    ``base``, ``n`` and ``ts`` as 9-byte numbers, and ``m`` with its most entries, 32, each
    a name of 4,096 bytes (str16) and a float64. A partial update's ``parts`` (revision
    2.11, 15 bytes at most) is left out: it fits the 64 KiB of slack ``limits`` adds."""
    keys = ("v", "kind", "update_id", "dev", "run", "task", "base", "n", "m", "delta", "ts")
    ids = 4 * (2 + 64)
    numbers = 3 * 9
    metrics = 3 + _MAX_METRICS * (3 + 4096 + 9)
    return (3 + sum(len(msgpack.packb(k)) for k in keys) + len(msgpack.packb(PROTOCOL_VERSION))
            + len(msgpack.packb("update")) + ids + numbers + metrics)


UPDATE_FIELDS_BOUND = _fields_bound()  # 131,809 bytes, almost all of it the metrics


def update_size_bound(expected_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Most bytes an honest update payload for a model of these tensor shapes can take,
    whatever its codec (fp32, fp16, int8, int4, topk:F:V, each with or without +zstd, and
    sparse:F:V, at most about 1.3 bytes per element) and metrics:
    ``update_codec.delta_wire_bound`` plus ``UPDATE_FIELDS_BOUND``. No update that passes
    the coordinator's checks for this model is longer (tests/test_limits.py measures it
    against the encoders)."""
    return delta_wire_bound(expected_shapes) + UPDATE_FIELDS_BOUND


_LEAF: FieldReader = Reader.leaf
UPDATE_FIELDS: dict[str, FieldReader] = {
    "update_id": _LEAF, "dev": _LEAF, "run": _LEAF, "task": _LEAF, "base": _LEAF,
    "n": _LEAF, "m": _read_metrics, "delta": _read_delta, "ts": _LEAF,
    "parts": _LEAF,  # revision 2.11: partial updates of regional aggregators
}
MODEL_FIELDS: dict[str, FieldReader] = {
    "task_id": _LEAF, "run": _LEAF, "version": _LEAF, "tensors": _read_delta,
    "created_at": _LEAF, "compression": _LEAF,
}
MODEL_DELTA_FIELDS: dict[str, FieldReader] = {
    "task_id": _LEAF, "run": _LEAF, "base": _LEAF, "version": _LEAF, "delta": _LEAF,
    "sha": _LEAF, "created_at": _LEAF,
}
STATUS_FIELDS: dict[str, FieldReader] = {
    "device_id": _LEAF, "state": _LEAF, "run": _LEAF, "model_version": _LEAF, "ts": _LEAF,
    "agent": _LEAF, "error": _LEAF, "error_kind": _LEAF,
    "invite": _LEAF,  # revision 2.13
}
# status fields of revision 2.3: the agent's version and its last error, in UTF-8 bytes
MAX_STATUS_AGENT = 64
MAX_STATUS_ERROR = 200
ERROR_KINDS = ("data", "model", "training", "memory", "update", "other")


def _short_text(obj: dict, key: str, limit: int) -> str | None:
    """An optional printable string of at most ``limit`` bytes of UTF-8 (nil: absent)."""
    value = obj.get(key)
    if value is None:
        return None
    if (not isinstance(value, str) or len(value.encode()) > limit
            or not value.isprintable()):
        raise ProtocolError(
            "schema", f"status: {key} must be printable text of at most {limit} bytes"
        )
    return value


PEEK_BYTES = 4096  # peek_update_id reads no further into a payload than this


def peek_update_id(payload: bytes) -> str | None:
    """The ``update_id`` of an update payload, read off its first ``PEEK_BYTES`` bytes
    only, or None: the id is not a key of the top-level map before that point (an agent
    writes it third, section 7.3), not a valid id, or what precedes it is not msgpack.
    Costs the same whatever the payload's size: what a refusal before any decoding can
    afford (a rate-limited update's receipt, ``coordinator.admission``)."""
    try:
        reader = Reader(memoryview(payload)[:PEEK_BYTES], max_str_len=PEEK_BYTES,
                        max_bin_len=PEEK_BYTES)
        for _ in range(reader.map_header(64)):
            if reader.key() != "update_id":
                reader.skip()
                continue
            value = reader.leaf()
            return value if isinstance(value, str) and _ID.match(value) else None
    except ProtocolError:  # not msgpack, or the id is not within the first bytes
        return None
    return None


def read_update_fields(payload: bytes, limits: DecodeLimits | None = None) -> dict:
    """The fields of an update payload that ``Update.from_wire`` checks, read by schema;
    the rest of the payload is skipped. ``ProtocolError`` for ``too_large``, ``malformed``
    and a wrong ``v`` or ``kind`` (``schema``)."""
    return read(payload, "update", UPDATE_FIELDS, limits)


@dataclass(frozen=True)
class Receipt:
    """The coordinator's answer to one update, sent to ``<prefix>/receipt/<device>``.

    ``run_id`` is the coordinator's run (on a ``wrong_run`` rejection, the run the device
    should re-join). ``repeat`` marks a receipt that repeats the verdict already given for
    the same update (a copy that arrived again: a QoS 1 redelivery, an outbox re-send).
    """

    update_id: str
    accepted: bool
    reason: str | None
    detail: str
    model_version: int
    staleness: int | None = None
    repeat: bool = False
    run_id: str = field(kw_only=True)
    # rate_limited only: seconds after which the coordinator will take the update again
    retry_after: float | None = field(default=None, kw_only=True)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "kind": "receipt",
            "update_id": self.update_id,
            "run": self.run_id,
            "accepted": self.accepted,
            "reason": self.reason,
            "detail": self.detail,
            "model_version": self.model_version,
            "staleness": self.staleness,
        }
        if self.repeat:
            wire["repeat"] = True
        if self.retry_after is not None:
            wire["retry_after"] = float(self.retry_after)
        return wire

    @classmethod
    def from_wire(cls, obj: dict) -> Receipt:
        _check_kind(obj, "receipt")
        reason = obj.get("reason")
        staleness = obj.get("staleness")
        repeat = obj.get("repeat", False)
        retry_after = obj.get("retry_after")
        if retry_after is not None and not (
            isinstance(retry_after, int | float) and not isinstance(retry_after, bool)
            and math.isfinite(retry_after) and retry_after >= 0
        ):
            raise ProtocolError("schema", "receipt: retry_after must be a number >= 0 or nil")
        if reason is not None and not isinstance(reason, str):
            raise ProtocolError("schema", "receipt: reason must be a string or nil")
        if staleness is not None and (
            not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0
        ):
            raise ProtocolError("schema", "receipt: staleness must be an integer >= 0 or nil")
        if not isinstance(repeat, bool):
            raise ProtocolError("schema", "receipt: repeat must be a boolean")
        return cls(
            update_id=_get_id(obj, "update_id", "receipt"),
            run_id=_get_id(obj, "run", "receipt"),
            accepted=_get(obj, "accepted", bool, "receipt"),
            reason=reason,
            detail=_get(obj, "detail", str, "receipt"),
            model_version=_nonneg_int(obj, "model_version", "receipt"),
            staleness=staleness,
            repeat=repeat,
            retry_after=None if retry_after is None else float(retry_after),
        )


@dataclass(frozen=True)
class Invite:
    """Revision 2.10: the coordinator invites one device to train once, on
    ``<prefix>/receipt/<device>`` (the device's own receipt topic, QoS 1). Only sent in a
    run whose task says ``by_invitation``; ``version`` is the global version when the
    invitation was made (the device trains on the newest model it holds or receives).

    Revision 2.13: ``invite_id`` (wire ``id``, optional) names the invitation; the
    coordinator sends the same invitation again, same id, to a device whose status says it
    does not know it, and an agent acts on an id at most once (docs/protocol.md 7.11)."""

    version: int
    sent_at: float = 0.0
    run_id: str = field(kw_only=True)
    invite_id: str | None = field(default=None, kw_only=True)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "kind": "invite",
            "run": self.run_id,
            "version": self.version,
            "ts": self.sent_at,
        }
        if self.invite_id is not None:
            wire["id"] = self.invite_id
        return wire

    @classmethod
    def from_wire(cls, obj: dict) -> Invite:
        _check_kind(obj, "invite")
        invite_id = obj.get("id")
        if invite_id is not None and not (isinstance(invite_id, str) and _ID.match(invite_id)):
            raise ProtocolError("schema", "invite: id must be an id or nil")
        return cls(
            run_id=_get_id(obj, "run", "invite"),
            version=_nonneg_int(obj, "version", "invite"),
            sent_at=_finite_float(obj, "ts", "invite"),
            invite_id=invite_id,
        )


@dataclass(frozen=True)
class Status:
    """A device's presence, retained on ``<prefix>/status/<device>``; its Will says offline.

    ``run_id`` is the run the device last trained for (nil before it has one). Since
    revision 2.3 (optional, for operators): ``agent``, the device's software version, and
    ``error``, the last problem that kept it from contributing (``error_kind`` one of
    ``ERROR_KINDS``; a receiver reads a kind it does not know as ``other``).

    Revision 2.13: ``invite_aware`` (the wire key ``invite`` is present) says the device
    names in ``invite`` the id of the newest invitation it knows, held or used (nil: none);
    an older device writes no such key (docs/protocol.md 7.5, 10.10)."""

    device_id: str
    state: str
    model_version: int | None = None
    ts: float = field(default_factory=time.time)
    run_id: str | None = None
    agent: str | None = None
    error: str | None = None
    error_kind: str | None = None
    invite: str | None = None
    invite_aware: bool = False

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "kind": "status",
            "device_id": self.device_id,
            "state": self.state,
            "run": self.run_id,
            "model_version": self.model_version,
            "ts": self.ts,
        }
        if self.agent is not None:
            wire["agent"] = self.agent
        if self.error is not None:
            wire["error"] = self.error
            wire["error_kind"] = self.error_kind or "other"
        if self.invite_aware:
            wire["invite"] = self.invite
        return wire

    @classmethod
    def from_wire(cls, obj: dict) -> Status:
        _check_kind(obj, "status")
        state = _get(obj, "state", str, "status")
        if state not in STATUS_STATES:
            raise ProtocolError("schema", f"status: unknown state {state!r}")
        version = obj.get("model_version")
        if version is not None and (
            not isinstance(version, int) or isinstance(version, bool) or version < 0
        ):
            raise ProtocolError("schema", "status: model_version must be an integer >= 0 or nil")
        run = obj.get("run")
        if run is not None and not (isinstance(run, str) and _ID.match(run)):
            raise ProtocolError("schema", "status: run must be an id or nil")
        agent = _short_text(obj, "agent", MAX_STATUS_AGENT)
        error = _short_text(obj, "error", MAX_STATUS_ERROR)
        kind = _short_text(obj, "error_kind", 32)
        invite = obj.get("invite")
        if invite is not None and not (isinstance(invite, str) and _ID.match(invite)):
            raise ProtocolError("schema", "status: invite must be an id or nil")
        return cls(
            device_id=_get_id(obj, "device_id", "status", DEVICE_ID_PATTERN),
            state=state,
            model_version=version,
            ts=_finite_float(obj, "ts", "status"),
            run_id=run,
            agent=agent,
            error=error,
            error_kind=None if error is None else (kind if kind in ERROR_KINDS else "other"),
            invite=invite,
            invite_aware="invite" in obj,
        )

    @classmethod
    def read(cls, payload: bytes, limits: DecodeLimits | None = None) -> Status:
        """Decode and check a status payload by schema (``envelope.read``)."""
        return cls.from_wire(read(payload, "status", STATUS_FIELDS, limits))


# revision 2.5: the operator's run control, on <prefix>/control (docs/protocol.md 7.8)
CONTROL_COMMANDS = ("pause", "resume", "stop")
MAX_CONTROL_REASON = 200  # bytes of UTF-8
CONTROL_LIMITS = DecodeLimits(
    max_bytes=1024, max_bin_len=0, max_str_len=256, max_array_len=0, max_map_len=16
)
CONTROL_FIELDS: dict[str, FieldReader] = {
    "id": _LEAF, "command": _LEAF, "ts": _LEAF, "reason": _LEAF,
}


@dataclass(frozen=True)
class Control:
    """An operator's command to the coordinator (revision 2.5), published (QoS 1, never
    retained) on ``<prefix>/control``, which only the operator account may write.

    ``command`` is one of ``CONTROL_COMMANDS``; ``request_id`` (wire ``id``) is the
    sender's name for this request, which the coordinator's answer (the fleet snapshot's
    ``run.control``) repeats; ``ts`` is when it was sent (wall-clock seconds); ``reason``
    is free text for the log and the ended task's ``end_reason``."""

    request_id: str
    command: str
    ts: float
    reason: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "kind": "control",
            "id": self.request_id,
            "command": self.command,
            "ts": self.ts,
        }
        if self.reason is not None:
            wire["reason"] = self.reason
        return wire

    @classmethod
    def from_wire(cls, obj: dict) -> Control:
        _check_kind(obj, "control")
        command = _get(obj, "command", str, "control")
        if command not in CONTROL_COMMANDS:
            raise ProtocolError("schema", f"control: unknown command {command!r}")
        return cls(
            request_id=_get_id(obj, "id", "control"),
            command=command,
            ts=_finite_float(obj, "ts", "control"),
            reason=_short_text(obj, "reason", MAX_CONTROL_REASON),
        )

    @classmethod
    def read(cls, payload: bytes, limits: DecodeLimits = CONTROL_LIMITS) -> Control:
        """Decode and check a control payload by schema (``envelope.read``)."""
        return cls.from_wire(read(payload, "control", CONTROL_FIELDS, limits))
