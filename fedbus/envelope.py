"""msgpack envelopes with explicit decode limits.

Every message on the wire is one msgpack map with ``v`` (protocol version) and ``kind``.
Decoding never trusts the input: the payload size is checked first, then msgpack is
told exactly how large each string, binary, array and map may be.

``read`` is for messages that come from devices (updates, status): it walks only the
fields the receiver knows (``fedbus.wire_reader``), so the memory and the Python-level
work of a decode are bounded by the schema and one copy of the payload, whatever the
payload holds. ``unpack`` builds the whole message with msgpack and stays for messages
from the coordinator (task, model, receipt), read by agents.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from fedbus.errors import ProtocolError
from fedbus.wire_reader import MAX_FIELDS, FieldReader, Reader, read_fields

__all__ = ["PROTOCOL_VERSION", "DecodeLimits", "pack", "read", "unpack"]

PROTOCOL_VERSION = 2


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds applied while decoding one message."""

    max_bytes: int = 8 * 1024 * 1024  # whole payload
    max_bin_len: int = 8 * 1024 * 1024  # one tensor's raw bytes
    max_str_len: int = 4096
    max_array_len: int = 4096  # e.g. a shape, a list of metrics
    max_map_len: int = 1024  # e.g. tensors in one model
    # bytes of unknown keys and values skipped in one envelope read by schema (``read``);
    # None: no budget (docs/protocol.md 4.2: the coordinator's updates have one)
    max_unknown_bytes: int | None = None


def pack(message: dict[str, Any]) -> bytes:
    """Serialise one envelope. ``bytes``/``memoryview`` values become msgpack bin."""
    return msgpack.packb(message, use_bin_type=True)


def unpack(payload: bytes, kind: str | None = None, limits: DecodeLimits | None = None) -> dict:
    """Decode one envelope and check ``v`` and (optionally) ``kind``.

    Raises ``ProtocolError`` with reason ``too_large``, ``malformed`` or ``schema``.
    """
    limits = limits or DecodeLimits()
    if len(payload) > limits.max_bytes:
        raise ProtocolError(
            "too_large", f"payload of {len(payload)} bytes exceeds limit {limits.max_bytes}"
        )
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_bin_len,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, msgpack.OutOfData, UnicodeDecodeError) as exc:
        raise ProtocolError("malformed", f"not a valid msgpack message: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("schema", f"message is a {type(obj).__name__}, expected a map")
    return _check_envelope(obj, kind)


def read(
    payload: bytes,
    kind: str,
    fields: Mapping[str, FieldReader],
    limits: DecodeLimits | None = None,
) -> dict:
    """Decode one envelope by schema: only ``v``, ``kind`` and ``fields`` (each read by its
    reader) are built; the values of other keys are skipped unread. At most
    ``min(limits.max_map_len, wire_reader.MAX_FIELDS)`` keys, and unknown keys and values of
    at most ``limits.max_unknown_bytes`` bytes in all (when set).

    Raises ``ProtocolError`` like ``unpack``: ``too_large``, then ``malformed`` (not one
    msgpack value, over a limit, a repeated key), then ``schema``. Type errors inside
    the fields are left to the caller's checks (a container where a leaf was expected is
    a ``wire_reader.Unread``).
    """
    limits = limits or DecodeLimits()
    if len(payload) > limits.max_bytes:
        raise ProtocolError(
            "too_large", f"payload of {len(payload)} bytes exceeds limit {limits.max_bytes}"
        )
    reader = Reader(payload, max_str_len=limits.max_str_len, max_bin_len=limits.max_bin_len,
                    max_unknown_bytes=limits.max_unknown_bytes)
    shape, _ = reader.peek()
    if shape != "map":
        reader.skip()  # not msgpack at all is malformed, before it is the wrong shape
        reader.end()
        raise ProtocolError("schema", f"message is a {shape}, expected a map")
    wanted = {"v": Reader.leaf, "kind": Reader.leaf, **fields}
    obj = read_fields(reader, wanted, limit=min(limits.max_map_len, MAX_FIELDS))
    reader.end()
    return _check_envelope(obj, kind)


def _check_envelope(obj: dict, kind: str | None) -> dict:
    version = obj.get("v")
    # `true == 1` and `1.0 == 1` in Python: insist on an integer
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("schema", f"unsupported protocol version {version!r}")
    if kind is not None and obj.get("kind") != kind:
        raise ProtocolError("schema", f"expected kind {kind!r}, got {obj.get('kind')!r}")
    return obj
