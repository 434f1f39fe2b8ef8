"""The memory budget is a promise: measured on a real process, not read off the plan.

A training set of ~390 MiB lives on disk as Zarr; k-NN runs in a fresh process with a
budget four times smaller, and the peak resident set above an idle process (same
imports, nothing run) must stay inside the budget.
"""

import numpy as np
import pytest

import pipeline as pl
from conftest import run_measured

BUDGET = 96 * 2**20


@pytest.fixture(scope="module")
def train_on_disk(tmp_path_factory):
    d = tmp_path_factory.mktemp("knn-mem")
    train = pl.make_blobs(str(d / "train.zarr"), 100_000, 1024, centers=10, dtype="float32",
                          random_state=0, chunk_rows=1024)
    pl.make_blobs(str(d / "test.zarr"), 200, 1024, centers=10, dtype="float32",
                  random_state=1, chunk_rows=200)
    assert train.X.nbytes >= 4 * BUDGET
    return str(d / "test.zarr"), str(d / "train.zarr")


def test_knn_peak_rss_inside_budget(train_on_disk):
    test, train = train_on_disk
    p = pl.plan("knn", n_query=200, n_train=100_000, n_features=1024, k=5, itemsize=4,
                memory_budget=BUDGET, threads=2)
    assert p.peak <= BUDGET
    grew, out = run_measured(f"""
        import pipeline as pl
        dist, ind = pl.kneighbors({test!r}, {train!r}, 5, memory_budget={BUDGET})
        print("SHAPE", ind.shape, int(ind.max()))
    """)
    assert "SHAPE (200, 5)" in out
    print(f"peak above idle {grew / 2**20:.1f} MiB, budget {BUDGET / 2**20:.0f} MiB, "
          f"predicted {p.peak / 2**20:.1f} MiB")
    assert grew <= BUDGET, (grew, p.explain())


def test_distances_to_zarr_peak_rss_inside_budget(train_on_disk, tmp_path):
    test, train = train_on_disk
    out_url = str(tmp_path / "D.zarr")
    # D is 200 x 100000 float32 = 76 MiB, written block by block.
    grew, _ = run_measured(f"""
        from pipeline.distances import write_distances
        write_distances({test!r}, {train!r}, {out_url!r}, memory_budget={BUDGET})
    """)
    print(f"distances: peak above idle {grew / 2**20:.1f} MiB, budget {BUDGET / 2**20:.0f} MiB")
    assert grew <= BUDGET


@pytest.mark.parametrize("metric", ["cosine", "ip", "manhattan"])
def test_other_metrics_peak_rss_inside_budget(train_on_disk, metric):
    test, train = train_on_disk
    grew, out = run_measured(f"""
        import pipeline as pl
        dist, ind = pl.kneighbors({test!r}, {train!r}, 5, metric={metric!r}, memory_budget={BUDGET})
        print("SHAPE", ind.shape, int(ind.max()))
    """)
    assert "SHAPE (200, 5)" in out
    print(f"{metric}: peak above idle {grew / 2**20:.1f} MiB, budget {BUDGET / 2**20:.0f} MiB")
    assert grew <= BUDGET


def test_radius_graph_peak_rss_inside_budget(train_on_disk):
    test, train = train_on_disk
    # The smallest distance to a 20th neighbour: 20 rows in that query's ball, at most
    # 20 in every other's (ball sizes differ by orders of magnitude between queries).
    radius = float(pl.kneighbors(test, train, 20, metric="cosine", memory_budget=BUDGET)[0][:, -1].min())
    grew, out = run_measured(f"""
        import numpy as np, pipeline as pl
        nn = pl.NearestNeighbors(metric="cosine", memory_budget={BUDGET}).fit({train!r})
        G = nn.radius_neighbors_graph({test!r}, radius={radius!r})
        print("NNZ", G.nnz, G.shape)
    """)
    nnz = int(out.split("NNZ")[1].split()[0])
    assert 20 <= nnz <= 4000
    print(f"radius graph: {nnz} entries, peak above idle {grew / 2**20:.1f} MiB, budget {BUDGET / 2**20:.0f} MiB")
    assert grew <= BUDGET
