"""Memory budgets: byte sizes, per-operation cost models and chunk plans.

The budget is the most memory an operation may add to one process above its idle
footprint (for a cluster: per worker).  Each operation has an explicit cost model: the
bytes one task holds while it runs, times the number of tasks alive at once, plus what
all tasks share (parameters) and the runtime's own memory
(:func:`pipeline.runtime.runtime_overhead`: a few MiB, growing with the blocks and the
graph).  A kernel's own buffers are stated by the kernel module beside the code that
allocates them (``kernels.distances.block_workspace``, ``kernels.topk.steps_workspace``,
``kernels.gaussian.em_workspace`` ...); the models here compose those with the blocks
as read, the graph's bookkeeping and the runtime.  :func:`plan` picks the largest
blocks whose predicted peak fits the budget; :meth:`Plan.explain` prints the table.
The numbers are checked by measuring real processes (``tests/test_memory.py``,
``test_knn_memory.py``, ``test_gmm_memory.py``) and the kernels' formulas against the
buffers they really allocate (``tests/test_workspace.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import BudgetError
from .kernels import distances as _kd
from .kernels import covariances as _cv
from .kernels import gaussian as _g
from .kernels import topk as _topk
from .runtime import RUNTIME_OVERHEAD, TASK_OVERHEAD, dask_threads, runtime_overhead
from .sizes import default_budget, format_bytes, parse_budget

__all__ = ["parse_budget", "default_budget", "format_bytes", "plan", "Plan", "CostItem", "align_rows",
           "cost_distances", "cost_knn", "cost_gmm", "RUNTIME_OVERHEAD", "TASK_OVERHEAD"]



@dataclass
class CostItem:
    """One row of a plan's cost table: ``count`` allocations of ``nbytes`` each."""

    name: str
    nbytes: int
    count: int = 1
    note: str = ""

    @property
    def total(self) -> int:
        return self.nbytes * self.count


@dataclass
class Plan:
    """Block sizes for one operation and the memory they are predicted to need.

    Attributes
    ----------
    op : str
        ``"distances"``, ``"knn"`` or ``"gmm"``.
    budget : int
        The budget in bytes.
    threads : int
        Tasks that run at once in one process (dask threads, or threads per worker).
    params : dict
        Block sizes: ``query_rows`` / ``train_rows`` (distances, knn), ``rows`` and
        ``component_group`` (gmm), plus derived counts such as ``passes``.  knn also
        has ``step``: the most training rows a task ranks per GEMM (the kernel's
        :func:`pipeline.kernels.topk.step_rows`, fewer on a small budget; a narrower
        block is one step).
    items : list of CostItem
        The cost table; ``peak`` is its total.
    shape : dict
        The problem the plan was made for.
    """

    op: str
    budget: int
    threads: int
    params: dict
    items: list = field(default_factory=list)
    shape: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """Predicted memory above the idle process, in bytes."""
        return sum(item.total for item in self.items)

    def __getitem__(self, key):
        return self.params[key]

    def explain(self) -> str:
        """The plan as a table: what each task holds, how many at once, the peak."""
        shape = ", ".join(f"{k}={v}" for k, v in self.shape.items())
        blocks = ", ".join(f"{k}={v}" for k, v in self.params.items())
        lines = [
            f"plan for {self.op} ({shape})",
            f"  budget {format_bytes(self.budget)}, {self.threads} task(s) at once; {blocks}",
            f"  {'item':<34}{'each':>12}{'x':>5}{'total':>12}  note",
        ]
        for it in self.items:
            lines.append(
                f"  {it.name:<34}{format_bytes(it.nbytes):>12}{it.count:>5}"
                f"{format_bytes(it.total):>12}  {it.note}"
            )
        pct = 100 * self.peak / self.budget
        lines.append(f"  {'predicted peak':<34}{'':>17}{format_bytes(self.peak):>12}  {pct:.0f}% of budget")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def _positive(name, value):
    if not isinstance(value, (int,)) or isinstance(value, bool) or value < 1:
        try:
            ok = int(value) == value and value >= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise BudgetError(f"{name}={value!r} must be a whole number >= 1")
    return int(value)


# ---------------------------------------------------------------------- cost models
#
# Each model is a function (blocks) -> list of CostItem.  `w` is the working itemsize
# (float32 data stays float32 for distances; integers become float32; GMM works in
# float64), `src` the stored itemsize (a converted block is a second copy).

def _read_cost(rows, chunk_rows, row_bytes, compressed=True):
    """Bytes alive while a task reads ``rows`` rows of a Zarr array.

    Zarr decodes whole chunks straight into the block where the block covers them
    (blocks are aligned by :func:`align_rows`); a block that is a fraction of a
    compressed chunk also holds that decoded chunk (an uncompressed one is read in
    part).  Measured in tests/test_memory.py.
    """
    extra = chunk_rows * row_bytes if compressed and chunk_rows and rows < chunk_rows else 0
    return rows * row_bytes + extra


def align_rows(rows, chunk_rows, n):
    """Round a block down to a multiple or a divisor of the stored chunks.

    Either way no stored chunk is decoded by two tasks, and no task decodes more
    than its own block's worth (or one chunk).
    """
    if not chunk_rows or rows >= n:
        return rows
    if rows >= chunk_rows:
        return rows // chunk_rows * chunk_rows
    small = [q for i in range(1, math.isqrt(chunk_rows) + 1) if chunk_rows % i == 0
             for q in (i, chunk_rows // i) if q <= rows]
    return max(small)


def _items(workspace, count):
    """A kernel's :class:`~pipeline.kernels.buffers.Workspace` rows as cost items, ``count`` of each."""
    return [CostItem(w.name, w.nbytes, count, w.note) for w in workspace]


def _with_runtime(items, tasks=0):
    """``items`` and the runtime's own memory for them and a graph of ``tasks`` tasks
    (:func:`pipeline.runtime.runtime_overhead`)."""
    working = sum(item.total for item in items)
    nbytes, note = runtime_overhead(working, tasks), "threads, BLAS buffers, zarr I/O"
    if tasks * TASK_OVERHEAD >= 2**20 and nbytes != RUNTIME_OVERHEAD:  # say so where the graph counts
        note += f", dask's graph of {tasks} tasks"
    return [*items, CostItem("runtime", nbytes, 1, note)]


def cost_distances(bq, bt, *, n_features, itemsize, out_itemsize, threads, upcast,
                   x_chunk_rows=None, y_chunk_rows=None, x_compressed=True, y_compressed=True,
                   n_blocks=1):
    """Cost table of one plan of :func:`pipeline.pairwise_distances`.

    A task centres its query block (held by dask for the other tasks of its row) and
    the training block it read itself, frees that read before the GEMM allocates its
    output (so the two share a row), then writes one output block.
    """
    d = n_features
    w = 8 if upcast else max(itemsize, 4)
    centred, gemm = _kd.block_workspace(bq, bt, d, itemsize, upcast)
    read_t = _read_cost(bt, y_chunk_rows, d * itemsize, y_compressed)
    items = [
        CostItem("query block as read", _read_cost(bq, x_chunk_rows, d * itemsize, x_compressed), threads,
                 "stored dtype, shared by its row's tasks"),
        CostItem(centred.name, centred.nbytes, threads, centred.note),
        CostItem("train block as read, or GEMM output", max(read_t, gemm.nbytes), threads,
                 "the read is freed before the GEMM allocates"),
    ]
    if out_itemsize != w:
        items.append(CostItem("output cast", bq * bt * out_itemsize, threads, "to the output dtype"))
    # The output chunk is written uncompressed, straight from the block (measured: no
    # encoded copy shows in the peak).
    items.append(CostItem("graph", 3 * n_blocks * TASK_OVERHEAD, 1, "dask's bookkeeping, 3 tasks a block"))
    return _with_runtime(items)


def cost_knn(bq, bt, *, n_features, itemsize, k, threads, n_train_blocks, step=None, train_held=True,
             n_query_blocks=1):
    """Cost table of one plan of :func:`pipeline.kneighbors` (``bq`` x ``bt`` blocks).

    ``step``: training rows per GEMM step (default :func:`pipeline.kernels.topk.step_rows`,
    the most a step ever takes).  ``train_held``: whether a task holds its whole
    training block (a dask array's block); a Zarr array's tasks read theirs a step at a
    time and an in-memory array's are views, so they hold only the step as read.
    ``n_query_blocks`` x ``n_train_blocks`` tasks (and their merge tree) make the graph.
    """
    d = n_features
    cand = k + 2 + k // 8  # k + neighbors' default margin
    step = _topk.step_rows(bq, d, itemsize) if step is None else int(step)
    # Steps read from Zarr are rounded to whole chunks (neighbors.search._read_step): at most
    # twice the kernel's step.
    rows = min(bt, 2 * step)
    if train_held:
        read = CostItem("train block", bt * d * itemsize, threads,
                        "an array input's block; Zarr inputs are read a step (up to 2 chunks) at a time")
    else:
        read = CostItem("train step as read", rows * d * itemsize, threads, "Zarr: up to 2 chunks; arrays: a view")
    return _with_runtime([
        *_items(_topk.queries_workspace(bq, d, itemsize), 1),
        CostItem("query block as read", bq * d * itemsize, 1, "until prepared"),
        read,
        *_items(_topk.steps_workspace(bq, rows, d, itemsize, cand), threads),
        CostItem("running top-k lists", _topk.lists_workspace(bq, k), threads + min(n_train_blocks, 8),
                 "per task and in the merge tree; the shared bound"),
    ], tasks=n_query_blocks * (n_train_blocks + n_train_blocks // 8 + 2) + n_train_blocks + 2)


def cost_gmm(rows, group, *, n_features, n_components, itemsize, threads, split_every=4, n_samples=0,
             covariance_type="full", chunk_rows=None, x_compressed=True):
    """Cost table of one plan of the EM pass (``rows``-row blocks, ``group`` components at once).

    ``chunk_rows``: the stored chunks' rows.  A block smaller than its chunk is read by
    reading the whole chunk (predict's reads, the starts' and the checks'), and
    decoding it too if ``x_compressed`` (measured: 8 MiB chunks, +8 MiB to read one
    row uncompressed, +16 MiB zstd).
    """
    d, K = n_features, n_components
    grouped = group < K
    if covariance_type == "full":
        full, grp = K * d * d * 8, group * d * d * 8
        # The driver holds theta_t's factors and covariances plus the concatenated factors
        # shared with the tasks (one key); at the M-step, the summed scatter and
        # theta_{t+1}'s covariances and factors (theta_t's are dropped first).
        items = [CostItem("parameters (driver)", 3 * full + (grp if grouped else 0) + 4 * K * d * 8, 1,
                          "factors, covariances, shared key / M-step")]
    else:
        cov = _cv.parameter_bytes(covariance_type, K, d)
        # Factors, covariances, the shared key's GEMM operand (2d x K, or P and its
        # (d, K) product), and theta_{t+1}'s at the M-step, beside the means; tied's
        # M-step also holds the summed d x d scatter and one d x d temporary at a time,
        # and its Cholesky an identity and the solve's output.
        copies = 7 if covariance_type == "tied" else 4
        items = [CostItem("parameters (driver)", copies * cov + 8 * K * d * 8, 1,
                          f"{covariance_type}: factors, covariances, shared key / M-step")]
    if grouped:
        items.append(CostItem("per-row log-sum-exp", 8 * n_samples, 2, "persisted between a group's passes"))
    items.append(CostItem("X block as read", rows * d * itemsize, 2 * threads, "zarr chunk + its decoded buffer"))
    if chunk_rows and rows < chunk_rows:
        items.append(CostItem("stored chunk, read whole", chunk_rows * d * itemsize, (1 + x_compressed) * threads,
                              "a block smaller than its chunk: the chunk as read" + (" and decoded" * x_compressed)))
    # predict / score / the kmeans and random starts make (block, K) arrays per block:
    # log-probabilities and a consumer's (responsibilities, distances, one-hot rows).
    items.append(CostItem("block x K arrays (predict, init)", rows * K * 8, 2 * threads,
                          "log-probabilities and their consumer's output"))
    items += _items(_cv.em_workspace(covariance_type, rows, group, n_features=d, n_components=K,
                                     itemsize=itemsize, grouped=grouped), threads)
    items.append(CostItem("sufficient statistics", _cv.stats_bytes(covariance_type, group, d),
                          threads + split_every + 1, "N, S1, S2: a task's accumulator, and in the tree"))
    # The graph: TASK_OVERHEAD a block (measured: a predict over 20000 rows in 312
    # blocks instead of 20 added 3.7 MiB; its six small tasks a block cost ~2 KiB each).
    return _with_runtime(items, tasks=math.ceil(n_samples / rows) if n_samples else 0)


def _largest(fits, lo, hi):
    """Largest integer b in [lo, hi] with fits(b), assuming monotone; None if none."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _grid(lo, hi):
    """Integers from ``lo`` to ``hi``, each about 1.25 times the last (both ends included)."""
    grid, b = [], lo
    while b < hi:
        grid.append(b)
        b = max(b + 1, int(b * 1.25))
    return grid + [hi]


def _largest_above_least(peak, budget, lo, hi):
    """Largest b in [lo, hi] with peak(b) <= budget, for a peak that falls then rises; None if none.

    Smaller blocks hold less but make more tasks (the graph): the least peak lies
    between the ends, found on a grid, and the fitting blocks run from there up.
    """
    least = min(_grid(lo, hi), key=lambda b: (peak(b), -b))
    return _largest(lambda b: peak(b) <= budget, least, hi) if peak(least) <= budget else None


def _too_small(op, budget, minimum, what):
    e = BudgetError(
        f"memory budget {format_bytes(budget)} is too small for {op}: even {what} needs "
        f"{format_bytes(minimum)}; give --memory-budget {math.ceil(minimum / 2**20)}MiB or more"
    )
    e.minimum = int(minimum)
    raise e


def plan(op, *, memory_budget=None, threads=None, **shape) -> Plan:
    """Plan block sizes for ``op`` inside a memory budget.

    Parameters
    ----------
    op : {"distances", "knn", "gmm"}
        The operation.
    memory_budget : int or str, optional
        Bytes above the idle process (see :func:`parse_budget`).
    threads : int, optional
        Tasks that run at once; default: the dask threads of the active scheduler.
    **shape
        ``distances``: ``n_x, n_y, n_features, itemsize=4, out_itemsize=None,
        upcast=False`` (and the stored chunks: ``x_chunk_rows, y_chunk_rows,
        x_compressed, y_compressed``).  ``knn``: ``n_query, n_train, n_features, k=5,
        itemsize=4, train_held=True`` (``False`` when the tasks hold a step of their
        training rows, not the block: Zarr and in-memory arrays).  ``gmm``:
        ``n_samples, n_features, n_components, itemsize=8, covariance_type="full"`` (and
        ``chunk_rows, x_compressed``).

    Returns
    -------
    Plan

    Raises
    ------
    BudgetError
        If the budget cannot be parsed, or is too small for even the smallest blocks;
        the message names the minimum budget that would do (also ``.minimum``, bytes).
        That minimum grows with the data: its rows, and the tasks of a graph.

    Examples
    --------
    >>> p = plan("knn", n_query=1000, n_train=50000, n_features=3072, memory_budget="1GiB", threads=2)
    >>> p["query_rows"]
    1000
    """
    budget = parse_budget(memory_budget)
    if threads is None:
        threads = dask_threads()
    threads = _positive("threads", threads)
    try:
        builder = _PLANNERS[op]
    except KeyError:
        raise BudgetError(f"unknown operation {op!r}; choose one of {sorted(_PLANNERS)}") from None
    return builder(budget, threads, **shape)


def _plan_distances(budget, threads, *, n_x, n_y, n_features, itemsize=4, out_itemsize=None,
                    upcast=False, x_chunk_rows=None, y_chunk_rows=None, x_compressed=True,
                    y_compressed=True):
    n_x, n_y, d = (_positive(n, v) for n, v in (("n_x", n_x), ("n_y", n_y), ("n_features", n_features)))
    out_itemsize = out_itemsize or (8 if upcast else max(itemsize, 4))
    blocks = lambda bq, bt: math.ceil(n_x / bq) * math.ceil(n_y / bt)

    def cost(bq, bt):
        return cost_distances(bq, bt, n_features=d, itemsize=itemsize, out_itemsize=out_itemsize,
                               threads=threads, upcast=upcast, x_chunk_rows=x_chunk_rows,
                               y_chunk_rows=y_chunk_rows, x_compressed=x_compressed,
                               y_compressed=y_compressed, n_blocks=blocks(bq, bt))

    peak = lambda bq, bt: sum(i.total for i in cost(bq, bt))
    square = lambda b: peak(min(b, n_x), min(b, n_y))
    # Smaller blocks need less memory each but make more of them (dask's bookkeeping):
    # the least total lies between; above it the total grows with the block size.
    grid, b = [], 1
    while b < max(n_x, n_y):
        grid.append(b)
        b = max(b + 1, int(b * 1.25))
    grid.append(max(n_x, n_y))
    least = min(grid, key=square)
    if square(least) > budget:
        _too_small("distances", budget, square(least), "its smallest plan")
    # Square blocks keep the GEMM efficient and the output chunks tidy; once one side
    # holds all its rows, the other grows alone.
    b = _largest(lambda b: square(b) <= budget, least, max(n_x, n_y))
    bq, bt = min(b, n_x), min(b, n_y)
    if bq == n_x and bt < n_y:
        bt = _largest(lambda t: peak(bq, t) <= budget, bt, n_y)
    elif bt == n_y and bq < n_x:
        bq = _largest(lambda q: peak(q, bt) <= budget, bq, n_x)
    bq, bt = align_rows(bq, x_chunk_rows, n_x), align_rows(bt, y_chunk_rows, n_y)
    params = {"query_rows": bq, "train_rows": bt, "blocks": blocks(bq, bt)}
    return Plan("distances", budget, threads, params, cost(bq, bt),
                {"n_x": n_x, "n_y": n_y, "n_features": d, "itemsize": itemsize})


def _plan_knn(budget, threads, *, n_query, n_train, n_features, k=5, itemsize=4, train_held=True):
    n_q, n_t, d = (_positive(n, v) for n, v in (("n_query", n_query), ("n_train", n_train), ("n_features", n_features)))
    k = _positive("k", k)

    def cost(bq, bt, step=None):
        return cost_knn(bq, bt, n_features=d, itemsize=itemsize, k=k, threads=threads,
                         n_train_blocks=math.ceil(n_t / bt), n_query_blocks=math.ceil(n_q / bq), step=step,
                         train_held=train_held)

    peak = lambda bq, bt, step=None: sum(i.total for i in cost(bq, bt, step))
    # The least memory: one-row steps in the blocks that make the fewest tasks for what
    # they hold (square ones if a task holds its training block, else all of it).
    pairs = ([(min(b, n_q), min(b, n_t)) for b in _grid(1, max(n_q, n_t))] if train_held
             else [(q, n_t) for q in _grid(1, n_q)])
    lq, lt = min(pairs, key=lambda qt: peak(*qt, 1))
    if peak(lq, lt, 1) > budget:
        what = ("one query row against one train row" if (lq, lt) == (1, 1) else
                f"its smallest plan ({lq} query rows x {lt} train rows, steps of one row)")
        _too_small("knn", budget, peak(lq, lt, 1), what)
    # Reading the training set is the dominant I/O: keep every query in one block when
    # that still leaves train blocks (steps) large enough for an efficient GEMM, so
    # the training set is read exactly once.
    min_bt = min(n_t, 256)
    # More train blocks than threads keeps both threads busy and the reads overlapped
    # with the GEMMs, at no cost in memory.
    wide = min(n_t, max(min_bt, math.ceil(n_t / (4 * threads))))
    cap = lambda q: min(_topk.step_rows(q, d, itemsize), n_t)  # the kernel's own step
    if train_held:
        bq = _largest_above_least(lambda q: peak(q, min_bt), budget, 1, n_q)
        if bq is None or bq < n_q:
            # Balance: square-ish blocks read the train set ceil(n_q / bq) times.
            b = _largest_above_least(lambda b: peak(min(b, n_q), min(b, n_t)), budget, 1, max(n_q, n_t))
            bq = lq if b is None else min(b, n_q)
        bt = _largest_above_least(lambda t: peak(bq, t), budget, 1, n_t)
        step = cap(bq)
        if bt is None:  # the least plan's blocks, with the steps the budget leaves
            bq, bt = lq, lt
            step = _largest(lambda s: peak(bq, bt, s) <= budget, 1, cap(bq))
        bt = min(bt, wide)
    else:
        # The tasks hold a step, not their block: blocks cost nothing but tasks, and the
        # steps narrow as the budget requires.  `wide` train blocks keep the threads
        # busy; at the least, the query blocks do, one train block each (fewer tasks).
        if peak(n_q, wide, min(min_bt, cap(n_q))) <= budget:
            bq, bt = n_q, wide
        else:  # balance: steps about as wide as the query blocks
            bt = n_t
            bq = _largest_above_least(lambda q: peak(q, bt, min(q, cap(q))), budget, 1, n_q) or lq
        step = _largest(lambda s: peak(bq, bt, s) <= budget, 1, cap(bq))
        if bt > wide and peak(bq, wide, step) <= budget:
            bt = wide  # train blocks for the threads too, when their tasks fit
    params = {"query_rows": bq, "train_rows": bt, "step": step,
              "train_reads": math.ceil(n_q / bq)}
    return Plan("knn", budget, threads, params, cost(bq, bt, step),
                {"n_query": n_q, "n_train": n_t, "n_features": d, "k": k, "itemsize": itemsize})


def _plan_gmm(budget, threads, *, n_samples, n_features, n_components, itemsize=8, chunk_rows=None,
              covariance_type="full", x_compressed=True, component_group=None, workers=1, sharded=None,
              order=None):
    n, d, K = (_positive(nm, v) for nm, v in (("n_samples", n_samples), ("n_features", n_features), ("n_components", n_components)))
    try:
        _cv.check_type(covariance_type)
    except ValueError as e:
        raise BudgetError(str(e)) from None

    def cost(rows, group):
        return cost_gmm(rows, group, n_features=d, n_components=K, itemsize=itemsize, threads=threads,
                         n_samples=n, covariance_type=covariance_type, chunk_rows=chunk_rows,
                         x_compressed=x_compressed)

    peak = lambda rows, group: sum(i.total for i in cost(rows, group))
    # Smaller blocks need less memory each but make more of them (dask's bookkeeping),
    # and a block smaller than its stored chunk reads the whole chunk: the least peak
    # for a group is at the block sizes of this grid (its least point `best`).
    grid = _grid(1, n) + ([chunk_rows] if chunk_rows and chunk_rows < n else [])
    best = lambda group: min(grid, key=lambda r: (peak(r, group), -r))
    # Aim for row blocks of at least 1024 rows (GEMM efficiency); shrink the component
    # group before the rows, the rows only when one component alone does not fit.
    target = min(n, 1024)
    # Only full covariances are sharded by component: the others' parameters and
    # statistics are K x d (tied: one d x d), not K x d x d.
    group = K
    if covariance_type != "full" and peak(target, K) > budget and peak(best(K), K) > budget:
        _too_small("gmm", budget, peak(best(K), K), f"its smallest blocks with all {K} components "
                   f"({covariance_type})")
    if covariance_type == "full":
        # All parameters in one process while they fit beside blocks of `target` rows
        # (or of 64 at least); else (or when the caller asks for groups or for
        # sharding) sharded by component, never whole in one process.
        whole = peak(target, K) <= budget or (peak(best(K), K) <= budget
                                              and peak(max(best(K), min(n, 64)), K) <= budget)
        if sharded is not False and (sharded or component_group is not None or not whole):
            return _plan_gmm_sharded(budget, threads, n=n, d=d, K=K, itemsize=itemsize, chunk_rows=chunk_rows,
                                     x_compressed=x_compressed, component_group=component_group, workers=workers,
                                     order=order)
    if peak(best(group), group) > budget:  # full, whole, asked not to shard
        _too_small("gmm", budget, peak(best(group), group), f"its smallest blocks with all {K} components "
                   "(unsharded)")
    fits = lambda r: peak(r, group) <= budget
    # Whole stored chunks first; else the largest block above the least peak.
    if chunk_rows and chunk_rows < n and fits(chunk_rows):
        rows = _largest(fits, chunk_rows, n)
    else:
        low = best(group)
        rows = _largest(fits, low, n if not chunk_rows or low >= chunk_rows else min(n, chunk_rows - 1))
    # Enough blocks to keep every thread busy and the tree shallow; whole stored chunks
    # per block (a block straddling chunks decodes up to two more), if that still fits.
    even = align_rows(min(rows, max(target, math.ceil(n / (4 * threads)))), chunk_rows, n)
    rows = even if fits(even) else align_rows(rows, chunk_rows, n)
    params = {"rows": rows, "component_group": K, "component_groups": 1, "sharded": False, "passes": 1}
    return Plan("gmm", budget, threads, params, cost(rows, K),
                {"n_samples": n, "n_features": d, "n_components": K, "itemsize": itemsize,
                 "covariance_type": covariance_type})


#: Sets of statistics one task of a sharded M-step's tree sums (each g (d^2 + d + 1)
#: floats, 800 MB a component at d = 10 000): pairs keep the tree's tasks small.
M_SPLIT_EVERY = 2


def cost_gmm_sharded(rows, group, *, n_samples, n_features, n_components, itemsize, threads, order="rows",
                     m_runs=1, chunk_rows=None, x_compressed=True, workers=1, m_split_every=M_SPLIT_EVERY):
    """Cost table of one process of the sharded EM pass (:mod:`pipeline.shards`).

    ``rows``-row blocks, ``group`` components per task group; ``order`` ``"rows"`` (a
    task holds a row block, the groups stream past) or ``"groups"`` (a task holds a
    group, the row blocks stream past); ``m_runs`` row runs per group in the M-step,
    whose statistics meet in a tree of ``m_split_every`` parts a task.  The driver
    holds O(K d) numbers.
    """
    n, d, K = n_samples, n_features, n_components
    g = min(group, K)
    r = min(_g.PRUNE_DIRECTIONS, d - 1)
    f8 = 8
    prune = K >= _g.PRUNE_MIN_COMPONENTS and d <= _g.PRUNE_MAX_FEATURES
    slice_rows = min(rows, _g.prune_rows(d) if prune else _g.inner_rows(d))
    inner = min(rows, _g.inner_rows(d))
    stats = _g.stats_bytes(g, d)
    x_block = rows * d * itemsize + (rows * d * f8 if itemsize != 8 else 0)
    # E task: its block, the group's factors as read and concatenated (+ bound
    # directions), the log-densities it writes, the rows' bounds, one slice's buffers.
    e_logp = rows * (K if order == "rows" else g) * f8
    e_task = (x_block + 2 * g * (d + 1) * d * f8 + 2 * g * d * r * f8 + e_logp
              + (2 * rows * K * f8 if prune else 0)
              + slice_rows * (2 * d + 2 + 5 * g + g * r) * f8 + inner * (d + 1 + min(g, _g.gemm_group(K, d)) * d) * f8)
    e_task += 2 * rows * K * f8 if order == "rows" else 0  # the log-sum-exp's two (rows, K) temporaries
    if order == "groups":  # the log-sum-exp pass reads a row block's K log-densities, two temporaries
        e_task = max(e_task, 3 * rows * K * f8)
    # M task: its block, responsibilities (read and exponentiated), the weighted rows,
    # a gathered copy, the group's statistics it accumulates.
    m_task = x_block + 3 * rows * g * f8 + 2 * rows * d * f8 + stats
    # The starts' M tasks: random responsibilities for all K (normalised per row), or
    # k-means labels (distances to all K centres) and one block's statistics beside the sum.
    m_task += max(2 * rows * K * f8, rows * K * f8 + stats)
    # The runs' statistics meet in a tree: a sum task holds its parts and their sum.
    # The group's task: the summed statistics, covariances, factors, one SVD's copy of
    # the factors (the pruning bounds).
    m_sum = (min(m_runs, m_split_every) + 1) * stats if m_runs > 1 else 0
    m_group = stats + 3 * g * d * d * f8 + 2 * g * d * r * f8
    if workers > 1:  # statistics from another worker: their frames, then the array
        m_sum += 2 * stats if m_runs > 1 else 0
        m_group += 2 * stats
    e_phase = threads * e_task
    at_once = min(threads, m_runs)
    m_phase = max(at_once * m_task, max(m_sum, m_group) + (at_once - 1) * m_task,
                  at_once * m_sum if m_runs > m_split_every else 0)
    # The driver writes a start (given arrays, one row per component) and the fitted
    # precisions a group at a time: the group's covariances, factors and temporaries.
    w_phase = 4 * g * d * d * f8
    # The phases run one after the other: the largest counts, the others are listed (x 0).
    top = max(e_phase, m_phase, w_phase)
    items = [
        CostItem("parameters (driver)", 8 * K * d * f8 + 16 * K * f8, 1,
                 "O(K d): means, weights, log-dets, bounds' terms; never K d^2"),
        CostItem("E-step task (block x group)", e_task, threads if e_phase == top else 0,
                 f"order {order}: X block, {g} factors, log-densities, bounds"),
        CostItem("M-step runs + group's sum", m_phase, 1 if m_phase == top and e_phase != top else 0,
                 f"{at_once} run(s) of one group at once, then its new parameters"),
        CostItem("driver writing a group", w_phase, 1 if w_phase == top and top not in (e_phase, m_phase) else 0,
                 "a start or the precisions, one group at a time"),
    ]
    if chunk_rows and rows < chunk_rows:
        items.append(CostItem("stored chunk, read whole", chunk_rows * d * itemsize, (1 + x_compressed) * threads,
                              "a block smaller than its chunk"))
    n_blocks = math.ceil(n / rows)
    n_groups = math.ceil(K / g)
    return _with_runtime(items, tasks=n_blocks * (1 if order == "rows" else 2) + n_groups * (1 + m_runs) + n_blocks)


def e_runs(n_blocks, n_groups, tasks):
    """Row runs per component group of a "groups"-order E-step: enough tasks for the threads, twice over."""
    return min(n_blocks, max(1, math.ceil(2 * tasks / n_groups)))


def sharded_traffic(rows, group, order, *, n_samples, n_features, n_components, itemsize, m_runs=1, tasks=None):
    """Per EM iteration of the sharded pass: reads of X and of the factors, and the bytes moved.

    ``m_runs``: the M-step's row runs per group; ``tasks``: the tasks that run at once
    (threads of every worker, default ``m_runs``), which set the row runs of a
    "groups"-order E-step (:func:`e_runs`).
    """
    n, d, K = n_samples, n_features, n_components
    n_blocks, n_groups = math.ceil(n / rows), math.ceil(K / group)
    x, p, logp = n * d * itemsize, K * d * (d + 1) * 8, n * K * 8
    if order == "rows":
        e_x, e_p, e_logp = 1, n_blocks, 1
    else:
        e_x, e_p, e_logp = n_groups, e_runs(n_blocks, n_groups, tasks or m_runs), 2  # written, read back for the lse
    m_x = n_groups
    return {"x_reads": e_x + m_x, "param_reads": e_p, "x_bytes": (e_x + m_x) * x, "param_bytes": e_p * p,
            "scratch_bytes": (e_logp + 1) * logp + (1 + n_groups) * n * 8,
            "written_bytes": 2 * K * d * d * 8 + logp,
            "bytes": (e_x + m_x) * x + e_p * p + (e_logp + 1) * logp + 2 * K * d * d * 8}


def _plan_gmm_sharded(budget, threads, *, n, d, K, itemsize, chunk_rows, x_compressed, component_group=None,
                      workers=1, order=None):
    """The sharded EM plan: the group size, row blocks and order that move the fewest bytes.

    ``order`` forces one order: ``"rows"`` for a prediction (a task holds all K
    log-densities of its rows) or an X computed by dask (a "groups" E-step would keep
    every block it computed until the last group has read it).
    """
    workers = _positive("workers", workers)
    if order not in (None, "rows", "groups"):
        raise BudgetError(f"order={order!r}: use 'rows' or 'groups' (or None: the one moving fewer bytes)")
    orders = (order,) if order else ("rows", "groups")
    tasks = threads * workers
    m_runs_of = lambda rows: min(math.ceil(n / rows), tasks)

    def cost(rows, g, order):
        return cost_gmm_sharded(rows, g, n_samples=n, n_features=d, n_components=K, itemsize=itemsize,
                                threads=threads, order=order, m_runs=m_runs_of(rows), chunk_rows=chunk_rows,
                                x_compressed=x_compressed, workers=workers)

    peak = lambda rows, g, order: sum(i.total for i in cost(rows, g, order))
    # Blocks for every thread of the cluster, twice over (the E tasks of "rows" order).
    most_rows = max(1, math.ceil(n / (2 * tasks)))
    groups = [min(int(component_group), K)] if component_group is not None else _grid(1, K)
    best = None
    for g in groups:
        for order in orders:
            rows = _largest_above_least(lambda r: peak(r, g, order), budget, 1, most_rows)
            if rows is None:
                continue
            if chunk_rows and rows >= chunk_rows:
                rows = align_rows(rows, chunk_rows, n)
                if peak(rows, g, order) > budget:
                    continue
            t = sharded_traffic(rows, g, order, n_samples=n, n_features=d, n_components=K, itemsize=itemsize,
                                m_runs=m_runs_of(rows), tasks=tasks)
            # Blocks of 2048 rows or more where they fit (the GEMMs' efficiency), then
            # the fewest bytes moved, then fewer, larger tasks.
            rank = (rows < min(most_rows, 2048), t["bytes"], -rows, -g)
            if best is None or rank < best[0]:
                best = (rank, rows, g, order, t)
    if best is None:
        g = groups[0] if component_group is not None else 1
        least = min((peak(r, g, o), r, o) for r in _grid(1, most_rows) for o in orders)
        _too_small("gmm", budget, least[0], f"one component at a time (sharded parameters, {least[1]}-row blocks)"
                   if g == 1 else f"{g} components at a time (sharded parameters)")
    _, rows, g, order, t = best
    n_groups = math.ceil(K / g)
    params = {"rows": rows, "component_group": g, "component_groups": n_groups, "sharded": True, "order": order,
              "m_runs": m_runs_of(rows), "m_split_every": M_SPLIT_EVERY,
              "e_runs": e_runs(math.ceil(n / rows), n_groups, tasks),
              "workers": workers, "passes": 1 + n_groups, **t}
    return Plan("gmm", budget, threads, params, cost(rows, g, order),
                {"n_samples": n, "n_features": d, "n_components": K, "itemsize": itemsize,
                 "covariance_type": "full"})


def sharded_report(p, gemm_rate=None):
    """What a sharded EM plan does per iteration, in lines: memory per worker, reads, store, flops, time.

    ``gemm_rate``: float64 GEMM FLOP/s of one thread (measured at the E-step's shape,
    :func:`pipeline.runtime.rates.gemm_rate`); the projection counts scikit-learn's
    4 n K d^2 dense-equivalent flops over every thread of every worker, without pruning.
    """
    n, d, K = p.shape["n_samples"], p.shape["n_features"], p.shape["n_components"]
    workers, threads = p["workers"], p.threads
    flops = 4 * n * K * d * d
    store = 3 * K * d * d * 8 + 2 * (2 * K * d * d * 8) + n * K * 8 + n * 8
    lines = [
        f"  sharded parameters: {K} components in {p['component_groups']} groups of {p['component_group']}; "
        f"{p['rows']}-row blocks; order {p['order']} "
        f"({'row blocks resident, groups streamed' if p['order'] == 'rows' else 'groups resident, X streamed'})",
        f"  per worker: peak {format_bytes(p.peak)} of {format_bytes(p.budget)} ({workers} worker(s) x {threads} "
        f"thread(s)); the driver holds {format_bytes(p.items[0].total)}",
        f"  per iteration: X read {p['x_reads']} times ({format_bytes(p['x_bytes'])}), factors read "
        f"{p['param_reads']} times ({format_bytes(p['param_bytes'])}), scratch log-densities "
        f"{format_bytes(n * K * 8)} written once and read {'twice' if p['order'] == 'groups' else 'once'}; "
        f"{format_bytes(p['bytes'])} moved",
        f"  model store on disk: {format_bytes(store)} (model, two iteration checkpoints, scratch)",
        f"  flops per iteration: {flops:.3g} (4 n K d^2, scikit-learn's dense count)",
    ]
    if gemm_rate:
        secs = flops / (gemm_rate * workers * threads)
        lines.append(f"  projected: {secs:,.0f} s per iteration ({secs / 3600:.2f} h) at {gemm_rate / 1e9:.1f} GFLOP/s "
                     f"per thread (float64 GEMM measured here) x {workers * threads} threads; pruning on "
                     "separated clusters lowers it")
    return "\n".join(lines)


_PLANNERS = {"distances": _plan_distances, "knn": _plan_knn, "gmm": _plan_gmm}
