"""Datasets: the ``Dataset`` handle, opening one, and writing a group of arrays as one.

A *dataset* is a Zarr v3 group holding ``X`` (n_samples, n_features), chunked by rows
only, and optionally ``y`` (n_samples,) integer labels with the same row chunks; its
attribute ``pipeline`` is ``{"format": 1, "kind": "dataset", "complete": true, ...}``.
Every chunk is stored (``every_chunk_stored``), so a missing one means damage.  Writes
go through :class:`pipeline.store.results.ResultWriter` one task per chunk (task keys
``pipeline-<op>-<array>``): writing data larger than memory costs one block per thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import BudgetError, InputError
from ..runtime import compute, dask_threads, runtime_overhead
from ..sizes import format_bytes, parse_budget
from .reads import checked, member
from .results import FORMAT, ResultWriter, utc_now
from .urls import as_url, open_group

__all__ = ["Dataset", "open_dataset", "write_group", "dataset_attrs", "chunk_rows_for",
           "choose_compressors", "DEFAULT_CHUNK_BYTES"]

# Compressed chunks must save at least this much to be worth their decode time
# (zstd decodes ~500 MB/s here; an uncompressed read is about twice as fast).
_COMPRESSION_PAYS = 0.8
DEFAULT_CHUNK_BYTES = 8 * 2**20  # small enough for small budgets (zarr decodes whole chunks)


@dataclass(frozen=True)
class Dataset:
    """An opened dataset: lazy ``X`` (and ``y``) read chunk by chunk from Zarr.

    Attributes
    ----------
    url : str
    X : dask.array.Array of shape (n_samples, n_features)
        In the stored dtype (integer images stay integer; kernels convert per block).
        Made on first use (k-NN reads ``X_zarr`` itself and never imports dask.array).
    y : dask.array.Array of shape (n_samples,) or None
    attrs : dict
        The group's ``pipeline`` attribute.
    X_zarr, y_zarr : zarr.Array
        The stored arrays (``y_zarr`` None without labels).
    """

    url: str
    attrs: dict
    X_zarr: object
    y_zarr: object

    @property
    def X(self):
        return self._lazy("X", self.X_zarr)

    @property
    def y(self):
        return None if self.y_zarr is None else self._lazy("y", self.y_zarr)

    def _lazy(self, name, arr):
        import dask.array as da

        cache = self.__dict__.setdefault("_dask", {})  # frozen: set through __dict__
        if name not in cache:
            cache[name] = da.from_zarr(arr)
        return cache[name]

    @property
    def n_samples(self) -> int:
        return self.X_zarr.shape[0]

    @property
    def n_features(self) -> int:
        return self.X_zarr.shape[1]

    def __repr__(self):
        y = f", y {self.y_zarr.dtype}" if self.y_zarr is not None else ""
        return (f"Dataset({self.url!r}, X {self.X_zarr.shape} {self.X_zarr.dtype} in chunks of "
                f"{self.X_zarr.chunks[0]} rows{y})")


def open_dataset(url) -> Dataset:
    """Open a dataset group.

    Parameters
    ----------
    url : str or Path
        A local path or an fsspec URL (``memory://``, ``s3://`` ...).

    Returns
    -------
    Dataset

    Raises
    ------
    InputError
        If nothing is there, it is not a dataset group, it is incomplete, or its
        arrays are not numeric.

    Examples
    --------
    >>> ds = open_dataset("memory://doc/blobs")          # doctest: +SKIP
    >>> ds.X.shape                                       # doctest: +SKIP
    (1000, 8)
    """
    url = as_url(url)
    g = open_group(url)
    attrs = dict(g.attrs.get("pipeline", {}))
    if attrs.get("kind", "dataset") != "dataset":
        raise InputError(f"{url!r} holds a {attrs['kind']} result, not a dataset")
    X = member(g, "X", f"array 'X' of {url!r}")
    if X is None:
        raise InputError(f"{url!r} has no array 'X'; a dataset group holds X (and optionally y)")
    if X.ndim != 2 or not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise InputError(f"array 'X' of {url!r} must be 2-D numeric, got {X.ndim}-D {X.dtype}")
    if attrs and not attrs.get("complete", False):
        raise InputError(
            f"dataset {url!r} is incomplete (its writing was interrupted); write it again "
            "with --overwrite"
        )
    if attrs.get("every_chunk_stored"):
        X = checked(X, strict=True)  # reads check that their chunks exist
    yz = member(g, "y", f"array 'y' of {url!r}")
    if yz is not None:
        if yz.shape != (X.shape[0],):
            raise InputError(f"labels 'y' of {url!r} have shape {yz.shape}; expected ({X.shape[0]},)")
        if attrs.get("every_chunk_stored"):
            yz = checked(yz, strict=True)
    return Dataset(url, attrs, X, yz)


def chunk_rows_for(n_rows, row_bytes, chunk_rows=None, memory_budget=None, threads=None):
    """Rows per stored chunk: ``chunk_rows`` if given, else about 8 MiB a chunk, fewer if
    ``memory_budget`` asks (each writing task holds three block-sized buffers)."""
    if chunk_rows is not None:
        if int(chunk_rows) != chunk_rows or chunk_rows < 1:
            raise InputError(f"chunk_rows={chunk_rows!r} must be a whole number >= 1")
        return int(min(chunk_rows, max(n_rows, 1)))
    rows = max(1, DEFAULT_CHUNK_BYTES // max(row_bytes, 1))
    if memory_budget is not None:

        budget = parse_budget(memory_budget)
        threads = threads or dask_threads()
        # Each writing task holds its source copy, the converted block and the
        # encoded chunk: three block-sized buffers.
        per_row = 3 * row_bytes * threads
        need = lambda r: r * per_row + runtime_overhead(r * per_row)
        fit, hi = 0, max(1, budget // per_row)  # the largest r with need(r) <= budget
        while fit < hi:
            mid = (fit + hi + 1) // 2
            fit, hi = (mid, hi) if need(mid) <= budget else (fit, mid - 1)
        if fit < 1:
            need = need(1)
            raise BudgetError(
                f"memory budget {format_bytes(budget)} is too small to write one row of "
                f"{format_bytes(row_bytes)} with {threads} thread(s); give at least "
                f"--memory-budget {math.ceil(need / 2**20)}MiB"
            )
        rows = min(rows, int(fit))
    return int(min(rows, max(n_rows, 1)))


def choose_compressors(sample, compressor):
    """Zstd where it pays on a sample block, else none ("auto")."""
    import zarr.codecs

    if compressor in (None, "none", False):
        return None
    if compressor == "zstd":
        return zarr.codecs.ZstdCodec(level=1)
    if compressor != "auto":
        raise InputError(f"compressor={compressor!r}; choose 'auto', 'zstd' or 'none'")
    from numcodecs import Zstd

    raw = np.ascontiguousarray(sample)
    if raw.nbytes == 0:
        return None
    ratio = len(Zstd(level=1).encode(raw)) / raw.nbytes
    return zarr.codecs.ZstdCodec(level=1) if ratio <= _COMPRESSION_PAYS else None


def write_group(url, arrays, attrs, label, overwrite, compressor="auto", *, job=None):
    """Write dask arrays into a new dataset group, marking it complete only at the end.

    ``arrays`` maps a name to (dask array, sample ndarray or None: the codec is chosen
    on the sample).  ``job``: the writing job's fingerprint; the same job's complete
    dataset is kept as it is, its interrupted one written again.  Returns the group.
    """
    with ResultWriter(url, "dataset", job, overwrite=overwrite,
                      attrs={**attrs, "every_chunk_stored": True}) as out:
        if out.status == "complete":
            return out.group
        writes = []
        for name, (darr, sample) in arrays.items():
            comp = choose_compressors(sample, compressor) if sample is not None else None
            target = out.array(name, darr.shape, tuple(c[0] for c in darr.chunks), darr.dtype, compressors=comp)
            writes.append(out.write_blocks([(darr, target)], f"{label}-{name}", record=False)[0])
        compute(*writes, label=label)
        out.complete()
        return out.group


def dataset_attrs(X, source, **extra):
    """A new dataset's provenance: shape, dtype, where it came from, when."""
    return {"format": FORMAT, "kind": "dataset", "n_samples": int(X.shape[0]),
            "n_features": int(X.shape[1]), "dtype": str(X.dtype), "source": source,
            "created": utc_now(), **extra}
