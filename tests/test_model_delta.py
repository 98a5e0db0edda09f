"""Model deltas (fedbus.model_delta, docs/protocol.md 6.9 and 7.9): exact, bit for bit; the
byte-exact example; what altered or arbitrary bytes may cost a device."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.envelope import pack, unpack
from fedbus.errors import ProtocolError
from fedbus.messages import ModelDelta
from fedbus.model_delta import apply_model_delta, encode_model_delta, model_digest

OLD = {"w": np.array([1.0, 2.0], np.float32)}
NEW = {"w": np.array([1.0, 3.0], np.float32)}
# docs/protocol.md 6.9: x = [0, 0x3f800000 ^ 0x40400000 ^ ...] -> planes -> one raw zstd block
FRAME = bytes.fromhex("28 b5 2f fd 20 08 41 00 00 00 00 00 00 00 40 00 00")
# docs/protocol.md 7.9, byte for byte
MESSAGE = bytes.fromhex(
    "89 a1 76 02 a4 6b 69 6e 64 ab 6d 6f 64 65 6c 5f 64 65 6c 74 61"  # v 2, "model_delta"
    "a7 74 61 73 6b 5f 69 64 a8 64 69 67 69 74 73 2d 31"  # "task_id": "digits-1"
    "a3 72 75 6e b0 68 52 35 74 57 71 32 4c 6d 5a 38 76 58 63 31 45"  # "run"
    "a4 62 61 73 65 04 a7 76 65 72 73 69 6f 6e 05"  # "base": 4, "version": 5
    "a5 64 65 6c 74 61 c4 11" + FRAME.hex()  # "delta": bin(17)
    + "a3 73 68 61 c4 10 a4 70 77 a1 9c d7 11 ee d3 3a c9 52 16 28 ad c9"  # "sha": bin(16)
    "aa 63 72 65 61 74 65 64 5f 61 74 cb 41 da 55 6e 40 00 00 00"  # "created_at"
)


def test_hand_computed_example() -> None:
    # 2.0 = 0x40000000, 3.0 = 0x40400000: XOR 0x00400000, byte 2 of element 1
    planes = bytes([0, 0, 0, 0, 0, 0x40, 0, 0])
    assert zstandard.ZstdDecompressor().decompress(FRAME) == planes
    assert encode_model_delta(OLD, NEW) == FRAME
    sha = hashlib.sha256(bytes.fromhex("0000803f 00004040")).digest()[:16]
    assert model_digest(NEW) == sha
    out = apply_model_delta(OLD, FRAME, sha)
    assert out["w"].tobytes() == NEW["w"].tobytes()


def test_message_byte_for_byte() -> None:
    message = ModelDelta(task_id="digits-1", base=4, version=5, delta=FRAME,
                         sha=model_digest(NEW), created_at=1767225600.0,
                         run_id="hR5tWq2LmZ8vXc1E")
    assert pack(message.to_wire()) == MESSAGE
    assert ModelDelta.read(MESSAGE) == message
    assert ModelDelta.from_wire(unpack(MESSAGE, "model_delta")) == message
    for bad in ({"version": 7}, {"sha": b"\x00" * 15}, {"delta": "text"}):
        with pytest.raises(ProtocolError) as info:
            ModelDelta.from_wire({**message.to_wire(), **bad})
        assert info.value.reason == "schema"


def test_exact_whatever_the_values() -> None:
    rng = np.random.default_rng(0)
    old = {"b": rng.normal(size=(7, 5)).astype(np.float32),
           "a": np.array([0.0, -0.0, np.nan, np.inf], np.float32), "e": np.zeros((0, 3))}
    new = {"b": (old["b"] + rng.normal(size=(7, 5)) * 1e-3).astype(np.float32),
           "a": np.array([-0.0, 0.0, -np.inf, np.float32(1e-45)], np.float32),
           "e": np.zeros((0, 3), np.float32)}
    new["b"][2, :] = old["b"][2, :]  # unchanged elements cost (almost) nothing
    out = apply_model_delta(old, encode_model_delta(old, new), model_digest(new))
    for name in new:
        assert out[name].dtype == np.float32 and out[name].shape == new[name].shape
        assert out[name].tobytes() == new[name].astype(np.float32).tobytes()


def test_a_sparse_change_is_small_and_a_wrong_base_is_refused() -> None:
    rng = np.random.default_rng(1)
    old = {"w": rng.normal(size=(100, 100)).astype(np.float32)}
    new = {"w": old["w"].copy()}
    new["w"].reshape(-1)[rng.choice(10_000, 100, replace=False)] += np.float32(0.01)
    frame = encode_model_delta(old, new)
    assert len(frame) < 1_500  # against 40,000 bytes of float32
    other = {"w": old["w"] + np.float32(1)}
    with pytest.raises(ProtocolError) as info:
        apply_model_delta(other, frame, model_digest(new))
    assert info.value.reason == "base"
    with pytest.raises(ProtocolError) as info:  # a model of another size
        apply_model_delta({"w": np.zeros(10, np.float32)}, frame, model_digest(new))
    assert info.value.reason == "malformed"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_any_bytes_are_a_documented_refusal(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        apply_model_delta(OLD, data, model_digest(NEW))
    assert info.value.reason in ("malformed", "base")


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(FRAME) - 1), st.integers(1, 255))
def test_an_altered_frame_never_yields_another_model(at: int, flip: int) -> None:
    frame = bytearray(FRAME)
    frame[at] ^= flip
    try:
        out = apply_model_delta(OLD, bytes(frame), model_digest(NEW))
    except ProtocolError as exc:
        assert exc.reason in ("malformed", "base")
    else:
        assert out["w"].tobytes() == NEW["w"].tobytes()


def test_an_old_broker_directory_lets_its_devices_read_the_delta() -> None:
    from fedbus import dynsec

    new = dynsec.initial_config("fedbus", admin_password="a", coordinator_password="c",
                                devices={"dev-a": "d"}, operator_password="o")
    assert dynsec.with_operator(new, "fedbus", "o") is None
    role = dynsec.device_role("fedbus", "dev-a")
    older = {**role, "acls": [a for a in role["acls"] if "model_delta" not in a["topic"]]}
    before = {**new, "roles": [older if r["rolename"] == role["rolename"] else r
                               for r in new["roles"]]}
    updated = dynsec.with_operator(before, "fedbus", "o")
    assert updated is not None and role in updated["roles"]
    assert updated["clients"] == new["clients"]
