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
