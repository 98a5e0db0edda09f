"""Quantization-aware training on core torch fake-quant ops.

Weights are fake-quantized per output channel (dim 0) to symmetric int8 (``[-127, 127]``,
zero point 0) with a scale taken from the current weight on every forward, so weights carry
no quantization state. Activations are fake-quantized per tensor to 8-bit affine with a
running min/max held in float32 buffers (``act_min``/``act_max``) that travel with the model
state. Gradients pass through the ops' straight-through estimator.

Only ``torch.fake_quantize_per_channel_affine`` and ``torch.fake_quantize_per_tensor_affine``
are used: every entry point of ``torch.ao.quantization`` warns that it is deprecated.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

__all__ = [
    "ACT_QUANT_MAX",
    "ACT_QUANT_MIN",
    "MIN_SCALE",
    "WEIGHT_QUANT_MAX",
    "WEIGHT_QUANT_MIN",
    "ActFakeQuant",
    "QATConv1d",
    "QATConv2d",
    "QATLinear",
    "act_qparams",
    "fake_quant_weight",
    "set_qat",
    "weight_scale",
]

WEIGHT_QUANT_MIN = -127
WEIGHT_QUANT_MAX = 127
ACT_QUANT_MIN = 0
ACT_QUANT_MAX = 255
# Smallest scale ever used: keeps 1/scale finite and the quantization grid meaningful.
MIN_SCALE = float(torch.finfo(torch.float32).eps)


def weight_scale(weight: Tensor) -> Tensor:
    """Per-output-channel int8 scale ``max|w| / 127`` (float32, shape ``[C_out]``).

    Channels whose scale would be 0 or not finite get 1.0; tiny scales are raised to
    ``MIN_SCALE``. The result never carries gradient.
    """
    with torch.no_grad():
        rows = weight.detach().reshape(weight.shape[0], -1).float()
        amax = rows.abs().amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
        scale = amax / WEIGHT_QUANT_MAX
        usable = torch.isfinite(scale) & (scale > 0)
        return torch.where(usable, scale.clamp(min=MIN_SCALE), torch.ones_like(scale))


def fake_quant_weight(weight: Tensor) -> Tensor:
    """Fake-quantize ``weight`` per output channel to symmetric int8 (straight-through grad)."""
    scale = weight_scale(weight)
    zero_point = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(
        weight, scale, zero_point, 0, WEIGHT_QUANT_MIN, WEIGHT_QUANT_MAX
    )


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of the 8-bit affine grid covering ``[min(lo, 0), max(hi, 0)]``."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (ACT_QUANT_MAX - ACT_QUANT_MIN)
    if not math.isfinite(scale):
        scale = 1.0
    elif scale < MIN_SCALE:
        scale = MIN_SCALE
    zero_point = ACT_QUANT_MIN - round(lo / scale)
    return scale, max(ACT_QUANT_MIN, min(ACT_QUANT_MAX, zero_point))


class ActFakeQuant(nn.Module):
    """Per-tensor 8-bit affine fake quant of activations with a running range.

    In training mode each batch updates ``act_min``/``act_max`` (the first observed batch sets
    them, later ones by EMA with ``momentum``); in eval mode they are frozen. Both buffers start
    at 0.0, and ``act_min == act_max == 0`` means "not yet observed": such a module passes
    values through. The range always includes 0 and the buffers are always finite (batches with
    non-finite values are not observed).
    """

    act_min: Tensor
    act_max: Tensor

    def __init__(self, momentum: float = 0.01, *, qat: bool = True) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.qat_enabled = qat
        self.register_buffer("act_min", torch.zeros((), dtype=torch.float32))
        self.register_buffer("act_max", torch.zeros((), dtype=torch.float32))

    @property
    def observed(self) -> bool:
        """Whether a range has been observed (or loaded)."""
        return bool(self.act_min != 0) or bool(self.act_max != 0)

    def _observe(self, x: Tensor) -> None:
        with torch.no_grad():
            bmin, bmax = torch.aminmax(x.detach())
            bmin = bmin.float().clamp(max=0.0)
            bmax = bmax.float().clamp(min=0.0)
            if not (torch.isfinite(bmin) and torch.isfinite(bmax)):
                return
            if not self.observed:
                self.act_min.copy_(bmin)
                self.act_max.copy_(bmax)
            else:
                self.act_min.lerp_(bmin, self.momentum)
                self.act_max.lerp_(bmax, self.momentum)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x
        if self.training:
            self._observe(x)
        if not self.qat_enabled or not self.observed:
            return x
        lo, hi = float(self.act_min), float(self.act_max)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return x  # only reachable through a raw load_state_dict of a broken range
        scale, zero_point = act_qparams(lo, hi)
        return torch.fake_quantize_per_tensor_affine(
            x,
            torch.tensor(scale, dtype=torch.float32, device=x.device),
            torch.tensor(zero_point, dtype=torch.int32, device=x.device),
            ACT_QUANT_MIN,
            ACT_QUANT_MAX,
        )

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, qat={self.qat_enabled}"


if TYPE_CHECKING:
    # The mixin always comes before an nn.Module layer in the MRO (QATLinear, ...), so its
    # super() calls reach that layer: tell the checker so. At run time the base is object.
    _LayerBase = nn.Module
else:
    _LayerBase = object


class _QATWeight(_LayerBase):
    """Mixin for a layer whose weight is fake-quantized (per-channel int8) when QAT is on."""

    weight: Tensor
    qat_enabled: bool

    def __init__(self, *args: Any, qat: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.qat_enabled = qat

    def quantized_weight(self) -> Tensor:
        return fake_quant_weight(self.weight) if self.qat_enabled else self.weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.qat_enabled}"


class QATLinear(_QATWeight, nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized (per-channel int8) when QAT is enabled."""

    def forward(self, input: Tensor) -> Tensor:
        return nn.functional.linear(input, self.quantized_weight(), self.bias)


class QATConv2d(_QATWeight, nn.Conv2d):
    """``nn.Conv2d`` whose weight is fake-quantized (per-channel int8) when QAT is enabled."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.quantized_weight(), self.bias)


class QATConv1d(_QATWeight, nn.Conv1d):
    """``nn.Conv1d`` whose weight is fake-quantized (per-channel int8) when QAT is enabled."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.quantized_weight(), self.bias)


_QAT_MODULES = (ActFakeQuant, QATLinear, QATConv2d, QATConv1d)


def set_qat(model: nn.Module, enabled: bool) -> int:
    """Turn fake quant on or off in every QAT module of ``model``; returns how many.

    With QAT off the forward is plain float; activation ranges are still observed in training.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _QAT_MODULES):
            module.qat_enabled = bool(enabled)
            count += 1
    return count
