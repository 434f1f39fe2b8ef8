"""Integrity: chunks whole or absent, no store complete before it is, damaged inputs named,
concurrent jobs kept apart by output locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import pipeline as pl
from pipeline.errors import DataError, InputError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def _env():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PIPELINE_DEBUG", None)
    return env


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, argv)], capture_output=True, text=True,
                          timeout=240, env=_env())


def _popen(*argv, delay):
    """The command, slowed down by ``delay`` s per block written (tests/slow_run.py)."""
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_run.py"), str(delay), *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _meta(url):
    return dict(zarr.open_group(str(url), mode="r").attrs["pipeline"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    pl.make_blobs(str(d / "q.zarr"), 1024, 16, centers=4, random_state=1, chunk_rows=128)
    pl.make_blobs(str(d / "t.zarr"), 8000, 16, centers=4, random_state=2, chunk_rows=200)
    return d


def test_local_chunks_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # zarr's LocalStore writes every chunk to a temporary file and renames it over the
    # chunk's key (os.replace is atomic): a crash leaves the old chunk or the new one,
    # never a torn one.  This guards the behaviour the format relies on.
    renames = []
    real = Path.replace

    def spy(self, target):
        renames.append((Path(self).name, Path(target).relative_to(tmp_path).as_posix()))
        return real(self, target)

    monkeypatch.setattr(Path, "replace", spy)
    a = zarr.create_array(str(tmp_path / "a.zarr"), shape=(4, 2), chunks=(2, 2), dtype="f8")
    a[...] = np.ones((4, 2))
    written = {t for s, t in renames if ".partial" in s}
    assert {"a.zarr/c/0/0", "a.zarr/c/1/0"} <= written, renames


def test_a_failed_job_leaves_nothing_that_looks_complete(data, tmp_path):
    X = np.random.default_rng(0).standard_normal((400, 16))
    X[350] = np.inf
    pl.write_dataset(tmp_path / "bad.zarr", X, chunk_rows=50)
    r = _cli("distances", data / "q.zarr", tmp_path / "bad.zarr", tmp_path / "D.zarr", "--memory-budget", "12MiB")
    assert r.returncode == 2 and "row(s) 350" in r.stderr, r.stderr
    assert not _meta(tmp_path / "D.zarr")["complete"]
    info = _cli("info", tmp_path / "D.zarr")
    assert "INCOMPLETE" in info.stdout
    with pytest.raises(DataError, match="incomplete"):
        pl.store.open_result(str(tmp_path / "D.zarr"))
    assert not Path(str(tmp_path / "D.zarr") + ".lock").exists()  # released when the process ended


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_damaged_input_chunk_is_named_exit_1(data, tmp_path, damage):
    import shutil

    src = tmp_path / "t.zarr"
    shutil.copytree(data / "t.zarr", src)
    chunk = src / "X" / "c" / "7" / "0"
    if damage == "missing":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])  # torn by hand
    for argv in (["knn", data / "q.zarr", src, tmp_path / "k.zarr"],
                 ["distances", data / "q.zarr", src, tmp_path / "d.zarr"],
                 ["gmm", "fit", src, tmp_path / "m.zarr", "--n-components", "2", "--max-iter", "2"]):
        r = _cli(*argv)
        assert r.returncode == 1, (argv, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("done in")]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "array 'X'" in lines[0] and "chunk (7, 0)" in lines[0] and "rows 1400..1599" in lines[0], lines[0]
        assert ("is missing" if damage == "missing" else "cannot be decoded") in lines[0]
        out = Path(argv[-1] if argv[0] != "gmm" else argv[3])
        assert not out.exists() or not _meta(out).get("complete")


def test_api_read_of_a_missing_chunk_raises_instead_of_filling(data, tmp_path):
    import shutil

    shutil.copytree(data / "q.zarr", tmp_path / "q.zarr")
    (tmp_path / "q.zarr" / "y" / "c" / "2").unlink()
    ds = pl.open_dataset(tmp_path / "q.zarr")  # metadata only: opening still works
    with pytest.raises(DataError, match=r"array 'y'.*chunk \(2,\).*missing"):
        ds.y.compute()
    assert ds.X.sum().compute() != 0  # the other array is intact


def test_two_jobs_on_different_outputs_do_not_interfere(data, tmp_path):
    ref = _cli("distances", data / "q.zarr", data / "t.zarr", tmp_path / "ref.zarr", "--memory-budget", "12MiB")
    assert ref.returncode == 0, ref.stderr
    a = _popen("distances", data / "q.zarr", data / "t.zarr", tmp_path / "a.zarr", "--memory-budget", "12MiB",
               delay=0.05)
    b = _popen("distances", data / "q.zarr", data / "t.zarr", tmp_path / "b.zarr", "--memory-budget", "12MiB",
               delay=0.05)
    assert a.wait(240) == 0 and b.wait(240) == 0, (a.communicate(), b.communicate())
    want = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r")["D"][...]
    for name in ("a.zarr", "b.zarr"):
        assert _meta(tmp_path / name)["complete"]
        np.testing.assert_array_equal(zarr.open_group(str(tmp_path / name), mode="r")["D"][...], want)


def test_second_writer_of_the_same_output_refuses_without_damage(data, tmp_path):
    out = tmp_path / "D.zarr"
    argv = ["distances", data / "q.zarr", data / "t.zarr", out, "--memory-budget", "12MiB"]
    first = _popen(*argv, delay=0.5)  # a slow job: still running while the others try
    try:
        end = time.monotonic() + 120
        while not (out / "_done" / "c").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < end
            time.sleep(0.05)
        lock = json.loads(Path(str(out) + ".lock").read_text())
        assert lock["pid"] == first.pid
        for extra in ([], ["--overwrite"]):
            r = _cli(*argv, *extra)
            assert r.returncode == 2, r.stderr
            assert f"being written by another job (pid {first.pid}" in r.stderr, r.stderr
        assert first.poll() is None  # the refusals happened while it was writing
        assert first.wait(240) == 0, first.communicate()
    finally:
        first.kill()
    ref = _cli("distances", data / "q.zarr", data / "t.zarr", tmp_path / "ref.zarr", "--memory-budget", "12MiB")
    assert ref.returncode == 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["D"][...],
                                  zarr.open_group(str(tmp_path / "ref.zarr"), mode="r")["D"][...])
    assert _meta(out)["complete"] and not Path(str(out) + ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(data, tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "k.zarr"
    Path(str(out) + ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                    "since": "yesterday"}))
    r = _cli("knn", data / "q.zarr", data / "t.zarr", out)
    assert r.returncode == 0, r.stderr
    assert _meta(out)["complete"] and not Path(str(out) + ".lock").exists()


def test_lock_held_by_a_live_process_refuses_in_process(tmp_path):
    from pipeline.store import locks

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = str(tmp_path / "x.zarr")
        Path(out + ".lock").write_text(json.dumps({"pid": holder.pid, "host": __import__("socket").gethostname()}))
        with pytest.raises(InputError, match=f"pid {holder.pid}"):
            pl.make_blobs(out, 10, 2, overwrite=True)
        assert not Path(out).exists()
    finally:
        holder.kill()
        holder.wait()
    pl.make_blobs(out, 10, 2)  # its holder gone, the lock is taken over
    assert not Path(out + ".lock").exists() and not locks.held(out)
