r"""SA-Solver: stochastic Adams predictor-corrector in log-SNR (Xue, Yi, Zhou, Zhang, Ma & Li 2023,
"SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models", NeurIPS; cited as [SA]).

[SA] eq. 8 samples the family of reverse SDEs with noise scale ``tau`` (``tau = 0``: the
probability-flow ODE, ``tau = 1``: the reverse SDE). In data prediction, with
``lambda = log(alpha/sigma)``, ``c = 1 + tau^2`` and ``h = lambda_{i+1} - lambda_i``, its exact
solution over one step is ([SA] eq. 10)

.. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}e^{-\tau^2 h}x_i
          + \alpha_{i+1}\int_0^h c\,e^{-c(h-u)}\hat x_0(\lambda_i + u)\,du
          + \sigma_{i+1}\sqrt{1 - e^{-2\tau^2 h}}\,z .

The data prediction is replaced by the Lagrange polynomial through stored predictions and the
integral taken exactly (``v = c u`` turns the weights into :func:`._exp_integrator.exp_weights`
of the nodes ``c u_k`` over ``c h``):

- *SA-Predictor* ([SA] eq. 11, Alg. 1): the last ``predictor_order`` grid points (extrapolation);
- *SA-Corrector* ([SA] eq. 13): once ``m_{i+1} = x0(x_{i+1})`` is known -- the network call the
  next step makes anyway -- step ``i`` is recomputed from ``x_i`` with the *same* noise ``z`` and
  ``corrector_order`` nodes ending at ``lambda_{i+1}`` (an Adams--Moulton step; no extra NFE). The
  last step is not corrected. Between steps a correction from ``sample(..., correct=fn)`` is kept
  as in ``unipc``: the corrector's change is added to the corrected state.

``weights="exact"`` (default) uses the exact weights for every order. ``weights="diffusers"``
reproduces the authors' code and diffusers' ``SASolverScheduler``, which for the two-node formulas
(order 2) replace the exact weight of the linear term ``int_0^h c e^{-c(h-u)} u du`` by
``c h^2/2`` ("a modification that does not influence the convergence order").
With ``tau = 0`` and ``corrector_order = predictor_order + 1`` the exact variant is ``unipc`` of
order ``predictor_order``.
"""
from __future__ import annotations

import math
from typing import Callable, List, Union

import torch

from .._checks import require
from ._exp_integrator import combine, exp_weights, phi2
from .base import SolverContext
from .registry import register

__all__ = ["sa_solver"]

TauLike = Union[float, Callable[[float], float]]


def _weights(nodes: List[float], h: float, c: float, modified: bool) -> List[float]:
    """``int_0^h c e^{-c(h-u)} L_k(u) du`` for the Lagrange basis on ``nodes`` (offsets ``u_k``
    from ``lambda_i``, newest first); ``modified`` applies the authors' order-2 change."""
    w = exp_weights([c * u for u in nodes], c * h).tolist()
    if modified and len(nodes) == 2:
        # the linear term's weight becomes c h^2/2 instead of int_0^h c e^{-c(h-u)} u du = h phi_2(ch)
        delta = (0.5 * c * h * h - h * phi2(c * h)) / (nodes[0] - nodes[1])
        w[0] += delta
        w[1] -= delta
    return w


def _tau_deterministic(tau, **_) -> bool:
    return not callable(tau) and float(tau) == 0.0


@register("sa_solver", grid="logsnr", two_way=True, order=1, deterministic=_tau_deterministic,
          summary="SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector in log-SNR, "
                  "noise scale tau (1 NFE/step)")
def sa_solver(ctx: SolverContext, x, tau: TauLike = 1.0, predictor_order: int = 3,
              corrector_order: int = 4, lower_order_final: bool = False, weights: str = "exact"):
    r"""SA-Solver ([SA] Alg. 1; see the module docstring): stochastic Adams predictor of
    ``predictor_order`` (1-4) and corrector of ``corrector_order`` nodes (0: none; 1-4) with
    noise scale ``tau`` -- a number, or a function ``tau(t)`` of the step's start time (diffusers'
    default is ``tau = 1`` for timesteps 200-800 and 0 elsewhere: ``tau=lambda t: float(0.2 <= t
    <= 0.8)`` here). Warm-up: the predictor uses at most ``i + 1`` nodes at step ``i``, the corrector
    at most ``i + 2``; ``lower_order_final`` caps them at ``steps - i`` and ``steps - i + 1`` (as
    diffusers). ``tau = 0``: deterministic (with ``weights="exact"`` and ``corrector_order =
    predictor_order + 1``, ``unipc``). With ``tau > 0`` a noise draw per step (also where a
    ``tau(t)`` is 0, so the draws follow the step index); a weak first-order sampler of
    ``p_{t_end}``. 1 NFE per step."""
    for name, value, lo in (("predictor_order", predictor_order, 1),
                            ("corrector_order", corrector_order, 0)):
        require(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= 4,
                f"{name} must be an integer in {lo}..4, got {value!r}")
    require(weights in ("exact", "diffusers"),
            f"weights must be 'exact' or 'diffusers', got {weights!r}")
    times = ctx.times.tolist()
    if callable(tau):
        taus = [float(tau(t)) for t in times[:-1]]
    else:
        require(isinstance(tau, (int, float)) and not isinstance(tau, bool),
                f"tau must be a number >= 0 or a function of t, got {tau!r}")
        taus = [float(tau)] * ctx.steps
    require(all(math.isfinite(v) and v >= 0 for v in taus),
            f"tau must be >= 0 (and finite) at every step, got {taus}")
    stochastic = any(v > 0 for v in taus)
    modified = weights == "diffusers"
    alphas, sigmas, lam = ctx.alphas.tolist(), ctx.sigmas.tolist(), ctx.lambdas.tolist()
    n = ctx.steps
    keep = max(predictor_order, corrector_order - 1, 1)
    ms: List[torch.Tensor] = []          # newest first; ms[k] is at grid index idx[k]
    idx: List[int] = []
    x_prev = x_pred = z_prev = None
    c_order = 0
    for i in range(n):
        m = ctx.x0(i, x)
        if x_prev is not None and c_order > 0:
            # SA-Corrector for step i-1 -> i: nodes i, i-1, ... (c_order of them), the same noise
            j, h, tj = i - 1, lam[i] - lam[i - 1], taus[i - 1]
            c = 1.0 + tj * tj
            nodes_i = [i] + idx[:c_order - 1]
            w = _weights([lam[k] - lam[j] for k in nodes_i], h, c, modified)
            terms = [(alphas[i] * wk, mk) for wk, mk in zip(w, [m] + ms[:c_order - 1])]
            if z_prev is not None:
                terms.append((sigmas[i] * math.sqrt(-math.expm1(-2 * tj * tj * h)), z_prev))
            x_c = combine(x_prev, sigmas[i] / sigmas[j] * math.exp(-tj * tj * h), terms)
            x = x_c if x is x_pred else x + (x_c - x_pred)
        ms.insert(0, m)
        idx.insert(0, i)
        del ms[keep:], idx[keep:]
        p = min(predictor_order, i + 1)
        c_order = min(corrector_order, i + 2)
        if lower_order_final:
            p, c_order = min(p, n - i), min(c_order, n - i + 1)
        h, ti = lam[i + 1] - lam[i], taus[i]
        c = 1.0 + ti * ti
        w = _weights([lam[k] - lam[i] for k in idx[:p]], h, c, modified)
        terms = [(alphas[i + 1] * wk, mk) for wk, mk in zip(w, ms[:p])]
        z_prev = ctx.noise.randn() if stochastic else None
        if z_prev is not None:
            terms.append((sigmas[i + 1] * math.sqrt(-math.expm1(-2 * ti * ti * h)), z_prev))
        x_prev = x
        x_pred = combine(x, sigmas[i + 1] / sigmas[i] * math.exp(-ti * ti * h), terms)
        x = yield x_pred
