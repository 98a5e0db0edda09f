"""Error feedback for top-k: the residual store and the agent keeping it across restarts."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import msgpack
import numpy as np
import pytest

from edge_agent.residual import RESIDUAL_FILE, ResidualStore, encode_with_feedback
from fedbus.codec_spec import parse_codec
from fedbus.update_codec import decode_update_delta

SHAPES = {"w": (8, 4), "b": (8,), "s": ()}


def residual(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])


def assert_zero(a: dict[str, np.ndarray]) -> None:
    assert {n: v.shape for n, v in a.items()} == SHAPES
    assert all(not v.any() for v in a.values())


# -- the store --------------------------------------------------------------------------


def test_no_file_starts_from_zero(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "edge_agent.residual")
    assert_zero(ResidualStore(tmp_path / "state").load("t1", 1.0, SHAPES))
    assert "no error-feedback residual" in caplog.text


def test_round_trip_and_restart(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path / "state" / "dev-1")  # created on first save
    store.save("t1", 1.5, residual())
    assert (tmp_path / "state" / "dev-1" / RESIDUAL_FILE).is_file()
    assert not list((tmp_path / "state" / "dev-1").glob("*.tmp"))
    assert_same(store.load("t1", 1.5, SHAPES), residual())
    restarted = ResidualStore(tmp_path / "state" / "dev-1")  # a new agent process
    assert_same(restarted.load("t1", 1.5, SHAPES), residual())
    restarted.save("t1", 1.5, residual(1))
    assert_same(ResidualStore(tmp_path / "state" / "dev-1").load("t1", 1.5, SHAPES), residual(1))


def test_the_file_is_plain_arrays(tmp_path: Path) -> None:
    ResidualStore(tmp_path).save("t1", 1.5, residual())
    with np.load(tmp_path / RESIDUAL_FILE, allow_pickle=False) as data:
        assert str(data["task_id"][()]) == "t1"
        assert list(data["names"]) == list(SHAPES)
        np.testing.assert_array_equal(data["t0"], residual()["w"])


@pytest.mark.parametrize(
    "task_id,created_at", [("t2", 1.5), ("t1", 2.5)], ids=["other_task", "recreated_task"]
)
def test_another_task_starts_from_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, task_id: str, created_at: float
) -> None:
    caplog.set_level(logging.INFO, "edge_agent.residual")
    ResidualStore(tmp_path).save("t1", 1.5, residual())
    assert_zero(ResidualStore(tmp_path).load(task_id, created_at, SHAPES))
    assert "belongs to task t1" in caplog.text
    store = ResidualStore(tmp_path)
    store.save("t1", 1.5, residual())
    assert_zero(store.load(task_id, created_at, SHAPES))  # the in-memory copy too


@pytest.mark.parametrize(
    "shapes",
    [{"w": (8, 4), "b": (8,)}, {**SHAPES, "extra": (2,)}, {**SHAPES, "w": (4, 8)}],
    ids=["missing", "extra", "reshaped"],
)
def test_other_tensors_start_from_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, shapes: dict
) -> None:
    ResidualStore(tmp_path).save("t1", 1.5, residual())
    out = ResidualStore(tmp_path).load("t1", 1.5, shapes)
    assert {n: v.shape for n, v in out.items()} == shapes
    assert all(not v.any() for v in out.values())
    assert "holds other tensors" in caplog.text


def _write_object_npz(path: Path) -> None:
    np.savez(path, task_id=np.array("t1"), names=np.array([{"x": 1}], dtype=object))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: p.write_bytes(b"not a zip file"),
        lambda p: p.write_bytes(p.read_bytes()[:200]),  # torn write
        lambda p: p.write_bytes(pickle.dumps({"w": 1})),
        lambda p: np.savez(p, unrelated=np.zeros(3)),
        _write_object_npz,  # would need allow_pickle
        lambda p: p.write_bytes(b""),
    ],
    ids=["garbage", "truncated", "pickle", "foreign_npz", "object_array", "empty"],
)
def test_corrupt_file_is_logged_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupt
) -> None:
    ResidualStore(tmp_path).save("t1", 1.5, residual())
    path = tmp_path / RESIDUAL_FILE
    corrupt(path)
    store = ResidualStore(tmp_path)
    assert_zero(store.load("t1", 1.5, SHAPES))
    assert "unreadable" in caplog.text and str(path) in caplog.text
    store.save("t1", 1.5, residual(2))  # the next save replaces the bad file
    assert_same(ResidualStore(tmp_path).load("t1", 1.5, SHAPES), residual(2))


def test_non_finite_residual_is_not_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = residual()
    bad["b"][0] = np.inf
    ResidualStore(tmp_path).save("t1", 1.5, bad)
    assert_zero(ResidualStore(tmp_path).load("t1", 1.5, SHAPES))
    assert "non-finite" in caplog.text


def test_unwritable_state_dir_keeps_the_residual_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    store = ResidualStore(blocker / "state")
    store.save("t1", 1.5, residual())
    assert "cannot write" in caplog.text
    assert_same(store.load("t1", 1.5, SHAPES), residual())


# -- error feedback ---------------------------------------------------------------------


def received(wire, compression, shapes) -> dict[str, np.ndarray]:
    """What the coordinator decodes from this wire delta (a map goes through msgpack)."""
    if compression is None:
        wire = msgpack.unpackb(msgpack.packb(wire))
    return decode_update_delta(wire, compression, expected_shapes=shapes)


def test_new_residual_is_exactly_what_was_not_sent() -> None:
    spec = parse_codec("topk:0.2:int4+zstd")
    delta, previous = residual(3), residual(4)
    wire, compression, new = encode_with_feedback(delta, previous, spec,
                                                  rng=np.random.default_rng(0))
    sent = received(wire, compression, SHAPES)
    for name in SHAPES:
        np.testing.assert_allclose(sent[name] + new[name], delta[name] + previous[name],
                                   rtol=0, atol=1e-6)
    assert sum(int(np.count_nonzero(v)) for v in sent.values()) == 9  # ceil(0.2 * 41)


@pytest.mark.parametrize("spec", ["topk:0.1:int8", "topk:0.05:int4+zstd", "topk:0.1:fp16"])
def test_error_feedback_makes_top_k_unbiased(spec: str) -> None:
    # The same change g at every step, magnitudes within a factor of 2: alone, top-k sends
    # the same few entries every time and never the others.
    rng = np.random.default_rng(0)
    g = {
        "w": (rng.uniform(0.5, 1.0, (20, 8)) * rng.choice([-1, 1], (20, 8))).astype(np.float32),
        "b": np.full(40, 0.5, np.float32),
    }
    shapes = {n: v.shape for n, v in g.items()}
    norm_g = sum(float(np.sum(v * v)) for v in g.values()) ** 0.5
    parsed = parse_codec(spec)
    steps = 150
    with_ef = {n: np.zeros_like(v) for n, v in g.items()}
    without = {n: np.zeros_like(v) for n, v in g.items()}
    res = None
    norms = []
    for step in range(steps):
        wire, comp, res = encode_with_feedback(g, res, parsed, rng=np.random.default_rng(step))
        wire0, comp0, _ = encode_with_feedback(g, None, parsed, rng=np.random.default_rng(step))
        sent, sent0 = received(wire, comp, shapes), received(wire0, comp0, shapes)
        for n in g:
            with_ef[n] += sent[n]
            without[n] += sent0[n]
        norms.append(sum(float(np.sum(v * v)) for v in res.values()) ** 0.5)

    def bias(total: dict[str, np.ndarray]) -> float:
        """|mean sent - g| / |g|: 0 for an unbiased compressor, as steps grow."""
        return sum(float(np.sum((total[n] / steps - g[n]) ** 2)) for n in g) ** 0.5 / norm_g

    # everything is accounted for: sent + still owed == steps * g
    for n in g:
        np.testing.assert_allclose(with_ef[n] + res[n], steps * g[n], rtol=1e-5, atol=1e-3)
    # what is owed stays bounded (it does not grow with the steps)...
    assert max(norms[steps // 2:]) < 1.5 * max(norms[: steps // 2])
    # ...so the average of what was sent converges to g; without feedback it never does
    assert bias(with_ef) < 0.12
    assert bias(without) > 0.8
    assert all(v.all() for v in with_ef.values())  # every entry was sent at some point
    assert sum(int(np.count_nonzero(v)) for v in without.values()) < 0.2 * 200


# -- the agent: error feedback wired in, and kept across a restart ----------------------


class _Recorder:
    """Stands in for ``MqttClient.publish``: keeps what the agent publishes."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False):
        from fedbus.transport import PublishResult

        self.published.append((topic, payload))
        return PublishResult(topic, len(payload))  # queued, not yet acknowledged


def _agent(tmp_path: Path, recorder: _Recorder):
    from edge_agent.agent import Agent, LocalData
    from edge_agent.config import AgentConfig

    rng = np.random.default_rng(0)
    data = LocalData(rng.normal(size=(48, 64)).astype(np.float32), rng.integers(0, 10, 48))
    config = AgentConfig(device_id="dev-1", data=tmp_path / "unused.npz",
                         state_dir=tmp_path / "state")
    agent = Agent(config, data, password="unused")  # never connects
    agent.client.publish = recorder  # type: ignore[method-assign]
    return agent


def _model_message(core, now: float):
    from fedbus.envelope import pack, unpack
    from fedbus.messages import GlobalModel

    return GlobalModel.from_wire(unpack(pack(core.model_message(now).to_wire()), "model"))


def test_agent_keeps_the_residual_across_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from coordinator.core import AggregationConfig, CoordinatorCore, SendReceipt
    from fedbus.messages import ModelSpec, Task, TrainSpec
    from fedbus.zoo import build_model, get_state

    caplog.set_level(logging.INFO)
    task = Task("t1", ModelSpec("mlp", {"in_features": 64, "num_classes": 10}),
                TrainSpec(epochs=1, batch_size=16), codec="topk:0.05:int8+zstd",
                created_at=123.0)
    core = CoordinatorCore(task, get_state(build_model("mlp", dict(task.model.args))),
                           AggregationConfig(mode="fedasync"), model_codec="fp16+zstd")
    shapes = {name: a.shape for name, a in core.state.items()}

    def train_once(agent, recorder: _Recorder):
        model_msg = _model_message(core, 1.0)
        base = decode_update_delta(model_msg.tensors, "zstd", expected_shapes=shapes)
        agent._train_and_publish(task, model_msg)
        payload = next(p for t, p in recorder.published if t.endswith("/update/dev-1"))
        actions = core.on_update("dev-1", payload, 2.0)
        receipt = next(a.receipt for a in actions if isinstance(a, SendReceipt))
        assert receipt.accepted, receipt.detail
        new_state = get_state(agent._model)
        return {n: new_state[n] - base[n] for n in shapes}, payload

    first = _Recorder()
    delta1, payload1 = train_once(_agent(tmp_path, first), first)
    saved1 = ResidualStore(tmp_path / "state").load("t1", 123.0, shapes)
    sent1 = _sent(payload1, shapes)
    for n in shapes:  # first update: nothing owed yet, so delta = sent + residual
        np.testing.assert_allclose(sent1[n] + saved1[n], delta1[n], rtol=0, atol=1e-6)
    assert sum(float(np.abs(v).sum()) for v in saved1.values()) > 0

    second = _Recorder()  # a new agent process: the residual comes from the file
    delta2, payload2 = train_once(_agent(tmp_path, second), second)
    assert "resuming the error-feedback residual of task t1" in caplog.text
    saved2 = ResidualStore(tmp_path / "state").load("t1", 123.0, shapes)
    sent2 = _sent(payload2, shapes)
    for n in shapes:
        np.testing.assert_allclose(sent2[n] + saved2[n], delta2[n] + saved1[n],
                                   rtol=0, atol=1e-5)


def _sent(payload: bytes, shapes) -> dict[str, np.ndarray]:
    from fedbus.envelope import unpack
    from fedbus.messages import Update

    update = Update.from_wire(unpack(payload, "update"))
    assert update.compression == "zstd"
    return decode_update_delta(update.delta, update.compression, expected_shapes=shapes)


def test_agent_without_top_k_writes_no_state(tmp_path: Path) -> None:
    from coordinator.core import AggregationConfig, CoordinatorCore
    from fedbus.messages import ModelSpec, Task, TrainSpec
    from fedbus.zoo import build_model, get_state

    task = Task("t1", ModelSpec("mlp", {"in_features": 64, "num_classes": 10}),
                TrainSpec(epochs=1, batch_size=16), codec="int4+zstd", created_at=1.0)
    core = CoordinatorCore(task, get_state(build_model("mlp", dict(task.model.args))),
                           AggregationConfig())
    recorder = _Recorder()
    _agent(tmp_path, recorder)._train_and_publish(task, _model_message(core, 1.0))
    assert any(t.endswith("/update/dev-1") for t, _ in recorder.published)
    assert not (tmp_path / "state").exists()


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from edge_agent.config import AgentConfig

    config = AgentConfig(device_id="dev-7", data=tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert config.state_path() == tmp_path / "xdg" / "fedbus" / "dev-7"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.state_path() == tmp_path / "home" / ".local" / "state" / "fedbus" / "dev-7"
    explicit = AgentConfig(device_id="dev-7", data=tmp_path, state_dir=tmp_path / "s")
    assert explicit.state_path() == tmp_path / "s"


def test_agent_decodes_a_compressed_model_within_bounds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import tracemalloc

    import zstandard

    from fedbus.messages import GlobalModel, ModelSpec, Task, TrainSpec

    task = Task("t1", ModelSpec("mlp", {"in_features": 64, "num_classes": 10}),
                TrainSpec(epochs=1, batch_size=16), codec="int8", created_at=1.0)
    bomb = zstandard.ZstdCompressor().compress(bytes(200 * 1024 * 1024))
    recorder = _Recorder()
    agent = _agent(tmp_path, recorder)
    assert agent._prepare(task)  # torch and the network first, outside the measurement
    tracemalloc.start()
    try:
        agent._train_and_publish(task, GlobalModel("t1", 4, bomb, 1.0, "zstd"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "global model v4 does not fit task t1" in caplog.text
    assert "zstd frame declares 209715200 bytes, more than the limit of 50888" in caplog.text
    assert peak < 4 << 20  # the bomb is never expanded
    assert agent.stats.last_version == 4 and not recorder.published  # skipped, not retried
