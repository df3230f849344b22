r"""Linear multistep solvers on the noise prediction in EDM's variables: iPNDM, DEIS (tAB, and the
log-rho / rho variants) and k-diffusion's ``lms``.

With ``x = alpha x0 + sigma z`` and EDM's variables ``y = x/alpha``, ``rho = sigma/alpha = e^{-lambda}``
(Karras et al. 2022, eq. 4 with ``s = 1``; Zhang & Chen 2023, "Fast Sampling of Diffusion Models with
Exponential Integrator" [DEIS], Sec. 4, their ``rho``), the probability-flow ODE of every affine
SDE is

.. math:: \frac{dy}{d\rho} = \hat\varepsilon(\alpha y, t(\rho)),\qquad
          y_{i+1} = y_i + \int_{\rho_i}^{\rho_{i+1}}\hat\varepsilon\,d\rho

([DEIS] eq. 15; the exponential integrator's exact linear part is absorbed in ``y``). A linear
multistep method replaces ``eps`` by the polynomial ``P`` through the stored predictions
``eps_i, eps_{i-1}, ...`` in some variable ``v`` and integrates ``P`` against ``d rho`` exactly:

.. math:: x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}x_i + \alpha_{i+1}\sum_j C_{ij}\,\varepsilon_{i-j},
          \qquad C_{ij} = \int_{\rho_i}^{\rho_{i+1}} L_j(v)\,d\rho ,

with ``L_j`` the Lagrange basis on the nodes ``v_i, v_{i-1}, ...``:

- ``v = t`` (the SDE's time): tAB-DEIS ([DEIS] Sec. 4, "tAB"), the coefficients by Gauss--Legendre
  quadrature in ``lambda`` (``C_ij = -int e^{-lambda} L_j(t(lambda)) d lambda``, 8 nodes per
  panel of at most 0.25 in ``lambda``: smooth integrands, round-off-level weights);
- ``v = log rho = -lambda``: the log-rho DEIS of diffusers' ``DEISMultistepScheduler`` (exact
  weights of ``e^{-lambda}`` times a polynomial, i.e. DPM-Solver's multistep form on ``eps``);
- ``v = rho``: rhoAB-DEIS, which is k-diffusion's ``sample_lms`` (Adams--Bashforth in ``sigma``
  with integrated Lagrange coefficients; exact polynomial integration here).

iPNDM ([DEIS] App. (improved PNDM); k-diffusion's ``sample_ipndm``) uses the fixed
Adams--Bashforth coefficients of equal steps instead, ``y_{i+1} = y_i + (rho_{i+1} - rho_i)
sum_j b_j eps_{i-j}`` with ``b = (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24``. It
converges with order 2: on a grid not uniform in ``rho`` the equal-step weights miss the spacing
at ``O(h^3)`` per step, and on any grid its Euler first step leaves an ``O(h^2)`` error (measured:
slope 2.0 on log-SNR, Karras and rho-uniform grids); its appeal is the low-NFE regime.

All start with lower orders while the history fills (a first-order first step: where that step
is not at high noise, as on a short interval, it limits every method here to global order 2; from
``T`` it is not seen at practical step counts). One NFE per step; deterministic.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch

from .._checks import require
from ._exp_integrator import combine, exp_weights
from .base import SolverContext
from .registry import register

__all__ = ["ipndm", "deis", "lms", "multistep_weights"]

#: Adams--Bashforth coefficients of equal steps, newest first (iPNDM).
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
       4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_VARIABLES = ("t", "logrho", "rho")
_GL_NODES = 8
_GL_PANEL = 0.25          # longest Gauss-Legendre panel in lambda


def _poly_weights(nodes: Sequence[float], lo: float, hi: float) -> np.ndarray:
    """``int_lo^hi L_k(v) dv`` for the Lagrange basis on ``nodes`` (exact: scaled moments solved
    against the Vandermonde matrix, as in :func:`._exp_integrator.exp_weights`)."""
    h = hi - lo
    s = (np.asarray(nodes, dtype=np.float64) - lo) / h
    n = len(s)
    moments = 1.0 / np.arange(1, n + 1)             # int_0^1 s^j ds
    return h * np.linalg.solve(np.vander(s, n, increasing=True).T, moments)


def _lagrange_at(nodes: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``L_k(v)`` for every node ``k`` (rows) and point ``v`` (columns)."""
    out = np.ones((len(nodes), len(v)))
    for k, vk in enumerate(nodes):
        for m, vm in enumerate(nodes):
            if m != k:
                out[k] *= (v - vm) / (vk - vm)
    return out


def multistep_weights(ctx: SolverContext, order: int, variable: str) -> List[np.ndarray]:
    """``C_ij`` of every step ``i`` (newest node first; ``min(order, i + 1)`` of them): the
    integral of the Lagrange basis in ``variable`` (``"t"``, ``"logrho"``, ``"rho"``) against
    ``d rho`` over the step (see the module docstring). Computed once per run, before the first
    step."""
    lam = ctx.lambdas.tolist()
    n = ctx.steps
    if variable == "rho":
        rho = [math.exp(-v) for v in lam]
        return [_poly_weights([rho[i - j] for j in range(min(order, i + 1))], rho[i], rho[i + 1])
                for i in range(n)]
    if variable == "logrho":
        out = []
        for i in range(n):
            h = lam[i + 1] - lam[i]
            # -e^{-lambda_i} int_0^h e^{-u} L_j(u) du, u = h - s turns it into exp_weights' form
            nodes = [h - (lam[i - j] - lam[i]) for j in range(min(order, i + 1))]
            out.append(-math.exp(-lam[i]) * exp_weights(nodes, h))
        return out
    # variable == "t": composite Gauss-Legendre in lambda, t(lambda) from one call of the SDE
    g_x, g_w = np.polynomial.legendre.leggauss(_GL_NODES)
    pts, wts, spans = [], [], []
    for i in range(n):
        panels = max(1, math.ceil(abs(lam[i + 1] - lam[i]) / _GL_PANEL))
        edges = np.linspace(lam[i], lam[i + 1], panels + 1)
        start = len(pts)
        for a, b in zip(edges[:-1], edges[1:]):
            pts.extend(0.5 * (a + b) + 0.5 * (b - a) * g_x)
            wts.extend(0.5 * (b - a) * g_w)
        spans.append((start, len(pts)))
    t_q = ctx.sde.t_of_lambda(torch.tensor(pts, dtype=torch.float64)).numpy()
    lam_q, w_q = np.asarray(pts), np.asarray(wts)
    times = ctx.times.tolist()
    out = []
    for i, (a, b) in enumerate(spans):
        nodes = np.array([times[i - j] for j in range(min(order, i + 1))])
        basis = _lagrange_at(nodes, t_q[a:b])
        out.append(-(basis * (np.exp(-lam_q[a:b]) * w_q[a:b])).sum(axis=1))
    return out


def _check_order(order, most: int) -> int:
    require(isinstance(order, int) and not isinstance(order, bool) and 1 <= order <= most,
            f"order must be an integer in 1..{most}, got {order!r}")
    return order


def _run(ctx: SolverContext, x, order: int, weights):
    """The shared loop: ``x_{i+1} = (alpha_{i+1}/alpha_i) x_i + alpha_{i+1} sum_j C_ij eps_{i-j}``;
    ``weights(i, k)`` gives the ``k`` weights of step ``i`` (newest first)."""
    alphas = ctx.alphas.tolist()
    eps: List[torch.Tensor] = []     # newest first
    for i in range(ctx.steps):
        eps.insert(0, ctx.eps(i, x))
        del eps[order:]
        a_next = alphas[i + 1]
        c = weights(i, len(eps))
        x = combine(x, a_next / alphas[i], [(a_next * float(w), e) for w, e in zip(c, eps)])
        x = yield x


@register("ipndm", grid="karras", deterministic=True, two_way=True, order=2,
          summary="iPNDM (Zhang & Chen 2023): equal-step Adams-Bashforth 4 on eps in EDM's "
                  "variables (1 NFE/step)")
def ipndm(ctx: SolverContext, x, order: int = 4):
    r"""Improved PNDM ([DEIS] App., "iPNDM"; k-diffusion's ``sample_ipndm``): the equal-step
    Adams--Bashforth formula of ``order`` (default 4) on ``eps`` in ``(y, rho) = (x/alpha,
    sigma/alpha)``, lower orders while the history fills (the warm start that replaces PNDM's
    Runge--Kutta steps):

    .. math:: y_{i+1} = y_i + (\rho_{i+1} - \rho_i)\,\tfrac{1}{24}(55\varepsilon_i
              - 59\varepsilon_{i-1} + 37\varepsilon_{i-2} - 9\varepsilon_{i-3}).

    The coefficients ignore the grid's spacing, and the first step is Euler's: order 2 (registered
    ``order=2``; see the module docstring). The same as diffusers' ``IPNDMScheduler`` on the same
    grid. 1 NFE per step."""
    order = _check_order(order, 4)
    rho = torch.exp(-ctx.lambdas).tolist()
    return _run(ctx, x, order, lambda i, k: [(rho[i + 1] - rho[i]) * b for b in _AB[k]])


@register("deis", grid="logsnr", deterministic=True, two_way=True, order=3,
          summary="DEIS (Zhang & Chen 2023): exponential Adams-Bashforth on eps, polynomial in t "
                  "(tAB), log-rho or rho; orders 1-3 (1 NFE/step)")
def deis(ctx: SolverContext, x, order: int = 3, variable: str = "t"):
    r"""DEIS multistep ([DEIS] Sec. 4, eq. 15 and Alg. 1; orders 1-3, up to 4 allowed): ``eps`` is
    extrapolated by the Lagrange polynomial through the last ``order`` predictions in
    ``variable`` and integrated exactly against ``d rho``:

    .. math:: x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}x_i + \alpha_{i+1}\sum_j C_{ij}\varepsilon_{i-j},
              \qquad C_{ij} = \int_{\rho_i}^{\rho_{i+1}} L_j(v)\,d\rho .

    ``variable="t"`` (default): tAB-DEIS, the paper's best variant (polynomial in the time ``t``).
    ``"logrho"``: diffusers' ``DEISMultistepScheduler`` (polynomial in ``log rho``).
    ``"rho"``: rhoAB-DEIS (= ``lms``). Order 1 is DDIM for all three. 1 NFE per step."""
    order = _check_order(order, 4)
    require(variable in _VARIABLES, f"variable must be one of {_VARIABLES}, got {variable!r}")
    w = multistep_weights(ctx, order, variable)
    return _run(ctx, x, order, lambda i, k: w[i])


@register("lms", grid="karras", deterministic=True, two_way=True, order=4,
          summary="linear multistep (k-diffusion's lms): Adams-Bashforth in sigma/alpha with "
                  "integrated Lagrange coefficients, order up to 4 (1 NFE/step)")
def lms(ctx: SolverContext, x, order: int = 4):
    r"""k-diffusion's ``sample_lms`` (Karras et al. 2022's variables; Adams--Bashforth with
    variable steps): the derivative ``d = (y - D(y; rho))/rho = eps`` extrapolated by its Lagrange
    polynomial in ``rho = sigma/alpha`` through the last ``order`` (default 4) grid points and
    integrated exactly over ``[rho_i, rho_{i+1}]``, i.e. ``deis`` with ``variable="rho"``
    (rhoAB-DEIS). Order ``order`` on any smooth grid; 1 NFE per step."""
    order = _check_order(order, 4)
    w = multistep_weights(ctx, order, "rho")
    return _run(ctx, x, order, lambda i, k: w[i])
