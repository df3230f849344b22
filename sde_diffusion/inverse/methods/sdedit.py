r"""SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations", Algorithm 1; the masked variant, Algorithm 3 / Sec. 4.3).

A guide ``x_g`` (default ``A^+ y``: the observation lifted to the data space; or any image the user
hands in through ``guide``) is diffused to an intermediate time ``t0``,

    x_{t0} = alpha_{t0} x_g + sigma_{t0} z,

and a registered solver (default the reverse SDE, Euler--Maruyama) integrates back from ``t0`` to
``eps``. ``t0`` trades faithfulness to the guide (small ``t0``) against realism (large ``t0``); the
paper uses ``t0`` in ``[0.3, 0.6]``. With ``keep_observed`` (the masked SDEdit), after every step
the row space of ``A`` is replaced by the observation diffused to the current time, as in
score_sde's inpainting, and set to ``A^+ y`` at the end. SDEdit does not sample the posterior: it
is an editing method, included as the baseline it is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..._checks import require
from ...samplers.api import sample
from ..registry import MethodResult, register_method
from ._common import method_noise, replace_row_space

__all__ = ["sdedit"]


@register_method("sdedit", needs=("pinv",), uses_solver=True)
def sdedit(model, operator, y, *, sigma_y, x_T, nfe, solver, generator, t0: float = 0.5,
           guide: Optional[torch.Tensor] = None, keep_observed: bool = True,
           solver_options: Optional[dict] = None) -> MethodResult:
    """SDEdit (Meng et al. 2022, Alg. 1/3): noise the guide to ``t0``, solve back; with
    ``keep_observed`` re-impose the diffused observation after every step."""
    sde = model.sde
    t0 = float(t0)
    require(math.isfinite(t0) and sde.eps < t0 <= sde.T, f"t0 must lie in (eps={sde.eps}, T={sde.T}], got {t0!r}")
    target = operator.pinv(y)
    if guide is None:
        guide = target
    else:
        require(isinstance(guide, torch.Tensor) and guide.shape[1:] == x_T.shape[1:]
                and guide.shape[0] in (1, x_T.shape[0]),
                f"guide must have shape (1 or batch={x_T.shape[0]}, {', '.join(map(str, x_T.shape[1:]))}), "
                f"got {tuple(guide.shape) if isinstance(guide, torch.Tensor) else type(guide).__name__}")
        guide = guide.to(device=x_T.device, dtype=x_T.dtype).expand_as(x_T)
    _, log_a, log_s = sde.log_scales(torch.tensor(t0, dtype=torch.float64))
    z = x_T / sde.prior_std                                     # the given starting noise, standardised
    x_t0 = float(log_a.exp()) * guide + float(log_s.exp()) * z
    noise = method_noise(generator, x_T.shape, x_T.dtype, x_T.device, "sdedit")

    def keep(step, t, x):
        _, la, ls = sde.log_scales(torch.tensor(float(t), dtype=torch.float64))
        return replace_row_space(operator, x, float(la.exp()) * target + float(ls.exp()) * noise.randn())

    solver = "euler_maruyama" if solver is None else solver
    out = sample(model, x_T=x_t0, solver=solver, nfe=nfe, t_start=t0, generator=generator,
                 correct=keep if keep_observed else None, **(solver_options or {}))
    x = replace_row_space(operator, out.samples, target) if keep_observed else out.samples
    return MethodResult(samples=x, nfe=out.nfe, info={"solver": solver, "t0": t0})
