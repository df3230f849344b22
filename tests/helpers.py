"""Shared test fixtures' data: the forward SDEs every test module runs over."""
import functools

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


# ---- inverse-problem tests (tests/inverse/test_ddrm.py, test_dps.py, test_smc.py, test_pigdm.py) ---
def posterior_problem(sde, kind: str, sigma_y: float, n: int):
    """``(prior, operator, y, exact posterior samples, distance of prior samples to them)`` on
    8-d data, ``n`` samples each: ``kind`` ``"mask"`` (full covariances, the lower half of the
    coordinates missing), ``"gauss"`` (one isotropic Gaussian, 3 random projections) or
    ``"dense"`` (isotropic components, 2 random projections)."""
    from sde_diffusion import GaussianMixture
    from sde_diffusion.inverse import Dense, Mask, half_mask, observe
    from sde_diffusion.inverse.posterior import exact_posterior
    from sde_diffusion.metrics import sliced_wasserstein

    g = torch.Generator().manual_seed(3)
    if kind == "mask":
        prior = random_mixture(8, 6, seed=3, sde=sde, full=True, std_range=(0.1, 0.5))
        op = Mask(half_mask((8,)))
    elif kind == "gauss":
        prior = GaussianMixture([1.0], torch.rand(1, 8, generator=g, dtype=torch.float64) - 0.5, [0.3], sde)
        op = Dense(torch.randn(3, 8, generator=g, dtype=torch.float64))
    else:
        prior = random_mixture(8, 6, seed=3, sde=sde, std_range=(0.05, 0.2))
        op = Dense(torch.randn(2, 8, generator=g, dtype=torch.float64))
    y = observe(op, prior.sample(1, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                sigma_y, 5)[0]
    post = exact_posterior(prior, op, y, sigma_y)
    ref = post.sample(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pri = prior.sample(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return prior, op, y, ref, sliced_wasserstein(pri, ref)


def check_image_operator_noiseless_exact(method: str, op_name: str, dtype, **options):
    """Colorization (3, 4, 4), a 2x2 block average (``"block"``) or a centred box mask (``"box"``)
    of (1, 4, 4) images, noiseless: ``method`` keeps shapes and dtype and meets A x = y to the
    dtype's round-off."""
    from sde_diffusion import solve_inverse
    from sde_diffusion.inverse import BlockAverage, Colorization, Mask, box_mask, observe

    shape = (3, 4, 4) if op_name == "color" else (1, 4, 4)
    op = {"color": lambda: Colorization(shape), "block": lambda: BlockAverage(2, shape),
          "box": lambda: Mask(box_mask(shape, 2))}[op_name]()
    prior = random_mixture(shape, 4, seed=0, sde=VPSDE())
    y = observe(op, prior.sample(1, generator=torch.Generator().manual_seed(0), dtype=dtype), 0.0)[0]
    x = solve_inverse(prior, op, y, method=method, n=3, nfe=10, **options).samples
    assert x.shape == (3,) + shape and x.dtype == dtype
    assert float((op.A(x) - y).abs().max()) < (1e-4 if dtype == torch.float32 else 1e-10)


def check_noisy_colorization(method: str, dtype):
    """A colorization of (3, 4, 4) images with sigma_y = 0.1: ``method`` keeps shape and dtype and
    returns finite samples."""
    from sde_diffusion import solve_inverse
    from sde_diffusion.inverse import Colorization, observe

    shape = (3, 4, 4)
    op = Colorization(shape)
    prior = random_mixture(shape, 4, seed=0, sde=VPSDE())
    y = observe(op, prior.sample(1, generator=torch.Generator().manual_seed(0), dtype=dtype), 0.1)[0]
    x = solve_inverse(prior, op, y, method=method, n=3, nfe=10, sigma_y=0.1).samples
    assert x.shape == (3,) + shape and x.dtype == dtype
    assert bool(torch.isfinite(x).all())


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """A command's user error: exit status 2, no traceback, and one ``sde-diffusion: error:`` line on
    stderr naming every fragment. Returns that line."""
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("sde-diffusion: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@functools.lru_cache(maxsize=None)
def operator_problem(sde: str, op_name: str, shape: tuple, sigma_y: float, seed: int = 3, n: int = 500):
    """``(prior, operator, y, exact posterior samples, distance of prior samples to them)``: a random
    6-component mixture of ``shape`` under SDE_CLASSES[sde], observed through ``op_name`` (``mask``: the
    lower half missing; ``color``; ``block``: 2x2 averages; ``dense``: 2 random projections) with
    noise ``sigma_y``; ``n`` samples each."""
    from sde_diffusion.inverse import BlockAverage, Colorization, Dense, Mask, half_mask, observe
    from sde_diffusion.inverse.posterior import exact_posterior
    from sde_diffusion.metrics import sliced_wasserstein

    ops = {"mask": lambda: Mask(half_mask(shape)), "color": lambda: Colorization(shape),
           "block": lambda: BlockAverage(2, shape),
           "dense": lambda: Dense(torch.randn(2, shape[0], generator=torch.Generator().manual_seed(0)))}
    op = ops[op_name]()
    prior = random_mixture(shape, 6, seed=seed, sde=SDE_CLASSES[sde]())
    x_true = prior.sample(1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = observe(op, x_true, sigma_y, 5)[0]
    ref = exact_posterior(prior, op, y, sigma_y).sample(n, generator=torch.Generator().manual_seed(2),
                                                        dtype=torch.float64)
    pri = prior.sample(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return prior, op, y, ref, sliced_wasserstein(pri, ref)


@functools.lru_cache(maxsize=None)
def half_mask_64():
    """``(prior, operator, y, sigma_data, exact posterior samples)``: the 64-D, 8-mode mixture of
    seed 1 under VP behind a lower-half mask, sigma_y 0.05; 4000 exact posterior samples (two sets
    of 1000 and 4000 differ by ~0.008)."""
    from sde_diffusion.inverse import Mask, half_mask, observe
    from sde_diffusion.inverse.posterior import exact_posterior

    prior = random_mixture(64, 8, seed=1, sde=VPSDE())
    sd = float(prior.covariance().diagonal().mean().sqrt())
    op = Mask(half_mask((64,), "lower-half"))
    y = observe(op, prior.sample(1, generator=torch.Generator().manual_seed(101), dtype=torch.float64),
                0.05, generator=1)[0]
    ref = exact_posterior(prior, op, y, 0.05).sample(4000, generator=torch.Generator().manual_seed(1),
                                                     dtype=torch.float64)
    return prior, op, y, sd, ref
