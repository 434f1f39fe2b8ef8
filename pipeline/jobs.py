"""Batch runs from job files: ``pipeline run JOB.yaml``.

A job file is YAML: a few settings shared by every step (``memory_budget``,
``scheduler``, ``workers``, ``threads_per_worker``, ``overwrite``) and ``steps``, a list of
one-key mappings ``{STEP: {options}}`` run in order, where STEP is one of ``generate``,
``ingest``, ``distances``, ``knn``, ``gmm-fit``, ``gmm-predict`` and the options are the
command line's, spelled with underscores (see the README, "Batch runs").

The whole file is checked before anything runs: unknown keys, values of the wrong type
or out of range, inputs that neither exist nor are written by an earlier step, outputs
that hold something else.  Each error is one line naming the step and the key.  While
running, a step whose output is already complete for the same parameters is skipped
(its writer recognises the job's fingerprint); a result store left incomplete by a crash
is resumed (finished blocks kept); a dataset left incomplete is written again.
"""

from __future__ import annotations

import os
import time

from .errors import InputError, PipelineError
from .kernels.covariances import COVARIANCE_TYPES
from .kernels.distances import METRICS
from .runtime import connect, parse_scheduler
from .sizes import parse_budget
from .store import results
from .store.datasets import open_dataset
from .store.urls import exists, open_group

__all__ = ["load_job", "run_job", "STEPS"]

_POS_INT = "a whole number >= 1"
_INT = "a whole number"
_FLOAT = "a number"
_BOOL = "true or false"
_PATH = "a path or URL"

# step -> option -> (kind, default); kind is a type tag, a tuple of choices, or "required <tag>".
STEPS = {
    "generate": {
        "kind": (("blobs", "cifar-like"), "blobs"), "out": ("required " + _PATH, None),
        "n_samples": (_POS_INT, None), "n_features": (_POS_INT, None), "centers": (_POS_INT, 8),
        "classes": (_POS_INT, 10), "dtype": (("float32", "float64"), "float32"), "seed": (_INT, 0),
        "chunk_rows": (_POS_INT, None), "overwrite": (_BOOL, None),
    },
    "ingest": {
        "src": ("required " + _PATH, None), "out": ("required " + _PATH, None),
        "labels": (_PATH, None), "chunk_rows": (_POS_INT, None), "overwrite": (_BOOL, None),
    },
    "distances": {
        "query": ("required " + _PATH, None), "train": ("required " + _PATH, None),
        "out": ("required " + _PATH, None), "metric": (METRICS, "euclidean"),
        "overwrite": (_BOOL, None),
    },
    "knn": {
        "query": ("required " + _PATH, None), "train": ("required " + _PATH, None),
        "out": ("required " + _PATH, None), "k": (_POS_INT, 5),
        "weights": (("uniform", "distance"), "uniform"), "metric": (METRICS, "euclidean"),
        "graph": (("connectivity", "distance"), None), "overwrite": (_BOOL, None),
    },
    "gmm-fit": {
        "data": ("required " + _PATH, None), "model": ("required " + _PATH, None),
        "n_components": (_POS_INT, 1), "covariance_type": (COVARIANCE_TYPES, "full"),
        "max_iter": (_POS_INT, 100), "tol": (_FLOAT, 1e-3),
        "reg_covar": (_FLOAT, 1e-6), "init": (("kmeans", "k-means++", "random", "random_from_data"), "kmeans"),
        "seed": (_INT, 0), "overwrite": (_BOOL, None),
    },
    "gmm-predict": {
        "model": ("required " + _PATH, None), "data": ("required " + _PATH, None),
        "out": ("required " + _PATH, None), "overwrite": (_BOOL, None),
    },
}
_SETTINGS = {"memory_budget", "scheduler", "workers", "threads_per_worker", "overwrite", "steps"}
# step -> (input options, output option, what the output is)
_IO = {
    "generate": ((), "out", "dataset"),
    "ingest": ((), "out", "dataset"),
    "distances": (("query", "train"), "out", "distances"),
    "knn": (("query", "train"), "out", "neighbors"),
    "gmm-fit": (("data",), "model", "gmm"),
    "gmm-predict": (("model", "data"), "out", "gmm-predictions"),
}
_MODEL_INPUTS = {("gmm-predict", "model")}


class _Job:
    def __init__(self, path, settings, steps):
        self.path, self.settings, self.steps = path, settings, steps


def _fail(where, message):
    raise InputError(f"{where}: {message}")


def _check_value(where, key, kind, value):
    kind = kind.replace("required ", "") if isinstance(kind, str) else kind
    if isinstance(kind, tuple):
        if value not in kind:
            _fail(where, f"{key}: {value!r} is not one of {', '.join(kind)}")
        return value
    if kind in (_POS_INT, _INT):
        if isinstance(value, bool) or not isinstance(value, int) or (kind == _POS_INT and value < 1):
            _fail(where, f"{key}: {value!r} must be {kind}")
        return value
    if kind == _FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
            _fail(where, f"{key}: {value!r} must be {kind} >= 0")
        return float(value)
    if kind == _BOOL:
        if not isinstance(value, bool):
            _fail(where, f"{key}: {value!r} must be {kind}")
        return value
    if not isinstance(value, str) or not value:
        _fail(where, f"{key}: {value!r} must be {kind}")
    return value


def _resolve(base, url):
    """Relative paths in a job file are relative to the file's directory."""
    if "://" in url or os.path.isabs(url):
        return url
    return os.path.normpath(os.path.join(base, url))


def load_job(path):
    """Read and check a job file; nothing runs and nothing is written.

    Returns
    -------
    _Job
        ``settings`` (dict) and ``steps``: a list of ``(name, options)`` with defaults
        filled in and relative paths resolved against the job file's directory.

    Raises
    ------
    InputError
        One line naming the file, the step (``steps[i] (name)``) and the key.
    """
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"job file {path!r} does not exist; give the path of a YAML job file")
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: a job file is a mapping with 'steps' (a list) and optional settings "
                         f"{', '.join(sorted(_SETTINGS - {'steps'}))}")
    for key in doc:
        if key not in _SETTINGS:
            _fail(path, f"unknown key {key!r}; a job file has {', '.join(sorted(_SETTINGS))}")
    settings = {"memory_budget": None, "scheduler": "threads", "workers": None,
                "threads_per_worker": None, "overwrite": False}
    for key in ("workers", "threads_per_worker"):
        if doc.get(key) is not None:
            settings[key] = _check_value(path, key, _POS_INT, doc[key])
    if doc.get("overwrite") is not None:
        settings["overwrite"] = _check_value(path, "overwrite", _BOOL, doc["overwrite"])
    if doc.get("memory_budget") is not None:
        try:
            parse_budget(doc["memory_budget"], name="memory_budget")
        except InputError as e:
            _fail(path, str(e))
        settings["memory_budget"] = doc["memory_budget"]
    if doc.get("scheduler") is not None:
        try:
            settings["scheduler"] = parse_scheduler(str(doc["scheduler"]))
        except InputError as e:
            _fail(path, f"scheduler: {e}".replace("--scheduler ", ""))
    raw = doc.get("steps")
    if not isinstance(raw, list) or not raw:
        _fail(path, "'steps' must be a non-empty list of steps such as '- knn: {query: ..., train: ..., out: ...}'")
    base = os.path.dirname(os.path.abspath(path))
    steps = []
    for i, item in enumerate(raw):
        where = f"{path}: steps[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            _fail(where, f"each step is a mapping of one step name ({', '.join(STEPS)}) to its options")
        (name, options), = item.items()
        if name not in STEPS:
            _fail(where, f"unknown step {name!r}; choose one of {', '.join(STEPS)}")
        where = f"{where} ({name})"
        options = options or {}
        if not isinstance(options, dict):
            _fail(where, "its options must be a mapping of option names to values")
        spec = STEPS[name]
        for key in options:
            if key not in spec:
                _fail(where, f"unknown key {key!r}; {name} takes {', '.join(spec)}")
        opts = {}
        for key, (kind, default) in spec.items():
            if options.get(key) is None:
                if isinstance(kind, str) and kind.startswith("required"):
                    _fail(where, f"missing key {key!r} ({kind.replace('required ', '')})")
                opts[key] = default
                continue
            opts[key] = _check_value(where, key, kind, options[key])
        if name == "generate" and opts["kind"] == "blobs":
            for key in ("n_samples", "n_features"):
                if opts[key] is None:
                    _fail(where, f"missing key {key!r} (generate blobs needs n_samples and n_features)")
        for key, (kind, _) in spec.items():
            if opts[key] is not None and isinstance(kind, str) and kind.endswith(_PATH):
                opts[key] = _resolve(base, opts[key])
        if opts.get("overwrite") is None:
            opts["overwrite"] = settings["overwrite"]
        steps.append((name, opts))
    _check_flow(path, steps)
    return _Job(path, settings, steps)


def _check_flow(path, steps):
    """Inputs exist or come from an earlier step; outputs are distinct and free."""
    produced = {}  # url -> (step index, what)
    for i, (name, opts) in enumerate(steps):
        where = f"{path}: steps[{i}] ({name})"
        ins, out_key, what = _IO[name]
        if name == "ingest":
            for key in ("src", "labels"):
                if opts[key] is not None and not os.path.isfile(opts[key]):
                    _fail(where, f"{key}: {opts[key]!r} does not exist; give the path of a .npy file")
        for key in ins:
            url = opts[key]
            need = "gmm" if (name, key) in _MODEL_INPUTS else "dataset"
            if url in produced:
                j, made = produced[url]
                if made != need:
                    _fail(where, f"{key}: {url!r} is written by steps[{j}] as a {made}, not a {need}")
                continue
            if not exists(url):
                _fail(where, f"{key}: {url!r} does not exist and no earlier step writes it; "
                             "fix the path or add a step that creates it")
            try:
                if need == "dataset":
                    open_dataset(url)
                else:
                    g = open_group(url, what="model")
                    meta = dict(g.attrs.get("pipeline", {}))
                    if meta.get("kind") != "gmm" or not meta.get("complete"):
                        _fail(where, f"{key}: {url!r} is not a complete gmm model; fit one with a gmm-fit step")
            except InputError as e:
                _fail(where, f"{key}: {e}")
        out = opts[out_key]
        if out in produced:
            _fail(where, f"{out_key}: {out!r} is also written by steps[{produced[out][0]}]; give each step its own output")
        if out in {opts[k] for k in ins}:
            _fail(where, f"{out_key}: {out!r} is also an input of this step; choose another output path")
        if exists(out) and not opts["overwrite"]:
            _check_existing_output(where, out_key, out, what, name, opts)
        produced[out] = (i, what)


def _check_existing_output(where, key, url, what, name, opts):
    """An existing output is refused up front unless the step may skip, resume or restart it."""
    try:
        meta = dict(open_group(url, what="output").attrs.get("pipeline", {}))
    except InputError:
        meta = {}
    kind = meta.get("kind")
    if kind == what and what != "dataset":
        return  # the writer decides: same job -> skip or resume, another job -> refused
    if kind == "dataset" == what and (_recorded_job(meta) == _fingerprint(name, opts) or not meta.get("complete")):
        return  # the same step's dataset (skipped) or an interrupted one (written again)
    held = f"a {kind} store" if kind else "something that is not a pipeline store"
    _fail(where, f"{key}: {url!r} already exists and holds {held} from other parameters; "
                 "add 'overwrite: true' to the step (or the job) or choose another path")


def _recorded_job(meta):
    """The step fingerprint a dataset was written with (``step``: datasets of before 0.2)."""
    return meta.get("job") or meta.get("step")


def _fingerprint(name, opts):
    params = {k: v for k, v in opts.items() if k != "overwrite"}
    if name == "ingest":
        for key in ("src", "labels"):
            if params[key] is not None and os.path.isfile(params[key]):
                st = os.stat(params[key])
                params[key] = f"{params[key]}@{st.st_size}:{st.st_mtime_ns}"
    return results.job_fingerprint(step=name, **params)


# ------------------------------------------------------------------------- running

def _dataset_step(name, opts, budget, echo):
    """generate / ingest, skipped when the output is this step's complete dataset."""
    from . import store
    from .store.ingest import ingest

    out, fp = opts["out"], _fingerprint(name, opts)
    overwrite = opts["overwrite"]
    meta = None if overwrite else results.existing(out)
    if meta and meta.get("kind") == "dataset" and meta.get("complete") and _recorded_job(meta) == fp:
        return {"status": "skipped: already complete for the same parameters", "output": out}
    if meta and meta.get("kind") == "dataset" and not meta.get("complete"):
        echo("  an earlier run of this step was interrupted: writing it again")
        overwrite = True  # the writer's lock still refuses while another job is writing it
    common = dict(overwrite=overwrite, memory_budget=budget, job=fp)
    if name == "generate":
        common.update(random_state=opts["seed"], chunk_rows=opts["chunk_rows"])
        if opts["kind"] == "blobs":
            ds = store.make_blobs(out, opts["n_samples"], opts["n_features"], centers=opts["centers"],
                                  dtype=opts["dtype"], **common)
        else:
            ds = store.make_cifar_like(out, opts["n_samples"] or 5000, opts["n_features"] or 3072,
                                       n_classes=opts["classes"], **common)
    else:
        ds = ingest(opts["src"], out, labels=opts["labels"], chunk_rows=opts["chunk_rows"], **common)
    return {"status": "complete", "shape": f"{ds.n_samples} x {ds.n_features}", "dtype": str(ds.X.dtype),
            "output": out}


def _run_step(name, opts, budget, echo):
    if name in ("generate", "ingest"):
        return _dataset_step(name, opts, budget, echo)
    if name == "distances":
        from .distances import write_distances

        return write_distances(opts["query"], opts["train"], opts["out"], metric=opts["metric"],
                               memory_budget=budget, overwrite=opts["overwrite"])
    if name == "knn":
        from .neighbors import write_knn

        return write_knn(opts["query"], opts["train"], opts["out"], k=opts["k"], weights=opts["weights"],
                         metric=opts["metric"], graph=opts["graph"], memory_budget=budget,
                         overwrite=opts["overwrite"])
    from . import mixture

    if name == "gmm-fit":
        return mixture.fit_to_store(opts["data"], opts["model"], n_components=opts["n_components"],
                                    covariance_type=opts["covariance_type"],
                                    max_iter=opts["max_iter"], tol=opts["tol"], reg_covar=opts["reg_covar"],
                                    init_params=opts["init"], random_state=opts["seed"],
                                    memory_budget=budget, overwrite=opts["overwrite"])
    return mixture.predict_to_store(opts["model"], opts["data"], opts["out"], memory_budget=budget,
                                    overwrite=opts["overwrite"])


def run_job(path, *, memory_budget=None, scheduler=None, progress=None, check_only=False, echo=print):
    """Run a job file's steps in order (see the module docstring and the README).

    Parameters
    ----------
    path : str or Path
        The YAML job file.
    memory_budget, scheduler : optional
        Override the file's settings.
    check_only : bool
        Check the file and stop (nothing runs, nothing is written).

    Returns
    -------
    list of dict
        One summary per step; skipped steps say so in ``status``.

    Examples
    --------
    >>> from pipeline.jobs import run_job                  # doctest: +SKIP
    >>> run_job("examples/knn.yaml")                       # doctest: +SKIP
    """
    job = load_job(path)
    settings = dict(job.settings)
    if memory_budget is not None:
        parse_budget(memory_budget, name="--memory-budget")
        settings["memory_budget"] = memory_budget
    if scheduler is not None:
        settings["scheduler"] = parse_scheduler(scheduler)
    echo(f"job {job.path}: {len(job.steps)} step(s) checked")
    if check_only:
        return []
    summaries = []
    with connect(settings["scheduler"], workers=settings["workers"],
                 threads_per_worker=settings["threads_per_worker"], memory_budget=settings["memory_budget"],
                 progress=progress, echo=echo):
        for i, (name, opts) in enumerate(job.steps):
            out = opts.get("out") or opts.get("model")
            echo(f"step {i + 1}/{len(job.steps)}: {name} -> {out}")
            t0 = time.perf_counter()
            try:
                summary = dict(_run_step(name, opts, settings["memory_budget"], echo))
            except PipelineError as e:  # the same error, saying which step met it
                raise type(e)(f"{job.path}: steps[{i}] ({name}): {e}") from None
            status = str(summary.get("status", ""))
            if status.startswith("already complete"):
                summary["status"] = "skipped: already complete for the same parameters"
            summary.setdefault("seconds", round(time.perf_counter() - t0, 3))
            for key, value in summary.items():
                echo(f"  {key}: {value}")
            summaries.append({"step": name, **summary})
    return summaries
