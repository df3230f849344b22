r"""Correctors: Langevin MCMC at a fixed time ``t``, targeting ``p_t`` with the score ``s(x, t)``
([SDE] Song et al. 2021, Sec. 4.2, Alg. 4 and 5; score_sde's ``LangevinCorrector`` and
``AnnealedLangevinDynamics``). Each corrector step costs one NFE:

.. math:: x \leftarrow x + \epsilon\, s(x, t) + \sqrt{2\epsilon}\, z .

Step sizes:

- ``langevin``: the signal-to-noise rule of [SDE] Alg. 4/5,
  ``epsilon = 2 a_i (snr ||z|| / ||s||)^2``, with ``||.||`` the norm of one sample's noise and
  score. ``snr_norm="batch"`` (default) averages both norms over the batch, as score_sde's
  ``LangevinCorrector`` does: the step is then one number per step, an estimate of
  ``E||z|| / E_{p_t}||s||``, but it ties a sample to its batch companions.
  ``snr_norm="sample"`` sets the step per sample from that sample's own norms, so a sample does not
  depend on its companions; it is reliable only in high dimension, where ``||s||`` concentrates.
  In low dimension the ratio ``||z||^2 / ||s||^2`` of one sample is heavy-tailed (an F(D, D)
  variable for a Gaussian mode; for ``D = 2`` its mean is infinite): samples near a mode centre,
  where ``s`` is small, take huge steps and the corrector inflates the modes (measured on a 2-D
  4-mode mixture with 300 PC steps: per-mode variance 3-20x too large per sample, within 2-16%
  with the batch norm; 8-D: 1.34-1.65x vs 1.03-1.09x; 64-D: 1.09-1.14x vs 1.02-1.11x).
- ``annealed_langevin``: NCSN's annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) in
  score_sde's form ``epsilon = 2 a_i (snr sigma(t))^2``, i.e. Alg. 1's ``alpha_i/2`` with
  ``alpha_i = eps sigma_i^2 / sigma_L^2`` and ``eps / sigma_L^2 = 4 a_i snr^2``: the step scales
  with the noise level.

``a_i`` is score_sde's ``alpha_i = 1 - beta_i`` of the SDE's ``N``-step DDPM chain at ``t`` for VP
and sub-VP and 1 for VE; written as ``a_i = exp(2 f(t) T / N)`` (``f = d log alpha / dt``) it is
the same for those SDEs (to first order in ``1/N``) and defined for every affine SDE.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

from .._checks import expand_to, require
from .base import SolverContext

__all__ = ["CORRECTORS", "langevin_step", "annealed_langevin_step", "check_corrector_options"]


def _a_i(ctx: SolverContext, i: int) -> float:
    """score_sde's ``alpha_i`` at grid time ``t_i``: ``exp(2 f(t_i) T / N)``."""
    return math.exp(2 * ctx.drift(i)[0] * (ctx.sde.T / ctx.sde.N))


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)


def langevin_step(ctx: SolverContext, i: int, x: torch.Tensor, snr: float,
                  snr_norm: str = "batch") -> torch.Tensor:
    """One Langevin step at grid time ``t_i`` with the signal-to-noise step size; the norms are
    averaged over the batch (``snr_norm="batch"``) or taken per sample (``"sample"``)."""
    grad = ctx.score(i, x)
    z = ctx.noise.randn()
    grad_norm, noise_norm = _per_sample_norm(grad), _per_sample_norm(z)
    if snr_norm == "batch":
        grad_norm, noise_norm = grad_norm.mean().expand_as(grad_norm), noise_norm.mean().expand_as(noise_norm)
    step = 2 * _a_i(ctx, i) * (snr * noise_norm / grad_norm.clamp(min=torch.finfo(x.dtype).tiny)) ** 2
    step = torch.where(grad_norm > 0, step, torch.zeros_like(step))  # s = 0: nothing to follow
    return x + expand_to(step, x) * grad + expand_to(torch.sqrt(2 * step), x) * z


def annealed_langevin_step(ctx: SolverContext, i: int, x: torch.Tensor, snr: float,
                           snr_norm: str = "batch") -> torch.Tensor:
    """One annealed-Langevin step at grid time ``t_i`` with the step ``2 a_i (snr sigma(t_i))^2``
    (``snr_norm`` is not used: the step does not depend on the state)."""
    grad = ctx.score(i, x)
    z = ctx.noise.randn()
    step = 2 * _a_i(ctx, i) * (snr * float(ctx.sigmas[i])) ** 2
    return x + step * grad + math.sqrt(2 * step) * z


CORRECTORS: Dict[str, Callable] = {"langevin": langevin_step,
                                   "annealed_langevin": annealed_langevin_step}


SNR_NORMS = ("batch", "sample")


def check_corrector_options(corrector: str, snr, n_steps, snr_norm: str = "batch") -> tuple:
    """Validate ``corrector`` (a name of :data:`CORRECTORS` or ``"none"``), ``snr``, ``n_steps``
    and ``snr_norm``."""
    valid = ("none",) + tuple(CORRECTORS)
    require(corrector in valid, f"unknown corrector {corrector!r}; valid correctors: {', '.join(valid)}")
    require(snr_norm in SNR_NORMS, f"snr_norm must be one of {', '.join(SNR_NORMS)}, got {snr_norm!r}")
    snr = float(snr)
    require(math.isfinite(snr) and snr > 0, f"snr must be a finite number > 0, got {snr!r}")
    require(isinstance(n_steps, int) and not isinstance(n_steps, bool) and n_steps >= 0,
            f"n_steps must be an integer >= 0, got {n_steps!r}")
    return corrector, snr, n_steps, snr_norm
