r"""DPS, diffusion posterior sampling (Chung, Kim, Mccann, Klasky & Ye 2023, ICLR, Algorithm 1).

At each grid time ``t_i`` the denoiser gives ``x0_hat(x_i)``; an unconditional DDIM/ancestral step
(``eta = 1``: the paper's DDPM step, here written with alpha and sigma for every SDE) is followed
by a gradient step on the residual, taken through the denoiser:

.. math:: x'_{i+1} = \mathrm{DDIM}_\eta(x_i;\ \hat x_0, \hat\varepsilon),\qquad
          x_{i+1} = x'_{i+1} - \zeta\,\kappa_i\,\nabla_{x_i}\,\big\|y - A\hat x_0(x_i)\big\|_2 ,

which is Algorithm 1's line 7, ``x_{i+1} = x' - zeta_i grad ||y - A x0_hat||^2``, with the step
size of the paper's App. C.2, ``zeta_i = zeta / (2 ||y - A x0_hat(x_i)||)`` (the factor 2 absorbed,
as in the authors' code). The norm is taken PER SAMPLE.

``kappa_i = sqrt(alpha_i^2 + sigma_i^2) sqrt(alpha_{i+1}^2 + sigma_{i+1}^2)`` takes the step in
the variance-preserving scale ``u = x / sqrt(alpha^2 + sigma^2)`` (the gradient with respect to
``u_i``, applied to ``u_{i+1}``): it is 1 for VP, so ``zeta`` means what the paper's does there, and
the same ``zeta`` gives the same guidance under sub-VP and VE at the same log-SNR.

Pitfalls (docs/inverse.md):

- Batch dependence: the authors' code takes one norm over the whole batch,
  ``||Y - A X0_hat||`` for the stacked batch, so every sample's step size depends on the other
  samples (and a sample changes with the batch it is drawn in). Here each sample's norm is its own
  (the gradient of the sum of per-sample norms).
- Noise-level scaling: ``zeta / ||r||`` replaces the likelihood's ``1 / sigma_y^2``: the step is
  blind to the observation noise (the same guidance for ``sigma_y = 0`` and ``sigma_y = 0.5``), it
  depends on the number of steps (the paper tuned ``zeta`` for 1000 DDPM steps; fewer steps give
  fewer, equally long pushes) and, without ``kappa``, on the SDE's scale of ``x_t`` (a VE state is
  ``sigma_max = 50`` times larger than a VP one at the start, and the gradient with respect to it
  correspondingly smaller).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..._checks import require
from ..registry import MethodResult, register_method
from ._guided import check_eta, ddim_update, noise_for, schedule

__all__ = ["dps"]


@register_method("dps")
def dps(model, operator, y: torch.Tensor, *, sigma_y: float, x_T: torch.Tensor, nfe: int,
        solver: Optional[str] = None, generator=None, zeta: float = 1.0, eta: float = 1.0,
        grid: str = "uniform") -> MethodResult:
    """DPS with ``nfe`` network evaluations (one per step; the backward pass through the denoiser
    is not an evaluation). ``zeta``: step size (the paper's ``zeta'``, per-sample normalised);
    ``eta``: the DDIM noise (1: DDPM ancestral, the paper's); ``grid``: a time grid of
    :mod:`~sde_diffusion.samplers.grids`. ``sigma_y`` is not used by the update (see the
    noise-level pitfall in the module docstring)."""
    zeta = float(zeta)
    require(math.isfinite(zeta) and zeta >= 0, f"zeta must be a finite number >= 0, got {zeta!r}")
    eta = check_eta(eta)
    sched = schedule(model.sde, nfe, grid)
    noise = noise_for(generator, tuple(x_T.shape), x_T, "dps")
    start, x = model.nfe, x_T
    for i in range(sched.steps):
        a, s = sched.alphas[i], sched.sigmas[i]
        a1, s1 = sched.alphas[i + 1], sched.sigmas[i + 1]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = model.at_scales("x0", xg, sched.t(i, x), a, s)
            residual = (y - operator.A(x0)).reshape(x.shape[0], -1)
            norms = torch.linalg.vector_norm(residual, dim=1)        # one norm per sample
            (grad,) = torch.autograd.grad(norms.sum(), xg)
        x0 = x0.detach()
        eps = (x - a * x0) / s
        kappa = math.sqrt(a * a + s * s) * math.sqrt(a1 * a1 + s1 * s1)
        x = ddim_update(sched, i, x0, eps, eta, noise) - (zeta * kappa) * grad
    return MethodResult(samples=x.detach(), nfe=model.nfe - start)
