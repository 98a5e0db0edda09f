"""End to end: raw, unscaled tabular data with class names, as a new user brings it.

scikit-learn's breast-cancer table (features from 0.001 to 4,254) with labels 'malignant'
and 'benign', split into device CSV files and an evaluation CSV. The coordinator (CLI)
gives the task the evaluation data's normalisation and class names; `fedbus data check`
passes a device's file and fails a bad one; agents (CLI) train to the target accuracy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

from fedbus.broker import LocalBroker
from fedbus.datasets import train_test_split
from fedbus.processes import Child, ChildGroup
from tests.conftest import TEST_DEVICES

DEVICES = TEST_DEVICES[:2]  # each agent process costs a torch import: two show the point


def _write_csv(path: Path, x: np.ndarray, names: list[str]) -> None:
    rows = [",".join(f"{v:g}" for v in row) + f",{name}" for row, name in zip(x, names,
                                                                              strict=True)]
    header = ",".join(f"f{i}" for i in range(x.shape[1])) + ",label"
    path.write_text("\n".join([header, *rows]) + "\n")


def test_raw_tabular_data_with_class_names_trains_after_a_data_check(
    broker: LocalBroker, tmp_path: Path
) -> None:
    data = load_breast_cancer()
    classes = [str(n) for n in data.target_names]
    x_train, y_train, x_eval, y_eval = train_test_split(data.data, data.target, 0.2, seed=1)
    _write_csv(tmp_path / "eval.csv", x_eval, [classes[i] for i in y_eval])
    files = []
    for k, part in enumerate(np.array_split(np.arange(len(y_train)), len(DEVICES))):
        files.append(tmp_path / f"device-{k}.csv")
        _write_csv(files[-1], x_train[part], [classes[i] for i in y_train[part]])
    bad = tmp_path / "bad.csv"  # a column short, and a label the task does not know
    _write_csv(bad, x_train[:5, :-1], ["benign", "benign", "cyst", "malignant", "benign"])

    group = ChildGroup()
    fedbus = [sys.executable, "-m", "fedbus"]
    try:
        state = tmp_path / "run"
        coordinator = group.add(Child(
            [*fedbus, "coordinator", "--credentials", str(broker.credentials_file),
             "--eval-data", str(tmp_path / "eval.csv"), "--state-dir", str(state),
             "--task-id", "bc", "--lr", "0.05", "--epochs", "2", "--buffer-size", "1",
             "--target-accuracy", "0.9", "--target-hold", "0", "--duration", "60"],
            log_path=tmp_path / "coordinator.log"))
        coordinator.wait_for_file(state / "task.json", 30, "the coordinator's task file")

        for device, path in zip(DEVICES, files, strict=True):
            group.add(Child(
                [*fedbus, "agent", "--device-id", device, "--data", str(path),
                 "--credentials", str(broker.credentials_file), "--on-run-end", "exit",
                 "--state-dir", str(tmp_path / "state" / device)],
                log_path=tmp_path / f"{device}.log"))
        check = subprocess.run(
            [*fedbus, "data", "check", str(files[0]), str(bad), "--task", str(state)],
            capture_output=True, text=True, timeout=60)
        assert check.returncode == 1  # the bad file fails the check
        assert check.stdout.startswith(f"{files[0]}: ")
        assert "input normalisation yes): ok\n" in check.stdout
        lines = check.stderr.strip().splitlines()
        assert lines[0] == (f"error: {bad}: shape: data has samples of shape (29,), the model "
                            "expects (30,) (the task's mlp model)")
        assert lines[1].startswith(f"error: {bad}: labels: label 'cyst' is not one of the "
                                   "task's classes (benign, malignant): 1 sample(s)")
        assert lines[2].startswith(f"{bad}: 5 samples of shape (29,)")
        assert len(lines) == 3 and "Traceback" not in check.stderr
        assert coordinator.wait(90, "the coordinator reaching 0.9") == 0, coordinator.log_tail()
        log = (tmp_path / "coordinator.log").read_text()
        assert "ended (reached accuracy" in log, log[-2000:]
        assert "rejected for its norm" not in log
    finally:
        group.stop_all(10.0)
