#!/usr/bin/env python3
"""End to end: every command that README.md and docs/cli.md show, run as a user would run it.

    VENV/bin/python .ci/e2e.py OUT

Run it with the python of a virtual environment where the package is installed the README's way
(``pip install -e .``, nothing else): that environment's ``bin`` goes first on PATH, so
``sde-diffusion``, ``torchrun`` and ``python`` are the ones a user of it gets.

The commands are read from the docs, never retyped here: every ``sde-diffusion ...``,
``torchrun ... -m sde_diffusion...`` and ``python -m sde_diffusion...`` line of the ```bash
blocks (continuations joined, comments dropped, ``&&`` chains split) and every inline code span
``sde-diffusion SUBCOMMAND ARGS``. Each page runs in its own fresh copy of the checkout (OUT/<page>),
from its top, in the page's order, so that the page's own ``train`` commands make the model
(a float32 MLP on two moons) that its later ``--checkpoint runs/moons`` commands load.

The only deviations from the docs are listed below: size-reducing flags appended to a command
(``SHRINK``) and checkpoint paths replaced (``CHECKPOINTS``). A command the docs show that fails is
a failure, never a skip. A command that is meant to fail says so in a trailing comment
(``sde-diffusion sample --n 0   # exit status 2``, see ``markdown_blocks.EXPECT_EXIT``); it must
end with that status and, for status 2, one line ``sde-diffusion: error: ...`` on stderr.

Checks per command: the exit status; no traceback; every file it created or changed exists, is
not empty and loads (``.npz`` with numpy, ``.json`` as strict JSON, ``.png`` header, ``.pt`` as a
checkpoint, ``.md``/``.csv`` not blank); no temporary files are left; and what the subcommand
promises (train: a checkpoint whose EMA weights are float32; sample: the .npz and picture it
prints, ``n`` finite samples; likelihood: one JSON line with a finite NLL for ``n`` points;
compare: compare.md, compare.csv and the metric's plot; optimize-grid: a grid file; demo: the
report and everything it names). Exit status 0 when every command passes, 1 otherwise.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ci_common import (ROOT, CheckFailed, check_file, check_report, clean_env, copy_checkout,
                    is_temporary, strict_json, tail)

from markdown_blocks import DocCommand, fenced_blocks, inline_commands, shell_commands

DOCS = ("README.md", "docs/cli.md")
SHELLS = ("bash", "sh", "shell")
TIMEOUT_S = 300          # per command

# ---- the only deviations from the docs ----------------------------------------------------------
# Size-reducing flags appended to every command of a subcommand (argparse and the config
# overrides keep the last value given), so the whole run takes a few minutes on 2 CPU cores.
SHRINK: Dict[str, List[str]] = {
    "train": ["--config.training.n_iters=50"],                   # docs: 2000-10000 steps
    "demo": ["--iters", "50", "--n", "100", "--nfe", "10"],      # docs: 4000 steps, 2000 samples
    "sample": ["--n", "200"],
    "likelihood": ["--n", "8"],
    "compare": ["--n", "200"],
    "optimize-grid": ["--pilot", "64", "--max-evals", "20"],     # docs: pilot 1024, 150 x steps
}
# Checkpoint paths replaced, per page: {page: {path in the docs: path used}}. Empty: each page
# trains runs/moons with its own `train` command before the commands that load it.
CHECKPOINTS: Dict[str, Dict[str, str]] = {}
# -------------------------------------------------------------------------------------------------


def page_commands(page: str) -> List[DocCommand]:
    """The runnable commands of a page, in the page's order."""
    text = (ROOT / page).read_text(encoding="utf-8")
    found = [c for b in fenced_blocks(text) if b.lang in SHELLS for c in shell_commands(b)]
    return sorted(found + inline_commands(text), key=lambda c: c.line)


def cli_args(argv: List[str]) -> Optional[List[str]]:
    """The ``sde_diffusion.cli.main`` arguments a command amounts to (``torchrun -m
    sde_diffusion.training ARGS`` and ``python -m sde_diffusion.training ARGS`` are ``train
    ARGS``); None if it is not one of the toolkit's commands."""
    if argv[0] == "sde-diffusion":
        return argv[1:]
    if "-m" in argv:
        k = argv.index("-m")
        module, rest = (argv[k + 1], argv[k + 2:]) if k + 1 < len(argv) else ("", [])
        if module == "sde_diffusion.training":
            return ["train", *rest]
        if module == "sde_diffusion":
            return rest
    return None


def as_run(page: str, argv: List[str]) -> Tuple[List[str], List[str]]:
    """``(argv to run, what was changed)``: checkpoint paths replaced, size flags appended."""
    argv, changed = list(argv), []
    for k, word in enumerate(argv[:-1]):
        if word == "--checkpoint" and argv[k + 1] in CHECKPOINTS.get(page, {}):
            changed.append(f"--checkpoint {argv[k + 1]} -> {CHECKPOINTS[page][argv[k + 1]]}")
            argv[k + 1] = CHECKPOINTS[page][argv[k + 1]]
    args = cli_args(argv)
    extra = SHRINK.get(args[0], []) if args else []
    if argv[0] == "torchrun":   # torchrun's own parser reads --n as an ambiguous abbreviation
        extra = ["--num-samples" if word == "--n" else word for word in extra]
    if extra:
        changed.append("+ " + " ".join(extra))
    return argv + extra, changed


def snapshot(folder: Path) -> Dict[str, Tuple[int, int]]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".git")]
        for name in filenames:
            path = Path(dirpath) / name
            st = path.stat()
            state[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return state


def run(argv: List[str], cwd: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    """Run with no stdin; past the timeout the whole process group is killed (torchrun's workers
    too)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after the {TIMEOUT_S} s timeout)"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def last_json_line(stdout: str) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    if not lines:
        raise CheckFailed("printed nothing on stdout (expected one JSON line)")
    try:
        value = strict_json(lines[-1])
    except ValueError as err:
        raise CheckFailed(f"the last line on stdout is not JSON ({err}): {lines[-1]!r}") from None
    if not isinstance(value, dict):
        raise CheckFailed(f"the last line on stdout is not a JSON object: {lines[-1]!r}")
    return value


def promised(args, cwd: Path, proc: subprocess.CompletedProcess) -> List[str]:
    """Check what the subcommand promises; returns descriptions of what was checked."""
    import numpy as np

    seen = []
    if args.command == "train":
        import torch
        from sde_diffusion.checkpoints import load_checkpoint

        path = cwd / args.workdir / "checkpoint_last.pt"
        seen.append(check_file(path))
        ema = load_checkpoint(str(path))["ema"]
        dtypes = {str(v.dtype) for v in ema.values() if torch.is_tensor(v) and v.is_floating_point()}
        if dtypes != {"torch.float32"}:
            raise CheckFailed(f"{path}: EMA weights of dtype {sorted(dtypes)}, expected float32")
        if args.eval:
            seen.append(check_file(cwd / args.workdir / "eval.json"))
    elif args.command in ("sample", "inpaint"):  # both print the samples file and the picture
        printed = last_json_line(proc.stdout)
        samples = cwd / printed.get("samples", "")
        seen.append(check_file(samples))
        with np.load(samples, allow_pickle=False) as archive:
            x = archive["samples"]
        if x.shape[0] != args.n or not np.isfinite(x).all():
            raise CheckFailed(f"{samples}: samples of shape {x.shape} (expected {args.n} rows), "
                              f"finite: {bool(np.isfinite(x).all())}")
        if printed.get("picture"):
            seen.append(check_file(cwd / printed["picture"]))
    elif args.command == "likelihood":
        printed = last_json_line(proc.stdout)
        nll = printed.get("nll_nats")
        if printed.get("n") != args.n or not isinstance(nll, (int, float)) or not math.isfinite(nll):
            raise CheckFailed(f"likelihood printed {printed} (expected n = {args.n} and a finite "
                              f"nll_nats)")
        seen.append(f"nll {nll:.4g} nats, bpd {printed.get('bpd')}")
    elif args.command == "compare":
        out = cwd / args.out
        for name in ("compare.md", "compare.csv", f"{args.metric}_vs_nfe.png"):
            seen.append(check_file(out / name))
    elif args.command == "optimize-grid":
        path = cwd / args.out
        seen.append(check_file(path))
        grid = strict_json(path.read_text(encoding="utf-8"))
        if grid.get("format") != "sde_diffusion.grid/1" or len(grid.get("times", [])) < 2:
            raise CheckFailed(f"{path}: not a grid file: {str(grid)[:200]}")
    elif args.command == "demo":
        problems = check_report(cwd / args.out / "report.md")
        if problems:
            raise CheckFailed("; ".join(problems))
        seen.append(f"{args.out}/report.md and what it names")
    return seen


def run_page(page: str, out: Path, env: Dict[str, str]) -> List[Tuple[str, str, float]]:
    """Run every command of ``page`` in a fresh copy of the checkout; returns one
    ``(where, status, seconds)`` per command."""
    from sde_diffusion.cli import UserError, build_parser

    work = copy_checkout(ROOT, out / re.sub(r"[^\w.-]", "_", page))
    results = []
    commands = page_commands(page)
    print(f"== {page}: {len(commands)} commands, in {work}", flush=True)
    if not commands:
        return [(page, "FAILED: no command found", 0.0)]
    for cmd in commands:
        where = f"{page}:{cmd.line}"
        argv, changed = as_run(page, cmd.argv)
        print(f"-- {where}  $ {cmd.text}" + (f"   [{'; '.join(changed)}]" if changed else ""),
              flush=True)
        before = snapshot(work)
        start = time.monotonic()
        proc = run(argv, work, env)
        seconds = time.monotonic() - start
        after = snapshot(work)
        problems: List[str] = []
        seen: List[str] = []
        if "Traceback (most recent call last)" in proc.stderr:
            problems.append("a traceback on stderr")
        if proc.returncode != cmd.expect:
            # the toolkit's own message, which torchrun's report would otherwise bury
            said = [ln for ln in proc.stderr.splitlines() if ln.startswith("sde-diffusion: error:")]
            problems.append(f"exit status {proc.returncode}, expected {cmd.expect}"
                            + (f" ({said[0]})" if said else ""))
        elif cmd.expect == 2:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            if len(lines) != 1 or not lines[0].startswith("sde-diffusion: error:"):
                problems.append("status 2 without exactly one line 'sde-diffusion: error: ...'")
        changed_files = sorted(p for p in after if before.get(p) != after[p])
        for name in changed_files:
            if is_temporary(Path(name).name):
                problems.append(f"temporary file left behind: {name}")
                continue
            try:
                check_file(work / name)
            except CheckFailed as err:
                problems.append(str(err))
        if cmd.expect == 0 and proc.returncode == 0:
            args = None
            try:
                args, _ = build_parser().parse_known_args(cli_args(argv))
            except UserError as err:
                problems.append(f"the command line does not parse: {err}")
            if args is not None:
                try:
                    seen = promised(args, work, proc)
                except CheckFailed as err:
                    problems.append(str(err))
                except Exception as err:  # noqa: BLE001 - a check that crashes is a failure too
                    problems.append(f"checking the outputs raised {type(err).__name__}: {err}")
        status = "ok" if not problems else "FAILED: " + "; ".join(problems)
        print(f"   {status} ({seconds:.1f} s, exit status {proc.returncode})", flush=True)
        if changed_files:
            print(f"   files: {', '.join(changed_files[:12])}"
                  + (f" and {len(changed_files) - 12} more" if len(changed_files) > 12 else ""))
        for line in seen:
            print(f"   checked: {line}")
        if problems:
            if proc.stdout.strip():
                print("   stdout:\n" + tail(proc.stdout, 10))
            if proc.stderr.strip():
                print("   stderr:\n" + tail(proc.stderr, 25))
        results.append((f"{where}  {shlex.join(cmd.argv)}", status, seconds))
    return results


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1]).resolve()
    if out.exists():
        print(f"e2e: {out} exists; give a new folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True)
    env = clean_env(Path(sys.executable).parent)
    results = []
    for page in DOCS:
        results += run_page(page, out, env)
    failed = [r for r in results if r[1] != "ok"]
    print(f"\n== end to end: {len(results) - len(failed)} of {len(results)} commands passed "
          f"in {sum(r[2] for r in results):.0f} s")
    for where, status, seconds in failed:
        print(f"  {where}\n      {status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
