r"""Predictors: solvers of the reverse-time SDE ([SDE] = Song et al. 2021, eq. 6)

.. math:: dx = [f(t)x - g(t)^2\nabla\log p_t(x)]\,dt + g(t)\,d\bar w ,

and its discrete chains, on the actual time grid ``t_0 > t_1 > ... > t_S``. Each solver's single
step is a function ``*_step(ctx, i, x) -> x'`` (from ``t_i`` to ``t_{i+1}``); the solver loops over
it, and the predictor-corrector sampler (:mod:`.pc`) calls the same function, so the PC sampler
without a corrector is its predictor exactly.

Notation for one step from ``t = t_i`` to ``t' = t_{i+1} < t``: ``alpha, sigma`` and
``alpha', sigma'`` at the two times, ``lambda = log(alpha/sigma)``, ``s = s(x, t)`` the score, and
the *forward* transition of the SDE between the two grid times,

.. math:: x_t = r\,x_{t'} + G\,z,\qquad r = \alpha/\alpha',\qquad
          G^2 = \sigma^2 - r^2\sigma'^2 = -\sigma^2\,\mathrm{expm1}\big(2(\lambda - \lambda')\big),

exact for every affine SDE (VP: ``r = sqrt(1 - beta_i)``, ``G^2 = beta_i``, the DDPM step; VE:
``r = 1``, ``G^2 = sigma^2 - sigma'^2``, the SMLD step).

Each step draws fresh noise; every solver here targets ``p_{t_end}`` (noise is added in the last
step too). Use ``sample(..., denoise=True)`` for score_sde's final denoising.
"""
from __future__ import annotations

import math
from functools import partial

import torch

from .base import SolverContext, linear_in_view, native_view, stepping
from .registry import register

__all__ = ["euler_maruyama_step", "reverse_diffusion_step", "ancestral_step", "ancestral_steps",
           "check_ancestral"]


def _forward_transition(ctx: SolverContext, i: int):
    """``(r, G^2)`` of the forward step from ``t_{i+1}`` to ``t_i`` as Python floats."""
    (a, s, lam), (a1, _, lam1) = ctx.scales(i), ctx.scales(i + 1)
    return math.exp(math.log(a) - math.log(a1)), -s * s * math.expm1(2 * (lam - lam1))


def _affine(ctx: SolverContext, i: int, x: torch.Tensor, cx: float, cs: float, cz: float) -> torch.Tensor:
    """``cx x + cs s(x, t_i) + cz z`` in one fresh tensor: the model's own view ``m`` is asked for
    (score ``= p x + q m``, :func:`~sde_diffusion.models.wrapper.linear_in_view`), so the update
    is a multiply and one or two in-place adds; the noise is drawn after the model call."""
    view = native_view(ctx.model)
    a, s, _ = ctx.scales(i)
    p, q = linear_in_view("score", view, a, s)
    out = torch.mul(x, cx + cs * p).add_(ctx.view(view, i, x), alpha=cs * q)
    if cz != 0.0:
        out.add_(ctx.noise.randn(), alpha=cz)
    return out


# ---- Euler–Maruyama -----------------------------------------------------------------------------
def euler_maruyama_step(ctx: SolverContext, i: int, x: torch.Tensor) -> torch.Tensor:
    """``x <- x - [f x - g^2 s] h + g sqrt(h) z`` with ``h = t_i - t_{i+1} > 0``."""
    h = ctx.time_list[i] - ctx.time_list[i + 1]
    f, g2 = ctx.drift(i)
    # x - (f x - g^2 s) h + g sqrt(h) z
    return _affine(ctx, i, x, 1.0 - f * h, g2 * h, math.sqrt(g2) * math.sqrt(h))


@register("euler_maruyama", deterministic=False, order=0.5, two_way=True,
          step=lambda ctx: partial(euler_maruyama_step, ctx),
          summary="Euler–Maruyama on the reverse SDE (strong order 1/2)")
def euler_maruyama(ctx: SolverContext, x):
    """Euler–Maruyama: ``x <- x - [f x - g^2 s] h + g sqrt(h) z`` with ``h = t - t' > 0``
    ([SDE] App. F / score_sde's ``EulerMaruyamaPredictor``). Any affine SDE."""
    return stepping(ctx, x, partial(euler_maruyama_step, ctx))


# ---- reverse diffusion --------------------------------------------------------------------------
def reverse_diffusion_step(ctx: SolverContext, i: int, x: torch.Tensor) -> torch.Tensor:
    """``x' = x - f_i(x) + G^2 s + G z`` with ``f_i(x) = (r - 1) x`` ([SDE] eq. 46)."""
    r, G2 = _forward_transition(ctx, i)
    return _affine(ctx, i, x, 2.0 - r, G2, math.sqrt(G2))


@register("reverse_diffusion", deterministic=False, order=0.5, two_way=True,
          step=lambda ctx: partial(reverse_diffusion_step, ctx),
          summary="reverse-diffusion predictor ([SDE] eq. 46) on the actual grid")
def reverse_diffusion(ctx: SolverContext, x):
    r"""score_sde's ``ReverseDiffusionPredictor`` ([SDE] eq. 46, App. E): the reverse of the
    discretised forward chain ``x_{i} = x_{i+1} + f_{i+1}(x_{i+1}) + G_{i+1} z``,

    .. math:: x_{i+1} = x_i - f_i(x_i) + G_i^2\,s(x_i, t_i) + G_i z,

    with the forward chain taken between the actual grid times (see the module docstring):
    ``f_i(x) = (r - 1) x``, ``G_i^2 = sigma^2 - r^2 sigma'^2``. For VP this is score_sde's
    ``x' = (2 - sqrt(1 - beta_i)) x + beta_i s + sqrt(beta_i) z`` and for VE its
    ``x' = x + (sigma_i^2 - sigma_{i-1}^2) s + sqrt(sigma_i^2 - sigma_{i-1}^2) z``, with
    ``beta_i`` and ``sigma_i`` of the actual grid step (score_sde reads them from its fixed N-step
    chain, ``discrete_betas`` / ``discrete_sigmas``: on the uniform N-step grid the two agree to
    first order in ``1/N``); it serves sub-VP and any affine SDE alike. First order in the step
    (``2 - r`` stands for ``1/r``), like Euler–Maruyama; for the exact posterior step at large
    steps use ``ddim`` with ``eta=1``.
    """
    return stepping(ctx, x, partial(reverse_diffusion_step, ctx))


# ---- ancestral sampling -------------------------------------------------------------------------
def check_ancestral(ctx: SolverContext) -> str:
    """``"vp"`` when ``alpha^2 + sigma^2 = 1`` on the grid (DDPM), ``"ve"`` when ``alpha = 1``
    (SMLD); otherwise a ValueError: the ancestral chain is defined for those two only."""
    if bool(((ctx.alphas - 1).abs() <= 1e-12).all()):
        return "ve"
    if bool(((ctx.alphas ** 2 + ctx.sigmas ** 2 - 1).abs() <= 1e-9).all()):
        return "vp"
    raise ValueError(
        f"ancestral sampling is defined for variance-preserving (alpha^2 + sigma^2 = 1, DDPM) and "
        f"variance-exploding (alpha = 1, SMLD) SDEs, not for {ctx.sde!r}: score_sde defines no "
        f"ancestral chain for it. Use solver='ddim' with eta=1, the exact posterior step "
        f"q(x_t' | x_t, x0) for any affine SDE (equal to SMLD ancestral sampling for VE).")


def ancestral_step(ctx: SolverContext, i: int, x: torch.Tensor, kind: str) -> torch.Tensor:
    """One DDPM (``kind="vp"``) or SMLD (``kind="ve"``) ancestral step from ``t_i`` to ``t_{i+1}``."""
    r, G2 = _forward_transition(ctx, i)
    if kind == "vp":
        # beta_i = 1 - r^2 = G^2 for VP; x' = (x + beta s) / sqrt(1 - beta) + sqrt(beta) z
        return _affine(ctx, i, x, 1.0 / r, G2 / r, math.sqrt(G2))
    # VE: G^2 = sigma^2 - sigma'^2; x' = x + G^2 s + sqrt(sigma'^2 G^2 / sigma^2) z
    ratio = ctx.scales(i + 1)[1] / ctx.scales(i)[1]
    return _affine(ctx, i, x, 1.0, G2, ratio * math.sqrt(G2))


def ancestral_steps(ctx: SolverContext):
    """The ancestral step of the grid's SDE (checked once: VP or VE): ``advance(i, x)``."""
    return partial(ancestral_step, ctx, kind=check_ancestral(ctx))


@register("ancestral", deterministic=False, order=0.5, two_way=True, step=ancestral_steps,
          summary="ancestral sampling: DDPM for VP, SMLD for VE ([SDE] eq. 47)")
def ancestral(ctx: SolverContext, x):
    r"""score_sde's ``AncestralSamplingPredictor`` on the actual grid (``beta_i = 1 - r^2``,
    ``sigma, sigma'`` the noise levels of consecutive grid times, where score_sde reads them from
    its fixed N-step chain):

    - VP, DDPM (Ho et al. 2020, eq. 11 with ``sigma_t^2 = beta_t``; [SDE] eq. 47):
      ``x' = (x + beta_i s) / sqrt(1 - beta_i) + sqrt(beta_i) z``;
    - VE, SMLD ([SDE] App. F, the ancestral sampler of the SMLD chain):
      ``x' = x + (sigma^2 - sigma'^2) s + sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2) z``.

    Not defined for sub-VP (neither ``alpha = 1`` nor ``alpha^2 + sigma^2 = 1``): a ValueError
    points to ``ddim`` with ``eta=1``, the exact posterior step for any affine SDE (for VE it is
    this SMLD step; for VP it uses the posterior variance ``beta~`` instead of ``beta``).
    """
    return stepping(ctx, x, ancestral_steps(ctx))
