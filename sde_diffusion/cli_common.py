"""Helpers shared by the ``sde-diffusion`` command (:mod:`sde_diffusion.cli`) and its
subcommand modules (:mod:`sde_diffusion.inverse.cli`, :mod:`sde_diffusion.study_cli`,
:mod:`sde_diffusion.fid_cli`): the one-line :class:`UserError`, loading a checkpoint or an oracle
and held-out data, the checks made before any work (outputs, steps, memory, optional modules) and
the output helpers (JSON, pictures, messages).

They live here, below every module that builds the command, so that a subcommand module imports
them directly instead of importing :mod:`sde_diffusion.cli`, which imports it (an import cycle,
forbidden by tests/test_architecture.py). :mod:`sde_diffusion.cli` imports them back under the
same names.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence, Tuple

PROG = "sde-diffusion"
SDE_CHOICES = ("vp", "subvp", "ve", "vp_cosine")


class UserError(Exception):
    """A mistake on the command line or in the inputs: reported in one line, exit status 2."""


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
    src.add_argument("--oracle", help="a built-in exact Gaussian mixture: ring8, gmm2d, gmm64, image16; with "
                          "classes: ring8c, gmm64c")
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
    from .reports import save_image_grid, save_scatter

    if x.ndim == 4 and x.shape[1] in (1, 3):
        return save_image_grid(x[:64].clamp(-1, 1), path_png, nrow=8)
    if x.ndim == 2 and x.shape[1] == 2:
        return save_scatter(x, path_png, reference=reference)
    return None


def _has_picture(shape: Sequence[int]) -> bool:
    """Whether :func:`_save_picture` draws samples of this event shape."""
    return (len(shape) == 3 and shape[0] in (1, 3)) or tuple(shape) == (2,)


PIP_NAMES = {"matplotlib": "matplotlib", "sklearn": "scikit-learn"}


def _require_modules(command: str, modules: Sequence[str], why: str = "") -> None:
    """Import each of ``modules`` now, so that a missing one fails in a second, not after minutes
    of work; one line naming what to install."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        pip = " ".join(PIP_NAMES.get(m, m) for m in missing)
        raise UserError(f"{command} needs {', '.join(PIP_NAMES.get(m, m) for m in missing)}"
                        f"{why}, which is not installed: pip install {pip}")


def _check_out_file(path: str, overwrite: bool, option: str = "--out") -> None:
    """An output file can be written: not an existing file unless ``overwrite``, not a folder, and
    its folder exists (it is created) and takes a new file."""
    if os.path.isdir(path):
        raise UserError(f"{option} {path!r} is a folder; give a file name")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{option} {path!r} exists; pass --overwrite to replace it, or choose "
                        f"another {option}")
    _check_writable_folder(os.path.dirname(os.path.abspath(path)), f"{option} {path!r}")


def _check_writable_folder(folder: str, what: str) -> None:
    """Create ``folder`` if needed and write (then remove) a temporary file in it."""
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"{what}: cannot write to the folder {folder!r} ({reason})") from None


def _check_steps(steps: int, what: str) -> None:
    """At most the samplers' ``MAX_STEPS`` grid steps (refused at once, not after allocating)."""
    from .samplers.grids import check_steps

    try:
        check_steps(steps, what)
    except ValueError as err:
        raise UserError(str(err)) from None


def _check_memory(n: int, shape: Sequence[int], what: str) -> None:
    """Refuse a batch whose samples alone (float32) would take more than half of the machine's
    memory: it could only fail, after the model was loaded and maybe after a long wait."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: nothing to compare with
        return
    need = 4 * n * math.prod(shape)
    if need > total / 2:
        raise UserError(f"{what} {n}: {n} samples of shape {tuple(shape)} take {need / 2**30:.1f} "
                        f"GiB in float32, more than half of this machine's {total / 2**30:.0f} "
                        f"GiB; use a smaller {what}")


def _check_grid_name(grid: Optional[str]) -> None:
    from .samplers.grids import GRIDS

    if grid is not None and not _is_grid_file(grid) and grid not in GRIDS:
        raise UserError(f"--grid {grid!r} is not a grid name ({', '.join(GRIDS)}) nor a grid "
                        f"file (FILE.json written by optimize-grid)")


def _dumps(obj, **kwargs) -> str:
    """Valid JSON text of ``obj``: NaN/Inf written as ``null``."""
    from ._files import dumps_json

    return dumps_json(obj, **kwargs)


def _is_grid_file(grid: Optional[str]) -> bool:
    return grid is not None and grid.lower().endswith(".json")


def _write_json(path: str, obj) -> None:
    from ._files import write_json

    write_json(path, obj)


#: data sets the CLI can draw by name (besides .npz/.npy files and 'oracle')
TOY_DATA = ("moons", "swiss_roll", "8gaussians", "checkerboard", "rings")


def _check_data_arg(args) -> None:
    """``--data``: a toy name, ``digits``, ``cifar10``, a CIFAR-10 folder, an existing .npz/.npy
    file, or ``oracle`` with ``--oracle``; checked before the model is loaded."""
    if args.data == "oracle":
        if not getattr(args, "oracle", None):
            raise UserError("--data oracle needs --oracle")
    elif args.data.endswith((".npz", ".npy")):
        if not os.path.isfile(args.data):
            raise UserError(f"--data {args.data!r}: no such file")
    elif args.data not in TOY_DATA + ("digits", "cifar10") and not os.path.isdir(args.data):
        raise UserError(f"--data {args.data!r} is not a data set: give one of "
                        f"{', '.join(TOY_DATA + ('digits', 'cifar10'))}, a cifar-10-batches-py "
                        f"folder (or its parent), an .npz/.npy file or 'oracle'")


def _cifar10_folder(args, config) -> Optional[str]:
    """The CIFAR-10 folder ``--data`` names: a folder given as is, or for ``cifar10`` the training
    config's ``data.path``; None when ``--data`` is not CIFAR-10."""
    if args.data != "cifar10":
        named = args.data in TOY_DATA + ("digits", "oracle") or args.data.endswith((".npz", ".npy"))
        return args.data if not named and os.path.isdir(args.data) else None
    path = config.data.get("path") if config is not None and config.data.get("dataset") == "cifar10" else None
    if not path:
        raise UserError("--data cifar10 reads the folder of a CIFAR-10 checkpoint's config "
                        "(data.path); give the folder instead: --data DIR (cifar-10-batches-py or "
                        "its parent)")
    return str(path)


def _load_data(args, mixture, sde, n: int, config=None):
    import torch

    from . import data as data_module

    folder = _cifar10_folder(args, config)
    if folder is not None:   # the test split, in [-1, 1]
        try:
            return data_module.get_dataset("cifar10", path=folder, split="test")[:n].double()
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"--data {args.data!r}: {err}") from None
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


def _command_line(args) -> str:
    """The command as given to :func:`main` (for a report's provenance)."""
    import shlex

    return " ".join(shlex.quote(str(a)) for a in [PROG, *args.argv])


def _no_extra(rest: Sequence[str]) -> None:
    if rest:
        raise UserError(f"unrecognized arguments: {' '.join(rest)}")
