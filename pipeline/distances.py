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

from .budget import align_rows, plan
from .errors import InputError
from .inputs import as_rows, check_metric, check_same_features
from .kernels import distances as _kd
from .kernels import topk as _topk
from .runtime import compute, source_key
from .store.reads import read_block
from .store.results import ResultWriter, content_identity, job_fingerprint

__all__ = ["pairwise_distances", "write_distances", "METRICS"]

METRICS = _kd.METRICS
_PRECISIONS = ("auto", "exact")


def _block(x, y, shift, start_x, start_y, *, metric, upcast):
    """Task: the distances between one query block and one training block."""
    x, shift = x[0], shift[0]
    y = y.pop()  # this task's own reference: the block read is freed once centred
    dtype = _kd.working_dtype(np.result_type(x.dtype, y.dtype), upcast)
    # Only distances are translation invariant: inner products see the data as stored.
    centre = shift if metric in ("euclidean", "sqeuclidean") else None
    xc = _kd.as_block(x, dtype, centre)
    yc = _kd.as_block(y, dtype, centre)
    own = (xc is not x, yc is not y)  # copies this task may scale in place
    del y
    xn, yn = _kd.row_norms_sq(xc), _kd.row_norms_sq(yc)
    for norms, start, what in ((xn, start_x, "X (the query set)"), (yn, start_y, "Y (the training set)")):
        bad = np.flatnonzero(~np.isfinite(norms))
        if bad.size:
            rows = ", ".join(str(int(start[0]) + int(i)) for i in bad[:10])
            raise InputError(f"{what} has NaN or infinite values (or values too large to square) in "
                             f"row(s) {rows}{' and more' if bad.size > 10 else ''}; remove or impute those rows")
    if metric == "cosine":
        return _kd.cosine(_kd.unit_rows(xc, inplace=own[0]), _kd.unit_rows(yc, inplace=own[1]), unit=True)
    if metric == "ip":
        return _kd.inner_product(xc, yc)
    if metric == "manhattan":
        return _kd.manhattan(xc, yc)
    D = _kd.sq_euclidean(xc, yc, xn, yn)
    return np.sqrt(D, out=D) if metric == "euclidean" else D


def _block_from_store(x, shift, start_x, start_y, src, *, metric, upcast):
    return _block(x, [read_block(src, int(start_y[0]), int(start_y[-1]) + 1)], shift, start_x, start_y,
                  metric=metric, upcast=upcast)


def _read_first(src, rows):
    """Task: the first training rows (a block of ``arange``), read from the store."""
    return read_block(src, int(rows[0]), int(rows[-1]) + 1)


def _shift(Yd, src, prefix):
    """The centring vector: mean of the first training rows (finite ones), one (d,) key.

    1024 rows put the centre well inside the data's spread, which is all the GEMM's
    accuracy needs (reported distances are re-ranked exactly, whatever the shift); the
    read sits on the critical path before every block, so it is kept small.
    """
    import dask.array as da

    rows = min(Yd.shape[0], max(Yd.chunks[0][0], 1), 1024)
    if src is not None:
        first = da.blockwise(_read_first, "if", src, None, da.arange(rows, chunks=rows), "i",
                             new_axes={"f": Yd.shape[1]}, dtype=Yd.dtype,
                             meta=np.empty((0, 0), Yd.dtype), token=f"{prefix}-read")
    else:
        first = Yd[:rows]  # inside the first chunk: one task
    return first.map_blocks(_topk.finite_mean, chunks=((1,), first.chunks[1]), dtype=np.float64,
                            token=f"{prefix}-shift")[0]


def _parse(metric, precision):
    check_metric(metric)
    if precision not in _PRECISIONS:
        raise InputError(f"precision={precision!r}; choose 'auto' (data's dtype, centred) or 'exact' (float64)")
    return precision == "exact"


def pairwise_distances(X, Y, metric="euclidean", memory_budget=None, *, precision="auto",
                       query_rows=None, train_rows=None):
    """Distances between the rows of ``X`` and ``Y`` as a lazy dask array.

    Each block is one GEMM; Euclidean blocks are centred on a shift (the mean of the
    first training rows), so float32 data far from the origin keep float32 accuracy.

    Parameters
    ----------
    X : array-like of shape (n_x, n_features)
        NumPy, dask or Zarr array, Dataset or dataset URL.
    Y : array-like of shape (n_y, n_features)
    metric : {"euclidean", "sqeuclidean", "cosine", "ip", "manhattan"}
        ``"cosine"``: ``1 - cos(x, y)`` clipped to [0, 2], a zero row at distance 1
        from every row (scikit-learn's ``cosine_distances``); ``"ip"``: the inner
        products ``x . y`` themselves (larger is nearer); ``"manhattan"``: L1, by
        exact float64 differences (SciPy's ``cdist``; float64 output).
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

    upcast = _parse(metric, precision)
    X, Y = as_rows(X, "X"), as_rows(Y, "Y")
    check_same_features(X, Y)
    upcast = upcast or metric == "manhattan"  # L1 by exact float64 differences
    dtype = _kd.working_dtype(np.result_type(X.dtype, Y.dtype), upcast)
    if query_rows is None or train_rows is None:
        p = plan("distances", n_x=X.shape[0], n_y=Y.shape[0], n_features=X.shape[1],
                 itemsize=max(X.dtype.itemsize, Y.dtype.itemsize), out_itemsize=dtype.itemsize,
                 upcast=upcast, memory_budget=memory_budget, x_chunk_rows=X.chunk_rows,
                 y_chunk_rows=Y.chunk_rows, x_compressed=X.compressed, y_compressed=Y.compressed)
        query_rows = query_rows or p["query_rows"]
        train_rows = train_rows or p["train_rows"]
    if Y.zarr is not None:
        train_rows = align_rows(int(train_rows), Y.chunk_rows, Y.shape[0])
    Xd, Yd = X.dask(rows=int(query_rows)), Y.dask(rows=int(train_rows))
    src = source_key(Y.zarr, "pipeline-distances-source")
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
                    precision="auto", on_block=None):
    """Write the distance matrix between two datasets to a result store, block by block.

    The result group (kind ``distances``) holds ``D`` (n_query, n_train) with Zarr
    chunks equal to the computation's blocks, so each task writes whole chunks, and a
    ``_done`` record (one int8 chunk per block, written after the block).  The group is
    marked complete only after the last block is written.  Rerun on the same job's
    incomplete result (a crash, SIGKILL), it keeps the recorded blocks, computes only
    the others, in the blocks the result was started with.  ``on_block(index)`` is
    called after each block is recorded (see :class:`pipeline.store.ResultWriter`).

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
    # Validation and the plan come first: bad input fails before anything is written.
    D = pairwise_distances(query, train, metric=metric, memory_budget=memory_budget, precision=precision)
    job = job_fingerprint(op="distances", query=content_identity(query), train=content_identity(train),
                          metric=metric, precision=precision)
    summary = {"shape": f"{D.shape[0]} x {D.shape[1]}", "dtype": str(D.dtype)}
    with ResultWriter(out, "distances", job, overwrite=overwrite, resume=True, on_block=on_block) as result:
        if result.status == "complete":
            return {"status": "already complete (same job); nothing to do", **summary, "output": str(out)}
        if "D" in result.group and tuple(result.group["D"].chunks) != (D.chunks[0][0], D.chunks[1][0]):
            # Resume in the blocks the result was started with (the budget may differ).
            q, t = result.group["D"].chunks
            D = pairwise_distances(query, train, metric=metric, memory_budget=memory_budget,
                                   precision=precision, query_rows=q, train_rows=t)
        target = result.array("D", D.shape, (D.chunks[0][0], D.chunks[1][0]), D.dtype)
        writes, written, kept = result.write_blocks([(D, target)], "distances-write")
        if writes is not None:
            compute(writes, label="distances")
        result.complete(metric=metric, precision=precision, n_query=int(D.shape[0]), n_train=int(D.shape[1]))
    return {"status": "complete" if not kept else "complete (resumed)", **summary,
            "blocks": int(D.numblocks[0] * D.numblocks[1]), "blocks_written": written,
            "blocks_kept": kept, "output": str(out)}
