"""A model and an update larger than the broker's packet limit, end to end (protocol
revision 2.6): a real Mosquitto with the project's policy and ``max_packet_size 262144``,
the real coordinator service and the real agent. The model (an MLP of 1.1 million
parameters, 4.5 MB as fp32) is published in chunks before the agent connects, so the agent
gets it from the broker's retained chunks like a device that joins late; its fp16 update
(2.2 MB) goes back in chunks, and the coordinator applies it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService, RunSummary
from edge_agent.agent import Agent, AgentStats, LocalData
from edge_agent.config import AgentConfig
from fedbus.broker import LocalBroker
from fedbus.datasets import load_digits

pytestmark = pytest.mark.broker

LIMIT = 256 * 1024


def test_chunked_model_and_update_through_a_256k_broker(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "broker", device_ids=("dev-a",), max_packet_size=LIMIT)
    broker.start()
    agent: Agent | None = None
    service = CoordinatorService(
        CoordinatorConfig(
            host=broker.host, port=broker.port, prefix=broker.prefix, task_id="big",
            model_args='{"in_features": 64, "num_classes": 10, "hidden": [1024, 1024]}',
            epochs=1, batch_size=64, qat=False, codec="fp16", buffer_size=1,
            max_versions=1, duration=60.0, state_dir=tmp_path / "run",
            signing_key=broker.signing_key_file,
        ),
        password=broker.coordinator.password,
    )
    result: dict[str, RunSummary] = {}
    thread = threading.Thread(target=lambda: result.update(summary=service.run()), daemon=True)
    stats: dict[str, AgentStats] = {}
    try:
        thread.start()
        assert service.client.wait_connected(10)
        assert service.client.max_packet_size == LIMIT  # learned from the broker's CONNACK
        x, y = load_digits()
        agent = Agent(
            AgentConfig(device_id="dev-a", data=tmp_path / "unused.npz", host=broker.host,
                        port=broker.port, prefix=broker.prefix, state_dir=tmp_path / "agent",
                        coordinator_key=broker.coordinator_key),
            LocalData(x[:600], y[:600]),
            password=broker.devices["dev-a"].password,
        )
        runner = threading.Thread(target=lambda: stats.update(s=agent.run()), daemon=True)
        runner.start()
        thread.join(45)
        assert not thread.is_alive(), "the coordinator did not apply the update"
        agent.stop()
        runner.join(15)
    finally:
        service.stop()
        if agent is not None:
            agent.stop()
        thread.join(10)
        broker.stop()
    summary = result["summary"]
    counters = summary.counters
    assert summary.final_version == 1, summary.stop_reason
    assert counters["updates_accepted"] == 1 and counters["updates_rejected"] == 0
    assert counters["chunked_updates"] == 1
    assert counters["chunks_received"] >= 9 and counters["chunks_refused"] == 0
    assert counters["chunked_updates_timed_out"] == counters["chunked_updates_dropped"] == 0
    # a model over 16 chunks, every one within the broker's limit
    assert counters["bytes_model_published"] > 4_400_000
    agent_stats = stats["s"]
    assert agent_stats.models_chunked >= 1 and agent_stats.updates_chunked >= 1
    assert agent_stats.updates_refused == agent_stats.model_chunks_refused == 0
    log = (tmp_path / "broker" / "mosquitto.log")
    text = log.read_text() if log.exists() else ""
    assert "oversize" not in text and "too large" not in text.lower()
