"""Durable partial updates (protocol revision 2.6): every chunk the coordinator holds is
written here before its PUBACK goes out, so a coordinator that crashes with a partial update
resumes it instead of losing the chunks the broker will not deliver again.

``chunks.db`` in the state directory, SQLite in WAL mode (``fedbus.sqlite_store``), one row
per chunk message as it arrived; a partial update's rows are deleted once it is complete
and judged, or given up. Kept apart from the run's ``state.db`` so that the run's store
format does not change: a fedbus before revision 2.6 ignores the file. Rows of a run that
has since been replaced are judged like any update of another run (``wrong_run``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fedbus.errors import StateError
from fedbus.sqlite_store import open_database, transaction

__all__ = ["CHUNKS_FILE", "ChunkStore"]

CHUNKS_FILE = "chunks.db"


class ChunkStore:
    """The chunks of partial updates; ``path`` None keeps nothing (a run in memory only)."""

    def __init__(self, path: Path | None, *, sync: str = "normal") -> None:
        self._db: sqlite3.Connection | None = None
        if path is None:
            return
        try:
            self._db = open_database(path, sync=sync)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS chunk (device TEXT NOT NULL, id TEXT NOT NULL, "
                "i INTEGER NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (device, id, i))"
            )
        except sqlite3.Error as exc:
            raise StateError(f"cannot open {path}: {exc}") from None

    def put(self, device: str, message_id: str, index: int, payload: bytes) -> None:
        """Keep one chunk message (raises ``StateError`` if it cannot be written)."""
        if self._db is None:
            return
        try:
            with transaction(self._db):
                self._db.execute("INSERT OR REPLACE INTO chunk VALUES (?, ?, ?, ?)",
                                 (device, message_id, index, payload))
        except sqlite3.Error as exc:
            raise StateError(f"cannot record a chunk: {exc}") from None

    def delete(self, device: str, message_id: str) -> None:
        """Forget every chunk of one partial update."""
        if self._db is None:
            return
        try:
            with transaction(self._db):
                self._db.execute("DELETE FROM chunk WHERE device = ? AND id = ?",
                                 (device, message_id))
        except sqlite3.Error as exc:
            raise StateError(f"cannot record a chunk: {exc}") from None

    def load(self) -> list[tuple[str, bytes]]:
        """(device, chunk message) of every chunk kept, each update's in index order."""
        if self._db is None:
            return []
        rows = self._db.execute("SELECT device, payload FROM chunk ORDER BY device, id, i")
        return [(str(device), bytes(payload)) for device, payload in rows]

    def clear(self) -> None:
        if self._db is not None:
            with transaction(self._db):
                self._db.execute("DELETE FROM chunk")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
