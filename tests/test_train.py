"""Local training and evaluation, without a network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_agent.train import TrainResult, evaluate, train_local
from fedbus.datasets import load_digits, train_test_split
from fedbus.messages import TrainSpec
from fedbus.zoo import build_model, get_state

torch.set_num_threads(1)

MLP = {"in_features": 64, "hidden": [64], "num_classes": 10}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits()
    return train_test_split(x, y, 0.2, seed=0)


def _small(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 64), dtype=np.float32), rng.integers(0, 10, n)


def test_qat_mlp_learns_digits(digits: tuple[np.ndarray, ...]) -> None:
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)
    model = build_model("mlp", MLP)
    spec = TrainSpec(epochs=10, batch_size=32, lr=0.05, momentum=0.9, qat=True)
    threads = torch.get_num_threads()
    result = train_local(model, x_train, y_train, spec, seed=0)
    assert torch.get_num_threads() == threads
    assert isinstance(result, TrainResult)
    assert result.num_samples == len(y_train)
    assert result.steps == 10 * math.ceil(len(y_train) / 32)
    assert result.accuracy > 0.95 and 0 < result.loss < 0.3 and result.seconds > 0
    loss, accuracy = evaluate(model, x_test, y_test)
    assert accuracy >= 0.93, accuracy
    assert 0 < loss < 0.5
    assert all(m.qat_enabled for m in model.modules() if hasattr(m, "qat_enabled"))


def test_training_is_reproducible_given_seed() -> None:
    x, y = _small()
    spec = TrainSpec(epochs=2, batch_size=8)
    states = []
    for seed in (3, 3, 4):
        torch.manual_seed(0)
        model = build_model("mlp", MLP)
        train_local(model, x, y, spec, seed=seed)
        states.append(get_state(model))
    assert all(np.array_equal(states[0][k], states[1][k]) for k in states[0])
    assert not np.array_equal(states[0]["fc0.weight"], states[2]["fc0.weight"])


def test_qat_follows_spec_and_ranges_are_observed() -> None:
    x, y = _small()
    model = build_model("mlp", MLP)
    train_local(model, x, y, TrainSpec(epochs=1, qat=False), seed=0)
    assert not any(m.qat_enabled for m in model.modules() if hasattr(m, "qat_enabled"))
    state = get_state(model)
    assert state["q0.act_max"] > 0 and state["input_q.act_max"] > 0.9


def test_should_stop_is_polled_per_batch_and_honoured() -> None:
    x, y = _small(n=40)
    spec = TrainSpec(epochs=2, batch_size=10)
    calls = 0

    def count() -> bool:
        nonlocal calls
        calls += 1
        return False

    result = train_local(build_model("mlp", MLP), x, y, spec, seed=0, should_stop=count)
    assert result.steps == 8 and calls == 8 and not result.stopped

    model = build_model("mlp", MLP)
    before = get_state(model)
    result = train_local(model, x, y, spec, seed=0, should_stop=lambda: True)
    assert result.stopped and result.steps == 0
    assert result.loss == 0.0 and result.accuracy == 0.0
    assert all(np.array_equal(before[k], get_state(model)[k]) for k in before)

    calls = 0

    def stop_on_sixth() -> bool:
        nonlocal calls
        calls += 1
        return calls == 6

    result = train_local(build_model("mlp", MLP), x, y, spec, seed=0, should_stop=stop_on_sixth)
    assert result.stopped and result.steps == 5 and calls == 6
    assert math.isfinite(result.loss) and 0 <= result.accuracy <= 1


def test_trains_image_shaped_input() -> None:
    x, y = _small(n=32)
    model = build_model("cnn", {"in_channels": 1, "height": 8, "width": 8, "num_classes": 10})
    result = train_local(model, x.reshape(-1, 1, 8, 8), y, TrainSpec(batch_size=16), seed=0)
    assert result.steps == 2 and math.isfinite(result.loss)


def test_evaluate_restores_mode_and_freezes_ranges(digits: tuple[np.ndarray, ...]) -> None:
    x_train, y_train, _, _ = digits
    model = build_model("mlp", MLP)
    train_local(model, x_train[:64], y_train[:64], TrainSpec(), seed=0)
    ranges = get_state(model)["q0.act_max"]
    assert model.training
    first = evaluate(model, x_train * 5, y_train, batch_size=100)
    assert model.training
    assert get_state(model)["q0.act_max"] == ranges
    assert evaluate(model, x_train * 5, y_train, batch_size=7) == pytest.approx(first)
    model.eval()
    evaluate(model, x_train[:10], y_train[:10])
    assert not model.training


def test_bad_inputs_are_rejected() -> None:
    x, y = _small()
    model = build_model("mlp", MLP)
    with pytest.raises(ValueError, match="labels must be in \\[0, 9\\]"):
        train_local(model, x, y + 5, TrainSpec(), seed=0)
    with pytest.raises(ValueError, match="labels must be in"):
        evaluate(model, x, y - 1)
    with pytest.raises(ValueError, match="60 samples but y has 59"):
        train_local(model, x, y[:-1], TrainSpec(), seed=0)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="must be positive"):
        train_local(model, x, y, TrainSpec(batch_size=0), seed=0)


def test_divergence_raises() -> None:
    x, y = _small()
    model = build_model("mlp", MLP)
    with torch.no_grad():
        model.head.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="training diverged"):
        train_local(model, x, y, TrainSpec(), seed=0)


def test_pacing_delay_stretches_training_or_fixes_the_period() -> None:
    from edge_agent.agent import pacing_delay

    # no compute time: the training time is stretched slowdown-fold
    assert pacing_delay(0.5, 1.0, 0.0) == 0.0
    assert pacing_delay(0.5, 3.0, 0.0) == pytest.approx(1.0)
    # a compute time: every update takes slowdown x compute_seconds, whatever training took
    assert pacing_delay(0.1, 2.0, 0.5) == pytest.approx(0.9)
    assert pacing_delay(0.3, 2.0, 0.5) == pytest.approx(0.7)
    assert pacing_delay(1.5, 2.0, 0.5) == 0.0  # training alone took longer: no wait


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_compute_seconds_must_be_finite_and_not_negative(value: float, tmp_path) -> None:
    from edge_agent.config import AgentConfig

    with pytest.raises(ValueError, match="compute_seconds"):
        AgentConfig(device_id="dev-a", data=tmp_path / "x.npz", compute_seconds=value)
