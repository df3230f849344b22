"""Sampling and likelihood at scale: sharded, resumable, the same result on any number of processes.

One run -- ``n`` samples, or the log-likelihood of ``n`` data points -- is cut into *shards* of
consecutive indices ``[start, stop)`` of ``shard_size`` each. Every shard is one ``.npz`` file in a
folder, written atomically (:func:`sde_diffusion._files.atomic_write`), so an interrupted run leaves
whole shards only, and a rerun skips them (resume). Under ``torchrun`` (``WORLD_SIZE > 1``; the
process group is set up as training does it, ``gloo`` on CPU and ``nccl`` on GPU) the shards still
missing are dealt out round-robin to the ranks; rank 0 then reads them all back in index order
(:func:`gather_shards`).

The result does not depend on the number of processes, the shard size or the batch size, because
every sample's randomness is a function of the integer seed and its index only:

- sampling: ``sample(..., generator=seed, index_offset=start)`` draws sample ``i``'s noise from
  ``(seed, i)`` (docs/samplers.md, "Seeds"; EDM's per-seed sampling, Karras et al. 2022);
- likelihood: the Hutchinson probes of point ``i`` come from the same indexed noise (Rademacher
  probes as the signs of those normal draws) and the probability-flow ODE runs with per-sample
  error control (``log_likelihood(..., per_sample=True)``), so a point's result does not depend
  on which points share its batch.

Fixed-step solvers then give bit-identical samples for every split; the adaptive ``ode`` /
``ode_scipy`` samplers share one step size per batch and do depend on the batch.

A folder belongs to one run: ``run.json`` records what determines the content (the ``key``: model,
solver, steps, seed, ...; never ``n``, the batch size or the number of processes). A rerun with
another key is refused unless ``overwrite=True``, which deletes the old shards first. A run with a
larger ``n`` reuses the whole shards of a smaller one.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._checks import require
from ._files import atomic_write, dumps_json, write_json

__all__ = ["SHARD_SIZE", "Shard", "Processes", "plan_shards", "run_shards", "gather_shards",
           "sample_shards", "likelihood_shards", "indexed_probes", "ShardError"]

#: default number of samples (or data points) per shard file
SHARD_SIZE = 1000
RUN_FILE = "run.json"
_SHARD_RE = re.compile(r"^shard_(\d{9})_(\d{9})\.npz$")
#: per-shard (not per-sample) entries of a shard file
_META = "meta_json"


class ShardError(ValueError):
    """A shard folder that belongs to another run, or a shard that cannot be read."""


@dataclass(frozen=True)
class Shard:
    """Indices ``[start, stop)`` of one run, stored in ``folder/shard_<start>_<stop>.npz``."""

    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard_{self.start:09d}_{self.stop:09d}.npz"

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(n: int, shard_size: int = SHARD_SIZE) -> List[Shard]:
    """The shards ``[k s, min((k + 1) s, n))`` of a run of ``n`` indices (the last one shorter)."""
    require(isinstance(n, int) and n >= 1, f"n must be an integer >= 1, got {n!r}")
    require(isinstance(shard_size, int) and shard_size >= 1,
            f"shard_size must be an integer >= 1, got {shard_size!r}")
    return [Shard(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


# ---- processes ------------------------------------------------------------------------------------
class Processes:
    """This process's place among the ranks: torchrun's (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``;
    the group set up by :mod:`sde_diffusion.training`'s own code, ``gloo`` on CPU, ``nccl`` on GPU,
    which also makes ``cuda`` mean ``cuda:LOCAL_RANK``), or rank 0 of 1 without torchrun."""

    def __init__(self, device: str = "cpu"):
        from .training import _Distributed

        self._dist = _Distributed(device)
        self.rank, self.world_size = self._dist.rank, self._dist.world_size
        self.device = self._dist.device
        # a rank that leaves with its gloo group alive can abort at exit ("terminate called
        # without an active exception"): close on every way out, errors included
        atexit.register(self.close)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self._dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group (once; later calls do nothing). Call it after the last
        collective: from here on each rank works alone."""
        self._dist.close()


class _Single:
    rank, world_size, is_main = 0, 1, True

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: Any) -> Any:
        return obj


# ---- the engine -----------------------------------------------------------------------------------
def _key_text(key: Dict[str, Any]) -> str:
    return dumps_json(key, sort_keys=True)


def _key_hash(key: Dict[str, Any]) -> str:
    return hashlib.sha256(_key_text(key).encode()).hexdigest()[:16]


def _read_shard(path: str, shard: Shard, key_hash: str, arrays: bool = True
                ) -> Optional[Dict[str, Any]]:
    """A finished shard's arrays (only its facts with ``arrays=False``), or None when the file is
    missing or is not this shard."""
    try:
        with np.load(path, allow_pickle=False) as f:    # members are read on access
            meta = json.loads(str(f[_META]))
            data = {k: f[k] for k in f.files if k != _META} if arrays else {}
    except (OSError, ValueError, EOFError, KeyError):
        return None
    if not isinstance(meta, dict):
        return None
    if meta.get("key") != key_hash or meta.get("start") != shard.start or meta.get("stop") != shard.stop:
        return None
    data[_META] = meta
    return data


def _claim_folder(folder: str, key: Dict[str, Any], overwrite: bool, processes) -> None:
    """Rank 0 checks (or writes) ``run.json``; every rank learns the outcome."""
    error = None
    if processes.is_main:
        path = os.path.join(folder, RUN_FILE)
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh).get("key")
        except FileNotFoundError:
            old = None
        except (OSError, ValueError) as err:
            old = {"unreadable": str(err)}
        if old is not None and _key_text(old) != _key_text(key):
            if overwrite:
                for name in os.listdir(folder):
                    if _SHARD_RE.match(name):
                        os.remove(os.path.join(folder, name))
            else:
                differ = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
                error = (f"shard folder {folder!r} holds shards of another run (it differs in "
                         f"{', '.join(differ)}): give another folder, or --overwrite to discard them")
        if error is None and (old is None or _key_text(old) != _key_text(key)):
            write_json(path, {"key": key, "key_hash": _key_hash(key)})
    error = processes.broadcast(error)
    if error is not None:
        raise ShardError(error)


def run_shards(folder: str, n: int, compute: Callable[[int, int], Dict[str, Any]], *,
               key: Dict[str, Any], shard_size: int = SHARD_SIZE, processes=None,
               overwrite: bool = False, log: Optional[Callable[[str], None]] = None) -> Dict[str, int]:
    """Compute and write every missing shard of a run of ``n`` indices into ``folder``.

    ``compute(start, stop)`` returns the shard's content: arrays whose first axis has
    ``stop - start`` entries (one per index), and under the key ``"meta"`` a JSON-able dict of
    per-shard facts (NFE, counts). ``key`` (JSON-able) names the run (see the module's docstring).
    Shards already on disk with this key are skipped; the missing ones are shared out round-robin
    among ``processes`` (:class:`Processes`; default one process). Every rank returns after all
    shards exist (a barrier). Returns ``{"shards", "computed", "skipped"}`` for this rank."""
    processes = processes or _Single()
    os.makedirs(folder, exist_ok=True)
    _claim_folder(folder, key, overwrite, processes)
    key_hash = _key_hash(key)
    shards = plan_shards(n, shard_size)
    missing = [s for s in shards
               if _read_shard(os.path.join(folder, s.name), s, key_hash, arrays=False) is None]
    missing = processes.broadcast(missing)      # one view of the folder for every rank
    mine = missing[processes.rank::processes.world_size]
    for k, shard in enumerate(mine):
        began = time.perf_counter()
        content = dict(compute(shard.start, shard.stop))
        meta = dict(content.pop("meta", {}) or {})
        for name, value in content.items():
            value = np.asarray(value)
            require(value.ndim >= 1 and value.shape[0] == len(shard),
                    f"compute({shard.start}, {shard.stop}) returned {name!r} with shape "
                    f"{value.shape}: its first axis must have {len(shard)} entries")
        meta.update(key=key_hash, start=shard.start, stop=shard.stop)
        arrays = {name: np.asarray(value) for name, value in content.items()}
        arrays[_META] = np.array(dumps_json(meta))

        def write(tmp: str, arrays=arrays) -> None:
            with open(tmp, "wb") as fh:   # a file object: np.savez would append ".npz" to a name
                np.savez(fh, **arrays)

        atomic_write(os.path.join(folder, shard.name), write)
        if log is not None:
            log(f"rank {processes.rank}: shard [{shard.start}, {shard.stop}) written "
                f"({k + 1}/{len(mine)}, {time.perf_counter() - began:.1f} s)")
    processes.barrier()
    return {"shards": len(shards), "computed": len(mine), "skipped": len(shards) - len(missing)}


def gather_shards(folder: str, n: int, *, key: Dict[str, Any], shard_size: int = SHARD_SIZE
                  ) -> Tuple[Dict[str, np.ndarray], List[Dict[str, Any]]]:
    """``(arrays, metas)``: every shard's arrays concatenated in index order (``n`` entries each)
    and the per-shard facts in the same order. Raises :class:`ShardError` naming a missing shard."""
    key_hash, parts, metas = _key_hash(key), {}, []
    for shard in plan_shards(n, shard_size):
        data = _read_shard(os.path.join(folder, shard.name), shard, key_hash)
        if data is None:
            raise ShardError(f"shard {shard.name} of {folder!r} is missing or belongs to another run")
        metas.append(data.pop(_META))
        for name, value in data.items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(v) for name, v in parts.items()}, metas


def _run_batched(folder: str, n: int, one_batch: Callable[[int, int], Dict[str, Any]],
                 batch_size: Optional[int], *, key: Dict[str, Any], shard_size: int, processes,
                 overwrite: bool, log: Optional[Callable[[str], None]]):
    """:func:`run_shards` with each shard computed by ``one_batch`` in batches of ``batch_size``
    (:func:`_in_batches`), then on the main rank :func:`gather_shards`'s ``(arrays, metas)``;
    ``None`` on the other ranks."""
    processes = processes or _Single()
    run_shards(folder, n, lambda a, b: _in_batches(a, b, batch_size, one_batch), key=key,
               shard_size=shard_size, processes=processes, overwrite=overwrite, log=log)
    if not processes.is_main:
        return None
    return gather_shards(folder, n, key=key, shard_size=shard_size)


def _in_batches(start: int, stop: int, batch_size: Optional[int],
                fn: Callable[[int, int], Dict[str, Any]]) -> Dict[str, Any]:
    """``fn`` on the batches ``[a, min(a + batch_size, stop))`` of ``[start, stop)``; per-index
    arrays concatenated, ``meta`` of the first batch with its ``sum_*`` entries summed."""
    size = stop - start if batch_size is None else batch_size
    require(isinstance(size, int) and size >= 1, f"batch_size must be an integer >= 1, got {batch_size!r}")
    parts: Dict[str, list] = {}
    meta: Dict[str, Any] = {}
    for a in range(start, stop, size):
        out = dict(fn(a, min(a + size, stop)))
        m = out.pop("meta", {})
        if not meta:
            meta = dict(m)
        else:
            for name, value in m.items():
                if name.startswith("sum_"):
                    meta[name] += value
                elif name.startswith("max_"):
                    meta[name] = max(meta[name], value)
        for name, value in out.items():
            parts.setdefault(name, []).append(value)
    return {**{name: np.concatenate(v) for name, v in parts.items()}, "meta": meta}


# ---- sampling -------------------------------------------------------------------------------------
def _calls(model) -> Dict[str, int]:
    """The model's running counts: ``network_calls`` (``nfe`` where it has no such count) and, for
    classifier guidance, ``classifier_calls``."""
    out = {"network_calls": int(getattr(model, "network_calls", model.nfe))}
    if hasattr(model, "classifier_calls"):
        out["classifier_calls"] = int(model.classifier_calls)
    return out


def sample_shards(model, folder: str, n: int, event_shape, *, seed: int, key: Dict[str, Any],
                  labels: Optional[torch.Tensor] = None, batch_size: Optional[int] = None,
                  shard_size: int = SHARD_SIZE, processes=None, overwrite: bool = False,
                  log: Optional[Callable[[str], None]] = None, **sample_kwargs
                  ) -> Optional[Dict[str, Any]]:
    """``n`` samples of ``model`` as :func:`~sde_diffusion.samplers.sample` would draw them with
    ``generator=seed`` in one batch, computed shard by shard (``batch_size`` samples per call),
    resumable, on every rank of ``processes``.

    ``labels``: ``(n,)`` per-sample class labels, bound to the model batch by batch
    (``model.bind(y=labels[a:b])``). ``sample_kwargs`` go to ``sample`` (solver, steps, grid, nfe,
    denoise, device, ...). Returns on rank 0 ``{"samples": (n, *event) array (the solver's dtype),
    "nfe": per-sample NFE (the largest over shards), "network_calls": summed, "config": the
    solver configuration}`` (``classifier_calls`` too for classifier guidance); None elsewhere."""
    from .samplers import sample

    require(isinstance(seed, int) and not isinstance(seed, bool),
            f"seed must be an integer (one seed per sample), got {seed!r}")
    event_shape = tuple(int(s) for s in event_shape)
    key = {"job": "sample", "seed": seed, "shape": list(event_shape), **key}
    from .oracles import GaussianMixture

    if isinstance(model, GaussianMixture):     # as sample() takes it: its exact model
        from .models import OracleModel

        model = OracleModel(model)

    def one_batch(a: int, b: int) -> Dict[str, Any]:
        m = model if labels is None else model.bind(y=labels[a:b])
        before = _calls(m)
        with torch.no_grad():
            result = sample(m, shape=(b - a,) + event_shape, generator=seed, index_offset=a,
                            **sample_kwargs)
        after = _calls(m)
        meta = {"max_nfe": int(result.nfe), "config": getattr(result, "config", {"solver": result.solver}),
                **{f"sum_{k}": after[k] - before[k] for k in after}}
        return {"samples": result.samples.cpu().numpy(), "meta": meta}

    gathered = _run_batched(folder, n, one_batch, batch_size, key=key, shard_size=shard_size,
                            processes=processes, overwrite=overwrite, log=log)
    if gathered is None:
        return None
    arrays, metas = gathered
    out = {"samples": arrays["samples"], "nfe": max(m["max_nfe"] for m in metas),
           "network_calls": sum(m["sum_network_calls"] for m in metas), "config": metas[0]["config"],
           "shards": len(metas)}
    if "sum_classifier_calls" in metas[0]:
        out["classifier_calls"] = sum(m["sum_classifier_calls"] for m in metas)
    return out


# ---- likelihood -----------------------------------------------------------------------------------
def indexed_probes(seed: int, start: int, shape, n_probes: int = 1, kind: str = "rademacher",
                   dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Hutchinson probes ``(n_probes, batch, *event)`` for the points ``start .. start + batch - 1``
    of a run: point ``i``'s probes depend on ``(seed, i)`` only (the samplers' indexed noise,
    :class:`~sde_diffusion.samplers.base.NoiseSource`). Rademacher probes are the signs of those
    normal draws (each entry +-1 with probability 1/2, independent), Gaussian probes the draws."""
    from .divergence import PROBES
    from .samplers.base import NoiseSource

    require(kind in PROBES, f"probe must be one of {PROBES}, got {kind!r}")
    noise = NoiseSource(seed, tuple(shape), dtype, torch.device(device or "cpu"), index_offset=start)
    draws = torch.stack([noise.randn() for _ in range(n_probes)])
    return torch.where(draws >= 0, 1.0, -1.0).to(dtype) if kind == "rademacher" else draws


def likelihood_shards(model, sde, x: torch.Tensor, folder: str, *, seed: int, key: Dict[str, Any],
                      divergence: str = "exact", n_probes: int = 1, probe: str = "rademacher",
                      batch_size: Optional[int] = None, shard_size: int = SHARD_SIZE,
                      processes=None, overwrite: bool = False,
                      log: Optional[Callable[[str], None]] = None, **likelihood_kwargs):
    """The probability-flow log-likelihood of the ``n = len(x)`` points ``x``, shard by shard
    (see the module's docstring), with per-sample error control and indexed probes
    (:func:`indexed_probes`), so the result does not depend on the split.

    Returns on rank 0 a :class:`~sde_diffusion.likelihood.LikelihoodResult` over all ``n`` points
    (``latent`` left empty: only its per-point norm is kept; ``nfe`` summed over shards,
    ``wall_time`` the shards' compute time), and None on the other ranks. Its
    :meth:`~sde_diffusion.likelihood.LikelihoodResult.summary` gives the mean bits/dim and
    ``bpd_ci95`` = 1.96 standard errors."""
    from .likelihood import LikelihoodResult, log_likelihood

    require(isinstance(seed, int) and not isinstance(seed, bool),
            f"seed must be an integer (one seed per point), got {seed!r}")
    n = int(x.shape[0])
    key = {"job": "likelihood", "seed": seed, "shape": list(x.shape[1:]), "divergence": divergence,
           "n_probes": n_probes if divergence == "hutchinson" else None, "probe": probe, **key}

    def one_batch(a: int, b: int) -> Dict[str, Any]:
        xb = x[a:b]
        probes = None
        if divergence == "hutchinson":
            probes = indexed_probes(seed, a, xb.shape, n_probes, probe, xb.dtype, xb.device)
        began = time.perf_counter()
        r = log_likelihood(model, sde, xb, divergence=divergence, n_probes=n_probes, probes=probes,
                           per_sample=True, **likelihood_kwargs)
        return {"log_likelihood": r.log_likelihood.double().cpu().numpy(),
                "prior_logp": r.prior_logp.double().cpu().numpy(),
                "delta_logp": r.delta_logp.double().cpu().numpy(),
                "n_fevals": r.n_fevals.cpu().numpy(),
                "latent_norm2": r.latent_norm2.double().cpu().numpy(),
                "latent_outlier": r.latent_outlier.cpu().numpy(),
                "meta": {"sum_nfe": int(r.nfe), "sum_wall_time": time.perf_counter() - began,
                         "dim": r.dim, "divergence": r.divergence, "outlier_tail": r.outlier_tail}}

    gathered = _run_batched(folder, n, one_batch, batch_size, key=key, shard_size=shard_size,
                            processes=processes, overwrite=overwrite, log=log)
    if gathered is None:
        return None
    arrays, metas = gathered
    ll = torch.from_numpy(arrays["log_likelihood"])
    dim = metas[0]["dim"]
    nll = -ll
    return LikelihoodResult(
        log_likelihood=ll, nll=nll, bpd=nll / (dim * np.log(2.0)), latent=torch.empty(n, 0),
        prior_logp=torch.from_numpy(arrays["prior_logp"]),
        delta_logp=torch.from_numpy(arrays["delta_logp"]), nfe=sum(m["sum_nfe"] for m in metas),
        n_fevals=torch.from_numpy(arrays["n_fevals"]), dim=dim, divergence=metas[0]["divergence"],
        wall_time=sum(m["sum_wall_time"] for m in metas),
        latent_norm2=torch.from_numpy(arrays["latent_norm2"]),
        latent_outlier=torch.from_numpy(arrays["latent_outlier"]), outlier_tail=metas[0]["outlier_tail"])


def _stderr_log(quiet: bool) -> Optional[Callable[[str], None]]:
    if quiet:
        return None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


# ---- the command line (sde-diffusion sample / likelihood) ------------------------------------------
#: options that never change a run's content (left out of its key)
_NOT_IN_KEY = {"n", "out", "overwrite", "quiet", "batch", "shards", "shard_size", "func", "argv",
               "command", "device"}


def add_arguments(p) -> None:
    """``--shards``, ``--shard-size`` and ``--batch`` of ``sample`` and ``likelihood``."""
    p.add_argument("--shards", default=None,
                   help="shard folder: compute in shards of --shard-size, each written when done, "
                        "and skip the finished ones on a rerun (resume); default, whenever "
                        "sharded (--shard-size, --batch or torchrun): OUT.shards beside --out "
                        "(sample), likelihood.shards (likelihood)")
    p.add_argument("--shard-size", type=int, default=None,
                   help=f"samples or points per shard file (default {SHARD_SIZE})")
    p.add_argument("--batch", type=int, default=None,
                   help="samples or points per call of the solver (default: the shard); the "
                        "result does not depend on it")


def requested(args) -> bool:
    """Whether ``args`` asks for a sharded run (a shard option, or launched by torchrun)."""
    return (args.shards is not None or args.shard_size is not None or args.batch is not None
            or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def check_arguments(args) -> None:
    for name in ("shard_size", "batch"):
        value = getattr(args, name)
        require(value is None or value >= 1,
                f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.shards is not None:
        require(not os.path.isfile(args.shards),
                f"--shards {args.shards!r} is a file; give a folder (created if needed)")


def start(args) -> Optional["Processes"]:
    """For a sharded run (:func:`requested`): the arguments checked and the ranks set up
    (:class:`Processes`; under torchrun this joins the process group). None otherwise."""
    if not requested(args):
        return None
    check_arguments(args)
    return Processes(args.device)


def folder_for(args, default: str) -> str:
    return args.shards if args.shards is not None else default


def run_key(args, device) -> Dict[str, Any]:
    """What determines a run's content, from the parsed command line: every option but those of
    :data:`_NOT_IN_KEY`; the device's type (noise differs between CPU and CUDA); for a checkpoint
    its resolved path, size and modification time."""
    key = {k: v for k, v in sorted(vars(args).items())
           if k not in _NOT_IN_KEY and isinstance(v, (str, int, float, bool, type(None), list, tuple))}
    key["device_type"] = torch.device(device).type
    if getattr(args, "checkpoint", None):
        from .checkpoints import latest_checkpoint

        path = args.checkpoint
        path = latest_checkpoint(path) if os.path.isdir(path) else path
        st = os.stat(path)
        key["checkpoint"] = {"path": os.path.abspath(path), "size": st.st_size,
                             "mtime_ns": st.st_mtime_ns}
    return key


def cli_sample(args, guided, shape, device, processes, run_kw: Dict[str, Any]):
    """The sharded body of ``sde-diffusion sample``: ``(result, counts)`` on rank 0, where
    ``result`` has ``samples`` (a tensor), ``nfe`` and ``config`` as ``sample``'s; ``None`` on the
    other ranks. ``guided.model`` is bound to all ``n`` labels; each batch binds its own slice
    (:meth:`~sde_diffusion.models.ScoreModel.bind`: the later ``y`` wins)."""
    from types import SimpleNamespace

    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    gathered = sample_shards(
        guided.model, folder_for(args, out[:-4] + ".shards"), args.n, shape, seed=args.seed,
        key=run_key(args, device), labels=guided.labels,
        batch_size=args.batch, shard_size=args.shard_size or SHARD_SIZE, processes=processes,
        overwrite=args.overwrite, log=_stderr_log(args.quiet), device=device, **run_kw)
    processes.close()   # after the last barrier: rank 0 only reads files from here on
    if gathered is None:
        return None
    counts = {"network_calls": gathered["network_calls"]}
    if "classifier_calls" in gathered:
        counts["classifier_calls"] = gathered["classifier_calls"]
    result = SimpleNamespace(samples=torch.from_numpy(gathered["samples"]), nfe=gathered["nfe"],
                             config=gathered["config"])
    return result, counts


def cli_likelihood(args, model, sde, x, divergence: str, processes):
    """The sharded body of ``sde-diffusion likelihood``: a ``LikelihoodResult`` on rank 0 (None
    elsewhere) and the extra report entries (``bpd_se``, ``shards``)."""
    result = likelihood_shards(
        model, sde, x, folder_for(args, "likelihood.shards"), seed=args.seed, key=run_key(args, x.device),
        divergence=divergence, n_probes=args.probes or 1, batch_size=args.batch,
        shard_size=args.shard_size or SHARD_SIZE, processes=processes,
        overwrite=getattr(args, "overwrite", False), log=_stderr_log(args.quiet), rtol=args.rtol, atol=args.atol)
    processes.close()   # after the last barrier: rank 0 only reads files from here on
    if result is None:
        return None, {}
    bpd = result.bpd.double()
    se = float(bpd.std() / np.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    return result, {"bpd_se": se, "per_sample": True,
                    "shards": folder_for(args, "likelihood.shards")}
