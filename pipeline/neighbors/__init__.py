"""Exact neighbours out of core, with scikit-learn's API.

* :mod:`~pipeline.neighbors.search`: the k-NN and radius-query graphs (block tasks,
  shared bounds, merge trees), :func:`kneighbors`, :func:`radius_neighbors`;
* :mod:`~pipeline.neighbors.estimators`: :class:`NearestNeighbors`,
  :class:`KNeighborsClassifier`, :class:`KNeighborsRegressor`;
* :mod:`~pipeline.neighbors.results`: :func:`write_knn` (``pipeline knn``) and
  :func:`load_graph`.
"""

from .estimators import KNeighborsClassifier, KNeighborsRegressor, NearestNeighbors
from .results import load_graph, write_knn
from .search import kneighbors, radius_neighbors

__all__ = ["kneighbors", "radius_neighbors", "NearestNeighbors", "KNeighborsClassifier", "KNeighborsRegressor",
           "write_knn", "load_graph"]
