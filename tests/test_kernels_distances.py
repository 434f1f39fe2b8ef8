"""Distance kernels against scipy's cdist (float64, computed directly from differences)."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from pipeline.kernels.distances import (
    as_block,
    euclidean,
    row_norms_sq,
    sq_euclidean,
    working_dtype,
)


def _data(n, m, d, dtype, loc=0.0, seed=0):
    rng = np.random.default_rng(seed)
    X = (loc + rng.standard_normal((n, d))).astype(dtype)
    Y = (loc + rng.standard_normal((m, d))).astype(dtype)
    return X, Y


def _ref(X, Y, metric="sqeuclidean"):
    return cdist(X.astype(np.float64), Y.astype(np.float64), metric)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 3), (50, 40, 64), (33, 17, 300)])
def test_sq_euclidean_matches_cdist(dtype, shape):
    n, m, d = shape
    X, Y = _data(n, m, d, dtype)
    D = sq_euclidean(X, Y)
    assert D.dtype == dtype and D.shape == (n, m)
    # The expansion loses about eps * (||x||^2 + ||y||^2) absolutely; standard normal
    # data has norms ~ d and distances ~ 2d, so a few hundred eps relative suffices.
    rtol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(D, _ref(X, Y), rtol=rtol, atol=rtol * d)


def test_euclidean_is_sqrt():
    X, Y = _data(20, 30, 10, np.float64, seed=1)
    np.testing.assert_allclose(euclidean(X, Y), _ref(X, Y, "euclidean"), rtol=1e-12)


@pytest.mark.parametrize("loc", [1e3, 1e4])
def test_far_from_origin_float32_is_accurate_with_shift(loc):
    # Data far from the origin: ||x||^2 ~ d loc^2 dwarfs the distances (~2d), so the
    # plain float32 expansion cancels catastrophically.  Centring both sets on the
    # training mean restores accuracy to the 1e-4 relative requirement.
    X, Y = _data(40, 60, 256, np.float32, loc=loc, seed=2)
    ref = _ref(X, Y)
    shift = Y.astype(np.float64).mean(axis=0)
    D = sq_euclidean(X, Y, shift=shift)
    assert D.dtype == np.float32
    assert np.max(np.abs(D - ref) / ref) <= 1e-4
    # Without the shift the same data is far off: this is the bug the shift removes.
    plain = sq_euclidean(X, Y)
    assert np.max(np.abs(plain - ref) / ref) > 1e-3
    # Upcasting is the other remedy (float64 result).
    up = sq_euclidean(X, Y, upcast=True)
    assert up.dtype == np.float64
    assert np.max(np.abs(up - ref) / ref) <= 1e-4


def test_integer_blocks_compute_in_float32_exactly():
    rng = np.random.default_rng(3)
    X = rng.integers(0, 256, (9, 48), dtype=np.uint8)
    Y = rng.integers(0, 256, (11, 48), dtype=np.uint8)
    D = sq_euclidean(X, Y)
    assert D.dtype == np.float32
    # uint8 products and their sums stay below 2**24: float32 is exact here.
    np.testing.assert_array_equal(D, _ref(X, Y))
    # The kernel does not wrap around as uint8 arithmetic would.
    assert as_block(X).dtype == np.float32


def test_same_block_has_zero_diagonal_and_is_symmetric():
    X, _ = _data(25, 1, 8, np.float32, loc=5.0, seed=4)
    D = sq_euclidean(X, X)
    np.testing.assert_array_equal(np.diag(D), 0)
    np.testing.assert_allclose(D, D.T, rtol=1e-5)
    assert (D >= 0).all()


def test_precomputed_norms_and_out():
    X, Y = _data(6, 5, 4, np.float64, seed=5)
    out = np.empty((6, 5))
    D = sq_euclidean(X, Y, row_norms_sq(X), row_norms_sq(Y), out=out)
    assert D is out
    np.testing.assert_allclose(D, _ref(X, Y), rtol=1e-12, atol=1e-12)


def test_row_norms_sq_float64():
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    n = row_norms_sq(X)
    assert n.dtype == np.float64
    np.testing.assert_array_equal(n, (X.astype(np.float64) ** 2).sum(1))
    np.testing.assert_array_equal(row_norms_sq(X.astype(np.int16)), n)


def test_working_dtype_and_errors():
    assert working_dtype(np.float16) == np.float32
    assert working_dtype(np.int64) == np.float32
    assert working_dtype(np.float32, upcast=True) == np.float64
    with pytest.raises(TypeError):
        working_dtype(np.complex128)
    with pytest.raises(ValueError):
        sq_euclidean(np.ones((2, 3)), np.ones((2, 4)))
