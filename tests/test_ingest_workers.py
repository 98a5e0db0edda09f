"""Ingest workers (coordinator.ingest_workers, ``--ingest-workers``): the split of
validation between worker and reducer gives the same verdicts, the wire between them, the
arrival order, a real worker process, and one run against a real broker with the
coordinator killed (SIGKILL) mid-stream."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.ingest_workers import (
    IngestPool,
    InOrder,
    WorkerSettings,
    decode_answer,
    encode_answer,
)
from coordinator.journal import Verdict
from coordinator.store import Store
from coordinator.validation import (
    DeltaChecked,
    Rejected,
    Repeated,
    ValidationLimits,
    check_delta,
    payload_digest,
    validate_update,
)
from fedbus.envelope import pack
from fedbus.messages import Update
from fedbus.update_codec import encode_delta

SHAPES = {"w": (4, 3), "b": (3,)}
LIMITS = ValidationLimits(max_update_bytes=4096, max_norm=5.0, max_staleness=2)


def payload(uid: str = "u1", *, base: int = 3, scale: float = 0.1, device: str = "dev-a",
            delta: dict | None = None, codec: str = "int8") -> bytes:
    rng = np.random.default_rng(0)
    values = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}
    encoded = delta if delta is not None else encode_delta(values, codec, rng=rng)
    return pack(Update(uid, device, "task", base, 10, encoded, {}, 1.0, run_id="run").to_wire())


def judge(data: bytes, ledger: Store, prechecked: DeltaChecked | None = None) -> object:
    return validate_update(data, topic_device="dev-a", run_id="run", task_id="task",
                           expected_shapes=SHAPES, current_version=4, limits=LIMITS,
                           ledger=ledger, prechecked=prechecked)


def outcome(result: object) -> tuple:
    if isinstance(result, Rejected):
        return ("rejected", result.reason, result.detail, result.update_id, result.digest)
    if isinstance(result, Repeated):
        return ("repeated", result.verdict.update_id)
    return ("accepted", result.update.update_id, result.norm, result.digest,  # type: ignore
            {k: v.tolist() for k, v in result.delta.items()})  # type: ignore[attr-defined]


CORPUS = {
    "valid": payload(),
    "fp32": payload(codec="fp32"),
    "stale with a corrupt delta": payload(base=0, delta={"w": {"c": "int8", "t": b"x"}}),
    "corrupt delta": payload(delta={"w": {"c": "int8", "t": b"x"}}),
    "wrong shapes": payload(delta=encode_delta({"w": np.zeros((2, 2), np.float32),
                                                "b": np.zeros(3, np.float32)}, "fp32")),
    "non-finite": payload(delta=encode_delta({"w": np.full((4, 3), np.nan, np.float32),
                                              "b": np.zeros(3, np.float32)}, "fp32")),
    "norm too large": payload(scale=10.0, codec="fp32"),
    "future": payload(base=9),
    "device mismatch": payload(device="dev-b"),
    "not msgpack": b"\xc1garbage",
    "too large": b"\x00" * 5000,
    "known id": payload("seen"),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_a_worker_outcome_gives_the_verdict_of_validating_alone(name: str) -> None:
    ledger = Store(None)
    digest = payload_digest(CORPUS["known id"])
    ledger.commit([Verdict("seen", "dev-a", digest, 3, True, None, "buffered", 4, 1)], {})
    data = CORPUS[name]
    alone = judge(data, ledger)
    ahead = check_delta(data, expected_shapes=SHAPES, limits=LIMITS)
    assert outcome(judge(data, ledger, ahead)) == outcome(alone)
    if name in ("not msgpack", "too large"):
        assert ahead is None  # the reducer refuses the envelope itself
    if name == "stale with a corrupt delta":  # the order of the checks holds
        assert isinstance(alone, Rejected) and alone.reason == "stale"
        assert ahead is not None and ahead.reason == "shape"


@pytest.mark.parametrize("name", ["valid", "corrupt delta", "norm too large", "not msgpack"])
def test_an_answer_crosses_the_pipe_unchanged(name: str) -> None:
    checked = check_delta(CORPUS[name], expected_shapes=SHAPES, limits=LIMITS)
    wire = encode_answer(7, 1.5, checked, SHAPES)
    head_len = int.from_bytes(wire[:4], "little")
    head, values = wire[12:12 + head_len], bytearray(wire[12 + head_len:])
    seq, cpu, back = decode_answer(head, values, SHAPES)
    assert (seq, cpu) == (7, 1.5)
    if checked is None:
        assert back is None
        return
    assert back is not None
    assert (back.reason, back.detail, back.digest) == (checked.reason, checked.detail,
                                                        checked.digest)
    assert back.norm == checked.norm or (math.isnan(back.norm) and math.isnan(checked.norm))
    if checked.delta is None:
        assert back.delta is None
    else:
        assert back.delta is not None
        for name_ in SHAPES:
            np.testing.assert_array_equal(back.delta[name_], checked.delta[name_])
            assert back.delta[name_].flags.writeable


def test_an_answer_that_does_not_fit_the_model_is_refused() -> None:
    checked = check_delta(CORPUS["valid"], expected_shapes=SHAPES, limits=LIMITS)
    wire = encode_answer(1, 0.0, checked, SHAPES)
    head_len = int.from_bytes(wire[:4], "little")
    head, values = wire[12:12 + head_len], wire[12 + head_len:]
    with pytest.raises(ValueError, match="shorter"):
        decode_answer(head, values[:-4], SHAPES)
    with pytest.raises(ValueError, match="longer"):
        decode_answer(head, values + b"\0\0\0\0", SHAPES)


def test_in_order_releases_messages_in_arrival_order() -> None:
    order = InOrder()
    a = order.add("a", wait=True)
    order.add("b", wait=False)
    c = order.add("c", wait=True)
    assert order.take(10, timeout=0) == []  # "a" waits for its worker
    order.settle(c, None)
    assert order.take(10, timeout=0) == []
    done = DeltaChecked(None, 0.0, "norm", "x")
    order.settle(a, done)
    order.settle(a, None)  # a second answer changes nothing
    assert order.take(2, timeout=0) == [("a", done), ("b", None)]
    assert order.take(2, timeout=0) == [("c", None)]
    assert order.pending() == 0
    order.close()
    assert order.take(1) == []


def test_in_order_makes_the_network_thread_wait_for_room() -> None:
    order = InOrder()
    for item in "abc":
        order.add(item, wait=False)
    assert not order.wait_room(3, timeout=0.01)  # full: the socket is not read meanwhile
    freed = threading.Timer(0.05, lambda: order.take(2))
    freed.start()
    assert order.wait_room(3, timeout=5)  # the reducer took some
    freed.join()
    assert order.pending() == 1
    order.close()
    assert order.wait_room(0, timeout=0)  # a closed pipeline never blocks


def test_worker_settings_survive_json() -> None:
    settings = WorkerSettings.of(SHAPES, LIMITS)
    assert WorkerSettings.from_json(settings.to_json()) == settings
    assert settings.limits().decode == LIMITS.decode


@pytest.mark.parametrize("value", [-1, 65, 1.5])
def test_a_bad_number_of_workers_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="ingest_workers must be an integer 0-64"):
        CoordinatorConfig(ingest_workers=value)  # type: ignore[arg-type]


def test_a_worker_process_answers_and_its_death_hands_its_work_back() -> None:
    answers: dict[int, DeltaChecked | None] = {}
    got = threading.Condition()

    def on_answer(seq: int, checked: DeltaChecked | None) -> None:
        with got:
            answers[seq] = checked
            got.notify_all()

    pool = IngestPool(1, WorkerSettings.of(SHAPES, LIMITS), on_answer)
    try:
        for seq, name in enumerate(("valid", "norm too large", "not msgpack")):
            assert pool.submit(seq, CORPUS[name])
        with got:
            assert got.wait_for(lambda: len(answers) == 3, 20)
        assert answers[0] is not None and answers[0].delta is not None
        expected = check_delta(CORPUS["valid"], expected_shapes=SHAPES, limits=LIMITS)
        assert expected is not None and expected.delta is not None
        np.testing.assert_array_equal(answers[0].delta["w"], expected.delta["w"])
        assert answers[1] is not None and answers[1].reason == "norm"
        assert answers[2] is None
        assert pool.cpu_seconds() > 0
        worker = pool.workers[0]
        worker.proc.send_signal(signal.SIGSTOP)  # it holds the next one, then dies
        assert pool.submit(3, CORPUS["valid"])
        worker.proc.kill()
        with got:
            assert got.wait_for(lambda: 3 in answers, 20)
        assert answers[3] is None  # handed back: the reducer decodes it itself
        assert pool.live == 0
        assert not pool.submit(4, CORPUS["valid"])
    finally:
        pool.close()
    assert all(w.proc.returncode is not None for w in pool.workers)


def test_a_manual_ack_is_sent_only_on_the_connection_the_message_came_on() -> None:
    from fedbus.transport import ConnectionSettings, MqttClient

    client = MqttClient(ConnectionSettings("127.0.0.1", 1, "c", "c", "p", manual_ack=True),
                        on_message=lambda _m: None)
    sent: list[tuple[int, int]] = []
    client._client.ack = lambda mid, qos: sent.append((mid, qos))  # type: ignore[method-assign]
    client._connected.set()
    first = client._acknowledger(7, 1, client._generation)
    first()
    assert sent == [(7, 1)]
    later = client._acknowledger(8, 1, client._generation)
    client._generation += 1  # a reconnect: the broker sends message 8 again, maybe as 8
    later()
    client._connected.clear()
    client._acknowledger(9, 1, client._generation)()  # no connection: nothing to send on
    assert sent == [(7, 1)]


# -- against a real broker ------------------------------------------------------------------

K, LAG = 3, 5
DEVICES = [f"w{i:02d}" for i in range(K * (LAG + 1))]
N = 60


def _db(state: Path, query: str) -> list[tuple]:
    try:
        db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(query).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []


def _until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _coordinator(creds: Path, state: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedbus", "coordinator", "--credentials", str(creds),
         "--state-dir", str(state), "--ingest-workers", "2", "--task-id", "workers",
         "--model-args", json.dumps({"in_features": 8, "hidden": [16], "num_classes": 3}),
         "--mode", "fedbuff", "--buffer-size", str(K), "--max-staleness", "1000",
         "--max-versions", str(N // K), "--device-share", "0", "--duration", "60"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )


@pytest.mark.broker
@pytest.mark.slow
def test_two_workers_apply_every_update_once_across_a_kill_9(tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt

    from bench.procs import _run_of_task, close_client
    from fedbus.broker import LocalBroker

    broker = LocalBroker(tmp_path / "broker", device_ids=DEVICES)
    broker.start()
    creds = broker.credentials_file
    passwords = json.loads(creds.read_text())["devices"]
    state, log = tmp_path / "state", tmp_path / "coordinator.log"
    first = _coordinator(creds, state, log)
    clients: list[mqtt.Client] = []
    try:
        _until(lambda: b"worker process(es)" in log.read_bytes(), 60, "the workers")
        for device in DEVICES:
            client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                 client_id=device, protocol=mqtt.MQTTv5)
            client.username_pw_set(device, passwords[device]["password"])
            client.connect("127.0.0.1", broker.port, keepalive=30)
            client.loop_start()
            clients.append(client)
        run_id = _run_of_task(clients[0], broker.prefix)
        rng = np.random.default_rng(1)
        shapes = _model_shapes(state)  # the run's model, as it stored it
        encoded = encode_delta({k: (rng.standard_normal(s) * 1e-3).astype(np.float32)
                                for k, s in shapes.items()}, "int8", rng=rng)
        ids = [f"u{i:03d}" for i in range(N)]

        def send(i: int) -> None:
            device = DEVICES[i % len(DEVICES)]
            data = pack(Update(ids[i], device, "workers", max(0, i // K - LAG), 10, encoded,
                               {}, time.time(), run_id=run_id).to_wire())
            clients[i % len(DEVICES)].publish(f"{broker.prefix}/update/{device}", data,
                                              qos=1).wait_for_publish(10)

        for i in range(N // 2):
            send(i)
        _until(lambda: (_db(state, "SELECT COUNT(*) FROM verdicts") or [(0,)])[0][0] >= 6,
               30, "verdicts before the kill")
        workers = [int(p) for p in log.read_text().split("(pids ")[1].split(")")[0]
                   .split(", ")]
        first.send_signal(signal.SIGKILL)  # mid-stream: updates are in the pipeline
        first.wait(10)
        for i in range(N // 2, N):  # queued in the coordinator's session meanwhile
            send(i)
        _until(lambda: not any(_alive(p) for p in workers), 10, "orphaned workers to exit")
        second = _coordinator(creds, state, log)
        try:
            assert second.wait(60) == 0, log.read_text()[-3000:]
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        for client in clients:
            close_client(client)
        broker.stop()
    verdicts = dict(_db(state, "SELECT update_id, accepted FROM verdicts"))
    assert sorted(verdicts) == ids  # none lost
    assert all(verdicts.values()), verdicts  # every one accepted
    applied = _db(state, "SELECT COUNT(*) FROM verdicts WHERE applied_version IS NOT NULL")
    assert applied == [(N,)]
    # each applied once: the versions made count exactly N updates between them
    assert _db(state, "SELECT COUNT(*), SUM(updates) FROM history WHERE version > 0") == [
        (N // K, N)]
    counters = json.loads(_db(state, "SELECT value FROM meta WHERE key = 'counters'")[0][0])
    assert counters["updates_accepted"] == N
    text = log.read_text()
    assert "resuming run" in text


def _model_shapes(state: Path) -> dict[str, tuple[int, ...]]:
    from fedbus.tensor_map import unpack_tensors

    blob = _db(state, "SELECT state FROM model WHERE id = 0")[0][0]
    return {k: tuple(v.shape) for k, v in unpack_tensors(bytes(blob)).items()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped by its dead parent yet) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
