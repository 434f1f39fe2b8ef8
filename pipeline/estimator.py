"""scikit-learn's estimator protocol, without depending on scikit-learn.

The constructor stores its arguments unchanged; ``get_params``/``set_params`` read and
write them by the constructor's signature, so ``sklearn.base.clone`` works.
"""

from __future__ import annotations

import inspect

import numpy as np

from .errors import InputError

__all__ = ["BaseEstimator"]


class BaseEstimator:
    """Parameters by the constructor's signature; a repr of the ones changed."""

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
