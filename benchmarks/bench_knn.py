"""Benchmark: exact k-NN and distance matrices, pipeline against its peers.

One command::

    python benchmarks/bench_knn.py                     # K1: CIFAR-10 shape, 1000 queries x 50000 x 3072 f32, k=5
    python benchmarks/bench_knn.py --case k-full       # the whole CIFAR-10 test set: 10000 x 50000 x 3072 f32, k=5
    python benchmarks/bench_knn.py --case k1-cosine    # K1's shape under cosine distance (1 - cos)
    python benchmarks/bench_knn.py --metric ip         # K1's shape, largest inner products (results knn-k1-ip)
    python benchmarks/bench_knn.py --case seed         # the seed's case: 500 x 5000 x 3072 float64
    python benchmarks/bench_knn.py --case full-distances   # 10000 x 50000 distance matrix -> Zarr

Cases and their tools (``--tools`` picks a subset; the first tool is the reference the
others' neighbours are checked against):

* ``k1``, ``seed`` (Euclidean): pipeline (``pl.kneighbors`` from Zarr), FAISS
  ``IndexFlatL2``, scikit-learn brute force, the NumPy expansion in RAM.
* ``k-full`` (Euclidean): pipeline with a 1 GiB budget against FAISS ``IndexFlatL2``.
  Goals: <= 0.8x FAISS, >= 90% of the float32 GEMM rate at the kernel's own shape.
* ``k1-cosine``: pipeline ``metric="cosine"``, FAISS ``IndexFlatIP`` on
  ``faiss.normalize_L2``-ed copies (the normalisation inside the timed run), scikit-learn
  ``NearestNeighbors(metric="cosine", algorithm="brute")``.  Goals: <= 1.0x FAISS,
  <= 0.5x scikit-learn.  ``--case k1 --metric cosine`` is the same case.
* ``--metric ip`` (any k-NN case, results ``knn-<case>-ip``): pipeline ``metric="ip"``
  against FAISS ``IndexFlatIP`` on the raw vectors; the "distances" are the inner
  products themselves, descending.
* ``full-distances``: ``write_distances`` of the 10000 x 50000 Euclidean matrix to Zarr.

The data are synthetic, CIFAR-10-shaped (ten class patterns plus pixel noise, clipped to
0..255), written once to ``--data-dir`` as .npy (the peers load these) and uncompressed
Zarr (pipeline reads these).  The training set depends only on its own shape, so K1,
k1-cosine and k-full share one.

Protocol (MEASURING.md): every run is a fresh process, end to end from files on disk
(imports included); one warm-up round, then the median of ``--runs`` rounds, the tools
alternating inside each round.  Peak memory is the child's VmHWM minus that of an idle
child that imported the same modules.  GFLOP/s count 2 * n_query * n_train * d, against
float32 (or float64) GEMM rates measured in each round of the same run: 4096^3 (1024^3
in a reduced-size run), and for k-NN cases the kernel's own shape, (query_rows x d) .
(d x step): query_rows from ``pl.plan("knn")``, the step from ``kernels.topk.step_rows``
rounded to whole chunks of the stored training set, as the kernel does (K1 1000 x 3072 x
1364, k-full 10000 x 3072 x 682; ``--gemm-shape`` overrides).

Neighbours: after the rounds each tool's index sets are compared row by row with the
reference's; a row that differs is a tie when the two sets' exact float64 distances
(recomputed here from the .npy files), sorted, are equal, and otherwise it says which
tool missed a strictly closer row.  Each tool's returned distances are also checked
against the exact float64 ones.

Results go to ``benchmarks/results/knn-<case>.json`` and ``.png``.  With ``--n-query``,
``--n-train`` or ``--n-features`` (smoke runs at reduced size) they go to
``<data-dir>/results/`` instead, unless ``--results-dir`` says otherwise, so a smoke
run never overwrites the committed figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Goals are (what, key, <= or >=, target): "vs faiss" and "vs sklearn" are the ratios of
# the medians of pipeline's wall to the peer's, "% gemm" pipeline's GFLOP/s as a fraction
# of the GEMM rate at the kernel's shape, "untied differences" the rows whose neighbours
# differ from a peer's where the k-th distance is not tied.
_SAME_NEIGHBOURS = ("identical neighbours where not tied", "untied", "<=", 0)
CASES = {
    "k1": dict(n_train=50000, n_query=1000, d=3072, dtype="float32", k=5, metric="euclidean",
               tools=["pipeline", "faiss", "sklearn", "numpy"], goals=[]),
    "k1-cosine": dict(n_train=50000, n_query=1000, d=3072, dtype="float32", k=5, metric="cosine",
                      tools=["pipeline", "faiss", "sklearn"],
                      goals=[("<= 1.0x FAISS", "vs_faiss", "<=", 1.0),
                             ("<= 0.5x scikit-learn", "vs_sklearn", "<=", 0.5), _SAME_NEIGHBOURS]),
    "k-full": dict(n_train=50000, n_query=10000, d=3072, dtype="float32", k=5, metric="euclidean",
                   tools=["pipeline", "faiss"],
                   goals=[("<= 0.8x FAISS", "vs_faiss", "<=", 0.8),
                          (">= 90% of the GEMM rate (kernel shape)", "fraction_of_gemm_kernel", ">=", 0.9),
                          _SAME_NEIGHBOURS]),
    "seed": dict(n_train=5000, n_query=500, d=3072, dtype="float64", k=5, metric="euclidean",
                 tools=["pipeline", "faiss", "sklearn", "numpy"], goals=[]),
    "full-distances": dict(n_train=50000, n_query=10000, d=3072, dtype="float32", k=None,
                           metric="euclidean", tools=["pipeline-distances"], goals=[]),
}
# The tools that have each metric.
METRIC_TOOLS = {
    "euclidean": {"pipeline", "faiss", "sklearn", "numpy", "pipeline-distances"},
    "cosine": {"pipeline", "faiss", "sklearn"},
    "ip": {"pipeline", "faiss"},
}

# What each tool's script imports (the idle reference imports the same).  A k-NN
# script needs only pipeline: its graph is built without dask.array.
IMPORTS = {
    "pipeline": "import numpy, pipeline",
    "pipeline-distances": "import numpy, pipeline, dask.array, zarr",
    "faiss": "import numpy, faiss",
    "sklearn": "import numpy, sklearn.neighbors",
    "numpy": "import numpy",
}


def _code(tool, paths, case, budget, threads):
    """The script one run of ``tool`` executes.

    Every k-NN script saves its indices and its distances in the metric's own terms:
    Euclidean distances (FAISS's and NumPy's squares are rooted), cosine distances
    1 - cos, or inner products (descending).
    """
    k, metric = case["k"], case["metric"]
    out = f"""
            numpy.save({paths['out_ind'][tool]!r}, ind)
            numpy.save({paths['out_dist'][tool]!r}, dist)
    """
    if tool == "pipeline":
        # Euclidean is called without metric=, as the API has always been called.
        m = "" if metric == "euclidean" else f", metric={metric!r}"
        return f"""
            import dask
            import pipeline as pl
            dask.config.set(num_workers={threads})
            dist, ind = pl.kneighbors({paths['test_zarr']!r}, {paths['train_zarr']!r}, {k}{m},
                                      memory_budget={budget!r})
        """ + out
    if tool == "pipeline-distances":
        return f"""
            import dask
            import pipeline as pl
            from pipeline.distances import write_distances
            dask.config.set(num_workers={threads})
            write_distances({paths['test_zarr']!r}, {paths['train_zarr']!r}, {paths['out_zarr']!r},
                            metric="euclidean", memory_budget={budget!r}, overwrite=True)
        """
    load = f"""
            Y = numpy.load({paths['train_npy']!r})
            X = numpy.load({paths['test_npy']!r})
    """
    if tool == "faiss":
        if metric == "euclidean":
            search = f"""
            index = faiss.IndexFlatL2(Y.shape[1])
            index.add(numpy.ascontiguousarray(Y, dtype=numpy.float32))
            dist, ind = index.search(numpy.ascontiguousarray(X, dtype=numpy.float32), {k})
            dist = numpy.sqrt(numpy.maximum(dist, 0))
            """
        elif metric == "cosine":
            # Normalised copies (in place on float32, inside the timed run), largest
            # inner products = smallest cosine distances.
            search = f"""
            Y = numpy.ascontiguousarray(Y, dtype=numpy.float32)
            X = numpy.ascontiguousarray(X, dtype=numpy.float32)
            faiss.normalize_L2(Y)
            faiss.normalize_L2(X)
            index = faiss.IndexFlatIP(Y.shape[1])
            index.add(Y)
            sim, ind = index.search(X, {k})
            dist = 1.0 - sim
            """
        else:  # ip
            search = f"""
            index = faiss.IndexFlatIP(Y.shape[1])
            index.add(numpy.ascontiguousarray(Y, dtype=numpy.float32))
            dist, ind = index.search(numpy.ascontiguousarray(X, dtype=numpy.float32), {k})
            """
        return load + search + out
    if tool == "sklearn":
        return load + f"""
            nn = sklearn.neighbors.NearestNeighbors(n_neighbors={k}, algorithm="brute",
                                                    metric={metric!r}).fit(Y)
            dist, ind = nn.kneighbors(X)
        """ + out
    if tool == "numpy":
        # The textbook fix of the seed's broadcast: the expansion, in RAM.
        return load + f"""
            D = (X * X).sum(1)[:, None] - 2 * (X @ Y.T) + (Y * Y).sum(1)[None, :]
            part = numpy.argpartition(D, {k} - 1, axis=1)[:, :{k}]
            order = numpy.argsort(numpy.take_along_axis(D, part, 1), axis=1, kind="stable")
            ind = numpy.take_along_axis(part, order, 1)
            dist = numpy.sqrt(numpy.maximum(numpy.take_along_axis(D, ind, 1), 0))
        """ + out
    raise KeyError(tool)


_PROBE = """
for _line in open("/proc/self/status"):
    if _line.startswith("VmHWM:"):
        print("PEAK", int(_line.split()[1]) * 1024)
"""


def _run(code, env=None, imports=""):
    """Run code in a fresh Python; return (wall seconds, peak RSS bytes, stdout).

    The peak is the child's VmHWM, which starts afresh at exec (``ru_maxrss`` would
    carry over this parent's high-water mark).
    """
    import resource

    src = imports + "\n" + textwrap.dedent(code) + "\n" + _PROBE
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", src], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    peak = int([ln for ln in p.stdout.splitlines() if ln.startswith("PEAK")][-1].split()[1])
    _run.cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, peak, p.stdout


def _gemm_rates(dtype, shapes, env):
    """GFLOP/s of NumPy's GEMM at each ``(m, k, n)`` shape, in one fresh process.

    ``A (m, k) @ B (k, n)`` with ``B`` the transpose of a C-ordered ``(n, k)`` array, as
    the k-NN kernel multiplies queries by a step of training rows; one warm-up product,
    then the median of 3.
    """
    code = f"""
        import numpy, time
        rng = numpy.random.default_rng(0)
        for m, k, n in {[tuple(s) for s in shapes]!r}:
            a = rng.random((m, k), dtype=numpy.float64).astype(numpy.{dtype})
            b = rng.random((n, k), dtype=numpy.float64).astype(numpy.{dtype}).T
            a @ b
            ts = []
            for _ in range(3):
                t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
            print("GEMM", m, k, n, 2 * m * k * n / sorted(ts)[1] / 1e9)
            del a, b
    """
    out = [ln.split() for ln in _run(code, env)[2].splitlines() if ln.startswith("GEMM")]
    return [float(ln[4]) for ln in out]


def _kernel_gemm_shape(case, paths, budget, threads):
    """The k-NN kernel's GEMM: (query_rows x d) . (d x training rows per step).

    ``query_rows`` and the step from the plan for the budget (``plan(...)["step"]``),
    the step rounded to whole Zarr chunks when a chunk is at most two steps, as the
    tasks read them.
    """
    import zarr

    import pipeline as pl

    itemsize = np.dtype(case["dtype"]).itemsize
    p = pl.plan("knn", n_query=case["n_query"], n_train=case["n_train"], n_features=case["d"],
                k=case["k"], itemsize=itemsize, memory_budget=budget, threads=threads)
    q, step = int(p["query_rows"]), int(p["step"])
    chunk = zarr.open_group(paths["train_zarr"], mode="r")["X"].chunks[0]
    if chunk <= 2 * step:
        step = max(1, round(step / chunk)) * chunk
    return (q, case["d"], min(case["n_train"], step))


def _make_data(case, directory):
    """CIFAR-10-shaped data (class patterns + pixel noise, 0..255) as .npy and Zarr.

    One generator draws the class patterns, then the training set, then the queries, so
    a training set depends only on its own shape (K1 and k-full share theirs) and the
    queries on both shapes; a missing query set replays the training draws.
    """
    import pipeline as pl

    directory.mkdir(parents=True, exist_ok=True)
    n_t, n_q, d, dt = case["n_train"], case["n_query"], case["d"], case["dtype"]
    tags = {"train": f"{n_t}x{d}-{dt}", "test": f"{n_q}x{d}-{dt}-for-{n_t}"}
    paths = {}
    for which in ("train", "test"):
        paths[f"{which}_npy"] = str(directory / f"{which}-{tags[which]}.npy")
        paths[f"{which}_zarr"] = str(directory / f"{which}-{tags[which]}.zarr")
    paths["out_zarr"] = str(directory / "out-D.zarr")
    paths["out_ind"] = {t: str(directory / f"out-{t}-ind.npy") for t in METRIC_TOOLS["euclidean"]}
    paths["out_dist"] = {t: str(directory / f"out-{t}-dist.npy") for t in METRIC_TOOLS["euclidean"]}
    have = {w: os.path.exists(paths[f"{w}_npy"]) and os.path.exists(paths[f"{w}_zarr"]) for w in ("train", "test")}
    if all(have.values()):
        return paths
    rng = np.random.default_rng(0)
    templates = rng.uniform(40, 215, size=(10, d))
    for which, n in (("train", n_t), ("test", n_q)):
        write = not have[which]
        arr = np.lib.format.open_memmap(paths[f"{which}_npy"], mode="w+", dtype=dt, shape=(n, d)) if write else None
        labels = rng.integers(0, 10, n)
        for s in range(0, n, 4096):
            e = min(n, s + 4096)
            block = templates[labels[s:e]] + 60 * rng.standard_normal((e - s, d))
            if write:
                arr[s:e] = np.clip(block, 0, 255)
        if not write:
            continue
        arr.flush()
        del arr
        np.save(paths[f"{which}_npy"].replace(".npy", "-labels.npy"), labels)
        pl.ingest(paths[f"{which}_npy"], paths[f"{which}_zarr"],
                  labels=paths[f"{which}_npy"].replace(".npy", "-labels.npy"),
                  compressor="none", overwrite=True)
    return paths


def _flops(case):
    n_t, n_q, d = case["n_train"], case["n_query"], case["d"]
    return 2.0 * n_t * n_q * d


# ------------------------------------------------------------ neighbours

def _exact(metric, X, Y, rows, cols):
    """Exact float64 distances (cosine: 1 - cos; ip: x.y) of ``X[rows[i]]`` to ``Y[cols[i]]``."""
    res = np.empty(cols.shape, np.float64)
    for s in range(0, len(rows), 256):
        r, c = rows[s:s + 256], cols[s:s + 256]
        x = np.asarray(X[r], np.float64)
        order = np.argsort(c, axis=None)  # sorted reads from the memory map
        flat = np.empty((c.size, x.shape[1]), np.float64)
        flat[order] = Y[c.ravel()[order]]
        y = flat.reshape(c.shape + (x.shape[1],))
        if metric == "euclidean":
            res[s:s + 256] = np.sqrt(((y - x[:, None, :]) ** 2).sum(-1))
        else:
            dot = np.einsum("rmd,rd->rm", y, x)
            if metric == "ip":
                res[s:s + 256] = dot
            else:
                res[s:s + 256] = 1.0 - dot / (np.linalg.norm(y, axis=-1) * np.linalg.norm(x, axis=-1)[:, None])
    return res


def _check_neighbours(case, paths, tools):
    """Per tool: its distances against exact float64 ones, and its index sets against the first tool's.

    A row whose index set differs from the reference's is *tied* when the two sets'
    exact float64 distances, sorted, are equal (they differ only among rows tied at the
    k-th distance); otherwise the sorted distances say which tool missed a strictly
    closer row (farther, for ip).
    """
    metric, k = case["metric"], case["k"]
    X = np.load(paths["test_npy"], mmap_mode="r")
    Y = np.load(paths["train_npy"], mmap_mode="r")
    sign = -1.0 if metric == "ip" else 1.0  # ascending key
    ind = {t: np.load(paths["out_ind"][t]).astype(np.int64) for t in tools}
    ref = tools[0]
    report = {}
    for t in tools:
        dist = np.load(paths["out_dist"][t]).astype(np.float64)
        rows = np.arange(ind[t].shape[0])
        exact = _exact(metric, X, Y, rows, ind[t])
        srt = np.sort(ind[t], 1)
        r = {"reference": ref, "rows": int(len(rows)),
             "distance_max_abs_error": float(np.max(np.abs(dist - exact))),
             "distance_max_rel_error": float(np.max(np.abs(dist - exact) / np.maximum(np.abs(exact), 1e-300))),
             "distances_in_order": bool(np.all(np.diff(sign * dist, axis=1) >= 0)),
             "rows_with_a_repeated_index": int(np.sum(np.any(np.diff(srt, axis=1) == 0, axis=1)))}
        if t != ref:
            differ = np.flatnonzero(np.any(srt != np.sort(ind[ref], 1), axis=1))
            both = np.concatenate([ind[ref][differ], ind[t][differ]], axis=1)
            e = sign * _exact(metric, X, Y, differ, both)
            a, b = np.sort(e[:, :k], 1), np.sort(e[:, k:], 1)
            tied = np.all(a == b, axis=1)
            untied = differ[~tied]
            r.update(rows_differ=int(differ.size), rows_tied=int(tied.sum()), rows_untied=int(untied.size),
                     rows_reference_missed_closer=int(np.any(a > b, axis=1).sum()),
                     rows_tool_missed_closer=int(np.any(b > a, axis=1).sum()),
                     untied_examples=[{"row": int(i), "reference_ind": ind[ref][i].tolist(), "tool_ind": ind[t][i].tolist(),
                                       "reference_exact": (sign * a[j]).tolist(), "tool_exact": (sign * b[j]).tolist()}
                                      for j, i in enumerate(differ) if not tied[j]][:5])
        report[t] = r
    return report


# ------------------------------------------------------------------ main

def _parse_shape(s):
    try:
        m, k, n = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not MxKxN") from None
    return (m, k, n)


def _goal_value(key, row, agreement):
    if key == "untied":
        return sum(r.get("rows_untied", 0) for r in agreement.values()) if agreement else None
    return row.get(key)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_knn.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), default="k1", help="the job (default k1)")
    ap.add_argument("--metric", choices=sorted(METRIC_TOOLS),
                    help="override the case's metric (k-NN cases); the results are named "
                         "knn-<case>-<metric> (k1 + cosine is the k1-cosine case)")
    ap.add_argument("--runs", type=int, default=3, help="measured rounds after the warm-up (default 3)")
    ap.add_argument("--budget", default="1GiB", help="pipeline's memory_budget (default 1GiB)")
    ap.add_argument("--threads", type=int, default=2, help="dask threads of pipeline (BLAS gets cores / threads)")
    ap.add_argument("--tools", help="comma-separated subset of the case's tools; the first is the reference")
    ap.add_argument("--n-query", type=int, help="override the case's query rows (smoke runs)")
    ap.add_argument("--n-train", type=int, help="override the case's training rows (smoke runs)")
    ap.add_argument("--n-features", type=int, help="override the case's features d (smoke runs)")
    ap.add_argument("--gemm-shape", type=_parse_shape, metavar="MxKxN",
                    help="the kernel-shape GEMM to measure (default: query_rows x d x step from pl.plan)")
    ap.add_argument("--data-dir", default=os.environ.get("PIPELINE_BENCH_DATA", "/tmp/pipeline-bench"),
                    help="where the data sets are written once (default $PIPELINE_BENCH_DATA or /tmp/pipeline-bench)")
    ap.add_argument("--results-dir", help="where knn-<case>.json/.png go (default benchmarks/results, "
                                          "or <data-dir>/results when a size is overridden)")
    a = ap.parse_args(argv)
    name, case = a.case, dict(CASES[a.case])
    if a.metric and a.metric != case["metric"]:
        if case["k"] is None:
            ap.error(f"--case {a.case} has no --metric")
        base = name.split("-")[0] if name == "k1-cosine" else name
        name = f"{base}-{a.metric}" if a.metric != "euclidean" else base
        if name in CASES:
            case = dict(CASES[name])
        else:
            case.update(metric=a.metric, goals=[g for g in case["goals"] if g[1] == "untied"],
                        tools=[t for t in case["tools"] if t in METRIC_TOOLS[a.metric]])
    goals = case.pop("goals")
    tools = a.tools.split(",") if a.tools else case["tools"]
    bad = [t for t in tools if t not in METRIC_TOOLS[case["metric"]] or t not in IMPORTS]
    if bad:
        ap.error(f"tools {bad} do not run metric {case['metric']!r} here; this case has {case['tools']}")
    reduced = False
    for key, v in (("n_query", a.n_query), ("n_train", a.n_train), ("d", a.n_features)):
        if v is not None and v != case[key]:
            case[key], reduced = v, True
    results = Path(a.results_dir) if a.results_dir else (Path(a.data_dir) / "results" if reduced else RESULTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    paths = _make_data(case, Path(a.data_dir))

    peak_dtype = "float64" if case["dtype"] == "float64" else "float32"
    # The square GEMM: 4096^3, 1024^3 in a reduced-size (smoke) run to keep it light.
    sq = 1024 if reduced else 4096
    shapes = [(sq, sq, sq)]
    if case["k"]:
        shapes.append(a.gemm_shape or _kernel_gemm_shape(case, paths, a.budget, a.threads))
    idle = {t: _run("import numpy as _n\n_n.ones((64, 64)) @ _n.ones((64, 64))", env, IMPORTS[t])[1] for t in tools}
    gemm = []
    times = {t: [] for t in tools}
    cpus = {t: [] for t in tools}
    rss = {t: [] for t in tools}
    for r in range(a.runs + 1):  # round 0 is the warm-up
        gemm.append(_gemm_rates(peak_dtype, shapes, env))
        print(f"  round {r}: {peak_dtype} GEMM " + ", ".join(
            f"{'x'.join(map(str, s))} {g:.0f} GFLOP/s" for s, g in zip(shapes, gemm[-1])), flush=True)
        for t in tools:
            wall, peak, _ = _run(_code(t, paths, case, a.budget, a.threads), env, IMPORTS[t])
            if r:
                times[t].append(wall)
                cpus[t].append(_run.cpu)
                rss[t].append(peak - idle[t])
            print(f"  round {r}{' (warm-up)' if not r else ''}: {t:<20} {wall:7.2f} s  cpu {_run.cpu:7.2f} s"
                  f"  +{(peak - idle[t]) / 2**20:7.0f} MiB", flush=True)
    agreement = _check_neighbours(case, paths, tools) if case["k"] else {}
    peak = statistics.median(g[0] for g in gemm[1:])
    kernel = statistics.median(g[1] for g in gemm[1:]) if len(shapes) > 1 else None
    med = {t: statistics.median(times[t]) for t in tools}
    ref = med.get("faiss")
    rows = []
    print(f"\ncase {name}: {case['n_query']} queries x {case['n_train']} train x {case['d']} {case['dtype']}"
          f"{', k=' + str(case['k']) + ', ' + case['metric'] if case['k'] else ''}; budget {a.budget};"
          f" {a.runs} runs after a warm-up{'; REDUCED SIZE (smoke run)' if reduced else ''}")
    print(f"{peak_dtype} GEMM, same run (medians): {sq}^3 {peak:.0f} GFLOP/s"
          + (f"; kernel shape {'x'.join(map(str, shapes[1]))} {kernel:.0f} GFLOP/s" if kernel else "")
          + f"; floor of this job at the {'kernel-shape' if kernel else f'{sq}^3'} rate"
          f" {_flops(case) / ((kernel or peak) * 1e9):.2f} s")
    print(f"{'tool':<20}{'median s':>10}{'runs':>32}{'vs faiss':>10}{'vs sklearn':>12}{'cpu s':>8}{'peak RSS':>12}"
          f"{'GFLOP/s':>9}{'%kernel':>8}{f'%{sq}^3':>8}")
    for t in tools:
        gf = _flops(case) / med[t] / 1e9
        row = {"tool": t, "median_s": med[t], "runs_s": times[t], "cpu_s_median": statistics.median(cpus[t]),
               "cpu_s_runs": cpus[t], "peak_rss_above_idle_bytes": max(rss[t]),
               "gflops_end_to_end": gf, "fraction_of_gemm_peak": gf / peak,
               "fraction_of_gemm_kernel": gf / kernel if kernel else None,
               "vs_faiss": med[t] / ref if ref else None,
               "vs_sklearn": med[t] / med["sklearn"] if "sklearn" in med else None,
               # The same rounds side by side: the median of the round-by-round ratios.
               "vs_sklearn_per_round_median": statistics.median(
                   x / y for x, y in zip(times[t], times["sklearn"])) if "sklearn" in med else None,
               "vs_faiss_per_round_median": statistics.median(
                   x / y for x, y in zip(times[t], times["faiss"])) if "faiss" in med else None,
               "neighbours": agreement.get(t)}
        rows.append(row)
        runs = " ".join(f"{x:.2f}" for x in times[t])
        vf = f"{row['vs_faiss']:.2f}x" if row["vs_faiss"] else "-"
        vs = f"{row['vs_sklearn']:.2f}x" if row["vs_sklearn"] else "-"
        pk = f"{100 * gf / kernel:.0f}%" if kernel else "-"
        print(f"{t:<20}{med[t]:>10.2f}  {runs:>30}{vf:>10}{vs:>12}{row['cpu_s_median']:>8.2f}"
              f"{max(rss[t]) / 2**20:>9.0f} MiB{gf:>9.0f}{pk:>8}{100 * gf / peak:>7.0f}%")
    if "sklearn" in med or "faiss" in med:
        print("median of round-by-round ratios: " + ", ".join(
            f"{r['tool']} " + " / ".join(f"{r[f'vs_{p}_per_round_median']:.2f}x {p}" for p in ("faiss", "sklearn")
                                         if r[f"vs_{p}_per_round_median"] is not None)
            for r in rows))
    if agreement:
        print(f"neighbours against {tools[0]} (index sets per row; ties by exact float64 {case['metric']} distances):")
        for t, g in agreement.items():
            line = (f"  {t:<12} distances vs exact float64: max abs err {g['distance_max_abs_error']:.3g},"
                    f" max rel err {g['distance_max_rel_error']:.3g}, in order {g['distances_in_order']}")
            if g["rows_with_a_repeated_index"]:
                line += f", {g['rows_with_a_repeated_index']} rows repeat an index"
            if t != tools[0]:
                line += (f"; rows differing {g['rows_differ']} of {g['rows']}: tied {g['rows_tied']},"
                         f" untied {g['rows_untied']} ({tools[0]} missed a closer row in"
                         f" {g['rows_reference_missed_closer']}, {t} in {g['rows_tool_missed_closer']})")
            print(line)
    goal_rows = []
    pipe = next((r for r in rows if r["tool"] == "pipeline"), None)
    if goals:
        print("goals:")
    for what, key, op, target in goals:
        value = _goal_value(key, pipe, agreement) if pipe and (key != "untied" or len(agreement) > 1) else None
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        goal_rows.append({"goal": what, "key": key, "op": op, "target": target, "value": value, "met": met})
        shown = "not measured (pipeline not in this run)" if value is None else (
            f"{100 * value:.0f}%" if key.startswith("fraction") else f"{value:.3g}")
        print(f"  {what:<42} {shown:<12} {'' if met is None else ('met' if met else 'NOT met')}")
    results.mkdir(parents=True, exist_ok=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"load average at the end: {' '.join(load)} (other processes on these {os.cpu_count()} cores)")
    out = {"case": name, "shape": case, "budget": a.budget, "threads": a.threads, "runs": a.runs,
           "reduced_size": reduced, "loadavg_end": load,
           "gemm_peak_shape": list(shapes[0]), "gemm_peak_gflops": peak, "gemm_peak_runs": [g[0] for g in gemm],
           "gemm_kernel_shape": list(shapes[1]) if kernel else None, "gemm_kernel_gflops": kernel,
           "gemm_kernel_runs": [g[1] for g in gemm] if kernel else None,
           "results": rows, "goals": goal_rows,
           "machine": {"cores": os.cpu_count()}, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (results / f"knn-{name}.json").write_text(json.dumps(out, indent=2))
    _plot(out, results / f"knn-{name}.png")
    print(f"\nsaved {results / f'knn-{name}.json'} and .png")
    return 0


# ----------------------------------------------------------------- plots
# matplotlib when installed (the "bench" extra); else a bar chart drawn with NumPy and zlib
# (bars and numbers only).

_FONT = {
    "0": "01110100011001110101110011000101110", "1": "00100011000010000100001000010001110",
    "2": "01110100010000100010001000100011111", "3": "11110000010000101110000010000111110",
    "4": "00010001100101010010111110001000010", "5": "11111100001111000001000011000101110",
    "6": "00110010001000011110100011000101110", "7": "11111000010001000100010000100001000",
    "8": "01110100011000101110100011000101110", "9": "01110100011000101111000010001001100",
    ".": "00000000000000000000000000110001100", "s": "00000000000111010000011100000111110",
    "x": "00000000001000101010001000101010001", " ": "0" * 35, "-": "00000000000000011111000000000000000",
}
for _c in "abcdefghijklmnopqrtuvwyz%/()GFLOPMiB:":
    _FONT.setdefault(_c, "11111100011000110001100011000111111")


def _text(img, x, y, s, color, scale=2):
    for ch in s:
        bits = _FONT.get(ch, _FONT[" "])
        for i, b in enumerate(bits):
            if b == "1":
                r, c = divmod(i, 5)
                img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 6 * scale


def _plot(out, path):
    try:
        import matplotlib
    except ImportError:
        return _plot_raw(out, path)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["tool"] for r in rows]
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"][:len(rows)]
    ax1.bar(names, [r["median_s"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax1.text(i, r["median_s"], f"{r['median_s']:.2f} s", ha="center", va="bottom", fontsize=9)
    ax1.set_ylabel("wall time, median (s), end to end from disk")
    rate = out.get("gemm_kernel_gflops") or out.get("gemm_peak_gflops")
    if rate:
        s = out["shape"]
        floor = 2.0 * s["n_query"] * s["n_train"] * s["d"] / (rate * 1e9)
        ax1.axhline(floor, color="k", ls=":", lw=1, label=f"GEMM floor at {rate:.0f} GFLOP/s (same run)")
        ax1.set_ylim(0, max(r["median_s"] for r in rows) * 1.25)
        ax1.legend(loc="upper right", fontsize=8)
    ax2.bar(names, [r["peak_rss_above_idle_bytes"] / 2**20 for r in rows], color=colors)
    ax2.set_ylabel("peak RSS above idle (MiB)")
    if out.get("budget"):
        from pipeline.budget import parse_budget

        ax2.axhline(parse_budget(out["budget"]) / 2**20, color="k", ls="--", lw=1, label=f"pipeline budget {out['budget']}")
        ax2.legend(loc="upper left", fontsize=8)
    s = out["shape"]
    fig.suptitle(f"{out['case']}: {s['n_query']} x {s['n_train']} x {s['d']} {s['dtype']}"
                 f"{', k=' + str(s['k']) + ', ' + s.get('metric', 'euclidean') if s['k'] else ''}; medians of {out['runs']} runs"
                 f" (load avg {' '.join(out.get('loadavg_end', []))})"
                 f"{'; REDUCED SIZE' if out.get('reduced_size') else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_raw(out, path):
    import struct
    import zlib

    rows = out["results"]
    W, H = 640, 360
    img = np.full((H, W, 3), 255, np.uint8)
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    top = max(r["median_s"] for r in rows) * 1.15
    base, left, bw = H - 60, 60, (W - 100) // max(1, len(rows))
    img[base:base + 2, left - 10:W - 20] = 0
    for i, r in enumerate(rows):
        h = int((base - 30) * r["median_s"] / top)
        x0 = left + i * bw + bw // 6
        img[base - h:base, x0:x0 + bw * 2 // 3] = colors[i % len(colors)]
        _text(img, x0, base - h - 18, f"{r['median_s']:.2f}s", (0, 0, 0))
        _text(img, x0, base + 10, r["tool"][:10].replace("pipeline-distances", "pipeline"), colors[i % len(colors)])
        _text(img, x0, base + 30, f"{r['peak_rss_above_idle_bytes'] / 2**20:.0f}", (90, 90, 90))
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(H))

    def chunk(tag, data):
        c = struct.pack(">I", len(data)) + tag + data
        return c + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


if __name__ == "__main__":
    sys.exit(main())
