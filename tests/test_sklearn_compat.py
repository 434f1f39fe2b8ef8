"""pipeline's estimators inside scikit-learn's tools, against scikit-learn's own estimators.

``clone``, ``Pipeline``/``make_pipeline``, ``GridSearchCV`` and ``cross_val_score``
with the scikit-learn the test extras install; not-fitted use and non-convergence
raise and warn with scikit-learn's classes; ``import pipeline`` does not load
scikit-learn.
"""

import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.base import clone, is_classifier
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning, NotFittedError
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


# What scikit-learn's check_estimator still fails (issue 14 is not done): NaN/inf
# checks in fit and predict of in-memory input, object arrays of non-numbers raising
# TypeError, and the classifier's target checks (continuous, 2-D, inf y; 1 sample).
# Any other failing check is a regression.
KNOWN_FAILING = {
    "KNeighborsClassifier": {"check_classifiers_regression_target", "check_dtype_object",
                             "check_estimators_nan_inf", "check_fit2d_1sample", "check_supervised_y_2d",
                             "check_supervised_y_no_nan"},
    "GaussianMixture": {"check_dtype_object", "check_estimators_nan_inf"},
}


@pytest.mark.parametrize("est", [pl.KNeighborsClassifier(), pl.GaussianMixture()], ids=lambda e: type(e).__name__)
def test_check_estimator_fails_no_more_than_known(est):
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(est, on_fail=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    passed = {r["check_name"] for r in results if r["status"] == "passed"}
    assert len(passed) >= 35
    assert failed <= KNOWN_FAILING[type(est).__name__], failed - KNOWN_FAILING[type(est).__name__]
