"""Codec specs, the int4/topk entries, +zstd, and the bounds their decoders keep."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import msgpack
import numpy as np
import pytest
import zstandard

from coordinator.config import CoordinatorConfig
from coordinator.core import AggregationConfig, CoordinatorCore
from coordinator.store import Store
from fedbus import update_codec
from fedbus.codec_spec import CodecSpec, parse_codec
from fedbus.envelope import pack, unpack
from fedbus.errors import ProtocolError
from fedbus.messages import GlobalModel, ModelSpec, Task, TrainSpec, Update
from fedbus.tensors import encode_tensor
from fedbus.update_codec import (
    decode_delta,
    decode_update_delta,
    decompressed_bound,
    encode_delta,
    encode_update_delta,
)


def _reason(fn, *args, **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    return info.value.reason


# -- codec specs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["fp32", "fp16", "int8", "int4", "fp32+zstd", "int4+zstd", "topk:0.1:int8",
     "topk:0.01:int8+zstd", "topk:0.05:int4", "topk:1.0:fp32", "topk:1e-05:fp16+zstd"],
)
def test_canonical_specs_round_trip(text: str) -> None:
    spec = parse_codec(text)
    assert str(spec) == text
    assert parse_codec(str(spec)) == spec


@pytest.mark.parametrize(
    "text,canonical",
    [("topk:0.1", "topk:0.1:int8"), ("topk:.5:int4", "topk:0.5:int4"),
     ("topk:1:fp16+zstd", "topk:1.0:fp16+zstd"), ("topk:0.010", "topk:0.01:int8"),
     ("topk:5E-3:int8", "topk:0.005:int8")],
)
def test_specs_have_one_canonical_form(text: str, canonical: str) -> None:
    spec = parse_codec(text)
    assert str(spec) == canonical
    assert parse_codec(canonical) == spec


def test_spec_fields() -> None:
    spec = parse_codec("topk:0.05:int4+zstd")
    assert (spec.base, spec.fraction, spec.values, spec.zstd) == ("topk", 0.05, "int4", True)
    assert spec.is_topk and spec.lossy and spec.compression == "zstd"
    plain = parse_codec("fp16")
    assert (plain.fraction, plain.values, plain.zstd) == (None, None, False)
    assert plain.compression is None
    assert not plain.lossy and not plain.is_topk


@pytest.mark.parametrize(
    "text",
    ["", "zip", "INT8", " int8", "int8 ", "int8+lz4", "int8+zstd+zstd", "+zstd", "zstd",
     "int8+", "fp32:0.1", "topk", "topk:", "topk:0", "topk:0.0", "topk:1.5", "topk:-0.1",
     "topk:nan", "topk:inf", "topk:1e400", "topk:0x1", "topk:0.1:topk", "topk:0.1:int8:x",
     "topk:0.1:", "topk:0.1:INT8", "topk::int8", "x" * 100],
)
def test_bad_specs_are_one_line_value_errors(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_codec(text)
    message = str(info.value)
    assert message and "\n" not in message


def test_codec_spec_checks_its_fields() -> None:
    with pytest.raises(ValueError):
        CodecSpec("topk", 0.1, None)
    with pytest.raises(ValueError):
        CodecSpec("int8", 0.1)
    with pytest.raises(ValueError):
        CodecSpec("topk", 2.0, "int8")
    with pytest.raises(ValueError):
        CodecSpec("lz4")


def test_task_carries_codec_specs_and_rejects_bad_ones() -> None:
    task = Task("t1", ModelSpec("mlp"), TrainSpec(), "topk:0.01:int8+zstd", 1000, 1.0, run_id="r1")
    assert Task.from_wire(unpack(pack(task.to_wire()))) == task
    obj = task.to_wire()
    for bad in ("topk:2", "int8+gzip", "int3", ""):
        assert _reason(Task.from_wire, {**obj, "codec": bad}) == "schema"


def test_coordinator_config_accepts_specs_and_lossless_model_codecs() -> None:
    cfg = CoordinatorConfig(codec="topk:0.05:int4+zstd", model_codec="fp16+zstd")
    assert cfg.codec == "topk:0.05:int4+zstd"
    for bad in ("topk:0", "int8+lz4"):
        with pytest.raises(ValueError, match=r"^codec: "):
            CoordinatorConfig(codec=bad)
    for lossy in ("int8", "int4+zstd", "topk:0.5:fp32"):
        with pytest.raises(ValueError, match="model_codec must be fp32 or fp16"):
            CoordinatorConfig(model_codec=lossy)
    with pytest.raises(ValueError, match=r"^model_codec: "):
        CoordinatorConfig(model_codec="fp64")


# -- round trips of every codec and combination -----------------------------------------------


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(16, 9)).astype(np.float32),  # 144: even
        "b": rng.normal(size=15).astype(np.float32),  # odd: int4 pads a nibble
        "conv": rng.normal(size=(4, 3, 3, 3)).astype(np.float32) * 3,
        "zero": np.zeros((3, 3), np.float32),
        "scalar": np.array(-0.25, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


SHAPES = {name: value.shape for name, value in _delta().items()}
ALL_SPECS = [
    f"{base}{suffix}"
    for base, suffix in itertools.product(
        ["fp32", "fp16", "int8", "int4", "topk:0.1:fp32", "topk:0.1:fp16", "topk:0.1:int8",
         "topk:0.2:int4", "topk:1.0:int8"],
        ["", "+zstd"],
    )
]


def _through_update(spec: str, delta: dict[str, np.ndarray], seed: int = 1):
    """Encode into a real Update, pack, unpack and decode as the coordinator does."""
    wire, compression = encode_update_delta(delta, spec, rng=np.random.default_rng(seed))
    update = Update("u1", "dev-1", "t1", 0, 5, wire, {}, 1.0, compression, run_id="r1")
    back = Update.from_wire(unpack(pack(update.to_wire()), "update"))
    assert back.compression == parse_codec(spec).compression
    shapes = {name: value.shape for name, value in delta.items()}
    return decode_update_delta(back.delta, back.compression, expected_shapes=shapes)


def _step(value: np.ndarray, levels: float) -> np.ndarray:
    """One quantisation step of the int8/int4 scale layout, broadcastable to ``value``."""
    if value.ndim >= 2:
        rows = np.abs(value.reshape(value.shape[0], -1)).max(axis=1) / levels
        return rows.reshape((-1,) + (1,) * (value.ndim - 1))
    return np.float32(np.abs(value).max() / levels) if value.size else np.float32(0)


def _dense_error_ok(value: np.ndarray, out: np.ndarray, codec: str) -> bool:
    if value.size == 0:
        return out.shape == value.shape
    if codec == "fp32":
        return bool(np.array_equal(out, value))
    if codec == "fp16":
        return bool(np.allclose(out, value, rtol=1e-3, atol=1e-3))
    step = _step(value, {"int8": 127.0, "int4": 7.0}[codec])
    return bool(np.all(np.abs(out - value) <= step + 1e-6))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_round_trip_of_every_codec(spec: str) -> None:
    delta = _delta()
    out = _through_update(spec, delta)
    parsed = parse_codec(spec)
    assert set(out) == set(delta)
    for name, value in delta.items():
        assert out[name].dtype == np.float32 and out[name].shape == value.shape
    np.testing.assert_array_equal(out["zero"], 0.0)
    if not parsed.is_topk:
        for name, value in delta.items():
            assert _dense_error_ok(value, out[name], parsed.base), name
        return
    # global top-k: exactly the ceil(f * N) largest magnitudes are kept, the rest is 0
    flat = np.concatenate([v.reshape(-1) for v in delta.values()])
    got = np.concatenate([out[n].reshape(-1) for n in delta])
    k = math.ceil(parsed.fraction * flat.size)
    threshold = np.sort(np.abs(flat))[-k]
    kept = np.abs(flat) >= threshold
    assert kept.sum() == k  # no ties in this data
    assert np.all(got[~kept] == 0)
    assert _dense_error_ok(flat[kept], got[kept], parsed.values)  # 1-d: one scale


@pytest.mark.parametrize("spec", ["int4", "topk:0.5:int4", "topk:1.0:fp32", "int4+zstd"])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4), (), (1,), (3,), (1, 1)])
def test_new_codecs_handle_empty_odd_and_scalar_tensors(spec: str, shape: tuple) -> None:
    value = np.full(shape, 0.5, np.float32)
    out = _through_update(spec, {"x": value})
    assert out["x"].shape == shape
    if not parse_codec(spec).is_topk or spec == "topk:1.0:fp32":
        np.testing.assert_allclose(out["x"], value, atol=1e-6)


def test_int4_stochastic_rounding_is_unbiased() -> None:
    value = {"w": np.full((1, 20000), 0.3, np.float32)}
    value["w"][0, 0] = 1.0  # scale 1/7: 0.3 is 2.1 steps, between two levels
    out = _through_update("int4", value, seed=3)
    assert abs(float(out["w"][0, 1:].mean()) - 0.3) < 2e-3
    nearest = decode_delta(msgpack.unpackb(msgpack.packb(encode_delta(value, "int4",
                                                                      stochastic=False))))
    assert abs(float(nearest["w"][0, 1:].mean()) - 0.3) > 0.01  # 2/7 instead


def test_int4_packs_two_values_per_byte() -> None:
    # scale 7/7 = 1: q = [7, -7, 2, 0, 0, 0]; nibbles 7, 9, 2, 0, 0, 0 (two's complement)
    x = np.array([[7.0, -7.0, 2.0], [0.0, 0.0, 0.0]], np.float32)
    entry = encode_delta({"x": x}, "int4", stochastic=False)["x"]
    assert entry["shape"] == [2, 3]
    assert bytes(entry["t"]["data"]) == b"\x97\x02\x00"
    assert bytes(entry["s"]["data"]) == np.array([1.0, 0.0], np.float32).tobytes()
    odd = encode_delta({"y": np.array([1.0, -1.0, 7.0], np.float32)}, "int4", stochastic=False)
    assert bytes(odd["y"]["t"]["data"]) == b"\xf1\x07"  # 1, -1 (0xf), 7, padding 0


def test_fp32_fp16_int8_entries_are_byte_compatible() -> None:
    # docs/protocol.md section 6.2: this int8 entry packs to exactly these 84 bytes
    x = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]], np.float32)
    entry = encode_delta({"x": x}, "int8", stochastic=False)["x"]
    assert msgpack.packb(entry) == bytes.fromhex(
        "83 a1 63 a4 69 6e 74 38"
        "a1 74 83 a5 64 74 79 70 65 a4 69 6e 74 38"
        "a5 73 68 61 70 65 92 02 03"
        "a4 64 61 74 61 c4 06 40 81 20 00 00 00"
        "a1 73 83 a5 64 74 79 70 65 a7 66 6c 6f 61 74 33 32"
        "a5 73 68 61 70 65 91 02"
        "a4 64 61 74 61 c4 08 04 02 01 3c 00 00 00 00"
    )
    fp16 = encode_delta({"x": x}, "fp16")["x"]
    assert set(fp16) == {"c", "t"} and fp16["t"]["dtype"] == "float16"
    wire, compression = encode_update_delta({"x": x}, "fp32")
    assert compression is None and set(wire["x"]) == {"c", "t"}
    plain = Update("u1", "dev-1", "t1", 0, 5, wire, run_id="r1").to_wire()
    assert plain["delta"] is wire and "compression" not in plain


def test_topk_index_varints_layout() -> None:
    idx = np.array([0, 1, 130, 20000], np.int64)  # gaps 0, 1, 129, 19870
    assert update_codec._varint_gaps(idx).tobytes() == bytes.fromhex("0001 8101 9e9b01")
    back = update_codec._decode_indices(update_codec._varint_gaps(idx), 20001, "t")
    np.testing.assert_array_equal(back, idx)


def test_topk_index_varints_round_trip_up_to_the_element_limit() -> None:
    rng = np.random.default_rng(5)
    n = update_codec.MAX_ELEMENTS
    for size in (1, 2, 50, 5000):
        idx = np.unique(rng.integers(0, n, size=size))
        idx[-1] = n - 1  # the largest gap a tensor can have needs 4 bytes
        buf = update_codec._varint_gaps(idx)
        np.testing.assert_array_equal(update_codec._decode_indices(buf, n, "t"), idx)


def test_any_index_bytes_decode_to_strictly_ascending_or_are_rejected() -> None:
    # gaps are unsigned and every gap after the first must be >= 1: indices cannot come out
    # unsorted or repeated, whatever the bytes
    rng = np.random.default_rng(7)
    decoded = 0
    for _ in range(3000):
        buf = rng.integers(0, 256, size=int(rng.integers(1, 12)), dtype=np.uint8)
        buf[rng.random(buf.size) < 0.6] &= 0x7F  # enough terminators to parse often
        try:
            idx = update_codec._decode_indices(buf, 1 << 20, "t")
        except ProtocolError as exc:
            assert exc.reason == "shape"
            continue
        decoded += 1
        assert np.all(np.diff(idx) >= 1) and idx[0] >= 0 and idx[-1] < 1 << 20
    assert decoded > 100


# -- malformed entries ------------------------------------------------------------------------


def _wire(encoded: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(encoded))


def _int4_entry() -> dict:
    x = np.arange(15, dtype=np.float32).reshape(3, 5) - 7
    return _wire(encode_delta({"x": x}, "int4", stochastic=False))["x"]


def _tensor(dtype: str, data: bytes) -> dict:
    itemsize = np.dtype(dtype).itemsize
    return {"dtype": dtype, "shape": [len(data) // itemsize], "data": data}


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"t": _tensor("uint8", bytes(7))}, "shape"),  # 15 values need 8 bytes
        ({"t": _tensor("uint8", bytes(9))}, "shape"),
        ({"t": _tensor("uint8", bytes(7) + b"\x10")}, "shape"),  # padding nibble set
        ({"t": _tensor("int8", bytes(8))}, "dtype"),
        ({"s": encode_tensor(np.ones(2, np.float32))}, "shape"),
        ({"s": encode_tensor(np.ones(3, np.float16))}, "dtype"),
        ({"shape": [3, -5]}, "shape"),
        ({"shape": "3x5"}, "shape"),
        ({"shape": [2**26, 2]}, "shape"),
        ({"shape": [1] * 7}, "shape"),
        ({"t": "bytes"}, "schema"),
    ],
)
def test_int4_rejects_malformed_entries(change: dict, reason: str) -> None:
    entry = {**_int4_entry(), **change}
    assert _reason(decode_delta, {"x": _wire({"e": entry})["e"]}) == reason


def test_int4_reference_entry_decodes() -> None:
    out = decode_delta({"x": _int4_entry()})["x"]
    np.testing.assert_allclose(out, np.arange(15).reshape(3, 5) - 7, atol=1.01)


def _topk_entry(indices: bytes, values: np.ndarray, shape: list[int]) -> dict:
    return _wire({"e": {
        "c": "topk",
        "shape": shape,
        "i": indices,
        "v": {"c": "fp32", "t": values.astype("<f4").tobytes()},
    }})["e"]


def test_topk_hand_built_entry_decodes() -> None:
    entry = _topk_entry(b"\x01\x02\x03", np.array([1.0, 2.0, 3.0]), [2, 4])
    out = decode_delta({"x": entry})["x"]
    np.testing.assert_array_equal(out, [[0, 1, 0, 2], [0, 0, 3, 0]])  # indices 1, 3, 6


def test_topk_entry_layout_and_test_vector() -> None:
    # docs/protocol.md section 6.5: indices 1 and 6 of a [2, 4] tensor, int8 values
    x = np.array([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]], np.float32)
    entry = encode_delta({"x": x}, CodecSpec("topk", 0.25, "int8"), stochastic=False)["x"]
    assert msgpack.packb(entry) == bytes.fromhex(
        "84 a1 63 a4 74 6f 70 6b"  # {"c": "topk",
        "a5 73 68 61 70 65 92 02 04"  # "shape": [2, 4],
        "a1 69 c4 02 01 05"  # "i": bin 01 05 (gaps 1, 5),
        "a1 76 83 a1 63 a4 69 6e 74 38"  # "v": {"c": "int8",
        "a1 74 c4 02 40 81"  # "t": bin 40 81 (64, -127),
        "a1 73 c4 04 04 02 01 3c"  # "s": bin float32 1/127}}
    )
    np.testing.assert_allclose(decode_delta({"x": _wire(entry)})["x"], x, atol=0.004)
    # a tensor that keeps nothing is only its codec and shape
    nothing = encode_delta({"x": x, "big": np.full(8, 9.0, np.float32)},
                           CodecSpec("topk", 0.5, "int8"))
    assert _wire(nothing)["x"] == {"c": "topk", "shape": [2, 4]}
    assert msgpack.packb(nothing["x"]) == bytes.fromhex("82 a1 63 a4 74 6f 70 6b"
                                                        "a5 73 68 61 70 65 92 02 04")


@pytest.mark.parametrize("values", ["fp32", "fp16", "int8", "int4"])
def test_topk_values_are_bare_bins(values: str) -> None:
    x = np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5)
    entry = _wire(encode_delta({"x": x}, parse_codec(f"topk:1.0:{values}")))["x"]
    itemsize = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}[values]
    assert isinstance(entry["i"], bytes) and isinstance(entry["v"]["t"], bytes)
    assert len(entry["v"]["t"]) == math.ceil(15 * itemsize)
    assert set(entry["v"]) == ({"c", "t", "s"} if values.startswith("int") else {"c", "t"})
    if "s" in entry["v"]:
        assert len(entry["v"]["s"]) == 4


@pytest.mark.parametrize(
    "indices,values,shape,reason",
    [
        (b"\x01\x02\x05", [1, 2, 3], [2, 4], "shape"),  # index 8 of 8 elements: out of range
        (b"\x08", [1], [8], "shape"),
        (b"\x01\x00\x02", [1, 2, 3], [8], "shape"),  # gap 0: duplicate index
        (b"\x01\x81", [1, 2], [8], "shape"),  # truncated varint
        (b"\x80\x80\x80\x80\x01", [1], [8], "shape"),  # longer than 4 bytes
        (b"\x81\x00", [1], [8], "shape"),  # not the shortest form
        (b"\x01\x02", [1, 2, 3], [8], "shape"),  # 3 values, 2 indices
        (b"\x01\x02", [1], [8], "shape"),
        (b"", [1], [8], "shape"),
        (b"\x01", [1], [8, -1], "shape"),
    ],
)
def test_topk_rejects_malformed_entries(indices: bytes, values: list, shape: list,
                                        reason: str) -> None:
    entry = _topk_entry(indices, np.array(values), shape)
    assert _reason(decode_delta, {"x": entry}) == reason


def _int_values(codec: str, data: bytes, scale: object = b"\x00\x00\x80\x3f") -> dict:
    values = {"c": codec, "t": data}
    if scale is not None:
        values["s"] = scale
    return {"c": "topk", "shape": [8], "i": b"\x01\x02\x03", "v": values}  # 3 values


@pytest.mark.parametrize(
    "entry,reason",
    [
        (_int_values("int8", b"\x01\x02\x03"), None),
        (_int_values("int4", b"\x21\x03"), None),
        (_int_values("int8", b"\x01\x02"), "shape"),  # 2 values for 3 indices
        (_int_values("int8", b"\x01\x02\x03\x04"), "shape"),
        (_int_values("int4", b"\x21"), "shape"),  # 3 int4 values need 2 bytes
        (_int_values("int4", b"\x21\x03\x00"), "shape"),
        (_int_values("int4", b"\x21\x13"), "shape"),  # padding nibble set
        (_int_values("int8", b"\x01\x02\x03", b"\x00\x00\x80"), "shape"),  # 3-byte scale
        (_int_values("int8", b"\x01\x02\x03", b"\x00" * 8), "shape"),  # a float64 scale
        (_int_values("int8", b"\x01\x02\x03", 1.0), "schema"),  # scale as a number
        (_int_values("int8", b"\x01\x02\x03", None), "schema"),  # no scale
        (_int_values("int8", [1, 2, 3]), "schema"),
        (_int_values("topk", b"\x01\x02\x03"), "schema"),  # top-k inside top-k
        (_int_values("int16", b"\x01\x02\x03"), "schema"),
        ({"c": "topk", "shape": [8], "i": b"\x01\x02\x03",
          "v": {"c": "fp16", "t": bytes(4)}}, "shape"),
        ({"c": "topk", "shape": [8], "i": b"\x01\x02\x03",
          "v": {"c": "fp32", "t": bytes(16)}}, "shape"),
    ],
)
def test_topk_values_entries_are_checked(entry: dict, reason: str | None) -> None:
    if reason is None:
        np.testing.assert_array_equal(decode_delta({"x": entry})["x"], [0, 1, 0, 2, 0, 0, 3, 0])
    else:
        assert _reason(decode_delta, {"x": entry}) == reason


def test_topk_i_and_v_go_together() -> None:
    good = _topk_entry(b"\x01", np.array([1.0]), [4])
    np.testing.assert_array_equal(decode_delta({"x": good})["x"], [0, 1, 0, 0])
    nothing = {"c": "topk", "shape": [4]}
    np.testing.assert_array_equal(decode_delta({"x": nothing})["x"], np.zeros(4))
    assert decode_delta({"x": {"c": "topk", "shape": []}})["x"].shape == ()
    # an empty index stream with no values is the same as nothing kept
    empty = {**good, "i": b"", "v": {"c": "fp32", "t": b""}}
    np.testing.assert_array_equal(decode_delta({"x": empty})["x"], np.zeros(4))
    without_v = {k: v for k, v in good.items() if k != "v"}
    without_i = {k: v for k, v in good.items() if k != "i"}
    for bad in (without_v, without_i, {**good, "v": None}, {**good, "i": None}):
        assert _reason(decode_delta, {"x": bad}) == "schema"


def test_topk_rejects_bad_nested_values_and_index_types() -> None:
    good = _topk_entry(b"\x01", np.array([1.0]), [4])
    nested = {**good, "v": {**good, "shape": [1]}}  # topk inside topk
    assert _reason(decode_delta, {"x": nested}) == "schema"
    # values or indices as tensor maps (the entry layout before bare bins) are schema
    tensor_values = {**good, "v": {"c": "fp32", "t": encode_tensor(np.ones(1, np.float32))}}
    assert _reason(decode_delta, {"x": _wire({"e": tensor_values})["e"]}) == "schema"
    tensor_idx = {**good, "i": _tensor("uint8", b"\x01")}
    assert _reason(decode_delta, {"x": tensor_idx}) == "schema"
    assert _reason(decode_delta, {"x": {**good, "i": "\x01"}}) == "schema"  # str, not bin
    assert _reason(decode_delta, {"x": {**good, "v": "none"}}) == "schema"
    assert _reason(decode_delta, {"x": {**good, "v": {"t": bytes(4)}}}) == "schema"


def test_topk_index_bytes_are_bounded_by_the_tensor_size() -> None:
    # n strictly ascending indices below n never need more than about n bytes; a longer
    # index stream is refused before anything is computed from it
    entry = _topk_entry(b"\x00" + b"\x01" * 13, np.ones(14), [8])
    with pytest.raises(ProtocolError, match="14 index bytes for 8 elements"):
        decode_delta({"x": entry})
    dense = update_codec._varint_gaps(np.arange(1000))
    assert update_codec._decode_indices(dense, 1000, "t").size == 1000


def test_topk_shape_is_checked_before_expansion() -> None:
    # a 10-byte entry claiming 2^26 elements: never expanded when the shapes are known
    hostile = _topk_entry(b"\x01", np.array([1.0]), [2**26])
    tracemalloc.start()
    try:
        reason = _reason(decode_delta, {"x": hostile}, expected_shapes={"x": (4,)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason == "shape" and peak < 1 << 20
    assert _reason(decode_delta, {"y": hostile}, expected_shapes={"x": (4,)}) == "shape"


def test_bad_topk_entries_are_refused_before_expansion() -> None:
    # no expected shapes: a huge claimed shape is only allocated once i and v are known good
    values = {"c": "int8", "t": b"\x01", "s": b"\x00\x00\x80\x3f"}
    for bad in ({"i": b"\x81", "v": values}, {"i": b"\x01", "v": {**values, "t": b""}},
                {"i": b"\x01", "v": {**values, "s": b""}}, {"i": b"\x01"}):
        hostile = {"c": "topk", "shape": [2**26], **bad}
        reason, peak = _peak(decode_delta, {"x": hostile})
        assert reason in ("shape", "schema") and peak < 1 << 20, (bad, reason, peak)


def test_dense_elements_have_a_total_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(update_codec, "MAX_DENSE_ELEMENTS", 100)
    entry = _topk_entry(b"\x01", np.array([1.0]), [60])
    assert decode_delta({"a": entry})["a"].shape == (60,)
    assert _reason(decode_delta, {"a": entry, "b": entry}) == "shape"


def test_expected_shapes_check_names_and_shapes() -> None:
    encoded = _wire(encode_delta({"w": np.ones((2, 3), np.float32)}, "int4"))
    assert decode_delta(encoded, expected_shapes={"w": (2, 3)})["w"].shape == (2, 3)
    assert _reason(decode_delta, encoded, expected_shapes={"w": (3, 2)}) == "shape"
    assert _reason(decode_delta, encoded, expected_shapes={"w": (2, 3), "b": (3,)}) == "shape"


# -- zstd -------------------------------------------------------------------------------------


def _decode_zstd(blob: bytes, shapes=None, **kwargs):
    return decode_update_delta(blob, "zstd", expected_shapes=shapes or {"w": (4, 4)}, **kwargs)


def _peak(fn, *args, **kwargs) -> tuple[str, int]:
    tracemalloc.start()
    try:
        reason = _reason(fn, *args, **kwargs)
        return reason, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zip_bomb_with_declared_size_is_too_large_without_allocating() -> None:
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(100 * 1024 * 1024))
    assert len(bomb) < 10_000
    reason, peak = _peak(_decode_zstd, bomb)
    assert reason == "too_large" and peak < 1 << 20


def test_zip_bomb_without_declared_size_stops_at_the_bound() -> None:
    cobj = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
    bomb = cobj.compress(bytes(100 * 1024 * 1024)) + cobj.flush()
    assert zstandard.get_frame_parameters(bomb).content_size == zstandard.CONTENTSIZE_UNKNOWN
    bound = decompressed_bound({"w": (4, 4)})
    reason, peak = _peak(_decode_zstd, bomb)
    assert reason == "malformed" and peak < bound + (1 << 20)


def test_frames_needing_a_huge_window_are_refused() -> None:
    params = zstandard.ZstdCompressionParameters(
        window_log=27, compression_level=3, write_content_size=False
    )
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = cobj.compress(msgpack.packb({})) + cobj.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 1 << 27
    assert _reason(_decode_zstd, frame) == "malformed"


def test_decompressed_bound_fits_the_largest_legitimate_encodings() -> None:
    shapes = {"fc0.weight": (64, 64), "fc0.bias": (64,), "head.weight": (10, 64),
              "head.bias": (10,), "act": ()}
    rng = np.random.default_rng(0)
    delta = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    bound = decompressed_bound(shapes)
    for spec in ("fp32", "topk:1.0:fp32"):
        size = len(msgpack.packb(encode_delta(delta, spec)))
        assert size <= bound, (spec, size, bound)
        wire, _ = encode_update_delta(delta, spec + "+zstd")
        decode_update_delta(wire, "zstd", expected_shapes=shapes)  # not refused
    assert bound < 10 * sum(math.prod(s) for s in shapes.values()) + 10_000


def test_explicit_decompression_limit() -> None:
    wire, _ = encode_update_delta({"w": np.ones((4, 4), np.float32)}, "fp32+zstd")
    assert _decode_zstd(wire, max_decompressed=10_000)["w"].shape == (4, 4)
    assert _reason(_decode_zstd, wire, max_decompressed=50) == "too_large"


@pytest.mark.parametrize(
    "blob",
    [b"", b"not zstd at all", zstandard.ZstdCompressor().compress(b"\xc1"),
     zstandard.ZstdCompressor().compress(msgpack.packb({"w": 1}) + b"\x00"),
     zstandard.ZstdCompressor().compress(msgpack.packb({"w": 1})) + b"xx",
     zstandard.ZstdCompressor().compress(msgpack.packb({})) * 2,
     zstandard.ZstdCompressor().compress(msgpack.packb({"w": 1}))[:-3],
     zstandard.ZstdCompressor().compress(b"")],
)
def test_bad_zstd_frames_are_malformed(blob: bytes) -> None:
    assert _reason(_decode_zstd, blob) == "malformed"


def test_zstd_content_is_checked_like_a_plain_delta() -> None:
    not_a_map = zstandard.ZstdCompressor().compress(msgpack.packb([1, 2]))
    assert _reason(_decode_zstd, not_a_map) == "schema"
    wrong = zstandard.ZstdCompressor().compress(
        msgpack.packb(encode_delta({"w": np.ones((2, 2), np.float32)}, "int4"))
    )
    assert _reason(_decode_zstd, wrong) == "shape"


def test_compression_and_delta_type_must_agree() -> None:
    encoded = _wire(encode_delta({"w": np.ones((4, 4), np.float32)}, "fp32"))
    shapes = {"w": (4, 4)}
    assert _reason(decode_update_delta, encoded, "zstd", expected_shapes=shapes) == "schema"
    assert _reason(decode_update_delta, b"\x00", None, expected_shapes=shapes) == "schema"
    assert _reason(decode_update_delta, b"\x00", "lz4", expected_shapes=shapes) == "schema"
    with pytest.raises(ValueError):
        encode_delta({"w": np.ones(2, np.float32)}, "int8+zstd")  # a whole-update option


def test_model_message_carries_compression() -> None:
    wire, compression = encode_update_delta({"w": np.ones((4, 4), np.float32)}, "fp16+zstd")
    obj = GlobalModel("t1", 3, wire, 1.0, compression, run_id="r1").to_wire()
    back = GlobalModel.from_wire(unpack(pack(obj)))
    assert back.compression == "zstd" and isinstance(back.tensors, bytes)
    assert _reason(GlobalModel.from_wire, {**obj, "compression": "lz4"}) == "schema"
    assert _reason(GlobalModel.from_wire, {**obj, "compression": 1}) == "schema"
    assert _reason(GlobalModel.from_wire, {**obj, "tensors": {}}) == "schema"  # zstd: a bin
    plain = {k: v for k, v in obj.items() if k != "compression"}
    assert _reason(GlobalModel.from_wire, plain) == "schema"  # a bin without compression


def test_update_delta_type_says_whether_it_is_compressed() -> None:
    # an update has no compression field: a bin delta is a zstd frame, a map is plain
    wire, compression = encode_update_delta({"w": np.ones((4, 4), np.float32)}, "fp16+zstd")
    obj = Update("u1", "dev-1", "t1", 0, 5, wire, {}, 1.0, compression, run_id="r1").to_wire()
    assert "compression" not in obj and obj["delta"] == wire
    back = Update.from_wire(unpack(pack(obj)))
    assert back.compression == "zstd" and back.delta == wire
    plain = Update.from_wire({**obj, "delta": {}})
    assert plain.compression is None and plain.delta == {}
    for bad in ("zstd", [wire], None, 1):
        assert _reason(Update.from_wire, {**obj, "delta": bad}) == "schema"
    # a compression field is an unknown key, ignored: it cannot contradict the delta
    assert Update.from_wire({**obj, "compression": "lz4"}).compression == "zstd"
    # and a sender cannot build an update whose delta and compression disagree
    with pytest.raises(ValueError):
        Update("u1", "dev-1", "t1", 0, 5, wire, {}, 1.0, None, run_id="r1").to_wire()
    with pytest.raises(ValueError):
        Update("u1", "dev-1", "t1", 0, 5, {}, {}, 1.0, "zstd", run_id="r1").to_wire()
    with pytest.raises(ValueError):
        Update("u1", "dev-1", "t1", 0, 5, wire, {}, 1.0, "lz4", run_id="r1").to_wire()


# -- the model broadcast ----------------------------------------------------------------------


@pytest.mark.parametrize("model_codec", ["fp32", "fp16", "fp32+zstd", "fp16+zstd"])
def test_model_message_uses_the_model_codec(model_codec: str) -> None:
    rng = np.random.default_rng(0)
    state = {"w": rng.normal(size=(8, 4)).astype(np.float32), "b": np.ones(8, np.float32)}
    core = CoordinatorCore(Task("t1", ModelSpec("mlp"), TrainSpec(), run_id="r1"), state,
                           AggregationConfig(), ledger=Store(None), model_codec=model_codec)
    message = core.model_message(5.0)
    back = GlobalModel.from_wire(unpack(pack(message.to_wire()), "model"))
    assert back.compression == parse_codec(model_codec).compression
    shapes = {n: a.shape for n, a in state.items()}
    out = decode_update_delta(back.tensors, back.compression, expected_shapes=shapes)
    for name, value in state.items():
        if model_codec.startswith("fp32"):
            np.testing.assert_array_equal(out[name], value)
        else:
            np.testing.assert_allclose(out[name], value, rtol=1e-3, atol=1e-3)
