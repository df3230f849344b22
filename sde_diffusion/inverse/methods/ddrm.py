r"""DDRM, denoising diffusion restoration models (Kawar, Elad, Ermon & Song 2022, NeurIPS).

Everything happens in the operator's SVD space, ``A = U diag(s) V^T``: the spectral coordinates
``x_bar = V^T x`` and ``y_bar_i = (U^T y)_i / s_i`` (observed where ``s_i > 0``, with noise level
``sigma_y / s_i``), and in variance-exploding units ``u = x / alpha`` with noise level
``sigma_t / alpha_t`` (so it serves every SDE: the network sees ``x = alpha u``). With
``x0_bar = V^T x0_hat(x_t)`` and ``sigma = sigma_t / alpha_t`` falling to ``sigma'`` the update is
eq. 8, per coordinate ``i``:

.. math::
   \bar u'_i = \begin{cases}
     \bar x_{0,i} + \sqrt{1-\eta^2}\,\sigma'\,\frac{\bar u_i - \bar x_{0,i}}{\sigma}
        + \eta\sigma'\varepsilon_i & s_i = 0 \\
     \bar x_{0,i} + \sqrt{1-\eta^2}\,\sigma'\,\frac{\bar y_i - \bar x_{0,i}}{\sigma_y/s_i}
        + \eta\sigma'\varepsilon_i & \sigma' < \sigma_y / s_i \\
     (1-\eta_b)\,\bar x_{0,i} + \eta_b\,\bar y_i
        + \sqrt{\sigma'^2 - \eta_b^2\sigma_y^2/s_i^2}\,\varepsilon_i & \sigma' \ge \sigma_y / s_i
   \end{cases}

and the start is eq. 7: ``u_bar_T,i = y_bar_i + sqrt(sigma_T^2 - sigma_y^2/s_i^2) eps_i`` where
observed (else the prior's ``x_T``). The last step goes to ``sigma' = 0``: it returns the
restoration. Noiseless observations (``sigma_y = 0``) always take the third case: with
``eta_b = 1`` the observed coordinates equal ``y_bar`` exactly at the end. The paper's defaults
``eta = 0.85``, ``eta_b = 1``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..registry import MethodResult, register_method
from ._guided import check_eta, noise_for, schedule, spectral

__all__ = ["ddrm"]


@register_method("ddrm", needs=("svd",))
def ddrm(model, operator, y: torch.Tensor, *, sigma_y: float, x_T: torch.Tensor, nfe: int,
         solver: Optional[str] = None, generator=None, eta: float = 0.85, eta_b: float = 1.0,
         grid: str = "uniform") -> MethodResult:
    """DDRM with ``nfe`` network evaluations (one per step). ``eta``, ``eta_b``: eq. 8's noise
    parameters (the paper's 0.85 and 1); ``grid``: a time grid of
    :mod:`~sde_diffusion.samplers.grids`."""
    eta, eta_b = check_eta(eta), check_eta(eta_b, "eta_b")
    sigma_y = float(sigma_y)
    sde = model.sde
    sched = schedule(sde, nfe, grid)
    noise = noise_for(generator, tuple(x_T.shape), x_T, "ddrm")
    spec = spectral(operator, x_T)
    obs = spec.observed
    y_bar = spec.y_bar(y)
    s_obs = torch.where(obs, sigma_y / torch.where(obs, spec.s, 1.0), math.inf)   # sigma_y / s_i
    start = model.nfe

    # eq. 7: the start, in VE units u = x / alpha
    a, s = sched.alphas[0], sched.sigmas[0]
    sig = s / a
    z = spec.Vt(x_T) / sde.prior_std
    take_y = obs & (s_obs <= sig)
    u = torch.where(take_y, y_bar + torch.sqrt((sig * sig - s_obs * s_obs).clamp(min=0)) * z,
                    spec.Vt(x_T) / a)
    for i in range(sched.steps):
        a, s = sched.alphas[i], sched.sigmas[i]
        a1, s1 = sched.alphas[i + 1], sched.sigmas[i + 1]
        sig, sig1 = s / a, s1 / a1
        x0 = spec.Vt(model.at_scales("x0", a * spec.V(u), sched.t(i, x_T), a, s))
        e = spec.Vt(noise.randn()) if sig1 > 0 else torch.zeros_like(u)
        keep = math.sqrt(1 - eta * eta) * sig1
        free = x0 + keep * (u - x0) / sig + eta * sig1 * e
        noisy = x0 + keep * (y_bar - x0) / torch.where(obs, s_obs, 1.0) + eta * sig1 * e
        dirty = ((1 - eta_b) * x0 + eta_b * y_bar
                 + torch.sqrt((sig1 * sig1 - eta_b * eta_b * s_obs * s_obs).clamp(min=0)) * e)
        u = torch.where(~obs, free, torch.where(sig1 < s_obs, noisy, dirty))
    return MethodResult(samples=spec.V(u), nfe=model.nfe - start)
