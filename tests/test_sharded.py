"""Full-covariance mixtures with the parameters sharded by component (pipeline.shards).

The sharded iteration must be the same EM iteration as the fused in-memory pass and as
scikit-learn's, for any component group down to one component and either order of the
E-step (row blocks resident or component groups resident), with pruning on separated
clusters and without it on overlapping ones.  A budget the parameters do not fit shards
them by itself; the fitted model then keeps its K x d x d attributes in its store.
Memory is measured in a subprocess (peak RSS above idle) where the parameters alone are
larger than the budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import zarr
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import pipeline as pl
from pipeline import mixture
from pipeline import shards as sh
from pipeline.errors import BudgetError, InputError
from pipeline.inputs import as_rows
from pipeline.kernels import gaussian as g

from conftest import ROOT, run_measured

RTOL = 1e-6


def _clusters(n=2400, d=5, centres=4, spread=12.0, seed=0):
    """Blobs of different shapes: separated (pruning skips most pairs) when spread is large."""
    rng = np.random.default_rng(seed)
    parts = []
    for c in range(centres):
        A = rng.normal(size=(d, d)) * (0.3 + 0.4 * c)
        parts.append(rng.normal(size=(n // centres, d)) @ A + rng.normal(size=d) * spread)
    X = np.concatenate(parts)
    return X[rng.permutation(len(X))]


def _blobs_with_labels(n, d, centers, seed=0):
    from sklearn.datasets import make_blobs

    return make_blobs(n, d, centers=centers, cluster_std=1.0, center_box=(-40, 40), random_state=seed)


def _start(X, K, seed=0):
    rng = np.random.default_rng(seed)
    means = X[rng.choice(len(X), K, replace=False)]
    var = X.var(axis=0).mean()
    return {"weights_init": np.full(K, 1.0 / K), "means_init": means,
            "precisions_init": np.broadcast_to(np.eye(X.shape[1]) / var, (K, X.shape[1], X.shape[1])).copy()}


def _sharded_plan(monkeypatch, group, order=None, rows=None, **params):
    """Make every fit and prediction plan sharded with this group (and order / rows / other params)."""
    real = mixture._plan

    def forced(source, K, memory_budget, covariance_type="full"):
        p = pl.plan("gmm", n_samples=source.shape[0], n_features=source.shape[1], n_components=K,
                    memory_budget="256MiB", threads=2, component_group=group)
        if order:
            p.params["order"] = order
        if rows:
            p.params["rows"] = rows
        p.params.update(params)
        return p

    monkeypatch.setattr(mixture, "_plan", forced)
    return real


def _fit(X, K, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.GaussianMixture(K, **kw).fit(X)


def _sk(X, K, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SkGaussianMixture(K, **kw).fit(X)


def _assert_same(ref, ours, rtol=RTOL):
    assert ours.n_iter_ == ref.n_iter_
    assert ours.converged_ == ref.converged_
    np.testing.assert_allclose(ours.lower_bound_, ref.lower_bound_, rtol=rtol)
    np.testing.assert_allclose(ours.weights_, ref.weights_, rtol=rtol, atol=rtol * 1e-3)
    np.testing.assert_allclose(ours.means_, ref.means_, rtol=rtol, atol=rtol * np.abs(ref.means_).max())
    cov = np.asarray(ours.covariances_)
    np.testing.assert_allclose(cov, ref.covariances_, rtol=rtol, atol=rtol * np.abs(ref.covariances_).max())
    np.testing.assert_allclose(np.asarray(ours.precisions_cholesky_), ref.precisions_cholesky_, rtol=rtol,
                               atol=rtol * np.abs(ref.precisions_cholesky_).max())


@pytest.mark.parametrize("group,order", [(1, "rows"), (1, "groups"), (2, "rows"), (4, "groups"), (7, "rows")])
@pytest.mark.parametrize("spread", [12.0, 0.5])
def test_sharded_em_is_sklearns_path_for_any_group_and_order(monkeypatch, group, order, spread):
    X = _clusters(spread=spread)
    K = 7
    init = _start(X, K)
    _sharded_plan(monkeypatch, group, order, rows=333)
    ours = _fit(X, K, max_iter=10, tol=0.0, **init)
    assert ours.plan_["sharded"] and ours.plan_["component_group"] == group
    assert isinstance(ours.covariances_, sh.StoredArray)
    ref = _sk(X, K, max_iter=10, tol=0.0, **init)
    _assert_same(ref, ours)
    np.testing.assert_allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=RTOL)
    # The predictions read the stored groups too.
    np.testing.assert_allclose(ours.score_samples(X), ref.score_samples(X), rtol=1e-9, atol=1e-9)
    proba, rproba = ours.predict_proba(X), ref.predict_proba(X)
    np.testing.assert_allclose(proba, rproba, atol=1e-8)
    sure = rproba.max(axis=1) > 0.999  # rows not near a tie between two components
    assert (ours.predict(X)[sure] == ref.predict(X)[sure]).all()


@pytest.mark.parametrize("m_runs,split", [(1, 2), (5, 2), (7, 3)])
def test_m_step_statistics_meet_in_a_tree_of_any_shape(monkeypatch, m_runs, split):
    """The M-step's row runs of a group (one per thread of a cluster) summed pairwise or
    three at a time: the same EM path as scikit-learn's (sums reassociated: 1e-6)."""
    X = _clusters(spread=3.0, seed=5)
    K = 5
    init = _start(X, K, seed=3)
    _sharded_plan(monkeypatch, 2, rows=200, m_runs=m_runs, m_split_every=split)
    ours = _fit(X, K, max_iter=6, tol=0.0, **init)
    assert ours.plan_["m_runs"] == m_runs and ours.plan_["m_split_every"] == split
    _assert_same(_sk(X, K, max_iter=6, tol=0.0, **init), ours)


def test_sharded_equals_the_unsharded_pass_and_converges_at_the_same_iteration(monkeypatch):
    X = _clusters(n=3000, d=6, spread=6.0, seed=3)
    K = 6
    init = _start(X, K, seed=1)
    whole = _fit(X, K, max_iter=200, tol=1e-4, memory_budget="256MiB", **init)
    assert not whole.plan_["sharded"] and whole.converged_ and whole.n_iter_ >= 5
    _sharded_plan(monkeypatch, 1)
    ours = _fit(X, K, max_iter=200, tol=1e-4, **init)
    assert ours.converged_ and ours.n_iter_ == whole.n_iter_
    np.testing.assert_allclose(ours.lower_bounds_, whole.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(ours.covariances_), whole.covariances_, rtol=1e-8,
                               atol=1e-10 * np.abs(whole.covariances_).max())
    np.testing.assert_allclose(np.asarray(ours.precisions_), whole.precisions_, rtol=1e-7,
                               atol=1e-9 * np.abs(whole.precisions_).max())


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random_from_data", "random"])
def test_sharded_starts_are_the_unsharded_starts(monkeypatch, init_params):
    X = _clusters(n=1200, d=4, spread=8.0, seed=2)
    whole = _fit(X, 5, max_iter=3, tol=0.0, init_params=init_params, random_state=0, memory_budget="256MiB")
    _sharded_plan(monkeypatch, 2)
    ours = _fit(X, 5, max_iter=3, tol=0.0, init_params=init_params, random_state=0)
    np.testing.assert_allclose(ours.weights_, whole.weights_, rtol=1e-9)
    np.testing.assert_allclose(ours.means_, whole.means_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.asarray(ours.covariances_), whole.covariances_, rtol=1e-8, atol=1e-10)


def test_a_budget_the_parameters_do_not_fit_shards_them_and_keeps_them_in_the_store():
    X = _clusters(n=3000, d=24, centres=5, spread=3.0, seed=4)
    K = 40
    init = _start(X, K, seed=2)
    ours = _fit(X, K, max_iter=4, tol=0.0, memory_budget="10MiB", **init)
    assert ours.plan_["sharded"] and ours.plan_.peak <= 10 * 2**20
    ref = _sk(X, K, max_iter=4, tol=0.0, **init)
    _assert_same(ref, ours)
    cov = ours.covariances_
    assert isinstance(cov, sh.StoredArray) and cov.shape == (K, 24, 24)
    np.testing.assert_allclose(cov[3], ref.covariances_[3], rtol=RTOL, atol=1e-9)  # NumPy-style indexing
    np.testing.assert_allclose(cov[5:7, 0, :2], ref.covariances_[5:7, 0, :2], rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(np.asarray(ours.precisions_), ref.precisions_, rtol=1e-5,
                               atol=1e-6 * np.abs(ref.precisions_).max())


def test_em_step_takes_a_model_store_and_writes_its_statistics(tmp_path):
    X = _clusters(n=2000, d=5, spread=2.0)
    K = 6
    init = _start(X, K)
    P = g.precision_cholesky_from_precisions(init["precisions_init"])
    ref = pl.em_step(X, init["weights_init"], init["means_init"], P, memory_budget="256MiB")
    store = sh.ShardedParameters.create(zarr.open_group(str(tmp_path / "params.zarr"), mode="w"), K, 5)
    sh.write_parameters(store, init["weights_init"], init["means_init"], precisions_cholesky=P, group=2)
    for i, params in enumerate((str(tmp_path / "params.zarr"), store)):
        s = pl.em_step(X, params=params, memory_budget="256MiB", out=tmp_path / f"stats{i}.zarr")
        np.testing.assert_allclose(s["log_likelihood"], ref["log_likelihood"], rtol=1e-12)
        np.testing.assert_allclose(s["N"], ref["N"], rtol=1e-12)
        np.testing.assert_allclose(s["S1"], ref["S1"], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(s["S2"]), ref["S2"], rtol=1e-10, atol=1e-8)
        assert s["store"].endswith(f"stats{i}.zarr")
        np.testing.assert_allclose(zarr.open_group(s["store"], mode="r")["S2"][...], ref["S2"], rtol=1e-10, atol=1e-8)
    # Arrays in, sharded by a forced plan: the same statistics.
    plan = pl.plan("gmm", n_samples=2000, n_features=5, n_components=K, memory_budget="256MiB", component_group=1)
    s = pl.em_step(X, init["weights_init"], init["means_init"], P, plan=plan)
    np.testing.assert_allclose(np.asarray(s["S2"]), ref["S2"], rtol=1e-10, atol=1e-8)


def test_a_model_store_that_does_not_match_x_or_is_incomplete_is_refused(tmp_path):
    X = _clusters(n=600, d=5)
    store = sh.ShardedParameters.create(zarr.open_group(str(tmp_path / "p.zarr"), mode="w"), 3, 4)
    with pytest.raises(InputError, match="incomplete"):
        pl.em_step(X[:, :4], params=str(tmp_path / "p.zarr"), memory_budget="64MiB")
    sh.write_parameters(store, np.ones(3) / 3, X[:3, :4], covariances=np.array([np.eye(4)] * 3))
    with pytest.raises(InputError, match=r"3 components of 4 features, but X has 5 features"):
        pl.em_step(X, params=str(tmp_path / "p.zarr"), memory_budget="64MiB")
    with pytest.raises(InputError, match=r"3 components, more than X's 2 rows"):
        pl.em_step(X[:2, :4], params=str(tmp_path / "p.zarr"), memory_budget="64MiB")
    with pytest.raises(InputError, match=r"shift has shape \(3, 5\), but the 3 components of 4 features"):
        pl.em_step(X[:, :4], params=str(tmp_path / "p.zarr"), memory_budget="64MiB", shift=np.zeros((3, 5)))
    with pytest.raises(InputError, match="not both"):
        pl.em_step(X[:, :4], np.ones(3) / 3, params=str(tmp_path / "p.zarr"), memory_budget="64MiB")
    # An interrupted fit's model store: refused unless resumed (by the same fit).
    data = tmp_path / "d.zarr"
    pl.make_blobs(str(data), 600, 4, centers=3, dtype="float64", random_state=0)

    class Stop(Exception):
        pass

    def stop(i):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        mixture.fit_to_store(str(data), str(tmp_path / "m.zarr"), n_components=3, max_iter=5, tol=0,
                             memory_budget="64MiB", on_iteration=stop)
    with pytest.raises(InputError, match="incomplete.*resumes"):
        pl.em_step(str(data), params=str(tmp_path / "m.zarr"), memory_budget="64MiB")
    out = mixture.fit_to_store(str(data), str(tmp_path / "m.zarr"), n_components=3, max_iter=5, tol=0,
                               memory_budget="64MiB")
    assert out["resumed_from_iteration"] == 2


def test_stored_attributes_keep_their_temporary_store_alive(monkeypatch):
    """A fitted model's K x d x d attributes and em_step's S2 outlive the model and the
    result dict (their temporary store goes with the last of them); a copy unpickled
    after the store is gone says so instead of reading zeros."""
    import gc
    import pickle

    X = _clusters(n=800, d=4, spread=6.0)
    init = _start(X, 3)
    _sharded_plan(monkeypatch, 1)
    gm = _fit(X, 3, max_iter=2, tol=0.0, **init)
    ref = _sk(X, 3, max_iter=2, tol=0.0, **init)
    cov, prec = gm.covariances_, gm.precisions_
    copy = pickle.loads(pickle.dumps(cov))
    del gm
    gc.collect()
    np.testing.assert_allclose(np.asarray(cov), ref.covariances_, rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(prec[1], ref.precisions_[1], rtol=1e-5, atol=1e-9)
    P = g.precision_cholesky_from_precisions(init["precisions_init"])
    plan = pl.plan("gmm", n_samples=len(X), n_features=4, n_components=3, memory_budget="256MiB", component_group=1)
    S2 = pl.em_step(X, init["weights_init"], init["means_init"], P, plan=plan)["S2"]
    gc.collect()
    whole = pl.em_step(X, init["weights_init"], init["means_init"], P, memory_budget="256MiB")
    np.testing.assert_allclose(np.asarray(S2), whole["S2"], rtol=1e-10, atol=1e-8)
    del cov, prec
    gc.collect()
    with pytest.raises(InputError, match="temporary store .* was removed"):
        np.asarray(copy)


def test_the_sharded_pass_prunes_separated_clusters(tmp_path):
    """200 components on 20 separated blobs: most (row, component) pairs are skipped,
    and the statistics are still the unsharded pass's."""
    X, _ = _blobs_with_labels(n=4000, d=8, centers=20)
    K = 200
    rng = np.random.default_rng(0)
    means = X[rng.choice(len(X), K, replace=False)]
    P = np.broadcast_to(np.eye(8), (K, 8, 8)).copy()
    w = np.full(K, 1.0 / K)
    ref = pl.em_step(X, w, means, P, memory_budget="256MiB")
    plan = pl.plan("gmm", n_samples=len(X), n_features=8, n_components=K, memory_budget="256MiB", component_group=16)
    s = pl.em_step(X, w, means, P, plan=plan)
    assert s["skipped"] > 0.5 * s["pairs"], (s["skipped"], s["pairs"])
    np.testing.assert_allclose(s["log_likelihood"], ref["log_likelihood"], rtol=1e-12)
    np.testing.assert_allclose(s["N"], ref["N"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(s["S2"]), ref["S2"], rtol=1e-9, atol=1e-9)


def test_predictions_and_an_x_computed_by_dask_take_the_rows_order(monkeypatch):
    """A "groups" E-step keeps every block of a dask-computed X until the last group has
    read it, and a prediction task holds all K log-densities of its rows: both are
    planned in the "rows" order, and give the same model and predictions."""
    import dask.array as da

    X = _clusters(n=3000, d=24, centres=5, spread=3.0, seed=4)
    K = 40
    init = _start(X, K, seed=2)
    assert pl.plan("gmm", n_samples=3000, n_features=24, n_components=K, memory_budget="10MiB",
                   threads=2)["order"] == "groups"
    ours = _fit(X, K, max_iter=3, tol=0.0, memory_budget="10MiB", **init)
    lazy = _fit(da.from_array(X, chunks=(700, 24)) * 1.0, K, max_iter=3, tol=0.0, memory_budget="10MiB", **init)
    assert ours.plan_["order"] == "groups" and lazy.plan_["order"] == "rows"
    _assert_same(_sk(X, K, max_iter=3, tol=0.0, **init), lazy)
    # Two EM paths of different blocks: sums reassociated, each within 1e-6 of scikit-learn.
    np.testing.assert_allclose(lazy.score_samples(X), ours.score_samples(X), rtol=1e-7)
    seen = []
    real = mixture._plan_sharded
    monkeypatch.setattr(mixture, "_plan_sharded", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    ours.predict(X)
    assert [p["order"] for p in seen] == ["rows"]
    with pytest.raises(BudgetError, match="order='diagonal'"):
        pl.plan("gmm", n_samples=3000, n_features=24, n_components=K, memory_budget="10MiB", order="diagonal")


def test_too_small_a_budget_names_the_minimum_before_any_work():
    with pytest.raises(BudgetError, match=r"one component at a time \(sharded parameters.*give --memory-budget"):
        pl.plan("gmm", n_samples=1_000_000, n_features=900, n_components=200, memory_budget="64MiB", threads=2)


def test_fit_to_store_predict_and_resume_with_sharded_parameters(tmp_path):
    data = tmp_path / "d.zarr"
    pl.make_blobs(str(data), 3000, 24, centers=5, dtype="float64", random_state=0, chunk_rows=500)
    kw = dict(n_components=40, max_iter=5, tol=0, memory_budget="10MiB", random_state=0)
    whole = mixture.fit_to_store(str(data), str(tmp_path / "whole.zarr"), **{**kw, "memory_budget": "512MiB"})
    assert whole["status"] == "complete"

    class Stop(Exception):
        pass

    def stop(i):
        if i == 3:
            raise Stop

    with pytest.raises(Stop):
        mixture.fit_to_store(str(data), str(tmp_path / "m.zarr"), **kw, on_iteration=stop)
    meta = dict(zarr.open_group(str(tmp_path / "m.zarr"), mode="r").attrs["pipeline"])
    assert meta["n_iter"] == 3 and not meta["complete"]
    out = mixture.fit_to_store(str(data), str(tmp_path / "m.zarr"), **kw)
    assert out["resumed_from_iteration"] == 3 and out["n_iter"] == 5
    a, b = zarr.open_group(str(tmp_path / "whole.zarr"), mode="r"), zarr.open_group(str(tmp_path / "m.zarr"), mode="r")
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        np.testing.assert_allclose(b[name][...], a[name][...], rtol=1e-8, atol=1e-10, err_msg=name)
    assert sorted(b.group_keys()) == []  # checkpoints and scratch dropped once complete
    # A model larger than the budget loads with its K d^2 attributes in the store.
    gm = mixture.load_model(str(tmp_path / "m.zarr"), memory_budget="1MiB")
    assert isinstance(gm.covariances_, sh.StoredArray)
    np.testing.assert_allclose(np.asarray(gm.covariances_), a["covariances"][...], rtol=1e-8, atol=1e-10)
    # So does a model fitted unsharded (under a larger budget), its sharded terms computed at load.
    gw = mixture.load_model(str(tmp_path / "whole.zarr"), memory_budget="1MiB")
    assert isinstance(gw.precisions_cholesky_, sh.StoredArray)
    np.testing.assert_array_equal(np.asarray(gw.covariances_), a["covariances"][...])
    gw.set_params(memory_budget="16MiB")  # a prediction's blocks need more than 1 MiB
    np.testing.assert_allclose(gw.score_samples(str(data)), mixture.load_model(str(tmp_path / "whole.zarr"))
                               .score_samples(str(data)), rtol=1e-10)
    mixture.predict_to_store(str(tmp_path / "m.zarr"), str(data), str(tmp_path / "p.zarr"), memory_budget="10MiB")
    mixture.predict_to_store(str(tmp_path / "whole.zarr"), str(data), str(tmp_path / "pw.zarr"))
    p, pw = zarr.open_group(str(tmp_path / "p.zarr"), mode="r"), zarr.open_group(str(tmp_path / "pw.zarr"), mode="r")
    np.testing.assert_allclose(p["log_likelihood"][...], pw["log_likelihood"][...], rtol=1e-9)
    assert (p["labels"][...] == pw["labels"][...]).mean() > 0.999


def test_plan_gmm_prints_a_feasible_sharded_plan_for_a_cluster():
    r = subprocess.run([sys.executable, "-m", "pipeline", "plan", "gmm", "--n-samples", "2000000", "--n-features",
                        "10000", "--n-components", "200", "--memory-budget", "64GiB", "--workers", "16",
                        "--threads-per-worker", "1"], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in ("sharded=True", "per worker: peak", "16 worker(s)", "X read", "factors read",
                 "model store on disk", "flops per iteration: 1.6e+17", "projected:"):
        assert text in out, out
    peak = [ln for ln in out.splitlines() if "per worker: peak" in ln][0]
    assert "of 64 GiB" in peak
    # The M-step's 16 runs of a group meet in a tree (2 sets of statistics a task, each
    # 800 MB a component), so groups of several components fit and X is read a few
    # dozen times, not once per 1-3 components (68 reads when the 16 met in one task).
    params = dict(kv.split("=") for kv in out.splitlines()[1].split("; ")[1].split(", "))
    assert int(params["component_group"]) >= 8 and int(params["x_reads"]) <= 40, out


def test_sharded_iteration_stays_inside_a_budget_smaller_than_its_parameters(tmp_path):
    """X 20000 x 256 float64 from Zarr, K=64: factors + covariances + precisions are
    3 x 32 MiB, the budget 48 MiB; one fit of two iterations from a random start."""
    data = tmp_path / "x.zarr"
    pl.make_blobs(str(data), 20_000, 256, centers=1, dtype="float64", random_state=0)
    code = f"""
        import warnings, json
        gm = pipeline.GaussianMixture(64, max_iter=2, tol=0, init_params="random", random_state=0,
                                      memory_budget="48MiB")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.fit({str(data)!r})
        print("RESULT", json.dumps({{"sharded": gm.plan_["sharded"], "peak": gm.plan_.peak,
                                     "n_iter": gm.n_iter_, "lb": gm.lower_bound_}}))
    """
    above, out = run_measured(code)
    res = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT")][-1].split(" ", 1)[1])
    assert res["sharded"] and res["n_iter"] == 2 and np.isfinite(res["lb"])
    assert above <= 48 * 2**20, f"peak {above / 2**20:.1f} MiB above idle, budget 48 MiB"


def test_em_step_over_an_unsharded_model_store_and_bad_out(tmp_path):
    data = tmp_path / "d.zarr"
    pl.make_blobs(str(data), 800, 5, centers=3, dtype="float64", random_state=0)
    mixture.fit_to_store(str(data), str(tmp_path / "m.zarr"), n_components=3, max_iter=3, tol=0,
                         memory_budget="64MiB")
    gm = mixture.load_model(str(tmp_path / "m.zarr"))
    ref = pl.em_step(str(data), gm.weights_, gm.means_, gm.precisions_cholesky_, memory_budget="64MiB")
    s = pl.em_step(str(data), params=str(tmp_path / "m.zarr"), memory_budget="64MiB")
    np.testing.assert_allclose(np.asarray(s["S2"]), ref["S2"], rtol=1e-10, atol=1e-8)
    with pytest.raises(BudgetError, match="give --memory-budget"):  # planned before the store is converted
        pl.em_step(str(data), params=str(tmp_path / "m.zarr"), memory_budget="16KiB")
    with pytest.raises(InputError, match="already exists"):
        pl.em_step(str(data), params=str(tmp_path / "m.zarr"), memory_budget="64MiB", out=tmp_path / "m.zarr")
    assert mixture.load_model(str(tmp_path / "m.zarr")).n_iter_ == 3  # untouched


def test_warm_start_after_a_sharded_fit_with_a_larger_budget(monkeypatch):
    X = _clusters(n=1500, d=5, spread=6.0)
    init = _start(X, 5)
    real = _sharded_plan(monkeypatch, 2)
    gm = pl.GaussianMixture(5, max_iter=3, tol=0.0, warm_start=True, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X)
        assert isinstance(gm.covariances_, sh.StoredArray)
        monkeypatch.setattr(mixture, "_plan", real)
        gm.set_params(memory_budget="256MiB").fit(X)  # unsharded now, from the sharded fit's parameters
    ref = _sk(X, 5, max_iter=6, tol=0.0, **init)
    np.testing.assert_allclose(gm.covariances_, ref.covariances_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gm.lower_bound_, ref.lower_bound_, rtol=1e-9)
