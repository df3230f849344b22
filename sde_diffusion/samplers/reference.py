r"""The exact flow map of the probability-flow ODE, as a tight-tolerance reference for solver tests
and benchmarks.

The probability-flow ODE ([SDE] Song et al. 2021, eq. 13), ``dx/dt = f(t) x - 1/2 g(t)^2 s(x, t)``,
is rewritten in the half log-SNR ``lambda = log(alpha/sigma)`` and the scaled state ``y = x/alpha``
(as in DPM-Solver, Lu et al. 2022, eq. 3.4 / DPM-Solver++ eq. 4): with ``f = d log alpha/dt`` and
``g^2 = -2 sigma^2 d lambda/dt`` it becomes

.. math:: \frac{dy}{d\lambda} = \hat x_0(\alpha y, t(\lambda)) - y ,

whose Jacobian has eigenvalues in ``[-1, 0]`` for a Gaussian-mixture oracle at every noise level:
not stiff, so a high-order explicit solver reaches round-off-level accuracy with few steps. It is
integrated in float64 with scipy's ``DOP853`` at ``rtol = atol = 1e-10`` (per component) by default.
The map is the same as the one in ``t`` (a change of variable), only better conditioned. The field
(:class:`~sde_diffusion.flow.LogSNRFlowField`) and the scipy integrator are those of
:mod:`sde_diffusion.flow`, which the ODE samplers and the likelihood use too.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .._checks import require
from ..flow import LogSNRFlowField, check_integration, integrate
from ..models.wrapper import ScoreModel, as_model
from ..oracles import GaussianMixture
from ..sdes import SDE

__all__ = ["exact_flow_map", "mixture_at"]


def exact_flow_map(model: Union[ScoreModel, GaussianMixture], x_T: torch.Tensor,
                   t_start: Optional[float] = None, t_end: Optional[float] = None,
                   rtol: float = 1e-10, atol: float = 1e-10, *, sde: Optional[SDE] = None,
                   method: str = "DOP853", per_sample: bool = False,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Push ``x_T`` at ``t_start`` (default T) along the probability-flow ODE to ``t_end``
    (default the SDE's eps) with scipy ``solve_ivp``; returns a tensor like ``x_T`` (its shape,
    dtype and device).

    Args:
        model: a :class:`~sde_diffusion.models.ScoreModel` (any parameterization) or an oracle
            :class:`~sde_diffusion.oracles.GaussianMixture` (with an SDE, or pass ``sde``).
        x_T: ``(batch, ...)`` starting states.
        rtol, atol: scipy tolerances on ``y = x/alpha`` (per component of the flattened system).
        method: the ``solve_ivp`` method (``DOP853``: explicit order 8).
        per_sample: ``False`` (default): the whole batch is one ODE system (one call to scipy,
            fast; scipy's error norm is the RMS over all components). ``True``: one scipy call per
            sample, each with its own step sizes (slower; a sample's result then does not depend
            on its batch companions at all).
        dtype: the dtype the model is evaluated in (float64 unless the network requires another).

    The model's NFE counter is left as it was: the reference does not count as sampling work.
    """
    model = as_model(model, sde)
    sde = model.sde
    require(isinstance(x_T, torch.Tensor) and x_T.is_floating_point() and x_T.ndim >= 1,
            "x_T must be a floating-point tensor of shape (batch, ...)")
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.eps if t_end is None else float(t_end)
    require(0 < t_end < t_start <= sde.T,
            f"need 0 < t_end < t_start <= T={sde.T}, got t_start={t_start!r}, t_end={t_end!r}")
    method, rtol, atol = check_integration("scipy", method, rtol, atol, per_sample)

    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    log_a = sde.log_alpha(ends)
    lam = log_a - sde.log_sigma(ends)
    # integrate y = x / alpha in float64 on the host; the model is evaluated in ``dtype``
    y = x_T.detach().to("cpu", dtype).to(torch.float64) / float(log_a[0].exp())
    field = LogSNRFlowField(model, t_end, t_start, dtype)
    nfe_before = model.nfe
    try:
        y_end, _, _ = integrate(field, y, float(lam[0]), float(lam[1]), solver="scipy",
                                method=method, rtol=rtol, atol=atol, per_sample=per_sample)
    finally:
        model.nfe = nfe_before
    out = y_end * float(log_a[1].exp())
    return out.to(device=x_T.device, dtype=x_T.dtype)


def mixture_at(mixture: GaussianMixture, t: float, sde: Optional[SDE] = None) -> GaussianMixture:
    """The law ``p_t`` of an oracle mixture as a mixture of its own (components ``N(alpha m_k,
    alpha^2 s_k^2 + sigma^2)``, no SDE attached): what a sampler stopping at ``t`` should
    reproduce, e.g. for :func:`sde_diffusion.metrics.mode_statistics` at ``t = eps``."""
    sde = mixture.sde if sde is None else sde
    require(sde is not None, "mixture_at needs an SDE: pass sde=... or a mixture that has one")
    t64 = torch.tensor([float(t)], dtype=torch.float64)
    a, s = float(sde.log_alpha(t64).exp()), float(sde.log_sigma(t64).exp())
    return GaussianMixture(mixture.weights, a * mixture.means, torch.sqrt(a * a * mixture.stds ** 2 + s * s))
