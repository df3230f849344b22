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

The points move in log-SNR: either every increment freely, with the ratio of consecutive
increments within a factor ``max_ratio`` of the starting grid's (default 2: variable-step
multistep methods need bounded step ratios, and jagged grids that fit the pilot send rare
trajectories astray elsewhere), or as the quantiles of a smooth density with a few ``knots``. Any
parameter vector gives a valid grid with the original ends, and the search starts from the named
grid (the solver's own, ``focus``, ``logsnr``, ...) that does best on the pilot. A quarter of the
pilot is held out: among the grids the search passes through, the one with the lowest error there is
returned (early stopping). Fitting a schedule to the same model's own trajectories follows "Align
Your Steps" (Sabour, Fidler & Kreis 2024) and "On the Trajectory Regularity of ODE-based
Diffusion Sampling" (Chen et al. 2024, steps chosen by dynamic programming on a teacher
trajectory); here the objective is the solver's global error itself, so the multistep history and
the growth of early errors are accounted for exactly.

Two searches (``method=``). ``"gradient"`` (the default) follows "Learning to Discretize
Denoising Diffusion ODEs" (Tong, Hu, Ma, Liu, Zhu & Lin 2024): it differentiates the solver's end
states with respect to the grid's log-SNR parameters and takes Gauss-Newton / Levenberg-Marquardt
steps on the residual ``r(z) = Phi_solver(z) - Phi_teacher`` (Nocedal & Wright 2006, Sec. 10.3):

.. math:: (J^\top J + \mu\,\mathrm{diag}(J^\top J))\,\delta = -J^\top r,\qquad
          J_{:, j} = \frac{\partial \Phi_{\text{solver}}}{\partial z_j}.

The Jacobian is taken in forward mode, one extra solver run per parameter (a forward difference of
the registered solver itself): the solvers read their coefficients as Python floats, so autograd
cannot see the grid, and the forward difference works for any deterministic solver and any model.
With the Jacobian, each iteration uses the whole residual (``B*D`` numbers), not one scalar: it
converges in a handful of iterations where ``"nelder-mead"`` (derivative-free, from
``scipy.optimize``) needs about a hundred evaluations per parameter. Both share the
parameterisation, the teacher, the candidates and the early stopping below.

Cost and caveats. Each objective evaluation runs the solver on the pilot batch (``nfe`` network
calls on ``B`` samples); a search takes up to 150 evaluations per parameter. The result is a plain
tensor of times, made once per (model, SDE, solver, budget) and reused for any number of samples:
pass it as ``sample(..., grid=result.times)``. The pilot noise must be independent of the noise you
evaluate on. Rare events need a pilot large enough to contain them: on a 64-D, 8-mode mixture about
0.4% of trajectories at 10 NFE end in the wrong mode and dominate the RMS error, so a pilot of
several thousand samples (8192) is needed there (docs/samplers.md, "Optimized grids").
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

__all__ = ["optimize_grid", "OptimizedGrid", "START_GRIDS"]


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
    start_grid: str = "custom"          # the starting grid's name ("custom" for a tensor; with
    #                                     grid=None the named grid that did best on the pilot)
    legacy_sde: Optional[str] = field(default=None, repr=False)  # a file's SDE before format dicts
    method: str = "nelder-mead"         # the search that found it ("gradient" or "nelder-mead")
    analytic_first_step: bool = False   # fitted for sample(..., analytic_first_step=True)

    def sample_options(self) -> dict:
        """What ``sample`` needs besides the model to run this grid: ``solver``, ``grid`` (the
        times), ``analytic_first_step`` and the solver's options."""
        return {"solver": self.solver, "grid": self.times,
                "analytic_first_step": self.analytic_first_step, **self.options}

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
                  "start_grid": self.start_grid, "method": self.method,
                  "analytic_first_step": self.analytic_first_step,
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
                   legacy_sde=legacy if isinstance(legacy, str) else None,
                   method=str(saved.get("method", "nelder-mead")),
                   analytic_first_step=_file_flag(saved, "analytic_first_step", where), **numbers)

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


#: the searches of :func:`optimize_grid` (``"auto"`` is ``"gradient"``)
METHODS = ("auto", "gradient", "nelder-mead")
#: the default gradient budget, in solver runs per parameter plus one (the first Jacobian takes
#: one per parameter; each Gauss-Newton step then takes one)
GRADIENT_ITERATIONS = 5
#: the named grids ``optimize_grid(grid=None)`` tries as starts, with the solver's own: one run each
#: on the fitting part of the pilot, the search starts from the best
START_GRIDS = ("focus", "logsnr", "quadratic", "karras")

#: the format tag of grid files (:meth:`OptimizedGrid.save`; files without ``"method"``, written
#: before the gradient search, load as ``"nelder-mead"``)
GRID_FORMAT = "sde_diffusion.grid/1"
_REPORTED = ("initial_error", "pilot_error", "initial_validation_error", "validation_error",
             "teacher_error", "evaluations", "candidates", "model_calls", "pilot_size",
             "validation_size")


def _file_flag(saved: dict, key: str, where: str) -> bool:
    """A true/false entry of a grid file (``False`` when absent: files from before it)."""
    value = saved.get(key, False)
    require(isinstance(value, bool), f"{where}: {key!r} must be true or false, got {value!r}")
    return value


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
                  method: str = "auto", analytic_first_step: bool = False,
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
        grid: the starting grid (name or tensor), which also fixes the two ends; ``sigma_data``,
            ``t_start``, ``t_end`` shape it as in ``sample``. ``None`` (default): the solver's own
            grid and each of :data:`START_GRIDS` run once on the fitting part of the pilot, and the
            search starts from the best (``result.start_grid`` names it). Both searches stay
            near their start (the error jumps where a rare trajectory changes mode), so the
            start matters about as much as the search.
        teacher_solver, teacher_steps, teacher_options: the accurate solver whose end states are
            the target (default UniPC order 3 on a log-SNR grid of 200 steps); its own error is
            estimated by rerunning it on half as many steps and reported as ``teacher_error``.
        knots: ``None`` (default) moves every interior point freely; an integer ``K >= 2`` instead
            shapes the grid by a smooth log-SNR density with ``K`` parameters (cheaper, less gain).
        max_ratio: bound on how far the ratio of consecutive log-SNR steps moves from the
            starting grid's, ``1/max_ratio <= (h_{i+1}/h_i) / (h0_{i+1}/h0_i) <= max_ratio`` (free
            points only; on a start uniform in log-SNR, ``1/max_ratio <= h_{i+1}/h_i <=
            max_ratio``). Variable-step multistep methods are only stable for
            bounded step ratios, and a jagged grid that fits the pilot can send rare trajectories
            to another mode (default 2; on the benchmark mixture an unconstrained fit of
            DPM-Solver++(3M) at 20 NFE tripled the error on fresh noise, the bounded one did not);
            ``None`` leaves the steps unconstrained.
        max_evals: solver runs on the fitting part allowed to the search, Jacobian runs included
            (default: Nelder-Mead 150 per parameter, ``150 * steps`` or ``150 * knots``; gradient
            ``GRADIENT_ITERATIONS * (parameters + 1)`` = ``5 * steps``: one Jacobian, then
            Gauss-Newton steps of one run each).
        method: ``"gradient"`` (Gauss-Newton on the Jacobian of the end states with respect to the
            log-SNR parameters, see the module docstring), ``"nelder-mead"`` (derivative-free), or
            ``"auto"`` (default): ``"gradient"``, which on the benchmark mixture (8192-state
            pilot, from the same start) came within 2% of Nelder-Mead's error on fresh states at
            6-10 NFE (9% at 4) with 0.06-0.16 of its network calls at 6-10
            (benchmarks/results/low_nfe.md, docs/samplers.md); ``result.method`` says which ran.
        validation: the share of the pilot held out (default a quarter). The search fits the
            rest; every grid on its way that improved the fit by 2% or more, and the start, are
            then compared on the held-out part and the best one there is returned (early
            stopping: with rare, large errors a grid can fit the pilot and do worse elsewhere).
            The start grid is returned when nothing beats it there. ``0`` returns the best fit.
        dtype, device: of the pilot batch drawn from ``shape``.
        progress: ``None`` (default): a tqdm bar over the evaluations when stderr is a terminal,
            otherwise (logs, CI) a line on stderr every 10 s with the evaluations done, the time
            elapsed and an estimate of the time left; ``True``: a bar; ``False``: nothing.
        analytic_first_step: fit the grid of a solver that starts with the analytical first
            step (see :func:`~sde_diffusion.samplers.sample`); ``nfe`` then buys one step more,
            and the grid is for ``sample(..., analytic_first_step=True)`` (the grid file says so).

    Returns:
        an :class:`OptimizedGrid`; ``result.times`` goes to ``sample(..., grid=result.times)``
        with the same solver and options (``result.sample_options()`` holds both).
    """
    from scipy.optimize import minimize

    info = get_solver(solver)
    require(isinstance(analytic_first_step, bool),
            f"analytic_first_step must be True or False, got {analytic_first_step!r}")
    steps = check_grid_request(solver, steps, None if nfe is None else nfe + analytic_first_step,
                               **options)
    require(method in METHODS, f"method must be one of {', '.join(METHODS)}, got {method!r}")
    method = "gradient" if method == "auto" else method
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
        starts = {"custom": custom_grid(grid, sde)}
        require(len(starts["custom"]) == steps + 1, f"the starting grid has "
                f"{len(starts['custom']) - 1} steps, but steps={steps}")
    else:   # one named grid, or (grid=None) every grid of START_GRIDS and the solver's own
        names = [grid] if grid is not None else list(dict.fromkeys((info.grid,) + START_GRIDS))
        starts = {name: make_grid(sde, steps, name, t_start, t_end, sigma_data=sigma_data)
                  for name in names}
    t0, t1 = (float(v) for v in next(iter(starts.values()))[[0, -1]])

    calls_before = model.nfe
    teacher_options = {"order": 3} if teacher_options is None and teacher_solver == "unipc" \
        else dict(teacher_options or {})

    def teacher(n: int) -> torch.Tensor:
        with torch.no_grad():
            return sample(model, sde, x_T=x_T, solver=teacher_solver, steps=n, grid="logsnr",
                          t_start=t0, t_end=t1, progress=False, **teacher_options).samples

    target = teacher(teacher_steps)
    teacher_error = _rms(teacher(teacher_steps // 2), target)

    def times_of(z: np.ndarray) -> Optional[torch.Tensor]:
        times = sde.t_of_lambda(torch.from_numpy(lam_of(z))).to(torch.float64)
        times[0], times[-1] = t0, t1
        return times if bool((times[1:] < times[:-1]).all()) else None

    n_val = int(round(validation * x_T.shape[0]))
    require(validation == 0 or 1 <= n_val < x_T.shape[0],
            f"validation={validation!r} leaves no fitting or no validation sample of a pilot of "
            f"{x_T.shape[0]}")
    n_fit = x_T.shape[0] - n_val

    def run_on(times: torch.Tensor, part: slice) -> Optional[torch.Tensor]:
        """The solver's end states on ``part`` of the pilot (float64), ``None`` if not finite."""
        try:
            with torch.no_grad():
                out = sample(model, sde, x_T=x_T[part], solver=solver, grid=times, progress=False,
                             analytic_first_step=analytic_first_step,
                             **options).samples.to(torch.float64)
        except NonFiniteError:
            return None
        return out if bool(torch.isfinite(out).all()) else None

    def error_on(times: Optional[torch.Tensor], part: slice) -> float:
        out = None if times is None else run_on(times, part)
        return math.inf if out is None else _rms(out, target[part])

    fit, val = slice(0, n_fit), slice(n_fit, None)
    scores = {name: error_on(times, fit) for name, times in starts.items()}
    start_name = min(scores, key=scores.get)
    start, initial = starts[start_name], scores[start_name]
    require(math.isfinite(initial), f"the solver fails on the starting grid{'s' * (len(starts) > 1)} "
                                    f"{', '.join(starts)} (NaN/Inf)")
    if knots is None:
        lam_of, z0 = _free_points(sde.lambda_(start).numpy(), max_ratio)
    else:
        lam_of, z0 = _smooth_density(sde.lambda_(start).numpy(), knots)
    candidates = [(initial, start)]  # the start, then every new best that is 2% better than the last

    def keep(err: float, times: Optional[torch.Tensor]) -> None:
        if times is not None and err < 0.98 * candidates[-1][0]:
            candidates.append((err, times))

    if method == "nelder-mead":
        budget = max_evals or 150 * len(z0)
        bar = _bar(progress, budget)
        evaluations = 0

        def objective(z: np.ndarray) -> float:
            nonlocal evaluations
            evaluations += 1
            if bar is not None:
                bar.update(1)
            times = times_of(z)
            err = error_on(times, fit)
            keep(err, times)
            return err

        try:
            # the first simplex moves each parameter by 0.5 (scipy's default, 5% of a parameter's
            # value, is nothing for parameters at 0: a uniform grid's ratios)
            simplex = np.vstack([z0, z0 + 0.5 * np.eye(len(z0))])
            found = minimize(objective, z0, method="Nelder-Mead",
                             options=dict(maxfev=budget, xatol=1e-3, fatol=1e-4 * initial,
                                          adaptive=True, initial_simplex=simplex))
        finally:
            if bar is not None:
                bar.close()
        if found.fun < candidates[-1][0]:
            candidates.append((float(found.fun), times_of(found.x)))
    else:
        def residual(z: np.ndarray) -> Optional[torch.Tensor]:
            times = times_of(z)
            out = None if times is None else run_on(times, fit)
            return None if out is None else (out - target[fit].to(torch.float64)).flatten()

        budget = max_evals or GRADIENT_ITERATIONS * (len(z0) + 1)
        bar = _bar(progress, budget)
        try:
            evaluations = _gauss_newton(residual, z0, budget, bar,
                                        lambda err, z: keep(err, times_of(z)))
        finally:
            if bar is not None:
                bar.close()
    if n_val:  # early stopping: the candidate that does best on the held-out part of the pilot
        checked = [(error_on(times, val), err, times) for err, times in candidates]
        best_val, best_fit, best_times = min(checked, key=lambda c: c[0])
        initial_val = checked[0][0]
    else:
        best_fit, best_times = candidates[-1]
        best_val = initial_val = math.nan
    return OptimizedGrid(times=best_times, solver=solver, options=dict(options),
                         nfe=info.cost(steps, **options) - analytic_first_step,
                         analytic_first_step=analytic_first_step, initial_error=initial, pilot_error=best_fit,
                         initial_validation_error=initial_val, validation_error=best_val,
                         teacher_error=teacher_error, evaluations=evaluations,
                         candidates=len(candidates), model_calls=model.nfe - calls_before,
                         pilot_size=x_T.shape[0], validation_size=n_val, initial_times=start,
                         sde=sde, start_grid=start_name, method=method)


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


def _gauss_newton(residual, z0: np.ndarray, budget: int, bar, keep,
                  fd_step: float = 0.2, max_move: float = 1.0) -> int:
    r"""Levenberg-Marquardt on ``|r(z)|^2`` (Nocedal & Wright 2006, Sec. 10.3, with Marquardt's
    scaling) with a forward-difference Jacobian kept current by Broyden's rank-one updates
    (Nocedal & Wright, Sec. 11.1): the Jacobian ``J_{:,j} = (r(z + s e_j) - r(z)) / s`` costs
    ``len(z)`` solver runs once, and every trial step
    ``(J^T J + mu diag(J^T J)) delta = -J^T r`` one run, after which
    ``J += (r(z + delta) - r(z) - J delta) delta^T / |delta|^2``. A step that lowers the error is
    taken and ``mu`` shrinks 3x, one that does not is refused and ``mu`` grows 4x; after 3 refusals
    in a row the Jacobian is measured afresh (when the budget allows). Steps are clipped to
    ``max_move`` per parameter (a trust region in ``z``). ``keep(rms, z)`` sees every grid
    evaluated on its way. Stops when the budget (solver runs) is spent, after 8 refusals in a row
    or when a step changes the error by less than 1e-4 of it. Returns the runs spent.

    ``fd_step`` is a secant over a visible change of the grid (0.2: each step ratio moves by about
    14%), not a derivative at a point: the RMS error at 8-10 NFE is set by the few trajectories
    that end in another mode, which makes it rough at small scales. On the benchmark mixture
    (8192-state pilot, fresh states) 0.2 fitted better than 1e-2 at each of 4, 6, 8 and 10 NFE
    (1.11e-2 against 1.32e-2 at 10, where 1e-2 left the start unchanged)."""
    runs = 0

    def run(z: np.ndarray) -> Optional[torch.Tensor]:
        nonlocal runs
        runs += 1
        if bar is not None:
            bar.update(1)
        return residual(z)

    def rms(v: torch.Tensor) -> float:
        return float(v.pow(2).mean().sqrt())

    z, r = z0.copy(), run(z0)
    err, mu, refused, n = rms(r), 1e-3, 0, len(z0)

    def jacobian() -> torch.Tensor:
        cols = []
        for j in range(n):
            zj = z.copy()
            zj[j] += fd_step
            rj = run(zj)
            cols.append(torch.zeros_like(r) if rj is None else (rj - r) / fd_step)
            if rj is not None:
                keep(rms(rj), zj)
        return torch.stack(cols, dim=1)                  # (B*D, n) float64

    if runs + n + 1 > budget:
        return runs
    J = jacobian()
    while runs < budget and refused < 8:
        if refused and refused % 3 == 0 and runs + n + 1 <= budget:
            J = jacobian()
        JtJ, Jtr = (J.T @ J).numpy(), (J.T @ r).numpy()
        scale = np.maximum(np.diag(JtJ), 1e-12 * max(float(np.diag(JtJ).max()), 1e-300))
        try:
            delta = np.linalg.solve(JtJ + mu * np.diag(scale), -Jtr)
        except np.linalg.LinAlgError:
            delta = np.full(n, np.nan)
        if not np.all(np.isfinite(delta)):
            mu, refused = mu * 4.0, refused + 1
            continue
        delta = np.clip(delta, -max_move, max_move)
        r_new = run(z + delta)
        if r_new is None:
            mu, refused = mu * 4.0, refused + 1
            continue
        d = torch.from_numpy(delta)
        J = J + torch.outer(r_new - r - J @ d, d) / float(d @ d)       # Broyden's update
        err_new = rms(r_new)
        if err_new < err:
            keep(err_new, z + delta)
            gain = err - err_new
            z, r, err, mu, refused = z + delta, r_new, err_new, max(mu / 3.0, 1e-7), 0
            if gain < 1e-4 * err:
                break
        else:
            mu, refused = mu * 4.0, refused + 1
    return runs


def _free_points(lam: np.ndarray, max_ratio: Optional[float]):
    """Every interior point free. Without a ratio bound ``z`` = log of the log-SNR increments (a
    softmax of ``z`` times the whole range). With one, ``z`` moves the log-ratios of consecutive
    increments away from the starting grid's, ``log(h_{i+1}/h_i) = log(h0_{i+1}/h0_i) +
    log(max_ratio) tanh(z_i)``, and the increments are rescaled to the whole range: any ``z`` is a
    valid grid with the same ends, ``z = 0`` is the starting grid exactly, and each ratio stays
    within a factor ``max_ratio`` of the start's (a bound on the ratios themselves could not
    represent a start that exceeds it, such as the focus grid at 4 NFE, and near it ``tanh``
    would leave the search no gradient)."""
    lam0, lam1 = lam[0], lam[-1]
    log_h = np.log(np.diff(lam) / (lam1 - lam0))

    def to_grid(log_h: np.ndarray) -> np.ndarray:
        w = np.exp(log_h - log_h.max())
        return lam0 + (lam1 - lam0) * np.concatenate([[0.0], np.cumsum(w / w.sum())])

    if max_ratio is None:
        return to_grid, log_h
    bound, start = math.log(max_ratio), np.diff(log_h)

    def lam_of(z: np.ndarray) -> np.ndarray:
        return to_grid(np.concatenate([[0.0], np.cumsum(start + bound * np.tanh(z))]))

    return lam_of, np.zeros(len(start))


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
