"""Building dask graphs: named keys, shared keys, and the chunk / combine / aggregate tree.

Every task key reads ``pipeline-<op>-<stage>-<token>`` so the dashboard's task stream
and Prometheus say what runs.  A reduction's ``combine`` takes a list of partial results
and is associative, so ``split_every`` changes only the shape of the tree, never the
result (as ``dask.array.reduction``).
"""

from __future__ import annotations

__all__ = ["shared_key", "source_key", "reduce_tree", "delayed_of"]


def shared_key(obj, name):
    """One graph key named ``name`` holding ``obj`` (an iteration's parameters): every
    task that needs it depends on that key, nothing is embedded per task."""
    from dask.delayed import delayed

    return delayed(obj, name=name, traverse=False)


def source_key(store, prefix):
    """A Zarr array as one graph key (its metadata and path, never its data); None stays None."""
    import dask
    from dask.base import tokenize

    if store is None:
        return None
    name = f"{prefix}-" + tokenize(str(store.store), store.path, store.shape, str(store.dtype))
    return dask.delayed(store, pure=True, name=name)


def reduce_tree(dsk, leaves, combine, name, *, split_every, aggregate=None, prefix=()):
    """Add a tree reducing the graph keys ``leaves`` to ``dsk``; return the root's key.

    Inner tasks ``combine(list)`` at most ``split_every`` keys each, keyed
    ``(name, *prefix, level, j)``; the root applies ``aggregate`` (default ``combine``)
    to the last level and is keyed ``(name, *prefix)``.  Without ``aggregate``, a
    single leaf is the result itself (the root is an alias of it).
    """
    split_every = max(2, int(split_every))
    level, depth = list(leaves), 0
    while len(level) > split_every:
        nxt = []
        for g in range(0, len(level), split_every):
            key = (name, *prefix, depth, g // split_every)
            dsk[key] = (combine, level[g:g + split_every])
            nxt.append(key)
        level, depth = nxt, depth + 1
    root = (name, *prefix)
    dsk[root] = level[0] if aggregate is None and len(level) == 1 else (aggregate or combine, level)
    return root


def delayed_of(dsk, key, dependencies=()):
    """The dict graph ``dsk`` (on top of the dask collections it uses) as a Delayed of ``key``."""
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    layer = key[0] if isinstance(key, tuple) else key
    return Delayed(key, HighLevelGraph.from_collections(layer, dsk, dependencies=list(dependencies)),
                   layer=layer)
