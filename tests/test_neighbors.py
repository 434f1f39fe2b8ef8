"""Exact k-NN against cdist + stable argsort, and the classifier against scikit-learn."""

import pickle

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.spatial.distance import cdist
from sklearn.base import clone
from sklearn.datasets import load_digits, load_iris
from sklearn.neighbors import KNeighborsClassifier as SkKNN

import pipeline as pl
from conftest import record_step_widths
from pipeline.cli import main
from pipeline.errors import InputError

from knn_reference import reference_predict, reference_vote


def _ref(X, Y, k):
    """Reference: float64 cdist; stable argsort keeps tied distances in index order."""
    D = cdist(np.asarray(X, np.float64), np.asarray(Y, np.float64))
    ind = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, ind, 1), ind


def _check(X, Y, k, ref=None, **kw):
    dist, ind = pl.kneighbors(X, Y, k, **kw)
    rd, ri = _ref(*(ref or (X, Y)), k)
    np.testing.assert_array_equal(ind, ri)
    # Distances are exact float64 differences: only the summation order differs
    # from cdist, a few ulps.
    np.testing.assert_allclose(dist, rd, rtol=1e-12, atol=1e-12)
    assert ind.dtype == np.int64 and dist.dtype == np.float64
    return dist, ind


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X, y


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint8])
@pytest.mark.parametrize("k", [1, 5, 17])
def test_digits_query_is_train_many_ties(digits, dtype, k):
    # Digits are small integers: many exactly equal distances; the query set is the
    # training set, so every row's nearest neighbour is itself at distance 0.
    X = digits[0][:600].astype(dtype)
    dist, ind = _check(X, X, k, train_rows=97, query_rows=250)
    assert (dist[:, 0] == 0).all()


@pytest.mark.parametrize("rows", [(1, 7), (40, 1), (40, 600), (5, 599), (39, 64), (3, 97)])
def test_result_does_not_depend_on_chunking(digits, rows):
    X = digits[0][:600].astype(np.float32)
    Q = X[::15] + 0.5
    _check(Q, X, 6, query_rows=rows[0], train_rows=rows[1])


@pytest.mark.parametrize("split_every", [2, 3, 16])
def test_tree_width_changes_nothing(split_every):
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((500, 8))
    X = rng.standard_normal((40, 8))
    _check(X, Y, 4, train_rows=23, split_every=split_every)


def test_k_up_to_n_train_and_margin_zero():
    rng = np.random.default_rng(1)
    Y = rng.integers(0, 3, (37, 4)).astype(np.float32)  # heavy ties
    X = rng.integers(0, 3, (11, 4)).astype(np.float32)
    for k in (1, 36, 37):
        _check(X, Y, k, train_rows=5)
        _check(X, Y, k, train_rows=5, margin=0)


@settings(max_examples=25, deadline=None)
@given(
    n_train=st.integers(1, 60),
    n_query=st.integers(1, 20),
    d=st.integers(1, 12),
    data=st.data(),
    dtype=st.sampled_from([np.float32, np.float64]),
    levels=st.sampled_from([None, 3]),
)
def test_hypothesis_shapes_chunkings(n_train, n_query, d, data, dtype, levels):
    k = data.draw(st.integers(1, n_train))
    tr = data.draw(st.integers(1, n_train))
    qr = data.draw(st.integers(1, n_query))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    if levels:
        Y = rng.integers(0, levels, (n_train, d)).astype(dtype)
        X = rng.integers(0, levels, (n_query, d)).astype(dtype)
    else:
        Y = (rng.standard_normal((n_train, d)) * 10 + 100).astype(dtype)
        X = (rng.standard_normal((n_query, d)) * 10 + 100).astype(dtype)
    _check(X, Y, k, query_rows=qr, train_rows=tr)


def test_float32_far_from_origin_exact():
    rng = np.random.default_rng(2)
    Y = (1e4 + rng.standard_normal((400, 30))).astype(np.float32)
    X = (1e4 + rng.standard_normal((25, 30))).astype(np.float32)
    _check(X, Y, 5, train_rows=50)


@pytest.mark.parametrize("budget", ["56MiB", "96MiB", "1GiB"])
def test_budgets_and_dask_and_zarr_inputs(tmp_path, digits, budget):
    X = digits[0].astype(np.float32)
    ds = pl.write_dataset(tmp_path / "d.zarr", X, chunk_rows=300)
    Q = da.from_array(X[:200] + 0.25, chunks=(70, 64))
    _check(Q, ds, 3, ref=(X[:200] + 0.25, X), memory_budget=budget)
    _check(X[:50], str(tmp_path / "d.zarr"), 3, ref=(X[:50], X), memory_budget=budget)


def test_graph_keys_and_no_data_embedded(tmp_path):
    from pipeline.neighbors.search import _arrays, _records_graph

    rng = np.random.default_rng(3)
    pl.write_dataset(tmp_path / "t.zarr", rng.standard_normal((3000, 16)), chunk_rows=500)
    pl.write_dataset(tmp_path / "q.zarr", rng.standard_normal((100, 16)), chunk_rows=100)
    X, Y, k, _, qblocks, tblocks = _arrays(str(tmp_path / "q.zarr"), str(tmp_path / "t.zarr"), "64MiB", 5,
                                           None, 500)
    assert tblocks == [(a, a + 500) for a in range(0, 3000, 500)]
    g = _records_graph(X, Y, k, margin=3, split_every=4, query_blocks=qblocks, train_blocks=tblocks,
                       call="test")
    names = {key[0] if isinstance(key, tuple) else key for key in g.__dask_graph__()}
    assert sum(n.startswith("pipeline-knn-topk-") for n in names) == 1  # one name, 6 keys
    assert any(n.startswith("pipeline-knn-merge") for n in names)
    assert any(n.startswith("pipeline-knn-query-") for n in names)
    # Chunk references only: the pickled graph is far smaller than the data (384 KB).
    assert len(pickle.dumps(dict(g.__dask_graph__()))) < 100_000


# ------------------------------------------------------------------------ classifier

def _iris():
    X, y = load_iris(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    return X[order], y[order]


def _check_classifier(ours, ref, Xtr, ytr, Xte, yte, k, weights, min_clear, exact=True, **tol):
    """``ours`` against scikit-learn's ``ref`` where no tie can matter, and against the
    documented tie rule everywhere.

    Where the k-th and (k+1)-th exact distances differ by far more than rounding, the
    k nearest rows are one set for any tie rule: predict, predict_proba and score must
    be scikit-learn's.  At a tie, scikit-learn keeps whichever row its GEMM rounding
    puts first (it varies with BLAS and machine): there the reference is the
    documented rule (stable ranking of exact distances, then the vote) in NumPy.

    ``exact``: the float64 distances are exact (integer data), so a tie in real
    arithmetic is a tie in float64 on every machine and the rule decides every row.
    Otherwise such a tie comes out as a gap of an ulp or two, which side wins is
    rounding (pipeline's, not only the peer's), and the rule is checked on the rows
    whose vote no tie-break can change; the others must still be a k-nearest set
    (tie-independent distances) and its vote.
    """
    want, want_proba, clear, settled = reference_predict(Xtr, ytr, Xte, k, weights)
    assert clear.mean() >= min_clear, clear.mean()  # the peer comparison covers most rows
    pred, proba = ours.predict(Xte), ours.predict_proba(Xte)
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    np.testing.assert_array_equal(pred[clear], ref.predict(Xte[clear]))
    np.testing.assert_allclose(proba[clear], ref.predict_proba(Xte[clear]), **tol)
    assert ours.score(Xte[clear], yte[clear]) == pytest.approx(ref.score(Xte[clear], yte[clear]))
    # The documented rule, tied rows included (exact distances, so exact zeros: 1e-12
    # relative is summation order only).
    rows = slice(None) if exact else settled
    np.testing.assert_array_equal(pred[rows], want[rows])
    np.testing.assert_allclose(proba[rows], want_proba[rows], rtol=1e-12, atol=1e-15)
    assert ours.score(Xte[rows], yte[rows]) == pytest.approx(np.mean(want[rows] == yte[rows]), abs=1e-15)
    if not exact:
        dist, ind = ours.kneighbors(Xte)
        np.testing.assert_allclose(dist, _ref(Xte, Xtr, k)[0], rtol=1e-12, atol=1e-12)
        v, vp = reference_vote(np.searchsorted(ours.classes_, ytr)[ind], dist, len(ours.classes_), weights)
        np.testing.assert_array_equal(pred, ours.classes_[v])
        np.testing.assert_allclose(proba, vp, rtol=1e-12, atol=1e-15)
    return clear


@pytest.mark.parametrize("units", ["cm", "mm"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_classifier_matches_sklearn_iris(weights, k, units):
    X, y = _iris()
    # Iris has duplicate rows and one-decimal values: 4-22 of the 100 queries are tied
    # at the k-th distance (row 87 at k=8: the 8th and 9th are 0.6557 away, labels 1
    # and 2).  In mm the values are integers: the same ties, exact in float64.
    X = X if units == "cm" else np.round(X * 10)
    labels = np.array(["setosa", "versicolor", "virginica"])[y]
    Xtr, ytr, Xte, yte = X[:100], labels[:100], X[50:], labels[50:]  # overlap: zero distances
    ours = pl.KNeighborsClassifier(n_neighbors=k, weights=weights).fit(Xtr, ytr)
    ref = SkKNN(n_neighbors=k, weights=weights, algorithm="brute").fit(Xtr, ytr)
    # In cm scikit-learn's expansion leaves ~1e-8 instead of 0 for a training row
    # queried again; its weight 1/1e-8 then dominates the same way the exact rule does.
    tol = dict(atol=1e-6) if units == "cm" else dict(rtol=1e-9, atol=1e-12)
    clear = _check_classifier(ours, ref, Xtr, ytr, Xte, yte, k, weights, min_clear=0.75,
                              exact=units == "mm", **tol)
    assert not clear.all()  # and the tied rows are there, checked by the rule


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_classifier_matches_sklearn_digits(digits, weights):
    X, y = digits
    Xtr, ytr, Xte = X[:1200], y[:1200], X[1200:] + 0.0
    ours = pl.KNeighborsClassifier(n_neighbors=7, weights=weights, memory_budget="64MiB").fit(Xtr, ytr)
    ref = SkKNN(n_neighbors=7, weights=weights, algorithm="brute").fit(Xtr, ytr)
    # Integer pixels: 12 of the 597 queries are tied at the 7th distance.
    _check_classifier(ours, ref, Xtr, ytr, Xte, y[1200:], 7, weights, min_clear=0.95, rtol=1e-9, atol=1e-12)
    d1, i1 = ours.kneighbors(Xte)
    d2, i2 = ref.kneighbors(Xte)
    np.testing.assert_allclose(d1, d2, rtol=1e-9, atol=1e-7)  # sorted distances: the same at ties


def test_classifier_params_clone_and_dataset_labels(tmp_path, digits):
    clf = pl.KNeighborsClassifier(n_neighbors=3, weights="distance", memory_budget="64MiB")
    assert clf.get_params() == {"n_neighbors": 3, "weights": "distance", "memory_budget": "64MiB",
                                "metric": "euclidean"}
    c2 = clone(clf)
    assert c2.get_params() == clf.get_params() and c2 is not clf
    assert clf.set_params(n_neighbors=4) is clf and clf.n_neighbors == 4
    with pytest.raises(InputError, match="invalid parameter"):
        clf.set_params(bogus=1)
    X, y = digits
    ds = pl.write_dataset(tmp_path / "tr.zarr", X[:500], y=y[:500])
    clf.fit(str(tmp_path / "tr.zarr"))  # labels come from the dataset
    ref = SkKNN(n_neighbors=4, weights="distance", algorithm="brute").fit(X[:500], y[:500])
    # scikit-learn where the 4th and 5th distances differ (195 of 200 rows), the
    # documented tie rule on all.
    want, _, clear, _ = reference_predict(X[:500], y[:500], X[500:700], 4, "distance")
    assert clear.mean() >= 0.95
    pred = clf.predict(X[500:700])
    np.testing.assert_array_equal(pred[clear], ref.predict(X[500:700][clear]))
    np.testing.assert_array_equal(pred, want)
    assert ds.n_samples == 500


def test_classifier_errors():
    X = np.random.default_rng(0).standard_normal((10, 3))
    with pytest.raises(InputError, match="not fitted"):
        pl.KNeighborsClassifier().predict(X)
    with pytest.raises(InputError, match="labels"):
        pl.KNeighborsClassifier(n_neighbors=2).fit(X)
    with pytest.raises(InputError, match="weights"):
        pl.KNeighborsClassifier(weights="gaussian").fit(X, np.arange(10))
    with pytest.raises(InputError, match="between 1 and"):
        pl.KNeighborsClassifier(n_neighbors=11).fit(X, np.arange(10))


# ---------------------------------------------------------------------- bad input

@pytest.mark.parametrize("k", [0, -1, 11, 2.5, True])
def test_bad_k(k):
    X = np.ones((10, 3))
    with pytest.raises(InputError, match="n_neighbors"):
        pl.kneighbors(X, X, k)


def test_bad_features_empty_and_nonfinite():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((30, 4))
    with pytest.raises(InputError, match="4 features but Y has 5|has 5 features but Y has 4"):
        pl.kneighbors(rng.standard_normal((3, 5)), Y, 2)
    with pytest.raises(InputError, match="empty"):
        pl.kneighbors(np.empty((0, 4)), Y, 2)
    with pytest.raises(InputError, match="empty"):
        pl.kneighbors(Y, np.empty((0, 4)), 1)
    X = Y[:5].copy()
    X[3, 1] = np.nan
    with pytest.raises(InputError, match=r"X \(the query set\).*row\(s\) 3\b"):
        pl.kneighbors(X, Y, 2)
    Yb = Y.copy()
    Yb[[4, 27], 0] = [np.inf, -np.inf]
    with pytest.raises(InputError, match=r"Y \(the training set\).*row\(s\) 4, 27;"):
        pl.kneighbors(Y[:5], Yb, 2, train_rows=7)


# ---------------------------------------------------------------------------- store

def test_write_knn_and_cli(tmp_path, digits, capsys):
    X, y = digits
    tr, te = str(tmp_path / "train.zarr"), str(tmp_path / "test.zarr")
    pl.write_dataset(tr, X[:1400], y=y[:1400], chunk_rows=256)
    pl.write_dataset(te, X[1400:], y=y[1400:], chunk_rows=100)
    out = str(tmp_path / "knn.zarr")
    assert main(["knn", te, tr, out, "--k", "5", "--memory-budget", "64MiB", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    ref = SkKNN(n_neighbors=5, algorithm="brute").fit(X[:1400], y[:1400])
    # The predictions are scikit-learn's where the 5th and 6th distances differ (391
    # of 397 rows) and the documented tie rule's on all; so is the accuracy.
    want, _, clear, _ = reference_predict(X[:1400], y[:1400], X[1400:], 5)
    assert clear.mean() >= 0.95
    acc = float(np.mean(want == y[1400:]))
    assert f"accuracy: {round(acc, 6)}" in printed
    import zarr

    g = zarr.open_group(out, mode="r")
    meta = g.attrs["pipeline"]
    assert meta["kind"] == "neighbors" and meta["complete"] and meta["accuracy"] == pytest.approx(acc)
    assert g["indices"].dtype == np.int64 and g["indices"].shape == (397, 5)
    np.testing.assert_array_equal(g["predictions"][:][clear], ref.predict(X[1400:][clear]))
    np.testing.assert_array_equal(g["predictions"][:], want)
    _, ri = _ref(X[1400:], X[:1400], 5)
    np.testing.assert_array_equal(g["indices"][:], ri)
    # Same job again: already complete, exit 0; another job at OUT: refused (exit 2).
    assert main(["knn", te, tr, out, "--k", "5", "--no-progress"]) == 0
    assert main(["knn", te, tr, out, "--k", "4", "--no-progress"]) == 2
    assert main(["knn", te, tr, str(tmp_path / "o2.zarr"), "--k", "0", "--no-progress"]) == 2
    assert main(["knn", te, tr, str(tmp_path / "o3.zarr"), "--k", "1401", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "k=0" in err and "1401" in err


def test_kneighbors_on_real_cluster(tmp_path, dask_cluster):
    from distributed import Client

    rng = np.random.default_rng(5)
    Y = rng.standard_normal((900, 12)).astype(np.float32)
    X = rng.standard_normal((50, 12)).astype(np.float32)
    pl.write_dataset(tmp_path / "t.zarr", Y, chunk_rows=200)
    with Client(dask_cluster.address):
        dist, ind = pl.kneighbors(X, str(tmp_path / "t.zarr"), 4, train_rows=200)
        Yb = Y.copy()
        Yb[11, 0] = np.nan
        pl.write_dataset(tmp_path / "bad.zarr", Yb, chunk_rows=200)
        with pytest.raises(InputError, match="row\\(s\\) 11"):
            pl.kneighbors(X, str(tmp_path / "bad.zarr"), 4)
    rd, ri = _ref(X, Y, 4)
    np.testing.assert_array_equal(ind, ri)


def test_uncertified_rows_go_through_wide_then_exact_pass(monkeypatch):
    import pipeline.neighbors.search as nb

    calls = []
    real = nb._records_graph

    def spy(X, Y, k, **kw):
        calls.append((X.shape[0], kw["margin"], kw.get("exact", False)))
        return real(X, Y, k, **kw)

    monkeypatch.setattr(nb, "_records_graph", spy)
    rng = np.random.default_rng(7)
    # Two distinct rows, 90% zeros: every block holds more tied rows than any margin.
    Y = (rng.random((300, 1)) < 0.1).astype(np.float32)
    X = (rng.random((20, 1)) < 0.5).astype(np.float32)
    _check(X, Y, 4, train_rows=50, margin=0)
    assert calls[0] == (20, 0, False)
    assert len(calls) == 3 and calls[1][1] >= 32 and calls[2][2]  # wide margin, then exact


def test_cli_knn_as_a_real_subprocess(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    rng = np.random.default_rng(11)
    Y = rng.integers(0, 256, (300, 48), dtype=np.uint8)
    tr, te = str(tmp_path / "tr.zarr"), str(tmp_path / "te.zarr")
    pl.write_dataset(tr, Y, y=np.arange(300) % 3)
    pl.write_dataset(te, Y[:40], y=np.arange(40) % 3)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "pipeline", "knn", te, tr, str(tmp_path / "o.zarr"), "--k", "1",
                        "--memory-budget", "64MiB", "--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "accuracy: 1.0" in r.stdout  # each query is its own nearest neighbour
    r = subprocess.run([sys.executable, "-m", "pipeline", "knn", te, str(tmp_path / "missing.zarr"),
                        str(tmp_path / "p.zarr"), "--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr


def test_knn_from_zarr_never_imports_dask_array(tmp_path):
    """dask.array (and the scipy modules it loads when scipy is installed) costs about
    half a second of import: k-NN on stores builds its graph without it."""
    import subprocess
    import sys
    from pathlib import Path

    rng = np.random.default_rng(12)
    Y, X = rng.standard_normal((500, 8)), rng.standard_normal((20, 8))
    pl.write_dataset(str(tmp_path / "t.zarr"), Y, y=np.arange(500) % 3, chunk_rows=100)
    pl.write_dataset(str(tmp_path / "q.zarr"), X, chunk_rows=20)
    code = (f"import sys, pipeline as pl\n"
            f"d, i = pl.kneighbors({str(tmp_path / 'q.zarr')!r}, {str(tmp_path / 't.zarr')!r}, 3)\n"
            f"clf = pl.KNeighborsClassifier(3).fit({str(tmp_path / 't.zarr')!r})\n"
            f"p = clf.predict({str(tmp_path / 'q.zarr')!r})\n"
            f"print(i.tolist(), p.tolist(), 'dask.array' in sys.modules, 'scipy' in sys.modules)")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    rd, ri = _ref(X, Y, 3)
    assert r.stdout.strip().endswith("False False"), r.stdout
    assert r.stdout.startswith(str(ri.tolist())), r.stdout


def test_every_bad_training_row_is_named_across_steps(tmp_path):
    """A task walks its block in steps; the error still names the bad rows of all of them."""
    rng = np.random.default_rng(13)
    Y = rng.standard_normal((6000, 4))
    Y[[5, 2500, 5900]] = np.nan
    pl.write_dataset(str(tmp_path / "t.zarr"), Y, chunk_rows=100)
    with pytest.raises(InputError, match=r"Y \(the training set\).*row\(s\) 5, 2500, 5900;"):
        pl.kneighbors(rng.standard_normal((3, 4)), str(tmp_path / "t.zarr"), 2, train_rows=6000)


def test_values_whose_products_overflow_float32_are_refused_not_ranked():
    """1e21 is finite in float32 but its square is not: the GEMM would produce inf and
    NaN and rank garbage, so such rows are named like NaN rows."""
    a = np.float32(5e18)
    Y = np.array([[a, a], [a, -a]] + [[-a, -a]] * 5, dtype=np.float32)
    X = np.array([[1e21, 1e21]], dtype=np.float32)
    with pytest.raises(InputError, match=r"X \(the query set\).*too large to square.*row\(s\) 0"):
        pl.kneighbors(X, Y, 2)
    # Within range, the same geometry is ranked exactly.
    dist, ind = pl.kneighbors(X / np.float32(1e12), Y / np.float32(1e12), 2)
    assert ind.tolist() == [[0, 1]]


def test_in_memory_training_blocks_are_ranked_in_steps(monkeypatch):
    """NumPy inputs walk their blocks in the same steps as Zarr ones (the plan counts a
    step's ranking block, not a whole block's)."""
    import pipeline.kernels.topk as topk

    widths = record_step_widths(monkeypatch)
    monkeypatch.setattr(topk, "STEP_BYTES", 64 * 1024)
    rng = np.random.default_rng(14)
    Y, X = rng.standard_normal((3000, 16)), rng.standard_normal((40, 16))
    dist, ind = pl.kneighbors(X, Y, 3, train_rows=1500)
    step = topk.step_rows(40, 16, 8)
    assert step < 1500 and max(widths) == step and sum(widths) == 3000
    np.testing.assert_array_equal(ind, _ref(X, Y, 3)[1])


def test_bad_margin_and_unknown_chunks_are_input_errors():
    rng = np.random.default_rng(15)
    Y = rng.standard_normal((50, 3))
    with pytest.raises(InputError, match="margin=-3"):
        pl.kneighbors(Y[:2], Y, 2, margin=-3)
    Yd = da.from_array(Y, chunks=10)
    Yd = Yd[Yd[:, 0] > -10]  # unknown chunk sizes
    with pytest.raises(InputError, match="unknown chunk sizes"):
        pl.kneighbors(Y[:2], Yd, 2)


def test_piece_errors_are_renumbered_in_the_cli_words():
    from pipeline.neighbors.results import _absolute_rows

    e = InputError("X (the query set) has NaN or infinite values (or values too large to square) in "
                   "row(s) 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 6 more; remove or impute those rows")
    assert str(_absolute_rows(e, 300)) == (
        "QUERY has NaN or infinite values (or values too large to square) in row(s) 301, 302, 303, 304, "
        "305, 306, 307, 308, 309, 310 and 6 more; remove or impute those rows")
    e = InputError("Y (the training set) has NaN or infinite values (or values too large to square) in "
                   "row(s) 4; remove or impute those rows")
    assert str(_absolute_rows(e, 300)).startswith("TRAIN has NaN") and "row(s) 4;" in str(_absolute_rows(e, 300))


def test_fallback_rows_are_read_with_the_integrity_checks(tmp_path):
    """The few queries a fallback pass rereads go through the same checks as any read:
    a chunk deleted since the main pass is named, not read as zeros."""
    from pipeline.errors import DataError
    from pipeline.inputs import RowSource

    rng = np.random.default_rng(17)
    pl.write_dataset(str(tmp_path / "q.zarr"), rng.standard_normal((300, 4)), chunk_rows=100)
    q = RowSource(pl.open_dataset(str(tmp_path / "q.zarr")), "X", lo=50, hi=300)
    np.testing.assert_array_equal(q.take(np.array([0, 120, 249])),
                                  pl.open_dataset(str(tmp_path / "q.zarr")).X_zarr[[50, 170, 299]])
    (tmp_path / "q.zarr" / "X" / "c" / "1" / "0").unlink()
    q = RowSource(pl.open_dataset(str(tmp_path / "q.zarr")), "X", lo=50, hi=300)
    with pytest.raises(DataError, match=r"chunk \(1, 0\)"):
        q.take(np.array([0, 120]))
    assert q.take(np.array([0, 10])).shape == (2, 4)  # other chunks still read
