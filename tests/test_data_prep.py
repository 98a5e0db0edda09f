"""Data on the device: input normalisation, class names, data checks and the stall warning.

Pure parts, no broker: fedbus.preprocess, the task's revision-2.2 fields, fedbus.data_check,
string labels in fedbus.datasets, build_task's choices and coordinator.stall.
"""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.service import build_task
from coordinator.stall import StallDetector
from fedbus.data_check import check_data, load_task_file
from fedbus.datasets import load_local_data
from fedbus.envelope import DecodeLimits, pack, unpack
from fedbus.errors import ConfigError, ProtocolError
from fedbus.messages import ModelSpec, Task, TrainSpec
from fedbus.preprocess import (
    MAX_NORM_LENGTH,
    InputNorm,
    compute_input_norm,
    encode_labels,
    load_input_norm,
)

# --- normalisation ------------------------------------------------------------------------


def test_normalisation_is_mean_and_std_per_feature_and_a_constant_feature_is_left_alone():
    x = np.array([[1.0, 10.0, 5.0], [3.0, 30.0, 5.0]])
    norm = compute_input_norm(x)
    assert norm.mean == (2.0, 20.0, 5.0)
    assert norm.std == (1.0, 10.0, 1.0)  # the constant column: std 1, not 0
    z = norm.apply(x)
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z, [[-1, -1, 0], [1, 1, 0]])


def test_normalisation_of_channels_runs_along_the_first_input_axis():
    # two windows of 2 channels x 2 steps: channel 0 holds 0,2,4,6 (mean 3, std sqrt 5)
    x = np.array([[[0.0, 2.0], [1.0, 1.0]], [[4.0, 6.0], [1.0, 1.0]]])
    norm = compute_input_norm(x)
    assert norm.mean == (3.0, 1.0)
    assert norm.std[0] == pytest.approx(5 ** 0.5) and norm.std[1] == 1.0
    assert norm.apply(x)[1, 0, 1] == pytest.approx(3 / 5 ** 0.5)
    norm.check_fits((2, 2))
    InputNorm((0.0,), (2.0,)).check_fits((2, 2))  # one value applies to every feature
    with pytest.raises(ValueError, match="needs 1 or 3"):
        norm.check_fits((3, 2))


def test_normalisation_bounds_and_file_forms(tmp_path: Path):
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        InputNorm((0.0,), (0.0,))
    with pytest.raises(ValueError, match="more than the 1024"):
        compute_input_norm(np.zeros((2, MAX_NORM_LENGTH + 1)))
    f = tmp_path / "n.json"
    f.write_text(json.dumps({"scale": [0.5, 2.0], "offset": [-1.0, 4.0]}))
    norm = load_input_norm(f)  # x * scale + offset == (x - mean) / std
    assert norm.mean == (2.0, -2.0) and norm.std == (2.0, 0.5)
    np.testing.assert_allclose(norm.apply(np.array([[6.0, 1.0]])), [[2.0, 6.0]])
    f.write_text(json.dumps({"mean": [1], "std": [-1]}))
    with pytest.raises(ConfigError, match=r"n\.json: input normalisation: every std"):
        load_input_norm(f)


# --- labels -------------------------------------------------------------------------------


def test_labels_are_names_with_a_class_list_and_indices_without():
    classes = ("benign", "malignant")
    np.testing.assert_array_equal(
        encode_labels(np.array(["malignant", "benign", "malignant"]), classes), [1, 0, 1])
    # numbers are matched as text: 1.0 is the class named "1"
    np.testing.assert_array_equal(encode_labels(np.array([1.0, 0.0]), ("0", "1")), [1, 0])
    with pytest.raises(ValueError, match=r"label 'cyst' is not one of the task's classes "
                       r"\(benign, malignant\): 2 sample"):
        encode_labels(np.array(["cyst", "benign", "cyst"]), classes)
    with pytest.raises(ValueError, match=r"labels are names .* no class list"):
        encode_labels(np.array(["benign"]), None)
    with pytest.raises(ValueError, match=r"in \[0, 1\] for this model, got 0..2"):
        encode_labels(np.array([0, 2]), None, num_classes=2)


def test_csv_labels_may_be_names_with_or_without_a_header(tmp_path: Path):
    plain = tmp_path / "a.csv"
    plain.write_text("1.5,2,benign\n3,4, malignant\n")
    x, y = load_local_data(plain)
    assert x.tolist() == [[1.5, 2.0], [3.0, 4.0]] and y.tolist() == ["benign", "malignant"]
    headed = tmp_path / "b.csv"
    headed.write_text("label,radius,area\nbenign,1,2\n")
    x, y = load_local_data(headed)
    assert x.tolist() == [[1.0, 2.0]] and y.tolist() == ["benign"]
    numeric = tmp_path / "c.csv"
    numeric.write_text("1,2,0\n3,4,1\n")
    assert load_local_data(numeric)[1].dtype == np.int64
    # a directory mixing both: the numbers become names too
    folder = tmp_path / "dir"
    folder.mkdir()
    for f in (plain, numeric):
        (folder / f.name).write_text(f.read_text())
    assert load_local_data(folder)[1].tolist() == ["benign", "malignant", "0", "1"]
    bad = tmp_path / "d.csv"
    bad.write_text("1,2,benign\n1,x,benign\n")
    with pytest.raises(ConfigError, match="non-numeric value 'x' at line 2, column 2"):
        load_local_data(bad)


# --- the task on the wire (revision 2.2) --------------------------------------------------


def _task(**fields) -> Task:
    return Task(task_id="bc", run_id="r1", model=ModelSpec("mlp", {"in_features": 3,
                                                                     "num_classes": 2}),
                train=TrainSpec(), **fields)


def test_task_carries_classes_normalisation_and_requirements_within_the_agents_limits():
    norm = InputNorm(tuple(float(i) for i in range(MAX_NORM_LENGTH)),
                     tuple(1.0 + i for i in range(MAX_NORM_LENGTH)))
    classes = tuple(f"{i:03d}".ljust(64, "x") for i in range(256))
    task = _task(classes=classes, input_norm=norm, requires=("input_norm",))
    payload = pack(task.to_wire())
    assert len(payload) < 40_000  # the largest allowed, within the agent's 64 KiB
    back = Task.from_wire(unpack(payload, "task", DecodeLimits(64 * 1024, max_bin_len=1024)))
    assert back == task
    plain = _task()
    assert set(plain.to_wire()).isdisjoint({"classes", "input_norm", "requires"})
    wire = plain.to_wire()
    for key, value, why in [("classes", ["a", "a"], "distinct"),
                            ("input_norm", {"mean": [0.0], "std": [0.0]}, "std"),
                            ("input_norm", {"mean": [True], "std": [1.0]}, "array of numbers"),
                            ("requires", ["bad id!"], "requires")]:
        with pytest.raises(ProtocolError, match=why):
            Task.from_wire({**wire, key: value})


# --- fedbus data check rules --------------------------------------------------------------


def test_data_check_reports_each_problem_on_one_line():
    task = _task(classes=("benign", "malignant"))
    raw = np.array([[14.0, 1000.0, 0.1], [20.0, 2500.0, 0.2]], np.float32)
    findings = check_data(raw, np.array(["benign", "malignant"]), task)
    assert [f.level for f in findings] == ["warning"]
    assert "2 of 3 features look unscaled (feature 2 reaches 2485;" in findings[0].message
    findings = check_data(raw[:, :2], np.array(["benign", "lump"]), task)
    assert [f.level for f in findings] == ["error", "error"]
    assert findings[0].message.startswith("shape: data has samples of shape (2,), the model "
                                          "expects (3,)")
    assert "label 'lump' is not one of the task's classes" in findings[1].message
    assert all("\n" not in f.message for f in findings)


def test_data_check_compares_scaled_features_with_the_task_normalisation():
    norm = InputNorm((14.0, 1000.0, 0.1), (3.0, 300.0, 0.05))
    task = _task(input_norm=norm, requires=("input_norm",))
    x = np.array([[11.0, 700.0, 0.05], [17.0, 1300.0, 0.15]], np.float32)
    assert check_data(x, np.array([0, 1]), task) == []
    wrong_units = x * np.array([1.0, 1.0, 100.0], np.float32)  # percent, not a fraction
    (finding,) = check_data(wrong_units, np.array([0, 1]), task)
    assert finding.level == "warning"
    assert "1 of 3 features are far from the expected range (feature 3" in finding.message
    future = replace(task, requires=("input_norm", "tokenizer"))
    assert "requires tokenizer" in check_data(x, np.array([0, 1]), future)[0].message


def test_task_file_reads_what_the_coordinator_writes(tmp_path: Path):
    task = _task(classes=("a", "b"), input_norm=InputNorm((1.0,), (2.0,)),
                 requires=("input_norm",))
    (tmp_path / "task.json").write_text(json.dumps(task.to_wire()))
    assert load_task_file(tmp_path) == task
    (tmp_path / "task.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"task\.json: not a v2 task message"):
        load_task_file(tmp_path / "task.json")


# --- the coordinator's choices ------------------------------------------------------------


def _build(tmp_path: Path, eval_name: str | None, x, y, **settings) -> Task:
    eval_path = None
    if eval_name is not None:
        eval_path = tmp_path / eval_name
        eval_path.write_text("")
    config = CoordinatorConfig(eval_data=eval_path, state_dir=None, **settings)
    return build_task(config, x, y, run_id="r", created_at=0.0)


def test_the_coordinator_normalises_from_a_csv_table_by_default(tmp_path: Path):
    x = np.array([[1.0, 100.0], [3.0, 300.0]], np.float32)
    y = np.array(["no", "yes"])
    task = _build(tmp_path, "eval.csv", x, y)
    assert task.input_norm == InputNorm((2.0, 200.0), (1.0, 100.0))
    assert task.requires == ("input_norm",) and task.classes == ("no", "yes")
    assert task.model.args == {"in_features": 2, "num_classes": 2}
    assert _build(tmp_path, "eval.npz", x, y).input_norm is None  # auto: tables only
    assert _build(tmp_path, "eval.npz", x, y, normalize="eval").input_norm is not None
    assert _build(tmp_path, "eval.csv", x, y, normalize="off").requires == ()
    given = tmp_path / "norm.json"
    given.write_text(json.dumps({"mean": [0, 0], "std": [1, 10]}))
    from_file = _build(tmp_path, None, x, None, normalize=str(given),
                       model_args='{"in_features": 2, "num_classes": 2}')
    assert from_file.input_norm == InputNorm((0, 0), (1, 10))
    with pytest.raises(ConfigError, match=r"3 class names .* num_classes 2"):
        _build(tmp_path, "eval.csv", x, y, classes="a,b,c", model_args='{"num_classes": 2}')
    with pytest.raises(ConfigError, match="--normalize eval needs --eval-data"):
        _build(tmp_path, None, None, None, normalize="eval", model_args='{"in_features": 2}')


# --- the stall warning --------------------------------------------------------------------


def test_stall_warns_once_per_window_when_nothing_is_accepted():
    stall = StallDetector(60.0)
    assert stall.check(1000.0) is None  # nothing seen
    for i, device in enumerate(["d1", "d2", "d3", "d4"]):
        stall.record(10.0 + i, device, False, "norm", "L2 norm 5229 exceeds bound 100")
    assert stall.check(69.9) is None  # the first rejection is not a window old yet
    warning = stall.check(70.0)
    assert warning is not None
    assert warning.startswith("no update accepted for 60 s: every update of 4 devices (4) was "
                              "rejected for its norm (L2 norm 5229 exceeds bound 100): are "
                              "the features scaled?")
    assert "docs/operations.md#a-run-that-stalls" in warning
    assert stall.check(129.9) is None  # at most once per window
    assert stall.check(130.0) is not None
    stall.record(131.0, "d1", True, None)  # progress: quiet again
    assert stall.check(500.0) is None
    stall.record(501.0, "d1", False, "stale")
    stall.record(502.0, "d2", False, "norm")
    mixed = stall.check(561.0)
    assert mixed is not None and "(stale 1, norm 1; last: )" in mixed
    assert StallDetector(0.0).check(1e9) is None


# --- the agent prepares its data as the task says ----------------------------------------


def test_the_agent_normalises_maps_names_and_stands_aside_for_what_it_cannot_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_agent.agent import Agent, LocalData
    from edge_agent.config import AgentConfig
    from fedbus.memory_transport import MemoryBroker

    raw = np.array([[10.0, 1000.0], [30.0, 3000.0]], np.float32)

    def agent(labels: list[str], name: str) -> Agent:
        config = AgentConfig(device_id="dev-a", data=tmp_path / "x.csv",
                             state_dir=tmp_path / name)
        return Agent(config, LocalData(raw, np.array(labels)), password="x",
                     transport_factory=MemoryBroker().factory)

    norm = InputNorm((20.0, 2000.0), (10.0, 1000.0))
    task = Task(task_id="t", run_id="r", model=ModelSpec("mlp", {"in_features": 2,
                                                                   "num_classes": 2}),
                train=TrainSpec(), classes=("benign", "malignant"), input_norm=norm,
                requires=("input_norm",))
    ok = agent(["malignant", "benign"], "ok")
    assert ok._prepare(task)
    np.testing.assert_array_equal(ok._x, [[-1, -1], [1, 1]])
    np.testing.assert_array_equal(ok._y, [1, 0])
    assert "local data:" not in caplog.text

    unknown = agent(["malignant", "cyst"], "unknown")
    assert not unknown._prepare(task)
    assert ("cannot take part in task t: label 'cyst' is not one of the task's classes "
            "(benign, malignant)") in caplog.text

    future = agent(["benign", "benign"], "future")
    assert not future._prepare(replace(task, requires=("input_norm", "tokens")))
    assert "it requires tokens, which this agent does not implement" in caplog.text

    unscaled = agent(["benign", "malignant"], "raw")
    assert unscaled._prepare(replace(task, input_norm=None, requires=()))
    assert "local data: scale: 2 of 2 features look unscaled" in caplog.text


def test_the_normalisation_belongs_to_the_run_and_task_json_shows_it(tmp_path: Path) -> None:
    from coordinator.service import CoordinatorService
    from fedbus.errors import StateError
    from fedbus.memory_transport import MemoryBroker

    eval_csv = tmp_path / "eval.csv"
    eval_csv.write_text("")  # only its name matters to --normalize auto here
    x = np.array([[1.0, 100.0], [3.0, 300.0]], np.float32)
    y = np.array(["no", "yes"])

    def service(**settings) -> CoordinatorService:
        config = CoordinatorConfig(eval_data=eval_csv, state_dir=tmp_path / "run", **settings)
        return CoordinatorService(config, password="x", eval_data=(x, y),
                                  transport_factory=MemoryBroker().factory)

    first = service()
    first.close()
    written = load_task_file(tmp_path / "run")
    assert written.input_norm == InputNorm((2.0, 200.0), (1.0, 100.0))
    assert written.classes == ("no", "yes") and written.run_id == first.task.run_id
    again = service(normalize="off")  # asks for none: the run keeps its own
    again.close()
    assert again.task.input_norm == written.input_norm
    other = tmp_path / "norm.json"
    other.write_text(json.dumps({"mean": [0, 0], "std": [1, 1]}))
    with pytest.raises(StateError, match="it has another input normalisation"):
        service(normalize=str(other))
    config = CoordinatorConfig(eval_data=eval_csv, state_dir=tmp_path / "run",
                               normalize=str(other))
    CoordinatorService(config, password="x", eval_data=(x, y), new_run=True,
                       transport_factory=MemoryBroker().factory).close()
    assert load_task_file(tmp_path / "run").input_norm == InputNorm((0, 0), (1, 1))
    old = tmp_path / "run" / "runs" / first.task.run_id / "task.json"
    assert load_task_file(old).input_norm == written.input_norm  # archived with its run


def test_the_coordinator_logs_the_stall_warning_once_per_window(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from inmemory import Running, wait_for

    from edge_agent.agent import Agent, LocalData
    from edge_agent.config import AgentConfig
    from fedbus.memory_transport import MemoryBroker

    broker = MemoryBroker()
    coordinator = Running(broker, mode="fedasync", max_norm=1e-9, norm_multiple=0.0,
                          stall_window=0.3)  # rejects every update for its norm
    rng = np.random.default_rng(0)
    data = LocalData(rng.normal(size=(20, 4)).astype(np.float32), rng.integers(0, 2, 20))
    config = AgentConfig(device_id="dev-a", data=tmp_path / "x.npz", state_dir=tmp_path / "a",
                         max_updates=1)
    Agent(config, data, password="x", transport_factory=broker.factory).run()
    wait_for(lambda: "no update accepted for" in caplog.text, what="the stall warning")
    coordinator.service.stop()
    coordinator.join()
    broker.close()
    warnings = [r for r in caplog.records if "no update accepted" in r.getMessage()]
    for warning in warnings:
        assert warning.levelname == "WARNING" and warning.name == "coordinator.service"
        assert "every update of 1 device (1) was rejected for its norm" in warning.getMessage()
    assert warnings
    for earlier, later in pairwise(warnings):
        assert later.created - earlier.created >= 0.3  # not more than once per window
