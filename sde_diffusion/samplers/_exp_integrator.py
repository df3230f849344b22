r"""What the exponential integrators share (DPM-Solver, DPM-Solver++, SDE-DPM-Solver++, UniPC and
EDM's samplers): the linear-combination update, the ``phi`` weights, the exact exponential weights
of an interpolating polynomial, and the time, ``alpha`` and ``sigma`` at given log-SNRs.

With ``lambda = log(alpha/sigma)`` the probability-flow ODE has the exact solution from ``lambda_i``
to ``lambda_i + h`` (Lu et al. 2022b, "DPM-Solver++", eq. 8)

.. math:: x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i
          + \alpha_{i+1}\int_0^h e^{u-h}\,\hat x_0(\lambda_i + u)\,du ,

so every such solver's update is ``c_x x + sum_k c_k m_k`` with model outputs ``m_k`` and
coefficients that integrate ``e^{u-h}`` against a polynomial exactly. The coefficients are Python
floats computed in float64.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Sequence, Tuple

import numpy as np
import torch

from ..sdes import SDE

__all__ = ["combine", "phi2", "phi3", "exp_weights", "at_lambda"]


def combine(x: torch.Tensor, cx: float, terms) -> torch.Tensor:
    """``cx * x + sum_k c_k * m_k`` for ``terms = [(c_k, m_k), ...]`` in one fresh tensor (one pass
    per term, no temporaries): the update of every linear multistep solver here."""
    out = torch.mul(x, cx)
    for c, m in terms:
        if c != 0.0:
            out.add_(m, alpha=c)
    return out


def phi2(h: float) -> float:
    """``phi_2(h) = (e^{-h} - 1 + h) / h = 1/h int_0^h e^{u-h} u du`` (series for small ``h``)."""
    if h < 1e-3:
        return h / 2 - h * h / 6 + h ** 3 / 24 - h ** 4 / 120
    return (math.expm1(-h) + h) / h


def phi3(h: float) -> float:
    """``phi_3(h) = (e^{-h} - 1 + h - h^2/2) / h^2`` (negative; series for small ``h``)."""
    if h < 1e-2:
        return -h / 6 + h * h / 24 - h ** 3 / 120 + h ** 4 / 720 - h ** 5 / 5040
    return (math.expm1(-h) + h - 0.5 * h * h) / (h * h)


def _moments(h: float, n: int) -> np.ndarray:
    """``I_j(h) = int_0^1 e^{-h(1-v)} v^j dv`` for ``j = 0..n-1`` (a series for ``h < 1``, the
    stable recurrence ``I_j = (1 - j I_{j-1})/h`` above)."""
    out = np.empty(n)
    if h < 1.0:
        # I_j = sum_k (-h)^k j! / (j + k + 1)!
        for j in range(n):
            term = 1.0 / (j + 1)          # k = 0: j!/(j+1)!
            total = term
            for k in range(1, 40):
                term *= -h / (j + k + 1)
                total += term
                if abs(term) < 1e-18 * abs(total):
                    break
            out[j] = total
    else:
        out[0] = -math.expm1(-h) / h
        for j in range(1, n):
            out[j] = (1.0 - j * out[j - 1]) / h
    return out


def exp_weights(nodes: Sequence[float], h: float) -> np.ndarray:
    """Weights ``w_k = int_0^h e^{u-h} L_k(u) du`` of the Lagrange basis on ``nodes`` (offsets in
    log-SNR from the step's start), so that ``sum_k w_k f(u_k)`` integrates ``e^{u-h} f(u)``
    exactly for polynomials ``f`` of degree ``< len(nodes)``: ``w = h C^T I(h)`` with ``C`` the
    inverse Vandermonde matrix of the scaled nodes ``u_k / h``."""
    v = np.asarray(nodes, dtype=np.float64) / h
    n = len(v)
    V = np.vander(v, n, increasing=True)          # V[k, j] = v_k^j
    # sum_k w_k v_k^j = h I_j  <=>  V^T w = h I
    return np.linalg.solve(V.T, h * _moments(h, n))


def at_lambda(sde: SDE, lams: Iterable[float], t_min: float,
              t_max: float) -> Tuple[List[float], List[float], List[float]]:
    """The times of the log-SNRs ``lams`` (``sde.t_of_lambda``, clamped to ``[t_min, t_max]``)
    and ``log alpha``, ``log sigma`` at those times, as lists of Python floats: one vectorised,
    checked call of the SDE's public views for all the intermediate stages or churned noise
    levels of a run, made before its first step. The caller uses the actual ``lambda`` there,
    ``log alpha - log sigma``, so that its coefficients match the noise level the model sees."""
    lam = torch.tensor(list(lams), dtype=torch.float64)
    if lam.numel() == 0:
        return [], [], []
    t = sde.t_of_lambda(lam).clamp(t_min, t_max)
    return t.tolist(), sde.log_alpha(t).tolist(), sde.log_sigma(t).tolist()
