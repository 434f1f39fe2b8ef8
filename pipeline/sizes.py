"""Byte sizes: parsing a memory budget, the default budget, printing sizes."""

from __future__ import annotations

import math
import os
import re

from .errors import BudgetError

__all__ = ["parse_budget", "default_budget", "format_bytes"]

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_budget(value, *, name="memory_budget") -> int:
    """Return a budget in bytes.

    Parameters
    ----------
    value : int, float, str or None
        Bytes, or a size such as ``"1.5GiB"``, ``"256MiB"``, ``"2GB"``.  ``None`` means
        the default: dask config ``pipeline.memory-budget``, else a quarter of the
        memory available now.

    Examples
    --------
    >>> parse_budget("1.5GiB")
    1610612736
    >>> parse_budget(2**20)
    1048576
    """
    if value is None:
        return default_budget()
    if isinstance(value, bool):
        raise BudgetError(f"{name}={value!r} is not a size; give bytes or a string such as '1.5GiB'")
    if isinstance(value, (int, float)):
        n = value
    else:
        m = _SIZE.match(str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise BudgetError(
                f"{name}={value!r} is not a size; write a number and a unit such as "
                "'512MiB', '1.5GiB' or '2GB'"
            )
        n = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(n) or n <= 0:
        raise BudgetError(f"{name}={value!r} must be a positive size such as '1GiB'")
    return int(n)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget() -> int:
    """The budget used when none is given.

    The dask config key ``pipeline.memory-budget`` (also the environment variable
    ``DASK_PIPELINE__MEMORY_BUDGET``) if set, else a quarter of the memory available
    now (at least 256 MiB).
    """
    import dask.config

    value = dask.config.get("pipeline.memory-budget", None)
    if value is not None:
        return parse_budget(value, name="pipeline.memory-budget")
    return max(256 * 2**20, _available_memory() // 4)


def format_bytes(n: float) -> str:
    """``1536 * 2**20`` -> ``'1.5 GiB'``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.4g} {unit}"
    return f"{int(n)} B"
