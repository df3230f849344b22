"""Shared test fixtures' data: the forward SDEs every test module runs over."""
import torch

from sde_diffusion import VESDE, VPSDE, SubVPSDE, random_mixture
from sde_diffusion.samplers.reference import exact_flow_map

#: the four forward processes with their default parameters
SDES = {
    "vp": lambda: VPSDE(),
    "vp_cosine": lambda: VPSDE(schedule="cosine"),
    "subvp": lambda: SubVPSDE(),
    "ve": lambda: VESDE(),
}


# ---- sampler tests (tests/samplers/test_dpm_solver.py, test_peer_samplers.py) ----------------------
#: the SDE classes the sampler tests build with default parameters
SDE_CLASSES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def mixture_problem(kind="vp", dim=8, batch=12, seed=1):
    """``(sde, mixture, x_T)``: a seeded 4-component oracle mixture and float64 prior draws."""
    sde = SDE_CLASSES[kind]()
    mix = random_mixture(dim, 4, seed=seed, sde=sde)
    x_T = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return sde, mix, x_T * sde.prior_std


_FLOW_REFERENCE = {}


def flow_reference(kind):
    """``mixture_problem(kind)`` and the exact flow map of its ``x_T`` (computed once per kind)."""
    if kind not in _FLOW_REFERENCE:
        sde, mix, x_T = mixture_problem(kind)
        _FLOW_REFERENCE[kind] = (sde, mix, x_T, exact_flow_map(mix, x_T))
    return _FLOW_REFERENCE[kind]


def rms(a, b):
    return float(((a - b) ** 2).mean().sqrt())


def convergence_slope(errors, steps):
    """Least-squares slope of log(error) against log(NFE) (NFE proportional to steps)."""
    x = torch.log(torch.tensor(steps, dtype=torch.float64))
    y = torch.log(torch.tensor(errors, dtype=torch.float64))
    x = x - x.mean()
    return float(-(x * (y - y.mean())).sum() / (x * x).sum())
