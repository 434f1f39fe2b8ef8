"""Gaussian-mixture kernels: pure NumPy on one row block (no dask, no I/O).

The maths is scikit-learn's ``GaussianMixture(covariance_type="full")``
(``sklearn/mixture/_gaussian_mixture.py``) rearranged so that one pass over a row
block yields everything an EM iteration needs:

* the E-step with the current parameters ``theta_t`` gives, per row, the weighted
  log-probabilities, their log-sum-exp (summed: the lower bound) and the
  responsibilities ``r``;
* the M-step only needs sufficient statistics of ``r`` and the block, which add up
  over blocks: ``N_k = sum r``, ``S1_k = sum r (x - s_k)`` and
  ``S2_k = sum r (x - s_k)(x - s_k)^T`` around a shift ``s_k`` (the means of
  ``theta_t``).  Accumulating around a shift close to the new mean keeps
  ``cov = S2/N - (m - s)(m - s)^T`` from cancelling catastrophically, which the
  textbook ``E[xx^T] - m m^T`` does when ``|m| >> sigma``.

:func:`params_from_stats` turns the summed statistics into ``theta_{t+1}`` with
scikit-learn's exact formulas (``nk += 10 * eps``, weights ``nk / sum(nk)``,
``reg_covar`` on the diagonal).

Everything is computed in float64: integer and float32 blocks are converted per
block (scikit-learn keeps float32 in float32; our results equal scikit-learn's on
``X.astype(np.float64)``).
"""

from __future__ import annotations

import math

import numpy as np

from .buffers import scratch

__all__ = [
    "PRECISION_ERROR",
    "em_workspace",
    "stats_bytes",
    "compute_precision_cholesky",
    "precision_cholesky_from_precisions",
    "log_det_cholesky",
    "prepare_parameters",
    "estimate_log_gaussian_prob",
    "weighted_log_prob",
    "logsumexp_rows",
    "normalise_rows",
    "em_block_stats",
    "resp_block_stats",
    "weighted_log_prob_sparse",
    "group_log_prob",
    "as_float64",
    "best_lower_bound",
    "mixture_summary",
    "bounds_table",
    "bounds_from_table",
    "combine_stats",
    "params_from_stats",
    "mean_log_likelihood",
]

#: scikit-learn's message (``_compute_precision_cholesky``), word for word, so users
#: searching for it find the same advice.
PRECISION_ERROR = (
    "Fitting the mixture model failed because some components have "
    "ill-defined empirical covariance (for instance caused by singleton "
    "or collapsed samples). Try to decrease the number of components, "
    "increase reg_covar, or scale the input data."
)

_LOG_2PI = math.log(2 * math.pi)

#: Rows processed at once inside a block: keeps the (rows, group*d) GEMM output and
#: the scatter buffer in cache-sized pieces (measured: 2048 rows is ~3x faster than
#: one 25000-row slab at d=64, K=16, whose temporaries are page-faulted every call).
INNER_ROWS = 2048
#: Bytes of one slice's E-step GEMM output (slice rows x group * d) the kernels aim
#: for; wide data get fewer rows per slice and fewer components per GEMM.
#: :func:`em_workspace` counts the buffers these sizes give.
SLICE_BYTES = 2**25
#: Columns of one E-step GEMM (components x features) the kernels aim for: the
#: GEMM's (d + 1, group * d) operand then stays in a core's L2 cache.  Measured at
#: d = 64, K = 16: groups of 1-4 components are ~13% faster per block than one
#: 16-component GEMM, whose 1024-column operand spills out of L2.
GEMM_COLUMNS = 256
#: The fused EM pass skips the (row, component) log-densities that provably cannot
#: change the result (see :func:`_pruned_log_prob`) for data up to this width (the
#: bounds need an SVD of every P_k per iteration); wider data are computed densely.
PRUNE_MAX_FEATURES = 1024
#: A component is skipped for a row when its log-density is provably this far below
#: the row's largest: exp() of anything below -745.14 is exactly 0.0 in float64, so
#: its responsibility, and its share of the log-sum-exp, are exactly zero either way.
PRUNE_GAP = 800.0
#: Slices whose share of (row, component) pairs that cannot be skipped exceeds this
#: are computed densely (one GEMM per component group, no gathers).
PRUNE_DENSE = 0.4
#: The pruned E-step's slices hold up to this many times ``inner_rows`` rows.
PRUNE_SLICE = 4
#: Every row keeps at least one of its K components, so at most 1 - 1/K of the pairs
#: can be skipped: with K = 2 never more than PRUNE_DENSE allows, and the bounds
#: would be computed for nothing.
PRUNE_MIN_COMPONENTS = 3
#: Smallest singular directions of each P_k the lower bound handles apart.
PRUNE_DIRECTIONS = 4


def inner_rows(n_features):
    """Rows per slice for ``n_features`` columns: 2048, fewer for very wide data.

    Examples
    --------
    >>> inner_rows(64), inner_rows(10_000)
    (2048, 419)
    """
    return max(64, min(INNER_ROWS, SLICE_BYTES // (8 * n_features)))


def prune_rows(n_features):
    """Rows per slice of the pruned E-step: PRUNE_SLICE slices, up to SLICE_BYTES of X.

    Examples
    --------
    >>> prune_rows(64), prune_rows(900)
    (8192, 4660)
    """
    inner = inner_rows(n_features)
    return max(inner, min(PRUNE_SLICE * inner, SLICE_BYTES // (8 * n_features)))


def gemm_group(n_components, n_features):
    """Components per E-step GEMM: about GEMM_COLUMNS columns, at least one component.

    Examples
    --------
    >>> gemm_group(16, 64), gemm_group(200, 900)
    (4, 1)
    """
    d = n_features
    return max(1, min(n_components, GEMM_COLUMNS // d, SLICE_BYTES // (inner_rows(d) * d * 8)))


def em_workspace(rows, group, *, n_features, n_components, itemsize, grouped=False):
    """Bytes one task of the EM pass holds for a block of ``rows`` rows, as :class:`Workspace` rows.

    The fused pass (:func:`em_block_stats`) works on slices of :func:`inner_rows` rows
    and batches :func:`gemm_group` components per E-step GEMM; its pruned E-step
    (:func:`_pruned_log_prob`, K >= PRUNE_MIN_COMPONENTS and d <= PRUNE_MAX_FEATURES)
    on slices of :func:`prune_rows` rows with bounds of its own.  A grouped pass (a
    component group of ``group`` < K, :func:`resp_block_stats` on the whole block)
    keeps its responsibilities for the whole block.  The accumulated statistics are
    counted apart (:func:`stats_bytes`): they also live in the reduction tree.
    """
    from .buffers import Workspace

    d, K = n_features, n_components
    inner = min(rows, inner_rows(d))
    gemm = min(group, gemm_group(K, d))
    prune = not grouped and K >= PRUNE_MIN_COMPONENTS and d <= PRUNE_MAX_FEATURES
    big = min(rows, prune_rows(d)) if prune else inner
    items = []
    if itemsize != 8:
        items.append(Workspace("X as float64", 2 * big * d * 8,
                               "converted per slice; the next slice's before the last is freed"))
    items += [
        Workspace("[X 1] slice", inner * (d + 1) * 8, "the GEMM's operand: it subtracts mu_k P_k too"),
        Workspace("X @ [P_1..P_g] slice", inner * gemm * d * 8, f"{inner} rows x {gemm} components per GEMM"),
        Workspace("log-probabilities, responsibilities", 3 * (rows * group if grouped else big * K) * 8, "float64"),
        Workspace("weighted rows", 2 * (rows if grouped else big) * d * 8, "r-selected x - shift, for the scatter syrk"),
    ]
    if prune:
        items.append(Workspace("pruning bounds, gathered rows", big * (9 * K + 2 * d + 1) * 8,
                               f"{big}-row slices: distances to the means, bounds, one component's rows"))
    return items


def stats_bytes(n_components, n_features):
    """Bytes of one set of sufficient statistics N, S1, S2 for ``n_components`` components."""
    d = n_features
    return n_components * (d * d + d + 1) * 8


def as_float64(X):
    """A C-contiguous float64 view or copy of a block (ints and float32 convert)."""
    return np.ascontiguousarray(X, dtype=np.float64)


def compute_precision_cholesky(covariances):
    """Upper-triangular Cholesky factors of the precision matrices.

    ``P_k`` such that ``P_k @ P_k.T = inv(cov_k)``, computed as scikit-learn does:
    ``cov_k = L L^T`` then ``P_k = inv(L)^T``.

    Parameters
    ----------
    covariances : ndarray of shape (n_components, n_features, n_features)

    Returns
    -------
    precisions_cholesky : ndarray of shape (n_components, n_features, n_features)

    Raises
    ------
    ValueError
        When a covariance is not positive definite; the message is scikit-learn's
        (decrease n_components, increase reg_covar or scale the data).

    Examples
    --------
    >>> import numpy as np
    >>> compute_precision_cholesky(np.array([[[4.0, 0.0], [0.0, 1.0]]]))[0]
    array([[0.5, 0. ],
           [0. , 1. ]])
    """
    covariances = np.asarray(covariances, dtype=np.float64)
    K, d, _ = covariances.shape
    eye = np.eye(d)
    out = np.empty_like(covariances)
    for k in range(K):
        try:
            chol = np.linalg.cholesky(covariances[k])
        except np.linalg.LinAlgError:
            raise ValueError(PRECISION_ERROR) from None
        if not np.all(np.isfinite(chol)):
            raise ValueError(PRECISION_ERROR)
        # A triangular solve in LAPACK terms; np.linalg.solve (LU) gives the same
        # factor to rounding and keeps scipy out of the runtime dependencies.
        out[k] = np.linalg.solve(chol, eye).T
    return out


def precision_cholesky_from_precisions(precisions):
    """Cholesky factors from precision matrices (scikit-learn's ``precisions_init``).

    scikit-learn reverses rows and columns, takes the lower Cholesky factor and
    reverses back, giving the upper-triangular ``P`` with ``P P^T = precision``.

    Parameters
    ----------
    precisions : ndarray of shape (n_components, n_features, n_features)

    Returns
    -------
    precisions_cholesky : ndarray of shape (n_components, n_features, n_features)

    Examples
    --------
    >>> import numpy as np
    >>> precision_cholesky_from_precisions(np.array([[[4.0, 0.0], [0.0, 1.0]]]))[0]
    array([[2., 0.],
           [0., 1.]])
    """
    precisions = np.asarray(precisions, dtype=np.float64)
    out = np.empty_like(precisions)
    for k in range(precisions.shape[0]):
        try:
            chol = np.linalg.cholesky(precisions[k, ::-1, ::-1])
        except np.linalg.LinAlgError:
            raise ValueError(
                "precisions_init must hold symmetric, positive-definite matrices; "
                f"component {k} is not"
            ) from None
        out[k] = chol[::-1, ::-1]
    return out


def log_det_cholesky(precisions_cholesky):
    """``log det P_k`` for triangular ``P_k``: the sum of the log of its diagonal.

    Equals ``0.5 * log det(precision_k)``.

    Parameters
    ----------
    precisions_cholesky : ndarray of shape (n_components, n_features, n_features)

    Returns
    -------
    log_det : ndarray of shape (n_components,)

    Examples
    --------
    >>> import numpy as np
    >>> log_det_cholesky(np.array([np.eye(3) * 2.0])).round(6)
    array([2.079442])
    """
    P = np.asarray(precisions_cholesky, dtype=np.float64)
    return np.log(np.diagonal(P, axis1=1, axis2=2)).sum(axis=1)


def _group_bounds(n_components, component_group, n_features):
    g = gemm_group(n_components, n_features) if not component_group else max(1, min(int(component_group), n_components))
    return [(a, min(a + g, n_components)) for a in range(0, n_components, g)]


def prepare_parameters(weights, means, precisions_cholesky, *, shift=None, component_group=None,
                       prune=True, log_weights=None, log_det=None, bounds=None):
    """Everything a block needs from one iteration's parameters, computed once.

    The result is what the graph shares as one key: per component group the
    concatenated factors ``[P_a ... P_b]`` of shape (d, g*d) (C-contiguous, so
    ``X @ Pcat`` is one GEMM for the group), ``mu_k @ P_k`` concatenated, the
    log-determinants and the log-weights.

    Parameters
    ----------
    weights : ndarray of shape (n_components,)
    means : ndarray of shape (n_components, n_features)
    precisions_cholesky : ndarray of shape (n_components, n_features, n_features)
    shift : ndarray of shape (n_components, n_features), optional
        Where the scatter statistics are accumulated around; default ``means``.
    component_group : int, optional
        Components per GEMM; bounds the (rows, group * n_features) temporary.
        Default :func:`gemm_group`.
    prune : bool, default True
        Also compute the bounds the fused pass uses to skip negligible components
        (:func:`em_block_stats`); callers that need every log-density pass False.
    log_weights, log_det : ndarray of shape (n_components,), optional
        Given instead of computed: one component group of a larger mixture passes the
        mixture's log-weights (``weights`` is then ignored) and stored log-determinants.
    bounds : dict, optional
        The pruning bounds, from :func:`bounds_from_table` (instead of an SVD per component).

    Returns
    -------
    dict

    Examples
    --------
    >>> import numpy as np
    >>> p = prepare_parameters(np.ones(2) / 2, np.zeros((2, 3)), np.array([np.eye(3)] * 2))
    >>> p["groups"][0]["pcat"].shape
    (4, 6)
    """
    weights = np.asarray(weights, dtype=np.float64)
    means = np.ascontiguousarray(means, dtype=np.float64)
    P = np.asarray(precisions_cholesky, dtype=np.float64)
    K, d = means.shape
    groups = []
    for a, b in _group_bounds(K, component_group, d):
        # pcat[:d, j*d:(j+1)*d] = P_{a+j} and pcat[d] = -mu P for every component:
        # [X 1] @ pcat computes every X P_k - mu_k P_k of the group in one GEMM (the
        # subtraction rides in the GEMM instead of a pass over its output).
        pcat = np.empty((d + 1, (b - a) * d))
        pcat[:d] = P[a:b].transpose(1, 0, 2).reshape(d, (b - a) * d)
        pcat[d] = -np.einsum("kd,kde->ke", means[a:b], P[a:b]).reshape(-1)
        groups.append({"start": a, "stop": b, "pcat": pcat})
    if log_weights is None:
        with np.errstate(divide="ignore"):
            log_weights = np.log(weights)
    prepared = {
        "n_components": K,
        "n_features": d,
        "groups": groups,
        "log_det": log_det_cholesky(P) if log_det is None else np.asarray(log_det, dtype=np.float64),
        "log_weights": np.asarray(log_weights, dtype=np.float64),
        "shift": means.copy() if shift is None else np.ascontiguousarray(shift, dtype=np.float64),
    }
    if bounds is not None:
        prepared["bounds"] = bounds
    elif prune and K >= PRUNE_MIN_COMPONENTS and d <= PRUNE_MAX_FEATURES:
        prepared["bounds"] = _component_bounds(means, P)
    return prepared


def _component_bounds(means, P):
    """What :func:`_pruned_log_prob` needs to bound ``||(x - mu_k) P_k||^2`` cheaply."""
    return bounds_from_table(means, bounds_table(P))


def bounds_table(P):
    """Per component, the pruning bounds' terms of the factors ``P`` (one SVD each).

    The terms of :func:`bounds_from_table`, indexed by component so that a component
    group's rows can be stored (and read back) by component.

    With ``P_k = U S V^T`` and ``v = x - mu_k``, ``||v P_k||^2 = sum_i s_i^2 (v . u_i)^2``.
    Keeping the ``PRUNE_DIRECTIONS`` smallest singular directions apart,
    ``||v P_k||^2 >= s_r^2 |v|^2 - sum_{i small} (s_r^2 - s_i^2) (v . u_i)^2`` (``s_r`` the
    smallest of the others) and ``<= s_max^2 |v|^2``: a component stretched along a
    few directions (two clusters it straddles) still gets a tight lower bound.  The
    singular values are widened by their rounding error (~ d u s_max): down in the
    lower bound (which holds for any s_r, s_i at or below the true ones), up in the
    upper one.
    """
    P = np.asarray(P, dtype=np.float64)
    K, d = P.shape[:2]
    sv = np.linalg.svd(P, compute_uv=False)  # (K, d), descending
    r = min(PRUNE_DIRECTIONS, d - 1)
    slack = 4 * (d + 1) * np.finfo(np.float64).eps * sv[:, 0]
    smin2 = np.maximum(sv[:, -1] - slack, 0.0) ** 2
    rest = np.maximum(sv[:, d - 1 - r] - slack, 0.0) ** 2
    # Only components whose smallest singular values stand well below the rest
    # (stretched ones) get the directional term; the others use s_min alone.
    sel = np.flatnonzero(smin2 < 0.5 * rest) if r else np.zeros(0, np.intp)
    base = smin2.copy()
    base[sel] = rest[sel]
    small = np.minimum(np.maximum(sv[sel, d - r:] - slack[sel, None], 0.0), np.sqrt(rest[sel])[:, None]) ** 2
    # Singular vectors only for the selected components, one at a time (a batched
    # SVD with vectors would hold two (K, d, d) arrays: more than the parameters).
    W = np.zeros((K, d, r))
    for k in sel:
        W[k] = np.linalg.svd(P[k])[0][:, d - r:]  # left vectors of the r smallest
    stretched = np.zeros(K, bool)
    stretched[sel] = True
    gap = np.zeros((K, r))
    gap[sel] = rest[sel, None] - small  # s_r^2 - s_i^2 >= 0
    return {"base2": base, "smax2": (sv[:, 0] + slack) ** 2, "stretched": stretched, "dirs": W, "dirs_gap": gap}


def bounds_from_table(means, table):
    """The pruning bounds of :func:`_pruned_log_prob` from :func:`bounds_table`'s terms.

    Examples
    --------
    >>> import numpy as np
    >>> P, m = np.array([np.eye(2)] * 3), np.zeros((3, 2))
    >>> bounds_from_table(m, bounds_table(P))["sel"]
    array([], dtype=int64)
    """
    means = np.ascontiguousarray(means, dtype=np.float64)
    d = means.shape[1]
    sel = np.flatnonzero(table["stretched"])
    W = np.asarray(table["dirs"], dtype=np.float64)[sel]
    r = W.shape[2]
    return {
        "means_t": np.ascontiguousarray(means.T),
        "means_sq": np.einsum("kd,kd->k", means, means),
        "base2": np.asarray(table["base2"], dtype=np.float64),
        "smax2": np.asarray(table["smax2"], dtype=np.float64),
        "sel": sel,
        "n_dirs": r,
        "dirs": np.ascontiguousarray(W.transpose(1, 0, 2).reshape(d, sel.size * r)),  # (d, n_sel r)
        "dirs_mu": np.einsum("kd,kdr->kr", means[sel], W).reshape(-1),  # mu_k . u_i
        "dirs_gap": np.asarray(table["dirs_gap"], dtype=np.float64)[sel].reshape(-1),
    }


def _gemm_buffer(prepared, rows):
    """The E-step GEMM's output buffer for slices of up to ``rows`` rows."""
    width = max(g["pcat"].shape[1] for g in prepared["groups"])
    return np.empty((rows, width))


def _log_gaussian_prob_prepared(X, prepared, out=None, buf=None):
    """(rows, K) log N(x | mu_k, Sigma_k) from prepared parameters; X float64 C.

    Rows are processed INNER_ROWS at a time so the GEMM output stays
    (INNER_ROWS, group * d) whatever the block size.  ``buf`` (from
    :func:`_gemm_buffer`) lets a caller reuse that output from call to call.
    """
    n = X.shape[0]
    K, d = prepared["n_components"], prepared["n_features"]
    if out is None:
        out = np.empty((n, K))
    step = min(n, inner_rows(d))
    if buf is None or buf.shape[0] < step:
        buf = _gemm_buffer(prepared, step)
    # The slice with a column of ones: its GEMM with pcat subtracts mu_k P_k too.
    xa = np.empty((step, d + 1))
    xa[:, d] = 1.0
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        m = r1 - r0
        xa[:m, :d] = X[r0:r1]
        for g in prepared["groups"]:
            a, b = g["start"], g["stop"]
            y = buf[:m, : (b - a) * d]
            # y_k = X P_k - mu_k P_k, scikit-learn's expression.
            np.matmul(xa[:m], g["pcat"], out=y)
            y3 = y.reshape(m, b - a, d)
            # Squared norm of each y_k without another (rows, g*d) temporary.
            out[r0:r1, a:b] = np.einsum("ikd,ikd->ik", y3, y3)
    out *= -0.5
    out += prepared["log_det"] - 0.5 * d * _LOG_2PI
    return out


def estimate_log_gaussian_prob(X, means, precisions_cholesky, *, component_group=None):
    """Log-density of each row under each Gaussian component.

    Same values as scikit-learn's ``_estimate_log_gaussian_prob(..., "full")``, but
    the per-component products ``X @ P_k - mu_k @ P_k`` are batched into one GEMM per
    component group, ``[X 1] @ [P_1 ... P_g; -mu_1 P_1 ... -mu_g P_g]`` of shape
    (d + 1, g*d).

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    means : ndarray of shape (n_components, n_features)
    precisions_cholesky : ndarray of shape (n_components, n_features, n_features)
    component_group : int, optional
        Components per GEMM (default: all); the temporary is (n_rows, group * d).

    Returns
    -------
    log_prob : ndarray of shape (n_rows, n_components)

    Examples
    --------
    >>> import numpy as np
    >>> estimate_log_gaussian_prob(np.zeros((1, 1)), np.zeros((1, 1)), np.ones((1, 1, 1))).round(6)
    array([[-0.918939]])
    """
    K = np.shape(means)[0]
    prepared = prepare_parameters(np.ones(K) / K, means, precisions_cholesky, prune=False,
                                  component_group=component_group)
    return _log_gaussian_prob_prepared(as_float64(X), prepared)


def _pruned_log_prob(X, prepared, work, best=None):
    """Weighted log-densities of a slice, with provably negligible entries set to -inf.

    Exact for the fused EM pass, which only uses ``exp(a - max_k a)`` of these
    values: per row, cheap bounds from the distances to the means
    (:func:`_component_bounds`) give an upper bound ``U_k`` on each component's
    log-density and a lower bound ``max_k L_k`` on the row's largest.  A component
    with ``U_k < max_k L_k - PRUNE_GAP`` has ``exp(a_k - max) == 0.0`` in float64,
    exactly what the dense computation gives, so it is left out of the GEMMs.  On
    separated clusters this leaves about one component per row: the E-step costs
    up to K times less.  Returns None when too few pairs can be skipped (the
    caller computes the slice densely).  ``best``: the rows' lower bounds on their
    largest weighted log-density over a whole mixture of which ``prepared`` is one
    component group (:func:`best_lower_bound`); default over ``prepared``'s own.
    """
    m, d = X.shape
    K = prepared["n_components"]
    lower, upper = _log_prob_bounds(X, prepared, work)
    best = lower.max(axis=1) if best is None else np.maximum(best, lower.max(axis=1))
    # NaN rows (never skipped: comparisons with NaN are False) keep the dense NaNs.
    thr = best - PRUNE_GAP - 1e-9 * np.abs(best)
    need = ~(upper < thr[:, None])
    if np.count_nonzero(need) > PRUNE_DENSE * need.size:
        return None
    q = scratch(work, "q", (m, K))  # ||y_k||^2; inf -> density 0
    q.fill(np.inf)
    xa = scratch(work, "xa", (m, d + 1))
    xa[:, d] = 1.0
    flat = scratch(work, "y", (m, d)).reshape(-1)  # each GEMM's (rows, d) output
    for g in prepared["groups"]:
        a = g["start"]
        for j in range(a, g["stop"]):
            rows = np.flatnonzero(need[:, j])
            if rows.size == 0:
                continue
            np.take(X, rows, axis=0, out=xa[:rows.size, :d], mode="clip")
            out = flat[:rows.size * d].reshape(rows.size, d)
            y = np.matmul(xa[:rows.size], g["pcat"][:, (j - a) * d:(j - a + 1) * d], out=out)
            q[rows, j] = np.einsum("ij,ij->i", y, y)
    q *= -0.5
    q += prepared["log_det"] - 0.5 * d * _LOG_2PI
    q += prepared["log_weights"]
    return q


def _mean_distances(X, means_t, means_sq, work):
    """|x - mu_k|^2 of a slice by the expansion, its rounding error bound, and |x|^2."""
    m, d = X.shape
    K = means_t.shape[1]
    xn = np.einsum("ij,ij->i", X, X)
    D2 = np.matmul(X, means_t, out=scratch(work, "D2", (m, K)))
    D2 *= -2.0
    D2 += xn[:, None]
    D2 += means_sq
    err = np.add(xn[:, None], means_sq, out=scratch(work, "err", (m, K)))
    err *= 4 * (d + 2) * np.finfo(np.float64).eps
    return D2, err, xn


def _lower_log_prob(D2, err, smax2, const, out):
    """Lower bounds of the weighted log-densities: ``||v P_k||^2 <= s_max^2 |v|^2``."""
    lower = np.add(D2, err, out=out)
    lower *= -0.5 * smax2
    lower += const
    return lower


def mixture_summary(log_weights, log_det, means, smax2):
    """What :func:`best_lower_bound` needs of a whole mixture: O(K d), never K d^2.

    Parameters
    ----------
    log_weights, log_det, smax2 : ndarray of shape (n_components,)
        ``smax2`` from :func:`bounds_table` (the largest squared singular value of each
        factor, widened by its rounding error).
    means : ndarray of shape (n_components, n_features)

    Returns
    -------
    dict
    """
    means = np.ascontiguousarray(means, dtype=np.float64)
    d = means.shape[1]
    return {"means_t": np.ascontiguousarray(means.T), "means_sq": np.einsum("kd,kd->k", means, means),
            "smax2": np.asarray(smax2, dtype=np.float64),
            "const": np.asarray(log_weights, dtype=np.float64) + log_det - 0.5 * d * _LOG_2PI}


def best_lower_bound(X, summary, work=None):
    """Per row, a lower bound on its largest weighted log-density over the whole mixture.

    Lets each component group of a sharded E-step (:func:`group_log_prob`) skip the
    components that no other group can make count, from the means alone.
    """
    X = as_float64(X)
    work = {} if work is None else work
    D2, err, _ = _mean_distances(X, summary["means_t"], summary["means_sq"], work)
    lower = _lower_log_prob(D2, err, summary["smax2"], summary["const"], D2)
    return lower.max(axis=1)


def _log_prob_bounds(X, prepared, work):
    """(rows, K) lower and upper bounds on the weighted log-densities of a slice."""
    b = prepared["bounds"]
    m, d = X.shape
    K = prepared["n_components"]
    D2, err, xn = _mean_distances(X, b["means_t"], b["means_sq"], work)
    const = prepared["log_weights"] + prepared["log_det"] - 0.5 * d * _LOG_2PI
    lower = _lower_log_prob(D2, err, b["smax2"], const, scratch(work, "lower", (m, K)))
    # Lower bound of ||v P_k||^2 (see _component_bounds), then the upper bound of
    # the log-density.
    quad = np.subtract(D2, err, out=D2)
    np.maximum(quad, 0.0, out=quad)
    quad *= b["base2"]
    sel, r = b["sel"], b["n_dirs"]
    if sel.size:
        c = X @ b["dirs"]
        c -= b["dirs_mu"]
        # |c| widened by its rounding error (u_i has norm 1), squared, weighted.
        np.abs(c, out=c)
        f = 2 * (d + 2) * np.finfo(np.float64).eps
        c += (np.sqrt(xn) * f)[:, None]  # in two steps: no (rows, n_sel r) temporary
        c += np.sqrt(np.repeat(b["means_sq"][sel], r)) * f
        c *= c
        c *= b["dirs_gap"]
        quad[:, sel] -= c.reshape(m, sel.size, r).sum(axis=2)
        np.maximum(quad, 0.0, out=quad)
    upper = quad
    upper *= -0.5
    upper += const
    return lower, upper


def weighted_log_prob(X, prepared, *, buf=None):
    """``log N(x | k) + log w_k`` for a block, from :func:`prepare_parameters`.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    prepared : dict

    Returns
    -------
    ndarray of shape (n_rows, n_components)

    Examples
    --------
    >>> import numpy as np
    >>> p = prepare_parameters(np.ones(1), np.zeros((1, 1)), np.ones((1, 1, 1)))
    >>> weighted_log_prob(np.zeros((1, 1)), p).round(6)
    array([[-0.918939]])
    """
    out = _log_gaussian_prob_prepared(as_float64(X), prepared, buf=buf)
    out += prepared["log_weights"]
    return out


def weighted_log_prob_sparse(X, prepared):
    """:func:`weighted_log_prob` with provably negligible entries set to ``-inf``.

    Every use that goes through ``exp(a - max)`` gets exactly what the dense values
    give: the argmax, the log-sum-exp and the probabilities (``exp`` of the skipped
    entries' ``a - max < -800`` is 0.0 either way).  Slices where pruning does not pay
    (see :func:`_pruned_log_prob`) are computed densely; without bounds in
    ``prepared`` (``prune=False``) all of them.

    Examples
    --------
    >>> import numpy as np
    >>> p = prepare_parameters(np.ones(3) / 3, np.array([[0.0], [100.0], [200.0]]), np.ones((3, 1, 1)))
    >>> weighted_log_prob_sparse(np.array([[0.5]]), p)
    array([[-2.14255082,        -inf,        -inf]])
    """
    X = as_float64(X)
    n, d = X.shape
    if "bounds" not in prepared:
        return weighted_log_prob(X, prepared)
    out = np.empty((n, prepared["n_components"]))
    step, work, buf = prune_rows(d), {}, None
    for r0 in range(0, n, step):
        Xs = X[r0:r0 + step]
        lp = _pruned_log_prob(Xs, prepared, work)
        if lp is None:
            buf = _gemm_buffer(prepared, min(n, inner_rows(d))) if buf is None else buf
            lp = weighted_log_prob(Xs, prepared, buf=buf)
        out[r0:r0 + Xs.shape[0]] = lp
    return out


def group_log_prob(X, prepared, best=None, *, work=None, out=None):
    """Weighted log-densities of one component group for a block, and the pairs skipped.

    The sharded E-step: ``prepared`` holds one group's factors
    (:func:`prepare_parameters` with the mixture's ``log_weights``).  With ``best``
    (:func:`best_lower_bound` over the whole mixture) and bounds in ``prepared``, pairs
    provably ``PRUNE_GAP`` below the row's largest are ``-inf`` and never computed,
    as in the fused pass; slices where that does not pay are computed densely.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    prepared : dict
    best : ndarray of shape (n_rows,), optional
    work : dict, optional
        Scratch buffers kept between calls.
    out : ndarray of shape (n_rows, group), optional

    Returns
    -------
    logp : ndarray of shape (n_rows, group)
    skipped : int
        (row, component) pairs left out.
    """
    X = as_float64(X)
    n, d = X.shape
    work = {} if work is None else work
    out = np.empty((n, prepared["n_components"])) if out is None else out
    prune = best is not None and "bounds" in prepared
    step = prune_rows(d) if prune else n
    skipped = 0
    buf = None
    for r0 in range(0, n, step):
        Xs = X[r0:r0 + step]
        lp = _pruned_log_prob(Xs, prepared, work, best=best[r0:r0 + step]) if prune else None
        if lp is None:
            buf = scratch(work, "em-gemm", (min(n, inner_rows(d)), max(g["pcat"].shape[1] for g in prepared["groups"]))) if buf is None else buf
            lp = weighted_log_prob(Xs, prepared, buf=buf)
        else:
            skipped += int(np.count_nonzero(lp == -np.inf))
        out[r0:r0 + Xs.shape[0]] = lp
    return out, skipped


def logsumexp_rows(a):
    """``log(sum(exp(a), axis=1))`` computed stably, as ``scipy.special.logsumexp``.

    Parameters
    ----------
    a : ndarray of shape (n_rows, n_components)

    Returns
    -------
    ndarray of shape (n_rows,)

    Examples
    --------
    >>> import numpy as np
    >>> logsumexp_rows(np.log(np.array([[1.0, 3.0]]))).round(6)
    array([1.386294])
    """
    amax = a.max(axis=1)
    # Rows whose every entry is -inf would give nan; scipy returns -inf for them.
    amax[~np.isfinite(amax)] = 0.0
    tmp = np.exp(a - amax[:, None])
    with np.errstate(divide="ignore"):
        return np.log(tmp.sum(axis=1)) + amax


def normalise_rows(logp):
    """Turn log-probabilities into responsibilities in place; return their log-sum-exp.

    ``exp(a - lse) = exp(a - max) / sum(exp(a - max))``: one exponential pass instead
    of logsumexp's and then the responsibilities' (equal to rounding).
    """
    amax = logp.max(axis=1)
    amax[~np.isfinite(amax)] = 0.0  # all -inf rows: lse -inf and NaN r, as scipy's
    logp -= amax[:, None]
    np.exp(logp, out=logp)
    total = logp.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp /= total[:, None]
        return np.log(total) + amax


def resp_block_stats(X, resp, shift, out=None, *, buf=None):
    """Sufficient statistics of a block for given responsibilities.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    resp : ndarray of shape (n_rows, n_components)
        Responsibilities (non-negative; rows need not sum to 1).
    shift : ndarray of shape (n_components, n_features)
        Centre of the scatter statistics.
    out : dict, optional
        Statistics to add this block's into (in place; returned).
    buf : ndarray of shape (>= n_rows, n_features), optional
        Scratch space for the shifted rows, reused by a caller that loops.

    Returns
    -------
    dict
        ``N`` (K,), ``S1`` (K, d) ``= sum r (x - s_k)``, ``S2`` (K, d, d)
        ``= sum r (x - s_k)(x - s_k)^T``, ``log_likelihood`` 0.0 and ``n`` rows.

    Examples
    --------
    >>> import numpy as np
    >>> s = resp_block_stats(np.array([[1.0], [3.0]]), np.ones((2, 1)), np.zeros((1, 1)))
    >>> s["N"], s["S1"], s["S2"]
    (array([2.]), array([[4.]]), array([[[10.]]]))
    """
    X = as_float64(X)
    resp = np.asarray(resp, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    n, d = X.shape
    K = resp.shape[1]
    if out is None:
        out = {"N": np.zeros(K), "S1": np.zeros((K, d)), "S2": np.zeros((K, d, d)),
               "log_likelihood": 0.0, "n": 0}
    out["N"] += resp.sum(axis=0)
    out["n"] += n
    if buf is None or buf.shape[0] < n or buf.shape[1] != d:
        buf = np.empty((n, d))
    sq = np.sqrt(resp)
    for k in range(K):
        # Rows with r == 0 exactly (underflowed responsibilities, hard assignments)
        # add exact zeros: leave them out of the GEMM.  On separated clusters this
        # cuts the M-step by up to K times and changes no bit of the result.
        rows = np.flatnonzero(sq[:, k])
        m = rows.size
        if m == 0:
            continue
        if m < 0.75 * n:
            B = buf[:m]
            np.subtract(X[rows], shift[k], out=B)
            w = sq[rows, k]
        else:
            B = buf[:n]
            np.subtract(X, shift[k], out=B)
            w = sq[:, k]
        # B = sqrt(r) (x - s_k); S2 += B^T B (numpy calls syrk for A.T @ A, half the
        # flops of a general GEMM) and S1 += sqrt(r)^T B.
        B *= w[:, None]
        out["S2"][k] += B.T @ B
        out["S1"][k] += w @ B
    return out


def em_block_stats(X, log_weights=None, means=None, precisions_cholesky=None, shift=None,
                   *, prepared=None, component_group=None, slice_rows=None, work=None):
    """One row block's share of an EM iteration: E-step, then M-step statistics.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
        Any real dtype; converted to float64.
    log_weights : ndarray of shape (n_components,)
    means : ndarray of shape (n_components, n_features)
    precisions_cholesky : ndarray of shape (n_components, n_features, n_features)
    shift : ndarray of shape (n_components, n_features), optional
        Default ``means``.
    prepared : dict, optional
        From :func:`prepare_parameters`; replaces the four parameters above (the
        graph passes this, computed once per iteration).
    component_group : int, optional
        Components per E-step GEMM.
    slice_rows : int, optional
        Rows per slice inside the block (default :func:`inner_rows`).
    work : dict, optional
        Scratch buffers kept by the caller between blocks (see
        :func:`pipeline.kernels.buffers.scratch`); default: fresh ones for this block.

    Returns
    -------
    dict
        ``N``, ``S1``, ``S2`` (see :func:`resp_block_stats`), ``log_likelihood``
        (sum over rows of the log-sum-exp of the weighted log-probabilities) and
        ``n``.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0], [2.0]])
    >>> s = em_block_stats(X, np.log([1.0]), np.array([[1.0]]), np.ones((1, 1, 1)))
    >>> s["N"], s["S2"], s["n"]
    (array([2.]), array([[[2.]]]), 2)
    """
    if prepared is None:
        prepared = prepare_parameters(np.exp(log_weights), means, precisions_cholesky,
                                      shift=shift, component_group=component_group)
    n = np.shape(X)[0]
    d = prepared["n_features"]
    step = max(1, int(slice_rows or inner_rows(d)))
    prune = "bounds" in prepared
    # The pruned E-step works on larger slices (prune_rows): its cost is in
    # per-component calls (gathers, small GEMMs), fewer and larger ones are faster
    # and hold the GIL less often (two threads contend for it otherwise).
    big = (step * PRUNE_SLICE if slice_rows else prune_rows(d)) if prune else step
    stats = None
    # Slices keep every temporary (slice, .) while one accumulator collects the
    # block's statistics in place.  The big scratch buffers are allocated once per
    # block (or kept by the caller), not per slice: a fresh multi-MiB array is a new
    # mmap, page-faulted and zeroed again (measured: ~15% of an iteration at d=64).
    work = {} if work is None else work
    width = max(g["pcat"].shape[1] for g in prepared["groups"])
    gemm_buf = scratch(work, "em-gemm", (min(n, step), width))
    rows_buf = scratch(work, "em-rows", (min(n, big), d))
    if n == 0:  # an empty block adds nothing (zeros, so combine_stats takes it)
        return resp_block_stats(np.empty((0, d)), np.empty((0, prepared["n_components"])), prepared["shift"])
    for r0 in range(0, n, big):
        Xb = as_float64(X[r0:r0 + big])
        logp = _pruned_log_prob(Xb, prepared, work) if prune else None
        if logp is not None:
            parts = [(Xb, logp)]
        else:
            # Soft responsibilities (early iterations, overlapping components): this
            # slice and the block's others are computed densely, without trying.
            prune = False
            parts = ((Xb[s0:s0 + step], weighted_log_prob(Xb[s0:s0 + step], prepared, buf=gemm_buf))
                     for s0 in range(0, Xb.shape[0], step))
        for Xs, logp in parts:
            lse = normalise_rows(logp)
            stats = resp_block_stats(Xs, logp, prepared["shift"], out=stats, buf=rows_buf)
            stats["log_likelihood"] += float(lse.sum())
    return stats


def combine_stats(parts):
    """Sum the statistics of several blocks (associative: any tree gives the same).

    Parameters
    ----------
    parts : sequence of dict
        Outputs of :func:`em_block_stats` / :func:`resp_block_stats` or of this
        function, with the same shift.

    Returns
    -------
    dict

    Examples
    --------
    >>> import numpy as np
    >>> a = {"N": np.ones(1), "S1": np.ones((1, 1)), "S2": np.ones((1, 1, 1)), "log_likelihood": -1.0, "n": 1}
    >>> combine_stats([a, a])["n"]
    2
    """
    # Iterate (never list): a generator of slices then holds one extra S2 at a time.
    out = None
    for p in parts:
        if out is None:
            out = {key: (np.array(p[key], copy=True) if isinstance(p[key], np.ndarray) else p[key])
                   for key in ("N", "S1", "S2", "log_likelihood", "n")}
            continue
        out["N"] += p["N"]
        out["S1"] += p["S1"]
        out["S2"] += p["S2"]
        out["log_likelihood"] += p["log_likelihood"]
        out["n"] += p["n"]
    return out


def mean_log_likelihood(stats):
    """The lower bound scikit-learn reports: the mean log-sum-exp of the E-step.

    Examples
    --------
    >>> mean_log_likelihood({"log_likelihood": -6.0, "n": 3})
    -2.0
    """
    return stats["log_likelihood"] / stats["n"]


def params_from_stats(stats, shift, reg_covar, *, n_samples=None):
    """The M-step: weights, means and covariances from summed statistics.

    scikit-learn's ``_estimate_gaussian_parameters`` with full covariances:
    ``nk = N + 10 eps``, ``means = sum r x / nk``,
    ``cov = sum r (x - m)(x - m)^T / nk + reg_covar I`` and ``weights = nk / sum(nk)``
    (or ``nk / n_samples`` when ``n_samples`` is given, as scikit-learn's
    initialisation from responsibilities does).  The scatter around the new mean
    comes from the shifted statistics with ``delta = m - s``:
    ``S2 - S1 delta^T - delta S1^T + N delta delta^T``.

    Parameters
    ----------
    stats : dict
        Summed statistics (:func:`combine_stats`).
    shift : ndarray of shape (n_components, n_features)
        The shift the statistics were accumulated around.
    reg_covar : float
    n_samples : int, optional

    Returns
    -------
    weights : ndarray of shape (n_components,)
    means : ndarray of shape (n_components, n_features)
    covariances : ndarray of shape (n_components, n_features, n_features)

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1.0], [3.0]])
    >>> s = resp_block_stats(X, np.ones((2, 1)), np.zeros((1, 1)))
    >>> w, m, c = params_from_stats(s, np.zeros((1, 1)), 0.0)
    >>> w, m.round(12), c.round(12)
    (array([1.]), array([[2.]]), array([[[1.]]]))
    """
    shift = np.asarray(shift, dtype=np.float64)
    N = np.asarray(stats["N"], dtype=np.float64)
    S1, S2 = stats["S1"], stats["S2"]
    nk = N + 10 * np.finfo(np.float64).eps
    # sum r x = S1 + N s.
    means = (S1 + N[:, None] * shift) / nk[:, None]
    delta = means - shift
    d = means.shape[1]
    # One component at a time: temporaries are (d, d), never (K, d, d).
    covariances = np.empty_like(S2)
    for k in range(len(N)):
        cross = np.outer(S1[k], delta[k])
        c = covariances[k]
        np.subtract(S2[k], cross, out=c)
        c -= cross.T
        c += N[k] * np.outer(delta[k], delta[k])
        c /= nk[k]
        c[np.arange(d), np.arange(d)] += reg_covar
    weights = nk / (nk.sum() if n_samples is None else n_samples)
    return weights, means, covariances
