r"""DDNM and DDNM+ (Wang, Yu & Zhang 2023, "Zero-Shot Image Restoration Using Denoising Diffusion
Null-Space Model"), for every SDE through alpha and sigma.

**DDNM** (noiseless, Sec. 3.2, eq. 13): the data prediction is made consistent with ``y`` by keeping
its null-space part and taking the range-space part from ``y``:

    x0|t  <-  A^+ y + (I - A^+A) x0|t  =  x0|t - A^+(A x0|t - y)

and the sampler steps from the corrected prediction. Here that is a model wrapper
(:class:`RangeNullSpaceModel`: ``eps`` and ``score`` follow from the corrected ``x0``), so any
registered solver runs it; the default is DDIM with ``eta = 0.85``, the paper's choice.

**DDNM+** (noisy, Sec. 3.3, eqs. 17-19): in the SVD basis of ``A`` (``A^+`` has ``1/s_i``), the
correction of coordinate ``i`` is scaled by ``lambda_i`` and the step's fresh noise by ``gamma_i``,
so that the noise ``y`` carries in does not exceed the noise the step would add:

    x0|t  <-  x0|t - V diag(lambda) (U^T (A x0|t - y)) / s
    lambda_i = 1 if c >= a sigma_y / s_i else c s_i / (a sigma_y),    gamma_i^2 = c^2 - (a lambda_i sigma_y / s_i)^2

where ``x_s = a x0 + b x_t + c z`` is the step ``t -> s`` (DDPM's posterior for ``eta = 1``: ``a``
its coefficient of ``x0``, ``c`` its standard deviation); null-space coordinates keep ``c``. With
``sigma_y = 0`` DDNM+ is DDNM with this ancestral step.

**Time travel** (Sec. 3.3, Alg. 2; options ``travel_length`` ``l``, ``travel_repeat`` ``r``,
``travel_interval`` ``s``, all 0 = off): after every ``s``-th step (counted from the end) the state is
re-noised ``l`` steps back through the forward transition ``x_{t'} = (alpha_{t'}/alpha_t) x_t +
sigma_{t'|t} z`` and those steps are redone, ``r`` times; the schedule is RePaint's
(:func:`.repaint.repaint_schedule` with ``r + 1`` passes and the interval ``s``), and so is the
budget: ``nfe`` buys the largest grid whose schedule costs at most ``nfe`` network calls.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..._checks import require
from ...models.wrapper import ScoreModel
from ...samplers.api import sample
from ...samplers.ddim import check_eta
from ...samplers.grids import GRIDS, make_grid
from ..registry import MethodResult, register_method
from ...samplers.registry import get_solver
from ._common import DataPredictionModel, forward_jump, method_noise, scales
from .repaint import repaint_schedule, steps_within

__all__ = ["RangeNullSpaceModel", "ddnm", "ddnm_plus"]


class RangeNullSpaceModel(DataPredictionModel):
    """``inner`` with its data prediction projected onto ``{x : A x = y}`` (DDNM's eq. 13):
    ``x0 <- x0 - A^+(A x0 - y)``; ``eps = (x - alpha x0)/sigma`` and ``score = -eps/sigma`` follow.
    Network evaluations are counted by ``inner`` (``nfe`` reads its counter)."""

    def __init__(self, inner: ScoreModel, operator, y: torch.Tensor):
        super().__init__(inner)
        self.operator, self.y = operator, y

    def data_prediction(self, x, t, alpha, sigma, **kwargs):
        x0 = self.inner_x0(x, t, alpha, sigma, **kwargs)
        return x0 - self.operator.pinv(self.operator.A(x0) - self.y)


def _check_travel(length, repeat, interval) -> bool:
    """Validate the time-travel options; True when time travel is on."""
    for name, v in (("travel_length", length), ("travel_repeat", repeat), ("travel_interval", interval)):
        require(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                f"{name} must be an integer >= 0 (0: off), got {v!r}")
    require((length > 0) == (repeat > 0), f"time travel needs both travel_length and travel_repeat "
                                          f"> 0 (0 and 0: off), got {length} and {repeat}")
    require(length > 0 or interval == 0, f"travel_interval {interval} needs travel_length and "
                                         f"travel_repeat > 0")
    return length > 0


def _travel_plan(nfe: int, length: int, repeat: int, interval: int):
    """``(steps, path)``: the largest grid whose time-travel schedule costs at most ``nfe`` calls
    and the grid indices it visits (RePaint's schedule, ``repeat + 1`` passes; without travel
    ``nfe`` steps straight down)."""
    if length == 0:
        return nfe, list(range(nfe + 1))
    interval = interval or length
    steps = steps_within(nfe, length, repeat + 1, interval)
    return steps, repaint_schedule(steps, length, repeat + 1, interval)


def _ddnm_loop(model, operator, y, sigma_y: float, x_T, times, path, eta: float, noise):
    """DDNM+'s chain along ``path`` (grid indices of ``times``): one index up is the step of
    eqs. 17-19 with the range-space correction, one index down a draw of the forward transition
    ``x_{t'} | x_t`` (time travel). Returns ``(samples, network calls)``."""
    svd = operator.svd()
    B = x_T.shape[0]
    sv = svd.singular_values.to(device=x_T.device, dtype=torch.float64)
    k = sv.shape[0]
    pos = sv > 0
    inv_s = torch.where(pos, 1 / torch.where(pos, sv, torch.ones_like(sv)), torch.zeros_like(sv))
    alphas, sigmas = scales(model.sde, times)
    yf = y.reshape(B, -1)
    x, calls = x_T, 0
    for i, j in zip(path[:-1], path[1:]):
        if j == i - 1:                                                  # time travel: re-noise
            x = forward_jump(x, alphas[i], sigmas[i], alphas[j], sigmas[j], noise.randn())
            continue
        a_t, s_t, a_s, s_s = alphas[i], sigmas[i], alphas[j], sigmas[j]
        r = a_t / a_s
        c = eta * (s_s / s_t) * math.sqrt(max(s_t * s_t - r * r * s_s * s_s, 0.0))
        b = math.sqrt(max(s_s * s_s - c * c, 0.0)) / s_t          # x_s = coef x0 + b x_t + c z
        coef = a_s - b * a_t
        x0 = model.x0(x, times[i].item())
        calls += 1
        resid = svd.Ut(operator.A(x0).reshape(B, -1) - yf)[:, :k]
        if sigma_y > 0 and coef > 0:
            room = c * sv / (coef * sigma_y)                          # c s_i / (a sigma_y)
            lam = torch.where(pos, room.clamp(max=1.0), torch.zeros_like(sv))
            gam2 = (c * c - (coef * lam * sigma_y * inv_s) ** 2).clamp_min(0.0)
        else:
            lam, gam2 = pos.to(torch.float64), torch.full_like(sv, c * c)
        spec = torch.zeros(B, x0[0].numel(), dtype=x.dtype, device=x.device)
        spec[:, :k] = resid * (lam * inv_s).to(x.dtype)
        x0 = x0 - svd.V(spec).reshape(x0.shape)
        std = torch.full((x0[0].numel(),), c, dtype=torch.float64, device=x.device)
        std[:k] = gam2.sqrt()
        z = svd.V(noise.randn().reshape(B, -1) * std.to(x.dtype)).reshape(x.shape)
        x = coef * x0 + b * x + z
    return x, calls


@register_method("ddnm", needs=("pinv",), uses_solver=True)
def ddnm(model, operator, y, *, sigma_y, x_T, nfe, solver, generator,
         solver_options: Optional[dict] = None, grid: Optional[str] = None,
         travel_length: int = 0, travel_repeat: int = 0, travel_interval: int = 0) -> MethodResult:
    """DDNM (Wang et al. 2023, eq. 13): range-null-space projection of the data prediction, with
    any solver (default DDIM, ``eta = 0.85``); ``y`` taken as noiseless. Time travel (Sec. 3.3;
    ``travel_length`` steps back, ``travel_repeat`` times, every ``travel_interval`` steps)
    runs DDIM's step (``solver`` ``None`` or ``"ddim"``, option ``eta`` only)."""
    opts = dict(solver_options or {})
    if _check_travel(travel_length, travel_repeat, travel_interval):
        require(solver in (None, "ddim"), f"time travel runs DDIM's step: solver {solver!r} cannot "
                                          f"travel (give solver=None or 'ddim')")
        require(set(opts) <= {"eta"}, f"time travel takes only the solver option eta, got "
                                      f"{', '.join(sorted(opts))}")
        eta = check_eta(opts.get("eta", 0.85))
        grid = grid or get_solver("ddim").grid or "uniform"
        require(grid in GRIDS, f"unknown grid {grid!r}; valid grids: {', '.join(GRIDS)}")
        steps, path = _travel_plan(nfe, travel_length, travel_repeat, travel_interval)
        noise = method_noise(generator, x_T.shape, x_T.dtype, x_T.device, "ddnm")
        x, calls = _ddnm_loop(model, operator, y, 0.0, x_T, make_grid(model.sde, steps, grid), path,
                              eta, noise)
        x = x - operator.row_space(x) + operator.pinv(y)
        return MethodResult(samples=x, nfe=calls, info={"solver": "ddim", "steps": steps,
                                                         "reverse_steps": calls})
    if solver is None:
        solver = "ddim"
        opts.setdefault("eta", 0.85)
    wrapped = RangeNullSpaceModel(model, operator, y)
    out = sample(wrapped, x_T=x_T, solver=solver, nfe=nfe, grid=grid, generator=generator, **opts)
    x = out.samples - operator.row_space(out.samples) + operator.pinv(y)
    return MethodResult(samples=x, nfe=out.nfe, info={"solver": solver, "steps": len(out.times) - 1})


@register_method("ddnm_plus", needs=("svd",))
def ddnm_plus(model, operator, y, *, sigma_y, x_T, nfe, solver, generator,
              eta: float = 1.0, grid: str = "uniform", travel_length: int = 0,
              travel_repeat: int = 0, travel_interval: int = 0) -> MethodResult:
    """DDNM+ (Wang et al. 2023, eqs. 17-19): the noisy-case scaling of the range-space correction
    and of the step noise in the SVD basis of ``A``; one network call per step. Time travel
    (Sec. 3.3, Alg. 2): every ``travel_interval`` steps (default ``travel_length``) jump back
    ``travel_length`` steps through the forward transition and redo them, ``travel_repeat`` times;
    ``nfe`` buys the largest grid whose schedule fits (``result.info["steps"]``)."""
    eta = check_eta(eta)
    require(grid in GRIDS, f"unknown grid {grid!r}; valid grids: {', '.join(GRIDS)}")
    _check_travel(travel_length, travel_repeat, travel_interval)
    steps, path = _travel_plan(nfe, travel_length, travel_repeat, travel_interval)
    noise = method_noise(generator, x_T.shape, x_T.dtype, x_T.device, "ddnm_plus")
    x, calls = _ddnm_loop(model, operator, y, float(sigma_y), x_T, make_grid(model.sde, steps, grid),
                          path, eta, noise)
    return MethodResult(samples=x, nfe=calls, info={"steps": steps, "reverse_steps": calls})
