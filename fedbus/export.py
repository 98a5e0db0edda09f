"""int8 export of a trained QAT model, and integer inference in pure numpy for the device.

``export_int8(model)`` turns a model of the zoo (``mlp``, ``cnn``, ``cnn1d``) trained with the
fake-quant layers of ``fedbus.quant`` into an ``Int8Model``: int8 weights with their
per-output-channel scales, int32 biases and the uint8 grid (scale, zero point) of every
activation, taken from the ``ActFakeQuant`` running ranges. ``Int8Model.predict`` runs it with
numpy alone — torch is needed to export, never to run an exported model:

* the input is quantized once to uint8 on the first quantizer's grid;
* linear and convolution layers multiply ``(q - zero_point)`` by the int8 weights and
  accumulate in int32, add the int32 bias (quantized with scale ``input_scale *
  weight_scale[c]``), apply ReLU and requantize to the next uint8 grid with a per-channel
  fixed-point multiplier (``int32`` mantissa and right shift, round half up);
* max pooling works on the uint8 codes directly; the global average pool of ``cnn1d`` sums
  codes in int32 and requantizes to its quantizer's grid;
* the last layer's accumulator is dequantized to float32 logits (per-channel scales differ,
  so the argmax needs them).

File format (``Int8Model.save``): one ``.npz`` written with ``allow_pickle=False`` whose array
``manifest`` holds UTF-8 JSON (``{"format": "fedbus-int8", "version": 1, "layers": [...],
...}``; each layer names its op, its parameters and the arrays it uses) next to the arrays
``<layer>.weight`` (int8), ``<layer>.weight_scale`` (float32) and ``<layer>.bias`` (int32).
The requantization multipliers are derived from the stored scales when a model is built or
loaded, so the scales are the single source of truth.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbus.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FORMAT", "FORMAT_VERSION", "Int8Model", "export_int8", "int8_accuracy"]

FORMAT = "fedbus-int8"
FORMAT_VERSION = 1
_Q_MIN, _Q_MAX = 0, 255  # activations: uint8 affine
_W_MIN, _W_MAX = -127, 127  # weights: int8 symmetric, per output channel
_I32 = 2**31 - 1
_MAX_LAYERS = 64
_DENSE_OPS = ("linear", "conv1d", "conv2d")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _requant_params(multiplier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point form of positive real multipliers: ``M ≈ mantissa * 2**-shift``.

    ``mantissa`` is int64 in ``[2**30, 2**31)`` (0 for a multiplier too small to matter) and
    ``shift`` in ``[1, 62]``, so ``acc * mantissa`` fits int64 for any int32 ``acc``.
    """
    frac, exp = np.frexp(np.asarray(multiplier, dtype=np.float64))
    mantissa = np.rint(frac * 2.0**31).astype(np.int64)
    carry = mantissa == 2**31
    mantissa[carry] //= 2
    exp = exp + carry
    shift = 31 - exp.astype(np.int64)
    if (shift < 1).any():
        raise ValueError("a requantization multiplier is too large (>= 2**30)")
    tiny = shift > 62
    mantissa[tiny] = 0
    shift[tiny] = 62
    return mantissa, shift


def _requantize(acc: np.ndarray, mantissa: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``round(acc * M)`` in integer arithmetic; ``mantissa``/``shift`` broadcast over ``acc``."""
    prod = acc.astype(np.int64) * mantissa
    return (prod + (np.int64(1) << (shift - 1))) >> shift


def _channel_view(values: np.ndarray, ndim: int) -> np.ndarray:
    """Per-output-channel values shaped to broadcast over ``[N, C, ...]`` with ``ndim`` dims."""
    return values.reshape((1, -1) + (1,) * (ndim - 2))


@dataclass(frozen=True)
class _Grid:
    """A uint8 affine grid: ``real = scale * (code - zero_point)``."""

    scale: float
    zero_point: int


@dataclass
class _Layer:
    """One op of the exported network; ``grid_in`` is set when the chain is checked."""

    op: str
    name: str = ""
    weight: np.ndarray | None = None
    weight_scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    kernel: int = 0
    relu: bool = False
    out: _Grid | None = None
    grid_in: _Grid | None = None
    _mantissa: np.ndarray | None = None
    _shift: np.ndarray | None = None

    def to_manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"op": self.op}
        if self.op in _DENSE_OPS:
            entry.update(
                name=self.name,
                weight=f"{self.name}.weight",
                weight_scale=f"{self.name}.weight_scale",
                bias=f"{self.name}.bias",
                relu=self.relu,
            )
            if self.op != "linear":
                entry.update(stride=list(self.stride), padding=list(self.padding))
        if self.op in ("maxpool1d", "maxpool2d"):
            entry["kernel"] = self.kernel
        if self.out is not None:
            entry.update(scale=self.out.scale, zero_point=self.out.zero_point)
        return entry


class Int8Model:
    """An exported int8 network: run with ``predict``, stored with ``save``/``load``.

    ``arch``, ``model_args`` and ``input_shape`` describe the zoo model it came from when
    known (``input_shape`` lets ``predict`` reshape flat samples, as the agent does).
    """

    def __init__(
        self,
        layers: list[_Layer],
        *,
        arch: str | None = None,
        model_args: Mapping[str, Any] | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.layers = layers
        self.arch = arch
        self.model_args = dict(model_args) if model_args is not None else None
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.num_classes = _check_chain(layers)

    # --- inference -------------------------------------------------------------------

    def logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Float32 logits ``[N, num_classes]`` of float input ``x`` (``[N, *input_shape]``)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 2:
            raise ValueError(f"x must have shape [N, ...], got {x.shape}")
        if self.input_shape is not None and x.shape[1:] != self.input_shape:
            if math.prod(x.shape[1:]) != math.prod(self.input_shape):
                raise ValueError(
                    f"samples have shape {x.shape[1:]}, the model expects {self.input_shape}"
                )
            x = x.reshape((len(x), *self.input_shape))
        if not np.isfinite(x).all():
            raise ValueError("x has NaN or infinite values")
        out = [self._run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Predicted labels (int64 ``[N]``) of float input ``x``."""
        return self.logits(x, batch_size).argmax(axis=1).astype(np.int64)

    def _run(self, x: np.ndarray) -> np.ndarray:
        value: np.ndarray = x
        for layer in self.layers:
            value = _run_layer(layer, value)
        return value

    # --- storage ---------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        """The JSON-able description stored next to the arrays."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "arch": self.arch,
            "model_args": self.model_args,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "num_classes": self.num_classes,
            "layers": [layer.to_manifest() for layer in self.layers],
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored arrays by name: int8 weights, float32 weight scales, int32 biases."""
        out: dict[str, np.ndarray] = {}
        for layer in self.layers:
            if layer.op in _DENSE_OPS:
                assert layer.weight is not None
                assert layer.weight_scale is not None and layer.bias is not None
                out[f"{layer.name}.weight"] = layer.weight
                out[f"{layer.name}.weight_scale"] = layer.weight_scale
                out[f"{layer.name}.bias"] = layer.bias
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (weights, scales and biases)."""
        return sum(a.nbytes for a in self.arrays().values())

    def save(self, path: str | Path) -> None:
        """Write the model to ``path`` (``.npz``) atomically, creating folders."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest = np.frombuffer(json.dumps(self.manifest).encode(), dtype=np.uint8)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                # numpy's stubs let any ``**`` key land on the ``allow_pickle: bool`` keyword;
                # ours are all "<layer>.<array>" (with a dot), so none can.
                np.savez_compressed(f, manifest=manifest, **self.arrays())  # type: ignore[arg-type]
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> Int8Model:
        """Read a model written by ``save``; ``ConfigError`` names the file and the problem."""
        path = Path(path)
        try:
            loaded = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            with loaded as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise ConfigError(f"int8 model {path}: not a readable .npz file: {exc}") from None
        try:
            return _from_stored(arrays)
        except (ValueError, KeyError, TypeError) as exc:
            detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ConfigError(f"int8 model {path}: {detail}") from None


# --- running the layers --------------------------------------------------------------------


def _run_layer(layer: _Layer, value: np.ndarray) -> np.ndarray:
    if layer.op == "quantize":
        assert layer.out is not None
        inv = np.float32(1.0) / np.float32(layer.out.scale)  # as torch's fake quant does
        codes = np.rint(value * inv) + layer.out.zero_point
        return np.clip(codes, _Q_MIN, _Q_MAX).astype(np.uint8)
    if layer.op == "flatten":
        return value.reshape(len(value), -1)
    if layer.op in ("maxpool1d", "maxpool2d"):
        return _maxpool(value, layer.kernel, 1 if layer.op == "maxpool1d" else 2)
    if layer.op == "avgpool1d":  # global average over the steps, then flatten
        assert layer.grid_in is not None and layer.out is not None
        if value.ndim != 3:
            raise ValueError(f"global average pool expects [N, C, L], got {value.shape}")
        length = value.shape[2]
        acc = value.astype(np.int32).sum(axis=2) - np.int32(length * layer.grid_in.zero_point)
        # the length is known only here: mean * s_in / s_out == sum * s_in / (s_out * L)
        mantissa, shift = _requant_params(
            np.array([layer.grid_in.scale / (layer.out.scale * length)])
        )
        codes = _requantize(acc, mantissa, shift) + layer.out.zero_point
        return np.clip(codes, _Q_MIN, _Q_MAX).astype(np.uint8)
    return _run_dense(layer, value)


def _run_dense(layer: _Layer, codes: np.ndarray) -> np.ndarray:
    assert layer.weight is not None and layer.bias is not None and layer.grid_in is not None
    centred = codes.astype(np.int32) - np.int32(layer.grid_in.zero_point)
    weight = layer.weight.astype(np.int32)
    if layer.op == "linear":
        if centred.ndim != 2 or centred.shape[1] != weight.shape[1]:
            raise ValueError(f"{layer.name}: expects {weight.shape[1]} features, got {codes.shape}")
        acc = centred @ weight.T
    else:
        acc = _conv(centred, weight, layer.stride, layer.padding, layer.name)
    acc += _channel_view(layer.bias, acc.ndim)
    if layer.out is None:  # the head: dequantize to float logits
        assert layer.weight_scale is not None
        scale = np.float32(layer.grid_in.scale) * layer.weight_scale
        return (acc * _channel_view(scale, acc.ndim)).astype(np.float32)
    assert layer._mantissa is not None and layer._shift is not None
    shape = (1, -1) + (1,) * (acc.ndim - 2)
    out = _requantize(acc, layer._mantissa.reshape(shape), layer._shift.reshape(shape))
    out += layer.out.zero_point
    low = layer.out.zero_point if layer.relu else _Q_MIN
    return np.clip(out, low, _Q_MAX).astype(np.uint8)


def _conv(
    x: np.ndarray, weight: np.ndarray, stride: tuple[int, ...], padding: tuple[int, ...],
    name: str,
) -> np.ndarray:
    """int32 convolution (cross-correlation) of ``x`` ``[N, C, *S]`` with ``[O, C, *K]``."""
    dims = weight.ndim - 2
    if x.ndim != dims + 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}: expects input [N, {weight.shape[1]}, ...] with {dims} spatial dims, "
            f"got {x.shape}"
        )
    x = np.pad(x, [(0, 0), (0, 0), *[(p, p) for p in padding]])  # zero == the zero point
    kernel = weight.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=tuple(range(2, 2 + dims)))
    windows = windows[(slice(None), slice(None), *[slice(None, None, s) for s in stride])]
    # windows: [N, C, *out, *K] -> [N, *out, C * prod(K)]
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    cols = windows.transpose(order)
    out_shape = cols.shape[1:1 + dims]
    cols = cols.reshape(len(x), math.prod(out_shape), -1)
    acc = cols @ weight.reshape(len(weight), -1).T  # [N, P, O]
    return np.ascontiguousarray(acc.transpose(0, 2, 1).reshape(len(x), len(weight), *out_shape))


def _maxpool(x: np.ndarray, kernel: int, dims: int) -> np.ndarray:
    """Non-overlapping max pool (stride = kernel, remainder dropped) over the last ``dims``."""
    spatial = x.shape[2:]
    if len(spatial) != dims:
        raise ValueError(f"max pool over {dims} dims got input of shape {x.shape}")
    out = [s // kernel for s in spatial]
    x = x[(slice(None), slice(None), *[slice(0, o * kernel) for o in out])]
    shape: list[int] = [x.shape[0], x.shape[1]]
    for o in out:
        shape += [o, kernel]
    return x.reshape(shape).max(axis=tuple(range(3, 3 + 2 * dims, 2)))


# --- checking a layer chain ----------------------------------------------------------------


def _check_chain(layers: list[_Layer]) -> int:
    """Check the op sequence, fill each layer's input grid and multipliers; return classes.

    The chain starts with ``quantize``, carries uint8 codes on a known grid through every
    layer and ends with the one layer that has no output grid (float logits).
    """
    if not layers or layers[0].op != "quantize":
        raise ValueError("the first layer must be 'quantize'")
    if len(layers) > _MAX_LAYERS:
        raise ValueError(f"{len(layers)} layers is more than the limit of {_MAX_LAYERS}")
    names = [layer.name for layer in layers if layer.op in _DENSE_OPS]
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be unique, got {names}")
    grid: _Grid | None = None
    features: int | None = None  # flat feature count when known
    for i, layer in enumerate(layers):
        if grid is None and i > 0:
            raise ValueError(f"layer {i} ({layer.op}) follows the float output layer")
        layer.grid_in = grid
        if layer.op == "quantize":
            if i > 0:
                raise ValueError(f"layer {i}: 'quantize' may only come first")
            grid = _check_grid(layer.out, f"layer {i}")
        elif layer.op in _DENSE_OPS:
            _check_dense(layer, i)
            assert grid is not None and layer.weight is not None and layer.bias is not None
            assert layer.weight_scale is not None
            fan_in = math.prod(layer.weight.shape[1:])
            if fan_in * 255 * 127 + int(np.abs(layer.bias.astype(np.int64)).max()) > _I32:
                raise ValueError(f"layer {layer.name!r}: the int32 accumulator could overflow")
            if layer.op == "linear" and features is not None and features != fan_in:
                raise ValueError(
                    f"layer {layer.name!r} takes {fan_in} features, the previous layer "
                    f"gives {features}"
                )
            features = len(layer.weight)
            if layer.out is None:
                grid = None
                continue
            out = _check_grid(layer.out, f"layer {layer.name!r}")
            multiplier = grid.scale * layer.weight_scale.astype(np.float64) / out.scale
            layer._mantissa, layer._shift = _requant_params(multiplier)
            grid = out
        elif layer.op in ("maxpool1d", "maxpool2d"):
            if not isinstance(layer.kernel, int) or not 1 <= layer.kernel <= 64:
                raise ValueError(f"layer {i}: pool kernel must be an integer in [1, 64]")
            features = None
        elif layer.op == "flatten":
            features = None
        elif layer.op == "avgpool1d":
            grid = _check_grid(layer.out, f"layer {i}")
            features = None
        else:
            raise ValueError(f"layer {i}: unknown op {layer.op!r}")
    if grid is not None or features is None:
        raise ValueError("the last layer must be a linear layer with float output (logits)")
    return features


def _check_grid(grid: _Grid | None, where: str) -> _Grid:
    if not isinstance(grid, _Grid):
        raise ValueError(f"{where}: missing the output scale and zero point")
    scale, zero_point = grid.scale, grid.zero_point
    if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{where}: scale must be a positive finite number, got {scale!r}")
    if isinstance(zero_point, bool) or not isinstance(zero_point, int) or not (
        _Q_MIN <= zero_point <= _Q_MAX
    ):
        raise ValueError(f"{where}: zero point must be an integer in [0, 255], got {zero_point!r}")
    return grid


def _check_dense(layer: _Layer, index: int) -> None:
    name = layer.name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"layer {index}: needs a name of 1-64 letters, digits, '_', '-' or '.', got {name!r}"
        )
    dims = _DENSE_OPS.index(layer.op)  # spatial dims: linear 0, conv1d 1, conv2d 2
    w, s, b = layer.weight, layer.weight_scale, layer.bias
    if not isinstance(w, np.ndarray) or w.dtype != np.int8 or w.ndim != dims + 2:
        raise ValueError(f"layer {name!r}: weight must be an int8 array with {dims + 2} dims")
    if min(w.shape, default=0) < 1 or w.size > 10_000_000:
        raise ValueError(f"layer {name!r}: weight has unusable shape {w.shape}")
    if int(w.min()) < _W_MIN:
        raise ValueError(f"layer {name!r}: weight codes must be in [-127, 127]")
    out = (len(w),)
    if not isinstance(s, np.ndarray) or s.dtype != np.float32 or s.shape != out:
        raise ValueError(f"layer {name!r}: weight_scale must be float32 of shape {out}")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"layer {name!r}: weight scales must be positive and finite")
    if not isinstance(b, np.ndarray) or b.dtype != np.int32 or b.shape != out:
        raise ValueError(f"layer {name!r}: bias must be int32 of shape {out}")
    for what, values, low in (("stride", layer.stride, 1), ("padding", layer.padding, 0)):
        ok = (
            isinstance(values, tuple) and len(values) == dims
            and all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= 64
                    for v in values)
        )
        if not ok:
            raise ValueError(
                f"layer {name!r}: {what} must be {dims} integers in [{low}, 64], got {values!r}"
            )
    if not isinstance(layer.relu, bool):
        raise ValueError(f"layer {name!r}: relu must be true or false")


# --- loading ---------------------------------------------------------------------------


def _from_stored(arrays: dict[str, np.ndarray]) -> Int8Model:
    raw = arrays.get("manifest")
    if raw is None:
        raise ValueError("no 'manifest' array: not a fedbus int8 model")
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > 1_000_000:
        raise ValueError("the 'manifest' array must be UTF-8 JSON bytes (uint8, 1-D)")
    try:
        manifest = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"the manifest does not say format {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"format version {manifest.get('version')!r} is not supported (this fedbus reads "
            f"version {FORMAT_VERSION})"
        )
    entries = manifest.get("layers")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError("the manifest's 'layers' must be a list of objects")
    if len(entries) > _MAX_LAYERS:
        raise ValueError(f"{len(entries)} layers is more than the limit of {_MAX_LAYERS}")
    layers = [_layer_from_entry(entry, i, arrays) for i, entry in enumerate(entries)]
    shape = manifest.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list) and shape
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
    ):
        raise ValueError(f"input_shape must be a list of positive integers, got {shape!r}")
    arch, model_args = manifest.get("arch"), manifest.get("model_args")
    if arch is not None and not isinstance(arch, str):
        raise ValueError(f"arch must be a string, got {arch!r}")
    if model_args is not None and not isinstance(model_args, dict):
        raise ValueError(f"model_args must be an object, got {model_args!r}")
    model = Int8Model(
        layers, arch=arch, model_args=model_args,
        input_shape=tuple(shape) if shape is not None else None,
    )
    if manifest.get("num_classes") != model.num_classes:
        raise ValueError(
            f"num_classes {manifest.get('num_classes')!r} does not match the last layer "
            f"({model.num_classes})"
        )
    return model


def _layer_from_entry(entry: dict[str, Any], index: int, arrays: dict[str, np.ndarray]) -> _Layer:
    op = entry.get("op")
    if op not in ("quantize", "flatten", "maxpool1d", "maxpool2d", "avgpool1d", *_DENSE_OPS):
        raise ValueError(f"layer {index}: unknown op {op!r}")
    layer = _Layer(op)
    # The manifest's values go into the layer as they are, of whatever JSON type, and
    # Int8Model's checks (_check_grid, _check_dense, the pool kernel's) reject a wrong one
    # with a message that names it: hence the ignores on the assignments below.
    if "scale" in entry or "zero_point" in entry:
        scale = entry.get("scale")
        layer.out = _Grid(float(scale) if isinstance(scale, int) and not isinstance(
            scale, bool) else scale, entry.get("zero_point"))  # type: ignore[arg-type]
    if op in ("maxpool1d", "maxpool2d"):
        layer.kernel = entry.get("kernel")  # type: ignore[assignment]
    if op in _DENSE_OPS:
        layer.name = entry.get("name")  # type: ignore[assignment]
        layer.relu = entry.get("relu")  # type: ignore[assignment]
        for key in ("weight", "weight_scale", "bias"):
            array_name = entry.get(key)
            if not isinstance(array_name, str) or array_name not in arrays:
                raise ValueError(f"layer {index} ({op}): missing array {array_name!r} for {key}")
            setattr(layer, key, arrays[array_name])
        if op != "linear":
            stride, padding = entry.get("stride"), entry.get("padding")
            layer.stride = tuple(stride) if isinstance(stride, list) else stride  # type: ignore[assignment]
            layer.padding = tuple(padding) if isinstance(padding, list) else padding  # type: ignore[assignment]
    return layer


# --- export ---------------------------------------------------------------------------


def export_int8(
    model: nn.Module, *, arch: str | None = None, model_args: Mapping[str, Any] | None = None
) -> Int8Model:
    """The int8 form of a trained QAT model of the zoo (an ``nn.Sequential``).

    Supported layers, in the zoo's order: an ``ActFakeQuant`` first; ``QATLinear`` /
    ``QATConv1d`` / ``QATConv2d``, each optionally followed by ``ReLU`` and then by an
    ``ActFakeQuant`` (the last one without: its output are the logits); ``MaxPool1d/2d``
    with stride equal to the kernel; ``Flatten``; ``AdaptiveAvgPool1d(1)`` followed by an
    optional ``Flatten`` and an ``ActFakeQuant``. Every activation range must have been
    observed (trained). ``arch`` and ``model_args``, when given, are recorded and fix the
    input shape. ``ValueError`` names the layer that cannot be exported.
    """
    import torch
    from torch import nn

    from fedbus.quant import ActFakeQuant, QATConv1d, QATConv2d, QATLinear, act_qparams
    from fedbus.quant import weight_scale as channel_scale

    if not isinstance(model, nn.Sequential):
        raise ValueError(f"can only export an nn.Sequential of the zoo, got {type(model).__name__}")
    named = list(model.named_children())

    def grid_of(index: int) -> _Grid:
        name, module = named[index]
        assert isinstance(module, ActFakeQuant)
        if not module.observed:
            raise ValueError(
                f"the activation range of {name!r} was never observed: train the model "
                "before exporting it"
            )
        scale, zero_point = act_qparams(float(module.act_min), float(module.act_max))
        return _Grid(float(np.float32(scale)), int(zero_point))  # fake quant uses float32

    def is_at(index: int, kind: type | tuple[type, ...]) -> bool:
        return index < len(named) and isinstance(named[index][1], kind)

    layers: list[_Layer] = []
    grid: _Grid | None = None
    i = 0
    while i < len(named):
        name, module = named[i]
        if isinstance(module, ActFakeQuant) and i == 0:
            grid = grid_of(0)
            layers.append(_Layer("quantize", name=name, out=grid))
            i += 1
        elif isinstance(module, (QATLinear, QATConv1d, QATConv2d)):
            if grid is None:
                raise ValueError(f"layer {name!r}: its input is not quantized (start with an "
                                 "ActFakeQuant)")
            j = i + 1
            relu = is_at(j, nn.ReLU)
            j += relu
            out = None
            if is_at(j, ActFakeQuant):
                out = grid_of(j)
                j += 1
            elif relu:
                raise ValueError(f"layer {name!r}: a ReLU must be followed by an ActFakeQuant")
            layers.append(_dense_layer(name, module, grid, relu, out, torch, channel_scale))
            grid = out
            i = j
        elif isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
            layers.append(_pool_layer(name, module, 1 if isinstance(module, nn.MaxPool1d) else 2))
            i += 1
        elif isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            layers.append(_Layer("flatten", name=name))
            i += 1
        elif isinstance(module, nn.AdaptiveAvgPool1d) and module.output_size in (1, (1,)):
            j = i + 1 + is_at(i + 1, nn.Flatten)
            if not is_at(j, ActFakeQuant):
                raise ValueError(f"layer {name!r}: a global average pool must be followed by "
                                 "an ActFakeQuant (its mean is off the int8 grid)")
            out = grid_of(j)
            layers.append(_Layer("avgpool1d", name=name, out=out))
            grid = out
            i = j + 1
        else:
            raise ValueError(f"cannot export layer {name!r} ({type(module).__name__})")
    shape = None
    if arch is not None:
        from fedbus.zoo import input_shape

        shape = input_shape(arch, dict(model_args or {}))
    elif layers[1:] and layers[1].op == "linear":
        assert layers[1].weight is not None
        shape = (layers[1].weight.shape[1],)
    args = None
    if model_args is not None:
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()}
    return Int8Model(layers, arch=arch, model_args=args, input_shape=shape)


def _dense_layer(
    name: str, module: nn.Linear | nn.Conv1d | nn.Conv2d, grid: _Grid, relu: bool,
    out: _Grid | None, torch: Any, channel_scale: Any,
) -> _Layer:
    """int8 weights, scales and int32 bias of one QAT linear or convolution layer."""
    from torch import nn

    op = "linear" if isinstance(module, nn.Linear) else (
        "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
    )
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    if op != "linear":
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        if (
            isinstance(module.padding, str) or module.groups != 1
            or any(d != 1 for d in module.dilation) or module.padding_mode != "zeros"
        ):
            raise ValueError(f"layer {name!r}: only plain convolutions (integer zero padding, "
                             "no groups or dilation) can be exported")
        stride = tuple(int(s) for s in module.stride)
        padding = tuple(int(p) for p in module.padding)
    with torch.no_grad():
        weight = module.weight.detach().to(torch.float32)
        scale = channel_scale(weight)  # float32 [C_out], as the fake-quant forward uses
        view = (-1,) + (1,) * (weight.ndim - 1)
        inv = (1.0 / scale).reshape(view)
        codes = torch.clamp(torch.round(weight * inv), _W_MIN, _W_MAX)
        bias = module.bias.detach().to(torch.float64) if module.bias is not None else None
    weight_scale = scale.numpy().astype(np.float32)
    if bias is None:
        bias_codes = np.zeros(len(weight_scale), dtype=np.int64)
    else:
        bias_codes = np.rint(bias.numpy() / (grid.scale * weight_scale.astype(np.float64)))
        if not np.isfinite(bias_codes).all() or np.abs(bias_codes).max() > 2**30:
            raise ValueError(f"layer {name!r}: a bias is too large for int32 at this scale")
    return _Layer(
        op, name=name, weight=codes.numpy().astype(np.int8), weight_scale=weight_scale,
        bias=bias_codes.astype(np.int32), stride=stride, padding=padding, relu=relu, out=out,
    )


def _pool_layer(name: str, module: nn.Module, dims: int) -> _Layer:
    from torch import nn

    assert isinstance(module, (nn.MaxPool1d, nn.MaxPool2d))

    def one(value: Any) -> int | None:
        values = value if isinstance(value, tuple) else (value,) * dims
        return int(values[0]) if len(set(values)) == 1 else None

    kernel, stride = one(module.kernel_size), one(module.stride)
    if (
        kernel is None or stride != kernel or one(module.padding) != 0
        or one(module.dilation) != 1 or module.ceil_mode
    ):
        raise ValueError(f"layer {name!r}: only max pools with stride == kernel and no "
                         "padding can be exported")
    return _Layer(f"maxpool{dims}d", name=name, kernel=kernel)


def int8_accuracy(model: nn.Module | Int8Model, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the int8 form of ``model`` (exported first unless already ``Int8Model``)."""
    int8 = model if isinstance(model, Int8Model) else export_int8(model)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x) or len(y) == 0:
        raise ValueError(f"need x [N, ...] and y [N] with N >= 1, got {np.shape(x)}, {y.shape}")
    return float((int8.predict(x) == y).mean())
