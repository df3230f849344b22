r"""Noise-conditional classifiers ``p_phi(y | x_t, t)`` for classifier guidance.

A classifier of the *noisy* data ``x_t = alpha(t) x_0 + sigma(t) z`` at every noise level, trained
with cross-entropy on pairs ``(x_t, y)`` with ``t`` uniform on ``[eps, T]`` and ``(x_0, y)`` from
the labelled data (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis",
Sec. 4; Song et al. 2021, "Score-Based Generative Modeling through SDEs", Sec. 5, "controllable
generation", which trains its CIFAR-10 classifier this way). Classifier guidance then adds
:math:`w\,\nabla_{x}\log p_\phi(y\mid x_t, t)` to the score (Dhariwal & Nichol, Algorithms 1
and 2; Song et al.'s conditional reverse SDE, eq. 14, is ``w = 1``).

Two networks, both ``net(x, t_in) -> logits (batch, num_classes)``:

- :class:`MLPClassifier` for low-dimensional data: the residual blocks of
  :class:`~sde_diffusion.models.TimeMLP` (time conditions every block) and a linear head;
- :class:`UNetClassifier` for images: the downsampling half and the middle of
  :class:`~sde_diffusion.models.UNet` (the same residual and attention blocks), then GroupNorm,
  activation, global average pooling and a linear head (Dhariwal & Nichol's classifier is this
  encoder with attention pooling; mean pooling is enough at 8x8).

:class:`NoisyClassifier` wraps either for use: ``clf(x, t)`` (same as :meth:`~NoisyClassifier.log_prob`)
returns ``log p(y | x_t, t)`` for every class, shape ``(batch, num_classes)``, with the time handed
to the network as ``t``, ``sigma(t)`` or a DDPM index as for a score model; ``grad_log_prob`` gives
``grad_x log p(y | x_t, t)`` for given labels, the term classifier guidance adds to the score.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .._checks import TimeLike, require
from ..sdes import SDE
from .embeddings import Conditioning, get_activation
from .mlp import _Trunk
from .unet import AttnBlock, ResBlock, _check_layout, _Downsample, _norm, _Step

__all__ = ["MLPClassifier", "UNetClassifier", "NoisyClassifier", "CLASSIFIER_NETWORKS"]


def _check_classes(num_classes) -> int:
    require(isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 2,
            f"a classifier needs num_classes, an integer >= 2, got {num_classes!r}")
    return num_classes


class MLPClassifier(_Trunk):
    """``x (B, dim), t (B,) -> logits (B, num_classes)``: ``h = Linear(dim, hidden)(x)``, ``depth``
    time-conditioned residual blocks (those of :class:`~sde_diffusion.models.TimeMLP`), then
    ``Linear(hidden, num_classes)(act(h))``. The head starts at zero, so an untrained classifier
    says ``1/K`` for every class.

    Args:
        dim: data dimension. num_classes: ``K >= 2``.
        hidden, depth, time_embedding, embed_dim, fourier_scale, activation, time_transform,
            time_scale: as for :class:`~sde_diffusion.models.TimeMLP`.
    """

    def __init__(self, dim: int, num_classes: int = 2, hidden: int = 128, depth: int = 3,
                 time_embedding: str = "fourier", embed_dim: int = 64, fourier_scale: float = 16.0,
                 activation: str = "silu", time_transform: str = "identity",
                 time_scale: Optional[float] = None):
        super().__init__(dim, hidden, depth, time_embedding, embed_dim, fourier_scale, None, activation,
                         time_transform, time_scale)          # unconditional trunk: no label input
        self.num_classes = _check_classes(num_classes)
        self.head = nn.Linear(hidden, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.head(self.features(x, t))


class UNetClassifier(nn.Module):
    """``x (B, C, H, W), t (B,) -> logits (B, num_classes)``: the encoder half of
    :class:`~sde_diffusion.models.UNet` (per level ``num_res_blocks`` residual blocks with
    attention at ``attn_resolutions``, a stride-2 conv between levels; then block, attention,
    block), GroupNorm, activation, mean over the positions and ``Linear(channels, num_classes)``
    (zero-initialised).

    Args: as :class:`~sde_diffusion.models.UNet` (``image_size``, ``in_channels``,
    ``base_channels``, ``channel_mults``, ``num_res_blocks``, ``attn_resolutions``, ``dropout``,
    ``time_embedding``, ``embed_dim``, ``fourier_scale``, ``skip_rescale``, ``activation``,
    ``time_transform``, ``time_scale``) and ``num_classes >= 2``.
    """

    def __init__(self, image_size: int = 8, in_channels: int = 1, num_classes: int = 10,
                 base_channels: int = 32, channel_mults: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, attn_resolutions: Sequence[int] = (4,),
                 dropout: float = 0.0, time_embedding: str = "fourier",
                 embed_dim: Optional[int] = None, fourier_scale: float = 16.0,
                 skip_rescale: bool = True, activation: str = "silu",
                 time_transform: str = "identity", time_scale: Optional[float] = None):
        super().__init__()
        mults, attn_res = _check_layout(image_size, in_channels, base_channels, num_res_blocks,
                                        channel_mults, attn_resolutions, dropout, "classifier")
        self.image_size, self.in_channels = image_size, in_channels
        self.num_classes = _check_classes(num_classes)
        nf, temb_dim = base_channels, 4 * base_channels
        self.act = get_activation(activation)
        self.cond = Conditioning(temb_dim, time_embedding, nf if embed_dim is None else embed_dim,
                                 fourier_scale, None, activation, time_transform, time_scale)

        def block(cin, cout):
            return ResBlock(cin, cout, temb_dim, dropout, skip_rescale, activation)

        self.conv_in = nn.Conv2d(in_channels, nf, 3, padding=1)
        steps, ch, res = [], nf, image_size
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                steps.append(_Step(block(ch, nf * mult),
                                   AttnBlock(nf * mult, skip_rescale) if res in attn_res else None))
                ch = nf * mult
            if level != len(mults) - 1:
                steps.append(_Downsample(ch))
                res //= 2
        steps += [_Step(block(ch, ch), AttnBlock(ch, skip_rescale)), _Step(block(ch, ch))]
        self.steps = nn.ModuleList(steps)
        self.norm_out = _norm(ch)
        self.head = nn.Linear(ch, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        require(isinstance(x, torch.Tensor) and x.ndim == 4 and tuple(x.shape[1:]) == expected,
                f"x must have shape (batch, {', '.join(map(str, expected))}) for this classifier, "
                f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        temb = self.cond(x, t)
        h = self.conv_in(x)
        for step in self.steps:
            h = step(h, temb)
        return self.head(self.act(self.norm_out(h)).mean(dim=(2, 3)))


#: the classifier networks by config name (``config.model.name``).
CLASSIFIER_NETWORKS = {"mlp_classifier": MLPClassifier, "unet_classifier": UNetClassifier}

_TIME_INPUTS = ("t", "sigma", "index")


class NoisyClassifier:
    r"""A trained noise-conditional classifier as a callable: ``clf(x, t) -> log p(y | x_t, t)``
    of shape ``(batch, num_classes)`` (a log-softmax of the network's logits).

    Args:
        net: ``net(x, t_in) -> logits (batch, K)`` (:class:`MLPClassifier`, :class:`UNetClassifier`
            or your own module with a ``num_classes`` attribute, or pass ``num_classes``).
        sde: the forward SDE of the noisy data it was trained on (``x_t`` means that SDE's marginal).
        time_input: what the network receives: ``t`` (default), ``sigma`` (``sigma(t)``) or
            ``index`` (``t (N - 1) / T``), as for :class:`~sde_diffusion.models.ScoreModel`.
        num_classes: ``K``; read from ``net.num_classes`` when not given.

    ``t`` is a number or a ``(batch,)`` tensor in ``[0, T]`` (checked on the CPU, as in
    ``ScoreModel``). The network runs in its parameters' dtype; log-probabilities come back in
    ``x``'s. ``nfe`` counts network evaluations.
    """

    def __init__(self, net: nn.Module, sde: SDE, time_input: str = "t",
                 num_classes: Optional[int] = None):
        require(callable(net), f"net must be callable, got {type(net).__name__}")
        require(isinstance(sde, SDE), f"sde must be an SDE instance, got {sde!r}")
        require(time_input in _TIME_INPUTS,
                f"a classifier's time_input must be one of {_TIME_INPUTS}, got {time_input!r}")
        num_classes = getattr(net, "num_classes", None) if num_classes is None else num_classes
        self.net, self.sde, self.time_input = net, sde, time_input
        self.num_classes = _check_classes(num_classes)
        self.nfe = 0

    def _dtype(self) -> Optional[torch.dtype]:
        if isinstance(self.net, nn.Module):
            for p in self.net.parameters():
                if p.is_floating_point():
                    return p.dtype
        return None

    def logits(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """The network's logits ``(batch, K)`` at ``(x, t)``, in ``x``'s dtype; one NFE."""
        require(isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 2,
                f"x must be a floating (batch, ...) tensor, got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        t = self.sde.time(t, x, sync=False)
        if self.time_input == "sigma":
            t_in = self.sde.log_sigma(t, sync=False).exp()
        elif self.time_input == "index":
            t_in = t * (self.sde.N - 1) / self.sde.T
        else:
            t_in = t
        dtype = self._dtype()
        out = self.net(x if dtype is None else x.to(dtype), t_in if dtype is None else t_in.to(dtype))
        self.nfe += 1
        require(isinstance(out, torch.Tensor) and out.shape == (x.shape[0], self.num_classes),
                f"the classifier network must return logits of shape ({x.shape[0]}, "
                f"{self.num_classes}), got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out.to(x.dtype)

    def log_prob(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``log p(y | x_t, t)`` for every class ``y``: ``(batch, num_classes)``."""
        return torch.log_softmax(self.logits(x, t), dim=-1)

    __call__ = log_prob

    def grad_log_prob(self, x: torch.Tensor, t: TimeLike, y: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_x \log p(y \mid x_t, t)` for labels ``y`` (``(batch,)`` integers in
        ``[0, K)``), shaped like ``x``: the term classifier guidance adds to the score (scaled by
        its guidance weight). Computed with autograd, also under ``torch.no_grad()``."""
        y = torch.as_tensor(y, device=x.device)
        require(not y.is_floating_point() and y.shape == (x.shape[0],),
                f"y must be an integer (batch,) tensor with batch {x.shape[0]}, got "
                f"{y.dtype} of shape {tuple(y.shape)}")
        if y.device.type == "cpu" and y.numel():
            require(int(y.min()) >= 0 and int(y.max()) < self.num_classes,
                    f"labels must lie in [0, {self.num_classes}), got values in "
                    f"[{int(y.min())}, {int(y.max())}]")
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lp = self.log_prob(xg, t).gather(1, y.long()[:, None]).sum()
            (grad,) = torch.autograd.grad(lp, xg)
        return grad

    def train(self, mode: bool = True) -> "NoisyClassifier":
        if isinstance(self.net, nn.Module):
            self.net.train(mode)
        return self

    def eval(self) -> "NoisyClassifier":
        return self.train(False)

    def __repr__(self) -> str:
        return (f"NoisyClassifier({type(self.net).__name__}, K={self.num_classes}, sde={self.sde}, "
                f"time_input={self.time_input!r})")
