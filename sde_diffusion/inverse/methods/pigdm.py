r"""PiGDM, pseudoinverse-guided diffusion models (Song, Vahdat, Mardani & Kautz 2023, ICLR).

The likelihood of ``y = A x0 + sigma_y n`` given ``x_t`` is approximated by taking
``x0 | x_t ~ N(x0_hat(x_t), r_t^2 I)`` (eq. 5-6), which gives

.. math:: p_t(y \mid x_t) \approx \mathcal N\big(y;\ A\hat x_0,\ r_t^2 AA^\top + \sigma_y^2 I\big),
          \qquad
          g = \nabla_{x_t}\log p_t(y\mid x_t) \approx
          \Big(\frac{\partial \hat x_0}{\partial x_t}\Big)^{\!\top} A^\top
          \big(r_t^2 AA^\top + \sigma_y^2 I\big)^{-1}\big(y - A\hat x_0\big)

(eq. 7; with ``sigma_y = 0`` it is ``r_t^{-2} J^T A^+ (y - A x0_hat)``, eq. 8), one vector-Jacobian
product through the denoiser per step. Variant: ``r_t^2 = sigma_t^2 / (alpha_t^2 + sigma_t^2)``
(the paper's ``sigma_t^2 / (1 + sigma_t^2)`` in VE units ``sigma_t / alpha_t``: the denoiser's error
variance for Gaussian data of unit variance); the option ``sigma_data`` (default 1, the paper's)
uses data of that standard deviation instead,
``r_t^2 = sigma_data^2 sigma_t^2 / (alpha_t^2 sigma_data^2 + sigma_t^2)`` -- for data far from unit
variance the default makes the guidance too weak at high noise. The inverse is exact through the
operator's SVD,
``A^T (r^2 AA^T + sigma_y^2)^{-1} = V diag(s / (r^2 s^2 + sigma_y^2)) U^T``.

Two ways for ``g`` to enter the step (option ``guidance``):

* ``"paper"`` (default): the paper's Algorithm 1, ``x_t' = DDIM(x0_hat, eps_hat) + w sqrt(alpha_bar_t)
  r_t^2 g`` with the adaptive weight ``r_t^2`` of the authors' practice (for ``sigma_y = 0`` the
  step is ``sqrt(alpha_bar_t) J^T A^+ (y - A x0_hat)``: no ``r_t^{-2}``). Written for every SDE in the
  variance-preserving scale ``x / sqrt(alpha^2 + sigma^2)``: ``x_t' += w sqrt(alpha'^2 + sigma'^2)
  alpha_t r_t^2 g`` (``alpha_t = sqrt(alpha_bar_t)`` for VP).
* ``"score"``: the guided score ``score + w g`` inside the DDIM step, through the predictions
  ``x0 = x0_hat + (sigma^2 / alpha) w g`` and ``eps = eps_hat - sigma w g``: exact for Gaussian
  data, but the step multiplies the Jacobian ``J = (I - sigma d eps/dx) / alpha`` by
  ``sigma^2 / alpha`` again, so a network's Jacobian error is amplified by ``~ 1/alpha_t^2``
  (``2e4`` at ``t = T`` of the default VP SDE, where the exact ``J`` is ``~ alpha_t sigma_data^2``):
  a trained float32 digits U-Net diverged within four steps (NaN at ``t = 0.88``) with a noiseless
  mask. Algorithm 1's weight ``sqrt(alpha_bar_t)`` cancels the ``1/alpha_t``.

With ``solver=`` the ``"score"`` form is a model (:class:`PiGDMGuidedModel`) that any solver of the
toolkit integrates: a second-order SDE solver (SDE-DPM-Solver++(2M), Lu et al. 2022b) is far more
accurate than Algorithm 1's first-order step at few evaluations with an exact denoiser
(docs/inverse.md), with the same caveat on networks.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..._checks import require
from ..registry import MethodResult, register_method
from ...models.wrapper import NonFiniteError
from ...samplers.api import sample
from ._common import DataPredictionModel
from ._guided import check_eta, ddim_mean, noise_for, noise_std, schedule, spectral

__all__ = ["pigdm", "GUIDANCE", "pigdm_terms", "likelihood_score", "score_guided_x0",
           "PiGDMGuidedModel", "guidance_shift", "check_guidance"]

#: How the likelihood score ``g`` enters the step (see the module docstring).
GUIDANCE = ("paper", "score")


def likelihood_score(x0_of, spec, operator, y: torch.Tensor, x: torch.Tensor, a, s,
                     sigma_y: float, sigma_data: float, guidance: str):
    """``(x0_hat, g, log_lik)`` at ``x`` with scales ``a``, ``s`` (numbers, or ``(batch, 1)``
    tensors): ``x0_of(x)`` is the denoiser; ``g`` and ``log_lik`` as in :func:`pigdm_terms`.
    One network call and one vector-Jacobian product."""
    r2 = sigma_data ** 2 * s * s / (a * a * sigma_data ** 2 + s * s)
    s_k = spec.s[:spec.k]
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0 = x0_of(xg)
        rho = spec.Ut(y - operator.A(x0.detach()))
        # A^T (r^2 A A^T + sigma_y^2 I)^{-1} (y - A x0), times r^2 for "paper": zero on s_i = 0
        denom = r2 * s_k * s_k + sigma_y * sigma_y
        usable = (s_k > 0) & (denom > 0)
        coef = torch.where(s_k > 0, s_k / torch.where(denom > 0, denom, 1.0), 0.0)
        if guidance == "paper":
            coef = torch.where(denom > 0, r2 * coef, torch.where(s_k > 0, 1 / s_k, 0.0))
        z = torch.zeros(x.shape[0], spec.d_x, dtype=x.dtype, device=x.device)
        z[:, :spec.k] = coef * rho
        (g,) = torch.autograd.grad(x0, xg, grad_outputs=spec.V(z))
    safe = torch.where(usable, denom, 1.0)
    log_lik = torch.where(usable, -0.5 * (rho * rho / safe + torch.log(safe)), 0.0).sum(-1)
    return x0.detach(), g, log_lik


def score_guided_x0(x0: torch.Tensor, g: torch.Tensor, weight: float, alpha, sigma) -> torch.Tensor:
    """The data prediction of the guided score ``score_hat + w g`` (the ``"score"`` form, through
    Tweedie's formula): ``x0_hat + w (sigma^2 / alpha) g``."""
    return x0 + (weight * sigma * sigma / alpha) * g


def pigdm_terms(model, spec, operator, y: torch.Tensor, x: torch.Tensor, sched, i: int,
                sigma_y: float, sigma_data: float, guidance: str):
    """At grid point ``i``: the denoiser's ``x0`` and ``eps``, the guidance vector ``g`` as
    ``guidance`` uses it (``"score"``: ``grad log p_t(y | x_t)`` of eq. 7; ``"paper"``: that times
    ``r_t^2``, or ``J^T A^+ (y - A x0)`` when ``r_t^2 s_i^2 + sigma_y^2 = 0``), and the log of the
    approximate likelihood ``N(y; A x0_hat, r_t^2 AA^T + sigma_y^2 I)`` per sample, up to a
    constant in ``x`` (``-0.5 sum_i rho_i^2 / v_i + log v_i`` over ``s_i > 0``, ``rho = U^T (y - A
    x0_hat)``, ``v_i = r_t^2 s_i^2 + sigma_y^2``; ``0`` where ``v_i = 0``). One network call and
    one vector-Jacobian product."""
    a, s = sched.alphas[i], sched.sigmas[i]
    t = sched.t(i, x)
    x0, g, log_lik = likelihood_score(lambda xg: model.at_scales("x0", xg, t, a, s), spec, operator,
                                      y, x, a, s, sigma_y, sigma_data, guidance)
    return x0, (x - a * x0) / s, g, log_lik


class PiGDMGuidedModel(DataPredictionModel):
    """``inner`` guided by PiGDM's likelihood score: the score ``score_hat + w g`` (``g`` of eq. 7,
    ``guidance="score"``), written as the data prediction ``x0_hat + w (sigma^2 / alpha) g``
    (Tweedie's formula), so any solver of :mod:`sde_diffusion.samplers` integrates the guided
    reverse process. One network call and one vector-Jacobian product per evaluation."""

    def __init__(self, inner, operator, y: torch.Tensor, sigma_y: float, sigma_data: float,
                 weight: float):
        super().__init__(inner)
        self.operator, self.y, self.sigma_y = operator, y, float(sigma_y)
        self.sigma_data, self.weight = float(sigma_data), float(weight)
        self.spec = None

    def data_prediction(self, x, t, alpha, sigma, **kwargs):
        if self.spec is None:
            self.spec = spectral(self.operator, x)
        per = (lambda v: v.reshape(v.shape[0], -1)[:, :1]) if isinstance(alpha, torch.Tensor) \
            else (lambda v: v)    # the scales per sample, for the spectral coordinates
        x0, g, _ = likelihood_score(lambda xg: self.inner_x0(xg, t, alpha, sigma, **kwargs),
                                    self.spec, self.operator, self.y, x, per(alpha), per(sigma),
                                    self.sigma_y, self.sigma_data, "score")
        return score_guided_x0(x0, g, self.weight, alpha, sigma)


def guidance_shift(sched, i: int, g: torch.Tensor, std: float, weight: float,
                   guidance: str) -> torch.Tensor:
    """What PiGDM's guidance adds to the mean of DDIM's step ``i`` (noise ``std``):
    ``"paper"``, Algorithm 1's ``w sqrt(alpha_bar_t) r_t^2 g`` in VP scale (``g`` already holds
    ``r_t^2``); ``"score"``, the change of ``alpha' x0 + c eps`` under ``x0 += w (sigma^2/alpha) g``,
    ``eps -= w sigma g`` (``c = sqrt(sigma'^2 - std^2)``)."""
    a, s = sched.alphas[i], sched.sigmas[i]
    a1, s1 = sched.alphas[i + 1], sched.sigmas[i + 1]
    if guidance == "score":
        c = math.sqrt(max(0.0, s1 * s1 - std * std))
        return (weight * (a1 * s * s / a - c * s)) * g
    return (weight * math.hypot(a1, s1) * a) * g


def check_guidance(guidance: str, weight, sigma_data) -> Tuple[float, float]:
    """``(weight, sigma_data)`` as floats, after checking them and ``guidance``."""
    require(guidance in GUIDANCE, f"unknown guidance {guidance!r}; valid: {', '.join(GUIDANCE)}")
    weight = float(weight)
    require(math.isfinite(weight) and weight >= 0, f"weight must be a finite number >= 0, got {weight!r}")
    sigma_data = float(sigma_data)
    require(math.isfinite(sigma_data) and sigma_data > 0, f"sigma_data must be a finite number > 0, "
                                                          f"got {sigma_data!r}")
    return weight, sigma_data


@register_method("pigdm", needs=("svd",), uses_solver=True)
def pigdm(model, operator, y: torch.Tensor, *, sigma_y: float, x_T: torch.Tensor, nfe: int,
          solver: Optional[str] = None, generator=None, eta: Optional[float] = None,
          weight: float = 1.0, sigma_data: float = 1.0, guidance: Optional[str] = None,
          grid: Optional[str] = None, solver_options: Optional[dict] = None) -> MethodResult:
    """PiGDM with ``nfe`` network evaluations (one per step plus its vector-Jacobian product).
    ``solver=None``: the paper's DDIM loop; ``eta``: its noise (default 1, the paper's for noisy
    problems; ``0`` is deterministic); ``guidance``: ``"paper"`` (default; Algorithm 1's update,
    stable on trained networks) or ``"score"`` (the guided score inside the DDIM step: exact for
    Gaussian data, unstable where a network's Jacobian is inexact); ``grid``: a time grid of
    :mod:`~sde_diffusion.samplers.grids` (default ``uniform``). ``solver="NAME"``: the guided
    score (:class:`PiGDMGuidedModel`, the ``"score"`` form) integrated by that solver of the
    toolkit with ``solver_options`` on ``grid`` (default the solver's own), e.g.
    ``"sde_dpm_solver++"``. ``weight``: guidance weight ``w``; ``sigma_data``: the data's standard
    deviation in ``r_t``."""
    if solver is not None:
        require(eta is None, f"eta is the DDIM loop's noise; with solver={solver!r} give the "
                             f"solver's own in solver_options")
        require(guidance in (None, "score"), f"with a solver PiGDM's guidance is the guided score "
                                             f"(guidance='score'), got guidance={guidance!r}")
        weight, sigma_data = check_guidance("score", weight, sigma_data)
        guided = PiGDMGuidedModel(model, operator, y, sigma_y, sigma_data, weight)
        try:
            out = sample(guided, x_T=x_T, solver=solver, nfe=nfe, grid=grid, generator=generator,
                         sigma_data=sigma_data, **dict(solver_options or {}))
        except NonFiniteError as err:
            raise NonFiniteError(f"{err}; PiGDM's guided score multiplies a network's Jacobian "
                                 f"error by ~1/alpha_t^2 at high noise: with a trained network "
                                 f"use solver=None (the paper's update)") from err
        return MethodResult(samples=out.samples.detach(), nfe=out.nfe,
                            info={"solver": solver, "steps": len(out.times) - 1})
    require(solver_options is None, "solver_options need a solver (solver='NAME')")
    guidance = "paper" if guidance is None else guidance
    weight, sigma_data = check_guidance(guidance, weight, sigma_data)
    eta = check_eta(1.0 if eta is None else eta)
    sigma_y = float(sigma_y)
    sched = schedule(model.sde, nfe, "uniform" if grid is None else grid, sigma_data=sigma_data)
    noise = noise_for(generator, tuple(x_T.shape), x_T, "pigdm")
    spec = spectral(operator, x_T)
    start, x = model.nfe, x_T
    for i in range(sched.steps):
        x0, eps, g, _ = pigdm_terms(model, spec, operator, y, x, sched, i, sigma_y, sigma_data,
                                    guidance)
        std = noise_std(sched, i, eta)
        x = ddim_mean(sched, i, x0, eps, std) + guidance_shift(sched, i, g, std, weight, guidance)
        if std > 0:
            x = x + std * noise.randn()
    return MethodResult(samples=x.detach(), nfe=model.nfe - start)
