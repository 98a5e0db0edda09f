"""The operator's run commands (protocol revision 2.5), without a broker: the ``control``
message, the coordinator's decision on it, the core's pause, its durability in the store,
the ``paused`` task state, and how ``fedbus run`` reads the answer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgpack
import pytest
from test_core import TASK, Durable, initial, status, upd

from coordinator.control import (
    MAX_CONTROL_AGE,
    ControlDecision,
    Malformed,
    judge_control,
    operator_answer,
)
from coordinator.core import AggregationConfig, CoordinatorCore, NewModel
from coordinator.journal import PauseChanged
from coordinator.store import PAUSE_FORMAT, Store
from fedbus.envelope import pack, unpack
from fedbus.errors import ProtocolError
from fedbus.messages import Control, Task, Update
from fedbus.transport import ConnectionSettings
from fedbus.update_codec import encode_delta

NOW = 1_800_000_000.0


def command(name: str = "pause", **fields: object) -> bytes:
    wire = {**Control("req-1", name, NOW, "maintenance").to_wire(), **fields}
    return pack(wire)


# -- the message -------------------------------------------------------------------------------


def test_a_control_message_round_trips_and_is_small() -> None:
    sent = Control("req-1", "stop", NOW, "done for today")
    payload = pack(sent.to_wire())
    assert Control.read(payload) == sent
    assert len(payload) < 100
    assert Control.read(pack(Control("r", "pause", NOW).to_wire())).reason is None


@pytest.mark.parametrize(("fields", "match"), [
    ({"command": "reboot"}, "unknown command"),
    ({"command": 1}, "command"),
    ({"id": "no spaces allowed"}, "valid id"),
    ({"ts": float("nan")}, "not finite"),
    ({"ts": True}, "bool"),
    ({"reason": "x" * 201}, "reason"),
    ({"reason": "line\nbreak"}, "reason"),
    ({"kind": "task"}, "control"),
    ({"v": 1}, "protocol version"),
])
def test_a_bad_control_message_is_refused(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        Control.read(command(**fields))


def test_control_decoding_is_bounded() -> None:
    with pytest.raises(ProtocolError) as big:
        Control.read(command(reason="x" * 100, pad=b"\0" * 2000))
    assert big.value.reason == "too_large"
    nested = msgpack.packb({"v": 2, "kind": "control", "id": [1] * 10}, use_bin_type=True)
    with pytest.raises(ProtocolError):
        Control.read(nested)


# -- the coordinator's decision -----------------------------------------------------------------


def judge(payload: bytes, state: str = "running", *, now: float = NOW,
          retained: bool = False) -> ControlDecision | Malformed:
    return judge_control(payload, retained=retained, now=now, state=state)


def test_malformed_and_retained_commands_are_ignored_with_a_reason() -> None:
    assert isinstance(judge(b"\xc1"), Malformed)
    assert "unknown command" in judge(command("reboot")).detail  # type: ignore[union-attr]
    retained = judge(command(), retained=True)
    assert isinstance(retained, Malformed) and "retained" in retained.detail


def test_pause_resume_and_stop_decisions() -> None:
    paused = judge(command("pause"))
    assert isinstance(paused, ControlDecision)
    assert (paused.outcome, paused.change, paused.request_id) == ("done", True, "req-1")
    again = judge(command("pause"), "paused")
    assert isinstance(again, ControlDecision)
    assert (again.outcome, again.change) == ("done", False)  # idempotent
    assert "already" in again.detail
    resumed = judge(command("resume"), "paused")
    assert isinstance(resumed, ControlDecision) and resumed.change
    idle = judge(command("resume"), "running")
    assert isinstance(idle, ControlDecision) and not idle.change and idle.outcome == "done"
    stop = judge(command("stop"), "paused")
    assert isinstance(stop, ControlDecision) and stop.change
    assert stop.end_reason == "stopped by operator: maintenance"
    plain = judge(pack(Control("r2", "stop", NOW).to_wire()))
    assert isinstance(plain, ControlDecision) and plain.end_reason == "stopped by operator"
    assert plain.answer(5.0) == {"id": "r2", "command": "stop", "outcome": "done",
                                 "detail": "the run ends", "ts": 5.0}


def test_stale_commands_and_an_ended_run_are_refused() -> None:
    for now in (NOW + MAX_CONTROL_AGE + 1, NOW - MAX_CONTROL_AGE - 1):
        stale = judge(command(), now=now)
        assert isinstance(stale, ControlDecision)
        assert (stale.outcome, stale.change) == ("refused", False)
        assert "stale" in stale.detail
    fresh = judge(command(), now=NOW + MAX_CONTROL_AGE - 1)
    assert isinstance(fresh, ControlDecision) and fresh.change
    ended = judge(command("resume"), "ended")
    assert isinstance(ended, ControlDecision) and ended.outcome == "refused"


# -- the core -----------------------------------------------------------------------------------


def durable(mode: str = "fedbuff", k: int = 2) -> Durable:
    store = Store(None)
    core = CoordinatorCore(TASK, initial(), AggregationConfig(mode=mode, buffer_size=k,
                                                              norm_multiple=0),
                           ledger=store)
    store.create_run("r1", TASK.to_wire(), 0.0, core.state, core.counters)
    return Durable(core, store)


def test_a_paused_core_judges_and_keeps_updates_but_makes_no_version() -> None:
    c = durable(k=2)
    assert c.pause("maintenance") and not c.pause("twice")
    assert c.paused == "maintenance"
    actions = c.on_update("dev-a", upd("dev-a", 1.0), 0.0)
    actions += c.on_update("dev-b", upd("dev-b", 1.0), 0.0)
    assert [a.receipt.accepted for a in actions] == [True, True]  # type: ignore[union-attr]
    assert c.version == 0 and c.buffered == 2
    assert c.tick(10_000.0) == [] and c.counters["buffer_timeouts"] == 0  # no timeout either
    assert c.on_status("dev-a", status("dev-a", "offline"), 1.0) == []
    made = c.unpause(2.0)
    assert made is not None and [type(a) for a in made] == [NewModel]
    assert c.version == 1 and c.buffered == 0 and c.paused is None
    assert c.unpause(3.0) is None  # not paused


def test_a_paused_fedavg_round_closes_when_the_run_resumes() -> None:
    c = durable(mode="fedavg")
    c.on_status("dev-a", status("dev-a", "online"), 0.0)
    c.pause("p")
    c.on_update("dev-a", upd("dev-a", 1.0), 0.0)
    assert c.version == 0 and c.buffered == 1
    assert c.tick(1e6) == []
    assert [type(a) for a in c.unpause(1.0) or []] == [NewModel]
    assert c.version == 1


def test_the_end_of_a_paused_run_applies_what_waits() -> None:
    c = durable(k=4)
    c.pause("p")
    c.on_update("dev-a", upd("dev-a", 1.0), 0.0)
    assert [type(a) for a in c.flush(1.0)] == [NewModel]
    c.end("stopped by operator")
    assert c.version == 1 and c.paused == "p"  # the pause no longer matters
    assert not c.pause("again") and c.unpause(2.0) is None


def test_a_pause_survives_a_restart_and_raises_the_store_format(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    store.create_run("r1", TASK.to_wire(), 0.0, initial(), {})
    store.commit([PauseChanged(True, "sensor swap")], {})
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == str(
        PAUSE_FORMAT)
    db.close()
    snap = Store(path).load()
    assert snap.paused == "sensor swap" and snap.task["state"] == "paused"
    core = CoordinatorCore.resume(
        TASK, AggregationConfig(), ledger=Store(path), version=snap.version, state=snap.state,
        velocity=None, counters={}, pending=(), round_fixed=None, ended=None, now=0.0,
        paused=snap.paused,
    )
    assert core.paused == "sensor swap"
    store = Store(path)
    store.commit([PauseChanged(False)], {})
    snap = store.load()
    assert snap.paused is None and snap.task["state"] == "running"
    store.close()


def test_a_store_of_an_older_format_reads_as_running(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    store.create_run("r1", TASK.to_wire(), 0.0, initial(), {})
    store.close()
    db = sqlite3.connect(path)
    assert int(db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0]) < (
        PAUSE_FORMAT)
    db.close()
    assert Store(path).load().paused is None


# -- the task and the answer ---------------------------------------------------------------------


def test_a_paused_task_round_trips() -> None:
    paused = Task.from_wire(unpack(pack({**TASK.to_wire(), "state": "paused"}), "task"))
    assert paused.paused and not paused.ended
    assert not TASK.paused


def snapshot(control: dict[str, object] | None, state: str, ended: str | None = None) -> dict:
    return {"run": {"run": "r1", "task": "task1", "version": 3, "state": state,
                    "ended": ended, "control": control}}


def test_the_operator_reads_the_answer_to_its_own_request_only() -> None:
    mine = {"id": "q1", "command": "pause", "outcome": "done", "detail": "paused"}
    assert operator_answer(snapshot(None, "running"), "q1", "pause") is None
    assert operator_answer(snapshot({**mine, "id": "q0"}, "paused"), "q1", "pause") is None
    assert operator_answer(snapshot(mine, "paused"), "q1", "pause") == (
        True, "run r1 of task task1 at version 3 is paused (paused)")
    refused = {**mine, "outcome": "refused", "detail": "the run has ended"}
    done, line = operator_answer(snapshot(refused, "ended"), "q1", "pause") or (None, "")
    assert done is False and "refused to pause" in line and "has ended" in line
    stop = {**mine, "command": "stop", "detail": "the run ends"}
    assert operator_answer(snapshot(stop, "running"), "q1", "stop") is None  # not yet ended
    assert operator_answer(snapshot(stop, "ended", "stopped by operator"), "q1", "stop") == (
        True, "run r1 of task task1 at version 3 has ended: stopped by operator")


# -- the service, on the in-memory broker --------------------------------------------------------


def test_the_service_carries_out_commands_and_a_paused_run_resumes_paused(
    tmp_path: Path,
) -> None:
    import time

    import numpy as np
    from inmemory import TOPICS, Device, Running, wait_for

    from coordinator.fleet_view import read_fleet
    from fedbus.memory_transport import MemoryBroker

    broker = MemoryBroker()
    operator = broker.factory(
        ConnectionSettings("memory", 0, "fedbus-operator", "fedbus-operator", "x"),
        on_message=lambda _m: None)
    operator.start()
    assert operator.wait_connected(5)

    def send(name: str, request: str, **kw: object) -> None:
        wire = {**Control(request, name, time.time()).to_wire(), **kw}
        operator.publish(TOPICS.control, pack(wire))

    def task_state() -> str:
        retained = broker.retained(TOPICS.task)
        assert retained is not None
        return str(unpack(retained, "task")["state"])

    def answered(request: str) -> bool:
        fleet = broker.retained(TOPICS.fleet)
        control = None if fleet is None else read_fleet(fleet)["run"]["control"]
        return control is not None and control["id"] == request

    running = Running(broker, state_dir=tmp_path / "run", buffer_size=1, start="paused")
    try:
        wait_for(lambda: broker.retained(TOPICS.task) is not None, what="the task")
        assert task_state() == "paused"
        device = Device(broker)
        device.online()
        service = running.service
        delta = {name: np.full_like(a, 0.01) for name, a in service.core.state.items()}
        receipt = device.send(pack(Update("u-1", "dev-a", service.task.task_id, 0, 5,
                                          encode_delta(delta, "fp32"),
                                          run_id=service.task.run_id).to_wire()))
        assert receipt.accepted  # judged and kept while paused, never lost
        assert running.service.core.version == 0 and running.service.core.buffered == 1
        operator.publish(TOPICS.control, b"\x93garbage")
        send("pause", "q-1", ts=time.time() - 3600)  # stale: refused
        wait_for(lambda: answered("q-1"), what="the stale command's answer")
        assert running.service.control_ignored == 1 and running.service.core.paused
        send("resume", "q-2")
        wait_for(lambda: answered("q-2") and running.service.core.version == 1,
                 what="the buffered update applied on resume")
        assert task_state() == "running"
        send("pause", "q-3")
        wait_for(lambda: task_state() == "paused", what="the paused task")
    finally:
        summary = running.stop()  # a signal: the run does not end
    assert summary is not None and not summary.run_ended
    again = Running(broker, state_dir=tmp_path / "run", buffer_size=1)
    try:
        assert again.service.core.paused is not None and again.service.task.state == "paused"
        send("stop", "q-4", reason="done")
        summary = again.join()
    finally:
        again.service.stop()
    assert summary is not None and summary.run_ended
    assert summary.stop_reason == "stopped by operator: done"
    assert task_state() == "ended"
    operator.stop()
    broker.close()


def test_a_pause_before_enough_devices_are_online_does_not_publish_the_task() -> None:
    import time

    from inmemory import TOPICS, Running, wait_for

    from fedbus.memory_transport import MemoryBroker

    broker = MemoryBroker()
    operator = broker.factory(
        ConnectionSettings("memory", 0, "fedbus-operator", "fedbus-operator", "x"),
        on_message=lambda _m: None)
    operator.start()
    assert operator.wait_connected(5)
    running = Running(broker, min_devices=1)
    try:
        operator.publish(TOPICS.control, pack(Control("q", "pause", time.time()).to_wire()))
        wait_for(lambda: running.service.core.paused is not None, what="the pause")
        time.sleep(0.3)
        assert broker.retained(TOPICS.task) is None  # still waiting for a device
        assert running.service.task.state == "paused"  # what goes out once one is online
    finally:
        running.stop()
        operator.stop()
        broker.close()
