"""Name -> inverse-problem method registry (like :mod:`sde_diffusion.samplers.registry`).

A method is a function

    fn(model, operator, y, *, sigma_y, x_T, nfe, solver, generator, **options) -> MethodResult

registered with ``@register_method(name, needs=(...))``; its keyword arguments after the fixed
ones are its options (their defaults the options' defaults). ``needs`` lists what it asks of the
operator (:data:`NEEDS`: ``"A"``, ``"At"``, ``"pinv"``, ``"svd"``, ``"matrix"``), checked by :func:`~sde_diffusion.inverse.solve_inverse` before
any work. ``uses_solver``: whether it runs a registered solver of :mod:`sde_diffusion.samplers`
(then ``solver`` names it, ``None`` meaning the method's default); a method with its own loop
refuses a ``solver``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Sequence, Tuple

import torch

from .._checks import require

__all__ = ["MethodResult", "MethodInfo", "register_method", "get_method", "available_methods",
           "METHODS", "FIXED_ARGS", "NEEDS"]

#: The arguments every method takes (``solve_inverse`` fills them in); the rest are options.
FIXED_ARGS = ("model", "operator", "y", "sigma_y", "x_T", "nfe", "solver", "generator")
NEEDS = ("A", "At", "pinv", "svd", "matrix")


@dataclass
class MethodResult:
    """``samples`` ``(batch, *in_shape)``; ``nfe``: network evaluations actually made (counted by
    the model wrapper); ``method``: its name; ``info``: anything else the method reports."""

    samples: torch.Tensor
    nfe: int
    method: str = ""
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: Callable[..., MethodResult]
    needs: Tuple[str, ...]
    uses_solver: bool
    summary: str

    def defaults(self) -> Dict[str, object]:
        """The method's options and their defaults (``inspect.Parameter.empty`` when required)."""
        return {p.name: p.default for p in inspect.signature(self.fn).parameters.values()
                if p.name not in FIXED_ARGS
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}

    def check_options(self, options: dict) -> None:
        """Every key of ``options`` is an option of the method (a ValueError lists the valid ones)."""
        valid = list(self.defaults())
        for key in options:
            require(key in valid, f"method {self.name!r} has no option {key!r}; its options: "
                                  f"{', '.join(valid) if valid else 'none'}")


METHODS: Dict[str, MethodInfo] = {}


def register_method(name: str, *, needs: Sequence[str] = (), uses_solver: bool = False,
                    summary: str = ""):
    """Decorator registering an inverse-problem method under ``name`` (see the module docstring)."""
    needs = tuple(needs)
    for n in needs:
        require(n in NEEDS, f"method {name!r}: unknown need {n!r}; valid: {', '.join(NEEDS)}")

    def deco(fn: Callable) -> Callable:
        require(name not in METHODS, f"inverse method {name!r} is registered twice")
        params = inspect.signature(fn).parameters
        missing = [a for a in FIXED_ARGS if a not in params]
        require(not missing, f"method {name!r} must accept {', '.join(missing)}")
        line = summary or (fn.__doc__ or "").strip().split("\n")[0]
        METHODS[name] = MethodInfo(name, fn, needs, bool(uses_solver), line)
        return fn
    return deco


def get_method(name: str) -> MethodInfo:
    """The registered method ``name``; an unknown name lists the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown inverse method {name!r}; valid methods: "
                         f"{', '.join(sorted(METHODS)) or 'none registered'}")
    return METHODS[name]


def available_methods() -> Dict[str, MethodInfo]:
    return dict(sorted(METHODS.items()))
