r"""Guidance as model wrappers: every solver samples a guided model unchanged.

A guided model is a :class:`~sde_diffusion.models.ScoreModel` whose views (``eps``, ``x0``,
``score``, ``at_scales``) combine several evaluations of an inner model (a network's
``ScoreModel`` or the exact :class:`~sde_diffusion.models.OracleModel` of a labelled mixture).

**Classifier-free guidance** (Ho & Salimans 2022, Eq. 6, written in their ``w``):

.. math:: \tilde\varepsilon(x, y) = \varepsilon_u + s\,(\varepsilon_c - \varepsilon_u), \qquad s = 1 + w,

with ``eps_c = eps(x, t, y)`` and ``eps_u = eps(x, t, null)``. Here ``scale=s``: ``s = 1`` is the
plain conditional model, ``s = 0`` the unconditional one; ``w=`` gives the paper's weight
(``s = 1 + w``). In score form this is ``score_u + s (score_c - score_u) = grad log p_t(x) + s grad
log p_t(y | x)``, the score of ``p_t(x) p_t(y | x)^s``. The combination has weights ``1 - s`` and
``s`` summing to 1, and every change of view (``x0 = (x - sigma eps) / alpha``, ``score = -eps /
sigma``) is affine in the output at fixed ``(x, t)``, so combining eps, x0 or score gives the same
model (to round-off): each view combines the inner model's same view.

**Classifier guidance** (Dhariwal & Nichol 2021, Sec. 4.1; Song et al. 2021, Sec. 5, "controllable
generation"): ``score + s grad_x log p_t(y | x)``, i.e. ``eps - s sigma grad`` and ``x0 + s
(sigma^2 / alpha) grad``, with the classifier a noise-conditional network (gradient by autograd)
or the oracle's exact one (:meth:`GaussianMixture.log_class_posterior_grad`).

**Guidance interval** (Kynkäänniemi et al. 2024, Sec. 3): guidance only where the noise level
``sigma(t) / alpha(t)`` (EDM's sigma, ``exp(-lambda(t))``; ``sigma(t)`` for VE) lies in
``(lo, hi]``; elsewhere the plain conditional model (``s = 1``), which costs one evaluation.

**Rescaled guidance** (Lin et al. 2024, Sec. 3.4 and Algorithm 2): ``g = u + s (c - u)`` rescaled per
sample to the conditional prediction's standard deviation and mixed, ``phi g std(c) / std(g) + (1 -
phi) g``. The paper applies it to its network's prediction (``v``, Algorithm 2; diffusers to the raw
network output); this wrapper applies it to ``x0`` by default (``rescale_on="x0"``: the quantity
whose over-saturation the paper describes), or to ``eps`` or ``v``.

**Counting.** ``nfe`` counts network evaluations per sample: a guided call is 2 (conditional and
unconditional, batched or not), a call outside the interval 1; this is what
``SampleResult.nfe`` reports, so a guided run at ``nfe`` evaluations costs what an unguided run at
``nfe`` costs in arithmetic. ``scale=1`` evaluates the conditional model alone (1 per call). ``network_calls`` counts calls of the network: 1 per guided call
when ``batched`` (one call on ``2B`` samples, the default), 2 otherwise.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from .._checks import TimeLike, expand_to, require
from .wrapper import OracleModel, ScoreModel, as_model

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "RESCALE_SPACES"]

RESCALE_SPACES = ("x0", "eps", "v")
Scale = Union[float, torch.Tensor]


def _number(name: str, value, low: float, valid: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number {valid}, got {value!r}") from None
    require(math.isfinite(v) and v >= low and not isinstance(value, bool),
            f"{name} must be a finite number {valid}, got {value!r}")
    return v


def _check_interval(interval) -> Optional[Tuple[float, float]]:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"interval must be a pair (lo, hi) of noise levels sigma/alpha with "
                         f"0 <= lo < hi (hi may be inf), got {interval!r}") from None
    require(lo >= 0 and hi > lo and not math.isnan(hi),
            f"interval must be a pair (lo, hi) of noise levels sigma/alpha with 0 <= lo < hi "
            f"(hi may be inf), got {interval!r}")
    return lo, hi


def _class_count(model: ScoreModel) -> Optional[int]:
    """The number of classes ``K`` of a class-conditional model (null label ``K``), else None."""
    if isinstance(model, OracleModel):
        return model.mixture.n_classes
    return getattr(model.net, "num_classes", None)


class _Guided(ScoreModel):
    """What both guidance wrappers share: the inner model, the label, the interval, counting."""

    def __init__(self, model, y, interval):
        model = as_model(model)
        super().__init__(model.net, model.sde, model.parameterization, model.time_input,
                         model.check_finite)
        self.model = model
        self.interval = _check_interval(interval)
        self.network_calls = 0
        if y is not None:
            self.bound = {"y": y}

    def bind(self, **kwargs) -> "ScoreModel":
        """This guided model with ``kwargs`` (``y=`` labels, other network arguments) bound; it
        counts its own ``nfe`` and ``network_calls`` from 0."""
        bound = super().bind(**kwargs)
        bound.network_calls = 0
        return bound

    def reset_nfe(self) -> None:
        self.nfe = self.network_calls = 0

    def raw(self, x, t, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} combines several network outputs: ask "
                                  f"for a view (eps, x0, score), or call .model.raw for the network")

    # ---- the views: one implementation, with or without the caller's scales ---------------------
    def eps(self, x: torch.Tensor, t: TimeLike, **kwargs) -> torch.Tensor:
        """Guided noise prediction."""
        return self._view("eps", x, t, None, None, kwargs)

    def x0(self, x: torch.Tensor, t: TimeLike, **kwargs) -> torch.Tensor:
        """Guided data prediction."""
        return self._view("x0", x, t, None, None, kwargs)

    def score(self, x: torch.Tensor, t: TimeLike, **kwargs) -> torch.Tensor:
        """Guided score."""
        return self._view("score", x, t, None, None, kwargs)

    def at_scales(self, view: str, x: torch.Tensor, t: torch.Tensor, alpha: float, sigma: float,
                  **kwargs) -> torch.Tensor:
        """The guided view at a checked ``(batch,)`` time with its scales as numbers (a sampler's
        grid): the inner model is called through its own ``at_scales``."""
        require(view in ("eps", "x0", "score"), f"view must be eps, x0 or score, got {view!r}")
        return self._view(view, x, t, float(alpha), float(sigma), kwargs)

    def _inner(self, view: str, x, t, a, s, kwargs) -> torch.Tensor:
        if isinstance(a, float):
            return self.model.at_scales(view, x, t, a, s, **kwargs)
        return getattr(self.model, view)(x, t, **kwargs)

    def _scales(self, x, t, a, s):
        """``(t, alpha, sigma)``: numbers when the caller has them, else ``t`` checked as a
        ``(batch,)`` tensor and the scales as tensors broadcasting over ``x``."""
        if a is not None:
            return t, a, s
        t, log_a, log_s = self.sde.log_scales(t, x, sync=False)
        return t, expand_to(log_a.exp(), x), expand_to(log_s.exp(), x)

    def _active(self, a: Scale, s: Scale):
        """Where guidance applies: ``True``/``False`` for the whole batch, or a ``(batch,)`` mask."""
        if self.interval is None:
            return True
        lo, hi = self.interval
        if isinstance(a, float):
            return lo < s / a <= hi
        level = (s / a).reshape(-1)
        mask = (level > lo) & (level <= hi)
        if bool(mask.all()):
            return True
        return False if not bool(mask.any()) else expand_to(mask, a)

    def _labels(self, kwargs: dict, x: torch.Tensor, what: str, from_model: bool = True):
        """``(y, kwargs without y)``: the class from the call, the bound arguments or (when
        ``from_model``) the inner model's bound ones."""
        kwargs = {**self.bound, **kwargs}
        y = kwargs.pop("y", self.model.bound.get("y") if from_model else None)
        require(y is not None, f"{what} needs the class y: pass y=... (one class, or one per "
                               f"sample) to the wrapper or bind(y=...)")
        if isinstance(y, torch.Tensor) and y.ndim > 0:
            require(y.shape == (x.shape[0],),
                    f"y must hold one class per sample, shape ({x.shape[0]},), got {tuple(y.shape)}")
        return y, kwargs


def _from_eps(view: str, e: torch.Tensor, x: torch.Tensor, a: Scale, s: Scale) -> torch.Tensor:
    """``view`` from ``eps`` at scales ``a``, ``s`` (``x = a x0 + s eps``, ``score = -eps/s``)."""
    if view == "eps":
        return e
    return (x - s * e) / a if view == "x0" else -e / s


def _to_eps(view: str, out: torch.Tensor, x: torch.Tensor, a: Scale, s: Scale) -> torch.Tensor:
    if view == "eps":
        return out
    return (x - a * out) / s if view == "x0" else -s * out


class ClassifierFreeGuidance(_Guided):
    r"""Classifier-free guidance (Ho & Salimans 2022) around a class-conditional model.

    Args:
        model: a class-conditional :class:`ScoreModel` whose network takes ``y`` (labels
            ``0..K-1``, the null label ``K``: a network built with ``num_classes=K``), or the
            :class:`OracleModel` of a labelled mixture (or the mixture itself).
        scale: ``s`` in ``eps_u + s (eps_c - eps_u)``: 1 the conditional model, 0 the
            unconditional one, ``> 1`` guided. Or give ``w`` (Ho & Salimans' weight, ``s = 1 + w``).
        y: the class (an int, or a ``(batch,)`` tensor); or bind it later, ``.bind(y=labels)``
            (a model passed in already bound to ``y`` lends its label too).
        null_label: the unconditional label (default: the model's ``num_classes``).
        interval: ``(lo, hi)``: guide only where ``lo < sigma(t)/alpha(t) <= hi`` (Kynkäänniemi
            et al. 2024), the plain conditional model elsewhere (one evaluation).
        rescale: ``phi`` of Lin et al. 2024 (0: off) on ``rescale_on`` (``x0``, ``eps``, ``v``).
        batched: evaluate the conditional and unconditional passes as one call of ``2B``
            samples (default) or as two calls of ``B``. Other per-sample tensors passed to the
            network (first dimension ``B``) are repeated along with ``x``.

    ``nfe`` counts 2 evaluations per guided call, 1 outside the interval; ``network_calls`` the
    calls of the network (see the module docstring).
    """

    def __init__(self, model, scale: Optional[float] = None, *, w: Optional[float] = None,
                 y=None, null_label: Optional[int] = None,
                 interval: Optional[Sequence[float]] = None, rescale: float = 0.0,
                 rescale_on: str = "x0", batched: bool = True):
        super().__init__(model, y, interval)
        require((scale is None) != (w is None),
                "give the guidance as scale=s (eps_u + s (eps_c - eps_u)) or as w= (s = 1 + w), "
                + ("not both" if scale is not None else "got neither"))
        self.scale = (_number("scale", scale, 0.0, ">= 0 (1: conditional, 0: unconditional)")
                      if w is None else 1.0 + _number("w", w, -1.0, ">= -1 (s = 1 + w)"))
        K = _class_count(self.model)
        if null_label is None:
            require(K is not None,
                    f"classifier-free guidance needs a class-conditional model (a network with "
                    f"num_classes, or the oracle of a mixture with labels); "
                    f"{type(self.model.net).__name__ if not isinstance(self.model, OracleModel) else 'this mixture'}"
                    f" has no classes: pass null_label= if the network takes labels")
            null_label = K
        require(isinstance(null_label, int) and not isinstance(null_label, bool) and null_label >= 0,
                f"null_label must be an integer >= 0, got {null_label!r}")
        self.null_label, self.n_classes = null_label, K
        self.rescale = _number("rescale", rescale, 0.0, "in [0, 1] (phi of Lin et al. 2024)")
        require(self.rescale <= 1, f"rescale must be a finite number in [0, 1] (phi of Lin et al. "
                                   f"2024), got {rescale!r}")
        require(rescale_on in RESCALE_SPACES,
                f"rescale_on must be one of {RESCALE_SPACES}, got {rescale_on!r}")
        self.rescale_on = rescale_on
        require(isinstance(batched, bool), f"batched must be True or False, got {batched!r}")
        self.batched = batched

    @property
    def evaluations_per_call(self) -> int:
        """Network evaluations per call of a view inside the interval (2; 1 at ``scale=1``): a
        budget of ``N`` evaluations allows ``N // evaluations_per_call`` solver calls."""
        return 1 if self.scale == 1.0 else 2

    @property
    def w(self) -> float:
        """Ho & Salimans' guidance weight, ``scale - 1``."""
        return self.scale - 1.0

    def __repr__(self) -> str:
        extra = (f", interval={self.interval}" if self.interval else "") + \
            (f", rescale={self.rescale}, rescale_on={self.rescale_on!r}" if self.rescale else "")
        return f"ClassifierFreeGuidance(scale={self.scale}{extra}, batched={self.batched})"

    def _check_label_range(self, y) -> None:
        hi = self.null_label if self.n_classes is None else self.n_classes
        if isinstance(self.model, OracleModel):
            return                                    # the mixture checks its own classes
        if isinstance(y, torch.Tensor) and y.ndim > 0:
            require(not y.is_floating_point(), f"y must hold integer classes, got dtype {y.dtype}")
            bad = y[(y < 0) | (y > hi)]
            require(bad.numel() == 0, f"y must lie in 0..{hi} ({hi} = the null label), got "
                                      f"{bad[0].item() if bad.numel() else None}")
        else:
            require(isinstance(y, int) or (isinstance(y, torch.Tensor) and not y.is_floating_point()),
                    f"y must be an integer class, got {y!r}")
            require(0 <= int(y) <= hi, f"y must lie in 0..{hi} ({hi} = the null label), got {int(y)}")

    def _view(self, view, x, t, a, s, kwargs):
        y, kwargs = self._labels(kwargs, x, "classifier-free guidance")
        self._check_label_range(y)
        t, a, s = self._scales(x, t, a, s)
        active = self._active(a, s)
        if active is False or self.scale == 1.0:      # outside the interval, or s = 1: conditional
            self.nfe += 1
            self.network_calls += 1
            return self._inner(view, x, t, a, s, {**kwargs, "y": y})
        space = view if not self.rescale else ("eps" if self.rescale_on == "v" else self.rescale_on)
        B = x.shape[0]
        y = y.expand(B) if isinstance(y, torch.Tensor) and y.ndim > 0 else \
            torch.full((B,), int(y), dtype=torch.long, device=x.device)
        null = torch.full_like(y, self.null_label)
        if self.batched:
            t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim == 1 else t
            kw2 = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == B
                   else v for k, v in kwargs.items()}
            cond, uncond = self._inner(space, torch.cat([x, x]), t2, a, s,
                                       {**kw2, "y": torch.cat([y, null])}).chunk(2)
            self.network_calls += 1
        else:
            cond = self._inner(space, x, t, a, s, {**kwargs, "y": y})
            uncond = self._inner(space, x, t, a, s, {**kwargs, "y": null})
            self.network_calls += 2
        self.nfe += 2
        out = torch.lerp(uncond, cond, self.scale)
        if self.rescale:
            out = self._rescaled(view, space, x, a, s, cond, out)
        if active is not True:                        # mixed per-sample times: conditional outside
            plain = cond if space == view else _from_eps(view, _to_eps(space, cond, x, a, s), x, a, s)
            out = torch.where(active, out, plain)
        return out

    def _rescaled(self, view, space, x, a, s, cond, guided):
        """Lin et al. 2024 (Sec. 3.4) on ``rescale_on`` (``space`` is ``eps`` for ``v``), then
        ``view``."""
        if self.rescale_on == "v":                    # v = ((a^2 + s^2) eps - s x) / a
            to_v = lambda e: ((a * a + s * s) * e - s * x) / a      # noqa: E731
            cond, guided = to_v(cond), to_v(guided)
        ratio = cond.flatten(1).std(1) / guided.flatten(1).std(1).clamp_min(torch.finfo(x.dtype).tiny)
        out = torch.lerp(guided, guided * expand_to(ratio, x), self.rescale)
        if self.rescale_on == "v":                    # eps = (s x + a v) / (a^2 + s^2)
            out = (s * x + a * out) / (a * a + s * s)
        return out if space == view else _from_eps(view, _to_eps(space, out, x, a, s), x, a, s)


class ClassifierGuidance(_Guided):
    r"""Classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1 / Algorithm 1; Song et al. 2021,
    Sec. 5): ``score(x, t) + s grad_x log p_t(y | x)`` around an unconditional model.

    Args:
        model: the unconditional :class:`ScoreModel` (or the oracle; its bound arguments other
            than ``y`` are kept; ``y`` goes to the classifier only).
        classifier: a labelled :class:`~sde_diffusion.oracles.GaussianMixture` (or its
            ``OracleModel``): the exact gradient :meth:`log_class_posterior_grad`, in closed form;
            or a callable ``classifier(x, t) -> (batch, K)`` of logits or log-probabilities of the
            noisy ``x_t`` at times ``t`` (a ``(batch,)`` tensor of continuous times), e.g. a
            noise-conditional classifier network (``models.classifier.NoisyClassifier``): the
            gradient of ``log_softmax(...)[y]`` by autograd, under ``torch.enable_grad()``
            (``sample()`` runs under ``no_grad``), itself differentiable when the caller builds a
            graph (``sample(..., grad=True)``). A ``torch.nn.Module`` receives ``x`` and ``t`` in
            its parameters' dtype.
        scale: ``s >= 0`` (1 with the exact classifier: the exact conditional score).
        y: the class (int or ``(batch,)``), or bind it later with ``.bind(y=...)``.
        interval: ``(lo, hi)`` of noise levels ``sigma/alpha`` where the gradient is added.

    ``nfe`` counts the model's evaluations plus the classifier's (each with its gradient): 2 per
    guided call, 1 outside the interval; ``classifier_calls`` the classifier's alone.
    """

    def __init__(self, model, classifier, scale: float = 1.0, *, y=None,
                 interval: Optional[Sequence[float]] = None):
        from ..oracles import GaussianMixture

        super().__init__(model, y, interval)
        self.scale = _number("scale", scale, 0.0, ">= 0")
        if isinstance(classifier, OracleModel):
            classifier = classifier.mixture
        if isinstance(classifier, GaussianMixture):
            classifier._require_labels("classifier guidance with the exact classifier")
            if classifier.sde is not self.sde:
                classifier = classifier.with_sde(self.sde)
        else:
            require(callable(classifier),
                    f"classifier must be a labelled GaussianMixture (exact) or a callable "
                    f"(x, t) -> (batch, K) log-probabilities, got {type(classifier).__name__}")
        self.classifier = classifier
        self.classifier_calls = 0

    def bind(self, **kwargs) -> "ScoreModel":
        bound = super().bind(**kwargs)
        bound.classifier_calls = 0
        return bound

    @property
    def evaluations_per_call(self) -> int:
        """Evaluations (model and classifier) per call of a view inside the interval: 2 (1 at
        ``scale=0``)."""
        return 1 if self.scale == 0.0 else 2

    def reset_nfe(self) -> None:
        super().reset_nfe()
        self.classifier_calls = 0

    def __repr__(self) -> str:
        kind = "exact" if hasattr(self.classifier, "n_classes") else type(self.classifier).__name__
        return f"ClassifierGuidance(scale={self.scale}, classifier={kind}" + \
            (f", interval={self.interval})" if self.interval else ")")

    def log_prob_grad(self, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        """``grad_x log p_t(y | x)`` at a ``(batch,)`` time ``t``, in ``x``'s dtype."""
        from ..oracles import GaussianMixture

        self.classifier_calls += 1
        if isinstance(self.classifier, GaussianMixture):
            return self.classifier.log_class_posterior_grad(x, t, y)
        dtype = x.dtype
        if isinstance(self.classifier, torch.nn.Module):
            dtype = next((p.dtype for p in self.classifier.parameters() if p.is_floating_point()),
                         x.dtype)
        B = x.shape[0]
        y = y.to(x.device).long() if isinstance(y, torch.Tensor) and y.ndim > 0 else \
            torch.full((B,), int(y), dtype=torch.long, device=x.device)
        keep = torch.is_grad_enabled() and x.requires_grad      # sample(grad=True): differentiable
        with torch.enable_grad():
            xin = x if keep else x.detach().requires_grad_(True)
            xg = xin.to(dtype)
            tt = t.to(dtype) if isinstance(t, torch.Tensor) else torch.full((B,), float(t), dtype=dtype,
                                                                              device=x.device)
            logits = self.classifier(xg, tt)
            require(isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[0] == B,
                    f"the classifier must return (batch, K) = ({B}, K) log-probabilities, got "
                    f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
            K = logits.shape[1]
            bad = y[(y < 0) | (y >= K)]
            require(bad.numel() == 0, f"y must lie in 0..{K - 1} (the classifier's classes), got "
                                      f"{bad[0].item() if bad.numel() else None}")
            picked = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, xin, create_graph=keep)
        return grad.to(x.dtype)

    def _view(self, view, x, t, a, s, kwargs):
        y, kwargs = self._labels(kwargs, x, "classifier guidance", from_model=False)
        t, a, s = self._scales(x, t, a, s)
        out = self._inner(view, x, t, a, s, kwargs)
        self.nfe += 1
        self.network_calls += 1
        active = self._active(a, s)
        if active is False or self.scale == 0.0:
            return out
        tt = t if isinstance(t, torch.Tensor) else torch.full((x.shape[0],), float(t), dtype=x.dtype,
                                                              device=x.device)
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        grad = self.log_prob_grad(x, tt, y)
        self.nfe += 1
        self.network_calls += 1
        # score + s grad;  eps = -sigma score;  x0 = (x + sigma^2 score) / alpha
        step = {"score": self.scale, "eps": -self.scale * s, "x0": self.scale * s * s / a}[view]
        if active is not True:
            step = torch.where(active, step, 0.0) if isinstance(step, torch.Tensor) else \
                torch.where(active, torch.full_like(x[:1], step), 0.0)
        return out + step * grad
