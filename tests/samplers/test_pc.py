"""The predictor-corrector sampler: without a corrector it is its predictor exactly; the
corrector steps follow their step-size rules; options, NFE and errors. (Its samples' statistics are
tested with the other stochastic samplers in test_reverse_sde.py.)"""
import math

import pytest
import torch

from sde_diffusion import VESDE, VPSDE, SubVPSDE, random_mixture, sample

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
PREDICTORS = [("euler_maruyama", {}), ("reverse_diffusion", {}), ("ancestral", {}),
              ("ddim", {"eta": 0.0}), ("ddim", {"eta": 0.5})]


@pytest.mark.parametrize("predictor, options", PREDICTORS)
@pytest.mark.parametrize("name", sorted(SDES))
def test_pc_without_corrector_is_its_predictor(name, predictor, options):
    if predictor == "ancestral" and name == "subvp":
        pytest.skip("no ancestral chain for sub-VP")
    sde = SDES[name]()
    mix = random_mixture(2, 4, sde=sde)
    kw = dict(shape=(6, 2), steps=12, grid="logsnr", dtype=torch.float64)
    alone = sample(mix, solver=predictor, generator=3, **kw, **options)
    for extra in ({"corrector": "none"}, {"corrector": "langevin", "n_steps": 0}):
        pc = sample(mix, solver="pc", predictor=predictor, generator=3, **kw, **extra, **options)
        assert torch.equal(pc.samples, alone.samples)
        assert pc.nfe == alone.nfe == 12


def _single_corrector_step(corrector, sde, x, seed, **options):
    """PC with no predictor on the grid [0.5, t1]: exactly one corrector step at t1."""
    mix = random_mixture(2, 4, sde=sde)
    t1 = 0.3
    out = sample(mix, x_T=x, solver="pc", predictor="none", corrector=corrector, n_steps=1,
                 grid=torch.tensor([0.5, t1], dtype=torch.float64), generator=torch.Generator().manual_seed(seed), **options)
    assert out.nfe == 1
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    t = torch.full((x.shape[0],), t1, dtype=x.dtype)
    f, _ = sde.f_g2(t)
    a_i = math.exp(2 * float(f[0]) * sde.T / sde.N)
    return out.samples, z, mix.score(x, t), a_i, float(sde.sigma(t)[0])


@pytest.mark.parametrize("name", sorted(SDES))
def test_langevin_step_size_rule(name):
    """[SDE] Alg. 4/5: eps = 2 a_i (snr ||z|| / ||s||)^2, x' = x + eps s + sqrt(2 eps) z; a_i is
    1 - beta_i of the N-step chain for VP and sub-VP (exp(2 f T / N)), 1 for VE."""
    sde = SDES[name]()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    snr = 0.2
    for snr_norm in ("batch", "sample"):
        out, z, s, a_i, _ = _single_corrector_step("langevin", sde, x, 5, snr=snr, snr_norm=snr_norm)
        zn, sn = z.norm(dim=1), s.norm(dim=1)
        if snr_norm == "batch":
            zn, sn = zn.mean(), sn.mean()
        step = (2 * a_i * (snr * zn / sn) ** 2).reshape(-1, 1)
        torch.testing.assert_close(out, x + step * s + torch.sqrt(2 * step) * z, rtol=1e-10, atol=1e-12)
    if name == "vp":
        t = torch.tensor(0.3, dtype=torch.float64)
        assert math.isclose(a_i, 1 - float(sde.beta(t)) / sde.N, rel_tol=1e-4)
    if name == "ve":
        assert a_i == 1.0


@pytest.mark.parametrize("name", sorted(SDES))
def test_annealed_langevin_step_size_rule(name):
    """score_sde's AnnealedLangevinDynamics: eps = 2 a_i (snr sigma(t))^2."""
    sde = SDES[name]()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, z, s, a_i, sigma = _single_corrector_step("annealed_langevin", sde, x, 6, snr=0.1)
    step = 2 * a_i * (0.1 * sigma) ** 2
    torch.testing.assert_close(out, x + step * s + math.sqrt(2 * step) * z, rtol=1e-10, atol=1e-12)


def test_corrector_only_and_nfe():
    mix = random_mixture(2, 4, sde=VPSDE())
    r = sample(mix, shape=(4, 2), solver="pc", predictor="none", n_steps=3, steps=5, generator=0)
    assert r.nfe == 15 and bool(torch.isfinite(r.samples).all())
    r = sample(mix, shape=(4, 2), solver="pc", n_steps=2, steps=5, generator=0)
    assert r.nfe == 15
    r = sample(mix, shape=(4, 2), solver="pc", corrector="annealed_langevin", steps=5, generator=0)
    assert r.nfe == 10


def test_the_corrector_moves_towards_p_t():
    """At a fixed time, repeated corrector steps take far-off samples into the bulk of p_t."""
    sde = VPSDE()
    mix = random_mixture(2, 4, sde=sde)
    t1 = 0.5
    x = torch.full((200, 2), 3.0, dtype=torch.float64)
    for corrector in ("langevin", "annealed_langevin"):
        out = sample(mix, x_T=x, solver="pc", predictor="none", corrector=corrector, n_steps=100,
                     snr=0.3, grid=torch.tensor([0.6, t1], dtype=torch.float64), generator=0).samples
        before = float(mix.log_prob(x, t1).mean())
        after = float(mix.log_prob(out, t1).mean())
        exact = float(mix.log_prob(mix.sample(2000, t1, generator=torch.Generator().manual_seed(0),
                                              dtype=torch.float64), t1).mean())
        assert after > before + 3 and abs(after - exact) < 0.5, (corrector, before, after, exact)


def test_pc_options_are_checked():
    mix = random_mixture(2, 4, sde=VPSDE())
    kw = dict(shape=(2, 2), solver="pc", steps=3)
    # the valid predictors are the registry's one-step solvers (score_sde's, DDIM and more), and none
    with pytest.raises(ValueError, match="unknown predictor 'heun'; valid predictors: ") as info:
        sample(mix, predictor="heun", **kw)
    valid = str(info.value).split("valid predictors: ")[1].split(", ")
    assert {"euler_maruyama", "reverse_diffusion", "ancestral", "ddim"} <= set(valid)
    assert valid[-1] == "none"
    with pytest.raises(ValueError, match="eta=0.5 is an option of the predictor 'ddim', not of "
                                         "predictor 'reverse_diffusion'"):
        sample(mix, eta=0.5, **kw)
    with pytest.raises(ValueError, match="unknown corrector 'mala'; valid correctors: none, langevin, "
                                         "annealed_langevin"):
        sample(mix, corrector="mala", **kw)
    with pytest.raises(ValueError, match="does nothing"):
        sample(mix, predictor="none", corrector="none", **kw)
    with pytest.raises(ValueError, match="snr must be a finite number > 0"):
        sample(mix, snr=0.0, **kw)
    with pytest.raises(ValueError, match="n_steps must be an integer >= 0"):
        sample(mix, n_steps=1.5, **kw)
    with pytest.raises(ValueError, match="snr_norm must be one of batch, sample"):
        sample(mix, snr_norm="median", **kw)
    with pytest.raises(ValueError, match="eta must lie in"):
        sample(mix, predictor="ddim", eta=2.0, **kw)
