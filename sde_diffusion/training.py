"""The training loop: one entry point for one process, several processes (torchrun, DDP) and
resumed runs.

``train(config, workdir)`` trains the network of ``config.model`` on ``config.data`` with the loss
of ``config.training`` (:func:`sde_diffusion.losses.get_loss_fn`) and score_sde's optimisation
(Adam, linear learning-rate warm-up, global gradient-norm clipping, an exponential moving average
of the weights). It writes into ``workdir``:

- ``checkpoint_last.pt`` every ``training.snapshot_freq_for_preemption`` steps, at the end, and
  when the process receives SIGINT or SIGTERM; numbered ``checkpoint_<step>.pt`` every
  ``training.snapshot_freq`` steps (0: none). Written atomically from rank 0.
- ``loss_log.csv``: ``step, loss, lr, grad_norm, elapsed_s`` every ``training.log_freq`` steps
  (the loss is the mean over the steps since the previous row and over all ranks).
- ``samples/step_<step>.png``: EMA-model samples every ``training.sample_freq`` steps.
- ``config.json``: the run's config.
- ``.lock``: held (``flock``) by the run while it trains, naming its pid, host and start time; a
  second run on the same workdir raises :class:`WorkdirInUseError` at once. The OS drops the lock
  when its holder dies, so a crashed run never blocks the next one.

Before any work (data, network) the config's settings and optional packages are checked, then
the workdir is created and locked, which also shows a read-only or full disk; a storage error
later (no space while checkpointing) raises ``sde_diffusion._files.OutputError`` naming the file,
and the previous checkpoint stays intact.

When ``workdir`` holds a checkpoint the run resumes from it: model, EMA, optimizer, step, the
RNG states (torch CPU/CUDA, Python, NumPy, the data-order and noise generators) and the position
in the data order are restored, so an interrupted and resumed run ends with the same weights as
an uninterrupted one, bit for bit (on the same hardware and thread count). A checkpoint of
another network (its constructor fields, parameterization or time input), another forward SDE
or another data shape, or one that cannot be read, is refused with :class:`ResumeError` naming
the fields that differ; ``resume=False`` (``--no-resume``) or a new workdir starts over. Other
config changes (learning rate, batch size, ...) are allowed with a warning that lists them.

Launched with ``torchrun --nproc_per_node=K -m sde_diffusion.training --config ...`` the same code
runs DDP (``nccl`` on GPU, ``gloo`` on CPU): every rank takes a disjoint slice of each global batch
of ``training.batch_size`` samples and draws the noise of the whole global batch from the same
seeded generator, so the update equals that of one process with the global batch (up to the
summation order of the gradient all-reduce).

Command line: ``sde-diffusion train`` (:mod:`sde_diffusion.cli`); ``python -m
sde_diffusion.training`` is the same command under the module name ``torchrun -m`` needs::

    python -m sde_diffusion.training --config configs/toy/moons_vp.py --workdir runs/moons \\
        --config.training.n_iters=5000 --config.optim.lr=1e-3
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ._checks import require
from ._files import (STORAGE_ERRNOS, ExclusiveLock, LockHeldError, OutputError, atomic_write,
                     describe_holder, remove_stale_temporaries)
from .checkpoints import (LAST_NAME, CheckpointError, capture_rng_states, latest_checkpoint,
                          load_checkpoint, model_from_checkpoint, restore_rng_states,
                          save_checkpoint)
from .config import MODEL_KEYS, build_sde, config_to_json, flatten, network_config
from .losses import get_loss_fn
from .models.wrapper import ScoreModel

__all__ = ["train", "TrainResult", "NonFiniteLossError", "WorkdirInUseError", "ResumeError",
           "check_dependencies", "build_model", "load_data", "evaluate_model",
           "model_from_checkpoint", "load_checkpoint", "main"]

LOG_NAME = "loss_log.csv"
LOCK_NAME = ".lock"
LOG_FIELDS = ("step", "loss", "lr", "grad_norm", "elapsed_s")


class NonFiniteLossError(FloatingPointError):
    """The training loss (or the weights) became NaN/Inf; ``step`` is the first bad step and
    ``checkpoint`` the last good checkpoint kept on disk (or ``None``)."""

    def __init__(self, message: str, step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class WorkdirInUseError(LockHeldError):
    """Another training run holds the workdir's lock (``workdir/.lock``); ``holder`` has its
    ``pid``, ``host`` and ``started`` time."""


class ResumeError(ValueError):
    """The workdir's checkpoint cannot be resumed with this config (another network or SDE, another
    data shape, or an unreadable checkpoint); ``train(..., resume=False)`` starts over."""


START_OVER = ("start over with --no-resume (resume=False; it overwrites checkpoint_last.pt and "
              "loss_log.csv) or in a new workdir")


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""
    step: int                                   # optimisation steps done
    losses: List[Tuple[int, float]]             # (step, mean loss) of every row logged in this call
    workdir: str
    checkpoint: Optional[str]                   # path of checkpoint_last.pt (None if not written)
    net: nn.Module                              # raw weights (unwrapped from DDP)
    ema_net: nn.Module                          # EMA weights, eval mode
    model: ScoreModel                           # the EMA network wrapped for samplers
    sde: Any
    config: Any
    interrupted: Optional[str] = None           # "SIGINT"/"SIGTERM" when stopped by a signal
    resumed_from: Optional[int] = None          # step of the checkpoint resumed from
    elapsed_s: float = 0.0
    rank: int = 0
    world_size: int = 1
    sample_paths: List[str] = field(default_factory=list)


# ---- building blocks --------------------------------------------------------------------------
def load_data(config, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The training set named by ``config.data.dataset`` (``sde_diffusion.data.get_dataset``):
    2-D toys get ``n=config.data.n_train`` samples drawn with ``generator``; ``digits`` gets
    ``size=image_size`` and ``split``; ``npz`` gets ``path`` and ``key``; ``images`` gets ``path``,
    ``size=image_size`` and ``channels=num_channels``."""
    from . import data as data_module

    d = config.data
    name = str(d.dataset)
    if name == "digits":
        kwargs = {"size": int(d.image_size), "split": str(d.split)}
    elif name == "npz":
        kwargs = {"path": str(d.path), "key": str(d.key)}
    elif name == "images":
        kwargs = {"path": str(d.path), "size": int(d.image_size), "channels": int(d.num_channels)}
    else:
        kwargs = {"n": int(d.n_train), "generator": generator}
    x = data_module.get_dataset(name, **kwargs)
    require(isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] >= 1,
            f"dataset {name!r} must be a (N, ...) tensor, got {type(x).__name__}")
    return x.float()


def build_model(config, data_shape: Sequence[int], sde=None) -> Tuple[nn.Module, ScoreModel]:
    """The network of ``config.model`` for ``data_shape`` and its :class:`ScoreModel` wrapper."""
    from .models import build_network

    sde = build_sde(config) if sde is None else sde
    net = build_network(network_config(config.model), tuple(int(s) for s in data_shape))
    model = ScoreModel(net, sde, parameterization=str(config.model.parameterization),
                       time_input=str(config.model.time_input))
    return net, model


def _resolve_device(name: str, local_rank: int) -> torch.device:
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"config.device={name!r} but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


class _Distributed:
    """torch.distributed set-up when launched by torchrun (WORLD_SIZE > 1 in the environment)."""

    def __init__(self, device_name: str):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if world > 1 or dist.is_initialized():
            if not dist.is_initialized():
                device = _resolve_device(device_name, self.local_rank)
                backend = "nccl" if device.type == "cuda" else "gloo"
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                dist.init_process_group(backend=backend)
                self.owns_group = True
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self.device = _resolve_device(device_name, self.local_rank)
        self.enabled = self.world_size > 1

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _ema_rate(rate) -> float:
    rate = float(rate)
    require(0.0 <= rate < 1.0, f"config.model.ema_rate must lie in [0, 1), got {rate!r}")
    return rate


class _EMA:
    """Exponential moving average of the weights, score_sde's ``ExponentialMovingAverage`` with
    ``use_num_updates``: decay ``min(rate, (1 + n) / (10 + n))`` at update ``n``."""

    def __init__(self, net: nn.Module, rate: float):
        self.rate = _ema_rate(rate)
        self.net = copy.deepcopy(net).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.src = [p for p in net.parameters()]
        self.dst = [p for p in self.net.parameters()]
        self.src_buffers = [b for b in net.buffers()]
        self.dst_buffers = [b for b in self.net.buffers()]

    @torch.no_grad()
    def update(self, num_updates: int) -> None:
        decay = min(self.rate, (1.0 + num_updates) / (10.0 + num_updates))
        torch._foreach_lerp_(self.dst, self.src, 1.0 - decay)
        if self.dst_buffers:
            torch._foreach_copy_(self.dst_buffers, self.src_buffers)


def _lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Learning rate of the update that takes the run from ``step`` to ``step + 1``: linear warm-up
    over ``warmup`` updates (score_sde uses ``step / warmup``, which makes its first update
    lr = 0; we use ``(step + 1) / warmup``)."""
    return base_lr * min((step + 1) / warmup, 1.0) if warmup > 0 else base_lr


def _optimizer_class(config):
    name = str(config.optim.optimizer).lower()
    require(name in ("adam", "adamw"),
            f"config.optim.optimizer must be 'Adam' or 'AdamW', got {config.optim.optimizer!r}")
    return torch.optim.Adam if name == "adam" else torch.optim.AdamW


def _make_optimizer(config, params) -> torch.optim.Optimizer:
    o = config.optim
    kwargs = dict(lr=float(o.lr), betas=(float(o.beta1), float(o.get("beta2", 0.999))),
                  eps=float(o.eps), weight_decay=float(o.weight_decay))
    return _optimizer_class(config)(params, **kwargs)


def _amp_mode(config) -> str:
    mode = str(config.training.get("mixed_precision", "no")).lower()
    require(mode in ("no", "bf16", "fp16"),
            f"config.training.mixed_precision must be 'no', 'bf16' or 'fp16', got {mode!r}")
    return mode


def _autocast(config, device: torch.device):
    """(autocast dtype or None, GradScaler or None) for ``config.training.mixed_precision``."""
    mode = _amp_mode(config)
    if mode == "no":
        return None, None
    if device.type != "cuda":
        warnings.warn(f"mixed_precision={mode!r} is for GPUs; training in float32 on {device}")
        return None, None
    if mode == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


class _SignalCatcher:
    """SIGINT/SIGTERM set a flag (the loop checkpoints and stops); a second SIGINT interrupts."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def _truncate_log(path: str, step: int) -> None:
    """Drop log rows after ``step`` (written by a run that went on past its last checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(keep) != len(rows):
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(keep)

        atomic_write(path, write)


class _writing:
    """Turn a storage ``OSError`` (no space, read-only, no permission) raised inside the block into
    an :class:`~sde_diffusion._files.OutputError` naming ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if isinstance(err, OSError) and not isinstance(err, OutputError) and err.errno in STORAGE_ERRNOS:
            raise OutputError(self.path, err) from None
        return False


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _config_changes(old, new) -> List[str]:
    """``"key: old -> new"`` for every field that differs between two configs, but for those that
    may change when a run resumes (lengths, frequencies, sampling, evaluation, device)."""
    a, b = flatten(old), flatten(new)
    ignore = ("training.n_iters", "training.log_freq", "training.snapshot_freq",
              "training.snapshot_freq_for_preemption", "training.sample_freq",
              "training.n_preview", "sampling.", "eval.", "device")
    out = []
    for k in sorted(set(a) | set(b)):
        if any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignore):
            continue
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, list):
            va = tuple(va)
        if isinstance(vb, list):
            vb = tuple(vb)
        if va != vb:
            out.append(f"{k}: {va!r} -> {vb!r}")
    return out


#: ``config.model`` fields that are not the network's constructor arguments but still change what
#: its weights mean: refused on resume like a change of the network.
_MEANING_KEYS = ("model.parameterization", "model.time_input")


def _sde_without_eps(config) -> str:
    """The forward process ``config`` defines, as text, without ``eps`` (the end of sampling and
    likelihood integrals, which the weights do not depend on)."""
    c = copy.deepcopy(config)
    if "sde_eps" in c.model:
        c.model.sde_eps = 0.0
    return repr(build_sde(c))


def _check_resumable(found: str, saved, config, own_net: bool) -> None:
    """Refuse to resume ``found`` (trained with config ``saved``) under ``config`` when the network
    (``config.model``'s constructor arguments; not checked for a network of one's own), its
    parameterization or time input, or the forward SDE differ; warn about other changes."""
    changes = _config_changes(saved, config)
    key = lambda change: change.split(":", 1)[0]  # noqa: E731
    net_keys = set() if own_net else {"model." + k for k in (*network_config(saved.model).keys(),
                                                              *network_config(config.model).keys())}
    model_changes = [c for c in changes if key(c) in net_keys or key(c) in _MEANING_KEYS]
    old_sde, new_sde = _sde_without_eps(saved), _sde_without_eps(config)
    sde_keys = {"training.sde", *("model." + k for k in MODEL_KEYS
                                  if "model." + k not in _MEANING_KEYS and k != "ema_rate")}
    sde_changes = [c for c in changes if key(c) in sde_keys] if old_sde != new_sde else []
    if model_changes:
        raise ResumeError(f"cannot resume {found}: it was trained with another network than this "
                          f"config's ({'; '.join(model_changes)}); resume with the checkpoint's "
                          f"values, or {START_OVER}")
    if old_sde != new_sde:
        raise ResumeError(f"cannot resume {found}: it was trained under {old_sde}, this config gives "
                          f"{new_sde} ({'; '.join(sde_changes)}); resume with the checkpoint's "
                          f"values, or {START_OVER}")
    other = [c for c in changes if c not in sde_changes]
    if other:
        warnings.warn(f"resuming {found} with a config that differs from the checkpoint's: "
                      + "; ".join(other[:10]))


def _load_resumable(found: str):
    try:
        return load_checkpoint(found, map_location="cpu")
    except CheckpointError as err:
        raise ResumeError(f"cannot resume: {err}; {START_OVER}") from None


def _load_state(found: str, what: str, module, state) -> None:
    """``module.load_state_dict(state)``, with a one-sentence error when they do not match."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ResumeError(f"cannot resume {found}: its {what} does not fit this run's ({first[:300]}); "
                          f"{START_OVER}") from None


# ---- checks before any work ---------------------------------------------------------------------
def check_dependencies(config, own_data: bool = False) -> None:
    """Raise ``ImportError`` (saying what to ``pip install``) when an optional package the run needs
    is missing: scikit-learn for the digits data (unless ``own_data``), matplotlib for preview
    pictures (``training.sample_freq > 0``)."""
    from . import data as data_module
    from . import metrics

    if not own_data:
        data_module.check_dataset_dependencies(str(config.data.dataset))
    if int(config.training.get("sample_freq", 0)) > 0:
        metrics.require_matplotlib()


def _check_settings(config, world: int, own_data: bool) -> None:
    """What can be checked in the config alone, before the workdir is touched."""
    tr = config.training
    n_iters, batch_size = int(tr.n_iters), int(tr.batch_size)
    require(n_iters >= 0, f"config.training.n_iters must be >= 0, got {n_iters}")
    require(batch_size >= 1 and batch_size % world == 0,
            f"config.training.batch_size={batch_size} must be a positive multiple of the number "
            f"of processes ({world})")
    _ema_rate(config.model.ema_rate)
    _optimizer_class(config)
    _amp_mode(config)
    get_loss_fn(config, build_sde(config))
    check_dependencies(config, own_data)


def _lock_workdir(workdir: str) -> ExclusiveLock:
    """Create ``workdir`` (a read-only or full disk shows here, before any work), lock it for this
    run and remove stale temporary files of interrupted writes."""
    require(not os.path.exists(workdir) or os.path.isdir(workdir),
            f"workdir {workdir!r} is an existing file, not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        if err.errno in STORAGE_ERRNOS:
            raise OutputError(workdir, err) from None
        raise ValueError(f"cannot create workdir {workdir!r}: {err.strerror or err}") from None
    lock = ExclusiveLock(os.path.join(workdir, LOCK_NAME), argv=list(sys.argv))
    try:
        locked = lock.acquire()
    except LockHeldError as err:
        raise WorkdirInUseError(f"workdir {workdir!r} is in use by another training run "
                                f"({describe_holder(err.holder)}); wait for it to end, or train "
                                f"in another workdir", err.holder) from None
    if not locked:
        warnings.warn(f"the file system of {workdir!r} has no file locks: nothing stops another "
                      f"training run from writing into the same workdir")
    for folder in (workdir, os.path.join(workdir, "samples")):
        remove_stale_temporaries(folder)
    return lock


def _claim_workdir(workdir: str, ddp: "_Distributed") -> Optional[ExclusiveLock]:
    """Rank 0 locks the workdir (:func:`_lock_workdir`); under DDP the other ranks learn whether
    it could and stop with the same message when not."""
    lock, error = None, None
    if ddp.rank == 0:
        try:
            lock = _lock_workdir(workdir)
        except (ValueError, LockHeldError, OSError) as err:
            error = err
    if ddp.enabled:
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if ddp.rank != 0 and box[0] is not None:
            raise ValueError(box[0])
    if error is not None:
        raise error
    return lock


# ---- the loop -----------------------------------------------------------------------------------
def train(config, workdir: str, *, quiet: bool = False, resume: bool = True,
          net: Optional[nn.Module] = None, data: Optional[torch.Tensor] = None) -> TrainResult:
    """Train (or resume training) as described in the module docstring; returns a
    :class:`TrainResult`. Raises :class:`NonFiniteLossError` naming the step when the loss becomes
    NaN/Inf (the last good checkpoint stays on disk).

    Args:
        config: an ``ml_collections.ConfigDict`` in the layout of
            :func:`sde_diffusion.config.default_config`.
        workdir: output folder; a checkpoint in it is resumed from (unless ``resume=False``).
        quiet: no progress bar and no messages.
        resume: resume from a checkpoint in ``workdir`` (default); ``False`` starts afresh.
        net: your own network (``forward(x, t, y=None)``, output shaped like ``x``) instead of
            the one ``config.model`` names; it is trained in place. ``config.model`` still gives
            ``parameterization``, ``time_input``, ``ema_rate`` and the SDE parameters. Rebuild it
            yourself to load a checkpoint (``load_checkpoint(path)["ema"]`` is its state dict).
        data: your own training set, a ``(N, ...)`` tensor scaled to about [-1, 1], instead of
            ``config.data``.
    """
    from .data import infinite_batches

    workdir = os.fspath(workdir)
    ddp = _Distributed(str(config.get("device", "auto")))
    lock = None
    try:
        _check_settings(config, ddp.world_size, data is not None)
        lock = _claim_workdir(workdir, ddp)
        return _train(config, workdir, quiet, resume, ddp, infinite_batches, net, data)
    finally:
        if lock is not None:
            lock.release()
        ddp.close()


def _train(config, workdir, quiet, resume, ddp, infinite_batches, user_net, user_data) -> TrainResult:
    tr, rank, world, device = config.training, ddp.rank, ddp.world_size, ddp.device
    is_main = rank == 0
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if (is_main and not quiet) else (lambda msg: None)
    n_iters = int(tr.n_iters)
    batch_size = int(tr.batch_size)
    log_freq = max(1, int(tr.log_freq))
    ckpt_freq = int(tr.snapshot_freq_for_preemption)
    numbered_freq = int(tr.get("snapshot_freq", 0))
    sample_freq = int(tr.get("sample_freq", 0))
    seed = int(config.seed)
    last_path = os.path.join(workdir, LAST_NAME)

    # a checkpoint to resume: read and checked against the config before the data and the model
    found = latest_checkpoint(workdir) if resume else None
    ckpt = None
    if found is not None:
        ckpt = _load_resumable(found)
        _check_resumable(found, ckpt["config"], config, own_net=user_net is not None)

    # data, model, optimizer: the same seeds on every rank, so every rank builds the same network
    data_gen = torch.Generator().manual_seed(seed)          # seeds the data order
    if user_data is not None:
        require(isinstance(user_data, torch.Tensor) and user_data.is_floating_point()
                and user_data.ndim >= 2 and user_data.shape[0] >= 1,
                "data must be a floating (N, ...) tensor")
        data = user_data.to(device)
    else:
        data = load_data(config, torch.Generator().manual_seed(seed + 1)).to(device)
    data_shape = tuple(data.shape[1:])
    sde = build_sde(config)
    torch.manual_seed(seed)
    if user_net is not None:
        require(isinstance(user_net, nn.Module), f"net must be a torch.nn.Module, got {type(user_net).__name__}")
        net = user_net
    else:
        net, _ = build_model(config, data_shape, sde)
    net.to(device)
    if ddp.enabled:  # the same initial weights everywhere, then each rank its own dropout stream
        torch.manual_seed(seed * 1000 + 17 + rank)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed * 1000 + 17 + rank)
    ema = _EMA(net, float(config.model.ema_rate))
    optimizer = _make_optimizer(config, net.parameters())
    amp_dtype, scaler = _autocast(config, device)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 2)
    base_lr, warmup = float(config.optim.lr), int(config.optim.warmup)
    grad_clip = float(config.optim.grad_clip)
    loss_fn = get_loss_fn(config, sde)

    # resume
    step, resumed_from = 0, None
    if found is not None:
        if tuple(ckpt["data_shape"]) != data_shape:
            raise ResumeError(f"cannot resume {found}: it was trained on data of shape "
                              f"{tuple(ckpt['data_shape'])}, this run's data has shape "
                              f"{data_shape}; {START_OVER}")
        _load_state(found, "network", net, ckpt["model"])
        _load_state(found, "EMA network", ema.net, ckpt["ema"])
        _load_state(found, "optimizer state", optimizer, ckpt["optimizer"])
        if scaler is not None and ckpt.get("grad_scaler") is not None:
            scaler.load_state_dict(ckpt["grad_scaler"])
        step = resumed_from = int(ckpt["step"])
        say(f"resuming from {found} at step {step}")
    train_net: nn.Module = net
    if ddp.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    model = ScoreModel(train_net, sde, parameterization=str(config.model.parameterization),
                       time_input=str(config.model.time_input), check_finite=False)

    # data order: shuffled indices into the training set, sharded over ranks, restored on resume
    batches = infinite_batches(data, batch_size, data_gen, rank=rank, world_size=world)
    if found is not None:
        restore_rng_states(ckpt["rng"], noise=noise_gen)
        batches.load_state_dict(ckpt["data_order"])
        per_rank = ckpt.get("rng_per_rank")
        if ddp.enabled or per_rank is not None:
            if per_rank is not None and len(per_rank) == world:
                torch.set_rng_state(per_rank[rank]["torch_cpu"])
                if device.type == "cuda" and "cuda" in per_rank[rank]:
                    torch.cuda.set_rng_state(per_rank[rank]["cuda"], device)
            else:
                warnings.warn(f"{found} was written by {len(per_rank) if per_rank else 1} "
                              f"process(es), this run has {world}: dropout streams restart")
        del ckpt

    log_path = os.path.join(workdir, LOG_NAME)
    log_file = log_writer = None
    if is_main:
        text = json.dumps(json.loads(config_to_json(config)), indent=2, sort_keys=True)

        def write_config(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(os.path.join(workdir, "config.json"), write_config)
        if step > 0:
            _truncate_log(log_path, step)
        new_log = not os.path.isfile(log_path) or step == 0
        with _writing(log_path):
            log_file = open(log_path, "w" if new_log else "a", newline="")
            log_writer = csv.writer(log_file)
            if new_log:
                log_writer.writerow(LOG_FIELDS)
                log_file.flush()

    def rank_rng_state() -> Dict[str, torch.Tensor]:
        state = {"torch_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
        return state

    def checkpoint(path: str) -> None:
        per_rank = None
        if ddp.enabled:  # every rank's global generator (dropout), gathered on rank 0
            per_rank = [None] * world
            dist.all_gather_object(per_rank, rank_rng_state())
        if is_main:
            extra = {"data_order": batches.state_dict()}
            if per_rank is not None:
                extra["rng_per_rank"] = [{k: v.cpu() for k, v in s.items()} for s in per_rank]
            if scaler is not None:
                extra["grad_scaler"] = scaler.state_dict()
            save_checkpoint(path, step=step, config=config, data_shape=data_shape,
                            model_state=net.state_dict(), ema_state=ema.net.state_dict(),
                            optimizer_state=optimizer.state_dict(),
                            rng=capture_rng_states(noise=noise_gen), extra=extra)
        ddp.barrier()

    params = [p for p in net.parameters() if p.requires_grad]
    pending: List[torch.Tensor] = []      # per-step losses since the last check (device tensors)
    pending_first_step = step             # step index of pending[0]
    logged: List[Tuple[int, float]] = []
    grad_norm = torch.zeros((), device=device)
    written_last: Optional[str] = last_path if (found and os.path.isfile(last_path)) else None
    sample_paths: List[str] = []
    t_start = time.perf_counter()

    def check_finite_losses() -> Optional[torch.Tensor]:
        """Stacked pending losses (mean over ranks); raise if any is not finite."""
        nonlocal pending, pending_first_step
        if not pending:
            return None
        stacked = torch.stack(pending).float()
        if ddp.enabled:
            dist.all_reduce(stacked)
            stacked /= world
        stacked = stacked.cpu()
        bad = ~torch.isfinite(stacked)
        if bool(bad.any()):
            bad_step = pending_first_step + int(bad.nonzero()[0, 0]) + 1  # 1-based update
            kept = f"{written_last}" if written_last else "none written yet"
            raise NonFiniteLossError(
                f"the training loss became {float(stacked[bad][0])} at step {bad_step}; training "
                f"stopped. Last good checkpoint: {kept}", bad_step, written_last)
        pending, pending_first_step = [], step
        return stacked

    def write_log(stacked: torch.Tensor) -> None:
        lr_now = optimizer.param_groups[0]["lr"]
        loss = float(stacked.mean())
        logged.append((step, loss))
        if is_main:
            with _writing(log_path):
                log_writer.writerow([step, f"{loss:.6g}", f"{lr_now:.6g}", f"{float(grad_norm):.6g}",
                                     f"{time.perf_counter() - t_start:.3f}"])
                log_file.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def save_good(path: str) -> None:
        nonlocal written_last
        check_finite_losses()
        if not _all_finite([p.detach() for p in params]):
            raise NonFiniteLossError(f"the weights are not finite at step {step}; training stopped. "
                                     f"Last good checkpoint: {written_last or 'none written yet'}",
                                     step, written_last)
        checkpoint(path)
        if path == last_path:
            written_last = last_path

    bar = None
    if is_main and not quiet and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_iters, initial=min(step, n_iters), desc="train", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None

    interrupted = None
    window_losses: List[torch.Tensor] = []   # losses since the last log row (kept for the log)
    try:
        with _SignalCatcher() as signals:
            net.train()
            while step < n_iters:
                x0 = next(batches)
                if amp_dtype is not None:
                    with torch.autocast(device_type=device.type, dtype=amp_dtype):
                        loss = loss_fn(model, x0, noise_gen, rank=rank, world_size=world)
                else:
                    loss = loss_fn(model, x0, noise_gen, rank=rank, world_size=world)
                optimizer.zero_grad(set_to_none=True)
                lr = _lr_at(step, base_lr, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if grad_clip >= 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                ema.update(step - 1)
                loss_d = loss.detach()
                pending.append(loss_d)
                window_losses.append(loss_d)
                if bar is not None:
                    bar.update(1)

                if step % log_freq == 0 or step == n_iters:
                    check_finite_losses()
                    stacked = torch.stack(window_losses).float()
                    if ddp.enabled:
                        dist.all_reduce(stacked)
                        stacked /= world
                    write_log(stacked.cpu())
                    window_losses = []
                if numbered_freq > 0 and step % numbered_freq == 0:
                    save_good(os.path.join(workdir, f"checkpoint_{step}.pt"))
                if ckpt_freq > 0 and step % ckpt_freq == 0 and step < n_iters:
                    save_good(last_path)
                if sample_freq > 0 and step % sample_freq == 0 and is_main:
                    path = _preview(config, ema.net, sde, data, data_shape, step, workdir, device)
                    if path:
                        sample_paths.append(path)
                # a signal stops every rank at the same step: ranks agree at log steps under DDP
                stop = signals.signum
                if ddp.enabled:
                    if step % log_freq == 0 or step == n_iters:
                        flag = torch.tensor([0 if stop is None else stop], device=device)
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                        stop = int(flag.item()) or None
                    else:
                        stop = None
                if stop is not None:
                    interrupted = signal.Signals(stop).name
                    say(f"\n{interrupted} received: checkpointing at step {step} and stopping")
                    break
            # final checkpoint (also after an interruption)
            if step > 0 and (step != resumed_from or not os.path.isfile(last_path)):
                save_good(last_path)
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()

    net.eval()
    ema_model = ScoreModel(ema.net, sde, parameterization=str(config.model.parameterization),
                           time_input=str(config.model.time_input))
    return TrainResult(step=step, losses=logged, workdir=workdir,
                       checkpoint=last_path if os.path.isfile(last_path) else None, net=net,
                       ema_net=ema.net, model=ema_model, sde=sde, config=config,
                       interrupted=interrupted, resumed_from=resumed_from,
                       elapsed_s=time.perf_counter() - t_start, rank=rank, world_size=world,
                       sample_paths=sample_paths)


# ---- previews and evaluation ------------------------------------------------------------------
def _sample(model: ScoreModel, sde, n: int, data_shape, config, generator, device) -> torch.Tensor:
    from .samplers import sample  # the samplers sit above training's building blocks

    with torch.no_grad():
        result = sample(model, sde, shape=(n,) + tuple(data_shape),
                        solver=str(config.sampling.method), steps=int(config.sampling.steps),
                        generator=generator, device=device, progress=False,
                        denoise=bool(config.sampling.get("noise_removal", False)))
    return result.samples


def _preview(config, ema_net, sde, data, data_shape, step, workdir, device) -> Optional[str]:
    """Sample ``training.n_preview`` points/images with the EMA weights and save a PNG. Uses its
    own generator (seeded by step), so previews never change the training's random streams."""
    try:
        from .metrics import save_image_grid, save_scatter
    except ImportError as e:  # pragma: no cover
        warnings.warn(f"no sample preview: {e}")
        return None
    model = ScoreModel(ema_net, sde, parameterization=str(config.model.parameterization),
                       time_input=str(config.model.time_input))
    g = torch.Generator(device=device).manual_seed(int(config.seed) * 1000003 + step)
    n = int(config.training.n_preview)
    x = _sample(model, sde, n, data_shape, config, g, device).float().cpu()
    path = os.path.join(workdir, "samples", f"step_{step}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if len(data_shape) == 3:
        save_image_grid(x.clamp(-1, 1), path, nrow=max(1, int(math.sqrt(n))))
    elif len(data_shape) == 1 and data_shape[0] == 2:
        save_scatter(x, path, reference=data[:min(len(data), 2000)].float().cpu())
    else:
        return None
    return path


def evaluate_model(model: ScoreModel, config, n_samples: Optional[int] = None,
                   seed: int = 0, device=None, repeats: int = 5) -> Dict[str, Any]:
    """Sample ``n_samples`` (default ``config.eval.n_samples``) with ``config.sampling`` and score
    them against fresh data:

    - 2-D toys: sliced Wasserstein distance of the samples to a fresh data set of the same size
      (``sw``) and between two fresh data sets (``sw_baseline``), each averaged over ``repeats``
      fresh sets (the distance between finite sets is noisy), and ``sw_ratio = sw / sw_baseline``
      (1 is as good as the data itself);
    - digits: Fréchet distance on the digits classifier's features to the test split (``fd``),
      with the baselines of ``digits_fd_baselines`` at the same sample size (``fd_real_vs_real``:
      train vs test images, ``fd_real_vs_noise``); ``n`` is capped at the 1437 training images so
      that the numbers compare (the Fréchet distance is biased by the sample size).
    """
    from . import data as data_module
    from . import metrics

    n = int(n_samples or config.eval.n_samples)
    if device is None:
        params = list(model.net.parameters()) if isinstance(model.net, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    name = str(config.data.dataset)
    if name == "digits":
        n = min(n, 1437)
        ref = data_module.get_dataset("digits", size=int(config.data.image_size), split="test")
        shape = tuple(ref.shape[1:])
    else:
        ref = None
        shape = (2,)
    chunks = []
    bs = int(config.eval.batch_size)
    for start in range(0, n, bs):
        chunks.append(_sample(model, model.sde, min(bs, n - start), shape, config, g, device).cpu())
    x = torch.cat(chunks).float()
    if name == "digits":
        fd = float(metrics.frechet_distance(x.clamp(-1, 1), ref, features="digits"))
        base = metrics.digits_fd_baselines(n=n, size=int(config.data.image_size))
        return {"fd": fd, "fd_real_vs_real": float(base["real_vs_real"]),
                "fd_real_vs_noise": float(base["real_vs_noise"]),
                "classifier_test_accuracy": float(base["test_accuracy"]), "n": n}
    gen = torch.Generator().manual_seed(seed + 10_000)
    sw, base = [], []
    for r in range(int(repeats)):
        fresh1 = data_module.get_dataset(name, n=n, generator=gen)
        fresh2 = data_module.get_dataset(name, n=n, generator=gen)
        proj = torch.Generator().manual_seed(seed + 1 + r)
        sw.append(float(metrics.sliced_wasserstein(x, fresh1, generator=proj)))
        proj = torch.Generator().manual_seed(seed + 1 + r)
        base.append(float(metrics.sliced_wasserstein(fresh2, fresh1, generator=proj)))
    sw_m, base_m = sum(sw) / len(sw), sum(base) / len(base)
    return {"sw": sw_m, "sw_baseline": base_m, "sw_ratio": sw_m / base_m, "n": n,
            "repeats": int(repeats), "sw_all": sw, "sw_baseline_all": base}


# ---- command line -------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sde_diffusion.training ARGS`` is ``sde-diffusion train ARGS`` (the spelling
    ``torchrun -m`` needs): the same options (``--config``, ``--workdir``, ``--no-resume``,
    ``--eval``, ``--device``, ``--seed``, ``--quiet``, ``--config.KEY=VALUE``), the same one-line
    errors and exit statuses (:mod:`sde_diffusion.cli`: 0 done, 2 a user error, 3 NaN/Inf loss,
    128 + signal number when stopped by a signal after checkpointing)."""
    from .cli import main as cli_main  # the command line sits above training; imported on use

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
