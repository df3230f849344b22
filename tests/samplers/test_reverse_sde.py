"""Reverse-SDE predictors (Euler–Maruyama, reverse diffusion, ancestral) and every stochastic
sampler's statistics: each step's update rule against its formula, and the samples' mode weights,
per-mode means and variances against the mixture at t = eps, within statistical tolerance."""
import math

import pytest
import torch

from sde_diffusion import GaussianMixture, VESDE, VPSDE, SubVPSDE, sample
from sde_diffusion.metrics import mode_statistics
from sde_diffusion.samplers.reference import mixture_at

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
MEANS = torch.tensor([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]], dtype=torch.float64)
STDS = torch.tensor([0.06, 0.08, 0.1, 0.07], dtype=torch.float64)


def separated_mixture(sde):
    """Four well separated modes (unequal weights and widths): hard assignment of samples to
    modes is then unbiased (misassignment below 1e-6)."""
    return GaussianMixture(WEIGHTS, MEANS, STDS, sde)


def z_scores(samples: torch.Tensor, target: GaussianMixture) -> dict:
    """Standardised errors of the mode statistics of ``samples`` against ``target``, each divided
    by its standard error at this sample size: weights (binomial), per-mode means per coordinate
    (``sqrt(var / n_k)``) and per-mode variance ratios averaged over the D coordinates
    (``sqrt(2 / (D (n_k - 1)))``)."""
    n, d = samples.shape[0], samples[0].numel()
    st = mode_statistics(samples.double(), target)
    w0 = st["true_weights"]
    z_w = (st["weights"] - w0) / torch.sqrt(w0 * (1 - w0) / n)
    z_m = (st["means"] - st["true_means"]) / torch.sqrt(st["true_variances"] / st["counts"][:, None])
    z_v = (st["variance_ratio"] - 1) / torch.sqrt(2 / (d * (st["counts"] - 1)))
    return {"weights": float(z_w.abs().max()), "means": float(z_m.abs().max()),
            "variances": float(z_v.abs().max()), "variance_ratio": st["variance_ratio"].tolist()}


N_SAMPLES, STEPS, Z = 3000, 200, 5.0

STOCHASTIC = [
    ("vp", "euler_maruyama", {}), ("vp", "reverse_diffusion", {}), ("vp", "ancestral", {}),
    ("vp", "ddim", {"eta": 1.0}), ("vp", "pc", {}), ("vp", "pc", {"corrector": "annealed_langevin"}),
    ("subvp", "euler_maruyama", {}), ("subvp", "reverse_diffusion", {}), ("subvp", "ddim", {"eta": 1.0}),
    ("subvp", "pc", {}),
    ("ve", "euler_maruyama", {}), ("ve", "reverse_diffusion", {}), ("ve", "ancestral", {}),
    ("ve", "pc", {}),
]


@pytest.mark.parametrize("name, solver, options", STOCHASTIC,
                         ids=[f"{n}-{s}-{'-'.join(map(str, o.values()))}" for n, s, o in STOCHASTIC])
def test_stochastic_samplers_reproduce_the_mixture(name, solver, options):
    """3000 samples, 200 log-SNR steps: every statistic within Z = 5 standard errors (at this size
    about 25% on the smallest mode's variance, 5% on its weight; the discretisation bias at 200
    steps, measured with 20000 samples, is at most about 11% on a variance: first-order
    reverse diffusion on sub-VP)."""
    sde = SDES[name]()
    mix = separated_mixture(sde)
    result = sample(mix, shape=(N_SAMPLES, 2), solver=solver, steps=STEPS, grid="logsnr",
                    generator=0, **options)
    z = z_scores(result.samples, mixture_at(mix, sde.eps))
    assert max(z["weights"], z["means"], z["variances"]) < Z, z


def test_z_scores_detect_a_wrong_variance():
    """The statistics test has power: exact samples pass, samples 20% too wide do not."""
    target = mixture_at(separated_mixture(VPSDE()), 1e-3)
    x, labels = target.sample(N_SAMPLES, generator=torch.Generator().manual_seed(0), return_labels=True,
                              dtype=torch.float64)
    z = z_scores(x, target)
    assert max(z["weights"], z["means"], z["variances"]) < 4
    wide = target.means[labels] + 1.2 * (x - target.means[labels])
    assert z_scores(wide, target)["variances"] > Z


# ---- single steps against their formulas ----------------------------------------------------------
def _one_step(sde, solver, x, t0, t1, seed, **options):
    mix = separated_mixture(sde)
    result = sample(mix, x_T=x, solver=solver, grid=torch.tensor([t0, t1], dtype=torch.float64),
                    generator=torch.Generator().manual_seed(seed), **options)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    t = torch.full((x.shape[0],), t0, dtype=x.dtype)
    return mix, result.samples, z, mix.score(x, t)


def _f64(t):
    return torch.tensor(t, dtype=torch.float64)


def _coefficients(sde, t0, t1):
    a, s = float(sde.alpha(_f64(t0))), float(sde.sigma(_f64(t0)))
    a1, s1 = float(sde.alpha(_f64(t1))), float(sde.sigma(_f64(t1)))
    r = a / a1
    return a, s, a1, s1, r, s * s - r * r * s1 * s1


X = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("name", sorted(SDES))
def test_euler_maruyama_step(name):
    sde = SDES[name]()
    t0, t1 = 0.6, 0.45
    _, out, z, s = _one_step(sde, "euler_maruyama", X, t0, t1, seed=3)
    f, g2 = (float(v) for v in sde.f_g2(_f64(t0)))
    h = t0 - t1
    expected = X - (f * X - g2 * s) * h + math.sqrt(g2 * h) * z
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SDES))
def test_reverse_diffusion_step(name):
    """x' = x - f_i(x) + G^2 s + G z with the forward transition between the two grid times
    ([SDE] eq. 46)."""
    sde = SDES[name]()
    t0, t1 = 0.6, 0.45
    _, out, z, s = _one_step(sde, "reverse_diffusion", X, t0, t1, seed=4)
    *_, r, G2 = _coefficients(sde, t0, t1)
    expected = X - (r - 1) * X + G2 * s + math.sqrt(G2) * z
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    if name == "vp":            # score_sde's VP form: (2 - sqrt(1 - beta)) x + beta s + sqrt(beta) z
        beta = 1 - r * r
        torch.testing.assert_close(out, (2 - math.sqrt(1 - beta)) * X + beta * s + math.sqrt(beta) * z)
    if name == "ve":            # SMLD: x + (sigma^2 - sigma'^2) s + sqrt(sigma^2 - sigma'^2) z
        d = float(sde.sigma(_f64(t0))) ** 2 - float(sde.sigma(_f64(t1))) ** 2
        torch.testing.assert_close(out, X + d * s + math.sqrt(d) * z)


def test_ancestral_steps():
    t0, t1 = 0.6, 0.45
    sde = VPSDE()          # DDPM (Ho et al. eq. 11, sigma_t^2 = beta_t)
    _, out, z, s = _one_step(sde, "ancestral", X, t0, t1, seed=5)
    beta = 1 - (float(sde.alpha(_f64(t0))) / float(sde.alpha(_f64(t1)))) ** 2
    expected = (X + beta * s) / math.sqrt(1 - beta) + math.sqrt(beta) * z
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    sde = VESDE()          # SMLD
    _, out, z, s = _one_step(sde, "ancestral", X * 20, t0, t1, seed=6)
    s0, s1 = float(sde.sigma(_f64(t0))), float(sde.sigma(_f64(t1)))
    expected = X * 20 + (s0 ** 2 - s1 ** 2) * s + math.sqrt(s1 ** 2 * (s0 ** 2 - s1 ** 2) / s0 ** 2) * z
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_ancestral_on_sub_vp_points_to_ddim():
    mix = separated_mixture(SubVPSDE())
    with pytest.raises(ValueError, match=r"solver='ddim' with eta=1"):
        sample(mix, shape=(2, 2), solver="ancestral", steps=3)
    with pytest.raises(ValueError, match="ancestral sampling is defined for"):
        sample(mix, shape=(2, 2), solver="pc", predictor="ancestral", steps=3)


def test_ve_ancestral_is_ddim_with_eta_one():
    """For VE, SMLD ancestral sampling is the exact posterior step, i.e. DDIM with eta = 1."""
    mix = separated_mixture(VESDE())
    kw = dict(shape=(6, 2), steps=30, grid="logsnr", generator=2, dtype=torch.float64)
    a = sample(mix, solver="ancestral", **kw).samples
    b = sample(mix, solver="ddim", eta=1.0, **kw).samples
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_vp_cosine_schedule_is_ancestral_too():
    mix = separated_mixture(VPSDE(schedule="cosine"))
    result = sample(mix, shape=(4, 2), solver="ancestral", steps=10, generator=0)
    assert bool(torch.isfinite(result.samples).all())
