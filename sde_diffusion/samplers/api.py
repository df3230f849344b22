"""The one entry point: ``sample(model, sde, shape | x_T, solver=..., steps=...)``."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._checks import require
from ..models.wrapper import ScoreModel, as_model
from ..oracles import GaussianMixture
from ..sdes import SDE
from .base import (CHECK_EVERY, Correction, GeneratorLike, NoiseSource, SampleResult, SolverContext,
                   run_solver)
from .grids import GRIDS, check_steps, make_grid
from .registry import get_solver

__all__ = ["sample", "start_state", "custom_grid"]

GridLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


def sample(model: Union[ScoreModel, GaussianMixture], sde: Optional[SDE] = None,
           shape: Optional[Sequence[int]] = None, x_T: Optional[torch.Tensor] = None,
           solver: str = "euler_maruyama", steps: Optional[int] = None, *,
           nfe: Optional[int] = None, grid: Union[str, GridLike, None] = None,
           t_start: Optional[float] = None, t_end: Optional[float] = None, rho: float = 7.0,
           sigma_data: float = 0.5,
           generator: GeneratorLike = None, index_offset: int = 0, denoise: bool = False,
           dtype: torch.dtype = torch.float32, device: Union[str, torch.device, None] = None,
           progress: Optional[bool] = None, return_trajectory: bool = False,
           callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
           correct: Optional[Correction] = None, grad: bool = False,
           check_every: int = CHECK_EVERY, **options) -> SampleResult:
    """Draw samples by integrating the reverse process from ``t_start`` (T) down to ``t_end`` (eps).

    Args:
        model: a :class:`~sde_diffusion.models.ScoreModel` (any parameterization) or an oracle
            :class:`~sde_diffusion.oracles.GaussianMixture`.
        sde: the forward SDE; defaults to the model's.
        shape: ``(batch, ...)`` of the samples, when ``x_T`` is not given (then drawn from the prior).
        x_T: the starting state; its dtype and device are used throughout.
        solver: a registered solver name (see :func:`~sde_diffusion.samplers.available_solvers`).
        steps: number of grid intervals (default ``sde.N``; for an adaptive solver 1, the single
            interval ``[t_end, t_start]``: more intervals make it stop and report at every grid
            time); at most :data:`~sde_diffusion.samplers.grids.MAX_STEPS` (100000: more is
            refused up front as a mistake). Or give ``nfe``, a budget of network evaluations: the
            largest grid within it is used (with the solver's options, e.g. PC's corrector
            steps), or the solver's own plan for spending exactly ``nfe`` where it has one
            (``dpm_solver``: DPM-Solver-fast's orders per step).
        grid: ``uniform``, ``logsnr``, ``karras``, ``quadratic``, ``focus``, or a custom grid: a
            strictly decreasing tensor, NumPy array, list or tuple of times in ``(0, T]``, which
            sets the steps (a ``steps`` or ``nfe`` asking for another number of steps, or
            ``t_start``/``t_end``, is an error); default: the solver's own
            (``get_solver(name).grid``, its paper's choice).
        rho, sigma_data: shape of the ``karras`` and ``focus`` grids.
        generator: an int seed (default ``None``: torch's global generator), a
            ``torch.Generator``, or one generator per sample. With an int seed the noise of a
            sample -- in ``x_T`` and at every stochastic step -- depends only on the seed and the
            sample's index, not on the batch size: ``shape=(16, ...)`` starts with the samples of
            ``shape=(8, ...)``. A ``torch.Generator`` draws batch-level noise (a little faster,
            batch-size dependent). See :class:`~sde_diffusion.samplers.NoiseSource`.
        index_offset: with an int seed, the index of this batch's first sample in the whole
            seeded run: processes drawing ``shape=(n, ...)`` with offsets ``0, n, 2n, ...``
            together give the samples of one batch of the whole size.
        denoise: finish with one Tweedie step ``x <- E[x0 | x_eps]`` (score_sde's noise removal).
        progress: show a tqdm bar (default: only when stderr is a terminal).
        return_trajectory: keep the state after every step in ``result.trajectory``.
        callback: ``callback(step, t, x)`` after every step (after ``correct``).
        correct: ``correct(step, t, x) -> x``, applied after every step (grid interval for an
            adaptive solver), the last one included: the solver continues from the state it
            returns (a tensor of ``x``'s shape, dtype and device), and ``trajectory``,
            ``callback`` and the result see it. ``step`` counts from 1, ``t`` is the time the
            step reached. Constraints and guidance between steps (inpainting's known pixels,
            projections, DPM-Solver's ``correcting_xt_fn``) go here, without editing a solver.
            Multistep solvers keep their history of model outputs and continue from the
            corrected state (docs/samplers.md, "Corrections between steps").
        grad: build the autograd graph through the model and the solver (``torch.enable_grad``),
            for methods that differentiate the samples with respect to the network's parameters
            or ``x_T`` (memory then grows with the number of steps). Default ``False``: the solver
            runs under ``torch.no_grad()``, so no graph is kept whatever the network's
            ``requires_grad``, and the samples are ordinary tensors (not inference tensors:
            ``torch.inference_mode`` would forbid feeding them into a loss later). A
            ``correct`` that needs a gradient with respect to the state (DPS, classifier
            guidance) computes it locally under ``torch.enable_grad()``.
        check_every: how often the state's finiteness is read back (one GPU sync each): every
            step adds a cheap device flag, the flags are read every ``check_every`` steps (default
            16) and at the end, and a NaN/Inf raises :class:`NonFiniteError` naming the first step
            where it appeared and its time. ``1`` is strict: the error comes at that step, before
            ``correct``, ``callback`` or the trajectory see the state.
        **options: passed to the solver (e.g. ``eta`` for DDIM, ``order`` for DPM-Solver).
    """
    info = get_solver(solver)
    model = as_model(model, sde)
    sde = model.sde
    require(steps is None or nfe is None, "give steps or nfe, not both")
    info.check_options(options)
    times = None if grid is None or isinstance(grid, str) else custom_grid(grid, sde)
    planned = options
    if nfe is not None:
        steps, planned = info.for_nfe(int(nfe), **options)
    if times is not None:
        _check_grid_steps(info, times, steps, nfe, options)
        require(t_start is None and t_end is None,
                "t_start and t_end shape a named grid; a custom grid sets its own ends")
        steps = len(times) - 1
    elif steps is None:
        steps = 1 if info.adaptive else sde.N
    check_steps(steps)
    options = planned
    x_T, noise = start_state(sde, shape, x_T, generator, dtype, device, index_offset=index_offset)
    shape, dtype, device = tuple(x_T.shape), x_T.dtype, x_T.device
    if times is None:
        times = make_grid(sde, steps, info.grid if grid is None else grid, t_start, t_end, rho,
                          sigma_data)
    require(isinstance(grad, bool), f"grad must be True or False, got {grad!r}")
    ctx = SolverContext(model, sde, times, noise, dtype, device, shape[0])
    nfe_before = model.nfe
    with torch.enable_grad() if grad else torch.no_grad():
        x, trajectory = run_solver(info.name, info.fn, ctx, x_T, options, progress, callback,
                                   return_trajectory, adaptive=info.adaptive, correct=correct,
                                   two_way=info.two_way, check_every=check_every)
        if denoise:
            x = model.x0(x, ctx.t(ctx.steps))
    return SampleResult(samples=x, nfe=model.nfe - nfe_before, times=times, solver=info.name,
                        trajectory=trajectory)


def start_state(sde: SDE, shape: Optional[Sequence[int]], x_T: Optional[torch.Tensor],
                generator: GeneratorLike, dtype: torch.dtype,
                device: Union[str, torch.device, None], *,
                index_offset: int = 0) -> Tuple[torch.Tensor, NoiseSource]:
    """The starting state -- ``x_T`` as given, or drawn from the prior for ``shape`` -- and the
    noise source shaped like it. ``x_T`` fixes dtype and device; otherwise ``device`` defaults to
    the generator's (CPU without one)."""
    require((shape is None) != (x_T is None), "give exactly one of shape and x_T")
    if x_T is not None:
        require(isinstance(x_T, torch.Tensor) and x_T.is_floating_point() and x_T.ndim >= 1,
                "x_T must be a floating-point tensor of shape (batch, ...)")
        return x_T, NoiseSource(generator, x_T.shape, x_T.dtype, x_T.device, index_offset)
    shape = tuple(int(s) for s in shape)
    require(len(shape) >= 1 and all(s >= 1 for s in shape),
            f"shape must be (batch, ...) of positive sizes, got {shape}")
    if device is None:
        device = generator.device if isinstance(generator, torch.Generator) else "cpu"
    noise = NoiseSource(generator, shape, dtype, torch.device(device), index_offset)
    return noise.prior() * sde.prior_std, noise


def custom_grid(grid: GridLike, sde: SDE) -> torch.Tensor:
    """A user's grid -- a tensor, NumPy array, list or tuple of times -- as float64 CPU times,
    checked: one-dimensional, strictly decreasing, at least two, inside ``(0, T]``, at most
    ``MAX_STEPS`` intervals."""
    if isinstance(grid, torch.Tensor):
        times = grid.detach().to("cpu", torch.float64)
    else:
        require(isinstance(grid, (list, tuple, np.ndarray)),
                f"grid must be a grid name ({', '.join(GRIDS)}) or a decreasing sequence of times "
                f"(tensor, NumPy array, list or tuple), got {type(grid).__name__}")
        try:
            times = torch.as_tensor(np.asarray(grid, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ValueError(f"a custom grid must be a sequence of numbers: {err}") from None
    require(times.ndim == 1 or (times.ndim > 1 and times.numel() == max(times.shape)),
            f"a custom grid must be one-dimensional, got shape {tuple(times.shape)}")
    times = times.flatten()
    require(len(times) >= 2 and bool((times[1:] < times[:-1]).all()),
            "a custom grid must be a strictly decreasing sequence of at least two times")
    require(0 < float(times[-1]) and float(times[0]) <= sde.T,
            f"a custom grid must lie in (0, T={sde.T}], got [{float(times[-1])}, {float(times[0])}]")
    check_steps(len(times) - 1, f"a custom grid of {len(times)} times has {len(times) - 1} steps; steps")
    return times


def _check_grid_steps(info, times: torch.Tensor, steps: Optional[int], nfe: Optional[int],
                      options: dict) -> None:
    """A custom grid fixes the number of steps: a ``steps`` or ``nfe`` that asks for another is an
    error (it used to be ignored silently)."""
    n = len(times) - 1
    if nfe is not None and steps != n:
        cost = "" if info.adaptive else f" (on it {info.name!r} spends {info.cost(n, **options)} NFE)"
        raise ValueError(f"nfe={nfe} gives solver {info.name!r} a grid of {steps} steps, but the "
                         f"custom grid has {n} steps{cost}: leave nfe out, a custom grid sets the "
                         f"steps")
    require(steps is None or steps == n,
            f"steps={steps} disagrees with the custom grid, which has {n} steps ({n + 1} times): "
            f"leave steps out, a custom grid sets the steps")
