"""Held-out evaluation of global model versions on the coordinator."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedbus.messages import Task

__all__ = ["Evaluator"]


class Evaluator:
    """Evaluates a global state (name -> float32 array) for one task on fixed data."""

    def __init__(self, task: Task, x: np.ndarray, y: np.ndarray) -> None:
        from fedbus.quant import set_qat
        from fedbus.zoo import build_model, input_shape

        self._model = build_model(task.model.arch, task.model.args)
        # evaluate the model the devices train: train.qat decides, as it does on the device
        set_qat(self._model, task.train.qat)
        shape = tuple(input_shape(task.model.arch, task.model.args))
        if tuple(x.shape[1:]) != shape:
            x = x.reshape((len(x), *shape))
        self._x = np.ascontiguousarray(x, dtype=np.float32)
        self._y = np.asarray(y, dtype=np.int64)

    def evaluate(self, state: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """(mean loss, accuracy) of the model with ``state`` on the held-out data."""
        from edge_agent.train import evaluate
        from fedbus.zoo import set_state

        set_state(self._model, state)
        loss, accuracy = evaluate(self._model, self._x, self._y)
        return float(loss), float(accuracy)
