"""Run reports: ``report.json``, ``report.html`` and ``accuracy.png``.

``report_for_run`` reads any state directory read-only (``fedbus report``); the demo adds its
own numbers (``report_dict``) to the same trial report and writes the same files.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coordinator.report_render import render_html, render_plots
from coordinator.run_reader import read_run
from coordinator.service import RunSummary
from coordinator.trial_report import build_report

__all__ = ["report_dict", "report_for_run", "write_files", "write_report"]


def report_for_run(state_dir: Path, dataset: str | None = None) -> dict[str, Any]:
    """The trial report of the run in ``state_dir`` (read-only; it may be running)."""
    rows = read_run(Path(state_dir))
    meta = dict(rows.meta)
    if dataset is not None:
        meta["dataset"] = dataset
    return build_report(meta, rows.versions, rows.verdicts)


def write_files(directory: Path, report: dict[str, Any]) -> list[Path]:
    """Write ``report.json``, ``report.html`` (self-contained) and ``accuracy.png``
    (accuracy against time, when there is one) into ``directory``; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plots = render_plots(report)
    written = [directory / "report.json", directory / "report.html"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    written[1].write_text(render_html(report, plots))
    if "accuracy_time" in plots:
        (directory / "accuracy.png").write_bytes(plots["accuracy_time"])
        written.append(directory / "accuracy.png")
    return written


def report_dict(summary: RunSummary, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plain numbers describing one run (the keys documented in the README)."""
    counters = summary.counters
    accepted = counters.get("updates_accepted", 0)
    accuracies = [r.accuracy for r in summary.history if r.accuracy is not None]
    bytes_accepted = counters.get("bytes_accepted", 0)
    report: dict[str, Any] = {
        "mode": summary.mode,
        "aggregator": summary.aggregator,
        "task_id": summary.task_id,
        "final_accuracy": summary.final_accuracy,
        "best_accuracy": summary.best_accuracy if summary.best_accuracy is not None else (
            max(accuracies) if accuracies else None),
        "best_version": summary.best_version,
        "model_versions": summary.final_version,
        "updates_received": counters.get("updates_received", 0),
        "updates_accepted": accepted,
        "updates_rejected": counters.get("updates_rejected", 0),
        "rejected_by_reason": {
            k[len("rejected_"):]: v for k, v in counters.items() if k.startswith("rejected_")
        },
        "bytes_uploaded": counters.get("bytes_received", 0),
        "bytes_per_update": round(bytes_accepted / accepted, 1) if accepted else None,
        "wall_seconds": round(summary.wall_seconds, 3),
        "first_update_seconds": summary.first_update_seconds,
        "stop_reason": summary.stop_reason,
        "updates_clipped": counters.get("updates_clipped", 0),
        "robust_fallbacks": counters.get("robust_fallbacks", 0),
        "privacy": summary.privacy,
        "history": [asdict(r) for r in summary.history],
    }
    if extra:
        report.update(extra)
    return report


def write_report(
    directory: Path, summary: RunSummary, state_dir: Path,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The demo's report: the trial report of its state directory with the summary's
    numbers and ``extra`` on top, written by ``write_files``; returns the report."""
    extra = dict(extra or {})
    trial = report_for_run(state_dir, dataset=extra.get("dataset"))
    report = {**trial, **report_dict(summary, extra)}
    write_files(directory, report)
    return report
