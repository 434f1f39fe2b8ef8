"""Output locks: one writer per output, taken over from dead processes.

A writer claims ``OUT`` by creating ``OUT.lock`` (pid, host, process start time) with
``O_EXCL``; a lock whose process is gone (a crash, SIGKILL, a recycled pid) is taken
over, a live one refuses the second writer with a message naming it.  Locks are
released by the writer (:class:`pipeline.store.results.ResultWriter`) on any exit,
and at interpreter exit for whatever this process still holds.  Non-local URLs are
not locked (no atomic create there).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from ..errors import InputError
from .urls import as_url

__all__ = ["acquire_lock", "release_lock", "held"]


_HELD = {}  # lock file -> output URL, for the locks this process holds


def _lock_path(url):
    """``OUT.lock`` beside a local output (None for other URLs: they are not locked)."""
    if "://" in url and not url.startswith("file://"):
        return None
    path = url[len("file://"):] if url.startswith("file://") else url
    return os.path.abspath(path).rstrip(os.sep) + ".lock"


def _proc_start(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(info):
    import socket

    if info.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, assume it runs
    try:
        pid = int(info["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    start = _proc_start(pid)
    # A recycled pid belongs to a process started at another time.
    return start is None or info.get("start") in (None, start)


def acquire_lock(url):
    """Claim the output ``url`` for this process (a lock file ``OUT.lock`` with pid and host).

    Raises
    ------
    InputError
        If a live process holds it.  Locks of dead processes (a crash, SIGKILL) are
        taken over; locks this process already holds are kept.
    """
    import atexit
    import socket
    import time

    path = _lock_path(url)
    if path is None or path in _HELD:
        return
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
          "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "output": url}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = Path(path).read_text()
                info = json.loads(text) if text else {}
                age = time.time() - os.path.getmtime(path)
            except (OSError, ValueError):
                info, age = {}, 0.0
            if not info and age < 5:
                time.sleep(0.2)  # a lock being written this instant
                continue
            if info and not (info.get("pid") == me["pid"] and info.get("host") == me["host"]) \
                    and _holder_alive(info):
                raise InputError(
                    f"output {url!r} is being written by another job (pid {info.get('pid')} on "
                    f"{info.get('host')} since {info.get('since')}); wait for it to finish, or "
                    f"delete {path} if that process is gone"
                )
            tmp = f"{path}.{os.getpid()}.tmp"
            Path(tmp).write_text(json.dumps(me))
            os.replace(tmp, path)  # a stale lock (its process died): take it over
            time.sleep(0.05)
            try:
                if json.loads(Path(path).read_text()).get("pid") != me["pid"]:
                    continue  # another process took it over at the same moment
            except (OSError, ValueError):
                continue
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        if not _HELD:
            atexit.register(_release_all)
        _HELD[path] = url
        return
    raise InputError(f"cannot lock output {url!r} ({path} keeps changing); another job is starting on it")


def release_lock(url):
    """Give up the lock on ``url`` if this process holds it."""
    path = _lock_path(as_url(url))
    if path is None or _HELD.pop(path, None) is None:
        return
    try:
        if json.loads(Path(path).read_text()).get("pid") == os.getpid():
            os.remove(path)
    except (OSError, ValueError):
        pass


def _release_all():
    for path in list(_HELD):
        release_lock(_HELD[path])


def held(url) -> bool:
    """Whether this process holds the lock on ``url``."""
    path = _lock_path(as_url(url))
    return path is not None and path in _HELD
