"""Tensor encoding: dtype (from a whitelist) + shape + raw little-endian bytes.

A tensor on the wire is the map ``{"dtype": str, "shape": [int, ...], "data": bin}``.
Decoding checks the dtype against the whitelist, the shape against limits and the byte
length against ``prod(shape) * itemsize`` before any array is made.
"""

from __future__ import annotations

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
    # a flat view casts cleanly for every shape, zero-size and 0-d included; ``flat.data`` is
    # memoryview(flat), which numpy's stubs reject before Python 3.12 (no __buffer__)
    flat = array.reshape(-1)
    return {"dtype": name, "shape": list(array.shape), "data": flat.data.cast("B")}


def decode_tensor(obj: Any, *, where: str = "tensor") -> np.ndarray:
    """Decode one tensor map into a read-only numpy array, or raise ``ProtocolError``.

    Runs once per tensor of every update, so the checks are plain type tests and one loop
    (msgpack gives exactly ``dict``, ``list``, ``int``, ``str`` and ``bytes``; the
    schema reader of ``fedbus.wire_reader`` gives a ``memoryview`` of the message for a
    bin, and the array is then a view of the message's bytes).
    """
    if type(obj) is not dict:
        raise ProtocolError("schema", f"{where}: expected a map")
    dtype_name = obj.get("dtype")
    dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise ProtocolError("dtype", f"{where}: dtype {dtype_name!r} is not allowed")
    shape = obj.get("shape")
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise ProtocolError("shape", f"{where}: bad shape {shape!r}")
    count = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_ELEMENTS:
            raise ProtocolError("shape", f"{where}: bad shape {shape!r}")
        count *= d
    data = obj.get("data")
    if type(data) is not bytes and type(data) is not memoryview:
        raise ProtocolError("schema", f"{where}: data must be binary")
    if count > MAX_ELEMENTS:
        raise ProtocolError("shape", f"{where}: {count} elements exceeds limit {MAX_ELEMENTS}")
    if len(data) != count * dtype.itemsize:
        raise ProtocolError(
            "shape",
            f"{where}: {len(data)} bytes do not match shape {shape} of {dtype_name}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
