"""Helpers shared by the CI scripts that run what a user runs (.ci/user_path.py, .ci/e2e.py).

Standard library only (numpy and torch are imported where a check needs them), so that the system
Python can run them before any virtual environment exists.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))      # markdown_blocks: the docs test's markdown reader

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KNOWN = (".png", ".json", ".npz", ".pt", ".md", ".csv", ".txt")   # output kinds check_file reads


class CheckFailed(Exception):
    """An output that is missing, empty or does not load."""


def copy_checkout(src: Path, dst: Path) -> Path:
    """A clean copy of the checkout ``src`` in ``dst``: the files git tracks, as they are in the
    work tree (so uncommitted edits are included, while virtual environments, untracked outputs
    of earlier runs such as ``samples.npz`` and new files not yet ``git add``-ed are not: what a
    fresh clone of the commit would hold). ``dst`` must not exist."""
    listing = subprocess.run(["git", "-C", str(src), "ls-files", "-z", "--cached"],
                             check=True, capture_output=True).stdout
    dst.mkdir(parents=True)
    for name in sorted(set(listing.decode().split("\0")) - {""}):
        path = src / name
        if path.is_file():          # a tracked file deleted in the work tree is left out
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / name)
    return dst


def clean_env(extra_path: Optional[Path] = None) -> Dict[str, str]:
    """The environment of a fresh shell: no active virtual environment or PYTHONPATH of the caller;
    ``extra_path`` (a venv's bin folder) first on PATH when given."""
    env = dict(os.environ)
    active = env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    parts = [p for p in env.get("PATH", "").split(os.pathsep)
             if p and not (active and Path(p).resolve() == (Path(active) / "bin").resolve())]
    if extra_path is not None:
        parts.insert(0, str(extra_path))
        env["VIRTUAL_ENV"] = str(extra_path.parent)
    env["PATH"] = os.pathsep.join(parts)
    return env


def run_logged(argv: Sequence[str], cwd: Path, env: Dict[str, str], log: Path,
               timeout: Optional[float] = None, echo: Callable[[str], bool] = lambda line: True
               ) -> "subprocess.CompletedProcess[str]":
    """Run ``argv`` with no stdin, its stdout and stderr merged into ``log``; lines for which
    ``echo(line)`` holds are also printed as they come. Returns the process with ``stdout`` set
    to the whole output."""
    lines: List[str] = []
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1, start_new_session=True)
        # past the timeout, the whole process group goes (pip, pytest, torchrun's workers)
        killed: List[bool] = []
        watchdog = threading.Timer(timeout, _kill_group, (proc, killed)) if timeout else None
        if watchdog is not None:
            watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                lines.append(line)
                if echo(line):
                    print("    " + line.rstrip("\n"), flush=True)
            code = proc.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
    if killed:
        lines.append(f"(killed after the {timeout:.0f} s timeout)\n")
    return subprocess.CompletedProcess(list(argv), code, "".join(lines), "")


def _kill_group(proc: subprocess.Popen, killed: List[bool]) -> None:
    killed.append(True)
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


def strict_json(text: str):
    """``json.loads`` that rejects NaN and Infinity (not JSON; other tools choke on them)."""
    def reject(name):
        raise CheckFailed(f"{name} is not valid JSON")
    return json.loads(text, parse_constant=reject)


def check_file(path: Path) -> str:
    """Check one output file by its kind: it exists; an output kind the toolkit writes (``KNOWN``)
    is not empty, and ``.png`` has a PNG header, ``.json`` parses as strict JSON, ``.npz`` loads with numpy (every array, no pickles),
    ``.pt`` loads as a toolkit checkpoint. Returns a short description; raises ``CheckFailed``."""
    if not path.is_file():
        raise CheckFailed(f"{path}: missing")
    size = path.stat().st_size
    suffix = path.suffix.lower()
    if suffix not in KNOWN:          # a lock file, say: may be empty
        return f"{path.name} ({size} bytes)"
    if size == 0:
        raise CheckFailed(f"{path}: empty")
    try:
        if suffix == ".png":
            with open(path, "rb") as fh:
                if fh.read(8) != PNG_SIGNATURE:
                    raise CheckFailed(f"{path}: not a PNG file")
        elif suffix == ".json":
            strict_json(path.read_text(encoding="utf-8"))
        elif suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as archive:
                shapes = {k: archive[k].shape for k in archive.files}
            return f"{path.name} ({', '.join(f'{k} {v}' for k, v in shapes.items())})"
        elif suffix == ".pt":
            from sde_diffusion.checkpoints import load_checkpoint

            load_checkpoint(str(path))
        elif suffix in (".md", ".csv", ".txt"):
            if not path.read_text(encoding="utf-8").strip():
                raise CheckFailed(f"{path}: only white space")
    except CheckFailed:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to load is the finding
        raise CheckFailed(f"{path}: does not load: {type(err).__name__}: {err}") from None
    return f"{path.name} ({size} bytes)"


def check_report(report: Path) -> List[str]:
    """A report written by ``sde-diffusion demo``: not empty, names at least one PNG, and every
    picture and table it names (``name.png``, ``name.csv``, relative to its folder) exists and
    loads; every PNG in its folder is one; no temporary files are left (``is_temporary``). Returns the
    problems found (empty when all holds); prints what was checked."""
    try:
        print(f"      ok  {check_file(report)}")
    except CheckFailed as err:
        return [str(err)]
    problems = []
    body = report.read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"[\w./-]+\.(?:png|csv)\b", body)))
    if not any(n.endswith(".png") for n in names):
        problems.append(f"{report}: names no PNG picture")
    for name in names:
        try:
            print(f"      ok  {check_file(report.parent / name)}")
        except CheckFailed as err:
            problems.append(f"{report.name} names {name}: {err}")
    for png in sorted(report.parent.rglob("*.png")):
        try:
            check_file(png)
        except CheckFailed as err:
            problems.append(str(err))
    leftovers = sorted(str(p) for p in report.parent.rglob("*") if is_temporary(p.name))
    if leftovers:
        problems.append(f"temporary files left behind: {', '.join(leftovers)}")
    return problems


def is_temporary(name: str) -> bool:
    """A temporary file of an atomic write (``.NAME.tmp-PID-HOST-HEX``, or ``*.tmp``)."""
    return bool(re.search(r"\.tmp(-|$)", name))


def tail(text: str, n: int = 25) -> str:
    return "\n".join("    | " + ln for ln in text.rstrip().splitlines()[-n:])
