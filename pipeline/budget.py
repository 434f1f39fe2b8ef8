"""Memory budgets: byte sizes, per-operation cost models and chunk plans.

The budget is the most memory an operation may add to one process above its idle
footprint (for a cluster: per worker).  Each operation has an explicit cost model: the
bytes one task holds while it runs, times the number of tasks alive at once, plus what
all tasks share (parameters) and a fixed runtime overhead.  A kernel's own buffers are
stated by the kernel module beside the code that allocates them
(``kernels.distances.block_workspace``, ``kernels.topk.steps_workspace``,
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
from .kernels import topk as _topk
from .runtime import RUNTIME_OVERHEAD, TASK_OVERHEAD, dask_threads
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
        ``component_group`` (gmm), plus derived counts such as ``passes``.
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
    items += [
        CostItem("graph", 3 * n_blocks * TASK_OVERHEAD, 1, "dask's bookkeeping, 3 tasks a block"),
        CostItem("runtime", RUNTIME_OVERHEAD, 1, "threads, BLAS buffers, zarr I/O"),
    ]
    return items


def cost_knn(bq, bt, *, n_features, itemsize, k, threads, n_train_blocks):
    """Cost table of one plan of :func:`pipeline.kneighbors` (``bq`` x ``bt`` blocks)."""
    d = n_features
    cand = k + 2 + k // 8  # k + neighbors' default margin
    # Steps read from Zarr are rounded to whole chunks (neighbors._read_step): at most
    # twice the kernel's step.
    step = min(bt, 2 * _topk.step_rows(bq, d, itemsize))
    return [
        *_items(_topk.queries_workspace(bq, d, itemsize), 1),
        CostItem("query block as read", bq * d * itemsize, 1, "until prepared"),
        CostItem("train block", bt * d * itemsize, threads,
                 "an array input's block; Zarr inputs are read a step (up to 2 chunks) at a time"),
        *_items(_topk.steps_workspace(bq, step, d, itemsize, cand), threads),
        CostItem("running top-k lists", _topk.lists_workspace(bq, k), threads + min(n_train_blocks, 8),
                 "per task and in the merge tree; the shared bound"),
        CostItem("runtime", RUNTIME_OVERHEAD, 1, "threads, BLAS buffers, zarr I/O"),
    ]


def cost_gmm(rows, group, *, n_features, n_components, itemsize, threads, split_every=4, n_samples=0,
             covariance_type="full"):
    """Cost table of one plan of the EM pass (``rows``-row blocks, ``group`` components at once)."""
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
    # predict / score / the kmeans and random starts make (block, K) arrays per block:
    # log-probabilities and a consumer's (responsibilities, distances, one-hot rows).
    items.append(CostItem("block x K arrays (predict, init)", rows * K * 8, 2 * threads,
                          "log-probabilities and their consumer's output"))
    items += _items(_cv.em_workspace(covariance_type, rows, group, n_features=d, n_components=K,
                                     itemsize=itemsize, grouped=grouped), threads)
    items += [
        CostItem("sufficient statistics", _cv.stats_bytes(covariance_type, group, d), threads + split_every + 1,
                 "N, S1, S2: a task's accumulator, and in the tree"),
        CostItem("runtime", RUNTIME_OVERHEAD, 1, "threads, BLAS buffers, zarr I/O"),
    ]
    return items


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


def _too_small(op, budget, minimum, what):
    raise BudgetError(
        f"memory budget {format_bytes(budget)} is too small for {op}: even {what} needs "
        f"{format_bytes(minimum)}; give --memory-budget {math.ceil(minimum / 2**20)}MiB or more"
    )


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
        upcast=False``.  ``knn``: ``n_query, n_train, n_features, k=5, itemsize=4``.
        ``gmm``: ``n_samples, n_features, n_components, itemsize=8, covariance_type="full"``.

    Returns
    -------
    Plan

    Raises
    ------
    BudgetError
        If the budget cannot be parsed, or is too small for even one row; the message
        names the minimum budget that would do.

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


def _plan_knn(budget, threads, *, n_query, n_train, n_features, k=5, itemsize=4):
    n_q, n_t, d = (_positive(n, v) for n, v in (("n_query", n_query), ("n_train", n_train), ("n_features", n_features)))
    k = _positive("k", k)

    def cost(bq, bt):
        return cost_knn(bq, bt, n_features=d, itemsize=itemsize, k=k, threads=threads,
                         n_train_blocks=math.ceil(n_t / bt))

    peak = lambda bq, bt: sum(i.total for i in cost(bq, bt))
    if peak(1, 1) > budget:
        _too_small("knn", budget, peak(1, 1), "one query row against one train row")
    # Reading the training set is the dominant I/O: keep every query in one block when
    # that still leaves train blocks large enough for an efficient GEMM, so the
    # training set is read exactly once.
    min_bt = min(n_t, 256)
    bq = _largest(lambda q: peak(q, min_bt) <= budget, 1, n_q)
    if bq is None or bq < n_q:
        # Balance: square-ish blocks read the train set ceil(n_q / bq) times.
        b = _largest(lambda b: peak(min(b, n_q), min(b, n_t)) <= budget, 1, max(n_q, n_t))
        bq = min(b, n_q)
    bt = _largest(lambda t: peak(bq, t) <= budget, 1, n_t)
    # More train blocks than threads keeps both threads busy and the reads overlapped
    # with the GEMMs, at no cost in memory.
    bt = min(bt, max(min_bt, math.ceil(n_t / (4 * threads))))
    params = {"query_rows": bq, "train_rows": bt,
              "train_reads": math.ceil(n_q / bq)}
    return Plan("knn", budget, threads, params, cost(bq, bt),
                {"n_query": n_q, "n_train": n_t, "n_features": d, "k": k, "itemsize": itemsize})


def _plan_gmm(budget, threads, *, n_samples, n_features, n_components, itemsize=8, chunk_rows=None,
              covariance_type="full"):
    n, d, K = (_positive(nm, v) for nm, v in (("n_samples", n_samples), ("n_features", n_features), ("n_components", n_components)))
    try:
        _cv.check_type(covariance_type)
    except ValueError as e:
        raise BudgetError(str(e)) from None

    def cost(rows, group):
        return cost_gmm(rows, group, n_features=d, n_components=K, itemsize=itemsize, threads=threads,
                         n_samples=n, covariance_type=covariance_type)

    peak = lambda rows, group: sum(i.total for i in cost(rows, group))
    # Aim for row blocks of at least 1024 rows (GEMM efficiency); shrink the component
    # group before the rows, the rows only when one component alone does not fit.
    target = min(n, 1024)
    # Only full covariances are split into component groups: the others' parameters
    # and statistics are K x d (tied: one d x d), not K x d x d.
    smallest = 1 if covariance_type == "full" else K
    group = _largest(lambda g: peak(target, g) <= budget, smallest, K)
    if group is None and covariance_type != "full":
        if peak(1, K) > budget:
            _too_small("gmm", budget, peak(1, K), f"one row with all {K} components ({covariance_type})")
        group = K
    if group is None:
        group = 1
        if peak(1, 1) > budget:
            what = "one row with one component"
            held = next(i.total for i in cost(1, 1) if i.name.startswith("parameters"))
            if held > peak(1, 1) / 2:  # say what dominates: K d^2 parameters, not X
                what += (f" (the parameters of all {K} components, three {K} x {d} x {d} float64 arrays held in "
                         f"the driver, are {format_bytes(held)} of it)")
            _too_small("gmm", budget, peak(1, 1), what)
    rows = _largest(lambda r: peak(r, group) <= budget, 1, n)
    # Enough blocks to keep every thread busy and the tree shallow.
    rows = min(rows, max(target, math.ceil(n / (4 * threads))))
    # Whole stored chunks per block: a block straddling chunks decodes up to two more.
    rows = align_rows(rows, chunk_rows, n)
    n_groups = math.ceil(K / group)
    params = {"rows": rows, "component_group": group, "component_groups": n_groups,
              "passes": 1 if n_groups == 1 else 2 * n_groups}
    return Plan("gmm", budget, threads, params, cost(rows, group),
                {"n_samples": n, "n_features": d, "n_components": K, "itemsize": itemsize,
                 "covariance_type": covariance_type})


_PLANNERS = {"distances": _plan_distances, "knn": _plan_knn, "gmm": _plan_gmm}
