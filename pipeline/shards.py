"""Full-covariance mixture parameters sharded by component: their store, and EM over them.

A mixture of K full-covariance components over d features holds K d^2 numbers three
times (factors, covariances, precisions): 3.6 GiB at K = 200, d = 900.  Here they
never sit whole in one process:

* :class:`ShardedParameters` keeps them in a Zarr group chunked by component
  (``precisions_cholesky`` and ``covariances`` (K, d, d) in (1, d, d) chunks) with the
  small per-component terms beside them (weights, means, log-determinants, the pruning
  bounds' terms of :func:`pipeline.kernels.gaussian.bounds_table`).
* :func:`em_iteration` runs one EM iteration from one such group into another:

  1. **E**: tasks of (row block x component groups) compute each (row, component)
     log-density once and write them to a scratch Zarr array (n x K float64), with
     each row's log-sum-exp (the normaliser; its sum is the lower bound).  Either every
     task holds one row block and streams the component groups past it (X read once,
     the factors once per block) or holds one group and streams the row blocks past
     it (the factors read once, X once per group): the plan picks the order that
     moves fewer bytes (:func:`pipeline.budget.plan`).
  2. **M**: per component group, tasks stream row blocks past the group's statistics
     (N, S1, S2: g (d^2 + d + 1) floats), responsibilities ``exp(logp - lse)`` read
     back from scratch; a task per group sums the parts, computes the group's new
     parameters (one Cholesky per component) and writes them.

The driver holds O(K d) numbers (means, weights), never a K d^2 array.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .inputs import check_finite_rows, rows_of
from .kernels import gaussian as _g
from .kernels import kmeans as _km
from .kernels.buffers import scratch
from .runtime import compute, delayed_of, reduce_tree, thread_work

__all__ = ["ShardedParameters", "StoredArray", "TemporaryStore", "em_iteration", "write_parameters", "Scratch"]

#: The arrays of a sharded parameter group, and their shapes in (K, d, r).
_LAYOUT = {
    "weights": lambda K, d, r: (K,),
    "means": lambda K, d, r: (K, d),
    "precisions_cholesky": lambda K, d, r: (K, d, d),
    "covariances": lambda K, d, r: (K, d, d),
    "log_det": lambda K, d, r: (K,),
    "bound_smax2": lambda K, d, r: (K,),
    "bound_base2": lambda K, d, r: (K,),
    "bound_stretched": lambda K, d, r: (K,),
    "bound_dirs": lambda K, d, r: (K, d, r),
    "bound_dirs_gap": lambda K, d, r: (K, r),
}
#: Arrays written by the tasks, a component per chunk; the others (O(K d)) by the driver.
_PER_COMPONENT = ("precisions_cholesky", "covariances", "bound_dirs")
#: Arrays the driver reads whole (O(K d) numbers).
_SMALL = ("weights", "means", "log_det", "bound_smax2", "bound_base2", "bound_stretched", "bound_dirs_gap")


def _n_dirs(d):
    return min(_g.PRUNE_DIRECTIONS, d - 1)


def prunes(n_components, n_features):
    """Whether the sharded pass skips provably negligible pairs (as the fused pass does)."""
    return n_components >= _g.PRUNE_MIN_COMPONENTS and n_features <= _g.PRUNE_MAX_FEATURES


class StoredArray:
    """A fitted attribute kept in a model store: NumPy-style indexing reads, ``np.asarray`` loads.

    What a fitted :class:`pipeline.GaussianMixture` exposes as ``covariances_`` (and the
    other K x d x d attributes) when they are larger than its memory budget.

    Examples
    --------
    >>> import numpy as np, zarr
    >>> z = zarr.create_array("memory://doc/stored", shape=(3, 2, 2), chunks=(1, 2, 2), dtype="f8")
    >>> z[...] = np.arange(12.0).reshape(3, 2, 2)
    >>> a = StoredArray(z)
    >>> a.shape, a[1, 0, 1], np.asarray(a[2]).sum()
    ((3, 2, 2), np.float64(5.0), np.float64(38.0))
    """

    def __init__(self, array, owner=None):
        self._array = array
        self._owner = owner  # a TemporaryStore holding the array: kept alive with it

    def _read(self, key):
        if self._owner is not None and not self._owner.exists():
            raise InputError(f"the temporary store {self._owner.path} of this array was removed (with the model "
                             "or result that owned it); fit with a model store to keep the parameters")
        return self._array[key]

    shape = property(lambda self: tuple(self._array.shape))
    dtype = property(lambda self: np.dtype(self._array.dtype))
    ndim = property(lambda self: len(self._array.shape))
    size = property(lambda self: math.prod(self._array.shape))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        out = self._read(key)
        return out[()] if isinstance(out, np.ndarray) and out.ndim == 0 else out  # a scalar, as NumPy's

    def __iter__(self):
        for k in range(len(self)):
            yield self._read(k)

    def __array__(self, dtype=None, copy=None):
        out = self._read(Ellipsis)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __dask_tokenize__(self):
        return ("pipeline-stored-array", self.url, self.shape, str(self.dtype))

    def __repr__(self):
        return f"StoredArray(shape={self.shape}, dtype={self.dtype}, store={self.url!r})"

    @property
    def url(self):
        """Where the array is stored."""
        from .store.urls import group_url

        return f"{group_url(self._array) or self._array.store}"


class TemporaryStore:
    """A Zarr group in a new temporary directory, removed with this object (or at exit).

    Where a fit that was given no model store keeps its sharded parameters and
    scratch arrays (``TMPDIR`` chooses the disk).  On a cluster the workers must see
    the same directory: give a model store on shared storage instead.
    """

    def __init__(self, prefix="pipeline-gmm-"):
        import shutil
        import tempfile
        import weakref

        import zarr

        self.path = tempfile.mkdtemp(prefix=prefix)
        self.root = zarr.open_group(self.path, mode="w", zarr_format=3)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)

    def group(self, name):
        """The subgroup ``name`` (created if needed)."""
        return self.root.require_group(name)

    def exists(self):
        """Whether the directory is still there (a copy unpickled elsewhere does not own it)."""
        import os

        return os.path.isdir(self.path)

    def __reduce__(self):  # a copy in another process points at the same directory, not owning it
        return (_existing_store, (self.path,))


def _existing_store(path):
    import zarr

    store = object.__new__(TemporaryStore)
    store.path, store.root = path, zarr.open_group(path, mode="r+")
    return store


class ShardedParameters:
    """One iteration's full-covariance parameters in a Zarr group, chunked by component.

    Parameters
    ----------
    group : zarr.Group
        Holding the arrays of :data:`_LAYOUT` (see :meth:`create`).

    Attributes
    ----------
    n_components, n_features : int
    complete : bool
        Every array written (the last write marks it); an incomplete group is never read.
    owner : TemporaryStore or None
        The temporary store holding ``group``, kept alive by the attributes handed out.
    """

    def __init__(self, group, owner=None):
        self.group = group
        self.owner = owner
        means = group["means"]
        self.n_components, self.n_features = (int(n) for n in means.shape)

    @classmethod
    def create(cls, group, n_components, n_features, owner=None):
        """Create (or replace) the arrays of a K x d parameter set in ``group``; not complete yet."""
        K, d, r = n_components, n_features, _n_dirs(n_features)
        attrs = dict(group.attrs.get("sharded", {}))
        for name, shape in _LAYOUT.items():
            shape = shape(K, d, r)
            chunks = (1,) + shape[1:] if name in _PER_COMPONENT else shape
            dtype = bool if name == "bound_stretched" else np.float64
            if name in group and tuple(group[name].shape) == shape:
                continue
            if name in group:
                del group[name]
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=None,
                               config={"write_empty_chunks": True})
        if "precisions" in group:  # another iteration's
            del group["precisions"]
        attrs.update(complete=False, n_components=K, n_features=d)
        group.attrs["sharded"] = attrs
        return cls(group, owner)

    @property
    def complete(self):
        return bool(self.group.attrs.get("sharded", {}).get("complete", False))

    def mark_complete(self, **attrs):
        meta = dict(self.group.attrs.get("sharded", {}))
        meta.update(attrs, complete=True)
        self.group.attrs["sharded"] = meta

    def arrays(self):
        """The Zarr arrays a task reads (metadata and path: what the graph carries)."""
        return {name: self.group[name] for name in _LAYOUT}

    def small(self):
        """The O(K d) arrays, read whole: weights, means, log_det and the bounds' terms."""
        return {name: self.group[name][...] for name in _SMALL}

    def attribute(self, name):
        """A K x d x d array as a :class:`StoredArray`."""
        return StoredArray(self.group[name], self.owner)

    def write_precisions(self, group=1):
        """Store ``precisions`` = ``P P^T`` (scikit-learn's ``precisions_``), ``group`` components at a time."""
        K, d = self.n_components, self.n_features
        arr = self.group.require_array("precisions", shape=(K, d, d), chunks=(1, d, d), dtype=np.float64,
                                       compressors=None)
        P = self.group["precisions_cholesky"]
        for a in range(0, K, group):
            f = P[a:a + group]
            arr[a:a + group] = f @ f.transpose(0, 2, 1)
        return StoredArray(arr, self.owner)

    def shared(self, group):
        """What a prediction task reads: arrays (metadata), the small terms, the groups."""
        return {"arrays": self.arrays(), "small": self.small(), "groups": _groups(self.n_components, group),
                "prune": prunes(self.n_components, self.n_features)}


def read_group(arrays, small, a, b, prune):
    """Task side: components ``a .. b - 1`` prepared for the E-step (their factors read here)."""
    P = arrays["precisions_cholesky"][a:b]
    means = small["means"][a:b]
    bounds = None
    if prune:
        table = {"base2": small["bound_base2"][a:b], "smax2": small["bound_smax2"][a:b],
                 "stretched": small["bound_stretched"][a:b], "dirs_gap": small["bound_dirs_gap"][a:b],
                 "dirs": arrays["bound_dirs"][a:b] if small["bound_stretched"][a:b].any()
                 else np.zeros((b - a, means.shape[1], _n_dirs(means.shape[1])))}
        bounds = _g.bounds_from_table(means, table)
    with np.errstate(divide="ignore"):
        log_weights = np.log(small["weights"][a:b])
    return _g.prepare_parameters(None, means, P, log_weights=log_weights, log_det=small["log_det"][a:b],
                                 bounds=bounds, prune=False)


def summary_of(small):
    """The whole mixture's O(K d) terms for the rows' lower bounds (:func:`best_lower_bound`)."""
    with np.errstate(divide="ignore"):
        log_weights = np.log(small["weights"])
    return _g.mixture_summary(log_weights, small["log_det"], small["means"], small["bound_smax2"])


def write_parameters(params, weights, means, *, covariances=None, precisions_cholesky=None, group=16):
    """Write in-memory parameters into a created :class:`ShardedParameters`, group by group.

    Either ``covariances`` (the factors are computed) or ``precisions_cholesky`` (the
    covariances are computed from them) or both; K x d x d arrays the caller already
    holds are read ``group`` components at a time.
    """
    K, d = params.n_components, params.n_features
    arrays = params.arrays()
    small = {name: np.zeros(arrays[name].shape, dtype=arrays[name].dtype) for name in _SMALL}
    small["weights"][:] = weights
    small["means"][:] = means
    for a in range(0, K, group):
        b = min(K, a + group)
        if precisions_cholesky is None:
            cov = np.asarray(covariances[a:b], dtype=np.float64)
            P = _g.compute_precision_cholesky(cov)
        else:
            P = np.asarray(precisions_cholesky[a:b], dtype=np.float64)
            cov = (np.asarray(covariances[a:b], dtype=np.float64) if covariances is not None
                   else _covariances_of(P))
        for name, value in _write_components(arrays, a, cov, P, prunes(K, d)).items():
            small[name][a:b] = value
    for name in _SMALL:
        arrays[name][...] = small[name]
    params.mark_complete()
    return params


def _covariances_of(P):
    """Covariances from precision factors: ``inv(P P^T)``, one component at a time."""
    out = np.empty_like(P)
    for k in range(len(P)):
        inv = np.linalg.inv(P[k])  # P upper triangular: Sigma = inv(P)^T inv(P)
        out[k] = inv.T @ inv
    return out


def _write_components(arrays, c0, cov, P, prune):
    """Write components ``c0 ..`` (factors, covariances, bound directions); return their small terms."""
    g, d = P.shape[:2]
    c1 = c0 + g
    arrays["covariances"][c0:c1] = cov
    arrays["precisions_cholesky"][c0:c1] = P
    small = {"log_det": _g.log_det_cholesky(P)}
    if prune:
        t = _g.bounds_table(P)
        small.update({"bound_" + name: t[name] for name in ("base2", "smax2", "stretched", "dirs_gap")})
        if t["stretched"].any():
            arrays["bound_dirs"][c0:c1] = t["dirs"]
    else:  # never read: no bounds without pruning
        small.update(bound_base2=np.zeros(g), bound_smax2=np.full(g, np.inf), bound_stretched=np.zeros(g, bool),
                     bound_dirs_gap=np.zeros((g, _n_dirs(d))))
    return small


class Scratch:
    """The scratch arrays of one EM iteration: ``logp`` (n, K) and ``lse`` (n,), float64.

    ``logp`` is chunked (rows, group): every task writes whole chunks of its own.
    """

    def __init__(self, group, n, K, rows, group_size):
        self.group = group
        for name, shape, chunks in (("logp", (n, K), (rows, group_size)), ("lse", (n,), (rows,))):
            if name in group and (tuple(group[name].shape) != shape or tuple(group[name].chunks) != chunks):
                del group[name]
            if name not in group:
                group.create_array(name, shape=shape, chunks=chunks, dtype=np.float64, compressors=None,
                                   config={"write_empty_chunks": True})
        self.logp, self.lse = group["logp"], group["lse"]

    def clear(self):
        for name in ("logp", "lse"):
            if name in self.group:
                del self.group[name]


# -------------------------------------------------------------------------- tasks

def log_prob_block(X, arrays, small, groups, prune, work=None, out=None, on_group=None):
    """A block's (rows, K) weighted log-densities, the component groups read one at a time.

    Negligible pairs are ``-inf`` when ``prune`` (every use goes through ``exp(a - max)``).
    ``on_group(c0, c1, logp)`` sees each group's columns as they are made.  Returns
    the array and the pairs skipped.
    """
    X = _g.as_float64(X)
    K = small["weights"].shape[0]
    best = _g.best_lower_bound(X, summary_of(small), work) if prune else None
    logp = np.empty((X.shape[0], K)) if out is None else out
    skipped = 0
    for c0, c1 in groups:
        prepared = read_group(arrays, small, c0, c1, prune)
        _, s = _g.group_log_prob(X, prepared, best, work=work, out=logp[:, c0:c1])
        skipped += s
        if on_group is not None:
            on_group(c0, c1, logp[:, c0:c1])
    return logp, skipped


def predict_block(block, shared, block_info=None):
    """``map_blocks`` task of a sharded model's prediction: the block's weighted log-densities."""
    check_finite_rows(block, block_info[0]["array-location"][0][0] if block_info else 0)
    return log_prob_block(block, shared["arrays"], shared["small"], shared["groups"], shared["prune"],
                          thread_work())[0]


#: The per-thread buffers of one phase, dropped at the end of its tasks: the other
#: phase does not use them (the plan counts the phases apart).
_E_BUFFERS = ("shard-logp", "D2", "err", "lower", "q", "xa", "y", "em-gemm")
_M_BUFFERS = ("shard-resp", "em-rows")


def _drop_buffers(work, keys):
    for key in keys:
        work.pop(key, None)


def _e_rows(values, spans, arrays, small, groups, scratch_arrays, prune, block_starts):
    """E task, row blocks resident: for each of its row blocks, every component group streams past.

    Writes the block's log-densities and its rows' log-sum-exp; returns the lower
    bound's share and the pairs pruned.
    """
    work = thread_work()
    K = small["weights"].shape[0]
    ll, skipped, pairs = 0.0, 0, 0
    for value, (a, b), r0 in zip(values, spans, block_starts):
        X = _g.as_float64(rows_of(value, a, b, work))
        check_finite_rows(X, r0)
        r1 = r0 + X.shape[0]

        def write(c0, c1, part, r0=r0, r1=r1):
            scratch_arrays["logp"][r0:r1, c0:c1] = part

        logp, s = log_prob_block(X, arrays, small, groups, prune, work,
                                 out=scratch(work, "shard-logp", (X.shape[0], K)), on_group=write)
        skipped += s
        lse = _g.logsumexp_rows(logp)
        scratch_arrays["lse"][r0:r0 + X.shape[0]] = lse
        ll += float(lse.sum())
        pairs += X.shape[0] * K
    _drop_buffers(work, _E_BUFFERS)
    return {"log_likelihood": ll, "skipped": skipped, "pairs": pairs, "n": sum(b - a for a, b in spans)}


def _e_groups(values, spans, arrays, small, group, scratch_arrays, prune, block_starts):
    """E task, one component group resident: the row blocks stream past it (no lse yet)."""
    work = thread_work()
    summary = summary_of(small) if prune else None
    c0, c1 = group
    prepared = read_group(arrays, small, c0, c1, prune)
    skipped = 0
    for value, (a, b), r0 in zip(values, spans, block_starts):
        X = _g.as_float64(rows_of(value, a, b, work))
        if c0 == 0:
            check_finite_rows(X, r0)
        best = _g.best_lower_bound(X, summary, work) if prune else None
        logp, s = _g.group_log_prob(X, prepared, best, work=work,
                                    out=scratch(work, "shard-logp", (X.shape[0], c1 - c0)))
        skipped += s
        scratch_arrays["logp"][r0:r0 + X.shape[0], c0:c1] = logp
    _drop_buffers(work, _E_BUFFERS)
    return {"log_likelihood": 0.0, "skipped": skipped, "pairs": 0, "n": 0}


def _lse_rows(_done, scratch_arrays, r0, r1):
    """Task: the rows' log-sum-exp from their stored log-densities (after :func:`_e_groups`)."""
    lse = _g.logsumexp_rows(scratch_arrays["logp"][r0:r1])
    scratch_arrays["lse"][r0:r1] = lse
    return {"log_likelihood": float(lse.sum()), "skipped": 0, "pairs": lse.size * scratch_arrays["logp"].shape[1],
            "n": r1 - r0}


def _sum_e(parts):
    parts = list(parts)
    return {key: sum(p[key] for p in parts) for key in ("log_likelihood", "skipped", "pairs", "n")}


def _m_part(values, spans, block_starts, centres, group, scratch_arrays, resp):
    """M task: one component group's statistics over some row blocks, around ``centres[group]``.

    ``resp``: ``("em",)`` responsibilities ``exp(logp - lse)`` from scratch;
    ``("labels", centers)`` one-hot labels of the nearest centre (the kmeans start);
    ``("random", key, K)`` scikit-learn's uniform random start (per row, any chunking).
    """
    work = thread_work()
    c0, c1 = group
    shift = centres[c0:c1]
    stats = None
    for value, (a, b), r0 in zip(values, spans, block_starts):
        X = _g.as_float64(rows_of(value, a, b, work))
        m = X.shape[0]
        if resp[0] == "em":
            r = scratch(work, "shard-resp", (m, c1 - c0))
            r[...] = scratch_arrays["logp"][r0:r0 + m, c0:c1]
            r -= scratch_arrays["lse"][r0:r0 + m][:, None]
            np.exp(r, out=r)
        elif resp[0] == "labels":
            part = _km.labels_block_stats(X, resp[1], components=(c0, c1))
            if stats is None:
                stats = part
            else:  # in place: two sets of statistics at a time, not three
                for key in ("N", "S1", "S2", "n"):
                    stats[key] += part[key]
            del part
            continue
        else:
            r = random_resp(resp[1], resp[2], r0, m)[:, c0:c1]
        stats = _g.resp_block_stats(X, r, shift, out=stats, buf=scratch(work, "em-rows", (m, X.shape[1])))
    _drop_buffers(work, _M_BUFFERS)
    return stats


def random_resp(key, K, start, m):
    """scikit-learn's ``uniform(size=(n, K))`` start, normalised, for rows ``start .. start + m - 1``.

    A counter-based generator (Philox) positioned at value ``start * K`` gives every
    row the same numbers whatever the chunking.
    """
    first = start * K
    bitgen = np.random.Philox(key=key, counter=[first // 4, 0, 0, 0])
    skip = first % 4
    resp = np.random.Generator(bitgen).random(skip + m * K)[skip:].reshape(m, K)
    resp /= resp.sum(axis=1)[:, None]
    return resp


def _m_group(stats, arrays, centres, group, part, reg_covar, prune, stats_only=False):
    """Task: components ``part`` of a group's summed statistics -> their new parameters, written.

    ``stats`` is the root of the group's tree (components ``group``); the group's
    parts run as tasks side by side (one Cholesky and one SVD a component: minutes of
    serial work a group at d = 900 otherwise).  Returns the part's small terms;
    ``stats_only``: the statistics themselves, S2 written, N and S1 returned.
    """
    a, b = part[0] - group[0], part[1] - group[0]
    sub = {key: stats[key][a:b] for key in ("N", "S1", "S2")}
    if stats_only:
        arrays["S2"][part[0]:part[1]] = sub["S2"]
        return {"nk": sub["N"], "N": sub["N"], "S1": sub["S1"]}
    _, means, cov = _g.params_from_stats(sub, centres[part[0]:part[1]], reg_covar)
    try:
        P = _g.compute_precision_cholesky(cov)
    except ValueError as e:
        raise InputError(str(e)) from None
    small = _write_components(arrays, part[0], cov, P, prune)
    small.update(means=means, nk=sub["N"] + 10 * np.finfo(np.float64).eps)
    return small


def _concat_parts(parts):
    """The small terms of a group's parts (in component order), joined."""
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# -------------------------------------------------------------------------- graphs

def _blocks(n, rows):
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]


def _groups(K, group):
    return [(a, min(a + group, K)) for a in range(0, K, group)]


def _parts(items, count):
    """``items`` in ``count`` contiguous runs of about equal length."""
    count = max(1, min(count, len(items)))
    edges = np.linspace(0, len(items), count + 1).round().astype(int)
    return [items[a:b] for a, b in zip(edges[:-1], edges[1:]) if b > a]


class _Graph:
    """A dict graph of one phase: the row source's keys and the shared objects as keys."""

    def __init__(self, source, blocks, stage, token):
        from dask.base import tokenize

        self.token = tokenize(token, stage)
        self.stage = stage
        self.dsk, self.deps = {}, []
        self.pieces, deps = source.pieces(blocks, f"pipeline-gmm-{stage}-x-{self.token}", self.dsk)
        self.deps += deps
        self.starts = [a for a, _ in blocks]

    def take(self, blocks):
        """The task arguments of some row blocks: their values (graph keys) and spans."""
        return [self.pieces[b][0] for b in blocks], [self.pieces[b][1:] for b in blocks]

    def shared(self, obj, name):
        from .runtime import shared_key

        d = shared_key(obj, f"pipeline-gmm-{self.stage}-{name}-{self.token}")
        self.deps.append(d)
        return d.key

    def run(self, keys, combine, label):
        root = reduce_tree(self.dsk, keys, combine, f"pipeline-gmm-{self.stage}-sum-{self.token}", split_every=8)
        (out,) = compute(delayed_of(self.dsk, root, self.deps), label=label)
        return out


def e_step(source, params, scratch_, plan, token):
    """The E phase: every (row, component) log-density once, into ``scratch_``; returns the totals."""
    n = source.shape[0]
    K, d = params.n_components, params.n_features
    blocks, groups = _blocks(n, plan["rows"]), _groups(K, plan["component_group"])
    prune = prunes(K, d)
    gr = _Graph(source, blocks, "e", token)
    arrays = gr.shared(params.arrays(), "params")
    small = gr.shared(params.small(), "small")
    scr = gr.shared({"logp": scratch_.logp, "lse": scratch_.lse}, "scratch")
    keys = []
    if plan["order"] == "rows":
        # Each task holds its row blocks; the component groups stream past them.
        for i, part in enumerate(_parts(list(range(len(blocks))), len(blocks))):
            key = (f"pipeline-gmm-e-{gr.token}", i)
            gr.dsk[key] = (_e_rows, *gr.take(part), arrays, small, groups, scr, prune,
                           [gr.starts[j] for j in part])
            keys.append(key)
        return gr.run(keys, _sum_e, "EM E-step")
    # Each task holds one component group; the row blocks stream past it.  Row runs
    # split the work when there are fewer groups than threads.
    runs = _parts(list(range(len(blocks))), plan["e_runs"])
    for j, grp in enumerate(groups):
        for i, part in enumerate(runs):
            key = (f"pipeline-gmm-e-{gr.token}", j, i)
            gr.dsk[key] = (_e_groups, *gr.take(part), arrays, small, grp, scr, prune,
                           [gr.starts[b] for b in part])
            keys.append(key)
    done = (f"pipeline-gmm-e-done-{gr.token}",)
    gr.dsk[done] = (_sum_e, keys)
    lse_keys = []
    for i, (a, b) in enumerate(blocks):
        key = (f"pipeline-gmm-lse-{gr.token}", i)
        gr.dsk[key] = (_lse_rows, done, scr, a, b)
        lse_keys.append(key)
    return gr.run(lse_keys + [done], _sum_e, "EM E-step")


def m_step(source, params, out, scratch_, plan, reg_covar, token, resp=("em",), n_samples=None, shift=None,
           stats_only=False):
    """The M phase: per component group, statistics over X, new parameters written into ``out``.

    Returns the small terms of ``out`` (weights, means, ...) after writing them too.
    ``resp`` chooses where responsibilities come from (see :func:`_m_part`);
    ``shift`` (K, d) centres the statistics (default the means of ``params``).  With
    ``stats_only``, ``out`` is a Zarr group that receives ``S2`` (K, d, d) and the
    returned dict holds ``N`` and ``S1`` instead.
    """
    n, d = source.shape
    K = params.n_components if stats_only else out.n_components
    blocks, groups = _blocks(n, plan["rows"]), _groups(K, plan["component_group"])
    prune = prunes(K, d)
    # Groups run one after another, each with its row runs in parallel: only one
    # group's statistics (its runs' and their sum) are alive at a time.
    runs = _parts(list(range(len(blocks))), plan["m_runs"])
    tasks = plan.threads * plan["workers"]
    if stats_only:
        s2 = out.require_array("S2", shape=(K, d, d), chunks=(1, d, d), dtype=np.float64, compressors=None)
        small = {"N": np.zeros(K), "S1": np.zeros((K, d))}
        target = {"S2": s2}
    else:
        small = {name: np.zeros(arr.shape, dtype=arr.dtype) for name, arr in out.arrays().items() if name in _SMALL}
        target = out.arrays()
    nk = np.zeros(K)
    # What the statistics are centred on (K x d): the caller's shift, theta_t's means,
    # or the start's centres.
    centres_all = shift if shift is not None else params.group["means"][...] if resp[0] == "em" else resp[-1]
    for j, (c0, c1) in enumerate(groups):
        gr = _Graph(source, blocks, "m", (token, j))
        # Arrays (centres, a start's K x d centers) as shared keys: never embedded per task.
        centres, how = gr.shared(centres_all, "centres"), gr.shared(resp, "resp")
        scr = gr.shared(None if scratch_ is None else {"logp": scratch_.logp, "lse": scratch_.lse}, "scratch")
        arrays = gr.shared(target, "out")
        leaves = []
        for i, part in enumerate(runs):
            key = (f"pipeline-gmm-m-{gr.token}", i)
            gr.dsk[key] = (_m_part, *gr.take(part), [gr.starts[b] for b in part], centres, (c0, c1), scr, how)
            leaves.append(key)
        # The runs' statistics meet in a tree, a few at a time: no task holds more
        # than m_split_every + 1 sets of them, however many runs the cluster has.
        summed = reduce_tree(gr.dsk, leaves, _g.combine_stats, f"pipeline-gmm-msum-{gr.token}",
                             split_every=plan["m_split_every"])
        # The new parameters in one part per thread of the cluster, side by side.
        finals = []
        for i, (a, b) in enumerate(_groups(c1 - c0, math.ceil((c1 - c0) / tasks))):
            key = (f"pipeline-gmm-mnew-{gr.token}", i)
            gr.dsk[key] = (_m_group, summed, arrays, centres, (c0, c1), (c0 + a, c0 + b), reg_covar, prune,
                           stats_only)
            finals.append(key)
        root = (f"pipeline-gmm-mgroup-{gr.token}",)
        gr.dsk[root] = (_concat_parts, finals)
        (res,) = compute(delayed_of(gr.dsk, root, gr.deps), label=f"EM M-step (components {c0}-{c1 - 1} of {K})")
        nk[c0:c1] = res.pop("nk")
        for name, value in res.items():
            small[name][c0:c1] = value
    if stats_only:
        small["S2"] = StoredArray(s2)
        return small
    small["weights"] = nk / (nk.sum() if n_samples is None else n_samples)
    arrays = out.arrays()
    for name in _SMALL:
        arrays[name][...] = small[name]
    out.mark_complete()
    return small


def init_from_rows(out, rows, reg_covar, n_samples, group):
    """Parameters from one-hot responsibilities at K rows (k-means++ / random_from_data starts).

    Component k is row k alone, as scikit-learn's start gives it: mean the row, the
    covariance ``reg_covar I`` (to rounding), weight ``1 / n``; group by group.
    """
    K, d = out.n_components, out.n_features
    small = {name: np.zeros(arr.shape, dtype=arr.dtype) for name, arr in out.arrays().items() if name in _SMALL}
    nk = np.zeros(K)
    arrays = out.arrays()
    for c0, c1 in _groups(K, group):
        stats = _g.resp_block_stats(rows[c0:c1], np.eye(c1 - c0), rows[c0:c1])
        _, means, cov = _g.params_from_stats(stats, rows[c0:c1], reg_covar)
        try:
            P = _g.compute_precision_cholesky(cov)
        except ValueError as e:
            raise InputError(str(e)) from None
        for name, value in _write_components(arrays, c0, cov, P, prunes(K, d)).items():
            small[name][c0:c1] = value
        small["means"][c0:c1] = means
        nk[c0:c1] = stats["N"] + 10 * np.finfo(np.float64).eps
    small["weights"] = nk / n_samples
    for name in _SMALL:
        arrays[name][...] = small[name]
    out.mark_complete()
    return small


def em_iteration(source, params, out_group, scratch_group, plan, reg_covar, token=None):
    """One EM iteration from the complete ``params`` into ``out_group`` (made a :class:`ShardedParameters`).

    Returns
    -------
    dict
        ``log_likelihood`` (sum over rows of the log mixture density under
        ``params``), ``n``, ``skipped`` and ``pairs`` ((row, component) pairs pruned,
        of all), ``weights`` and ``means`` (of the new parameters), ``out``.
    """
    import uuid

    if not params.complete:
        raise InputError(f"the parameters in {params.group.path or params.group.store} are incomplete (a half-written "
                         "iteration); they cannot be read")
    token = token or uuid.uuid4().hex
    K = params.n_components
    scratch_ = Scratch(scratch_group, source.shape[0], K, plan["rows"], plan["component_group"])
    e = e_step(source, params, scratch_, plan, token)
    out = ShardedParameters.create(out_group, K, params.n_features)
    small = m_step(source, params, out, scratch_, plan, reg_covar, token)
    e.update(weights=small["weights"], means=small["means"], out=out)
    return e


def copy_parameters(src, dst_group, group=1):
    """Copy a complete parameter set into ``dst_group``, ``group`` components at a time."""
    out = ShardedParameters.create(dst_group, src.n_components, src.n_features)
    s, t = src.arrays(), out.arrays()
    for name in _LAYOUT:
        if name in _PER_COMPONENT:
            for a in range(0, src.n_components, group):
                t[name][a:a + group] = s[name][a:a + group]
        else:
            t[name][...] = s[name][...]
    if "precisions" in src.group:
        P = src.group["precisions"]
        arr = dst_group.require_array("precisions", shape=P.shape, chunks=P.chunks, dtype=P.dtype, compressors=None)
        for a in range(0, src.n_components, group):
            arr[a:a + group] = P[a:a + group]
    out.mark_complete(**{k: v for k, v in src.group.attrs.get("sharded", {}).items() if k != "complete"})
    return out
