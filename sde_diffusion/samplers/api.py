"""The one entry point: ``sample(model, sde, shape | x_T, solver=..., steps=...)``, and the
automatic choice of solver, order and grid for a budget (``sample(model, nfe=N)``,
:func:`auto_config`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._checks import require
from ..models.wrapper import ScoreModel, as_model
from ..oracles import GaussianMixture
from ..sdes import SDE, VPSDE
from .base import (CHECK_EVERY, Correction, GeneratorLike, NoiseSource, SampleResult, SolverContext,
                   run_solver)
from .grids import FOCUS_SHARE, FOCUS_WIDTH, GRIDS, check_steps, make_grid
from .registry import SOLVERS, get_solver

__all__ = ["sample", "start_state", "custom_grid", "auto_config", "data_scale", "ConfiguredResult",
           "AUTO", "DEFAULT_SOLVER"]

GridLike = Union[torch.Tensor, np.ndarray, Sequence[float]]

#: the solver of ``sample(model, ...)`` when neither ``solver`` nor ``nfe`` is given (score_sde's)
DEFAULT_SOLVER = "euler_maruyama"
#: the name that asks for the automatic choice (:func:`auto_config`)
AUTO = "auto"
#: the budgets (inclusive) where the automatic choice takes iPNDM for an exact score; UniPC below
#: and above (and for a learned network up to the upper end)
AUTO_IPNDM_NFE = (4, 15)
#: the budget from which the automatic choice takes iPNDM's order 4 instead of 3
AUTO_IPNDM_ORDER4_FROM_NFE = 8
#: UniPC's predictor order in the automatic choice for a learned network above
#: :data:`AUTO_NETWORK_IPNDM_MAX_NFE` (up to 15 NFE)
AUTO_NETWORK_ORDER = 2
#: the largest budget at which the automatic choice for a learned network takes iPNDM of order 3
#: (from 4 NFE, with the analytical first step where the SDE allows it)
AUTO_NETWORK_IPNDM_MAX_NFE = 10
#: the budgets (inclusive) where the automatic choice for an exact score under the linear VP SDE
#: (score_sde's, :class:`~sde_diffusion.sdes.VPSDE` with ``schedule="linear"``) takes the
#: ``quadratic`` grid instead of ``focus``
AUTO_VP_QUADRATIC_NFE = (5, 15)
#: the ``focus`` grid's shape (width, uniform share) in the automatic choice for an exact score
#: where it differs from the default (:data:`~.grids.FOCUS_WIDTH`, :data:`~.grids.FOCUS_SHARE`):
#: a smaller uniform share at 4-5 NFE, a narrower bump from 13 NFE (benchmarks/results/low_nfe_grids.md)
AUTO_EXACT_FOCUS_SHAPE = {**{n: (FOCUS_WIDTH, 0.2) for n in (4, 5)},
                          **{n: (1.5, FOCUS_SHARE) for n in range(13, 16)}}
#: the ``focus`` grid's ``sigma_data`` when the data's scale is not known (EDM's, images in [-1, 1])
DEFAULT_SIGMA_DATA = 0.5
#: the largest budget at which the automatic choice starts with the analytical first step (both
#: kinds of model; where the SDE allows it)
AUTO_AFS_MAX_NFE = 10
#: the largest ``alpha / sigma`` at the grid's first time that ``analytic_first_step`` accepts
ANALYTIC_MAX_SNR = 0.1


@dataclass
class ConfiguredResult(SampleResult):
    """A :class:`SampleResult` that also records the configuration that ran (``config``): the
    solver, its options (with a budget's plan filled in), the grid (name and its parameter, or
    ``"custom"``), the steps and, for the automatic choice, ``auto=True``, the model's ``kind``
    (``"exact"`` or ``"network"``) and the ``rule`` applied.
    ``sample(model, **result.config["call"])`` reproduces the run from the same noise."""

    config: Dict[str, object] = field(default_factory=dict)


def data_scale(model: Union[ScoreModel, GaussianMixture]) -> Optional[float]:
    """The data's RMS per-coordinate standard deviation (EDM's ``sigma_data``) where the model
    knows it -- an oracle mixture (or its :class:`~sde_diffusion.models.OracleModel`): by the law
    of total variance, ``sqrt(mean_d(sum_k w_k (s_kd^2 + m_kd^2) - (sum_k w_k m_kd)^2))`` -- else
    ``None`` (a trained network does not say)."""
    mixture = model if isinstance(model, GaussianMixture) else getattr(model, "mixture", None)
    if not isinstance(mixture, GaussianMixture):
        return None
    w = mixture.weights
    m = mixture.means.reshape(len(w), -1)
    if mixture.covariances is not None:
        within = torch.einsum("k,kdd->d", w, mixture.covariances)
    else:
        within = w @ mixture.stds.reshape(len(w), -1) ** 2
    var = within + w @ (m * m) - (w @ m) ** 2
    return float(var.clamp(min=0).mean().sqrt())


def auto_config(model: Union[ScoreModel, GaussianMixture, None], nfe: int,
                sigma_data: Optional[float] = None, sde: Optional[SDE] = None) -> Dict[str, object]:
    r"""The configuration ``sample(model, nfe=nfe)`` uses when no solver is named: a dict with
    ``solver``, ``options``, ``grid``, ``sigma_data``, ``focus_width``, ``focus_share``, ``nfe``,
    ``kind`` (``"exact"`` or ``"network"``) and ``rule`` (a sentence). Two rules
    (docs/samplers.md, "The default for a budget"), one NFE per step throughout, on the ``focus``
    grid (steps concentrated around the noise level ``sigma_data``, :func:`~.grids.focus_grid`)
    except for an exact score under the linear VP SDE at 5-15 NFE:

    - **an exact score** (an oracle mixture, or its :class:`~sde_diffusion.models.OracleModel`),
      from the sweep of ``benchmarks/low_nfe.py --rule`` over twelve mixtures under VP, sub-VP and
      VE at NFE 2-15 (not the benchmark's own mixture, on which it is then checked): at 4-15 NFE
      (:data:`AUTO_IPNDM_NFE`) ``ipndm`` (iPNDM, Zhang & Chen 2023, App.: equal-step
      Adams-Bashforth on ``eps`` in EDM's variables), order 3 below 8 NFE and 4 from there; it had
      the lowest error relative to the best configuration of each mixture at every budget from 4
      to 15 (geometric mean 1.01-1.34 over the mixtures, UniPC's best 1.18-1.56). Its grid, from
      ``benchmarks/low_nfe.py --grids`` (iPNDM on eight candidate grid shapes and orders, 8192
      states on each of 48 mixtures in seven families; benchmarks/results/low_nfe_grids.md):
      under the linear VP SDE (:func:`linear_vp`) at 5-15 NFE (:data:`AUTO_VP_QUADRATIC_NFE`)
      the ``quadratic`` grid, within 1.00-1.15 of the best candidate on 16 VP mixtures (the focus
      grid 1.13-1.51) but 1.04-1.47 of the best on sub-VP and 1.7-6.3 on VE and cosine VP
      (where it is dense at the wrong noise levels); elsewhere the focus
      grid, with uniform share 0.2 at 4-5 NFE and width 1.5 from 13
      (:data:`AUTO_EXACT_FOCUS_SHAPE`). Per family and budget the rule is within 1.00-1.27 of
      the best candidate (geometric mean), the focus grid's default shape 1.00-1.55;
    - **a learned network** (any other model, or ``None``), from ``benchmarks/low_nfe_trained.py``
      on trained digits U-Nets (VP, VE) and two-moons MLPs (VP, VE, sub-VP), every configuration
      also with the analytical first step: at 4-10 NFE (:data:`AUTO_NETWORK_IPNDM_MAX_NFE`)
      ``ipndm`` of order 3 with the first step, first of 56 configurations at every one of these
      budgets (geometric mean 1.04-1.32 of each network's best, worst 1.42-1.86; UniPC of order 2
      with it 1.28-1.98, worst 2.3-5.8, on the sub-VP MLP); at 11-15 NFE ``unipc`` of order 2 with
      lower-order final steps (:data:`AUTO_NETWORK_ORDER`; 1.58 and 1.45 at 12 and 15, the best
      at 15). The high-order Adams-Bashforth weights that win on exact scores amplify a network's
      own error: iPNDM of order 4, the exact rule's choice from 8 NFE, ranks below order 3 at
      every budget from 4 to 10 (geometric mean 1.4-1.8 with the first step). Its grid is the
      focus grid's default shape on every SDE: with 1024 states per network
      (``low_nfe_trained.py --grids``) it had the lowest geometric mean of six candidate grids at
      10-15 NFE and was within 1.12 of the lowest at 4-8; the exact rule's shapes did not carry
      over (benchmarks/results/low_nfe_trained_grids.md);
    - otherwise (either kind) ``unipc`` (UniPC's predictor-corrector in log-SNR, Zhao et al. 2023)
      with ``lower_order_final=True``, predictor order 2 below 4 NFE and 3 from 16 (iPNDM's
      first-order start and equal-step weights stall it near 1e-2 on VP at 20-100 NFE, where
      UniPC converges).

    Up to :data:`AUTO_AFS_MAX_NFE` (10) NFE both rules start with the analytical first step
    (``analytic_first_step``, one evaluation saved) where the model's SDE starts at
    ``alpha/sigma <= 0.1``: on 18 mixtures it lowered iPNDM's error on 18 of 18 at 3-4 NFE
    (geometric mean 0.73-0.74) and on average up to 10 (0.88-0.93), not at 12 (1.15); on four
    trained networks, paired with the network rule's configuration without it, see
    ``benchmarks/results/low_nfe_trained_afs.md``.

    ``sigma_data``: the given value, else the data's scale where the model knows it (an oracle,
    :func:`data_scale`), else 0.5. ``sde``: the SDE ``sample`` runs (``sample(mixture, sde, ...)``),
    else the model's own; without one the analytical first step is not chosen. Where ``ipndm`` is
    not registered, UniPC (order 2 below 10 NFE, 3 from there) takes its place in either rule."""
    require(isinstance(nfe, int) and not isinstance(nfe, bool) and nfe >= 1,
            f"nfe must be an integer >= 1, got {nfe!r}")
    known = data_scale(model) if model is not None else None
    kind = "exact" if known is not None else "network"
    if sigma_data is None:
        sigma_data, source = (known, "the data's scale (oracle)") if known is not None else \
            (DEFAULT_SIGMA_DATA, "the default 0.5 (the data's scale is not known)")
    else:
        source = "given"
    require(sigma_data > 0 and math.isfinite(sigma_data), f"sigma_data must be > 0, got {sigma_data!r}")
    lo, hi = AUTO_IPNDM_NFE
    top = AUTO_NETWORK_IPNDM_MAX_NFE
    if kind == "network" and top < nfe <= hi:
        solver = "unipc"
        options: Dict[str, object] = {"order": AUTO_NETWORK_ORDER, "lower_order_final": True}
        why = (f"a learned network: unipc with predictor order {AUTO_NETWORK_ORDER}, lower order at "
               f"the final steps ({top + 1}-{hi} NFE)")
    elif lo <= nfe <= hi and "ipndm" in SOLVERS:
        solver = "ipndm"
        if kind == "exact":
            options = {"order": 4 if nfe >= AUTO_IPNDM_ORDER4_FROM_NFE else 3}
            why = (f"an exact score: ipndm of order {options['order']} ({lo}-{hi} NFE; order 4 "
                   f"from {AUTO_IPNDM_ORDER4_FROM_NFE})")
        else:
            options = {"order": 3}
            why = f"a learned network: ipndm of order 3 ({lo}-{top} NFE)"
    else:
        solver = "unipc"
        order = 2 if nfe < (lo if "ipndm" in SOLVERS else 10) else 3
        options = {"order": order, "lower_order_final": True}
        why = f"unipc with predictor order {order}, lower order at the final steps"
    if sde is None and model is not None:
        sde = model.sde          # a ScoreModel's or an oracle's own (None for an oracle built without)
    grid = "focus"
    q_lo, q_hi = AUTO_VP_QUADRATIC_NFE
    if kind == "exact" and solver == "ipndm" and q_lo <= nfe <= q_hi and linear_vp(sde):
        grid = "quadratic"
        why += f" on the quadratic grid (the linear VP SDE, {q_lo}-{q_hi} NFE)"
    width, share = FOCUS_WIDTH, FOCUS_SHARE
    if kind == "exact" and solver == "ipndm" and grid == "focus":
        width, share = AUTO_EXACT_FOCUS_SHAPE.get(nfe, (width, share))
    afs = nfe <= AUTO_AFS_MAX_NFE and sde is not None and start_snr(sde, sde.T) <= ANALYTIC_MAX_SNR
    if afs:
        why += ", the analytical first step (one evaluation saved)"
    where = ""
    if grid == "focus":
        shape = "" if (width, share) == (FOCUS_WIDTH, FOCUS_SHARE) else \
            f", width {width:g} and uniform share {share:g}"
        where = f", on the focus grid with sigma_data={sigma_data:.4g} ({source}){shape}"
    rule = f"nfe={nfe}: {why}{where}"
    return {"solver": solver, "options": options, "grid": grid, "sigma_data": float(sigma_data),
            "focus_width": width, "focus_share": share,
            "nfe": nfe, "kind": kind, "rule": rule, "analytic_first_step": afs}

def sample(model: Union[ScoreModel, GaussianMixture], sde: Optional[SDE] = None,
           shape: Optional[Sequence[int]] = None, x_T: Optional[torch.Tensor] = None,
           solver: Optional[str] = None, steps: Optional[int] = None, *,
           nfe: Optional[int] = None, grid: Union[str, GridLike, None] = None,
           t_start: Optional[float] = None, t_end: Optional[float] = None, rho: float = 7.0,
           sigma_data: Optional[float] = None, focus_width: Optional[float] = None,
           focus_share: Optional[float] = None,
           generator: GeneratorLike = None, index_offset: int = 0, denoise: bool = False,
           dtype: torch.dtype = torch.float32, device: Union[str, torch.device, None] = None,
           progress: Optional[bool] = None, return_trajectory: bool = False,
           callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
           correct: Optional[Correction] = None, grad: bool = False,
           check_every: int = CHECK_EVERY, analytic_first_step: Optional[bool] = None,
           **options) -> ConfiguredResult:
    """Draw samples by integrating the reverse process from ``t_start`` (T) down to ``t_end`` (eps).

    Args:
        model: a :class:`~sde_diffusion.models.ScoreModel` (any parameterization) or an oracle
            :class:`~sde_diffusion.oracles.GaussianMixture`.
        sde: the forward SDE; defaults to the model's.
        shape: ``(batch, ...)`` of the samples, when ``x_T`` is not given (then drawn from the prior).
        x_T: the starting state; its dtype and device are used throughout.
        solver: a registered solver name (see :func:`~sde_diffusion.samplers.available_solvers`),
            or ``"auto"``: the best configuration for the budget (:func:`auto_config`: iPNDM or
            UniPC, the order, lower-order final steps, the ``focus`` grid). Not given: ``"auto"`` when
            ``nfe`` is given, else ``"euler_maruyama"`` (score_sde's sampler; ``steps=`` calls keep
            it). With ``"auto"`` a given ``grid``, ``sigma_data`` or option replaces the rule's,
            and ``steps`` stands for ``nfe`` (one NFE per step). ``result.config`` says what ran.
        steps: number of grid intervals (default ``sde.N``; for an adaptive solver 1, the single
            interval ``[t_end, t_start]``: more intervals make it stop and report at every grid
            time); at most :data:`~sde_diffusion.samplers.grids.MAX_STEPS` (100000: more is
            refused up front as a mistake). Or give ``nfe``, a budget of network evaluations: the
            largest grid within it is used (with the solver's options, e.g. PC's corrector
            steps), or the solver's own plan for spending exactly ``nfe`` where it has one
            (``dpm_solver``: DPM-Solver-fast's orders per step).
        grid: ``uniform``, ``logsnr``, ``karras``, ``quadratic``, ``focus``, or a custom grid: a
            strictly decreasing tensor, NumPy array, list or tuple of times in ``(0, T]``, which
            sets the steps (a ``steps`` or ``nfe`` asking for another number of steps, or
            ``t_start``/``t_end``, is an error); default: the solver's own
            (``get_solver(name).grid``, its paper's choice).
        rho, sigma_data, focus_width, focus_share: shape of the ``karras`` and ``focus`` grids
            (:func:`~sde_diffusion.samplers.grids.focus_grid`'s ``sigma_data``, ``width`` and
            ``uniform_share``: default 0.5, 2 and 0.4; with ``"auto"`` the rule's, and the data's
            scale where the model knows it).
        generator: an int seed (default ``None``: torch's global generator), a
            ``torch.Generator``, or one generator per sample. With an int seed the noise of a
            sample -- in ``x_T`` and at every stochastic step -- depends only on the seed and the
            sample's index, not on the batch size: ``shape=(16, ...)`` starts with the samples of
            ``shape=(8, ...)``. A ``torch.Generator`` draws batch-level noise (a little faster,
            batch-size dependent). See :class:`~sde_diffusion.samplers.NoiseSource`.
        index_offset: with an int seed, the index of this batch's first sample in the whole
            seeded run: processes drawing ``shape=(n, ...)`` with offsets ``0, n, 2n, ...``
            together give the samples of one batch of the whole size.
        denoise: finish with one Tweedie step ``x <- E[x0 | x_eps]`` (score_sde's noise removal).
        progress: show a tqdm bar (default: only when stderr is a terminal).
        return_trajectory: keep the state after every step in ``result.trajectory``.
        callback: ``callback(step, t, x)`` after every step (after ``correct``).
        correct: ``correct(step, t, x) -> x``, applied after every step (grid interval for an
            adaptive solver), the last one included: the solver continues from the state it
            returns (a tensor of ``x``'s shape, dtype and device), and ``trajectory``,
            ``callback`` and the result see it. ``step`` counts from 1, ``t`` is the time the
            step reached. Constraints and guidance between steps (inpainting's known pixels,
            projections, DPM-Solver's ``correcting_xt_fn``) go here, without editing a solver.
            Multistep solvers keep their history of model outputs and continue from the
            corrected state (docs/samplers.md, "Corrections between steps").
        grad: build the autograd graph through the model and the solver (``torch.enable_grad``),
            for methods that differentiate the samples with respect to the network's parameters
            or ``x_T`` (memory then grows with the number of steps). Default ``False``: the solver
            runs under ``torch.no_grad()``, so no graph is kept whatever the network's
            ``requires_grad``, and the samples are ordinary tensors (not inference tensors:
            ``torch.inference_mode`` would forbid feeding them into a loss later). A
            ``correct`` that needs a gradient with respect to the state (DPS, classifier
            guidance) computes it locally under ``torch.enable_grad()``.
        check_every: how often the state's finiteness is read back (one GPU sync each): every
            step adds a cheap device flag, the flags are read every ``check_every`` steps (default
            16) and at the end, and a NaN/Inf raises :class:`NonFiniteError` naming the first step
            where it appeared and its time. ``1`` is strict: the error comes at that step, before
            ``correct``, ``callback`` or the trajectory see the state.
        analytic_first_step: replace the model at the grid's first time by the prior's views
            (``x0 = 0``, ``eps = x / sigma(t_start)``; Zhou et al. 2024's analytical first step,
            see :class:`~sde_diffusion.samplers.SolverContext`): one network evaluation fewer
            for the same grid, so a budget ``nfe`` buys the grid of ``nfe + 1`` evaluations. Exact
            as ``alpha/sigma -> 0`` at ``t_start`` for data of mean about zero; refused where
            ``alpha/sigma > 0.1`` there (an SDEdit-like late start, or a VE SDE whose ``sigma_max``
            is below ten times the data's scale) and for adaptive solvers. Default: the
            ``auto`` rule's choice (:func:`auto_config`), else ``False``.
        **options: passed to the solver (e.g. ``eta`` for DDIM, ``order`` for DPM-Solver).
    """
    require(steps is None or nfe is None, "give steps or nfe, not both")
    require(solver is None or isinstance(solver, str), f"solver must be a name, got {solver!r}")
    if solver is None:
        solver = AUTO if nfe is not None else DEFAULT_SOLVER
    auto, rule_afs = None, False
    if solver == AUTO:
        times = None if grid is None or isinstance(grid, str) else custom_grid(grid, as_model(model, sde).sde)
        budget = nfe if nfe is not None else steps if steps is not None else \
            (len(times) - 1 if times is not None else None)
        require(budget is not None, "solver='auto' chooses for a budget: give nfe (or steps, or a "
                                    "custom grid)")
        auto = auto_config(model, int(budget), sigma_data, sde=sde)
        solver, sigma_data = auto["solver"], auto["sigma_data"]
        focus_width = auto["focus_width"] if focus_width is None else focus_width
        focus_share = auto["focus_share"] if focus_share is None else focus_share
        options = {**auto["options"], **options}
        grid = auto["grid"] if grid is None else grid
        rule_afs = auto["analytic_first_step"]
        if steps is not None:
            steps, nfe = None, int(steps)
    if sigma_data is None:
        sigma_data = DEFAULT_SIGMA_DATA
    focus_width = FOCUS_WIDTH if focus_width is None else focus_width
    focus_share = FOCUS_SHARE if focus_share is None else focus_share
    info = get_solver(solver)
    model = as_model(model, sde)
    sde = model.sde
    info.check_options(options)
    times = None if grid is None or isinstance(grid, str) else custom_grid(grid, sde)
    planned = options
    from_rule = analytic_first_step is None
    analytic_first_step = rule_afs if from_rule else analytic_first_step
    require(isinstance(analytic_first_step, bool),
            f"analytic_first_step must be True or False, got {analytic_first_step!r}")
    if analytic_first_step:   # only from a start at high noise: the rule drops it, a request fails
        t0 = float(times[0]) if times is not None else sde.T if t_start is None else float(t_start)
        snr0 = start_snr(sde, t0)
        if snr0 > ANALYTIC_MAX_SNR:
            require(from_rule, f"analytic_first_step needs a start at high noise: alpha/sigma = "
                               f"{snr0:.3g} at t_start = {t0:.6g}, above {ANALYTIC_MAX_SNR} (start "
                               f"at the SDE's T, or use a VE sigma_max of at least ten times the "
                               f"data's scale)")
            analytic_first_step = False
    require(not (analytic_first_step and info.adaptive),
            f"analytic_first_step needs a fixed grid; solver {info.name!r} is adaptive")
    if nfe is not None:
        steps, planned = info.for_nfe(int(nfe) + int(analytic_first_step), **options)
    if times is not None:
        _check_grid_steps(info, times, steps, nfe, options)
        require(t_start is None and t_end is None,
                "t_start and t_end shape a named grid; a custom grid sets its own ends")
        steps = len(times) - 1
    elif steps is None:
        steps = 1 if info.adaptive else sde.N
    check_steps(steps)
    options = planned
    x_T, noise = start_state(sde, shape, x_T, generator, dtype, device, index_offset=index_offset)
    shape, dtype, device = tuple(x_T.shape), x_T.dtype, x_T.device
    if times is None:
        times = make_grid(sde, steps, info.grid if grid is None else grid, t_start, t_end, rho,
                          sigma_data, focus_width, focus_share)
    require(isinstance(grad, bool), f"grad must be True or False, got {grad!r}")
    ctx = SolverContext(model, sde, times, noise, dtype, device, shape[0], analytic_first_step)
    nfe_before = model.nfe
    with torch.enable_grad() if grad else torch.no_grad():
        x, trajectory = run_solver(info.name, info.fn, ctx, x_T, options, progress, callback,
                                   return_trajectory, adaptive=info.adaptive, correct=correct,
                                   two_way=info.two_way, check_every=check_every)
        if denoise:
            x = model.x0(x, ctx.t(ctx.steps))
    require(not analytic_first_step or ctx.analytic_calls > 0,
            f"solver {info.name!r} with {dict(options)} never evaluated the model at the grid's "
            f"first time, so analytic_first_step saved nothing; leave it out for this solver")
    grid_name = "custom" if grid is not None and not isinstance(grid, str) else \
        (info.grid if grid is None else grid)
    config: Dict[str, object] = {"solver": info.name, "options": dict(options), "grid": grid_name,
                                 "steps": steps, "auto": auto is not None}
    if analytic_first_step:
        config["analytic_first_step"] = True
    if grid_name == "focus":
        config["sigma_data"] = float(sigma_data)
        config["focus_width"], config["focus_share"] = float(focus_width), float(focus_share)
    elif grid_name == "karras":
        config["rho"] = float(rho)
    if auto is not None:
        config["kind"], config["rule"] = auto["kind"], auto["rule"]
    call = {"solver": info.name, "steps": steps, **dict(options),
            "grid": grid_name if grid_name != "custom" else times.clone()}
    call.update({k: config[k] for k in ("sigma_data", "focus_width", "focus_share", "rho",
                                        "analytic_first_step") if k in config})
    call.update({k: v for k, v in (("t_start", t_start), ("t_end", t_end)) if v is not None
                 and grid_name != "custom"})
    config["call"] = call
    return ConfiguredResult(samples=x, nfe=model.nfe - nfe_before, times=times, solver=info.name,
                            trajectory=trajectory, config=config)


def linear_vp(sde: Optional[SDE]) -> bool:
    """Whether ``sde`` is score_sde's VP SDE (:class:`~sde_diffusion.sdes.VPSDE` with the linear
    beta schedule), on which the ``quadratic`` grid is the exact rule's choice at 5-15 NFE."""
    return isinstance(sde, VPSDE) and sde.schedule == "linear"


def start_snr(sde: SDE, t: float) -> float:
    """``alpha(t) / sigma(t)``: how far the prior's views at ``t`` may be from the model's (the
    analytical first step's error in ``eps`` is this times the data's mean and scale); above
    :data:`ANALYTIC_MAX_SNR` at the start, ``sample`` refuses the analytical first step."""
    _, log_a, log_s = sde.log_scales(torch.tensor([float(t)], dtype=torch.float64))
    return float((log_a - log_s).exp())


def start_state(sde: SDE, shape: Optional[Sequence[int]], x_T: Optional[torch.Tensor],
                generator: GeneratorLike, dtype: torch.dtype,
                device: Union[str, torch.device, None], *,
                index_offset: int = 0) -> Tuple[torch.Tensor, NoiseSource]:
    """The starting state -- ``x_T`` as given, or drawn from the prior for ``shape`` -- and the
    noise source shaped like it. ``x_T`` fixes dtype and device; otherwise ``device`` defaults to
    the generator's (CPU without one)."""
    require((shape is None) != (x_T is None), "give exactly one of shape and x_T")
    if x_T is not None:
        require(isinstance(x_T, torch.Tensor) and x_T.is_floating_point() and x_T.ndim >= 1,
                "x_T must be a floating-point tensor of shape (batch, ...)")
        return x_T, NoiseSource(generator, x_T.shape, x_T.dtype, x_T.device, index_offset)
    shape = tuple(int(s) for s in shape)
    require(len(shape) >= 1 and all(s >= 1 for s in shape),
            f"shape must be (batch, ...) of positive sizes, got {shape}")
    if device is None:
        device = generator.device if isinstance(generator, torch.Generator) else "cpu"
    noise = NoiseSource(generator, shape, dtype, torch.device(device), index_offset)
    return noise.prior() * sde.prior_std, noise


def custom_grid(grid: GridLike, sde: SDE) -> torch.Tensor:
    """A user's grid -- a tensor, NumPy array, list or tuple of times -- as float64 CPU times,
    checked: one-dimensional, strictly decreasing, at least two, inside ``(0, T]``, at most
    ``MAX_STEPS`` intervals."""
    if isinstance(grid, torch.Tensor):
        times = grid.detach().to("cpu", torch.float64)
    else:
        require(isinstance(grid, (list, tuple, np.ndarray)),
                f"grid must be a grid name ({', '.join(GRIDS)}) or a decreasing sequence of times "
                f"(tensor, NumPy array, list or tuple), got {type(grid).__name__}")
        try:
            times = torch.as_tensor(np.asarray(grid, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ValueError(f"a custom grid must be a sequence of numbers: {err}") from None
    require(times.ndim == 1 or (times.ndim > 1 and times.numel() == max(times.shape)),
            f"a custom grid must be one-dimensional, got shape {tuple(times.shape)}")
    times = times.flatten()
    require(len(times) >= 2 and bool((times[1:] < times[:-1]).all()),
            "a custom grid must be a strictly decreasing sequence of at least two times")
    require(0 < float(times[-1]) and float(times[0]) <= sde.T,
            f"a custom grid must lie in (0, T={sde.T}], got [{float(times[-1])}, {float(times[0])}]")
    check_steps(len(times) - 1, f"a custom grid of {len(times)} times has {len(times) - 1} steps; steps")
    return times


def _check_grid_steps(info, times: torch.Tensor, steps: Optional[int], nfe: Optional[int],
                      options: dict) -> None:
    """A custom grid fixes the number of steps: a ``steps`` or ``nfe`` that asks for another is an
    error (it used to be ignored silently)."""
    n = len(times) - 1
    if nfe is not None and steps != n:
        cost = "" if info.adaptive else f" (on it {info.name!r} spends {info.cost(n, **options)} NFE)"
        raise ValueError(f"nfe={nfe} gives solver {info.name!r} a grid of {steps} steps, but the "
                         f"custom grid has {n} steps{cost}: leave nfe out, a custom grid sets the "
                         f"steps")
    require(steps is None or steps == n,
            f"steps={steps} disagrees with the custom grid, which has {n} steps ({n + 1} times): "
            f"leave steps out, a custom grid sets the steps")
