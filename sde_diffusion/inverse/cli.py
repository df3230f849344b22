"""``sde-diffusion inpaint``: solve a linear inverse problem on held-out data with a trained model
or a built-in oracle, and write the samples and a picture (observed / result / truth rows).

    sde-diffusion inpaint --checkpoint runs/digits --data digits --mask lower-half --method repaint

The subcommand lives here, beside the methods; the ``sde-diffusion`` command (:mod:`sde_diffusion.cli`)
adds it with ``add_parser(subparsers)`` and runs it through ``args.func(args, rest)``. The
helpers it shares with the other subcommands (loading a checkpoint or an oracle and the data,
output checks, the one-line ``UserError``) come from :mod:`sde_diffusion.cli_common`.

Errors are ``ValueError`` (from :func:`~sde_diffusion._checks.require`) or ``UserError``;
the command prints either as one line ``sde-diffusion: error: ...`` with exit status 2.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from .._checks import require
from ..cli_common import (_add_common, _add_source, _check_data_arg, _check_memory, _check_out_file,
                          _device, _dumps, _has_picture, _load_data, _load_model, _no_extra,
                          _require_modules, _save_picture, _say)
from .operators import (HALVES, BlockAverage, Colorization, LinearOperator, Mask, box_mask,
                        half_mask, observe, random_pixel_mask)
from .registry import available_methods, get_method

__all__ = ["add_parser", "run", "parse_method_spec", "build_operator", "MASKS"]

#: the spellings of ``--mask``
MASKS = HALVES + ("box", "box:S", "random:P")
#: the spellings of ``--operator`` (besides ``mask``, which ``--mask`` configures)
OPERATORS = ("mask", "colorization", "downsample:F")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``inpaint`` to ``subparsers``."""
    p = subparsers.add_parser(
        "inpaint", help="inpainting and other linear inverse problems on held-out data",
        description="Observe held-out data through a linear operator (a mask, colorization or "
                    "block-average downsampling, with optional Gaussian noise) and sample the "
                    "posterior with one of sde_diffusion.inverse's methods (docs/inverse.md). "
                    "Writes the samples (.npz) and a picture: observed / result / truth rows.")
    _add_source(p)
    p.add_argument("--data", default=None,
                   help="held-out data: digits (its test split), a toy name, an .npz/.npy file, "
                        "or 'oracle' (samples of --oracle; the default with --oracle)")
    op = p.add_mutually_exclusive_group()
    op.add_argument("--mask", default=None,
                    help="what is hidden: lower-half (default), upper-half, left-half, "
                         "right-half, box (a centred box of half the side), box:S (S x S), or "
                         "random:P (a random fraction P of the pixels is observed)")
    op.add_argument("--operator", default=None,
                    help="instead of a mask: colorization (observe the grey image) or "
                         "downsample:F (observe the means of F x F blocks)")
    p.add_argument("--method", default="ddnm",
                   help="method[:key=value...], e.g. repaint:jump_length=2:resample=2 or "
                        "dps:zeta=0.1 (default ddnm); one of " + ", ".join(available_methods()))
    p.add_argument("--solver", default=None,
                   help="solver[:key=value...] of a method that runs one (ddnm, pigdm, "
                        "score_sde, sdedit; default: the method's own)")
    p.add_argument("--sigma-y", type=float, default=0.0,
                   help="standard deviation of the observation noise (default 0: noiseless)")
    p.add_argument("--nfe", type=int, default=100,
                   help="network evaluations per sample the method plans with (default 100)")
    p.add_argument("--n", type=int, default=8, help="number of held-out examples (default 8)")
    p.add_argument("--out", default="inpaint.npz",
                   help="output .npz (a .png picture is written beside it); an existing file is "
                        "not replaced without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_common(p)
    p.set_defaults(func=run)
    return p


def parse_method_spec(spec: str) -> Tuple[str, Dict[str, object]]:
    """``name[:key=value...]`` -> ``(name, options)``: the method must be registered, each key one
    of its options, each value of the kind of the option's default (the solver spelling's rules,
    :func:`sde_diffusion.experiments.parse_solver_spec`)."""
    from ..experiments import parse_spec

    return parse_spec(spec, get_method, "method", f"--method {spec!r}: empty method name")


def build_operator(mask: Optional[str], operator: Optional[str],
                   shape: Sequence[int], seed: int = 0) -> LinearOperator:
    """The operator of ``--mask`` / ``--operator`` for data of event ``shape``; an operator that
    does not fit the shape is a one-line error naming both."""
    shape = tuple(int(s) for s in shape)
    kind = operator if operator is not None else "mask"
    what = f"--operator {operator}" if operator is not None else f"--mask {mask or 'lower-half'}"
    try:
        if kind == "mask":
            m = mask or "lower-half"
            if m in HALVES:
                return Mask(half_mask(shape, m))
            if m == "box" or m.startswith("box:"):
                size = None if m == "box" else _number(m[4:], int, what)
                return Mask(box_mask(shape, size))
            if m.startswith("random:"):
                keep = _number(m[7:], float, what)
                return Mask(random_pixel_mask(shape, keep, seed=seed))
            raise ValueError(f"--mask {m!r} is not a mask: give one of {', '.join(MASKS)}")
        if kind == "colorization":
            return Colorization(shape)
        if kind.startswith("downsample:") or kind == "downsample":
            factor = _number(kind[len("downsample:"):], int, what) if ":" in kind else 2
            return BlockAverage(factor, shape)
    except ValueError as err:
        if str(err).startswith(("--mask", "--operator")):
            raise
        raise ValueError(f"{what} does not fit data of shape {shape}: {err}") from None
    raise ValueError(f"--operator {operator!r} is not an operator: give one of "
                     f"{', '.join(OPERATORS[1:])} (or --mask)")


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not {'an integer' if kind is int else 'a number'}") \
            from None


def _observed_picture(operator: LinearOperator, y: torch.Tensor) -> torch.Tensor:
    """What the observation shows, in the data's shape: ``A^+ y`` (a mask's hidden pixels at 0, a
    block average's blocks, the grey image in every channel)."""
    return operator.pinv(y)


def run(args, rest: Sequence[str]) -> int:
    """The ``inpaint`` subcommand (``args`` from :func:`add_parser`)."""
    import numpy as np

    from .._files import atomic_write
    from ..experiments import parse_solver_spec
    from .api import solve_inverse

    _no_extra(rest)
    # everything cheap first: method, solver, numbers, outputs, data name
    method, options = parse_method_spec(args.method)
    info = get_method(method)
    solver = None
    if args.solver is not None:
        require(info.uses_solver, f"--solver {args.solver!r}: method {method!r} runs its own loop "
                                  f"and takes no solver (methods with a solver: "
                                  f"{', '.join(n for n, i in available_methods().items() if i.uses_solver)})")
        spec = parse_solver_spec(args.solver)
        solver = spec.name
        if spec.options:
            require("solver_options" not in options,
                    "give the solver's options in --solver, not also as the method's solver_options")
            options["solver_options"] = dict(spec.options)
    require(math.isfinite(args.sigma_y) and args.sigma_y >= 0,
            f"--sigma-y must be a finite number >= 0, got {args.sigma_y}")
    require(args.nfe >= 1, f"--nfe must be >= 1, got {args.nfe}")
    if args.data is None:
        require(bool(args.oracle), "--data is needed with --checkpoint: digits, a toy name or an "
                                   ".npz/.npy file of held-out data")
        args.data = "oracle"
    _check_data_arg(args)
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    png = out[:-4] + ".png"
    _check_out_file(out, args.overwrite)

    model, sde, mixture, _, shape = _load_model(args)
    _check_memory(args.n, shape, "--n")
    operator = build_operator(args.mask, args.operator, shape, seed=args.seed)
    for need in info.needs:
        require(operator.supports(need), f"method {method!r} needs the operator's {need}, which "
                                         f"{operator.name} lacks")
    picture = _has_picture(shape)
    if picture:
        _require_modules("inpaint", ("matplotlib",), " to draw the picture")
        _check_out_file(png, args.overwrite, option="the picture")
    truth = _load_data(args, mixture, sde, args.n)
    require(tuple(truth.shape[1:]) == tuple(shape),
            f"--data {args.data}: its samples have shape {tuple(truth.shape[1:])} but the model's "
            f"have shape {tuple(shape)}")
    require(truth.shape[0] == args.n, f"--n {args.n}: --data {args.data} holds only "
                                      f"{truth.shape[0]} examples")
    device = _device(args.device)
    net = getattr(model, "net", None)
    dtype = next(net.parameters()).dtype if isinstance(net, torch.nn.Module) else torch.float64
    truth = truth.to(device=device, dtype=dtype)
    y = observe(operator, truth, args.sigma_y, generator=args.seed + 2)
    _say(args, f"inpaint: {method} on {args.n} examples of {args.data}, "
               f"{args.operator or 'mask:' + (args.mask or 'lower-half')}, "
               f"sigma_y {args.sigma_y}, nfe {args.nfe}")
    with torch.no_grad():  # the guided methods (dps, pigdm) turn the gradient on where they need it
        result = solve_inverse(model, operator, y, method=method, sigma_y=args.sigma_y,
                               nfe=args.nfe, solver=solver, generator=args.seed, **options)
    x = result.samples.detach()
    residual = (operator.A(x) - y).flatten(1).pow(2).mean(1).sqrt()
    mse = (x - truth).flatten(1).pow(2).mean(1)
    observed = _observed_picture(operator, y).detach()
    label = ":".join([method] + [f"{k}={v}" for k, v in options.items()])
    op_label = args.operator or f"mask:{args.mask or 'lower-half'}"

    def write(tmp: str) -> None:
        arrays = {"samples": x.float().cpu().numpy(), "observed": y.float().cpu().numpy(),
                  "truth": truth.float().cpu().numpy(), "nfe": result.nfe, "method": label,
                  "operator": op_label, "sigma_y": args.sigma_y}
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
            np.savez(fh, **arrays)

    atomic_write(out, write)
    drawn = None
    if picture and len(shape) == 3:
        from ..reports import save_image_grid

        k = min(args.n, 16)
        rows = torch.cat([observed[:k], x[:k], truth[:k]]).float().cpu().clamp(-1, 1)
        drawn = save_image_grid(rows, png, nrow=k)
    elif picture:  # 2-d points: the results over the truth
        drawn = _save_picture(x.float().cpu(), png, reference=truth.float().cpu())
    report = {"samples": out, "picture": drawn, "n": args.n, "method": label,
              "solver": args.solver, "operator": op_label, "sigma_y": args.sigma_y,
              "nfe": result.nfe, "nfe_budget": args.nfe,
              "residual_rms": float(residual.mean()), "mse_to_truth": float(mse.mean())}
    report.update({k: v for k, v in result.info.items() if isinstance(v, (int, float, str))})
    print(_dumps(report))
    return 0
