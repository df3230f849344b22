"""Interchangeable solvers behind one entry point, :func:`sample`.

Every module of this package that defines solvers registers them with ``@register`` on import; all
modules are imported here, so a new solver module needs no other edit. See :func:`available_solvers`.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from ..models.wrapper import as_model
from .api import sample
from .base import NoiseSource, SampleResult, SolverContext
from .grids import GRIDS, make_grid
from .registry import available_solvers, get_solver, register
from .tuning import OptimizedGrid, optimize_grid

for _module in _pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["sample", "as_model", "make_grid", "GRIDS", "available_solvers", "get_solver", "register",
           "SampleResult", "SolverContext", "NoiseSource", "optimize_grid", "OptimizedGrid"]
