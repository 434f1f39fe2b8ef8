"""Bad input through the real command line, one case at a time.

Each case is a fresh ``python -m pipeline`` process: exit status 2, one line on stderr
naming what is wrong and how to fix it, no traceback, nothing written that looks
complete, and the shared inputs untouched.  The inputs are made once per module.
"""

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

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def _cli(*argv, cwd=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PIPELINE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def _evil_v2(path, dtype, filters):
    """A Zarr v2 dataset whose X needs an object dtype or a pickle codec to decode."""
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    g.create_array("X", shape=(2, 2), dtype="f8")
    meta_path = Path(path) / "X" / ".zarray"
    meta = json.loads(meta_path.read_text())
    meta["dtype"], meta["filters"] = dtype, filters
    meta_path.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 4))
    pl.write_dataset(d / "a.zarr", X, y=rng.integers(0, 3, 100), chunk_rows=25)
    pl.write_dataset(d / "five.zarr", rng.standard_normal((100, 5)), chunk_rows=25)
    Xn = X.copy()
    Xn[[3, 57]] = np.nan
    pl.write_dataset(d / "nan.zarr", Xn, chunk_rows=25)
    Xi = X.copy()
    Xi[41, 2] = np.inf
    pl.write_dataset(d / "inf.zarr", Xi, chunk_rows=25)
    zarr.create_array(str(d / "array.zarr"), shape=(10, 4), dtype="f8")
    _evil_v2(d / "pickled.zarr", "<f8", [{"id": "pickle", "protocol": 5}])
    _evil_v2(d / "object.zarr", "|O", [{"id": "pickle", "protocol": 5}])
    np.save(d / "x.npy", X.astype(np.float32))
    np.save(d / "y_short.npy", np.zeros(99, dtype=np.int64))
    pl.distances.write_distances(str(d / "a.zarr"), str(d / "a.zarr"), str(d / "held.zarr"))
    return d


def _snapshot(d):
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(Path(d).rglob("*")) if p.is_file()}


CASES = {
    "missing input path": (["knn", "{d}/nope.zarr", "{d}/a.zarr", "{o}"], "does not exist"),
    "array, not a group": (["knn", "{d}/array.zarr", "{d}/a.zarr", "{o}"], "Zarr array, not a dataset group"),
    "feature counts differ": (["knn", "{d}/five.zarr", "{d}/a.zarr", "{o}"], "4 features|5 features"),
    "distances features differ": (["distances", "{d}/five.zarr", "{d}/a.zarr", "{o}"], "same number of columns"),
    "k = 0": (["knn", "{d}/a.zarr", "{d}/a.zarr", "{o}", "--k", "0"], "k=0 is out of range.*between 1 and"),
    "k > n_train": (["knn", "{d}/a.zarr", "{d}/a.zarr", "{o}", "--k", "101"], "k=101 is out of range.*100"),
    "unparseable budget": (["knn", "{d}/a.zarr", "{d}/a.zarr", "{o}", "--memory-budget", "lots"], "memory-budget"),
    "budget below one row": (["distances", "{d}/a.zarr", "{d}/a.zarr", "{o}", "--memory-budget", "1KiB"],
                             r"give --memory-budget \d+MiB or more"),
    "NaN in the query set": (["knn", "{d}/nan.zarr", "{d}/a.zarr", "{o}"], r"NaN or infinite.*row\(s\) 3, 57"),
    "inf in the training set": (["distances", "{d}/a.zarr", "{d}/inf.zarr", "{o}"], r"row\(s\) 41\b"),
    "NaN in gmm data": (["gmm", "fit", "{d}/nan.zarr", "{o}", "--n-components", "2"], r"3, 57"),
    "labels of the wrong length": (["ingest", "{d}/x.npy", "{o}", "--labels", "{d}/y_short.npy"],
                                   r"\(99,\).*expected \(100,\)"),
    "n_components > n_samples": (["gmm", "fit", "{d}/a.zarr", "{o}", "--n-components", "500"], "n_components"),
    "output holds another result": (["knn", "{d}/a.zarr", "{d}/a.zarr", "{d}/held.zarr"], "--overwrite"),
    "unknown scheduler": (["knn", "{d}/a.zarr", "{d}/a.zarr", "{o}", "--scheduler", "mars"], "scheduler 'mars'"),
    "unreachable tcp scheduler": (["knn", "{d}/a.zarr", "{d}/a.zarr", "{o}", "--scheduler", "tcp://127.0.0.1:9"],
                                  "cannot reach the scheduler.*within"),
    "pickle codec": (["knn", "{d}/pickled.zarr", "{d}/a.zarr", "{o}"], "pickle"),
    "object dtype": (["distances", "{d}/a.zarr", "{d}/object.zarr", "{o}"], "object dtype|pickle"),
}


@pytest.fixture(scope="module")
def results(inputs, tmp_path_factory):
    """Every case run once, a few processes at a time (each is mostly interpreter start-up)."""
    from concurrent.futures import ThreadPoolExecutor

    outs = tmp_path_factory.mktemp("bad-input-outputs")
    before = _snapshot(inputs)

    def run(case):
        argv, _ = CASES[case]
        out = outs / f"{case.replace(' ', '-')}.zarr"
        t0 = time.monotonic()
        r = _cli(*[a.format(d=inputs, o=out) for a in argv])
        return case, (r, out, time.monotonic() - t0)

    with ThreadPoolExecutor(4) as pool:
        done = dict(pool.map(run, CASES))
    return done, before


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exit_2_one_line(case, inputs, results):
    import re

    done, before = results
    r, out, elapsed = done[case]
    message = CASES[case][1]
    assert r.returncode == 2, (case, r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pipeline: error: "), (case, r.stderr)
    assert "Traceback" not in r.stderr
    assert re.search(message, lines[0]), (case, lines[0])
    # Nothing written that looks complete; nothing existing damaged.
    if out.exists():
        meta = zarr.open_group(str(out), mode="r").attrs.get("pipeline", {})
        assert not meta.get("complete"), (case, meta)
    assert _snapshot(inputs) == before, case
    if "tcp" in case:
        assert elapsed < 60  # the connection attempt is bounded (10 s) however loaded the machine
