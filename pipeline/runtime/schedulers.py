"""Where work runs: the threaded scheduler (default), a local cluster, or tcp:// / tls://.

The graph builders call :func:`compute`; it runs on a ``distributed.Client`` when one
is current (the user's own, or the one :func:`connect` made), else on dask's threaded
scheduler.  Either way BLAS threads are limited so that dask threads x BLAS threads <=
cores (two levels of threads fighting for two cores make GEMMs several times slower):
in this process for the length of the compute, on workers for as long as
:func:`connect`'s connection lasts.  Progress bars when asked to.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

from ..errors import InputError
from ..sizes import parse_budget

__all__ = ["compute", "persist", "connect", "dask_threads", "cores", "blas_threads_for",
           "parse_scheduler", "limit_malloc", "runtime_overhead", "RUNTIME_BASE", "RUNTIME_OVERHEAD",
           "TASK_OVERHEAD"]

# Memory the runtime adds once work starts, beside the blocks a plan counts: thread
# stacks, dask's scheduler state, zarr's event loop and codec buffers, BLAS's packed
# panels, and the freed blocks under the 1 MiB mmap threshold that glibc keeps in the
# threads' arenas (limit_malloc).  RUNTIME_BASE for the smallest jobs (measured: up to
# 4.2 MiB), RUNTIME_OVERHEAD at most: see runtime_overhead.
RUNTIME_BASE = 6 * 2**20
RUNTIME_OVERHEAD = 20 * 2**20
# dask's bookkeeping per task of a graph (task objects, keys, scheduler state),
# measured with graphs of 400 and 40000 tasks.
TASK_OVERHEAD = 16 * 2**10
# A worker process's own idle footprint (numpy, dask, distributed and zarr imported).
_WORKER_IDLE = 150 * 2**20

_state = {"progress": None}


def runtime_overhead(working, tasks=0):
    """Bytes the runtime adds to a job whose plan counts ``working`` bytes and runs ``tasks`` tasks.

    ``RUNTIME_BASE`` whatever the blocks, plus a quarter of ``working`` (BLAS packs
    panels of its operands; freed blocks below the mmap threshold stay in the arenas of
    the threads that used them) and dask's bookkeeping of ``tasks`` (``TASK_OVERHEAD``
    each), at most ``RUNTIME_OVERHEAD``: the figure the plans of large blocks have
    always carried (so they are unchanged), which holds a graph up to its headroom.  A
    larger graph counts in full above the base.

    Measured, peak RSS above an idle process that imported the same modules: 0.3-4.2
    MiB for a 1-row k-NN, distance matrix, GMM fit and predict (the fit the most:
    ``benchmarks/bench_minima.py``); beyond the buffers a plan counts, 2.5 MiB over 7.6
    MiB counted (distances, 300 x 3000 x 256 float32 at 32 MiB) and 5.3 MiB over 19.9
    MiB (the same k-NN from Zarr at 64 MiB); a k-NN graph, ~5 KiB a task (16000 tasks:
    +85 MiB), a GMM predict's ~2 KiB.  Held by measurement in
    ``tests/test_small_budget.py`` and the other memory tests.  A fixed 20 MiB used to be
    charged to every job, so that none could run in less.

    Examples
    --------
    >>> runtime_overhead(0) == RUNTIME_BASE, runtime_overhead(2**30) == RUNTIME_OVERHEAD
    (True, True)
    """
    graph = int(tasks) * TASK_OVERHEAD
    return int(max(min(RUNTIME_OVERHEAD, RUNTIME_BASE + int(working) // 4 + graph), RUNTIME_BASE + graph))


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _current_client():
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def dask_threads() -> int:
    """Tasks that run at once in one process: per worker on a cluster, else dask's threads."""
    client = _current_client()
    if client is not None:
        threads = [w.get("nthreads", 1) for w in _workers(client).values()]
        return max(threads) if threads else 1
    import dask.config

    return int(dask.config.get("num_workers", None) or cores())


def dask_workers() -> int:
    """Worker processes of the connected cluster (1 without one)."""
    client = _current_client()
    return max(1, len(_workers(client))) if client is not None else 1


def _workers(client):
    """{address: info} of every worker (newer distributed lists only a few unless asked)."""
    import inspect

    try:
        every = "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        every = False
    return client.scheduler_info(**({"n_workers": -1} if every else {})).get("workers", {})


def limit_malloc():
    """Make glibc return freed blocks of 1 MiB or more to the OS at once, in this process.

    glibc otherwise keeps blocks of a few MiB in its heaps for reuse after their first
    free (it raises its mmap threshold dynamically, per thread arena), so the resident
    set stays near a high-water mark that depends on how the threads interleaved; a
    fixed threshold keeps it at what is live, which is what the memory budget promises
    and what the memory tests measure.  It is a setting of the whole process that
    cannot be undone (glibc's dynamic threshold stays off), so pipeline applies it only
    to processes it owns: the ``pipeline`` command and the workers ``connect("local")``
    starts.  Your own program opts in by calling it once.

    What it buys and costs, measured on the 2-core VM: a 3-iteration fit and a predict
    of 800000 x 32 float64 under a 64 MiB budget (tests/test_gmm_memory.py) added
    85 MiB without it, inside the budget with it; distances at 128 MiB
    (tests/test_memory.py) 167 MiB without, inside with.  A 5-iteration 16-component
    fit of 200000 x 64: +60 MiB instead of +150 MiB, but 7.3 s instead of 4.4 s (each
    fresh block of 1 MiB or more is then a new mapping, page-faulted on first use); a
    k-NN from Zarr, whose buffers are reused per thread, is unchanged (+130 MiB, 1.3 s).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)


def blas_threads_for(dask_threads_: int) -> int:
    """BLAS threads per dask thread so that their product does not exceed the cores."""
    return max(1, cores() // max(1, dask_threads_))


@contextlib.contextmanager
def _blas_limited(n):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def _progress_enabled():
    p = _state["progress"]
    if p is None:
        return False
    return bool(p)


def compute(*collections, label=None, **kwargs):
    """Compute dask collections on the active scheduler, BLAS-limited, with progress.

    Parameters
    ----------
    *collections
        Dask collections (or anything ``dask.compute`` takes).
    label : str, optional
        Shown next to the progress bar.

    Returns
    -------
    tuple
        One result per collection, as ``dask.compute`` returns them.
    """
    import dask

    client = _current_client()
    if client is not None:
        futures = client.compute(list(collections), **kwargs)
        if _progress_enabled():
            from distributed import progress

            if label:
                print(f"{label}:", file=sys.stderr, flush=True)
            # distributed's text bar writes to stdout, where results go: send it to stderr.
            with contextlib.redirect_stdout(sys.stderr):
                progress(futures)
            print(file=sys.stderr, flush=True)
        return tuple(client.gather(futures))
    threads = dask_threads()
    ctx = contextlib.ExitStack()
    ctx.enter_context(_blas_limited(blas_threads_for(threads)))
    # The threaded scheduler named by its function: the name "threads" makes dask
    # import distributed (about a second) to look for a client first.
    import dask.threaded

    ctx.enter_context(dask.config.set(scheduler=dask.threaded.get, num_workers=threads))
    if _progress_enabled():
        from dask.diagnostics import ProgressBar

        if label:
            print(f"{label}:", file=sys.stderr, flush=True)
        ctx.enter_context(ProgressBar(out=sys.stderr, minimum=0.5))
    with ctx:
        return dask.compute(*collections, **kwargs)


def persist(*collections):
    """``dask.persist`` with BLAS threads limited as :func:`compute` limits them.

    Without a client, on the threaded scheduler named by its function, as
    :func:`compute`: dask's default would import distributed (measured: +30 MiB, which
    the grouped EM pass used to add to every plan's budget).
    """
    import dask

    threads = dask_threads()
    with contextlib.ExitStack() as ctx:
        ctx.enter_context(_blas_limited(blas_threads_for(threads)))
        if _current_client() is None:
            import dask.threaded

            ctx.enter_context(dask.config.set(scheduler=dask.threaded.get, num_workers=threads))
        return dask.persist(*collections)


def parse_scheduler(scheduler):
    """``scheduler`` checked: "threads" (None), "local", or a tcp:// / tls:// address."""
    if scheduler in (None, "threads", "local") or str(scheduler).startswith(("tcp://", "tls://")):
        return scheduler or "threads"
    raise InputError(
        f"--scheduler {scheduler!r} is not known; use 'threads' (default), 'local', or "
        "an address such as tcp://127.0.0.1:8786"
    )


@contextlib.contextmanager
def connect(scheduler="threads", *, workers=None, threads_per_worker=None,
            memory_budget=None, progress=None, timeout=10, dashboard_address="127.0.0.1:8787", echo=print,
            security=None, report=None):
    """Run the enclosed work on a scheduler.

    Parameters
    ----------
    scheduler : {"threads", "local"} or str
        ``"threads"``: dask's threaded scheduler in this process (no server).
        ``"local"``: a ``distributed.LocalCluster`` of worker processes, each with a
        memory limit of the budget plus its idle footprint; the dashboard link is
        printed.  ``"tcp://HOST:PORT"``: an existing cluster.
    workers, threads_per_worker : int, optional
        For ``"threads"`` (threads only) and ``"local"``.  Default: all cores, with
        one thread per worker process on ``local``.
    memory_budget : int or str, optional
        Budget per process / worker (see :func:`pipeline.parse_budget`).
    progress : bool, optional
        Show progress bars; default: when stderr is a terminal.
    timeout : float
        Seconds to wait for a ``tcp://`` scheduler before giving up with an error.
    security : distributed.Security or dict, optional
        TLS for ``tls://`` addresses: a ``Security`` or a dict of its arguments
        (``tls_ca_file``, ``tls_client_cert``, ``tls_client_key``).  Default: dask config
        ``distributed.comm.tls.*``.
    report : str or Path, optional
        Write a dask performance report (HTML) of the enclosed work there; needs a
        distributed scheduler (``local`` or an address).

    Yields
    ------
    distributed.Client or None
    """
    import dask.config

    scheduler = parse_scheduler(scheduler)
    if report is not None and scheduler == "threads":
        raise InputError(f"--report {report} needs a distributed scheduler; add --scheduler local "
                         "(or the address of a running one)")
    if progress is None:
        progress = sys.stderr.isatty()
    old = dict(_state)
    _state["progress"] = progress
    try:
        if scheduler == "threads":
            n = threads_per_worker or workers or None
            import dask.threaded

            cfg = {"scheduler": dask.threaded.get}
            if n:
                cfg["num_workers"] = int(n)
            with dask.config.set(cfg):
                yield None
            return
        from distributed import Client, LocalCluster

        if scheduler == "local":
            n_workers = workers or cores()
            tpw = threads_per_worker or max(1, cores() // n_workers)
            # A worker's limit is its budget plus its own idle footprint.
            limit = parse_budget(memory_budget) + RUNTIME_OVERHEAD + _WORKER_IDLE
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=tpw, processes=True,
                                   memory_limit=limit, dashboard_address=dashboard_address)
            with cluster, Client(cluster) as client, _workers_limited(client, own=True):
                # The dashboard lives as long as the cluster: until the enclosed job ends.
                echo(f"dashboard: {client.dashboard_link}")
                sys.stdout.flush()
                with _reported(report):
                    yield client
            return
        sec = _security(scheduler, security)
        try:
            client = Client(scheduler, timeout=timeout, security=sec)
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            hint = ("check --tls-ca-file/--tls-cert/--tls-key: the scheduler must accept this "
                    "certificate" if scheduler.startswith("tls://") else
                    "start it with `dask scheduler` or check the address")
            raise InputError(
                f"cannot reach the scheduler at {scheduler} within {timeout:g} s ({e.__class__.__name__}); {hint}"
            ) from None
        with client, _workers_limited(client, own=False):
            link = _dashboard_link(client)
            if link:
                echo(f"dashboard: {link}")
                sys.stdout.flush()
            with _reported(report):
                yield client
    finally:
        _state.update(old)


def _security(scheduler, security):
    """A ``distributed.Security`` for ``tls://`` (from arguments or dask config), else None."""
    from distributed import Security

    if isinstance(security, Security):
        return security
    given = {k: v for k, v in (security or {}).items() if v}
    if not scheduler.startswith("tls://"):
        if given:
            raise InputError(f"TLS options were given but --scheduler {scheduler} is not a tls:// address; "
                             "use tls://HOST:PORT")
        return None
    sec = Security(require_encryption=True, **given)
    missing = [flag for flag, attr in (("--tls-ca-file", "tls_ca_file"), ("--tls-cert", "tls_client_cert"))
               if not getattr(sec, attr)]
    if missing:
        raise InputError(
            f"--scheduler {scheduler} needs a client certificate: give {' and '.join(missing)} "
            "(and --tls-key unless the key is in the cert file), or set dask config distributed.comm.tls.*"
        )
    return sec


def _dashboard_link(client):
    try:
        return client.dashboard_link if client.scheduler_info().get("services", {}).get("dashboard") else None
    except Exception:  # noqa: BLE001 - a link is a courtesy
        return None


@contextlib.contextmanager
def _reported(report):
    """``distributed.performance_report`` around the enclosed work, when asked."""
    if report is None:
        yield
        return
    from distributed import performance_report

    with performance_report(filename=os.fspath(report)):
        yield


def _host_threads(client):
    """{host: dask threads of all the workers on it}, from the scheduler."""
    from urllib.parse import urlsplit

    totals = {}
    for addr, w in _workers(client).items():
        host = urlsplit(addr).hostname
        totals[host] = totals.get(host, 0) + int(w.get("nthreads", 1))
    return totals


@contextlib.contextmanager
def _workers_limited(client, own):
    """BLAS threads limited on every worker (also ones that join or restart) while connected.

    Workers sharing a machine share its cores: two 1-thread workers on 2 cores get one
    BLAS thread each, not two (which would run 4 threads on 2 cores).  The limits are
    a worker plugin whose teardown restores each worker's own limits when the
    connection ends: a cluster of the user's is left as it was found.  ``own``: the
    workers are processes :func:`connect` started, so :func:`limit_malloc` applies too.
    """
    import uuid
    from urllib.parse import urlsplit

    from distributed.diagnostics.plugin import WorkerPlugin

    hosts = _host_threads(client)

    class _BlasLimit(WorkerPlugin):
        # One name per connection: two sessions on one cluster must not tear down
        # (or unregister) each other's limits.
        name = f"pipeline-blas-limit-{uuid.uuid4().hex}"

        def setup(self, worker):
            from threadpoolctl import threadpool_limits

            if own:
                limit_malloc()
            threads = max(worker.state.nthreads, hosts.get(urlsplit(worker.address).hostname) or 0)
            self._limits = threadpool_limits(limits=blas_threads_for(threads), user_api="blas")

        def teardown(self, worker):
            limits = getattr(self, "_limits", None)
            if limits is not None:
                limits.restore_original_limits()

    client.register_plugin(_BlasLimit())
    try:
        yield
    finally:
        try:
            client.unregister_worker_plugin(_BlasLimit.name)
        except Exception:  # noqa: BLE001 - a cluster already gone keeps nothing to restore
            pass
