"""Property-based tests of the decoders (hypothesis): valid messages, tensors and deltas
come back as they were sent, and any bytes at all, or a valid payload with bytes changed,
raise nothing but ``ProtocolError`` with a documented reason."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from coordinator.validation import (
    REJECT_REASONS,
    Accepted,
    Rejected,
    Repeated,
    ValidationLimits,
    validate_update,
)
from fedbus.envelope import DecodeLimits, unpack
from fedbus.errors import ProtocolError
from fedbus.messages import Status, Update
from fedbus.tensors import DTYPES, decode_tensor, encode_tensor
from fedbus.update_codec import PackedMap, decode_update_delta, encode_update_delta
from fedbus.wire_reader import MAX_UNKNOWN_BYTES

# the reasons a decoder may give (docs/protocol.md sections 4.2, 5 and 6)
DECODE_REASONS = {"too_large", "malformed", "schema", "dtype", "shape"}
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

ID = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
             min_size=1, max_size=64)
F32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
SPECS = ["fp32", "fp16", "int8", "int4", "topk:0.5:int8", "topk:1.0:fp32", "topk:0.3:int4",
         "topk:0.2:fp16", "int8+zstd", "topk:0.5:int4+zstd", "fp32+zstd"]


def _refuses(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)``, or None when it raised a ``ProtocolError`` with a documented reason."""
    try:
        return fn(*args, **kwargs)
    except ProtocolError as exc:
        assert exc.reason in DECODE_REASONS, (exc.reason, exc.detail)
        assert exc.detail
        return None


def _mutate(data: bytes, draw: st.DrawFn) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        if not buf:
            break
        pos = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del buf[pos:pos + draw(st.integers(1, 16))]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            buf[pos] = draw(st.sampled_from([0x80, 0x90, 0xc1, 0xc4, 0xc6, 0xdc, 0xdd, 0xde,
                                             0xdf, 0xd9, 0xd4, 0xff, 0x00]))
    return bytes(buf)


@st.composite
def updates(draw: st.DrawFn) -> Update:
    metrics = draw(st.dictionaries(st.text(max_size=8), F32, max_size=5))
    return Update(draw(ID), draw(ID), draw(ID), draw(st.integers(0, 2**53)),
                  draw(st.integers(1, 2**40)), {}, metrics,
                  draw(st.floats(allow_nan=False, allow_infinity=False)), run_id=draw(ID))


@st.composite
def deltas(draw: st.DrawFn) -> dict[str, np.ndarray]:
    values = st.floats(-4, 4, allow_nan=False, width=32)
    return {name: draw(hnp.arrays(np.float32, shape, elements=values))
            for name, shape in SHAPES.items()}


# -- envelopes ---------------------------------------------------------------------------


@SETTINGS
@given(updates())
def test_updates_round_trip(update: Update) -> None:
    back = Update.read(update.pack())
    assert isinstance(back.delta, PackedMap) and msgpack.unpackb(back.delta.data) == {}
    assert back == Update(**{**update.__dict__, "delta": back.delta})


@SETTINGS
@given(st.sampled_from(["online", "training", "idle", "offline"]), st.none() | ID,
       st.none() | st.integers(0, 2**53))
def test_status_round_trips(state: str, run: str | None, version: int | None) -> None:
    status = Status("dev-1", state, version, 12.5, run)
    assert Status.read(msgpack.packb(status.to_wire())) == status


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_are_an_envelope_or_a_documented_refusal(data: bytes) -> None:
    limits = DecodeLimits(max_bytes=200)
    _refuses(Update.read, data, limits)
    _refuses(Status.read, data, limits)
    _refuses(unpack, data, None, limits)


@SETTINGS
@given(updates(), deltas(), st.sampled_from(SPECS), st.data())
def test_mutated_updates_are_judged_never_raised(update: Update, delta: dict, spec: str,
                                                 data: st.DataObject) -> None:
    wire, compression = encode_update_delta(delta, spec, rng=np.random.default_rng(0))
    sent = Update(**{**update.__dict__, "delta": wire, "compression": compression,
                     "device_id": "dev1", "task_id": "t", "run_id": "r", "base_version": 0})
    payload = data.draw(st.builds(lambda d: _mutate(sent.pack(), d.draw), st.data()))
    limits = ValidationLimits(max_update_bytes=1 << 16, max_norm=1e9, max_staleness=10)

    class Ledger:
        def verdict(self, _uid: str) -> None:
            return None

        def work(self, _dev: str, _base: int) -> None:
            return None

    result = validate_update(payload, topic_device="dev1", run_id="r", task_id="t",
                             expected_shapes=SHAPES, current_version=0, limits=limits,
                             ledger=Ledger())
    assert isinstance(result, Accepted | Rejected)
    if isinstance(result, Rejected):
        assert result.reason in REJECT_REASONS
    else:
        assert {n: a.shape for n, a in result.delta.items()} == SHAPES


@SETTINGS
@given(updates(), deltas(), st.sampled_from(SPECS), st.integers(0, 2 * MAX_UNKNOWN_BYTES))
def test_unknown_keys_within_the_budget_and_only_those_pass(
    update: Update, delta: dict, spec: str, pad: int
) -> None:
    """What the Python agent sends carries no unknown key at all (accepted with a budget
    of 0), and one unknown key is accepted exactly when key and value fit the budget."""
    wire, compression = encode_update_delta(delta, spec, rng=np.random.default_rng(0))
    sent = Update(**{**update.__dict__, "delta": wire, "compression": compression,
                     "device_id": "dev1", "task_id": "t", "run_id": "r", "base_version": 0})
    payload = sent.pack()
    extra = msgpack.packb("ext") + msgpack.packb(bytes(pad))
    assert payload[0] == 0x8B  # a fixmap of the 11 fields: one more key still fits
    padded = bytes([payload[0] + 1]) + payload[1:] + extra

    def judge(data: bytes, budget: int) -> Accepted | Rejected:
        limits = ValidationLimits(
            max_update_bytes=1 << 16, max_norm=1e9, max_staleness=10,
            decode=DecodeLimits(max_bytes=1 << 16, max_bin_len=1 << 16,
                                max_unknown_bytes=budget))

        class Ledger:
            def verdict(self, _uid: str) -> None:
                return None

            def work(self, _dev: str, _base: int) -> None:
                return None

        result = validate_update(data, topic_device="dev1", run_id="r", task_id="t",
                                 expected_shapes=SHAPES, current_version=0, limits=limits,
                                 ledger=Ledger())
        assert not isinstance(result, Repeated)
        return result

    assert isinstance(judge(payload, 0), Accepted)
    result = judge(padded, MAX_UNKNOWN_BYTES)
    if len(extra) <= MAX_UNKNOWN_BYTES:
        assert isinstance(result, Accepted), result
    else:
        assert isinstance(result, Rejected) and result.reason == "malformed", result


# -- tensors -----------------------------------------------------------------------------


@SETTINGS
@given(hnp.arrays(st.sampled_from(sorted(DTYPES)).map(np.dtype),
                  hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))
def test_tensors_round_trip(array: np.ndarray) -> None:
    wire = msgpack.unpackb(msgpack.packb(encode_tensor(array)))
    back = decode_tensor(wire)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


LEAVES = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(
    max_size=10) | st.binary(max_size=40)
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=8)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=6), max_leaves=20)
TENSORISH = st.fixed_dictionaries(
    {"dtype": st.sampled_from([*DTYPES, "float64", "object", ""]) | VALUES,
     "shape": st.lists(st.integers(-2, 2**27), max_size=8) | VALUES,
     "data": st.binary(max_size=64) | VALUES})


@SETTINGS
@given(TENSORISH | VALUES)
def test_any_tensor_map_decodes_or_is_a_documented_refusal(obj: Any) -> None:
    out = _refuses(decode_tensor, obj)
    if out is not None:
        assert out.nbytes == len(obj["data"])


# -- update codecs -----------------------------------------------------------------------


def _as_received(wire: Any, compression: str | None) -> Any:
    return wire if compression else PackedMap(msgpack.packb(wire))


@SETTINGS
@given(deltas(), st.sampled_from(SPECS))
def test_deltas_round_trip(delta: dict[str, np.ndarray], spec: str) -> None:
    wire, compression = encode_update_delta(delta, spec, stochastic=False)
    back = decode_update_delta(_as_received(wire, compression), compression,
                               expected_shapes=SHAPES)
    for name, value in delta.items():
        assert back[name].dtype == np.float32 and back[name].shape == value.shape
        if spec.startswith(("fp32", "topk:1.0:fp32")):
            np.testing.assert_array_equal(back[name], value)
        elif spec.startswith("fp16"):
            np.testing.assert_allclose(back[name], value, atol=4e-3)
        elif not spec.startswith("topk"):
            # int8: half a step of 4/127; int4: half a step of 4/7
            np.testing.assert_allclose(back[name], value, atol=0.3 if "int4" in spec else 0.02)


@SETTINGS
@given(deltas(), st.sampled_from(SPECS), st.data())
def test_mutated_deltas_decode_or_are_refused(delta: dict, spec: str,
                                              data: st.DataObject) -> None:
    wire, compression = encode_update_delta(delta, spec, rng=np.random.default_rng(1))
    packed = wire if compression else msgpack.packb(wire)
    mutated = data.draw(st.builds(lambda d: _mutate(packed, d.draw), st.data()))
    received = mutated if compression else PackedMap(mutated)
    out = _refuses(decode_update_delta, received, compression, expected_shapes=SHAPES)
    if out is not None:
        assert {n: a.shape for n, a in out.items()} == SHAPES
        assert all(a.dtype == np.float32 for a in out.values())


@SETTINGS
@given(st.binary(max_size=400))
def test_any_bytes_as_a_delta_are_a_documented_refusal(data: bytes) -> None:
    for received, compression in ((PackedMap(data), None), (data, "zstd")):
        out = _refuses(decode_update_delta, received, compression, expected_shapes=SHAPES)
        assert out is None or {n: a.shape for n, a in out.items()} == SHAPES


@SETTINGS
@given(st.dictionaries(st.sampled_from([*SHAPES, "x"]), VALUES, max_size=4))
def test_any_entry_map_is_decoded_or_a_documented_refusal(encoded: dict) -> None:
    out = _refuses(decode_update_delta, PackedMap(msgpack.packb(encoded)), None,
                   expected_shapes=SHAPES)
    assert out is None or {n: a.shape for n, a in out.items()} == SHAPES
    _refuses(decode_update_delta, encoded, None)
