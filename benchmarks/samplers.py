"""Sampler benchmark on an exact Gaussian-mixture oracle: our solvers against k-diffusion's samplers
and diffusers' schedulers, side by side, at the same NFE, from the same starting noise.

    python benchmarks/samplers.py               # full run (~18 min on one thread), writes
                                                # benchmarks/results/samplers.{md,csv} and
                                                # samplers_error_vs_nfe.png
    python benchmarks/samplers.py --quick       # smoke run (< 2 min)
    python benchmarks/samplers.py --device cuda --image-batch 256   # GPU: overhead vs model time
                                                # on a (B, 3, 32, 32) mixture
    python benchmarks/samplers.py --noise-only  # int-seed (indexed) vs torch.Generator noise at
                                                # batch 1, 64, 4096: samplers_noise.{md,csv}
    python benchmarks/samplers.py --overhead-only   # per-step overhead of ours and k-diffusion's,
                                                # interleaved, batch 1 and 2048: samplers_overhead.{md,csv}

What is measured (see docs/samplers.md, "Benchmark"):

- Data: ``random_mixture(64, 8, seed)`` (unequal weights and widths, means in [-0.6, 0.6]) under
  the VP SDE (beta 0.1 -> 20), sampled from ``T = 1`` to ``eps = 1e-3``; every solver starts from
  the same ``x_T``; stochastic ones share one seed.
- Deterministic solvers: RMS error (over samples and coordinates) of ``x_eps`` against the exact
  flow map of the probability-flow ODE (``exact_flow_map``: float64, DOP853, rtol = atol = 1e-10)
  of the same ``x_T``, at NFE 10, 20, 50, 100, 200, 1000 (a solver whose NFE per step does not
  divide the budget uses the largest grid within it; the NFE actually spent is reported), over all
  2048 samples: at 10 NFE the error is dominated by the ~0.4% of samples that a solver sends to
  another mode than the exact map does, so 512 samples (a handful of those) gave a noisy ranking.
- ``/optimized`` rows (at NFE <= 20): our solver on a grid from ``optimize_grid``, fitted once per
  budget with its defaults (2048 pilot samples of other noise than ``x_T``, a quarter held out for
  early stopping, consecutive log-SNR steps within a factor 2) against the UniPC-3 teacher of the
  same oracle (not the exact flow map); the fitting cost is reported, not counted in the NFE.
- All solvers: mode statistics of the samples against ``p_eps`` (the mixture at ``t = eps``): total
  variation of the mode weights, the largest per-mode mean error in units of the mode's std, and the
  largest per-mode variance error ``max_k |var_k / var_k,true - 1|`` (samples assigned to modes by
  the oracle's responsibilities; the modes are far apart in 64-D so the assignment is exact). A row
  of exact ``p_eps`` samples of the same size shows the statistical floor.
- ``--overhead-only``: the per-step overhead of ten of our configurations and six of
  k-diffusion's samplers at batch 1 and 2048 (``--overhead-batches``), every sampler in turn within
  each round (see :func:`overhead_benchmark`), and the ratio of each pair of issue 18
  (``OVERHEAD_PAIRS``; DPM-Solver++ 3M against ``sample_dpmpp_3m_sde`` with ``eta=0``).
- Time: the run time of each run, the time spent inside the oracle (timed call by call) and the
  overhead ``run - model`` per step and per NFE (at ``--timing-nfe``, the least of
  ``--timing-repeats`` runs). On the CPU these are the process's CPU time with one torch thread
  (``--threads 1``; wall time on a shared machine is unreliable), on CUDA wall times with
  ``torch.cuda.synchronize``. The oracle is written for speed here (isotropic components, matrix
  products, float64) and checked against the package's oracle at start-up, so the overhead is not
  hidden behind model time.
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sde_diffusion import VPSDE, GaussianMixture, random_mixture  # noqa: E402
from sde_diffusion.metrics import mode_statistics  # noqa: E402
from sde_diffusion.samplers import available_solvers, optimize_grid, sample  # noqa: E402
from sde_diffusion.samplers.grids import focus_grid  # noqa: E402
from sde_diffusion.samplers.reference import exact_flow_map  # noqa: E402

NFES = (10, 20, 50, 100, 200, 1000)


# ---- a fast, timed oracle ---------------------------------------------------------------------------
class TimedMixture(GaussianMixture):
    """The same isotropic mixture with ``x0``, ``eps``, ``score`` computed by matrix products in
    float64 (exact to round-off), each call timed (``seconds``, ``calls``)."""

    def __init__(self, base: GaussianMixture, device="cpu", clock=time.perf_counter):
        super().__init__(base.weights, base.means, base.stds, base.sde)
        self.clock = clock
        K = self.n_components
        flat_s = self.stds.reshape(K, -1)
        if not bool((flat_s == flat_s[:, :1]).all()):
            raise ValueError("TimedMixture needs isotropic components")
        self.device = torch.device(device)
        self._M = self.means.reshape(K, -1).to(self.device)
        self._s2 = (flat_s[:, 0] ** 2).to(self.device)
        self._m2 = (self._M * self._M).sum(1)
        self._logw = self.weights.log().to(self.device)
        self._D = self._M.shape[1]
        self.seconds, self.calls = 0.0, 0
        self._cuda = self.device.type == "cuda"

    def reset_clock(self):
        self.seconds, self.calls = 0.0, 0

    def _sync(self):
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def _parts(self, x, t):
        B = x.shape[0]
        xf = x.reshape(B, -1).to(torch.float64)
        _, log_a, log_s = self.sde.log_scales(self.sde.time(t, x).to(torch.float64))
        a = log_a.exp()[:, None]
        s2 = (2 * log_s).exp()[:, None]
        v = a * a * self._s2[None] + s2
        d2 = (xf * xf).sum(1, keepdim=True) - 2 * a * (xf @ self._M.T) + a * a * self._m2[None]
        logj = self._logw[None] - 0.5 * (d2 / v + self._D * torch.log(2 * math.pi * v))
        return xf, torch.softmax(logj, dim=1), a, s2, v

    def _timed(self, compute, x, t):
        self._sync()
        start = self.clock()
        out = compute(x, t).to(x.dtype).reshape(x.shape)
        self._sync()
        self.seconds += self.clock() - start
        self.calls += 1
        return out

    def _x0(self, x, t):
        xf, r, a, s2, v = self._parts(x, t)
        c = (r * (a * self._s2[None] / v)).sum(1, keepdim=True)
        return c * xf + (r * (s2 / v)) @ self._M

    def _score(self, x, t):
        xf, r, a, s2, v = self._parts(x, t)
        rv = r / v
        return -xf * rv.sum(1, keepdim=True) + a * (rv @ self._M)

    def _eps(self, x, t):
        xf, r, a, s2, v = self._parts(x, t)
        rv = r / v
        return s2.sqrt() * (xf * rv.sum(1, keepdim=True) - a * (rv @ self._M))

    def x0(self, x, t=None):
        return self._timed(self._x0, x, t)

    def score(self, x, t=None):
        return self._timed(self._score, x, t)

    def eps(self, x, t=None):
        return self._timed(self._eps, x, t)


def p_eps_mixture(mix: GaussianMixture, t: float) -> GaussianMixture:
    """The law of ``x_t``: means ``alpha m_k``, stds ``sqrt(alpha^2 s_k^2 + sigma^2)``."""
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = float(mix.sde.alpha(tt)), float(mix.sde.sigma(tt))
    return GaussianMixture(mix.weights, a * mix.means, (a * a * mix.stds ** 2 + s * s).sqrt())


# ---- what is run ------------------------------------------------------------------------------------
@dataclass
class Entry:
    name: str
    library: str
    stochastic: bool
    schedule: str
    steps_for_nfe: Callable[[int], Optional[int]]
    run: Callable  # run(steps, x_T, generator) -> (samples, nfe)
    family: str = ""
    prepare: Optional[Callable[[int], str]] = None  # prepare(steps) -> note; untimed, before the runs


# The grid rule for our solvers (docs/samplers.md, "Choosing a grid"): the log-SNR solvers (DDIM,
# DPM-Solver, DPM-Solver++, UniPC, SDE-DPM-Solver++) use ``focus_grid`` with sigma_data = the data's
# RMS standard deviation (EDM's definition of sigma_data); two of them are also shown on the plain
# log-SNR-uniform grid of Lu et al.; EDM's samplers use EDM's Karras rho=7 spacing; the solvers in t
# (score_sde's) score_sde's uniform grid in t.
OUR_SOLVERS = [
    # label, solver, grid, options
    ("ddim", "ddim", "focus", {}),
    ("dpm_solver_2", "dpm_solver_2", "focus", {}),
    ("dpm_solver_3", "dpm_solver_3", "focus", {}),
    ("dpm_solver++_2m", "dpm_solver++_2m", "focus", {}),
    ("dpm_solver++_3m", "dpm_solver++_3m", "focus", {}),
    ("dpm_solver++_3m/logsnr", "dpm_solver++_3m", "logsnr", {}),
    ("unipc_2", "unipc", "focus", {"order": 2}),
    ("unipc_3", "unipc", "focus", {"order": 3}),
    ("unipc_2/logsnr", "unipc", "logsnr", {"order": 2}),
    ("unipc_3/optimized", "unipc", "optimized", {"order": 3}),
    ("dpm_solver++_3m/optimized", "dpm_solver++_3m", "optimized", {}),
    ("edm_heun", "edm_heun", "karras", {}),
    ("ode_heun", "ode_heun", "uniform", {}),
    ("ode_rk4", "ode_rk4", "uniform", {}),
    # stochastic
    ("euler_maruyama", "euler_maruyama", "uniform", {}),
    ("reverse_diffusion", "reverse_diffusion", "uniform", {}),
    ("ancestral", "ancestral", "uniform", {}),
    ("ddim(eta=1)", "ddim", "focus", {"eta": 1.0}),
    ("pc(rd+langevin)", "pc", "uniform", {"predictor": "reverse_diffusion", "corrector": "langevin"}),
    ("sde_dpm_solver++", "sde_dpm_solver++", "focus", {}),
    ("sde_dpm_solver++/logsnr", "sde_dpm_solver++", "logsnr", {}),
    ("edm_heun(churn)", "edm_heun", "karras", {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0,
                                                "S_noise": 1.0}),
]
QUICK_OURS = {"ddim", "dpm_solver++_3m", "unipc_2", "unipc_3", "unipc_3/optimized", "edm_heun",
              "sde_dpm_solver++", "edm_heun(churn)"}
QUICK_PEERS = {"k:heun", "k:dpmpp_2m", "k:dpmpp_3m", "k:dpmpp_2m_sde", "d:UniPC(3)",
               "d:DPMSolverMultistep(3M)"}


def data_std(mix: GaussianMixture) -> float:
    """RMS per-coordinate standard deviation of the clean data (EDM's sigma_data)."""
    return float(mix.covariance().diagonal().mean().sqrt())


@functools.lru_cache(maxsize=64)
def _focus_cached(sde, steps: int, sigma_data: float) -> torch.Tensor:
    return focus_grid(sde, steps, sigma_data=sigma_data)


def our_entries(oracle: TimedMixture, args, names=None) -> List[Entry]:
    registry = available_solvers()
    sigma_data = data_std(oracle)
    entries = []
    for label, solver, grid, options in OUR_SOLVERS:
        if names is not None and label not in names:
            continue
        if solver not in registry:
            print(f"note: solver {solver!r} is not registered here; skipped")
            continue
        info = registry[solver]
        if info.nfe is None:
            continue
        stochastic = not info.is_deterministic(**options)
        optimized: Dict[int, torch.Tensor] = {}

        def steps_for(nfe, info=info, grid=grid, options=options):
            if grid == "optimized" and nfe > args.optimize_max_nfe:
                return None
            try:
                return info.steps_for_nfe(nfe, **options)
            except ValueError:
                return None

        def prepare(steps, solver=solver, options=options, optimized=optimized):
            """The grid fitted once per budget on pilot noise of another seed than x_T's."""
            start = time.perf_counter()
            with torch.no_grad():
                res = optimize_grid(oracle, oracle.sde, solver, steps, shape=(args.pilot, args.dim),
                                    generator=args.seed + 100, grid="focus", sigma_data=sigma_data,
                                    progress=False, **options)
            optimized[steps] = res.times
            return (f"grid fitted on {args.pilot} pilot samples: {res.evaluations} solver runs, "
                    f"{res.model_calls} batched calls = {res.model_calls * args.pilot:.2e} sample "
                    f"evaluations, {time.perf_counter() - start:.0f} s; pilot error "
                    f"{res.initial_error:.2e} -> {res.pilot_error:.2e}, held-out part "
                    f"{res.initial_validation_error:.2e} -> {res.validation_error:.2e}")

        def run(steps, x_T, generator, solver=solver, grid=grid, options=options, optimized=optimized):
            if grid == "focus":
                # cached per step count: building it (6.5 ms for 100 steps on the CPU) is the
                # harness's choice of grid, not the solver's work; uncached it added ~65 us to
                # every step of a 100-step run in --overhead-only (the peers' Karras levels
                # cost ~0.1 ms a run)
                grid = _focus_cached(oracle.sde, steps, sigma_data)
            elif grid == "optimized":
                grid = optimized[steps]
            res = sample(oracle, oracle.sde, x_T=x_T, solver=solver, steps=steps, grid=grid,
                         generator=generator, progress=False, **options)
            return res.samples, res.nfe

        label_grid = {"focus": f"focus (sigma_data={sigma_data:.2f})",
                      "optimized": "optimize_grid from focus"}.get(grid, grid)
        entries.append(Entry(label, "ours", stochastic, label_grid, steps_for, run,
                             prepare=prepare if grid == "optimized" else None))
    return entries


def peer_entries(oracle: TimedMixture, names=None, libraries=("k-diffusion", "diffusers")) -> List[Entry]:
    from peers import available_peers
    entries = []
    for p in available_peers(oracle.sde, libraries):
        if names is not None and p.name not in names:
            continue

        def run(steps, x_T, generator, p=p):
            calls = oracle.calls
            out = p.run(oracle, x_T, steps, generator)
            return out, oracle.calls - calls

        entries.append(Entry(p.name, p.library, p.stochastic, p.schedule,
                             lambda nfe, p=p: p.steps_for_nfe(nfe), run))
    return entries


# ---- measuring --------------------------------------------------------------------------------------
def stats_row(samples: torch.Tensor, target: GaussianMixture) -> Dict[str, float]:
    st = mode_statistics(samples.detach().to("cpu", torch.float64), target)
    ok = st["counts"] >= 2
    var_err = float((st["variance_ratio"][ok] - 1).abs().max()) if bool(ok.any()) else math.nan
    return {"weight_tv": st["weight_tv"], "mean_err": st["max_mean_error"], "var_err": var_err}


def run_benchmark(args) -> List[Dict]:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sde = VPSDE()
    event = (3, 32, 32) if args.image_batch else args.dim
    base = random_mixture(event, args.modes, seed=args.seed, sde=sde)
    # time: CPU time of this process on the CPU (steady on a shared machine, and with one torch
    # thread equal to the time spent), wall time with synchronisation on CUDA
    clock = time.process_time if dev.type == "cpu" else time.perf_counter
    oracle = TimedMixture(base, device=dev, clock=clock)
    # the fast oracle agrees with the package's
    probe = torch.randn(8, *base.event_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in (0.01, 0.3, 0.9):
        for name in ("x0", "eps", "score"):
            want = getattr(base, name)(probe, t)
            got = getattr(oracle, name)(probe.to(dev), t).cpu()
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), f"fast oracle {name} disagrees"
    batch = args.image_batch or args.batch
    g = torch.Generator().manual_seed(args.seed + 1)
    x_T = torch.randn(batch, *base.event_shape, generator=g, dtype=torch.float64)
    target = p_eps_mixture(base, sde.eps)
    rows: List[Dict] = []
    ref = None
    n_err = min(args.error_batch, batch)
    if not args.image_batch:
        t0 = time.perf_counter()
        # the reference runs on the CPU in float64 (scipy), with a CPU copy of the oracle
        ref = exact_flow_map(TimedMixture(base, device="cpu"), x_T[:n_err]).cpu()
        print(f"reference flow map of {n_err} samples: {time.perf_counter() - t0:.1f}s")
        exact = target.sample(batch, generator=torch.Generator().manual_seed(args.seed + 2))
        rows.append(dict(solver="exact p_eps samples", library="-", kind="-", schedule="-",
                         nfe_target=0, nfe=0, steps=0, **stats_row(exact, target)))
    x_T = x_T.to(dev, dtype)
    ours = our_entries(oracle, args, QUICK_OURS if args.quick else None)
    peers = [] if args.no_peers else peer_entries(oracle, QUICK_PEERS if args.quick else None)
    entries = ours + peers
    if args.only:
        keep = set(args.only.split(","))
        entries = [e for e in entries if e.name in keep]
    nfes = [int(n) for n in args.nfe.split(",")]
    for e in entries:
        for nfe in nfes:
            steps = e.steps_for_nfe(nfe)
            if steps is None or steps < 1:
                continue
            repeats = args.timing_repeats if nfe == args.timing_nfe else 1
            note = e.prepare(steps) if e.prepare is not None else None
            best = None
            for _ in range(repeats):
                gen = torch.Generator(device=dev).manual_seed(args.seed + 3)
                oracle.reset_clock()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                start = clock()
                try:
                    with torch.no_grad():
                        out, used = e.run(steps, x_T, gen)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                except Exception as err:  # noqa: BLE001 - a failing peer is reported, not fatal
                    print(f"  {e.name} at NFE {nfe}: failed ({type(err).__name__}: {err})")
                    rows.append(dict(solver=e.name, library=e.library,
                                     kind="SDE" if e.stochastic else "ODE", schedule=e.schedule,
                                     nfe_target=nfe, nfe=0, steps=steps,
                                     note=f"failed: {type(err).__name__}: {str(err)[:80]}"))
                    best = None
                    break
                wall = clock() - start
                if best is None or wall - oracle.seconds < best[0] - best[1]:
                    best = (wall, oracle.seconds)
            if best is None:
                continue
            wall, model = best
            row = dict(solver=e.name, library=e.library, kind="SDE" if e.stochastic else "ODE",
                       schedule=e.schedule, nfe_target=nfe, nfe=used, steps=steps,
                       wall_s=wall, model_s=model,
                       overhead_ms_per_step=1e3 * (wall - model) / steps,
                       overhead_ms_per_nfe=1e3 * (wall - model) / max(used, 1))
            if note:
                row["note"] = note
            out = out.detach().to("cpu", torch.float64)
            if not bool(torch.isfinite(out).all()):
                row["note"] = "non-finite samples"
            elif not args.image_batch:
                if not e.stochastic:
                    row["rms_error"] = float(((out[:n_err] - ref) ** 2).mean().sqrt())
                row.update(stats_row(out, target))
            rows.append(row)
            err_s = f"{row.get('rms_error', math.nan):.3e}"
            print(f"  {e.name:28s} NFE {used:5d}  err {err_s}  var_err {row.get('var_err', math.nan):.3f}"
                  f"  time {wall:7.3f}s  overhead/step {row['overhead_ms_per_step']:.3f} ms", flush=True)
    return rows


# ---- timing side by side ---------------------------------------------------------------------------
def interleaved(fns: Dict[str, Callable[[], Optional[float]]], dev: torch.device, clock: Callable[[], float],
                repeats: int, min_seconds: float = 1.0, max_rounds: int = 50) -> Dict[str, List[float]]:
    """Time every function of ``fns`` in turn, round after round (at least ``repeats`` rounds and
    ``min_seconds`` in all, at most ``max_rounds``), after one warm-up call each, so that the load of
    a shared machine falls on all of them alike. Returns every run's time per name. A function may
    return a number of seconds to subtract from its run (the time spent inside the model)."""
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times: Dict[str, List[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()                                      # warm-up (allocations, lazy initialisation)
    spent, rounds = 0.0, 0
    while rounds < repeats or (spent < min_seconds and rounds < max_rounds):
        for name, fn in fns.items():
            sync()
            start = clock()
            inside = fn()
            sync()
            took = clock() - start
            spent += took
            times[name].append(took - (inside or 0.0))
        rounds += 1
    return times


# ---- indexed (int seed) against batch-level noise ---------------------------------------------------
NOISE_BATCHES = (1, 64, 4096)
NOISE_MODES = {
    "batch-level (torch.Generator)": lambda seed, dev: torch.Generator(device=dev).manual_seed(seed),
    "indexed (int seed)": lambda seed, dev: seed,
}


def noise_benchmark(args) -> List[Dict]:
    """The cost of batch-size-independent noise: an int seed (chunked per-index generators) against
    one torch.Generator for the batch, side by side, at several batch sizes. Two measurements:
    one noise draw alone (runs of 20 draws, per draw), and whole stochastic sampling runs on the
    fast oracle (``--noise-steps`` steps). The two kinds of noise are run alternately, at least
    ``--timing-repeats`` times each and for at least a second in all, and the least time of each
    is kept (the machine's load then affects both alike)."""
    from sde_diffusion.samplers import NoiseSource
    from sde_diffusion.samplers.base import chunk_size

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = time.process_time if dev.type == "cpu" else time.perf_counter

    def side_by_side(fns: Dict[str, Callable[[], None]]) -> Dict[str, float]:
        return {mode: min(times) for mode, times in
                interleaved(fns, dev, clock, args.timing_repeats).items()}

    batches = [int(b) for b in args.noise_batches.split(",")]
    rows: List[Dict] = []
    draws = 20

    def record(what, event, batch, best, unit_scale, unit):
        for mode, seconds in best.items():
            rows.append(dict(what=what, event="x".join(map(str, event)), chunk=chunk_size(event),
                             batch=batch, noise=mode, seconds=seconds))
            print(f"  {what:28s} {rows[-1]['event']:>8s} batch {batch:5d} {mode:30s} "
                  f"{unit_scale * seconds:9.4f} {unit}", flush=True)

    for event in [(args.dim,), (3, 32, 32)]:
        for batch in batches:
            def noise(make, batch=batch, event=event):
                src = NoiseSource(make(args.seed, dev), (batch,) + event, dtype, dev)
                for _ in range(draws):
                    src.randn()
            best = side_by_side({mode: (lambda make=make: noise(make)) for mode, make in NOISE_MODES.items()})
            record("one noise draw", event, batch, {m: t / draws for m, t in best.items()}, 1e3, "ms")
    sde = VPSDE()
    oracle = TimedMixture(random_mixture(args.dim, args.modes, seed=args.seed, sde=sde), device=dev,
                          clock=clock)
    for solver in ("euler_maruyama", "sde_dpm_solver++"):
        for batch in batches:
            def run(make, batch=batch, solver=solver):
                with torch.no_grad():
                    sample(oracle, sde, shape=(batch, args.dim), solver=solver,
                           steps=args.noise_steps, generator=make(args.seed, dev), dtype=dtype,
                           device=dev, progress=False)
            best = side_by_side({mode: (lambda make=make: run(make)) for mode, make in NOISE_MODES.items()})
            record(f"{solver}, {args.noise_steps} steps", (args.dim,), batch, best, 1.0, "s")
    return rows


# ---- per-step overhead, ours and k-diffusion's side by side ----------------------------------------
OVERHEAD_OURS = ("ddim", "dpm_solver++_2m", "dpm_solver++_3m", "unipc_3", "edm_heun", "euler_maruyama",
                 "ddim(eta=1)", "sde_dpm_solver++", "pc(rd+langevin)", "edm_heun(churn)")
# k:dpmpp_3m_sde(eta=0) is k-diffusion's sample_dpmpp_3m_sde with eta=0 (k-diffusion has no
# deterministic 3M sampler) and a no-op noise sampler, so no Brownian tree is built per run
OVERHEAD_PEERS = ("k:euler", "k:heun", "k:dpmpp_2m", "k:dpmpp_3m_sde(eta=0)", "k:euler_ancestral",
                  "k:dpmpp_2m_sde")
OVERHEAD_BATCHES = (1, 2048)
# the pairs of issue 18 (ours vs k-diffusion's sampler of the same method)
OVERHEAD_PAIRS = (("DPM-Solver++ 2M", "dpm_solver++_2m", "k:dpmpp_2m"),
                  ("DPM-Solver++ 3M", "dpm_solver++_3m", "k:dpmpp_3m_sde(eta=0)"),
                  ("EDM Heun", "edm_heun", "k:heun"),
                  ("DDIM (eta 0)", "ddim", "k:euler"),
                  ("Euler-Maruyama", "euler_maruyama", "k:euler_ancestral"),
                  ("SDE-DPM-Solver++", "sde_dpm_solver++", "k:dpmpp_2m_sde"))


def overhead_benchmark(args) -> List[Dict]:
    """The per-step overhead (run time minus the time inside the oracle, per grid step) of our
    solvers and of k-diffusion's samplers on the fast oracle at ``--timing-nfe`` NFE, at each batch
    size of ``--overhead-batches``. Every sampler runs in turn within each round (interleaved, at
    least ``--timing-repeats`` rounds and a second), so the load of a shared machine falls on all
    alike; the least and the median over the rounds are reported (their gap is the noise).
    k-diffusion is the yardstick: its samplers are the same code before and after a change of
    ours, so ``ours / k-diffusion`` compares runs made at different times."""
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = time.process_time if dev.type == "cpu" else time.perf_counter
    sde = VPSDE()
    oracle = TimedMixture(random_mixture(args.dim, args.modes, seed=args.seed, sde=sde), device=dev,
                          clock=clock)
    entries = our_entries(oracle, args, set(OVERHEAD_OURS))
    if not args.no_peers:
        entries += peer_entries(oracle, set(OVERHEAD_PEERS), libraries=("k-diffusion",))
    if args.only:
        keep = set(args.only.split(","))
        entries = [e for e in entries if e.name in keep]
    rows: List[Dict] = []
    for batch in [int(b) for b in args.overhead_batches.split(",")]:
        x_T = torch.randn(batch, args.dim, generator=torch.Generator().manual_seed(args.seed + 1),
                          dtype=torch.float64).to(dev, dtype)
        fns, steps_of, nfe_of = {}, {}, {}
        for e in entries:
            steps = e.steps_for_nfe(args.timing_nfe)
            if steps is None:
                continue

            def run(e=e, steps=steps):
                oracle.reset_clock()
                with torch.no_grad():
                    _, used = e.run(steps, x_T, torch.Generator(device=dev).manual_seed(args.seed + 3))
                nfe_of[e.name] = used
                return oracle.seconds
            fns[e.name], steps_of[e.name] = run, steps
        times = interleaved(fns, dev, clock, args.timing_repeats)
        for e in entries:
            if e.name not in times:
                continue
            per_step = sorted(1e3 * t / steps_of[e.name] for t in times[e.name])
            rows.append(dict(solver=e.name, library=e.library, batch=batch, steps=steps_of[e.name],
                             nfe=nfe_of[e.name], rounds=len(per_step),
                             overhead_ms_per_step=per_step[0],
                             overhead_ms_per_step_median=per_step[len(per_step) // 2]))
            print(f"  batch {batch:5d}  {e.name:24s} overhead/step least {per_step[0]:.4f} ms, "
                  f"median {per_step[len(per_step) // 2]:.4f} ms ({len(per_step)} rounds)", flush=True)
    return rows


def _write_csv(path: Path, cols: List[str], rows) -> None:
    """One row per dict (the ``cols`` keys; floats to 6 significant digits)."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_overhead_results(rows, args, out_dir: Path) -> List[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name
    cols = ["solver", "library", "batch", "steps", "nfe", "rounds", "overhead_ms_per_step",
            "overhead_ms_per_step_median"]
    _write_csv(out_dir / f"{stem}.csv", cols, rows)
    clock = "CPU time of the process" if args.device == "cpu" else "wall time with synchronisation"
    lines = [
        "# Per-step overhead: our solvers and k-diffusion's samplers side by side", "",
        f"`python benchmarks/samplers.py --overhead-only` on {args.device} "
        f"({torch.get_num_threads()} threads), {args.dtype}, torch {torch.__version__}; {clock}. "
        f"Overhead = run time minus the time inside the oracle, per grid step, at "
        f"{args.timing_nfe} NFE on `random_mixture({args.dim}, {args.modes}, seed={args.seed})`; "
        "every sampler runs in turn within each round; least and median over the rounds.", "",
        "| batch | solver | library | steps | overhead ms/step (least) | (median) |",
        "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['solver']} | {r['library']} | {r['steps']} | "
                     f"{r['overhead_ms_per_step']:.4f} | {r['overhead_ms_per_step_median']:.4f} |")
    lines += ["", "| batch | ours, median of the least (ms/step) | k-diffusion, median of the least | "
              "ours / k-diffusion |", "|---|---|---|---|"]
    for batch in sorted({r["batch"] for r in rows}):
        ours = sorted(r["overhead_ms_per_step"] for r in rows if r["batch"] == batch and r["library"] == "ours")
        peer = sorted(r["overhead_ms_per_step"] for r in rows if r["batch"] == batch and r["library"] != "ours")
        if ours and peer:
            a, b = ours[len(ours) // 2], peer[len(peer) // 2]
            lines.append(f"| {batch} | {a:.4f} | {b:.4f} | {a / b:.2f} |")
    least = {(r["solver"], r["batch"]): r["overhead_ms_per_step"] for r in rows}
    batches = sorted({r["batch"] for r in rows})
    lines += ["", "Pairs, ours / k-diffusion (least ms/step; our stochastic solvers with batch-level "
              "noise, a torch.Generator, as k-diffusion draws it):", "",
              "| pair (ours vs k-diffusion) | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|" + "---|" * len(batches)]
    for label, ours_name, peer_name in OVERHEAD_PAIRS:
        cells = [f"{least[ours_name, b] / least[peer_name, b]:.2f}"
                 if (ours_name, b) in least and (peer_name, b) in least else "" for b in batches]
        lines.append(f"| {label} vs `{peer_name[2:]}` | " + " | ".join(cells) + " |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return lines


def write_noise_results(rows, args, out_dir: Path) -> List[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name
    cols = ["what", "event", "chunk", "batch", "noise", "seconds"]
    _write_csv(out_dir / f"{stem}.csv", cols, rows)
    clock = "CPU time of the process" if args.device == "cpu" else "wall time with synchronisation"
    lines = [
        "# Indexed noise (int seed) against batch-level noise (torch.Generator)", "",
        f"`python benchmarks/samplers.py --noise-only` on {args.device} "
        f"({torch.get_num_threads()} threads), {args.dtype}, torch {torch.__version__}; {clock}; "
        f"the two kinds of noise run alternately, the least time of each (at least "
        f"{args.timing_repeats} runs and one second). An int seed gives every sample noise that "
        "depends on its index only (chunks of consecutive samples, one generator each; "
        "docs/samplers.md, 'Seeds'); a torch.Generator draws the whole batch at once.", "",
        "| measured | event | chunk | batch | batch-level | indexed | indexed / batch-level |",
        "|---|---|---|---|---|---|---|"]
    keyed = {(r["what"], r["event"], r["batch"], r["noise"]): r for r in rows}
    seen = []
    for r in rows:
        key = (r["what"], r["event"], r["batch"])
        if key in seen:
            continue
        seen.append(key)
        plain = keyed[key + ("batch-level (torch.Generator)",)]["seconds"]
        indexed = keyed[key + ("indexed (int seed)",)]["seconds"]
        unit, scale = ("ms", 1e3) if r["what"] == "one noise draw" else ("s", 1.0)
        lines.append(f"| {r['what']} | {r['event']} | {r['chunk']} | {r['batch']} | "
                     f"{scale * plain:.4g} {unit} | {scale * indexed:.4g} {unit} | "
                     f"{indexed / plain:.2f} |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return lines


# ---- reporting --------------------------------------------------------------------------------------
def best_by_nfe(rows, library_pred, nfe_target):
    cands = [r for r in rows if library_pred(r["library"]) and r["kind"] == "ODE"
             and r["nfe_target"] == nfe_target and "rms_error" in r]
    return min(cands, key=lambda r: r["rms_error"]) if cands else None


def write_results(rows, args, out_dir: Path, elapsed: float):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name
    cols = ["solver", "library", "kind", "schedule", "nfe_target", "nfe", "steps", "rms_error",
            "weight_tv", "mean_err", "var_err", "wall_s", "model_s", "overhead_ms_per_step",
            "overhead_ms_per_nfe", "note"]
    _write_csv(out_dir / f"{stem}.csv", cols, rows)
    nfes = [int(n) for n in args.nfe.split(",")]
    kind = "image-batch timing" if args.image_batch else ("quick" if args.quick else "full")
    lines = [f"# Sampler benchmark ({kind} run)", "",
             f"`python benchmarks/samplers.py{' --quick' if args.quick else ''}` on {args.device} "
             f"({torch.get_num_threads()} threads), {args.dtype}, torch {torch.__version__}; "
             f"{elapsed / 60:.1f} min wall. Data: "
             + (f"`random_mixture((3, 32, 32), {args.modes}, seed={args.seed})`, batch {args.image_batch} "
                "(image-shaped, for timing only) " if args.image_batch else
                f"`random_mixture({args.dim}, {args.modes}, seed={args.seed})`, batch {args.batch} "
                f"(error over the first {min(args.error_batch, args.batch)} against the exact flow map) ")
             + "under VPSDE (beta 0.1 -> 20), T = 1 -> eps = 1e-3. "
             "How the peers are driven: docs/samplers.md (Benchmark) and benchmarks/peers.py.", ""]
    if not args.image_batch:
        lines += ["## Deterministic solvers: RMS error against the exact flow map", "",
                  "| solver | library | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|---|---|" + "---|" * len(nfes)]
        names = []
        for r in rows:
            if r["kind"] == "ODE" and (r["solver"], r["library"]) not in names:
                names.append((r["solver"], r["library"]))
        for name, lib in names:
            cells = []
            for n in nfes:
                rr = [r for r in rows if r["solver"] == name and r["nfe_target"] == n and "rms_error" in r]
                failed = any(r["solver"] == name and r["nfe_target"] == n and
                             str(r.get("note", "")).startswith("failed") for r in rows)
                cells.append(f"{rr[0]['rms_error']:.2e}" + (f" ({rr[0]['nfe']})" if rr[0]['nfe'] != n else "")
                             if rr else ("failed" if failed else "-"))
            sched = next(r["schedule"] for r in rows if r["solver"] == name)
            lines.append(f"| {name} | {lib} | {sched} | " + " | ".join(cells) + " |")
        notes = sorted({f"{r['solver']} at NFE {r['nfe_target']}: {r['note']}" for r in rows
                        if str(r.get("note", "")).startswith("failed")})
        lines += ["", "(NFE actually spent in parentheses where it differs from the budget.)"]
        lines += [""] + [f"- {n}" for n in notes] if notes else []
        lines += ["",
                  "## Target: our best vs the best peer (deterministic)", "",
                  "Ours on any grid, including `optimize_grid` (fitted once per budget on pilot "
                  "noise, cost below), and ours on the fixed grids only.", "",
                  "| NFE | ours best | error | ours best, fixed grid | error | peer best | error | "
                  "ours/peer | fixed-grid ours/peer |", "|---|---|---|---|---|---|---|---|---|"]
        fixed = [r for r in rows if r["schedule"] != "optimize_grid from focus"]
        for n in nfes:
            a = best_by_nfe(rows, lambda lib: lib == "ours", n)
            f = best_by_nfe(fixed, lambda lib: lib == "ours", n)
            b = best_by_nfe(rows, lambda lib: lib not in ("ours", "-"), n)
            if a and b and f:
                lines.append(f"| {n} | {a['solver']} | {a['rms_error']:.2e} | {f['solver']} | "
                             f"{f['rms_error']:.2e} | {b['solver']} | {b['rms_error']:.2e} | "
                             f"{a['rms_error'] / b['rms_error']:.2f} | {f['rms_error'] / b['rms_error']:.2f} |")
        tuned = [f"- {r['solver']} at NFE {r['nfe_target']}: {r['note']}" for r in rows
                 if str(r.get("note", "")).startswith("grid fitted")]
        if tuned:
            lines += ["", "Cost of the optimized grids (once per budget, not counted in the NFE):", ""] + tuned
        lines += ["", "## Sample statistics against p_eps (all solvers)", "",
                  "Largest per-mode variance error `max_k |var_k/var_true - 1|`, then weight TV and "
                  "the largest per-mode mean error (in mode stds), per NFE.", "",
                  "| solver | kind | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|---|" + "---|" * len(nfes)]
        seen = []
        for r in rows:
            if (r["solver"], r["library"]) in seen:
                continue
            seen.append((r["solver"], r["library"]))
            cells = []
            for n in (nfes if r["solver"] != "exact p_eps samples" else [0]):
                rr = [q for q in rows if q["solver"] == r["solver"] and q["library"] == r["library"]
                      and q["nfe_target"] == n and "var_err" in q]
                cells.append(f"{rr[0]['var_err']:.3f} / {rr[0]['weight_tv']:.3f} / {rr[0]['mean_err']:.2f}"
                             if rr else "-")
            if r["solver"] == "exact p_eps samples":
                cells = cells + [""] * (len(nfes) - 1)
            lines.append(f"| {r['solver']} | {r['kind']} | " + " | ".join(cells) + " |")
    lines += ["", "## Time", "",
              f"Overhead = run time minus time inside the oracle, at NFE {args.timing_nfe} (the "
              f"least of {args.timing_repeats} repeats), per step and per NFE; model time per NFE "
              "for scale. Times are " + ("CPU time of the process (one torch thread: the time "
              "spent, steady on a shared machine)" if args.device == "cpu" else
              "wall times with device synchronisation") + ".", "",
              "| solver | library | NFE/step | overhead ms/step | overhead ms/NFE | model ms/NFE | "
              "overhead / model | run s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["nfe_target"] != args.timing_nfe or "wall_s" not in r:
            continue
        lines.append(f"| {r['solver']} | {r['library']} | {r['nfe'] / r['steps']:.3g} | "
                     f"{r['overhead_ms_per_step']:.3f} | {r['overhead_ms_per_nfe']:.3f} | "
                     f"{1e3 * r['model_s'] / max(r['nfe'], 1):.3f} | "
                     f"{(r['wall_s'] - r['model_s']) / max(r['model_s'], 1e-12):.1%} | {r['wall_s']:.3f} |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if not args.image_batch:
        plot(rows, out_dir / f"{stem}_error_vs_nfe.png")
    return lines


def plot(rows, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib missing; no plot")
        return
    fig, ax = plt.subplots(figsize=(9, 6.5))
    names = []
    for r in rows:
        if r["kind"] == "ODE" and "rms_error" in r and (r["solver"], r["library"]) not in names:
            names.append((r["solver"], r["library"]))
    styles = {"ours": "-", "k-diffusion": "--", "diffusers": ":"}
    colors = plt.cm.tab20.colors
    for idx, (name, lib) in enumerate(names):
        rr = sorted((r for r in rows if r["solver"] == name and r["library"] == lib and "rms_error" in r),
                    key=lambda r: r["nfe"])
        ax.loglog([r["nfe"] for r in rr], [r["rms_error"] for r in rr], styles.get(lib, "-"),
                  color=colors[idx % len(colors)],
                  marker="o", ms=3, label=f"{name}" + ("" if lib == "ours" else f" [{lib}]"),
                  lw=2 if lib == "ours" else 1)
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMS error vs exact flow map")
    ax.set_title("Probability-flow ODE solvers on a 64-D 8-mode oracle (VP)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a < 2 min smoke run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--modes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2048, help="samples per run (statistics)")
    ap.add_argument("--error-batch", type=int, default=2048,
                    help="samples compared with the exact flow map (default: all; the RMS error at "
                         "10 NFE is dominated by the ~0.4%% of samples that end in another mode, "
                         "so fewer make it noisy)")
    ap.add_argument("--pilot", type=int, default=2048,
                    help="pilot samples for the optimize_grid rows (their noise is not x_T's)")
    ap.add_argument("--optimize-max-nfe", type=int, default=20,
                    help="optimize_grid rows only at budgets up to this NFE")
    ap.add_argument("--nfe", default=",".join(map(str, NFES)))
    ap.add_argument("--image-batch", type=int, default=0,
                    help="B > 0: time the samplers on a (B, 3, 32, 32) mixture (no errors)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated solver names to run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steadier timings on a shared machine; 0: torch's default)")
    ap.add_argument("--timing-nfe", type=int, default=100, help="NFE budget whose runs are timed repeatedly")
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default="",
                    help="output file stem (default samplers[_quick|_image|_noise])")
    ap.add_argument("--noise-only", action="store_true",
                    help="only measure indexed (int seed) against batch-level noise, side by side; "
                         "writes samplers_noise.{md,csv} (a few minutes)")
    ap.add_argument("--noise-batches", default=",".join(map(str, NOISE_BATCHES)),
                    help="batch sizes of --noise-only")
    ap.add_argument("--noise-steps", type=int, default=100,
                    help="steps of the sampling runs of --noise-only")
    ap.add_argument("--overhead-only", action="store_true",
                    help="only measure the per-step overhead of our solvers and k-diffusion's "
                         "samplers, interleaved; writes samplers_overhead.{md,csv} (a few minutes)")
    ap.add_argument("--overhead-batches", default=",".join(map(str, OVERHEAD_BATCHES)),
                    help="batch sizes of --overhead-only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for only, name, measure, write in (
            (args.overhead_only, "samplers_overhead", overhead_benchmark, write_overhead_results),
            (args.noise_only, "samplers_noise", noise_benchmark, write_noise_results)):
        if only:   # a timing-only mode: interleaved repeats, its own results file
            args.name = args.name or name
            args.timing_repeats = max(args.timing_repeats, 7)
            lines = write(measure(args), args, Path(args.out))
            print("\n".join(lines))
            print(f"wrote {args.out}/{args.name}.md, .csv")
            return
    if args.quick:
        args.batch, args.error_batch = min(args.batch, 1024), min(args.error_batch, 256)
        args.pilot, args.optimize_max_nfe = min(args.pilot, 512), min(args.optimize_max_nfe, 10)
        if args.nfe == ",".join(map(str, NFES)):
            args.nfe = "10,20,50,100"
    if args.image_batch and args.nfe == ",".join(map(str, NFES)):
        args.nfe = "20,100"
    if str(args.timing_nfe) not in args.nfe.split(","):
        args.timing_nfe = int(args.nfe.split(",")[-1])
    if not args.name:
        args.name = "samplers" + ("_quick" if args.quick else "") + ("_image" if args.image_batch else "")
    start = time.perf_counter()
    rows = run_benchmark(args)
    lines = write_results(rows, args, Path(args.out), time.perf_counter() - start)
    print("\n".join(lines))
    print(f"wrote {args.out}/{args.name}.md, .csv" + ("" if args.image_batch else ", _error_vs_nfe.png"))


if __name__ == "__main__":
    main()
