"""Gaussian-mixture EM out of core: one fused E+M pass over X per iteration.

Graph builder and faces over the NumPy kernels in :mod:`pipeline.kernels.covariances`
(the four covariance types; full is :mod:`pipeline.kernels.gaussian`) and
:mod:`pipeline.kernels.kmeans`:

* :func:`em_step` builds one graph per iteration: a task per row block computes the
  block's E-step and M-step sufficient statistics (``em_block_stats``), a tree of
  ``combine_stats`` tasks sums them, and the driver turns the sums into the next
  parameters.  The iteration's parameters (precision factors concatenated for the
  batched GEMM, ``mu_k P_k``, log-determinants, log-weights) are **one** graph key
  that every block task depends on; nothing array-sized is embedded per task, and
  zarr-backed blocks are read by the tasks themselves.
* :class:`GaussianMixture` runs scikit-learn's loop (``BaseMixture.fit_predict``) on
  top: E with ``theta_t`` gives the lower bound and the statistics for
  ``theta_{t+1}``; from the same initial parameters it follows scikit-learn's EM path.
* :func:`fit_to_store` / :func:`predict_to_store` are the CLI's jobs: the model is
  saved after every iteration and a rerun resumes from the last saved one.

When the planner splits the components into groups (their factors and statistics do
not fit the budget at once), an iteration takes two passes per group: first the
per-row log-sum-exp over all groups, then each group's statistics.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from .budget import plan
from .errors import InputError, NotFittedError, sklearn_flavoured
from .estimator import BaseEstimator
from .inputs import as_rows, check_finite_rows
from .kernels import covariances as _cv
from .kernels import gaussian as _g
from .kernels import kmeans as _km
from . import shards as sh
from .runtime import (compute, dask_workers, delayed_of, persist, reduce_tree, shared_key, source_key, thread_buffers,
                      thread_work)
from .store.reads import read_block
from .store.urls import open_group
from .store.results import ResultWriter, content_identity, existing, job_fingerprint, open_result

__all__ = ["GaussianMixture", "ConvergenceWarning", "em_step", "fit_to_store", "predict_to_store"]

_INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")
_SPLIT_EVERY = 4  # the cost model's tree width (budget.cost_gmm)


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the lower bound changed by less than ``tol``.

    Also scikit-learn's ``ConvergenceWarning`` when scikit-learn is imported
    (:func:`pipeline.errors.sklearn_flavoured`): its filters apply.
    """


# ---------------------------------------------------------------------------- graphs

def _plan(source, n_components, memory_budget, covariance_type="full"):
    """The EM plan for a row source (its stored chunks align the blocks)."""
    return plan("gmm", n_samples=source.shape[0], n_features=source.shape[1], n_components=n_components,
                itemsize=source.dtype.itemsize, memory_budget=memory_budget, chunk_rows=source.chunk_rows,
                covariance_type=covariance_type, x_compressed=source.compressed, **_cluster(), **_order(source))


def _order(source, predict=False):
    """A sharded pass's forced order: "rows" when predicting, or for X computed by dask
    (a "groups" E-step would hold every block it computed until the last group read it)."""
    return {"order": "rows"} if predict or source.kind == "dask" else {}


def _cluster():
    """The connected cluster's worker count, for a sharded plan's tasks (none on threads)."""
    workers = dask_workers()
    return {"workers": workers} if workers > 1 else {}


def _block_offsets(X):
    return np.concatenate([[0], np.cumsum(X.chunks[0])]).astype(np.int64)


def _stored_block(chunk, src, start, stop, *args):
    """Task: ``chunk`` of rows ``start .. stop - 1`` read from the store into the thread's buffer.

    No separate read task (whose block would stay alive until its consumer runs), no
    fresh block per task.
    """
    return chunk(read_block(src, start, stop, thread_work()), *args)


def _reduce_blocks(X, chunk, combine, shared, stage, *, split_every=_SPLIT_EVERY, offsets=False,
                   extras=None, store=None):
    """Lazy tree reduction of ``chunk(block, shared[, row_start][, extra])`` over X's row blocks.

    Task keys read ``pipeline-<stage>-chunk-<token>`` and ``pipeline-<stage>-combine-<token>``
    (:func:`pipeline.runtime.reduce_tree`); ``shared`` is one key,
    ``pipeline-<stage>-params-<token>``.  With ``store`` (the Zarr array behind X) the
    chunks read their own rows; the store is one graph key (its path and metadata,
    never its data).
    """
    from dask.base import tokenize
    from dask.delayed import delayed

    token = tokenize(X.name, shared, stage, split_every, getattr(chunk, "__name__", chunk),
                     None if extras is None else [e.key for e in extras], store is not None)
    params = shared_key(shared, f"pipeline-{stage}-params-{token}")
    starts = _block_offsets(X)
    if store is None:
        heads = [(chunk, block) for block in X.to_delayed(optimize_graph=True).ravel()]
    else:
        src = source_key(store, f"pipeline-{stage}-source")
        heads = [(_stored_block, chunk, src, int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    # The leaves as delayed calls: their arguments (blocks, persisted or remote ones
    # too) are dask collections that dask itself resolves.
    leaves = [delayed(head[0], pure=True)(*head[1:], params, *((int(starts[i]),) if offsets else ()),
                                          *((extras[i],) if extras is not None else ()),
                                          dask_key_name=(f"pipeline-{stage}-chunk-{token}", i))
              for i, head in enumerate(heads)]
    dsk = {}
    root = reduce_tree(dsk, [leaf.key for leaf in leaves], combine, f"pipeline-{stage}-combine-{token}",
                       split_every=split_every)
    return delayed_of(dsk, root, leaves)


def _em_chunk(block, prepared):
    # The thread's scratch dict: the slice buffers survive from block to block too.
    return _cv.em_block_stats(block, prepared, work=thread_work())


def _em_stats_graph(X, weights, means, precisions_cholesky, shift, component_group, split_every,
                    store=None, covariance_type="full"):
    """The tree of one fused E+M pass; ``store``, the Zarr array behind X, if any."""
    if covariance_type == "full":
        prepared = _g.prepare_parameters(weights, means, precisions_cholesky, shift=shift,
                                         component_group=component_group)
        prepared["type"] = "full"
    else:
        prepared = _cv.prepare_parameters(covariance_type, weights, means, precisions_cholesky, shift=shift)
    return _reduce_blocks(X, _em_chunk, _cv.combine_stats, prepared, "em", split_every=split_every,
                          store=store)


def em_step(X, weights=None, means=None, precisions_cholesky=None, memory_budget=None, *, covariance_type="full",
            shift=None, split_every=None, plan=None, params=None, out=None):
    """One fused E+M pass over ``X``: the sufficient statistics of an EM iteration.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        NumPy, dask or Zarr array, Dataset, or dataset URL.
    weights : ndarray of shape (n_components,)
    means : ndarray of shape (n_components, n_features)
    precisions_cholesky : ndarray
        Of the type's shape (scikit-learn's ``precisions_cholesky_``): (K, d, d) full,
        (d, d) tied, (K, d) diag, (K,) spherical.
    params : str, Path or zarr.Group, optional
        Instead of the three arrays: a model store (``pipeline gmm fit``'s, or any group
        of sharded full-covariance parameters), read a component group at a time.
    memory_budget : int or str, optional
        Bytes above the idle process (see :func:`pipeline.budget.parse_budget`).
    covariance_type : {"full", "tied", "diag", "spherical"}, default "full"
    shift : ndarray, optional
        Centre of the statistics: (K, d) for full (default ``means``), (d,) for the
        others (default the weighted mean of the means).
    split_every : int, optional
        Width of the summation tree.
    plan : Plan, optional
        A plan from ``pipeline.plan("gmm", ...)`` (default: made from the budget).
    out : str or Path, optional
        Where the statistics go when the plan shards the components (they do not fit
        the budget): a Zarr group receiving ``S2``; default a new temporary directory.

    Returns
    -------
    dict
        ``N`` (K,) ``= sum r``, ``S1`` (K, d) ``= sum r (x - shift)``, ``S2``
        (full: (K, d, d) ``= sum r (x - shift)(x - shift)^T``; diag and spherical:
        (K, d) ``sum r (x - shift)^2``; tied: (d, d) over every row, with ``T1``),
        ``log_likelihood`` (sum over rows of the log of the mixture density) and ``n``.
        Feed it to :func:`pipeline.kernels.covariances.params_from_stats` for the M-step.
        When sharded, ``S2`` is a :class:`pipeline.shards.StoredArray` in the group
        ``store`` names (the dict's ``store``), written component group by group.

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> X = np.random.default_rng(0).standard_normal((100, 2))
    >>> s = pl.em_step(X, np.ones(1), np.zeros((1, 2)), np.eye(2)[None], memory_budget="64MiB")
    >>> s["N"], s["n"]
    (array([100.]), 100)
    """
    try:
        _cv.check_type(covariance_type)
    except ValueError as e:
        raise InputError(str(e)) from None
    source = as_rows(X, "X")
    if params is not None:
        if weights is not None or means is not None or precisions_cholesky is not None:
            raise InputError("em_step takes the parameters either as weights, means and precisions_cholesky or "
                             "as params= (a model store), not both")
        if covariance_type != "full":
            raise InputError("params= (a model store) holds full covariances; pass covariance_type='full'")
        return _em_step_stored(source, _open_parameters(params, source, memory_budget, plan), memory_budget, shift,
                               plan, out)
    if weights is None or means is None or precisions_cholesky is None:
        raise InputError("em_step needs weights, means and precisions_cholesky, or params= (a model store)")
    K, d = len(weights), source.shape[1]
    for name, value, shape in (("means", means, (K, d)),
                               ("precisions_cholesky", precisions_cholesky,
                                _cv.parameter_shape(covariance_type, K, d))):
        if np.shape(value) != shape:
            raise InputError(f"{name} has shape {np.shape(value)} but {K} weights, {d} features and "
                             f"covariance_type={covariance_type!r} need {shape}")
    if plan is None:
        plan = _plan(source, K, memory_budget, covariance_type)
    elif plan["sharded"] and covariance_type != "full":
        raise InputError("sharded plans (component groups) are for covariance_type='full' only")
    if plan["sharded"]:
        # The factors the caller holds go to a scratch store, a component group at a
        # time; the pass reads them from there as it reads a model store.
        tmp = sh.TemporaryStore()
        stored = sh.ShardedParameters.create(tmp.group("params"), K, d)
        sh.write_parameters(stored, weights, means, precisions_cholesky=precisions_cholesky,
                            group=plan["component_group"])
        return _em_step_stored(source, stored, memory_budget, shift, plan, out, tmp)
    with thread_buffers():
        return _em_pass(source.dask(rows=plan["rows"]), source.zarr, weights, means, precisions_cholesky,
                        plan, shift=shift, split_every=split_every, covariance_type=covariance_type)


def _open_parameters(params, source, memory_budget=None, plan=None):
    """A model store (or group) as :class:`~pipeline.shards.ShardedParameters`, checked against X.

    A model fitted unsharded is converted to a scratch store a component group of the
    pass's plan at a time (the plan made first: a budget too small fails before that).
    """
    import zarr

    if isinstance(params, sh.ShardedParameters):
        stored = params
    else:
        group = params if isinstance(params, zarr.Group) else open_group(str(params), "model store")
        if "_iter0" in group or "_iter1" in group or "precisions_cholesky" not in group:
            meta = dict(group.attrs.get("pipeline", {}))
            raise InputError(f"model store {params!r} is incomplete (its fit was interrupted"
                             f"{' at iteration ' + str(meta['n_iter']) if meta.get('n_iter') is not None else ''}); "
                             "finish it with the same `pipeline gmm fit` command (it resumes) or fit again")
        if "log_det" not in group:  # fitted unsharded: its arrays, a group at a time, to a scratch store
            K, d = group["means"].shape
            if d != source.shape[1]:
                raise InputError(f"model store {params!r} has {K} components of {d} features, but X has "
                                 f"{source.shape[1]} features; use the model fitted on this data")
            if plan is None or not plan["sharded"]:
                plan = _plan_sharded(source, K, memory_budget if plan is None else plan.budget)
            tmp = sh.TemporaryStore()
            stored = sh.write_parameters(sh.ShardedParameters.create(tmp.group("params"), K, d, owner=tmp),
                                         group["weights"][...], group["means"][...],
                                         covariances=group["covariances"],
                                         precisions_cholesky=group["precisions_cholesky"],
                                         group=plan["component_group"])
        else:
            stored = sh.ShardedParameters(group)
    if not stored.complete:
        raise InputError(f"model store {params!r} is incomplete (a half-written iteration); resume its fit or "
                         "fit again")
    if stored.n_features != source.shape[1]:
        raise InputError(f"model store {params!r} has {stored.n_components} components of {stored.n_features} "
                         f"features, but X has {source.shape[1]} features; use the model fitted on this data")
    if stored.n_components > source.shape[0]:
        raise InputError(f"model store {params!r} has {stored.n_components} components, more than X's "
                         f"{source.shape[0]} rows")
    return stored


def _em_step_stored(source, stored, memory_budget, shift, plan, out, tmp=None):
    """:func:`em_step` over parameters in a store: its statistics, S2 written to ``out``."""
    import uuid

    K, d = stored.n_components, stored.n_features
    if shift is not None and np.shape(shift) != (K, d):
        raise InputError(f"shift has shape {np.shape(shift)}, but the {K} components of {d} features need ({K}, {d})")
    if plan is None:
        plan = _plan_sharded(source, K, memory_budget)
    elif not plan["sharded"]:
        plan = _plan_sharded(source, K, plan.budget)
    tmp = tmp or getattr(stored, "owner", None) or sh.TemporaryStore()
    out_group = tmp.group("stats") if out is None else _new_group(out)
    token = uuid.uuid4().hex
    with thread_buffers():
        scratch_ = sh.Scratch(tmp.group("scratch"), source.shape[0], K, plan["rows"], plan["component_group"])
        e = sh.e_step(source, stored, scratch_, plan, token)
        res = sh.m_step(source, stored, out_group, scratch_, plan, 0.0, token, stats_only=True,
                        shift=None if shift is None else np.asarray(shift, dtype=np.float64))
        scratch_.clear()
    res.update(log_likelihood=e["log_likelihood"], n=int(source.shape[0]), store=_url_of(out_group),
               skipped=e["skipped"], pairs=e["pairs"])
    if out is None:  # the statistics' temporary store lives as long as their array
        res["S2"] = sh.StoredArray(out_group["S2"], owner=tmp)
    return res


def _plan_sharded(source, K, memory_budget, predict=False):
    """A sharded plan (parameters read from a store, whatever their size)."""
    return plan("gmm", n_samples=source.shape[0], n_features=source.shape[1], n_components=K,
                itemsize=source.dtype.itemsize, memory_budget=memory_budget, chunk_rows=source.chunk_rows,
                x_compressed=source.compressed, sharded=True, **_cluster(), **_order(source, predict))


def _new_group(url):
    import zarr

    from .store.urls import exists

    if exists(str(url)):
        raise InputError(f"out={str(url)!r} already exists; em_step writes its statistics to a new store: "
                         "remove it or choose another path")
    return zarr.open_group(str(url), mode="w", zarr_format=3)


def _url_of(group):
    from .store.urls import group_url

    return group_url(group) or f"{group.store}/{group.path}"


def _em_pass(X, store, weights, means, precisions_cholesky, plan, *, shift=None, split_every=None,
             covariance_type="full"):
    """One E+M pass over the dask array ``X`` in the plan's blocks; ``store``, the Zarr
    array behind it (its tasks then read their own rows), or None."""
    weights = np.asarray(weights, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    precisions_cholesky = np.asarray(precisions_cholesky, dtype=np.float64)
    shift = (_cv.default_shift(covariance_type, weights, means) if shift is None
             else np.asarray(shift, dtype=np.float64))
    split_every = split_every or _SPLIT_EVERY
    graph = _em_stats_graph(X, weights, means, precisions_cholesky, shift, None, split_every, store=store,
                            covariance_type=covariance_type)
    (stats,) = compute(graph, label="EM iteration")
    return stats


# --------------------------------------------------------------------- validation

def _check_finite_chunk(block, _shared, start):
    bad = ~np.isfinite(block).all(axis=1) if np.issubdtype(block.dtype, np.floating) else np.zeros(len(block), bool)
    rows = np.flatnonzero(bad)
    return {"count": int(rows.size), "first": (rows[:5] + start).tolist()}


def _combine_finite(parts):
    first = sorted(r for p in parts for r in p["first"])[:5]
    return {"count": sum(p["count"] for p in parts), "first": first}


def _check_finite(X, name="X"):
    if not np.issubdtype(X.dtype, np.floating):
        return
    (res,) = compute(_reduce_blocks(X, _check_finite_chunk, _combine_finite, None, "gmm-check",
                                     offsets=True, split_every=16), label="checking X")
    _raise_non_finite(res, name)


def _checked_moments_chunk(block, _shared, start):
    return {"moments": _km.moments_block(block), "finite": _check_finite_chunk(block, None, start)}


def _combine_checked_moments(parts):
    parts = list(parts)
    return {"moments": _km.combine_moments([p["moments"] for p in parts]),
            "finite": _combine_finite([p["finite"] for p in parts])}


def _checked_moments(X, name="X"):
    """X's moments (:func:`pipeline.kernels.kmeans.moments_block`), checking that X is finite
    in the same read: the initialisations that need the moments need no separate check."""
    (res,) = compute(_reduce_blocks(X, _checked_moments_chunk, _combine_checked_moments, None,
                                     "kmeans-moments", offsets=True), label="checking X, moments")
    _raise_non_finite(res["finite"], name)
    return res["moments"]


def _raise_non_finite(res, name):
    if res["count"]:
        rows = ", ".join(str(r) for r in res["first"])
        more = " ..." if res["count"] > len(res["first"]) else ""
        raise InputError(
            f"{name} has non-finite values (NaN or inf) in {res['count']} row(s), at rows "
            f"[{rows}{more}]; remove or impute those rows before fitting"
        )


def _check_init(name, value, shape, why=""):
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape:
        raise InputError(f"{name} has shape {arr.shape} but X and n_components need {shape}{why}; "
                         f"pass an array of shape {shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} has non-finite values; pass finite numbers")
    return arr


# ------------------------------------------------------------------ initialisation

def _rows_at(X, indices):
    """X[indices] for a few global rows (reads only the blocks holding them)."""
    idx = np.asarray(indices, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    (rows,) = compute(X[idx[order]], label=None)
    out = np.empty((len(idx), X.shape[1]))
    out[order] = rows
    return out


def _kpp_chunk(block, shared):
    return _km.kpp_block_potentials(block, shared["centers"], shared["candidates"])[None, :]


def _concat(parts):
    return np.concatenate(parts, axis=0)


def _kmeans_plusplus(X, n_clusters, rs):
    """Chunked k-means++ seeding (scikit-learn's greedy variant with local trials).

    One pass over X per centre; the per-row potential is recomputed per block from
    the centres chosen so far, never held for the whole dataset.
    """
    n = X.shape[0]
    n_trials = 2 + int(np.log(n_clusters))
    first = min(int(rs.random_sample() * n), n - 1)
    indices = [first]
    centers = _rows_at(X, [first])
    starts = _block_offsets(X)
    (pots,) = compute(_reduce_blocks(X, _kpp_chunk, _concat, {"centers": centers, "candidates": centers[:0]},
                                      "kmeans-init", split_every=32), label="k-means++")
    block_pot = pots[:, -1]
    for _ in range(1, n_clusters):
        cum = np.cumsum(block_pot)
        total = cum[-1]
        targets = rs.uniform(size=n_trials) * total
        blocks = np.minimum(np.searchsorted(cum, targets), len(cum) - 1)
        cand_idx = np.empty(n_trials, dtype=np.int64)
        for j in np.unique(blocks):
            sel = blocks == j
            before = cum[j - 1] if j > 0 else 0.0
            blk = _rows_at(X, np.arange(starts[j], starts[j + 1]))
            cand_idx[sel] = starts[j] + _km.kpp_locate(blk, centers, targets[sel] - before)
        cands = _rows_at(X, cand_idx)
        (pots,) = compute(_reduce_blocks(X, _kpp_chunk, _concat, {"centers": centers, "candidates": cands},
                                          "kmeans-init", split_every=32), label="k-means++")
        best = int(np.argmin(pots[:, :-1].sum(axis=0)))
        block_pot = pots[:, best]
        indices.append(int(cand_idx[best]))
        centers = np.vstack([centers, cands[best:best + 1]])
    return centers, np.array(indices, dtype=np.int64)


def _lloyd_chunk(block, shared):
    return _km.lloyd_block_stats(block, shared["centers"], shared["n_far"])


def _kmeans(X, n_clusters, rs, max_iter=300, tol=1e-4):
    """Lloyd's k-means from k-means++ seeds, as ``KMeans(n_init=1)`` in scikit-learn."""
    mom = _checked_moments(X)
    tol = float(np.mean(mom[2] / mom[0])) * tol
    centers, _ = _kmeans_plusplus(X, n_clusters, rs)
    for _ in range(max_iter):
        (stats,) = compute(_reduce_blocks(X, _lloyd_chunk, _km.combine_lloyd,
                                           {"centers": centers, "n_far": n_clusters}, "kmeans-lloyd"),
                            label="k-means")
        centers, shift = _km.lloyd_update(stats, centers)
        if shift <= tol:
            break
    return centers


def _labels_chunk(block, shared):
    if shared["type"] == "full":
        return _km.labels_block_stats(block, shared["centers"])
    labels = _km.sq_distances(block, shared["centers"]).argmin(axis=1)
    resp = np.zeros((block.shape[0], len(shared["centers"])))
    resp[np.arange(block.shape[0]), labels] = 1.0
    return _cv.resp_block_stats(shared["type"], block, resp, shared["shift"])


def _scatter_chunk(block, shift):
    return _cv.scatter_block_stats(block, shift)


def _random_resp_chunk(block, shared, start):
    """scikit-learn's ``uniform(size=(n, K))`` responsibilities, reproducible per row.

    A counter-based generator (Philox) positioned at value ``start * K`` gives every
    row the same numbers whatever the chunking.
    """
    resp = sh.random_resp(shared["key"], shared["K"], start, block.shape[0])
    return _cv.resp_block_stats(shared["type"], block, resp, shared["shift"])


def _initial_parameters(X, K, init_params, rs, reg_covar, covariance_type="full"):
    """weights, means, covariances from scikit-learn's ``init_params`` strategies."""
    n, d = X.shape
    full = covariance_type == "full"
    if init_params == "kmeans":
        centers = _kmeans(X, K, rs)
        shift = centers if full else centers.mean(axis=0)
        graph = _reduce_blocks(X, _labels_chunk, _cv.combine_stats,
                               {"type": covariance_type, "centers": centers, "shift": shift}, "gmm-init")
    elif init_params in ("k-means++", "random_from_data"):
        if init_params == "k-means++":
            _, idx = _kmeans_plusplus(X, K, rs)
        else:
            idx = rs.choice(n, size=K, replace=False)
        # One-hot responsibilities at K rows: only those rows contribute ...
        rows = _rows_at(X, idx)
        shift = rows if full else rows.mean(axis=0)
        stats = _cv.resp_block_stats(covariance_type, rows, np.eye(K), shift)
        if covariance_type == "tied":
            # ... except to scikit-learn's tied covariance, X^T X over every row.
            (scatter,) = compute(_reduce_blocks(X, _scatter_chunk, _cv.combine_stats, shift, "gmm-init"),
                                 label="initialising")
            stats.update(scatter)
        return _cv.params_from_stats(covariance_type, stats, shift, reg_covar, n_samples=n)
    else:  # random
        # Shift: the overall mean (each component's mean is close to it at the start).
        mom = _checked_moments(X)
        shift = np.repeat(mom[1][None, :], K, axis=0) if full else np.asarray(mom[1], dtype=np.float64)
        key = int(rs.randint(np.iinfo(np.int32).max))
        graph = _reduce_blocks(X, _random_resp_chunk, _cv.combine_stats,
                               {"K": K, "key": key, "shift": shift, "type": covariance_type}, "gmm-init",
                               offsets=True)
    (stats,) = compute(graph, label="initialising")
    return _cv.params_from_stats(covariance_type, stats, shift, reg_covar, n_samples=n)


def _precision_cholesky(covariance_type, covariances):
    try:
        return _cv.precision_cholesky(covariance_type, covariances)
    except ValueError as e:
        raise InputError(str(e)) from None


def _loaded(params):
    """Saved parameters in memory (a resumed unsharded fit)."""
    if isinstance(params, sh.ShardedParameters):
        return {"weights": params.group["weights"][...], "means": params.group["means"][...],
                "covariances": params.group["covariances"][...],
                "precisions_cholesky": params.group["precisions_cholesky"][...]}
    return {name: value[...] for name, value in params.items()}


def _check_random_state(seed):
    if seed is None or seed is np.random:
        return np.random.mtrand._rand
    if isinstance(seed, (int, np.integer)):
        return np.random.RandomState(seed)
    if isinstance(seed, np.random.RandomState):
        return seed
    raise InputError(f"random_state={seed!r} must be None, an int or a numpy RandomState")


# ---------------------------------------------------------------------- estimator

class GaussianMixture(BaseEstimator):
    """Gaussian mixture fitted by EM, out of core, with any of scikit-learn's four covariance types.

    scikit-learn's :class:`sklearn.mixture.GaussianMixture`: the same parameters,
    fitted attributes and EM path (from the same initial parameters), but X stays
    where it is (Zarr, dask, a dataset URL, or NumPy) and each iteration is one fused
    pass over it inside ``memory_budget``.

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {"full", "tied", "diag", "spherical"}, default="full"
        Each component's own full covariance (K, d, d); one shared by all (d, d);
        each its own diagonal (K, d); each its own single variance (K,).
    tol : float, default=1e-3
        Convergence threshold on the change of the lower bound.
    reg_covar : float, default=1e-6
        Added to the diagonal of the covariances.
    max_iter : int, default=100
    n_init : int, default=1
    init_params : {"kmeans", "k-means++", "random", "random_from_data"}, default="kmeans"
    weights_init, means_init, precisions_init : array-like, optional
    random_state : int, RandomState or None
    warm_start : bool, default=False
    verbose : int, default=0
    memory_budget : int or str, optional
        Bytes above the idle process.

    Attributes
    ----------
    weights_, means_ : ndarray
    covariances_, precisions_, precisions_cholesky_ : ndarray
        Of the type's shape (see ``covariance_type``).
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
    lower_bounds_ : list of float

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.normal(-5, 1, (100, 2)), rng.normal(5, 1, (100, 2))])
    >>> gm = pl.GaussianMixture(2, random_state=0, memory_budget="64MiB").fit(X)
    >>> np.sort(gm.means_[:, 0]).round(0)
    array([-5.,  5.])
    """

    _estimator_type = "DensityEstimator"

    def __init__(self, n_components=1, covariance_type="full", tol=1e-3, reg_covar=1e-6,
                 max_iter=100, n_init=1, init_params="kmeans", weights_init=None, means_init=None,
                 precisions_init=None, random_state=None, warm_start=False, verbose=0,
                 memory_budget=None):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.memory_budget = memory_budget

    # ---------------------------------------------------------------- validation
    def _validate(self, X):
        n, d = X.shape
        K = self.n_components
        if not isinstance(K, (int, np.integer)) or isinstance(K, bool) or K < 1:
            raise InputError(f"n_components={K!r} must be an integer >= 1")
        if K > n:
            raise InputError(f"n_components={K} exceeds n_samples={n}; use at most {n} components "
                             "or more data")
        try:
            _cv.check_type(self.covariance_type)
        except ValueError as e:
            raise InputError(str(e)) from None
        if self.init_params not in _INIT_PARAMS:
            raise InputError(f"init_params={self.init_params!r}; choose one of {list(_INIT_PARAMS)}")
        for name, lo in (("tol", 0.0), ("reg_covar", 0.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating, np.integer)) or not v >= lo:
                raise InputError(f"{name}={v!r} must be a number >= {lo}")
        if not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 0:
            raise InputError(f"max_iter={self.max_iter!r} must be an integer >= 0")
        if not isinstance(self.n_init, (int, np.integer)) or self.n_init < 1:
            raise InputError(f"n_init={self.n_init!r} must be an integer >= 1")
        w = _check_init("weights_init", self.weights_init, (K,))
        if w is not None:
            if np.any(w < 0) or np.any(w > 1):
                raise InputError(f"weights_init must lie in [0, 1]; got min {w.min():.5g}, max {w.max():.5g}")
            if not np.isclose(w.sum(), 1.0, rtol=0, atol=1e-8):
                raise InputError(f"weights_init must sum to 1; got {w.sum():.8g}")
        m = _check_init("means_init", self.means_init, (K, d))
        p = _check_init("precisions_init", self.precisions_init, _cv.parameter_shape(self.covariance_type, K, d),
                        f" for covariance_type={self.covariance_type!r}")
        pc = None
        if p is not None:
            try:
                pc = _cv.precision_cholesky_from_precisions(self.covariance_type, p)
            except ValueError as e:
                raise InputError(str(e)) from None
        return w, m, pc

    # ------------------------------------------------------------------ fitting
    def _initialize(self, X, rs, w, m, pc):
        K = self.n_components
        cov = None
        if w is None or m is None or pc is None:
            iw, im, cov = _initial_parameters(X, K, self.init_params, rs, self.reg_covar, self.covariance_type)
            w = iw if w is None else w
            m = im if m is None else m
            if pc is None:
                pc = _precision_cholesky(self.covariance_type, cov)
            else:
                cov = None  # scikit-learn leaves covariances_ to the first M-step
        return {"weights": w, "means": m, "precisions_cholesky": pc, "covariances": cov}

    def _fit(self, X, callback=None, state=None, root=None):
        """Run EM; ``state`` resumes (params, n_iter, lower_bound, history).

        ``root``: the Zarr group whose ``_iter0`` / ``_iter1`` receive the iterations
        when the plan shards the parameters (default: a temporary store kept with
        the fitted model).
        """
        with thread_buffers():  # the tasks' scratch buffers live as long as the fit
            return self._fit_em(X, callback, state, root)

    def _fit_em(self, X, callback, state, root=None):
        source = as_rows(X, "X")
        w, m, pc = self._validate(source)
        cov_type = self.covariance_type
        do_init = state is None and not (self.warm_start and hasattr(self, "converged_"))
        if state is None and not do_init:
            fitted = getattr(self, "_fitted_covariance_type", "full")
            if fitted != cov_type or np.shape(self.means_) != (self.n_components, source.shape[1]):
                raise InputError(f"warm_start: the fitted model is covariance_type={fitted!r} with means of shape "
                                 f"{np.shape(self.means_)}, not covariance_type={cov_type!r} with "
                                 f"{(self.n_components, source.shape[1])}; set warm_start=False to fit afresh")
        plan = _plan(source, self.n_components, self.memory_budget, cov_type)
        X = source.dask(rows=plan["rows"])
        self.plan_ = plan
        # The kmeans and random starts read X's moments first, checking it on the way;
        # the others (and a start from given parameters) check it in a pass of its own.
        folded = (do_init and self.init_params in ("kmeans", "random")
                  and not (w is not None and m is not None and pc is not None))
        if state is None and not folded:
            _check_finite(X)
        rs = _check_random_state(self.random_state)
        if plan["sharded"]:
            return self._fit_sharded(source, X, plan, (w, m, pc), callback, state, do_init, rs, root)
        n_init = self.n_init if do_init else 1
        best = None
        for init in range(n_init):
            if state is not None:
                params = _loaded(state["params"])
                start, lower_bound, history = state["n_iter"], state["lower_bound"], list(state["history"])
            elif do_init:
                params = self._initialize(X, rs, w, m, pc)
                start, lower_bound, history = 0, -np.inf, []
                if callback is not None:
                    callback(params, 0, lower_bound, history, False)
            else:
                params = {"weights": self.weights_, "means": self.means_,
                          "precisions_cholesky": self.precisions_cholesky_,
                          "covariances": getattr(self, "covariances_", None)}
                start, lower_bound, history = 0, self.lower_bound_, []
            converged = False
            n_iter = start
            if self.max_iter == 0:
                n_iter = 0
            for n_iter in range(start + 1, self.max_iter + 1):
                prev = lower_bound
                t0 = time.perf_counter()
                shift = _cv.default_shift(cov_type, params["weights"], params["means"])
                stats = _em_pass(X, source.zarr, params["weights"], params["means"],
                                 params["precisions_cholesky"], plan, shift=shift, covariance_type=cov_type)
                lower_bound = _g.mean_log_likelihood(stats)
                # Drop theta_t's (K, d, d) arrays before the M-step allocates theta_{t+1}'s
                # (the cost model counts three such arrays in the driver).
                params = None
                weights, means, cov = _cv.params_from_stats(cov_type, stats, shift, self.reg_covar)
                del stats
                params = {"weights": weights, "means": means, "covariances": cov,
                          "precisions_cholesky": _precision_cholesky(cov_type, cov)}
                history.append(lower_bound)
                change = lower_bound - prev
                if self.verbose:
                    print(f"  iteration {n_iter}: lower bound {lower_bound:.10g}, change {change:.3g} "
                          f"({time.perf_counter() - t0:.2f} s)", flush=True)
                converged = abs(change) < self.tol
                if callback is not None:
                    callback(params, n_iter, lower_bound, history, converged)
                if converged:
                    break
            if start >= self.max_iter and state is not None:
                converged = bool(state.get("converged", False))
            if best is None or lower_bound > best[0] or best[0] == -np.inf:
                best = (lower_bound, params, n_iter, converged, history)
        lower_bound, params, n_iter, converged, history = best
        self.converged_ = converged
        if not converged and self.max_iter > 0:
            warnings.warn("Best performing initialization did not converge. Try different init "
                          "parameters, or increase max_iter, tol, or check for degenerate data.",
                          sklearn_flavoured(ConvergenceWarning, "ConvergenceWarning"), stacklevel=4)
        # A previous sharded fit's store goes now, not before: a warm start read from it.
        params = {name: None if value is None else np.asarray(value) for name, value in params.items()}
        self._forget_store()
        self.weights_ = params["weights"]
        self.means_ = params["means"]
        self.precisions_cholesky_ = params["precisions_cholesky"]
        # No M-step yet (max_iter=0 from precisions_init): the covariances the factors stand for.
        cov = params.get("covariances")
        self.covariances_ = _cv.covariances_from_cholesky(cov_type, self.precisions_cholesky_) if cov is None else cov
        self.precisions_ = _cv.precisions_from_cholesky(cov_type, self.precisions_cholesky_)
        self._fitted_covariance_type = cov_type
        self.n_iter_ = n_iter
        self.lower_bound_ = lower_bound
        self.lower_bounds_ = history
        self.n_features_in_ = X.shape[1]
        return self

    def _forget_store(self):
        self.__dict__.pop("_sharded", None)

    def _fit_sharded(self, source, X, plan, given, callback, state, do_init, rs, root):
        """EM with the parameters sharded by component in a store (:mod:`pipeline.shards`).

        The same iteration as the fused pass, from the same start; the driver holds
        O(K d) numbers.  Iteration t is written to ``root/_iter<t % 2>`` while
        ``_iter<(t - 1) % 2>`` (the one it reads) stays whole.
        """
        n, d = source.shape
        K = self.n_components
        keep = None
        if root is None:
            keep = sh.TemporaryStore()
            root = keep.root
        n_init = self.n_init if do_init else 1
        best = None
        for init in range(n_init):
            base = root if n_init == 1 else root.require_group(f"_init{init}")
            if state is not None:
                params = state["params"]
                if not isinstance(params, sh.ShardedParameters):
                    # Saved by an unsharded run (another budget): its arrays gain the
                    # sharded terms in place, a group at a time.
                    params = sh.write_parameters(sh.ShardedParameters.create(state["group"], K, d),
                                                 params["weights"][...], params["means"][...],
                                                 covariances=params["covariances"],
                                                 precisions_cholesky=params["precisions_cholesky"],
                                                 group=plan["component_group"])
                start, lower_bound, history = state["n_iter"], state["lower_bound"], list(state["history"])
            elif do_init:
                params = self._initialize_sharded(source, X, rs, given, plan, base.require_group("_iter0"))
                start, lower_bound, history = 0, -np.inf, []
                if callback is not None:
                    callback(params, 0, lower_bound, history, False)
            else:  # warm start from the fitted model (its factors read a group at a time)
                params = sh.ShardedParameters.create(base.require_group("_iter0"), K, d)
                sh.write_parameters(params, self.weights_, self.means_, covariances=self.covariances_,
                                    precisions_cholesky=self.precisions_cholesky_, group=plan["component_group"])
                start, lower_bound, history = 0, self.lower_bound_, []
            converged = False
            n_iter = 0 if self.max_iter == 0 else start
            for n_iter in range(start + 1, self.max_iter + 1):
                prev = lower_bound
                t0 = time.perf_counter()
                res = sh.em_iteration(source, params, base.require_group(f"_iter{n_iter % 2}"),
                                      base.require_group("_scratch"), plan, self.reg_covar)
                params = res["out"]
                lower_bound = res["log_likelihood"] / n
                history.append(lower_bound)
                change = lower_bound - prev
                if self.verbose:
                    print(f"  iteration {n_iter}: lower bound {lower_bound:.10g}, change {change:.3g} "
                          f"({time.perf_counter() - t0:.2f} s, {100 * res['skipped'] / max(res['pairs'], 1):.1f}% "
                          "of (row, component) pairs pruned)", flush=True)
                converged = abs(change) < self.tol
                if callback is not None:
                    callback(params, n_iter, lower_bound, history, converged)
                if converged:
                    break
            if "_scratch" in base:
                del base["_scratch"]
            if start >= self.max_iter and state is not None:
                converged = bool(state.get("converged", False))
            if best is None or lower_bound > best[0] or best[0] == -np.inf:
                if best is not None and n_init > 1:
                    del root[best[5]]
                best = (lower_bound, params, n_iter, converged, history, f"_init{init}")
            elif n_init > 1:
                del root[f"_init{init}"]
        lower_bound, params, n_iter, converged, history, _ = best
        self.converged_ = converged
        if not converged and self.max_iter > 0:
            warnings.warn("Best performing initialization did not converge. Try different init "
                          "parameters, or increase max_iter, tol, or check for degenerate data.",
                          sklearn_flavoured(ConvergenceWarning, "ConvergenceWarning"), stacklevel=4)
        self._set_sharded(params, plan["component_group"], keep)
        self.n_iter_ = n_iter
        self.lower_bound_ = lower_bound
        self.lower_bounds_ = history
        self.n_features_in_ = d
        return self

    def _set_sharded(self, params, group, keep=None):
        """Fitted attributes from stored parameters: O(K d) ones loaded, K d^2 ones as StoredArray."""
        if keep is not None:  # the temporary store lives as long as the model or its attributes
            params.owner = keep
        small = params.small()
        self.weights_, self.means_ = small["weights"], small["means"]
        self.covariances_ = params.attribute("covariances")
        self.precisions_cholesky_ = params.attribute("precisions_cholesky")
        self.precisions_ = (params.attribute("precisions") if "precisions" in params.group
                            else params.write_precisions(group))
        self._fitted_covariance_type = "full"
        self._sharded = params  # its owner, the temporary store, lives as long as the model

    def _initialize_sharded(self, source, X, rs, given, plan, group):
        """The start, written group by group: scikit-learn's strategies, or the given arrays."""
        import uuid

        w, m, pc = given
        K, (n, d) = self.n_components, source.shape
        params = sh.ShardedParameters.create(group, K, d)
        if w is not None and m is not None and pc is not None:
            return sh.write_parameters(params, w, m, precisions_cholesky=pc, group=plan["component_group"])
        token = uuid.uuid4().hex
        if self.init_params == "kmeans":
            centers = _kmeans(X, K, rs)
            sh.m_step(source, None, params, None, plan, self.reg_covar, token, resp=("labels", centers, centers),
                      n_samples=n)
        elif self.init_params in ("k-means++", "random_from_data"):
            idx = _kmeans_plusplus(X, K, rs)[1] if self.init_params == "k-means++" else rs.choice(n, size=K,
                                                                                                 replace=False)
            sh.init_from_rows(params, _rows_at(X, idx), self.reg_covar, n, plan["component_group"])
        else:  # random
            mom = _checked_moments(X)
            shift = np.repeat(mom[1][None, :], K, axis=0)
            key = int(rs.randint(np.iinfo(np.int32).max))
            sh.m_step(source, None, params, None, plan, self.reg_covar, token, resp=("random", key, K, shift),
                      n_samples=n)
        if w is None and m is None and pc is None:
            return params
        # Some given, some drawn: the given ones replace theirs (scikit-learn's rule).
        small = params.small()
        w = small["weights"] if w is None else w
        m = small["means"] if m is None else m
        if pc is None:  # the drawn factors stay (each group read, then written back as it was)
            return sh.write_parameters(params, w, m, covariances=params.attribute("covariances"),
                                       precisions_cholesky=params.attribute("precisions_cholesky"),
                                       group=plan["component_group"])
        return sh.write_parameters(params, w, m, precisions_cholesky=pc, group=plan["component_group"])

    def fit(self, X, y=None):
        """Estimate the parameters with EM (``n_init`` starts, the best kept).

        Returns
        -------
        self
        """
        return self._fit(X)

    def fit_predict(self, X, y=None):
        """Fit, then label X with the fitted model (equals ``fit(X).predict(X)``)."""
        return self.fit(X).predict(X)

    # --------------------------------------------------------------- prediction
    def _check_fitted(self):
        if not hasattr(self, "precisions_cholesky_"):
            raise sklearn_flavoured(NotFittedError, "NotFittedError")(
                "This GaussianMixture instance is not fitted yet; call fit first")

    def _weighted_log_prob_lazy(self, X):
        """Lazy (n, K) weighted log-probabilities, one task per row block."""
        import dask

        self._check_fitted()
        source = as_rows(X, "X")
        # NaN and inf rows are named by the tasks that read them (_wlp_block), for every kind of input.
        if source.shape[1] != self.means_.shape[1]:
            raise InputError(f"X has {source.shape[1]} features, but GaussianMixture is expecting "
                             f"{self.means_.shape[1]} features as input (the model was fitted with "
                             f"{self.means_.shape[1]})")
        K = self.n_components
        stored = getattr(self, "_sharded", None)
        if stored is not None:
            # Sharded parameters: each block task reads the component groups one at a time.
            plan = _plan_sharded(source, K, self.memory_budget, predict=True)
            Xd = source.dask(rows=plan["rows"])
            shared = dask.delayed(stored.shared(plan["component_group"]), traverse=False)
            return Xd.map_blocks(sh.predict_block, shared, dtype=np.float64, chunks=(Xd.chunks[0], (K,)),
                                 token="pipeline-gmm-logprob")
        plan = _plan(source, self.n_components, self.memory_budget, self.covariance_type)
        Xd = source.dask(rows=plan["rows"])
        prepared = _cv.prepare_parameters(self.covariance_type, self.weights_, self.means_,
                                          self.precisions_cholesky_)
        shared = dask.delayed(prepared, traverse=False)
        K = self.n_components
        return Xd.map_blocks(_wlp_block, shared, dtype=np.float64, chunks=(Xd.chunks[0], (K,)),
                             token="pipeline-gmm-logprob")

    @staticmethod
    def _finish(X, lazy):
        if isinstance(X, np.ndarray) or not _is_lazy_input(X):
            (out,) = compute(lazy)
            return out
        return lazy

    def score_samples(self, X):
        """Log of the mixture density at each row: (n,) (lazy for out-of-core X)."""
        wlp = self._weighted_log_prob_lazy(X)
        return self._finish(X, wlp.map_blocks(_lse_block, drop_axis=1, dtype=np.float64,
                                               token="pipeline-gmm-score"))

    def score(self, X, y=None):
        """Mean log-likelihood of X under the model (a float)."""
        wlp = self._weighted_log_prob_lazy(X)
        s = wlp.map_blocks(_lse_block, drop_axis=1, dtype=np.float64, token="pipeline-gmm-score")
        (total,) = compute(s.sum())
        return float(total) / wlp.shape[0]

    def predict(self, X):
        """Most probable component of each row: (n,) int64."""
        wlp = self._weighted_log_prob_lazy(X)
        return self._finish(X, wlp.argmax(axis=1))

    def predict_proba(self, X):
        """Responsibilities: (n, n_components), rows sum to 1."""
        wlp = self._weighted_log_prob_lazy(X)
        return self._finish(X, wlp.map_blocks(_proba_block, dtype=np.float64,
                                               token="pipeline-gmm-proba"))

    # ------------------------------------------------------- model selection
    def _n_parameters(self):
        """Free parameters of the fitted model (scikit-learn's count)."""
        self._check_fitted()
        return _cv.n_parameters(self.covariance_type, self.n_components, self.means_.shape[1])

    def bic(self, X):
        """Bayesian information criterion on X: ``-2 n score(X) + p log n`` (lower is better).

        One pass over X (out of core like :meth:`score`).
        """
        n = as_rows(X, "X").shape[0]
        return -2 * self.score(X) * n + self._n_parameters() * np.log(n)

    def aic(self, X):
        """Akaike information criterion on X: ``-2 n score(X) + 2 p`` (lower is better)."""
        n = as_rows(X, "X").shape[0]
        return -2 * self.score(X) * n + 2 * self._n_parameters()

    def sample(self, n_samples=1, *, out=None, overwrite=False):
        """Draw ``n_samples`` rows from the fitted mixture, as scikit-learn does.

        The draws are scikit-learn's, from the same ``random_state``: one multinomial
        split over the components, then each component's rows in order
        (``multivariate_normal`` for full and tied, scaled standard normals for diag
        and spherical).  With ``out`` they are written to a dataset there piece by
        piece (``X`` float64 and ``y`` the component), never held whole: the same
        numbers, for any ``n_samples``.

        Parameters
        ----------
        n_samples : int, default=1
        out : str or Path, optional
            Dataset URL to write to instead of returning arrays.
        overwrite : bool, default=False

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), y : ndarray of shape (n_samples,)
            Or, with ``out``, the :class:`pipeline.Dataset` written.
        """
        self._check_fitted()
        if not isinstance(n_samples, (int, np.integer)) or isinstance(n_samples, bool) or n_samples < 1:
            raise InputError(f"n_samples={n_samples!r} must be an integer >= 1")
        if getattr(self, "covariances_", None) is None:
            raise InputError("this model has no covariances_ yet (fitted with max_iter=0 from precisions_init); "
                             "fit at least one iteration before sampling")
        rs = _check_random_state(self.random_state)
        counts = rs.multinomial(n_samples, self.weights_)
        pieces = _sample_pieces(rs, self.covariance_type, self.means_, self.covariances_, counts,
                                piece_rows=None if out is None else _sample_rows(self.means_.shape[1]))
        if out is None:
            parts = list(pieces)
            return np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        from .store.ingest import write_pieces

        # A seeded draw is a job (rerun: already complete); an unseeded one is new each time.
        seeded = isinstance(self.random_state, (int, np.integer))
        job = job_fingerprint(sample=int(n_samples), model=_model_token(self)) if seeded else None
        return write_pieces(out, pieces, n_samples=int(n_samples), n_features=self.means_.shape[1],
                            overwrite=overwrite, job=job)


def _sample_rows(n_features):
    """Rows per piece of an out-of-core sample: about 32 MiB of float64."""
    return max(1, 2**25 // (8 * n_features))


def _sample_pieces(rs, covariance_type, means, covariances, counts, piece_rows=None):
    """(X, y) pieces of scikit-learn's ``sample``, in its order, drawing from ``rs``.

    Drawing a component's rows in pieces consumes ``rs``'s stream exactly as one call
    does (RandomState's normals come in sequence), so the numbers are scikit-learn's.
    """
    d = means.shape[1]
    for k, count in enumerate(int(c) for c in counts):
        step = count if piece_rows is None else piece_rows
        for r0 in range(0, count, max(step, 1)):
            m = min(step, count - r0)
            if covariance_type in ("full", "tied"):
                cov = covariances[k] if covariance_type == "full" else covariances
                X = rs.multivariate_normal(means[k], cov, m)
            else:
                X = means[k] + rs.standard_normal(size=(m, d)) * np.sqrt(covariances[k])
            yield X.astype(np.float64, copy=False), np.full(m, k, dtype=np.int64)


def _model_token(gm):
    from dask.base import tokenize

    return tokenize(gm.covariance_type, gm.weights_, gm.means_, gm.covariances_, gm.random_state)


def _is_lazy_input(X):
    # NumPy-like inputs get NumPy results (scikit-learn semantics); dask arrays, Zarr
    # arrays, datasets and URLs get lazy dask arrays.
    import dask.array as da

    if isinstance(X, (da.Array, str, Path)):
        return True
    mod = type(X).__module__
    return mod.startswith("zarr") or mod.startswith("pipeline")


def _wlp_block(block, prepared, block_info=None):
    # A store's or a dask array's rows are checked here, where they are read: a NaN row
    # would otherwise give NaN scores and component 0, a result that looks complete.
    check_finite_rows(block, block_info[0]["array-location"][0][0] if block_info else 0)
    # Entries that cannot matter are -inf: every use below goes through exp(a - max).
    return _cv.weighted_log_prob(block, prepared, sparse=True)


def _lse_block(wlp):
    return _g.logsumexp_rows(wlp)


def _proba_block(wlp):
    lse = _g.logsumexp_rows(wlp)
    return np.exp(wlp - lse[:, None])


# -------------------------------------------------------------------- stored jobs

def _save_model(group, params, n_iter, lower_bound, history, converged, job, covariance_type):
    K, d = params["means"].shape
    cov = params.get("covariances")
    if cov is None:
        cov = _cv.covariances_from_cholesky(covariance_type, params["precisions_cholesky"])
    for name, value in (("weights", params["weights"]), ("means", params["means"]),
                        ("covariances", cov), ("precisions_cholesky", params["precisions_cholesky"])):
        value = np.asarray(value, dtype=np.float64)
        if name not in group:
            group.create_array(name, shape=value.shape, dtype=np.float64,
                               chunks=(1,) + value.shape[1:] if value.ndim == 3 else value.shape)
        group[name][...] = value
    _record_iteration(group.attrs, K, d, n_iter, lower_bound, history, converged, job, covariance_type)


def _record_iteration(attrs, K, d, n_iter, lower_bound, history, converged, job, covariance_type):
    """The one attributes write that records a saved iteration."""
    meta = dict(attrs["pipeline"])
    meta.update(n_iter=int(n_iter), lower_bound=float(lower_bound) if np.isfinite(lower_bound) else None,
                history=[float(h) for h in history], converged=bool(converged),
                n_components=int(K), n_features=int(d), covariance_type=covariance_type, job=job)
    attrs["pipeline"] = meta


def fit_to_store(data, model_url, *, n_components=1, covariance_type="full", max_iter=100, tol=1e-3,
                 reg_covar=1e-6, init_params="kmeans", random_state=0, memory_budget=None, overwrite=False,
                 verbose=0, on_iteration=None):
    """Fit a mixture on a stored dataset, saving the model after every iteration.

    Rerun on an incomplete model of the same job (the same data, by content, and the
    same parameters), it resumes from the last saved iteration (the same EM path as
    an uninterrupted run); on a complete one it says so and returns.

    Parameters
    ----------
    data : str, Path, array
        Dataset URL (or any X :func:`em_step` accepts).
    model_url : str or Path
        Where the model group goes (``kind: gmm``).
    n_components, covariance_type, max_iter, tol, reg_covar, init_params, random_state
        As :class:`GaussianMixture`.
    memory_budget : int or str, optional
    overwrite : bool
        Replace whatever is at ``model_url``.
    on_iteration : callable, optional
        Called with the iteration's number once it is saved.

    Returns
    -------
    dict
        A summary for the CLI: model, status, n_iter, converged, lower_bound, seconds.

    Examples
    --------
    >>> import pipeline as pl
    >>> ds = pl.make_blobs("memory://doc/gmm-data", 300, 2, centers=2)
    >>> fit_to_store("memory://doc/gmm-data", "memory://doc/gmm-model", n_components=2,
    ...              memory_budget="64MiB")["status"]
    'complete'
    """
    t0 = time.perf_counter()
    source = as_rows(data, "X")
    # The type joins the fingerprint only when it is not "full": full models written
    # before there were other types keep their identity (and resume).
    kind = {} if covariance_type == "full" else {"covariance_type": covariance_type}
    job = job_fingerprint(data=source.identity(), n_components=n_components, max_iter=max_iter,
                          tol=tol, reg_covar=reg_covar, init_params=init_params,
                          random_state=random_state, **kind)
    gm = GaussianMixture(n_components=n_components, covariance_type=covariance_type, tol=tol,
                         reg_covar=reg_covar, max_iter=max_iter, init_params=init_params,
                         random_state=random_state, memory_budget=memory_budget, verbose=verbose)
    # Bad input and impossible budgets fail before anything is written at model_url.
    gm._validate(source)
    _plan(source, n_components, memory_budget, covariance_type)
    if not overwrite:
        _check_stored_type(model_url, covariance_type)
    with ResultWriter(model_url, "gmm", job, overwrite=overwrite, resume=True,
                      attrs={"covariance_type": covariance_type}) as result:
        if result.status == "complete":
            meta = result.attrs
            return {"model": str(model_url), "status": "already complete (same job); nothing to do",
                    "n_iter": meta.get("n_iter"), "converged": meta.get("converged"),
                    "lower_bound": meta.get("lower_bound")}
        state = _checkpoint_state(result) if result.status == "resume" else None
        if result.status == "resume" and state is None:
            result.restart()  # nothing useful saved yet: start again
        group = result.group

        def save(params, n_iter, lower_bound, history, converged):
            # Iteration t goes to checkpoint group _iter<t % 2>, and the one attributes write
            # that records n_iter also points at it: a crash mid-save leaves the previous
            # iteration's checkpoint whole and named.  Sharded parameters are already
            # there (the pass wrote them): only the attributes switch.
            name = f"_iter{n_iter % 2}"
            if isinstance(params, sh.ShardedParameters):
                _record_iteration(_CheckpointAttrs(group.attrs, name), params.n_components, params.n_features,
                                  n_iter, lower_bound, history, converged, job, covariance_type)
            else:
                if name not in group:
                    group.create_group(name)
                # Its sharded terms (log-dets, bounds) of an earlier sharded run are stale now.
                group[name].attrs["sharded"] = {"complete": False}
                _save_model(_Checkpoint(group, name), params, n_iter, lower_bound, history, converged, job,
                            covariance_type)
            if on_iteration is not None:
                on_iteration(n_iter)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported in the summary instead
            gm._fit(source, callback=save, state=state, root=group)
        stored = getattr(gm, "_sharded", None)
        if stored is not None:
            # The last iteration's store becomes the model's own arrays, a component at a time.
            top = sh.copy_parameters(stored, group)
            if "precisions" not in top.group:  # copied when the fit computed them (it does)
                top.write_precisions()
            _record_iteration(group.attrs, top.n_components, top.n_features, gm.n_iter_, gm.lower_bound_,
                              list(gm.lower_bounds_), gm.converged_, job, covariance_type)
        else:
            final = {"weights": gm.weights_, "means": gm.means_, "covariances": getattr(gm, "covariances_", None),
                     "precisions_cholesky": gm.precisions_cholesky_}
            _save_model(group, final, gm.n_iter_, gm.lower_bound_, list(gm.lower_bounds_), gm.converged_, job,
                        covariance_type)
        for name in ("_iter0", "_iter1", "_scratch"):
            if name in group:
                del group[name]
        meta = dict(group.attrs["pipeline"])
        meta.pop("checkpoint", None)
        group.attrs["pipeline"] = meta
        result.complete(converged=bool(gm.converged_), n_iter=int(gm.n_iter_), lower_bound=float(gm.lower_bound_))
    return {"model": str(model_url), "status": "complete",
            "resumed_from_iteration": None if state is None else state["n_iter"],
            "n_iter": int(gm.n_iter_), "converged": bool(gm.converged_),
            "lower_bound": float(gm.lower_bound_), "rows_per_block": gm.plan_["rows"],
            "seconds": round(time.perf_counter() - t0, 3)}


def _check_stored_type(model_url, covariance_type):
    """Refuse, naming both, to fit one covariance type into a model store of another."""
    meta = existing(model_url)
    if meta and meta.get("kind") == "gmm":
        stored = meta.get("covariance_type", "full")
        if stored != covariance_type:
            raise InputError(f"{model_url} holds a covariance_type={stored!r} model; this fit is "
                             f"covariance_type={covariance_type!r}: overwrite it (--overwrite, overwrite=True) "
                             "or write to another model store")


def _checkpoint_state(result):
    """The last saved iteration of an incomplete model, as ``GaussianMixture._fit``'s state, or None."""
    meta = result.attrs
    group = result.group
    # The iteration's parameters sit in the checkpoint the attributes name (written
    # whole before the attributes switch to it); older models kept them at the top.
    saved = group[meta["checkpoint"]] if meta.get("checkpoint") in group else group
    if "precisions_cholesky" not in saved or meta.get("n_iter") is None:
        return None
    lb = meta.get("lower_bound")
    if saved.attrs.get("sharded", {}).get("complete"):
        params = sh.ShardedParameters(saved)  # read a group at a time, never loaded whole
    else:
        params = {name: saved[name] for name in ("weights", "means", "covariances", "precisions_cholesky")}
    return {"params": params, "n_iter": int(meta["n_iter"]), "history": meta.get("history", []),
            "lower_bound": -np.inf if lb is None else float(lb), "converged": meta.get("converged", False),
            "group": saved}


class _Checkpoint:
    """A model group as ``_save_model`` sees it: arrays go to the checkpoint group
    ``name``, and the attributes write that records the iteration also names it."""

    def __init__(self, group, name):
        self._slot, self.attrs = group[name], _CheckpointAttrs(group.attrs, name)

    def __contains__(self, key):
        return key in self._slot

    def __getitem__(self, key):
        return self._slot[key]

    def create_array(self, *args, **kwargs):
        return self._slot.create_array(*args, **kwargs)


class _CheckpointAttrs:
    def __init__(self, attrs, name):
        self._attrs, self._name = attrs, name

    def __getitem__(self, key):
        return self._attrs[key]

    def get(self, key, default=None):
        return self._attrs.get(key, default)

    def __setitem__(self, key, value):
        if key == "pipeline":
            value = {**value, "checkpoint": self._name}
        self._attrs[key] = value


def load_model(model_url, memory_budget=None):
    """A fitted :class:`GaussianMixture` from a complete model store.

    Examples
    --------
    >>> import pipeline as pl
    >>> ds = pl.make_blobs("memory://doc/gmm-d2", 200, 2, centers=2)
    >>> _ = fit_to_store("memory://doc/gmm-d2", "memory://doc/gmm-m2", n_components=2, memory_budget="64MiB")
    >>> load_model("memory://doc/gmm-m2").n_components
    2
    """
    g = open_result(model_url, kind="gmm")
    meta = dict(g.attrs["pipeline"])
    cov_type = meta.get("covariance_type", "full")  # models of before the other types are full
    K, d = int(meta["n_components"]), int(meta["n_features"])
    gm = GaussianMixture(n_components=K, covariance_type=cov_type, memory_budget=memory_budget)
    want = _cv.parameter_shape(cov_type, K, d)
    for name in ("covariances", "precisions_cholesky"):
        if tuple(g[name].shape) != want:
            raise InputError(f"{model_url}: {name} has shape {tuple(g[name].shape)}, but a "
                             f"covariance_type={cov_type!r} model of {K} components and {d} features has {want}; "
                             "the store is damaged or not a pipeline model: fit it again")
    gm.converged_ = bool(meta.get("converged"))
    gm.n_iter_ = int(meta.get("n_iter", 0))
    gm.lower_bound_ = meta.get("lower_bound")
    gm.n_features_in_ = d
    if cov_type == "full" and _larger_than_budget(K, d, memory_budget):
        # A model larger than the budget: its K d^2 attributes stay in a store.
        if g.attrs.get("sharded", {}).get("complete"):
            gm._set_sharded(sh.ShardedParameters(g), 1)
        else:  # fitted unsharded: the sharded terms to a temporary store, a component at a time
            keep = sh.TemporaryStore()
            params = sh.write_parameters(sh.ShardedParameters.create(keep.group("params"), K, d, owner=keep),
                                         g["weights"][...], g["means"][...], covariances=g["covariances"],
                                         precisions_cholesky=g["precisions_cholesky"], group=1)
            gm._set_sharded(params, 1, keep)
        return gm
    gm.weights_ = g["weights"][...]
    gm.means_ = g["means"][...]
    gm.covariances_ = g["covariances"][...]
    gm.precisions_cholesky_ = g["precisions_cholesky"][...]
    gm.precisions_ = _cv.precisions_from_cholesky(cov_type, gm.precisions_cholesky_)
    gm._fitted_covariance_type = cov_type
    return gm


def _larger_than_budget(K, d, memory_budget):
    """Whether a full model's K d^2 attributes (factors, covariances, precisions and a
    prediction's prepared copy) would take more than half of ``memory_budget``."""
    from .sizes import parse_budget

    return 4 * K * d * d * 8 > parse_budget(memory_budget) / 2


def _labels_block(wlp):
    return wlp.argmax(axis=1).astype(np.int64)


def predict_to_store(model_url, data, out, *, memory_budget=None, overwrite=False, on_block=None):
    """Label a dataset with a stored model; writes ``labels`` and ``log_likelihood``.

    The output group has ``kind: gmm-predictions``, arrays ``labels`` (n,) int64 and
    ``log_likelihood`` (n,) float64 (``score_samples``), one pass over the data.

    Returns
    -------
    dict
        A summary for the CLI: out, n_samples, mean log-likelihood, seconds.

    Examples
    --------
    >>> import pipeline as pl
    >>> ds = pl.make_blobs("memory://doc/gmm-d3", 200, 2, centers=2)
    >>> _ = fit_to_store("memory://doc/gmm-d3", "memory://doc/gmm-m3", n_components=2, memory_budget="64MiB")
    >>> predict_to_store("memory://doc/gmm-m3", "memory://doc/gmm-d3", "memory://doc/gmm-p3")["n_samples"]
    200
    """
    t0 = time.perf_counter()
    gm = load_model(model_url, memory_budget=memory_budget)
    wlp = gm._weighted_log_prob_lazy(data)
    job = job_fingerprint(model=content_identity(model_url), data=content_identity(data))
    with ResultWriter(out, "gmm-predictions", job, overwrite=overwrite, resume=True, on_block=on_block) as result:
        if result.status == "complete":
            return {"out": str(out), "status": "already complete (same job); nothing to do"}
        if "labels" in result.group and result.group["labels"].chunks[0] != wlp.chunks[0][0]:
            result.restart()  # started with other blocks (another budget): a pass is cheap, start again
        rows = wlp.chunks[0]
        labels = wlp.map_blocks(_labels_block, drop_axis=1, dtype=np.int64, token="pipeline-gmm-labels")
        ll = wlp.map_blocks(_lse_block, drop_axis=1, dtype=np.float64, token="pipeline-gmm-score")
        pairs = [(arr, result.array(name, arr.shape, (rows[0],), arr.dtype, compressors="auto"))
                 for name, arr in (("labels", labels), ("log_likelihood", ll))]
        writes, written, kept = result.write_blocks(pairs, "gmm-predict-write")
        if writes is not None:
            compute(writes, label="predicting")
        total = float(np.sum(result.group["log_likelihood"][...]))  # 8 bytes a row, read back: resumes too
        n = wlp.shape[0]
        result.complete(n_samples=int(n), mean_log_likelihood=float(total) / n, model=str(model_url))
    return {"out": str(out), "status": "complete", "n_samples": int(n),
            "mean_log_likelihood": float(total) / n, "seconds": round(time.perf_counter() - t0, 3)}
