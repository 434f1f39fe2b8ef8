"""scikit-learn's estimator protocol, without depending on scikit-learn.

The constructor stores its arguments unchanged; ``get_params``/``set_params`` read and
write them by the constructor's signature, so ``sklearn.base.clone`` works.
``__sklearn_tags__`` builds scikit-learn's tags when scikit-learn asks for them (it
is imported then, never by ``import pipeline``), so ``Pipeline``, ``GridSearchCV`` and
``cross_val_score`` know what each estimator is.
"""

from __future__ import annotations

import inspect

import numpy as np

from .errors import InputError

__all__ = ["BaseEstimator"]


class BaseEstimator:
    """Parameters by the constructor's signature; a repr of the ones changed; scikit-learn's tags.

    Subclasses name their kind in ``_estimator_type`` (scikit-learn's
    ``"classifier"``, ``"regressor"``, ``"DensityEstimator"``) and whether ``fit``
    needs ``y`` in ``_requires_y``.
    """

    _estimator_type = None
    _requires_y = False

    def __sklearn_tags__(self):
        """scikit-learn's :class:`sklearn.utils.Tags` for this estimator (scikit-learn >= 1.6)."""
        from sklearn.utils import ClassifierTags, InputTags, RegressorTags, Tags, TargetTags

        kind = self._estimator_type
        return Tags(estimator_type=kind, target_tags=TargetTags(required=self._requires_y),
                    classifier_tags=ClassifierTags() if kind == "classifier" else None,
                    regressor_tags=RegressorTags() if kind == "regressor" else None,
                    input_tags=InputTags())

    @classmethod
    def _get_param_names(cls):
        sig = inspect.signature(cls.__init__)
        return sorted(p for p in sig.parameters if p != "self")

    def get_params(self, deep=True):
        """Constructor parameters as a dict (scikit-learn protocol)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params):
        """Set constructor parameters (scikit-learn protocol); returns self."""
        valid = self._get_param_names()
        for key, value in params.items():
            if key not in valid:
                raise InputError(f"invalid parameter {key!r} for {type(self).__name__}; "
                                 f"valid: {', '.join(valid)}")
            setattr(self, key, value)
        return self

    def __repr__(self):
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
                    if p.name != "self"}

        def changed(k, v):
            if isinstance(v, np.ndarray) or isinstance(defaults[k], np.ndarray):
                return v is not defaults[k]
            return v is not defaults[k] and v != defaults[k]

        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if changed(k, v))
        return f"{type(self).__name__}({args})"
