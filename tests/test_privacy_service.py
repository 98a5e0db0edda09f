"""Differential privacy in the coordinator service: epsilon per version in the history and the
summary, the run's mechanism as part of its identity, and the end of a run at its budget
(in-memory broker, real state directory)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from inmemory import TOPICS, Device, Running, wait_for
from test_service import _service, _update

from coordinator.privacy import epsilon_spent, steps_within_budget
from coordinator.report import report_dict
from coordinator.store import DB_FILE, Store
from fedbus.envelope import unpack
from fedbus.errors import StateError
from fedbus.memory_transport import MemoryBroker
from fedbus.messages import Task


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    b = MemoryBroker()
    yield b
    b.close()


def test_epsilon_is_reported_per_version_and_the_mechanism_is_part_of_the_run(
    broker: MemoryBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    state = tmp_path / "run"
    dp = {"dp_noise": 3.0, "dp_clip": 0.5, "dp_delta": 1e-6}
    running = Running(broker, state_dir=state, buffer_size=1, mode="fedasync", **dp)
    dev = Device(broker)
    for version in range(3):
        assert dev.send(_update(running.service, f"u{version}", base=version, value=1.0)).accepted
        wait_for(lambda v=version: running.service.core.version == v + 1)
    summary = running.stop()
    assert summary is not None and summary.privacy is not None
    want = [epsilon_spent(3.0, v, 1e-6) for v in range(4)]
    assert [r.epsilon for r in summary.history] == want
    assert summary.privacy["epsilon"] == want[-1] and summary.privacy["steps"] == 3
    assert summary.privacy["noise_std"] == pytest.approx(1.5)  # sigma C / K, K = 1
    assert summary.counters["updates_clipped"] == 3  # norm of 1.0 everywhere > 0.5
    lines = [json.loads(line) for line in (state / "history.jsonl").read_text().splitlines()]
    assert [line["epsilon"] for line in lines] == want
    assert report_dict(summary)["privacy"]["epsilon"] == want[-1]
    # the key of the noise stays in the state directory: not on the wire, not in the logs
    secret = Store(state / DB_FILE).load().noise_secret
    assert secret is not None and len(secret) == 32
    sent = [m.payload for m in broker.published]
    assert sent and not any(secret in payload or secret.hex().encode() in payload
                            for payload in sent)
    assert secret.hex() not in caplog.text and secret.hex() not in json.dumps(lines)
    # the mechanism is part of the run; delta may change (it only reads the cost)
    with pytest.raises(StateError, match=r"differential privacy gaussian:3\+clip:0.5 "
                       r"\(asked: off\)"):
        _service(state_dir=state, buffer_size=1, mode="fedasync")
    with pytest.raises(StateError, match=r"asked: gaussian:2\+clip:0.5"):
        _service(state_dir=state, buffer_size=1, mode="fedasync", dp_noise=2.0, dp_clip=0.5)
    resumed = _service(state_dir=state, buffer_size=1, mode="fedasync", dp_noise=3.0,
                       dp_clip=0.5)
    assert resumed.resumed and resumed.core.version == 3
    resumed.close()
    plain = tmp_path / "plain"
    _service(state_dir=plain).close()
    with pytest.raises(StateError, match="privacy off"):
        _service(state_dir=plain, **dp)


def test_the_run_ends_when_its_budget_is_spent(broker: MemoryBroker, tmp_path: Path) -> None:
    budget = 4.0
    allowed = steps_within_budget(3.0, 1e-5, budget)
    assert 2 <= allowed <= 10
    running = Running(broker, state_dir=tmp_path / "run", buffer_size=1, mode="fedasync",
                      dp_noise=3.0, dp_clip=1.0, dp_epsilon_budget=budget)
    dev = Device(broker)
    for version in range(allowed):
        assert dev.send(_update(running.service, f"u{version}", base=version)).accepted
    summary = running.join()
    assert summary is not None and summary.run_ended and summary.final_version == allowed
    assert summary.stop_reason.startswith("privacy budget spent: epsilon")
    assert summary.privacy is not None and summary.privacy["epsilon"] <= budget
    ended = Task.from_wire(unpack(broker.retained(TOPICS.task) or b"", "task"))
    assert ended.ended and ended.end_reason == summary.stop_reason
