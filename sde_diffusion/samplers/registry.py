"""Name -> solver registry, so configs and the command line can swap solvers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from .._checks import require

__all__ = ["SolverInfo", "register", "get_solver", "available_solvers", "SOLVERS"]


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver.

    ``fn(ctx, x, **options)`` is a generator: it yields the state after each step (an adaptive
    solver may yield once). ``nfe_per_step(steps)`` gives the network evaluations it spends on a
    grid of ``steps`` intervals (``None`` when adaptive). ``stochastic`` says whether it draws noise.
    """

    name: str
    fn: Callable
    stochastic: bool
    order: Optional[float]
    nfe: Optional[Callable[[int], int]]
    summary: str

    def steps_for_nfe(self, nfe: int) -> int:
        """Largest grid size whose cost does not exceed ``nfe`` network evaluations."""
        require(self.nfe is not None, f"solver {self.name!r} is adaptive: its NFE is not set in advance")
        require(nfe >= self.nfe(1), f"solver {self.name!r} needs at least {self.nfe(1)} NFE, got {nfe}")
        steps = 1
        while self.nfe(steps + 1) <= nfe:
            steps += 1
        return steps


SOLVERS: Dict[str, SolverInfo] = {}


def register(name: str, *, stochastic: bool, order: Optional[float],
             nfe: Optional[Callable[[int], int]] = lambda steps: steps, summary: str = ""):
    """Decorator registering a solver generator under ``name``."""
    def deco(fn: Callable) -> Callable:
        require(name not in SOLVERS, f"solver {name!r} is registered twice")
        SOLVERS[name] = SolverInfo(name, fn, stochastic, order, nfe, summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


def get_solver(name: str) -> SolverInfo:
    """The registered solver ``name``; an unknown name lists the valid ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def available_solvers() -> Dict[str, SolverInfo]:
    return dict(sorted(SOLVERS.items()))
