"""Zarr stores by concept: datasets, integrity-checked reads, locks, the result writer, ingest, generators.

``urls`` (where stores live), ``reads`` (checked and raw chunk reads); ``locks`` and
``results`` (the one result writer) build on ``urls``; ``datasets`` on all of them,
``generate`` on ``datasets``; ``ingest`` (from
arrays and ``.npy`` files) also reads its arrays through :mod:`pipeline.inputs`, so it is
imported as ``pipeline.store.ingest`` (not re-exported here: that would be an import
cycle).
"""

from .datasets import Dataset, open_dataset
from .generate import make_blobs, make_cifar_like
from .results import ResultWriter, content_identity, job_fingerprint, open_result

__all__ = ["Dataset", "open_dataset", "make_blobs", "make_cifar_like",
           "ResultWriter", "content_identity", "job_fingerprint", "open_result"]
