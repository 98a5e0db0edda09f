"""The model zoo: small quantization-aware architectures, chosen by name with plain arguments.

A task names an architecture and its arguments (``ModelSpec``); both the coordinator and the
agents build the same network from them with ``build_model``. Models take float32 tensors of
shape ``[N, *input_shape(arch, args)]`` and return logits ``[N, num_classes]``.

Model state crosses the wire as numpy: ``get_state`` / ``set_state`` cover every floating-point
entry of ``state_dict()`` — parameters and the activation-range buffers — never ``torch.save``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbus.quant import ActFakeQuant, QATConv1d, QATConv2d, QATLinear

__all__ = [
    "ARCHITECTURES",
    "MAX_PARAMETERS",
    "build_model",
    "fit_inputs",
    "get_state",
    "input_shape",
    "set_state",
    "state_shapes",
]

# Sanity limits on task arguments, so a bad task cannot make a device allocate gigabytes.
MAX_PARAMETERS = 10_000_000
_MAX_DIM = 1 << 20
_MAX_LAYERS = 16

_REQUIRED = object()


@dataclass(frozen=True)
class _Arg:
    kind: str  # "int", "ints" (list of int) or "bool"
    default: Any = _REQUIRED
    allow_empty: bool = False


_ARGS: dict[str, dict[str, _Arg]] = {
    "mlp": {
        "in_features": _Arg("int"),
        "hidden": _Arg("ints", [64], allow_empty=True),
        "num_classes": _Arg("int"),
        "qat": _Arg("bool", True),
    },
    "cnn": {
        "in_channels": _Arg("int"),
        "height": _Arg("int"),
        "width": _Arg("int"),
        "num_classes": _Arg("int"),
        "channels": _Arg("ints", [8, 16]),
        "qat": _Arg("bool", True),
    },
    "cnn1d": {
        "in_channels": _Arg("int"),
        "length": _Arg("int"),
        "num_classes": _Arg("int"),
        "channels": _Arg("ints", [16, 32]),
        "qat": _Arg("bool", True),
    },
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_DIM


def _check_arch(arch: Any) -> str:
    if not isinstance(arch, str) or arch not in _ARGS:
        raise ValueError(
            f"unknown model architecture {arch!r}; choose one of: {', '.join(sorted(_ARGS))}"
        )
    return arch


def _parse(arch: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``args`` against ``arch``'s schema; return them with defaults filled in."""
    schema = _ARGS[_check_arch(arch)]
    valid = ", ".join(schema)
    if not isinstance(args, Mapping):
        raise ValueError(f"model {arch!r}: arguments must be a map, got {type(args).__name__}")
    for key in args:
        if key not in schema:
            raise ValueError(f"model {arch!r}: unknown argument {key!r}; valid arguments: {valid}")
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        if key not in args:
            if spec.default is _REQUIRED:
                raise ValueError(
                    f"model {arch!r}: missing required argument {key!r}; arguments: {valid}"
                )
            value = spec.default
        else:
            value = args[key]
        if spec.kind == "bool":
            ok = isinstance(value, bool)
            want = "true or false"
        elif spec.kind == "int":
            ok = _is_int(value)
            want = f"an integer in [1, {_MAX_DIM}]"
        else:
            ok = (
                isinstance(value, (list, tuple))
                and (spec.allow_empty or len(value) > 0)
                and len(value) <= _MAX_LAYERS
                and all(_is_int(v) for v in value)
            )
            want = f"a list of at most {_MAX_LAYERS} integers in [1, {_MAX_DIM}]"
            value = list(value) if ok else value
        if not ok:
            raise ValueError(f"model {arch!r}: argument {key!r} must be {want}, got {value!r}")
        out[key] = value
    _check_geometry(arch, out)
    return out


def _check_geometry(arch: str, a: dict[str, Any]) -> None:
    if arch == "cnn":
        need = 2 ** len(a["channels"])
        if a["height"] < need or a["width"] < need:
            raise ValueError(
                f"model 'cnn': height and width must be at least {need} for "
                f"{len(a['channels'])} conv blocks (each halves them)"
            )
    elif arch == "cnn1d":
        need = 2 ** len(a["channels"])
        if a["length"] < need:
            raise ValueError(
                f"model 'cnn1d': length must be at least {need} for "
                f"{len(a['channels'])} conv blocks (each halves it)"
            )
    n = _count_parameters(arch, a)
    if n > MAX_PARAMETERS:
        raise ValueError(
            f"model {arch!r}: {n:,} parameters is more than the limit of {MAX_PARAMETERS:,}"
        )


def _count_parameters(arch: str, a: dict[str, Any]) -> int:
    if arch == "mlp":
        widths = [a["in_features"], *a["hidden"], a["num_classes"]]
        return sum((i + 1) * o for i, o in pairwise(widths))
    if arch == "cnn":
        chans = [a["in_channels"], *a["channels"]]
        conv = sum(i * o * 9 + o for i, o in pairwise(chans))
        k = len(a["channels"])
        flat = chans[-1] * (a["height"] >> k) * (a["width"] >> k)
        return conv + (flat + 1) * a["num_classes"]
    chans = [a["in_channels"], *a["channels"]]
    conv = sum(i * o * 5 + o for i, o in pairwise(chans))
    return conv + (chans[-1] + 1) * a["num_classes"]


def _build_mlp(args: Mapping[str, Any]) -> nn.Module:
    a = _parse("mlp", args)
    qat = a["qat"]
    layers: OrderedDict[str, nn.Module] = OrderedDict(input_q=ActFakeQuant(qat=qat))
    width = a["in_features"]
    for i, hidden in enumerate(a["hidden"]):
        layers[f"fc{i}"] = QATLinear(width, hidden, qat=qat)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"q{i}"] = ActFakeQuant(qat=qat)
        width = hidden
    layers["head"] = QATLinear(width, a["num_classes"], qat=qat)
    return nn.Sequential(layers)


def _conv_stack(
    in_channels: int,
    channels: Sequence[int],
    conv: Callable[[int, int], nn.Module],
    pool: Callable[[], nn.Module],
    qat: bool,
) -> OrderedDict[str, nn.Module]:
    """Input quantizer, then per block: conv, ReLU, activation quantizer, pool."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(input_q=ActFakeQuant(qat=qat))
    chans = in_channels
    for i, out in enumerate(channels):
        layers[f"conv{i}"] = conv(chans, out)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"q{i}"] = ActFakeQuant(qat=qat)
        layers[f"pool{i}"] = pool()
        chans = out
    return layers


def _build_cnn(args: Mapping[str, Any]) -> nn.Module:
    a = _parse("cnn", args)
    qat = a["qat"]
    layers = _conv_stack(
        a["in_channels"], a["channels"],
        lambda i, o: QATConv2d(i, o, 3, padding=1, qat=qat), lambda: nn.MaxPool2d(2), qat,
    )
    k = len(a["channels"])
    layers["flatten"] = nn.Flatten()
    flat = [a["in_channels"], *a["channels"]][-1] * (a["height"] >> k) * (a["width"] >> k)
    layers["head"] = QATLinear(flat, a["num_classes"], qat=qat)
    return nn.Sequential(layers)


def _build_cnn1d(args: Mapping[str, Any]) -> nn.Module:
    a = _parse("cnn1d", args)
    qat = a["qat"]
    layers = _conv_stack(
        a["in_channels"], a["channels"],
        lambda i, o: QATConv1d(i, o, 5, padding=2, qat=qat), lambda: nn.MaxPool1d(2), qat,
    )
    layers["gap"] = nn.AdaptiveAvgPool1d(1)
    layers["flatten"] = nn.Flatten()
    layers["gap_q"] = ActFakeQuant(qat=qat)  # an average is off the int8 grid: requantize
    layers["head"] = QATLinear([a["in_channels"], *a["channels"]][-1], a["num_classes"], qat=qat)
    return nn.Sequential(layers)


ARCHITECTURES: Mapping[str, Callable[[Mapping[str, Any]], nn.Module]] = MappingProxyType(
    {"mlp": _build_mlp, "cnn": _build_cnn, "cnn1d": _build_cnn1d}
)


def build_model(arch: str, args: Mapping[str, Any]) -> nn.Module:
    """Build architecture ``arch`` with ``args``; ``ValueError`` names valid choices on misuse.

    Initialisation draws from torch's global RNG: seed it (``torch.manual_seed``) first for a
    reproducible model.
    """
    return ARCHITECTURES[_check_arch(arch)](args)


def input_shape(arch: str, args: Mapping[str, Any]) -> tuple[int, ...]:
    """Shape of one input sample: ``(in_features,)``, ``(C, H, W)`` or ``(C, L)``."""
    a = _parse(arch, args)
    if arch == "mlp":
        return (a["in_features"],)
    if arch == "cnn":
        return (a["in_channels"], a["height"], a["width"])
    return (a["in_channels"], a["length"])


def _float_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def get_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Float32 numpy copies of every floating-point ``state_dict()`` entry, in its order."""
    return {
        k: v.detach().cpu().to(torch.float32).numpy().copy()
        for k, v in _float_entries(model).items()
    }


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the entries ``get_state`` returns, in the same order."""
    return {k: tuple(v.shape) for k, v in _float_entries(model).items()}


def set_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into ``model``; strict and all-or-nothing.

    Raises ``ValueError`` naming the first problem: a missing or unexpected tensor, a shape
    mismatch, a non-numeric array or non-finite values. Nothing is copied unless all pass.
    """
    targets = _float_entries(model)
    arrays: dict[str, np.ndarray] = {}
    for name, target in targets.items():
        if name not in state:
            raise ValueError(f"state does not match the model: missing tensor {name!r}")
        array = np.asarray(state[name])
        if array.dtype.kind not in "fiu":
            raise ValueError(f"state tensor {name!r} has non-numeric dtype {array.dtype}")
        if array.shape != tuple(target.shape):
            raise ValueError(
                f"state tensor {name!r} has shape {array.shape}, "
                f"the model expects {tuple(target.shape)}"
            )
        array = np.asarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"state tensor {name!r} has non-finite values")
        if not array.flags.writeable:  # e.g. np.frombuffer over a received message
            array = array.copy()
        arrays[name] = array
    for name in state:
        if name not in targets:
            raise ValueError(f"state does not match the model: unexpected tensor {name!r}")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(torch.from_numpy(arrays[name]))


def fit_inputs(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as ``[N, *shape]`` (flat CSV rows are reshaped), or ``ValueError`` when its
    samples hold a different number of values than the model's input."""
    shape = tuple(shape)
    if tuple(x.shape[1:]) == shape:
        return x
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise ValueError(
            f"data has samples of shape {tuple(x.shape[1:])}, the model expects {shape}"
        )
    return x.reshape((len(x), *shape))
