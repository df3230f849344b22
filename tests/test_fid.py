"""FID and KID through torchmetrics (sde_diffusion.metrics.fid_kid, `sde-diffusion fid`): the
library's numbers against the toolkit's own Fréchet distance and a hand-computed KID, the exact
FID of two Gaussians, a small feature network in Inception's place, and one-line errors for the
Inception weights that are never downloaded."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from sde_diffusion.cli import main
from sde_diffusion.metrics import digits_features, fid_kid, frechet_distance

torchmetrics = pytest.importorskip("torchmetrics")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits_sets():
    from sde_diffusion.data import digits

    return digits(8, "train"), digits(8, "test")


def test_fid_equals_the_toolkits_frechet_distance_on_the_same_features(digits_sets):
    train, test = digits_sets
    got = fid_kid(train[:400], test, features="digits", kid=False)
    want = frechet_distance(train[:400], test, features="digits")
    assert got["fid"] == pytest.approx(want, rel=1e-5)      # torchmetrics returns float32
    assert got["n_samples"] == 400 and got["n_reference"] == 360 and got["num_features"] == 64
    assert got["kid_mean"] is None


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel(digits_sets):
    train, test = digits_sets
    m = 200
    f1, f2 = digits_features(train[:m]), digits_features(test[:m])
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3                        # noqa: E731
    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    off = lambda g: (g.sum() - g.diag().sum()) / (m * (m - 1))              # noqa: E731
    mmd2 = float(off(kxx) + off(kyy) - 2 * kxy.mean())
    # one subset of all m points: any permutation gives the same unbiased estimate
    got = fid_kid(train[:m], test[:m], features="digits", kid_subsets=1, kid_subset_size=m)
    assert got["kid_mean"] == pytest.approx(mmd2, rel=1e-10)
    a = fid_kid(train[:m], test[:m], features="digits", kid_subsets=5, kid_subset_size=50, seed=1)
    b = fid_kid(train[:m], test[:m], features="digits", kid_subsets=5, kid_subset_size=50, seed=1)
    assert a["kid_mean"] == b["kid_mean"] and a["kid_subset_size"] == 50   # seeded subsets


def test_fid_of_two_gaussians_is_the_squared_mean_shift():
    """Identity features of N(0, I) and N(mu, I) in 4-D: FID -> |mu|^2 (covariances equal)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.0, -0.5, 0.0, 2.0])
    x = torch.randn(20000, 1, 2, 2, generator=g)
    y = torch.randn(20000, 1, 2, 2, generator=g) + mu.view(1, 1, 2, 2)
    got = fid_kid(x, y, features="identity", kid=False)["fid"]
    assert got == pytest.approx(frechet_distance(x, y, features="identity"), rel=1e-5)
    # the mean shift's estimate has sd 2 |mu| sqrt(2 / n) = 0.046: three of them
    assert got == pytest.approx(float(mu @ mu), abs=0.14)


def test_a_small_feature_network_stands_in_for_inception(digits_sets):
    """The whole path (batches, torchmetrics' states, the result) with a network passed in place
    of Inception: a module without num_features (its size read from one call) and a callable."""
    train, test = digits_sets
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    a = fid_kid(train[:300], test, features=net, kid_subsets=4, kid_subset_size=100, batch_size=64)
    b = fid_kid(train[:300], test, features=lambda z: net(z), kid_subsets=4, kid_subset_size=100)
    assert a["num_features"] == 16 and a["fid"] == pytest.approx(b["fid"], rel=1e-5)
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    worse = fid_kid(noise, test, features=net, kid_subsets=4, kid_subset_size=100)
    assert worse["fid"] > 5 * a["fid"] and worse["kid_mean"] > a["kid_mean"]


def test_inception_weights_missing_is_one_clear_line(tmp_path, digits_sets):
    train, test = digits_sets
    with pytest.raises(FileNotFoundError, match="Inception weights not found.*never downloads"):
        fid_kid(train[:10], test[:10], features="inception", weights=str(tmp_path / "none.pth"))
    with pytest.raises(ValueError, match="features='inception'.*never downloads"):
        fid_kid(train[:10], test[:10], features="inception")
    with pytest.raises(ValueError, match="must have the same image shape"):
        fid_kid(train[:10], torch.zeros(10, 3, 8, 8), features="digits")


def test_cli_fid(tmp_path, capsys, digits_sets):
    train, _ = digits_sets
    path = tmp_path / "s.npz"
    np.savez(path, samples=train[:300].numpy())
    out = tmp_path / "fid.json"
    assert main(["fid", "--samples", str(path), "--reference", "digits", "--kid-subsets", "5",
                 "--kid-subset-size", "100", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["features"] == "digits" and line == json.loads(out.read_text())
    assert line["fid"] == pytest.approx(frechet_distance(train[:300], digits_sets[1]), rel=1e-5)
    for args, message in (
            (["--weights", str(tmp_path / "w.pth")], "no such file (the Inception-v3 weights are never downloaded"),
            (["--features", "inception"], "--features inception needs --weights FILE"),
            (["--reference", str(tmp_path / "r.npz")], "--reference"),
            (["--kid-subsets", "0"], "--kid-subsets must be >= 1, got 0")):
        argv = ["fid", "--samples", str(path), "--reference", "digits"] + args
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
