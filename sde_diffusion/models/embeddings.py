r"""Time and label embeddings shared by :class:`TimeMLP` and :class:`UNet`.

The network's time input is whatever the :class:`~sde_diffusion.models.ScoreModel` wrapper feeds it:
continuous time ``t`` in ``[eps, T]`` (the default), ``sigma(t)`` or a DDPM index ``t (N-1)/T``.
Two embeddings are offered:

- ``"fourier"``: Gaussian Fourier features ``[sin(2 pi W s), cos(2 pi W s)]`` with fixed random
  ``W ~ N(0, scale^2)`` (Tancik et al. 2020; score_sde's NCSN++, Song et al. 2021). With
  ``scale=16`` this resolves time differences of about 0.01 for ``s = t`` in ``[0, 1]``; for sigma
  inputs pass ``time_transform="log"`` so that ``s = log sigma`` as in NCSN++.
- ``"sinusoidal"``: the Transformer position encoding used by DDPM (Vaswani et al. 2017; Ho et al.
  2020), frequencies ``10000^{-k/(d/2-1)}``. It expects index-like inputs in ``[0, ~1000]``, so a
  continuous ``t`` in ``[0, 1]`` is multiplied by ``time_scale=1000`` by default (as score_sde's
  DDPM++ feeds ``999 t``); pass ``time_scale=1`` when the wrapper already feeds an index.

Class labels: ``num_classes=K`` gives an embedding table of ``K + 1`` rows whose last row (index
``K``) is the *null* label used for unconditional / classifier-free-guided evaluation; ``y=None``
selects it for the whole batch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._checks import require

__all__ = ["ACTIVATIONS", "TIME_EMBEDDINGS", "TIME_TRANSFORMS", "get_activation",
           "GaussianFourierProjection", "sinusoidal_embedding", "TimeEmbedding", "LabelEmbedding",
           "Conditioning", "batch_time"]

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU,
               "elu": nn.ELU, "tanh": nn.Tanh, "softplus": nn.Softplus}
TIME_EMBEDDINGS = ("fourier", "sinusoidal")
TIME_TRANSFORMS = ("identity", "log")


def get_activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    require(isinstance(name, str) and name.lower() in ACTIVATIONS,
            f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name.lower()]()


def batch_time(t, x: torch.Tensor) -> torch.Tensor:
    """Time input as a floating ``(batch,)`` tensor on ``x``'s device and dtype.

    Accepts a Python number, a 0-d tensor (broadcast over the batch), a ``(batch,)`` or
    ``(batch, 1)`` tensor, integer or floating.
    """
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    t = torch.as_tensor(t, device=x.device).to(dtype)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim == 0:
        return t.expand(x.shape[0])
    require(t.ndim == 1 and t.shape[0] == x.shape[0],
            f"t must be a scalar or a (batch,) tensor with batch {x.shape[0]}, got shape {tuple(t.shape)}")
    return t


class GaussianFourierProjection(nn.Module):
    """``[sin(2 pi W s), cos(2 pi W s)]`` with fixed ``W ~ N(0, scale^2)`` of size ``dim / 2``.

    ``W`` is a buffer (saved with the weights, never trained), drawn from a private generator
    seeded with ``seed`` so two networks built alike embed time alike.
    """

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0):
        super().__init__()
        require(isinstance(dim, int) and dim >= 2 and dim % 2 == 0,
                f"the Fourier embedding dimension must be an even integer >= 2, got {dim!r}")
        require(math.isfinite(scale) and scale > 0, f"fourier_scale must be > 0, got {scale!r}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        proj = s[:, None] * self.W.to(s.dtype)[None, :] * (2 * math.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)


def sinusoidal_embedding(s: torch.Tensor, dim: int, max_positions: float = 10000.0) -> torch.Tensor:
    """DDPM's sinusoidal embedding of ``(batch,)`` inputs into ``(batch, dim)`` (odd ``dim`` is
    zero-padded), as ``get_timestep_embedding`` in Ho et al.'s and score_sde's code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_positions) * torch.arange(half, device=s.device, dtype=s.dtype)
                      / max(half - 1, 1))
    args = s[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Raw time features (Fourier or sinusoidal) of ``transform(t) * time_scale``, then a two-layer
    MLP ``Linear(embed_dim, out_dim) -> act -> Linear(out_dim, out_dim)`` (DDPM / score_sde layout).

    Args:
        kind: ``"fourier"`` or ``"sinusoidal"``.
        embed_dim: size of the raw features (even for Fourier).
        out_dim: size of the returned embedding.
        fourier_scale: std of the Fourier frequencies.
        time_transform: ``"identity"`` or ``"log"`` (``log t``, clamped at the dtype's tiny, for sigma inputs).
        time_scale: multiplier applied after the transform; ``None`` means 1000 for sinusoidal
            (continuous ``t`` to DDPM's index range) and 1 for Fourier.
    """

    def __init__(self, kind: str, embed_dim: int, out_dim: int, fourier_scale: float = 16.0,
                 activation: str = "silu", time_transform: str = "identity",
                 time_scale: Optional[float] = None):
        super().__init__()
        require(kind in TIME_EMBEDDINGS, f"time_embedding must be one of {TIME_EMBEDDINGS}, got {kind!r}")
        require(time_transform in TIME_TRANSFORMS,
                f"time_transform must be one of {TIME_TRANSFORMS}, got {time_transform!r}")
        require(isinstance(embed_dim, int) and embed_dim >= 2,
                f"embed_dim must be an integer >= 2, got {embed_dim!r}")
        if time_scale is None:
            time_scale = 1000.0 if kind == "sinusoidal" else 1.0
        require(math.isfinite(time_scale) and time_scale > 0, f"time_scale must be > 0, got {time_scale!r}")
        self.kind, self.embed_dim = kind, embed_dim
        self.time_transform, self.time_scale = time_transform, float(time_scale)
        self.fourier = GaussianFourierProjection(embed_dim, fourier_scale) if kind == "fourier" else None
        self.mlp = nn.Sequential(nn.Linear(embed_dim, out_dim), get_activation(activation),
                                 nn.Linear(out_dim, out_dim))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        s = t.clamp_min(torch.finfo(t.dtype).tiny).log() if self.time_transform == "log" else t
        s = s * self.time_scale
        if self.fourier is not None:
            return self.fourier(s)
        return sinusoidal_embedding(s, self.embed_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t))


class LabelEmbedding(nn.Module):
    """``K + 1`` learned rows; row ``K`` is the null label (also used when ``y`` is ``None``)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        require(isinstance(num_classes, int) and num_classes >= 1,
                f"num_classes must be an integer >= 1 or None, got {num_classes!r}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, y: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            y = torch.as_tensor(y, device=device)
            require(not y.is_floating_point() and y.shape == (batch,),
                    f"y must be an integer (batch,) tensor with batch {batch}, "
                    f"got {y.dtype} of shape {tuple(y.shape)}")
            if y.device.type == "cpu":   # no host sync on accelerators
                bad = (y < 0) | (y > self.num_classes)
                if bool(bad.any()):
                    raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} "
                                     f"= null label), got {int(y[bad][0])}")
            y = y.long()
        return self.table(y)


class Conditioning(nn.Module):
    """The conditioning vector of a network: ``act(time_embedding(t) + label_embedding(y))`` of size
    ``out_dim``; each layer or block then adds its own ``Linear`` projection of it (DDPM, score_sde).
    Label embedding only with ``num_classes``; ``y=None`` is the null label."""

    def __init__(self, out_dim: int, time_embedding: str = "fourier", embed_dim: int = 64,
                 fourier_scale: float = 16.0, num_classes: Optional[int] = None, activation: str = "silu",
                 time_transform: str = "identity", time_scale: Optional[float] = None):
        super().__init__()
        self.time = TimeEmbedding(time_embedding, embed_dim, out_dim, fourier_scale, activation,
                                  time_transform, time_scale)
        self.label = LabelEmbedding(num_classes, out_dim) if num_classes is not None else None
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        require(y is None or self.label is not None,
                "this network is unconditional (num_classes=None) but labels y were given")
        e = self.time(batch_time(t, x))
        if self.label is not None:
            e = e + self.label(y, x.shape[0], x.device)
        return self.act(e)
