r"""RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic
Models", Algorithm 1 and Sec. 4.2's jump schedule), for every SDE and any operator with a
pseudo-inverse.

Each reverse step ``t_i -> t_{i+1}`` combines (Alg. 1, lines 5-8)

    known    = alpha_{i+1} A^+ y + sigma_{i+1} z                      (the observation diffused)
    unknown  ~ q(x_{i+1} | x_i, x0 = E[x0 | x_i])                      (DDPM's ancestral step)
    x_{i+1}  = unknown - A^+A unknown + A^+A known

(for a mask ``A^+A`` keeps the observed pixels: ``m * known + (1 - m) * unknown``). To let the
unknown part harmonise with the known one, the chain jumps back: after reaching grid index
``i = steps - m * jump_length`` (``m = 0, 1, ...``, ``i > jump_length`` steps in), it is re-noised
``jump_length`` steps forward through the forward transition ``x_{t'} = (alpha_{t'}/alpha_t) x_t
+ sigma_{t'|t} z`` (Alg. 1, line 10) and denoised again; ``resample`` passes in all, i.e.
``resample - 1`` jumps at each such point (the paper's ``j = 10``, ``r = 10`` on 250 steps). A
budget of ``nfe`` evaluations buys the largest grid whose schedule costs at most ``nfe``. The
observation noise ``sigma_y`` is ignored.
"""
from __future__ import annotations

from typing import List, Optional

from ..._checks import require
from ...samplers.grids import GRIDS, MAX_STEPS, make_grid
from ..registry import MethodResult, register_method
from ._common import forward_jump, method_noise, posterior_step, replace_row_space, scales

__all__ = ["repaint", "repaint_schedule", "schedule_cost", "steps_within"]


def repaint_schedule(steps: int, jump_length: int, resample: int,
                     interval: Optional[int] = None) -> List[int]:
    """The grid indices RePaint visits, from 0 (``t = T``) to ``steps`` (``t = eps``): one more
    index is a reverse step, one less a forward jump (Lugmayr et al. 2022, Sec. 4.2). Jumps of
    ``jump_length`` steps, ``resample - 1`` of them, start at grid indices ``steps - m * interval``
    (``m = 0, 1, ...``) above ``jump_length``; ``interval`` defaults to ``jump_length`` (RePaint's
    schedule; DDNM's time travel, Wang et al. 2023, Sec. 3.3, lets it differ)."""
    interval = jump_length if interval is None else interval
    jumps = {steps - m: resample - 1 for m in range(0, steps - jump_length, interval)}
    i, path = 0, [0]
    while i < steps:
        i += 1
        path.append(i)
        if jumps.get(i, 0) > 0:
            jumps[i] -= 1
            for _ in range(jump_length):
                i -= 1
                path.append(i)
    return path


def schedule_cost(steps: int, jump_length: int, resample: int, interval: Optional[int] = None) -> int:
    """Network calls of :func:`repaint_schedule` (its reverse steps)."""
    interval = jump_length if interval is None else interval
    n_points = len(range(0, steps - jump_length, interval))
    return steps + (resample - 1) * jump_length * n_points


def steps_within(nfe: int, jump_length: int, resample: int, interval: Optional[int] = None) -> int:
    """The largest grid (number of steps, at least 1) whose schedule costs at most ``nfe`` calls."""
    lo, hi = 1, min(nfe, MAX_STEPS)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if schedule_cost(mid, jump_length, resample, interval) <= nfe:
            lo = mid
        else:
            hi = mid - 1
    return lo


@register_method("repaint", needs=("pinv",))
def repaint(model, operator, y, *, sigma_y, x_T, nfe, solver, generator,
            jump_length: int = 10, resample: int = 10, grid: str = "uniform") -> MethodResult:
    """RePaint (Lugmayr et al. 2022, Alg. 1): replace the known part by the diffused observation
    at every step, and jump back ``jump_length`` steps ``resample - 1`` times at regular points."""
    for name, v in (("jump_length", jump_length), ("resample", resample)):
        require(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                f"{name} must be an integer >= 1, got {v!r}")
    require(grid in GRIDS, f"unknown grid {grid!r}; valid grids: {', '.join(GRIDS)}")
    require(nfe >= 1, f"nfe must be >= 1, got {nfe}")
    steps = steps_within(nfe, jump_length, resample)
    path = repaint_schedule(steps, jump_length, resample)
    times = make_grid(model.sde, steps, grid)
    alphas, sigmas = scales(model.sde, times)
    target = operator.pinv(y)
    noise = method_noise(generator, x_T.shape, x_T.dtype, x_T.device, "repaint")
    x = x_T
    for i, j in zip(path[:-1], path[1:]):
        if j == i + 1:
            x0 = model.x0(x, times[i].item())
            unknown = posterior_step(x, x0, alphas[i], sigmas[i], alphas[j], sigmas[j], noise.randn())
            known = alphas[j] * target + sigmas[j] * noise.randn()
            x = replace_row_space(operator, unknown, known)
        else:
            x = forward_jump(x, alphas[i], sigmas[i], alphas[j], sigmas[j], noise.randn())
    x = replace_row_space(operator, x, target)
    reverse = sum(1 for i, j in zip(path[:-1], path[1:]) if j == i + 1)
    return MethodResult(samples=x, nfe=reverse, info={"steps": steps, "reverse_steps": reverse})
