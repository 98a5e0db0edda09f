"""The coordinator process's settings (coordinator.process_setup), checked in this process
and put back afterwards."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from coordinator.process_setup import limit_blas_threads


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
