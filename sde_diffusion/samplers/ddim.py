r"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12), written with
alpha and sigma so it serves every affine SDE. From ``t`` to the next grid time ``t'``:

.. math:: \hat x_0 = \frac{x - \sigma\hat\varepsilon}{\alpha},\qquad
          x' = \alpha'\hat x_0 + \sqrt{\sigma'^2 - \sigma_\eta^2}\;\hat\varepsilon + \sigma_\eta z,
          \qquad \sigma_\eta^2 = \eta^2\,\sigma'^2\big(1 - e^{2(\lambda - \lambda')}\big),

where ``lambda = log(alpha/sigma)``. The last factor is DDIM's eq. 16 in log-SNR form: with
``eta = 1`` the step is the exact posterior ``q(x_t' | x_t, x0)``, i.e. ancestral (DDPM) sampling
on the grid; with ``eta = 0`` it is deterministic, non-Markovian, and equals first-order
DPM-Solver (Lu et al. 2022, eq. 3.7) exactly.
"""
from __future__ import annotations

import math

from .._checks import require
from .base import SolverContext, stepping
from .registry import register

__all__ = ["ddim_step", "ddim_steps", "check_eta"]


def check_eta(eta) -> float:
    eta = float(eta)
    require(0.0 <= eta <= 1.0, f"eta must lie in [0, 1], got {eta!r}")
    return eta


def ddim_step(ctx: SolverContext, i: int, x, eta: float):
    """One DDIM step from ``t_i`` to the next grid time ``t_{i+1}`` (one NFE)."""
    (a, s, lam), (a1, s1, lam1) = ctx.scales(i), ctx.scales(i + 1)
    eps = ctx.eps(i, x)
    x0 = (x - s * eps) / a
    noise_std = eta * s1 * math.sqrt(max(0.0, -math.expm1(2 * (lam - lam1))))
    x = a1 * x0 + math.sqrt(max(0.0, s1 * s1 - noise_std * noise_std)) * eps
    if noise_std > 0:
        x = x + noise_std * ctx.noise.randn()
    return x


def ddim_steps(ctx: SolverContext, eta: float):
    """DDIM's step with this ``eta`` (checked once): ``advance(i, x)`` from ``t_i`` to ``t_{i+1}``."""
    eta = check_eta(eta)
    return lambda i, x: ddim_step(ctx, i, x, eta)


@register("ddim", deterministic=lambda eta, **_: float(eta) == 0.0, order=1, step=ddim_steps,
          two_way=True, summary="DDIM with eta (0: deterministic; 1: ancestral)")
def ddim(ctx: SolverContext, x, eta: float = 0.0):
    """DDIM; ``eta`` in [0, 1] scales the injected noise (``eta=0``: probability-flow-like and
    deterministic; ``eta=1``: DDPM ancestral sampling with the posterior variance)."""
    return stepping(ctx, x, ddim_steps(ctx, eta))
