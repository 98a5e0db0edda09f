"""fedbus.processes: the watchdog used by the demo and the benchmark fleets."""

from __future__ import annotations

import subprocess
import sys
import threading

from fedbus.processes import Watchdog, terminate


def test_watchdog_reports_the_first_failure_once() -> None:
    calls = {"check": 0, "failed": 0}
    stopped = threading.Event()

    def check() -> str | None:
        calls["check"] += 1
        return "agent dev-a exited with code 1" if calls["check"] >= 3 else None

    def on_failure() -> None:
        calls["failed"] += 1
        stopped.set()

    with Watchdog(check, on_failure, interval=0.01) as watchdog:
        assert stopped.wait(5)
    assert watchdog.failure == "agent dev-a exited with code 1"
    assert calls == {"check": 3, "failed": 1}  # stops watching after the failure


def test_watchdog_without_failure_stops_with_the_block() -> None:
    failed = []
    with Watchdog(lambda: None, lambda: failed.append(1), interval=0.01) as watchdog:
        pass
    assert watchdog.failure is None and not failed


def test_watchdog_sees_a_child_process_die() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    stopped = threading.Event()
    try:
        check = lambda: None if proc.poll() is None else f"exit {proc.returncode}"  # noqa: E731
        with Watchdog(check, stopped.set, interval=0.01) as watchdog:
            assert stopped.wait(10)
        assert watchdog.failure == "exit 3"
    finally:
        terminate(proc, 5)


def test_demo_names_the_dead_agent_and_its_last_log_line(tmp_path) -> None:
    from coordinator.demo import _dead_agent

    (tmp_path / "dev-b.log").write_text("starting\nerror: cannot read data file x.npz\n")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    try:
        dead.wait(10)
        agents = {"dev-a": (alive, 1.0), "dev-b": (dead, 2.0)}
        assert _dead_agent(agents, tmp_path) == (
            "agent dev-b exited with code 2: error: cannot read data file x.npz"
        )
        assert _dead_agent({"dev-a": (alive, 1.0)}, tmp_path) is None
    finally:
        terminate(alive, 5)
