"""fedbus.processes: child processes of the demo, the benchmarks and the broker, against
real child processes (``sys.executable -c ...``), and the watchdog."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedbus.processes import Child, ChildError, ChildGroup, Watchdog, terminate

# A child that ignores SIGTERM, says so in a file (``argv[1]``) and sleeps.
STUBBORN = (
    "import signal, sys, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "pathlib.Path(sys.argv[1]).write_text('ready'); time.sleep(60)"
)
SLEEPER = "import time; time.sleep(60)"


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def stubborn(tmp_path: Path, name: str = "stubborn") -> Child:
    """A running child that ignores SIGTERM (its handler is in place when this returns)."""
    ready = tmp_path / f"{name}.ready"
    child = Child(python(STUBBORN, str(ready)), log_path=tmp_path / f"{name}.log")
    child.wait_for_file(ready, 10)
    return child


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


def test_child_captures_stdout_and_stderr_in_its_log(tmp_path: Path) -> None:
    child = Child(
        python("import os, sys; print('out', os.environ['FEDBUS_T']); "
               "print('err', file=sys.stderr); sys.exit(4)"),
        log_path=tmp_path / "logs" / "talker.log", env={"FEDBUS_T": "x1"},
    )
    assert child.name == "talker" and child.pid > 0
    assert child.wait(10) == 4
    assert not child.alive and child.returncode == 4
    assert child.log_path.read_text().splitlines() == ["out x1", "err"]
    assert child.log_tail(1) == "err"
    assert child.log_tail() == "out x1\nerr"


def test_child_log_is_replaced_unless_appending(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("old run\n")
    Child(python("print('new run')"), log_path=log, append=True).wait(10)
    assert log.read_text() == "old run\nnew run\n"
    Child(python("print('newer run')"), log_path=log).wait(10)
    assert log.read_text() == "newer run\n"


def test_terminate_stops_a_well_behaved_child_with_sigterm(tmp_path: Path) -> None:
    child = Child(python(SLEEPER), log_path=tmp_path / "s.log")
    assert child.alive
    assert child.terminate(5) == -signal.SIGTERM
    assert child.terminate(5) == -signal.SIGTERM  # again: nothing to do


def test_terminate_falls_back_to_sigkill_within_the_timeout(tmp_path: Path) -> None:
    child = stubborn(tmp_path)
    t0 = time.monotonic()
    assert child.terminate(0.3) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert not child.alive


def test_kill_is_sigkill_now_and_reaps(tmp_path: Path) -> None:
    child = Child(python(SLEEPER), log_path=tmp_path / "k.log")
    t0 = time.monotonic()
    assert child.kill() == -signal.SIGKILL
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(ChildProcessError):  # reaped: no zombie left to wait for
        os.waitpid(child.pid, os.WNOHANG)
    assert child.kill() == -signal.SIGKILL  # idempotent


def test_wait_past_its_timeout_stops_the_child_and_shows_its_log(tmp_path: Path) -> None:
    child = Child(python("print('still working', flush=True); import time; time.sleep(60)"),
                  log_path=tmp_path / "slow.log")
    deadline = time.monotonic() + 10
    while "still working" not in child.log_tail() and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(ChildError) as info:
        child.wait(0.2, "the slow job")
    assert str(info.value).startswith("the slow job did not finish within 0.2 s")
    assert "still working" in str(info.value)
    assert info.value.name == "slow" and info.value.log_tail == "still working"
    assert not child.alive


def test_wait_for_file_fails_at_once_when_the_child_exits(tmp_path: Path) -> None:
    child = Child(python("import sys; print('no config'); sys.exit(3)"),
                  log_path=tmp_path / "early.log", name="consumer")
    t0 = time.monotonic()
    with pytest.raises(ChildError, match="consumer exited with code 3") as info:
        child.wait_for_file(tmp_path / "never", 30)
    assert time.monotonic() - t0 < 10
    assert info.value.returncode == 3 and "no config" in str(info.value)


def test_wait_for_file_past_its_timeout_stops_the_child(tmp_path: Path) -> None:
    child = Child(python(SLEEPER), log_path=tmp_path / "w.log")
    with pytest.raises(ChildError, match=r"w not ready within 0\.1 s"):
        child.wait_for_file(tmp_path / "never", 0.1)
    assert not child.alive


def test_nice_runs_the_child_below_our_priority(tmp_path: Path) -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    with ChildGroup() as group:
        low = group.add(Child(python(SLEEPER), log_path=tmp_path / "low.log", nice=5))
        same = group.add(Child(python(SLEEPER), log_path=tmp_path / "same.log"))
        assert os.getpriority(os.PRIO_PROCESS, low.pid) == min(19, own + 5)
        assert os.getpriority(os.PRIO_PROCESS, same.pid) == own


def test_rss_reads_the_memory_of_the_live_child(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = Child(
        python("import pathlib, sys, time; b = b'x' * (64 << 20); "
               "pathlib.Path(sys.argv[1]).write_text('ready'); time.sleep(60)", str(ready)),
        log_path=tmp_path / "m.log",
    )
    try:
        child.wait_for_file(ready, 10)
        memory = child.rss()
        assert memory is not None
        assert 64 * 1024 <= memory.rss_kib <= memory.hwm_kib < 1024 * 1024
        assert memory.rss_mib == memory.rss_kib / 1024
    finally:
        child.kill()
    assert child.rss() is None


def test_first_dead_names_the_child_and_its_last_log_line(tmp_path: Path) -> None:
    with ChildGroup() as group:
        group.add(Child(python(SLEEPER), log_path=tmp_path / "a.log", name="agent dev-a"))
        assert group.first_dead() is None
        dead = group.add(Child(
            python("import sys; print('starting'); "
                   "print('error: cannot read data file x.npz'); sys.exit(2)"),
            log_path=tmp_path / "b.log", name="agent dev-b",
        ))
        silent = group.add(Child(python("raise SystemExit(5)"), log_path=tmp_path / "c.log",
                                 name="agent dev-c"))
        dead.wait(10)
        silent.wait(10)
        assert group.first_dead() == (
            "agent dev-b exited with code 2: error: cannot read data file x.npz"
        )
        dead_only_silent = ChildGroup()
        dead_only_silent.add(silent)
        assert dead_only_silent.first_dead() == "agent dev-c exited with code 5: (no output)"


def test_stop_all_leaves_no_child_alive(tmp_path: Path) -> None:
    group = ChildGroup()
    polite = [group.add(Child(python(SLEEPER), log_path=tmp_path / f"p{i}.log"))
              for i in range(3)]
    stubborn_child = group.add(stubborn(tmp_path))
    assert len(group) == 4 and all(c.alive for c in group)
    t0 = time.monotonic()
    group.stop_all(0.5)
    assert time.monotonic() - t0 < 3.0  # one timeout for all, not one per child
    assert not any(c.alive for c in group)
    assert [c.returncode for c in polite] == [-signal.SIGTERM] * 3
    assert stubborn_child.returncode == -signal.SIGKILL
    group.stop_all(0.5)  # idempotent


def test_leaving_the_group_stops_its_children_on_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ChildGroup() as group:
        child = group.add(Child(python(SLEEPER), log_path=tmp_path / "x.log"))
        raise RuntimeError("the job failed")
    assert not child.alive and list(group) == [child]


def test_watchdog_stops_the_work_when_a_child_of_the_group_dies(tmp_path: Path) -> None:
    stopped = threading.Event()
    with ChildGroup() as group:
        group.add(Child(python(SLEEPER), log_path=tmp_path / "ok.log", name="agent ok"))
        group.add(Child(python("print('boom'); raise SystemExit(1)"),
                        log_path=tmp_path / "bad.log", name="agent bad"))
        with Watchdog(group.first_dead, stopped.set, interval=0.01) as watchdog:
            assert stopped.wait(10)
    assert watchdog.failure == "agent bad exited with code 1: boom"
