"""Likelihood through the probability-flow ODE, checked against the exact Gaussian-mixture oracle
and closed forms (issue 4)."""
import math

import pytest
import torch

from sde_diffusion import GaussianMixture, SubVPSDE, VESDE, VPSDE, random_mixture
from sde_diffusion.divergence import exact_divergence, hutchinson_divergence, make_probes
from sde_diffusion.likelihood import (
    bits_per_dim_offset, dequantize, discrete_bits_per_dim, image_log_likelihood, integrate_flow,
    log_likelihood,
)
from sde_diffusion.models import OracleModel, ScoreModel

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The exact divergence runs many small backward passes: one thread is fastest, and several
    threads on a busy 2-core machine are tens of times slower (OpenMP spinning). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _exact_prior(mix, sde):
    return lambda z: mix.log_prob(z, sde.T)


@pytest.fixture(scope="module")
def mix64():
    sde = VPSDE()
    mix = random_mixture(64, 8, seed=3, sde=sde)
    x = mix.sample(12, t=sde.eps, generator=torch.Generator().manual_seed(0), dtype=F64)
    return sde, mix, x


# ---- the oracle: exact divergence -----------------------------------------------------------------
def test_exact_divergence_matches_oracle_64d_and_converges(mix64):
    sde, mix, x = mix64
    truth = mix.log_prob(x, sde.eps)
    errors = {}
    for tol in (1e-5, 1e-7):
        r = log_likelihood(OracleModel(mix), sde, x, divergence="exact", rtol=tol, atol=tol,
                           prior_logp=_exact_prior(mix, sde))
        errors[tol] = ((r.log_likelihood - truth).abs() / 64).max().item()
    assert errors[1e-5] < 1e-3                       # nats/dim, every sample
    assert errors[1e-7] < errors[1e-5] / 10          # tighter tolerance, smaller error
    assert errors[1e-7] < 1e-4


def test_default_prior_within_issue_tolerance(mix64):
    """With the SDE's N(0, I) prior (what published numbers use) the error also includes
    log N(x_T) - log p_T(x_T), small for VP at T=1; still below 1e-3 nats/dim."""
    sde, mix, x = mix64
    r = log_likelihood(mix, sde, x, rtol=1e-6, atol=1e-6)
    assert r.divergence == "exact"                   # "auto" in 64 dims
    err = ((r.log_likelihood - mix.log_prob(x, sde.eps)).abs() / 64).max().item()
    assert err < 1e-3
    # the result is prior + delta and the prior is the SDE's at the latent
    torch.testing.assert_close(r.prior_logp, sde.prior_logp(r.latent))
    torch.testing.assert_close(r.log_likelihood, r.prior_logp + r.delta_logp)
    torch.testing.assert_close(r.bpd, -r.log_likelihood / (64 * math.log(2)))


@pytest.mark.parametrize("sde", [VESDE(), SubVPSDE(), VPSDE(schedule="cosine")],
                         ids=["VE", "subVP", "VPcosine"])
def test_exact_divergence_other_sdes(sde):
    mix = random_mixture(6, 3, seed=1, sde=sde)
    x = mix.sample(6, t=sde.eps, generator=torch.Generator().manual_seed(1), dtype=F64)
    r = log_likelihood(mix, sde, x, rtol=1e-7, atol=1e-7, prior_logp=_exact_prior(mix, sde))
    torch.testing.assert_close(r.log_likelihood, mix.log_prob(x, sde.eps), atol=1e-4, rtol=0)


# ---- Hutchinson -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mix16():
    sde = VPSDE()
    return sde, random_mixture(16, 4, seed=2, sde=sde, spread=0.3)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased(probe, mix16):
    """Mean error over many samples (one probe each) within 4 standard errors of zero."""
    sde, mix = mix16
    B = 256
    x = mix.sample(B, t=sde.eps, generator=torch.Generator().manual_seed(2), dtype=F64)
    r = log_likelihood(mix, sde, x, divergence="hutchinson", probe=probe, rtol=1e-6, atol=1e-6,
                       prior_logp=_exact_prior(mix, sde), generator=torch.Generator().manual_seed(10))
    e = r.log_likelihood - mix.log_prob(x, sde.eps)
    assert e.std() > 0.1                                  # the estimator is noisy ...
    assert abs(e.mean().item()) < 4 * e.std().item() / math.sqrt(B)   # ... but unbiased


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_spread_shrinks_as_one_over_sqrt_probes(probe, mix16):
    """One point copied 192 times, so the errors are independent draws for one fixed trajectory:
    their spread with K=4 probes is half the spread with one."""
    sde, mix = mix16
    x = mix.sample(1, t=sde.eps, generator=torch.Generator().manual_seed(3), dtype=F64).expand(192, 16)
    common = dict(divergence="hutchinson", probe=probe, rtol=1e-5, atol=1e-5)
    std = {K: log_likelihood(mix, sde, x, n_probes=K, generator=torch.Generator().manual_seed(K),
                             **common).log_likelihood.std().item() for K in (1, 4)}
    assert std[1] > 0.05
    assert 0.5 / 1.3 < std[4] / std[1] < 0.5 * 1.3


def test_probes_fixed_per_sample_and_explicit():
    sde = VPSDE()
    mix = random_mixture(5, 3, seed=4, sde=sde)
    x = mix.sample(4, t=sde.eps, generator=torch.Generator().manual_seed(4), dtype=F64)
    probes = make_probes(x.shape, 2, "gaussian", torch.Generator().manual_seed(5), F64)
    a = log_likelihood(mix, sde, x, divergence="hutchinson", probes=probes)
    b = log_likelihood(mix, sde, x, divergence="hutchinson", probe="gaussian", n_probes=2,
                       generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.log_likelihood, b.log_likelihood)
    r = make_probes((3, 7), 5, "rademacher", torch.Generator().manual_seed(0))
    assert set(r.unique().tolist()) == {-1.0, 1.0} and r.shape == (5, 3, 7)


def test_divergence_helpers_against_full_jacobian():
    torch.manual_seed(0)
    W = torch.randn(6, 6, dtype=F64)

    def fn(x):        # per-sample, nonlinear
        return torch.tanh(x @ W) * x.sum(1, keepdim=True)

    x = torch.randn(5, 6, dtype=F64)
    traces = torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], xi))
                          for xi in x])
    for chunk in (None, 1, 4):
        out, div = exact_divergence(fn, x, chunk_size=chunk)
        torch.testing.assert_close(div, traces)
        torch.testing.assert_close(out, fn(x))
    probes = make_probes(x.shape, 20000, "rademacher", torch.Generator().manual_seed(1), F64)
    _, est = hutchinson_divergence(fn, x, probes)
    torch.testing.assert_close(est, traces, atol=0.1 * traces.abs().max().item(), rtol=0)
    # image-shaped inputs
    xi = torch.randn(3, 2, 2, 2, dtype=F64)
    _, div = exact_divergence(lambda v: v * v, xi)
    torch.testing.assert_close(div, 2 * xi.reshape(3, -1).sum(1))


# ---- invertibility --------------------------------------------------------------------------------
@pytest.mark.parametrize("solver,per_sample", [("torchdiffeq", False), ("torchdiffeq", True),
                                               ("scipy", False)])
def test_flow_is_invertible(solver, per_sample):
    sde = VPSDE()
    mix = random_mixture(8, 4, seed=5, sde=sde)
    x = mix.sample(6, t=sde.eps, generator=torch.Generator().manual_seed(5), dtype=F64)
    kw = dict(solver=solver, per_sample=per_sample, rtol=1e-8, atol=1e-8)
    r = log_likelihood(mix, sde, x, **kw)
    z, nfe = integrate_flow(mix, sde, x, sde.eps, sde.T, **kw)
    torch.testing.assert_close(z, r.latent, atol=1e-6, rtol=0)
    back, nfe_back = integrate_flow(mix, sde, r.latent, sde.T, sde.eps, **kw)
    assert nfe > 0 and nfe_back > 0
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    assert (r.latent - x).abs().max() > 0.5          # it did go somewhere


# ---- closed forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["VP", "VE"])
def test_gaussian_data_closed_form(sde):
    """Data N(mu, s^2 I): p_t = N(alpha mu, v_t I), v_t = alpha^2 s^2 + sigma^2; the flow keeps
    (x_t - alpha_t mu) / sqrt(v_t) fixed, so x_T and log p are known by hand."""
    D, s = 5, 0.3
    mu = torch.linspace(-0.5, 0.5, D, dtype=F64)
    model = OracleModel(GaussianMixture([1.0], mu[None], [s], sde))
    x = torch.randn(4, D, dtype=F64, generator=torch.Generator().manual_seed(6)) * 0.4 + 0.1
    a0, s0 = sde.alpha(sde.eps).item(), sde.sigma(sde.eps).item()
    aT, sT = sde.alpha(sde.T).item(), sde.sigma(sde.T).item()
    v0, vT = a0 ** 2 * s ** 2 + s0 ** 2, aT ** 2 * s ** 2 + sT ** 2

    def log_normal(z, mean, var):
        return (-0.5 * ((z - mean) ** 2).sum(1) / var - 0.5 * D * math.log(2 * math.pi * var))

    z_hand = aT * mu + math.sqrt(vT / v0) * (x - a0 * mu)
    prior_var = sde.prior_std ** 2
    ll_hand = log_normal(z_hand, 0.0, prior_var) + 0.5 * D * math.log(vT / v0)   # N(0, prior) prior
    r = log_likelihood(model, sde, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r.latent, z_hand, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r.log_likelihood, ll_hand, atol=1e-5, rtol=0)
    exact = log_likelihood(model, sde, x, rtol=1e-9, atol=1e-9,
                           prior_logp=lambda z: log_normal(z, aT * mu, vT))
    torch.testing.assert_close(exact.log_likelihood, log_normal(x, a0 * mu, v0), atol=1e-5, rtol=0)


def test_bits_per_dim_offsets_by_hand():
    assert bits_per_dim_offset(8, centered=True) == 7.0        # log2(256 / 2)
    assert bits_per_dim_offset(8, centered=False) == 8.0       # log2(256 / 1)
    assert bits_per_dim_offset(5, centered=True) == 4.0
    # the uniform density on [-1, 1]^D, 2^-D, is the uniform law on 256 levels: 8 bits/dim
    D = 10
    bpd = discrete_bits_per_dim(torch.tensor([-D * math.log(2.0)]), D)
    assert bpd.item() == pytest.approx(8.0, abs=1e-12)
    bpd01 = discrete_bits_per_dim(torch.tensor([0.0]), D, centered=False)   # uniform on [0, 1]^D
    assert bpd01.item() == pytest.approx(8.0, abs=1e-12)


def test_dequantized_8bit_bits_per_dim_by_hand():
    """Three 8-bit pixels k = (0, 128, 255), dequantization noise u = (1/2, 1/4, 3/4), Gaussian data
    N(0, 0.5^2) under VP with the exact prior: bpd computed by hand."""
    sde = VPSDE()
    k = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    u = torch.tensor([[0.5, 0.25, 0.75]], dtype=F64)
    x = dequantize(k, noise=u, dtype=F64)
    x_hand = [(0 + 0.5) / 128 - 1, (128 + 0.25) / 128 - 1, (255 + 0.75) / 128 - 1]
    torch.testing.assert_close(x, torch.tensor([x_hand], dtype=F64))
    model = OracleModel(GaussianMixture([1.0], torch.zeros(1, 3, dtype=F64), [0.5], sde))
    a0, s0 = sde.alpha(sde.eps).item(), sde.sigma(sde.eps).item()
    aT, sT = sde.alpha(sde.T).item(), sde.sigma(sde.T).item()
    v0, vT = a0 ** 2 * 0.25 + s0 ** 2, aT ** 2 * 0.25 + sT ** 2
    log_px = sum(-0.5 * xi ** 2 / v0 - 0.5 * math.log(2 * math.pi * v0) for xi in x_hand)
    bpd_hand = -log_px / (3 * math.log(2)) + 7
    prior = lambda z: (-0.5 * (z ** 2).sum(1) / vT - 1.5 * math.log(2 * math.pi * vT))  # noqa: E731
    r = log_likelihood(model, sde, x, rtol=1e-9, atol=1e-9, prior_logp=prior)
    assert discrete_bits_per_dim(r.log_likelihood, 3).item() == pytest.approx(bpd_hand, abs=1e-6)
    # the image pipeline does the same with its own draws
    img = image_log_likelihood(model, sde, k, dtype=F64, generator=torch.Generator().manual_seed(3),
                               rtol=1e-9, atol=1e-9, prior_logp=prior)
    x_draw = dequantize(k, generator=torch.Generator().manual_seed(3), dtype=F64)
    log_draw = sum(-0.5 * xi ** 2 / v0 - 0.5 * math.log(2 * math.pi * v0) for xi in x_draw[0].tolist())
    assert img.bpd.item() == pytest.approx(-log_draw / (3 * math.log(2)) + 7, abs=1e-6)
    assert img.nll.item() == pytest.approx(-log_draw + 3 * math.log(128), abs=1e-5)
    assert img.offset_bits == 7.0 and img.bpd_iw.item() == pytest.approx(img.bpd.item())


def test_image_likelihood_several_draws():
    sde = VPSDE()
    mix = random_mixture((1, 2, 2), 3, seed=7, sde=sde)
    imgs = torch.randint(0, 256, (3, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    res = image_log_likelihood(mix, sde, imgs, n_dequant=3, generator=torch.Generator().manual_seed(8),
                               dtype=F64)
    assert len(res.draws) == 3 and res.bpd.shape == (3,)
    lls = torch.stack([d.log_likelihood for d in res.draws])
    torch.testing.assert_close(res.bpd, -lls.mean(0) / (4 * math.log(2)) + 7)
    assert bool((res.bpd_iw <= res.bpd + 1e-12).all())          # log-mean-exp >= mean
    assert res.nfe == sum(d.nfe for d in res.draws)
    unc = dequantize(imgs, centered=False, noise=torch.zeros(imgs.shape, dtype=F64), dtype=F64)
    torch.testing.assert_close(unc, imgs.to(F64) / 256)
    with pytest.raises(ValueError, match="integers in"):
        dequantize(torch.tensor([[256]]))
    with pytest.raises(ValueError, match="n_dequant"):
        image_log_likelihood(mix, sde, imgs, n_dequant=0)


# ---- per-sample error control, solvers, NFE ---------------------------------------------------
def test_per_sample_result_independent_of_batch():
    sde = VPSDE()
    mix = random_mixture(8, 4, seed=8, sde=sde)
    x = mix.sample(5, t=sde.eps, generator=torch.Generator().manual_seed(8), dtype=F64)
    odd = torch.full((1, 8), 3.0, dtype=F64)             # far from the data: many more steps
    kw = dict(per_sample=True, rtol=1e-4, atol=1e-4)
    alone = log_likelihood(mix, sde, x[:1], **kw)
    mixed = log_likelihood(mix, sde, torch.cat([x[:1], odd, x[1:]]), **kw)
    assert mixed.n_fevals[1] != mixed.n_fevals[0]            # companions took other steps ...
    torch.testing.assert_close(mixed.log_likelihood[0], alone.log_likelihood[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(mixed.latent[0], alone.latent[0], atol=1e-12, rtol=0)
    assert mixed.n_fevals[0] == alone.n_fevals[0]            # ... and did not change sample 0's
    # the loop over samples (scipy) is batch-independent too
    s1 = log_likelihood(mix, sde, x[:1], solver="scipy", **kw)
    s2 = log_likelihood(mix, sde, torch.cat([x[:1], odd]), solver="scipy", **kw)
    torch.testing.assert_close(s2.log_likelihood[0], s1.log_likelihood[0], atol=1e-12, rtol=0)
    # and agrees with torchdiffeq's dopri5 on a batch of one, within tolerance
    ref = log_likelihood(mix, sde, x[:1], rtol=1e-4, atol=1e-4)
    assert abs(ref.log_likelihood.item() - alone.log_likelihood.item()) < 1e-2


def test_solvers_agree_and_nfe_counted():
    sde = VPSDE()
    mix = random_mixture(6, 3, seed=9, sde=sde)
    x = mix.sample(5, t=sde.eps, generator=torch.Generator().manual_seed(9), dtype=F64)
    model = OracleModel(mix)
    results = {}
    for solver, per_sample in (("torchdiffeq", False), ("scipy", False), ("torchdiffeq", True)):
        before = model.nfe
        r = log_likelihood(model, sde, x, solver=solver, per_sample=per_sample, rtol=1e-7, atol=1e-7,
                           prior_logp=_exact_prior(mix, sde))
        assert r.nfe == model.nfe - before > 0
        if not per_sample:                 # shared steps: one network call per function evaluation
            assert bool((r.n_fevals == r.nfe).all())
        else:
            assert bool((r.n_fevals <= r.nfe).all()) and (r.nfe - 2) % 6 == 0
        results[(solver, per_sample)] = r.log_likelihood
    for v in results.values():
        torch.testing.assert_close(v, mix.log_prob(x, sde.eps), atol=1e-4, rtol=0)
    # Hutchinson: still one network call per function evaluation, whatever the number of probes
    r = log_likelihood(model, sde, x, divergence="hutchinson", n_probes=3)
    assert bool((r.n_fevals == r.nfe).all())
    # other torchdiffeq methods, per sample by the loop
    r = log_likelihood(model, sde, x[:2], method="bosh3", per_sample=True)
    assert r.n_fevals.shape == (2,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_wrapped_network(dtype):
    sde = VPSDE()
    mix = random_mixture(4, 3, seed=10, sde=sde)
    x = mix.sample(4, t=sde.eps, generator=torch.Generator().manual_seed(10), dtype=dtype)
    net = ScoreModel(lambda xx, t: mix.eps(xx, t), sde, parameterization="eps")
    r = log_likelihood(net, sde, x)
    o = log_likelihood(OracleModel(mix), None, x)
    for t in (r.log_likelihood, r.latent, r.nll, r.bpd):
        assert t.dtype == dtype
    tol = 2e-3 if dtype == torch.float32 else 1e-6
    torch.testing.assert_close(r.log_likelihood, o.log_likelihood, atol=tol, rtol=0)
    torch.testing.assert_close(r.log_likelihood, mix.log_prob(x.double(), sde.eps).to(dtype),
                               atol=0.05, rtol=0)


@pytest.mark.gpu
def test_cuda_device():
    sde = VPSDE()
    mix = random_mixture(6, 3, seed=11, sde=sde)
    x = mix.sample(4, t=sde.eps, generator=torch.Generator().manual_seed(11), dtype=F64).cuda()
    for div in ("exact", "hutchinson"):
        r = log_likelihood(mix, sde, x, divergence=div, per_sample=div == "exact")
        assert r.log_likelihood.device.type == "cuda" and r.latent.device.type == "cuda"
    r = log_likelihood(mix, sde, x, solver="scipy", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(r.log_likelihood.cpu(), mix.log_prob(x.cpu(), sde.eps), atol=1e-3,
                               rtol=0)


# ---- errors -------------------------------------------------------------------------------------
def test_clear_errors():
    sde = VPSDE()
    mix = random_mixture(4, 2, seed=12, sde=sde)
    x = mix.sample(3, t=sde.eps, dtype=F64)
    bad = [
        (dict(x=torch.zeros(3, 5, dtype=F64)), "expects"),
        (dict(x=torch.zeros(3, dtype=F64)), "shape"),
        (dict(x=x.to(torch.float16)), "float32 or float64"),
        (dict(x=x.clone().fill_(float("nan"))), "finite"),
        (dict(divergence="trace"), "divergence must be one of"),
        (dict(divergence="hutchinson", probe="uniform"), "probe must be one of"),
        (dict(n_probes=0), "n_probes"),
        (dict(divergence="hutchinson", probes=torch.zeros(2, 3, 5)), "probes must have shape"),
        (dict(solver="rk4"), "solver must be one of"),
        (dict(solver="scipy", method="dopri5"), "method must be one of"),
        (dict(method="nope"), "method must be one of"),
        (dict(rtol=0.0), "rtol"),
        (dict(atol=-1e-5), "atol"),
        (dict(rtol=float("nan")), "rtol"),
        (dict(eps=2.0), "eps|t_start"),
        (dict(sde=VESDE()), "does not match"),
        (dict(prior_logp=lambda z: z, rtol=1e-3, atol=1e-3), "prior_logp must return"),
    ]
    model = OracleModel(mix)
    for kwargs, match in bad:
        args = dict(x=x, sde=sde)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            log_likelihood(model, args.pop("sde"), args.pop("x"), **args)
    with pytest.raises(ValueError, match="ScoreModel"):
        log_likelihood(object(), sde, x)
    lin = torch.nn.Linear(4, 4).double()
    net = ScoreModel(lambda xx, t: lin(xx), sde, parameterization="eps")
    with pytest.raises(ValueError, match="cannot be evaluated on x of shape"):
        log_likelihood(net, sde, torch.zeros(2, 5, dtype=F64))


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_off_manifold_points_robust_statistics_and_latent_outliers(sde):
    """Two points far from every mode (issue 10, item 9) map to latents with |x_T|^2 / prior_std^2
    of ~600 (the chi^2_2 quantile 1 - 1e-6 is 27.6) and NLLs of ~300 nats that drag the mean far
    from the typical point; the median and the 10% trimmed mean stay with the exact values of the
    in-distribution points, and exactly the two are flagged."""
    mix = random_mixture(2, 8, seed=0, sde=sde)
    x_in = mix.sample(20, t=sde.eps, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = torch.cat([x_in, torch.tensor([[3.0, 3.0], [-4.0, 2.0]], dtype=F64)])
    res = log_likelihood(mix, sde, x, divergence="exact", rtol=1e-7, atol=1e-7)
    exact_nll = -mix.log_prob(x, sde.eps)
    assert res.latent_outlier.tolist() == [False] * 20 + [True, True]
    assert res.n_latent_outliers == 2 and res.outlier_tail == 1e-6
    # per dimension: chi^2_2 / 2 under the prior, threshold 27.6 / 2
    assert float(res.latent_norm2[:20].max()) < 27.6 / 2 < 100 < float(res.latent_norm2[20:].min())
    assert float(res.nll.mean()) > float(exact_nll[:20].max()) + 10      # the mean is dominated
    assert res.nll_median == pytest.approx(float(exact_nll.quantile(0.5)), abs=1e-3)
    # 22 points, 10% trimmed: the 2 lowest and the 2 highest (the off-manifold points) dropped
    kept = exact_nll.sort().values[2:20]
    assert res.nll_trimmed_mean(0.1) == pytest.approx(float(kept.mean()), abs=1e-3)
    assert res.nll_trimmed_mean(0.0) == pytest.approx(float(res.nll.mean()), rel=1e-12)
    summary = res.summary()
    assert summary["latent_outliers"] == 2 and summary["n"] == 22 and summary["trim"] == 0.1
    assert summary["nll_median"] == res.nll_median
    assert summary["bpd_median"] == pytest.approx(res.nll_median / (2 * math.log(2)))
    with pytest.raises(ValueError, match="trim must lie in"):
        res.nll_trimmed_mean(0.5)
    # in-distribution data alone: nothing flagged
    clean = log_likelihood(mix, sde, x_in, divergence="exact")
    assert clean.n_latent_outliers == 0
