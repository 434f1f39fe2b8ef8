"""Where and how work runs: schedulers and BLAS limits, graph building, per-thread scratch.

``schedulers`` (threads / local / tcp:// / tls://, :func:`compute`, BLAS threads);
``graphs`` (named keys, shared keys, the chunk / combine / aggregate tree);
``scratch`` (per-thread buffers reused from block to block).
"""

from .graphs import delayed_of, reduce_tree, shared_key, source_key
from .schedulers import (RUNTIME_BASE, RUNTIME_OVERHEAD, TASK_OVERHEAD, blas_threads_for, compute, connect, cores,
                         dask_threads, dask_workers, limit_malloc, parse_scheduler, persist, runtime_overhead)
from .scratch import thread_buffers, thread_work

__all__ = ["compute", "persist", "connect", "dask_threads", "dask_workers", "cores", "blas_threads_for", "parse_scheduler",
           "limit_malloc", "runtime_overhead", "RUNTIME_BASE", "RUNTIME_OVERHEAD", "TASK_OVERHEAD", "delayed_of",
           "reduce_tree", "shared_key", "source_key", "thread_buffers", "thread_work"]
