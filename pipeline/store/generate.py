"""Synthetic datasets generated straight to Zarr, chunk by chunk: blobs and CIFAR-like images.

Each block draws from its own random stream (seeded by the seed and the block), so the
data depend only on the seed and the chunk rows, not on the schedule, and datasets
larger than memory are generated one block per thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .datasets import chunk_rows_for, dataset_attrs, open_dataset, write_group

__all__ = ["make_blobs", "make_cifar_like"]


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
               n_centers, seed, attrs, overwrite, compressor, work_itemsize=None, job=None):
    import dask.array as da

    # Blocks are generated in a float dtype (work_itemsize) and cast to `dtype`.
    row_bytes = n_features * max(np.dtype(dtype).itemsize, work_itemsize or 0)
    rows = chunk_rows_for(n_samples, row_bytes, chunk_rows, memory_budget)
    chunks0 = tuple(min(rows, n_samples - s) for s in range(0, n_samples, rows))
    X = da.map_blocks(make_X, chunks=(chunks0, (n_features,)), dtype=dtype,
                      token="pipeline-generate-X", meta=np.empty((0, 0), dtype))
    y = da.map_blocks(_label_block, n_centers, seed, chunks=(chunks0,), dtype=np.int64,
                      token="pipeline-generate-y", meta=np.empty((0,), np.int64))
    sample = X.blocks[0].compute()
    write_group(url, {"X": (X, sample), "y": (y, None)}, attrs, "generate", overwrite, compressor, job=job)
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
               compressor="auto", memory_budget=None, *, job=None):
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
    chunk_rows, overwrite, compressor, memory_budget, job
        As in :func:`pipeline.write_dataset`.

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

    attrs = dataset_attrs(_Shape(n_samples, n_features, dt), "make_blobs",
                           generator={"centers": int(centers), "random_state": seed,
                                      "cluster_std": cluster_std})
    return _generated(url, n_samples, n_features, dt, chunk_rows, memory_budget, make_X,
                      int(centers), seed, attrs, overwrite, compressor, job=job)


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
                    chunk_rows=None, overwrite=False, compressor="auto", memory_budget=None, *,
                    job=None):
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

    attrs = dataset_attrs(_Shape(n_samples, n_features, np.dtype(np.uint8)), "make_cifar_like",
                           generator={"n_classes": int(n_classes), "random_state": seed,
                                      "class_seed": int(class_seed), "class_contrast": class_contrast,
                                      "nuisance": nuisance, "noise": noise})
    return _generated(url, n_samples, n_features, np.uint8, chunk_rows, memory_budget, make_X,
                      int(n_classes), seed, attrs, overwrite, compressor, work_itemsize=4, job=job)


@dataclass(frozen=True)
class _Shape:
    n: int
    d: int
    dtype: np.dtype

    @property
    def shape(self):
        return (self.n, self.d)


