"""The coordinator shell's message handling, without a broker (the client is never started)."""

from __future__ import annotations

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService
from fedbus.transport import Message


def _service(**overrides: object) -> CoordinatorService:
    config = CoordinatorConfig(model_args='{"in_features": 4, "num_classes": 2}', **overrides)
    return CoordinatorService(config, password="x")


def test_every_message_is_judged_as_it_arrives():
    service = _service()
    topic = service.topics.update("dev-a")
    for i in range(2500):
        service._on_message(Message(topic, b"\x00not msgpack %d" % i, False))
    counters = service.core.counters
    assert counters["updates_received"] == 2500
    assert counters["rejected_malformed"] == 2500


def test_messages_after_close_are_not_judged():
    service = _service()
    topic = service.topics.update("dev-a")
    service._on_message(Message(topic, b"junk", False))
    service._closed = True
    service._on_message(Message(topic, b"junk", False))
    assert service.core.counters["updates_received"] == 1


def test_only_the_newest_of_waiting_versions_is_evaluated():
    import numpy as np

    from coordinator.service import _Made

    service = _service()
    evaluated: list[int] = []

    class Evaluator:
        def evaluate(self, state: dict) -> tuple[float, float]:
            evaluated.append(int(state["v"][0]))
            return 0.5, 0.9

    service.evaluator = Evaluator()  # type: ignore[assignment]
    for v in (1, 2, 3):
        service._made.put(_Made(v, {"v": np.array([v])}, v * 10, float(v)))
    service._record_made(timeout=0)
    assert [r.version for r in service.history] == [1, 2, 3]
    assert [r.accuracy for r in service.history] == [None, None, 0.9]
    assert evaluated == [3]
    assert [r.updates_accepted for r in service.history] == [10, 20, 30]
    service._record_made(timeout=0.01)  # nothing waiting: returns
    assert len(service.history) == 3


def test_reaching_max_versions_stops_judging_further_updates():
    import numpy as np

    from fedbus.envelope import pack
    from fedbus.messages import Update
    from fedbus.update_codec import encode_delta

    service = _service(max_versions=1, buffer_size=2)
    zero = {name: np.zeros_like(a) for name, a in service.core.state.items()}
    topic = service.topics.update("dev-a")
    for i in range(5):
        payload = pack(
            Update(f"u-{i}", "dev-a", service.task.task_id, 0, 5, encode_delta(zero, "fp32"))
            .to_wire()
        )
        service._on_message(Message(topic, payload, False))
    assert service.core.version == 1
    assert service.core.counters["updates_accepted"] == 2  # the third is never judged
    assert service._should_stop() == "reached 1 model versions"
    made = service._made.get_nowait()
    assert (made.version, made.updates_accepted) == (1, 2)
