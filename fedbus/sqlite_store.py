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

__all__ = ["SYNC_MODES", "open_database", "transaction"]

SYNC_MODES = ("normal", "full")


def open_database(path: Path | None, *, sync: str = "normal") -> sqlite3.Connection:
    """A connection in autocommit mode (use ``transaction``); ``path`` None: in memory.

    The connection may be used from any thread, one at a time (the caller serialises).
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
    return db


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
