"""Name -> solver registry, so configs and the command line can swap solvers."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

from .._checks import require
from .grids import GRIDS, MAX_STEPS, check_steps

__all__ = ["SolverInfo", "register", "get_solver", "available_solvers", "SOLVERS"]


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver.

    ``fn(ctx, x, **options)`` returns a generator that yields the state after each step (an
    adaptive solver may yield once per grid interval). With ``two_way`` it is *two-way*: each
    ``yield`` returns the state to continue from (``x = yield x``), which is how
    ``sample(..., correct=fn)`` replaces the state between steps; a solver registered without
    ``two_way`` refuses corrections. The keyword arguments of ``fn`` after ``(ctx, x)`` are the
    solver's options, and their defaults are the options' defaults (:meth:`defaults`).

    ``deterministic`` says whether the solver's output is a function of its starting state alone
    (it draws no noise): ``True``, ``False``, or a callable of the options that decides it (DDIM is
    deterministic at ``eta=0``); ask :meth:`is_deterministic`, never the name.

    ``nfe(steps)`` gives the network evaluations it spends on a grid of ``steps`` intervals
    (``None`` when adaptive); where the cost depends on the solver's options (e.g. corrector
    steps), ``nfe(steps, **options)`` may take them as keyword arguments. ``grid`` is the time grid
    it uses unless told otherwise (its paper's choice). ``plan(nfe, **options)``, where given, says
    how the solver spends a budget of exactly ``nfe`` evaluations: it returns ``(steps,
    extra_options)`` (DPM-Solver's order schedule); without it a budget buys the largest grid
    within it (:meth:`steps_for_nfe`).

    ``step``, for a one-step solver (no history between steps), makes its single step:
    ``step(ctx, **options)`` -- every option given, defaults filled in -- returns
    ``advance(i, x)``, the state at ``t_{i+1}`` from the state ``x`` at ``t_i``. The
    predictor-corrector sampler takes its predictor from there (:mod:`.pc`).
    """

    name: str
    fn: Callable
    deterministic: Union[bool, Callable[..., bool]]
    order: Optional[float]
    nfe: Optional[Callable[[int], int]]
    summary: str
    grid: str = "uniform"
    plan: Optional[Callable[..., Tuple[int, dict]]] = None
    step: Optional[Callable[..., Callable]] = None
    two_way: bool = False

    def defaults(self) -> Dict[str, object]:
        """The solver's options and their defaults (``fn``'s keyword arguments after ``(ctx, x)``;
        ``inspect.Parameter.empty`` for an option without one)."""
        params = list(inspect.signature(self.fn).parameters.values())[2:]
        return {p.name: p.default for p in params
                if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}

    def check_options(self, options: dict) -> None:
        """Every key of ``options`` is an option of the solver (a ValueError lists the valid ones);
        a solver whose ``fn`` takes ``**kwargs`` checks its own."""
        params = inspect.signature(self.fn).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return
        valid = list(self.defaults())
        for key in options:
            require(key in valid, f"solver {self.name!r} has no option {key!r}; its options: "
                                  f"{', '.join(valid) if valid else 'none'}")

    def is_deterministic(self, **options) -> bool:
        """Whether the solver with these options is a deterministic map of its starting state
        (draws no noise). The one answer that ``compare``, ``optimize_grid``, the command line and
        the benchmarks use; options not given take the solver's defaults, an unknown one is an
        error."""
        self.check_options(options)
        if isinstance(self.deterministic, bool):
            return self.deterministic
        given = {**{k: v for k, v in self.defaults().items() if v is not inspect.Parameter.empty},
                 **options}
        return bool(_call_accepting(self.deterministic, None, given, first_arg=False))

    @property
    def adaptive(self) -> bool:
        """Whether the solver chooses its own steps (its NFE is not known in advance)."""
        return self.nfe is None

    def cost(self, steps: int, **options) -> int:
        """Network evaluations on a grid of ``steps`` intervals with these solver options."""
        require(self.nfe is not None, f"solver {self.name!r} is adaptive: its NFE is not set in advance")
        return int(_call_accepting(self.nfe, steps, options))

    def steps_for_nfe(self, nfe: int, **options) -> int:
        """Largest grid size whose cost does not exceed ``nfe`` network evaluations (at most
        :data:`~.grids.MAX_STEPS`; a budget that needs more is an error)."""
        require(isinstance(nfe, int) and not isinstance(nfe, bool),
                f"nfe must be an integer, got {nfe!r}")
        least = self.cost(1, **options)
        require(least >= 1, f"solver {self.name!r} with options {options} evaluates no network")
        require(nfe >= least, f"solver {self.name!r} needs at least {least} NFE, got {nfe}")
        require(self.cost(MAX_STEPS + 1, **options) > nfe,
                f"nfe={nfe} buys solver {self.name!r} more than the maximum of {MAX_STEPS} grid "
                f"steps (see sde_diffusion.samplers.grids.MAX_STEPS)")
        lo, hi = 1, MAX_STEPS            # cost(lo) <= nfe; the cost grows with the steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cost(mid, **options) <= nfe:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def for_nfe(self, nfe: int, **options) -> Tuple[int, dict]:
        """How ``sample(..., nfe=nfe)`` spends the budget: ``(steps, options)``, the solver's
        ``plan`` where it has one (then the cost is exactly ``nfe``), otherwise the largest grid
        within the budget and the options unchanged."""
        if self.plan is None:
            return self.steps_for_nfe(nfe, **options), dict(options)
        require(isinstance(nfe, int) and not isinstance(nfe, bool) and nfe >= 1,
                f"nfe must be an integer >= 1, got {nfe!r}")
        steps, extra = _call_accepting(self.plan, nfe, options)
        check_steps(steps, f"nfe={nfe} gives solver {self.name!r} a grid of {steps} steps; steps")
        return steps, {**options, **extra}


def _call_accepting(fn: Callable, first, options: dict, *, first_arg: bool = True):
    """``fn(first, **options)`` (``fn(**options)`` without ``first_arg``) with only the options
    ``fn`` accepts (all of them with ``**kwargs``)."""
    args = (first,) if first_arg else ()
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn(*args, **options)
    accepted = {p.name for p in params}
    return fn(*args, **{k: v for k, v in options.items() if k in accepted})


SOLVERS: Dict[str, SolverInfo] = {}


def register(name: str, *, deterministic: Union[bool, Callable[..., bool]], order: Optional[float],
             nfe: Optional[Callable[[int], int]] = lambda steps: steps, summary: str = "",
             grid: str = "uniform", plan: Optional[Callable[..., Tuple[int, dict]]] = None,
             step: Optional[Callable[..., Callable]] = None, two_way: bool = False):
    """Decorator registering a solver generator under ``name``. ``deterministic``: ``True``,
    ``False`` or a callable of the options (e.g. ``lambda eta, **_: eta == 0``; it receives every
    option, defaults filled in); ``two_way``: the generator continues from the state each
    ``yield`` returns (``x = yield x``), so it accepts corrections; ``grid``: its default time
    grid; ``nfe``, ``plan`` and ``step``: see :class:`SolverInfo`."""
    def deco(fn: Callable) -> Callable:
        require(name not in SOLVERS, f"solver {name!r} is registered twice")
        require(grid in GRIDS, f"unknown default grid {grid!r} for solver {name!r}; valid: {GRIDS}")
        require(plan is None or nfe is not None, f"solver {name!r}: a plan needs an nfe cost")
        require(isinstance(deterministic, bool) or callable(deterministic),
                f"solver {name!r}: deterministic must be True, False or a callable of the options, "
                f"got {deterministic!r}")
        summary_line = summary or (fn.__doc__ or "").strip().split("\n")[0]
        SOLVERS[name] = SolverInfo(name, fn, deterministic, order, nfe, summary_line, grid, plan,
                                   step, bool(two_way))
        return fn
    return deco


def get_solver(name: str) -> SolverInfo:
    """The registered solver ``name``; an unknown name lists the valid ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def available_solvers() -> Dict[str, SolverInfo]:
    return dict(sorted(SOLVERS.items()))
