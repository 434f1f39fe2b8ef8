"""Benchmark: full-covariance EM with K = 200 components, parameters sharded by component.

One command::

    python benchmarks/bench_gmm_sharded.py                 # k200: 50000 x 512 f64, K=200, one iteration, 256 MiB
    python benchmarks/bench_gmm_sharded.py --case cluster  # the same on dask scheduler + 1 and 2 workers
    python benchmarks/bench_gmm_sharded.py --case users    # 1,000,000 x 900 from 200 separated clusters, 2 GiB
    python benchmarks/bench_gmm_sharded.py --case dense900  # unstructured 100000 x 900, projected to 1M rows

What runs: one EM iteration (:func:`pipeline.shards.em_iteration`: every (row,
component) log-density once, the statistics per component group, the new parameters
written group by group) from a start stored beforehand in a sharded parameter store
(K data rows as means, uniform weights, isotropic covariances at the data's scale):
the parameters never enter the timed process whole (3 x 400 MiB at K=200, d=512).
X is a Zarr dataset on disk.  Each run is a fresh process; the figure is the
iteration's wall time (the process's imports and plan excluded), and its peak RSS
above an idle process that imported the same modules (VmHWM), held against the
budget.  Rate: scikit-learn's dense-equivalent 4 n K d^2 flops per iteration over
the time, against the float64 GEMM rate measured in the same run at the E-step's
shape ((2048 x d+1) @ (d+1 x d), one BLAS thread per dask thread, as many threads at
once as the job runs) and the 4096^3 peak.  ``cluster``: the same iteration through a
real ``dask scheduler`` with 1 and then 2 ``dask worker`` processes (1 thread each,
the budget per worker), results compared with the threaded run's, peak RSS of each
worker.  ``users``: blobs of 200 separated clusters (the start's means one row of each, its
covariances 2 I: a blob's own scale), K=200 at 2 GiB: time and the share of (row, component) pairs pruning skipped.
``dense900``: unstructured rows (one blob), the time of one iteration and its
projection to 1,000,000 rows (linear in n).  Results: ``benchmarks/results/gmm-sharded-<case>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASES = {
    "k200": dict(n=50_000, d=512, K=200, budget="256MiB", centers=1, runs=3),
    "cluster": dict(n=50_000, d=512, K=200, budget="256MiB", centers=1, runs=1),
    # The start's covariances at a blob's own scale (a row as mean: variance 2 a feature).
    "users": dict(n=1_000_000, d=900, K=200, budget="2GiB", centers=200, runs=1, start_var=2.0),
    "dense900": dict(n=100_000, d=900, K=200, budget="2GiB", centers=1, runs=1),
}
IMPORTS = "import numpy, zarr, dask, pipeline, pipeline.shards, pipeline.mixture"

_PEAK = """
for _line in open("/proc/self/status"):
    if _line.startswith("VmHWM:"):
        print("PEAK", int(_line.split()[1]) * 1024)
"""


def _child(code, env=None):
    """Run code in a fresh Python with pipeline's imports; return its stdout's KEY value lines."""
    src = IMPORTS + "\nimport pipeline.runtime as _rt\n_rt.limit_malloc()\n" + textwrap.dedent(code) + _PEAK
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{p.stderr[-4000:]}")
    out = {}
    for line in p.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key.isupper():
            out[key] = json.loads(value)
    return out


def _idle():
    return _child("numpy.ones((64, 64)) @ numpy.ones((64, 64))")["PEAK"]


def _gemm_rates(d, threads):
    """float64 GFLOP/s: the E-step's shape with `threads` one-thread GEMMs at once, and 4096^3 (all cores)."""
    code = f"""
        import time, numpy
        from concurrent.futures import ThreadPoolExecutor
        from threadpoolctl import threadpool_limits
        rng = numpy.random.default_rng(0)
        a, b = rng.random((2048, {d} + 1)), rng.random(({d} + 1, {d}))
        outs = [numpy.empty((2048, {d})) for _ in range({threads})]
        def work(i, reps=8):
            for _ in range(reps):
                numpy.matmul(a, b, out=outs[i])
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor({threads}) as ex:
            list(ex.map(work, range({threads})))
            ts = []
            for _ in range(3):
                t = time.perf_counter(); list(ex.map(work, range({threads}))); ts.append(time.perf_counter() - t)
        print("KERNEL", 2 * 2048 * ({d} + 1) * {d} * 8 * {threads} / sorted(ts)[1] / 1e9)
        big = rng.random((4096, 4096)); big @ big
        ts = []
        for _ in range(3):
            t = time.perf_counter(); big @ big; ts.append(time.perf_counter() - t)
        print("PEAK4096", 2 * 4096**3 / sorted(ts)[1] / 1e9)
    """
    out = _child(code)
    return out["KERNEL"], out["PEAK4096"]


def _make(case, directory):
    """X on disk and the start in a sharded parameter store; returns their paths."""
    import numpy as np
    import zarr

    import pipeline as pl
    from pipeline import shards as sh

    data = directory / f"x-{case['n']}x{case['d']}-{case['centers']}.zarr"
    if not data.exists():
        pl.make_blobs(str(data), case["n"], case["d"], centers=case["centers"], dtype="float64",
                      random_state=0, cluster_std=1.0, center_box=(-10.0, 10.0), memory_budget="1GiB")
    ds = pl.open_dataset(str(data))
    K, d = case["K"], case["d"]
    rng = np.random.default_rng(0)
    if case["centers"] == K:  # one row of each blob: each component starts in its own cluster
        y = ds.y_zarr[...]
        idx = np.array([rng.choice(np.flatnonzero(y == k)) for k in range(K)])
    else:
        idx = np.sort(rng.choice(case["n"], K, replace=False))
    means = ds.X_zarr.get_orthogonal_selection((idx, slice(None)))
    var = case.get("start_var") or float(ds.X_zarr[:10_000].var(axis=0).mean())
    start = directory / f"start-{case['n']}x{d}-{K}-{case['centers']}.zarr"
    params = sh.ShardedParameters.create(zarr.open_group(str(start), mode="w"), K, d)
    cov = np.broadcast_to(np.eye(d) * var, (K, d, d))
    sh.write_parameters(params, np.full(K, 1.0 / K), means, covariances=cov, group=8)
    return data, start


ITERATION = """
    import time, json, numpy, zarr, shutil
    from pipeline import shards as sh
    from pipeline.inputs import as_rows
    import pipeline as pl
    {connect}
    src = as_rows({data!r})
    params = sh.ShardedParameters(zarr.open_group({start!r}, mode="r"))
    work = zarr.open_group({work!r}, mode="w")
    plan = pl.plan("gmm", n_samples=src.shape[0], n_features=src.shape[1], n_components=params.n_components,
                   memory_budget={budget!r}, chunk_rows=src.chunk_rows, x_compressed=src.compressed,
                   sharded=True, workers={workers})
    t = time.perf_counter()
    res = sh.em_iteration(src, params, work.require_group("out"), work.require_group("scratch"), plan, 1e-6)
    print("SECONDS", time.perf_counter() - t)
    print("LL", res["log_likelihood"])
    print("SKIPPED", res["skipped"] / res["pairs"])
    print("PLAN", json.dumps({{k: v for k, v in plan.params.items()}}, default=str))
    print("PLANPEAK", plan.peak)
    print("COV", json.dumps([float(x) for x in numpy.asarray(res["out"].group["covariances"][::37, ::97, ::89]).ravel()]))
    print("MEANS", json.dumps(numpy.asarray(res["means"][::17, ::61]).ravel().tolist()))
    print("WEIGHTS", json.dumps(res["weights"].tolist()))
"""


def _iteration(data, start, work, budget, address=None, workers=1):
    # pipeline.runtime.connect: the workers' BLAS limited to their dask threads, as every pipeline job has them.
    connect = (f"import pipeline.runtime; _cm = pipeline.runtime.connect({address!r}); _cm.__enter__(); "
               f"from distributed import default_client; default_client().wait_for_workers({workers})"
               if address else "")
    return _child(ITERATION.format(data=str(data), start=str(start), work=str(work), budget=budget,
                                   connect=connect, workers=workers))


def _warm():
    import numpy
    import zarr  # noqa: F401

    import pipeline.mixture  # noqa: F401
    import pipeline.shards  # noqa: F401

    numpy.ones((64, 64)) @ numpy.ones((64, 64))


class _Cluster:
    """`dask scheduler` and `dask worker` processes (no nanny: their own RSS is measured) on 127.0.0.1."""

    def __init__(self, n_workers, directory):
        bindir = Path(sys.executable).parent
        self.file = directory / f"scheduler-{n_workers}.json"
        self.file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs = [subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                        "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(self.file)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
        while not self.file.exists():
            time.sleep(0.2)
        time.sleep(0.5)
        self.address = json.loads(self.file.read_text())["address"]
        # glibc returns freed blocks >= 1 MiB at once (pipeline.runtime.limit_malloc, as
        # the workers of connect("local") and the `pipeline` command do): RSS is what is live.
        env = {**env, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
        self.workers = [subprocess.Popen([str(bindir / "dask"), "worker", self.address, "--nthreads", "1",
                                          "--no-nanny", "--memory-limit", "0", "--host", "127.0.0.1",
                                          "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         env=env) for _ in range(n_workers)]
        self.procs += self.workers
        from distributed import Client

        with Client(self.address, timeout=60) as c:
            c.wait_for_workers(n_workers, timeout=60)
            # The idle reference: workers that imported what the job's tasks import.
            c.run(_warm)
        time.sleep(1.0)
        self.idle = [self.rss(p.pid) for p in self.workers]

    @staticmethod
    def rss(pid, key="VmRSS"):
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def peaks_above_idle(self):
        return [self.rss(p.pid, "VmHWM") - idle for p, idle in zip(self.workers, self.idle)]

    def close(self):
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _rate(case, seconds):
    return 4 * case["n"] * case["K"] * case["d"] ** 2 / seconds / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), default="k200")
    ap.add_argument("--runs", type=int, help="timed runs (fresh processes); default per case")
    ap.add_argument("--n", type=int, help="rows (a smaller smoke run)")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "pipeline-bench-sharded"))
    args = ap.parse_args(argv)
    case = dict(CASES[args.case])
    if args.n:
        case["n"] = args.n
    runs = args.runs or case["runs"]
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    data, start = _make(case, directory)
    idle = _idle()
    kernel, peak = _gemm_rates(case["d"], 2)
    out = {"case": args.case, **case, "gemm_kernel_gflops": kernel, "gemm_4096_gflops": peak, "runs": []}
    print(f"{args.case}: X {case['n']} x {case['d']} float64 on disk, K={case['K']} full, one iteration, "
          f"budget {case['budget']}; float64 GEMM here: {kernel:.1f} GFLOP/s at the E-step's shape "
          f"(2 threads), {peak:.1f} at 4096^3")
    if args.case != "cluster":
        for i in range(runs + (1 if runs > 1 else 0)):  # a warm-up round when there are repeats
            r = _iteration(data, start, directory / "work", case["budget"])
            r["above_idle"] = r["PEAK"] - idle
            if runs > 1 and i == 0:
                continue
            out["runs"].append(r)
        secs = sorted(r["SECONDS"] for r in out["runs"])[len(out["runs"]) // 2]
        above = max(r["above_idle"] for r in out["runs"])
        budget = out["runs"][0]["PLAN"]
        from pipeline.sizes import parse_budget

        b = parse_budget(case["budget"])
        print(f"| case | s / iteration | GFLOP/s (4nKd^2) | of GEMM at kernel shape | peak above idle | "
              f"budget | pairs pruned | plan |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {args.case} | {secs:.1f} | {_rate(case, secs):.1f} | {100 * _rate(case, secs) / kernel:.0f}% | "
              f"{above / 2**20:.0f} MiB | {b / 2**20:.0f} MiB ({'inside' if above <= b else 'EXCEEDED'}) | "
              f"{100 * out['runs'][0]['SKIPPED']:.1f}% | group {budget['component_group']}, rows {budget['rows']}, "
              f"order {budget['order']} |")
        if case["n"] != 1_000_000:
            print(f"projected to 1,000,000 rows: {secs * 1_000_000 / case['n']:.0f} s per iteration (linear in n)")
        out.update(seconds=secs, peak_above_idle=above)
    else:
        ref = _iteration(data, start, directory / "work", case["budget"])
        rows = []
        for n_workers in (1, 2):
            cl = _Cluster(n_workers, directory)
            try:
                r = _iteration(data, start, directory / f"work-{n_workers}", case["budget"], cl.address, n_workers)
                r["worker_peaks"] = cl.peaks_above_idle()
            finally:
                cl.close()
            import numpy as np

            same = all(np.allclose(r[k], ref[k], rtol=1e-9, atol=0) for k in ("COV", "MEANS", "WEIGHTS"))
            same = same and abs(r["LL"] - ref["LL"]) <= 1e-9 * abs(ref["LL"])
            r["same_as_threads"] = bool(same)
            rows.append((n_workers, r))
            out["runs"].append({"workers": n_workers, **r})
        print("| run | s / iteration | GFLOP/s | peak above idle per worker | same result as threads |")
        print("|---|---|---|---|---|")
        print(f"| threads (2) | {ref['SECONDS']:.1f} | {_rate(case, ref['SECONDS']):.1f} | "
              f"{(ref['PEAK'] - idle) / 2**20:.0f} MiB | — |")
        for n_workers, r in rows:
            print(f"| {n_workers} worker(s) x 1 thread | {r['SECONDS']:.1f} | {_rate(case, r['SECONDS']):.1f} | "
                  f"{', '.join(f'{p / 2**20:.0f} MiB' for p in r['worker_peaks'])} | {r['same_as_threads']} |")
        out["threads"] = ref
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"gmm-sharded-{args.case}{'-smoke' if args.n else ''}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
