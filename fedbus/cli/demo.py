"""``fedbus demo``: broker, coordinator and simulated devices on this machine."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from coordinator.demo import DEMO_PRESETS, DemoConfig, run_demo
from fedbus.cli._options import config_options
from fedbus.datasets import DATASETS

__all__ = ["demo"]

log = logging.getLogger("fedbus.demo")
ENV_PREFIX = "FEDBUS_DEMO"


def _defaults(name: str) -> str:
    """``[default X]``, or ``[default per dataset: digits X, ...]`` when they differ."""
    values = {d: getattr(DemoConfig(dataset=d).resolved(), name) for d in DEMO_PRESETS}
    if len(set(values.values())) == 1:
        return f"[default {next(iter(values.values()))}]"
    return f"[default per dataset: {', '.join(f'{d} {v}' for d, v in values.items())}]"


HELPS = {
    "dataset": "Bundled data set: "
    + ", ".join(f"{d.name} ({d.description}; {d.arch})" for d in DATASETS.values()) + ".",
    "devices": "Number of simulated devices (each a real `fedbus agent` process). "
    + _defaults("devices"),
    "mode": "Aggregation: fedbuff, fedasync or fedavg (synchronous rounds).",
    "aggregator": "How a step combines updates: quorum (default; mean with --dp-noise), agree, "
    "mean, median, trimmed:FRACTION or krum:F[:M], optionally +clip:BOUND (see fedbus coordinator "
    "--help).",
    "dp_noise": "Central differential privacy: noise multiplier sigma (0: off); needs "
    "--dp-clip and --aggregator mean, and switches the adaptive norm bound off (see fedbus "
    "coordinator --help).",
    "dp_clip": "Differential privacy: the L2 bound every update is clipped to.",
    "dp_epsilon_budget": "Differential privacy: end the run before a step would spend more than "
    "this epsilon at delta 1e-5 (0: no budget).",
    "codec": "Update codec spec: fp32, fp16, int8, int4 or topk:FRACTION[:VALUES], each "
    "optionally +zstd (e.g. topk:0.05:int4+zstd).",
    "speeds": "Comma-separated slowdown factors cycled over the devices (1 = fastest).",
    "alpha": "Label skew of the non-IID split (Dirichlet alpha; smaller = more skewed). "
    + _defaults("alpha"),
    "max_versions": "Stop after this many global model versions. " + _defaults("max_versions"),
    "duration": "Stop after this many seconds at the latest.",
    "buffer_size": "FedBuff: updates buffered per model version (K).",
    "epochs": "Local epochs per update. " + _defaults("epochs"),
    "lr": "Local learning rate. " + _defaults("lr"),
    "batch_size": "Local minibatch size. " + _defaults("batch_size"),
    "test_fraction": "Share of the data held out to evaluate every model version. "
    + _defaults("test_fraction"),
    "seed": "Seed of the data split, the initial model and local training.",
    "report": "Directory for report.json, report.html and accuracy.png.",
    "dashboard_port": "Serve the coordinator's live dashboard on http://127.0.0.1:PORT/ while "
    "the demo runs (0: none).",
    "workdir": "Keep broker files, device data and agent logs here (default: a temporary "
    "directory, removed at the end).",
}


@click.command()
@config_options(DemoConfig, HELPS, ENV_PREFIX)
def demo(**flags: Any) -> None:
    """Run fedbus end to end on this machine and write a report.

    Starts a Mosquitto broker on free ports with fresh credentials and certificates (the
    agents and the coordinator connect over TLS), splits a bundled data set (--dataset;
    scikit-learn's handwritten digits by default) across the devices (non-IID), starts one
    `fedbus agent` process per device with different simulated speeds, and runs the
    coordinator here until --max-versions. Writes report.json, report.html and accuracy.png
    to --report. Settings left unset take the data set's defaults.
    """
    from fedbus.config import load_config

    cfg = load_config(DemoConfig, flags=flags, env_prefix=ENV_PREFIX).resolved()
    interactive = sys.stderr.isatty()
    bar = None
    if interactive:
        from tqdm import tqdm

        # the bar replaces the per-version log lines
        logging.getLogger("coordinator.service").setLevel(logging.WARNING)
        bar = tqdm(total=cfg.max_versions, desc="model versions", unit="v", file=sys.stderr)

    def progress(record: Any) -> None:
        if bar is not None and record.version > 0:
            bar.update(record.version - bar.n)
            if record.accuracy is not None:
                bar.set_postfix(accuracy=f"{record.accuracy:.3f}")

    click.echo(
        f"fedbus demo: {cfg.dataset}, {cfg.devices} devices, {cfg.mode}, codec {cfg.codec}, "
        f"speeds {cfg.speeds}; local {cfg.epochs} epochs, lr {cfg.lr}, batch "
        f"{cfg.batch_size}; up to {cfg.max_versions} model versions", err=True,
    )
    try:
        result = run_demo(cfg, on_version=progress)
    finally:
        if bar is not None:
            bar.close()
    r = result.report
    acc = r["final_accuracy"]
    click.echo(
        "\n".join([
            "",
            f"  final held-out accuracy  {acc:.4f}" if acc is not None else "  no evaluation",
            *([f"  best held-out accuracy   {r['best_accuracy']:.4f} (version "
               f"{r['best_version']})"] if r.get("best_accuracy") is not None else []),
            f"  model versions           {r['model_versions']}",
            f"  updates accepted         {r['updates_accepted']}"
            f" (rejected {r['updates_rejected']})",
            f"  bytes uploaded           {r['bytes_uploaded']:,}"
            f" ({r['bytes_per_update'] or 0:,.0f} per update)",
            f"  wall time                {r['wall_seconds']:.1f} s "
            f"(whole demo {r['total_seconds']:.1f} s)",
            *([f"  differential privacy     epsilon {r['privacy']['epsilon']:.3g} at delta "
               f"{r['privacy']['delta']:g} after {r['privacy']['steps']} steps"]
              if r.get("privacy") else []),
            f"  report                   {Path(result.report_dir) / 'report.html'}, "
            f"{Path(result.report_dir) / 'report.json'}",
        ])
    )
