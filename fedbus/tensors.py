"""Tensor encoding: dtype (from a whitelist) + shape + raw little-endian bytes.

A tensor on the wire is the map ``{"dtype": str, "shape": [int, ...], "data": bin}``.
Decoding checks the dtype against the whitelist, the shape against limits and the byte
length against ``prod(shape) * itemsize`` before any array is made.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedbus.errors import ProtocolError

__all__ = ["DTYPES", "MAX_NDIM", "decode_tensor", "encode_tensor"]

# Only plain numeric little-endian types; never object, string or void dtypes.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
}
MAX_NDIM = 6
MAX_ELEMENTS = 64 * 1024 * 1024


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """Encode a numpy array; the data is passed to msgpack as a memoryview (no copy)."""
    array = np.asarray(array)
    name = array.dtype.name
    if name not in DTYPES:
        raise ValueError(f"dtype {name} cannot be sent; allowed: {sorted(DTYPES)}")
    wire = DTYPES[name]
    if array.dtype != wire or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=wire)
    # a flat view casts cleanly for every shape, zero-size and 0-d included
    flat = array.reshape(-1)
    return {"dtype": name, "shape": list(array.shape), "data": memoryview(flat).cast("B")}


def decode_tensor(obj: Any, *, where: str = "tensor") -> np.ndarray:
    """Decode one tensor map into a read-only numpy array, or raise ``ProtocolError``."""
    if not isinstance(obj, dict):
        raise ProtocolError("schema", f"{where}: expected a map")
    dtype_name = obj.get("dtype")
    shape = obj.get("shape")
    data = obj.get("data")
    if dtype_name not in DTYPES:
        raise ProtocolError("dtype", f"{where}: dtype {dtype_name!r} is not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_ELEMENTS
            for d in shape
        )
    ):
        raise ProtocolError("shape", f"{where}: bad shape {shape!r}")
    if not isinstance(data, bytes):
        raise ProtocolError("schema", f"{where}: data must be binary")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ProtocolError("shape", f"{where}: {count} elements exceeds limit {MAX_ELEMENTS}")
    dtype = DTYPES[dtype_name]
    if len(data) != count * dtype.itemsize:
        raise ProtocolError(
            "shape",
            f"{where}: {len(data)} bytes do not match shape {shape} of {dtype_name}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
