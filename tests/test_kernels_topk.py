"""Top-k kernels against np.argsort(kind="stable") and cdist; votes against scikit-learn."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.spatial.distance import cdist
from sklearn.datasets import load_iris
from sklearn.neighbors import KNeighborsClassifier

from pipeline.kernels.topk import (
    exact_sq_distances,
    exact_topk_block,
    exact_sq_pairs,
    knn_block,
    merge_knn,
    merge_topk,
    prepare_queries,
    rerank_exact,
    select_smallest,
    topk_block,
    uncertified,
    vote,
)


def _ref_topk(D, k):
    """Reference: stable argsort keeps equal distances in index order."""
    order = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, 1), order


@pytest.mark.parametrize("k", [1, 2, 5, 11, 12, 30])
def test_topk_block_matches_stable_argsort_with_ties(k):
    rng = np.random.default_rng(0)
    # Few distinct values: many ties straddle every cut.
    D = rng.integers(0, 4, (40, 12)).astype(np.float64)
    dist, idx = topk_block(D, k, offset=100)
    rd, ri = _ref_topk(D, k)
    np.testing.assert_array_equal(dist, rd)
    np.testing.assert_array_equal(idx, ri + 100)
    assert idx.dtype == np.int64


@settings(max_examples=40, deadline=None)
@given(
    n_cols=st.integers(1, 40),
    k=st.integers(1, 45),
    cuts=st.lists(st.integers(1, 39), max_size=5),
    seed=st.integers(0, 2**16),
    values=st.sampled_from([3, 1000]),
)
def test_blockwise_merge_equals_global_topk(n_cols, k, cuts, seed, values):
    rng = np.random.default_rng(seed)
    D = rng.integers(0, values, (7, n_cols)).astype(np.float32)
    edges = sorted({0, n_cols, *[c for c in cuts if c < n_cols]})
    parts = [topk_block(D[:, a:b], k, offset=a) for a, b in zip(edges[:-1], edges[1:])]
    # Merge in two different orders/tree shapes: the result must not depend on them.
    left = parts[0]
    for p in parts[1:]:
        left = merge_topk(left, p, k)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = merge_topk(p, right, k)
    rd, ri = _ref_topk(D, k)
    for dist, idx in (left, right):
        np.testing.assert_array_equal(dist, rd)
        np.testing.assert_array_equal(idx, ri)


def test_exact_sq_distances_and_rerank_match_cdist():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((21, 17)).astype(np.float32) + 1000
    Y = rng.standard_normal((30, 17)).astype(np.float32) + 1000
    ref = cdist(X.astype(np.float64), Y.astype(np.float64), "sqeuclidean")
    cand = rng.integers(0, 30, (21, 6))
    got = exact_sq_distances(X, Y, cand)
    # Differences of float32 values are exact in float64: only the final sum rounds.
    np.testing.assert_allclose(got, np.take_along_axis(ref, cand, 1), rtol=1e-13)
    cand = np.argsort(rng.random((21, 30)), axis=1)[:, :9]
    dist, idx = rerank_exact(X, Y, cand, k=4, offset=50)
    sub = np.take_along_axis(ref, cand, 1)
    order = np.lexsort((cand, sub), axis=-1)[:, :4]
    np.testing.assert_array_equal(idx, np.take_along_axis(cand, order, 1) + 50)
    np.testing.assert_allclose(dist, np.take_along_axis(sub, order, 1), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
@pytest.mark.parametrize("k", [1, 3, 10, 64])
def test_knn_blocks_give_exact_neighbours(dtype, k):
    rng = np.random.default_rng(2)
    if dtype == np.uint8:
        X = rng.integers(0, 256, (15, 20)).astype(dtype)
        Y = rng.integers(0, 256, (64, 20)).astype(dtype)
        Y[10] = Y[3]  # exact duplicates: ties broken to the lower index
    else:
        X = (rng.standard_normal((15, 20)) + 50).astype(dtype)
        Y = (rng.standard_normal((64, 20)) + 50).astype(dtype)
    shift = Y.astype(np.float64).mean(0)
    q = prepare_queries(X, shift)
    parts = [knn_block(q, Y[a:a + 9], k, offset=a, margin=2, shift=shift) for a in range(0, 64, 9)]
    res = parts[0]
    for p in parts[1:]:
        res = merge_knn(res, p, k)
    bad = uncertified(res)
    if bad.size:  # the slow exact path, as the graph builder runs it
        fix = exact_topk_block(X[bad], Y, k)
        res["dist"][bad], res["idx"][bad] = fix["dist"], fix["idx"]
    ref = cdist(X.astype(np.float64), Y.astype(np.float64), "sqeuclidean")
    rd, ri = _ref_topk(ref, k)
    np.testing.assert_array_equal(res["idx"], ri)
    np.testing.assert_allclose(res["dist"], rd, rtol=1e-12)


def _finish(parts, X, Y, k):
    """Merge partial results in the given order and fix the uncertified rows exactly."""
    res = parts[0]
    for p in parts[1:]:
        res = merge_knn(res, p, k)
    bad = uncertified(res)
    if bad.size:
        fix = exact_topk_block(X[bad], Y, k)
        res["dist"][bad], res["idx"][bad] = fix["dist"], fix["idx"]
    return res


@settings(max_examples=40, deadline=None)
@given(
    n_train=st.integers(1, 120),
    k=st.integers(1, 12),
    step=st.integers(1, 40),
    block=st.integers(1, 60),
    levels=st.sampled_from([2, 5, None]),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_steps_and_shared_bound_give_exact_neighbours(n_train, k, step, block, levels, shared, seed):
    """Steps of any width, tasks sharing a bound in any order: still the exact k nearest.

    Few distinct values (uint8 levels) put exact ties at every threshold, so a row
    dropped one comparison too eagerly (``<`` for ``<=``) changes the answer.
    """
    rng = np.random.default_rng(seed)
    k = min(k, n_train)
    if levels:
        X = rng.integers(0, levels, (9, 6)).astype(np.uint8)
        Y = rng.integers(0, levels, (n_train, 6)).astype(np.uint8)
    else:
        X = (rng.standard_normal((9, 6)) + 30).astype(np.float32)
        Y = (rng.standard_normal((n_train, 6)) + 30).astype(np.float32)
    shift = Y.astype(np.float64).mean(0)
    q = prepare_queries(X, shift)
    board = np.full(len(X), np.inf) if shared else None
    starts = list(range(0, n_train, block))
    rng.shuffle(starts)  # tasks run in any order
    parts = [knn_block(q, Y[a:a + block], k, offset=a, margin=1, shift=shift, step=step, board=board)
             for a in starts]
    res = _finish(parts, X, Y, k)
    rd, ri = _ref_topk(cdist(X.astype(np.float64), Y.astype(np.float64), "sqeuclidean"), k)
    np.testing.assert_array_equal(res["idx"], ri)
    np.testing.assert_array_equal(res["dist"], rd)
    if shared:  # the bound is a real k-th distance: never below the true one
        assert np.all(board >= rd[:, -1])


def test_later_steps_rerank_only_rows_that_can_enter_the_list(monkeypatch):
    """The point of the threshold: after the first step a row is re-ranked only if it
    can still beat the k-th exact distance, not k + margin rows every step."""
    import pipeline.kernels.topk as topk

    rng = np.random.default_rng(3)
    Y = rng.standard_normal((4000, 32)).astype(np.float32)
    X = rng.standard_normal((50, 32)).astype(np.float32)
    pairs = []
    real = topk.exact_sq_pairs
    monkeypatch.setattr(topk, "exact_sq_pairs", lambda X, Y, r, c, work=None: (pairs.append(r.size),
                                                                              real(X, Y, r, c, work))[1])
    q = prepare_queries(X)
    board = np.full(len(X), np.inf)
    part = knn_block(q, Y, 5, margin=3, step=200, board=board)
    assert len(pairs) == 20
    assert pairs[0] <= 50 * 8  # first step: at most k + margin a query
    # 19 later steps: k + margin each would be 19 * 400; a random row beats the 5th
    # best of the rows seen so far with probability ~5 / seen.
    assert sum(pairs[1:]) < 50 * 5 * 4
    rd, ri = _ref_topk(cdist(X.astype(np.float64), Y.astype(np.float64), "sqeuclidean"), 5)
    np.testing.assert_array_equal(part["idx"], ri)
    # Another task starting from the shared bound re-ranks little more than the 5
    # true neighbours of each query, far fewer than on its own.
    alone = sum(pairs)
    pairs.clear()
    knn_block(q, Y[::-1].copy(), 5, margin=3, step=200, board=board)
    assert 50 * 5 <= sum(pairs) < 50 * 6 < alone / 2


def test_exact_sq_pairs_matches_cdist_entrywise():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((6, 300)).astype(np.float32) + 1e4
    Y = rng.standard_normal((9, 300)).astype(np.float32) + 1e4
    rows = rng.integers(0, 6, 1000)
    cols = rng.integers(0, 9, 1000)
    ref = cdist(X.astype(np.float64), Y.astype(np.float64), "sqeuclidean")[rows, cols]
    np.testing.assert_allclose(exact_sq_pairs(X.astype(np.float64), Y, rows, cols), ref, rtol=1e-13)


def test_bound_certifies_clear_cases_and_flags_ties():
    X = np.zeros((2, 1))
    Y = np.array([[1.0], [2.0], [2.0], [5.0]])
    q = prepare_queries(X)
    part = knn_block(q, Y, 2, margin=0)
    # k=2 with margin 0: the dropped duplicate (index 2) ties with the kept 2.0.
    assert uncertified(part).tolist() == [0, 1]
    part = knn_block(q, Y, 1, margin=1)
    assert uncertified(part).size == 0


def _iris():
    X, y = load_iris(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    return X[order], y[order]


@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_vote_matches_sklearn(weights, k):
    X, y = _iris()
    labels = np.array(["b", "a", "c"])[y]  # classes not in order of appearance
    train, query = slice(0, 100), slice(60, 150)  # overlap: zero distances
    clf = KNeighborsClassifier(n_neighbors=k, weights=weights, algorithm="brute").fit(X[train], labels[train])
    dist, ind = clf.kneighbors(X[query])
    classes, enc = np.unique(labels[train], return_inverse=True)
    pred, proba = vote(enc[ind], dist, classes, weights)
    np.testing.assert_array_equal(pred, clf.predict(X[query]))
    np.testing.assert_allclose(proba, clf.predict_proba(X[query]), rtol=1e-12)


def test_vote_ties_go_to_lowest_class_and_zero_distance_rule():
    labels = np.array([[2, 1], [0, 2], [1, 1]])
    pred, proba = vote(labels, None, np.array([5, 6, 7]))
    assert pred.tolist() == [6, 5, 6]
    np.testing.assert_array_equal(proba[0], [0, 0.5, 0.5])
    dist = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 0.0]])
    pred, proba = vote(labels, dist, np.array([5, 6, 7]), "distance")
    assert pred.tolist() == [7, 7, 6]
    np.testing.assert_allclose(proba[0], [0, 0, 1])
    np.testing.assert_allclose(proba[1], [1 / 3, 0, 2 / 3])
    with pytest.raises(ValueError):
        vote(labels, dist, np.array([5, 6, 7]), "bogus")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), m=st.integers(1, 700), n=st.integers(1, 12),
       levels=st.sampled_from([2, 30, None]), seed=st.integers(0, 2**16))
def test_select_smallest_is_a_valid_selection(rows, m, n, levels, seed):
    rng = np.random.default_rng(seed)
    S = rng.random((rows, m), dtype=np.float32)
    if levels:
        S = np.floor(S * levels)  # ties at the cut
    cand, cut = select_smallest(S, n)
    n = min(n, m)
    ref = np.sort(S, axis=1)[:, :n]
    assert cand.shape == (rows, n)
    assert all(len(set(r)) == n for r in cand.tolist())  # distinct columns
    np.testing.assert_array_equal(np.sort(np.take_along_axis(S, cand, 1), axis=1), ref)
    np.testing.assert_array_equal(cut, ref[:, -1])
