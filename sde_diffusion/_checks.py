"""Small shared helpers: argument validation and broadcasting per-sample time over data."""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

TimeLike = Union[float, int, torch.Tensor]


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(message)


def check_positive(name: str, value: float) -> float:
    value = float(value)
    require(math.isfinite(value) and value > 0, f"{name} must be a finite number > 0, got {value!r}")
    return value


def as_time(t: TimeLike, like: torch.Tensor | None = None) -> torch.Tensor:
    """Turn ``t`` (number, 0-d or ``(batch,)`` tensor) into a tensor.

    With ``like`` given, the result takes its device and (floating) dtype, and a scalar is
    expanded to ``(like.shape[0],)``.
    """
    if like is not None:
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        t = torch.as_tensor(t, dtype=dtype, device=like.device)
        if t.ndim == 0:
            t = t.expand(like.shape[0]) if like.ndim > 0 else t
        elif t.ndim != 1 or (like.ndim > 0 and t.shape[0] != like.shape[0]):
            raise ValueError(
                f"t must be a scalar or a (batch,) tensor matching x's batch size {like.shape[0]}, "
                f"got shape {tuple(t.shape)}"
            )
        return t
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    return torch.as_tensor(t, dtype=torch.get_default_dtype())


def check_time_range(t: torch.Tensor, T: float, name: str = "t", *, sync: bool = True) -> None:
    """Raise if any entry of ``t`` is NaN or outside ``[0, T]``.

    The verdict is read back to the host: free on CPU, a device-to-host synchronisation on a GPU.
    With ``sync=False`` a ``t`` on a non-CPU device is not checked at all (for per-call hot paths
    such as the model wrapper; ``torch._assert_async`` is no alternative, a failure there wrecks the
    CUDA context). A CPU ``t`` is always checked.
    """
    if not sync and t.device.type != "cpu":
        return
    bad = torch.isnan(t) | (t < 0) | (t > T * (1 + 1e-6))
    if bool(bad.any()):
        value = t[bad].flatten()[0].item()
        raise ValueError(f"{name} must lie in [0, T={T}], got {value!r}")


def expand_to(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(batch,)`` (or 0-d) tensor so it broadcasts against ``x`` of shape ``(batch, ...)``."""
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def flat_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first (batch)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def as_samples(x, name: str) -> torch.Tensor:
    """``x`` (a tensor or NumPy array with a leading sample dimension) as a float64 CPU tensor,
    detached; ``ValueError`` naming ``name`` for another type, no samples, or NaN/Inf values."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    require(isinstance(x, torch.Tensor), f"{name} must be a tensor or numpy array, got {type(x).__name__}")
    require(x.ndim >= 1 and x.shape[0] >= 1, f"{name} must have a leading sample dimension, got {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64)
    require(bool(torch.isfinite(x).all()), f"{name} holds NaN or Inf values")
    return x


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite. Checks the sum first (one cheap reduction; NaN and
    Inf propagate into it) and only looks element-wise when the sum is not finite (overflow).
    Returning a Python bool reads one value back: a device sync when ``x`` is on a GPU."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
