"""What every solver shares: the context it runs in (model, SDE, time grid with its alpha, sigma and
log-SNR, the noise source) and the loop that drives it (progress bar, callback, trajectory, NaN
detection with the step and time, NFE accounting)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch

from .._checks import all_finite, require
from ..models.wrapper import NonFiniteError, ScoreModel
from ..sdes import SDE

__all__ = ["NoiseSource", "SolverContext", "SampleResult", "GeneratorLike"]

GeneratorLike = Union[None, int, torch.Generator, Sequence[torch.Generator]]


class NoiseSource:
    """Standard normal draws shaped like the state.

    ``generator`` may be ``None`` (global RNG), an ``int`` seed, one ``torch.Generator`` for the
    batch, or one generator per sample: then every sample's noise depends on its own generator
    only, so a sample is the same whatever batch it is drawn in.
    """

    def __init__(self, generator: GeneratorLike, shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator(device=self.device).manual_seed(generator)
        if isinstance(generator, (list, tuple)):
            require(len(generator) == self.shape[0],
                    f"got {len(generator)} per-sample generators for a batch of {self.shape[0]}")
            require(all(isinstance(g, torch.Generator) for g in generator),
                    "per-sample generators must all be torch.Generator instances")
        else:
            require(generator is None or isinstance(generator, torch.Generator),
                    f"generator must be None, an int seed, a torch.Generator or a list of them, "
                    f"got {type(generator).__name__}")
        self.generator = generator

    def randn(self) -> torch.Tensor:
        g = self.generator
        if isinstance(g, (list, tuple)):
            return torch.stack([self._draw(self.shape[1:], gi) for gi in g])
        return self._draw(self.shape, g)

    def _draw(self, shape, g: Optional[torch.Generator]) -> torch.Tensor:
        if g is None or g.device == self.device:
            return torch.randn(shape, generator=g, dtype=self.dtype, device=self.device)
        return torch.randn(shape, generator=g, dtype=self.dtype, device=g.device).to(self.device)


@dataclass
class SolverContext:
    """Everything a solver needs. ``times[i]`` runs from ``t_start`` (i = 0) down to ``t_end``;
    ``alphas``, ``sigmas``, ``lambdas`` are the SDE's views on that grid (float64, CPU)."""

    model: ScoreModel
    sde: SDE
    times: torch.Tensor
    noise: NoiseSource
    dtype: torch.dtype
    device: torch.device
    batch: int
    alphas: torch.Tensor = field(init=False)
    sigmas: torch.Tensor = field(init=False)
    lambdas: torch.Tensor = field(init=False)

    def __post_init__(self):
        log_a, log_s = self.sde._log_alpha(self.times), self.sde._log_sigma(self.times)
        self.alphas, self.sigmas, self.lambdas = log_a.exp(), log_s.exp(), log_a - log_s
        self._vec_cache = {}

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def t(self, i: int) -> torch.Tensor:
        """Grid time ``times[i]`` as a ``(batch,)`` tensor in the state's dtype and device. The
        two most recent are kept (a step asks for ``t(i)`` and ``t(i + 1)``), nothing more: the
        memory does not grow with the number of steps."""
        vec = self._vec_cache.get(i)
        if vec is None:
            vec = torch.full((self.batch,), float(self.times[i]), dtype=self.dtype,
                             device=self.device)
            if len(self._vec_cache) >= 2:
                self._vec_cache.pop(next(iter(self._vec_cache)))
            self._vec_cache[i] = vec
        return vec

    def vec(self, t: float) -> torch.Tensor:
        """Any time ``t`` as a ``(batch,)`` tensor (for intermediate stages)."""
        return torch.full((self.batch,), float(t), dtype=self.dtype, device=self.device)


@dataclass
class SampleResult:
    """Samples and what happened while drawing them."""

    samples: torch.Tensor
    nfe: int
    times: torch.Tensor
    solver: str
    trajectory: Optional[torch.Tensor] = None  # (steps_taken + 1, batch, ...) incl. the start


def _show_progress(progress: Optional[bool]) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


def _interval(i: int, n: int) -> str:
    return f", grid interval {i} of {n}" if n > 1 else ""


def run_solver(name: str, fn: Callable, ctx: SolverContext, x: torch.Tensor, options: dict,
               progress: Optional[bool] = None,
               callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
               return_trajectory: bool = False, adaptive: bool = False) -> tuple:
    """Drive the solver generator ``fn(ctx, x, **options)``; returns ``(x, trajectory)``.

    A NaN/Inf raises :class:`NonFiniteError` naming the step (grid interval) and the time. For an
    ``adaptive`` solver, which yields once per grid interval and chooses its own steps inside it,
    the message names the time of the failing network call and the interval being integrated,
    not a step count (``err.step`` is the interval's number)."""
    trajectory: Optional[List[torch.Tensor]] = [x] if return_trajectory else None
    bar = None
    if _show_progress(progress):
        from tqdm.auto import tqdm
        bar = tqdm(total=ctx.steps, desc=name, leave=False)
    step = 0
    steps: Iterator[torch.Tensor] = fn(ctx, x, **options)
    try:
        while True:
            t_now = float(ctx.times[min(step, ctx.steps)])
            try:
                x = next(steps)
            except StopIteration:
                break
            except NonFiniteError as err:
                if adaptive:
                    raise NonFiniteError(f"{name} (adaptive step size, integrating from "
                                         f"t={t_now:.6g} to t={float(ctx.times[step + 1]):.6g}"
                                         f"{_interval(step + 1, ctx.steps)}): {err}",
                                         t=err.t, step=step + 1) from None
                raise NonFiniteError(f"{name}: step {step + 1} of {ctx.steps} (from t={t_now:.6g}): "
                                     f"{err}", t=err.t, step=step + 1) from None
            step += 1
            t_after = float(ctx.times[min(step, ctx.steps)])
            if not all_finite(x):
                if adaptive:
                    raise NonFiniteError(f"{name} (adaptive step size): the state became NaN/Inf "
                                         f"integrating from t={t_now:.6g} to t={t_after:.6g}"
                                         f"{_interval(step, ctx.steps)}", t=t_after, step=step)
                raise NonFiniteError(f"{name}: the state became NaN/Inf at step {step} of "
                                     f"{ctx.steps} (t={t_after:.6g})", t=t_after, step=step)
            if trajectory is not None:
                trajectory.append(x)
            if callback is not None:
                callback(step, t_after, x)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return x, (torch.stack(trajectory) if trajectory is not None else None)
