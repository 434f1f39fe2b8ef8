"""Benchmark: Gaussian-mixture EM (all four covariance types), pipeline against scikit-learn.

One command::

    python benchmarks/bench_gmm.py                  # G1 (200000 x 64, 10 iterations) and G2 (1,000,000 x 64, 3), K=16, full
    python benchmarks/bench_gmm.py --case g1 --runs 3
    python benchmarks/bench_gmm.py --case g1 --covariance-type all    # full, tied, diag, spherical in turn
    python benchmarks/bench_gmm.py --case g1-e2e    # G1 as a user runs it: default (k-means) init, whole processes
    python benchmarks/bench_gmm.py --case users     # 1,000,000 x 900 on disk, K=2, one iteration, 2 GiB
    python benchmarks/bench_gmm.py --case users-diag   # 2,000,000 x 1000 f32 on disk, K=200 diag, 3 iterations, 2 GiB

Smoke tests (tiny, not figures): ``--n 20000`` shrinks g1/g2/g1-e2e, ``--users-rows 20000``
shrinks users-diag, ``--gemm-size 1024`` the peak's GEMM, ``--results DIR`` keeps their
JSON out of ``benchmarks/results/`` (and an overridden size adds ``-smoke`` to the name).

Protocol (MEASURING.md): every run is a fresh process, end to end from the Zarr dataset
on disk (imports and reading included), both tools start from the same initial
parameters (``weights_init``, ``means_init``, ``precisions_init``) and run 10 EM
iterations (``tol=0``); one warm-up round (one iteration each), then the median of ``--runs`` rounds with
the tools alternating.  Per-iteration time is the fit's wall time over the iterations
(scikit-learn's fit also runs one final E-step; ours does not need it; ours also
checks X for non-finite values in one extra pass, scikit-learn's check_array in memory).
Peak memory is
the child's own peak resident set (VmHWM from ``/proc/self/status``: its ``ru_maxrss``
would start from this parent's peak, which generated the datasets) minus that of an idle
child that imported the same modules.  GFLOP/s count the dense GEMM work of an iteration, 4 n K d^2 (the E-step
products ``X P_k`` and the M-step scatter, each 2 n d^2 per component), against a
float64 GEMM peak measured in the same run.  Both tools are credited with that dense
work (scikit-learn's): pipeline does less (its scatter is a syrk, n d^2 per component,
and it skips the products whose responsibility is exactly zero), so its figure is an
effective rate and can exceed the peak.  Results: ``benchmarks/results/gmm-<case>.json``
and ``.png``.

Covariance types (``--covariance-type``, cases g1 and g2): the same start for both tools
in the type's shape — K data rows as means, uniform weights, isotropic precisions
``1 / var`` at the data's overall scale (``eye/var`` (K, d, d) full, (d, d) tied,
(K, d) diag, (K,) spherical).  Only full gets a GFLOP/s figure: tied, diag and spherical
are not dominated by one GEMM count at d=64, K=16, so their rows give instead the
effective rate of reading X, ``n d itemsize`` bytes over the per-iteration time
("X GB/s": what an iteration would have to stream from memory or disk, not a measured
bandwidth; for scikit-learn X is already in memory).  Full's results keep the case name
(``g1``); the others are ``g1-tied``, ``g1-diag``, ``g1-spherical``.  pipeline-trim runs
for full only, and G2's single scikit-learn run (no warm-up) too: the other types are
cheap enough for the full protocol.

g1-e2e: G1's dataset and shape, as a user runs it: a fresh process that imports
pipeline and fits ``GaussianMixture(16, max_iter=10, tol=0, memory_budget="1GiB",
random_state=0)`` from the Zarr path with its default (k-means) init, against a fresh
process that imports scikit-learn, loads X from the same store and fits
``GaussianMixture(16, max_iter=10, tol=0, random_state=0)`` (defaults, k-means init).
The figure is each whole process's wall time (interpreter start, imports, reading,
init, 10 iterations); the ratio is of those.  The two k-means inits are independent
implementations, so the lower bounds are shown, not held to agree (on these
well-separated blobs they usually reach the same one).  Warm-up: one round at max_iter=1.

users-diag: 2,000,000 x 1000 float32 blobs (200 centres uniform in [-10, 10]^d,
unit spread: well separated) generated chunk by chunk to Zarr; K=200 diag, 3
iterations from a shared start (as above, but each mean a row of its own blob, by the
stored labels: from K random rows, blobs holding two means hand one of them all their
rows within two iterations in 1000 dimensions, and scikit-learn's float32 variances of
the emptied components cancel below zero, scikit-learn#30382; the diag iteration's work
does not depend on the start), memory_budget="2GiB"; peak RSS above idle
held against the budget.  GFLOP/s count 8 n d K per iteration (two GEMMs of
n x 2d x K: the E-step ``[X - c, (X - c)^2] A`` and the M-step ``R^T Z``; scikit-learn's
diag iteration does the same dense work in four n x d x K products), against the
4096^3 float64 GEMM peak and against float64 GEMM at the kernel's own shapes
((slice x 2d)(2d x K) and (K x slice)(slice x 2d), slice = ``slice_rows(d)``), both
measured in the same run.  The pipeline row also gives the EM iterations alone (from
``verbose``, without the finite check pass).  Peer: scikit-learn
``GaussianMixture(200, covariance_type="diag", max_iter=3, tol=0)`` from the same start
on the first n/10 rows in memory (float32 as stored; scikit-learn keeps float32), its
per-iteration time x (n / its rows) as the projected figure; the ratio is pipeline
over that projection (scikit-learn's iteration is linear in n).  ``--users-rows`` scales
the case down; scikit-learn then keeps at least 20 rows a component (its float32 diag
variances of one- or two-row components cancel below zero, scikit-learn#30382), and
the projection factor is n over its actual rows.  Its lower bound is of
other data and is not compared.  One timed run after a one-iteration warm-up (as users).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
TYPED = ("g1", "g2")  # the cases --covariance-type applies to

CASES = {
    # pipeline-trim: the same API call in a process that opted in to
    # pipeline.runtime.limit_malloc(), as the `pipeline` command's process does.
    "g1": dict(n=200_000, d=64, K=16, iters=10, tools=["pipeline", "pipeline-trim", "sklearn"], budget="1GiB"),
    # Memory flat in n; scikit-learn takes ~36 s an iteration here: one timed run.
    "g2": dict(n=1_000_000, d=64, K=16, iters=3, tools=["pipeline", "sklearn"], budget="1GiB",
               sklearn_rounds=[1]),
    # G1 as a user runs it: default init, the whole process timed.
    "g1-e2e": dict(n=200_000, d=64, K=16, iters=10, tools=["pipeline-e2e", "sklearn-e2e"], budget="1GiB",
                   e2e=True),
    # The users' scale: one fused E+M pass (em_step + M-step) over 7.2 GB on disk.
    "users": dict(n=1_000_000, d=900, K=2, iters=1, tools=["pipeline-step"], budget="2GiB",
                  **{"pipeline-step_rounds": [1]}),
    # 8 GB of float32 on disk, K=200 diag; scikit-learn on a tenth of the rows, projected.
    "users-diag": dict(n=2_000_000, d=1000, K=200, iters=3, tools=["pipeline", "sklearn"], budget="2GiB",
                       dtype="float32", covariance_type="diag", sklearn_rows=200_000, gemm_flops="8ndK",
                       iteration_times=True, start="one-per-blob"),
}

IMPORTS = {
    "pipeline": "import numpy, dask.array, zarr, pipeline, pipeline.mixture",
    "pipeline-trim": "import numpy, dask.array, zarr, pipeline, pipeline.mixture, pipeline.runtime\n"
                     "pipeline.runtime.limit_malloc()",
    "sklearn": "import numpy, zarr, sklearn.mixture",
    "pipeline-step": "import numpy, dask.array, zarr, pipeline, pipeline.mixture",
    # What a user's script imports.
    "pipeline-e2e": "import pipeline as pl",
    "sklearn-e2e": "import zarr, sklearn.mixture",
}


def _code(tool, paths, case, iters):
    ct = case.get("covariance_type", "full")
    if tool == "pipeline-e2e":
        return textwrap.dedent(f"""
            import time, warnings
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = pl.GaussianMixture({case['K']}, max_iter={iters}, tol=0, memory_budget={case['budget']!r},
                                        random_state=0).fit({paths['zarr']!r})
            fit = time.perf_counter() - t
            print("RESULT", json.dumps({{"fit": fit, "n_iter": gm.n_iter_, "lower_bound": gm.lower_bound_,
                                        "rows": gm.plan_["rows"], "predicted_peak": gm.plan_.peak}}))
        """)
    if tool == "sklearn-e2e":
        return textwrap.dedent(f"""
            import time, warnings
            X = zarr.open_group({paths['zarr']!r}, mode="r")["X"][...]
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = sklearn.mixture.GaussianMixture({case['K']}, max_iter={iters}, tol=0,
                                                     random_state=0).fit(X)
            fit = time.perf_counter() - t
            print("RESULT", json.dumps({{"fit": fit, "n_iter": gm.n_iter_, "lower_bound": gm.lower_bound_}}))
        """)
    start = f"""
        st = numpy.load({paths['start']!r})
        init = dict(weights_init=st["weights"], means_init=st["means"], precisions_init=st["precisions"])
    """
    start = textwrap.dedent(start)
    if tool in ("pipeline", "pipeline-trim"):
        verbose = 1 if case.get("iteration_times") else 0
        return start + textwrap.dedent(f"""
            import time, warnings
            gm = pipeline.GaussianMixture({case['K']}, covariance_type={ct!r}, max_iter={iters}, tol=0.0,
                                          memory_budget={case['budget']!r}, verbose={verbose}, **init)
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
        rows = case.get("sklearn_rows")
        load = "[...]" if rows is None else f"[:{rows}]"
        # users-diag: should scikit-learn's float32 fit stop on a variance that cancelled
        # below zero (scikit-learn#30382), it is timed again on a float64 copy, and the
        # table says so, rather than losing the run.
        fit = "gm, fit = fit_once(X)" if rows is None else textwrap.dedent("""\
            try:
                gm, fit = fit_once(X)
            except ValueError as e:
                failed = f"{X.dtype}: {str(e)[:90]}"
                X = X.astype(numpy.float64)
                gm, fit = fit_once(X)""").replace("\n", "\n" + " " * 12)
        return start + textwrap.dedent(f"""
            import time, warnings
            X = zarr.open_group({paths['zarr']!r}, mode="r")["X"]{load}
            failed = None
            def fit_once(X):
                gm = sklearn.mixture.GaussianMixture({case['K']}, covariance_type={ct!r}, max_iter={iters},
                                                     tol=0.0, **init)
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gm.fit(X)
                return gm, time.perf_counter() - t
            {fit}
            print("RESULT", json.dumps({{"fit": fit, "n_iter": gm.n_iter_, "lower_bound": gm.lower_bound_,
                                        "rows": int(X.shape[0]), "dtype": str(X.dtype), "failed": failed}}))
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
    # over all children, so the child reports its own peak instead (_PEAK).
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({p.returncode}):\n{err.decode()[-3000:]}")
    text = out.decode()
    peak = int([ln for ln in text.splitlines() if ln.startswith("PEAK")][-1].split()[1])
    return wall, peak, text


# The child's VmHWM, which starts afresh at exec: its ru_maxrss would start from this
# parent's high-water mark (exec keeps the replaced mm's, and subprocess spawns by vfork),
# and this parent has imported pipeline and generated the datasets.  ru_maxrss only
# where there is no /proc.
_PEAK = """
import os as _os
if _os.path.exists("/proc/self/status"):
    for _line in open("/proc/self/status"):
        if _line.startswith("VmHWM:"):
            print("PEAK", int(_line.split()[1]) * 1024)
else:
    import resource as _resource
    print("PEAK", _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _measure(code, imports):
    return _run(textwrap.dedent(code) + _PEAK, imports)


def _gemm_peak(size=4096):
    code = f"""
        import numpy, time
        a = numpy.random.default_rng(0).random(({size}, {size}))
        a @ a
        ts = []
        for _ in range(3):
            t = time.perf_counter(); a @ a; ts.append(time.perf_counter() - t)
        print("GEMM", 2 * {size}**3 / sorted(ts)[1] / 1e9)
    """
    out = _measure(code, "")[2]
    return float([ln for ln in out.splitlines() if ln.startswith("GEMM")][-1].split()[1])


def _gemm_kernel_rate(m, k, n, reps=10):
    """float64 GFLOP/s of the pair (m x k)(k x n) and (n x m)(m x k), in a fresh process.

    The diag/spherical kernel's two GEMMs per slice (m = slice rows, k = 2d, n = K):
    the E-step's ``Z A`` and the M-step's ``R^T Z``; 4 m k n flops a pair.
    """
    code = f"""
        import numpy, time
        rng = numpy.random.default_rng(0)
        Z, A, R = rng.random(({m}, {k})), rng.random(({k}, {n})), rng.random(({m}, {n}))
        L, W = numpy.empty(({m}, {n})), numpy.empty(({n}, {k}))
        numpy.matmul(Z, A, out=L); numpy.matmul(R.T, Z, out=W)
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range({reps}):
                numpy.matmul(Z, A, out=L); numpy.matmul(R.T, Z, out=W)
            ts.append(time.perf_counter() - t)
        print("GEMM", 4 * {m} * {k} * {n} * {reps} / sorted(ts)[1] / 1e9)
    """
    out = _measure(code, "")[2]
    return float([ln for ln in out.splitlines() if ln.startswith("GEMM")][-1].split()[1])


def _start_precisions(covariance_type, K, d, var):
    """Isotropic precisions 1 / var in the type's shape (scikit-learn's precisions_init)."""
    return {"full": lambda: np.repeat((np.eye(d) / var)[None], K, axis=0),
            "tied": lambda: np.eye(d) / var,
            "diag": lambda: np.full((K, d), 1.0 / var),
            "spherical": lambda: np.full(K, 1.0 / var)}[covariance_type]()


def _make_data(case, directory):
    """Blobs (K centres) written chunk-wise to Zarr, and the shared start."""
    import pipeline as pl

    dtype = case.get("dtype", "float64")
    ct = case.get("covariance_type", "full")
    stem = f"gmm-{case['n']}x{case['d']}" + ("" if dtype == "float64" else f"-{dtype}")
    paths = {"zarr": str(directory / f"{stem}.zarr"),
             "start": str(directory / (f"{stem}-start.npz" if ct == "full" else f"{stem}-start-{ct}.npz"))}
    if not os.path.exists(paths["zarr"]):
        # 8 MiB Zarr chunks: many blocks for the threads, no block holds the dataset.
        itemsize = np.dtype(dtype).itemsize
        pl.make_blobs(paths["zarr"], case["n"], case["d"], centers=case["K"], dtype=dtype,
                      random_state=0, chunk_rows=max(1024, 2**23 // (itemsize * case["d"])),
                      memory_budget="1GiB")
    import zarr

    group = zarr.open_group(paths["zarr"], mode="r")
    rng = np.random.RandomState(0)
    rows = group["X"][: min(case["n"], 20000)]
    # The same start for both tools: K data rows as means, isotropic precisions at the
    # data's overall scale (in the covariance type's shape), uniform weights.
    pick = rng.choice(len(rows), case["K"], replace=False)
    if case.get("start") == "one-per-blob":
        # users-diag: each mean on its own blob (the stored labels), random rows for any
        # blob absent from these rows.
        labels = group["y"][: len(rows)]
        for k in range(case["K"]):
            hit = np.flatnonzero(labels == k)
            if len(hit):
                pick[k] = hit[0]
    means = rows[pick].astype(np.float64)
    var = float(rows.var(axis=0, dtype=np.float64).mean())
    np.savez(paths["start"], weights=np.full(case["K"], 1.0 / case["K"]), means=means,
             precisions=_start_precisions(ct, case["K"], case["d"], var))
    return paths


_ITERATION = re.compile(r"iteration \d+: .*\(([0-9.]+) s\)")


def _flops(case, rows):
    """Dense GEMM flops credited to one iteration over ``rows`` rows, or None (no GEMM figure)."""
    K, d = case["K"], case["d"]
    if case.get("gemm_flops") == "8ndK":
        return 8 * rows * d * K
    if case.get("covariance_type", "full") == "full" and not case.get("e2e"):
        return 4 * rows * K * d ** 2
    return None


def _bench(name, case, runs, directory, gemm):
    paths = _make_data(case, directory)
    itemsize = np.dtype(case.get("dtype", "float64")).itemsize
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
            its = [float(m.group(1)) for m in map(_ITERATION.search, out.splitlines()) if m]
            if its:
                res["iteration_times"] = its
            label = "warm-up" if rnd == 0 else f"run {rnd}"
            print(f"  {name} {tool:<9} {label:<8} wall {wall:7.2f} s  fit {res['fit']:7.2f} s  "
                  f"per-iter {res['per_iter']:6.3f} s  +{(peak - idle[tool]) / 2**20:7.0f} MiB  "
                  f"lb {res['lower_bound']:.12g}", flush=True)
            if rnd > 0:
                rows[tool].append(res)
    summary = {"tools": list(case["tools"]), "covariance_type": case.get("covariance_type", "full")}
    for tool, rs in rows.items():
        per_iter = statistics.median(r["per_iter"] for r in rs)
        n_rows = rs[-1].get("rows", case["n"]) if tool == "sklearn" else case["n"]
        flops = _flops(case, n_rows)
        summary[tool] = {
            "per_iter_s": per_iter,
            "fit_s": statistics.median(r["fit"] for r in rs),
            "wall_s": statistics.median(r["wall"] for r in rs),
            "peak_above_idle_MiB": statistics.median(r["peak_above_idle"] for r in rs) / 2**20,
            "rows": n_rows,
            "gflops": None if flops is None else flops / per_iter / 1e9,
            "fraction_of_gemm_peak": None if flops is None else flops / per_iter / 1e9 / gemm,
            # What reading X once per iteration amounts to (an effective figure, not a measured bandwidth).
            "x_gbps": None if case.get("e2e") else n_rows * case["d"] * itemsize / per_iter / 1e9,
            "lower_bound": rs[-1]["lower_bound"],
            "n_iter": rs[-1]["n_iter"],
            "dtype": rs[-1].get("dtype"),
            "failed": next((r["failed"] for r in rs if r.get("failed")), None),
            "runs": rs,
        }
        its = [t for r in rs for t in r.get("iteration_times", [])]
        if its:
            summary[tool]["em_iter_s"] = statistics.median(its)
            if flops is not None:
                summary[tool]["em_gflops"] = flops / statistics.median(its) / 1e9
    comparable = ("pipeline" in summary and "sklearn" in summary and not case.get("sklearn_rows")
                  and case.get("sklearn_iters", case["iters"]) == case["iters"])
    if comparable:
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
    if case.get("e2e"):
        p, s = summary["pipeline-e2e"], summary["sklearn-e2e"]
        summary["time_ratio"] = p["wall_s"] / s["wall_s"]
        # Independent k-means inits: shown, not a correctness check.
        summary["lower_bound_rel_diff_independent_inits"] = abs(p["lower_bound"] - s["lower_bound"]) / abs(s["lower_bound"])
    elif case.get("sklearn_rows"):
        s = summary["sklearn"]
        s["projection_factor"] = case["n"] / s["rows"]
        s["projected_per_iter_s"] = s["per_iter_s"] * s["projection_factor"]
        summary["time_ratio"] = summary["pipeline"]["per_iter_s"] / s["projected_per_iter_s"]
        if "em_iter_s" in summary["pipeline"]:
            summary["time_ratio_em"] = summary["pipeline"]["em_iter_s"] / s["projected_per_iter_s"]
    elif "sklearn" in summary:
        summary["time_ratio"] = summary["pipeline"]["per_iter_s"] / summary["sklearn"]["per_iter_s"]
        if "pipeline-trim" in summary:
            summary["time_ratio_trim"] = summary["pipeline-trim"]["per_iter_s"] / summary["sklearn"]["per_iter_s"]
    if case.get("gemm_flops") == "8ndK":
        from pipeline.kernels.covariances import slice_rows
        from pipeline.sizes import parse_budget

        m = slice_rows(case["d"])
        rate = _gemm_kernel_rate(m, 2 * case["d"], case["K"])
        summary["kernel_gemm"] = {"shape": f"({m} x {2 * case['d']})({2 * case['d']} x {case['K']}) + "
                                           f"({case['K']} x {m})({m} x {2 * case['d']})",
                                  "gflops": rate}
        for tool in ("pipeline", "sklearn"):
            t = summary[tool]
            t["fraction_of_kernel_gemm"] = t["gflops"] / rate
        budget = parse_budget(case["budget"])
        p = summary["pipeline"]
        p["budget_MiB"] = budget / 2**20
        p["within_budget"] = bool(p["peak_above_idle_MiB"] * 2**20 <= budget)
        print(f"  {name} float64 GEMM at the kernel's shapes {summary['kernel_gemm']['shape']}: {rate:.1f} GFLOP/s; "
              f"pipeline peak {p['peak_above_idle_MiB']:.0f} MiB above idle, budget {p['budget_MiB']:.0f} MiB: "
              f"{'within' if p['within_budget'] else 'OVER'}", flush=True)
    return summary


def _fmt(v, spec, suffix=""):
    return "" if v is None else f"{v:{spec}}{suffix}"


def _table(results, gemm):
    lines = [f"float64 GEMM peak measured in this run: {gemm:.1f} GFLOP/s", "",
             "| case | tool | per iteration | wall (end to end) | peak RSS above idle | GFLOP/s (dense-equivalent) "
             "| % of GEMM peak | X GB/s (effective) | ratio | lower bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    blank = "| | | | | | |"
    for name, s in results.items():
        tools = s.get("tools") or [t for t in ("pipeline", "pipeline-trim", "pipeline-step", "sklearn") if t in s]
        e2e = any(t.endswith("-e2e") for t in tools)
        for tool in tools:
            t = s[tool]
            key = {"pipeline": "time_ratio", "pipeline-trim": "time_ratio_trim",
                   "pipeline-e2e": "time_ratio"}.get(tool)
            ratio = f"{s[key]:.3f}x" if key in s else ""
            label = tool
            if tool == "sklearn" and "projected_per_iter_s" in t:
                label = f"sklearn ({t['rows']} rows in memory, {t['dtype']})"
                if t.get("failed"):
                    label += f"; its fit on the stored dtype failed ({t['failed']})"
            per_iter = f"(fit {t['fit_s']:.2f} s)" if e2e else f"{t['per_iter_s']:.3f} s"
            lines.append(f"| {name} | {label} | {per_iter} | {t['wall_s']:.1f} s | "
                         f"{t['peak_above_idle_MiB']:.0f} MiB | {_fmt(t['gflops'], '.1f')} | "
                         f"{_fmt(None if t['fraction_of_gemm_peak'] is None else 100 * t['fraction_of_gemm_peak'], '.0f', '%')} | "
                         f"{_fmt(t['x_gbps'], '.2f')} | {ratio} | {t['lower_bound']:.12g} |")
            if "em_iter_s" in t:
                em_ratio = f"{s['time_ratio_em']:.3f}x" if tool == "pipeline" and "time_ratio_em" in s else ""
                lines.append(f"| {name} | {tool}: EM iterations alone (verbose) | {t['em_iter_s']:.3f} s | | | "
                             f"{_fmt(t.get('em_gflops'), '.1f')} | "
                             f"{_fmt(None if t.get('em_gflops') is None else 100 * t['em_gflops'] / gemm, '.0f', '%')} "
                             f"| | {em_ratio} | |")
            if "projected_per_iter_s" in t:
                lines.append(f"| {name} | sklearn projected to {s['pipeline']['rows']} rows "
                             f"(x{t['projection_factor']:g}) | {t['projected_per_iter_s']:.3f} s | | | | | | | |")
        if "lower_bound_rel_diff" in s:
            flag = "" if s["lower_bound_rel_diff"] <= 1e-9 else " (ABOVE 1e-9)"
            lines.append(f"| {name} | lower bounds agree to | {s['lower_bound_rel_diff']:.1e} relative{flag} | | | | | | | |")
        if "lower_bound_rel_diff_independent_inits" in s:
            lines.append(f"| {name} | lower bounds (independent k-means inits) differ by | "
                         f"{s['lower_bound_rel_diff_independent_inits']:.1e} relative | | | | | | | |")
        if e2e:
            lines.append(f"| {name} | ratio = whole-process wall, pipeline / scikit-learn | | | | | | | | |")
        if "kernel_gemm" in s:
            kg, p = s["kernel_gemm"], s["pipeline"]
            lines.append(f"| {name} | float64 GEMM at the kernel's shapes {kg['shape']} | | | | {kg['gflops']:.1f} | "
                         f"pipeline {100 * p['fraction_of_kernel_gemm']:.0f}%, sklearn "
                         f"{100 * s['sklearn']['fraction_of_kernel_gemm']:.0f}% of it | | | |")
            lines.append(f"| {name} | pipeline peak RSS above idle vs budget | | | "
                         f"{p['peak_above_idle_MiB']:.0f} / {p['budget_MiB']:.0f} MiB: "
                         f"{'within' if p['within_budget'] else 'OVER'} | | | | | |")
    return "\n".join(lines)


def _plot(results, path):
    names = [n for n in results if n.split("-")[0] in TYPED and "pipeline" in results[n] and "sklearn" in results[n]
             and not results[n].get("e2e")]
    if not names:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[bench]): no PNG")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, 2.5 * len(names)), 4))
    x = np.arange(len(names))
    for i, tool in enumerate(("pipeline", "sklearn")):
        t = [results[n][tool]["per_iter_s"] if tool in results[n] else 0 for n in names]
        m = [results[n][tool]["peak_above_idle_MiB"] if tool in results[n] else 0 for n in names]
        ax1.bar(x + 0.4 * i, t, 0.4, label=tool)
        ax2.bar(x + 0.4 * i, m, 0.4, label=tool)
    labels = [f"{n}\n{results[n]['shape']}" for n in names]
    for ax, title in ((ax1, "seconds per EM iteration (median)"), (ax2, "peak RSS above idle (MiB)")):
        ax.set_xticks(x + 0.2)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title)
        ax.legend()
    types = sorted({results[n]["covariance_type"] for n in names}, key=COVARIANCE_TYPES.index)
    if len(types) > 1:  # full and diag differ by ~20x
        ax1.set_yscale("log")
    fig.suptitle(f"GMM ({', '.join(types)}), K=16, same start, from disk (G1: 10 iterations, G2: 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["all", *CASES], default="all",
                    help="all: g1 and g2 (g1-e2e, users and users-diag only by name)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--covariance-type", choices=["all", *COVARIANCE_TYPES], default="full",
                    help="for g1 and g2: one type, or all four in turn (default full)")
    ap.add_argument("--n", type=int, default=None, help="rows of g1, g2 and g1-e2e (smoke tests; not figures)")
    ap.add_argument("--users-rows", type=int, default=None,
                    help="rows of users-diag (default 2,000,000; scikit-learn gets a tenth, at least "
                         "20 a component; smoke tests)")
    ap.add_argument("--gemm-size", type=int, default=4096,
                    help="side of the float64 GEMM that measures the peak (smaller only for smoke tests)")
    ap.add_argument("--results", default=None, help=f"where the JSON and PNG go (default {RESULTS})")
    ap.add_argument("--dir", default=None, help="where the datasets go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the datasets")
    a = ap.parse_args(argv)
    directory = Path(a.dir or os.environ.get("TMPDIR", "/tmp")) / "pipeline-bench-gmm"
    directory.mkdir(parents=True, exist_ok=True)
    results_dir = Path(a.results) if a.results else RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    gemm = _gemm_peak(a.gemm_size)
    print(f"float64 GEMM peak ({a.gemm_size}^3): {gemm:.1f} GFLOP/s", flush=True)
    names = ["g1", "g2"] if a.case == "all" else [a.case]
    types = list(COVARIANCE_TYPES) if a.covariance_type == "all" else [a.covariance_type]
    results = {}
    try:
        for name in names:
            base = dict(CASES[name])
            if a.n is not None and name in ("g1", "g2", "g1-e2e"):
                base["n"] = a.n
            if a.users_rows is not None and name == "users-diag":
                base["n"] = a.users_rows
                # At least 20 rows a component: on fewer, scikit-learn's float32 diag variances
                # (E[x^2] - 2 E[x] m + m^2) can cancel below zero and its fit stops (#30382).
                base["sklearn_rows"] = min(a.users_rows, max(20 * base["K"], a.users_rows // 10))
            runs = 1 if name in ("users", "users-diag") else a.runs
            for ct in (types if name in TYPED else [base.get("covariance_type", "full")]):
                case = dict(base, covariance_type=ct)
                key = name
                if name in TYPED and ct != "full":
                    key = f"{name}-{ct}"
                    # pipeline-trim and G2's single scikit-learn run are for full only.
                    case["tools"] = [t for t in case["tools"] if t != "pipeline-trim"]
                    case.pop("sklearn_rounds", None)
                print(f"{key}: {case['n']} x {case['d']} {case.get('dtype', 'float64')}, K={case['K']}, "
                      f"{ct}, {case['iters']} iteration(s)", flush=True)
                results[key] = _bench(key, case, runs, directory, gemm)
                results[key]["shape"] = f"{case['n']}x{case['d']}, K={case['K']}"
                results[key]["e2e"] = bool(case.get("e2e"))
    finally:
        if not a.keep:
            shutil.rmtree(directory, ignore_errors=True)
    text = _table(results, gemm)
    print()
    print(text)
    tag = "-".join(names)
    if any(n in TYPED for n in names) and a.covariance_type != "full":
        tag += f"-{a.covariance_type}"
    if a.n is not None or a.users_rows is not None:
        tag += "-smoke"
    out = {"gemm_peak_gflops": gemm, "gemm_size": a.gemm_size, "results": results, "table": text,
           "machine": {"cores": os.cpu_count()}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (results_dir / f"gmm-{tag}.json").write_text(json.dumps(out, indent=1, default=float))
    _plot(results, results_dir / f"gmm-{tag}.png")
    print(f"\nsaved {results_dir / f'gmm-{tag}.json'}")


if __name__ == "__main__":
    main()
