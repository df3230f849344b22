r"""Sample-quality metrics: sliced Wasserstein, a digits Fréchet distance, oracle mode statistics.
Pictures of samples are drawn by :mod:`sde_diffusion.reports`.

- :func:`sliced_wasserstein`: ``SW_p(x, y) = (E_theta W_p^p(theta.x, theta.y))^{1/p}`` over random
  unit directions (Rabin et al. 2011; Bonneel et al. 2015), each 1-D distance computed exactly
  between the two empirical distributions (any sizes).
- :func:`frechet_distance`: ``||m_1 - m_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`` between Gaussian
  fits of features (Heusel et al. 2017's FID recipe); ``features="digits"`` uses the penultimate
  layer of a small CNN trained here, deterministically, on sklearn's digits train split.
- :func:`mode_statistics`: per-component weights, means and variances of samples of an oracle
  :class:`~sde_diffusion.oracles.GaussianMixture`, against the truth.
- :func:`fid_kid`: FID (Heusel et al. 2017) and KID (Binkowski et al. 2018, the unbiased MMD^2
  with the kernel ``(x.y / d + 1)^3`` averaged over random subsets) through torchmetrics (the
  optional ``metrics`` extra), on Inception-v3 pool features from a local weights file (never
  downloaded) or on any feature network given in its place (``"digits"``: the digits CNN above).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import as_samples, require

__all__ = ["sliced_wasserstein", "wasserstein_1d", "frechet_distance", "frechet_distance_from_stats",
           "gaussian_stats", "digits_classifier", "digits_features", "digits_accuracy",
           "digits_fd_baselines", "mode_statistics", "fid_kid", "feature_network",
           "INCEPTION_WEIGHTS_FILE"]


# ---- sliced Wasserstein --------------------------------------------------------------------------
def wasserstein_1d(u: torch.Tensor, v: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Exact ``W_p^p`` between empirical distributions along the last axis: ``u (..., n)``,
    ``v (..., m)`` with equal weights, ``n`` and ``m`` arbitrary (integral of
    ``|F_u^{-1}(s) - F_v^{-1}(s)|^p`` over the merged quantile levels)."""
    u, v = u.sort(dim=-1).values, v.sort(dim=-1).values
    n, m = u.shape[-1], v.shape[-1]
    if n == m:
        return (u - v).abs().pow(p).mean(-1)
    levels = torch.cat([torch.arange(1, n + 1, dtype=u.dtype) / n, torch.arange(1, m + 1, dtype=u.dtype) / m])
    levels = levels.sort().values
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - widths / 2
    iu = torch.clamp(torch.ceil(mid * n).long() - 1, 0, n - 1)
    iv = torch.clamp(torch.ceil(mid * m).long() - 1, 0, m - 1)
    return ((u[..., iu] - v[..., iv]).abs().pow(p) * widths).sum(-1)


def sliced_wasserstein(x, y, n_projections: int = 256, generator: Optional[torch.Generator] = None,
                       p: float = 2.0) -> float:
    """Sliced ``p``-Wasserstein distance between sample sets ``x (n, ...)`` and ``y (m, ...)``.

    Directions are uniform on the unit sphere of the flattened dimension ``D`` (drawn from
    ``generator``, or from a fixed seed 0 when ``None``, so the metric is deterministic); for
    ``D = 1`` the single direction gives the exact ``W_p``. Computed in float64 on the CPU.
    """
    x, y = as_samples(x, "x").flatten(1), as_samples(y, "y").flatten(1)
    require(x.shape[1] == y.shape[1], f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    require(isinstance(n_projections, int) and n_projections >= 1,
            f"n_projections must be an integer >= 1, got {n_projections!r}")
    require(p >= 1, f"p must be >= 1, got {p!r}")
    D = x.shape[1]
    if D == 1:
        theta = torch.ones(1, 1, dtype=torch.float64)
    else:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        theta = torch.randn(n_projections, D, generator=gen, dtype=torch.float64, device=gen.device).cpu()
        theta = theta / theta.norm(dim=1, keepdim=True)
    wp = wasserstein_1d(theta @ x.T, theta @ y.T, p)
    return float(wp.mean() ** (1.0 / p))


# ---- Fréchet distance ----------------------------------------------------------------------------
def gaussian_stats(features) -> tuple:
    """Mean and (unbiased) covariance of ``(n, d)`` features, float64 numpy."""
    f = as_samples(features, "features").flatten(1).numpy()
    require(f.shape[0] >= 2, f"need at least 2 samples for a covariance, got {f.shape[0]}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    r"""``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` for PSD ``S1``, ``S2``.

    ``tr (S1 S2)^{1/2}`` is computed as ``sum sqrt(eig(S1^{1/2} S2 S1^{1/2}))``: the matrices are
    similar, so this equals the trace of ``scipy.linalg.sqrtm(S1 @ S2)`` used by FID code, but the
    symmetric eigenproblems (``S1^{1/2}`` from ``eigh`` with negative round-off clipped) stay real
    and exact for the singular covariances that dead ReLU features give.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    require(mu2.shape == (d,) and s1.shape == (d, d) and s2.shape == (d, d),
            f"need means (d,) and covariances (d, d) of one d, got {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    evals, evecs = np.linalg.eigh(s1)
    root1 = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    mid = root1 @ s2 @ root1
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((mid + mid.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_cross, 0.0))


class _DigitsNet(nn.Module):
    """conv(1->16) relu pool conv(16->32) relu pool -> 128 -> Linear 64 relu (features) -> Linear 10."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


@functools.lru_cache(maxsize=1)
def digits_classifier(epochs: int = 20, seed: int = 0) -> nn.Module:
    """The digits classifier, trained once per process (cached) on the train split of
    :func:`sde_diffusion.data.digits` (8x8, [-1, 1]): Adam (lr 2e-3), batch 64, ``epochs`` epochs,
    seeded, on one thread (restored afterwards): about 2 s, about 98% test accuracy. The global RNG
    state is left untouched. Returned in eval mode with gradients off."""
    from .data import digits

    x, y = digits(8, "train", return_labels=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _DigitsNet()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)                  # tiny ops: one thread is fastest, and immune to
        with torch.enable_grad():                 # oversubscribed cores; grad also under no_grad
            _fit(net, opt, x, y, epochs, g)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _fit(net, opt, x, y, epochs, g):
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@functools.lru_cache(maxsize=8)
def _to_8_matrix(size: int) -> torch.Tensor:
    """``(8, size)`` least-squares inverse of the 1-D factor of the bilinear 8 -> ``size`` resize
    that :func:`sde_diffusion.data.digits` applies (the 2-D resize is separable)."""
    basis = torch.eye(8, dtype=torch.float64)[:, None, :, None].expand(8, 1, 8, 8)
    up = F.interpolate(basis, size=(size, size), mode="bilinear", align_corners=False)[:, 0, :, 0].T
    return torch.linalg.pinv(up).float()


def _digits_input(images) -> torch.Tensor:
    x = as_samples(images, "images").float()
    require(x.ndim == 4 and x.shape[1] == 1 and x.shape[2] == x.shape[3] and x.shape[2] >= 8,
            f"digits images must have shape (N, 1, S, S) with S >= 8, got {tuple(x.shape)}")
    if x.shape[-1] != 8:
        down = _to_8_matrix(x.shape[-1])
        x = down @ x @ down.T
    return x.clamp(-1, 1)


def digits_features(images, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate (64-d) features of the digits classifier for ``(N, 1, S, S)`` images in [-1, 1].

    Images larger than 8x8 are mapped to 8x8 by the least-squares inverse of the bilinear resize
    of ``digits(S)``, so real digits at any size give the features of their 8x8 originals (up to
    float round-off); values are clamped to [-1, 1]."""
    x, net = _digits_input(images), digits_classifier()
    with torch.no_grad():
        return torch.cat([net.body(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]).double()


def digits_accuracy(split: str = "test") -> float:
    """Accuracy of the digits classifier on a split of :func:`sde_diffusion.data.digits`."""
    from .data import digits

    x, y = digits(8, split, return_labels=True)
    with torch.no_grad():
        return float((digits_classifier()(x).argmax(1) == y).double().mean())


FEATURES = ("digits", "identity")


def frechet_distance(samples, reference, features: Union[str, Callable] = "digits") -> float:
    """Fréchet distance between Gaussian fits of ``features(samples)`` and ``features(reference)``.

    ``features``: ``"digits"`` (penultimate features of :func:`digits_classifier`; images
    ``(N, 1, S, S)`` in [-1, 1]), ``"identity"`` (the flattened inputs) or a callable mapping a
    tensor to ``(N, d)`` features. Like FID it is biased upwards for small N: compare numbers
    computed with the same sample sizes (see :func:`digits_fd_baselines`).
    """
    if callable(features):
        fn = features
    else:
        require(features in FEATURES, f"features must be one of {FEATURES} or a callable, got {features!r}")
        fn = digits_features if features == "digits" else (lambda z: as_samples(z, "samples").flatten(1))
    f1, f2 = fn(samples), fn(reference)
    return frechet_distance_from_stats(*gaussian_stats(f1), *gaussian_stats(f2))


def digits_fd_baselines(n: Optional[int] = None, size: int = 8, seed: int = 0) -> dict:
    """Reference points for the digits Fréchet distance, with the test split as reference:

    - ``real_vs_real``: train split (the first ``n`` images, default all 1437) vs test split;
    - ``real_vs_noise``: ``n`` images of N(0, 1) noise clamped to [-1, 1] (seeded) vs test split;
    - ``test_accuracy``: the classifier's accuracy on the test split; ``n`` the sample count used.
    """
    from .data import digits

    train, test = digits(size, "train"), digits(size, "test")
    n = train.shape[0] if n is None else int(n)
    require(2 <= n <= train.shape[0], f"n must lie in [2, {train.shape[0]}], got {n}")
    noise = torch.randn((n,) + tuple(train.shape[1:]), generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    return {"real_vs_real": frechet_distance(train[:n], test), "real_vs_noise": frechet_distance(noise, test),
            "test_accuracy": digits_accuracy("test"), "n": n}


# ---- oracle mode statistics ----------------------------------------------------------------------
def mode_statistics(samples, mixture) -> dict:
    """Assign each sample to its most responsible component of ``mixture`` (responsibilities of the
    clean data, ``t=None``) and compare per-mode statistics with the truth.

    Returns a dict of float64 tensors: ``counts (K,)``, ``weights``/``true_weights (K,)``,
    ``means``/``true_means (K, D)``, ``variances``/``true_variances (K, D)`` (per-coordinate,
    unbiased; NaN for modes with fewer than 2 samples) and summaries ``weight_tv`` (total variation
    ``0.5 sum |w - w_true|``), ``max_mean_error`` (largest ``|mean - true| / true_std`` over modes and
    coordinates) and ``variance_ratio (K,)`` (mean over coordinates of ``variance / true_variance``).
    With overlapping modes hard assignment biases the variances down; use well separated modes.
    """
    x = as_samples(samples, "samples")
    require(tuple(x.shape[1:]) == tuple(mixture.event_shape),
            f"samples must have shape (N, {', '.join(map(str, mixture.event_shape))}), got {tuple(x.shape)}")
    K, N = mixture.n_components, x.shape[0]
    labels = mixture.responsibilities(x, None).argmax(1)
    flat = x.flatten(1)
    counts = torch.bincount(labels, minlength=K).double()
    sums = torch.zeros(K, flat.shape[1], dtype=torch.float64).index_add_(0, labels, flat)
    means = sums / counts[:, None]
    sq = torch.zeros_like(sums).index_add_(0, labels, (flat - means[labels]) ** 2)
    variances = torch.where(counts[:, None] >= 2, sq / (counts[:, None] - 1), torch.full_like(sq, math.nan))
    true_means = mixture.means.reshape(K, -1).double()
    if mixture.stds is None:   # full covariances: per-coordinate variances on the diagonal
        true_var = mixture.covariances.diagonal(dim1=1, dim2=2).double()
    else:
        true_var = mixture.stds.reshape(K, -1).double() ** 2
    weights, true_w = counts / N, mixture.weights.double()
    err = ((means - true_means).abs() / true_var.sqrt())
    return {"counts": counts, "weights": weights, "true_weights": true_w, "means": means,
            "true_means": true_means, "variances": variances, "true_variances": true_var,
            "weight_tv": float(0.5 * (weights - true_w).abs().sum()),
            "max_mean_error": float(err[counts > 0].max()) if bool((counts > 0).any()) else math.nan,
            "variance_ratio": (variances / true_var).mean(1)}


# ---- FID and KID through torchmetrics --------------------------------------------------------------
#: torch-fidelity's port of the TensorFlow FID Inception-v3 weights (what torchmetrics loads)
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_INCEPTION_HINT = (f"FID/KID on Inception features need its weights on disk ({INCEPTION_WEIGHTS_FILE}, "
                   f"torch-fidelity's port of the TF-FID network), which the toolkit never downloads: "
                   f"copy the file here and pass its path, or use another feature network")


def _torchmetrics(what: str):
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as exc:
        raise ImportError(f"{what} needs torchmetrics: pip install torchmetrics (the 'metrics' extra: "
                          f"pip install -e '.[metrics]')") from exc
    return FrechetInceptionDistance, KernelInceptionDistance


class _Features(nn.Module):
    """``fn(images) -> (N, d)`` float features as a module with ``num_features = d`` (what
    torchmetrics' FID/KID take in place of Inception); never trains."""

    def __init__(self, fn: Callable, num_features: int, name: str, net: Optional[nn.Module] = None):
        super().__init__()
        self.fn, self.num_features, self.name = fn, int(num_features), name
        self.net = net                         # registered, so .to(device) moves it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(x).flatten(1).double()

    def train(self, mode: bool = True) -> "_Features":
        return super().train(False)


def _to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] ``(N, C, H, W)`` as uint8 RGB (grey repeated), what Inception takes."""
    require(x.ndim == 4 and x.shape[1] in (1, 3),
            f"images must have shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _inception(weights) -> nn.Module:
    import os

    require(weights is not None and str(weights) != "", f"features='inception': {_INCEPTION_HINT}")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"Inception weights not found: {os.fspath(weights)!r}; {_INCEPTION_HINT}")
    _torchmetrics("FID/KID")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=os.fspath(weights))
    except (ImportError, ModuleNotFoundError) as exc:
        raise ImportError("FID/KID on Inception features need torch-fidelity (and torchvision): "
                          "pip install torch-fidelity, with a torchvision built for your torch") from exc
    return _Features(lambda x: net(_to_uint8_rgb(x)), 2048, "inception", net)


def feature_network(features: Union[str, nn.Module, Callable] = "inception", weights=None,
                    example: Optional[torch.Tensor] = None) -> nn.Module:
    """The feature network of :func:`fid_kid` as a module with ``num_features``:

    - ``"inception"``: Inception-v3's 2048-d pool features (torchmetrics / torch-fidelity) from the
      local file ``weights`` (:data:`INCEPTION_WEIGHTS_FILE`); images in [-1, 1] become uint8 RGB
      and are resized to 299x299 inside. A missing file raises ``FileNotFoundError`` in one line.
    - ``"digits"``: the digits classifier's 64-d penultimate features (:func:`digits_features`),
      the offline default for 1-channel images.
    - ``"identity"``: the flattened images.
    - a module or callable ``images -> (N, d)``; ``d`` is read from ``num_features`` or from one
      call on ``example`` (the first image of the samples).
    """
    if isinstance(features, str):
        require(features in FEATURES + ("inception",),
                f"features must be one of {FEATURES + ('inception',)}, a module or a callable, got "
                f"{features!r}")
        if features == "inception":
            return _inception(weights)
        fn = digits_features if features == "digits" else (lambda z: z.flatten(1))
    else:
        require(callable(features), f"features must be a name, a module or a callable, got "
                                    f"{type(features).__name__}")
        fn = features
    d = getattr(features, "num_features", None)
    if d is None:
        require(example is not None, "a feature callable without num_features needs an example image")
        with torch.no_grad():
            d = fn(example[:1]).flatten(1).shape[1]
    name = features if isinstance(features, str) else type(features).__name__
    return _Features(fn, int(d), name, features if isinstance(features, nn.Module) else None)


def fid_kid(samples, reference, features: Union[str, nn.Module, Callable] = "inception",
            weights=None, kid: bool = True, kid_subsets: int = 100,
            kid_subset_size: Optional[int] = 1000, batch_size: int = 256, seed: int = 0,
            device=None) -> dict:
    r"""FID and KID between ``samples`` and ``reference`` images (``(N, C, H, W)`` in [-1, 1])
    through torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``.

    FID ([Heusel et al. 2017] eq. 6): ``||m_r - m_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^{1/2})`` of the
    feature means and covariances. KID ([Binkowski et al. 2018] eq. 4 with the cubic polynomial
    kernel ``k(x, y) = (x.y / d + 1)^3``): the unbiased MMD^2, mean and standard deviation over
    ``kid_subsets`` random subsets of ``kid_subset_size`` (capped at the smaller set; drawn with
    ``seed``). ``features``/``weights``: see :func:`feature_network`; features are computed in
    batches of ``batch_size``. Both are biased for small N (FID upwards): compare numbers of equal
    sample sizes and feature networks.

    Returns ``{"fid", "kid_mean", "kid_std" (None without ``kid``), "n_samples", "n_reference",
    "features", "num_features", "kid_subset_size"}``.
    """
    FID, KID = _torchmetrics("FID/KID")
    x, ref = as_samples(samples, "samples").float(), as_samples(reference, "reference").float()
    require(x.shape[1:] == ref.shape[1:], f"samples {tuple(x.shape[1:])} and reference "
                                          f"{tuple(ref.shape[1:])} must have the same image shape")
    require(x.shape[0] >= 2 and ref.shape[0] >= 2,
            f"FID needs at least 2 samples and 2 reference images, got {x.shape[0]} and {ref.shape[0]}")
    require(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be >= 1, got {batch_size!r}")
    net = feature_network(features, weights, example=x)
    device = torch.device(device) if device is not None else torch.device("cpu")
    net = net.to(device)
    size = min(int(kid_subset_size or x.shape[0]), x.shape[0], ref.shape[0])
    fid = FID(feature=net, reset_real_features=True).to(device)
    with warnings.catch_warnings():   # KID keeps every feature vector: the point, not a surprise
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kd = KID(feature=net, subsets=int(kid_subsets), subset_size=size).to(device) if kid else None
    for data, real in ((ref, True), (x, False)):
        for i in range(0, data.shape[0], batch_size):
            batch = data[i:i + batch_size].to(device)
            fid.update(batch, real=real)
            if kd is not None:
                kd.update(batch, real=real)
    out = {"fid": float(fid.compute()), "kid_mean": None, "kid_std": None,
           "n_samples": int(x.shape[0]), "n_reference": int(ref.shape[0]), "features": net.name,
           "num_features": net.num_features, "kid_subset_size": size if kid else None}
    if kd is not None:
        with torch.random.fork_rng(devices=[]):     # KID's subsets come from the global RNG
            torch.manual_seed(seed)
            mean, std = kd.compute()
        out["kid_mean"], out["kid_std"] = float(mean), float(std)
    return out
