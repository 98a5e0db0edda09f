"""Update codecs: how a model delta is compressed on the device and decoded on the server.

An encoded delta is a map from tensor name to an entry ``{"c": codec, ...}``:

- ``fp32``: ``{"c": "fp32", "t": tensor}`` — raw float32, the uncompressed reference.
- ``fp16``: ``{"c": "fp16", "t": tensor}`` — half precision.
- ``int8``: ``{"c": "int8", "t": int8 tensor, "s": float32 tensor}`` — symmetric int8 with
  one scale per output row (first dimension) for tensors of 2 or more dimensions and a
  single scale (shape ``[]``) otherwise; value = ``t * s`` (broadcast over rows).
  Rounding is stochastic by default, which keeps the quantisation error unbiased.

Every codec has an encode/decode pair with a round-trip test. Decoding validates every
entry and returns float32 arrays; it never trusts lengths or shapes from the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedbus.errors import ProtocolError
from fedbus.tensors import decode_tensor, encode_tensor

__all__ = ["CODECS", "decode_delta", "encode_delta"]

CODECS = ("fp32", "fp16", "int8")


def _quantize_int8(x: np.ndarray, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        scale_shape = (x.shape[0],) if x.ndim >= 2 else ()
        return np.zeros(x.shape, np.int8), np.zeros(scale_shape, np.float32)
    if x.ndim >= 2:
        rows = x.reshape(x.shape[0], -1)
        amax = np.abs(rows).max(axis=1) if rows.size else np.zeros(x.shape[0], np.float32)
        scale = (amax / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        scaled = rows / safe[:, None]
    else:
        amax = float(np.abs(x).max()) if x.size else 0.0
        scale = np.array(amax / 127.0, dtype=np.float32)
        scaled = x / (float(scale) if scale > 0 else 1.0)
    if rng is not None:
        q = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
    else:
        q = np.rint(scaled)
    q = np.clip(q, -127, 127).astype(np.int8).reshape(x.shape)
    return q, scale


def encode_delta(
    delta: Mapping[str, np.ndarray],
    codec: str,
    *,
    rng: np.random.Generator | None = None,
    stochastic: bool = True,
) -> dict[str, dict[str, Any]]:
    """Encode ``{name: float array}`` with ``codec``.

    ``rng`` drives stochastic rounding for ``int8``; pass ``stochastic=False`` for
    round-to-nearest.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    if codec == "int8" and stochastic and rng is None:
        rng = np.random.default_rng()
    out: dict[str, dict[str, Any]] = {}
    for name, value in delta.items():
        arr = np.asarray(value, dtype=np.float32)
        if codec == "fp32":
            out[name] = {"c": "fp32", "t": encode_tensor(arr)}
        elif codec == "fp16":
            out[name] = {"c": "fp16", "t": encode_tensor(arr.astype(np.float16))}
        else:
            q, s = _quantize_int8(arr, rng if stochastic else None)
            out[name] = {"c": "int8", "t": encode_tensor(q), "s": encode_tensor(s)}
    return out


def _decode_entry(name: str, entry: Any) -> np.ndarray:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise ProtocolError("schema", f"{where}: expected a map")
    codec = entry.get("c")
    if codec == "fp32":
        t = decode_tensor(entry.get("t"), where=where)
        if t.dtype != np.float32:
            raise ProtocolError("dtype", f"{where}: fp32 entry holds {t.dtype}")
        return t
    if codec == "fp16":
        t = decode_tensor(entry.get("t"), where=where)
        if t.dtype != np.float16:
            raise ProtocolError("dtype", f"{where}: fp16 entry holds {t.dtype}")
        return t.astype(np.float32)
    if codec == "int8":
        q = decode_tensor(entry.get("t"), where=where)
        s = decode_tensor(entry.get("s"), where=f"{where} scale")
        if q.dtype != np.int8 or s.dtype != np.float32:
            raise ProtocolError("dtype", f"{where}: int8 entry needs int8 values, float32 scale")
        want = (q.shape[0],) if q.ndim >= 2 else ()
        if s.shape != want:
            raise ProtocolError("shape", f"{where}: scale shape {s.shape}, expected {want}")
        if q.size == 0:
            return np.zeros(q.shape, np.float32)
        if q.ndim >= 2:
            return (q.reshape(q.shape[0], -1).astype(np.float32) * s[:, None]).reshape(q.shape)
        return q.astype(np.float32) * s
    raise ProtocolError("schema", f"{where}: unknown codec {codec!r}")


def decode_delta(encoded: Any) -> dict[str, np.ndarray]:
    """Decode an encoded delta into ``{name: float32 array}`` or raise ``ProtocolError``."""
    if not isinstance(encoded, dict):
        raise ProtocolError("schema", "delta must be a map of tensor name to entry")
    out: dict[str, np.ndarray] = {}
    for name, entry in encoded.items():
        if not isinstance(name, str):
            raise ProtocolError("schema", "tensor names must be strings")
        out[name] = _decode_entry(name, entry)
    return out
