"""Where work runs: threads, a LocalCluster, a real `dask scheduler` + `dask worker`s."""

import subprocess
import sys
import time

import dask.array as da
import numpy as np
import pytest

import pipeline as pl
from pipeline import runtime
from pipeline.errors import InputError


def _blas_threads(x):
    from threadpoolctl import threadpool_info

    n = max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1)
    return np.array([n])


def _blas_product(compute_threads):
    x = da.ones((8, 2), chunks=(1, 2))
    seen = x.map_blocks(_blas_threads, chunks=((1,) * 8,), drop_axis=1, dtype=int)
    (blas,) = runtime.compute(seen)
    return int(blas.max()) * compute_threads


def test_threads_blas_times_dask_threads_within_cores():
    with runtime.connect("threads", threads_per_worker=2):
        assert runtime.dask_threads() == 2
        assert _blas_product(2) <= runtime.cores()
    with runtime.connect("threads", threads_per_worker=1):
        assert runtime.dask_threads() == 1
        assert _blas_product(1) <= runtime.cores()


def test_same_result_on_a_real_cluster(tmp_path, dask_cluster):
    ds = pl.make_blobs(tmp_path / "d.zarr", 20_000, 8, chunk_rows=3000, random_state=3)
    expected = ds.X.compute().astype(np.float64).sum(0)
    with runtime.connect(dask_cluster.address) as client:
        assert client is not None and len(client.scheduler_info()["workers"]) == 2
        # Each worker has one thread; BLAS threads x dask threads <= cores.
        assert _blas_product(1) <= runtime.cores()
        X = pl.open_dataset(tmp_path / "d.zarr").X
        (got,) = runtime.compute(X.astype(np.float64).sum(0))
        # Generation on the cluster writes the same bytes as on threads.
        pl.make_blobs(tmp_path / "c.zarr", 20_000, 8, chunk_rows=3000, random_state=3)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_array_equal(pl.open_dataset(tmp_path / "c.zarr").X.compute(), ds.X.compute())


def test_cli_through_tcp_scheduler_matches_threads(tmp_path, dask_cluster):
    from pipeline.cli import main

    args = ["generate", "cifar-like", "--n-samples", "700", "--chunk-rows", "100", "--no-progress"]
    assert main(args + [str(tmp_path / "a.zarr")]) == 0
    assert main(args + [str(tmp_path / "b.zarr"), "--scheduler", dask_cluster.address]) == 0
    a, b = pl.open_dataset(tmp_path / "a.zarr"), pl.open_dataset(tmp_path / "b.zarr")
    np.testing.assert_array_equal(a.X.compute(), b.X.compute())
    np.testing.assert_array_equal(a.y.compute(), b.y.compute())


def test_unreachable_scheduler_is_a_clear_bounded_error():
    start = time.monotonic()
    with pytest.raises(InputError, match="cannot reach the scheduler at tcp://127.0.0.1:9 within 2 s"):
        with runtime.connect("tcp://127.0.0.1:9", timeout=2):
            pass
    assert time.monotonic() - start < 30


def test_unknown_scheduler_name():
    with pytest.raises(InputError, match="--scheduler 'gpu' is not known"):
        with runtime.connect("gpu"):
            pass


def test_local_cluster_prints_dashboard_and_computes(tmp_path):
    lines = []
    ds = pl.make_blobs(tmp_path / "d.zarr", 5000, 4, chunk_rows=1000)
    with runtime.connect("local", workers=2, threads_per_worker=1, memory_budget="256MiB",
                         dashboard_address="127.0.0.1:0", echo=lines.append) as client:
        (total,) = runtime.compute(pl.open_dataset(ds.url).X.astype(float).sum())
        limits = {w["memory_limit"] for w in client.scheduler_info()["workers"].values()}
    assert any(line.startswith("dashboard: http://") for line in lines)
    assert np.isclose(total, ds.X.compute().astype(float).sum())
    # The worker limit is the budget plus the worker's own footprint, not the machine's RAM.
    assert all(256 * 2**20 < lim < 1024 * 2**20 for lim in limits)


def test_python_m_pipeline_runs_as_a_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "generate", "blobs", str(tmp_path / "s.zarr"),
                        "--n-samples", "100", "--n-features", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote Dataset" in r.stdout and "peak memory" in r.stderr


def test_knn_through_tcp_scheduler_matches_threads(tmp_path, dask_cluster):
    import zarr

    from pipeline.cli import main

    pl.make_cifar_like(tmp_path / "tr.zarr", 1500, random_state=1, chunk_rows=400)
    pl.make_cifar_like(tmp_path / "te.zarr", 120, random_state=2)
    base = ["knn", tmp_path / "te.zarr", tmp_path / "tr.zarr"]
    assert main([str(a) for a in base + [tmp_path / "a.zarr", "--memory-budget", "64MiB"]]) == 0
    assert main([str(a) for a in base + [tmp_path / "b.zarr", "--memory-budget", "64MiB",
                                         "--scheduler", dask_cluster.address]]) == 0
    a, b = (zarr.open_group(str(tmp_path / n), mode="r") for n in ("a.zarr", "b.zarr"))
    for name in ("indices", "distances", "predictions"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert a.attrs["pipeline"]["accuracy"] == b.attrs["pipeline"]["accuracy"]
