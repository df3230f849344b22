r"""Exact likelihoods through the probability-flow ODE ([SDE] Song et al. 2021, Sec. 4.3, App. D.2).

For the affine SDEs of :mod:`sde_diffusion.sdes`, the probability-flow ODE ([SDE] eq. 13)

.. math:: \frac{dx}{dt} = \tilde f(x, t) = f(t)\,x - \tfrac12 g(t)^2\, s_\theta(x, t)

transports ``p_eps`` to ``p_T`` and, by the instantaneous change of variables (Chen et al. 2018),

.. math:: \log p_\varepsilon(x_\varepsilon) = \log p_T(x_T)
          + \int_\varepsilon^T \nabla\cdot\tilde f(x_t, t)\,dt,\qquad
          \nabla\cdot\tilde f = f(t)\,D - \tfrac12 g(t)^2\,\nabla\cdot s_\theta(x, t)

([SDE] eq. 39-40). :func:`log_likelihood` integrates ``x`` and the divergence integral together from
``eps`` to ``T``; ``p_T`` is the SDE's prior (or any ``prior_logp`` given). The linear part of the
divergence, ``f(t) D``, is added exactly; only ``div s_theta`` is computed, exactly (torch autograd,
``D`` batched vector-Jacobian products per evaluation) or by the Hutchinson–Skilling estimator
with probes fixed per sample for the whole trajectory.

The field and its integrators (torchdiffeq, scipy, the per-sample Dormand–Prince) live in
:mod:`sde_diffusion.flow`, shared with the ODE samplers; :func:`~sde_diffusion.flow.integrate_flow`,
``SOLVERS`` and ``SCIPY_METHODS`` are re-exported here.

:func:`image_log_likelihood` adds uniform dequantization of ``n_bits`` images and the exact
bits/dim offset (see ``docs/likelihood.md`` for the derivation and score_sde's ``+7``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from ._checks import require
from .divergence import PROBES, make_probes
from .flow import (
    SCIPY_METHODS, SOLVERS, FlowField, check_integration, check_interval, check_state, integrate,
    integrate_flow,
)
from .models.wrapper import as_model
from .sdes import SDE

__all__ = [
    "log_likelihood", "LikelihoodResult", "integrate_flow", "image_log_likelihood",
    "ImageLikelihoodResult", "dequantize", "bits_per_dim_offset", "discrete_bits_per_dim",
    "DIVERGENCES", "SOLVERS", "SCIPY_METHODS", "OUTLIER_TAIL",
]

DIVERGENCES = ("auto", "exact", "hutchinson")
#: ``divergence="auto"`` is exact up to this many dimensions per sample, Hutchinson above
AUTO_EXACT_MAX_DIM = 256

LN2 = math.log(2.0)


# ---- results ------------------------------------------------------------------------------------
@dataclass
class LikelihoodResult:
    """What :func:`log_likelihood` returns; all tensors have one entry per sample.

    Attributes:
        log_likelihood: ``log p_eps(x)`` in nats (an unbiased estimate with Hutchinson).
        nll: ``-log_likelihood`` in nats.
        bpd: ``nll / (D ln 2)``, bits per dimension of the continuous data ``x`` (no offset).
        latent: ``x_T``, the end of the probability-flow trajectory.
        prior_logp: ``log p_T(x_T)``.
        delta_logp: ``integral_eps^T div f~ dt``; ``log_likelihood = prior_logp + delta_logp``.
        nfe: network evaluations (``model.nfe`` increments). The exact divergence costs ONE
            network evaluation (a forward pass) plus ``D`` batched backward passes per ODE
            function evaluation; Hutchinson one forward plus ``n_probes`` backward passes.
        n_fevals: ODE right-hand-side evaluations per sample (``(batch,)`` int64). With a shared
            batch ODE every entry is the solver's count; with ``per_sample=True`` each sample's own.
        dim: ``D``, the number of dimensions per sample.
        divergence: ``"exact"`` or ``"hutchinson"`` (what ``"auto"`` resolved to).
        wall_time: seconds spent.
        latent_norm2: ``||x_T||^2 / (prior_std^2 D)`` per sample: distributed as
            ``chi^2_D / D`` (mean 1) when ``x_T`` follows the SDE's prior ``N(0, prior_std^2 I)``.
        latent_outlier: ``True`` where the latent lies far outside that prior: ``||x_T||^2 /
            prior_std^2`` above the ``1 - outlier_tail`` quantile of ``chi^2_D`` (or not finite).
            Points the model never saw (off the data manifold) land there, and their NLL,
            thousands of nats, can dominate ``nll.mean()``: compare :attr:`nll_median` and
            :meth:`nll_trimmed_mean`. Measured against the SDE's prior even when a custom
            ``prior_logp`` is given.
        outlier_tail: the prior's tail probability beyond the threshold (default
            :data:`OUTLIER_TAIL` = 1e-6: one in a million prior draws is flagged by chance).
    """

    log_likelihood: torch.Tensor
    nll: torch.Tensor
    bpd: torch.Tensor
    latent: torch.Tensor
    prior_logp: torch.Tensor
    delta_logp: torch.Tensor
    nfe: int
    n_fevals: torch.Tensor
    dim: int
    divergence: str
    wall_time: float
    latent_norm2: Optional[torch.Tensor] = None
    latent_outlier: Optional[torch.Tensor] = None
    outlier_tail: float = 1e-6

    @property
    def nll_per_dim(self) -> torch.Tensor:
        """``nll / D`` in nats per dimension."""
        return self.nll / self.dim

    @property
    def nll_median(self) -> float:
        """Median NLL in nats (the middle value; the mean of the two middle ones for an even
        batch): robust to a few points the model never saw."""
        return float(self.nll.detach().double().cpu().quantile(0.5))

    def nll_trimmed_mean(self, trim: float = 0.1) -> float:
        """Mean NLL in nats after dropping the ``floor(trim * n)`` smallest and largest values
        (``trim`` = 0.1: the 10% trimmed mean, as ``scipy.stats.trim_mean(nll, 0.1)``)."""
        return _trimmed_mean(self.nll, trim)

    @property
    def n_latent_outliers(self) -> int:
        """How many samples have a latent far outside the prior (:attr:`latent_outlier`)."""
        return 0 if self.latent_outlier is None else int(self.latent_outlier.sum())

    def summary(self, trim: float = 0.1) -> dict:
        """Plain numbers over the batch: ``n``, ``dim``, the NLL in nats (``nll_mean``,
        ``nll_median``, ``nll_trimmed_mean`` with ``trim``), the same in bits/dim (``bpd_*``),
        ``bpd_ci95`` (half-width of the normal 95% interval of the mean bits/dim; NaN for one
        sample), ``latent_outliers`` (a count) and ``outlier_tail``, ``nfe``."""
        bpd = self.bpd.detach().double().cpu()
        n, scale = len(bpd), self.dim * LN2
        return {"n": n, "dim": self.dim, "nll_mean": float(self.nll.double().mean()),
                "nll_median": self.nll_median, "nll_trimmed_mean": self.nll_trimmed_mean(trim),
                "trim": trim, "bpd_mean": float(bpd.mean()), "bpd_median": self.nll_median / scale,
                "bpd_trimmed_mean": self.nll_trimmed_mean(trim) / scale,
                "bpd_ci95": 1.96 * float(bpd.std()) / math.sqrt(n) if n > 1 else math.nan,
                "latent_outliers": self.n_latent_outliers, "outlier_tail": self.outlier_tail,
                "nfe": self.nfe}


@dataclass
class ImageLikelihoodResult:
    """What :func:`image_log_likelihood` returns (one entry per image).

    Attributes:
        bpd: bits/dim of the discrete images, ``-E_u[log p(x(k + u))] / (D ln 2) + offset_bits``,
            with the expectation over the dequantization draws estimated by their mean: an upper
            bound (in expectation) on ``-log2 P(k) / D``.
        nll: the same in nats per image, ``-E_u[log p(x)] + D ln(2^n_bits / width)``.
        log_likelihood: ``-nll``.
        bpd_iw: bits/dim from ``log mean_u p(x(k + u))`` over the draws (importance-weighted bound,
            ``<= bpd`` and tighter as ``n_dequant`` grows); equals ``bpd`` for one draw.
        bpd_continuous: bits/dim of the continuous model density on the scaled data, no offset.
        offset_bits: ``log2(2^n_bits / width)``: 7 for 8-bit data on ``[-1, 1]``, 8 on ``[0, 1]``.
        nfe: network evaluations over all draws.
        draws: the :class:`LikelihoodResult` of each dequantization draw.
    """

    bpd: torch.Tensor
    nll: torch.Tensor
    log_likelihood: torch.Tensor
    bpd_iw: torch.Tensor
    bpd_continuous: torch.Tensor
    offset_bits: float
    nfe: int
    draws: List[LikelihoodResult] = field(default_factory=list)


#: prior tail probability beyond which a latent counts as far outside the prior (LikelihoodResult)
OUTLIER_TAIL = 1e-6


def _trimmed_mean(values: torch.Tensor, trim: float) -> float:
    require(isinstance(trim, (int, float)) and 0 <= trim < 0.5, f"trim must lie in [0, 0.5), got {trim!r}")
    v = values.detach().double().cpu().flatten().sort().values
    k = int(math.floor(trim * len(v)))
    return float(v[k:len(v) - k].mean())


def _latent_outliers(latent: torch.Tensor, prior_std: float, tail: float):
    """``(||z||^2 / (prior_std^2 D), flagged)``: flagged where ``||z||^2 / prior_std^2`` exceeds the
    ``1 - tail`` quantile of ``chi^2_D``, the law of the squared norm of a ``D``-dim prior draw."""
    from scipy.stats import chi2

    z = latent.detach().double().reshape(latent.shape[0], -1)
    D = z.shape[1]
    norm2 = z.pow(2).sum(1) / prior_std ** 2
    flagged = ~(norm2 <= chi2.isf(tail, D))       # NaN counts as flagged
    return norm2 / D, flagged


# ---- public API ---------------------------------------------------------------------------------
def log_likelihood(model, sde: Optional[SDE], x: torch.Tensor, *, divergence: str = "auto",
                   probe: str = "rademacher", n_probes: int = 1, probes: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, solver: str = "torchdiffeq",
                   method: Optional[str] = None, rtol: float = 1e-5, atol: float = 1e-5,
                   per_sample: bool = False, eps: Optional[float] = None, T: Optional[float] = None,
                   prior_logp: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   chunk_size: Optional[int] = None, options: Optional[dict] = None,
                   max_steps: int = 100_000) -> LikelihoodResult:
    r"""Per-sample ``log p_eps(x)`` of a score model through the probability-flow ODE.

    Args:
        model: a :class:`~sde_diffusion.models.ScoreModel` (any parameterization; ``model.score``
            is used), an :class:`~sde_diffusion.models.OracleModel`, or a
            :class:`~sde_diffusion.oracles.GaussianMixture` (wrapped in an ``OracleModel``).
        sde: the forward SDE (``None``: ``model.sde``); must match the model's.
        x: ``(batch, *event_shape)`` data, float32 or float64, on any device.
        divergence: ``"exact"``, ``"hutchinson"`` or ``"auto"`` (exact up to
            ``AUTO_EXACT_MAX_DIM`` dimensions per sample).
        probe, n_probes: Hutchinson probes, ``"rademacher"`` or ``"gaussian"``, ``K`` of them per
            sample, drawn once (with ``generator``) and fixed for the whole trajectory.
        probes: explicit probes of shape ``(n_probes, *x.shape)`` instead of drawing them.
        solver: ``"torchdiffeq"`` (default ``method="dopri5"``) or ``"scipy"`` (``solve_ivp``,
            default ``method="RK45"``, the score_sde setup).
        rtol, atol: tolerances of the adaptive solver (default 1e-5 as in score_sde).
        per_sample: ``False``: one ODE for the whole batch, with one shared step size (fast; a
            sample's result depends on its companions within the tolerance). ``True``: every sample
            has its own error control; with torchdiffeq/dopri5 by a vectorized per-sample
            Dormand–Prince (one network call per stage on the running samples), otherwise by
            solving the samples one after the other (``batch`` times the network calls).
        eps, T: integration interval (default ``sde.eps``, ``sde.T``); the result is ``log p_eps``.
        prior_logp: ``z -> (batch,)`` log-density of ``x_T`` (default ``sde.prior_logp``).
        chunk_size: basis vectors per batched backward pass of the exact divergence.
        options: extra solver options passed to torchdiffeq (``options=``) or ``solve_ivp``.
        max_steps: step limit of the per-sample solver.

    Returns:
        A :class:`LikelihoodResult` (log-likelihood, NLL in nats and bits/dim, NFE, latent ``x_T``).
    """
    start = time.perf_counter()
    model = as_model(model, sde)
    sde = model.sde
    check_state(x, model)
    require(divergence in DIVERGENCES, f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    require(probe in PROBES, f"probe must be one of {PROBES}, got {probe!r}")
    require(isinstance(n_probes, int) and not isinstance(n_probes, bool) and n_probes >= 1,
            f"n_probes must be an integer >= 1, got {n_probes!r}")
    method, rtol, atol = check_integration(solver, method, rtol, atol, per_sample, max_steps)
    t0, t1 = check_interval(sde, sde.eps if eps is None else eps, sde.T if T is None else T)
    require(t0 < t1, f"eps must be smaller than T, got eps={t0!r}, T={t1!r}")
    D = x[0].numel()
    if divergence == "auto":
        divergence = "exact" if D <= AUTO_EXACT_MAX_DIM else "hutchinson"
    if divergence == "hutchinson":
        if probes is None:
            probes = make_probes(x.shape, n_probes, probe, generator, x.dtype, x.device)
        else:
            require(isinstance(probes, torch.Tensor) and probes.ndim == x.ndim + 1
                    and tuple(probes.shape[1:]) == tuple(x.shape),
                    f"probes must have shape (n_probes, {', '.join(map(str, x.shape))}), got "
                    f"{tuple(probes.shape) if isinstance(probes, torch.Tensor) else type(probes).__name__}")
            probes = probes.to(device=x.device, dtype=x.dtype)
    flow_field = FlowField(model, divergence, probes, chunk_size)
    nfe0 = model.nfe
    latent, delta, n_fevals = integrate(flow_field, x.detach(), t0, t1, solver=solver, method=method,
                                        rtol=rtol, atol=atol, per_sample=per_sample,
                                        options=options, max_steps=max_steps)
    with torch.no_grad():
        prior = (sde.prior_logp if prior_logp is None else prior_logp)(latent)
    require(isinstance(prior, torch.Tensor) and prior.shape == (x.shape[0],),
            f"prior_logp must return a tensor of shape ({x.shape[0]},), got "
            f"{tuple(prior.shape) if isinstance(prior, torch.Tensor) else type(prior).__name__}")
    prior = prior.to(dtype=x.dtype, device=x.device)
    ll = prior + delta
    nll = -ll
    norm2, outlier = _latent_outliers(latent, sde.prior_std, OUTLIER_TAIL)
    return LikelihoodResult(log_likelihood=ll, nll=nll, bpd=nll / (D * LN2), latent=latent,
                            prior_logp=prior, delta_logp=delta, nfe=model.nfe - nfe0,
                            n_fevals=n_fevals, dim=D, divergence=divergence,
                            wall_time=time.perf_counter() - start, latent_norm2=norm2,
                            latent_outlier=outlier, outlier_tail=OUTLIER_TAIL)


# ---- images: dequantization and bits/dim --------------------------------------------------------
def bits_per_dim_offset(n_bits: int = 8, centered: bool = True) -> float:
    """``log2(2^n_bits / width)`` with ``width = 2`` for data scaled to ``[-1, 1]`` (``centered``)
    and ``1`` for ``[0, 1]``: the bits/dim added to the continuous model's bits/dim to get the
    discrete data's (7 for 8-bit images on ``[-1, 1]``, 8 on ``[0, 1]``; docs/likelihood.md)."""
    require(isinstance(n_bits, int) and 1 <= n_bits <= 16, f"n_bits must be an integer in [1, 16], got {n_bits!r}")
    return n_bits - math.log2(2.0 if centered else 1.0)


def discrete_bits_per_dim(log_px: torch.Tensor, dim: int, n_bits: int = 8,
                          centered: bool = True) -> torch.Tensor:
    """Bits/dim of the discrete data from the continuous log-density ``log p(x)`` (nats) of its
    dequantized, scaled version: ``-log_px / (dim ln 2) + bits_per_dim_offset(n_bits, centered)``."""
    require(isinstance(dim, int) and dim >= 1, f"dim must be an integer >= 1, got {dim!r}")
    return -log_px / (dim * LN2) + bits_per_dim_offset(n_bits, centered)


def dequantize(images: torch.Tensor, n_bits: int = 8, centered: bool = True,
               generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform dequantization of integer images ``k`` in ``{0, ..., 2^n_bits - 1}``:
    ``y = k + u``, ``u ~ U[0, 1)`` per entry, then ``x = y / 2^n_bits`` scaled to ``[0, 1)`` or, with
    ``centered``, ``x = 2 y / 2^n_bits - 1`` in ``[-1, 1)`` (score_sde's
    ``(u + 255 img) / 256`` then ``2 x - 1``). ``noise`` gives ``u`` explicitly."""
    require(isinstance(images, torch.Tensor), f"images must be a torch.Tensor, got {type(images).__name__}")
    bits_per_dim_offset(n_bits, centered)          # validates n_bits
    levels = float(2 ** n_bits)
    k = images.to(torch.float64)
    require(bool((k == k.round()).all()) and bool((k >= 0).all()) and bool((k <= levels - 1).all()),
            f"images must hold integers in [0, {int(levels) - 1}] (n_bits={n_bits}), got values in "
            f"[{float(k.min())}, {float(k.max())}]")
    if noise is None:
        noise = torch.rand(images.shape, generator=generator,
                           device=generator.device if generator is not None else images.device,
                           dtype=torch.float64)
    require(isinstance(noise, torch.Tensor) and noise.shape == images.shape,
            f"noise must have the images' shape {tuple(images.shape)}, got "
            f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    noise = noise.to(device=images.device, dtype=torch.float64)
    require(bool((noise >= 0).all()) and bool((noise < 1).all()), "noise must lie in [0, 1)")
    y = (k + noise) / levels
    return (2 * y - 1 if centered else y).to(dtype)


def image_log_likelihood(model, sde: Optional[SDE], images: torch.Tensor, *, n_bits: int = 8,
                         centered: bool = True, n_dequant: int = 1,
                         generator: Optional[torch.Generator] = None,
                         dtype: torch.dtype = torch.float32, **kwargs) -> ImageLikelihoodResult:
    """Bits/dim of ``n_bits`` integer images under a score model trained on data scaled to
    ``[-1, 1]`` (``centered``) or ``[0, 1]``: ``n_dequant`` uniform dequantization draws, each through
    :func:`log_likelihood` (``kwargs`` go there, e.g. ``divergence``, ``eps``, ``solver``), averaged.
    See :class:`ImageLikelihoodResult` and docs/likelihood.md."""
    require(isinstance(n_dequant, int) and not isinstance(n_dequant, bool) and n_dequant >= 1,
            f"n_dequant must be an integer >= 1, got {n_dequant!r}")
    offset = bits_per_dim_offset(n_bits, centered)
    draws = []
    for _ in range(n_dequant):
        x = dequantize(images, n_bits, centered, generator=generator, dtype=dtype)
        draws.append(log_likelihood(model, sde, x, generator=generator, **kwargs))
    D = draws[0].dim
    lls = torch.stack([d.log_likelihood for d in draws])              # (n_dequant, batch)
    mean_ll = lls.mean(0)
    iw_ll = torch.logsumexp(lls, 0) - math.log(n_dequant)
    nll = -mean_ll + D * offset * LN2
    return ImageLikelihoodResult(
        bpd=discrete_bits_per_dim(mean_ll, D, n_bits, centered), nll=nll, log_likelihood=-nll,
        bpd_iw=discrete_bits_per_dim(iw_ll, D, n_bits, centered),
        bpd_continuous=-mean_ll / (D * LN2), offset_bits=offset,
        nfe=sum(d.nfe for d in draws), draws=draws)
