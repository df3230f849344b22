"""Data sets (toys, digits, oracle, user files), the registry and the sharded batch iterator."""
import math

import numpy as np
import pytest
import torch

from sde_diffusion import GaussianMixture
from sde_diffusion.data import (DATASET_CLASSES, DATASETS, check_labels, checkerboard, digits, digits_labels,
                                eight_gaussians, get_dataset, image_folder_classes, infinite_batches,
                                load_image_folder, load_npz, mixture_dataset, rings, scale_to_unit,
                                swiss_roll, two_moons, unscale)

TOYS = {"moons": two_moons, "swiss_roll": swiss_roll, "8gaussians": eight_gaussians,
        "checkerboard": checkerboard, "rings": rings}


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- toys -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_shape_range_and_seeding(name):
    fn = TOYS[name]
    x = fn(4000, gen(0))
    assert x.shape == (4000, 2) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert float(x.abs().max()) < 1.3                      # roughly [-1, 1]
    assert float(x.abs().max()) > 0.7                      # and filling it
    assert torch.equal(x, fn(4000, gen(0)))
    assert not torch.equal(x, fn(4000, gen(1)))
    assert torch.equal(get_dataset(name, n=4000, seed=0), x)
    assert torch.equal(get_dataset(name, n=4000, generator=gen(0)), x)


def test_toy_geometry():
    g = gen(0)
    m = two_moons(2000, g, noise=0.0) * 1.5 + torch.tensor([0.5, 0.25])      # undo the stated scaling
    upper = ((m.norm(dim=1) - 1).abs() < 1e-5) & (m[:, 1] >= -1e-6)      # sklearn's outer half circle
    lower = (((m - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs() < 1e-5) & (m[:, 1] <= 0.5 + 1e-6)
    assert bool((upper | lower).all())
    assert abs(float(upper.double().mean()) - 0.5) < 0.05
    cb = checkerboard(5000, g) * 2
    assert float(cb.abs().max()) <= 2.0
    assert bool(((torch.floor(cb[:, 0]) + torch.floor(cb[:, 1])) % 2 == 0).all())   # filled cells only
    r = rings(4000, g, noise=0.0).norm(dim=1)
    radii = torch.tensor([0.25, 0.5, 0.75, 0.95])
    assert float((r[:, None] - radii).abs().min(1).values.max()) < 1e-5
    e = eight_gaussians(8000, g, noise=0.0)
    angles = torch.atan2(e[:, 1], e[:, 0]) / (math.pi / 4)
    assert torch.allclose(e.norm(dim=1), torch.full((8000,), 0.8), atol=1e-5)
    assert torch.allclose(angles, angles.round(), atol=1e-4)
    s = swiss_roll(4000, g, noise=0.0)
    assert float(s.norm(dim=1).max()) <= 1.0 + 1e-6 and float(s.norm(dim=1).min()) >= 1 / 3 - 1e-6


# ---- class labels ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["moons", "8gaussians", "rings", "checkerboard"])
def test_toy_labels_leave_the_points_alone_and_name_the_class(name):
    x = get_dataset(name, n=4000, seed=3)
    xl, y = get_dataset(name, n=4000, seed=3, return_labels=True)
    assert torch.equal(x, xl)                                   # the same points as without labels
    K = DATASET_CLASSES[name]
    assert y.dtype == torch.int64 and y.shape == (4000,)
    counts = torch.bincount(y, minlength=K)
    assert counts.numel() == K and bool((counts > 4000 / K * 0.8).all())     # every class, balanced
    # each class is where the module doc says it is (noise-free points)
    fn = TOYS[name]
    pts, lab = (fn(4000, gen(5), return_labels=True) if name == "checkerboard"
                else fn(4000, gen(5), noise=0.0, return_labels=True))
    if name == "moons":
        m = pts.double() * 1.5 + torch.tensor([0.5, 0.25], dtype=torch.float64)
        on_upper = ((m.norm(dim=1) - 1).abs() < 1e-5) & (m[:, 1] >= -1e-6)
        assert torch.equal(on_upper, lab == 0)
    elif name == "8gaussians":
        angle = torch.atan2(pts[:, 1], pts[:, 0]).remainder(2 * math.pi)
        assert torch.equal((angle / (math.pi / 4)).round().long() % 8, lab)
    elif name == "rings":
        r = pts.norm(dim=1)
        assert torch.equal((r[:, None] - torch.tensor([0.25, 0.5, 0.75, 0.95])).abs().argmin(1), lab)
    else:
        col, row = torch.floor(pts[:, 0] * 2).long() + 2, torch.floor(pts[:, 1] * 2).long() + 2
        assert torch.equal(col, lab // 2) and torch.equal(row // 2, lab % 2)


def test_labelled_mixture_npz_and_image_folder(tmp_path):
    gm = GaussianMixture([0.3, 0.7], [[-0.5, 0.0], [0.5, 0.2]], [0.1, 0.05])
    x, comp = mixture_dataset(gm, 5000, gen(0), return_labels=True)
    assert torch.equal(x, mixture_dataset(gm, 5000, gen(0)))
    assert abs(float(comp.double().mean()) - 0.7) < 0.03
    assert float(x[comp == 0, 0].mean()) < 0 < float(x[comp == 1, 0].mean())
    # npz with a y array
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 2)), y=np.array([0, 2, 1, 2]), f=np.ones(4))
    xs, ys = get_dataset("npz", path=str(path), return_labels=True)
    assert xs.shape == (4, 2) and ys.tolist() == [0, 2, 1, 2] and ys.dtype == torch.int64
    with pytest.raises(ValueError, match=r"labels 'f' of .* must be integers|must be integers"):
        load_npz(path, return_labels=True, label_key="f")
    np.savez(tmp_path / "nolab.npz", x=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"has no label array 'y'.*\['x'\]"):
        load_npz(tmp_path / "nolab.npz", return_labels=True)
    np.savez(tmp_path / "short.npz", x=np.zeros((4, 2)), y=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"must have shape \(4,\)"):
        load_npz(tmp_path / "short.npz", return_labels=True)
    np.save(tmp_path / "p.npy", np.zeros((4, 2)))
    with pytest.raises(ValueError, match="no labels"):
        load_npz(tmp_path / "p.npy", return_labels=True)
    # image folder with one subfolder per class
    import matplotlib.image as mpimg
    root = tmp_path / "imgs"
    for cls, value, count in (("b_dog", 0.8, 2), ("a_cat", 0.2, 3)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            mpimg.imsave(root / cls / f"{i}.png", np.full((4, 4, 3), value, np.float32))
    assert image_folder_classes(root) == ["a_cat", "b_dog"]
    xi, yi = get_dataset("images", path=str(root), size=4, channels=1, return_labels=True)
    assert xi.shape == (5, 1, 4, 4) and yi.tolist() == [0, 0, 0, 1, 1]
    assert torch.allclose(xi[yi == 0], torch.full((3, 1, 4, 4), 0.2 * 2 - 1), atol=2.01 / 255)
    with pytest.raises(ValueError, match="has no subfolders: class labels need one subfolder"):
        load_image_folder(root / "a_cat", 4, return_labels=True)


def test_label_checks_and_unlabelled_sets():
    with pytest.raises(ValueError, match=r"data set 'swiss_roll' has no class labels; data sets with labels are"):
        get_dataset("swiss_roll", n=10, return_labels=True)
    assert check_labels(torch.tensor([0, 2]), 2, 3).tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for num_classes=3, got values in \[0, 3\]"):
        check_labels(torch.tensor([0, 3]), 2, 3)
    with pytest.raises(ValueError, match="labels must be >= 0, got -1"):
        check_labels(torch.tensor([0, -1]), 2)
    with pytest.raises(ValueError, match="labels must be integers, got torch.float32"):
        check_labels(torch.tensor([0.0, 1.0]), 2)


# ---- digits -------------------------------------------------------------------------------------
def test_digits_splits_scaling_and_sizes():
    tr, te, al = digits(8, "train"), digits(8, "test"), digits(8, "all")
    assert tr.shape == (1437, 1, 8, 8) and te.shape == (360, 1, 8, 8) and al.shape == (1797, 1, 8, 8)
    assert float(al.min()) == -1.0 and float(al.max()) == 1.0 and tr.dtype == torch.float32
    # the split is a fixed partition of all images
    key = lambda x: {tuple(v) for v in x.flatten(1).tolist()}
    assert key(tr) | key(te) == key(al)
    assert torch.equal(tr, digits(8, "train"))
    from sklearn.datasets import load_digits
    raw = torch.from_numpy(load_digits().images).float()
    assert torch.equal(al[:, 0], raw / 16 * 2 - 1)
    x, y = digits(8, "test", return_labels=True)
    assert torch.equal(x, te) and torch.equal(y, digits_labels("test")) and set(y.tolist()) == set(range(10))
    big = digits(16, "test")
    assert big.shape == (360, 1, 16, 16) and float(big.min()) >= -1 and float(big.max()) <= 1
    assert torch.allclose(torch.nn.functional.avg_pool2d(big, 2).mean(), te.mean(), atol=1e-2)
    assert torch.equal(get_dataset("digits", size=16, split="test"), big)
    with pytest.raises(ValueError, match="split must be one of"):
        digits(8, "val")
    with pytest.raises(ValueError, match="size must be an integer >= 8"):
        digits(4)


# ---- oracle and files -----------------------------------------------------------------------------
def test_mixture_dataset_moments():
    gm = GaussianMixture([0.3, 0.7], [[-0.5, 0.0], [0.5, 0.2]], [0.1, 0.05])
    x = mixture_dataset(gm, 20000, gen(0))
    assert x.shape == (20000, 2) and x.dtype == torch.float32
    assert torch.allclose(x.double().mean(0), gm.mean(), atol=0.01)
    assert torch.equal(x, mixture_dataset(gm, 20000, gen(0)))
    assert torch.equal(get_dataset("mixture", mixture=gm, n=20000, generator=gen(0)), x)


def test_scale_round_trip_and_errors():
    x = torch.tensor([0.0, 127.5, 255.0])
    assert torch.allclose(scale_to_unit(x, 0, 255), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(unscale(scale_to_unit(x, 0, 255), 0, 255), x)
    assert scale_to_unit(torch.tensor([0, 255], dtype=torch.uint8), 0, 255).dtype == torch.float32
    with pytest.raises(ValueError, match="low < high"):
        scale_to_unit(x, 1.0, 1.0)


def test_load_npz(tmp_path):
    img = np.random.RandomState(0).randint(0, 256, size=(5, 1, 4, 4)).astype(np.uint8)
    pts = np.random.RandomState(1).randn(10, 3)
    path = tmp_path / "d.npz"
    np.savez(path, x=img, pts=pts)
    x = load_npz(path)
    assert x.shape == (5, 1, 4, 4) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(img).float() / 255 * 2 - 1)      # uint8 -> [-1, 1]
    assert torch.allclose(load_npz(path, key="pts").double(), torch.from_numpy(pts), atol=1e-6)  # as stored
    assert torch.allclose(load_npz(path, key="pts", low=-4, high=4), torch.from_numpy(pts).float() / 4)
    np.save(tmp_path / "p.npy", pts)
    assert torch.allclose(get_dataset("npz", path=str(tmp_path / "p.npy")).double(), torch.from_numpy(pts), atol=1e-6)
    with pytest.raises(ValueError, match=r"has no array 'y'; its arrays are \['x', 'pts'\]"):
        load_npz(path, key="y")
    with pytest.raises(ValueError, match="no such file"):
        load_npz(tmp_path / "missing.npz")


def test_load_image_folder(tmp_path):
    import matplotlib.image as mpimg

    rgb = np.zeros((6, 6, 3), np.float32)
    rgb[:, :, 0] = 1.0                                      # pure red
    grey = np.linspace(0, 1, 36, dtype=np.float32).reshape(6, 6)
    mpimg.imsave(tmp_path / "a.png", rgb)
    mpimg.imsave(tmp_path / "b.png", np.stack([grey] * 3, -1))
    (tmp_path / "notes.txt").write_text("not an image")
    x3 = load_image_folder(tmp_path, size=6, channels=3)
    assert x3.shape == (2, 3, 6, 6) and x3.dtype == torch.float32
    assert torch.allclose(x3[0, 0], torch.ones(6, 6)) and torch.allclose(x3[0, 1:], -torch.ones(2, 6, 6))
    assert torch.allclose(x3[1, 0], torch.from_numpy(grey) * 2 - 1, atol=2.01 / 255)
    x1 = load_image_folder(tmp_path, size=6, channels=1)
    assert torch.allclose(x1[0, 0], torch.full((6, 6), 0.299 * 2 - 1), atol=1e-6)   # luma of red
    assert torch.allclose(x1[1, 0], torch.from_numpy(grey) * 2 - 1, atol=2.01 / 255)
    small = get_dataset("images", path=str(tmp_path), size=3, channels=1)
    assert small.shape == (2, 1, 3, 3) and float(small.min()) >= -1 and float(small.max()) <= 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(empty, 8)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_image_folder(tmp_path, 8, channels=2)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text named .png", "jpeg cut short"])
def test_a_damaged_image_in_the_folder_is_named(tmp_path, damage):
    import matplotlib.image as mpimg

    img = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    mpimg.imsave(tmp_path / "a_good.png", img)
    good = (tmp_path / "a_good.png").read_bytes()
    bad = tmp_path / ("b_bad.jpg" if damage == "jpeg cut short" else "b_bad.png")
    if damage == "jpeg cut short":
        from PIL import Image
        Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "full.jpg")
        bad.write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
        (tmp_path / "full.jpg").unlink()
    else:
        bad.write_bytes({"truncated": good[: len(good) // 2], "empty": b"",
                         "text named .png": b"not an image"}[damage])
    with pytest.raises(ValueError) as info:
        load_image_folder(tmp_path, size=8)
    msg = str(info.value)
    assert str(bad) in msg and "a_good" not in msg and "\n" not in msg
    with pytest.raises(ValueError, match="b_bad"):               # through the registry as well
        get_dataset("images", path=str(tmp_path), size=8)


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    import sys
    from sde_diffusion import data
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)          # "import sklearn" now fails
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        data.check_dataset_dependencies("digits")
    data.check_dataset_dependencies("moons")                   # needs nothing optional
    data._digits_raw.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            digits()
    finally:
        data._digits_raw.cache_clear()


def test_registry_errors():
    assert {"moons", "swiss_roll", "8gaussians", "checkerboard", "rings", "digits", "npz", "images"} <= set(DATASETS)
    with pytest.raises(ValueError, match=r"unknown data set 'cifar'; valid names are \['8gaussians'"):
        get_dataset("cifar")
    with pytest.raises(ValueError, match=r"data set 'checkerboard' does not take \['noise'\]"):
        get_dataset("checkerboard", n=10, noise=0.1)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        get_dataset("moons", n=0)


# ---- batching -------------------------------------------------------------------------------------
def test_batches_cover_each_epoch_and_are_seeded():
    data = torch.arange(12).float()
    it = infinite_batches(data, 4, gen(0))
    epoch = torch.cat([next(it) for _ in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))
    nxt = torch.cat([next(it) for _ in range(3)])
    assert sorted(nxt.tolist()) == list(range(12)) and not torch.equal(epoch, nxt)   # reshuffled
    again = infinite_batches(data, 4, gen(0))
    assert torch.equal(torch.cat([next(again) for _ in range(3)]), epoch)
    # an epoch that the batch does not divide drops its (random) remainder: batches never repeat a sample
    it = infinite_batches(torch.arange(10), 4, gen(2))
    for _ in range(6):
        epoch = torch.cat([next(it), next(it)])
        assert len(set(epoch.tolist())) == 8
    # batches larger than the data set: a stream of epochs, every batch full, counts even
    it = infinite_batches(torch.arange(5), 7, gen(1))
    stream = torch.cat([next(it) for _ in range(5)])                     # 35 = 7 epochs of 5
    assert all(len(b) == 7 for b in stream.split(7))
    assert torch.bincount(stream).tolist() == [7] * 5


def test_batches_keep_tuples_aligned():
    x, y = torch.randn(10, 3), torch.arange(10)
    it = infinite_batches((x, y), 4, gen(0))
    for _ in range(5):
        bx, by = next(it)
        assert torch.equal(bx, x[by])


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_union_equals_global_batch(world_size):
    data = torch.arange(20)
    batch = 6
    single = infinite_batches(data, batch, gen(7))
    ranks = [infinite_batches(data, batch, gen(7), rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(9):                                                   # crosses epoch boundaries
        parts = [next(r) for r in ranks]
        assert all(len(p) == batch // world_size for p in parts)
        joined = torch.cat(parts)
        assert len(set(joined.tolist())) == batch                        # disjoint
        assert torch.equal(joined, next(single))                         # in order, = global batch


def test_batch_state_dict_resumes_exactly(tmp_path):
    data = torch.arange(10)
    a = infinite_batches(data, 3, gen(3))
    for _ in range(5):
        next(a)
    torch.save(a.state_dict(), tmp_path / "order.pt")
    expected = [next(a) for _ in range(8)]
    b = infinite_batches(data, 3, gen(99))                              # any generator: state wins
    b.load_state_dict(torch.load(tmp_path / "order.pt", weights_only=True))
    assert all(torch.equal(next(b), e) for e in expected)


def test_batch_errors():
    with pytest.raises(ValueError, match="positive multiple of world_size=4"):
        infinite_batches(torch.arange(10), 6, gen(0), rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size=2\), got 2"):
        infinite_batches(torch.arange(10), 6, gen(0), rank=2, world_size=2)
    with pytest.raises(ValueError, match="same number of samples"):
        infinite_batches((torch.arange(10), torch.arange(9)), 2, gen(0))
