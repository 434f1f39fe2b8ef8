"""Where stores live: local paths and fsspec URLs, and opening a group read-only."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

__all__ = ["as_url", "exists", "remove", "open_group", "group_url", "filesystem"]


def as_url(url) -> str:
    """``url`` as a string (a Path becomes its text); anything else is bad input."""
    if isinstance(url, Path):
        return str(url)
    if not isinstance(url, str) or not url:
        raise InputError(f"expected a dataset path or URL, got {url!r}")
    return url


def filesystem(url):
    """``(fsspec filesystem, path)`` of a URL."""
    import fsspec.core

    return fsspec.core.url_to_fs(url)


def exists(url) -> bool:
    if "://" not in url:
        return os.path.exists(url)
    fs, path = filesystem(url)
    return fs.exists(path)


def remove(url):
    """Delete whatever is at ``url`` (a store's whole tree)."""
    if "://" not in url:
        import shutil

        if os.path.isdir(url):
            shutil.rmtree(url)
        elif os.path.exists(url):
            os.remove(url)
        return
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def open_group(url, what="dataset", mode="r"):
    """Open an existing group, with one clear error for each way it is not one."""
    import zarr
    import zarr.errors

    if not exists(url):
        raise InputError(f"{what} {url!r} does not exist; check the path or create it first")
    try:
        node = zarr.open(store=url, mode=mode)
    except (zarr.errors.NodeTypeValidationError, FileNotFoundError, KeyError, ValueError) as e:
        raise InputError(f"{what} {url!r} is not a Zarr group ({e}); pass a dataset written by pipeline") from None
    if not isinstance(node, zarr.Group):
        raise InputError(
            f"{what} {url!r} is a Zarr array, not a dataset group; pass the group that "
            "holds it (e.g. the parent path), or create one with `pipeline ingest`"
        )
    return node


def group_url(group):
    """The local path of a group (None for stores without a root directory)."""
    root = getattr(group.store, "root", None)
    if root is None:
        return None
    return os.path.join(str(root), group.path) if group.path else str(root)
