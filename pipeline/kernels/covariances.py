"""The four covariance types of a Gaussian mixture behind one interface: pure NumPy on one block.

scikit-learn's ``GaussianMixture(covariance_type=...)`` semantics and shapes
(``sklearn/mixture/_gaussian_mixture.py``):

=============  ====================  ======================================
type           covariances_          what the E-step costs per row block
=============  ====================  ======================================
``full``       (K, d, d)             one GEMM per component group (:mod:`.gaussian`)
``tied``       (d, d)                ``(X - c) P`` once, then one (d, K) GEMM
``diag``       (K, d)                one GEMM of ``[X - c, (X - c)^2]`` (2d, K)
``spherical``  (K,)                  the same GEMM, the variance broadcast over d
=============  ====================  ======================================

``full`` is :mod:`pipeline.kernels.gaussian` (per-component shifts, pruning); this
module adds the other three and dispatches all four.  For these three the block is
taken around one shift ``c`` (d,) — the weighted mean of the current means, close
to the data's mean — so the GEMM expansions ``|y - m|^2 = |y|^2 - 2 y.m + |m|^2`` and
the M-step's ``E[(x - c)^2] - (m - c)^2`` do not cancel catastrophically when the
data sit far from the origin, and every statistic is accumulated in float64 (float32
data far from the origin keep their variances, where scikit-learn's float32
``E[x^2] - E[x]^2`` can go negative, scikit-learn#30382).  One shift serves all
components: a component whose distance from ``c`` is ~1e8 times its spread still
loses digits (full's per-component shifts do not).  One buffer
``Z = [X - c, (X - c)^2]`` per slice is both the E-step's GEMM operand and the
M-step's: ``R^T Z`` gives the first and second moments of every component at once.

Sufficient statistics (added up over blocks by :func:`combine_stats`):

* diag, spherical: ``N`` (K,), ``S1 = sum r (x - c)`` (K, d), ``S2 = sum r (x - c)^2`` (K, d);
* tied: ``N``, ``S1`` and the responsibility-free ``S2 = sum (x - c)(x - c)^T`` (d, d)
  with ``T1 = sum (x - c)`` (d,): scikit-learn's tied covariance is
  ``(X^T X - sum_k nk m_k m_k^T) / sum nk`` over every row;
* all: ``log_likelihood`` (sum of the rows' log-sum-exp) and ``n``.
"""

from __future__ import annotations

import math

import numpy as np

from . import gaussian as _g
from .buffers import Workspace, scratch

__all__ = [
    "COVARIANCE_TYPES",
    "parameter_shape",
    "check_type",
    "precision_cholesky",
    "precision_cholesky_from_precisions",
    "precisions_from_cholesky",
    "covariances_from_cholesky",
    "log_det_cholesky",
    "n_parameters",
    "default_shift",
    "slice_rows",
    "prepare_parameters",
    "weighted_log_prob",
    "em_block_stats",
    "resp_block_stats",
    "scatter_block_stats",
    "combine_stats",
    "params_from_stats",
    "em_workspace",
    "stats_bytes",
    "parameter_bytes",
]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")

_LOG_2PI = math.log(2 * math.pi)
_EPS = np.finfo(np.float64).eps


def check_type(covariance_type):
    """Raise ValueError naming the four types unless ``covariance_type`` is one of them.

    Examples
    --------
    >>> check_type("diag")
    'diag'
    """
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type={covariance_type!r} is not one of "
                         f"{', '.join(repr(t) for t in COVARIANCE_TYPES)}")
    return covariance_type


def parameter_shape(covariance_type, n_components, n_features):
    """Shape of ``covariances_``, ``precisions_`` and ``precisions_cholesky_``.

    Examples
    --------
    >>> [parameter_shape(t, 3, 2) for t in COVARIANCE_TYPES]
    [(3, 2, 2), (2, 2), (3, 2), (3,)]
    """
    K, d = n_components, n_features
    return {"full": (K, d, d), "tied": (d, d), "diag": (K, d), "spherical": (K,)}[check_type(covariance_type)]


def n_parameters(covariance_type, n_components, n_features):
    """Free parameters of the model (scikit-learn's ``_n_parameters``), for BIC and AIC.

    Examples
    --------
    >>> [n_parameters(t, 3, 2) for t in COVARIANCE_TYPES]
    [17, 11, 14, 11]
    """
    K, d = n_components, n_features
    cov = {"full": K * d * (d + 1) / 2.0, "tied": d * (d + 1) / 2.0, "diag": K * d,
           "spherical": K}[check_type(covariance_type)]
    return int(cov + d * K + K - 1)


def parameter_bytes(covariance_type, n_components, n_features):
    """Bytes of one float64 covariance-shaped array (covariances, factors or precisions)."""
    return 8 * math.prod(parameter_shape(covariance_type, n_components, n_features))


# ------------------------------------------------------------------ parameters

def precision_cholesky(covariance_type, covariances):
    """Cholesky factors of the precisions, as scikit-learn's ``_compute_precision_cholesky``.

    Raises
    ------
    ValueError
        A covariance that is not positive definite (full, tied) or a variance <= 0
        (diag, spherical), with scikit-learn's message.

    Examples
    --------
    >>> precision_cholesky("diag", np.array([[4.0, 1.0]]))
    array([[0.5, 1. ]])
    """
    covariances = np.asarray(covariances, dtype=np.float64)
    if covariance_type == "full":
        return _g.compute_precision_cholesky(covariances)
    if covariance_type == "tied":
        return _g.compute_precision_cholesky(covariances[None])[0]
    check_type(covariance_type)
    if np.any(covariances <= 0.0) or not np.all(np.isfinite(covariances)):
        raise ValueError(_g.PRECISION_ERROR)
    return 1.0 / np.sqrt(covariances)


def precision_cholesky_from_precisions(covariance_type, precisions):
    """Factors from precisions (scikit-learn's ``precisions_init``), validated as scikit-learn does.

    Raises
    ------
    ValueError
        Non-symmetric or not positive-definite matrices (full, tied), non-positive
        precisions (diag, spherical).

    Examples
    --------
    >>> precision_cholesky_from_precisions("spherical", np.array([4.0, 9.0]))
    array([2., 3.])
    """
    p = np.asarray(precisions, dtype=np.float64)
    if covariance_type in ("full", "tied"):
        mats = p if covariance_type == "full" else p[None]
        if not np.allclose(mats, mats.transpose(0, 2, 1)):
            raise ValueError(f"precisions_init ({covariance_type}) must hold symmetric matrices")
        out = _g.precision_cholesky_from_precisions(mats)
        return out if covariance_type == "full" else out[0]
    check_type(covariance_type)
    if np.any(p <= 0.0):
        raise ValueError(f"precisions_init ({covariance_type}) must be positive; "
                         f"its smallest value is {p.min():.5g}")
    return np.sqrt(p)


def precisions_from_cholesky(covariance_type, precisions_cholesky):
    """``precisions_``: ``P P^T`` (full, tied) or ``P ** 2`` (diag, spherical)."""
    P = np.asarray(precisions_cholesky, dtype=np.float64)
    if covariance_type == "full":
        return P @ P.transpose(0, 2, 1)
    if covariance_type == "tied":
        return P @ P.T
    return P ** 2


def covariances_from_cholesky(covariance_type, precisions_cholesky):
    """The covariances a set of factors stands for (their inverse precisions)."""
    prec = precisions_from_cholesky(covariance_type, precisions_cholesky)
    if covariance_type in ("full", "tied"):
        return np.linalg.inv(prec)
    return 1.0 / prec


def log_det_cholesky(covariance_type, precisions_cholesky, n_features):
    """``log det P_k`` per component, as scikit-learn's ``_compute_log_det_cholesky``.

    Examples
    --------
    >>> log_det_cholesky("spherical", np.array([2.0]), 3).round(6)
    array([2.079442])
    """
    P = np.asarray(precisions_cholesky, dtype=np.float64)
    if covariance_type == "full":
        return _g.log_det_cholesky(P)
    if covariance_type == "tied":
        return np.log(np.diagonal(P)).sum()
    if covariance_type == "diag":
        return np.log(P).sum(axis=1)
    return n_features * np.log(P)


def default_shift(covariance_type, weights, means):
    """Where a pass accumulates its statistics: the means (full) or their weighted mean (others)."""
    means = np.asarray(means, dtype=np.float64)
    if covariance_type == "full":
        return means
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
    return w @ means


# -------------------------------------------------------------------- E-step

def slice_rows(n_features):
    """Rows per slice of the tied/diag/spherical kernels: ``Z`` (rows, 2d) stays near SLICE_BYTES.

    Examples
    --------
    >>> slice_rows(64), slice_rows(10_000)
    (2048, 209)
    """
    return max(64, min(_g.INNER_ROWS, _g.SLICE_BYTES // (16 * n_features)))


def prepare_parameters(covariance_type, weights, means, precisions_cholesky, *, shift=None, prune=True):
    """One iteration's parameters in the form the block kernels use, computed once (one graph key).

    Parameters
    ----------
    covariance_type : {"full", "tied", "diag", "spherical"}
    weights : ndarray of shape (n_components,)
    means : ndarray of shape (n_components, n_features)
    precisions_cholesky : ndarray
        Of :func:`parameter_shape`.
    shift : ndarray, optional
        Where the statistics are accumulated: (K, d) for full, (d,) for the others.
        Default :func:`default_shift`.
    prune : bool, default True
        Full only: the bounds its pruned E-step uses.

    Returns
    -------
    dict

    Examples
    --------
    >>> p = prepare_parameters("diag", np.ones(2) / 2, np.zeros((2, 3)), np.ones((2, 3)))
    >>> p["A"].shape
    (6, 2)
    """
    check_type(covariance_type)
    if shift is None:
        shift = default_shift(covariance_type, weights, means)
    if covariance_type == "full":
        p = _g.prepare_parameters(weights, means, precisions_cholesky, shift=shift, prune=prune)
        p["type"] = "full"
        return p
    weights = np.asarray(weights, dtype=np.float64)
    means = np.ascontiguousarray(means, dtype=np.float64)
    P = np.asarray(precisions_cholesky, dtype=np.float64)
    K, d = means.shape
    c = np.ascontiguousarray(shift, dtype=np.float64).reshape(d)
    mc = means - c
    with np.errstate(divide="ignore"):
        const = np.log(weights) + log_det_cholesky(covariance_type, P, d) - 0.5 * d * _LOG_2PI
    prepared = {"type": covariance_type, "n_components": K, "n_features": d, "shift": c}
    if covariance_type == "tied":
        # log p = y.M_k - |y|^2 / 2 - |M_k|^2 / 2 + const with y = (x - c) P, M_k = (m_k - c) P.
        M = mc @ P
        prepared.update(P=np.ascontiguousarray(P), Mt=np.ascontiguousarray(M.T),
                        const=const - 0.5 * np.einsum("kd,kd->k", M, M))
    else:
        prec = P ** 2 if covariance_type == "diag" else np.repeat((P ** 2)[:, None], d, axis=1)
        # log p = [z, z^2] @ [(m_k - c) prec_k; -prec_k / 2] - sum (m_k - c)^2 prec_k / 2 + const.
        A = np.empty((2 * d, K))
        A[:d] = (mc * prec).T
        A[d:] = -0.5 * prec.T
        prepared.update(A=A, const=const - 0.5 * np.einsum("kd,kd->k", mc * mc, prec))
    return prepared


def _shifted(X, prepared, work, *, squares):
    """``Z = [X - c, (X - c)^2]`` of a slice in float64 (``squares=False``: only ``X - c``)."""
    m, d = X.shape
    Z = scratch(work, "cov-z", (m, 2 * d if squares else d))
    np.subtract(X, prepared["shift"], out=Z[:, :d])
    if squares:
        np.multiply(Z[:, :d], Z[:, :d], out=Z[:, d:])
    return Z


def _slice_log_prob(Z, prepared, work):
    """(rows, K) weighted log-densities of a slice from its ``Z``."""
    m = Z.shape[0]
    K, d = prepared["n_components"], prepared["n_features"]
    out = scratch(work, "cov-logp", (m, K))
    if prepared["type"] == "tied":
        Y = np.matmul(Z[:, :d], prepared["P"], out=scratch(work, "cov-y", (m, d)))
        np.matmul(Y, prepared["Mt"], out=out)
        out -= 0.5 * np.einsum("ij,ij->i", Y, Y)[:, None]
    else:
        np.matmul(Z, prepared["A"], out=out)
    out += prepared["const"]
    return out


def weighted_log_prob(X, prepared, *, sparse=False):
    """``log N(x | k) + log w_k`` for a block: (rows, K).

    ``sparse`` (full only) sets provably negligible entries to ``-inf``
    (:func:`pipeline.kernels.gaussian.weighted_log_prob_sparse`); every use through
    ``exp(a - max)`` is unchanged.

    Examples
    --------
    >>> p = prepare_parameters("spherical", np.ones(1), np.zeros((1, 1)), np.ones(1))
    >>> weighted_log_prob(np.zeros((1, 1)), p).round(6)
    array([[-0.918939]])
    """
    if prepared["type"] == "full":
        return (_g.weighted_log_prob_sparse if sparse else _g.weighted_log_prob)(X, prepared)
    n = X.shape[0]
    d = prepared["n_features"]
    out = np.empty((n, prepared["n_components"]))
    step, work = slice_rows(d), {}
    squares = prepared["type"] != "tied"
    for r0 in range(0, n, step):
        Z = _shifted(X[r0:r0 + step], prepared, work, squares=squares)
        out[r0:r0 + Z.shape[0]] = _slice_log_prob(Z, prepared, work)
    return out


# -------------------------------------------------------------------- M-step

def _zero_stats(covariance_type, K, d):
    """Empty statistics of a tied, diag or spherical pass (the module docstring's)."""
    stats = {"N": np.zeros(K), "S1": np.zeros((K, d)), "log_likelihood": 0.0, "n": 0}
    if covariance_type == "tied":
        stats.update(S2=np.zeros((d, d)), T1=np.zeros(d))
    else:
        stats["S2"] = np.zeros((K, d))
    return stats


def _add_slice_stats(stats, Z, R, covariance_type, work):
    """Add a slice's statistics for responsibilities ``R`` (rows, K) to ``stats`` in place."""
    d = stats["S1"].shape[1]
    stats["N"] += R.sum(axis=0)
    stats["n"] += Z.shape[0]
    if covariance_type == "tied":
        Zc = Z[:, :d]
        stats["S1"] += R.T @ Zc
        stats["S2"] += Zc.T @ Zc  # syrk: the responsibility-free scatter of every row
        stats["T1"] += Zc.sum(axis=0)
    else:
        W = np.matmul(R.T, Z, out=scratch(work, "cov-w", (R.shape[1], 2 * d)))
        stats["S1"] += W[:, :d]
        stats["S2"] += W[:, d:]


def em_block_stats(X, prepared, *, work=None):
    """One row block's share of an EM iteration (E-step, then M-step statistics), any type.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
        Any real dtype; converted to float64 slice by slice.
    prepared : dict
        From :func:`prepare_parameters`.
    work : dict, optional
        Scratch buffers kept by the caller between blocks.

    Returns
    -------
    dict
        The statistics of the module docstring.

    Examples
    --------
    >>> p = prepare_parameters("diag", np.ones(1), np.array([[1.0]]), np.ones((1, 1)))
    >>> s = em_block_stats(np.array([[0.0], [2.0]]), p)
    >>> s["N"], s["S1"], s["S2"]
    (array([2.]), array([[0.]]), array([[2.]]))
    """
    if prepared["type"] == "full":
        return _g.em_block_stats(X, prepared=prepared, work=work)
    work = {} if work is None else work
    n = X.shape[0]
    K, d = prepared["n_components"], prepared["n_features"]
    stats = _zero_stats(prepared["type"], K, d)
    squares = prepared["type"] != "tied"
    step = slice_rows(d)
    for r0 in range(0, n, step):
        Z = _shifted(X[r0:r0 + step], prepared, work, squares=squares)
        logp = _slice_log_prob(Z, prepared, work)
        lse = _g.normalise_rows(logp)  # logp now holds the responsibilities
        _add_slice_stats(stats, Z, logp, prepared["type"], work)
        stats["log_likelihood"] += float(lse.sum())
    return stats


def resp_block_stats(covariance_type, X, resp, shift):
    """Statistics of a block for given responsibilities (the initialisations' M-step).

    Examples
    --------
    >>> s = resp_block_stats("spherical", np.array([[1.0], [3.0]]), np.ones((2, 1)), np.zeros(1))
    >>> s["S1"], s["S2"]
    (array([[4.]]), array([[10.]]))
    """
    if covariance_type == "full":
        return _g.resp_block_stats(X, resp, shift)
    X = np.asarray(X)
    resp = np.ascontiguousarray(resp, dtype=np.float64)
    n, d = X.shape
    stats = _zero_stats(covariance_type, resp.shape[1], d)
    prepared = {"shift": np.asarray(shift, dtype=np.float64).reshape(d)}
    work = {}
    step = slice_rows(d)
    for r0 in range(0, n, step):
        Z = _shifted(X[r0:r0 + step], prepared, work, squares=covariance_type != "tied")
        _add_slice_stats(stats, Z, resp[r0:r0 + step], covariance_type, work)
    return stats


def scatter_block_stats(X, shift):
    """``S2 = sum (x - c)(x - c)^T``, ``T1 = sum (x - c)`` and ``n`` of a block (tied's every-row part).

    Examples
    --------
    >>> scatter_block_stats(np.array([[1.0], [3.0]]), np.zeros(1))["S2"]
    array([[10.]])
    """
    stats = resp_block_stats("tied", X, np.zeros((X.shape[0], 1)), shift)
    return {"S2": stats["S2"], "T1": stats["T1"], "n": stats["n"]}


def combine_stats(parts):
    """Sum the statistics of several blocks, any type (associative: any tree gives the same).

    Examples
    --------
    >>> a = {"N": np.ones(1), "S1": np.ones((1, 1)), "log_likelihood": -1.0, "n": 1}
    >>> combine_stats([a, a])["n"]
    2
    """
    out = None
    for p in parts:  # iterate, never list: one extra set alive at a time
        if out is None:
            out = {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
            continue
        for k, v in p.items():
            out[k] += v
    return out


def params_from_stats(covariance_type, stats, shift, reg_covar, *, n_samples=None):
    """The M-step for any type: weights, means and covariances from summed statistics.

    scikit-learn's ``_estimate_gaussian_parameters`` (``nk = N + 10 eps``,
    ``means = sum r x / nk``, ``reg_covar`` on the diagonal, weights ``nk / sum nk``
    or ``nk / n_samples``), rewritten around the shift ``c`` with ``delta_k = m_k - c``:

    * diag: ``(S2 - 2 delta S1 + N delta^2) / nk + reg``; spherical: its mean over features;
    * tied: ``(X^T X - sum nk m m^T) / sum nk`` expanded around ``c``:
      ``S2 - sum nk delta delta^T + c u^T + u c^T + (n - sum nk) c c^T`` with
      ``u = T1 - sum nk delta`` (zero up to rounding when every row's responsibilities
      sum to 1; not for scikit-learn's one-hot initialisations, which it reproduces).

    Examples
    --------
    >>> s = resp_block_stats("diag", np.array([[1.0], [3.0]]), np.ones((2, 1)), np.zeros(1))
    >>> w, m, c = params_from_stats("diag", s, np.zeros(1), 0.0)
    >>> w, m.round(12), c.round(12)
    (array([1.]), array([[2.]]), array([[1.]]))
    """
    if covariance_type == "full":
        return _g.params_from_stats(stats, shift, reg_covar, n_samples=n_samples)
    check_type(covariance_type)
    c = np.asarray(shift, dtype=np.float64)
    N = np.asarray(stats["N"], dtype=np.float64)
    S1 = stats["S1"]
    nk = N + 10 * _EPS
    delta = (S1 + (N - nk)[:, None] * c) / nk[:, None]  # m - c, with sum r x = S1 + N c
    means = c + delta
    if covariance_type == "tied":
        # In place: d x d temporaries one at a time (S2 is the size of the parameters).
        u = stats["T1"] - nk @ delta
        cov = np.array(stats["S2"], dtype=np.float64, copy=True)
        cov -= (delta.T * nk) @ delta
        # c u^T + u c^T + (n - sum nk) c c^T  ==  c v^T + v c^T  with  v = u + (n - sum nk) c / 2.
        v = u + 0.5 * (stats["n"] - nk.sum()) * c
        cov += np.outer(c, v)
        cov += np.outer(v, c)
        cov /= nk.sum()
        cov[np.diag_indices_from(cov)] += reg_covar
    else:
        # sum r (x - m)^2 / nk, plus the m^2 (nk - N) / nk that scikit-learn's
        # sum r x^2 / nk - m^2 holds besides it (nk = N + 10 eps: it matters for
        # one-hot starts and emptied components, whose variance is then ~reg_covar).
        cov = (stats["S2"] - 2 * delta * S1 + N[:, None] * delta * delta) / nk[:, None]
        cov += means * means * ((nk - N) / nk)[:, None]
        cov += reg_covar
        if covariance_type == "spherical":
            cov = cov.mean(axis=1)
    weights = nk / (nk.sum() if n_samples is None else n_samples)
    return weights, means, cov


# ------------------------------------------------------------------- costs

def stats_bytes(covariance_type, n_components, n_features):
    """Bytes of one set of sufficient statistics."""
    K, d = n_components, n_features
    if covariance_type == "full":
        return _g.stats_bytes(K, d)
    if covariance_type == "tied":
        return (K * (d + 1) + d * d + d) * 8
    return K * (2 * d + 1) * 8


def em_workspace(covariance_type, rows, group, *, n_features, n_components, itemsize, grouped=False):
    """Bytes one EM task holds for a block of ``rows`` rows, as :class:`Workspace` rows.

    Full: :func:`pipeline.kernels.gaussian.em_workspace`.  The others work on slices of
    :func:`slice_rows` rows: ``Z`` (the shifted slice and its squares, float64), the
    (slice, K) log-probabilities turned responsibilities in place, and the
    moments' GEMM output; tied adds ``(x - c) P``.
    """
    if covariance_type == "full":
        return _g.em_workspace(rows, group, n_features=n_features, n_components=n_components,
                               itemsize=itemsize, grouped=grouped)
    d, K = n_features, n_components
    m = min(rows, slice_rows(d))
    width = d if covariance_type == "tied" else 2 * d
    items = [
        Workspace("[X - c, (X - c)^2] slice" if width > d else "X - c slice", m * width * 8,
                  f"{m} rows, float64: the E-step's and the M-step's GEMM operand"),
        Workspace("log-probabilities, responsibilities", 2 * m * K * 8, "in place, plus exp's row sums"),
    ]
    if covariance_type == "tied":
        items.append(Workspace("(X - c) P slice, scatter", (m * d + 2 * d * d + K * d) * 8,
                               "the shared factor's GEMM; X^T X and R^T X of the slice"))
    else:
        items.append(Workspace("R^T Z", K * 2 * d * 8, "the moments of every component"))
    return items
