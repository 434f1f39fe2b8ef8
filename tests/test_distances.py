"""Lazy distance matrices against scipy's cdist; the Zarr writer and its CLI."""

import pickle

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings, strategies as st
from scipy.spatial.distance import cdist

import pipeline as pl
from pipeline.cli import main
from pipeline.distances import write_distances
from pipeline.errors import InputError


def _data(n, m, d, dtype=np.float32, loc=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return ((loc + rng.standard_normal((n, d))).astype(dtype),
            (loc + rng.standard_normal((m, d))).astype(dtype))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_cdist(metric, dtype):
    X, Y = _data(57, 83, 20, dtype)
    D = pl.pairwise_distances(X, Y, metric=metric, query_rows=10, train_rows=31)
    assert isinstance(D, da.Array) and D.dtype == dtype and D.chunks == ((10,) * 5 + (7,), (31, 31, 21))
    ref = cdist(X.astype(np.float64), Y.astype(np.float64), metric)
    # float32: the expansion's error is a few eps of ||x - s||^2 + ||y - s||^2 ~ 2 d.
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(D.compute(), ref, rtol=rtol)


@pytest.mark.parametrize("loc", [1e3, 3e4])
def test_float32_far_from_origin_relative_error_1e4(loc):
    # The accuracy requirement: <= 1e-4 relative against float64 cdist for
    # float32 data far from the origin (plain float32 expansion is off by 100%+ here).
    X, Y = _data(120, 300, 64, np.float32, loc=loc, seed=1)
    ref = cdist(X.astype(np.float64), Y.astype(np.float64), "sqeuclidean")
    D = pl.pairwise_distances(X, Y, metric="sqeuclidean", query_rows=50, train_rows=64).compute()
    assert D.dtype == np.float32
    assert np.max(np.abs(D - ref) / ref) <= 1e-4
    De = pl.pairwise_distances(X, Y, metric="sqeuclidean", precision="exact").compute()
    assert De.dtype == np.float64 and np.max(np.abs(De - ref) / ref) <= 1e-10


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), m=st.integers(1, 30), d=st.integers(1, 9), data=st.data())
def test_any_chunking(n, m, d, data):
    X, Y = _data(n, m, d, np.float64, seed=data.draw(st.integers(0, 1000)))
    qr, tr = data.draw(st.integers(1, n)), data.draw(st.integers(1, m))
    D = pl.pairwise_distances(X, Y, query_rows=qr, train_rows=tr).compute()
    np.testing.assert_allclose(D, cdist(X, Y), rtol=1e-10, atol=1e-10)


def test_uint8_and_budget_plan(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, (40, 3072), dtype=np.uint8)
    Y = rng.integers(0, 256, (700, 3072), dtype=np.uint8)
    pl.write_dataset(tmp_path / "y.zarr", Y, chunk_rows=100)
    D = pl.pairwise_distances(X, str(tmp_path / "y.zarr"), metric="sqeuclidean", memory_budget="64MiB")
    assert D.dtype == np.float32
    p = pl.plan("distances", n_x=40, n_y=700, n_features=3072, itemsize=1, out_itemsize=4,
                memory_budget="64MiB", threads=2)
    assert D.chunks[1][0] <= p["train_rows"] and p.peak <= 64 * 2**20
    # Converted per block to float32 (no uint8 wrap-around); the sums (~3e7) exceed
    # 2**24, so float32 rounding of the result, a few eps, is all that differs.
    np.testing.assert_allclose(D.compute(), cdist(X.astype(float), Y.astype(float), "sqeuclidean"), rtol=1e-6)


def test_keys_and_graph_holds_no_data(tmp_path):
    X, Y = _data(100, 4000, 32, np.float32)
    pl.write_dataset(tmp_path / "y.zarr", Y, chunk_rows=500)
    D = pl.pairwise_distances(X, str(tmp_path / "y.zarr"), train_rows=500)
    assert D.name.startswith("pipeline-distances-block-")
    names = {k[0] if isinstance(k, tuple) else k for k in D.__dask_graph__()}
    assert any(n.startswith("pipeline-distances-shift") for n in names)
    # Training data (512 KB) are chunk references, never embedded in the graph.
    assert len(pickle.dumps(dict(D.__dask_graph__()))) < 100_000 + X.nbytes


def test_bad_input():
    X, Y = _data(5, 6, 3)
    with pytest.raises(InputError, match="metric='chebyshev' is not supported; use one of euclidean, sqeuclidean, "
                                         "cosine, ip, manhattan"):
        pl.pairwise_distances(X, Y, metric="chebyshev")
    with pytest.raises(InputError, match="precision"):
        pl.pairwise_distances(X, Y, precision="fast")
    with pytest.raises(InputError, match="3 features but Y has 4"):
        pl.pairwise_distances(X, np.ones((2, 4)))
    with pytest.raises(InputError, match="empty"):
        pl.pairwise_distances(X, np.ones((0, 3)))
    Yb = Y.copy()
    Yb[4, 2] = np.nan
    with pytest.raises(InputError, match=r"Y \(the training set\).*row\(s\) 4"):
        pl.pairwise_distances(X, Yb, train_rows=2).compute()


def test_write_distances_and_cli(tmp_path, capsys):
    X, Y = _data(300, 500, 16, np.float32, loc=50.0, seed=3)
    q, t = str(tmp_path / "q.zarr"), str(tmp_path / "t.zarr")
    pl.write_dataset(q, X, chunk_rows=64)
    pl.write_dataset(t, Y, chunk_rows=64)
    out = str(tmp_path / "D.zarr")
    summary = write_distances(q, t, out, metric="sqeuclidean", memory_budget="48MiB")
    assert summary["shape"] == "300 x 500"
    g = zarr.open_group(out, mode="r")
    assert g.attrs["pipeline"]["kind"] == "distances" and g.attrs["pipeline"]["complete"]
    ref = cdist(X.astype(np.float64), Y.astype(np.float64), "sqeuclidean")
    np.testing.assert_allclose(g["D"][:], ref, rtol=1e-4)
    # CLI: euclidean to a new store; same job again is a no-op; bad metric exits 2.
    out2 = str(tmp_path / "E.zarr")
    assert main(["distances", q, t, out2, "--memory-budget", "48MiB", "--no-progress"]) == 0
    assert "300 x 500" in capsys.readouterr().out
    np.testing.assert_allclose(zarr.open_group(out2, mode="r")["D"][:], np.sqrt(ref), rtol=1e-4)
    assert main(["distances", q, t, out2, "--no-progress"]) == 0
    assert main(["distances", q, t, out2, "--metric", "sqeuclidean", "--no-progress"]) == 2
    assert main(["distances", q, str(tmp_path / "nope.zarr"), str(tmp_path / "F.zarr"), "--no-progress"]) == 2
