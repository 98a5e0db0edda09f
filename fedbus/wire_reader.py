"""Reading msgpack by schema: only the expected shape of a message is ever built.

``msgpack.unpackb`` builds every object a payload describes before anyone can look at it:
a 4 MB update of one-byte empty maps becomes 4 million dicts (~290 MiB, measured), and an
array header preallocates the list it declares (3 bytes can claim 4,096 slots, 32 KiB).
Per-item limits cannot stop that; a budget of objects counted in hooks could, but only
after paying Python-level work for every object, and msgpack's hooks never see scalars.

So receivers of device messages walk the structure they expect instead: map and array
headers are read as headers (``Unpacker.read_map_header``: nothing allocated), a leaf is
unpacked only where the schema wants a leaf (with container limits of 0, so a leaf can
never be a container), a bin is returned as a zero-copy view of the payload, and the value
of a key the schema does not know is skipped by msgpack's C skipper, which builds nothing
(measured on 4 MB of empty maps: ~10 ms, no allocation). The Python-level work is then
bounded by the schema (the number of fields and tensors), not by the payload; the memory
by one copy of the payload (the unpacker's buffer) plus the few objects the schema names.

A type the schema does not expect never raises here: a container where a leaf was wanted
is skipped and returned as an ``Unread`` marker, so the caller's type checks (and their
reasons) stay where they are. Only what is not msgpack, or over a limit, is ``malformed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from fedbus.errors import ProtocolError

__all__ = [
    "MAX_FIELDS",
    "MAX_NESTING",
    "MAX_UNKNOWN_BYTES",
    "FieldReader",
    "Reader",
    "Unread",
    "read_fields",
]

MAX_FIELDS = 64  # keys of one map read field by field (envelope, entry, tensor)
MAX_NESTING = 1024  # containers within one skipped value: msgpack-python's own stack
# bytes of unknown keys and their values one reader with a budget skips in all (the
# coordinator's update envelope, and separately its delta): extension fields are small
MAX_UNKNOWN_BYTES = 4096

_MSGPACK_ERRORS = (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                   msgpack.StackError, msgpack.OutOfData, UnicodeDecodeError)


@dataclass(frozen=True)
class Unread:
    """A container found where the schema wanted a leaf: skipped, never built."""

    wire_type: str  # "map" or "array"
    length: int


def _kind(b: int) -> str:
    if b <= 0x7F or b >= 0xE0 or 0xCC <= b <= 0xD3:
        return "int"
    if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
        return "map"
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        return "array"
    if 0xA0 <= b <= 0xBF or 0xD9 <= b <= 0xDB:
        return "str"
    if 0xC4 <= b <= 0xC6:
        return "bin"
    if b in (0xCA, 0xCB):
        return "float"
    if b == 0xC0:
        return "nil"
    if b in (0xC2, 0xC3):
        return "bool"
    return "ext" if b != 0xC1 else "invalid"


# per first byte: (kind, the length a fix type carries in that byte, width of the length
# field that follows it (0: none)); one lookup instead of a chain of comparisons per value
_WIDTHS = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4,
           0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}


def _head_of(b: int) -> tuple[str, int, int]:
    kind = _kind(b)
    if b <= 0x7F or b >= 0xE0:
        return kind, 0, 0
    if kind in ("map", "array", "str") and b < 0xC0:
        return kind, b & (0x0F if kind != "str" else 0x1F), 0
    return kind, 0, _WIDTHS.get(b, 0)


_HEADS: tuple[tuple[str, int, int], ...] = tuple(_head_of(b) for b in range(256))


class Reader:
    """A cursor over one msgpack payload (bytes or a memoryview of bytes)."""

    def __init__(self, data: bytes | memoryview, *, max_str_len: int, max_bin_len: int,
                 max_unknown_bytes: int | None = None) -> None:
        """``max_unknown_bytes``: most bytes of unknown keys and their values that
        ``read_fields`` skips with this reader, over every map it reads (None: no budget);
        more is ``malformed``."""
        self._view = memoryview(data).cast("B") if isinstance(data, memoryview) else (
            memoryview(data))
        self._size = len(self._view)
        self._max_bin = max_bin_len
        # read_size = max_buffer_size = the payload: one buffer of exactly its size (the
        # default 1 MiB first buffer would be reallocated, both alive for a moment)
        self._unpacker = msgpack.Unpacker(
            raw=False, strict_map_key=True, max_buffer_size=max(self._size, 1),
            read_size=max(self._size, 1),
            max_str_len=max_str_len, max_bin_len=max_bin_len,
            max_array_len=0, max_map_len=0, max_ext_len=0,
        )
        self._unpacker.feed(self._view)  # one copy: msgpack has no zero-copy input
        self._max_unknown = max_unknown_bytes
        self.unknown_bytes = 0  # skipped by read_fields as unknown keys and their values

    def charge_unknown(self, nbytes: int) -> None:
        """Count ``nbytes`` of unknown keys and values against the reader's budget."""
        self.unknown_bytes += nbytes
        if self._max_unknown is not None and self.unknown_bytes > self._max_unknown:
            raise ProtocolError(
                "malformed",
                f"unknown keys and values take more than {self._max_unknown} bytes "
                f"(at least {self.unknown_bytes})",
            )

    def _header(self) -> tuple[str, int, int]:
        """The next value's kind, its length (containers, str, bin; else 0) and the size
        of its header, read off the bytes without moving."""
        pos = self._unpacker.tell()
        if pos >= self._size:
            raise ProtocolError("malformed", "not a valid msgpack message: truncated")
        kind, length, width = _HEADS[self._view[pos]]
        if not width:
            return kind, length, 1
        if pos + 1 + width > self._size:
            raise ProtocolError("malformed", "not a valid msgpack message: truncated")
        return kind, int.from_bytes(self._view[pos + 1 : pos + 1 + width], "big"), 1 + width

    def peek(self) -> tuple[str, int]:
        """``(kind, length)`` of the next value: kind is int, float, str, bin, nil, bool,
        map, array, ext or invalid; length counts a container's items, a str's or bin's
        bytes, and is 0 for anything else."""
        kind, length, _ = self._header()
        return kind, length

    def _call(self, method: Callable[[], Any]) -> Any:
        try:
            return method()
        except _MSGPACK_ERRORS as exc:
            raise ProtocolError("malformed", f"not a valid msgpack message: {exc}") from None

    def map_header(self, limit: int) -> int:
        kind, n, _ = self._header()
        if kind != "map":
            raise ProtocolError("schema", f"expected a map, found {kind}")
        if n > limit:
            raise ProtocolError("malformed", f"map of {n} entries exceeds limit {limit}")
        return int(self._call(self._unpacker.read_map_header))

    def array_header(self, limit: int) -> int:
        kind, n = self.peek()
        if kind != "array":
            raise ProtocolError("schema", f"expected an array, found {kind}")
        if n > limit:
            raise ProtocolError("malformed", f"array of {n} items exceeds limit {limit}")
        return int(self._call(self._unpacker.read_array_header))

    def leaf(self) -> Any:
        """The next value if it is not a container (a container is skipped: ``Unread``);
        an ext type, the unused byte 0xc1, a str or bin over its limit are ``malformed``."""
        kind, n, _ = self._header()
        if kind in ("map", "array"):
            self.skip()
            return Unread(kind, n)
        if kind == "bin":
            return self.bin_view()
        if kind in ("ext", "invalid"):
            raise ProtocolError("malformed", f"not a valid msgpack message: {kind} type")
        return self._call(self._unpacker.unpack)

    def bin_view(self) -> memoryview:
        """The next value, a bin, as a view of the payload (no copy)."""
        kind, n, head = self._header()
        if kind != "bin":
            raise ProtocolError("schema", f"expected a bin, found {kind}")
        if n > self._max_bin:
            raise ProtocolError("malformed", f"bin of {n} bytes exceeds limit {self._max_bin}")
        start = self._unpacker.tell() + head
        self.skip()  # checks that all n bytes are there
        return self._view[start : start + n]

    def skip(self) -> None:
        """Pass over the next value, whatever it holds, building nothing (msgpack's C
        skipper: a truncated value, 0xc1 or more than ``MAX_NESTING`` levels is malformed)."""
        self._call(self._unpacker.skip)

    def tell(self) -> int:
        """The offset of the next value in the payload."""
        return int(self._unpacker.tell())

    def span(self) -> memoryview:
        """Skip the next value and return its bytes (a view of the payload)."""
        start = self._unpacker.tell()
        self.skip()
        return self._view[start : self._unpacker.tell()]

    def end(self) -> None:
        """No bytes may follow the one value of a payload."""
        if self._unpacker.tell() != self._size:
            raise ProtocolError(
                "malformed",
                f"not a valid msgpack message: {self._size - self._unpacker.tell()} bytes "
                "of extra data",
            )

    def key(self) -> str | None:
        """A map key: a str, or None for a bin key (it never names a field, and its value
        is skipped); any other type is ``malformed``, as ``strict_map_key`` has it."""
        kind = self._header()[0]
        if kind == "bin":
            self.skip()
            return None
        if kind != "str":
            raise ProtocolError("malformed", f"not a valid msgpack message: {kind} map key")
        try:
            value = self._unpacker.unpack()
        except _MSGPACK_ERRORS as exc:
            raise ProtocolError("malformed", f"not a valid msgpack message: {exc}") from None
        assert isinstance(value, str)
        return value


FieldReader = Callable[[Reader], Any]


def read_fields(
    reader: Reader, fields: Mapping[str, FieldReader], *, limit: int = MAX_FIELDS
) -> dict[str, Any]:
    """Read a map (the next value) keeping only the keys of ``fields``, each read by its
    reader; other keys' values are skipped, and their bytes (key included) charged to the
    reader's unknown-bytes budget. A key that repeats a key read here is ``malformed``
    (which occurrence counts would otherwise depend on the decoder)."""
    out: dict[str, Any] = {}
    for _ in range(reader.map_header(limit)):
        start = reader.tell()
        key = reader.key()
        read = fields.get(key) if key is not None else None
        if read is None:
            reader.skip()
            reader.charge_unknown(reader.tell() - start)
            continue
        if key in out:
            raise ProtocolError("malformed", f"key {key!r} appears twice in one map")
        out[key] = read(reader)  # type: ignore[index]
    return out
