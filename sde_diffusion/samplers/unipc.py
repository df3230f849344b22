r"""A UniPC-style predictor-corrector for the probability-flow ODE: exponential Adams-Bashforth
predictor and exponential Adams-Moulton corrector in log-SNR with data prediction (Zhao, Bai, Rao,
Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", NeurIPS; cited as [UniPC]).

Derivation. With ``lambda = log(alpha/sigma)`` the probability-flow ODE's exact solution from
``lambda_i`` to ``lambda_{i+1} = lambda_i + h`` is (DPM-Solver++ eq. 8)

.. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i
          + \alpha_{i+1}\int_0^h e^{u-h}\,\hat x_0(\lambda_i + u)\,du .

Replace ``x0(lambda_i + u)`` by the polynomial ``P`` interpolating the stored data predictions
``(u_k, m_k)`` (``u_k = lambda_k - lambda_i``) and integrate it exactly against ``e^{u-h}``:

.. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}\sum_k w_k m_k,\qquad
          w_k = \int_0^h e^{u-h} L_k(u)\,du,

with ``L_k`` the Lagrange basis on the nodes. The weights are ``w = h C^T I(h)`` with
``C = V^{-1}`` the inverse Vandermonde matrix of the scaled nodes ``v_k = u_k / h`` and
``I_j(h) = int_0^1 e^{-h(1-v)} v^j dv`` (a series for ``h < 1``, the stable recurrence
``I_j = (1 - j I_{j-1})/h`` above).

- **Predictor** (UniP-p): the nodes are the last ``p`` grid points ``lambda_i, lambda_{i-1}, ...``
  (extrapolation; local error ``O(h^{p+1})``, order ``p``). With ``p`` = 1, 2 this is exactly
  DDIM / DPM-Solver++(2M) in its Taylor form; with ``p = 3`` an exact-weight DPM-Solver++(3M).
- **Corrector** (UniC-p): once ``m_{i+1} = x0(x_{i+1})`` has been evaluated -- the network call
  the next step needs anyway -- the step ``i -> i+1`` is recomputed with the node ``u = h`` added
  (interpolation instead of extrapolation, an exponential Adams-Moulton step, local error
  ``O(h^{p+2})``); the corrected state replaces ``x_{i+1}`` while ``m_{i+1}`` is kept (it is not
  re-evaluated: [UniPC] Sec. 3.1, no extra NFE). This raises the order to ``p + 1``.

[UniPC] builds the same two steps from a Taylor expansion with a free ``B(h)`` (``bh1``: ``h``;
``bh2``: ``e^h - 1``) and its "varying-coefficient" variant (UniPC_v, App. C) with the exact
``phi`` functions; the Lagrange form above is an equivalent, compact way to get the exact weights
for any order and any node spacing (:func:`._exp_integrator.exp_weights`). Warm-up: the first
steps use the points available (order 1, 2, ...). The last step is not corrected (there is no
model call after it). One NFE per step.

Between steps (``sample(..., correct=...)``): each step yields its predictor's state, a
correction may replace it, and the model is evaluated at the corrected state (the step's one NFE,
which the next predictor and the corrector use: the history holds model outputs at corrected
states). The corrector's change ``x_c - x_pred`` -- made of model outputs only -- is then added to
the corrected state, and the next step continues from there. Without a correction this is the
plain method; with one, the evaluations and the solution of the corrected problem stay consistent
(tested against the exact flow with a known coordinate prescribed).
"""
from __future__ import annotations

from typing import List

import torch

from .._checks import require
from ._exp_integrator import combine, exp_weights
from .base import SolverContext
from .registry import register

__all__ = ["unipc"]


@register("unipc", grid="logsnr", deterministic=True, two_way=True, order=4, summary=(
    "UniPC-style predictor-corrector: exponential Adams-Bashforth + Adams-Moulton in log-SNR "
    "(data prediction; order p+1 at 1 NFE/step)"))
def unipc(ctx: SolverContext, x, order: int = 2, corrector: bool = True,
          lower_order_final: bool = False):
    r"""UniPC-style multistep predictor-corrector with exact exponential weights (see the module
    docstring). ``order`` = p, the predictor's order (1-4); with ``corrector=True`` (default) each
    step is corrected once the next data prediction is known, which makes the method of order
    ``p + 1`` at one NFE per step. ``corrector=False`` leaves the exponential Adams-Bashforth
    predictor alone (= DPM-Solver++(pM) with exact weights). ``lower_order_final`` lowers the
    predictor's order at the last steps to ``min(p, steps - i)``."""
    order = int(order)
    require(1 <= order <= 4, f"order must be 1, 2, 3 or 4, got {order!r}")
    alphas, sigmas, lambdas = ctx.alphas.tolist(), ctx.sigmas.tolist(), ctx.lambdas.tolist()
    n = ctx.steps
    preds: List[int] = []      # grid indices of the stored data predictions (newest last)
    ms: List[torch.Tensor] = []
    x_prev = x_pred = None
    for i in range(n):
        m = ctx.x0(i, x)
        if corrector and x_prev is not None:
            # UniC: redo step i-1 -> i with the new node u = h included, and add the corrector's
            # change x_c - x_pred to the state (which a correction may have replaced)
            k = min(order, len(preds))
            idx = preds[-k:] + [i]
            h = lambdas[i] - lambdas[i - 1]
            w = exp_weights([lambdas[j] - lambdas[i - 1] for j in idx], h)
            vals = ms[-k:] + [m]
            x_c = combine(x_prev, sigmas[i] / sigmas[i - 1],
                          [(alphas[i] * wk, mk) for wk, mk in zip(w.tolist(), vals)])
            x = x_c if x is x_pred else x + (x_c - x_pred)
        preds.append(i)
        ms.append(m)
        if len(ms) > order:
            preds.pop(0)
            ms.pop(0)
        p = min(order, len(ms))
        if lower_order_final:
            p = min(p, n - i)
        h = lambdas[i + 1] - lambdas[i]
        w = exp_weights([lambdas[j] - lambdas[i] for j in preds[-p:]], h)
        x_prev = x
        x_pred = combine(x, sigmas[i + 1] / sigmas[i],
                         [(alphas[i + 1] * wk, mk) for wk, mk in zip(w.tolist(), ms[-p:])])
        x = yield x_pred
