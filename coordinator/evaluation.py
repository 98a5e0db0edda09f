"""Held-out evaluation of global model versions on the coordinator."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedbus.messages import Task
from fedbus.preprocess import encode_labels

__all__ = ["Evaluator"]


class Evaluator:
    """Evaluates a global state (name -> float32 array) for one task on fixed data: the
    data are shaped, normalised and labelled as the task says, like a device's."""

    def __init__(self, task: Task, x: np.ndarray, y: np.ndarray) -> None:
        from fedbus.errors import ConfigError
        from fedbus.quant import set_qat
        from fedbus.zoo import build_model, fit_inputs, input_shape

        self._model = build_model(task.model.arch, task.model.args)
        # evaluate the model the devices train: train.qat decides, as it does on the device
        set_qat(self._model, task.train.qat)
        try:
            shape = input_shape(task.model.arch, task.model.args)
            x = fit_inputs(x, shape)
            if task.input_norm is not None:  # as every device does (fedbus.preprocess)
                task.input_norm.check_fits(shape)
                x = task.input_norm.apply(x)
            y = encode_labels(y, task.classes)
        except ValueError as exc:
            raise ConfigError(f"evaluation data does not fit task {task.task_id}: {exc}") from None
        self._x = np.ascontiguousarray(x, dtype=np.float32)
        self._y = y

    def evaluate(self, state: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """(mean loss, accuracy) of the model with ``state`` on the held-out data."""
        from edge_agent.train import evaluate
        from fedbus.zoo import set_state

        set_state(self._model, state)
        loss, accuracy = evaluate(self._model, self._x, self._y)
        return float(loss), float(accuracy)
