"""Datasets on Zarr: layout, round trips, chunk alignment, generators, refusals."""

import json
import os

import dask.array as da
import numpy as np
import pytest
import zarr

import pipeline as pl
from pipeline.errors import InputError
from pipeline.inputs import as_rows
from pipeline.store import ResultWriter, open_result, reads


def test_write_open_roundtrip(store_url):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1003, 7)).astype(np.float32)
    y = rng.integers(0, 5, 1003)
    ds = pl.write_dataset(store_url(), X, y=y, chunk_rows=100)
    np.testing.assert_array_equal(ds.X.compute(), X)
    np.testing.assert_array_equal(ds.y.compute(), y)
    assert ds.attrs["kind"] == "dataset" and ds.attrs["format"] == 1 and ds.attrs["complete"]
    # Rows-only chunking; Zarr chunks are exactly the dask chunks written.
    assert ds.X_zarr.chunks == (100, 7) and ds.y_zarr.chunks == (100,)
    assert set(ds.X.chunks[0][:-1]) == {100} and ds.X.chunks[1] == (7,)
    again = pl.open_dataset(ds.url)
    assert (again.n_samples, again.n_features) == (1003, 7)


def test_write_from_dask_with_irregular_chunks_is_realigned(tmp_path):
    X = da.from_array(np.arange(300, dtype=np.float64).reshape(100, 3), chunks=((7, 50, 43), 3))
    ds = pl.write_dataset(tmp_path / "d.zarr", X, chunk_rows=30)
    assert ds.X_zarr.chunks == (30, 3)
    np.testing.assert_array_equal(ds.X.compute(), X.compute())


def test_writer_refuses_misaligned_chunks(tmp_path):
    with ResultWriter(tmp_path / "a.zarr", "test", job="j") as out:
        z = out.array("a", shape=(10, 2), chunks=(4, 2), dtype="f8")
        for record in (True, False):
            with pytest.raises(ValueError, match="not aligned"):
                out.write_blocks([(da.zeros((10, 2), chunks=(3, 2)), z)], "test", record=record)


def test_integer_data_stored_as_is(tmp_path):
    X = np.random.default_rng(1).integers(0, 256, (50, 12), dtype=np.uint8)
    ds = pl.write_dataset(tmp_path / "u8.zarr", X)
    assert ds.X.dtype == np.uint8
    np.testing.assert_array_equal(ds.X.compute(), X)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "uint8"])
def test_ingest_npy(tmp_path, order, dtype):
    rng = np.random.default_rng(2)
    X = np.asarray(rng.uniform(0, 200, (517, 9)), dtype=dtype, order=order)
    y = rng.integers(0, 3, 517)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    ds = pl.ingest(tmp_path / "X.npy", tmp_path / "out.zarr", labels=tmp_path / "y.npy", chunk_rows=64)
    assert ds.X.dtype == X.dtype and ds.X_zarr.chunks == (64, 9)
    np.testing.assert_array_equal(ds.X.compute(), X)
    np.testing.assert_array_equal(ds.y.compute(), y)
    assert ds.attrs["source"].startswith("ingest:")


def test_ingest_to_memory_url(tmp_path):
    X = np.arange(40.0).reshape(10, 4)
    np.save(tmp_path / "X.npy", X)
    ds = pl.ingest(tmp_path / "X.npy", "memory://ingest-test/ds", overwrite=True)
    np.testing.assert_array_equal(ds.X.compute(), X)


def test_ingest_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        pl.ingest(tmp_path / "missing.npy", tmp_path / "o.zarr")
    np.save(tmp_path / "v.npy", np.arange(5.0))
    with pytest.raises(InputError, match="2-D"):
        pl.ingest(tmp_path / "v.npy", tmp_path / "o.zarr")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    with pytest.raises(InputError, match="not a readable .npy"):
        pl.ingest(tmp_path / "junk.npy", tmp_path / "o.zarr")
    np.save(tmp_path / "X.npy", np.ones((5, 2)))
    np.save(tmp_path / "short.npy", np.arange(4))
    with pytest.raises(InputError, match=r"labels has shape \(4,\); expected \(5,\)"):
        pl.ingest(tmp_path / "X.npy", tmp_path / "o.zarr", labels=tmp_path / "short.npy")
    assert not os.path.exists(tmp_path / "o.zarr")


def test_make_blobs_matches_its_description(store_url):
    ds = pl.make_blobs(store_url(), 6000, 5, centers=3, random_state=4, chunk_rows=1000,
                       cluster_std=0.5)
    X, y = ds.X.compute(), ds.y.compute()
    assert X.dtype == np.float32 and X.shape == (6000, 5)
    assert set(np.unique(y)) == {0, 1, 2}
    # Each blob: the within-blob spread is cluster_std (sample std of ~2000 points is
    # within a few percent), and blobs are far apart relative to it.
    centers = np.stack([X[y == c].mean(0) for c in range(3)])
    for c in range(3):
        np.testing.assert_allclose(X[y == c].std(0), 0.5, rtol=0.1)
    assert np.min(np.linalg.norm(centers[:, None] - centers[None], axis=2)[np.triu_indices(3, 1)]) > 3


def test_generators_are_deterministic_and_thread_independent(tmp_path):
    import dask

    a = pl.make_blobs(tmp_path / "a.zarr", 3000, 4, random_state=7, chunk_rows=500)
    with dask.config.set(num_workers=1):
        b = pl.make_blobs(tmp_path / "b.zarr", 3000, 4, random_state=7, chunk_rows=500)
    c = pl.make_blobs(tmp_path / "c.zarr", 3000, 4, random_state=8, chunk_rows=500)
    np.testing.assert_array_equal(a.X.compute(), b.X.compute())
    assert not np.array_equal(a.X.compute(), c.X.compute())


def test_cifar_like_is_uint8_with_learnable_classes(tmp_path):
    train = pl.make_cifar_like(tmp_path / "tr.zarr", 1000, random_state=1)
    test = pl.make_cifar_like(tmp_path / "te.zarr", 200, random_state=2)
    assert train.X.dtype == np.uint8 and train.X.shape == (1000, 3072)
    Xtr, ytr = train.X.compute().astype(float), train.y.compute()
    Xte, yte = test.X.compute().astype(float), test.y.compute()
    assert not np.array_equal(Xtr[:200], Xte)
    # Nearest class mean classifies far above chance (10%): the classes carry signal.
    means = np.stack([Xtr[ytr == c].mean(0) for c in range(10)])
    pred = np.argmin(((Xte[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == yte).mean() > 0.5


def test_compression_kept_only_where_it_pays(tmp_path):
    noise = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    smooth = np.zeros((2000, 64), dtype=np.float32)
    a = pl.write_dataset(tmp_path / "noise.zarr", noise)
    b = pl.write_dataset(tmp_path / "smooth.zarr", smooth)
    assert a.X_zarr.compressors == ()
    assert [type(c).__name__ for c in b.X_zarr.compressors] == ["ZstdCodec"]
    c = pl.write_dataset(tmp_path / "forced.zarr", noise, compressor="zstd")
    assert [type(x).__name__ for x in c.X_zarr.compressors] == ["ZstdCodec"]
    np.testing.assert_array_equal(c.X.compute(), noise)


def test_refuses_to_clobber_without_overwrite(tmp_path):
    url = tmp_path / "d.zarr"
    pl.write_dataset(url, np.ones((3, 2)))
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        pl.write_dataset(url, np.zeros((3, 2)))
    np.testing.assert_array_equal(pl.open_dataset(url).X.compute(), 1)
    pl.write_dataset(url, np.zeros((3, 2)), overwrite=True)
    np.testing.assert_array_equal(pl.open_dataset(url).X.compute(), 0)


def test_open_refusals(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        pl.open_dataset(tmp_path / "nothing")
    zarr.create_array(str(tmp_path / "arr"), shape=(3, 2), dtype="f4")
    with pytest.raises(InputError, match="is a Zarr array, not a dataset group"):
        pl.open_dataset(tmp_path / "arr")
    g = zarr.open_group(str(tmp_path / "partial"), mode="w")
    g.create_array("X", shape=(3, 2), dtype="f4")
    g.attrs["pipeline"] = {"format": 1, "kind": "dataset", "complete": False}
    with pytest.raises(InputError, match="incomplete"):
        pl.open_dataset(tmp_path / "partial")
    g = zarr.open_group(str(tmp_path / "noX"), mode="w")
    with pytest.raises(InputError, match="no array 'X'"):
        pl.open_dataset(tmp_path / "noX")


def test_refuses_pickle_codec_unread(tmp_path):
    # A Zarr v2 array with an object dtype needs a pickle-like codec to decode: refuse.
    g = zarr.open_group(str(tmp_path / "evil"), mode="w", zarr_format=2)
    g.create_array("X", shape=(2, 2), dtype="f8")
    meta_path = tmp_path / "evil" / "X" / ".zarray"
    meta = json.loads(meta_path.read_text())
    meta["filters"] = [{"id": "pickle", "protocol": 5}]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="pickle"):
        pl.open_dataset(tmp_path / "evil")


def test_as_rows_accepts_everything_the_api_promises(tmp_path):
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    ds = pl.write_dataset(tmp_path / "d.zarr", X, chunk_rows=4)
    for src in (X, da.from_array(X, chunks=3), ds.X_zarr, ds, ds.url, tmp_path / "d.zarr"):
        out = as_rows(src).dask(rows=2)
        assert out.chunks[0] == (2, 2, 2)
        np.testing.assert_array_equal(out.compute(), X)
    with pytest.raises(InputError, match="must be 2-D"):
        as_rows(np.ones(3))
    with pytest.raises(InputError, match="empty"):
        as_rows(np.ones((0, 3)))
    with pytest.raises(InputError, match="numeric"):
        as_rows(np.array([["a"]]))


def test_results_are_complete_only_at_the_end(tmp_path):
    url = tmp_path / "r.zarr"
    with ResultWriter(url, "distances", job="j1") as out:
        assert out.status == "new"
        with pytest.raises(pl.DataError, match="incomplete"):
            open_result(url, "distances")
        out.complete(note=1)
    assert open_result(url, "distances").attrs["pipeline"]["note"] == 1
    with ResultWriter(url, "distances", job="j1") as out:
        assert out.status == "complete"
    with pytest.raises(InputError, match="holds another result"):
        ResultWriter(url, "distances", job="j2").__enter__()
    with pytest.raises(InputError, match="not a neighbors result"):
        open_result(url, "neighbors")
    assert not os.path.exists(str(url) + ".lock")  # released on every exit, the refusal's too


def test_writer_resumes_recorded_blocks_and_releases_its_lock_on_failure(tmp_path):
    url = tmp_path / "r.zarr"
    seen = []
    with pytest.raises(RuntimeError, match="crash"):
        with ResultWriter(url, "test", job="j", resume=True, on_block=seen.append) as out:
            a = out.array("a", shape=(6,), chunks=(2,), dtype=np.int64)
            assert out.pending((3,)) == [(0,), (1,), (2,)]
            out.record_block(a, (1,), np.array([3, 4]))
            raise RuntimeError("crash")
    assert seen == [(1,)] and not os.path.exists(str(url) + ".lock")
    with pytest.raises(pl.DataError, match="incomplete"):
        open_result(url)
    with ResultWriter(url, "test", job="j", resume=True) as out:
        assert out.status == "resume" and out.pending((3,)) == [(0,), (2,)]
        a = out.array("a", shape=(6,), chunks=(2,), dtype=np.int64)
        writes, written, kept = out.write_blocks([(da.arange(6, chunks=2), a)], "test")
        assert (written, kept) == (2, 1)
        writes.compute()
        out.complete()
    # Block 1 was kept from the first run, not written again.
    np.testing.assert_array_equal(open_result(url)["a"][...], [0, 1, 3, 4, 4, 5])
    with ResultWriter(url, "test", job="j", resume=False, overwrite=True) as out:
        assert out.status == "new" and "a" not in out.group


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.float64])
def test_raw_row_reads_equal_zarr_and_defer_to_it_on_damage(tmp_path, dtype):
    """Uncompressed local chunks are read straight into the caller's buffer; any run of
    rows (inside a chunk, across chunks, the padded edge chunk) equals zarr's read,
    and a damaged or compressed store takes zarr's path, with its errors."""
    from pipeline.errors import DataError

    rng = np.random.default_rng(0)
    X = (rng.random((1003, 7)) * 200).astype(dtype)
    ds = pl.write_dataset(str(tmp_path / "raw.zarr"), X, chunk_rows=100, compressor="none")
    arr = ds.X_zarr
    assert reads._raw_layout(arr) is not None
    for start, stop in [(0, 100), (5, 37), (95, 305), (990, 1003), (0, 1003)]:
        out = np.full((stop - start, 7), 99, dtype=dtype)
        assert reads._read_raw_rows(arr, start, stop, out)
        np.testing.assert_array_equal(out, X[start:stop])
    zs = pl.write_dataset(str(tmp_path / "zstd.zarr"), X, chunk_rows=100, compressor="zstd")
    assert reads._raw_layout(zs.X_zarr) is None
    out = np.empty((50, 7), dtype=dtype)
    np.testing.assert_array_equal(reads.read_rows_into(zs.X_zarr, 120, 170, out), X[120:170])
    chunk = tmp_path / "raw.zarr" / "X" / "c" / "3" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-8])  # torn: the wrong size
    torn = pl.open_dataset(str(tmp_path / "raw.zarr")).X_zarr
    assert not reads._read_raw_rows(torn, 250, 350, np.empty((100, 7), dtype=dtype))
    with pytest.raises(DataError, match=r"chunk \(3, 0\)"):
        reads.read_rows_into(torn, 250, 350, np.empty((100, 7), dtype=dtype))
