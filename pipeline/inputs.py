"""The one input layer: any accepted X / Y / y turned into what the graph builders use.

Every X or Y accepts a NumPy array (or anything ``np.asarray`` takes), a dask array, a
Zarr array, a :class:`~pipeline.store.Dataset` or a dataset URL / path; :func:`as_rows`
makes it a :class:`RowSource` with one set of checks and messages; labels go through
:func:`as_labels` (a classifier's through :func:`as_classes`), regression targets
through :func:`as_targets`.  A row source hands tasks their rows without dask.array
(whose import, with the scipy modules it loads, costs about half a second): a Zarr
array is read inside the tasks that use it, an in-memory array is one graph key that
tasks slice, a dask array gives its blocks.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from .errors import DataConversionWarning, InputError, InputTypeError, sklearn_flavoured
from .store.datasets import Dataset, open_dataset
from .store.reads import check_safe, read_block, take_rows
from .store.results import content_identity

__all__ = ["RowSource", "as_rows", "as_labels", "as_classes", "as_targets", "rows_of", "check_same_features",
           "check_metric", "check_finite_rows"]

_CHECK_BYTES = 16 * 2**20  # rows scanned at a time by RowSource.check_finite


class RowSource:
    """Rows ``lo .. hi - 1`` of one input set, as the graph hands them to tasks.

    Parameters
    ----------
    data : zarr.Array, dask array or array-like
        Opened already (see :func:`as_rows` for URLs and Datasets).
    name : str
        The set's name in error messages ("X", "QUERY" ...).
    lo, hi : int, optional
        A range of its rows (default all).

    Attributes
    ----------
    kind : {"zarr", "numpy", "dask"}
        Where the rows are: a Zarr array read inside the tasks that use them (no block
        is held between tasks), an in-memory array (one graph key that tasks slice) or
        a dask array (rechunked to the plan's blocks).
    shape : (int, int)
    dtype : numpy.dtype
    chunk_rows : int or None
        Rows per stored chunk (Zarr inputs).
    dataset : Dataset or None
        The dataset the rows come from (its labels, its identity).
    """

    def __init__(self, data, name="X", lo=0, hi=None, *, dataset=None):
        import dask
        import zarr

        if isinstance(data, RowSource):
            dataset = data.dataset
            data, lo, hi = data.data, data.lo + lo, data.lo + (data.shape[0] if hi is None else hi)
        if isinstance(data, Dataset):
            dataset, data = data, data.X_zarr
        if isinstance(data, zarr.Array):
            check_safe(data, name)
            self.kind = "zarr"
        elif dask.is_dask_collection(data):
            self.kind = "dask"
        else:
            if type(data).__module__.startswith("scipy.sparse"):
                # scikit-learn's wording, so that its checks and users recognise it.
                raise InputError(f"{name} is a sparse matrix: sparse input is not supported, dense data is "
                                 "required; use X.toarray() if it fits in memory")
            try:
                data = np.asarray(data)
                if data.dtype == object:  # numbers held as objects (lists of Python numbers, pandas)
                    data = data.astype(np.float64)
            except TypeError as e:  # values no number is made of (a dict, None): NumPy's TypeError, kept
                raise InputTypeError(f"{name} cannot be read as an array of numbers: {e}; convert or encode "
                                     "its non-numeric values first") from None
            except Exception as e:  # noqa: BLE001 - anything unconvertible is bad input
                raise InputError(f"{name} cannot be read as an array of numbers: {e}") from None
            self.kind = "numpy"
        if data.ndim != 2:
            hint = (" Reshape your data either using array.reshape(-1, 1) if it has a single feature or "
                    "array.reshape(1, -1) if it contains a single sample.") if data.ndim == 1 else ""
            raise InputError(f"{name} must be 2-D (n_samples, n_features), got shape {data.shape}.{hint}")
        if any(math.isnan(n) for n in data.shape):
            raise InputError(f"{name} has unknown chunk sizes (shape {data.shape}); call "
                             "compute_chunk_sizes() on the dask array first")
        if np.issubdtype(data.dtype, np.complexfloating):
            raise InputError(f"{name} has dtype {data.dtype}: Complex data not supported; pass real numbers")
        if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
            raise InputError(f"{name} must be numeric, got dtype {data.dtype}")
        hi = data.shape[0] if hi is None else hi
        if hi - lo == 0 or data.shape[1] == 0:
            shape = (hi - lo, data.shape[1])
            what = (f"0 feature(s) (shape={shape}) while a minimum of 1 is required" if data.shape[1] == 0
                    else f"0 sample(s) (shape={shape}) while a minimum of 1 is required")
            raise InputError(f"{name} is empty: {what}; it needs at least one row and one feature")
        self.data, self.name, self.lo, self.hi, self.dataset = data, name, int(lo), int(hi), dataset
        self.shape = (self.hi - self.lo, int(data.shape[1]))
        self.dtype = np.dtype(data.dtype)
        self.chunk_rows = int(data.chunks[0]) if self.kind == "zarr" else None

    def __repr__(self):
        return f"RowSource({self.name}, {self.kind}, rows {self.lo}..{self.hi - 1} of {self.data.shape})"

    @property
    def zarr(self):
        """The Zarr array the rows are read from, or None."""
        return self.data if self.kind == "zarr" else None

    @property
    def compressed(self) -> bool:
        """Whether the stored chunks are compressed (a partial read decodes a whole chunk)."""
        return bool(self.kind == "zarr" and self.data.compressors)

    def rows(self, lo, hi, name=None):
        """Rows ``lo .. hi - 1`` of this set (relative), as a row source of their own."""
        return RowSource(self, name or self.name, lo, hi)

    def identity(self) -> str:
        """What these rows are, by content (:func:`pipeline.store.content_identity`).

        A slice of rows is named by its input and its range; the whole input by the
        input alone.
        """
        whole = content_identity(self.dataset if self.dataset is not None else self.data)
        return whole if self.is_whole() else f"{whole}[{self.lo}:{self.hi}]"

    def is_whole(self) -> bool:
        """True when these are all the rows of the input."""
        return self.lo == 0 and self.hi == int(self.data.shape[0])

    def check_finite(self):
        """Raise :class:`InputError` naming the rows with NaN or inf, for in-memory rows only.

        An in-memory array is scanned in slices of ~16 MiB (a bool temporary of a
        slice, not of the array).  A Zarr or dask input is not read: that would be a
        pass over data that may not fit in memory, and the tasks that use its rows
        check them (the k-NN kernels, per block).
        """
        if self.kind != "numpy" or not np.issubdtype(self.dtype, np.floating):
            return
        step = max(1, _CHECK_BYTES // max(1, self.shape[1] * self.dtype.itemsize))
        bad = [_non_finite_rows(self.data[a:min(a + step, self.hi)], a - self.lo) for a in range(self.lo, self.hi, step)]
        _raise_non_finite(np.concatenate(bad), self.name)

    def take(self, idx):
        """Rows ``idx`` (relative) as a NumPy array: a few rows, read with the checks of any read."""
        idx = np.asarray(idx, dtype=np.int64) + self.lo
        if self.kind == "zarr":
            return take_rows(self.data, idx)
        rows = self.data[idx]
        return rows.compute() if self.kind == "dask" else np.asarray(rows)

    def pieces(self, blocks, key, dsk):
        """Per block ``(a, b)`` (relative rows), the task arguments ``(value, a', b')``.

        A task gets its rows with :func:`rows_of`: ``value[a':b']`` of an in-memory
        block, or read from the Zarr array ``value``, held by the graph key ``key``
        (its metadata and path, never its data) or an in-memory array held by it.
        Adds that key to ``dsk``; returns the list and the dask collections the graph
        depends on.
        """
        if self.kind == "dask":
            sizes = tuple(b - a for a, b in blocks)
            arr = self.data[self.lo:self.hi]
            if arr.chunks[1:] != tuple((n,) for n in arr.shape[1:]):
                arr = arr.rechunk({1: arr.shape[1]})
            arr = arr.rechunk({0: sizes})
            keys = [key for row in arr.__dask_keys__() for key in row]
            return [(key, 0, b - a) for key, (a, b) in zip(keys, blocks)], [arr]
        dsk[key] = self.data
        return [(key, self.lo + a, self.lo + b) for a, b in blocks], []

    def dask(self, rows=None):
        """The rows as a dask array chunked by rows only.

        ``rows``: rows per chunk (a tuple: of each chunk); default the stored chunks
        (one block for in-memory data).  Zarr-backed data are read straight into
        chunks of this size (no rechunk layer, so reading fuses into the task that
        uses the block).
        """
        import dask.array as da

        n, d = self.shape
        if self.kind == "zarr":
            step = rows or self.chunk_rows
            if not isinstance(step, tuple):
                step = min(step, max(self.data.shape[0], 1))
            arr = da.from_zarr(self.data, chunks=(step, d))
            return arr if (self.lo, self.hi) == (0, self.data.shape[0]) else arr[self.lo:self.hi]
        if self.kind == "numpy":
            return da.from_array(self.data[self.lo:self.hi], chunks=(rows or max(1, n), d))
        arr = self.data[self.lo:self.hi] if (self.lo, self.hi) != (0, self.data.shape[0]) else self.data
        if len(arr.chunks[1]) != 1:
            arr = arr.rechunk({1: d})
        if rows is not None and arr.chunks[0][0] != rows:
            arr = arr.rechunk({0: rows})
        return arr


def rows_of(value, a, b, work=None):
    """Task side of :meth:`RowSource.pieces`: rows ``a .. b - 1`` of a block value or Zarr array.

    Zarr rows are read into ``work``'s reused buffer when given (the caller must not
    return it).
    """
    if isinstance(value, np.ndarray):
        return value[a:b]
    return read_block(value, a, b, work)


def as_rows(X, name="X"):
    """Any accepted input as a :class:`RowSource` (a URL or path opens its dataset once).

    Raises
    ------
    InputError
        If ``X`` cannot be opened, is not 2-D numeric, is empty, or is a dask array of
        unknown chunk sizes.  The message names ``name``.
    """
    if isinstance(X, RowSource):
        return X if X.name == name else RowSource(X, name)
    if isinstance(X, (str, Path)):
        X = open_dataset(X)
    return RowSource(X, name)


def check_same_features(X, Y):
    """Refuse two row sources whose numbers of columns differ, naming both."""
    if X.shape[1] != Y.shape[1]:
        raise InputError(f"{X.name} has {X.shape[1]} features but {Y.name} has {Y.shape[1]}; both sets need "
                         "the same number of columns")


def _row_list(rows, most=10):
    """Row indices for a message: the first ``most``, then how many more."""
    shown = ", ".join(str(int(r)) for r in rows[:most])
    return shown + (f" and {rows.size - most} more" if rows.size > most else "")


def _check_finite_values(values, name, what):
    """Refuse NaN and infinite values of a y, in scikit-learn's words ("Input y contains NaN")."""
    finite = np.isfinite(values)
    if finite.all():
        return
    rows = np.flatnonzero(~finite.reshape(finite.shape[0], -1).all(axis=1))
    kind = "NaN" if np.isnan(values).any() else f"infinity or a value too large for dtype({values.dtype.name!r})"
    raise InputError(f"Input {name} contains {kind}, in row(s) {_row_list(rows)}; remove or impute those {what}")


def as_labels(y, n, name="y"):
    """Labels as a 1-D NumPy array of length ``n`` (8 bytes a row: held in memory).

    ``y`` is an array-like, a dask array, a Dataset or URL (its ``y``), or a RowSource
    of a dataset.
    """
    y = _in_memory(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise InputError(f"{name} has shape {y.shape}; expected ({n},), one label per row of X")
    return y


def _in_memory(y):
    """Any accepted y as a NumPy array, as it is (a dataset's labels read whole)."""
    import dask

    if isinstance(y, RowSource):
        y = y.dataset
    if isinstance(y, (str, Path)):
        y = open_dataset(y)
    if isinstance(y, Dataset):
        if y.y_zarr is None:
            raise InputError(f"dataset {y.url!r} has no labels 'y'")
        y = y.y_zarr[...]
    if dask.is_dask_collection(y):
        y = y.compute()
    return np.asarray(y)


def as_classes(y, n, name="y"):
    """A classifier's labels: the sorted classes and each row's index into them.

    ``y`` as :func:`as_labels`; a column vector (n, 1) is raveled with a
    ``DataConversionWarning`` (scikit-learn's class when it is imported).  Labels may
    be strings or numbers; floats must be whole and finite (float class codes such
    as 0.0, 1.0 are fine).

    Returns
    -------
    classes : ndarray of shape (n_classes,)
    codes : ndarray of shape (n,), int64

    Raises
    ------
    InputError
        A ``y`` of another shape, NaN or infinite labels, continuous values ("Unknown
        label type: continuous"), or an object array mixing strings and other values.
    """
    y = _in_memory(y)
    if y.ndim == 2 and y.shape[1] == 1:
        # scikit-learn's wording and class: its users and checks recognise both.
        warnings.warn("A column-vector y was passed when a 1d array was expected. Please change the shape of y "
                      "to (n_samples, ), for example using ravel().",
                      sklearn_flavoured(DataConversionWarning, "DataConversionWarning"), stacklevel=3)
        y = y.ravel()
    y = as_labels(y, n, name)
    values = y
    if y.dtype == object:
        strings = sum(isinstance(v, str) for v in y)
        if strings == 0:  # Python numbers held as objects: checked as numbers below
            try:
                values = y.astype(np.float64)
            except (TypeError, ValueError):
                values = None
        if values is None or 0 < strings < y.size:
            raise InputError(f"Unknown label type: {name} mixes strings with other values, or holds values that "
                             "are neither; pass labels that are all strings or all numbers")
    if values.dtype.kind == "c":
        raise InputError(f"Unknown label type: {name} has complex values; pass strings or whole numbers as labels")
    if values.dtype.kind == "f":
        _check_finite_values(values, name, "labels")
        if not np.array_equal(values, np.round(values)):
            raise InputError(f"Unknown label type: continuous; {name} holds non-integer numbers, but a classifier "
                             "needs discrete class labels: use KNeighborsRegressor for continuous targets, or bin "
                             "them into classes")
    classes, codes = np.unique(y, return_inverse=True)
    return classes, codes.astype(np.int64, copy=False)


def as_targets(y, n, name="y"):
    """Regression targets as a float64 array of shape (n,) or (n, n_outputs), held in memory.

    ``y`` is an array-like or a dask array; its values must be finite numbers.
    """
    import dask

    if dask.is_dask_collection(y):
        y = y.compute()
    try:
        y = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name} must hold numbers (regression targets)") from None
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise InputError(f"{name} has shape {y.shape}; expected ({n},) or ({n}, n_outputs), one row per row of X")
    _check_finite_values(y, name, "targets")
    return y


def check_metric(metric):
    """Raise :class:`InputError` unless ``metric`` is one of :data:`pipeline.kernels.distances.METRICS`."""
    from .kernels.distances import METRICS

    if metric not in METRICS:
        raise InputError(f"metric={metric!r} is not supported; use one of {', '.join(METRICS)}")


def _non_finite_rows(block, offset=0):
    """Indices (plus ``offset``) of the rows of ``block`` holding NaN or inf."""
    if not np.issubdtype(block.dtype, np.floating) or np.isfinite(block).all():
        return np.empty(0, np.int64)
    return np.flatnonzero(~np.isfinite(block).all(axis=1)) + int(offset)


def _raise_non_finite(rows, name):
    if rows.size:
        raise InputError(f"{name} has NaN or infinite values in row(s) {_row_list(rows)}; remove or impute those rows")


def check_finite_rows(block, offset=0, name="X"):
    """Raise :class:`InputError` naming the rows of ``block`` (numbered from ``offset``) with NaN or inf.

    For the tasks that read an input's rows (a block at a time), in the words of
    :meth:`RowSource.check_finite`.
    """
    _raise_non_finite(_non_finite_rows(np.asarray(block), offset), name)
