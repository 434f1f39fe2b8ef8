"""Datasets and results on Zarr: open, write, ingest, generate.

A *dataset* is a Zarr v3 group holding ``X`` (n_samples, n_features), chunked by rows
only, and optionally ``y`` (n_samples,) integer labels with the same row chunks; its
attribute ``pipeline`` is ``{"format": 1, "kind": "dataset", "complete": true, ...}``.
A *result* is a group of the same kind with ``kind`` one of ``distances``,
``neighbors``, ``gmm``; it is marked ``complete`` only after its last chunk is written.

Everything here writes chunk by chunk through dask (one task per chunk, task keys
``pipeline-<op>-<stage>``), so generating or ingesting data larger than memory costs
one block per thread, and every Zarr chunk written is exactly one dask chunk (dask
writes to misaligned chunks race and corrupt data, dask#12583).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, InputError, PipelineError

__all__ = [
    "Dataset", "open_dataset", "write_dataset", "ingest", "make_blobs", "make_cifar_like",
    "as_array", "as_labels", "FORMAT",
]

FORMAT = 1
_FLOAT = (np.float32, np.float64)
# Compressed chunks must save at least this much to be worth their decode time
# (zstd decodes ~500 MB/s here; an uncompressed read is about twice as fast).
_COMPRESSION_PAYS = 0.8
_DEFAULT_CHUNK_BYTES = 8 * 2**20  # small enough for small budgets (zarr decodes whole chunks)


# --------------------------------------------------------------------------- URLs

def _url(url) -> str:
    if isinstance(url, Path):
        return str(url)
    if not isinstance(url, str) or not url:
        raise InputError(f"expected a dataset path or URL, got {url!r}")
    return url


def _fs(url):
    import fsspec.core

    return fsspec.core.url_to_fs(url)


def _exists(url) -> bool:
    if "://" not in url:
        return os.path.exists(url)
    fs, path = _fs(url)
    return fs.exists(path)


def _remove(url):
    if "://" not in url:
        import shutil

        if os.path.isdir(url):
            shutil.rmtree(url)
        elif os.path.exists(url):
            os.remove(url)
        return
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _open_group(url, what="dataset"):
    """Open an existing group read-only, with one clear error for each way it is not."""
    import zarr
    import zarr.errors

    if not _exists(url):
        raise InputError(f"{what} {url!r} does not exist; check the path or create it first")
    try:
        node = zarr.open(store=url, mode="r")
    except (zarr.errors.NodeTypeValidationError, FileNotFoundError, KeyError, ValueError) as e:
        raise InputError(f"{what} {url!r} is not a Zarr group ({e}); pass a dataset written by pipeline") from None
    if not isinstance(node, zarr.Group):
        raise InputError(
            f"{what} {url!r} is a Zarr array, not a dataset group; pass the group that "
            "holds it (e.g. the parent path), or create one with `pipeline ingest`"
        )
    return node


def _member(group, name, where):
    """``group[name]`` or None, refusing arrays whose metadata zarr cannot accept."""
    try:
        if name not in group:
            return None
        arr = group[name]
    except (ValueError, TypeError) as e:
        text = str(e).lower()
        if "pickle" in text or "object" in text:
            raise InputError(
                f"{where} has an object dtype or a pickle-based codec; pipeline refuses to "
                "decode it (it could run code); rewrite it as a numeric array"
            ) from None
        raise InputError(f"{where} cannot be opened ({e}); rewrite it with pipeline") from None
    _check_safe(arr, where)
    return _checked(arr)


def _check_safe(arr, where):
    """Refuse object dtypes and pickle-based codecs unread: decoding them could run code."""
    dtype = arr.dtype
    meta = json.dumps(arr.metadata.to_dict(), default=str).lower()
    if getattr(dtype, "kind", "O") == "O" or "pickle" in meta or '"|o"' in meta:
        raise InputError(
            f"{where} has an object dtype or a pickle-based codec; pipeline refuses to "
            "decode it (it could run code); rewrite it as a numeric array"
        )


# ---------------------------------------------------------------------- integrity
#
# Reads: every array a dataset is read from is a ``_CheckedArray`` (a zarr.Array whose
# reads turn a decode failure into a DataError naming the array and the chunk), and a
# dataset written with every chunk stored (``every_chunk_stored``) has its chunk keys
# listed when opened, so a missing chunk is reported instead of read as fill_value.
# Writes: zarr's LocalStore writes each chunk to a temporary file and os.replace()s it,
# so a chunk file is whole or absent; a result's ``_done`` record (one int8 chunk per
# block, written after the block's chunks) says which blocks a rerun may keep.

_CHECKED = {}


def _checked(arr, strict=False):
    """``arr`` as a Zarr array whose failed reads name the chunk (see ``_checked_class``).

    ``strict``: every chunk was stored (``every_chunk_stored``), so a read also checks
    that the chunks it touches exist instead of taking a missing one as fill values.
    """
    return _checked_class(strict)(arr._async_array)


def _checked_from(async_array, strict):
    return _checked_class(strict)(async_array)


def _checked_class(strict=False):
    # Built on first use so that `import pipeline` does not import zarr.
    if "cls" not in _CHECKED:
        import zarr

        class _CheckedArray(zarr.Array):
            """A zarr.Array whose reads raise DataError naming the chunk that fails to decode."""

            _strict = False

            def __getitem__(self, selection):
                return _checked_read(self, selection, lambda: zarr.Array.__getitem__(self, selection))

            def __reduce__(self):
                return _checked_from, (self._async_array, self._strict)

        class _StrictArray(_CheckedArray):
            _strict = True

        for cls in (_CheckedArray, _StrictArray):
            cls.__module__ = __name__
        _CHECKED["cls"], _CHECKED["strict"] = _CheckedArray, _StrictArray
    return _CHECKED["strict" if strict else "cls"]


def _selected_chunks(arr, selection):
    """The row-chunk indices a selection touches (all of them unless it is a row slice or
    an array of row indices)."""
    first = selection[0] if isinstance(selection, tuple) and selection else selection
    if isinstance(first, np.ndarray) and first.dtype.kind in "iu" and first.ndim == 1:
        return np.unique(first // arr.chunks[0]).tolist()
    if isinstance(first, slice) and arr.shape[0]:
        lo, hi, _ = first.indices(arr.shape[0])
        if hi <= lo:
            return range(0)
        return range(lo // arr.chunks[0], (hi - 1) // arr.chunks[0] + 1)
    return range(arr.cdata_shape[0])


def _store_name(arr):
    root = getattr(arr.store, "root", None)
    return repr(str(root)) if root is not None else repr(str(arr.store))


def _chunk_where(arr, idx):
    key = (f"{arr.path}/" if arr.path else "") + arr.metadata.encode_chunk_key(idx)
    start = idx[0] * arr.chunks[0]
    stop = min(start + arr.chunks[0], arr.shape[0])
    return f"array {arr.path!r} of {_store_name(arr)}, chunk {tuple(idx)} (rows {start}..{stop - 1}, key {key!r})"


def _decode_error(arr, selection, exc):
    """A DataError naming the first chunk of ``selection`` that cannot be decoded."""
    import itertools

    import zarr

    grid = arr.cdata_shape
    for idx in itertools.product(_selected_chunks(arr, selection), *(range(n) for n in grid[1:])):
        sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, arr.chunks, arr.shape))
        try:
            zarr.Array.__getitem__(arr, sl)
        except Exception as e:  # noqa: BLE001
            return DataError(f"{_chunk_where(arr, idx)} cannot be decoded ({type(e).__name__}: {e}); "
                             "the store is damaged: write it again or restore it from a copy")
    return DataError(f"array {arr.path!r} of {_store_name(arr)} cannot be read at {selection!r} "
                     f"({type(exc).__name__}: {exc}); the store may be damaged")


def read_rows_into(arr, start, stop, out):
    """``arr[start:stop]`` decoded into ``out`` (a buffer the caller reuses).

    The same checks as reading a checked array: a missing chunk (strict arrays) or
    one that fails to decode raises DataError naming it.  Uncompressed chunks of a
    local store are read straight into ``out`` (:func:`_read_raw_rows`).
    """
    from zarr.core.buffer.cpu import NDBuffer

    if _read_raw_rows(arr, start, stop, out):
        return out
    selection = slice(start, stop)
    _checked_read(arr, selection, lambda: arr.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out)))
    return out


def _raw_layout(arr):
    """(directory, chunk rows, bytes per row) when ``arr``'s chunks are raw row bytes.

    That is a Zarr v3 array on a local store whose only codec is little-endian
    ``bytes`` (no compression, no transpose) and whose chunks span every column: a
    chunk file then holds its rows back to back in C order (edge chunks padded to the
    full chunk shape), so any run of rows is one ``preadv``.  None otherwise.
    """
    import sys

    from zarr.codecs import BytesCodec
    from zarr.storage import LocalStore

    meta = arr.metadata
    if getattr(meta, "zarr_format", None) != 3 or not isinstance(arr.store, LocalStore) \
            or sys.byteorder != "little" or not arr.dtype.isnative:
        return None
    codecs = getattr(meta, "codecs", ())
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec) \
            or (codecs[0].endian is not None and codecs[0].endian.value != "little"):
        return None
    if tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
        return None
    root = Path(arr.store.root) / arr.path if arr.path else Path(arr.store.root)
    return root, int(arr.chunks[0]), int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize


def _read_raw_rows(arr, start, stop, out):
    """Read rows ``start:stop`` of raw-byte chunks (:func:`_raw_layout`) into ``out``.

    Zarr would read each chunk file into a fresh buffer, wrap it and copy the rows
    out: with glibc's mmap threshold held low (:func:`pipeline.cluster._limit_malloc`)
    every such buffer is page-faulted afresh, twice the cost of the copy.  Returns
    False, having read nothing that counts, when the layout does not apply or a chunk
    file is missing or of the wrong size: zarr's path then reads it and raises what
    it raises (fill values, DataError naming the chunk).
    """
    if out.dtype != arr.dtype or not out.flags.c_contiguous or out.shape[0] != stop - start:
        return False
    layout = _raw_layout(arr)
    if layout is None:
        return False
    root, rows, row_bytes = layout
    view = memoryview(out.reshape(-1).view(np.uint8))
    r = start
    while r < stop:
        c = r // rows
        end = min(stop, (c + 1) * rows)
        key = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
        try:
            fd = os.open(root / key, os.O_RDONLY)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size != rows * row_bytes:
                return False
            want = (end - r) * row_bytes
            got = os.preadv(fd, [view[(r - start) * row_bytes:(end - start) * row_bytes]], (r - c * rows) * row_bytes)
            if got != want:
                return False
        finally:
            os.close(fd)
        r = end
    return True


def _checked_read(arr, selection, read):
    """``read()`` with the integrity checks: a missing chunk of a strict array, or one
    that fails to decode, raises DataError naming it (not zarr's fill value or error)."""
    if getattr(arr, "_strict", False):
        check_chunks_present(arr, rows=_selected_chunks(arr, selection))
    try:
        return read()
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - any decode failure means damaged data
        raise _decode_error(arr, selection, e) from None


def check_chunks_present(arr, rows=None):
    """Raise DataError naming the first chunk of ``arr`` whose key is missing from its store.

    Zarr reads a missing chunk as ``fill_value`` without a word; for stores written with
    every chunk stored, a missing key means a damaged store.  ``rows``: the row-chunk
    indices to check (default all).
    """
    import itertools

    from zarr.core.sync import sync

    prefix = f"{arr.path}/" if arr.path else ""
    rows = range(arr.cdata_shape[0]) if rows is None else rows
    chunks = list(itertools.product(rows, *(range(n) for n in arr.cdata_shape[1:])))
    keys = [prefix + arr.metadata.encode_chunk_key(idx) for idx in chunks]

    async def exist():
        import asyncio

        return await asyncio.gather(*(arr.store.exists(k) for k in keys))  # one round trip

    for idx, present in zip(chunks, sync(exist())):
        if not present:
            raise DataError(f"{_chunk_where(arr, idx)} is missing; the store is damaged (a chunk "
                            "was deleted or never written): write it again or restore it from a copy")


_HELD = {}  # lock file -> output URL, for the locks this process holds


def _lock_path(url):
    """``OUT.lock`` beside a local output (None for other URLs: they are not locked)."""
    if "://" in url and not url.startswith("file://"):
        return None
    path = url[len("file://"):] if url.startswith("file://") else url
    return os.path.abspath(path).rstrip(os.sep) + ".lock"


def _proc_start(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(info):
    import socket

    if info.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, assume it runs
    try:
        pid = int(info["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    start = _proc_start(pid)
    # A recycled pid belongs to a process started at another time.
    return start is None or info.get("start") in (None, start)


def acquire_lock(url):
    """Claim the output ``url`` for this process (a lock file ``OUT.lock`` with pid and host).

    Raises
    ------
    InputError
        If a live process holds it.  Locks of dead processes (a crash, SIGKILL) are
        taken over; locks this process already holds are kept.
    """
    import atexit
    import socket
    import time

    path = _lock_path(url)
    if path is None or path in _HELD:
        return
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
          "since": _now(), "output": url}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = Path(path).read_text()
                info = json.loads(text) if text else {}
                age = time.time() - os.path.getmtime(path)
            except (OSError, ValueError):
                info, age = {}, 0.0
            if not info and age < 5:
                time.sleep(0.2)  # a lock being written this instant
                continue
            if info and not (info.get("pid") == me["pid"] and info.get("host") == me["host"]) \
                    and _holder_alive(info):
                raise InputError(
                    f"output {url!r} is being written by another job (pid {info.get('pid')} on "
                    f"{info.get('host')} since {info.get('since')}); wait for it to finish, or "
                    f"delete {path} if that process is gone"
                )
            tmp = f"{path}.{os.getpid()}.tmp"
            Path(tmp).write_text(json.dumps(me))
            os.replace(tmp, path)  # a stale lock (its process died): take it over
            time.sleep(0.05)
            try:
                if json.loads(Path(path).read_text()).get("pid") != me["pid"]:
                    continue  # another process took it over at the same moment
            except (OSError, ValueError):
                continue
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        if not _HELD:
            atexit.register(_release_all)
        _HELD[path] = url
        return
    raise InputError(f"cannot lock output {url!r} ({path} keeps changing); another job is starting on it")


def release_lock(url):
    """Give up the lock on ``url`` if this process holds it."""
    path = _lock_path(_url(url))
    if path is None or _HELD.pop(path, None) is None:
        return
    try:
        if json.loads(Path(path).read_text()).get("pid") == os.getpid():
            os.remove(path)
    except (OSError, ValueError):
        pass


def _release_all():
    for path in list(_HELD):
        release_lock(_HELD[path])


def _group_url(group):
    root = getattr(group.store, "root", None)
    if root is None:
        return None
    return os.path.join(str(root), group.path) if group.path else str(root)


def _test_pause():
    """Testing hook: sleep ``PIPELINE_TEST_BLOCK_DELAY`` seconds after each block written.

    The crash tests set it so that a real SIGKILL lands part-way through a small job.
    """
    delay = float(os.environ.get("PIPELINE_TEST_BLOCK_DELAY") or 0)
    if delay > 0:
        import time

        time.sleep(delay)


def done_record(group, grid):
    """The result's per-block completion record ``_done``: int8, one chunk per block."""
    grid = tuple(int(n) for n in grid)
    if "_done" in group:
        done = group["_done"]
        if tuple(done.shape) != grid:
            raise DataError(f"the block record of {_group_url(group) or 'the output'} has shape "
                            f"{done.shape}, expected {grid}; rerun with --overwrite")
        return done
    return group.create_array("_done", shape=grid, chunks=(1,) * len(grid), dtype=np.int8,
                              fill_value=0, compressors=None)


def pending_blocks(done):
    """Indices of the blocks not yet recorded as written, in order."""
    return [tuple(int(i) for i in idx) for idx in np.argwhere(done[...] == 0)]


def _chunk_slices(target, idx):
    return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, target.chunks, target.shape))


def _write_blocks_task(targets, done, idx, *blocks):
    for target, block in zip(targets, blocks):
        target[_chunk_slices(target, idx)] = block
    done[idx] = 1  # only after the block's chunks: a rerun keeps exactly the finished blocks
    _test_pause()
    return np.ones(1, dtype=np.int8)


def write_blocks(group, arrays, label):
    """A lazy, resumable write of dask arrays into Zarr arrays of a result group.

    Parameters
    ----------
    group : zarr.Group
        The result; its ``_done`` record is created (all zero) or reused.
    arrays : list of (dask array, zarr.Array)
        Same block grid, each dask chunk exactly one Zarr chunk (checked).
    label : str
        Task keys read ``pipeline-<label>-<hash>``.

    Returns
    -------
    (dask array or None, n_written, n_kept)
        One task per block not yet recorded as done (None when every block is); tasks
        of blocks already written are not in the graph at all, so nothing upstream of
        them is computed again.
    """
    import math as _math

    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    darrs = [d for d, _ in arrays]
    targets = [t for _, t in arrays]
    grid = darrs[0].numblocks
    for darr, target in arrays:
        if darr.numblocks != grid or darr.shape != target.shape:
            raise ValueError(f"{darr} does not match {target} or the first array's blocks")
        for dim, (chunks, zc) in enumerate(zip(darr.chunks, target.chunks)):
            if any(c != zc for c in chunks[:-1]) or chunks[-1] > zc:
                raise ValueError(f"dask chunks {darr.chunks} are not aligned with Zarr chunks {target.chunks} on axis {dim}")
    done = done_record(group, grid)
    todo = pending_blocks(done)
    kept = _math.prod(grid) - len(todo)
    if not todo:
        return None, 0, kept
    name = f"pipeline-{label}-" + tokenize([d.name for d in darrs], [t.path for t in targets],
                                           _group_url(group) or id(group), todo)
    dsk = {(name, n): (_write_blocks_task, targets, done, idx) + tuple((d.name,) + idx for d in darrs)
           for n, idx in enumerate(todo)}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=darrs)
    out = da.Array(graph, name, chunks=((1,) * len(todo),), dtype=np.int8, meta=np.empty((0,), np.int8))
    return out, len(todo), kept


def source_identity(X):
    """An input's URL and creation stamp (or a description), for job fingerprints.

    A dataset written again gets a new stamp, so a result computed from the old one is
    not mistaken for (or resumed as) the same job.
    """
    import hashlib

    def stamp(url, attrs):
        # Creation time (to the second) and everything else the store says about itself.
        text = json.dumps({k: v for k, v in attrs.items() if k != "step"}, sort_keys=True, default=str)
        return f"{url}@{attrs.get('finished') or attrs.get('created') or ''}:" \
               f"{hashlib.sha1(text.encode()).hexdigest()[:12]}"

    if isinstance(X, Dataset):
        return stamp(X.url, X.attrs)
    if isinstance(X, (str, Path)):
        import zarr

        try:
            attrs = dict(zarr.open_group(store=str(X), mode="r").attrs.get("pipeline", {}))
        except Exception:  # noqa: BLE001 - unreadable inputs are reported when opened
            attrs = {}
        return stamp(str(X), attrs)
    return f"<{type(X).__name__} {getattr(X, 'shape', '')}>"


# ------------------------------------------------------------------------ Dataset

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
    url = _url(url)
    g = _open_group(url)
    attrs = dict(g.attrs.get("pipeline", {}))
    if attrs.get("kind", "dataset") != "dataset":
        raise InputError(f"{url!r} holds a {attrs['kind']} result, not a dataset")
    X = _member(g, "X", f"array 'X' of {url!r}")
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
        X = _checked(X, strict=True)  # reads check that their chunks exist
    yz = _member(g, "y", f"array 'y' of {url!r}")
    if yz is not None:
        if yz.shape != (X.shape[0],):
            raise InputError(f"labels 'y' of {url!r} have shape {yz.shape}; expected ({X.shape[0]},)")
        if attrs.get("every_chunk_stored"):
            yz = _checked(yz, strict=True)
    return Dataset(url, attrs, X, yz)


def _zarr_rows(arr, rows=None):
    import dask.array as da

    rows = rows or arr.chunks[0]
    if not isinstance(rows, tuple):  # a tuple gives every block's rows
        rows = min(rows, max(arr.shape[0], 1))
    return da.from_zarr(arr, chunks=(rows,) + tuple(arr.shape[1:]))


def as_array(X, name="X", rows=None):
    """Return ``X`` as a 2-D dask array chunked by rows only.

    Parameters
    ----------
    X : ndarray, dask array, zarr.Array, Dataset, str or Path
        A dataset URL or path opens its ``X``.
    name : str
        Used in error messages.
    rows : int or tuple of int, optional
        Rows per chunk (a tuple: of each chunk).  Zarr-backed data are read straight
        into chunks of this size (no rechunk layer, so reading fuses into the task
        that uses the block).

    Raises
    ------
    InputError
        If ``X`` is not 2-D numeric, is empty, or cannot be opened.
    """
    import dask.array as da
    import zarr

    if isinstance(X, (str, Path)):
        X = open_dataset(X)
    if isinstance(X, Dataset):
        X = X.X_zarr
    if isinstance(X, zarr.Array):
        _check_safe(X, name)
        arr = _zarr_rows(X, rows)
    elif isinstance(X, da.Array):
        arr = X
    else:
        try:
            X = np.asarray(X)
        except Exception as e:  # noqa: BLE001 - anything unconvertible is bad input
            raise InputError(f"{name} cannot be read as an array: {e}") from None
        if X.ndim == 2:
            arr = da.from_array(X, chunks=(rows or max(1, X.shape[0]), X.shape[1]))
        else:
            arr = X
    if arr.ndim != 2:
        raise InputError(f"{name} must be 2-D (n_samples, n_features), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {arr.shape}); it needs at least one row and one feature")
    if len(arr.chunks[1]) != 1:
        arr = arr.rechunk({1: arr.shape[1]})
    if rows is not None and arr.chunks[0][0] != rows and not isinstance(X, zarr.Array):
        arr = arr.rechunk({0: rows})
    return arr


def zarr_source(X):
    """The ``zarr.Array`` behind ``X`` (a Dataset, URL or Zarr array), else None.

    Graph builders pass it to tasks that read their own rows (:func:`read_rows`):
    a block read inside the task that uses it is freed with that task, whereas a
    separate read task's block stays in memory until its last consumer has run
    (for an all-pairs product, that is the whole dataset).
    """
    import zarr

    if isinstance(X, (str, Path)):
        X = open_dataset(X)
    if isinstance(X, Dataset):
        X = X.X_zarr
    return X if isinstance(X, zarr.Array) else None


def read_rows(source, rows):
    """Rows ``rows[0] .. rows[-1]`` of a Zarr array, as a C-contiguous block.

    ``rows`` is the block of a ``dask.array.arange`` over the rows, so the same
    chunking describes the blocks whether they are read here or by dask.
    """
    return np.ascontiguousarray(source[int(rows[0]): int(rows[-1]) + 1])


def as_labels(y, n, name="y"):
    """Return labels as a 1-D NumPy integer array of length ``n``.

    Labels are small (8 bytes a row), so they are held in memory.
    """
    import dask

    if isinstance(y, (str, Path)):
        y = open_dataset(y)
    if isinstance(y, Dataset):
        if y.y_zarr is None:
            raise InputError(f"dataset {y.url!r} has no labels 'y'")
        y = y.y_zarr[...]
    if dask.is_dask_collection(y):
        y = y.compute()
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise InputError(f"{name} has shape {y.shape}; expected ({n},), one label per row of X")
    return y


# ------------------------------------------------------------------------ writing

def _choose_chunk_rows(n_rows, row_bytes, chunk_rows=None, memory_budget=None, threads=None):
    if chunk_rows is not None:
        if int(chunk_rows) != chunk_rows or chunk_rows < 1:
            raise InputError(f"chunk_rows={chunk_rows!r} must be a whole number >= 1")
        return int(min(chunk_rows, max(n_rows, 1)))
    rows = max(1, _DEFAULT_CHUNK_BYTES // max(row_bytes, 1))
    if memory_budget is not None:
        from .budget import RUNTIME_OVERHEAD, format_bytes, parse_budget
        from .cluster import dask_threads
        from .errors import BudgetError

        budget = parse_budget(memory_budget)
        threads = threads or dask_threads()
        # Each writing task holds its source copy, the converted block and the
        # encoded chunk: three block-sized buffers.
        per_row = 3 * row_bytes * threads
        fit = (budget - RUNTIME_OVERHEAD) // per_row
        if fit < 1:
            need = RUNTIME_OVERHEAD + per_row
            raise BudgetError(
                f"memory budget {format_bytes(budget)} is too small to write one row of "
                f"{format_bytes(row_bytes)} with {threads} thread(s); give at least "
                f"--memory-budget {math.ceil(need / 2**20)}MiB"
            )
        rows = min(rows, int(fit))
    return int(min(rows, max(n_rows, 1)))


def _compressors(sample, compressor):
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


def _prepare_output(url, overwrite, what="output"):
    url = _url(url)
    acquire_lock(url)  # before anything is removed: another job's output is never touched
    if _exists(url):
        if not overwrite:
            release_lock(url)
            raise InputError(
                f"{what} {url!r} already exists; pass --overwrite (overwrite=True) to "
                "replace it or choose another path"
            )
        _remove(url)
    return url


def _create_group(url, attrs):
    import zarr

    g = zarr.open_group(store=url, mode="w", zarr_format=3)
    g.attrs["pipeline"] = attrs
    return g


def _now():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_block(block, target, block_info=None):
    loc = block_info[0]["array-location"]
    target[tuple(slice(a, b) for a, b in loc)] = block
    return np.zeros((1,) * block.ndim, dtype=np.int8)


def store_array(darr, target, label):
    """A lazy write of ``darr`` into the Zarr array ``target`` (same shape).

    One task per chunk, named ``pipeline-<label>``; the dask chunks must coincide with
    the Zarr chunks (checked), so no two tasks ever write to one Zarr chunk.
    """
    for dim, (chunks, zc) in enumerate(zip(darr.chunks, target.chunks)):
        if any(c != zc for c in chunks[:-1]) or chunks[-1] > zc:
            raise ValueError(f"dask chunks {darr.chunks} are not aligned with Zarr chunks {target.chunks} on axis {dim}")
    return darr.map_blocks(
        _write_block, target, dtype=np.int8, chunks=tuple((1,) * len(c) for c in darr.chunks),
        token=f"pipeline-{label}",
    )


def _write_group(url, arrays, attrs, label, overwrite, compressor="auto", progress_label=None):
    """Write dask arrays into a new group, marking it complete only at the end.

    ``arrays`` maps a name to (dask array, sample ndarray or None).
    """
    from .cluster import compute

    url = _prepare_output(url, overwrite)
    # Every chunk is stored, even one equal to the fill value, so that readers can
    # tell a missing chunk (a damaged store) from an empty one.
    attrs = {**attrs, "every_chunk_stored": True}
    g = _create_group(url, {**attrs, "complete": False})
    writes = []
    for name, (darr, sample) in arrays.items():
        comp = _compressors(sample, compressor) if sample is not None else None
        target = g.create_array(
            name, shape=darr.shape, dtype=darr.dtype,
            chunks=tuple(c[0] for c in darr.chunks), compressors=comp,
            config={"write_empty_chunks": True},
        )
        writes.append(store_array(darr, target, f"{label}-{name}"))
    compute(*writes, label=progress_label or label)
    g.attrs["pipeline"] = {**attrs, "complete": True}
    release_lock(url)
    return g


def _dataset_attrs(X, source, **extra):
    return {"format": FORMAT, "kind": "dataset", "n_samples": int(X.shape[0]),
            "n_features": int(X.shape[1]), "dtype": str(X.dtype), "source": source,
            "created": _now(), **extra}


def write_dataset(url, X, y=None, chunk_rows=None, overwrite=False, compressor="auto",
                  memory_budget=None):
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

    X = as_array(X)
    if not (np.issubdtype(X.dtype, np.floating) or X.dtype.kind in "ui"):
        raise InputError(f"X must be float or integer, got {X.dtype}")
    rows = _choose_chunk_rows(X.shape[0], X.shape[1] * X.dtype.itemsize, chunk_rows, memory_budget)
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
    _write_group(url, arrays, _dataset_attrs(X, "write_dataset"), "write", overwrite, compressor)
    return open_dataset(url)


# ------------------------------------------------------------------------- ingest

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
           memory_budget=None):
    """Stream a ``.npy`` file into a dataset, one row block at a time.

    The file is memory-mapped per block and unmapped after each copy, so it is never
    held whole: the process's memory grows by a few blocks, not by the file.

    Parameters
    ----------
    src_npy : str or Path
        A 2-D ``.npy`` file (C or Fortran order), float or integer.
    url : str or Path
        The dataset to write.
    labels : str, Path or array-like, optional
        A 1-D ``.npy`` of integer labels (or an array), one per row.
    chunk_rows, overwrite, compressor, memory_budget
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
    rows = _choose_chunk_rows(shape[0], shape[1] * dtype.itemsize, chunk_rows, memory_budget)
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
    attrs = _dataset_attrs(X, f"ingest:{os.path.abspath(path)}")
    _write_group(url, arrays, attrs, "ingest", overwrite, compressor)
    return open_dataset(url)


# --------------------------------------------------------------------- generators

def _block_rng(seed, block_index):
    # One independent stream per block: the data do not depend on the chunking's
    # schedule, only on (seed, chunk_rows).
    return np.random.default_rng(np.random.SeedSequence([seed, block_index]))


def _blobs_block(centers, labels_of, seed, std, dtype, block_info=None):
    i = block_info[None]["chunk-location"][0]
    (start, stop), _ = block_info[None]["array-location"]
    rng = _block_rng(seed, i)
    lab = labels_of(start, stop, len(centers), seed)
    # Generated in the working dtype, in place: two block-sized buffers, not four.
    X = rng.standard_normal((stop - start, centers.shape[1]), dtype=dtype)
    X *= std
    X += centers[lab]
    return X


def _labels_of(start, stop, n_centers, seed):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2**31, start]))
    return rng.integers(0, n_centers, size=stop - start)


def _label_block(n_centers, seed, block_info=None):
    (start, stop), = block_info[None]["array-location"]
    return _labels_of(start, stop, n_centers, seed)


def _generated(url, n_samples, n_features, dtype, chunk_rows, memory_budget, make_X,
               n_centers, seed, attrs, overwrite, compressor, work_itemsize=None):
    import dask.array as da

    # Blocks are generated in a float dtype (work_itemsize) and cast to `dtype`.
    row_bytes = n_features * max(np.dtype(dtype).itemsize, work_itemsize or 0)
    rows = _choose_chunk_rows(n_samples, row_bytes, chunk_rows, memory_budget)
    chunks0 = tuple(min(rows, n_samples - s) for s in range(0, n_samples, rows))
    X = da.map_blocks(make_X, chunks=(chunks0, (n_features,)), dtype=dtype,
                      token="pipeline-generate-X", meta=np.empty((0, 0), dtype))
    y = da.map_blocks(_label_block, n_centers, seed, chunks=(chunks0,), dtype=np.int64,
                      token="pipeline-generate-y", meta=np.empty((0,), np.int64))
    sample = X.blocks[0].compute()
    _write_group(url, {"X": (X, sample), "y": (y, None)}, attrs, "generate", overwrite, compressor)
    return open_dataset(url)


def _check_shape(n_samples, n_features, dtype, dtypes):
    for name, v in (("n_samples", n_samples), ("n_features", n_features)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise InputError(f"{name}={v!r} must be a whole number >= 1")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in dtypes:
        raise InputError(f"dtype={dtype!r}; choose one of {', '.join(dtypes)}")
    return int(n_samples), int(n_features), dt


def make_blobs(url, n_samples, n_features, centers=8, dtype="float32", random_state=0,
               cluster_std=1.0, center_box=(-10.0, 10.0), chunk_rows=None, overwrite=False,
               compressor="auto", memory_budget=None):
    """Generate isotropic Gaussian blobs straight to Zarr, chunk by chunk.

    Like :func:`sklearn.datasets.make_blobs`, but never holding more than a block per
    thread, so datasets larger than memory can be generated.  Labels ``y`` are the
    blob of each row.

    Parameters
    ----------
    url : str or Path
    n_samples, n_features : int
    centers : int
        Number of blobs; their centres are uniform in ``center_box``.
    dtype : {"float32", "float64"}
    random_state : int
        The data depend only on ``(random_state, chunk_rows)``.

    Returns
    -------
    Dataset

    Examples
    --------
    >>> ds = make_blobs("memory://doc/blobs", 1000, 8, centers=3)
    >>> ds.X.shape, ds.X.dtype.name
    ((1000, 8), 'float32')
    """
    n_samples, n_features, dt = _check_shape(n_samples, n_features, dtype, ("float32", "float64"))
    if isinstance(centers, bool) or int(centers) != centers or centers < 1:
        raise InputError(f"centers={centers!r} must be a whole number >= 1")
    seed = int(random_state or 0)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2**32 - 1]))
    C = rng.uniform(center_box[0], center_box[1], size=(int(centers), n_features))

    C = C.astype(dt)

    def make_X(block_info=None):
        return _blobs_block(C, _labels_of, seed, cluster_std, dt, block_info)

    attrs = _dataset_attrs(_Shape(n_samples, n_features, dt), "make_blobs",
                           generator={"centers": int(centers), "random_state": seed,
                                      "cluster_std": cluster_std})
    return _generated(url, n_samples, n_features, dt, chunk_rows, memory_budget, make_X,
                      int(centers), seed, attrs, overwrite, compressor)


def _patterns(n, h, w, c, seed):
    """``n`` smooth unit-amplitude colour patterns (2-D sinusoids) of shape (h, w, c)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    P = np.empty((n, h, w, c))
    for i in range(n):
        for ch in range(c):
            fx, fy = rng.uniform(0.5, 3.0, 2)
            P[i, :, :, ch] = np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
    return P.reshape(n, -1)


_NUISANCES = 16


def make_cifar_like(url, n_samples, n_features=3072, n_classes=10, random_state=0,
                    class_seed=0, class_contrast=30.0, nuisance=30.0, noise=40.0,
                    chunk_rows=None, overwrite=False, compressor="auto", memory_budget=None):
    """Generate CIFAR-10-shaped images: uint8 rows of 32x32x3 pixels with labels.

    Each image is grey (127.5) plus its class's smooth colour pattern
    (``class_contrast``), plus a random mix of 16 nuisance patterns shared by all
    classes (``nuisance``: lighting, background), plus pixel noise, clipped to 0..255.
    The defaults make the task about as hard as CIFAR-10 for raw-pixel k-NN (5-NN
    accuracy near 40% with 5000 training images).  Stored as uint8, as CIFAR-10 ships,
    and converted to float per block by the operations that read it.  ``class_seed``
    fixes the patterns, ``random_state`` the images: a training and a test set share
    the first and differ in the second.

    Examples
    --------
    >>> ds = make_cifar_like("memory://doc/cifar", 100)
    >>> ds.X.dtype.name, ds.X.shape
    ('uint8', (100, 3072))
    """
    n_samples, n_features, _ = _check_shape(n_samples, n_features, "uint8", ("uint8",))
    if isinstance(n_classes, bool) or int(n_classes) != n_classes or n_classes < 1:
        raise InputError(f"n_classes={n_classes!r} must be a whole number >= 1")
    side = math.isqrt(n_features // 3)
    h, w, c = (side, side, 3) if side * side * 3 == n_features else (1, n_features, 1)
    seed = int(random_state or 0)
    P = _patterns(int(n_classes) + _NUISANCES, h, w, c, int(class_seed)).astype(np.float32)
    T = 127.5 + class_contrast * P[:n_classes]
    N = P[n_classes:]

    def make_X(block_info=None):
        X = _blobs_block(T, _labels_of, seed, noise, np.float32, block_info)
        rng = _block_rng(seed + 1, block_info[None]["chunk-location"][0])
        coef = rng.standard_normal((X.shape[0], _NUISANCES), dtype=np.float32)
        coef *= nuisance
        # 16 axpys rather than one GEMM: BLAS results depend on its thread count, and
        # the same seed must give the same bytes on threads and on any cluster.
        for j in range(_NUISANCES):
            X += coef[:, j, None] * N[j]
        np.clip(X, 0, 255, out=X)
        return np.rint(X, out=X).astype(np.uint8)

    attrs = _dataset_attrs(_Shape(n_samples, n_features, np.dtype(np.uint8)), "make_cifar_like",
                           generator={"n_classes": int(n_classes), "random_state": seed,
                                      "class_seed": int(class_seed), "class_contrast": class_contrast,
                                      "nuisance": nuisance, "noise": noise})
    return _generated(url, n_samples, n_features, np.uint8, chunk_rows, memory_budget, make_X,
                      int(n_classes), seed, attrs, overwrite, compressor, work_itemsize=4)


@dataclass(frozen=True)
class _Shape:
    n: int
    d: int
    dtype: np.dtype

    @property
    def shape(self):
        return (self.n, self.d)


# ------------------------------------------------------------------------ results

def job_fingerprint(**params) -> str:
    """A stable text of a job's parameters, stored with its result to recognise reruns."""
    return json.dumps(params, sort_keys=True, default=str)


def open_result_for_write(url, kind, job, overwrite=False, resume=False):
    """Create a result group for ``kind``, resume the same job's, or report it finished.

    The output is locked for this process first (``OUT.lock``, see :func:`acquire_lock`)
    and unlocked by :func:`mark_complete`.

    Returns
    -------
    (group or None, status)
        ``status`` is ``"new"`` (a fresh incomplete group is returned),
        ``"resume"`` (with ``resume=True``: the same job's incomplete result, opened for
        writing, its finished blocks kept) or ``"complete"`` (the same job's complete
        result is already there; group is the opened result, read-only).

    Raises
    ------
    InputError
        If ``url`` holds anything else and ``overwrite`` is false, or another live
        process is writing it.
    """
    import zarr

    url = _url(url)
    acquire_lock(url)
    if _exists(url) and not overwrite:
        try:
            g = zarr.open_group(store=url, mode="r")
            attrs = dict(g.attrs.get("pipeline", {}))
        except Exception:  # noqa: BLE001 - anything unreadable is "something else"
            attrs = {}
        same = attrs.get("kind") == kind and attrs.get("job") == job
        if same and attrs.get("complete"):
            release_lock(url)
            return g, "complete"
        if same and resume:
            return zarr.open_group(store=url, mode="r+"), "resume"
        if not same:
            release_lock(url)
            raise InputError(
                f"output {url!r} already exists and holds another result; pass --overwrite "
                "(overwrite=True) to replace it or choose another path"
            )
        # The same job's incomplete result, by a writer that cannot resume: start again.
    _prepare_output(url, overwrite=True)
    g = _create_group(url, {"format": FORMAT, "kind": kind, "job": job, "complete": False,
                            "created": _now()})
    return g, "new"


def mark_complete(group, **attrs):
    """Mark a result complete (last step of every writer), adding ``attrs``."""
    meta = dict(group.attrs["pipeline"])
    meta.update(attrs, complete=True, finished=_now())
    group.attrs["pipeline"] = meta
    url = _group_url(group)
    if url is not None:
        release_lock(url)


def open_result(url, kind=None):
    """Open a complete result group; refuse an incomplete one."""
    url = _url(url)
    g = _open_group(url, what="result")
    attrs = dict(g.attrs.get("pipeline", {}))
    if kind is not None and attrs.get("kind") != kind:
        raise InputError(f"{url!r} holds {attrs.get('kind', 'no pipeline result')!r}, not a {kind} result")
    if not attrs.get("complete"):
        raise DataError(f"result {url!r} is incomplete; rerun the command that writes it")
    return g
