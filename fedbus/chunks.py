"""Chunked messages (protocol revision 2.6, docs/protocol.md 7.9): a message larger than the
broker's packet limit travels as several ``chunk`` messages that reassemble idempotently.

Pure: no network, no clock, no threads (callers pass ``now``, monotonic seconds).

- ``split(payload, chunk_size, message_id)`` packs the chunk messages of one payload: every
  chunk carries the id, its index ``i``, the count ``n``, the whole payload's ``size`` and
  SHA-256, and the bytes ``[i*size//n, (i+1)*size//n)`` of the payload.
- ``read_chunk`` decodes one chunk message by schema and checks everything one chunk can
  say about itself (ranges, the digest's length, the data's length).
- ``Reassembler`` takes chunks of any number of senders in any order, duplicates included,
  and returns a payload once all chunks of its id are there and its SHA-256 matches. It
  bounds memory: a message's ``size``, the bytes held in partial reassemblies per sender and
  in total; and drops a partial that saw no new chunk for ``timeout`` seconds. Every
  refusal and every dropped partial comes with a reason.

Only a message that does not fit one packet is chunked; a message that fits goes whole, as
before revision 2.6.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

from fedbus.envelope import PROTOCOL_VERSION, DecodeLimits, pack, read
from fedbus.errors import ProtocolError
from fedbus.transport import publish_packet_size
from fedbus.wire_reader import Reader

__all__ = [
    "CHUNK_HEADER_BOUND",
    "CHUNK_KIND",
    "HELD_PER_CHUNK",
    "MAX_CHUNKS",
    "MAX_SIZE",
    "Chunk",
    "ChunkLimits",
    "Dropped",
    "Outcome",
    "Reassembler",
    "chunk_bounds",
    "chunk_data_size",
    "is_chunk",
    "peek_chunk_id",
    "read_chunk",
    "split",
]

CHUNK_KIND = "chunk"
MAX_CHUNKS = 65_535  # chunks of one message
MAX_SIZE = 2**40  # bytes of one chunked message, as the wire allows (receivers cap far lower)
DIGEST_BYTES = 32  # SHA-256
# the most bytes a chunk message takes besides its data: the map, every key, an id of 64
# characters, i and n as uint16, size as uint64, the digest, and the data's bin header
CHUNK_HEADER_BOUND = 160
# what a stored chunk costs a reassembly beyond its data (Python objects): a flood of tiny
# chunks is bounded by the caps like a few large ones
HELD_PER_CHUNK = 128
_PEEK_BYTES = 4096
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class Chunk:
    """One chunk of message ``id``: bytes ``chunk_bounds(index, count, size)`` of it."""

    id: str
    index: int
    count: int
    size: int
    digest: bytes
    data: bytes | memoryview

    def to_wire(self) -> dict[str, object]:
        # data last: every other field is within the first bytes (is_chunk, peek_chunk_id)
        return {"v": PROTOCOL_VERSION, "kind": CHUNK_KIND, "id": self.id, "i": self.index,
                "n": self.count, "size": self.size, "sha256": self.digest, "data": self.data}

    def pack(self) -> bytes:
        return pack(self.to_wire())


def chunk_bounds(index: int, count: int, size: int) -> tuple[int, int]:
    """``[start, end)`` of chunk ``index`` of ``count`` in a message of ``size`` bytes."""
    return index * size // count, (index + 1) * size // count


def chunk_data_size(packet_limit: int, topic: str) -> int:
    """The most payload bytes one chunk may carry so that its PUBLISH packet (QoS 1) on
    ``topic`` stays within ``packet_limit``; ``ValueError`` if not even one byte fits."""
    packet_overhead = publish_packet_size(topic, packet_limit) - packet_limit
    size = packet_limit - packet_overhead - CHUNK_HEADER_BOUND
    if size < 1:
        raise ValueError(f"a packet limit of {packet_limit} bytes leaves no room for a chunk")
    return size


def split(payload: bytes, chunk_size: int, message_id: str) -> list[bytes]:
    """The packed chunk messages of ``payload``, ``ceil(len / chunk_size)`` of them, each
    carrying at most ``chunk_size`` bytes of it (balanced: lengths differ by at most 1)."""
    if not _ID.match(message_id):
        raise ValueError(f"invalid chunk id {message_id!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk size must be at least 1 byte, got {chunk_size}")
    size = len(payload)
    if size < 1:
        raise ValueError("an empty payload is not chunked")
    count = math.ceil(size / chunk_size)
    if count > MAX_CHUNKS:
        raise ValueError(f"{size} bytes in chunks of {chunk_size} take {count} chunks, more "
                         f"than {MAX_CHUNKS}")
    digest = hashlib.sha256(payload).digest()
    view = memoryview(payload)
    out = []
    for i in range(count):
        start, end = chunk_bounds(i, count, size)
        out.append(Chunk(message_id, i, count, size, digest, view[start:end]).pack())
    return out


def _peek(payload: bytes, key: str) -> object:
    """The value of top-level ``key`` if it is a leaf within the first 4,096 bytes."""
    try:
        reader = Reader(memoryview(payload)[:_PEEK_BYTES], max_str_len=_PEEK_BYTES,
                        max_bin_len=_PEEK_BYTES)
        for _ in range(reader.map_header(64)):
            if reader.key() != key:
                reader.skip()
                continue
            return reader.leaf()
    except ProtocolError:
        return None
    return None


# what the Python senders write first: a map, then "v": 2 and "kind" (the fast path of
# is_chunk, which every update the coordinator receives goes through)
_V_KIND = b"\xa1v\x02\xa4kind"
_CHUNK_STR = b"\xa5chunk"


def is_chunk(payload: bytes) -> bool:
    """True if ``payload`` is a map whose ``kind`` is ``chunk`` within its first 4,096
    bytes (whatever else it holds: ``read_chunk`` judges that)."""
    start = 1 if payload[:1] and 0x80 <= payload[0] <= 0x8F else 3 if payload[:1] == b"\xde" else 0
    if start and payload[start : start + len(_V_KIND)] == _V_KIND:
        at = start + len(_V_KIND)
        return payload[at : at + len(_CHUNK_STR)] == _CHUNK_STR
    return _peek(payload, "kind") == CHUNK_KIND


def peek_chunk_id(payload: bytes) -> str | None:
    """The ``id`` of a chunk message read off its first 4,096 bytes, if it is a valid id."""
    value = _peek(payload, "id")
    return value if isinstance(value, str) and _ID.match(value) else None


def _leaf(reader: Reader) -> object:
    return reader.leaf()


_FIELDS = {name: _leaf for name in ("id", "i", "n", "size", "sha256", "data")}


def _int(obj: dict, name: str, low: int, high: int) -> int:
    value = obj.get(name)
    if type(value) is not int:
        raise ProtocolError("schema", f"chunk field {name!r} missing or not an integer")
    if not low <= value <= high:
        raise ProtocolError("schema", f"chunk field {name!r} = {value} is outside "
                                      f"[{low}, {high}]")
    return value


def read_chunk(payload: bytes, max_bytes: int) -> Chunk:
    """Decode one chunk message (at most ``max_bytes``) and check it on its own:
    ``ProtocolError`` with reason ``too_large``, ``malformed`` or ``schema``. The data is a
    view of ``payload``."""
    limits = DecodeLimits(max_bytes=max_bytes, max_bin_len=max_bytes, max_str_len=256)
    obj = read(payload, CHUNK_KIND, _FIELDS, limits)
    message_id = obj.get("id")
    if not isinstance(message_id, str) or not _ID.match(message_id):
        raise ProtocolError("schema", "chunk field 'id' missing or not an id")
    count = _int(obj, "n", 1, MAX_CHUNKS)
    index = _int(obj, "i", 0, count - 1)
    size = _int(obj, "size", count, MAX_SIZE)
    digest = obj.get("sha256")
    if not isinstance(digest, memoryview) or len(digest) != DIGEST_BYTES:
        raise ProtocolError("schema", f"chunk field 'sha256' must be a bin of {DIGEST_BYTES} "
                                      "bytes")
    data = obj.get("data")
    if not isinstance(data, memoryview):
        raise ProtocolError("schema", "chunk field 'data' missing or not a bin")
    start, end = chunk_bounds(index, count, size)
    if len(data) != end - start:
        raise ProtocolError("schema", f"chunk {index} of {count} of a {size}-byte message "
                                      f"must hold {end - start} bytes, holds {len(data)}")
    return Chunk(message_id, index, count, size, bytes(digest), data)


@dataclass(frozen=True)
class ChunkLimits:
    """``max_message_bytes``: largest whole message (its ``size``); ``max_sender_bytes`` and
    ``max_total_bytes``: most bytes held in partial reassemblies for one sender and for all
    (each chunk counts its data plus ``HELD_PER_CHUNK``); ``timeout``: seconds without a
    new chunk after which a partial reassembly is dropped."""

    max_message_bytes: int
    max_sender_bytes: int
    max_total_bytes: int
    timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_sender_bytes", "max_total_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {self.timeout}")


@dataclass(frozen=True)
class Dropped:
    """A partial reassembly given up: ``reason`` one of ``timeout``, ``resent`` (the same
    message arrived in another number of chunks), ``over_sender_cap``, ``over_total_cap``,
    ``digest``, ``superseded`` (the caller's choice, ``drop_sender``)."""

    sender: str
    id: str
    reason: str
    detail: str
    received: int
    count: int
    held: int  # bytes it held (data plus HELD_PER_CHUNK per chunk)


@dataclass(frozen=True)
class Outcome:
    """What one chunk did: ``stored``, ``duplicate`` (that chunk was already held),
    ``complete`` (``payload`` is the whole message, its digest checked) or ``rejected``
    (``reason``: ``too_large``, ``conflict``, ``over_sender_cap``, ``over_total_cap``,
    ``digest``). ``dropped``: partial reassemblies this chunk made the reassembler give up."""

    status: str
    payload: bytes | None = None
    reason: str | None = None
    detail: str = ""
    dropped: tuple[Dropped, ...] = ()


@dataclass
class _Partial:
    count: int
    size: int
    digest: bytes
    last: float  # when it last received a new chunk
    parts: dict[int, bytes] = field(default_factory=dict)
    held: int = 0


class Reassembler:
    """Partial reassemblies keyed by (sender, id), bounded by ``limits``."""

    def __init__(self, limits: ChunkLimits) -> None:
        self.limits = limits
        self._partials: dict[tuple[str, str], _Partial] = {}
        self._held: dict[str, int] = {}
        self.total_held = 0

    def held(self, sender: str) -> int:
        """Bytes held for ``sender``'s partial reassemblies."""
        return self._held.get(sender, 0)

    def partials(self, sender: str | None = None) -> list[tuple[str, str]]:
        """(sender, id) of the partial reassemblies (of ``sender`` only, if given)."""
        return [key for key in self._partials if sender is None or key[0] == sender]

    def _remove(self, key: tuple[str, str], reason: str, detail: str) -> Dropped:
        partial = self._partials.pop(key)
        self._held[key[0]] -= partial.held
        if not self._held[key[0]]:
            del self._held[key[0]]
        self.total_held -= partial.held
        return Dropped(key[0], key[1], reason, detail, len(partial.parts), partial.count,
                       partial.held)

    def add(self, sender: str, chunk: Chunk, now: float) -> Outcome:
        """Take one chunk (already checked by ``read_chunk``) of ``sender``."""
        lim = self.limits
        if chunk.size > lim.max_message_bytes:
            return Outcome("rejected", reason="too_large",
                           detail=f"message {chunk.id} of {chunk.size} bytes exceeds the "
                                  f"limit of {lim.max_message_bytes}")
        key = (sender, chunk.id)
        dropped: list[Dropped] = []
        partial = self._partials.get(key)
        if partial is not None and (partial.size != chunk.size
                                    or partial.digest != chunk.digest):
            return Outcome("rejected", reason="conflict",
                           detail=f"id {chunk.id} already names a message of {partial.size} "
                                  "bytes with another digest")
        if partial is not None and partial.count != chunk.count:
            dropped.append(self._remove(key, "resent", f"message {chunk.id} was sent again "
                                        f"in {chunk.count} chunks instead of {partial.count}"))
            partial = None
        if partial is not None and chunk.index in partial.parts:
            if partial.parts[chunk.index] == chunk.data:
                return Outcome("duplicate", dropped=tuple(dropped))
            return Outcome("rejected", reason="conflict",
                           detail=f"chunk {chunk.index} of {chunk.id} arrived again with "
                                  "other bytes", dropped=tuple(dropped))
        cost = len(chunk.data) + HELD_PER_CHUNK
        over = None
        if self.held(sender) + cost > lim.max_sender_bytes:
            over = ("over_sender_cap", f"{sender} would hold more than "
                    f"{lim.max_sender_bytes} bytes in partial messages")
        elif self.total_held + cost > lim.max_total_bytes:
            over = ("over_total_cap", f"partial messages would take more than "
                    f"{lim.max_total_bytes} bytes in all")
        if over is not None:
            if partial is not None:  # it can no longer complete: free it now
                dropped.append(self._remove(key, *over))
            return Outcome("rejected", reason=over[0], detail=over[1], dropped=tuple(dropped))
        if partial is None:
            partial = self._partials[key] = _Partial(chunk.count, chunk.size, chunk.digest,
                                                     now)
        partial.parts[chunk.index] = bytes(chunk.data)
        partial.held += cost
        partial.last = now
        self._held[sender] = self.held(sender) + cost
        self.total_held += cost
        if len(partial.parts) < partial.count:
            return Outcome("stored", dropped=tuple(dropped))
        payload = b"".join(partial.parts[i] for i in range(partial.count))
        if hashlib.sha256(payload).digest() != partial.digest:
            dropped.append(self._remove(key, "digest", f"message {chunk.id}: the "
                                        "reassembled bytes do not match its SHA-256"))
            return Outcome("rejected", reason="digest", detail=dropped[-1].detail,
                           dropped=tuple(dropped))
        self._remove(key, "complete", "")
        return Outcome("complete", payload=payload, dropped=tuple(dropped))

    def expire(self, now: float) -> list[Dropped]:
        """Drop the partial reassemblies that received no new chunk for ``timeout`` s."""
        out = []
        for key, partial in list(self._partials.items()):
            idle = now - partial.last
            if idle >= self.limits.timeout:
                missing = partial.count - len(partial.parts)
                out.append(self._remove(key, "timeout", f"{missing} of {partial.count} "
                                        f"chunks missing after {idle:.0f} s without a new one"))
        return out

    def drop_sender(self, sender: str, reason: str, detail: str) -> list[Dropped]:
        """Give up every partial reassembly of ``sender``."""
        return [self._remove(key, reason, detail) for key in self.partials(sender)]
