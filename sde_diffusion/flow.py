r"""The probability-flow ODE and its adaptive integrators: one implementation that the ODE samplers
(:mod:`sde_diffusion.samplers.ode`), the reference flow map (:mod:`sde_diffusion.samplers.reference`)
and the likelihood (:mod:`sde_diffusion.likelihood`) share.

**The field.** For an affine SDE ``dx = f(t) x dt + g(t) dw`` the probability-flow ODE
([SDE] Song et al. 2021, eq. 13) is

.. math:: \frac{dx}{dt} = F(x, t) = f(t)\,x - \tfrac12 g(t)^2\, s(x, t),
          \qquad \nabla\cdot F = f(t)\,D - \tfrac12 g(t)^2\,\nabla\cdot s(x, t)

(the divergence drives the log-density along a trajectory, [SDE] eqs. 39-40). :func:`pf_drift`
evaluates ``F`` (one network evaluation); :class:`FlowField` evaluates ``F`` together with its
divergence (exact or Hutchinson, :mod:`sde_diffusion.divergence`) as the right-hand side of the
augmented system ``(x, delta)`` with ``d delta/dt = div F``.

In the half log-SNR ``lambda = log(alpha/sigma)`` and the scaled state ``y = x/alpha`` the same ODE
reads (DPM-Solver, Lu et al. 2022, eq. 3.4; DPM-Solver++ eq. 4, with ``f = d log alpha/dt`` and
``g^2 = -2 sigma^2 d lambda/dt``)

.. math:: \frac{dy}{d\lambda} = \hat x_0(\alpha y, t(\lambda)) - y ,

whose Jacobian has eigenvalues in ``[-1, 0]`` for a Gaussian-mixture oracle at every noise level
(not stiff). :class:`LogSNRFlowField` is that right-hand side; the reference flow map integrates it.

**The integrators.** :func:`integrate` carries a field from ``t0`` to ``t1`` (either direction)

- with torchdiffeq ``odeint`` (any of its methods; ``dopri5`` by default). Its adaptive
  Runge–Kutta methods would step past ``t1`` and interpolate back, evaluating the model outside the
  interval; ``step_t=[t1]`` makes the last step land on ``t1``;
- with scipy ``solve_ivp`` (``RK45`` by default), the state moved to float64 NumPy on the host and
  back on every evaluation. Only the state is integrated (no unused ``delta`` components when the
  field computes no divergence: they would dilute scipy's RMS error norm);
- with ``per_sample=True`` and torchdiffeq/``dopri5``: a Dormand–Prince 5(4) with one step-size
  controller per sample, vectorised over the batch (:func:`solve_dopri5_per_sample`); other
  methods solve the samples one after the other.

**Time checks.** The integrators keep the time inside ``[t0, t1]``, which the public entry points
check to lie in ``[0, T]`` once (torchdiffeq's first-step probe is clamped into the interval). So
the fields look at ``t`` with ``sync=False``: a time already on an accelerator is not checked again
on every evaluation, which would synchronise the device each call; a number or a CPU tensor is
always checked (on the host, for free).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

from ._checks import expand_to, require
from .divergence import exact_divergence, hutchinson_divergence
from .models.wrapper import OracleModel, ScoreModel, as_model, linear_in_view, native_view
from .sdes import SDE

__all__ = [
    "pf_drift", "FlowField", "LogSNRFlowField", "integrate", "integrate_flow",
    "solve_dopri5_per_sample", "SOLVERS", "SCIPY_METHODS",
]

SOLVERS = ("torchdiffeq", "scipy")
SCIPY_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
_TDE_ADAPTIVE_RK = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


# ---- the field ----------------------------------------------------------------------------------
def _velocity(f: torch.Tensor, g2: torch.Tensor, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """``F = f(t) x - g(t)^2 s / 2`` ([SDE] eq. 13) from the coefficients and the score."""
    return expand_to(f, x) * x - expand_to(0.5 * g2, x) * score


def pf_drift(model: ScoreModel, x: torch.Tensor, t: torch.Tensor,
             scales: Optional[Tuple[float, float, float, float]] = None) -> torch.Tensor:
    """The probability-flow drift ``F(x, t) = f(t) x - g(t)^2 s(x, t) / 2`` ([SDE] eq. 13) of
    ``model`` under its SDE, for ``x`` of shape ``(batch, *event)`` and ``t`` a ``(batch,)`` tensor
    (one network evaluation). ``t`` is not checked again on an accelerator (see the module
    docstring: the callers keep it inside ``[0, T]``).

    ``scales = (alpha, sigma, f, g^2)`` at ``t`` as numbers (a sampler's grid or stage, computed
    once per run): then ``t`` is not checked and nothing is recomputed per call; the model is
    asked for its own output's view ``m`` (:func:`~sde_diffusion.models.wrapper.native_view`)
    and ``F = c_x x + c_m m`` is one multiply and one add (float64 results move at round-off)."""
    if scales is None:
        f, g2 = model.sde.f_g2(t, sync=False)
        return _velocity(f, g2, x, model.score(x, t))
    a, s, f, g2 = scales
    view = native_view(model)
    p, q = linear_in_view("score", view, a, s)
    m = model.at_scales(view, x, t, a, s)
    return torch.mul(x, f - 0.5 * g2 * p).add_(m, alpha=-0.5 * g2 * q)


class FlowField:
    """Right-hand side ``(F(x, t), div F(x, t))`` of the probability-flow ODE and its divergence.

    Args:
        model: the score model (its ``sde`` is the forward process).
        divergence: ``None`` (the drift only; the divergence returned is zero), ``"exact"`` or
            ``"hutchinson"``.
        probes: Hutchinson probes, ``(n_probes, *x.shape)`` for the full batch.
        chunk_size: basis vectors per batched backward pass of the exact divergence.

    Calling it with ``t`` (a number, 0-d or ``(n,)`` tensor), ``x`` of shape ``(n, *event)`` and
    ``idx`` (which samples of the full batch ``x`` holds: selects their probes) returns detached
    ``(drift, div)`` with ``div`` of shape ``(n,)``. ``n_evals`` counts the calls.
    """

    def __init__(self, model: ScoreModel, divergence: Optional[str] = None,
                 probes: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None):
        require(divergence in (None, "exact", "hutchinson"),
                f"divergence must be None, 'exact' or 'hutchinson', got {divergence!r}")
        require(divergence != "hutchinson" or isinstance(probes, torch.Tensor),
                "divergence='hutchinson' needs probes")
        self.model, self.sde = model, model.sde
        self.divergence, self.probes, self.chunk_size = divergence, probes, chunk_size
        self.n_evals = 0
        self._checked = False

    @property
    def has_divergence(self) -> bool:
        return self.divergence is not None

    def __call__(self, t, x: torch.Tensor, idx: Optional[torch.Tensor] = None):
        tb = self.sde.time(t if isinstance(t, torch.Tensor) else float(t), x, sync=False)  # (n,)
        f, g2 = self.sde.f_g2(tb, sync=False)
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
        drift = _velocity(f, g2, x, s).detach()
        if div_s is None:
            return drift, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return drift, (f * D - 0.5 * g2 * div_s).detach()


class LogSNRFlowField:
    r"""Right-hand side ``dy/dlambda = x0_hat(alpha y, t(lambda)) - y`` of the probability-flow ODE
    in the half log-SNR ``lambda`` and ``y = x / alpha`` (module docstring), with zero divergence
    (``has_divergence`` is False). ``t(lambda)`` is clamped to ``[t_lo, t_hi]`` (the interval being
    integrated: the inverse of ``lambda`` may round just outside it); the model is evaluated in
    ``dtype`` and the result returned in ``y``'s dtype."""

    has_divergence = False

    def __init__(self, model: ScoreModel, t_lo: float, t_hi: float,
                 dtype: Optional[torch.dtype] = None):
        self.model, self.sde = model, model.sde
        self.t_lo, self.t_hi, self.dtype = float(t_lo), float(t_hi), dtype
        self.n_evals = 0

    def __call__(self, lam, y: torch.Tensor, idx: Optional[torch.Tensor] = None):
        dtype = y.dtype if self.dtype is None else self.dtype
        lam = torch.as_tensor(lam, dtype=torch.float64)
        t = self.sde.t_of_lambda(lam).clamp(self.t_lo, self.t_hi)
        a = self.sde.log_alpha(t).exp()
        y_m = y.to(dtype)
        t_m = t.to(device=y.device, dtype=dtype)
        x0 = self.model.x0(expand_to(a.to(device=y.device, dtype=dtype), y_m) * y_m,
                           t_m.expand(y.shape[0]) if t_m.ndim == 0 else t_m)
        self.n_evals += 1
        return (x0 - y_m).to(y.dtype), torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)


# ---- validation (shared by the entry points) ----------------------------------------------------
def check_state(x, model: ScoreModel) -> None:
    """``x`` is a finite float32/float64 ``(batch, *event)`` tensor (of the oracle's event shape)."""
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


def check_tol(name: str, value) -> float:
    """``value`` as a float, required finite and > 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}") from None
    require(math.isfinite(value) and value > 0, f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_solver(solver: str, method: Optional[str]) -> str:
    """The method to use for ``solver`` (its default for ``None``), required to be one it has."""
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


def check_integration(solver: str, method: Optional[str], rtol, atol, per_sample: bool = False,
                      max_steps: int = 100_000) -> Tuple[str, float, float]:
    """Check the integrator options of :func:`integrate`; returns ``(method, rtol, atol)``."""
    rtol, atol = check_tol("rtol", rtol), check_tol("atol", atol)
    method = check_solver(solver, method)
    require(isinstance(per_sample, bool), f"per_sample must be True or False, got {per_sample!r}")
    require(isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps >= 1,
            f"max_steps must be an integer >= 1, got {max_steps!r}")
    return method, rtol, atol


def check_interval(sde: SDE, t_start, t_end) -> Tuple[float, float]:
    """``(t_start, t_end)`` as floats, both in ``[0, T]`` and different."""
    t0, t1 = float(t_start), float(t_end)
    for name, v in (("t_start", t0), ("t_end", t1)):
        require(math.isfinite(v) and 0 <= v <= sde.T, f"{name} must lie in [0, T={sde.T}], got {v!r}")
    require(t0 != t1, f"t_start and t_end must differ, got {t0!r} for both")
    return t0, t1


# ---- integrators --------------------------------------------------------------------------------
def _solve_torchdiffeq(field, x: torch.Tensor, t0: float, t1: float, rtol: float, atol: float,
                       method: str, options: Optional[dict], idx=None):
    from torchdiffeq import odeint

    lo, hi = min(t0, t1), max(t0, t1)

    def rhs(t, state):
        # torchdiffeq's initial-step heuristic probes t0 + h0 with an unclipped h0, which can lie
        # outside the interval (and outside [0, T]); the steps themselves land on t1 (step_t).
        # Clamped on the device: no host round-trip per evaluation
        return field(t.clamp(lo, hi), state[0], idx)

    ts = torch.tensor([t0, t1], dtype=torch.float64, device=x.device)
    l0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    options = dict(options or {})
    if method in _TDE_ADAPTIVE_RK and "step_t" not in options:
        # make the last step land on t1: torchdiffeq otherwise steps past t1 and interpolates
        # back, evaluating the model outside [eps, T]
        options["step_t"] = torch.tensor([t1], dtype=torch.float64)
    before = field.n_evals
    with torch.no_grad():
        xs, ls = odeint(rhs, (x, l0), ts, rtol=rtol, atol=atol, method=method, options=options)
    return xs[-1], ls[-1], field.n_evals - before


def _solve_scipy(field, x: torch.Tensor, t0: float, t1: float, rtol: float, atol: float,
                 method: str, options: Optional[dict], idx=None):
    from scipy.integrate import solve_ivp

    shape, B, n = tuple(x.shape), x.shape[0], x.numel()
    carry = field.has_divergence          # integrate delta only when the field computes it

    def rhs(t, y):
        xt = torch.from_numpy(y[:n]).reshape(shape).to(device=x.device, dtype=x.dtype)
        drift, div = field(float(t), xt, idx)
        d = drift.reshape(-1).cpu().double().numpy()
        return np.concatenate([d, div.cpu().double().numpy()]) if carry else d

    y0 = x.detach().reshape(-1).cpu().double().numpy()
    if carry:
        y0 = np.concatenate([y0, np.zeros(B)])
    before = field.n_evals
    with torch.no_grad():
        sol = solve_ivp(rhs, (t0, t1), y0, method=method, rtol=rtol, atol=atol, **(options or {}))
    if not sol.success:
        raise RuntimeError(f"scipy.integrate.solve_ivp ({method}) failed: {sol.message}")
    end = torch.from_numpy(sol.y[:, -1].copy()).to(device=x.device, dtype=x.dtype)
    delta = end[n:] if carry else torch.zeros(B, dtype=x.dtype, device=x.device)
    return end[:n].reshape(shape), delta, field.n_evals - before


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
    """torchdiffeq's mixed norm for one sample's state ``(x, delta)``: max of the RMS norms."""
    return torch.maximum(ex.pow(2).mean(1).sqrt(), el.abs())


def solve_dopri5_per_sample(field, x: torch.Tensor, t0: float, t1: float, rtol: float,
                            atol: float, max_steps: int = 100_000, safety: float = 0.9,
                            ifactor: float = 10.0, dfactor: float = 0.2):
    """Dormand–Prince 5(4) with one step-size controller per sample, vectorized over the batch.

    Every sample has its own time, step size and accept/reject decision (the controller of
    torchdiffeq's ``dopri5``: error ``max(RMS_x, |err_delta|)`` against
    ``atol + rtol max(|y0|, |y1|)``, Hairer's initial step, factor
    ``clip(0.9 err^-1/5, 0.2 (1 on accept), 10)``); each iteration evaluates the field once per
    stage on the samples still running, at their own times (a ``(n,)`` float64 tensor, every entry
    inside ``[t0, t1]``). The last step is clipped to land on ``t1``. A sample's result therefore
    does not depend on the batch. Returns ``(x_end, delta, n_fevals (batch,))``.
    """
    B, shape = x.shape[0], tuple(x.shape)
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    dev, dt64 = x.device, torch.float64

    def F(tv: torch.Tensor, xv: torch.Tensor, idx: torch.Tensor):
        dx, dl = field(tv, xv.reshape((xv.shape[0],) + shape[1:]), idx)
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
        x1 = xs + (direction * h0).to(x.dtype)[:, None] * fx     # the field does not depend on delta
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


def integrate(field, x: torch.Tensor, t0: float, t1: float, *, solver: str = "torchdiffeq",
              method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
              per_sample: bool = False, options: Optional[dict] = None,
              max_steps: int = 100_000) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integrate ``(x, delta)`` with ``dx/dt, d delta/dt = field(t, x, idx)`` from ``t0`` to ``t1``
    (options as checked by :func:`check_integration`). ``field`` is a :class:`FlowField`, a
    :class:`LogSNRFlowField` or anything with their interface (``n_evals``, ``has_divergence``).

    Returns ``(x_end, delta, n_fevals)``: ``delta`` is ``(batch,)`` (zero without a divergence) and
    ``n_fevals`` the field evaluations per sample, ``(batch,)`` int64 (with a shared batch ODE every
    entry is the solver's count)."""
    B = x.shape[0]
    if per_sample and solver == "torchdiffeq" and method == "dopri5":
        return solve_dopri5_per_sample(field, x, t0, t1, rtol, atol, max_steps)
    run = _solve_torchdiffeq if solver == "torchdiffeq" else _solve_scipy
    if not per_sample:
        xe, le, n = run(field, x, t0, t1, rtol, atol, method, options)
        return xe, le, torch.full((B,), n, dtype=torch.long, device=x.device)
    # any other per-sample solve: one ODE per sample, one after the other (B times the calls)
    outs, counts = [], []
    for i in range(B):
        idx = torch.tensor([i], device=x.device)
        xe, le, n = run(field, x[i:i + 1], t0, t1, rtol, atol, method, options, idx)
        outs.append((xe, le))
        counts.append(n)
    return (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]),
            torch.tensor(counts, dtype=torch.long, device=x.device))


def integrate_flow(model, sde: Optional[SDE], x: torch.Tensor, t_start: float, t_end: float, *,
                   solver: str = "torchdiffeq", method: Optional[str] = None, rtol: float = 1e-5,
                   atol: float = 1e-5, per_sample: bool = False, options: Optional[dict] = None,
                   max_steps: int = 100_000) -> Tuple[torch.Tensor, int]:
    """Carry ``x`` along the probability-flow ODE from ``t_start`` to ``t_end`` (either direction):
    ``integrate_flow(m, sde, x, eps, T)`` encodes, ``integrate_flow(m, sde, z, T, eps)`` decodes.
    Returns ``(x_end, nfe)``. ``solver`` is ``"torchdiffeq"`` (default ``method="dopri5"``) or
    ``"scipy"`` (default ``"RK45"``); ``per_sample=True`` gives every sample its own error control
    (see :func:`integrate`); ``options`` go to ``odeint``/``solve_ivp``."""
    model = as_model(model, sde)
    check_state(x, model)
    method, rtol, atol = check_integration(solver, method, rtol, atol, per_sample, max_steps)
    t0, t1 = check_interval(model.sde, t_start, t_end)
    field = FlowField(model)
    nfe0 = model.nfe
    x_end, _, _ = integrate(field, x.detach(), t0, t1, solver=solver, method=method, rtol=rtol,
                            atol=atol, per_sample=per_sample, options=options, max_steps=max_steps)
    return x_end, model.nfe - nfe0
