"""A time-conditioned residual MLP for low-dimensional data (2-D toys, small mixtures)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import require
from .embeddings import Conditioning, get_activation

__all__ = ["TimeMLP"]


class _Block(nn.Module):
    """``h + Linear(act(Linear(act(h)) + Linear(e)))``: a residual block conditioned on ``e``."""

    def __init__(self, hidden: int, activation: str):
        super().__init__()
        self.act = get_activation(activation)
        self.inner = nn.Linear(hidden, hidden)
        self.cond_proj = nn.Linear(hidden, hidden)
        self.outer = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + self.outer(self.act(self.inner(self.act(h)) + self.cond_proj(e)))


class _Trunk(nn.Module):
    """What :class:`TimeMLP` and :class:`~sde_diffusion.models.classifier.MLPClassifier` share:
    the conditioning ``e`` (``cond``), ``h = Linear(dim, hidden)(x)`` (``inp``) and ``depth``
    residual blocks (``blocks``); :meth:`features` returns ``act(h)`` for the subclass's head."""

    def __init__(self, dim: int, hidden: int, depth: int, time_embedding: str, embed_dim: int,
                 fourier_scale: float, num_classes: Optional[int], activation: str,
                 time_transform: str, time_scale: Optional[float]):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"{name} must be an integer >= 1, got {value!r}")
        self.dim, self.num_classes = dim, num_classes
        self.act = get_activation(activation)
        self.cond = Conditioning(hidden, time_embedding, embed_dim, fourier_scale, num_classes, activation,
                                 time_transform, time_scale)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, activation) for _ in range(depth))

    def features(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``act(h)`` after the residual blocks, ``(batch, hidden)``; ``x`` must be ``(batch, dim)``."""
        require(isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == self.dim,
                f"x must have shape (batch, {self.dim}), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        e = self.cond(x, t, y)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, e)
        return self.act(h)


class TimeMLP(_Trunk):
    """``x (B, dim), t (B,) [, y (B,)] -> (B, dim)``.

    Layout: ``h = Linear(dim, hidden)(x)``, then ``depth`` residual blocks
    ``h = h + Linear(act(Linear(act(h)) + Linear(e)))``, then ``Linear(hidden, dim)(act(h))``, where
    ``e = act(time embedding [+ label embedding])``: time conditions every block through its own
    projection. The output layer starts at zero, so an untrained network outputs 0 (the prior's
    eps/score mean), as DDPM/score_sde initialise their last layer. (On two moons, 3000 steps of
    VP training, the residual blocks gave samples with a sliced Wasserstein distance 1.7x that of
    fresh data against 3.0x for a plain MLP of the same width and depth.)

    Args:
        dim: data dimension.
        hidden: width of the hidden layers.
        depth: number of residual blocks (>= 1).
        time_embedding: ``"fourier"`` or ``"sinusoidal"`` (see :mod:`.embeddings`).
        embed_dim: size of the raw time features.
        fourier_scale: std of the Fourier frequencies.
        num_classes: ``K`` for class conditioning (``K + 1`` labels, ``K`` = null), or ``None``.
        activation: ``silu`` (default), ``relu``, ``gelu``, ``elu``, ``tanh``, ``softplus``.
        time_transform, time_scale: how ``t`` is mapped before embedding (see
            :class:`.embeddings.TimeEmbedding`).
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_embedding: str = "fourier",
                 embed_dim: int = 64, fourier_scale: float = 16.0, num_classes: Optional[int] = None,
                 activation: str = "silu", time_transform: str = "identity",
                 time_scale: Optional[float] = None):
        super().__init__(dim, hidden, depth, time_embedding, embed_dim, fourier_scale, num_classes,
                         activation, time_transform, time_scale)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.out(self.features(x, t, y))
