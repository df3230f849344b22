r"""Stochastic DPM-Solver samplers of k-diffusion's family, for every affine SDE: DPM-Solver-2 and
DPM-Solver++(2S) with ancestral noise, SDE-DPM-Solver++ with a midpoint stage (``dpmpp_sde``) and
the third-order multistep SDE-DPM-Solver++ (``dpmpp_3m_sde``).

All are written in EDM's variables ``y = x/alpha``, ``rho = sigma/alpha = e^{-lambda}`` (Karras et
al. 2022, eq. 4), in which ``y = x0 + rho z`` for VP, sub-VP and VE alike; the state ``x = alpha y``
is returned at every grid time, and the stages' times come from ``sde.t_of_lambda`` (computed once
per run, before the first step). The denoiser is ``D = model.x0``, the noise prediction ``eps``.

*Ancestral step* (k-diffusion's ``get_ancestral_step``; the SMLD posterior in ``y``): from ``rho``
to ``rho'`` the deterministic part goes to ``rho_down`` and noise of std ``rho_up`` is added,

.. math:: \rho_{up} = \min\Big(\rho',\ \eta\sqrt{\rho'^2(\rho^2 - \rho'^2)/\rho^2}\Big),\qquad
          \rho_{down} = \sqrt{\rho'^2 - \rho_{up}^2},

so that ``y' = ODE step to rho_down + rho_up z`` has the marginal ``x0 + rho' z`` (``eta = 1``:
ancestral sampling, ``eta = 0``: the ODE step). ``eta`` lies in ``[0, 1]`` (then ``rho_down >=
rho'^2/rho > 0``, every step makes its second model call and the NFE is known in advance).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from .._checks import require
from ._exp_integrator import at_lambda, combine, phi2, phi3
from .base import SolverContext
from .registry import register

__all__ = ["ancestral_levels", "dpm_solver_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
           "dpmpp_3m_sde"]


def _check_eta(eta) -> float:
    require(isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0.0 <= eta <= 1.0,
            f"eta must be a number in [0, 1] (0: the ODE step, 1: ancestral), got {eta!r}")
    return float(eta)


def ancestral_levels(rho: float, rho_next: float, eta: float) -> Tuple[float, float]:
    """``(rho_down, rho_up)`` of an ancestral step from ``rho`` to ``rho_next`` (module docstring)."""
    if eta == 0.0:
        return rho_next, 0.0
    up = min(rho_next, eta * math.sqrt(rho_next ** 2 * (rho ** 2 - rho_next ** 2) / rho ** 2))
    return math.sqrt(rho_next ** 2 - up ** 2), up


def _stages(ctx: SolverContext, lams: List[float]):
    """``(time, alpha, rho)`` at each log-SNR of ``lams`` (clamped to the grid's time range; ``rho``
    is the clamped time's own ``sigma/alpha``), from one vectorised call before the first step; a
    stage is evaluated with ``model.at_scales`` at these numbers (no time check per call)."""
    t, log_a, log_s = at_lambda(ctx.sde, lams, float(ctx.times[-1]), float(ctx.times[0]))
    return [(ti, math.exp(la), math.exp(ls - la)) for ti, la, ls in zip(t, log_a, log_s)]


def _rho(ctx: SolverContext) -> List[float]:
    return torch.exp(-ctx.lambdas).tolist()


def _ancestral_plan(ctx: SolverContext, eta: float):
    """Shared set-up of the two-stage ancestral solvers: ``rho_i = e^{-lambda_i}``, the alphas,
    the per-step ``(rho_down, rho_up)`` of :func:`ancestral_levels` and the midpoint stage
    ``(t, alpha, rho)`` at ``rho_mid = sqrt(rho_i rho_down)`` (half way in ``lambda``)."""
    eta = _check_eta(eta)
    rho, alphas = _rho(ctx), ctx.alphas.tolist()
    levels = [ancestral_levels(rho[i], rho[i + 1], eta) for i in range(ctx.steps)]
    mids = _stages(ctx, [-0.5 * (math.log(rho[i]) + math.log(d)) for i, (d, _) in enumerate(levels)])
    return rho, alphas, levels, mids


def _add_noise(ctx: SolverContext, terms: list, rho_up: float, alpha: float) -> None:
    """Appends the ancestral noise ``alpha rho_up z`` (a fresh draw of ``ctx.noise``) to ``terms``
    when ``rho_up > 0``."""
    if rho_up > 0.0:
        terms.append((alpha * rho_up, ctx.noise.randn()))


@register("dpm_solver_2_ancestral", grid="karras", two_way=True, order=2, nfe=lambda steps: 2 * steps,
          deterministic=lambda eta, **_: float(eta) == 0.0,
          summary="DPM-Solver-2 steps with ancestral noise, eta (k-diffusion's dpm_2_ancestral; "
                  "2 NFE/step)")
def dpm_solver_2_ancestral(ctx: SolverContext, x, eta: float = 1.0):
    r"""k-diffusion's ``sample_dpm_2_ancestral``: DPM-Solver-2 (Lu et al. 2022, Alg. 1 with
    ``r1 = 1/2``, written as the midpoint rule in ``rho``) to ``rho_down``, then ancestral noise:

    .. math:: \rho_{mid} = \sqrt{\rho_i\rho_{down}},\quad
              y_{mid} = y_i + (\rho_{mid} - \rho_i)\varepsilon(y_i),\quad
              y_{i+1} = y_i + (\rho_{down} - \rho_i)\varepsilon(y_{mid}) + \rho_{up} z .

    ``eta = 0`` is ``dpm_solver_2`` (second order, deterministic); ``eta = 1`` (default) samples
    ``p_{t_end}`` with second-order drift steps. 2 NFE per step."""
    rho, alphas, levels, mids = _ancestral_plan(ctx, eta)
    model = ctx.model
    for i in range(ctx.steps):
        a, a_next = alphas[i], alphas[i + 1]
        down, up = levels[i]
        t_m, a_m, rho_m = mids[i]
        e0 = ctx.eps(i, x)
        x_mid = combine(x, a_m / a, [(a_m * (rho_m - rho[i]), e0)])
        e1 = model.at_scales("eps", x_mid, ctx.vec(t_m), a_m, a_m * rho_m)
        terms = [(a_next * (down - rho[i]), e1)]
        _add_noise(ctx, terms, up, a_next)
        x = yield combine(x, a_next / a, terms)


@register("dpmpp_2s_ancestral", grid="karras", two_way=True, order=2, nfe=lambda steps: 2 * steps,
          deterministic=lambda eta, **_: float(eta) == 0.0,
          summary="DPM-Solver++(2S) steps with ancestral noise, eta (k-diffusion's "
                  "dpmpp_2s_ancestral; 2 NFE/step)")
def dpmpp_2s_ancestral(ctx: SolverContext, x, eta: float = 1.0):
    r"""k-diffusion's ``sample_dpmpp_2s_ancestral``: a singlestep DPM-Solver++(2S) step (Lu et al.
    2022b, Alg. 1 with ``r = 1/2``) in data prediction to ``rho_down``, then ancestral noise. With
    ``h = log(rho_i / rho_down)`` and the stage at ``rho_s = rho_i e^{-h/2}``:

    .. math:: y_s = \tfrac{\rho_s}{\rho_i}y_i + (1 - e^{-h/2})D(y_i),\qquad
              y_{i+1} = \tfrac{\rho_{down}}{\rho_i}y_i + (1 - e^{-h})D(y_s) + \rho_{up} z .

    ``eta = 0``: DPM-Solver++(2S), deterministic, second order. 2 NFE per step."""
    rho, alphas, levels, mids = _ancestral_plan(ctx, eta)
    model = ctx.model
    for i in range(ctx.steps):
        a, a_next = alphas[i], alphas[i + 1]
        down, up = levels[i]
        t_s, a_s, rho_s = mids[i]
        d0 = ctx.x0(i, x)
        x_s = combine(x, a_s * rho_s / (rho[i] * a), [(a_s * (1.0 - rho_s / rho[i]), d0)])
        d1 = model.at_scales("x0", x_s, ctx.vec(t_s), a_s, a_s * rho_s)
        terms = [(a_next * (1.0 - down / rho[i]), d1)]
        _add_noise(ctx, terms, up, a_next)
        x = yield combine(x, a_next * down / (rho[i] * a), terms)


@register("dpmpp_sde", grid="karras", two_way=True, order=1, nfe=lambda steps: 2 * steps,
          deterministic=lambda eta, **_: float(eta) == 0.0,
          summary="SDE-DPM-Solver++ with a midpoint stage, eta, r (k-diffusion's dpmpp_sde; "
                  "2 NFE/step)")
def dpmpp_sde(ctx: SolverContext, x, eta: float = 1.0, r: float = 0.5, noise: str = "brownian"):
    r"""k-diffusion's ``sample_dpmpp_sde`` (a stochastic DPM-Solver++(2S), Lu et al. 2022b): with
    ``h = lambda_{i+1} - lambda_i`` and the stage at ``lambda_s = lambda_i + r h``, two ancestral
    half-steps sharing the first denoising,

    .. math:: y_s = \tfrac{\rho_{d,1}}{\rho_i}y_i + (1 - \tfrac{\rho_{d,1}}{\rho_i})D_0 + \rho_{u,1}z_1,
              \qquad
              y_{i+1} = \tfrac{\rho_{d}}{\rho_i}y_i + (1 - \tfrac{\rho_{d}}{\rho_i})
              \big[(1 - \tfrac1{2r})D_0 + \tfrac1{2r}D(y_s)\big] + \rho_u z_2,

    ``(rho_{d,1}, rho_{u,1})`` the ancestral levels from ``rho_i`` to ``rho_s`` and ``(rho_d,
    rho_u)`` those to ``rho_{i+1}``. ``noise="brownian"`` (default) draws ``z_1, z_2`` as the
    normalised increments of one Brownian motion in ``rho`` over ``[rho_s, rho_i]`` and
    ``[rho_{i+1}, rho_i]`` (correlation ``sqrt((rho_i - rho_s)/(rho_i - rho_{i+1}))``), as
    k-diffusion's default Brownian-tree noise does (in distribution; its tree's draws are not
    reproduced). ``noise="independent"`` draws them independently, as k-diffusion with a
    ``noise_sampler`` of plain normal draws (then the two agree exactly); on the test mixtures it
    has a 15-25% variance deficit at 50 steps where the Brownian draws have none.
    ``eta = 0``: deterministic DPM-Solver++(2S) with ratio ``r``, second order. 2 NFE per step."""
    eta = _check_eta(eta)
    require(isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 < r < 1.0,
            f"r must lie in (0, 1), got {r!r}")
    require(noise in ("brownian", "independent"),
            f"noise must be 'brownian' or 'independent', got {noise!r}")
    rho, alphas = _rho(ctx), ctx.alphas.tolist()
    lam = ctx.lambdas.tolist()
    stages = _stages(ctx, [lam[i] + r * (lam[i + 1] - lam[i]) for i in range(ctx.steps)])
    fac = 1.0 / (2.0 * r)
    model = ctx.model
    for i in range(ctx.steps):
        a, a_next = alphas[i], alphas[i + 1]
        t_s, a_s, rho_s = stages[i]
        d1, u1 = ancestral_levels(rho[i], rho_s, eta)
        d2, u2 = ancestral_levels(rho[i], rho[i + 1], eta)
        d0 = ctx.x0(i, x)
        terms = [(a_s * (1.0 - d1 / rho[i]), d0)]
        z1 = ctx.noise.randn() if u1 > 0.0 else None
        if z1 is not None:
            terms.append((a_s * u1, z1))
        x_s = combine(x, a_s * d1 / (rho[i] * a), terms)
        ds = model.at_scales("x0", x_s, ctx.vec(t_s), a_s, a_s * rho_s)
        w = a_next * (1.0 - d2 / rho[i])
        terms = [(w * (1.0 - fac), d0), (w * fac, ds)]
        if u2 > 0.0:
            z2 = ctx.noise.randn()
            if noise == "brownian" and z1 is not None:
                # W(rho_{i+1}) - W(rho_i) = [W(rho_s) - W(rho_i)] + an independent increment
                c = math.sqrt((rho[i] - rho_s) / (rho[i] - rho[i + 1]))
                terms += [(a_next * u2 * c, z1), (a_next * u2 * math.sqrt(1.0 - c * c), z2)]
            else:
                terms.append((a_next * u2, z2))
        x = yield combine(x, a_next * d2 / (rho[i] * a), terms)


@register("dpmpp_3m_sde", grid="logsnr", two_way=True, order=3,
          deterministic=lambda eta, **_: float(eta) == 0.0,
          summary="SDE-DPM-Solver++(3M): third-order multistep on the reverse SDE, eta "
                  "(k-diffusion's dpmpp_3m_sde; 1 NFE/step)")
def dpmpp_3m_sde(ctx: SolverContext, x, eta: float = 1.0, d2: str = "exact"):
    r"""SDE-DPM-Solver++(3M) (Lu et al. 2022b, Sec. 5; k-diffusion's ``sample_dpmpp_3m_sde``): the
    reverse SDE scaled by ``eta`` (``eta = 0``: the probability-flow ODE, ``eta = 1``: the reverse
    SDE) in data prediction, its linear part and noise integrated exactly, the data prediction
    extrapolated by the quadratic through the last three ``m_0, m_1, m_2``. With
    ``h = lambda_{i+1} - lambda_i`` and ``H = (1 + eta) h``:

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}e^{-\eta h}x_i
              + \alpha_{i+1}\big[(1 - e^{-H})m_0 + \varphi_2(H)D_1 - \kappa\,\varphi_3(H)D_2\big]
              + \sigma_{i+1}\sqrt{1 - e^{-2\eta h}}\,z,

    ``phi_2, phi_3``, ``D_1``, ``D_2 = (D_1^{(0)} - D_1^{(1)})/(r_0 + r_1)`` as in ``dpm_solver++``
    (so that ``h^2 x0'' ~ 2 D_2``). ``d2="exact"`` (default) takes ``kappa = 2``, the exact weight
    of the quadratic term: at ``eta = 0`` this is ``dpm_solver++`` with ``order=3`` and converges
    with order 3. ``d2="k-diffusion"`` takes k-diffusion's ``kappa = 1`` (reproduces its samples;
    its ODE limit converges with order 2 only). The first two steps use orders 1 and 2. Targets
    ``p_{t_end}`` (noise on the last step too). 1 NFE per step."""
    eta = _check_eta(eta)
    require(d2 in ("exact", "k-diffusion"), f"d2 must be 'exact' or 'k-diffusion', got {d2!r}")
    kappa = 2.0 if d2 == "exact" else 1.0
    alphas, sigmas, lam = ctx.alphas.tolist(), ctx.sigmas.tolist(), ctx.lambdas.tolist()
    ms: List[torch.Tensor] = []      # newest first
    hs: List[float] = []             # newest first
    for i in range(ctx.steps):
        ms.insert(0, ctx.x0(i, x))
        del ms[3:]
        h = lam[i + 1] - lam[i]
        H = (1.0 + eta) * h
        a_next = alphas[i + 1]
        c = [-math.expm1(-H), 0.0, 0.0]
        if len(ms) == 2:
            w = phi2(H) / (hs[0] / h)
            c = [c[0] + w, -w, 0.0]
        elif len(ms) == 3:
            r0, r1 = hs[0] / h, hs[1] / h
            p, q = phi2(H), -kappa * phi3(H)
            P = p * (1 + r0 / (r0 + r1)) + q / (r0 + r1)     # weight of D_1^(0) = (m0 - m1)/r0
            Q = -(p * r0 / (r0 + r1) + q / (r0 + r1))        # weight of D_1^(1) = (m1 - m2)/r1
            c = [c[0] + P / r0, -P / r0 + Q / r1, -Q / r1]
        terms = [(a_next * ck, m) for ck, m in zip(c, ms)]
        if eta > 0.0:
            terms.append((sigmas[i + 1] * math.sqrt(-math.expm1(-2.0 * eta * h)), ctx.noise.randn()))
        x = combine(x, sigmas[i + 1] / sigmas[i] * math.exp(-eta * h), terms)
        hs.insert(0, h)
        del hs[2:]
        x = yield x
