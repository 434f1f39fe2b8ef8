"""Distance kernels on one pair of blocks: pure NumPy, no dask, no I/O.

The squared Euclidean distance is computed by the expansion
``||x - s||^2 + ||y - s||^2 - 2 (x - s).(y - s)`` with one GEMM per block pair.
Distances are translation invariant, so subtracting a shift ``s`` (the training-set
mean, computed once by the caller) changes nothing mathematically but removes the
catastrophic cancellation of the expansion on float32 data far from the origin: the
error of the expansion scales with ``||x||^2 + ||y||^2``, which centring makes as
small as the data's spread allows.  ``upcast=True`` computes in float64 instead
(scikit-learn's remedy), at twice the GEMM cost.
"""

from __future__ import annotations

import numpy as np

#: The metrics of every distance and neighbour function (kernels.topk.KEYS ranks them).
METRICS = ("euclidean", "sqeuclidean", "cosine", "ip", "manhattan")

__all__ = ["METRICS", "working_dtype", "as_block", "row_norms_sq", "sq_euclidean", "euclidean", "unit_rows", "cosine",
           "inner_product", "manhattan", "block_workspace"]


def working_dtype(dtype, upcast=False):
    """The float dtype a block of ``dtype`` is computed in.

    float64 stays float64; float32, float16 and every integer dtype compute in
    float32 (uint8 pixels are exact in float32, and the GEMM's rounding is what
    float32 data get too); ``upcast=True`` always gives float64.

    Examples
    --------
    >>> working_dtype(np.uint8), working_dtype(np.float32, upcast=True)
    (dtype('float32'), dtype('float64'))
    """
    dtype = np.dtype(dtype)
    if upcast or dtype == np.float64:
        return np.dtype(np.float64)
    if dtype.kind not in "fiub":
        raise TypeError(f"cannot compute distances on dtype {dtype}; expected a float or integer dtype")
    return np.dtype(np.float32)


def as_block(X, dtype=None, shift=None):
    """Return ``X - shift`` as a C-contiguous block of the working dtype.

    Copies only when needed: a C-contiguous block already of the working dtype and
    no shift is returned as is.  Integer blocks are converted here, one block at a
    time, never the whole dataset.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)
    dtype : dtype, optional
        Working dtype; default ``working_dtype(X.dtype)``.
    shift : ndarray of shape (n_features,), optional
        Subtracted from every row.

    Returns
    -------
    ndarray of shape (n_rows, n_features)

    Examples
    --------
    >>> as_block(np.array([[1, 2]], dtype=np.uint8), shift=np.array([1.0, 1.0]))
    array([[0., 1.]], dtype=float32)
    """
    X = np.asarray(X)
    dtype = working_dtype(X.dtype) if dtype is None else np.dtype(dtype)
    if shift is None:
        return np.ascontiguousarray(X, dtype=dtype)
    out = np.empty(X.shape, dtype=dtype)
    # One pass: the subtraction writes straight into the converted block.  For float32
    # data the shift is rounded to float32 first; the same rounded shift is used for
    # both sets, and distances are translation invariant, so the rounding costs nothing.
    np.subtract(X, np.asarray(shift).astype(dtype, copy=False), out=out, casting="unsafe")
    return out


def row_norms_sq(X):
    """Squared Euclidean norm of every row, accumulated in float64.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features)

    Returns
    -------
    ndarray of shape (n_rows,), float64

    Examples
    --------
    >>> row_norms_sq(np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32))
    array([25.,  1.])
    """
    X = np.asarray(X)
    if X.dtype.kind != "f":
        X = X.astype(np.float64)
    # einsum casts in small buffers: no float64 copy of the block is made.
    return np.einsum("ij,ij->i", X, X, dtype=np.float64)


def sq_euclidean(X, Y, X_norm_sq=None, Y_norm_sq=None, *, shift=None, upcast=False, out=None):
    """Squared Euclidean distances between the rows of two blocks, by one GEMM.

    Parameters
    ----------
    X : ndarray of shape (n_x, n_features)
    Y : ndarray of shape (n_y, n_features)
    X_norm_sq, Y_norm_sq : ndarray of shape (n_x,) / (n_y,), optional
        Squared row norms of ``X - shift`` / ``Y - shift`` if already known
        (:func:`row_norms_sq` of the shifted block); computed otherwise.
    shift : ndarray of shape (n_features,), optional
        Subtracted from both blocks before the GEMM (e.g. the training-set mean):
        keeps the expansion accurate for data far from the origin.
    upcast : bool, default False
        Compute in float64 even for float32 / integer blocks.
    out : ndarray of shape (n_x, n_y), optional
        C-contiguous output of the working dtype.

    Returns
    -------
    ndarray of shape (n_x, n_y)
        In the working dtype (float32 for float32 and integer data, float64 for
        float64 data or ``upcast``), clamped at 0.

    Examples
    --------
    >>> X = np.array([[0.0, 0.0], [3.0, 4.0]])
    >>> sq_euclidean(X, X)
    array([[ 0., 25.],
           [25.,  0.]])
    """
    X = np.asarray(X)
    Y = np.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"expected two 2-D blocks with the same number of columns, got {X.shape} and {Y.shape}")
    same = X is Y
    dtype = working_dtype(np.result_type(X.dtype, Y.dtype), upcast)
    Xw = as_block(X, dtype, shift)
    Yw = Xw if same and shift is None else as_block(Y, dtype, shift)
    xn = row_norms_sq(Xw) if X_norm_sq is None else np.asarray(X_norm_sq, dtype=np.float64)
    yn = xn if same and Y_norm_sq is None else (row_norms_sq(Yw) if Y_norm_sq is None else np.asarray(Y_norm_sq, dtype=np.float64))
    # One GEMM; Yw.T is a transposed view of a C-contiguous block, which BLAS reads
    # without a copy.  Then three in-place passes over the output, no temporaries.
    D = np.matmul(Xw, Yw.T, out=out)
    D *= -2
    D += xn.astype(dtype, copy=False)[:, None]
    D += yn.astype(dtype, copy=False)[None, :]
    np.maximum(D, 0, out=D)
    if same:
        # The distance of a row to itself is exactly 0 (the expansion leaves rounding).
        np.fill_diagonal(D, 0)
    return D


def euclidean(X, Y, X_norm_sq=None, Y_norm_sq=None, *, shift=None, upcast=False, out=None):
    """Euclidean distances between the rows of two blocks: sqrt of :func:`sq_euclidean`.

    Same parameters as :func:`sq_euclidean`.

    Examples
    --------
    >>> euclidean(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]]))
    array([[5.]])
    """
    D = sq_euclidean(X, Y, X_norm_sq, Y_norm_sq, shift=shift, upcast=upcast, out=out)
    return np.sqrt(D, out=D)


def unit_rows(X, dtype=None, *, inplace=False):
    """Rows of ``X`` divided by their norms (accumulated in float64); zero rows stay zero.

    In the working dtype (or ``dtype``); ``inplace=True`` scales ``X`` itself when it
    is already of that dtype and C-contiguous (a block the caller owns).

    Examples
    --------
    >>> unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    array([[0.6, 0.8],
           [0. , 0. ]])
    """
    X = np.asarray(X)
    out = as_block(X, working_dtype(X.dtype) if dtype is None else dtype)
    if out is X and not inplace:
        out = out.copy()
    norms = row_norms_sq(X)
    inv = np.zeros_like(norms)
    pos = norms > 0
    inv[pos] = 1 / np.sqrt(norms[pos])
    out *= inv.astype(out.dtype)[:, None]
    return out


def cosine(X, Y, *, upcast=False, unit=False, out=None):
    """Cosine distances ``1 - cos(x, y)`` between the rows of two blocks, by one GEMM.

    As scikit-learn's ``cosine_distances``: rows are normalised first (a zero row
    stays zero, so it is at distance 1 from every row) and the result is clipped to
    [0, 2].  In the working dtype (:func:`working_dtype`); ``unit=True``: the rows are
    already :func:`unit_rows`.

    Examples
    --------
    >>> cosine(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[2.0, 0.0], [0.0, 3.0]]))
    array([[0., 1.],
           [1., 1.]])
    """
    X, Y = np.asarray(X), np.asarray(Y)
    if not unit:
        dtype = working_dtype(np.result_type(X.dtype, Y.dtype), upcast)
        X, Y = unit_rows(X, dtype), unit_rows(Y, dtype)
    D = np.matmul(X, Y.T, out=out)
    np.subtract(1, D, out=D)
    return np.clip(D, 0, 2, out=D)


def inner_product(X, Y, *, upcast=False, out=None):
    """Inner products ``x . y`` between the rows of two blocks, by one GEMM (larger is nearer).

    Examples
    --------
    >>> inner_product(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]]))
    array([[11.]])
    """
    X, Y = np.asarray(X), np.asarray(Y)
    dtype = working_dtype(np.result_type(X.dtype, Y.dtype), upcast)
    return np.matmul(as_block(X, dtype), as_block(Y, dtype).T, out=out)


def manhattan(X, Y):
    """L1 distances between the rows of two blocks, float64.

    SciPy's compiled ``cdist(..., "cityblock")`` on float64 copies of the blocks:
    exact differences, no per-row Python loop (there is no GEMM form of L1).

    Examples
    --------
    >>> manhattan(np.array([[0.0, 0.0]]), np.array([[3.0, -4.0]]))
    array([[7.]])
    """
    from scipy.spatial.distance import cdist

    return cdist(np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64), "cityblock")


def block_workspace(x_rows, y_rows, n_features, itemsize, upcast=False):
    """Bytes one distance block needs beyond its inputs as read, as :class:`Workspace` rows.

    Both blocks centred in the working dtype (:func:`as_block`) and the GEMM's output
    block (:func:`sq_euclidean`, square-rooted in place for ``euclidean``); row norms
    are a few bytes a row.
    """
    from .buffers import Workspace

    w = 8 if upcast else max(itemsize, 4)  # working_dtype's itemsize (8-byte integers: counted as 8)
    conv = "converted, working dtype" if itemsize != w else "working dtype"
    return [Workspace("blocks centred", (x_rows + y_rows) * n_features * w, conv),
            Workspace("GEMM output", x_rows * y_rows * w, "one block of distances")]
