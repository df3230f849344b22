r"""Training objectives: denoising score matching in continuous time and the discrete DDPM / SMLD
losses, for any parameterization (eps, x0, v, score) through the model wrapper.

Continuous time (Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 7):

.. math:: \mathcal L(\theta) = \mathbb E_{t}\,\lambda(t)\,\mathbb E_{x_0, z}
          \big\|s_\theta(x_t, t) + z/\sigma(t)\big\|^2,\qquad x_t = \alpha(t) x_0 + \sigma(t) z .

With :math:`\hat\varepsilon = -\sigma s_\theta` (the wrapper's ``eps`` view) the residual is
:math:`\|\hat\varepsilon - z\|^2/\sigma^2`, so every weighting is an eps-MSE times a factor:

- ``weighting="score_sde"``: :math:`\lambda = \sigma^2`, factor 1 (score_sde's default);
- ``weighting="likelihood"``: :math:`\lambda = g^2`, factor :math:`g^2/\sigma^2` (Song, Durkan,
  Murray & Ermon 2021, "Maximum Likelihood Training of Score-Based Diffusion Models", Thm. 1:
  the loss then bounds the negative log-likelihood).

For every affine SDE, :math:`g^2/\sigma^2 = -2\,d\lambda_{snr}/dt` where
:math:`\lambda_{snr} = \log(\alpha/\sigma)` (from :math:`g^2 = d\sigma^2/dt - 2 f \sigma^2` and
:math:`f = d\log\alpha/dt`). Importance sampling of t with density proportional to
:math:`g^2/\sigma^2` (Song et al. 2021, MLE paper, Sec. 5) is therefore *uniform in log-SNR*:
:math:`t = t(\lambda)` with :math:`\lambda \sim U[\lambda(T), \lambda(\epsilon)]`, exact for every
SDE through ``sde.t_of_lambda``; each sample is then reweighted by ``weight(t) / p(t)``.

``reduce_mean=True`` averages the squared residual over data dimensions; ``False`` takes half the
sum, as score_sde does. The batch mean of the per-sample losses is returned.

Discrete objectives:

- :func:`ddpm_loss` (Ho et al. 2020, eq. 14, "L_simple"): ``i ~ U{0..N-1}``,
  ``x_i = sqrt(abar_i) x_0 + sqrt(1 - abar_i) z``, loss ``||eps_hat - z||^2``.
- :func:`smld_loss` (Song & Ermon 2019, eq. 6 with lambda(sigma) = sigma^2): ``i ~ U{0..N-1}``,
  ``x = x_0 + sigma_i z``, loss ``sigma_i^2 ||s_theta + z / sigma_i||^2``; reduce_mean=False by
  default, as score_sde.

Each discrete noise level is fed to the network at the continuous time with the *same log-SNR*
(``t_i = sde.t_of_lambda(lambda_i)``), so the wrapper's conversions between parameterizations are
exact at the trained noise levels and the trained model is a model of the continuous SDE as well.
For SMLD this is exactly ``t_i = i T / (N - 1)``; for DDPM's linear betas ``t_i`` is within
``~1/N`` of ``(i + 1) T / N``; the last few DDPM levels lie slightly beyond ``T`` (abar below
``alpha(T)^2`` by ~7 %) and are clamped to ``T``.

Class labels: a conditional network (``num_classes=K``) gets the batch's labels ``y`` through the
loss's keyword arguments (``model.eps(x_t, t, y=y)``). For classifier-free guidance (Ho & Salimans
2022, "Classifier-Free Diffusion Guidance", Algorithm 1) :func:`drop_labels` replaces each label by
the null label ``K`` with probability ``p_uncond`` (they use 0.1 or 0.2), so the one network also
learns the unconditional score. :func:`classifier_loss` trains a noise-conditional classifier
``p(y | x_t, t)`` with cross-entropy at ``t ~ U[eps, T]`` (Dhariwal & Nichol 2021, Sec. 4).

Data parallelism: with ``world_size > 1`` each rank passes its shard ``x0`` of a global batch of
``world_size * len(x0)`` samples; every rank draws the random numbers for the *whole* global batch
from the same generator and keeps its own slice, so the losses (and, after DDP's gradient average,
the update) equal those of one process with the global batch.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ._checks import expand_to, require
from .config import check_p_uncond
from .models.classifier import NoisyClassifier
from .models.factory import config_task
from .models.wrapper import ScoreModel
from .sdes import SDE, VESDE, VPSDE

__all__ = ["dsm_loss", "ddpm_loss", "smld_loss", "sample_time", "importance_sampling_norm",
           "get_loss_fn", "WEIGHTINGS", "drop_labels", "classifier_loss"]

WEIGHTINGS = ("score_sde", "likelihood")


# ---- randomness for a shard of a global batch -------------------------------------------------
def _draw(fn: Callable, shape: Tuple[int, ...], generator, device, dtype, rank: int,
          world_size: int) -> torch.Tensor:
    """``fn`` (torch.rand / torch.randn) of the global batch, sliced to this rank's shard."""
    n = shape[0]
    if world_size == 1:
        return fn(shape, generator=generator, device=device, dtype=dtype)
    full = fn((n * world_size,) + tuple(shape[1:]), generator=generator, device=device, dtype=dtype)
    return full[rank * n:(rank + 1) * n]


def _randint(high: int, n: int, generator, device, rank: int, world_size: int) -> torch.Tensor:
    full = torch.randint(0, high, (n * world_size,), generator=generator, device=device)
    return full[rank * n:(rank + 1) * n]


def _check_shard(rank: int, world_size: int) -> None:
    require(isinstance(world_size, int) and world_size >= 1,
            f"world_size must be an integer >= 1, got {world_size!r}")
    require(isinstance(rank, int) and 0 <= rank < world_size,
            f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")


def _generator_device(generator: Optional[torch.Generator], x: torch.Tensor):
    return generator.device if generator is not None else x.device


def _reduce(sq: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    flat = sq.reshape(sq.shape[0], -1)
    return flat.mean(dim=1) if reduce_mean else 0.5 * flat.sum(dim=1)


# ---- time sampling ----------------------------------------------------------------------------
def importance_sampling_norm(sde: SDE, eps: float) -> float:
    r""":math:`Z = \int_\epsilon^T g^2/\sigma^2\,dt = 2(\lambda(\epsilon) - \lambda(T))`, the
    normaliser of the importance-sampling density ``p(t) = g(t)^2 / (sigma(t)^2 Z)``."""
    lam = sde.lambda_(torch.tensor([eps, sde.T], dtype=torch.float64))
    return float(2 * (lam[0] - lam[1]))


def sample_time(sde: SDE, n: int, generator: Optional[torch.Generator] = None,
                importance_sampling: bool = False, eps: Optional[float] = None,
                device=None, dtype=torch.float32, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    r"""``n`` training times in ``[eps, T]``: uniform, or with density proportional to
    :math:`g^2/\sigma^2` (``importance_sampling=True``), drawn as uniform log-SNR values mapped
    through ``sde.t_of_lambda`` (computed in float64)."""
    eps = _check_eps(sde, eps)
    u = _draw(torch.rand, (n,), generator, device, torch.float64, rank, world_size)
    if not importance_sampling:
        return (eps + u * (sde.T - eps)).to(dtype)
    lam = sde.lambda_(torch.tensor([eps, sde.T], dtype=torch.float64)).tolist()  # on CPU: no sync
    lam_t = lam[0] + u * (lam[1] - lam[0])  # from lambda(eps) (high) down to lambda(T) (low)
    t = sde.t_of_lambda(lam_t).clamp(eps, sde.T)
    return t.to(dtype)


def _check_eps(sde: SDE, eps: Optional[float]) -> float:
    eps = sde.eps if eps is None else float(eps)
    require(0 < eps < sde.T, f"eps must lie in (0, T={sde.T}), got {eps!r}")
    return eps


# ---- continuous-time denoising score matching -------------------------------------------------
def dsm_loss(model: ScoreModel, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
             weighting: str = "score_sde", importance_sampling: bool = False,
             reduce_mean: bool = True, eps: Optional[float] = None, *,
             t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
             return_per_sample: bool = False, rank: int = 0, world_size: int = 1,
             **model_kwargs) -> torch.Tensor:
    r"""Continuous-time DSM loss of ``model`` (a :class:`ScoreModel`, any parameterization) on
    the clean batch ``x0`` (see the module docstring for the formulas).

    Args:
        weighting: ``"score_sde"`` (lambda = sigma^2) or ``"likelihood"`` (lambda = g^2).
        importance_sampling: draw t with density proportional to g^2/sigma^2 and reweight by
            ``weight(t) / p(t)`` (unbiased for either weighting; the variance reducer for
            ``"likelihood"``).
        reduce_mean: mean over data dims (True) or half the sum (False, score_sde).
        eps: smallest time; ``None`` uses ``model.sde.eps`` (score_sde trains with 1e-5).
        t, noise: optional fixed times ``(B,)`` and noise shaped like ``x0`` (tests); when ``t``
            is given with ``importance_sampling=True`` it is taken as drawn from the IS density.
        return_per_sample: return the ``(B,)`` per-sample losses instead of their mean.
        rank, world_size: this batch is shard ``rank`` of a global batch (see module docstring).
        **model_kwargs: passed to the network (e.g. ``y=labels``).
    """
    require(isinstance(model, ScoreModel), f"model must be a ScoreModel, got {type(model).__name__}")
    require(weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    require(isinstance(x0, torch.Tensor) and x0.is_floating_point() and x0.ndim >= 2,
            f"x0 must be a floating tensor of shape (batch, ...), got "
            f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    _check_shard(rank, world_size)
    sde = model.sde
    eps = _check_eps(sde, eps)
    B = x0.shape[0]
    gdev = _generator_device(generator, x0)
    if t is None:
        t = sample_time(sde, B, generator, importance_sampling, eps, device=gdev,
                        dtype=x0.dtype, rank=rank, world_size=world_size).to(x0.device)
    else:
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).expand(B)
    if noise is None:
        noise = _draw(torch.randn, tuple(x0.shape), generator, gdev, x0.dtype, rank,
                      world_size).to(x0.device)
    require(noise.shape == x0.shape, f"noise must be shaped like x0 {tuple(x0.shape)}, "
                                     f"got {tuple(noise.shape)}")
    # alpha, sigma without a device sync: drawn times lie in [eps, T]; a given t is range-checked
    # by the wrapper on CPU (on a GPU the wrapper skips the check, which would sync every step)
    _, log_alpha, log_sigma = sde.log_scales(t, sync=False)
    x_t = expand_to(log_alpha.exp(), x0) * x0 + expand_to(log_sigma.exp(), x0) * noise
    eps_hat = model.eps(x_t, t, **model_kwargs)
    per_sample = _reduce((eps_hat.to(x0.dtype) - noise) ** 2, reduce_mean)

    # weight(t) relative to the eps-MSE: 1 for sigma^2 weighting, g^2/sigma^2 for g^2 weighting
    if weighting == "likelihood":
        _, g2 = sde.f_g2(t, sync=False)
        weight = g2 * torch.exp(-2 * log_sigma)
    else:
        weight = None
    if importance_sampling:
        # p(t) = g^2 / (sigma^2 Z): divide weight(t) by it
        _, g2 = sde.f_g2(t, sync=False)
        inv_p = importance_sampling_norm(sde, eps) * torch.exp(2 * log_sigma) / g2
        weight = inv_p if weight is None else weight * inv_p
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.dtype)
    return per_sample if return_per_sample else per_sample.mean()


# ---- discrete objectives --------------------------------------------------------------------------
def _discrete_times(sde: SDE, log_snr: torch.Tensor) -> torch.Tensor:
    """Continuous times with the given log-SNR values, clamped to [0, T]."""
    return sde.t_of_lambda(log_snr).clamp(0.0, sde.T)


def ddpm_times(sde: VPSDE) -> torch.Tensor:
    """The ``N`` continuous times (float64) at which :func:`ddpm_loss` feeds its noise levels:
    ``log-SNR(t_i) = 0.5 log(abar_i / (1 - abar_i))`` with DDPM's ``abar_i = prod_{j<=i} (1 - beta_j)``."""
    require(isinstance(sde, VPSDE), f"the DDPM loss needs a VPSDE, got {sde!r}")
    abar = torch.cumprod(1 - sde.discrete_betas.to(torch.float64), dim=0)
    lam = 0.5 * (torch.log(abar) - torch.log1p(-abar))
    return _discrete_times(sde, lam)


def smld_times(sde: VESDE) -> torch.Tensor:
    """The ``N`` times of SMLD's geometric sigmas: ``sigma(t_i) = sigma_i``, i.e. ``i T / (N - 1)``."""
    require(isinstance(sde, VESDE), f"the SMLD loss needs a VESDE, got {sde!r}")
    return _discrete_times(sde, -torch.log(sde.discrete_sigmas.to(torch.float64)))


def _discrete_loss(model, x0, times64, generator, reduce_mean, indices, noise, rank, world_size,
                   model_kwargs):
    _check_shard(rank, world_size)
    B = x0.shape[0]
    N = times64.shape[0]
    gdev = _generator_device(generator, x0)
    if indices is None:
        indices = _randint(N, B, generator, gdev, rank, world_size).to(x0.device)
    else:  # validated only when given (the check would sync a GPU every step)
        indices = torch.as_tensor(indices, device=x0.device).long()
        require(indices.shape == (B,) and bool(((indices >= 0) & (indices < N)).all()),
                f"indices must be a (batch,) tensor of integers in [0, {N})")
    t = times64.to(device=x0.device)[indices].to(x0.dtype)
    if noise is None:
        noise = _draw(torch.randn, tuple(x0.shape), generator, gdev, x0.dtype, rank,
                      world_size).to(x0.device)
    sde = model.sde
    _, log_alpha, log_sigma = sde.log_scales(t, sync=False)
    x_t = expand_to(log_alpha.exp(), x0) * x0 + expand_to(log_sigma.exp(), x0) * noise
    eps_hat = model.eps(x_t, t, **model_kwargs)
    return _reduce((eps_hat.to(x0.dtype) - noise) ** 2, reduce_mean)


def ddpm_loss(model: ScoreModel, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
              reduce_mean: bool = True, *, indices: Optional[torch.Tensor] = None,
              noise: Optional[torch.Tensor] = None, return_per_sample: bool = False,
              rank: int = 0, world_size: int = 1, **model_kwargs) -> torch.Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. 14) on the N-step chain of ``model.sde`` (a
    :class:`VPSDE`, linear or cosine): uniform discrete level ``i``, eps-MSE. ``indices`` fixes
    the levels (tests)."""
    require(isinstance(model, ScoreModel), f"model must be a ScoreModel, got {type(model).__name__}")
    per_sample = _discrete_loss(model, x0, ddpm_times(model.sde), generator, reduce_mean, indices,
                                noise, rank, world_size, model_kwargs)
    return per_sample if return_per_sample else per_sample.mean()


def smld_loss(model: ScoreModel, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
              reduce_mean: bool = False, *, indices: Optional[torch.Tensor] = None,
              noise: Optional[torch.Tensor] = None, return_per_sample: bool = False,
              rank: int = 0, world_size: int = 1, **model_kwargs) -> torch.Tensor:
    """NCSN/SMLD loss (Song & Ermon 2019, eq. 6, lambda(sigma) = sigma^2) over the N geometric
    sigmas of ``model.sde`` (a :class:`VESDE`): ``sigma_i^2 ||s + z/sigma_i||^2 = ||eps_hat - z||^2``.
    ``reduce_mean=False`` (half the sum over dims) by default, as in score_sde."""
    require(isinstance(model, ScoreModel), f"model must be a ScoreModel, got {type(model).__name__}")
    per_sample = _discrete_loss(model, x0, smld_times(model.sde), generator, reduce_mean, indices,
                                noise, rank, world_size, model_kwargs)
    return per_sample if return_per_sample else per_sample.mean()


# ---- labels -----------------------------------------------------------------------------------
def drop_labels(y: torch.Tensor, p_uncond: float, null_label: int,
                generator: Optional[torch.Generator] = None, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
    """``y`` with each label replaced by ``null_label`` independently with probability
    ``p_uncond`` (Ho & Salimans 2022, Algorithm 1: "c <- null with probability p_uncond"). One
    uniform number per sample of the global batch is drawn from ``generator`` (nothing is drawn
    when ``p_uncond == 0``), so a run resumes exactly and DDP ranks drop as one process would."""
    require(0.0 <= float(p_uncond) < 1.0, f"p_uncond must lie in [0, 1), got {p_uncond!r}")
    if float(p_uncond) == 0.0:
        return y
    _check_shard(rank, world_size)
    gdev = generator.device if generator is not None else y.device
    u = _draw(torch.rand, (y.shape[0],), generator, gdev, torch.float32, rank, world_size).to(y.device)
    return torch.where(u < float(p_uncond), torch.full_like(y, int(null_label)), y)


def classifier_loss(classifier: NoisyClassifier, x0: torch.Tensor, y: torch.Tensor,
                    generator: Optional[torch.Generator] = None, eps: Optional[float] = None, *,
                    t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                    return_per_sample: bool = False, rank: int = 0,
                    world_size: int = 1) -> torch.Tensor:
    r"""Cross-entropy of a noise-conditional classifier on the forward process:
    :math:`\mathbb E_{t \sim U[\epsilon, T]}\,\mathbb E_{x_0, y, z}\,[-\log p_\phi(y \mid x_t, t)]`
    with :math:`x_t = \alpha(t) x_0 + \sigma(t) z` (Dhariwal & Nichol 2021, Sec. 4; score_sde's
    noise-conditional classifier). ``t`` and ``noise`` are drawn as in :func:`dsm_loss` (same order,
    same sharding) unless given."""
    require(isinstance(classifier, NoisyClassifier),
            f"classifier must be a NoisyClassifier, got {type(classifier).__name__}")
    require(isinstance(x0, torch.Tensor) and x0.is_floating_point() and x0.ndim >= 2,
            "x0 must be a floating tensor of shape (batch, ...)")
    require(isinstance(y, torch.Tensor) and not y.is_floating_point() and y.shape == (x0.shape[0],),
            f"y must be an integer (batch,) tensor with batch {x0.shape[0]}")
    _check_shard(rank, world_size)
    sde = classifier.sde
    eps = _check_eps(sde, eps)
    B = x0.shape[0]
    gdev = _generator_device(generator, x0)
    if t is None:
        t = sample_time(sde, B, generator, False, eps, device=gdev, dtype=x0.dtype, rank=rank,
                        world_size=world_size).to(x0.device)
    else:
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).expand(B)
    if noise is None:
        noise = _draw(torch.randn, tuple(x0.shape), generator, gdev, x0.dtype, rank,
                      world_size).to(x0.device)
    _, log_alpha, log_sigma = sde.log_scales(t, sync=False)
    x_t = expand_to(log_alpha.exp(), x0) * x0 + expand_to(log_sigma.exp(), x0) * noise
    per_sample = torch.nn.functional.cross_entropy(classifier.logits(x_t, t), y.long(), reduction="none")
    return per_sample if return_per_sample else per_sample.mean()


# ---- from a config -----------------------------------------------------------------------------
def get_loss_fn(config, sde: SDE) -> Callable:
    """``loss_fn(model, x0, generator, rank=0, world_size=1) -> scalar`` chosen by
    ``config.training`` as in score_sde: ``continuous=True`` -> :func:`dsm_loss` (with
    ``likelihood_weighting``, ``importance_sampling``, ``reduce_mean``, ``eps``);
    ``continuous=False`` -> :func:`ddpm_loss` for a VP SDE, :func:`smld_loss` for VE.

    Labels: ``loss_fn(..., y=labels)`` passes them to the network, each first replaced by the null
    label ``config.model.num_classes`` with probability ``training.p_uncond``
    (:func:`drop_labels`, drawn from ``generator`` before the times and the noise).
    ``training.task = "classifier"`` -> :func:`classifier_loss` (``loss_fn(clf, x0, generator,
    rank, world_size, y=labels)``, times in ``[training.eps, T]``)."""
    tr = config.training
    reduce_mean = bool(tr.get("reduce_mean", True))
    task = config_task(config)
    p_uncond = check_p_uncond(config)
    if task == "classifier":
        require(bool(tr.get("continuous", True)) and not bool(tr.get("likelihood_weighting", False))
                and not bool(tr.get("importance_sampling", False)),
                "the classifier task trains at uniform continuous times: set continuous=True, "
                "likelihood_weighting=False, importance_sampling=False")
        eps = float(tr.get("eps", 1e-5))
        require(0 < eps < sde.T, f"config.training.eps must lie in (0, T={sde.T}), got {eps!r}")

        def classifier_loss_fn(model, x0, generator=None, rank=0, world_size=1, y=None):
            require(y is not None, "the classifier task needs labels: loss_fn(..., y=labels)")
            return classifier_loss(model, x0, y, generator, eps=eps, rank=rank, world_size=world_size)
        return classifier_loss_fn
    inner = _score_loss_fn(config, sde, reduce_mean)
    if p_uncond == 0.0:
        return inner
    null = int(config.model.num_classes)

    def loss_with_dropout(model, x0, generator=None, rank=0, world_size=1, **kw):
        if kw.get("y") is not None:
            kw["y"] = drop_labels(kw["y"], p_uncond, null, generator, rank, world_size)
        return inner(model, x0, generator, rank=rank, world_size=world_size, **kw)
    return loss_with_dropout


def _score_loss_fn(config, sde: SDE, reduce_mean: bool) -> Callable:
    tr = config.training
    if bool(tr.get("continuous", True)):
        weighting = "likelihood" if bool(tr.get("likelihood_weighting", False)) else "score_sde"
        importance = bool(tr.get("importance_sampling", False))
        eps = float(tr.get("eps", 1e-5))
        require(0 < eps < sde.T, f"config.training.eps must lie in (0, T={sde.T}), got {eps!r}")

        def loss_fn(model, x0, generator=None, rank=0, world_size=1, **kw):
            return dsm_loss(model, x0, generator, weighting=weighting,
                            importance_sampling=importance, reduce_mean=reduce_mean, eps=eps,
                            rank=rank, world_size=world_size, **kw)
        return loss_fn
    require(not bool(tr.get("likelihood_weighting", False)) and
            not bool(tr.get("importance_sampling", False)),
            "likelihood_weighting / importance_sampling need continuous=True")
    if isinstance(sde, VPSDE):
        def loss_fn(model, x0, generator=None, rank=0, world_size=1, **kw):
            return ddpm_loss(model, x0, generator, reduce_mean=reduce_mean, rank=rank,
                             world_size=world_size, **kw)
        return loss_fn
    if isinstance(sde, VESDE):
        def loss_fn(model, x0, generator=None, rank=0, world_size=1, **kw):
            return smld_loss(model, x0, generator, reduce_mean=reduce_mean, rank=rank,
                             world_size=world_size, **kw)
        return loss_fn
    raise ValueError(f"discrete training (continuous=False) is defined for VP (DDPM) and VE (SMLD) "
                     f"SDEs, got {type(sde).__name__}; use continuous=True")
