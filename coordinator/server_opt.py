"""Adaptive server optimizers: FedAdam and FedYogi (pure functions).

The server treats each step's aggregate ``Δ`` (the FedBuff mean or a robust aggregate: the
direction the devices moved the model) as a negative gradient and keeps, per coordinate, a
first moment ``m`` and a second moment ``v`` (Reddi et al., *Adaptive Federated
Optimization*, ICLR 2021, Algorithm 2; no bias correction, as there)::

    m ← β1·m + (1 − β1)·Δ
    v ← β2·v + (1 − β2)·Δ²                      (adam)
    v ← v − (1 − β2)·Δ²·sign(v − Δ²)            (yogi)
    θ ← θ + η · m / (√v + τ)

``m`` starts at 0 and ``v`` at ``τ²``. Every coordinate moves by at most about ``η`` per step
whatever the size of ``Δ``, so ``η`` (``server_lr``) is on the scale of the weights' change
per step (about 0.01 here), not 1 as for plain FedAvg. Yogi's ``v`` changes by at most
``(1 − β2)·Δ²`` per step in either direction, so one unusually large aggregate cannot make
the step size collapse or the next one jump.

The optimizer state is one dict of float32 arrays, ``m:NAME`` and ``v:NAME`` for each
tensor ``NAME`` of the model (the coordinator stores it where plain SGD keeps its momentum
velocity). Nothing mutates its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["ADAPTIVE_OPTIMIZERS", "SERVER_OPTIMIZERS", "adaptive_step", "fits_moments"]

SERVER_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "yogi")
ADAPTIVE_OPTIMIZERS: tuple[str, ...] = ("adam", "yogi")

State = dict[str, np.ndarray]


def fits_moments(state: Mapping[str, np.ndarray], moments: Mapping[str, np.ndarray]) -> bool:
    """True if ``moments`` is an optimizer state for ``state``: ``m:NAME`` and ``v:NAME``
    for each of its tensors, of its shapes, and nothing else."""
    wanted = {f"{p}:{name}": np.shape(a) for name, a in state.items() for p in ("m", "v")}
    return set(moments) == set(wanted) and all(
        np.shape(moments[k]) == shape for k, shape in wanted.items())


def adaptive_step(
    global_state: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    *,
    kind: str,
    server_lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    moments: Mapping[str, np.ndarray] | None = None,
) -> tuple[State, State]:
    """One FedAdam (``kind="adam"``) or FedYogi (``"yogi"``) step; returns
    ``(new_state, new_moments)``. ``moments`` None: a first step (``m = 0``, ``v = τ²``).

    Raises ``ValueError`` for an unknown kind, out-of-range settings (``server_lr`` and
    ``tau`` finite and > 0, betas in ``[0, 1)``) or tensors that do not match. The result may
    hold non-finite values only if the inputs are extreme; the caller checks it.
    """
    if kind not in ADAPTIVE_OPTIMIZERS:
        raise ValueError(f"unknown adaptive optimizer {kind!r}; known: "
                         f"{', '.join(ADAPTIVE_OPTIMIZERS)}")
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr must be finite and > 0, got {server_lr!r}")
    for label, beta in (("beta1", beta1), ("beta2", beta2)):
        if not (math.isfinite(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"{label} must be in [0, 1), got {beta!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")
    if set(aggregate) != set(global_state) or any(
            np.shape(aggregate[n]) != np.shape(a) for n, a in global_state.items()):
        raise ValueError("aggregate: tensor names or shapes differ from the model's")
    if moments is not None and not fits_moments(global_state, moments):
        raise ValueError("moments: not an optimizer state of this model (m:NAME, v:NAME)")
    b1, b2, t = np.float32(beta1), np.float32(beta2), np.float32(tau)
    lr = np.float32(server_lr)
    new_state: State = {}
    new_moments: State = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for name, value in global_state.items():
            delta = np.asarray(aggregate[name], dtype=np.float32)
            if moments is None:
                m_old = np.zeros_like(delta)
                v_old = np.full_like(delta, t * t)
            else:
                m_old = np.asarray(moments[f"m:{name}"], dtype=np.float32)
                v_old = np.asarray(moments[f"v:{name}"], dtype=np.float32)
            m = b1 * m_old + (np.float32(1) - b1) * delta
            square = delta * delta
            if kind == "adam":
                v = b2 * v_old + (np.float32(1) - b2) * square
            else:
                v = v_old - (np.float32(1) - b2) * square * np.sign(v_old - square)
            new_moments[f"m:{name}"] = m.astype(np.float32, copy=False)
            new_moments[f"v:{name}"] = v.astype(np.float32, copy=False)
            step = lr * m / (np.sqrt(v) + t)
            new_state[name] = (np.asarray(value, dtype=np.float32) + step).astype(
                np.float32, copy=False)
    return new_state, new_moments
