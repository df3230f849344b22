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

:func:`image_log_likelihood` adds uniform dequantization of ``n_bits`` images and the exact
bits/dim offset (see ``docs/likelihood.md`` for the derivation and score_sde's ``+7``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ._checks import expand_to, require
from .divergence import PROBES, exact_divergence, hutchinson_divergence, make_probes
from .models.wrapper import OracleModel, ScoreModel, as_model
from .sdes import SDE

__all__ = [
    "log_likelihood", "LikelihoodResult", "integrate_flow", "image_log_likelihood",
    "ImageLikelihoodResult", "dequantize", "bits_per_dim_offset", "discrete_bits_per_dim",
    "DIVERGENCES", "SOLVERS", "SCIPY_METHODS", "OUTLIER_TAIL",
]

DIVERGENCES = ("auto", "exact", "hutchinson")
SOLVERS = ("torchdiffeq", "scipy")
SCIPY_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
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


# ---- validation ---------------------------------------------------------------------------------
def _check_x(x, model: ScoreModel) -> None:
    require(isinstance(x, torch.Tensor), f"x must be a torch.Tensor, got {type(x).__name__}")
    require(x.dtype in (torch.float32, torch.float64),
            f"x must be float32 or float64, got {x.dtype}")
    require(x.ndim >= 2 and x.shape[0] >= 1 and x[0].numel() >= 1,
            f"x must have shape (batch, *event_shape) with batch >= 1, got {tuple(x.shape)}")
    if isinstance(model, OracleModel):
        event = tuple(model.mixture.event_shape)
        require(tuple(x.shape[1:]) == event,
                f"x has shape {tuple(x.shape)}, but the model expects (batch, {', '.join(map(str, event))})")
    require(bool(torch.isfinite(x).all()), "x must be finite (it holds NaN or Inf)")


def _check_tol(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}") from None
    require(math.isfinite(value) and value > 0, f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_solver(solver: str, method: Optional[str]) -> str:
    require(solver in SOLVERS, f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "scipy":
        method = "RK45" if method is None else method
        require(method in SCIPY_METHODS,
                f"method must be one of {SCIPY_METHODS} for solver='scipy', got {method!r}")
        return method
    method = "dopri5" if method is None else method
    try:
        from torchdiffeq._impl.odeint import SOLVERS as _TDE
        known = tuple(_TDE)
    except Exception:  # pragma: no cover - private layout changed
        known = (method,)
    require(method in known, f"method must be one of {known} for solver='torchdiffeq', got {method!r}")
    return method


def _time_bounds(sde: SDE, t_start, t_end) -> Tuple[float, float]:
    t0, t1 = float(t_start), float(t_end)
    for name, v in (("t_start", t0), ("t_end", t1)):
        require(math.isfinite(v) and 0 <= v <= sde.T, f"{name} must lie in [0, T={sde.T}], got {v!r}")
    require(t0 != t1, f"t_start and t_end must differ, got {t0!r} for both")
    return t0, t1


# ---- the probability-flow field -----------------------------------------------------------------
class _FlowField:
    """Right-hand side ``(dx/dt, div f~)`` of the probability-flow ODE and its divergence."""

    def __init__(self, model: ScoreModel, divergence: Optional[str], probes: Optional[torch.Tensor],
                 chunk_size: Optional[int]):
        self.model, self.sde = model, model.sde
        self.divergence, self.probes, self.chunk_size = divergence, probes, chunk_size
        self.n_evals = 0
        self._checked = False

    def __call__(self, t, x: torch.Tensor, idx: Optional[torch.Tensor] = None):
        """``t``: a number, 0-d or ``(n,)`` tensor; ``x``: ``(n, *event)``; ``idx``: which samples of
        the full batch ``x`` holds (selects their probes). Returns detached ``(drift, div)``."""
        tb = self.sde._time(torch.as_tensor(t).to(x.dtype), x)       # (n,)
        f, g2 = self.sde._f_g2(tb)
        D = x[0].numel()
        score_fn = lambda xx: self.model.score(xx, tb)                 # noqa: E731
        try:
            if self.divergence is None:
                with torch.no_grad():
                    s = score_fn(x)
                div_s = None
            elif self.divergence == "exact":
                s, div_s = exact_divergence(score_fn, x, self.chunk_size)
            else:
                probes = self.probes if idx is None else self.probes[:, idx]
                s, div_s = hutchinson_divergence(score_fn, x, probes)
        except RuntimeError as err:
            if self._checked:
                raise
            raise ValueError(f"the model cannot be evaluated on x of shape {tuple(x.shape)} "
                             f"(does it match the model's input?): {err}") from err
        self._checked = True
        self.n_evals += 1
        drift = (expand_to(f, x) * x - expand_to(0.5 * g2, x) * s).detach()
        if div_s is None:
            return drift, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return drift, (f * D - 0.5 * g2 * div_s).detach()


# ---- solvers ------------------------------------------------------------------------------------
_TDE_ADAPTIVE_RK = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def _solve_torchdiffeq(fn: _FlowField, x: torch.Tensor, t0: float, t1: float, rtol: float,
                       atol: float, method: str, options: Optional[dict], idx=None):
    from torchdiffeq import odeint

    lo, hi = min(t0, t1), max(t0, t1)

    def rhs(t, state):
        # torchdiffeq's initial-step heuristic probes t0 + h0 with an unclipped h0, which can lie
        # outside the interval (and outside [0, T]); the steps themselves land on t1 (step_t)
        return fn(min(max(float(t), lo), hi), state[0], idx)

    ts = torch.tensor([t0, t1], dtype=torch.float64, device=x.device)
    l0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    options = dict(options or {})
    if method in _TDE_ADAPTIVE_RK and "step_t" not in options:
        # make the last step land on t1: torchdiffeq otherwise steps past t1 and interpolates
        # back, evaluating the model outside [eps, T]
        options["step_t"] = torch.tensor([t1], dtype=torch.float64)
    before = fn.n_evals
    with torch.no_grad():
        xs, ls = odeint(rhs, (x, l0), ts, rtol=rtol, atol=atol, method=method, options=options)
    return xs[-1], ls[-1], fn.n_evals - before


def _solve_scipy(fn: _FlowField, x: torch.Tensor, t0: float, t1: float, rtol: float, atol: float,
                 method: str, options: Optional[dict], idx=None):
    from scipy.integrate import solve_ivp

    shape, B = tuple(x.shape), x.shape[0]

    def rhs(t, y):
        xt = torch.from_numpy(y[:-B]).reshape(shape).to(device=x.device, dtype=x.dtype)
        drift, div = fn(float(t), xt, idx)
        return np.concatenate([drift.reshape(-1).cpu().double().numpy(), div.cpu().double().numpy()])

    y0 = np.concatenate([x.detach().reshape(-1).cpu().double().numpy(), np.zeros(B)])
    before = fn.n_evals
    with torch.no_grad():
        sol = solve_ivp(rhs, (t0, t1), y0, method=method, rtol=rtol, atol=atol, **(options or {}))
    if not sol.success:
        raise RuntimeError(f"scipy.integrate.solve_ivp ({method}) failed: {sol.message}")
    end = torch.from_numpy(sol.y[:, -1].copy()).to(device=x.device, dtype=x.dtype)
    return end[:-B].reshape(shape), end[-B:], fn.n_evals - before


# Dormand–Prince 5(4) (the tableau of torchdiffeq's dopri5 and scipy's RK45)
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_E = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
         -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)


def _per_sample_norm(ex: torch.Tensor, el: torch.Tensor) -> torch.Tensor:
    """torchdiffeq's mixed norm for one sample's state ``(x, logp)``: max of the RMS norms."""
    return torch.maximum(ex.pow(2).mean(1).sqrt(), el.abs())


def _solve_dopri5_per_sample(fn: _FlowField, x: torch.Tensor, t0: float, t1: float, rtol: float,
                             atol: float, max_steps: int, safety: float = 0.9, ifactor: float = 10.0,
                             dfactor: float = 0.2):
    """Dormand–Prince 5(4) with one step-size controller per sample, vectorized over the batch.

    Every sample has its own time, step size and accept/reject decision (the controller of
    torchdiffeq's ``dopri5``: error ``max(RMS_x, |err_logp|)`` against ``atol + rtol max(|y0|, |y1|)``,
    Hairer's initial step, factor ``clip(0.9 err^-1/5, 0.2 (1 on accept), 10)``); each iteration
    evaluates the network once per stage on the samples still running, at their own times. The last
    step is clipped to land on ``t1``. A sample's result therefore does not depend on the batch.
    """
    B, shape = x.shape[0], tuple(x.shape)
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    dev, dt64 = x.device, torch.float64

    def F(tv: torch.Tensor, xv: torch.Tensor, idx: torch.Tensor):
        dx, dl = fn(tv, xv.reshape((xv.shape[0],) + shape[1:]), idx)
        return dx.reshape(xv.shape[0], -1), dl

    xs = x.detach().reshape(B, -1).clone()
    ls = torch.zeros(B, dtype=x.dtype, device=dev)
    t = torch.full((B,), t0, dtype=dt64, device=dev)
    n_fe = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    every = torch.arange(B, device=dev)

    with torch.no_grad():
        fx, fl = F(t, xs, every)
        # Hairer, Norsett & Wanner (1993), Sec. II.4: initial step, per sample
        sx, sl = atol + rtol * xs.abs(), atol + rtol * ls.abs()
        d0 = _per_sample_norm(xs / sx, ls / sl).to(dt64)
        d1 = _per_sample_norm(fx / sx, fl / sl).to(dt64)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        h0 = h0.clamp(max=span)
        x1 = xs + (direction * h0).to(x.dtype)[:, None] * fx     # the field does not depend on logp
        f1x, f1l = F(t + direction * h0, x1, every)
        n_fe += 2
        d2 = _per_sample_norm((f1x - fx) / sx, (f1l - fl) / sl).to(dt64) / h0
        big = torch.maximum(d1, d2)
        h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), torch.clamp(h0 * 1e-3, min=1e-6),
                         (0.01 / big.clamp(min=1e-300)) ** (1.0 / 5))
        h = torch.minimum(100 * h0, h1)

        for _ in range(max_steps):
            if bool(done.all()):
                break
            a = (~done).nonzero().squeeze(1)
            ta, xa, la = t[a], xs[a], ls[a]
            remaining = (t1 - ta).abs()
            last = h[a] >= remaining
            ha = torch.where(last, remaining, h[a])
            if bool((ha <= 1e-14 * torch.clamp(ta.abs(), min=1.0)).any()):
                raise RuntimeError(f"per-sample dopri5: step size underflow near t={float(ta[0]):.6g}")
            sh = (direction * ha).to(x.dtype)
            kx, kl = [fx[a]], [fl[a]]
            for s in range(1, 7):
                ts = ta + direction * _DP_C[s] * ha
                if _DP_C[s] == 1.0:
                    ts = torch.where(last, torch.full_like(ta, t1), ta + direction * ha)
                dx = sum(c * k for c, k in zip(_DP_A[s], kx) if c != 0.0)
                dl = sum(c * k for c, k in zip(_DP_A[s], kl) if c != 0.0)
                xn, ln = xa + sh[:, None] * dx, la + sh * dl
                gx, gl = F(ts, xn, a)
                kx.append(gx)
                kl.append(gl)
            # after the loop xn, ln hold the 5th-order solution (stage 7 is evaluated there: FSAL)
            ex = sh[:, None] * sum(c * k for c, k in zip(_DP_E, kx) if c != 0.0)
            el = sh * sum(c * k for c, k in zip(_DP_E, kl) if c != 0.0)
            tx = atol + rtol * torch.maximum(xa.abs(), xn.abs())
            tl = atol + rtol * torch.maximum(la.abs(), ln.abs())
            err = _per_sample_norm(ex / tx, el / tl).to(dt64)
            n_fe[a] += 6
            accept = err <= 1
            floor = torch.where(accept, torch.ones_like(err), torch.full_like(err, dfactor))
            factor = torch.minimum(torch.full_like(err, ifactor),
                                   torch.maximum(safety / err.clamp(min=1e-300) ** (1.0 / 5), floor))
            factor = torch.where(err == 0, torch.full_like(err, ifactor), factor)
            h[a] = ha * factor
            acc = a[accept]
            t[acc] = torch.where(last[accept], torch.full_like(ta[accept], t1),
                                 ta[accept] + direction * ha[accept])
            xs[acc], ls[acc] = xn[accept], ln[accept]
            fx[acc], fl[acc] = kx[6][accept], kl[6][accept]
            done[acc] = last[accept]
        else:
            if not bool(done.all()):
                raise RuntimeError(f"per-sample dopri5: max_steps={max_steps} exceeded")
    return xs.reshape(shape), ls, n_fe


def _integrate(fn: _FlowField, x: torch.Tensor, t0: float, t1: float, *, solver: str, method: str,
               rtol: float, atol: float, per_sample: bool, options: Optional[dict], max_steps: int):
    """Integrate ``(x, logp)`` from ``t0`` to ``t1``; returns ``(x_end, delta, n_fevals (batch,))``."""
    B = x.shape[0]
    if per_sample and solver == "torchdiffeq" and method == "dopri5":
        return _solve_dopri5_per_sample(fn, x, t0, t1, rtol, atol, max_steps)
    run = _solve_torchdiffeq if solver == "torchdiffeq" else _solve_scipy
    if not per_sample:
        xe, le, n = run(fn, x, t0, t1, rtol, atol, method, options)
        return xe, le, torch.full((B,), n, dtype=torch.long, device=x.device)
    # any other per-sample solve: one ODE per sample, one after the other (B times the calls)
    outs, counts = [], []
    for i in range(B):
        idx = torch.tensor([i], device=x.device)
        xe, le, n = run(fn, x[i:i + 1], t0, t1, rtol, atol, method, options, idx)
        outs.append((xe, le))
        counts.append(n)
    return (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]),
            torch.tensor(counts, dtype=torch.long, device=x.device))


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
    _check_x(x, model)
    require(divergence in DIVERGENCES, f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    require(probe in PROBES, f"probe must be one of {PROBES}, got {probe!r}")
    require(isinstance(n_probes, int) and not isinstance(n_probes, bool) and n_probes >= 1,
            f"n_probes must be an integer >= 1, got {n_probes!r}")
    rtol, atol = _check_tol("rtol", rtol), _check_tol("atol", atol)
    method = _check_solver(solver, method)
    require(isinstance(per_sample, bool), f"per_sample must be True or False, got {per_sample!r}")
    require(isinstance(max_steps, int) and max_steps >= 1, f"max_steps must be an integer >= 1, got {max_steps!r}")
    t0, t1 = _time_bounds(sde, sde.eps if eps is None else eps, sde.T if T is None else T)
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
    fn = _FlowField(model, divergence, probes, chunk_size)
    nfe0 = model.nfe
    latent, delta, n_fevals = _integrate(fn, x.detach(), t0, t1, solver=solver, method=method,
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


def integrate_flow(model, sde: Optional[SDE], x: torch.Tensor, t_start: float, t_end: float, *,
                   solver: str = "torchdiffeq", method: Optional[str] = None, rtol: float = 1e-5,
                   atol: float = 1e-5, per_sample: bool = False, options: Optional[dict] = None,
                   max_steps: int = 100_000) -> Tuple[torch.Tensor, int]:
    """Carry ``x`` along the probability-flow ODE from ``t_start`` to ``t_end`` (either direction):
    ``integrate_flow(m, sde, x, eps, T)`` encodes, ``integrate_flow(m, sde, z, T, eps)`` decodes.
    Returns ``(x_end, nfe)``. Same solvers and options as :func:`log_likelihood`."""
    model = as_model(model, sde)
    _check_x(x, model)
    rtol, atol = _check_tol("rtol", rtol), _check_tol("atol", atol)
    method = _check_solver(solver, method)
    t0, t1 = _time_bounds(model.sde, t_start, t_end)
    fn = _FlowField(model, None, None, None)
    nfe0 = model.nfe
    x_end, _, _ = _integrate(fn, x.detach(), t0, t1, solver=solver, method=method, rtol=rtol,
                             atol=atol, per_sample=per_sample, options=options, max_steps=max_steps)
    return x_end, model.nfe - nfe0


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
