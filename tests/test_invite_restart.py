"""Revision 2.13 end to end: a real ``fedbus agent`` killed while it holds an invitation
(a pause file kept it from training) and started again trains within seconds: the
coordinator sees it say ``online`` without naming its invitation and sends the same one
again, instead of holding the slot until the invite timeout (600 s)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from inmemory import wait_for

from coordinator.config import CoordinatorConfig
from coordinator.service import CoordinatorService
from fedbus.broker import LocalBroker
from fedbus.datasets import load_digits, write_npz
from fedbus.processes import Child

pytestmark = pytest.mark.broker


def _agent(broker: LocalBroker, tmp_path: Path, data: Path, name: str, *extra: str) -> Child:
    return Child(
        [sys.executable, "-m", "fedbus", "--log-level", "debug", "agent", "--device-id",
         "dev-a", "--data", str(data),
         "--credentials", str(broker.credentials_file), "--state-dir", str(tmp_path / "a"),
         "--policy-interval", "0.2", "--max-updates", "1", *extra],
        log_path=tmp_path / f"{name}.log", name=f"agent dev-a ({name})",
    )


def test_an_agent_restarted_while_invited_trains_again_at_once(
    broker: LocalBroker, tmp_path: Path
) -> None:
    x, y = load_digits()
    data = tmp_path / "dev-a.npz"
    write_npz(data, x[:100], y[:100])
    pause = tmp_path / "pause"
    pause.touch()
    service = CoordinatorService(
        CoordinatorConfig(host=broker.host, port=broker.port, prefix=broker.prefix,
                          task_id="t1", mode="fedbuff", buffer_size=1, concurrency=1,
                          epochs=1, batch_size=32, state_dir=tmp_path / "run",
                          signing_key=broker.signing_key_file, duration=60.0,
                          model_args='{"in_features": 64, "num_classes": 10, "hidden": [8]}'),
        password=broker.coordinator.password, eval_data=None,
    )
    coordinator = threading.Thread(target=service.run, daemon=True)
    coordinator.start()
    first = _agent(broker, tmp_path, data, "first", "--pause-file", str(pause))
    second: Child | None = None

    def counters() -> dict[str, int]:
        return service.core.counters  # the service builds its core when the run starts

    try:
        wait_for(lambda: "training paused: pause file" in first.log_path.read_text(), 20,
                 "the pause")
        wait_for(lambda: "invited to train" in first.log_path.read_text(), 10,
                 "the invitation")
        assert counters()["invitations_sent"] == 1
        # frozen, as a device that lost power: its connection stays open until the new one
        # takes its session over, and the coordinator hears of no offline (no Will)
        os.kill(first.pid, signal.SIGSTOP)
        pause.unlink()
        started = time.monotonic()
        second = _agent(broker, tmp_path, data, "second")
        wait_for(lambda: counters()["updates_accepted"] == 1, 20, "the restarted agent's update")
        took = time.monotonic() - started
        assert second.wait(10) == 0  # --max-updates 1
        assert took < 20  # not the invite timeout of 600 s
        # at least once after the restart; a status the first life published before the
        # invitation reached it may have made one more, which that agent ignored (same id)
        assert counters()["invitations_resent"] >= 1
        assert counters()["invitations_expired"] == 0
        assert counters()["invitations_sent"] == 2  # the one lost, and the next after the update
        assert "trained on v0" not in first.log_path.read_text()
        text = second.log_path.read_text()
        assert text.count("trained on v0") == 1 and "Traceback" not in text
    except AssertionError:
        for child in (first, second):
            if child is not None:
                print(child.log_path.read_text()[-2000:])
        print(counters())
        raise
    finally:
        first.kill()  # (frozen: SIGTERM would wait)
        if second is not None:
            second.terminate(10)
        service.stop()
        coordinator.join(10)
