"""Name -> solver registry, so configs and the command line can swap solvers."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from .._checks import require
from .grids import GRIDS

__all__ = ["SolverInfo", "register", "get_solver", "available_solvers", "SOLVERS"]


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver.

    ``fn(ctx, x, **options)`` is a generator: it yields the state after each step (an adaptive
    solver may yield once per grid interval). ``nfe(steps)`` gives the network evaluations it
    spends on a grid of ``steps`` intervals (``None`` when adaptive); where the cost depends on the
    solver's options (e.g. corrector steps), ``nfe(steps, **options)`` may take them as keyword
    arguments with the solver's defaults. ``stochastic`` says whether it draws noise; ``grid`` is
    the time grid it uses unless told otherwise (its paper's choice).
    """

    name: str
    fn: Callable
    stochastic: bool
    order: Optional[float]
    nfe: Optional[Callable[[int], int]]
    summary: str
    grid: str = "uniform"

    @property
    def adaptive(self) -> bool:
        """Whether the solver chooses its own steps (its NFE is not known in advance)."""
        return self.nfe is None

    def cost(self, steps: int, **options) -> int:
        """Network evaluations on a grid of ``steps`` intervals with these solver options."""
        require(self.nfe is not None, f"solver {self.name!r} is adaptive: its NFE is not set in advance")
        params = inspect.signature(self.nfe).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return int(self.nfe(steps, **options))
        accepted = {p.name for p in params}
        return int(self.nfe(steps, **{k: v for k, v in options.items() if k in accepted}))

    def steps_for_nfe(self, nfe: int, **options) -> int:
        """Largest grid size whose cost does not exceed ``nfe`` network evaluations."""
        least = self.cost(1, **options)
        require(least >= 1, f"solver {self.name!r} with options {options} evaluates no network")
        require(nfe >= least, f"solver {self.name!r} needs at least {least} NFE, got {nfe}")
        steps = 1
        while self.cost(steps + 1, **options) <= nfe:
            steps += 1
        return steps


SOLVERS: Dict[str, SolverInfo] = {}


def register(name: str, *, stochastic: bool, order: Optional[float],
             nfe: Optional[Callable[[int], int]] = lambda steps: steps, summary: str = "",
             grid: str = "uniform"):
    """Decorator registering a solver generator under ``name`` (``grid``: its default time grid)."""
    def deco(fn: Callable) -> Callable:
        require(name not in SOLVERS, f"solver {name!r} is registered twice")
        require(grid in GRIDS, f"unknown default grid {grid!r} for solver {name!r}; valid: {GRIDS}")
        summary_line = summary or (fn.__doc__ or "").strip().split("\n")[0]
        SOLVERS[name] = SolverInfo(name, fn, stochastic, order, nfe, summary_line, grid)
        return fn
    return deco


def get_solver(name: str) -> SolverInfo:
    """The registered solver ``name``; an unknown name lists the valid ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def available_solvers() -> Dict[str, SolverInfo]:
    return dict(sorted(SOLVERS.items()))
