"""The edge agent against the real coordinator service on the in-memory broker: its outbox,
its restarts, its residual, the end of a run; and its decisions in isolation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inmemory import TOPICS, Running, wait_for

from edge_agent.agent import Agent, AgentStats, LocalData
from edge_agent.config import AgentConfig
from edge_agent.state import OutboxEntry
from fedbus.envelope import pack, unpack
from fedbus.memory_transport import MemoryBroker
from fedbus.messages import GlobalModel, ModelSpec, Task, TrainSpec, Update
from fedbus.update_codec import decode_update_delta, encode_delta

RNG = np.random.default_rng(0)
DATA = LocalData(RNG.normal(size=(40, 4)).astype(np.float32), RNG.integers(0, 2, 40))


class AgentThread:
    def __init__(self, broker: MemoryBroker, state: Path, device: str = "dev-a",
                 **settings: Any) -> None:
        config = AgentConfig(device_id=device, data=state / "unused.npz", state_dir=state,
                             **settings)
        self.agent = Agent(config, DATA, password="x", transport_factory=broker.factory)
        self.stats: AgentStats | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.stats = self.agent.run()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 30.0) -> AgentStats | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent did not stop"
        assert self.error is None, self.error
        return self.stats

    def stop(self) -> AgentStats | None:
        self.agent.stop()
        return self.join()


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    b = MemoryBroker()
    yield b
    b.close()


def ledger(state: Path) -> dict[str, str]:
    from edge_agent.state import STATE_FILE, AgentState

    store = AgentState(state / STATE_FILE)
    try:
        return {row.update_id: row.fate for row in store.ledger()}
    finally:
        store.close()


def test_every_update_goes_through_the_outbox_and_gets_its_receipt(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    coordinator = Running(broker, mode="fedasync")
    agent = AgentThread(broker, tmp_path / "a", max_updates=3)
    stats = agent.join()
    assert stats is not None and stats.updates_published == 3
    wait_for(lambda: coordinator.service.core.counters["updates_accepted"] == 3)
    coordinator.stop()
    fates = ledger(tmp_path / "a")
    assert len(fates) == 3
    # the last receipt may arrive after the agent stopped: it stays in the outbox then
    assert list(fates.values())[:2] == ["accepted", "accepted"]


def test_a_restarted_agent_resends_its_update_and_never_retrains(
    broker: MemoryBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = Running(broker, mode="fedasync")
    broker.refuse_publishes(TOPICS.receipt("dev-a"))  # the receipt never reaches the device
    first = AgentThread(broker, tmp_path / "a", max_updates=1)
    first.join()
    (uid, fate), = ledger(tmp_path / "a").items()
    assert fate == "pending"  # still in the outbox: it had no receipt
    # the coordinator's receipt was refused by the broker, not merely still on its way
    wait_for(lambda: "broker refused publish to fedbus/receipt/dev-a" in caplog.text,
             what="the receipt refused")
    assert coordinator.service.core.counters["updates_accepted"] == 1
    broker.clear_faults()
    second = AgentThread(broker, tmp_path / "a", max_updates=2)  # the same device, restarted
    second.join()
    wait_for(lambda: ledger(tmp_path / "a")[uid] == "accepted", what="the repeated receipt")
    coordinator.stop()
    from edge_agent.state import STATE_FILE, AgentState

    store = AgentState(tmp_path / "a" / STATE_FILE)
    rows = store.ledger()
    store.close()
    assert [r.base_version for r in rows] == [0, 1, 2]  # version 0 was not trained on again
    counters = coordinator.service.core.counters
    assert counters["updates_repeated"] == 1  # the re-sent copy, answered, not applied
    assert counters["updates_accepted"] == 3 == coordinator.service.core.version


def test_a_rejected_top_k_update_goes_back_into_the_residual(
    broker: MemoryBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_agent.state import STATE_FILE, AgentState

    coordinator = Running(broker, codec="topk:0.2:int8", max_norm=1e-6)  # rejects everything
    broker.refuse_publishes(TOPICS.receipt("dev-a"))
    AgentThread(broker, tmp_path / "a", max_updates=1).join()
    wait_for(lambda: "broker refused publish to fedbus/receipt/dev-a" in caplog.text,
             what="the receipt refused")
    store = AgentState(tmp_path / "a" / STATE_FILE)
    (entry,) = store.outbox()
    shapes = {n: a.shape for n, a in coordinator.service.core.state.items()}
    kept = store.residual(entry.run_id, shapes)
    update = Update.from_wire(unpack(entry.payload, "update"))
    sent = decode_update_delta(update.delta, update.compression, expected_shapes=shapes)
    store.close()
    assert sum(float(np.abs(v).sum()) for v in sent.values()) > 0
    broker.clear_faults()
    again = AgentThread(broker, tmp_path / "a")
    wait_for(lambda: ledger(tmp_path / "a")[update.update_id] == "rejected")
    again.stop()
    store = AgentState(tmp_path / "a" / STATE_FILE)
    back = store.residual(entry.run_id, shapes)
    for name in shapes:  # what was sent and refused is owed again, on top of what was kept
        np.testing.assert_allclose(back[name], kept[name] + sent[name], rtol=0, atol=1e-6)
    store.close()
    coordinator.stop()


def test_agents_stop_when_the_run_ends(broker: MemoryBroker, tmp_path: Path) -> None:
    coordinator = Running(broker, max_versions=2, mode="fedasync")
    agent = AgentThread(broker, tmp_path / "a", on_run_end="exit")
    summary = coordinator.join(30)
    assert summary is not None and summary.run_ended
    stats = agent.join()
    assert stats is not None and stats.updates_published >= 2


def test_an_update_over_the_tasks_limit_is_not_sent(
    broker: MemoryBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over task.max_update_bytes an update would be refused (or, over the coordinator's
    Maximum Packet Size, dropped by the broker without a word): it is logged and skipped."""
    coordinator = Running(broker, mode="fedasync", codec="fp32", max_update_bytes=200)
    agent = AgentThread(broker, tmp_path / "a")
    try:
        wait_for(lambda: "exceeds the task's limit of 200; not sent" in caplog.text)
    finally:
        stats = agent.stop()
        coordinator.stop()
    assert stats is not None and stats.updates_published == 0
    assert not any(p.topic == TOPICS.update("dev-a") for p in broker.published)
    assert coordinator.service.core.counters["updates_received"] == 0


# -- decisions in isolation ---------------------------------------------------------------


def _agent(tmp_path: Path, **settings: Any) -> Agent:
    config = AgentConfig(device_id="dev-a", data=tmp_path / "x.npz", state_dir=tmp_path,
                         **settings)
    return Agent(config, DATA, password="x", transport_factory=MemoryBroker().factory)


def _task(run: str = "r1", **kwargs: Any) -> Task:
    return Task("t1", ModelSpec("mlp", {"in_features": 4, "num_classes": 2, "hidden": [3]}),
                TrainSpec(), run_id=run, **kwargs)


def _model(version: int, run: str = "r1") -> bytes:
    tensors = encode_delta({"w": np.zeros(2, np.float32)}, "fp32")
    return pack(GlobalModel("t1", version, tensors, 0.0, run_id=run).to_wire())


def test_the_agent_keeps_only_the_newest_model_of_a_run(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    for version in (5, 3, 7, 6):
        agent._keep_newest_model(_model(version))
    assert agent._model_msg is not None and agent._model_msg.version == 7
    agent._keep_newest_model(_model(1, run="r2"))  # another run replaces it
    assert agent._model_msg.version == 1 and agent._model_msg.run_id == "r2"


def test_outbox_entries_that_cannot_be_accepted_are_dropped(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    task = _task(max_staleness=2)
    agent._task_bytes = pack(task.to_wire())
    assert agent._current_task() == task
    for base in (1, 4, 5):
        agent.state.record_trained("r1", base, OutboxEntry(f"u{base}", "r1", base, b"x", False))
    agent._keep_newest_model(_model(6))
    agent._drop_unusable(task)
    assert [e.update_id for e in agent.state.outbox()] == ["u4", "u5"]
    assert agent.stats.updates_dropped == 1


def test_the_outbox_is_bounded(tmp_path: Path) -> None:
    agent = _agent(tmp_path, outbox_max_updates=2, outbox_max_bytes=250)
    task = _task()
    for i in range(2):
        agent.state.record_trained("r1", i, OutboxEntry(f"u{i}", "r1", i, bytes(100), False))
    agent._make_room(task, 100)  # a third would exceed both bounds: the oldest goes
    assert [e.update_id for e in agent.state.outbox()] == ["u1"]
    agent._make_room(task, 200)  # 100 + 200 bytes > 250
    assert agent.state.outbox() == []


def test_a_new_run_forgets_the_outbox_of_the_old_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = _agent(tmp_path)
    agent.state.record_trained("old", 3, OutboxEntry("u1", "old", 3, b"x", False))
    agent._task_bytes = pack(_task(run="new").to_wire())
    agent._current_task()
    assert agent.state.outbox() == []
    assert "dropped update u1 of run old" in caplog.text


def test_an_ended_run_the_device_never_joined_does_not_make_it_exit(tmp_path: Path) -> None:
    agent = _agent(tmp_path, on_run_end="exit")
    old = _task(run="old", state="ended", end_reason="reached 5 model versions")
    assert agent._on_run_ended(old) is False  # the broker's leftover task from a past run
    agent.state.record_trained("mine", 3, None)
    assert agent._on_run_ended(_task(run="mine", state="ended")) is True


def test_a_device_credentials_file_needs_only_its_own_account(tmp_path: Path) -> None:
    import json

    from fedbus.credentials import read_credentials

    path = tmp_path / "device.json"
    path.write_text(json.dumps({"host": "h", "port": 1883, "prefix": "fedbus",
                                "devices": {"dev-a": {"username": "dev-a", "password": "p"}}}))
    access = read_credentials(path, "dev-a")
    assert (access.host, access.port, access.password) == ("h", 1883, "p")


def test_a_rate_limited_update_stays_in_the_outbox_and_waits(tmp_path: Path) -> None:
    import time

    from fedbus.messages import Receipt

    agent = _agent(tmp_path)
    task = _task()
    agent._task_bytes = pack(task.to_wire())
    for uid in ("u1", "u2"):
        agent.state.record_trained("r1", 0 if uid == "u1" else 1,
                                   OutboxEntry(uid, "r1", 0 if uid == "u1" else 1, b"x", False))
    before = time.monotonic()
    agent._settle(Receipt("u1", False, "rate_limited", "later", 0, run_id="r1",
                          retry_after=30.0))
    assert [e.update_id for e in agent.state.outbox()] == ["u1", "u2"]  # nothing settled
    assert agent.stats.receipts_rate_limited == 1 and agent.stats.receipts_rejected == 0
    assert "u1" in agent._sends and agent._sends["u1"] is None  # to be sent again
    assert before + 30.0 <= agent._hold_until <= time.monotonic() + 36.0
    agent._resend_due = None  # no reconnect grace running: only the hold stops the pump
    agent._pump(task)
    assert agent._sends == {"u1": None}  # held: nothing was published
    agent._hold_until = 0.0
    agent._pump(task)  # the hold is over: the oldest goes again
    assert agent._sends["u1"] is not None
    # any other rejection settles the update, as before
    agent._settle(Receipt("u2", False, "stale", "old", 0, run_id="r1"))
    assert [e.update_id for e in agent.state.outbox()] == ["u1"]
    assert ledger(tmp_path)["u2"] == "rejected"


def test_the_agent_follows_model_deltas_and_falls_back_to_the_whole_model(
    tmp_path: Path,
) -> None:
    """Revision 2.7, the decisions alone: a delta of the held version + 1 is applied (and the
    whole model unsubscribed); one it cannot apply (a missed version, a digest that does not
    match) subscribes to the whole model again; an old one is ignored."""
    from fedbus.messages import ModelDelta
    from fedbus.model_delta import encode_model_delta, model_digest
    from fedbus.transport import Message

    agent = _agent(tmp_path)
    subscribed: list[str] = []
    agent.client.subscribe = lambda topic, qos=1, **_: subscribed.append(f"+{topic}")  # type: ignore[method-assign]
    agent.client.unsubscribe = lambda topic: subscribed.append(f"-{topic}")  # type: ignore[method-assign]
    agent._follow_models(True)  # between trainings: the deltas, the whole model's topics
    assert subscribed == [f"+{TOPICS.model_delta}", f"+{TOPICS.model_chunks}",
                          f"+{TOPICS.model}"]
    subscribed.clear()
    v0 = {"w": np.array([1.0, 2.0], np.float32), "b": np.zeros(3, np.float32)}
    v1 = {"w": np.array([1.0, 3.0], np.float32), "b": np.array([0, 0.5, 0], np.float32)}
    v2 = {"w": np.array([-0.0, 3.0], np.float32), "b": np.array([0, 0.5, 1], np.float32)}
    model = GlobalModel("t1", 0, encode_delta(v0, "fp16"), run_id="r1")
    agent._on_message(Message(TOPICS.model, pack(model.to_wire()), True))

    def delta(base: dict, new: dict, version: int, sha: bytes | None = None) -> Message:
        d = ModelDelta("t1", version - 1, version, encode_model_delta(base, new),
                       sha or model_digest(new), run_id="r1")
        return Message(TOPICS.model_delta, pack(d.to_wire()), False)

    agent._on_message(delta(v0, v1, 1))
    held = agent._model_msg
    assert held is not None and held.version == 1
    got = decode_update_delta(held.tensors, held.compression)
    assert all(got[k].tobytes() == v1[k].tobytes() for k in v1)  # bit for bit
    # the whole model is left, with its chunk topics (revision 2.6)
    left = [f"-{TOPICS.model}", f"-{TOPICS.model_chunks}"]
    assert subscribed == left and agent.stats.model_deltas_applied == 1
    agent._on_message(delta(v0, v1, 1))  # the retained copy again: nothing happens
    assert agent._model_msg is held and subscribed == left
    agent._on_message(delta(v1, v2, 3))  # version 2 was missed
    assert agent._model_msg is held and subscribed[-1] == f"+{TOPICS.model}"
    agent._on_message(Message(TOPICS.model, pack(
        GlobalModel("t1", 2, encode_delta(v2, "fp32"), run_id="r1").to_wire()), True))
    agent._on_message(delta(v2, v1, 3, sha=model_digest(v2)))  # not what it claims to make
    held = agent._model_msg
    assert held is not None and held.version == 2 and agent.stats.model_deltas_applied == 1
    agent._on_message(delta(v2, v1, 3))
    assert agent._model_msg is not None and agent._model_msg.version == 3
    assert subscribed[-2:] == left and agent.stats.model_deltas_applied == 2


def test_no_model_reaches_the_agent_while_it_trains(broker: MemoryBroker, tmp_path: Path) -> None:
    """Protocol revision 2.9: the model subscription is dropped while training and taken
    again afterwards, so the versions made meanwhile are not delivered; the retained one,
    the newest, comes with the new subscription."""
    from fedbus.transport import ConnectionSettings
    from fedbus.zoo import build_model, get_state

    task = _task()
    state = encode_delta(get_state(build_model(task.model.arch, task.model.args)), "fp32")
    other = broker.factory(ConnectionSettings(host="memory", port=1, client_id="op",
                                              username="op", password="x"),
                           on_message=lambda _m: None)
    other.start()

    def publish_model(version: int) -> None:
        model = GlobalModel(task.task_id, version, state, run_id=task.run_id)
        assert other.publish(TOPICS.model, pack(model.to_wire()), retain=True).wait(5)

    assert other.publish(TOPICS.task, pack(task.to_wire()), retain=True).wait(5)
    publish_model(0)
    agent = AgentThread(broker, tmp_path / "a", max_updates=2, compute_seconds=0.8)
    wait_for(lambda: agent.agent._training, what="the first training")
    for version in range(1, 6):  # five versions while the agent trains on v0
        publish_model(version)
    agent.join()
    other.stop()
    bases = sorted(r.base_version for r in _ledger_rows(tmp_path / "a"))
    assert bases == [0, 5]  # trained on v0, then on the newest, v5
    # v0 and v5 (and v5 again if it came back after the last training, before the agent
    # stopped), none of v1-v4
    assert agent.agent._models_since_connect in (2, 3)


def _ledger_rows(state: Path) -> list[Any]:
    from edge_agent.state import STATE_FILE, AgentState

    store = AgentState(state / STATE_FILE)
    try:
        return store.ledger()
    finally:
        store.close()


def _invited_agent(broker: MemoryBroker, tmp_path: Path) -> tuple[
    Any, bytes, Callable[..., None], Any, AgentThread
]:
    """A by-invitation task and model 0 retained by an operator client, and an agent
    (two updates at most) started on them: (task, fp32 model state, publish, operator
    client, agent)."""
    from fedbus.transport import ConnectionSettings
    from fedbus.zoo import build_model, get_state

    task = _task(by_invitation=True)
    state = encode_delta(get_state(build_model(task.model.arch, task.model.args)), "fp32")
    other = broker.factory(ConnectionSettings(host="memory", port=1, client_id="op",
                                              username="op", password="x"),
                           on_message=lambda _m: None)
    other.start()

    def publish(topic: str, message: Any, retain: bool = False) -> None:
        assert other.publish(topic, pack(message.to_wire()), retain=retain).wait(5)

    publish(TOPICS.task, task, retain=True)
    publish(TOPICS.model, GlobalModel(task.task_id, 0, state, run_id=task.run_id), retain=True)
    agent = AgentThread(broker, tmp_path / "a", max_updates=2)
    return task, state, publish, other, agent


def test_by_invitation_the_agent_trains_once_per_invitation(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    """Protocol revision 2.10: in a run whose task says by_invitation the agent trains only
    when invited, once per invitation, on a model that arrived after it."""
    from fedbus.messages import Invite

    task, state, publish, other, agent = _invited_agent(broker, tmp_path)
    wait_for(lambda: agent.agent._task is not None, what="the task")
    wait_for(lambda: not agent.agent._model_subscribed, what="the model topics dropped")
    assert agent.agent.stats.updates_published == 0  # not invited: no training
    publish(TOPICS.receipt("dev-a"), Invite(0, 1.0, run_id=task.run_id))
    wait_for(lambda: agent.agent.stats.updates_published == 1, what="the invited training")
    publish(TOPICS.model, GlobalModel(task.task_id, 1, state, run_id=task.run_id), retain=True)
    wait_for(lambda: not agent.agent._model_subscribed, what="the model topics dropped again")
    agent.agent._keep_newest_model(pack(GlobalModel(task.task_id, 1, state,
                                                    run_id=task.run_id).to_wire()))
    time.sleep(0.3)  # v1 is held (and the agent woken), but there is no invitation
    assert agent.agent.stats.updates_published == 1 and not agent.agent._training
    publish(TOPICS.receipt("dev-a"), Invite(1, 2.0, run_id=task.run_id))
    stats = agent.join()
    other.stop()
    assert stats is not None and stats.invitations == 2
    assert sorted(r.base_version for r in _ledger_rows(tmp_path / "a")) == [0, 1]


def test_an_invitation_id_is_acted_on_once_and_kept_with_its_update(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    """Protocol revision 2.13: the same invitation sent again (same id) makes no second
    training; the id used is stored with the update and named in the status, so a restarted
    agent still says which invitation it used."""
    from edge_agent.state import STATE_FILE, AgentState
    from fedbus.messages import Invite, Status

    task, state, publish, other, agent = _invited_agent(broker, tmp_path)
    wait_for(lambda: agent.agent._task is not None, what="the task")
    publish(TOPICS.receipt("dev-a"), Invite(0, 1.0, run_id=task.run_id, invite_id="inv1"))
    wait_for(lambda: agent.agent.stats.updates_published == 1, what="the invited training")
    assert Status.read(agent.agent._status("idle")).invite == "inv1"
    publish(TOPICS.model, GlobalModel(task.task_id, 1, state, run_id=task.run_id), retain=True)
    publish(TOPICS.receipt("dev-a"), Invite(0, 2.0, run_id=task.run_id, invite_id="inv1"))
    agent.agent._keep_newest_model(pack(GlobalModel(task.task_id, 1, state,
                                                    run_id=task.run_id).to_wire()))
    time.sleep(0.3)  # v1 is held and inv1 came again: used already, so no training
    assert agent.agent.stats.updates_published == 1 and agent.agent.stats.invitations == 1
    publish(TOPICS.receipt("dev-a"), Invite(1, 3.0, run_id=task.run_id, invite_id="inv2"))
    stats = agent.join()
    other.stop()
    assert stats is not None and stats.invitations == 2
    kept = AgentState(tmp_path / "a" / STATE_FILE)
    try:
        assert kept.invite_used() == "inv2"
    finally:
        kept.close()
