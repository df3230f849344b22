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
noiseless potentials for ``sigma_y = 0``; option ``noisy="inflate"``, the default). The paper's
noisy construction (Sec. 3.2; option ``noisy="pin"``) instead reads ``alpha_tau y_bar_i`` as a
noiseless observation of ``x_bar_{tau,i}`` at the time ``tau_i`` where ``sigma_tau / alpha_tau =
sigma_i``: ``N(alpha_tau y_bar_i; alpha_tau x_bar_0, sigma_tau^2)`` is the likelihood of ``y_bar_i``
up to a constant, so ``x0 | y`` is ``x0 | (x_bar_{tau_i, i} = alpha_tau y_bar_i)_i``. The times
``tau_i`` are inserted into the grid (``nfe`` steps in all), the potentials before ``tau_i`` are
those of the forward transition from ``tau_i``, ``N(x_bar_{t,i}; alpha_t y_bar_i, sigma_t^2 -
alpha_t^2 sigma_i^2)``, the coordinate is set to ``alpha_tau y_bar_i`` at ``tau_i`` (its weight:
the kernel's density there) and moves with the plain kernel after it. Both are exact as the
particle count grows; measured, neither is better (docs/inverse.md). Each step (the paper's
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
from ...samplers.grids import GRIDS, make_grid
from ._guided import Schedule, ddim_mean, noise_for, noise_std, schedule, spectral

__all__ = ["mcgdiff", "resample_indices", "draw_one", "check_smc", "initial_particles", "RESAMPLING",
           "NOISY"]

RESAMPLING = ("systematic", "multinomial")
#: MCGdiff's treatments of noisy observations (``sigma_y > 0``), see the module docstring.
NOISY = ("pin", "inflate")
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


def check_smc(particles, resampling: str, ess_threshold) -> float:
    """Check an SMC method's shared options; returns ``ess_threshold`` as a float."""
    require(isinstance(particles, int) and not isinstance(particles, bool) and particles >= 1,
            f"particles must be an integer >= 1, got {particles!r}")
    ess_threshold = float(ess_threshold)
    require(0 <= ess_threshold <= 1, f"ess_threshold must lie in [0, 1], got {ess_threshold!r}")
    require(resampling in RESAMPLING, f"unknown resampling {resampling!r}; valid: {', '.join(RESAMPLING)}")
    return ess_threshold


def initial_particles(sde, draw: torch.Tensor, x_T: torch.Tensor, particles: int) -> torch.Tensor:
    """``(batch * particles, *shape)`` starting states: particle 0 of sample ``b`` is ``x_T[b]``,
    the others ``prior_std`` times the standard normal ``draw`` (any shape of as many numbers)."""
    B, shape = x_T.shape[0], tuple(x_T.shape[1:])
    x = sde.prior_std * draw.reshape((B, particles) + shape)
    x[:, 0] = x_T
    return x.reshape((B * particles,) + shape)


def _pinned_schedule(sde, nfe: int, grid: str, nu: torch.Tensor, obs: torch.Tensor):
    """MCGdiff's noisy-case grid (Cardoso et al. 2023, Sec. 3.2): coordinate ``i`` of noise level
    ``nu_i = sigma_y / s_i`` (VE units) is pinned at the time ``tau_i`` with ``sigma/alpha = nu_i``,
    ``lambda(tau_i) = -log nu_i``. The distinct ``tau_i`` inside ``(eps, T)`` are inserted into a grid
    of ``nfe - m`` steps (``nfe`` steps in all); levels beyond the grid's ends pin at ``T`` or
    ``eps``. Returns the :class:`Schedule` (ending at ``eps``) and each coordinate's pin index
    (``(D,)``; unobserved coordinates: ``-1``)."""
    lam = -torch.log(torch.where(obs, nu, 1.0).to(torch.float64))
    ends = sde.lambda_(torch.tensor([sde.T, sde.eps], dtype=torch.float64))
    inside = obs & (lam > ends[0]) & (lam < ends[1])
    levels = torch.unique(lam[inside])
    m = int(levels.numel())
    require(nfe - m >= 1, f"mcgdiff with noisy='pin' inserts the pin times of {m} distinct noise "
                          f"levels sigma_y / s_i into the grid: nfe must exceed {m}, got {nfe} "
                          f"(or use noisy='inflate')")
    times = make_grid(sde, nfe - m, grid)
    if m:
        times = torch.unique(torch.cat([times, sde.t_of_lambda(levels).to(torch.float64)]))
        times = times.flip(0)
    _, log_a, log_s = sde.log_scales(times)
    sched = Schedule(times, log_a.exp().tolist(), log_s.exp().tolist(), times.numel() - 1)
    pin = (lam[:, None] - (log_a - log_s)[None, :].to(lam.device)).abs().argmin(1)
    return sched, torch.where(obs, pin, -1)


@register_method("mcgdiff", needs=("svd",))
def mcgdiff(model, operator, y: torch.Tensor, *, sigma_y: float, x_T: torch.Tensor, nfe: int,
            solver: Optional[str] = None, generator=None, particles: int = 64,
            resampling: str = "systematic", ess_threshold: float = 0.5, noisy: str = "inflate",
            grid: str = "uniform") -> MethodResult:
    """MCGdiff with ``particles`` particles per posterior sample and ``nfe`` network calls (each
    on ``batch * particles`` states). ``resampling``: ``systematic`` or ``multinomial``;
    ``noisy`` (``sigma_y > 0``): ``inflate`` (default; potentials with ``sigma_y^2 / s_i^2`` added
    to their variance, down to ``eps``) or ``pin`` (the paper's Sec. 3.2: each observed coordinate
    pinned at the time its noise level is reached, free after it); ``grid``: a time grid of :mod:`~sde_diffusion.samplers.grids`.
    With an int seed a posterior sample depends on the seed and its index only. Particle 0 of
    sample ``b`` starts at ``x_T[b]``; the others are drawn from the prior."""
    ess_threshold = check_smc(particles, resampling, ess_threshold)
    require(noisy in NOISY, f"unknown noisy {noisy!r}; valid: {', '.join(NOISY)}")
    require(grid in GRIDS, f"unknown time grid {grid!r}; valid grids: {', '.join(GRIDS)}")
    sigma_y = float(sigma_y)
    sde = model.sde
    B, N = x_T.shape[0], particles
    spec = spectral(operator, x_T)
    D = spec.d_x
    obs = spec.observed
    nu = torch.where(obs, sigma_y / torch.where(obs, spec.s, 1.0), 0.0)   # VE-unit noise levels
    if noisy == "pin" and sigma_y > 0:
        sched, pin = _pinned_schedule(sde, nfe, grid, nu, obs)
        # the pinned value alpha_tau y_bar has noise level sigma_tau / alpha_tau: nu where tau is
        # inserted, the grid end's where the level lies beyond it
        ratio = torch.tensor([s_ / a_ for a_, s_ in zip(sched.alphas, sched.sigmas)],
                             dtype=x_T.dtype, device=x_T.device)
        nu = torch.where(obs, ratio[pin.clamp_min(0)], 0.0)
        sign = -1.0
    else:
        sched = schedule(sde, nfe, grid, to_data=False)
        pin = torch.where(obs, sched.steps + 1, -1)       # never pinned: potentials down to eps
        sign = 1.0
    var_nu = nu * nu
    y_bar = spec.y_bar(y)[:, None, :]                                    # (B, 1, D)
    noise = noise_for(generator, (B, N * (D + 1)), x_T, "mcgdiff")

    def split(draw: torch.Tensor):
        return draw[:, :N * D].reshape(B, N, D), torch.special.ndtr(draw[:, N * D:])

    def potential(j: int):
        """Where coordinate potentials are in force at grid index ``j`` (still to be pinned after
        it), their variance ``sigma^2 -+ alpha^2 nu^2``, and where coordinates are pinned at ``j``."""
        a_, s_ = sched.alphas[j], sched.sigmas[j]
        active = obs & (pin > j)
        var = torch.where(active, (s_ * s_ + sign * a_ * a_ * var_nu).clamp_min(0.0), 1.0)
        return active, var, obs & (pin == j)

    x = initial_particles(sde, split(noise.prior())[0], x_T, N)
    if bool((pin == 0).any()):                    # levels above the prior's: pinned at T
        x = spec.V(torch.where(pin == 0, sched.alphas[0] * y_bar, spec.Vt(x).reshape(B, N, D))
                   .reshape(B * N, D))
    start = model.nfe
    log_w = x_T.new_zeros(B, N)                   # accumulated log-weights since the last resampling
    arange = torch.arange(N, device=x_T.device).expand(B, N)
    resampled = 0
    log_z = x_T.new_zeros(B)                      # log of the SMC estimate of the evidence
    for i in range(sched.steps):
        a, s = sched.alphas[i], sched.sigmas[i]
        a1 = sched.alphas[i + 1]
        x0 = model.at_scales("x0", x, sched.t(i, x), a, s)
        eps = (x - a * x0) / s
        std = noise_std(sched, i, 1.0)
        m_bar = spec.Vt(ddim_mean(sched, i, x0, eps, std)).reshape(B, N, D)
        act1, v_pot, pin1 = potential(i + 1)
        # 1. weights Z(x_t) / g_t(x_t); a coordinate pinned at t' adds the kernel's density there
        log_w = log_w + _log_normal(m_bar, a1 * y_bar, std * std + v_pot, act1)
        log_w = log_w + _log_normal(m_bar, a1 * y_bar, torch.full_like(v_pot, std * std), pin1)
        if i > 0:
            act0, v0, _ = potential(i)
            x_bar = spec.Vt(x).reshape(B, N, D)
            log_w = log_w - _log_normal(x_bar, a * y_bar, v0, act0)
        # 2. resampling within each group of N particles whose effective sample size fell
        z, u = split(noise.randn())
        w = torch.softmax(log_w, dim=1)
        low = (1 / (w * w).sum(1)) < ess_threshold * N                  # (B,)
        idx = torch.where(low[:, None], resample_indices(log_w, u, resampling), arange)
        log_z = log_z + torch.where(low, torch.logsumexp(log_w, 1) - math.log(N), 0.0)
        log_w = torch.where(low[:, None], 0.0, log_w)
        resampled += int(low.sum())
        m_bar = torch.gather(m_bar, 1, idx[:, :, None].expand(B, N, D))
        # 3. the optimal proposal: kernel x potential where in force, the pin where pinned now
        prec = 1 / (std * std) + 1 / v_pot
        mean = (m_bar / (std * std) + a1 * y_bar / v_pot) / prec
        x_bar = torch.where(act1, mean + z / prec.sqrt(), m_bar + std * z)
        x_bar = torch.where(pin1, a1 * y_bar, x_bar)
        x = spec.V(x_bar.reshape(B * N, D))
    log_z = log_z + torch.logsumexp(log_w, 1) - math.log(N)
    # p(y) = prod_i N((U^T y)_i; s_i x_bar_i, sigma_y^2): y_bar's density / prod s_i; coordinate i
    # was read at the grid time of its last potential (pinned: tau_i; else eps) in units of
    # alpha_tau x_bar_0, so its density there is y_bar's / alpha_tau
    read = pin.clamp(max=sched.steps)[obs]
    log_alpha = torch.tensor(sched.alphas, dtype=torch.float64).log()[read.cpu()]
    log_z = log_z + float(log_alpha.sum()) - torch.log(spec.s[obs]).sum()
    # one particle per posterior sample, drawn by the final weights (one uniform through their CDF:
    # a fixed index would not do, systematic resampling orders the particles by ancestor)
    _, u = split(noise.randn())
    pick = draw_one(log_w, u[:, :1])
    out = torch.gather(spec.Vt(x).reshape(B, N, D), 1, pick[:, :, None].expand(B, 1, D))[:, 0]
    out = out / sched.alphas[-1]
    if sigma_y == 0:
        out = torch.where(obs, y_bar[:, 0], out)
    return MethodResult(samples=spec.V(out), nfe=model.nfe - start,
                        info={"particles": N, "network_batch": B * N, "steps": sched.steps,
                              "resampling_rate": resampled / (B * sched.steps),
                              "log_evidence": log_z})
