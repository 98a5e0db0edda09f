"""End to end: the real ``fedbus demo`` command as a subprocess, checked by its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPORT_KEYS = {
    "final_accuracy", "model_versions", "updates_accepted", "updates_rejected",
    "bytes_uploaded", "wall_seconds", "mode",
}


def run_demo(tmp_path: Path, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    report_dir = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "fedbus", "demo", "--report", str(report_dir), *args],
        capture_output=True, text=True, timeout=400, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    png = (report_dir / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    return report, result


def test_default_demo_reaches_the_accuracy_bar(tmp_path: Path):
    report, result = run_demo(tmp_path)
    assert report.keys() >= REPORT_KEYS
    assert report["mode"] == "fedbuff"
    assert report["devices"] == 8
    assert report["model_versions"] == 100
    # the best version (the one the demo exports) reaches the bar; the last one moves by a
    # point or two from run to run (0.925-0.942 measured on the 2-core machine)
    assert report["best_accuracy"] >= 0.93
    assert report["final_accuracy"] >= 0.91
    assert report["updates_accepted"] >= 400  # K=4 per version
    # on a loaded machine a slow device's update can arrive too late (stale), and updates
    # that arrive after the last version are refused as run_ended (one per device at most)
    rejected = {k: v for k, v in report["rejected_by_reason"].items() if v}
    assert set(rejected) <= {"stale", "run_ended"}, rejected
    assert rejected.get("run_ended", 0) <= 8 and report["updates_rejected"] <= 18, rejected
    # int8 deltas: well under the float32 size of the ~5k-parameter model (about 20 KB)
    assert 0 < report["bytes_per_update"] < 8000
    assert report["bytes_uploaded"] >= report["updates_accepted"] * 4000
    assert all(code == 0 for code in report["agent_exit_codes"].values())
    assert "final held-out accuracy" in result.stdout


def test_synchronous_demo_runs_rounds(tmp_path: Path):
    work = tmp_path / "work"  # kept: the report of its state directory is checked below
    report, _ = run_demo(tmp_path, "--mode", "fedavg", "--devices", "4", "--max-versions", "5",
                         "--workdir", str(work))
    assert report["mode"] == "fedavg"
    assert report["model_versions"] == 5
    assert report["updates_accepted"] == 20  # every device in every round
    assert report["final_accuracy"] > report["history"][0]["accuracy"]
    assert len(report["per_device"]) == 4 and report["task"]["dataset"] == "digits"
    assert _self_contained((tmp_path / "report" / "report.html").read_text())
    check_report_of_a_finished_run(work / "run", tmp_path / "again", report)


def _self_contained(page: str) -> bool:
    return ('<img alt="' in page and 'src="data:image/png;base64,' in page
            and "http://" not in page and "https://" not in page and "<script" not in page)


def check_report_of_a_finished_run(state: Path, out: Path, demo: dict) -> None:
    """``fedbus report`` on the demo's state directory, as a user would run it later."""
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    result = subprocess.run(
        [sys.executable, "-m", "fedbus", "report", str(state), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == before
    report = json.loads((out / "report.json").read_text())
    assert report["run_id"] == demo["run_id"]
    assert len(report["versions"]) == 6  # the initial model and 5 versions
    assert sorted(report["per_device"]) == sorted(demo["per_device"])
    assert sum(d["accepted"] for d in report["per_device"].values()) == 20
    assert report["task"]["mode"] == "fedavg" and report["task"]["codec"] == demo["codec"]
    # the best evaluated version: the same in both reports, and exported beside the last
    assert (report["best_version"], report["best_accuracy"]) == (
        demo["best_version"], demo["best_accuracy"])
    with np.load(state / "model_best.npz") as best:
        assert int(best["__version__"]) == demo["best_version"]
        assert float(best["__accuracy__"]) == demo["best_accuracy"]
    assert _self_contained((out / "report.html").read_text())
    # a directory without a run: one line, exit code non-zero
    empty = subprocess.run(
        [sys.executable, "-m", "fedbus", "report", str(out), "--out", str(out / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert empty.returncode != 0
    assert empty.stderr.strip().count("\n") == 0 and "holds no run" in empty.stderr


def test_robust_demo_trims_and_clips_every_step(tmp_path: Path):
    # 4 devices, K = 4: trimmed:0.25 drops one value per coordinate from each end of every
    # step; the bound 0.5 is below the norms honest updates measure (0.7-5), so it clips
    report, _ = run_demo(
        tmp_path, "--devices", "4", "--max-versions", "5",
        "--aggregator", "clip:0.5+trimmed:0.25",
    )
    assert report["aggregator"] == "trimmed:0.25+clip:0.5"
    assert report["model_versions"] == 5
    assert report["updates_accepted"] >= 20
    assert report["robust_fallbacks"] == 0
    assert report["updates_clipped"] >= report["updates_accepted"] // 2
    assert report["final_accuracy"] > report["history"][0]["accuracy"] + 0.2


def test_demo_configuration_mistake_is_one_line(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "fedbus", "demo", "--speeds", "1,fast"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "speeds" in result.stderr


def test_motions_demo_trains_the_sensor_cnn(tmp_path: Path):
    report, result = run_demo(tmp_path, "--dataset", "motions", "--max-versions", "20")
    assert report["dataset"] == "motions" and report["arch"] == "cnn1d"
    assert report["model_args"] == {
        "in_channels": 6, "length": 100, "num_classes": 4, "channels": [16, 32],
    }
    assert report["devices"] == 4 and report["buffer_size"] == 4
    assert report["train_samples"] == 40 and report["test_samples"] == 40
    # every device holds 2 windows of each activity, plus its skewed share of the rest
    assert report["min_per_class"] == 2 and sum(report["device_samples"]) == 40
    assert min(report["device_samples"]) >= 8
    assert report["model_versions"] >= 20
    assert report["history"][0]["accuracy"] <= 0.5  # an untrained model
    assert report["best_accuracy"] >= 0.9
    assert report["final_accuracy"] >= 0.75
    assert all(code == 0 for code in report["agent_exit_codes"].values())
    assert "fedbus demo: motions, 4 devices" in result.stderr


def test_demo_settings_come_from_the_dataset():
    from coordinator.demo import DEMO_PRESETS, DemoConfig
    from fedbus.datasets import DATASETS

    assert list(DEMO_PRESETS) == list(DATASETS)
    # the digits demo is what it was before there were other data sets
    assert DemoConfig().resolved() == DemoConfig(
        dataset="digits", devices=8, alpha=0.5, max_versions=100, epochs=2, lr=0.05,
        batch_size=16, test_fraction=0.2,
    )
    motions = DemoConfig(dataset="motions").resolved()
    assert (motions.devices, motions.max_versions, motions.test_fraction) == (4, 50, 0.5)
    assert (motions.epochs, motions.lr, motions.batch_size) == (
        DATASETS["motions"].epochs, DATASETS["motions"].lr, DATASETS["motions"].batch_size,
    )
    mnist = DemoConfig(dataset="mnist", devices=3, lr=0.01).resolved()
    assert (mnist.devices, mnist.lr, mnist.batch_size) == (3, 0.01, DATASETS["mnist"].batch_size)
    with pytest.raises(ValueError, match="dataset must be one of digits, mnist, motions"):
        DemoConfig(dataset="cifar")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "cifar"], "dataset must be one of digits, mnist, motions, got 'cifar'"),
        (["--dashboard-port", "70000"], "dashboard_port must be 1-65535, or 0 for none"),
        (["--dataset", "motions", "--devices", "50"],
         "50 devices are too many for the 40 motions training samples"),
    ],
)
def test_demo_dataset_mistakes_are_one_line(tmp_path: Path, args: list[str], message: str):
    result = subprocess.run(
        [sys.executable, "-m", "fedbus", "demo", "--report", str(tmp_path / "r"), *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last
