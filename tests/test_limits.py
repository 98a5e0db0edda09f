"""The message size limits derived from the model (coordinator.limits): no honest update,
in any codec, is ever longer than the bound; the coordinator's receive limit follows."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from coordinator.limits import (
    PACKET_HEADROOM,
    SMALL_MESSAGE_BYTES,
    default_max_update_bytes,
    model_size_bound,
    receive_packet_limit,
)
from fedbus.envelope import pack
from fedbus.messages import UPDATE_FIELDS_BOUND, Update, update_size_bound
from fedbus.update_codec import decompressed_bound, delta_wire_bound, encode_update_delta

VALUES = ("fp32", "fp16", "int8", "int4")
CODECS = [*VALUES, *(f"topk:{f}:{v}" for f in (1.0, 0.5, 0.1, 0.001) for v in VALUES)]
SPECS = [*CODECS, *(f"{c}+zstd" for c in CODECS),
         *(f"sparse:{f}:{v}" for f in (1.0, 0.01) for v in ("sign", "int4", "int8"))]
MIB = 1024 * 1024


def _zoo() -> dict[str, dict[str, tuple[int, ...]]]:
    from fedbus.zoo import build_model, state_shapes

    models = {
        "mlp demo": ("mlp", {"in_features": 64, "hidden": [64], "num_classes": 10}),
        "mlp deep": ("mlp", {"in_features": 784, "hidden": [128, 64], "num_classes": 10}),
        "cnn": ("cnn", {"in_channels": 1, "height": 8, "width": 8, "num_classes": 10}),
        "cnn1d": ("cnn1d", {"in_channels": 6, "length": 100, "num_classes": 4}),
    }
    shapes = {name: state_shapes(build_model(arch, args)) for name, (arch, args) in
              models.items()}
    # shapes no zoo model has that cost a codec most: a scale per single-element row, and
    # many scalars (per-tensor overhead)
    shapes["rows of one"] = {"w": (3000, 1)}
    shapes["scalars"] = {f"s{i}": () for i in range(300)}
    return shapes


ZOO = _zoo()


def _widest_update(delta: object, compression: str | None) -> Update:
    """An update whose every field but the delta is as long as the checks allow."""
    metrics = {f"{i:02d}".ljust(4096, "m"): 1e300 for i in range(32)}  # float64 stays
    return Update(
        update_id="u" * 64, device_id="d" * 64, task_id="t" * 64, base_version=2**53,
        num_samples=2**40, delta=delta, metrics=metrics, sent_at=1e300,  # type: ignore[arg-type]
        compression=compression, run_id="r" * 64,
    )


@pytest.mark.parametrize("model", sorted(ZOO))
def test_no_honest_update_is_longer_than_the_bound(model: str) -> None:
    shapes = ZOO[model]
    rng = np.random.default_rng(7)
    # random values at different scales (within float16): little for zstd to squeeze out
    delta = {name: (rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 4, shape))
             .astype(np.float32) for name, shape in shapes.items()}
    bound = update_size_bound(shapes)
    limit = default_max_update_bytes(shapes, 1 << 40)
    for spec in SPECS:
        wire, compression = encode_update_delta(delta, spec, rng=rng)
        sizes = [len(pack({"d": wire})) - 2]  # the delta value alone ("d" and a fixmap)
        assert max(sizes) <= delta_wire_bound(shapes), spec
        update = _widest_update(wire, compression)
        longest = max(len(update.pack()), len(pack(update.to_wire())))
        assert longest <= bound <= limit, (spec, longest, bound)


def test_the_field_bound_is_what_the_widest_fields_take() -> None:
    empty = _widest_update({}, None)
    # every field but the delta at its longest, and an empty delta map (1 byte)
    assert len(pack(empty.to_wire())) - 1 <= UPDATE_FIELDS_BOUND
    assert len(pack(empty.to_wire())) >= UPDATE_FIELDS_BOUND - 64  # and not much more


def test_zstd_of_incompressible_bytes_stays_within_the_delta_bound() -> None:
    shapes = ZOO["mlp demo"]
    noise = np.random.default_rng(1).bytes(decompressed_bound(shapes))
    frame = zstandard.ZstdCompressor(level=3).compress(noise)
    assert len(frame) > len(noise)  # zstd made it longer
    assert len(pack(frame)) <= delta_wire_bound(shapes)


def test_the_default_limit_follows_the_model_and_fits_the_broker() -> None:
    demo = ZOO["mlp demo"]
    limit = default_max_update_bytes(demo, 8 * MIB)
    assert limit == 299_783  # docs/operations.md, the flood benchmark
    assert 2 * delta_wire_bound(demo) + UPDATE_FIELDS_BOUND < limit < 4 * MIB
    # a model whose updates could not fit one packet: the broker's limit, less the header
    big = {"w": (2048, 1024)}
    assert default_max_update_bytes(big, 8 * MIB) == 8 * MIB - PACKET_HEADROOM


def test_the_receive_limit_covers_updates_models_tasks_and_status() -> None:
    demo = ZOO["mlp demo"]
    limit = default_max_update_bytes(demo, 8 * MIB)
    assert receive_packet_limit(limit, demo, 8 * MIB) == limit + PACKET_HEADROOM
    # a small explicit update limit: the model message (a replay on the model topic must
    # still be noticed) or a task decides
    assert receive_packet_limit(1000, demo, 8 * MIB) == max(
        model_size_bound(demo), SMALL_MESSAGE_BYTES) + PACKET_HEADROOM
    assert receive_packet_limit(10, {"b": (4,)}, 8 * MIB) == SMALL_MESSAGE_BYTES + PACKET_HEADROOM
    # never above the broker's own limit
    assert receive_packet_limit(16 * MIB, demo, 8 * MIB) == 8 * MIB
