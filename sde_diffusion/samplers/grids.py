r"""Time grids shared by every solver: ``steps + 1`` decreasing times from ``t_start`` (default T)
to ``t_end`` (default the SDE's eps).

- ``uniform``:   equal steps in t (score_sde).
- ``logsnr``:    equal steps in the half log-SNR ``lambda = log(alpha/sigma)`` (DPM-Solver, Lu et al.
                 2022, Sec. 3.3 recommends it for low NFE).
- ``karras``:    EDM's rho-spacing of the noise level ``sigma/alpha = e^{-lambda}`` (Karras et al.
                 2022, eq. 5), ``rho=7`` by default.
- ``quadratic``: ``t_i = t_end + (t_start - t_end)(1 - i/steps)^2``, dense near the data (DDIM,
                 Song, Meng & Ermon 2021, App. D.2).
- ``focus``:     steps concentrated in log-SNR around the data's noise scale ``sigma_data`` (see
                 :func:`focus_grid`), for the log-SNR solvers at low NFE.

Each solver has a default grid (its paper's): ``uniform`` for score_sde's samplers and DDIM,
``logsnr`` for DPM-Solver, DPM-Solver++ and UniPC, ``karras`` for EDM's.

Grids are float64 and live on the CPU: solvers read their coefficients as Python floats.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import scipy.special
import torch

from .._checks import require
from ..sdes import SDE

__all__ = ["GRIDS", "MAX_STEPS", "make_grid", "focus_grid", "check_steps"]

GRIDS = ("uniform", "logsnr", "karras", "quadratic", "focus")
#: the ``focus`` grid's default shape: the bump's width in log-SNR and the uniform share
FOCUS_WIDTH, FOCUS_SHARE = 2.0, 0.4

#: The most grid intervals a sampler accepts. Fixed-step solvers stop gaining accuracy long before:
#: score_sde samples with 1000-2000 steps, first-order solvers reach float32 round-off against the
#: exact flow map at about 1e4 steps and the high-order ones at a few hundred; every step costs at
#: least one network call plus Python overhead (about 0.1 ms), so 1e5 steps is already minutes per
#: batch with the smallest model. A larger count is taken for a typo (an extra zero, a budget meant
#: as NFE per sample) and refused before any work, instead of allocating a grid of that size and
#: running for days. For reference-quality samples use the adaptive ``ode`` solver.
MAX_STEPS = 100_000


def check_steps(steps, what: str = "steps") -> int:
    """``steps`` as an int, checked: an integer in ``[1, MAX_STEPS]``."""
    require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
            f"{what} must be an integer >= 1, got {steps!r}")
    require(steps <= MAX_STEPS, f"{what}={steps} exceeds the maximum of {MAX_STEPS} grid steps "
                                f"(see sde_diffusion.samplers.grids.MAX_STEPS); for reference-quality "
                                f"samples use the adaptive solver 'ode'")
    return steps


def make_grid(sde: SDE, steps: int, kind: str = "uniform", t_start: Optional[float] = None,
              t_end: Optional[float] = None, rho: float = 7.0, sigma_data: float = 0.5,
              width: float = FOCUS_WIDTH, uniform_share: float = FOCUS_SHARE) -> torch.Tensor:
    """Decreasing float64 times ``t_0 = t_start > ... > t_steps = t_end`` (``steps + 1`` points);
    ``rho`` shapes the ``karras`` grid, ``sigma_data``, ``width`` and ``uniform_share`` the
    ``focus`` grid."""
    check_steps(steps)
    require(kind in GRIDS, f"unknown time grid {kind!r}; valid grids: {', '.join(GRIDS)}")
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.eps if t_end is None else float(t_end)
    require(0 < t_end < t_start <= sde.T,
            f"need 0 < t_end < t_start <= T={sde.T}, got t_start={t_start!r}, t_end={t_end!r}")
    if kind == "focus":
        return focus_grid(sde, steps, sigma_data, width, uniform_share, t_start=t_start, t_end=t_end)
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    if kind == "uniform":
        grid = t_start + (t_end - t_start) * u
    elif kind == "quadratic":
        grid = t_end + (t_start - t_end) * (1 - u) ** 2
    else:
        lam_start, lam_end = sde.lambda_(ends)
        if kind == "logsnr":
            lam = lam_start + (lam_end - lam_start) * u
        else:
            require(rho > 0, f"rho must be > 0, got {rho!r}")
            s_max, s_min = torch.exp(-lam_start) ** (1 / rho), torch.exp(-lam_end) ** (1 / rho)
            lam = -rho * torch.log(s_max + (s_min - s_max) * u)
        grid = sde.t_of_lambda(lam).to(torch.float64)
    grid[0], grid[-1] = t_start, t_end  # exact ends, free of round-off (in the inverse, in t)
    return grid


def focus_grid(sde: SDE, steps: int, sigma_data: float = 0.5, width: float = FOCUS_WIDTH,
               uniform_share: float = FOCUS_SHARE, t_start: Optional[float] = None,
               t_end: Optional[float] = None) -> torch.Tensor:
    r"""Decreasing float64 times ``t_0 = t_start > ... > t_steps = t_end`` (``steps + 1`` points)
    concentrated in log-SNR around the noise level ``sigma_data``.
    ``sample(..., grid="focus", sigma_data=...)`` uses it with the default width and share.

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
    check_steps(steps)
    require(sigma_data > 0 and math.isfinite(sigma_data), f"sigma_data must be > 0, got {sigma_data!r}")
    require(width > 0 and math.isfinite(width), f"width must be > 0, got {width!r}")
    require(0 <= uniform_share <= 1, f"uniform_share must lie in [0, 1], got {uniform_share!r}")
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.eps if t_end is None else float(t_end)
    require(0 < t_end < t_start <= sde.T,
            f"need 0 < t_end < t_start <= T={sde.T}, got t_start={t_start!r}, t_end={t_end!r}")
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    lam0, lam1 = sde.lambda_(ends).tolist()
    c = -math.log(sigma_data)
    phi = lambda lam: scipy.special.ndtr((lam - c) / width)  # noqa: E731
    p0, p1 = float(phi(lam0)), float(phi(lam1))
    bump_mass = p1 - p0
    share = uniform_share if bump_mass > 1e-12 else 1.0

    def cdf(lam: np.ndarray) -> np.ndarray:
        out = share * (lam - lam0) / (lam1 - lam0)
        if share < 1:
            out = out + (1 - share) * (phi(lam) - p0) / bump_mass
        return out

    # bisection on F (increasing), in NumPy: far cheaper than 80 rounds of small torch operations
    q = np.linspace(0.0, 1.0, steps + 1)
    lo = np.full_like(q, lam0)
    hi = np.full_like(q, lam1)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        below = cdf(mid) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    lam = torch.from_numpy(0.5 * (lo + hi))
    grid = sde.t_of_lambda(lam).to(torch.float64)
    grid[0], grid[-1] = t_start, t_end
    require(bool((grid[1:] < grid[:-1]).all()),
            "focus_grid: the grid is not strictly decreasing (too many steps for float64?)")
    return grid
