"""Metrics beyond L2 (cosine, ip, manhattan): kernels, distance matrices and k-NN against SciPy,
scikit-learn and NumPy references, in memory and from Zarr, in float32 and float64."""

import subprocess
import sys

import numpy as np
import pytest
import zarr
from hypothesis import given, settings, strategies as st
from scipy.spatial.distance import cdist
from sklearn.metrics import pairwise_distances as sk_pairwise
from sklearn.neighbors import NearestNeighbors as SkNN

import pipeline as pl
from pipeline.cli import METRICS as CLI_METRICS
from pipeline.errors import InputError
from pipeline.kernels import distances as kd
from pipeline.kernels import topk

METRICS = ["euclidean", "sqeuclidean", "cosine", "ip", "manhattan"]


def _keys(X, Y, metric):
    """Reference ranking keys in float64 by SciPy / NumPy: smaller is nearer."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    if metric == "ip":
        return -(X @ Y.T)
    if metric == "cosine":
        # scikit-learn's convention: a zero row stays zero, similarity 0 to every row.
        nx, ny = np.linalg.norm(X, axis=1), np.linalg.norm(Y, axis=1)
        nx[nx == 0], ny[ny == 0] = 1, 1
        return -((X / nx[:, None]) @ (Y / ny[:, None]).T)
    return cdist(X, Y, {"euclidean": "sqeuclidean", "manhattan": "cityblock"}.get(metric, metric))


def _reference(X, Y, k, metric):
    """(distances, indices, untied rows): the rows whose k-th and (k+1)-th keys differ clearly."""
    K = _keys(X, Y, metric)
    ind = np.argsort(K, axis=1, kind="stable")
    srt = np.take_along_axis(K, ind, 1)
    scale = np.abs(srt).max(axis=1) + 1
    untied = (srt[:, k] - srt[:, k - 1]) > 1e-9 * scale if K.shape[1] > k else np.ones(K.shape[0], bool)
    return topk.distances_from_keys(srt[:, :k], metric), ind[:, :k], untied


def test_cli_metrics_are_the_kernels():
    assert CLI_METRICS == kd.METRICS == tuple(METRICS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", ["sqeuclidean", "ip", "cosine", "manhattan"])
def test_kernel_steps_rank_exactly(metric, dtype):
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(60, 33)) + 2).astype(dtype)
    Y = (rng.normal(size=(1500, 33)) + 2).astype(dtype)
    Y[7] = 0  # a zero row (cosine: similarity 0 to everything)
    shift = Y[:64].mean(0) if metric == "sqeuclidean" else None
    q = topk.prepare_queries(X, shift, metric=metric)
    part = topk.knn_block(q, Y, 6, margin=2, step=256, shift=shift)
    K = _keys(X, Y, metric)
    ref = np.argsort(K, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(part["idx"], ref)
    np.testing.assert_allclose(part["dist"], np.take_along_axis(K, ref, 1), rtol=1e-12, atol=1e-12)
    assert topk.uncertified(part).size == 0


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["sqeuclidean", "ip", "cosine", "manhattan"]), st.integers(1, 40), st.integers(1, 300),
       st.integers(0, 2**31 - 1), st.floats(0.05, 0.95))
def test_radius_steps_keep_exactly_the_ball(metric, n, m, seed, quantile):
    rng = np.random.default_rng(seed)
    X, Y = rng.normal(size=(n, 5)), rng.normal(size=(m, 5))
    K = _keys(X, Y, metric)
    # Midway between two distinct keys: no pair sits on the boundary, where the
    # kernel's and the reference's last-bit rounding would decide.
    keys = np.unique(K)
    i = min(int(quantile * keys.size), keys.size - 2) if keys.size > 1 else 0
    if keys.size < 2 or keys[i + 1] - keys[i] < 1e-9 * (abs(keys[i]) + 1):
        return
    max_key = float((keys[i] + keys[i + 1]) / 2)
    q = topk.prepare_queries(X, metric=metric)
    got = topk.radius_steps(q, [(s, Y[s:s + 64]) for s in range(0, m, 64)], max_key)
    rows, cols = np.nonzero(K <= max_key)
    assert sorted(zip(got["row"].tolist(), got["idx"].tolist())) == sorted(zip(rows.tolist(), cols.tolist()))
    np.testing.assert_allclose(got["dist"][np.lexsort((got["idx"], got["row"]))], K[rows, cols],
                               rtol=1e-12, atol=1e-12)


def test_radius_steps_stop_at_the_pair_limit():
    X, Y = np.zeros((3, 2)), np.zeros((50, 2))
    with pytest.raises(topk.BallTooLarge) as info:
        topk.radius_steps(topk.prepare_queries(X, offset=10), [(0, Y)], 1.0, max_pairs=40)
    assert info.value.row in (10, 11, 12) and info.value.count == 50 and info.value.limit == 40


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_pairwise_distances_equal_sklearn(metric, dtype):
    rng = np.random.default_rng(1)
    X = rng.integers(0, 9, size=(70, 12)).astype(dtype) if dtype == np.uint8 else rng.normal(size=(70, 12)).astype(dtype)
    Y = rng.integers(0, 9, size=(130, 12)).astype(dtype) if dtype == np.uint8 else rng.normal(size=(130, 12)).astype(dtype)
    X[3] = 0
    D = pl.pairwise_distances(X, Y, metric=metric, query_rows=32, train_rows=50).compute()
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    ref = X64 @ Y64.T if metric == "ip" else sk_pairwise(X64, Y64, metric=metric)
    tol = 1e-12 if dtype == np.float64 or metric == "manhattan" else 2e-5
    np.testing.assert_allclose(D, ref, rtol=tol, atol=tol * max(1, np.abs(ref).max()))
    assert D.dtype == (np.float64 if metric == "manhattan" or dtype == np.float64 else np.float32)
    if metric == "cosine":
        np.testing.assert_array_equal(D[3], 1.0)  # a zero row: distance 1 to every row


def test_distances_metrics_from_zarr_via_cli(tmp_path):
    rng = np.random.default_rng(5)
    q, t = tmp_path / "q.zarr", tmp_path / "t.zarr"
    X, Y = rng.normal(size=(90, 7)).astype(np.float32), rng.normal(size=(150, 7)).astype(np.float32)
    pl.write_dataset(q, X, chunk_rows=40)
    pl.write_dataset(t, Y, chunk_rows=40)
    for metric in ("cosine", "manhattan"):
        out = tmp_path / f"D-{metric}.zarr"
        r = subprocess.run([sys.executable, "-m", "pipeline", "distances", q, t, out, "--metric", metric,
                            "--memory-budget", "64MiB"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        D = zarr.open_group(str(out), mode="r")["D"][...]
        np.testing.assert_allclose(D, sk_pairwise(X.astype(np.float64), Y.astype(np.float64), metric=metric),
                                   rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kneighbors_equal_sklearn_brute_where_not_tied(metric, dtype):
    rng = np.random.default_rng(7)
    Y = (rng.normal(size=(3000, 24)) * rng.uniform(0.5, 3, size=(3000, 1))).astype(dtype)
    X = (rng.normal(size=(200, 24)) * 2).astype(dtype)
    Y[11] = 0
    X[5] = 0  # cosine: every row at distance 1 (all tied), ip: all 0
    dist, ind = pl.kneighbors(X, Y, 7, metric=metric, memory_budget="64MiB", train_rows=700)
    rd, ri, untied = _reference(X, Y, 7, metric)
    assert untied.sum() > 190
    np.testing.assert_array_equal(ind[untied], ri[untied])
    np.testing.assert_allclose(dist, rd, rtol=1e-10, atol=1e-10)  # the distances agree even where tied
    if metric != "ip":  # scikit-learn has no inner-product metric
        sd, si = SkNN(n_neighbors=7, metric=metric, algorithm="brute").fit(Y.astype(np.float64)).kneighbors(
            X.astype(np.float64))
        np.testing.assert_array_equal(ind[untied], si[untied])
        np.testing.assert_allclose(dist, sd, rtol=1e-9, atol=1e-9)
    if metric == "cosine":
        np.testing.assert_array_equal(dist[5], 1.0)
        np.testing.assert_array_equal(ind[5], np.arange(7))  # all tied: the lowest indices


def test_inner_product_is_largest_first_and_not_centred():
    # Far from the origin: a centred GEMM would still rank distances, not products.
    rng = np.random.default_rng(2)
    Y = rng.normal(size=(500, 6)) + 1000
    X = rng.normal(size=(20, 6))
    dist, ind = pl.kneighbors(X, Y, 4, metric="ip")
    P = X @ Y.T
    ref = np.argsort(-P, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(ind, ref)
    np.testing.assert_allclose(dist, np.take_along_axis(P, ref, 1), rtol=1e-12)
    assert (np.diff(dist, axis=1) <= 0).all()


def test_kneighbors_metrics_from_zarr_at_a_small_budget(tmp_path):
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(300, 40)).astype(np.float32), rng.normal(size=(5000, 40)).astype(np.float32)
    q, t = tmp_path / "q.zarr", tmp_path / "t.zarr"
    pl.write_dataset(q, X, chunk_rows=128)
    pl.write_dataset(t, Y, chunk_rows=512)
    for metric in ("cosine", "ip", "manhattan"):
        dist, ind = pl.kneighbors(str(q), str(t), 5, metric=metric, memory_budget="48MiB")
        rd, ri, untied = _reference(X, Y, 5, metric)
        np.testing.assert_array_equal(ind[untied], ri[untied])
        np.testing.assert_allclose(dist, rd, rtol=1e-10, atol=1e-10)


def test_bad_metric_names_the_choices():
    X = np.ones((3, 2))
    for call in (lambda: pl.kneighbors(X, X, 1, metric="chebyshev"),
                 lambda: pl.NearestNeighbors(metric="l3").fit(X),
                 lambda: pl.pairwise_distances(X, X, metric="minkowski")):
        with pytest.raises(InputError, match="is not supported; use one of euclidean, sqeuclidean, cosine, ip, "
                                             "manhattan"):
            call()
    with pytest.raises(InputError, match="weights='distance' needs a distance"):
        pl.KNeighborsClassifier(weights="distance", metric="ip").fit(X, [0, 1, 1])


def test_nan_rows_are_named_for_every_metric():
    X, Y = np.ones((4, 3)), np.ones((9, 3))
    Y[6, 1] = np.nan
    for metric in ("cosine", "ip", "manhattan"):
        with pytest.raises(InputError, match=r"Y \(the training set\) has NaN .* row\(s\) 6"):
            pl.kneighbors(X, Y, 2, metric=metric)


def test_cosine_sees_tiny_float32_rows_as_unit_rows():
    # Squares of ~1e-24 underflow in float32: the norms are taken in float64.
    rng = np.random.default_rng(8)
    Y = rng.normal(size=(300, 16)).astype(np.float32)
    X = rng.normal(size=(4, 16)).astype(np.float32)
    Y[137] = X[0] * np.float32(1e-24)
    dist, ind = pl.kneighbors(X, Y, 1, metric="cosine")
    assert ind[0, 0] == 137 and dist[0, 0] < 1e-6


def test_inner_product_bound_certifies_unlike_norms_in_the_main_pass():
    # Unit queries, items of norm ~1e4: a bound by the sum of the squared norms would
    # leave every query uncertified (the fallbacks); Cauchy-Schwarz's does not.
    rng = np.random.default_rng(9)
    X = rng.normal(size=(100, 32)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Y = (rng.normal(size=(2000, 32)) * 1e4).astype(np.float32)
    q = topk.prepare_queries(X, metric="ip")
    part = topk.knn_block(q, Y, 5, margin=2, step=500)
    assert topk.uncertified(part).size < 5
    ref = np.argsort(-(X.astype(np.float64) @ Y.astype(np.float64).T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(part["idx"], ref)
