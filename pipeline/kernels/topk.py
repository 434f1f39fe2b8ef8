"""Top-k selection, merging, exact re-ranking and voting on blocks: pure NumPy.

Neighbour lists are ordered by the key ``(distance, global index)``: ascending
distance, ties to the lower training index.  Because that order is total (indices
are unique), :func:`merge_topk` is associative and commutative, so a tree reduction
gives the same lists whatever the chunking or the shape of the tree.

The streaming k-NN (:func:`knn_steps`, :func:`knn_block`) walks a training block in
steps of a few MiB.  Per step the GEMM of the working dtype ranks every row
approximately; the first step keeps each query's ``k + margin`` best candidates, later
steps only the rows whose rounding-error lower bound can still beat the query's
current k-th exact distance.  Candidates are re-ranked with exact float64 differences
and merged into running lists of the best ``k`` by exact distance.  Each partial list
also carries ``bound``: a lower bound on the exact distance of every row a rank cut
dropped (the largest kept approximate distance minus a rounding-error bound); rows
dropped by the threshold are provably worse than ``k`` listed rows and need none.
After the last merge a row whose k-th exact distance lies strictly below its bound is
certified exact; the few others (exact or near ties across the margin) are recomputed
by :func:`exact_topk_block` with exact differences against every training row.

Other metrics rank by other keys (:data:`KEYS`): the negated inner product (``"ip"``)
and the negated cosine similarity (``"cosine"``: unit rows) by the same GEMM steps,
with the bound of the product's rounding and an exact float64 re-rank of products;
``"manhattan"`` by exact L1 blocks (no GEMM).  :func:`radius_steps` keeps every row
whose exact key is within a radius instead of the ``k`` best.
"""

from __future__ import annotations

import numpy as np

from .buffers import scratch
from .distances import as_block, row_norms_sq, working_dtype

__all__ = [
    "queries_workspace",
    "steps_workspace",
    "lists_workspace",
    "topk_block",
    "select_smallest",
    "merge_topk",
    "exact_sq_distances",
    "rerank_exact",
    "prepare_queries",
    "knn_block",
    "knn_steps",
    "step_rows",
    "exact_sq_pairs",
    "exact_topk_block",
    "exact_ip_pairs",
    "exact_keys",
    "check_metric",
    "KEYS",
    "metric_key",
    "distances_from_keys",
    "key_of_radius",
    "merge_knn",
    "uncertified",
    "record_dtype",
    "knn_records",
    "NonFiniteRows",
    "BallTooLarge",
    "radius_steps",
    "finite_mean",
    "vote",
    "neighbour_weights",
    "regress",
    "r2",
]


class NonFiniteRows(ValueError):
    """A block holds rows with NaN or inf (or values too large to square).

    ``rows`` are their global indices.
    """

    def __init__(self, rows):
        self.rows = np.asarray(rows, dtype=np.int64)
        super().__init__(f"non-finite values in rows {self.rows[:10].tolist()}")


def _unfit_rows(norms, dtype):
    """Local indices of rows whose squared norm is NaN, inf or too large for ``dtype``.

    A NaN or inf anywhere in a row makes its squared norm NaN or inf: checking the
    (rows,) norms the kernels compute anyway costs nothing extra.  Norms are also kept
    below 1/16 of ``dtype``'s largest value, so that no sum of products in the GEMM
    (at most 2 sqrt(||x||^2 ||y||^2) + ||y||^2 by Cauchy-Schwarz) overflows to inf.
    """
    limit = np.finfo(dtype).max / 16
    ok = norms <= limit  # False for NaN
    return np.flatnonzero(~ok) if not ok.all() else np.empty(0, np.int64)


def _check_finite(norms, offset, dtype=np.float64):
    bad = _unfit_rows(norms, dtype)
    if bad.size:
        raise NonFiniteRows(bad + int(offset))

# The ranking keys of the k-NN kernels, smallest first (ties to the lower index):
# squared Euclidean distance; the negated inner product (largest products first);
# the negated cosine similarity, with a zero row at similarity 0 to everything
# (scikit-learn's normalize leaves it zero); the L1 distance.
KEYS = ("sqeuclidean", "ip", "cosine", "manhattan")

# Bytes of gathered candidate rows (rows x candidates x features, float64) re-ranked
# at once: a few MiB, inside the CPU caches.
_RERANK_BYTES = 2 * 2**20
# Query rows selected at once by argpartition (its index array is rows x block width).
_SELECT_ROWS = 64
# Columns per group whose minimum gives select_smallest its threshold.
_GROUP = 32
# Bytes of a k-NN step's buffers (rows as read, centred, ranking block): see step_rows,
# the widest step; a plan on a small budget takes narrower ones (budget.plan "step").
STEP_BYTES = 32 * 2**20
# Index of an empty slot of a running neighbour list (sorts after every real row).
_NO_ROW = np.iinfo(np.int64).max


def _sort_lists(dist, idx, k):
    """Sort each row of (dist, idx) by (dist, idx) and keep the first k columns."""
    order = np.lexsort((idx, dist), axis=-1)[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


def topk_block(D, k, offset=0):
    """The ``k`` smallest entries of every row of a distance block.

    Parameters
    ----------
    D : ndarray of shape (n_rows, n_cols)
        Distances of ``n_rows`` queries to the training rows ``offset ... offset + n_cols - 1``.
    k : int
        Neighbours wanted; a block narrower than ``k`` returns all its columns.
    offset : int
        Global index of the block's first column.

    Returns
    -------
    dist : ndarray of shape (n_rows, min(k, n_cols))
        Ascending; ties ordered by index.
    idx : ndarray of shape (n_rows, min(k, n_cols)), int64
        Global column indices (local + offset); among equal distances the lower
        indices are the ones kept.

    Examples
    --------
    >>> topk_block(np.array([[3.0, 1.0, 1.0, 0.5]]), 2, offset=10)
    (array([[0.5, 1. ]]), array([[13, 11]]))
    """
    D = np.asarray(D)
    n, m = D.shape
    k = int(min(k, m))
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if k == m:
        part = np.broadcast_to(np.arange(m, dtype=np.int64), (n, m)).copy()
    else:
        part = np.argpartition(D, k - 1, axis=1)[:, :k].astype(np.int64, copy=False)
        # argpartition chooses arbitrarily among entries equal to the k-th value.
        # Rows where such ties straddle the cut are redone with a stable sort, which
        # keeps the lower indices; elsewhere the partition is already the answer.
        kth = np.take_along_axis(D, part, 1).max(axis=1)
        tied = np.flatnonzero(np.count_nonzero(D <= kth[:, None], axis=1) > k)
        if tied.size:
            part[tied] = np.argsort(D[tied], axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(D, part, 1)
    idx = part + np.int64(offset)
    return _sort_lists(dist, idx, k)


def merge_topk(a, b, k):
    """Merge two neighbour lists of the same queries, keeping the best ``k``.

    Associative and commutative: the result is the ``k`` smallest ``(dist, idx)``
    pairs of the union, ordered the same way, whatever the order of merging.

    Parameters
    ----------
    a, b : tuple (dist, idx) of ndarrays of shape (n_rows, k_a) / (n_rows, k_b)
    k : int

    Returns
    -------
    tuple (dist, idx) of shape (n_rows, min(k, k_a + k_b))

    Examples
    --------
    >>> a = (np.array([[1.0, 4.0]]), np.array([[7, 2]]))
    >>> b = (np.array([[1.0, 2.0]]), np.array([[3, 9]]))
    >>> merge_topk(a, b, 3)
    (array([[1., 1., 2.]]), array([[3, 7, 9]]))
    """
    dist = np.concatenate([a[0], b[0]], axis=1)
    idx = np.concatenate([a[1], b[1]], axis=1)
    return _sort_lists(dist, idx, int(k))


def select_smallest(S, n):
    """Column indices of the ``n`` smallest entries of every row (in no order).

    Returns ``(cand, cut)``: ``cand`` (rows, n) indices and ``cut`` (rows,) the n-th
    smallest value, so every column left out is >= ``cut``.  Among entries equal to
    ``cut`` the choice is arbitrary.

    A threshold first: the n-th smallest of the minima of groups of
    ``_GROUP`` columns bounds the row's n-th smallest value from above (n groups hold
    an entry at or below it), and only the few entries at or below it are sorted.
    Two vectorised passes over the block instead of a selection per row, which costs
    several times more on wide rows.

    Examples
    --------
    >>> cand, cut = select_smallest(np.array([[5.0, 1.0, 4.0, 0.0, 3.0]]), 2)
    >>> sorted(cand[0].tolist()), cut.tolist()
    ([1, 3], [1.0])
    """
    S = np.asarray(S)
    rows, m = S.shape
    if n >= m:
        return np.broadcast_to(np.arange(m), (rows, m)).copy(), S.max(axis=1)
    groups = m // _GROUP
    if groups < 4 * n:
        # Narrow rows: argpartition, 64 rows at a time (its int64 index array stays
        # small and in cache).
        cand = np.empty((rows, n), dtype=np.intp)
        for s in range(0, rows, _SELECT_ROWS):
            cand[s:s + _SELECT_ROWS] = np.argpartition(S[s:s + _SELECT_ROWS], n - 1, axis=1)[:, :n]
        return cand, np.take_along_axis(S, cand, 1).max(axis=1)
    # Group j holds the columns j, j + groups, j + 2 groups, ...: the minimum over
    # the middle axis is an elementwise pass over contiguous slices.
    body = groups * _GROUP
    mins = S[:, :body].reshape(rows, _GROUP, groups).min(axis=1)
    if body < m:  # leftover columns are groups of their own
        mins = np.concatenate([mins, S[:, body:]], axis=1)
    thr = np.partition(mins, n - 1, axis=1)[:, n - 1]
    # Only the groups whose minimum is at or below the threshold can hold entries
    # at or below it: about n groups a row, examined column by column.
    rg, jg = np.nonzero(mins <= thr[:, None])
    inner = jg < groups
    cols = jg[inner, None] + groups * np.arange(_GROUP)
    rr = np.broadcast_to(rg[inner, None], cols.shape)
    vals = S[rr, cols]
    keep = vals <= thr[rr]
    r = np.concatenate([rr[keep], rg[~inner]])
    c = np.concatenate([cols[keep], body + jg[~inner] - groups])
    v = np.concatenate([vals[keep], S[rg[~inner], body + jg[~inner] - groups]])
    order = np.lexsort((v, r))  # by row, then value
    counts = np.bincount(r, minlength=rows)  # >= n for every row
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = order[first[:, None] + np.arange(n)]
    return c[pick], v[pick].max(axis=1)


def exact_sq_distances(X, Y, cand):
    """Exact squared distances from each row of ``X`` to its candidate rows of ``Y``.

    Differences of the stored values are taken in float64 (exact for float32 and
    integer data) and squared and summed in float64: no expansion, no cancellation.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    Y : ndarray of shape (n_y, n_features)
    cand : ndarray of shape (n_rows, n_cand), int
        Row indices into ``Y`` for every row of ``X``.

    Returns
    -------
    ndarray of shape (n_rows, n_cand), float64

    Examples
    --------
    >>> exact_sq_distances(np.array([[0.0, 0.0]]), np.array([[1.0, 1.0], [3.0, 4.0]]), np.array([[1, 0]]))
    array([[25.,  2.]])
    """
    cand = np.asarray(cand)
    n, c = cand.shape
    rows = np.repeat(np.arange(n), c)
    return exact_sq_pairs(X, Y, rows, cand.reshape(-1)).reshape(n, c)


def rerank_exact(X, Y, cand, k=None, offset=0):
    """Re-rank candidate neighbours by exact float64 squared distance.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    Y : ndarray of shape (n_y, n_features)
        A training block; ``cand`` indexes its rows.
    cand : ndarray of shape (n_rows, n_cand), int
        Local row indices into ``Y``.
    k : int, optional
        Keep the best ``k`` (default all).
    offset : int
        Global index of ``Y``'s first row.

    Returns
    -------
    dist : ndarray of shape (n_rows, min(k, n_cand)), float64
        Exact squared distances, ascending, ties to the lower index.
    idx : ndarray of shape (n_rows, min(k, n_cand)), int64
        Global indices.

    Examples
    --------
    >>> rerank_exact(np.zeros((1, 2)), np.array([[1.0, 1.0], [0.0, 1.0]]), np.array([[0, 1]]), 1, offset=5)
    (array([[1.]]), array([[6]]))
    """
    cand = np.asarray(cand)
    k = cand.shape[1] if k is None else min(int(k), cand.shape[1])
    dist = exact_sq_distances(X, Y, cand)
    return _sort_lists(dist, cand.astype(np.int64) + np.int64(offset), k)


def prepare_queries(X, shift=None, upcast=False, offset=0, metric="sqeuclidean"):
    """Everything the k-NN blocks need from a query block, computed once.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    shift : ndarray of shape (n_features,), optional
        Centring vector (``"sqeuclidean"`` only: inner products are not translation
        invariant).
    upcast : bool
        GEMM in float64 whatever the data's dtype.
    offset : int
        Global index of the first query.
    metric : {"sqeuclidean", "ip", "cosine", "manhattan"}
        The ranking key (see :data:`KEYS`).

    Returns
    -------
    dict
        ``xm2``: the GEMM operand in the working dtype: ``-2 (X - shift)`` for
        ``"sqeuclidean"`` (the GEMM then yields ``-2 x.y`` with no pass over its
        output; scaling by 2 is exact), ``-X`` for ``"ip"``, ``-X / ||X||`` for
        ``"cosine"``; ``xn``: what the key adds per query to the GEMM's block (the
        squared norms of ``X - shift``, zeros for the inner products); ``xs``: the
        squared norms that scale the GEMM's rounding-error bound; ``x64``: the query
        values as float64 for the exact re-rank (unit rows for ``"cosine"``);
        ``metric``, ``upcast``; ``offset``, the global index of the first query.

    Examples
    --------
    >>> sorted(prepare_queries(np.ones((2, 3), dtype=np.float32)))
    ['metric', 'offset', 'upcast', 'x64', 'xm2', 'xn', 'xs']
    """
    X = np.asarray(X)
    check_metric(metric)
    x64 = np.ascontiguousarray(X, dtype=np.float64)
    if metric == "manhattan":  # exact differences only: no GEMM operand
        _check_finite(row_norms_sq(x64), offset)
        return {"xm2": x64, "xn": np.zeros(X.shape[0]), "xs": np.zeros(X.shape[0]), "x64": x64,
                "metric": metric, "upcast": bool(upcast), "offset": int(offset)}
    if metric == "cosine":
        norms = row_norms_sq(x64)
        _check_finite(norms, offset)
        x64 = x64 if x64 is not X else x64.copy()
        x64 *= _inverse_norms(norms)[:, None]  # zero rows stay zero: scikit-learn's normalize
        xc = x64.astype(working_dtype(X.dtype, upcast))
    else:
        xc = as_block(X, working_dtype(X.dtype, upcast), shift if metric == "sqeuclidean" else None)
        if np.shares_memory(xc, X):  # as_block returns X itself when it can; it is scaled below
            xc = xc.copy()
    xs = row_norms_sq(xc)
    _check_finite(xs, offset, xc.dtype)
    xc *= -2 if metric == "sqeuclidean" else -1
    return {
        "xm2": xc,
        "xn": xs if metric == "sqeuclidean" else np.zeros(X.shape[0]),
        "xs": xs,
        "x64": x64,
        "metric": metric,
        "upcast": bool(upcast),
        "offset": int(offset),
    }


def metric_key(metric):
    """The kernels' ranking key (:data:`KEYS`) of a user's metric.

    ``"euclidean"`` ranks by its square; the others are their own keys.

    Examples
    --------
    >>> metric_key("euclidean"), metric_key("cosine")
    ('sqeuclidean', 'cosine')
    """
    return "sqeuclidean" if metric == "euclidean" else metric


def distances_from_keys(keys, metric):
    """A user's distances from the kernels' ranking keys, float64.

    ``"euclidean"``: the square root; ``"cosine"``: ``1 - cos``, clipped to [0, 2] as
    scikit-learn's ``cosine_distances``; ``"ip"``: the inner products themselves
    (largest first, as FAISS's ``IndexFlatIP`` returns them); others unchanged.

    Examples
    --------
    >>> distances_from_keys(np.array([[-0.5, 4.0]]), "ip")
    array([[ 0.5, -4. ]])
    """
    keys = np.asarray(keys, dtype=np.float64)
    if metric == "euclidean":
        return np.sqrt(keys)
    if metric == "cosine":
        return np.clip(1.0 + keys, 0.0, 2.0)
    if metric == "ip":
        return -keys
    return keys


def key_of_radius(radius, metric):
    """The largest ranking key within ``radius`` of a user's metric (see :func:`distances_from_keys`).

    For ``"ip"`` the radius is the smallest inner product kept.

    Examples
    --------
    >>> key_of_radius(2.0, "euclidean"), key_of_radius(0.25, "cosine")
    (4.0, -0.75)
    """
    radius = float(radius)
    return {"euclidean": radius * radius, "cosine": radius - 1.0, "ip": -radius}.get(metric, radius)


def check_metric(metric):
    """Raise ValueError unless ``metric`` is one of the ranking keys :data:`KEYS`."""
    if metric not in KEYS:
        raise ValueError(f"metric={metric!r}; the k-NN kernels rank by one of {', '.join(KEYS)}")


def _inverse_norms(norms_sq):
    """``1 / sqrt(norms_sq)``, 0 where the norm is 0 (such a row is left as zeros)."""
    norms_sq = np.asarray(norms_sq)
    out = np.zeros(norms_sq.shape, dtype=norms_sq.dtype)
    pos = norms_sq > 0
    out[pos] = 1 / np.sqrt(norms_sq[pos])
    return out


def finite_mean(X):
    """Mean of the rows of ``X`` without NaN or inf, float64, shape (1, n_features).

    The centring shift: any vector near the data will do, but it must be finite, so
    rows a later check will reject are left out (zeros if no row is finite).

    Examples
    --------
    >>> finite_mean(np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, 4.0]]))
    array([[2., 3.]])
    """
    X = np.asarray(X)
    ok = np.isfinite(row_norms_sq(X))
    if not ok.any():
        return np.zeros((1, X.shape[1]))
    sel = X if ok.all() else X[ok]
    return sel.mean(axis=0, dtype=np.float64, keepdims=True)


def _error_bound(dtype, n_features):
    """Relative bound on the rounding error of the expansion in ``dtype``.

    |fl(D) - D| <= (2 gamma_d + 8u) (||x - s||^2 + ||y - s||^2): gamma_d = d u / (1 - d u)
    bounds the dot product (Higham, Thm 3.5, with 2 sum |x_i y_i| <= ||x||^2 + ||y||^2)
    and the training norms summed in the working dtype; 8u the centring in the working
    dtype and the additions.
    """
    u = np.finfo(dtype).eps / 2
    du = n_features * u
    return 2 * du / (1 - du) + 8 * u if du < 0.5 else np.inf


def step_rows(n_query, n_features, itemsize):
    """Training rows per GEMM step of :func:`knn_steps`, for ``n_query`` queries.

    A step's buffers (the rows as read, centred, and the ``(n_query, rows)`` ranking
    block) are kept about ``STEP_BYTES``: small enough that a thread's first use of
    them (page faults, ~1-3 ms per MiB on these VMs) is cheap, wide enough for the
    GEMM to run at full speed (>= 256 columns).  The most a step takes: the k-NN plan
    (``pipeline.plan("knn")["step"]``) narrows it when the budget is small.

    Examples
    --------
    >>> step_rows(1000, 3072, 4)
    1174
    """
    w = max(int(itemsize), 4)
    per_row = n_features * (int(itemsize) + w) + n_query * w
    return int(max(256, STEP_BYTES // max(per_row, 1)))


def queries_workspace(n_query, n_features, itemsize):
    """Bytes :func:`prepare_queries` keeps for a query block, as :class:`Workspace` rows."""
    from .buffers import Workspace

    w = max(int(itemsize), 4)  # working dtype: float64 stays, float32 and integers -> float32
    exact = 8 if int(itemsize) != 8 else 0  # float64 queries are their own float64 copy
    return [Workspace("query block, prepared", n_query * n_features * (w + exact),
                      "centred copy + float64 copy for the exact re-rank")]


def steps_workspace(n_query, step, n_features, itemsize, n_candidates):
    """Bytes one task of :func:`knn_steps` holds for a step of ``step`` training rows.

    The step centred in the working dtype; the ``(n_query, step)`` ranking block and its
    mask; the copy of the ranking rows of the queries cut by rank (at most all of them);
    :func:`select_smallest`'s temporaries (its argpartition path: an index array for
    ``_SELECT_ROWS`` query rows; its threshold path: per candidate about ``_GROUP``
    examined entries, each an index, a value, a threshold and a mask entry); and the
    exact re-rank's buffers (three of gathered rows: ``_RERANK_BYTES``, or the step's
    candidate pairs when fewer, at most ``n_candidates`` a query; and per candidate
    pair its rows, columns, distances and its share of the merged lists).
    """
    from .buffers import Workspace

    w = max(int(itemsize), 4)
    gathered = min(_RERANK_BYTES, n_query * min(n_candidates, step) * n_features * 8)
    argpartition = min(n_query, _SELECT_ROWS) * step * 8
    threshold = n_query * n_candidates * _GROUP * (8 + 2 * w + 1) + n_query * (step // _GROUP + 1) * w
    return [
        Workspace("train step centred", step * n_features * w, f"up to {step} rows per GEMM, working dtype"),
        Workspace("ranking block", n_query * step * (w + 1), "one GEMM: ||y||^2 - 2 x.y, and its mask"),
        Workspace("ranking rows cut by rank", n_query * step * w, "a copy of the rows of queries with too many "
                  "candidates"),
        Workspace("selection", max(argpartition, threshold), "argpartition indices or the threshold pass"),
        Workspace("exact re-rank buffers", 3 * gathered + n_query * n_candidates * 96,
                  "gathered candidates, float64; candidate pairs and their merge"),
    ]


def lists_workspace(n_query, k):
    """Bytes of one running top-k list set (a task's, or a partial in the merge tree)."""
    return n_query * (3 * k * 16 + 16)


def knn_block(queries, Y, k, offset=0, *, margin=3, shift=None, work=None, step=None, board=None):
    """Exact ``k`` nearest rows of a training block for every query.

    The block is ranked in steps of ``step`` rows (:func:`knn_steps`).

    Parameters
    ----------
    queries : dict
        From :func:`prepare_queries` (with the same ``shift``).
    Y : ndarray of shape (n_rows, n_features)
        A training block, in its stored dtype.
    k : int
    offset : int
        Global index of ``Y``'s first row.
    margin : int
        Extra approximate candidates re-ranked exactly when a step is selected by rank.
    shift : ndarray of shape (n_features,), optional
    work : dict, optional
        Scratch buffers kept by the caller between calls (the centred rows and the
        ranking block): reusing them spares the page faults and zeroing of fresh
        allocations per block.
    step : int, optional
        Rows per step (default :func:`step_rows`).
    board : ndarray, optional
        See :func:`knn_steps`.

    Returns
    -------
    dict
        ``dist`` (n_queries, min(k, n_rows)) exact ranking keys (:data:`KEYS`:
        squared distances for ``"sqeuclidean"``), float64, ascending; ``idx`` int64 global indices; ``bound`` (n_queries,) lower bound
        on the exact squared distance of every row that was neither re-ranked nor
        proved worse than ``k`` rows of the block.

    Examples
    --------
    >>> q = prepare_queries(np.zeros((1, 2)))
    >>> part = knn_block(q, np.array([[1.0, 0.0], [5.0, 5.0], [0.0, 2.0]]), 1, offset=3, margin=0)
    >>> part["dist"], part["idx"]
    (array([[1.]]), array([[3]]))
    """
    Y = np.asarray(Y)
    xm2 = queries["xm2"]
    step = int(step or step_rows(xm2.shape[0], Y.shape[1], Y.dtype.itemsize))
    steps = ((offset + s, Y[s:s + step]) for s in range(0, Y.shape[0], step))
    return knn_steps(queries, steps, k, margin=margin, shift=shift, work=work, board=board)


def knn_steps(queries, steps, k, *, margin=3, shift=None, work=None, board=None):
    """Exact ``k`` nearest rows among consecutive training steps, for every query.

    Each step is ranked by one GEMM in the working dtype.  The first step keeps the
    ``k + margin`` best approximate candidates of every query; later steps keep only
    the rows that could still beat the query's current ``k``-th exact distance (its
    rounding-error bound says which cannot), usually a handful a step, since a row
    must be among the best so far to pass.  Kept candidates are re-ranked by exact
    float64 differences and merged into the running lists.  A query with more
    candidates than ``k + margin`` in a step is cut by rank, and its ``bound`` records
    what the cut dropped.  Candidates provably worse than ``k`` others of the same
    step (lower bound above the step's ``k``-th upper bound) are not re-ranked.

    Parameters
    ----------
    queries : dict
        From :func:`prepare_queries`.
    steps : iterable of (int, ndarray)
        ``(offset, rows)``: the global index of the first row and the rows, in their
        stored dtype.  A step's array may be reused by the caller once the next is
        requested.
    k, margin, shift, work
        As :func:`knn_block`.
    board : ndarray of shape (n_queries,), float64, optional
        Shared by the calls that rank other training rows for the same queries: an
        upper bound on every query's k-th exact distance over the whole training set
        (any call's k-th exact distance is one, ``inf`` at first).  Each call lowers it
        as its lists improve and drops the rows it proves worse, so the calls that
        come later re-rank fewer candidates.  A call may then return fewer than ``k``
        real rows for a query (empty slots hold ``inf`` and an index that sorts last);
        the rows it dropped are worse than ``k`` rows another call returns.

    Returns
    -------
    dict
        As :func:`knn_block`.
    """
    metric = queries.get("metric", "sqeuclidean")
    if metric == "manhattan":
        return _exact_steps(queries, steps, k, board=board)
    xm2, xn = queries["xm2"], queries["xn"]
    n = xm2.shape[0]
    k = int(k)
    best_d = np.full((n, k), np.inf)
    best_i = np.full((n, k), _NO_ROW, dtype=np.int64)
    bound = np.full(n, np.inf)
    seen = 0
    big = np.finfo(np.float64).eps * 4
    for offset, Y, S, err in _ranked_steps(queries, steps, shift, work):
        m = Y.shape[0]
        seen += m
        n_cand = min(k + int(margin), m)
        kth = best_d[:, k - 1] if board is None else np.minimum(best_d[:, k - 1], board)
        known = np.isfinite(kth)  # else fewer than k rows known yet: cut by rank
        rows, cols = np.empty(0, np.intp), np.empty(0, np.intp)
        over = np.zeros(n, bool)
        if known.any():
            # A row can still enter the list only if its lower bound S + xn - err is
            # at or below the current k-th exact distance.  The threshold is rounded
            # up (slack for its own rounding, then one ulp of S's dtype): keeping a
            # row too many costs a re-rank, dropping one too many would be wrong.
            # Rows cut by rank get -inf: nothing passes.
            t = kth[known] - xn[known] + err[known]
            t += big * (np.abs(kth[known]) + xn[known] + err[known])
            thr = np.full(n, -np.inf, S.dtype)
            thr[known] = np.nextafter(t.astype(S.dtype), np.inf)
            mask = np.less_equal(S, thr[:, None], out=scratch(work, "mask", S.shape, np.bool_))
            rows, cols = np.divmod(np.flatnonzero(mask), m)  # a handful a row: cheaper than 2-D nonzero
            over = np.bincount(rows, minlength=n) > n_cand  # many: cut by rank instead
            if over.any():
                keep = ~over[rows]
                rows, cols = rows[keep], cols[keep]
        rank = np.flatnonzero(~known | over)
        if rank.size:
            Sr = S if rank.size == n else S[rank]
            if n_cand < m:
                cand, cut = select_smallest(Sr, n_cand)
                # Every dropped row has an approximate distance >= the largest kept
                # one; its exact distance is at least that minus the rounding bound.
                bound[rank] = np.minimum(bound[rank], cut.astype(np.float64) + xn[rank] - err[rank])
            else:
                cand = np.broadcast_to(np.arange(m), (rank.size, m))
            # Candidates whose lower bound exceeds the k-th smallest upper bound among
            # the candidates are worse than k rows of this step: no re-rank.
            s_c = np.take_along_axis(Sr, cand, 1).astype(np.float64)
            kk = min(k, cand.shape[1])
            ub = np.partition(s_c, kk - 1, axis=1)[:, kk - 1] + err[rank]
            r, c = np.nonzero(s_c - err[rank, None] <= ub[:, None])
            rows = np.concatenate([rows, rank[r]])
            cols = np.concatenate([cols, cand[r, c]])
        del S
        if rows.size:
            d = _exact_pairs(queries, Y, rows, cols, work)
            _merge_pairs(best_d, best_i, rows, d, cols.astype(np.int64) + np.int64(offset), k)
            if board is not None:
                # Unlocked: a lost update only leaves a larger, still valid bound.
                np.minimum(board, best_d[:, k - 1], out=board)
    width = min(k, seen)
    return {"dist": best_d[:, :width], "idx": best_i[:, :width], "bound": bound}


def _ranked_steps(queries, steps, shift, work):
    """Per training step, ``(offset, rows, S, err)``: the approximate keys by one GEMM.

    ``S + queries["xn"][:, None]`` is every (query, row) ranking key in the working
    dtype, within ``err[:, None]`` of the exact key.  ``S`` lives in ``work`` and is
    overwritten by the next step.  Rows with NaN, inf or values too large to square
    make the generator raise :class:`NonFiniteRows` once every step has been checked,
    so the error names every bad row.
    """
    metric = queries.get("metric", "sqeuclidean")
    xm2, xs = queries["xm2"], queries.get("xs", queries["xn"])
    euclidean = metric == "sqeuclidean"
    n = xm2.shape[0]
    bad = []
    for offset, Y in steps:
        Y = np.asarray(Y)
        m = Y.shape[0]
        if m == 0:
            continue
        if shift is None and metric != "cosine" and Y.dtype == xm2.dtype and Y.flags.c_contiguous:
            yc = Y
        else:
            yc = scratch(work, "yc", Y.shape, xm2.dtype)
            np.subtract(Y, np.zeros(1) if shift is None or not euclidean
                        else np.asarray(shift).astype(xm2.dtype, copy=False), out=yc, casting="unsafe")
        # In the working dtype (SIMD, a third of the float64 cost); the error bound
        # accounts for it.
        if metric == "cosine":
            # Norms accumulated in float64 (float32 squares of tiny rows underflow), as
            # the exact re-rank's: unit rows in the working dtype, whose rounding is
            # within the bound below, which counts ||y||^2 = 1 for each.
            yn = row_norms_sq(Y)
            unfit = _unfit_rows(yn, np.float64)
        else:
            yn = np.einsum("ij,ij->i", yc, yc)
            unfit = _unfit_rows(yn, yc.dtype)
        if unfit.size or bad:
            # The task fails; its remaining steps are only checked.
            bad.append(unfit + offset)
            continue
        if metric == "cosine":
            yc *= _inverse_norms(yn).astype(yc.dtype)[:, None]
            yn = (yn > 0).astype(np.float64)
        S = np.matmul(xm2, yc.T, out=scratch(work, "S", (n, m), xm2.dtype))
        if euclidean:
            # Ranking within a row needs ||y||^2 - 2 x.y only: the query norm is
            # constant along a row, so it is left out of the (n_queries, m) block.
            S += yn[None, :]
        del yc
        # |approximate - exact| <= err for every entry of the row (exact = S + xn).
        # Plus what underflow can lose: each of the d products by at most the smallest
        # normal number.
        tiny = 2 * Y.shape[1] * float(np.finfo(S.dtype).tiny)
        if euclidean:
            scale = xs + float(yn.max())
        else:
            # |fl(x.y) - x.y| <= gamma_d sum |x_i y_i| <= gamma_d ||x|| ||y|| (Cauchy-Schwarz):
            # tighter than the sum of the squares when the norms differ.
            scale = np.sqrt(xs) * np.sqrt(float(yn.max()))
        yield offset, Y, S, _error_bound(S.dtype, Y.shape[1]) * scale + tiny
    if bad:
        raise NonFiniteRows(np.concatenate(bad))


def _exact_pairs(queries, Y, rows, cols, work=None):
    """Exact keys of the (query, row) pairs ``(rows[p], cols[p])`` of a step, float64."""
    metric = queries.get("metric", "sqeuclidean")
    if metric == "sqeuclidean":
        return exact_sq_pairs(queries["x64"], Y, rows, cols, work)
    return exact_ip_pairs(queries["x64"], Y, rows, cols, work, normalize=metric == "cosine")


def radius_steps(queries, steps, max_key, *, shift=None, work=None, max_pairs=None):
    """Every training row whose exact key is at most ``max_key``, for every query.

    The rows of each step within ``max_key`` plus the rounding-error bound of the
    GEMM (:func:`_ranked_steps`) are re-ranked exactly; those whose exact key is at
    most ``max_key`` are kept (``"manhattan"``: exact keys of every pair).

    Parameters
    ----------
    queries : dict
        From :func:`prepare_queries`.
    steps : iterable of (int, ndarray)
        As :func:`knn_steps`.
    max_key : float
        :func:`key_of_radius` of the radius.
    shift, work
        As :func:`knn_steps`.
    max_pairs : int, optional
        Most (query, row) pairs kept; more raise :class:`BallTooLarge`.

    Returns
    -------
    dict
        ``row`` (local query index), ``idx`` (global training index), ``dist``
        (exact key): one entry per pair found, in no particular order.

    Examples
    --------
    >>> q = prepare_queries(np.zeros((1, 1)))
    >>> radius_steps(q, [(0, np.array([[1.0], [3.0], [0.5]]))], 1.0)["idx"].tolist()
    [0, 2]
    """
    n = queries["x64"].shape[0]
    found = {"row": [], "idx": [], "dist": []}
    total = 0
    manhattan = queries.get("metric") == "manhattan"
    ranked = (_exact_block_steps(queries, steps) if manhattan else _ranked_steps(queries, steps, shift, work))
    big = np.finfo(np.float64).eps * 4
    for offset, Y, S, err in ranked:
        if manhattan:
            mask = np.less_equal(S, max_key, out=scratch(work, "mask", S.shape, np.bool_))
        else:
            t = max_key - queries["xn"] + err
            t += big * (abs(max_key) + queries["xn"] + err)
            thr = np.nextafter(t.astype(S.dtype), np.inf)
            mask = np.less_equal(S, thr[:, None], out=scratch(work, "mask", S.shape, np.bool_))
        # Counted before any pair is gathered: a ball too large fails inside the budget.
        per_row = np.count_nonzero(mask, axis=1)
        if max_pairs is not None and total + int(per_row.sum()) > max_pairs:
            counts = per_row + (np.bincount(np.concatenate(found["row"]), minlength=n) if found["row"] else 0)
            raise BallTooLarge(int(np.argmax(counts)) + queries["offset"], int(counts.max()), int(max_pairs))
        rows, cols = np.divmod(np.flatnonzero(mask), Y.shape[0])
        if manhattan:
            d = S[rows, cols]
        else:
            d = _exact_pairs(queries, Y, rows, cols, work)
            keep = d <= max_key
            rows, cols, d = rows[keep], cols[keep], d[keep]
        total += rows.size
        found["row"].append(rows.astype(np.int64))
        found["idx"].append(cols.astype(np.int64) + np.int64(offset))
        found["dist"].append(d.astype(np.float64))
    return {key: np.concatenate(v) if v else np.empty(0, np.float64 if key == "dist" else np.int64)
            for key, v in found.items()}


def _exact_block_steps(queries, steps):
    """Per step ``(offset, rows, D, 0)``: exact ``"manhattan"`` keys of every pair."""
    bad = []
    for offset, Y in steps:
        Y = np.asarray(Y)
        if Y.shape[0] == 0:
            continue
        unfit = _unfit_rows(row_norms_sq(Y), np.float64)
        if unfit.size or bad:
            bad.append(unfit + offset)
            continue
        yield offset, Y, exact_keys(queries["x64"], Y, "manhattan"), 0.0
    if bad:
        raise NonFiniteRows(np.concatenate(bad))


class BallTooLarge(ValueError):
    """A radius query's ball holds more training rows than its budget lets it keep.

    ``row`` is the global index of the query with the most rows found so far,
    ``count`` how many it had, ``limit`` the pairs allowed for its query block.
    """

    def __init__(self, row, count, limit):
        self.row, self.count, self.limit = int(row), int(count), int(limit)
        super().__init__(f"query row {row} has at least {count} training rows within the radius; "
                         f"its block may keep {limit}")


def _merge_pairs(best_d, best_i, rows, dist, idx, k):
    """Merge (row, dist, idx) triples into the running (n, k) lists, in place."""
    order = np.argsort(rows, kind="stable")
    rows, dist, idx = rows[order], dist[order], idx[order]
    u, start, counts = np.unique(rows, return_index=True, return_counts=True)
    width = int(counts.max())
    D = np.full((u.size, width), np.inf)
    I = np.full((u.size, width), _NO_ROW, dtype=np.int64)
    slot = np.arange(rows.size) - np.repeat(start, counts)
    where = np.repeat(np.arange(u.size), counts)
    D[where, slot] = dist
    I[where, slot] = idx
    d, i = _sort_lists(np.concatenate([best_d[u], D], axis=1), np.concatenate([best_i[u], I], axis=1), k)
    best_d[u], best_i[u] = d, i


def exact_sq_pairs(X, Y, rows, cols, work=None):
    """Exact squared distances between ``X[rows[p]]`` and ``Y[cols[p]]`` for every p.

    Differences of the stored values are taken in float64 (exact for float32 and
    integer data) and squared and summed in float64: no expansion, no cancellation.

    Examples
    --------
    >>> exact_sq_pairs(np.zeros((1, 2)), np.array([[1.0, 1.0], [3.0, 4.0]]), np.array([0, 0]), np.array([1, 0]))
    array([25.,  2.])
    """
    out = np.empty(np.asarray(rows).size, dtype=np.float64)
    for s, e, g, h in _gathered_pairs(X, Y, rows, cols, work):
        g -= h
        # Batched dot of each difference with itself: float64 accumulation.
        out[s:e] = np.matmul(g[:, None, :], g[:, :, None])[:, 0, 0]
    return out


def _gathered_pairs(X, Y, rows, cols, work=None):
    """Per slice ``s:e`` of the pairs, ``(s, e, Y[cols[s:e]], X[rows[s:e]])`` as float64 buffers.

    Slices of about ``_RERANK_BYTES`` of gathered rows (cache sized); the buffers are
    reused by every slice (and, with ``work``, by the next call): fresh allocations of
    a few MiB would each be a new mmap, page-faulted again.  Float32 and integer values
    are exact in float64.
    """
    X, Y = np.asarray(X), np.asarray(Y)
    rows, cols = np.asarray(rows), np.asarray(cols)
    P = rows.size
    if P == 0:
        return
    d = X.shape[1]
    step = int(min(P, max(1, _RERANK_BYTES // max(1, d * 8))))
    G = scratch(work, "pairs_g", (step, d))
    G_in = None if Y.dtype == np.float64 else scratch(work, "pairs_in", (step, d), Y.dtype)
    H = scratch(work, "pairs_h", (step, d))
    # take(mode="clip"): the indices are valid by construction, and the default
    # mode="raise" writes through a temporary copy of the output (a fresh allocation).
    for s in range(0, P, step):
        e = min(s + step, P)
        g, h = G[:e - s], H[:e - s]
        if G_in is None:
            np.take(Y, cols[s:e], axis=0, out=g, mode="clip")
        else:
            np.take(Y, cols[s:e], axis=0, out=G_in[:e - s], mode="clip")
            g[...] = G_in[:e - s]
        if X.dtype == np.float64:
            np.take(X, rows[s:e], axis=0, out=h, mode="clip")
        else:
            h[...] = X[rows[s:e]]
        yield s, e, g, h


def exact_ip_pairs(X, Y, rows, cols, work=None, normalize=False):
    """Exact ranking keys ``-X[rows[p]] . Y[cols[p]]`` for every p, in float64.

    The products of float32 or integer values are exact in float64 and summed in
    float64.  ``normalize=True`` divides each by ``||Y[cols[p]]||`` (0 for a zero
    row): with unit rows ``X`` that is the cosine key ``-cos(x, y)``.

    Examples
    --------
    >>> exact_ip_pairs(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]]), np.array([0]), np.array([0]))
    array([-11.])
    """
    out = np.empty(np.asarray(rows).size, dtype=np.float64)
    for s, e, g, h in _gathered_pairs(X, Y, rows, cols, work):
        dot = np.matmul(g[:, None, :], h[:, :, None])[:, 0, 0]
        if normalize:
            dot *= _inverse_norms(np.matmul(g[:, None, :], g[:, :, None])[:, 0, 0])
        out[s:e] = -dot
    return out


def exact_keys(X, Y, metric="sqeuclidean"):
    """The exact ranking key of every pair of rows, float64, shape (n_x, n_y).

    ``X`` as :func:`prepare_queries` keeps it (``x64``: unit rows for ``"cosine"``),
    ``Y`` as stored.  For few rows only (the always-exact path): cost
    ``n_x * n_y * n_features``, no GEMM.

    Examples
    --------
    >>> exact_keys(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]]), "manhattan")
    array([[7.]])
    """
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y)
    n, m = X.shape[0], Y.shape[0]
    if metric == "manhattan":
        from scipy.spatial.distance import cdist  # compiled and vectorised; loaded only here

        return cdist(X, np.asarray(Y, dtype=np.float64), "cityblock")
    cols = np.broadcast_to(np.arange(m), (n, m)).reshape(-1)
    rows = np.repeat(np.arange(n), m)
    if metric == "sqeuclidean":
        return exact_sq_pairs(X, Y, rows, cols).reshape(n, m)
    return exact_ip_pairs(X, Y, rows, cols, normalize=metric == "cosine").reshape(n, m)


def _exact_steps(queries, steps, k, board=None):
    """:func:`knn_steps` by exact keys only (``"manhattan"``: no GEMM to rank by).

    Each step's (n_queries, rows) block of exact distances is computed at once by
    SciPy's compiled ``cdist`` and its ``k`` best merged into the running lists.
    """
    n, k = queries["x64"].shape[0], int(k)
    best = (np.full((n, k), np.inf), np.full((n, k), _NO_ROW, dtype=np.int64))
    seen = 0
    for offset, Y, D, _ in _exact_block_steps(queries, steps):
        seen += Y.shape[0]
        # _SELECT_ROWS queries at a time: topk_block's index arrays stay that small.
        for r in range(0, n, _SELECT_ROWS):
            part = topk_block(D[r:r + _SELECT_ROWS], k, offset)
            d, i = merge_topk((best[0][r:r + _SELECT_ROWS], best[1][r:r + _SELECT_ROWS]), part, k)
            best[0][r:r + _SELECT_ROWS], best[1][r:r + _SELECT_ROWS] = d, i
    width = min(k, seen)
    return {"dist": best[0][:, :width], "idx": best[1][:, :width], "bound": np.full(n, np.inf)}


def exact_topk_block(X, Y, k, offset=0, metric="sqeuclidean"):
    """The ``k`` nearest rows of a block by exact float64 keys (no GEMM).

    The slow, always-exact path for the few queries whose approximate stage could not
    be certified.  Cost: ``n_rows * n_y * n_features``.

    Returns
    -------
    dict
        As :func:`knn_block`, with ``bound = inf``.

    Examples
    --------
    >>> exact_topk_block(np.zeros((1, 1)), np.array([[2.0], [1.0]]), 1)["idx"]
    array([[1]])
    """
    X = np.asarray(X)
    if metric == "cosine":  # unit query rows, as prepare_queries keeps them
        X = np.asarray(X, dtype=np.float64) * _inverse_norms(row_norms_sq(X))[:, None]
    n, m = X.shape[0], np.asarray(Y).shape[0]
    D = np.empty((n, m))
    for s in range(0, m, 256):
        e = min(s + 256, m)
        D[:, s:e] = exact_keys(X, Y[s:e], metric)
    dist, idx = topk_block(D, k, offset)
    return {"dist": dist, "idx": idx, "bound": np.full(n, np.inf)}


def merge_knn(a, b, k):
    """Merge two partial results of :func:`knn_block` (associative, commutative).

    Examples
    --------
    >>> a = {"dist": np.array([[1.0]]), "idx": np.array([[4]]), "bound": np.array([3.0])}
    >>> b = {"dist": np.array([[1.0]]), "idx": np.array([[2]]), "bound": np.array([2.0])}
    >>> merge_knn(a, b, 1)["idx"], merge_knn(a, b, 1)["bound"]
    (array([[2]]), array([2.]))
    """
    dist, idx = merge_topk((a["dist"], a["idx"]), (b["dist"], b["idx"]), k)
    return {"dist": dist, "idx": idx, "bound": np.minimum(a["bound"], b["bound"])}


def uncertified(part):
    """Rows whose k-th exact distance is not strictly below their bound.

    Examples
    --------
    >>> uncertified({"dist": np.array([[1.0], [2.0]]), "bound": np.array([1.5, 2.0])})
    array([1])
    """
    return np.flatnonzero(~(part["dist"][:, -1] < part["bound"]))


def record_dtype(k):
    """The record of one query's result: k distances, k indices, certified flag."""
    return np.dtype([("dist", np.float64, (k,)), ("idx", np.int64, (k,)), ("ok", np.bool_)])


def knn_records(part):
    """A merged partial result as a (n_rows,) record array of :func:`record_dtype`.

    Examples
    --------
    >>> r = knn_records({"dist": np.array([[1.0]]), "idx": np.array([[3]]), "bound": np.array([2.0])})
    >>> r["idx"].tolist(), r["ok"].tolist()
    ([[3]], [True])
    """
    dist, idx = part["dist"], part["idx"]
    k = dist.shape[1]
    rec = np.empty(dist.shape[0], dtype=record_dtype(k))
    rec["dist"] = dist
    rec["idx"] = idx
    rec["ok"] = True
    rec["ok"][uncertified(part)] = False
    return rec


def vote(neighbor_labels, neighbor_dist, classes, weights="uniform"):
    """Class votes of the neighbours, exactly as scikit-learn's KNeighborsClassifier.

    Parameters
    ----------
    neighbor_labels : ndarray of shape (n_rows, k), int
        Encoded labels of the neighbours: indices into ``classes``.
    neighbor_dist : ndarray of shape (n_rows, k) or None
        Euclidean distances (needed for ``weights="distance"``).
    classes : ndarray of shape (n_classes,)
        The sorted class values.
    weights : {"uniform", "distance"}
        ``"distance"`` weighs each neighbour by 1 / distance; a row with neighbours at
        distance 0 gives those weight 1 and the others 0 (scikit-learn's rule).

    Returns
    -------
    predictions : ndarray of shape (n_rows,)
        ``classes[j]`` of the largest vote; ties go to the lowest class index.
    proba : ndarray of shape (n_rows, n_classes), float64

    Examples
    --------
    >>> vote(np.array([[1, 0, 1], [0, 1, 2]]), None, np.array([10, 20, 30]))[0]
    array([20, 10])
    """
    labels = np.asarray(neighbor_labels)
    classes = np.asarray(classes)
    n, k = labels.shape
    C = classes.shape[0]
    rows = np.arange(n)
    if weights == "uniform":
        # scikit-learn (ArgKminClassMode) counts with weight 1.0 and normalises by the
        # row sum; argmax of the counts keeps the first (lowest) class among ties.
        proba = np.zeros((n, C))
        for j in range(k):
            proba[rows, labels[:, j]] += 1.0
        pred = np.argmax(proba, axis=1)
        proba /= proba.sum(axis=1, keepdims=True)
        return classes[pred], proba
    if weights != "distance":
        raise ValueError(f"weights={weights!r}; choose 'uniform' or 'distance'")
    w = neighbour_weights(neighbor_dist, "distance")
    # predict: scikit-learn's weighted_mode sums a masked copy of the weights along
    # each row and keeps the first maximum; same sums, same order, same ties.
    score = np.empty((n, C))
    for c in range(C):
        score[:, c] = np.sum(np.where(labels == c, w, 0.0), axis=1)
    pred = np.argmax(score, axis=1)
    # predict_proba: accumulated neighbour by neighbour, then normalised.
    proba = np.zeros((n, C))
    for j in range(k):
        proba[rows, labels[:, j]] += w[:, j]
    norm = proba.sum(axis=1, keepdims=True)
    norm[norm == 0.0] = 1.0
    proba /= norm
    return classes[pred], proba


def neighbour_weights(dist, weights="uniform"):
    """scikit-learn's neighbour weights: None (uniform) or 1 / distance.

    A row with neighbours at distance 0 gives those weight 1 and the others 0.

    Examples
    --------
    >>> neighbour_weights(np.array([[0.5, 2.0], [0.0, 1.0]]), "distance")
    array([[2. , 0.5],
           [1. , 0. ]])
    """
    if weights == "uniform":
        return None
    with np.errstate(divide="ignore"):
        w = 1.0 / np.asarray(dist, dtype=np.float64)
    inf_mask = np.isinf(w)
    inf_row = inf_mask.any(axis=1)
    w[inf_row] = inf_mask[inf_row]
    return w


def regress(neighbor_targets, neighbor_dist, weights="uniform"):
    """Mean (or 1 / distance weighted mean) of the neighbours' targets, as scikit-learn's regressor.

    Parameters
    ----------
    neighbor_targets : ndarray of shape (n_rows, k) or (n_rows, k, n_outputs)
    neighbor_dist : ndarray of shape (n_rows, k)
    weights : {"uniform", "distance"}

    Returns
    -------
    ndarray of shape (n_rows,) or (n_rows, n_outputs), float64

    Examples
    --------
    >>> regress(np.array([[1.0, 3.0]]), np.array([[1.0, 3.0]]), "distance")
    array([1.5])
    """
    y = np.asarray(neighbor_targets, dtype=np.float64)
    flat = y.ndim == 2
    if flat:
        y = y[:, :, None]
    w = neighbour_weights(neighbor_dist, weights)
    if w is None:
        pred = np.mean(y, axis=1)
    else:
        pred = np.einsum("nko,nk->no", y, w) / np.sum(w, axis=1)[:, None]
    return pred[:, 0] if flat else pred


def r2(y_true, y_pred):
    """scikit-learn's ``r2_score`` (outputs averaged uniformly; a constant target scores 1 if matched, else 0).

    Examples
    --------
    >>> r2(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    0.5
    """
    yt = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    yp = np.asarray(y_pred, dtype=np.float64).reshape(yt.shape)
    num = ((yt - yp) ** 2).sum(axis=0)
    den = ((yt - yt.mean(axis=0)) ** 2).sum(axis=0)
    score = np.ones(yt.shape[1])
    ok = den != 0
    score[ok] = 1 - num[ok] / den[ok]
    score[~ok & (num != 0)] = 0.0
    return float(np.mean(score))
