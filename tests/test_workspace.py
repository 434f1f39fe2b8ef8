"""The kernels' workspace formulas against the bytes the kernels really allocate.

Each kernel module states what its workspace needs for one block, as a function
beside the code that allocates it (``kernels.distances.block_workspace``,
``kernels.topk.queries_workspace`` / ``steps_workspace`` / ``lists_workspace``,
``kernels.gaussian.em_workspace`` / ``stats_bytes``), and :mod:`pipeline.budget`
multiplies those rows by the tasks alive at once.  A formula that undercounts makes
every plan exceed its budget; one that overcounts wildly wastes it.  Here each
operation runs on ONE realistic block, the way its graph task runs it, and the
traced peak is compared with the formula's total:

* distances: one block as ``pipeline.distances._block`` computes it (2000 x 3000,
  d=64), against ``block_workspace``;
* k-NN query preparation: ``prepare_queries`` on 1000 queries of d=3072, against
  ``queries_workspace``;
* k-NN step task: ``knn_steps`` over a training block of three steps of
  ``step_rows`` rows, called as ``pipeline.neighbors.search._part`` calls it, against
  ``steps_workspace`` + one set of running lists (``lists_workspace``);
* EM block: ``em_block_stats`` on 4096 rows, d=64, K=16 (pruned E-step: K >= 3 and
  d <= 1024, on separated clusters so the pruned path is really taken) and K=2
  (dense), float64 and float32 input, against ``em_workspace`` + one set of
  statistics (``stats_bytes``).

How it is measured: NumPy reports its data buffers to :mod:`tracemalloc`, so the
traced peak is the most NumPy (and Python) memory alive at once.  Inputs (blocks as
read, prepared queries, prepared parameters) are built before tracing starts and
are not counted, as the formulas do not count them (:mod:`pipeline.budget` adds
them as rows of their own); what the kernel returns is counted (the distance block,
the statistics, the lists), as it is allocated inside.  BLAS and the allocator's own
buffers are not traced: the budget's ``runtime_overhead`` covers those, not these
formulas.

Tasks that keep scratch buffers from block to block (``work``: the k-NN steps and
the EM pass use the thread's ``runtime.thread_work()`` dict) are run twice on one
dict, as a worker thread runs consecutive tasks.  The second run starts with every
scratch buffer already allocated, so its transients sit on top of all of them: that
steady state, not the first (cold) task, is what a thread holds for its tasks.

This test found ``steps_workspace`` short (it counted only the argpartition path of
``select_smallest``, not its threshold path, nor the copy of the ranking rows of the
queries cut by rank): 41.5 MiB held against 34.0 MiB counted at d=512 float64.  The
formula now counts both.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from pipeline import distances as _dist
from pipeline import mixture as _mix
from pipeline.neighbors import search as _nb
from pipeline.kernels import distances as _kd
from pipeline.kernels import gaussian as _g
from pipeline.kernels import topk as _topk

MiB = 2**20

# Upper tolerance: measured <= total * (1 + REL_SLACK) + ABS_SLACK.  The formulas
# leave out, by design, what is a few bytes a row (row norms, per-row bounds and
# thresholds, index vectors of a handful of candidates) and Python's own objects;
# at these sizes that is tens to hundreds of KiB, far below 1 MiB.  5% absorbs
# allocator rounding and data-dependent counts (candidates per query) scaling with
# the block.  A real missing buffer of a block-sized array is several MiB here and
# does not fit in the slack.
REL_SLACK = 0.05
ABS_SLACK = 1 * MiB
# Lower tolerance: measured >= FLOOR * total.  The formulas may be conservative (a
# sum of buffers that are not all alive at once; worst-case candidate counts), but a
# formula more than twice what the kernel ever holds wastes half of every budget and
# is as wrong as one that undercounts.
FLOOR = 0.5


def traced_peak(fn):
    """Run ``fn()`` under tracemalloc: (bytes of the peak above the start, its result)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if started:
            tracemalloc.stop()
    return peak - start, out


def check(measured, rows, *, what):
    """Assert the traced peak lies within the tolerances of the formula's total."""
    total = sum(nbytes for _, nbytes in rows)
    table = "\n".join(f"    {name:<40}{nbytes / MiB:9.2f} MiB" for name, nbytes in rows)
    report = (f"{what}: measured peak {measured / MiB:.2f} MiB, formula total {total / MiB:.2f} MiB "
              f"(ratio {measured / total:.3f})\n{table}")
    print(report)
    assert measured <= total * (1 + REL_SLACK) + ABS_SLACK, "formula undercounts: " + report
    assert measured >= FLOOR * total, "formula overcounts more than 2x: " + report


def workspace_rows(workspace):
    return [(w.name, w.nbytes) for w in workspace]


def clustered(rng, n, d, dtype, centres):
    """Rows around a few centres far from the origin (as images, embeddings are)."""
    X = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, d)) * 10.0
    if np.dtype(dtype).kind == "u":
        X = np.clip(X, 0, 255)
    return X.astype(dtype)


# ------------------------------------------------------------------------- distances

@pytest.mark.parametrize("dtype, upcast", [
    (np.float32, False),
    (np.float32, True),   # precision="exact": float64 blocks and output
    (np.float64, False),
    (np.uint8, False),    # converted to float32 while centred
], ids=["float32", "float32-exact", "float64", "uint8"])
def test_distance_block(dtype, upcast):
    """One (2000 x 3000, d=64) distance block, as pipeline.distances._block computes it."""
    nx, ny, d = 2000, 3000, 64
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((8, d)) * 30 + 100
    x, y = clustered(rng, nx, d, dtype, centres), clustered(rng, ny, d, dtype, centres)
    shift = _topk.finite_mean(y[:1024])[0]
    sx, sy = np.arange(nx), np.arange(ny)

    # The test keeps its own reference to y: the task's read is an input here.
    measured, D = traced_peak(lambda: _dist._block([x], [y], [shift], sx, sy, metric="euclidean",
                                                   upcast=upcast))
    assert D.shape == (nx, ny)
    rows = workspace_rows(_kd.block_workspace(nx, ny, d, np.dtype(dtype).itemsize, upcast))
    check(measured, rows, what=f"distance block {nx} x {ny}, d={d}, {np.dtype(dtype)}, upcast={upcast}")


# ------------------------------------------------------------------------------- k-NN

@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.float64])
def test_knn_query_preparation(dtype):
    """prepare_queries on one block of 1000 queries, d=3072.

    float64 queries are kept as they are for the exact re-rank (no float64 copy),
    while the formula counts one for every dtype: measured ~ half the formula there,
    which the floor still accepts (it is exactly the read block the task keeps).
    """
    n, d = 1000, 3072
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((20, d)) * 30 + 100
    X = clustered(rng, n, d, dtype, centres)
    shift = _topk.finite_mean(X[:1024])[0]

    measured, q = traced_peak(lambda: _topk.prepare_queries(X, shift, offset=0))
    assert q["xm2"].shape == (n, d)
    rows = workspace_rows(_topk.queries_workspace(n, d, np.dtype(dtype).itemsize))
    check(measured, rows, what=f"prepare_queries {n} x {d}, {np.dtype(dtype)}")


@pytest.mark.parametrize("d, dtype, k", [
    # d=3072 steps (1174 rows = 36 groups < 4 x 13 candidates) take select_smallest's
    # argpartition path; d=512 steps and k=5 its threshold path.
    pytest.param(3072, np.float32, 10, id="d3072-float32-k10"),
    pytest.param(512, np.float64, 10, id="d512-float64-k10"),
    pytest.param(512, np.float32, 10, id="d512-float32-k10"),
    pytest.param(3072, np.float32, 5, id="d3072-float32-k5"),
])
def test_knn_step_task(d, dtype, k):
    """One task of knn_steps: 1000 queries against a training block of three steps.

    As pipeline.neighbors.search._part runs it: step = step_rows(...), the default margin
    (n_candidates = k + 2 + k // 8), a shift, the thread's scratch dict, no board.
    Three steps: the first is cut by rank (select_smallest), the later ones by the
    threshold on the running k-th distance (the mask), with the rank cut for the
    queries that get too many candidates.  The task runs twice on one scratch dict
    (a thread's consecutive tasks): the second starts with the ranking block, the
    mask and the re-rank buffers allocated, as every task after a thread's first.
    """
    n = 1000
    itemsize = np.dtype(dtype).itemsize
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((20, d)) * 30 + 100
    step = _topk.step_rows(n, d, itemsize)
    X, Y = clustered(rng, n, d, dtype, centres), clustered(rng, 3 * step, d, dtype, centres)
    shift = _topk.finite_mean(Y[:1024])[0]
    queries = _topk.prepare_queries(X, shift, offset=0)
    margin = _nb._default_margin(k)
    n_candidates = k + margin
    assert n_candidates == k + 2 + k // 8

    def two_tasks():
        work = {}
        for _ in range(2):
            part = None  # a task's lists are handed to the merge before the thread's next task
            steps = ((s, Y[s:s + step]) for s in range(0, Y.shape[0], step))
            part = _topk.knn_steps(queries, steps, k, margin=margin, shift=shift, work=work, board=None)
        return part

    measured, part = traced_peak(two_tasks)
    assert part["idx"].shape == (n, k)
    rows = workspace_rows(_topk.steps_workspace(n, step, d, itemsize, n_candidates))
    rows.append(("running top-k lists (lists_workspace)", _topk.lists_workspace(n, k)))
    # select_smallest's branch for a full step (its condition, restated for the report).
    path = "threshold" if step // _topk._GROUP >= 4 * n_candidates else "argpartition"
    check(measured, rows, what=f"knn_steps task, {n} queries, d={d}, {np.dtype(dtype)}, k={k}, "
                               f"3 steps of {step} rows, select_smallest {path} path")


# -------------------------------------------------------------------------------- EM

def mixture_problem(rows, d, K, dtype, seed=4):
    """A block of separated, anisotropic clusters and the mixture that generated it.

    Means ~40 sigma apart (the log-density gaps exceed PRUNE_GAP, so the pruned
    E-step skips most (row, component) pairs, as it does once EM has converged on
    separated data); each component stretched along two directions (so the pruning
    bounds' directional terms are computed too).
    """
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((K, d)) * 40.0
    stretch = rng.standard_normal((K, d, 2)) * 2.0
    covariances = np.eye(d) + stretch @ stretch.transpose(0, 2, 1)
    labels = rng.integers(0, K, rows)
    L = np.linalg.cholesky(covariances)
    X = means[labels] + np.einsum("nij,nj->ni", L[labels], rng.standard_normal((rows, d)))
    weights = rng.dirichlet(np.full(K, 5.0))
    return X.astype(dtype), weights, means, _g.compute_precision_cholesky(covariances)


@pytest.mark.parametrize("K, dtype", [
    (16, np.float64),  # pruned E-step (K >= 3, d <= 1024), 4096-row slices
    (16, np.float32),  # pruned, and each slice converted to float64
    (2, np.float64),   # K = 2: never pruned, dense slices of inner_rows
    (2, np.float32),
], ids=["K16-float64-pruned", "K16-float32-pruned", "K2-float64-dense", "K2-float32-dense"])
def test_em_block(K, dtype):
    """One block of the fused EM pass (4096 rows, d=64), as pipeline.mixture._em_chunk runs it.

    Two consecutive blocks on one scratch dict (a thread's ``thread_work()``): the
    second starts with every slice buffer allocated.
    """
    rows, d = 4096, 64
    X, weights, means, P = mixture_problem(rows, d, K, dtype)
    prepared = _g.prepare_parameters(weights, means, P)  # as _em_stats_graph: prune=True
    pruned = K >= _g.PRUNE_MIN_COMPONENTS and d <= _g.PRUNE_MAX_FEATURES
    assert ("bounds" in prepared) == pruned
    if pruned:  # the premise: this block really takes the pruned path, not its dense fallback
        first = np.ascontiguousarray(X[:_g.prune_rows(d)], dtype=np.float64)
        assert _g._pruned_log_prob(first, prepared, {}) is not None

    def two_blocks():
        work = {}
        stats = _g.em_block_stats(X, prepared=prepared, work=work)
        del stats
        return _g.em_block_stats(X, prepared=prepared, work=work)

    measured, stats = traced_peak(two_blocks)
    assert stats["n"] == rows and stats["S2"].shape == (K, d, d)
    itemsize = np.dtype(dtype).itemsize
    table = workspace_rows(_g.em_workspace(rows, K, n_features=d, n_components=K, itemsize=itemsize))
    table.append(("sufficient statistics (stats_bytes)", _g.stats_bytes(K, d)))
    check(measured, table, what=f"em_block_stats {rows} x {d}, K={K}, {np.dtype(dtype)}")


@pytest.mark.parametrize("cov_type", ["tied", "diag", "spherical"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_em_block_other_covariance_types(cov_type, dtype):
    """One block of the fused pass for tied/diag/spherical (4096 rows, d=256, K=64), two in a row.

    Their slices convert float32 while shifting (no float64 copy of the block), and
    the formula charges one ``Z`` slice, the (slice, K) responsibilities and the
    moments' GEMM output.
    """
    from pipeline.kernels import covariances as _cv

    rows, d, K = 4096, 256, 64
    rng = np.random.default_rng(2)
    X = (rng.standard_normal((rows, d)) * 3.0 + 50.0).astype(dtype)
    means = X[rng.choice(rows, K, replace=False)].astype(np.float64)
    cov = {"tied": np.eye(d) * 9.0, "diag": np.full((K, d), 9.0), "spherical": np.full(K, 9.0)}[cov_type]
    prepared = _cv.prepare_parameters(cov_type, np.full(K, 1.0 / K), means, _cv.precision_cholesky(cov_type, cov))

    def two_blocks():
        work = {}
        stats = _cv.em_block_stats(X, prepared, work=work)
        del stats
        return _cv.em_block_stats(X, prepared, work=work)

    measured, stats = traced_peak(two_blocks)
    assert stats["n"] == rows
    itemsize = np.dtype(dtype).itemsize
    table = workspace_rows(_cv.em_workspace(cov_type, rows, K, n_features=d, n_components=K, itemsize=itemsize))
    table.append(("sufficient statistics (stats_bytes)", _cv.stats_bytes(cov_type, K, d)))
    check(measured, table, what=f"{cov_type} em_block_stats {rows} x {d}, K={K}, {np.dtype(dtype)}")
