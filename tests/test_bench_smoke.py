"""Smoke test of the benchmark harness: a quick run of a few benchmarks, checked for shape.

Never a timing assertion: the numbers of a quick run on a shared machine mean nothing. It
checks that the harness runs end to end against a real broker, writes results.json and the
BENCHMARKS.md tables into the directory it is given, and leaves the repository's own
results alone.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SUBSET = ("ingest_25k", "latency", "footprint", "privacy")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_run_writes_results_and_tables(tmp_path: Path) -> None:
    repo_results = REPO / "bench" / "results.json"
    before = repo_results.read_bytes() if repo_results.exists() else None
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", *SUBSET, "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True
    env = results["environment"]
    for key in ("cpu_model", "cpu_count", "python", "torch", "paho_mqtt", "numpy", "msgpack",
                "mosquitto", "broker_config"):
        assert env.get(key), key
    assert "listener" in env["broker_config"]

    assert set(results["benchmarks"]) == set(SUBSET)
    for name, bench in results["benchmarks"].items():
        assert "error" not in bench, (name, bench.get("error"))
        for side in ("ours", "baseline"):
            runs = bench[side]["runs"]
            assert runs and all(_finite(v) for v in runs), (name, side, runs)
            assert _finite(bench[side]["median"]), (name, side)
        assert _finite(bench["ratio"]), name
        assert bench["ratio_definition"] and bench["unit"] and "aim" in bench
    assert _finite(results["benchmarks"]["latency"]["p99"]["ratio"])
    assert _finite(results["benchmarks"]["footprint"]["idle"]["ours"]["median"])
    rows = results["benchmarks"]["privacy"]["rows"]
    assert rows["no DP"]["epsilon"] is None and _finite(rows["σ = 1"]["epsilon"])
    assert all(_finite(v) for r in rows.values() for v in r["accuracy"]["runs"])

    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    for name in ("summary", "environment", *SUBSET):
        assert f"<!-- bench:{name}:begin -->" in markdown, name
        assert f"<!-- bench:{name}:end -->" in markdown, name
    # --out keeps the repository's results untouched
    after = repo_results.read_bytes() if repo_results.exists() else None
    assert after == before


def test_quick_poisoning_run_has_every_cell(tmp_path: Path) -> None:
    """The poisoning benchmark drives the real core in-process (no broker): a quick run
    writes one accuracy per data set, configuration and attack, and its table."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "poisoning", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    bench = json.loads((tmp_path / "results.json").read_text())["benchmarks"]["poisoning"]
    assert "error" not in bench, bench.get("error")
    details = bench["details"]
    assert set(details["accuracy"]) == {"digits", "mnist"}
    for configs in details["accuracy"].values():
        assert set(configs) == set(details["configs"]) >= {"mean", "default"}
        for cells in configs.values():
            assert set(cells) == set(details["attacks"])
            assert all(0.0 <= acc <= 1.0 for acc in cells.values())
    assert _finite(bench["ours"]["median"]) and isinstance(bench["aim_met"], bool)
    assert len(details["rows"]) == 2 * len(details["configs"]) * len(details["attacks"])
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- bench:poisoning:begin -->" in markdown and "held-out accuracy" in markdown
