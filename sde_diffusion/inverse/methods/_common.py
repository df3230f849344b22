r"""Pieces shared by the methods (not a method module: its name starts with ``_``).

All in terms of the forward marginal ``x_t = alpha_t x0 + sigma_t z`` (every SDE of the toolkit):
between times ``s < t`` the forward transition is ``x_t = (alpha_t/alpha_s) x_s +
sigma_{t|s} z`` with ``sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2``.
"""
from __future__ import annotations

import hashlib
import math
from typing import List, Sequence, Tuple

import torch

from ..._checks import expand_to, require
from ...models.wrapper import ScoreModel
from ...samplers.base import GeneratorLike, NoiseSource
from ...sdes import SDE
from ..operators import LinearOperator

__all__ = ["method_noise", "scales", "forward_jump", "posterior_step", "replace_row_space",
           "DataPredictionModel"]


class DataPredictionModel(ScoreModel):
    """Base of the methods' model wrappers: ``inner`` with its data prediction replaced by
    :meth:`data_prediction`; ``eps = (x - alpha x0) / sigma`` and ``score = -eps / sigma`` follow,
    so any solver of :mod:`sde_diffusion.samplers` runs the method. Network evaluations are counted
    by ``inner`` (``nfe`` reads its counter)."""

    def __init__(self, inner: ScoreModel):
        self.inner = inner
        self.sde, self.parameterization = inner.sde, "x0"
        self.net, self.time_input, self.check_finite = inner.net, inner.time_input, inner.check_finite
        self.bound = {}

    @property
    def nfe(self) -> int:
        return self.inner.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:          # the counter is the inner model's
        pass

    def data_prediction(self, x: torch.Tensor, t: torch.Tensor, alpha, sigma,
                        **kwargs) -> torch.Tensor:
        """The wrapped ``x0`` at ``(x, t)``; ``alpha``, ``sigma``: numbers (a solver's grid) or
        tensors broadcastable to ``x``."""
        raise NotImplementedError

    def inner_x0(self, x, t, alpha, sigma, **kwargs) -> torch.Tensor:
        """``inner``'s data prediction: through ``at_scales`` for a solver's numbers, else (scales
        as tensors, from a checked time) through ``inner.x0``."""
        if isinstance(alpha, torch.Tensor):
            return self.inner.x0(x, t, **kwargs)
        return self.inner.at_scales("x0", x, t, alpha, sigma, **kwargs)

    def _views(self, view, x, x0, a, s):
        if view == "x0":
            return x0
        eps = (x - a * x0) / s
        return eps if view == "eps" else -eps / s

    def at_scales(self, view, x, t, alpha, sigma, **kwargs):
        require(view in ("eps", "x0", "score"), f"view must be eps, x0 or score, got {view!r}")
        return self._views(view, x, self.data_prediction(x, t, alpha, sigma, **kwargs), alpha, sigma)

    def _at(self, view, x, t, kwargs):
        t = self.sde.time(t, x)
        _, log_a, log_s = self.sde.log_scales(t, x)
        a, s = expand_to(log_a.exp(), x), expand_to(log_s.exp(), x)
        return self._views(view, x, self.data_prediction(x, t, a, s, **kwargs), a, s)

    def eps(self, x, t, **kwargs):
        return self._at("eps", x, t, kwargs)

    def x0(self, x, t, **kwargs):
        return self._at("x0", x, t, kwargs)

    def score(self, x, t, **kwargs):
        return self._at("score", x, t, kwargs)


def method_noise(generator: GeneratorLike, shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device, stream: str) -> NoiseSource:
    """A noise source for a method's own draws. An int seed gives a stream of its own, derived from
    ``(seed, stream)``, so it never repeats the noise of ``x_T`` or of a solver run with the same
    seed (and a sample's noise still depends on the seed and its index only); a generator (or
    ``None``) is shared."""
    if isinstance(generator, int) and not isinstance(generator, bool):
        digest = hashlib.blake2b(f"{generator}/inverse/{stream}".encode(), digest_size=8).digest()
        generator = int.from_bytes(digest, "little") >> 1
    return NoiseSource(generator, tuple(shape), dtype, device)


def scales(sde: SDE, times: torch.Tensor) -> Tuple[List[float], List[float]]:
    """``alpha`` and ``sigma`` at the (float64, CPU) grid ``times``, as float lists."""
    _, log_a, log_s = sde.log_scales(times.to(torch.float64))
    return log_a.exp().tolist(), log_s.exp().tolist()


def forward_jump(x_s: torch.Tensor, a_s: float, s_s: float, a_t: float, s_t: float,
                 z: torch.Tensor) -> torch.Tensor:
    """A draw of ``x_t | x_s`` (``t > s``): ``(alpha_t/alpha_s) x_s + sigma_{t|s} z``."""
    r = a_t / a_s
    return r * x_s + math.sqrt(max(s_t * s_t - r * r * s_s * s_s, 0.0)) * z


def posterior_step(x_t: torch.Tensor, x0: torch.Tensor, a_t: float, s_t: float, a_s: float,
                   s_s: float, z: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """One step ``t -> s < t`` of the DDIM family (Song, Meng & Ermon 2021, eq. 12) given a data
    prediction ``x0``: ``x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z`` with
    ``eps = (x_t - alpha_t x0)/sigma_t`` and ``c = eta (sigma_s/sigma_t) sigma_{t|s}``. ``eta = 1``
    draws from the forward posterior ``q(x_s | x_t, x0)`` (DDPM's ancestral step, Ho et al. 2020,
    eq. 7); ``eta = 0`` is deterministic."""
    r = a_t / a_s
    c = eta * (s_s / s_t) * math.sqrt(max(s_t * s_t - r * r * s_s * s_s, 0.0))
    eps = (x_t - a_t * x0) / s_t
    return a_s * x0 + math.sqrt(max(s_s * s_s - c * c, 0.0)) * eps + c * z


def replace_row_space(operator: LinearOperator, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``x`` with its row-space part replaced by ``target``'s: ``x - A^+A x + A^+A target`` (for a
    mask: the observed entries of ``target``, the rest of ``x``)."""
    return x - operator.row_space(x - target)
