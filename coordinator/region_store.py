"""The regional aggregator's durable state (protocol revision 2.11): one SQLite file in WAL
mode (``fedbus.sqlite_store``), as the coordinator keeps its run.

- ``verdicts``: the first verdict of every device update id (the ``Ledger`` that
  ``validate_update`` reads: a copy gets the same receipt again, a retrained copy of the
  same work is ``duplicate_work``), with the norm of each accepted one (the adaptive norm
  bound's window after a restart);
- ``parts``: accepted device updates not yet folded into a sent partial, with their raw
  payload and the clip bound they were given, in arrival order: a restarted aggregator
  decodes them again and puts them back in their open partials;
- ``partials``: every partial made, its exact bytes, and the root's verdict once its
  receipt came (NULL until then): a restarted aggregator sends the unacknowledged ones
  again, byte for byte, so the root answers a copy it already judged with its first
  verdict and never applies a partial twice;
- ``meta``: the next partial's sequence number, the run the state belongs to and when that
  run began (its task's ``created_at``).

A device's receipt is sent only after its verdict (and, accepted, its part) is committed;
a partial is published only after the transaction that made it (and took its parts out of
``parts``) is committed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.journal import Verdict
from fedbus.sqlite_store import open_database, transaction

__all__ = ["RegionStore", "StoredPart", "StoredPartial"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verdicts (
    update_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, digest BLOB NOT NULL,
    base INTEGER NOT NULL, accepted INTEGER NOT NULL, reason TEXT, detail TEXT NOT NULL,
    model_version INTEGER NOT NULL, staleness INTEGER, size INTEGER, norm REAL,
    partial TEXT);
CREATE INDEX IF NOT EXISTS verdicts_work ON verdicts (device_id, base) WHERE accepted = 1;
CREATE TABLE IF NOT EXISTS parts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, update_id TEXT UNIQUE NOT NULL,
    device_id TEXT NOT NULL, base INTEGER NOT NULL, clip REAL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS partials (
    partial_id TEXT PRIMARY KEY, base INTEGER NOT NULL, parts INTEGER NOT NULL,
    payload BLOB NOT NULL, verdict TEXT);
"""


@dataclass(frozen=True)
class StoredPart:
    update_id: str
    device_id: str
    base_version: int
    clip: float | None
    payload: bytes


@dataclass(frozen=True)
class StoredPartial:
    partial_id: str
    base_version: int
    parts: int
    payload: bytes


class RegionStore:
    """See the module doc. ``path`` None: in memory (tests)."""

    def __init__(self, path: Path | None, *, sync: str = "normal") -> None:
        self._db: sqlite3.Connection = open_database(path, sync=sync)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- the Ledger of validate_update ------------------------------------------------------

    def verdict(self, update_id: str) -> Verdict | None:
        row = self._db.execute(
            "SELECT update_id, device_id, digest, base, accepted, reason, detail, "
            "model_version, staleness, size FROM verdicts WHERE update_id = ?",
            (update_id,)).fetchone()
        if row is None:
            return None
        return Verdict(row[0], row[1], bytes(row[2]), row[3], bool(row[4]), row[5], row[6],
                       row[7], row[8], row[9])

    def work(self, device_id: str, base_version: int) -> str | None:
        row = self._db.execute(
            "SELECT update_id FROM verdicts WHERE device_id = ? AND base = ? AND accepted = 1",
            (device_id, base_version)).fetchone()
        return None if row is None else str(row[0])

    # -- writes -----------------------------------------------------------------------------

    def judged(self, verdict: Verdict, *, norm: float | None = None,
               part: StoredPart | None = None) -> None:
        """One device update's verdict, with its part when accepted, in one transaction."""
        with transaction(self._db):
            self._db.execute(
                "INSERT OR IGNORE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (verdict.update_id, verdict.device_id, verdict.digest, verdict.base_version,
                 int(verdict.accepted), verdict.reason, verdict.detail,
                 verdict.model_version, verdict.staleness, verdict.size, norm))
            if part is not None:
                self._db.execute(
                    "INSERT INTO parts (update_id, device_id, base, clip, payload) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (part.update_id, part.device_id, part.base_version, part.clip,
                     part.payload))

    def made(self, partial: StoredPartial, update_ids: Sequence[str]) -> None:
        """A partial made of ``update_ids``: stored, its parts taken out of ``parts``, the
        sequence number moved on, in one transaction."""
        with transaction(self._db):
            self._db.execute("INSERT INTO partials VALUES (?, ?, ?, ?, NULL)",
                             (partial.partial_id, partial.base_version, partial.parts,
                              partial.payload))
            self._db.executemany("DELETE FROM parts WHERE update_id = ?",
                                 [(u,) for u in update_ids])
            self._db.executemany("UPDATE verdicts SET partial = ? WHERE update_id = ?",
                                 [(partial.partial_id, u) for u in update_ids])
            self._set_meta("seq", str(self.next_seq() + 1))

    def dropped(self, update_ids: Iterable[str]) -> None:
        """Parts given up (a new run, or versions too old to send)."""
        with transaction(self._db):
            self._db.executemany("DELETE FROM parts WHERE update_id = ?",
                                 [(u,) for u in update_ids])

    def answered(self, partial_id: str, verdict: str) -> bool:
        """The root's verdict on a partial; False if the partial is unknown or was already
        answered."""
        with transaction(self._db):
            cur = self._db.execute(
                "UPDATE partials SET verdict = ? WHERE partial_id = ? AND verdict IS NULL",
                (verdict, partial_id))
        return cur.rowcount == 1

    def set_run(self, run_id: str, created_at: float | None = None) -> None:
        """The run the state belongs to from now on, and when it began (its task's
        ``created_at``: a task of a run that began earlier is never followed again)."""
        with transaction(self._db):
            self._set_meta("run", run_id)
            if created_at is not None:
                self._set_meta("run_created", repr(float(created_at)))

    # -- reads ------------------------------------------------------------------------------

    def run(self) -> str | None:
        return self._meta("run")

    def run_created(self) -> float | None:
        value = self._meta("run_created")
        return None if value is None else float(value)

    def next_seq(self) -> int:
        value = self._meta("seq")
        return 0 if value is None else int(value)

    def open_parts(self) -> list[StoredPart]:
        rows = self._db.execute(
            "SELECT update_id, device_id, base, clip, payload FROM parts ORDER BY seq")
        return [StoredPart(r[0], r[1], r[2], r[3], bytes(r[4])) for r in rows]

    def unanswered(self) -> list[StoredPartial]:
        rows = self._db.execute(
            "SELECT partial_id, base, parts, payload FROM partials WHERE verdict IS NULL "
            "ORDER BY rowid")
        return [StoredPartial(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def verdict_of(self, partial_id: str) -> str | None:
        row = self._db.execute("SELECT verdict FROM partials WHERE partial_id = ?",
                               (partial_id,)).fetchone()
        return None if row is None else row[0]

    def norms(self, window: int) -> list[float]:
        """The norms of the newest ``window`` accepted updates, oldest first."""
        rows = self._db.execute(
            "SELECT norm FROM verdicts WHERE accepted = 1 AND norm IS NOT NULL "
            "ORDER BY rowid DESC LIMIT ?", (window,)).fetchall()
        return [float(r[0]) for r in reversed(rows)]

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                         "value = excluded.value", (key, value))
