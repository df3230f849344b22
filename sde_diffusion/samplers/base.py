"""What every solver shares: the context it runs in (model, SDE, time grid with its alpha, sigma and
log-SNR, the noise source), the generator of a one-step solver (:func:`stepping`) and the two-way
loop that drives every solver (corrections between steps, progress bar, callback, trajectory, NaN
detection with the step and time). The update formulas shared by the exponential integrators
live in :mod:`._exp_integrator`."""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Generator, List, Optional, Sequence, Tuple, Union

import torch

from .._checks import all_finite, require
from ..models.wrapper import (NonFiniteError, ScoreModel, deferred_finite_checks, linear_in_view,
                              native_view)
from ..sdes import SDE

__all__ = ["NoiseSource", "SolverContext", "SampleResult", "GeneratorLike", "Correction", "chunk_size",
           "NOISE_CHUNK_ELEMENTS", "NOISE_MAX_CHUNK", "CHECK_EVERY", "run_solver", "stepping",
           "native_view", "linear_in_view"]   # the last two re-exported from models.wrapper

GeneratorLike = Union[None, int, torch.Generator, Sequence[torch.Generator]]


#: An integer seed draws noise in chunks of consecutive sample indices; a chunk holds
#: ``2 ** floor(log2(NOISE_CHUNK_ELEMENTS / event_numel))`` samples, between 1 and
#: ``NOISE_MAX_CHUNK``: 256 samples of a low-dimensional event, 64 of a 3x32x32 image, 1 of a
#: 3x256x256 one. Part of the reproducibility contract of a seed: changing either constant changes
#: every seeded sample.
NOISE_CHUNK_ELEMENTS = 2 ** 18
NOISE_MAX_CHUNK = 256
_PRIOR, _STEPS = 0, 1        # the two noise streams of a seed: x_T, and the solver's steps


def chunk_size(event_shape: Sequence[int]) -> int:
    """Samples per noise chunk of an integer seed for events of ``event_shape`` (see
    :data:`NOISE_CHUNK_ELEMENTS`)."""
    numel = 1
    for n in event_shape:
        numel *= int(n)
    size = 1
    while size < NOISE_MAX_CHUNK and 2 * size * numel <= NOISE_CHUNK_ELEMENTS:
        size *= 2
    return size


def _stream_base(seed: int, stream: int) -> int:
    """A 64-bit number derived from ``(seed, stream)`` (BLAKE2b): chunk ``c`` of the stream is
    seeded with ``base + c``, so the chunks of one stream never share a seed (CPU generators use
    the low 32 bits of a seed, and those differ too)."""
    digest = hashlib.blake2b(f"sde_diffusion.noise/{seed}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class NoiseSource:
    """Standard normal draws shaped like the state, ``(batch, *event)``.

    ``generator`` may be

    - an ``int`` seed: *indexed* noise. The noise of sample ``i`` (its index in the whole run,
      ``index_offset + position in the batch``) at every draw depends only on the seed, ``i`` and
      the draw's number, not on the batch size: a batch of 16 starts with the samples of a batch
      of 8, and processes that draw disjoint index ranges (``index_offset``) of one seed together
      draw the samples of one big batch. The sample indices are cut into chunks of
      :func:`chunk_size` samples; chunk ``c`` of a seed has its own ``torch.Generator`` (seeded
      from the seed and ``c``), and draw ``k`` of a chunk is the ``k``-th draw of shape
      ``(chunk, *event)`` from it; a batch draws the chunks it overlaps and keeps its rows. The
      starting state ``x_T`` and the solver's steps use two separate streams, so a solver's noise
      is the same whether ``x_T`` was drawn from the seed or given. Noise depends on the device
      type and dtype, as torch's generators do.
    - one ``torch.Generator``: *batch-level* noise, one ``randn`` of the whole batch per draw (the
      fastest; what k-diffusion does); a sample's noise depends on the batch size.
    - one generator per sample: every sample's noise depends on its own generator only.
    - ``None``: torch's global generator, batch-level.
    """

    def __init__(self, generator: GeneratorLike, shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device, index_offset: int = 0):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        require(isinstance(index_offset, int) and not isinstance(index_offset, bool)
                and index_offset >= 0, f"index_offset must be an integer >= 0, got {index_offset!r}")
        self.seed: Optional[int] = None
        if isinstance(generator, int) and not isinstance(generator, bool):
            require(-2 ** 63 <= generator < 2 ** 64,
                    f"an integer seed must lie in [-2**63, 2**64), got {generator}")
            self.seed, generator = generator, None
            self.chunk = chunk_size(self.shape[1:])
            self._chunks = {}          # chunk index -> its generator of the steps' stream
            self._scratch: Optional[torch.Tensor] = None
        else:
            require(index_offset == 0, f"index_offset={index_offset} needs an integer seed "
                                       f"(generator=<int>): with "
                                       f"{'no seed' if generator is None else type(generator).__name__} "
                                       f"the noise does not follow sample indices")
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
        self.index_offset = index_offset

    def prior(self) -> torch.Tensor:
        """The draw for the starting state (the prior's standard normal ``z``)."""
        if self.seed is not None:
            return self._indexed({}, _PRIOR)
        return self.randn()

    def randn(self) -> torch.Tensor:
        """The next draw of the solver's noise."""
        if self.seed is not None:
            return self._indexed(self._chunks, _STEPS)
        g = self.generator
        if isinstance(g, (list, tuple)):
            return torch.stack([self._draw(self.shape[1:], gi) for gi in g])
        return self._draw(self.shape, g)

    def _draw(self, shape, g: Optional[torch.Generator]) -> torch.Tensor:
        if g is None or g.device == self.device:
            return torch.randn(shape, generator=g, dtype=self.dtype, device=self.device)
        return torch.randn(shape, generator=g, dtype=self.dtype, device=g.device).to(self.device)

    def _indexed(self, generators: dict, stream: int) -> torch.Tensor:
        """One draw of indexed noise: every chunk the batch overlaps advances by one
        ``(chunk, *event)`` draw; whole chunks are drawn in place, the partial ones at the ends
        into a scratch chunk whose rows are copied."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        size, first = self.chunk, self.index_offset
        end = first + self.shape[0]
        base = None
        for c in range(first // size, (end - 1) // size + 1):
            g = generators.get(c)
            if g is None:
                if base is None:
                    base = _stream_base(self.seed, stream)
                g = torch.Generator(device=self.device).manual_seed((base + c) % 2 ** 64)
                generators[c] = g
            lo, hi = max(c * size, first), min((c + 1) * size, end)
            if hi - lo == size:
                out[lo - first:hi - first].normal_(generator=g)
            else:
                if self._scratch is None:
                    self._scratch = torch.empty((size,) + self.shape[1:], dtype=self.dtype,
                                                device=self.device)
                self._scratch.normal_(generator=g)
                out[lo - first:hi - first].copy_(self._scratch[lo - c * size:hi - c * size])
        return out


@dataclass
class SolverContext:
    """Everything a solver needs. ``times[i]`` runs from ``t_start`` (i = 0) down to ``t_end``;
    ``alphas``, ``sigmas``, ``lambdas`` are the SDE's views on that grid (float64, CPU), and
    :meth:`drift` gives ``f`` and ``g^2`` there. Solvers read the SDE through these (computed once
    per run, through its public checked views), not per step.

    ``analytic_first``: the model's views at the grid's first time ``t_0`` are those of the prior
    instead of a network call -- ``x0 = 0``, ``eps = x / sigma_0``, ``score = -x / sigma_0^2``,
    exact as ``alpha_0 / sigma_0 -> 0`` for data of mean zero -- the *analytical first step* of
    Zhou, Chen, Wang & Chen 2024 ("Fast ODE-based sampling for diffusion models in around 5
    steps", CVPR): it saves one network evaluation. ``analytic_calls`` counts its uses."""

    model: ScoreModel
    sde: SDE
    times: torch.Tensor
    noise: NoiseSource
    dtype: torch.dtype
    device: torch.device
    batch: int
    analytic_first: bool = False
    analytic_calls: int = field(default=0, init=False)
    alphas: torch.Tensor = field(init=False)
    sigmas: torch.Tensor = field(init=False)
    lambdas: torch.Tensor = field(init=False)

    def __post_init__(self):
        _, log_a, log_s = self.sde.log_scales(self.times)
        self.alphas, self.sigmas, self.lambdas = log_a.exp(), log_s.exp(), log_a - log_s
        self.time_list: List[float] = self.times.tolist()
        self._scales = list(zip(self.alphas.tolist(), self.sigmas.tolist()))
        self._lambdas = self.lambdas.tolist()
        self._vec_cache = {}
        self._drift: Optional[Tuple[List[float], List[float]]] = None

    def drift(self, i: int) -> Tuple[float, float]:
        """``(f(t_i), g(t_i)^2)`` of the SDE ``dx = f x dt + g dw`` at grid time ``t_i`` (float64;
        the whole grid's values are computed at the first call)."""
        if self._drift is None:
            f, g2 = self.sde.f_g2(self.times)
            self._drift = f.tolist(), g2.tolist()
        return self._drift[0][i], self._drift[1][i]

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def t(self, i: int) -> torch.Tensor:
        """Grid time ``times[i]`` as a ``(batch,)`` tensor in the state's dtype and device. The
        two most recent are kept (a step asks for ``t(i)`` and ``t(i + 1)``), nothing more: the
        memory does not grow with the number of steps."""
        vec = self._vec_cache.get(i)
        if vec is None:
            vec = torch.full((self.batch,), self.time_list[i], dtype=self.dtype,
                             device=self.device)
            if len(self._vec_cache) >= 2:
                self._vec_cache.pop(next(iter(self._vec_cache)))
            self._vec_cache[i] = vec
        return vec

    def scales(self, i: int) -> Tuple[float, float, float]:
        """``(alpha, sigma, lambda)`` at grid time ``t_i`` as Python floats (``float(ctx.alphas[i])``
        and so on, read from lists made once per run)."""
        a, s = self._scales[i]
        return a, s, self._lambdas[i]

    def off_grid(self, times: Sequence[float], drift: bool = False) -> List[Tuple[float, ...]]:
        """``(t, alpha, sigma)`` -- with ``drift``, ``(t, alpha, sigma, f, g^2)`` -- at times off
        the grid (a solver's intermediate stages), as Python floats from one checked, vectorised
        call of the SDE's views (float64), made before the first step; the stage is then
        evaluated with ``model.at_scales(view, x, ctx.vec(t), alpha, sigma)``, without a check
        or a recomputation per call."""
        tt = torch.tensor([float(t) for t in times], dtype=torch.float64)
        if tt.numel() == 0:
            return []
        tt, log_a, log_s = self.sde.log_scales(tt)
        cols = [tt.tolist(), log_a.exp().tolist(), log_s.exp().tolist()]
        if drift:
            cols += [v.tolist() for v in self.sde.f_g2(tt)]
        return list(zip(*cols))

    def view(self, view: str, i: int, x: torch.Tensor) -> torch.Tensor:
        """The view ``view`` (``eps``, ``x0`` or ``score``) of the model at grid time ``t_i``
        (see :meth:`eps`)."""
        if i == 0 and self.analytic_first:
            return self._prior_view(view, x)
        return self.model.at_scales(view, x, self.t(i), *self._scales[i])

    def eps(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """``model.eps(x, t_i)`` at grid time ``t_i``, with the grid's alpha and sigma (the grid
        was checked once; see :meth:`ScoreModel.at_scales`)."""
        return self.view("eps", i, x)

    def x0(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """``model.x0(x, t_i)`` at grid time ``t_i`` (see :meth:`eps`)."""
        return self.view("x0", i, x)

    def score(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """``model.score(x, t_i)`` at grid time ``t_i`` (see :meth:`eps`)."""
        return self.view("score", i, x)

    def _prior_view(self, view: str, x: torch.Tensor) -> torch.Tensor:
        """The views at ``t_0`` under ``analytic_first`` (see the class docstring)."""
        self.analytic_calls += 1
        if view == "x0":
            return torch.zeros_like(x)
        s = self._scales[0][1]
        return x / s if view == "eps" else x / (-s * s)

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


Correction = Callable[[int, float, torch.Tensor], torch.Tensor]


def stepping(ctx: SolverContext, x: torch.Tensor, advance: Callable[[int, torch.Tensor], torch.Tensor]
             ) -> Generator[torch.Tensor, torch.Tensor, None]:
    """The generator of a one-step solver: ``advance(i, x)`` takes the state from ``t_i`` to
    ``t_{i+1}``; after each step the generator yields the new state and continues from the one it
    is sent back (two-way: a correction replaces it)."""
    for i in range(ctx.steps):
        x = yield advance(i, x)


#: Default of ``sample(..., check_every=...)``: the state's finiteness flags are read every this
#: many steps (and at the end); 1 checks after every step.
CHECK_EVERY = 16


def run_solver(name: str, fn: Callable, ctx: SolverContext, x: torch.Tensor, options: dict,
               progress: Optional[bool] = None,
               callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
               return_trajectory: bool = False, adaptive: bool = False,
               correct: Optional[Correction] = None, two_way: bool = True,
               check_every: int = CHECK_EVERY) -> tuple:
    """Drive the solver generator ``fn(ctx, x, **options)``; returns ``(x, trajectory)``.

    The protocol is two-way: after every step the state the solver yielded goes through
    ``correct(step, t, x)`` (when given) and is sent back; a two-way solver (``x = yield x``)
    continues from what it is sent. ``two_way=False`` (a solver registered without it) refuses a
    ``correct`` up front, so that a correction is never dropped silently. The trajectory and the
    callback see the state after the correction.

    A NaN/Inf raises :class:`NonFiniteError` naming the step (grid interval) and the time. For an
    ``adaptive`` solver, which yields once per grid interval and chooses its own steps inside it,
    the message names the time of the failing network call and the interval being integrated,
    not a step count (``err.step`` is the interval's number).

    The state is checked cheaply: every step adds one device flag, ``isfinite(sum(x))`` in the
    state's dtype (NaN/Inf propagate into the sum; a finite state whose sum overflows, entries
    near ``finfo.max / numel``, counts as diverged), and the flags are
    read together every ``check_every`` steps and at the end -- one host read (a GPU sync) per
    ``check_every`` steps. The error still names the first step whose state was NaN/Inf, and a
    network error at a later step (fed the NaN state) is reported as that earlier step.
    ``check_every=1`` reads the flag after every step (strict: the error comes at the step
    itself, before ``correct``, the callback or the trajectory see the state); with more, they
    may see the NaN states of the steps since the last check.

    The model's own check of every output (``ScoreModel(check_finite=True)``: a reduction and a
    host read per network call) is deferred to these flags for a fixed-step solver with
    ``check_every > 1`` (:func:`~sde_diffusion.models.wrapper.deferred_finite_checks`, around
    the solver's own steps; ``correct`` and the callback keep the checks): a NaN/Inf output makes
    that step's state NaN/Inf, and the error names the step. With ``check_every=1``,
    and for an ``adaptive`` solver (whose step-size control cannot handle a NaN), every output is
    checked, and the error names the time of the failing call."""
    require(isinstance(check_every, int) and not isinstance(check_every, bool) and check_every >= 1,
            f"check_every must be an integer >= 1 (1: check the state after every step), "
            f"got {check_every!r}")
    require(correct is None or callable(correct),
            f"correct must be a callable correct(step, t, x) -> x, got {type(correct).__name__}")
    require(correct is None or two_way,
            f"solver {name!r} is not two-way (registered without two_way=True): it would ignore "
            f"the corrected states, so it cannot take correct=...; its generator must continue "
            f"from what each yield returns (x = yield x)")
    trajectory: Optional[List[torch.Tensor]] = [x] if return_trajectory else None
    bar = None
    if _show_progress(progress):
        from tqdm.auto import tqdm
        bar = tqdm(total=ctx.steps, desc=name, leave=False)
    step = 0
    steps: Generator[torch.Tensor, Optional[torch.Tensor], None] = fn(ctx, x, **options)
    sent: Optional[torch.Tensor] = None
    flags: List[torch.Tensor] = []      # isfinite(sum(state)) of the steps since the last check
    first = step + 1                    # the step of flags[0]

    def check() -> None:
        """Read the pending flags; raise naming the first step whose state was not finite."""
        if not flags:
            return
        ok = torch.stack(flags).tolist() if len(flags) > 1 else [bool(flags[0])]
        flags.clear()
        if all(ok):
            return
        bad = first + ok.index(False)
        t_bad = times[min(bad, ctx.steps)]
        if adaptive:
            raise NonFiniteError(f"{name} (adaptive step size): the state became NaN/Inf "
                                 f"integrating from t={times[bad - 1]:.6g} to "
                                 f"t={t_bad:.6g}{_interval(bad, ctx.steps)}", t=t_bad, step=bad)
        raise NonFiniteError(f"{name}: the state became NaN/Inf at step {bad} of "
                             f"{ctx.steps} (t={t_bad:.6g})", t=t_bad, step=bad)

    times = ctx.time_list
    # the solver's own model calls only: correct() and the callback keep the models' checks
    defer = deferred_finite_checks(check_every > 1 and not adaptive)
    try:
        while True:
            t_now = times[min(step, ctx.steps)]
            try:
                with defer:
                    x = steps.send(sent)
            except StopIteration:
                break
            except NonFiniteError as err:
                check()                 # a NaN state of an earlier step made this call fail
                if adaptive:
                    raise NonFiniteError(f"{name} (adaptive step size, integrating from "
                                         f"t={t_now:.6g} to t={times[step + 1]:.6g}"
                                         f"{_interval(step + 1, ctx.steps)}): {err}",
                                         t=err.t, step=step + 1) from None
                raise NonFiniteError(f"{name}: step {step + 1} of {ctx.steps} (from t={t_now:.6g}): "
                                     f"{err}", t=err.t, step=step + 1) from None
            step += 1
            t_after = times[min(step, ctx.steps)]
            if not flags:
                first = step
            flags.append(torch.isfinite(x.sum()))
            if len(flags) >= check_every:
                check()
            if correct is not None:
                try:
                    x = _corrected(correct, step, t_after, x, ctx.steps)
                except NonFiniteError:
                    check()             # it was handed a NaN state: name the step that made it
                    raise
            if trajectory is not None:
                trajectory.append(x)
            if callback is not None:
                callback(step, t_after, x)
            if bar is not None:
                bar.update(1)
            sent = x
        check()
    finally:
        if bar is not None:
            bar.close()
    return x, (torch.stack(trajectory) if trajectory is not None else None)


def _corrected(correct: Correction, step: int, t: float, x: torch.Tensor, steps: int) -> torch.Tensor:
    """``correct(step, t, x)``, checked: a finite tensor of ``x``'s shape, dtype and device."""
    out = correct(step, t, x)
    require(isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype
            and out.device == x.device,
            f"correct(step, t, x) must return a tensor of x's shape {tuple(x.shape)}, dtype "
            f"{x.dtype} and device {x.device}; at step {step} (t={t:.6g}) it returned "
            + (f"shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}"
               if isinstance(out, torch.Tensor) else type(out).__name__))
    if not all_finite(out):
        raise NonFiniteError(f"correct(step, t, x) returned NaN/Inf at step {step} of {steps} "
                             f"(t={t:.6g})", t=t, step=step)
    return out
