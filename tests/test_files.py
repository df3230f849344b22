"""Output files: atomic writes keep the umask, leave no temporary files behind, report a full or
read-only disk in one sentence; the exclusive lock names its holder and dies with it."""
import errno
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from sde_diffusion import _files
from sde_diffusion._files import (ExclusiveLock, LockHeldError, OutputError, atomic_write,
                                  remove_stale_temporaries)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_text(text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_new_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask_027):
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    atomic_write(tmp_path / "atomic.txt", _write_text("x"))
    plain = stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert plain == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == plain


def test_a_replaced_file_keeps_its_mode(tmp_path, umask_027):
    target = tmp_path / "shared.txt"
    target.write_text("old")
    os.chmod(target, 0o664)
    atomic_write(target, _write_text("new"))
    assert target.read_text() == "new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o664


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _tmp_name(target, pid, host=None):
    return f".{target}.{pid}@{host or _files._host()}.0123abcd.tmp"


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.05)
        now = time.time()
        planted = {
            "dead writer": _tmp_name("checkpoint_last.pt", _dead_pid()),
            "live writer": _tmp_name("a.png", sleeper.pid),
            "this process": _tmp_name("b.png", os.getpid()),
            "pid reused": _tmp_name("c.png", sleeper.pid),          # older than its live pid
            "other host, old": _tmp_name("d.png", 1, "elsewhere.example"),
            "other host, fresh": _tmp_name("e.png", 1, "elsewhere.example"),
            "not ours": ".notes.abc.tmp",
            "a user's file": "results.1@x.0123abcd.tmp",
            "a user's hidden file": ".results.1@x.0123abcd.tmp.bak",
        }
        for name in planted.values():
            (tmp_path / name).write_text("partial")
        os.utime(tmp_path / planted["pid reused"], (now - 3600, now - 3600))
        old = now - _files.STALE_FOREIGN_S - 60
        os.utime(tmp_path / planted["other host, old"], (old, old))

        atomic_write(tmp_path / "out.txt", _write_text("x"))     # a writer starts in the folder

        left = set(os.listdir(tmp_path))
        gone = {"dead writer", "pid reused", "other host, old"}
        for what, name in planted.items():
            assert (name not in left) == (what in gone), what
        assert "out.txt" in left
        # the explicit call finds nothing more to do
        assert remove_stale_temporaries(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_no_space_left_is_one_sentence_naming_the_file_and_the_old_file_stays(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")

    def full_disk(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError) as info:
        atomic_write(target, full_disk)
    msg = str(info.value)
    assert str(target) in msg and "No space left on device" in msg and "unchanged" in msg
    assert "\n" not in msg and info.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["table.csv"]


def test_a_storage_error_wrapped_by_a_library_is_recognised(tmp_path):
    def wrapped(tmp):
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0")

    with pytest.raises(OutputError, match="Read-only file system"):
        atomic_write(tmp_path / "x.pt", wrapped)
    assert os.listdir(tmp_path) == []


def test_other_errors_pass_through(tmp_path):
    def bug(tmp):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "x.txt", bug)
    assert os.listdir(tmp_path) == []


HOLD = """
import sys, time
from sde_diffusion._files import ExclusiveLock
lock = ExclusiveLock(sys.argv[1], purpose="test")
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(path):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.stdout.readline().strip() == "locked"
    return p


def test_the_lock_names_its_holder_and_is_released_when_the_holder_dies(tmp_path):
    path = tmp_path / ".lock"
    holder = _holder(path)
    try:
        with pytest.raises(LockHeldError) as info:
            ExclusiveLock(path).acquire()
        assert f"pid {holder.pid}" in str(info.value) and socket.gethostname() in str(info.value)
        assert "started" in str(info.value) and info.value.holder["purpose"] == "test"
    finally:
        holder.kill()                     # SIGKILL: no clean-up ran, the file still names it
        holder.wait()
    lock = ExclusiveLock(path)
    assert lock.acquire() is True and lock.read_holder()["pid"] == os.getpid()
    with pytest.raises(LockHeldError):    # a second lock in the same process conflicts too
        ExclusiveLock(path).acquire()
    lock.release()
    with ExclusiveLock(path) as again:
        assert again.held
    assert os.path.getsize(path) == 0     # released: empty, no stale holder shown


def test_a_read_only_folder_for_the_lock_is_an_output_error(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, mode=0o777, **kw):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(_files.os, "open", read_only)
    with pytest.raises(OutputError, match="Read-only file system"):
        ExclusiveLock(tmp_path / ".lock").acquire()
