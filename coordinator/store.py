"""The coordinator's durable state: one run in a state directory, in SQLite (WAL mode).

Layout of a state directory::

    state.db, state.db-wal, state.db-shm   the run (this module)
    lock                                   held (flock) by the coordinator using it
    model.npz                              the current global model, for people and tools
    model_best.npz                         the best evaluated version's model (service)
    history.jsonl                          one line per version, appended
    runs/<run id>/                         earlier runs, moved aside by --new-run

Why SQLite in WAL mode rather than a hand-written log: measured on this project's 2-core
machine (docs/operations.md, "The state directory"), one committed transaction holding a
6 KB update costs about 90 us with ``synchronous=NORMAL`` and about 310 us with
``synchronous=FULL``, against 25 us / 320 us for appending the same bytes to a plain file
without / with fsync. The plain log would still need its own framing, checksums, replay,
compaction and an index for the seen-id lookups, which SQLite does in about 5 us; the
difference at the default durability is about 65 us per update, below the per-update cost
of validation. ``synchronous=NORMAL`` (the default) survives a crash of the coordinator
process at any instant (the WAL is in the operating system's hands before the PUBACK
leaves); ``synchronous=FULL`` (``--sync full``) also survives an operating-system crash or
power cut, at one fsync per update.

Everything one decision changes is written in one transaction (``commit``): a verdict, an
accepted update with its payload, a new version with its model and the removal of the
updates it applied, the counters. A crash at any instant therefore leaves either the state
before the message or the state after it, and the message's PUBACK, which paho sends only
after the service's callback has returned, follows the commit. Tables:

- ``meta``: format, run id, the task (its wire form as JSON), the mode, the aggregator spec, the
  differential-privacy mechanism and the secret key of its noise (hex; it never leaves the
  state directory), state, counters, FedAvg round, the norms of the most recently accepted
  updates, the operator's pause (its reason, while the run is paused);
- ``model``: one row, the current version, its tensors and the server momentum;
- ``pending``: accepted updates not yet applied, in arrival order (the FedBuff buffer or the
  open FedAvg round), with their raw payloads;
- ``verdicts``: the verdict of every recent update id (the newest ``verdict_capacity``),
  with the update's size in bytes for reports (``coordinator.run_reader``);
- ``work``: (device, base version) pairs already accepted, while they could still arrive
  within the staleness bound;
- ``history``: one row per version, appended; ``evaluations``: held-out accuracy and loss of
  a version, appended when computed;
- ``invitations``: under a concurrency limit, the devices holding an open invitation, in the
  order they were invited (``coordinator.invitations``).

Memory stays flat: the seen ids and the history live on disk, not in the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.journal import (
    BufferDropped,
    InvitationsChanged,
    NormWindow,
    PauseChanged,
    Pending,
    PeriodWindow,
    Record,
    RoundFixed,
    RunEnded,
    Verdict,
    VersionMade,
)
from fedbus.errors import StateError
from fedbus.sqlite_store import Checkpointer, open_database, transaction
from fedbus.tensor_map import pack_tensors, unpack_tensors

__all__ = [
    "BEST_MODEL_FILE",
    "DB_FILE",
    "FORMAT",
    "NORM_BOUND_FORMAT",
    "PAUSE_FORMAT",
    "PRIVACY_FORMAT",
    "TASK_FILE",
    "HistoryRow",
    "RunSnapshot",
    "Store",
    "archive_run",
    "decode_state",
    "encode_state",
]

log = logging.getLogger(__name__)

# bump when the schema or the meaning of a stored value changes; an older fedbus refuses
# a newer state. 2: the run's aggregator (meta "aggregator"; absent means "mean"), and with a
# robust aggregator a pending update's coef is its staleness weight alone. A run aggregated
# with the plain mean is still written as format 1, which every fedbus reads the same way.
# 3: the adaptive norm bound: a pending update's clip bound (pending.clip) and the window of
# recently accepted norms (meta "norms"). A new run without differential privacy is written
# as format 3; an older run is raised to 3 by the first record that uses them (an older
# fedbus would resume it without the clipping, so it must refuse it).
# 4: central differential privacy (meta "privacy", the mechanism, and "noise_secret"); a
# pending update's coef is its staleness weight alone. Only such runs are written as format
# 4, so a fedbus that knows nothing of DP (format 3 or older) refuses to resume them
# (without their noise). A DP run never uses the adaptive bound, and a run is never lowered:
# raising to NORM_BOUND_FORMAT leaves a format-4 run at 4.
# 5: the operator's pause (meta "paused", its reason; the stored task's state "paused").
# A run is raised to 5 by the first pause, so a fedbus that knows nothing of pausing
# refuses it rather than resume a paused run as running; older formats need no change (no
# "paused" key: the run goes on).
NORM_BOUND_FORMAT = 3
PRIVACY_FORMAT = 4
PAUSE_FORMAT = 5
FORMAT = PAUSE_FORMAT
# --adaptive-k: meta "period:<device>", a device's last period samples (JSON list). No format
# change: a fedbus without adaptive K ignores them, and its K does not depend on them.
# The table ``invitations`` needs no format change either: a fedbus that does not read it
# resumes with no invitation open, as every fedbus did before it was kept.
PERIOD_KEY = "period:"
DB_FILE = "state.db"
TASK_FILE = "task.json"  # the run's task as JSON, for `fedbus data check` (service)
LOCK_FILE = "lock"
# the best evaluated version's model (service); its version and accuracy come from the
# ``evaluations`` table (``best_evaluated``), so the best survives a restart unchanged
BEST_MODEL_FILE = "model_best.npz"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS model (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    version INTEGER NOT NULL,
    state BLOB NOT NULL,
    velocity BLOB
);
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL UNIQUE,
    device TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    num_samples INTEGER NOT NULL,
    staleness INTEGER NOT NULL,
    coef REAL NOT NULL,
    round_number INTEGER,
    payload BLOB NOT NULL,
    clip REAL
);
CREATE TABLE IF NOT EXISTS verdicts (
    update_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    device TEXT NOT NULL,
    digest BLOB NOT NULL,
    base_version INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    reason TEXT,
    detail TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    staleness INTEGER,
    applied_version INTEGER,
    size INTEGER,
    parts INTEGER
);
CREATE INDEX IF NOT EXISTS verdicts_by_seq ON verdicts (seq);
CREATE TABLE IF NOT EXISTS work (
    device TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    update_id TEXT NOT NULL,
    PRIMARY KEY (device, base_version)
);
CREATE TABLE IF NOT EXISTS history (
    version INTEGER PRIMARY KEY,
    made_at REAL NOT NULL,
    updates INTEGER NOT NULL,
    updates_accepted INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    version INTEGER PRIMARY KEY,
    accuracy REAL,
    loss REAL,
    evaluated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS invitations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL UNIQUE,
    invite_id TEXT
);
"""


def encode_state(state: Mapping[str, np.ndarray] | None) -> bytes | None:
    return None if state is None else pack_tensors(state)


def decode_state(blob: bytes | None) -> dict[str, np.ndarray] | None:
    return None if blob is None else unpack_tensors(bytes(blob))


@dataclass(frozen=True)
class HistoryRow:
    version: int
    made_at: float
    updates: int  # updates applied by this version
    updates_accepted: int  # accepted so far in the run, this version included
    reason: str
    accuracy: float | None = None
    loss: float | None = None


@dataclass(frozen=True, eq=False)
class RunSnapshot:
    """Everything needed to resume a run exactly."""

    run_id: str
    task: dict[str, Any]  # the task's wire form
    created_at: float
    version: int
    state: dict[str, np.ndarray]
    velocity: dict[str, np.ndarray] | None
    counters: dict[str, int]
    pending: tuple[Pending, ...]
    round: RoundFixed | None
    ended: str | None  # the end reason, or None while the run goes on
    aggregator: str = "mean"  # the canonical aggregator spec the run was started with
    privacy: str | None = None  # PrivacySpec.mechanism of a run with differential privacy
    noise_secret: bytes | None = None  # the key of its noise
    norms: tuple[float, ...] = ()  # norms of the most recently accepted updates
    paused: str | None = None  # the operator's reason while the run is paused
    # --adaptive-k: each device's last period samples (meta "period:<device>")
    periods: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # revision 2.12: the parts of the accepted partials, by (aggregator, base version)
    region_parts: dict[tuple[str, int], int] = field(default_factory=dict)
    # the devices holding an open invitation, oldest first (coordinator.invitations)
    invitations: tuple[str, ...] = ()
    invitation_ids: dict[str, str] = field(default_factory=dict)  # their ids (rev 2.13)


class Store:
    """One run's durable state. Not thread-safe: the service serialises all calls but
    ``checkpoint``."""

    def __init__(
        self, path: Path | None, *, sync: str = "normal", verdict_capacity: int = 200_000,
        own_checkpoints: bool = False,
    ) -> None:
        """``path``: the SQLite file, or None for a private in-memory database (nothing
        survives the process: tests, benchmarks, library use without a state directory).

        ``own_checkpoints``: no commit ever copies the log into the database file; the
        owner calls ``checkpoint`` from another thread instead (the service: its calling
        thread, so that the network thread never waits for the checkpoint's fsyncs)."""
        if verdict_capacity < 1:
            raise ValueError(f"verdict_capacity must be >= 1, got {verdict_capacity}")
        self.path = path
        self.verdict_capacity = verdict_capacity
        # the service's lock serialises calls
        self._db = open_database(path, sync=sync, autocheckpoint=not own_checkpoints)
        self._checkpointer = (Checkpointer(path) if own_checkpoints and path is not None
                              else None)
        self._db.executescript(_SCHEMA)
        fmt = self._meta("format")
        if fmt is not None and int(fmt) > FORMAT:
            raise StateError(
                f"{path} was written by a newer fedbus (state format {fmt}, this one "
                f"reads {FORMAT}); upgrade fedbus"
            )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(pending)")}
        if "clip" not in columns:  # a state directory of format 1 or 2
            self._db.execute("ALTER TABLE pending ADD COLUMN clip REAL")
        # an update's size, for reports: NULL in older rows (an older fedbus writes NULL
        # too, so the format stays)
        verdict_columns = {row[1] for row in self._db.execute("PRAGMA table_info(verdicts)")}
        if "size" not in verdict_columns:
            self._db.execute("ALTER TABLE verdicts ADD COLUMN size INTEGER")
        # an accepted partial's parts (revision 2.12), likewise NULL in older rows
        if "parts" not in verdict_columns:
            self._db.execute("ALTER TABLE verdicts ADD COLUMN parts INTEGER")
        # an open invitation's id (revision 2.13), NULL in older rows (no format change: an
        # older fedbus ignores it and a newer one gives such an invitation a new id)
        invitation_columns = {row[1] for row in self._db.execute(
            "PRAGMA table_info(invitations)")}
        if "invite_id" not in invitation_columns:
            self._db.execute("ALTER TABLE invitations ADD COLUMN invite_id TEXT")
        self._seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()  # the last connection to close checkpoints what is left

    def checkpoint(self) -> None:
        """Copy the log into the database file (with ``own_checkpoints``; else nothing).
        Safe to call while another thread commits: it has its own connection and never
        waits for the writer."""
        if self._checkpointer is not None:
            self._checkpointer.run()

    # -- run -----------------------------------------------------------------------------

    @property
    def has_run(self) -> bool:
        return self._meta("run_id") is not None

    def create_run(
        self, run_id: str, task: Mapping[str, Any], created_at: float,
        state: Mapping[str, np.ndarray], counters: Mapping[str, int], *,
        aggregator: str = "mean", privacy: str | None = None,
        noise_secret: bytes | None = None, mode: str | None = None,
    ) -> None:
        """Record a new run at version 0 (``aggregator``: its canonical spec, and
        ``privacy``: its DP mechanism, both part of the run's identity; ``noise_secret``: the
        key of the DP noise). Refuses to replace an existing run."""
        if self.has_run:
            raise StateError(f"{self.path} already holds run {self._meta('run_id')}")
        if (privacy is None) != (noise_secret is None):
            raise ValueError("a run with differential privacy needs a noise secret, and only it")
        fmt = str(PRIVACY_FORMAT if privacy is not None else NORM_BOUND_FORMAT)
        with self._transaction():
            self._set_meta("format", fmt)
            self._set_meta("run_id", run_id)
            if aggregator != "mean":
                self._set_meta("aggregator", aggregator)
            if mode is not None:  # for reports; not part of what a resume checks
                self._set_meta("mode", mode)
            if privacy is not None and noise_secret is not None:
                self._set_meta("privacy", privacy)
                self._set_meta("noise_secret", noise_secret.hex())
            self._set_meta("task", json.dumps(task))
            self._set_meta("created_at", repr(float(created_at)))
            self._set_meta("counters", json.dumps(dict(counters)))
            self._db.execute(
                "INSERT INTO model (id, version, state, velocity) VALUES (0, 0, ?, NULL)",
                (encode_state(state),),
            )
            self._db.execute(
                "INSERT INTO history (version, made_at, updates, updates_accepted, reason) "
                "VALUES (0, ?, 0, 0, 'initial model')",
                (float(created_at),),
            )

    def set_task(self, task: Mapping[str, Any]) -> None:
        with self._transaction():
            self._set_meta("task", json.dumps(task))

    def load(self) -> RunSnapshot:
        run_id = self._meta("run_id")
        if run_id is None:
            raise StateError(f"{self.path} holds no run")
        version, state_blob, velocity_blob = self._db.execute(
            "SELECT version, state, velocity FROM model WHERE id = 0"
        ).fetchone()
        pending = tuple(
            Pending(uid, dev, base, n, s, coef, bytes(payload), rnd,
                    None if clip is None else float(clip))
            for uid, dev, base, n, s, coef, rnd, payload, clip in self._db.execute(
                "SELECT update_id, device, base_version, num_samples, staleness, coef, "
                "round_number, payload, clip FROM pending ORDER BY seq"
            )
        )
        round_json = self._meta("round")
        rnd = None
        if round_json is not None:
            r = json.loads(round_json)
            rnd = RoundFixed(int(r["number"]), int(r["version"]), tuple(r["participants"]))
        state = decode_state(state_blob)
        assert state is not None
        secret = self._meta("noise_secret")
        return RunSnapshot(
            run_id=run_id,
            task=json.loads(self._meta("task") or "{}"),
            created_at=float(self._meta("created_at") or 0.0),
            version=int(version),
            state=state,
            velocity=decode_state(velocity_blob),
            counters={k: int(v) for k, v in json.loads(self._meta("counters") or "{}").items()},
            pending=pending,
            round=rnd,
            ended=self._meta("ended"),
            aggregator=self._meta("aggregator") or "mean",
            privacy=self._meta("privacy"),
            noise_secret=None if secret is None else bytes.fromhex(secret),
            norms=tuple(float(v) for v in json.loads(self._meta("norms") or "[]")),
            paused=self._meta("paused"),
            periods={
                str(key)[len(PERIOD_KEY):]: tuple(float(v) for v in json.loads(value))
                for key, value in self._db.execute(
                    "SELECT key, value FROM meta WHERE key LIKE ?", (PERIOD_KEY + "%",))
            },
            region_parts={
                (str(device), int(base)): int(parts)
                for device, base, parts in self._db.execute(
                    "SELECT device, base_version, SUM(parts) FROM verdicts WHERE accepted = 1 "
                    "AND parts IS NOT NULL GROUP BY device, base_version")
            },
            invitations=tuple(str(device) for (device,) in self._db.execute(
                "SELECT device FROM invitations ORDER BY seq")),
            invitation_ids={str(device): str(invite_id) for device, invite_id in self._db.execute(
                "SELECT device, invite_id FROM invitations WHERE invite_id IS NOT NULL")},
        )

    # -- the ledger (read while judging) ---------------------------------------------------

    def verdict(self, update_id: str) -> Verdict | None:
        row = self._db.execute(
            "SELECT device, digest, base_version, accepted, reason, detail, model_version, "
            "staleness FROM verdicts WHERE update_id = ?", (update_id,),
        ).fetchone()
        if row is None:
            return None
        dev, digest, base, accepted, reason, detail, version, staleness = row
        return Verdict(update_id, dev, bytes(digest), base, bool(accepted), reason, detail,
                       version, staleness)

    def work(self, device_id: str, base_version: int) -> str | None:
        row = self._db.execute(
            "SELECT update_id FROM work WHERE device = ? AND base_version = ?",
            (device_id, base_version),
        ).fetchone()
        return None if row is None else str(row[0])

    # -- writes ----------------------------------------------------------------------------

    def commit(
        self, records: Sequence[Record], counters: Mapping[str, int], *,
        max_staleness: int = 0,
    ) -> None:
        """Write ``records`` and ``counters`` in one transaction (nothing if it fails)."""
        with self._transaction():
            for record in records:
                self._write(record, max_staleness, counters)
            self._set_meta("counters", json.dumps(dict(counters)))
            uses_bound = any(
                isinstance(r, NormWindow) or (isinstance(r, Pending) and r.clip is not None)
                for r in records
            )
            if uses_bound and int(self._meta("format") or FORMAT) < NORM_BOUND_FORMAT:
                self._set_meta("format", str(NORM_BOUND_FORMAT))
            paused = any(isinstance(r, PauseChanged) and r.paused for r in records)
            if paused and int(self._meta("format") or FORMAT) < PAUSE_FORMAT:
                self._set_meta("format", str(PAUSE_FORMAT))

    def record_evaluation(
        self, version: int, accuracy: float | None, loss: float | None, at: float
    ) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO evaluations (version, accuracy, loss, evaluated_at) "
                "VALUES (?, ?, ?, ?)", (version, accuracy, loss, at),
            )

    def _write(self, record: Record, max_staleness: int, counters: Mapping[str, int]) -> None:
        db = self._db
        if isinstance(record, Verdict):
            self._seq += 1
            if self._seq % 1024 == 0:  # bounded between versions too (a flood of fresh ids)
                db.execute("DELETE FROM verdicts WHERE seq <= ?",
                           (self._seq - self.verdict_capacity,))
            db.execute(
                "INSERT OR IGNORE INTO verdicts (update_id, seq, device, digest, base_version, "
                "accepted, reason, detail, model_version, staleness, size, parts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.update_id, self._seq, record.device_id, record.digest,
                 record.base_version, int(record.accepted), record.reason, record.detail,
                 record.model_version, record.staleness, record.size, record.parts),
            )
        elif isinstance(record, Pending):
            db.execute(
                "INSERT INTO pending (update_id, device, base_version, num_samples, staleness, "
                "coef, round_number, payload, clip) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.update_id, record.device_id, record.base_version, record.num_samples,
                 record.staleness, record.coef, record.round_number, record.payload,
                 record.clip),
            )
            db.execute(
                "INSERT OR REPLACE INTO work (device, base_version, update_id) VALUES (?, ?, ?)",
                (record.device_id, record.base_version, record.update_id),
            )
        elif isinstance(record, VersionMade):
            self._write_version(record, max_staleness, counters.get("updates_accepted", 0))
        elif isinstance(record, BufferDropped):
            for chunk in _chunks(list(record.update_ids), 500):
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM pending WHERE update_id IN ({marks})", chunk)
            db.execute("DELETE FROM meta WHERE key = 'round'")
        elif isinstance(record, RoundFixed):
            self._set_meta("round", json.dumps({
                "number": record.number, "version": record.version,
                "participants": list(record.participants),
            }))
        elif isinstance(record, PeriodWindow):
            self._set_meta(PERIOD_KEY + record.device_id, json.dumps(list(record.samples)))
        elif isinstance(record, NormWindow):
            self._set_meta("norms", json.dumps(list(record.norms)))
        elif isinstance(record, InvitationsChanged):
            ids = dict(record.ids)
            for device, opened in record.changes:
                if opened:  # a new row (a new seq) even if the device held one before
                    db.execute("INSERT OR REPLACE INTO invitations (device, invite_id) "
                               "VALUES (?, ?)", (device, ids.get(device)))
                else:
                    db.execute("DELETE FROM invitations WHERE device = ?", (device,))
        elif isinstance(record, PauseChanged):
            if record.paused:
                self._set_meta("paused", record.reason)
            else:
                db.execute("DELETE FROM meta WHERE key = 'paused'")
            task = json.loads(self._meta("task") or "{}")
            task["state"] = "paused" if record.paused else "running"
            self._set_meta("task", json.dumps(task))
        elif isinstance(record, RunEnded):
            self._set_meta("ended", record.reason)
            task = json.loads(self._meta("task") or "{}")
            task.update(state="ended", end_reason=record.reason)
            self._set_meta("task", json.dumps(task))
        else:  # pragma: no cover - a new record type without a writer
            raise TypeError(f"no writer for {type(record).__name__}")

    def _write_version(self, record: VersionMade, max_staleness: int, accepted: int) -> None:
        db = self._db
        changed = db.execute(
            "UPDATE model SET version = ?, state = ?, velocity = ? WHERE id = 0 AND version = ?",
            (record.version, encode_state(record.state), encode_state(record.velocity),
             record.version - 1),
        ).rowcount
        if changed != 1:  # never write an older or a repeated version over a newer one
            current = db.execute("SELECT version FROM model WHERE id = 0").fetchone()
            raise StateError(
                f"{self.path}: version {record.version} does not follow the stored version "
                f"{current[0] if current else None}"
            )
        ids = list(record.applied)
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            db.execute(f"DELETE FROM pending WHERE update_id IN ({marks})", chunk)
            db.execute(
                f"UPDATE verdicts SET applied_version = ? WHERE update_id IN ({marks})",
                [record.version, *chunk],
            )
        db.execute(
            "INSERT INTO history (version, made_at, updates, updates_accepted, reason) "
            "VALUES (?, ?, ?, ?, ?)",
            (record.version, time.time(), len(ids), accepted, record.reason),
        )
        # bounded: work older than the staleness bound can no longer arrive in time, and
        # only the newest verdict_capacity verdicts are remembered
        db.execute(
            "DELETE FROM work WHERE base_version < ?", (record.version - max_staleness - 1,)
        )
        db.execute("DELETE FROM verdicts WHERE seq <= ?", (self._seq - self.verdict_capacity,))
        db.execute("DELETE FROM meta WHERE key = 'round'")

    # -- reading the record ---------------------------------------------------------------

    def history(self, since_version: int = 0) -> list[HistoryRow]:
        rows = self._db.execute(
            "SELECT h.version, h.made_at, h.updates, h.updates_accepted, h.reason, "
            "e.accuracy, e.loss FROM history h LEFT JOIN evaluations e USING (version) "
            "WHERE h.version >= ? ORDER BY h.version", (since_version,),
        )
        return [HistoryRow(*row) for row in rows]

    def last_evaluated(self) -> int | None:
        row = self._db.execute("SELECT MAX(version) FROM evaluations").fetchone()
        return None if row[0] is None else int(row[0])

    def best_evaluated(self) -> tuple[int, float] | None:
        """The version of highest held-out accuracy so far (the earliest on a tie) and its
        accuracy; None before the first evaluation with an accuracy."""
        row = self._db.execute(
            "SELECT version, accuracy FROM evaluations WHERE accuracy IS NOT NULL "
            "ORDER BY accuracy DESC, version ASC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), float(row[1]))

    def evaluations(self, since: float = 0.0) -> list[tuple[float, int, float]]:
        """``(evaluated_at, version, accuracy)`` of the evaluations with an accuracy made at
        or after ``since`` (wall clock), in time order."""
        rows = self._db.execute(
            "SELECT evaluated_at, version, accuracy FROM evaluations "
            "WHERE accuracy IS NOT NULL AND evaluated_at >= ? ORDER BY evaluated_at, version",
            (since,),
        )
        return [(float(t), int(v), float(a)) for t, v, a in rows]

    def verdict_counts(self) -> dict[str, int]:
        """Remembered verdicts by outcome (``accepted`` or the reason), for reports."""
        rows = self._db.execute(
            "SELECT CASE WHEN accepted THEN 'accepted' ELSE reason END, COUNT(*) "
            "FROM verdicts GROUP BY 1"
        )
        return {str(k): int(n) for k, n in rows}

    # -- internals -------------------------------------------------------------------------

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return transaction(self._db)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value),
        )


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class StateLock:
    """An exclusive lock on a state directory (``flock``): one coordinator per run."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StateError(
                f"state directory {self.path.parent} is in use by another coordinator "
                f"(pid {holder}); stop it first, or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def archive_run(directory: Path, run_id: str) -> Path:
    """Move the run files of ``directory`` into ``directory/runs/<run_id>/`` (kept, never
    deleted) so a new run can start there; returns the archive directory."""
    target = Path(directory) / "runs" / run_id
    target.mkdir(parents=True, exist_ok=False)
    for name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", "model.npz", BEST_MODEL_FILE,
                 "history.jsonl", TASK_FILE):
        source = Path(directory) / name
        if source.exists():
            os.replace(source, target / name)
    return target
