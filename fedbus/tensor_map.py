"""A named map of float32 tensors as bytes, for state kept on disk (never pickle).

The coordinator's store keeps the global model and the server momentum this way, and the
agent its error-feedback residual: a msgpack map of name to a fedbus tensor
(``fedbus.tensors``: dtype, shape and raw little-endian bytes), exact to the bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgpack
import numpy as np

from fedbus.tensors import decode_tensor, encode_tensor

__all__ = ["pack_tensors", "unpack_tensors"]


def pack_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """``{name: array}`` as bytes; every array is stored as float32."""
    return msgpack.packb(
        {
            # np.array, not np.ascontiguousarray, which turns a 0-d array into 1-d
            name: encode_tensor(np.array(value, dtype=np.float32, order="C", copy=None))
            for name, value in tensors.items()
        },
        use_bin_type=True,
    )


def unpack_tensors(blob: bytes) -> dict[str, np.ndarray]:
    """The arrays of ``pack_tensors`` (writable copies); ``ValueError`` if ``blob`` is not
    such a map (a torn or foreign file)."""
    try:
        obj = msgpack.unpackb(blob, raw=False)
        if not isinstance(obj, dict):
            raise ValueError(f"expected a map, got {type(obj).__name__}")
        return {str(name): decode_tensor(t, where=str(name)).copy() for name, t in obj.items()}
    except ValueError:
        raise
    except Exception as exc:  # msgpack's and decode_tensor's errors alike
        raise ValueError(f"not a tensor map: {type(exc).__name__}: {exc}") from None
