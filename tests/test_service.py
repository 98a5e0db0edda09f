"""The coordinator shell: message handling, its state directory and its failure paths,
driven through the in-memory broker (fedbus.memory_transport) instead of Mosquitto."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inmemory import ARGS, TOPICS, Device, Running, wait_for

from coordinator.aggregator_spec import DEFAULT_AGGREGATOR
from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService
from fedbus.envelope import pack, unpack
from fedbus.errors import ConnectRefused, ConnectTimeout, StateError
from fedbus.memory_transport import MemoryBroker, MemoryTransport
from fedbus.messages import Task, Update
from fedbus.transport import ConnectionSettings, Message
from fedbus.update_codec import decode_delta, encode_delta


def _service(**overrides: Any) -> CoordinatorService:
    overrides.setdefault("state_dir", None)
    overrides.setdefault("model_args", ARGS)
    config = CoordinatorConfig(**overrides)
    return CoordinatorService(config, password="x")


def _update(service: CoordinatorService, uid: str, device: str = "dev-a", base: int = 0,
            value: float = 0.001, run: str | None = None) -> bytes:
    # not zero: under the default aggregator (quorum) a step waits until K updates agree
    # with their median, and an all-zero update points nowhere
    delta = {name: np.full_like(a, value) for name, a in service.core.state.items()}
    return pack(Update(uid, device, service.task.task_id, base, 5, encode_delta(delta, "fp32"),
                       run_id=run or service.task.run_id).to_wire())


# -- message handling without a transport ----------------------------------------------------


def test_every_message_is_judged_as_it_arrives():
    service = _service(device_share=0.0)  # per-device admission off
    topic = service.topics.update("dev-a")
    for i in range(2500):
        service._on_message(Message(topic, b"\x00not msgpack %d" % i, False))
    counters = service.core.counters
    assert counters["updates_received"] == 2500
    assert counters["rejected_malformed"] == 2500


def test_a_device_over_its_share_is_refused_unjudged_and_another_is_still_judged():
    service = _service(device_share=0.01, device_burst=0.002)
    flood, other = service.topics.update("dev-a"), service.topics.update("dev-b")
    for i in range(500):
        service._on_message(Message(flood, b"\x00not msgpack %d" % i, False))
    judged = service.core.counters["updates_received"]
    counters = service.counters()
    assert 0 < judged < 500
    assert counters["updates_rate_limited"] == 500 - judged
    assert counters["bytes_rate_limited"] > 0
    service._on_message(Message(other, b"\x00not msgpack", False))
    assert service.core.counters["updates_received"] == judged + 1
    # a status message of a device over its share (here: after a message that took 1 s of
    # CPU) is still read, so presence follows the device's Will
    service._admission.charge("dev-a", 1.0, time.monotonic())
    refused = service.counters()["updates_rate_limited"]
    service._on_message(Message(service.topics.status("dev-a"), b"", False))
    assert service.core.counters["status_received"] == 1
    assert service.counters()["updates_rate_limited"] == refused


def test_only_the_newest_of_waiting_versions_is_evaluated():
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
    assert [r.version for r in (service.last_record,)] == [3]
    assert service.last_record is not None and service.last_record.accuracy == 0.9
    assert evaluated == [3]
    service._record_made(timeout=0.01)  # nothing waiting: returns


def test_after_max_versions_updates_are_refused_as_run_ended():
    service = _service(max_versions=1, buffer_size=2)
    topic = service.topics.update("dev-a")
    for i, device in enumerate(("dev-a", "dev-b")):
        service._on_message(Message(service.topics.update(device),
                                    _update(service, f"u-{i}", device), False))
    assert service.core.version == 1 and service._should_stop() == "reached 1 model versions"
    service.core.end("reached 1 model versions")
    service._on_message(Message(topic, _update(service, "u-9", base=1), False))
    assert service.core.counters["rejected_run_ended"] == 1
    assert service.core.counters["updates_accepted"] == 2


def test_a_retained_update_is_refused_and_cleared():
    broker = MemoryBroker()
    service = CoordinatorService(
        CoordinatorConfig(model_args=ARGS, state_dir=None), password="x",
        transport_factory=broker.factory,
    )
    service.client.start()
    assert service.client.wait_connected(5)
    topic = service.topics.update("dev-a")
    service._on_message(Message(topic, _update(service, "u-r"), True))
    assert service.core.counters["rejected_retained"] == 1
    assert broker.retained(topic) is None  # the clear (an empty retained payload) went out
    assert any(p.topic == topic and p.payload == b"" and p.retain for p in broker.published)
    service.client.stop()
    service.close()


# -- with a transport: the running service ----------------------------------------------------


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    b = MemoryBroker()
    yield b
    b.close()


def test_a_refused_login_stops_the_service_with_a_typed_error(broker: MemoryBroker):
    broker.refuse_connects(0x87)
    running = Running(broker, wait=False)
    running.join()
    assert isinstance(running.error, ConnectRefused)
    assert running.error.reason_code == 0x87 and running.error.fatal


def test_connect_timeout_gives_up_with_the_last_cause(broker: MemoryBroker):
    broker.set_down(True)
    started = time.monotonic()
    running = Running(broker, connect_timeout=1.0, wait=False)
    running.join()
    assert isinstance(running.error, ConnectTimeout)
    assert running.error.seconds == 1.0 and running.error.last_error is not None
    assert time.monotonic() - started < 8


def test_the_model_is_republished_after_a_reconnect(broker: MemoryBroker):
    running = Running(broker)
    topic = TOPICS.model
    wait_for(lambda: broker.retained(topic) is not None, what="the retained model")
    before = sum(1 for p in broker.published if p.topic == topic)
    broker.drop("coordinator")
    wait_for(lambda: sum(1 for p in broker.published if p.topic == topic) > before,
             what="the model published again")
    running.stop()


def test_an_unwritable_store_never_acknowledges(broker: MemoryBroker, tmp_path: Path):
    running = Running(broker, state_dir=tmp_path / "run")
    service = running.service
    dev = Device(broker)
    wait_for(lambda: service.client.connected)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    service.store.commit = broken  # type: ignore[method-assign]
    dev.client.publish(TOPICS.update("dev-a"), _update(service, "u-lost"))
    running.join()
    assert isinstance(running.error, StateError) and "disk I/O error" in str(running.error)
    # not acknowledged: the message waits in the coordinator's session for the next start
    assert broker.queued("coordinator") == 1
    resumed = Running(broker, state_dir=tmp_path / "run")
    receipt = dev.receipts.get(timeout=5)
    assert (receipt.update_id, receipt.accepted) == ("u-lost", True)
    resumed.stop()


def test_crash_and_resume_keep_the_run_version_model_and_buffer(
    broker: MemoryBroker, tmp_path: Path
):
    state = tmp_path / "run"
    running = Running(broker, state_dir=state, buffer_size=3)
    service = running.service
    run_id = service.task.run_id
    devs = [Device(broker, d) for d in ("dev-a", "dev-b", "dev-c")]
    for i, dev in enumerate(devs):
        assert dev.send(_update(service, f"a{i}", dev.device, value=0.1 * (i + 1))).accepted
    wait_for(lambda: service.core.version == 1)
    first = devs[0].send(_update(service, "b0", "dev-a", base=1, value=0.5))
    assert first.accepted and first.detail.startswith("buffered 1/")
    model_before = {k: v.copy() for k, v in service.core.state.items()}
    buffer_before = {k: v.copy() for k, v in service.core._buffer._sum.items()}
    # a crash: the connection drops without DISCONNECT and the thread dies with the process
    service.client.abort()
    running.stop()
    resumed = Running(broker, state_dir=state, buffer_size=3)
    again = resumed.service
    assert again.resumed and again.task.run_id == run_id and again.core.version == 1
    for name, value in model_before.items():
        assert again.core.state[name].tobytes() == value.tobytes()
    for name, value in buffer_before.items():
        assert again.core._buffer._sum[name].tobytes() == value.tobytes()
    # the accepted update sent again (an outbox re-send) gets its verdict again, once
    repeat = devs[0].send(_update(service, "b0", "dev-a", base=1, value=0.5))
    assert (repeat.accepted, repeat.repeat) == (True, True)
    assert again.core.buffered == 1
    # a retrained copy of the same work is refused
    assert devs[0].send(_update(service, "b0-again", "dev-a", base=1)).reason == "duplicate_work"
    # updates of the old run and future versions are refused with a reason
    assert devs[1].send(_update(service, "x", "dev-b", base=1, run="oldrun")).reason == "wrong_run"
    resumed.stop()


def test_a_state_directory_of_another_task_or_an_ended_run_is_refused(
    broker: MemoryBroker, tmp_path: Path
):
    state = tmp_path / "run"
    running = Running(broker, state_dir=state, max_versions=1, buffer_size=1)
    dev = Device(broker)
    assert dev.send(_update(running.service, "u1")).accepted
    summary = running.join()
    assert summary is not None and summary.run_ended and summary.final_version == 1
    ended = Task.from_wire(unpack(broker.retained(TOPICS.task) or b"", "task"))
    assert ended.ended and ended.end_reason == "reached 1 model versions"
    with pytest.raises(StateError, match="has ended"):
        _service(state_dir=state)
    other = tmp_path / "other"
    _service(state_dir=other).close()
    with pytest.raises(StateError, match="another task"):
        _service(state_dir=other, task_id="other-task")
    with pytest.raises(StateError, match="another task"):
        _service(state_dir=other, model_args='{"in_features": 4, "num_classes": 3}')
    _service(state_dir=other, lr=0.01).close()  # training settings may change on resume
    new = CoordinatorService(
        CoordinatorConfig(model_args=ARGS, state_dir=state), password="x", new_run=True
    )
    assert new.task.run_id != ended.run_id and new.core.version == 0
    assert (state / "runs" / ended.run_id / "state.db").exists()
    new.close()


def test_the_aggregator_is_part_of_the_run(broker: MemoryBroker, tmp_path: Path):
    state = tmp_path / "run"
    running = Running(broker, state_dir=state, buffer_size=3, aggregator="median+clip:50")
    service = running.service
    devs = [Device(broker, d) for d in ("dev-a", "dev-b")]
    for i, dev in enumerate(devs):
        assert dev.send(_update(service, f"a{i}", dev.device, value=0.1 * (i + 1))).accepted
    kept = [{k: v.copy() for k, v in d.items()} for d in service.core._kept or []]
    service.client.abort()  # a crash
    running.stop()
    with pytest.raises(StateError, match=r"aggregated with --aggregator median\+clip:50 "
                       r"\(asked: mean\)"):
        _service(state_dir=state, buffer_size=3, aggregator="mean")
    with pytest.raises(StateError, match="asked: median"):
        _service(state_dir=state, buffer_size=3, aggregator="median")
    # the same aggregator, written another way, resumes the same buffer
    resumed = _service(state_dir=state, buffer_size=3, aggregator="clip:50.0+median")
    assert resumed.resumed and len(resumed.core._kept or []) == 2
    for mine, theirs in zip(kept, resumed.core._kept or [], strict=True):
        for name, value in mine.items():
            assert theirs[name].tobytes() == value.tobytes()
    resumed.close()
    # not asking for one resumes with the run's own
    kept_own = _service(state_dir=state, buffer_size=3)
    assert str(kept_own.core.config.spec) == "median+clip:50" and kept_own.core.buffered == 2
    kept_own.close()


def test_a_run_of_the_old_default_resumes_with_it(tmp_path: Path):
    """A state directory made when the mean was the default (no aggregator recorded) keeps
    the mean when the coordinator is restarted without --aggregator; only asking for
    another aggregator explicitly is refused."""
    state = tmp_path / "run"
    old = _service(state_dir=state, aggregator="mean")
    old.close()
    db = sqlite3.connect(state / "state.db")  # as the earlier fedbus wrote it
    db.execute("DELETE FROM meta WHERE key = 'aggregator'")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'format'")
    db.commit()
    db.close()
    resumed = _service(state_dir=state)
    assert resumed.resumed and str(resumed.core.config.spec) == "mean"
    resumed.close()
    with pytest.raises(StateError, match=r"aggregated with --aggregator mean \(asked: agree\)"):
        _service(state_dir=state, aggregator="agree")
    fresh = _service(state_dir=tmp_path / "new")
    assert str(fresh.core.config.spec) == DEFAULT_AGGREGATOR == "quorum"
    fresh.close()
    # a run started under the previous default (agree) keeps it too
    _service(state_dir=tmp_path / "agree", aggregator="agree").close()
    again = _service(state_dir=tmp_path / "agree")
    assert again.resumed and str(again.core.config.spec) == "agree"
    again.close()


def test_one_coordinator_per_state_directory(tmp_path: Path):
    first = _service(state_dir=tmp_path / "run")
    with pytest.raises(StateError, match="in use"):
        _service(state_dir=tmp_path / "run")
    first.close()
    _service(state_dir=tmp_path / "run").close()


def test_history_is_appended_and_the_model_exported(broker: MemoryBroker, tmp_path: Path):
    state = tmp_path / "run"
    running = Running(broker, state_dir=state, buffer_size=1)
    dev = Device(broker)
    for version in range(3):
        assert dev.send(_update(running.service, f"u{version}", base=version)).accepted
        wait_for(lambda v=version: running.service.core.version == v + 1)
    summary = running.stop()
    assert summary is not None
    assert [r.version for r in summary.history] == [0, 1, 2, 3]
    lines = (state / "history.jsonl").read_text().splitlines()
    assert len(lines) == 4
    with np.load(state / "model.npz") as saved:
        assert int(saved["__version__"]) == 3
    # a received model decodes to the coordinator's state
    received = dev.models[-1]
    decoded = decode_delta(received.tensors)  # type: ignore[arg-type]
    assert received.version == 3 and decoded.keys() == running.service.core.state.keys()


def test_the_best_version_is_exported_and_the_target_must_hold(
    broker: MemoryBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    state = tmp_path / "run"
    # mean: quorum would wait for agreeing updates (these deltas are all zero)
    running = Running(broker, state_dir=state, buffer_size=1, aggregator="mean",
                      target_accuracy=0.9, target_hold=2.0)  # margin for a loaded machine
    service = running.service
    # v1 spikes to the target and falls back; v3 reaches it and v4 stays there
    accuracy = {1: 0.95, 2: 0.5, 3: 0.92, 4: 0.91}

    class Evaluator:
        def evaluate(self, _state: dict) -> tuple[float, float]:
            return 0.1, accuracy.get(service.core.version, 0.1)  # one version at a time

    service.evaluator = Evaluator()  # type: ignore[assignment]
    dev = Device(broker)

    def version(v: int) -> None:
        assert dev.send(_update(service, f"u{v}", base=v - 1)).accepted
        # exported (the history line comes after the models): versions 0 to v
        wait_for(lambda: (state / "history.jsonl").exists()
                 and len((state / "history.jsonl").read_text().splitlines()) == v + 1)

    with caplog.at_level("INFO", logger="coordinator.service"):
        version(1)
        with np.load(state / "model_best.npz") as best:
            assert int(best["__version__"]) == 1 and float(best["__accuracy__"]) == 0.95
        version(2)
        time.sleep(2.3)  # v1's seconds pass: only v2, below the target, was evaluated
        assert running.thread.is_alive()
        assert "reached accuracy 0.950 (v1): target 0.9 not held: only 0% of 1 version" in (
            caplog.text)
        version(3)
        version(4)
        summary = running.join(timeout=5)
    assert summary is not None and summary.stop_reason == (
        "reached accuracy 0.920 (v3): target 0.9 held by 100% of 1 version over 2 s")
    assert (summary.final_version, summary.final_accuracy) == (4, 0.91)
    assert (summary.best_version, summary.best_accuracy) == (1, 0.95)
    with np.load(state / "model_best.npz") as best, np.load(state / "model.npz") as last:
        assert int(best["__version__"]) == 1 and int(last["__version__"]) == 4
        assert best.keys() - last.keys() == {"__accuracy__"}
    assert sorted(p.name for p in state.glob("*.tmp")) == []


def test_memory_transport_is_a_transport() -> None:
    # the service and the agent accept any factory with MqttClient's signature
    transport = MemoryBroker().factory(
        ConnectionSettings("m", 0, "x", "x", "x"), on_message=lambda m: None
    )
    assert isinstance(transport, MemoryTransport)


def test_a_version_made_by_the_clock_is_stored_before_it_is_published(
    broker: MemoryBroker, tmp_path: Path
):
    running = Running(broker, state_dir=tmp_path / "run", buffer_size=4, buffer_timeout=0.5)
    dev = Device(broker)
    assert dev.send(_update(running.service, "u1")).accepted
    wait_for(lambda: any(m.version == 1 for m in dev.models), what="version 1 by the timeout")
    stored = running.service.store.load()  # the service holds the store: read it as it is
    assert stored.version == 1 and stored.pending == ()
    running.stop()


# -- how large a message the coordinator takes (coordinator.limits) -------------------------


def test_max_update_bytes_follows_the_model_unless_given():
    from coordinator.limits import PACKET_HEADROOM, default_max_update_bytes

    derived = _service()
    shapes = {name: a.shape for name, a in derived.core.state.items()}
    assert derived.task.max_update_bytes == default_max_update_bytes(shapes, 8 << 20)
    assert derived.receive_limit == derived.task.max_update_bytes + PACKET_HEADROOM
    assert derived.client.settings.receive_max_packet_size == derived.receive_limit
    given = _service(max_update_bytes=4 << 20)
    assert given.task.max_update_bytes == 4 << 20
    assert given.receive_limit == (4 << 20) + PACKET_HEADROOM
    with pytest.raises(ValueError, match="max_update_bytes must be at least 1"):
        CoordinatorConfig(max_update_bytes=0)


def test_a_resumed_run_keeps_its_recorded_max_update_bytes(tmp_path: Path):
    state = tmp_path / "run"
    _service(state_dir=state, max_update_bytes=4 << 20).close()  # e.g. the old default
    kept = _service(state_dir=state)
    assert kept.resumed and kept.task.max_update_bytes == 4 << 20
    kept.close()
    _service(state_dir=state, max_update_bytes=123_456).close()  # given: it wins, recorded
    again = _service(state_dir=state)
    assert again.task.max_update_bytes == 123_456
    assert Task.from_wire(again.store.load().task).max_update_bytes == 123_456
    again.close()


def test_a_message_over_the_receive_limit_never_reaches_the_coordinator(broker: MemoryBroker):
    running = Running(broker, buffer_size=1)
    service = running.service
    dev = Device(broker)
    try:
        big = b"\x00" * service.receive_limit  # its packet is over the limit
        dev.client.publish(TOPICS.update("dev-a"), big)
        assert dev.send(_update(service, "u1")).accepted  # the next one is judged
        assert service.core.counters["updates_received"] == 1
    finally:
        running.stop()
