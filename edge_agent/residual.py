"""Error feedback for top-k updates, and the residual it keeps across agent restarts.

Top-k sends only the largest changes; on its own that biases the model towards whatever
is large in every single update. With error feedback the agent remembers what it did not
send — the dropped elements plus the quantisation error of the sent values — and adds it
to its next delta before compressing, so every change is sent eventually and the sum of
what the coordinator receives tracks the sum of the real deltas (``encode_with_feedback``).

``ResidualStore`` keeps that residual in memory and in ``<state_dir>/residual.npz``
(written atomically: a temporary file, fsync, rename; read with ``allow_pickle=False``),
so it survives a restart of the agent. It belongs to one task, identified by ``task_id``
and the task's ``created_at`` (a coordinator that re-creates a task under the same id
starts from a new model, which an old residual does not belong to), and to that task's
tensor names and shapes. Anything else — another task, other tensors, a missing,
unreadable or corrupt file — means starting from zero, with a log line saying why.

The agent saves the new residual as soon as the update is queued for sending. An update
the broker or the coordinator turns down later (a refused PUBACK, ``stale``) is lost as a
whole, exactly as it would be without error feedback.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedbus.codec_spec import CodecSpec
from fedbus.update_codec import decode_update_delta, encode_update_delta

__all__ = ["RESIDUAL_FILE", "ResidualStore", "encode_with_feedback"]

log = logging.getLogger(__name__)

RESIDUAL_FILE = "residual.npz"
_FORMAT = 1


def encode_with_feedback(
    delta: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    spec: CodecSpec,
    *,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, Any] | bytes, str | None, dict[str, np.ndarray]]:
    """Encode ``delta + residual`` with ``spec``: ``(wire_delta, compression, new_residual)``.

    ``new_residual`` is exactly what the coordinator will not see of ``delta + residual``
    (computed by decoding the wire form as the coordinator does).
    """
    corrected = {
        name: np.asarray(value, np.float32)
        + (residual[name] if residual is not None else np.float32(0))
        for name, value in delta.items()
    }
    wire, compression = encode_update_delta(corrected, spec, rng=rng)
    received = wire if compression is not None else msgpack.unpackb(msgpack.packb(wire))
    shapes = {name: value.shape for name, value in corrected.items()}
    sent = decode_update_delta(received, compression, expected_shapes=shapes)
    return wire, compression, {name: corrected[name] - sent[name] for name in corrected}


def _zeros(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}


class ResidualStore:
    """One device's error-feedback residual, in memory and in ``directory/residual.npz``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / RESIDUAL_FILE
        self._key: tuple[str, float] | None = None
        self._residual: dict[str, np.ndarray] | None = None

    def load(
        self, task_id: str, created_at: float, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray]:
        """The residual of this task with these tensors, or zeros (the log says why)."""
        key = (task_id, float(created_at))
        shapes = {name: tuple(shape) for name, shape in shapes.items()}
        if self._key == key and self._residual is not None and self._fits(self._residual, shapes):
            return dict(self._residual)
        residual = self._read(key, shapes)
        self._key, self._residual = key, residual
        return dict(residual)

    def save(self, task_id: str, created_at: float, residual: Mapping[str, np.ndarray]) -> None:
        """Keep ``residual`` for this task; write it to disk atomically (errors are logged)."""
        arrays = {name: np.asarray(value, np.float32) for name, value in residual.items()}
        self._key, self._residual = (task_id, float(created_at)), arrays
        names = list(arrays)
        payload: dict[str, np.ndarray] = {
            "format": np.array(_FORMAT),
            "task_id": np.array(task_id),
            "created_at": np.array(float(created_at), np.float64),
            "names": np.array(names, dtype=np.str_),
        }
        payload.update({f"t{i}": arrays[name] for i, name in enumerate(names)})
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(tmp, "wb") as fh:
                np.savez(fh, **payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning(
                "cannot write the error-feedback residual to %s (%s); it is kept in memory "
                "only and lost if the agent restarts", self.path, exc,
            )

    @staticmethod
    def _fits(residual: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return set(residual) == set(shapes) and all(
            residual[name].shape == shape for name, shape in shapes.items()
        )

    def _read(
        self, key: tuple[str, float], shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray]:
        if not self.path.exists():
            log.info("no error-feedback residual at %s; starting from zero", self.path)
            return _zeros(shapes)
        try:
            with np.load(self.path, allow_pickle=False) as data:
                stored = (str(data["task_id"][()]), float(data["created_at"][()]))
                fmt = int(data["format"][()])
                names = [str(n) for n in data["names"]]
                arrays = {name: np.array(data[f"t{i}"]) for i, name in enumerate(names)}
        except Exception as exc:  # a torn or foreign file: any failure means start afresh
            log.warning(
                "error-feedback residual %s is unreadable (%s: %s); starting from zero",
                self.path, type(exc).__name__, exc,
            )
            return _zeros(shapes)
        if fmt != _FORMAT:
            log.warning("residual %s has format %d, expected %d; starting from zero",
                        self.path, fmt, _FORMAT)
            return _zeros(shapes)
        if stored != key:
            log.info(
                "residual %s belongs to task %s (created %s), not %s (created %s); "
                "starting from zero", self.path, stored[0], stored[1], key[0], key[1],
            )
            return _zeros(shapes)
        if not self._fits(arrays, shapes):
            log.warning(
                "residual %s holds other tensors than task %s's model (%s); starting from zero",
                self.path, key[0], _difference(arrays, shapes),
            )
            return _zeros(shapes)
        bad = sorted(
            name for name, a in arrays.items()
            if a.dtype != np.float32 or not np.isfinite(a).all()
        )
        if bad:
            log.warning("residual %s has non-float32 or non-finite tensors %s; starting from "
                        "zero", self.path, bad)
            return _zeros(shapes)
        log.info("resuming the error-feedback residual of task %s from %s (norm %.4g)",
                 key[0], self.path, math.sqrt(sum(float(np.sum(a * a)) for a in arrays.values())))
        return arrays


def _difference(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> str:
    missing = sorted(set(shapes) - set(arrays))
    extra = sorted(set(arrays) - set(shapes))
    wrong = sorted(
        f"{name} {arrays[name].shape} != {shapes[name]}"
        for name in set(arrays) & set(shapes)
        if arrays[name].shape != shapes[name]
    )
    return f"missing {missing}, extra {extra}, shapes {wrong}"
