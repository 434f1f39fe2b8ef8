"""`pipeline demo`, the main job, as a user runs it: a real subprocess."""

import subprocess
import sys

import numpy as np

import pipeline as pl


def test_demo_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--dir", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "plan for knn (n_query=500, n_train=5000, n_features=3072" in out
    assert "predicted peak" in out and "would allocate 57.22 GiB" in out
    assert "inside the 512 MiB budget: yes" in out
    # The k-NN the demo reports is scikit-learn's brute-force k-NN on the same images
    # wherever the 5th and 6th distances differ; at a tie (integer pixels) scikit-learn
    # keeps whichever row its heap and chunking see first, so there the reference is
    # the documented rule (exact distances, lower index first, then the vote).
    from sklearn.neighbors import KNeighborsClassifier

    from knn_reference import reference_predict

    train = pl.open_dataset(tmp_path / "demo" / "cifar-train.zarr")
    test = pl.open_dataset(tmp_path / "demo" / "cifar-test.zarr")
    assert train.X.shape == (5000, 3072) and test.X.shape == (500, 3072) and train.X.dtype == np.uint8
    Xtr, ytr, Xte = train.X.compute().astype(np.float64), train.y.compute(), test.X.compute().astype(np.float64)
    ref = KNeighborsClassifier(5, algorithm="brute").fit(Xtr, ytr)
    expected, _, clear, _ = reference_predict(Xtr, ytr, Xte, 5)
    assert clear.mean() >= 0.95
    import zarr

    knn = zarr.open_group(str(tmp_path / "demo" / "knn.zarr"), mode="r")
    np.testing.assert_array_equal(knn["predictions"][:][clear], ref.predict(Xte[clear]))
    np.testing.assert_array_equal(knn["predictions"][:], expected)
    accuracy = float((expected == test.y.compute()).mean())
    assert f"accuracy: {knn.attrs['pipeline']['accuracy']}" in out
    assert abs(knn.attrs["pipeline"]["accuracy"] - accuracy) < 1e-12
    # Harder than a toy (CIFAR-10's raw-pixel 5-NN is ~35%) but far above chance.
    assert 0.2 < accuracy < 0.8
    # The mixture was fitted and saved, and its labels written.
    gmm = zarr.open_group(str(tmp_path / "demo" / "gmm.zarr"), mode="r")
    assert gmm.attrs["pipeline"]["complete"] and gmm["means"].shape == (4, 16)
    assert "lower_bound" in out and "demo done in" in out
