"""The ``sde-diffusion`` command (also ``python -m sde_diffusion``).

Subcommands: ``demo``, ``train``, ``sample``, ``likelihood``, ``compare``. ``python -m
sde_diffusion.training ARGS`` (the spelling ``torchrun -m`` needs) is ``sde-diffusion train ARGS``:
it calls :func:`main` with ``["train", *ARGS]``.

Exit status: 0 when done; 2 for a mistake a user can make (one line ``sde-diffusion: error: ...``,
never a traceback); 3 when training stopped because the loss or the weights became NaN/Inf (same
one-line style; the last good checkpoint stays on disk); 128 + the signal number when training was
stopped by SIGINT/SIGTERM after checkpointing (130 for Ctrl-C in the other subcommands).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser"]

PROG = "sde-diffusion"
EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3      # train: the loss or the weights became NaN/Inf
SDE_CHOICES = ("vp", "subvp", "ve", "vp_cosine")


class UserError(Exception):
    """A mistake on the command line or in the inputs: reported in one line, exit status 2."""


# ---- shared helpers ---------------------------------------------------------------------------
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a valid device: {err}") from None


def _sde(name: str):
    from . import sdes

    return {"vp": sdes.VPSDE, "subvp": sdes.SubVPSDE, "ve": sdes.VESDE,
            "vp_cosine": lambda: sdes.VPSDE(schedule="cosine")}[name]()


def _load_model(args) -> Tuple[object, object, Optional[object], Optional[object], tuple]:
    """``(model, sde, oracle mixture or None, config or None, data shape)`` from --checkpoint or
    --oracle."""
    from .experiments import named_oracle
    from .models import OracleModel

    device = _device(args.device)
    if args.checkpoint:
        from .checkpoints import latest_checkpoint, load_checkpoint, model_from_checkpoint

        path = args.checkpoint
        if not os.path.exists(path):
            raise UserError(f"--checkpoint {path!r}: no such file or folder")
        if os.path.isdir(path):
            path = latest_checkpoint(path)
            if path is None:
                raise UserError(f"--checkpoint {args.checkpoint!r}: the folder holds no checkpoint")
        model, sde, config = model_from_checkpoint(path, use_ema=True, device=device)
        shape = tuple(load_checkpoint(path)["data_shape"])
        return model, sde, None, config, shape
    mixture = named_oracle(args.oracle, _sde(args.sde))
    return OracleModel(mixture), mixture.sde, mixture, None, tuple(mixture.event_shape)


def _add_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint file or a training workdir")
    src.add_argument("--oracle", help="a built-in exact Gaussian mixture: ring8, gmm2d, gmm64, image16")
    p.add_argument("--sde", default="vp", choices=SDE_CHOICES, help="SDE of the oracle (default vp)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def _say(args, *msg) -> None:
    if not getattr(args, "quiet", False):
        print(*msg, file=sys.stderr, flush=True)


def _ints(text: str, name: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{name} must be positive integers, got {text!r}")
    return values


def _save_picture(x, path_png: str, reference=None) -> Optional[str]:
    """A PNG beside the samples: an image grid for (N, C, H, W), a scatter for (N, 2)."""
    from .metrics import save_image_grid, save_scatter

    if x.ndim == 4 and x.shape[1] in (1, 3):
        return save_image_grid(x[:64].clamp(-1, 1), path_png, nrow=8)
    if x.ndim == 2 and x.shape[1] == 2:
        return save_scatter(x, path_png, reference=reference)
    return None


# ---- subcommands ------------------------------------------------------------------------------
def cmd_train(args, rest: Sequence[str]) -> int:
    import signal

    from ._files import atomic_write
    from .config import apply_overrides, load_config
    from .training import NonFiniteLossError, evaluate_model, train

    if not os.path.isfile(args.config):
        raise UserError(f"--config {args.config!r}: no such file")
    config = load_config(args.config)
    apply_overrides(config, list(rest))
    if args.device is not None:  # else the config's device (default "auto")
        _device(args.device)
        config.device = args.device
    if args.seed is not None:
        config.seed = args.seed
    try:
        result = train(config, args.workdir, quiet=args.quiet, resume=not args.no_resume)
    except NonFiniteLossError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE
    if result.rank != 0:  # under torchrun only rank 0 reports and evaluates
        return 128 + int(getattr(signal, result.interrupted)) if result.interrupted else 0
    _say(args, f"trained to step {result.step}; checkpoint: {result.checkpoint}")
    if result.interrupted:  # checkpointed; rerunning the same command resumes
        _say(args, f"stopped by {result.interrupted}; run the same command to resume")
        return 128 + int(getattr(signal, result.interrupted))
    if args.eval:
        scores = evaluate_model(result.model, config)

        def write(tmp: str) -> None:
            with open(tmp, "w") as fh:
                json.dump(scores, fh, indent=2)

        atomic_write(os.path.join(args.workdir, "eval.json"), write)
        print(json.dumps(scores), flush=True)
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

    from ._files import atomic_write
    from .experiments import parse_solver_spec
    from .samplers import sample

    _no_extra(rest)
    model, sde, mixture, config, shape = _load_model(args)
    spec = parse_solver_spec(args.solver)
    device = _device(args.device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        result = sample(model, shape=(args.n,) + shape, solver=spec.name, steps=args.steps,
                        grid=args.grid, generator=g, device=device, denoise=args.denoise,
                        progress=None if not args.quiet else False, **spec.options)
    x = result.samples.float().cpu()
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
            np.savez(fh, samples=x.numpy(), nfe=result.nfe, solver=spec.label)

    atomic_write(out, write)
    png = _save_picture(x, out[:-4] + ".png")
    print(json.dumps({"samples": out, "picture": png, "n": args.n, "nfe": result.nfe,
                      "solver": spec.label}))
    return 0


def _load_data(args, mixture, sde, n: int):
    import torch

    from . import data as data_module

    if args.data == "oracle":
        if mixture is None:
            raise UserError("--data oracle needs --oracle")
        return mixture.sample(n, t=sde.eps, generator=torch.Generator().manual_seed(args.seed + 1),
                              dtype=torch.float64)
    if args.data.endswith((".npz", ".npy")):
        if not os.path.isfile(args.data):
            raise UserError(f"--data {args.data!r}: no such file")
        x = data_module.load_npz(args.data)
    else:
        kwargs = {"split": "test"} if args.data == "digits" else {"n": n, "seed": args.seed + 1}
        x = data_module.get_dataset(args.data, **kwargs)
    return x[:n].double()


def cmd_likelihood(args, rest: Sequence[str]) -> int:
    import torch

    from .likelihood import log_likelihood

    _no_extra(rest)
    model, sde, mixture, _, _ = _load_model(args)
    device = _device(args.device)
    x = _load_data(args, mixture, sde, args.n).to(device)
    if hasattr(model, "net") and isinstance(model.net, torch.nn.Module):
        model.net.double()
    divergence = "exact" if args.exact else "hutchinson"
    result = log_likelihood(model, sde, x, divergence=divergence, n_probes=args.probes or 1,
                            rtol=args.rtol, atol=args.atol,
                            generator=torch.Generator(device=device).manual_seed(args.seed))
    bpd = result.bpd.double().cpu()
    nll = result.nll.double().cpu()
    half = 1.96 * float(bpd.std()) / math.sqrt(len(bpd)) if len(bpd) > 1 else float("nan")
    report = {"n": len(bpd), "dim": result.dim, "divergence": divergence,
              "nll_nats": float(nll.mean()), "bpd": float(bpd.mean()), "bpd_ci95": half,
              "nfe": result.nfe}
    if mixture is not None and args.data == "oracle":
        exact = mixture.log_prob(x.cpu(), sde.eps)
        report["exact_nll_nats"] = float(-exact.mean())
        report["max_abs_error_nats"] = float((result.log_likelihood.cpu() - exact).abs().max())
    print(json.dumps(report))
    return 0


def cmd_compare(args, rest: Sequence[str]) -> int:
    import torch

    from .experiments import compare_solvers, parse_solver_list
    from .reports import plot_error_vs_nfe, write_csv, write_markdown_table

    _no_extra(rest)
    model, sde, mixture, config, shape = _load_model(args)
    specs = parse_solver_list(args.solvers)
    nfes = _ints(args.nfe, "--nfe")
    if mixture is not None:
        reference = mixture.sample(args.n, t=sde.eps, generator=torch.Generator().manual_seed(args.seed + 7),
                                   dtype=torch.float64)
    else:
        reference = _load_data(argparse.Namespace(data=str(config.data.dataset), seed=args.seed), None,
                               sde, args.n)
    with torch.no_grad():
        rows = compare_solvers(model, specs, nfes, args.n, reference=reference, oracle=mixture,
                               grid=args.grid, seed=args.seed, sample_shape=shape,
                               flow_reference=args.metric == "flow_rmse" or mixture is not None,
                               progress=(lambda s: _say(args, f"  {s}")))
    os.makedirs(args.out, exist_ok=True)
    table = write_markdown_table(rows, os.path.join(args.out, "compare.md"))
    write_csv(rows, os.path.join(args.out, "compare.csv"))
    if not any(args.metric in r for r in rows):
        raise UserError(f"--metric {args.metric!r} is not available here; computed: "
                        f"{', '.join(sorted({k for r in rows for k in r}))}")
    plot_error_vs_nfe(rows, args.metric, os.path.join(args.out, f"{args.metric}_vs_nfe.png"))
    print(table)
    _say(args, f"wrote {args.out}/compare.md, compare.csv and {args.metric}_vs_nfe.png")
    return 0


def cmd_demo(args, rest: Sequence[str]) -> int:
    from .demo import run_demo

    _no_extra(rest)
    path = run_demo(args.out, iters=args.iters, n=args.n, nfes=_ints(args.nfe, "--nfe"),
                    seed=args.seed, quiet=args.quiet)
    print(f"report: {path}")
    return 0


def _no_extra(rest: Sequence[str]) -> None:
    if rest:
        raise UserError(f"unrecognized arguments: {' '.join(rest)}")


# ---- parser -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as argparse does, but with our prefix
        raise UserError(f"{self.prog.split()[-1]}: {message}" if " " in self.prog else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Score-based generative modelling with SDEs: train, "
                     "sample, compute likelihoods and compare samplers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("demo", help="train on two moons, compare samplers, write a report")
    p.add_argument("--out", default="sde_diffusion_demo", help="report folder (default ./sde_diffusion_demo)")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the toy config's)")
    p.add_argument("--n", type=int, default=2000, help="samples per solver (default 2000)")
    p.add_argument("--nfe", default="10,20,50,100,200", help="NFE budgets (default 10,20,50,100,200)")
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

    p = sub.add_parser("sample", help="draw samples with any solver")
    _add_source(p)
    p.add_argument("--solver", default="euler_maruyama", help="solver[:key=value...], e.g. ddim:eta=1")
    p.add_argument("--steps", type=int, default=None, help="grid steps (default: the SDE's N)")
    p.add_argument("--grid", default=None,
                   help="uniform, logsnr, karras, quadratic or focus (default: the solver's own)")
    p.add_argument("--denoise", action="store_true", help="finish with a Tweedie denoising step")
    p.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--out", default="samples.npz", help="output .npz (a .png picture is written beside it)")
    _add_common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("likelihood", help="log-likelihood in bits/dim through the probability-flow ODE")
    _add_source(p)
    p.add_argument("--data", required=True,
                   help="a data set name (moons, digits, ...), an .npz file, or 'oracle' (samples of --oracle)")
    div = p.add_mutually_exclusive_group()
    div.add_argument("--exact", action="store_true", help="exact divergence (default for --probes unset)")
    div.add_argument("--probes", type=int, default=None, help="Hutchinson estimator with K probes")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--n", type=int, default=256, help="number of data points (default 256)")
    _add_common(p)
    p.set_defaults(func=cmd_likelihood)

    p = sub.add_parser("compare", help="every solver at every NFE from the same noise: table, CSV, plot")
    _add_source(p)
    p.add_argument("--solvers", default="ancestral,ddim:eta=0,ddim:eta=1,ode_heun,dpm_solver++",
                   help="comma-separated solver[:key=value...] specs")
    p.add_argument("--nfe", default="10,20,50,100", help="NFE budgets (default 10,20,50,100)")
    p.add_argument("--metric", default="sliced_w",
                   help="metric to plot: sliced_w, flow_rmse, weight_tv or var_ratio_err")
    p.add_argument("--grid", default=None, help="one time grid for every solver (default: each its own)")
    p.add_argument("--n", type=int, default=2000, help="samples per run (default 2000)")
    p.add_argument("--out", default="compare", help="output folder (default ./compare)")
    _add_common(p)
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command == "train":
            _check_train_overrides(rest)
        if args.command == "likelihood" and args.probes is None:
            args.exact = True
        for name in ("n", "steps", "iters", "probes"):
            value = getattr(args, name, None)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be >= 1, got {value}")
        return int(args.func(args, rest) or 0)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
