r"""Exact ground truth: a Gaussian mixture pushed through any affine SDE.

If ``x0 ~ sum_k w_k N(m_k, diag(s_k^2))`` and ``x_t = alpha(t) x0 + sigma(t) z``, then

.. math:: p_t(x) = \sum_k w_k\,\mathcal N\big(x;\ \alpha m_k,\ \operatorname{diag}(\alpha^2 s_k^2 + \sigma^2)\big),

so the score, the denoiser ``E[x0 | x_t]`` (Tweedie's formula) and the log-density are known in
closed form at every ``t``. Tests and benchmarks measure samplers and likelihoods against it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ._checks import TimeLike, expand_to, require
from .sdes import SDE

__all__ = ["GaussianMixture", "random_mixture"]

ArrayLike = Union[torch.Tensor, Sequence]


class GaussianMixture:
    """Mixture of Gaussians with isotropic or diagonal components, any event shape.

    Args:
        weights: ``(K,)`` non-negative mixture weights (normalised here).
        means: ``(K, *event_shape)`` component means, e.g. ``(K, 2)`` or ``(K, 3, 32, 32)``.
        stds: ``(K,)`` isotropic standard deviations, or ``(K, *event_shape)`` diagonal ones.
        sde: forward SDE defining ``p_t``; needed by every method given a time ``t``.

    A time ``t=None`` means the clean data distribution ``p_data``; a number or a ``(batch,)``
    tensor means the law of ``alpha(t) x0 + sigma(t) z`` under ``sde`` (for the VE SDE that
    includes ``sigma_min`` noise at ``t = 0``). Parameters are stored in float64 and each call
    computes in the dtype and on the device of its input.
    """

    def __init__(self, weights: ArrayLike, means: ArrayLike, stds: ArrayLike,
                 sde: Optional[SDE] = None):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        m = torch.as_tensor(means, dtype=torch.float64)
        s = torch.as_tensor(stds, dtype=torch.float64)
        K = w.shape[0]
        require(K >= 1, "weights must hold at least one component")
        require(bool(torch.isfinite(w).all()) and bool((w >= 0).all()) and float(w.sum()) > 0,
                f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
        require(m.ndim >= 2 and m.shape[0] == K,
                f"means must have shape (K={K}, *event_shape), got {tuple(m.shape)}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"means must be finite, got {m[~torch.isfinite(m)][0].item()!r}")
        if s.ndim == 0:
            s = s.expand(K)
        if s.ndim == 1:
            require(s.shape[0] == K, f"stds must have shape (K={K},) or {tuple(m.shape)}, got {tuple(s.shape)}")
            s = expand_to(s, m).expand_as(m)
        require(s.shape == m.shape,
                f"stds must have shape (K={K},) or {tuple(m.shape)}, got {tuple(s.shape)}")
        require(bool(torch.isfinite(s).all()) and bool((s > 0).all()),
                f"stds must be finite and > 0, got min {float(s.min())!r}")
        require(sde is None or isinstance(sde, SDE), f"sde must be an SDE instance, got {sde!r}")
        self.weights = w / w.sum()
        self.means = m
        self.stds = s.contiguous()
        self.sde = sde

    # ---- descriptors --------------------------------------------------------------------------
    @property
    def n_components(self) -> int:
        return self.weights.shape[0]

    @property
    def event_shape(self) -> torch.Size:
        return self.means.shape[1:]

    @property
    def dim(self) -> int:
        return self.means[0].numel()

    def with_sde(self, sde: SDE) -> "GaussianMixture":
        """The same mixture, diffused by ``sde``."""
        return GaussianMixture(self.weights, self.means, self.stds, sde)

    def mean(self) -> torch.Tensor:
        """Mean of the clean data distribution."""
        return torch.einsum("k,k...->...", self.weights, self.means)

    def covariance(self) -> torch.Tensor:
        """Covariance of the clean data, flattened to ``(dim, dim)``."""
        m = self.means.reshape(self.n_components, -1)
        v = self.stds.reshape(self.n_components, -1) ** 2
        mu = self.weights @ m
        second = torch.diag(self.weights @ v) + (m.T * self.weights) @ m
        return second - torch.outer(mu, mu)

    # ---- internals ----------------------------------------------------------------------------
    def _scales(self, x: torch.Tensor, t: Optional[TimeLike]):
        """alpha and sigma per sample, shaped ``(batch, 1, ...)`` to broadcast over components."""
        if t is None:
            one = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
            a, s = one, torch.zeros_like(one)
        else:
            require(self.sde is not None,
                    "this mixture has no SDE: pass sde=... (or use with_sde) to evaluate at a time t")
            t = self.sde._time(t, x)
            a, s = self.sde._log_alpha(t).exp(), self.sde._log_sigma(t).exp()
        shape = (x.shape[0], 1) + (1,) * len(self.event_shape)
        return a.reshape(shape), s.reshape(shape)

    def _check_x(self, x: torch.Tensor) -> None:
        require(isinstance(x, torch.Tensor) and x.is_floating_point(),
                f"x must be a floating-point tensor, got {type(x).__name__}")
        require(tuple(x.shape[1:]) == tuple(self.event_shape),
                f"x must have shape (batch, {', '.join(map(str, self.event_shape))}), got {tuple(x.shape)}")

    def _components(self, x: torch.Tensor, t: Optional[TimeLike]):
        """Per-component log-densities ``(batch, K)``, means, variances and the noise scales."""
        self._check_x(x)
        a, s = self._scales(x, t)
        m = self.means.to(x)
        var0 = (self.stds ** 2).to(x)
        mean = a * m.unsqueeze(0)                      # (B, K, ...)
        var = a * a * var0.unsqueeze(0) + s * s        # (B, K, ...)
        diff = x.unsqueeze(1) - mean
        dims = tuple(range(2, diff.ndim))
        log_norm = -0.5 * ((diff * diff / var).sum(dims) + torch.log(2 * math.pi * var).sum(dims))
        log_joint = log_norm + torch.log(self.weights.to(x))
        return log_joint, diff, var, a, var0

    # ---- exact quantities ---------------------------------------------------------------------
    def log_prob(self, x: torch.Tensor, t: Optional[TimeLike] = None) -> torch.Tensor:
        """``log p_t(x)`` per sample, shape ``(batch,)`` (log-sum-exp over components)."""
        log_joint = self._components(x, t)[0]
        return torch.logsumexp(log_joint, dim=1)

    def responsibilities(self, x: torch.Tensor, t: Optional[TimeLike] = None) -> torch.Tensor:
        """Posterior component probabilities ``p(k | x_t)``, shape ``(batch, K)``."""
        return torch.softmax(self._components(x, t)[0], dim=1)

    def score(self, x: torch.Tensor, t: Optional[TimeLike] = None) -> torch.Tensor:
        """``grad_x log p_t(x) = sum_k r_k (-(x - alpha m_k) / var_k)``."""
        log_joint, diff, var, _, _ = self._components(x, t)
        r = expand_to(torch.softmax(log_joint, dim=1), diff)
        return (r * (-diff / var)).sum(1)

    def x0(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Denoiser ``E[x0 | x_t = x] = sum_k r_k (m_k + alpha s_k^2 / var_k (x - alpha m_k))``,
        computed per component so it stays exact where ``alpha`` is tiny."""
        log_joint, diff, var, a, var0 = self._components(x, t)
        r = expand_to(torch.softmax(log_joint, dim=1), diff)
        post_mean = self.means.to(x).unsqueeze(0) + a * var0.unsqueeze(0) / var * diff
        return (r * post_mean).sum(1)

    def eps(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Noise predictor ``E[z | x_t = x] = -sigma(t) * score``."""
        _, s = self._scales(x, t)
        return -s.squeeze(1) * self.score(x, t)

    def sample(self, n: int, t: Optional[TimeLike] = None,
               generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device, None] = None,
               return_labels: bool = False):
        """Draw ``n`` samples of ``p_t`` (``t=None``: clean data), optionally with their components."""
        require(isinstance(n, int) and n >= 1, f"n must be an integer >= 1, got {n!r}")
        if generator is not None and device is None:
            device = generator.device
        labels = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        noise = torch.randn((n,) + tuple(self.event_shape), generator=generator, device=device,
                            dtype=torch.float64)
        x = self.means.to(device)[labels] + self.stds.to(device)[labels] * noise
        if t is not None:
            z = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float64)
            a, s = self._scales(x, t)
            x = a.squeeze(1) * x + s.squeeze(1) * z
        x = x.to(dtype)
        return (x, labels) if return_labels else x


def random_mixture(dim: Union[int, Sequence[int]] = 2, n_components: int = 8, seed: int = 0,
                   sde: Optional[SDE] = None, spread: float = 0.6,
                   std_range: Sequence[float] = (0.05, 0.2), diagonal: bool = False) -> GaussianMixture:
    """A reproducible mixture with unequal weights and widths, its means inside ``[-spread, spread]``
    (data roughly in ``[-1, 1]`` like scaled images). ``dim`` may be an event shape."""
    event = (dim,) if isinstance(dim, int) else tuple(dim)
    require(n_components >= 1, f"n_components must be >= 1, got {n_components!r}")
    lo, hi = float(std_range[0]), float(std_range[1])
    require(0 < lo <= hi, f"std_range must satisfy 0 < low <= high, got {tuple(std_range)}")
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(n_components, generator=g, dtype=torch.float64) + 0.2
    means = (torch.rand((n_components,) + event, generator=g, dtype=torch.float64) * 2 - 1) * spread
    std_shape = (n_components,) + (event if diagonal else ())
    stds = lo + (hi - lo) * torch.rand(std_shape, generator=g, dtype=torch.float64)
    return GaussianMixture(weights, means, stds, sde)
