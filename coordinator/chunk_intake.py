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
from dataclasses import dataclass

from coordinator.chunk_store import ChunkStore
from fedbus.chunks import ChunkLimits, Dropped, Reassembler, read_chunk
from fedbus.errors import ProtocolError

__all__ = ["ChunkIntake", "Completed", "chunk_limits"]

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


@dataclass(frozen=True)
class Completed:
    """A whole update of ``device``, reassembled from the chunks of ``id``."""

    device: str
    id: str
    payload: bytes


class ChunkIntake:
    """Partial updates of every device, and what became of their chunks. With a
    ``ChunkStore`` every chunk held is written before ``add`` returns (so before its
    PUBACK), and a completed update's chunks stay there until ``done`` (after its verdict
    is committed): a crash in between makes ``restore`` hand the update in again, to be
    answered as a repeat."""

    def __init__(self, limits: ChunkLimits, max_chunk_bytes: int,
                 store: ChunkStore | None = None) -> None:
        self.reassembler = Reassembler(limits)
        self.max_chunk_bytes = max_chunk_bytes
        self.store = store or ChunkStore(None)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._warned: dict[tuple[str, str], float] = {}

    def _warn(self, device: str, reason: str, now: float, text: str, *args: object) -> None:
        last = self._warned.get((device, reason))
        if last is None or now - last >= _WARN_INTERVAL:
            self._warned[(device, reason)] = now
            log.warning(text, *args)
        else:
            log.debug(text, *args)

    def restore(self, now: float) -> list[Completed]:
        """Take back the chunks kept by a process that stopped; the updates they complete
        (judged already if the process stopped after its verdict: then a repeat)."""
        completed = []
        for device, payload in self.store.load():
            try:
                chunk = read_chunk(payload, max(self.max_chunk_bytes, len(payload)))
            except ProtocolError as exc:  # never written so: checked before it was kept
                log.error("a kept chunk of %s cannot be read (%s); skipped", device, exc)
                continue
            outcome = self.reassembler.add(device, chunk, now)
            self._dropped(outcome.dropped, now)
            if outcome.status == "complete" and outcome.payload is not None:
                completed.append(Completed(device, chunk.id, outcome.payload))
            elif outcome.status == "rejected":
                self.store.delete(device, chunk.id)
        if completed or self.reassembler.total_held:
            log.info("took back %d partial update(s) (%d bytes) and %d complete one(s) from "
                     "the state directory", len(self.reassembler.partials()),
                     self.reassembler.total_held, len(completed))
        return completed

    def done(self, completed: Completed) -> None:
        """``completed`` was judged and its verdict committed: forget its chunks."""
        self.store.delete(completed.device, completed.id)

    def add(self, device: str, payload: bytes, now: float) -> Completed | None:
        """Take one chunk message of ``device``; the whole update once it is complete
        (call ``done`` once it is judged)."""
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
        if outcome.status in ("stored", "complete"):
            self.store.put(device, chunk.id, chunk.index, payload)
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
            assert outcome.payload is not None
            return Completed(device, chunk.id, outcome.payload)
        return None

    def expire(self, now: float) -> None:
        """Drop the partial updates that waited too long for a chunk (logged, counted)."""
        self._dropped(self.reassembler.expire(now), now)

    def _dropped(self, dropped: Iterable[Dropped], now: float) -> None:
        for gone in dropped:
            self.store.delete(gone.sender, gone.id)
            key = ("chunked_updates_timed_out" if gone.reason == "timeout"
                   else "chunked_updates_dropped")
            self.counters[key] += 1
            self._warn(gone.sender, gone.reason, now, "dropped the partial update %s of %s "
                       "(%d of %d chunks, %d bytes held): %s (%s)", gone.id, gone.sender,
                       gone.received, gone.count, gone.held, gone.reason, gone.detail)
