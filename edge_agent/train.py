"""Local training and evaluation as plain functions: no network, no clock beyond timing.

The agent calls ``train_local`` off the network thread. Torch's thread count is left alone;
the agent sets it (one thread is fastest for the zoo's tiny networks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_agent.optim import MomentumSGD
from fedbus.messages import TrainSpec
from fedbus.quant import set_qat

__all__ = ["TrainResult", "evaluate", "train_local", "warm_up"]


@dataclass(frozen=True)
class TrainResult:
    """What one local training produced.

    ``loss`` and ``accuracy`` are over the last epoch (the samples it reached, if stopped).
    ``stopped`` is true when ``should_stop`` cut training short: the model then holds a
    partial update that should not be sent.
    """

    num_samples: int
    steps: int
    loss: float
    accuracy: float
    seconds: float
    stopped: bool = False


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if len(y) == 0:
        raise ValueError("no samples")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    return xt, yt


def _check_labels(yt: torch.Tensor, num_classes: int) -> None:
    lo, hi = int(yt.min()), int(yt.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes - 1}] for this model, got {lo}..{hi}")


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    spec: TrainSpec,
    *,
    seed: int,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)`` with SGD and cross-entropy, as ``spec`` says.

    ``x`` must already have the model's input shape ``[N, ...]``. Minibatches are shuffled with
    a generator seeded by ``seed``; QAT is switched on or off per ``spec.qat``. ``should_stop``
    is polled before every batch; when it returns true training ends at once with
    ``stopped=True``. A non-finite loss raises ``FloatingPointError`` (lr too high).
    """
    start = time.perf_counter()
    if spec.epochs < 1 or spec.batch_size < 1 or not spec.lr > 0:
        raise ValueError(f"epochs, batch_size and lr must be positive: {spec}")
    xt, yt = _tensors(x, y)
    n = len(yt)
    set_qat(model, spec.qat)
    model.train()
    # Not torch.optim.SGD: its first use imports torch._dynamo, ~70 MiB (see edge_agent.optim).
    optimizer = MomentumSGD(
        model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    seen = 0
    loss_sum = 0.0
    correct = 0
    stopped = False
    for epoch in range(spec.epochs):
        seen = 0
        loss_sum = 0.0
        correct = 0
        order = torch.randperm(n, generator=generator)
        for batch in order.split(spec.batch_size):
            if should_stop is not None and should_stop():
                stopped = True
                break
            logits = model(xt[batch])
            target = yt[batch]
            if steps == 0:
                _check_labels(yt, logits.shape[1])
            loss = nn.functional.cross_entropy(logits, target)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training diverged: loss is {value} at epoch {epoch + 1}, step {steps + 1}; "
                    f"lower the learning rate (lr={spec.lr})"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            seen += len(batch)
            loss_sum += value * len(batch)
            correct += int((logits.detach().argmax(dim=1) == target).sum())
        if stopped:
            break
    return TrainResult(
        num_samples=n,
        steps=steps,
        loss=loss_sum / seen if seen else 0.0,
        accuracy=correct / seen if seen else 0.0,
        seconds=time.perf_counter() - start,
        stopped=stopped,
    )


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode without grad.

    The model's train/eval mode is restored afterwards.
    """
    xt, yt = _tensors(x, y)
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(yt), batch_size):
                logits = model(xt[start:start + batch_size])
                target = yt[start:start + batch_size]
                if start == 0:
                    _check_labels(yt, logits.shape[1])
                loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return loss_sum / len(yt), correct / len(yt)


def warm_up() -> float:
    """Run one tiny forward, backward and SGD step so torch's autograd code is loaded now.

    Paying that start-up cost at once keeps it out of the first local training (and out of
    its measured time). Like ``train_local`` it avoids ``torch.optim``, whose first use
    would import torch._dynamo. Returns the seconds it took.
    """
    started = time.monotonic()
    layer = torch.nn.Linear(2, 2)
    optimizer = MomentumSGD(layer.parameters(), lr=0.1, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(layer(torch.zeros(1, 2)), torch.zeros(1).long())
    loss.backward()
    optimizer.step()
    return time.monotonic() - started
