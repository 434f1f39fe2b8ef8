"""The command line, in process (main(argv)) and as a real subprocess."""

import os
import subprocess
import sys

import numpy as np
import pytest

import pipeline as pl
from pipeline.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_info_plan(capsys, tmp_path):
    url = tmp_path / "b.zarr"
    code, out, err = run(capsys, "generate", "blobs", url, "--n-samples", 2000, "--n-features", 6,
                         "--centers", 3, "--dtype", "float64", "--seed", 5, "--chunk-rows", 500)
    assert code == 0 and "wrote Dataset" in out and "done in" in err
    ds = pl.open_dataset(url)
    assert ds.X.dtype == np.float64 and ds.X_zarr.chunks == (500, 6)
    code, out, _ = run(capsys, "info", url)
    assert code == 0 and "dataset, format 1, complete" in out and "X: shape (2000, 6) float64" in out
    code, out, _ = run(capsys, "plan", "knn", url, url, "--k", 3, "--memory-budget", "64MiB")
    assert code == 0 and "plan for knn (n_query=2000, n_train=2000, n_features=6, k=3, itemsize=8)" in out
    assert "predicted peak" in out
    code, out, _ = run(capsys, "plan", "gmm", "--n-samples", 1_000_000, "--n-features", 900,
                       "--n-components", 200, "--memory-budget", "16GiB")
    assert code == 0 and "component_groups=" in out


def test_ingest_with_labels(capsys, tmp_path):
    X = np.random.default_rng(0).random((300, 4)).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", np.arange(300) % 3)
    code, out, _ = run(capsys, "ingest", tmp_path / "X.npy", tmp_path / "d.zarr", "--labels", tmp_path / "y.npy")
    assert code == 0
    ds = pl.open_dataset(tmp_path / "d.zarr")
    np.testing.assert_array_equal(ds.X.compute(), X)
    np.testing.assert_array_equal(ds.y.compute(), np.arange(300) % 3)


@pytest.mark.parametrize("argv, message", [
    (["info", "{tmp}/missing"], "does not exist"),
    (["ingest", "{tmp}/missing.npy", "{tmp}/o.zarr"], "does not exist; give the path of a .npy"),
    (["generate", "blobs", "{tmp}/o.zarr", "--n-samples", "10", "--n-features", "3",
      "--memory-budget", "lots"], "is not a size"),
    (["generate", "blobs", "{tmp}/o.zarr", "--n-samples", "10", "--n-features", "100000",
      "--memory-budget", "1MiB"], "too small .* at least --memory-budget"),
    (["generate", "blobs", "{tmp}/o.zarr", "--n-samples", "0", "--n-features", "3"], "must be >= 1"),
    (["generate", "blobs", "{tmp}/o.zarr", "--n-features", "3"], "required: --n-samples"),
    (["generate", "blobs", "{tmp}/o.zarr", "--n-samples", "5", "--n-features", "3",
      "--scheduler", "gpu"], "--scheduler 'gpu' is not known"),
    (["plan", "knn", "--n-query", "10"], "needs QUERY and TRAIN"),
    (["plan", "gmm", "--n-samples", "2000000", "--n-features", "10000", "--n-components", "200",
      "--memory-budget", "1GiB"], r"too small for gmm.*give --memory-budget \d+MiB"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: error: "), err
    import re

    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "o.zarr")


def test_existing_output_needs_overwrite(capsys, tmp_path):
    url = tmp_path / "b.zarr"
    argv = ["generate", "blobs", url, "--n-samples", 50, "--n-features", 2]
    assert run(capsys, *argv)[0] == 0
    before = pl.open_dataset(url).X.compute()
    code, _, err = run(capsys, *argv, "--seed", 9)
    assert code == 2 and "already exists; pass --overwrite" in err
    np.testing.assert_array_equal(pl.open_dataset(url).X.compute(), before)
    assert run(capsys, *argv, "--seed", 9, "--overwrite")[0] == 0
    assert not np.array_equal(pl.open_dataset(url).X.compute(), before)


def test_failure_while_running_is_exit_1_without_traceback(capsys, tmp_path):
    url = tmp_path / "b.zarr"
    assert run(capsys, "generate", "blobs", url, "--n-samples", 100, "--n-features", 2, "--chunk-rows", 10)[0] == 0
    os.remove(url / "X" / "c" / "3" / "0")  # a chunk gone: zarr would read fill values...
    (url / "X" / "c" / "5" / "0").write_bytes(b"garbage")  # ...but a corrupt one cannot decode
    code, _, err = run(capsys, "plan", "knn", url, url)
    assert code == 0  # planning reads metadata only
    from pipeline.inputs import as_rows

    with pytest.raises(Exception):
        as_rows(url).dask().compute()


def _cli(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, argv)], capture_output=True,
                          text=True, **kw)


def test_progress_bar_on_request_only(tmp_path):
    # Big enough to run well over the bar's 0.5 s minimum on a fast machine (~3 s here).
    base = ["generate", "cifar-like", "--n-samples", 20000, "--chunk-rows", 500]
    quiet = _cli(*base, tmp_path / "a.zarr")  # stderr is a pipe, not a terminal: no bar
    assert quiet.returncode == 0 and "[#" not in quiet.stderr
    loud = _cli(*base, tmp_path / "b.zarr", "--progress")
    assert loud.returncode == 0 and "[#" in loud.stderr and "100%" in loud.stderr
    off = _cli(*base, tmp_path / "c.zarr", "--no-progress")
    assert off.returncode == 0 and "[#" not in off.stderr


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    r = _cli("info", tmp_path / "nothing")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = _cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "knn" in r.stdout
