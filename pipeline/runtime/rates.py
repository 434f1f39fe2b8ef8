"""What this machine computes per second, measured here: the float64 GEMM rate."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["gemm_rate"]


def gemm_rate(m, k, n, *, seconds=0.3, threads=1):
    """Float64 GEMM rate (FLOP/s, 2 m k n per product) at shape (m, k) @ (k, n), measured now.

    With ``threads`` BLAS threads (one: the rate of one dask thread, the planner's
    unit), the best of repeated products over about ``seconds``.

    Examples
    --------
    >>> gemm_rate(64, 64, 64, seconds=0.01) > 1e6
    True
    """
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    out = np.empty((m, n))
    best, spent = float("inf"), 0.0
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=out)  # warm-up: BLAS threads, packing buffers
        while spent < seconds or best == float("inf"):
            t0 = time.perf_counter()
            np.matmul(a, b, out=out)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
    return 2.0 * m * k * n / best
