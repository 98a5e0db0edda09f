"""The coordinator shell's message loop, without a broker (the client is never started)."""

from __future__ import annotations

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService
from fedbus.transport import Message


def test_drain_dispatches_every_queued_message_across_batches():
    service = CoordinatorService(
        CoordinatorConfig(model_args='{"in_features": 4, "num_classes": 2}'), password="x"
    )
    topic = service.topics.update("dev-a")
    for i in range(2500):  # more than two full batches of 1,000
        service._inbox.put(Message(topic, b"\x00not msgpack %d" % i, False))
    while not service._inbox.empty():
        service._drain(timeout=0.01)
    counters = service.core.counters
    assert counters["updates_received"] == 2500
    assert counters["rejected_malformed"] == 2500
