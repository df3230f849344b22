"""The ``sde-diffusion`` command (also ``python -m sde_diffusion``).

Subcommands: ``demo``, ``train``, ``sample``, ``likelihood``, ``compare``, ``optimize-grid``
(writes a grid file that ``sample --grid FILE.json`` reads), ``inpaint``
(:mod:`sde_diffusion.inverse.cli`) and ``fid`` (:mod:`sde_diffusion.fid_cli`). ``python -m sde_diffusion.training
ARGS`` (the spelling ``torchrun -m`` needs) is ``sde-diffusion train ARGS``: it calls :func:`main`
with ``["train", *ARGS]``.

Exit status: 0 when done; 2 for a mistake a user can make (one line ``sde-diffusion: error: ...``,
never a traceback); 3 when training stopped because the loss or the weights became NaN/Inf (same
one-line style; the last good checkpoint stays on disk); 128 + the signal number when training was
stopped by SIGINT/SIGTERM after checkpointing (130 for Ctrl-C in the other subcommands).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

# the helpers the subcommand modules share live in cli_common (they import it, not this module:
# no import cycle); imported back here under the same names, which this module and tests use
from .cli_common import (PROG, TOY_DATA, UserError, _add_common, _add_source, _check_data_arg,
                         _check_grid_name, _check_memory, _check_out_file, _check_steps,
                         _check_writable_folder, _cifar10_folder, _command_line, _device, _dumps,
                         _has_picture, _ints, _is_grid_file, _load_data, _load_model, _no_extra,
                         _require_modules, _save_picture, _say, _write_json)

__all__ = ["main", "build_parser"]

EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3      # train: the loss or the weights became NaN/Inf


# ---- checks made before any work --------------------------------------------------------------
#: optional modules a subcommand needs, imported before it starts working (pip name beside)
NEEDS = {"demo": ("matplotlib",), "compare": ("matplotlib",)}


def _check_dependencies(args) -> None:
    """Every optional dependency ``args.command`` will need (``sample``'s pictures are checked
    once the data shape is known, still before sampling)."""
    _require_modules(args.command, NEEDS.get(args.command, ()))
    if getattr(args, "data", None) == "digits":
        _require_modules(args.command, ("sklearn",), " for the digits data set")


def _check_nfe_budgets(specs, nfes: Sequence[int]) -> None:
    """Budgets that buy a solver more than ``MAX_STEPS`` steps are refused before any work (a
    budget below a solver's minimum is only a skipped row of the table)."""
    from .samplers import get_solver
    from .samplers.grids import MAX_STEPS

    for spec in specs:
        info = get_solver(spec.name)
        for nfe in nfes:
            if info.nfe is not None and nfe > MAX_STEPS:
                try:
                    info.for_nfe(int(nfe), **spec.options)
                except ValueError as err:
                    raise UserError(f"--nfe {nfe}: {err}") from None


#: ``compare``'s default samples per solver and budget; with ``--metric fd`` per seed and cell
#: (fewer: the floor's data has 1437 digits)
COMPARE_N, COMPARE_FD_N = 2000, 500


# ---- subcommands ------------------------------------------------------------------------------
def cmd_train(args, rest: Sequence[str]) -> int:
    import signal

    from ._files import LockHeldError, OutputError
    from .config import apply_overrides, load_config
    from .evaluation import evaluate_model, previews
    from .training import NonFiniteLossError, check_dependencies, train

    if not os.path.isfile(args.config):
        raise UserError(f"--config {args.config!r}: no such file")
    config = load_config(args.config)
    apply_overrides(config, list(rest))
    if args.device is not None:  # else the config's device (default "auto")
        _device(args.device)
        config.device = args.device
    if args.seed is not None:
        config.seed = args.seed
    if args.eval and config.training.get("task", "score") == "classifier":
        raise UserError("--eval scores a score model's samples; this config trains a classifier "
                        "(training.task='classifier'): drop --eval")
    try:  # a missing package is the user's one-line error: the data's (train() checks them too)
        check_dependencies(config)  # and matplotlib for the preview pictures (sample_freq > 0)
        preview = previews(config, args.workdir)
    except ImportError as err:
        raise UserError(str(err)) from None
    try:  # a workdir in use, unwritable or full; other mistakes are ValueErrors (main maps them)
        result = train(config, args.workdir, quiet=args.quiet, resume=not args.no_resume,
                       preview=preview)
    except NonFiniteLossError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE
    except (LockHeldError, OutputError) as err:
        raise UserError(str(err)) from None
    if result.rank != 0:  # under torchrun only rank 0 reports and evaluates
        return 128 + int(getattr(signal, result.interrupted)) if result.interrupted else 0
    _say(args, f"trained to step {result.step}; checkpoint: {result.checkpoint}")
    if result.interrupted:  # checkpointed; rerunning the same command resumes
        _say(args, f"stopped by {result.interrupted}; run the same command to resume")
        return 128 + int(getattr(signal, result.interrupted))
    if args.eval:
        scores = evaluate_model(result.model, config)
        _write_json(os.path.join(args.workdir, "eval.json"), scores)
        print(_dumps(scores), flush=True)
    return 0


def _check_train_overrides(rest: Sequence[str]) -> None:
    """What ``train`` does not recognise must be config overrides: ``--config.KEY=VALUE`` or the
    two words ``--config.KEY VALUE``."""
    bad, i = [], 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("--config.") and "=" in word:
            i += 1
        elif word.startswith("--config."):
            if i + 1 >= len(rest):
                raise UserError(f"{word} has no value: write {word}=VALUE")
            i += 2
        else:
            bad.append(word)
            i += 1
    if bad:
        raise UserError(f"unrecognized arguments: {' '.join(bad)} (config fields are overridden "
                        f"with --config.SECTION.KEY=VALUE)")


def cmd_sample(args, rest: Sequence[str]) -> int:
    import numpy as np
    import torch

    from . import guidance_cli, sharded
    from ._files import atomic_write
    from .experiments import SolverSpec, parse_solver_spec
    from .samplers import sample

    _no_extra(rest)
    # everything cheap first: the solver, the grid (file), the steps, the output, the guidance
    saved = _read_grid_file(args.grid) if _is_grid_file(args.grid) else None
    if args.nfe is not None:
        if args.nfe < 1:
            raise UserError(f"--nfe must be >= 1, got {args.nfe}")
        if saved is not None:
            raise UserError(f"--nfe with --grid {args.grid!r}: a grid file sets the steps (leave "
                            f"--nfe out)")
    auto = args.nfe is not None and not args.solver and saved is None  # sample(nfe=N)'s choice
    spec = None if auto else \
        parse_solver_spec(args.solver or (_fit_label(saved) if saved else "euler_maruyama"))
    if saved is not None:
        _check_grid_matches(args.grid, saved, spec, args.steps)
        if args.analytic_first_step and not saved.analytic_first_step:
            raise UserError(f"--analytic-first-step with --grid {args.grid!r}, a grid fitted "
                            f"without it: fit one with optimize-grid --analytic-first-step")
    _check_grid_name(args.grid)
    guidance_cli.check_arguments(args)
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    png = out[:-4] + ".png"
    _check_out_file(out, args.overwrite)
    processes = sharded.start(args)   # None unless sharded (--shards/--batch/torchrun)
    model, sde, mixture, config, shape = _load_model(args)
    _check_memory(args.n, shape, "--n")
    if _has_picture(shape):
        _require_modules("sample", ("matplotlib",), " to draw the picture beside the samples")
        _check_out_file(png, args.overwrite, option="the picture")
    grid, steps = args.grid, args.steps
    if saved is not None:
        grid, steps = _grid_times(args.grid, saved, sde), None
    device = _device(args.device)
    guided = guidance_cli.guided_model(args, model, sde, mixture, config, args.n, device)
    for warning in guided.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    calls = None if args.nfe is None else guidance_cli.solver_calls(args.nfe, guided)
    extra = dict(spec.options) if spec is not None else {}
    if auto and mixture is not None and not hasattr(guided.model, "mixture"):
        # a guided oracle: the automatic grid's sigma_data is the data's scale, which the guided
        # wrapper does not report (sample() reads it from an OracleModel itself)
        from .samplers.api import data_scale

        extra["sigma_data"] = data_scale(mixture)
    run_kw = dict(solver="auto" if auto else spec.name, steps=steps, nfe=calls, grid=grid,
                  denoise=args.denoise, progress=None if not args.quiet else False,
                  analytic_first_step=saved.analytic_first_step if saved is not None
                  else args.analytic_first_step, **extra)
    if processes is not None:  # shards, resumable; rank 0 gathers them
        done = sharded.cli_sample(args, guided, shape, device, processes, run_kw)
        if done is None:
            return 0
        result, counts = done
    else:
        with torch.no_grad():  # an int seed: sample i's noise depends on (seed, i) only, not on --n
            result = sample(guided.model, shape=(args.n,) + shape, generator=args.seed,
                            device=device, **run_kw)
        counts = guided.counts()
    x = result.samples.float().cpu()
    label = SolverSpec(result.config["solver"], dict(result.config["options"])).label if auto \
        else spec.label
    labels = None if guided.labels is None else guided.labels.cpu().numpy()

    def write(tmp: str) -> None:
        arrays = {"samples": x.numpy(), "nfe": result.nfe, "solver": label,
                  "network_calls": counts["network_calls"]}
        if labels is not None:
            arrays["y"] = labels
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
            np.savez(fh, **arrays)

    atomic_write(out, write)
    if labels is not None and x.ndim == 4 and _has_picture(shape):
        from .reports import save_image_grid

        rows, per_row = guidance_cli.class_rows(x, guided.labels, guided.classes)
        picture = save_image_grid(rows.clamp(-1, 1), png, nrow=per_row)
    else:
        picture = _save_picture(x, png)
    report = {"samples": out, "picture": picture, "n": args.n, "nfe": result.nfe, **counts,
              "solver": label, "grid": result.config["grid"] if auto else args.grid}
    if auto:
        report["auto"] = result.config["rule"]
    if result.config.get("analytic_first_step"):
        report["analytic_first_step"] = True
    if args.nfe is not None:
        report["nfe_budget"] = args.nfe
    report.update(guided.info)
    print(_dumps(report))
    return 0


# ---- grid files (optimize-grid writes them, sample --grid FILE.json reads them) ---------------
# The format is the optimized grid's own (samplers.tuning.OptimizedGrid.save/load).


def _read_grid_file(path: str):
    """The :class:`~sde_diffusion.samplers.tuning.OptimizedGrid` of a grid file, checked as far
    as it can be without the model; its times are checked against the model's SDE later."""
    from .samplers.tuning import OptimizedGrid

    if not os.path.isfile(path):
        raise UserError(f"--grid {path!r}: no such file (a grid name is one of uniform, logsnr, "
                        f"karras, quadratic, focus; a grid file ends in .json)")
    try:
        fit = OptimizedGrid.load(path)
    except ValueError as err:
        raise UserError(f"--grid {err}") from None
    return fit


def _fit_label(fit) -> str:
    """A grid file's solver as the command line spells it (``unipc:order=3``)."""
    from .experiments import SolverSpec

    return SolverSpec(fit.solver, dict(fit.options)).label


def _grid_times(path: str, fit, sde):
    """The grid file's times for the model's SDE (``OptimizedGrid.times_for``)."""
    try:
        return fit.times_for(sde)
    except ValueError as err:
        raise UserError(f"--grid {path!r}: {err}") from None


def _check_grid_matches(path: str, fit, spec, steps: Optional[int]) -> None:
    """A fitted grid belongs to one solver with its options and one number of steps."""
    from .samplers.tuning import effective_options

    label = _fit_label(fit)
    if spec.name != fit.solver or effective_options(spec.name, spec.options) \
            != fit.effective_options():
        raise UserError(f"--grid {path!r} was fitted for solver {label}, not for "
                        f"--solver {spec.label}: sample with --solver {label} or fit a "
                        f"grid for {spec.label} with optimize-grid")
    file_steps = len(fit.times) - 1
    if steps is not None and steps != file_steps:
        raise UserError(f"--steps {steps} disagrees with --grid {path!r}, a grid of {file_steps} "
                        f"steps (leave --steps out)")


def cmd_optimize_grid(args, rest: Sequence[str]) -> int:
    import torch

    from .experiments import parse_solver_spec
    from .samplers import optimize_grid
    from .samplers.tuning import check_grid_request

    _no_extra(rest)
    for name, value, least in (("--nfe", args.nfe, 1), ("--pilot", args.pilot, 1),
                               ("--knots", args.knots, 2), ("--max-evals", args.max_evals, 1)):
        if value is not None and value < least:
            raise UserError(f"{name} must be >= {least}, got {value}")
    if not 0 <= args.validation < 1:
        raise UserError(f"--validation must lie in [0, 1), got {args.validation}")
    if _is_grid_file(args.grid):
        raise UserError(f"--grid {args.grid!r}: optimize-grid starts from a grid name (uniform, "
                        f"logsnr, karras, quadratic, focus), not a grid file")
    _check_grid_name(args.grid)
    spec = parse_solver_spec(args.solver)
    check_grid_request(spec.name, args.steps, args.nfe, **spec.options)
    _check_out_file(args.out, args.overwrite)
    model, sde, mixture, config, shape = _load_model(args)
    _check_memory(args.pilot, shape, "--pilot")
    device = _device(args.device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    fit = optimize_grid(model, solver=spec.name, steps=args.steps, nfe=args.nfe,
                        shape=(args.pilot,) + shape, generator=g, grid=args.grid,
                        knots=args.knots, max_evals=args.max_evals, validation=args.validation,
                        device=device, analytic_first_step=args.analytic_first_step,
                        progress=None if not args.quiet else False, **spec.options)
    fit.save(args.out)
    held_out = (f", held-out {fit.initial_validation_error:.4g} -> {fit.validation_error:.4g}"
                if fit.validation_size else "")
    print(f"{spec.label} at {fit.nfe} NFE, from the {fit.start_grid} grid: pilot RMS error "
          f"{fit.initial_error:.4g} -> "
          f"{fit.pilot_error:.4g}{held_out} (teacher ~{fit.teacher_error:.2g}) after "
          f"{fit.evaluations} evaluations; wrote {args.out}", flush=True)
    return 0


def _default_grid(solver: str) -> str:
    from .samplers import get_solver

    return get_solver(solver).grid


def cmd_likelihood(args, rest: Sequence[str]) -> int:
    import torch

    from . import sharded
    from .likelihood import log_likelihood

    _no_extra(rest)
    _check_data_arg(args)
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} must be a finite number > 0, got {value}")
    processes = sharded.start(args)   # None unless sharded (--shards/--batch/torchrun)
    model, sde, mixture, config, shape = _load_model(args)
    _check_memory(args.n, shape, "--n")
    device = _device(args.device)
    x = _load_data(args, mixture, sde, args.n, config).to(device)
    offset = None
    if _cifar10_folder(args, config) is not None:  # 8-bit images: uniform dequantization (seeded)
        from .likelihood import bits_per_dim_offset, dequantize
        offset = bits_per_dim_offset(8, True)
        x = dequantize(((x + 1) * 127.5).round(), 8, True, dtype=torch.float64,
                       generator=torch.Generator(device=device).manual_seed(args.seed + 2))
    if hasattr(model, "net") and isinstance(model.net, torch.nn.Module):
        model.net.double()
    divergence = "exact" if args.exact else "hutchinson"
    more = {}
    if processes is not None:  # per-sample error control and probes; rank 0 gathers
        result, more = sharded.cli_likelihood(args, model, sde, x, divergence, processes)
        if result is None:
            return 0
    else:
        result = log_likelihood(model, sde, x, divergence=divergence, n_probes=args.probes or 1,
                                rtol=args.rtol, atol=args.atol,
                                generator=torch.Generator(device=device).manual_seed(args.seed))
    stats = result.summary(trim=0.1)
    report = {"n": stats["n"], "dim": result.dim, "divergence": divergence,
              "nll_nats": stats["nll_mean"], "bpd": stats["bpd_mean"],
              "bpd_ci95": stats["bpd_ci95"], "nll_median_nats": stats["nll_median"],
              "nll_trimmed_mean_nats": stats["nll_trimmed_mean"], "bpd_median": stats["bpd_median"],
              "bpd_trimmed_mean": stats["bpd_trimmed_mean"], "trim": stats["trim"],
              "latent_outliers": stats["latent_outliers"], "outlier_tail": stats["outlier_tail"],
              "nfe": result.nfe, **more}
    if offset is not None:   # the discrete bits/dim of the 8-bit images (docs/likelihood.md)
        for key in ("bpd", "bpd_median", "bpd_trimmed_mean"):
            report[key] += offset
        for key in ("nll_nats", "nll_median_nats", "nll_trimmed_mean_nats"):
            report[key] += result.dim * offset * math.log(2)
        report.update(dequantized="uniform, 8 bits", bpd_offset_bits=offset)
    if mixture is not None and args.data == "oracle":
        exact = mixture.log_prob(x.cpu(), sde.eps)
        report["exact_nll_nats"] = float(-exact.mean())
        report["max_abs_error_nats"] = float((result.log_likelihood.cpu() - exact).abs().max())
    if stats["latent_outliers"]:
        print(f"{PROG}: warning: {stats['latent_outliers']} of {stats['n']} points map to a latent "
              f"x_T far outside the prior (|x_T|^2 beyond its chi-square quantile 1 - "
              f"{result.outlier_tail:g}): points the model never saw; their NLL can dominate the "
              f"mean, see nll_median_nats and nll_trimmed_mean_nats", file=sys.stderr, flush=True)
    print(_dumps(report))
    return 0


def cmd_compare(args, rest: Sequence[str]) -> int:
    import torch

    from .experiments import COMPARE_METRICS, ORACLE_METRICS, compare_solvers, parse_solver_list
    from .reports import plot_error_vs_nfe, write_csv, write_markdown_table

    _no_extra(rest)
    specs = parse_solver_list(args.solvers)
    nfes = _ints(args.nfe, "--nfe")
    _check_nfe_budgets(specs, nfes)
    if args.n is None:
        args.n = COMPARE_FD_N if args.metric == "fd" else COMPARE_N
    if args.n < 2:
        raise UserError(f"--n must be >= 2 (a sample set to compare), got {args.n}")
    if args.metric == "fd":  # digits FD over seeds with intervals: sde_diffusion.study_cli
        from .study_cli import compare_fd
        return compare_fd(args, specs, nfes)
    if args.bootstrap == 1 or args.bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 (none) or a number of resamples >= 2, got "
                        f"{args.bootstrap}")
    if args.metric not in COMPARE_METRICS:
        raise UserError(f"--metric {args.metric!r} is not a metric; valid: "
                        f"{', '.join(COMPARE_METRICS)}")
    if args.metric in ORACLE_METRICS and not args.oracle:
        raise UserError(f"--metric {args.metric} compares mode weights and variances with an exact "
                        f"mixture: it needs --oracle (with --checkpoint use sliced_w or flow_rmse)")
    if args.metric == "flow_rmse" and not any(s.deterministic for s in specs):
        raise UserError("--metric flow_rmse measures deterministic solvers, and --solvers holds "
                        "none (e.g. add ddim:eta=0 or dpm_solver++)")
    if _is_grid_file(args.grid):
        raise UserError(f"--grid {args.grid!r}: compare takes a grid name (a fitted grid belongs to "
                        f"one solver at one budget; sample it with 'sample --grid')")
    _check_grid_name(args.grid)
    outputs = [os.path.join(args.out, name) for name in
               ("compare.md", "compare.csv", f"{args.metric}_vs_nfe.png")]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a file; give a folder")
    for path in outputs:
        _check_out_file(path, args.overwrite)
    model, sde, mixture, config, shape = _load_model(args)
    _check_memory(args.n, shape, "--n")
    if mixture is not None:
        reference = mixture.sample(args.n, t=sde.eps, generator=torch.Generator().manual_seed(args.seed + 7),
                                   dtype=torch.float64)
    elif str(config.data.dataset) in TOY_DATA + ("digits",):
        name = str(config.data.dataset)
        if name == "digits":
            _require_modules("compare", ("sklearn",), " for the digits data set")
        reference = _load_data(argparse.Namespace(data=name, seed=args.seed), None, sde, args.n)
    else:  # the checkpoint's own data set (an .npz, an image folder): as in training
        from .training import load_data

        reference = load_data(config)[:args.n].double()
    with torch.no_grad():
        rows = compare_solvers(model, specs, nfes, args.n, reference=reference, oracle=mixture,
                               grid=args.grid, seed=args.seed, sample_shape=shape,
                               flow_reference=args.metric == "flow_rmse" or mixture is not None,
                               bootstrap=args.bootstrap,
                               progress=(lambda s: _say(args, f"  {s}")))
    table = write_markdown_table(rows, outputs[0])
    write_csv(rows, outputs[1])
    plot_error_vs_nfe(rows, args.metric, outputs[2])
    print(table)
    _say(args, f"wrote {args.out}/compare.md, compare.csv and {args.metric}_vs_nfe.png")
    return 0


def cmd_demo(args, rest: Sequence[str]) -> int:
    from .demo import run_demo

    _no_extra(rest)
    nfes = _ints(args.nfe, "--nfe")
    if args.n < 2:
        raise UserError(f"--n must be >= 2 (a sample set to compare), got {args.n}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a file; give a folder")
    _check_writable_folder(args.out, f"--out {args.out!r}")
    path = run_demo(args.out, iters=args.iters, n=args.n, nfes=nfes, seed=args.seed,
                    quiet=args.quiet, retrain=args.retrain, command=_command_line(args))
    print(f"report: {path}")
    return 0


# ---- parser -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as argparse does, but with our prefix
        raise UserError(f"{self.prog.split()[-1]}: {message}" if " " in self.prog else message)


def build_parser() -> argparse.ArgumentParser:
    from . import fid_cli, guidance_cli, sharded, study_cli
    from .inverse import cli as inverse_cli

    parser = _Parser(prog=PROG, description="Score-based generative modelling with SDEs: train, "
                     "sample, compute likelihoods and compare samplers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("demo", help="train on two moons, compare samplers, write a report")
    p.add_argument("--out", default="sde_diffusion_demo", help="report folder (default ./sde_diffusion_demo)")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the toy config's)")
    p.add_argument("--n", type=int, default=2000, help="samples per solver (default 2000)")
    p.add_argument("--nfe", default="10,20,50,100,200", help="NFE budgets (default 10,20,50,100,200)")
    p.add_argument("--retrain", action="store_true",
                   help="train again even when the report folder holds a finished training of the "
                        "same config (reused by default)")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a score model from a config file",
                       description="Train a score model. Override any config field with "
                                   "--config.SECTION.KEY=VALUE; a workdir holding a checkpoint is "
                                   "resumed. 'python -m sde_diffusion.training' (for torchrun -m) is "
                                   "this same command. Exit status: 0 done, 2 a user error, 3 the "
                                   "loss became NaN/Inf, 128+N stopped by signal N (checkpointed).")
    p.add_argument("--config", required=True, help="a config file defining get_config()")
    p.add_argument("--workdir", required=True, help="output folder (resumed when it holds a checkpoint)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from step 0 even when workdir holds a checkpoint (overwrites "
                        "checkpoint_last.pt and loss_log.csv)")
    p.add_argument("--eval", action="store_true",
                   help="evaluate the EMA model at the end: print the scores as JSON and write "
                        "workdir/eval.json")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 or auto (default: the config's device, normally auto)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the config's seed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples with any solver, conditional or guided")
    _add_source(p)
    p.add_argument("--solver", default=None,
                   help="solver[:key=value...], e.g. ddim:eta=1 (default: with --nfe the "
                        "automatic choice for the budget, as sample(model, nfe=N); else "
                        "euler_maruyama, or the solver a --grid file was fitted for)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--steps", type=int, default=None,
                      help="grid steps (default: the SDE's N, or a --grid file's)")
    size.add_argument("--nfe", type=int, default=None,
                      help="a budget of network evaluations per sample (a guided call costs 2); "
                           "without --solver the automatic choice for the budget, as "
                           "sample(model, nfe=N)")
    p.add_argument("--grid", default=None,
                   help="uniform, logsnr, karras, quadratic or focus (default: the solver's own), "
                        "or a FILE.json written by optimize-grid")
    p.add_argument("--denoise", action="store_true", help="finish with a Tweedie denoising step")
    p.add_argument("--analytic-first-step", action="store_true", default=None,
                   help="replace the network at the first grid time by the prior's views (one "
                        "evaluation saved, Zhou et al. 2024; default: the automatic choice's "
                        "rule with --nfe, a --grid file's setting, else off)")
    p.add_argument("--n", "--num-samples", type=int, default=1000,
                   help="number of samples (default 1000; --num-samples under torchrun, whose own "
                        "parser takes --n for an abbreviation of its options)")
    p.add_argument("--out", default="samples.npz",
                   help="output .npz (a .png picture is written beside it); an existing file is "
                        "not replaced without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    guidance_cli.add_arguments(p)
    sharded.add_arguments(p)
    _add_common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("likelihood", help="log-likelihood in bits/dim through the probability-flow ODE")
    _add_source(p)
    p.add_argument("--data", required=True,
                   help="a data set name (moons, digits, cifar10: its test split, ...), a "
                        "cifar-10-batches-py folder, an .npz file, or 'oracle' (samples of --oracle)")
    div = p.add_mutually_exclusive_group()
    div.add_argument("--exact", action="store_true", help="exact divergence (default for --probes unset)")
    div.add_argument("--probes", type=int, default=None, help="Hutchinson estimator with K probes")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--n", "--num-samples", type=int, default=256,
                   help="number of data points (default 256; --num-samples under torchrun)")
    sharded.add_arguments(p)
    _add_common(p)
    p.set_defaults(func=cmd_likelihood)

    p = sub.add_parser("compare", help="every solver at every NFE from the same noise: table, CSV, plot")
    _add_source(p)
    p.add_argument("--solvers", default="ancestral,ddim:eta=0,ddim:eta=1,ode_heun,dpm_solver++",
                   help="comma-separated solver[:key=value...] specs")
    p.add_argument("--nfe", default="10,20,50,100", help="NFE budgets (default 10,20,50,100)")
    p.add_argument("--metric", default="sliced_w",
                   help="metric to plot: sliced_w, flow_rmse, weight_tv, var_ratio_err, or fd "
                        "(a digits checkpoint: Frechet distance over --seeds seeds, 95%% intervals)")
    p.add_argument("--seeds", type=int, default=3, help="--metric fd: seeds per cell (default 3)")
    p.add_argument("--grid", default=None, help="one time grid for every solver (default: each its own)")
    p.add_argument("--n", type=int, default=None,
                   help=f"samples per run (default {COMPARE_N}; --metric fd: {COMPARE_FD_N} per "
                        f"seed, at most 1437, the digits training images the floor draws from)")
    p.add_argument("--bootstrap", type=int, default=30,
                   help="resamples for the bootstrap standard error of sliced_w (column "
                        "sliced_w_se, error bars in its plot; default 30, 0 for none)")
    p.add_argument("--out", default="compare",
                   help="output folder (default ./compare); its files are not replaced without "
                        "--overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("optimize-grid",
                       help="fit a solver's time grid to the model at one NFE budget",
                       description="Fit the interior points of a deterministic solver's time grid "
                                   "to the model's own probability-flow map on a pilot batch of "
                                   "prior noise (sde_diffusion.optimize_grid) and write them to a "
                                   "JSON grid file for 'sample --grid FILE.json'.")
    _add_source(p)
    p.add_argument("--solver", default="unipc:order=3",
                   help="a deterministic fixed-step solver[:key=value...] (default unipc:order=3)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--nfe", type=int, default=None, help="network evaluations per sample")
    size.add_argument("--steps", type=int, default=None, help="grid steps")
    p.add_argument("--grid", default=None,
                   help="starting grid: uniform, logsnr, karras, quadratic or focus (default: the "
                        "best on the pilot of the solver's own, focus, logsnr, quadratic and "
                        "karras; focus uses sigma_data 0.5)")
    p.add_argument("--pilot", type=int, default=1024, help="pilot batch size (default 1024)")
    p.add_argument("--knots", type=int, default=None,
                   help="search a smooth density with K knots instead of every point")
    p.add_argument("--max-evals", type=int, default=None,
                   help="objective evaluations allowed (default 150 x steps, or 150 x K with "
                        "--knots)")
    p.add_argument("--validation", type=float, default=0.25,
                   help="share of the pilot held out to choose among the search's grids (early "
                        "stopping; default 0.25, 0 to return the best fit)")
    p.add_argument("--analytic-first-step", action="store_true",
                   help="fit for a solver that starts with the analytical first step (the grid "
                        "file records it; --nfe then buys one step more)")
    p.add_argument("--out", default="grid.json",
                   help="output grid file (default grid.json; not replaced without --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto")
    p.add_argument("--seed", type=int, default=1000,
                   help="seed of the pilot noise (default 1000: not sample's default 0, so that "
                        "the grid is not fitted to the noise it is then evaluated on)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_optimize_grid)
    inverse_cli.add_parser(sub)  # inpaint (its helpers: cli_common)
    fid_cli.add_parser(sub)      # fid (FID/KID through torchmetrics)
    study_cli.add_parser(sub)    # study (the papers' sampler tables)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``sde-diffusion ARGV`` and return its exit status (0 done, 2 a user error, 3 NaN/Inf,
    128 + signal number when stopped by a signal).

    A torchrun rank (``WORLD_SIZE > 1``) does not return: once the command is done, its process
    group closed and its output flushed, it leaves with ``os._exit(status)``, skipping the
    interpreter's teardown. There, gloo's transport threads can abort the process ("terminate
    called without an active exception", SIGABRT) after every file was written, and torchrun then
    reports the whole job as failed (CI saw it in two runs in a row, in two different two-rank
    tests)."""
    status = _run(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_rank(status)
    return status


def _leave_rank(status: int) -> None:
    """Close the process group if it is still open (an error path), flush what this rank wrote and
    end the process now (see :func:`main`)."""
    import logging

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing left to save
            pass
    os._exit(status)


def _run(argv: Optional[Sequence[str]]) -> int:
    from ._files import OutputError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = parser.parse_known_args(argv)
        args.argv = argv
        if args.command == "train":
            _check_train_overrides(rest)
        if args.command == "likelihood" and args.probes is None:
            args.exact = True
        for name in ("n", "steps", "iters", "probes"):
            value = getattr(args, name, None)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be >= 1, got {value}")
        if getattr(args, "steps", None) is not None:  # before anything is loaded or allocated
            _check_steps(args.steps, "--steps")
        if args.command != "train":  # train's config names its data; training checks that
            _check_dependencies(args)
        return int(args.func(args, rest) or 0)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # stdout closed early (`... | head`): stop quietly, as `cat` does
        _silence_stdout()
        return 128 + 13  # SIGPIPE
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError, OutputError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FloatingPointError as err:   # NonFiniteError: a NaN/Inf, with the step and time
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush into the closed pipe does
    not print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
