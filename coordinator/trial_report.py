"""A trial report from a run's recorded rows: pure functions, no I/O.

``coordinator.run_reader`` reads the rows from a state directory (read-only) and
``coordinator.report_render`` draws the plots and the HTML page; this module only turns rows
into the plain numbers of ``report.json``:

- ``task``: model, codec, mode, aggregator (and data set when it was recorded);
- ``versions``: one entry per version with its time since the run was created, its time
  since the first version after the initial model (``since_first``), its held-out accuracy
  and loss, and the bytes of every update received before it was made;
- ``per_device``: per device, updates accepted, rejected by reason, mean staleness of its
  accepted updates, bytes received (``None`` when the run did not record sizes).

Verdicts are what the store remembers (the newest ``verdict_capacity`` of them, 200,000 by
default); ``verdicts_remembered`` says how many the report was built from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["VerdictRow", "VersionRow", "build_report", "task_summary"]


@dataclass(frozen=True)
class VersionRow:
    version: int
    made_at: float  # wall clock (s since the epoch)
    updates: int  # updates this version applied
    accuracy: float | None = None
    loss: float | None = None


@dataclass(frozen=True)
class VerdictRow:
    device: str
    accepted: bool
    reason: str | None  # the reject reason; None when accepted
    model_version: int  # the global version when it was judged
    staleness: int | None = None  # accepted updates only
    size: int | None = None  # bytes; None when the run did not record it


def task_summary(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a title names: model, codec, mode, aggregator, data set (``None`` if unknown)."""
    task = meta.get("task") or {}
    model = task.get("model") or {}
    return {
        "task_id": task.get("task_id"),
        "arch": model.get("arch"),
        "model_args": model.get("args"),
        "codec": task.get("codec"),
        "mode": meta.get("mode"),
        "aggregator": meta.get("aggregator") or "mean",
        "privacy": meta.get("privacy"),
        "dataset": meta.get("dataset"),
        "train": task.get("train"),
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def _versions(
    versions: Sequence[VersionRow], verdicts: Sequence[VerdictRow], created_at: float
) -> list[dict[str, Any]]:
    # bytes received before version v was made: every update judged while the model was at
    # a version below v
    sizes_known = all(v.size is not None for v in verdicts)
    by_version: dict[int, int] = {}
    for v in verdicts:
        by_version[v.model_version] = by_version.get(v.model_version, 0) + (v.size or 0)
    ordered = sorted(versions, key=lambda r: r.version)
    first = next((r.made_at for r in ordered if r.version >= 1), None)
    out = []
    for row in ordered:
        received = sum(n for ver, n in by_version.items() if ver < row.version)
        out.append({
            "version": row.version,
            "seconds": _round(row.made_at - created_at),
            "since_first": None if first is None else _round(row.made_at - first),
            "updates": row.updates,
            "accuracy": row.accuracy,
            "loss": row.loss,
            "bytes_received": received if sizes_known else None,
        })
    return out


def _devices(verdicts: Iterable[VerdictRow]) -> dict[str, dict[str, Any]]:
    grouped: dict[str, list[VerdictRow]] = {}
    for v in verdicts:
        grouped.setdefault(v.device, []).append(v)
    devices: dict[str, dict[str, Any]] = {}
    for device in sorted(grouped):
        rows = grouped[device]
        accepted = [r for r in rows if r.accepted]
        rejected: dict[str, int] = {}
        for r in rows:
            if not r.accepted:
                key = r.reason or "unknown"
                rejected[key] = rejected.get(key, 0) + 1
        stale = [r.staleness for r in accepted if r.staleness is not None]
        sizes_known = all(r.size is not None for r in rows)
        devices[device] = {
            "accepted": len(accepted),
            "rejected": sum(rejected.values()),
            "rejected_by_reason": dict(sorted(rejected.items())),
            "mean_staleness": _round(sum(stale) / len(stale)) if stale else None,
            "max_staleness": max(stale) if stale else None,
            "bytes": sum(r.size or 0 for r in rows) if sizes_known else None,
            "bytes_accepted": sum(r.size or 0 for r in accepted) if sizes_known else None,
        }
    return devices


def build_report(
    meta: Mapping[str, Any],
    versions: Sequence[VersionRow],
    verdicts: Sequence[VerdictRow],
) -> dict[str, Any]:
    """The report of one run. ``meta``: ``run_id``, ``created_at`` (wall clock), ``task``
    (its wire form), ``mode``, ``aggregator``, ``privacy``, ``ended``, ``counters`` and
    optionally ``dataset``; ``versions``: the history with evaluations; ``verdicts``: the
    remembered verdicts."""
    created_at = float(meta.get("created_at") or 0.0)
    rows = _versions(versions, verdicts, created_at)
    made = [r for r in rows if r["version"] >= 1]
    evaluated = [r for r in rows if r["accuracy"] is not None]
    # the best evaluated version, the earliest on a tie (as the coordinator's model_best.npz)
    best = max(evaluated, key=lambda r: (r["accuracy"], -r["version"]), default=None)
    devices = _devices(verdicts)
    rejected: dict[str, int] = {}
    for dev in devices.values():
        for reason, n in dev["rejected_by_reason"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    sizes_known = all(v.size is not None for v in verdicts)
    return {
        "run_id": meta.get("run_id"),
        "task": task_summary(meta),
        "ended": meta.get("ended"),
        "created_at": created_at,
        "model_versions": max((r["version"] for r in rows), default=0),
        # the start-up: from the run's creation to its first version (agents starting,
        # connecting, training their first round)
        "startup_seconds": made[0]["seconds"] if made else None,
        "last_version_seconds": rows[-1]["seconds"] if rows else None,
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "final_version": evaluated[-1]["version"] if evaluated else None,
        "best_accuracy": None if best is None else best["accuracy"],
        "best_version": None if best is None else best["version"],
        "verdicts_remembered": len(verdicts),
        "updates_accepted": sum(d["accepted"] for d in devices.values()),
        "updates_rejected": sum(d["rejected"] for d in devices.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "bytes_received": sum(v.size or 0 for v in verdicts) if sizes_known else None,
        "counters": dict(meta.get("counters") or {}),
        "versions": rows,
        "per_device": devices,
    }
