r"""Solvers of the probability-flow ODE ([SDE] Song et al. 2021, eq. 13), in the time ``t``:

.. math:: \frac{dx}{dt} = F(x, t) = f(t)\,x - \tfrac12 g(t)^2\, s(x, t),

integrated from ``t_start`` (T) down to ``t_end`` (eps). Deterministic: the same ``x_T`` gives the
same sample, and the map ``x_T -> x_eps`` approximates the flow that
:func:`~.reference.exact_flow_map` computes at a tight tolerance (the tests' reference).

Fixed step, on the grid ``t_0 > ... > t_S`` with ``h_i = t_{i+1} - t_i < 0``:

- ``ode_euler`` (order 1, 1 NFE/step): ``x' = x + h F(x, t)``.
- ``ode_heun``  (order 2, 2 NFE/step; Heun's method, the explicit trapezoidal rule):
  ``k1 = F(x, t)``, ``k2 = F(x + h k1, t')``, ``x' = x + h (k1 + k2)/2``. Heun on every step, the
  last one too: EDM (Karras et al. 2022, Alg. 1) takes an Euler last step because its grid ends at
  ``sigma = 0`` where the score is undefined; ours ends at ``eps > 0``.
- ``ode_rk4``   (order 4, 4 NFE/step): the classical Runge–Kutta method (midpoint time
  ``(t + t')/2``).

Adaptive (yield once per grid interval; the default grid for them is the single interval
``[t_end, t_start]``; with more intervals they stop at every grid time and restart there, with a
fresh initial step, which costs a few NFE per interval):

- ``ode``: torchdiffeq ``odeint`` (``method="dopri5"`` by default, ``rtol = atol = 1e-5``).
- ``ode_scipy``: scipy ``solve_ivp`` (``RK45`` by default, ``rtol = atol = 1e-5``, as score_sde's
  ``ode_sampler``), state moved to float64 NumPy and back on every evaluation.

Both go through :func:`sde_diffusion.flow.integrate_flow`, the probability-flow integrator that
the likelihood and the reference flow map use too (one implementation of the flow and of the
adaptive integrators; the fixed-step solvers evaluate the same :func:`sde_diffusion.flow.pf_drift`).
``per_sample=False`` (default) solves the batch as one ODE system with one step size, so a
sample's result depends (within the tolerance) on its batch companions.
``per_sample=True`` gives every sample its own error control: for ``ode`` with ``dopri5`` a
vectorised Dormand–Prince with one step-size controller per sample (each stage is one network call
on the samples still running, so the NFE is that of the slowest sample, and the per-call batch
shrinks as samples finish); for other methods and for ``ode_scipy``, the samples are solved one
after the other (``batch`` times the network calls, each on one sample).
"""
from __future__ import annotations

import torch

from .. import flow
from .._checks import require
from ._exp_integrator import combine
from .base import SolverContext
from .registry import register

__all__ = ["pf_drift"]


def pf_drift(ctx: SolverContext, x: torch.Tensor, t: torch.Tensor, scales=None) -> torch.Tensor:
    """The probability-flow drift ``f(t) x - g(t)^2 s(x, t) / 2`` (one NFE):
    :func:`sde_diffusion.flow.pf_drift` of the context's model (``scales = (alpha, sigma, f,
    g^2)`` at ``t``: no check or recomputation per call)."""
    return flow.pf_drift(ctx.model, x, t, scales)


def _at_grid(ctx: SolverContext, i: int):
    """``(alpha, sigma, f, g^2)`` at grid time ``t_i`` (floats of the context's grid)."""
    a, s, _ = ctx.scales(i)
    return (a, s) + ctx.drift(i)


@register("ode_euler", deterministic=True, two_way=True, order=1, nfe=lambda steps: steps,
          summary="probability-flow ODE, Euler (order 1)")
def ode_euler(ctx: SolverContext, x):
    """Euler's method on the probability-flow ODE in ``t`` (1 NFE per step)."""
    times = ctx.time_list
    for i in range(ctx.steps):
        h = times[i + 1] - times[i]
        x = torch.add(x, pf_drift(ctx, x, ctx.t(i), _at_grid(ctx, i)), alpha=h)
        x = yield x


@register("ode_heun", deterministic=True, two_way=True, order=2, nfe=lambda steps: 2 * steps,
          summary="probability-flow ODE, Heun (order 2)")
def ode_heun(ctx: SolverContext, x):
    """Heun's method (explicit trapezoidal rule) on the probability-flow ODE in ``t``, on every
    step including the last (2 NFE per step)."""
    times = ctx.time_list
    for i in range(ctx.steps):
        h = times[i + 1] - times[i]
        k1 = pf_drift(ctx, x, ctx.t(i), _at_grid(ctx, i))
        k2 = pf_drift(ctx, torch.add(x, k1, alpha=h), ctx.t(i + 1), _at_grid(ctx, i + 1))
        x = combine(x, 1.0, [(0.5 * h, k1), (0.5 * h, k2)])
        x = yield x


@register("ode_rk4", deterministic=True, two_way=True, order=4, nfe=lambda steps: 4 * steps,
          summary="probability-flow ODE, classical Runge–Kutta (order 4)")
def ode_rk4(ctx: SolverContext, x):
    """The classical fourth-order Runge–Kutta method on the probability-flow ODE in ``t``
    (4 NFE per step). The midpoints' scales and drift coefficients are computed once per run."""
    times = ctx.time_list
    mids = ctx.off_grid([times[i] + 0.5 * (times[i + 1] - times[i]) for i in range(ctx.steps)],
                        drift=True)
    for i in range(ctx.steps):
        h = times[i + 1] - times[i]
        tm, *at_m = mids[i]
        tm = ctx.vec(tm)
        k1 = pf_drift(ctx, x, ctx.t(i), _at_grid(ctx, i))
        k2 = pf_drift(ctx, torch.add(x, k1, alpha=0.5 * h), tm, at_m)
        k3 = pf_drift(ctx, torch.add(x, k2, alpha=0.5 * h), tm, at_m)
        k4 = pf_drift(ctx, torch.add(x, k3, alpha=h), ctx.t(i + 1), _at_grid(ctx, i + 1))
        x = combine(x, 1.0, [(h / 6, k1), (h / 3, k2), (h / 3, k3), (h / 6, k4)])
        x = yield x


def _adaptive(ctx: SolverContext, x, solver: str, method: str, rtol, atol, per_sample):
    require(isinstance(per_sample, bool), f"per_sample must be True or False, got {per_sample!r}")
    for i in range(ctx.steps):
        x, _ = flow.integrate_flow(ctx.model, ctx.sde, x, float(ctx.times[i]),
                                   float(ctx.times[i + 1]), solver=solver, method=method,
                                   rtol=rtol, atol=atol, per_sample=per_sample)
        x = yield x


@register("ode", deterministic=True, two_way=True, order=None, nfe=None,
          summary="probability-flow ODE, adaptive (torchdiffeq, dopri5)")
def ode(ctx: SolverContext, x, method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
        per_sample: bool = False):
    """Adaptive probability-flow ODE through torchdiffeq ``odeint`` (any of its methods;
    ``dopri5`` by default) with ``rtol``/``atol``; ``per_sample=True`` controls the error of every
    sample separately (see the module docstring for the cost)."""
    yield from _adaptive(ctx, x, "torchdiffeq", method, rtol, atol, per_sample)


@register("ode_scipy", deterministic=True, two_way=True, order=None, nfe=None,
          summary="probability-flow ODE, adaptive (scipy solve_ivp, RK45)")
def ode_scipy(ctx: SolverContext, x, method: str = "RK45", rtol: float = 1e-5, atol: float = 1e-5,
              per_sample: bool = False):
    """Adaptive probability-flow ODE through scipy ``solve_ivp`` (``RK45`` by default, as
    score_sde's ``ode_sampler``); ``per_sample=True`` solves the samples one after the other."""
    yield from _adaptive(ctx, x, "scipy", method, rtol, atol, per_sample)
