r"""DPM-Solver with adaptive step size (Lu et al. 2022, "DPM-Solver", Sec. 3.4 and App. C, Alg. 5:
DPM-Solver-12 and DPM-Solver-23; k-diffusion's ``sample_dpm_adaptive``), with per-sample error
control, for every affine SDE.

In the half log-SNR ``lambda`` a step of size ``h`` from ``s`` computes a lower- and a
higher-order DPM-Solver step that share their network calls (DPM-Solver eqs. 3.7-3.9, noise
prediction):

- ``order=2``: ``x_low`` = DPM-Solver-1 (DDIM), ``x_high`` = DPM-Solver-2 (``r1 = 1/2``): 2 NFE;
- ``order=3`` (default): ``x_low`` = DPM-Solver-2 with ``r1 = 1/3``, ``x_high`` = DPM-Solver-3
  (``r1 = 1/3``, ``r2 = 2/3``): 3 NFE.

The error of the step is the RMS over the sample's entries of ``(x_low - x_high)/delta``,
``delta = max(atol, rtol max(|x_low|, |x_prev|))`` (``x_prev`` the previous accepted ``x_low``;
DPM-Solver App. C); the step is accepted when it is at most 1 (the solver continues from
``x_high``), and the next step size is ``theta h E^{-1/order}`` with ``theta = 0.9``, at most
``10 h``, and clipped to the end of the interval. The defaults ``rtol = 0.05``, ``atol = 0.0078``
and ``h_init = 0.05`` are the paper's (for data in ``[-1, 1]``; lower them for accuracy).

``per_sample=True`` (default): every sample has its own log-SNR, step size and accept/reject
decision; each stage is one network call on the samples still running, at their own times (so a
sample's result does not depend on its batch companions). The NFE that :func:`sample` reports is
the number of network calls (that of the slowest sample); ``stats=`` (a dict) receives each
sample's own count, the accepted and rejected steps. A model with per-sample bound arguments
(``model.bind(y=labels)``) cannot be evaluated on a subset of the batch: use ``per_sample=False``
there, which, like k-diffusion, takes one step size for the whole batch and the RMS over all of it.
The solver stops at every grid time (its default grid is the single interval ``[t_end, t_start]``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._checks import require
from .base import SolverContext
from .registry import register

__all__ = ["dpm_adaptive"]

_THETA, _GROW = 0.9, 10.0


def _check_positive(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    require(ok, f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(n,)`` float64 tensor as ``(n, 1, ..., 1)`` in ``like``'s dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


@register("dpm_adaptive", grid="logsnr", deterministic=True, two_way=True, order=3, nfe=None,
          summary="DPM-Solver-12/23 with adaptive step size in log-SNR, rtol/atol, per-sample "
                  "error control (Lu et al. 2022; k-diffusion's dpm_adaptive)")
def dpm_adaptive(ctx: SolverContext, x, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
                 h_init: float = 0.05, per_sample: bool = True, controller: str = "paper",
                 max_steps: int = 10_000, stats: Optional[dict] = None):
    """Adaptive DPM-Solver (see the module docstring). ``order`` 2 or 3; ``rtol``, ``atol``: the
    error tolerance; ``h_init``: the first step in log-SNR; ``max_steps``: attempted steps per
    grid interval before giving up (an error); ``controller``: ``"paper"`` (the rule in the module
    docstring) or ``"k-diffusion"`` (its PID controller with its defaults: factor ``1 +
    atan(E^{-1/order} - 1)``, accepted when the factor is at least 0.81); ``stats``: a dict that
    receives ``nfe`` (a list, each sample's network evaluations), ``accepted`` and ``rejected``
    (lists of step counts)."""
    require(order in (2, 3) and not isinstance(order, bool), f"order must be 2 or 3, got {order!r}")
    rtol, atol = _check_positive("rtol", rtol, True), _check_positive("atol", atol, True)
    require(rtol > 0 or atol > 0, "rtol and atol cannot both be 0")
    h_init = _check_positive("h_init", h_init)
    require(isinstance(per_sample, bool), f"per_sample must be True or False, got {per_sample!r}")
    require(controller in ("paper", "k-diffusion"),
            f"controller must be 'paper' or 'k-diffusion', got {controller!r}")
    require(isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps >= 1,
            f"max_steps must be an integer >= 1, got {max_steps!r}")
    require(stats is None or isinstance(stats, dict), f"stats must be a dict or None, got {stats!r}")
    model, sde = ctx.model, ctx.sde
    B = x.shape[0]
    n_fe = torch.zeros(B, dtype=torch.long)
    n_acc = torch.zeros(B, dtype=torch.long)
    n_rej = torch.zeros(B, dtype=torch.long)
    lam_grid = ctx.lambdas.tolist()
    r1 = 1.0 / 3.0 if order == 3 else 0.5

    def scales(lam: torch.Tensor, t_lo: float, t_hi: float):
        """Time, alpha, sigma and the actual lambda at each log-SNR (times clamped to the interval)."""
        t = sde.t_of_lambda(lam).clamp(t_lo, t_hi)
        la, ls = sde.log_alpha(t), sde.log_sigma(t)
        return t, la.exp(), ls.exp(), la - ls

    for i in range(ctx.steps):
        t_hi, t_lo = float(ctx.times[i]), float(ctx.times[i + 1])
        lam_end = lam_grid[i + 1]
        s = torch.full((B,), lam_grid[i], dtype=torch.float64)
        h = torch.full((B,), h_init, dtype=torch.float64)
        t_s = torch.full((B,), t_hi, dtype=torch.float64)
        done = torch.zeros(B, dtype=torch.bool)
        x = x.clone()
        x_prev = x.clone()
        for _ in range(max_steps):
            if bool(done.all()):
                break
            act = (~done).nonzero().squeeze(1)             # host indices; on x's device below
            act_d = act.to(x.device)
            xa, sa, ha = x[act_d], s[act], h[act]
            last = sa + ha >= lam_end
            lam_t = torch.where(last, torch.full_like(sa, lam_end), sa + ha)
            _, a0, s0, l0 = scales(sa, t_lo, t_hi)
            _, at, st, lt = scales(lam_t, t_lo, t_hi)
            at = torch.where(last, torch.full_like(at, float(ctx.alphas[i + 1])), at)
            st = torch.where(last, torch.full_like(st, float(ctx.sigmas[i + 1])), st)
            lt = torch.where(last, torch.full_like(lt, lam_end), lt)
            hh = lt - l0
            t_a = t_s[act].clone()
            eps0 = model.eps(xa, t_a.to(dtype=x.dtype, device=x.device))
            t1, a1, s1, l1 = scales(l0 + r1 * hh, t_lo, t_hi)
            q1 = (l1 - l0) / hh
            u1 = _col(a1 / a0, xa) * xa - _col(s1 * torch.expm1(l1 - l0), xa) * eps0
            eps1 = model.eps(u1, t1.to(dtype=x.dtype, device=x.device))
            base = _col(at / a0, xa) * xa - _col(st * torch.expm1(hh), xa) * eps0
            d1 = eps1 - eps0
            # DPM-Solver-2 with ratio q1 (eq. 3.8 / Alg. 1)
            x2 = base - _col(st * torch.expm1(hh) / (2 * q1), xa) * d1
            if order == 2:
                x_low, x_high = base, x2
            else:
                t2, a2, s2, l2 = scales(l0 + (2.0 / 3.0) * hh, t_lo, t_hi)
                q2, h2 = (l2 - l0) / hh, l2 - l0
                u2 = (_col(a2 / a0, xa) * xa - _col(s2 * torch.expm1(h2), xa) * eps0
                      - _col(s2 * q2 / q1 * (torch.expm1(h2) / h2 - 1), xa) * d1)
                d2 = model.eps(u2, t2.to(dtype=x.dtype, device=x.device)) - eps0
                x_low = x2
                x_high = base - _col(st / q2 * (torch.expm1(hh) / hh - 1), xa) * d2
            n_fe[act] += order
            delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev[act_d].abs()), min=atol)
            # the accept decisions are made on the host (one read per step)
            err2 = ((x_low - x_high) / delta).pow(2).reshape(len(act), -1).mean(1)
            err2 = err2.to("cpu", torch.float64)
            if not per_sample:
                err2 = err2.mean().expand(len(act))
            err = err2.sqrt()
            if controller == "paper":
                accept = err <= 1.0
                factor = torch.where(err > 0, _THETA * err.clamp(min=1e-300) ** (-1.0 / order),
                                     torch.full_like(err, _GROW)).clamp(max=_GROW)
            else:
                # k-diffusion's PIDStepSizeController with its defaults (pure I, safety 0.81)
                factor = 1.0 + torch.atan((1.0 / (err + 1e-8)) ** (1.0 / order) - 1.0)
                accept = factor >= 0.81
            h[act] = ha * factor
            acc = act[accept]
            keep_d, acc_d = accept.nonzero().squeeze(1).to(x.device), acc.to(x.device)
            x[acc_d] = x_high[keep_d]
            x_prev[acc_d] = x_low[keep_d]
            s[acc] = lt[accept]
            t_s[acc] = torch.where(last[accept], torch.full_like(lt[accept], t_lo),
                                   sde.t_of_lambda(lt[accept]).clamp(t_lo, t_hi))
            done[acc] = last[accept]
            n_acc[acc] += 1
            n_rej[act[~accept]] += 1
        else:
            if not bool(done.all()):
                raise RuntimeError(f"dpm_adaptive: max_steps={max_steps} attempted steps did not "
                                   f"reach t={t_lo:.6g} from t={t_hi:.6g} for "
                                   f"{int((~done).sum())} samples (raise max_steps or the tolerances)")
        if stats is not None:
            stats.update(nfe=n_fe.tolist(), accepted=n_acc.tolist(), rejected=n_rej.tolist())
        x = yield x
