"""What a hostile payload can cost the decoders: memory within 4x its size, a refusal
with the documented reason, and checks of names, shapes and dtypes before any tensor is
converted. Peak memory is tracemalloc's (numpy's allocations included), measured while
judging a payload that was built before measuring began."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard

from bench import hostile
from coordinator.validation import Accepted, Rejected, ValidationLimits, validate_update
from fedbus.envelope import DecodeLimits
from fedbus.errors import ProtocolError
from fedbus.messages import Status, Update
from fedbus.update_codec import PackedMap, decode_update_delta, decompressed_bound
from fedbus.wire_reader import MAX_UNKNOWN_BYTES

OVERHEAD = 64 * 1024  # fixed costs of one decode: the reader, a few dicts, numpy headers
LIMITS = ValidationLimits(max_update_bytes=hostile.MAX_UPDATE_BYTES, max_norm=100.0,
                          max_staleness=10)


class NoLedger:
    def verdict(self, _update_id: str) -> None:
        return None

    def work(self, _device: str, _base: int) -> None:
        return None


def judge(payload: bytes, model: dict[str, tuple[int, ...]]) -> Accepted | Rejected | Any:
    return validate_update(payload, topic_device=hostile.DEVICE, run_id=hostile.RUN,
                           task_id=hostile.TASK, expected_shapes=model,
                           current_version=hostile.VERSION, limits=LIMITS, ledger=NoLedger())


def refusal(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, int]:
    """The reason ``fn`` refuses its input with, and the peak memory of doing so."""

    def call() -> str:
        try:
            fn(*args, **kwargs)
        except ProtocolError as exc:
            return exc.reason
        raise AssertionError("accepted")

    return peak_of(call)


def peak_of(fn: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# The verdict on each worst shape of bench.hostile. Three pad a valid update with the value
# of an unknown key, which every v2 reader ignores; they were accepted until the unknown
# keys of an update had a budget (wire_reader.MAX_UNKNOWN_BYTES, docs/protocol.md 4.2).
VERDICTS = {
    "empty_maps_unknown_key": "malformed",
    "empty_arrays_in_delta": "malformed",
    "declared_lengths": "malformed",
    "deep_nesting": "malformed",
    "tiny_tensors": "malformed",
    "many_entries": "shape",
    "extra_tensor": "shape",
    "wrong_shape": "shape",
    "topk_out_of_range": "shape",
    "zstd_bomb": "malformed",
    "duplicate_keys": "shape",
    "unknown_keys": "malformed",
}


def test_every_worst_shape_has_a_verdict() -> None:
    assert set(VERDICTS) == set(hostile.SHAPES)


@pytest.mark.parametrize("shape", sorted(hostile.SHAPES))
def test_worst_shapes_cost_at_most_four_times_their_size(shape: str) -> None:
    payload, model = hostile.SHAPES[shape]()
    assert len(payload) <= hostile.MAX_UPDATE_BYTES
    result, peak = peak_of(lambda: judge(payload, model))
    verdict = "accepted" if isinstance(result, Accepted) else result.reason
    assert verdict == VERDICTS[shape], getattr(result, "detail", "")
    bound = 4 * len(payload) + OVERHEAD
    if shape == "zstd_bomb":  # a frame may expand to the model's bound, never further
        bound += decompressed_bound(model)
    assert peak <= bound, (shape, peak, len(payload))


def test_the_issue_shape_costs_little_more_than_its_size() -> None:
    # 4 MB of one-byte empty maps cost 290 MiB when msgpack built them; skipped, about 1x
    payload, model = hostile.empty_maps_unknown_key()
    result, peak = peak_of(lambda: judge(payload, model))
    assert isinstance(result, Rejected) and result.reason == "malformed", result
    assert "unknown keys" in result.detail
    assert peak <= 2 * len(payload)


# -- names, shapes and dtypes are checked before anything is converted -------------------


def _int8(shape: tuple[int, ...]) -> dict[str, Any]:
    n = int(np.prod(shape))
    rows = [shape[0]] if len(shape) >= 2 else []
    return {"c": "int8", "t": {"dtype": "int8", "shape": list(shape), "data": bytes(n)},
            "s": {"dtype": "float32", "shape": rows, "data": bytes(4 * (rows[0] if rows else 1))}}


BIG = {"a": (1000, 1000), "b": (10,)}  # "a" decodes to 4 MB of float32


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"c": "int8", "t": {"dtype": "int16", "shape": [10], "data": bytes(20)},
          "s": {"dtype": "float32", "shape": [], "data": bytes(4)}}, "dtype"),
        (_int8((11,)), "shape"),
        ({"c": "topk", "shape": [10], "i": b"\x0b", "v": {"c": "fp32", "t": bytes(4)}}, "shape"),
        ({"c": "fp32", "t": {"dtype": "float32", "shape": [10], "data": bytes(36)}}, "shape"),
        ({"c": "zip"}, "schema"),
    ],
)
def test_a_bad_last_tensor_is_refused_before_the_first_is_converted(
    bad: dict[str, Any], reason: str
) -> None:
    packed = PackedMap(msgpack.packb({"a": _int8((1000, 1000)), "b": bad}))
    got, peak = refusal(decode_update_delta, packed, None, expected_shapes=BIG)
    assert got == reason
    assert peak < 1_500_000  # the reader's copy of the map; "a" as float32 would be 4 MB


def test_a_tensor_the_model_lacks_is_never_read() -> None:
    packed = PackedMap(msgpack.packb({"b": _int8((10,)), "zz": _int8((2000, 1000))}))
    with pytest.raises(ProtocolError, match=r"missing \['a'\], extra \['zz'\]"):
        decode_update_delta(packed, None, expected_shapes=BIG)
    reason, peak = refusal(decode_update_delta, packed, None, expected_shapes=BIG)
    assert reason == "shape" and peak <= 1.5 * len(packed) + OVERHEAD
    # more tensors than the model has: refused from the map's header alone
    three = PackedMap(msgpack.packb({"a": 1, "b": 2, "c": 3}))
    with pytest.raises(ProtocolError, match="3 tensors for a model of 2"):
        decode_update_delta(three, None, expected_shapes=BIG)


def test_an_accepted_update_costs_its_output_and_about_one_copy() -> None:
    packed = PackedMap(msgpack.packb({"a": _int8((1000, 1000)), "b": _int8((10,))}))
    out, peak = peak_of(lambda: decode_update_delta(packed, None, expected_shapes=BIG))
    assert out["a"].dtype == np.float32 and out["a"].shape == (1000, 1000)
    # the float32 output (4 MB) and the reader's copy of the map (1 MB)
    assert peak <= 4_000_000 + 2 * len(packed) + OVERHEAD


def test_topk_indices_are_checked_in_bounded_chunks() -> None:
    n = 1 << 22
    gaps = b"\x00" + b"\x01" * (n - 1)  # every index: valid, but no values to match
    entry = {"c": "topk", "shape": [n], "i": gaps, "v": {"c": "fp32", "t": b""}}
    packed = PackedMap(msgpack.packb({"w": entry}))
    with pytest.raises(ProtocolError, match="0 bytes of fp32 for 4194304 values"):
        decode_update_delta(packed, None, expected_shapes={"w": (n,)})
    reason, peak = refusal(decode_update_delta, packed, None, expected_shapes={"w": (n,)})
    assert reason == "shape" and peak <= 4 * len(packed.data) + OVERHEAD


# -- maps: repeated keys, unknown keys, declared lengths ---------------------------------


def _update_map(**overrides: Any) -> dict[str, Any]:
    wire = {"v": 2, "kind": "update", "update_id": "u-1", "dev": "dev1", "run": "r1",
            "task": "task1", "base": 5, "n": 10, "m": {}, "delta": {}, "ts": 1.0}
    wire.update(overrides)
    return wire


def _raw_map(pairs: list[tuple[str, Any]]) -> bytes:
    return bytes([0x80 | len(pairs)]) + b"".join(msgpack.packb(k) + msgpack.packb(v)
                                                 for k, v in pairs)


def _reason(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    return info.value.reason


def test_a_repeated_key_is_malformed() -> None:
    pairs = list(_update_map().items())
    assert _reason(Update.read, _raw_map([*pairs[:-1], ("dev", "dev2"), pairs[-1]])) == (
        "malformed")
    metrics = _raw_map([("loss", 1.0), ("loss", 2.0)])
    payload = _raw_map([(k, v) for k, v in pairs if k != "m"])[1:]
    head = bytes([0x80 | len(pairs)])
    assert _reason(Update.read, head + payload + msgpack.packb("m") + metrics) == "malformed"
    entry = _int8((10,))
    twice = _raw_map([("a", entry), ("a", entry)])
    assert _reason(decode_update_delta, PackedMap(twice), None) == "malformed"
    codec_twice = _raw_map([("c", "int8"), ("c", "fp32"), ("t", entry["t"])])
    assert _reason(decode_update_delta, PackedMap(b"\x81\xa1a" + codec_twice), None) == (
        "malformed")


def test_maps_read_field_by_field_hold_at_most_64_keys() -> None:
    wire = _update_map(**{f"x{i}": None for i in range(53)})  # 11 + 53 = 64 keys
    assert Update.read(msgpack.packb(wire)).update_id == "u-1"
    wire["x53"] = None
    assert _reason(Update.read, msgpack.packb(wire)) == "malformed"
    entry = {**_int8((10,)), **{f"x{i}": 0 for i in range(62)}}  # 3 + 62 = 65 keys
    assert _reason(decode_update_delta, PackedMap(msgpack.packb({"a": entry})), None) == (
        "malformed")


# -- the budget of unknown keys ----------------------------------------------------------

SMALL = {"w": (10,)}


def _with_unknown(fill: int, *, in_delta: bool = False) -> bytes:
    """A valid update whose envelope (or delta entry) has one more key, "x", whose key and
    value take ``fill`` bytes in all (a bin)."""
    value = bytes(fill - 2 - (2 if fill - 2 <= 257 else 3))  # "x" takes 2 bytes, a bin head 2-3
    extra = msgpack.packb("x") + msgpack.packb(value)
    assert len(extra) == fill
    entry = msgpack.packb(_int8((10,)))
    if in_delta:
        entry = bytes([entry[0] + 1]) + entry[1:] + extra
    wire = msgpack.packb({k: v for k, v in _update_map().items() if k != "delta"})
    head = bytes([wire[0] + 1 + (0 if in_delta else 1)])
    return (head + wire[1:] + msgpack.packb("delta") + b"\x81\xa1w" + entry
            + (b"" if in_delta else extra))


@pytest.mark.parametrize("in_delta", [False, True])
def test_unknown_keys_of_an_update_have_a_budget(in_delta: bool) -> None:
    limits = ValidationLimits(max_update_bytes=64 * 1024, max_norm=100.0, max_staleness=10)
    assert limits.decode is not None and limits.decode.max_unknown_bytes == MAX_UNKNOWN_BYTES

    def verdict(payload: bytes) -> Accepted | Rejected | Any:
        return validate_update(payload, topic_device="dev1", run_id="r1", task_id="task1",
                               expected_shapes=SMALL, current_version=5, limits=limits,
                               ledger=NoLedger())

    assert isinstance(verdict(_with_unknown(MAX_UNKNOWN_BYTES, in_delta=in_delta)), Accepted)
    over = verdict(_with_unknown(MAX_UNKNOWN_BYTES + 1, in_delta=in_delta))
    assert isinstance(over, Rejected) and over.reason == "malformed", over
    assert "unknown keys" in over.detail
    # an envelope over its budget is refused while it is read (no id, no receipt); a delta
    # over it at check 11, with the update's id for the receipt, before any conversion
    assert over.update_id == ("u-1" if in_delta else None)
    # without a budget (what a stored, already accepted update is read with) both decode
    unlimited = ValidationLimits(64 * 1024, 100.0, 10,
                                 decode=DecodeLimits(max_bytes=64 * 1024, max_bin_len=64 * 1024))
    assert isinstance(validate_update(
        _with_unknown(MAX_UNKNOWN_BYTES + 1, in_delta=in_delta), topic_device="dev1",
        run_id="r1", task_id="task1", expected_shapes=SMALL, current_version=5,
        limits=unlimited, ledger=NoLedger()), Accepted)


def test_the_budget_is_spent_across_keys_and_maps() -> None:
    # many small unknown keys add up: 40 of 110 bytes each in one envelope
    wire = _update_map(delta={"w": _int8((10,))}, **{f"x{i:02}": bytes(104) for i in range(40)})
    payload = msgpack.packb(wire)
    limits = DecodeLimits(max_unknown_bytes=MAX_UNKNOWN_BYTES)
    assert Update.read(payload).update_id == "u-1"
    assert _reason(Update.read, payload, limits) == "malformed"
    # in a delta the entries, tensor and values maps share one budget
    entry = _int8((10,))
    entry["t"]["x"] = bytes(1500)
    entry["s"]["x"] = bytes(1500)
    entry["x"] = bytes(1500)
    packed = PackedMap(msgpack.packb({"w": entry}))
    assert decode_update_delta(packed, None)["w"].shape == (10,)
    assert _reason(decode_update_delta, packed, None,
                   max_unknown_bytes=MAX_UNKNOWN_BYTES) == "malformed"


@pytest.mark.parametrize(
    "value",
    [
        b"\xdd\xff\xff\xff\xff",  # an array declaring 2^32 - 1 items, then nothing
        b"\xdf\xff\xff\xff\xff",  # a map declaring as many
        b"\xc6\xff\xff\xff\xff",  # a bin declaring 4 GiB
        b"\xdc\x10\x00" * 1000,  # 1,000 nested arrays of 4,096 declared items
        b"\x91" * 1025 + b"\x00",  # deeper than msgpack's stack
    ],
)
def test_declared_lengths_cost_nothing(value: bytes) -> None:
    body = msgpack.packb(_update_map())
    payload = bytes([body[0] + 1]) + body[1:] + msgpack.packb("x") + value
    reason, peak = refusal(Update.read, payload)
    assert reason == "malformed"
    assert peak <= 4 * len(payload) + OVERHEAD


def test_a_container_where_a_leaf_belongs_is_skipped_and_refused() -> None:
    payload = msgpack.packb(_update_map(dev=[{}] * 4000))
    reason, peak = refusal(Update.read, payload)
    assert reason == "schema" and peak <= 4 * len(payload) + OVERHEAD
    with pytest.raises(ProtocolError, match="field 'dev' has type array"):
        Update.read(payload)


STATUS_LIMITS = DecodeLimits(max_bytes=4096, max_bin_len=0, max_str_len=256, max_array_len=16,
                             max_map_len=32)


def test_status_is_read_by_schema() -> None:
    good = Status("dev1", "online", 3, 1.0, "r1")
    assert Status.read(msgpack.packb(good.to_wire()), STATUS_LIMITS) == good
    # 1,000 nested arrays declaring 15 items each: msgpack would preallocate them all
    wire = good.to_wire()
    body = msgpack.packb(wire)
    payload = bytes([body[0] + 1]) + body[1:] + msgpack.packb("x") + b"\x9f" * 1000
    reason, peak = refusal(Status.read, payload, STATUS_LIMITS)
    assert reason == "malformed" and peak <= 4 * len(payload) + OVERHEAD


def test_zstd_bomb_allocates_at_most_the_bound() -> None:
    cobj = zstandard.ZstdCompressor(level=19, write_content_size=False).compressobj()
    bomb = b"".join(cobj.compress(bytes(1 << 20)) for _ in range(64)) + cobj.flush()
    model = {"w": (256, 256)}
    reason, peak = refusal(decode_update_delta, bomb, "zstd", expected_shapes=model)
    assert reason == "malformed"
    assert peak <= decompressed_bound(model) + 4 * len(bomb) + OVERHEAD
