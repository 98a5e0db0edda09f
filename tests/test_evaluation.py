"""The coordinator evaluates the model the devices train (QAT on or off per the task)."""

from __future__ import annotations

import numpy as np

from coordinator.evaluation import Evaluator
from fedbus.messages import ModelSpec, Task, TrainSpec
from fedbus.quant import QATLinear


def _task(qat: bool) -> Task:
    return Task("t", ModelSpec("mlp", {"in_features": 4, "num_classes": 2, "hidden": [3]}),
                TrainSpec(qat=qat), run_id="r1")


def test_evaluator_follows_the_tasks_qat_switch():
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    y = np.array([0, 1] * 4)
    for qat in (True, False):
        model = Evaluator(_task(qat), x, y)._model
        layers = [m for m in model.modules() if isinstance(m, QATLinear)]
        assert layers and all(m.qat_enabled is qat for m in layers)


def test_evaluation_data_of_the_wrong_size_is_a_config_error():
    import pytest

    from fedbus.errors import ConfigError

    x = np.zeros((4, 5), np.float32)
    with pytest.raises(ConfigError, match="does not fit task t"):
        Evaluator(_task(True), x, np.zeros(4, np.int64))
