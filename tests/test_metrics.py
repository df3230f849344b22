"""Metrics: sliced Wasserstein, Fréchet distance (closed form, digits classifier), mode statistics."""
import math

import numpy as np
import pytest
import torch
from scipy import linalg, stats

from sde_diffusion import GaussianMixture
from sde_diffusion.data import digits
from sde_diffusion.metrics import (digits_accuracy, digits_fd_baselines, frechet_distance,
                                   frechet_distance_from_stats, mode_statistics, sliced_wasserstein,
                                   wasserstein_1d)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- sliced Wasserstein -------------------------------------------------------------------------
def test_sliced_wasserstein_identical_and_fresh_sets():
    x = torch.randn(3000, 2, generator=gen(0))
    assert sliced_wasserstein(x, x.clone()) == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(3000, generator=gen(1))]) < 1e-12   # order-free
    assert sliced_wasserstein(x, torch.randn(3000, 2, generator=gen(2))) < 0.1
    assert sliced_wasserstein(x, x + 1.0) > 0.9
    assert sliced_wasserstein(x, x + 0.3, generator=gen(5)) == sliced_wasserstein(x, x + 0.3, generator=gen(5))


def test_sliced_wasserstein_known_shift():
    x = torch.randn(2000, 1, generator=gen(0), dtype=torch.float64)
    assert sliced_wasserstein(x, x + 0.7) == pytest.approx(0.7, abs=1e-12)            # 1-D: exact W_2
    assert sliced_wasserstein(x, x - 0.7, p=1) == pytest.approx(0.7, abs=1e-12)
    # D dims, shift c: W_2 along theta is |theta . c|, and E (theta . c)^2 = |c|^2 / D on the sphere
    x = torch.randn(500, 4, generator=gen(1))
    c = torch.tensor([0.3, -0.4, 1.2, 0.0])
    sw = sliced_wasserstein(x, x + c, n_projections=4000, generator=gen(2))
    assert sw == pytest.approx(float(c.norm()) / 2, rel=0.03)


def test_wasserstein_1d_unequal_sizes():
    u, v = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert float(wasserstein_1d(u, v, p=1)) == pytest.approx(1 / 6, abs=1e-12)          # by hand
    assert float(wasserstein_1d(u, v, p=2)) == pytest.approx(1 / 12, abs=1e-12)
    a = torch.randn(301, generator=gen(0), dtype=torch.float64)
    b = 0.5 + 2 * torch.randn(457, generator=gen(1), dtype=torch.float64)
    assert float(wasserstein_1d(a, b, p=1)) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-10)
    assert sliced_wasserstein(a[:, None], b[:, None], p=1) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-10)
    with pytest.raises(ValueError, match="same dimension, got 2 and 3"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 3))


# ---- Fréchet distance -----------------------------------------------------------------------------
def random_spd(d, seed):
    a = np.random.RandomState(seed).randn(d, d)
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_from_stats_matches_closed_form():
    d = 6
    rs = np.random.RandomState(0)
    m1, m2, s1, s2 = rs.randn(d), rs.randn(d), random_spd(d, 1), random_spd(d, 2)
    closed = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert frechet_distance_from_stats(m1, s1, m2, s2) == pytest.approx(closed, rel=1e-9)
    assert frechet_distance_from_stats(m2, s2, m1, s1) == pytest.approx(closed, rel=1e-9)
    assert frechet_distance_from_stats(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance_from_stats([1.0], [[4.0]], [-1.0], [[9.0]]) == pytest.approx(4.0 + 1.0, abs=1e-12)
    # singular covariances (rank-deficient features) stay finite and exact
    s_sing = np.diag([1.0, 0.0, 2.0])
    assert frechet_distance_from_stats(np.zeros(3), s_sing, np.zeros(3), s_sing) == pytest.approx(0.0, abs=1e-9)


def test_frechet_of_gaussian_samples():
    d, n = 3, 20000
    rs = np.random.RandomState(3)
    m1, m2, s1, s2 = rs.randn(d), rs.randn(d), random_spd(d, 4), random_spd(d, 5)
    x = torch.from_numpy(rs.multivariate_normal(m1, s1, size=n))
    y = torch.from_numpy(rs.multivariate_normal(m2, s2, size=n))
    closed = frechet_distance_from_stats(m1, s1, m2, s2)
    assert frechet_distance(x, y, features="identity") == pytest.approx(closed, rel=0.05)
    assert frechet_distance(x, y, features=lambda z: z.flatten(1)) == frechet_distance(x, y, features="identity")
    with pytest.raises(ValueError, match="features must be one of"):
        frechet_distance(x, y, features="inception")


def test_digits_classifier_and_baselines():
    assert digits_accuracy("test") > 0.9
    base = digits_fd_baselines()
    assert base["test_accuracy"] > 0.9 and base["n"] == 1437
    assert 0 < base["real_vs_real"] < base["real_vs_noise"] / 20
    # the features undo digits(16)'s bilinear resize: 16x16 real digits look like their 8x8 originals
    assert frechet_distance(digits(16, "test"), digits(8, "test")) < 1e-6
    assert digits_fd_baselines(size=16)["real_vs_real"] == pytest.approx(base["real_vs_real"], rel=1e-4)
    # wrong digit classes are far: ones against everything
    x, y = digits(8, "train", return_labels=True)
    assert frechet_distance(x[y == 1], digits(8, "test")) > 5 * base["real_vs_real"]
    with pytest.raises(ValueError, match=r"\(N, 1, S, S\)"):
        frechet_distance(torch.zeros(10, 3, 8, 8), torch.zeros(10, 3, 8, 8))


# ---- mode statistics ------------------------------------------------------------------------------
def oracle():
    return GaussianMixture([0.2, 0.3, 0.5], [[-0.6, 0.0], [0.6, 0.0], [0.0, 0.6]], [[0.05, 0.05], [0.08, 0.08], [0.04, 0.1]])


def test_mode_statistics_on_oracle_samples():
    gm = oracle()
    n = 20000
    x = gm.sample(n, generator=gen(0), dtype=torch.float64)
    st = mode_statistics(x, gm)
    w = gm.weights
    assert torch.allclose(st["weights"], w, atol=float(4 * (w * (1 - w) / n).sqrt().max()))
    assert st["weight_tv"] < 0.02
    assert st["max_mean_error"] < 4 / math.sqrt(0.2 * n) * 1.5
    assert torch.allclose(st["variance_ratio"], torch.ones(3, dtype=torch.float64), atol=0.05)
    assert torch.allclose(st["true_variances"][2], torch.tensor([0.04 ** 2, 0.1 ** 2], dtype=torch.float64))
    assert int(st["counts"].sum()) == n


def test_mode_statistics_sees_a_missing_mode_and_a_wrong_width():
    gm = oracle()
    x, labels = gm.sample(6000, generator=gen(1), dtype=torch.float64, return_labels=True)
    collapsed = x[labels != 0]                                   # mode 0 dropped
    st = mode_statistics(collapsed, gm)
    assert st["counts"][0] == 0 and math.isnan(float(st["variances"][0, 0]))
    assert st["weight_tv"] == pytest.approx(float(gm.weights[0]), abs=0.03)
    wide = gm.means[labels] + 1.5 * (x - gm.means[labels])      # every mode 1.5x too wide
    assert torch.allclose(mode_statistics(wide, gm)["variance_ratio"], torch.full((3,), 2.25, dtype=torch.float64),
                          rtol=0.1)
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 2\)"):
        mode_statistics(torch.zeros(4, 3), gm)


def test_mode_statistics_of_a_full_covariance_mixture():
    """Full covariances: the per-coordinate true variances are their diagonals (was: an error
    reading the missing per-axis stds)."""
    cov = torch.tensor([[[0.004, 0.002], [0.002, 0.003]], [[0.002, -0.001], [-0.001, 0.005]]],
                       dtype=torch.float64)
    gm = GaussianMixture([0.4, 0.6], [[-0.6, 0.0], [0.6, 0.0]], covariances=cov)
    x = gm.sample(20000, generator=gen(1), dtype=torch.float64)
    st = mode_statistics(x, gm)
    assert torch.equal(st["true_variances"], cov.diagonal(dim1=1, dim2=2))
    assert torch.allclose(st["variance_ratio"], torch.ones(2, dtype=torch.float64), atol=0.05)
