"""GaussianMixture out of core: the same EM path as scikit-learn, any chunking or budget.

Exactness is checked from the same initial parameters (weights_init, means_init,
precisions_init): scikit-learn's own start (k-means) depends on its KMeans, which we
reproduce only approximately.  Tolerance 1e-6 relative (the issue's contract); the
observed differences are ~1e-13, from summation order only.
"""

import pickle
import warnings

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.datasets import load_digits, load_iris, load_wine
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import pipeline as pl
from conftest import row_chunks
from pipeline import runtime
from pipeline import mixture
from pipeline.budget import Plan
from pipeline.errors import InputError
from pipeline.kernels import gaussian as g

RTOL = 1e-6


def _start(X, K, seed):
    """Initial parameters: one scikit-learn M-step from a random_from_data start."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = SkGaussianMixture(K, init_params="random_from_data", random_state=seed, max_iter=1,
                              reg_covar=1e-3).fit(X)
    return dict(weights_init=s.weights_, means_init=s.means_, precisions_init=s.precisions_)


def _synthetic():
    rng = np.random.default_rng(3)
    # Well separated, anisotropic, with a large common offset (cancellation check).
    A = rng.standard_normal((4, 6, 6))
    X = np.vstack([rng.standard_normal((400, 6)) @ A[k] + 1.5 * k for k in range(4)]) + 1e3
    return X


DATA = {
    "iris": (lambda: load_iris().data, 3),
    "wine": (lambda: load_wine().data, 3),
    "digits": (lambda: load_digits().data[:600], 5),
    "synthetic": (_synthetic, 4),
}


@pytest.fixture
def fixed_plan(monkeypatch):
    """Force block rows / component groups regardless of the budget."""

    def use(rows, group=None):
        def fake(X, K, memory_budget, covariance_type="full"):
            # A real plan (sharded when a group is asked for) with the rows forced.
            p = pl.plan("gmm", n_samples=X.shape[0], n_features=X.shape[1], n_components=K,
                        memory_budget="1GiB", covariance_type=covariance_type, threads=2,
                        **({"sharded": False} if group is None else {"component_group": group}))
            p.params["rows"] = rows
            return p

        monkeypatch.setattr(mixture, "_plan", fake)

    return use


def _fit_both(X, K, max_iter, tol, **kw):
    init = _start(X, K, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SkGaussianMixture(K, max_iter=max_iter, tol=tol, **init).fit(X)
        ours = pl.GaussianMixture(K, max_iter=max_iter, tol=tol, **init, **kw).fit(X)
    return ref, ours


def _assert_same(ref, ours):
    assert ours.n_iter_ == ref.n_iter_
    assert ours.converged_ == ref.converged_
    np.testing.assert_allclose(ours.lower_bound_, ref.lower_bound_, rtol=RTOL)
    np.testing.assert_allclose(ours.weights_, ref.weights_, rtol=RTOL)
    # Means near 0 (relative error meaningless): compare on the scale of the data.
    scale = np.abs(ref.means_).max()
    np.testing.assert_allclose(ours.means_, ref.means_, rtol=RTOL, atol=RTOL * scale)
    cscale = np.abs(ref.covariances_).max()
    np.testing.assert_allclose(ours.covariances_, ref.covariances_, rtol=RTOL, atol=RTOL * cscale)


@pytest.mark.parametrize("name", sorted(DATA))
def test_same_em_path_as_sklearn(name):
    load, K = DATA[name]
    X = load()
    # tol=1e-8 makes every run take 10+ iterations (checked below).
    ref, ours = _fit_both(X, K, max_iter=40, tol=1e-8, memory_budget="256MiB")
    assert ref.n_iter_ >= 10
    _assert_same(ref, ours)
    np.testing.assert_allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=RTOL)


@pytest.mark.parametrize("rows,group", [(1, None), (37, None), (97, 1), (150, 2), (1000, None)])
def test_any_chunking_or_component_group(fixed_plan, rows, group):
    X = load_iris().data
    fixed_plan(rows, group)
    ref, ours = _fit_both(X, 3, max_iter=12, tol=0.0)
    assert ours.n_iter_ == 12
    _assert_same(ref, ours)


def test_zarr_input_and_budgets(tmp_path):
    X = _synthetic()
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(101, 6), dtype="f8")
    z[...] = X
    for budget in ("48MiB", "1GiB"):
        ref, ours = _fit_both(X, 4, max_iter=15, tol=0.0, memory_budget=budget)
        _, ours_z = _fit_both(z, 4, max_iter=15, tol=0.0, memory_budget=budget)
        _assert_same(ref, ours)
        _assert_same(ref, ours_z)


def test_split_every_and_deterministic_keys():
    X = da.from_array(load_wine().data, chunks=(13, 13))
    init = _start(load_wine().data, 3, 1)
    P = g.precision_cholesky_from_precisions(init["precisions_init"])
    a = mixture.em_step(X, init["weights_init"], init["means_init"], P, split_every=2,
                        memory_budget="256MiB")
    b = mixture.em_step(X, init["weights_init"], init["means_init"], P, split_every=16,
                        memory_budget="256MiB")
    for key in ("N", "S1", "S2"):
        # A different tree only reorders the sums: 1e-12 relative.
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-9)
    assert a["n"] == b["n"] == 178
    g1 = mixture._em_stats_graph(X, init["weights_init"], init["means_init"], P, init["means_init"], None, 4)
    g2 = mixture._em_stats_graph(X, init["weights_init"], init["means_init"], P, init["means_init"], None, 4)
    assert g1.key == g2.key
    keys = [str(k) for k in dict(g1.__dask_graph__())]
    assert any("pipeline-em-chunk-" in k for k in keys)
    # The parameters are exactly one key, not embedded per task.
    assert sum("pipeline-em-params-" in k for k in keys) == 1


def test_predictions_on_separated_clusters_match_sklearn():
    # Separated clusters: prediction skips the components that cannot matter
    # (pruned log-densities); labels, probabilities and densities are scikit-learn's.
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(4000, n_features=6, centers=8, cluster_std=1.0, center_box=(-40, 40), random_state=3)
    gm = pl.GaussianMixture(8, random_state=0, memory_budget="64MiB").fit(X)
    prepared = g.prepare_parameters(gm.weights_, gm.means_, gm.precisions_cholesky_)
    assert np.isneginf(g.weighted_log_prob_sparse(X, prepared)).mean() > 0.5  # pruning is at work
    ref = SkGaussianMixture(8)
    ref._set_parameters((gm.weights_, gm.means_, gm.covariances_, gm.precisions_cholesky_))
    ref.n_features_in_ = 6
    np.testing.assert_array_equal(gm.predict(X), ref.predict(X))
    np.testing.assert_allclose(gm.predict_proba(X), ref.predict_proba(X), rtol=1e-12, atol=0)
    assert ((gm.predict_proba(X) == 0) == (ref.predict_proba(X) == 0)).all()  # the same exact zeros
    np.testing.assert_allclose(gm.score_samples(X), ref.score_samples(X), rtol=1e-12)


def test_fit_predict_equals_fit_then_predict():
    X = load_iris().data
    gm = pl.GaussianMixture(3, random_state=0, memory_budget="64MiB")
    labels = gm.fit_predict(X)
    np.testing.assert_array_equal(labels, gm.predict(X))
    proba = gm.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(proba.argmax(1), labels)
    ref = SkGaussianMixture(3)
    ref._set_parameters((gm.weights_, gm.means_, gm.covariances_, gm.precisions_cholesky_))
    ref.n_features_in_ = 4
    ref.converged_ = True
    ref.lower_bound_ = gm.lower_bound_
    # Same model evaluated two ways: log-densities agree to rounding.
    np.testing.assert_allclose(gm.score_samples(X), ref.score_samples(X), rtol=1e-12)
    np.testing.assert_allclose(gm.score(X), ref.score(X), rtol=1e-12)
    lazy = gm.predict(da.from_array(X, chunks=40))
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), labels)


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_init_params_sensible_and_deterministic(init_params, fixed_plan):
    X = load_iris().data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SkGaussianMixture(3, init_params=init_params, random_state=0).fit(X)
    fixed_plan(40)
    a = pl.GaussianMixture(3, init_params=init_params, random_state=0, max_iter=200).fit(X)
    b = pl.GaussianMixture(3, init_params=init_params, random_state=0, max_iter=200).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)
    # Sensible: a local optimum as good as scikit-learn's to within the spread of EM
    # optima on iris (the best known is -1.2012).
    assert a.converged_
    assert a.lower_bound_ > ref.lower_bound_ - 0.1
    if init_params == "random":
        # Per-row counter-based draws: the start does not depend on the chunking.
        fixed_plan(7)
        c = pl.GaussianMixture(3, init_params=init_params, random_state=0, max_iter=200).fit(X)
        np.testing.assert_allclose(c.means_, a.means_, rtol=1e-8)


def test_random_from_data_start_matches_sklearn():
    X = load_wine().data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SkGaussianMixture(3, init_params="random_from_data", random_state=5, max_iter=20, tol=0).fit(X)
        ours = pl.GaussianMixture(3, init_params="random_from_data", random_state=5, max_iter=20, tol=0,
                                  memory_budget="64MiB").fit(X)
    # Same RandomState draws -> same start -> same path.
    _assert_same(ref, ours)


def test_n_init_and_warm_start():
    X = load_iris().data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = pl.GaussianMixture(3, n_init=3, init_params="random", random_state=0, max_iter=50).fit(X)
        singles = [pl.GaussianMixture(3, init_params="random", random_state=np.random.RandomState(0),
                                      max_iter=50)]
    assert best.lower_bound_ >= singles[0].fit(X).lower_bound_ - 1e-12
    init = _start(X, 3, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ws = pl.GaussianMixture(3, max_iter=5, tol=0, warm_start=True, **init).fit(X)
        ws.fit(X)
        ref = SkGaussianMixture(3, max_iter=5, tol=0, warm_start=True, **init).fit(X)
        ref.fit(X)
    np.testing.assert_allclose(ws.means_, ref.means_, rtol=RTOL, atol=RTOL * 10)
    np.testing.assert_allclose(ws.lower_bound_, ref.lower_bound_, rtol=RTOL)


def test_convergence_warning_and_clone():
    X = load_iris().data
    gm = pl.GaussianMixture(3, max_iter=2, random_state=0)
    with pytest.warns(pl.mixture.ConvergenceWarning, match="did not converge") as caught:
        gm.fit(X)
    assert caught[0].filename == __file__  # points at the user's call, as scikit-learn's
    assert not gm.converged_ and gm.n_iter_ == 2
    c = clone(gm)
    assert c.get_params() == gm.get_params() and not hasattr(c, "means_")
    c.set_params(max_iter=7)
    assert c.max_iter == 7
    with pytest.raises(InputError, match="invalid parameter"):
        c.set_params(bogus=1)


def test_bad_input_is_clear():
    X = load_iris().data
    with pytest.raises(InputError, match="n_components=0"):
        pl.GaussianMixture(0).fit(X)
    with pytest.raises(InputError, match="exceeds n_samples=150"):
        pl.GaussianMixture(151).fit(X)
    Xn = X.copy()
    Xn[[7, 99], 1] = np.nan
    with pytest.raises(InputError, match=r"2 row\(s\), at rows \[7, 99\]"):
        pl.GaussianMixture(2).fit(Xn)
    with pytest.raises(InputError, match="means_init has shape"):
        pl.GaussianMixture(2, means_init=np.zeros((2, 3))).fit(X)
    with pytest.raises(InputError, match="precisions_init has shape"):
        pl.GaussianMixture(2, precisions_init=np.ones((3, 4, 4))).fit(X)
    with pytest.raises(InputError, match="weights_init has shape"):
        pl.GaussianMixture(2, weights_init=np.ones(3) / 3).fit(X)
    # Collapsed component: all rows identical and no regularisation.
    Xc = np.ones((20, 3))
    with pytest.raises(InputError, match="increase reg_covar"):
        pl.GaussianMixture(1, reg_covar=0.0).fit(Xc)
    assert issubclass(InputError, ValueError)  # scikit-learn code catching ValueError still works


def test_fit_to_store_saves_every_iteration_and_resumes(tmp_path, monkeypatch):
    X = _synthetic()
    data = str(tmp_path / "data.zarr")
    pl.write_dataset(data, X, chunk_rows=300)
    kw = dict(n_components=4, max_iter=12, tol=0.0, init_params="k-means++", random_state=1,
              memory_budget="128MiB")
    full = mixture.fit_to_store(data, str(tmp_path / "full.zarr"), **kw)
    assert full["status"] == "complete" and full["n_iter"] == 12

    # Interrupt after iteration 5 has been saved.
    real_save = mixture._save_model
    calls = []

    def flaky(group, params, n_iter, *a):
        real_save(group, params, n_iter, *a)
        calls.append(n_iter)
        if n_iter == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(mixture, "_save_model", flaky)
    with pytest.raises(KeyboardInterrupt):
        mixture.fit_to_store(data, str(tmp_path / "part.zarr"), **kw)
    assert calls == [0, 1, 2, 3, 4, 5]  # saved after init and after every iteration
    meta = zarr.open_group(str(tmp_path / "part.zarr"), mode="r").attrs["pipeline"]
    assert meta["n_iter"] == 5 and not meta["complete"] and len(meta["history"]) == 5
    monkeypatch.setattr(mixture, "_save_model", real_save)
    resumed = mixture.fit_to_store(data, str(tmp_path / "part.zarr"), **kw)
    assert resumed["resumed_from_iteration"] == 5 and resumed["n_iter"] == 12
    a, b = mixture.load_model(str(tmp_path / "full.zarr")), mixture.load_model(str(tmp_path / "part.zarr"))
    # Resuming replays the same iterations from the saved float64 parameters: identical.
    np.testing.assert_array_equal(a.means_, b.means_)
    assert a.lower_bound_ == b.lower_bound_
    again = mixture.fit_to_store(data, str(tmp_path / "part.zarr"), **kw)
    assert again["status"].startswith("already complete")
    with pytest.raises(InputError, match="overwrite"):
        mixture.fit_to_store(data, str(tmp_path / "part.zarr"), **{**kw, "max_iter": 3})

    out = mixture.predict_to_store(str(tmp_path / "full.zarr"), data, str(tmp_path / "pred.zarr"))
    grp = zarr.open_group(str(tmp_path / "pred.zarr"), mode="r")
    np.testing.assert_array_equal(grp["labels"][...], a.predict(X))
    np.testing.assert_allclose(grp["log_likelihood"][...], a.score_samples(X), rtol=1e-12)
    assert out["n_samples"] == len(X)


def test_cli_fit_and_predict(tmp_path, capsys):
    from pipeline.cli import main

    data = str(tmp_path / "d.zarr")
    pl.write_dataset(data, _synthetic(), chunk_rows=256)
    model, pred = str(tmp_path / "m.zarr"), str(tmp_path / "p.zarr")
    assert main(["gmm", "fit", data, model, "--n-components", "4", "--seed", "0",
                 "--memory-budget", "128MiB", "--no-progress"]) == 0
    assert "n_iter" in capsys.readouterr().out
    assert main(["gmm", "predict", model, data, pred, "--no-progress"]) == 0
    assert zarr.open_group(pred, mode="r")["labels"].shape == (1600,)
    assert main(["gmm", "fit", data, str(tmp_path / "m2.zarr"), "--n-components", "0", "--no-progress"]) == 2
    assert "n_components" in capsys.readouterr().err
    # Nothing was written for the refused job, so the corrected command just runs.
    assert main(["gmm", "fit", data, str(tmp_path / "m2.zarr"), "--n-components", "2", "--max-iter", "3",
                 "--no-progress"]) == 0


def test_graph_pickle_does_not_grow_with_X(tmp_path):
    # Same number of blocks, 10x the rows: the pickled iteration graph stays the same
    # size (zarr chunk references + one parameter key), far below the data.
    K, d = 4, 8
    w, m, P = np.ones(K) / K, np.zeros((K, d)), np.array([np.eye(d)] * K)
    sizes = []
    for n in (8_000, 80_000):
        z = zarr.create_array(str(tmp_path / f"x{n}.zarr"), shape=(n, d), chunks=(n // 8, d), dtype="f8")
        z[...] = 1.0
        X = da.from_zarr(z)
        graph = mixture._em_stats_graph(X, w, m, P, m, None, 4)
        sizes.append(len(pickle.dumps(dict(graph.__dask_graph__()))))
    assert abs(sizes[1] - sizes[0]) < 0.05 * sizes[0], sizes
    assert sizes[1] < 80_000 * d * 8 / 50


@pytest.mark.parametrize("group", [None, 2])
def test_same_fit_on_a_real_cluster(tmp_path, dask_cluster, fixed_plan, group):
    # Workers read their own chunks from the store; the grouped (two-pass) mode
    # persists its per-row normaliser on the workers.

    X = _synthetic()
    data = str(tmp_path / "c.zarr")
    pl.write_dataset(data, X, chunk_rows=200)
    init = _start(X, 4, 2)
    fixed_plan(300, group)
    kw = dict(max_iter=6, tol=0.0, memory_budget="256MiB", **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = pl.GaussianMixture(4, **kw).fit(data)
        with runtime.connect(dask_cluster.address):
            remote = pl.GaussianMixture(4, **kw).fit(data)
            labels = remote.predict(data).compute()
    # Same blocks, same tree: the same sums to the last bit or nearly (BLAS may
    # block differently across processes): 1e-12 relative.
    np.testing.assert_allclose(remote.means_, local.means_, rtol=1e-12)
    np.testing.assert_allclose(remote.lower_bound_, local.lower_bound_, rtol=1e-12)
    np.testing.assert_array_equal(labels, local.predict(X))


def test_float32_and_integer_data_are_fitted_in_float64():
    X = load_digits().data[:400]  # integers 0..16
    init = _start(X.astype(np.float64), 4, 0)
    kw = dict(max_iter=5, tol=0.0, memory_budget="64MiB", **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pl.GaussianMixture(4, **kw).fit(X.astype(np.float64))
        ints = pl.GaussianMixture(4, **kw).fit(X.astype(np.int16))
        f32 = pl.GaussianMixture(4, **kw).fit(X.astype(np.float32))
    # Blocks are converted to float64 exactly (small integers are exact in float32).
    np.testing.assert_array_equal(ints.means_, ref.means_)
    np.testing.assert_array_equal(f32.means_, ref.means_)


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_em_step_independent_of_chunking(data):
    X = load_wine().data
    init = _start(X, 3, 4)
    P = g.precision_cholesky_from_precisions(init["precisions_init"])
    sizes = data.draw(st.lists(st.integers(1, 60), min_size=1, max_size=12))
    Xd = da.from_array(X, chunks=(row_chunks(sizes, len(X)), X.shape[1]))
    split_every = data.draw(st.integers(2, 9))
    graph = mixture._em_stats_graph(Xd, init["weights_init"], init["means_init"], P, init["means_init"],
                                    None, split_every)
    (stats,) = runtime.compute(graph)
    ref = g.em_block_stats(X, np.log(init["weights_init"]), init["means_init"], P)
    # Only the order of the sums changes: 1e-11 relative.
    for key in ("N", "S1", "S2"):
        np.testing.assert_allclose(stats[key], ref[key], rtol=1e-11, atol=1e-9 * np.abs(ref[key]).max())
    np.testing.assert_allclose(stats["log_likelihood"], ref["log_likelihood"], rtol=1e-12)


def test_predict_on_a_store_names_nan_rows_and_writes_nothing_complete(tmp_path):
    import zarr

    from pipeline.mixture import fit_to_store, predict_to_store

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 3))
    data, bad = tmp_path / "x.zarr", tmp_path / "bad.zarr"
    pl.write_dataset(data, X, chunk_rows=500)
    X[2500, 1] = np.inf
    pl.write_dataset(bad, X, chunk_rows=500)
    gm = pl.GaussianMixture(2, random_state=0, memory_budget="64MiB").fit(str(data))
    for call in (lambda: gm.predict(str(bad)).compute(), lambda: gm.score_samples(str(bad)).compute(),
                 lambda: gm.score(str(bad))):
        with pytest.raises(InputError, match=r"X has NaN or infinite values in row\(s\) 2500; remove or impute"):
            call()
    fit_to_store(str(data), str(tmp_path / "m.zarr"), n_components=2, memory_budget="64MiB")
    out = tmp_path / "labels.zarr"
    with pytest.raises(InputError, match=r"row\(s\) 2500"):
        predict_to_store(str(tmp_path / "m.zarr"), str(bad), str(out))
    assert not zarr.open_group(str(out), mode="r").attrs["pipeline"].get("complete")
