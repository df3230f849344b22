r"""score_sde's inpainting and colorization (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", App. I.2, Algorithms "inpainting"/"colorization";
their ``controllable_generation.py``), for any operator with a pseudo-inverse.

After every step of a registered solver at time ``t`` (default: score_sde's predictor-corrector,
reverse diffusion + Langevin), the state's known part is replaced by the observation diffused to
``t`` through the forward marginal:

    x_t  <-  x_t - A^+A x_t + A^+A (alpha_t A^+ y + sigma_t z),      z ~ N(0, I) fresh each step

For a mask, ``A^+A`` keeps the observed pixels: this is score_sde's inpainting. For
:class:`~sde_diffusion.inverse.Colorization`, ``A^+A`` is the grey axis of the orthogonal colour
transform: score_sde's colorization (they replace the decoupled grey channel). At the end the known
part is set to ``A^+ y`` exactly. The replacement runs once per grid step of the solver (for
``pc``: after predictor and corrector); score_sde also re-noises between the two.

The unknown part starts from the prior ``x_T`` -- NOT, as score_sde's inpainter does, from
``mask * data + (1 - mask) * noise`` at ``t = T``, which puts clean data in the known part of a state
whose other part is at noise level ``sigma_T``. (The replacement fixes the known part after the
first step either way.) The observation noise ``sigma_y`` is ignored (the method treats ``y`` as
exact); the method is not exact for the posterior even at infinite NFE, because the re-noised known
part is drawn independently of the unknown one.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...samplers.api import sample
from ..registry import MethodResult, register_method
from ._common import method_noise, replace_row_space

__all__ = ["score_sde_inpaint"]


@register_method("score_sde", needs=("pinv",), uses_solver=True)
def score_sde_inpaint(model, operator, y, *, sigma_y, x_T, nfe, solver, generator,
                      solver_options: Optional[dict] = None, grid: Optional[str] = None) -> MethodResult:
    """score_sde's predictor-corrector inpainting/colorization: re-noise the known part to ``t``
    after every step (Song et al. 2021, App. I.2)."""
    solver = "pc" if solver is None else solver
    target = operator.pinv(y)
    noise = method_noise(generator, x_T.shape, x_T.dtype, x_T.device, "score_sde")
    sde = model.sde

    def correct(step, t, x):
        _, log_a, log_s = sde.log_scales(torch.tensor(float(t), dtype=torch.float64))
        a, s = float(log_a.exp()), float(log_s.exp())
        return replace_row_space(operator, x, a * target + s * noise.randn())

    out = sample(model, x_T=x_T, solver=solver, nfe=nfe, grid=grid, generator=generator,
                 correct=correct, **(solver_options or {}))
    x = replace_row_space(operator, out.samples, target)
    return MethodResult(samples=x, nfe=out.nfe, info={"solver": solver, "steps": len(out.times) - 1})
