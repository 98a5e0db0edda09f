"""Staleness weighting: how much an update computed against an old model still counts.

``staleness`` is the number of global versions published between the model a device
trained on and the model its update is applied to (0 = fresh). Each function maps it to a
weight in ``(0, 1]`` that multiplies the update (Xie et al., *Asynchronous Federated
Optimization*; Nguyen et al., *Federated Learning with Buffered Asynchronous Aggregation*):

- ``sqrt``: ``1 / sqrt(1 + s)`` (this function's default, and the coordinator's until issue 10)
- ``poly``: ``(1 + s) ** -a``; the coordinator's default is ``poly`` with ``a = 1``,
  ``1 / (1 + s)`` (``core.AggregationConfig``; chosen by measurement, docs/operations.md)
- ``constant``: ``1`` (no down-weighting)
- ``hinge``: ``1`` for ``s <= b``, else ``1 / (a * (s - b) + 1)``
"""

from __future__ import annotations

import math
import operator

__all__ = ["STALENESS_KINDS", "staleness_weight"]

STALENESS_KINDS: tuple[str, ...] = ("sqrt", "poly", "constant", "hinge")


def staleness_weight(staleness: int, kind: str = "sqrt", *, a: float = 0.5, b: int = 4) -> float:
    """Weight in ``(0, 1]`` of an update that is ``staleness`` versions old.

    ``a`` is the exponent of ``poly`` and the slope of ``hinge``; ``b`` is the staleness up
    to which ``hinge`` keeps full weight. Raises ``ValueError`` for an unknown ``kind``, a
    negative or non-integer ``staleness`` or a negative/non-finite ``a`` or ``b``.
    """
    try:
        s = operator.index(staleness)
    except TypeError:
        raise ValueError(f"staleness must be an integer, got {staleness!r}") from None
    if isinstance(staleness, bool):
        raise ValueError("staleness must be an integer, got a bool")
    if s < 0:
        raise ValueError(f"staleness must be >= 0, got {s}")
    if kind not in STALENESS_KINDS:
        raise ValueError(f"unknown staleness kind {kind!r}; known: {', '.join(STALENESS_KINDS)}")
    if not (math.isfinite(a) and a >= 0):
        raise ValueError(f"staleness parameter a must be finite and >= 0, got {a!r}")
    if not (math.isfinite(b) and b >= 0):
        raise ValueError(f"staleness parameter b must be finite and >= 0, got {b!r}")
    if kind == "sqrt":
        return 1.0 / math.sqrt(1.0 + s)
    if kind == "poly":
        return float((1.0 + s) ** -a)
    if kind == "constant":
        return 1.0
    # hinge
    return 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)
