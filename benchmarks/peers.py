"""Adapters that run k-diffusion's samplers and diffusers' schedulers on an oracle of ours, for the
side-by-side sampler benchmark (benchmarks/samplers.py). Nothing in the package imports this file.

How each peer is driven (the same oracle, the same starting noise ``x_T`` at ``t = T``, the same
end time ``t_end = eps``, the same NFE):

- **k-diffusion** works in EDM's variables ``x_e = x/alpha``, ``sigma_e = sigma/alpha``
  (Karras et al. 2022). Its denoiser ``D(x_e, sigma_e)`` is the oracle's exact
  ``E[x0 | x_t = alpha x_e]`` at the time ``t`` whose noise level is ``sigma_e`` (found in float64
  with ``sde.t_of_lambda(-log sigma_e)``). The sampler starts from ``x_T / alpha(T)`` and its
  result at ``sigma_e(eps)`` is multiplied back by ``alpha(eps)``. Noise levels: the Karras
  rho=7 schedule (their recommendation) with ``steps + 1`` levels from ``sigma_e(T)`` to
  ``sigma_e(eps)`` -- k-diffusion's ``get_sigmas_karras(steps + 1, ...)`` without the appended 0,
  so the last step ends at ``eps`` like ours instead of jumping to clean data -- and, for the
  DPM-Solver++ samplers, also the log-SNR-uniform ("exponential") schedule that Lu et al. recommend.
  ``sample_dpm_fast`` uses its own log-SNR steps between the same two levels.
- **diffusers** schedulers are discrete-time (1000 training steps). Their timestep ``i`` is our
  continuous time ``t = (i + 1)/1000`` of the VP SDE: the schedulers get ``trained_betas`` with
  ``prod_{j<=i}(1 - beta_j) = alpha(t_i)^2`` exactly (for beta linear 0.1 -> 20 these are within
  O(1/N^2) of DDPM's linspace(1e-4, 0.02, 1000)), so timestep 999 is ``T`` and timestep 0 is
  ``eps = 1e-3``. The oracle is evaluated at the noise level the scheduler itself uses for that
  step (its ``sigmas[i]`` where it has them, else ``alphas_cumprod[timestep]``), in the
  parameterization the scheduler consumes (``x0`` for the data-prediction solvers, ``eps`` for
  DDIM). Settings: their defaults except what is needed to start at ``T`` and stop at ``eps``:
  ``final_sigmas_type="sigma_min"`` (DPMSolverMultistep, UniPC: the last step ends at timestep 0,
  i.e. ``eps``, not at clean data), DDIM with ``timestep_spacing="trailing"`` and
  ``set_alpha_to_one=False`` (starts at timestep 999 and ends at timestep 0). Each is also run with
  Karras sigmas (``use_karras_sigmas=True``; the scheduler builds ``steps + 1`` Karras levels down
  to ``sigma(eps)``, and the final extra step to ``sigma_min``/0 is removed as above), and
  DPMSolverMultistep and UniPC with ``solver_order`` 2 (default) and 3 (their recommendation for
  unconditional sampling).

Stochastic peers draw their noise from a ``torch.Generator`` (k-diffusion: a ``noise_sampler``
returning ``randn``, instead of its Brownian tree, which needs torchsde and is much slower).

Imports are lazy: a missing library makes :func:`available_peers` skip its peers with a note.
k-diffusion's package ``__init__`` imports torchvision, clip, wandb...; only its ``sampling.py``
is needed, so it is loaded from the installed package's folder with a stub for ``utils`` (and for
``torchsde`` when that is not installed).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import sys
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Peer", "available_peers", "load_k_diffusion_sampling", "vp_trained_betas"]


@dataclass
class Peer:
    name: str
    library: str
    stochastic: bool
    schedule: str
    nfe_per_step: int
    run: Callable  # run(oracle, x_T, steps, generator) -> samples at t_end (our x scale)
    fixed_nfe: bool = False  # True: ``steps`` is the NFE itself (sample_dpm_fast)

    def steps_for_nfe(self, nfe: int) -> int:
        return nfe if self.fixed_nfe else max(1, nfe // self.nfe_per_step)

    def nfe_of(self, steps: int) -> int:
        return steps if self.fixed_nfe else steps * self.nfe_per_step


# ---- loading the libraries -------------------------------------------------------------------------
def load_k_diffusion_sampling():
    """k-diffusion's ``sampling`` module, without importing the package's heavy ``__init__``."""
    try:
        import k_diffusion.sampling as sampling  # works where the full dependency set is installed
        return sampling
    except Exception:  # noqa: BLE001 - fall back to loading the one file
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install k-diffusion --no-deps)")
    folder = list(spec.submodule_search_locations)[0]
    pkg_name = "_kdiff_stub"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = []
    utils = types.ModuleType(pkg_name + ".utils")

    def append_dims(x, target_dims):
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * dims_to_append]

    utils.append_dims = append_dims
    sys.modules[pkg_name] = pkg
    sys.modules[pkg_name + ".utils"] = utils
    pkg.utils = utils
    if importlib.util.find_spec("torchsde") is None:  # only its Brownian tree needs it; we pass noise
        sys.modules.setdefault("torchsde", types.ModuleType("torchsde"))
    mod_spec = importlib.util.spec_from_file_location(pkg_name + ".sampling", f"{folder}/sampling.py")
    module = importlib.util.module_from_spec(mod_spec)
    module.__package__ = pkg_name
    sys.modules[pkg_name + ".sampling"] = module
    mod_spec.loader.exec_module(module)
    return module


def _load_diffusers():
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
    return DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler


# ---- shared conversions ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1 << 16)
def _level(sde, sigma_e: float) -> Tuple[float, float]:
    """Time and alpha of the noise level ``sigma_e = sigma/alpha`` (float64). Cached per (SDE,
    level): the harness's conversion is not the peer's work, so after the first of the repeated
    timing runs it costs a peer nothing (SDEs hash by their parameters)."""
    lam = torch.tensor(-math.log(sigma_e), dtype=torch.float64)
    t = sde.t_of_lambda(lam).clamp(0.0, sde.T)
    return float(t), float(sde.alpha(t))


def _sigma_e(sde, t: float) -> float:
    tt = torch.tensor(t, dtype=torch.float64)
    return float((-sde.lambda_(tt)).exp())


def vp_trained_betas(sde, n: int = 1000):
    """Betas of an ``n``-step discrete chain whose ``alphas_cumprod[i]`` equals ``alpha(t_i)^2`` of
    ``sde`` at ``t_i = (i + 1) T / n`` (so diffusers' timestep ``i`` is our time ``t_i``)."""
    t = torch.arange(0, n + 1, dtype=torch.float64) * (sde.T / n)
    log_a2 = 2 * sde.log_alpha(t)
    log_a2[0] = 0.0
    betas = -torch.expm1(log_a2[1:] - log_a2[:-1])
    return betas.tolist()


# ---- k-diffusion ----------------------------------------------------------------------------------
def _k_peers(sde) -> List[Peer]:
    K = load_k_diffusion_sampling()
    s_max, s_min = _sigma_e(sde, sde.T), _sigma_e(sde, sde.eps)

    def schedule(kind: str, steps: int, like: torch.Tensor) -> torch.Tensor:
        if kind == "karras":
            sig = K.get_sigmas_karras(steps + 1, s_min, s_max, rho=7.0)[:-1]
        else:
            sig = K.get_sigmas_exponential(steps + 1, s_min, s_max)[:-1]
        return sig.to(device=like.device, dtype=like.dtype)

    def denoiser(oracle):
        def D(x_e, sigma, **kwargs):
            t, a = _level(sde, float(sigma.reshape(-1)[0]))
            return oracle.x0(a * x_e, t)
        return D

    def noise_sampler(x, generator):
        return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                                     device=x.device)

    def make(fn_name: str, kind: str, **kw):
        fn = getattr(K, fn_name)
        stochastic = kw.pop("_stochastic", False)

        def run(oracle, x_T, steps, generator):
            a_T, a_end = (float(sde.alpha(torch.tensor(t, dtype=torch.float64))) for t in (sde.T, sde.eps))
            x_e = x_T / a_T
            extra = dict(kw)
            if stochastic:
                extra["noise_sampler"] = noise_sampler(x_e, generator)
            if fn_name == "sample_dpm_fast":
                out = fn(denoiser(oracle), x_e, s_min, s_max, steps, disable=True, **extra)
            else:
                out = fn(denoiser(oracle), x_e, schedule(kind, steps, x_e), disable=True, **extra)
            return out * a_end
        return run

    sched_names = {"karras": "karras rho=7", "exponential": "log-SNR uniform"}
    peers = []

    def add(label, fn_name, kind, nfe_per_step=1, stochastic=False, fixed=False, **kw):
        peers.append(Peer(f"k:{label}", "k-diffusion", stochastic,
                          "own log-SNR" if fixed else sched_names[kind], nfe_per_step,
                          make(fn_name, kind, _stochastic=stochastic, **kw), fixed_nfe=fixed))

    add("euler", "sample_euler", "karras")
    add("heun", "sample_heun", "karras", nfe_per_step=2)
    add("dpm_2", "sample_dpm_2", "karras", nfe_per_step=2)
    add("lms", "sample_lms", "karras")
    add("dpmpp_2m", "sample_dpmpp_2m", "karras")
    add("dpmpp_2m/exp", "sample_dpmpp_2m", "exponential")
    add("dpmpp_3m", "sample_dpmpp_3m_sde", "karras", eta=0.0)
    add("dpmpp_3m/exp", "sample_dpmpp_3m_sde", "exponential", eta=0.0)
    # eta=0 draws no noise: a no-op noise_sampler spares the Brownian tree built per run without one
    # (7 ms at batch 4096 x 64, 0.07 ms a step over 100) -- for the per-step overhead comparison
    add("dpmpp_3m_sde(eta=0)", "sample_dpmpp_3m_sde", "karras", eta=0.0,
        noise_sampler=lambda sigma, sigma_next: None)
    add("dpm_fast", "sample_dpm_fast", "exponential", fixed=True)
    add("euler_ancestral", "sample_euler_ancestral", "karras", stochastic=True)
    add("dpmpp_2m_sde", "sample_dpmpp_2m_sde", "karras", stochastic=True)
    add("dpmpp_3m_sde", "sample_dpmpp_3m_sde", "karras", stochastic=True)
    return peers


# ---- diffusers ------------------------------------------------------------------------------------
def _d_peers(sde) -> List[Peer]:
    DDIM, DPMMS, UniPC = _load_diffusers()
    betas = vp_trained_betas(sde, 1000)
    base = dict(num_train_timesteps=1000, trained_betas=betas)

    def make(cls, config: dict, karras: bool, output: str, step_kwargs: Optional[dict] = None,
             stochastic: bool = False):
        def run(oracle, x_T, steps, generator):
            cfg = dict(base, **config)
            if karras:
                cfg["use_karras_sigmas"] = True
            sched = cls(**cfg)
            if karras:
                # steps + 1 Karras levels down to sigma(eps); drop the extra last step
                sched.set_timesteps(steps + 1, device=x_T.device)
                sched.timesteps = sched.timesteps[:steps]
                sched.sigmas = sched.sigmas[:steps + 1]
                sched.num_inference_steps = steps
            else:
                sched.set_timesteps(steps, device=x_T.device)
            sigmas = getattr(sched, "sigmas", None)
            use_sigmas = sigmas is not None and len(sigmas) == len(sched.timesteps) + 1
            acp = sched.alphas_cumprod.double()
            x = x_T
            kw = dict(step_kwargs or {})
            if stochastic:
                kw["generator"] = generator
            for i, ts in enumerate(sched.timesteps):
                if use_sigmas:
                    s_e = float(sigmas[i])
                else:
                    ac = float(acp[int(ts)])
                    s_e = math.sqrt((1 - ac) / ac)
                t, a = _level(sde, s_e)
                out = oracle.x0(x, t) if output == "x0" else oracle.eps(x, t)
                x = sched.step(out, ts, x, **kw).prev_sample
            return x
        return run

    peers = []

    def add(label, cls, config, output, nfe_per_step=1, stochastic=False, step_kwargs=None,
            karras_too=True):
        for karras in ((False, True) if karras_too else (False,)):
            peers.append(Peer(f"d:{label}" + ("/karras" if karras else ""), "diffusers", stochastic,
                              "karras rho=7" if karras else "default (linspace timesteps)",
                              nfe_per_step, make(cls, config, karras, output, step_kwargs, stochastic)))

    end = dict(final_sigmas_type="sigma_min")
    # DDIMScheduler has no Karras option (it steps on alphas_cumprod of integer timesteps)
    add("DDIM", DDIM, dict(timestep_spacing="trailing", set_alpha_to_one=False), "eps",
        step_kwargs=dict(eta=0.0), karras_too=False)
    add("DPMSolverMultistep(2M)", DPMMS, dict(end, prediction_type="sample"), "x0")
    add("DPMSolverMultistep(3M)", DPMMS, dict(end, prediction_type="sample", solver_order=3), "x0")
    add("UniPC(2)", UniPC, dict(end, prediction_type="sample"), "x0")
    add("UniPC(3)", UniPC, dict(end, prediction_type="sample", solver_order=3), "x0")
    add("SDE-DPMSolver++(2M)", DPMMS, dict(end, prediction_type="sample",
                                          algorithm_type="sde-dpmsolver++"), "x0", stochastic=True)
    return peers


def available_peers(sde, libraries=("k-diffusion", "diffusers"), log=print) -> List[Peer]:
    """The peers whose library imports; a missing one is skipped with a printed note."""
    peers: List[Peer] = []
    makers: Dict[str, Callable] = {"k-diffusion": _k_peers, "diffusers": _d_peers}
    for lib in libraries:
        try:
            peers += makers[lib](sde)
        except Exception as err:  # noqa: BLE001 - any import problem: skip with a note
            log(f"note: skipping {lib} peers ({type(err).__name__}: {err})")
    return peers
