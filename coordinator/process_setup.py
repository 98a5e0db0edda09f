"""Process-wide settings of a coordinator process, made by its composition root (the CLI,
the benchmarks' coordinator), never by the service: a process running many services (the
tests) keeps its own.

It is about the numpy work of judging and aggregating updates, measured on the ingest
benchmark's coordinator (BENCHMARKS.md, "What limits ingest"):

- ``limit_blas_threads``: OpenBLAS starts a helper thread per core and splits a large
  enough matrix-vector product (``quorum``'s agreement check, a dot of a big tensor)
  between them; its helpers then spin waiting for the next one. Measured with 25k
  parameters, the helper thread used 12.6 s of CPU over 4,000 updates, about 3 ms per
  update and as much as the network thread's own work, taken from the broker and the
  devices on a small machine. The products involved take tens of microseconds on one core.
"""

from __future__ import annotations

import logging

__all__ = ["limit_blas_threads", "set_up_process"]

log = logging.getLogger(__name__)


def limit_blas_threads(threads: int = 1) -> bool:
    """Let numpy's BLAS use at most ``threads`` threads; True if a BLAS library was found."""
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(limits=threads, user_api="blas")
    return bool(limits.get_original_num_threads().get("blas"))


def set_up_process() -> None:
    """The settings, as ``fedbus coordinator`` runs them (logged at debug level)."""
    blas = limit_blas_threads()
    log.debug("process set-up: BLAS limited to one thread %s",
              "(done)" if blas else "(no BLAS found)")
