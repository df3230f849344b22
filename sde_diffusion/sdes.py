r"""Forward SDEs of score-based generative modelling (Song et al., 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", ICLR 2021; cited below as [SDE]).

Every SDE here is an *affine Gaussian* process: conditioned on the data ``x0``,

.. math:: x_t = \alpha(t)\,x_0 + \sigma(t)\,z,\qquad z\sim\mathcal N(0, I),

with linear drift ``f(t) x`` and diffusion ``g(t)``, related to ``alpha`` and ``sigma`` by

.. math:: f(t) = \frac{d\log\alpha}{dt},\qquad g(t)^2 = \frac{d\sigma^2}{dt} - 2 f(t)\,\sigma(t)^2 .

A subclass therefore only provides ``log_alpha(t)``, ``log_sigma(t)`` and ``f_g2(t)``; every
sampler and the likelihood use nothing else, so they work for every SDE unchanged.
Time runs over ``[0, T]``; sampling and likelihoods use ``[eps, T]``.
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ._checks import TimeLike, as_time, check_positive, check_time_range, expand_to, flat_sum, require

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "ReverseSDE", "SDE_NAMES", "make_sde", "sde_name",
           "sde_from_dict"]


class SDE(abc.ABC):
    """Base class of an affine forward SDE ``dx = f(t) x dt + g(t) dw`` on ``t`` in ``[0, T]``.

    Args:
        N: number of discretisation steps of the DDPM/SMLD chains (``discretize``).
        T: end time.
        eps: smallest time used by samplers and likelihoods (the data end of the integration).
    """

    #: standard deviation of the prior ``p_T = N(0, prior_std^2 I)``.
    prior_std: float = 1.0

    def __init__(self, N: int = 1000, T: float = 1.0, eps: float = 1e-3):
        require(isinstance(N, int) and not isinstance(N, bool) and N >= 1,
                f"N must be an integer >= 1, got {N!r}")
        T = check_positive("T", T)
        eps = float(eps)
        require(0 < eps < T, f"eps must lie in the open interval (0, T={T}), got {eps!r}")
        self.N, self.T, self.eps = N, T, eps

    # ---- what a subclass provides -------------------------------------------------------------
    @abc.abstractmethod
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t) for a validated tensor ``t``."""

    @abc.abstractmethod
    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """log sigma(t) for a validated tensor ``t``."""

    @abc.abstractmethod
    def _f_g2(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Drift coefficient ``f(t)`` and squared diffusion ``g(t)^2``."""

    # ---- validated public views ---------------------------------------------------------------
    def time(self, t: TimeLike, like: Optional[torch.Tensor] = None, *,
             sync: bool = True) -> torch.Tensor:
        """``t`` as a tensor (on ``like``'s device, in its dtype, expanded to its batch), checked to
        lie in ``[0, T]``. A number or CPU tensor is checked on the host before it moves to the
        device (no sync). A ``t`` already on a GPU is checked there, which syncs the device, unless
        ``sync=False``: then it is not checked (the model wrapper's per-call path; samplers and
        losses make their times from checked CPU grids or draw them inside ``[eps, T]``)."""
        on_host = not isinstance(t, torch.Tensor) or t.device.type == "cpu"
        if on_host and like is not None and like.device.type != "cpu":
            check_time_range(as_time(t), self.T)
            return as_time(t, like)
        t = as_time(t, like)
        check_time_range(t, self.T, sync=sync)
        return t

    def log_alpha(self, t: TimeLike, *, sync: bool = True) -> torch.Tensor:
        """``log alpha(t)``, for ``t`` checked as in :meth:`time`."""
        return self._log_alpha(self.time(t, sync=sync))

    def log_sigma(self, t: TimeLike, *, sync: bool = True) -> torch.Tensor:
        """``log sigma(t)``, for ``t`` checked as in :meth:`time`."""
        return self._log_sigma(self.time(t, sync=sync))

    def log_scales(self, t: TimeLike, like: Optional[torch.Tensor] = None, *,
                   sync: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, log alpha(t), log sigma(t))`` with ``t`` checked once as in :meth:`time` (and
        made like ``like``): for per-call paths that need the time and both scales."""
        t = self.time(t, like, sync=sync)
        return t, self._log_alpha(t), self._log_sigma(t)

    def alpha(self, t: TimeLike) -> torch.Tensor:
        """Signal scale ``alpha(t)`` of ``x_t = alpha x0 + sigma z``."""
        return self._log_alpha(self.time(t)).exp()

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """Noise scale ``sigma(t)`` of ``x_t = alpha x0 + sigma z``."""
        return self._log_sigma(self.time(t)).exp()

    def f_g2(self, t: TimeLike, *, sync: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """The scalar drift coefficient ``f(t)`` and the squared diffusion ``g(t)^2``, for ``t``
        checked as in :meth:`time`."""
        return self._f_g2(self.time(t, sync=sync))

    def lambda_(self, t: TimeLike) -> torch.Tensor:
        """Half log signal-to-noise ratio ``lambda(t) = log(alpha(t) / sigma(t))``, decreasing in t
        (the variable of DPM-Solver, Lu et al. 2022, Sec. 3.1)."""
        t = self.time(t)
        return self._log_alpha(t) - self._log_sigma(t)

    def t_of_lambda(self, lam: TimeLike) -> torch.Tensor:
        """Inverse of :meth:`lambda_`. The default bisects the monotone ``lambda_`` in float64;
        subclasses override it with a closed form. Values beyond ``lambda([eps', T])`` clamp to
        the ends of ``[0, T]``."""
        lam = self._lambda_arg(lam)
        lam64 = lam.to(torch.float64)
        lo = torch.zeros_like(lam64)
        hi = torch.full_like(lam64, self.T)
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            above = (self._log_alpha(mid) - self._log_sigma(mid)) > lam64
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    @staticmethod
    def _lambda_arg(lam: TimeLike) -> torch.Tensor:
        """``lam`` as a floating tensor; raises on NaN (shared by the closed-form inverses)."""
        lam = as_time(lam)
        require(not bool(torch.isnan(lam).any()), "lambda must not be NaN")
        return lam

    def sde(self, x: torch.Tensor, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Drift ``f(t) x`` (shape of ``x``) and diffusion ``g(t)`` (shape ``(batch,)``) of the
        forward SDE dx = f(x, t) dt + g(t) dw ([SDE] eq. 5)."""
        t = self.time(t, x)
        f, g2 = self._f_g2(t)
        return expand_to(f, x) * x, g2.sqrt()

    def marginal_prob(self, x0: torch.Tensor, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean ``alpha(t) x0`` (shape of ``x0``) and std ``sigma(t)`` (shape ``(batch,)``) of the
        perturbation kernel p_0t(x_t | x0) ([SDE] Appendix B)."""
        t = self.time(t, x0)
        return expand_to(self._log_alpha(t).exp(), x0) * x0, self._log_sigma(t).exp()

    def perturb(self, x0: torch.Tensor, t: TimeLike, noise: torch.Tensor) -> torch.Tensor:
        """``alpha(t) x0 + sigma(t) noise``: a draw from p_0t(. | x0) given standard noise."""
        mean, std = self.marginal_prob(x0, t)
        return mean + expand_to(std, x0) * noise

    # ---- prior -------------------------------------------------------------------------------
    def prior_sampling(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
                       device: Union[str, torch.device, None] = None,
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Draw from the prior ``N(0, prior_std^2 I)`` of shape ``shape``."""
        shape = tuple(int(s) for s in shape)
        require(len(shape) >= 1 and all(s >= 1 for s in shape),
                f"shape must be a non-empty sequence of positive sizes, got {shape}")
        if generator is not None and device is None:
            device = generator.device
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return z * self.prior_std

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior at ``z``, one value per sample (sum over non-batch dims)."""
        d = z[0].numel()
        s2 = self.prior_std ** 2
        return -0.5 * d * math.log(2 * math.pi * s2) - flat_sum(z * z) / (2 * s2)

    # ---- discrete chains ----------------------------------------------------------------------
    def _step_index(self, t: torch.Tensor) -> torch.Tensor:
        """Index ``i = floor(t (N - 1) / T)`` of the discrete chain, as in score_sde."""
        return (t * (self.N - 1) / self.T).long().clamp(0, self.N - 1)

    def discretize(self, x: torch.Tensor, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """One step of the discretised forward process, ``x_{i+1} = x_i + f_i + G_i z_i``.

        The default is Euler–Maruyama with ``dt = T / N``: ``f_i = f(t) x dt``,
        ``G_i = g(t) sqrt(dt)``. VP and VE override it with the DDPM and SMLD chains.
        Returns ``(f_i, G_i)`` with ``G_i`` of shape ``(batch,)``.
        """
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE ([SDE] eq. 6) or, with ``probability_flow=True``, the
        probability-flow ODE ([SDE] eq. 13) driven by ``score_fn(x, t)``."""
        return ReverseSDE(self, score_fn, probability_flow)

    # ---- identity -----------------------------------------------------------------------------
    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict:
        """Every constructor argument that shapes the process (equality and :meth:`to_dict`)."""
        return {"N": self.N, "T": self.T, "eps": self.eps}

    def __eq__(self, other: object) -> bool:
        """Equal when of the same class with the same parameters (not the same ``repr``)."""
        if not isinstance(other, SDE):
            return NotImplemented
        return type(self) is type(other) and self._params() == other._params()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self._params().items()))))

    def to_dict(self) -> dict:
        """``{"name": <a name of SDE_NAMES>, **parameters}``, plain JSON; :func:`sde_from_dict`
        rebuilds an equal SDE."""
        return {"name": sde_name(self), **self._params()}


class ReverseSDE:
    r"""Reverse-time process of ``sde`` driven by a score function.

    SDE ([SDE] eq. 6):  dx = [f(t) x - g(t)^2 s(x, t)] dt + g(t) d\bar w, integrated from T to 0.
    ODE ([SDE] eq. 13): dx = [f(t) x - 1/2 g(t)^2 s(x, t)] dt.
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward, self.score_fn, self.probability_flow = forward, score_fn, bool(probability_flow)
        self.N, self.T = forward.N, forward.T

    def sde(self, x: torch.Tensor, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reverse drift (shape of ``x``) and diffusion (``(batch,)``; zeros for the ODE)."""
        t = self.forward.time(t, x)
        drift, diffusion = self.forward.sde(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        drift = drift - expand_to(diffusion ** 2, x) * self.score_fn(x, t) * weight
        return drift, torch.zeros_like(diffusion) if self.probability_flow else diffusion

    def discretize(self, x: torch.Tensor, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reverse of the discrete chain: ``f_rev = f_i - G_i^2 s`` (half for the ODE), ``G_rev``."""
        t = self.forward.time(t, x)
        f, G = self.forward.discretize(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        rev_f = f - expand_to(G ** 2, x) * self.score_fn(x, t) * weight
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


def _check_betas(beta_min: float, beta_max: float) -> Tuple[float, float]:
    beta_min, beta_max = float(beta_min), float(beta_max)
    require(math.isfinite(beta_min) and beta_min >= 0,
            f"beta_min must be a finite number >= 0, got {beta_min!r}")
    require(math.isfinite(beta_max) and beta_max > 0 and beta_max >= beta_min,
            f"beta_max must be finite, > 0 and >= beta_min={beta_min}, got {beta_max!r}")
    return beta_min, beta_max


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-x))`` for ``x >= 0``, accurate for small and large ``x``."""
    return torch.where(x < math.log(2), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


class _LinearBeta:
    """Linear noise rate on the unit time ``u = t / T``: ``beta(t) = (beta_min + u (beta_max - beta_min)) / T``,
    with integral ``B(t) = beta_min u + (beta_max - beta_min) u^2 / 2`` ([SDE] Appendix B for T = 1).

    ``T`` only rescales time, as for the VE and cosine schedules: ``alpha(T)`` and the DDPM chain's
    betas ``linspace(beta_min / N, beta_max / N, N)`` do not depend on it."""

    def __init__(self, beta_min: float, beta_max: float, T: float = 1.0):
        self.beta_min, self.beta_max = _check_betas(beta_min, beta_max)
        self.T = float(T)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return (self.beta_min + (t / self.T) * (self.beta_max - self.beta_min)) / self.T

    def integral(self, t: torch.Tensor) -> torch.Tensor:
        u = t / self.T
        return self.beta_min * u + 0.5 * (self.beta_max - self.beta_min) * u * u

    def t_of_integral(self, B: torch.Tensor) -> torch.Tensor:
        """Positive root of ``B(t) = B`` (the form used by DPM-Solver, Lu et al. 2022, App. D)."""
        db = self.beta_max - self.beta_min
        denom = self.beta_min + torch.sqrt(self.beta_min ** 2 + 2 * db * B)
        # B = 0 (lambda = +inf) is t = 0 also when beta_min = 0, where the quotient would be 0/0
        return torch.where(B > 0, 2 * B / denom, torch.zeros_like(B)) * self.T


class VPSDE(SDE):
    r"""Variance-preserving SDE ([SDE] eq. 11), the continuous limit of DDPM:

    .. math:: dx = -\tfrac12\beta(t)\,x\,dt + \sqrt{\beta(t)}\,dw,
              \quad \alpha(t) = e^{-\frac12\int_0^t\beta},\quad \sigma(t)^2 = 1-\alpha(t)^2 .

    ``schedule="linear"``: ``beta(t) = beta_min + t (beta_max - beta_min)`` (score_sde defaults
    0.1 and 20; for ``T != 1``, ``t`` reads ``t / T`` and beta is divided by ``T``: ``T`` only
    rescales time, for every SDE here). ``schedule="cosine"``: Nichol & Dhariwal (2021, eq. 17),
    ``alpha(t) = cos(pi/2 (t' + s)/(1 + s)) / cos(pi/2 s/(1 + s))`` with ``t' = t * cosine_t_max``;
    ``cosine_t_max < 1`` keeps ``alpha(T) > 0`` (the schedule is singular at ``t' = 1``; 0.9946 is
    the value DPM-Solver uses).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000,
                 schedule: str = "linear", cosine_s: float = 0.008, cosine_t_max: float = 0.9946,
                 T: float = 1.0, eps: float = 1e-3):
        super().__init__(N=N, T=T, eps=eps)
        require(schedule in ("linear", "cosine"),
                f"schedule must be 'linear' or 'cosine', got {schedule!r}")
        self.schedule = schedule
        self._beta = _LinearBeta(beta_min, beta_max, self.T)
        self.beta_min, self.beta_max = self._beta.beta_min, self._beta.beta_max
        self.cosine_s = check_positive("cosine_s", cosine_s)
        self.cosine_t_max = float(cosine_t_max)
        require(0 < self.cosine_t_max < 1,
                f"cosine_t_max must lie in (0, 1), got {cosine_t_max!r}")
        self.discrete_betas = self._make_discrete_betas()

    def _params(self) -> dict:
        p = {"beta_min": self.beta_min, "beta_max": self.beta_max, "schedule": self.schedule}
        if self.schedule == "cosine":
            p.update(cosine_s=self.cosine_s, cosine_t_max=self.cosine_t_max)
        return {**p, **super()._params()}

    def _cos_angle(self, t: torch.Tensor) -> torch.Tensor:
        s = self.cosine_s
        return 0.5 * math.pi * (t / self.T * self.cosine_t_max + s) / (1 + s)

    def _integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """``B(t) = -2 log alpha(t)``."""
        if self.schedule == "linear":
            return self._beta.integral(t)
        # alpha = cos(a0 + d) / cos(a0) = 1 - 2 sin(d/2)^2 - tan(a0) sin(d), with a0 the angle at
        # t = 0 and d = angle(t) - a0: through log1p, B(t) is exact at t = 0 and accurate near it
        # in float32 too (log(cos(angle)) - log(cos(a0)) cancels there, and gave B(0) < 0).
        a0 = 0.5 * math.pi * self.cosine_s / (1 + self.cosine_s)
        d = 0.5 * math.pi * (t / self.T * self.cosine_t_max) / (1 + self.cosine_s)
        return -2 * torch.log1p(-2 * torch.sin(0.5 * d) ** 2 - math.tan(a0) * torch.sin(d))

    def _log_alpha(self, t):
        return -0.5 * self._integrated_beta(t)

    def _log_sigma(self, t):
        return 0.5 * _log1mexp(self._integrated_beta(t))

    def beta(self, t: TimeLike) -> torch.Tensor:
        """Noise rate ``beta(t) = -2 d log alpha / dt``."""
        return self._beta_rate(self.time(t))

    def _beta_rate(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return self._beta.beta(t)
        rate = math.pi * self.cosine_t_max / (self.T * (1 + self.cosine_s))
        return rate * torch.tan(self._cos_angle(t))

    def _f_g2(self, t):
        beta = self._beta_rate(t)
        return -0.5 * beta, beta

    def t_of_lambda(self, lam: TimeLike) -> torch.Tensor:
        """Closed-form inverse of the log-SNR: ``B(t) = log(1 + e^{-2 lambda})``."""
        lam = self._lambda_arg(lam)
        if self.schedule == "linear":
            B = torch.nn.functional.softplus(-2 * lam).clamp(max=1e30)   # finite at lambda = -inf
            return self._beta.t_of_integral(B).clamp(0, self.T)
        # alpha^2 = sigmoid(2 lambda), sigma^2 = sigmoid(-2 lambda); solve cos(a0 + d) = alpha cos(a0)
        # for d = angle - a0 with atan2, free of cancellation near t = 0 (acos loses digits there)
        a0 = 0.5 * math.pi * self.cosine_s / (1 + self.cosine_s)
        sa0, ca0 = math.sin(a0), math.cos(a0)
        sigma2 = torch.sigmoid(-2 * lam)
        alpha = torch.sigmoid(2 * lam).sqrt()
        sin_angle = torch.sqrt(sa0 ** 2 + ca0 ** 2 * sigma2)
        d = torch.atan2(ca0 * sigma2 / (sin_angle + alpha * sa0), alpha * ca0 ** 2 + sin_angle * sa0)
        t = d * (2 * (1 + self.cosine_s) / math.pi) / self.cosine_t_max * self.T
        return t.clamp(0, self.T)

    def _make_discrete_betas(self) -> torch.Tensor:
        """DDPM betas of the N-step chain: score_sde's ``linspace(beta_min/N, beta_max/N, N)``
        for the linear schedule; ``1 - alpha_bar(t_i)/alpha_bar(t_{i-1})`` on the grid
        ``t_i = (i + 1) T / N`` (capped at 0.999, Nichol & Dhariwal 2021) for the cosine one."""
        if self.schedule == "linear":
            return torch.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N,
                                  dtype=torch.float64)
        grid = torch.linspace(0, self.T, self.N + 1, dtype=torch.float64)
        B = self._integrated_beta(grid)
        return (-torch.expm1(-(B[1:] - B[:-1]))).clamp(max=0.999)

    def discretize(self, x, t):
        """DDPM chain ([SDE] Appendix B): ``x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z``,
        so ``f_i = (sqrt(1 - beta_i) - 1) x`` and ``G_i = sqrt(beta_i)``."""
        t = self.time(t, x)
        beta = self.discrete_betas.to(device=x.device, dtype=x.dtype)[self._step_index(t)]
        return expand_to(torch.sqrt(1 - beta) - 1, x) * x, beta.sqrt()


class SubVPSDE(SDE):
    r"""Sub-VP SDE ([SDE] eq. 12), whose variance stays below the VP SDE's:

    .. math:: dx = -\tfrac12\beta(t)\,x\,dt + \sqrt{\beta(t)\,(1 - e^{-2\int_0^t\beta})}\,dw,
              \quad \alpha(t) = e^{-\frac12\int_0^t\beta},\quad \sigma(t) = 1 - \alpha(t)^2 .

    Linear ``beta`` with score_sde's defaults. ``discretize`` is Euler–Maruyama, as in score_sde.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000,
                 T: float = 1.0, eps: float = 1e-3):
        super().__init__(N=N, T=T, eps=eps)
        self._beta = _LinearBeta(beta_min, beta_max, self.T)
        self.beta_min, self.beta_max = self._beta.beta_min, self._beta.beta_max

    def _params(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, **super()._params()}

    def _log_alpha(self, t):
        return -0.5 * self._beta.integral(t)

    def _log_sigma(self, t):
        return _log1mexp(self._beta.integral(t))

    def _f_g2(self, t):
        beta = self._beta.beta(t)
        return -0.5 * beta, beta * (-torch.expm1(-2 * self._beta.integral(t)))

    def t_of_lambda(self, lam: TimeLike) -> torch.Tensor:
        """Closed form: with ``r = e^lambda``, ``alpha`` solves ``r alpha^2 + alpha - r = 0``, so
        ``alpha = (sqrt(1 + 4 r^2) - 1) / (2 r)`` and ``B(t) = -2 log alpha = 2 asinh(e^{-lambda} / 2)``
        (the asinh form keeps float32 accurate near t = 0, where alpha rounds to 1)."""
        lam = self._lambda_arg(lam)
        B = torch.where(lam > -15, 2 * torch.asinh(0.5 * torch.exp(-lam.clamp(min=-15))), -2 * lam)
        return self._beta.t_of_integral(B.clamp(max=1e30)).clamp(0, self.T)


class VESDE(SDE):
    r"""Variance-exploding SDE ([SDE] eq. 9), the continuous limit of SMLD/NCSN:

    .. math:: dx = \sqrt{\tfrac{d\,\sigma(t)^2}{dt}}\,dw,\qquad
              \sigma(t) = \sigma_{min}\,(\sigma_{max}/\sigma_{min})^t,\quad \alpha(t) = 1 .

    As in score_sde, the perturbation kernel is ``N(x0, sigma(t)^2 I)`` with ``sigma(0) = sigma_min``
    (data are taken as already carrying ``sigma_min`` noise), and the prior is
    ``N(0, sigma_max^2 I)``. Defaults ``sigma_min=0.01``, ``sigma_max=50``, ``eps=1e-5``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000,
                 T: float = 1.0, eps: float = 1e-5):
        super().__init__(N=N, T=T, eps=eps)
        self.sigma_min = check_positive("sigma_min", sigma_min)
        self.sigma_max = check_positive("sigma_max", sigma_max)
        require(self.sigma_max > self.sigma_min,
                f"sigma_max must be > sigma_min={self.sigma_min}, got {sigma_max!r}")
        self.prior_std = self.sigma_max
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(self.sigma_min),
                                                        math.log(self.sigma_max), N,
                                                        dtype=torch.float64))

    def _params(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, **super()._params()}

    def _log_alpha(self, t):
        return torch.zeros_like(t)

    def _log_sigma(self, t):
        return math.log(self.sigma_min) + t / self.T * self._log_ratio

    def _f_g2(self, t):
        sigma2 = torch.exp(2 * self._log_sigma(t))
        return torch.zeros_like(t), sigma2 * (2 * self._log_ratio / self.T)

    def t_of_lambda(self, lam: TimeLike) -> torch.Tensor:
        """Closed form: ``sigma = e^{-lambda}``, ``t = T log(sigma / sigma_min) / log(sigma_max / sigma_min)``."""
        lam = self._lambda_arg(lam)
        return ((-lam - math.log(self.sigma_min)) / self._log_ratio * self.T).clamp(0, self.T)

    def discretize(self, x, t):
        """SMLD chain ([SDE] Appendix B): ``x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z``
        with ``sigma_{-1} = 0``."""
        t = self.time(t, x)
        i = self._step_index(t)
        sigmas = self.discrete_sigmas.to(device=x.device, dtype=x.dtype)
        sigma = sigmas[i]
        previous = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp(min=0)])
        return torch.zeros_like(x), torch.sqrt(sigma ** 2 - previous ** 2)


# ---- names ---------------------------------------------------------------------------------------
#: The one table of SDE names, for configs, the command line, files and tests: each name is a class
#: and the constructor arguments that make this kind (the rest are the user's parameters, e.g.
#: ``beta_max=`` or ``sigma_max=``). A new SDE class is one more row.
SDE_NAMES: Dict[str, Tuple[type, Dict[str, object]]] = {
    "vp": (VPSDE, {"schedule": "linear"}),
    "vp_cosine": (VPSDE, {"schedule": "cosine"}),
    "subvp": (SubVPSDE, {}),
    "ve": (VESDE, {}),
}
#: score_sde's spellings (``config.training.sde = "vpsde"``), read as the names above.
_ALIASES = {"vpsde": "vp", "vpsde_cosine": "vp_cosine", "subvpsde": "subvp", "vesde": "ve"}
#: SDE classes of ``models.adapters`` that have no name on purpose (docs/models.md, "Why the
#: adapters' SDEs have no name"): spelling (lower case, no ``_``, no ``sde`` suffix) -> (class, why).
_NOT_NAMED = {
    "discretevp": ("DiscreteVPSDE", "its schedule is an array of N alphas_cumprod, which a name, a "
                   "config field or a flag cannot carry; it comes with the model "
                   "from_diffusers(unet, scheduler) builds (use model.sde, or "
                   "DiscreteVPSDE(alphas_cumprod)); grid files record it by its repr, which holds "
                   "a digest of the schedule"),
    "edm": ("EDMSDE", "it serves denoisers trained elsewhere and enters with the model "
            "from_k_diffusion(D) builds (use model.sde, or EDMSDE(sigma_min, sigma_max)); nothing "
            "that reads names uses it (the training configs lack EDM's noise distribution, the "
            "command line has no such models); grid files record it by its repr"),
}


def canonical_sde_name(name: str) -> str:
    """``name`` (case-insensitive, score_sde's ``vpsde``-style spellings accepted) as a key of
    :data:`SDE_NAMES`; an unknown name raises a ``ValueError`` listing the valid ones."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    unnamed = _NOT_NAMED.get(key.replace("_", "").removesuffix("sde"))
    why = f"; {name!r} is {unnamed[0]}, which has no name on purpose: {unnamed[1]}" if unnamed else ""
    require(key in SDE_NAMES, f"unknown SDE {name!r}; valid: {', '.join(SDE_NAMES)} "
                              f"(or score_sde's {', '.join(_ALIASES)}){why}")
    return key


def make_sde(name: str, **params) -> SDE:
    """The SDE called ``name`` in :data:`SDE_NAMES` with the given parameters."""
    cls, kind = SDE_NAMES[canonical_sde_name(name)]
    clash = sorted(set(kind) & set(params))
    require(not clash, f"SDE {name!r} fixes {', '.join(clash)}; pass only its other parameters")
    return cls(**kind, **params)


def sde_name(sde: SDE) -> str:
    """The :data:`SDE_NAMES` name of ``sde``'s kind: its exact class (a subclass may change the
    process) and the arguments fixing the kind. ``ValueError`` for an SDE the table lacks."""
    for name, (cls, kind) in SDE_NAMES.items():
        if type(sde) is cls and all(getattr(sde, k) == v for k, v in kind.items()):
            return name
    why = [w for cls_name, w in _NOT_NAMED.values() if cls_name == type(sde).__name__]
    raise ValueError(f"{type(sde).__name__} has no name in SDE_NAMES ({', '.join(SDE_NAMES)})"
                     + (f", on purpose: {why[0]}" if why else ""))


def sde_from_dict(d: dict) -> SDE:
    """Inverse of :meth:`SDE.to_dict`."""
    require(isinstance(d, dict) and "name" in d, f"an SDE dict needs a 'name', got {d!r}")
    kind = SDE_NAMES[canonical_sde_name(d["name"])][1]
    return make_sde(d["name"], **{k: v for k, v in d.items() if k != "name" and k not in kind})
