"""pipeline's estimators inside scikit-learn's tools, against scikit-learn's own estimators.

``clone``, ``Pipeline``/``make_pipeline``, ``GridSearchCV`` and ``cross_val_score``
with the scikit-learn the test extras install; not-fitted use, non-convergence and a
column-vector y raise and warn with scikit-learn's classes; every estimator passes
``check_estimator``; ``import pipeline`` does not load scikit-learn.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.base import clone, is_classifier
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning, DataConversionWarning, NotFittedError
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier as SkKNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import pipeline as pl


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    # Small noise: no exact distance ties between rows, so the votes cannot depend
    # on how either side breaks them.
    return X + np.random.default_rng(0).uniform(0, 1e-3, X.shape), y


def test_tags_say_what_each_estimator_is():
    assert is_classifier(pl.KNeighborsClassifier())
    tags = pl.GaussianMixture().__sklearn_tags__()
    assert tags.estimator_type == "DensityEstimator" and not tags.target_tags.required
    assert pl.KNeighborsClassifier().__sklearn_tags__().target_tags.required


def test_cross_val_score_and_pipeline_equal_sklearn(digits):
    X, y = digits
    ours = cross_val_score(pl.KNeighborsClassifier(3, memory_budget="64MiB"), X, y, cv=3)
    ref = cross_val_score(SkKNeighborsClassifier(3, algorithm="brute"), X, y, cv=3)
    np.testing.assert_allclose(ours, ref)
    pipe = make_pipeline(StandardScaler(), pl.KNeighborsClassifier(3, memory_budget="64MiB")).fit(X, y)
    refp = make_pipeline(StandardScaler(), SkKNeighborsClassifier(3, algorithm="brute")).fit(X, y)
    np.testing.assert_array_equal(pipe.predict(X[:300]), refp.predict(X[:300]))


def test_grid_search_picks_as_sklearn(digits):
    X, y = digits
    grid = {"n_neighbors": [1, 3, 7]}
    ours = GridSearchCV(pl.KNeighborsClassifier(memory_budget="64MiB"), grid, cv=3).fit(X, y)
    ref = GridSearchCV(SkKNeighborsClassifier(algorithm="brute"), grid, cv=3).fit(X, y)
    assert ours.best_params_ == ref.best_params_
    np.testing.assert_allclose(ours.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"])


def test_grid_search_over_a_mixture(digits):
    X = digits[0][:600]
    grid = {"n_components": [2, 3], "covariance_type": ["diag", "spherical"]}
    kw = dict(init_params="random_from_data", random_state=0, max_iter=20, reg_covar=1e-2)
    cv = KFold(3, shuffle=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = GridSearchCV(pl.GaussianMixture(memory_budget="64MiB", **kw), grid, cv=cv).fit(X)
        ref = GridSearchCV(SkGaussianMixture(**kw), grid, cv=cv).fit(X)
    assert ours.best_params_ == ref.best_params_
    np.testing.assert_allclose(ours.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"], rtol=1e-6)
    assert isinstance(clone(ours.best_estimator_), pl.GaussianMixture)


def test_not_fitted_and_convergence_use_sklearns_classes(digits):
    X, y = digits
    for est, call in ((pl.KNeighborsClassifier(), lambda e: e.predict(X[:3])),
                      (pl.GaussianMixture(), lambda e: e.predict(X[:3]))):
        with pytest.raises(NotFittedError, match="not fitted") as info:
            call(est)
        assert isinstance(info.value, (ValueError, AttributeError, pl.NotFittedError, pl.InputError))
    with pytest.warns(ConvergenceWarning):
        pl.GaussianMixture(2, max_iter=1, memory_budget="64MiB", random_state=0).fit(X[:200])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ConvergenceWarning)  # a user's filter by scikit-learn's class
        pl.GaussianMixture(2, max_iter=1, memory_budget="64MiB", random_state=0).fit(X[:200])


def test_import_pipeline_does_not_load_sklearn():
    code = "import sys, pipeline; print(any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def _estimators():
    # Small budgets keep each check_estimator run to a few seconds.
    return [pl.KNeighborsClassifier(memory_budget="64MiB"), pl.KNeighborsRegressor(memory_budget="64MiB"),
            pl.NearestNeighbors(memory_budget="64MiB"), pl.GaussianMixture(memory_budget="64MiB")]


# Checks run per estimator with scikit-learn 1.9.1 (at least; later versions add checks).
MIN_PASSED = {"KNeighborsClassifier": 50, "KNeighborsRegressor": 48, "NearestNeighbors": 38, "GaussianMixture": 38}
# The one skip that depends on the environment, not on the estimator: the array-API
# check needs SCIPY_ARRAY_API before scipy is imported (it is run in a subprocess
# below).  pandas is in the test extras, so the DataFrame checks run.
ENVIRONMENT_SKIPS = ("SCIPY_ARRAY_API is not set",)


@pytest.mark.parametrize("est", _estimators(), ids=lambda e: type(e).__name__)
def test_check_estimator_passes_every_check(est):
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(est, on_fail=None)
    failed = {r["check_name"]: r["exception"] for r in results if r["status"] == "failed"}
    passed = [r for r in results if r["status"] == "passed"]
    skipped = {r["check_name"]: str(r["exception"]) for r in results if r["status"] == "skipped"}
    assert not failed, failed
    assert len(passed) >= MIN_PASSED[type(est).__name__]
    assert all(any(why in reason for why in ENVIRONMENT_SKIPS) for reason in skipped.values()), skipped


def test_array_api_check_passes_with_numpy():
    """check_array_api_input (NumPy under array_api_dispatch), skipped in-process above."""
    code = """if True:
        from sklearn.utils.estimator_checks import check_array_api_input
        import pipeline as pl
        for est in (pl.KNeighborsClassifier(memory_budget="64MiB"), pl.KNeighborsRegressor(memory_budget="64MiB"),
                    pl.NearestNeighbors(memory_budget="64MiB"), pl.GaussianMixture(memory_budget="64MiB")):
            check_array_api_input(type(est).__name__, est, array_namespace="numpy", expect_only_array_outputs=False)
        print("ok")
    """
    env = {**os.environ, "SCIPY_ARRAY_API": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_regressor_tags_say_multi_output_and_it_is():
    tags = pl.KNeighborsRegressor().__sklearn_tags__()
    assert tags.target_tags.multi_output and tags.target_tags.single_output
    assert not pl.KNeighborsClassifier().__sklearn_tags__().target_tags.multi_output
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((40, 3)), rng.standard_normal((40, 2))
    reg = pl.KNeighborsRegressor(3).fit(X, Y)
    assert reg.predict(X[:5]).shape == (5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a column y is one output, not a mistake: no warning
        pred = pl.KNeighborsRegressor(3).fit(X, Y[:, :1]).predict(X[:5])
    np.testing.assert_allclose(pred, reg.predict(X[:5])[:, :1])


def test_classifier_targets_in_sklearns_words():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((20, 3))
    y = np.arange(20) % 2
    with pytest.warns(DataConversionWarning, match="A column-vector y was passed") as record:
        clf = pl.KNeighborsClassifier(3).fit(X, y[:, None])
    assert isinstance(record[0].message, pl.errors.DataConversionWarning)
    np.testing.assert_array_equal(clf.predict(X), pl.KNeighborsClassifier(3).fit(X, y).predict(X))
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        pl.KNeighborsClassifier(3).fit(X, y + 0.5)
    assert pl.KNeighborsClassifier(3).fit(X, y.astype(float)).classes_.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="Input y contains NaN, in row"):
        pl.KNeighborsClassifier(3).fit(X, np.where(y, np.nan, 0))
    with pytest.raises(ValueError, match="Input y contains infinity"):
        pl.KNeighborsClassifier(3).fit(X, np.where(y, np.inf, 0))
    with pytest.raises(ValueError, match="Unknown label type"):
        pl.KNeighborsClassifier(3).fit(X, np.array(["a", 1] * 10, dtype=object))
    assert pl.KNeighborsClassifier(3).fit(X, np.array(["a", "b"] * 10, dtype=object)).classes_.tolist() == ["a", "b"]
    with pytest.raises(ValueError, match="1 sample"):
        pl.KNeighborsClassifier(3).fit(X[:1], y[:1])


def test_in_memory_nan_and_objects_refused_at_fit_and_predict():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((20, 3))
    bad = X.copy()
    bad[[2, 7], 1] = [np.nan, np.inf]
    y = np.arange(20) % 2
    for est in (pl.KNeighborsClassifier(3), pl.KNeighborsRegressor(3), pl.NearestNeighbors(3)):
        with pytest.raises(pl.InputError, match=r"^X has NaN or infinite values in row\(s\) 2, 7; remove"):
            est.fit(bad, y)
    gm = pl.GaussianMixture(2, random_state=0).fit(X)
    with pytest.raises(pl.InputError, match=r"X has NaN or infinite values in row\(s\) 2, 7"):
        gm.predict(bad)
    objects = X.astype(object)
    objects[0, 0] = {"foo": "bar"}
    for est in (pl.KNeighborsClassifier(3), pl.GaussianMixture(2)):
        with pytest.raises(TypeError, match="argument must be a string or a real number") as info:
            est.fit(objects, y)
        assert isinstance(info.value, pl.InputError)  # still exit status 2 in the CLI


def test_stores_and_dask_arrays_are_not_read_at_fit(tmp_path):
    """fit makes no pass over a store or a dask array (NaN rows are found by the queries)."""
    import dask.array as da

    rng = np.random.default_rng(6)
    X = rng.standard_normal((50, 3))
    X[4] = np.nan
    pl.write_dataset(str(tmp_path / "t.zarr"), X, y=np.arange(50) % 2)
    for fitted in (pl.KNeighborsClassifier(3).fit(str(tmp_path / "t.zarr")),
                   pl.KNeighborsClassifier(3).fit(da.from_array(X, chunks=10), np.arange(50) % 2)):
        with pytest.raises(pl.InputError, match=r"Y \(the training set\).*row\(s\) 4"):
            fitted.predict(X[:3] * 0)
