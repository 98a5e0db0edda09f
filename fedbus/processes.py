"""Child processes we started: starting, watching and stopping them by their own PID.

One place for what the demo, the benchmark harness and the tests do with child processes:

- ``Child``: one process started from an argv, its stdout and stderr in a log file.
- ``ChildGroup``: the children of one job, with ``first_dead`` for a watchdog and
  ``stop_all`` (SIGTERM to all, then SIGKILL to the stragglers) for a ``finally``.
- ``Watchdog``: calls a check on its own thread and stops the work when it fails.
- ``terminate``: SIGTERM, then SIGKILL, for a bare ``subprocess.Popen``.

Nothing here looks a process up by name: every signal goes to the PID of a process this
process started and has not reaped yet (``Popen`` refuses to signal a reaped PID, which
another process may by then have been given).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fedbus.errors import FedbusError

__all__ = ["Child", "ChildError", "ChildGroup", "Memory", "Watchdog", "terminate"]

log = logging.getLogger(__name__)

_TAIL_BYTES = 64 * 1024  # how much of the end of a log ``log_tail`` reads


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM ``proc``, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ChildError(FedbusError):
    """A child process exited, or did not finish or get ready, when it should have.

    ``name`` is the child's, ``returncode`` its exit code (None while it runs; negative:
    killed by that signal) and ``log_tail`` the last lines of its log; ``str(exc)`` has all
    three for a person.
    """

    def __init__(self, message: str, child: Child) -> None:
        self.name = child.name
        self.returncode = child.returncode
        self.log_tail = child.log_tail()
        tail = f"\n--- last lines of {child.log_path} ---\n{self.log_tail}" if self.log_tail else ""
        super().__init__(f"{message}{tail}")


@dataclass(frozen=True)
class Memory:
    """Memory of a live process from ``/proc/<pid>/status``, in KiB: resident now
    (``VmRSS``) and the most it has been resident (``VmHWM``)."""

    rss_kib: int
    hwm_kib: int

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024

    @property
    def hwm_mib(self) -> float:
        return self.hwm_kib / 1024


class Child:
    """One process started from ``argv``, its stdout and stderr in ``log_path``.

    ``env`` is added to this process's environment (with ``PYTHONUNBUFFERED=1``, so a
    Python child's log is current); ``nice`` runs it that many nice levels below this
    process (at most 19; the lowering happens right after the start); ``start_new_session``
    keeps a terminal's Ctrl-C from reaching it; ``append`` keeps what the log already holds.
    stdin is ``/dev/null``. ``name`` (default: the log file's stem) is how messages call it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        nice: int = 0,
        start_new_session: bool = False,
        append: bool = False,
    ) -> None:
        self.argv = tuple(argv)
        self.log_path = Path(log_path)
        self.name = name if name is not None else self.log_path.stem
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab" if append else "wb") as out:
            self._proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=start_new_session,
            )
        if nice:
            self._lower_priority(nice)

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.returncode}"
        return f"<Child {self.name} pid {self.pid} {state}>"

    def _lower_priority(self, nice: int) -> None:
        try:
            own = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, self.pid, min(19, own + nice))
        except (AttributeError, OSError) as exc:  # not POSIX, or the process is already gone
            log.debug("cannot lower the priority of %s (pid %d): %s", self.name, self.pid, exc)

    # -- state ------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once it has exited (negative: killed by that signal), else None."""
        return self._proc.poll()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def popen(self) -> subprocess.Popen:
        return self._proc

    def log_tail(self, lines: int = 12) -> str:
        """The last ``lines`` lines of the log ("" when there are none)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - _TAIL_BYTES))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""

    def rss(self) -> Memory | None:
        """Its memory now, from ``/proc/<pid>/status``; None once it has exited."""
        if not self.alive:
            return None
        fields: dict[str, int] = {}
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "VmHWM"):
                        fields[key] = int(value.split()[0])
        except (FileNotFoundError, ProcessLookupError):
            return None
        if len(fields) < 2:  # exiting: the kernel has already released its memory
            return None
        return Memory(rss_kib=fields["VmRSS"], hwm_kib=fields["VmHWM"])

    # -- waiting ----------------------------------------------------------------------------

    def wait(self, timeout: float, what: str | None = None) -> int:
        """Wait until it exits and return its exit code. After ``timeout`` seconds, stop it
        (``terminate``) and raise ``ChildError`` naming ``what`` (default: its name)."""
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.terminate()
            raise ChildError(
                f"{what or self.name} did not finish within {timeout:g} s", self
            ) from None

    def wait_for_file(self, path: Path, timeout: float, what: str | None = None) -> None:
        """Wait until ``path`` exists (the child's "ready"). Raise ``ChildError`` at once if
        the child exits first; after ``timeout`` seconds, stop it and raise."""
        deadline = time.monotonic() + timeout
        while not Path(path).exists():
            if not self.alive:
                raise ChildError(f"{what or self.name} exited with code {self.returncode}", self)
            if time.monotonic() >= deadline:
                self.terminate()
                raise ChildError(f"{what or self.name} not ready within {timeout:g} s", self)
            time.sleep(0.02)

    # -- stopping ---------------------------------------------------------------------------

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; returns
        the exit code. Does nothing to a child that has already exited."""
        terminate(self._proc, timeout)
        return self._proc.returncode

    def kill(self) -> int:
        """SIGKILL now and reap, as in a crash; returns the exit code."""
        if self._proc.poll() is None:
            self._proc.kill()
        return self._proc.wait()

    def _send_term(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)


class ChildGroup:
    """The children of one job, in start order; a context manager that stops them all.

    Thread-safe: a ``Watchdog`` may call ``first_dead`` while the owner starts children.
    Stopped children stay in the group, so their exit codes can still be read.
    """

    def __init__(self) -> None:
        self._children: list[Child] = []
        self._lock = threading.Lock()

    def add(self, child: Child) -> Child:
        """Keep ``child`` (just started: ``group.add(Child(argv, log_path=...))``); returns it."""
        with self._lock:
            self._children.append(child)
        return child

    @property
    def children(self) -> tuple[Child, ...]:
        with self._lock:
            return tuple(self._children)

    def __iter__(self) -> Iterator[Child]:
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def first_dead(self) -> str | None:
        """``"<name> exited with code <n>: <its last log line>"`` for the first child (in
        start order) that has exited, or None while all run. Fits ``Watchdog``'s check."""
        for child in self.children:
            if not child.alive:
                last = child.log_tail(1).strip() or "(no output)"
                return f"{child.name} exited with code {child.returncode}: {last}"
        return None

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM every child still running, wait up to ``timeout`` seconds in all, then
        SIGKILL and reap the ones left. Idempotent."""
        children = self.children
        for child in children:
            child._send_term()
        deadline = time.monotonic() + timeout
        for child in children:
            try:
                child.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()

    def __enter__(self) -> ChildGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


class Watchdog:
    """While the ``with`` block runs, calls ``check`` every ``interval`` seconds on its own
    thread; the first time it returns a message, keeps it in ``failure``, calls
    ``on_failure`` once (e.g. ``service.stop``) and stops watching."""

    def __init__(
        self,
        check: Callable[[], str | None],
        on_failure: Callable[[], None],
        *,
        interval: float = 0.5,
    ) -> None:
        self._check = check
        self._on_failure = on_failure
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self.failure: str | None = None

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(self._interval):
            failure = self._check()
            if failure is not None:
                self.failure = failure
                self._on_failure()
                return
