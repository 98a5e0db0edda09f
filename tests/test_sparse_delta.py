"""The ``sparse`` update codec (fedbus.sparse_delta, docs/protocol.md 6.8): hand-computed
vectors, round trips, and what arbitrary or altered bytes may cost a receiver."""

from __future__ import annotations

import math
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.residual import encode_with_feedback
from fedbus.codec_spec import parse_codec
from fedbus.errors import ProtocolError
from fedbus.messages import Update
from fedbus.sparse_delta import decode_sparse, encode_sparse, low_bits, sparse_order
from fedbus.update_codec import decode_update_delta, encode_delta, encode_update_delta

SHAPES = {"b": (2, 2), "a": (3,)}  # flat order: a (3 elements), then b
DELTA = {"b": np.array([[0.0, 1.0], [-0.75, 0.0]], np.float32),
         "a": np.array([0.0, -0.5, 0.25], np.float32)}
# docs/protocol.md section 6.8, examples 1 and 2, byte for byte
SIGN_VECTOR = bytes.fromhex("01 04 00 00 20 3f 52 80 90")
INT8_VECTOR = bytes.fromhex("03 02 04 02 01 3c 40 30 7f a1")
REASONS = {"malformed", "shape", "schema"}


def test_hand_computed_sign_vector() -> None:
    # k = ceil(0.5 * 7) = 4: indices 1, 2, 4, 5; L = 0; high bits 1, 3, 6, 8; signs 1001
    assert encode_sparse(DELTA, 0.5, "sign", None) == SIGN_VECTOR
    out = decode_sparse(SIGN_VECTOR, SHAPES)
    assert out["a"].tolist() == [0.0, -0.625, 0.625]
    assert out["b"].tolist() == [[0.0, 0.625], [-0.625, 0.0]]


def test_hand_computed_int8_vector() -> None:
    # k = 2: indices 4, 5; L = 1: low bits 0, 1; high bits (4>>1)+0 = 2, (5>>1)+1 = 3
    assert encode_sparse(DELTA, 0.25, "int8", None) == INT8_VECTOR
    out = decode_sparse(INT8_VECTOR, SHAPES)
    scale = np.float32(1 / 127)
    assert out["a"].tolist() == [0.0, 0.0, 0.0]
    assert out["b"].tolist() == [[0.0, float(np.float32(127) * scale)],
                                 [float(np.float32(-95) * scale), 0.0]]


def test_flat_order_is_by_name_bytes_and_l_is_integer() -> None:
    assert sparse_order({"fc0.weight": 0, "head.bias": 0, "fc0.bias": 0, "Z": 0}) == [
        "Z", "fc0.bias", "fc0.weight", "head.bias"]
    assert [low_bits(n, k) for n, k in [(7, 4), (7, 2), (7, 1), (4814, 39), (5, 5), (9, 0)]] \
        == [0, 1, 2, 6, 0, 0]


@pytest.mark.parametrize("values", ["sign", "int4", "int8"])
@pytest.mark.parametrize("fraction", [1e-9, 0.01, 0.3, 1.0])
def test_round_trip_keeps_the_global_top_k(values: str, fraction: float) -> None:
    rng = np.random.default_rng(3)
    delta = {"w": rng.normal(size=(40, 30)).astype(np.float32),
             "b": rng.normal(size=(30,)).astype(np.float32) * 3,
             "s": np.array(0.5, np.float32), "e": np.zeros((0, 4), np.float32)}
    shapes = {k: v.shape for k, v in delta.items()}
    wire, compression = encode_update_delta(delta, f"sparse:{fraction}:{values}",
                                            rng=np.random.default_rng(0))
    assert compression == "sparse" and isinstance(wire, bytes)
    out = decode_update_delta(wire, "sparse", expected_shapes=shapes)
    assert {k: v.shape for k, v in out.items()} == shapes
    flat = np.concatenate([delta[k].reshape(-1) for k in sparse_order(delta)])
    got = np.concatenate([out[k].reshape(-1) for k in sparse_order(delta)])
    k = max(1, math.ceil(fraction * flat.size))
    top = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])
    assert set(np.flatnonzero(got)) <= set(top)
    if values == "sign":
        assert np.all(np.sign(got[top]) == np.sign(flat[top]))
        assert np.allclose(np.abs(got[top]), np.abs(flat[top]).mean(), rtol=1e-6)
    else:
        step = np.abs(flat[top]).max() / (127 if values == "int8" else 7)
        assert np.all(np.abs(got[top] - flat[top]) <= step * 1.0001)


def test_error_feedback_loses_nothing() -> None:
    rng = np.random.default_rng(1)
    delta = {"w": rng.normal(size=(20, 20)).astype(np.float32)}
    spec = parse_codec("sparse:0.05:sign")
    assert spec.error_feedback and spec.compression == "sparse"
    wire, compression, residual = encode_with_feedback(delta, None, spec)
    sent = decode_update_delta(wire, compression, expected_shapes={"w": (20, 20)})
    assert np.allclose(sent["w"] + residual["w"], delta["w"], atol=1e-6)


def test_specs_and_the_update_envelope() -> None:
    assert str(parse_codec("sparse:0.008")) == "sparse:0.008:sign"
    assert str(parse_codec("sparse:0.01:int4")) == "sparse:0.01:int4"
    for bad in ("sparse:0.01:fp16", "sparse:0.01+zstd", "sparse", "sparse:2"):
        with pytest.raises(ValueError):
            parse_codec(bad)
    with pytest.raises(ValueError, match="whole-update"):
        encode_delta(DELTA, "sparse:0.5")
    update = Update("q3JxS0dK9vTb2LmA", "device-01", "digits-1", 12, 180, SIGN_VECTOR,
                    {}, 0.0, compression="sparse", run_id="hR5tWq2LmZ8vXc1E")
    back = Update.read(update.pack())
    assert back.compression == "sparse" and back.delta == SIGN_VECTOR
    with pytest.raises(ValueError):  # a sparse bin is not a zstd frame
        Update("q3JxS0dK9vTb2LmA", "device-01", "digits-1", 12, 180, SIGN_VECTOR, {}, 0.0,
               compression="zstd", run_id="hR5tWq2LmZ8vXc1E").to_wire()
    with pytest.raises(ProtocolError) as info:  # no shapes, no sparse decode
        decode_update_delta(SIGN_VECTOR, "sparse")
    assert info.value.reason == "schema"


@pytest.mark.parametrize("payload,reason", [
    (b"\x01", "malformed"),                       # no count
    (b"\x04\x00", "malformed"),                   # unknown values codec
    (b"\x01\x80\x00", "malformed"),               # count not in its shortest form
    (b"\x01\x08" + bytes(20), "shape"),           # 8 values for 7 elements
    (SIGN_VECTOR + b"\x00", "malformed"),         # a byte too many
    (SIGN_VECTOR[:-1], "malformed"),              # a byte too few
    (SIGN_VECTOR[:-1] + b"\x91", "malformed"),    # a sign padding bit set
    (SIGN_VECTOR[:6] + b"\x52\xa0\x90", "malformed"),  # five high bits for four values
    (SIGN_VECTOR[:6] + b"\x52\x00\x90", "malformed"),  # three high bits
    (SIGN_VECTOR[:6] + b"\x52\x10\x90", "shape"),  # high bit 11: index 8 of 7 elements
    (INT8_VECTOR[:6] + b"\x60" + INT8_VECTOR[7:], "malformed"),  # a low padding bit set
    (INT8_VECTOR[:6] + b"\xc0" + INT8_VECTOR[7:], "malformed"),  # indices 5, 5
])
def test_bad_bins_are_refused_with_their_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_sparse(payload, SHAPES)
    assert info.value.reason == reason


def test_a_refusal_costs_little_memory() -> None:
    """A bin claiming many indices whose last one is out of range: checked in bounded
    chunks, refused before the dense output (262,144 elements) is allocated."""
    n = 1 << 18
    shapes = {"w": (n,)}
    k = n // 2
    body = bytearray(encode_sparse({"w": np.ones(n, np.float32)}, 0.5, "sign", None))
    body[-(k // 8) - 1] |= 0x01  # a high bit past the last valid one: too many bits set
    payload = bytes(body)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode_sparse(payload, shapes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 4 * len(payload) + 64 * 1024


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_are_a_documented_refusal(data: bytes) -> None:
    try:
        out = decode_sparse(data, SHAPES)
    except ProtocolError as exc:
        assert exc.reason in REASONS
        return
    assert {k: v.shape for k, v in out.items()} == SHAPES


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["sign", "int4", "int8"]),
       st.floats(1e-4, 1.0), st.data())
def test_altered_encodings_decode_or_are_refused(seed: int, values: str, fraction: float,
                                                 data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    shapes = {"x": (int(rng.integers(1, 9)), int(rng.integers(1, 9))), "y": (3,)}
    delta = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    wire = bytearray(encode_sparse(delta, fraction, values, rng))
    assert msgpack.unpackb(msgpack.packb(bytes(wire))) == bytes(wire)
    at = data.draw(st.integers(0, len(wire) - 1))
    wire[at] ^= data.draw(st.integers(1, 255))
    try:
        decode_sparse(bytes(wire), shapes)
    except ProtocolError as exc:
        assert exc.reason in REASONS
