"""DDIM: the update rule for eta = 0 (first-order DPM-Solver in closed form) and eta = 1 (the exact
posterior step), determinism, and its options. (Its convergence order is fitted in test_ode.py.)"""
import math

import pytest
import torch

from sde_diffusion import VESDE, VPSDE, SubVPSDE, random_mixture, sample

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
X = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _scales(sde, t):
    t = torch.tensor(t, dtype=torch.float64)
    return float(sde.alpha(t)), float(sde.sigma(t))


@pytest.mark.parametrize("name", sorted(SDES))
def test_eta_zero_step_is_first_order_dpm_solver(name):
    """x' = (alpha'/alpha) x - sigma' (e^h - 1) eps, h = lambda' - lambda (Lu et al. 2022, eq. 3.7)."""
    sde = SDES[name]()
    mix = random_mixture(2, 4, sde=sde)
    t0, t1 = 0.7, 0.2
    x = X * sde.prior_std
    out = sample(mix, x_T=x, solver="ddim", grid=torch.tensor([t0, t1], dtype=torch.float64)).samples
    a, s = _scales(sde, t0)
    a1, s1 = _scales(sde, t1)
    h = math.log(a1 / s1) - math.log(a / s)
    eps = mix.eps(x, torch.full((5,), t0, dtype=torch.float64))
    torch.testing.assert_close(out, a1 / a * x - s1 * math.expm1(h) * eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SDES))
def test_eta_one_step_is_the_exact_posterior(name):
    """With eta = 1 the step draws from q(x_t' | x_t, x0 = x0_hat): mean
    alpha' x0 + sqrt(sigma'^2 - v) eps, variance v = sigma'^2 (sigma^2 - r^2 sigma'^2) / sigma^2."""
    sde = SDES[name]()
    mix = random_mixture(2, 4, sde=sde)
    t0, t1 = 0.7, 0.2
    x = X * sde.prior_std
    out = sample(mix, x_T=x, solver="ddim", eta=1.0, generator=torch.Generator().manual_seed(11),
                 grid=torch.tensor([t0, t1], dtype=torch.float64)).samples
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    a, s = _scales(sde, t0)
    a1, s1 = _scales(sde, t1)
    r = a / a1
    v = s1 ** 2 * (s ** 2 - r ** 2 * s1 ** 2) / s ** 2
    t = torch.full((5,), t0, dtype=torch.float64)
    eps, x0 = mix.eps(x, t), mix.x0(x, t)
    expected = a1 * x0 + math.sqrt(s1 ** 2 - v) * eps + math.sqrt(v) * z
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_eta_zero_is_deterministic_and_eta_scales_the_noise():
    mix = random_mixture(2, 4, sde=VPSDE())
    x_T = X.clone()
    a = sample(mix, x_T=x_T, solver="ddim", steps=10, generator=0).samples
    b = sample(mix, x_T=x_T, solver="ddim", steps=10, generator=1).samples
    assert torch.equal(a, b)
    c = sample(mix, x_T=x_T, solver="ddim", steps=10, eta=0.5, generator=0).samples
    d = sample(mix, x_T=x_T, solver="ddim", steps=10, eta=0.5, generator=1).samples
    assert not torch.equal(c, d)


def test_eta_is_checked():
    mix = random_mixture(2, 4, sde=VPSDE())
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="eta must lie in"):
            sample(mix, shape=(2, 2), solver="ddim", steps=3, eta=bad)


def test_previous_time_comes_from_the_grid():
    """Any decreasing grid works, uneven too: two half steps differ from one whole step, and the
    result of a custom grid equals the same grid given by name."""
    sde = VPSDE()
    mix = random_mixture(2, 4, sde=sde)
    from sde_diffusion.samplers import make_grid

    grid = make_grid(sde, 7, "karras")
    by_name = sample(mix, x_T=X, solver="ddim", steps=7, grid="karras").samples
    custom = sample(mix, x_T=X, solver="ddim", grid=grid).samples
    assert torch.equal(by_name, custom)
    one = sample(mix, x_T=X, solver="ddim", grid=torch.tensor([1.0, 0.3], dtype=torch.float64)).samples
    two = sample(mix, x_T=X, solver="ddim", grid=torch.tensor([1.0, 0.9, 0.3], dtype=torch.float64)).samples
    assert not torch.allclose(one, two)


# --- sigma-hat: DDIM Table 1's larger-variance ancestral sampler (eta = 1's mean, DDPM's beta) ---

def _one_step_draws(name, n=40000, **options):
    """``n`` draws of ``x_t'`` from one fixed ``x_t`` (t = 0.7 -> t' = 0.2) on the exact oracle,
    and the closed forms: the posterior mean ``alpha' x0 + sigma' e^{lambda - lambda'} eps``, the
    forward transition variance ``sigma^2 - (alpha/alpha')^2 sigma'^2`` and the posterior variance.
    The grid goes on to 0.1 so that the step to 0.2 is not the last (which adds no noise)."""
    sde = SDES[name]()
    mix = random_mixture(2, 4, sde=sde)
    t0, t1 = 0.7, 0.2
    x = (X[:1] * sde.prior_std).expand(n, 2).contiguous()
    grid = torch.tensor([t0, t1, 0.1], dtype=torch.float64)
    traj = sample(mix, x_T=x, solver="ddim", grid=grid, generator=torch.Generator().manual_seed(4),
                  return_trajectory=True, **options).trajectory
    a, s = _scales(sde, t0)
    a1, s1 = _scales(sde, t1)
    t = torch.full((1,), t0, dtype=torch.float64)
    eps, x0 = mix.eps(x[:1], t)[0], mix.x0(x[:1], t)[0]
    mean = a1 * x0 + s1 * (a * s1) / (s * a1) * eps
    forward_var = s ** 2 - (a / a1) ** 2 * s1 ** 2
    posterior_var = s1 ** 2 * forward_var / s ** 2
    return traj[1], mean, forward_var, posterior_var


def _moments_match(draws, mean, var) -> bool:
    """Sample mean, per-coordinate variance and covariance of the draws agree with ``N(mean,
    var I)`` within 5 standard errors (the draws are exactly Gaussian: x0 and eps are fixed)."""
    n = draws.shape[0]
    centred = draws - draws.mean(0)
    cov = centred.T @ centred / (n - 1)
    return bool((draws.mean(0) - mean).abs().max() < 5 * math.sqrt(var / n)
                and (cov.diagonal() / var - 1).abs().max() < 5 * math.sqrt(2 / n)
                and cov[0, 1].abs() < 5 * var / math.sqrt(n))


@pytest.mark.parametrize("name", sorted(SDES))
def test_sigma_hat_step_draws_the_forward_transition_variance_around_the_posterior_mean(name):
    draws, mean, forward_var, posterior_var = _one_step_draws(name, sigma_hat=True)
    assert forward_var > 2 * posterior_var         # a large step: the two variances differ
    assert _moments_match(draws, mean, forward_var)
    assert not _moments_match(draws, mean, posterior_var)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_eta_one_has_the_same_mean_and_the_smaller_variance(name):
    """The check above fails on eta = 1's step (posterior variance), which it passes with its own
    variance: the test tells the two samplers apart."""
    draws, mean, forward_var, posterior_var = _one_step_draws(name, eta=1.0)
    assert _moments_match(draws, mean, posterior_var)
    assert not _moments_match(draws, mean, forward_var)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_sigma_hat_last_step_adds_no_noise(name):
    """The grid's last step is eta = 1's mean alone (DDPM's Algorithm 2: z = 0 at t = 1)."""
    sde = SDES[name]()
    mix = random_mixture(2, 4, sde=sde)
    x = X * sde.prior_std
    grid = torch.tensor([0.7, 0.2], dtype=torch.float64)
    out = [sample(mix, x_T=x, solver="ddim", grid=grid, sigma_hat=True, generator=g).samples
           for g in (0, 1)]
    a, s = _scales(sde, 0.7)
    a1, s1 = _scales(sde, 0.2)
    t = torch.full((5,), 0.7, dtype=torch.float64)
    expected = a1 * mix.x0(x, t) + s1 * (a * s1) / (s * a1) * mix.eps(x, t)
    torch.testing.assert_close(out[0], expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(out[0], out[1])


def test_sigma_hat_spec_and_its_errors():
    from sde_diffusion.experiments import parse_solver_spec
    from sde_diffusion.samplers import get_solver

    for text in ("True", "true"):            # the study's spelling is ddim:sigma_hat=true
        assert parse_solver_spec(f"ddim:sigma_hat={text}").options == {"sigma_hat": True}
    assert parse_solver_spec("ddim:sigma_hat=false").options == {"sigma_hat": False}
    with pytest.raises(ValueError, match="sigma_hat=1.*must be True or False"):
        parse_solver_spec("ddim:sigma_hat=1")
    info = get_solver("ddim")
    assert not info.is_deterministic(sigma_hat=True)
    assert info.is_deterministic() and info.is_deterministic(sigma_hat=False)
    mix = random_mixture(2, 4, sde=VPSDE())
    for eta in (0.5, 1.0):
        with pytest.raises(ValueError, match=f"sigma_hat=True.*leave eta at its default 0.*eta={eta}"):
            sample(mix, shape=(2, 2), solver="ddim", steps=3, sigma_hat=True, eta=eta)
    with pytest.raises(ValueError, match="sigma_hat must be True or False, got 'yes'"):
        sample(mix, shape=(2, 2), solver="ddim", steps=3, sigma_hat="yes")
    a = sample(mix, shape=(64, 2), solver="ddim", steps=10, sigma_hat=True, generator=0).samples
    b = sample(mix, shape=(64, 2), solver="ddim", steps=10, sigma_hat=True, generator=0).samples
    c = sample(mix, shape=(64, 2), solver="ddim", steps=10, sigma_hat=True, generator=1).samples
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_sigma_hat_and_eta_one_sample_p_eps_alike_with_many_steps(name):
    """With 100 steps both ancestral samplers land near the oracle's p_eps (sliced Wasserstein of
    4000 samples; data against data at this size is about 0.011) and near each other. Measured:
    VP 0.009 (sigma-hat), 0.022 (eta = 1), 0.023 between; VE 0.014, 0.012, 0.015. A sigma-hat with
    eta = 0's mean instead of eta = 1's gives about 0.3."""
    from sde_diffusion.metrics import sliced_wasserstein

    sde = SDES[name]()
    mix = random_mixture(2, 4, sde=sde)
    data = mix.sample(4000, t=sde.eps, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hat, one = (sample(mix, shape=(4000, 2), dtype=torch.float64, solver="ddim", steps=100,
                       generator=3, **kw).samples for kw in ({"sigma_hat": True}, {"eta": 1.0}))
    assert sliced_wasserstein(hat, data) < 0.025
    assert sliced_wasserstein(one, data) < 0.03
    assert sliced_wasserstein(hat, one) < 0.035
