"""Bringing data into a dataset: from arrays (:func:`write_dataset`) and from ``.npy`` files.

A ``.npy`` file is memory-mapped per block and unmapped after each copy, so it is never
held whole: the process's memory grows by a few blocks, not by the file.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..inputs import as_labels, as_rows
from .datasets import chunk_rows_for, choose_compressors, dataset_attrs, open_dataset, write_group
from .results import ResultWriter

__all__ = ["write_dataset", "write_pieces", "ingest"]


def write_dataset(url, X, y=None, chunk_rows=None, overwrite=False, compressor="auto",
                  memory_budget=None, *, job=None):
    """Write ``X`` (and labels ``y``) as a dataset group.

    Parameters
    ----------
    url : str or Path
        Where to write (local path or fsspec URL).
    X : array-like of shape (n_samples, n_features)
        NumPy, dask or Zarr array; float or integer.
    y : array-like of shape (n_samples,), optional
        Integer labels.
    chunk_rows : int, optional
        Rows per chunk; default about 8 MiB a chunk (less if ``memory_budget`` asks).
    overwrite : bool
        Replace whatever is at ``url``.
    compressor : {"auto", "zstd", "none"}
        ``"auto"`` keeps zstd only where it saves 20% or more on a sample chunk.
    memory_budget : int or str, optional
        Bounds the blocks in flight (and so the chunk size).
    job : str, optional
        The writing job's fingerprint (job files): the same job's complete dataset is
        kept, not written again.

    Returns
    -------
    Dataset

    Examples
    --------
    >>> import numpy as np
    >>> ds = write_dataset("memory://doc/tiny", np.eye(4, dtype="float32"), y=[0, 1, 0, 1])
    >>> ds.X.shape, ds.y.compute().tolist()
    ((4, 4), [0, 1, 0, 1])
    """
    import dask.array as da

    X = as_rows(X, "X").dask()
    if not (np.issubdtype(X.dtype, np.floating) or X.dtype.kind in "ui"):
        raise InputError(f"X must be float or integer, got {X.dtype}")
    rows = chunk_rows_for(X.shape[0], X.shape[1] * X.dtype.itemsize, chunk_rows, memory_budget)
    X = X.rechunk({0: rows, 1: -1})
    arrays = {"X": (X, X.blocks[0].compute())}
    if y is not None:
        yv = as_labels(y, X.shape[0])
        if not np.issubdtype(yv.dtype, np.integer):
            if np.all(np.isfinite(yv)) and np.all(yv == np.round(yv)):
                yv = yv.astype(np.int64)
            else:
                raise InputError(f"labels y must be integers, got {yv.dtype}")
        arrays["y"] = (da.from_array(yv, chunks=rows), None)
    write_group(url, arrays, dataset_attrs(X, "write_dataset"), "write", overwrite, compressor, job=job)
    return open_dataset(url)


def write_pieces(url, pieces, *, n_samples, n_features, overwrite=False, chunk_rows=None, job=None,
                 source="sample"):
    """Write a stream of ``(X, y)`` row pieces of any sizes as a float64 dataset with labels.

    The pieces are gathered into whole chunks (one chunk of rows in memory at a time)
    and written in order; the dataset is marked complete only after the last, and a
    stream that does not add up to ``n_samples`` rows leaves it incomplete (an error).

    Parameters
    ----------
    url : str or Path
    pieces : iterable of (ndarray (m, n_features), ndarray (m,) int)
    n_samples, n_features : int
        The dataset's shape (known before the first piece).
    overwrite : bool
    chunk_rows : int, optional
        Rows per chunk; default about 8 MiB a chunk.
    job : str, optional
        The writing job's fingerprint: the same job's complete dataset is kept.
    source : str
        Provenance recorded in the attributes.

    Returns
    -------
    Dataset

    Examples
    --------
    >>> import numpy as np
    >>> parts = [(np.ones((2, 3)), np.zeros(2, int)), (np.zeros((1, 3)), np.ones(1, int))]
    >>> write_pieces("memory://doc/pieces", iter(parts), n_samples=3, n_features=3).y.compute().tolist()
    [0, 0, 1]
    """
    n, d = int(n_samples), int(n_features)
    rows = chunk_rows_for(n, d * 8, chunk_rows, None)
    attrs = {**dataset_attrs(np.empty((0, d)), source), "n_samples": n, "every_chunk_stored": True}
    with ResultWriter(url, "dataset", job, overwrite=overwrite, attrs=attrs) as out:
        if out.status != "complete":
            bx, by = np.empty((rows, d)), np.empty(rows, dtype=np.int64)
            X = y = None
            filled = start = 0  # rows in the chunk buffer; rows written before it
            for px, py in pieces:
                i = 0
                while i < len(px):
                    take = min(rows - filled, len(px) - i)
                    if start + filled + take > n:
                        raise InputError(f"the pieces hold more than n_samples={n} rows")
                    bx[filled:filled + take], by[filled:filled + take] = px[i:i + take], py[i:i + take]
                    filled, i = filled + take, i + take
                    if filled == rows or start + filled == n:
                        if X is None:  # the codec is chosen on the first chunk
                            X = out.array("X", (n, d), (rows, d), np.float64,
                                          compressors=choose_compressors(bx[:filled], "auto"))
                            y = out.array("y", (n,), (rows,), np.int64)
                        X[start:start + filled] = bx[:filled]
                        y[start:start + filled] = by[:filled]
                        start, filled = start + filled, 0
            if start != n:
                raise InputError(f"the pieces held {start + filled} rows, not n_samples={n}")
            out.complete()
    return open_dataset(url)


def _npy_header(path):
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
        except Exception as e:  # noqa: BLE001 - any header failure is bad input
            raise InputError(f"{path!r} is not a readable .npy file ({e})") from None
        return shape, fortran, dtype, f.tell()


def _read_npy_rows(path, shape, fortran, dtype, offset, start, stop):
    """Copy rows [start, stop) out of a memory-mapped .npy and unmap it.

    Unmapping at once keeps the file's pages out of this process's resident set, so
    streaming a file larger than memory costs one block, not the file.
    """
    n, d = shape
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        src = np.ndarray(shape, dtype=dtype, buffer=mm, offset=offset, order="F" if fortran else "C")
        block = np.array(src[start:stop], order="C")
        del src
    return block


def _ingest_block(path, shape, fortran, dtype, offset, block_info=None):
    (start, stop), _ = block_info[None]["array-location"]
    return _read_npy_rows(path, shape, fortran, dtype, offset, start, stop)


def ingest(src_npy, url, labels=None, chunk_rows=None, overwrite=False, compressor="auto",
           memory_budget=None, *, job=None):
    """Stream a ``.npy`` file into a dataset, one row block at a time.

    Parameters
    ----------
    src_npy : str or Path
        A 2-D ``.npy`` file (C or Fortran order), float or integer.
    url : str or Path
        The dataset to write.
    labels : str, Path or array-like, optional
        A 1-D ``.npy`` of integer labels (or an array), one per row.
    chunk_rows, overwrite, compressor, memory_budget, job
        As in :func:`write_dataset`; the budget bounds the blocks in flight.

    Returns
    -------
    Dataset
    """
    import dask.array as da

    path = os.fspath(src_npy)
    if not os.path.isfile(path):
        raise InputError(f"input {path!r} does not exist; give the path of a .npy file")
    shape, fortran, dtype, offset = _npy_header(path)
    if len(shape) != 2:
        raise InputError(f"{path!r} holds a {len(shape)}-D array of shape {shape}; ingest needs 2-D (n_samples, n_features)")
    if dtype.kind not in "fiu" or dtype.hasobject:
        raise InputError(f"{path!r} has dtype {dtype}; ingest needs float or integer data")
    if 0 in shape:
        raise InputError(f"{path!r} is empty (shape {shape})")
    rows = chunk_rows_for(shape[0], shape[1] * dtype.itemsize, chunk_rows, memory_budget)
    X = da.map_blocks(
        _ingest_block, path, shape, fortran, dtype, offset,
        chunks=(tuple(min(rows, shape[0] - s) for s in range(0, shape[0], rows)), (shape[1],)),
        dtype=dtype, token="pipeline-ingest-read", meta=np.empty((0, 0), dtype),
    )
    sample = _read_npy_rows(path, shape, fortran, dtype, offset, 0, min(rows, shape[0], 4096))
    arrays = {"X": (X, sample)}
    if labels is not None:
        if isinstance(labels, (str, Path)):
            lpath = os.fspath(labels)
            if not os.path.isfile(lpath):
                raise InputError(f"labels {lpath!r} do not exist; give the path of a 1-D .npy file")
            labels = np.load(lpath, mmap_mode="r")
        yv = as_labels(labels, shape[0], name="labels")
        if not np.issubdtype(yv.dtype, np.integer):
            raise InputError(f"labels must be integers, got {yv.dtype}")
        arrays["y"] = (da.from_array(np.asarray(yv), chunks=rows), None)
    attrs = dataset_attrs(X, f"ingest:{os.path.abspath(path)}")
    write_group(url, arrays, attrs, "ingest", overwrite, compressor, job=job)
    return open_dataset(url)


