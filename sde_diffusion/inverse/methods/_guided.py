r"""What DPS, PiGDM, DDRM and the SMC sampler share: the time grid with its alpha and sigma as
numbers, the DDIM-type update written with alpha and sigma (so it serves every affine SDE), the
per-sample noise, and the operator's SVD in flattened spaces.

The DDIM update (Song, Meng & Ermon 2021, eq. 12) from ``t`` to ``t'`` given a data prediction
``x0`` and a noise prediction ``eps``:

.. math:: x' = \alpha'\hat x_0 + \sqrt{\sigma'^2 - \sigma_\eta^2}\,\hat\varepsilon + \sigma_\eta z,
          \qquad \sigma_\eta^2 = \eta^2\sigma'^2\big(1 - e^{2(\lambda - \lambda')}\big),

``lambda = log(alpha/sigma)``; ``eta = 1`` is ancestral (DDPM) sampling. The last step of these
methods goes to the data itself (``alpha' = 1``, ``sigma' = 0``): its result is ``x0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..._checks import require
from ...samplers.base import NoiseSource
from ._common import method_noise
from ...samplers.grids import GRIDS, make_grid

__all__ = ["Schedule", "schedule", "ddim_mean", "ddim_update", "noise_std", "Spectral", "spectral", "check_eta",
           "check_nfe"]


def check_eta(eta, name: str = "eta") -> float:
    eta = float(eta)
    require(0.0 <= eta <= 1.0, f"{name} must lie in [0, 1], got {eta!r}")
    return eta


def check_nfe(nfe) -> int:
    require(isinstance(nfe, int) and not isinstance(nfe, bool) and nfe >= 1,
            f"nfe must be an integer >= 1, got {nfe!r}")
    return nfe


@dataclass
class Schedule:
    """``steps`` network evaluations at ``times[0] = T > ... > times[steps - 1]``; step ``i`` goes
    from ``times[i]`` to ``times[i + 1]``, and the last one to the data (``alpha = 1, sigma = 0``).
    ``alphas``/``sigmas`` hold ``steps + 1`` floats (the last ``1.0``/``0.0``)."""

    times: torch.Tensor
    alphas: List[float]
    sigmas: List[float]
    steps: int

    def t(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), float(self.times[i]), dtype=x.dtype, device=x.device)

    def lam(self, i: int) -> float:
        a, s = self.alphas[i], self.sigmas[i]
        return math.inf if s == 0 else math.log(a / s)


def schedule(sde, nfe: int, grid: str = "uniform", to_data: bool = True,
             sigma_data: float = 0.5) -> Schedule:
    """The grid of :func:`~sde_diffusion.samplers.grids.make_grid` with ``nfe`` intervals
    (``sigma_data`` shapes the ``focus`` grid); the
    network is evaluated at its first ``nfe`` points and the last step lands on the data
    (``to_data``) or on the grid's last time ``eps`` (then ``times`` holds all ``nfe + 1`` points
    and ``steps`` is still ``nfe``)."""
    check_nfe(nfe)
    require(grid in GRIDS, f"unknown time grid {grid!r}; valid grids: {', '.join(GRIDS)}")
    times = make_grid(sde, nfe, grid, sigma_data=sigma_data)
    _, log_a, log_s = sde.log_scales(times)
    if not to_data:
        return Schedule(times, log_a.exp().tolist(), log_s.exp().tolist(), nfe)
    return Schedule(times[:-1], log_a[:-1].exp().tolist() + [1.0],
                    log_s[:-1].exp().tolist() + [0.0], nfe)


def noise_std(sched: Schedule, i: int, eta: float) -> float:
    """DDIM's ``sigma_eta`` of step ``i`` (DDIM eq. 16 in log-SNR form; 0 on the last step)."""
    s1 = sched.sigmas[i + 1]
    if s1 == 0 or eta == 0:
        return 0.0
    return eta * s1 * math.sqrt(max(0.0, -math.expm1(2 * (sched.lam(i) - sched.lam(i + 1)))))


def ddim_mean(sched: Schedule, i: int, x0: torch.Tensor, eps: torch.Tensor,
              std: float) -> torch.Tensor:
    """The mean of DDIM's step ``i`` with noise ``std``: ``alpha' x0 + sqrt(sigma'^2 - std^2)
    eps``."""
    a1, s1 = sched.alphas[i + 1], sched.sigmas[i + 1]
    return a1 * x0 + math.sqrt(max(0.0, s1 * s1 - std * std)) * eps


def ddim_update(sched: Schedule, i: int, x0: torch.Tensor, eps: torch.Tensor, eta: float,
                noise: Optional[NoiseSource]) -> torch.Tensor:
    """DDIM's step ``i`` (see the module docstring) from the predictions ``x0`` and ``eps``."""
    std = noise_std(sched, i, eta)
    out = ddim_mean(sched, i, x0, eps, std)
    if std > 0:
        out = out + std * noise.randn()
    return out


class Spectral:
    r"""An operator's SVD ``A = U diag(s) V^T`` in flattened spaces, padded so that
    ``Vt(x)`` is ``(batch, d_x)`` and ``singular_values`` has ``d_x`` entries (zeros beyond the
    rank): ``y_bar = Ut(y)[:, :k] / s[:k]`` are the observed spectral coordinates of ``x``."""

    def __init__(self, operator, like: torch.Tensor):
        self.op, self.svd = operator, operator.svd()
        self.in_shape = tuple(operator.in_shape)
        self.d_x = math.prod(self.in_shape)
        s = torch.as_tensor(self.svd.singular_values).flatten().to(like.device, like.dtype)
        self.k = s.shape[0]
        require(self.k <= self.d_x, f"the operator's SVD has {self.k} singular values for an input "
                                    f"of {self.d_x} entries")
        self.s = torch.cat([s, s.new_zeros(self.d_x - self.k)])
        self.observed = self.s > 0

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, *in_shape)`` (or flat) -> ``(batch, d_x)`` spectral coordinates."""
        return self.svd.Vt(x.reshape(x.shape[0], -1)).reshape(x.shape[0], -1)

    def V(self, z: torch.Tensor) -> torch.Tensor:
        """``(batch, d_x)`` spectral coordinates -> ``(batch, *in_shape)``."""
        return self.svd.V(z.reshape(z.shape[0], -1)).reshape((z.shape[0],) + self.in_shape)

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        """``U^T y`` restricted to the ``k`` coordinates paired with singular values."""
        return self.svd.Ut(y.reshape(y.shape[0], -1)).reshape(y.shape[0], -1)[:, :self.k]

    def y_bar(self, y: torch.Tensor) -> torch.Tensor:
        """``(batch, d_x)``: ``(U^T y)_i / s_i`` where ``s_i > 0``, else 0."""
        u = torch.zeros(y.shape[0], self.d_x, dtype=y.dtype, device=y.device)
        u[:, :self.k] = self.Ut(y)
        return torch.where(self.observed, u / torch.where(self.observed, self.s, 1.0), 0.0)


def spectral(operator, like: torch.Tensor) -> Spectral:
    return Spectral(operator, like)


def noise_for(generator, shape: Tuple[int, ...], like: torch.Tensor, stream: str) -> NoiseSource:
    """The method's own noise (:func:`._common.method_noise`: an int seed gives a stream of its
    own, apart from ``x_T``'s, and a sample's noise depends on the seed and its index only)."""
    return method_noise(generator, shape, like.dtype, like.device, stream)
