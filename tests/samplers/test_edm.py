"""EDM's Heun and Euler samplers in (x/alpha, sigma/alpha) for VP, sub-VP and VE: Euler equals
DDIM, Heun converges with order 2, churn is seeded and reproduces the mixture's statistics."""
import pytest
import torch

from sde_diffusion import SubVPSDE, VESDE, VPSDE, random_mixture, sample
from sde_diffusion.samplers.reference import exact_flow_map

from test_dpm_solver import _separated_mixture, _slope, assert_mode_statistics, p_at

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def _problem(kind, batch=12):
    sde = SDES[kind]()
    mix = random_mixture(8, 4, seed=1, sde=sde)
    x_T = torch.randn(batch, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return sde, mix, x_T * sde.prior_std


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
def test_edm_euler_equals_ddim(kind):
    sde, mix, x_T = _problem(kind)
    a = sample(mix, sde, x_T=x_T, solver="edm_euler", steps=9, grid="karras").samples
    b = sample(mix, sde, x_T=x_T, solver="ddim", steps=9, grid="karras").samples
    assert torch.allclose(a, b, rtol=0, atol=1e-12 * float(b.abs().max()))


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_edm_heun_second_order(kind):
    sde, mix, x_T = _problem(kind)
    ref = exact_flow_map(mix, x_T)
    steps = [20, 40, 80]
    errors = []
    for n in steps:
        out = sample(mix, sde, x_T=x_T, solver="edm_heun", steps=n, grid="karras")
        assert out.nfe == 2 * n
        errors.append(float(((out.samples - ref) ** 2).mean().sqrt()))
    assert abs(_slope(errors, steps) - 2.0) < 0.3, errors


def test_edm_heun_without_churn_is_deterministic_and_ignores_the_generator():
    sde, mix, x_T = _problem("vp")
    a = sample(mix, sde, x_T=x_T, solver="edm_heun", steps=6, grid="karras", generator=1).samples
    b = sample(mix, sde, x_T=x_T, solver="edm_heun", steps=6, grid="karras", generator=2).samples
    assert torch.equal(a, b)


def test_churn_is_seeded_and_stays_in_time_range():
    sde, mix, x_T = _problem("vp")
    kw = dict(x_T=x_T, solver="edm_heun", steps=6, grid="karras", S_churn=50.0)  # S_tmax = inf
    a = sample(mix, sde, generator=1, **kw).samples
    b = sample(mix, sde, generator=1, **kw).samples
    c = sample(mix, sde, generator=2, **kw).samples
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(torch.isfinite(a).all())
    # churn only inside [S_tmin, S_tmax] (noise levels sigma/alpha): an empty window is no churn
    d = sample(mix, sde, generator=1, S_tmin=1e6, **{**kw, "S_churn": 50.0}).samples
    e = sample(mix, sde, x_T=x_T, solver="edm_heun", steps=6, grid="karras").samples
    assert torch.equal(d, e)


def test_invalid_churn_options():
    sde, mix, x_T = _problem("vp")
    with pytest.raises(ValueError, match="S_churn"):
        sample(mix, sde, x_T=x_T, solver="edm_heun", steps=3, S_churn=-1.0)
    with pytest.raises(ValueError, match="S_tmin"):
        sample(mix, sde, x_T=x_T, solver="edm_heun", steps=3, S_tmin=2.0, S_tmax=1.0)


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_edm_heun_with_churn_reproduces_mode_statistics(kind):
    sde = SDES[kind]()
    mix = _separated_mixture(sde)
    out = sample(mix, sde, shape=(4000, 2), solver="edm_heun", steps=60, grid="karras",
                 S_churn=30.0, S_tmin=0.01, S_tmax=10.0, generator=5, dtype=torch.float64)
    assert_mode_statistics(out.samples, p_at(mix, sde.eps))
