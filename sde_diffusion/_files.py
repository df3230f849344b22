"""Files the toolkit writes: atomic writes, their temporary files, and an exclusive lock.

- :func:`atomic_write`: every file the toolkit writes (checkpoints, pictures, tables, samples) goes
  through it, so a crash leaves either the old file or the new one, never half. New files get the
  mode a plain ``open(path, "w")`` gives (``0o666`` less the umask); a file that is replaced keeps
  its mode.
- Temporary files are named ``.<name>.<pid>@<host>.<8 hex digits>.tmp`` in the target's folder. A
  write that was interrupted (killed process, power loss) leaves one behind; the first
  :func:`atomic_write` of a process into a folder removes the stale ones there
  (:func:`remove_stale_temporaries`).
- Writing errors of the storage (no space, quota, read-only file system, no permission) raise
  :class:`OutputError`, an ``OSError`` whose message names the file.
- :func:`write_json` / :func:`dumps_json`: strict JSON (NaN and Infinity, which JSON lacks and strict
  parsers reject, written as ``null``), written atomically.
- :class:`ExclusiveLock`: an ``flock`` on a lock file that the OS releases when its holder dies, so
  a crashed holder never blocks the next run.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import socket
import stat
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Union

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_write", "OutputError", "remove_stale_temporaries", "ExclusiveLock",
           "LockHeldError", "STALE_FOREIGN_S", "json_safe", "dumps_json", "write_json", "write_text"]

#: errors of the storage rather than of the program: turned into :class:`OutputError`.
STORAGE_ERRNOS = frozenset(getattr(errno, name) for name in
                           ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO")
                           if hasattr(errno, name))

#: a temporary file written from another host (shared file system), whose writer's pid cannot be
#: checked from here, counts as stale when it has not been modified for this long (seconds).
STALE_FOREIGN_S = 24 * 3600.0

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]*)\.[0-9a-f]{8}\.tmp$")
_cleaned: Set[str] = set()
_cleaned_lock = threading.Lock()


def _host() -> str:
    """This machine's name, reduced to the characters a temporary file's name may hold (no ``@``,
    so the last ``@`` of a name separates the pid from the host)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64]


class OutputError(OSError):
    """An output file could not be written because of the storage (no space left, quota, a
    read-only file system, no permission). ``filename`` is the file; ``errno``/``strerror`` are
    the system's. The previous version of the file, if any, is unchanged."""

    def __init__(self, path: str, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), path)
        self.kept = os.path.isfile(path)

    def __str__(self) -> str:
        kept = " (its previous version is unchanged)" if self.kept else ""
        return f"cannot write {self.filename!r}: {self.strerror}{kept}"


def _storage_error(exc: BaseException) -> Optional[OSError]:
    """The storage ``OSError`` behind ``exc`` (itself, or what a library wrapped), if any."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


# ---- temporary files ----------------------------------------------------------------------------
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # it exists, owned by another user
        return True
    except OSError:
        return True
    return True


def _process_start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch), from Linux's /proc; ``None`` where
    that is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")   # field 22 of stat(5)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _stale(path: str, pid: int, host: str, now: float) -> bool:
    """Whether the temporary file ``path`` of writer ``pid`` on ``host`` was left behind."""
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return False
    if host != _host():
        return now - mtime > STALE_FOREIGN_S
    if pid == os.getpid():
        return False
    if not _pid_alive(pid):
        return True
    started = _process_start_time(pid)      # a live pid may be a later process that reused it
    return started is not None and mtime < started - 1.0


def remove_stale_temporaries(folder: PathLike) -> List[str]:
    """Remove the temporary files of interrupted :func:`atomic_write` calls in ``folder``: those
    whose writer (the pid in the name, on this host) is dead, or is a process that started after
    the file was last modified (the pid was reused); from another host, those not modified for
    :data:`STALE_FOREIGN_S` seconds. Files of live writers and every other file stay. Returns the
    removed paths."""
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed, now = [], time.time()
    for name in names:
        m = _TMP_RE.match(name)
        if m is None:
            continue
        path = os.path.join(folder, name)
        if _stale(path, int(m.group("pid")), m.group("host"), now):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def _new_temporary(path: str, folder: str) -> str:
    """Create the temporary file for ``path`` with mode 0o666 less the umask (what ``open`` gives),
    or the mode of the file it will replace."""
    base = f".{os.path.basename(path)}.{os.getpid()}@{_host()}."
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    while True:
        tmp = os.path.join(folder, base + secrets.token_hex(4) + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            if mode is not None:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return tmp


def atomic_write(path: PathLike, write: Callable[[str], None], fsync: bool = False) -> str:
    """Call ``write(tmp)`` on a temporary path in the target's folder (created if needed), then move
    it over ``path`` with ``os.replace`` (atomic on POSIX); the temporary file is removed on failure.
    ``fsync=True`` also flushes the file and the folder to disk (for checkpoints). Returns ``path``.

    The first call of a process for a folder removes the stale temporary files there
    (:func:`remove_stale_temporaries`). Storage errors (no space, read-only, no permission) raise
    :class:`OutputError` naming ``path``; the previous file is then unchanged."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        with _cleaned_lock:
            first = folder not in _cleaned
            _cleaned.add(folder)
        if first:
            remove_stale_temporaries(folder)
        tmp = _new_temporary(path, folder)
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        cause = _storage_error(exc)
        if cause is not None:
            raise OutputError(path, cause) from exc
        raise
    if fsync:
        _fsync_dir(folder)
    return path


# ---- an exclusive lock ----------------------------------------------------------------------------
def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/Inf float (also numpy and 0-d tensor numbers) replaced by ``None``:
    JSON has no NaN or Infinity, and strict parsers reject Python's ``NaN`` literal."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return obj
    return value if math.isfinite(value) else None


def dumps_json(obj: Any, **kwargs) -> str:
    """Valid JSON text of ``obj``: NaN/Inf written as ``null``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_text(path: PathLike, text: str) -> str:
    """``text`` written atomically (UTF-8)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)


def write_json(path: PathLike, obj: Any) -> str:
    """``obj`` as indented, valid JSON (:func:`dumps_json`), written atomically."""
    return write_text(path, dumps_json(obj, indent=2) + "\n")


class LockHeldError(RuntimeError):
    """The lock is held by another process; ``holder`` is what that process wrote in the lock
    file (``pid``, ``host``, ``started`` as seconds since the epoch; empty when unreadable)."""

    def __init__(self, message: str, holder: Dict[str, Any]):
        super().__init__(message)
        self.holder = holder


def describe_holder(holder: Dict[str, Any]) -> str:
    """``pid 123 on host h, started 2025-01-02 10:11:12 (5 min ago)`` from a lock file's content."""
    if not holder.get("pid"):
        return "a process that has not yet written its pid"
    text = f"pid {holder['pid']}"
    if holder.get("host"):
        text += f" on host {holder['host']}"
    started = holder.get("started")
    if isinstance(started, (int, float)):
        ago = max(0.0, time.time() - started)
        ago_text = f"{ago:.0f} s" if ago < 120 else (f"{ago / 60:.0f} min" if ago < 7200
                                                     else f"{ago / 3600:.1f} h")
        text += f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))} ({ago_text} ago)"
    return text


class ExclusiveLock:
    """An exclusive, non-blocking ``flock`` on ``path`` (created if needed) that records the
    holder: ``{"pid", "host", "started", **info}`` as JSON in the file.

    ``acquire()`` raises :class:`LockHeldError` at once when another process (or another
    ``ExclusiveLock`` on the same file in this process) holds it. The OS releases an ``flock``
    when its holder dies, so the lock of a crashed process never blocks: the file then still names
    the dead holder, and the next ``acquire`` overwrites it. ``release()`` empties the file and
    unlocks it (the file stays: removing it would let two processes lock two different files).
    Where the file system (or the OS) has no locks (``ENOLCK``, ``EOPNOTSUPP``, no ``fcntl``),
    ``acquire`` returns ``False`` and nothing is locked; else it returns ``True``. Usable as a
    context manager.
    """

    def __init__(self, path: PathLike, **info: Any):
        self.path = os.fspath(path)
        self.info = info
        self._fd: Optional[int] = None

    def read_holder(self) -> Dict[str, Any]:
        try:
            with open(self.path) as f:
                holder = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no flock
            return False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if exc.errno in STORAGE_ERRNOS:
                raise OutputError(self.path, exc) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.read_holder()
            raise LockHeldError(f"{self.path!r} is locked by {describe_holder(holder)}", holder) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)):
                return False
            raise
        self._fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), **self.info}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as exc:
            self.release()
            if exc.errno in STORAGE_ERRNOS:
                raise OutputError(self.path, exc) from None
            raise
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        import fcntl

        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "ExclusiveLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
