"""The device training policy end to end: a real ``fedbus agent`` process, a real Mosquitto
and the coordinator service. A pause file keeps the agent from training (connected, status
``idle``) while the run moves on; removing it makes the agent train on the newest model."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from inmemory import wait_for

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService
from fedbus.broker import LocalBroker
from fedbus.datasets import load_digits, write_npz
from fedbus.envelope import pack, unpack
from fedbus.messages import GlobalModel, Update, new_update_id
from fedbus.processes import Child
from fedbus.transport import ConnectionSettings, Message, MqttClient
from fedbus.update_codec import decode_delta, encode_delta

pytestmark = pytest.mark.broker


class OtherDevice:
    """dev-b: sends the zero updates the test crafts, keeps the models it receives."""

    def __init__(self, broker: LocalBroker) -> None:
        self.topics = broker.topics
        self.models: list[GlobalModel] = []
        self.device = MqttClient(
            ConnectionSettings(host=broker.host, port=broker.port, client_id="dev-b",
                               username="dev-b", password=broker.credentials("dev-b").password),
            on_message=self._on_model)
        self.device.subscribe(self.topics.model)
        self.device.start()
        assert self.device.wait_connected(5), self.device.last_error

    def _on_model(self, msg: Message) -> None:
        self.models.append(GlobalModel.from_wire(unpack(msg.payload, "model")))

    def send_zero_update(self) -> None:
        """A zero change from dev-b on the newest model (FedAsync: one more version)."""
        model = self.models[-1]
        zeros = {k: np.zeros_like(v) for k, v in decode_delta(model.tensors).items()}
        payload = pack(Update(
            update_id=new_update_id(), device_id="dev-b", task_id=model.task_id,
            base_version=model.version, num_samples=10, delta=encode_delta(zeros, "fp32"),
            metrics={}, sent_at=time.time(), run_id=model.run_id,
        ).to_wire())
        assert self.device.publish(self.topics.update("dev-b"), payload, qos=1).wait(5)

    def close(self) -> None:
        self.device.stop()


def _thread_nice_values(pid: int) -> set[int]:
    """The nice value of every thread of process ``pid`` (field 19 of its stat)."""
    values = set()
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        fields = stat.read_text().rsplit(")", 1)[1].split()
        values.add(int(fields[16]))
    return values


def test_a_pause_file_stops_training_and_removing_it_trains_on_the_newest_model(
    broker: LocalBroker, tmp_path: Path
) -> None:
    x, y = load_digits()
    data = tmp_path / "dev-a.npz"
    write_npz(data, x[:200], y[:200])
    pause = tmp_path / "pause"
    pause.touch()
    own = os.getpriority(os.PRIO_PROCESS, 0)
    nice = min(19, own + 3)  # lower than ours: needs no privilege
    service = CoordinatorService(
        CoordinatorConfig(host=broker.host, port=broker.port, prefix=broker.prefix,
                          task_id="t1", mode="fedasync", epochs=1, batch_size=32,
                          state_dir=tmp_path / "run", signing_key=broker.signing_key_file,
                          duration=60.0,
                          model_args='{"in_features": 64, "num_classes": 10, "hidden": [32]}'),
        password=broker.coordinator.password, eval_data=None,
    )
    coordinator = threading.Thread(target=service.run, daemon=True)
    coordinator.start()
    other = OtherDevice(broker)
    agent = Child(
        [sys.executable, "-m", "fedbus", "agent", "--device-id", "dev-a", "--data", str(data),
         "--credentials", str(broker.credentials_file), "--state-dir", str(tmp_path / "a"),
         "--pause-file", str(pause), "--policy-interval", "0.2", "--max-memory-mib", "4000",
         "--max-cpu-share", "0.9", "--nice", str(nice), "--max-updates", "1"],
        log_path=tmp_path / "dev-a.log", name="agent dev-a",
    )
    log = agent.log_path
    try:
        wait_for(lambda: "training paused: pause file" in log.read_text(), 20, "the pause")
        # the run moves on without dev-a: versions 1 and 2, from dev-b
        for version in (1, 2):
            other.send_zero_update()
            wait_for(lambda v=version: other.models and other.models[-1].version == v, 20,
                     f"version {version}")
        time.sleep(0.6)  # three more evaluations of the policy while paused
        assert service.core.counters["updates_accepted"] == 2  # dev-b's only
        assert "trained on" not in log.read_text()
        assert agent.alive and service.core.devices.get("dev-a") == "idle"  # its status
        # --nice lowered the training thread, not the MQTT network thread
        assert {own, nice} <= _thread_nice_values(agent.pid), _thread_nice_values(agent.pid)
        pause.unlink()
        wait_for(lambda: "trained on v" in log.read_text(), 20, "training after the pause")
        assert agent.wait(20) == 0  # --max-updates 1: it exits after its update
        wait_for(lambda: service.core.counters["updates_accepted"] == 3, 10, "dev-a's update")
        text = log.read_text()
        assert "trained on v2" in text and "trained on v0" not in text  # the newest model
        assert text.count("training paused") == 1 and text.count("training resumed") == 1
        assert "Traceback" not in text
        # the rest of the policy was applied too (a high ceiling and a loose cap: no effect)
        assert (f"nice {nice}; at most 0.9 of a core; memory ceiling 4000 MiB (resident memory "
                "now") in text
    except AssertionError:
        print(log.read_text()[-3000:])  # the agent's side, for the failure report
        print(service.core.counters)
        raise
    finally:
        agent.terminate(10)
        other.close()
        service.stop()
        coordinator.join(10)
