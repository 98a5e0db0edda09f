"""coordinator.store: the run in SQLite, written one decision per transaction."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.journal import (
    BufferDropped,
    NormWindow,
    Pending,
    RoundFixed,
    RunEnded,
    Verdict,
    VersionMade,
)
from coordinator.store import (
    DB_FILE,
    FORMAT,
    NORM_BOUND_FORMAT,
    PRIVACY_FORMAT,
    StateLock,
    Store,
    archive_run,
)
from fedbus.errors import StateError

F32 = np.float32
STATE = {"w": np.arange(6, dtype=F32).reshape(2, 3), "b": np.ones(3, F32),
         "act": np.array(0.5, F32)}
TASK = {"v": 2, "kind": "task", "task_id": "t1", "run": "r1"}


def new_store(path: Path | None = None, **kwargs) -> Store:
    store = Store(path, **kwargs)
    store.create_run("r1", TASK, 100.0, STATE, {"updates_accepted": 0})
    return store


def verdict(uid: str, accepted: bool = True, base: int = 0) -> Verdict:
    return Verdict(uid, "d1", b"12345678", base, accepted, None if accepted else "stale",
                   "detail", 0, 0 if accepted else None)


def pending(uid: str, device: str = "d1", base: int = 0) -> Pending:
    return Pending(uid, device, base, 5, 0, 5.0, b"payload-" + uid.encode())


def made(version: int, applied: tuple[str, ...] = ()) -> VersionMade:
    return VersionMade(version, {k: v + version for k, v in STATE.items()}, None, applied,
                       "test")


def test_a_new_run_round_trips_exactly(tmp_path: Path) -> None:
    new_store(tmp_path / DB_FILE).close()
    snap = Store(tmp_path / DB_FILE).load()
    assert (snap.run_id, snap.version, snap.created_at, snap.task) == ("r1", 0, 100.0, TASK)
    for name, value in STATE.items():
        assert snap.state[name].shape == value.shape  # a 0-d tensor stays 0-d
        assert snap.state[name].tobytes() == value.tobytes()
    assert snap.pending == () and snap.round is None and snap.ended is None
    with pytest.raises(StateError, match="already holds run r1"):
        Store(tmp_path / DB_FILE).create_run("r2", TASK, 1.0, STATE, {})


def test_the_aggregator_is_kept_and_a_new_run_has_the_newest_format(tmp_path: Path) -> None:
    def fmt(path: Path) -> str:
        db = sqlite3.connect(path)
        value = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0]
        db.close()
        return str(value)

    new_store(tmp_path / DB_FILE).close()
    assert Store(tmp_path / DB_FILE).load().aggregator == "mean"
    assert fmt(tmp_path / DB_FILE) == str(NORM_BOUND_FORMAT) == "3"
    robust = tmp_path / "robust.db"
    store = Store(robust)
    store.create_run("r1", TASK, 1.0, STATE, {}, aggregator="krum:1+clip:5")
    store.close()
    assert Store(robust).load().aggregator == "krum:1+clip:5"
    assert fmt(robust) == str(NORM_BOUND_FORMAT) == "3"
    private = tmp_path / "private.db"
    store = Store(private)
    store.create_run("r1", TASK, 1.0, STATE, {}, privacy="gaussian:1+clip:0.5",
                     noise_secret=b"k" * 32)
    store.close()
    snap = Store(private).load()
    assert (snap.privacy, snap.noise_secret) == ("gaussian:1+clip:0.5", b"k" * 32)
    # a fedbus without DP (it reads format 3 at most) refuses it
    assert fmt(private) == str(PRIVACY_FORMAT) == "4"
    assert (Store(robust).load().privacy, Store(robust).load().noise_secret) == (None, None)
    with pytest.raises(ValueError, match="noise secret"):
        Store(tmp_path / "x.db").create_run("r1", TASK, 1.0, STATE, {}, privacy="gaussian:1")
    store = Store(private)  # the adaptive bound's records never lower a DP run to 3
    store.commit([NormWindow((0.5,))], {})
    store.close()
    assert fmt(private) == "4"


def test_an_older_run_gains_the_clip_column_and_the_newer_format_when_it_uses_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / DB_FILE
    new_store(path).close()
    db = sqlite3.connect(path)  # as fedbus with format 1 wrote it: no pending.clip
    db.execute("DROP TABLE pending")
    db.execute(
        "CREATE TABLE pending (seq INTEGER PRIMARY KEY AUTOINCREMENT, update_id TEXT NOT NULL "
        "UNIQUE, device TEXT NOT NULL, base_version INTEGER NOT NULL, num_samples INTEGER NOT "
        "NULL, staleness INTEGER NOT NULL, coef REAL NOT NULL, round_number INTEGER, "
        "payload BLOB NOT NULL)"
    )
    db.execute("UPDATE meta SET value = '1' WHERE key = 'format'")
    db.commit()
    db.close()
    store = Store(path)
    assert store.load().norms == ()
    store.commit([Pending("u1", "d1", 0, 3, 0, 1.0, b"x")], {})
    assert store.load().pending[0].clip is None
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "1"
    db.close()
    store = Store(path)
    store.commit([Pending("u2", "d2", 0, 3, 0, 1.0, b"y", None, 0.25),
                  NormWindow((0.5, 0.125))], {})
    snap = store.load()
    assert [p.clip for p in snap.pending] == [None, 0.25] and snap.norms == (0.5, 0.125)
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "3"
    db.close()


def test_an_older_run_gains_the_size_column_and_keeps_its_format(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    store = new_store(path)
    store.commit([verdict("u0")], {})
    store.close()
    db = sqlite3.connect(path)  # as a fedbus before update sizes wrote it
    db.execute("ALTER TABLE verdicts DROP COLUMN size")
    db.close()
    store = Store(path)
    store.commit([Verdict("u1", "d1", b"12345678", 0, True, None, "", 0, 0, 321)], {})
    store.close()
    db = sqlite3.connect(path)
    sizes = db.execute("SELECT update_id, size FROM verdicts ORDER BY seq").fetchall()
    fmt = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0]
    db.close()
    assert sizes == [("u0", None), ("u1", 321)] and fmt == "3"


def test_accepted_updates_wait_in_order_until_a_version_applies_them(tmp_path: Path) -> None:
    store = new_store(tmp_path / DB_FILE)
    for uid, dev in (("a", "d1"), ("b", "d2")):
        store.commit([verdict(uid), pending(uid, dev)], {"updates_accepted": 1})
    assert store.verdict("a") is not None and store.work("d2", 0) == "b"
    assert [p.update_id for p in store.load().pending] == ["a", "b"]
    store.commit([verdict("c"), pending("c", "d3"), made(1, ("a", "b", "c"))],
                 {"updates_accepted": 3}, max_staleness=10)
    snap = store.load()
    assert snap.version == 1 and snap.pending == () and snap.counters["updates_accepted"] == 3
    np.testing.assert_array_equal(snap.state["w"], STATE["w"] + 1)
    history = store.history()
    assert [(h.version, h.updates, h.updates_accepted) for h in history] == [(0, 0, 0), (1, 3, 3)]
    store.record_evaluation(1, 0.9, 0.3, 5.0)
    assert store.history()[1].accuracy == 0.9 and store.last_evaluated() == 1


def test_the_best_evaluation_is_derived_from_the_stored_ones(tmp_path: Path) -> None:
    store = new_store(tmp_path / DB_FILE)
    assert store.best_evaluated() is None and store.evaluations() == []
    store.record_evaluation(0, None, None, 1.0)  # no evaluation data: no accuracy
    for version, accuracy, at in ((1, 0.90, 2.0), (2, 0.95, 3.0), (3, 0.95, 4.0), (4, 0.80, 5.0)):
        store.record_evaluation(version, accuracy, 0.1, at)
    store.close()
    store = Store(tmp_path / DB_FILE)  # a resumed run knows it, with no new format
    assert store.best_evaluated() == (2, 0.95)  # the earliest of a tie
    assert store.evaluations(since=4.0) == [(4.0, 3, 0.95), (5.0, 4, 0.80)]


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = new_store(tmp_path / DB_FILE)
    with pytest.raises(StateError, match="does not follow"):
        store.commit([verdict("a"), pending("a"), made(2, ("a",))], {"updates_accepted": 1})
    assert store.verdict("a") is None and store.load().pending == ()
    assert store.load().version == 0 and store.load().counters == {"updates_accepted": 0}


def test_versions_only_move_forward(tmp_path: Path) -> None:
    store = new_store(tmp_path / DB_FILE)
    store.commit([made(1)], {})
    for version in (1, 0, 3):
        with pytest.raises(StateError):
            store.commit([made(version)], {})
    assert store.load().version == 1


def test_memory_stays_bounded_verdicts_and_work_are_pruned(tmp_path: Path) -> None:
    store = new_store(tmp_path / DB_FILE, verdict_capacity=10)
    for i in range(50):
        uid = f"u{i}"
        store.commit([verdict(uid, base=i), pending(uid, f"d{i % 3}", i)], {})
        store.commit([made(i + 1, (uid,))], {}, max_staleness=2)
    assert store.verdict("u0") is None and store.verdict("u49") is not None
    remembered = sum(store.verdict(f"u{i}") is not None for i in range(50))
    assert remembered == 10
    assert store.work("d0", 0) is None  # older than the staleness bound
    assert store.work("d1", 49) == "u49"


def test_round_dropped_buffer_and_end(tmp_path: Path) -> None:
    store = new_store(tmp_path / DB_FILE)
    store.commit([RoundFixed(0, 0, ("d1", "d2")), verdict("a"), pending("a")], {})
    assert store.load().round == RoundFixed(0, 0, ("d1", "d2"))
    store.commit([BufferDropped(("a",), "not finite")], {})
    assert store.load().pending == () and store.load().round is None
    store.commit([RunEnded("reached 5 model versions")], {})
    snap = store.load()
    assert snap.ended == "reached 5 model versions"
    assert snap.task["state"] == "ended" and snap.task["end_reason"] == snap.ended


def test_a_newer_format_is_refused(tmp_path: Path) -> None:
    new_store(tmp_path / DB_FILE).close()
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(FORMAT + 1),))
    db.commit()
    db.close()
    with pytest.raises(StateError, match="newer fedbus"):
        Store(tmp_path / DB_FILE)


def test_wal_mode_and_sync_setting(tmp_path: Path) -> None:
    store = new_store(tmp_path / DB_FILE, sync="full")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(ValueError):
        Store(None, sync="sometimes")


def test_with_own_checkpoints_no_commit_copies_the_log_and_checkpoint_does(
        tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    store = new_store(path, own_checkpoints=True)
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for i in range(1, 4):
        store.commit([verdict(f"u{i}"), made(i)], {"updates_accepted": i})
    # the database file alone (as a crash of the OS with synchronous=NORMAL could leave
    # it): the commits are all still in the log
    before, after = tmp_path / "before.db", tmp_path / "after.db"
    before.write_bytes(path.read_bytes())
    assert not Store(before).has_run
    store.checkpoint()
    after.write_bytes(path.read_bytes())
    assert Store(after).load().version == 3
    store.close()
    assert Store(path).load().version == 3


def test_the_lock_is_held_by_one_process(tmp_path: Path) -> None:
    lock = StateLock(tmp_path)
    lock.acquire()
    other = subprocess.run(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from coordinator.store import StateLock\n"
         "try:\n    StateLock(Path(sys.argv[1])).acquire()\nexcept Exception as e:\n"
         "    print(e); sys.exit(3)", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert other.returncode == 3 and "in use by another coordinator" in other.stdout
    lock.release()


def test_a_process_killed_mid_run_leaves_a_consistent_store(tmp_path: Path) -> None:
    """kill -9 while it commits: the store holds whole transactions only."""
    script = (
        "import sys, os, signal, numpy as np\n"
        "from pathlib import Path\n"
        "from coordinator.store import Store\n"
        "from coordinator.journal import Pending, Verdict, VersionMade\n"
        "s = Store(Path(sys.argv[1]))\n"
        "s.create_run('r1', {}, 0.0, {'w': np.zeros(1000, np.float32)}, {})\n"
        "v = 0\n"
        "for i in range(100000):\n"
        "    uid = f'u{i}'\n"
        "    recs = [Verdict(uid, 'd', b'x'*8, v, True, None, '', v, 0),\n"
        "            Pending(uid, f'd{i}', v, 1, 0, 1.0, b'p'*3000)]\n"
        "    if i % 3 == 2:\n"
        "        v += 1\n"
        "        recs.append(VersionMade(v, {'w': np.full(1000, v, np.float32)}, None,\n"
        "                                (f'u{i-2}', f'u{i-1}', uid), 't'))\n"
        "    s.commit(recs, {'updates_accepted': i + 1, 'version': v})\n"
        "    if i == 300: print('go', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / DB_FILE)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
    proc.kill()
    proc.wait()
    snap = Store(tmp_path / DB_FILE).load()
    accepted = snap.counters["updates_accepted"]
    assert snap.counters["version"] == snap.version
    assert snap.version == accepted // 3
    assert len(snap.pending) == accepted % 3  # exactly the updates not yet applied
    assert float(snap.state["w"][0]) == snap.version


def test_archive_moves_a_run_aside(tmp_path: Path) -> None:
    new_store(tmp_path / DB_FILE).close()
    (tmp_path / "history.jsonl").write_text("{}\n")
    target = archive_run(tmp_path, "r1")
    assert (target / DB_FILE).exists() and (target / "history.jsonl").exists()
    assert not (tmp_path / DB_FILE).exists()
    assert not Store(tmp_path / DB_FILE).has_run
