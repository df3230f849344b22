"""The shared probability-flow module (sde_diffusion.flow): the drift against closed forms and the
oracle, its two formulations (t and log-SNR) against each other, encode/decode, where the
integrators evaluate the field, and that the field does not re-check device times per call."""
import math

import pytest
import torch

from sde_diffusion import GaussianMixture, SubVPSDE, VESDE, VPSDE, random_mixture
from sde_diffusion import sdes as sdes_module
from sde_diffusion.flow import (
    FlowField, LogSNRFlowField, integrate, integrate_flow, pf_drift, solve_dopri5_per_sample,
)
from sde_diffusion.models import OracleModel, ScoreModel
from sde_diffusion.samplers.reference import exact_flow_map

F64 = torch.float64
SDES = [VPSDE(), SubVPSDE(), VESDE()]
IDS = ["vp", "subvp", "ve"]


def _gaussian(sde, D=3, s=0.3):
    mu = torch.linspace(-0.5, 0.5, D, dtype=F64)
    return mu, s, GaussianMixture([1.0], mu[None], [s], sde)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_drift_is_the_derivative_of_the_exact_gaussian_flow(sde):
    """Data N(mu, s^2 I): p_t = N(alpha mu, v_t I) with v_t = alpha^2 s^2 + sigma^2, and the flow
    keeps (x_t - alpha_t mu) / sqrt(v_t) fixed. The drift equals the time derivative of that
    trajectory (central difference), and FlowField's divergence is f D - g^2/2 div s = f D + g^2 D / (2 v)."""
    mu, s, mix = _gaussian(sde)
    model = OracleModel(mix)
    z = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))

    def path(t):             # x_t for fixed z (times as float64 tensors: a float is float32)
        t = torch.tensor(t, dtype=F64)
        a, sig = sde.alpha(t).item(), sde.sigma(t).item()
        return a * mu + math.sqrt(a * a * s * s + sig * sig) * z

    for t in (0.05, 0.4, 0.9):
        h = 1e-5
        velocity = (path(t + h) - path(t - h)) / (2 * h)
        tb = torch.full((4,), t, dtype=F64)
        drift = pf_drift(model, path(t), tb)
        torch.testing.assert_close(drift, velocity, rtol=1e-6, atol=1e-6 * velocity.abs().max().item())
        f, g2 = sde.f_g2(tb)
        a, sig = sde.alpha(tb[0]).item(), sde.sigma(tb[0]).item()
        v = a * a * s * s + sig * sig
        dx, div = FlowField(model, "exact")(t, path(t))
        torch.testing.assert_close(dx, drift, rtol=0, atol=0)
        torch.testing.assert_close(div, 3 * f + 3 * g2 / (2 * v), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_drift_of_a_network_equals_the_oracle_flow(sde):
    """Through the parameterization wrapper (an eps network): f x - g^2/2 times the oracle's exact
    score; the log-SNR field is the same ODE, dy/dlambda = (F - f x) / alpha / (dlambda/dt) with
    dlambda/dt = -g^2 / (2 sigma^2)."""
    mix = random_mixture(4, 5, seed=1, sde=sde)
    net = ScoreModel(lambda x, t: mix.eps(x, t), sde, parameterization="eps")
    x = mix.sample(6, t=0.3, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.full((6,), 0.3, dtype=F64)
    f, g2 = sde.f_g2(t)
    exact = f[:, None] * x - 0.5 * g2[:, None] * mix.score(x, t)
    torch.testing.assert_close(pf_drift(net, x, t), exact, rtol=1e-10, atol=1e-10)
    a, sig = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    dlam_dt = -g2[:, None] / (2 * sig ** 2)
    lam = float(sde.lambda_(torch.tensor(0.3, dtype=F64)))
    dy, div = LogSNRFlowField(net, sde.eps, sde.T)(lam, x / a)
    torch.testing.assert_close(dy, (exact - f[:, None] * x) / a / dlam_dt, rtol=1e-8, atol=1e-10)
    assert bool((div == 0).all())


def test_float64_field_is_evaluated_at_the_float64_time():
    """A time given as a number reaches a float64 model unrounded (it was rounded to float32:
    t = 0.1 became 0.10000000149)."""
    sde = VPSDE()
    seen = []

    def net(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    model = ScoreModel(net, sde, parameterization="eps")
    x = torch.ones(2, 3, dtype=F64)
    FlowField(model)(0.1, x)
    assert seen[-1].dtype == F64 and bool((seen[-1] == 0.1).all()), seen[-1]


@pytest.mark.parametrize("solver,per_sample", [("torchdiffeq", False), ("torchdiffeq", True),
                                               ("scipy", False)])
def test_encode_decode_and_both_formulations_agree(solver, per_sample):
    """Decoding z with the field in t (flow.integrate_flow) lands on the reference flow map (the
    field in log-SNR, float64 DOP853); encoding the result gives z back."""
    sde = VESDE()
    mix = random_mixture(3, 4, seed=2, sde=sde)
    z = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(2)) * sde.prior_std
    kw = dict(solver=solver, per_sample=per_sample, rtol=1e-8, atol=1e-8)
    x, nfe = integrate_flow(mix, sde, z, sde.T, sde.eps, **kw)
    assert nfe > 0
    torch.testing.assert_close(x, exact_flow_map(mix, z), rtol=0, atol=1e-5)
    back, _ = integrate_flow(mix, sde, x, sde.eps, sde.T, **kw)
    torch.testing.assert_close(back, z, rtol=1e-6, atol=1e-5)


class _Recorder:
    """Wraps a field and records every time it is evaluated at."""

    def __init__(self, field):
        self.field, self.times = field, []
        self.has_divergence = field.has_divergence

    @property
    def n_evals(self):
        return self.field.n_evals

    def __call__(self, t, x, idx=None):
        self.times.append(torch.as_tensor(t, dtype=F64).flatten())
        return self.field(t, x, idx)


@pytest.mark.parametrize("t0,t1", [(1e-3, 1.0), (1.0, 1e-3)], ids=["encode", "decode"])
@pytest.mark.parametrize("solver,per_sample", [("torchdiffeq", False), ("torchdiffeq", True),
                                               ("scipy", False)])
def test_integrators_evaluate_the_field_inside_the_interval(t0, t1, solver, per_sample):
    """What lets the field skip its per-call device check: every evaluation lies in [t0, t1]
    (torchdiffeq's first-step probe included), and the per-sample solver is batch independent."""
    sde = VPSDE()
    mix = random_mixture(2, 4, seed=3, sde=sde)
    x = mix.sample(4, t=t0, generator=torch.Generator().manual_seed(3), dtype=F64)
    rec = _Recorder(FlowField(OracleModel(mix), "exact"))
    xe, delta, n = integrate(rec, x, t0, t1, solver=solver, method="dopri5" if solver != "scipy"
                             else "RK45", rtol=1e-6, atol=1e-6, per_sample=per_sample)
    seen = torch.cat(rec.times)
    lo, hi = min(t0, t1), max(t0, t1)
    assert bool(((seen >= lo) & (seen <= hi)).all()), (seen.min().item(), seen.max().item())
    assert n.shape == (4,) and bool((n > 0).all())
    if per_sample:
        far = torch.full((1, 2), 4.0, dtype=F64)
        alone = solve_dopri5_per_sample(FlowField(OracleModel(mix), "exact"), x[1:2], t0, t1, 1e-6, 1e-6)
        mixed = solve_dopri5_per_sample(FlowField(OracleModel(mix), "exact"),
                                        torch.cat([x[1:2], far]), t0, t1, 1e-6, 1e-6)
        assert mixed[2][1] != mixed[2][0]
        for a, b in zip(alone, mixed):
            torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)


def test_field_does_not_check_device_times_on_every_call(monkeypatch):
    """The field looks at t with sync=False (a GPU time would otherwise be read back to the host
    on every evaluation); numbers and CPU tensors are still checked."""
    sde = VPSDE()
    mix = random_mixture(2, 3, seed=4, sde=sde)
    x = mix.sample(3, t=sde.eps, generator=torch.Generator().manual_seed(4), dtype=F64)
    calls = []
    real = sdes_module.check_time_range

    def spy(t, T, name="t", *, sync=True):
        calls.append(sync)
        return real(t, T, name, sync=sync)

    monkeypatch.setattr(sdes_module, "check_time_range", spy)
    # a network that does not look at the SDE itself (the oracle checks its times: its own business)
    net = ScoreModel(lambda xx, t: xx * t[:, None], sde, parameterization="eps")
    for per_sample in (False, True):
        integrate(FlowField(net, "exact"), x, sde.eps, sde.T, rtol=1e-4, atol=1e-4,
                  per_sample=per_sample)
    assert calls and not any(calls)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T=1.0\]"):
        FlowField(net)(1.5, x)                       # a host time is checked all the same


# ---- pf_drift with the caller's scales (issue 18) ---------------------------------------------------
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "score"])
@pytest.mark.parametrize("sde_cls", [VPSDE, SubVPSDE, VESDE])
def test_pf_drift_with_given_scales_equals_the_checked_path(parameterization, sde_cls):
    """``scales = (alpha, sigma, f, g^2)`` as numbers: the same drift (float64, to round-off),
    asking the model for its own view and neither checking t nor evaluating the SDE."""
    from sde_diffusion.models import TimeMLP
    sde = sde_cls()
    torch.manual_seed(0)
    net = TimeMLP(2, hidden=8, depth=1).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = ScoreModel(net, sde, parameterization)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.full((5,), 0.37, dtype=torch.float64)
    t1 = torch.tensor([0.37], dtype=torch.float64)
    _, log_a, log_s = sde.log_scales(t1)
    f, g2 = sde.f_g2(t1)
    scales = (float(log_a.exp()), float(log_s.exp()), float(f), float(g2))
    with torch.no_grad():
        expected = pf_drift(model, x, t)
        calls = []
        for name in ("time", "log_scales", "f_g2"):
            orig = getattr(sde, name)
            setattr(sde, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
        got = pf_drift(model, x, t, scales)
    assert calls == []
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
