"""Name -> solver registry, so configs and the command line can swap solvers."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .._checks import require
from .grids import GRIDS, MAX_STEPS, check_steps

__all__ = ["SolverInfo", "register", "get_solver", "available_solvers", "SOLVERS"]


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver.

    ``fn(ctx, x, **options)`` is a generator: it yields the state after each step (an adaptive
    solver may yield once per grid interval). ``nfe(steps)`` gives the network evaluations it
    spends on a grid of ``steps`` intervals (``None`` when adaptive); where the cost depends on the
    solver's options (e.g. corrector steps), ``nfe(steps, **options)`` may take them as keyword
    arguments with the solver's defaults. ``stochastic`` says whether it draws noise; ``grid`` is
    the time grid it uses unless told otherwise (its paper's choice). ``plan(nfe, **options)``,
    where given, says how the solver spends a budget of exactly ``nfe`` evaluations: it returns
    ``(steps, extra_options)`` (DPM-Solver's order schedule); without it a budget buys the largest
    grid within it (:meth:`steps_for_nfe`).
    """

    name: str
    fn: Callable
    stochastic: bool
    order: Optional[float]
    nfe: Optional[Callable[[int], int]]
    summary: str
    grid: str = "uniform"
    plan: Optional[Callable[..., Tuple[int, dict]]] = None

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


def _call_accepting(fn: Callable, first, options: dict):
    """``fn(first, **options)`` with only the options ``fn`` accepts (all with ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn(first, **options)
    accepted = {p.name for p in params}
    return fn(first, **{k: v for k, v in options.items() if k in accepted})


SOLVERS: Dict[str, SolverInfo] = {}


def register(name: str, *, stochastic: bool, order: Optional[float],
             nfe: Optional[Callable[[int], int]] = lambda steps: steps, summary: str = "",
             grid: str = "uniform", plan: Optional[Callable[..., Tuple[int, dict]]] = None):
    """Decorator registering a solver generator under ``name`` (``grid``: its default time grid;
    ``nfe`` and ``plan``: see :class:`SolverInfo`)."""
    def deco(fn: Callable) -> Callable:
        require(name not in SOLVERS, f"solver {name!r} is registered twice")
        require(grid in GRIDS, f"unknown default grid {grid!r} for solver {name!r}; valid: {GRIDS}")
        require(plan is None or nfe is not None, f"solver {name!r}: a plan needs an nfe cost")
        summary_line = summary or (fn.__doc__ or "").strip().split("\n")[0]
        SOLVERS[name] = SolverInfo(name, fn, stochastic, order, nfe, summary_line, grid, plan)
        return fn
    return deco


def get_solver(name: str) -> SolverInfo:
    """The registered solver ``name``; an unknown name lists the valid ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def available_solvers() -> Dict[str, SolverInfo]:
    return dict(sorted(SOLVERS.items()))
