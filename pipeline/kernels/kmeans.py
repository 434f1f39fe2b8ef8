"""k-means kernels for Gaussian-mixture initialisation: pure NumPy on one row block.

The graph builder (``pipeline/mixture.py``) drives these block by block to reproduce
scikit-learn's ``init_params`` choices out of core:

* k-means++ seeding (``sklearn.cluster.kmeans_plusplus``): the potential
  ``sum min_c |x - c|^2`` is never held per row for the whole dataset; each step
  recomputes it per block from the chosen centres (one pass per centre, cheap next
  to EM) and locates sampled candidates block by block.
* Lloyd iterations: per block the labels, per-centre counts and sums, the inertia
  and the farthest rows (to re-seed empty clusters, as scikit-learn does).
* column moments (Chan's parallel update) for scikit-learn's tolerance
  ``tol * mean(var(X, axis=0))``.

Squared distances use the k-NN engineer's kernel ``sq_euclidean`` (the
``|x|^2 + |c|^2 - 2 x c^T`` GEMM) in float64.
"""

from __future__ import annotations

import numpy as np

from .gaussian import resp_block_stats

from .distances import sq_euclidean as _sq_euclidean

__all__ = [
    "sq_distances",
    "min_sq_distances",
    "kpp_block_potentials",
    "kpp_locate",
    "lloyd_block_stats",
    "combine_lloyd",
    "lloyd_update",
    "labels_block_stats",
    "onehot_block_stats",
    "moments_block",
    "combine_moments",
]


def _f64(X):
    return np.ascontiguousarray(X, dtype=np.float64)


def sq_distances(X, centers):
    """Squared Euclidean distances (n_rows, n_centers), float64, clamped at 0.

    Examples
    --------
    >>> import numpy as np
    >>> sq_distances(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]]))
    array([[25.]])
    """
    return _sq_euclidean(_f64(X), _f64(centers))


def min_sq_distances(X, centers):
    """``min_c |x - c|^2`` per row; ``inf`` when there are no centres yet.

    Examples
    --------
    >>> import numpy as np
    >>> min_sq_distances(np.array([[0.0], [2.0]]), np.array([[1.0], [2.0]]))
    array([1., 0.])
    """
    X = _f64(X)
    if len(centers) == 0:
        return np.full(X.shape[0], np.inf)
    return sq_distances(X, centers).min(axis=1)


def kpp_block_potentials(X, centers, candidates):
    """A block's share of one k-means++ step.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    centers : ndarray of shape (n_chosen, n_features)
        Centres chosen so far (at least one).
    candidates : ndarray of shape (n_trials, n_features)
        Candidate centres sampled for this step (may be empty).

    Returns
    -------
    ndarray of shape (n_trials + 1,)
        ``[sum_rows min(d_min, |x - cand_t|^2) for t] + [sum_rows d_min]``: the
        potential if each candidate were added, and the current potential.

    Examples
    --------
    >>> import numpy as np
    >>> kpp_block_potentials(np.array([[0.0], [4.0]]), np.array([[0.0]]), np.array([[4.0]]))
    array([ 0., 16.])
    """
    X = _f64(X)
    dmin = min_sq_distances(X, centers)
    out = np.empty(len(candidates) + 1)
    out[-1] = dmin.sum()
    if len(candidates):
        dc = sq_distances(X, candidates)
        np.minimum(dc, dmin[:, None], out=dc)
        out[:-1] = dc.sum(axis=0)
    return out


def kpp_locate(X, centers, targets):
    """Rows of a block where the running potential first reaches each target.

    ``searchsorted(cumsum(d_min), targets)`` within the block, as
    ``sklearn.cluster.kmeans_plusplus`` does over the whole dataset.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    centers : ndarray of shape (n_chosen, n_features)
    targets : ndarray of shape (n_targets,)
        Potentials measured from the block's first row.

    Returns
    -------
    ndarray of int64, shape (n_targets,)
        Row offsets inside the block (clipped to the last row).

    Examples
    --------
    >>> import numpy as np
    >>> kpp_locate(np.array([[0.0], [1.0], [3.0]]), np.array([[0.0]]), np.array([0.5, 5.0]))
    array([1, 2])
    """
    dmin = min_sq_distances(X, centers)
    idx = np.searchsorted(np.cumsum(dmin), np.asarray(targets, dtype=np.float64))
    return np.minimum(idx, X.shape[0] - 1).astype(np.int64)


def lloyd_block_stats(X, centers, n_far=0):
    """One Lloyd step's partial sums for a block.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    centers : ndarray of shape (n_clusters, n_features)
    n_far : int
        How many farthest rows (from their centre) to keep, to re-seed empty
        clusters.

    Returns
    -------
    dict
        ``counts`` (K,), ``sums`` (K, d), ``inertia`` float, ``far_d`` (m,),
        ``far_x`` (m, d).

    Examples
    --------
    >>> import numpy as np
    >>> s = lloyd_block_stats(np.array([[0.0], [1.0], [9.0]]), np.array([[0.0], [10.0]]))
    >>> s["counts"], s["sums"], s["inertia"]
    (array([2., 1.]), array([[1.],
           [9.]]), 2.0)
    """
    X = _f64(X)
    K = centers.shape[0]
    D = sq_distances(X, centers)
    labels = D.argmin(axis=1)
    dmin = D[np.arange(X.shape[0]), labels]
    counts = np.bincount(labels, minlength=K).astype(np.float64)
    # Per-centre sums as one GEMM with the one-hot matrix (rows, K).
    onehot = np.zeros((X.shape[0], K))
    onehot[np.arange(X.shape[0]), labels] = 1.0
    sums = onehot.T @ X
    m = min(n_far, X.shape[0])
    if m:
        far = np.argpartition(dmin, -m)[-m:]
        far_d, far_x = dmin[far], X[far]
    else:
        far_d, far_x = np.empty(0), np.empty((0, X.shape[1]))
    return {"counts": counts, "sums": sums, "inertia": float(dmin.sum()),
            "far_d": far_d, "far_x": far_x}


def combine_lloyd(parts):
    """Add Lloyd partial sums; keep the overall farthest rows (associative).

    Examples
    --------
    >>> import numpy as np
    >>> a = lloyd_block_stats(np.array([[0.0]]), np.array([[0.0]]))
    >>> combine_lloyd([a, a])["counts"]
    array([2.])
    """
    parts = list(parts)
    m = max(len(p["far_d"]) for p in parts)
    far_d = np.concatenate([p["far_d"] for p in parts])
    far_x = np.concatenate([p["far_x"] for p in parts])
    # Ties broken by position so the result does not depend on the tree's shape
    # more than the floating-point sums already do.
    keep = np.argsort(-far_d, kind="stable")[:m]
    return {
        "counts": sum(p["counts"] for p in parts),
        "sums": sum(p["sums"] for p in parts),
        "inertia": sum(p["inertia"] for p in parts),
        "far_d": far_d[keep],
        "far_x": far_x[keep],
    }


def lloyd_update(stats, centers):
    """New centres from summed Lloyd statistics; empty clusters take the farthest rows.

    Returns
    -------
    new_centers : ndarray of shape (n_clusters, n_features)
    shift : float
        ``sum |c_new - c_old|^2`` (scikit-learn's convergence measure).

    Examples
    --------
    >>> import numpy as np
    >>> s = lloyd_block_stats(np.array([[0.0], [2.0]]), np.array([[0.0]]))
    >>> lloyd_update(s, np.array([[0.0]]))
    (array([[1.]]), 1.0)
    """
    counts, sums = stats["counts"], stats["sums"]
    new = centers.copy()
    nonempty = counts > 0
    new[nonempty] = sums[nonempty] / counts[nonempty, None]
    empty = np.flatnonzero(~nonempty)
    # scikit-learn relocates empty clusters to the points farthest from their centres.
    for j, k in enumerate(empty[: len(stats["far_d"])]):
        new[k] = stats["far_x"][j]
    return new, float(((new - centers) ** 2).sum())


def labels_block_stats(X, centers, shift=None, components=None):
    """Gaussian sufficient statistics for hard (nearest-centre) assignments.

    The one-hot responsibilities of ``KMeans.labels_`` that scikit-learn's
    ``init_params="kmeans"`` feeds to ``_estimate_gaussian_parameters``; only the
    rows of each cluster enter its scatter GEMM.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    centers : ndarray of shape (n_clusters, n_features)
    shift : ndarray of shape (n_clusters, n_features), optional
        Default ``centers`` (the cluster means, so nothing cancels).
    components : (int, int), optional
        Only the statistics of clusters ``c0 .. c1 - 1`` (rows still go to their nearest
        centre of all); ``shift`` is then theirs.

    Returns
    -------
    dict (as :func:`pipeline.kernels.gaussian.resp_block_stats`)

    Examples
    --------
    >>> import numpy as np
    >>> s = labels_block_stats(np.array([[0.0], [1.0], [9.0]]), np.array([[0.0], [9.0]]))
    >>> s["N"]
    array([2., 1.])
    """
    X = _f64(X)
    c0, c1 = (0, len(centers)) if components is None else components
    shift = centers[c0:c1] if shift is None else shift
    labels = sq_distances(X, centers).argmin(axis=1)
    K, d = c1 - c0, centers.shape[1]
    N = np.zeros(K)
    S1 = np.zeros((K, d))
    S2 = np.zeros((K, d, d))
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(c0, c1 + 1))
    for k in range(K):
        rows = order[bounds[k]:bounds[k + 1]]
        if rows.size == 0:
            continue
        D = X[rows] - shift[k]
        N[k] = rows.size
        S1[k] = D.sum(axis=0)
        S2[k] = D.T @ D
    return {"N": N, "S1": S1, "S2": S2, "log_likelihood": 0.0, "n": X.shape[0]}


def onehot_block_stats(X, row_start, indices, shift):
    """Statistics of one-hot responsibilities at given global rows (k-means++ /
    random_from_data initialisation): column ``k`` is 1 at row ``indices[k]``.

    Examples
    --------
    >>> import numpy as np
    >>> onehot_block_stats(np.array([[5.0], [7.0]]), 10, np.array([11]), np.zeros((1, 1)))["S1"]
    array([[7.]])
    """
    X = _f64(X)
    resp = np.zeros((X.shape[0], len(indices)))
    local = np.asarray(indices) - row_start
    inside = (local >= 0) & (local < X.shape[0])
    resp[local[inside], np.flatnonzero(inside)] = 1.0
    return resp_block_stats(X, resp, shift)


def moments_block(X):
    """Row count, column means and centred sums of squares of a block.

    Examples
    --------
    >>> import numpy as np
    >>> moments_block(np.array([[1.0], [3.0]]))
    (2, array([2.]), array([2.]))
    """
    X = _f64(X)
    mean = X.mean(axis=0)
    return X.shape[0], mean, ((X - mean) ** 2).sum(axis=0)


def combine_moments(parts):
    """Chan et al.'s pairwise update: merge (n, mean, M2) without cancellation.

    Examples
    --------
    >>> import numpy as np
    >>> combine_moments([moments_block(np.array([[1.0]])), moments_block(np.array([[3.0]]))])
    (2, array([2.]), array([2.]))
    """
    parts = list(parts)
    n, mean, m2 = parts[0][0], parts[0][1].copy(), parts[0][2].copy()
    for nb, mb, m2b in parts[1:]:
        if nb == 0:
            continue
        tot = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta**2 * (n * nb / tot)
        n = tot
    return n, mean, m2
