"""Benchmark: the smallest memory budget each operation accepts for a 1-row job, and what it uses.

One command::

    python benchmarks/bench_minima.py              # 3 measured runs per operation
    python benchmarks/bench_minima.py --runs 5 --n-features 64

The job: one row of 64 float32 features as the query set and one as the training set
(``distances``, ``knn --k 1``); one row of 64 float64 features for a one-component
mixture (``gmm fit --max-iter 3``, then ``gmm predict`` with that model).  For each
operation:

* *smallest budget accepted*: the least ``--memory-budget`` (in bytes, found by
  bisection) for which the command runs instead of refusing ("memory budget ... is too
  small ..."); the commands run in this process (``pipeline.cli.main``);
* *measured peak above idle*: a fresh process runs the command at that budget
  (``pipeline.cli.main``, which calls ``pipeline.runtime.limit_malloc()`` as the
  ``pipeline`` command does); its peak resident set (VmHWM) minus the peak of an idle
  fresh process that imported the same modules and ran a tiny GEMM (BLAS loaded).  The
  median and the largest of ``--runs`` pairs are reported.

Results: ``benchmarks/results/minima.json``; the README's table "The smallest budgets"
is this script's output.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "minima.json"
IMPORTS = "import numpy, dask.array, zarr, pipeline, pipeline.cli, pipeline.mixture, pipeline.neighbors"


def _jobs(d, n_features):
    """{operation: argv without --memory-budget}, datasets written under ``d``."""
    import numpy as np

    import pipeline as pl

    rng = np.random.default_rng(0)
    q, t, g = (str(Path(d) / f"{n}.zarr") for n in ("q", "t", "g"))
    pl.write_dataset(q, rng.standard_normal((1, n_features), dtype=np.float32))
    pl.write_dataset(t, rng.standard_normal((1, n_features), dtype=np.float32))
    pl.write_dataset(g, rng.standard_normal((1, n_features)))
    model = str(Path(d) / "model.zarr")
    return {
        "knn": ["knn", q, t, str(Path(d) / "knn.zarr"), "--k", "1"],
        "distances": ["distances", q, t, str(Path(d) / "D.zarr")],
        "gmm fit": ["gmm", "fit", g, model, "--n-components", "1", "--max-iter", "3"],
        "gmm predict": ["gmm", "predict", model, g, str(Path(d) / "labels.zarr")],
    }


def _run_here(argv, budget):
    """Exit status and stderr of the command run in this process at ``budget`` bytes."""
    from pipeline.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main([*argv, "--memory-budget", str(budget), "--overwrite", "--no-progress"])
    return status, err.getvalue()


def smallest_budget(argv, hi=2**30):
    """Least budget in bytes the command accepts (bisection; the plans are monotone in it)."""
    status, err = _run_here(argv, hi)
    if status != 0:
        raise RuntimeError(f"{argv} fails at {hi} bytes: {err}")
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        status, err = _run_here(argv, mid)
        if status == 0:
            hi = mid
        elif "too small" in err:
            lo = mid + 1
        else:
            raise RuntimeError(f"{argv} at {mid} bytes: {err}")
    return lo


def _peak(body):
    """VmHWM in bytes of a fresh Python running the common prelude, then ``body``."""
    src = textwrap.dedent(f"""
        {IMPORTS}
        import pipeline.runtime
        pipeline.runtime.limit_malloc()
        numpy.ones((64, 64)) @ numpy.ones((64, 64))
    """) + textwrap.dedent(body) + textwrap.dedent("""
        with open("/proc/self/status") as f:
            print("PEAK", int([ln for ln in f if ln.startswith("VmHWM:")][0].split()[1]) * 1024)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return int([ln for ln in r.stdout.splitlines() if ln.startswith("PEAK")][-1].split()[1])


def measured_peak(argv, budget):
    """Peak RSS above idle (bytes) of a fresh process running the command at ``budget``."""
    run = f"""
        import sys
        status = pipeline.cli.main({[*argv, "--memory-budget", str(budget), "--overwrite", "--no-progress"]!r})
        assert status == 0, status
    """
    return _peak(run) - _peak("")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n-features", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="dask threads (DASK_NUM_WORKERS)")
    args = ap.parse_args(argv)
    os.environ["DASK_NUM_WORKERS"] = str(args.threads)
    import dask

    dask.config.refresh()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pipeline-minima-") as d:
        jobs = _jobs(d, args.n_features)
        for op, job in jobs.items():
            budget = smallest_budget(job)
            grew = [measured_peak(job, budget) for _ in range(args.runs)]
            rows.append({"operation": op, "smallest_budget": budget, "peak_above_idle_median": statistics.median(grew),
                         "peak_above_idle_max": max(grew), "runs": grew,
                         "command": "pipeline " + " ".join(Path(a).name if a.endswith(".zarr") else a for a in job)
                         + f" --memory-budget {budget}"})
            r = rows[-1]
            print(f"{op:<12} smallest budget {budget / 2**20:7.2f} MiB ({budget} B); peak above idle "
                  f"median {r['peak_above_idle_median'] / 2**20:5.2f} MiB, max {r['peak_above_idle_max'] / 2**20:5.2f} MiB",
                  flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"n_features": args.n_features, "threads": args.threads, "rows": rows}, indent=1))
    print(f"\n| operation | smallest budget accepted | measured peak above idle (median / max of {args.runs}) | command |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['operation']} | {r['smallest_budget'] / 2**20:.2f} MiB | "
              f"{r['peak_above_idle_median'] / 2**20:.2f} / {r['peak_above_idle_max'] / 2**20:.2f} MiB | "
              f"`{r['command']}` |")


if __name__ == "__main__":
    main()
