"""Drawing a trial report (``coordinator.trial_report``): PNG plots and one HTML page.

The page is self-contained: every plot is an inline base64 PNG, the style is inline, and
nothing refers to another file or to the network, so it can be mailed or archived alone.

Plots meant to be read: accuracy axes are fitted to the data with a margin (not 0 to 1),
time starts at the first version (the start-up before it, agents starting and training
their first round, is stated on the plot rather than drawn), and every title names the
data set (when recorded), the model, the codec and the mode.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["accuracy_range", "plot_title", "render_html", "render_plots"]

_REASON_COLOURS = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf")


def accuracy_range(values: Sequence[float]) -> tuple[float, float]:
    """A y range that fits ``values`` with a margin of a tenth of their spread (at least
    0.005), kept within [0, 1]."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    margin = max(0.1 * (hi - lo), 0.005)
    return max(0.0, lo - margin), min(1.0, hi + margin)


def plot_title(report: Mapping[str, Any]) -> str:
    task = report.get("task") or {}
    parts = [
        f"data set {task.get('dataset')}" if task.get("dataset") else "data set not recorded",
        f"model {task.get('arch') or 'not recorded'}",
        f"codec {task.get('codec') or 'not recorded'}",
        f"mode {task.get('mode') or 'not recorded'}",
    ]
    if task.get("aggregator") not in (None, "mean"):
        parts.append(f"aggregator {task['aggregator']}")
    return ", ".join(parts)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _accuracy_plot(report: Mapping[str, Any], x_key: str) -> bytes | None:
    import matplotlib.pyplot as plt

    rows = [r for r in report["versions"]
            if r["version"] >= 1 and r["accuracy"] is not None and r.get(x_key) is not None]
    if not rows:
        return None
    scale = 1.0
    if x_key == "since_first":
        xlabel = "seconds since version 1"
    else:
        top = max(r[x_key] for r in rows)
        scale, unit = (1e6, "MB") if top >= 1e6 else (1e3, "KB")
        xlabel = f"update bytes received ({unit})"
    xs = [r[x_key] / scale for r in rows]
    ys = [r["accuracy"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    # a version's accuracy holds until the next version replaces it; each version a dot
    ax.plot(xs, ys, drawstyle="steps-post", linewidth=1.4, color="#1f77b4")
    ax.plot(xs, ys, "o", markersize=3, color="#1f77b4", label="a version")
    best = max(range(len(ys)), key=ys.__getitem__)
    ax.annotate(f" best {ys[best]:.3f} (v{rows[best]['version']})", (xs[best], ys[best]),
                fontsize=8, va="bottom")
    ax.set_ylim(*accuracy_range(ys))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out accuracy")
    ax.grid(True, alpha=0.3)
    startup = report.get("startup_seconds")
    if x_key == "since_first" and startup is not None:
        ax.text(0.01, 0.02, f"start-up before version 1: {startup:.1f} s (not drawn)",
                transform=ax.transAxes, fontsize=8, color="grey")
    against = "time" if x_key == "since_first" else "bytes"
    ax.set_title(f"Accuracy against {against}\n{plot_title(report)}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _device_plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    devices: Mapping[str, Mapping[str, Any]] = report["per_device"]
    if not devices:
        return {}
    names = list(devices)
    height = max(2.5, 0.3 * len(names) + 1.2)
    out: dict[str, bytes] = {}

    fig, ax = plt.subplots(figsize=(8, height), dpi=100)
    left = [float(devices[d]["accepted"]) for d in names]
    ax.barh(names, left, color="#2ca02c", label="accepted")
    reasons = sorted({r for d in names for r in devices[d]["rejected_by_reason"]})
    for i, reason in enumerate(reasons):
        counts = [float(devices[d]["rejected_by_reason"].get(reason, 0)) for d in names]
        ax.barh(names, counts, left=left, color=_REASON_COLOURS[i % len(_REASON_COLOURS)],
                label=f"rejected: {reason}")
        left = [a + b for a, b in zip(left, counts, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("updates")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"Participation and rejections per device\n{plot_title(report)}", fontsize=9)
    out["participation"] = _png(fig)

    stale = [d for d in names if devices[d]["mean_staleness"] is not None]
    if stale:
        fig, ax = plt.subplots(figsize=(8, height), dpi=100)
        ax.barh(stale, [devices[d]["mean_staleness"] for d in stale], color="#1f77b4",
                label="mean")
        ax.plot([devices[d]["max_staleness"] for d in stale], stale, "k|", markersize=12,
                label="max")
        for i, d in enumerate(stale):
            ax.text(devices[d]["mean_staleness"], i,
                    f" mean {devices[d]['mean_staleness']:.2f}, max {devices[d]['max_staleness']}",
                    va="center", fontsize=8)
        ax.invert_yaxis()
        # whole versions, from 0 (a run without stale updates is a row of zeros, not a
        # range around 0)
        ax.set_xlim(0, max(1, *(devices[d]["max_staleness"] for d in stale)) * 1.3 + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("staleness of accepted updates (versions behind)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(f"Staleness per device\n{plot_title(report)}", fontsize=9)
        out["staleness"] = _png(fig)

    sized = [d for d in names if devices[d]["bytes"] is not None]
    if sized:
        top = max(devices[d]["bytes"] for d in sized)
        scale, unit = (1e6, "MB") if top >= 1e6 else (1e3, "KB")
        fig, ax = plt.subplots(figsize=(8, height), dpi=100)
        ax.barh(sized, [devices[d]["bytes"] / scale for d in sized], color="#9467bd")
        ax.invert_yaxis()
        ax.set_xlabel(f"update bytes received ({unit}), rejected updates included")
        ax.set_title(f"Bytes per device\n{plot_title(report)}", fontsize=9)
        out["bytes"] = _png(fig)
    return out


def render_plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """The report's plots as PNG bytes, by name: ``accuracy_time``, ``accuracy_bytes``,
    ``participation``, ``staleness``, ``bytes`` (each only when there is data for it)."""
    import matplotlib

    matplotlib.use("Agg")
    plots: dict[str, bytes] = {}
    for name, key in (("accuracy_time", "since_first"), ("accuracy_bytes", "bytes_received")):
        png = _accuracy_plot(report, key)
        if png is not None:
            plots[name] = png
    plots.update(_device_plots(report))
    return plots


_CAPTIONS = {
    "accuracy_time": "Held-out accuracy against time",
    "accuracy_bytes": "Held-out accuracy against update bytes received",
    "participation": "Updates accepted and rejected per device",
    "staleness": "Staleness per device",
    "bytes": "Bytes per device",
}


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if c is None else str(c))}</td>" for c in row)
        + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _at_version(value: Any, version: Any) -> Any:
    """``0.93 (version 41)``, or the value alone when its version is unknown."""
    return value if value is None or version is None else f"{value} (version {version})"


def render_html(report: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """One self-contained HTML page: summary, plots (inline PNG), per-device table."""
    task = report.get("task") or {}
    summary = [
        ("run", report.get("run_id")), ("task", task.get("task_id")),
        ("data set", task.get("dataset") or "not recorded"), ("model", task.get("arch")),
        ("codec", task.get("codec")), ("mode", task.get("mode")),
        ("aggregator", task.get("aggregator")), ("versions", report.get("model_versions")),
        ("final accuracy", _at_version(report.get("final_accuracy"),
                                        report.get("final_version"))),
        ("best accuracy", _at_version(report.get("best_accuracy"), report.get("best_version"))),
        ("start-up before version 1 (s)", report.get("startup_seconds")),
        ("last version at (s)", report.get("last_version_seconds")),
        ("updates accepted", report.get("updates_accepted")),
        ("updates rejected", report.get("updates_rejected")),
        ("update bytes received", report.get("bytes_received")),
        ("run ended", report.get("ended") or "no (still running or stopped)"),
    ]
    devices = report.get("per_device") or {}
    device_rows = [
        (name, d["accepted"], d["rejected"],
         ", ".join(f"{r} {n}" for r, n in d["rejected_by_reason"].items()),
         d["mean_staleness"], d["max_staleness"], d["bytes"])
        for name, d in devices.items()
    ]
    figures = "".join(
        f'<figure><img alt="{html.escape(_CAPTIONS[name])}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(_CAPTIONS[name])}</figcaption></figure>"
        for name, png in plots.items()
    )
    title = f"fedbus trial report: {plot_title(report)}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.2em .6em;text-align:left}figure{margin:1.5em 0}img{max-width:100%}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        + _table(("", ""), summary)
        + figures
        + "<h2>Devices</h2>"
        + _table(("device", "accepted", "rejected", "rejected by reason", "mean staleness",
                  "max staleness", "bytes"), device_rows)
        + "<h2>Versions</h2>"
        + _table(("version", "s since version 1", "updates", "accuracy", "loss",
                  "bytes received before"),
                 [(r["version"], r["since_first"], r["updates"], r["accuracy"], r["loss"],
                   r["bytes_received"]) for r in report.get("versions", [])])
        + f"<details><summary>report.json</summary><pre>"
        f"{html.escape(json.dumps(report, indent=1))}</pre></details>"
        "</body></html>\n"
    )
