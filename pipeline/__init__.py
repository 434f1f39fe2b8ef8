"""pipeline: out-of-core distances, exact k-NN and Gaussian-mixture EM on Dask + Zarr.

Datasets live as chunked Zarr groups; every operation runs block by block inside a
memory budget you state, on dask's threads or a distributed cluster.

Examples
--------
>>> import pipeline as pl
>>> ds = pl.make_blobs("memory://doc/init", 500, 4, centers=2)
>>> pl.plan("knn", n_query=100, n_train=500, n_features=4, memory_budget="256MiB", threads=2)["query_rows"]
100
"""

from .budget import Plan, parse_budget, plan
from .distances import pairwise_distances
from .errors import BudgetError, DataError, InputError, NotFittedError, PipelineError
from .jobs import run_job
from .mixture import GaussianMixture, em_step
from .neighbors import (KNeighborsClassifier, KNeighborsRegressor, NearestNeighbors, kneighbors, load_graph,
                        radius_neighbors)
from .store import Dataset, make_blobs, make_cifar_like, open_dataset
from .store.ingest import ingest, write_dataset

__version__ = "0.1.0"

__all__ = [
    "Dataset", "open_dataset", "write_dataset", "ingest", "make_blobs", "make_cifar_like",
    "plan", "Plan", "parse_budget",
    "pairwise_distances", "kneighbors", "radius_neighbors", "load_graph",
    "NearestNeighbors", "KNeighborsClassifier", "KNeighborsRegressor",
    "GaussianMixture", "em_step",
    "PipelineError", "InputError", "BudgetError", "DataError", "NotFittedError",
    "run_job",
]
