"""Distance matrices out of core: a lazy dask array, one GEMM per block.

Graph (numerics in :mod:`pipeline.kernels.distances`): a ``pipeline-distances-shift``
key (mean of the first training rows, shared by every task) and one
``pipeline-distances-block`` task per (query block, training block) that reads both
blocks, centres them on the shift and computes their distances with one GEMM.  Block
sizes come from :func:`pipeline.plan` ``("distances", ...)``; the result can be
computed in pieces or written to Zarr block by block with :func:`write_distances`.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .kernels import distances as _kd
from .kernels import topk as _topk

__all__ = ["pairwise_distances", "write_distances"]

_METRICS = ("euclidean", "sqeuclidean")
_PRECISIONS = ("auto", "exact")


def _block(x, y, shift, start_x, start_y, *, metric, upcast):
    """Task: the distances between one query block and one training block."""
    x, shift = x[0], shift[0]
    y = y.pop()  # this task's own reference: the block read is freed once centred
    dtype = _kd.working_dtype(np.result_type(x.dtype, y.dtype), upcast)
    xc = _kd.as_block(x, dtype, shift)
    yc = _kd.as_block(y, dtype, shift)
    del y
    xn, yn = _kd.row_norms_sq(xc), _kd.row_norms_sq(yc)
    for norms, start, what in ((xn, start_x, "X (the query set)"), (yn, start_y, "Y (the training set)")):
        bad = np.flatnonzero(~np.isfinite(norms))
        if bad.size:
            rows = ", ".join(str(int(start[0]) + int(i)) for i in bad[:10])
            raise InputError(f"{what} has NaN or infinite values (or values too large to square) in "
                             f"row(s) {rows}{' and more' if bad.size > 10 else ''}; remove or impute those rows")
    D = _kd.sq_euclidean(xc, yc, xn, yn)
    return np.sqrt(D, out=D) if metric == "euclidean" else D


def _block_from_store(x, shift, start_x, start_y, src, *, metric, upcast):
    return _block(x, [_read(src, start_y)], shift, start_x, start_y, metric=metric, upcast=upcast)


_WORK = {}  # thread id -> that thread's scratch buffers (kernels.buffers.scratch)
_WORK_SCOPES = [0]  # open _thread_buffers() scopes; the outermost one frees the buffers


def _work():
    """The calling thread's scratch dict: a task's buffers, reused by its next task."""
    import threading

    return _WORK.setdefault(threading.get_ident(), {})


class _thread_buffers:
    """Scope in which tasks keep their scratch buffers from block to block.

    A fresh block of tens of MiB costs a page fault per 4 KiB (~10 us each on these
    VMs), a measurable share of a k-NN block or an EM iteration.  An operation (a
    k-NN, a whole GMM fit) runs inside one scope; the buffers, one set per thread,
    are dropped when the outermost scope ends (a cluster's workers keep theirs).
    """

    def __enter__(self):
        _WORK_SCOPES[0] += 1
        return self

    def __exit__(self, *exc):
        _WORK_SCOPES[0] -= 1
        if _WORK_SCOPES[0] == 0:
            _WORK.clear()
        return False


def _read(src, rows, work=None):
    """Read rows ``rows[0] .. rows[-1]`` (a block of ``arange``) inside the task itself.

    Each task owns what it reads: a training block is neither held in memory between
    tasks nor shared by the tasks of several query blocks (a separate read task's block
    would stay alive until its last consumer ran: for all pairs, the whole dataset).
    With ``work`` (a thread's scratch dict) the rows are decoded into a buffer the
    thread reuses from block to block: a fresh block of tens of MiB costs a page fault
    per 4 KiB, a measurable share of k-NN's time.  The caller must not return it.
    """
    from .kernels.buffers import scratch
    from .storage import read_rows_into

    start, stop = int(rows[0]), int(rows[-1]) + 1
    buf = scratch(work, "read", (stop - start,) + tuple(src.shape[1:]), src.dtype)
    return read_rows_into(src, start, stop, buf)


def _source_key(store, prefix):
    """A Zarr array as one graph key (its metadata and path, never its data)."""
    import dask
    from dask.base import tokenize

    if store is None:
        return None
    name = f"{prefix}-" + tokenize(str(store.store), store.path, store.shape, str(store.dtype))
    return dask.delayed(store, pure=True, name=name)


def _store(X):
    """The Zarr array a set is read from, or None."""
    import zarr

    from .storage import Dataset

    if isinstance(X, Dataset):
        X = X.X_zarr
    return X if isinstance(X, zarr.Array) else None


def _align(rows, chunk_rows, n):
    """Round a block down to whole stored chunks (or a divisor of one).

    No stored chunk is then decoded by two tasks.
    """
    if not chunk_rows or rows >= n:
        return rows
    if rows >= chunk_rows:
        return rows // chunk_rows * chunk_rows
    return max(q for q in range(1, rows + 1) if chunk_rows % q == 0)


def _shift(Yd, src, prefix):
    """The centring vector: mean of the first training rows (finite ones), one (d,) key.

    1024 rows put the centre well inside the data's spread, which is all the GEMM's
    accuracy needs (reported distances are re-ranked exactly, whatever the shift); the
    read sits on the critical path before every block, so it is kept small.
    """
    import dask.array as da

    rows = min(Yd.shape[0], max(Yd.chunks[0][0], 1), 1024)
    if src is not None:
        first = da.blockwise(_read, "if", src, None, da.arange(rows, chunks=rows), "i",
                             new_axes={"f": Yd.shape[1]}, dtype=Yd.dtype,
                             meta=np.empty((0, 0), Yd.dtype), token=f"{prefix}-read")
    else:
        first = Yd[:rows]  # inside the first chunk: one task
    return first.map_blocks(_topk.finite_mean, chunks=((1,), first.chunks[1]), dtype=np.float64,
                            token=f"{prefix}-shift")[0]


def _open_source(X):
    """A dataset URL or path opened once (a Dataset); anything else as given."""
    from pathlib import Path

    from .storage import open_dataset

    return open_dataset(X) if isinstance(X, (str, Path)) else X


def _source_rows(X):
    """Rows per Zarr chunk when ``X`` is read from Zarr, else None."""
    import zarr

    from .storage import Dataset

    if isinstance(X, Dataset):
        X = X.X_zarr
    return int(X.chunks[0]) if isinstance(X, zarr.Array) else None


def _parse(metric, precision):
    if metric not in _METRICS:
        raise InputError(f"metric={metric!r}; choose one of {', '.join(_METRICS)}")
    if precision not in _PRECISIONS:
        raise InputError(f"precision={precision!r}; choose 'auto' (data's dtype, centred) or 'exact' (float64)")
    return precision == "exact"


def pairwise_distances(X, Y, metric="euclidean", memory_budget=None, *, precision="auto",
                       query_rows=None, train_rows=None):
    """Distances between the rows of ``X`` and ``Y`` as a lazy dask array.

    Each block is one GEMM on data centred on a shift (the mean of the first
    training rows), so float32 data far from the origin keep float32 accuracy.

    Parameters
    ----------
    X : array-like of shape (n_x, n_features)
        NumPy, dask or Zarr array, Dataset or dataset URL.
    Y : array-like of shape (n_y, n_features)
    metric : {"euclidean", "sqeuclidean"}
    memory_budget : int or str, optional
        Bytes above the idle process for computing it block by block.
    precision : {"auto", "exact"}
        ``"auto"`` computes in the data's float dtype (float32 for float32 and
        integer data); ``"exact"`` upcasts every block to float64.
    query_rows, train_rows : int, optional
        Block sizes; default from :func:`pipeline.plan` ``("distances", ...)``.

    Returns
    -------
    dask.array.Array of shape (n_x, n_y)
        float32 for float32 / integer inputs (float64 with ``precision="exact"`` or
        float64 inputs); chunks ``(query_rows, train_rows)``.

    Raises
    ------
    InputError
        Unknown metric, feature counts that differ, empty sets; NaN / inf values
        are reported (with their rows) when the blocks are computed.

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> D = pl.pairwise_distances(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0], [0.0, 1.0]]))
    >>> D.compute()
    array([[5., 1.]])
    """
    import dask.array as da

    from .budget import plan
    from .storage import as_array, zarr_source

    upcast = _parse(metric, precision)
    X, Y = _open_source(X), _open_source(Y)
    Xd, Yd = as_array(X, "X"), as_array(Y, "Y")
    if Xd.shape[1] != Yd.shape[1]:
        raise InputError(f"X has {Xd.shape[1]} features but Y has {Yd.shape[1]}; both sets need the same number of columns")
    dtype = _kd.working_dtype(np.result_type(Xd.dtype, Yd.dtype), upcast)
    if query_rows is None or train_rows is None:
        srcx, srcy = zarr_source(X), zarr_source(Y)
        p = plan("distances", n_x=Xd.shape[0], n_y=Yd.shape[0], n_features=Xd.shape[1],
                 itemsize=max(Xd.dtype.itemsize, Yd.dtype.itemsize), out_itemsize=dtype.itemsize,
                 upcast=upcast, memory_budget=memory_budget,
                 x_chunk_rows=srcx.chunks[0] if srcx is not None else None,
                 y_chunk_rows=srcy.chunks[0] if srcy is not None else None,
                 x_compressed=bool(srcx is not None and srcx.compressors),
                 y_compressed=bool(srcy is not None and srcy.compressors))
        query_rows = query_rows or p["query_rows"]
        train_rows = train_rows or p["train_rows"]
    store = _store(Y)
    if store is not None:
        train_rows = _align(int(train_rows), store.chunks[0], Yd.shape[0])
    Xd, Yd = as_array(X, "X", rows=int(query_rows)), as_array(Y, "Y", rows=int(train_rows))
    src = _source_key(store, "pipeline-distances-source")
    shift = _shift(Yd, src, "pipeline-distances")
    sx = da.arange(Xd.shape[0], chunks=Xd.chunks[0], dtype=np.int64)
    sy = da.arange(Yd.shape[0], chunks=Yd.chunks[0], dtype=np.int64)
    kw = dict(metric=metric, upcast=upcast, dtype=dtype, meta=np.empty((0, 0), dtype),
              token="pipeline-distances-block")
    import warnings

    from dask.array.core import PerformanceWarning

    with warnings.catch_warnings():
        # An all-pairs product has (query blocks x training blocks) tasks by design;
        # dask's "increasing number of chunks" warning would only alarm users.
        warnings.simplefilter("ignore", PerformanceWarning)
        if src is not None:
            # Tasks read their own training rows; Yd only gives the block boundaries.
            return da.blockwise(_block_from_store, "ij", Xd, "if", shift, "f", sx, "i", sy, "j", src, None,
                                concatenate=False, **kw)
        return da.blockwise(_block, "ij", Xd, "if", Yd, "jf", shift, "f", sx, "i", sy, "j",
                            concatenate=False, **kw)


def write_distances(query, train, out, *, metric="euclidean", memory_budget=None, overwrite=False,
                    precision="auto"):
    """Write the distance matrix between two datasets to a result store, block by block.

    The result group (kind ``distances``) holds ``D`` (n_query, n_train) with Zarr
    chunks equal to the computation's blocks, so each task writes whole chunks, and a
    ``_done`` record (one int8 chunk per block, written after the block).  The group is
    marked complete only after the last block is written.  Rerun on the same job's
    incomplete result (a crash, SIGKILL), it keeps the recorded blocks, computes only
    the others, in the blocks the result was started with.

    Returns
    -------
    dict
        A summary for the command line (shape, dtype, blocks, blocks written and kept,
        output).

    Examples
    --------
    >>> import pipeline as pl                                          # doctest: +SKIP
    >>> pl.distances.write_distances("test.zarr", "train.zarr", "D.zarr")  # doctest: +SKIP
    {'shape': '10000 x 50000', 'dtype': 'float32', 'blocks': 40, 'output': 'D.zarr'}
    """
    from .cluster import compute
    from .storage import (job_fingerprint, mark_complete, open_result_for_write, release_lock,
                          source_identity, write_blocks)

    # Validation and the plan come first: bad input fails before anything is written.
    D = pairwise_distances(query, train, metric=metric, memory_budget=memory_budget, precision=precision)
    job = job_fingerprint(op="distances", query=source_identity(query), train=source_identity(train),
                          metric=metric, precision=precision)
    group, status = open_result_for_write(out, "distances", job, overwrite, resume=True)
    if status == "complete":
        summary = {"shape": f"{D.shape[0]} x {D.shape[1]}", "dtype": str(D.dtype)}
        return {"status": "already complete (same job); nothing to do", **summary, "output": str(out)}
    target = group["D"] if status == "resume" and "D" in group else None
    if target is not None and (target.chunks[0], target.chunks[1]) != (D.chunks[0][0], D.chunks[1][0]):
        # Resume in the blocks the result was started with (the budget may differ).
        D = pairwise_distances(query, train, metric=metric, memory_budget=memory_budget,
                               precision=precision, query_rows=target.chunks[0], train_rows=target.chunks[1])
    if target is None:
        target = group.create_array("D", shape=D.shape, dtype=D.dtype, compressors=None,
                                    chunks=(D.chunks[0][0], D.chunks[1][0]),
                                    config={"write_empty_chunks": True})
    writes, written, kept = write_blocks(group, [(D, target)], "distances-write")
    if writes is not None:
        try:
            compute(writes, label="distances")
        except BaseException:
            release_lock(str(out))  # left incomplete: any process may resume it now
            raise
    mark_complete(group, metric=metric, precision=precision, n_query=int(D.shape[0]), n_train=int(D.shape[1]))
    return {"status": "complete" if not kept else "complete (resumed)",
            "shape": f"{D.shape[0]} x {D.shape[1]}", "dtype": str(D.dtype),
            "blocks": int(D.numblocks[0] * D.numblocks[1]), "blocks_written": written,
            "blocks_kept": kept, "output": str(out)}
