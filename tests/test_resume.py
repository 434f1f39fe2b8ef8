"""Resume after a crash: real ``pipeline`` processes killed with SIGKILL part-way.

A distances or k-NN job killed while writing, rerun with the same command, keeps the
blocks already written (their chunk files are not touched again and the summary counts
them as kept), computes only the others, and ends bit-identical to an uninterrupted
run, marked complete only then.  A gmm fit resumes from its last saved iteration and
ends where an uninterrupted fit ends.

The killed runs are slowed down (``tests/slow_run.py``: a sleep after each block, piece
or iteration, passed in through the writers' callbacks) so that the kill lands part-way
through a small job on any machine; the reruns are the real ``pipeline`` command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import pipeline as pl
from pipeline.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def _env():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return env


def _cli(*argv):
    r = subprocess.run([sys.executable, "-m", "pipeline", *map(str, argv)], capture_output=True, text=True,
                       timeout=240, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(ln.split(": ", 1) for ln in r.stdout.splitlines() if ": " in ln)


def _done_blocks(out):
    d = Path(out) / "_done" / "c"
    return sorted(p for p in d.rglob("*") if p.is_file() and ".partial" not in p.name) if d.exists() else []


def _kill_when(argv, ready, delay, timeout=180):
    """Start the command slowed down by ``delay`` s per block; SIGKILL it once ``ready()``."""
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_run.py"), str(delay), *map(str, argv)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    end = time.monotonic() + timeout
    try:
        while not ready():
            assert p.poll() is None, f"finished before it could be killed: {p.communicate()}"
            assert time.monotonic() < end, "never got far enough to be killed"
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL


def _meta(url):
    return dict(zarr.open_group(str(url), mode="r").attrs["pipeline"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    pl.make_blobs(str(d / "q.zarr"), 1024, 16, centers=5, random_state=1, chunk_rows=128)
    pl.make_blobs(str(d / "t.zarr"), 8000, 16, centers=5, random_state=2, chunk_rows=200)
    pl.make_blobs(str(d / "g.zarr"), 3000, 4, centers=3, dtype="float64", random_state=0, chunk_rows=500)
    pl.make_blobs(str(d / "g40.zarr"), 3000, 24, centers=5, dtype="float64", random_state=0, chunk_rows=500)
    return d


def _check_incomplete(out):
    assert not _meta(out)["complete"]
    with pytest.raises(DataError, match="incomplete"):
        pl.store.open_result(str(out))


def test_distances_killed_then_resumed_keeps_written_blocks(data, tmp_path):
    argv = ["distances", data / "q.zarr", data / "t.zarr"]
    budget = ["--memory-budget", "12MiB"]  # small blocks: dozens of them
    ref = _cli(*argv, tmp_path / "ref.zarr", *budget)
    n_blocks = int(ref["blocks"])
    assert n_blocks >= 12, ref

    out = tmp_path / "D.zarr"
    _kill_when(argv + [out] + budget, lambda: len(_done_blocks(out)) >= 4, delay=0.3)
    _check_incomplete(out)
    assert Path(str(out) + ".lock").exists()  # the dead writer's lock, stale now
    done = zarr.open_group(str(out), mode="r")["_done"][...]
    kept = int(done.sum())
    assert 4 <= kept < n_blocks
    chunks = {(i, j): (out / "D" / "c" / str(i) / str(j)).stat().st_mtime_ns for i, j in np.argwhere(done == 1)}

    again = _cli(*argv, out, *budget)  # the same command
    assert int(again["blocks_kept"]) == kept and int(again["blocks_written"]) == n_blocks - kept, again
    assert again["status"] == "complete (resumed)"
    # The blocks written before the kill were not written (nor computed) again.
    for (i, j), mtime in chunks.items():
        assert (out / "D" / "c" / str(i) / str(j)).stat().st_mtime_ns == mtime
    a, b = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r"), zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(a["D"][...], b["D"][...])
    assert _meta(out)["complete"] and not Path(str(out) + ".lock").exists()
    assert _cli(*argv, out, *budget)["status"].startswith("already complete")


def test_knn_killed_then_resumed_keeps_written_pieces(data, tmp_path):
    argv = ["knn", data / "q.zarr", data / "t.zarr"]
    ref = _cli(*argv, tmp_path / "ref.zarr", "--k", 7, "--piece-rows", 256)
    n_pieces = int(ref["pieces"])
    assert n_pieces >= 3, ref

    out = tmp_path / "knn.zarr"
    _kill_when(argv + [out, "--k", 7, "--piece-rows", 256], lambda: len(_done_blocks(out)) >= 1, delay=1.5)
    _check_incomplete(out)
    kept = int(zarr.open_group(str(out), mode="r")["_done"][...].sum())
    assert 1 <= kept < n_pieces
    mtimes = {p: (out / "indices" / "c" / str(p) / "0").stat().st_mtime_ns for p in range(kept)}

    again = _cli(*argv, out, "--k", 7, "--piece-rows", 256)
    assert int(again["pieces_kept"]) == kept and int(again["pieces_written"]) == n_pieces - kept, again
    for p, mtime in mtimes.items():
        assert (out / "indices" / "c" / str(p) / "0").stat().st_mtime_ns == mtime
    a, b = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r"), zarr.open_group(str(out), mode="r")
    for name in ("indices", "distances", "predictions"):
        np.testing.assert_array_equal(a[name][...], b[name][...])
    assert again["accuracy"] == ref["accuracy"]
    assert _meta(out)["complete"]


@pytest.mark.parametrize("sharded", [False, True])
def test_gmm_fit_killed_then_resumed_from_its_last_iteration(data, tmp_path, sharded):
    argv = ["gmm", "fit", data / ("g40.zarr" if sharded else "g.zarr")]
    # Sharded: 40 components of 24 features at 10 MiB, the iterations written by the tasks.
    opts = ["--n-components", 40 if sharded else 3, "--max-iter", 12, "--tol", 0, "--init", "k-means++",
            "--seed", 1, "--memory-budget", "10MiB" if sharded else "64MiB"]
    ref = _cli(*argv, tmp_path / "ref.zarr", *opts)
    assert ref["n_iter"] == "12"

    out = tmp_path / "model.zarr"

    def saved_iterations():
        try:
            return json.loads((out / "zarr.json").read_text())["attributes"]["pipeline"].get("n_iter") or 0
        except (OSError, ValueError, KeyError):
            return 0

    _kill_when(argv + [out] + opts, lambda: saved_iterations() >= 3, delay=0.5)
    _check_incomplete(out)
    at = _meta(out)["n_iter"]
    assert 3 <= at < 12

    again = _cli(*argv, out, *opts)
    assert int(again["resumed_from_iteration"]) == at and again["n_iter"] == "12", again
    a, b = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r"), zarr.open_group(str(out), mode="r")
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        np.testing.assert_array_equal(a[name][...], b[name][...])
    assert _meta(out)["lower_bound"] == _meta(tmp_path / "ref.zarr")["lower_bound"]
    assert _meta(out)["history"] == _meta(tmp_path / "ref.zarr")["history"]
    assert "_iter0" not in b and "_iter1" not in b  # checkpoints dropped once complete
    assert ("log_det" in b) == sharded
