"""Compressed updates and a compressed model broadcast through a real Mosquitto.

Real ``fedbus agent`` processes train with a top-k+zstd task against a coordinator that
broadcasts the model as fp16+zstd; their error-feedback residuals land in ``--state-dir``.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService, RunSummary
from edge_agent.state import STATE_FILE, AgentState
from fedbus.broker import LocalBroker
from fedbus.datasets import dirichlet_split, load_digits, train_test_split, write_npz
from fedbus.processes import Child, ChildGroup

pytestmark = pytest.mark.broker


def test_top_k_zstd_updates_and_fp16_zstd_model(broker: LocalBroker, tmp_path: Path) -> None:
    x, y = load_digits()
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, seed=0)
    devices = ("dev-a", "dev-b")
    service = CoordinatorService(
        CoordinatorConfig(
            host=broker.host, port=broker.port, prefix=broker.prefix, task_id="t1",
            epochs=2, batch_size=16, lr=0.05, mode="fedbuff", buffer_size=2, max_versions=8,
            duration=90.0, codec="topk:0.1:int8+zstd", model_codec="fp16+zstd",
            state_dir=tmp_path / "run", signing_key=broker.signing_key_file,
            min_devices=2,  # on a loaded machine one agent could otherwise make every version
        ),
        password=broker.coordinator.password,
        eval_data=(x_test, y_test),
    )
    result: dict[str, RunSummary] = {}
    thread = threading.Thread(target=lambda: result.update(summary=service.run()), daemon=True)
    thread.start()
    agents = ChildGroup()
    try:
        for device, idx in zip(devices, dirichlet_split(y_train, 2, 1.0, seed=0), strict=True):
            data = tmp_path / f"{device}.npz"
            write_npz(data, x_train[idx], y_train[idx])
            agents.add(Child(
                [sys.executable, "-m", "fedbus", "agent", "--device-id", device,
                 "--data", str(data), "--credentials", str(broker.credentials_file),
                 "--state-dir", str(tmp_path / "state" / device)],
                log_path=tmp_path / f"{device}.log", name=f"agent {device}",
            ))
        thread.join(120)
        assert not thread.is_alive(), "coordinator did not finish"
    finally:
        service.stop()
        thread.join(10)
        agents.stop_all(15.0)
    summary = result["summary"]
    counters = summary.counters
    assert summary.final_version == 8
    assert counters["updates_rejected"] == 0
    first, last = summary.history[0].accuracy, summary.history[-1].accuracy
    assert first is not None and last is not None and last > first + 0.3, (first, last)
    # top-k+zstd updates of the ~4.8k-parameter MLP: far below its 19.9 KB as fp32
    per_update = counters["bytes_accepted"] / counters["updates_accepted"]
    assert per_update < 2500, per_update
    # versions 0-8 each broadcast at least once (fp16+zstd: about 9 KB each)
    assert counters["bytes_model_published"] >= 9 * 5000
    for device in devices:
        log = (tmp_path / f"{device}.log").read_text()
        assert "Traceback" not in log and "accepted" in log, log[-2000:]
        state = AgentState(tmp_path / "state" / device / STATE_FILE)
        shapes = {name: a.shape for name, a in service.core.state.items()}
        owed = state.residual(summary.run_id, shapes)
        assert sum(float(np.abs(a).sum()) for a in owed.values()) > 0  # kept for next time
        state.close()
