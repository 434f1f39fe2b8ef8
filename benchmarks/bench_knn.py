"""Benchmark: exact k-NN and distance matrices, pipeline against its peers.

One command::

    python benchmarks/bench_knn.py                 # K1: CIFAR-10 shape, 50000 x 3072 f32, 1000 queries, k=5
    python benchmarks/bench_knn.py --case seed     # the seed's case: 500 x 5000 x 3072 float64
    python benchmarks/bench_knn.py --case full-distances   # 10000 x 50000 distance matrix -> Zarr

Protocol (MEASURING.md): every run is a fresh process, end to end from files on disk
(imports included); one warm-up round, then the median of ``--runs`` rounds, the tools
alternating inside each round.  Peak memory is the child's ``ru_maxrss`` (from
``os.wait4``) minus that of an idle child that imported the same modules.  GFLOP/s
count 2 m n k per GEMM, against a float32 (or float64) GEMM peak measured in the same
run.  Results go to ``benchmarks/results/knn-<case>.json`` and ``.png``.
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

CASES = {
    "k1": dict(n_train=50000, n_query=1000, d=3072, dtype="float32", k=5,
               tools=["pipeline", "faiss", "sklearn", "numpy"]),
    "seed": dict(n_train=5000, n_query=500, d=3072, dtype="float64", k=5,
                 tools=["pipeline", "faiss", "sklearn", "numpy"]),
    "full-distances": dict(n_train=50000, n_query=10000, d=3072, dtype="float32", k=None,
                           tools=["pipeline-distances"]),
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
    k = case["k"]
    if tool == "pipeline":
        return f"""
            import dask
            import pipeline as pl
            dask.config.set(num_workers={threads})
            dist, ind = pl.kneighbors({paths['test_zarr']!r}, {paths['train_zarr']!r}, {k},
                                      memory_budget={budget!r})
            numpy.save({paths['out']!r}, ind)
        """
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
        return load + f"""
            index = faiss.IndexFlatL2(Y.shape[1])
            index.add(numpy.ascontiguousarray(Y, dtype=numpy.float32))
            dist, ind = index.search(numpy.ascontiguousarray(X, dtype=numpy.float32), {k})
            numpy.save({paths['out']!r}, ind)
        """
    if tool == "sklearn":
        return load + f"""
            nn = sklearn.neighbors.NearestNeighbors(n_neighbors={k}, algorithm="brute").fit(Y)
            dist, ind = nn.kneighbors(X)
            numpy.save({paths['out']!r}, ind)
        """
    if tool == "numpy":
        # The textbook fix of the seed's broadcast: the expansion, in RAM.
        return load + f"""
            D = (X * X).sum(1)[:, None] - 2 * (X @ Y.T) + (Y * Y).sum(1)[None, :]
            part = numpy.argpartition(D, {k} - 1, axis=1)[:, :{k}]
            order = numpy.argsort(numpy.take_along_axis(D, part, 1), axis=1, kind="stable")
            ind = numpy.take_along_axis(part, order, 1)
            numpy.save({paths['out']!r}, ind)
        """
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


def _gemm_peak(dtype, env):
    code = f"""
        import numpy, time
        a = numpy.random.default_rng(0).random((4096, 4096)).astype(numpy.{dtype})
        a @ a
        ts = []
        for _ in range(3):
            t = time.perf_counter(); a @ a; ts.append(time.perf_counter() - t)
        print(2 * 4096**3 / sorted(ts)[1] / 1e9)
    """
    return float([ln for ln in _run(code, env)[2].splitlines() if not ln.startswith("PEAK")][-1])


def _make_data(case, directory):
    """CIFAR-10-shaped data (class patterns + pixel noise, 0..255) as .npy and Zarr."""
    import pipeline as pl

    directory.mkdir(parents=True, exist_ok=True)
    tag = f"{case['n_train']}x{case['n_query']}x{case['d']}-{case['dtype']}"
    paths = {
        "train_npy": str(directory / f"train-{tag}.npy"), "test_npy": str(directory / f"test-{tag}.npy"),
        "train_zarr": str(directory / f"train-{tag}.zarr"), "test_zarr": str(directory / f"test-{tag}.zarr"),
        "out": str(directory / "out-ind.npy"), "out_zarr": str(directory / "out-D.zarr"),
    }
    if all(os.path.exists(paths[p]) for p in ("train_npy", "test_npy", "train_zarr", "test_zarr")):
        return paths
    rng = np.random.default_rng(0)
    d = case["d"]
    templates = rng.uniform(40, 215, size=(10, d))
    for which, n in (("train", case["n_train"]), ("test", case["n_query"])):
        arr = np.lib.format.open_memmap(paths[f"{which}_npy"], mode="w+", dtype=case["dtype"], shape=(n, d))
        labels = rng.integers(0, 10, n)
        for s in range(0, n, 4096):
            e = min(n, s + 4096)
            block = templates[labels[s:e]] + 60 * rng.standard_normal((e - s, d))
            arr[s:e] = np.clip(block, 0, 255)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), default="k1")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--threads", type=int, default=2, help="dask threads of pipeline (BLAS gets cores / threads)")
    ap.add_argument("--tools", help="comma-separated subset of the case's tools")
    ap.add_argument("--data-dir", default=os.environ.get("PIPELINE_BENCH_DATA", "/tmp/pipeline-bench"))
    a = ap.parse_args(argv)
    case = dict(CASES[a.case])
    tools = a.tools.split(",") if a.tools else case["tools"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    paths = _make_data(case, Path(a.data_dir))

    idle = {t: _run("import numpy as _n\n_n.ones((64, 64)) @ _n.ones((64, 64))", env, IMPORTS[t])[1] for t in tools}
    peak_dtype = "float64" if case["dtype"] == "float64" else "float32"
    gemm = []
    times = {t: [] for t in tools}
    cpus = {t: [] for t in tools}
    rss = {t: [] for t in tools}
    for r in range(a.runs + 1):  # round 0 is the warm-up
        gemm.append(_gemm_peak(peak_dtype, env))
        for t in tools:
            wall, peak, _ = _run(_code(t, paths, case, a.budget, a.threads), env, IMPORTS[t])
            if r:
                times[t].append(wall)
                cpus[t].append(_run.cpu)
                rss[t].append(peak - idle[t])
            print(f"  round {r}{' (warm-up)' if not r else ''}: {t:<20} {wall:7.2f} s  cpu {_run.cpu:7.2f} s"
                  f"  +{(peak - idle[t]) / 2**20:7.0f} MiB", flush=True)
            if case["k"] and t != "pipeline-distances":
                ind = np.load(paths["out"])
                if t == tools[0]:
                    ref_ind = ind
                elif ref_ind is not None:
                    agree = float(np.mean(np.sort(ind, 1) == np.sort(ref_ind, 1)))
                    if agree < 1:
                        print(f"    note: {t} agrees with {tools[0]} on {agree:.4%} of the neighbour indices")
    peak = statistics.median(gemm[1:])
    med = {t: statistics.median(times[t]) for t in tools}
    ref = med.get("faiss")
    rows = []
    print(f"\ncase {a.case}: {case['n_query']} queries x {case['n_train']} train x {case['d']} {case['dtype']}"
          f"{', k=' + str(case['k']) if case['k'] else ''}; budget {a.budget}; {a.runs} runs after a warm-up;"
          f" {peak_dtype} GEMM peak {peak:.0f} GFLOP/s (4096^3, same run)")
    print(f"{'tool':<20}{'median s':>10}{'runs':>32}{'vs faiss':>10}{'vs sklearn':>12}{'cpu s':>8}{'peak RSS':>12}{'GFLOP/s':>10}{'% peak':>8}")
    for t in tools:
        gf = _flops(case) / med[t] / 1e9
        row = {"tool": t, "median_s": med[t], "runs_s": times[t], "cpu_s_median": statistics.median(cpus[t]),
               "cpu_s_runs": cpus[t], "peak_rss_above_idle_bytes": max(rss[t]),
               "gflops_end_to_end": gf, "fraction_of_gemm_peak": gf / peak,
               "vs_faiss": med[t] / ref if ref else None,
               "vs_sklearn": med[t] / med["sklearn"] if "sklearn" in med else None,
               # The same rounds side by side: the median of the round-by-round ratios.
               "vs_sklearn_per_round_median": statistics.median(
                   x / y for x, y in zip(times[t], times["sklearn"])) if "sklearn" in med else None,
               "vs_faiss_per_round_median": statistics.median(
                   x / y for x, y in zip(times[t], times["faiss"])) if "faiss" in med else None}
        rows.append(row)
        runs = " ".join(f"{x:.2f}" for x in times[t])
        vf = f"{row['vs_faiss']:.2f}x" if row["vs_faiss"] else "-"
        vs = f"{row['vs_sklearn']:.2f}x" if row["vs_sklearn"] else "-"
        print(f"{t:<20}{med[t]:>10.2f}  {runs:>30}{vf:>10}{vs:>12}{row['cpu_s_median']:>8.2f}"
              f"{max(rss[t]) / 2**20:>9.0f} MiB{gf:>10.0f}{100 * gf / peak:>7.0f}%")
    if "sklearn" in med or "faiss" in med:
        print("median of round-by-round ratios: " + ", ".join(
            f"{r['tool']} {r['vs_faiss_per_round_median'] or 0:.2f}x faiss / {r['vs_sklearn_per_round_median'] or 0:.2f}x sklearn"
            for r in rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"load average at the end: {' '.join(load)} (other processes on these {os.cpu_count()} cores)")
    out = {"case": a.case, "shape": case, "budget": a.budget, "threads": a.threads, "runs": a.runs,
           "loadavg_end": load,
           "gemm_peak_gflops": peak, "gemm_peak_runs": gemm, "results": rows,
           "machine": {"cores": os.cpu_count()}, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (RESULTS / f"knn-{a.case}.json").write_text(json.dumps(out, indent=2))
    _plot(out, RESULTS / f"knn-{a.case}.png")
    print(f"\nsaved {RESULTS / f'knn-{a.case}.json'} and .png")
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
    ax2.bar(names, [r["peak_rss_above_idle_bytes"] / 2**20 for r in rows], color=colors)
    ax2.set_ylabel("peak RSS above idle (MiB)")
    if out.get("budget"):
        from pipeline.budget import parse_budget

        ax2.axhline(parse_budget(out["budget"]) / 2**20, color="k", ls="--", lw=1, label=f"pipeline budget {out['budget']}")
        ax2.legend(loc="upper left", fontsize=8)
    s = out["shape"]
    fig.suptitle(f"{out['case']}: {s['n_query']} x {s['n_train']} x {s['d']} {s['dtype']}"
                 f"{', k=' + str(s['k']) if s['k'] else ''}; medians of {out['runs']} runs"
                 f" (load avg {' '.join(out.get('loadavg_end', []))})", fontsize=10)
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
