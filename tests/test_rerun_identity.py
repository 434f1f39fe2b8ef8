"""Reruns recognise their inputs by content: new data at the same URL is never "already complete".

Every kind of output goes through one writer (``pipeline.store.ResultWriter``) whose job
fingerprint names each input by the sizes and stamps of its stored files.  For each kind
(distances, k-NN, gmm fit, gmm predict, a job file's dataset step) the same command is run,
an input is written again at the same URL with other data, and the command is run again:
the old output now holds *another* job's result, so the rerun refuses it (exit 2, one
line) instead of reporting it current; with ``--overwrite`` it computes afresh, equal to a
fresh run on the new data.  The same command on unchanged inputs is still recognised as
complete (the other half of the rule).
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
import zarr

import pipeline as pl
from pipeline.cli import main

pytestmark = pytest.mark.timeout(300)
SKIPPED = "already complete"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def refused(capsys, *argv):
    """The rerun on changed inputs: refused, never "already complete"."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2 and SKIPPED not in out, (out, err)
    assert "holds another result" in err and "--overwrite" in err and err.count("\n") == 1, err


def _blobs(url, seed, n=600, d=4):
    return run_quiet(["generate", "blobs", url, "--n-samples", n, "--n-features", d, "--centers", 3,
                      "--seed", seed, "--overwrite"])


def run_quiet(argv):
    assert main([str(a) for a in argv]) == 0


def _array(url, name):
    return zarr.open_group(str(url), mode="r")[name][...]


@pytest.mark.parametrize("command", ["distances", "knn"])
def test_pairwise_outputs_follow_new_training_data(command, tmp_path, capsys):
    q, t, out = tmp_path / "q.zarr", tmp_path / "t.zarr", tmp_path / "out.zarr"
    _blobs(q, 1, n=200)
    _blobs(t, 2)
    capsys.readouterr()
    first = run(capsys, command, q, t, out)
    assert first["status"] == "complete"
    assert run(capsys, command, q, t, out)["status"].startswith(SKIPPED)  # same data: recognised
    name = "D" if command == "distances" else "indices"
    before = _array(out, name)
    _blobs(t, 3)  # the training set written again at the same URL, other data
    capsys.readouterr()
    refused(capsys, command, q, t, out)
    again = run(capsys, command, q, t, out, "--overwrite")
    assert again["status"] == "complete", again
    run(capsys, command, q, t, tmp_path / "fresh.zarr")
    np.testing.assert_array_equal(_array(out, name), _array(tmp_path / "fresh.zarr", name))
    assert not np.array_equal(_array(out, name), before)


def test_a_chunk_rewritten_in_place_is_new_data(tmp_path, capsys):
    # Not through pipeline at all: one chunk of X overwritten with zarr, the group's
    # attributes untouched.  The result must still be recomputed.
    q, t, out = tmp_path / "q.zarr", tmp_path / "t.zarr", tmp_path / "D.zarr"
    _blobs(q, 1, n=100)
    _blobs(t, 2)
    capsys.readouterr()
    run(capsys, "distances", q, t, out)
    X = zarr.open_group(str(t), mode="r+")["X"]
    X[:10] = X[:10] + 1.0
    refused(capsys, "distances", q, t, out)
    again = run(capsys, "distances", q, t, out, "--overwrite")
    assert again["status"] == "complete", again
    want = pl.pairwise_distances(str(q), str(t)).compute()
    np.testing.assert_allclose(_array(out, "D"), want, rtol=1e-5, atol=1e-4)


def test_an_output_inside_its_input_does_not_change_the_input(tmp_path, capsys):
    # Only the input's arrays name it: an output group (and its lock) nested inside the
    # input's store is not its data, so the rerun is still the same job.
    q, t = tmp_path / "q.zarr", tmp_path / "t.zarr"
    _blobs(q, 1, n=100)
    _blobs(t, 2)
    capsys.readouterr()
    assert run(capsys, "distances", q, t, t / "D")["status"] == "complete"
    assert run(capsys, "distances", q, t, t / "D")["status"].startswith(SKIPPED)


def test_gmm_fit_and_predict_follow_new_data(tmp_path, capsys):
    """The issue's reproduction: the model of the old data was kept and reported as current."""
    d, m, p = tmp_path / "d.zarr", tmp_path / "m.zarr", tmp_path / "p.zarr"
    fit = ["gmm", "fit", d, m, "--n-components", 3, "--seed", 0, "--memory-budget", "64MiB"]
    _blobs(d, 1, n=5000)
    capsys.readouterr()
    first = run(capsys, *fit)
    assert first["status"] == "complete"
    assert run(capsys, *fit)["status"].startswith(SKIPPED)
    run(capsys, "gmm", "predict", m, d, p)
    labels_before = _array(p, "labels")
    assert run(capsys, "gmm", "predict", m, d, p)["status"].startswith(SKIPPED)

    _blobs(d, 2, n=5000)
    capsys.readouterr()
    refused(capsys, *fit)
    again = run(capsys, *fit, "--overwrite")
    assert again["status"] == "complete", again
    ref = pl.GaussianMixture(3, random_state=0, memory_budget="64MiB").fit(str(d))
    assert float(again["lower_bound"]) == pytest.approx(ref.lower_bound_, rel=1e-12)
    assert float(again["lower_bound"]) != pytest.approx(float(first["lower_bound"]), rel=1e-6)

    # The predictions: both inputs changed (new data, new model at the same URL).
    refused(capsys, "gmm", "predict", m, d, p)
    again = run(capsys, "gmm", "predict", m, d, p, "--overwrite")
    assert again["status"] == "complete", again
    np.testing.assert_array_equal(_array(p, "labels"), ref.predict(str(d)).compute())
    assert not np.array_equal(_array(p, "labels"), labels_before)


def test_job_dataset_step_follows_a_new_source_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "x.npy"
    np.save(src, rng.standard_normal((300, 5)))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"memory_budget": "64MiB", "steps": [
        {"ingest": {"src": "x.npy", "out": "d.zarr"}},
        {"distances": {"query": "d.zarr", "train": "d.zarr", "out": "D.zarr"}},
    ]}))
    code = main(["run", str(job)])
    out = capsys.readouterr().out
    assert code == 0 and out.count("status: complete") == 2, out
    code = main(["run", str(job)])
    out = capsys.readouterr().out
    assert code == 0 and out.count("skipped: already complete") == 2, out

    new = rng.standard_normal((300, 5))
    np.save(src, new)  # the same path, other data
    code = main(["run", str(job)])
    err = capsys.readouterr().err
    # The dataset is another step's now: refused up front, not skipped.
    assert code == 2 and "steps[0] (ingest): out:" in err and "from other parameters" in err, err
    steps = yaml.safe_load(job.read_text())
    steps["steps"][0]["ingest"]["overwrite"] = True  # the dataset step only
    job.write_text(yaml.safe_dump(steps))
    code = main(["run", str(job)])
    captured = capsys.readouterr()
    # The dataset is written again; the distances step sees its input's new content:
    # its old result is another job's now, refused rather than skipped.
    assert code == 2 and "skipped" not in captured.out, captured
    assert "steps[1] (distances)" in captured.err and "holds another result" in captured.err, captured.err
    steps["steps"][1]["distances"]["overwrite"] = True
    job.write_text(yaml.safe_dump(steps))
    code = main(["run", str(job)])
    out = capsys.readouterr().out
    assert code == 0 and "skipped" not in out and out.count("status: complete") == 2, out
    np.testing.assert_array_equal(_array(tmp_path / "d.zarr", "X"), new)
    want = np.sqrt(((new[:, None, :] - new[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(_array(tmp_path / "D.zarr", "D"), want, rtol=1e-5, atol=1e-5)
