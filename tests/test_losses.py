"""Losses: the exact oracle minimises them, importance sampling is unbiased, parameterizations
agree, the discrete DDPM/SMLD objectives follow their papers, sharding is exact."""
import math

import ml_collections
import pytest
import torch
from torch import nn

from sde_diffusion import SubVPSDE, VESDE, VPSDE, random_mixture
from sde_diffusion.losses import (ddpm_loss, ddpm_times, dsm_loss, get_loss_fn,
                                  importance_sampling_norm, sample_time, smld_loss, smld_times)
from sde_diffusion.models import ScoreModel

SDES = {
    "vp": lambda: VPSDE(),
    "vp_cosine": lambda: VPSDE(schedule="cosine"),
    "subvp": lambda: SubVPSDE(),
    "ve": lambda: VESDE(sigma_min=0.01, sigma_max=5.0),
}



class OracleNet(nn.Module):
    """The exact network of a mixture in a chosen parameterization, times a per-sample scale
    ``c`` (a parameter: ``c = 1`` is exact)."""

    def __init__(self, mixture, parameterization="eps", n=1, scale=1.0):
        super().__init__()
        self.mixture, self.parameterization = mixture, parameterization
        self.c = nn.Parameter(torch.full((n,), float(scale), dtype=torch.float64))

    def forward(self, x, t):
        m, sde = self.mixture, self.mixture.sde
        eps, x0 = m.eps(x, t), m.x0(x, t)
        a, s = sde.alpha(t)[:, None].to(x), sde.sigma(t)[:, None].to(x)
        out = {"eps": eps, "x0": x0, "score": m.score(x, t), "v": a * eps - s * x0}[self.parameterization]
        return self.c[:, None].to(x) * out


def oracle_model(sde, parameterization="eps", n=1, scale=1.0, seed=3):
    mix = random_mixture(2, 4, seed=seed, sde=sde)
    return ScoreModel(OracleNet(mix, parameterization, n, scale), sde, parameterization), mix


def data(mix, n, seed=0):
    return mix.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("weighting,importance", [("score_sde", False), ("likelihood", True)])
def test_oracle_is_the_minimum(sde_name, weighting, importance):
    """The exact model's loss is below a perturbed one's (common random numbers), and its
    gradient with respect to an output scale is zero in expectation (within 4 standard errors)."""
    sde = SDES[sde_name]()
    n = 4000
    model, mix = oracle_model(sde, n=n)
    x0 = data(mix, n)
    kw = dict(weighting=weighting, importance_sampling=importance, eps=1e-3,
              return_per_sample=True)
    per = dsm_loss(model, x0, torch.Generator().manual_seed(1), **kw)
    (grad,) = torch.autograd.grad(per.sum(), model.net.c)   # per-sample d loss / d c at c = 1
    se = grad.std() / math.sqrt(n)
    assert abs(float(grad.mean())) < 4 * float(se), (float(grad.mean()), float(se))
    for scale in (0.9, 1.1):
        other, _ = oracle_model(sde, n=n, scale=scale)
        per_other = dsm_loss(other, x0, torch.Generator().manual_seed(1), **kw)
        diff = (per_other - per).detach()
        assert float(diff.mean()) > 4 * float(diff.std()) / math.sqrt(n)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_importance_sampling_density(sde_name):
    """Times drawn for importance sampling follow p(t) ~ g^2/sigma^2, computed here by numerical
    integration of f_g2 and sigma (independent of the log-SNR identity used by the sampler)."""
    sde, eps = SDES[sde_name](), 1e-3
    grid = torch.linspace(eps, sde.T, 200001, dtype=torch.float64)
    _, g2 = sde.f_g2(grid)
    dens = g2 / sde.sigma(grid) ** 2
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                     torch.cumsum(0.5 * (dens[1:] + dens[:-1]) * (grid[1:] - grid[:-1]), 0)])
    Z = float(cdf[-1])
    assert importance_sampling_norm(sde, eps) == pytest.approx(Z, rel=1e-5)
    t = sample_time(sde, 20000, torch.Generator().manual_seed(0), importance_sampling=True,
                    eps=eps, dtype=torch.float64)
    assert float(t.min()) >= eps and float(t.max()) <= sde.T
    # Kolmogorov-Smirnov distance between the empirical and the numerical CDF
    ts, _ = torch.sort(t)
    F = torch.from_numpy(__import__("numpy").interp(ts.numpy(), grid.numpy(), (cdf / Z).numpy()))
    emp = torch.arange(1, len(ts) + 1, dtype=torch.float64) / len(ts)
    ks = float((F - emp).abs().max())
    assert ks < 1.63 / math.sqrt(len(ts)), ks   # 1 % critical value


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_importance_sampled_likelihood_loss_is_unbiased(sde_name):
    """Importance-sampled and uniformly-sampled likelihood-weighted losses agree in expectation."""
    sde, n = SDES[sde_name](), 40000
    model, mix = oracle_model(sde, n=n, scale=0.8)   # a wrong model: non-trivial residual
    x0 = data(mix, n)
    est = {}
    for importance in (False, True):
        per = dsm_loss(model, x0, torch.Generator().manual_seed(7 + importance),
                       weighting="likelihood", importance_sampling=importance, eps=1e-2,
                       return_per_sample=True).detach()
        est[importance] = (float(per.mean()), float(per.std()) / math.sqrt(n))
    (m0, s0), (m1, s1) = est[False], est[True]
    assert abs(m0 - m1) < 4 * math.hypot(s0, s1), est
    assert s1 < s0   # and it is the variance reducer


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("parameterization", ["x0", "v", "score"])
def test_parameterizations_agree_when_exact(sde_name, parameterization):
    sde, n = SDES[sde_name](), 256
    ref, mix = oracle_model(sde, "eps", n=n)
    other, _ = oracle_model(sde, parameterization, n=n)
    x0 = data(mix, n)
    for kw in (dict(weighting="score_sde"), dict(weighting="likelihood"),
               dict(weighting="likelihood", importance_sampling=True, reduce_mean=False)):
        a = dsm_loss(ref, x0, torch.Generator().manual_seed(2), eps=1e-3, return_per_sample=True, **kw)
        b = dsm_loss(other, x0, torch.Generator().manual_seed(2), eps=1e-3, return_per_sample=True, **kw)
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)
    if isinstance(sde, VPSDE) or isinstance(sde, VESDE):
        fn = ddpm_loss if isinstance(sde, VPSDE) else smld_loss
        a = fn(ref, x0, torch.Generator().manual_seed(4), return_per_sample=True)
        b = fn(other, x0, torch.Generator().manual_seed(4), return_per_sample=True)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


def test_score_sde_formulas():
    """dsm_loss equals score_sde's written forms: ||s sigma + z||^2 and ||s + z/sigma||^2 g^2."""
    sde, n = VPSDE(), 64
    model, mix = oracle_model(sde, "score", n=n, scale=0.7)
    x0 = data(mix, n)
    t = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    z = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mean, std = sde.marginal_prob(x0, t)
    s = model.score(mean + std[:, None] * z, t)
    g2 = sde.sde(x0, t)[1] ** 2
    for reduce_mean, red in ((True, lambda v: v.mean(1)), (False, lambda v: 0.5 * v.sum(1))):
        got = dsm_loss(model, x0, t=t, noise=z, reduce_mean=reduce_mean, return_per_sample=True)
        torch.testing.assert_close(got, red((s * std[:, None] + z) ** 2))
        got = dsm_loss(model, x0, t=t, noise=z, weighting="likelihood", reduce_mean=reduce_mean,
                       return_per_sample=True)
        torch.testing.assert_close(got, red((s + z / std[:, None]) ** 2) * g2)


def test_ddpm_loss_matches_ho_et_al():
    sde, n = VPSDE(N=1000), 128
    model, mix = oracle_model(sde, "eps", n=n, scale=0.9)
    x0 = data(mix, n)
    abar = torch.cumprod(1 - sde.discrete_betas, 0)
    times = ddpm_times(sde)
    inside = times < sde.T
    assert int(inside.sum()) > 900   # only the last few levels lie beyond T and are clamped
    torch.testing.assert_close(sde.alpha(times[inside]) ** 2, abar[inside], rtol=1e-9, atol=1e-12)
    idx = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0))
    idx[:10] = torch.arange(10)   # include the smallest noise levels
    z = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = ddpm_loss(model, x0, indices=idx, noise=z, return_per_sample=True)
    a, s = sde.alpha(times[idx]), sde.sigma(times[idx])
    ok = inside[idx]
    torch.testing.assert_close(a[ok] ** 2, abar[idx][ok])
    x_i = a[:, None] * x0 + s[:, None] * z
    eps_hat = model.eps(x_i, times[idx])
    torch.testing.assert_close(got, ((eps_hat - z) ** 2).mean(1))


def test_smld_loss_matches_song_ermon():
    sde, n = VESDE(sigma_min=0.01, sigma_max=5.0, N=100), 128
    model, mix = oracle_model(sde, "score", n=n, scale=1.2)
    x0 = data(mix, n)
    times = smld_times(sde)
    torch.testing.assert_close(times, torch.linspace(0, 1, 100, dtype=torch.float64))
    idx = torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(0))
    z = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sig = sde.discrete_sigmas[idx]
    got = smld_loss(model, x0, indices=idx, noise=z, return_per_sample=True)
    score = model.score(x0 + sig[:, None] * z, times[idx])
    want = 0.5 * ((score + z / sig[:, None]) ** 2).sum(1) * sig ** 2   # score_sde's SMLD loss
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("which", ["dsm", "dsm_is", "ddpm"])
def test_sharded_batches_equal_the_global_batch(which):
    sde, n, world = VPSDE(), 48, 3
    model, mix = oracle_model(sde, "eps", n=n // world, scale=0.8)
    x0 = data(mix, n)

    def run(x, rank, ws):
        g = torch.Generator().manual_seed(11)
        if which == "ddpm":
            return ddpm_loss(model, x, g, rank=rank, world_size=ws, return_per_sample=True)
        return dsm_loss(model, x, g, importance_sampling=which == "dsm_is", rank=rank,
                        world_size=ws, return_per_sample=True)

    big, _ = oracle_model(sde, "eps", n=n, scale=0.8)
    g = torch.Generator().manual_seed(11)
    full = (ddpm_loss(big, x0, g, return_per_sample=True) if which == "ddpm" else
            dsm_loss(big, x0, g, importance_sampling=which == "dsm_is", return_per_sample=True))
    b = n // world
    parts = torch.cat([run(x0[r * b:(r + 1) * b], r, world) for r in range(world)])
    torch.testing.assert_close(parts, full)


def _cfg(**training):
    c = ml_collections.ConfigDict({"training": {"continuous": True, "likelihood_weighting": False,
                                                "importance_sampling": False, "reduce_mean": True,
                                                "eps": 1e-5}})
    c.training.update(training)
    return c


def test_get_loss_fn_follows_the_config():
    vp, ve, sub = VPSDE(), VESDE(sigma_max=5.0), SubVPSDE()
    model, mix = oracle_model(vp, n=32, scale=0.8)
    x0 = data(mix, 32)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fn = get_loss_fn(_cfg(likelihood_weighting=True, importance_sampling=True), vp)
    want = dsm_loss(model, x0, g(), weighting="likelihood", importance_sampling=True, eps=1e-5)
    torch.testing.assert_close(fn(model, x0, g()), want)
    fn = get_loss_fn(_cfg(continuous=False), vp)
    torch.testing.assert_close(fn(model, x0, g()), ddpm_loss(model, x0, g()))
    ve_model, ve_mix = oracle_model(ve, n=32, scale=0.8)
    fn = get_loss_fn(_cfg(continuous=False, reduce_mean=False), ve)
    torch.testing.assert_close(fn(ve_model, x0, g()), smld_loss(ve_model, x0, g()))
    with pytest.raises(ValueError, match="SubVPSDE"):
        get_loss_fn(_cfg(continuous=False), sub)
    with pytest.raises(ValueError, match="continuous=True"):
        get_loss_fn(_cfg(continuous=False, likelihood_weighting=True), vp)
    with pytest.raises(ValueError, match="eps"):
        get_loss_fn(_cfg(eps=0.0), vp)


def test_clear_errors():
    vp = VPSDE()
    model, mix = oracle_model(vp, n=8)
    x0 = data(mix, 8)
    with pytest.raises(ValueError, match="weighting must be one of"):
        dsm_loss(model, x0, weighting="uniform")
    with pytest.raises(ValueError, match="eps must lie in"):
        dsm_loss(model, x0, eps=2.0)
    with pytest.raises(ValueError, match="ScoreModel"):
        dsm_loss(lambda x, t: x, x0)
    with pytest.raises(ValueError, match="noise must be shaped like x0"):
        dsm_loss(model, x0, noise=torch.zeros(8, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank must be"):
        dsm_loss(model, x0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="needs a VPSDE"):
        ddpm_loss(oracle_model(VESDE(), n=8)[0], x0)
    with pytest.raises(ValueError, match="needs a VESDE"):
        smld_loss(model, x0)
    with pytest.raises(ValueError, match="indices"):
        ddpm_loss(model, x0, indices=torch.full((8,), 1000))


def test_float32_training_gradients_flow():
    """A real network: finite loss and gradients for every loss in float32."""
    from sde_diffusion.models import TimeMLP
    torch.manual_seed(0)
    x0 = torch.randn(32, 2)
    for sde, fns in ((VPSDE(), (dsm_loss, ddpm_loss)), (VESDE(sigma_max=5.0), (dsm_loss, smld_loss)),
                     (SubVPSDE(), (dsm_loss,))):
        for p in ("eps", "x0", "v", "score"):
            net = TimeMLP(2, hidden=16, depth=2)
            nn.init.normal_(net.out.weight, std=0.1)
            model = ScoreModel(net, sde, p)
            for fn in fns:
                loss = fn(model, x0, torch.Generator().manual_seed(0))
                loss.backward()
                assert torch.isfinite(loss)
                assert all(torch.isfinite(q.grad).all() for q in net.parameters() if q.grad is not None)


# ---- labels: dropout and the classifier's cross-entropy ---------------------------------------------
class LabelNet(nn.Module):
    """Output ``x * w[y]``: which label reached the network changes the loss."""

    def __init__(self, num_classes):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, num_classes + 1, dtype=torch.float64))

    def forward(self, x, t, y=None):
        return x * self.w[y][:, None]


def test_label_dropout_in_the_loss_equals_dsm_on_the_dropped_labels():
    from sde_diffusion.losses import drop_labels
    vp = VPSDE()
    model = ScoreModel(LabelNet(4), vp)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(64) % 4
    c = _cfg(p_uncond=0.3)
    c.model = ml_collections.ConfigDict({"num_classes": 4, "name": "mlp"})
    got = get_loss_fn(c, vp)(model, x0, torch.Generator().manual_seed(5), y=y)
    g = torch.Generator().manual_seed(5)
    dropped = drop_labels(y, 0.3, 4, g)                       # drawn first, from the same generator
    assert 0 < int((dropped == 4).sum()) < 64
    want = dsm_loss(model, x0, g, eps=1e-5, y=dropped)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    undropped = dsm_loss(model, x0, torch.Generator().manual_seed(5), eps=1e-5, y=y)
    assert not torch.allclose(got, undropped)                # the dropout changes what is trained
    c.training.p_uncond = 0.0                                  # no dropout: nothing drawn
    torch.testing.assert_close(get_loss_fn(c, vp)(model, x0, torch.Generator().manual_seed(5), y=y), undropped)


def test_classifier_loss_is_the_cross_entropy_on_the_forward_marginal():
    from sde_diffusion.losses import classifier_loss
    from sde_diffusion.models.classifier import MLPClassifier, NoisyClassifier
    vp = VPSDE()
    torch.manual_seed(0)
    net = MLPClassifier(2, num_classes=3, hidden=8, depth=1, embed_dim=8).double()
    nn.init.normal_(net.head.weight)
    clf = NoisyClassifier(net, vp)
    x0 = torch.randn(16, 2, dtype=torch.float64)
    y = torch.arange(16) % 3
    t, z = torch.rand(16, dtype=torch.float64) * 0.9 + 0.05, torch.randn(16, 2, dtype=torch.float64)
    xt = vp.alpha(t)[:, None] * x0 + vp.sigma(t)[:, None] * z
    want = -torch.log_softmax(net(xt, t), -1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(classifier_loss(clf, x0, y, t=t, noise=z, return_per_sample=True), want)
    # drawn t and noise: the same numbers as dsm_loss draws (t first, then the noise)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    tt = sample_time(vp, 16, g(), eps=1e-5, dtype=torch.float64)
    gg = g()
    sample_time(vp, 16, gg, eps=1e-5, dtype=torch.float64)
    zz = torch.randn(16, 2, generator=gg, dtype=torch.float64)
    torch.testing.assert_close(classifier_loss(clf, x0, y, g(), eps=1e-5),
                               classifier_loss(clf, x0, y, eps=1e-5, t=tt, noise=zz))
    c = _cfg(task="classifier")
    c.model = ml_collections.ConfigDict({"num_classes": 3, "name": "mlp_classifier"})
    torch.testing.assert_close(get_loss_fn(c, vp)(clf, x0, g(), y=y), classifier_loss(clf, x0, y, g(), eps=1e-5))
    c.training.importance_sampling = True
    with pytest.raises(ValueError, match="uniform continuous times"):
        get_loss_fn(c, vp)
