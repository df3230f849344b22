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
from typing import Iterable, List, Tuple

import torch

from .._checks import require
from .base import SolverContext, linear_in_view, native_view, stepping
from .registry import register

__all__ = ["ddim_step", "ddim_steps", "check_eta"]


def check_eta(eta) -> float:
    eta = float(eta)
    require(0.0 <= eta <= 1.0, f"eta must lie in [0, 1], got {eta!r}")
    return eta


def _coefficients(ctx: SolverContext, eta: float, view: str,
                  steps: Iterable[int]) -> List[Tuple[float, float, float]]:
    """``(c_x, c_m, c_z)`` of the ``steps``, ``x' = c_x x + c_m m + c_z z`` with ``m`` the model's
    ``view`` at ``t_i``: the update of the module docstring, ``x' = (alpha'/alpha) x +
    (c - alpha' sigma/alpha) eps + sigma_eta z`` with ``c = sqrt(sigma'^2 - sigma_eta^2)``, and
    ``eps = p x + q m`` (:func:`~.base.linear_in_view`). Python floats computed in float64 once
    per grid."""
    out = []
    for i in steps:
        (a, s, lam), (a1, s1, lam1) = ctx.scales(i), ctx.scales(i + 1)
        noise_std = eta * s1 * math.sqrt(max(0.0, -math.expm1(2 * (lam - lam1))))
        c_eps = math.sqrt(max(0.0, s1 * s1 - noise_std * noise_std)) - a1 * s / a
        p, q = linear_in_view("eps", view, a, s)
        out.append((a1 / a + c_eps * p, c_eps * q, noise_std))
    return out


def ddim_step(ctx: SolverContext, i: int, x, eta: float):
    """One DDIM step from ``t_i`` to the next grid time ``t_{i+1}`` (one NFE). A solver running
    many steps takes them from :func:`ddim_steps`, which computes the coefficients once."""
    view = native_view(ctx.model)
    (cx, cm, cz), = _coefficients(ctx, eta, view, [i])
    return _advance(ctx, i, x, view, cx, cm, cz)


def _advance(ctx: SolverContext, i: int, x, view: str, cx: float, cm: float, cz: float):
    """``c_x x + c_m m + c_z z`` in one fresh tensor: a multiply and one or two in-place adds."""
    out = torch.mul(x, cx).add_(ctx.view(view, i, x), alpha=cm)
    if cz > 0:
        out.add_(ctx.noise.randn(), alpha=cz)
    return out


def ddim_steps(ctx: SolverContext, eta: float):
    """DDIM's step with this ``eta`` (checked once; the coefficients of the whole grid computed
    before the first step): ``advance(i, x)`` from ``t_i`` to ``t_{i+1}``."""
    eta = check_eta(eta)
    view = native_view(ctx.model)
    coef = _coefficients(ctx, eta, view, range(ctx.steps))
    return lambda i, x: _advance(ctx, i, x, view, *coef[i])


@register("ddim", deterministic=lambda eta, **_: float(eta) == 0.0, order=1, step=ddim_steps,
          two_way=True, summary="DDIM with eta (0: deterministic; 1: ancestral)")
def ddim(ctx: SolverContext, x, eta: float = 0.0):
    """DDIM; ``eta`` in [0, 1] scales the injected noise (``eta=0``: probability-flow-like and
    deterministic; ``eta=1``: DDPM ancestral sampling with the posterior variance)."""
    return stepping(ctx, x, ddim_steps(ctx, eta))
