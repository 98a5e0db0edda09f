"""Run reports: ``report.json`` and ``accuracy.png`` (held-out accuracy against wall time)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coordinator.service import RunSummary

__all__ = ["plot_accuracy", "report_dict", "write_report"]


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
        "best_accuracy": max(accuracies) if accuracies else None,
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


def plot_accuracy(summary: RunSummary, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r.seconds, r.accuracy) for r in summary.history if r.accuracy is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if points:
        xs, ys = zip(*points, strict=True)
        # a version's accuracy holds until the next version replaces it
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, drawstyle="steps-post")
    if summary.first_update_seconds is not None:
        ax.axvline(summary.first_update_seconds, color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            " first update arrives\n (agents were starting)",
            (summary.first_update_seconds, 0.05), color="grey", fontsize=8, ha="right",
        )
    ax.set_xlabel("wall time since coordinator start (s)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    directory: Path, summary: RunSummary, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``report.json`` and ``accuracy.png`` into ``directory``; return the report."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = report_dict(summary, extra)
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"fedbus {summary.mode}: {summary.final_version} versions"
    if summary.final_accuracy is not None:
        title += f", final accuracy {summary.final_accuracy:.3f}"
    plot_accuracy(summary, directory / "accuracy.png", title)
    return report
