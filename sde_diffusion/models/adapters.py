r"""Models from the ecosystem: a diffusers ``UNet2DModel`` with its scheduler config, an
EDM / k-diffusion denoiser ``D(x; sigma)``, as :class:`~sde_diffusion.models.ScoreModel` s that every
solver and the likelihood take unchanged. (A plain ``score(x, t)`` or ``eps(x, t)`` callable needs
no adapter: ``ScoreModel(fn, sde, "score")`` / ``ScoreModel(fn, sde, "eps")``.)

Two SDEs make the match exact:

- :class:`DiscreteVPSDE`: the VP process of a discrete DDPM schedule ``alphas_cumprod`` (Ho et al.
  2020, eq. 4: ``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) z``). Trained timestep ``k`` (0..N-1) is
  the time ``t_k = (k + 1) T / N``, so timestep ``N - 1`` is ``T`` and timestep 0 is ``T / N``
  (the default ``eps``). Between trained timesteps the log noise level ``log(sigma/alpha)`` is
  linear in the fractional timestep, k-diffusion's convention (``DiscreteSchedule``); below
  timestep 0, ``log abar`` falls linearly to 0 at ``t = 0`` (a constant ``beta``).
- :class:`EDMSDE`: ``x_t = x0 + t z``, i.e. ``sigma(t) = t``, ``alpha = 1`` (Karras et al. 2022,
  Table 1, "EDM"): its times *are* the noise levels of a k-diffusion sigma schedule.

diffusers and k-diffusion are optional: ``pip install "sde_diffusion[ecosystem]"`` (diffusers) and
``pip install k-diffusion --no-deps`` (only needed to run k-diffusion's own samplers side by side:
:func:`load_k_diffusion` loads one of its modules without its heavy package ``__init__``).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
import types
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .._checks import TimeLike, check_positive, expand_to, require
from ..sdes import SDE
from .wrapper import ScoreModel

__all__ = ["DiscreteVPSDE", "EDMSDE", "from_diffusers", "from_k_diffusion", "diffusers_alphas_cumprod",
           "times_of_sigmas", "load_k_diffusion", "ECOSYSTEM_PIP"]

#: the pip line that installs the optional libraries of this module
ECOSYSTEM_PIP = 'pip install "sde_diffusion[ecosystem]"'
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _missing(library: str, pip: str) -> ImportError:
    return ImportError(f"{library} is not installed: {pip}")


# ---- the discrete DDPM schedule as a continuous VP SDE ---------------------------------------------
def diffusers_alphas_cumprod(config: Any) -> torch.Tensor:
    """``alphas_cumprod`` (float64) of a diffusers scheduler config (a dict or an object with
    ``.config``), built as diffusers builds it -- betas in float32 from ``beta_schedule``
    (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``) or ``trained_betas``, cumulative product
    of ``1 - beta`` in float32 -- so that the values equal the scheduler's bit for bit. diffusers
    itself is not needed. A scheduler object's own ``alphas_cumprod`` is used when it has one."""
    table = getattr(config, "alphas_cumprod", None)
    if isinstance(table, torch.Tensor):
        return table.detach().to("cpu", torch.float64)
    cfg = _config_dict(config)
    n = int(cfg.get("num_train_timesteps", 1000))
    require(n >= 2, f"num_train_timesteps must be >= 2, got {n}")
    require(not cfg.get("rescale_betas_zero_snr", False),
            "rescale_betas_zero_snr=True gives alphas_cumprod[-1] = 0 (infinite noise level at T), "
            "which no SDE with a finite prior reaches; use the schedule without it")
    trained = cfg.get("trained_betas")
    schedule = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float32).flatten()
        require(len(betas) == n, f"trained_betas has {len(betas)} entries for "
                                 f"num_train_timesteps={n}")
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. 17 with s = 0.008, betas capped at 0.999
        abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                             dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not supported; valid: linear, scaled_linear, "
                         f"squaredcos_cap_v2, or trained_betas=[...]")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


def _config_dict(config: Any) -> dict:
    cfg = getattr(config, "config", config)
    require(isinstance(cfg, dict), f"expected a diffusers scheduler or its config (a dict), got "
                                   f"{type(config).__name__}")
    return dict(cfg)


class DiscreteVPSDE(SDE):
    r"""The VP SDE of a discrete schedule ``alphas_cumprod`` (``abar_k``, ``k = 0..N-1``).

    Time ``t`` is the fractional timestep ``k(t) = t N / T - 1``: trained timestep ``k`` sits at
    ``t_k = (k + 1) T / N``. With ``lambda = log(alpha/sigma)`` (``sigma/alpha`` is k-diffusion's
    and diffusers' ``sigma``),

    .. math:: \lambda(t) = (1 - w)\,\lambda_{\lfloor k\rfloor} + w\,\lambda_{\lceil k\rceil},
              \quad w = k - \lfloor k\rfloor,\qquad
              \lambda_k = \tfrac12\log\frac{\bar\alpha_k}{1 - \bar\alpha_k}

    for ``k >= 0`` (interpolation in log-sigma, k-diffusion's ``DiscreteSchedule.t_to_sigma``), and
    ``log abar(t) = (k + 1) log abar_0`` for ``-1 <= k < 0`` (so ``sigma(0) = 0``). Then
    ``alpha^2 = sigmoid(2 lambda)``, ``sigma^2 = sigmoid(-2 lambda)``, and ``beta(t) =
    -d log abar / dt = -2 sigma^2 d lambda/dt`` gives ``f = -beta/2``, ``g^2 = beta`` (Song et al.
    2021, eq. 11). At the trained times alpha and sigma are the schedule's exactly.

    Args:
        alphas_cumprod: the schedule, strictly decreasing inside ``(0, 1)`` (e.g.
            :func:`diffusers_alphas_cumprod`).
        T: end time. eps: smallest time (default ``T / N``: timestep 0).
    """

    def __init__(self, alphas_cumprod: Union[torch.Tensor, Sequence[float]], T: float = 1.0,
                 eps: Optional[float] = None):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().flatten()
        n = len(acp)
        require(n >= 2, f"alphas_cumprod needs at least 2 entries, got {n}")
        require(bool(((acp > 0) & (acp < 1)).all()),
                f"alphas_cumprod must lie in the open interval (0, 1), got values in "
                f"[{float(acp.min())}, {float(acp.max())}]")
        require(bool((acp[1:] < acp[:-1]).all()), "alphas_cumprod must be strictly decreasing")
        T = check_positive("T", T)
        super().__init__(N=n, T=T, eps=T / n if eps is None else eps)
        self.alphas_cumprod = acp
        self._lam = 0.5 * (acp.log() - torch.log1p(-acp))        # lambda at the trained timesteps
        self._copies: dict = {}                                     # (table, device, dtype) -> copy
        self._log_acp0 = float(acp[0].log())
        self._digest = hashlib.sha1(acp.numpy().tobytes()).hexdigest()[:12]

    # ---- timesteps <-> times -------------------------------------------------------------------
    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The fractional timestep ``t N / T - 1`` of times ``t`` (not clamped)."""
        return t * (self.N / self.T) - 1

    def time_of_timestep(self, timesteps) -> torch.Tensor:
        """Float64 times ``(k + 1) T / N`` of (integer or fractional) timesteps ``k``: a
        scheduler's ``timesteps`` as a grid for :func:`~sde_diffusion.sample`."""
        k = torch.as_tensor(timesteps).detach().to("cpu", torch.float64)
        return (k + 1) * (self.T / self.N)

    # ---- the SDE's views -------------------------------------------------------------------------
    def _table(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """``lam`` or ``acp`` on ``like``'s device and dtype, copied once per device and dtype (no
        host-to-device copy per network call)."""
        key = (name, like.device, like.dtype)
        table = self._copies.get(key)
        if table is None:
            src = self._lam if name == "lam" else self.alphas_cumprod
            table = self._copies[key] = src.to(device=like.device, dtype=like.dtype)
        return table

    def _lambda(self, t: torch.Tensor) -> torch.Tensor:
        k = self.timestep(t)
        lam = self._table("lam", t)
        lo = k.floor().clamp(0, self.N - 2)
        w = (k - lo).clamp(max=1.0)
        i = lo.long()
        inside = torch.lerp(lam[i], lam[i + 1], w)
        # below timestep 0: log abar = (k + 1) log abar_0, lambda = (L - log(1 - e^L)) / 2
        L = ((k + 1).clamp(min=0.0) * self._log_acp0).clamp(max=-1e-300)
        below = 0.5 * (L - torch.log(-torch.expm1(L)))
        return torch.where(k >= 0, inside, below)

    def _log_alpha(self, t):
        return -0.5 * torch.nn.functional.softplus(-2 * self._lambda(t))

    def _log_sigma(self, t):
        return -0.5 * torch.nn.functional.softplus(2 * self._lambda(t))

    def _f_g2(self, t):
        k = self.timestep(t)
        lam = self._table("lam", t)
        i = k.floor().clamp(0, self.N - 2).long()
        slope = (lam[i + 1] - lam[i]) * (self.N / self.T)             # d lambda / dt
        sigma2 = torch.exp(2 * self._log_sigma(t))
        beta = torch.where(k >= 0, -2 * sigma2 * slope,
                           torch.full_like(t, -self._log_acp0 * self.N / self.T))
        return -0.5 * beta, beta

    def t_of_lambda(self, lam: TimeLike) -> torch.Tensor:
        """Closed-form inverse: the segment of the piecewise-linear ``lambda`` (or, above
        ``lambda_0``, ``k + 1 = log sigmoid(2 lambda) / log abar_0``), clamped to ``[0, T]``."""
        lam = self._lambda_arg(lam)
        lam64 = lam.to(torch.float64).cpu()
        knots = self._lam
        i = (torch.searchsorted(-knots, -lam64.contiguous(), right=True) - 1).clamp(0, self.N - 2)
        w = (lam64 - knots[i]) / (knots[i + 1] - knots[i])
        k = torch.where(lam64 <= knots[0], i + w.clamp(max=1.0),
                        -torch.nn.functional.softplus(-2 * lam64) / self._log_acp0 - 1)
        t = ((k + 1) * (self.T / self.N)).clamp(0, self.T)
        return t.to(device=lam.device, dtype=lam.dtype)

    def discretize(self, x, t):
        """DDPM chain of the trained schedule: ``f_i = (sqrt(1 - beta_k) - 1) x``,
        ``G_i = sqrt(beta_k)`` with ``beta_k = 1 - abar_k / abar_{k-1}`` at the nearest timestep."""
        t = self.time(t, x)
        acp = self._table("acp", x)
        k = self.timestep(t).round().clamp(0, self.N - 1).long()
        prev = torch.where(k > 0, acp[(k - 1).clamp(min=0)], torch.ones_like(acp[k]))
        beta = 1 - acp[k] / prev
        return expand_to(torch.sqrt(1 - beta) - 1, x) * x, beta.sqrt()

    def _params(self) -> dict:
        return {"alphas_cumprod": self._digest, **super()._params()}

    def __repr__(self) -> str:
        a = self.alphas_cumprod
        return (f"DiscreteVPSDE(N={self.N}, alphas_cumprod=[{float(a[0]):.6g} .. {float(a[-1]):.6g}] "
                f"sha1:{self._digest}, T={self.T!r}, eps={self.eps!r})")


class EDMSDE(SDE):
    r"""``x_t = x0 + t z``: ``sigma(t) = t``, ``alpha(t) = 1``, ``dx = sqrt(2t) dw`` (Karras et al.
    2022, Table 1, EDM's ``sigma(t) = t``, ``s(t) = 1``; a VE SDE, Song et al. 2021 eq. 9). Time
    runs over ``[0, sigma_max]`` (``T = sigma_max``, ``eps = sigma_min``), so a k-diffusion sigma
    schedule is the time grid itself; the prior is ``N(0, sigma_max^2 I)``."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, N: int = 1000):
        sigma_min, sigma_max = check_positive("sigma_min", sigma_min), check_positive("sigma_max", sigma_max)
        require(sigma_max > sigma_min, f"sigma_max must be > sigma_min={sigma_min}, got {sigma_max!r}")
        super().__init__(N=N, T=sigma_max, eps=sigma_min)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.prior_std = sigma_max

    def _params(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "N": self.N}

    def _log_alpha(self, t):
        return torch.zeros_like(t)

    def _log_sigma(self, t):
        return torch.log(t)

    def _f_g2(self, t):
        return torch.zeros_like(t), 2 * t

    def t_of_lambda(self, lam: TimeLike) -> torch.Tensor:
        """``t = sigma = e^{-lambda}``, clamped to ``[0, T]``."""
        return torch.exp(-self._lambda_arg(lam)).clamp(0, self.T)


def times_of_sigmas(sde: SDE, sigmas) -> torch.Tensor:
    """Float64 times of noise levels ``sigma/alpha`` (k-diffusion's and diffusers' ``sigmas``)
    under ``sde``: ``t_of_lambda(-log sigma)``; exactly the sigmas for :class:`EDMSDE`. Zeros
    (a schedule's final "clean data" level) are refused: end with ``sample(..., denoise=True)``."""
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    require(bool((s > 0).all()), "sigmas must be > 0; a final sigma of 0 is the step to clean data: "
                                 "leave it out and pass denoise=True to sample()")
    if isinstance(sde, EDMSDE):
        return s.clone()
    return sde.t_of_lambda(-s.log()).to(torch.float64)


# ---- diffusers ---------------------------------------------------------------------------------------
class DiffusersNet(torch.nn.Module):
    """``unet(x, timestep, class_labels=y).sample`` as a ``net(x, timestep, y=None)`` for
    :class:`ScoreModel`. ``y`` (``model.bind(y=labels)``) or ``class_labels`` go to the UNet as
    ``class_labels``; other keyword arguments pass through. A learned-variance output (twice the
    input's channels) is cut to its first half, the prediction."""

    def __init__(self, unet: Callable):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y=None, **kwargs) -> torch.Tensor:
        if y is not None:
            kwargs["class_labels"] = y
        out = self.unet(x, timestep, **kwargs)
        out = getattr(out, "sample", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim >= 2 and x.ndim >= 2 and out.shape[1] == 2 * x.shape[1]:
            out = out[:, :x.shape[1]]
        return out


class _Timestep:
    """The network's timestep at time ``t``: the fractional timestep ``t N / T - 1`` clamped to the
    trained range ``[0, N - 1]`` (interpolated, k-diffusion's convention) or rounded to the nearest
    trained timestep (``quantize``). In float32 or lower precision an index within the time's own
    round-off of an integer (``8 N`` ulps) is that integer, so a grid on trained timesteps gives
    the network the exact integers a diffusers pipeline gives it (in float64 the difference is
    ~1e-13 and left as it is)."""

    def __init__(self, sde: DiscreteVPSDE, quantize: bool, integer: bool):
        self.sde, self.quantize, self.integer = sde, quantize, integer
        self.scale, self.top = sde.N / sde.T, float(sde.N - 1)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        k = (t * self.scale).sub_(1.0).clamp_(0.0, self.top)
        if self.quantize:
            k = k.round_()
        elif k.dtype != torch.float64:
            r = k.round()
            k = torch.where((k - r).abs_() <= 8 * self.sde.N * torch.finfo(k.dtype).eps, r, k)
        return k.long() if self.integer else k


def from_diffusers(unet: Callable, scheduler_or_config: Any, *, prediction_type: Optional[str] = None,
                   quantize: bool = False, T: float = 1.0, eps: Optional[float] = None,
                   check_finite: bool = True) -> ScoreModel:
    """A diffusers ``UNet2DModel`` (or any module called as ``unet(x, timestep,
    class_labels=...)`` returning ``.sample`` or a tensor) with its scheduler (or the scheduler's
    config dict) as a :class:`ScoreModel` under the matching :class:`DiscreteVPSDE`.

    - The schedule: the scheduler's ``alphas_cumprod`` (or one built from ``beta_schedule``,
      ``beta_start``, ``beta_end``, ``num_train_timesteps``, ``trained_betas`` as diffusers does).
    - ``prediction_type`` (default: the config's): ``epsilon`` -> ``eps``, ``v_prediction`` ->
      ``v`` (Salimans & Ho 2022), ``sample`` -> ``x0``.
    - Time: trained timestep ``k`` is ``t = (k + 1) T / N``; the network receives the fractional
      timestep as a float tensor (interpolation in log-sigma between trained timesteps), or the
      nearest trained one with ``quantize=True`` (the solver still uses alpha and sigma of the
      exact time: diffusers' Karras-sigma schedulers do the same). A UNet with a learned
      (``nn.Embedding``) time embedding needs ``quantize=True``.
    - Class labels: ``model.bind(y=labels)`` (or ``class_labels=``).

    Sampling settings of the scheduler (``clip_sample``, ``thresholding``, ``timestep_spacing``)
    are not part of the model; see docs/models.md for how to reproduce a scheduler's run."""
    require(callable(unet), f"unet must be callable, got {type(unet).__name__}")
    cfg = _config_dict(scheduler_or_config)
    ptype = prediction_type if prediction_type is not None else cfg.get("prediction_type", "epsilon")
    require(ptype in _PREDICTIONS, f"prediction_type must be one of {', '.join(_PREDICTIONS)}, "
                                   f"got {ptype!r}")
    unet_cfg = getattr(unet, "config", None)
    embedding = unet_cfg.get("time_embedding_type") if isinstance(unet_cfg, dict) else None
    require(embedding != "fourier",
            "a UNet2DModel with time_embedding_type='fourier' is a score_sde VE model that takes "
            "sigma: wrap it with ScoreModel(net, VESDE(...), 'score', time_input='sigma') instead")
    learned = embedding == "learned"
    require(not learned or quantize, "this UNet has a learned (nn.Embedding) time embedding, which "
                                     "takes integer timesteps only: pass quantize=True")
    sde = DiscreteVPSDE(diffusers_alphas_cumprod(scheduler_or_config), T=T, eps=eps)
    return ScoreModel(DiffusersNet(unet), sde, _PREDICTIONS[ptype], time_input=_Timestep(sde, bool(quantize), learned),
                      check_finite=check_finite)


# ---- EDM / k-diffusion ---------------------------------------------------------------------------------
class EDMDenoiserNet(torch.nn.Module):
    r"""A denoiser ``D(x_e; sigma_e)`` in EDM's variables (``x_e = x0 + sigma_e z``) as a network
    ``net(x, t)`` predicting ``x0`` under any affine SDE: ``x0 = D(x / alpha(t); sigma(t)/alpha(t))``
    (Karras et al. 2022, eq. 4 with ``s(t) = alpha(t)``). With ``sigma_data``, ``inner`` is the raw
    network ``F`` and EDM's preconditioning makes the denoiser (Karras et al. 2022, eq. 7 and
    Table 1; k-diffusion's ``layers.Denoiser``):

    .. math:: D(x; \sigma) = c_{skip} x + c_{out} F(c_{in} x, c_{noise}(\sigma)),\quad
              c_{skip} = \frac{\sigma_d^2}{\sigma^2 + \sigma_d^2},\ c_{out} = \frac{\sigma\sigma_d}
              {\sqrt{\sigma^2 + \sigma_d^2}},\ c_{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}},

    ``c_noise = sigma`` (k-diffusion's) unless given (EDM's is ``log(sigma) / 4``)."""

    def __init__(self, inner: Callable, sde: SDE, sigma_data: Optional[float] = None,
                 c_noise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        super().__init__()
        self.inner, self.sde = inner, sde
        self.sigma_data = None if sigma_data is None else check_positive("sigma_data", sigma_data)
        self.c_noise = c_noise
        self._unit_alpha = isinstance(sde, EDMSDE) or bool(
            (sde.log_alpha(torch.tensor([sde.eps, 0.5 * (sde.eps + sde.T), sde.T],
                                        dtype=torch.float64)) == 0).all())

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if isinstance(self.sde, EDMSDE):
            sigma = t                                          # sigma(t) = t exactly
            x_e = x
        else:
            _, log_a, log_s = self.sde.log_scales(t, x, sync=False)
            sigma = (log_s - log_a).exp()
            x_e = x if self._unit_alpha else x / expand_to(log_a.exp(), x)
        if self.sigma_data is None:
            return self.inner(x_e, sigma, **kwargs)
        s2 = sigma * sigma + self.sigma_data ** 2
        c_skip, c_out, c_in = self.sigma_data ** 2 / s2, sigma * self.sigma_data / s2.sqrt(), s2.rsqrt()
        noise = sigma if self.c_noise is None else self.c_noise(sigma)
        out = self.inner(x_e * expand_to(c_in, x), noise, **kwargs)
        return expand_to(c_skip, x) * x_e + expand_to(c_out, x) * out


def from_k_diffusion(denoiser: Callable, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                     sde: Optional[SDE] = None, sigma_data: Optional[float] = None,
                     c_noise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     check_finite: bool = True) -> ScoreModel:
    """An EDM / k-diffusion denoiser ``D(x, sigma, **kwargs)`` (``x = x0 + sigma z``, returns the
    ``E[x0 | x]``; any k-diffusion model wrapper, e.g. ``DiscreteEpsDDPMDenoiser``) as a
    :class:`ScoreModel` predicting ``x0``.

    - Default SDE: :class:`EDMSDE` ``(sigma_min, sigma_max)`` -- time is sigma, so a k-diffusion
      sigma schedule (without its final 0) is the grid itself. (``sigma_min`` and ``sigma_max``
      shape only that default; with ``sde=`` the SDE's own range applies.)
    - ``sde=``: any affine SDE (``VPSDE()``, ``VESDE()``, ...): the denoiser is called at
      ``(x / alpha(t), sigma(t) / alpha(t))``, k-diffusion's view of a VP model.
    - ``sigma_data``: ``denoiser`` is the raw network ``F(c_in x, c_noise)`` and EDM's
      preconditioning is applied (see :class:`EDMDenoiserNet`); ``c_noise`` maps sigma to its noise
      input (default sigma itself, as k-diffusion; EDM: ``lambda s: s.log() / 4``).

    Keyword arguments bound with ``model.bind(...)`` reach the denoiser (k-diffusion's
    ``extra_args``)."""
    require(callable(denoiser), f"denoiser must be callable, got {type(denoiser).__name__}")
    require(c_noise is None or sigma_data is not None,
            "c_noise is part of EDM's preconditioning: give sigma_data too")
    if sde is None:
        sde = EDMSDE(sigma_min, sigma_max)
    require(isinstance(sde, SDE), f"sde must be an SDE instance, got {sde!r}")
    return ScoreModel(EDMDenoiserNet(denoiser, sde, sigma_data, c_noise), sde, "x0",
                      check_finite=check_finite)


# ---- loading k-diffusion -------------------------------------------------------------------------------
def load_k_diffusion(module: str = "sampling") -> types.ModuleType:
    """k-diffusion's ``sampling`` or ``external`` module. Its package ``__init__`` imports
    torchvision, clip, wandb, ...: where that fails, the module is loaded from the installed
    package's folder with a stub package holding the one helper those modules use from ``utils``
    (``append_dims``) and, when torchsde is missing, an empty ``torchsde`` (only its Brownian-tree
    noise needs it: pass ``noise_sampler``). A missing k-diffusion is one ``ImportError`` line
    naming the pip command."""
    require(module in ("sampling", "external"), f"module must be 'sampling' or 'external', got {module!r}")
    try:
        return importlib.import_module(f"k_diffusion.{module}")
    except ImportError as err:
        if getattr(err, "name", None) == "k_diffusion":
            raise _missing("k-diffusion", "pip install k-diffusion --no-deps") from None
    except Exception:  # noqa: BLE001 - its __init__ failed for another reason: load the one file
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("k-diffusion", "pip install k-diffusion --no-deps")
    folder = list(spec.submodule_search_locations)[0]
    pkg_name = "_sde_diffusion_kdiff"
    pkg = sys.modules.get(pkg_name)
    if pkg is None:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = []
        utils = types.ModuleType(pkg_name + ".utils")
        utils.append_dims = _append_dims
        pkg.utils = utils
        sys.modules[pkg_name] = pkg
        sys.modules[pkg_name + ".utils"] = utils
        if importlib.util.find_spec("torchsde") is None:
            sys.modules.setdefault("torchsde", types.ModuleType("torchsde"))
    order = ["sampling"] if module == "sampling" else ["sampling", "external"]
    for name in order:
        full = f"{pkg_name}.{name}"
        if full in sys.modules:
            continue
        mod_spec = importlib.util.spec_from_file_location(full, f"{folder}/{name}.py")
        mod = importlib.util.module_from_spec(mod_spec)
        mod.__package__ = pkg_name
        sys.modules[full] = mod
        mod_spec.loader.exec_module(mod)
        setattr(pkg, name, mod)
    return sys.modules[f"{pkg_name}.{module}"]


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """``x`` with trailing singleton dimensions up to ``target_dims`` (k-diffusion's helper)."""
    extra = target_dims - x.ndim
    require(extra >= 0, f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * extra]
