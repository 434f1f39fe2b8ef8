"""NearestNeighbors, KNeighborsRegressor, graphs and radius queries against scikit-learn's
``algorithm="brute"`` estimators, on real data (digits, diabetes) and synthetic data."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from dask.callbacks import Callback
from sklearn.base import clone
from sklearn.datasets import load_diabetes, load_digits
from sklearn import neighbors as skn

import pipeline as pl
from pipeline.errors import InputError


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    # Small noise: no exact distance ties, so neither side's tie rule decides.
    return X + np.random.default_rng(0).uniform(0, 1e-3, X.shape), y


@pytest.fixture(scope="module")
def diabetes():
    return load_diabetes(return_X_y=True)


class _Passes(Callback):
    """Counts the k-NN passes computed (graphs holding k-NN block tasks)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def _start(self, dsk):
        if any("pipeline-knn-topk" in str(key) for key in dsk):
            self.count += 1


def _same_graph(A, B):
    assert A.shape == B.shape and A.format == "csr"
    np.testing.assert_allclose((A - B).toarray(), 0, atol=1e-9)
    np.testing.assert_array_equal(A.indptr, B.indptr)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
def test_nearest_neighbors_equal_sklearn(digits, metric):
    X = digits[0]
    fit, Q = X[:1200], X[1200:1500]
    radius = {"euclidean": 22.0, "cosine": 0.08, "manhattan": 120.0}[metric]
    ours = pl.NearestNeighbors(n_neighbors=6, radius=radius, metric=metric, memory_budget="64MiB").fit(fit)
    ref = skn.NearestNeighbors(n_neighbors=6, radius=radius, metric=metric, algorithm="brute").fit(fit)
    for q in (Q, None):  # None: the training set, each row not its own neighbour
        d, i = ours.kneighbors(q)
        rd, ri = ref.kneighbors(q)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_allclose(d, rd, rtol=1e-9, atol=1e-9)
        for mode in ("connectivity", "distance"):
            _same_graph(ours.kneighbors_graph(q, mode=mode), ref.kneighbors_graph(q, mode=mode))
            G, R = ours.radius_neighbors_graph(q, mode=mode), ref.radius_neighbors_graph(q, mode=mode)
            assert G.nnz > q.shape[0] if q is not None else G.nnz > 100  # the radius finds rows
            _same_graph(G, R)
        rd, ri = ref.radius_neighbors(q, sort_results=True)
        d, i = ours.radius_neighbors(q)
        assert len(i) == len(ri) and all((a == b).all() for a, b in zip(i, ri))
        assert all(np.allclose(a, b, rtol=1e-9, atol=1e-9) for a, b in zip(d, rd))
    assert ours.n_samples_fit_ == 1200 and ours.n_features_in_ == 64 and ours.effective_metric_ == metric


def test_radius_rows_are_sorted_and_ties_by_index():
    Y = np.array([[0.0], [2.0], [-1.0], [1.0], [-2.0], [5.0]])
    dist, ind = pl.radius_neighbors(np.array([[0.0]]), Y, radius=2.0)
    assert ind[0].tolist() == [0, 2, 3, 1, 4] and dist[0].tolist() == [0, 1, 1, 2, 2]  # <= radius kept
    ind = pl.radius_neighbors(np.array([[0.0]]), Y, radius=0.5, return_distance=False)
    assert ind.dtype == object and ind[0].tolist() == [0]


def test_self_neighbours_drop_the_row_itself_even_with_duplicates():
    X = np.array([[0.0], [0.0], [0.0], [1.0], [3.0]])  # rows 0, 1 and 2 are duplicates
    nn = pl.NearestNeighbors(n_neighbors=1).fit(X)
    # Lists of 2, ties by index: row 2's is [0, 1], without itself: the first is dropped
    # (scikit-learn's rule), leaving 1.
    np.testing.assert_array_equal(nn.kneighbors(return_distance=False).ravel(), [1, 0, 1, 0, 3])
    ref = skn.NearestNeighbors(n_neighbors=1, algorithm="brute").fit(X)
    untied = [3, 4]  # rows whose nearest other row is unique
    np.testing.assert_array_equal(nn.kneighbors()[1][untied], ref.kneighbors()[1][untied])
    np.testing.assert_array_equal(nn.kneighbors()[0], ref.kneighbors()[0])


def test_radius_query_larger_than_the_budget_is_named():
    X = np.zeros((70000, 2))
    X[17] = 5  # row 17 is alone; the other queries each see 69999 rows
    Q = np.vstack([X[17:18], np.zeros((2, 2))])
    # 48 MiB lets a radius query keep 131072 pairs: the two crowded queries hold 139998.
    with pytest.raises(InputError, match=r"radius=1.0: query row 1 has at least \d+ training rows within the "
                                         r"radius, more than a radius query may keep in memory_budget='48MiB' "
                                         r"\(131072 pairs\); use a smaller radius, a larger memory budget"):
        pl.radius_neighbors(Q, X, 1.0, memory_budget="48MiB")
    dist, ind = pl.radius_neighbors(Q[:2], X, 1.0, memory_budget="48MiB")
    assert ind[0].tolist() == [17] and len(ind[1]) == 69999 and (dist[1] == 0).all()


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_regressor_equals_sklearn_on_diabetes(diabetes, weights):
    X, y = diabetes
    Y2 = np.column_stack([y, np.log(y)])  # two outputs
    for target in (y, Y2):
        ours = pl.KNeighborsRegressor(7, weights=weights, memory_budget="64MiB").fit(X[:350], target[:350])
        ref = skn.KNeighborsRegressor(7, weights=weights, algorithm="brute").fit(X[:350], target[:350])
        pred = ours.predict(X[350:])
        assert pred.shape == target[350:].shape
        np.testing.assert_allclose(pred, ref.predict(X[350:]), rtol=1e-12)
        assert ours.score(X[350:], target[350:]) == pytest.approx(ref.score(X[350:], target[350:]), rel=1e-12)


def test_regressor_weights_give_exact_matches_all_the_weight():
    X = np.array([[0.0], [1.0], [2.0]])
    reg = pl.KNeighborsRegressor(2, weights="distance").fit(X, [10.0, 20.0, 30.0])
    assert reg.predict(np.array([[1.0], [0.25]])).tolist() == pytest.approx([20.0, (10 * 4 + 20 * 4 / 3) / (4 + 4 / 3)])


def test_classifier_with_cosine_equals_sklearn(digits):
    X, y = digits
    ours = pl.KNeighborsClassifier(5, weights="distance", metric="cosine", memory_budget="64MiB").fit(X[:1400],
                                                                                                    y[:1400])
    ref = skn.KNeighborsClassifier(5, weights="distance", metric="cosine", algorithm="brute").fit(X[:1400], y[:1400])
    np.testing.assert_array_equal(ours.predict(X[1400:]), ref.predict(X[1400:]))
    np.testing.assert_allclose(ours.predict_proba(X[1400:]), ref.predict_proba(X[1400:]), atol=1e-12)
    _same_graph(ours.kneighbors_graph(X[1400:], mode="distance"), ref.kneighbors_graph(X[1400:], mode="distance"))


def test_predict_proba_and_score_share_one_pass(digits):
    X, y = digits
    clf = pl.KNeighborsClassifier(3, memory_budget="64MiB").fit(X[:1000], y[:1000])
    Q = X[1000:1300].copy()
    with _Passes() as passes:
        pred = clf.predict(Q)
        proba = clf.predict_proba(Q)
        acc = clf.score(Q, y[1000:1300])
    assert passes.count == 1
    assert acc == np.mean(pred == y[1000:1300]) and (clf.classes_[proba.argmax(1)] == pred).all()
    with _Passes() as passes:
        Q[0] += 1  # other content: another pass
        clf.predict(Q)
        clf.fit(X[:1000], y[:1000]).predict(Q)  # refitted: the last pass is forgotten
    assert passes.count == 2
    reg = pl.KNeighborsRegressor(3, memory_budget="64MiB").fit(X[:1000], y[:1000].astype(float))
    with _Passes() as passes:
        reg.score(Q, y[1000:1300].astype(float)), reg.predict(Q)
    assert passes.count == 1
    clone(clf)
    back = pickle.loads(pickle.dumps(clf))  # the cache is not pickled, the model is
    np.testing.assert_array_equal(back.predict(Q), clf.predict(Q))


def test_graph_modes_and_bad_arguments(digits):
    X = digits[0][:200]
    nn = pl.NearestNeighbors(n_neighbors=3).fit(X)
    G = nn.kneighbors_graph(X[:10])
    assert sp.issparse(G) and G.shape == (10, 200) and G.nnz == 30 and set(G.data) == {1.0}
    with pytest.raises(InputError, match="mode='weights'; choose 'connectivity' or 'distance'"):
        nn.kneighbors_graph(X[:10], mode="weights")
    with pytest.raises(InputError, match="radius=nan must be a finite number"):
        nn.radius_neighbors(X[:2], radius=float("nan"))
    with pytest.raises(InputError, match="X has 3 features, but NearestNeighbors is expecting 64"):
        nn.kneighbors(np.ones((2, 3)))
    with pytest.raises(pl.NotFittedError, match="not fitted"):
        pl.NearestNeighbors().kneighbors(X)
    with pytest.raises(InputError, match="n_neighbors=200 is out of range for the training set itself: each of "
                                         "its rows has 199 other rows"):
        nn.kneighbors(n_neighbors=200)  # the set itself: 199 other rows


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, argv)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("mode", ["connectivity", "distance"])
def test_cli_knn_graph_equals_sklearn_graph(tmp_path, digits, mode):
    X, y = digits
    q, t, out = tmp_path / "q.zarr", tmp_path / "t.zarr", tmp_path / "g.zarr"
    pl.write_dataset(q, X[1200:], y[1200:], chunk_rows=100)
    pl.write_dataset(t, X[:1200], y[:1200], chunk_rows=256)
    # Pieces of 150 queries: the graph is written in 4 pieces, its indptr chunk by chunk.
    r = _cli("knn", q, t, out, "--k", 4, "--metric", "cosine", "--graph", mode, "--piece-rows", 150,
             "--memory-budget", "64MiB")
    assert r.returncode == 0, r.stderr
    assert f"graph: {mode}, 597 x 1200, 2388 entries" in r.stdout
    ref = skn.NearestNeighbors(n_neighbors=4, metric="cosine", algorithm="brute").fit(X[:1200])
    _same_graph(pl.load_graph(out), ref.kneighbors_graph(X[1200:], mode=mode))
    assert "already complete" in _cli("knn", q, t, out, "--k", 4, "--metric", "cosine", "--graph", mode,
                                      "--piece-rows", 150).stdout
    plain = tmp_path / "plain.zarr"
    assert _cli("knn", q, t, plain, "--k", 4).returncode == 0
    with pytest.raises(InputError, match="holds no graph; write it with: pipeline knn QUERY TRAIN OUT --graph"):
        pl.load_graph(plain)


def test_cli_knn_bad_metric_is_one_line(tmp_path, digits):
    q = tmp_path / "q.zarr"
    pl.write_dataset(q, digits[0][:50], chunk_rows=50)
    r = _cli("knn", q, q, tmp_path / "o.zarr", "--metric", "chebyshev")
    assert r.returncode == 2 and "invalid choice: 'chebyshev'" in r.stderr and "Traceback" not in r.stderr
    r = _cli("knn", q, q, tmp_path / "o.zarr", "--metric", "ip", "--weights", "distance")
    assert r.returncode == 2 and "weights='distance' needs a distance" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.zarr").exists()


def test_job_file_knn_with_metric_and_graph(tmp_path, digits):
    X = digits[0]
    q, t = tmp_path / "q.zarr", tmp_path / "t.zarr"
    pl.write_dataset(q, X[1500:], chunk_rows=100)
    pl.write_dataset(t, X[:1500], chunk_rows=300)
    job = tmp_path / "job.yaml"
    job.write_text(f"memory_budget: 64MiB\nsteps:\n  - knn: {{query: {q}, train: {t}, out: {tmp_path / 'g.zarr'}, "
                   f"k: 3, metric: manhattan, graph: distance}}\n")
    r = _cli("run", job)
    assert r.returncode == 0, r.stderr
    ref = skn.NearestNeighbors(n_neighbors=3, metric="manhattan", algorithm="brute").fit(X[:1500])
    _same_graph(pl.load_graph(tmp_path / "g.zarr"), ref.kneighbors_graph(X[1500:], mode="distance"))


def test_self_neighbours_under_ip_keep_the_true_nearest():
    # Row 0's largest product is with row 1, not itself: only the list's end may go.
    Y = np.array([[1.0, 0.0], [10.0, 0.0], [5.0, 0.0], [0.0, 1.0]])
    nn = pl.NearestNeighbors(n_neighbors=1, metric="ip").fit(Y)
    assert nn.kneighbors(return_distance=False)[:, 0].tolist() == [1, 2, 1, 0]  # row 3: ties at 0, lowest


def test_negative_radius_is_refused_except_for_ip():
    X = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(InputError, match=r"radius=-1.0 must be >= 0 \(a distance\)"):
        pl.NearestNeighbors(radius=-1.0).fit(X).radius_neighbors(X[:2])
    ind = pl.NearestNeighbors(radius=-0.5, metric="ip").fit(X).radius_neighbors(X[:2], return_distance=False)
    assert [sorted(i) for i in ind] == [sorted(np.flatnonzero(X @ X[j] >= -0.5)) for j in range(2)]


def test_the_last_pass_is_per_row_range(digits):
    X, y = digits
    ds = pl.write_dataset("memory://nbrs-slices/q", X[1000:1100], chunk_rows=50)
    from pipeline.inputs import as_rows

    src = as_rows(ds, "X")
    nn = pl.NearestNeighbors(n_neighbors=3).fit(X[:1000])
    a, b = nn.kneighbors(src.rows(0, 20))[1], nn.kneighbors(src.rows(20, 40))[1]
    ref = skn.NearestNeighbors(n_neighbors=3, algorithm="brute").fit(X[:1000]).kneighbors(X[1000:1040])[1]
    np.testing.assert_array_equal(np.vstack([a, b]), ref)


def test_cli_plan_knn_plans_manhattan_in_float64():
    shape = ("plan", "knn", "--n-query", 100, "--n-train", 5000, "--n-features", 32, "--dtype", "float32",
             "--memory-budget", "64MiB")
    assert "itemsize=4" in _cli(*shape).stdout and "itemsize=4" in _cli(*shape, "--metric", "cosine").stdout
    assert "itemsize=8" in _cli(*shape, "--metric", "manhattan").stdout
