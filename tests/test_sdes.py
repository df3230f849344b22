"""Forward SDEs (VP linear and cosine, sub-VP, VE): marginals against simulation, the moment ODEs,
log-SNR and its inverse, the DDPM/SMLD chains, the reverse SDE and probability-flow ODE, the prior,
input validation, dtype/device, and property-based checks over random parameters."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from sde_diffusion import SDE, VESDE, VPSDE, ReverseSDE, SubVPSDE

F64 = torch.float64

SDES = {
    "vp": lambda **kw: VPSDE(**kw),
    "vp_cosine": lambda **kw: VPSDE(schedule="cosine", **kw),
    "subvp": lambda **kw: SubVPSDE(**kw),
    "ve": lambda **kw: VESDE(**kw),
}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PROPERTY = settings(derandomize=True, max_examples=30, deadline=None)


@pytest.fixture(params=list(SDES))
def sde(request):
    return SDES[request.param]()


def _grid(sde, n=41, lo=None, hi=None):
    lo = sde.eps if lo is None else lo
    hi = sde.T if hi is None else hi
    return torch.linspace(lo, hi, n, dtype=F64)


# ---- marginals against a simulation of the forward SDE ----------------------------------------------

@pytest.mark.parametrize("name", list(SDES))
def test_marginal_prob_matches_euler_maruyama_simulation(name):
    """Fine Euler-Maruyama paths of dx = f x dt + g dw have the mean alpha(t) x0 and the variance
    sigma(t)^2 of ``marginal_prob``, within 5 standard errors of the sample size (seeded)."""
    sde = SDES[name]()
    gen = torch.Generator().manual_seed(20210101)
    n, steps = 5000, 2000
    x0 = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=F64).expand(n, 4)
    # VP / sub-VP start at x0 (sigma(0) = 0); VE starts at s = eps from its marginal, which carries
    # sigma_min noise already at t = 0.
    s = sde.eps if isinstance(sde, VESDE) else 0.0
    mean, std = sde.marginal_prob(x0, s)
    # the paths run in float32 (rounding over 2000 steps is far below the sampling error)
    x = (mean + std[:, None] * torch.randn(x0.shape, generator=gen, dtype=F64)).float()
    ts = torch.linspace(s, sde.T, steps + 1, dtype=F64)
    f, g2 = sde.f_g2(ts[:-1])
    dt = ts.diff()
    decay = (1 + f * dt).tolist()                 # x <- x + f x dt + g sqrt(dt) z, in place
    noise_scale = (g2 * dt).sqrt().tolist()
    # The cosine schedule's beta(t) ~ 370 at t = T makes a uniform Euler step biased there (by
    # ~beta dt / 4 in the variance); it is checked up to 0.9 T, where the step bias is < 1 SE.
    checks = [0.1, 0.3, 0.6, 0.9] + ([] if name == "vp_cosine" else [1.0])
    check_at = {int(round((c * sde.T - s) / (sde.T - s) * steps)) for c in checks}
    seen, block = 0, 250
    for k in range(steps):
        if k % block == 0:
            noise = torch.randn((block,) + x.shape, generator=gen)
        x.mul_(decay[k]).add_(noise[k % block], alpha=noise_scale[k])
        if k + 1 not in check_at:
            continue
        seen += 1
        t = ts[k + 1]
        m, sd = sde.marginal_prob(x0[:1], t)
        var = float(sd[0]) ** 2
        se_mean = math.sqrt(var / n)
        err_mean = (x.double().mean(0) - m[0]).abs().max().item()
        assert err_mean <= 5 * se_mean, f"{name} t={t:.3f}: mean off by {err_mean:.3g} > 5 SE = {5 * se_mean:.3g}"
        # per-coordinate unbiased variances pooled over the 4 coordinates: 4 (n - 1) degrees of freedom
        var_hat = x.double().var(0).mean().item()
        se_var = var * math.sqrt(2.0 / (4 * (n - 1)))
        assert abs(var_hat - var) <= 5 * se_var, (
            f"{name} t={t:.3f}: variance {var_hat:.5g} vs sigma^2 {var:.5g} (5 SE = {5 * se_var:.3g})")
    assert seen == len(checks)


def test_moment_odes_hold_by_finite_differences(sde):
    """d/dt var = 2 f var + g^2 and d/dt mean = f mean (the moments' Fokker-Planck ODEs)."""
    t = _grid(sde, 37, 0.02 * sde.T, 0.98 * sde.T)
    h = 1e-6
    x0 = torch.tensor([[1.5, -0.3]], dtype=F64).expand(len(t), 2)

    def moments(tt):
        mean, std = sde.marginal_prob(x0, tt)
        return mean, std ** 2

    (m_p, v_p), (m_m, v_m), (m, v) = moments(t + h), moments(t - h), moments(t)
    f, g2 = sde.f_g2(t)
    torch.testing.assert_close((v_p - v_m) / (2 * h), 2 * f * v + g2, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close((m_p - m_m) / (2 * h), f[:, None] * m, rtol=2e-6, atol=1e-9)


def test_f_g_relations_to_alpha_sigma(sde):
    """f = d log alpha / dt and g^2 = d sigma^2/dt - 2 f sigma^2 (the affine-SDE identities)."""
    t = _grid(sde, 25, 0.02 * sde.T, 0.98 * sde.T)
    h = 1e-6
    f, g2 = sde.f_g2(t)
    dlog_alpha = (sde.alpha(t + h).log() - sde.alpha(t - h).log()) / (2 * h)
    torch.testing.assert_close(dlog_alpha, f, rtol=1e-6, atol=1e-9)
    drift, diffusion = sde.sde(torch.ones(len(t), 3, dtype=F64), t)
    torch.testing.assert_close(drift, f[:, None].expand(-1, 3))
    torch.testing.assert_close(diffusion, g2.sqrt())


# ---- closed forms --------------------------------------------------------------------------------

def test_alpha_sigma_agree_with_marginal_prob_and_perturb(sde):
    t = _grid(sde, 11, 0.0)
    x0 = torch.randn(11, 2, 3, dtype=F64)
    mean, std = sde.marginal_prob(x0, t)
    torch.testing.assert_close(mean, sde.alpha(t)[:, None, None] * x0, rtol=1e-14, atol=0)
    torch.testing.assert_close(std, sde.sigma(t), rtol=1e-14, atol=0)
    noise = torch.randn_like(x0)
    torch.testing.assert_close(sde.perturb(x0, t, noise), mean + std[:, None, None] * noise)
    # a scalar time broadcasts over the batch
    mean_s, std_s = sde.marginal_prob(x0, 0.3 * sde.T)
    assert std_s.shape == (11,)
    torch.testing.assert_close(std_s, sde.sigma(0.3 * sde.T).to(F64).expand(11), rtol=1e-6, atol=0)


def test_closed_forms_match_score_sde():
    """Independent transcriptions of score_sde's (and Nichol & Dhariwal's) formulas."""
    t = torch.linspace(0, 1, 21, dtype=F64)
    b0, b1 = 0.1, 20.0
    log_mean_coeff = -0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0
    beta = b0 + t * (b1 - b0)
    vp, subvp = VPSDE(b0, b1), SubVPSDE(b0, b1)
    torch.testing.assert_close(vp.alpha(t), log_mean_coeff.exp())
    torch.testing.assert_close(vp.sigma(t), torch.sqrt(1 - torch.exp(2 * log_mean_coeff)))
    torch.testing.assert_close(vp.f_g2(t), (-0.5 * beta, beta))
    torch.testing.assert_close(subvp.alpha(t), log_mean_coeff.exp())
    torch.testing.assert_close(subvp.sigma(t), 1 - torch.exp(2 * log_mean_coeff))
    discount = 1 - torch.exp(-2 * b0 * t - (b1 - b0) * t ** 2)
    torch.testing.assert_close(subvp.f_g2(t), (-0.5 * beta, beta * discount))

    ve = VESDE(0.01, 50.0)
    sigma = 0.01 * (50.0 / 0.01) ** t
    torch.testing.assert_close(ve.alpha(t), torch.ones_like(t))
    torch.testing.assert_close(ve.sigma(t), sigma)
    g = sigma * math.sqrt(2 * (math.log(50.0) - math.log(0.01)))
    torch.testing.assert_close(ve.f_g2(t), (torch.zeros_like(t), g ** 2))

    s, t_max = 0.008, 0.9946
    cos = VPSDE(schedule="cosine", cosine_s=s, cosine_t_max=t_max)
    alpha = torch.cos(math.pi / 2 * (t * t_max + s) / (1 + s)) / math.cos(math.pi / 2 * s / (1 + s))
    torch.testing.assert_close(cos.alpha(t), alpha)
    torch.testing.assert_close(cos.sigma(t), torch.sqrt(1 - alpha ** 2), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(cos.beta(t), math.pi * t_max / (1 + s) * torch.tan(
        math.pi / 2 * (t * t_max + s) / (1 + s)))


@pytest.mark.parametrize("name", ["vp", "vp_cosine", "subvp"])
def test_sigma_is_exactly_zero_at_t0_and_accurate_near_it(name):
    """The VP-type kernels are a point mass at t = 0; near it float32 keeps full relative accuracy
    (the cosine schedule used to give sigma(0) = NaN in float64 and 1.8e-4 in float32)."""
    sde = SDES[name]()
    assert sde.sigma(0.0).item() == 0.0 and sde.alpha(0.0).item() == 1.0
    assert sde.sigma(torch.tensor(0.0, dtype=F64)).item() == 0.0
    assert sde.lambda_(torch.tensor(0.0, dtype=F64)).item() == math.inf
    t = torch.tensor([1e-7, 1e-5, 1e-3, 0.1], dtype=F64)
    torch.testing.assert_close(sde.sigma(t.float()).double(), sde.sigma(t), rtol=2e-6, atol=0)


def test_structural_identities(sde):
    t = _grid(sde, 31, 0.0)
    a, s = sde.alpha(t), sde.sigma(t)
    if isinstance(sde, VPSDE):
        torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(t))
    elif isinstance(sde, SubVPSDE):
        torch.testing.assert_close(s, 1 - a ** 2)
    else:
        assert bool((a == 1).all())
        assert s[0].item() == pytest.approx(sde.sigma_min) and s[-1].item() == pytest.approx(sde.sigma_max)
    assert bool((a.diff() <= 0).all()) and bool((s.diff() > 0).all())


# ---- log-SNR -------------------------------------------------------------------------------------

def test_lambda_and_inverse_round_trip(sde):
    t = torch.cat([torch.tensor([sde.eps, 2 * sde.eps], dtype=F64), _grid(sde, 60, 3 * sde.eps)])
    lam = sde.lambda_(t)
    torch.testing.assert_close(lam, (sde.alpha(t) / sde.sigma(t)).log(), rtol=1e-12, atol=1e-12)
    assert bool((lam.diff() < 0).all()), "lambda(t) must decrease"
    closed = sde.t_of_lambda(lam)
    bisect = SDE.t_of_lambda(sde, lam)           # the base class's generic bisection
    torch.testing.assert_close(closed, t, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(bisect, t, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(closed, bisect, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(sde.lambda_(closed), lam, rtol=1e-9, atol=1e-9)
    # float32 keeps ~1e-6 relative accuracy
    torch.testing.assert_close(sde.t_of_lambda(lam.float()).double(), t, rtol=5e-6, atol=1e-7)


def test_t_of_lambda_clamps_to_the_time_range_like_the_bisection(sde):
    lam_T = sde.lambda_(torch.tensor(sde.T, dtype=F64))
    below = lam_T - torch.tensor([1e-3, 1.0, 30.0], dtype=F64)
    for t in (sde.t_of_lambda(below), SDE.t_of_lambda(sde, below)):
        torch.testing.assert_close(t, torch.full_like(t, sde.T))
    if isinstance(sde, VESDE):                    # lambda(0) = -log sigma_min is finite
        above = sde.lambda_(torch.tensor(0.0, dtype=F64)) + torch.tensor([1e-3, 5.0], dtype=F64)
        for t in (sde.t_of_lambda(above), SDE.t_of_lambda(sde, above)):
            torch.testing.assert_close(t, torch.zeros_like(t), atol=1e-12, rtol=0)
    else:                                         # lambda(0) = +inf
        assert sde.t_of_lambda(torch.tensor(math.inf, dtype=F64)).item() == 0.0
    # the infinite ends map to the ends of the range, in both dtypes
    for dtype in (torch.float32, F64):
        ends = sde.t_of_lambda(torch.tensor([-math.inf, math.inf], dtype=dtype))
        assert ends.tolist() == [sde.T, 0.0], (dtype, ends)


def test_t_of_lambda_rejects_nan(sde):
    lam = torch.tensor([0.0, math.nan], dtype=F64)
    with pytest.raises(ValueError, match="lambda must not be NaN"):
        sde.t_of_lambda(lam)
    with pytest.raises(ValueError, match="lambda must not be NaN"):
        SDE.t_of_lambda(sde, lam)


# ---- discretisations ------------------------------------------------------------------------------

def _index_times(sde, idx):
    """Times whose chain index floor(t (N - 1) / T) is ``idx`` (mid-cell, away from rounding)."""
    idx = torch.as_tensor(idx, dtype=F64)
    return ((idx + 0.5) * sde.T / (sde.N - 1)).clamp(max=sde.T)


def test_vp_discretize_is_the_ddpm_chain():
    N = 50
    sde = VPSDE(beta_min=0.1, beta_max=20.0, N=N)
    betas = np.linspace(0.1 / N, 20.0 / N, N)          # score_sde's discrete betas
    np.testing.assert_allclose(sde.discrete_betas.numpy(), betas, rtol=1e-15)
    idx = [0, 1, 17, 48, 49]
    t = _index_times(sde, idx)
    x = torch.randn(len(idx), 3, 2, dtype=F64)
    z = torch.randn_like(x)
    f, G = sde.discretize(x, t)
    beta = torch.as_tensor(betas[idx])[:, None, None]
    torch.testing.assert_close(x + f + G[:, None, None] * z, torch.sqrt(1 - beta) * x + torch.sqrt(beta) * z)
    assert G.shape == (len(idx),)
    # t = i (N-1)/T lands on index i, and t = T on the last one
    _, G_T = sde.discretize(x[:1], sde.T)
    assert G_T.item() == pytest.approx(math.sqrt(betas[-1]))
    # the chain's alpha_bar approaches the continuous alpha(T)^2 = exp(-int beta)
    sde_big = VPSDE(N=1000)
    log_abar = torch.log1p(-sde_big.discrete_betas).sum()
    assert log_abar.item() == pytest.approx(2 * math.log(sde_big.alpha(1.0).item()), rel=1e-2)


def test_vp_cosine_discrete_betas_telescope_to_alpha_bar():
    sde = VPSDE(schedule="cosine", N=200)
    betas = sde.discrete_betas
    assert bool(((betas > 0) & (betas <= 0.999)).all())
    grid = torch.linspace(0, sde.T, sde.N + 1, dtype=F64)
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), sde.alpha(grid[1:]) ** 2, rtol=1e-10, atol=1e-14)


def test_ve_discretize_is_the_smld_chain():
    N, smin, smax = 40, 0.01, 50.0
    sde = VESDE(smin, smax, N=N)
    sigmas = np.exp(np.linspace(np.log(smin), np.log(smax), N))   # score_sde's discrete sigmas
    np.testing.assert_allclose(sde.discrete_sigmas.numpy(), sigmas, rtol=1e-14)
    idx = np.array([0, 1, 20, 38, 39])
    x = torch.randn(len(idx), 4, dtype=F64)
    f, G = sde.discretize(x, _index_times(sde, idx))
    assert bool((f == 0).all())
    prev = np.where(idx == 0, 0.0, sigmas[np.maximum(idx - 1, 0)])
    np.testing.assert_allclose(G.numpy(), np.sqrt(sigmas[idx] ** 2 - prev ** 2), rtol=1e-12)
    assert G[0].item() == pytest.approx(smin)
    # the increments' variances add up to sigma_max^2
    all_idx = torch.arange(N)
    _, G_all = sde.discretize(torch.zeros(N, 1, dtype=F64), _index_times(sde, all_idx))
    assert (G_all ** 2).sum().item() == pytest.approx(smax ** 2, rel=1e-12)


def test_subvp_discretize_is_euler_maruyama():
    sde = SubVPSDE(N=100)
    t = torch.tensor([0.01, 0.5, 1.0], dtype=F64)
    x = torch.randn(3, 5, dtype=F64)
    f, G = sde.discretize(x, t)
    drift, g = sde.sde(x, t)
    torch.testing.assert_close(f, drift / 100)
    torch.testing.assert_close(G, g * math.sqrt(1 / 100))


# ---- reverse-time SDE and probability-flow ODE ------------------------------------------------------

def _toy_score(x, t):
    return -(1 + t.reshape(-1, *([1] * (x.ndim - 1)))) * x + 0.25


def test_reverse_sde_and_probability_flow_formulas(sde):
    x = torch.randn(6, 2, 3, dtype=F64)
    t = torch.linspace(0.05, 1.0, 6, dtype=F64) * sde.T
    drift, g = sde.sde(x, t)
    s = _toy_score(x, t)
    g2 = (g ** 2)[:, None, None]

    rev = sde.reverse(_toy_score)
    assert isinstance(rev, ReverseSDE) and rev.N == sde.N and rev.T == sde.T
    rd, rg = rev.sde(x, t)
    torch.testing.assert_close(rd, drift - g2 * s)                       # [SDE] eq. 6
    torch.testing.assert_close(rg, g)
    pd, pg = sde.reverse(_toy_score, probability_flow=True).sde(x, t)
    torch.testing.assert_close(pd, drift - 0.5 * g2 * s)                 # [SDE] eq. 13
    assert pg.shape == g.shape and bool((pg == 0).all())

    f, G = sde.discretize(x, t)
    G2 = (G ** 2)[:, None, None]
    rf, rG = rev.discretize(x, t)
    torch.testing.assert_close(rf, f - G2 * s)
    torch.testing.assert_close(rG, G)
    pf, pG = sde.reverse(_toy_score, probability_flow=True).discretize(x, t)
    torch.testing.assert_close(pf, f - 0.5 * G2 * s)
    assert bool((pG == 0).all())


def test_probability_flow_transports_a_gaussian_exactly(sde):
    """For data N(0, s0^2), p_t = N(0, alpha^2 s0^2 + sigma^2); with the exact score the ODE velocity
    must be x * d/dt log std_t, which moves every quantile of p_t along with it."""
    s0 = 0.7

    def var(t):
        return sde.alpha(t) ** 2 * s0 ** 2 + sde.sigma(t) ** 2

    def score(x, t):
        return -x / var(t)[:, None]

    t = _grid(sde, 9, 0.05 * sde.T, 0.95 * sde.T)
    x = torch.randn(len(t), 3, dtype=F64)
    velocity, _ = sde.reverse(score, probability_flow=True).sde(x, t)
    h = 1e-6
    dlog_std = (var(t + h).log() - var(t - h).log()) / (4 * h)
    torch.testing.assert_close(velocity, x * dlog_std[:, None], rtol=1e-6, atol=1e-9)


# ---- prior ----------------------------------------------------------------------------------------

def test_prior_logp_is_a_normal_log_density(sde):
    z = torch.randn(7, 2, 3, 3, dtype=F64) * sde.prior_std
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(sde.prior_std, dtype=F64))
    expected = normal.log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), expected, rtol=1e-13, atol=1e-10)
    scipy_ref = stats.norm(scale=sde.prior_std).logpdf(z.numpy()).reshape(7, -1).sum(1)
    np.testing.assert_allclose(sde.prior_logp(z).numpy(), scipy_ref, rtol=1e-12)
    assert sde.prior_logp(z[:, 0, 0, :1]).shape == (7,)


def test_prior_std_is_sigma_at_T_scale(sde):
    expected = sde.sigma_max if isinstance(sde, VESDE) else 1.0
    assert sde.prior_std == expected


def test_prior_sampling_moments_and_seeding(sde):
    n = 20_000
    a = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    b = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    c = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (n, 2) and a.dtype == F64
    se_mean = sde.prior_std / math.sqrt(n)
    assert a.mean(0).abs().max().item() <= 5 * se_mean
    var = sde.prior_std ** 2
    assert (a.var(0) - var).abs().max().item() <= 5 * var * math.sqrt(2 / (n - 1))
    assert sde.prior_sampling([3, 1, 4, 4]).shape == (3, 1, 4, 4)
    assert sde.prior_sampling((2,)).dtype == torch.get_default_dtype()


def test_prior_sampling_rejects_bad_shapes(sde):
    with pytest.raises(ValueError, match=r"shape .* got \(0, 2\)"):
        sde.prior_sampling((0, 2))
    with pytest.raises(ValueError, match=r"got \(\)"):
        sde.prior_sampling(())


# ---- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: VPSDE(beta_min=-0.1), r"beta_min .*got -0\.1"),
    (lambda: SubVPSDE(beta_min=-2.0), r"beta_min .*got -2\.0"),
    (lambda: VPSDE(beta_min=5.0, beta_max=1.0), r"beta_max .*>= beta_min=5\.0, got 1\.0"),
    (lambda: SubVPSDE(beta_min=0.0, beta_max=-3.0), r"beta_max .*got -3\.0"),
    (lambda: VPSDE(beta_max=float("nan")), r"beta_max .*got nan"),
    (lambda: VPSDE(beta_min=float("inf")), r"beta_min .*got inf"),
    (lambda: VESDE(sigma_min=-0.01), r"sigma_min .*got -0\.01"),
    (lambda: VESDE(sigma_min=0.0), r"sigma_min .*got 0\.0"),
    (lambda: VESDE(sigma_max=-5.0), r"sigma_max .*got -5\.0"),
    (lambda: VESDE(sigma_min=10.0, sigma_max=1.0), r"sigma_max must be > sigma_min=10\.0, got 1\.0"),
    (lambda: VPSDE(eps=0.0), r"eps must lie in the open interval \(0, T=1\.0\), got 0\.0"),
    (lambda: VPSDE(eps=1.0), r"eps .*got 1\.0"),
    (lambda: VESDE(eps=-1e-3), r"eps .*got -0\.001"),
    (lambda: SubVPSDE(T=2.0, eps=3.0), r"eps .*\(0, T=2\.0\), got 3\.0"),
    (lambda: VPSDE(eps=float("nan")), r"eps .*got nan"),
    (lambda: VPSDE(N=0), r"N must be an integer >= 1, got 0"),
    (lambda: VESDE(N=-5), r"N .*got -5"),
    (lambda: SubVPSDE(N=2.5), r"N .*got 2\.5"),
    (lambda: VPSDE(T=0.0), r"T must be .*got 0\.0"),
    (lambda: VPSDE(T=-1.0), r"T .*got -1\.0"),
    (lambda: VPSDE(schedule="quadratic"), r"schedule .*got 'quadratic'"),
    (lambda: VPSDE(schedule="cosine", cosine_t_max=1.0), r"cosine_t_max .*got 1\.0"),
    (lambda: VPSDE(schedule="cosine", cosine_s=-0.1), r"cosine_s .*got -0\.1"),
])
def test_bad_constructor_arguments_name_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("bad, shown", [(-0.1, r"-0\.1"), (1.5, r"1\.5"), (math.nan, "nan"),
                                        (-1e-3, r"-0\.001")])
def test_times_outside_the_range_or_nan_are_rejected(sde, bad, shown):
    x = torch.zeros(3, 2)
    t_vec = torch.tensor([0.5, bad, 0.2])         # the message names the offending entry
    match = rf"t must lie in \[0, T=1\.0\], got {shown}"
    calls = [
        lambda: sde.alpha(bad), lambda: sde.sigma(bad), lambda: sde.f_g2(bad), lambda: sde.lambda_(bad),
        lambda: sde.alpha(t_vec), lambda: sde.marginal_prob(x, t_vec), lambda: sde.sde(x, bad),
        lambda: sde.perturb(x, t_vec, x), lambda: sde.discretize(x, t_vec),
        lambda: sde.reverse(_toy_score).sde(x, bad),
        lambda: sde.reverse(_toy_score, probability_flow=True).discretize(x, t_vec),
    ]
    if isinstance(sde, VPSDE):
        calls.append(lambda: sde.beta(bad))
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("name", list(SDES))
def test_T_only_rescales_time(name):
    """alpha and sigma at t*T equal the T=1 values at t; f and g^2 scale by 1/T; the discrete chains
    (which see only indices) are the same. (The linear beta used to ignore T.)"""
    T = 2.5
    one, scaled = SDES[name](), SDES[name](T=T, eps=1e-3 * T)
    u = torch.linspace(0, 1, 11, dtype=F64)
    for fn in ("alpha", "sigma", "lambda_"):
        torch.testing.assert_close(getattr(scaled, fn)(u * T), getattr(one, fn)(u), rtol=1e-12, atol=1e-14)
    f1, g1 = one.f_g2(u)
    fT, gT = scaled.f_g2(u * T)
    torch.testing.assert_close((fT, gT), (f1 / T, g1 / T), rtol=1e-12, atol=1e-14)
    lam = one.lambda_(u[1:])
    torch.testing.assert_close(scaled.t_of_lambda(lam), u[1:] * T, rtol=1e-10, atol=1e-12)
    x = torch.randn(11, 2, dtype=F64)
    for a, b in zip(scaled.discretize(x, u * T * 0.999), one.discretize(x, u * 0.999)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_time_range_follows_T():
    sde = VESDE(T=2.0, eps=1e-3)
    assert sde.sigma(2.0).item() == pytest.approx(sde.sigma_max, rel=1e-6)
    with pytest.raises(ValueError, match=r"\[0, T=2\.0\], got 2\.5"):
        sde.sigma(2.5)


def test_time_batch_mismatch_is_rejected(sde):
    with pytest.raises(ValueError, match=r"batch size 3, got shape \(2,\)"):
        sde.marginal_prob(torch.zeros(3, 2), torch.tensor([0.1, 0.2]))


def test_repr_names_the_parameters():
    assert repr(VPSDE(N=10)) == "VPSDE(beta_min=0.1, beta_max=20.0, schedule='linear', N=10, T=1.0, eps=0.001)"
    assert "sigma_max=50.0" in repr(VESDE()) and "SubVPSDE(" in repr(SubVPSDE())


# ---- dtype and device follow the input --------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_follow_the_input(sde, device, dtype):
    x = torch.randn(4, 2, 3, dtype=dtype, device=device)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=dtype, device=device) * sde.T
    t_inner = t.clamp(min=sde.eps)
    outputs = {
        "marginal_prob": sde.marginal_prob(x, t), "sde": sde.sde(x, t), "discretize": sde.discretize(x, t),
        "perturb": sde.perturb(x, t, x), "prior_logp": sde.prior_logp(x), "alpha": sde.alpha(t),
        "sigma": sde.sigma(t), "f_g2": sde.f_g2(t), "lambda_": sde.lambda_(t_inner),
        "t_of_lambda": sde.t_of_lambda(sde.lambda_(t_inner)),
        "bisection": SDE.t_of_lambda(sde, sde.lambda_(t_inner)),
        "reverse": sde.reverse(_toy_score).sde(x, t),
        "flow_discretize": sde.reverse(_toy_score, probability_flow=True).discretize(x, t),
        "scalar_t": sde.marginal_prob(x, 0.5),
        "prior_sampling": sde.prior_sampling((2, 3), device=device, dtype=dtype),
    }
    for name, out in outputs.items():
        for o in (out if isinstance(out, tuple) else (out,)):
            assert o.dtype == dtype and o.device.type == device, (name, o.dtype, o.device)
    # values agree with the float64 CPU reference
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    x64, t64 = x.cpu().double(), t.cpu().double()
    for got, ref in [(sde.marginal_prob(x, t), sde.marginal_prob(x64, t64)),
                     (sde.sde(x, t), sde.sde(x64, t64)),
                     (sde.discretize(x, t), sde.discretize(x64, t64))]:
        for g, r in zip(got, ref):
            torch.testing.assert_close(g.cpu().double(), r, **tol)
    torch.testing.assert_close(outputs["t_of_lambda"].cpu().double(), t_inner.cpu().double(),
                               rtol=1e-5 if dtype == torch.float32 else 1e-9, atol=1e-7)
    gen = torch.Generator(device=device).manual_seed(0)
    assert sde.prior_sampling((2, 3), generator=gen).device.type == device


# ---- property-based checks -----------------------------------------------------------------------

@st.composite
def random_sdes(draw):
    kind = draw(st.sampled_from(["vp", "vp_cosine", "subvp", "ve"]))
    T = draw(st.floats(0.25, 4.0))
    common = dict(N=draw(st.integers(1, 2000)), T=T, eps=draw(st.floats(1e-5, 1e-2)) * T)
    if kind == "ve":
        smin = draw(st.floats(1e-3, 1.0))
        return VESDE(sigma_min=smin, sigma_max=smin * draw(st.floats(2.0, 1e4)), **common)
    b0 = draw(st.floats(0.0, 2.0))
    b1 = b0 + draw(st.floats(0.5, 30.0))
    if kind == "subvp":
        return SubVPSDE(b0, b1, **common)
    if kind == "vp":
        return VPSDE(b0, b1, **common)
    return VPSDE(schedule="cosine", cosine_s=draw(st.floats(1e-3, 0.05)),
                 cosine_t_max=draw(st.floats(0.5, 0.999)), **common)


event_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@PROPERTY
@given(sde=random_sdes(), batch=st.integers(1, 6), event=event_shapes, frac=st.floats(0.0, 1.0))
def test_property_shapes(sde, batch, event, frac):
    x = torch.randn((batch,) + event, dtype=F64)
    t = torch.full((batch,), frac * sde.T, dtype=F64)
    mean, std = sde.marginal_prob(x, t)
    assert mean.shape == x.shape and std.shape == (batch,)
    drift, g = sde.sde(x, frac * sde.T)
    assert drift.shape == x.shape and g.shape == (batch,)
    f, G = sde.discretize(x, t)
    assert f.shape == x.shape and G.shape == (batch,) and bool(torch.isfinite(G).all())
    assert sde.prior_logp(x).shape == (batch,)
    assert sde.prior_sampling((batch,) + event).shape == x.shape
    rd, rg = sde.reverse(_toy_score).sde(x, t)
    assert rd.shape == x.shape and rg.shape == (batch,)
    assert bool(torch.isfinite(mean).all() & torch.isfinite(std).all() & torch.isfinite(rd).all())


@PROPERTY
@given(sde=random_sdes(), fracs=st.lists(st.floats(0.02, 0.98), min_size=1, max_size=5))
def test_property_moment_odes_and_structure(sde, fracs):
    t = torch.tensor(fracs, dtype=F64) * sde.T
    h = 1e-6 * sde.T
    f, g2 = sde.f_g2(t)
    var = sde.sigma(t) ** 2
    dvar = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(dvar, 2 * f * var + g2, rtol=1e-5, atol=1e-8)
    dalpha = (sde.alpha(t + h) - sde.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(dalpha, f * sde.alpha(t), rtol=1e-5, atol=1e-8)
    a, s = sde.alpha(t), sde.sigma(t)
    if isinstance(sde, VPSDE):
        torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(t))
    elif isinstance(sde, SubVPSDE):
        torch.testing.assert_close(s, 1 - a ** 2)
    else:
        assert bool((a == 1).all())
    assert bool((g2 > 0).all()) and bool((s > 0).all()) and bool((a > 0).all())


@PROPERTY
@given(sde=random_sdes(), fracs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5))
def test_property_lambda_round_trip(sde, fracs):
    t = sde.eps + torch.tensor(fracs, dtype=F64) * (sde.T - sde.eps)
    lam = sde.lambda_(t)
    closed = sde.t_of_lambda(lam)
    torch.testing.assert_close(closed, t, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(SDE.t_of_lambda(sde, lam), closed, rtol=1e-8, atol=1e-12)


# ---- identity and names ----------------------------------------------------------------------------
def test_equality_is_by_parameters_not_repr():
    from sde_diffusion.sdes import SubVPSDE, VESDE, VPSDE

    cosine = VPSDE(schedule="cosine")
    assert cosine == VPSDE(schedule="cosine") and hash(cosine) == hash(VPSDE(schedule="cosine"))
    assert cosine != VPSDE(schedule="cosine", cosine_s=0.01)          # equal reprs before
    assert cosine != VPSDE(schedule="cosine", cosine_t_max=0.99)
    assert VPSDE() != SubVPSDE() and VPSDE() != VPSDE(beta_max=10.0) and VESDE() != VESDE(eps=1e-3)
    assert VPSDE() == VPSDE(cosine_s=0.5)      # cosine_s does not shape a linear schedule


@pytest.mark.parametrize("name", ["vp", "vp_cosine", "subvp", "ve"])
def test_names_table_round_trips(name):
    from sde_diffusion.sdes import make_sde, sde_from_dict, sde_name

    sde = make_sde(name, N=500)
    assert sde_name(sde) == name and sde.N == 500
    d = sde.to_dict()
    assert json.loads(json.dumps(d)) == d and sde_from_dict(d) == sde


def test_score_sde_spellings_and_unknown_names():
    from sde_diffusion.sdes import VPSDE, make_sde

    assert make_sde("VPSDE") == VPSDE() and make_sde("vpsde_cosine") == VPSDE(schedule="cosine")
    with pytest.raises(ValueError, match="unknown SDE 'vpx'; valid: vp, vp_cosine, subvp, ve"):
        make_sde("vpx")


def test_public_log_views_are_checked():
    sde = SDES["vp"]()
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    assert torch.allclose(sde.log_alpha(t).exp(), sde.alpha(t))
    assert torch.allclose(sde.log_sigma(t).exp(), sde.sigma(t))
    with pytest.raises(ValueError, match="1.5"):
        sde.log_alpha(1.5)


def test_a_subclass_has_no_name_and_kinds_are_fixed():
    """A subclass may change the process, so it does not take its parent's name; the table's
    kind arguments cannot be overridden by parameters."""
    from sde_diffusion.sdes import make_sde, sde_name

    class Tweaked(VPSDE):
        pass

    with pytest.raises(ValueError, match="Tweaked has no name in SDE_NAMES"):
        sde_name(Tweaked())
    with pytest.raises(ValueError, match="fixes schedule"):
        make_sde("vp", schedule="cosine")
