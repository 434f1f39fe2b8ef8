"""The ``pipeline`` command line: parse, call the public API, print.

Exit status 0 on success, 2 for bad input or usage (one line naming what is wrong and
what would be right), 1 for a failure while running.  No tracebacks unless
``PIPELINE_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from .errors import InputError, PipelineError

#: kernels.covariances.COVARIANCE_TYPES, spelled out: parsing arguments imports no NumPy.
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
#: kernels.distances.METRICS, spelled out likewise.
METRICS = ("euclidean", "sqeuclidean", "cosine", "ip", "manhattan")
_METRIC_HELP = ("euclidean (default), sqeuclidean, cosine (1 - cos; a zero row is at 1 from every row), ip (inner "
                "products, largest first) or manhattan (L1)")

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit status 2."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _common(p):
    g = p.add_argument_group("where and how it runs")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help="most memory the job may add per process, e.g. 1GiB (default: "
                        "dask config pipeline.memory-budget, else a quarter of free RAM)")
    g.add_argument("--scheduler", default="threads", metavar="threads|local|tcp://HOST:PORT",
                   help="threads (default, in-process), local (a LocalCluster with a "
                        "dashboard) or the address of a running dask scheduler")
    g.add_argument("--workers", type=_positive_int, metavar="N", help="worker processes for --scheduler local")
    g.add_argument("--threads-per-worker", type=_positive_int, metavar="T",
                   help="threads per worker (local) or dask threads (threads)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")
    g.add_argument("--report", metavar="FILE.html",
                   help="write a dask performance report of the job (needs --scheduler local or an address)")
    t = p.add_argument_group("TLS (for --scheduler tls://HOST:PORT; default: dask config distributed.comm.tls.*)")
    t.add_argument("--tls-ca-file", metavar="CA.pem", help="certificate of the cluster's CA")
    t.add_argument("--tls-cert", metavar="CERT.pem", help="this client's certificate")
    t.add_argument("--tls-key", metavar="KEY.pem", help="this client's private key (if not in --tls-cert)")


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def build_parser():
    p = _Parser(prog="pipeline", description=(
        "Out-of-core distances, exact k-NN and Gaussian-mixture EM on Dask + Zarr, "
        "inside a memory budget."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    gen = sub.add_parser("generate", help="generate a synthetic dataset chunk by chunk")
    gsub = gen.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
    gsub.required = True
    b = gsub.add_parser("blobs", help="Gaussian blobs (float), labels = blob")
    b.add_argument("out", metavar="OUT")
    b.add_argument("--n-samples", type=_positive_int, required=True)
    b.add_argument("--n-features", type=_positive_int, required=True)
    b.add_argument("--centers", type=_positive_int, default=8)
    b.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    b.add_argument("--seed", type=_int, default=0)
    b.add_argument("--chunk-rows", type=_positive_int)
    _common(b)
    c = gsub.add_parser("cifar-like", help="CIFAR-10-shaped uint8 images with 10 classes")
    c.add_argument("out", metavar="OUT")
    c.add_argument("--n-samples", type=_positive_int, default=5000)
    c.add_argument("--n-features", type=_positive_int, default=3072)
    c.add_argument("--classes", type=_positive_int, default=10)
    c.add_argument("--seed", type=_int, default=0)
    c.add_argument("--chunk-rows", type=_positive_int)
    _common(c)

    i = sub.add_parser("ingest", help="stream a .npy file into a dataset")
    i.add_argument("src", metavar="SRC.npy")
    i.add_argument("out", metavar="OUT")
    i.add_argument("--labels", metavar="LABELS.npy")
    i.add_argument("--chunk-rows", type=_positive_int)
    _common(i)

    inf = sub.add_parser("info", help="describe a dataset or result")
    inf.add_argument("dataset", metavar="DATASET")

    pl = sub.add_parser("plan", help="print the chunk plan and predicted peak memory")
    psub = pl.add_subparsers(dest="op", metavar="OP", parser_class=_Parser)
    psub.required = True
    for op, names in (("distances", ("QUERY", "TRAIN")), ("knn", ("QUERY", "TRAIN")), ("gmm", ("DATA",))):
        q = psub.add_parser(op, help=f"plan {op}: from datasets, or from shapes")
        for n in names:
            q.add_argument(n.lower(), metavar=n, nargs="?")
        if op == "gmm":
            q.add_argument("--n-samples", type=_positive_int)
            q.add_argument("--n-components", type=_positive_int, default=1)
            q.add_argument("--covariance-type", choices=COVARIANCE_TYPES, default="full")
        else:
            q.add_argument("--n-query", type=_positive_int)
            q.add_argument("--n-train", type=_positive_int)
        if op == "knn":
            q.add_argument("--k", type=_positive_int, default=5)
            q.add_argument("--metric", choices=METRICS, default="euclidean",
                           help="manhattan is planned in float64 steps (exact L1); the others as the data")
        q.add_argument("--n-features", type=_positive_int)
        q.add_argument("--dtype", choices=["uint8", "float32", "float64"])
        _common(q)

    d = sub.add_parser("distances", help="write the distance matrix between two datasets")
    d.add_argument("query", metavar="QUERY")
    d.add_argument("train", metavar="TRAIN")
    d.add_argument("out", metavar="OUT")
    d.add_argument("--metric", choices=METRICS, default="euclidean", help=_METRIC_HELP)
    _common(d)

    k = sub.add_parser("knn", help="exact k nearest neighbours (and their vote)")
    k.add_argument("query", metavar="QUERY")
    k.add_argument("train", metavar="TRAIN")
    k.add_argument("out", metavar="OUT")
    k.add_argument("--k", type=_int, default=5)
    k.add_argument("--weights", choices=["uniform", "distance"], default="uniform")
    k.add_argument("--metric", choices=METRICS, default="euclidean", help=_METRIC_HELP)
    k.add_argument("--graph", choices=["connectivity", "distance"], default=None,
                   help="also write the k-NN graph in CSR form (graph_data, graph_indices, graph_indptr; "
                        "pl.load_graph reads it): entries 1, or the distances")
    k.add_argument("--piece-rows", type=_positive_int, default=None,
                   help="queries per resumable piece (each reads TRAIN once; at most the plan's query block); "
                        "default: at least 2048, at most 8 pieces")
    _common(k)

    g = sub.add_parser("gmm", help="Gaussian-mixture EM: fit, predict")
    gs = g.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    gs.required = True
    f = gs.add_parser("fit", help="fit a Gaussian mixture, saving each iteration")
    f.add_argument("data", metavar="DATA")
    f.add_argument("model", metavar="MODEL")
    f.add_argument("--n-components", type=_int, default=1)
    f.add_argument("--covariance-type", choices=COVARIANCE_TYPES, default="full",
                   help="full: one d x d covariance per component; tied: one shared; diag: per-component "
                        "variances; spherical: one variance per component (default full)")
    f.add_argument("--max-iter", type=_int, default=100)
    f.add_argument("--tol", type=float, default=1e-3)
    f.add_argument("--reg-covar", type=float, default=1e-6)
    f.add_argument("--init", choices=["kmeans", "k-means++", "random", "random_from_data"], default="kmeans")
    f.add_argument("--seed", type=_int, default=0)
    _common(f)
    pr = gs.add_parser("predict", help="label a dataset with a fitted model")
    pr.add_argument("model", metavar="MODEL")
    pr.add_argument("data", metavar="DATA")
    pr.add_argument("out", metavar="OUT")
    _common(pr)

    r = sub.add_parser("run", help="run a YAML job file's steps in order (see README, Batch runs)")
    r.add_argument("job", metavar="JOB.yaml")
    r.add_argument("--check", action="store_true", help="check the job file only; run nothing")
    r.add_argument("--memory-budget", metavar="SIZE", help="overrides the job file's memory_budget")
    r.add_argument("--scheduler", metavar="threads|local|tcp://HOST:PORT",
                   help="overrides the job file's scheduler")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")

    dm = sub.add_parser("demo", help="the main job, small, end to end")
    dm.add_argument("--dir", default="pipeline-demo", help="where the demo's stores go (default ./pipeline-demo)")
    dm.add_argument("--n-train", type=_positive_int, default=5000)
    dm.add_argument("--n-test", type=_positive_int, default=500)
    _common(dm)
    dm.set_defaults(memory_budget="512MiB", overwrite=True)
    return p


# ---------------------------------------------------------------------- handlers

def _say(*lines):
    for line in lines:
        print(line, flush=True)


def _run_generate(a):
    from . import store

    if a.kind == "blobs":
        ds = store.make_blobs(a.out, a.n_samples, a.n_features, centers=a.centers, dtype=a.dtype,
                                random_state=a.seed, chunk_rows=a.chunk_rows,
                                overwrite=a.overwrite, memory_budget=a.memory_budget)
    else:
        ds = store.make_cifar_like(a.out, a.n_samples, a.n_features, n_classes=a.classes,
                                     random_state=a.seed, chunk_rows=a.chunk_rows,
                                     overwrite=a.overwrite, memory_budget=a.memory_budget)
    _say(f"wrote {ds!r}")


def _run_ingest(a):
    from .store.ingest import ingest

    ds = ingest(a.src, a.out, labels=a.labels, chunk_rows=a.chunk_rows,
                        overwrite=a.overwrite, memory_budget=a.memory_budget)
    _say(f"wrote {ds!r}")


def _describe(url):
    import zarr

    from .sizes import format_bytes
    from .store.urls import open_group

    g = open_group(url, what="store")
    attrs = dict(g.attrs.get("pipeline", {}))
    kind = attrs.get("kind", "dataset")
    lines = [f"{url}: {kind}, format {attrs.get('format', '?')}, "
             f"{'complete' if attrs.get('complete') else 'INCOMPLETE'}"]
    for name, arr in g.arrays():
        codecs = [type(c).__name__ for c in arr.compressors] if isinstance(arr, zarr.Array) else []
        stored = arr.nbytes_stored() if hasattr(arr, "nbytes_stored") else None
        lines.append(
            f"  {name}: shape {arr.shape} {arr.dtype}, chunks {arr.chunks}, "
            f"{'+'.join(codecs) or 'uncompressed'}, {format_bytes(arr.nbytes)}"
            + (f" ({format_bytes(stored)} stored)" if stored else "")
        )
    for key, value in attrs.items():
        if key not in ("format", "kind", "complete", "job", "history"):
            lines.append(f"  {key}: {value}")
    return lines


def _run_info(a):
    _say(*_describe(a.dataset))


def _shape_of(url):
    from .store import open_dataset

    ds = open_dataset(url)
    return ds.n_samples, ds.n_features, ds.X.dtype


def _run_plan(a):
    import numpy as np

    from .budget import plan

    itemsize = np.dtype(a.dtype).itemsize if a.dtype else None
    if a.op == "gmm":
        n, d, dt = _shape_of(a.data) if a.data else (a.n_samples, a.n_features, None)
        if not (n and d):
            raise InputError("plan gmm needs DATA or --n-samples and --n-features")
        p = plan("gmm", n_samples=n, n_features=a.n_features or d, n_components=a.n_components,
                 covariance_type=a.covariance_type, itemsize=itemsize or (dt.itemsize if dt is not None else 8),
                 memory_budget=a.memory_budget, threads=_plan_threads(a), workers=a.workers or 1)
        if p["sharded"]:
            from .budget import sharded_report
            from .runtime.rates import gemm_rate

            d = p.shape["n_features"]
            _say(p.explain())
            # The E-step GEMM's shape, capped at 2048 (the rate is flat beyond: a quick measurement).
            _say(sharded_report(p, gemm_rate(min(p["rows"], 2048), min(d + 1, 2048), min(d, 2048))))
            return
    else:
        nq = nt = d = None
        dt = None
        if a.query:
            nq, d, dt = _shape_of(a.query)
        if a.train:
            nt, d2, dt2 = _shape_of(a.train)
            d, dt = d or d2, dt or dt2
        nq, nt, d = a.n_query or nq, a.n_train or nt, a.n_features or d
        if not (nq and nt and d):
            raise InputError(f"plan {a.op} needs QUERY and TRAIN, or --n-query, --n-train and --n-features")
        size = itemsize or (dt.itemsize if dt is not None else 4)
        if a.op == "knn":
            # From a TRAIN store the tasks read their steps (as `pipeline knn` plans); from
            # shapes alone the plan holds whole training blocks, as for a dask array.
            p = plan("knn", n_query=nq, n_train=nt, n_features=d, k=a.k,
                     itemsize=8 if a.metric == "manhattan" else size,
                     memory_budget=a.memory_budget, threads=_plan_threads(a), train_held=not a.train)
        else:
            p = plan("distances", n_x=nq, n_y=nt, n_features=d, itemsize=size,
                     memory_budget=a.memory_budget, threads=_plan_threads(a))
    _say(p.explain())


def _plan_threads(a):
    from .runtime import cores

    if a.scheduler == "local" and not a.threads_per_worker:
        return max(1, cores() // (a.workers or cores()))
    return a.threads_per_worker or None


def _print_summary(summary):
    for key, value in summary.items():
        _say(f"{key}: {value}")


def _run_distances(a):
    from .distances import write_distances

    _print_summary(write_distances(a.query, a.train, a.out, metric=a.metric,
                                   memory_budget=a.memory_budget, overwrite=a.overwrite))


def _run_knn(a):
    from .neighbors import write_knn

    _print_summary(write_knn(a.query, a.train, a.out, k=a.k, weights=a.weights, metric=a.metric, graph=a.graph,
                             memory_budget=a.memory_budget, overwrite=a.overwrite, piece_rows=a.piece_rows))


def _run_gmm(a):
    from . import mixture

    if a.action == "fit":
        summary = mixture.fit_to_store(
            a.data, a.model, n_components=a.n_components, covariance_type=a.covariance_type,
            max_iter=a.max_iter, tol=a.tol,
            reg_covar=a.reg_covar, init_params=a.init, random_state=a.seed,
            memory_budget=a.memory_budget, overwrite=a.overwrite)
    else:
        summary = mixture.predict_to_store(a.model, a.data, a.out, memory_budget=a.memory_budget,
                                           overwrite=a.overwrite)
    _print_summary(summary)


def _run_job(a):
    from .jobs import run_job

    start = time.perf_counter()
    run_job(a.job, memory_budget=a.memory_budget, scheduler=a.scheduler, progress=a.progress,
            check_only=a.check, echo=_say)
    if not a.check:
        print(f"job done in {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)


def _run_demo(a):
    from .demo import run_demo

    run_demo(a.dir, n_train=a.n_train, n_test=a.n_test, memory_budget=a.memory_budget)


_HANDLERS = {"generate": _run_generate, "ingest": _run_ingest, "info": _run_info,
             "plan": _run_plan, "distances": _run_distances, "knn": _run_knn,
             "gmm": _run_gmm, "demo": _run_demo, "run": _run_job}


def _peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    """Run the command line; return the exit status."""
    debug = os.environ.get("PIPELINE_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        runs_work = args.command not in ("info", "plan", "run")  # run connects per its job file
        if getattr(args, "memory_budget", None) is not None:
            from .sizes import parse_budget

            parse_budget(args.memory_budget, name="--memory-budget")
        if runs_work or args.command == "run":
            from .runtime import limit_malloc

            limit_malloc()  # the command's own process: its RSS should track what is live (budget)
        if not runs_work:
            _HANDLERS[args.command](args)
            return 0
        if args.command != "knn":  # k-NN builds its graph without dask.array (and scipy)
            import dask.array  # noqa: F401 - so the idle footprint includes what the run imports
        import zarr  # noqa: F401

        from .runtime import connect

        start, base = time.perf_counter(), _peak_rss()
        with connect(args.scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker,
                     memory_budget=args.memory_budget, progress=args.progress, report=args.report,
                     security={"tls_ca_file": args.tls_ca_file, "tls_client_cert": args.tls_cert,
                               "tls_client_key": args.tls_key}):
            _HANDLERS[args.command](args)
        if args.command != "demo":
            from .sizes import format_bytes

            grew = max(0, _peak_rss() - base)
            where = "" if args.scheduler == "threads" else " (this process; workers report on the dashboard)"
            print(f"done in {time.perf_counter() - start:.2f} s; peak memory +{format_bytes(grew)}{where}",
                  file=sys.stderr, flush=True)
        return 0
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    except InputError as e:
        if debug:
            raise
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`pipeline plan ... | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except PipelineError as e:
        if debug:
            raise
        print(f"pipeline: failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI's promise is one line, no traceback
        if debug:
            raise
        hint = ("; workers die like this when a task needs more memory than their --memory-limit: "
                "give a smaller --memory-budget" if type(e).__name__ == "KilledWorker" else "")
        print(f"pipeline: failed: {type(e).__name__}: {e}{hint} (rerun with PIPELINE_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
