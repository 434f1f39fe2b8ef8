"""Exact k nearest neighbours out of core: streaming top-k, kneighbors, a classifier.

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
from .inputs import as_labels, as_rows, check_same_features, rows_of
from .kernels import topk as _topk
from .runtime import compute, dask_threads, delayed_of, reduce_tree, thread_buffers, thread_work
from .store.results import ResultWriter, job_fingerprint

__all__ = ["kneighbors", "KNeighborsClassifier", "write_knn"]

_SPLIT_EVERY = 8  # tree width of the merge (budget.cost_knn counts these partials)


# ------------------------------------------------------------------------ validation

def _check_k(k, n_train, name="n_neighbors"):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"{name}={k!r} must be a whole number between 1 and the training set size ({n_train})")
    if k < 1 or k > n_train:
        raise InputError(
            f"{name}={k} is out of range: it must be between 1 and the number of training rows ({n_train})"
        )
    return int(k)


def _arrays(X, Y, memory_budget, k, query_rows=None, train_rows=None):
    """Open both sets, validate them and plan their blocks.

    Returns ``(X, Y, k, plan, query_blocks, train_blocks)``: the sets as row sources
    (:class:`pipeline.inputs.RowSource`), the blocks as ``(start, stop)`` row ranges.
    """
    X, Y = as_rows(X, "X"), as_rows(Y, "Y")
    check_same_features(X, Y)
    k = _check_k(k, Y.shape[0])
    itemsize = max(X.dtype.itemsize, Y.dtype.itemsize)
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


def _prepare(value, a, b, shift, start):
    """Task: one query block, prepared once for every training block."""
    with _named("X (the query set)"):
        return _topk.prepare_queries(rows_of(value, a, b), shift, offset=start)


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


def _exact_part(qvalue, qa, qb, value, a, b, start, *, k, step=None):
    """Task of the exact fallback: exact differences against every training row, a step at a time."""
    X = rows_of(qvalue, qa, qb)
    parts = [_topk.exact_topk_block(X, rows, k, start + s) for s, rows in _steps(value, a, b, step or b - a,
                                                                                    thread_work())]
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
                   step=None):
    """Lazy (n_query,) record array of (dist, idx, ok): block tasks and a merge tree.

    ``X``, ``Y``: row sources; ``query_blocks``, ``train_blocks``: ``(a, b)`` row
    ranges.  Tasks are named ``pipeline-knn-<stage>`` (dashboard, Prometheus).
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
        task = partial(_exact_part, k=k, step=step)
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
        # and never more than a step's read (the plan's budget for a read).
        shift = (f"pipeline-knn-shift-{tok}",)
        value, a, b = ys[0]
        dsk[shift] = (_shift_task, value, a, min(b, a + 1024, a + 2 * (step or 512)))
        task = partial(_part, k=k, margin=margin, call=call, step=step)
        for i, (xq, (qa, _)) in enumerate(zip(xs, query_blocks)):
            q = (f"pipeline-knn-query-{tok}", i)
            dsk[q] = (_prepare, *xq, shift, qa)
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


def kneighbors(X, Y, n_neighbors=5, memory_budget=None, return_distance=True, *,
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
        Exact Euclidean distances, ascending (only if ``return_distance``).
    ind : ndarray of shape (n_query, n_neighbors), int64
        Training row indices; equal distances are ordered by index, and among rows
        tied at the k-th distance the lower indices are returned.

    Raises
    ------
    InputError
        Feature counts that differ, ``n_neighbors`` outside 1..n_train, an empty set,
        or NaN / inf values (the message names the rows).

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> Y = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    >>> dist, ind = pl.kneighbors(np.array([[0.9, 0.0]]), Y, n_neighbors=2)
    >>> ind.tolist(), np.round(dist, 3).tolist()
    ([[1, 0]], [[0.1, 0.9]])
    """
    X, Y, k, p, qblocks, tblocks = _arrays(X, Y, memory_budget, n_neighbors, query_rows, train_rows)
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, np.integer))
                               or margin < 0):
        raise InputError(f"margin={margin!r} must be a whole number >= 0")
    margin = _default_margin(k) if margin is None else int(margin)
    split_every = max(2, int(split_every or _SPLIT_EVERY))
    with thread_buffers():
        dist, ind = _kneighbors(X, Y, k, margin, split_every, qblocks, tblocks, p["step"])
    dist = np.sqrt(dist)
    return (dist, ind) if return_distance else ind


def _kneighbors(X, Y, k, margin, split_every, qblocks, tblocks, step=None):
    """Squared exact distances and indices: the main pass, then the fallbacks."""
    calls = [uuid.uuid4().hex, uuid.uuid4().hex]  # the main pass's and the wide pass's boards
    try:
        return _passes(X, Y, k, margin, split_every, qblocks, tblocks, calls, step)
    finally:
        for call in calls:
            _drop_boards(call)


def _passes(X, Y, k, margin, split_every, qblocks, tblocks, calls, step=None):
    common = dict(split_every=split_every, train_blocks=tblocks, step=step)
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


# ------------------------------------------------------------------------ classifier

class KNeighborsClassifier(BaseEstimator):
    """k-nearest-neighbours vote, exact and out of core, with scikit-learn's API.

    ``fit`` only keeps a reference to the training set (an array, a dask or Zarr
    array, a Dataset or a URL) and its labels; ``predict`` streams the training set
    with :func:`kneighbors` and votes as scikit-learn's ``KNeighborsClassifier``
    (ties to the lowest class; ``weights="distance"`` gives neighbours at distance 0
    all the weight).

    Parameters
    ----------
    n_neighbors : int, default 5
    weights : {"uniform", "distance"}, default "uniform"
    memory_budget : int or str, optional

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_samples_fit_ : int
    n_features_in_ : int

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

    def __init__(self, n_neighbors=5, weights="uniform", memory_budget=None):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.memory_budget = memory_budget

    def _validate_params(self):
        if self.weights not in ("uniform", "distance"):
            raise InputError(f"weights={self.weights!r}; choose 'uniform' or 'distance'")
        if isinstance(self.n_neighbors, bool) or not isinstance(self.n_neighbors, (int, np.integer)) \
                or self.n_neighbors < 1:
            raise InputError(f"n_neighbors={self.n_neighbors!r} must be a whole number >= 1")

    def fit(self, X, y=None):
        """Remember the training set and its labels (no pass over the data).

        Parameters
        ----------
        X : array-like of shape (n_train, n_features), Dataset or URL
        y : array-like of shape (n_train,), optional
            Labels; a Dataset or URL with labels ``y`` provides its own.

        Returns
        -------
        self
        """
        self._validate_params()
        Xd = as_rows(X, "X")
        src = Xd.dataset if Xd.dataset is not None else X  # a URL is opened once
        if y is None and Xd.dataset is not None and Xd.dataset.y_zarr is not None:
            y = Xd.dataset
        if y is None:
            raise InputError(
                "KNeighborsClassifier requires y to be passed, but the target y is None: pass the training "
                "labels, or a dataset that holds labels 'y'"
            )
        labels = as_labels(y, Xd.shape[0])
        _check_k(self.n_neighbors, Xd.shape[0])
        self.classes_, self._y = np.unique(labels, return_inverse=True)
        self._fit_X = src
        self.n_samples_fit_ = int(Xd.shape[0])
        self.n_features_in_ = int(Xd.shape[1])
        return self

    def _check_fitted(self):
        if not hasattr(self, "classes_"):
            raise sklearn_flavoured(NotFittedError, "NotFittedError")(
                "This KNeighborsClassifier instance is not fitted yet; call fit(X, y) first")

    def kneighbors(self, X, n_neighbors=None, return_distance=True):
        """Exact neighbours of ``X`` in the training set (see :func:`kneighbors`)."""
        self._check_fitted()
        source = as_rows(X, "X")
        if source.shape[1] != self.n_features_in_:
            raise InputError(f"X has {source.shape[1]} features, but KNeighborsClassifier is expecting "
                             f"{self.n_features_in_} features as input (as in fit)")
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        return kneighbors(X, self._fit_X, k, memory_budget=self.memory_budget,
                          return_distance=return_distance)

    def _vote(self, X):
        self._check_fitted()
        self._validate_params()
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
              piece_rows=None, on_block=None):
    """Exact k-NN of a query dataset in a training dataset, written to a result store.

    Writes ``indices`` int64 (n_query, k), ``distances`` float64 (n_query, k) and,
    when the training set has labels, ``predictions`` (n_query,); when the query set
    has labels too, the accuracy goes into the attributes.  The queries are processed
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
    qd, td = as_rows(query, "QUERY"), as_rows(train, "TRAIN")
    check_same_features(qd, td)
    k = _check_k(k, td.shape[0], "k")
    n = int(qd.shape[0])
    # The plan first: an impossible budget fails before anything is written.
    p = plan("knn", n_query=n, n_train=td.shape[0], n_features=td.shape[1], k=k,
             itemsize=max(qd.dtype.itemsize, td.dtype.itemsize), memory_budget=memory_budget,
             threads=dask_threads(), train_held=td.kind == "dask")
    job = job_fingerprint(op="knn", query=qd.identity(), train=td.identity(), k=k, weights=weights)
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
        n_pieces = math.ceil(n / rows)
        todo = result.pending((n_pieces,))
        for (piece,) in todo:
            a, b = piece * rows, min(n, (piece + 1) * rows)
            try:
                if n_pieces == 1:
                    dist, ind = kneighbors(qd, td, k, memory_budget=memory_budget)
                else:  # each piece: one query block, read in its tasks
                    dist, ind = kneighbors(qd.rows(a, b), td, k, memory_budget=memory_budget,
                                           query_rows=b - a if qd.kind == "zarr" else None)
            except InputError as e:
                raise _absolute_rows(e, a) from None
            blocks = {"indices": ind, "distances": dist}
            if classes is not None:
                blocks["predictions"] = _topk.vote(enc[ind], dist, classes, weights)[0]
            for name, block in blocks.items():
                outputs[name][a:b] = block
            result.record((piece,))
        summary = {"status": "complete (resumed)" if len(todo) < n_pieces else "complete",
                   "queries": n, "k": k, "pieces": n_pieces, "pieces_written": len(todo),
                   "pieces_kept": n_pieces - len(todo)}
        attrs = {"n_query": n, "n_train": int(td.shape[0]), "k": k, "weights": weights}
        yq = qd.dataset.y_zarr if qd.dataset is not None else None
        if classes is not None and yq is not None:
            acc = float(np.mean(outputs["predictions"][...] == np.asarray(yq[...])))
            attrs["accuracy"] = acc
            summary["accuracy"] = round(acc, 6)
        result.complete(**attrs)
    return {**summary, "output": str(out)}
