"""The analytical first step (``sample(..., analytic_first_step=True)``, Zhou et al. 2024): the
prior's views replace the model at the grid's first time, one network evaluation is saved, and the
budget buys one step more."""
import math

import pytest
import torch

from sde_diffusion import VESDE, VPSDE, SubVPSDE, optimize_grid, random_mixture, sample
from sde_diffusion.models import OracleModel
from sde_diffusion.samplers import SolverContext, NoiseSource
from sde_diffusion.samplers.api import data_scale
from sde_diffusion.samplers.grids import make_grid
from sde_diffusion.samplers.reference import exact_flow_map
from sde_diffusion.samplers.tuning import OptimizedGrid


def _mixture(sde, dim=16, seed=0):
    return random_mixture(dim, 6, seed=seed, sde=sde)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_first_views_are_the_prior_and_cost_no_call(sde):
    model = OracleModel(_mixture(sde))
    times = make_grid(sde, 5, "logsnr")
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sde.prior_std
    ctx = SolverContext(model, sde, times, NoiseSource(0, x.shape, x.dtype, x.device), x.dtype,
                        x.device, 8, analytic_first=True)
    before = model.nfe
    s = float(ctx.sigmas[0])
    assert torch.equal(ctx.x0(0, x), torch.zeros_like(x))
    torch.testing.assert_close(ctx.eps(0, x), x / s)
    torch.testing.assert_close(ctx.score(0, x), -x / s ** 2)
    assert model.nfe == before and ctx.analytic_calls == 3
    # the rest of the grid is the model's
    torch.testing.assert_close(ctx.eps(1, x), model.eps(x, ctx.t(1)))
    # and the prior's eps is close to the exact one at T: the gap is of order alpha/sigma
    gap = (ctx.eps(0, x) - model.eps(x, ctx.t(0))).abs().max()
    snr = float(ctx.alphas[0]) / s
    assert gap <= 5 * snr * (1 + model.mixture.means.abs().max()), (gap, snr)


@pytest.mark.parametrize("solver,options", [("ipndm", {"order": 3}), ("unipc", {"order": 2}),
                                            ("ddim", {}), ("deis", {}), ("dpm_solver++", {"order": 2})])
def test_a_budget_buys_one_step_more(solver, options):
    mix = _mixture(VPSDE())
    plain = sample(mix, shape=(32, 16), solver=solver, nfe=5, generator=1, progress=False, **options)
    afs = sample(mix, shape=(32, 16), solver=solver, nfe=5, generator=1, progress=False,
                 analytic_first_step=True, **options)
    assert plain.nfe == afs.nfe == 5
    assert afs.config["steps"] == plain.config["steps"] + 1
    assert afs.config["analytic_first_step"] is True and "analytic_first_step" not in plain.config
    again = sample(mix, x_T=None, shape=(32, 16), generator=1, progress=False, **afs.config["call"])
    assert torch.equal(again.samples, afs.samples)


@pytest.mark.parametrize("sde,seed", [(VPSDE(), 1), (SubVPSDE(), 2), (VESDE(), 3)],
                         ids=["vp", "subvp", "ve"])
def test_it_lowers_the_error_at_four_evaluations(sde, seed):
    """Against the exact flow map, iPNDM-3 on the focus grid at 4 NFE: the free step buys more
    than the prior's views cost (on 18 of 18 mixtures of the rule's sweep, docs/samplers.md)."""
    mix = random_mixture(32, 8, seed=seed, sde=sde)
    x_T = torch.randn(512, 32, generator=torch.Generator().manual_seed(seed + 10),
                      dtype=torch.float64) * sde.prior_std
    ref = exact_flow_map(mix, x_T)
    errs = [float((sample(mix, x_T=x_T.float(), solver="ipndm", order=3, nfe=4, grid="focus",
                          sigma_data=data_scale(mix), progress=False,
                          analytic_first_step=a).samples.double() - ref).pow(2).mean().sqrt())
            for a in (False, True)]
    assert errs[1] < 0.95 * errs[0], errs


def test_the_same_grid_differs_by_the_prior_views_error_only():
    """With many steps the first one hardly matters: AFS and the model agree to ~alpha_T."""
    sde = VPSDE()
    mix = _mixture(sde)
    x_T = torch.randn(64, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = sample(mix, x_T=x_T, solver="unipc", steps=200, grid="logsnr", progress=False).samples
    b = sample(mix, x_T=x_T, solver="unipc", steps=200, grid="logsnr", progress=False,
               analytic_first_step=True).samples
    alpha_T = math.exp(float(sde.log_scales(torch.tensor([sde.T], dtype=torch.float64))[1]))
    assert 0 < float((a - b).abs().max()) < 10 * alpha_T


@pytest.mark.parametrize("kwargs,message", [
    (dict(model_sde=VESDE(sigma_max=4.0)), "alpha/sigma = 0.25"),
    (dict(t_start=0.5), "needs a start at high noise"),
    (dict(solver="ode"), "adaptive"),
    (dict(analytic_first_step="yes"), "must be True or False"),
])
def test_bad_requests_fail_clearly(kwargs, message):
    sde = kwargs.pop("model_sde", VPSDE())
    kw = dict(solver="ipndm", nfe=4, analytic_first_step=True)
    kw.update(kwargs)
    if kw["solver"] == "ode":
        kw.pop("nfe")
    with pytest.raises(ValueError, match=message):
        sample(_mixture(sde), shape=(4, 16), progress=False, **kw)


def test_optimize_grid_fits_for_it_and_the_file_keeps_it(tmp_path):
    sde = VPSDE()
    mix = _mixture(sde)
    fit = optimize_grid(mix, sde, "ipndm", nfe=4, shape=(256, 16), generator=3, grid="logsnr",
                        analytic_first_step=True, max_evals=8, progress=False, order=3)
    assert fit.analytic_first_step and fit.nfe == 4 and len(fit.times) == 6
    out = sample(mix, shape=(16, 16), generator=0, progress=False, **fit.sample_options())
    assert out.nfe == 4
    path = fit.save(tmp_path / "grid.json")
    loaded = OptimizedGrid.load(path)
    assert loaded.analytic_first_step and loaded.nfe == 4
    assert torch.equal(loaded.times, fit.times)
