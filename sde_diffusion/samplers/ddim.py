r"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12), written with
alpha and sigma so it serves every affine SDE. From ``t`` to the next grid time ``t'``:

.. math:: \hat x_0 = \frac{x - \sigma\hat\varepsilon}{\alpha},\qquad
          x' = \alpha'\hat x_0 + \sqrt{\sigma'^2 - \sigma_\eta^2}\;\hat\varepsilon + \sigma_\eta z,
          \qquad \sigma_\eta^2 = \eta^2\,\sigma'^2\big(1 - e^{2(\lambda - \lambda')}\big),

where ``lambda = log(alpha/sigma)``. The last factor is DDIM's eq. 16 in log-SNR form: with
``eta = 1`` the step is the exact posterior ``q(x_t' | x_t, x0)``, i.e. ancestral (DDPM) sampling
on the grid; with ``eta = 0`` it is deterministic, non-Markovian, and equals first-order
DPM-Solver (Lu et al. 2022, eq. 3.7) exactly.

``sigma_hat=True`` is DDIM's larger-variance ancestral sampler ([DDIM] sec. 5.1, Table 1's
"sigma-hat"; Ho et al. 2020 sec. 3.2's choice ``sigma_t^2 = beta_t`` instead of the posterior
``beta-tilde``): it keeps ``eta = 1``'s mean, the posterior mean of ``q(x_t' | x_t, x0_hat)``,

.. math:: x' = \alpha'\hat x_0 + \sigma' e^{\lambda - \lambda'}\hat\varepsilon + \hat\sigma z,
          \qquad \hat\sigma = \sigma\sqrt{1 - e^{2(\lambda - \lambda')}},

and replaces the posterior std ``sigma' sqrt(1 - e^{2(lambda - lambda')})`` by ``hat sigma``, the
std of the forward transition ``q(x_t | x_t')`` (VP: ``hat sigma^2 = 1 - alpha^2/alpha'^2``, DDPM's
``beta``; VE: ``sigma^2 - sigma'^2``). As in DDPM's sampler (Ho et al. 2020, Algorithm 2: ``z = 0``
for ``t = 1``; also DDIM's reference code), the grid's last step adds no noise: its
``hat sigma`` is the noise level of the grid's *previous* time, far above the end's ``sigma'``.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Tuple

import torch

from .._checks import require
from .base import SolverContext, linear_in_view, native_view, stepping
from .registry import register

__all__ = ["ddim_step", "ddim_steps", "check_eta", "check_sigma_hat"]


def check_eta(eta) -> float:
    eta = float(eta)
    require(0.0 <= eta <= 1.0, f"eta must lie in [0, 1], got {eta!r}")
    return eta


def check_sigma_hat(sigma_hat, eta: float) -> bool:
    """``sigma_hat`` is a flag, and with it ``eta`` is left at its default 0 (sigma-hat fixes the
    noise itself: ``eta = 1``'s mean, the forward transition's variance)."""
    require(isinstance(sigma_hat, bool), f"sigma_hat must be True or False, got {sigma_hat!r}")
    require(not sigma_hat or eta == 0.0,
            f"ddim: sigma_hat=True sets the noise itself (eta=1's mean with DDPM's larger variance); "
            f"leave eta at its default 0 with it, got eta={eta!r}")
    return sigma_hat


def _coefficients(ctx: SolverContext, eta: float, view: str, steps: Iterable[int],
                  sigma_hat: bool = False) -> List[Tuple[float, float, float]]:
    """``(c_x, c_m, c_z)`` of the ``steps``, ``x' = c_x x + c_m m + c_z z`` with ``m`` the model's
    ``view`` at ``t_i``: the update of the module docstring, ``x' = (alpha'/alpha) x +
    (c - alpha' sigma/alpha) eps + sigma_eta z`` with ``c = sqrt(sigma'^2 - sigma_eta^2)``, and
    ``eps = p x + q m`` (:func:`~.base.linear_in_view`). With ``sigma_hat``, ``c`` is ``eta = 1``'s
    and the noise std is ``sigma sqrt(1 - e^{2(lambda - lambda')})`` (none on the grid's last
    step). Python floats computed in float64 once per grid."""
    out = []
    for i in steps:
        (a, s, lam), (a1, s1, lam1) = ctx.scales(i), ctx.scales(i + 1)
        frac = math.sqrt(max(0.0, -math.expm1(2 * (lam - lam1))))
        noise_std = (1.0 if sigma_hat else eta) * s1 * frac
        c_eps = math.sqrt(max(0.0, s1 * s1 - noise_std * noise_std)) - a1 * s / a
        if sigma_hat:
            noise_std = s * frac if i < ctx.steps - 1 else 0.0
        p, q = linear_in_view("eps", view, a, s)
        out.append((a1 / a + c_eps * p, c_eps * q, noise_std))
    return out


def ddim_step(ctx: SolverContext, i: int, x, eta: float, sigma_hat: bool = False):
    """One DDIM step from ``t_i`` to the next grid time ``t_{i+1}`` (one NFE). A solver running
    many steps takes them from :func:`ddim_steps`, which computes the coefficients once."""
    eta = check_eta(eta)
    sigma_hat = check_sigma_hat(sigma_hat, eta)
    view = native_view(ctx.model)
    (cx, cm, cz), = _coefficients(ctx, eta, view, [i], sigma_hat)
    return _advance(ctx, i, x, view, cx, cm, cz)


def _advance(ctx: SolverContext, i: int, x, view: str, cx: float, cm: float, cz: float):
    """``c_x x + c_m m + c_z z`` in one fresh tensor: a multiply and one or two in-place adds."""
    out = torch.mul(x, cx).add_(ctx.view(view, i, x), alpha=cm)
    if cz > 0:
        out.add_(ctx.noise.randn(), alpha=cz)
    return out


def ddim_steps(ctx: SolverContext, eta: float, sigma_hat: bool = False):
    """DDIM's step with this ``eta`` or ``sigma_hat`` (checked once; the coefficients of the whole
    grid computed before the first step): ``advance(i, x)`` from ``t_i`` to ``t_{i+1}``."""
    eta = check_eta(eta)
    sigma_hat = check_sigma_hat(sigma_hat, eta)
    view = native_view(ctx.model)
    coef = _coefficients(ctx, eta, view, range(ctx.steps), sigma_hat)
    return lambda i, x: _advance(ctx, i, x, view, *coef[i])


@register("ddim", deterministic=lambda eta, sigma_hat=False, **_: float(eta) == 0.0 and not sigma_hat,
          order=1, step=ddim_steps, two_way=True,
          summary="DDIM with eta (0: deterministic; 1: ancestral) or sigma_hat (DDPM's variance)")
def ddim(ctx: SolverContext, x, eta: float = 0.0, sigma_hat: bool = False):
    """DDIM; ``eta`` in [0, 1] scales the injected noise (``eta=0``: probability-flow-like and
    deterministic; ``eta=1``: DDPM ancestral sampling with the posterior variance);
    ``sigma_hat=True`` (with ``eta`` left at 0): ``eta=1``'s mean with the larger variance of the
    forward transition, DDPM's ``beta_t`` ([DDIM] Table 1's sigma-hat)."""
    return stepping(ctx, x, ddim_steps(ctx, eta, sigma_hat))
