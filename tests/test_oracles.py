"""The Gaussian-mixture oracle: score = grad log_prob, normalisation by quadrature, moments of its
samples, the sigma-space identity between SDEs, Tweedie's formulas, isotropic/diagonal and
image-shaped components, float32/float64, devices, validation, and property-based checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, special

from sde_diffusion import SDE, VESDE, VPSDE, GaussianMixture, SubVPSDE, random_mixture

from helpers import SDES  # noqa: E402

F64 = torch.float64

MIXTURES = {
    "1d": lambda sde=None: random_mixture(dim=1, n_components=3, seed=3, sde=sde),
    "iso2d": lambda sde=None: random_mixture(dim=2, n_components=5, seed=1, sde=sde),
    "diag2d": lambda sde=None: random_mixture(dim=2, n_components=4, seed=2, sde=sde, diagonal=True),
    "image": lambda sde=None: random_mixture(dim=(2, 3, 3), n_components=3, seed=4, sde=sde, diagonal=True),
}
TIMES = [None, 0.0, 0.01, 0.4, 1.0]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PROPERTY = settings(derandomize=True, max_examples=25, deadline=None)


def _scales(sde, t):
    """(alpha, sigma) as floats; t=None is the clean data."""
    if t is None:
        return 1.0, 0.0
    t = torch.tensor(t, dtype=F64)
    return sde.alpha(t).item(), sde.sigma(t).item()


def _reference_log_prob(mix, x, alpha, sigma):
    """numpy/scipy log p_t(x) of the diffused mixture: sum_k w_k N(alpha m_k, alpha^2 s_k^2 + sigma^2)."""
    x = x.detach().cpu().double().numpy().reshape(len(x), -1)
    m = mix.means.numpy().reshape(mix.n_components, -1)
    var = alpha ** 2 * mix.stds.numpy().reshape(mix.n_components, -1) ** 2 + sigma ** 2
    diff = x[:, None, :] - alpha * m[None]
    log_comp = -0.5 * (diff ** 2 / var + np.log(2 * np.pi * var)).sum(-1)
    return special.logsumexp(log_comp + np.log(mix.weights.numpy()), axis=1)


def _samples(mix, n, t, seed=0, dtype=F64):
    return mix.sample(n, t=t, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- score, log-density, normalisation -----------------------------------------------------------

@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("mix_name", list(MIXTURES))
def test_score_is_the_gradient_of_log_prob(mix_name, sde_name):
    mix = MIXTURES[mix_name](SDES[sde_name]())
    for t in TIMES:
        x = _samples(mix, 12, t).requires_grad_(True)
        (grad,) = torch.autograd.grad(mix.log_prob(x, t).sum(), x)
        score = mix.score(x.detach(), t)
        scale = score.abs().max().item()
        torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-12 * scale, msg=f"t={t}")
    # a per-sample (batch,) time tensor
    t = torch.linspace(0.05, 1.0, 12, dtype=F64)
    x = _samples(mix, 12, 0.5).requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(x, t).sum(), x)
    torch.testing.assert_close(mix.score(x.detach(), t), grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("mix_name", ["1d", "iso2d", "diag2d", "image"])
def test_log_prob_matches_an_independent_reference(mix_name, sde_name):
    sde = SDES[sde_name]()
    mix = MIXTURES[mix_name](sde)
    for t in TIMES:
        a, s = _scales(sde, t)
        x = _samples(mix, 20, t)
        np.testing.assert_allclose(mix.log_prob(x, t).numpy(), _reference_log_prob(mix, x, a, s),
                                   rtol=1e-12, atol=1e-12, err_msg=f"t={t}")


def _axis(centre, half_width, step):
    n = int(math.ceil(2 * half_width / step)) + 1
    return np.linspace(centre - half_width, centre + half_width, n)


@pytest.mark.parametrize("sde_name, t", [("vp", None)] + [(name, t) for name in SDES for t in TIMES[2:]])
def test_log_prob_integrates_to_one_in_1d_and_2d(sde_name, t):
    """Trapezoidal quadrature on a grid with steps of half the narrowest std, 10 stds beyond the
    outermost means (for Gaussians the trapezoidal rule's error there is ~exp(-8 pi^2) ~ 1e-34 and
    the truncated tails ~1e-23)."""
    sde = SDES[sde_name]()
    a, s = _scales(sde, t)
    for name in ("1d", "diag2d"):
        mix = MIXTURES[name](sde)
        stds = np.sqrt(a ** 2 * mix.stds.numpy() ** 2 + s ** 2)
        means = a * mix.means.numpy()
        axes = [_axis(means[:, j].mean(), np.ptp(means[:, j]) / 2 + 10 * stds[:, j].max(), stds[:, j].min() / 2)
                for j in range(mix.dim)]
        mesh = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        density = torch.exp(mix.log_prob(torch.from_numpy(mesh.reshape(-1, mix.dim)), t)).numpy()
        density = density.reshape(mesh.shape[:-1])
        for ax in reversed(axes):
            density = integrate.trapezoid(density, ax, axis=-1)
        assert float(density) == pytest.approx(1.0, abs=1e-8), f"{name} t={t}: integral {float(density)!r}"


def test_t_zero_is_the_data_for_vp_types_and_sigma_min_noise_for_ve():
    x = _samples(MIXTURES["iso2d"](), 10, None)
    for name in ("vp", "vp_cosine", "subvp"):
        mix = MIXTURES["iso2d"](SDES[name]())
        torch.testing.assert_close(mix.log_prob(x, 0.0), mix.log_prob(x), rtol=1e-13, atol=0)
        torch.testing.assert_close(mix.score(x, 0.0), mix.score(x), rtol=1e-13, atol=0)
        torch.testing.assert_close(mix.x0(x, 0.0), x, rtol=1e-13, atol=1e-15)
    ve = VESDE(sigma_min=0.05)
    mix = MIXTURES["iso2d"](ve)
    blurred = GaussianMixture(mix.weights, mix.means, torch.sqrt(mix.stds[:, 0] ** 2 + 0.05 ** 2))
    torch.testing.assert_close(mix.log_prob(x, 0.0), blurred.log_prob(x), rtol=1e-13, atol=0)
    assert not torch.allclose(mix.log_prob(x, 0.0), mix.log_prob(x))


# ---- the diffused mixture as a mixture, and the sigma-space identity -------------------------------

@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("mix_name", ["iso2d", "diag2d", "image"])
def test_p_t_is_the_mixture_with_scaled_means_and_inflated_stds(mix_name, sde_name):
    sde = SDES[sde_name]()
    mix = MIXTURES[mix_name](sde)
    for t in (0.05, 0.5, 1.0):
        a, s = _scales(sde, t)
        direct = GaussianMixture(mix.weights, a * mix.means, torch.sqrt(a ** 2 * mix.stds ** 2 + s ** 2))
        x = _samples(mix, 10, t)
        torch.testing.assert_close(mix.log_prob(x, t), direct.log_prob(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mix.score(x, t), direct.score(x), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("sde_name", ["vp", "vp_cosine", "subvp"])
def test_sigma_space_identity_with_a_ve_sde(sde_name):
    """x_t / alpha_t = x0 + (sigma_t / alpha_t) z: the density at t equals the VE density of the
    rescaled variable at the VE time with the same sigma/alpha, times the Jacobian alpha^-d; the
    score rescales by 1/alpha and the denoiser E[x0 | x_t] is the same."""
    sde = SDES[sde_name]()
    ve = VESDE(sigma_min=1e-3, sigma_max=1e3)
    mix, mix_ve = MIXTURES["diag2d"](sde), MIXTURES["diag2d"](ve)
    for t in (0.05, 0.3, 0.6, 0.9):
        a, s = _scales(sde, t)
        t_ve = math.log((s / a) / ve.sigma_min) / math.log(ve.sigma_max / ve.sigma_min)
        assert ve.sigma(torch.tensor(t_ve, dtype=F64)).item() == pytest.approx(s / a, rel=1e-12)
        x = _samples(mix, 16, t)
        y = x / a
        torch.testing.assert_close(mix.log_prob(x, t), mix_ve.log_prob(y, t_ve) - mix.dim * math.log(a),
                                   rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(mix.score(x, t), mix_ve.score(y, t_ve) / a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mix.x0(x, t), mix_ve.x0(y, t_ve), rtol=1e-10, atol=1e-12)
        # and the VE SDE's own time-t' law is the same identity read backwards
        torch.testing.assert_close(mix_ve.eps(y, t_ve), mix.eps(x, t), rtol=1e-9, atol=1e-11)


# ---- Tweedie -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("mix_name", list(MIXTURES))
def test_x0_and_eps_are_tweedie_consistent(mix_name, sde_name):
    sde = SDES[sde_name]()
    mix = MIXTURES[mix_name](sde)
    for t in (0.01, 0.3, 0.7, 1.0):
        a, s = _scales(sde, t)
        x = _samples(mix, 16, t)
        score = mix.score(x, t)
        x0, eps = mix.x0(x, t), mix.eps(x, t)
        torch.testing.assert_close(x0, (x + s ** 2 * score) / a, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(eps, -s * score, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a * x0 + s * eps, x, rtol=1e-10, atol=1e-10)


def test_x0_is_the_posterior_mean_by_monte_carlo():
    """E[x0 | x_t] checked against an importance-weighted average over data samples."""
    sde = VPSDE()
    mix = MIXTURES["1d"](sde)
    t = 0.4
    a, s = _scales(sde, t)
    x0 = _samples(mix, 200_000, None, seed=5)
    x = torch.tensor([[-0.4], [0.0], [0.3]], dtype=F64)
    logw = -0.5 * ((x[:, None, 0] - a * x0[None, :, 0]) / s) ** 2      # (3, n) Gaussian likelihoods
    w = torch.softmax(logw, dim=1)
    mc = (w * x0[None, :, 0]).sum(1)
    ess = 1 / (w ** 2).sum(1)
    se = torch.sqrt((w * (x0[None, :, 0] - mc[:, None]) ** 2).sum(1) / ess)
    assert bool(((mc - mix.x0(x, t)[:, 0]).abs() <= 5 * se).all())


# ---- components, shapes --------------------------------------------------------------------------

def test_isotropic_equals_diagonal_with_repeated_stds():
    sde = VPSDE()
    iso = MIXTURES["iso2d"](sde)
    diag = GaussianMixture(iso.weights, iso.means, iso.stds[:, :1].expand(-1, 2).clone(), sde)
    scalar_std = GaussianMixture([1.0, 2.0], [[0.0, 1.0], [1.0, 0.0]], 0.3, sde)
    assert scalar_std.stds.shape == (2, 2) and bool((scalar_std.stds == 0.3).all())
    for t in (None, 0.5):
        x = _samples(iso, 8, t)
        torch.testing.assert_close(iso.log_prob(x, t), diag.log_prob(x, t), rtol=0, atol=0)
        torch.testing.assert_close(iso.score(x, t), diag.score(x, t), rtol=0, atol=0)
    x = _samples(iso, 8, 0.5)
    torch.testing.assert_close(iso.x0(x, 0.5), diag.x0(x, 0.5), rtol=0, atol=0)


def test_diagonal_components_are_products_of_1d_normals():
    mix = GaussianMixture([1.0], [[0.5, -1.0, 2.0]], [[0.1, 1.0, 3.0]])
    x = torch.randn(5, 3, dtype=F64)
    normal = torch.distributions.Normal(mix.means[0], mix.stds[0])
    torch.testing.assert_close(mix.log_prob(x), normal.log_prob(x).sum(1))
    torch.testing.assert_close(mix.score(x), -(x - mix.means[0]) / mix.stds[0] ** 2)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_image_shaped_means_match_the_flattened_mixture(sde_name):
    sde = SDES[sde_name]()
    img = MIXTURES["image"](sde)
    flat = GaussianMixture(img.weights, img.means.reshape(3, -1), img.stds.reshape(3, -1), sde)
    assert img.event_shape == (2, 3, 3) and img.dim == 18 and img.n_components == 3
    assert img.mean().shape == (2, 3, 3) and img.covariance().shape == (18, 18)
    torch.testing.assert_close(img.mean().flatten(), flat.mean())
    torch.testing.assert_close(img.covariance(), flat.covariance())
    for t in (None, 0.2, 0.8):
        x = _samples(img, 6, t)
        assert x.shape == (6, 2, 3, 3)
        xf = x.reshape(6, -1)
        torch.testing.assert_close(img.log_prob(x, t), flat.log_prob(xf, t), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(img.score(x, t).reshape(6, -1), flat.score(xf, t), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(img.responsibilities(x, t), flat.responsibilities(xf, t))
        if t is not None:
            torch.testing.assert_close(img.x0(x, t).reshape(6, -1), flat.x0(xf, t), rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(img.eps(x, t).reshape(6, -1), flat.eps(xf, t), rtol=1e-13, atol=1e-13)


def test_responsibilities_are_the_component_posteriors():
    mix = MIXTURES["iso2d"](VPSDE())
    x = _samples(mix, 9, 0.3)
    r = mix.responsibilities(x, 0.3)
    assert r.shape == (9, mix.n_components)
    torch.testing.assert_close(r.sum(1), torch.ones(9, dtype=F64))
    a, s = _scales(mix.sde, 0.3)
    comp = [GaussianMixture([1.0], a * mix.means[k:k + 1], torch.sqrt(a ** 2 * mix.stds[k:k + 1] ** 2 + s ** 2))
            for k in range(mix.n_components)]
    joint = torch.stack([c.log_prob(x) for c in comp], 1) + mix.weights.log()
    torch.testing.assert_close(r, torch.softmax(joint, 1))


def test_with_sde_and_descriptors():
    mix = MIXTURES["iso2d"]()
    assert mix.sde is None
    sde = VESDE()
    diffused = mix.with_sde(sde)
    assert diffused.sde is sde and mix.sde is None
    torch.testing.assert_close(diffused.weights, mix.weights)
    torch.testing.assert_close(mix.weights.sum(), torch.tensor(1.0, dtype=F64))
    unnormalised = GaussianMixture([2.0, 6.0], [[0.0], [1.0]], [0.1, 0.2])
    torch.testing.assert_close(unnormalised.weights, torch.tensor([0.25, 0.75], dtype=F64))


# ---- moments of samples --------------------------------------------------------------------------

def test_mean_and_covariance_formulas():
    """Law of total covariance, written independently in numpy."""
    for name in ("iso2d", "diag2d", "image"):
        mix = MIXTURES[name]()
        w = mix.weights.numpy()
        m = mix.means.numpy().reshape(mix.n_components, -1)
        v = mix.stds.numpy().reshape(mix.n_components, -1) ** 2
        mu = (w[:, None] * m).sum(0)
        cov = sum(w[k] * (np.diag(v[k]) + np.outer(m[k] - mu, m[k] - mu)) for k in range(len(w)))
        np.testing.assert_allclose(mix.mean().numpy().reshape(-1), mu, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(mix.covariance().numpy(), cov, rtol=1e-12, atol=1e-14)


def _check_sample_moments(x, mean, cov, what):
    """Sample mean and covariance within 5 standard errors estimated from the sample itself."""
    n = x.shape[0]
    x = x.reshape(n, -1).double()
    mean, cov = mean.reshape(-1), cov
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert bool(((x.mean(0) - mean).abs() <= 5 * se_mean).all()), f"{what}: mean"
    c = x - x.mean(0)
    prods = c[:, :, None] * c[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    err = (prods.mean(0) * n / (n - 1) - cov).abs()
    assert bool((err <= 5 * se_cov + 1e-12).all()), f"{what}: covariance off by {err.max().item():.3g}"


@pytest.mark.parametrize("mix_name", ["iso2d", "diag2d"])
def test_clean_samples_have_the_mixture_moments(mix_name):
    mix = MIXTURES[mix_name]()
    x = _samples(mix, 40_000, None, seed=11)
    _check_sample_moments(x, mix.mean(), mix.covariance(), f"{mix_name} clean")


@pytest.mark.parametrize("sde_name", list(SDES))
def test_diffused_samples_have_the_diffused_moments(sde_name):
    sde = SDES[sde_name]()
    mix = MIXTURES["diag2d"](sde)
    for t in (0.1, 0.6):
        a, s = _scales(sde, t)
        x = _samples(mix, 40_000, t, seed=12)
        cov = a ** 2 * mix.covariance() + s ** 2 * torch.eye(mix.dim, dtype=F64)
        _check_sample_moments(x, a * mix.mean(), cov, f"{sde_name} t={t}")


def test_per_component_samples_and_label_frequencies():
    mix = MIXTURES["diag2d"]()
    n = 40_000
    x, labels = mix.sample(n, generator=torch.Generator().manual_seed(13), dtype=F64, return_labels=True)
    assert labels.shape == (n,) and labels.dtype == torch.long
    for k in range(mix.n_components):
        w = mix.weights[k].item()
        count = int((labels == k).sum())
        assert abs(count / n - w) <= 5 * math.sqrt(w * (1 - w) / n)
        xk = x[labels == k]
        se = mix.stds[k] / math.sqrt(count)
        assert bool(((xk.mean(0) - mix.means[k]).abs() <= 5 * se).all())
        se_std = mix.stds[k] / math.sqrt(2 * (count - 1))
        assert bool(((xk.std(0) - mix.stds[k]).abs() <= 5 * se_std).all())


def test_sampling_is_seeded_and_typed():
    mix = MIXTURES["iso2d"](VPSDE())
    a, la = mix.sample(50, t=0.3, generator=torch.Generator().manual_seed(1), return_labels=True)
    b, lb = mix.sample(50, t=0.3, generator=torch.Generator().manual_seed(1), return_labels=True)
    c = mix.sample(50, t=0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.dtype == torch.float32
    assert mix.sample(3, dtype=F64).dtype == F64
    # per-sample times
    t = torch.tensor([0.0, 1.0], dtype=F64)
    assert mix.sample(2, t=t, generator=torch.Generator().manual_seed(0)).shape == (2, 2)


# ---- dtypes and devices --------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_dtype_and_device_follow_the_input(sde_name, dtype, device):
    sde = SDES[sde_name]()
    mix = MIXTURES["image"](sde)
    x64 = _samples(mix, 5, 0.5)
    x = x64.to(device=device, dtype=dtype)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=dtype, device=device)
    tol = dict(rtol=2e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for fn in (mix.log_prob, mix.score, mix.x0, mix.eps, mix.responsibilities):
        for tt in (t, 0.5):
            out = fn(x, tt)
            assert out.dtype == dtype and out.device.type == device, fn.__name__
            ref = fn(x64, tt if isinstance(tt, float) else tt.cpu().double())
            if fn is mix.log_prob:
                tol_here = dict(rtol=tol["rtol"], atol=tol["atol"] * 100)
            else:
                tol_here = dict(rtol=tol["rtol"], atol=tol["atol"] * (1 + ref.abs().max().item()))
            torch.testing.assert_close(out.cpu().double(), ref, **tol_here)
    assert mix.log_prob(x).device.type == device
    gen = torch.Generator(device=device).manual_seed(0)
    s = mix.sample(4, t=0.2, generator=gen, dtype=dtype)
    assert s.device.type == device and s.dtype == dtype and s.shape == (4, 2, 3, 3)
    assert mix.sample(4, device=device).device.type == device


def test_float64_agrees_to_1e12_and_float32_to_1e5():
    sde = VPSDE()
    mix = MIXTURES["diag2d"](sde)
    x = _samples(mix, 50, 0.3)
    ref = _reference_log_prob(mix, x, *_scales(sde, 0.3))
    np.testing.assert_allclose(mix.log_prob(x, 0.3).numpy(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mix.log_prob(x.float(), 0.3).double().numpy(), ref, rtol=1e-5, atol=1e-5)


# ---- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, match", [
    (([1.0, -0.5], [[0.0], [1.0]], [0.1, 0.1]), r"weights must be finite, >= 0 and not all zero, got \[1\.0, -0\.5\]"),
    (([0.0, 0.0], [[0.0], [1.0]], [0.1, 0.1]), r"weights .*got \[0\.0, 0\.0\]"),
    (([1.0, math.nan], [[0.0], [1.0]], [0.1, 0.1]), r"weights .*got \[1\.0, nan\]"),
    (([], torch.zeros(0, 2), []), r"weights must hold at least one component"),
    (([1.0, 1.0], [[0.0], [1.0], [2.0]], [0.1, 0.1]), r"means must have shape \(K=2, \*event_shape\), got \(3, 1\)"),
    (([1.0, 1.0], [0.0, 1.0], [0.1, 0.1]), r"means must have shape \(K=2, \*event_shape\), got \(2,\)"),
    (([1.0, 1.0], [[0.0], [math.inf]], [0.1, 0.1]), r"means must be finite, got inf"),
    (([1.0, 1.0], [[0.0, 0.0], [1.0, 1.0]], [0.1, 0.1, 0.1]), r"stds must have shape \(K=2,\) or \(2, 2\), got \(3,\)"),
    (([1.0, 1.0], [[0.0, 0.0], [1.0, 1.0]], [[0.1, 0.1, 0.1]] * 2), r"stds must have shape .*got \(2, 3\)"),
    (([1.0, 1.0], [[0.0], [1.0]], [0.1, -0.2]), r"stds must be finite and > 0, got min -0\.2"),
    (([1.0, 1.0], [[0.0], [1.0]], [0.1, 0.0]), r"stds .*got min 0\.0"),
    (([1.0, 1.0], [[0.0], [1.0]], [0.1, math.nan]), r"stds .*got min nan"),
])
def test_bad_mixture_arguments_name_the_value(args, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(*args)


def test_bad_calls_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match=r"sde must be an SDE instance, got 'vp'"):
        GaussianMixture([1.0], [[0.0]], [1.0], sde="vp")
    mix = MIXTURES["iso2d"]()
    with pytest.raises(ValueError, match=r"this mixture has no SDE"):
        mix.log_prob(torch.zeros(2, 2), 0.5)
    mix = MIXTURES["iso2d"](VPSDE())
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 2\), got \(4, 3\)"):
        mix.score(torch.zeros(4, 3), 0.5)
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor, got Tensor"):
        mix.log_prob(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor, got ndarray"):
        mix.log_prob(np.zeros((4, 2)))
    for bad, shown in ((1.5, r"1\.5"), (-0.2, r"-0\.2"), (math.nan, "nan")):
        for fn in (mix.log_prob, mix.score, mix.x0, mix.eps):
            with pytest.raises(ValueError, match=rf"t must lie in \[0, T=1\.0\], got {shown}"):
                fn(torch.zeros(3, 2), bad)
        with pytest.raises(ValueError, match=rf"got {shown}"):
            mix.sample(3, t=bad)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        mix.sample(0)
    with pytest.raises(ValueError, match=r"n_components must be >= 1, got 0"):
        random_mixture(n_components=0)
    with pytest.raises(ValueError, match=r"std_range must satisfy 0 < low <= high, got \(0\.3, 0\.1\)"):
        random_mixture(std_range=(0.3, 0.1))


def test_random_mixture_is_reproducible():
    a, b, c = random_mixture(seed=7), random_mixture(seed=7), random_mixture(seed=8)
    assert torch.equal(a.means, b.means) and torch.equal(a.stds, b.stds) and not torch.equal(a.means, c.means)
    assert bool((a.means.abs() <= 0.6).all()) and bool(((a.stds >= 0.05) & (a.stds <= 0.2)).all())
    assert random_mixture(dim=3, diagonal=True).stds.shape == (8, 3)


# ---- property-based checks -----------------------------------------------------------------------

@st.composite
def random_sdes(draw) -> SDE:
    kind = draw(st.sampled_from(["vp", "vp_cosine", "subvp", "ve"]))
    if kind == "ve":
        smin = draw(st.floats(1e-3, 0.5))
        return VESDE(sigma_min=smin, sigma_max=smin * draw(st.floats(2.0, 1e4)))
    b0 = draw(st.floats(0.0, 2.0))
    b1 = b0 + draw(st.floats(0.5, 25.0))
    if kind == "vp_cosine":
        return VPSDE(schedule="cosine", cosine_s=draw(st.floats(1e-3, 0.05)))
    return (VPSDE if kind == "vp" else SubVPSDE)(b0, b1)


@PROPERTY
@given(sde=random_sdes(), event=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
       k=st.integers(1, 4), batch=st.integers(1, 5), diagonal=st.booleans(), seed=st.integers(0, 2 ** 16),
       t=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_property_oracle_identities(sde, event, k, batch, diagonal, seed, t):
    mix = random_mixture(dim=event, n_components=k, seed=seed, sde=sde, diagonal=diagonal)
    x = _samples(mix, batch, t, seed=seed).requires_grad_(True)
    logp = mix.log_prob(x, t)
    assert logp.shape == (batch,) and logp.dtype == F64
    (grad,) = torch.autograd.grad(logp.sum(), x)
    x = x.detach()
    score = mix.score(x, t)
    assert score.shape == x.shape
    torch.testing.assert_close(score, grad, rtol=1e-9, atol=1e-10 * (1 + score.abs().max().item()))
    np.testing.assert_allclose(logp.detach().numpy(), _reference_log_prob(mix, x, *_scales(sde, t)),
                               rtol=1e-11, atol=1e-10)
    if t is not None:
        a, s = _scales(sde, t)
        torch.testing.assert_close(mix.eps(x, t), -s * score, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(mix.x0(x, t) * a, x + s ** 2 * score, rtol=1e-8, atol=1e-10)
