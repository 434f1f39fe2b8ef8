"""Exact neighbours out of core: the k-NN and radius-query graphs, :func:`kneighbors`, :func:`radius_neighbors`.

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

from ..budget import align_rows, cost_knn, format_bytes, parse_budget, plan
from ..errors import BudgetError, InputError
from ..inputs import as_rows, check_metric, check_same_features, rows_of
from ..kernels import topk as _topk
from ..runtime import compute, dask_threads, delayed_of, reduce_tree, thread_buffers, thread_work

__all__ = ["kneighbors", "radius_neighbors", "check_k", "check_radius", "check_mode", "radius_csr", "ragged"]

_SPLIT_EVERY = 8  # tree width of the merge (budget.cost_knn counts these partials)


# ------------------------------------------------------------------------ validation

def check_k(k, n_train, name="n_neighbors"):
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
    k = check_k(k, Y.shape[0])
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


def radius_csr(X, Y, radius, metric, memory_budget, split_every=None):
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


def check_radius(radius, metric="euclidean"):
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
    indptr, ind, keys = radius_csr(X, Y, check_radius(radius, metric), metric, memory_budget)
    return ragged(indptr, ind, _topk.distances_from_keys(keys, metric), return_distance)


def ragged(indptr, ind, dist, return_distance):
    """CSR rows as scikit-learn's object arrays of per-row arrays."""
    n = indptr.size - 1
    out_i = np.empty(n, dtype=object)
    out_i[:] = np.split(ind, indptr[1:-1])
    if not return_distance:
        return out_i
    out_d = np.empty(n, dtype=object)
    out_d[:] = np.split(dist, indptr[1:-1])
    return out_d, out_i

def check_mode(mode):
    if mode not in ("connectivity", "distance"):
        raise InputError(f"mode={mode!r}; choose 'connectivity' or 'distance'")
