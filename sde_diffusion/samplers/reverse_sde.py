r"""Solvers of the reverse-time SDE ([SDE] = Song et al. 2021, eq. 6)

.. math:: dx = [f(t)x - g(t)^2\nabla\log p_t(x)]\,dt + g(t)\,d\bar w .

Each step draws fresh noise; every solver here targets ``p_{t_end}`` (noise is added in the last
step too). Use ``sample(..., denoise=True)`` for score_sde's final denoising.
"""
from __future__ import annotations

import math

from .._checks import expand_to
from .base import SolverContext
from .registry import register


@register("euler_maruyama", stochastic=True, order=0.5,
          summary="Euler–Maruyama on the reverse SDE (strong order 1/2)")
def euler_maruyama(ctx: SolverContext, x):
    """Euler–Maruyama: ``x <- x - [f x - g^2 s] h + g sqrt(h) z`` with ``h = t - t' > 0``
    ([SDE] App. F / score_sde's ``EulerMaruyamaPredictor``)."""
    for i in range(ctx.steps):
        t = ctx.t(i)
        h = float(ctx.times[i] - ctx.times[i + 1])
        f, g2 = ctx.sde._f_g2(t)
        drift = expand_to(f, x) * x - expand_to(g2, x) * ctx.model.score(x, t)
        x = x - drift * h + expand_to(g2.sqrt(), x) * math.sqrt(h) * ctx.noise.randn()
        yield x
