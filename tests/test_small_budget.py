"""Budget honesty at the small end: the minimum a job needs grows with its data.

No buffer of a fixed size sets a floor any more: the k-NN GEMM steps are planned
(``plan("knn")["step"]``, at most ``kernels.topk.step_rows``) and shrink with the
budget, the exact re-rank's gathered rows are counted for the candidates a step can
have, and the runtime's own memory is measured (``runtime.runtime_overhead``: a few
MiB for tiny blocks, the old 20 MiB only for large ones).  The issue's case (issue 14,
point 5): 300 x 3000 x 256 float32, k=5, 32 MiB used to be refused ("even one query row
against one train row needs 32.01 MiB").
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import pipeline as pl
from conftest import run_measured, record_step_widths
from pipeline.budget import parse_budget, plan
from pipeline.errors import BudgetError
from pipeline.kernels import topk

MiB = 2**20

ISSUE_SETUP = """
import numpy as np, pipeline as pl
rng = np.random.default_rng(0)
Xq = rng.standard_normal((300, 256), dtype=np.float32)
Xtr = rng.standard_normal((3000, 256), dtype=np.float32)
"""


def issue_arrays():
    # Random floats: no exact ties, so the reference order is unique.
    rng = np.random.default_rng(0)
    return rng.standard_normal((300, 256), dtype=np.float32), rng.standard_normal((3000, 256), dtype=np.float32)


def brute(Xq, Xtr, k):
    """Exact float64 brute force: distances and the k nearest, by a stable sort."""
    from scipy.spatial.distance import cdist

    D = cdist(Xq.astype(np.float64), Xtr.astype(np.float64))
    ind = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, ind, 1), ind


def minimum(call):
    """The minimum budget (bytes) a BudgetError names for ``call(budget)`` at 1 byte."""
    with pytest.raises(BudgetError, match=r"too small .* give --memory-budget \d+MiB or more") as e:
        call(1)
    assert e.value.minimum is not None
    return e.value.minimum


@pytest.mark.parametrize("budget", ["32MiB", "8MiB"])
def test_issue_case_runs_and_equals_brute_force(budget):
    Xq, Xtr = issue_arrays()
    dist, ind = pl.kneighbors(Xq, Xtr, n_neighbors=5, memory_budget=budget)
    ref_d, ref_i = brute(Xq, Xtr, 5)
    np.testing.assert_array_equal(ind, ref_i)
    # Exact float64 differences of float32 values, summed in another order than cdist's.
    np.testing.assert_allclose(dist, ref_d, rtol=1e-12)
    from sklearn.neighbors import NearestNeighbors

    sk_d, sk_i = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(Xtr).kneighbors(Xq)
    np.testing.assert_array_equal(ind, sk_i)
    np.testing.assert_allclose(dist, sk_d, rtol=1e-5)  # scikit-learn computes float32 distances


def test_steps_are_planned_and_shrink_with_the_budget(monkeypatch):
    """The tasks step through their blocks in the plan's steps, far below the old 256-row floor."""
    Xq, Xtr = issue_arrays()
    widths = record_step_widths(monkeypatch)
    shape = dict(n_query=300, n_train=3000, n_features=256, k=5, itemsize=4, threads=pl.runtime.dask_threads(),
                 train_held=False)
    big, small = plan("knn", memory_budget="1GiB", **shape), plan("knn", memory_budget="8MiB", **shape)
    assert big["step"] == min(topk.step_rows(big["query_rows"], 256, 4), 3000)  # today's step, unchanged
    assert small["step"] < 64 and small.peak <= 8 * MiB
    pl.kneighbors(Xq, Xtr, n_neighbors=5, memory_budget="8MiB")
    assert max(widths) == small["step"] and sum(widths) == 3000 * small["train_reads"]


def test_knn_at_one_gib_is_planned_as_before():
    # K1 at 1 GiB: the blocks, the step the tasks always took and the predicted peak of
    # before the steps were planned (348386880 bytes = 332.2 MiB).
    p = plan("knn", n_query=1000, n_train=50000, n_features=3072, k=5, itemsize=4, memory_budget="1GiB",
             threads=2)
    assert (p["query_rows"], p["train_rows"], p["step"], p["train_reads"]) == (1000, 6250, 1174, 1)
    assert p["step"] == topk.step_rows(1000, 3072, 4)
    assert p.peak == 348386880


@pytest.mark.parametrize("op", ["knn", "distances", "gmm"])
def test_minimum_grows_with_the_data(op):
    """The minimum named for a tiny budget: small for one row, larger for more data."""
    def job(scale):
        if op == "knn":
            return dict(n_query=300 * scale, n_train=3000 * scale, n_features=256 * scale, k=5, itemsize=4)
        if op == "distances":
            return dict(n_x=300 * scale, n_y=3000 * scale, n_features=256 * scale, itemsize=4)
        return dict(n_samples=3000 * scale, n_features=64 * scale, n_components=4, itemsize=8)

    one = {"knn": dict(n_query=1, n_train=1, n_features=64, k=1, itemsize=4),
           "distances": dict(n_x=1, n_y=1, n_features=64, itemsize=4),
           "gmm": dict(n_samples=1, n_features=64, n_components=1, itemsize=8)}[op]
    least = {name: minimum(lambda b, s=shape: plan(op, memory_budget=b, threads=2, **s))
             for name, shape in (("one row", one), ("x1", job(1)), ("x4", job(4)))}
    print(op, {name: f"{v / MiB:.2f} MiB" for name, v in least.items()})
    # A 1-row job needs what the runtime itself adds, a few MiB (it was 20-32 MiB).
    assert least["one row"] < 8 * MiB
    # More data, more memory: each minimum is larger by at least 1 MiB.
    assert least["one row"] + MiB < least["x1"] and least["x1"] + MiB < least["x4"]
    # The minimum named is one that works.
    for shape in (one, job(1), job(4)):
        m = minimum(lambda b, s=shape: plan(op, memory_budget=b, threads=2, **s))
        assert plan(op, memory_budget=math.ceil(m / MiB) * MiB, threads=2, **shape).peak <= math.ceil(m / MiB) * MiB


def test_kneighbors_names_a_minimum_that_runs():
    Xq, Xtr = issue_arrays()
    m = minimum(lambda b: pl.kneighbors(Xq, Xtr, n_neighbors=5, memory_budget=b))
    assert m < 16 * MiB
    dist, ind = pl.kneighbors(Xq, Xtr, n_neighbors=5, memory_budget=m)
    np.testing.assert_array_equal(ind, brute(Xq, Xtr, 5)[1])


@pytest.mark.parametrize("budget", ["32MiB", "8MiB"])
def test_issue_case_stays_inside_its_budget(budget):
    """Measured: peak RSS of a fresh process above an idle one that made the same arrays."""
    grew, out = run_measured(f"""
        dist, ind = pl.kneighbors(Xq, Xtr, n_neighbors=5, memory_budget={budget!r})
        print("SHAPE", ind.shape)
    """, setup=ISSUE_SETUP)
    assert "SHAPE (300, 5)" in out
    print(f"issue case at {budget}: +{grew / MiB:.1f} MiB")
    assert grew <= parse_budget(budget), f"grew by {grew / MiB:.1f} MiB"


def test_one_row_jobs_stay_inside_their_smallest_budgets(tmp_path):
    """Each operation run from Zarr by the command line at the least budget it accepts."""
    rng = np.random.default_rng(1)
    q, t, g = (str(tmp_path / f"{n}.zarr") for n in "qtg")
    pl.write_dataset(q, rng.standard_normal((1, 64), dtype=np.float32))
    pl.write_dataset(t, rng.standard_normal((1, 64), dtype=np.float32))
    pl.write_dataset(g, rng.standard_normal((1, 64)))
    model = str(tmp_path / "m.zarr")
    least = {
        "knn": minimum(lambda b: pl.neighbors.write_knn(q, t, str(tmp_path / "k.zarr"), k=1, memory_budget=b)),
        "distances": minimum(lambda b: pl.distances.write_distances(q, t, str(tmp_path / "d.zarr"), memory_budget=b)),
        "gmm fit": minimum(lambda b: pl.mixture.fit_to_store(g, model, n_components=1, memory_budget=b)),
    }
    assert max(least.values()) < 8 * MiB
    commands = {
        "knn": ["knn", q, t, str(tmp_path / "k.zarr"), "--k", "1"],
        "distances": ["distances", q, t, str(tmp_path / "d.zarr")],
        "gmm fit": ["gmm", "fit", g, model, "--n-components", "1", "--max-iter", "3"],
        "gmm predict": ["gmm", "predict", model, g, str(tmp_path / "p.zarr")],
    }
    least["gmm predict"] = least["gmm fit"]  # the same plan (predict's blocks are the fit's)
    for op, argv in commands.items():
        budget = least[op]
        grew, _ = run_measured(f"""
            import pipeline.cli
            assert pipeline.cli.main({[*argv, "--memory-budget", str(budget), "--no-progress"]!r}) == 0
        """, imports="import pipeline, numpy, dask.array, zarr, pipeline.cli, pipeline.mixture")
        print(f"{op}: smallest budget {budget / MiB:.2f} MiB, measured +{grew / MiB:.2f} MiB")
        assert grew <= budget, (op, grew, budget)


def test_fallback_passes_keep_the_plans_query_blocks(monkeypatch):
    """Exact ties send queries to the wide and exact passes: in blocks no larger than the plan's."""
    from pipeline.neighbors import search as neighbors

    rng = np.random.default_rng(2)
    Y = np.repeat(rng.integers(0, 3, (40, 8)).astype(np.float32), 25, axis=0)  # every row 25 times
    X = rng.integers(0, 3, (200, 8)).astype(np.float32)
    seen = []
    real = neighbors._records_graph

    def spy(*args, query_blocks, exact=False, **kw):
        seen.append((exact, kw.get("margin"), max(b - a for a, b in query_blocks)))
        return real(*args, query_blocks=query_blocks, exact=exact, **kw)

    monkeypatch.setattr(neighbors, "_records_graph", spy)
    dist, ind = pl.kneighbors(X, Y, n_neighbors=5, query_rows=16)
    assert len(seen) == 3, seen  # the main pass, the wide margin, the exact pass
    assert all(rows <= 16 for _, _, rows in seen), seen
    ref_d, ref_i = brute(X, Y, 5)
    np.testing.assert_array_equal(ind, ref_i)  # ties to the lower training index
    np.testing.assert_allclose(dist, ref_d, rtol=1e-12)
