"""Exceptions raised by ``pipeline``.

The CLI maps :class:`InputError` to exit status 2 (bad input or usage) and every
other :class:`PipelineError` to exit status 1 (a failure while running).

Where scikit-learn has a class for the same event (``NotFittedError``,
``ConvergenceWarning``, ``DataConversionWarning``), what ``pipeline`` raises or warns
is also an instance of scikit-learn's class whenever scikit-learn is imported in the
process (:func:`sklearn_flavoured`), so users' ``except`` clauses and warning filters
work; ``import pipeline`` itself never loads scikit-learn.
"""

import functools
import sys


class PipelineError(Exception):
    """Base class of the errors ``pipeline`` raises on purpose."""


class InputError(PipelineError, ValueError):
    """Bad input: the message names what is wrong and what would be right."""


class InputTypeError(InputError, TypeError):
    """Input values of a type that cannot be used (an object array holding a dict).

    Also a ``TypeError``, as NumPy's and scikit-learn's conversions raise for them.
    """


class BudgetError(InputError):
    """A memory budget that cannot be parsed, or is too small for the operation.

    ``minimum``: the least budget in bytes that would do, when the planner knows it.
    """

    minimum = None


class DataError(PipelineError):
    """A store that cannot be read: a corrupt or missing chunk, an incomplete result."""


class NotFittedError(InputError, AttributeError):
    """An estimator used before ``fit``: a ``ValueError`` and an ``AttributeError``, as scikit-learn's."""


class DataConversionWarning(UserWarning):
    """Input converted to what an estimator needs (a column-vector y raveled to 1-D).

    Also scikit-learn's ``DataConversionWarning`` when scikit-learn is imported
    (:func:`sklearn_flavoured`): its filters apply.
    """


@functools.cache
def _joint(cls, other):
    return type(cls.__name__, (cls, other), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def sklearn_flavoured(cls, sklearn_name):
    """``cls``, or a subclass of it and of ``sklearn.exceptions.<sklearn_name>`` if scikit-learn is loaded.

    Only a process that imported scikit-learn can catch or filter scikit-learn's class,
    so scikit-learn is never imported here.

    Examples
    --------
    >>> sklearn_flavoured(NotFittedError, "NotFittedError").__mro__[0].__name__
    'NotFittedError'
    """
    module = sys.modules.get("sklearn.exceptions")
    other = getattr(module, sklearn_name, None) if module is not None else None
    return cls if other is None else _joint(cls, other)
