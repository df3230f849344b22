r"""Exponential integrators of the probability-flow ODE in the half log-SNR
``lambda = log(alpha/sigma)``: DPM-Solver (Lu et al. 2022, NeurIPS, "DPM-Solver: A Fast ODE Solver
for Diffusion Probabilistic Model Sampling in Around 10 Steps"), DPM-Solver++ multistep and its
stochastic variant SDE-DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095, "DPM-Solver++: Fast Solver
for Guided Sampling of Diffusion Probabilistic Models").

With ``x_t = alpha_t x0 + sigma_t z`` the probability-flow ODE has the exact solution (variation of
constants) from ``s`` to ``t`` (``lambda_t > lambda_s``, ``h = lambda_t - lambda_s``):

.. math::
    x_t = \frac{\alpha_t}{\alpha_s} x_s - \alpha_t\int_{\lambda_s}^{\lambda_t} e^{-\lambda}
          \hat\varepsilon(x_\lambda, \lambda)\,d\lambda
        = \frac{\sigma_t}{\sigma_s} x_s + \sigma_t\int_{\lambda_s}^{\lambda_t} e^{\lambda}
          \hat x_0(x_\lambda, \lambda)\,d\lambda

(DPM-Solver eq. 3.4, DPM-Solver++ eq. 8). Taylor-expanding ``eps`` (DPM-Solver) or ``x0``
(DPM-Solver++) in ``lambda`` and integrating the exponential weights exactly gives the solvers
below. Everything is written with the SDE's ``alpha``, ``sigma`` and ``lambda``, so each solver
serves VP, sub-VP and VE alike; intermediate stages find their time with ``sde.t_of_lambda``.

Coefficients are computed in float64 on the CPU (Python floats); ``phi``-functions use ``expm1``
so that small steps keep their accuracy.
"""
from __future__ import annotations

import math
from typing import List

import torch

from .._checks import require
from ._exp_integrator import at_lambda, combine, phi2, phi3
from .base import SolverContext, stepping
from .registry import register

__all__ = ["dpm_solver", "dpm_solver_pp", "sde_dpm_solver_pp", "dpm_steps", "fast_orders"]

# Stochastic high-order solver: sde_dpm_solver++ below. Singlestep DPM-Solver in data prediction
# (DPM-Solver++(2S)) is `dpmpp_2s_ancestral` at eta=0 (samplers/dpm_stochastic.py).


def _grid(ctx: SolverContext):
    return ctx.alphas.tolist(), ctx.sigmas.tolist(), ctx.lambdas.tolist()


# ---- DPM-Solver (noise prediction, singlestep) --------------------------------------------------
_DPM_R = {2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


def fast_orders(nfe: int, order: int = 3) -> List[int]:
    """DPM-Solver-fast's order of every step for a budget of exactly ``nfe`` evaluations (Lu et
    al. 2022, Sec. 3.4 and App. D.1), for singlestep solvers of order at most ``order``:

    - order 3: ``M = nfe // 3 + 1`` steps; third-order steps and, at the end, ``(2, 1)`` when
      ``nfe % 3 == 0``, ``(1,)`` when ``nfe % 3 == 1``, ``(2,)`` when ``nfe % 3 == 2``
      (``nfe = 3``: ``[2, 1]``, 4: ``[3, 1]``, 5: ``[3, 2]``, 10: ``[3, 3, 3, 1]``);
    - order 2: ``nfe // 2`` second-order steps, plus one first-order step when ``nfe`` is odd
      (``nfe = 5``: ``[2, 2, 1]``);
    - order 1: ``nfe`` first-order steps.

    The orders sum to ``nfe``. Compared with ``nfe // order`` steps of the full order, every
    evaluation is spent and a small budget is split into more, lower-order steps, which is what
    keeps it stable: one third-order step over the whole log-SNR range (3 NFE) is wildly wrong.

    One departure from the paper: ``nfe = 2`` gives two first-order steps ``[1, 1]``, not the
    paper's single second-order step ``[2]`` over the whole range. On the test mixtures that one
    step from ``T`` to ``eps`` is off by an RMS of 15-160 (the eps-prediction correction is
    multiplied by ``sigma/alpha ~ 150`` at ``T``), two DDIM steps by 0.2-0.3. The paper's
    schedules are meant for ``nfe >= 10``; from ``nfe = 3`` on every schedule has two steps or more.
    """
    require(isinstance(nfe, int) and not isinstance(nfe, bool) and nfe >= 1,
            f"nfe must be an integer >= 1, got {nfe!r}")
    order = int(order)
    require(order in (1, 2, 3), f"order must be 1, 2 or 3, got {order!r}")
    if order == 1 or nfe <= 2:
        return [1] * nfe
    if order == 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    tail = {0: [2, 1], 1: [1], 2: [2]}[nfe % 3]
    return [3] * ((nfe - sum(tail)) // 3) + tail


def _check_orders(orders, steps: int) -> List[int]:
    require(isinstance(orders, (list, tuple)) and all(
        isinstance(k, int) and not isinstance(k, bool) and k in (1, 2, 3) for k in orders),
        f"orders must be a list of step orders, each 1, 2 or 3, got {orders!r}")
    require(len(orders) == steps, f"orders has {len(orders)} entries for a grid of {steps} steps")
    return list(orders)


def _dpm_cost(steps: int, order: int = 3, orders=None) -> int:
    if orders is not None:
        return sum(_check_orders(orders, steps))
    return int(order) * steps


def _dpm_plan(nfe: int, order: int = 3, orders=None):
    require(orders is None, "dpm_solver: give nfe or orders, not both (nfe chooses the orders: "
                            "DPM-Solver-fast's schedule)")
    orders = fast_orders(nfe, order)
    return len(orders), {"orders": orders}


def dpm_steps(ctx: SolverContext, order, r1, r2, orders):
    """DPM-Solver's single step with these options (checked once; the times, ``alpha`` and
    ``sigma`` of every intermediate stage of the run computed up front, and handed to the model
    with each stage's call, :meth:`~sde_diffusion.models.ScoreModel.at_scales`): ``advance(i, x)``
    from ``t_i`` to ``t_{i+1}`` with the order of step ``i``."""
    order = int(order)
    require(order in (1, 2, 3), f"order must be 1, 2 or 3, got {order!r}")
    orders = [order] * ctx.steps if orders is None else _check_orders(orders, ctx.steps)
    if r1 is not None:
        r1 = float(r1)
        require(max(orders) >= 2, f"r1 needs a step of order 2 or 3, got order {order}")
        require(0 < r1 < 1, f"r1 must lie in (0, 1), got {r1!r}")
    if r2 is not None:
        r2 = float(r2)
        require(max(orders) == 3, f"r2 needs a step of order 3, got order {order}")
        require((r1 if r1 is not None else _DPM_R[3][0]) < r2 < 1,
                f"r2 must lie in (r1={r1 if r1 is not None else _DPM_R[3][0]}, 1), got {r2!r}")
    model = ctx.model
    alphas, sigmas, lambdas = _grid(ctx)
    # the stages' log-SNRs lambda_i + r h: Alg. 1 (order 2, r1 = 1/2; the given r1 on steps of the
    # top order) and Alg. 2 (order 3, r1 = 1/3, r2 = 2/3)
    ratios = []
    for k in orders:
        if k == 2:
            ratios.append((r1 if r1 is not None and k == max(orders) else _DPM_R[2][0],))
        elif k == 3:
            ratios.append((r1 if r1 is not None else _DPM_R[3][0],
                           r2 if r2 is not None else _DPM_R[3][1]))
        else:
            ratios.append(())
    t, log_a, log_s = at_lambda(ctx.sde, [lambdas[i] + r * (lambdas[i + 1] - lambdas[i])
                                          for i, rs in enumerate(ratios) for r in rs],
                                float(ctx.times[-1]), float(ctx.times[0]))
    # per step: (time, alpha, sigma, actual lambda) of each stage
    stages, n = [], 0
    for rs in ratios:
        stages.append([(t[j], math.exp(log_a[j]), math.exp(log_s[j]), log_a[j] - log_s[j])
                       for j in range(n, n + len(rs))])
        n += len(rs)

    def advance(i: int, x):
        k = orders[i]
        a, lam = alphas[i], lambdas[i]
        a_t, s_t, lam_t = alphas[i + 1], sigmas[i + 1], lambdas[i + 1]
        h = lam_t - lam
        eps0 = ctx.eps(i, x)
        if k == 1:
            # eq. 3.7: x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) eps
            return (a_t / a) * x - (s_t * math.expm1(h)) * eps0
        if k == 2:
            # Alg. 1 (DPM-Solver-2), with r1 in (0, 1)
            (t1, a1, s1, lam1), = stages[i]
            rr = (lam1 - lam) / h
            u = (a1 / a) * x - (s1 * math.expm1(lam1 - lam)) * eps0
            eps1 = model.at_scales("eps", u, ctx.vec(t1), a1, s1)
            phi = s_t * math.expm1(h)
            return (a_t / a) * x - phi * eps0 - (phi / (2 * rr)) * (eps1 - eps0)
        # Alg. 2 (DPM-Solver-3), r1 = 1/3, r2 = 2/3 by default
        (t1, a1, s1, lam1), (t2, a2, s2, lam2) = stages[i]
        q1, q2 = (lam1 - lam) / h, (lam2 - lam) / h
        h2 = lam2 - lam
        u1 = (a1 / a) * x - (s1 * math.expm1(lam1 - lam)) * eps0
        d1 = model.at_scales("eps", u1, ctx.vec(t1), a1, s1) - eps0
        u2 = ((a2 / a) * x - (s2 * math.expm1(h2)) * eps0
              - (s2 * q2 / q1 * (math.expm1(h2) / h2 - 1)) * d1)
        d2 = model.at_scales("eps", u2, ctx.vec(t2), a2, s2) - eps0
        return ((a_t / a) * x - (s_t * math.expm1(h)) * eps0
                - (s_t / q2 * (math.expm1(h) / h - 1)) * d2)

    return advance


_dpm_solver_doc = r"""DPM-Solver (Lu et al. 2022, Alg. 1 and 2, eqs. 3.7-3.9), singlestep in log-SNR with
noise prediction ``eps``; ``order`` 1 (= DDIM with eta=0), 2 (Alg. 1, ``r1 = 1/2``) or 3
(Alg. 2, ``r1 = 1/3``, ``r2 = 2/3``). Intermediate stages are evaluated at
``t_of_lambda(lambda_i + r h)``. Deterministic; global order = ``order``.

With ``steps`` every step has order ``order`` (``order`` NFE per step). With a budget
``sample(..., nfe=K)`` it uses DPM-Solver-fast's schedule (Lu et al. 2022, Sec. 3.4, see
:func:`fast_orders`): ``K // 3 + 1`` steps for order 3, the last ones of order 1-2, so that
exactly ``K`` evaluations are spent (``nfe=10``: orders ``[3, 3, 3, 1]``). ``orders`` gives the
order of every step explicitly (a list as long as the grid; the cost is its sum); a given ``r1``
/ ``r2`` applies to the steps of the highest order, the others use the default ratios."""


@register("dpm_solver", grid="logsnr", deterministic=True, two_way=True, order=3, nfe=_dpm_cost,
          plan=_dpm_plan, step=dpm_steps, summary="DPM-Solver singlestep orders 1-3 (noise prediction; NFE/step = order; an NFE "
                  "budget uses DPM-Solver-fast's orders)")
def dpm_solver(ctx: SolverContext, x, order: int = 3, r1=None, r2=None, orders=None):
    return stepping(ctx, x, dpm_steps(ctx, order, r1, r2, orders))


dpm_solver.__doc__ = _dpm_solver_doc


def _register_fixed(k: int):
    def steps(ctx: SolverContext, r1, r2):
        return dpm_steps(ctx, k, r1, r2, None)

    @register(f"dpm_solver_{k}", grid="logsnr", deterministic=True, two_way=True, order=k,
              nfe=lambda steps: k * steps, step=steps,
              summary=f"DPM-Solver-{k}: ``dpm_solver`` with ``order={k}`` ({k} NFE/step)")
    def solver(ctx: SolverContext, x, r1=None, r2=None):
        return stepping(ctx, x, steps(ctx, r1, r2))
    solver.__doc__ = (f"DPM-Solver-{k}: ``dpm_solver`` with ``order={k}`` on every step, also under an "
                      f"NFE budget (the largest grid within it; ``dpm_solver`` spends a budget "
                      f"exactly with DPM-Solver-fast's orders).")
    return solver


for _k in (1, 2, 3):
    _register_fixed(_k)


# ---- DPM-Solver++ (data prediction, multistep) ---------------------------------------------------
def _pp_coefficients(order: int, s_prev: float, a_t: float, s_t: float, h: float, hs: List[float],
                     solver_type: str):
    """Coefficients ``(c_x, [c_0, c_1, c_2])`` of ``x_{i+1} = c_x x_i + sum_k c_k m_k`` for one
    DPM-Solver++ step of ``order`` (``m_0`` the newest data prediction), equivalent to the
    divided-difference form in :func:`dpm_solver_pp`'s docstring."""
    cx = s_t / s_prev
    c = [a_t * -math.expm1(-h), 0.0, 0.0]          # alpha_t (1 - e^{-h}) m_0
    if order == 1:
        return cx, c
    r0 = hs[-1] / h
    if order == 2:
        # D_1 = (m_0 - m_1)/r_0 with weight alpha_t phi_2 (taylor) or alpha_t (1 - e^{-h})/2
        w = a_t * (phi2(h) if solver_type == "taylor" else -0.5 * math.expm1(-h))
        return cx, [c[0] + w / r0, -w / r0, 0.0]
    r1 = hs[-2] / h
    q = r0 / (r0 + r1)
    p2, p3 = a_t * phi2(h), a_t * phi3(h) * 2.0 / (r0 + r1)
    A = p2 * (1 + q) - p3            # weight of D_1^(0) = (m_0 - m_1)/r_0
    B = -p2 * q + p3                 # weight of D_1^(1) = (m_1 - m_2)/r_1
    return cx, [c[0] + A / r0, -A / r0 + B / r1, -B / r1]


@register("dpm_solver++", grid="logsnr", deterministic=True, two_way=True, order=3, summary=(
    "DPM-Solver++ multistep (2M/3M; data prediction; 1 NFE/step)"))
def dpm_solver_pp(ctx: SolverContext, x, order: int = 3, lower_order_final: bool = False,
                  solver_type: str = "taylor"):
    r"""DPM-Solver++ multistep in data prediction (Lu et al. 2022b, Alg. 2 for 2M; third order
    for 3M). With ``r_0 = h_{i-1}/h``, ``r_1 = h_{i-2}/h`` and the data predictions ``m_0, m_1, m_2``
    at the last three grid points,

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i} x_i + \alpha_{i+1}(1 - e^{-h})\,m_0
              + \alpha_{i+1}\varphi_2(h) D_1 - \alpha_{i+1}\varphi_3(h) D_2,

    ``D_1^{(0)} = (m_0 - m_1)/r_0``, ``D_1^{(1)} = (m_1 - m_2)/r_1``,
    ``D_1 = D_1^{(0)} + r_0 (D_1^{(0)} - D_1^{(1)})/(r_0 + r_1)`` (``~ h x0'``),
    ``D_2 = 2 (D_1^{(0)} - D_1^{(1)})/(r_0 + r_1)`` (``~ h^2 x0''``),
    ``phi_2(h) = (e^{-h} - 1 + h)/h`` and ``phi_3(h) = (e^{-h} - 1 + h - h^2/2)/h^2``: the exact
    integrals of ``e^{u-h}`` against ``u`` and ``u^2/2`` in eq. 8 of the paper, i.e. the step
    integrates the quadratic through ``m_0, m_1, m_2`` exactly (the same update as ``unipc`` with
    ``order=3, corrector=False``). Note: the authors' reference implementation (and k-diffusion's
    ``sample_dpmpp_3m_sde``) use half this ``D_2`` with the same ``phi_3``, which leaves an
    ``O(h^3)`` local error: their 3M converges with order 2, this one with order 3 (tested).

    ``order=2``: ``solver_type="taylor"`` (default) uses ``phi_2`` as above; ``"midpoint"`` uses
    Alg. 2's ``(1 - e^{-h})/2`` (both second order). The first steps use lower orders while the
    history fills; ``lower_order_final=True`` lowers the order of the last steps to
    ``min(order, steps - i)``, as Lu et al. do for fewer than 15 steps (not needed here: our grids
    end at ``t_end > 0``). One NFE per step."""
    order = int(order)
    require(order in (1, 2, 3), f"order must be 1, 2 or 3, got {order!r}")
    require(solver_type in ("taylor", "midpoint"),
            f"solver_type must be 'taylor' or 'midpoint', got {solver_type!r}")
    alphas, sigmas, lambdas = _grid(ctx)
    x0s: List[torch.Tensor] = []    # newest first
    hs: List[float] = []
    n = ctx.steps
    for i in range(n):
        x0s.insert(0, ctx.x0(i, x))
        del x0s[3:]
        h = lambdas[i + 1] - lambdas[i]
        k = min(order, i + 1)
        if lower_order_final:
            k = min(k, n - i)
        cx, cs = _pp_coefficients(k, sigmas[i], alphas[i + 1], sigmas[i + 1], h, hs, solver_type)
        x = combine(x, cx, list(zip(cs[:k], x0s[:k])))
        hs.append(h)
        del hs[:-3]
        x = yield x


def _alias(name: str, order: int):
    @register(name, grid="logsnr", deterministic=True, two_way=True, order=order,
              summary=f"DPM-Solver++({order}M) multistep (data prediction; 1 NFE/step)")
    def solver(ctx: SolverContext, x, lower_order_final: bool = False, solver_type: str = "taylor"):
        return dpm_solver_pp(ctx, x, order=order, lower_order_final=lower_order_final,
                             solver_type=solver_type)
    solver.__doc__ = f"DPM-Solver++({order}M): ``dpm_solver++`` with ``order={order}``."
    return solver


_alias("dpm_solver++_2m", 2)
_alias("dpm_solver++_3m", 3)


# ---- SDE-DPM-Solver++ (data prediction, multistep, stochastic) -------------------------------------
@register("sde_dpm_solver++", grid="logsnr", deterministic=False, two_way=True, order=1, summary=(
    "SDE-DPM-Solver++(2M): second-order multistep solver of the reverse SDE (1 NFE/step)"))
def sde_dpm_solver_pp(ctx: SolverContext, x, order: int = 2, solver_type: str = "midpoint"):
    r"""SDE-DPM-Solver++(2M) (Lu et al. 2022b, Sec. 5 and App.; ``sde-dpmsolver++`` of the authors'
    implementation): the reverse SDE in data prediction, its linear part and the noise integrated
    exactly,

    .. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}e^{-h}x_i + \alpha_{i+1}(1 - e^{-2h})\,m_0
              + c(h)\,\alpha_{i+1} D_1 + \sigma_{i+1}\sqrt{1 - e^{-2h}}\,z,

    ``D_1 = (m_0 - m_1)/r_0``; ``c = (1 - e^{-2h})/2`` (``solver_type="midpoint"``, default, as the
    paper) or ``c = 1 - (1 - e^{-2h})/(2h)`` (``"taylor"``: the exact weight of the linear term).
    ``order=1`` (and the first step of order 2) is DDIM with ``eta=1``, i.e. ancestral sampling on
    the grid. Targets ``p_{t_end}`` (noise is added on the last step too). One NFE per step."""
    order = int(order)
    require(order in (1, 2), f"order must be 1 or 2, got {order!r}")
    require(solver_type in ("taylor", "midpoint"),
            f"solver_type must be 'taylor' or 'midpoint', got {solver_type!r}")
    alphas, sigmas, lambdas = _grid(ctx)
    prev_x0 = None
    prev_h = None
    for i in range(ctx.steps):
        s, a_t, s_t = sigmas[i], alphas[i + 1], sigmas[i + 1]
        h = lambdas[i + 1] - lambdas[i]
        x0 = ctx.x0(i, x)
        e2 = -math.expm1(-2 * h)           # 1 - e^{-2h}
        terms = [(a_t * e2, x0)]
        if order == 2 and prev_x0 is not None:
            if solver_type == "midpoint":
                w = 0.5 * a_t * e2
            else:
                # 2 int_0^h e^{-2(h-u)} u/h du = 1 - (1 - e^{-2h})/(2h)
                w = a_t * (e2 / (-2 * h) + 1) if h > 1e-4 else a_t * (h - 2 * h * h / 3)
            r = prev_h / h                 # D_1 = (x0 - prev_x0)/r with weight w
            terms = [(a_t * e2 + w / r, x0), (-w / r, prev_x0)]
        terms.append((s_t * math.sqrt(e2), ctx.noise.randn()))
        x = combine(x, s_t / s * math.exp(-h), terms)
        prev_x0, prev_h = x0, h
        x = yield x
