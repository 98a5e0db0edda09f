"""``fedbus report``: a trial report of any run, from its coordinator's state directory."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["report"]


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Directory for report.json, report.html and accuracy.png "
                   "[default: ./fedbus-report]")
@click.option("--dataset", default=None,
              help="The data set's name, for titles (a run does not record it).")
def report(run_dir: Path, out: Path | None, dataset: str | None) -> None:
    """Write a trial report of the run in RUN_DIR (a coordinator's --state-dir).

    RUN_DIR is only read (SQLite read-only), so this works while the coordinator runs.
    The HTML page is self-contained: plots are inline images, nothing is fetched.
    """
    from coordinator.report import report_for_run, write_files

    trial = report_for_run(run_dir, dataset=dataset)
    written = write_files(out if out is not None else Path("fedbus-report"), trial)
    click.echo(
        f"run {trial['run_id']}: {trial['model_versions']} versions, final accuracy "
        f"{trial['final_accuracy']}, best {trial['best_accuracy']} (version "
        f"{trial['best_version']}), {len(trial['per_device'])} devices"
    )
    for path in written:
        click.echo(f"wrote {path}")
