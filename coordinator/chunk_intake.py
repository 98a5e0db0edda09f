"""The coordinator's side of chunked updates (protocol revision 2.6): chunks in, whole
updates out, every refusal counted and logged with its reason.

No network and no clock: the service hands in each chunk message of a device's update topic
with ``now`` (monotonic seconds) and judges the payload ``add`` returns exactly as it judges
an update that came whole. Memory is bounded by ``fedbus.chunks.ChunkLimits``: a message's
size (the task's ``max_update_bytes``), the bytes one device's partial updates hold, and the
bytes all of them hold. A device's chunks are also charged to its share of the coordinator's
time like any message (``coordinator.admission``, by the service), so partial reassemblies
count against the sender's budget in both currencies.

Logging: a warning per device and reason at most once a minute (a flood must not flood the
log), every event at debug level.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fedbus.chunks import ChunkLimits, Dropped, Reassembler, read_chunk
from fedbus.errors import ProtocolError

__all__ = ["ChunkIntake", "chunk_limits"]

log = logging.getLogger(__name__)

_WARN_INTERVAL = 60.0
COUNTERS = ("chunks_received", "chunks_duplicate", "chunks_refused", "chunked_updates",
            "chunked_updates_dropped", "chunked_updates_timed_out")


def chunk_limits(max_update_bytes: int, per_device: int, total: int,
                 timeout: float) -> ChunkLimits:
    """The coordinator's limits: a chunked update is at most ``max_update_bytes``; a device
    holds at most ``per_device`` bytes in partial updates (0: twice ``max_update_bytes``
    and 64 KiB, room for one update and the start of its re-send), all devices at most
    ``total``."""
    own = per_device or 2 * max_update_bytes + 64 * 1024
    return ChunkLimits(max_message_bytes=max_update_bytes, max_sender_bytes=own,
                       max_total_bytes=total, timeout=timeout)


class ChunkIntake:
    """Partial updates of every device, and what became of their chunks."""

    def __init__(self, limits: ChunkLimits, max_chunk_bytes: int) -> None:
        self.reassembler = Reassembler(limits)
        self.max_chunk_bytes = max_chunk_bytes
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._warned: dict[tuple[str, str], float] = {}

    def _warn(self, device: str, reason: str, now: float, text: str, *args: object) -> None:
        last = self._warned.get((device, reason))
        if last is None or now - last >= _WARN_INTERVAL:
            self._warned[(device, reason)] = now
            log.warning(text, *args)
        else:
            log.debug(text, *args)

    def add(self, device: str, payload: bytes, now: float) -> bytes | None:
        """Take one chunk message of ``device``; the whole update once it is complete."""
        self.counters["chunks_received"] += 1
        try:
            chunk = read_chunk(payload, self.max_chunk_bytes)
        except ProtocolError as exc:
            self.counters["chunks_refused"] += 1
            self._warn(device, exc.reason, now, "refused a chunk of %s: %s (%s)", device,
                       exc.reason, exc)
            return None
        outcome = self.reassembler.add(device, chunk, now)
        self._dropped(outcome.dropped, now)
        if outcome.status == "duplicate":
            self.counters["chunks_duplicate"] += 1
        elif outcome.status == "rejected":
            self.counters["chunks_refused"] += 1
            self._warn(device, outcome.reason or "", now, "refused chunk %d of %d of update "
                       "%s of %s: %s (%s)", chunk.index, chunk.count, chunk.id, device,
                       outcome.reason, outcome.detail)
        elif outcome.status == "complete":
            self.counters["chunked_updates"] += 1
            log.debug("update %s of %s reassembled from %d chunks (%d bytes)", chunk.id,
                      device, chunk.count, chunk.size)
            return outcome.payload
        return None

    def expire(self, now: float) -> None:
        """Drop the partial updates that waited too long for a chunk (logged, counted)."""
        self._dropped(self.reassembler.expire(now), now)

    def _dropped(self, dropped: Iterable[Dropped], now: float) -> None:
        for gone in dropped:
            key = ("chunked_updates_timed_out" if gone.reason == "timeout"
                   else "chunked_updates_dropped")
            self.counters[key] += 1
            self._warn(gone.sender, gone.reason, now, "dropped the partial update %s of %s "
                       "(%d of %d chunks, %d bytes held): %s (%s)", gone.id, gone.sender,
                       gone.received, gone.count, gone.held, gone.reason, gone.detail)
