"""The memory promise, measured: peak RSS of a real process above an idle one."""

import pickle

import numpy as np
import pytest

import pipeline as pl
from pipeline.budget import parse_budget

from conftest import run_measured

MiB = 2**20


def _big_npy(path, n_rows, n_features, dtype=np.float32):
    """Write an .npy larger than the budget without holding it (memmap, row blocks)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n_rows, n_features))
    rng = np.random.default_rng(0)
    step = 65536
    for s in range(0, n_rows, step):
        e = min(n_rows, s + step)
        out[s:e] = rng.standard_normal((e - s, n_features), dtype=np.float32)
    out.flush()
    del out


def test_ingest_2gib_npy_inside_256mib(tmp_path):
    src = tmp_path / "big.npy"
    n, d = 2**19, 1024  # 2 GiB of float32
    _big_npy(src, n, d)
    grew, _ = run_measured(f"""
        ds = pipeline.ingest({str(src)!r}, {str(tmp_path / 'big.zarr')!r}, memory_budget="256MiB")
        assert ds.X.shape == ({n}, {d})
    """)
    print(f"ingest of 2 GiB with a 256 MiB budget: +{grew / MiB:.0f} MiB")
    assert grew <= parse_budget("256MiB"), f"ingest grew the process by {grew / MiB:.0f} MiB"
    # It really was streamed: every block landed, spot-checked against the source.
    ds = pl.open_dataset(tmp_path / "big.zarr")
    src_map = np.load(src, mmap_mode="r")
    for rows in (slice(0, 3), slice(n // 2, n // 2 + 3), slice(n - 3, n)):
        np.testing.assert_array_equal(ds.X_zarr[rows], src_map[rows])


def test_generate_larger_than_budget(tmp_path):
    url = tmp_path / "gen.zarr"
    grew, _ = run_measured(f"""
        pipeline.make_blobs({str(url)!r}, 400_000, 512, memory_budget="128MiB")  # 780 MiB
    """)
    print(f"generating 780 MiB with a 128 MiB budget: +{grew / MiB:.0f} MiB")
    assert grew <= 128 * MiB, f"generation grew the process by {grew / MiB:.0f} MiB"
    assert pl.open_dataset(url).X.shape == (400_000, 512)


def test_graph_holds_references_not_data(tmp_path):
    # Same number of chunks, 10x the data: the pickled graph must not grow.
    from pipeline.storage import as_array

    sizes = []
    for n_rows in (10_000, 100_000):
        ds = pl.make_blobs(tmp_path / f"g{n_rows}.zarr", n_rows, 16, chunk_rows=n_rows // 10)
        graph = dict(as_array(ds).sum(axis=0).__dask_graph__())
        sizes.append(len(pickle.dumps(graph)))
    assert abs(sizes[1] - sizes[0]) < 200, sizes
    assert sizes[1] < 100_000 * 16 * 4 / 100, sizes  # far below 1% of the data
