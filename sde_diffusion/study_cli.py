"""``sde-diffusion study ddim-table|pc-table``: the papers' sampler tables on a digits checkpoint
(:mod:`sde_diffusion.studies`), written as ``table.md``, ``table.csv``, ``fd_vs_steps.png`` and
``run.json`` into ``--out``, with the estimated run time printed before the work starts."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .cli_common import (UserError, _check_grid_name, _check_out_file, _check_steps,
                         _command_line, _device, _ints, _is_grid_file, _load_model, _no_extra,
                         _require_modules, _say)

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``study`` to ``subparsers`` (its helpers: :mod:`sde_diffusion.cli_common`)."""
    from .studies import DEFAULT_MINUTES, DEFAULT_SEEDS, SCORE_SDE_SNR, STUDIES

    p = subparsers.add_parser(
        "study", help="the DDIM / score_sde sampler tables on a digits checkpoint (FD with CIs)",
        description="Run one of the papers' sampler comparisons on a digits checkpoint: "
                    "ddim-table (DDIM Table 1: eta = 0, 0.2, 0.5, 1 and sigma-hat at 10-1000 "
                    "steps) or pc-table (score_sde Table 1: P1000, P2000, C2000, PC1000). Each "
                    "cell: the digits classifier's Frechet distance to the test split, mean and "
                    "95% Student-t interval over --seeds seeds of --n samples; the data-vs-data "
                    "floor at the same n.")
    p.add_argument("study", choices=tuple(STUDIES), help="which table")
    p.add_argument("--checkpoint", required=True, help="a digits checkpoint file or training workdir")
    p.add_argument("--n", type=int, default=None,
                   help="samples per seed and cell (default: the most that fit --minutes, from "
                        "one timed network call)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"seeds per cell, >= 2 (default {DEFAULT_SEEDS})")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                   help=f"without --n: the time budget that sets n (default {DEFAULT_MINUTES:g})")
    p.add_argument("--steps", dest="study_steps", default=None,
                   help="ddim-table: comma-separated step counts (default 10,20,50,100,1000); "
                        "pc-table: one N for the columns PN, P2N, C2N, PCN (default 1000)")
    p.add_argument("--snr", type=float, default=SCORE_SDE_SNR,
                   help=f"pc-table: the Langevin corrector's signal-to-noise ratio (default "
                        f"{SCORE_SDE_SNR}, score_sde's)")
    p.add_argument("--batch", type=int, default=500, help="samples per network call (default 500)")
    p.add_argument("--out", default=None, help="report folder (default ./STUDY)")
    p.add_argument("--overwrite", action="store_true", help="replace existing report files")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--workers", type=int, default=1,
                   help="CPU processes running the (cell, seed) pairs side by side, each on "
                        "threads/workers threads, with the values of one process (default 1); "
                        "CPU only")
    p.add_argument("--quiet", action="store_true", help="no progress or messages")
    p.add_argument("--estimate", action="store_true",
                   help="print the estimated run time (one timed network call) and stop")
    p.set_defaults(func=run)
    return p


def _check_arguments(args):
    from .studies import REPORT_FILES, make_study

    if args.n is not None and args.n < 2:
        raise UserError(f"--n must be >= 2 (a Fréchet distance needs a covariance), got {args.n}")
    if args.seeds < 2:
        raise UserError(f"--seeds must be >= 2 (a confidence interval needs two values), "
                        f"got {args.seeds}")
    if not (args.minutes > 0 and args.minutes < float("inf")):
        raise UserError(f"--minutes must be a finite number > 0, got {args.minutes}")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1 and args.device != "cpu":
        raise UserError(f"--workers {args.workers} runs CPU processes; with --device "
                        f"{args.device} use --workers 1")
    if not (args.snr > 0 and args.snr < float("inf")):
        raise UserError(f"--snr must be a finite number > 0, got {args.snr}")
    steps = None if args.study_steps is None else _ints(args.study_steps, "--steps")
    if steps is not None:
        if args.study == "pc-table" and len(steps) != 1:
            raise UserError(f"--steps {args.study_steps}: pc-table takes one N (its columns "
                            f"are PN, P2N, C2N, PCN)")
        for k in steps:
            _check_steps(2 * k if args.study == "pc-table" else k, "--steps")
    study = make_study(args.study, steps, snr=args.snr)
    args.out = args.out or args.study
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a file; give a folder")
    for name in REPORT_FILES if not args.estimate else ():   # --estimate writes nothing
        _check_out_file(os.path.join(args.out, name), args.overwrite)
    return study


def _load(args):
    """The checkpoint's EMA model and data shape; a checkpoint of anything but digits images is
    refused (the Fréchet distance here is the digits classifier's)."""
    ns = argparse.Namespace(checkpoint=args.checkpoint, oracle=None, device=args.device)
    model, sde, _, config, shape = _load_model(ns)
    dataset = str(config.data.dataset) if config is not None else "?"
    if dataset != "digits":
        raise UserError(f"--checkpoint {args.checkpoint!r} was trained on {dataset!r}: the "
                        f"studies score samples with the digits classifier's Fréchet "
                        f"distance, so they need a digits checkpoint (configs/digits/*.py)")
    if len(shape) != 3 or shape[0] != 1:
        raise UserError(f"--checkpoint {args.checkpoint!r}: samples of shape {tuple(shape)}, "
                        f"not 1-channel images (the digits classifier's input)")
    if int(config.model.get("num_classes", 0) or 0) > 0:
        raise UserError(f"--checkpoint {args.checkpoint!r} is class-conditional: the studies "
                        f"compare unconditional samplers (train configs/digits/vp.py or ve.py)")
    if args.n is not None and args.n > 1437:
        raise UserError(f"--n {args.n}: the floor draws n of the 1437 digits training images; "
                        f"use --n <= 1437")
    return model, shape


def run(args, rest) -> int:
    import torch

    from .reports import provenance
    from .studies import (estimate_seconds, fit_n, run_study, study_nfe, worker_threads,
                          write_report)

    _no_extra(rest)
    _require_modules("study", ("matplotlib", "sklearn"), " for the digits data and plots")
    study = _check_arguments(args)
    device = _device(args.device)
    model, shape = _load(args)
    say = (lambda *m: None) if args.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))
    fitted = args.n is None
    if fitted:  # the most samples that fit --minutes, from one call on a full batch
        probe = estimate_seconds(study, model, args.batch, args.seeds, args.batch, shape, device,
                                 workers=args.workers)
        args.n = fit_n(probe["call_s"], args.batch, study, args.seeds, 60 * args.minutes,
                       workers=args.workers)
        if args.n < args.batch:  # a smaller batch costs more per sample: fit again at that size
            probe = estimate_seconds(study, model, args.n, args.seeds, args.batch, shape, device,
                                     workers=args.workers)
            args.n = fit_n(probe["call_s"], probe["batch"], study, args.seeds, 60 * args.minutes,
                           workers=args.workers)
        say(f"{args.study}: --n {args.n}: the most samples per seed whose estimated run time "
            f"fits --minutes {args.minutes:g}")
    est = estimate_seconds(study, model, args.n, args.seeds, args.batch, shape, device,
                           workers=args.workers)
    tell = print if args.estimate else say
    tell(f"{args.study}: {len(study.cells)} cells x {args.seeds} seeds x {args.n} samples, "
         f"{study_nfe(study)} NFE per sample and seed; one network call on {est['batch']} samples "
         f"takes {est['call_s']:.3f} s ({worker_threads(args.workers)} threads), {est['calls']} "
         f"calls{f' over {args.workers} workers' if args.workers > 1 else ''}: estimated "
         f"{est['seconds'] / 60:.1f} min")
    if args.n < 64:  # the digits classifier's features are 64-dimensional
        say(f"{args.study}: warning: --n {args.n} is below the 64 feature dimensions: the sample "
            f"covariance is singular and the distance noisy (the floor's spread at n = 50 is ~9, "
            f"at 400 ~1); fewer --steps or more --minutes buy more samples")
    for row, why in study.unavailable.items():
        say(f"{args.study}: row {row} is not run: {why}")
    if args.estimate:
        return 0
    start = time.perf_counter()
    with torch.no_grad():
        result = run_study(study, model, n=args.n, seeds=args.seeds, shape=shape,
                           batch=args.batch, seed=args.seed, device=device,
                           bar=False if args.quiet else None, progress=None if args.quiet else say,
                           workers=args.workers)
    wall = time.perf_counter() - start
    info = provenance(seed=args.seed, command=_command_line(args),
                      checkpoint=os.path.abspath(args.checkpoint), batch=args.batch,
                      workers=args.workers, snr=args.snr if args.study == "pc-table" else None,
                      n_fitted_to_minutes=args.minutes if fitted else None,
                      estimate_s=est["seconds"], call_s=est["call_s"], wall_s=wall)
    paths = write_report(result, args.out, info)
    with open(paths[0], encoding="utf-8") as fh:
        print(fh.read(), end="")
    say(f"wrote {', '.join(paths)} in {wall / 60:.1f} min (estimated {est['seconds'] / 60:.1f})")
    return 0


# ---- compare --metric fd ----------------------------------------------------------------------------
COMPARE_FILES = ("compare.md", "compare.csv", "fd_vs_nfe.png", "compare.json")


def compare_fd(args, specs, nfes) -> int:
    """``compare --checkpoint DIGITS --metric fd``: every solver at every NFE budget (as
    ``compare`` spends it, :meth:`~sde_diffusion.samplers.registry.SolverInfo.for_nfe`), scored by
    the digits Fréchet distance over ``--seeds`` seeds with 95% intervals, the paired differences
    and the data floor (:func:`sde_diffusion.studies.run_study`; no final denoising step, so the
    NFE is the budget). Writes :data:`COMPARE_FILES` into ``--out``."""
    import torch

    from .reports import provenance
    from .samplers import get_solver
    from .studies import Cell, Study, run_study, write_report

    if not args.checkpoint:
        raise UserError("--metric fd scores images with the digits classifier: it needs a "
                        "digits --checkpoint (use sliced_w or flow_rmse with --oracle)")
    if args.seeds < 2:
        raise UserError(f"--seeds must be >= 2 (a confidence interval needs two values), "
                        f"got {args.seeds}")
    adaptive = [s.label for s in specs if get_solver(s.name).adaptive]
    if adaptive:
        raise UserError(f"--metric fd compares fixed budgets; {', '.join(adaptive)} "
                        f"choose(s) their own steps (leave them out)")
    if _is_grid_file(args.grid):
        raise UserError(f"--grid {args.grid!r}: compare takes a grid name")
    _check_grid_name(args.grid)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a file; give a folder")
    for name in COMPARE_FILES:
        _check_out_file(os.path.join(args.out, name), args.overwrite)
    _require_modules("compare", ("sklearn",), " for the digits data set")
    args.estimate = False
    model, shape = _load(args)
    columns = tuple(str(b) for b in nfes)
    cells, skipped = {}, []
    for spec in specs:
        info = get_solver(spec.name)
        for col, budget in zip(columns, nfes):
            try:
                steps, options = info.for_nfe(int(budget), **spec.options)
            except ValueError as err:       # a budget below the solver's minimum: "-"
                skipped.append(f"{spec.label} @ {budget} NFE: {err}")
                continue
            cells[(spec.label, col)] = Cell(spec.name, steps, options)
    study = Study("compare", "Solvers at equal NFE", tuple(s.label for s in specs), columns,
                  {c: int(c) for c in columns}, cells, {}, tuple(skipped) + (
                      f"grid: {args.grid or 'each solver its own'}; no final denoising step",),
                  column_label="network evaluations (NFE)")
    start = time.perf_counter()
    with torch.no_grad():
        result = run_study(study, model, n=args.n, seeds=args.seeds, shape=shape,
                           seed=args.seed, grid=args.grid, denoise=False, device=_device(args.device),
                           bar=False if args.quiet else None,
                           progress=lambda m: _say(args, f"  {m}"))
    info = provenance(seed=args.seed, command=_command_line(args),
                      checkpoint=os.path.abspath(args.checkpoint),
                      wall_s=time.perf_counter() - start)
    paths = write_report(result, args.out, info, names=COMPARE_FILES)
    with open(paths[0], encoding="utf-8") as fh:
        print(fh.read(), end="")
    _say(args, f"wrote {', '.join(paths)}")
    return 0
