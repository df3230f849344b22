r"""Time grids shared by every solver: ``steps + 1`` decreasing times from ``t_start`` (default T)
to ``t_end`` (default the SDE's eps).

- ``uniform``:   equal steps in t (score_sde).
- ``logsnr``:    equal steps in the half log-SNR ``lambda = log(alpha/sigma)`` (DPM-Solver, Lu et al.
                 2022, Sec. 3.3 recommends it for low NFE).
- ``karras``:    EDM's rho-spacing of the noise level ``sigma/alpha = e^{-lambda}`` (Karras et al.
                 2022, eq. 5), ``rho=7`` by default.
- ``quadratic``: ``t_i = t_end + (t_start - t_end)(1 - i/steps)^2``, dense near the data (DDIM,
                 Song, Meng & Ermon 2021, App. D.2).

Grids are float64 and live on the CPU: solvers read their coefficients as Python floats.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import require
from ..sdes import SDE

__all__ = ["GRIDS", "make_grid"]

GRIDS = ("uniform", "logsnr", "karras", "quadratic")


def make_grid(sde: SDE, steps: int, kind: str = "uniform", t_start: Optional[float] = None,
              t_end: Optional[float] = None, rho: float = 7.0) -> torch.Tensor:
    """Decreasing float64 times ``t_0 = t_start > ... > t_steps = t_end`` (``steps + 1`` points)."""
    require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
            f"steps must be an integer >= 1, got {steps!r}")
    require(kind in GRIDS, f"unknown time grid {kind!r}; valid grids: {', '.join(GRIDS)}")
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.eps if t_end is None else float(t_end)
    require(0 < t_end < t_start <= sde.T,
            f"need 0 < t_end < t_start <= T={sde.T}, got t_start={t_start!r}, t_end={t_end!r}")
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    if kind == "uniform":
        grid = t_start + (t_end - t_start) * u
    elif kind == "quadratic":
        grid = t_end + (t_start - t_end) * (1 - u) ** 2
    else:
        lam_start, lam_end = sde._log_alpha(ends) - sde._log_sigma(ends)
        if kind == "logsnr":
            lam = lam_start + (lam_end - lam_start) * u
        else:
            require(rho > 0, f"rho must be > 0, got {rho!r}")
            s_max, s_min = torch.exp(-lam_start) ** (1 / rho), torch.exp(-lam_end) ** (1 / rho)
            lam = -rho * torch.log(s_max + (s_min - s_max) * u)
        grid = sde.t_of_lambda(lam).to(torch.float64)
    grid[0], grid[-1] = t_start, t_end  # exact ends, free of round-off (in the inverse, in t)
    return grid
