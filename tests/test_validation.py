"""validate_update: one test per reject reason, the order of checks, and hostile bytes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import zstandard

from coordinator.journal import Verdict
from coordinator.validation import (
    REJECT_REASONS,
    Accepted,
    Rejected,
    Repeated,
    ValidationLimits,
    payload_digest,
    validate_update,
)
from fedbus.envelope import DecodeLimits, pack
from fedbus.messages import Update
from fedbus.tensors import encode_tensor
from fedbus.update_codec import encode_delta, encode_update_delta

F32 = np.float32
SHAPES = {"w": (2, 3), "b": (3,)}
LIMITS = ValidationLimits(max_update_bytes=64 * 1024, max_norm=10.0, max_staleness=3)
CURRENT = 5


def good_delta(scale: float = 0.1) -> dict[str, np.ndarray]:
    return {
        "w": np.arange(6, dtype=F32).reshape(2, 3) * F32(scale),
        "b": np.array([1, -1, 0.5], dtype=F32) * F32(scale),
    }


def make_payload(
    *,
    encoded: dict[str, Any] | None = None,
    codec: str = "fp32",
    delta: dict[str, np.ndarray] | None = None,
    **fields: Any,
) -> bytes:
    values: dict[str, Any] = {
        "update_id": "u-1",
        "device_id": "dev1",
        "task_id": "task1",
        "base_version": CURRENT,
        "num_samples": 10,
        "sent_at": 1.0,
    }
    values.update(fields)
    if encoded is None:
        encoded = encode_delta(good_delta() if delta is None else delta, codec, stochastic=False)
    return pack(Update(delta=encoded, **values, run_id="r1").to_wire())


class Ledger:
    """The coordinator's memory of verdicts and work, as plain dicts."""

    def __init__(self) -> None:
        self.verdicts: dict[str, Verdict] = {}
        self.works: dict[tuple[str, int], str] = {}

    def verdict(self, update_id: str) -> Verdict | None:
        return self.verdicts.get(update_id)

    def work(self, device_id: str, base_version: int) -> str | None:
        return self.works.get((device_id, base_version))

    def judged(self, payload: bytes, update_id: str = "u-1", device: str = "dev1",
               accepted: bool = True) -> Ledger:
        self.verdicts[update_id] = Verdict(
            update_id, device, payload_digest(payload), CURRENT, accepted,
            None if accepted else "stale", "judged before", CURRENT, 0 if accepted else None,
        )
        return self


def run(
    payload: Any,
    *,
    seen: Ledger | None = None,
    limits: ValidationLimits = LIMITS,
    topic_device: str = "dev1",
    retained: bool = False,
    run_id: str = "r1",
) -> Accepted | Rejected | Repeated:
    return validate_update(
        payload,
        topic_device=topic_device,
        run_id=run_id,
        task_id="task1",
        expected_shapes=SHAPES,
        current_version=CURRENT,
        limits=limits,
        ledger=Ledger() if seen is None else seen,
        retained=retained,
    )


def rejected(result: Accepted | Rejected | Repeated, reason: str) -> Rejected:
    assert isinstance(result, Rejected), result
    assert result.reason == reason, (result.reason, result.detail)
    assert result.reason in REJECT_REASONS
    assert result.detail
    return result


# -- accepted ---------------------------------------------------------------------------


def test_valid_update_is_accepted() -> None:
    payload = make_payload()
    seen = Ledger()
    result = run(payload, seen=seen)
    assert isinstance(result, Accepted)
    assert result.update.update_id == "u-1"
    assert result.update.num_samples == 10
    assert result.staleness == 0
    assert result.size == len(payload)
    expected = good_delta()
    for name in SHAPES:
        np.testing.assert_array_equal(result.delta[name], expected[name])
        assert result.delta[name].dtype == F32
    # norm = 0.1 * sqrt(0+1+4+9+16+25 + 1+1+0.25) = 0.1 * sqrt(57.25)
    assert result.norm == pytest.approx(0.1 * math.sqrt(57.25), rel=1e-6)
    assert result.payload == payload and result.digest == payload_digest(payload)
    assert not seen.verdicts  # validate_update only reads the ledger


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_compressed_codecs_are_accepted(codec: str) -> None:
    result = run(make_payload(codec=codec))
    assert isinstance(result, Accepted)
    np.testing.assert_allclose(result.delta["w"], good_delta()["w"], atol=0.01)


def test_staleness_up_to_the_bound_is_accepted() -> None:
    result = run(make_payload(base_version=CURRENT - LIMITS.max_staleness))
    assert isinstance(result, Accepted)
    assert result.staleness == 3


# -- one test per reason ----------------------------------------------------------------


def test_too_large() -> None:
    payload = make_payload()
    small = ValidationLimits(max_update_bytes=len(payload) - 1, max_norm=10.0, max_staleness=3)
    r = rejected(run(payload, limits=small), "too_large")
    assert r.size == len(payload)
    assert r.update_id is None


def test_too_large_is_checked_before_decoding() -> None:
    garbage = b"\xc1" * (LIMITS.max_update_bytes + 1)  # 0xc1 is never valid msgpack
    rejected(run(garbage), "too_large")


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1v"])
def test_malformed(payload: bytes) -> None:
    r = rejected(run(payload), "malformed")
    assert r.update_id is None


def test_malformed_truncated_update() -> None:
    payload = make_payload()
    rejected(run(payload[: len(payload) // 2]), "malformed")


def test_decode_limits_are_applied() -> None:
    # a tensor of 24 bytes exceeds a max_bin_len of 8: msgpack refuses it
    tight = ValidationLimits(
        max_update_bytes=64 * 1024,
        max_norm=10.0,
        max_staleness=3,
        decode=DecodeLimits(max_bytes=64 * 1024, max_bin_len=8),
    )
    rejected(run(make_payload(), limits=tight), "malformed")


def test_decode_limits_derive_from_max_update_bytes() -> None:
    limits = ValidationLimits(max_update_bytes=1234, max_norm=1.0, max_staleness=0)
    assert limits.decode is not None
    assert limits.decode.max_bytes == 1234
    assert limits.decode.max_bin_len == 1234


@pytest.mark.parametrize(
    "message",
    [
        [1, 2, 3],
        {"v": 2, "kind": "update"},
        {"v": 1, "kind": "status"},
        {"v": 1, "kind": "update", "update_id": "x"},
    ],
)
def test_schema_envelope(message: Any) -> None:
    rejected(run(pack(message)), "schema")


def test_schema_bad_field_keeps_a_readable_update_id() -> None:
    wire = Update("u-9", "dev1", "task1", CURRENT, 10, encode_delta(good_delta(), "fp32"),
                  run_id="r1").to_wire()
    wire["n"] = 0  # num_samples
    r = rejected(run(pack(wire)), "schema")
    assert r.update_id == "u-9"  # so the device can get a receipt
    wire["update_id"] = "not a valid id!"
    assert rejected(run(pack(wire)), "schema").update_id is None


def test_schema_in_delta_entry() -> None:
    encoded = encode_delta(good_delta(), "fp32")
    encoded["b"] = {"c": "zstd", "t": encoded["b"]["t"]}
    rejected(run(make_payload(encoded=encoded)), "schema")


def test_device_mismatch() -> None:
    r = rejected(run(make_payload(device_id="dev1"), topic_device="dev2"), "device_mismatch")
    assert r.update_id == "u-1"
    assert r.device_id == "dev1"


def test_dtype_not_in_whitelist() -> None:
    encoded = encode_delta(good_delta(), "fp32")
    encoded["w"]["t"] = {"dtype": "float64", "shape": [2, 3], "data": bytes(48)}
    rejected(run(make_payload(encoded=encoded)), "dtype")


def test_dtype_not_matching_codec() -> None:
    encoded = encode_delta(good_delta(), "fp32")
    encoded["w"] = {"c": "fp32", "t": encode_tensor(np.zeros((2, 3), np.int32))}
    rejected(run(make_payload(encoded=encoded)), "dtype")


def test_shape_wrong_shape() -> None:
    delta = good_delta()
    delta["w"] = np.zeros((3, 2), F32)
    r = rejected(run(make_payload(delta=delta)), "shape")
    assert "'w'" in r.detail


def test_shape_missing_and_extra_tensor() -> None:
    delta = good_delta()
    del delta["b"]
    rejected(run(make_payload(delta=delta)), "shape")
    delta = good_delta()
    delta["extra"] = np.zeros(1, F32)
    rejected(run(make_payload(delta=delta)), "shape")


def test_shape_length_mismatch_on_the_wire() -> None:
    encoded = encode_delta(good_delta(), "fp32")
    encoded["w"]["t"] = {"dtype": "float32", "shape": [2, 3], "data": bytes(20)}
    rejected(run(make_payload(encoded=encoded)), "shape")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    delta = good_delta()
    delta["b"][1] = bad
    r = rejected(run(make_payload(delta=delta)), "non_finite")
    assert "b" in r.detail


def test_non_finite_from_fp16_overflow() -> None:
    delta = good_delta()
    delta["w"][0, 0] = 1e6  # beyond float16's range -> inf
    with np.errstate(over="ignore"):
        payload = make_payload(delta=delta, codec="fp16")
    rejected(run(payload), "non_finite")


def test_norm() -> None:
    delta = {"w": np.full((2, 3), 5.0, F32), "b": np.zeros(3, F32)}  # sqrt(6*25) ≈ 12.2 > 10
    r = rejected(run(make_payload(delta=delta)), "norm")
    assert r.update_id == "u-1"


def test_wrong_task() -> None:
    rejected(run(make_payload(task_id="task2")), "wrong_task")


def test_future_version() -> None:
    rejected(run(make_payload(base_version=CURRENT + 1)), "future_version")


def test_stale() -> None:
    rejected(run(make_payload(base_version=CURRENT - LIMITS.max_staleness - 1)), "stale")


def test_a_copy_of_a_judged_update_is_repeated_not_judged() -> None:
    payload = make_payload()
    for accepted in (True, False):
        result = run(payload, seen=Ledger().judged(payload, accepted=accepted))
        assert isinstance(result, Repeated)
        assert result.verdict.accepted is accepted and result.size == len(payload)


def test_duplicate_id_with_other_bytes_or_from_another_device() -> None:
    first = make_payload()
    seen = Ledger().judged(first)
    rejected(run(make_payload(num_samples=11), seen=seen), "duplicate")
    other = Ledger().judged(first, device="dev2")
    rejected(run(first, seen=other), "duplicate")
    assert isinstance(run(make_payload(update_id="u-2"), seen=seen), Accepted)


def test_duplicate_work_is_a_retrained_copy() -> None:
    seen = Ledger()
    seen.works[("dev1", CURRENT)] = "u-0"
    result = rejected(run(make_payload(), seen=seen), "duplicate_work")
    assert "u-0" in result.detail
    assert isinstance(run(make_payload(base_version=CURRENT - 1), seen=seen), Accepted)


def test_wrong_run_and_retained() -> None:
    rejected(run(make_payload(), run_id="r2"), "wrong_run")
    result = rejected(run(make_payload(), retained=True), "retained")
    assert result.update_id == "u-1"


# -- order of checks --------------------------------------------------------------------


def test_order_of_checks() -> None:
    seen = Ledger().judged(b"other bytes")
    seen.works[("dev1", CURRENT)] = "u-0"
    nan = good_delta()
    nan["w"][0, 0] = np.nan
    wrong_shape = {"w": np.full((3, 3), np.nan, F32), "b": np.zeros(3, F32)}
    huge = {"w": np.full((2, 3), 100.0, F32), "b": np.zeros(3, F32)}
    # every later failure is also present; the earliest one wins
    cases = [
        (make_payload(delta=wrong_shape, task_id="t9", base_version=99), "dev2", "device_mismatch",
         {"retained": True}),
        (make_payload(delta=wrong_shape, task_id="t9", base_version=99), "dev1", "retained",
         {"retained": True, "run_id": "r2"}),
        (make_payload(delta=wrong_shape, task_id="t9", base_version=99), "dev1", "wrong_run",
         {"run_id": "r2"}),
        # the task is a field compare: checked before any tensor is decoded
        (make_payload(delta=wrong_shape, task_id="t9", base_version=99), "dev1", "wrong_task", {}),
        # ids and versions are read off the envelope, before any tensor is decoded
        (make_payload(delta=wrong_shape, base_version=99), "dev1", "duplicate", {}),
        (make_payload(delta=wrong_shape, base_version=99, update_id="u-2"), "dev1",
         "future_version", {}),
        (make_payload(delta=wrong_shape, base_version=0, update_id="u-2"), "dev1", "stale", {}),
        (make_payload(delta=wrong_shape, update_id="u-2"), "dev1", "duplicate_work", {}),
        (make_payload(delta=wrong_shape, update_id="u-2", base_version=CURRENT - 1), "dev1",
         "shape", {}),
        (make_payload(delta=nan, update_id="u-2", base_version=CURRENT - 1), "dev1",
         "non_finite", {}),
        (make_payload(delta=huge, update_id="u-2", base_version=CURRENT - 1), "dev1", "norm",
         {}),
    ]
    for payload, topic_device, reason, extra in cases:
        rejected(run(payload, seen=seen, topic_device=topic_device, **extra), reason)


# -- hostile bytes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        # zero rows in an int8 tensor: update_codec's reshape raises ValueError
        {
            "c": "int8",
            "t": {"dtype": "int8", "shape": [0, 3], "data": b""},
            "s": {"dtype": "float32", "shape": [0], "data": b""},
        },
        # dimensions beyond numpy's index range with zero elements
        {"c": "fp32", "t": {"dtype": "float32", "shape": [2**63, 0], "data": b""}},
        {"c": "fp32", "t": {"dtype": "float32", "shape": [2**40, 2**40, 0], "data": b""}},
        {"c": "fp32", "t": {"dtype": "float32", "shape": [-1], "data": b""}},
        {"c": "fp32", "t": {"dtype": "float32", "shape": [1] * 7, "data": bytes(4)}},
        {"c": "fp32", "t": {"dtype": "float32", "shape": [2**30, 2**30], "data": b""}},
        {"c": "int8", "t": {"dtype": "int8", "shape": [2, 3], "data": bytes(6)}},
        "not a map",
    ],
)
def test_hostile_tensor_entries_are_rejected_not_raised(entry: Any) -> None:
    encoded = encode_delta(good_delta(), "fp32")
    encoded["w"] = entry
    result = run(make_payload(encoded=encoded))
    assert isinstance(result, Rejected)
    assert result.reason in REJECT_REASONS


@pytest.mark.parametrize("payload", [None, 12, "text", object()])
def test_non_bytes_payload_is_malformed(payload: Any) -> None:
    rejected(run(payload), "malformed")


def test_fuzz_random_truncated_and_bit_flipped_bytes_never_raise() -> None:
    rng = np.random.default_rng(1234)
    base = make_payload()
    reasons: set[str] = set()
    for i in range(3000):
        kind = i % 4
        if kind == 0:
            data = rng.integers(0, 256, size=int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
        elif kind == 1:
            data = base[: int(rng.integers(0, len(base)))]
        elif kind == 2:
            buf = bytearray(base)
            for _ in range(int(rng.integers(1, 8))):
                pos = int(rng.integers(0, len(buf)))
                buf[pos] ^= 1 << int(rng.integers(0, 8))
            data = bytes(buf)
        else:
            buf = bytearray(base)
            pos = int(rng.integers(0, len(buf)))
            buf[pos:pos] = rng.integers(
                0, 256, size=int(rng.integers(1, 6)), dtype=np.uint8
            ).tobytes()
            data = bytes(buf)
        result = run(data)
        assert isinstance(result, Accepted | Rejected)
        if isinstance(result, Rejected):
            assert result.reason in REJECT_REASONS
            assert result.size == len(data)
            assert len(result.detail) <= 300
            reasons.add(result.reason)
        else:
            assert all(np.isfinite(a).all() for a in result.delta.values())
            assert result.norm <= LIMITS.max_norm
    # the fuzzer reached past the msgpack layer
    assert {"malformed", "schema"} <= reasons
    assert len(reasons) >= 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_update_bytes": 0, "max_norm": 1.0, "max_staleness": 0},
        {"max_update_bytes": 10, "max_norm": 0.0, "max_staleness": 0},
        {"max_update_bytes": 10, "max_norm": math.inf, "max_staleness": 0},
        {"max_update_bytes": 10, "max_norm": 1.0, "max_staleness": -1},
    ],
)
def test_validation_limits_are_checked(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ValidationLimits(**kwargs)


# -- new codecs: int4, topk, +zstd ------------------------------------------------------


def spec_payload(spec: str, delta: dict[str, np.ndarray] | None = None, **fields: Any) -> bytes:
    """An update encoded with a codec spec, compression field included."""
    wire, compression = encode_update_delta(
        good_delta() if delta is None else delta, spec, rng=np.random.default_rng(0)
    )
    values: dict[str, Any] = {
        "update_id": "u-1", "device_id": "dev1", "task_id": "task1",
        "base_version": CURRENT, "num_samples": 10, "sent_at": 1.0,
    }
    values.update(fields)
    return pack(Update(delta=wire, compression=compression, **values, run_id="r1").to_wire())


def zstd_payload(blob: bytes, **fields: Any) -> bytes:
    values: dict[str, Any] = {
        "update_id": "u-1", "device_id": "dev1", "task_id": "task1",
        "base_version": CURRENT, "num_samples": 10, "sent_at": 1.0,
    }
    values.update(fields)
    return pack(Update(delta=blob, compression="zstd", **values, run_id="r1").to_wire())


@pytest.mark.parametrize(
    "spec",
    ["int4", "int4+zstd", "fp32+zstd", "fp16+zstd", "int8+zstd", "topk:0.5:int8",
     "topk:0.5:int4+zstd", "topk:1.0:fp32+zstd", "topk:0.01:fp16"],
)
def test_new_codecs_are_accepted(spec: str) -> None:
    result = run(spec_payload(spec))
    assert isinstance(result, Accepted), result
    if spec == "topk:1.0:fp32+zstd":
        np.testing.assert_array_equal(result.delta["w"], good_delta()["w"])
    assert set(result.delta) == set(SHAPES)


def test_int4_bad_packed_length_is_shape() -> None:
    encoded = encode_delta(good_delta(), "int4")
    encoded["w"]["t"] = {"dtype": "uint8", "shape": [4], "data": bytes(4)}  # 6 values: 3 bytes
    rejected(run(make_payload(encoded=encoded)), "shape")


def _topk(indices: bytes, count: int, shape: list[int]) -> dict[str, Any]:
    return {
        "c": "topk",
        "shape": shape,
        "i": indices,
        "v": {"c": "fp32", "t": np.ones(count, F32).tobytes()},
    }


@pytest.mark.parametrize(
    "indices,count",
    [(b"\x06", 1), (b"\x02\x04", 2), (b"\x01\x00", 2), (b"\x01\x01", 1), (b"\x81", 1)],
    ids=["out_of_range", "out_of_range_by_gaps", "duplicate", "count_mismatch", "truncated"],
)
def test_topk_bad_indices_are_shape(indices: bytes, count: int) -> None:
    encoded = encode_delta(good_delta(), "fp32")
    encoded["w"] = _topk(indices, count, [2, 3])
    r = rejected(run(make_payload(encoded=encoded)), "shape")
    assert r.update_id == "u-1"


def test_topk_claiming_a_huge_shape_is_shape_without_expanding() -> None:
    encoded = encode_delta(good_delta(), "fp32")
    encoded["w"] = _topk(b"\x01", 1, [2**26])
    r = rejected(run(make_payload(encoded=encoded)), "shape")
    assert "(67108864,)" in r.detail


def test_zip_bomb_is_too_large_with_a_receipt() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(50 * 1024 * 1024))
    payload = zstd_payload(bomb)
    assert len(payload) < LIMITS.max_update_bytes
    r = rejected(run(payload), "too_large")
    assert r.update_id == "u-1" and "zstd" in r.detail


@pytest.mark.parametrize(
    "blob",
    [b"garbage", zstandard.ZstdCompressor().compress(b"\xc1\xc1"),
     zstandard.ZstdCompressor().compress(pack({"w": 1})) + b"trailing"],
)
def test_bad_zstd_delta_is_malformed(blob: bytes) -> None:
    rejected(run(zstd_payload(blob)), "malformed")


def test_the_delta_type_says_whether_it_is_compressed() -> None:
    wire = Update("u-1", "dev1", "task1", CURRENT, 10, encode_delta(good_delta(), "fp32"),
                  run_id="r1").to_wire()
    assert isinstance(run(pack(wire)), Accepted)  # a map: plain entries
    # an update has no compression field: a stray one is an unknown key, ignored
    assert isinstance(run(pack({**wire, "compression": "zstd"})), Accepted)
    r = rejected(run(pack({**wire, "delta": "zstd"})), "schema")  # neither a map nor a bin
    assert r.update_id == "u-1"
    # a bin is a zstd frame, whatever it holds
    rejected(run(pack({**wire, "delta": pack(wire["delta"])})), "malformed")


def test_order_of_checks_with_compression() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(50 * 1024 * 1024))
    # the topic's device is checked before anything is decompressed
    rejected(run(zstd_payload(bomb), topic_device="dev2"), "device_mismatch")
    # the task is checked before anything is decompressed, too
    rejected(run(zstd_payload(bomb, task_id="t9")), "wrong_task")
    # so are versions and ids: a replayed bomb is refused without being decompressed
    seen = Ledger().judged(b"other bytes")
    rejected(run(zstd_payload(bomb, base_version=99)), "future_version")
    rejected(run(zstd_payload(bomb), seen=seen), "duplicate")
    # decompression comes before the checks on values
    rejected(run(zstd_payload(bomb, update_id="u-2"), seen=seen), "too_large")
    nan = good_delta()
    nan["w"][0, 0] = np.nan
    rejected(run(spec_payload("topk:1.0:fp32+zstd", nan)), "non_finite")


def test_any_valid_codec_is_accepted_whatever_the_task_asks() -> None:
    from coordinator.core import AggregationConfig, CoordinatorCore, SendReceipt
    from fedbus.messages import ModelSpec, Task, TrainSpec

    task = Task("task1", ModelSpec("mlp"), TrainSpec(), codec="int8", run_id="r1")
    state = {name: np.zeros(shape, F32) for name, shape in SHAPES.items()}
    core = CoordinatorCore(task, state, AggregationConfig(buffer_size=10), ledger=Ledger())
    for i, spec in enumerate(["int4+zstd", "topk:0.5:int8", "fp32", "int8"]):
        payload = spec_payload(spec, update_id=f"u-{i}", base_version=0, device_id=f"dev{i}")
        actions = core.on_update(f"dev{i}", payload, 0.0)
        receipt = next(a.receipt for a in actions if isinstance(a, SendReceipt))
        assert receipt.accepted, (spec, receipt.reason, receipt.detail)
    assert core.counters["updates_accepted"] == 4


def test_fuzz_compressed_updates_never_raise() -> None:
    rng = np.random.default_rng(99)
    bases = [spec_payload("int4+zstd"), spec_payload("topk:0.5:int4+zstd"),
             spec_payload("topk:0.5:int8")]
    reasons: set[str] = set()
    for i in range(1500):
        buf = bytearray(bases[i % len(bases)])
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, len(buf)))
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        result = run(bytes(buf))
        if isinstance(result, Rejected):
            assert result.reason in REJECT_REASONS
            reasons.add(result.reason)
        else:
            assert all(np.isfinite(a).all() for a in result.delta.values())
            assert {n: a.shape for n, a in result.delta.items()} == SHAPES
    assert {"malformed", "shape"} <= reasons
