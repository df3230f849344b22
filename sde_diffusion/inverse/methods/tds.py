r"""TDS, the twisted diffusion sampler (Wu, Trippe, Naesseth, Blei & Cunningham 2023, "Practical and
asymptotically exact conditional sampling in diffusion models", NeurIPS), here twisted by PiGDM's
likelihood: a sequential Monte Carlo sampler whose particles move by PiGDM's guided ancestral step
and are reweighted so that, as the particle count grows, their law is the posterior of the
model's ancestral chain (the prior up to the chain's discretisation) -- with one particle its
chain is PiGDM's with ``eta = 1``, ending at ``eps`` instead of stepping to the data.

The twisting functions are PiGDM's approximate likelihoods (Song et al. 2023, eq. 7),

.. math:: \tilde p_t(y \mid x_t) = \mathcal N\big(y;\ A\hat x_0(x_t),\ r_t^2 AA^\top + \sigma_y^2 I\big),

the target at grid time ``t`` is ``p(x_t) p~_t(y | x_t)``, and the proposal from ``t`` to ``t'``
is the guided kernel ``q = N(m + delta, s_eta^2 I)``: the ancestral (DDIM ``eta = 1``) kernel
``p(x_t' | x_t) = N(m, s_eta^2 I)`` of :mod:`._guided` moved by PiGDM's guidance ``delta``
(:func:`.pigdm.guidance_shift`, ``guidance="paper"`` or ``"score"``). With ``x_t' = m + delta +
s_eta z`` the incremental weight (TDS Algorithm 1) is

.. math:: \log w = \log\tilde p_{t'}(y\mid x_{t'}) - \log\tilde p_t(y\mid x_t)
          - \frac{z^\top\delta}{s_\eta} - \frac{\lVert\delta\rVert^2}{2 s_\eta^2},

the last two terms being ``log p(x_t' | x_t) - log q(x_t' | x_t)``. The first weight is
``p~_T(y | x_T)`` (the particles start from the prior), resampling within each posterior sample's
group happens when the effective sample size falls below ``ess_threshold * particles``, and the
last step ends at ``eps`` (not at the data): its twisting function is the likelihood of ``x_eps``
read as a noisy observation of ``x0``, ``N(y; A x_eps / alpha, (sigma/alpha)^2 AA^T + sigma_y^2 I)``
(MCGdiff's ``g_eps``), so no network call is spent after the last step. One particle per posterior
sample is drawn by the final weights and returned as ``x_eps / alpha_eps`` (for ``sigma_y = 0``
with its observed spectral coordinates set to ``y``'s). Cost: ``nfe`` network calls and as many
vector-Jacobian products, each on ``batch * particles`` states.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..._checks import require
from ..registry import MethodResult, register_method
from ...samplers.grids import GRIDS
from ._guided import ddim_mean, noise_for, noise_std, schedule, spectral
from .pigdm import check_guidance, guidance_shift, pigdm_terms, score_guided_x0
from .smc import check_smc, draw_one, initial_particles, resample_indices

__all__ = ["tds"]


@register_method("tds", needs=("svd",))
def tds(model, operator, y: torch.Tensor, *, sigma_y: float, x_T: torch.Tensor, nfe: int,
        solver: Optional[str] = None, generator=None, particles: int = 64,
        resampling: str = "systematic", ess_threshold: float = 0.5, weight: float = 1.0,
        sigma_data: float = 1.0, guidance: str = "paper", grid: str = "uniform",
        order: int = 1) -> MethodResult:
    """TDS with PiGDM's twisting, ``particles`` particles per posterior sample and ``nfe`` network
    calls (each on ``batch * particles`` states, with a vector-Jacobian product). ``weight``,
    ``sigma_data``, ``guidance``: PiGDM's (:func:`~.pigdm.pigdm`), for both the proposal and the
    twisting functions (``weight`` scales the proposal's guidance only); ``resampling``,
    ``ess_threshold``: as MCGdiff's (:func:`~.smc.mcgdiff`); ``grid``: a time grid of
    :mod:`~sde_diffusion.samplers.grids`; ``order``: 1, the ancestral kernel, or 2, the
    SDE-DPM-Solver++(2M) kernel (``guidance="score"`` only; see the module docstring). With an
    int seed a posterior sample depends on the seed and its index only. Particle 0 of sample
    ``b`` starts at ``x_T[b]``; the others are drawn from the prior."""
    ess_threshold = check_smc(particles, resampling, ess_threshold)
    require(grid in GRIDS, f"unknown time grid {grid!r}; valid grids: {', '.join(GRIDS)}")
    require(order in (1, 2) and not isinstance(order, bool), f"order must be 1 or 2, got {order!r}")
    require(order == 1 or guidance == "score", f"order=2 moves the guided data prediction, "
                                               f"which needs guidance='score', got {guidance!r}")
    weight, sigma_data = check_guidance(guidance, weight, sigma_data)
    sigma_y = float(sigma_y)
    sde = model.sde
    B, N = x_T.shape[0], particles
    spec = spectral(operator, x_T)
    D, shape = spec.d_x, tuple(x_T.shape[1:])
    sched = schedule(sde, nfe, grid, to_data=False, sigma_data=sigma_data)
    noise = noise_for(generator, (B, N * (D + 1)), x_T, "tds")
    y_rep = y.repeat_interleave(N, dim=0)                      # each sample's y for its particles
    arange = torch.arange(N, device=x_T.device).expand(B, N)

    def split(draw: torch.Tensor):
        return draw[:, :N * D].reshape((B * N,) + shape), torch.special.ndtr(draw[:, N * D:])

    def gather(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:   # (B N, ...) by (B, N)
        flat = v.reshape(B, N, -1)
        return torch.gather(flat, 1, idx[:, :, None].expand(B, N, flat.shape[2])).reshape(v.shape)

    x = initial_particles(sde, split(noise.prior())[0], x_T, N)
    start = model.nfe
    log_w = x_T.new_zeros(B, N)                    # accumulated log-weights since the last resampling
    resampled = 0
    history = None                                 # order 2: the last step's (x0, guided x0, h)
    for i in range(sched.steps):
        x0, eps, g, log_twist = pigdm_terms(model, spec, operator, y_rep, x, sched, i, sigma_y,
                                            sigma_data, guidance)
        log_w = log_w + log_twist.reshape(B, N)
        z, u = split(noise.randn())
        w = torch.softmax(log_w, dim=1)
        low = (1 / (w * w).sum(1)) < ess_threshold * N                  # (B,)
        idx = torch.where(low[:, None], resample_indices(log_w, u, resampling), arange)
        log_w = torch.where(low[:, None], 0.0, log_w)
        resampled += int(low.sum())
        x, x0, eps, g, log_twist = (gather(v, idx) for v in (x, x0, eps, g, log_twist.reshape(B * N, 1)))
        std = noise_std(sched, i, 1.0)
        base = ddim_mean(sched, i, x0, eps, std)                        # the unguided kernel
        delta = guidance_shift(sched, i, g, std, weight, guidance)
        if order == 2:
            x0_guided = score_guided_x0(x0, g, weight, sched.alphas[i], sched.sigmas[i])
            h = sched.lam(i + 1) - sched.lam(i)
            if history is not None:   # SDE-DPM-Solver++(2M): + c (x0 - x0_prev) / r, both kernels
                prev, prev_guided = (gather(v, idx) for v in history[:2])
                prev_h = history[2]
                c = 0.5 * sched.alphas[i + 1] * -math.expm1(-2 * h) * h / prev_h
                base = base + c * (x0 - prev)
                delta = delta + c * ((x0_guided - prev_guided) - (x0 - prev))
            history = (x0, x0_guided, h)
        x = base + delta + std * z
        zd = (z * delta).reshape(B, N, -1).sum(-1)
        dd = (delta * delta).reshape(B, N, -1).sum(-1)
        log_w = log_w - zd / std - dd / (2 * std * std) - log_twist.reshape(B, N)
    # the last twisting function: y given x_eps read as x0 + (sigma/alpha) noise
    a, s = sched.alphas[-1], sched.sigmas[-1]
    s_k = spec.s[:spec.k]
    rho = spec.Ut(y_rep - operator.A(x / a))
    var = (s / a) ** 2 * s_k * s_k + sigma_y * sigma_y
    keep = s_k > 0
    safe = torch.where(keep, var, 1.0)
    log_w = log_w + torch.where(keep, -0.5 * (rho * rho / safe + torch.log(safe)), 0.0).sum(-1).reshape(B, N)
    _, u = split(noise.randn())
    pick = draw_one(log_w, u[:, :1])
    out = torch.gather(spec.Vt(x).reshape(B, N, D), 1, pick[:, :, None].expand(B, 1, D))[:, 0] / a
    if sigma_y == 0:
        out = torch.where(spec.observed, spec.y_bar(y), out)
    return MethodResult(samples=spec.V(out), nfe=model.nfe - start,
                        info={"particles": N, "network_batch": B * N, "steps": sched.steps,
                              "resampling_rate": resampled / (B * sched.steps)})
