"""Reference k-NN under pipeline's documented tie rule, for the tests that compare
with a peer (scikit-learn) which may break exact ties another way.

The rule (:func:`pipeline.kneighbors`): equal distances are ordered by training index,
and among rows tied at the k-th distance the lower indices are returned; the vote is
scikit-learn's (class ties to the lowest class index; ``weights="distance"`` gives the
neighbours at distance 0 all the weight, equally).

A peer is compared with only on the rows where its rounding cannot change the answer:
the k-th and (k+1)-th exact distances differ by far more than rounding (``clear``).
There the k nearest rows are one set, whatever the tie rule.  The tied rows are
checked against :func:`exact_neighbors` and :func:`reference_vote`: on data whose
float64 distances are exact (integers) the rule alone decides them, on every machine.
"""

import numpy as np
from scipy.spatial.distance import cdist

#: A k-th / (k+1)-th gap at most this (relative) is a tie.  Ties in real arithmetic
#: show up as gaps of 0 or a few ulps (1e-16); a peer's GEMM expansion rounds squared
#: distances by ~1e-16 of the squared norms, so any larger gap is ranked alike by all.
TIE_RTOL = 1e-9


def exact_neighbors(X, Y, k):
    """The k nearest rows of ``Y`` for every row of ``X`` under the documented rule.

    Exact float64 squared distances (cdist: differences, no expansion), ranked by a
    stable argsort: equal distances in index order, the lower indices kept at the cut.
    Squared, as pipeline ranks them: two squared distances an ulp apart can have the
    same square root.

    Returns
    -------
    dist : ndarray (n_query, k), Euclidean, ascending
    ind : ndarray (n_query, k)
    clear : ndarray (n_query,), bool
        The k-th and (k+1)-th exact distances differ by more than ``TIE_RTOL``
        relative (always True when k is the whole training set).
    tied : ndarray (n_query, n_train), bool
        The training rows within ``TIE_RTOL`` of each query's k-th distance.
    """
    D2 = cdist(np.asarray(X, np.float64), np.asarray(Y, np.float64), "sqeuclidean")
    order = np.argsort(D2, axis=1, kind="stable")
    ind = order[:, :k]
    dist = np.sqrt(np.take_along_axis(D2, ind, 1))
    D = np.sqrt(D2)
    kth = dist[:, -1:]
    tied = np.abs(D - kth) <= TIE_RTOL * kth
    if k >= D2.shape[1]:
        return dist, ind, np.ones(D2.shape[0], dtype=bool), tied
    nxt = np.sqrt(np.take_along_axis(D2, order[:, k:k + 1], 1))
    return dist, ind, ((nxt - kth) > TIE_RTOL * nxt)[:, 0], tied


def reference_vote(neighbor_labels, dist, n_classes, weights):
    """scikit-learn's vote, written out: (predicted class index, probabilities).

    uniform: class counts / k.  distance: weights 1 / d, except that a row with any
    neighbour at distance 0 gives those neighbours weight 1 and the others 0.  The
    prediction is the largest vote, ties to the lowest class index.
    """
    labels = np.asarray(neighbor_labels)
    n = labels.shape[0]
    if weights == "uniform":
        w = np.ones(labels.shape)
    elif weights == "distance":
        dist = np.asarray(dist, np.float64)
        zero = dist == 0
        with np.errstate(divide="ignore"):
            w = np.where(zero.any(axis=1, keepdims=True), zero.astype(np.float64), 1.0 / dist)
    else:
        raise ValueError(weights)
    score = np.zeros((n, n_classes))
    np.add.at(score, (np.repeat(np.arange(n), labels.shape[1]), labels.ravel()), w.ravel())
    pred = np.argmax(score, axis=1)  # the first maximum: the lowest class index
    return pred, score / score.sum(axis=1, keepdims=True)


def reference_predict(Xtr, ytr, Xte, k, weights="uniform"):
    """The documented rule's classifier.

    Returns
    -------
    pred : ndarray (n_query,), labels
    proba : ndarray (n_query, n_classes), columns in ``np.unique(ytr)`` order
    clear : ndarray (n_query,), bool
        No tie at the k-th distance: any peer must agree here.
    settled : ndarray (n_query,), bool
        The vote does not depend on how a tie is broken: clear, or every row tied at
        the k-th distance has the same label.
    """
    classes, enc = np.unique(np.asarray(ytr), return_inverse=True)
    dist, ind, clear, tied = exact_neighbors(Xte, Xtr, k)
    pred, proba = reference_vote(enc[ind], dist, len(classes), weights)
    one_label = np.array([np.unique(enc[row]).size == 1 for row in tied])
    return classes[pred], proba, clear, clear | one_label
