"""``fedbus run pause|resume|stop`` end to end (protocol revision 2.5): a real Mosquitto with
the project's policy, the coordinator service started paused, a real ``fedbus agent``
process and the CLI as a subprocess with the operator's credentials. A device may not send
run commands: the broker refuses its PUBLISH."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from inmemory import wait_for

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService, RunSummary
from fedbus.broker import LocalBroker
from fedbus.datasets import load_digits, write_npz
from fedbus.envelope import pack
from fedbus.messages import Control
from fedbus.processes import Child
from fedbus.transport import ConnectionSettings, MqttClient

pytestmark = pytest.mark.broker

NOT_AUTHORIZED = 0x87


def fedbus_run(broker: LocalBroker, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fedbus", "run", *args, "--credentials",
         str(broker.credentials_file), "--timeout", "15"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "FEDBUS_LOG_LEVEL": "warning"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.strip()


def test_pause_resume_and_stop_a_run_from_the_cli(broker: LocalBroker, tmp_path: Path) -> None:
    x, y = load_digits()
    data = tmp_path / "dev-a.npz"
    write_npz(data, x[:200], y[:200])
    service = CoordinatorService(
        CoordinatorConfig(host=broker.host, port=broker.port, prefix=broker.prefix,
                          task_id="t1", mode="fedasync", epochs=1, batch_size=32,
                          state_dir=tmp_path / "run", signing_key=broker.signing_key_file,
                          duration=60.0, start="paused",
                          model_args='{"in_features": 64, "num_classes": 10, "hidden": [16]}'),
        password=broker.coordinator.password, eval_data=None,
    )
    device = MqttClient(ConnectionSettings(
        host=broker.host, port=broker.port, client_id="dev-b", username="dev-b",
        password=broker.credentials("dev-b").password), on_message=lambda _msg: None)
    device.start()
    summary: list[RunSummary] = []
    coordinator = threading.Thread(target=lambda: summary.append(service.run()), daemon=True)
    coordinator.start()
    agent = Child(
        [sys.executable, "-m", "fedbus", "agent", "--device-id", "dev-a", "--data", str(data),
         "--credentials", str(broker.credentials_file), "--state-dir", str(tmp_path / "a"),
         "--on-run-end", "exit"],
        log_path=tmp_path / "dev-a.log", name="agent dev-a",
    )
    log = agent.log_path
    try:
        # started paused: the agent waits, connected and idle
        wait_for(lambda: "is paused by the operator" in log.read_text(), 20, "the pause")
        wait_for(lambda: service.core.devices.get("dev-a") == "idle", 5, "status idle")
        assert service.core.version == 0 and "trained on" not in log.read_text()

        # a device cannot send run commands
        assert device.wait_connected(5), device.last_error
        forged = device.publish(broker.topics.control,
                                pack(Control("forged", "resume", time.time()).to_wire()), qos=1)
        assert not forged.wait(5) and forged.reason_code == NOT_AUTHORIZED
        assert service.core.paused is not None

        line = fedbus_run(broker, "resume")
        assert line.startswith(f"run {service.task.run_id} of task t1") and "running" in line
        wait_for(lambda: service.core.version >= 2, 20, "versions after resuming")

        line = fedbus_run(broker, "pause", "--reason", "sensor swap")
        assert "is paused" in line
        wait_for(lambda: log.read_text().count("is paused by the operator") == 2
                 and service.core.devices.get("dev-a") == "idle", 10, "the agent paused")
        paused_at = service.core.version
        time.sleep(0.6)  # an update already on its way is kept, no version is made
        assert service.core.version == paused_at
        assert service.task.state == "paused"

        assert "is running" in fedbus_run(broker, "resume")
        wait_for(lambda: service.core.version > paused_at, 20, "a version after resuming")

        line = fedbus_run(broker, "stop", "--reason", "end of test")
        assert line.endswith("has ended: stopped by operator: end of test"), line
        assert agent.wait(20) == 0  # --on-run-end exit
        coordinator.join(20)
        assert summary and summary[0].run_ended
        assert summary[0].stop_reason == "stopped by operator: end of test"
        text = log.read_text()
        assert "has ended (stopped by operator: end of test)" in text
        assert text.count("is paused by the operator") == text.count("resumed") == 2  # once each
        assert "Traceback" not in text
    except AssertionError:
        print(log.read_text()[-3000:])
        print(service.core.counters)
        raise
    finally:
        device.stop()
        agent.terminate(10)
        service.stop()
        coordinator.join(10)
