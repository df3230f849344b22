"""Checkpoints that are written atomically, resume exactly and never execute code when loaded.

A checkpoint is a ``torch.save``'d dict of tensors and plain Python values only:

- ``format``: ``"sde_diffusion.checkpoint"``; ``version``: 1;
- ``step``: number of optimisation steps done;
- ``config``: the run's config as JSON *text* (never a pickled object);
- ``data_shape``: the shape of one data sample, to rebuild the network;
- ``task``: ``"score"`` or ``"classifier"`` (``config.training.task``) and ``num_classes``: the
  number of classes ``K`` of a class-conditional model or a classifier (``None``: unconditional),
  so a loaded model knows its label range (labels ``0..K-1``, ``K`` the null label); files written
  before these keys existed read as ``"score"`` and the config's ``model.num_classes``;
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
:func:`load_checkpoint` uses ``torch.load(weights_only=True)``; a file it cannot read (empty,
truncated, another kind of file, objects other than tensors and plain values) raises
:class:`CheckpointError`, a ``ValueError`` that says in one sentence what is wrong with which file.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ._checks import require
from ._files import atomic_write
from .config import config_from_json, config_to_json
from .models.factory import model_from_config

__all__ = ["save_checkpoint", "load_checkpoint", "model_from_checkpoint", "classifier_from_checkpoint",
           "latest_checkpoint",
           "capture_rng_states", "restore_rng_states", "CheckpointError", "LAST_NAME", "FORMAT"]

FORMAT = "sde_diffusion.checkpoint"
VERSION = 1
LAST_NAME = "checkpoint_last.pt"

PathLike = Union[str, os.PathLike]

#: what every checkpoint holds (``ema``, ``optimizer`` and ``rng`` may be ``None``).
REQUIRED_KEYS = ("step", "config", "data_shape", "model", "ema", "optimizer", "rng")


class CheckpointError(ValueError):
    """A file that is not a readable sde_diffusion checkpoint: missing, empty, truncated, another
    kind of file, or holding more than tensors and plain values. The message names the file."""


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
    """Write a checkpoint atomically (see the module docstring for its contents; ``task`` and
    ``num_classes`` are read from ``config``)."""
    cfg = config_from_json(config) if isinstance(config, str) else config
    num_classes = cfg.model.get("num_classes", None)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "config": config if isinstance(config, str) else config_to_json(config),
        "data_shape": [int(s) for s in data_shape],
        "task": str(cfg.training.get("task", "score")),
        "num_classes": None if num_classes is None else int(num_classes),
        "model": model_state,
        "ema": ema_state,
        "optimizer": optimizer_state,
        "rng": rng,
    }
    if extra:
        payload.update(extra)
    return atomic_torch_save(payload, path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:200] if text else type(err).__name__)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (no code runs); ``config`` comes
    back as an ``ml_collections.ConfigDict`` and ``config_json`` as the stored text.

    Raises :class:`CheckpointError` naming ``path`` when the file is missing, empty, truncated,
    not written by ``torch.save`` (every ``torch.save`` file is a zip archive), holds Python objects
    other than tensors and plain values (they are refused, not loaded: loading them could run
    code), is not an sde_diffusion checkpoint or is of a newer version."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    what = f"{path!r} is not a readable sde_diffusion checkpoint"
    try:
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{what}: the file is empty")
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{what}: it is not a complete torch.save file (a zip archive); "
                                  f"it was truncated, or is another kind of file")
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{what}: it holds Python objects other than tensors and plain "
                              f"values, which are not loaded since loading them could run code") from err
    except OSError as err:
        raise CheckpointError(f"cannot read {path!r}: {err.strerror or _first_line(err)}") from err
    except Exception as err:  # torch's reader: damaged archive, missing records, ...
        raise CheckpointError(f"{what}: it is damaged ({_first_line(err)})") from err
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT):
        raise CheckpointError(f"{path!r} is not an sde_diffusion checkpoint (a torch.save file of "
                              f"another program)")
    try:
        version = int(ckpt.get("version", 0))
    except (TypeError, ValueError):
        version = None
    if version is None or version > VERSION:
        raise CheckpointError(f"{path!r} has checkpoint version {ckpt.get('version')!r}; this code "
                              f"reads versions up to {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{what}: it lacks {', '.join(missing)}")
    try:
        config = config_from_json(ckpt["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{what}: its config is not valid JSON ({_first_line(err)})") from None
    ckpt["config_json"] = ckpt["config"]
    ckpt["config"] = config
    ckpt.setdefault("task", str(config.training.get("task", "score")))
    ckpt.setdefault("num_classes", config.model.get("num_classes", None))
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

    The model is built from the stored config (``sde_diffusion.models.model_from_config``) and
    loaded with the EMA weights (``use_ema=True``, what samplers and likelihoods should use) or
    the raw weights; it is put in eval mode on ``device`` (default: CPU). ``path`` may also be a
    workdir, whose latest checkpoint is used.
    """
    model, sde, config = _model_of(path, use_ema, device, "score")
    return model, sde, config


def classifier_from_checkpoint(path: PathLike, use_ema: bool = True,
                               device: Union[str, torch.device, None] = None):
    """Rebuild a trained noise-conditional classifier (``training.task = "classifier"``):
    ``(NoisyClassifier, sde, config)``, loaded like :func:`model_from_checkpoint` (EMA weights
    by default, eval mode, no gradients for the weights). ``clf(x, t)`` gives
    ``log p(y | x_t, t)``, shape ``(batch, num_classes)``."""
    return _model_of(path, use_ema, device, "classifier")


def _model_of(path: PathLike, use_ema: bool, device, task: str):
    path = os.fspath(path)
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path!r}")
        path = found
    ckpt = load_checkpoint(path, map_location="cpu")
    what = {"score": ("a score model", "model_from_checkpoint"),
            "classifier": ("a noise-conditional classifier", "classifier_from_checkpoint")}
    if ckpt["task"] != task:
        held, loader = what.get(ckpt["task"], (f"task {ckpt['task']!r}", "load_checkpoint"))
        raise CheckpointError(f"{path!r} holds {held} (training.task={ckpt['task']!r}), not "
                              f"{what[task][0]}; load it with {loader}")
    config = ckpt["config"]
    state = ckpt["ema"] if use_ema else ckpt["model"]
    if state is None:
        raise CheckpointError(f"{path!r} holds no {'EMA' if use_ema else 'raw'} weights")
    net, model = model_from_config(config, ckpt["data_shape"])
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path!r}: its weights do not fit the network its config describes "
                              f"({_first_line(err)}); was it trained with your own network? Then "
                              f"load load_checkpoint(path)['ema'] into it") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if device is not None:
        net.to(device)
    return model, model.sde, config
