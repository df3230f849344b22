r"""Data sets: 2-D toys, sklearn's 8x8 digits, oracle mixtures and a user's own arrays or images.

Every loader returns a float32 tensor scaled to roughly ``[-1, 1]`` (the range the SDE defaults of
score_sde assume), ``(n, 2)`` for the toys and ``(N, C, H, W)`` for images.

The 2-D toys (each ``(n, generator=None, noise=...) -> (n, 2)``, i.i.d. given the generator):

==================  ============================================================================
``two_moons``       sklearn's two interleaved half circles (radius 1, centres (0, 0) and (1, 0.5)),
                    shifted by (-0.5, -0.25) and divided by 1.5: x in [-1, 1], y in [-0.5, 0.5];
                    Gaussian noise of std ``noise=0.05`` added after scaling.
``swiss_roll``      sklearn's 2-D roll ``u (cos u, sin u)``, ``u ~ U(1.5 pi, 4.5 pi)``, divided by
                    ``4.5 pi``: inside the unit disc; noise std 0.02 after scaling.
``eight_gaussians`` eight N(c_k, 0.08^2 I) with c_k on the circle of radius 0.8 at angles k pi/4.
``checkerboard``    FFJORD's 4x4 checkerboard on [-2, 2]^2 (8 filled unit squares) divided by 2:
                    uniform on the filled squares of [-1, 1]^2.
``rings``           four concentric circles of radii 0.25, 0.5, 0.75, 0.95 (equal counts, as in
                    FFJORD), radial noise std 0.02.
==================  ============================================================================

Class labels: every loader with natural classes takes ``return_labels=False``; ``True`` returns
``(x, y)`` with ``y`` an int64 ``(N,)`` tensor of classes ``0..K-1``, drawn together with ``x``
(the same ``x`` as without labels, for the same generator). :data:`DATASET_CLASSES` gives ``K``
for the named sets: ``moons`` (0 = upper half circle, 1 = lower), ``8gaussians`` (mode ``k`` at
angle ``k pi/4``), ``rings`` (ring ``k`` from the inside out), ``checkerboard`` (filled cell
``2 c + b``: column ``c`` in 0..3 from the left, ``b`` in 0..1 the lower/upper filled cell of that
column) and ``digits`` (0..9). ``swiss_roll`` has none. A ``.npz`` file gives its labels in an
array ``y`` (``label_key``); an image folder with one subfolder per class gives the subfolder's
index in sorted order (:func:`image_folder_classes`); an oracle mixture gives each sample's class
(its components' ``labels``, else the component index).

``digits``: sklearn's ``load_digits`` (1797 images, 8x8, values 0..16, shipped with scikit-learn,
no download) mapped by ``x / 16 * 2 - 1`` to [-1, 1]; ``size=16`` (or any size > 8) is a bilinear
resize of the 8x8 images (``align_corners=False``; values stay in [-1, 1]). The train/test split
is fixed: a ``numpy.random.RandomState(0)`` permutation, its first 360 images are ``test`` and
the other 1437 ``train``.

``cifar10``: CIFAR-10 (Krizhevsky 2009) from its standard python files, never downloaded: the
``cifar-10-batches-py`` folder (``data_batch_1`` .. ``data_batch_5``: 50000 ``train`` images,
``test_batch``: 10000 ``test``), each a pickled dict with ``data`` (``(N, 3072)`` uint8, the red,
green and blue 32x32 planes of each image in turn) and ``labels`` (0..9). Images come as
``(N, 3, 32, 32)`` float32 ``k / 255 * 2 - 1`` in [-1, 1]; :func:`write_cifar10` writes arrays in
the same format (a small fake set for tests).
"""
from __future__ import annotations

import functools
import inspect
import math
import os
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import require

__all__ = ["two_moons", "swiss_roll", "eight_gaussians", "checkerboard", "rings", "digits",
           "digits_labels", "mixture_dataset", "load_npz", "load_image_folder", "scale_to_unit",
           "unscale", "get_dataset", "DATASETS", "infinite_batches", "InfiniteBatches",
           "DIGITS_TEST_SIZE", "check_dataset_dependencies", "DATASET_CLASSES",
           "image_folder_classes", "check_labels", "cifar10", "write_cifar10", "CIFAR10_FOLDER",
           "CIFAR10_CLASSES"]

DIGITS_TEST_SIZE = 360
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _check_n(n) -> int:
    require(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1,
            f"n must be an integer >= 1, got {n!r}")
    return int(n)


def _check_noise(noise) -> float:
    require(math.isfinite(float(noise)) and float(noise) >= 0, f"noise must be >= 0, got {noise!r}")
    return float(noise)


def check_labels(y, n: int, num_classes: Optional[int] = None, what: str = "labels") -> torch.Tensor:
    """``y`` as an int64 ``(n,)`` tensor, checked: integers, one per sample, in ``[0, num_classes)``
    when ``num_classes`` is given (the null label ``num_classes`` is not a data label)."""
    y = torch.as_tensor(y)
    require(not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool,
            f"{what} must be integers, got {y.dtype}")
    require(tuple(y.shape) == (n,), f"{what} must have shape ({n},) (one per sample), got {tuple(y.shape)}")
    y = y.long()
    if n and num_classes is not None:
        lo, hi = int(y.min()), int(y.max())
        require(lo >= 0 and hi < num_classes,
                f"{what} must lie in [0, {num_classes}) for num_classes={num_classes}, got values in "
                f"[{lo}, {hi}]")
    elif n:
        require(int(y.min()) >= 0, f"{what} must be >= 0, got {int(y.min())}")
    return y


def _labelled(x: torch.Tensor, y: torch.Tensor, return_labels: bool):
    return (x, y.long()) if return_labels else x


def _rand(n, generator, *shape):
    return torch.rand((n,) + shape, generator=generator, dtype=torch.float64)


def _randn(n, generator, *shape):
    return torch.randn((n,) + shape, generator=generator, dtype=torch.float64)


# ---- 2-D toys ----------------------------------------------------------------------------------
def two_moons(n: int, generator: Optional[torch.Generator] = None, noise: float = 0.05,
              return_labels: bool = False):
    """Two interleaved half circles, scaled to x in [-1, 1], y in [-0.5, 0.5] (see module doc);
    label 0 = upper half circle, 1 = lower."""
    n, noise = _check_n(n), _check_noise(noise)
    upper = _rand(n, generator) < 0.5
    theta = _rand(n, generator) * math.pi
    x = torch.where(upper, theta.cos(), 1 - theta.cos())
    y = torch.where(upper, theta.sin(), 0.5 - theta.sin())
    pts = (torch.stack([x, y], 1) - torch.tensor([0.5, 0.25], dtype=torch.float64)) / 1.5
    return _labelled((pts + noise * _randn(n, generator, 2)).float(), (~upper).long(), return_labels)


def swiss_roll(n: int, generator: Optional[torch.Generator] = None, noise: float = 0.02) -> torch.Tensor:
    """sklearn's 2-D swiss roll divided by 4.5 pi (inside the unit disc)."""
    n, noise = _check_n(n), _check_noise(noise)
    u = 1.5 * math.pi * (1 + 2 * _rand(n, generator))
    pts = torch.stack([u * u.cos(), u * u.sin()], 1) / (4.5 * math.pi)
    return (pts + noise * _randn(n, generator, 2)).float()


def eight_gaussians(n: int, generator: Optional[torch.Generator] = None, noise: float = 0.08,
                    radius: float = 0.8, return_labels: bool = False):
    """Eight equally weighted Gaussians of std ``noise`` on a circle of radius ``radius``; label
    ``k`` is the mode at angle ``k pi / 4``."""
    n, noise = _check_n(n), _check_noise(noise)
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.double() * (math.pi / 4)
    centres = radius * torch.stack([angle.cos(), angle.sin()], 1)
    return _labelled((centres + noise * _randn(n, generator, 2)).float(), k, return_labels)


def checkerboard(n: int, generator: Optional[torch.Generator] = None, return_labels: bool = False):
    """Uniform on the 8 filled cells of a 4x4 checkerboard covering [-1, 1]^2 (FFJORD's / 2);
    label ``2 c + b`` for column ``c`` (0..3 from the left) and ``b`` (0 lower, 1 upper filled
    cell of that column)."""
    n = _check_n(n)
    x1 = _rand(n, generator) * 4 - 2
    u = _rand(n, generator)
    upper = 1 - torch.randint(0, 2, (n,), generator=generator)   # 0: shifted down by 2
    col_odd = torch.floor(x1).remainder(2)
    x2 = u - 2 * (1 - upper).double() + col_odd
    label = 2 * (torch.floor(x1).long() + 2) + upper
    return _labelled((torch.stack([x1, x2], 1) / 2).float(), label, return_labels)


def rings(n: int, generator: Optional[torch.Generator] = None, noise: float = 0.02,
          return_labels: bool = False):
    """Four concentric circles (radii 0.25, 0.5, 0.75, 0.95), equal counts, radial noise; label
    ``k`` is ring ``k`` from the inside out."""
    n, noise = _check_n(n), _check_noise(noise)
    radii = torch.tensor([0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    k = torch.randint(0, 4, (n,), generator=generator)
    r = radii[k]
    angle = _rand(n, generator) * (2 * math.pi)
    r = r + noise * _randn(n, generator)
    return _labelled((r[:, None] * torch.stack([angle.cos(), angle.sin()], 1)).float(), k, return_labels)


# ---- digits --------------------------------------------------------------------------------------
def _load_digits_function():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # sklearn is a test/bench dependency, not a core one
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from exc
    return load_digits


def check_dataset_dependencies(name: str) -> None:
    """Raise ``ImportError`` saying what to ``pip install`` when data set ``name`` needs an optional
    package that is missing (scikit-learn for ``digits``); cheap, for checks before any work."""
    if name == "digits":
        _load_digits_function()


@functools.lru_cache(maxsize=1)
def _digits_raw() -> Tuple[np.ndarray, np.ndarray]:
    d = _load_digits_function()()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _digits_index(split: str) -> np.ndarray:
    splits = ("train", "test", "all")
    require(split in splits, f"split must be one of {splits}, got {split!r}")
    n = _digits_raw()[0].shape[0]
    perm = np.random.RandomState(0).permutation(n)
    if split == "all":
        return np.arange(n)
    return np.sort(perm[:DIGITS_TEST_SIZE] if split == "test" else perm[DIGITS_TEST_SIZE:])


def digits(size: int = 8, split: str = "train", return_labels: bool = False):
    """sklearn's digits as ``(N, 1, size, size)`` float32 in [-1, 1] (bilinear resize for size > 8).

    ``split``: ``"train"`` (1437 images), ``"test"`` (360) or ``"all"`` (1797), a fixed split (see
    the module doc). ``return_labels=True`` returns ``(images, labels)`` with labels 0..9.
    """
    require(isinstance(size, int) and not isinstance(size, bool) and size >= 8,
            f"digits size must be an integer >= 8 (8 = native, larger = bilinear resize), got {size!r}")
    images, labels = _digits_raw()
    idx = _digits_index(split)
    x = torch.from_numpy(images[idx]).unsqueeze(1) / 16.0 * 2 - 1
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(-1, 1).contiguous()
    return (x, torch.from_numpy(labels[idx])) if return_labels else x


def digits_labels(split: str = "train") -> torch.Tensor:
    """The class labels (0..9) of :func:`digits` for ``split``, in the same order."""
    return torch.from_numpy(_digits_raw()[1][_digits_index(split)])


# ---- oracle and user data ------------------------------------------------------------------------
def _component_classes(mixture) -> Optional[torch.Tensor]:
    """The class of each component of a labelled mixture (its ``labels``), or ``None``."""
    labels = getattr(mixture, "labels", None)
    return None if labels is None else torch.as_tensor(labels).long().cpu()


def mixture_dataset(mixture, n: int, generator: Optional[torch.Generator] = None,
                    dtype: torch.dtype = torch.float32, return_labels: bool = False):
    """``n`` samples of a :class:`~sde_diffusion.oracles.GaussianMixture`'s clean data (t=None);
    ``return_labels=True`` adds each sample's class: its component's class for a mixture with
    ``labels``, else the component index (the same ``x`` either way)."""
    require(hasattr(mixture, "sample") and hasattr(mixture, "event_shape"),
            f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
    if not return_labels:
        return mixture.sample(_check_n(n), t=None, generator=generator, dtype=dtype)
    x, comp = mixture.sample(_check_n(n), t=None, generator=generator, dtype=dtype, return_labels=True)
    classes = _component_classes(mixture)
    return x, (comp.long() if classes is None else classes.to(comp.device)[comp])


def scale_to_unit(x, low: float, high: float) -> torch.Tensor:
    """Map ``[low, high]`` affinely onto ``[-1, 1]``: ``2 (x - low) / (high - low) - 1``."""
    low, high = float(low), float(high)
    require(math.isfinite(low) and math.isfinite(high) and high > low,
            f"need finite low < high, got low={low!r}, high={high!r}")
    x = torch.as_tensor(x)
    x = x if x.is_floating_point() else x.float()
    return 2 * (x - low) / (high - low) - 1


def unscale(x, low: float, high: float) -> torch.Tensor:
    """Inverse of :func:`scale_to_unit`: ``[-1, 1]`` back onto ``[low, high]``."""
    low, high = float(low), float(high)
    require(math.isfinite(low) and math.isfinite(high) and high > low,
            f"need finite low < high, got low={low!r}, high={high!r}")
    return (torch.as_tensor(x) + 1) / 2 * (high - low) + low


def load_npz(path: Union[str, os.PathLike], key: str = "x", low: Optional[float] = None,
             high: Optional[float] = None, return_labels: bool = False, label_key: str = "y"):
    """Array ``key`` of a ``.npz`` (or the array of a ``.npy``) file as a float32 tensor.

    Pickled objects are refused (``allow_pickle=False``). With ``low`` and ``high`` given the values
    are mapped from ``[low, high]`` to [-1, 1]; ``uint8`` arrays default to ``low=0, high=255``;
    other arrays are returned as stored (scale them yourself, e.g. with :func:`scale_to_unit`).
    ``return_labels=True`` returns ``(x, y)`` with ``y`` the integer array ``label_key`` of the
    ``.npz`` (one class ``>= 0`` per sample; a ``.npy`` file has no labels).
    """
    path = os.fspath(path)
    require(os.path.isfile(path), f"no such file: {path!r}")
    labels = None
    if path.lower().endswith(".npy"):
        require(not return_labels, f"{path!r} is a .npy file, which holds one array and no labels; "
                                   f"store x and {label_key!r} in a .npz file")
        arr = np.load(path, allow_pickle=False)
    else:
        with np.load(path, allow_pickle=False) as loaded:
            keys = list(loaded.keys())
            require(key in keys, f"{path!r} has no array {key!r}; its arrays are {keys}")
            arr = loaded[key]
            if return_labels:
                require(label_key in keys, f"{path!r} has no label array {label_key!r} (needed for "
                                           f"class labels); its arrays are {keys}")
                labels = loaded[label_key]
    require(arr.dtype.kind in "biuf", f"{path!r} holds {arr.dtype} data; need a numeric array")
    require(arr.ndim >= 2, f"{path!r} must hold a (N, ...) array with N samples, got shape {arr.shape}")
    if low is None and high is None and arr.dtype == np.uint8:
        low, high = 0, 255
    require((low is None) == (high is None), "give both low and high, or neither")
    x = torch.from_numpy(np.ascontiguousarray(arr)).float()
    if low is not None:
        x = scale_to_unit(x, low, high)
    require(bool(torch.isfinite(x).all()), f"{path!r} holds NaN or Inf values")
    if not return_labels:
        return x
    require(labels.dtype.kind in "iu", f"{path!r}: labels {label_key!r} must be integers, got {labels.dtype}")
    return x, check_labels(torch.from_numpy(labels.astype(np.int64)), x.shape[0],
                           what=f"labels {label_key!r} of {path!r}")


def _read_image(path: str) -> np.ndarray:
    """An image as float ``(H, W, C)`` in [0, 1] (PIL if installed, else matplotlib for PNG). A file
    that cannot be decoded (truncated, empty, not an image) raises ``ValueError`` naming it."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is None:  # pragma: no cover - PIL ships with matplotlib
        require(path.lower().endswith(".png"), f"without Pillow only PNG can be read, got {path!r}")
    try:
        if Image is not None:
            with Image.open(path) as im:
                im = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
        else:  # pragma: no cover
            import matplotlib.image as mpimg
            arr = np.asarray(mpimg.imread(path), dtype=np.float32)
    except (OSError, SyntaxError, ValueError, RuntimeError) as exc:  # truncated / not an image
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read image {path!r}: {reason[:200]} (a damaged or truncated "
                         f"file, or not an image; remove it or replace it)") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def image_folder_classes(path: Union[str, os.PathLike]) -> List[str]:
    """The class names of a labelled image folder: its subfolders, sorted by name (class ``k`` is
    the ``k``-th), as :func:`load_image_folder` with ``return_labels=True`` reads them."""
    path = os.fspath(path)
    require(os.path.isdir(path), f"no such folder: {path!r}")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
                     and not d.startswith("."))
    require(classes, f"folder {path!r} has no subfolders: class labels need one subfolder per "
                     f"class (e.g. {path}/cat/*.png, {path}/dog/*.png)")
    return classes


def load_image_folder(path: Union[str, os.PathLike], size: int, channels: int = 3,
                      return_labels: bool = False):
    """All images in a folder (sorted by name, not recursive) as ``(N, channels, size, size)``
    float32 in [-1, 1]; with ``return_labels=True`` the images of its subfolders, one per class
    (:func:`image_folder_classes`), as ``(x, y)`` with ``y`` the subfolder's index.

    ``channels=1`` converts to grey with the ITU-R 601 luma weights (0.299, 0.587, 0.114);
    ``channels=3`` keeps RGB (grey images are repeated). Alpha is composited over black. Images are
    resized to ``size x size`` bilinearly with antialiasing (no cropping: non-square images are
    stretched). PNG is read with Pillow when installed (it ships with matplotlib), else with
    ``matplotlib.image``.
    """
    path = os.fspath(path)
    require(os.path.isdir(path), f"no such folder: {path!r}")
    require(isinstance(size, int) and size >= 1, f"size must be an integer >= 1, got {size!r}")
    require(channels in (1, 3), f"channels must be 1 or 3, got {channels!r}")
    if return_labels:
        parts = [load_image_folder(os.path.join(path, c), size, channels)
                 for c in image_folder_classes(path)]
        y = torch.cat([torch.full((p.shape[0],), k, dtype=torch.long) for k, p in enumerate(parts)])
        return torch.cat(parts), y
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    require(files, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path!r}")
    out = []
    for name in files:
        arr = _read_image(os.path.join(path, name))
        if arr.shape[2] in (2, 4):                  # composite alpha over black
            arr = arr[:, :, :-1] * arr[:, :, -1:]
        if channels == 1 and arr.shape[2] == 3:
            arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
        elif channels == 3 and arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float()
        if img.shape[-2:] != (size, size):
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False,
                                antialias=True)
        out.append(img)
    return (torch.cat(out).clamp(0, 1) * 2 - 1).contiguous()


# ---- CIFAR-10 from its python files ----------------------------------------------------------------
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
_CIFAR10_FILES = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}
#: the only globals a CIFAR-10 pickle may name (numpy arrays); anything else is refused
_CIFAR10_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


def _cifar10_folder(path: Union[str, os.PathLike]) -> str:
    """``path`` itself when it holds the batch files, else ``path/cifar-10-batches-py``; a missing
    folder raises one clear line (the toolkit never downloads)."""
    path = os.fspath(path)
    for folder in (path, os.path.join(path, CIFAR10_FOLDER)):
        if os.path.isfile(os.path.join(folder, "test_batch")) or \
                os.path.isfile(os.path.join(folder, "data_batch_1")):
            return folder
    raise FileNotFoundError(
        f"CIFAR-10 not found at {path!r}: give the {CIFAR10_FOLDER} folder (data_batch_1..5, "
        f"test_batch) or its parent; the toolkit never downloads: fetch cifar-10-python.tar.gz from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html yourself and extract it there")


def _read_cifar10_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(data (N, 3072) uint8, labels (N,) int64)`` of one batch file, unpickled with only numpy's
    array globals allowed (a pickle naming anything else is refused, not run)."""
    import pickle
    import warnings

    class _Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in _CIFAR10_GLOBALS:
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
            with warnings.catch_warnings():       # numpy 2 warns on the numpy.core spelling
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().find_class(module, name)

    require(os.path.isfile(path), f"CIFAR-10 batch file {path!r} is missing")
    try:
        with open(path, "rb") as fh:
            d = _Restricted(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"cannot read CIFAR-10 batch {path!r}: {exc} (not the python version of "
                         f"CIFAR-10?)") from None
    require(isinstance(d, dict), f"CIFAR-10 batch {path!r} is not a dict")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    require("data" in d and "labels" in d, f"CIFAR-10 batch {path!r} lacks 'data' or 'labels'")
    data, labels = np.asarray(d["data"]), np.asarray(d["labels"], dtype=np.int64)
    require(data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and labels.shape == (data.shape[0],),
            f"CIFAR-10 batch {path!r}: data must be (N, 3072) uint8 with N labels, got "
            f"{data.shape} {data.dtype} and {labels.shape[0]} labels")
    return data, labels


def cifar10(path: Union[str, os.PathLike], split: str = "train", return_labels: bool = False):
    """CIFAR-10 from its local python files (see the module doc): ``(N, 3, 32, 32)`` float32 in
    [-1, 1] (``k / 255 * 2 - 1``), the batches in order; with ``return_labels=True`` also the int64
    labels (:data:`CIFAR10_CLASSES`). ``path``: the ``cifar-10-batches-py`` folder or its parent.
    Never downloads: a missing folder raises ``FileNotFoundError`` in one line."""
    require(split in _CIFAR10_FILES, f"split must be 'train' or 'test', got {split!r}")
    folder = _cifar10_folder(path)
    parts = [_read_cifar10_batch(os.path.join(folder, name)) for name in _CIFAR10_FILES[split]]
    data = np.concatenate([p[0] for p in parts])
    x = torch.from_numpy(data).reshape(-1, 3, 32, 32).float().div_(127.5).sub_(1.0)
    if not return_labels:
        return x
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return x, check_labels(y, x.shape[0], len(CIFAR10_CLASSES), what=f"CIFAR-10 labels in {folder!r}")


def write_cifar10(folder: Union[str, os.PathLike], train: np.ndarray, train_labels,
                  test: np.ndarray, test_labels) -> str:
    """Write uint8 images ``(N, 3, 32, 32)`` (or ``(N, 3072)``) and labels in CIFAR-10's python
    format: ``data_batch_1`` .. ``data_batch_5`` (``train`` split into five nearly equal parts),
    ``test_batch`` and ``batches.meta``, each written atomically. Returns ``folder``. For tests and
    small fake sets; the real data comes from its authors."""
    import pickle

    from ._files import atomic_write

    def batch(images, labels, name) -> dict:
        images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
        require(images.shape[1] == 3072, f"images must be 3x32x32, got {images.shape[1]} values each")
        return {b"batch_label": name.encode(), b"labels": [int(v) for v in np.asarray(labels)],
                b"data": images, b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))]}

    def dump(name: str, obj) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                pickle.dump(obj, fh, protocol=2)
        atomic_write(os.path.join(os.fspath(folder), name), write)

    train, test = np.asarray(train), np.asarray(test)
    cuts = np.linspace(0, len(train), 6).astype(int)
    for k in range(5):
        dump(f"data_batch_{k + 1}", batch(train[cuts[k]:cuts[k + 1]], np.asarray(train_labels)[cuts[k]:cuts[k + 1]],
                                          f"training batch {k + 1} of 5"))
    dump("test_batch", batch(test, test_labels, "testing batch 1 of 1"))
    dump("batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                          b"num_cases_per_batch": int(cuts[1] - cuts[0]), b"num_vis": 3072})
    return os.fspath(folder)


# ---- registry --------------------------------------------------------------------------------------
def _generator(seed: int, generator: Optional[torch.Generator]) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(int(seed))


def _toy(fn):
    def make(n: int = 10_000, seed: int = 0, generator: Optional[torch.Generator] = None, **kw):
        return fn(n, _generator(seed, generator), **kw)
    make.__wrapped_toy__ = fn
    return make


def _mixture(mixture, n: int = 10_000, seed: int = 0, generator: Optional[torch.Generator] = None,
             return_labels: bool = False):
    return mixture_dataset(mixture, n, _generator(seed, generator), return_labels=return_labels)


DATASETS = {
    "moons": _toy(two_moons), "swiss_roll": _toy(swiss_roll), "8gaussians": _toy(eight_gaussians),
    "checkerboard": _toy(checkerboard), "rings": _toy(rings), "digits": digits, "npz": load_npz,
    "images": load_image_folder, "mixture": _mixture, "cifar10": cifar10,
}

#: the number of classes of the named data sets with fixed classes (``return_labels=True``); the
#: classes of ``npz``, ``images`` and ``mixture`` come with the data.
DATASET_CLASSES = {"moons": 2, "8gaussians": 8, "rings": 4, "checkerboard": 8, "digits": 10,
                   "cifar10": 10}


def _accepted(name: str):
    fn = DATASETS[name]
    params = list(inspect.signature(fn).parameters)
    if hasattr(fn, "__wrapped_toy__"):
        extra = [p for p in inspect.signature(fn.__wrapped_toy__).parameters if p not in ("n", "generator")]
        params = [p for p in params if p != "kw"] + extra
    return params


def get_dataset(name: str, **kwargs) -> torch.Tensor:
    """A data set by name, as a tensor (see :data:`DATASETS`).

    - toys ``moons``, ``swiss_roll``, ``8gaussians``, ``checkerboard``, ``rings``: ``n=10000``,
      ``seed=0`` or ``generator=``, plus the toy's own ``noise``/``radius``;
    - ``digits``: ``size=8``, ``split="train"``, ``return_labels=False``;
    - ``npz``: ``path``, ``key="x"``, ``low``, ``high`` (a ``.npy`` path works too);
    - ``images``: ``path``, ``size``, ``channels=3``;
    - ``cifar10``: ``path`` (the ``cifar-10-batches-py`` folder or its parent), ``split="train"``;
    - ``mixture``: ``mixture`` (a GaussianMixture), ``n``, ``seed`` or ``generator``.

    Every set but ``swiss_roll`` takes ``return_labels=True`` and then returns ``(x, y)`` (see
    the module doc; ``npz`` also ``label_key="y"``).
    """
    require(name in DATASETS, f"unknown data set {name!r}; valid names are {sorted(DATASETS)}")
    labelled = sorted(DATASET_CLASSES) + ["images", "mixture", "npz"]
    require(not kwargs.get("return_labels") or name in labelled,
            f"data set {name!r} has no class labels; data sets with labels are {labelled}")
    accepted = _accepted(name)
    unknown = sorted(set(kwargs) - set(accepted))
    require(not unknown, f"data set {name!r} does not take {unknown}; it takes {accepted}")
    return DATASETS[name](**kwargs)


# ---- batching ------------------------------------------------------------------------------------
class InfiniteBatches:
    """Endless mini-batches over ``data`` (a tensor, or a tuple of tensors sharing the first dim).

    Each epoch is a fresh permutation drawn from a private generator seeded once from ``generator``
    at construction; global batches of ``batch_size`` are consecutive slices of it and an epoch's
    last partial batch is dropped (like ``DataLoader(drop_last=True)``; the dropped samples differ
    every epoch), so a batch never holds a sample twice. If ``batch_size`` exceeds the data set,
    batches are cut from the concatenated epochs instead (repeats are then unavoidable). With
    ``world_size > 1`` every
    rank must pass an identically seeded generator: all ranks then see the same global batch and
    rank ``r`` takes its slice ``[r * b, (r + 1) * b)`` with ``b = batch_size // world_size``, so
    the ranks' batches are disjoint and their concatenation in rank order is the single-process
    batch.

    ``state_dict()`` / ``load_state_dict()`` save and restore the position exactly (plain tensors
    and ints, loadable with ``torch.load(weights_only=True)``), for bit-for-bit resumption.
    """

    def __init__(self, data, batch_size: int, generator: Optional[torch.Generator] = None,
                 rank: int = 0, world_size: int = 1):
        tensors = data if isinstance(data, (tuple, list)) else (data,)
        require(len(tensors) >= 1 and all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in tensors),
                "data must be a tensor or a tuple of tensors with a leading sample dimension")
        n = tensors[0].shape[0]
        require(n >= 1 and all(t.shape[0] == n for t in tensors),
                f"all tensors in data need the same number of samples >= 1, got "
                f"{[t.shape[0] for t in tensors]}")
        require(isinstance(world_size, int) and world_size >= 1, f"world_size must be >= 1, got {world_size!r}")
        require(isinstance(rank, int) and 0 <= rank < world_size,
                f"rank must lie in [0, world_size={world_size}), got {rank!r}")
        require(isinstance(batch_size, int) and batch_size >= 1 and batch_size % world_size == 0,
                f"batch_size (the global batch) must be a positive multiple of world_size={world_size}, "
                f"got {batch_size!r}")
        self._tensors, self._single = tuple(tensors), not isinstance(data, (tuple, list))
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch_state = self._gen.get_state()
        self._perm = torch.randperm(n, generator=self._gen)
        self._pos, self.epoch = 0, 0

    def _next_perm(self) -> None:
        self._epoch_state = self._gen.get_state()
        self._perm = torch.randperm(self.n, generator=self._gen)
        self._pos, self.epoch = 0, self.epoch + 1

    def _next_global(self) -> torch.Tensor:
        if self.batch_size <= self.n:                     # whole batches within an epoch
            if self._pos + self.batch_size > self.n:
                self._next_perm()
            self._pos += self.batch_size
            return self._perm[self._pos - self.batch_size:self._pos]
        chunks, need = [], self.batch_size                # a batch longer than an epoch
        while need:
            if self._pos == self.n:
                self._next_perm()
            take = min(need, self.n - self._pos)
            chunks.append(self._perm[self._pos:self._pos + take])
            self._pos += take
            need -= take
        return torch.cat(chunks)

    def next_indices(self) -> torch.Tensor:
        """The indices of this rank's part of the next global batch."""
        b = self.batch_size // self.world_size
        return self._next_global()[self.rank * b:(self.rank + 1) * b]

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        idx = self.next_indices()
        out = tuple(t[idx.to(t.device)] for t in self._tensors)
        return out[0] if self._single else out

    def state_dict(self) -> dict:
        return {"epoch_generator_state": self._epoch_state.clone(), "position": self._pos,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self._gen.set_state(state["epoch_generator_state"])
        self._epoch_state = self._gen.get_state()
        self._perm = torch.randperm(self.n, generator=self._gen)
        self._pos, self.epoch = int(state["position"]), int(state["epoch"])
        require(0 <= self._pos <= self.n, f"position {self._pos} is outside this data set of {self.n}")


def infinite_batches(data, batch_size: int, generator: Optional[torch.Generator] = None,
                     rank: int = 0, world_size: int = 1) -> InfiniteBatches:
    """Endless shuffled (and, for DDP, sharded) mini-batches: see :class:`InfiniteBatches`."""
    return InfiniteBatches(data, batch_size, generator, rank, world_size)
