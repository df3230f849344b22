"""Time grids shared by every solver: monotone, exact ends, and each kind's defining formula."""
import math

import pytest
import torch

from sde_diffusion import VESDE, VPSDE, SubVPSDE
from sde_diffusion.samplers import GRIDS, make_grid

SDES = {"vp": VPSDE(), "vp_cosine": VPSDE(schedule="cosine"), "subvp": SubVPSDE(), "ve": VESDE()}


def _lam(sde, t):
    _, log_a, log_s = sde.log_scales(t)
    return log_a - log_s


@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("name", sorted(SDES))
def test_monotone_with_exact_ends(name, kind):
    sde = SDES[name]
    for steps, t_start, t_end in ((1, None, None), (7, None, None), (50, 0.8, 0.01)):
        grid = make_grid(sde, steps, kind, t_start, t_end)
        assert grid.dtype == torch.float64 and grid.device.type == "cpu"
        assert grid.shape == (steps + 1,)
        assert bool((grid[1:] < grid[:-1]).all())
        assert float(grid[0]) == (sde.T if t_start is None else t_start)
        assert float(grid[-1]) == (sde.eps if t_end is None else t_end)


@pytest.mark.parametrize("name", sorted(SDES))
def test_uniform_and_quadratic_formulas(name):
    sde = SDES[name]
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    uniform = make_grid(sde, 10, "uniform")
    torch.testing.assert_close(uniform, sde.T + (sde.eps - sde.T) * u, rtol=0, atol=1e-15)
    quadratic = make_grid(sde, 10, "quadratic")
    torch.testing.assert_close(quadratic, sde.eps + (sde.T - sde.eps) * (1 - u) ** 2, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", sorted(SDES))
def test_logsnr_grid_is_uniform_in_lambda(name):
    sde = SDES[name]
    grid = make_grid(sde, 20, "logsnr")
    lam = _lam(sde, grid)
    steps = lam[1:] - lam[:-1]
    assert bool((steps > 0).all())
    torch.testing.assert_close(steps, torch.full_like(steps, float(steps.mean())), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
@pytest.mark.parametrize("name", sorted(SDES))
def test_karras_grid_formula(name, rho):
    """EDM eq. 5: sigma_i = (s_max^(1/rho) + i/n (s_min^(1/rho) - s_max^(1/rho)))^rho, with the
    noise level sigma/alpha = exp(-lambda)."""
    sde = SDES[name]
    n = 12
    grid = make_grid(sde, n, "karras", rho=rho)
    noise = torch.exp(-_lam(sde, grid))
    s_max, s_min = float(noise[0]), float(noise[-1])
    i = torch.arange(n + 1, dtype=torch.float64)
    expected = (s_max ** (1 / rho) + i / n * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    torch.testing.assert_close(noise, expected, rtol=1e-7, atol=0)


def test_karras_rho_one_is_uniform_in_noise_level_for_ve():
    sde = VESDE()
    sigma = sde.sigma(make_grid(sde, 8, "karras", rho=1.0))
    d = sigma[1:] - sigma[:-1]
    torch.testing.assert_close(d, torch.full_like(d, float(d.mean())), rtol=1e-8, atol=1e-10)


def test_invalid_grids():
    sde = VPSDE()
    with pytest.raises(ValueError, match="valid grids: uniform, logsnr, karras, quadratic"):
        make_grid(sde, 10, "cosine")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        make_grid(sde, 0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        make_grid(sde, 2.0)
    with pytest.raises(ValueError, match="0 < t_end < t_start"):
        make_grid(sde, 10, t_start=0.5, t_end=0.5)
    with pytest.raises(ValueError, match="0 < t_end < t_start"):
        make_grid(sde, 10, t_start=1.5)
    with pytest.raises(ValueError, match="rho must be > 0"):
        make_grid(sde, 10, "karras", rho=0.0)


def test_sample_uses_the_grid():
    from sde_diffusion import random_mixture, sample

    sde = VPSDE()
    mix = random_mixture(2, 3, sde=sde)
    for kind in GRIDS:
        result = sample(mix, shape=(2, 2), solver="ode_euler", steps=5, grid=kind, generator=0)
        torch.testing.assert_close(result.times, make_grid(sde, 5, kind))
    custom = torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=torch.float64)
    result = sample(mix, shape=(2, 2), solver="ode_euler", grid=custom, generator=0)
    assert result.nfe == 3 and torch.equal(result.times, custom)
    with pytest.raises(ValueError, match="decreasing"):
        sample(mix, shape=(2, 2), solver="ode_euler", grid=custom.flip(0))
    with pytest.raises(ValueError, match=r"lie in \(0, T"):
        sample(mix, shape=(2, 2), solver="ode_euler", grid=torch.tensor([1.0, 0.0]))
    assert math.isclose(float(sample(mix, shape=(1, 2), solver="ode_euler", steps=3,
                                     t_start=0.5, t_end=0.1).times[0]), 0.5)
