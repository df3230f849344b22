r"""A DDPM++/NCSN++-style U-Net for small images (Ho et al. 2020; Song et al. 2021, App. H).

Per resolution level (channels ``base_channels * mult``): ``num_res_blocks`` residual blocks
(GroupNorm, SiLU, 3x3 conv, time-embedding projection added, GroupNorm, SiLU, dropout, 3x3 conv),
self-attention after each block at the resolutions in ``attn_resolutions``, then a downsampling
(stride-2 conv, or a BigGAN-style residual block with average pooling when ``resblock_updown``).
The middle is block, attention, block. The upsampling path mirrors it with ``num_res_blocks + 1``
blocks per level, each taking the matching skip activation concatenated on channels, and nearest
upsampling + conv (or a residual block with nearest upsampling). Residual sums (blocks and
attention) are divided by sqrt(2) when ``skip_rescale`` (DDPM++). The second conv of each block,
the attention output projection and the output conv start at zero, as in DDPM/score_sde
(``init_scale=0``), so each block starts as its (rescaled) shortcut and the network outputs 0.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import require
from .embeddings import Conditioning, get_activation

__all__ = ["UNet", "ResBlock", "AttnBlock"]


def _groups(channels: int) -> int:
    """score_sde's ``min(channels // 4, 32)`` GroupNorm groups, lowered to a divisor of channels."""
    g = min(32, max(1, channels // 4))
    while channels % g:
        g -= 1
    return g


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with time conditioning; ``up``/``down`` resample both branches (BigGAN)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0,
                 skip_rescale: bool = True, activation: str = "silu", up: bool = False,
                 down: bool = False):
        super().__init__()
        self.act = get_activation(activation)
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        self.norm0 = _norm(in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        nn.init.zeros_(self.temb_proj.bias)
        self.norm1 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self._resample(self.act(self.norm0(x)))
        x = self._resample(x)
        h = self.conv0(h) + self.temb_proj(temb)[:, :, None, None]
        h = self.conv1(self.dropout(self.act(self.norm1(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``H * W`` positions, residual."""

    def __init__(self, channels: int, skip_rescale: bool = True):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)            # (B, HW, C), scale 1/sqrt(C)
        h = self.proj(h.transpose(-1, -2).reshape(B, C, H, W))
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class _Step(nn.Module):
    """A residual block followed by optional attention; ``takes_skip`` on the upsampling path."""

    def __init__(self, block: nn.Module, attn: Optional[nn.Module] = None, takes_skip: bool = False):
        super().__init__()
        self.block, self.attn, self.takes_skip = block, attn, takes_skip

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block(h, temb)
        return self.attn(h) if self.attn is not None else h


class _Downsample(nn.Module):
    takes_skip = False

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.conv(h)


class _Upsample(nn.Module):
    takes_skip = False

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))


def _int_tuple(name: str, value, allow_empty: bool) -> tuple:
    try:
        out = tuple(int(v) for v in value)
        ok = all(int(v) == v and v >= 1 for v in value)
    except (TypeError, ValueError):
        out, ok = (), False
    require(ok and (allow_empty or len(out) >= 1),
            f"{name} must be a {'possibly empty ' if allow_empty else 'non-empty '}sequence of "
            f"positive integers, got {value!r}")
    return out


def _check_layout(image_size: int, in_channels: int, base_channels: int, num_res_blocks: int,
                  channel_mults: Sequence[int], attn_resolutions: Sequence[int], dropout: float,
                  network: str) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Checks the sizes of a U-Net-shaped ``network`` (:class:`UNet`, ``UNetClassifier``):
    positive integer sizes, ``image_size`` divisible by ``2 ** (len(channel_mults) - 1)``, every
    attention resolution one of the levels' sides, dropout in ``[0, 1)``. Returns
    ``(channel_mults, attn_resolutions)`` as integer tuples."""
    for name, value in (("image_size", image_size), ("in_channels", in_channels),
                        ("base_channels", base_channels), ("num_res_blocks", num_res_blocks)):
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}")
    mults = _int_tuple("channel_mults", channel_mults, allow_empty=False)
    attn_res = _int_tuple("attn_resolutions", attn_resolutions, allow_empty=True)
    factor = 2 ** (len(mults) - 1)
    require(image_size % factor == 0,
            f"image_size={image_size} must be divisible by 2**(len(channel_mults)-1) = {factor} "
            f"(channel_mults={mults}); use fewer levels or another image size")
    resolutions = [image_size // 2 ** i for i in range(len(mults))]
    unknown = [r for r in attn_res if r not in resolutions]
    require(not unknown, f"attn_resolutions {unknown} do not occur in this {network}; its resolutions "
                         f"are {resolutions}")
    require(0.0 <= float(dropout) < 1.0, f"dropout must lie in [0, 1), got {dropout!r}")
    return mults, attn_res


class UNet(nn.Module):
    """``x (B, C, H, W), t (B,) [, y (B,)] -> (B, C, H, W)`` with ``H = W = image_size``.

    Args:
        image_size: input height and width; divisible by ``2 ** (len(channel_mults) - 1)``.
        in_channels: image channels (also the output channels).
        base_channels: channels of the first level (``nf`` in score_sde).
        channel_mults: channel multiplier per level; one downsampling between consecutive levels.
        num_res_blocks: residual blocks per level on the way down (``+1`` on the way up).
        attn_resolutions: resolutions (side lengths) with self-attention; each must occur.
        dropout: dropout rate inside the residual blocks.
        time_embedding: ``"fourier"`` or ``"sinusoidal"`` (see :mod:`.embeddings`).
        embed_dim: size of the raw time features; ``None`` means ``base_channels``. The
            embedding MLP maps them to ``4 * base_channels`` as in DDPM.
        fourier_scale: std of the Fourier frequencies.
        skip_rescale: divide residual sums by sqrt(2).
        num_classes: ``K`` for class conditioning (``K + 1`` labels, ``K`` = null), or ``None``.
        resblock_updown: resample with residual blocks instead of conv / interpolate + conv.
        activation, time_transform, time_scale: see :class:`.embeddings.TimeEmbedding`.
    """

    def __init__(self, image_size: int = 16, in_channels: int = 1, base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (8,), dropout: float = 0.0,
                 time_embedding: str = "fourier", embed_dim: Optional[int] = None,
                 fourier_scale: float = 16.0, skip_rescale: bool = True,
                 num_classes: Optional[int] = None, resblock_updown: bool = False,
                 activation: str = "silu", time_transform: str = "identity",
                 time_scale: Optional[float] = None):
        super().__init__()
        mults, attn_res = _check_layout(image_size, in_channels, base_channels, num_res_blocks,
                                        channel_mults, attn_resolutions, dropout, "U-Net")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.channel_mults, self.attn_resolutions = mults, attn_res

        nf, temb_dim = base_channels, 4 * base_channels
        embed_dim = nf if embed_dim is None else embed_dim
        self.act = get_activation(activation)
        self.cond = Conditioning(temb_dim, time_embedding, embed_dim, fourier_scale, num_classes, activation,
                                 time_transform, time_scale)

        def block(cin, cout, **kw):
            return ResBlock(cin, cout, temb_dim, dropout, skip_rescale, activation, **kw)

        def attn(ch, res):
            return AttnBlock(ch, skip_rescale) if res in attn_res else None

        self.conv_in = nn.Conv2d(in_channels, nf, 3, padding=1)
        down, skip_channels, ch, res = [], [nf], nf, image_size
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                down.append(_Step(block(ch, nf * mult), attn(nf * mult, res)))
                ch = nf * mult
                skip_channels.append(ch)
            if level != len(mults) - 1:
                down.append(_Step(block(ch, ch, down=True)) if resblock_updown else _Downsample(ch))
                res //= 2
                skip_channels.append(ch)
        self.down = nn.ModuleList(down)
        self.mid = nn.ModuleList([_Step(block(ch, ch), AttnBlock(ch, skip_rescale)), _Step(block(ch, ch))])
        up = []
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(num_res_blocks + 1):
                up.append(_Step(block(ch + skip_channels.pop(), nf * mult), attn(nf * mult, res),
                                takes_skip=True))
                ch = nf * mult
            if level != 0:
                up.append(_Step(block(ch, ch, up=True)) if resblock_updown else _Upsample(ch))
                res *= 2
        assert not skip_channels
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        require(isinstance(x, torch.Tensor) and x.ndim == 4 and tuple(x.shape[1:]) == expected,
                f"x must have shape (batch, {', '.join(map(str, expected))}) for this U-Net "
                f"(in_channels={self.in_channels}, image_size={self.image_size}), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        temb = self.cond(x, t, y)      # act(temb): every block applies Linear(act(temb)), as score_sde

        h = self.conv_in(x)
        hs = [h]
        for step in self.down:
            h = step(h, temb)
            hs.append(h)
        for step in self.mid:
            h = step(h, temb)
        for step in self.up:
            if step.takes_skip:
                h = torch.cat([h, hs.pop()], dim=1)
            h = step(h, temb)
        return self.conv_out(self.act(self.norm_out(h)))
