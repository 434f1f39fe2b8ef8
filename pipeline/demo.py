"""``pipeline demo``: the main job, small, end to end.

CIFAR-10-shaped images (uint8, 32x32x3) are generated to Zarr; the k-NN plan for the
budget is printed; exact k-NN classifies the test images without ever holding the
(n_test, n_train) distance matrix, let alone the (n_test, n_train, 3072) broadcast;
then a Gaussian mixture is fitted by out-of-core EM.  Each step prints what it did,
where its data are, its time and the process's peak memory above idle.
"""

from __future__ import annotations

import os
import resource
import time

from .budget import format_bytes, parse_budget, plan
from .runtime import dask_threads

__all__ = ["run_demo"]


def _peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_demo(directory="pipeline-demo", *, n_train=5000, n_test=500, memory_budget="512MiB",
             echo=print):
    """Run the demo, writing its stores under ``directory``.

    Returns
    -------
    dict
        Accuracy of the k-NN vote, the GMM's lower bound, timings and peak memory.
    """
    from . import store

    os.makedirs(directory, exist_ok=True)
    budget = parse_budget(memory_budget)
    base = _peak()
    t0 = time.perf_counter()
    results = {}

    def step(title, fn):
        echo(f"\n== {title}")
        t = time.perf_counter()
        out = fn()
        echo(f"   {time.perf_counter() - t:.2f} s; peak memory so far "
             f"+{format_bytes(max(0, _peak() - base))} above idle (budget {format_bytes(budget)})")
        return out

    train_url = os.path.join(directory, "cifar-train.zarr")
    test_url = os.path.join(directory, "cifar-test.zarr")
    train = step(f"generate CIFAR-10-shaped training images -> {train_url}",
                 lambda: store.make_cifar_like(train_url, n_train, random_state=1,
                                                 overwrite=True, memory_budget=budget))
    test = step(f"generate CIFAR-10-shaped test images -> {test_url}",
                lambda: store.make_cifar_like(test_url, n_test, random_state=2,
                                                overwrite=True, memory_budget=budget))
    echo(f"   {train!r}\n   {test!r}")
    naive = n_test * n_train * train.n_features * 8
    echo(f"\n   the 'no loops' broadcast ((X[:, None] - Y)**2).sum(2) would allocate "
         f"{format_bytes(naive)}; pipeline streams it in blocks instead:")
    p = plan("knn", n_query=n_test, n_train=n_train, n_features=train.n_features, k=5,
             itemsize=1, memory_budget=budget, threads=dask_threads(), train_held=False)  # as write_knn: Zarr
    echo("\n".join("   " + line for line in p.explain().splitlines()))

    from .neighbors import write_knn

    knn_url = os.path.join(directory, "knn.zarr")
    summary = step(f"exact 5-NN of the test images -> {knn_url}",
                   lambda: write_knn(test_url, train_url, knn_url, k=5, memory_budget=budget,
                                     overwrite=True))
    for key, value in summary.items():
        echo(f"   {key}: {value}")
    results["knn_accuracy"] = summary.get("accuracy")

    from .mixture import fit_to_store, predict_to_store

    blobs_url = os.path.join(directory, "blobs.zarr")
    step(f"generate 20000 x 16 Gaussian blobs -> {blobs_url}",
         lambda: store.make_blobs(blobs_url, 20000, 16, centers=4, dtype="float64",
                                    random_state=0, overwrite=True, memory_budget=budget))
    model_url = os.path.join(directory, "gmm.zarr")
    summary = step(f"fit a 4-component Gaussian mixture by out-of-core EM -> {model_url}",
                   lambda: fit_to_store(blobs_url, model_url, n_components=4, max_iter=100,
                                        random_state=0, memory_budget=budget, overwrite=True))
    for key, value in summary.items():
        echo(f"   {key}: {value}")
    results["gmm_lower_bound"] = summary.get("lower_bound")
    labels_url = os.path.join(directory, "gmm-labels.zarr")
    summary = step(f"predict the mixture component of every row -> {labels_url}",
                   lambda: predict_to_store(model_url, blobs_url, labels_url, memory_budget=budget,
                                            overwrite=True))
    for key, value in summary.items():
        echo(f"   {key}: {value}")

    results["seconds"] = time.perf_counter() - t0
    results["peak_bytes"] = max(0, _peak() - base)
    echo(f"\ndemo done in {results['seconds']:.1f} s; peak memory +{format_bytes(results['peak_bytes'])} "
         f"above idle, inside the {format_bytes(budget)} budget: "
         f"{'yes' if results['peak_bytes'] <= budget else 'NO'}; data under {os.path.abspath(directory)}")
    return results
