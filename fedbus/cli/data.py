"""``fedbus data check``: validate a device's data against a task before a trial."""

from __future__ import annotations

import sys
from pathlib import Path

import click

__all__ = ["data"]


@click.group()
def data() -> None:
    """Work with a device's data."""


@data.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--task", "task_path", type=click.Path(path_type=Path), required=True,
    help="The task: task.json from the coordinator's --state-dir (it writes it when a run "
    "starts or resumes), or that directory.",
)
def check(files: tuple[Path, ...], task_path: Path) -> None:
    """Check each FILE (.csv, .npz or a directory of them) against a task.

    Reads the data as the agent does and checks the number of features against the task's
    model, the labels against its class list (or class count), and the scale of the
    features: after the task's input normalisation they should be near mean 0 and std 1;
    without one, raw features beyond about +-10 are reported as unscaled. One line per
    problem on stderr, one summary line per file; exit status 1 when a file has an error
    (the agent would not take part with it), 0 with only warnings.

    \b
    Example:
      fedbus data check ./device-01.csv --task ./run/task.json
    """
    from fedbus.data_check import check_data, load_task_file
    from fedbus.datasets import load_local_data
    from fedbus.errors import ConfigError

    task = load_task_file(task_path)
    failed = 0
    for file in files:
        try:
            x, y = load_local_data(file)
        except ConfigError as exc:  # a file the agent could not even read
            click.echo(f"error: {exc}", err=True)
            failed += 1
            continue
        findings = check_data(x, y, task)
        for finding in findings:
            click.echo(f"{finding.level}: {file}: {finding.message}", err=True)
        errors = sum(f.level == "error" for f in findings)
        summary = (f"{file}: {len(y)} samples of shape {tuple(x.shape[1:])}, task "
                   f"{task.task_id} ({task.model.arch}, input normalisation "
                   f"{'yes' if task.input_norm is not None else 'none'})")
        if errors:
            failed += 1
            click.echo(f"{summary}: {errors} error(s), {len(findings) - errors} warning(s)",
                       err=True)
        else:
            click.echo(f"{summary}: ok" + (f", {len(findings)} warning(s)" if findings else ""))
    if failed:
        sys.exit(1)
