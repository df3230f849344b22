"""Atomic file writes: every file the toolkit writes (checkpoints, pictures, tables, samples) goes
through :func:`atomic_write`, so a crash leaves either the old file or the new one, never half."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None], fsync: bool = False) -> str:
    """Call ``write(tmp)`` on a temporary path in the target's folder (created if needed), then move
    it over ``path`` with ``os.replace`` (atomic on POSIX); the temporary file is removed on failure.
    ``fsync=True`` also flushes the file and the folder to disk (for checkpoints). Returns ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if fsync:
        _fsync_dir(folder)
    return path
