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
    x, y, shift = x[0], y[0], shift[0]
    dtype = _kd.working_dtype(np.result_type(x.dtype, y.dtype), upcast)
    xc = _kd.as_block(x, dtype, shift)
    yc = _kd.as_block(y, dtype, shift)
    xn, yn = _kd.row_norms_sq(xc), _kd.row_norms_sq(yc)
    for norms, start, what in ((xn, start_x, "X (the query set)"), (yn, start_y, "Y (the training set)")):
        bad = np.flatnonzero(~np.isfinite(norms))
        if bad.size:
            rows = ", ".join(str(int(start[0]) + int(i)) for i in bad[:10])
            raise InputError(f"{what} has NaN or infinite values (or values too large to square) in "
                             f"row(s) {rows}{' and more' if bad.size > 10 else ''}; remove or impute those rows")
    D = _kd.sq_euclidean(xc, yc, xn, yn)
    return np.sqrt(D, out=D) if metric == "euclidean" else D


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
    from .storage import as_array

    upcast = _parse(metric, precision)
    Xd, Yd = as_array(X, "X"), as_array(Y, "Y")
    if Xd.shape[1] != Yd.shape[1]:
        raise InputError(f"X has {Xd.shape[1]} features but Y has {Yd.shape[1]}; both sets need the same number of columns")
    dtype = _kd.working_dtype(np.result_type(Xd.dtype, Yd.dtype), upcast)
    if query_rows is None or train_rows is None:
        p = plan("distances", n_x=Xd.shape[0], n_y=Yd.shape[0], n_features=Xd.shape[1],
                 itemsize=max(Xd.dtype.itemsize, Yd.dtype.itemsize), out_itemsize=dtype.itemsize,
                 upcast=upcast, memory_budget=memory_budget)
        query_rows = query_rows or p["query_rows"]
        train_rows = train_rows or p["train_rows"]
    Xd, Yd = as_array(X, "X", rows=int(query_rows)), as_array(Y, "Y", rows=int(train_rows))
    rows = min(Yd.shape[0], Yd.chunks[0][0], 4096)
    first = Yd[:rows]
    shift = first.map_blocks(_topk.finite_mean, chunks=((1,), first.chunks[1]), dtype=np.float64,
                             token="pipeline-distances-shift")[0]
    sx = da.arange(Xd.shape[0], chunks=Xd.chunks[0], dtype=np.int64)
    sy = da.arange(Yd.shape[0], chunks=Yd.chunks[0], dtype=np.int64)
    return da.blockwise(_block, "ij", Xd, "if", Yd, "jf", shift, "f", sx, "i", sy, "j",
                        metric=metric, upcast=upcast, concatenate=False, dtype=dtype,
                        meta=np.empty((0, 0), dtype), token="pipeline-distances-block")


def write_distances(query, train, out, *, metric="euclidean", memory_budget=None, overwrite=False,
                    precision="auto"):
    """Write the distance matrix between two datasets to a result store, block by block.

    The result group (kind ``distances``) holds ``D`` (n_query, n_train) with Zarr
    chunks equal to the computation's blocks, so each task writes whole chunks; the
    group is marked complete only after the last block is written.

    Returns
    -------
    dict
        A summary for the command line (shape, dtype, blocks, output).

    Examples
    --------
    >>> import pipeline as pl                                          # doctest: +SKIP
    >>> pl.distances.write_distances("test.zarr", "train.zarr", "D.zarr")  # doctest: +SKIP
    {'shape': '10000 x 50000', 'dtype': 'float32', 'blocks': 40, 'output': 'D.zarr'}
    """
    from .cluster import compute
    from .storage import job_fingerprint, mark_complete, open_result_for_write, store_array

    D = pairwise_distances(query, train, metric=metric, memory_budget=memory_budget, precision=precision)
    job = job_fingerprint(op="distances", query=str(query), train=str(train), metric=metric, precision=precision)
    group, status = open_result_for_write(out, "distances", job, overwrite)
    summary = {"shape": f"{D.shape[0]} x {D.shape[1]}", "dtype": str(D.dtype),
               "blocks": int(D.numblocks[0] * D.numblocks[1])}
    if status == "complete":
        return {"status": "already complete", **summary, "output": str(out)}
    target = group.create_array("D", shape=D.shape, dtype=D.dtype,
                                chunks=(D.chunks[0][0], D.chunks[1][0]), compressors=None)
    compute(store_array(D, target, "distances-write"), label="distances")
    mark_complete(group, metric=metric, precision=precision, n_query=int(D.shape[0]), n_train=int(D.shape[1]))
    return {**summary, "output": str(out)}
