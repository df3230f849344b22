#!/usr/bin/env python3
"""Run the README's commands for a fresh machine exactly as written, in a clean copy of the checkout.

    python3 .ci/user_path.py demo  WORK   # the first command: venv, torch, pip install -e ., demo
    python3 .ci/user_path.py tests WORK   # the test command: venv, torch, pip install -e ".[test]", pytest

The command text is read from README.md's ```bash blocks (never retyped here), so the README and
CI cannot disagree: ``demo`` runs the first block that calls ``sde-diffusion demo``, ``tests`` the
first block that calls ``pytest``. Each runs with ``bash -c`` in ``WORK`` (a new copy of the
checkout's tracked files, ``ci_common.copy_checkout``; it must not exist yet), with no stdin, no virtual
environment of the caller active, and installs only what the command installs. Its virtual
environment (``WORK/.venv`` if the README keeps ``.venv``) stays for the later CI steps.

``demo`` then checks what the README promises: the command ends with status 0, prints
``report: PATH``, the report is the file the README names, it is not empty, and every picture and
table it names exists and loads (PNG header, non-empty CSV); no temporary files are left behind.
The output goes to the CI log as it comes and to ``WORK.log``. Exit status 0 when all holds, 1
otherwise, with the reasons.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from ci_common import ROOT, check_report, clean_env, copy_checkout, run_logged

from markdown_blocks import fenced_blocks, inline_spans, shell_commands

README = ROOT / "README.md"
SHELLS = ("bash", "sh", "shell")


def readme_block(kind: str):
    """The README's ```bash block for ``kind``: the one that runs ``sde-diffusion demo``
    (``demo``) or ``pytest`` (``tests``)."""
    text = README.read_text(encoding="utf-8")
    for block in fenced_blocks(text):
        if block.lang not in SHELLS:
            continue
        if kind == "demo" and any(c.argv[:2] == ["sde-diffusion", "demo"] for c in shell_commands(block)):
            return block
        if kind == "tests" and re.search(r"\bpytest\b", block.code):
            return block
    raise SystemExit(f"user_path: README.md has no ```bash block that runs "
                     f"{'sde-diffusion demo' if kind == 'demo' else 'pytest'}")


def check_demo(work: Path, output: str) -> list:
    """What the README promises of its first command; returns the problems found."""
    problems = []
    printed = re.findall(r"^report: (.+)$", output, flags=re.M)
    if not printed:
        return ["the demo did not print 'report: PATH'"]
    report = (work / printed[-1].strip()).resolve()
    text = README.read_text(encoding="utf-8")
    named = [s.code for s in inline_spans(text) if s.code.endswith("report.md")]
    if named and report != (work / named[0]).resolve():
        problems.append(f"the README names {named[0]} as the report, the demo wrote {report}")
    return problems + check_report(report)


def main(argv) -> int:
    if len(argv) != 3 or argv[1] not in ("demo", "tests"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, work = argv[1], Path(argv[2]).resolve()
    if work.exists():
        print(f"user_path: {work} exists; give a new folder", file=sys.stderr)
        return 2
    block = readme_block(kind)
    command = block.code.strip()
    copy_checkout(ROOT, work)
    print(f"README.md line {block.line}, run as written in {work}:\n  $ {command}", flush=True)
    start = time.monotonic()
    log = work.parent / f"{work.name}.log"
    proc = run_logged(["bash", "-c", command], cwd=work, env=clean_env(), log=log, timeout=900)
    seconds = time.monotonic() - start
    print(f"exit status {proc.returncode} after {seconds:.0f} s (output: {log})", flush=True)
    problems = [] if proc.returncode == 0 else [f"the command ended with status {proc.returncode}"]
    if kind == "demo" and proc.returncode == 0:
        problems += check_demo(work, proc.stdout)
    if problems:
        print("FAILED: the README's " + ("first command" if kind == "demo" else "test command"))
        for p in problems:
            print(f"  - {p}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
