"""Benchmark: labelling data with a fitted Gaussian mixture, pipeline against scikit-learn.

One command::

    python benchmarks/bench_gmm_predict.py            # G1: 200000 x 64, K=16, median of 3
    python benchmarks/bench_gmm_predict.py --runs 5

The G1 dataset and start of ``bench_gmm.py``; the model is fitted once (10 EM
iterations) and shared by every tool.  Each run is a fresh process; the timed part is
``predict`` from the Zarr store on disk (scikit-learn's includes loading X into memory,
which it needs).  Tools: pipeline (pruned log-densities, the default), pipeline with
the dense E-step (the kernel's ``prune=False``: what pruning saves), scikit-learn in
memory.  One warm-up round, then the median of ``--runs`` rounds with the tools
alternating; the labels of every tool are checked equal.  Peak memory as in
``bench_gmm.py``.  Results: ``benchmarks/results/gmm-predict.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gmm import CASES, RESULTS, _make_data, _measure  # noqa: E402

IMPORTS = {
    "pipeline": "import numpy, dask.array, zarr, pipeline, pipeline.mixture",
    "pipeline-dense": "import numpy, dask.array, zarr, pipeline, pipeline.mixture",
    "sklearn": "import numpy, zarr, sklearn.mixture",
}


def _code(tool, paths):
    load = f"""
        m = numpy.load({paths['model']!r})
    """
    if tool.startswith("pipeline"):
        dense = ""
        if tool == "pipeline-dense":
            # Benchmark-only switch: the kernel without the pruning bounds.
            dense = """
        from pipeline.kernels import gaussian as g
        pipeline.mixture._wlp_block = lambda block, prepared: g.weighted_log_prob(block, prepared)
            """
        return load + dense + f"""
        import time
        gm = pipeline.GaussianMixture(len(m["weights"]), memory_budget="1GiB")
        gm.weights_, gm.means_, gm.covariances_ = m["weights"], m["means"], m["covariances"]
        gm.precisions_cholesky_ = m["precisions_cholesky"]
        t = time.perf_counter()
        labels = gm.predict({paths['zarr']!r}).compute()
        took = time.perf_counter() - t
        numpy.save({paths['labels']!r} + "-" + {tool!r} + ".npy", labels)
        print("RESULT", json.dumps({{"predict": took}}))
        """
    if tool == "sklearn":
        return load + f"""
        import time
        gm = sklearn.mixture.GaussianMixture(len(m["weights"]))
        gm._set_parameters((m["weights"], m["means"], m["covariances"], m["precisions_cholesky"]))
        gm.n_features_in_ = m["means"].shape[1]
        t = time.perf_counter()
        X = zarr.open_group({paths['zarr']!r}, mode="r")["X"][:]
        labels = gm.predict(X)
        took = time.perf_counter() - t
        numpy.save({paths['labels']!r} + "-sklearn.npy", labels)
        print("RESULT", json.dumps({{"predict": took}}))
        """
    raise KeyError(tool)


def _fit_model(paths):
    """The shared model: 10 EM iterations of pipeline from bench_gmm's start."""
    import warnings

    import pipeline as pl

    st = np.load(paths["start"])
    gm = pl.GaussianMixture(len(st["weights"]), max_iter=10, tol=0.0, memory_budget="1GiB",
                            weights_init=st["weights"], means_init=st["means"],
                            precisions_init=st["precisions"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(paths["zarr"])
    np.savez(paths["model"], weights=gm.weights_, means=gm.means_, covariances=gm.covariances_,
             precisions_cholesky=gm.precisions_cholesky_)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the dataset goes (default: a temporary directory)")
    a = ap.parse_args(argv)
    case = CASES["g1"]
    directory = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="pipeline-bench-predict-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        paths = _make_data(case, directory)
        paths.update(model=str(directory / "model.npz"), labels=str(directory / "labels"))
        _fit_model(paths)
        tools = ["pipeline", "pipeline-dense", "sklearn"]
        idle = {tool: _measure("", IMPORTS[tool])[1] for tool in tools}
        runs = {tool: [] for tool in tools}
        for r in range(a.runs + 1):
            for tool in tools:
                wall, peak, out = _measure(_code(tool, paths), IMPORTS[tool])
                res = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT")][-1][7:])
                tag = "warm-up" if r == 0 else f"run {r}"
                print(f"  {tool:15s} {tag:8s} predict {res['predict']:7.3f} s  wall {wall:6.2f} s  "
                      f"+{(peak - idle[tool]) / 2**20:6.0f} MiB", flush=True)
                if r:
                    runs[tool].append({"predict": res["predict"], "wall": wall,
                                       "peak_above_idle": peak - idle[tool]})
        labels = {tool: np.load(f"{paths['labels']}-{tool}.npy") for tool in tools}
        same = all(np.array_equal(labels["sklearn"], labels[t]) for t in tools)
        summary = {}
        for tool in tools:
            rs = runs[tool]
            summary[tool] = {"predict_s": statistics.median(x["predict"] for x in rs),
                             "wall_s": statistics.median(x["wall"] for x in rs),
                             "peak_above_idle_MiB": statistics.median(x["peak_above_idle"] for x in rs) / 2**20,
                             "runs": rs}
        ref = summary["sklearn"]["predict_s"]
        lines = ["| tool | predict (median) | vs scikit-learn | wall (end to end) | peak RSS above idle |",
                 "|---|---|---|---|---|"]
        for tool in tools:
            t = summary[tool]
            lines.append(f"| {tool} | {t['predict_s']:.3f} s | {t['predict_s'] / ref:.2f}x | "
                         f"{t['wall_s']:.1f} s | {t['peak_above_idle_MiB']:.0f} MiB |")
        lines.append(f"\nlabels identical across tools: {same}")
        text = "\n".join(lines)
        print("\n" + text)
        out = {"case": "g1", "shape": f"{case['n']}x{case['d']}, K={case['K']}", "results": summary,
               "labels_identical": same, "table": text,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "gmm-predict.json").write_text(json.dumps(out, indent=1, default=float))
        print(f"saved {RESULTS / 'gmm-predict.json'}")
        return 0 if same else 1
    finally:
        if not a.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
