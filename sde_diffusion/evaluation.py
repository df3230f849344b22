"""Sample quality of a trained model, and the pictures a training run draws of it.

This module sits on top of the three jobs: it samples a model (``sde_diffusion.samplers``), scores
the samples (``sde_diffusion.metrics``), draws them (``sde_diffusion.reports``) and hands the
training job (``sde_diffusion.training``, which neither samples nor draws) its preview hook.

- :func:`evaluate_model`: sample with ``config.sampling`` and score against fresh data (sliced
  Wasserstein for the 2-D toys, a Fréchet distance with baselines for digits).
- :func:`previews`: the preview hook a config asks for (``training.sample_freq > 0``): every
  ``sample_freq`` steps it draws ``training.n_preview`` EMA samples into
  ``workdir/samples/step_<step>.png``.
- :func:`train`: :func:`sde_diffusion.training.train` with that hook: ``sde_diffusion.train``.
  ``sde-diffusion train`` passes the same hook; so previews are on by default wherever a config
  asks for them, and a caller of ``sde_diffusion.training.train`` chooses its own.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from . import data as data_module
from . import metrics
from .models import ScoreModel
from .reports import require_matplotlib, save_image_grid, save_scatter
from .samplers import sample
from .training import PreviewFn, TrainResult
from .training import train as _train_job

__all__ = ["evaluate_model", "previews", "train"]


def _sample(model: ScoreModel, n: int, data_shape: Sequence[int], config, generator,
            device) -> torch.Tensor:
    """``n`` samples of ``model`` with ``config.sampling``'s solver, steps and final denoising."""
    with torch.no_grad():
        result = sample(model, model.sde, shape=(n,) + tuple(data_shape),
                        solver=str(config.sampling.method), steps=int(config.sampling.steps),
                        generator=generator, device=device, progress=False,
                        denoise=bool(config.sampling.get("noise_removal", False)))
    return result.samples


# ---- previews during training ------------------------------------------------------------------
def previews(config, workdir: str) -> Optional[PreviewFn]:
    """The preview hook ``config`` asks for, or ``None`` when ``training.sample_freq`` is 0.

    At step ``s`` the hook samples ``training.n_preview`` points or images from the EMA model
    with ``config.sampling`` and writes ``workdir/samples/step_<s>.png``: an image grid for
    ``(C, H, W)`` data, a scatter over (up to 2000 points of) the training set for 2-D data;
    other shapes get no picture. It draws from its own generator, seeded by ``config.seed`` and
    the step, so previews never change the training's random streams. Raises ``ImportError``
    (saying ``pip install matplotlib``) at once when pictures cannot be written.
    """
    if int(config.training.get("sample_freq", 0)) <= 0:
        return None
    require_matplotlib()
    seed, n = int(config.seed), int(config.training.n_preview)
    folder = os.path.join(os.fspath(workdir), "samples")

    def preview(step: int, model: ScoreModel, data: torch.Tensor) -> Optional[str]:
        shape = tuple(data.shape[1:])
        if not (len(shape) == 3 or shape == (2,)):
            return None
        device = data.device
        g = torch.Generator(device=device).manual_seed(seed * 1000003 + step)
        x = _sample(model, n, shape, config, g, device).float().cpu()
        path = os.path.join(folder, f"step_{step}.png")
        os.makedirs(folder, exist_ok=True)
        if len(shape) == 3:
            return save_image_grid(x.clamp(-1, 1), path, nrow=max(1, int(math.sqrt(n))))
        return save_scatter(x, path, reference=data[:min(len(data), 2000)].float().cpu())

    return preview


def train(config, workdir: str, **kwargs) -> TrainResult:
    """:func:`sde_diffusion.training.train` (every argument the same) with the preview hook of
    :func:`previews` unless ``preview=`` is given: ``sde_diffusion.train``."""
    if "preview" not in kwargs:
        kwargs["preview"] = previews(config, workdir)
    return _train_job(config, workdir, **kwargs)


# ---- sample quality -------------------------------------------------------------------------------
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
      that the numbers compare (the Fréchet distance is biased by the sample size);
    - cifar10: the Fréchet distance of the pixels average-pooled to 8x8 (``fd_pool8``, 192
      features: no Inception weights offline -- FID proper is ``sde-diffusion fid`` on a samples
      file with ``--weights`` -- and a covariance that ``n`` in the thousands estimates, which the
      3072 raw pixels would need far more samples for) to the test split read from
      ``config.data.path``, with baselines at the same sample size (``fd_pool8_real_vs_real``: the
      first ``n`` training images; ``fd_pool8_real_vs_noise``: N(0, 1) noise clamped to
      [-1, 1]); ``n`` is capped at the 10000 test images.
    """
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
    elif name == "cifar10":
        ref = data_module.get_dataset("cifar10", path=str(config.data.path), split="test")
        n = min(n, ref.shape[0])
        shape = tuple(ref.shape[1:])
    else:
        ref = None
        shape = (2,)
    chunks = []
    bs = int(config.eval.batch_size)
    for start in range(0, n, bs):
        chunks.append(_sample(model, min(bs, n - start), shape, config, g, device).cpu())
    x = torch.cat(chunks).float()
    if name == "digits":
        fd = float(metrics.frechet_distance(x.clamp(-1, 1), ref, features="digits"))
        base = metrics.digits_fd_baselines(n=n, size=int(config.data.image_size))
        return {"fd": fd, "fd_real_vs_real": float(base["real_vs_real"]),
                "fd_real_vs_noise": float(base["real_vs_noise"]),
                "classifier_test_accuracy": float(base["test_accuracy"]), "n": n}
    if name == "cifar10":
        return _cifar10_scores(x, ref, str(config.data.path), seed)
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


def _cifar10_scores(x: torch.Tensor, test: torch.Tensor, path: str, seed: int) -> Dict[str, Any]:
    """The Fréchet distance of samples ``x`` to the CIFAR-10 test images on 8x8 average-pooled
    pixels, and its two baselines at the same sample size (see :func:`evaluate_model`)."""
    n = x.shape[0]
    train_x = data_module.get_dataset("cifar10", path=path, split="train")[:n]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 10_000)).clamp(-1, 1)
    pool = lambda a: nn.functional.adaptive_avg_pool2d(a.double(), 8).flatten(1)  # noqa: E731
    ref = metrics.gaussian_stats(pool(test))                     # the test split's fit, once
    fd = lambda a: metrics.frechet_distance_from_stats(*metrics.gaussian_stats(pool(a)), *ref)  # noqa: E731
    return {"fd_pool8": fd(x.clamp(-1, 1)), "fd_pool8_real_vs_real": fd(train_x),
            "fd_pool8_real_vs_noise": fd(noise), "n": n, "n_train_baseline": int(train_x.shape[0]),
            "n_reference": int(test.shape[0])}
