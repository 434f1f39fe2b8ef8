"""GMM memory promise, measured: peak RSS of a real process above an idle one.

The data on disk are several times the budget; the fit (k-means++ seeding, EM
iterations) and the prediction must stay inside the budget, measured as the peak
resident set of a fresh process minus that of an idle process that imported the same
modules (what ``memory_budget`` promises, DESIGN.md "Memory budget").
"""

import os
from pathlib import Path

import pytest

import pipeline as pl
from conftest import run_measured
from pipeline.budget import parse_budget, plan

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
IMPORTS = "import numpy, dask.array, zarr, pipeline, pipeline.mixture, pipeline.kernels.gaussian"


def _peak_above_idle(code):
    """(peak RSS of ``code`` minus peak of an idle process with the same imports, stdout).

    conftest.run_measured reads each child's VmHWM: ru_maxrss would start from the
    (large) pytest parent's peak and hide what the child added.
    """
    return run_measured(code, imports=IMPORTS)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    # 800000 x 32 float64 = 195 MiB on disk, >3x the 64 MiB budget; 4 MiB Zarr chunks.
    url = str(tmp_path_factory.mktemp("gmm-mem") / "X.zarr")
    pl.make_blobs(url, 800_000, 32, centers=4, dtype="float64", chunk_rows=16384, random_state=0)
    return url


def test_fit_and_predict_inside_budget(big, tmp_path):
    budget = "64MiB"
    p = plan("gmm", n_samples=800_000, n_features=32, n_components=4, itemsize=8,
             memory_budget=budget, threads=os.cpu_count())
    assert p.peak <= parse_budget(budget)
    grew, out = _peak_above_idle(f"""
        from pipeline import mixture
        s = mixture.fit_to_store({big!r}, {str(tmp_path / 'm.zarr')!r}, n_components=4, max_iter=3,
                                 tol=0.0, init_params="k-means++", random_state=0,
                                 memory_budget={budget!r})
        assert s["n_iter"] == 3, s
        mixture.predict_to_store({str(tmp_path / 'm.zarr')!r}, {big!r}, {str(tmp_path / 'p.zarr')!r},
                                 memory_budget={budget!r})
        print("ROWS", s["rows_per_block"])
    """)
    print(f"GMM fit+predict over 195 MiB with a 64 MiB budget: +{grew / MiB:.1f} MiB "
          f"(plan predicted {p.peak / MiB:.1f} MiB)")
    assert grew <= parse_budget(budget), f"grew by {grew / MiB:.1f} MiB"


def test_memory_flat_in_n(tmp_path, big):
    # Same budget, a quarter of the rows: at 48 MiB both plans take the same blocks
    # (checked, planned as em_step plans them: from the stores' chunks), so the peak must
    # not depend on n; with 4x the data it stays within 16 MiB.
    small = str(tmp_path / "small.zarr")
    pl.make_blobs(small, 200_000, 32, centers=4, dtype="float64", chunk_rows=16384, random_state=0)
    rows = {}
    for url in (small, big):
        X = pl.open_dataset(url).X_zarr
        rows[X.shape[0]] = plan("gmm", n_samples=X.shape[0], n_features=32, n_components=4, itemsize=8,
                                chunk_rows=X.chunks[0], x_compressed=bool(X.compressors),
                                memory_budget="48MiB", threads=os.cpu_count())["rows"]
    assert rows[200_000] == rows[800_000]
    code = """
        import numpy as np
        import pipeline as pl
        ds = pl.open_dataset({url!r})
        K = 4
        w, m, P = np.ones(K) / K, ds.X_zarr[:K], np.array([np.eye(32)] * K)
        for _ in range(2):
            pl.em_step(ds, w, m, P, memory_budget="48MiB")
    """
    g_small, _ = _peak_above_idle(code.format(url=small))
    g_big, _ = _peak_above_idle(code.format(url=big))
    print(f"em_step peak above idle: n=200k +{g_small / MiB:.1f} MiB, n=800k +{g_big / MiB:.1f} MiB")
    assert g_big <= parse_budget("48MiB")
    assert abs(g_big - g_small) < 16 * MiB


@pytest.mark.parametrize("cov_type", ["diag", "tied"])
def test_other_covariance_types_inside_budget(big, tmp_path, cov_type):
    budget = "48MiB"
    p = plan("gmm", n_samples=800_000, n_features=32, n_components=8, itemsize=8, covariance_type=cov_type,
             memory_budget=budget, threads=os.cpu_count())
    assert p.peak <= parse_budget(budget)
    grew, out = _peak_above_idle(f"""
        from pipeline import mixture
        s = mixture.fit_to_store({big!r}, {str(tmp_path / 'm.zarr')!r}, n_components=8, max_iter=3,
                                 covariance_type={cov_type!r}, tol=0.0, init_params="random_from_data",
                                 random_state=0, memory_budget={budget!r})
        assert s["n_iter"] == 3, s
        mixture.predict_to_store({str(tmp_path / 'm.zarr')!r}, {big!r}, {str(tmp_path / 'p.zarr')!r},
                                 memory_budget={budget!r})
    """)
    print(f"GMM {cov_type} fit+predict over 195 MiB with a {budget} budget: +{grew / MiB:.1f} MiB "
          f"(plan predicted {p.peak / MiB:.1f} MiB)")
    assert grew <= parse_budget(budget), f"grew by {grew / MiB:.1f} MiB"
