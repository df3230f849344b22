"""Checkpoints that are written atomically, resume exactly and never execute code when loaded.

A checkpoint is a ``torch.save``'d dict of tensors and plain Python values only:

- ``format``: ``"sde_diffusion.checkpoint"``; ``version``: 1;
- ``step``: number of optimisation steps done;
- ``config``: the run's config as JSON *text* (never a pickled object);
- ``data_shape``: the shape of one data sample, to rebuild the network;
- ``model``, ``ema``: network state dicts (raw and exponential moving average weights);
- ``optimizer``: the optimizer's state dict (and ``grad_scaler`` for fp16);
- ``rng``: the states of every random number generator the run uses: torch's global CPU
  generator (dropout), every CUDA device's (when CUDA is initialised), Python's ``random``,
  NumPy's global generator, and the run's own noise generator;
- ``data_order``: the position in the shuffled data stream
  (``sde_diffusion.data.InfiniteBatches.state_dict()``);
- ``rng_per_rank`` (DDP runs): every rank's global torch generator state (its dropout stream).

Files are written to a temporary file in the same folder, flushed and fsync'ed, then moved over
the target with ``os.replace`` (atomic on POSIX), so a crash leaves either the old or the new file.
:func:`load_checkpoint` uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ._checks import require
from ._files import atomic_write
from .config import build_sde, config_from_json, config_to_json, network_config

__all__ = ["save_checkpoint", "load_checkpoint", "model_from_checkpoint", "latest_checkpoint",
           "capture_rng_states", "restore_rng_states", "LAST_NAME", "FORMAT"]

FORMAT = "sde_diffusion.checkpoint"
VERSION = 1
LAST_NAME = "checkpoint_last.pt"

PathLike = Union[str, os.PathLike]


def atomic_torch_save(obj: Any, path: PathLike) -> str:
    """``torch.save(obj, path)`` through a temporary file in the same folder + fsync + os.replace."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write, fsync=True)


# ---- random number generator states -------------------------------------------------------------
def capture_rng_states(**generators: Optional[torch.Generator]) -> Dict[str, Any]:
    """The states of torch's global generators (CPU, and CUDA when initialised), Python's
    ``random``, NumPy's global generator, and of the named ``generators``, as plain values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    states: Dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "generators": {name: g.get_state() for name, g in generators.items() if g is not None},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any], **generators: Optional[torch.Generator]) -> None:
    """Inverse of :func:`capture_rng_states`; the named ``generators`` are restored in place."""
    torch.set_rng_state(states["torch_cpu"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch_cuda" in states and torch.cuda.is_available():
        cuda_states = states["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    saved = states.get("generators", {})
    for gname, g in generators.items():
        if g is None:
            continue
        require(gname in saved, f"the checkpoint holds no state for generator {gname!r}")
        g.set_state(saved[gname].to("cpu") if isinstance(saved[gname], torch.Tensor) else saved[gname])


# ---- save / load ----------------------------------------------------------------------------------
def save_checkpoint(path: PathLike, *, step: int, config, data_shape, model_state: Dict,
                    ema_state: Optional[Dict] = None, optimizer_state: Optional[Dict] = None,
                    rng: Optional[Dict] = None, extra: Optional[Dict] = None) -> str:
    """Write a checkpoint atomically (see the module docstring for its contents)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "config": config if isinstance(config, str) else config_to_json(config),
        "data_shape": [int(s) for s in data_shape],
        "model": model_state,
        "ema": ema_state,
        "optimizer": optimizer_state,
        "rng": rng,
    }
    if extra:
        payload.update(extra)
    return atomic_torch_save(payload, path)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (no code runs); ``config`` comes
    back as an ``ml_collections.ConfigDict`` and ``config_json`` as the stored text."""
    path = os.fspath(path)
    require(os.path.isfile(path), f"checkpoint not found: {path!r}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    require(isinstance(ckpt, dict) and ckpt.get("format") == FORMAT,
            f"{path!r} is not an sde_diffusion checkpoint")
    require(int(ckpt.get("version", 0)) <= VERSION,
            f"{path!r} has checkpoint version {ckpt.get('version')}, newer than this code's {VERSION}")
    ckpt["config_json"] = ckpt["config"]
    ckpt["config"] = config_from_json(ckpt["config"])
    return ckpt


def latest_checkpoint(workdir: PathLike) -> Optional[str]:
    """``workdir/checkpoint_last.pt`` if present, else the numbered checkpoint with the largest
    step, else ``None``."""
    workdir = os.fspath(workdir)
    last = os.path.join(workdir, LAST_NAME)
    if os.path.isfile(last):
        return last
    best: Tuple[int, Optional[str]] = (-1, None)
    if os.path.isdir(workdir):
        for name in os.listdir(workdir):
            if name.startswith("checkpoint_") and name.endswith(".pt"):
                stem = name[len("checkpoint_"):-3]
                if stem.isdigit() and int(stem) > best[0]:
                    best = (int(stem), os.path.join(workdir, name))
    return best[1]


def model_from_checkpoint(path: PathLike, use_ema: bool = True,
                          device: Union[str, torch.device, None] = None):
    """Rebuild the trained model: ``(ScoreModel, sde, config)``.

    The network is built from the stored config (``sde_diffusion.models.build_network``) and
    loaded with the EMA weights (``use_ema=True``, what samplers and likelihoods should use) or
    the raw weights; it is put in eval mode on ``device`` (default: CPU). ``path`` may also be a
    workdir, whose latest checkpoint is used.
    """
    from .models import ScoreModel, build_network  # networks live above this leaf module

    path = os.fspath(path)
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        require(found is not None, f"no checkpoint in {path!r}")
        path = found
    ckpt = load_checkpoint(path, map_location="cpu")
    config = ckpt["config"]
    state = ckpt["ema"] if use_ema else ckpt["model"]
    require(state is not None, f"{path!r} holds no {'EMA' if use_ema else 'raw'} weights")
    net = build_network(network_config(config.model), tuple(ckpt["data_shape"]))
    net.load_state_dict(state)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if device is not None:
        net.to(device)
    sde = build_sde(config)
    model = ScoreModel(net, sde, parameterization=config.model.parameterization,
                       time_input=config.model.time_input)
    return model, sde, config
