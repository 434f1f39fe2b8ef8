"""Exceptions raised by ``pipeline``.

The CLI maps :class:`InputError` to exit status 2 (bad input or usage) and every
other :class:`PipelineError` to exit status 1 (a failure while running).
"""


class PipelineError(Exception):
    """Base class of the errors ``pipeline`` raises on purpose."""


class InputError(PipelineError, ValueError):
    """Bad input: the message names what is wrong and what would be right."""


class BudgetError(InputError):
    """A memory budget that cannot be parsed, or is too small for the operation."""


class DataError(PipelineError):
    """A store that cannot be read: a corrupt or missing chunk, an incomplete result."""
