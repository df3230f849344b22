r"""The papers' sampler comparisons on a trained digits model, as data: rows are samplers (solver
specs), columns are step counts, and a cell is the digits classifier's Fréchet distance of the
model's samples to the digits test split, over ``S`` seeds, with a 95% confidence interval.

- ``ddim-table``: DDIM Table 1 (Song, Meng & Ermon 2021): ``ddim`` with ``eta`` = 0, 0.2, 0.5, 1
  and the larger-variance ancestral sampler ``sigma_hat`` at 10, 20, 50, 100 and 1000 steps.
  DDIM's CIFAR-10 runs skip quadratically through the 1000 discrete DDPM steps (their App. D.2);
  here every row uses the toolkit's ``ddim`` default, a uniform grid in continuous time from ``T``
  to ``eps``.
- ``pc-table``: score_sde Table 1 (Song et al. 2021): the reverse-diffusion, ancestral and
  probability-flow predictors alone at ``N`` and ``2N`` steps (P1000, P2000), the Langevin
  corrector alone at ``2N`` noise levels (C2000, one row: it has no predictor) and ``N`` predictor
  steps each followed by one Langevin step (PC1000). The probability-flow predictor is
  ``ode_euler`` (Euler on the probability-flow ODE, [SDE] eq. 13: score_sde's predictor with
  ``probability_flow=True`` to first order in the step); it has no single-step function for
  ``pc``, so its PC column adds the same Langevin step after every Euler step through
  ``sample(..., correct=fn)``, which is what ``pc`` does with the other two predictors.

Every cell of a seed starts from the same ``x_T`` and draws its step noise from the same seeded
streams (common random numbers: the rows' differences are sharper than their separate intervals
suggest). A cell's samples are finished with score_sde's Tweedie denoising step (``denoise``, one
more NFE), as the digits configs' ``sampling.noise_removal`` does.

The interval: with ``S`` per-seed values ``d_1..d_S`` (each from ``n`` fresh samples), the mean
``m`` and the half-width ``t_{0.975, S-1} s / sqrt(S)``, ``s`` the sample standard deviation
(Student t with ``S - 1`` degrees of freedom). It is an interval for the expected Fréchet
distance at sample size ``n`` -- a biased estimate of the population distance (the bias falls like
``1/n``), which is why the floor row, data against data at the same ``n`` (random train-split
subsets against the test split, ``S`` draws), is printed with it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._checks import require
from ._files import atomic_write, write_json, write_text
from .experiments import parse_solver_spec
from .models.wrapper import ScoreModel
from .reports import write_csv
from .samplers import NoiseSource, SolverContext, get_solver, make_grid, sample
from .samplers.correctors import langevin_step

__all__ = ["Cell", "Study", "StudyResult", "ddim_table", "pc_table", "make_study", "STUDIES",
           "DEFAULT_SEEDS", "DEFAULT_MINUTES", "fit_n", "student_t_interval", "paired_differences",
           "run_study", "estimate_seconds", "study_nfe", "worker_threads",
           "data_floor", "write_report", "SCORE_SDE_SNR"]

#: score_sde's corrector signal-to-noise ratio: ``sampling.snr = 0.16`` in its
#: configs/default_cifar10_configs.py, which configs/vp/ddpm/cifar10.py and the VE configs keep
SCORE_SDE_SNR = 0.16
#: DDIM Table 1's step counts
DDIM_STEPS = (10, 20, 50, 100, 1000)
#: DDIM Table 1's rows; ``sigma_hat`` is DDIM's larger-variance sampler (their sigma-hat)
DDIM_ROWS = ("ddim:eta=0", "ddim:eta=0.2", "ddim:eta=0.5", "ddim:eta=1", "ddim:sigma_hat=True")
#: offset of the Langevin hook's noise seed from the cell's seed (its own stream)
_HOOK_SEED = 1 << 40


@dataclass(frozen=True)
class Cell:
    """One run of a table: ``solver`` with ``options`` on ``steps`` grid steps; with
    ``langevin_snr``, one Langevin corrector step at that signal-to-noise ratio after every step
    (:func:`~sde_diffusion.samplers.correctors.langevin_step` through ``sample(correct=...)``)."""

    solver: str
    steps: int
    options: Dict[str, object] = field(default_factory=dict)
    langevin_snr: Optional[float] = None

    @property
    def label(self) -> str:
        text = ":".join([self.solver] + [f"{k}={v}" for k, v in self.options.items()])
        return text + (f" + langevin(snr={self.langevin_snr:g})" if self.langevin_snr else "")

    def nfe(self, denoise: bool = True) -> int:
        """Network evaluations per sample (the solver's cost, the hook's Langevin steps and the
        final denoising step)."""
        cost = get_solver(self.solver).cost(self.steps, **self.options)
        return cost + (self.steps if self.langevin_snr else 0) + int(bool(denoise))


@dataclass(frozen=True)
class Study:
    """A table: ``cells[(row, column)]`` (a missing pair prints "-"), ``steps[column]`` the grid
    steps a column stands for, ``unavailable[row]`` why a row cannot run here (printed "n/a")."""

    name: str
    title: str
    rows: Tuple[str, ...]
    columns: Tuple[str, ...]
    steps: Dict[str, int]
    cells: Dict[Tuple[str, str], Cell]
    unavailable: Dict[str, str] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()
    numeric_columns: bool = True      # columns are numbers (plotted on a log axis)
    column_label: str = "steps"


def ddim_table(steps: Optional[Sequence[int]] = None) -> Study:
    """DDIM Table 1: rows :data:`DDIM_ROWS`, columns ``steps`` (default :data:`DDIM_STEPS`). A row
    whose spec the ``ddim`` solver does not accept (``sigma_hat`` before it exists) is kept as
    unavailable, with the solver's error."""
    steps = tuple(int(s) for s in (DDIM_STEPS if steps is None else steps))
    require(len(steps) > 0 and min(steps) >= 1, f"steps must be positive integers, got {list(steps)}")
    columns = tuple(str(s) for s in steps)
    cells, unavailable = {}, {}
    for row in DDIM_ROWS:
        try:
            spec = parse_solver_spec(row)
        except ValueError as err:
            unavailable[row] = str(err)
            continue
        for col, k in zip(columns, steps):
            cells[(row, col)] = Cell(spec.name, k, dict(spec.options))
    notes = ("grid: the toolkit's ddim default, uniform in t from T to eps (DDIM's CIFAR-10 Table 1 "
             "skips quadratically through 1000 discrete steps, App. D.2)",)
    return Study("ddim-table", "DDIM Table 1 (Song, Meng & Ermon 2021)", DDIM_ROWS, columns,
                 dict(zip(columns, steps)), cells, unavailable, notes)


def pc_table(steps: int = 1000, snr: float = SCORE_SDE_SNR) -> Study:
    """score_sde Table 1 with ``N = steps``: columns ``P{N}``, ``P{2N}``, ``C{2N}``, ``PC{N}``;
    rows the three predictors and the corrector alone (see the module docstring)."""
    require(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}")
    require(math.isfinite(snr) and snr > 0, f"snr must be a finite number > 0, got {snr!r}")
    n = steps
    p1, p2, c2, pc = f"P{n}", f"P{2 * n}", f"C{2 * n}", f"PC{n}"
    columns = (p1, p2, c2, pc)
    cells: Dict[Tuple[str, str], Cell] = {}
    rows = ("reverse diffusion", "ancestral sampling", "probability flow", "corrector only")
    langevin = {"corrector": "langevin", "snr": float(snr), "n_steps": 1}
    for row, solver in zip(rows[:2], ("reverse_diffusion", "ancestral")):
        none = {"predictor": solver, "corrector": "none"}
        cells[(row, p1)] = Cell("pc", n, none)     # = the solver alone, as pc's docstring says
        cells[(row, p2)] = Cell("pc", 2 * n, none)
        cells[(row, pc)] = Cell("pc", n, {"predictor": solver, **langevin})
    cells[("probability flow", p1)] = Cell("ode_euler", n)
    cells[("probability flow", p2)] = Cell("ode_euler", 2 * n)
    cells[("probability flow", pc)] = Cell("ode_euler", n, langevin_snr=float(snr))
    cells[("corrector only", c2)] = Cell("pc", 2 * n, {"predictor": "none", **langevin})
    notes = (f"Langevin corrector: snr = {snr:g} (score_sde's sampling.snr), one step per noise level",
             "probability flow: ode_euler (Euler on the probability-flow ODE); its PC column adds "
             "the Langevin step through sample(correct=...)",
             "grid: uniform in t from T to eps (score_sde's)")
    return Study("pc-table", "score_sde Table 1 (Song et al. 2021)", rows, columns,
                 {p1: n, p2: 2 * n, c2: 2 * n, pc: n}, cells, {}, notes, numeric_columns=False)


#: the studies by name, each ``builder(steps, snr) -> Study``
STUDIES: Dict[str, Callable[..., Study]] = {"ddim-table": ddim_table, "pc-table": pc_table}
#: default seeds per cell: the interval's half-width at a fixed total ``n x S`` goes like
#: ``t_{S-1} sqrt(S) / (n S)`` when the spread falls like ``1/n`` (measured for the floor:
#: sd 9.2, 4.0, 2.2, 0.9 at n = 50, 100, 200, 400), smallest near S = 4-6 (S = 2 costs 3x)
DEFAULT_SEEDS = 4
#: default time budget of a study (minutes): the sample count is the largest that fits
DEFAULT_MINUTES = 45.0
#: the sample counts a fitted ``n`` is kept within (the floor draws from 1437 training digits)
N_RANGE = (20, 1437)
#: wall time / network time of a whole study (Python per step, noise, the Fréchet distances and
#: a busy machine): 9.8 min against 7.7 estimated from one call (ddim-table, 3 columns, n = 200,
#: 4 seeds, the digits U-Net on a loaded 2-core machine, one thread)
OVERHEAD = 1.25


def make_study(name: str, steps: Optional[Sequence[int]] = None,
               snr: float = SCORE_SDE_SNR) -> Study:
    """The study ``name`` (:data:`STUDIES`); ``steps`` overrides the columns (``pc-table``: one
    number, its ``N``)."""
    require(name in STUDIES, f"unknown study {name!r}; valid studies: {', '.join(STUDIES)}")
    if name == "pc-table":
        if steps is None:
            return pc_table(1000, snr)
        require(len(steps) == 1, f"pc-table takes one step count N (columns PN, P2N, C2N, PCN), "
                                 f"got {list(steps)}")
        return pc_table(int(steps[0]), snr)
    return ddim_table(steps)


# ---- the interval --------------------------------------------------------------------------------
def student_t_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
    """``(mean, half-width)`` of the two-sided Student-t confidence interval for the mean of
    i.i.d. ``values`` (``S >= 2``): ``t_{(1+level)/2, S-1} s / sqrt(S)`` with ``s`` the sample
    standard deviation (Student 1908; exact for normal values, close for sums of many
    samples)."""
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=np.float64)
    require(v.ndim == 1 and v.size >= 2, f"a confidence interval needs at least 2 values, got {v.size}")
    require(0 < level < 1, f"level must lie in (0, 1), got {level!r}")
    s = float(v.std(ddof=1))
    return float(v.mean()), float(student_t.ppf((1 + level) / 2, v.size - 1) * s / math.sqrt(v.size))


# ---- running ---------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    """Per-seed Fréchet distances ``fd[(row, column)]`` (a list over seeds), the NFE per sample of
    each cell, the floor's per-seed values, and ``skipped[(row, column)]`` (why a cell did not
    run)."""

    study: Study
    n: int
    seeds: List[int]
    fd: Dict[Tuple[str, str], List[float]] = field(default_factory=dict)
    nfe: Dict[Tuple[str, str], int] = field(default_factory=dict)
    wall: Dict[Tuple[str, str], float] = field(default_factory=dict)
    skipped: Dict[Tuple[str, str], str] = field(default_factory=dict)
    floor: List[float] = field(default_factory=list)
    denoise: bool = True

    def summary(self, key: Tuple[str, str]) -> Tuple[float, float]:
        return student_t_interval(self.fd[key])

    def floor_summary(self) -> Tuple[float, float]:
        return student_t_interval(self.floor)


def study_nfe(study: Study, denoise: bool = True) -> int:
    """Network evaluations per sample and seed over all cells of ``study``."""
    return sum(cell.nfe(denoise) for cell in study.cells.values())


def _langevin_hook(model: ScoreModel, cell: Cell, grid: Optional[str], batch: int,
                   shape: Sequence[int], seed: int, offset: int, device) -> Callable:
    """``correct(step, t, x)``: one Langevin step at the grid time the solver reached, i.e. what
    ``pc`` does after its predictor ([SDE] Alg. 1 with Alg. 4's step size), on the solver's own
    grid, with indexed noise of its own seed."""
    info = get_solver(cell.solver)
    times = make_grid(model.sde, cell.steps, grid or info.grid)
    noise = NoiseSource(seed + _HOOK_SEED, (batch,) + tuple(shape), torch.float32,
                        torch.device(device), offset)
    ctx = SolverContext(model, model.sde, times, noise, torch.float32, torch.device(device), batch)

    def correct(step: int, t: float, x: torch.Tensor) -> torch.Tensor:
        require(abs(float(t) - ctx.time_list[step]) <= 1e-12 * max(1.0, abs(float(t))),
                f"the Langevin hook's grid time {ctx.time_list[step]} differs from the solver's {t}")
        return langevin_step(ctx, step, x, float(cell.langevin_snr))

    return correct


def _refusal(model: ScoreModel, cell: Cell, shape: Sequence[int], grid: Optional[str],
             device) -> Optional[str]:
    """Why the cell's solver refuses this model (ancestral sampling under sub-VP), found by one
    step on two samples before any long run; ``None`` when it runs."""
    try:
        sample(model, shape=(2,) + tuple(shape), solver=cell.solver, steps=1, grid=grid,
               generator=0, device=device, progress=False, **cell.options)
    except ValueError as err:
        return str(err).split(". ")[0]
    return None


def _draw(model: ScoreModel, cell: Cell, n: int, seed: int, batch: int, shape: Sequence[int],
          grid: Optional[str], denoise: bool, device, bar: Optional[bool]) -> Tuple[torch.Tensor, int]:
    """``n`` samples of a cell in batches (indexed noise: batch-size independent up to PC's batch
    step-size rule) and the NFE per sample."""
    chunks, nfe = [], 0
    for start in range(0, n, batch):
        b = min(batch, n - start)
        correct = (_langevin_hook(model, cell, grid, b, shape, seed, start, device)
                   if cell.langevin_snr else None)
        out = sample(model, shape=(b,) + tuple(shape), solver=cell.solver, steps=cell.steps,
                     grid=grid, generator=seed, index_offset=start, device=device,
                     denoise=denoise, progress=bar, correct=correct, **cell.options)
        chunks.append(out.samples.detach().float().cpu())
        nfe = out.nfe
    return torch.cat(chunks), nfe


def data_floor(n: int, seeds: Sequence[int], image_size: int = 8) -> List[float]:
    """Fréchet distances of ``n`` random train-split digits (without replacement, one subset per
    seed) to the test split: the value a perfect sampler would get at sample size ``n``."""
    from . import data
    from .metrics import frechet_distance

    train, test = data.digits(image_size, "train"), data.digits(image_size, "test")
    require(2 <= n <= train.shape[0], f"n must lie in [2, {train.shape[0]}] (the train split "
                                      f"gives the floor), got {n}")
    out = []
    for s in seeds:
        idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(int(s)))[:n]
        out.append(float(frechet_distance(train[idx], test, features="digits")))
    return out


def worker_threads(workers: int) -> int:
    """Threads of each of ``workers`` processes: this process's threads shared out, at least 1."""
    return max(1, torch.get_num_threads() // workers)


def estimate_seconds(study: Study, model: ScoreModel, n: int, seeds: int, batch: int,
                     shape: Sequence[int], device="cpu", denoise: bool = True,
                     workers: int = 1) -> Dict[str, float]:
    """Time one network call on a batch of ``b = min(batch, n)`` and scale it to the study's
    samples and calls: ``{"call_s", "batch", "calls", "seconds"}``, ``seconds = call_s / b x n x
    NFE x seeds x`` :data:`OVERHEAD` (the rest of the work, measured) ``/ workers``, the call
    timed on a worker's share of the threads (as :func:`run_study` gives it)."""
    b = min(batch, n)
    x = torch.randn((b,) + tuple(shape), device=device)
    t = torch.full((b,), 0.5 * model.sde.T, device=device)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(worker_threads(workers))       # a worker's share, as run_study's
        with torch.no_grad():
            model.eps(x, t)                                   # warm-up
            times = []
            for _ in range(2):
                start = time.perf_counter()
                model.eps(x, t)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    call = min(times)
    calls = study_nfe(study, denoise) * seeds * math.ceil(n / b)
    # the time of a call grows with its batch: the cost is counted per sample (a last, partial
    # batch costs its share), as fit_n counts it
    seconds = OVERHEAD * call / b * n * study_nfe(study, denoise) * seeds / workers
    return {"call_s": call, "batch": b, "calls": calls, "seconds": seconds}


def fit_n(call_s: float, batch: int, study: Study, seeds: int, seconds: float,
          denoise: bool = True, workers: int = 1) -> int:
    """The largest sample count per seed whose network time fits ``seconds``: ``call_s`` is one
    call on ``batch`` samples, each sample costs :func:`study_nfe` calls per seed, shared by
    ``workers`` processes (as :func:`estimate_seconds`); kept within :data:`N_RANGE`."""
    per_sample = OVERHEAD * call_s / batch * study_nfe(study, denoise) * seeds / workers
    return int(min(max(seconds / per_sample, N_RANGE[0]), N_RANGE[1]))


def _score_cell(model: ScoreModel, cell: Cell, n: int, seed: int, batch: int,
                shape: Sequence[int], grid: Optional[str], denoise: bool, device,
                bar: Optional[bool], test: torch.Tensor) -> Tuple[float, int, float]:
    """One (cell, seed) of a study: ``(Fréchet distance, NFE per sample, seconds)``."""
    from .metrics import frechet_distance

    t0 = time.perf_counter()
    with torch.no_grad():
        x, nfe = _draw(model, cell, n, seed, batch, shape, grid, denoise, device, bar)
        fd = float(frechet_distance(x.clamp(-1, 1), test, features="digits"))
    return fd, nfe, time.perf_counter() - t0


#: a worker process's model and test split (:func:`_start_worker`)
_WORKER: dict = {}


def _start_worker(model: ScoreModel, test: torch.Tensor, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(model=model, test=test)


def _worker_task(cell: Cell, n: int, seed: int, batch: int, shape: Sequence[int],
                 grid: Optional[str], denoise: bool) -> Tuple[float, int, float]:
    return _score_cell(_WORKER["model"], cell, n, seed, batch, shape, grid, denoise, "cpu",
                       False, _WORKER["test"])


def run_study(study: Study, model: ScoreModel, *, n: int, seeds: int, shape: Sequence[int],
              batch: int = 500, seed: int = 0, grid: Optional[str] = None, denoise: bool = True,
              device="cpu", bar: Optional[bool] = False,
              progress: Optional[Callable[[str], None]] = None, workers: int = 1) -> StudyResult:
    """Run every cell of ``study`` for seeds ``seed, ..., seed + seeds - 1``: ``n`` samples each,
    scored by the digits classifier's Fréchet distance to the digits test split
    (:func:`~sde_diffusion.metrics.frechet_distance`, ``features="digits"``), and the data floor
    (:func:`data_floor`). A cell whose solver refuses the model (ancestral sampling under sub-VP)
    is found by a one-step probe before the long runs and recorded in ``skipped``. ``bar``: the
    samplers' progress bars (``None``: on a terminal).

    ``workers > 1`` (CPU only) runs the (cell, seed) pairs in that many spawned processes, each
    with :func:`worker_threads` threads. Every pair draws its own seeded,
    indexed noise, so the values do not depend on which process ran it or in what order (up to
    the float rounding of a different thread count)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    from . import data

    require(isinstance(seeds, int) and seeds >= 2, f"seeds must be an integer >= 2 (a confidence "
                                                   f"interval needs two values), got {seeds!r}")
    require(isinstance(n, int) and n >= 2, f"n must be an integer >= 2, got {n!r}")
    require(isinstance(batch, int) and batch >= 1, f"batch must be an integer >= 1, got {batch!r}")
    require(isinstance(workers, int) and workers >= 1,
            f"workers must be an integer >= 1, got {workers!r}")
    require(workers == 1 or torch.device(device).type == "cpu",
            f"workers > 1 runs CPU processes; on {device} use workers=1, got {workers}")
    shape = tuple(int(s) for s in shape)
    require(len(shape) == 3 and shape[0] == 1 and shape[1] == shape[2] and shape[1] >= 8,
            f"the digits Fréchet distance needs images of shape (1, S, S) with S >= 8, got {shape}")
    seed_list = [int(seed) + k for k in range(seeds)]
    result = StudyResult(study, n, seed_list, denoise=denoise)
    result.floor = data_floor(n, seed_list, shape[1])
    test = data.digits(shape[1], "test")
    todo = []
    for key in ((r, c) for r in study.rows for c in study.columns if (r, c) in study.cells):
        why = _refusal(model, study.cells[key], shape, grid, device)
        if why is None:
            todo.append(key)
        else:
            result.skipped[key] = why
    tasks = [(key, s) for key in todo for s in seed_list]
    work = sum(study.cells[k].nfe(denoise) for k, _ in tasks)   # the time left goes by NFE
    values: Dict[Tuple[Tuple[str, str], int], Tuple[float, int, float]] = {}
    started, done_work = time.perf_counter(), 0

    def record(key: Tuple[str, str], s: int, value: Tuple[float, int, float]) -> None:
        nonlocal done_work
        values[key, s] = value
        done_work += study.cells[key].nfe(denoise)
        if progress:
            elapsed = time.perf_counter() - started
            left = elapsed / done_work * (work - done_work)
            progress(f"[{len(values)}/{len(tasks)}] {key[0]} @ {key[1]}, seed {s}: FD "
                     f"{value[0]:.3f} (NFE {value[1]}; {_clock(elapsed)} elapsed, "
                     f"~{_clock(left)} left)")

    if workers == 1:
        for key, s in tasks:
            record(key, s, _score_cell(model, study.cells[key], n, s, batch, shape, grid, denoise,
                                       device, bar, test))
    else:
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker,
                                 (model, test, worker_threads(workers))) as pool:
            futures = {pool.submit(_worker_task, study.cells[key], n, s, batch, shape, grid,
                                   denoise): (key, s) for key, s in tasks}
            for future in as_completed(futures):
                record(*futures[future], future.result())
    for key, s in tasks:   # in the study's order, whatever order the work finished in
        fd, nfe, wall = values[key, s]
        result.fd.setdefault(key, []).append(fd)
        result.nfe[key] = nfe
        result.wall[key] = result.wall.get(key, 0.0) + wall
    return result


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ---- the report ---------------------------------------------------------------------------------------
def _cell_text(result: StudyResult, key: Tuple[str, str]) -> str:
    row, _ = key
    if row in result.study.unavailable:
        return "n/a"
    if key in result.skipped:
        return "n/a"
    if key not in result.fd:
        return "-"
    return _pm(*result.summary(key))


def _pm(mean: float, hw: float) -> str:
    """``mean ± half-width`` rounded to the half-width's second significant digit."""
    if not (math.isfinite(hw) and hw > 0):
        return f"{mean:.4g} ± {hw:.2g}"
    decimals = max(0, 1 - math.floor(math.log10(hw)))
    return f"{mean:.{decimals}f} ± {hw:.{decimals}f}"


def markdown_table(result: StudyResult) -> str:
    """The paper's layout: one row per sampler, one column per step count, cells ``mean ±
    half-width``; the floor row and the NFE per sample below; notes after the table."""
    st = result.study
    head = "| sampler | " + " | ".join(st.columns) + " |"
    lines = [f"# {st.title} on digits", "",
             f"Fréchet distance of the digits classifier's features to the digits test split; "
             f"{result.n} samples per seed, {len(result.seeds)} seeds; cells: mean ± half-width "
             f"of the 95% Student-t interval across seeds (t with {len(result.seeds) - 1} "
             f"degrees of freedom).", "", head, "|" + "---|" * (len(st.columns) + 1)]
    for row in st.rows:
        lines.append(f"| {row} | " + " | ".join(_cell_text(result, (row, c)) for c in st.columns) + " |")
    fm, fh = result.floor_summary()
    lines.append("| data vs data (floor) | " + " | ".join(_pm(fm, fh) for _ in st.columns) + " |")
    nfe = []
    for c in st.columns:
        values = sorted({result.nfe[(r, c)] for r in st.rows if (r, c) in result.nfe})
        nfe.append("/".join(str(v) for v in values) or "-")
    lines.append("| NFE per sample | " + " | ".join(nfe) + " |")
    lines.append("")
    halves = [result.summary(k)[1] for k in result.fd if len(result.fd[k]) >= 2]
    if halves:
        lines.append(f"- typical half-width: {float(np.median(halves)):.3g} (median over cells; "
                     f"{min(halves):.3g} to {max(halves):.3g})")
    lines += _paired_table(result)
    lines.append("- final Tweedie denoising step: "
                 + ("yes (counted in the NFE)" if result.denoise else "no"))
    for note in st.notes:
        lines.append(f"- {note}")
    for row, why in st.unavailable.items():
        lines.append(f"- {row}: not run ({why})")
    for key, why in result.skipped.items():
        lines.append(f"- {key[0]} @ {key[1]}: not run ({why})")
    return "\n".join(lines) + "\n"


def paired_differences(result: StudyResult) -> Dict[Tuple[str, str], Tuple[float, float]]:
    """For every cell, ``(mean, half-width)`` of its per-seed difference to the best row of its
    column (lowest mean), a paired 95% Student-t interval: the rows of a seed share ``x_T`` and
    the step noise, so the seed-to-seed spread they share cancels (common random numbers) and the
    difference is usually known far better than either value. The best row itself is left out."""
    out = {}
    for col in result.study.columns:
        keys = [(r, col) for r in result.study.rows if (r, col) in result.fd]
        if len(keys) < 2:
            continue
        best = min(keys, key=lambda k: float(np.mean(result.fd[k])))
        for key in keys:
            if key != best:
                diff = np.asarray(result.fd[key]) - np.asarray(result.fd[best])
                out[key] = student_t_interval(diff)
    return out


def _paired_table(result: StudyResult) -> List[str]:
    diffs = paired_differences(result)
    if not diffs:
        return []
    st = result.study
    lines = ["", "Paired differences to the best row of each column (same seeds, same x_T and "
                 "noise; mean ± 95% half-width; * where the interval excludes 0, i.e. the row is "
                 "worse beyond the seeds' noise; = marks the best row):", "",
             "| sampler | " + " | ".join(st.columns) + " |", "|" + "---|" * (len(st.columns) + 1)]
    for row in st.rows:
        cells = []
        for col in st.columns:
            key = (row, col)
            if key in diffs:
                mean, hw = diffs[key]
                cells.append(_pm(mean, hw) + (" *" if abs(mean) > hw else ""))
            else:
                cells.append("=" if key in result.fd and any(k[1] == col for k in diffs) else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def csv_rows(result: StudyResult) -> List[dict]:
    """Long form: one row per cell and seed, then one summary row per cell (``seed = "mean"``,
    ``fd`` the mean, ``fd_ci95`` the half-width), then the floor's rows (sampler ``data vs
    data``)."""
    st, out = result.study, []
    for row in st.rows:
        for col in st.columns:
            key = (row, col)
            if key not in result.fd:
                continue
            base = {"sampler": row, "column": col, "solver": st.cells[key].label,
                    "steps": st.steps[col], "nfe": result.nfe[key], "n": result.n}
            for s, v in zip(result.seeds, result.fd[key]):
                out.append({**base, "seed": s, "fd": v, "fd_ci95": ""})
            mean, hw = result.summary(key)
            out.append({**base, "seed": "mean", "fd": mean, "fd_ci95": hw})
    base = {"sampler": "data vs data", "column": "", "solver": "", "steps": "", "nfe": 0, "n": result.n}
    for s, v in zip(result.seeds, result.floor):
        out.append({**base, "seed": s, "fd": v, "fd_ci95": ""})
    fm, fh = result.floor_summary()
    out.append({**base, "seed": "mean", "fd": fm, "fd_ci95": fh})
    return out


#: the columns of ``table.csv``, in order (:func:`csv_rows`)
CSV_COLUMNS = ("sampler", "column", "solver", "steps", "nfe", "n", "seed", "fd", "fd_ci95")


def plot(result: StudyResult, path: str) -> str:
    """Fréchet distance against the column, one line per sampler with its 95% interval as error
    bars (log-x steps for numeric columns, the columns in order otherwise), the floor as a dashed
    line with its interval as a band."""
    from .reports import _matplotlib

    Figure, FigureCanvasAgg = _matplotlib()
    st = result.study
    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    nrows = max(1, len(st.rows))
    for k, row in enumerate(st.rows):
        pts = [(j, c) for j, c in enumerate(st.columns) if (row, c) in result.fd]
        if not pts:
            continue
        if st.numeric_columns:     # dodged a little (x 1.04 per row) so the bars do not overlap
            xs = [float(c) * 1.04 ** (k - (nrows - 1) / 2) for _, c in pts]
        else:
            xs = [j + 0.12 * (k - (nrows - 1) / 2) for j, _ in pts]
        ms, hs = zip(*(result.summary((row, c)) for _, c in pts))
        lower = [min(h, 0.9 * m) for m, h in zip(ms, hs)]
        ax.errorbar(xs, ms, yerr=[lower, list(hs)], marker="o", capsize=3, label=row,
                    ls="-" if st.numeric_columns else "none")
    fm, fh = result.floor_summary()
    ax.axhline(fm, color="k", lw=1, ls="--", label="data vs data")
    ax.axhspan(max(fm - fh, 0.1 * fm), fm + fh, color="k", alpha=0.08, lw=0)
    if st.numeric_columns:
        ax.set_xscale("log")
        ax.set_xticks([float(c) for c in st.columns])
        ax.set_xticklabels(st.columns)
        ax.minorticks_off()
        ax.set_xlabel(st.column_label)
    else:
        ax.set_xticks(range(len(st.columns)))
        ax.set_xticklabels(st.columns)
        ax.set_xlabel("sampler budget")
    ax.set_yscale("log")
    ax.set_ylabel("Fréchet distance (digits features)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{st.name}: n={result.n}, {len(result.seeds)} seeds, bars: 95% CI")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


REPORT_FILES = ("table.md", "table.csv", "fd_vs_steps.png", "run.json")


def write_report(result: StudyResult, folder: str, run_info: Optional[dict] = None,
                 names: Sequence[str] = REPORT_FILES) -> List[str]:
    """Write ``names`` (default :data:`REPORT_FILES`) into ``folder`` (atomically): the table,
    the long-form CSV, the plot and the JSON record (``run_info`` plus the summaries)."""
    import os

    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, name) for name in names]
    write_text(paths[0], markdown_table(result))
    write_csv(csv_rows(result), paths[1], columns=CSV_COLUMNS)
    plot(result, paths[2])
    fm, fh = result.floor_summary()
    cells = {f"{r} @ {c}": {"fd": result.fd[(r, c)], "mean": result.summary((r, c))[0],
                            "ci95": result.summary((r, c))[1], "nfe": result.nfe[(r, c)],
                            "solver": result.study.cells[(r, c)].label,
                            "wall_s": result.wall.get((r, c))}
             for r in result.study.rows for c in result.study.columns if (r, c) in result.fd}
    write_json(paths[3], {**(run_info or {}), "study": result.study.name, "n": result.n,
                          "seeds": result.seeds, "denoise": result.denoise,
                          "floor": {"fd": result.floor, "mean": fm, "ci95": fh}, "cells": cells,
                          "paired_to_best": {f"{r} @ {c}": {"mean": m, "ci95": h} for (r, c), (m, h)
                                             in paired_differences(result).items()},
                          "unavailable": result.study.unavailable,
                          "skipped": {f"{r} @ {c}": v for (r, c), v in result.skipped.items()},
                          "interval": "95% Student t across seeds, S - 1 degrees of freedom"})
    return paths
