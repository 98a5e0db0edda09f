"""Child processes we started: stopping one by its own PID, and watching them."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable
from types import TracebackType

__all__ = ["Watchdog", "terminate"]


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM ``proc``, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
