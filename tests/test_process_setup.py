"""The coordinator process's settings (coordinator.process_setup), checked in this process
and put back afterwards."""

from __future__ import annotations

import platform

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from coordinator.process_setup import keep_freed_heap, limit_blas_threads

DEFAULT_TOP_PAD = 128 * 1024  # glibc's M_TOP_PAD when nothing sets it (malloc.c)


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_limit_blas_threads_leaves_numpy_one_blas_thread() -> None:
    before = _blas_threads()
    assert before, "numpy is linked against a BLAS threadpoolctl knows"
    try:
        assert limit_blas_threads() is True
        assert _blas_threads() == [1] * len(before)
        a = np.arange(20_000, dtype=np.float64).reshape(10, 2_000)
        assert float((a @ a[0])[0]) == float(np.dot(a[0], a[0]))  # products still work
    finally:
        threadpool_limits(limits=max(before), user_api="blas")
    assert _blas_threads() == before


def test_keep_freed_heap_is_taken_by_glibc() -> None:
    if platform.libc_ver()[0] != "glibc":
        assert keep_freed_heap(DEFAULT_TOP_PAD) is False
        return
    # glibc's own default, so the test process is left as it was
    assert keep_freed_heap(DEFAULT_TOP_PAD) is True
