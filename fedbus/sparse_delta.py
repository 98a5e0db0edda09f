"""The ``sparse`` update codec: a whole delta as one small bin (protocol revision 2.7).

``sparse:FRACTION[:VALUES]`` keeps, like ``topk``, the ``ceil(FRACTION * N)`` largest
magnitudes among all ``N`` elements of the delta, but spends nothing on tensor names,
shapes or map keys: both sides know the model, so the kept elements are numbered in one
flat index space — the tensors in ascending order of their names (UTF-8 bytes), each
flattened in C order — and the delta travels as one bin (docs/protocol.md 6.6)::

    byte 0        values codec: 0x01 sign, 0x02 int4, 0x03 int8
    varint k      number of kept elements (LEB128, shortest form), 0 <= k <= N
    -- only when k > 0 --
    4 bytes       scale, float32 little-endian
    low bits      ceil(k*L / 8) bytes: the L low bits of every index, MSB first
    high bits     ceil((k + ((N-1) >> L) + 1) / 8) bytes: for the j-th index i_j
                  (ascending), bit (i_j >> L) + j is set, MSB first (Elias-Fano)
    values        sign: ceil(k/8) bytes, bit j (MSB first) set = value j is negative
                  int4: ceil(k/2) bytes, two's complement nibbles, value 2j in the low
                  nibble of byte j (as the int4 codec); int8: k bytes

where ``L = floor(log2(N / k))`` (the largest ``L`` with ``k << L <= N``). Every padding
bit is 0 and nothing follows the values. A ``sign`` value decodes to ``+scale`` or
``-scale`` (``scale`` is the mean magnitude of the kept elements); an ``int4``/``int8``
value ``q`` to ``float32(q) * scale`` (``scale`` = largest kept magnitude / 7 or / 127).

Elias-Fano takes about ``2 + log2(N/k)`` bits per index, within a bit of the entropy of a
random k-subset, and decodes with vectorised numpy (no bit-serial loop). The first byte is
never 0x28, the first byte of a zstd frame, which is how a receiver tells the two bins apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np

from fedbus.errors import ProtocolError

__all__ = [
    "SPARSE_VALUES",
    "decode_sparse",
    "encode_sparse",
    "is_sparse",
    "low_bits",
    "sparse_order",
]

SPARSE_VALUES: dict[str, int] = {"sign": 1, "int4": 2, "int8": 3}
_CODEC_OF = {v: k for k, v in SPARSE_VALUES.items()}
_LEVELS = {"int4": 7, "int8": 127}
_MAX_VARINT = 4  # k <= MAX_ELEMENTS < 2**28
_HIGH_CHUNK = 256  # high-bit bytes read at a time: at most 2,048 indices per chunk


def is_sparse(data: bytes | memoryview) -> bool:
    """Whether a delta bin is a ``sparse`` delta (else it is read as a zstd frame)."""
    return len(data) > 0 and data[0] in _CODEC_OF


def sparse_order(names: Mapping[str, object]) -> list[str]:
    """The order tensors take in the flat index space: ascending UTF-8 bytes of the name."""
    return sorted(names, key=lambda name: name.encode("utf-8"))


def low_bits(n: int, k: int) -> int:
    """``L``: the largest ``l >= 0`` with ``k << l <= n`` (0 when ``k`` is 0)."""
    return (n // k).bit_length() - 1 if k else 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_sparse(
    delta: Mapping[str, np.ndarray],
    fraction: float,
    values: str,
    rng: np.random.Generator | None,
) -> bytes:
    """Encode ``{name: float32 array}``: the global top ``ceil(fraction * N)`` magnitudes."""
    order = sparse_order(delta)
    flat = (np.concatenate([np.asarray(delta[n], np.float32).reshape(-1) for n in order])
            if order else np.zeros(0, np.float32))
    n = flat.size
    k = min(n, max(1, math.ceil(fraction * n))) if n else 0
    if 0 < k < n:
        idx = np.sort(np.argpartition(np.abs(flat), n - k)[n - k:])
    else:
        idx = np.arange(k, dtype=np.int64)
    out = bytearray([SPARSE_VALUES[values]])
    out += _varint(k)
    if k == 0:
        return bytes(out)
    kept = flat[idx]
    mags = np.abs(kept)
    if values == "sign":
        scale = np.float32(mags.mean(dtype=np.float64))
    else:
        scale = np.float32(float(mags.max()) / _LEVELS[values])
    out += np.array([scale], "<f4").tobytes()
    low = low_bits(n, k)
    if low:
        lows = (idx & ((1 << low) - 1)).astype(np.int64)
        bits = ((lows[:, None] >> np.arange(low - 1, -1, -1)) & 1).astype(np.uint8)
        out += np.packbits(bits.reshape(-1)).tobytes()
    high = np.zeros(k + ((n - 1) >> low) + 1, np.uint8)
    high[(idx >> low) + np.arange(k)] = 1
    out += np.packbits(high).tobytes()
    if values == "sign":
        out += np.packbits(kept < 0).tobytes()
        return bytes(out)
    levels = _LEVELS[values]
    scaled = kept / scale if scale > 0 else np.zeros_like(kept)
    q = np.floor(scaled + rng.random(k, dtype=np.float32)) if rng is not None else np.rint(scaled)
    q = np.clip(q, -levels, levels).astype(np.int8)
    if values == "int8":
        out += q.tobytes()
    else:
        nib = (q & 0x0F).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        out += (nib[0::2] | (nib[1::2] << 4)).tobytes()
    return bytes(out)


def _read_varint(data: memoryview, where: str) -> tuple[int, int]:
    value = 0
    for i in range(min(_MAX_VARINT, len(data) - 1)):
        byte = data[1 + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and byte == 0:
                raise ProtocolError(
                    "malformed", f"{where}: count varint is not in its shortest form"
                )
            return value, 2 + i
    raise ProtocolError("malformed", f"{where}: truncated or overlong count varint")


def _sections(n: int, k: int, codec: str) -> tuple[int, int, int, int]:
    """(L, low bytes, high bytes, value bytes) for ``k`` of ``n`` elements."""
    low = low_bits(n, k)
    value_bytes = {"sign": (k + 7) // 8, "int4": (k + 1) // 2, "int8": k}[codec]
    return low, (k * low + 7) // 8, (k + ((n - 1) >> low) + 1 + 7) // 8, value_bytes


def _pad_is_zero(section: np.ndarray, used_bits: int) -> bool:
    spare = section.size * 8 - used_bits
    return spare == 0 or int(section[-1]) & ((1 << spare) - 1) == 0


def _iter_indices(
    lows: np.ndarray, highs: np.ndarray, n: int, k: int, low: int, where: str
) -> Iterator[np.ndarray]:
    """The ``k`` indices, checked (ascending, < n, exactly k), a chunk at a time."""
    done, last = 0, -1
    weights = (1 << np.arange(low - 1, -1, -1, dtype=np.int64)) if low else None
    for start in range(0, highs.size, _HIGH_CHUNK):
        pos = np.flatnonzero(np.unpackbits(highs[start:start + _HIGH_CHUNK])) + 8 * start
        if pos.size == 0:
            continue
        if done + pos.size > k:
            raise ProtocolError("malformed", f"{where}: more than {k} high bits set")
        idx = pos - np.arange(done, done + pos.size)
        if weights is not None:
            first = done * low
            stop = (done + pos.size) * low
            raw = np.unpackbits(lows[first // 8:(stop + 7) // 8])
            rows = raw[first % 8:first % 8 + stop - first].reshape(pos.size, low)
            idx = (idx << low) | (rows.astype(np.int64) @ weights)
        if np.any(np.diff(idx) <= 0) or int(idx[0]) <= last:
            raise ProtocolError("malformed", f"{where}: indices are not strictly ascending")
        if int(idx[-1]) >= n:
            raise ProtocolError(
                "shape", f"{where}: index {int(idx[-1])} out of range for {n} elements"
            )
        last = int(idx[-1])
        done += pos.size
        yield idx
    if done != k:
        raise ProtocolError("malformed", f"{where}: {done} high bits set, expected {k}")


def decode_sparse(
    data: bytes | memoryview, expected_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Decode a ``sparse`` bin for a model of ``expected_shapes``; ``ProtocolError``
    (``malformed``, ``shape``) for anything that is not exactly such an encoding. Every
    section length and every index is checked before the dense output is allocated."""
    where = "sparse delta"
    view = memoryview(data).cast("B")
    if len(view) < 2 or view[0] not in _CODEC_OF:
        raise ProtocolError("malformed", f"{where}: unknown values codec byte")
    codec = _CODEC_OF[view[0]]
    k, offset = _read_varint(view, where)
    order = sparse_order(expected_shapes)
    sizes = [math.prod(expected_shapes[name]) for name in order]
    n = sum(sizes)
    if k > n:
        raise ProtocolError("shape", f"{where}: {k} values for a model of {n} elements")
    scale = np.float32(0)
    lows = highs = vals = np.zeros(0, np.uint8)
    low = 0
    if k == 0:
        if len(view) != offset:
            raise ProtocolError("malformed", f"{where}: {len(view) - offset} bytes after k = 0")
    else:
        low, n_low, n_high, n_val = _sections(n, k, codec)
        want = offset + 4 + n_low + n_high + n_val
        if len(view) != want:
            raise ProtocolError(
                "malformed", f"{where}: {len(view)} bytes, expected {want} for k = {k}"
            )
        scale = np.frombuffer(view[offset:offset + 4], "<f4")[0]
        body = np.frombuffer(view[offset + 4:], np.uint8)
        lows, highs, vals = (body[:n_low], body[n_low:n_low + n_high],
                             body[n_low + n_high:])
        pad_ok = (_pad_is_zero(vals, k) if codec == "sign"
                  else codec == "int8" or k % 2 == 0 or int(vals[-1]) >> 4 == 0)
        if not (_pad_is_zero(lows, k * low) and pad_ok):
            raise ProtocolError("malformed", f"{where}: a padding bit is not zero")
        for _ in _iter_indices(lows, highs, n, k, low, where):  # checks, keeps nothing
            pass
    flat = np.zeros(n, np.float32)
    done = 0
    for idx in (_iter_indices(lows, highs, n, k, low, where) if k else ()):
        m = idx.size
        if codec == "sign":
            neg = np.unpackbits(vals[done // 8:(done + m + 7) // 8])[done % 8:done % 8 + m]
            flat[idx] = np.where(neg.astype(bool), -scale, scale)
        elif codec == "int8":
            flat[idx] = vals[done:done + m].view(np.int8).astype(np.float32) * scale
        else:
            pairs = vals[done // 2:(done + m + 1) // 2 + 1]
            nib = np.empty(2 * pairs.size, np.uint8)
            nib[0::2], nib[1::2] = pairs & 0x0F, pairs >> 4
            q = ((nib[done % 2:done % 2 + m] ^ 8).astype(np.int8) - 8).astype(np.float32)
            flat[idx] = q * scale
        done += m
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, size in zip(order, sizes, strict=True):
        out[name] = flat[start:start + size].reshape(expected_shapes[name])
        start += size
    return out
