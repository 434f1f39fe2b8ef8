"""Watching jobs: readable task keys, the scheduler's Prometheus metrics, the dashboard
of `--scheduler local`, progress on a cluster, `--report FILE.html`.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import pipeline as pl
from conftest import ROOT

pytestmark = pytest.mark.timeout(180)

# Keys that dask itself names, allowed in a pipeline graph (all cheap):
_DASK_INTERNAL = {
    "finalize-hlgfinalizecompute",  # dask.compute's final gather of a collection's blocks
    "from-zarr", "original-from-zarr", "original-from-zarr-from-zarr",  # da.from_zarr reads
    "arange",                       # row offsets (da.arange) handed to block functions
    "getitem",                      # a slice or selection of rows (X[idx])
    "shuffle-taker", "shuffle-sorter", "shuffle-split",  # X[unsorted idx]: k-means seeding rows
    "blocks",                       # X.blocks[i] (as blocks-pipeline-…): the chunk that picks a codec
    "sum", "sum-aggregate",         # da.sum of a pipeline stage's per-row output (GMM score total)
    "dict",                         # a dict argument of a delayed call, packed by dask
}


def _named(prefix):
    """A pipeline stage, a dask internal, or a dask internal applied to a pipeline stage."""
    return (prefix.startswith("pipeline-") or prefix in _DASK_INTERNAL
            or any(prefix.startswith(f"{i}-pipeline-") for i in _DASK_INTERNAL))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("monitor")
    pl.make_cifar_like(str(d / "train.zarr"), 2000, n_features=768, random_state=1, chunk_rows=250)
    pl.make_cifar_like(str(d / "test.zarr"), 200, n_features=768, random_state=2, chunk_rows=100)
    pl.make_blobs(str(d / "blobs.zarr"), 3000, 4, centers=3, dtype="float64", random_state=0, chunk_rows=500)
    return d


class _Keys:
    """Record every key of every graph run on the threaded scheduler."""

    def __enter__(self):
        from dask.callbacks import Callback
        from dask.utils import key_split

        self.prefixes = collections.Counter()

        def start(dsk):
            self.prefixes.update(key_split(k) for k in dsk)

        self._cb = Callback(start=start)
        self._cb.__enter__()
        return self

    def __exit__(self, *exc):
        self._cb.__exit__(*exc)


def _ops(d, tmp):
    from pipeline.distances import write_distances
    from pipeline.mixture import fit_to_store, predict_to_store
    from pipeline.neighbors import write_knn

    return {
        "generate": (lambda: (pl.make_blobs(str(tmp / "g.zarr"), 1200, 4, chunk_rows=400),
                              pl.make_cifar_like(str(tmp / "c.zarr"), 300, n_features=32, chunk_rows=100)),
                     {"pipeline-generate-X", "pipeline-generate-y"}),
        "distances": (lambda: (write_distances(str(d / "test.zarr"), str(d / "train.zarr"), str(tmp / "d.zarr"),
                                               memory_budget="64MiB"),
                               pl.pairwise_distances(str(d / "test.zarr"), str(d / "train.zarr"),
                                                     memory_budget="64MiB").sum().compute()),
                      {"pipeline-distances-block"}),
        "knn": (lambda: (write_knn(str(d / "test.zarr"), str(d / "train.zarr"), str(tmp / "k.zarr"),
                                   memory_budget="64MiB"),
                         pl.kneighbors(str(d / "test.zarr"), str(d / "train.zarr"), memory_budget="64MiB")),
                {"pipeline-knn-topk", "pipeline-knn-merge"}),
        "gmm": (lambda: (fit_to_store(str(d / "blobs.zarr"), str(tmp / "m.zarr"), n_components=3, max_iter=3,
                                      memory_budget="64MiB"),
                         predict_to_store(str(tmp / "m.zarr"), str(d / "blobs.zarr"), str(tmp / "p.zarr"),
                                          memory_budget="64MiB")),
                {"pipeline-em-chunk", "pipeline-em"}),
    }


@pytest.mark.parametrize("op", ["generate", "distances", "knn", "gmm"])
def test_every_task_key_is_a_pipeline_stage_or_a_named_dask_internal(op, data, tmp_path):
    run, stages = _ops(data, tmp_path)[op]
    with _Keys() as keys:
        run()
    assert keys.prefixes, "nothing ran on the threaded scheduler"
    foreign = {p for p in keys.prefixes if not _named(p)}
    assert not foreign, f"task keys without a pipeline-<op>-<stage> prefix: {sorted(foreign)}"
    # The heavy stages are there, by name (possibly fused with their neighbours' names:
    # dask fuses a block task into its consumer and joins the names).
    for stage in stages:
        assert any(stage in p for p in keys.prefixes), (stage, sorted(keys.prefixes))


# ------------------------------------------------------------------ real scheduler

_METRIC = re.compile(r'^dask_scheduler_prefix_state_totals(?:_total)?\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def _scrape(port, timeout=60):
    """{task prefix: total tasks in any state} from the scheduler's Prometheus /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    totals = collections.Counter()
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            totals[labels["task_prefix_name"]] += float(m["value"])
    return text, totals


def _knn_totals(totals):
    return sum(v for k, v in totals.items() if k.startswith("pipeline-knn-"))


def test_prometheus_metrics_show_pipeline_task_prefixes_during_a_run(data, tmp_path, dask_cluster):
    from pipeline.cli import main

    port = dask_cluster.dashboard_port
    assert port, "the test scheduler has no dashboard"
    text, before = _scrape(port)
    assert "dask_scheduler_workers" in text  # prometheus_client is installed: metrics are served
    result = {}
    job = threading.Thread(target=lambda: result.setdefault("rc", main(
        ["knn", str(data / "test.zarr"), str(data / "train.zarr"), str(tmp_path / "k.zarr"),
         "--memory-budget", "64MiB", "--scheduler", dask_cluster.address, "--no-progress"])))
    job.start()
    during = []
    while job.is_alive():
        try:
            _, totals = _scrape(port, timeout=10)
        except (TimeoutError, urllib.error.URLError):  # a loaded machine: try again
            continue
        during.append(_knn_totals(totals))
        time.sleep(0.02)
    job.join()
    assert result["rc"] == 0
    _, after = _scrape(port)
    assert _knn_totals(after) > _knn_totals(before)
    # Seen while the job was still running, not only afterwards.
    assert any(n > _knn_totals(before) for n in during), (during, _knn_totals(before))
    seen = {k for k in after if k.startswith("pipeline-")}
    assert any("pipeline-knn-topk" in k for k in seen) and any("pipeline-knn-merge" in k for k in seen), sorted(seen)


def test_report_is_written_and_names_pipeline_tasks(data, tmp_path, dask_cluster):
    from pipeline.cli import main

    report = tmp_path / "report.html"
    assert main(["knn", str(data / "test.zarr"), str(data / "train.zarr"), str(tmp_path / "k.zarr"),
                 "--memory-budget", "64MiB", "--scheduler", dask_cluster.address, "--no-progress",
                 "--report", str(report)]) == 0
    html = report.read_text()
    assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html[:2000]
    assert "Dask Performance Report" in html
    assert "pipeline-knn-topk" in html


def test_report_needs_a_distributed_scheduler(data, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["knn", str(data / "test.zarr"), str(data / "train.zarr"), str(tmp_path / "k.zarr"),
                 "--report", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scheduler local" in err[0]
    assert not (tmp_path / "r.html").exists()


def test_progress_on_a_cluster_goes_to_stderr(data, tmp_path, dask_cluster, capfd):
    from pipeline.cli import main

    assert main(["knn", str(data / "test.zarr"), str(data / "train.zarr"), str(tmp_path / "k.zarr"),
                 "--memory-budget", "64MiB", "--scheduler", dask_cluster.address, "--progress"]) == 0
    out, err = capfd.readouterr()
    assert "100% Completed" in err and "[#" in err, err[-500:]
    assert "Completed" not in out


def test_local_scheduler_prints_the_dashboard_and_keeps_it_up_while_the_job_runs(tmp_path):
    src = tmp_path / "blobs.zarr"
    pl.make_blobs(str(src), 4000, 4, centers=3, dtype="float64", random_state=0, chunk_rows=1000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "gmm", "fit", str(src), str(tmp_path / "m.zarr"),
         "--n-components", "3", "--max-iter", "4", "--tol", "0", "--init", "random", "--memory-budget", "128MiB",
         "--scheduler", "local", "--workers", "2", "--threads-per-worker", "1", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"dashboard: (http://127\.0\.0\.1:(\d+))/status\n", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        base, port = m[1], int(m[2])
        statuses, seen, polls = [], set(), 0
        while proc.poll() is None:
            try:
                if polls % 10 == 0:
                    with urllib.request.urlopen(base + "/status", timeout=30) as r:
                        statuses.append(r.status)
                _, totals = _scrape(port, timeout=30)
                seen |= {k for k in totals if k.startswith("pipeline-")}
            except urllib.error.URLError as e:
                if isinstance(e.reason, ConnectionRefusedError):
                    break  # the cluster is closing, which it does only once the job is done
                if not isinstance(e.reason, TimeoutError):
                    raise
            except (TimeoutError, ConnectionResetError):
                pass  # a loaded machine: try again
            polls += 1
            time.sleep(0.05)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "status: complete" in out and "n_iter: 4" in out, out
        assert statuses and set(statuses) == {200}
        # Scraped while EM tasks had been submitted: the dashboard was up during the job.
        assert any(k.startswith("pipeline-em") for k in seen), sorted(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
