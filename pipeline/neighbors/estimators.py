"""The neighbours estimators: :class:`NearestNeighbors`, :class:`KNeighborsClassifier`, :class:`KNeighborsRegressor`.

scikit-learn's API over the out-of-core passes of :mod:`pipeline.neighbors.search`:
``fit`` keeps a reference to the training set (no pass over it); every query streams
it.  ``predict``, ``predict_proba``, ``score`` and ``kneighbors`` on the same input share
one k-NN pass (:class:`_LastPass`).
"""

from __future__ import annotations

import threading

import numpy as np

from ..errors import InputError, NotFittedError, sklearn_flavoured
from ..estimator import BaseEstimator
from ..inputs import as_classes, as_labels, as_rows, as_targets, check_metric
from ..kernels import topk as _topk
from ..sizes import parse_budget
from .search import check_k, check_mode, check_radius, kneighbors, radius_csr, ragged

__all__ = ["NearestNeighbors", "KNeighborsClassifier", "KNeighborsRegressor"]

_WEIGHTS = ("uniform", "distance")


def _is_whole(value):
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


class _LastPass:
    """The neighbours of the last query set a fitted estimator answered, by the input's identity.

    A cache, not the model: it changes no result (a k-NN pass is deterministic), is
    emptied by ``fit`` (a new holder) and is not pickled.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._key = self._value = None

    def get(self, key):
        with self._lock:
            return self._value if self._key == key else None

    def put(self, key, value):
        with self._lock:
            self._key, self._value = key, value

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class _Neighbors(BaseEstimator):
    """What every neighbours estimator shares: the training set by reference, k-NN queries and graphs.

    ``fit`` keeps a reference to the training set (an array, a dask or Zarr array,
    a Dataset or a URL): no pass over it.  Every query streams it out of core.
    """

    def _validate_params(self):
        check_metric(self.metric)
        if not _is_whole(self.n_neighbors) or self.n_neighbors < 1:
            raise InputError(f"n_neighbors={self.n_neighbors!r} must be a whole number >= 1")
        weights = getattr(self, "weights", "uniform")
        if weights not in _WEIGHTS:
            raise InputError(f"weights={weights!r}; choose 'uniform' or 'distance'")
        if weights == "distance" and self.metric == "ip":
            raise InputError("weights='distance' needs a distance, and metric='ip' ranks by inner products "
                             "(larger is nearer); use weights='uniform' or metric='cosine'")

    def _fit_set(self, X):
        """Validate and remember the training set; returns it as a row source.

        In-memory rows are checked for NaN and inf here (one cheap scan); a store or
        dask array is not read by fit, its rows are checked by the query tasks.
        """
        self._validate_params()
        source = as_rows(X, "X")
        source.check_finite()
        # A URL is opened once; a slice of rows stays a slice.
        self._fit_X = source.dataset if source.dataset is not None and source.is_whole() else X
        self.n_samples_fit_ = int(source.shape[0])
        self.n_features_in_ = int(source.shape[1])
        self.effective_metric_ = self.metric
        self._last_pass = _LastPass()
        return source

    def _check_fitted(self):
        if not hasattr(self, "n_samples_fit_"):
            raise sklearn_flavoured(NotFittedError, "NotFittedError")(
                f"This {type(self).__name__} instance is not fitted yet; call fit first")

    def _query_set(self, X):
        """Queries as given, checked against the fitted features (``X=None``: not allowed here)."""
        source = as_rows(X, "X")
        if source.shape[1] != self.n_features_in_:
            raise InputError(f"X has {source.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input (as in fit)")
        return source

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Exact ``n_neighbors`` nearest training rows of each row of ``X`` (see :func:`kneighbors`).

        Parameters
        ----------
        X : array-like of shape (n_query, n_features), Dataset or URL, optional
            Default: the training set itself, each row not counted as its own
            neighbour (scikit-learn's rule: the row's own index is dropped, or, where a
            duplicate pushed it out of the list, the first neighbour).
        n_neighbors : int, optional
            Default ``self.n_neighbors``.
        return_distance : bool, default True

        Returns
        -------
        dist : ndarray of shape (n_query, n_neighbors), float64
            Only if ``return_distance``.
        ind : ndarray of shape (n_query, n_neighbors), int64
        """
        self._check_fitted()
        self._validate_params()
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if not _is_whole(k) or k < 1:
            raise InputError(f"n_neighbors={k!r} must be a whole number >= 1")
        if X is None:
            if k >= self.n_samples_fit_:
                raise InputError(f"n_neighbors={k} is out of range for the training set itself: each of its rows "
                                 f"has {self.n_samples_fit_ - 1} other rows")
            dist, ind = self._neighbors(self._fit_X, int(k) + 1)
            dist, ind = _drop_self(dist, ind, ip=self.metric == "ip")
        else:
            dist, ind = self._neighbors(self._query_set(X), int(k))
        return (dist, ind) if return_distance else ind

    def _neighbors(self, X, k):
        """``(dist, ind)`` of ``X``: one k-NN pass, or the last one's if ``X`` is the same input.

        ``predict``, ``predict_proba`` and ``score`` on the same queries then share one
        pass: inputs are compared by content (:meth:`RowSource.identity`: a hash of an
        in-memory array's bytes, a store's files); a dask array is never the same.
        """
        cache = self._last_pass  # one holder for this call, whatever a concurrent fit does
        source = X if hasattr(X, "identity") else as_rows(X, "X")
        ident = (source.identity(), k, self.metric, self.memory_budget)
        out = cache.get(ident)
        if out is not None:
            return out[0].copy(), out[1].copy()  # the caller may change its arrays
        dist, ind = kneighbors(source, self._fit_X, k, memory_budget=self.memory_budget, metric=self.metric)
        # Kept only while small beside the budget: a long query set's lists are not held on.
        if 2 * dist.nbytes <= parse_budget(self.memory_budget) // 8:
            cache.put(ident, (dist.copy(), ind.copy()))
        return dist, ind

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity"):
        """The k-NN graph as a ``scipy.sparse.csr_matrix`` of shape (n_query, n_samples_fit).

        Parameters
        ----------
        X, n_neighbors
            As :meth:`kneighbors`.
        mode : {"connectivity", "distance"}, default "connectivity"
            Entries 1, or the neighbours' distances.

        Notes
        -----
        For more queries than fit in memory, ``pipeline knn --graph`` writes the same
        matrix to a result store, piece by piece (:func:`load_graph` reads it).
        """
        import scipy.sparse as sp

        check_mode(mode)
        dist, ind = self.kneighbors(X, n_neighbors)
        n, k = ind.shape
        data = np.ones(n * k) if mode == "connectivity" else dist.ravel()
        return sp.csr_matrix((data, ind.ravel(), np.arange(0, n * k + 1, k)), shape=(n, self.n_samples_fit_))




def _drop_self(dist, ind, ip=False):
    """scikit-learn's rule for queries that are the training set: drop each row's own index.

    Where the row is not in its list (duplicates of it ranked first), the first
    neighbour is dropped instead.
    """
    n = ind.shape[0]
    mask = ind != np.arange(n)[:, None]
    # Under "ip" a row need not be its own nearest: when absent it is beyond the list,
    # so the list's last entry goes (a distance metric drops the first, a duplicate).
    mask[np.all(mask, axis=1), -1 if ip else 0] = False
    k = ind.shape[1] - 1
    return dist[mask].reshape(n, k), ind[mask].reshape(n, k)


class NearestNeighbors(_Neighbors):
    """Exact unsupervised neighbours, out of core, with scikit-learn's API.

    Parameters
    ----------
    n_neighbors : int, default 5
        For :meth:`kneighbors` and :meth:`kneighbors_graph`.
    radius : float, default 1.0
        For :meth:`radius_neighbors` and :meth:`radius_neighbors_graph`.
    metric : {"euclidean", "sqeuclidean", "cosine", "ip", "manhattan"}, default "euclidean"
        See :func:`kneighbors`.
    memory_budget : int or str, optional

    Attributes
    ----------
    n_samples_fit_ : int
    n_features_in_ : int
    effective_metric_ : str

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> nn = pl.NearestNeighbors(n_neighbors=1).fit(np.array([[0.0], [1.0], [5.0]]))
    >>> nn.kneighbors(np.array([[4.0]]))[1].tolist()
    [[2]]
    >>> nn.kneighbors_graph().toarray().tolist()
    [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """

    def __init__(self, n_neighbors=5, radius=1.0, metric="euclidean", memory_budget=None):
        self.n_neighbors = n_neighbors
        self.radius = radius
        self.metric = metric
        self.memory_budget = memory_budget

    def fit(self, X, y=None):
        """Remember the training set (no pass over the data); ``y`` is ignored.

        Returns
        -------
        self
        """
        self._fit_set(X)
        return self

    def radius_neighbors(self, X=None, radius=None, return_distance=True, sort_results=False):
        """Every training row within ``radius`` of each row of ``X`` (see :func:`radius_neighbors`).

        ``X=None``: the training set, each row not its own neighbour.  ``radius``
        defaults to ``self.radius``.  Rows are always sorted, nearest first.

        Returns
        -------
        dist : ndarray of shape (n_query,), dtype object
            Only if ``return_distance``.
        ind : ndarray of shape (n_query,), dtype object
        """
        indptr, ind, dist = self._radius(X, radius)
        return ragged(indptr, ind, dist, return_distance)

    def _radius(self, X, radius):
        self._check_fitted()
        self._validate_params()
        radius = check_radius(self.radius if radius is None else radius, self.metric)
        query = self._fit_X if X is None else self._query_set(X)
        indptr, ind, keys = radius_csr(query, self._fit_X, radius, self.metric, self.memory_budget)
        dist = _topk.distances_from_keys(keys, self.metric)
        if X is None:
            rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
            keep = ind != rows
            indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=indptr.size - 1))])
            ind, dist = ind[keep], dist[keep]
        return indptr, ind, dist

    def radius_neighbors_graph(self, X=None, radius=None, mode="connectivity", sort_results=False):
        """The radius graph as a ``scipy.sparse.csr_matrix`` of shape (n_query, n_samples_fit).

        ``mode``: ``"connectivity"`` (entries 1) or ``"distance"``; see
        :meth:`radius_neighbors`.
        """
        import scipy.sparse as sp

        check_mode(mode)
        indptr, ind, dist = self._radius(X, radius)
        data = np.ones(ind.size) if mode == "connectivity" else dist
        return sp.csr_matrix((data, ind, indptr), shape=(indptr.size - 1, self.n_samples_fit_))


class _Supervised(_Neighbors):
    """The classifier's and the regressor's shared parameters and their ``y``."""

    def __init__(self, n_neighbors=5, weights="uniform", memory_budget=None, metric="euclidean"):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.memory_budget = memory_budget
        self.metric = metric

    def _fit_targets(self, X, y, what):
        """The training set as a row source and its ``y`` (a dataset's own when not given)."""
        self._validate_params()
        source = as_rows(X, "X")
        if y is None and source.dataset is not None and source.dataset.y_zarr is not None:
            y = source.dataset.y_zarr[source.lo:source.hi]
        if y is None:
            raise InputError(f"{type(self).__name__} requires y to be passed, but the target y is None: pass "
                             f"the training {what}, or a dataset that holds 'y'")
        check_k(self.n_neighbors, source.shape[0])
        return source, y


class KNeighborsClassifier(_Supervised):
    """k-nearest-neighbours vote, exact and out of core, with scikit-learn's API.

    ``fit`` only keeps a reference to the training set (an array, a dask or Zarr
    array, a Dataset or a URL) and its labels; ``predict`` streams the training set
    with :func:`kneighbors` and votes as scikit-learn's ``KNeighborsClassifier``
    (ties to the lowest class; ``weights="distance"`` gives neighbours at distance 0
    all the weight).  ``predict``, ``predict_proba`` and ``score`` on the same input
    share one k-NN pass (:meth:`_neighbors`).

    Parameters
    ----------
    n_neighbors : int, default 5
    weights : {"uniform", "distance"}, default "uniform"
    memory_budget : int or str, optional
    metric : {"euclidean", "sqeuclidean", "cosine", "ip", "manhattan"}, default "euclidean"
        See :func:`kneighbors`.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_samples_fit_ : int
    n_features_in_ : int
    effective_metric_ : str

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> X = np.array([[0.0], [1.0], [10.0], [11.0]])
    >>> clf = pl.KNeighborsClassifier(n_neighbors=3).fit(X, [0, 0, 1, 1])
    >>> clf.predict(np.array([[0.5], [10.5]])).tolist()
    [0, 1]
    """

    _estimator_type = "classifier"
    _requires_y = True

    def fit(self, X, y=None):
        """Remember the training set and its labels (no pass over the data).

        Parameters
        ----------
        X : array-like of shape (n_train, n_features), Dataset or URL
        y : array-like of shape (n_train,), optional
            Labels (strings or whole numbers; a column vector (n_train, 1) is raveled
            with a ``DataConversionWarning``); a Dataset or URL with labels ``y``
            provides its own.

        Returns
        -------
        self
        """
        source, y = self._fit_targets(X, y, "labels")
        classes, codes = as_classes(y, source.shape[0])
        self._fit_set(X)
        self.classes_, self._y = classes, codes
        return self

    def _vote(self, X):
        self._check_fitted()
        dist, ind = self.kneighbors(X)
        return _topk.vote(self._y[ind], dist, self.classes_, self.weights)

    def predict(self, X):
        """Predicted class of every query row, shape (n_query,)."""
        return self._vote(X)[0]

    def predict_proba(self, X):
        """Class probabilities, shape (n_query, n_classes), columns in ``classes_`` order."""
        return self._vote(X)[1]

    def score(self, X, y):
        """Mean accuracy of ``predict(X)`` against ``y``."""
        pred = self.predict(X)
        return float(np.mean(pred == as_labels(y, pred.shape[0])))


class KNeighborsRegressor(_Supervised):
    """k-nearest-neighbours regression, exact and out of core, with scikit-learn's API.

    The prediction is the mean of the neighbours' targets, or with
    ``weights="distance"`` their mean weighted by 1 / distance (neighbours at
    distance 0 get all the weight), as scikit-learn's ``KNeighborsRegressor``.  ``y``
    may have several outputs, shape (n_train, n_outputs); it is held in memory.

    Parameters
    ----------
    n_neighbors : int, default 5
    weights : {"uniform", "distance"}, default "uniform"
    memory_budget : int or str, optional
    metric : {"euclidean", "sqeuclidean", "cosine", "ip", "manhattan"}, default "euclidean"

    Attributes
    ----------
    n_samples_fit_ : int
    n_features_in_ : int
    effective_metric_ : str

    Examples
    --------
    >>> import numpy as np, pipeline as pl
    >>> reg = pl.KNeighborsRegressor(n_neighbors=2).fit(np.array([[0.0], [1.0], [10.0]]), [0.0, 1.0, 5.0])
    >>> reg.predict(np.array([[0.4]])).tolist()
    [0.5]
    """

    _estimator_type = "regressor"
    _requires_y = True

    def __sklearn_tags__(self):
        """scikit-learn's tags of a regressor, multi-output."""
        tags = super().__sklearn_tags__()
        # y of shape (n_train, n_outputs) is fitted and predicted as it is (each output
        # the mean over the same neighbours), not raveled: scikit-learn then checks
        # multi-output prediction (check_regressor_multioutput) and expects no
        # column-vector warning for y of shape (n, 1) (check_supervised_y_2d).
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y=None):
        """Remember the training set and its targets (no pass over the data).

        Parameters
        ----------
        X : array-like of shape (n_train, n_features), Dataset or URL
        y : array-like of shape (n_train,) or (n_train, n_outputs)
            Targets; a Dataset or URL with ``y`` provides its own.

        Returns
        -------
        self
        """
        source, y = self._fit_targets(X, y, "targets")
        self._y = as_targets(y, source.shape[0])
        self._fit_set(X)
        return self

    def predict(self, X):
        """Predicted targets, shape (n_query,) or (n_query, n_outputs) as ``y`` in fit."""
        self._check_fitted()
        dist, ind = self.kneighbors(X)
        return _topk.regress(self._y[ind], dist, self.weights)

    def score(self, X, y):
        """R² of ``predict(X)`` against ``y``, averaged over outputs (scikit-learn's ``r2_score``)."""
        pred = self.predict(X)
        return _topk.r2(as_targets(y, pred.shape[0]), pred)
