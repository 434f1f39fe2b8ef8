"""Scratch buffers that kernels reuse from call to call, and how kernels state their size: pure NumPy.

Each kernel module states the bytes its workspace needs for one block as a function
beside the code that allocates it (``*_workspace``), returning :class:`Workspace`
rows; :mod:`pipeline.budget` composes them with the reads, the graph and the number
of tasks alive at once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["scratch", "Workspace"]


class Workspace(NamedTuple):
    """One buffer (or set of buffers) a kernel holds while it works on one block."""

    name: str
    nbytes: int
    note: str = ""


def scratch(work, name, shape, dtype=np.float64):
    """A C-contiguous buffer of ``shape`` kept in ``work[name]`` between calls.

    Fresh arrays above glibc's mmap threshold (128 KiB) are new mappings, page-faulted
    and zeroed on every call (~10 us per 4 KiB page on these VMs): for the kernels'
    slices and blocks that cost as much as the arithmetic.  The buffer grows to the
    largest request and is handed out as a view; ``work=None`` gives a fresh array.

    Examples
    --------
    >>> work = {}
    >>> a = scratch(work, "x", (2, 3))
    >>> b = scratch(work, "x", (3, 2))
    >>> b.shape, np.shares_memory(a, b)
    ((3, 2), True)
    """
    if work is None:
        return np.empty(shape, dtype)
    size = math.prod(shape)
    buf = work.get(name)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = work[name] = np.empty(size, dtype)
    return buf[:size].reshape(shape)
