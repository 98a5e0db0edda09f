"""edge_agent.state: the agent's outbox, residual, progress and ledger in SQLite."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edge_agent.state import STATE_FILE, AgentState, OutboxEntry

SHAPES = {"w": (8, 4), "b": (8,), "s": ()}


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def entry(uid: str, run: str = "r1", base: int = 0, size: int = 100) -> OutboxEntry:
    return OutboxEntry(uid, run, base, bytes(size), feedback=True)


def test_a_trained_update_and_its_version_are_kept_together(tmp_path: Path) -> None:
    state = AgentState(tmp_path / STATE_FILE)
    assert state.last_version("r1") is None and state.outbox() == []
    state.record_trained("r1", 3, entry("u1", base=3), residual=tensors(1))
    state.close()
    again = AgentState(tmp_path / STATE_FILE)  # a restarted agent
    assert again.last_version("r1") == 3
    assert [e.update_id for e in again.outbox("r1")] == ["u1"]
    assert again.outbox("r1")[0].payload == bytes(100)
    stored = again.residual("r1", SHAPES)
    for name, value in tensors(1).items():
        assert stored[name].shape == value.shape
        np.testing.assert_array_equal(stored[name], value)
    assert [(r.update_id, r.fate) for r in again.ledger()] == [("u1", "pending")]


def test_versions_never_go_back(tmp_path: Path) -> None:
    state = AgentState(tmp_path / STATE_FILE)
    state.record_trained("r1", 5, None)
    state.record_trained("r1", 4, None)
    assert state.last_version("r1") == 5


def test_settle_removes_once_and_records_the_fate(tmp_path: Path) -> None:
    state = AgentState(tmp_path / STATE_FILE)
    state.record_trained("r1", 0, entry("u1"))
    state.record_trained("r1", 1, entry("u2", base=1))
    assert state.settle("u1", "accepted", "buffered 1/4")
    assert not state.settle("u1", "accepted", "again")  # a repeated receipt
    assert state.settle("u2", "rejected", "stale: too old", run_id="r1", residual=tensors(2))
    assert state.outbox() == []
    fates = {r.update_id: (r.fate, r.detail) for r in state.ledger()}
    assert fates == {"u1": ("accepted", "buffered 1/4"), "u2": ("rejected", "stale: too old")}
    np.testing.assert_array_equal(state.residual("r1", SHAPES)["w"], tensors(2)["w"])


def test_a_new_run_forgets_the_old_one(tmp_path: Path) -> None:
    state = AgentState(tmp_path / STATE_FILE)
    state.record_trained("old", 7, entry("u1", run="old"), residual=tensors(1))
    dropped = state.start_run("new")
    assert [e.update_id for e in dropped] == ["u1"]
    assert state.outbox() == [] and state.last_version("old") is None
    assert not any(v.any() for v in state.residual("old", SHAPES).values())
    assert state.ledger()[0].fate == "dropped"


def test_a_residual_that_does_not_fit_starts_from_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    state = AgentState(tmp_path / STATE_FILE)
    state.record_trained("r1", 0, None, residual=tensors(1))
    other = state.residual("r1", {"w": (8, 4), "b": (9,), "s": ()})
    assert other["b"].shape == (9,) and not any(v.any() for v in other.values())
    assert "other tensors" in caplog.text
    bad = tensors(1)
    bad["w"][0, 0] = np.nan
    state.record_trained("r1", 1, None, residual=bad)
    assert not state.residual("r1", SHAPES)["w"].any()
    assert "not finite" in caplog.text


def test_the_ledger_is_bounded(tmp_path: Path) -> None:
    state = AgentState(tmp_path / STATE_FILE, ledger_capacity=5)
    for i in range(12):
        state.record_trained("r1", i, entry(f"u{i}", base=i))
        state.settle(f"u{i}", "accepted", None)
    assert [r.update_id for r in state.ledger()] == [f"u{i}" for i in range(7, 12)]


def test_a_transaction_is_all_or_nothing(tmp_path: Path) -> None:
    state = AgentState(tmp_path / STATE_FILE)
    state.record_trained("r1", 0, entry("u1"))
    with pytest.raises(Exception, match="UNIQUE"):
        state.record_trained("r1", 9, entry("u1", base=9))  # the same id again
    assert state.last_version("r1") == 0  # the version of the failed transaction is not kept
    assert len(state.outbox()) == 1
