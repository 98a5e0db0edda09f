"""What an agent keeps across restarts: its outbox, its error-feedback residual, the last
model version it trained on, and a short ledger of what became of its updates.

One SQLite database in WAL mode, ``<state_dir>/agent.db``, so that the changes belonging
together land together:

- a trained update enters the **outbox** in the same transaction that records the version
  it was trained on and saves the new top-k residual; it is written before it is
  published, so an update in flight when the agent dies is sent again after the restart,
  and the agent never trains twice on the same version of the same run;
- an update leaves the outbox only when its receipt arrives (``settle``), or when the agent
  gives up on it (``drop``: too stale to be accepted, refused by the broker, the outbox
  over its bounds, the run ended or replaced). For a top-k task the content of a rejected
  or dropped update goes back into the residual in the same transaction, so it is sent
  later instead of being lost;
- the **ledger** keeps the fate of the newest ``ledger_capacity`` updates (produced,
  accepted, rejected and why, dropped and why), for the operator and for tests.

The id of the last invitation used (revision 2.13, meta ``invite_used``) is recorded in the
transaction that puts its update in the outbox: after a restart the agent names it in its
status, so the coordinator does not send it again; an invitation received but not yet
trained on is forgotten by a restart, and the coordinator sends it again.

Everything belongs to one run (``run_id``): a new run's task makes the agent forget the
outbox and residual of the old one (``start_run``), and remember the new run and when it
began (``joined_run``), so that a replayed task of an older run is refused after a restart.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbus.sqlite_store import open_database, transaction
from fedbus.tensor_map import pack_tensors, unpack_tensors

__all__ = ["STATE_FILE", "AgentState", "LedgerRow", "OutboxEntry"]

log = logging.getLogger(__name__)

STATE_FILE = "agent.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL UNIQUE,
    run_id TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    feedback INTEGER NOT NULL,
    created_at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS residual (run_id TEXT PRIMARY KEY, tensors BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS progress (run_id TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL UNIQUE,
    run_id TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    fate TEXT NOT NULL,
    detail TEXT,
    settled_at REAL
);
"""


@dataclass(frozen=True)
class OutboxEntry:
    """An update waiting for its receipt; ``payload`` is exactly what is (re)sent."""

    update_id: str
    run_id: str
    base_version: int
    payload: bytes
    feedback: bool  # a top-k update with error feedback: its content goes back if lost


@dataclass(frozen=True)
class LedgerRow:
    update_id: str
    run_id: str
    base_version: int
    bytes: int
    created_at: float
    fate: str  # "pending", "accepted", "rejected", "dropped"
    detail: str | None
    settled_at: float | None


class AgentState:
    """One device's durable state. Used by one thread at a time (the agent's)."""

    def __init__(self, path: Path | None, *, ledger_capacity: int = 1000) -> None:
        """``path``: the database file, or None for memory only (nothing survives)."""
        self.path = path
        self.ledger_capacity = ledger_capacity
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # created where the agent is built, used by the thread that runs it (one at a time)
        self._db = open_database(path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- reads ---------------------------------------------------------------------------

    def last_version(self, run_id: str) -> int | None:
        """The last model version of ``run_id`` this device trained on (or gave up on)."""
        row = self._db.execute(
            "SELECT version FROM progress WHERE run_id = ?", (run_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def outbox(self, run_id: str | None = None) -> list[OutboxEntry]:
        """The outbox in the order the updates were made (of one run, or all)."""
        query = "SELECT update_id, run_id, base_version, payload, feedback FROM outbox"
        args: tuple[str, ...] = ()
        if run_id is not None:
            query += " WHERE run_id = ?"
            args = (run_id,)
        return [
            OutboxEntry(uid, run, base, bytes(payload), bool(feedback))
            for uid, run, base, payload, feedback in self._db.execute(
                query + " ORDER BY seq", args
            )
        ]

    def outbox_bytes(self) -> int:
        return int(self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()[0])

    def residual(
        self, run_id: str, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray]:
        """The error-feedback residual of ``run_id`` with these tensors, or zeros (logged
        when a stored one does not fit)."""
        zeros = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        row = self._db.execute(
            "SELECT tensors FROM residual WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            return zeros
        try:
            stored = unpack_tensors(bytes(row[0]))
        except ValueError as exc:
            log.warning("the stored error-feedback residual is unreadable (%s); starting from "
                        "zero", exc)
            return zeros
        if set(stored) != set(shapes) or any(
            stored[name].shape != tuple(shape) for name, shape in shapes.items()
        ):
            log.warning("the stored error-feedback residual holds other tensors than the "
                        "model; starting from zero")
            return zeros
        if not all(np.isfinite(a).all() for a in stored.values()):
            log.warning("the stored error-feedback residual is not finite; starting from zero")
            return zeros
        return stored

    def ledger(self) -> list[LedgerRow]:
        return [
            LedgerRow(*row) for row in self._db.execute(
                "SELECT update_id, run_id, base_version, bytes, created_at, fate, detail, "
                "settled_at FROM ledger ORDER BY seq"
            )
        ]

    # -- transactions ----------------------------------------------------------------------

    def joined_run(self) -> tuple[str, float] | None:
        """The run joined last and when it began (its task's ``created_at``), if known."""
        rows = dict(self._db.execute(
            "SELECT key, value FROM meta WHERE key IN ('run', 'run_began')").fetchall())
        if "run" not in rows or "run_began" not in rows:
            return None
        return str(rows["run"]), float(rows["run_began"])

    def invite_used(self) -> str | None:
        """The id of the last invitation an update was trained for (revision 2.13)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'invite_used'").fetchone()
        return None if row is None else str(row[0])

    def start_run(self, run_id: str, began: float | None = None) -> list[OutboxEntry]:
        """Forget every other run: its outbox entries (returned, so the caller can log
        them), residual and progress; remember ``run_id`` and when it ``began``."""
        stale = [e for e in self.outbox() if e.run_id != run_id]
        with self._transaction():
            if began is not None:
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [("run", run_id), ("run_began", repr(float(began)))],
                )
            for entry in stale:
                self._settle(entry.update_id, "dropped", "the run ended or was replaced")
            self._db.execute("DELETE FROM outbox WHERE run_id != ?", (run_id,))
            self._db.execute("DELETE FROM residual WHERE run_id != ?", (run_id,))
            self._db.execute("DELETE FROM progress WHERE run_id != ?", (run_id,))
        return stale

    def record_trained(
        self,
        run_id: str,
        version: int,
        entry: OutboxEntry | None,
        *,
        residual: Mapping[str, np.ndarray] | None = None,
        invite_id: str | None = None,
    ) -> None:
        """One training run is done: ``version`` is trained on; ``entry`` (if any) joins
        the outbox; ``residual`` (if given) replaces the stored one; ``invite_id`` (if
        given) is the invitation it used. All or nothing."""
        with self._transaction():
            if invite_id is not None:
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES "
                                 "('invite_used', ?)", (invite_id,))
            self._db.execute(
                "INSERT INTO progress (run_id, version) VALUES (?, ?) ON CONFLICT (run_id) "
                "DO UPDATE SET version = MAX(version, excluded.version)", (run_id, version),
            )
            if residual is not None:
                self._set_residual(run_id, residual)
            if entry is None:
                return
            now = time.time()
            self._db.execute(
                "INSERT INTO outbox (update_id, run_id, base_version, feedback, created_at, "
                "payload) VALUES (?, ?, ?, ?, ?, ?)",
                (entry.update_id, entry.run_id, entry.base_version, int(entry.feedback), now,
                 entry.payload),
            )
            self._db.execute(
                "INSERT OR REPLACE INTO ledger (update_id, run_id, base_version, bytes, "
                "created_at, fate) VALUES (?, ?, ?, ?, ?, 'pending')",
                (entry.update_id, entry.run_id, entry.base_version, len(entry.payload), now),
            )
            self._db.execute(
                "DELETE FROM ledger WHERE seq <= (SELECT MAX(seq) FROM ledger) - ?",
                (self.ledger_capacity,),
            )

    def settle(
        self,
        update_id: str,
        fate: str,
        detail: str | None,
        *,
        run_id: str | None = None,
        residual: Mapping[str, np.ndarray] | None = None,
    ) -> bool:
        """``update_id`` leaves the outbox with ``fate`` (accepted, rejected, dropped);
        ``residual`` (with ``run_id``) replaces the stored one in the same transaction.
        False if it was not in the outbox (a repeated receipt)."""
        with self._transaction():
            gone = self._settle(update_id, fate, detail)
            if gone and residual is not None and run_id is not None:
                self._set_residual(run_id, residual)
        return gone

    # -- internals -------------------------------------------------------------------------

    def _settle(self, update_id: str, fate: str, detail: str | None) -> bool:
        gone = self._db.execute(
            "DELETE FROM outbox WHERE update_id = ?", (update_id,)
        ).rowcount > 0
        if gone:
            self._db.execute(
                "UPDATE ledger SET fate = ?, detail = ?, settled_at = ? WHERE update_id = ?",
                (fate, detail, time.time(), update_id),
            )
        return gone

    def _set_residual(self, run_id: str, residual: Mapping[str, np.ndarray]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO residual (run_id, tensors) VALUES (?, ?)",
            (run_id, pack_tensors(residual)),
        )

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return transaction(self._db)

