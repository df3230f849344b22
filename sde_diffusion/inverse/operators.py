r"""Linear observation operators ``y = A x + sigma_y n`` for inverse problems.

Every operator acts on batched tensors ``x`` of shape ``(batch, *in_shape)`` and returns
``(batch, *out_shape)``, in ``x``'s dtype and on its device. Besides ``A`` it gives the adjoint
``At`` (``<A x, y> = <x, At y>``), where cheap the Moore--Penrose pseudo-inverse ``pinv``
(``A pinv(A) A = A``), a singular value decomposition :class:`OperatorSVD` in the flattened spaces
(what DDRM / DDNM+ work in) and the dense matrix (for the exact posterior, :mod:`.posterior`).

- :class:`Mask` -- inpainting: ``y`` is the observed entries of ``x`` (a selection, so
  ``A A^T = I`` and ``pinv = At``); builders :func:`box_mask`, :func:`half_mask`,
  :func:`random_pixel_mask`.
- :class:`Colorization` -- ``y`` the grey image (the channel mean). Its SVD's ``V`` is an
  orthogonal colour transform whose first axis is the grey direction ``(1, ..., 1)/sqrt(C)``, the
  decoupling score_sde's colorization works in (Song et al. 2021, App. I.2).
- :class:`BlockAverage` -- super-resolution: the mean of ``factor x factor`` blocks of the last two
  axes; ``pinv`` is nearest-neighbour upsampling (exact).
- :class:`Dense` -- any ``(d_y, d_x)`` matrix (random projections); pinv and SVD by LAPACK, cached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from .._checks import require
from ..samplers.base import GeneratorLike, NoiseSource

__all__ = ["LinearOperator", "OperatorSVD", "Mask", "Colorization", "BlockAverage", "Dense",
           "box_mask", "half_mask", "random_pixel_mask", "observe", "HALVES"]

Shape = Union[int, Sequence[int], torch.Size]


def _shape(shape: Shape, name: str) -> torch.Size:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    require(len(shape) >= 1 and all(isinstance(s, int) and s >= 1 for s in shape),
            f"{name} must be a non-empty shape of positive integers, got {shape}")
    return torch.Size(shape)


@dataclass(frozen=True)
class OperatorSVD:
    """``A = U[:, :k] diag(singular_values) V[:, :k]^T`` on the flattened spaces (``d_y = out_dim``,
    ``d_x = in_dim``, ``k = len(singular_values) <= min(d_y, d_x)``; zeros allowed).

    ``Vt(x)`` maps ``(batch, d_x)`` to the spectral coordinates ``(batch, d_x)``, whose first ``k``
    belong to the singular values in order; ``V`` is its inverse (``V`` orthogonal). ``Ut``/``U``
    do the same on ``(batch, d_y)``."""

    U: Callable[[torch.Tensor], torch.Tensor]
    Ut: Callable[[torch.Tensor], torch.Tensor]
    V: Callable[[torch.Tensor], torch.Tensor]
    Vt: Callable[[torch.Tensor], torch.Tensor]
    singular_values: torch.Tensor


class LinearOperator:
    """A linear map from ``in_shape`` events to ``out_shape`` events, applied per sample.

    Subclasses set ``in_shape``/``out_shape`` and implement ``_a``/``_at`` on flattened
    ``(batch, d)`` tensors; ``_pinv`` and ``_svd`` where cheap. ``matrix()`` defaults to applying
    ``A`` to the identity; ``svd()`` defaults to a dense SVD of it."""

    in_shape: torch.Size
    out_shape: torch.Size

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.out_shape)

    def __repr__(self) -> str:
        return f"{self.name}(in_shape={tuple(self.in_shape)}, out_shape={tuple(self.out_shape)})"

    # ---- checked batched views ----------------------------------------------------------------
    def _flat(self, x: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
        require(isinstance(x, torch.Tensor) and x.is_floating_point(),
                f"{self.name}: {what} must be a floating-point tensor, got "
                f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        require(x.ndim >= 1 and x.shape[1:] == shape,
                f"{self.name}: {what} must have shape (batch, {', '.join(map(str, shape))}), "
                f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``: ``(batch, *in_shape) -> (batch, *out_shape)``."""
        return self._a(self._flat(x, self.in_shape, "x")).reshape((x.shape[0],) + self.out_shape)

    def At(self, y: torch.Tensor) -> torch.Tensor:
        """The adjoint ``A^T y``: ``(batch, *out_shape) -> (batch, *in_shape)``."""
        return self._at(self._flat(y, self.out_shape, "y")).reshape((y.shape[0],) + self.in_shape)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """The Moore--Penrose pseudo-inverse ``A^+ y``: ``(batch, *out_shape) -> (batch, *in_shape)``;
        ``NotImplementedError`` where the operator has no cheap one."""
        return self._pinv(self._flat(y, self.out_shape, "y")).reshape((y.shape[0],) + self.in_shape)

    def row_space(self, x: torch.Tensor) -> torch.Tensor:
        """The orthogonal projection ``A^+ A x`` onto the row space of ``A`` (the "range-space" part
        of DDNM; for a mask: the observed entries, zeros elsewhere)."""
        return self.pinv(self.A(x))

    def supports(self, feature: str) -> bool:
        """Whether ``feature`` (``A``, ``At``, ``pinv``, ``svd``, ``matrix``) is available, without
        computing it: only ``pinv`` may be missing (``svd`` and ``matrix`` fall back to dense)."""
        require(feature in ("A", "At", "pinv", "svd", "matrix"),
                f"feature must be one of A, At, pinv, svd, matrix, got {feature!r}")
        return feature != "pinv" or type(self)._pinv is not LinearOperator._pinv

    # ---- flattened implementation -------------------------------------------------------------
    def _a(self, xf: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _at(self, yf: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pinv(self, yf: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no cheap pseudo-inverse")

    def svd(self) -> OperatorSVD:
        """The SVD (dense, through ``matrix()``, unless the operator has a structured one)."""
        return _dense_svd(self.matrix())

    def matrix(self, dtype: torch.dtype = torch.float64,
               device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """The dense ``(d_y, d_x)`` matrix of ``A`` (``A`` applied to the identity; fine for
        ``d_x`` up to a few thousand)."""
        eye = torch.eye(self.in_dim, dtype=dtype, device=device)
        return self._a(eye).T.contiguous()


def _dense_svd(M: torch.Tensor) -> OperatorSVD:
    """The SVD of a dense matrix, applied in the dtype and on the device of each input."""
    U, S, Vh = torch.linalg.svd(M.to(torch.float64), full_matrices=True)
    cache: Dict[Tuple[torch.dtype, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}

    def mats(like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (like.dtype, like.device)
        if key not in cache:
            cache[key] = (U.to(like.device, like.dtype), Vh.to(like.device, like.dtype))
        return cache[key]

    return OperatorSVD(U=lambda z: z @ mats(z)[0].T, Ut=lambda y: y @ mats(y)[0],
                       V=lambda z: z @ mats(z)[1], Vt=lambda x: x @ mats(x)[1].T,
                       singular_values=S)


class _Cached:
    """Copies of a float64 tensor per (dtype, device), made once."""

    def __init__(self, value: torch.Tensor):
        self.value = value
        self._copies: Dict[Tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if key not in self._copies:
            self._copies[key] = self.value.to(device=x.device, dtype=x.dtype)
        return self._copies[key]


# ---- masks ------------------------------------------------------------------------------------
class Mask(LinearOperator):
    """Inpainting: ``y = x[mask]``, the entries where ``mask`` is true (in row-major order), so
    ``out_shape = (n_observed,)``, ``A A^T = I`` and ``A^+ = A^T`` (zeros where unobserved).
    ``mask`` has the event shape of ``x`` (bool, or 0/1 numbers); at least one entry observed."""

    def __init__(self, mask):
        m = torch.as_tensor(mask)
        if m.dtype != torch.bool:
            require(not m.is_complex(), f"mask must be boolean or 0/1 numbers, got dtype {m.dtype}")
            require(bool(((m == 0) | (m == 1)).all()), "mask must hold only 0 and 1 (or booleans)")
            m = m != 0
        require(m.ndim >= 1, f"mask must have the event shape of x (at least 1-d), got shape {tuple(m.shape)}")
        m = m.cpu()
        n = int(m.sum())
        require(n >= 1, "mask observes nothing: at least one entry must be true")
        self.mask = m
        self.in_shape = m.shape
        self.out_shape = torch.Size((n,))
        flat = m.flatten()
        self.observed = flat.nonzero().squeeze(1)
        self.missing = (~flat).nonzero().squeeze(1)
        self._idx: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _index(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.device not in self._idx:
            self._idx[x.device] = (self.observed.to(x.device), self.missing.to(x.device))
        return self._idx[x.device]

    def mask_like(self, x: torch.Tensor) -> torch.Tensor:
        """The mask as 0/1 numbers in ``x``'s dtype and device, shaped ``(1, *in_shape)``."""
        return self.mask.to(device=x.device, dtype=x.dtype)[None]

    def _a(self, xf):
        return xf[:, self._index(xf)[0]]

    def _at(self, yf):
        out = yf.new_zeros((yf.shape[0], self.in_dim))
        out[:, self._index(yf)[0]] = yf
        return out

    def _pinv(self, yf):
        return self._at(yf)

    def svd(self) -> OperatorSVD:
        """``V^T x`` lists the observed entries, then the missing ones; ``U = I``; singular values
        all one."""
        def vt(x):
            obs, mis = self._index(x)
            return torch.cat([x[:, obs], x[:, mis]], dim=1)

        def v(z):
            obs, mis = self._index(z)
            out = torch.empty_like(z)
            out[:, obs] = z[:, :len(obs)]
            out[:, mis] = z[:, len(obs):]
            return out

        ident = lambda z: z  # noqa: E731
        return OperatorSVD(U=ident, Ut=ident, V=v, Vt=vt,
                           singular_values=torch.ones(self.out_dim, dtype=torch.float64))


def box_mask(shape: Shape, box: Union[int, Tuple[int, int, int, int], None] = None) -> torch.Tensor:
    """A mask of event ``shape`` (``(..., H, W)``) observing everything but a box over the last two
    axes: ``box=(top, left, height, width)``, or an int ``s`` for a centred ``s x s`` box (default
    half the smaller side)."""
    shape = _shape(shape, "shape")
    require(len(shape) >= 2, f"box_mask needs an image shape (..., H, W), got {tuple(shape)}")
    H, W = shape[-2:]
    if box is None or isinstance(box, int):
        s = min(H, W) // 2 if box is None else box
        require(1 <= s <= min(H, W), f"box size must lie in [1, {min(H, W)}], got {s}")
        box = ((H - s) // 2, (W - s) // 2, s, s)
    require(len(box) == 4, f"box must be (top, left, height, width) or an int, got {box!r}")
    top, left, h, w = (int(b) for b in box)
    require(0 <= top and 0 <= left and h >= 1 and w >= 1 and top + h <= H and left + w <= W,
            f"box {tuple(box)} does not fit an image of {H} x {W}")
    m = torch.ones(shape, dtype=torch.bool)
    m[..., top:top + h, left:left + w] = False
    return m


HALVES = ("lower-half", "upper-half", "left-half", "right-half")


def half_mask(shape: Shape, missing: str = "lower-half") -> torch.Tensor:
    """A mask of event ``shape`` (``(..., H, W)``; a 1-d ``(d,)`` splits the vector) that hides
    one half: ``missing`` in :data:`HALVES` (``lower-half`` hides the bottom rows)."""
    shape = _shape(shape, "shape")
    require(missing in HALVES, f"missing must be one of {', '.join(HALVES)}, got {missing!r}")
    m = torch.ones(shape, dtype=torch.bool)
    if len(shape) == 1:
        require(missing in ("lower-half", "upper-half"),
                f"a 1-d shape has only a lower and an upper half, got {missing!r}")
        d = shape[0]
        require(d >= 2, f"half_mask needs at least 2 entries, got shape {tuple(shape)}")
        if missing == "lower-half":
            m[d // 2:] = False
        else:
            m[:d - d // 2] = False
        return m
    H, W = shape[-2:]
    if missing == "lower-half":
        m[..., H // 2:, :] = False
    elif missing == "upper-half":
        m[..., :H - H // 2, :] = False
    elif missing == "left-half":
        m[..., :, :W - W // 2] = False
    else:
        m[..., :, W // 2:] = False
    return m


def random_pixel_mask(shape: Shape, keep: float = 0.2, seed: int = 0,
                      per_channel: bool = False) -> torch.Tensor:
    """A mask observing a random fraction ``keep`` of the pixels (seeded). For an image shape
    ``(C, H, W)`` a pixel's channels are observed together unless ``per_channel``."""
    shape = _shape(shape, "shape")
    require(0 < keep <= 1, f"keep must lie in (0, 1], got {keep!r}")
    g = torch.Generator().manual_seed(seed)
    draw = shape if per_channel or len(shape) < 3 else shape[1:]
    n = math.prod(draw)
    k = max(1, round(keep * n))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=g)[:k]] = True
    return flat.reshape(draw).expand(shape).clone()


# ---- colour and blocks: orthonormal bases whose first vector is the mean direction ---------------
def _mean_basis(n: int) -> torch.Tensor:
    """An orthogonal symmetric ``(n, n)`` matrix whose first column is ``(1, ..., 1)/sqrt(n)``
    (the Householder reflection taking ``e_1`` there)."""
    u = torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64)
    w = u.clone()
    w[0] -= 1.0
    if float(w.norm()) < 1e-15:
        return torch.eye(n, dtype=torch.float64)
    return torch.eye(n, dtype=torch.float64) - 2 * torch.outer(w, w) / (w @ w)


class Colorization(LinearOperator):
    """``y`` = the grey image, the mean over the channel axis (axis 0 of ``in_shape = (C, ...)``),
    ``out_shape = (1, ...)``. Per pixel ``A = 1^T / C``: one singular value ``1/sqrt(C)``,
    ``A^+ y`` copies the grey value into every channel. ``V`` is an orthogonal colour transform
    whose first axis is the grey direction (score_sde's decoupling: the grey coordinate is known,
    the other ``C - 1`` are inpainted)."""

    def __init__(self, in_shape: Shape = (3, 8, 8)):
        self.in_shape = _shape(in_shape, "in_shape")
        require(len(self.in_shape) >= 2 and self.in_shape[0] >= 2,
                f"Colorization needs in_shape (C >= 2, ...) with the channel axis first, got "
                f"{tuple(self.in_shape)}")
        self.channels = self.in_shape[0]
        self.out_shape = torch.Size((1,) + tuple(self.in_shape[1:]))
        self.basis = _Cached(_mean_basis(self.channels))     # columns: grey, then colour axes

    def _a(self, xf):
        return xf.view(xf.shape[0], self.channels, -1).mean(1)

    def _at(self, yf):
        return (yf / self.channels).repeat(1, self.channels)

    def _pinv(self, yf):
        return yf.repeat(1, self.channels)

    def svd(self) -> OperatorSVD:
        """``V^T x``: the coordinates along the basis vectors, grey ones (``(x_1 + ... + x_C)/sqrt(C)``
        per pixel) first; ``U = I``; singular values ``1/sqrt(C)``."""
        C = self.channels

        def vt(x):
            return torch.einsum("bcp,cj->bjp", x.view(x.shape[0], C, -1), self.basis.like(x)).reshape(x.shape)

        def v(z):
            return torch.einsum("bjp,cj->bcp", z.view(z.shape[0], C, -1), self.basis.like(z)).reshape(z.shape)

        ident = lambda z: z  # noqa: E731
        s = torch.full((self.out_dim,), 1 / math.sqrt(C), dtype=torch.float64)
        return OperatorSVD(U=ident, Ut=ident, V=v, Vt=vt, singular_values=s)


class BlockAverage(LinearOperator):
    """Super-resolution: ``y`` = the means of the ``factor x factor`` blocks of the last two axes of
    ``in_shape = (..., H, W)`` (``H``, ``W`` divisible by ``factor``), ``out_shape = (..., H/f, W/f)``.
    ``A A^T = I / f^2``, so ``A^+ = f^2 A^T``: nearest-neighbour upsampling, exact. Singular values
    ``1/f``."""

    def __init__(self, factor: int, in_shape: Shape = (1, 8, 8)):
        self.in_shape = _shape(in_shape, "in_shape")
        require(isinstance(factor, int) and not isinstance(factor, bool) and factor >= 1,
                f"factor must be an integer >= 1, got {factor!r}")
        require(len(self.in_shape) >= 2, f"BlockAverage needs in_shape (..., H, W), got {tuple(self.in_shape)}")
        H, W = self.in_shape[-2:]
        require(H % factor == 0 and W % factor == 0,
                f"factor {factor} must divide the image size {H} x {W}")
        self.factor = factor
        self.out_shape = torch.Size(tuple(self.in_shape[:-2]) + (H // factor, W // factor))
        self.basis = _Cached(_mean_basis(factor * factor))

    def _blocks(self, xf: torch.Tensor) -> torch.Tensor:
        """``(batch, L, h, w, f*f)``: the blocks (``L`` the leading axes flattened)."""
        f, (H, W) = self.factor, self.in_shape[-2:]
        x = xf.view(xf.shape[0], -1, H // f, f, W // f, f)
        return x.permute(0, 1, 2, 4, 3, 5).reshape(xf.shape[0], x.shape[1], H // f, W // f, f * f)

    def _unblock(self, b: torch.Tensor) -> torch.Tensor:
        f = self.factor
        B, L, h, w, _ = b.shape
        return b.view(B, L, h, w, f, f).permute(0, 1, 2, 4, 3, 5).reshape(B, -1)

    def _a(self, xf):
        return self._blocks(xf).mean(-1).reshape(xf.shape[0], -1)

    def _at(self, yf):
        return self._pinv(yf) / (self.factor ** 2)

    def _pinv(self, yf):
        h, w = self.out_shape[-2:]
        b = yf.reshape(yf.shape[0], -1, h, w, 1).expand(-1, -1, -1, -1, self.factor ** 2)
        return self._unblock(b.contiguous())

    def svd(self) -> OperatorSVD:
        """``V^T x``: each block in an orthonormal basis whose first vector is the block mean
        direction; the ``d_y`` first coordinates (``f`` times the block means) come first."""
        f2 = self.factor ** 2

        def vt(x):
            b = self._blocks(x) @ self.basis.like(x)                 # (B, L, h, w, f2), symmetric basis
            return b.permute(0, 4, 1, 2, 3).reshape(x.shape[0], -1)

        def v(z):
            B = z.shape[0]
            L = math.prod(self.in_shape[:-2]) if len(self.in_shape) > 2 else 1
            h, w = self.out_shape[-2:]
            b = z.view(B, f2, L, h, w).permute(0, 2, 3, 4, 1) @ self.basis.like(z).T
            return self._unblock(b)

        ident = lambda z: z  # noqa: E731
        s = torch.full((self.out_dim,), 1 / self.factor, dtype=torch.float64)
        return OperatorSVD(U=ident, Ut=ident, V=v, Vt=vt, singular_values=s)


class Dense(LinearOperator):
    """``y = M x_flat`` for a ``(d_y, d_x)`` matrix ``M`` (``in_shape`` defaults to ``(d_x,)``);
    pseudo-inverse and SVD computed once in float64 (LAPACK) and cached."""

    def __init__(self, matrix, in_shape: Optional[Shape] = None):
        M = torch.as_tensor(matrix).detach()
        require(M.ndim == 2 and M.is_floating_point(),
                f"matrix must be a 2-d floating-point (d_y, d_x) tensor, got shape {tuple(M.shape)}")
        require(bool(torch.isfinite(M).all()), "matrix must be finite")
        self.M = _Cached(M.to("cpu", torch.float64))
        self.in_shape = torch.Size((M.shape[1],)) if in_shape is None else _shape(in_shape, "in_shape")
        require(self.in_dim == M.shape[1],
                f"in_shape {tuple(self.in_shape)} has {self.in_dim} entries but the matrix has "
                f"{M.shape[1]} columns")
        self.out_shape = torch.Size((M.shape[0],))
        self._pinv_m: Optional[_Cached] = None
        self._svd: Optional[OperatorSVD] = None

    def _a(self, xf):
        return xf @ self.M.like(xf).T

    def _at(self, yf):
        return yf @ self.M.like(yf)

    def _pinv(self, yf):
        if self._pinv_m is None:
            self._pinv_m = _Cached(torch.linalg.pinv(self.M.value))
        return yf @ self._pinv_m.like(yf).T

    def svd(self) -> OperatorSVD:
        if self._svd is None:
            self._svd = _dense_svd(self.M.value)
        return self._svd

    def matrix(self, dtype=torch.float64, device=None):
        return self.M.value.to(device=device, dtype=dtype).clone()


# ---- observations -----------------------------------------------------------------------------
def observe(operator: LinearOperator, x0: torch.Tensor, sigma_y: float = 0.0,
            generator: GeneratorLike = 0) -> torch.Tensor:
    """``y = A x0 + sigma_y n``, ``n ~ N(0, I)`` (``(batch, *out_shape)``, ``x0``'s dtype and device).
    With an int seed a sample's noise depends on the seed and its index only."""
    require(isinstance(operator, LinearOperator),
            f"operator must be a LinearOperator, got {type(operator).__name__}")
    sigma_y = float(sigma_y)
    require(math.isfinite(sigma_y) and sigma_y >= 0, f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    y = operator.A(x0)
    if sigma_y > 0:
        y = y + sigma_y * NoiseSource(generator, y.shape, y.dtype, y.device).randn()
    return y
