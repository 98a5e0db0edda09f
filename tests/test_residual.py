"""Error feedback for top-k (encode_with_feedback), the agent's state directory, and the
agent's bounded decoding of a compressed model."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from edge_agent.residual import encode_with_feedback
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



# -- the agent's state directory and its defences -------------------------------------


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
                TrainSpec(epochs=1, batch_size=16), codec="int8", created_at=1.0, run_id="r1")
    bomb = zstandard.ZstdCompressor().compress(bytes(200 * 1024 * 1024))
    recorder = _Recorder()
    agent = _agent(tmp_path, recorder)
    assert agent._prepare(task)  # torch and the network first, outside the measurement
    tracemalloc.start()
    try:
        agent._train_and_publish(task, GlobalModel("t1", 4, bomb, 1.0, "zstd", run_id="r1"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "global model v4 does not fit task t1" in caplog.text
    assert "zstd frame declares 209715200 bytes, more than the limit of 50888" in caplog.text
    assert peak < 4 << 20  # the bomb is never expanded
    # skipped, not retried: no update is sent, and the device's status says why
    assert agent.stats.last_version == 4
    assert [topic for topic, _ in recorder.published] == ["fedbus/status/dev-1"]
    assert b"does not fit the task" in recorder.published[0][1]
