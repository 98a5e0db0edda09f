"""SGD with momentum and weight decay, written out over a list of parameters.

Why not ``torch.optim.SGD``: building any ``torch.optim`` optimizer the first time in a
process imports ``torch._dynamo`` (and with it sympy, torch._inductor, torch.onnx, ...),
about 70 MiB of resident memory that a device never gives back. The update below is the
same arithmetic, done with plain in-place tensor ops under ``torch.no_grad()``.

The rule, per parameter ``p`` with gradient ``grad`` (parameters without a gradient are left
alone and their momentum is not advanced)::

    g = grad + weight_decay * p
    buf = g                      on the parameter's first step with momentum
    buf = momentum * buf + g     afterwards (no dampening, no Nesterov)
    p = p - lr * buf             (with momentum 0: p = p - lr * g)

This matches ``torch.optim.SGD(params, lr, momentum, weight_decay=...)`` with its other
arguments at their defaults.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["MomentumSGD"]


def _check_hyperparameters(lr: float, momentum: float, weight_decay: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if not (math.isfinite(momentum) and momentum >= 0):
        raise ValueError(f"momentum must be a finite number >= 0, got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")


class MomentumSGD:
    """Plain SGD with heavy-ball momentum and L2 weight decay, no ``torch.optim`` involved.

    Holds one momentum buffer per parameter, created on the first step at which that
    parameter has a gradient. Use it like an optimizer: ``zero_grad()``, ``backward()``,
    ``step()``.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        _check_hyperparameters(lr, momentum, weight_decay)
        self.params: list[Tensor] = list(params)
        if not self.params:
            raise ValueError("MomentumSGD got an empty parameter list")
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._buffers: list[Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        """Drop every parameter's gradient (set it to ``None``)."""
        for param in self.params:
            param.grad = None

    def step(self) -> None:
        """Apply one update to every parameter that has a gradient."""
        with torch.no_grad():
            for index, param in enumerate(self.params):
                if param.grad is not None:
                    self._update(index, param, param.grad)

    def _update(self, index: int, param: Tensor, grad: Tensor) -> None:
        if grad.is_sparse:
            raise ValueError("MomentumSGD does not support sparse gradients")
        # A new tensor when decaying: the caller's .grad must stay the raw gradient.
        direction = grad.add(param, alpha=self.weight_decay) if self.weight_decay else grad
        if self.momentum:
            direction = self._advance_momentum(index, direction)
        param.add_(direction, alpha=-self.lr)

    def _advance_momentum(self, index: int, direction: Tensor) -> Tensor:
        buf = self._buffers[index]
        if buf is None:
            buf = direction.detach().clone()  # first step: the buffer starts as g itself
            self._buffers[index] = buf
        else:
            buf.mul_(self.momentum).add_(direction)
        return buf
