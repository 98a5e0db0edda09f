"""What a task says about the data, applied the same way on every device and the coordinator.

Two things (protocol revision 2.2, docs/protocol.md section 7.1):

- **Input normalisation** (``InputNorm``): per-feature (or per-channel) ``mean`` and ``std``;
  a sample's values become ``(x - mean) / std`` after it has been given the model's input
  shape (``fedbus.zoo.fit_inputs``). The vectors run along the input's first axis: the
  features of an ``mlp``, the channels of a ``cnn`` or ``cnn1d``; a vector of length 1
  applies to every value.
- **Class names** (``encode_labels``): with a task's class list a label is a name, and its
  class is its position in the list; without one, labels are class indices.

Pure functions over numpy arrays: no torch, no network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbus.errors import ConfigError

__all__ = [
    "KNOWN_REQUIREMENTS",
    "MAX_CLASSES",
    "MAX_CLASS_NAME",
    "MAX_NORM_LENGTH",
    "InputNorm",
    "compute_input_norm",
    "encode_labels",
    "label_text",
    "load_input_norm",
    "parse_classes",
]

# Bounds that keep a task within the agent's decode limits (64 KiB, docs/protocol.md 4.2):
# two vectors of 1,024 float64 (9 bytes each packed) and 256 names of 64 bytes take 35 KiB.
MAX_NORM_LENGTH = 1024
MAX_CLASSES = 256
MAX_CLASS_NAME = 64
# What a revision-2.2 agent implements of a task's ``requires`` list.
KNOWN_REQUIREMENTS = frozenset({"input_norm"})
# a feature whose spread is below this is left unscaled (std 1): constant columns
_MIN_STD = 1e-8


@dataclass(frozen=True)
class InputNorm:
    """``(x - mean) / std`` along the input's first axis (see the module docstring)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.mean)
        if n != len(self.std) or not 1 <= n <= MAX_NORM_LENGTH:
            raise ValueError(
                f"input normalisation needs mean and std of the same length, 1 to "
                f"{MAX_NORM_LENGTH}; got {len(self.mean)} and {len(self.std)}"
            )
        if not all(math.isfinite(m) for m in self.mean):
            raise ValueError("input normalisation: every mean must be finite")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError("input normalisation: every std must be finite and > 0")

    def to_wire(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_wire(cls, obj: Any) -> InputNorm:
        """``ValueError`` naming what is wrong (the caller turns it into its own error)."""
        if not isinstance(obj, dict):
            raise ValueError("input_norm must be a map")
        vectors = []
        for key in ("mean", "std"):
            values = obj.get(key)
            if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise ValueError(f"input_norm.{key} must be an array of numbers")
            vectors.append(tuple(float(v) for v in values))
        return cls(mean=vectors[0], std=vectors[1])

    def check_fits(self, shape: Sequence[int]) -> None:
        """``ValueError`` unless the vectors fit a model input of ``shape`` (one sample)."""
        n = len(self.mean)
        if n != 1 and (not shape or n != shape[0]):
            raise ValueError(
                f"input normalisation has {n} values, the model's input {tuple(shape)} needs "
                f"1 or {shape[0] if shape else 1}"
            )

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x`` (``[N, *input shape]``) normalised, as a new float32 array."""
        view = (1, -1) + (1,) * (x.ndim - 2)
        mean = np.asarray(self.mean, dtype=np.float64).reshape(view)
        std = np.asarray(self.std, dtype=np.float64).reshape(view)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def compute_input_norm(x: np.ndarray) -> InputNorm:
    """Mean and std of ``x`` (``[N, *input shape]``, N >= 1) along its second axis, over
    every other axis; a constant feature gets std 1."""
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"need samples [N, ...] to compute a normalisation, got {x.shape}")
    if x.shape[1] > MAX_NORM_LENGTH:
        raise ValueError(
            f"inputs have {x.shape[1]} features (first axis), more than the "
            f"{MAX_NORM_LENGTH} a task can carry normalisation for"
        )
    axes = (0, *range(2, x.ndim))
    values = np.asarray(x, dtype=np.float64)
    mean = values.mean(axis=axes)
    std = values.std(axis=axes)
    std = np.where(std > _MIN_STD * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return InputNorm(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


def load_input_norm(path: str | Path) -> InputNorm:
    """A normalisation from a JSON file: ``{"mean": [...], "std": [...]}``, or
    ``{"scale": [...], "offset": [...]}`` meaning ``x * scale + offset`` (so ``std = 1 /
    scale`` and ``mean = -offset / scale``). ``ConfigError`` naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"normalisation file {path}: cannot read: {exc}") from None
    try:
        if isinstance(obj, dict) and "scale" in obj and "mean" not in obj:
            scale, offset = obj.get("scale"), obj.get("offset")
            if not (isinstance(scale, list) and isinstance(offset, list)
                    and all(isinstance(v, (int, float)) for v in [*scale, *offset])):
                raise ValueError("scale and offset must be arrays of numbers")
            if len(scale) != len(offset) or any(s <= 0 for s in scale):
                raise ValueError("scale and offset need the same length and scale > 0")
            obj = {"mean": [-o / s for o, s in zip(offset, scale, strict=True)],
                   "std": [1.0 / s for s in scale]}
        return InputNorm.from_wire(obj)
    except ValueError as exc:
        raise ConfigError(f"normalisation file {path}: {exc}") from None


def parse_classes(names: Sequence[Any]) -> tuple[str, ...]:
    """Class names checked: 1 to 256 distinct non-empty strings of at most 64 bytes
    (``ValueError`` otherwise)."""
    if not 1 <= len(names) <= MAX_CLASSES:
        raise ValueError(f"a class list has 1 to {MAX_CLASSES} names, got {len(names)}")
    for name in names:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(f"class name {name!r} must be a non-empty string without "
                             "leading or trailing spaces")
        if len(name.encode()) > MAX_CLASS_NAME:
            raise ValueError(f"class name {name[:20]!r}... is longer than {MAX_CLASS_NAME} "
                             "bytes")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct: {list(names)}")
    return tuple(names)


def label_text(value: Any) -> str:
    """A label as text: an integral number without its ``.0``, a string stripped."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (np.integer, int)):
        return str(int(value))
    return str(value).strip()


def encode_labels(
    y: np.ndarray, classes: Sequence[str] | None, num_classes: int | None = None
) -> np.ndarray:
    """Class indices (int64) for labels ``y``.

    With ``classes`` each label's text (``label_text``) must be one of the names; its index
    is its position. Without, labels must be integers in ``[0, num_classes)`` (any
    non-negative integer when ``num_classes`` is None). ``ValueError`` names the first
    label that does not fit and how many samples have such labels.
    """
    y = np.asarray(y)
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        uniq, inverse = np.unique(y, return_inverse=True)
        texts = [label_text(u) for u in uniq.tolist()]
        unknown = [t for t in texts if t not in index]
        if unknown:
            bad = np.isin(inverse, [i for i, t in enumerate(texts) if t not in index])
            raise ValueError(
                f"label {unknown[0]!r} is not one of the task's classes "
                f"({', '.join(classes)}): {int(bad.sum())} sample(s) have labels outside the "
                "list"
            )
        return np.asarray([index[t] for t in texts], dtype=np.int64)[inverse.reshape(-1)]
    if y.dtype.kind not in "iuf":
        first = label_text(y.reshape(-1)[0]) if y.size else ""
        raise ValueError(
            f"labels are names (e.g. {first!r}) but the task has no class list; the "
            "coordinator needs --classes (or evaluation data with the same names)"
        )
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ValueError("labels must be whole numbers")
    ints = y.astype(np.int64)
    if ints.size and (ints.min() < 0 or (num_classes is not None and ints.max() >= num_classes)):
        hi = "" if num_classes is None else f"{num_classes - 1}"
        raise ValueError(
            f"labels must be in [0, {hi or '...'}] for this model, got "
            f"{int(ints.min())}..{int(ints.max())}"
        )
    return ints
