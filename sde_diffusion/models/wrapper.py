r"""One network, many views: the parameterization wrapper every solver, loss and likelihood calls.

A network ``net(x, t_in)`` trained to predict one of

- ``eps``:   the noise ``z`` of ``x_t = alpha x0 + sigma z`` (DDPM, Ho et al. 2020),
- ``x0``:    the clean data ``E[x0 | x_t]`` (a denoiser, as in EDM, Karras et al. 2022),
- ``v``:     ``alpha z - sigma x0`` (Salimans & Ho 2022, Sec. 4),
- ``score``: ``grad log p_t(x_t)`` (score_sde, Song et al. 2021),

is turned into the others with alpha and sigma of the SDE:

.. math:: \text{score} = -\varepsilon/\sigma,\quad x_0 = (x - \sigma\varepsilon)/\alpha,\quad
          x_0 = \frac{\alpha x - \sigma v}{\alpha^2+\sigma^2},\ \
          \varepsilon = \frac{\sigma x + \alpha v}{\alpha^2+\sigma^2}

(the last two hold for any alpha, sigma; for VP ``alpha^2 + sigma^2 = 1``).
"""
from __future__ import annotations

import copy
from contextvars import ContextVar
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from .._checks import TimeLike, all_finite, expand_to, require
from ..sdes import SDE

__all__ = ["ScoreModel", "OracleModel", "NonFiniteError", "as_model", "deferred_finite_checks",
           "native_view", "linear_in_view", "PARAMETERIZATIONS", "TIME_INPUTS"]

PARAMETERIZATIONS = ("eps", "x0", "v", "score")
TIME_INPUTS = ("t", "sigma", "index")
_VIEWS = ("eps", "x0", "score")


def _is_float(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


class NonFiniteError(FloatingPointError):
    """The model returned NaN or Inf. ``t`` is the time of the call; samplers add the step."""

    def __init__(self, message: str, t: Optional[float] = None, step: Optional[int] = None):
        super().__init__(message)
        self.t, self.step = t, step


#: True inside :func:`deferred_finite_checks`: the models' per-output finiteness check is left to
#: the caller (a sampler's loop, which checks its state).
_DEFERRED: ContextVar[bool] = ContextVar("sde_diffusion_deferred_finite_checks", default=False)


class deferred_finite_checks:
    """Inside this block (in this thread or task) no model checks its outputs for NaN/Inf: the
    caller takes that over. ``sample()`` uses it for the fixed-step solvers unless
    ``check_every=1``: a NaN/Inf output makes the state NaN/Inf at that step, and the loop's state
    flags (read every ``check_every`` steps) name the step, so the per-call reduction and host
    read (a device sync per network call on a GPU) are saved. ``defer=False`` restores the
    checks inside an outer deferred block. A plain class (entered once per solver step: cheaper
    than a generator-based context manager); reusable, not re-entrant."""

    __slots__ = ("defer", "_token")

    def __init__(self, defer: bool = True):
        self.defer = bool(defer)
        self._token = None

    def __enter__(self) -> "deferred_finite_checks":
        self._token = _DEFERRED.set(self.defer)
        return self

    def __exit__(self, *exc) -> None:
        _DEFERRED.reset(self._token)


def _check_output(out: torch.Tensor, t: torch.Tensor, who: str) -> None:
    """Raise :class:`NonFiniteError` naming the time of the first sample whose output is NaN/Inf
    (one reduction and one host read when all is finite)."""
    if not all_finite(out):
        bad_t = float(t[~torch.isfinite(out).reshape(out.shape[0], -1).all(1)][0])
        raise NonFiniteError(f"the {who} returned NaN/Inf at t={bad_t:.6g}", t=bad_t)


def native_view(model: "ScoreModel") -> str:
    """The view (``eps``, ``x0`` or ``score``) that ``model`` gives without converting its output:
    its parameterization, or ``eps`` for a ``v`` model (the oracle: ``score``). A solver whose
    update is linear in the model output asks for this view and folds the conversion into its
    per-step coefficients (:func:`linear_in_view`). A subclass that overrides some views but not
    that one (guidance written as an ``eps`` method) is asked for the first view it overrides."""
    p = model.parameterization
    view = p if p in _VIEWS else "eps"
    cls = type(model)
    own = [v for v in _VIEWS if getattr(cls, v) is not getattr(ScoreModel, v)]
    return view if not own or view in own else own[0]


def linear_in_view(want: str, view: str, alpha: float, sigma: float) -> Tuple[float, float]:
    r"""``(p, q)`` with ``want(x) = p x + q view(x)`` at a time with scales ``alpha``, ``sigma``,
    from ``x = alpha x0 + sigma eps`` and ``score = -eps/sigma``: e.g. ``eps = (x - alpha x0)/sigma``
    gives ``(1/sigma, -alpha/sigma)`` for ``want="eps", view="x0"``. Python floats (float64)."""
    a, s = alpha, sigma
    require(want in _VIEWS and view in _VIEWS,
            f"want and view must be eps, x0 or score, got {want!r}, {view!r}")
    if want == view:
        return 0.0, 1.0
    if want == "eps":
        return (1 / s, -a / s) if view == "x0" else (0.0, -s)
    if want == "x0":
        return (1 / a, -s / a) if view == "eps" else (1 / a, s * s / a)
    return (0.0, -1 / s) if view == "eps" else (-1 / (s * s), a / (s * s))


class ScoreModel:
    """Wrap ``net(x, t_in, **kwargs)`` trained with ``parameterization`` for the SDE ``sde``.

    Args:
        net: a callable (usually a ``torch.nn.Module``) mapping ``(x, t_in)`` to a tensor shaped
            like ``x``; a plain score function ``s(x, t)`` works with ``parameterization="score"``.
        sde: the forward SDE the network was trained under.
        parameterization: one of ``eps``, ``x0``, ``v``, ``score``.
        time_input: what the network receives as its second argument: ``t`` (continuous time,
            default), ``sigma`` (``sigma(t)``, NCSN-style) or ``index`` (``t (N - 1) / T``, the
            DDPM label score_sde feeds its networks); or a callable ``t -> t_in``.
        check_finite: raise :class:`NonFiniteError` when the network returns NaN/Inf. The check
            reduces the output to one sum and reads it back: on a GPU that is one device sync
            per call; pass ``False`` where that matters (the training loop does). Inside
            ``sample()`` with a fixed-step solver it is skipped unless ``check_every=1``: the
            sampler's own check of the state names the step instead
            (:func:`deferred_finite_checks`).

    ``nfe`` counts network evaluations: one per call of ``net``, whatever the batch size. A
    method that evaluates the network several times per view (classifier-free guidance: with and
    without the label) does so through :meth:`raw` (or a view) once per evaluation, and each
    counts; a ``net`` callable that runs a network twice inside one call is counted once, since
    the wrapper cannot see inside it.

    Conditioning: :meth:`bind` returns a model that passes keyword arguments (class labels, a
    guidance scale, a mask, ...) to ``net`` on every call, so every solver samples a conditional
    model unchanged: ``sample(model.bind(y=labels), ...)``.

    Dtypes: every view returns ``x``'s dtype (samplers keep the dtype of ``x_T``). When ``net`` is
    a ``torch.nn.Module`` with floating-point parameters, its inputs -- ``x`` and the time input --
    are cast to the dtype of its first floating-point parameter and its output back to ``x``'s
    dtype; the network itself is never converted. So a float32 checkpoint samples a float64
    ``x_T`` (the network runs in float32, its output is float32-accurate) and the conversion
    between parameterizations (``x0 = (x - sigma eps)/alpha``, ...) runs in ``x``'s dtype. Other
    callables receive ``x`` and the time as they are (in ``x``'s dtype); a floating-point output
    of another dtype is cast to ``x``'s.

    Times: a number or CPU tensor ``t`` is checked to lie in ``[0, T]`` on every call (a
    ``ValueError`` naming the value). A ``t`` already on a GPU is not range-checked here, since
    reading the verdict back would sync the device on every network call; the samplers check
    their grids on the CPU and the losses draw t inside ``[eps, T]``. ``sde.alpha(t)`` and the
    other SDE views still check GPU times.
    """

    def __init__(self, net: Callable, sde: SDE, parameterization: str = "eps",
                 time_input: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "t",
                 check_finite: bool = True):
        require(callable(net), f"net must be callable, got {type(net).__name__}")
        require(isinstance(sde, SDE), f"sde must be an SDE instance, got {sde!r}")
        require(parameterization in PARAMETERIZATIONS,
                f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        require(callable(time_input) or time_input in TIME_INPUTS,
                f"time_input must be one of {TIME_INPUTS} or a callable, got {time_input!r}")
        self.net, self.sde, self.parameterization = net, sde, parameterization
        self.time_input, self.check_finite = time_input, check_finite
        self.nfe = 0
        self.bound: Dict[str, Any] = {}

    def bind(self, **kwargs) -> "ScoreModel":
        """This model with ``kwargs`` passed to the network on every call (on top of the
        arguments already bound; a call's own keyword arguments win): ``model.bind(y=labels)``
        for a class-conditional network such as :class:`~sde_diffusion.models.TimeMLP` with
        ``num_classes``. A per-sample argument (labels of shape ``(batch,)``) must match the batch
        the network is called on: every fixed-step solver calls it on the whole batch, while the
        adaptive ``ode``/``ode_scipy`` with ``per_sample=True`` call it on the samples still
        running (bind one model per sample there). Floating-point tensors are cast to the
        network's dtype like ``x``. The bound model shares the network and counts its own NFE
        (from 0)."""
        bound = copy.copy(self)
        bound.bound = {**self.bound, **kwargs}
        bound.nfe = 0
        return bound

    def reset_nfe(self) -> None:
        self.nfe = 0

    # ---- raw network call ---------------------------------------------------------------------
    def _net_time(self, t: torch.Tensor, log_sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network's time input at the checked time ``t`` (``log_sigma``: ``log sigma(t)``
        when the caller has it)."""
        if callable(self.time_input):
            return self.time_input(t)
        if self.time_input == "sigma":
            return (self.sde.log_sigma(t, sync=False) if log_sigma is None else log_sigma).exp()
        if self.time_input == "index":
            return t * (self.sde.N - 1) / self.sde.T
        return t

    def net_dtype(self) -> Optional[torch.dtype]:
        """The dtype the network computes in: that of the first floating-point parameter of a
        ``torch.nn.Module`` (read on every call, so ``net.double()`` after wrapping is seen), else
        ``None`` (inputs are passed in ``x``'s dtype)."""
        if isinstance(self.net, torch.nn.Module):
            for p in self.net.parameters():
                if p.is_floating_point():
                    return p.dtype
        return None

    def raw(self, x: torch.Tensor, t: TimeLike, **kwargs) -> torch.Tensor:
        """The network's own output at ``(x, t)`` in ``x``'s dtype (the network's inputs cast to
        its parameters' dtype, see the class docstring), with the bound arguments and
        ``kwargs``; counts one NFE. No device sync on a GPU for a GPU ``t`` unless
        ``check_finite`` (see the class docstring)."""
        if self.time_input == "sigma":          # sigma(t) from the same single check of t
            t, _, log_sigma = self.sde.log_scales(t, x, sync=False)
            return self._call(x, t, kwargs, log_sigma)
        return self._call(x, self.sde.time(t, x, sync=False), kwargs)

    def _call(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict,
              log_sigma: Optional[torch.Tensor] = None,
              t_in: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`raw` at a time ``t`` already checked and made like ``x`` (``t_in``: the
        network's time input when the caller has it)."""
        if t_in is None:
            t_in = self._net_time(t, log_sigma)
        if self.bound:
            kwargs = {**self.bound, **kwargs}
        dtype = self.net_dtype()
        if dtype is not None and dtype != x.dtype:
            kwargs = {k: v.to(dtype) if _is_float(v) else v for k, v in kwargs.items()}
            out = self.net(x.to(dtype), t_in.to(dtype) if _is_float(t_in) else t_in, **kwargs)
        else:
            out = self.net(x, t_in, **kwargs)
        self.nfe += 1
        require(isinstance(out, torch.Tensor) and out.shape == x.shape,
                f"the network must return a tensor shaped like x {tuple(x.shape)}, "
                f"got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        if out.dtype != x.dtype and out.is_floating_point():
            out = out.to(x.dtype)
        if self.check_finite and not _DEFERRED.get():
            _check_output(out, t, "model")
        return out

    def _output(self, x: torch.Tensor, t: TimeLike, kwargs: dict, view: str):
        """The network's output through :meth:`raw` (the one place a subclass changes how the
        network is evaluated) and, when the view converts it, ``alpha`` and ``sigma`` shaped to
        broadcast over ``x``."""
        out = self.raw(x, t, **kwargs)
        if self.parameterization == view:
            return out, None, None
        _, log_a, log_s = self.sde.log_scales(t, x, sync=False)
        return out, expand_to(log_a.exp(), x), expand_to(log_s.exp(), x)

    def at_scales(self, view: str, x: torch.Tensor, t: torch.Tensor, alpha: float, sigma: float,
                  **kwargs) -> torch.Tensor:
        """The view ``view`` (``eps``, ``x0`` or ``score``) at a time whose scales the caller
        already holds: ``t`` a ``(batch,)`` tensor like ``x`` inside ``[0, T]`` (not checked
        again), ``alpha = alpha(t)`` and ``sigma = sigma(t)`` numbers (a sampler's grid, checked
        once per run). A call costs the network and the conversion's couple of multiply-adds:
        no time check and no recomputation of the scales. The same formulas as :meth:`eps`,
        :meth:`x0`, :meth:`score` with numbers for the scales: float64 results are bit-identical,
        float32 ones move at round-off (the scales are rounded once from float64 instead of
        computed in float32). A subclass that overrides the view itself, :meth:`raw` or
        :meth:`_output` (guidance combining several network outputs) is called through its view."""
        require(view in ("eps", "x0", "score"), f"view must be eps, x0 or score, got {view!r}")
        cls = type(self)
        fn = getattr(cls, view)
        if (fn is not getattr(ScoreModel, view) or cls.raw is not ScoreModel.raw
                or cls._output is not ScoreModel._output):
            return fn(self, x, t, **kwargs)          # a subclass's own view or network call
        t_in = None
        if self.time_input == "sigma":
            t_in = torch.full_like(t, sigma)
        out = self._call(x, t, kwargs, t_in=t_in)
        p, a, s = self.parameterization, alpha, sigma
        if p == view:
            return out
        if view == "eps":
            if p == "x0":
                return (x - a * out) / s
            if p == "v":
                return (s * x + a * out) / (a * a + s * s)
            return -s * out
        if view == "x0":
            if p == "eps":
                return (x - s * out) / a
            if p == "v":
                return (a * x - s * out) / (a * a + s * s)
            return (x + s * s * out) / a
        if p == "eps":
            return -out / s
        if p == "x0":
            return -(x - a * out) / (s * s)
        return -(s * x + a * out) / ((a * a + s * s) * s)

    # ---- the three views ----------------------------------------------------------------------
    def eps(self, x: torch.Tensor, t: TimeLike, **kwargs) -> torch.Tensor:
        """Noise prediction ``E[z | x_t]``."""
        (out, a, s), p = self._output(x, t, kwargs, "eps"), self.parameterization
        if p == "eps":
            return out
        if p == "x0":
            return (x - a * out) / s
        if p == "v":
            return (s * x + a * out) / (a * a + s * s)
        return -s * out

    def x0(self, x: torch.Tensor, t: TimeLike, **kwargs) -> torch.Tensor:
        """Data prediction (denoiser) ``E[x0 | x_t]``."""
        (out, a, s), p = self._output(x, t, kwargs, "x0"), self.parameterization
        if p == "x0":
            return out
        if p == "eps":
            return (x - s * out) / a
        if p == "v":
            return (a * x - s * out) / (a * a + s * s)
        return (x + s * s * out) / a

    def score(self, x: torch.Tensor, t: TimeLike, **kwargs) -> torch.Tensor:
        """Score ``grad_x log p_t(x)``."""
        (out, a, s), p = self._output(x, t, kwargs, "score"), self.parameterization
        if p == "score":
            return out
        if p == "eps":
            return -out / s
        if p == "x0":
            return -(x - a * out) / (s * s)
        return -(s * x + a * out) / ((a * a + s * s) * s)


class OracleModel(ScoreModel):
    """The exact model of a :class:`~sde_diffusion.oracles.GaussianMixture`: each view is the
    oracle's closed form (no conversion error), with the same NFE counting and checks."""

    def __init__(self, mixture, sde: Optional[SDE] = None, check_finite: bool = True):
        sde = sde if sde is not None else mixture.sde
        require(sde is not None, "OracleModel needs an SDE: pass sde=... or a mixture that has one")
        self.mixture = mixture.with_sde(sde) if mixture.sde is not sde else mixture
        super().__init__(self.mixture.score, sde, parameterization="score", check_finite=check_finite)

    def bind(self, **kwargs) -> "ScoreModel":
        """An oracle is an exact function of ``(x, t)``; a labelled mixture's also takes the class
        ``y`` (one, or one per sample; the null label or ``None``: unconditional) and gives the
        exact class-conditional views (:meth:`GaussianMixture.check_model_kwargs`)."""
        self.mixture.check_model_kwargs(kwargs)
        return super().bind(**kwargs)

    def _exact(self, fn, x, t, kwargs, checked: bool = False):
        if self.bound or kwargs:
            kwargs = {**self.bound, **kwargs}
            self.mixture.check_model_kwargs(kwargs)
        if not checked:
            t = self.sde.time(t, x, sync=False)
        out = fn(x, t, **kwargs)
        self.nfe += 1
        if self.check_finite and not _DEFERRED.get():
            _check_output(out, t, "oracle")
        return out

    def at_scales(self, view, x, t, alpha, sigma, **kwargs):
        """The oracle's closed form at an already checked ``(batch,)`` time ``t`` (the scales
        are the oracle's own business)."""
        require(view in ("eps", "x0", "score"), f"view must be eps, x0 or score, got {view!r}")
        return self._exact(getattr(self.mixture, view), x, t, kwargs, checked=True)

    def eps(self, x, t, **kwargs):
        return self._exact(self.mixture.eps, x, t, kwargs)

    def x0(self, x, t, **kwargs):
        return self._exact(self.mixture.x0, x, t, kwargs)

    def score(self, x, t, **kwargs):
        return self._exact(self.mixture.score, x, t, kwargs)


def as_model(model, sde: Optional[SDE] = None) -> ScoreModel:
    """Accept a :class:`ScoreModel` (or :class:`OracleModel`) or an oracle
    :class:`~sde_diffusion.oracles.GaussianMixture` (wrapped in an ``OracleModel`` under ``sde``, or
    its own SDE), and check that ``sde``, when given, is the model's."""
    from ..oracles import GaussianMixture

    if isinstance(model, GaussianMixture):
        sde = sde if sde is not None else model.sde
        require(sde is not None, "a GaussianMixture model needs an SDE: pass sde=...")
        return OracleModel(model, sde)
    require(isinstance(model, ScoreModel),
            f"model must be a ScoreModel, an OracleModel or a GaussianMixture, got {type(model).__name__}")
    if sde is not None:
        require(isinstance(sde, SDE), f"sde must be an SDE instance or None, got {sde!r}")
        require(sde is model.sde or repr(sde) == repr(model.sde),
                f"sde {sde!r} does not match the model's SDE {model.sde!r}")
    return model
