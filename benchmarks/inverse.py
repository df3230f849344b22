"""Inverse-problem benchmark (issue 13): every method of ``sde_diffusion.inverse`` and peers against
the EXACT posterior of a Gaussian-mixture prior, with the exact denoiser (the oracle) as the model.

    python benchmarks/inverse.py                  # the default plan (results/inverse*.{md,csv})
    python benchmarks/inverse.py --quick          # a smoke run (d_x 8, one seed, NFE 20)
    python benchmarks/inverse.py --digits --checkpoint /work/runs/digits_cond  # the digits part

Problems
--------
- ``gmm25``: the Gaussian-mixture experiment of MCGdiff (Cardoso, Janati, Le Corff & Moulines 2023,
  Sec. 4.1 and their script ``viz_gaussian.py``): 25 components with identity covariance, means
  ``8 (i, j, i, j, ...)`` for ``i, j`` in -2..2, weights ``w_k ~ z_k^2`` normalised; ``A`` a
  Gaussian ``d_y x d_x`` matrix whose singular values are replaced by sorted ``U(0, 1)`` draws;
  ``sigma_y = u * max(s)`` with ``u ~ U(0, 1)``; ``y = A x* + sigma_y n`` with ``x*`` from the prior.
  **Scale.** Everything (means, component std, ``sigma_y``) is multiplied by ``1/16`` here, so the
  posterior is theirs scaled by 1/16 and a sliced Wasserstein distance times 16 is on their scale
  (the distance is 1-homogeneous). Why not their scale: the methods and the peers are written for
  image-scale data (deepinv's DPS clips the denoised estimate to [-1, 1], step sizes such as DPS's
  ``zeta`` are tuned for it); at 1/16 the data lie in [-1, 1] (the largest mean coordinate is 1).
  The diffusion is VP (beta 0.1..20, the DDPM schedule of their script in continuous time).
- ``gmm64``: the sampler benchmark's 64-d mixture (``random_mixture(64, 8, seed=0)``, as
  benchmarks/samplers.py and the ``gmm64`` oracle) observed through a half mask (32 of 64), a
  colorization-like operator (the 64 numbers as a 4-channel 4x4 image, the channel mean observed)
  and a 2x2 block average (the 64 numbers as an 8x8 image), each as a dense operator, sigma_y 0.05.

Metric: sliced Wasserstein-2 (256 directions, ``metrics.sliced_wasserstein``) between ``--n``
method samples and ``--n-ref`` exact-posterior samples; the floor is the distance of ``--n`` other
exact samples (the sampling noise of the metric itself); "prior" the distance of prior samples.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sde_diffusion import VPSDE, GaussianMixture, random_mixture, solve_inverse  # noqa: E402
from sde_diffusion.inverse import (BlockAverage, Colorization, Dense, LinearOperator,  # noqa: E402
                                   half_mask, observe)
from sde_diffusion.inverse.posterior import exact_posterior  # noqa: E402
from sde_diffusion.metrics import sliced_wasserstein  # noqa: E402
from sde_diffusion.reports import write_csv, write_markdown_table  # noqa: E402

RESULTS = os.path.join(HERE, "results")
SCALE = 1.0 / 16.0
#: MCGdiff's reported sliced Wasserstein at d_x = 8, d_y = 1, 2, 4 (their scale; Table 1)
REPORTED = {"dps": (27.2, 18.7, 12.4), "ddrm": (29.7, 13.6, 0.49), "mcgdiff 128": (5.2, 4.3, 0.18)}


# ---- problems ---------------------------------------------------------------------------------------
class Problem:
    """A prior, an operator, one observation and its exact posterior with reference samples."""

    def __init__(self, name: str, prior: GaussianMixture, op: LinearOperator, y: torch.Tensor,
                 sigma_y: float, n: int, n_ref: int, seed: int):
        self.name, self.prior, self.op, self.y, self.sigma_y = name, prior, op, y, sigma_y
        start = time.process_time()
        self.post = exact_posterior(prior, op, y, sigma_y)
        g = torch.Generator().manual_seed(10_000 + seed)
        self.ref = self.post.sample(n_ref, generator=g, dtype=torch.float64)
        self.floor = sliced_wasserstein(self.post.sample(n, generator=g, dtype=torch.float64), self.ref)
        self.prior_dist = sliced_wasserstein(prior.sample(n, generator=g, dtype=torch.float64), self.ref)
        self.setup_s = time.process_time() - start

    def distance(self, x: torch.Tensor) -> float:
        return sliced_wasserstein(x.detach().double(), self.ref)


def gmm25_prior(d_x: int, seed: int) -> GaussianMixture:
    """MCGdiff's 25-component prior at ``SCALE``: identity covariances, means on a grid of spacing 8
    repeated over the coordinate pairs, weights ``z^2`` normalised (``z`` standard normal)."""
    g = torch.Generator().manual_seed(seed)
    ij = torch.tensor([(i, j) for i in range(-2, 3) for j in range(-2, 3)], dtype=torch.float64)
    means = 8.0 * SCALE * ij.repeat(1, d_x // 2)
    weights = torch.randn(25, generator=g, dtype=torch.float64) ** 2
    return GaussianMixture(weights / weights.sum(), means,
                           torch.full((25,), SCALE, dtype=torch.float64), VPSDE())


def gmm25_problem(d_x: int, d_y: int, seed: int, n: int, n_ref: int) -> Problem:
    """Their measurement model: a Gaussian ``A`` with singular values replaced by sorted ``U(0, 1)``
    draws, ``sigma_y = u max(s)`` (times ``SCALE``), ``x*`` from the prior."""
    prior = gmm25_prior(d_x, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    M = torch.randn(d_y, d_x, generator=g, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    s = torch.rand(d_y, generator=g, dtype=torch.float64).sort(descending=True).values
    A = U @ torch.diag(s) @ Vh
    sigma_y = float(torch.rand(1, generator=g, dtype=torch.float64)) * float(s.max()) * SCALE
    op = Dense(A)
    x_star = prior.sample(1, generator=g, dtype=torch.float64)
    y = observe(op, x_star, sigma_y, generator=seed)[0]
    return Problem(f"gmm25 d_x={d_x} d_y={d_y} seed={seed}", prior, op, y, sigma_y, n, n_ref, seed)


def gmm64_problem(kind: str, seed: int, n: int, n_ref: int, sigma_y: float = 0.05) -> Problem:
    """The 64-d benchmark mixture through a mask, a colorization-like or a block-average operator."""
    prior = random_mixture(64, 8, seed=0, sde=VPSDE())
    if kind == "mask":
        M = torch.eye(64, dtype=torch.float64)[half_mask((64,), "lower-half")]
    elif kind == "colorization":
        M = Colorization((4, 4, 4)).matrix()
    elif kind == "downsample":
        M = BlockAverage(2, (1, 8, 8)).matrix()
    else:
        raise ValueError(f"unknown gmm64 operator {kind!r}")
    op = Dense(M)
    g = torch.Generator().manual_seed(2000 + seed)
    y = observe(op, prior.sample(1, generator=g, dtype=torch.float64), sigma_y, generator=seed)[0]
    return Problem(f"gmm64 {kind} seed={seed}", prior, op, y, sigma_y, n, n_ref, seed)


# ---- methods ----------------------------------------------------------------------------------------
def ours(problem: Problem, method: str, nfe: int, n: int, seed: int, **options) -> Tuple[torch.Tensor, int]:
    r = solve_inverse(problem.prior, problem.op, problem.y, method=method, n=n, nfe=nfe,
                      sigma_y=problem.sigma_y, generator=seed, **options)
    return r.samples, r.nfe


def data_std(mix: GaussianMixture) -> float:
    return float(mix.covariance().diagonal().mean().sqrt())


def our_methods(problem: Problem) -> Dict[str, Callable]:
    """Each ``label -> fn(nfe, n, seed) -> (samples, nfe)``; the options are the docs' choices."""
    sd = data_std(problem.prior)
    table = {
        "dps": dict(method="dps", zeta=0.1),
        # the score-form guidance: exact for Gaussian data and better at few steps with the exact
        # denoiser; the recorded tables were made with it (trained networks need the default)
        "pigdm": dict(method="pigdm", sigma_data=sd, guidance="score"),
        # the same guided score through SDE-DPM-Solver++(2M) on the focus grid (solver contract)
        "pigdm sde++": dict(method="pigdm", sigma_data=sd, solver="sde_dpm_solver++", grid="focus"),
        "ddrm": dict(method="ddrm"),
        "ddnm_plus": dict(method="ddnm_plus"),
        "ddnm": dict(method="ddnm"),
        "repaint": dict(method="repaint", jump_length=5, resample=2),
        "score_sde": dict(method="score_sde"),
    }
    out = {}
    for label, kw in table.items():
        out[label] = (lambda nfe, n, seed, kw=kw: ours(problem, nfe=nfe, n=n, seed=seed, **kw))
    return out


#: the SMC rows, each run at every ``--particles`` count: MCGdiff; TDS with our PiGDM row's options;
#: "tds2", TDS with the SDE-DPM-Solver++(2M) kernel on the focus grid (as the "pigdm sde++" row)
SMC = ("mcgdiff", "tds", "tds2")


def smc_entries(problem: Problem, particles: int) -> List[Tuple[str, Callable]]:
    sd = data_std(problem.prior)
    options = {"mcgdiff": ("mcgdiff", {}), "tds": ("tds", dict(sigma_data=sd, guidance="score")),
               "tds2": ("tds", dict(sigma_data=sd, guidance="score", order=2, grid="focus"))}
    return [(f"{m} {particles}", lambda nfe, n, seed, m=m: ours(problem, options[m][0], nfe, n, seed,
                                                               particles=particles, **options[m][1]))
            for m in SMC]


def is_smc(label: str) -> bool:
    return label.split()[0] in SMC


# ---- peers ------------------------------------------------------------------------------------------
def diffusers_repaint(problem: Problem, jump_length: int = 5, resample: int = 2) -> Optional[Callable]:
    """diffusers' ``RePaintScheduler`` (Lugmayr et al. 2022) in the operator's spectral basis
    ``x' = V^T x``, where the observation is a mask of the first ``k`` coordinates with values
    ``(U^T y)_i / s_i`` (RePaint ignores ``sigma_y``, as ours). The prior rotated by ``V^T`` is the
    same isotropic mixture with rotated means; the model handed to the scheduler is the exact
    ``eps`` at the scheduler's own ``alpha_bar_t`` (the VP time with that log-SNR)."""
    try:
        from diffusers import RePaintScheduler
    except ImportError:
        return None
    prior, op = problem.prior, problem.op
    sde = prior.sde
    svd = op.svd()
    k = int((svd.singular_values > 0).sum())
    d = op.in_dim
    V = svd.V(torch.eye(d, dtype=torch.float64)).T            # columns: V's basis vectors (x = V x')
    rotated = GaussianMixture(prior.weights, prior.means @ V, prior.stds, sde)
    y_bar = svd.Ut(problem.y[None].double())[0, :k] / svd.singular_values[:k].double()

    def run(nfe: int, n: int, seed: int):
        sched = RePaintScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                 beta_schedule="linear", eta=0.0)
        steps = _repaint_steps(sched, nfe, jump_length, resample)
        if steps is None:
            return None, 0
        sched.set_timesteps(steps, jump_length=jump_length, jump_n_sample=resample)
        abar = sched.alphas_cumprod.double()
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        known = torch.zeros(n, d, dtype=torch.float64)
        known[:, :k] = y_bar
        mask = torch.zeros(n, d, dtype=torch.float64)
        mask[:, :k] = 1.0
        calls, t_last = 0, sched.timesteps[0] + 1
        for t in sched.timesteps:
            if t < t_last:
                a = abar[t]
                tau = sde.t_of_lambda(0.5 * torch.log(a / (1 - a))).double()
                eps = rotated.eps(x, tau.expand(n))
                calls += 1
                x = sched.step(eps, t, x, known, mask, generator=g).prev_sample
            else:
                x = sched.undo_step(x, t_last, generator=g)
            t_last = t
        return x @ V.T, calls

    return run


#: modules deepinv imports at load time that its DPS and DDRM never use, and that cannot be
#: installed here: torchvision's PyPI wheels need another torch build than ours (2.13 CPU)
DEEPINV_STUBBED = ("torchvision", "natsort", "h5py")


def import_deepinv():
    """``deepinv`` (``pip install --no-deps deepinv``), with empty stand-ins for the modules of
    :data:`DEEPINV_STUBBED` when they are missing (any attribute of a stand-in is an inert dummy).
    None when deepinv is not installed."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("deepinv") is None:
        return None
    missing = {m for m in DEEPINV_STUBBED if importlib.util.find_spec(m) is None}
    if missing and not any(getattr(f, "_inverse_bench_stub", False) for f in sys.meta_path):
        class Dummy:
            def __init__(self, *a, **k):
                pass

            def __call__(self, *a, **k):
                return Dummy()

            def __getattr__(self, name):
                return Dummy()

            def __mro_entries__(self, bases):
                return (object,)

        class Stub(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return Dummy()

        class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            _inverse_bench_stub = True

            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in missing:
                    return importlib.machinery.ModuleSpec(name, self, is_package=True)
                return None

            def create_module(self, spec):
                m = Stub(spec.name)
                m.__path__, m.__version__ = [], "0.0.0"
                return m

            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, Finder())
    import deepinv
    return deepinv


def _exact_denoiser(dinv, prior: GaussianMixture, noise_factor: float = 1.0):
    """deepinv's ``Denoiser`` interface ``D(x, sigma)`` (``x = x0 + noise``, VE units) answered by
    the oracle: ``E[x0 | x]`` for noise of standard deviation ``noise_factor * sigma``, computed at
    the VP time whose ``sigma_t / alpha_t`` equals it."""
    sde = prior.sde

    class Exact(dinv.models.Denoiser):
        calls = 0                                      # the peers' NFE

        def forward(self, x, sigma, *args, **kwargs):
            self.calls += 1
            x = x.double()
            level = noise_factor * torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
            tau = sde.t_of_lambda(-torch.log(level)).double().expand(x.shape[0])
            a = sde.alpha(tau).reshape(-1, *([1] * (x.ndim - 1)))
            return prior.x0(a * x, tau)

    return Exact()


def deepinv_peers(problem: Problem) -> Dict[str, Callable]:
    """deepinv's DPS (``DPS``: VP, DDPM solver, ``num_steps = nfe``, ``weight`` = our ``zeta``,
    no [-1, 1] <-> [0, 1] wrapping) and DDRM (``DDRM`` with the operator's SVD as a
    ``DecomposablePhysics`` and the noise levels ``sigma_t / alpha_t`` of our uniform VP grid), the
    exact denoiser handed to both. deepinv's DDRM adds noise of standard deviation
    ``sigma / sqrt(2)`` at level ``sigma`` (its ``randn / sqrt(2)``), so its denoiser is the exact
    one for that noise, and its levels are ours times ``sqrt(2)``."""
    dinv = import_deepinv()
    if dinv is None:
        return {}
    prior, op, sde = problem.prior, problem.op, problem.prior.sde
    M = op.matrix().double()
    sigma_y = problem.sigma_y
    y1 = problem.y.double()
    noise = dinv.physics.GaussianNoise(sigma=sigma_y)
    linear = dinv.physics.LinearPhysics(A=lambda x: x.double() @ M.T, A_adjoint=lambda y: y.double() @ M,
                                        noise_model=noise)
    U, S, Vh = torch.linalg.svd(M, full_matrices=True)
    k = S.shape[0]
    d = M.shape[1]
    mask = torch.zeros(1, d, dtype=torch.float64)
    mask[0, :k] = S

    def u_adj(y):
        return y.double() @ U

    def u_fwd(z):
        return z.double() @ U.T

    def v_fwd(z):
        return z.double() @ Vh

    def v_adj(x):
        return x.double() @ Vh.T

    # y = U diag(S) V^T x: DecomposablePhysics's A(x) = U(mask * V^T(x)), with V^T x in R^d and
    # U acting on the first d_y spectral coordinates (padded)
    def U_pad(z):
        return u_fwd(z[:, :k])

    def Ut_pad(y):
        out = torch.zeros(y.shape[0], d, dtype=torch.float64)
        out[:, :k] = u_adj(y)
        return out

    decomposable = dinv.physics.DecomposablePhysics(U=U_pad, U_adjoint=Ut_pad, V=v_fwd, V_adjoint=v_adj,
                                                    mask=mask, noise_model=noise)

    def dps(nfe, n, seed, zeta=0.1):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        den = _exact_denoiser(dinv, prior)
        sampler = dinv.sampling.DPS(den, num_steps=nfe, weight=zeta, minus_one_one=False,
                                    dtype=torch.float64, rng=g)
        x = sampler(y1[None].expand(n, -1).float(), linear, x_init=(n, d), seed=seed)
        return x.double(), den.calls

    def ddrm(nfe, n, seed):
        torch.manual_seed(seed)
        t = torch.linspace(sde.T, sde.eps, nfe, dtype=torch.float64)
        levels = (sde.sigma(t) / sde.alpha(t)).double() * math.sqrt(2.0)
        den = _exact_denoiser(dinv, prior, 1 / math.sqrt(2.0))
        sampler = dinv.sampling.DDRM(den, sigmas=levels.numpy())
        x = sampler(y1[None].expand(n, -1).double(), decomposable, seed=seed)
        return x.double(), den.calls

    return {"peer: deepinv dps": dps, "peer: deepinv ddrm": ddrm}


def _repaint_steps(sched, nfe: int, jump_length: int, resample: int) -> Optional[int]:
    """The largest number of inference steps whose RePaint schedule makes at most ``nfe`` calls."""
    best = None
    for steps in range(1, min(nfe, 1000) + 1):
        sched.set_timesteps(steps, jump_length=jump_length, jump_n_sample=resample)
        ts = list(sched.timesteps)
        calls = sum(1 for a, b in zip([ts[0] + 1] + ts[:-1], ts) if b < a)
        if calls <= nfe:
            best = steps
        else:
            break
    return best


# ---- the run ----------------------------------------------------------------------------------------
def run_problem(problem: Problem, nfes, n: int, particles, rows: List[dict], seed: int,
                peers: bool, smc_nfes, progress) -> None:
    entries = list(our_methods(problem).items())
    entries += [e for p in particles for e in smc_entries(problem, p)]
    if peers:
        rp = diffusers_repaint(problem)
        if rp is not None:
            entries.append(("peer: diffusers repaint", rp))
        entries += list(deepinv_peers(problem).items())
    base = {"problem": problem.name, "floor": problem.floor, "prior": problem.prior_dist,
            "sigma_y": problem.sigma_y}
    for nfe in nfes:
        for label, fn in entries:
            if is_smc(label) and nfe not in smc_nfes:
                continue
            start = time.process_time()
            x, used = fn(nfe, n, seed)
            cpu = time.process_time() - start
            if x is None:
                continue
            dist = problem.distance(x)
            rows.append({**base, "method": label, "nfe_budget": nfe, "nfe": used, "sw": dist,
                         "cpu_s": cpu})
            progress(f"{problem.name:32s} {label:26s} nfe {nfe:5d} ({used:5d}) sw {dist:.4f} "
                     f"floor {problem.floor:.4f} [{cpu:.1f} s]")


def summarize(rows: List[dict], group) -> List[dict]:
    """Mean distance per (group(problem), method, nfe_budget) over the random problems."""
    out: Dict[tuple, dict] = {}
    for r in rows:
        key = (group(r["problem"]), r["method"], r["nfe_budget"])
        e = out.setdefault(key, {"problem": key[0], "method": key[1], "nfe_budget": key[2],
                                 "sw": [], "floor": [], "prior": [], "nfe": r["nfe"], "cpu_s": []})
        for f in ("sw", "floor", "prior", "cpu_s"):
            e[f].append(r[f])
    table = []
    for e in out.values():
        k = len(e["sw"])
        table.append({**e, "problems": k, **{f: sum(e[f]) / k for f in ("sw", "floor", "prior", "cpu_s")}})
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", default="8,80,800", help="d_x of the gmm25 problems")
    p.add_argument("--dys", default="1,2,4", help="d_y of the gmm25 problems")
    p.add_argument("--seeds", type=int, default=3, help="random problems per size")
    p.add_argument("--nfe", default="20,50,100,1000")
    p.add_argument("--smc-nfe", default=None, help="NFE budgets at which the SMC methods (MCGdiff, TDS) run (default all)")
    p.add_argument("--particles", default="4,16,64")
    p.add_argument("--n", type=int, default=1000, help="samples per method")
    p.add_argument("--n-ref", type=int, default=1000, help="exact posterior samples")
    p.add_argument("--gmm64", default="mask,colorization,downsample")
    p.add_argument("--max-dim-1000", type=int, default=8,
                   help="NFE 1000 only for d_x up to this (the most expensive cells)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--quick", action="store_true", help="d_x 8, d_y 1, one seed, NFE 20, n 200")
    p.add_argument("--out", default=os.path.join(RESULTS, "inverse"))
    p.add_argument("--digits", action="store_true", help="run the digits part instead")
    p.add_argument("--checkpoint", default=None, help="digits: a checkpoint file or workdir")
    p.add_argument("--digits-n", type=int, default=100, help="digits: test digits (default 100)")
    p.add_argument("--digits-nfe", type=int, default=50, help="digits: evaluations (default 50)")
    p.add_argument("--digits-methods", default=",".join(DIGIT_METHODS))
    args = p.parse_args(argv)
    if args.digits:
        return run_digits(args)
    if args.quick:
        args.dims, args.dys, args.seeds, args.nfe, args.n, args.n_ref = "8", "1", 1, "20", 200, 200
        args.gmm64 = "mask"
    torch.set_num_threads(1)
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    nfes, particles = ints(args.nfe), ints(args.particles)
    smc_nfes = ints(args.smc_nfe) if args.smc_nfe else nfes
    rows: List[dict] = []
    say = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.process_time()
    for d_x in ints(args.dims):
        for d_y in ints(args.dys):
            for seed in range(args.seeds):
                prob = gmm25_problem(d_x, d_y, seed, args.n, args.n_ref)
                use = [f for f in nfes if f < 1000 or d_x <= args.max_dim_1000]
                run_problem(prob, use, args.n, particles, rows, seed, not args.no_peers,
                            smc_nfes, say)
    for kind in [k for k in args.gmm64.split(",") if k]:
        for seed in range(args.seeds):
            prob = gmm64_problem(kind, seed, args.n, args.n_ref)
            run_problem(prob, nfes, args.n, particles, rows, seed, not args.no_peers, smc_nfes, say)
    say(f"total CPU {time.process_time() - t0:.0f} s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_csv(rows, args.out + ".csv")
    group = lambda name: name.rsplit(" seed=", 1)[0]  # noqa: E731
    summary = summarize(rows, group)
    write_csv(summary, args.out + "_summary.csv")
    write_report(summary, rows, args.out + ".md", args)
    return 0


def write_report(summary: List[dict], rows: List[dict], path: str, args) -> None:
    """The markdown: a table per problem size (methods x NFE, mean distance; floor and prior), the
    targets (best of ours vs best peer at equal NFE; each SMC method falling with particles and,
    at 64, below every non-SMC method on every problem) and MCGdiff's reported numbers beside ours."""
    lines = ["# Inverse problems against the exact posterior (benchmarks/inverse.py)", "",
             f"Command: `python benchmarks/inverse.py {' '.join(sys.argv[1:])}`; sliced W2 of "
             f"{args.n} samples to {args.n_ref} exact-posterior samples, mean over {args.seeds} "
             f"random problems per size; gmm25 at scale 1/16 (x16 for MCGdiff's scale).", ""]
    problems = sorted({s["problem"] for s in summary}, key=_problem_key)
    nfes = sorted({s["nfe_budget"] for s in summary})
    methods = list(dict.fromkeys(s["method"] for s in summary))
    for prob in problems:
        sel = [s for s in summary if s["problem"] == prob]
        floor, prior = sel[0]["floor"], sel[0]["prior"]
        lines += [f"## {prob}", "", f"floor (exact vs exact) {floor:.4f}, prior {prior:.4f}", "",
                  "| method | " + " | ".join(f"NFE {f}" for f in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for m in methods:
            cells = []
            for f in nfes:
                hit = [s for s in sel if s["method"] == m and s["nfe_budget"] == f]
                cells.append(f"{hit[0]['sw']:.4f}" if hit else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += targets(summary, rows)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def _problem_key(name: str):
    parts = dict(p.split("=") for p in name.split() if "=" in p)
    return (name.split()[0], int(parts.get("d_x", 0)), int(parts.get("d_y", 0)), name)


def targets(summary: List[dict], rows: List[dict]) -> List[str]:
    out = ["## Targets", ""]
    for prob in sorted({s["problem"] for s in summary}, key=_problem_key):
        for f in sorted({s["nfe_budget"] for s in summary}):
            sel = [s for s in summary if s["problem"] == prob and s["nfe_budget"] == f]
            mine = [s for s in sel if not s["method"].startswith("peer")]
            peers = [s for s in sel if s["method"].startswith("peer")]
            if mine and peers:
                b, q = min(mine, key=lambda s: s["sw"]), min(peers, key=lambda s: s["sw"])
                ok = b["sw"] <= 0.5 * q["sw"]
                out.append(f"- {prob}, NFE {f}: our best {b['method']} {b['sw']:.4f} vs best peer "
                           f"{q['method'][6:]} {q['sw']:.4f}: ratio {b['sw'] / q['sw']:.2f} "
                           f"({'met' if ok else 'NOT met'}, target <= 0.5)")
    out.append("")
    # each SMC method: falls with particles (mean per size), 64 below every non-SMC method
    by = {}
    for r in rows:
        by.setdefault((r["problem"], r["nfe_budget"]), []).append(r)
    for name in SMC:
        held, total, fails = 0, 0, []
        for (prob, f), rs in sorted(by.items()):
            m64 = [r for r in rs if r["method"] == f"{name} 64"]
            others = [r for r in rs if not is_smc(r["method"])]
            if not m64 or not others:
                continue
            total += 1
            best = min(others, key=lambda r: r["sw"])
            if m64[0]["sw"] < best["sw"]:
                held += 1
            else:
                fails.append(f"{prob} NFE {f} ({name} 64 {m64[0]['sw']:.4f}, {best['method']} "
                             f"{best['sw']:.4f})")
        out.append(f"- {name} 64 below every non-SMC method: {held} of {total} (problem, NFE) "
                   f"cells" + (": fails on " + "; ".join(fails) if fails else ""))
        falls = []
        for prob in sorted({s["problem"] for s in summary}, key=_problem_key):
            for f in sorted({s["nfe_budget"] for s in summary}):
                vals = sorted((int(s["method"].split()[1]), s["sw"]) for s in summary
                              if s["problem"] == prob and s["nfe_budget"] == f
                              and s["method"].split()[0] == name)
                if len(vals) >= 2:
                    falls.append(all(b[1] < a[1] for a, b in zip(vals, vals[1:])))
        out.append(f"- {name}'s mean distance falls with every doubling-or-more of particles in "
                   f"{sum(falls)} of {len(falls)} (size, NFE) cells")
    out.append("")
    return out


# ---- digits -----------------------------------------------------------------------------------------
DIGIT_METHODS = {"ddnm": {}, "ddnm_plus": {}, "ddrm": {}, "repaint": {"jump_length": 5, "resample": 2},
                 "score_sde": {}, "dps": {"zeta": 1.0}, "pigdm": {"sigma_data": 0.5},
                 "mcgdiff": {"particles": 8}, "tds": {"particles": 8, "sigma_data": 0.5}}


class _NullLabel(torch.nn.Module):
    """A class-conditional network called with the null label for every sample of any batch
    (the SMC methods' particles change the batch size, so the label cannot be bound once)."""

    def __init__(self, net: torch.nn.Module, null: int):
        super().__init__()
        self.inner, self.null = net, null

    def forward(self, x, t, **kwargs):
        return self.inner(x, t, y=torch.full((x.shape[0],), self.null, dtype=torch.long,
                                             device=x.device), **kwargs)


def run_digits(args) -> int:
    """Inpaint the lower half and a centred 4x4 box of the first ``--digits-n`` test digits with
    every method (one sample each, ``--digits-nfe`` evaluations) and score the results with the
    digits CNN (``metrics.digits_classifier``): agreement of its label with the true one, next to
    its accuracy on the unmasked digits and on the observed part alone (``A^+ y``). A class-
    conditional checkpoint is used unconditionally (its null label). One PNG per mask and method:
    observed / result / truth rows."""
    from sde_diffusion.checkpoints import latest_checkpoint, load_checkpoint, model_from_checkpoint
    from sde_diffusion.data import digits
    from sde_diffusion.inverse import Mask, box_mask
    from sde_diffusion.metrics import digits_classifier
    from sde_diffusion.reports import save_image_grid

    torch.set_num_threads(1)
    path = args.checkpoint
    if path is None:
        raise SystemExit("inverse.py --digits needs --checkpoint (a digits checkpoint or workdir)")
    if os.path.isdir(path):
        path = latest_checkpoint(path)
    ckpt = load_checkpoint(path)
    model, sde, config = model_from_checkpoint(path, use_ema=True)
    step, n_iters = int(ckpt["step"]), int(config.training.n_iters)
    K = getattr(model.net, "num_classes", None)
    if K:                                             # the null label K: the unconditional model
        model.net = _NullLabel(model.net, K)
    size = int(config.data.image_size)
    x, labels = digits(size, "test", return_labels=True)
    n = min(args.digits_n, x.shape[0])
    x, labels = x[:n].float(), labels[:n]
    clf = digits_classifier()
    agree = lambda imgs: float((clf(imgs.float().clamp(-1, 1)).argmax(1) == labels).double().mean())  # noqa: E731
    shape = tuple(x.shape[1:])
    masks = {"lower-half": Mask(half_mask(shape, "lower-half")), "box": Mask(box_mask(shape, size // 2))}
    rows = []
    clean = agree(x)
    methods = [m for m in args.digits_methods.split(",") if m]
    out = args.out + "_digits"
    for mask_name, op in masks.items():
        y = op.A(x)
        observed = op.pinv(y)
        rows.append({"mask": mask_name, "method": "(observed part only, A^+ y)", "nfe": 0,
                     "agreement": agree(observed), "unmasked": clean, "cpu_s": 0.0})
        for m in methods:
            start = time.process_time()
            try:
                with torch.no_grad():
                    r = solve_inverse(model, op, y, method=m, nfe=args.digits_nfe, generator=0,
                                      **DIGIT_METHODS.get(m, {}))
            except Exception as err:  # noqa: BLE001  (e.g. NonFiniteError: recorded, the run goes on)
                rows.append({"mask": mask_name, "method": m, "nfe": 0, "agreement": float("nan"),
                             "unmasked": clean, "cpu_s": time.process_time() - start,
                             "failed": str(err).split("\n")[0][:120]})
                print(f"digits {mask_name:10s} {m:10s} FAILED: {rows[-1]['failed']}", flush=True)
                continue
            cpu = time.process_time() - start
            res = r.samples.detach().float()
            rows.append({"mask": mask_name, "method": m, "nfe": r.nfe, "agreement": agree(res),
                         "unmasked": clean, "cpu_s": cpu})
            k = min(n, 16)
            save_image_grid(torch.cat([observed[:k], res[:k], x[:k]]).clamp(-1, 1),
                            f"{out}_{mask_name}_{m}.png", nrow=k)
            print(f"digits {mask_name:10s} {m:10s} nfe {r.nfe:4d} agreement {rows[-1]['agreement']:.3f} "
                  f"(unmasked {clean:.3f}) [{cpu:.0f} s]", flush=True)
    write_csv(rows, out + ".csv")
    head = (f"# Digits inpainting (benchmarks/inverse.py --digits)\n\nCheckpoint `{path}` at step "
            f"{step} of {n_iters}{' (class-conditional, used with its null label)' if K else ''}; "
            f"the first {n} test digits, one sample each, {args.digits_nfe} evaluations per method; "
            f"agreement = the digits CNN's label equals the true one; 'unmasked' = its accuracy on "
            f"the same digits unmasked. Pictures: {os.path.basename(out)}_MASK_METHOD.png "
            f"(observed / result / truth).\n\n")
    with open(out + ".md", "w", encoding="utf-8") as fh:
        fh.write(head + write_markdown_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
