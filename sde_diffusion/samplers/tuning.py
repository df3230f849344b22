r"""A time grid optimized for one model, one solver and one budget, from pilot trajectories.

At 10-20 NFE the error of a good solver is set mostly by *where* its few steps go, and the best
place depends on the data: a fixed rule (log-SNR uniform, Karras' rho, our ``focus`` grid) is a
guess. :func:`optimize_grid` measures instead. It draws a pilot batch from the prior, integrates it
once with an accurate *teacher* (by default UniPC-3 on a fine log-SNR grid: the model's own
probability-flow ODE, no exact answer needed), and then moves the interior grid points to minimise
the RMS distance between the solver's end states and the teacher's on that batch:

.. math:: \min_{\lambda_1 < \dots < \lambda_{N-1}}\;
          \Big(\frac{1}{BD}\sum_{b} \lVert \Phi^{\text{solver}}_{\lambda_0..\lambda_N}(x_T^{(b)})
          - \Phi^{\text{teacher}}(x_T^{(b)})\rVert^2\Big)^{1/2}.

The points move in log-SNR: either every increment freely, with consecutive increments within a
factor ``max_ratio`` of each other (default 2: variable-step multistep methods need bounded step
ratios, and jagged grids that fit the pilot send rare trajectories astray elsewhere), or as the
quantiles of a smooth density with a few ``knots``. Any parameter vector gives a valid grid with the
original ends, and Nelder-Mead searches it from the solver's usual grid. A quarter of the pilot is
held out: among the grids the search passes through, the one with the lowest error there is
returned (early stopping). Fitting a schedule to the same model's own trajectories follows "Align
Your Steps" (Sabour, Fidler & Kreis 2024) and "On the Trajectory Regularity of ODE-based
Diffusion Sampling" (Chen et al. 2024, steps chosen by dynamic programming on a teacher
trajectory); here the objective is the solver's global error itself, so the multistep history and
the growth of early errors are accounted for exactly.

Cost and caveats. Each objective evaluation runs the solver on the pilot batch (``nfe`` network
calls on ``B`` samples); a search takes up to 150 evaluations per parameter. The result is a plain
tensor of times, made once per (model, SDE, solver, budget) and reused for any number of samples:
pass it as ``sample(..., grid=result.times)``. The pilot noise must be independent of the noise you
evaluate on. Rare events need a pilot large enough to contain them: on a 64-D, 8-mode mixture about
0.4% of trajectories at 10 NFE end in the wrong mode and dominate the RMS error, so a pilot of a
few thousand samples is needed there (docs/samplers.md, "Optimized grids").
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .._checks import require
from .._files import dumps_json, write_json
from ..models.wrapper import NonFiniteError, ScoreModel, as_model
from ..oracles import GaussianMixture
from ..sdes import SDE, sde_from_dict
from .api import custom_grid, sample, start_state
from .base import GeneratorLike, _show_progress
from .grids import make_grid
from .registry import get_solver

__all__ = ["optimize_grid", "OptimizedGrid"]


@dataclass
class OptimizedGrid:
    """What :func:`optimize_grid` found. ``times`` is the grid to pass to ``sample(grid=...)``."""

    times: torch.Tensor                 # (steps + 1,) float64, decreasing, same ends as the start grid
    solver: str
    options: dict
    nfe: int                            # network evaluations per sample with this grid
    initial_error: float                # RMS error against the teacher on the fitting part, start grid
    pilot_error: float                  # ... on the returned grid
    initial_validation_error: float     # RMS error on the held-out part of the pilot, start grid
    validation_error: float             # ... on the returned grid (NaN without validation)
    teacher_error: float                # estimate of the teacher's own error (fine vs half as fine)
    evaluations: int                    # objective evaluations (solver runs on the fitting part)
    candidates: int                     # grids compared on the validation part (the start included)
    model_calls: int                    # network calls spent in total (teacher + search), each on the pilot batch
    pilot_size: int
    validation_size: int
    initial_times: torch.Tensor = field(repr=False)  # the starting grid
    sde: Optional[SDE] = field(default=None, repr=False)   # the SDE it was fitted under
    start_grid: str = "custom"          # the starting grid's name ("custom" for a tensor)
    legacy_sde: Optional[str] = field(default=None, repr=False)  # a file's SDE before format dicts

    # ---- the grid file: plain JSON (nothing in it is executed), see docs/cli.md ----------------
    def effective_options(self) -> dict:
        """The options with the solver's defaults filled in, as plain JSON values, so that two
        spellings of one configuration (``unipc`` and ``unipc:order=2``) compare equal."""
        return effective_options(self.solver, self.options)

    def save(self, path) -> str:
        """Write the grid file (format :data:`GRID_FORMAT`, atomically) that :meth:`load` and
        ``sde-diffusion sample --grid FILE.json`` read."""
        record = {"format": GRID_FORMAT, "solver": self.solver, "options": self.options,
                  "nfe": self.nfe, "times": self.times.to(torch.float64).tolist(),
                  "initial_times": self.initial_times.to(torch.float64).tolist(),
                  "start_grid": self.start_grid,
                  "sde": _sde_record(self.sde) if self.sde is not None else self.legacy_sde,
                  **{name: getattr(self, name) for name in _REPORTED}}
        return write_json(path, record)

    @classmethod
    def load(cls, path) -> "OptimizedGrid":
        """Read a grid file written by :meth:`save`, checked as far as it can be without a model:
        format, solver, options, times (at least two finite numbers, decreasing). The times
        against a model's SDE: :meth:`times_for`. Errors are ``ValueError`` naming the file
        (``FileNotFoundError`` for a missing one)."""
        where = repr(str(path))
        try:
            with open(path, encoding="utf-8") as fh:
                saved = json.load(fh)
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{where} is not a JSON file: {err}") from None
        if not isinstance(saved, dict) or saved.get("format") != GRID_FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"{where} is not a grid file: its format is {found!r}, expected "
                             f"{GRID_FORMAT!r} (written by optimize_grid / 'sde-diffusion "
                             f"optimize-grid')")
        solver, options = saved.get("solver"), saved.get("options", {})
        require(isinstance(solver, str) and isinstance(options, dict),
                f"{where}: 'solver' must be a solver name and 'options' an object")
        try:
            get_solver(solver)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        times = _file_times(saved.get("times"), where, "times")
        initial = _file_times(saved.get("initial_times", saved["times"]), where, "initial_times")
        raw_sde = saved.get("sde")
        sde, legacy = (sde_from_dict(raw_sde), None) if isinstance(raw_sde, dict) else (None, raw_sde)
        numbers = {name: saved.get(name, math.nan) for name in _REPORTED}
        for name in ("evaluations", "candidates", "model_calls", "pilot_size", "validation_size"):
            numbers[name] = int(numbers[name]) if isinstance(numbers[name], (int, float)) \
                and math.isfinite(numbers[name]) else 0
        numbers = {k: (math.nan if v is None else v) for k, v in numbers.items()}
        nfe = saved.get("nfe")
        return cls(times=times, solver=solver, options=options,
                   nfe=int(nfe) if isinstance(nfe, int) else get_solver(solver).cost(len(times) - 1,
                                                                                  **options),
                   initial_times=initial, sde=sde, start_grid=str(saved.get("start_grid", "custom")),
                   legacy_sde=legacy if isinstance(legacy, str) else None, **numbers)

    def times_for(self, sde: SDE) -> torch.Tensor:
        """The times, checked against the model's ``sde``: strictly decreasing inside ``(0, T]``
        (the check ``sample`` makes of any custom grid) and fitted under an equal SDE."""
        times = custom_grid(self.times, sde)
        if self.sde is not None:
            require(self.sde == sde, f"the grid was fitted under {self.sde!r}, but the model's "
                                     f"SDE is {sde!r}")
        elif self.legacy_sde is not None:
            require(self.legacy_sde == repr(sde), f"the grid was fitted under {self.legacy_sde}, "
                                                  f"but the model's SDE is {sde!r}")
        return times


#: the format tag of grid files (:meth:`OptimizedGrid.save`)
GRID_FORMAT = "sde_diffusion.grid/1"
_REPORTED = ("initial_error", "pilot_error", "initial_validation_error", "validation_error",
             "teacher_error", "evaluations", "candidates", "model_calls", "pilot_size",
             "validation_size")


def effective_options(solver: str, options: dict) -> dict:
    """``options`` with ``solver``'s defaults filled in, as plain JSON values."""
    return json.loads(dumps_json({**get_solver(solver).defaults(), **options}, default=str))


def _sde_record(sde: SDE):
    """The SDE as its name and parameters; an SDE without a name in ``SDE_NAMES`` (a user's own
    class) as its ``repr``, compared by ``repr`` when the file is read."""
    try:
        return sde.to_dict()
    except ValueError:
        return repr(sde)


def _file_times(values, where: str, key: str) -> torch.Tensor:
    require(isinstance(values, list) and len(values) >= 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            and all(math.isfinite(v) for v in values),
            f"{where}: {key!r} must be a list of at least two finite numbers")
    return torch.tensor(values, dtype=torch.float64)


def optimize_grid(model: Union[ScoreModel, GaussianMixture], sde: Optional[SDE] = None,
                  solver: str = "unipc", steps: Optional[int] = None, *, nfe: Optional[int] = None,
                  shape: Optional[Sequence[int]] = None, x_T: Optional[torch.Tensor] = None,
                  generator: GeneratorLike = 0, grid: Union[str, torch.Tensor, None] = None,
                  sigma_data: float = 0.5, t_start: Optional[float] = None,
                  t_end: Optional[float] = None, teacher_solver: str = "unipc",
                  teacher_steps: int = 200, teacher_options: Optional[dict] = None,
                  knots: Optional[int] = None, max_evals: Optional[int] = None,
                  validation: float = 0.25, max_ratio: Optional[float] = 2.0,
                  dtype: torch.dtype = torch.float32,
                  device: Union[str, torch.device, None] = None, progress: Optional[bool] = None,
                  **options) -> OptimizedGrid:
    """Optimize the interior points of ``solver``'s time grid for ``model`` at a fixed budget.

    Args:
        model, sde: as for :func:`~sde_diffusion.samplers.sample`.
        solver: a deterministic, fixed-step registered solver; ``options`` are its options
            (e.g. ``order=3`` for ``unipc``), used both in the search and when you sample.
        steps / nfe: the grid size, or the NFE budget it is derived from (as in ``sample``).
        shape / x_T: the pilot batch ``(B, ...)`` drawn from the prior with ``generator`` (default
            seed 0), or the pilot starting states themselves. Use noise independent of the noise
            you will evaluate on; see the module docstring for the pilot size.
        grid: the starting grid (name or tensor; default the solver's own), which also fixes the
            two ends; ``sigma_data``, ``t_start``, ``t_end`` shape it as in ``sample``.
        teacher_solver, teacher_steps, teacher_options: the accurate solver whose end states are
            the target (default UniPC order 3 on a log-SNR grid of 200 steps); its own error is
            estimated by rerunning it on half as many steps and reported as ``teacher_error``.
        knots: ``None`` (default) moves every interior point freely; an integer ``K >= 2`` instead
            shapes the grid by a smooth log-SNR density with ``K`` parameters (cheaper, less gain).
        max_ratio: bound on the ratio of consecutive log-SNR steps, ``1/max_ratio <= h_{i+1}/h_i
            <= max_ratio`` (free points only). Variable-step multistep methods are only stable for
            bounded step ratios, and a jagged grid that fits the pilot can send rare trajectories
            to another mode (default 2; on the benchmark mixture an unconstrained fit of
            DPM-Solver++(3M) at 20 NFE tripled the error on fresh noise, the bounded one did not);
            ``None`` leaves the steps unconstrained.
        max_evals: objective evaluations allowed to Nelder-Mead (default 150 per parameter:
            ``150 * steps``, or ``150 * knots``).
        validation: the share of the pilot held out (default a quarter). The search fits the
            rest; every grid on its way that improved the fit by 2% or more, and the start, are
            then compared on the held-out part and the best one there is returned (early
            stopping: with rare, large errors a grid can fit the pilot and do worse elsewhere).
            The start grid is returned when nothing beats it there. ``0`` returns the best fit.
        dtype, device: of the pilot batch drawn from ``shape``.
        progress: ``None`` (default): a tqdm bar over the evaluations when stderr is a terminal,
            otherwise (logs, CI) a line on stderr every 10 s with the evaluations done, the time
            elapsed and an estimate of the time left; ``True``: a bar; ``False``: nothing.

    Returns:
        an :class:`OptimizedGrid`; ``result.times`` goes to ``sample(..., grid=result.times)``
        with the same solver and options.
    """
    from scipy.optimize import minimize

    info = get_solver(solver)
    steps = check_grid_request(solver, steps, nfe, **options)
    model = as_model(model, sde)
    sde = model.sde
    require(isinstance(teacher_steps, int) and teacher_steps >= 2 * steps,
            f"teacher_steps must be an integer >= 2 * steps = {2 * steps}, got {teacher_steps!r}")
    require(0 <= validation < 1, f"validation must lie in [0, 1), got {validation!r}")
    require(max_ratio is None or max_ratio > 1, f"max_ratio must be > 1 or None, got {max_ratio!r}")
    require(max_evals is None or (isinstance(max_evals, int) and max_evals >= 1),
            f"max_evals must be a positive integer, got {max_evals!r}")
    x_T, _ = start_state(sde, shape, x_T, generator, dtype, device)

    if isinstance(grid, torch.Tensor):
        start = custom_grid(grid, sde)
        require(len(start) == steps + 1, f"the starting grid has {len(start) - 1} steps, but "
                                         f"steps={steps}")
    else:
        start = make_grid(sde, steps, info.grid if grid is None else grid, t_start, t_end,
                          sigma_data=sigma_data)
    lam_start = sde.lambda_(start)
    t0, t1 = float(start[0]), float(start[-1])

    calls_before = model.nfe
    teacher_options = {"order": 3} if teacher_options is None and teacher_solver == "unipc" \
        else dict(teacher_options or {})

    def teacher(n: int) -> torch.Tensor:
        with torch.no_grad():
            return sample(model, sde, x_T=x_T, solver=teacher_solver, steps=n, grid="logsnr",
                          t_start=t0, t_end=t1, progress=False, **teacher_options).samples

    target = teacher(teacher_steps)
    teacher_error = _rms(teacher(teacher_steps // 2), target)

    if knots is None:
        lam_of, z0 = _free_points(lam_start.numpy(), max_ratio)
    else:
        lam_of, z0 = _smooth_density(lam_start.numpy(), knots)

    def times_of(z: np.ndarray) -> Optional[torch.Tensor]:
        times = sde.t_of_lambda(torch.from_numpy(lam_of(z))).to(torch.float64)
        times[0], times[-1] = t0, t1
        return times if bool((times[1:] < times[:-1]).all()) else None

    n_val = int(round(validation * x_T.shape[0]))
    require(validation == 0 or 1 <= n_val < x_T.shape[0],
            f"validation={validation!r} leaves no fitting or no validation sample of a pilot of "
            f"{x_T.shape[0]}")
    n_fit = x_T.shape[0] - n_val

    def error_on(times: Optional[torch.Tensor], part: slice) -> float:
        if times is None:
            return math.inf
        try:
            with torch.no_grad():
                out = sample(model, sde, x_T=x_T[part], solver=solver, grid=times, progress=False,
                             **options).samples
        except NonFiniteError:
            return math.inf
        err = _rms(out, target[part])
        return err if math.isfinite(err) else math.inf

    fit, val = slice(0, n_fit), slice(n_fit, None)
    budget = max_evals or 150 * len(z0)
    bar = _bar(progress, budget)
    evaluations = 0
    initial = error_on(start, fit)
    require(math.isfinite(initial), "the solver fails on the starting grid (NaN/Inf)")
    candidates = [(initial, start)]  # the start, then every new best that is 2% better than the last

    def objective(z: np.ndarray) -> float:
        nonlocal evaluations
        evaluations += 1
        if bar is not None:
            bar.update(1)
        times = times_of(z)
        err = error_on(times, fit)
        if err < 0.98 * candidates[-1][0]:
            candidates.append((err, times))
        return err

    try:
        # the first simplex moves each parameter by 0.5 (scipy's default, 5% of a parameter's
        # value, is nothing for parameters at 0: a uniform grid's ratios)
        simplex = np.vstack([z0, z0 + 0.5 * np.eye(len(z0))])
        found = minimize(objective, z0, method="Nelder-Mead",
                         options=dict(maxfev=budget, xatol=1e-3, fatol=1e-4 * initial, adaptive=True,
                                      initial_simplex=simplex))
    finally:
        if bar is not None:
            bar.close()
    if found.fun < candidates[-1][0]:
        candidates.append((float(found.fun), times_of(found.x)))
    if n_val:  # early stopping: the candidate that does best on the held-out part of the pilot
        checked = [(error_on(times, val), err, times) for err, times in candidates]
        best_val, best_fit, best_times = min(checked, key=lambda c: c[0])
        initial_val = checked[0][0]
    else:
        best_fit, best_times = candidates[-1]
        best_val = initial_val = math.nan
    return OptimizedGrid(times=best_times, solver=solver, options=dict(options),
                         nfe=info.cost(steps, **options), initial_error=initial, pilot_error=best_fit,
                         initial_validation_error=initial_val, validation_error=best_val,
                         teacher_error=teacher_error, evaluations=evaluations,
                         candidates=len(candidates), model_calls=model.nfe - calls_before,
                         pilot_size=x_T.shape[0], validation_size=n_val, initial_times=start,
                         sde=sde, start_grid="custom" if isinstance(grid, torch.Tensor)
                         else (info.grid if grid is None else str(grid)))


def check_grid_request(solver: str, steps: Optional[int] = None, nfe: Optional[int] = None,
                       **options) -> int:
    """Check what :func:`optimize_grid` is asked to fit before any work (the command line calls it
    before loading a model): a registered, deterministic, fixed-step ``solver`` with valid
    ``options``, and exactly one of ``steps`` / ``nfe`` giving a grid of at least 2 steps.
    Returns the number of steps."""
    info = get_solver(solver)
    require(not info.adaptive, f"solver {solver!r} is adaptive: it chooses its own steps, there is "
                               "no grid to optimize")
    info.check_options(options)
    require(info.is_deterministic(**options),
            f"solver {solver!r} with options {options} is stochastic: optimize_grid fits the "
            "probability-flow ODE's map, use a deterministic solver (or options that make it one, "
            "e.g. ddim's eta=0, edm's S_churn=0)")
    require(steps is None or nfe is None, "give steps or nfe, not both")
    require(steps is not None or nfe is not None, "give the grid size: steps or nfe")
    if nfe is not None:
        steps = info.steps_for_nfe(int(nfe), **options)
    require(isinstance(steps, int) and steps >= 2,
            f"optimize_grid needs a grid of at least 2 steps (an interior point), got steps={steps!r}")
    return steps


def _free_points(lam: np.ndarray, max_ratio: Optional[float]):
    """Every interior point free. Without a ratio bound ``z`` = log of the log-SNR increments (a
    softmax of ``z`` times the whole range). With one, ``z`` sets the log-ratios of consecutive
    increments, ``log(h_{i+1}/h_i) = log(max_ratio) tanh(z_i)``, and the increments are rescaled
    to the whole range: any ``z`` is a valid grid with the same ends and bounded step ratios."""
    lam0, lam1 = lam[0], lam[-1]
    log_h = np.log(np.diff(lam) / (lam1 - lam0))

    def to_grid(log_h: np.ndarray) -> np.ndarray:
        w = np.exp(log_h - log_h.max())
        return lam0 + (lam1 - lam0) * np.concatenate([[0.0], np.cumsum(w / w.sum())])

    if max_ratio is None:
        return to_grid, log_h
    bound = math.log(max_ratio)

    def lam_of(z: np.ndarray) -> np.ndarray:
        return to_grid(np.concatenate([[0.0], np.cumsum(bound * np.tanh(z))]))

    return lam_of, np.arctanh(np.clip(np.diff(log_h) / bound, -0.999, 0.999))


def _smooth_density(lam: np.ndarray, knots: int):
    """A smooth grid: the points are the ``i/N`` quantiles of a density in log-SNR whose log is
    piecewise linear between ``knots`` equally spaced knots; ``z`` = the log-density at the knots
    (started from the density of the given grid). Fewer parameters than points: cheaper to search
    and less prone to fit the pilot batch's accidents."""
    require(isinstance(knots, int) and knots >= 2, f"knots must be an integer >= 2, got {knots!r}")
    lam0, lam1, n = lam[0], lam[-1], len(lam) - 1
    knot_at = np.linspace(lam0, lam1, knots)
    fine = np.linspace(lam0, lam1, 64 * n + 1)
    mids, density = 0.5 * (lam[1:] + lam[:-1]), 1.0 / (n * np.diff(lam))
    z0 = np.interp(knot_at, mids, np.log(density))

    def lam_of(z: np.ndarray) -> np.ndarray:
        dens = np.exp(np.interp(fine, knot_at, z - z.max()))
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(fine))])
        out = np.interp(np.linspace(0.0, cdf[-1], n + 1), cdf, fine)
        out[0], out[-1] = lam0, lam1
        return out

    return lam_of, z0


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt())


#: seconds between progress lines when stderr is not a terminal
PROGRESS_EVERY = 10.0


class _ProgressLines:
    """Progress for logs: a line on stderr every :data:`PROGRESS_EVERY` seconds with the
    evaluations done, the time elapsed and an estimate of the time left at the search's rate so
    far (an upper bound: Nelder-Mead often stops before its budget)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.start = self.last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.done += k
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done)
        print(f"optimize_grid: {self.done}/{self.total} evaluations, {_clock(elapsed)} elapsed, "
              f"at most ~{_clock(left)} left (the search may stop sooner)", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def _bar(progress: Optional[bool], total: int):
    """A tqdm bar on a terminal (or with ``progress=True``); progress lines on stderr when stderr
    is not a terminal and ``progress`` is ``None``; nothing with ``progress=False``."""
    if progress is None and not sys.stderr.isatty():
        return _ProgressLines(total)
    if not _show_progress(progress):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="optimize_grid", leave=False)
