r"""The exact posterior of a Gaussian-mixture prior under a linear-Gaussian observation.

Prior ``p(x) = sum_k w_k N(x; m_k, C_k)``, observation ``y = A x + sigma_y n``, ``n ~ N(0, I)``.
Per component the pair ``(x, y)`` is jointly Gaussian, so (Bishop 2006, eqs. 2.113--2.117; the
Kalman update)

    p(y | k)      = N(y; A m_k, S_k),          S_k = A C_k A^T + sigma_y^2 I
    w'_k          = w_k p(y | k) / sum_j w_j p(y | j)
    p(x | y, k)   = N(x; m_k + G_k (y - A m_k), C_k - G_k A C_k),   G_k = C_k A^T S_k^{-1}

and ``p(x | y) = sum_k w'_k p(x | y, k)``: again a mixture, now with full covariances. Under any
SDE of the toolkit, ``x_t = alpha_t x + sigma_t z`` given ``y`` is then the same mixture diffused,
so the oracle gives the exact posterior score ``grad log p_t(x_t | y)`` at every ``t``.

With ``sigma_y = 0`` the posterior covariance has rank ``d_x - rank(A)`` (the observed directions
are known exactly): its zero eigenvalues are kept as zeros (:class:`PosteriorMixture`), so samples
satisfy ``A x = y`` to round-off, and for ``t > 0`` the diffused covariance ``alpha_t^2 C + sigma_t^2
I`` is regular again. ``S_k`` must then be invertible (``A`` of full row rank).
"""
from __future__ import annotations

import math
from typing import List

import torch

from .._checks import require
from ..oracles import GaussianMixture
from .operators import LinearOperator

__all__ = ["exact_posterior", "exact_posteriors", "PosteriorMixture", "prior_covariances"]


class PosteriorMixture(GaussianMixture):
    """A full-covariance :class:`~sde_diffusion.oracles.GaussianMixture` whose covariances may be
    singular (eigenvalues ``>= 0``): the exact posterior of a noiseless observation. Sampling and
    every quantity at a time ``t`` with ``sigma_t > 0`` are exact; the clean density
    (``t=None``, or a VP time with ``sigma_t = 0``) of a singular component does not exist."""

    def _set_full(self, lam: torch.Tensor, U: torch.Tensor, c: torch.Tensor, what: str) -> None:
        low = float(lam.min())
        require(low >= 0, f"{what.replace('> 0', '>= 0')}: got smallest eigenvalue {low!r}")
        # the parent's set-up (it requires lam > 0), then the true eigenvalues, zeros included
        super()._set_full(torch.where(lam > 0, lam, torch.ones_like(lam)), U, c, what)
        self._base["axis_var"] = lam.contiguous()
        self._cache = {}


def prior_covariances(prior: GaussianMixture) -> torch.Tensor:
    """The ``(K, d, d)`` float64 covariances of any mixture (isotropic, diagonal or full)."""
    if prior.covariances is not None:
        return prior.covariances.to(torch.float64)
    var = prior.stds.reshape(prior.n_components, prior.dim).to(torch.float64) ** 2
    return torch.diag_embed(var)


def exact_posterior(prior: GaussianMixture, operator: LinearOperator, y: torch.Tensor,
                    sigma_y: float = 0.0) -> PosteriorMixture:
    """The mixture ``p(x | y)`` (module docstring) for one observation ``y`` (``out_shape`` or
    ``(1, *out_shape)``), with the prior's SDE. Computed in float64 from the dense matrix of
    ``A`` (``d_x`` up to a few thousand). Eigenvalues of the posterior covariances below ``4 d_x``
    float64 round-offs of the prior covariance's largest entry are set to exactly zero."""
    require(isinstance(prior, GaussianMixture), f"prior must be a GaussianMixture, got {type(prior).__name__}")
    require(isinstance(operator, LinearOperator),
            f"operator must be a LinearOperator, got {type(operator).__name__}")
    require(tuple(prior.event_shape) == tuple(operator.in_shape),
            f"the prior's event shape {tuple(prior.event_shape)} differs from the operator's in_shape "
            f"{tuple(operator.in_shape)}")
    sigma_y = float(sigma_y)
    require(math.isfinite(sigma_y) and sigma_y >= 0, f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    require(isinstance(y, torch.Tensor), f"y must be a tensor, got {type(y).__name__}")
    out = tuple(operator.out_shape)
    require(tuple(y.shape) in (out, (1,) + out),
            f"y must be one observation of shape {out} (or (1, {', '.join(map(str, out))})), got "
            f"{tuple(y.shape)}; exact_posteriors takes a batch")
    yv = y.detach().reshape(-1).to("cpu", torch.float64)
    require(bool(torch.isfinite(yv).all()), "y must be finite")
    K, D = prior.n_components, prior.dim
    M = operator.matrix(torch.float64)                          # (d_y, D)
    dy = M.shape[0]
    m = prior.means.reshape(K, D).to(torch.float64)
    C = prior_covariances(prior)
    AC = M @ C                                                  # (K, d_y, D)
    S = AC @ M.T + sigma_y ** 2 * torch.eye(dy, dtype=torch.float64)
    S = 0.5 * (S + S.mT)
    L, info = torch.linalg.cholesky_ex(S)
    bad = int(info.argmax()) if bool((info > 0).any()) else -1
    require(bad < 0, f"A C_k A^T + sigma_y^2 I is singular for component {bad} (sigma_y={sigma_y}, "
                     f"A of rank below d_y={dy}?): give sigma_y > 0 or an A of full row rank")
    r = yv - m @ M.T                                            # (K, d_y)
    white = torch.linalg.solve_triangular(L, r[:, :, None], upper=False)[:, :, 0]
    logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)
    log_lik = -0.5 * ((white * white).sum(1) + logdet + dy * math.log(2 * math.pi))
    log_w = prior.weights.log() + log_lik
    weights = torch.softmax(log_w, dim=0)
    # G_k = C_k A^T S_k^{-1}; with S = L L^T: G_k r = (AC)^T L^-T (L^-1 r)
    LinvAC = torch.linalg.solve_triangular(L, AC, upper=False)              # (K, d_y, D)
    means = m + (LinvAC.mT @ white[:, :, None])[:, :, 0]
    if prior.kind == "isotropic" and dy < D:
        lam, U = _low_rank_eigen(prior.stds.reshape(K, D)[:, 0].to(torch.float64) ** 2, LinvAC)
    else:
        cov = C - LinvAC.mT @ LinvAC
        lam, U = torch.linalg.eigh(0.5 * (cov + cov.mT))
    # round-off of C_k - G_k A C_k is relative to the prior's scale, not the posterior's
    scale = torch.maximum(C.abs().amax((1, 2)), lam.abs().amax(1))[:, None].clamp_min(1e-300)
    floor = 4 * D * torch.finfo(torch.float64).eps * scale
    lam = torch.where(lam <= floor, torch.zeros_like(lam), lam)
    keep = weights > 0                       # components with no posterior mass are dropped
    post = PosteriorMixture.from_eigen(weights[keep], means[keep].reshape((-1,) + tuple(prior.event_shape)),
                                       lam[keep], U[keep], prior.sde)
    post.log_evidence = float(torch.logsumexp(log_w, 0))       # log p(y)
    return post


def _low_rank_eigen(var: torch.Tensor, B: torch.Tensor):
    """Eigen-decomposition of ``C'_k = var_k I - B_k^T B_k`` (isotropic prior components; ``B_k``
    ``(d_y, D)``) without a ``D x D`` eigensolver: with the complete QR ``B_k^T = Q_k R_k``,
    ``Q_k^T C'_k Q_k = diag(var_k I - R R^T, var_k I)``, so only the ``d_y x d_y`` block needs
    ``eigh``; ``O(K D^2 d_y)`` instead of ``O(K D^3)``."""
    K, dy, D = B.shape
    Q, R = torch.linalg.qr(B.mT, mode="complete")               # (K, D, D), (K, D, d_y)
    top = R[:, :dy, :]
    block = var[:, None, None] * torch.eye(dy, dtype=B.dtype) - top @ top.mT
    mu, W = torch.linalg.eigh(0.5 * (block + block.mT))
    lam = torch.cat([mu, var[:, None].expand(K, D - dy)], dim=1)
    U = torch.cat([Q[:, :, :dy] @ W, Q[:, :, dy:]], dim=2)
    return lam, U


def exact_posteriors(prior: GaussianMixture, operator: LinearOperator, y: torch.Tensor,
                     sigma_y: float = 0.0) -> List[PosteriorMixture]:
    """:func:`exact_posterior` for each observation of a batch ``(batch, *out_shape)``."""
    require(isinstance(y, torch.Tensor) and y.ndim == len(operator.out_shape) + 1,
            f"y must be a batch (batch, *out_shape={tuple(operator.out_shape)}), got "
            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    return [exact_posterior(prior, operator, yi, sigma_y) for yi in y]
