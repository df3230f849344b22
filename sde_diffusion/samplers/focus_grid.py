r"""A data-scale-focused time grid for the log-SNR solvers.

The truncation error of an exponential integrator in ``lambda = log(alpha/sigma)`` comes from how
fast the data prediction ``x0(lambda)`` changes along the trajectory. For data of scale
``sigma_data`` it barely changes while the noise level ``sigma/alpha = e^{-lambda}`` is far above
``sigma_data`` (``x0`` is close to the data mean) and changes slowly again once the noise is far
below it; it changes fastest -- modes are chosen, then details -- around
``e^{-lambda} ~ sigma_data`` (for Gaussian data ``x0`` follows ``1/sqrt(sigma_data^2 + e^{-2 lambda})``
along the flow, whose derivatives peak at ``lambda = -log sigma_data``). Steps uniform in
``lambda`` (Lu et al. 2022) spend most of a small budget where nothing happens; EDM's rho=7
spacing (Karras et al. 2022) spends it at the lowest noise levels.

``focus_grid`` places the ``steps + 1`` points at the quantiles of a density in ``lambda`` that is
a mixture of the uniform density on ``[lambda(t_start), lambda(t_end)]`` (weight
``uniform_share``) and a normal density centred at ``-log(sigma_data)`` with standard deviation
``width`` (truncated to the same interval):

.. math:: F(\lambda) = s\,\frac{\lambda - \lambda_0}{\lambda_1 - \lambda_0}
          + (1 - s)\,\frac{\Phi(\frac{\lambda - c}{w}) - \Phi(\frac{\lambda_0 - c}{w})}
                          {\Phi(\frac{\lambda_1 - c}{w}) - \Phi(\frac{\lambda_0 - c}{w})},
          \qquad \lambda_i = F^{-1}(i/\text{steps}),

``c = -log(sigma_data)``. The defaults (``sigma_data = 0.5`` as EDM's for data in [-1, 1],
``width = 2``, ``uniform_share = 0.4``) were chosen once on mixtures of several dimensions and
seeds; pass the data's actual RMS standard deviation as ``sigma_data`` when it is known. The uniform
share keeps steps in the tails: SDEs whose log-SNR range is very wide at the data end (sub-VP
reaches ``lambda ~ 9`` at ``eps = 1e-3``) need them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._checks import require
from ..sdes import SDE

__all__ = ["focus_grid"]


def focus_grid(sde: SDE, steps: int, sigma_data: float = 0.5, width: float = 2.0,
               uniform_share: float = 0.4, t_start: Optional[float] = None,
               t_end: Optional[float] = None) -> torch.Tensor:
    """Decreasing float64 times ``t_0 = t_start > ... > t_steps = t_end`` (``steps + 1`` points)
    concentrated in log-SNR around the noise level ``sigma_data`` (see the module docstring).
    Pass the result as ``sample(..., grid=focus_grid(sde, steps))``."""
    require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
            f"steps must be an integer >= 1, got {steps!r}")
    require(sigma_data > 0 and math.isfinite(sigma_data), f"sigma_data must be > 0, got {sigma_data!r}")
    require(width > 0 and math.isfinite(width), f"width must be > 0, got {width!r}")
    require(0 <= uniform_share <= 1, f"uniform_share must lie in [0, 1], got {uniform_share!r}")
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.eps if t_end is None else float(t_end)
    require(0 < t_end < t_start <= sde.T,
            f"need 0 < t_end < t_start <= T={sde.T}, got t_start={t_start!r}, t_end={t_end!r}")
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    lam0, lam1 = (sde._log_alpha(ends) - sde._log_sigma(ends)).tolist()
    c = -math.log(sigma_data)
    phi = lambda lam: torch.special.ndtr((lam - c) / width)  # noqa: E731
    p0, p1 = float(phi(torch.tensor(lam0, dtype=torch.float64))), float(phi(torch.tensor(lam1, dtype=torch.float64)))
    bump_mass = p1 - p0
    share = uniform_share if bump_mass > 1e-12 else 1.0

    def cdf(lam):
        out = share * (lam - lam0) / (lam1 - lam0)
        if share < 1:
            out = out + (1 - share) * (phi(lam) - p0) / bump_mass
        return out

    q = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    lo = torch.full_like(q, lam0)
    hi = torch.full_like(q, lam1)
    for _ in range(80):  # bisection: F is increasing
        mid = 0.5 * (lo + hi)
        below = cdf(mid) < q
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    lam = 0.5 * (lo + hi)
    grid = sde.t_of_lambda(lam).to(torch.float64)
    grid[0], grid[-1] = t_start, t_end
    require(bool((grid[1:] < grid[:-1]).all()),
            "focus_grid: the grid is not strictly decreasing (too many steps for float64?)")
    return grid
