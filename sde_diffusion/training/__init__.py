"""The training job: one entry point for one process, several processes (torchrun, DDP) and
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
- ``config.json``: the run's config.
- ``.lock``: held (``flock``) by the run while it trains, naming its pid, host and start time; a
  second run on the same workdir raises :class:`WorkdirInUseError` at once. The OS drops the lock
  when its holder dies, so a crashed run never blocks the next one.

Class labels: with ``config.model.num_classes = K`` the data is loaded with its labels
(``return_labels=True``; your own ``data=(x, y)``), checked to lie in ``[0, K)``, shuffled and
sharded with their samples, and passed to the network by the loss; ``training.p_uncond`` drops
them to the null label ``K`` for classifier-free guidance (drawn from the run's noise generator,
so resuming stays exact). ``training.task = "classifier"`` trains a noise-conditional classifier
(:mod:`sde_diffusion.models.classifier`) with cross-entropy on the forward process's ``x_t``
instead of a score model, in the same loop (EMA, checkpoints, lock, resume; no previews).

Every ``training.sample_freq`` steps rank 0 hands the EMA model to the ``preview`` hook the caller
passes (:data:`PreviewFn`). Sampling is not this job's business (training, sampling and
likelihood are independent jobs): :func:`sde_diffusion.evaluation.previews` is the hook that
draws ``samples/step_<step>.png``, and :func:`sde_diffusion.train` and ``sde-diffusion train``
pass it by default.

Before any work (data, network) the config's settings and optional packages are checked, then
the workdir is created and locked, which also shows a read-only or full disk; a storage error
later (no space while checkpointing) raises ``sde_diffusion._files.OutputError`` naming the file,
and the previous checkpoint stays intact.

When ``workdir`` holds a checkpoint the run resumes from it: the :class:`TrainState` (model, EMA,
optimizer, step, the position in the data order, the noise generator) and the global RNG states
(torch CPU/CUDA, Python, NumPy) are restored, so an interrupted and resumed run ends with the same
weights as an uninterrupted one, bit for bit (on the same hardware and thread count). A
checkpoint of another network (its constructor fields, parameterization or time input), another
forward SDE or another data shape, or one that cannot be read, is refused with
:class:`ResumeError` naming the fields that differ; ``resume=False`` (``--no-resume``) or a new
workdir starts over. Other config changes (learning rate, batch size, ...) are allowed with a
warning that lists them.

Launched with ``torchrun --nproc_per_node=K -m sde_diffusion.training --config ...`` the same code
runs DDP (``nccl`` on GPU, ``gloo`` on CPU): every rank takes a disjoint slice of each global batch
of ``training.batch_size`` samples and draws the noise of the whole global batch from the same
seeded generator, so the update equals that of one process with the global batch (up to the
summation order of the gradient all-reduce).

Command line: ``sde-diffusion train`` (:mod:`sde_diffusion.cli`); ``python -m
sde_diffusion.training`` is the same command under the module name ``torchrun -m`` needs. It runs
this package's ``__main__`` module, an entry point like ``sde_diffusion/__main__.py`` that nothing
imports, so the training package itself never imports the command line::

    python -m sde_diffusion.training --config configs/toy/moons_vp.py --workdir runs/moons \\
        --config.training.n_iters=5000 --config.optim.lr=1e-3
"""
from __future__ import annotations

import copy
import csv
import json
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .._checks import require
from .._files import (STORAGE_ERRNOS, ExclusiveLock, LockHeldError, OutputError, atomic_write,
                      describe_holder, remove_stale_temporaries, write_text)
from ..checkpoints import (LAST_NAME, CheckpointError, capture_rng_states, latest_checkpoint,
                           load_checkpoint, restore_rng_states, save_checkpoint)
from ..config import MODEL_KEYS, build_sde, config_to_json, flatten, network_config
from ..data import (DATASET_CLASSES, InfiniteBatches, check_dataset_dependencies, check_labels,
                    get_dataset, infinite_batches)
from ..losses import get_loss_fn
from ..models import ScoreModel, model_from_config
from ..models.classifier import NoisyClassifier
from ..models.factory import config_task
from ..sdes import SDE

__all__ = ["train", "TrainResult", "PreviewFn", "NonFiniteLossError",
           "WorkdirInUseError", "ResumeError", "check_dependencies", "load_data"]

#: The preview hook: ``fn(step, model, data) -> path or None``, called on rank 0 every
#: ``training.sample_freq`` steps with a :class:`ScoreModel` of the EMA weights (eval mode, on the
#: training device; a conditional model's is bound to the labels ``0, 1, ..., K-1, 0, ...`` of the
#: ``training.n_preview`` samples) and the training set (without labels); a path it returns is listed in
#: :attr:`TrainResult.sample_paths`. It must leave the global random generators alone (draw from a
#: generator of its own), so that previews never change the training.
PreviewFn = Callable[[int, ScoreModel, torch.Tensor], Optional[str]]

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
    model: Any                                  # the EMA network wrapped: a ScoreModel for samplers
                                                # (a NoisyClassifier for training.task="classifier")
    sde: Any
    config: Any
    interrupted: Optional[str] = None           # "SIGINT"/"SIGTERM" when stopped by a signal
    resumed_from: Optional[int] = None          # step of the checkpoint resumed from
    elapsed_s: float = 0.0
    rank: int = 0
    world_size: int = 1
    sample_paths: List[str] = field(default_factory=list)


# ---- building blocks --------------------------------------------------------------------------
def _num_classes(config) -> Optional[int]:
    """``config.model.num_classes`` (``None``: unconditional), checked to be an integer >= 1."""
    k = config.model.get("num_classes", None)
    require(k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 1),
            f"config.model.num_classes must be None or an integer >= 1, got {k!r}")
    return k


def load_data(config, generator: Optional[torch.Generator] = None, labels: bool = False):
    """The training set named by ``config.data.dataset`` (``sde_diffusion.data.get_dataset``):
    2-D toys get ``n=config.data.n_train`` samples drawn with ``generator``; ``digits`` gets
    ``size=image_size`` and ``split``; ``npz`` gets ``path`` and ``key``; ``images`` gets ``path``,
    ``size=image_size`` and ``channels=num_channels``. ``labels=True`` returns ``(x, y)`` with the
    class labels (``return_labels=True``), checked to lie in ``[0, config.model.num_classes)``;
    a data set without labels raises ``ValueError`` saying so."""
    d = config.data
    name = str(d.dataset)
    if name == "digits":
        kwargs = {"size": int(d.image_size), "split": str(d.split)}
    elif name == "npz":
        kwargs = {"path": str(d.path), "key": str(d.key)}
    elif name == "images":
        kwargs = {"path": str(d.path), "size": int(d.image_size), "channels": int(d.num_channels)}
    elif name == "cifar10":   # the local cifar-10-batches-py folder (or its parent), never downloaded
        kwargs = {"path": str(d.path), "split": str(d.split)}
    else:
        kwargs = {"n": int(d.n_train), "generator": generator}
    if not labels:
        x = get_dataset(name, **kwargs)
        require(isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] >= 1,
                f"dataset {name!r} must be a (N, ...) tensor, got {type(x).__name__}")
        return x.float()
    k = _num_classes(config)
    try:
        x, y = get_dataset(name, return_labels=True, **kwargs)
    except ValueError as err:
        raise ValueError(f"config.model.num_classes={k} trains a class-conditional model, which "
                         f"needs labelled data: {err}") from None
    require(isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] >= 1,
            f"dataset {name!r} must be a (N, ...) tensor, got {type(x).__name__}")
    return x.float(), _checked_labels(y, x.shape[0], k, f"the labels of data set {name!r}")


def _checked_labels(y, n: int, k: Optional[int], what: str) -> torch.Tensor:
    try:
        return check_labels(y, n, k, what=what)
    except ValueError as err:
        raise ValueError(f"{err} (config.model.num_classes={k}: labels 0..{k - 1}, {k} is the "
                         f"null label)" if k is not None else str(err)) from None


def _split_data(data, k: Optional[int], device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Your own ``data=`` argument of :func:`train`: a tensor, or ``(x, y)`` for a conditional
    model (``config.model.num_classes``)."""
    if isinstance(data, (tuple, list)):
        require(len(data) == 2, f"data must be a tensor x or a pair (x, y), got {len(data)} items")
        x, y = data
    else:
        x, y = data, None
    require(isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 2 and x.shape[0] >= 1,
            "data must be a floating (N, ...) tensor (or a pair (x, y) with labels y)")
    if k is None:
        require(y is None, "data has labels y but config.model.num_classes is None (an unconditional "
                           "model): set config.model.num_classes, or pass data=x alone")
        return x.to(device), None
    require(y is not None, f"config.model.num_classes={k} trains a class-conditional model: pass "
                           f"data=(x, y) with labels y in [0, {k})")
    return x.to(device), _checked_labels(y, x.shape[0], k, "the labels y of data").to(device)


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
        self.owns_group, self.enabled = False, False


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
_MEANING_KEYS = ("model.parameterization", "model.time_input", "model.num_classes", "training.task")


def _with_new_defaults(saved):
    """A checkpoint's config with the fields added since it was written (``training.task``,
    ``training.p_uncond``) at the values that reproduce the run that wrote it."""
    saved = copy.deepcopy(saved)
    for key, value in (("task", "score"), ("p_uncond", 0.0)):
        if key not in saved.training:
            saved.training[key] = value
    return saved


def _sde_without_eps(config) -> SDE:
    """The forward process ``config`` defines, without its ``eps`` (the end of sampling and
    likelihood integrals, which the weights do not depend on)."""
    c = copy.deepcopy(config)
    if "sde_eps" in c.model:
        c.model.sde_eps = 0.0
    return build_sde(c)


def _check_resumable(found: str, saved, config, own_net: bool) -> None:
    """Refuse to resume ``found`` (trained with config ``saved``) under ``config`` when the network
    (``config.model``'s constructor arguments; not checked for a network of one's own), its
    parameterization or time input, or the forward SDE differ; warn about other changes."""
    saved = _with_new_defaults(saved)
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
    """Raise ``ImportError`` (saying what to ``pip install``) when an optional package the run's
    data needs is missing: scikit-learn for the digits data (unless ``own_data``). The preview
    hook checks its own (:func:`sde_diffusion.evaluation.previews`)."""
    if not own_data:
        check_dataset_dependencies(str(config.data.dataset))


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
    k = _num_classes(config)
    get_loss_fn(config, build_sde(config))   # also the task and p_uncond
    name = str(config.data.dataset)
    if k is not None and not own_data:
        labelled = sorted(DATASET_CLASSES) + ["images", "mixture", "npz"]
        require(name in labelled, f"config.model.num_classes={k} trains a class-conditional model, "
                                  f"but data set {name!r} has no class labels; data sets with labels "
                                  f"are {labelled}")
        require(name not in DATASET_CLASSES or k >= DATASET_CLASSES[name],
                f"config.model.num_classes={k} is too small for data set {name!r}, which has "
                f"{DATASET_CLASSES.get(name)} classes")
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


# ---- the trainer ----------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a run carries from one step to the next: what a checkpoint holds (with the global
    random generators: torch CPU/CUDA for dropout, Python, NumPy) and a resume restores."""
    net: nn.Module                              # the raw weights, trained in place
    ema: "_EMA"                                 # their exponential moving average
    optimizer: torch.optim.Optimizer
    scaler: Optional["torch.amp.GradScaler"]    # fp16 only
    batches: InfiniteBatches                    # the data order and the position in it
    noise: torch.Generator                      # the loss's noise and times (same on every rank)
    step: int = 0                               # optimisation steps done


class _LossLog:
    """The per-step losses of a run. They stay on the device and are read (mean over the ranks)
    only at log steps and before checkpoints, so the loop syncs the device once per
    ``log_freq`` steps; rank 0 writes the rows of ``loss_log.csv``."""

    def __init__(self, path: str, ddp: "_Distributed", step: int, write: bool):
        self.path, self.ddp = path, ddp
        self.pending: List[torch.Tensor] = []   # not yet checked for NaN/Inf
        self.pending_from = step                # the step before pending[0]
        self.window: List[torch.Tensor] = []    # since the last row
        self.rows: List[Tuple[int, float]] = []
        self.file = self.writer = None
        if write:
            if step > 0:
                _truncate_log(path, step)
            new = not os.path.isfile(path) or step == 0
            with _writing(path):
                self.file = open(path, "w" if new else "a", newline="")
                self.writer = csv.writer(self.file)
                if new:
                    self.writer.writerow(LOG_FIELDS)
                    self.file.flush()

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)
        self.window.append(loss)

    def _over_ranks(self, losses: List[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(losses).float()
        if self.ddp.enabled:
            dist.all_reduce(stacked)
            stacked /= self.ddp.world_size
        return stacked.cpu()

    def check(self, step: int, last_good: Optional[str]) -> None:
        """Raise :class:`NonFiniteLossError` naming the first step whose loss is not finite."""
        if not self.pending:
            return
        stacked = self._over_ranks(self.pending)
        bad = ~torch.isfinite(stacked)
        if bool(bad.any()):
            bad_step = self.pending_from + int(bad.nonzero()[0, 0]) + 1   # 1-based update
            raise NonFiniteLossError(
                f"the training loss became {float(stacked[bad][0])} at step {bad_step}; training "
                f"stopped. Last good checkpoint: {last_good or 'none written yet'}", bad_step,
                last_good)
        self.pending, self.pending_from = [], step

    def row(self, step: int, lr: float, grad_norm: torch.Tensor, elapsed_s: float,
            last_good: Optional[str]) -> float:
        """Check the losses, then log the mean loss since the previous row; returns it."""
        self.check(step, last_good)
        loss = float(self._over_ranks(self.window).mean())
        self.window = []
        self.rows.append((step, loss))
        if self.writer is not None:
            with _writing(self.path):
                self.writer.writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{float(grad_norm):.6g}",
                                      f"{elapsed_s:.3f}"])
                self.file.flush()
        return loss

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Trainer:
    """One training run: its settings, its :class:`TrainState` and the steps that change it.

    ``Trainer(config, workdir, ddp)`` loads the data and builds the model, EMA, optimizer, data
    order and noise generator from ``config`` (the same seeds on every rank, so every rank builds
    the same network); :meth:`restore` loads a checkpoint into that state, :meth:`save` writes
    one, and :meth:`run` trains to ``training.n_iters`` with logging, NaN checks, checkpoints,
    previews and signal handling. :func:`train` wraps it with the checks before any work and the
    workdir lock.
    """

    def __init__(self, config, workdir: str, ddp: "_Distributed", *, quiet: bool = False,
                 net: Optional[nn.Module] = None, data: Optional[torch.Tensor] = None,
                 preview: Optional[PreviewFn] = None):
        tr = config.training
        self.config, self.workdir, self.ddp = config, workdir, ddp
        self.device, self.is_main = ddp.device, ddp.rank == 0
        self.quiet, self.preview = quiet, preview
        self.n_iters = int(tr.n_iters)
        self.log_freq = max(1, int(tr.log_freq))
        self.ckpt_freq = int(tr.snapshot_freq_for_preemption)
        self.numbered_freq = int(tr.get("snapshot_freq", 0))
        self.sample_freq = int(tr.get("sample_freq", 0))
        self.base_lr, self.warmup = float(config.optim.lr), int(config.optim.warmup)
        self.grad_clip = float(config.optim.grad_clip)
        self.last_path = os.path.join(workdir, LAST_NAME)
        self.resumed_from: Optional[int] = None
        self.last_good: Optional[str] = None      # checkpoint_last.pt once known to be good
        self.sample_paths: List[str] = []
        seed = int(config.seed)
        self.task, self.num_classes = config_task(config), _num_classes(config)
        if self.task == "classifier" and self.preview is not None and self.sample_freq > 0:
            warnings.warn("config.training.sample_freq > 0 but a classifier run draws no previews")
            self.preview = None

        data_gen = torch.Generator().manual_seed(seed)          # seeds the data order
        if data is not None:
            self.data, self.labels = _split_data(data, self.num_classes, self.device)
        else:
            loaded = load_data(config, torch.Generator().manual_seed(seed + 1),
                               labels=self.num_classes is not None)
            x, y = loaded if self.num_classes is not None else (loaded, None)
            self.data, self.labels = x.to(self.device), None if y is None else y.to(self.device)
        self.data_shape = tuple(self.data.shape[1:])
        self.sde = build_sde(config)
        torch.manual_seed(seed)
        if net is not None:
            require(isinstance(net, nn.Module), f"net must be a torch.nn.Module, got {type(net).__name__}")
        else:
            net, _ = model_from_config(config, self.data_shape, sde=self.sde)
        net.to(self.device)
        if ddp.enabled:  # the same initial weights everywhere, then each rank its own dropout stream
            torch.manual_seed(seed * 1000 + 17 + ddp.rank)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(seed * 1000 + 17 + ddp.rank)
        ema = _EMA(net, float(config.model.ema_rate))
        optimizer = _make_optimizer(config, net.parameters())
        self.amp_dtype, scaler = _autocast(config, self.device)
        noise = torch.Generator(device=self.device).manual_seed(seed + 2)
        self.loss_fn = get_loss_fn(config, self.sde)
        # data order: shuffled indices into the training set (and its labels), sharded over ranks
        batches = infinite_batches(self.data if self.labels is None else (self.data, self.labels),
                                   int(tr.batch_size), data_gen, rank=ddp.rank,
                                   world_size=ddp.world_size)
        self.state = TrainState(net=net, ema=ema, optimizer=optimizer, scaler=scaler,
                                batches=batches, noise=noise)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.grad_norm = torch.zeros((), device=self.device)
        self.model: Optional[ScoreModel] = None   # what the loss calls: set by run() (DDP there)
        # previews of a conditional model: labels 0, 1, ..., K-1, 0, 1, ... (the null label never)
        self.preview_labels = (None if self.num_classes is None else
                               torch.arange(int(tr.get("n_preview", 64)), device=self.device)
                               % self.num_classes)

    def say(self, msg: str) -> None:
        if self.is_main and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    # ---- checkpoints ------------------------------------------------------------------------------
    def restore(self, found: str, ckpt: Dict[str, Any]) -> None:
        """Load the checkpoint ``ckpt`` (read from ``found`` and checked by
        :func:`_check_resumable`) into the state, and restore the random generators."""
        s, ddp, device = self.state, self.ddp, self.device
        if tuple(ckpt["data_shape"]) != self.data_shape:
            raise ResumeError(f"cannot resume {found}: it was trained on data of shape "
                              f"{tuple(ckpt['data_shape'])}, this run's data has shape "
                              f"{self.data_shape}; {START_OVER}")
        _load_state(found, "network", s.net, ckpt["model"])
        _load_state(found, "EMA network", s.ema.net, ckpt["ema"])
        _load_state(found, "optimizer state", s.optimizer, ckpt["optimizer"])
        if s.scaler is not None and ckpt.get("grad_scaler") is not None:
            s.scaler.load_state_dict(ckpt["grad_scaler"])
        s.step = self.resumed_from = int(ckpt["step"])
        self.last_good = self.last_path if os.path.isfile(self.last_path) else None
        self.say(f"resuming from {found} at step {s.step}")
        restore_rng_states(ckpt["rng"], noise=s.noise)
        s.batches.load_state_dict(ckpt["data_order"])
        per_rank = ckpt.get("rng_per_rank")
        if ddp.enabled or per_rank is not None:
            if per_rank is not None and len(per_rank) == ddp.world_size:
                torch.set_rng_state(per_rank[ddp.rank]["torch_cpu"])
                if device.type == "cuda" and "cuda" in per_rank[ddp.rank]:
                    torch.cuda.set_rng_state(per_rank[ddp.rank]["cuda"], device)
            else:
                warnings.warn(f"{found} was written by {len(per_rank) if per_rank else 1} "
                              f"process(es), this run has {ddp.world_size}: dropout streams restart")

    def _rank_rng_state(self) -> Dict[str, torch.Tensor]:
        state = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self, path: str) -> None:
        """Write the state to ``path`` (rank 0; every rank must call it: under DDP the ranks'
        dropout generators are gathered)."""
        s, ddp = self.state, self.ddp
        per_rank = None
        if ddp.enabled:  # every rank's global generator (dropout), gathered on rank 0
            per_rank = [None] * ddp.world_size
            dist.all_gather_object(per_rank, self._rank_rng_state())
        if self.is_main:
            extra = {"data_order": s.batches.state_dict()}
            if per_rank is not None:
                extra["rng_per_rank"] = [{k: v.cpu() for k, v in r.items()} for r in per_rank]
            if s.scaler is not None:
                extra["grad_scaler"] = s.scaler.state_dict()
            save_checkpoint(path, step=s.step, config=self.config, data_shape=self.data_shape,
                            model_state=s.net.state_dict(), ema_state=s.ema.net.state_dict(),
                            optimizer_state=s.optimizer.state_dict(),
                            rng=capture_rng_states(noise=s.noise), extra=extra)
        ddp.barrier()

    def _save_good(self, path: str, log: _LossLog) -> None:
        """Save after checking that the losses since the last check and the weights are finite."""
        log.check(self.state.step, self.last_good)
        if not _all_finite([p.detach() for p in self.params]):
            raise NonFiniteLossError(f"the weights are not finite at step {self.state.step}; "
                                     f"training stopped. Last good checkpoint: "
                                     f"{self.last_good or 'none written yet'}",
                                     self.state.step, self.last_good)
        self.save(path)
        if path == self.last_path:
            self.last_good = path

    # ---- the loop ---------------------------------------------------------------------------------
    def _step(self) -> torch.Tensor:
        """One optimisation step on the next batch (loss, warm-up learning rate, backward, gradient
        clipping, optimizer, EMA); returns the loss, still on the device."""
        s = self.state
        batch = next(s.batches)
        x0, kw = (batch, {}) if self.labels is None else (batch[0], {"y": batch[1]})
        if self.amp_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                loss = self.loss_fn(self.model, x0, s.noise, rank=self.ddp.rank,
                                    world_size=self.ddp.world_size, **kw)
        else:
            loss = self.loss_fn(self.model, x0, s.noise, rank=self.ddp.rank,
                                world_size=self.ddp.world_size, **kw)
        s.optimizer.zero_grad(set_to_none=True)
        lr = _lr_at(s.step, self.base_lr, self.warmup)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        if s.scaler is not None:
            s.scaler.scale(loss).backward()
            s.scaler.unscale_(s.optimizer)
        else:
            loss.backward()
        if self.grad_clip >= 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm=self.grad_clip)
        if s.scaler is not None:
            s.scaler.step(s.optimizer)
            s.scaler.update()
        else:
            s.optimizer.step()
        s.step += 1
        s.ema.update(s.step - 1)
        return loss.detach()

    def _stop_signal(self, signum: Optional[int], at_log_step: bool) -> Optional[int]:
        """The signal to stop at, the same on every rank: under DDP the ranks agree at log steps."""
        if not self.ddp.enabled:
            return signum
        if not at_log_step:
            return None
        flag = torch.tensor([0 if signum is None else signum], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def _write_config(self) -> None:
        text = json.dumps(json.loads(config_to_json(self.config)), indent=2, sort_keys=True)
        write_text(os.path.join(self.workdir, "config.json"), text)

    def _progress_bar(self):
        if not self.is_main or self.quiet or not sys.stderr.isatty():
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return None
        return tqdm(total=self.n_iters, initial=min(self.state.step, self.n_iters), desc="train",
                    dynamic_ncols=True)

    def run(self) -> TrainResult:
        """Train from the current step to ``training.n_iters``; see the module docstring."""
        s, config = self.state, self.config
        train_net: nn.Module = s.net
        if self.ddp.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            train_net = DDP(s.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        _, self.model = model_from_config(config, sde=self.sde, net=train_net, check_finite=False)
        if self.is_main:
            self._write_config()
        log = _LossLog(os.path.join(self.workdir, LOG_NAME), self.ddp, s.step, write=self.is_main)
        t_start = time.perf_counter()
        bar = None
        interrupted = None
        try:
            bar = self._progress_bar()
            with _SignalCatcher() as signals:
                s.net.train()
                while s.step < self.n_iters:
                    log.add(self._step())
                    step = s.step
                    if bar is not None:
                        bar.update(1)
                    at_log_step = step % self.log_freq == 0 or step == self.n_iters
                    if at_log_step:
                        loss = log.row(step, s.optimizer.param_groups[0]["lr"], self.grad_norm,
                                       time.perf_counter() - t_start, self.last_good)
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                    if self.numbered_freq > 0 and step % self.numbered_freq == 0:
                        self._save_good(os.path.join(self.workdir, f"checkpoint_{step}.pt"), log)
                    if self.ckpt_freq > 0 and step % self.ckpt_freq == 0 and step < self.n_iters:
                        self._save_good(self.last_path, log)
                    if (self.preview is not None and self.sample_freq > 0
                            and step % self.sample_freq == 0 and self.is_main):
                        _, ema_model = model_from_config(config, sde=self.sde, net=s.ema.net)
                        if self.preview_labels is not None:
                            ema_model = ema_model.bind(y=self.preview_labels)
                        path = self.preview(step, ema_model, self.data)
                        if path:
                            self.sample_paths.append(path)
                    stop = self._stop_signal(signals.signum, at_log_step)
                    if stop is not None:
                        interrupted = signal.Signals(stop).name
                        self.say(f"\n{interrupted} received: checkpointing at step {step} and stopping")
                        break
                # final checkpoint (also after an interruption)
                if s.step > 0 and (s.step != self.resumed_from or not os.path.isfile(self.last_path)):
                    self._save_good(self.last_path, log)
        finally:
            if bar is not None:
                bar.close()
            log.close()

        s.net.eval()
        _, ema_model = model_from_config(config, sde=self.sde, net=s.ema.net)
        return TrainResult(step=s.step, losses=log.rows, workdir=self.workdir,
                           checkpoint=self.last_path if os.path.isfile(self.last_path) else None,
                           net=s.net, ema_net=s.ema.net, model=ema_model, sde=self.sde,
                           config=config, interrupted=interrupted, resumed_from=self.resumed_from,
                           elapsed_s=time.perf_counter() - t_start, rank=self.ddp.rank,
                           world_size=self.ddp.world_size, sample_paths=self.sample_paths)


def _resume_point(config, workdir: str, resume: bool, own_net: bool):
    """``(path, checkpoint)`` to resume from, read and checked against ``config`` before the data
    and the model are loaded; ``(None, None)`` when there is none or ``resume=False``."""
    found = latest_checkpoint(workdir) if resume else None
    if found is None:
        return None, None
    ckpt = _load_resumable(found)
    _check_resumable(found, ckpt["config"], config, own_net=own_net)
    return found, ckpt


def train(config, workdir: str, *, quiet: bool = False, resume: bool = True,
          net: Optional[nn.Module] = None, data: Optional[torch.Tensor] = None,
          preview: Optional[PreviewFn] = None) -> TrainResult:
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
        preview: the hook called every ``training.sample_freq`` steps (:data:`PreviewFn`);
            :func:`sde_diffusion.train` passes :func:`sde_diffusion.evaluation.previews`. Without
            one, ``training.sample_freq > 0`` draws nothing and warns.
    """
    workdir = os.fspath(workdir)
    ddp = _Distributed(str(config.get("device", "auto")))
    lock = None
    try:
        _check_settings(config, ddp.world_size, data is not None)
        if preview is None and int(config.training.get("sample_freq", 0)) > 0:
            warnings.warn(f"config.training.sample_freq={int(config.training.sample_freq)} but no "
                          f"preview hook was passed: no sample pictures are drawn (sde_diffusion.train "
                          f"and `sde-diffusion train` draw them; or pass "
                          f"preview=sde_diffusion.evaluation.previews(config, workdir))")
        lock = _claim_workdir(workdir, ddp)
        found, ckpt = _resume_point(config, workdir, resume, own_net=net is not None)
        trainer = Trainer(config, workdir, ddp, quiet=quiet, net=net, data=data, preview=preview)
        if found is not None:
            trainer.restore(found, ckpt)
        del ckpt
        return trainer.run()
    finally:
        if lock is not None:
            lock.release()
        ddp.close()
