"""Per-thread scratch buffers that tasks keep from block to block, inside a scope."""

from __future__ import annotations

import threading

__all__ = ["thread_work", "thread_buffers"]

_WORK = {}  # thread id -> that thread's scratch dict (kernels.buffers.scratch)
_SCOPES = [0]  # open thread_buffers() scopes; the outermost one frees the buffers


def thread_work():
    """The calling thread's scratch dict: a task's buffers, reused by its next task."""
    return _WORK.setdefault(threading.get_ident(), {})


class thread_buffers:
    """Scope in which tasks keep their scratch buffers from block to block.

    A fresh block of tens of MiB costs a page fault per 4 KiB (~10 us each on these
    VMs), a measurable share of a k-NN block or an EM iteration.  An operation (a
    k-NN, a whole GMM fit) runs inside one scope; the buffers, one set per thread,
    are dropped when the outermost scope ends (a cluster's workers keep theirs).
    """

    def __enter__(self):
        _SCOPES[0] += 1
        return self

    def __exit__(self, *exc):
        _SCOPES[0] -= 1
        if _SCOPES[0] == 0:
            _WORK.clear()
        return False
