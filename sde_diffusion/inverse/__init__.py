"""Linear inverse problems ``y = A x0 + sigma_y n`` with a diffusion prior (issue 13): operators,
the exact posterior of a Gaussian-mixture prior, and a registry of methods behind one entry point,
:func:`solve_inverse`. See docs/inverse.md."""
from .operators import (HALVES, BlockAverage, Colorization, Dense, LinearOperator, Mask,
                        OperatorSVD, box_mask, half_mask, observe, random_pixel_mask)
from .registry import MethodResult, available_methods, get_method, register_method
from . import methods  # noqa: F401  (imported to register every method)
from .api import solve_inverse

__all__ = ["LinearOperator", "OperatorSVD", "Mask", "Colorization", "BlockAverage", "Dense",
           "box_mask", "half_mask", "random_pixel_mask", "observe", "HALVES", "MethodResult",
           "register_method", "get_method", "available_methods", "solve_inverse"]
