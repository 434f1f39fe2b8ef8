"""Exact neighbours out of core: streaming top-k and radius queries, the neighbours estimators.

Graph (no numerics here; the kernels are in :mod:`pipeline.kernels.topk`), plain dask
with no dask.array, whose import (and the scipy modules it loads) would cost about
half a second of every k-NN run.  Inputs are :class:`pipeline.inputs.RowSource`: a Zarr
array read inside the tasks, an in-memory array (one key) or a dask array's blocks.

* ``pipeline-knn-shift``: the mean of the first training rows, a (d,) vector, one
  shared key.  Both sets are centred on it before the GEMM, which keeps the float32
  expansion accurate for data far from the origin (distances are translation
  invariant, any shift near the data will do).
* ``pipeline-knn-query``: one task per query block prepares it once (``-2 (x - s)`` in
  the working dtype, a float64 copy for the exact re-rank, row norms, a finiteness
  check).
* ``pipeline-knn-topk``: one task per (query block, training block) walks its training
  rows in steps (:func:`pipeline.kernels.topk.knn_steps`), each read from Zarr into the
  thread's reused buffer (no block is held between tasks or shared by the tasks of
  several query blocks): a GEMM per step, exact float64 re-rank of the few rows that
  can still enter the lists, the ``k`` best with global indices and a lower bound on
  everything dropped by rank.  The tasks of a call share each query's best k-th
  distance so far (:func:`_board`).
* ``pipeline-knn-merge``: a tree (chunk / combine / aggregate) merges the partial
  lists of each query block; ``merge_knn`` is associative and commutative, so
  ``split_every`` changes only the tree, not the result.

Metrics (``metric=``): the tasks rank by the kernels' keys
(:data:`pipeline.kernels.topk.KEYS`): squared distances for ``"euclidean"`` (centred
on the shift), negated inner products for ``"ip"`` and ``"cosine"`` (unit rows; no
shift, products are not translation invariant), exact L1 for ``"manhattan"``;
:func:`pipeline.kernels.topk.distances_from_keys` turns keys into the distances
returned.  Radius queries (``pipeline-radius-*`` tasks) use the same steps and keep
every row within the radius, as CSR rows merged by a tree.

The plan prefers one query block holding every query (the training set is read
exactly once).  A query whose k-th exact distance is not strictly below the bound of
what the approximate stage dropped (exact or near ties beyond the margin) is redone
with a wide margin, then, if still uncertified, by exact differences against every
training row: the answer is exact whatever the rounding of the GEMM.
"""

from __future__ import annotations

import functools
import math
import threading
import uuid

import numpy as np

from .budget import align_rows, cost_knn, format_bytes, parse_budget, plan
from .errors import BudgetError, InputError, NotFittedError, sklearn_flavoured
from .estimator import BaseEstimator
from .inputs import as_classes, as_labels, as_rows, as_targets, check_metric, check_same_features, rows_of
from .kernels import topk as _topk
from .runtime import compute, dask_threads, delayed_of, reduce_tree, thread_buffers, thread_work
from .store.results import ResultWriter, job_fingerprint

__all__ = ["kneighbors", "radius_neighbors", "NearestNeighbors", "KNeighborsClassifier", "KNeighborsRegressor",
           "write_knn", "load_graph"]

_SPLIT_EVERY = 8  # tree width of the merge (budget.cost_knn counts these partials)


# ------------------------------------------------------------------------ validation

def _check_k(k, n_train, name="n_neighbors"):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"{name}={k!r} must be a whole number between 1 and the training set size ({n_train})")
    if k < 1 or k > n_train:
        raise InputError(f"{name}={k} is out of range: it must be between 1 and the number of training samples, "
                         f"and the training set has {n_train} sample{'' if n_train == 1 else 's'}")
    return int(k)


def _arrays(X, Y, memory_budget, k, query_rows=None, train_rows=None, metric="euclidean"):
    """Open both sets, validate them and plan their blocks.

    Returns ``(X, Y, k, plan, query_blocks, train_blocks)``: the sets as row sources
    (:class:`pipeline.inputs.RowSource`), the blocks as ``(start, stop)`` row ranges.
    """
    X, Y = as_rows(X, "X"), as_rows(Y, "Y")
    check_same_features(X, Y)
    k = _check_k(k, Y.shape[0])
    # Manhattan is ranked by exact float64 differences: its steps are float64 blocks.
    itemsize = 8 if metric == "manhattan" else max(X.dtype.itemsize, Y.dtype.itemsize)
    budget, threads = parse_budget(memory_budget), dask_threads()
    shape = dict(n_query=X.shape[0], n_train=Y.shape[0], n_features=X.shape[1], k=k, itemsize=itemsize,
                 train_held=Y.kind == "dask")  # Zarr rows are read a step at a time, arrays' are views
    p = plan("knn", memory_budget=budget, threads=threads, **shape)
    cq, ct = X.chunk_rows, Y.chunk_rows
    if train_rows is None and ct and Y.compressed and min(p["train_rows"], 2 * p["step"]) < min(ct, Y.shape[0]):
        # Reading any rows decodes whole compressed chunks: with steps smaller than a
        # chunk every task transiently holds one, so plan with those set aside.
        held = threads * ct * Y.shape[1] * Y.dtype.itemsize
        if cq and p["query_rows"] < min(cq, X.shape[0]):
            held += cq * X.shape[1] * X.dtype.itemsize
        try:
            p = plan("knn", memory_budget=max(1, budget - held), threads=threads, **shape)
        except BudgetError as e:
            need = held + e.minimum
            raise BudgetError(f"memory budget {format_bytes(budget)} is too small for knn: the {threads} compressed "
                              f"chunk(s) of {ct} rows its reads decode at once ({format_bytes(held)}) and its "
                              f"smallest plan need {format_bytes(need)}; give --memory-budget "
                              f"{math.ceil(need / 2**20)}MiB or more") from None
    bt = int(train_rows or p["train_rows"])
    if train_rows is None:
        bt = _grow_train_rows(p, bt, k, threads, budget, Y.shape[0], shape["train_held"])
        if ct:
            bt = align_rows(bt, ct, Y.shape[0])  # whole Zarr chunks per block: each decoded once
        sizes = _balanced(Y.shape[0], bt, ct, threads)
    else:
        sizes = _even(Y.shape[0], bt)
    return X, Y, k, p, _ranges(_even(X.shape[0], int(query_rows or p["query_rows"]))), _ranges(sizes)


def _even(n, rows):
    """Blocks of ``rows`` rows (the last one shorter), as sizes."""
    return (rows,) * (n // rows) + ((n % rows,) if n % rows else ())


def _ranges(sizes):
    """Sizes as ``(start, stop)`` row ranges."""
    ends = np.cumsum(sizes).tolist()
    return [(e - n, e) for n, e in zip(sizes, ends)]


def _balanced(n, rows, unit, threads):
    """Training blocks of at most ``rows`` rows, as even as whole ``unit``-row chunks allow.

    Their number is rounded up to a multiple of ``threads`` when the chunks allow it:
    blocks of equal width finish together, whereas a short last block leaves the other
    threads idle while it runs.

    Examples
    --------
    >>> _balanced(50000, 6138, 682, 2)
    (5456, 5456, 5456, 5456, 4774, 4774, 4774, 4774, 4774, 4306)
    """
    if rows >= n:
        return (n,)
    unit = unit or 1
    units = math.ceil(n / unit)
    blocks = math.ceil(n / rows)
    if blocks % threads and blocks + threads - blocks % threads <= units:
        blocks += threads - blocks % threads
    if blocks > units:
        return _even(n, rows)
    per, extra = divmod(units, blocks)
    sizes = [(per + (i < extra)) * unit for i in range(blocks)]
    sizes[-1] -= units * unit - n
    return tuple(sizes)


def _grow_train_rows(p, bt, k, threads, budget, n_train, held=True):
    """Training rows per block: at least ~400 per re-ranked candidate, if the budget allows.

    The exact re-rank of a block costs about as much as 40 GEMM columns per
    candidate, whatever the block's width: blocks of 400 candidates' worth keep it
    under a tenth of the GEMM.  The planner's smaller blocks (more tasks than threads,
    for overlap) are kept when they are already that wide.
    """
    want = min(n_train, 400 * (k + _default_margin(k)))
    if bt >= want:
        return bt

    def fits(t):
        items = cost_knn(p["query_rows"], t, n_features=p.shape["n_features"], itemsize=p.shape["itemsize"],
                          k=k, threads=threads, n_train_blocks=math.ceil(n_train / t), step=p["step"],
                          train_held=held, n_query_blocks=p["train_reads"])
        return sum(i.total for i in items) <= budget

    lo, hi = bt, want
    while lo < hi:  # largest fitting width in [bt, want]
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


# ----------------------------------------------------------------------------- tasks

def _steps(value, a, b, step, work):
    """``(offset, rows)`` steps of ``a .. b - 1``, offsets relative to ``a``.

    From Zarr each step is read into the thread's reused buffer, so a task holds one
    step of rows, never its whole block.
    """
    if not isinstance(value, np.ndarray):  # in memory already: views, no alignment
        step = _read_step(step, value.chunks[0])
    for s in range(a, b, step):
        e = min(s + step, b)
        yield s - a, rows_of(value, s, e, work)


def _read_step(step, chunk):
    """Rows read per step: whole stored chunks when one fits about a step.

    Zarr decodes a whole chunk for any part of it: steps smaller than a chunk would
    decode it once per step.
    """
    if chunk <= 2 * step:
        return max(1, round(step / chunk)) * chunk
    return step


def _shift_task(value, a, b):
    """Task: the centring vector, mean of the first training rows (finite ones), (d,)."""
    return _topk.finite_mean(rows_of(value, a, b))[0]


def _prepare(value, a, b, shift, start, metric="sqeuclidean"):
    """Task: one query block, prepared once for every training block."""
    with _named("X (the query set)"):
        return _topk.prepare_queries(rows_of(value, a, b), shift, offset=start, metric=metric)


class _named:
    """Turn a kernel's NonFiniteRows into an InputError naming the set and its rows."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if isinstance(exc, _topk.NonFiniteRows):
            rows = ", ".join(str(int(i)) for i in exc.rows[:10])
            more = f" and {exc.rows.size - 10} more" if exc.rows.size > 10 else ""
            raise InputError(
                f"{self.what} has NaN or infinite values (or values too large to square) in "
                f"row(s) {rows}{more}; remove or impute those rows"
            ) from None
        return False


def _part(queries, value, a, b, start, shift, *, k, margin, call, step=None):
    """Task: the exact k nearest rows of one training block for one query block.

    Steps through the block (:func:`kernels.topk.knn_steps`) in steps of the plan's
    ``step`` rows, never more than :func:`kernels.topk.step_rows`; indices are global
    (``start`` is the block's first training row).
    """
    work = thread_work()
    step = min(step or math.inf, _topk.step_rows(queries["xm2"].shape[0], value.shape[1], value.dtype.itemsize))
    steps = ((start + s, rows) for s, rows in _steps(value, a, b, step, work))
    try:
        return _topk.knn_steps(queries, steps, k, margin=margin, shift=shift, work=work,
                               board=_board(call, queries))
    except _topk.NonFiniteRows as e:
        # Carried up the tree, so the error names the bad rows of every block.
        return {"bad": e.rows}


def _exact_part(qvalue, qa, qb, value, a, b, start, *, k, step=None, metric="sqeuclidean"):
    """Task of the exact fallback: exact keys against every training row, a step at a time."""
    X = rows_of(qvalue, qa, qb)
    parts = [_topk.exact_topk_block(X, rows, k, start + s, metric=metric)
             for s, rows in _steps(value, a, b, step or b - a, thread_work())]
    return functools.reduce(lambda x, y: _topk.merge_knn(x, y, k), parts)


# Per query block of a k-NN call, the running bound on every query's k-th distance
# shared by that call's tasks in this process (kernels.topk.knn_steps, ``board``).
# Keyed by a token unique to the call, so no other call ever reads it.  The client
# drops a call's boards when it ends; a cluster's workers cannot be told, so the
# oldest go once there are more than _BOARDS_MAX or they hold more than
# _BOARDS_MAX_BYTES (a task that finds its board gone starts a fresh one, which is
# only less effective).
_BOARDS = {}
_BOARDS_LOCK = threading.Lock()
_BOARDS_MAX = 16
_BOARDS_MAX_BYTES = 64 * 2**20


def _board(call, queries):
    if call is None:  # a graph without a token of its own shares nothing
        return None
    key = (call, queries["offset"])
    n = queries["xm2"].shape[0]
    with _BOARDS_LOCK:
        board = _BOARDS.get(key)
        if board is None:
            board = _BOARDS[key] = np.full(n, np.inf)
            while len(_BOARDS) > 1 and (len(_BOARDS) > _BOARDS_MAX
                                        or sum(b.nbytes for b in _BOARDS.values()) > _BOARDS_MAX_BYTES):
                del _BOARDS[next(iter(_BOARDS))]  # dicts keep insertion order: the oldest
        return board


def _drop_boards(call):
    with _BOARDS_LOCK:
        for key in [key for key in _BOARDS if key[0] == call]:
            del _BOARDS[key]


def _combine(parts, *, k):
    """Task of the merge tree: a list of partial lists (or NaN reports) merged into one."""
    bad = [p["bad"] for p in parts if "bad" in p]
    if bad:
        return {"bad": np.sort(np.concatenate(bad))}
    out = parts[0]
    for p in parts[1:]:
        out = _topk.merge_knn(out, p, k)
    return out


def _aggregate(parts, *, k):
    """Task at the root of a query block's tree: the merged lists as records."""
    out = _combine(parts, k=k)
    if "bad" in out:
        with _named("Y (the training set)"):
            raise _topk.NonFiniteRows(out["bad"])
    return _topk.knn_records(out)


def _concat(records):
    return np.concatenate(records)


# ----------------------------------------------------------------------------- graph

def _records_graph(X, Y, k, *, margin, split_every, query_blocks, train_blocks, exact=False, call=None,
                   step=None, metric="sqeuclidean"):
    """Lazy (n_query,) record array of (key, idx, ok): block tasks and a merge tree.

    ``X``, ``Y``: row sources; ``query_blocks``, ``train_blocks``: ``(a, b)`` row
    ranges; ``metric``: the kernels' ranking key (:data:`pipeline.kernels.topk.KEYS`).  Tasks are named ``pipeline-knn-<stage>`` (dashboard, Prometheus).
    ``call``: a token unique to this graph, naming the tasks' shared bounds
    (:func:`_board`); drop them with :func:`_drop_boards` once computed.  ``step``:
    the plan's training rows per step.
    """
    from functools import partial

    tok = call or uuid.uuid4().hex
    dsk = {}
    ys, deps = Y.pieces(train_blocks, f"pipeline-knn-train-{tok}", dsk)
    xs, xdeps = X.pieces(query_blocks, f"pipeline-knn-queries-{tok}", dsk)
    deps += xdeps
    starts = [a for a, _ in train_blocks]
    trees = []
    if exact:
        task = partial(_exact_part, k=k, step=step, metric=metric)
        for i, xq in enumerate(xs):
            trees.append([])
            for j, yt in enumerate(ys):
                key = (f"pipeline-knn-exact-{tok}", i, j)
                dsk[key] = (task, *xq, *yt, starts[j])
                trees[-1].append(key)
    else:
        # The centring vector: the mean of the first training rows.  1024 rows put it
        # well inside the data's spread, all the GEMM's accuracy needs (distances are
        # re-ranked exactly whatever the shift); it is on the critical path, so small,
        # and never more than a step's read (the plan's budget for a read).  Only
        # distances are translation invariant: inner products are not centred.
        shift = None
        if metric == "sqeuclidean":
            shift = (f"pipeline-knn-shift-{tok}",)
            value, a, b = ys[0]
            dsk[shift] = (_shift_task, value, a, min(b, a + 1024, a + 2 * (step or 512)))
        task = partial(_part, k=k, margin=margin, call=call, step=step)
        for i, (xq, (qa, _)) in enumerate(zip(xs, query_blocks)):
            q = (f"pipeline-knn-query-{tok}", i)
            dsk[q] = (_prepare, *xq, shift, qa, metric)
            trees.append([])
            for j, yt in enumerate(ys):
                key = (f"pipeline-knn-topk-{tok}", i, j)
                dsk[key] = (task, q, *yt, starts[j], shift)
                trees[-1].append(key)
    combine, aggregate = partial(_combine, k=k), partial(_aggregate, k=k)
    roots = [reduce_tree(dsk, leaves, combine, f"pipeline-knn-merge-{tok}", split_every=split_every,
                         aggregate=aggregate, prefix=(i,))
             for i, leaves in enumerate(trees)]
    final = (f"pipeline-knn-merge-{tok}",)
    dsk[final] = (_concat, roots)
    return delayed_of(dsk, final, deps)


def _default_margin(k):
    # Extra candidates re-ranked exactly per block: enough that the cut rarely falls
    # inside the rounding-error bound (such rows go to the fallback), few enough that
    # the re-rank stays a small fraction of the GEMM (it costs ~1/10 of a GEMM column
    # per candidate).
    return 2 + k // 8


def kneighbors(X, Y, n_neighbors=5, memory_budget=None, return_distance=True, *, metric="euclidean",
               margin=None, split_every=None, query_rows=None, train_rows=None):
    """Exact k nearest training rows of every query row, out of core.

    Never holds the (n_query, n_train) distance matrix: each task ranks one
    (query block, training block) pair, one GEMM per step of ~1000 training rows (the
    plan's ``step``: fewer on a small budget), and
    re-ranks the few candidates that can still enter each query's list by exact
    float64 differences; a tree merges the lists.

    Parameters
    ----------
    X : array-like of shape (n_query, n_features)
        Queries: NumPy, dask or Zarr array, Dataset or dataset URL.
    Y : array-like of shape (n_train, n_features)
        Training set, same kinds.
    n_neighbors : int, default 5
        Between 1 and n_train.
    memory_budget : int or str, optional
        Bytes above the idle process (see :func:`pipeline.budget.parse_budget`).
    return_distance : bool, default True
    metric : {"euclidean", "sqeuclidean", "cosine", "ip", "manhattan"}, default "euclidean"
        ``"cosine"``: ``1 - cos(x, y)``, a zero row at distance 1 from every row
        (scikit-learn's convention: ``normalize`` leaves it zero); ``"ip"``: the
        largest inner products, returned as they are (descending), as FAISS's
        ``IndexFlatIP``; ``"manhattan"``: L1, by exact differences (no GEMM).
    margin : int, optional
        Approximate candidates re-ranked exactly beyond ``k`` per block.
    split_every : int, optional
        Width of the merge tree.
    query_rows, train_rows : int, optional
        Block sizes; default from the plan for ``memory_budget``
        (:func:`pipeline.plan` ``("knn", ...)``).

    Returns
    -------
    dist : ndarray of shape (n_query, n_neighbors), float64
        Exact distances of ``metric``, nearest first (only if ``return_distance``).
    ind : ndarray of shape (n_query, n_neighbors), int64
        Training row indices; equal distances are ordered by index, and among rows
        tied at the k-th distance the lower indices are returned.

    Raises
    ------
    InputError
        Feature counts that differ, ``n_neighbors`` outside 1..n_train, an empty set,
        an unknown metric, or NaN / inf values (the message names the rows).

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> Y = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    >>> dist, ind = pl.kneighbors(np.array([[0.9, 0.0]]), Y, n_neighbors=2)
    >>> ind.tolist(), np.round(dist, 3).tolist()
    ([[1, 0]], [[0.1, 0.9]])
    """
    check_metric(metric)
    X, Y, k, p, qblocks, tblocks = _arrays(X, Y, memory_budget, n_neighbors, query_rows, train_rows, metric)
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, np.integer))
                               or margin < 0):
        raise InputError(f"margin={margin!r} must be a whole number >= 0")
    margin = _default_margin(k) if margin is None else int(margin)
    split_every = max(2, int(split_every or _SPLIT_EVERY))
    with thread_buffers():
        keys, ind = _kneighbors(X, Y, k, margin, split_every, qblocks, tblocks, p["step"],
                                _topk.metric_key(metric))
    return (_topk.distances_from_keys(keys, metric), ind) if return_distance else ind


def _kneighbors(X, Y, k, margin, split_every, qblocks, tblocks, step=None, key="sqeuclidean"):
    """Exact ranking keys (:data:`kernels.topk.KEYS`) and indices: the main pass, then the fallbacks."""
    calls = [uuid.uuid4().hex, uuid.uuid4().hex]  # the main pass's and the wide pass's boards
    try:
        return _passes(X, Y, k, margin, split_every, qblocks, tblocks, calls, step, key)
    finally:
        for call in calls:
            _drop_boards(call)


def _passes(X, Y, k, margin, split_every, qblocks, tblocks, calls, step=None, key="sqeuclidean"):
    common = dict(split_every=split_every, train_blocks=tblocks, step=step, metric=key)
    (rec,) = compute(_records_graph(X, Y, k, margin=margin, query_blocks=qblocks, call=calls[0], **common),
                     label="k-NN")
    dist, ind = rec["dist"], rec["idx"]
    bad = np.flatnonzero(~rec["ok"])
    if bad.size:
        # A few queries had (near-)ties across the candidate cut: redo them with a wide
        # margin, and whatever is still uncertified (exact ties beyond it) by exact
        # differences against every training row.  Both passes hold only these rows, in
        # query blocks no larger than the plan's.
        Xbad = X.take(bad)
        rows = max(b - a for a, b in qblocks)
        blocks = lambda n: _ranges(_even(n, min(n, rows)))
        wide = _records_graph(as_rows(Xbad, "X"), Y, k, margin=max(32, 4 * (k + margin)),
                              query_blocks=blocks(bad.size), call=calls[1], **common)
        (fix,) = compute(wide, label="k-NN (wide margin)")
        dist[bad], ind[bad] = fix["dist"], fix["idx"]
        still = np.flatnonzero(~fix["ok"])
        if still.size:
            (fix,) = compute(_records_graph(as_rows(Xbad[still], "X"), Y, k, margin=0, exact=True,
                                            query_blocks=blocks(still.size), **common),
                             label="k-NN (exact pass)")
            dist[bad[still]], ind[bad[still]] = fix["dist"], fix["idx"]
    return dist, ind


# -------------------------------------------------------------------- radius queries

def _radius_part(queries, value, a, b, start, shift, *, max_key, max_pairs, step=None):
    """Task: every row of one training block within the radius of each query of a block."""
    work = thread_work()
    step = min(step or math.inf, _topk.step_rows(queries["xm2"].shape[0], value.shape[1], value.dtype.itemsize))
    steps = ((start + s, rows) for s, rows in _steps(value, a, b, step, work))
    try:
        found = _topk.radius_steps(queries, steps, max_key, shift=shift, work=work, max_pairs=max_pairs)
    except _topk.NonFiniteRows as e:
        return {"bad": e.rows}
    found["row"] += queries["offset"]  # global query rows from here on
    return found


def _radius_combine(parts, *, max_pairs):
    """Task of the merge tree: the pairs of several parts, checked against the limit first."""
    bad = [p["bad"] for p in parts if "bad" in p]
    if bad:
        return {"bad": np.sort(np.concatenate(bad))}
    if sum(p["row"].size for p in parts) > max_pairs:
        rows = np.concatenate([p["row"] for p in parts])  # indices only, to name the query
        counts = np.bincount(rows - rows.min())
        raise _topk.BallTooLarge(int(np.argmax(counts) + rows.min()), int(counts.max()), max_pairs)
    return {key: np.concatenate([p[key] for p in parts]) for key in ("row", "idx", "dist")}


def _radius_aggregate(parts, *, max_pairs, lo, hi):
    """Task at the root of a query block's tree: its pairs as CSR rows, nearest first."""
    out = _radius_combine(parts, max_pairs=max_pairs)
    if "bad" in out:
        with _named("Y (the training set)"):
            raise _topk.NonFiniteRows(out["bad"])
    order = np.lexsort((out["idx"], out["dist"], out["row"]))  # by query, then (key, index)
    counts = np.bincount(out["row"] - lo, minlength=hi - lo)
    return counts, out["idx"][order], out["dist"][order]


def _concat_csr(blocks, *, max_pairs):
    total = sum(b[1].size for b in blocks)
    if total > max_pairs:  # the call's pairs, over every query block
        raise _topk.BallTooLarge(-1, total, max_pairs)
    counts, idx, dist = zip(*blocks)
    counts = np.concatenate(counts)
    indptr = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, np.concatenate(idx), np.concatenate(dist)


def _radius_limit(budget):
    # Pairs a radius query may keep: a pair is 24 bytes (query, row, key), held by its
    # task, in the merge tree and in the sorted result, about four copies at most;
    # a quarter of the budget for them.
    return max(1, int(budget) // (4 * 4 * 24))


def _radius_csr(X, Y, radius, metric, memory_budget, split_every=None):
    """Exact radius neighbours as CSR parts ``(indptr, indices, keys)``, rows sorted by (key, index)."""
    from functools import partial

    # Three quarters of the budget for the ranking, a quarter for the pairs found.
    budget = parse_budget(memory_budget)
    max_pairs = _radius_limit(budget)
    X, Y, _, p, qblocks, tblocks = _arrays(X, Y, max(1, budget * 3 // 4), 1, metric=metric)
    # The parts of the tasks and of the merges are disjoint pieces of the result: each
    # is held to the limit before it gathers a pair, the roots and the result to it too.
    split_every = max(2, int(split_every or _SPLIT_EVERY))
    key = _topk.metric_key(metric)
    max_key = _topk.key_of_radius(radius, metric)
    tok = uuid.uuid4().hex
    dsk = {}
    ys, deps = Y.pieces(tblocks, f"pipeline-radius-train-{tok}", dsk)
    xs, xdeps = X.pieces(qblocks, f"pipeline-radius-queries-{tok}", dsk)
    shift = None
    if key == "sqeuclidean":
        shift = (f"pipeline-radius-shift-{tok}",)
        value, a, b = ys[0]
        dsk[shift] = (_shift_task, value, a, min(b, a + 1024))
    task = partial(_radius_part, max_key=max_key, max_pairs=max_pairs, step=p["step"])
    roots = []
    for i, (xq, (qa, qb)) in enumerate(zip(xs, qblocks)):
        q = (f"pipeline-radius-query-{tok}", i)
        dsk[q] = (_prepare, *xq, shift, qa, key)
        leaves = []
        for j, yt in enumerate(ys):
            leaves.append((f"pipeline-radius-part-{tok}", i, j))
            dsk[leaves[-1]] = (task, q, *yt, tblocks[j][0], shift)
        roots.append(reduce_tree(dsk, leaves, partial(_radius_combine, max_pairs=max_pairs),
                                 f"pipeline-radius-merge-{tok}", split_every=split_every,
                                 aggregate=partial(_radius_aggregate, max_pairs=max_pairs, lo=qa, hi=qb),
                                 prefix=(i,)))
    final = (f"pipeline-radius-merge-{tok}",)
    dsk[final] = (partial(_concat_csr, max_pairs=max_pairs), roots)
    try:
        with thread_buffers():
            (csr,) = compute(delayed_of(dsk, final, deps + xdeps), label="radius neighbours")
    except _topk.BallTooLarge as e:
        if e.row < 0:
            raise InputError(
                f"radius={radius!r}: the queries have {e.count} training rows within the radius in all, more "
                f"than a radius query may keep in memory_budget={memory_budget!r} ({e.limit} pairs); use a "
                f"smaller radius, a larger memory budget, fewer queries per call, or kneighbors") from None
        raise InputError(
            f"radius={radius!r}: query row {e.row} has at least {e.count} training rows within the radius, "
            f"more than a radius query may keep in memory_budget={memory_budget!r} ({e.limit} pairs); use a "
            f"smaller radius, a larger memory budget, or kneighbors") from None
    return csr


def _check_radius(radius, metric="euclidean"):
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.integer, np.floating)) \
            or not np.isfinite(radius):
        raise InputError(f"radius={radius!r} must be a finite number")
    if radius < 0 and metric != "ip":  # for "ip" the radius is the smallest product kept
        raise InputError(f"radius={radius!r} must be >= 0 (a distance)")
    return float(radius)


def radius_neighbors(X, Y, radius=1.0, memory_budget=None, return_distance=True, *, metric="euclidean",
                     sort_results=True):
    """Every training row within ``radius`` of each query row, exact and out of core.

    Each task ranks one (query block, training block) pair by GEMM steps, as
    :func:`kneighbors`, and re-ranks exactly the rows within the radius plus the
    GEMM's rounding-error bound; a row is kept when its exact distance is at most
    ``radius`` (scikit-learn's rule).

    Parameters
    ----------
    X, Y : array-like of shape (n_query, n_features) / (n_train, n_features)
        As :func:`kneighbors`.
    radius : float, default 1.0
        For ``metric="ip"``, the smallest inner product kept.
    memory_budget : int or str, optional
        Also bounds the pairs found: a quarter of it, 24 bytes a pair, four copies
        (:class:`InputError` naming the query whose ball is too large, before any
        memory is exhausted).
    return_distance : bool, default True
    metric : {"euclidean", "sqeuclidean", "cosine", "ip", "manhattan"}, default "euclidean"
    sort_results : bool, default True
        Accepted for scikit-learn's signature: each row is always sorted, nearest
        first, equal distances by index.

    Returns
    -------
    dist : ndarray of shape (n_query,), dtype object
        Per query, a float64 array of distances (only if ``return_distance``).
    ind : ndarray of shape (n_query,), dtype object
        Per query, an int64 array of training row indices.

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> Y = np.array([[0.0], [1.0], [3.0]])
    >>> dist, ind = pl.radius_neighbors(np.array([[0.9]]), Y, radius=1.0)
    >>> ind[0].tolist(), np.round(dist[0], 3).tolist()
    ([1, 0], [0.1, 0.9])
    """
    check_metric(metric)
    indptr, ind, keys = _radius_csr(X, Y, _check_radius(radius, metric), metric, memory_budget)
    return _ragged(indptr, ind, _topk.distances_from_keys(keys, metric), return_distance)


def _ragged(indptr, ind, dist, return_distance):
    """CSR rows as scikit-learn's object arrays of per-row arrays."""
    n = indptr.size - 1
    out_i = np.empty(n, dtype=object)
    out_i[:] = np.split(ind, indptr[1:-1])
    if not return_distance:
        return out_i
    out_d = np.empty(n, dtype=object)
    out_d[:] = np.split(dist, indptr[1:-1])
    return out_d, out_i


# ---------------------------------------------------------------------- estimators

_WEIGHTS = ("uniform", "distance")


def _is_whole(value):
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


class _LastPass:
    """The neighbours of the last query set a fitted estimator answered, by the input's identity.

    A cache, not the model: it changes no result (a k-NN pass is deterministic), is
    emptied by ``fit`` (a new holder) and is not pickled.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._key = self._value = None

    def get(self, key):
        with self._lock:
            return self._value if self._key == key else None

    def put(self, key, value):
        with self._lock:
            self._key, self._value = key, value

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class _Neighbors(BaseEstimator):
    """What every neighbours estimator shares: the training set by reference, k-NN queries and graphs.

    ``fit`` keeps a reference to the training set (an array, a dask or Zarr array,
    a Dataset or a URL): no pass over it.  Every query streams it out of core.
    """

    def _validate_params(self):
        check_metric(self.metric)
        if not _is_whole(self.n_neighbors) or self.n_neighbors < 1:
            raise InputError(f"n_neighbors={self.n_neighbors!r} must be a whole number >= 1")
        weights = getattr(self, "weights", "uniform")
        if weights not in _WEIGHTS:
            raise InputError(f"weights={weights!r}; choose 'uniform' or 'distance'")
        if weights == "distance" and self.metric == "ip":
            raise InputError("weights='distance' needs a distance, and metric='ip' ranks by inner products "
                             "(larger is nearer); use weights='uniform' or metric='cosine'")

    def _fit_set(self, X):
        """Validate and remember the training set; returns it as a row source.

        In-memory rows are checked for NaN and inf here (one cheap scan); a store or
        dask array is not read by fit, its rows are checked by the query tasks.
        """
        self._validate_params()
        source = as_rows(X, "X")
        source.check_finite()
        # A URL is opened once; a slice of rows stays a slice.
        self._fit_X = source.dataset if source.dataset is not None and source.is_whole() else X
        self.n_samples_fit_ = int(source.shape[0])
        self.n_features_in_ = int(source.shape[1])
        self.effective_metric_ = self.metric
        self._last_pass = _LastPass()
        return source

    def _check_fitted(self):
        if not hasattr(self, "n_samples_fit_"):
            raise sklearn_flavoured(NotFittedError, "NotFittedError")(
                f"This {type(self).__name__} instance is not fitted yet; call fit first")

    def _query_set(self, X):
        """Queries as given, checked against the fitted features (``X=None``: not allowed here)."""
        source = as_rows(X, "X")
        if source.shape[1] != self.n_features_in_:
            raise InputError(f"X has {source.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input (as in fit)")
        return source

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Exact ``n_neighbors`` nearest training rows of each row of ``X`` (see :func:`kneighbors`).

        Parameters
        ----------
        X : array-like of shape (n_query, n_features), Dataset or URL, optional
            Default: the training set itself, each row not counted as its own
            neighbour (scikit-learn's rule: the row's own index is dropped, or, where a
            duplicate pushed it out of the list, the first neighbour).
        n_neighbors : int, optional
            Default ``self.n_neighbors``.
        return_distance : bool, default True

        Returns
        -------
        dist : ndarray of shape (n_query, n_neighbors), float64
            Only if ``return_distance``.
        ind : ndarray of shape (n_query, n_neighbors), int64
        """
        self._check_fitted()
        self._validate_params()
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if not _is_whole(k) or k < 1:
            raise InputError(f"n_neighbors={k!r} must be a whole number >= 1")
        if X is None:
            if k >= self.n_samples_fit_:
                raise InputError(f"n_neighbors={k} is out of range for the training set itself: each of its rows "
                                 f"has {self.n_samples_fit_ - 1} other rows")
            dist, ind = self._neighbors(self._fit_X, int(k) + 1)
            dist, ind = _drop_self(dist, ind, ip=self.metric == "ip")
        else:
            dist, ind = self._neighbors(self._query_set(X), int(k))
        return (dist, ind) if return_distance else ind

    def _neighbors(self, X, k):
        """``(dist, ind)`` of ``X``: one k-NN pass, or the last one's if ``X`` is the same input.

        ``predict``, ``predict_proba`` and ``score`` on the same queries then share one
        pass: inputs are compared by content (:meth:`RowSource.identity`: a hash of an
        in-memory array's bytes, a store's files); a dask array is never the same.
        """
        cache = self._last_pass  # one holder for this call, whatever a concurrent fit does
        source = X if hasattr(X, "identity") else as_rows(X, "X")
        ident = (source.identity(), k, self.metric, self.memory_budget)
        out = cache.get(ident)
        if out is not None:
            return out[0].copy(), out[1].copy()  # the caller may change its arrays
        dist, ind = kneighbors(source, self._fit_X, k, memory_budget=self.memory_budget, metric=self.metric)
        # Kept only while small beside the budget: a long query set's lists are not held on.
        if 2 * dist.nbytes <= parse_budget(self.memory_budget) // 8:
            cache.put(ident, (dist.copy(), ind.copy()))
        return dist, ind

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity"):
        """The k-NN graph as a ``scipy.sparse.csr_matrix`` of shape (n_query, n_samples_fit).

        Parameters
        ----------
        X, n_neighbors
            As :meth:`kneighbors`.
        mode : {"connectivity", "distance"}, default "connectivity"
            Entries 1, or the neighbours' distances.

        Notes
        -----
        For more queries than fit in memory, ``pipeline knn --graph`` writes the same
        matrix to a result store, piece by piece (:func:`load_graph` reads it).
        """
        import scipy.sparse as sp

        _check_mode(mode)
        dist, ind = self.kneighbors(X, n_neighbors)
        n, k = ind.shape
        data = np.ones(n * k) if mode == "connectivity" else dist.ravel()
        return sp.csr_matrix((data, ind.ravel(), np.arange(0, n * k + 1, k)), shape=(n, self.n_samples_fit_))


def _check_mode(mode):
    if mode not in ("connectivity", "distance"):
        raise InputError(f"mode={mode!r}; choose 'connectivity' or 'distance'")


def _drop_self(dist, ind, ip=False):
    """scikit-learn's rule for queries that are the training set: drop each row's own index.

    Where the row is not in its list (duplicates of it ranked first), the first
    neighbour is dropped instead.
    """
    n = ind.shape[0]
    mask = ind != np.arange(n)[:, None]
    # Under "ip" a row need not be its own nearest: when absent it is beyond the list,
    # so the list's last entry goes (a distance metric drops the first, a duplicate).
    mask[np.all(mask, axis=1), -1 if ip else 0] = False
    k = ind.shape[1] - 1
    return dist[mask].reshape(n, k), ind[mask].reshape(n, k)


class NearestNeighbors(_Neighbors):
    """Exact unsupervised neighbours, out of core, with scikit-learn's API.

    Parameters
    ----------
    n_neighbors : int, default 5
        For :meth:`kneighbors` and :meth:`kneighbors_graph`.
    radius : float, default 1.0
        For :meth:`radius_neighbors` and :meth:`radius_neighbors_graph`.
    metric : {"euclidean", "sqeuclidean", "cosine", "ip", "manhattan"}, default "euclidean"
        See :func:`kneighbors`.
    memory_budget : int or str, optional

    Attributes
    ----------
    n_samples_fit_ : int
    n_features_in_ : int
    effective_metric_ : str

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> nn = pl.NearestNeighbors(n_neighbors=1).fit(np.array([[0.0], [1.0], [5.0]]))
    >>> nn.kneighbors(np.array([[4.0]]))[1].tolist()
    [[2]]
    >>> nn.kneighbors_graph().toarray().tolist()
    [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """

    def __init__(self, n_neighbors=5, radius=1.0, metric="euclidean", memory_budget=None):
        self.n_neighbors = n_neighbors
        self.radius = radius
        self.metric = metric
        self.memory_budget = memory_budget

    def fit(self, X, y=None):
        """Remember the training set (no pass over the data); ``y`` is ignored.

        Returns
        -------
        self
        """
        self._fit_set(X)
        return self

    def radius_neighbors(self, X=None, radius=None, return_distance=True, sort_results=False):
        """Every training row within ``radius`` of each row of ``X`` (see :func:`radius_neighbors`).

        ``X=None``: the training set, each row not its own neighbour.  ``radius``
        defaults to ``self.radius``.  Rows are always sorted, nearest first.

        Returns
        -------
        dist : ndarray of shape (n_query,), dtype object
            Only if ``return_distance``.
        ind : ndarray of shape (n_query,), dtype object
        """
        indptr, ind, dist = self._radius(X, radius)
        return _ragged(indptr, ind, dist, return_distance)

    def _radius(self, X, radius):
        self._check_fitted()
        self._validate_params()
        radius = _check_radius(self.radius if radius is None else radius, self.metric)
        query = self._fit_X if X is None else self._query_set(X)
        indptr, ind, keys = _radius_csr(query, self._fit_X, radius, self.metric, self.memory_budget)
        dist = _topk.distances_from_keys(keys, self.metric)
        if X is None:
            rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
            keep = ind != rows
            indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=indptr.size - 1))])
            ind, dist = ind[keep], dist[keep]
        return indptr, ind, dist

    def radius_neighbors_graph(self, X=None, radius=None, mode="connectivity", sort_results=False):
        """The radius graph as a ``scipy.sparse.csr_matrix`` of shape (n_query, n_samples_fit).

        ``mode``: ``"connectivity"`` (entries 1) or ``"distance"``; see
        :meth:`radius_neighbors`.
        """
        import scipy.sparse as sp

        _check_mode(mode)
        indptr, ind, dist = self._radius(X, radius)
        data = np.ones(ind.size) if mode == "connectivity" else dist
        return sp.csr_matrix((data, ind, indptr), shape=(indptr.size - 1, self.n_samples_fit_))


class _Supervised(_Neighbors):
    """The classifier's and the regressor's shared parameters and their ``y``."""

    def __init__(self, n_neighbors=5, weights="uniform", memory_budget=None, metric="euclidean"):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.memory_budget = memory_budget
        self.metric = metric

    def _fit_targets(self, X, y, what):
        """The training set as a row source and its ``y`` (a dataset's own when not given)."""
        self._validate_params()
        source = as_rows(X, "X")
        if y is None and source.dataset is not None and source.dataset.y_zarr is not None:
            y = source.dataset.y_zarr[source.lo:source.hi]
        if y is None:
            raise InputError(f"{type(self).__name__} requires y to be passed, but the target y is None: pass "
                             f"the training {what}, or a dataset that holds 'y'")
        _check_k(self.n_neighbors, source.shape[0])
        return source, y


class KNeighborsClassifier(_Supervised):
    """k-nearest-neighbours vote, exact and out of core, with scikit-learn's API.

    ``fit`` only keeps a reference to the training set (an array, a dask or Zarr
    array, a Dataset or a URL) and its labels; ``predict`` streams the training set
    with :func:`kneighbors` and votes as scikit-learn's ``KNeighborsClassifier``
    (ties to the lowest class; ``weights="distance"`` gives neighbours at distance 0
    all the weight).  ``predict``, ``predict_proba`` and ``score`` on the same input
    share one k-NN pass (:meth:`_neighbors`).

    Parameters
    ----------
    n_neighbors : int, default 5
    weights : {"uniform", "distance"}, default "uniform"
    memory_budget : int or str, optional
    metric : {"euclidean", "sqeuclidean", "cosine", "ip", "manhattan"}, default "euclidean"
        See :func:`kneighbors`.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_samples_fit_ : int
    n_features_in_ : int
    effective_metric_ : str

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> X = np.array([[0.0], [1.0], [10.0], [11.0]])
    >>> clf = pl.KNeighborsClassifier(n_neighbors=3).fit(X, [0, 0, 1, 1])
    >>> clf.predict(np.array([[0.5], [10.5]])).tolist()
    [0, 1]
    """

    _estimator_type = "classifier"
    _requires_y = True

    def fit(self, X, y=None):
        """Remember the training set and its labels (no pass over the data).

        Parameters
        ----------
        X : array-like of shape (n_train, n_features), Dataset or URL
        y : array-like of shape (n_train,), optional
            Labels (strings or whole numbers; a column vector (n_train, 1) is raveled
            with a ``DataConversionWarning``); a Dataset or URL with labels ``y``
            provides its own.

        Returns
        -------
        self
        """
        source, y = self._fit_targets(X, y, "labels")
        classes, codes = as_classes(y, source.shape[0])
        self._fit_set(X)
        self.classes_, self._y = classes, codes
        return self

    def _vote(self, X):
        self._check_fitted()
        dist, ind = self.kneighbors(X)
        return _topk.vote(self._y[ind], dist, self.classes_, self.weights)

    def predict(self, X):
        """Predicted class of every query row, shape (n_query,)."""
        return self._vote(X)[0]

    def predict_proba(self, X):
        """Class probabilities, shape (n_query, n_classes), columns in ``classes_`` order."""
        return self._vote(X)[1]

    def score(self, X, y):
        """Mean accuracy of ``predict(X)`` against ``y``."""
        pred = self.predict(X)
        return float(np.mean(pred == as_labels(y, pred.shape[0])))


class KNeighborsRegressor(_Supervised):
    """k-nearest-neighbours regression, exact and out of core, with scikit-learn's API.

    The prediction is the mean of the neighbours' targets, or with
    ``weights="distance"`` their mean weighted by 1 / distance (neighbours at
    distance 0 get all the weight), as scikit-learn's ``KNeighborsRegressor``.  ``y``
    may have several outputs, shape (n_train, n_outputs); it is held in memory.

    Parameters
    ----------
    n_neighbors : int, default 5
    weights : {"uniform", "distance"}, default "uniform"
    memory_budget : int or str, optional
    metric : {"euclidean", "sqeuclidean", "cosine", "ip", "manhattan"}, default "euclidean"

    Attributes
    ----------
    n_samples_fit_ : int
    n_features_in_ : int
    effective_metric_ : str

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> reg = pl.KNeighborsRegressor(n_neighbors=2).fit(np.array([[0.0], [1.0], [10.0]]), [0.0, 1.0, 5.0])
    >>> reg.predict(np.array([[0.4]])).tolist()
    [0.5]
    """

    _estimator_type = "regressor"
    _requires_y = True

    def __sklearn_tags__(self):
        """scikit-learn's tags of a regressor, multi-output."""
        tags = super().__sklearn_tags__()
        # y of shape (n_train, n_outputs) is fitted and predicted as it is (each output
        # the mean over the same neighbours), not raveled: scikit-learn then checks
        # multi-output prediction (check_regressor_multioutput) and expects no
        # column-vector warning for y of shape (n, 1) (check_supervised_y_2d).
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y=None):
        """Remember the training set and its targets (no pass over the data).

        Parameters
        ----------
        X : array-like of shape (n_train, n_features), Dataset or URL
        y : array-like of shape (n_train,) or (n_train, n_outputs)
            Targets; a Dataset or URL with ``y`` provides its own.

        Returns
        -------
        self
        """
        source, y = self._fit_targets(X, y, "targets")
        self._y = as_targets(y, source.shape[0])
        self._fit_set(X)
        return self

    def predict(self, X):
        """Predicted targets, shape (n_query,) or (n_query, n_outputs) as ``y`` in fit."""
        self._check_fitted()
        dist, ind = self.kneighbors(X)
        return _topk.regress(self._y[ind], dist, self.weights)

    def score(self, X, y):
        """R² of ``predict(X)`` against ``y``, averaged over outputs (scikit-learn's ``r2_score``)."""
        pred = self.predict(X)
        return _topk.r2(as_targets(y, pred.shape[0]), pred)


# ----------------------------------------------------------------------------- store

_PIECES = 8  # a resumable k-NN job is cut into at most this many query pieces ...
# ... of at least this many rows (see write_knn): each piece reads the training set
# again, and a float32 row of it costs about as much to read (~2 GB/s) as ~150 query
# rows cost to rank against it (~150 GFLOP/s); 2048 keeps the re-read under ~10%.
_PIECE_ROWS = 2048


def _piece_rows(n_query, query_rows):
    """Query rows per resumable piece of :func:`write_knn`.

    Each piece is one complete k-NN pass over the training set whose outputs are one
    Zarr chunk, recorded as done once written: a crash costs at most the piece in
    flight.  The plan's own query blocks are kept when they are smaller (the training
    set is then read once per block anyway); otherwise the queries are cut into at most
    ``_PIECES`` pieces, so a long job is resumable at the price of reading the training
    set up to ``_PIECES`` times (the GEMM work is the same), with pieces of at least
    ``_PIECE_ROWS`` queries so that the re-reads stay a small part of the work.
    """
    return int(min(n_query, query_rows, max(_PIECE_ROWS, math.ceil(n_query / _PIECES))))


def _absolute_rows(error, offset):
    """An InputError of a piece in the CLI's words: QUERY rows renumbered as rows of the whole set, TRAIN."""
    import re

    text = str(error)
    if offset and text.startswith("X (the query set)"):
        text = re.sub(r"row\(s\) ([0-9]+(?:, [0-9]+)*)",
                      lambda m: "row(s) " + ", ".join(str(int(r) + offset) for r in m.group(1).split(", ")),
                      text, count=1)
    return InputError(text.replace("X (the query set)", "QUERY", 1).replace("Y (the training set)", "TRAIN", 1))


def write_knn(query, train, out, *, k=5, weights="uniform", memory_budget=None, overwrite=False,
              piece_rows=None, on_block=None, metric="euclidean", graph=None):
    """Exact k-NN of a query dataset in a training dataset, written to a result store.

    Writes ``indices`` int64 (n_query, k), ``distances`` float64 (n_query, k) and,
    when the training set has labels, ``predictions`` (n_query,); when the query set
    has labels too, the accuracy goes into the attributes.  ``metric`` as
    :func:`kneighbors`.  ``graph="connectivity"`` or ``"distance"`` also writes the
    k-NN graph in CSR form, ``graph_data`` (float64), ``graph_indices`` (int64, both
    n_query * k) and ``graph_indptr`` (n_query + 1), each piece's rows as one chunk:
    :func:`load_graph` reads it as a ``scipy.sparse.csr_matrix`` of shape
    (n_query, n_train), the matrix ``kneighbors_graph`` returns.  The queries are processed
    in pieces (:func:`_piece_rows`, or ``piece_rows``), each written as one chunk of
    every output and then recorded in ``_done``; the store is marked complete only
    after every piece is written.  Rerun on the same job's incomplete result (a crash,
    SIGKILL), it keeps the recorded pieces and computes only the others.
    ``on_block((piece,))`` is called after each piece is recorded.

    Returns
    -------
    dict
        A summary for the command line (rows, k, pieces written and kept, accuracy
        when known, output).

    Examples
    --------
    >>> import pipeline as pl                                         # doctest: +SKIP
    >>> pl.neighbors.write_knn("test.zarr", "train.zarr", "knn.zarr")  # doctest: +SKIP
    {'status': 'complete', 'queries': 1000, 'k': 5, 'pieces': 4, ..., 'output': 'knn.zarr'}
    """
    if weights not in ("uniform", "distance"):
        raise InputError(f"weights={weights!r}; choose 'uniform' or 'distance'")
    check_metric(metric)
    if weights == "distance" and metric == "ip":
        raise InputError("weights='distance' needs a distance, and metric='ip' ranks by inner products "
                         "(larger is nearer); use weights='uniform' or metric='cosine'")
    if graph is not None:
        _check_mode(graph)
    qd, td = as_rows(query, "QUERY"), as_rows(train, "TRAIN")
    check_same_features(qd, td)
    k = _check_k(k, td.shape[0], "k")
    n = int(qd.shape[0])
    # The plan first: an impossible budget fails before anything is written.
    p = plan("knn", n_query=n, n_train=td.shape[0], n_features=td.shape[1], k=k,
             itemsize=8 if metric == "manhattan" else max(qd.dtype.itemsize, td.dtype.itemsize),
             memory_budget=memory_budget,
             threads=dask_threads(), train_held=td.kind == "dask")
    # Options at their defaults are left out: results written before they existed keep their job.
    extra = {name: value for name, value, default in (("metric", metric, "euclidean"), ("graph", graph, None))
             if value != default}
    job = job_fingerprint(op="knn", query=qd.identity(), train=td.identity(), k=k, weights=weights, **extra)
    with ResultWriter(out, "neighbors", job, overwrite=overwrite, resume=True, on_block=on_block) as result:
        if result.status == "complete":
            attrs = result.attrs
            summary = {"status": "already complete (same job); nothing to do", "queries": attrs.get("n_query"),
                       "k": k}
            if "accuracy" in attrs:
                summary["accuracy"] = attrs["accuracy"]
            return {**summary, "output": str(out)}
        ytrain = td.dataset.y_zarr if td.dataset is not None else None
        classes = enc = None
        if ytrain is not None:
            classes, enc = np.unique(np.asarray(ytrain[...]), return_inverse=True)
        if "indices" in result.group:
            rows = int(result.group["indices"].chunks[0])  # the pieces the result was started with
        else:
            rows = min(int(piece_rows), p["query_rows"]) if piece_rows else _piece_rows(n, p["query_rows"])
        outputs = {"indices": result.array("indices", (n, k), (rows, k), np.int64),
                   "distances": result.array("distances", (n, k), (rows, k), np.float64)}
        if classes is not None:
            outputs["predictions"] = result.array("predictions", (n,), (rows,), classes.dtype)
        if graph is not None:
            outputs["graph_data"] = result.array("graph_data", (n * k,), (rows * k,), np.float64)
            outputs["graph_indices"] = result.array("graph_indices", (n * k,), (rows * k,), np.int64)
            # indptr[i] = i k: piece p writes rows [a, b) of it, one chunk; the last entry, n k,
            # is written with the completion.
            outputs["graph_indptr"] = result.array("graph_indptr", (n + 1,), (rows,), np.int64)
        n_pieces = math.ceil(n / rows)
        todo = result.pending((n_pieces,))
        for (piece,) in todo:
            a, b = piece * rows, min(n, (piece + 1) * rows)
            try:
                if n_pieces == 1:
                    dist, ind = kneighbors(qd, td, k, memory_budget=memory_budget, metric=metric)
                else:  # each piece: one query block, read in its tasks
                    dist, ind = kneighbors(qd.rows(a, b), td, k, memory_budget=memory_budget, metric=metric,
                                           query_rows=b - a if qd.kind == "zarr" else None)
            except InputError as e:
                raise _absolute_rows(e, a) from None
            blocks = {"indices": ind, "distances": dist}
            if classes is not None:
                blocks["predictions"] = _topk.vote(enc[ind], dist, classes, weights)[0]
            if graph is not None:
                blocks["graph_data"] = np.ones(ind.size) if graph == "connectivity" else dist.ravel()
                blocks["graph_indices"] = ind.ravel()
            for name, block in blocks.items():
                if name.startswith("graph_"):
                    outputs[name][a * k:b * k] = block
                else:
                    outputs[name][a:b] = block
            if graph is not None:
                outputs["graph_indptr"][a:b] = np.arange(a, b, dtype=np.int64) * k
            result.record((piece,))
        summary = {"status": "complete (resumed)" if len(todo) < n_pieces else "complete",
                   "queries": n, "k": k, "pieces": n_pieces, "pieces_written": len(todo),
                   "pieces_kept": n_pieces - len(todo)}
        attrs = {"n_query": n, "n_train": int(td.shape[0]), "k": k, "weights": weights, "metric": metric}
        if graph is not None:
            outputs["graph_indptr"][n] = n * k
            attrs.update(graph=graph, graph_shape=[n, int(td.shape[0])])
            summary["graph"] = f"{graph}, {n} x {int(td.shape[0])}, {n * k} entries"
        yq = qd.dataset.y_zarr if qd.dataset is not None else None
        if classes is not None and yq is not None:
            acc = float(np.mean(outputs["predictions"][...] == np.asarray(yq[...])))
            attrs["accuracy"] = acc
            summary["accuracy"] = round(acc, 6)
        result.complete(**attrs)
    return {**summary, "output": str(out)}


def load_graph(url):
    """The k-NN graph a ``pipeline knn --graph`` result holds, as a ``scipy.sparse.csr_matrix``.

    Loads ``graph_data``, ``graph_indices`` and ``graph_indptr`` (16 bytes per
    entry); for more than fits, read slices of those arrays from the store instead.

    Parameters
    ----------
    url : str or Path
        The OUT of ``pipeline knn QUERY TRAIN OUT --graph connectivity|distance``.

    Returns
    -------
    scipy.sparse.csr_matrix of shape (n_query, n_train)

    Raises
    ------
    InputError
        The store is not a k-NN result, or was written without a graph.
    DataError
        The result is incomplete (rerun the command that writes it).
    """
    import scipy.sparse as sp

    from .store.results import open_result

    group = open_result(url, "neighbors")
    attrs = dict(group.attrs.get("pipeline", {}))
    if "graph" not in attrs:
        raise InputError(f"{url} holds no graph; write it with: pipeline knn QUERY TRAIN OUT --graph connectivity")
    shape = tuple(int(v) for v in attrs["graph_shape"])
    return sp.csr_matrix((group["graph_data"][...], group["graph_indices"][...], group["graph_indptr"][...]),
                         shape=shape)
