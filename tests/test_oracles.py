"""The Gaussian-mixture oracle: score = grad log_prob, normalisation by quadrature, moments of its
samples, the sigma-space identity between SDEs, Tweedie's formulas, isotropic/diagonal/full and
image-shaped components, float32/float64, devices, validation, and property-based checks. The fast
paths (issue 16) against the per-component reference implementation they replaced, each other,
chunking, shared-time detection, and (on a GPU) their memory."""
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
    "full3d": lambda sde=None: random_mixture(dim=3, n_components=4, seed=5, sde=sde, full=True),
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


# ---- the fast paths (issue 16) against the reference implementation they replaced ----------------

def _reference(mix, x, t, what):
    """The per-component implementation before issue 16, kept as the reference: ``(batch, K, dim)``
    differences and variances for isotropic/diagonal components; full covariances by a dense
    Cholesky solve per sample and component. float64 throughout."""
    x = x.double()
    B, K = x.shape[0], mix.n_components
    xf = x.reshape(B, -1)
    if t is None:
        a, s = torch.ones(B, dtype=F64), torch.zeros(B, dtype=F64)
    else:
        _, log_a, log_s = mix.sde.log_scales(mix.sde.time(t, x).double())
        a, s = log_a.exp(), log_s.exp()
    a, s = a[:, None, None], s[:, None, None]
    m = mix.means.reshape(K, -1)
    diff = xf[:, None, :] - a * m[None]                                  # (B, K, D)
    if getattr(mix, "covariances", None) is None:
        var0 = mix.stds.reshape(K, -1) ** 2
        var = a * a * var0 + s * s
        log_norm = -0.5 * ((diff * diff / var).sum(2) + torch.log(2 * math.pi * var).sum(2))
        prec_diff = diff / var
        post = m + a * var0 / var * diff
    else:
        eye = torch.eye(xf.shape[1], dtype=F64)
        cov = (a * a)[..., None] * mix.covariances + (s * s)[..., None] * eye   # (B, K, D, D)
        L = torch.linalg.cholesky(cov)
        prec_diff = torch.cholesky_solve(diff[..., None], L)[..., 0]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=2, dim2=3)).sum(2)
        log_norm = -0.5 * ((diff * prec_diff).sum(2) + logdet + xf.shape[1] * math.log(2 * math.pi))
        post = m + a * torch.einsum("kde,bke->bkd", mix.covariances, prec_diff)
    log_joint = log_norm + mix.weights.log()
    r = torch.softmax(log_joint, dim=1)
    if what == "log_prob":
        return torch.logsumexp(log_joint, dim=1)
    if what == "responsibilities":
        return r
    score = -(r[:, :, None] * prec_diff).sum(1)
    out = {"score": score, "x0": (r[:, :, None] * post).sum(1), "eps": -s[:, 0] * score}[what]
    return out.reshape(x.shape)


METHODS = ("log_prob", "responsibilities", "score", "x0", "eps")


def _times_to_check(n):
    """Shared times as numbers, a 0-d tensor, a full (batch,) tensor, an expanded one; per-sample times."""
    return [None, 0.0, 0.01, 0.4, 1.0, torch.tensor(0.3, dtype=F64), torch.full((n,), 0.7, dtype=F64),
            torch.tensor(0.2, dtype=F64).expand(n), torch.linspace(0.0, 1.0, n, dtype=F64)]


def _check_against(mix, ref_mix, x, t, rtol=1e-12, what=METHODS):
    for fn in what:
        if t is None and fn in ("x0", "eps"):
            continue
        got, ref = getattr(mix, fn)(x, t), _reference(ref_mix, x, t, fn)
        assert got.shape == ref.shape and got.dtype == x.dtype, fn
        scale = ref.abs().max().item() + 1e-300
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * scale, msg=f"{fn} t={t}")


MIXTURES_64 = {
    "iso64": lambda sde: random_mixture(dim=64, n_components=8, seed=6, sde=sde),
    "diag64": lambda sde: random_mixture(dim=64, n_components=8, seed=7, sde=sde, diagonal=True),
    "full16": lambda sde: random_mixture(dim=16, n_components=5, seed=8, sde=sde, full=True),
}


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("mix_name", list(MIXTURES) + list(MIXTURES_64))
def test_every_path_equals_the_reference_implementation(mix_name, sde_name):
    """Isotropic, diagonal and full components, shared and per-sample times, VE's sigma_min at t=0:
    float64 round-off from the per-component formulas (the expanded distances included)."""
    sde = SDES[sde_name]()
    mix = (MIXTURES.get(mix_name) or MIXTURES_64[mix_name])(sde)
    n = 96 if mix_name == "full16" else 24   # >= K dim: full's precision form for the score
    x = _samples(mix, n, 0.5, seed=3)
    for t in _times_to_check(n):
        _check_against(mix, mix, x, t)
    # points far out in the tails, where one component dominates
    _check_against(mix, mix, 3 * x, 0.05)
    # a batch smaller than K dim: full components' score through the eigenbases
    for t in (0.4, None):
        _check_against(mix, mix, x[:2], t)


def test_tiny_alpha_keeps_the_denoiser_exact():
    """With alpha(1) ~ 1e-11 the denoiser must not divide by alpha (x0 = (x + sigma^2 score) / alpha
    loses all digits there); the per-component posterior means stay exact."""
    sde = VPSDE(beta_max=100.0)
    assert sde.alpha(torch.tensor(1.0, dtype=F64)).item() < 1e-10
    for name in ("iso2d", "diag2d", "full3d"):
        mix = MIXTURES[name](sde)
        x = _samples(mix, 16, 1.0, seed=4)
        for t in (1.0, torch.linspace(0.9, 1.0, 16, dtype=F64)):
            _check_against(mix, mix, x, t, what=("x0", "score", "eps"))
        # and E[x0 | x_1] is then the prior mean, to ~alpha
        torch.testing.assert_close(mix.x0(x, 1.0), mix.mean().expand_as(x), rtol=0, atol=1e-9)


def test_each_path_agrees_with_the_others():
    """One isotropic mixture through the isotropic, diagonal (forced), per-sample and full paths,
    and a diagonal one as full components with diagonal covariances."""
    sde = VPSDE()
    iso = MIXTURES["iso2d"](sde)
    diag = MIXTURES["diag2d"](sde)
    forced = iso.with_sde(sde)
    forced._kind = "diagonal"
    as_full = [GaussianMixture(m.weights, m.means, sde=sde, covariances=torch.diag_embed(m.stds ** 2))
               for m in (iso, diag)]
    assert iso.kind == "isotropic" and diag.kind == "diagonal" and as_full[0].kind == "full"
    x = _samples(iso, 30, 0.3, seed=5)
    for t in (None, 0.3, torch.linspace(0.05, 1.0, 30, dtype=F64)):
        for fn in METHODS:
            if t is None and fn in ("x0", "eps"):
                continue
            ref = getattr(iso, fn)(x, t)
            tol = dict(rtol=1e-12, atol=1e-12 * ref.abs().max().item())
            torch.testing.assert_close(getattr(forced, fn)(x, t), ref, **tol)
            torch.testing.assert_close(getattr(as_full[0], fn)(x, t), ref, **tol)
            ref = getattr(diag, fn)(x, t)
            tol = dict(rtol=1e-12, atol=1e-12 * ref.abs().max().item())
            torch.testing.assert_close(getattr(as_full[1], fn)(x, t), ref, **tol)


@pytest.mark.parametrize("mix_name", ["iso2d", "diag2d", "full3d"])
def test_chunks_give_the_one_chunk_answer(mix_name, monkeypatch):
    """Chunked evaluation (rows of a float32 batch upcast, chunks of the per-component paths) equals
    the unchunked one."""
    import sde_diffusion.oracles as oracles

    mix = MIXTURES[mix_name](VPSDE())
    x = _samples(mix, 50, 0.3, seed=6)
    per_sample = torch.linspace(0.05, 1.0, 50, dtype=F64)
    whole = {(fn, i, dt): getattr(mix, fn)(x.to(dt), t)
             for fn in METHODS for i, t in enumerate((0.3, per_sample)) for dt in (F64, torch.float32)}
    monkeypatch.setattr(oracles, "_MIN_CHUNK", 8)
    monkeypatch.setattr(oracles, "_MIN_ROWS", 1)
    for (fn, i, dt), ref in whole.items():
        got = getattr(mix, fn)(x.to(dt), (0.3, per_sample)[i])
        if dt == F64:
            tol = dict(rtol=1e-12, atol=1e-12 * ref.abs().max().item())
        elif mix.kind == "isotropic" or (mix.kind == "diagonal" and i == 0):    # float64 inside
            tol = dict(rtol=2e-7, atol=0)
        else:                                     # float32 arithmetic, summed in another order
            tol = dict(rtol=1e-5, atol=1e-6 * ref.abs().max().item())
        torch.testing.assert_close(got, ref, **tol, msg=f"{fn} {i} {dt}")


@pytest.mark.parametrize("mix_name", ["iso2d", "diag2d", "image"])
def test_float32_gets_the_float64_answer_rounded_once(mix_name):
    """Isotropic and diagonal components compute a float32 input in float64: the expanded distances
    ``||x||^2 - 2 alpha x.m + alpha^2 ||m||^2`` in float32 would lose ~||x||^2 / ||x - alpha m||^2 in
    relative accuracy (10x at small t), more than the per-component differences did."""
    sde = VESDE()
    mix = MIXTURES[mix_name](sde)
    for t in (None, 0.01, 0.3):
        x32 = _samples(mix, 200, t, seed=7, dtype=torch.float32)
        for fn in METHODS:
            if t is None and fn in ("x0", "eps"):
                continue
            t32 = None if t is None else float(torch.tensor(t, dtype=torch.float32))   # as x32 rounds it
            got, ref = getattr(mix, fn)(x32, t), getattr(mix, fn)(x32.double(), t32)
            assert got.dtype == torch.float32
            # one rounding of a float64 value: within 2^-24 relative, elementwise
            torch.testing.assert_close(got.double(), ref, rtol=2 ** -23, atol=1e-13 * ref.abs().max().item(),
                                       msg=f"{fn} t={t}")


class _RecordingVP(VPSDE):
    """A VP SDE that records the shapes of the times its alpha is evaluated at."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def _log_alpha(self, t):
        self.shapes.append(tuple(t.shape))
        return super()._log_alpha(t)


def test_a_shared_time_is_detected_and_its_scalars_computed_once():
    """alpha and sigma of a shared time are computed once, on a 0-d tensor (and cached per time
    value: a second call at the same time computes nothing); per-sample times once per sample."""
    from sde_diffusion.models import OracleModel

    sde = _RecordingVP()
    mix = MIXTURES["diag2d"](sde)
    x = _samples(mix, 16, 0.3, seed=8)
    shared = {0.3: 0.3, 0.35: torch.tensor(0.35, dtype=F64), 0.4: torch.full((16,), 0.4, dtype=F64),
              0.45: torch.tensor(0.45, dtype=F64).expand(16)}
    for value, t in shared.items():
        sde.shapes.clear()
        out = mix.score(x, t)
        assert sde.shapes == [()], (t, sde.shapes)
        sde.shapes.clear()
        torch.testing.assert_close(mix.score(x, value), out, rtol=0, atol=0)
        assert sde.shapes == [], (t, sde.shapes)                 # the cached time
    sde.shapes.clear()
    OracleModel(mix).eps(x, 0.5)                  # the wrapper's validated, expanded time
    assert sde.shapes == [()]
    sde.shapes.clear()
    mix.score(x, torch.linspace(0.1, 0.9, 16, dtype=F64))
    assert sde.shapes == [(16,)]
    # another SDE: nothing cached carries over
    ve = mix.with_sde(VESDE())
    fresh = GaussianMixture(mix.weights, mix.means, mix.stds, VESDE())
    torch.testing.assert_close(ve.score(x, 0.3), fresh.score(x, 0.3), rtol=0, atol=0)
    assert not torch.allclose(ve.score(x, 0.3), mix.score(x, 0.3))


@pytest.mark.parametrize("mix_name", ["iso2d", "diag2d", "full3d"])
def test_the_score_is_differentiable_like_the_reference(mix_name):
    """The exact divergence of likelihood.py differentiates the score: its Jacobian equals the
    reference implementation's (and is symmetric, a Hessian)."""
    mix = MIXTURES[mix_name](SubVPSDE())
    x = _samples(mix, 4, 0.4, seed=9)
    for t in (0.4, torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=F64)):
        for fn in ("score", "x0", "eps"):
            jac = torch.autograd.functional.jacobian(lambda y: getattr(mix, fn)(y, t).sum(0), x)
            ref = torch.autograd.functional.jacobian(lambda y: _reference(mix, y, t, fn).sum(0), x)
            torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())
        jac = torch.autograd.functional.jacobian(lambda y: mix.score(y, t).sum(0), x)   # (D, B, D)
        hess = jac.permute(1, 0, 2)
        torch.testing.assert_close(hess, hess.mT, rtol=1e-10, atol=1e-10 * hess.abs().max().item())


def test_empty_batches_keep_their_shapes():
    for name in ("iso2d", "diag2d", "full3d"):
        mix = MIXTURES[name](VPSDE())
        for dtype in (F64, torch.float32):
            x = torch.zeros((0, mix.dim), dtype=dtype)
            for t in (0.3, torch.zeros(0, dtype=dtype)):
                assert mix.log_prob(x, t).shape == (0,)
                assert mix.responsibilities(x, t).shape == (0, mix.n_components)
                assert mix.score(x, t).shape == mix.x0(x, t).shape == (0, mix.dim)


def _peak_bytes(fn, device):
    """``(out, peak)``: the most memory allocated at once while ``fn()`` ran, on top of what was
    allocated before (CUDA: the caching allocator's statistics; CPU: torch's profiler's
    allocation events, added up in time order)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    assert events, "the profiler recorded no allocations"
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return out, peak


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["isotropic", "diagonal"])
def test_memory_stays_within_batch_by_components_plus_the_input(kind, device, monkeypatch):
    """Beyond its output, a call allocates at most the input's size plus a few (batch, K) float64
    tensors, for shared and per-sample times, float32 and float64 (before issue 16: K times the
    input for the (batch, K, dim) differences, variances and their logarithms)."""
    import sde_diffusion.oracles as oracles

    monkeypatch.setattr(oracles, "_MIN_CHUNK", 1024, raising=False)   # the size rule decides, not the floor
    B, D, K = (2048, 256, 8) if device == "cpu" else (8192, 1024, 16)
    mix = random_mixture(dim=D, n_components=K, seed=0, sde=VPSDE(), diagonal=kind == "diagonal")
    for dtype in (F64, torch.float32):
        x = mix.sample(B, t=0.5, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
        in_bytes = x.numel() * x.element_size()
        allowed = in_bytes + 8 * (B * K * 8) + (64 << 10)
        for t in (0.5, torch.linspace(0.05, 1.0, B, dtype=dtype, device=device)):
            for fn in METHODS:
                getattr(mix, fn)(x, t)                      # parameters cached on the device first
                out, peak = _peak_bytes(lambda: getattr(mix, fn)(x, t), device)
                extra = peak - out.numel() * out.element_size()
                assert extra <= allowed, (f"{fn} {dtype} t={'per-sample' if torch.is_tensor(t) else t}: "
                                          f"{extra / in_bytes:.2f} x the input beyond the output")


@pytest.mark.gpu
def test_gpu_paths_match_the_cpu_and_a_number_time_does_not_sync():
    """Every path on the GPU equals the CPU's; a number t (what the samplers' grids give) runs
    without a device synchronisation (a per-sample GPU time tensor is range-checked, which syncs)."""
    sde = VESDE()
    for name in ("iso2d", "diag2d", "full3d", "image"):
        mix = MIXTURES[name](sde)
        x = _samples(mix, 64, 0.5, seed=10)
        xg = x.cuda()
        for t in (0.5, torch.tensor(0.2, dtype=F64).expand(64), torch.linspace(0.0, 1.0, 64, dtype=F64)):
            tg = t.cuda() if torch.is_tensor(t) else t
            for fn in METHODS:
                ref = getattr(mix, fn)(x, t)
                got = getattr(mix, fn)(xg, tg)
                assert got.device.type == "cuda"
                torch.testing.assert_close(got.cpu(), ref, rtol=1e-11, atol=1e-11 * ref.abs().max().item())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for fn in METHODS:
                getattr(mix, fn)(xg, 0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---- full covariances ----------------------------------------------------------------------------

def _rotation(d, seed):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


@pytest.mark.parametrize("sde_name", list(SDES))
def test_full_covariance_equals_a_rotated_diagonal_mixture(sde_name):
    """If x0 ~ sum_k w_k N(m_k, diag(s_k^2)) then R x0 ~ sum_k w_k N(R m_k, R diag(s_k^2) R^T), and
    the isotropic noise is rotation invariant: log p_t(R x) = log p_t(x), score(R x) = R score(x),
    E[x0 | R x] = R E[x0 | x], eps likewise, the same responsibilities."""
    sde = SDES[sde_name]()
    diag = random_mixture(dim=3, n_components=4, seed=11, sde=sde, diagonal=True)
    R = _rotation(3, 12)
    full = GaussianMixture(diag.weights, diag.means @ R.T, sde=sde,
                           covariances=R @ torch.diag_embed(diag.stds ** 2) @ R.T)
    assert full.kind == "full" and full.stds is None
    n = 24                                              # > dim: the score's precision form
    x = _samples(diag, n, 0.5, seed=13)
    for t in _times_to_check(n):
        for fn in METHODS:
            if t is None and fn in ("x0", "eps"):
                continue
            ref = getattr(diag, fn)(x, t)
            got = getattr(full, fn)(x @ R.T, t)
            if fn in ("score", "x0", "eps"):
                got = got @ R
            torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11 * ref.abs().max().item(),
                                       msg=f"{fn} t={t}")


def test_full_score_forms_agree():
    """The score of full components at one time: through precisions (batch larger than dim) and
    through the eigenbases (batch up to dim) give the same answer; so does the per-sample path."""
    mix = random_mixture(dim=6, n_components=3, seed=14, sde=VPSDE(), full=True)
    x = _samples(mix, 30, 0.3, seed=15)
    t = torch.full((30,), 0.3, dtype=F64)
    t[0] = 0.35                                         # one other time: the per-sample path
    for fn in ("score", "eps"):
        big = getattr(mix, fn)(x, 0.3)
        small = torch.cat([getattr(mix, fn)(x[i:i + 6], 0.3) for i in range(0, 30, 6)])
        tol = dict(rtol=1e-12, atol=1e-12 * small.abs().max().item())
        torch.testing.assert_close(big, small, **tol)
        torch.testing.assert_close(getattr(mix, fn)(x, t)[1:], big[1:], **tol)


@pytest.mark.parametrize("sde_name, t", [("vp", None)] + [(name, t) for name in SDES for t in (0.01, 0.4, 1.0)])
def test_full_log_prob_integrates_to_one_in_2d(sde_name, t):
    """Trapezoidal quadrature of a 2-D mixture with correlated components, as for the diagonal ones:
    steps of half the smallest principal std, 10 of the largest beyond the outermost means."""
    sde = SDES[sde_name]()
    a, s = _scales(sde, t)
    mix = random_mixture(dim=2, n_components=4, seed=16, sde=sde, full=True, std_range=(0.05, 0.3))
    assert (mix.covariances[:, 0, 1].abs() > 1e-3).any()              # correlated, not diagonal
    eig = torch.linalg.eigvalsh(a * a * mix.covariances + s * s * torch.eye(2, dtype=F64)).sqrt()
    lo, hi = eig.min().item(), eig.max().item()
    means = (a * mix.means).numpy()
    axes = [_axis(means[:, j].mean(), np.ptp(means[:, j]) / 2 + 10 * hi, lo / 2) for j in range(2)]
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    density = torch.exp(mix.log_prob(torch.from_numpy(mesh.reshape(-1, 2)), t)).numpy().reshape(mesh.shape[:-1])
    total = integrate.trapezoid(integrate.trapezoid(density, axes[1], axis=-1), axes[0])
    assert float(total) == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_full_samples_have_the_mixture_moments(sde_name):
    sde = SDES[sde_name]()
    mix = random_mixture(dim=3, n_components=3, seed=17, sde=sde, full=True, std_range=(0.1, 0.4))
    x = _samples(mix, 40_000, None, seed=18)
    _check_sample_moments(x, mix.mean(), mix.covariance(), "full clean")
    a, s = _scales(sde, 0.3)
    x = _samples(mix, 40_000, 0.3, seed=19)
    _check_sample_moments(x, a * mix.mean(), a * a * mix.covariance() + s * s * torch.eye(3, dtype=F64),
                          "full t=0.3")
    # per component: the labels' samples have that component's covariance
    x, labels = mix.sample(40_000, generator=torch.Generator().manual_seed(20), dtype=F64, return_labels=True)
    for k in range(3):
        _check_sample_moments(x[labels == k], mix.means[k], mix.covariances[k], f"component {k}")


def test_full_covariance_formula_and_image_shaped_events():
    """covariance() is the law of total covariance; a full mixture over (2, 2) images equals the
    flattened one; from_eigen equals the covariances it implies."""
    mix = random_mixture(dim=(2, 2), n_components=3, seed=21, sde=SubVPSDE(), full=True)
    assert mix.event_shape == (2, 2) and mix.covariances.shape == (3, 4, 4)
    w, m = mix.weights, mix.means.reshape(3, 4)
    mu = w @ m
    cov = sum(w[k] * (mix.covariances[k] + torch.outer(m[k] - mu, m[k] - mu)) for k in range(3))
    torch.testing.assert_close(mix.covariance(), cov, rtol=1e-12, atol=1e-14)
    flat = GaussianMixture(w, m, sde=mix.sde, covariances=mix.covariances)
    x = _samples(mix, 8, 0.4, seed=22)
    assert x.shape == (8, 2, 2)
    for fn in METHODS:
        got, ref = getattr(mix, fn)(x, 0.4), getattr(flat, fn)(x.reshape(8, 4), 0.4)
        torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item())
    assert mix.with_sde(VESDE()).kind == "full"


@pytest.mark.parametrize("kwargs, match", [
    (dict(stds=[0.1, 0.1], covariances=torch.eye(2).expand(2, 2, 2)), r"pass exactly one of stds .* got both"),
    (dict(), r"pass exactly one of stds .* got neither"),
    (dict(covariances=torch.eye(3).expand(2, 3, 3)),
     r"covariances must have shape \(K=2, 2, 2\), got \(2, 3, 3\)"),
    (dict(covariances=torch.tensor([[[1.0, 0.5], [0.0, 1.0]]] * 2)),
     r"covariances must be symmetric, got max \|C - C\^T\| = 0\.5"),
    (dict(covariances=torch.tensor([[[1.0, 2.0], [2.0, 1.0]]] * 2)),
     r"covariances must be positive definite, got smallest eigenvalue -1\.0 in component 0"),
    (dict(covariances=torch.tensor([[[1.0, 0.0], [0.0, math.nan]]] * 2)), r"covariances must be finite"),
])
def test_bad_covariances_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture([1.0, 1.0], [[0.0, 0.0], [1.0, 1.0]], **kwargs)


def test_bad_eigendecompositions_name_the_value():
    w, m = [1.0, 1.0], [[0.0, 0.0], [1.0, 1.0]]
    eye = torch.eye(2, dtype=F64).expand(2, 2, 2)
    with pytest.raises(ValueError, match=r"eigenvalues must be > 0, got smallest eigenvalue 0\.0 in component 1"):
        GaussianMixture.from_eigen(w, m, [[1.0, 1.0], [1.0, 0.0]], eye)
    with pytest.raises(ValueError,
                       match=r"eigenvectors must be orthonormal \(columns\), got max \|U\^T U - I\| = 3\.0"):
        GaussianMixture.from_eigen(w, m, [[1.0, 1.0]] * 2, 2 * eye)
    with pytest.raises(ValueError, match=r"eigenvalues must have shape \(K=2, 2\), got \(2, 3\)"):
        GaussianMixture.from_eigen(w, m, [[1.0, 1.0, 1.0]] * 2, eye)
    with pytest.raises(ValueError, match=r"eigenvectors must have shape \(K=2, 2, 2\), got \(2, 2\)"):
        GaussianMixture.from_eigen(w, m, [[1.0, 1.0]] * 2, torch.eye(2))
    with pytest.raises(ValueError, match=r"pass at most one of diagonal=True and full=True"):
        random_mixture(diagonal=True, full=True)
    R = _rotation(2, 23)
    lam = torch.tensor([[0.1, 0.4], [0.2, 0.3]], dtype=F64)
    a = GaussianMixture.from_eigen(w, m, lam, torch.stack([R, R.T]))
    b = GaussianMixture(w, m, covariances=a.covariances)
    x = torch.randn(5, 2, dtype=F64)
    torch.testing.assert_close(a.log_prob(x), b.log_prob(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(a.score(x), b.score(x), rtol=1e-12, atol=1e-12)


# ---- class labels (issue 12): the exact conditional oracle ---------------------------------------
LABELLED = {
    "iso": lambda sde: random_mixture(2, 5, seed=3, sde=sde, labels=[0, 1, 0, 2, 1]),
    "diag": lambda sde: random_mixture(2, 5, seed=4, sde=sde, labels=[1, 0, 2, 2, 0], diagonal=True),
    "full": lambda sde: random_mixture(3, 4, seed=5, sde=sde, labels=[0, 1, 1, 0], full=True),
}


def _direct_log_joint(mix, x, t):
    """``log w_k N(x; alpha m_k, alpha^2 C_k + sigma^2 I)`` per sample and component by dense
    multivariate normals (float64, differentiable in ``x``): Bayes' rule by hand."""
    B, K, D = x.shape[0], mix.n_components, mix.dim
    t = torch.as_tensor(t, dtype=F64).expand(B) if not isinstance(t, torch.Tensor) or t.ndim == 0 else t
    _, log_a, log_s = mix.sde.log_scales(t.double())
    a, s = log_a.exp()[:, None, None, None], log_s.exp()[:, None, None, None]
    cov = mix.covariances if mix.covariances is not None else torch.diag_embed(mix.stds.reshape(K, D) ** 2)
    covt = a * a * cov[None] + s * s * torch.eye(D, dtype=F64)                 # (B, K, D, D)
    mean = a[..., 0] * mix.means.reshape(1, K, D)
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=covt)
    return dist.log_prob(x.reshape(B, 1, D)) + mix.weights.log()


def _direct_log_class_posterior(mix, x, t):
    lj = _direct_log_joint(mix, x, t)
    per_class = torch.stack([torch.logsumexp(lj[:, mix.labels == c], 1) for c in range(mix.n_classes)], 1)
    return per_class - torch.logsumexp(lj, 1, keepdim=True)


def _labelled_points(mix, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(mix.event_shape), generator=g, dtype=F64) * 0.8


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("kind", list(LABELLED))
def test_class_posterior_is_bayes_rule(kind, sde_name):
    mix = LABELLED[kind](SDES[sde_name]())
    x = _labelled_points(mix)
    for t in (0.02, 0.5, 1.0, torch.linspace(0.01, 1.0, 7, dtype=F64)):
        ref = _direct_log_class_posterior(mix, x, t)
        p, lp = mix.class_posterior(x, t), mix.log_class_posterior(x, t)
        assert p.shape == (7, mix.n_classes) and lp.shape == (7, mix.n_classes)
        torch.testing.assert_close(p.sum(1), torch.ones(7, dtype=F64), rtol=0, atol=1e-14)
        torch.testing.assert_close(p, ref.exp(), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(lp, ref, rtol=1e-10, atol=1e-10)


def test_log_class_posterior_stays_finite_where_the_posterior_underflows():
    means = torch.tensor([[-1.0], [1.0]], dtype=F64)
    mix = GaussianMixture([0.5, 0.5], means, [0.01, 0.01], VPSDE(), labels=[0, 1])
    x = torch.tensor([[-0.9], [0.9]], dtype=F64)
    lp = mix.log_class_posterior(x, 0.0)
    assert torch.isfinite(lp).all() and lp[0, 1] < -1e4 and mix.class_posterior(x, 0.0)[0, 1] == 0
    torch.testing.assert_close(lp, _direct_log_class_posterior(mix, x, 0.0), rtol=1e-10, atol=0)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("kind", list(LABELLED))
def test_class_posterior_gradient_is_autograd_of_its_log(kind, sde_name):
    """``grad log p(y | x_t)`` in closed form (sub-mixture score minus score) equals autograd of the
    direct Bayes computation, for one class and for one class per sample."""
    mix = LABELLED[kind](SDES[sde_name]())
    x = _labelled_points(mix, seed=1)
    y = torch.arange(7) % mix.n_classes
    for t in (0.3, torch.linspace(0.05, 0.95, 7, dtype=F64)):
        xg = x.clone().requires_grad_(True)
        lp = _direct_log_class_posterior(mix, xg, t)
        (g_all,) = torch.autograd.grad(lp[torch.arange(7), y].sum(), xg)
        torch.testing.assert_close(mix.log_class_posterior_grad(x, t, y), g_all, rtol=1e-8, atol=1e-9)
        xg = x.clone().requires_grad_(True)
        (g_one,) = torch.autograd.grad(_direct_log_class_posterior(mix, xg, t)[:, 1].sum(), xg)
        torch.testing.assert_close(mix.log_class_posterior_grad(x, t, 1), g_one, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("kind", list(LABELLED))
def test_the_conditional_is_the_sub_mixture(kind, sde_name):
    """``conditional(y)`` equals a mixture built from class ``y``'s components with renormalised
    weights; ``score(x, t, y)`` is it, and equals ``score + grad log p(y | x_t)`` (Bayes); the null
    label gives the whole mixture, sample by sample."""
    sde = SDES[sde_name]()
    mix = LABELLED[kind](sde)
    x = _labelled_points(mix, seed=2)
    for c in range(mix.n_classes):
        idx = mix.labels == c
        w = mix.weights[idx]
        built = (GaussianMixture(w, mix.means[idx], mix.stds[idx], sde) if mix.covariances is None
                 else GaussianMixture(w, mix.means[idx], sde=sde, covariances=mix.covariances[idx]))
        sub = mix.conditional(c)
        assert sub is mix.conditional(c) and sub.labels is None and sub.sde is sde
        torch.testing.assert_close(sub.weights, w / w.sum(), rtol=1e-15, atol=0)
        for t in (None, 0.3, torch.linspace(0.05, 1.0, 7, dtype=F64)):
            for what in ("log_prob", "score") + (("x0", "eps") if t is not None else ()):
                got = getattr(mix, what)(x, t, y=c)
                torch.testing.assert_close(got, getattr(built, what)(x, t), rtol=1e-11, atol=1e-11)
                torch.testing.assert_close(got, getattr(sub, what)(x, t), rtol=0, atol=0)
            if t is not None:
                torch.testing.assert_close(mix.score(x, t, y=c),
                                           mix.score(x, t) + mix.log_class_posterior_grad(x, t, c),
                                           rtol=1e-9, atol=1e-9)
    y = torch.tensor([0, mix.n_classes, 1, mix.n_classes, 0, 1, 0])
    for t in (0.4, torch.linspace(0.05, 1.0, 7, dtype=F64)):
        per = mix.score(x, t, y=y)
        for i in range(7):
            ti = t if isinstance(t, float) else t[i:i + 1]
            one = mix.score(x[i:i + 1], ti) if y[i] == mix.n_classes else mix.conditional(int(y[i])).score(x[i:i + 1], ti)
            torch.testing.assert_close(per[i:i + 1], one, rtol=1e-12, atol=1e-12)


def test_labelled_sampling_draws_the_class():
    mix = random_mixture(2, 5, seed=3, sde=VPSDE(), labels=[0, 1, 0, 2, 1])
    n = 20000
    x, comp = mix.sample(n, generator=torch.Generator().manual_seed(0), return_labels=True, y=0)
    assert (mix.labels[comp] == 0).all()
    w = mix.conditional(0).weights
    freq = torch.bincount(comp, minlength=5)[mix.labels == 0].double() / n
    assert ((freq - w).abs() <= 4.5 * (w * (1 - w) / n).sqrt()).all(), (freq, w)
    y = torch.arange(n) % 4                                   # 3: the null label, the whole mixture
    x, comp = mix.sample(n, t=0.3, generator=torch.Generator().manual_seed(1), return_labels=True, y=y)
    assert (mix.labels[comp[y < 3]] == y[y < 3]).all() and x.shape == (n, 2)
    whole = torch.bincount(comp[y == 3], minlength=5).double() / int((y == 3).sum())
    assert ((whole - mix.weights).abs() <= 4.5 * (mix.weights * (1 - mix.weights) / (n / 4)).sqrt()).all()
    # without y, a labelled mixture draws exactly what the unlabelled one draws
    plain = random_mixture(2, 5, seed=3, sde=VPSDE())
    a = mix.sample(50, t=0.2, generator=torch.Generator().manual_seed(2), dtype=F64)
    b = plain.sample(50, t=0.2, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert torch.equal(a, b)


def test_labels_are_kept_by_with_sde_and_from_eigen():
    mix = LABELLED["full"](VPSDE())
    ve = mix.with_sde(VESDE())
    assert torch.equal(ve.labels, mix.labels) and ve.n_classes == 2
    assert ve.conditional(1).sde is ve.sde and mix.conditional(1).sde is mix.sde
    x = _labelled_points(mix)
    torch.testing.assert_close(ve.class_posterior(x, 0.5), _direct_log_class_posterior(ve, x, 0.5).exp(),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("labels, match", [
    ([0, 1], r"one class per component, shape \(3,\), got \(2,\)"),
    ([0, -1, 1], "labels must be >= 0"),
    ([0, 0.5, 1], "labels must be integers"),
    ([0, 2, 2], r"every class 0\.\.2 .* no component of class \[1\]"),
])
def test_bad_labels_name_the_value(labels, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture([1, 1, 1], [[0.0], [1.0], [2.0]], [0.1, 0.1, 0.1], labels=labels)


def test_bad_classes_name_the_value():
    mix = LABELLED["iso"](VPSDE())
    plain = random_mixture(2, 3, seed=0, sde=VPSDE())
    x = _labelled_points(mix, n=2)
    with pytest.raises(ValueError, match="class_posterior needs class labels"):
        plain.class_posterior(x, 0.5)
    with pytest.raises(ValueError, match=r"y must lie in 0\.\.3 \(3 = the null label"):
        mix.score(x, 0.5, y=4)
    with pytest.raises(ValueError, match=r"conditional: y must lie in 0\.\.2, got 3"):
        mix.conditional(3)
    with pytest.raises(ValueError, match=r"log_class_posterior_grad: y must lie in 0\.\.2, got 3"):
        mix.log_class_posterior_grad(x, 0.5, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="y must hold integer classes"):
        mix.score(x, 0.5, y=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"one class per sample, shape \(2,\)"):
        mix.score(x, 0.5, y=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"sample: y must hold one class per sample, shape \(5,\)"):
        mix.sample(5, y=torch.tensor([0, 1]))


def test_the_oracle_model_takes_a_bound_label():
    from sde_diffusion import OracleModel

    mix = LABELLED["diag"](VPSDE())
    x = _labelled_points(mix, n=4)
    y = torch.tensor([0, 1, 2, 3])
    model = OracleModel(mix).bind(y=y)
    tt = torch.full((4,), 0.3, dtype=F64)
    a, s = _scales(mix.sde, 0.3)
    for view in ("eps", "x0", "score"):
        torch.testing.assert_close(getattr(model, view)(x, 0.3), getattr(mix, view)(x, 0.3, y=y), rtol=0, atol=0)
        torch.testing.assert_close(model.at_scales(view, x, tt, a, s), getattr(mix, view)(x, 0.3, y=y),
                                   rtol=0, atol=0)
    assert torch.equal(OracleModel(mix).bind(y=None).score(x, 0.3), mix.score(x, 0.3))
    assert model.nfe == 6
    with pytest.raises(ValueError, match="takes only y"):
        OracleModel(mix).bind(mask=1)
