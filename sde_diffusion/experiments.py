"""Research workflows on top of the samplers: named oracle problems, solver specs such as
``ddim:eta=1``, and the solver x NFE comparison (ancestral vs non-Markovian, SDE vs ODE) with the
same starting noise for every solver, written as Markdown, CSV and an error-vs-NFE plot."""
from __future__ import annotations

import ast
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._checks import require
from .models.wrapper import ScoreModel
from .oracles import GaussianMixture, random_mixture
from .samplers import get_solver, sample
from .sdes import SDE

__all__ = ["SolverSpec", "parse_solver_spec", "parse_solver_list", "named_oracle", "ORACLES",
           "PAIR_LABELS", "compare_solvers", "SlicedWBootstrap", "COMPARE_METRICS", "ORACLE_METRICS"]

#: the metrics of :func:`compare_solvers`'s rows; the last two need an oracle mixture
COMPARE_METRICS = ("flow_rmse", "sliced_w", "weight_tv", "var_ratio_err")
ORACLE_METRICS = ("weight_tv", "var_ratio_err")


# ---- named oracle problems --------------------------------------------------------------------
def _ring8(sde: Optional[SDE], labels=None) -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 0.7 * torch.stack([angles.cos(), angles.sin()], 1)
    weights = torch.tensor([3.0, 1, 2, 1, 3, 1, 2, 1])
    stds = torch.tensor([0.05, 0.08, 0.05, 0.1, 0.06, 0.08, 0.05, 0.1])
    return GaussianMixture(weights, means, stds, sde, labels=labels)


#: the classes of the labelled oracles' eight components: neighbours in pairs, 4 classes (each
#: class a two-mode sub-mixture with unequal weights in ``ring8c``)
PAIR_LABELS = (0, 0, 1, 1, 2, 2, 3, 3)

ORACLES: Dict[str, Callable[[Optional[SDE]], GaussianMixture]] = {
    "ring8": _ring8,
    "gmm2d": lambda sde: random_mixture(2, 8, seed=0, sde=sde),
    "gmm64": lambda sde: random_mixture(64, 8, seed=0, sde=sde),
    "image16": lambda sde: random_mixture((1, 16, 16), 4, seed=0, sde=sde, diagonal=True),
    # labelled (class-conditional) versions: the same components, classes PAIR_LABELS
    "ring8c": lambda sde: _ring8(sde, labels=PAIR_LABELS),
    "gmm64c": lambda sde: random_mixture(64, 8, seed=0, sde=sde, labels=PAIR_LABELS),
}


def named_oracle(name: str, sde: Optional[SDE] = None) -> GaussianMixture:
    """A built-in oracle mixture: ``ring8`` (2-D ring, unequal weights and widths), ``gmm2d``,
    ``gmm64`` (the sampler benchmark's 64-D, 8-mode mixture) or ``image16`` (1x16x16 images); with
    class labels (for conditional sampling and guidance), ``ring8c`` and ``gmm64c``: ``ring8`` and
    ``gmm64`` with their components paired into 4 classes (:data:`PAIR_LABELS`, class ``k // 2``
    of component ``k``)."""
    require(name in ORACLES, f"unknown oracle {name!r}; valid oracles: {', '.join(ORACLES)}")
    return ORACLES[name](sde)


# ---- solver specs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SolverSpec:
    """A solver with options, written ``name[:key=value[:key=value]]``, e.g. ``ddim:eta=1``."""

    name: str
    options: Dict[str, object] = field(default_factory=dict)

    @property
    def deterministic(self) -> bool:
        """Whether this solver with these options is a deterministic map of ``x_T`` (the
        registry's answer, :meth:`~sde_diffusion.samplers.registry.SolverInfo.is_deterministic`):
        only deterministic configurations are scored against the exact flow map."""
        return get_solver(self.name).is_deterministic(**self.options)

    @property
    def label(self) -> str:
        return ":".join([self.name] + [f"{k}={v}" for k, v in self.options.items()])


def _value(text: str):
    """A spec's value: a Python literal (``0.5``, ``True``), ``true``/``false`` in any case as a
    flag (the command line's spelling), otherwise the text itself (a name)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_solver_spec(spec: str) -> SolverSpec:
    """Parse ``name[:key=value...]``: the name must be registered, each key one of the solver's
    options, and each value of the kind of the option's default (a number for ``eta=0.0``, ``True``
    or ``False`` for a flag, text for a name), so that a typo fails here, not after a model is
    loaded."""
    name, options = parse_spec(spec, get_solver, "solver", f"empty solver name in {spec!r}")
    return SolverSpec(name, options)


def parse_spec(spec: str, lookup: Callable, what: str, empty: str) -> Tuple[str, dict]:
    """``name[:key=value...]`` -> ``(name, options)`` for a registry entry ``lookup(name)`` (a
    solver or an inverse-problem method: anything with ``check_options`` and ``defaults``);
    ``what`` names it in the errors, ``empty`` is the error for an empty name."""
    parts = spec.strip().split(":")
    require(parts[0] != "", empty)
    info = lookup(parts[0])
    options = {}
    for part in parts[1:]:
        require("=" in part, f"{what} option {part!r} in {spec!r} must be written key=value")
        key, value = part.split("=", 1)
        options[key.strip()] = _value(value.strip())
    info.check_options(options)
    defaults = info.defaults()
    for key, value in options.items():
        _check_option_kind(spec, key, value, defaults.get(key), what)
    return parts[0], options


def _check_option_kind(spec: str, key: str, value, default, what: str = "solver") -> None:
    """``value`` is of the kind of ``default``: a flag, a number or text (no check without a
    default)."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "True or False"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a name"
    else:
        return
    require(ok, f"{what} option {key}={value!r} in {spec!r} must be {kind} (default {default!r})")


def parse_solver_list(text: str) -> List[SolverSpec]:
    """Comma-separated solver specs: ``ancestral,ddim:eta=0,ddim:eta=1``."""
    specs = [parse_solver_spec(s) for s in text.split(",") if s.strip()]
    require(len(specs) > 0, "give at least one solver")
    return specs


# ---- the comparison ---------------------------------------------------------------------------
def compare_solvers(model: ScoreModel, solvers: Sequence[SolverSpec], nfes: Sequence[int], n: int,
                    *, reference: Optional[torch.Tensor] = None, oracle: Optional[GaussianMixture] = None,
                    flow_reference: bool = True, grid: Optional[str] = None, seed: int = 0,
                    sample_shape: Optional[Sequence[int]] = None,
                    progress: Optional[Callable[[str], None]] = None,
                    keep_samples: bool = False, reference_rtol: float = 1e-8,
                    flow_samples: int = 256, bootstrap: int = 0,
                    bootstrap_projections: int = 64) -> List[dict]:
    """Run every solver at every NFE budget from the same starting noise, each on ``grid`` (default:
    its own, see :func:`~sde_diffusion.samplers.get_solver`).

    Every run starts from the same ``x_T`` and stochastic solvers use the same seed. Each row holds
    the solver, the NFE actually spent, and the metrics that apply:

    - ``flow_rmse`` (deterministic solvers): RMS distance per coordinate to the exact flow map of
      ``x_T`` (the model's own probability-flow ODE solved in float64 by DOP853 at
      ``rtol = atol = reference_rtol``), i.e. the solver's discretisation error alone, over the
      first ``flow_samples`` samples (the tight-tolerance reference is the costly part);
    - ``sliced_w``: sliced Wasserstein distance to ``reference`` samples (data, or ``p_eps`` of the
      oracle), the distributional error of any solver; with ``bootstrap = B > 0`` also
      ``sliced_w_se``, its bootstrap standard error (see :class:`SlicedWBootstrap`);
    - with an ``oracle``: ``weight_tv`` and ``var_ratio_err`` (largest ``|variance / true - 1|`` over
      modes) from :func:`~sde_diffusion.metrics.mode_statistics`;
    - ``wall_s``: wall time of the sampling call.

    Adaptive solvers (no NFE set in advance) run once, at their own tolerance options.
    """
    from .metrics import mode_statistics, sliced_wasserstein
    from .samplers.reference import exact_flow_map

    require(n >= 2, f"n must be >= 2, got {n!r}")
    require(len(nfes) > 0 and all(int(k) >= 1 for k in nfes), f"nfes must be positive integers, got {list(nfes)}")
    require(isinstance(bootstrap, int) and bootstrap >= 0 and bootstrap != 1,
            f"bootstrap must be 0 (none) or a number of resamples >= 2, got {bootstrap!r}")
    spread = (SlicedWBootstrap(reference, bootstrap, bootstrap_projections, seed=seed)
              if bootstrap and reference is not None else None)
    sde = model.sde
    shape = (n,) + tuple(sample_shape if sample_shape is not None else
                         (oracle.event_shape if oracle is not None else reference.shape[1:]))
    x_T = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flow_target = None
    if flow_reference and any(s.deterministic for s in solvers):
        flow_target = exact_flow_map(model, x_T[:flow_samples], rtol=reference_rtol,
                                     atol=reference_rtol)
    rows = []
    for spec in solvers:
        info = get_solver(spec.name)
        deterministic = spec.deterministic
        for budget in nfes:
            options = dict(spec.options)
            if info.nfe is None:  # adaptive: one run, at its own tolerance
                if budget != nfes[0]:
                    continue
                steps = None
            else:
                try:  # what sample(nfe=budget) does: the solver's own plan (dpm_solver's orders)
                    steps, options = info.for_nfe(int(budget), **spec.options)
                except ValueError as err:  # the budget is below the solver's minimum
                    rows.append({"solver": spec.label, "nfe_budget": int(budget), "skipped": str(err)})
                    continue
            if progress:
                progress(f"{spec.label} @ {'adaptive' if steps is None else budget} NFE")
            start = time.perf_counter()
            result = sample(model, x_T=x_T.clone(), solver=spec.name, steps=steps or 1, grid=grid,
                            generator=torch.Generator().manual_seed(seed + 1), **options)
            wall = time.perf_counter() - start
            x = result.samples
            row = {"solver": spec.label, "kind": "deterministic" if deterministic else "stochastic",
                   "nfe_budget": "adaptive" if steps is None else int(budget), "nfe": result.nfe, "steps": steps, "wall_s": wall}
            if flow_target is not None and deterministic:
                row["flow_rmse"] = float(((x[:flow_samples] - flow_target) ** 2).mean().sqrt())
            if reference is not None:
                row["sliced_w"] = float(sliced_wasserstein(x.flatten(1), reference.flatten(1),
                                                           generator=torch.Generator().manual_seed(seed)))
                if spread is not None:
                    row["sliced_w_se"] = spread.standard_error(x)
            if oracle is not None:
                stats = mode_statistics(x, oracle)
                ratio = stats["variance_ratio"]
                row["weight_tv"] = stats["weight_tv"]
                row["var_ratio_err"] = float((ratio[~ratio.isnan()] - 1).abs().max())
            if keep_samples:
                row["samples"] = x
            rows.append(row)
    return rows


class SlicedWBootstrap:
    """Bootstrap standard error of the sliced Wasserstein distance of sample sets to one
    ``reference`` set (Efron & Tibshirani 1993, ch. 6): ``resamples`` times, draw ``n`` of the
    samples and ``m`` of the reference with replacement and recompute the distance; the standard
    error is the standard deviation of those values. The resampled indices are the same for every
    sample set it is applied to (a paired bootstrap: in :func:`compare_solvers` sample ``i`` of
    every solver starts from the same noise ``x_T[i]``), and the distance is recomputed on
    ``n_projections`` directions (fewer than the point estimate's 256: the spread, not the value,
    is wanted, and sorting is the cost). Measured on two moons (500 points against 500, 40
    resamples): standard errors of 0.013 to 0.021 (mean 0.016) for a distance whose actual spread
    over fresh pairs of sets is 0.014, so the error bars err on the cautious side
    (tests/test_experiments.py).
    """

    def __init__(self, reference: torch.Tensor, resamples: int, n_projections: int = 64,
                 seed: int = 0):
        require(isinstance(resamples, int) and resamples >= 2,
                f"resamples must be an integer >= 2, got {resamples!r}")
        require(isinstance(n_projections, int) and n_projections >= 1,
                f"n_projections must be an integer >= 1, got {n_projections!r}")
        ref = reference.detach().to("cpu", torch.float64).flatten(1)
        D, m = ref.shape[1], ref.shape[0]
        self._gen = torch.Generator().manual_seed(seed + 2)
        if D == 1:
            self.theta = torch.ones(1, 1, dtype=torch.float64)
        else:
            theta = torch.randn(n_projections, D, generator=self._gen, dtype=torch.float64)
            self.theta = theta / theta.norm(dim=1, keepdim=True)
        proj = self.theta @ ref.T
        self._ref = [proj[:, torch.randint(m, (m,), generator=self._gen)].sort(-1).values
                     for _ in range(resamples)]
        self._rows: Dict[int, List[torch.Tensor]] = {}

    def standard_error(self, x: torch.Tensor) -> float:
        """The bootstrap standard error of ``sliced_wasserstein(x, reference)``."""
        from .metrics import wasserstein_1d

        x = x.detach().to("cpu", torch.float64).flatten(1)
        n = x.shape[0]
        if n not in self._rows:  # the same resampled indices for every set of n samples
            self._rows[n] = [torch.randint(n, (n,), generator=self._gen) for _ in self._ref]
        proj = self.theta @ x.T
        if n == self._ref[0].shape[1]:  # equal sizes: W_2^2 pairs the sorted values
            values = [(proj[:, idx].sort(-1).values - ref).pow(2).mean(-1).mean().sqrt()
                      for idx, ref in zip(self._rows[n], self._ref)]
        else:
            values = [wasserstein_1d(proj[:, idx], ref).mean().sqrt()
                      for idx, ref in zip(self._rows[n], self._ref)]
        return float(torch.stack(values).std())
