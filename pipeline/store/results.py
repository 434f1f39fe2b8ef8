"""The one result writer: every output of pipeline is written through :class:`ResultWriter`.

The protocol, in one place: lock the output (:mod:`pipeline.store.locks`) -> decide
*new*, *resume*, *complete* or *refuse* from what is there and the job's fingerprint ->
write blocks, each followed by its done-record entry -> mark complete -> release the
lock on any exit (a crash leaves the output incomplete and resumable by any process).

A job's fingerprint names its inputs by **content** (:func:`content_identity`): a
dataset written again at the same URL has other chunk files, so a result computed
from the old data is never taken for (or resumed as) the same job.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from ..errors import DataError, InputError
from .locks import acquire_lock, release_lock
from .urls import as_url, exists, filesystem, group_url, open_group, remove

__all__ = ["FORMAT", "ResultWriter", "job_fingerprint", "content_identity", "existing",
           "open_result", "utc_now"]

FORMAT = 1


def utc_now() -> str:
    """The time now, UTC, to the second (ISO 8601): stamps of stores."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def job_fingerprint(**params) -> str:
    """A stable text of a job's parameters, stored with its result to recognise reruns."""
    return json.dumps(params, sort_keys=True, default=str)


# ----------------------------------------------------------------------- identity

def _listing(url):
    """(relative name, size, modification stamp) of every file of the store's top-level arrays.

    The data are the arrays' metadata and chunks (the root ``zarr.json`` holds
    attributes only: provenance, a job's fingerprint; a group nested inside, such as an
    output written there, or a lock file, is not the input's data).  Rewriting a chunk
    replaces its file, so its stamp changes even when its size does not.
    """
    import zarr

    try:
        arrays = set(zarr.open_group(store=url, mode="r").array_keys())
    except Exception:  # noqa: BLE001 - not a group: every file counts
        arrays = None
    entries = []
    if "://" not in url or url.startswith("file://"):
        root = url[len("file://"):] if url.startswith("file://") else url
        for dirpath, _, files in os.walk(root):
            for name in files:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                if rel != "zarr.json" and (arrays is None or rel.split(os.sep)[0] in arrays):
                    st = os.stat(full)
                    entries.append((rel, st.st_size, st.st_mtime_ns))
    else:
        fs, root = filesystem(url)
        for name, info in fs.find(root, detail=True).items():
            rel = name[len(root):].lstrip("/")
            if rel != "zarr.json" and (arrays is None or rel.split("/")[0] in arrays):
                stamp = next((info[k] for k in ("mtime", "LastModified", "ETag", "created", "last_modified")
                              if info.get(k) is not None), "")
                entries.append((rel, info.get("size"), str(stamp)))
    return sorted(entries)


def _zarr_url(arr):
    """A URL for a Zarr array's own store and path, or None when its store has none."""
    local = group_url(arr)  # a local store's directory (arrays have .store and .path too)
    if local is not None:
        return local
    fs, path = getattr(arr.store, "fs", None), getattr(arr.store, "path", None)
    if fs is not None and path is not None:
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        return f"{protocol}://{path.rstrip('/')}/{arr.path}".rstrip("/")
    return None


def content_identity(X) -> str:
    """What an input *is*, for job fingerprints: its URL and a digest of its stored files.

    A store (URL, Path, Dataset or Zarr array on a listable store) is named by the
    sizes and stamps of its arrays' files, so data written again at the same URL give
    another identity; an in-memory array by a hash of its bytes (dask's ``tokenize``).
    Anything else, a dask array included (its graph's name does not follow the data it
    reads), gets a fresh token: never the same job.
    """
    import uuid

    import zarr

    url = None
    if isinstance(X, (str, Path)):
        url = str(X)
    elif hasattr(X, "X_zarr") and hasattr(X, "url"):  # a Dataset (imported lazily: no cycle)
        url = X.url
    elif isinstance(X, zarr.Array):
        url = _zarr_url(X)
        if url is None:
            return f"<zarr array {uuid.uuid4().hex}>"
    if url is not None:
        try:
            entries = _listing(url)
        except OSError:
            entries = []  # unreadable inputs are reported when opened
        digest = hashlib.sha1(json.dumps(entries, default=str).encode()).hexdigest()[:16]
        return f"{url}@{digest}"
    from dask.base import is_dask_collection, tokenize

    if is_dask_collection(X):
        return f"<dask {uuid.uuid4().hex}>"
    if isinstance(X, np.ndarray) or hasattr(X, "__array__"):
        a = np.asarray(X)
        return f"<array {a.shape} {a.dtype} {tokenize(a)}>"
    return f"<{type(X).__name__} {uuid.uuid4().hex}>"


# ------------------------------------------------------------------------ reading

def existing(url):
    """The ``pipeline`` attributes of the store at ``url``, {} for a foreign one, None if nothing is there."""
    import zarr

    url = as_url(url)
    if not exists(url):
        return None
    try:
        return dict(zarr.open_group(store=url, mode="r").attrs.get("pipeline", {}))
    except Exception:  # noqa: BLE001 - anything unreadable is "something else"
        return {}


def open_result(url, kind=None):
    """Open a complete result group; refuse an incomplete one."""
    url = as_url(url)
    g = open_group(url, what="result")
    attrs = dict(g.attrs.get("pipeline", {}))
    if kind is not None and attrs.get("kind") != kind:
        raise InputError(f"{url!r} holds {attrs.get('kind', 'no pipeline result')!r}, not a {kind} result")
    if not attrs.get("complete"):
        raise DataError(f"result {url!r} is incomplete; rerun the command that writes it")
    return g


# ------------------------------------------------------------------------ writing

def _chunk_slices(target, idx):
    return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, target.chunks, target.shape))


def _write_blocks_task(targets, done, on_block, idx, *blocks):
    """Task: one block's chunks of every target, then (resumable outputs) its done-record."""
    for target, block in zip(targets, blocks):
        target[_chunk_slices(target, idx)] = block
    if done is not None:
        done[idx] = 1  # only after the block's chunks: a rerun keeps exactly the finished blocks
    if on_block is not None:
        on_block(idx)
    return np.ones(1, dtype=np.int8)


class ResultWriter:
    """Write one output: lock, new / resume / complete / refuse, blocks, done-record, complete.

    Used as a context manager; the lock is released on any exit.  A failure leaves the
    output incomplete (marked so), which the same job resumes or restarts and every
    reader refuses.

    Parameters
    ----------
    url : str or Path
        The output.
    kind : str
        ``attrs.pipeline.kind`` of the output (``dataset``, ``distances``, ``neighbors``,
        ``gmm``, ``gmm-predictions``).
    job : str, optional
        The job's fingerprint (:func:`job_fingerprint`, inputs by :func:`content_identity`).
        The same job's complete output is reported complete, its incomplete one is
        resumed (``resume=True``) or started again; ``None``: no job is ever the same.
    overwrite : bool
        Replace whatever is at ``url``.
    resume : bool
        Whether this writer can keep the finished blocks of an incomplete output.
    attrs : dict, optional
        More attributes for a new output.
    on_block : callable, optional
        Called with each block's index once it is written (and recorded, for a
        resumable output): progress, or a test slowing the run down.  Runs where the block is written: pass
        something a worker can unpickle.

    Attributes
    ----------
    status : {"new", "resume", "complete"}
    group : zarr.Group
        The output (read-only when complete).

    Examples
    --------
    >>> import numpy as np
    >>> with ResultWriter("memory://doc/result", "example", job="j1") as out:
    ...     a = out.array("a", shape=(4,), chunks=(2,), dtype=np.int64)
    ...     out.record_block(a, (0,), np.arange(2))
    ...     out.pending((2,))
    ...     out.complete()
    [(1,)]
    >>> with ResultWriter("memory://doc/result", "example", job="j1") as out:
    ...     out.status
    'complete'
    """

    def __init__(self, url, kind, job=None, *, overwrite=False, resume=False, attrs=None, on_block=None):
        self.url, self.kind, self.job = as_url(url), kind, job
        self.overwrite, self.resume, self.on_block = overwrite, resume, on_block
        self._attrs = dict(attrs or {})
        self.status, self.group, self._done = None, None, None

    def __enter__(self):
        acquire_lock(self.url)  # before anything is read or removed: another job's output is never touched
        try:
            self._open()
        except BaseException:
            release_lock(self.url)
            raise
        return self

    def __exit__(self, *exc):
        release_lock(self.url)
        return False

    def _open(self):
        import zarr

        meta = None if self.overwrite else existing(self.url)
        if meta is not None:
            same = self.job is not None and meta.get("kind") == self.kind and meta.get("job") == self.job
            if same and meta.get("complete"):
                self.group, self.status = zarr.open_group(store=self.url, mode="r"), "complete"
                return
            if same and self.resume:
                self.group, self.status = zarr.open_group(store=self.url, mode="r+"), "resume"
                return
            if not same:
                held = "and holds another result" if self.job is not None else ""
                raise InputError(
                    f"output {self.url!r} already exists{' ' + held if held else ''}; pass --overwrite "
                    "(overwrite=True) to replace it or choose another path"
                )
            # The same job's incomplete output, by a writer that cannot resume: start again.
        self.restart()

    def restart(self):
        """Drop whatever is at the output and start a new, incomplete one."""
        import zarr

        if exists(self.url):
            remove(self.url)
        self.group = zarr.open_group(store=self.url, mode="w", zarr_format=3)
        self.group.attrs["pipeline"] = {"format": FORMAT, "kind": self.kind, "job": self.job,
                                        **self._attrs, "complete": False, "created": utc_now()}
        self.status, self._done = "new", None

    @property
    def attrs(self) -> dict:
        """The output's ``pipeline`` attributes."""
        return dict(self.group.attrs.get("pipeline", {}))

    def array(self, name, shape, chunks, dtype, compressors=None):
        """The output array ``name``: kept from the run being resumed, else created."""
        if name in self.group:
            arr = self.group[name]
            if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
                raise DataError(f"array {name!r} of {self.url!r} has shape {arr.shape} {arr.dtype}, expected "
                                f"{tuple(shape)} {np.dtype(dtype)}; rerun with --overwrite")
            return arr
        # Every chunk is stored, even one equal to the fill value, so that readers can
        # tell a missing chunk (a damaged store) from an empty one.
        return self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                       compressors=compressors, config={"write_empty_chunks": True})

    def done(self, grid):
        """The per-block completion record ``_done``: int8, one chunk per block."""
        grid = tuple(int(n) for n in grid)
        if "_done" in self.group:
            done = self.group["_done"]
            if tuple(done.shape) != grid:
                raise DataError(f"the block record of {self.url!r} has shape {done.shape}, expected "
                                f"{grid}; rerun with --overwrite")
            return done
        return self.group.create_array("_done", shape=grid, chunks=(1,) * len(grid), dtype=np.int8,
                                       fill_value=0, compressors=None)

    def pending(self, grid):
        """Indices of the blocks of ``grid`` not yet recorded as written, in order."""
        self._done = self.done(grid)
        return [tuple(int(i) for i in idx) for idx in np.argwhere(self._done[...] == 0)]

    def record(self, idx):
        """Record block ``idx`` of the grid last asked for (:meth:`pending`) as written.

        Call it only after every chunk of the block is written: a rerun keeps exactly
        the recorded blocks.
        """
        self._done[idx] = 1
        if self.on_block is not None:
            self.on_block(idx)

    def record_block(self, target, idx, block):
        """Write one block (chunk ``idx`` of ``target``) from this process and record it."""
        if self._done is None:
            self._done = self.done(target.cdata_shape)
        target[_chunk_slices(target, idx)] = block
        self.record(idx)

    def write_blocks(self, arrays, label, *, record=True):
        """A lazy write of dask arrays into this output's arrays, block by block.

        Parameters
        ----------
        arrays : list of (dask array, zarr.Array)
            Same block grid, each dask chunk exactly one Zarr chunk (checked), so no
            two tasks ever write to one Zarr chunk (dask writes to misaligned chunks
            race and corrupt data, dask#12583).
        label : str
            Task keys read ``pipeline-<label>-<hash>``.
        record : bool
            Keep a done-record (resumable outputs); without it every block is written.

        Returns
        -------
        (dask array or None, n_written, n_kept)
            One task per block not yet recorded as done (None when every block is);
            blocks already written are not in the graph at all, so nothing upstream
            of them is computed again.
        """
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
                    raise ValueError(f"dask chunks {darr.chunks} are not aligned with Zarr chunks "
                                     f"{target.chunks} on axis {dim}")
        if record:
            todo = self.pending(grid)
            done = self._done
        else:
            todo = [tuple(int(i) for i in idx) for idx in np.ndindex(*grid)]
            done = None
        kept = math.prod(grid) - len(todo)
        if not todo:
            return None, 0, kept
        name = f"pipeline-{label}-" + tokenize([d.name for d in darrs], [t.path for t in targets],
                                               group_url(self.group) or self.url, todo)
        dsk = {(name, n): (_write_blocks_task, targets, done, self.on_block, idx)
               + tuple((d.name,) + idx for d in darrs)
               for n, idx in enumerate(todo)}
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=darrs)
        out = da.Array(graph, name, chunks=((1,) * len(todo),), dtype=np.int8, meta=np.empty((0,), np.int8))
        return out, len(todo), kept

    def complete(self, **attrs):
        """Mark the output complete (the last step of every writer), adding ``attrs``."""
        meta = self.attrs
        meta.update(attrs, complete=True, finished=utc_now())
        self.group.attrs["pipeline"] = meta
        self.status = "complete"
