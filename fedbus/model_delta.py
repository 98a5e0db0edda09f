"""Model deltas: what changed between two released models, exactly (protocol revision 2.7).

A device that holds version ``v - 1`` of the model can rebuild version ``v`` bit for bit from
a ``model_delta`` message (docs/protocol.md 6.9, 7.9) instead of receiving the whole model.
The delta is defined on the float32 tensors a receiver decodes from the ``model`` message
(whatever the model codec: fp32, or fp16 widened to float32), in the flat order of the sparse
codec (tensors by ascending UTF-8 name, each in C order), ``N`` elements in all:

1. ``x[i] = bits(new[i]) XOR bits(old[i])`` for every element, ``bits`` being the float32's
   32-bit pattern (IEEE 754), so ``bits(new[i]) = bits(old[i]) XOR x[i]`` — exact, NaN
   payloads and signed zeros included;
2. byte planes: the ``N`` least significant bytes of the ``x[i]`` (``x[i] & 0xff``), then the
   ``N`` second bytes, the ``N`` third and the ``N`` most significant (``4N`` bytes), so that
   the bytes an update rarely changes (sign, exponent, high mantissa) sit together;
3. one zstd frame of those ``4N`` bytes, with its content size in the frame header.

An element the step did not change is four zero bytes; zstd turns the zero runs and the
mostly-zero high planes into a few bytes. A receiver checks the frame declares exactly ``4N``
bytes before decompressing (no other output size is possible), and the result against the
message's ``sha`` (the first 16 bytes of SHA-256 over the rebuilt model's ``4N`` bytes,
float32 little-endian in the flat order), so a delta applied to the wrong base is refused
instead of producing a model the coordinator never released.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
import zstandard

from fedbus.errors import ProtocolError
from fedbus.sparse_delta import sparse_order

__all__ = ["SHA_BYTES", "apply_model_delta", "encode_model_delta", "model_digest"]

SHA_BYTES = 16
_LEVEL = 3
_MAX_WINDOW = 1 << 23


def _flat_bits(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The tensors' float32 bit patterns, flat order, as little-endian uint32."""
    order = sparse_order(tensors)
    if not order:
        return np.zeros(0, "<u4")
    return np.concatenate([np.ascontiguousarray(tensors[name], "<f4").reshape(-1).view("<u4")
                           for name in order])


def model_digest(tensors: Mapping[str, np.ndarray]) -> bytes:
    """``sha``: the first 16 bytes of SHA-256 of the model's float32 bytes in flat order."""
    return hashlib.sha256(_flat_bits(tensors).tobytes()).digest()[:SHA_BYTES]


def encode_model_delta(old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> bytes:
    """The zstd frame that turns ``old`` into ``new`` (same names and shapes; float32)."""
    if {k: np.shape(v) for k, v in old.items()} != {k: np.shape(v) for k, v in new.items()}:
        raise ValueError("a model delta needs two models of the same tensors and shapes")
    x = _flat_bits(old) ^ _flat_bits(new)
    planes = x.view(np.uint8).reshape(-1, 4).T  # little-endian: plane 0 = low bytes
    return zstandard.ZstdCompressor(level=_LEVEL, write_content_size=True).compress(
        np.ascontiguousarray(planes).tobytes())


def apply_model_delta(
    old: Mapping[str, np.ndarray], frame: bytes | memoryview, sha: bytes,
) -> dict[str, np.ndarray]:
    """``old`` with ``frame`` applied, checked against ``sha``; ``ProtocolError``
    (``malformed``; ``base`` when the result is not the released model) otherwise."""
    order = sparse_order(old)
    n = sum(math.prod(np.shape(old[name])) for name in order)
    want = 4 * n
    try:
        size = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError as exc:
        raise ProtocolError("malformed", f"model delta is not a zstd frame: {exc}") from None
    if size != want:
        raise ProtocolError(
            "malformed", f"model delta declares {size} bytes, expected {want} for {n} elements"
        )
    try:
        raw = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW).decompress(
            frame, max_output_size=want, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ProtocolError("malformed", f"model delta does not decompress: {exc}") from None
    if len(raw) != want:
        raise ProtocolError("malformed", f"model delta holds {len(raw)} bytes, expected {want}")
    x = np.frombuffer(raw, np.uint8).reshape(4, n).T.copy().view("<u4").reshape(-1)
    bits = _flat_bits(old) ^ x
    if hashlib.sha256(bits.tobytes()).digest()[:SHA_BYTES] != bytes(sha):
        raise ProtocolError("base", "the model rebuilt from the delta is not the released one")
    floats = bits.view("<f4")
    out: dict[str, np.ndarray] = {}
    start = 0
    for name in order:
        shape = np.shape(old[name])
        size_ = math.prod(shape)
        out[name] = floats[start:start + size_].astype(np.float32).reshape(shape)
        start += size_
    return out
