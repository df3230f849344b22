"""The one entry point for inverse problems: ``solve_inverse(model, operator, y, method=...)``."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .._checks import require
from ..models.wrapper import NonFiniteError, OracleModel, ScoreModel, as_model
from ..oracles import GaussianMixture
from ..samplers.api import start_state
from ..samplers.base import GeneratorLike
from ..samplers.registry import get_solver
from .operators import LinearOperator
from .registry import MethodResult, get_method

__all__ = ["solve_inverse", "prepare_observation"]


def prepare_observation(operator: LinearOperator, y: torch.Tensor, n: Optional[int]) -> torch.Tensor:
    """``y`` as ``(batch, *out_shape)``: one observation ``(*out_shape)`` or ``(1, *out_shape)``
    repeated ``n`` times (default 1), or a batch ``(B, *out_shape)`` (then ``n`` is ``None`` or
    ``B``). Errors name both shapes."""
    require(isinstance(y, torch.Tensor) and y.is_floating_point(),
            f"y must be a floating-point tensor, got "
            f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
    out = tuple(operator.out_shape)
    if n is not None:
        require(isinstance(n, int) and not isinstance(n, bool) and n >= 1,
                f"n must be an integer >= 1 (the number of samples), got {n!r}")
    if tuple(y.shape) == out:
        y = y[None]
    require(y.ndim >= 1 and tuple(y.shape[1:]) == out,
            f"y has shape {tuple(y.shape)} but {operator!r} gives observations of shape {out} "
            f"(one observation) or (batch, {', '.join(map(str, out))})")
    if n is not None and y.shape[0] != n:
        require(y.shape[0] == 1, f"n={n} samples asked of a batch of {y.shape[0]} observations: "
                                 f"give one observation to repeat, or a batch of n")
        y = y.expand((n,) + out)
    require(bool(torch.isfinite(y).all()), "y must be finite (no NaN/Inf)")
    return y.contiguous()


def solve_inverse(model: Union[ScoreModel, GaussianMixture], operator: LinearOperator,
                  y: torch.Tensor, method: str = "ddnm", sigma_y: float = 0.0, nfe: int = 100,
                  solver: Optional[str] = None, n: Optional[int] = None,
                  generator: GeneratorLike = 0, x_T: Optional[torch.Tensor] = None,
                  **options) -> MethodResult:
    """Sample ``x0`` given ``y = A x0 + sigma_y n`` with a diffusion prior by a registered method.

    Args:
        model: a :class:`~sde_diffusion.models.ScoreModel` (or an oracle mixture with an SDE); its
            SDE is the one the method runs on.
        operator: the :class:`~sde_diffusion.inverse.LinearOperator` ``A``.
        y: one observation ``(*out_shape)`` (repeated ``n`` times: posterior samples) or a batch
            ``(batch, *out_shape)``; its dtype and device are the samples'.
        method: a registered method (:func:`~sde_diffusion.inverse.available_methods`).
        sigma_y: the observation noise's standard deviation (``0``: noiseless).
        nfe: the budget of network evaluations per sample the method plans with.
        solver: the registered solver of a method that runs one (``None``: its default).
        n: the number of samples for one observation.
        generator: an int seed (default 0: a sample's noise depends on the seed and its index), a
            ``torch.Generator`` or ``None``.
        x_T: the starting noise ``(batch, *in_shape)``; default drawn from the prior.
        **options: the method's options (an unknown one lists the valid ones).

    Returns a :class:`~sde_diffusion.inverse.MethodResult`; its ``nfe`` is the count the model
    wrapper made during the call.
    """
    info = get_method(method)
    require(isinstance(operator, LinearOperator),
            f"operator must be a LinearOperator (Mask, Colorization, BlockAverage, Dense, ...), got "
            f"{type(operator).__name__}")
    model = as_model(model)
    if isinstance(model, OracleModel):
        event = tuple(model.mixture.event_shape)
        require(event == tuple(operator.in_shape),
                f"the model's samples have shape {event} but the operator expects in_shape "
                f"{tuple(operator.in_shape)}")
    sigma_y = float(sigma_y)
    require(math.isfinite(sigma_y) and sigma_y >= 0, f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    require(isinstance(nfe, int) and not isinstance(nfe, bool) and nfe >= 1,
            f"nfe must be an integer >= 1, got {nfe!r}")
    if solver is not None:
        require(info.uses_solver, f"method {method!r} runs its own loop and takes no solver, got "
                                  f"solver={solver!r}")
        get_solver(solver)
    info.check_options(options)
    for need in info.needs:
        require(operator.supports(need),
                f"method {method!r} needs the operator's {need}, which {operator.name} lacks")
    y = prepare_observation(operator, y, n)
    shape = (y.shape[0],) + tuple(operator.in_shape)
    if x_T is None:
        x_T, _ = start_state(model.sde, shape, None, generator, y.dtype, y.device)
    else:
        require(isinstance(x_T, torch.Tensor) and tuple(x_T.shape) == shape,
                f"x_T must have shape {shape} (batch of y, *in_shape), got "
                f"{tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
        x_T = x_T.to(device=y.device, dtype=y.dtype)
    before = model.nfe
    result = info.fn(model, operator, y, sigma_y=sigma_y, x_T=x_T, nfe=nfe, solver=solver,
                     generator=generator, **options)
    require(isinstance(result, MethodResult),
            f"method {method!r} returned {type(result).__name__}, not a MethodResult")
    result.nfe = model.nfe - before
    result.method = method
    bad = ~torch.isfinite(result.samples.reshape(result.samples.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteError(f"method {method!r} produced NaN/Inf in {int(bad.sum())} of "
                             f"{bad.numel()} samples (first: index {int(bad.nonzero()[0, 0])}); a "
                             f"smaller guidance weight or step size, more NFE, or another method "
                             f"may be stable on this model")
    return result
