"""Reading stored arrays with integrity checks: safety, missing and damaged chunks.

Every array a dataset is read from is a checked array (a ``zarr.Array`` whose reads
turn a decode failure into a DataError naming the array and the chunk), and a dataset
written with every chunk stored (``every_chunk_stored``) is opened *strict*: its reads
check that the chunks they touch exist, so a missing chunk is reported instead of read
as fill_value.  Object dtypes and pickle-based codecs are refused unread.  Uncompressed
chunks of a local store are read straight into the caller's buffer (``preadv``).

Writes are whole or absent per chunk: zarr's LocalStore writes each chunk to a temporary
file and ``os.replace()``s it; a result's done-record says which blocks a rerun may keep
(:mod:`pipeline.store.results`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import DataError, InputError, PipelineError

__all__ = ["check_safe", "member", "checked", "checked_read", "check_chunks_present",
           "read_rows_into", "read_block", "take_rows"]


def member(group, name, where):
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
    check_safe(arr, where)
    return checked(arr)


def check_safe(arr, where):
    """Refuse object dtypes and pickle-based codecs unread: decoding them could run code."""
    dtype = arr.dtype
    meta = json.dumps(arr.metadata.to_dict(), default=str).lower()
    if getattr(dtype, "kind", "O") == "O" or "pickle" in meta or '"|o"' in meta:
        raise InputError(
            f"{where} has an object dtype or a pickle-based codec; pipeline refuses to "
            "decode it (it could run code); rewrite it as a numeric array"
        )


_CHECKED = {}


def checked(arr, strict=False):
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
                return checked_read(self, selection, lambda: zarr.Array.__getitem__(self, selection))

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
    checked_read(arr, selection, lambda: arr.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out)))
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
    out: with glibc's mmap threshold held low (:func:`pipeline.runtime.limit_malloc`, opt-in)
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


def checked_read(arr, selection, read):
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




def read_block(src, start, stop, work=None):
    """Rows ``start .. stop - 1`` of the Zarr array ``src``, read inside the task that uses them.

    Each task owns what it reads: a block is neither held in memory between tasks nor
    shared by the tasks of several query blocks (a separate read task's block would stay
    alive until its last consumer ran: for all pairs, the whole dataset).  With ``work``
    (a thread's scratch dict, :func:`pipeline.runtime.thread_work`) the rows are decoded
    into a buffer the thread reuses from block to block; the caller must not return it.
    """
    from ..kernels.buffers import scratch

    buf = scratch(work, "read", (stop - start,) + tuple(src.shape[1:]), src.dtype)
    return read_rows_into(src, start, stop, buf)


def take_rows(arr, idx):
    """``arr[idx]`` for a few row indices, with the checks of any read."""
    sel = (np.asarray(idx), slice(None))
    return np.asarray(checked_read(arr, sel, lambda: arr.get_orthogonal_selection(sel)))
