"""The exact posterior of a Gaussian-mixture prior under y = A x + sigma_y n, checked against brute
force: the posterior density and the evidence p(y) on a 2-d grid (isotropic, diagonal and full
prior components), the noiseless (sigma_y = 0) conditional of a mask on a 1-d grid, importance
sampling in 6-d; samples of a noiseless posterior satisfy A x = y; its score at t > 0 is finite
and it samples through the toolkit's solvers."""
import math

import pytest
import torch

from sde_diffusion import VESDE, VPSDE, GaussianMixture, random_mixture, sample
from sde_diffusion.inverse import Colorization, Dense, Mask, observe
from sde_diffusion.inverse.posterior import PosteriorMixture, exact_posterior, exact_posteriors
from sde_diffusion.metrics import sliced_wasserstein

GRID = torch.linspace(-2.5, 2.5, 701, dtype=torch.float64)
H = float(GRID[1] - GRID[0])


def _priors():
    return {"isotropic": random_mixture(2, 5, seed=1, sde=VPSDE()),
            "diagonal": random_mixture(2, 5, seed=2, sde=VPSDE(), diagonal=True, std_range=(0.1, 0.4)),
            "full": random_mixture(2, 5, seed=3, sde=VPSDE(), full=True, std_range=(0.1, 0.4))}


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
def test_posterior_density_and_evidence_match_a_grid(kind):
    prior = _priors()[kind]
    op, sigma_y = Dense(torch.tensor([[1.0, 0.5]])), 0.3
    y = torch.tensor([0.3], dtype=torch.float64)
    post = exact_posterior(prior, op, y, sigma_y)
    X = torch.stack(torch.meshgrid(GRID, GRID, indexing="ij"), -1).reshape(-1, 2)
    log_joint = prior.log_prob(X) - 0.5 * ((X @ op.matrix().T - y) ** 2).sum(1) / sigma_y ** 2 \
        - 0.5 * math.log(2 * math.pi * sigma_y ** 2)
    log_evidence = float(torch.logsumexp(log_joint, 0)) + 2 * math.log(H)
    assert abs(post.log_evidence - log_evidence) < 1e-6           # measured 4e-14 (isotropic)
    keep = log_joint - log_evidence > -10
    err = (post.log_prob(X[keep]) - (log_joint[keep] - log_evidence)).abs().max()
    assert float(err) < 1e-8                                      # measured 5e-14
    assert abs(float(post.weights.sum()) - 1) < 1e-12 and post.kind == "full"


def test_noiseless_mask_posterior_is_the_conditional():
    prior = _priors()["full"]
    op = Mask(torch.tensor([True, False]))
    y = torch.tensor([0.2], dtype=torch.float64)
    post = exact_posterior(prior, op, y, 0.0)
    assert isinstance(post, PosteriorMixture)
    assert abs(float(post.weights.sum()) - 1) < 1e-12
    # every component is degenerate along the observed axis: one zero eigenvalue
    lam = torch.linalg.eigvalsh(post.covariances)
    assert (lam[:, 0].abs() < 1e-15).all() and (lam[:, 1] > 1e-3).all()
    s = post.sample(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float((s[:, 0] - 0.2).abs().max()) < 1e-14
    # p(x_2 | x_1 = y) on a 1-d grid, brute force: the prior's joint density along x_1 = y
    X = torch.stack([torch.full_like(GRID, 0.2), GRID], 1)
    log_cond = prior.log_prob(X)
    log_cond = log_cond - (torch.logsumexp(log_cond, 0) + math.log(H))
    comp = torch.stack([torch.distributions.Normal(post.means[k, 1], post.covariances[k, 1, 1].sqrt())
                        .log_prob(GRID) for k in range(post.n_components)], 1)
    mine = torch.logsumexp(comp + post.weights.log(), 1)
    keep = log_cond > -10
    assert float((mine[keep] - log_cond[keep]).abs().max()) < 1e-8   # measured 1e-13


def test_noiseless_posterior_is_usable_at_every_time_and_by_solvers():
    prior = random_mixture(6, 4, seed=4, sde=VESDE())
    op = Mask(torch.tensor([True, False, True, False, False, True]))
    x0 = prior.sample(1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    post = exact_posterior(prior, op, op.A(x0), 0.0)
    xt = post.sample(64, t=0.3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.isfinite(post.score(xt, 0.3)).all() and torch.isfinite(post.log_prob(xt, 0.3)).all()
    # sampled with a solver from its exact score, it matches its own samples
    out = sample(post, x_T=post.sample(500, t=1.0, generator=torch.Generator().manual_seed(3),
                                       dtype=torch.float64), solver="dpm_solver++_2m", steps=60)
    ref = post.sample(500, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref2 = post.sample(500, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert sliced_wasserstein(out.samples, ref) < 2 * sliced_wasserstein(ref2, ref) + 0.01


def test_importance_sampling_agrees_in_6d():
    prior = random_mixture((3, 1, 2), 6, seed=3, sde=VPSDE())
    op, sigma_y = Colorization((3, 1, 2)), 0.05
    x0 = prior.sample(1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = observe(op, x0, sigma_y, 5)[0]
    post = exact_posterior(prior, op, y, sigma_y)
    X = prior.sample(400_000, generator=torch.Generator().manual_seed(7), dtype=torch.float64).flatten(1)
    w = torch.softmax(-0.5 * ((X @ op.matrix().T - y.flatten()) ** 2).sum(1) / sigma_y ** 2, 0)
    mean_is = (w[:, None] * X).sum(0)
    cov_is = (w[:, None] * (X - mean_is)).T @ (X - mean_is)
    m = (post.weights[:, None] * post.means.flatten(1)).sum(0)
    assert float((mean_is - m).abs().max()) < 0.01                     # measured ~1e-3
    assert float((cov_is - post.covariance()).abs().max()) < 0.01


def test_errors_and_batches():
    prior = random_mixture(3, 2, seed=0, sde=VPSDE())
    rank_one = Dense(torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="singular"):
        exact_posterior(prior, rank_one, torch.zeros(2), 0.0)
    exact_posterior(prior, rank_one, torch.zeros(2), 0.1)              # noisy: fine
    with pytest.raises(ValueError, match=r"event shape \(3,\)"):
        exact_posterior(prior, Mask(torch.ones(4, dtype=torch.bool)), torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        exact_posterior(prior, rank_one, torch.zeros(3))
    ys = torch.randn(3, 2, dtype=torch.float64)
    posts = exact_posteriors(prior, Dense(torch.eye(3)[:2]), ys, 0.2)
    assert len(posts) == 3
    torch.testing.assert_close(posts[1].means, exact_posterior(prior, Dense(torch.eye(3)[:2]), ys[1], 0.2).means)


@pytest.mark.parametrize("sigma_y", [0.0, 0.2])
def test_isotropic_shortcut_equals_the_general_eigensolver(sigma_y):
    """Isotropic priors take a low-rank path (QR + a d_y x d_y eigensolver); the same prior given
    as full covariances takes torch.linalg.eigh of the posterior covariance."""
    iso = random_mixture(7, 4, seed=6, sde=VPSDE())
    full = GaussianMixture(iso.weights, iso.means, covariances=torch.diag_embed(iso.stds ** 2), sde=VPSDE())
    op = Dense(torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    y = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64)
    a, b = exact_posterior(iso, op, y, sigma_y), exact_posterior(full, op, y, sigma_y)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.means, b.means, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.covariances, b.covariances, rtol=0, atol=1e-12)
    x = a.sample(50, t=0.5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(a.score(x, 0.5), b.score(x, 0.5), rtol=1e-9, atol=1e-9)
    if sigma_y == 0:
        assert int((torch.linalg.eigvalsh(a.covariances).abs() < 1e-14).sum()) == 4 * 3
