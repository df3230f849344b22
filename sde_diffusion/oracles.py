r"""Exact ground truth: a Gaussian mixture pushed through any affine SDE.

If ``x0 ~ sum_k w_k N(m_k, C_k)`` and ``x_t = alpha(t) x0 + sigma(t) z``, then

.. math:: p_t(x) = \sum_k w_k\,\mathcal N\big(x;\ \alpha m_k,\ \alpha^2 C_k + \sigma^2 I\big),

so the score, the denoiser ``E[x0 | x_t]`` (Tweedie's formula) and the log-density are known in
closed form at every ``t``. Tests and benchmarks measure samplers and likelihoods against it.

The components are isotropic (``C_k = s_k^2 I``), diagonal (``C_k = diag(s_k^2)``) or full
(``C_k = U_k diag(l_k) U_k^T``, eigendecomposed once at construction, so that
``alpha^2 C_k + sigma^2 I = U_k diag(alpha^2 l_k + sigma^2) U_k^T`` at every ``t``). The way a call
is computed is chosen at construction from the kind of components, and per call from whether the
batch shares one time (then the time-dependent scalars, per-component variances and
log-determinants are computed once):

- isotropic, any times: ``||x - alpha m_k||^2 = ||x||^2 - 2 alpha x.m_k + alpha^2 ||m_k||^2`` by
  one ``(batch, K)`` matrix product; the fields are one more product with the means;
- diagonal, one time: the same expansion weighted by ``1 / v_k`` per axis (two products);
- full, one time: one product rotates the batch into every component's eigenbasis, one rotates
  back; for a score over a batch of at least ``K dim`` samples, precision matrices formed once per
  call make it one product;
- diagonal or full with per-sample times: the per-component differences, as the reference
  formulas, in chunks of samples.

No path holds a ``(batch, K, dim)`` temporary for the whole batch: at most a sixth of the
input's elements per temporary (or 8 MiB; on a CPU at most 2 MiB, for the cache; full components
at least 256 samples per chunk). The isotropic
and diagonal paths compute in float64 (a float32 input is upcast an eighth of the batch at a time
and the result rounded once: the expanded distances would otherwise lose about
``||x||^2 / ||x - alpha m_k||^2`` in relative accuracy); the others in the input's dtype.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ._checks import TimeLike, expand_to, require
from .sdes import SDE

__all__ = ["GaussianMixture", "random_mixture"]

ArrayLike = Union[torch.Tensor, Sequence]
Scale = Union[float, torch.Tensor]          # a number, a 0-d tensor or a (batch, 1) column

_LOG_2PI = math.log(2 * math.pi)
#: elements a chunked temporary may always hold (8 MiB in float64), however small the input
_MIN_CHUNK = 1 << 20
#: on a CPU, chunked temporaries stay near the cache's size (2 MiB in float64) instead: the
#: element-wise passes over them run faster there than the extra Python loop costs
_CPU_CHUNK = 1 << 18


#: rows per chunk of full components' products, whatever the temporaries' size
_MIN_ROWS = 256


def _chunk_elements(share: int, device: torch.device) -> int:
    """Elements a chunked temporary may hold: ``share`` (a fraction of the input's elements), at
    least ``_MIN_CHUNK``; on a CPU at most ``_CPU_CHUNK``."""
    n = max(share, _MIN_CHUNK)
    return min(n, _CPU_CHUNK) if device.type == "cpu" else n
_FIELDS = ("score", "x0", "eps")
_POSTERIORS = ("resp", "log_resp")


def _like(v: Scale, x: torch.Tensor) -> Scale:
    """A float64 scale (number, 0-d tensor or column) in ``x``'s dtype."""
    return v if isinstance(v, float) else v.to(x.dtype)


class GaussianMixture:
    r"""Mixture of Gaussians with isotropic, diagonal or full-covariance components, any event shape.

    Args:
        weights: ``(K,)`` non-negative mixture weights (normalised here).
        means: ``(K, *event_shape)`` component means, e.g. ``(K, 2)`` or ``(K, 3, 32, 32)``.
        stds: ``(K,)`` isotropic standard deviations, or ``(K, *event_shape)`` diagonal ones.
        sde: forward SDE defining ``p_t``; needed by every method given a time ``t``.
        covariances: instead of ``stds``, full ``(K, dim, dim)`` symmetric positive-definite
            covariance matrices acting on the flattened event (``dim = prod(event_shape)``).
        labels: optional ``(K,)`` integer class of each component (several components may share
            one); the classes are ``0 .. n_classes - 1`` and each has at least one component.
            ``n_classes`` itself is the *null* label (unconditional), as for the networks.

Class labels make the oracle conditional, exactly and at every ``t``: with ``y(k)`` the class of
component ``k`` and ``r_k(x, t) = p(k | x_t)`` the responsibilities,

.. math:: p(y \mid x_t) = \sum_{k: y(k) = y} r_k(x, t), \qquad
          \nabla_x \log p(y \mid x_t) = \nabla_x \log p_t(x \mid y) - \nabla_x \log p_t(x)

(Bayes' rule; ``p_t(x | y)`` is the sub-mixture of class ``y`` with renormalised weights, diffused
by the same SDE: :meth:`conditional`). :meth:`score`, :meth:`x0`, :meth:`eps` and :meth:`log_prob`
take ``y=`` (a class, or one per sample, the null label meaning unconditional) and
:meth:`sample` draws ``p(x_0 | y)``.

    A time ``t=None`` means the clean data distribution ``p_data``; a number or a ``(batch,)``
    tensor means the law of ``alpha(t) x0 + sigma(t) z`` under ``sde`` (for the VE SDE that
    includes ``sigma_min`` noise at ``t = 0``). A number, a 0-d tensor, an expanded tensor
    (stride 0) or a CPU tensor whose entries are all equal is one shared time: the time-dependent
    scalars are computed once. Parameters are stored in float64 and fixed at construction; each
    call computes in the dtype and on the device of its input (copies of the parameters are
    cached per dtype and device).
    """

    def __init__(self, weights: ArrayLike, means: ArrayLike, stds: Optional[ArrayLike] = None,
                 sde: Optional[SDE] = None, *, covariances: Optional[ArrayLike] = None,
                 labels: Optional[ArrayLike] = None):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        m = torch.as_tensor(means, dtype=torch.float64)
        K = w.shape[0]
        require(K >= 1, "weights must hold at least one component")
        require(bool(torch.isfinite(w).all()) and bool((w >= 0).all()) and float(w.sum()) > 0,
                f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
        require(m.ndim >= 2 and m.shape[0] == K,
                f"means must have shape (K={K}, *event_shape), got {tuple(m.shape)}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"means must be finite, got {m[~torch.isfinite(m)][0].item()!r}")
        require((stds is None) != (covariances is None),
                "pass exactly one of stds (isotropic or diagonal components) and covariances (full ones)"
                + (", got both" if stds is not None else ", got neither"))
        require(sde is None or isinstance(sde, SDE), f"sde must be an SDE instance, got {sde!r}")
        self.weights = w / w.sum()
        self.means = m
        self.sde = sde
        dim = m[0].numel()
        flat_m = m.reshape(K, dim)
        self._cache: Dict[Tuple[torch.device, torch.dtype], Dict[str, torch.Tensor]] = {}
        self._times: Dict[float, Tuple[float, float]] = {}          # t -> (alpha, sigma) under sde
        self._set_labels(labels)
        if covariances is None:
            s = torch.as_tensor(stds, dtype=torch.float64)
            if s.ndim == 0:
                s = s.expand(K)
            if s.ndim == 1:
                require(s.shape[0] == K,
                        f"stds must have shape (K={K},) or {tuple(m.shape)}, got {tuple(s.shape)}")
                s = expand_to(s, m).expand_as(m)
            require(s.shape == m.shape,
                    f"stds must have shape (K={K},) or {tuple(m.shape)}, got {tuple(s.shape)}")
            require(bool(torch.isfinite(s).all()) and bool((s > 0).all()),
                    f"stds must be finite and > 0, got min {float(s.min())!r}")
            self.stds: Optional[torch.Tensor] = s.contiguous()
            self.covariances: Optional[torch.Tensor] = None
            var = self.stds.reshape(K, dim) ** 2
            self._kind = "isotropic" if bool((var == var[:, :1]).all()) else "diagonal"
            # (K, dim) variances along the axes in which the differences are taken (the data axes)
            self._base = {"means": flat_m, "axis_means": flat_m, "axis_var": var,
                          "iso_var": var[:, 0].contiguous(), "sq_norms": (flat_m * flat_m).sum(1)}
        else:
            c = torch.as_tensor(covariances, dtype=torch.float64)
            require(tuple(c.shape) == (K, dim, dim),
                    f"covariances must have shape (K={K}, {dim}, {dim}), got {tuple(c.shape)}")
            require(bool(torch.isfinite(c).all()), "covariances must be finite")
            asym = float((c - c.mT).abs().max())
            require(asym <= 1e-10 * max(float(c.abs().max()), 1e-300),
                    f"covariances must be symmetric, got max |C - C^T| = {asym!r}")
            c = 0.5 * (c + c.mT)
            lam, U = torch.linalg.eigh(c)
            self._set_full(lam, U, c, "covariances must be positive definite")

    def _set_full(self, lam: torch.Tensor, U: torch.Tensor, c: torch.Tensor, what: str) -> None:
        """Full components from ``C_k = U_k diag(lam_k) U_k^T`` (eigenvalues checked > 0)."""
        K, dim = lam.shape
        low = lam.min(1).values
        k_bad = int(low.argmin())
        require(bool((low > 0).all()),
                f"{what}, got smallest eigenvalue {float(low[k_bad])!r} in component {k_bad}")
        self.stds = None
        self.covariances = c
        self._kind = "full"
        flat_m = self.means.reshape(K, dim)
        # x.U_k - alpha m_k.U_k are the differences in component k's eigenbasis; rotations[:, k D + e]
        # is U_k[:, e], so x @ rotations rotates x into every eigenbasis in one product
        self._base = {"means": flat_m, "axis_means": torch.einsum("kd,kde->ke", flat_m, U),
                      "axis_var": lam.contiguous(), "rotations": U.permute(1, 0, 2).reshape(dim, K * dim)}

    def _set_labels(self, labels: Optional[ArrayLike]) -> None:
        """Validate and store the components' classes: ``labels`` ``(K,)`` long (or ``None``),
        ``n_classes``, and ``_members`` ``(n_classes + 1, K)``: row ``c`` marks class ``c``'s
        components, the last row (the null label) all of them."""
        self._conditionals: Dict[int, "GaussianMixture"] = {}
        if labels is None:
            self.labels: Optional[torch.Tensor] = None
            self.n_classes: Optional[int] = None
            self._members: Optional[torch.Tensor] = None
            return
        K = self.n_components
        raw = torch.as_tensor(labels)
        require(tuple(raw.shape) == (K,),
                f"labels must hold one class per component, shape ({K},), got {tuple(raw.shape)}")
        if raw.is_floating_point():
            require(bool(torch.isfinite(raw).all()) and bool((raw == raw.round()).all()),
                    f"labels must be integers, got {raw.tolist()}")
        else:
            require(raw.dtype != torch.bool and not raw.is_complex(),
                    f"labels must be integers, got dtype {raw.dtype}")
        lab = raw.long()
        require(bool((lab >= 0).all()), f"labels must be >= 0, got {lab.tolist()}")
        C = int(lab.max()) + 1
        missing = sorted(set(range(C)) - set(lab.tolist()))
        require(not missing, f"labels must use every class 0..{C - 1} (each class needs a "
                             f"component), got {lab.tolist()}: no component of class {missing}")
        self.labels, self.n_classes = lab, C
        members = torch.zeros(C + 1, K, dtype=torch.bool)
        members[lab, torch.arange(K)] = True
        members[C] = True
        self._members = members

    def check_model_kwargs(self, kwargs: dict) -> None:
        """The arguments an :class:`~sde_diffusion.models.OracleModel` of this mixture accepts
        (bound or per call): none for an unlabelled mixture; ``y`` (a class, one per sample, the
        null label ``n_classes`` or ``None``: unconditional) for a labelled one."""
        if not kwargs:
            return
        require(self.labels is not None,
                f"the oracle of a Gaussian mixture without labels takes no network arguments, got "
                f"{', '.join(kwargs)}: build the mixture with labels=... for y, or bind arguments "
                f"to a ScoreModel of a network")
        other = [k for k in kwargs if k != "y"]
        require(not other, f"the oracle of a labelled Gaussian mixture takes only y=..., got "
                           f"{', '.join(other)}")
        if kwargs["y"] is not None:
            self._check_y(kwargs["y"], "OracleModel")

    def _require_labels(self, what: str) -> int:
        require(self.labels is not None,
                f"{what} needs class labels, and this mixture has none: build it with "
                f"labels=... (one class per component)")
        return self.n_classes

    def _check_y(self, y, what: str, null_ok: bool = True) -> Union[int, torch.Tensor]:
        """``y`` a class (int) or a tensor of classes, in ``0 .. n_classes - 1`` (and the null
        label ``n_classes`` when ``null_ok``)."""
        C = self._require_labels(what)
        hi = C if null_ok else C - 1
        valid = f"0..{hi}" + (f" ({C} = the null label, unconditional)" if null_ok else "")
        if isinstance(y, torch.Tensor) and y.ndim > 0:
            require(not y.is_floating_point() and y.dtype != torch.bool and not y.is_complex(),
                    f"{what}: y must hold integer classes, got dtype {y.dtype}")
            require(y.ndim == 1, f"{what}: y must be a class or a (batch,) tensor, got shape "
                                 f"{tuple(y.shape)}")
            if y.numel():
                lo_, hi_ = int(y.min()), int(y.max())
                require(lo_ >= 0 and hi_ <= hi, f"{what}: y must lie in {valid}, got "
                                                f"{lo_ if lo_ < 0 else hi_}")
            return y.long()
        try:
            c = int(y)
            ok = c == y
        except (TypeError, ValueError):
            ok = False
        require(ok and not isinstance(y, bool), f"{what}: y must be an integer class, got {y!r}")
        require(0 <= c <= hi, f"{what}: y must lie in {valid}, got {c}")
        return c

    @classmethod
    def from_eigen(cls, weights: ArrayLike, means: ArrayLike, eigenvalues: ArrayLike,
                   eigenvectors: ArrayLike, sde: Optional[SDE] = None, *,
                   labels: Optional[ArrayLike] = None) -> "GaussianMixture":
        """Full components given as ``C_k = U_k diag(l_k) U_k^T``: ``eigenvalues`` ``(K, dim)``
        (> 0) and orthonormal ``eigenvectors`` ``(K, dim, dim)`` (columns). Skips the
        eigendecomposition (``O(K dim^3)``, minutes for ``dim`` in the thousands); the
        orthonormality check and ``covariances`` cost two matrix products per component."""
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mix = cls(w, means, torch.ones(w.shape[0], dtype=torch.float64), sde,  # validates the rest
                  labels=labels)
        K, dim = mix.n_components, mix.dim
        lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
        U = torch.as_tensor(eigenvectors, dtype=torch.float64)
        require(tuple(lam.shape) == (K, dim),
                f"eigenvalues must have shape (K={K}, {dim}), got {tuple(lam.shape)}")
        require(tuple(U.shape) == (K, dim, dim),
                f"eigenvectors must have shape (K={K}, {dim}, {dim}), got {tuple(U.shape)}")
        require(bool(torch.isfinite(lam).all()) and bool(torch.isfinite(U).all()),
                "eigenvalues and eigenvectors must be finite")
        err = float((U.mT @ U - torch.eye(dim, dtype=torch.float64)).abs().max())
        require(err <= 1e-10 * max(dim, 10),
                f"eigenvectors must be orthonormal (columns), got max |U^T U - I| = {err!r}")
        c = (U * lam[:, None, :]) @ U.mT
        mix._set_full(lam, U, 0.5 * (c + c.mT), "eigenvalues must be > 0")
        return mix

    # ---- descriptors --------------------------------------------------------------------------
    @property
    def n_components(self) -> int:
        return self.weights.shape[0]

    @property
    def event_shape(self) -> torch.Size:
        return self.means.shape[1:]

    @property
    def dim(self) -> int:
        return self.means[0].numel()

    @property
    def kind(self) -> str:
        """``"isotropic"``, ``"diagonal"`` or ``"full"``: which components (and so which fast path)."""
        return self._kind

    def with_sde(self, sde: SDE) -> "GaussianMixture":
        """The same mixture, diffused by ``sde`` (shares the parameters and their cached copies)."""
        require(isinstance(sde, SDE), f"sde must be an SDE instance, got {sde!r}")
        other = copy.copy(self)
        other.sde, other._times, other._conditionals = sde, {}, {}
        return other

    def mean(self) -> torch.Tensor:
        """Mean of the clean data distribution."""
        return torch.einsum("k,k...->...", self.weights, self.means)

    def covariance(self) -> torch.Tensor:
        """Covariance of the clean data, flattened to ``(dim, dim)`` (law of total covariance)."""
        m = self._base["means"]
        mu = self.weights @ m
        if self.covariances is not None:
            within = torch.einsum("k,kde->de", self.weights, self.covariances)
        else:
            within = torch.diag(self.weights @ self._base["axis_var"])
        return within + (m.T * self.weights) @ m - torch.outer(mu, mu)

    # ---- internals ----------------------------------------------------------------------------
    def _check_x(self, x: torch.Tensor) -> None:
        require(isinstance(x, torch.Tensor) and x.is_floating_point(),
                f"x must be a floating-point tensor, got {type(x).__name__}")
        require(tuple(x.shape[1:]) == tuple(self.event_shape),
                f"x must have shape (batch, {', '.join(map(str, self.event_shape))}), got {tuple(x.shape)}")

    def _params(self, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """The parameters on ``like``'s device in ``dtype`` (default ``like``'s), converted once
        and cached."""
        key = (like.device, dtype or like.dtype)
        if key not in self._cache:
            p = {k: v.to(device=key[0], dtype=key[1]) for k, v in self._base.items()}
            p["log_weights"] = self.weights.log().to(device=key[0], dtype=key[1])
            self._cache[key] = p
        return self._cache[key]

    def _scales(self, x: torch.Tensor, t: Optional[TimeLike]) -> Tuple[Scale, Scale, bool]:
        """``(alpha, sigma, shared)`` in float64, from ``t`` rounded to ``x``'s dtype. ``shared``:
        every sample has the same time, and alpha and sigma are numbers (computed on the host) or,
        for an expanded time tensor on another device, 0-d tensors there; otherwise they are
        ``(batch, 1)`` columns. No device sync beyond the SDE's own range check of a time tensor
        already on a GPU: a GPU tensor is a shared time only when it is expanded (stride 0)."""
        if t is None:
            return 1.0, 0.0, True
        require(self.sde is not None,
                "this mixture has no SDE: pass sde=... (or use with_sde) to evaluate at a time t")
        if not isinstance(t, torch.Tensor):
            return self._scalar_scales(t, x.dtype) + (True,)
        B = x.shape[0]
        if t.device.type == "cpu" and (t.ndim == 0 or (
                t.ndim == 1 and t.shape[0] == B >= 1
                and (B == 1 or t.stride(0) == 0 or bool((t == t[0]).all())))):
            return self._scalar_scales(t if t.ndim == 0 else t[0], x.dtype) + (True,)
        t = self.sde.time(t, x)                                   # (batch,), x's dtype and device
        if B >= 1 and (B == 1 or t.stride(0) == 0) and t.device.type != "cpu":
            _, log_a, log_s = self.sde.log_scales(t[0].double(), sync=False)
            return log_a.exp(), log_s.exp(), True
        _, log_a, log_s = self.sde.log_scales(t.double(), sync=False)      # checked above
        return log_a.exp()[:, None], log_s.exp()[:, None], False

    def _scalar_scales(self, t: TimeLike, dtype: torch.dtype) -> Tuple[float, float]:
        """alpha and sigma (float64 numbers) of a host time ``t`` rounded to ``dtype``, checked and
        computed once per value (a small cache: fixed-grid solvers and repeated runs revisit their
        times)."""
        key = float(t) if dtype == torch.float64 else float(torch.as_tensor(t, dtype=dtype))
        hit = self._times.get(key)
        if hit is None:
            _, log_a, log_s = self.sde.log_scales(torch.tensor(key, dtype=torch.float64))
            hit = float(log_a.exp()), float(log_s.exp())
            if len(self._times) >= 4096:
                self._times.clear()
            self._times[key] = hit
        return hit

    def _evaluate(self, x: torch.Tensor, t: Optional[TimeLike], what: str) -> torch.Tensor:
        """``what`` in ``log_prob`` ``(batch,)``, ``resp`` ``(batch, K)``, ``score``, ``x0``, ``eps``
        (shaped like ``x``), by the path chosen for this mixture's components."""
        self._check_x(x)
        a, s, shared = self._scales(x, t)
        xf = x.reshape(x.shape[0], self.dim)
        if self._kind == "isotropic":
            out = self._in_float64(xf, what, self._isotropic(xf, a, s, what))
        elif self._kind == "diagonal" and shared:
            out = self._in_float64(xf, what, self._diagonal(xf, a, s, what))
        elif shared:
            out = self._full_shared(xf, a, s, what)
        else:
            out = self._per_sample(xf, a, s, what)
        return out.reshape(x.shape) if what in _FIELDS else out

    def _in_float64(self, xf: torch.Tensor, what: str,
                    fn: Callable[[torch.Tensor, slice], torch.Tensor]) -> torch.Tensor:
        """``fn(x64, rows)`` on ``x`` in float64, returned in ``x``'s dtype. A float64 ``x`` is one
        chunk (no copy); a lower precision is upcast an eighth of the batch at a time (so the
        float64 temporaries stay within the input's size): in float32 the expanded distances
        ``||x||^2 - 2 alpha x.m_k + alpha^2 ||m_k||^2`` would lose ``~||x||^2 / ||x - alpha m_k||^2``
        in relative accuracy, and TF32 matrix products would lose far more."""
        B, D = xf.shape
        if xf.dtype == torch.float64:
            return fn(xf, slice(None))
        rows = max(1, _chunk_elements(B * D // 8, xf.device) // max(D, 1))
        if rows >= B:
            return fn(xf.double(), slice(None)).to(xf.dtype)
        shape = {"log_prob": (B,), "resp": (B, self.n_components),
                 "log_resp": (B, self.n_components)}.get(what, (B, D))
        out = xf.new_empty(shape)
        for i in range(0, B, rows):
            out[i:i + rows] = fn(xf[i:i + rows].double(), slice(i, i + rows))
        return out

    def _isotropic(self, xf: torch.Tensor, a: Scale, s: Scale,
                   what: str) -> Callable[[torch.Tensor, slice], torch.Tensor]:
        """Isotropic components, any times. With ``v_k = alpha^2 s_k^2 + sigma^2``,

        ``log w_k N_k(x) = log w_k - D/2 log(2 pi v_k) - (||x||^2 - 2 alpha x.m_k + alpha^2 ||m_k||^2) / (2 v_k)``

        (one ``(batch, K)`` matrix product). The fields use ``u_k = r_k / v_k`` normalised,
        ``u = softmax(log w_k N_k - log v_k)``, and ``q = sum_k r_k / v_k``:
        ``score = q (alpha u.M - x)``, ``E[x0 | x] = q (sigma^2 u.M + alpha (u.s^2) x)`` (the
        per-component posterior means ``m_k + alpha s_k^2 / v_k (x - alpha m_k)`` summed without a
        division by ``alpha``, so exact where ``alpha`` is tiny), ``eps = -sigma score``."""
        p = self._params(xf, torch.float64)
        M, s2 = p["means"], p["iso_var"]
        field = what in _FIELDS
        c1 = 0.5 * xf.shape[1] + (1.0 if field else 0.0)         # the power of 1 / v_k in the weights
        log_w = p["log_weights"] - 0.5 * xf.shape[1] * _LOG_2PI
        shared = not isinstance(a, torch.Tensor) or a.ndim < 2
        if shared:                    # alpha / v_k folded into the product, -1 / (2 v_k) into one addcmul
            v = a * a * s2 + s * s                                 # (K,)
            base = log_w - c1 * torch.log(v) - (0.5 * a * a) * p["sq_norms"] / v
            lin, quad = (M * (a / v)[:, None]).T, -0.5 / v

        def fn(x: torch.Tensor, rows: slice) -> torch.Tensor:
            sq = (x * x).sum(1, keepdim=True)
            if shared:
                aa, ss = a, s
                lj = torch.addmm(base, x, lin).addcmul_(sq, quad)
            else:                                                  # (c, K) per-sample variances
                aa, ss = a[rows], s[rows]
                vv = torch.addcmul(ss * ss, aa * aa, s2)
                dist = torch.addmm(torch.addcmul(sq, aa * aa, p["sq_norms"]), x * (-2 * aa), M.T)
                lj = torch.add(log_w, torch.log(vv), alpha=-c1).sub_(dist.div_(vv), alpha=0.5)
            if what == "log_prob":
                return torch.logsumexp(lj, dim=1)
            if what in _POSTERIORS:
                return torch.softmax(lj, dim=1) if what == "resp" else torch.log_softmax(lj, dim=1)
            e = lj.sub_(lj.max(1, keepdim=True).values).exp_()    # proportional to r_k / v_k
            norm = e.sum(1, keepdim=True)
            es2 = (e @ s2).unsqueeze(1)
            q = norm / (aa * aa * es2 + ss * ss * norm)             # sum_k r_k / v_k
            out = (e / norm) @ M
            if what == "x0":
                out.mul_(ss * ss).addcmul_(x, es2 / norm * aa)
                return out.mul_(q)
            out = out.mul_(aa).sub_(x).mul_(q)
            return out.mul_(-ss) if what == "eps" else out

        return fn

    def _diagonal(self, xf: torch.Tensor, a: Scale, s: Scale,
                  what: str) -> Callable[[torch.Tensor, slice], torch.Tensor]:
        """Diagonal components, one time for the batch. With ``P_k = 1 / (alpha^2 s_k^2 + sigma^2)``
        per axis, ``sum_d (x_d - alpha m_kd)^2 P_kd = (x^2).P_k - 2 alpha x.(m_k P_k) + alpha^2
        sum_d m_kd^2 P_kd`` (two ``(batch, K)`` products); ``score = sum_k r_k P_k (alpha m_k - x)``,
        ``E[x0 | x] = sum_k r_k (sigma^2 P_k m_k + alpha s_k^2 P_k x)``, ``eps = -sigma score``."""
        p = self._params(xf, torch.float64)
        var0, m = p["axis_var"], p["means"]
        v = a * a * var0 + s * s                                   # (K, D)
        prec = v.reciprocal()
        mp = m * prec
        base = p["log_weights"] - 0.5 * (torch.log(v).sum(1) + v.shape[1] * _LOG_2PI) \
            - (0.5 * a * a) * (m * mp).sum(1)
        lin, quad = (a * mp).T, (-0.5 * prec).T

        def fn(x: torch.Tensor, rows: slice) -> torch.Tensor:
            lj = torch.addmm(base, x, lin).addmm_(x * x, quad)
            if what == "log_prob":
                return torch.logsumexp(lj, dim=1)
            if what == "log_resp":
                return torch.log_softmax(lj, dim=1)
            r = torch.softmax(lj, dim=1)
            if what == "resp":
                return r
            if what == "x0":
                return (r @ ((s * s) * mp)).addcmul_(x, r @ (a * var0 * prec))
            out = (r @ (a * mp)).addcmul_(x, r @ prec, value=-1)
            return out.mul_(-s) if what == "eps" else out

        return fn

    def _chunks(self, xf: torch.Tensor, what: str):
        """Row ranges whose ``(chunk, K, D)`` temporaries each hold at most a sixth of the input's
        elements (four or five are alive at once; see ``_chunk_elements``), and the result tensor
        they fill. Full components take at least ``_MIN_ROWS`` rows per chunk: their products read
        all ``K D^2`` eigenvector entries once per chunk, which a few rows would not amortise."""
        B, D = xf.shape
        K = self.n_components
        chunk = max(1, _chunk_elements(B * D // 6, xf.device) // (K * D))
        if self._kind == "full":
            chunk = max(chunk, _MIN_ROWS)
        result = xf.new_empty({"log_prob": (B,), "resp": (B, K), "log_resp": (B, K)}.get(what, (B, D)))
        return [slice(i, i + chunk) for i in range(0, B, chunk)], result

    def _full_shared(self, xf: torch.Tensor, a: Scale, s: Scale, what: str) -> torch.Tensor:
        """Full components, one time for the batch, in ``x``'s dtype. With ``v_k = alpha^2 l_k +
        sigma^2`` (once per call), the whitened differences ``y_k = v_k^-1/2 U_k^T (x - alpha m_k)``
        for every ``k`` are one product per chunk, ``log N_k = -1/2 (||y_k||^2 + sum_d log(2 pi
        v_kd))``, ``score = -sum_k r_k U_k (v_k^-1/2 y_k)`` and ``E[x0 | x] = sum_k r_k (m_k + U_k
        (alpha l_k v_k^-1/2 y_k))``: one product back. When the batch holds at least ``K D``
        samples, a score forms the precisions ``P_k = U_k diag(1 / v_k) U_k^T`` instead (``K D^3``
        operations, ``K D^2`` numbers, at most the input's size): ``z_k = P_k (x - alpha m_k)``
        gives ``log N_k`` (through ``(x - alpha m_k).z_k``) and ``score = -sum_k r_k z_k``, one
        product per chunk instead of two."""
        p = self._params(xf)
        B, D = xf.shape
        K = self.n_components
        a, s = _like(a, xf), _like(s, xf)
        v = a * a * p["axis_var"] + s * s                          # (K, D)
        logdet = torch.log(v).sum(1) + D * _LOG_2PI
        rows, result = self._chunks(xf, what)
        if what in ("score", "eps") and B >= K * D:
            U = p["rotations"].view(D, K, D).permute(1, 0, 2)       # (K, D, D): U_k
            prec, m = (U / v[:, None, :]) @ U.mT, p["means"][:, None, :]
            for sl in rows:
                y = xf[None, sl] - a * m                           # (K, c, D)
                z = torch.bmm(y, prec)
                log_joint = p["log_weights"][:, None] - 0.5 * ((z * y).sum(2) + logdet[:, None])
                r = torch.softmax(log_joint, dim=0)[:, :, None]   # (K, c, 1)
                out = (z * r).sum(0)
                result[sl] = out.mul_(s) if what == "eps" else out.neg_()
            return result
        rot, inv_sd = p["rotations"], v.rsqrt()
        shift = a * p["axis_means"]
        for sl in rows:
            xc = xf[sl]
            c = xc.shape[0]
            y = (xc @ rot).view(c, K, D).sub_(shift).mul_(inv_sd)  # whitened, (c, K, D)
            log_joint = p["log_weights"] - 0.5 * ((y * y).sum(2) + logdet)
            if what == "log_prob":
                result[sl] = torch.logsumexp(log_joint, dim=1)
                continue
            if what == "log_resp":
                result[sl] = torch.log_softmax(log_joint, dim=1)
                continue
            r = torch.softmax(log_joint, dim=1)
            if what == "resp":
                result[sl] = r
                continue
            if what == "x0":
                z = y * (r[:, :, None] * (a * p["axis_var"] * inv_sd))
                result[sl] = torch.addmm(r @ p["means"], z.view(c, K * D), rot.T)
            else:
                out = (y * (r[:, :, None] * inv_sd)).view(c, K * D) @ rot.T
                result[sl] = out.mul_(s) if what == "eps" else out.neg_()
        return result

    def _per_sample(self, xf: torch.Tensor, a: torch.Tensor, s: torch.Tensor, what: str) -> torch.Tensor:
        """Diagonal or full components with per-sample times, in ``x``'s dtype: the differences
        ``y_k = U_k^T (x - alpha m_k)`` (``U_k = I``, ``l_k = s_k^2`` for diagonal components) and
        ``v_k = alpha^2 l_k + sigma^2`` per sample and component, as the reference formulas
        ``log N_k = -1/2 sum_d (y_kd^2 / v_kd + log(2 pi v_kd))``, ``score = -sum_k r_k U_k
        (y_k / v_k)``, ``E[x0 | x] = sum_k r_k (m_k + U_k (alpha l_k / v_k y_k))``."""
        p = self._params(xf)
        B, D = xf.shape
        K = self.n_components
        a, s = a.to(xf.dtype), s.to(xf.dtype)
        lam, mu, rot = p["axis_var"], p["axis_means"], p.get("rotations")
        rows, result = self._chunks(xf, what)
        for sl in rows:
            xc, ac, sc = xf[sl], a[sl, :, None], s[sl]            # (c, D), (c, 1, 1), (c, 1)
            c = xc.shape[0]
            v = torch.addcmul((sc * sc)[:, :, None], ac * ac, lam)   # (c, K, D)
            y = (xc @ rot).view(c, K, D) if rot is not None else xc[:, None, :]
            y = torch.addcmul(y, ac, mu, value=-1)
            z = y / v
            log_joint = p["log_weights"] - 0.5 * ((z * y).sum(2) + torch.log(v).sum(2) + D * _LOG_2PI)
            if what == "log_prob":
                result[sl] = torch.logsumexp(log_joint, dim=1)
                continue
            if what == "log_resp":
                result[sl] = torch.log_softmax(log_joint, dim=1)
                continue
            r = torch.softmax(log_joint, dim=1)
            if what == "resp":
                result[sl] = r
                continue
            r = r[:, :, None]
            z = y * (ac * lam / v) * r if what == "x0" else z * (-r)
            out = z.reshape(c, K * D) @ rot.T if rot is not None else z.sum(1)
            if what == "x0":
                out += r[:, :, 0] @ p["means"]
            elif what == "eps":
                out *= -sc
            result[sl] = out
        return result

    # ---- exact quantities ---------------------------------------------------------------------
    def log_prob(self, x: torch.Tensor, t: Optional[TimeLike] = None, y=None) -> torch.Tensor:
        """``log p_t(x)`` per sample, shape ``(batch,)`` (log-sum-exp over components); with
        ``y``, ``log p_t(x | y)`` (the sub-mixture of class ``y``)."""
        return self._evaluate(x, t, "log_prob") if y is None else self._by_class(x, t, y, "log_prob")

    def responsibilities(self, x: torch.Tensor, t: Optional[TimeLike] = None) -> torch.Tensor:
        """Posterior component probabilities ``p(k | x_t)``, shape ``(batch, K)``."""
        return self._evaluate(x, t, "resp")

    def score(self, x: torch.Tensor, t: Optional[TimeLike] = None, y=None) -> torch.Tensor:
        """``grad_x log p_t(x) = sum_k r_k (alpha^2 C_k + sigma^2 I)^-1 (alpha m_k - x)``; with
        ``y``, the class-conditional score ``grad_x log p_t(x | y)``."""
        return self._evaluate(x, t, "score") if y is None else self._by_class(x, t, y, "score")

    def x0(self, x: torch.Tensor, t: TimeLike, y=None) -> torch.Tensor:
        """Denoiser ``E[x0 | x_t = x] = sum_k r_k (m_k + alpha C_k (alpha^2 C_k + sigma^2 I)^-1
        (x - alpha m_k))``, computed per component (no division by ``alpha``) so it stays exact
        where ``alpha`` is tiny; with ``y``, ``E[x0 | x_t = x, y]``."""
        return self._evaluate(x, t, "x0") if y is None else self._by_class(x, t, y, "x0")

    def eps(self, x: torch.Tensor, t: TimeLike, y=None) -> torch.Tensor:
        """Noise predictor ``E[z | x_t = x] = -sigma(t) * score`` (with ``y``: given ``y``)."""
        return self._evaluate(x, t, "eps") if y is None else self._by_class(x, t, y, "eps")

    # ---- class labels ---------------------------------------------------------------------------
    def conditional(self, y: int) -> "GaussianMixture":
        """The sub-mixture of class ``y``: its components with weights ``w_k / sum_{y(k)=y} w_j``,
        under the same SDE, so its score, denoiser, log-density and samples are exactly those of
        ``p_t(x | y)``. Unlabelled (its components' classes are all ``y``); the parameters are
        sliced from this mixture's, not recomputed; cached per class."""
        c = self._check_y(y, "conditional", null_ok=False)
        hit = self._conditionals.get(c)
        if hit is None:
            idx = self._members[c].nonzero().squeeze(1)
            K, D = self.n_components, self.dim
            sub = copy.copy(self)
            w = self.weights[idx]
            sub.weights, sub.means = w / w.sum(), self.means[idx]
            sub.stds = None if self.stds is None else self.stds[idx]
            sub.covariances = None if self.covariances is None else self.covariances[idx]
            sub._base = {k: (v.view(D, K, D)[:, idx].reshape(D, len(idx) * D) if k == "rotations"
                             else v[idx]) for k, v in self._base.items()}
            sub._cache, sub._times = {}, {}
            sub._set_labels(None)
            hit = self._conditionals[c] = sub
        return hit

    def log_class_posterior(self, x: torch.Tensor, t: Optional[TimeLike] = None) -> torch.Tensor:
        """``log p(y | x_t)`` for every class, shape ``(batch, n_classes)``: the log-sum-exp of the
        log-responsibilities of each class's components (exact where the posterior underflows)."""
        C = self._require_labels("log_class_posterior")
        lr = self._evaluate(x, t, "log_resp")                            # (batch, K)
        mask = self._members[:C].to(lr.device)
        return lr[:, None, :].masked_fill(~mask, -math.inf).logsumexp(2)

    def class_posterior(self, x: torch.Tensor, t: Optional[TimeLike] = None) -> torch.Tensor:
        """``p(y | x_t) = sum_{k: y(k) = y} p(k | x_t)`` for every class, shape ``(batch,
        n_classes)`` (rows sum to 1)."""
        C = self._require_labels("class_posterior")
        r = self._evaluate(x, t, "resp")
        return r @ self._members[:C].T.to(r)

    def log_class_posterior_grad(self, x: torch.Tensor, t: Optional[TimeLike], y) -> torch.Tensor:
        """``grad_x log p(y | x_t) = grad_x log p_t(x | y) - grad_x log p_t(x)`` (Bayes' rule:
        ``log p(y | x_t) = log p_t(x | y) + log p(y) - log p_t(x)``), in closed form: the score of
        class ``y``'s sub-mixture minus the mixture's. ``y`` a class or one per sample
        (``(batch,)``), not the null label. The exact classifier of classifier guidance
        (Dhariwal & Nichol 2021, Sec. 4; Song et al. 2021, Sec. 5)."""
        self._check_y(y, "log_class_posterior_grad", null_ok=False)
        return self._by_class(x, t, y, "score") - self._evaluate(x, t, "score")

    def _by_class(self, x: torch.Tensor, t: Optional[TimeLike], y, what: str) -> torch.Tensor:
        """``what`` of ``p_t(x | y)``: class ``y``'s sub-mixture on the rows of class ``y``, the
        whole mixture on the rows with the null label."""
        y = self._check_y(y, what)
        C = self.n_classes
        if not isinstance(y, torch.Tensor):
            return (self if y == C else self.conditional(y))._evaluate(x, t, what)
        self._check_x(x)
        require(y.shape[0] == x.shape[0],
                f"y must hold one class per sample, shape ({x.shape[0]},), got {tuple(y.shape)}")
        y = y.to(x.device)
        classes = torch.unique(y).tolist()
        if len(classes) == 1:
            return (self if classes[0] == C else self.conditional(classes[0]))._evaluate(x, t, what)
        out = x.new_empty((x.shape[0],) if what == "log_prob" else x.shape)
        per_sample = isinstance(t, torch.Tensor) and t.ndim == 1 and t.shape[0] == x.shape[0] > 1
        for c in classes:
            rows = (y == c).nonzero().squeeze(1)
            tc = t
            if per_sample:
                tc = t[:1].expand(len(rows)) if t.stride(0) == 0 else t[rows.to(t.device)]
            out[rows] = (self if c == C else self.conditional(c))._evaluate(x[rows], tc, what)
        return out

    def sample(self, n: int, t: Optional[TimeLike] = None,
               generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device, None] = None,
               return_labels: bool = False, y=None):
        """Draw ``n`` samples of ``p_t`` (``t=None``: clean data), optionally with their components
        (``return_labels``: the component index of each sample; its class is ``labels[index]``).
        Full-covariance components draw ``m_k + U_k (sqrt(l_k) * z)``. ``y`` (a labelled
        mixture): draw ``p_t(x | y)`` instead, for one class or one per sample (``(n,)``; the null
        label draws from the whole mixture): the components of class ``y`` with renormalised
        weights."""
        require(isinstance(n, int) and n >= 1, f"n must be an integer >= 1, got {n!r}")
        if generator is not None and device is None:
            device = generator.device
        if y is None:
            labels = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        else:
            y = self._check_y(y, "sample")
            if isinstance(y, torch.Tensor):
                require(y.shape[0] == n, f"sample: y must hold one class per sample, shape ({n},), "
                                         f"got {tuple(y.shape)}")
                w = self.weights.to(device) * self._members.to(device)[y.to(device)]   # (n, K)
                labels = torch.multinomial(w, 1, generator=generator).squeeze(1)
            else:
                w = self.weights.to(device) * self._members.to(device)[y]
                labels = torch.multinomial(w, n, replacement=True, generator=generator)
        noise = torch.randn((n,) + tuple(self.event_shape), generator=generator, device=device,
                            dtype=torch.float64)
        if self.covariances is None:
            x = self.means.to(device)[labels] + self.stds.to(device)[labels] * noise
        else:
            p = self._params(noise)
            D, flat = self.dim, noise.reshape(n, -1)
            x = p["means"][labels]
            for k in range(self.n_components):
                idx = (labels == k).nonzero().squeeze(1)
                u = p["rotations"][:, k * D:(k + 1) * D]
                x[idx] += (flat[idx] * p["axis_var"][k].sqrt()) @ u.T
            x = x.reshape(noise.shape)
        if t is not None:
            z = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float64)
            require(self.sde is not None,
                    "this mixture has no SDE: pass sde=... (or use with_sde) to evaluate at a time t")
            _, log_a, log_s = self.sde.log_scales(t, x)
            a, s = expand_to(log_a.exp(), x), expand_to(log_s.exp(), x)
            x = a * x + s * z
        x = x.to(dtype)
        return (x, labels) if return_labels else x


def random_mixture(dim: Union[int, Sequence[int]] = 2, n_components: int = 8, seed: int = 0,
                   sde: Optional[SDE] = None, spread: float = 0.6,
                   std_range: Sequence[float] = (0.05, 0.2), diagonal: bool = False,
                   full: bool = False, labels: Optional[ArrayLike] = None) -> GaussianMixture:
    """A reproducible mixture with unequal weights and widths, its means inside ``[-spread, spread]``
    (data roughly in ``[-1, 1]`` like scaled images). ``dim`` may be an event shape. ``diagonal``:
    a standard deviation per axis; ``full``: covariances ``U_k diag(s_k^2) U_k^T`` with such
    per-axis ``s_k`` and random orthogonal ``U_k`` (QR of a Gaussian matrix), built by
    :meth:`GaussianMixture.from_eigen`. ``labels``: the components' classes (see
    :class:`GaussianMixture`)."""
    event = (dim,) if isinstance(dim, int) else tuple(dim)
    require(n_components >= 1, f"n_components must be >= 1, got {n_components!r}")
    lo, hi = float(std_range[0]), float(std_range[1])
    require(0 < lo <= hi, f"std_range must satisfy 0 < low <= high, got {tuple(std_range)}")
    require(not (diagonal and full), "pass at most one of diagonal=True and full=True")
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(n_components, generator=g, dtype=torch.float64) + 0.2
    means = (torch.rand((n_components,) + event, generator=g, dtype=torch.float64) * 2 - 1) * spread
    std_shape = (n_components,) + (event if diagonal or full else ())
    stds = lo + (hi - lo) * torch.rand(std_shape, generator=g, dtype=torch.float64)
    if not full:
        return GaussianMixture(weights, means, stds, sde, labels=labels)
    d = math.prod(event)
    q, r = torch.linalg.qr(torch.randn((n_components, d, d), generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]   # the Haar-distributed Q
    return GaussianMixture.from_eigen(weights, means, stds.reshape(n_components, d) ** 2, q, sde,
                                      labels=labels)
