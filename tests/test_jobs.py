"""Job files: `pipeline run JOB.yaml` — checked whole before anything runs, steps in order,
complete outputs skipped, the example job files run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

import pipeline as pl
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.timeout(300)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _meta(url):
    return dict(zarr.open_group(str(url), mode="r").attrs["pipeline"])


def _example(name, tmp_path):
    shutil.copy(EXAMPLES / name, tmp_path / name)
    return tmp_path / name


def test_knn_example_through_the_real_cli_then_every_step_skipped(tmp_path):
    job = _example("knn.yaml", tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run([sys.executable, "-m", "pipeline", "run", job], capture_output=True, text=True,
                           timeout=240, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("status: complete") == 4, first.stdout
    out = tmp_path / "out" / "knn"
    for name in ("train.zarr", "test.zarr", "knn.zarr", "distances.zarr"):
        assert _meta(out / name)["complete"]
    dist, ind = pl.kneighbors(str(out / "test.zarr"), str(out / "train.zarr"), n_neighbors=5)
    np.testing.assert_array_equal(zarr.open_group(str(out / "knn.zarr"), mode="r")["indices"][...], ind)
    D = zarr.open_group(str(out / "distances.zarr"), mode="r")["D"][...]
    np.testing.assert_allclose(D[np.arange(len(ind)), ind[:, 0]], dist[:, 0], rtol=1e-4, atol=1e-2)

    again = subprocess.run([sys.executable, "-m", "pipeline", "run", job], capture_output=True, text=True,
                           timeout=240, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("status: skipped: already complete for the same parameters") == 4, again.stdout


def test_gmm_and_ingest_examples(tmp_path, capsys):
    code, out, err = run(capsys, "run", _example("gmm.yaml", tmp_path))
    assert code == 0, err
    assert out.count("status: complete") == 3 and "n_iter" in out
    labels = zarr.open_group(str(tmp_path / "out" / "gmm" / "labels.zarr"), mode="r")["labels"][...]
    assert labels.shape == (5000,) and len(np.unique(labels)) == 3

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((500, 8), dtype="float32"))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 500))
    code, out, err = run(capsys, "run", _example("ingest.yaml", tmp_path))
    assert code == 0, err
    knn = zarr.open_group(str(tmp_path / "out" / "ingest" / "knn.zarr"), mode="r")
    assert (knn["indices"][:, 0] == np.arange(500)).all()  # each row is its own nearest neighbour


def _write(tmp_path, doc):
    path = tmp_path / "job.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


GOOD = [
    {"generate": {"kind": "blobs", "out": "a.zarr", "n_samples": 200, "n_features": 3, "centers": 2}},
    {"knn": {"query": "a.zarr", "train": "a.zarr", "out": "k.zarr", "k": 3}},
]

BAD = {
    "unknown top-level key": ({"memory_budjet": "1GiB", "steps": GOOD}, r"unknown key 'memory_budjet'"),
    "unknown step": ({"steps": GOOD + [{"kmeans": {}}]}, r"steps\[2\]: unknown step 'kmeans'"),
    "unknown option": ({"steps": GOOD + [{"knn": {"query": "a.zarr", "train": "a.zarr", "out": "k2.zarr",
                                                  "neighbours": 3}}]},
                       r"steps\[2\] \(knn\): unknown key 'neighbours'; knn takes query, train, out, k"),
    "k = 0": ({"steps": [GOOD[0], {"knn": {"query": "a.zarr", "train": "a.zarr", "out": "k.zarr", "k": 0}}]},
              r"steps\[1\] \(knn\): k: 0 must be a whole number >= 1"),
    "bad choice": ({"steps": [GOOD[0], {"distances": {"query": "a.zarr", "train": "a.zarr", "out": "d.zarr",
                                                      "metric": "chebyshev"}}]},
                   r"steps\[1\] \(distances\): metric: 'chebyshev' is not one of euclidean, sqeuclidean, cosine, "
                   r"ip, manhattan"),
    "missing key": ({"steps": [GOOD[0], {"gmm-fit": {"data": "a.zarr"}}]},
                    r"steps\[1\] \(gmm-fit\): missing key 'model'"),
    "input nobody writes": ({"steps": [GOOD[0], {"knn": {"query": "b.zarr", "train": "a.zarr", "out": "k.zarr"}}]},
                            r"steps\[1\] \(knn\): query: '.*b.zarr' does not exist and no earlier step writes it"),
    "input written later": ({"steps": [GOOD[1], GOOD[0]]}, r"steps\[0\] \(knn\): query: .*no earlier step"),
    "model input is a dataset": ({"steps": [GOOD[0], {"gmm-predict": {"model": "a.zarr", "data": "a.zarr",
                                                                      "out": "p.zarr"}}]},
                                 r"steps\[1\] \(gmm-predict\): model: .* is written by steps\[0\] as a dataset, not a gmm"),
    "two steps, one output": ({"steps": GOOD + [{"distances": {"query": "a.zarr", "train": "a.zarr",
                                                               "out": "k.zarr"}}]},
                              r"steps\[2\] \(distances\): out: .* is also written by steps\[1\]"),
    "bad budget": ({"memory_budget": "lots", "steps": GOOD}, r"memory_budget"),
    "unknown scheduler": ({"scheduler": "mars", "steps": GOOD}, r"scheduler: 'mars' is not known"),
    "steps not a list": ({"steps": {"knn": {}}}, r"'steps' must be a non-empty list"),
    "not yaml": ("steps: [knn: {query: a.zarr\n", r"not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_job_file_checked_before_anything_runs(case, tmp_path, capsys):
    doc, message = BAD[case]
    job = _write(tmp_path, doc)
    code, out, err = run(capsys, "run", job)
    assert code == 2, (case, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pipeline: error: {job}"), lines
    import re

    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"], case  # nothing ran


def test_missing_job_file_and_check_only(tmp_path, capsys):
    code, _, err = run(capsys, "run", tmp_path / "nope.yaml")
    assert code == 2 and "does not exist" in err
    job = _write(tmp_path, {"steps": GOOD})
    code, out, err = run(capsys, "run", job, "--check")
    assert code == 0 and "2 step(s) checked" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_existing_outputs_skip_resume_or_refuse(tmp_path, capsys):
    job = _write(tmp_path, {"memory_budget": "64MiB", "steps": GOOD})
    assert run(capsys, "run", job)[0] == 0
    assert _meta(tmp_path / "a.zarr")["job"]  # the generating step's fingerprint

    # Other parameters for an existing dataset: refused before anything runs.
    changed = [{"generate": {**GOOD[0]["generate"], "n_samples": 300}}, GOOD[1]]
    job2 = _write(tmp_path, {"steps": changed})
    before = (tmp_path / "a.zarr" / "zarr.json").stat().st_mtime_ns
    code, _, err = run(capsys, "run", job2)
    assert code == 2 and "steps[0] (generate): out:" in err and "overwrite: true" in err, err
    assert (tmp_path / "a.zarr" / "zarr.json").stat().st_mtime_ns == before
    # With overwrite the dataset is rewritten and the k-NN, whose input changed, is refused
    # at run time unless it may be overwritten too.
    job3 = _write(tmp_path, {"overwrite": True, "steps": changed})
    code, out, err = run(capsys, "run", job3)
    assert code == 0, err
    assert zarr.open_group(str(tmp_path / "k.zarr"), mode="r")["indices"].shape == (300, 3)

    # An interrupted dataset (incomplete) is written again.  The k-NN computed from its
    # previous version is kept: skipped if the new version is the same (same parameters,
    # same second), else another job's result, refused without overwrite.
    g = zarr.open_group(str(tmp_path / "a.zarr"), mode="r+")
    g.attrs["pipeline"] = {**_meta(tmp_path / "a.zarr"), "complete": False}
    knn_before = (tmp_path / "k.zarr" / "zarr.json").stat().st_mtime_ns
    code, out, err = run(capsys, "run", _write(tmp_path, {"steps": changed}))
    assert "interrupted: writing it again" in out
    assert _meta(tmp_path / "a.zarr")["complete"]
    assert code == 0 or (code == 2 and "k.zarr' already exists and holds another result" in err)
    assert (tmp_path / "k.zarr" / "zarr.json").stat().st_mtime_ns == knn_before


def test_a_step_that_fails_while_running_is_named(tmp_path, capsys):
    X = np.random.default_rng(0).standard_normal((50, 3))
    X[7] = np.nan
    pl.write_dataset(tmp_path / "nan.zarr", X)
    job = _write(tmp_path, {"steps": [GOOD[0], {"knn": {"query": "nan.zarr", "train": "a.zarr", "out": "k.zarr"}}]})
    code, out, err = run(capsys, "run", job)
    assert code == 2 and "steps[0]" not in err, err
    assert f"{job}: steps[1] (knn): QUERY has NaN or infinite values" in err and "row(s) 7" in err, err
    assert _meta(tmp_path / "a.zarr")["complete"] and not _meta(tmp_path / "k.zarr")["complete"]


def test_gmm_job_with_parameters_sharded_by_component(tmp_path, capsys):
    """A job whose budget the 40 x 24 x 24 parameters do not fit: fit and predict sharded, rerun skipped."""
    job = tmp_path / "sharded.yaml"
    job.write_text(yaml.safe_dump({"memory_budget": "10MiB", "steps": [
        {"generate": {"kind": "blobs", "out": "blobs.zarr", "n_samples": 3000, "n_features": 24, "centers": 5,
                      "dtype": "float64", "seed": 0}},
        {"gmm-fit": {"data": "blobs.zarr", "model": "model.zarr", "n_components": 40, "max_iter": 3, "tol": 0,
                     "init": "k-means++", "seed": 0}},
        {"gmm-predict": {"model": "model.zarr", "data": "blobs.zarr", "out": "labels.zarr"}}]}))
    code, out, err = run(capsys, "run", job)
    assert code == 0, err
    model = zarr.open_group(str(tmp_path / "model.zarr"), mode="r")
    assert "log_det" in model and _meta(tmp_path / "model.zarr")["n_iter"] == 3  # it was sharded
    # The same model as an unsharded fit of the same job, and its labels.
    ref = pl.mixture.fit_to_store(str(tmp_path / "blobs.zarr"), str(tmp_path / "ref.zarr"), n_components=40,
                                  max_iter=3, tol=0, init_params="k-means++", random_state=0,
                                  memory_budget="512MiB")
    assert ref["n_iter"] == 3
    r = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r")
    np.testing.assert_allclose(model["covariances"][...], r["covariances"][...], rtol=1e-8, atol=1e-10)
    gm = pl.mixture.load_model(str(tmp_path / "ref.zarr"))
    labels = zarr.open_group(str(tmp_path / "labels.zarr"), mode="r")["labels"][...]
    X = zarr.open_group(str(tmp_path / "blobs.zarr"), mode="r")["X"][...]
    assert (labels == gm.predict(X)).mean() > 0.999
    code, out, err = run(capsys, "run", job)
    assert code == 0 and out.count("already complete") == 3, out
