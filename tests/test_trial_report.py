"""The trial report from hand-made rows (pure), its read-only reader, and its page."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from coordinator.journal import Verdict, VersionMade
from coordinator.report import report_for_run, write_files
from coordinator.report_render import accuracy_range, plot_title, render_html
from coordinator.store import Store
from coordinator.trial_report import VerdictRow, VersionRow, build_report
from fedbus.errors import StateError

T0 = 1_000.0
META = {
    "run_id": "r1",
    "created_at": T0,
    "task": {"task_id": "t", "model": {"arch": "mlp", "args": {}}, "codec": "int8"},
    "mode": "fedbuff",
    "aggregator": "mean",
    "dataset": "digits",
}
VERSIONS = [
    VersionRow(0, T0, 0, 0.10, 2.3),
    VersionRow(1, T0 + 30.0, 2, 0.90, 0.4),
    VersionRow(2, T0 + 32.5, 2, 0.95, 0.2),
]
VERDICTS = [
    # judged at version 0: two accepted (staleness 0), one rejected for its norm
    VerdictRow("dev-a", True, None, 0, 0, 100),
    VerdictRow("dev-b", True, None, 0, 0, 120),
    VerdictRow("dev-b", False, "norm", 0, None, 500),
    # judged at version 1
    VerdictRow("dev-a", True, None, 1, 1, 100),
    VerdictRow("dev-c", True, None, 1, 3, 80),
    VerdictRow("dev-c", False, "stale", 1, None, 80),
    VerdictRow("dev-c", False, "stale", 2, None, 80),
]


def test_participation_staleness_and_bytes_per_device():
    report = build_report(META, VERSIONS, VERDICTS)
    devices = report["per_device"]
    assert list(devices) == ["dev-a", "dev-b", "dev-c"]
    assert devices["dev-a"] == {
        "accepted": 2, "rejected": 0, "rejected_by_reason": {}, "mean_staleness": 0.5,
        "max_staleness": 1, "bytes": 200, "bytes_accepted": 200,
    }
    assert devices["dev-b"]["rejected_by_reason"] == {"norm": 1}
    assert devices["dev-b"]["mean_staleness"] == 0.0 and devices["dev-b"]["bytes"] == 620
    assert devices["dev-c"]["accepted"] == 1 and devices["dev-c"]["rejected"] == 2
    assert devices["dev-c"]["mean_staleness"] == 3.0 and devices["dev-c"]["bytes"] == 240
    assert report["rejected_by_reason"] == {"norm": 1, "stale": 2}
    assert report["updates_accepted"] == 4 and report["updates_rejected"] == 3
    assert report["bytes_received"] == 1060


def test_versions_time_from_the_first_version_and_bytes_before_each():
    report = build_report(META, VERSIONS, VERDICTS)
    rows = report["versions"]
    assert [r["seconds"] for r in rows] == [0.0, 30.0, 32.5]
    assert [r["since_first"] for r in rows] == [-30.0, 0.0, 2.5]
    # bytes of the updates judged before each version was made
    assert [r["bytes_received"] for r in rows] == [0, 720, 980]
    assert report["startup_seconds"] == 30.0
    assert report["model_versions"] == 2
    assert report["final_accuracy"] == 0.95 and report["best_accuracy"] == 0.95
    assert report["task"]["codec"] == "int8" and report["task"]["dataset"] == "digits"


def test_the_best_version_is_reported_beside_the_final_one():
    rows = [*VERSIONS, VersionRow(3, T0 + 35.0, 2, 0.95, 0.2),
            VersionRow(4, T0 + 36.0, 2, 0.91, 0.3)]
    report = build_report(META, rows, VERDICTS)
    assert (report["final_version"], report["final_accuracy"]) == (4, 0.91)
    assert (report["best_version"], report["best_accuracy"]) == (2, 0.95)  # earliest of a tie
    page = render_html(report, {})
    assert "0.91 (version 4)" in page and "0.95 (version 2)" in page


def test_unknown_sizes_stay_unknown():
    rows = [VerdictRow("d", True, None, 0, 0, None)]
    report = build_report(META, VERSIONS, rows)
    assert report["bytes_received"] is None
    assert report["per_device"]["d"]["bytes"] is None
    assert report["versions"][1]["bytes_received"] is None


def test_an_empty_run_has_no_devices_and_no_accuracy():
    report = build_report({"run_id": "r", "created_at": T0}, [VersionRow(0, T0, 0)], [])
    assert report["per_device"] == {} and report["final_accuracy"] is None
    assert report["startup_seconds"] is None and report["bytes_received"] == 0


def test_the_accuracy_range_fits_the_data():
    assert accuracy_range([0.90, 0.96]) == pytest.approx((0.894, 0.966))
    assert accuracy_range([0.5]) == pytest.approx((0.495, 0.505))
    assert accuracy_range([0.0, 1.0]) == (0.0, 1.0)


def test_titles_name_data_set_model_codec_and_mode():
    title = plot_title(build_report(META, VERSIONS, VERDICTS))
    assert title == "data set digits, model mlp, codec int8, mode fedbuff"
    assert "data set not recorded" in plot_title(build_report(
        {k: v for k, v in META.items() if k != "dataset"}, VERSIONS, VERDICTS))


def test_the_page_is_self_contained(tmp_path: Path):
    report = build_report(META, VERSIONS, VERDICTS)
    written = write_files(tmp_path, report)
    assert [p.name for p in written] == ["report.json", "report.html", "accuracy.png"]
    page = (tmp_path / "report.html").read_text()
    assert page.count('<img alt="') == 5
    assert page.count('src="data:image/png;base64,') == 5
    assert "http://" not in page and "https://" not in page
    assert "<script" not in render_html({**report, "run_id": "<script>"}, {})


def _store_with_a_run(path: Path) -> None:
    store = Store(path)
    store.create_run("run-x", {"task_id": "t", "model": {"arch": "mlp"}, "codec": "fp16"},
                     T0, {"w": np.zeros(2, np.float32)}, {}, mode="fedavg")
    store.commit([Verdict("u1", "dev-a", b"12345678", 0, True, None, "", 0, 0, 64),
                  Verdict("u2", "dev-b", b"12345678", 0, False, "norm", "", 0, None, 70)], {})
    store.commit([VersionMade(1, {"w": np.ones(2, np.float32)}, None, ("u1",), "k")],
                 {"updates_accepted": 1})
    store.record_evaluation(1, 0.75, 0.5, T0 + 5)
    store.close()


def test_the_reader_reads_a_store_and_changes_nothing(tmp_path: Path):
    _store_with_a_run(tmp_path / "state.db")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report = report_for_run(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert report["run_id"] == "run-x" and report["task"]["mode"] == "fedavg"
    assert report["per_device"]["dev-a"]["bytes"] == 64
    assert report["per_device"]["dev-b"]["rejected_by_reason"] == {"norm": 1}
    assert [r["accuracy"] for r in report["versions"]] == [None, 0.75]


def test_the_reader_sees_a_running_coordinators_commits(tmp_path: Path):
    _store_with_a_run(tmp_path / "state.db")
    writer = Store(tmp_path / "state.db")  # as a running coordinator holds it: a WAL exists
    writer.commit([Verdict("u3", "dev-c", b"12345678", 1, True, None, "", 1, 0, 50)], {})
    wal = tmp_path / "state.db-wal"
    assert wal.exists()
    before = {name: (tmp_path / name).read_bytes() for name in ("state.db", "state.db-wal")}
    report = report_for_run(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert report["per_device"]["dev-c"]["bytes"] == 50
    writer.close()


def test_a_store_without_sizes_reads_as_unknown(tmp_path: Path):
    _store_with_a_run(tmp_path / "state.db")
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("ALTER TABLE verdicts DROP COLUMN size")  # as an older fedbus wrote it
    db.close()
    assert report_for_run(tmp_path)["per_device"]["dev-a"]["bytes"] is None


def test_no_run_is_one_clear_error(tmp_path: Path):
    with pytest.raises(StateError, match="no such directory"):
        report_for_run(tmp_path / "missing")
    with pytest.raises(StateError, match="holds no run"):
        report_for_run(tmp_path)
    (tmp_path / "state.db").write_bytes(b"not a database at all, not at all" * 10)
    with pytest.raises(StateError, match="not a readable fedbus state database"):
        report_for_run(tmp_path)
