"""End to end: the real ``fedbus demo`` command as a subprocess, checked by its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert report["final_accuracy"] >= 0.93
    assert report["updates_accepted"] >= 400  # K=4 per version
    assert report["updates_rejected"] == 0
    # int8 deltas: well under the float32 size of the ~5k-parameter model (about 20 KB)
    assert 0 < report["bytes_per_update"] < 8000
    assert report["bytes_uploaded"] >= report["updates_accepted"] * 4000
    assert all(code == 0 for code in report["agent_exit_codes"].values())
    assert "final held-out accuracy" in result.stdout


def test_synchronous_demo_runs_rounds(tmp_path: Path):
    report, _ = run_demo(tmp_path, "--mode", "fedavg", "--devices", "4", "--max-versions", "5")
    assert report["mode"] == "fedavg"
    assert report["model_versions"] == 5
    assert report["updates_accepted"] == 20  # every device in every round
    assert report["final_accuracy"] > report["history"][0]["accuracy"]


def test_demo_configuration_mistake_is_one_line(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "fedbus", "demo", "--speeds", "1,fast"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "speeds" in result.stderr
