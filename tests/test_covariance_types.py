"""The four covariance types against scikit-learn: kernels, EM paths, criteria, sampling, stores, CLI.

References are scikit-learn's own functions and estimator (the version the test
extras install).  Float32 input is fitted in float64 (every statistic accumulated in
float64): its reference is scikit-learn on the same values cast to float64.
"""

import subprocess
import sys
import warnings

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.mixture import _gaussian_mixture as skg

import pipeline as pl
from conftest import row_chunks
from pipeline import mixture, runtime
from pipeline.budget import plan
from pipeline.cli import COVARIANCE_TYPES as CLI_TYPES
from pipeline.errors import BudgetError, InputError
from pipeline.kernels import covariances as cv

TYPES = cv.COVARIANCE_TYPES
RTOL = 1e-6


def _offset_wine():
    # Wine's columns span 0.1 .. 1680; + 100 moves every column off the origin.
    return load_wine().data + 100.0


def _synthetic(dtype=np.float64):
    rng = np.random.default_rng(7)
    A = rng.standard_normal((4, 5, 5))
    X = np.vstack([rng.standard_normal((300, 5)) @ A[k] + 2.0 * k for k in range(4)]) + 500.0
    return X.astype(dtype)


DATA = {
    "iris": (lambda: load_iris().data, 3),
    "wine": (lambda: load_wine().data, 3),
    "breast_cancer": (lambda: load_breast_cancer().data[:, :10], 2),
    "digits": (lambda: load_digits().data[:600], 5),
    "synthetic": (_synthetic, 4),
}


def _start(X, K, cov_type, seed=0):
    """One scikit-learn M-step from a random_from_data start: the type's *_init arrays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = SkGaussianMixture(K, covariance_type=cov_type, init_params="random_from_data", random_state=seed,
                              max_iter=1, reg_covar=1e-3).fit(X)
    return dict(weights_init=s.weights_, means_init=s.means_, precisions_init=s.precisions_)


def _fit_both(X, K, cov_type, ref_X=None, **kw):
    init = _start(X if ref_X is None else ref_X, K, cov_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SkGaussianMixture(K, covariance_type=cov_type, **init, **kw).fit(X if ref_X is None else ref_X)
        ours = pl.GaussianMixture(K, covariance_type=cov_type, memory_budget="256MiB", **init, **kw).fit(X)
    return ref, ours


def _assert_same(ref, ours, rtol=RTOL):
    assert ours.n_iter_ == ref.n_iter_
    assert ours.converged_ == ref.converged_
    np.testing.assert_allclose(ours.lower_bound_, ref.lower_bound_, rtol=rtol)
    np.testing.assert_allclose(ours.weights_, ref.weights_, rtol=rtol)
    for name in ("means_", "covariances_", "precisions_cholesky_", "precisions_"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.shape == b.shape, name
        # Entries near 0 (means of centred columns, off-diagonal terms): on the array's scale.
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)


# ---------------------------------------------------------------------- kernels

@pytest.mark.parametrize("cov_type", TYPES)
def test_kernels_equal_sklearn_functions(cov_type):
    X = _offset_wine()
    rng = np.random.default_rng(0)
    resp = rng.random((len(X), 3))
    resp /= resp.sum(axis=1)[:, None]
    nk, means, cov = skg._estimate_gaussian_parameters(X, resp, 1e-6, cov_type)
    pc = skg._compute_precision_cholesky(cov, cov_type)
    weights = nk / nk.sum()

    shift = cv.default_shift(cov_type, weights, means)
    w, m, c = cv.params_from_stats(cov_type, cv.resp_block_stats(cov_type, X, resp, shift), shift, 1e-6)
    np.testing.assert_allclose(w, weights, rtol=1e-13)
    np.testing.assert_allclose(m, means, rtol=1e-12)
    np.testing.assert_allclose(c, cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())
    np.testing.assert_allclose(cv.precision_cholesky(cov_type, cov), pc, rtol=1e-10, atol=1e-14)
    prec = cv.precisions_from_cholesky(cov_type, pc)
    np.testing.assert_allclose(cv.precision_cholesky_from_precisions(cov_type, prec),
                               skg._compute_precision_cholesky_from_precisions(prec, cov_type, xp=np),
                               rtol=1e-10, atol=1e-14)

    ref = skg._estimate_log_gaussian_prob(X, means, pc, cov_type) + np.log(weights)
    prepared = cv.prepare_parameters(cov_type, weights, means, pc)
    ours = cv.weighted_log_prob(X, prepared)
    # scikit-learn's diag/spherical expansions round at eps * |x|^2 (~1e-9 here).
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-8)

    stats = cv.em_block_stats(X, prepared)
    from scipy.special import logsumexp
    np.testing.assert_allclose(stats["log_likelihood"], logsumexp(ref, axis=1).sum(), rtol=1e-11)
    r = np.exp(ref - logsumexp(ref, axis=1)[:, None])
    np.testing.assert_allclose(stats["N"], r.sum(axis=0), rtol=1e-9)


def test_tied_one_hot_start_uses_every_row_as_sklearn_does():
    # scikit-learn's tied covariance from one-hot responsibilities (k-means++ and
    # random_from_data starts) is X^T X over every row minus the K chosen means'.
    X = load_iris().data
    idx = np.array([3, 70, 120])
    resp = np.zeros((len(X), 3))
    resp[idx, np.arange(3)] = 1
    _, means, cov = skg._estimate_gaussian_parameters(X, resp, 1e-6, "tied")
    shift = X[idx].mean(axis=0)
    stats = cv.resp_block_stats("tied", X[idx], np.eye(3), shift)
    stats.update(cv.scatter_block_stats(X, shift))
    _, m, c = cv.params_from_stats("tied", stats, shift, 1e-6, n_samples=len(X))
    np.testing.assert_allclose(m, means, rtol=1e-13)
    np.testing.assert_allclose(c, cov, rtol=1e-10)


@pytest.mark.parametrize("cov_type", ["diag", "spherical", "tied"])
def test_float32_far_from_origin_gives_true_variances(cov_type):
    # scikit-learn#30382: float32 data far from the origin, E[x^2] - E[x]^2 in float32
    # cancels to garbage or below zero.  Statistics here are float64 around one shift
    # (the weighted mean of the means), which is neither cluster's mean.
    rng = np.random.default_rng(1)
    A = 1e4 + 0.05 * rng.standard_normal((3000, 3))
    B = 1e4 + 1.0 + 0.02 * rng.standard_normal((2000, 3))
    X = np.vstack([A, B]).astype(np.float32)
    X64, labels = X.astype(np.float64), np.repeat([0, 1], [3000, 2000])
    means = np.array([X64[labels == k].mean(axis=0) for k in (0, 1)])
    gm = pl.GaussianMixture(2, covariance_type=cov_type, reg_covar=0.0, max_iter=2, tol=0.0,
                            means_init=means, memory_budget="64MiB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X)
    var = np.array([X64[labels == k].var(axis=0) for k in (0, 1)])  # separated: hard responsibilities
    want = {"diag": var, "spherical": var.mean(axis=1),
            "tied": np.diag(sum(np.cov(X64[labels == k].T, bias=True) * (labels == k).sum()
                                for k in (0, 1)) / len(X))}[cov_type]
    got = np.diag(gm.covariances_) if cov_type == "tied" else gm.covariances_
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("cov_type", ["diag", "spherical"])
def test_one_hot_start_far_from_origin_as_sklearn(cov_type):
    # scikit-learn's diag variance sum r x^2 / nk - m^2 holds m^2 (nk - N) / nk besides
    # sum r (x - m)^2 / nk (nk = N + 10 eps): ~20% of reg_covar at |x| ~ 1e4 for the
    # one-hot starts; its own rounding there is ~2%.
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 4)) + 1e4
    idx = np.array([3, 100, 200])
    resp = np.zeros((300, 3))
    resp[idx, np.arange(3)] = 1
    _, _, cov = skg._estimate_gaussian_parameters(X, resp, 1e-6, cov_type)
    shift = X[idx].mean(axis=0)
    _, _, ours = cv.params_from_stats(cov_type, cv.resp_block_stats(cov_type, X[idx], np.eye(3), shift), shift,
                                      1e-6, n_samples=300)
    np.testing.assert_allclose(ours, cov, rtol=0.05)


# ------------------------------------------------------------------ EM paths

@pytest.mark.parametrize("cov_type", TYPES)
@pytest.mark.parametrize("name", sorted(DATA))
def test_same_em_path_as_sklearn(name, cov_type):
    load, K = DATA[name]
    X = load()
    ref, ours = _fit_both(X, K, cov_type, max_iter=10, tol=0.0)
    assert ours.n_iter_ == 10
    _assert_same(ref, ours)
    np.testing.assert_allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=RTOL)


@pytest.mark.parametrize("cov_type", TYPES)
def test_convergence_at_the_same_iteration(cov_type):
    X = load_iris().data
    ref, ours = _fit_both(X, 3, cov_type, max_iter=300, tol=1e-9)
    assert ref.converged_ and ref.n_iter_ > 5
    _assert_same(ref, ours)


@pytest.mark.parametrize("cov_type", TYPES)
def test_float32_input_equals_sklearn_on_float64(cov_type):
    X32 = _synthetic(np.float32)
    ref, ours = _fit_both(X32, 4, cov_type, ref_X=X32.astype(np.float64), max_iter=10, tol=0.0)
    _assert_same(ref, ours)


@pytest.mark.parametrize("cov_type", ["tied", "diag", "spherical"])
@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_init_params_start_as_sklearn(cov_type, init_params):
    # kmeans / k-means++ follow scikit-learn's algorithm but not its random stream
    # draw for draw on every platform: on iris' well-separated setosa they reach the
    # same fit; random_from_data draws the same rows, random the same row weights in
    # law only, so it is checked for a sensible, deterministic start.
    X = load_iris().data
    kw = dict(covariance_type=cov_type, init_params=init_params, random_state=0, max_iter=100, tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pl.GaussianMixture(3, memory_budget="64MiB", **kw).fit(X)
        b = pl.GaussianMixture(3, memory_budget="64MiB", **kw).fit(X)
        ref = SkGaussianMixture(3, **kw).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)
    assert np.isfinite(a.lower_bound_) and a.covariances_.shape == ref.covariances_.shape
    if init_params == "random_from_data":
        _assert_same(ref, a)
    elif init_params != "random":
        np.testing.assert_allclose(a.lower_bound_, ref.lower_bound_, rtol=1e-4)


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_em_step_independent_of_chunking(data):
    cov_type = data.draw(st.sampled_from(TYPES))
    X = _offset_wine()
    init = _start(X, 3, cov_type, seed=4)
    pc = cv.precision_cholesky_from_precisions(cov_type, init["precisions_init"])
    sizes = data.draw(st.lists(st.integers(1, 60), min_size=1, max_size=12))
    Xd = da.from_array(X, chunks=(row_chunks(sizes, len(X)), X.shape[1]))
    shift = cv.default_shift(cov_type, init["weights_init"], init["means_init"])
    graph = mixture._em_stats_graph(Xd, init["weights_init"], init["means_init"], pc, shift, None,
                                    data.draw(st.integers(2, 9)), covariance_type=cov_type)
    (stats,) = runtime.compute(graph)
    ref = cv.em_block_stats(X, cv.prepare_parameters(cov_type, init["weights_init"], init["means_init"], pc,
                                                     shift=shift))
    assert stats.keys() == ref.keys()
    # First moments around the shift sum to about zero: on the scale of their terms.
    first = 1e-12 * len(X) * np.abs(X - (shift if shift.ndim == 1 else shift[0])).max()
    for key, value in ref.items():
        atol = first if key in ("S1", "T1") else 1e-9 * np.abs(value).max()
        np.testing.assert_allclose(stats[key], value, rtol=1e-10, atol=atol)


@pytest.mark.parametrize("cov_type", ["diag", "tied"])
def test_any_budget_and_zarr_input(tmp_path, cov_type):
    X = _synthetic()
    url = str(tmp_path / "x.zarr")
    pl.write_dataset(url, X, chunk_rows=97)
    init = _start(X, 4, cov_type)
    fits = [pl.GaussianMixture(4, covariance_type=cov_type, max_iter=8, tol=0.0, memory_budget=b, **init)
            for b in ("40MiB", "1GiB")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits[0].fit(url)
        fits[1].fit(X)
    assert fits[0].plan_["rows"] < len(X)  # really chunked
    _assert_same(fits[1], fits[0], rtol=1e-10)


# ---------------------------------------------------- the rest of the estimator

@pytest.mark.parametrize("cov_type", TYPES)
def test_bic_aic_scores_and_predictions(cov_type):
    X = load_wine().data
    ref, ours = _fit_both(X, 3, cov_type, max_iter=10, tol=0.0)
    assert ours._n_parameters() == ref._n_parameters()
    np.testing.assert_allclose(ours.bic(X), ref.bic(X), rtol=1e-8)
    np.testing.assert_allclose(ours.aic(X), ref.aic(X), rtol=1e-8)
    np.testing.assert_allclose(ours.score_samples(X), ref.score_samples(X), rtol=1e-8)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-8)
    assert ours.n_features_in_ == X.shape[1]
    init = _start(X, 3, cov_type)
    gm = pl.GaussianMixture(3, covariance_type=cov_type, max_iter=10, tol=0.0, memory_budget="64MiB", **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = gm.fit_predict(X)
    np.testing.assert_array_equal(labels, gm.predict(X))


@pytest.mark.parametrize("cov_type", TYPES)
def test_sample_is_sklearns(cov_type, tmp_path):
    X = load_iris().data
    ref, ours = _fit_both(X, 3, cov_type, max_iter=5, tol=0.0, random_state=11)
    # Same parameters, so that only the draws are compared.
    for name in ("weights_", "means_", "covariances_"):
        setattr(ref, name, getattr(ours, name))
    Xs, ys = ours.sample(1000)
    Xr, yr = ref.sample(1000)
    np.testing.assert_array_equal(ys, yr)
    np.testing.assert_allclose(Xs, Xr, rtol=1e-12, atol=1e-12)
    # Out of core, in pieces of a few rows: the same numbers, written as a dataset.
    url = str(tmp_path / "s.zarr")
    ds = ours.sample(1000, out=url)
    np.testing.assert_allclose(ds.X.compute(), Xr, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ds.y.compute(), yr)
    assert ds.X.shape == (1000, 4)


def test_sample_to_store_in_small_pieces_and_chunks(tmp_path, monkeypatch):
    X = load_iris().data
    for cov_type in TYPES:
        ref, ours = _fit_both(X, 3, cov_type, max_iter=3, tol=0.0, random_state=5)
        want_X, want_y = ours.sample(500)
        monkeypatch.setattr(mixture, "_sample_rows", lambda d: 7)  # 7-row pieces ...
        from pipeline.store import ingest
        real = ingest.chunk_rows_for
        monkeypatch.setattr(ingest, "chunk_rows_for", lambda n, b, c, m: 64)  # ... into 64-row chunks
        url = str(tmp_path / f"{cov_type}.zarr")
        ds = ours.sample(500, out=url)
        monkeypatch.setattr(ingest, "chunk_rows_for", real)
        assert zarr.open_group(url, mode="r")["X"].chunks == (64, 4)
        np.testing.assert_allclose(ds.X.compute(), want_X, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(ds.y.compute(), want_y)
        # Seeded: the same draw again is already there; unseeded: a new draw, refused over it.
        assert ours.sample(500, out=url).X.shape == (500, 4)
        ours.random_state = None
        with pytest.raises(InputError, match="overwrite"):
            ours.sample(500, out=url)


def test_write_pieces_checks_the_row_count(tmp_path):
    from pipeline.store.ingest import write_pieces

    parts = [(np.ones((3, 2)), np.zeros(3, int))]
    with pytest.raises(InputError, match="n_samples=4"):
        write_pieces(str(tmp_path / "a.zarr"), iter(parts), n_samples=4, n_features=2)
    from pipeline.store.results import existing

    assert existing(str(tmp_path / "a.zarr"))["complete"] is False  # never looks complete
    with pytest.raises(InputError):
        pl.open_dataset(str(tmp_path / "a.zarr"))
    with pytest.raises(InputError, match="more than n_samples=2"):
        write_pieces(str(tmp_path / "b.zarr"), iter(parts), n_samples=2, n_features=2)


@pytest.mark.parametrize("cov_type", ["tied", "diag", "spherical"])
def test_warm_start_n_init_and_max_iter_zero(cov_type):
    X = load_wine().data
    init = _start(X, 3, cov_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # warm_start: two fits of 5 iterations continue as one of 10 (scikit-learn's too).
        ref = SkGaussianMixture(3, covariance_type=cov_type, max_iter=5, tol=0.0, warm_start=True, **init)
        ours = pl.GaussianMixture(3, covariance_type=cov_type, max_iter=5, tol=0.0, warm_start=True,
                                  memory_budget="64MiB", **init)
        ref.fit(X).fit(X)
        ours.fit(X).fit(X)
        _assert_same(ref, ours)
        # Another type on the fitted model: refused, naming both.
        ours.set_params(covariance_type="full", precisions_init=None)
        with pytest.raises(InputError, match=f"'{cov_type}'"):
            ours.fit(X)
        # n_init: the best of several starts, as scikit-learn picks it.
        kw = dict(covariance_type=cov_type, n_init=3, init_params="random_from_data", random_state=2,
                  max_iter=10, tol=0.0)
        a, b = pl.GaussianMixture(3, memory_budget="64MiB", **kw).fit(X), SkGaussianMixture(3, **kw).fit(X)
        np.testing.assert_allclose(a.lower_bound_, b.lower_bound_, rtol=1e-6)
        # max_iter=0 from precisions_init: the covariances the given precisions stand for.
        z = pl.GaussianMixture(3, covariance_type=cov_type, max_iter=0, memory_budget="64MiB", **init).fit(X)
    np.testing.assert_allclose(cv.precisions_from_cholesky(cov_type, z.precisions_cholesky_),
                               init["precisions_init"], rtol=1e-10)
    prec = init["precisions_init"]
    np.testing.assert_allclose(z.covariances_, np.linalg.inv(prec) if cov_type == "tied" else 1 / prec, rtol=1e-10)


def test_em_step_checks_parameter_shapes():
    X = load_iris().data
    with pytest.raises(InputError, match=r"precisions_cholesky has shape \(2, 4, 4\).*'diag' need \(2, 4\)"):
        pl.em_step(X, np.ones(2) / 2, X[:2], np.array([np.eye(4)] * 2), covariance_type="diag")
    s = pl.em_step(X, np.ones(2) / 2, X[:2], np.ones((2, 4)), covariance_type="diag", memory_budget="64MiB")
    assert s["S2"].shape == (2, 4) and s["n"] == 150


def test_sample_in_pieces_is_the_same_stream():
    gm = pl.GaussianMixture(2, covariance_type="full", random_state=3)
    gm.weights_, gm.means_ = np.array([0.3, 0.7]), np.array([[0.0, 0.0], [5.0, 5.0]])
    gm.covariances_ = np.array([np.eye(2), [[2.0, 0.5], [0.5, 1.0]]])
    gm.precisions_cholesky_ = cv.precision_cholesky("full", gm.covariances_)
    whole = np.vstack([p[0] for p in mixture._sample_pieces(np.random.RandomState(0), "full", gm.means_,
                                                             gm.covariances_, [300, 701])])
    pieces = np.vstack([p[0] for p in mixture._sample_pieces(np.random.RandomState(0), "full", gm.means_,
                                                              gm.covariances_, [300, 701], piece_rows=7)])
    np.testing.assert_allclose(pieces, whole, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- bad input

def test_bad_input_names_what_is_wrong():
    X = load_iris().data
    with pytest.raises(InputError, match="'full', 'tied', 'diag', 'spherical'"):
        pl.GaussianMixture(2, covariance_type="diagonal").fit(X)
    with pytest.raises(InputError, match=r"precisions_init has shape \(2, 4, 4\).*\(2, 4\).*'diag'"):
        pl.GaussianMixture(2, covariance_type="diag", precisions_init=np.array([np.eye(4)] * 2)).fit(X)
    with pytest.raises(InputError, match="positive"):
        pl.GaussianMixture(2, covariance_type="spherical", precisions_init=np.array([1.0, -1.0])).fit(X)
    with pytest.raises(InputError, match="symmetric"):
        pl.GaussianMixture(2, covariance_type="tied", precisions_init=np.triu(np.ones((4, 4)))).fit(X)
    with pytest.warns(UserWarning, match="did not converge"):  # max_iter=1: scikit-learn's ConvergenceWarning
        gm = pl.GaussianMixture(2, covariance_type="diag", max_iter=1).fit(X)
    with pytest.raises(InputError, match="n_samples"):
        gm.sample(0)
    with pytest.raises(BudgetError, match="'full', 'tied', 'diag', 'spherical'"):
        plan("gmm", n_samples=10, n_features=2, n_components=2, covariance_type="x", memory_budget="1GiB")
    assert CLI_TYPES == TYPES


def test_plans_do_not_split_components_unless_full():
    for t in ("tied", "diag", "spherical"):
        p = plan("gmm", n_samples=2_000_000, n_features=1000, n_components=200, covariance_type=t,
                 itemsize=4, memory_budget="2GiB", threads=2)
        assert p["component_groups"] == 1 and p.peak <= 2 * 2**30
    with pytest.raises(BudgetError, match="all 200 components"):
        plan("gmm", n_samples=10, n_features=100_000, n_components=200, covariance_type="diag",
             memory_budget="64MiB", threads=2)


# ------------------------------------------------------------ stores, CLI, jobs

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=300)


def test_legacy_full_model_and_damaged_stores(tmp_path):
    X = _synthetic()
    data = str(tmp_path / "d.zarr")
    pl.write_dataset(data, X, chunk_rows=256)
    model = str(tmp_path / "m.zarr")
    mixture.fit_to_store(data, model, n_components=2, max_iter=3, memory_budget="64MiB")
    g = zarr.open_group(model, mode="r+")
    meta = dict(g.attrs["pipeline"])
    assert meta.pop("covariance_type") == "full"
    g.attrs["pipeline"] = meta  # as written before there were other types
    assert mixture.load_model(model).covariance_type == "full"
    with pytest.raises(InputError, match="'full'.*'diag'"):
        mixture.fit_to_store(data, model, n_components=2, covariance_type="diag", max_iter=3)
    meta["covariance_type"] = "diag"  # a full model's arrays labelled diag
    g.attrs["pipeline"] = meta
    with pytest.raises(InputError, match=r"covariances has shape \(2, 5, 5\).*\(2, 5\)"):
        mixture.load_model(model)


def test_cli_fit_predict_and_type_checks(tmp_path):
    X = _synthetic()
    data = str(tmp_path / "d.zarr")
    pl.write_dataset(data, X, chunk_rows=256)
    model, pred = str(tmp_path / "m.zarr"), str(tmp_path / "p.zarr")
    r = _cli("gmm", "fit", data, model, "--n-components", "4", "--covariance-type", "diag", "--max-iter", "20",
             "--memory-budget", "128MiB")
    assert r.returncode == 0, r.stderr
    g = zarr.open_group(model, mode="r")
    assert g.attrs["pipeline"]["covariance_type"] == "diag" and g["covariances"].shape == (4, 5)
    gm = mixture.load_model(model)
    assert gm.covariance_type == "diag" and gm.precisions_.shape == (4, 5)
    r = _cli("gmm", "predict", model, data, pred)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(zarr.open_group(pred, mode="r")["labels"][...], gm.predict(X))

    # The same store, another type: refused naming both, nothing changed.
    r = _cli("gmm", "fit", data, model, "--n-components", "4", "--covariance-type", "tied")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'diag'" in r.stderr and "'tied'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert zarr.open_group(model, mode="r").attrs["pipeline"]["covariance_type"] == "diag"
    r = _cli("gmm", "fit", data, str(tmp_path / "x.zarr"), "--covariance-type", "diagonal")
    assert r.returncode == 2 and "'spherical'" in r.stderr and "Traceback" not in r.stderr
    r = _cli("plan", "gmm", "--n-samples", "2000000", "--n-features", "1000", "--n-components", "200",
             "--covariance-type", "diag", "--dtype", "float32", "--memory-budget", "2GiB")
    assert r.returncode == 0 and "diag" in r.stdout, r.stderr


@pytest.mark.parametrize("cov_type", ["tied", "spherical"])
def test_fit_to_store_resumes_and_matches_the_estimator(tmp_path, monkeypatch, cov_type):
    X = _synthetic()
    data = str(tmp_path / "data.zarr")
    pl.write_dataset(data, X, chunk_rows=300)
    kw = dict(n_components=4, covariance_type=cov_type, max_iter=8, tol=0.0, init_params="random_from_data",
              random_state=1, memory_budget="128MiB")
    whole = mixture.fit_to_store(data, str(tmp_path / "whole.zarr"), **kw)
    assert whole["n_iter"] == 8
    real_save = mixture._save_model

    def flaky(group, params, n_iter, *a):
        real_save(group, params, n_iter, *a)
        if n_iter == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(mixture, "_save_model", flaky)
    with pytest.raises(KeyboardInterrupt):
        mixture.fit_to_store(data, str(tmp_path / "part.zarr"), **kw)
    monkeypatch.setattr(mixture, "_save_model", real_save)
    resumed = mixture.fit_to_store(data, str(tmp_path / "part.zarr"), **kw)
    assert resumed["resumed_from_iteration"] == 3
    a, b = mixture.load_model(str(tmp_path / "whole.zarr")), mixture.load_model(str(tmp_path / "part.zarr"))
    np.testing.assert_array_equal(a.covariances_, b.covariances_)
    est = pl.GaussianMixture(4, covariance_type=cov_type, max_iter=8, tol=0.0, init_params="random_from_data",
                             random_state=1, memory_budget="128MiB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(data)
    np.testing.assert_allclose(a.covariances_, est.covariances_, rtol=1e-12)


def test_job_file_takes_covariance_type(tmp_path):
    X = _synthetic()
    data = str(tmp_path / "d.zarr")
    pl.write_dataset(data, X, chunk_rows=256)
    job = tmp_path / "job.yaml"
    job.write_text(f"memory_budget: 128MiB\nsteps:\n  - gmm-fit:\n      data: {data}\n"
                   f"      model: {tmp_path / 'm.zarr'}\n      n_components: 4\n"
                   f"      covariance_type: spherical\n      max_iter: 5\n")
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(job), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert mixture.load_model(str(tmp_path / "m.zarr")).covariances_.shape == (4,)
    job.write_text(job.read_text().replace("spherical", "round"))
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(job), "--check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "covariance_type" in r.stderr and "Traceback" not in r.stderr
