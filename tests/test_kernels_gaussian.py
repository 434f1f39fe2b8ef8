"""Gaussian-mixture and k-means kernels against independent references.

References: ``scipy.stats.multivariate_normal.logpdf``, scikit-learn's private GMM
functions (``_estimate_gaussian_parameters``, ``_compute_precision_cholesky``,
``_estimate_log_gaussian_prob``) and plain NumPy loops.
"""

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import _gaussian_mixture as skgm

from pipeline.kernels import gaussian as g
from pipeline.kernels import kmeans as km


def _random_spd(rng, K, d, scale=1.0):
    A = rng.standard_normal((K, d, d))
    return scale * (A @ A.transpose(0, 2, 1) / d + 0.5 * np.eye(d))


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    K, d, n = 4, 5, 300
    means = rng.standard_normal((K, d)) * 3
    cov = _random_spd(rng, K, d)
    X = rng.standard_normal((n, d)) * 2 + 1.0
    w = rng.dirichlet(np.ones(K))
    return X, w, means, cov


def test_precision_cholesky_matches_sklearn_and_inverts(problem):
    _, _, _, cov = problem
    P = g.compute_precision_cholesky(cov)
    ref = skgm._compute_precision_cholesky(cov, "full")
    # Same factorisation; LU solve vs triangular solve differ by rounding only.
    np.testing.assert_allclose(P, ref, rtol=1e-12, atol=1e-13)
    for k in range(cov.shape[0]):
        np.testing.assert_allclose(P[k] @ P[k].T @ cov[k], np.eye(cov.shape[1]), atol=1e-10)
        assert np.allclose(P[k], np.triu(P[k]))
    # log det P = -0.5 log det cov.
    np.testing.assert_allclose(g.log_det_cholesky(P), -0.5 * np.linalg.slogdet(cov)[1], rtol=1e-12)


def test_precision_cholesky_not_positive_definite_says_reg_covar():
    bad = np.array([[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="increase reg_covar"):
        g.compute_precision_cholesky(bad)


def test_precision_cholesky_from_precisions_matches_sklearn(problem):
    _, _, _, cov = problem
    prec = np.linalg.inv(cov)
    ours = g.precision_cholesky_from_precisions(prec)
    ref = skgm._compute_precision_cholesky_from_precisions(prec, "full", xp=np)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("group", [None, 1, 3])
def test_log_gaussian_prob_matches_scipy(problem, group):
    X, _, means, cov = problem
    P = g.compute_precision_cholesky(cov)
    ours = g.estimate_log_gaussian_prob(X, means, P, component_group=group)
    ref = np.column_stack([multivariate_normal(means[k], cov[k]).logpdf(X) for k in range(len(means))])
    # Two different factorisations of the same density (scipy uses eigh): agreement
    # to ~1e-12 relative of log-densities of order 10.
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)
    sk = skgm._estimate_log_gaussian_prob(X, means, P, "full")
    np.testing.assert_allclose(ours, sk, rtol=1e-12, atol=1e-11)


def test_int_and_float32_blocks_are_converted(problem):
    X, _, means, cov = problem
    P = g.compute_precision_cholesky(cov)
    Xi = np.round(X).astype(np.int32)
    np.testing.assert_array_equal(
        g.estimate_log_gaussian_prob(Xi, means, P), g.estimate_log_gaussian_prob(Xi.astype(float), means, P)
    )
    X32 = X.astype(np.float32)
    np.testing.assert_array_equal(
        g.estimate_log_gaussian_prob(X32, means, P), g.estimate_log_gaussian_prob(X32.astype(float), means, P)
    )


def _sklearn_iteration(X, w, means, P, reg):
    """One scikit-learn EM iteration: E with theta_t, M -> theta_{t+1}."""
    wlp = skgm._estimate_log_gaussian_prob(X, means, P, "full") + np.log(w)
    lpn = logsumexp(wlp, axis=1)
    resp = np.exp(wlp - lpn[:, None])
    nk, m, c = skgm._estimate_gaussian_parameters(X, resp, reg, "full")
    return nk / nk.sum(), m, c, lpn.mean()


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("split", [[300], [1, 150, 149], [7] * 42 + [6]])
def test_block_stats_reproduce_sklearn_em_iteration(problem, offset, split):
    X, w, means, cov = problem
    # A large offset checks the shifted scatter: E[xx^T] - mm^T would lose ~8 digits.
    X = X + offset
    means = means + offset
    P = g.compute_precision_cholesky(cov)
    prepared = g.prepare_parameters(w, means, P)
    parts, start = [], 0
    for size in split:
        parts.append(g.em_block_stats(X[start:start + size], prepared=prepared))
        start += size
    # Combine as an unbalanced tree to exercise associativity.
    stats = g.combine_stats([parts[0], g.combine_stats(parts[1:])]) if len(parts) > 1 else parts[0]
    w1, m1, c1 = g.params_from_stats(stats, means, 1e-6)
    rw, rm, rc, rlb = _sklearn_iteration(X, w, means, P, 1e-6)
    # Same formulas; only summation order differs (blocks, syrk vs gemm): 1e-10
    # relative leaves 4+ orders of margin over the 1e-6 contract.
    np.testing.assert_allclose(w1, rw, rtol=1e-10)
    np.testing.assert_allclose(m1, rm, rtol=1e-10)
    np.testing.assert_allclose(c1, rc, rtol=1e-8 if offset else 1e-10, atol=1e-12 * (1 + offset))
    np.testing.assert_allclose(g.mean_log_likelihood(stats), rlb, rtol=1e-12)
    assert stats["n"] == X.shape[0]


def test_block_stats_naive_loop(problem):
    X, w, means, cov = problem
    P = g.compute_precision_cholesky(cov)
    shift = means + 0.3
    s = g.em_block_stats(X, np.log(w), means, P, shift)
    # Naive per-row reference of the definitions.
    K, d = means.shape
    N = np.zeros(K); S1 = np.zeros((K, d)); S2 = np.zeros((K, d, d)); ll = 0.0
    for x in X:
        lp = np.array([np.log(w[k]) + multivariate_normal(means[k], cov[k]).logpdf(x) for k in range(K)])
        l = logsumexp(lp); ll += l
        r = np.exp(lp - l)
        for k in range(K):
            N[k] += r[k]; S1[k] += r[k] * (x - shift[k]); S2[k] += r[k] * np.outer(x - shift[k], x - shift[k])
    # Per-row sums of 300 terms in a different order: 1e-9 relative.
    np.testing.assert_allclose(s["N"], N, rtol=1e-9)
    np.testing.assert_allclose(s["S1"], S1, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s["S2"], S2, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s["log_likelihood"], ll, rtol=1e-12)


def test_init_from_resp_weights_over_n_samples(problem):
    X, _, _, _ = problem
    rng = np.random.default_rng(1)
    resp = rng.uniform(size=(X.shape[0], 3)); resp /= resp.sum(1, keepdims=True)
    shift = np.zeros((3, X.shape[1]))
    w, m, c = g.params_from_stats(g.resp_block_stats(X, resp, shift), shift, 1e-6, n_samples=X.shape[0])
    nk, rm, rc = skgm._estimate_gaussian_parameters(X, resp, 1e-6, "full")
    np.testing.assert_allclose(w, nk / X.shape[0], rtol=1e-12)
    np.testing.assert_allclose(m, rm, rtol=1e-10)
    np.testing.assert_allclose(c, rc, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- k-means kernels

def test_labels_block_stats_equals_one_hot_resp(problem):
    X, _, means, _ = problem
    lab = ((X[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    resp = np.zeros((X.shape[0], len(means))); resp[np.arange(len(X)), lab] = 1
    a = km.labels_block_stats(X, means)
    b = g.resp_block_stats(X, resp, means)
    for key in ("N", "S1", "S2"):
        # Row subset vs zero-weighted full rows: summation order only.
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-10)


def test_lloyd_block_stats_naive(problem):
    X, _, means, _ = problem
    D = ((X[:, None, :] - means[None]) ** 2).sum(-1)
    lab = D.argmin(1)
    s = km.combine_lloyd([km.lloyd_block_stats(X[:100], means, 2), km.lloyd_block_stats(X[100:], means, 2)])
    np.testing.assert_array_equal(s["counts"], np.bincount(lab, minlength=len(means)))
    np.testing.assert_allclose(s["sums"], np.array([X[lab == k].sum(0) for k in range(len(means))]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s["inertia"], D.min(1).sum(), rtol=1e-10)
    np.testing.assert_allclose(np.sort(s["far_d"]), np.sort(D.min(1))[-2:], rtol=1e-10)


def test_moments_combine_matches_numpy(problem):
    X, _, _, _ = problem
    X = X + 1e6
    n, mean, m2 = km.combine_moments([km.moments_block(X[:37]), km.moments_block(X[37:200]), km.moments_block(X[200:])])
    assert n == len(X)
    # Chan's update: no cancellation despite the 1e6 offset.
    np.testing.assert_allclose(m2 / n, X.var(0), rtol=1e-9)


def test_kpp_potentials_and_locate(problem):
    X, _, means, _ = problem
    dmin = ((X[:, None, :] - means[None, :2]) ** 2).sum(-1).min(1)
    cand = X[[5, 17]]
    pot = km.kpp_block_potentials(X, means[:2], cand)
    dc = ((X[:, None, :] - cand[None]) ** 2).sum(-1)
    np.testing.assert_allclose(pot[:-1], np.minimum(dc, dmin[:, None]).sum(0), rtol=1e-10)
    np.testing.assert_allclose(pot[-1], dmin.sum(), rtol=1e-10)
    t = np.array([0.0, dmin.sum() / 2, dmin.sum() * 2])
    np.testing.assert_array_equal(km.kpp_locate(X, means[:2], t),
                                  np.minimum(np.searchsorted(np.cumsum(dmin), t), len(X) - 1))


def test_zero_responsibilities_skipped_exactly():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((500, 7))
    resp = rng.uniform(size=(500, 3))
    resp[rng.uniform(size=resp.shape) < 0.8] = 0.0  # most rows of each column exactly 0
    resp[:, 2] = 0.0  # and one component with nothing at all
    shift = rng.standard_normal((3, 7))
    s = g.resp_block_stats(X, resp, shift)
    for k in range(3):
        D = X - shift[k]
        # The compacted GEMM sums the same non-zero terms: 1e-12 relative.
        np.testing.assert_allclose(s["S2"][k], (resp[:, k, None] * D).T @ D, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s["S1"][k], resp[:, k] @ D, rtol=1e-12, atol=1e-12)
    assert not s["S2"][2].any() and s["N"][2] == 0.0


def test_budget_model_mirrors_kernel_slices():
    # pipeline.kernels.gaussian.em_workspace sizes its items from the kernels' slice rules; check
    # the item against the rule itself.
    from pipeline.budget import plan

    for d, K in ((64, 16), (900, 2), (900, 200), (10_000, 200)):
        p = plan("gmm", n_samples=1_000_000, n_features=d, n_components=K, itemsize=8,
                 memory_budget="4TiB", threads=2)
        item = next(i for i in p.items if i.name.startswith("X @"))
        rows = min(p["rows"], g.inner_rows(d))
        assert item.nbytes == rows * min(g.gemm_group(K, d), p["component_group"]) * d * 8


def _separated(rng, K=10, d=8, n=3000, offset=0.0, stretch=False):
    """Separated blobs; with ``stretch`` one component straddles two blobs.

    Most (row, component) pairs are beyond exp()'s underflow, some are not (log-density
    gaps between 20 and 745): a looser rule than the exact one would be caught.
    """
    centers = rng.uniform(-22, 22, size=(K, d)) + offset
    X = centers[rng.integers(0, K, n)] + rng.standard_normal((n, d))
    means = centers + 0.1 * rng.standard_normal((K, d))
    cov = np.repeat(np.eye(d)[None], K, axis=0) * rng.uniform(0.8, 1.2, size=(K, 1, 1))
    if stretch:  # component 0 covers blobs 0 and 1: long along their axis
        u = centers[1] - centers[0]
        means[0] = (centers[0] + centers[1]) / 2
        cov[0] = np.eye(d) + np.outer(u, u) / 4
    w = rng.dirichlet(np.ones(K) * 5)
    return X, w, means, g.compute_precision_cholesky(cov)


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("stretch", [False, True])
def test_pruned_e_step_skips_only_exact_zeros(offset, stretch):
    # The fused pass leaves out (row, component) pairs whose responsibility is provably
    # exactly 0.0: compare with the dense log-densities entry by entry.
    rng = np.random.default_rng(11)
    X, w, means, P = _separated(rng, offset=offset, stretch=stretch)
    prepared = g.prepare_parameters(w, means, P)
    assert (prepared["bounds"]["sel"].size > 0) == stretch  # the directional bound when stretched
    logp = g._pruned_log_prob(X, prepared, {})
    assert logp is not None
    dense = g.weighted_log_prob(X, prepared)
    skipped = np.isneginf(logp) & np.isfinite(dense)
    gap = dense - dense.max(axis=1, keepdims=True)
    assert ((gap < -20) & (gap > -745)).mean() > 0.05  # the data have pairs in between
    assert skipped.mean() > 0.5  # most pairs are skipped on separated data ...
    # ... and each skipped one has exp(a - max) == 0.0 exactly in the dense computation.
    assert not np.exp(dense - dense.max(axis=1, keepdims=True))[skipped].any()
    np.testing.assert_allclose(logp[~skipped], dense[~skipped], rtol=1e-12)
    # The whole block's statistics are those of the dense pass.
    dense_prep = {k: v for k, v in prepared.items() if k != "bounds"}
    a = g.em_block_stats(X, prepared=prepared, slice_rows=512)
    b = g.em_block_stats(X, prepared=dense_prep, slice_rows=512)
    for key in ("N", "S1", "S2"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-12 * np.abs(b[key]).max())
    np.testing.assert_allclose(a["log_likelihood"], b["log_likelihood"], rtol=1e-13)


def test_pruning_gives_way_to_the_dense_pass_when_soft(problem):
    # Overlapping components: nothing provably negligible, the slice is computed densely.
    X, w, means, cov = problem
    prepared = g.prepare_parameters(w, means, g.compute_precision_cholesky(cov))
    assert g._pruned_log_prob(X, prepared, {}) is None
    dense_prep = {k: v for k, v in prepared.items() if k != "bounds"}
    a, b = g.em_block_stats(X, prepared=prepared), g.em_block_stats(X, prepared=dense_prep)
    np.testing.assert_array_equal(a["S2"], b["S2"])
    assert a["log_likelihood"] == b["log_likelihood"]


def test_pruned_pass_keeps_nan_rows_like_the_dense_pass():
    rng = np.random.default_rng(3)
    X, w, means, P = _separated(rng, n=400)
    X[17, 2] = np.nan
    prepared = g.prepare_parameters(w, means, P)
    logp = g._pruned_log_prob(X, prepared, {})
    assert logp is not None and np.isnan(logp[17]).all()  # never skipped, computed as NaN
    assert np.isnan(g.em_block_stats(X, prepared=prepared)["log_likelihood"])


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_log_prob_bounds_hold_for_every_pair(offset):
    # The pruning's two bounds bracket every dense log-density, for round, stretched
    # (rank-one excess) and random full covariances, near and far from the origin.
    rng = np.random.default_rng(8)
    K, d, n = 9, 12, 2000
    means = rng.uniform(-10, 10, size=(K, d)) + offset
    cov = _random_spd(rng, K, d)
    for k in range(3):  # stretched along one or two directions
        u = rng.standard_normal((d, 1 + k % 2)) * 5
        cov[k] = np.eye(d) + u @ u.T
    X = means[rng.integers(0, K, n)] + rng.standard_normal((n, d)) * 4
    prepared = g.prepare_parameters(rng.dirichlet(np.ones(K)), means, g.compute_precision_cholesky(cov))
    assert prepared["bounds"]["sel"].size >= 3
    lower, upper = g._log_prob_bounds(X, prepared, {})
    dense = g.weighted_log_prob(X, prepared)
    slack = 1e-9 * np.abs(dense)
    assert (lower <= dense + slack).all() and (upper >= dense - slack).all()
    # ... and they are not vacuous: on most pairs within a factor of a few.
    assert np.median((upper - dense) / np.abs(dense)) < 0.5


def test_bounds_only_where_pruning_can_pay():
    rng = np.random.default_rng(4)
    X, w, means, P = _separated(rng, K=3, n=50)
    assert "bounds" in g.prepare_parameters(w, means, P)
    assert "bounds" not in g.prepare_parameters(w, means, P, prune=False)
    # K = 2: every row keeps one of two components, never enough to skip.
    assert "bounds" not in g.prepare_parameters(w[:2] / w[:2].sum(), means[:2], P[:2])


def test_empty_block_adds_zeros():
    rng = np.random.default_rng(4)
    X, w, means, P = _separated(rng, K=3, n=50)
    prepared = g.prepare_parameters(w, means, P)
    empty = g.em_block_stats(X[:0], prepared=prepared)
    whole = g.em_block_stats(X, prepared=prepared)
    both = g.combine_stats([empty, whole])
    assert empty["n"] == 0 and not empty["S2"].any() and empty["log_likelihood"] == 0.0
    np.testing.assert_array_equal(both["S2"], whole["S2"])
    assert both["log_likelihood"] == whole["log_likelihood"]
