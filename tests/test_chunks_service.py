"""Chunked messages (protocol revision 2.6) in the coordinator service and the agent,
driven through the in-memory broker and direct calls; the real broker is in
test_chunks_e2e.py."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from inmemory import ARGS, Running, wait_for

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService
from edge_agent.agent import Agent, LocalData
from edge_agent.config import AgentConfig
from fedbus import dynsec
from fedbus.broker import ACL_FILE
from fedbus.chunks import ChunkLimits, Reassembler, read_chunk, split
from fedbus.envelope import pack, unpack
from fedbus.memory_transport import MemoryBroker
from fedbus.messages import GlobalModel, Update
from fedbus.signing import verify_message
from fedbus.topics import Topics
from fedbus.transport import Message
from fedbus.update_codec import encode_delta

TOPICS = Topics()


def _service(**overrides: Any) -> CoordinatorService:
    overrides.setdefault("state_dir", None)
    overrides.setdefault("model_args", ARGS)
    return CoordinatorService(CoordinatorConfig(**overrides), password="x")


def _update(service: CoordinatorService, uid: str, device: str = "dev-a") -> bytes:
    delta = {name: np.full_like(a, 0.001) for name, a in service.core.state.items()}
    return pack(Update(uid, device, service.task.task_id, 0, 5, encode_delta(delta, "fp32"),
                       run_id=service.task.run_id).to_wire())


def test_a_chunked_update_is_judged_once_whole_in_any_order_with_duplicates() -> None:
    service = _service(buffer_size=4)
    topic = service.topics.update("dev-a")
    payload = _update(service, "u-1")
    chunks = split(payload, 100, "u-1")
    assert len(chunks) == 7  # the 626-byte fp32 update of the test MLP
    order = [6, 0, 3, 3, 1, 4, 5, 0, 2]  # two duplicates; the last new chunk completes it
    for i in order[:-1]:
        service._on_message(Message(topic, chunks[i], False))
    assert service.core.counters["updates_received"] == 0  # nothing judged while partial
    service._on_message(Message(topic, chunks[order[-1]], False))
    counters = service.counters()
    assert counters["updates_accepted"] == 1 and counters["updates_received"] == 1
    assert counters["chunks_received"] == 9 and counters["chunks_duplicate"] == 2
    assert counters["chunked_updates"] == 1 and service._chunks.reassembler.total_held == 0
    # the same update sent again in chunks (an outbox re-send) is a repeat, never applied twice
    for c in chunks:
        service._on_message(Message(topic, c, False))
    assert service.counters()["updates_repeated"] == 1
    assert service.counters()["updates_accepted"] == 1


def test_bad_chunks_are_refused_with_reasons_and_partials_time_out() -> None:
    service = _service(chunk_timeout=5.0)
    topic = service.topics.update("dev-a")
    chunks = split(_update(service, "u-2"), 100, "u-2")
    service._on_message(Message(topic, chunks[0], False))
    service._on_message(Message(topic, chunks[0][:-1], False))  # truncated: malformed
    other = split(_update(service, "u-3"), 100, "u-2")[1]  # same id, other bytes
    service._on_message(Message(topic, other, False))
    counters = service.counters()
    assert counters["chunks_refused"] == 2 and counters["updates_received"] == 0
    service._chunks.expire(time.monotonic() + 5.0)
    counters = service.counters()
    assert counters["chunked_updates_timed_out"] == 1
    assert service._chunks.reassembler.total_held == 0


def test_partial_updates_count_against_the_device_cap() -> None:
    service = _service(chunk_memory_per_device=500)  # two chunks of ~90 + 128 bytes
    topic = service.topics.update("dev-a")
    chunks = split(_update(service, "u-4"), 100, "u-4")
    for c in chunks[:3]:  # the third chunk takes dev-a over 500 bytes held
        service._on_message(Message(topic, c, False))
    counters = service.counters()
    assert counters["chunks_refused"] == 1 and counters["chunked_updates_dropped"] == 1
    assert service._chunks.reassembler.held("dev-a") == 0
    other = split(_update(service, "u-5", "dev-b"), 100, "u-5")
    service._on_message(Message(service.topics.update("dev-b"), other[0], False))
    assert service._chunks.reassembler.held("dev-b") > 0  # another device is not affected


def test_a_rate_limited_chunk_gets_a_receipt_naming_the_update() -> None:
    broker = MemoryBroker()
    service = CoordinatorService(
        CoordinatorConfig(model_args=ARGS, state_dir=None, device_share=0.01,
                          device_burst=0.001),
        password="x", transport_factory=broker.factory,
    )
    service.client.start()
    assert service.client.wait_connected(5)
    topic = service.topics.update("dev-a")
    service._admission.charge("dev-a", 1.0, time.monotonic())  # over its share
    chunk = split(_update(service, "u-6"), 100, "u-6")[2]
    service._on_message(Message(topic, chunk, False))
    receipts = [unpack(p.payload) for p in broker.published
                if p.topic == service.topics.receipt("dev-a")]
    assert [(r["update_id"], r["reason"]) for r in receipts] == [("u-6", "rate_limited")]
    # a retained chunk is never part of an update: refused and cleared
    service._admission = type(service._admission)(service.config.admission())
    service._on_message(Message(topic, chunk, True))
    assert service.counters()["chunks_refused"] == 1
    assert any(p.topic == topic and p.payload == b"" and p.retain for p in broker.published)
    service.client.stop()
    service.close()


def _reassemble(payloads: list[bytes]) -> bytes:
    r = Reassembler(ChunkLimits(10**8, 10**8, 10**8))
    out = [r.add("c", read_chunk(p, 10**6), 0.0) for p in payloads]
    assert out[-1].payload is not None
    return out[-1].payload


def test_the_model_is_retained_in_chunks_and_stale_chunk_topics_are_cleared() -> None:
    broker = MemoryBroker(max_packet_size=500)  # the task fits, the model does not
    running = Running(broker)
    service = running.service
    wait_for(lambda: broker.retained(TOPICS.model) is not None, what="the model")
    count = read_chunk(broker.retained(TOPICS.model) or b"", 500).count
    assert count >= 2
    retained = [broker.retained(TOPICS.model_chunk(i)) for i in range(count)]
    assert all(p is not None and len(p) <= 500 - 30 for p in retained)
    random.Random(1).shuffle(retained)
    model = _reassemble([p for p in retained if p is not None])
    verify_message(service._signing_key.public_key(), TOPICS.model, model)
    assert GlobalModel.read(model).version == 0
    # a smaller model later (fp16+zstd models vary): the chunk topics beyond it are cleared
    with service._lock:
        service._publish_model_payload(b"\x80" * 3000)  # 10 chunks
        assert broker.retained(TOPICS.model_chunk(9)) is not None
        service._publish_model_payload(b"\x80" * 900)  # 3 chunks
    assert broker.retained(TOPICS.model_chunk(2)) is not None
    assert all(broker.retained(TOPICS.model_chunk(i)) is None for i in range(3, 10))
    service.stop()
    running.join()


def test_the_agent_reassembles_a_chunked_model_and_asks_again_when_one_is_missing(
        tmp_path: Path) -> None:
    agent = Agent(AgentConfig(device_id="dev-a", data=tmp_path / "x.npz", state_dir=tmp_path),
                  LocalData(np.zeros((4, 4), np.float32), np.zeros(4, np.int64)),
                  password="x", transport_factory=MemoryBroker().factory)
    model = pack(GlobalModel("t1", 3, {}, 1.0, run_id="r1").to_wire())
    chunks = split(model, 40, "m-1")
    topics = [TOPICS.model_chunk(i) for i in range(len(chunks))]
    for i in reversed(range(len(chunks))):
        agent._on_message(Message(topics[i], chunks[i], True))
    assert agent._model_msg is not None and agent._model_msg.version == 3
    assert agent.stats.models_chunked == 1
    # a later model whose chunk 1 never comes: given up, and the model topics subscribed
    # to again so the broker sends the retained chunks once more
    agent._model_chunks = Reassembler(ChunkLimits(10**6, 10**6, 10**6, timeout=0.01))
    later = split(pack(GlobalModel("t1", 4, {}, 2.0, run_id="r1").to_wire()), 40, "m-2")
    agent._on_message(Message(topics[0], later[0], False))
    agent._follow_models(True)  # between trainings (revision 2.9): the model topics followed
    subscribed: list[str] = []
    agent.client.subscribe = lambda topic, qos=1, **_: subscribed.append(topic)  # type: ignore[method-assign]
    time.sleep(0.02)
    agent._expire_model_chunks()
    assert agent.stats.model_chunk_timeouts == 1
    assert subscribed == [TOPICS.model_chunks, TOPICS.model]  # not the deltas
    assert agent._model_msg.version == 3
    agent.state.close()


def test_devices_may_read_the_model_chunks_and_write_none() -> None:
    role = dynsec.device_role("lab/t7", "dev-a")
    rows = {(a["acltype"], a["topic"]) for a in role["acls"]}
    assert {("publishClientReceive", "lab/t7/model/chunk/+"),
            ("subscribePattern", "lab/t7/model/chunk/+")} <= rows
    assert not any(kind == "publishClientSend" and "model" in topic for kind, topic in rows)
    lines = [line.split() for line in ACL_FILE.read_text().splitlines()
             if line and not line.startswith("#")]
    assert [w for w in lines if w[-1] == "fedbus/model/chunk/+"] == [
        ["topic", "read", "fedbus/model/chunk/+"], ["pattern", "read", "fedbus/model/chunk/+"]]


def test_device_roles_of_an_older_broker_directory_are_brought_up_to_date() -> None:
    config = dynsec.initial_config("fedbus", admin_password="a", coordinator_password="c",
                                   devices={"dev-a": "d", "dev-b": "e"})
    assert dynsec.with_device_roles(config, "fedbus") is None
    old_role = dynsec.device_role("fedbus", "dev-a")
    old_role["acls"] = [a for a in old_role["acls"] if "chunk" not in a["topic"]]
    older = {**config, "roles": [old_role if r["rolename"] == old_role["rolename"] else r
                                 for r in config["roles"]]}
    updated = dynsec.with_device_roles(older, "fedbus")
    assert updated is not None and updated["clients"] == config["clients"]
    assert updated["roles"] == config["roles"]


def test_partial_updates_survive_a_coordinator_restart(tmp_path: Path) -> None:
    """Every chunk held is durable before its PUBACK: a restarted coordinator resumes the
    partial update instead of losing the chunks the broker will not deliver again."""
    first = _service(state_dir=tmp_path / "run", buffer_size=4)
    topic = first.topics.update("dev-a")
    chunks = split(_update(first, "u-7"), 100, "u-7")
    for c in chunks[:4]:
        first._on_message(Message(topic, c, False))
    first.close()  # stopped as a crash would leave it: those chunks were acknowledged
    broker = MemoryBroker()
    running = Running(broker, state_dir=tmp_path / "run", buffer_size=4)
    service = running.service
    wait_for(lambda: service._chunks.reassembler.held("dev-a") > 0, what="the restore")
    for c in chunks[4:]:
        service._on_message(Message(topic, c, False))
    assert service.counters()["updates_accepted"] == 1
    assert service._chunks.store.load() == []  # judged: its chunks are forgotten
    service.stop()
    running.join()
