"""Benchmark: the k-NN and GMM jobs on 1 and 2 dask workers (1 thread each), and on paper.

One command::

    python benchmarks/bench_scaling.py                # both jobs, median of 3 after a warm-up
    python benchmarks/bench_scaling.py --jobs knn --runs 5

Measured (MEASURING.md): each run is a fresh `pipeline …` process, end to end from Zarr
stores on disk, against a long-lived cluster — a `dask scheduler` with one `dask worker`
pinned to core 0, and another with two workers pinned to cores 0 and 1 (taskset), as if
each worker were a one-core machine; plus the default threaded scheduler (2 threads) for
reference.  One warm-up round, then ``--runs`` rounds, the configurations alternating
inside each round; the median wall time is reported.  Bytes moved between workers come
from each worker's transfer log; each worker's peak RSS from ``ru_maxrss``.

On paper: for N workers, from ``pipeline.plan`` (the same cost model the jobs use):
reads of the training set / of X per EM iteration, bytes each worker reads from the
store and receives from other workers, and the depth of the reduction tree — for the
jobs measured here and for the shapes that motivated the project, including
X = [2M x 10000] with 200 components.

Results: ``benchmarks/results/scaling.json`` and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent

JOBS = {
    # K1 of MEASURING.md: 50000 x 3072 float32 training set, 1000 queries, k=5.
    "knn": dict(n_train=50_000, n_query=1000, d=3072, k=5, budget="1GiB"),
    # G1 of MEASURING.md: 200000 x 64 float64, 16 components, 10 EM iterations.
    "gmm": dict(n=200_000, d=64, K=16, iters=10, budget="1GiB"),
}
KNN_SPLIT_EVERY, GMM_SPLIT_EVERY = 8, 4  # the tree widths of neighbors/search.py / mixture.py


def _pipeline(*argv, check=True):
    """Run the CLI in a fresh process; return (wall seconds, stdout)."""
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "pipeline"), *map(str, argv)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if check and r.returncode:
        raise RuntimeError(f"pipeline {' '.join(map(str, argv))} failed:\n{r.stderr}")
    return wall, r.stdout


class Cluster:
    """`dask scheduler` + workers on 127.0.0.1, worker i pinned to core i."""

    def __init__(self, n_workers, memory_limit="3GiB"):
        self.dir = tempfile.mkdtemp(prefix="bench-scaling-")
        sf = os.path.join(self.dir, "scheduler.json")
        log = open(os.path.join(self.dir, "log"), "w")
        self.procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                        "--dashboard-address", "127.0.0.1:0", "--scheduler-file", sf],
                                       stdout=log, stderr=subprocess.STDOUT)]
        for _ in range(600):
            if os.path.exists(sf) and os.path.getsize(sf):
                break
            time.sleep(0.1)
        self.address = json.loads(Path(sf).read_text())["address"]
        for i in range(n_workers):
            self.procs.append(subprocess.Popen(
                ["taskset", "-c", str(i % os.cpu_count()), str(BIN / "dask"), "worker", self.address,
                 "--nthreads", "1", "--memory-limit", memory_limit, "--host", "127.0.0.1", "--no-dashboard",
                 "--name", f"w{i}"], stdout=log, stderr=subprocess.STDOUT))
        from distributed import Client

        self.client = Client(self.address, timeout=60)
        self.client.wait_for_workers(n_workers, timeout=120)

    def received(self):
        """{worker name: bytes received from other workers so far}."""
        def total(dask_worker=None):
            return sum(t["total"] for t in dask_worker.transfer_incoming_log)
        info = self.client.scheduler_info()["workers"]
        return {info[a]["name"]: v for a, v in self.client.run(total).items()}

    def peak_rss(self):
        def peak():
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        info = self.client.scheduler_info()["workers"]
        return {info[a]["name"]: v for a, v in self.client.run(peak).items()}

    def close(self):
        self.client.close()
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _prepare(data):
    data.mkdir(parents=True, exist_ok=True)
    j, g = JOBS["knn"], JOBS["gmm"]
    stores = {
        "train.zarr": (j["n_train"], j["d"], 10, "float32", 1),
        "test.zarr": (j["n_query"], j["d"], 10, "float32", 2),
        "tall.zarr": (g["n"], g["d"], g["K"], "float64", 0),
    }
    for name, (n, d, centers, dtype, seed) in stores.items():
        _, info = _pipeline("info", data / name, check=False)
        if "complete" not in info or "INCOMPLETE" in info:
            _pipeline("generate", "blobs", data / name, "--n-samples", n, "--n-features", d, "--centers", centers,
                      "--dtype", dtype, "--seed", seed, "--overwrite")


def _argv(job, data, where):
    sched = ["--scheduler", where] if where != "threads" else ["--threads-per-worker", "2"]
    if job == "knn":
        j = JOBS["knn"]
        return ["knn", data / "test.zarr", data / "train.zarr", data / "knn-out.zarr", "--k", j["k"],
                "--memory-budget", j["budget"], "--overwrite", "--no-progress", *sched]
    g = JOBS["gmm"]
    return ["gmm", "fit", data / "tall.zarr", data / "gmm-out.zarr", "--n-components", g["K"],
            "--max-iter", g["iters"], "--tol", "0", "--init", "random_from_data", "--seed", 0,
            "--memory-budget", g["budget"], "--overwrite", "--no-progress", *sched]


def measure(jobs, runs, data):
    _prepare(data)
    clusters = {"1 worker": Cluster(1), "2 workers": Cluster(2)}
    configs = ["threads (2)", "1 worker", "2 workers"]
    walls = {job: {c: [] for c in configs} for job in jobs}
    moved = {job: {c: [] for c in configs[1:]} for job in jobs}
    try:
        for rnd in range(runs + 1):
            for job in jobs:
                for c in configs:
                    where = "threads" if c.startswith("threads") else clusters[c].address
                    before = clusters[c].received() if c in clusters else None
                    wall, _ = _pipeline(*_argv(job, data, where))
                    tag = "warm-up" if rnd == 0 else f"run {rnd}"
                    print(f"  {tag:8s} {job:4s} {c:12s} {wall:7.2f} s", flush=True)
                    if rnd:
                        walls[job][c].append(wall)
                        if before is not None:
                            after = clusters[c].received()
                            moved[job][c].append({w: after[w] - before.get(w, 0) for w in after})
        peaks = {c: cl.peak_rss() for c, cl in clusters.items()}
    finally:
        for cl in clusters.values():
            cl.close()
    out = {}
    for job in jobs:
        out[job] = {}
        for c in configs:
            med = statistics.median(walls[job][c])
            row = {"median_s": med, "runs_s": walls[job][c]}
            if c in moved[job]:
                last = moved[job][c][-1]
                row["bytes_received_per_worker"] = last
            out[job][c] = row
        base = out[job]["1 worker"]["median_s"]
        out[job]["2 workers"]["speedup_vs_1_worker"] = base / out[job]["2 workers"]["median_s"]
    out["worker_peak_rss"] = peaks
    return out


def measure_compute(jobs, runs, data):
    """The same jobs through the API from one long-lived client: compute only, no CLI
    start-up, no dataset opening or result writing (alternating, median of ``runs``)."""
    import pipeline as pl
    from pipeline import runtime as _runtime

    _prepare(data)
    clusters = {"1 worker": Cluster(1), "2 workers": Cluster(2)}
    j, g = JOBS["knn"], JOBS["gmm"]
    work = {
        "knn": lambda: pl.kneighbors(str(data / "test.zarr"), str(data / "train.zarr"), j["k"],
                                     memory_budget=j["budget"]),
        "gmm": lambda: pl.GaussianMixture(g["K"], max_iter=g["iters"], tol=0, init_params="random_from_data",
                                          random_state=0, memory_budget=g["budget"]).fit(str(data / "tall.zarr")),
    }
    walls = {job: {c: [] for c in clusters} for job in jobs}
    try:
        for rnd in range(runs + 1):
            for job in jobs:
                for c, cl in clusters.items():
                    with _runtime.connect(cl.address, echo=lambda *_: None):
                        t0 = time.perf_counter()
                        work[job]()
                        wall = time.perf_counter() - t0
                    print(f"  {'warm-up' if rnd == 0 else f'run {rnd}':8s} {job:4s} {c:12s} {wall:7.2f} s (compute)",
                          flush=True)
                    if rnd:
                        walls[job][c].append(wall)
    finally:
        for cl in clusters.values():
            cl.close()
    out = {}
    for job in jobs:
        out[job] = {c: {"median_s": statistics.median(v), "runs_s": v} for c, v in walls[job].items()}
        out[job]["2 workers"]["speedup_vs_1_worker"] = out[job]["1 worker"]["median_s"] / out[job]["2 workers"]["median_s"]
    return out


# ------------------------------------------------------------------ on paper

def _gib(b):
    return f"{b / 2**30:.3g} GiB" if b >= 2**30 else f"{b / 2**20:.3g} MiB"


def knn_on_paper(n_query, n_train, d, k, itemsize, budget, workers):
    import pipeline as pl

    p = pl.plan("knn", n_query=n_query, n_train=n_train, n_features=d, k=k, itemsize=itemsize,
                memory_budget=budget, threads=1)
    qr, tr = p.params["query_rows"], p.params["train_rows"]
    qb, tb = math.ceil(n_query / qr), math.ceil(n_train / tr)
    rows = []
    for n in workers:
        # Tasks: one per (query block, train block); each reads its train block from the
        # store.  The prepared query block (centred + float64 copies) goes to every other
        # worker that runs one of its tasks; partial top-k lists (k x (8 + 8) bytes per
        # query row) climb a tree of width 8 over the train blocks.
        busy = min(n, qb * tb)
        rows.append(dict(
            workers=n, tasks=qb * tb, busy_workers=busy, train_set_reads=qb,
            store_read_per_worker=qb * n_train * d * itemsize / busy,
            query_block_to_each_worker=(qr * d * (itemsize + 8) * qb if busy > 1 else 0),
            topk_into_each_merge=(min(tb, KNN_SPLIT_EVERY) * qr * k * 16 if busy > 1 else 0),
            merge_tree_depth=math.ceil(math.log(max(tb, 2), KNN_SPLIT_EVERY)),
            gflop_per_worker=2 * n_query * n_train * d / busy / 1e9))
    return p, rows


def gmm_on_paper(n, d, K, itemsize, budget, workers):
    import pipeline as pl

    try:
        p = pl.plan("gmm", n_samples=n, n_features=d, n_components=K, itemsize=itemsize,
                    memory_budget=budget, threads=1)
    except pl.BudgetError as e:
        return str(e), []
    rows_per_block, passes = p.params["rows"], p.params.get("passes", 1)
    g = p.params.get("component_group", K)
    blocks = math.ceil(n / rows_per_block)
    out = []
    for w in workers:
        # Per EM iteration: `passes` reads of X (two per component group when grouped: the
        # log-sum-exp, then the statistics); each worker reads its share of the blocks.
        # A group's parameters (precision factor d x d, mean d, weight) go to every
        # worker once per pass; the statistics (N, S1, S2: 1 + d + d^2 floats per
        # component) climb a tree of width 4, each combine receiving up to 3 partials.
        # Flops: E-step X @ P_k (2 n d^2 per component), M-step scatter (n d^2).
        busy = min(w, blocks)
        params_group = g * (d * d + d + 1) * 8
        stats_group = g * (1 + d + d * d) * 8
        out.append(dict(
            workers=w, blocks=blocks, busy_workers=busy, passes_over_X=passes,
            X_read_per_worker=passes * n * d * itemsize / busy,
            params_to_each_worker=passes * params_group if busy > 1 else 0,
            stats_into_each_combine=(GMM_SPLIT_EVERY - 1) * stats_group if busy > 1 else 0,
            tree_depth=math.ceil(math.log(max(blocks, 2), GMM_SPLIT_EVERY)),
            driver_parameters=3 * K * d * d * 8,
            gflop_per_worker=3 * n * K * d * d / busy / 1e9))
    return p, out


def component_sharded_on_paper(n, d, K, workers, itemsize=8):
    """The alternative for large d x K: each worker owns K/N components, streams all of X."""
    out = []
    for w in workers:
        owned = math.ceil(K / w)
        out.append(dict(
            workers=w, components_per_worker=owned, passes_over_X=2,
            X_read_per_worker=2 * n * d * itemsize,
            params_held_per_worker=owned * 2 * d * d * 8,     # precision factor + scatter accumulator
            lse_exchanged_per_worker=2 * n * 8 if w > 1 else 0,  # per-row log-sum-exp partials, in and out
            gflop_per_worker=3 * n * owned * d * d / 1e9))
    return out


_BYTES = {"store_read_per_worker", "query_block_to_each_worker", "topk_into_each_merge", "X_read_per_worker",
          "params_to_each_worker", "stats_into_each_combine", "driver_parameters", "params_held_per_worker",
          "lse_exchanged_per_worker"}


def _fmt(k, v):
    if k in _BYTES:
        return _gib(v) if v else "0"
    if k.startswith("gflop"):
        return f"{v:,.0f}" if v >= 10 else f"{v:.3g}"
    return str(v)


def _table(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(k, v) for k, v in r.items()) + " |" for r in rows]
    return "\n".join(lines)


def on_paper(workers=(1, 2, 4, 8, 16, 64)):
    j, g = JOBS["knn"], JOBS["gmm"]
    cases = {
        "knn K1 [1000 q, 50000 x 3072 f32], 1 GiB": knn_on_paper(j["n_query"], j["n_train"], j["d"], j["k"], 4,
                                                              j["budget"], workers),
        "knn [10000 q, 50000 x 3072 f32], 1 GiB": knn_on_paper(10_000, 50_000, 3072, 5, 4, "1GiB", workers),
        "gmm G1 [200000 x 64], K=16, 1 GiB": gmm_on_paper(g["n"], g["d"], g["K"], 8, g["budget"], workers),
        "gmm [1M x 900], K=200, 8 GiB": gmm_on_paper(1_000_000, 900, 200, 8, "8GiB", workers),
        "gmm [2M x 10000], K=200, 64 GiB": gmm_on_paper(2_000_000, 10_000, 200, 8, "64GiB", workers),
        "gmm [2M x 10000], K=200, 1 TiB": gmm_on_paper(2_000_000, 10_000, 200, 8, "1TiB", workers),
    }
    out = {}
    for name, (plan, rows) in cases.items():
        print(f"\n{name}")
        if not rows:
            print(f"  refused before computing: {plan}")
            out[name] = {"refused": plan}
            continue
        print("  " + plan.explain().splitlines()[1].strip())
        print(_table(rows))
        out[name] = {"plan": plan.params, "per_workers": rows}
    name = "gmm [2M x 10000], K=200, component-sharded (not implemented)"
    rows = component_sharded_on_paper(2_000_000, 10_000, 200, workers)
    print(f"\n{name}")
    print(_table(rows))
    out[name] = {"per_workers": rows}
    return out


def plot(measured, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = [j for j in measured if j in JOBS]
    fig, axes = plt.subplots(1, len(jobs), figsize=(4.5 * len(jobs), 3))
    axes = [axes] if len(jobs) == 1 else axes
    for ax, job in zip(axes, jobs):
        configs = list(measured[job])
        ax.bar(configs, [measured[job][c]["median_s"] for c in configs], color=["grey", "tab:blue", "tab:green"])
        for i, c in enumerate(configs):
            ax.scatter([i] * len(measured[job][c]["runs_s"]), measured[job][c]["runs_s"], color="k", s=8, zorder=3)
        ax.set_ylabel("wall seconds (median, dots: runs)")
        ax.set_title({"knn": "k-NN K1: 1000 x 50000 x 3072 f32", "gmm": "GMM G1: 200000 x 64, K=16, 10 it"}[job],
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="knn,gmm")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data-dir", default=os.environ.get("PIPELINE_BENCH_DATA", "/tmp/pipeline-bench-scaling"))
    ap.add_argument("--paper-only", action="store_true", help="only the figures on paper")
    ap.add_argument("--compute-only", action="store_true",
                    help="time the jobs through the API from one client (no CLI start-up or I/O of results)")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cores": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    if a.compute_only:
        jobs = [j for j in a.jobs.split(",") if j]
        measured = measure_compute(jobs, a.runs, Path(a.data_dir))
        result["compute_only"] = measured
        result["machine"]["loadavg_end"] = os.getloadavg()
        for job in jobs:
            row = measured[job]
            print(f"  {job}: " + ", ".join(f"{c} {row[c]['median_s']:.2f} s" for c in row)
                  + f"; 2 workers vs 1: x{row['2 workers']['speedup_vs_1_worker']:.2f}")
        (RESULTS / "scaling-compute.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {RESULTS / 'scaling-compute.json'}")
        return
    if not a.paper_only:
        jobs = [j for j in a.jobs.split(",") if j]
        print(f"measuring {jobs} on threads, 1 worker, 2 workers (1 thread each, pinned); {a.runs} runs + warm-up")
        measured = measure(jobs, a.runs, Path(a.data_dir))
        result["measured"] = measured
        result["machine"]["loadavg_end"] = os.getloadavg()
        print("\nmedians:")
        for job in jobs:
            row = measured[job]
            print(f"  {job}: " + ", ".join(f"{c} {row[c]['median_s']:.2f} s" for c in row)
                  + f"; 2 workers vs 1: x{row['2 workers']['speedup_vs_1_worker']:.2f}")
            for c in ("1 worker", "2 workers"):
                got = row[c].get("bytes_received_per_worker", {})
                print(f"    {c}: received from other workers per run: "
                      + ", ".join(f"{w} {_gib(b)}" for w, b in sorted(got.items())))
        print("  worker peak RSS: " + "; ".join(f"{c}: " + ", ".join(f"{w} {_gib(b)}" for w, b in sorted(v.items()))
                                             for c, v in measured["worker_peak_rss"].items()))
        plot(measured, RESULTS / "scaling.png")
    result["on_paper"] = on_paper()
    name = "scaling-paper.json" if a.paper_only else "scaling.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {RESULTS / name}")


if __name__ == "__main__":
    main()
