"""Checking a device's data against a task before a trial (``fedbus data check``).

``check_data`` is pure: it takes the loaded samples and labels (``fedbus.datasets``) and a
``Task`` and returns findings, each one line. Errors are what would stop the agent from
taking part (it logs them and waits for another task); warnings are what would make its
updates useless, most often features that are not scaled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedbus.errors import ConfigError, ProtocolError
from fedbus.messages import Task
from fedbus.preprocess import KNOWN_REQUIREMENTS, encode_labels

__all__ = ["RAW_SCALE_LIMIT", "Finding", "check_data", "load_task_file", "scale_warnings"]

# Features whose 99th percentile of |x| exceeds this look unscaled (standardised data and
# pixels in [0, 1] stay well below it).
RAW_SCALE_LIMIT = 10.0
# After the task's normalisation a feature of this device should have a mean within this
# many of the coordinator's standard deviations of 0, and a spread below this many.
NORMALISED_LIMIT = 5.0


@dataclass(frozen=True)
class Finding:
    level: Literal["error", "warning"]
    message: str


def load_task_file(path: str | Path) -> Task:
    """The task in ``task.json`` (written by the coordinator into its state directory), or
    in ``<path>/task.json`` when ``path`` is that directory. ``ConfigError`` naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "task.json"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"task file {path}: cannot read: {exc}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"task file {path}: not a task (a JSON object)")
    try:
        return Task.from_wire(obj)
    except ProtocolError as exc:
        raise ConfigError(f"task file {path}: {exc}") from None


def _per_feature(x: np.ndarray) -> np.ndarray:
    """``x`` ``[N, C, ...]`` as ``[C, N * ...]``: every value of each feature/channel."""
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def check_data(x: np.ndarray, y: np.ndarray, task: Task) -> list[Finding]:
    """What is wrong with samples ``x`` and labels ``y`` for ``task``, errors first."""
    from fedbus.zoo import fit_inputs, input_shape

    errors: list[str] = []
    warnings: list[str] = []
    unknown = [r for r in task.requires if r not in KNOWN_REQUIREMENTS]
    if unknown:
        errors.append(f"the task requires {', '.join(unknown)}, which this fedbus does not "
                      "implement: upgrade it")
    fitted: np.ndarray | None = None
    try:
        shape = input_shape(task.model.arch, task.model.args)
        fitted = fit_inputs(x, shape)
    except (ValueError, TypeError) as exc:
        errors.append(f"shape: {exc} (the task's {task.model.arch} model)")
    num_classes = task.model.args.get("num_classes")
    try:
        labels = encode_labels(y, task.classes,
                               num_classes if isinstance(num_classes, int) else None)
    except ValueError as exc:
        errors.append(f"labels: {exc}")
        labels = None
    if labels is not None and len(np.unique(labels)) == 1 and (
        not isinstance(num_classes, int) or num_classes > 1
    ):
        warnings.append("labels: every sample has the same class; training on this device "
                        "alone teaches the model nothing about the others")
    if fitted is not None:
        warnings.extend(scale_warnings(fitted, task))
    return ([Finding("error", m) for m in errors]
            + [Finding("warning", m) for m in warnings])


def scale_warnings(x: np.ndarray, task: Task) -> list[str]:
    """Warnings about the scale of samples ``x``, already in the model's input shape and not
    yet normalised: against the task's normalisation, or as raw features without one."""
    norm = task.input_norm
    if norm is None:
        top = np.percentile(np.abs(_per_feature(x.astype(np.float64))), 99, axis=1)
        worst = int(np.argmax(top))
        if top[worst] <= RAW_SCALE_LIMIT:
            return []
        over = int((top > RAW_SCALE_LIMIT).sum())
        return [
            f"scale: {over} of {len(top)} features look unscaled (feature {worst + 1} reaches "
            f"{top[worst]:.4g}; scaled features stay within about +-{RAW_SCALE_LIMIT:g}) and "
            "the task has no input normalisation: the first updates will be far too large "
            "and rejected for their norm. Standardise the data, or have the coordinator give "
            "the task a normalisation (--normalize)"
        ]
    try:
        norm.check_fits(x.shape[1:])
    except ValueError as exc:
        return [f"scale: {exc}"]
    z = _per_feature(norm.apply(x).astype(np.float64))
    means = np.abs(z.mean(axis=1))
    stds = z.std(axis=1)
    off = (means > NORMALISED_LIMIT) | (stds > NORMALISED_LIMIT)
    if not off.any():
        return []
    worst = int(np.argmax(np.maximum(means, stds)))
    return [
        f"scale: after the task's normalisation {int(off.sum())} of {len(z)} features are far "
        f"from the expected range (feature {worst + 1}: mean {z[worst].mean():.3g}, std "
        f"{stds[worst]:.3g}; expected near 0 and 1): are these the same units and the same "
        "column order as the coordinator's data?"
    ]
