r"""MCGdiff, Monte Carlo guided diffusion (Cardoso, Janati, Le Corff & Moulines 2023,
"Monte Carlo guided diffusion for Bayesian linear inverse problems", ICLR 2024): a sequential
Monte Carlo sampler whose particles follow the model's ancestral (DDPM) chain, guided in the
operator's SVD space; asymptotically exact as the number of particles grows (for the chain on the
grid: its law of ``x0`` is the prior up to the solver's discretisation).

Spectral coordinates ``x_bar = V^T x``, ``y_bar_i = (U^T y)_i / s_i`` for the observed ``s_i > 0``
(noise level ``sigma_i = sigma_y / s_i``). The backward kernel from ``t`` to ``t'`` is ancestral
DDIM (eta = 1) written with alpha and sigma, ``N(m(x_t), sigma_eta^2 I)`` with
``m = alpha' x0_hat + sqrt(sigma'^2 - sigma_eta^2) eps_hat``. The potentials (MCGdiff's
``g_t``, Sec. 3: the observed coordinates look like the forward process started at ``y_bar``) are

.. math:: g_t(x_t) = \prod_{i:\,s_i>0}
          \mathcal N\big(\bar x_{t,i};\ \alpha_t\bar y_i,\ \sigma_t^2 + \alpha_t^2\sigma_i^2\big),

which at ``t = 0`` is the exact likelihood ``N(y_bar_i; x_bar_{0,i}, sigma_i^2)`` (the paper's
noiseless potentials for ``sigma_y = 0``; for noisy observations the paper instead pins coordinate
``i`` at the time ``tau_i`` where ``sigma_tau / alpha_tau = sigma_i``; adding ``sigma_i^2`` to the
potential's variance is exact as well and needs no such time on the grid). Each step (the paper's
Algorithm 1, fully adapted):

1. weights ``w = Z(x_t) / g_t(x_t)`` with ``Z = prod_i N(m_bar_i; alpha' y_bar_i,
   sigma_eta^2 + sigma'^2 + alpha'^2 sigma_i^2)`` (the first step: ``w = Z``, the particles being
   prior draws);
2. resampling (systematic or multinomial) within each posterior sample's ``particles`` when their
   effective sample size ``1 / sum w^2`` falls below ``ess_threshold * particles`` (weights
   accumulate until then; ``ess_threshold = 1``: every step, as the paper);
3. the optimal proposal ``prop(x_t') ∝ N(x_t'; m, sigma_eta^2) g_t'(x_t')``: observed coordinates
   from the product of the two Gaussians, the others from the kernel.

After the last step (to ``eps``) one particle of each group is drawn by its weight (observed
coordinates of a noiseless problem set to ``y_bar``). ``result.info["log_evidence"]``: per sample
the SMC estimate of ``log p(y)`` (the product of the mean weights). Cost: ``nfe`` network calls,
each on ``batch * particles`` states.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..._checks import require
from ..registry import MethodResult, register_method
from ._guided import noise_for, noise_std, schedule, spectral

__all__ = ["mcgdiff", "resample_indices", "draw_one", "RESAMPLING"]

RESAMPLING = ("systematic", "multinomial")
_LOG_2PI = math.log(2 * math.pi)


def _log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_i log N(x_i; mean_i, var_i)`` over the coordinates where ``mask``."""
    terms = -0.5 * ((x - mean) ** 2 / var + torch.log(var) + _LOG_2PI)
    return torch.where(mask, terms, 0.0).sum(-1)


def resample_indices(log_w: torch.Tensor, uniforms: torch.Tensor, kind: str) -> torch.Tensor:
    """Ancestor indices ``(batch, N)`` from log-weights ``(batch, N)`` and uniforms ``(batch, N)``
    in ``[0, 1)``: systematic (one uniform per group: ``(u_0 + j) / N``) or multinomial (the
    sorted ``N`` uniforms through the inverse CDF)."""
    n = log_w.shape[1]
    w = torch.softmax(log_w, dim=1)
    cdf = w.cumsum(1)
    cdf[:, -1] = 1.0                      # against round-off at the top
    if kind == "systematic":
        u = (uniforms[:, :1] + torch.arange(n, dtype=cdf.dtype, device=cdf.device)) / n
    else:
        u = uniforms.sort(dim=1).values
    return torch.searchsorted(cdf, u.contiguous()).clamp(max=n - 1)


def draw_one(log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row ``(batch, 1)`` drawn from the weights ``softmax(log_w)`` ``(batch, N)``
    with one uniform per row ``u`` ``(batch, 1)`` through their CDF."""
    cdf = torch.softmax(log_w, dim=1).cumsum(1)
    cdf[:, -1] = 1.0
    return torch.searchsorted(cdf, u.contiguous()).clamp(max=log_w.shape[1] - 1)


@register_method("mcgdiff", needs=("svd",))
def mcgdiff(model, operator, y: torch.Tensor, *, sigma_y: float, x_T: torch.Tensor, nfe: int,
            solver: Optional[str] = None, generator=None, particles: int = 64,
            resampling: str = "systematic", ess_threshold: float = 0.5,
            grid: str = "uniform") -> MethodResult:
    """MCGdiff with ``particles`` particles per posterior sample and ``nfe`` network calls (each
    on ``batch * particles`` states). ``resampling``: ``systematic`` or ``multinomial``;
    ``grid``: a time grid of :mod:`~sde_diffusion.samplers.grids`. With an int seed a posterior
    sample depends on the seed and its index only. Particle 0 of sample ``b`` starts at
    ``x_T[b]``; the others are drawn from the prior."""
    require(isinstance(particles, int) and not isinstance(particles, bool) and particles >= 1,
            f"particles must be an integer >= 1, got {particles!r}")
    ess_threshold = float(ess_threshold)
    require(0 <= ess_threshold <= 1, f"ess_threshold must lie in [0, 1], got {ess_threshold!r}")
    require(resampling in RESAMPLING, f"unknown resampling {resampling!r}; valid: {', '.join(RESAMPLING)}")
    sigma_y = float(sigma_y)
    sde = model.sde
    sched = schedule(sde, nfe, grid, to_data=False)
    B, N = x_T.shape[0], particles
    spec = spectral(operator, x_T)
    D, shape = spec.d_x, tuple(x_T.shape[1:])
    obs = spec.observed
    var_obs = torch.where(obs, (sigma_y / torch.where(obs, spec.s, 1.0)) ** 2, 0.0)
    y_bar = spec.y_bar(y)[:, None, :]                                    # (B, 1, D)
    noise = noise_for(generator, (B, N * (D + 1)), x_T, "mcgdiff")

    def rows(flat: torch.Tensor) -> torch.Tensor:                       # (B, N, D) -> (B N, *shape)
        return flat.reshape((B * N,) + shape)

    def split(draw: torch.Tensor):
        return draw[:, :N * D].reshape(B, N, D), torch.special.ndtr(draw[:, N * D:])

    start_draw, _ = split(noise.prior())
    x = sde.prior_std * start_draw.reshape((B, N) + shape)
    x[:, 0] = x_T
    x = rows(x)
    start = model.nfe
    log_w = x_T.new_zeros(B, N)                   # accumulated log-weights since the last resampling
    arange = torch.arange(N, device=x_T.device).expand(B, N)
    resampled = 0
    log_z = x_T.new_zeros(B)                      # log of the SMC estimate of the evidence
    for i in range(sched.steps):
        a, s = sched.alphas[i], sched.sigmas[i]
        a1, s1 = sched.alphas[i + 1], sched.sigmas[i + 1]
        x0 = model.at_scales("x0", x, sched.t(i, x), a, s)
        eps = (x - a * x0) / s
        std = noise_std(sched, i, 1.0)
        m_bar = spec.Vt(a1 * x0 + math.sqrt(max(0.0, s1 * s1 - std * std)) * eps).reshape(B, N, D)
        # 1. weights Z(x_t) / g_t(x_t)
        v1 = std * std + s1 * s1 + a1 * a1 * var_obs
        log_w = log_w + _log_normal(m_bar, a1 * y_bar, v1, obs)
        if i > 0:
            x_bar = spec.Vt(x).reshape(B, N, D)
            log_w = log_w - _log_normal(x_bar, a * y_bar, s * s + a * a * var_obs, obs)
        # 2. resampling within each group of N particles whose effective sample size fell
        z, u = split(noise.randn())
        w = torch.softmax(log_w, dim=1)
        low = (1 / (w * w).sum(1)) < ess_threshold * N                  # (B,)
        idx = torch.where(low[:, None], resample_indices(log_w, u, resampling), arange)
        log_z = log_z + torch.where(low, torch.logsumexp(log_w, 1) - math.log(N), 0.0)
        log_w = torch.where(low[:, None], 0.0, log_w)
        resampled += int(low.sum())
        m_bar = torch.gather(m_bar, 1, idx[:, :, None].expand(B, N, D))
        # 3. the optimal proposal: kernel x potential on observed coordinates
        v_pot = s1 * s1 + a1 * a1 * var_obs
        prec = 1 / (std * std) + 1 / v_pot
        mean = (m_bar / (std * std) + a1 * y_bar / v_pot) / prec
        x_bar = torch.where(obs, mean + z / prec.sqrt(), m_bar + std * z)
        x = spec.V(x_bar.reshape(B * N, D))
    log_z = log_z + torch.logsumexp(log_w, 1) - math.log(N)
    # p(y) = prod_i N((U^T y)_i; s_i x_bar_i, sigma_y^2): y_bar's density / prod s_i, and the last
    # potential is y_bar's density in units of x_bar_end = alpha_end x_bar_0
    log_z = log_z + float(obs.sum()) * math.log(sched.alphas[-1]) - torch.log(spec.s[obs]).sum()
    # one particle per posterior sample, drawn by the final weights (one uniform through their CDF:
    # a fixed index would not do, systematic resampling orders the particles by ancestor)
    _, u = split(noise.randn())
    pick = draw_one(log_w, u[:, :1])
    out = torch.gather(spec.Vt(x).reshape(B, N, D), 1, pick[:, :, None].expand(B, 1, D))[:, 0]
    out = out / sched.alphas[-1]
    if sigma_y == 0:
        out = torch.where(obs, y_bar[:, 0], out)
    return MethodResult(samples=spec.V(out), nfe=model.nfe - start,
                        info={"particles": N, "network_batch": B * N,
                              "resampling_rate": resampled / (B * sched.steps),
                              "log_evidence": log_z})
