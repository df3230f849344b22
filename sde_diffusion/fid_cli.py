"""``sde-diffusion fid``: FID and KID of a samples file against reference images
(:func:`sde_diffusion.metrics.fid_kid`, torchmetrics; the optional ``metrics`` extra).

The samples are a ``.npz`` written by ``sde-diffusion sample`` (array ``samples``) or any ``.npz``/
``.npy`` of images in [-1, 1]. The reference: ``digits`` (its test split, at the samples' size), a
``cifar-10-batches-py`` folder (or its parent; ``--split``), an image folder (resized to the
samples' size) or an ``.npz``/``.npy`` file. Features: Inception-v3 from a local weights file
(``--weights``; never downloaded), or the offline ``digits`` CNN, or ``identity``.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from .cli_common import UserError, _check_out_file, _device, _dumps, _no_extra, _write_json

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``fid`` to ``subparsers`` (its helpers: :mod:`sde_diffusion.cli_common`)."""
    p = subparsers.add_parser(
        "fid", help="FID and KID of a samples file against reference images (torchmetrics)",
        description="FID and KID (torchmetrics) of --samples against --reference, on Inception-v3 "
                    "features read from a local --weights file (never downloaded) or on the "
                    "offline digits CNN (--features digits). Prints one JSON line.")
    p.add_argument("--samples", required=True, help="a .npz from 'sample' (array 'samples') or .npy")
    p.add_argument("--reference", required=True,
                   help="digits (test split), a cifar-10-batches-py folder or its parent, an image "
                        "folder, or an .npz/.npy file of images in [-1, 1]")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="CIFAR-10 split of a --reference folder (default train)")
    p.add_argument("--features", default=None, choices=("inception", "digits", "identity"),
                   help="feature network (default: inception with --weights, else digits)")
    p.add_argument("--weights", default=None,
                   help="Inception-v3 weights file (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID subset size (default 1000, capped at the smaller set)")
    p.add_argument("--batch", type=int, default=256, help="images per feature batch (default 256)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of KID's subsets (default 0)")
    p.add_argument("--quiet", action="store_true", help="no messages")
    p.set_defaults(func=run)
    return p


def _read_array(path: str, option: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise UserError(f"{option} {path!r}: no such file")
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    else:
        with np.load(path, allow_pickle=False) as f:
            key = next((k for k in ("samples", "x") if k in f.files), None)
            if key is None:
                raise UserError(f"{option} {path!r} has no array 'samples' or 'x' (it has "
                                f"{', '.join(f.files) or 'none'})")
            arr = f[key]
    x = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"{option} {path!r}: images must have shape (N, 1 or 3, H, W), got "
                        f"{tuple(x.shape)}")
    return x


def _reference(args, shape) -> torch.Tensor:
    from . import data

    ref = args.reference
    if ref == "digits":
        if shape[0] != 1:
            raise UserError(f"--reference digits has 1 channel; the samples have {shape[0]}")
        return data.digits(int(shape[1]), "test")
    if os.path.isdir(ref):
        try:
            return data.cifar10(ref, split=args.split)
        except FileNotFoundError:
            return data.load_image_folder(ref, int(shape[1]), channels=int(shape[0]))
    if ref.endswith((".npz", ".npy")):
        return _read_array(ref, "--reference")
    raise UserError(f"--reference {ref!r}: give digits, a folder (CIFAR-10 or images) or an "
                    f".npz/.npy file")


def run(args, rest) -> int:
    from .metrics import fid_kid

    _no_extra(rest)
    for name in ("kid_subsets", "kid_subset_size", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    features = args.features or ("inception" if args.weights else "digits")
    if features == "inception" and not args.weights:
        raise UserError("--features inception needs --weights FILE (Inception-v3, "
                        "pt_inception-2015-12-05-6726825d.pth; never downloaded), or use "
                        "--features digits")
    if args.weights and not os.path.isfile(args.weights):
        raise UserError(f"--weights {args.weights!r}: no such file (the Inception-v3 weights "
                        f"are never downloaded: copy pt_inception-2015-12-05-6726825d.pth here)")
    if args.out:
        _check_out_file(args.out, args.overwrite)
    device = _device(args.device)
    x = _read_array(args.samples, "--samples")
    try:   # a missing optional package (torchmetrics, torch-fidelity, scikit-learn): one line
        ref = _reference(args, tuple(x.shape[1:]))
        if tuple(ref.shape[1:]) != tuple(x.shape[1:]):
            raise UserError(f"--reference images are {tuple(ref.shape[1:])}, the samples "
                            f"{tuple(x.shape[1:])}")
        report = fid_kid(x, ref, features=features, weights=args.weights,
                         kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                         batch_size=args.batch, seed=args.seed, device=device)
    except ImportError as err:
        raise UserError(str(err)) from None
    report = {"samples": args.samples, "reference": args.reference, **report}
    if args.out:
        _write_json(args.out, report)
    print(_dumps(report))
    return 0
