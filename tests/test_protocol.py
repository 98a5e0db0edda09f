"""Protocol v2 pure parts: topics, envelopes and limits, tensors, update codecs, schemas."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fedbus.envelope import DecodeLimits, pack, unpack
from fedbus.errors import ProtocolError
from fedbus.messages import (
    GlobalModel,
    ModelSpec,
    Receipt,
    Status,
    Task,
    TrainSpec,
    Update,
    new_update_id,
)
from fedbus.tensors import decode_tensor, encode_tensor
from fedbus.topics import Topics, validate_device_id
from fedbus.update_codec import CODECS, decode_delta, encode_delta


def _reason(fn, *args, **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    return info.value.reason


# -- topics ---------------------------------------------------------------------------------


def test_topic_layout_and_device_of():
    t = Topics("trial/a")
    assert t.task == "trial/a/task"
    assert t.model == "trial/a/model"
    assert t.update("dev-1") == "trial/a/update/dev-1"
    assert t.device_of("trial/a/update/dev-1") == "dev-1"
    assert t.device_of("trial/a/status/dev-1") == "dev-1"
    assert t.device_of("trial/a/model") is None
    assert t.device_of("trial/b/update/dev-1") is None
    assert t.device_of("trial/a/update/dev+1") is None


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "x" * 65, "coordinator", "sp ace"])
def test_bad_device_ids_rejected(bad):
    with pytest.raises(ValueError):
        validate_device_id(bad)


@pytest.mark.parametrize("bad", ["", "a//b", "a/#", "+", "a/b/c/d/e"])
def test_bad_prefix_rejected(bad):
    with pytest.raises(ValueError):
        Topics(bad)


# -- envelope -------------------------------------------------------------------------------


def test_envelope_round_trip_and_kind_check():
    payload = pack({"v": 2, "kind": "status", "x": b"\x00\x01"})
    assert unpack(payload, "status")["x"] == b"\x00\x01"
    assert _reason(unpack, payload, "update") == "schema"


def test_envelope_limits_are_explicit():
    payload = pack({"v": 2, "kind": "k", "blob": b"x" * 2000})
    assert _reason(unpack, payload, None, DecodeLimits(max_bytes=100)) == "too_large"
    assert _reason(unpack, payload, None, DecodeLimits(max_bin_len=1000)) == "malformed"
    many = pack({"v": 2, "kind": "k", "list": list(range(50))})
    assert _reason(unpack, many, None, DecodeLimits(max_array_len=10)) == "malformed"


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "kind": "x"}),
     msgpack.packb({"v": 3, "kind": "x"}), pack({"v": 2, "kind": "k"}) + b"\x00",
     msgpack.packb({1: 2})],
)
def test_envelope_rejects_garbage(payload):
    assert _reason(unpack, payload) in ("malformed", "schema")


# -- tensors --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "uint8", "int16", "int32"])
def test_tensor_round_trip(dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    wire = msgpack.unpackb(msgpack.packb(encode_tensor(arr)))
    out = decode_tensor(wire)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_tensor_rejects_bad_dtype_shape_and_length():
    good = {"dtype": "float32", "shape": [2, 2], "data": b"\x00" * 16}
    assert decode_tensor(good).shape == (2, 2)
    assert _reason(decode_tensor, {**good, "dtype": "object"}) == "dtype"
    assert _reason(decode_tensor, {**good, "dtype": "float64"}) == "dtype"
    assert _reason(decode_tensor, {**good, "data": b"\x00" * 15}) == "shape"
    assert _reason(decode_tensor, {**good, "shape": [2, -2]}) == "shape"
    assert _reason(decode_tensor, {**good, "shape": [1] * 7}) == "shape"
    assert _reason(decode_tensor, {**good, "shape": [2**20, 2**20]}) == "shape"
    assert _reason(decode_tensor, {**good, "shape": [True, 2]}) == "shape"
    assert _reason(decode_tensor, {**good, "data": "text"}) == "schema"
    with pytest.raises(ValueError):
        encode_tensor(np.zeros(3, dtype=np.float64).astype(object))


# -- update codecs --------------------------------------------------------------------------


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(16, 8)).astype(np.float32),
        "b": rng.normal(size=16).astype(np.float32),
        "conv": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
        "zero": np.zeros((3, 3), np.float32),
        "scalar": np.array(0.25, np.float32),
    }


@pytest.mark.parametrize("codec", CODECS)
def test_codec_round_trip_error_bound(codec):
    delta = _delta()
    wire = msgpack.unpackb(msgpack.packb(encode_delta(delta, codec, rng=np.random.default_rng(1))))
    out = decode_delta(wire)
    assert set(out) == set(delta)
    for name, value in delta.items():
        assert out[name].dtype == np.float32 and out[name].shape == value.shape
        if codec == "fp32":
            np.testing.assert_array_equal(out[name], value)
        elif codec == "fp16":
            np.testing.assert_allclose(out[name], value, rtol=1e-3, atol=1e-3)
        else:
            # stochastic rounding: error below one quantisation step of the row's scale
            levels = {"int8": 127.0, "int4": 7.0}[codec]
            rows = value.reshape(value.shape[0], -1) if value.ndim >= 2 else value.reshape(1, -1)
            step = np.abs(rows).max(axis=1, keepdims=True) / levels
            err = np.abs(out[name].reshape(rows.shape) - rows)
            assert np.all(err <= step + 1e-6)
    np.testing.assert_array_equal(out["zero"], 0.0)


def _through_wire(encoded: dict) -> dict[str, np.ndarray]:
    return decode_delta(msgpack.unpackb(msgpack.packb(encoded)))


def test_int8_stochastic_rounding_is_unbiased():
    value = {"w": np.full((1, 20000), 0.304, np.float32), "m": np.full((1, 1), 1.0, np.float32)}
    value["w"][0, 0] = 1.0  # scale = 1/127: 0.304 is 38.6 steps, between two levels
    out = _through_wire(encode_delta(value, "int8", rng=np.random.default_rng(3)))
    assert abs(float(out["w"][0, 1:].mean()) - 0.304) < 1e-3
    nearest = _through_wire(encode_delta(value, "int8", stochastic=False))
    assert abs(float(nearest["w"][0, 1:].mean()) - 0.304) > 2e-3


def test_int8_is_four_times_smaller_than_fp32():
    delta = {"w": np.ones((256, 256), np.float32)}
    fp32 = len(msgpack.packb(encode_delta(delta, "fp32")))
    int8 = len(msgpack.packb(encode_delta(delta, "int8")))
    assert int8 < fp32 / 3.9


def test_codec_decode_rejects_inconsistent_entries():
    good = encode_delta({"w": np.ones((4, 2), np.float32)}, "int8")
    wire = msgpack.unpackb(msgpack.packb(good))
    assert decode_delta(wire)["w"].shape == (4, 2)
    bad_scale = {"w": {**wire["w"], "s": encode_tensor(np.ones(3, np.float32))}}
    assert _reason(decode_delta, msgpack.unpackb(msgpack.packb(bad_scale))) == "shape"
    wrong_type = {"w": {"c": "int8", "t": encode_tensor(np.ones((4, 2), np.float32)),
                        "s": encode_tensor(np.ones(4, np.float32))}}
    assert _reason(decode_delta, msgpack.unpackb(msgpack.packb(wrong_type))) == "dtype"
    assert _reason(decode_delta, {"w": {"c": "zip"}}) == "schema"
    assert _reason(decode_delta, [1, 2]) == "schema"
    with pytest.raises(ValueError):
        encode_delta({"w": np.ones(2, np.float32)}, "lz4")


# -- schemas --------------------------------------------------------------------------------


def _wire(message) -> dict:
    return unpack(pack(message.to_wire()))


def test_messages_round_trip():
    task = Task("t1", ModelSpec("mlp", {"hidden": [64], "in_features": 64}), TrainSpec(), "int8",
                1000, 1.5, run_id="r1")
    assert Task.from_wire(_wire(task)) == task
    model = GlobalModel("t1", 3, encode_delta({"w": np.ones(2, np.float32)}, "fp32"), 2.0,
                        run_id="r1")
    back = GlobalModel.from_wire(_wire(model))
    assert back.version == 3 and decode_delta(back.tensors)["w"].tolist() == [1.0, 1.0]
    update = Update(new_update_id(), "dev-1", "t1", 2, 50, {}, {"loss": 0.5}, 3.0, run_id="r1")
    assert Update.from_wire(_wire(update)) == update
    receipt = Receipt("abc", False, "stale", "too old", 7, 4, run_id="r1")
    assert Receipt.from_wire(_wire(receipt)) == receipt
    status = Status("dev-1", "online", 3, 4.0)
    assert Status.from_wire(_wire(status)) == status


@pytest.mark.parametrize(
    "field,value",
    [("update_id", "has space"), ("dev", "a/b"), ("base", -1), ("base", True), ("n", 0),
     ("n", 2**40 + 1), ("m", {"loss": float("nan")}), ("m", {"loss": "low"}),
     ("m", {"loss": True}), ("m", {1: 0.5}), ("m", {f"k{i}": 0.0 for i in range(33)}),
     ("m", [0.5]), ("ts", float("inf")), ("ts", "now"), ("delta", [1]), ("delta", "zstd"),
     ("task", 7), ("task", "a b")],
)
def test_update_schema_rejections(field, value):
    obj = Update(new_update_id(), "dev-1", "t1", 2, 50, {}, {}, 3.0, run_id="r1").to_wire()
    obj[field] = value
    assert _reason(Update.from_wire, obj) == "schema"


@pytest.mark.parametrize("field", ["update_id", "dev", "task", "base", "n", "m", "delta", "ts"])
def test_update_missing_field_and_wrong_kind(field):
    obj = Update(new_update_id(), "dev-1", "t1", 2, 50, {}, {}, 3.0, run_id="r1").to_wire()
    missing = {k: v for k, v in obj.items() if k != field}
    with pytest.raises(ProtocolError, match=f"missing field {field!r}") as info:
        Update.from_wire(missing)
    assert info.value.reason == "schema"
    assert _reason(Update.from_wire, {**obj, "kind": "model"}) == "schema"


# docs/protocol.md section 7.3: the compact update, byte for byte
UPDATE_VECTOR = bytes.fromhex(
    "8b a1 76 02 a4 6b 69 6e 64 a6 75 70 64 61 74 65"  # {"v": 2, "kind": "update",
    "a9 75 70 64 61 74 65 5f 69 64 b0 71 33 4a 78 53 30 64 4b 39 76 54 62 32 4c 6d 41"
    "a3 64 65 76 a9 64 65 76 69 63 65 2d 30 31"  # "dev": "device-01",
    "a3 72 75 6e b0 68 52 35 74 57 71 32 4c 6d 5a 38 76 58 63 31 45"  # "run": "hR5t...",
    "a4 74 61 73 6b a8 64 69 67 69 74 73 2d 31"  # "task": "digits-1",
    "a4 62 61 73 65 0c a1 6e cc b4"  # "base": 12, "n": 180,
    "a1 6d 82 a4 6c 6f 73 73 ca 3f 00 00 00 a3 61 63 63 ca 3f 60 00 00"  # "m": float32s
    "a5 64 65 6c 74 61 80"  # "delta": {},
    "a2 74 73 cb 41 da 55 6e 40 00 00 00"  # "ts": 1767225600.0 (float64)}
)


def test_update_compact_wire_form():
    update = Update("q3JxS0dK9vTb2LmA", "device-01", "digits-1", 12, 180, {},
                    {"loss": 0.5, "acc": 0.875}, 1767225600.0, run_id="hR5tWq2LmZ8vXc1E")
    assert update.pack() == UPDATE_VECTOR
    obj = unpack(UPDATE_VECTOR, "update")
    assert list(obj) == [
        "v", "kind", "update_id", "dev", "run", "task", "base", "n", "m", "delta", "ts"
    ]
    assert Update.from_wire(obj) == update
    # envelope.pack(to_wire()) is the same message with float64 metrics: valid, 8 bytes longer
    wide = pack(update.to_wire())
    assert len(wide) == len(UPDATE_VECTOR) + 8
    assert Update.from_wire(unpack(wide, "update")) == update


def test_update_pack_narrows_metrics_only():
    metrics = {"loss": 0.1, "huge": 1e300, "count": 3, "tiny": 1e-50}
    update = Update(new_update_id(), "dev-1", "t1", 0, 1, {}, metrics, 1767225600.123, run_id="r1")
    payload = update.pack()
    back = Update.from_wire(unpack(payload, "update"))
    assert back.metrics["loss"] == float(np.float32(0.1)) != 0.1  # float32, 4 bytes
    assert b"\xa4loss\xca" in payload
    assert back.metrics["huge"] == 1e300  # beyond float32: float64 kept, never infinity
    assert back.metrics["count"] == 3 and back.metrics["tiny"] == 0.0
    assert back.sent_at == 1767225600.123  # the time keeps float64


def test_update_long_field_names_are_not_read():
    # the field names of the update before its compact form: a schema error, not a guess
    old = {"v": 2, "kind": "update", "update_id": "u1", "device_id": "dev-1", "task_id": "t1",
           "base_version": 0, "num_samples": 5, "metrics": {}, "delta": {}, "sent_at": 1.0}
    with pytest.raises(ProtocolError, match="missing field") as info:
        Update.from_wire(old)
    assert info.value.reason == "schema"


def test_new_update_ids_are_short_random_and_valid():
    ids = {new_update_id() for _ in range(1000)}
    assert len(ids) == 1000
    for update_id in ids:
        assert len(update_id) == 16
        Update.from_wire(Update(update_id, "d", "t", 0, 1, {}, run_id="r1").to_wire())


def test_task_rejects_unknown_codec_and_bad_training():
    obj = Task("t1", ModelSpec("mlp"), TrainSpec(), run_id="r1").to_wire()
    assert _reason(Task.from_wire, {**obj, "codec": "zip"}) == "schema"
    assert _reason(Task.from_wire, {**obj, "train": {**obj["train"], "lr": 0.0}}) == "schema"
    bad_args = {**obj, "model": {"arch": "mlp", "args": {"x": {"nested": 1}}}}
    assert _reason(Task.from_wire, bad_args) == "schema"


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4), ()])
def test_codecs_handle_empty_and_scalar_tensors(codec, shape):
    value = np.ones(shape, np.float32)
    out = _through_wire(encode_delta({"x": value}, codec))
    assert out["x"].shape == shape
    np.testing.assert_allclose(out["x"], value, atol=1e-2)


def test_huge_zero_element_shape_is_a_protocol_error():
    hostile = {"dtype": "float32", "shape": [2**63 - 1, 0], "data": b""}
    assert _reason(decode_tensor, hostile) == "shape"
    entry = {"c": "int8", "t": {"dtype": "int8", "shape": [2**40, 2**40, 0], "data": b""},
             "s": encode_tensor(np.zeros(0, np.float32))}
    assert _reason(decode_delta, msgpack.unpackb(msgpack.packb({"w": entry}))) == "shape"


@pytest.mark.parametrize("version", [True, 2.0, "2", 1, 3])
def test_envelope_version_must_be_the_integer_two(version):
    payload = msgpack.packb({"v": version, "kind": "status"})
    assert _reason(unpack, payload) == "schema"


def test_task_bounds_that_would_break_agents_are_schema_errors():
    obj = Task("t1", ModelSpec("mlp"), TrainSpec(), run_id="r1").to_wire()
    for field, value in (("momentum", -0.5), ("weight_decay", -1e-4)):
        bad = {**obj, "train": {**obj["train"], field: value}}
        assert _reason(Task.from_wire, bad) == "schema"
    assert _reason(Task.from_wire, {**obj, "max_update_bytes": 0}) == "schema"


def test_v2_fields_round_trip_and_are_checked():
    task = Task("t1", ModelSpec("mlp"), TrainSpec(), max_staleness=3, state="ended",
                end_reason="reached 5 model versions", run_id="hR5tWq2LmZ8vXc1E")
    back = Task.from_wire(_wire(task))
    assert back == task and back.ended
    obj = task.to_wire()
    assert Task.from_wire({**obj, "state": "paused"}).paused  # revision 2.5
    assert _reason(Task.from_wire, {**obj, "state": "sleeping"}) == "schema"
    assert _reason(Task.from_wire, {**obj, "run": "has space"}) == "schema"
    assert _reason(Task.from_wire, {k: v for k, v in obj.items() if k != "run"}) == "schema"
    assert _reason(Task.from_wire, {**obj, "end_reason": 7}) == "schema"
    running = Task("t1", ModelSpec("mlp"), TrainSpec(), run_id="r1").to_wire()
    assert "end_reason" not in running and running["state"] == "running"
    receipt = Receipt("u1", True, None, "buffered 1/4", 3, 0, repeat=True, run_id="r1")
    assert Receipt.from_wire(_wire(receipt)) == receipt
    assert "repeat" not in Receipt("u1", True, None, "", 3, 0, run_id="r1").to_wire()
    assert _reason(Receipt.from_wire, {**receipt.to_wire(), "repeat": 1}) == "schema"
    status = Status("dev-1", "idle", 4, 1.0, run_id="r1")
    assert Status.from_wire(_wire(status)) == status
    assert Status.from_wire(_wire(Status("dev-1", "online", None, 1.0))).run_id is None
    assert _reason(Status.from_wire, {**status.to_wire(), "run": 5}) == "schema"
    update = Update("u1", "d1", "t1", 0, 1, {}, run_id="r1").to_wire()
    assert _reason(Update.from_wire, {k: v for k, v in update.items() if k != "run"}) == "schema"

