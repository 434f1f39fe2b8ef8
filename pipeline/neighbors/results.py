"""k-NN results on disk: :func:`write_knn` (resumable pieces, votes, the CSR graph) and :func:`load_graph`."""

from __future__ import annotations

import math

import numpy as np

from ..budget import plan
from ..errors import InputError
from ..inputs import as_rows, check_metric, check_same_features
from ..kernels import topk as _topk
from ..runtime import dask_threads
from ..store.results import ResultWriter, job_fingerprint
from .search import check_k, check_mode, kneighbors

__all__ = ["write_knn", "load_graph"]

_PIECES = 8  # a resumable k-NN job is cut into at most this many query pieces ...
# ... of at least this many rows (see write_knn): each piece reads the training set
# again, and a float32 row of it costs about as much to read (~2 GB/s) as ~150 query
# rows cost to rank against it (~150 GFLOP/s); 2048 keeps the re-read under ~10%.
_PIECE_ROWS = 2048


def _piece_rows(n_query, query_rows):
    """Query rows per resumable piece of :func:`write_knn`.

    Each piece is one complete k-NN pass over the training set whose outputs are one
    Zarr chunk, recorded as done once written: a crash costs at most the piece in
    flight.  The plan's own query blocks are kept when they are smaller (the training
    set is then read once per block anyway); otherwise the queries are cut into at most
    ``_PIECES`` pieces, so a long job is resumable at the price of reading the training
    set up to ``_PIECES`` times (the GEMM work is the same), with pieces of at least
    ``_PIECE_ROWS`` queries so that the re-reads stay a small part of the work.
    """
    return int(min(n_query, query_rows, max(_PIECE_ROWS, math.ceil(n_query / _PIECES))))


def _absolute_rows(error, offset):
    """An InputError of a piece in the CLI's words: QUERY rows renumbered as rows of the whole set, TRAIN."""
    import re

    text = str(error)
    if offset and text.startswith("X (the query set)"):
        text = re.sub(r"row\(s\) ([0-9]+(?:, [0-9]+)*)",
                      lambda m: "row(s) " + ", ".join(str(int(r) + offset) for r in m.group(1).split(", ")),
                      text, count=1)
    return InputError(text.replace("X (the query set)", "QUERY", 1).replace("Y (the training set)", "TRAIN", 1))


def write_knn(query, train, out, *, k=5, weights="uniform", memory_budget=None, overwrite=False,
              piece_rows=None, on_block=None, metric="euclidean", graph=None):
    """Exact k-NN of a query dataset in a training dataset, written to a result store.

    Writes ``indices`` int64 (n_query, k), ``distances`` float64 (n_query, k) and,
    when the training set has labels, ``predictions`` (n_query,); when the query set
    has labels too, the accuracy goes into the attributes.  ``metric`` as
    :func:`kneighbors`.  ``graph="connectivity"`` or ``"distance"`` also writes the
    k-NN graph in CSR form, ``graph_data`` (float64), ``graph_indices`` (int64, both
    n_query * k) and ``graph_indptr`` (n_query + 1), each piece's rows as one chunk:
    :func:`load_graph` reads it as a ``scipy.sparse.csr_matrix`` of shape
    (n_query, n_train), the matrix ``kneighbors_graph`` returns.  The queries are processed
    in pieces (:func:`_piece_rows`, or ``piece_rows``), each written as one chunk of
    every output and then recorded in ``_done``; the store is marked complete only
    after every piece is written.  Rerun on the same job's incomplete result (a crash,
    SIGKILL), it keeps the recorded pieces and computes only the others.
    ``on_block((piece,))`` is called after each piece is recorded.

    Returns
    -------
    dict
        A summary for the command line (rows, k, pieces written and kept, accuracy
        when known, output).

    Examples
    --------
    >>> import pipeline as pl                                         # doctest: +SKIP
    >>> pl.neighbors.write_knn("test.zarr", "train.zarr", "knn.zarr")  # doctest: +SKIP
    {'status': 'complete', 'queries': 1000, 'k': 5, 'pieces': 4, ..., 'output': 'knn.zarr'}
    """
    if weights not in ("uniform", "distance"):
        raise InputError(f"weights={weights!r}; choose 'uniform' or 'distance'")
    check_metric(metric)
    if weights == "distance" and metric == "ip":
        raise InputError("weights='distance' needs a distance, and metric='ip' ranks by inner products "
                         "(larger is nearer); use weights='uniform' or metric='cosine'")
    if graph is not None:
        check_mode(graph)
    qd, td = as_rows(query, "QUERY"), as_rows(train, "TRAIN")
    check_same_features(qd, td)
    k = check_k(k, td.shape[0], "k")
    n = int(qd.shape[0])
    # The plan first: an impossible budget fails before anything is written.
    p = plan("knn", n_query=n, n_train=td.shape[0], n_features=td.shape[1], k=k,
             itemsize=8 if metric == "manhattan" else max(qd.dtype.itemsize, td.dtype.itemsize),
             memory_budget=memory_budget,
             threads=dask_threads(), train_held=td.kind == "dask")
    # Options at their defaults are left out: results written before they existed keep their job.
    extra = {name: value for name, value, default in (("metric", metric, "euclidean"), ("graph", graph, None))
             if value != default}
    job = job_fingerprint(op="knn", query=qd.identity(), train=td.identity(), k=k, weights=weights, **extra)
    with ResultWriter(out, "neighbors", job, overwrite=overwrite, resume=True, on_block=on_block) as result:
        if result.status == "complete":
            attrs = result.attrs
            summary = {"status": "already complete (same job); nothing to do", "queries": attrs.get("n_query"),
                       "k": k}
            if "accuracy" in attrs:
                summary["accuracy"] = attrs["accuracy"]
            return {**summary, "output": str(out)}
        ytrain = td.dataset.y_zarr if td.dataset is not None else None
        classes = enc = None
        if ytrain is not None:
            classes, enc = np.unique(np.asarray(ytrain[...]), return_inverse=True)
        if "indices" in result.group:
            rows = int(result.group["indices"].chunks[0])  # the pieces the result was started with
        else:
            rows = min(int(piece_rows), p["query_rows"]) if piece_rows else _piece_rows(n, p["query_rows"])
        outputs = {"indices": result.array("indices", (n, k), (rows, k), np.int64),
                   "distances": result.array("distances", (n, k), (rows, k), np.float64)}
        if classes is not None:
            outputs["predictions"] = result.array("predictions", (n,), (rows,), classes.dtype)
        if graph is not None:
            outputs["graph_data"] = result.array("graph_data", (n * k,), (rows * k,), np.float64)
            outputs["graph_indices"] = result.array("graph_indices", (n * k,), (rows * k,), np.int64)
            # indptr[i] = i k: piece p writes rows [a, b) of it, one chunk; the last entry, n k,
            # is written with the completion.
            outputs["graph_indptr"] = result.array("graph_indptr", (n + 1,), (rows,), np.int64)
        n_pieces = math.ceil(n / rows)
        todo = result.pending((n_pieces,))
        for (piece,) in todo:
            a, b = piece * rows, min(n, (piece + 1) * rows)
            try:
                if n_pieces == 1:
                    dist, ind = kneighbors(qd, td, k, memory_budget=memory_budget, metric=metric)
                else:  # each piece: one query block, read in its tasks
                    dist, ind = kneighbors(qd.rows(a, b), td, k, memory_budget=memory_budget, metric=metric,
                                           query_rows=b - a if qd.kind == "zarr" else None)
            except InputError as e:
                raise _absolute_rows(e, a) from None
            blocks = {"indices": ind, "distances": dist}
            if classes is not None:
                blocks["predictions"] = _topk.vote(enc[ind], dist, classes, weights)[0]
            if graph is not None:
                blocks["graph_data"] = np.ones(ind.size) if graph == "connectivity" else dist.ravel()
                blocks["graph_indices"] = ind.ravel()
            for name, block in blocks.items():
                if name.startswith("graph_"):
                    outputs[name][a * k:b * k] = block
                else:
                    outputs[name][a:b] = block
            if graph is not None:
                outputs["graph_indptr"][a:b] = np.arange(a, b, dtype=np.int64) * k
            result.record((piece,))
        summary = {"status": "complete (resumed)" if len(todo) < n_pieces else "complete",
                   "queries": n, "k": k, "pieces": n_pieces, "pieces_written": len(todo),
                   "pieces_kept": n_pieces - len(todo)}
        attrs = {"n_query": n, "n_train": int(td.shape[0]), "k": k, "weights": weights, "metric": metric}
        if graph is not None:
            outputs["graph_indptr"][n] = n * k
            attrs.update(graph=graph, graph_shape=[n, int(td.shape[0])])
            summary["graph"] = f"{graph}, {n} x {int(td.shape[0])}, {n * k} entries"
        yq = qd.dataset.y_zarr if qd.dataset is not None else None
        if classes is not None and yq is not None:
            acc = float(np.mean(outputs["predictions"][...] == np.asarray(yq[...])))
            attrs["accuracy"] = acc
            summary["accuracy"] = round(acc, 6)
        result.complete(**attrs)
    return {**summary, "output": str(out)}


def load_graph(url):
    """The k-NN graph a ``pipeline knn --graph`` result holds, as a ``scipy.sparse.csr_matrix``.

    Loads ``graph_data``, ``graph_indices`` and ``graph_indptr`` (16 bytes per
    entry); for more than fits, read slices of those arrays from the store instead.

    Parameters
    ----------
    url : str or Path
        The OUT of ``pipeline knn QUERY TRAIN OUT --graph connectivity|distance``.

    Returns
    -------
    scipy.sparse.csr_matrix of shape (n_query, n_train)

    Raises
    ------
    InputError
        The store is not a k-NN result, or was written without a graph.
    DataError
        The result is incomplete (rerun the command that writes it).
    """
    import scipy.sparse as sp

    from ..store.results import open_result

    group = open_result(url, "neighbors")
    attrs = dict(group.attrs.get("pipeline", {}))
    if "graph" not in attrs:
        raise InputError(f"{url} holds no graph; write it with: pipeline knn QUERY TRAIN OUT --graph connectivity")
    shape = tuple(int(v) for v in attrs["graph_shape"])
    return sp.csr_matrix((group["graph_data"][...], group["graph_indices"][...], group["graph_indptr"][...]),
                         shape=shape)
