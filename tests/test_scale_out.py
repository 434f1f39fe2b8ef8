"""Scale-out with real processes: `dask scheduler` + `dask worker`s on 127.0.0.1.

The same topology as docker-compose.yml, run as processes (no Docker engine here):
the CLI's `--scheduler tcp://…` gives the results of the default threads; a worker
killed with SIGKILL mid-job is replaced by its nanny and the job completes with the
same results; a task that kills every worker it lands on ends the job with one line
naming the task (distributed.scheduler.allowed-failures), not a hang.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import pipeline as pl
from conftest import ROOT, RealCluster

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    pl.make_cifar_like(str(d / "train.zarr"), 3000, n_features=768, random_state=1, chunk_rows=500)
    pl.make_cifar_like(str(d / "test.zarr"), 200, n_features=768, random_state=2, chunk_rows=100)
    pl.make_blobs(str(d / "blobs.zarr"), 6000, 5, centers=3, dtype="float64", random_state=0, chunk_rows=1000)
    return d


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Enough k-NN work (about a hundred tasks at 64 MiB) to kill a worker in the middle."""
    d = tmp_path_factory.mktemp("scale-big")
    pl.make_cifar_like(str(d / "train.zarr"), 10000, n_features=1536, random_state=1)
    pl.make_cifar_like(str(d / "test.zarr"), 400, n_features=1536, random_state=2)
    return d


def _cli(*argv):
    from pipeline.cli import main

    return main([*map(str, argv), "--no-progress", "--overwrite"])


def _arrays(url):
    g = zarr.open_group(str(url), mode="r")
    assert g.attrs["pipeline"]["complete"] is True
    return {name: arr[...] for name, arr in g.arrays()}, dict(g.attrs["pipeline"])


# ------------------------------------------------------------ same results as threads

def test_distances_through_tcp_match_threads(data, dask_cluster):
    args = ("distances", data / "test.zarr", data / "train.zarr")
    assert _cli(*args, data / "d-threads.zarr") == 0
    assert _cli(*args, data / "d-tcp.zarr", "--scheduler", dask_cluster.address) == 0
    (a, _), (b, _) = _arrays(data / "d-threads.zarr"), _arrays(data / "d-tcp.zarr")
    # The same blocks, GEMMs and order of operations; only the BLAS thread count differs
    # (1 per dask thread on threads, 2 on a 1-thread worker), which can move the last bit.
    np.testing.assert_allclose(a["D"], b["D"], rtol=1e-6, atol=1e-3)


def test_knn_through_tcp_matches_threads(data, dask_cluster):
    args = ("knn", data / "test.zarr", data / "train.zarr", "--k", "5")
    assert _cli(*args, data / "k-threads.zarr") == 0
    assert _cli(*args, data / "k-tcp.zarr", "--scheduler", dask_cluster.address) == 0
    (a, am), (b, bm) = _arrays(data / "k-threads.zarr"), _arrays(data / "k-tcp.zarr")
    np.testing.assert_array_equal(a["indices"], b["indices"])
    np.testing.assert_array_equal(a["predictions"], b["predictions"])
    # Distances are re-ranked exactly in float64 from the integer pixels: equal.
    np.testing.assert_array_equal(a["distances"], b["distances"])
    assert am["accuracy"] == bm["accuracy"]


def test_gmm_through_tcp_matches_threads(data, dask_cluster):
    args = ("gmm", "fit", data / "blobs.zarr")
    opts = ("--n-components", "3", "--max-iter", "8", "--tol", "0", "--seed", "0")
    assert _cli(*args, data / "g-threads.zarr", *opts) == 0
    assert _cli(*args, data / "g-tcp.zarr", *opts, "--scheduler", dask_cluster.address) == 0
    (a, am), (b, bm) = _arrays(data / "g-threads.zarr"), _arrays(data / "g-tcp.zarr")
    assert am["n_iter"] == bm["n_iter"] == 8
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        # Same tree of float64 sums; BLAS threads only (see above): 1e-10 is ~1e5 ulps.
        np.testing.assert_allclose(a[name], b[name], rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(am["lower_bound"], bm["lower_bound"], rtol=1e-12)


# ------------------------------------------------------------ failures

@pytest.fixture(scope="module")
def fragile_cluster():
    """Two nanny-managed workers of 400 MiB; a task may kill one worker and retry once."""
    old = os.environ.get("DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES")
    os.environ["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "1"
    try:
        cluster = RealCluster(n_workers=2, nthreads=1, memory_limit="400MiB")
    finally:
        if old is None:
            del os.environ["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"]
        else:
            os.environ["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = old
    try:
        yield cluster
    finally:
        # Nannies stop at once when their workers are up, slowly while restarting one.
        with contextlib.suppress(Exception):
            cluster.wait_for_workers(2, timeout=30)
        cluster.close()


def _spawn_cli(*argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_DEBUG": ""}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, argv), "--no-progress", "--overwrite"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _processing(dask_scheduler=None):
    """On the scheduler: the keys each worker is running, as strings."""
    return {ws.address: [str(ts.key) for ts in ws.processing] for ws in dask_scheduler.workers.values()}


def test_worker_killed_mid_job_the_job_completes_with_the_same_result(big, fragile_cluster):
    from distributed import Client

    data = big
    args = ("knn", data / "test.zarr", data / "train.zarr", "--k", "5", "--memory-budget", "64MiB")
    assert _cli(*args, data / "kill-threads.zarr") == 0
    with Client(fragile_cluster.address, timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
        pids = client.run(os.getpid)
        proc = _spawn_cli(*args, data / "kill-tcp.zarr", "--scheduler", fragile_cluster.address)
        victim = None
        deadline = time.monotonic() + 90
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            for addr, keys in client.run_on_scheduler(_processing).items():
                if any(k.startswith(("pipeline-knn-topk", "('pipeline-knn-topk")) for k in keys) and addr in pids:
                    victim = addr
                    break
            else:
                time.sleep(0.05)
        assert victim is not None, "the job ended before any k-NN task ran on a worker"
        # Kill the worker process itself (not its nanny), as the OOM killer would.
        os.kill(pids[victim], signal.SIGKILL)
        assert proc.poll() is None, "the job had already finished: make it bigger"
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=150)
        print(f"job ran {time.monotonic() - killed_at:.1f} s after the kill")
        assert proc.returncode == 0, err
        # The nanny brought a fresh worker back.
        client.wait_for_workers(2, timeout=60)
        assert pids[victim] not in client.run(os.getpid).values()
    (a, am), (b, bm) = _arrays(data / "kill-threads.zarr"), _arrays(data / "kill-tcp.zarr")
    np.testing.assert_array_equal(a["indices"], b["indices"])
    np.testing.assert_array_equal(a["distances"], b["distances"])
    np.testing.assert_array_equal(a["predictions"], b["predictions"])
    assert am["accuracy"] == bm["accuracy"]


def test_task_that_keeps_killing_workers_is_a_clear_bounded_error(tmp_path, fragile_cluster):
    # Small inputs, a huge output block: with --memory-budget 4GiB one distance block is
    # 8000 x 8000 float64 (488 MiB) on workers limited to 400 MiB, so each worker that
    # runs it passes the nanny's terminate threshold (95%) and is killed; after
    # allowed-failures (1) the scheduler gives up on the task.
    src = tmp_path / "small.zarr"
    pl.make_blobs(str(src), 8000, 8, centers=2, dtype="float64", random_state=0)
    t0 = time.monotonic()
    proc = _spawn_cli("distances", src, src, tmp_path / "d.zarr", "--memory-budget", "4GiB",
                      "--scheduler", fragile_cluster.address)
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pipeline: failed:") and "'pipeline-distances-" in lines[0], lines[0]
    assert "died" in lines[0] and "--memory-budget" in lines[0], lines[0]
    assert took < 100
    g = zarr.open_group(str(tmp_path / "d.zarr"), mode="r")
    assert not g.attrs["pipeline"].get("complete"), "an interrupted result must not be marked complete"


def test_sharded_gmm_through_tcp_matches_threads(tmp_path, dask_cluster):
    """Parameters sharded by component (a budget they do not fit): the workers read and
    write the component groups of the model store; the same fit as on threads."""
    pl.make_blobs(str(tmp_path / "x.zarr"), 3000, 32, centers=5, dtype="float64", random_state=0, chunk_rows=500)
    args = ("gmm", "fit", tmp_path / "x.zarr")
    opts = ("--n-components", "48", "--max-iter", "3", "--tol", "0", "--seed", "0", "--memory-budget", "11MiB")
    assert _cli(*args, tmp_path / "threads.zarr", *opts) == 0
    assert _cli(*args, tmp_path / "tcp.zarr", *opts, "--scheduler", dask_cluster.address) == 0
    (a, am), (b, bm) = _arrays(tmp_path / "threads.zarr"), _arrays(tmp_path / "tcp.zarr")
    assert am["n_iter"] == bm["n_iter"] == 3
    assert "log_det" in zarr.open_group(str(tmp_path / "tcp.zarr"), mode="r")  # it was sharded
    # Other blocks and groups (1 thread a worker): other float64 sums, amplified in the
    # factors of the smallest components; the bar is 1e-6.
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-7, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(am["lower_bound"], bm["lower_bound"], rtol=1e-12)
