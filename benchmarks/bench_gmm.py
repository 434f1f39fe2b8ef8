"""Benchmark: full-covariance Gaussian-mixture EM, pipeline against scikit-learn.

One command::

    python benchmarks/bench_gmm.py                  # G1 (200000 x 64, 10 iterations) and G2 (1,000,000 x 64, 3), K=16
    python benchmarks/bench_gmm.py --case g1 --runs 3
    python benchmarks/bench_gmm.py --case users     # 1,000,000 x 900 on disk, K=2, one iteration, 2 GiB

Protocol (MEASURING.md): every run is a fresh process, end to end from the Zarr dataset
on disk (imports and reading included), both tools start from the same initial
parameters (``weights_init``, ``means_init``, ``precisions_init``) and run 10 EM
iterations (``tol=0``); one warm-up round (one iteration each), then the median of ``--runs`` rounds with
the tools alternating.  Per-iteration time is the fit's wall time over the iterations
(scikit-learn's fit also runs one final E-step; ours does not need it).  Peak memory is
the child's ``ru_maxrss`` (``os.wait4``) minus that of an idle child that imported the
same modules.  GFLOP/s count the dense GEMM work of an iteration, 4 n K d^2 (the E-step
products ``X P_k`` and the M-step scatter, each 2 n d^2 per component), against a
float64 GEMM peak measured in the same run.  Both tools are credited with that dense
work (scikit-learn's): pipeline does less (its scatter is a syrk, n d^2 per component,
and it skips the products whose responsibility is exactly zero), so its figure is an
effective rate and can exceed the peak.  Results: ``benchmarks/results/gmm-<case>.json``
and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CASES = {
    # pipeline-trim: the same API call in a process that opted in to
    # pipeline.runtime.limit_malloc(), as the `pipeline` command's process does.
    "g1": dict(n=200_000, d=64, K=16, iters=10, tools=["pipeline", "pipeline-trim", "sklearn"], budget="1GiB"),
    # Memory flat in n; scikit-learn takes ~36 s an iteration here: one timed run.
    "g2": dict(n=1_000_000, d=64, K=16, iters=3, tools=["pipeline", "sklearn"], budget="1GiB",
               sklearn_rounds=[1]),
    # The users' scale: one fused E+M pass (em_step + M-step) over 7.2 GB on disk.
    "users": dict(n=1_000_000, d=900, K=2, iters=1, tools=["pipeline-step"], budget="2GiB",
                  **{"pipeline-step_rounds": [1]}),
}

IMPORTS = {
    "pipeline": "import numpy, dask.array, zarr, pipeline, pipeline.mixture",
    "pipeline-trim": "import numpy, dask.array, zarr, pipeline, pipeline.mixture, pipeline.runtime\n"
                     "pipeline.runtime.limit_malloc()",
    "sklearn": "import numpy, zarr, sklearn.mixture",
    "pipeline-step": "import numpy, dask.array, zarr, pipeline, pipeline.mixture",
}


def _code(tool, paths, case, iters):
    start = f"""
        st = numpy.load({paths['start']!r})
        init = dict(weights_init=st["weights"], means_init=st["means"], precisions_init=st["precisions"])
    """
    start = textwrap.dedent(start)
    if tool in ("pipeline", "pipeline-trim"):
        return start + textwrap.dedent(f"""
            import time, warnings
            gm = pipeline.GaussianMixture({case['K']}, max_iter={iters}, tol=0.0,
                                          memory_budget={case['budget']!r}, **init)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm.fit({paths['zarr']!r})
            fit = time.perf_counter() - t
            print("RESULT", json.dumps({{"fit": fit, "n_iter": gm.n_iter_, "lower_bound": gm.lower_bound_,
                                        "rows": gm.plan_["rows"], "predicted_peak": gm.plan_.peak}}))
        """)
    if tool == "pipeline-step":
        return start + textwrap.dedent(f"""
            import time
            from pipeline.kernels import gaussian as g
            ds = pipeline.open_dataset({paths['zarr']!r})
            P = g.precision_cholesky_from_precisions(init["precisions_init"])
            plan = pipeline.plan("gmm", n_samples=ds.n_samples, n_features=ds.n_features,
                                 n_components={case['K']}, itemsize=8, memory_budget={case['budget']!r})
            t = time.perf_counter()
            stats = pipeline.em_step(ds.X, init["weights_init"], init["means_init"], P, plan=plan)
            w, m, c = g.params_from_stats(stats, init["means_init"], 1e-6)
            g.compute_precision_cholesky(c)
            fit = time.perf_counter() - t
            print("RESULT", json.dumps({{"fit": fit, "n_iter": 1, "lower_bound": g.mean_log_likelihood(stats),
                                        "rows": plan["rows"], "predicted_peak": plan.peak,
                                        "plan": plan.explain()}}))
        """)
    if tool == "sklearn":
        return start + textwrap.dedent(f"""
            import time, warnings
            X = zarr.open_group({paths['zarr']!r}, mode="r")["X"][...]
            gm = sklearn.mixture.GaussianMixture({case['K']}, max_iter={iters}, tol=0.0, **init)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm.fit(X)
            fit = time.perf_counter() - t
            print("RESULT", json.dumps({{"fit": fit, "n_iter": gm.n_iter_, "lower_bound": gm.lower_bound_}}))
        """)
    raise KeyError(tool)


def _run(code, imports):
    """Run code in a fresh Python; return (wall seconds, peak RSS bytes, stdout)."""
    src = "import json\n" + imports + "\n" + textwrap.dedent(code)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", src], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    # communicate() reaped the child; its peak is in RUSAGE_CHILDREN only as a maximum
    # over all children, so the child reports its own peak instead.
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({p.returncode}):\n{err.decode()[-3000:]}")
    text = out.decode()
    peak = int([ln for ln in text.splitlines() if ln.startswith("PEAK")][-1].split()[1])
    return wall, peak, text


_PEAK = "\nimport resource\nprint('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"


def _measure(code, imports):
    return _run(textwrap.dedent(code) + _PEAK, imports)


def _gemm_peak():
    code = """
        import numpy, time
        a = numpy.random.default_rng(0).random((4096, 4096))
        a @ a
        ts = []
        for _ in range(3):
            t = time.perf_counter(); a @ a; ts.append(time.perf_counter() - t)
        print("GEMM", 2 * 4096**3 / sorted(ts)[1] / 1e9)
    """
    out = _measure(code, "")[2]
    return float([ln for ln in out.splitlines() if ln.startswith("GEMM")][-1].split()[1])


def _make_data(case, directory):
    """Blobs (K centres) written chunk-wise to Zarr, and the shared start."""
    import pipeline as pl

    paths = {"zarr": str(directory / f"gmm-{case['n']}x{case['d']}.zarr"),
             "start": str(directory / f"gmm-{case['n']}x{case['d']}-start.npz")}
    if not os.path.exists(paths["zarr"]):
        # 8 MiB Zarr chunks: many blocks for the threads, no block holds the dataset.
        pl.make_blobs(paths["zarr"], case["n"], case["d"], centers=case["K"], dtype="float64",
                      random_state=0, chunk_rows=max(1024, 2**23 // (8 * case["d"])),
                      memory_budget="1GiB")
    import zarr

    z = zarr.open_group(paths["zarr"], mode="r")["X"]
    rng = np.random.RandomState(0)
    rows = z[: min(case["n"], 20000)]
    # The same start for both tools: K data rows as means, isotropic precisions at the
    # data's overall scale, uniform weights.
    means = rows[rng.choice(len(rows), case["K"], replace=False)]
    var = rows.var(axis=0).mean()
    precisions = np.repeat((np.eye(case["d"]) / var)[None], case["K"], axis=0)
    np.savez(paths["start"], weights=np.full(case["K"], 1.0 / case["K"]), means=means,
             precisions=precisions)
    return paths


def _bench(name, case, runs, directory, gemm):
    paths = _make_data(case, directory)
    idle = {tool: _measure("", IMPORTS[tool])[1] for tool in case["tools"]}
    rows = {tool: [] for tool in case["tools"]}
    for rnd in range(runs + 1):  # round 0 is the warm-up
        for tool in case["tools"]:
            # The warm-up (page cache, imports, BLAS) runs one iteration.
            iters = 1 if rnd == 0 else case.get(f"{tool}_iters", case["iters"])
            if rnd not in case.get(f"{tool}_rounds", range(runs + 1)):
                continue
            wall, peak, out = _measure(_code(tool, paths, case, iters), IMPORTS[tool])
            res = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT")][-1][7:])
            res.update(wall=wall, peak_above_idle=peak - idle[tool], per_iter=res["fit"] / iters)
            label = "warm-up" if rnd == 0 else f"run {rnd}"
            print(f"  {name} {tool:<9} {label:<8} wall {wall:7.2f} s  fit {res['fit']:7.2f} s  "
                  f"per-iter {res['per_iter']:6.3f} s  +{(peak - idle[tool]) / 2**20:7.0f} MiB  "
                  f"lb {res['lower_bound']:.12g}", flush=True)
            if rnd > 0:
                rows[tool].append(res)
    flops = 4 * case["n"] * case["K"] * case["d"] ** 2
    summary = {}
    for tool, rs in rows.items():
        per_iter = statistics.median(r["per_iter"] for r in rs)
        summary[tool] = {
            "per_iter_s": per_iter,
            "wall_s": statistics.median(r["wall"] for r in rs),
            "peak_above_idle_MiB": statistics.median(r["peak_above_idle"] for r in rs) / 2**20,
            "gflops": flops / per_iter / 1e9,
            "fraction_of_gemm_peak": flops / per_iter / 1e9 / gemm,
            "lower_bound": rs[-1]["lower_bound"],
            "n_iter": rs[-1]["n_iter"],
            "runs": rs,
        }
    if "sklearn" in summary and case.get("sklearn_iters", case["iters"]) == case["iters"]:
        a, b = summary["pipeline"]["lower_bound"], summary["sklearn"]["lower_bound"]
        summary["lower_bound_rel_diff"] = abs(a - b) / abs(b)
    if name == "users":
        from pipeline.budget import plan as _plan_fn
        from pipeline.errors import BudgetError

        try:
            summary["plan_2M_10000_200"] = _plan_fn("gmm", n_samples=2_000_000, n_features=10_000,
                                                    n_components=200, itemsize=8, memory_budget="20GiB",
                                                    threads=2).explain()
        except BudgetError as e:
            summary["plan_2M_10000_200"] = str(e)
        print(summary["plan_2M_10000_200"])
        print(rows["pipeline-step"][-1].get("plan", ""))
    if "sklearn" in summary:
        summary["time_ratio"] = summary["pipeline"]["per_iter_s"] / summary["sklearn"]["per_iter_s"]
        if "pipeline-trim" in summary:
            summary["time_ratio_trim"] = summary["pipeline-trim"]["per_iter_s"] / summary["sklearn"]["per_iter_s"]
    return summary


def _table(results, gemm):
    lines = [f"float64 GEMM peak measured in this run: {gemm:.1f} GFLOP/s", "",
             "| case | tool | per iteration | wall (end to end) | peak RSS above idle | GFLOP/s (dense-equivalent) | % of GEMM peak | ratio | lower bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        for tool in ("pipeline", "pipeline-trim", "pipeline-step", "sklearn"):
            if tool not in s:
                continue
            t = s[tool]
            key = {"pipeline": "time_ratio", "pipeline-trim": "time_ratio_trim"}.get(tool)
            ratio = f"{s[key]:.3f}x" if key in s else ""
            lines.append(f"| {name} | {tool} | {t['per_iter_s']:.3f} s | {t['wall_s']:.1f} s | "
                         f"{t['peak_above_idle_MiB']:.0f} MiB | {t['gflops']:.1f} | "
                         f"{100 * t['fraction_of_gemm_peak']:.0f}% | {ratio} | {t['lower_bound']:.12g} |")
        if "lower_bound_rel_diff" in s:
            lines.append(f"| {name} | lower bounds agree to | {s['lower_bound_rel_diff']:.1e} relative | | | | | | |")
    return "\n".join(lines)


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[bench]): no PNG")
        return
    names = [n for n in results if n != "users"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(names))
    for i, tool in enumerate(("pipeline", "sklearn")):
        t = [results[n][tool]["per_iter_s"] if tool in results[n] else 0 for n in names]
        m = [results[n][tool]["peak_above_idle_MiB"] if tool in results[n] else 0 for n in names]
        ax1.bar(x + 0.4 * i, t, 0.4, label=tool)
        ax2.bar(x + 0.4 * i, m, 0.4, label=tool)
    labels = [f"{results[n]['shape']}" for n in names]
    for ax, title in ((ax1, "seconds per EM iteration (median)"), (ax2, "peak RSS above idle (MiB)")):
        ax.set_xticks(x + 0.2)
        ax.set_xticklabels(labels)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("Full-covariance GMM, K=16, same start, from disk (G1: 10 iterations, G2: 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["all", *CASES], default="all")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the datasets go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the datasets")
    a = ap.parse_args(argv)
    directory = Path(a.dir or os.environ.get("TMPDIR", "/tmp")) / "pipeline-bench-gmm"
    directory.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    gemm = _gemm_peak()
    print(f"float64 GEMM peak: {gemm:.1f} GFLOP/s", flush=True)
    names = ["g1", "g2"] if a.case == "all" else [a.case]
    results = {}
    try:
        for name in names:
            case = CASES[name]
            runs = 1 if name == "users" else a.runs
            results[name] = _bench(name, case, runs, directory, gemm)
            results[name]["shape"] = f"{case['n']}x{case['d']}, K={case['K']}"
    finally:
        if not a.keep:
            shutil.rmtree(directory, ignore_errors=True)
    text = _table(results, gemm)
    print()
    print(text)
    tag = "-".join(names)
    out = {"gemm_peak_gflops": gemm, "results": results, "table": text,
           "machine": {"cores": os.cpu_count()}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (RESULTS / f"gmm-{tag}.json").write_text(json.dumps(out, indent=1, default=float))
    if any(n != "users" for n in names):
        _plot(results, RESULTS / f"gmm-{tag}.png")
    print(f"\nsaved {RESULTS / f'gmm-{tag}.json'}")


if __name__ == "__main__":
    main()
