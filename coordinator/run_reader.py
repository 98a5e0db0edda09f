"""Reading a coordinator's state directory for a report, read-only.

Nothing in the directory is written or locked, and a coordinator may be running on it:

- while the database has a write-ahead log (``state.db-wal``: a coordinator is running, or
  one was killed), it is opened with SQLite's ``mode=ro`` URI, which reads the committed
  state through the log without blocking the writer;
- without one (every coordinator closed it cleanly), the database file alone is the run, and
  it is opened ``immutable=1``: even ``mode=ro`` would create ``-wal`` and ``-shm`` files
  beside it. A coordinator starting meanwhile writes into a new log, not into this file
  (SQLite copies the log into it only at a checkpoint, after about 1,000 pages).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from coordinator.store import DB_FILE
from coordinator.trial_report import VerdictRow, VersionRow
from fedbus.errors import StateError

__all__ = ["RunRows", "read_run"]


@dataclass(frozen=True)
class RunRows:
    meta: dict[str, Any]
    versions: list[VersionRow]
    verdicts: list[VerdictRow]


def read_run(directory: Path) -> RunRows:
    """The rows of the run in ``directory`` (a coordinator's ``--state-dir``)."""
    directory = Path(directory)
    db_file = directory / DB_FILE
    if not directory.is_dir():
        raise StateError(f"{directory}: no such directory (give a coordinator's --state-dir)")
    if not db_file.is_file():
        raise StateError(
            f"{directory} holds no run ({DB_FILE} missing): give a coordinator's --state-dir"
        )
    has_log = db_file.with_name(f"{DB_FILE}-wal").exists()
    uri = f"file:{quote(str(db_file.resolve()))}?mode=ro" + ("" if has_log else "&immutable=1")
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise StateError(f"{db_file}: cannot open read-only: {exc}") from None
    try:
        return _read(db, db_file)
    except sqlite3.Error as exc:
        raise StateError(f"{db_file}: not a readable fedbus state database: {exc}") from None
    finally:
        db.close()


def _read(db: sqlite3.Connection, db_file: Path) -> RunRows:
    meta_rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if "run_id" not in meta_rows:
        raise StateError(f"{db_file} holds no run yet")
    meta: dict[str, Any] = {
        "run_id": meta_rows["run_id"],
        "task": json.loads(meta_rows.get("task", "{}")),
        "created_at": float(meta_rows.get("created_at", "0")),
        "mode": meta_rows.get("mode"),
        "aggregator": meta_rows.get("aggregator", "mean"),
        "privacy": meta_rows.get("privacy"),
        "ended": meta_rows.get("ended"),
        "counters": json.loads(meta_rows.get("counters", "{}")),
    }
    versions = [
        VersionRow(int(v), float(t), int(n), acc, loss)
        for v, t, n, acc, loss in db.execute(
            "SELECT h.version, h.made_at, h.updates, e.accuracy, e.loss FROM history h "
            "LEFT JOIN evaluations e USING (version) ORDER BY h.version"
        )
    ]
    columns = {row[1] for row in db.execute("PRAGMA table_info(verdicts)")}
    size = "size" if "size" in columns else "NULL"  # an older run recorded no sizes
    verdicts = [
        VerdictRow(str(dev), bool(ok), reason, int(ver), stale, size_)
        for dev, ok, reason, ver, stale, size_ in db.execute(
            f"SELECT device, accepted, reason, model_version, staleness, {size} "
            "FROM verdicts ORDER BY seq"
        )
    ]
    return RunRows(meta, versions, verdicts)
