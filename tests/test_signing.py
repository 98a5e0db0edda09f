"""Signed tasks and models (docs/protocol.md section 7.6): the signed bytes, what a verifier
refuses, the keys on disk, the coordinator signing with its state directory's key, and
agents that act only on what the coordinator signed, in isolation and through a real
Mosquitto where a forged retained model gets past the ACL."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from inmemory import Running, wait_for

from coordinator.config import CoordinatorConfig
from coordinator.service import load_signing_key
from edge_agent.agent import Agent, LocalData
from edge_agent.config import AgentConfig
from fedbus.broker import LocalBroker
from fedbus.envelope import pack, unpack
from fedbus.errors import ConfigError
from fedbus.memory_transport import MemoryBroker
from fedbus.messages import GlobalModel, ModelSpec, Task, TrainSpec, Update
from fedbus.signing import (
    SignatureError,
    ensure_private_key,
    key_text,
    load_public_key,
    parse_public_key,
    sign_message,
    signed_bytes,
    split_signature,
    verify_message,
)
from fedbus.topics import Topics
from fedbus.transport import ConnectionSettings, Message, MqttClient
from fedbus.update_codec import encode_delta

# RFC 8032, section 7.1, TEST 1: anyone can check the worked example with it
KEY = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
PUBLIC = KEY.public_key()
TOPICS = Topics()

# docs/protocol.md section 7.6: a model (no tensors, to keep it short) signed with KEY for
# topic fedbus/model
MODEL_BODY = pack(GlobalModel("digits-1", 3, {}, 1767225600.0,
                              run_id="hR5tWq2LmZ8vXc1E").to_wire())
SIGNED_MODEL_VECTOR = bytes.fromhex(
    "88a17602a46b696e64a56d6f64656ca77461736b5f6964a86469676974732d31a372756eb068523574"
    "5771324c6d5a387658633145a776657273696f6e03a774656e736f727380aa637265617465645f6174cb"
    "41da556e40000000a3736967c44099338ae0bed294db25f269246e8d9fcc49e61703f6cc8ac80fcdc7a2"
    "e4f3dd6f60c3e2c5514dc37dc538fa16ff10a7deef0d86ada3de6b4b974c7753c69f3d05"
)


def _task(run: str = "r1", created_at: float = 100.0, **kwargs: Any) -> Task:
    return Task("t1", ModelSpec("mlp", {"in_features": 4, "num_classes": 2, "hidden": [3]}),
                TrainSpec(epochs=1, batch_size=8, qat=False), run_id=run,
                created_at=created_at, **kwargs)


def _model_body(version: int, run: str = "r1") -> bytes:
    from fedbus.zoo import build_model, get_state

    state = get_state(build_model("mlp", {"in_features": 4, "num_classes": 2, "hidden": [3]}))
    return pack(GlobalModel("t1", version, encode_delta(state, "fp32"), 0.0,
                            run_id=run).to_wire())


# -- the signed bytes ---------------------------------------------------------------------


def test_the_worked_example_of_the_protocol_page() -> None:
    payload = sign_message(KEY, "fedbus/model", MODEL_BODY)
    assert payload == SIGNED_MODEL_VECTOR  # Ed25519 is deterministic
    assert payload[:1] == b"\x88" and MODEL_BODY[:1] == b"\x87"  # one entry more
    assert payload[1:len(MODEL_BODY)] == MODEL_BODY[1:]  # then M's entries as they were
    assert payload[len(MODEL_BODY):len(MODEL_BODY) + 6] == bytes.fromhex("a3736967c440")
    signature = payload[-64:]
    PUBLIC.verify(signature, b"fedbus-sig-v1\x00fedbus/model\x00" + MODEL_BODY)
    assert split_signature(payload) == (MODEL_BODY, signature)
    assert key_text(PUBLIC) == "ed25519:11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"


def test_a_signed_message_is_still_an_ordinary_v2_message() -> None:
    """What an agent without signatures gets: `sig` is an unknown key, ignored."""
    task = _task()
    payload = sign_message(KEY, TOPICS.task, pack(task.to_wire()))
    assert Task.from_wire(unpack(payload, "task")) == task
    model = GlobalModel.read(sign_message(KEY, TOPICS.model, MODEL_BODY))
    assert (model.run_id, model.version) == ("hR5tWq2LmZ8vXc1E", 3)


def test_a_signature_holds_only_for_its_topic_and_its_bytes() -> None:
    payload = sign_message(KEY, TOPICS.task, pack(_task().to_wire()))
    verify_message(PUBLIC, TOPICS.task, payload)
    for topic in (TOPICS.model, "lab/trial-7/task"):  # another topic, another trial's prefix
        with pytest.raises(SignatureError) as err:
            verify_message(PUBLIC, topic, payload)
        assert err.value.reason == "invalid"
    # the signature of run r1's task copied onto the same task of run r2
    other = pack(_task(run="r2").to_wire())
    _, signature = split_signature(payload)
    assert signature is not None
    forged = pack({**unpack(other), "sig": signature})
    with pytest.raises(SignatureError, match="invalid"):
        verify_message(PUBLIC, TOPICS.task, forged)
    # signed by another key
    stranger = sign_message(Ed25519PrivateKey.generate(), TOPICS.task, pack(_task().to_wire()))
    with pytest.raises(SignatureError, match="invalid"):
        verify_message(PUBLIC, TOPICS.task, stranger)


def test_every_flipped_byte_is_refused() -> None:
    payload = sign_message(KEY, TOPICS.task, pack(_task().to_wire()))
    for i in range(len(payload)):
        for bit in (0x01, 0x80):
            damaged = bytearray(payload)
            damaged[i] ^= bit
            with pytest.raises(SignatureError):
                verify_message(PUBLIC, TOPICS.task, bytes(damaged))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.builds(
    lambda body, cut, junk: body[:cut] + junk + body[cut:],
    st.just(sign_message(KEY, "fedbus/task", pack({"v": 2, "kind": "task", "run": "r1"}))),
    st.integers(0, 90), st.binary(min_size=1, max_size=8)))
def test_arbitrary_bytes_raise_only_signature_errors(payload: bytes) -> None:
    """What the agent's network thread may meet: nothing but SignatureError escapes."""
    with pytest.raises(SignatureError):
        verify_message(PUBLIC, TOPICS.task, payload)


@pytest.mark.parametrize(("payload", "reason"), [
    (pack(_task().to_wire()), "missing"),
    (pack({**_task().to_wire(), "sig": "not bytes"}), "malformed"),
    (pack({**_task().to_wire(), "sig": bytes(63)}), "malformed"),
    (pack({**_task().to_wire(), "sig": bytes(64)}), "invalid"),
    (pack([1, 2]), "malformed"),
    (b"\xc1", "malformed"),
    (pack(_task().to_wire())[:-3], "malformed"),
    # two sig keys: which one counts would depend on the reader
    (pack(_task().to_wire())[:1].replace(b"\x8b", b"\x8d") + pack(_task().to_wire())[1:]
     + b"\xa3sig\xc4\x40" + bytes(64) + b"\xa3sig\xc4\x40" + bytes(64), "malformed"),
])
def test_what_a_verifier_refuses(payload: bytes, reason: str) -> None:
    with pytest.raises(SignatureError) as err:
        verify_message(PUBLIC, TOPICS.task, payload)
    assert err.value.reason == reason


def test_the_signature_may_sit_anywhere_in_the_map() -> None:
    body = pack({"v": 2, "kind": "task", "run": "r1"})
    signature = KEY.sign(signed_bytes(TOPICS.task, body))
    first = pack({"sig": signature, "v": 2, "kind": "task", "run": "r1"})
    verify_message(PUBLIC, TOPICS.task, first)


# -- keys -----------------------------------------------------------------------------------


def test_public_keys_as_text_and_as_pem(tmp_path: Path) -> None:
    text = key_text(KEY)
    assert key_text(parse_public_key(text)) == text
    pem = PUBLIC.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert key_text(parse_public_key(pem)) == text
    (tmp_path / "k.pem").write_text(pem)
    (tmp_path / "k.pub").write_text(text + "\n")
    for value in (text, str(tmp_path / "k.pem"), str(tmp_path / "k.pub")):
        assert str(load_public_key(value)) == text
    for bad in ("ed25519:short", text + "A", "ssh-ed25519 AAAA"):
        with pytest.raises(ValueError):
            parse_public_key(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_public_key(str(tmp_path / "missing.pub"))
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        load_public_key("ed25519:short")


def test_a_signing_key_is_written_once_private_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "state" / "signing.key"
    key = ensure_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "state" / "signing.pub").read_text() == key_text(key) + "\n"
    other = tmp_path / "other.key"
    ensure_private_key(other)
    assert key_text(ensure_private_key(path, adopt=other)) == key_text(key)  # kept
    adopted = ensure_private_key(tmp_path / "new" / "signing.key", adopt=other)
    assert key_text(adopted) == key_text(ensure_private_key(other))


def test_the_coordinator_keeps_its_state_directory_key(tmp_path: Path) -> None:
    broker_key = tmp_path / "broker" / "coordinator.key"
    ensure_private_key(broker_key)
    config = CoordinatorConfig(state_dir=tmp_path / "run", signing_key=broker_key)
    first = load_signing_key(config)
    assert key_text(first) == key_text(ensure_private_key(broker_key))  # adopted
    assert key_text(load_signing_key(config)) == key_text(first)  # a resume: the same
    # another broker set-up gives devices another key: refused, not silently ignored
    other = tmp_path / "other" / "coordinator.key"
    ensure_private_key(other)
    with pytest.raises(ConfigError, match="devices given that key would ignore"):
        load_signing_key(CoordinatorConfig(state_dir=tmp_path / "run", signing_key=other))
    with pytest.raises(ConfigError, match="cannot read the signing key"):
        load_signing_key(CoordinatorConfig(state_dir=tmp_path / "x",
                                            signing_key=tmp_path / "nope.key"))


def test_the_coordinator_signs_what_it_publishes(tmp_path: Path) -> None:
    broker = MemoryBroker()
    seen: list[Message] = []
    listener = broker.factory(ConnectionSettings("memory", 0, "dev-a", "dev-a", "x"),
                              on_message=seen.append)
    listener.subscribe(TOPICS.task)
    listener.subscribe(TOPICS.model)
    listener.start()
    try:
        coordinator = Running(broker, state_dir=tmp_path / "run", max_versions=0)
        wait_for(lambda: {m.topic for m in seen} == {TOPICS.task, TOPICS.model})
        coordinator.stop()
        key = load_public_key(str(tmp_path / "run" / "signing.pub"))
        for message in seen:
            key.verify(message.topic, message.payload)
    finally:
        listener.stop()
        broker.close()


def test_the_coordinator_restores_its_model_after_someone_else_published_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker()
    coordinator = Running(broker, state_dir=tmp_path / "run", max_versions=0)
    intruder = broker.factory(ConnectionSettings("memory", 0, "dev-b", "dev-b", "x"),
                              on_message=lambda _m: None)
    intruder.start()
    try:
        assert intruder.wait_connected(5)
        key = load_public_key(str(tmp_path / "run" / "signing.pub"))
        wait_for(lambda: coordinator.service._task_published, what="the first publication")
        forged = _model_body(99)
        intruder.publish(TOPICS.model, forged, retain=True).wait(5)
        wait_for(lambda: coordinator.service.counters()["foreign_publications"] == 1,
                 what="the forgery noticed")
        retained: list[Message] = []
        # a device connecting after the restoration gets the coordinator's model again
        wait_for(lambda: _retained_model(broker, retained) is not None
                 and retained[-1].payload != forged, what="the genuine model restored")
        key.verify(TOPICS.model, retained[-1].payload)
        assert "someone else published on fedbus/model (missing signature" in caplog.text
    finally:
        intruder.stop()
        coordinator.stop()
        broker.close()


def _retained_model(broker: MemoryBroker, into: list[Message]) -> Message | None:
    """The retained model as a new subscriber gets it."""
    got: list[Message] = []
    client = broker.factory(ConnectionSettings("memory", 0, "dev-c", "dev-c", "x"),
                            on_message=got.append)
    client.subscribe(TOPICS.model, qos=0)
    client.start()
    try:
        wait_for(lambda: bool(got), what="the retained model")
    finally:
        client.stop()
    into.append(got[0])
    return got[0]


# -- the agent ----------------------------------------------------------------------------


RNG = np.random.default_rng(0)
DATA = LocalData(RNG.normal(size=(40, 4)).astype(np.float32), RNG.integers(0, 2, 40))


def _agent(tmp_path: Path, **settings: Any) -> Agent:
    config = AgentConfig(device_id="dev-a", data=tmp_path / "x.npz", state_dir=tmp_path,
                         **settings)
    return Agent(config, DATA, password="x", transport_factory=MemoryBroker().factory)


def test_an_agent_with_the_key_acts_only_on_what_the_coordinator_signed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = _agent(tmp_path, coordinator_key=key_text(KEY))
    agent._on_message(Message(TOPICS.task, pack(_task().to_wire()), False))
    assert agent._current_task() is None  # unsigned: ignored
    agent._on_message(Message(TOPICS.task, sign_message(KEY, TOPICS.task,
                                                        pack(_task().to_wire())), False))
    assert agent._current_task() == _task()
    # a model signed as a task, an unsigned model, a model signed by someone else
    for payload in (sign_message(KEY, TOPICS.task, _model_body(9)), _model_body(9),
                    sign_message(Ed25519PrivateKey.generate(), TOPICS.model, _model_body(9))):
        agent._on_message(Message(TOPICS.model, payload, True))
    assert agent._model_msg is None
    agent._on_message(Message(TOPICS.model, sign_message(KEY, TOPICS.model, _model_body(1)),
                              True))
    assert agent._model_msg is not None and agent._model_msg.version == 1
    assert agent.stats.bad_signatures == 4
    assert caplog.text.count("ignoring a message on fedbus/model") == 3
    # a genuine task of a run that began earlier, published again, is not followed
    old = sign_message(KEY, TOPICS.task, pack(_task(run="r0", created_at=50.0).to_wire()))
    agent._on_message(Message(TOPICS.task, old, True))
    assert agent._current_task() == _task()
    assert "it began before run r1" in caplog.text
    agent.state.close()


def test_a_restarted_agent_does_not_go_back_to_an_older_run(tmp_path: Path) -> None:
    def signed_task(run: str, created_at: float) -> Message:
        task = _task(run=run, created_at=created_at)
        return Message(TOPICS.task, sign_message(KEY, TOPICS.task, pack(task.to_wire())), True)

    agent = _agent(tmp_path, coordinator_key=key_text(KEY))
    agent._on_message(signed_task("r1", 100.0))
    assert agent._current_task() == _task(run="r1")
    agent.state.record_trained("r1", 3, None)
    agent.state.close()
    again = _agent(tmp_path, coordinator_key=key_text(KEY))  # the same device, restarted
    again._on_message(signed_task("r0", 50.0))  # the broker hands it a replayed old task
    assert again._current_task() is None
    assert again.state.last_version("r1") == 3  # nothing of run r1 was forgotten
    again._on_message(signed_task("r2", 200.0))  # a new run
    assert again._current_task() == _task(run="r2", created_at=200.0)
    again.state.close()


def test_an_agent_without_a_key_accepts_unsigned_messages(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent._on_message(Message(TOPICS.task, pack(_task().to_wire()), False))
    assert agent._current_task() == _task()
    agent.state.close()


@pytest.mark.broker
def test_a_forged_retained_model_is_ignored_by_a_real_agent(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """Someone who can write the model topic (here: with the coordinator's password, as an
    ACL mistake would allow) publishes a newer, retained model. Without signatures the
    agent would train on it and then ignore every genuine version below it."""
    genuine = ensure_private_key(broker.signing_key_file)
    updates: list[Update] = []
    writer = MqttClient(
        ConnectionSettings(broker.host, broker.port, "coordinator", "coordinator",
                           broker.coordinator.password),
        on_message=lambda m: updates.append(Update.read(m.payload)),
    )
    writer.subscribe(TOPICS.all_updates, qos=1)
    writer.start()
    assert writer.wait_connected(5)

    def publish(topic: str, payload: bytes) -> None:
        assert writer.publish(topic, payload, qos=1, retain=True).wait(5)

    config = AgentConfig(
        device_id="dev-a", data=tmp_path / "unused.npz", host=broker.host, port=broker.port,
        state_dir=tmp_path / "agent", coordinator_key=broker.coordinator_key,
    )
    agent = Agent(config, DATA, password=broker.credentials("dev-a").password)
    thread = threading.Thread(target=agent.run, daemon=True)
    try:
        publish(TOPICS.task, sign_message(genuine, TOPICS.task, pack(_task().to_wire())))
        publish(TOPICS.model, sign_message(genuine, TOPICS.model, _model_body(0)))
        thread.start()
        wait_for(lambda: [u.base_version for u in updates] == [0], 20, "the update of v0")
        forgeries = [
            _model_body(5),  # unsigned
            sign_message(Ed25519PrivateKey.generate(), TOPICS.model, _model_body(6)),
            sign_message(genuine, TOPICS.task, _model_body(7)),  # the task's signature
        ]
        for payload in forgeries:
            publish(TOPICS.model, payload)
        wait_for(lambda: agent.stats.bad_signatures == 3, 10, "the forgeries to arrive")
        publish(TOPICS.model, sign_message(genuine, TOPICS.model, _model_body(1)))
        wait_for(lambda: len(updates) == 2, 20, "the update of v1")
        time.sleep(0.5)  # nothing else follows
        assert [u.base_version for u in updates] == [0, 1]
        assert agent.stats.bad_signatures == 3
    finally:
        agent.stop()
        thread.join(10)
        writer.stop()
