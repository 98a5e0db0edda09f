"""Process-wide settings of a coordinator process, made by its composition root (the CLI,
the benchmarks' coordinator), never by the service: a process running many services (the
tests) keeps its own.

Both are about the numpy work of judging and aggregating updates, measured on the ingest
benchmark's coordinator (BENCHMARKS.md, "What limits ingest"):

- ``limit_blas_threads``: OpenBLAS starts a helper thread per core and splits a large
  enough matrix-vector product (``quorum``'s agreement check, a dot of a big tensor)
  between them; its helpers then spin waiting for the next one. Measured with 25k
  parameters, the helper thread used 12.6 s of CPU over 4,000 updates, about 3 ms per
  update and as much as the network thread's own work, taken from the broker and the
  devices on a small machine. The products involved take tens of microseconds on one core.
- ``keep_freed_heap``: each step stacks the buffered deltas in float64 (2 MB at 25k
  parameters and K=10) and sorts them; glibc hands such blocks back to the kernel when they
  are freed, so every step faults the same pages in again. Keeping up to ``TOP_PAD`` bytes
  of freed heap halved ``quorum``'s readiness check (6.4 to 2.7 ms per step, measured).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["TOP_PAD", "keep_freed_heap", "limit_blas_threads", "set_up_process"]

log = logging.getLogger(__name__)

TOP_PAD = 64 * 1024 * 1024  # bytes of freed heap glibc keeps (and grows the heap by)
_M_TOP_PAD = -2  # mallopt's parameter number (glibc malloc.h)


def limit_blas_threads(threads: int = 1) -> bool:
    """Let numpy's BLAS use at most ``threads`` threads; True if a BLAS library was found."""
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(limits=threads, user_api="blas")
    return bool(limits.get_original_num_threads().get("blas"))


def keep_freed_heap(top_pad: int = TOP_PAD) -> bool:
    """Ask glibc's malloc to keep ``top_pad`` bytes of freed heap instead of returning it to
    the kernel at once (``mallopt(M_TOP_PAD)``, which also sets how much the heap grows by).
    False where the C library is not glibc (nothing is changed)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    return bool(libc.mallopt(_M_TOP_PAD, ctypes.c_int(top_pad)))


def set_up_process() -> None:
    """Both settings, as ``fedbus coordinator`` runs them (logged at debug level)."""
    blas = limit_blas_threads()
    heap = keep_freed_heap()
    log.debug("process set-up: BLAS limited to one thread %s, freed heap kept up to %d MiB %s",
              "(done)" if blas else "(no BLAS found)", TOP_PAD >> 20,
              "(done)" if heap else "(not glibc)")
