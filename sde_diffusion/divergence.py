r"""Divergence of a per-sample vector field ``fn: (batch, *event) -> (batch, *event)``.

Both functions evaluate ``fn`` once (one network evaluation) and return ``(fn(x), div)`` with
``div[b] = sum_i d fn(x)[b, i] / d x[b, i]``. They assume that samples do not interact inside
``fn`` (no batch statistics, e.g. no BatchNorm in training mode): then one vector-Jacobian product
with a cotangent ``c`` of shape ``x.shape`` gives every sample's ``c[b]^T J_b`` at once.

- :func:`exact_divergence`: ``D`` vector-Jacobian products with the basis vectors ``e_j`` (the same
  ``e_j`` for every sample) on one forward pass: a loop of backward passes on CPU, or chunks of
  them vmapped through ``torch.autograd.grad(..., is_grads_batched=True)`` (``torch.func.vmap`` over
  the backward pass) on accelerators. Cost: one forward and ``D`` backward passes.
- :func:`hutchinson_divergence`: the Hutchinson–Skilling estimator
  ``mean_k v_k^T J v_k`` (Hutchinson 1990; Skilling 1989) with ``K`` probes ``v_k`` drawn by
  :func:`make_probes` (Rademacher or standard Gaussian); unbiased because ``E[v v^T] = I``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ._checks import require

__all__ = ["exact_divergence", "hutchinson_divergence", "make_probes", "PROBES"]

PROBES = ("rademacher", "gaussian")

#: default budget of cotangent elements per batched backward pass of the exact divergence
_EXACT_CHUNK_ELEMENTS = 2 ** 24


def _forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    xr = x.detach().requires_grad_(True)
    out = fn(xr)
    require(isinstance(out, torch.Tensor) and out.shape == x.shape,
            f"the vector field must return a tensor shaped like x {tuple(x.shape)}, got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return xr, out


def _batched_vjp(out: torch.Tensor, xr: torch.Tensor, cotangents: torch.Tensor,
                 retain_graph: bool) -> torch.Tensor:
    """``cotangents[k]^T d out / d xr`` for every ``k`` (shape ``(K, *xr.shape)``)."""
    try:
        with warnings.catch_warnings():
            # a backward op without a vmap rule falls back to a loop inside torch: still correct
            warnings.filterwarnings("ignore", message=".*(batching rule|fallback).*")
            return torch.autograd.grad(out, xr, cotangents, retain_graph=retain_graph,
                                       is_grads_batched=True, allow_unused=True)[0]
    except RuntimeError:
        # the backward graph cannot be vmapped at all (e.g. a custom autograd.Function):
        # one vector-Jacobian product per cotangent
        rows = []
        for k in range(cotangents.shape[0]):
            keep = retain_graph or k + 1 < cotangents.shape[0]
            g = torch.autograd.grad(out, xr, cotangents[k], retain_graph=keep, allow_unused=True)[0]
            rows.append(torch.zeros_like(xr) if g is None else g)
        return torch.stack(rows)


def exact_divergence(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(fn(x), tr(d fn / d x))`` per sample, exactly (see the module docstring).

    Args:
        fn: per-sample vector field, ``(batch, *event) -> (batch, *event)``.
        x: ``(batch, *event)`` input.
        chunk_size: basis vectors per backward pass. ``1`` is a plain loop of ``D`` backward
            passes (the default on CPU, where it is about twice as fast as vmapping, being
            memory-bound); larger chunks vmap the backward over the basis vectors (the default on
            accelerators: as many as keep ``chunk * batch * D`` under 16M elements).
    """
    B, D = x.shape[0], x[0].numel()
    if chunk_size is None:
        chunk_size = 1 if x.device.type == "cpu" else max(1, min(D, _EXACT_CHUNK_ELEMENTS // max(1, B * D)))
    require(isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1,
            f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    with torch.enable_grad():
        xr, out = _forward(fn, x)
        div = torch.zeros(B, dtype=x.dtype, device=x.device)
        if not out.requires_grad:      # fn does not depend on x
            return out.detach(), div
        if chunk_size == 1:
            cot = torch.zeros(B, D, dtype=x.dtype, device=x.device)
            for j in range(D):
                cot[:, j] = 1
                g = torch.autograd.grad(out, xr, cot.view(x.shape), retain_graph=j + 1 < D,
                                        allow_unused=True)[0]
                cot[:, j] = 0
                if g is not None:
                    div = div + g.reshape(B, D)[:, j]
            return out.detach(), div.detach()
        for start in range(0, D, chunk_size):
            stop = min(D, start + chunk_size)
            n = stop - start
            rows = torch.arange(n, device=x.device)
            cot = torch.zeros(n, B, D, dtype=x.dtype, device=x.device)
            cot[rows, :, start + rows] = 1
            g = _batched_vjp(out, xr, cot.reshape((n,) + tuple(x.shape)), retain_graph=stop < D)
            if g is None:
                continue
            g = g.reshape(n, B, D)
            div = div + g[rows, :, start + rows].sum(0)     # sum_j d out[b, j] / d x[b, j]
    return out.detach(), div.detach()


def make_probes(shape: Sequence[int], n_probes: int = 1, kind: str = "rademacher",
                generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """``n_probes`` probe tensors of ``shape`` (stacked: ``(n_probes, *shape)``) with ``E[v v^T] = I``:
    Rademacher (entries +-1) or standard Gaussian. Drawn on the generator's device, then moved."""
    require(kind in PROBES, f"probe must be one of {PROBES}, got {kind!r}")
    require(isinstance(n_probes, int) and not isinstance(n_probes, bool) and n_probes >= 1,
            f"n_probes must be an integer >= 1, got {n_probes!r}")
    full = (n_probes,) + tuple(int(s) for s in shape)
    draw_device = generator.device if generator is not None else device
    if kind == "rademacher":
        v = torch.randint(0, 2, full, generator=generator, device=draw_device).to(dtype) * 2 - 1
    else:
        v = torch.randn(full, generator=generator, device=draw_device, dtype=dtype)
    return v.to(device=device if device is not None else v.device)


def hutchinson_divergence(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                          probes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(fn(x), mean_k v_k^T (d fn / d x) v_k)`` per sample for probes ``v`` of shape
    ``(K, *x.shape)``: one forward pass and ``K`` (batched) vector-Jacobian products."""
    require(isinstance(probes, torch.Tensor) and probes.ndim == x.ndim + 1
            and tuple(probes.shape[1:]) == tuple(x.shape),
            f"probes must have shape (n_probes, {', '.join(map(str, x.shape))}), got "
            f"{tuple(probes.shape) if isinstance(probes, torch.Tensor) else type(probes).__name__}")
    probes = probes.to(dtype=x.dtype, device=x.device)
    K, B = probes.shape[0], x.shape[0]
    with torch.enable_grad():
        xr, out = _forward(fn, x)
        if not out.requires_grad:
            return out.detach(), torch.zeros(B, dtype=x.dtype, device=x.device)
        if K == 1:
            g = torch.autograd.grad(out, xr, probes[0], allow_unused=True)[0]
            g = None if g is None else g.unsqueeze(0)
        else:
            g = _batched_vjp(out, xr, probes, retain_graph=False)
    if g is None:
        return out.detach(), torch.zeros(B, dtype=x.dtype, device=x.device)
    est = (g * probes).reshape(K, B, -1).sum(-1).mean(0)
    return out.detach(), est.detach()
