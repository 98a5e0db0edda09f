"""Opening a SQLite database for durable state, and its transactions.

Both sides keep state this way: the coordinator its run (``coordinator.store``), the agent its
outbox (``edge_agent.state``). WAL mode, so a reader never blocks the writer and a commit is
one append to the log; ``synchronous`` NORMAL survives a crash of the process at any instant,
FULL also an operating-system crash or a power cut.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from fedbus.errors import StateError

__all__ = ["SYNC_MODES", "Checkpointer", "open_database", "transaction"]

SYNC_MODES = ("normal", "full")


def open_database(path: Path | None, *, sync: str = "normal",
                  autocheckpoint: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode (use ``transaction``); ``path`` None: in memory.

    The connection may be used from any thread, one at a time (the caller serialises).
    ``autocheckpoint`` False: commits never copy the log into the database file (SQLite
    otherwise does it, with its fsyncs, inside the commit that takes the log past 1,000
    pages); the owner then runs a ``Checkpointer`` on another thread.
    """
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
    db = sqlite3.connect(":memory:" if path is None else str(path), isolation_level=None,
                         check_same_thread=False)
    if path is not None:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            db.close()
            raise StateError(f"{path}: SQLite refused WAL mode (got {mode!r})")
    db.execute(f"PRAGMA synchronous={sync.upper()}")
    if not autocheckpoint:
        db.execute("PRAGMA wal_autocheckpoint=0")
    return db


class Checkpointer:
    """Copies the write-ahead log of ``path`` into the database file, on its own connection,
    so that whichever thread calls ``run`` pays for it (the fsyncs included) instead of a
    commit of the writer's. PASSIVE: it never waits for, nor blocks, the writer or readers;
    what it cannot copy yet is copied by a later call. Durability is that of the commits
    (``synchronous``), whenever this runs: a committed transaction is in the log already.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None

    def run(self) -> int:
        """One passive checkpoint; the number of log pages now in the database file."""
        if self._db is None:
            self._db = sqlite3.connect(str(self._path), isolation_level=None,
                                       check_same_thread=False)
        try:
            row = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            raise StateError(f"cannot checkpoint {self._path}: {exc}") from exc
        return int(row[2]) if row is not None and row[2] is not None else 0

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """All the statements of the block, or none of them."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
