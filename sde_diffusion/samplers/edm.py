r"""EDM's samplers (Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", NeurIPS; cited as [EDM]) for any affine SDE.

[EDM] writes every diffusion as ``x_e = x0 + sigma_e z`` (eq. 1-4 with ``s(t) = 1``): with our
``x = alpha x0 + sigma z`` that is the change of variables

.. math:: x_e = x/\alpha,\qquad \sigma_e = \sigma/\alpha = e^{-\lambda},

under which the probability-flow ODE becomes ``dx_e/d sigma_e = (x_e - D(x_e; sigma_e)) / sigma_e``
([EDM] eq. 3) with the denoiser ``D(x_e; sigma_e) = E[x0 | x_t] = model.x0(alpha x_e, t)`` at the
time ``t`` of that noise level. The solvers step in ``(x_e, sigma_e)`` over the grid's noise
levels and return ``alpha x_e`` at each grid time, so they serve VP, sub-VP and VE alike (for VE,
``alpha = 1`` and nothing changes).
"""
from __future__ import annotations

import math
from functools import partial

import torch

from .._checks import require
from ._exp_integrator import at_lambda, combine
from .base import SolverContext, stepping
from .registry import register

__all__ = ["edm_heun", "edm_euler", "edm_steps"]


def edm_steps(ctx: SolverContext, heun: bool, S_churn, S_tmin, S_tmax, S_noise):
    """One step of [EDM] Alg. 2 (Euler, or Heun with ``heun``) with churn: ``advance(i, x)`` from
    ``t_i`` to ``t_{i+1}``. The options are checked and the churned noise levels of the whole
    grid computed once, before the first step."""
    S_churn, S_tmin, S_tmax, S_noise = float(S_churn), float(S_tmin), float(S_tmax), float(S_noise)
    require(S_churn >= 0, f"S_churn must be >= 0, got {S_churn!r}")
    require(S_noise >= 0, f"S_noise must be >= 0, got {S_noise!r}")
    require(S_tmin <= S_tmax, f"S_tmin must be <= S_tmax, got {S_tmin!r} > {S_tmax!r}")
    model = ctx.model
    alphas = ctx.alphas.tolist()
    sig_e = torch.exp(-ctx.lambdas).tolist()          # sigma_e = sigma / alpha on the grid
    gamma_max = min(S_churn / ctx.steps, math.sqrt(2.0) - 1.0)
    # [EDM] Alg. 2 lines 4-6 raise the noise level to sigma_hat = (1 + gamma) sigma_e, capped at
    # the largest level the SDE reaches (so that t_hat <= T), on the steps inside [S_tmin, S_tmax]
    churned = [i for i in range(ctx.steps) if gamma_max > 0 and S_tmin <= sig_e[i] <= S_tmax]
    log_smax = -float(ctx.sde.lambda_(torch.tensor(ctx.sde.T, dtype=torch.float64)))
    t_hat, log_a, log_s = at_lambda(
        ctx.sde, [-min(math.log(sig_e[i]) + math.log1p(gamma_max), log_smax) for i in churned],
        0.0, ctx.sde.T)
    # per churned step: (t_hat, alpha, sigma_e, sigma) at the raised level
    hat = {i: (t_hat[j], math.exp(log_a[j]), math.exp(log_s[j] - log_a[j]), math.exp(log_s[j]))
           for j, i in enumerate(churned)}

    # The state is kept in our variable x = alpha x_e (the model's input, no rescaling pass);
    # each update below is [EDM]'s, written for x.
    def advance(i: int, x):
        s_cur, s_next = sig_e[i], sig_e[i + 1]
        t_cur, a_cur, a_next = None, alphas[i], alphas[i + 1]     # t_cur: a churned time only
        sig_cur = None
        if i in hat:
            # Alg. 2 lines 4-6: x_e <- x_e + S_noise sqrt(sigma_hat^2 - sigma^2) z at the time
            # t_hat of sigma_hat
            t_h, a_hat, s_hat, sig_hat = hat[i]
            if s_hat > s_cur:
                std = S_noise * math.sqrt(s_hat * s_hat - s_cur * s_cur)
                x = combine(x, a_hat / a_cur, [(a_hat * std, ctx.noise.randn())])
                s_cur, t_cur, a_cur, sig_cur = s_hat, ctx.vec(t_h), a_hat, sig_hat
        # Euler step (Alg. 2 lines 7-8): x_e' = x_e + (sigma' - sigma) (x_e - D) / sigma
        den = ctx.x0(i, x) if t_cur is None else model.at_scales("x0", x, t_cur, a_cur, sig_cur)
        r = (s_next - s_cur) / s_cur
        x_next = combine(x, a_next / a_cur * (1 + r), [(-a_next * r, den)])
        if heun:
            # trapezoidal correction (Alg. 2 lines 9-11); our grid never reaches sigma_e = 0:
            # x_e'' = x_e + (sigma' - sigma)/2 [(x_e - D)/sigma + (x_e' - D')/sigma']
            den2 = ctx.x0(i + 1, x_next)
            r2 = (s_next - s_cur) / s_next
            x_next = combine(x, a_next / a_cur * (1 + 0.5 * r),
                             [(-0.5 * a_next * r, den), (0.5 * r2, x_next), (-0.5 * a_next * r2, den2)])
        return x_next

    return advance


def _no_churn(S_churn, S_noise, **_) -> bool:
    """Deterministic without churn (``S_churn = 0``) or without its noise (``S_noise = 0``). A
    churn window ``[S_tmin, S_tmax]`` that misses every level of the grid is not seen here: such
    a run is declared stochastic although it draws no noise."""
    return float(S_churn) == 0.0 or float(S_noise) == 0.0


@register("edm_heun", grid="karras", deterministic=_no_churn, two_way=True, order=2,
          nfe=lambda steps: 2 * steps, step=partial(edm_steps, heun=True), summary="EDM Heun sampler (Karras et al. 2022, Alg. 2) with optional churn; 2 NFE/step")
def edm_heun(ctx: SolverContext, x, S_churn: float = 0.0, S_tmin: float = 0.0,
             S_tmax: float = float("inf"), S_noise: float = 1.0):
    r"""[EDM] Algorithm 2: Heun's method (trapezoidal correction) on ``dx_e/d sigma_e =
    (x_e - D(x_e; sigma_e))/sigma_e`` over the grid's noise levels ``sigma_e = sigma/alpha``:

    .. math:: d_i = \frac{x_i - D(x_i;\hat\sigma_i)}{\hat\sigma_i},\quad
              \tilde x_{i+1} = x_i + (\sigma_{i+1} - \hat\sigma_i) d_i,\quad
              x_{i+1} = x_i + (\sigma_{i+1} - \hat\sigma_i)\tfrac12\big(d_i + d'_{i+1}\big).

    Churn ([EDM] Alg. 2 lines 4-6): with ``S_churn > 0``, for noise levels in ``[S_tmin, S_tmax]``
    (in ``sigma_e`` units) the level is first raised to ``sigma_hat = (1 + gamma) sigma_i``,
    ``gamma = min(S_churn / steps, sqrt(2) - 1)``, by adding noise of std
    ``S_noise sqrt(sigma_hat^2 - sigma_i^2)``; ``sigma_hat`` is capped at the SDE's largest noise
    level ``sigma_e(T)`` (the time must stay in ``[0, T]``). With ``S_churn = 0`` (default) the
    sampler is deterministic and second order; with churn it is a stochastic sampler (registered
    deterministic only without churn). The grid ends at ``t_end > 0``, so every step, the last
    included, uses the Heun correction: 2 NFE per step."""
    return stepping(ctx, x, edm_steps(ctx, True, S_churn, S_tmin, S_tmax, S_noise))


@register("edm_euler", grid="karras", deterministic=_no_churn, two_way=True, order=1,
          step=partial(edm_steps, heun=False), summary="Euler in EDM's (x/alpha, sigma/alpha) variables with optional churn; 1 NFE/step")
def edm_euler(ctx: SolverContext, x, S_churn: float = 0.0, S_tmin: float = 0.0,
              S_tmax: float = float("inf"), S_noise: float = 1.0):
    """[EDM] Algorithm 2 without the second-order correction (k-diffusion's ``sample_euler``):
    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_hat_i) d_i``. Deterministic for ``S_churn = 0``, where it
    equals DDIM with ``eta = 0`` (the Euler step in ``(x/alpha, sigma/alpha)`` is exactly DDIM's
    update, Song et al. 2021 eq. 14 / [EDM] App. B.2); churn as for ``edm_heun``. 1 NFE per step."""
    return stepping(ctx, x, edm_steps(ctx, False, S_churn, S_tmin, S_tmax, S_noise))
