"""Hostile update payloads: the worst shapes we know for the coordinator's decoder.

Each builder returns ``(payload, expected_shapes)``: the bytes a device could send (at most
``size`` bytes, ``MAX_UPDATE_BYTES`` unless given: the builders that fill a message take
it, the others are smaller anyway) and the model they are sent against. Every payload is
fresh, for the right run, task and device, so it reaches the tensor decoding; none of them
is a valid update. The builders need only msgpack, numpy and zstandard (no fedbus), so the
same payloads can be measured against older code (``python -m bench.decode_worst``).
"""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import numpy as np
import zstandard

__all__ = ["BIG_MODEL", "DEMO_MODEL", "DEVICE", "MAX_UPDATE_BYTES", "RUN", "SHAPES", "TASK",
           "VERSION"]

# the fixed default max_update_bytes before it followed the model (coordinator.limits)
MAX_UPDATE_BYTES = 4 * 1024 * 1024
# the demo's mlp 64-[64]-10 (docs/protocol.md section 8.3), 4,814 elements
DEMO_MODEL: dict[str, tuple[int, ...]] = {
    "input_q.act_min": (),
    "input_q.act_max": (),
    "fc0.weight": (64, 64),
    "fc0.bias": (64,),
    "q0.act_min": (),
    "q0.act_max": (),
    "head.weight": (10, 64),
    "head.bias": (10,),
}
BIG_MODEL: dict[str, tuple[int, ...]] = {"w": (2048, 2048)}  # 4 Mi elements, 16 MiB as float32
# what validate_update is told: run r1, task task1, device dev1, current version 5
RUN, TASK, DEVICE, VERSION = "r1", "task1", "dev1", 5

_packb = msgpack.Packer(use_bin_type=True).pack


def _map(pairs: list[tuple[str, bytes]]) -> bytes:
    """A msgpack map from already-packed values (so a value can be any bytes at all)."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(_packb(k) + v for k, v in pairs)


def envelope(delta: bytes, *extra: tuple[str, bytes], update_id: str = "hostile-1") -> bytes:
    """An update envelope around an already-packed ``delta`` (and extra, unknown keys)."""
    fields = {"v": 2, "kind": "update", "update_id": update_id, "dev": DEVICE,
              "run": RUN, "task": TASK, "base": VERSION,
              "n": 10, "m": {}}
    pairs = [(k, _packb(v)) for k, v in fields.items()]
    return _map([*pairs, ("delta", delta), *extra, ("ts", _packb(1.0))])


def _int8_entry(shape: tuple[int, ...]) -> bytes:
    n = int(np.prod(shape)) if shape else 1
    rows = (shape[0],) if len(shape) >= 2 else ()
    return _packb({"c": "int8",
                   "t": {"dtype": "int8", "shape": list(shape), "data": bytes(n)},
                   "s": {"dtype": "float32", "shape": list(rows),
                         "data": bytes(4 * (int(np.prod(rows)) if rows else 1))}})


def _good_delta(model: dict[str, tuple[int, ...]]) -> list[tuple[str, bytes]]:
    return [(name, _int8_entry(shape)) for name, shape in model.items()]


def _filler(budget: int, item: bytes) -> bytes:
    """Arrays of at most 4,096 copies of a one-object ``item`` (msgpack's per-array
    limit), themselves in one array, about ``budget`` bytes in all."""
    per = 4096
    inner = b"\xdc" + per.to_bytes(2, "big") + item * per
    count = max(1, budget // len(inner))
    return b"\xdc" + count.to_bytes(2, "big") + inner * count


def _room(size: int, *parts: bytes) -> int:
    return max(0, size - sum(len(p) for p in parts) - 512)


def empty_maps_unknown_key(size: int = MAX_UPDATE_BYTES) -> tuple[bytes, dict]:
    """The issue's shape: millions of empty maps (one byte each) under an unknown key."""
    delta = _map(_good_delta(DEMO_MODEL))
    return envelope(delta, ("x", _filler(_room(size, delta), b"\x80"))), DEMO_MODEL


def empty_arrays_in_delta(size: int = MAX_UPDATE_BYTES) -> tuple[bytes, dict]:
    """Millions of empty arrays under an unknown key of a tensor entry inside the delta."""
    good = _good_delta(DEMO_MODEL)
    room = _room(size, _map(good))
    name, entry = good[2]
    # the entry is a fixmap: one more key, "x", holding the filler
    good[2] = (name, bytes([entry[0] + 1]) + entry[1:] + _packb("x") + _filler(room, b"\x90"))
    return envelope(_map(good)), DEMO_MODEL


def declared_lengths() -> tuple[bytes, dict]:
    """Arrays that each declare 4,096 elements (the per-array limit), nested 1,000 deep
    and cut short: a decoder that allocates what a header declares pays 32 KiB per 3 bytes."""
    nest = (b"\xdc\x10\x00") * 1000
    return envelope(_map(_good_delta(DEMO_MODEL)), ("x", nest)), DEMO_MODEL


def deep_nesting() -> tuple[bytes, dict]:
    """One-element arrays nested 100,000 deep (msgpack's own stack stops at 1,024)."""
    return envelope(_map(_good_delta(DEMO_MODEL)), ("x", b"\x91" * 100_000 + b"\x00")), DEMO_MODEL


def tiny_tensors(size: int = MAX_UPDATE_BYTES) -> tuple[bytes, dict]:
    """Small tensor maps by the hundred thousand under an unknown key."""
    item = _packb({"dtype": "int8", "shape": [1], "data": b"\x00"})
    per = 4096
    inner = b"\xdc" + per.to_bytes(2, "big") + item * per
    delta = _map(_good_delta(DEMO_MODEL))
    count = _room(size, delta) // len(inner)
    return envelope(delta, ("x", b"\xdc" + count.to_bytes(2, "big") + inner * count)), DEMO_MODEL


def many_entries() -> tuple[bytes, dict]:
    """1,024 int8 tensors (the per-map limit) of 4,000 bytes each, none of them the model's."""
    entries = [(f"t{i}", _int8_entry((4000,))) for i in range(1024)]
    return envelope(_map(entries)), DEMO_MODEL


def extra_tensor(size: int = MAX_UPDATE_BYTES) -> tuple[bytes, dict]:
    """The issue's second shape: the model's tensors plus one large tensor it does not have."""
    good = _good_delta(DEMO_MODEL)
    room = _room(size, _map(good))
    return envelope(_map([*good, ("extra", _int8_entry((room - 200,)))])), DEMO_MODEL


def wrong_shape(size: int = MAX_UPDATE_BYTES) -> tuple[bytes, dict]:
    """A model tensor sent with a much larger shape than the model's."""
    good = _good_delta(DEMO_MODEL)
    room = _room(size, _map(good))
    good[2] = (good[2][0], _int8_entry((1000, (room - 8192) // 1000)))
    return envelope(_map(good)), DEMO_MODEL


def topk_out_of_range() -> tuple[bytes, dict]:
    """A top-k entry of ~4 M one-byte index gaps whose last index is past the tensor."""
    n = int(np.prod(BIG_MODEL["w"]))
    count = MAX_UPDATE_BYTES - 4096
    first = n - count + 2  # so the last index is n + 1
    varint = bytearray()
    while True:
        byte, first = first & 0x7F, first >> 7
        varint.append(byte | (0x80 if first else 0))
        if not first:
            break
    indices = bytes(varint) + b"\x01" * (count - 1 - len(varint) + 1)
    entry = _packb({"c": "topk", "shape": list(BIG_MODEL["w"]), "i": indices,
                    "v": {"c": "int8", "t": b"", "s": bytes(4)}})
    return envelope(_map([("w", entry)])), BIG_MODEL


def zstd_bomb() -> tuple[bytes, dict]:
    """A zstd frame that declares no content size and expands without end (zeros)."""
    cctx = zstandard.ZstdCompressor(level=19, write_content_size=False)
    chunks = cctx.compressobj()
    frame = b"".join(chunks.compress(bytes(1 << 20)) for _ in range(64)) + chunks.flush()
    return envelope(_packb(frame)), BIG_MODEL


def duplicate_keys(size: int = MAX_UPDATE_BYTES) -> tuple[bytes, dict]:
    """The model's tensors, with one of them repeated 1,000 times in the same map."""
    good = _good_delta(DEMO_MODEL)
    room = _room(size, _map(good))
    big = _int8_entry((64, 64))
    copies = [("fc0.weight", big)] * min(1000, room // (len(big) + 16) - 1)
    return envelope(_map([*good, *copies][:1024])), DEMO_MODEL


def unknown_keys() -> tuple[bytes, dict]:
    """Every map the decoder reads field by field padded with 1,024 unknown keys."""
    pad = b"".join(_packb(f"k{i}") + b"\xc0" for i in range(1000))

    def padded(entry: dict) -> bytes:
        body = _packb(entry)
        n = len(entry) + 1000
        return b"\xde" + n.to_bytes(2, "big") + body[1:] + pad

    entries = []
    for name, shape in DEMO_MODEL.items():
        n = int(np.prod(shape)) if shape else 1
        entries.append((name, padded({"c": "fp32", "t": {"dtype": "float32",
                                                          "shape": list(shape),
                                                          "data": bytes(4 * n)}})))
    return envelope(_map(entries)), DEMO_MODEL


SHAPES: dict[str, Callable[..., tuple[bytes, dict]]] = {
    "empty_maps_unknown_key": empty_maps_unknown_key,
    "empty_arrays_in_delta": empty_arrays_in_delta,
    "declared_lengths": declared_lengths,
    "deep_nesting": deep_nesting,
    "tiny_tensors": tiny_tensors,
    "many_entries": many_entries,
    "extra_tensor": extra_tensor,
    "wrong_shape": wrong_shape,
    "topk_out_of_range": topk_out_of_range,
    "zstd_bomb": zstd_bomb,
    "duplicate_keys": duplicate_keys,
    "unknown_keys": unknown_keys,
}
