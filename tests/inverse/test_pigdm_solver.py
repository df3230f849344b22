"""PiGDM through any solver (``solve_inverse(..., method="pigdm", solver=NAME)``): the guided model's
score is the exact posterior score for Gaussian data (every SDE, noisy or noiseless), a stochastic
second-order solver beats the paper's DDIM loop at 20 NFE on the 64-D mixture behind a half mask,
and the requests that make no sense fail in one line."""
import pytest
import torch

from sde_diffusion import VESDE, VPSDE, SubVPSDE, GaussianMixture, random_mixture, solve_inverse
from sde_diffusion.inverse import Dense, Mask, half_mask
from sde_diffusion.inverse.methods.pigdm import PiGDMGuidedModel
from sde_diffusion.inverse.posterior import exact_posterior
from sde_diffusion.metrics import sliced_wasserstein
from sde_diffusion.models import ScoreModel, TimeMLP
from sde_diffusion.models.wrapper import NonFiniteError, as_model

from helpers import half_mask_64  # noqa: E402

SDES = {"vp": VPSDE(), "ve": VESDE(), "subvp": SubVPSDE()}


@pytest.mark.parametrize("sigma_y", [0.2, 0.0])
@pytest.mark.parametrize("name", sorted(SDES))
def test_guided_score_is_the_exact_posterior_score_for_gaussian_data(name, sigma_y):
    """For N(m, s^2 I) data, x0 | x_t is Gaussian with variance r_t^2 I exactly (sigma_data = s),
    so PiGDM's likelihood score is exact: the guided model's score, eps and x0 are the exact
    posterior's, through a checked time and through a solver's numbers (at_scales)."""
    g = torch.Generator().manual_seed(0)
    sde, sd = SDES[name], 0.6
    prior = GaussianMixture([1.0], torch.randn(1, 6, generator=g, dtype=torch.float64), [sd], sde)
    op = Dense(torch.randn(3, 6, generator=g, dtype=torch.float64))
    y = torch.randn(1, 3, generator=g, dtype=torch.float64)
    exact = as_model(exact_posterior(prior, op, y, sigma_y))
    guided = PiGDMGuidedModel(as_model(prior), op, y.expand(5, 3), sigma_y, sd, 1.0)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    for t in (0.9, 0.3, 0.02):
        tt = torch.full((5,), t, dtype=torch.float64)
        _, log_a, log_s = sde.log_scales(tt[:1])
        a, s = float(log_a.exp()), float(log_s.exp())
        for view in ("score", "eps", "x0"):
            want = getattr(exact, view)(x, tt)
            for got in (getattr(guided, view)(x, tt), guided.at_scales(view, x, tt, a, s)):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_a_second_order_sde_solver_beats_the_ddim_loop_at_20_nfe():
    """64-D, 8-mode mixture behind a half mask (sigma_y 0.05), 20 NFE, 1000 samples against 4000
    exact posterior samples: the paper's DDIM loop with the same guided score 0.061 (uniform grid)
    and 0.029 (log-SNR); SDE-DPM-Solver++(2M) on the focus grid 0.012 (floor of two exact sets
    0.008)."""
    prior, op, y, sd, ref = half_mask_64()
    common = dict(n=1000, nfe=20, sigma_y=0.05, generator=0, sigma_data=sd)
    loop = solve_inverse(prior, op, y, method="pigdm", guidance="score", grid="logsnr", **common)
    ours = solve_inverse(prior, op, y, method="pigdm", solver="sde_dpm_solver++", grid="focus",
                         **common)
    assert ours.nfe == loop.nfe == 20 and ours.info["solver"] == "sde_dpm_solver++"
    d_loop, d_ours = sliced_wasserstein(loop.samples, ref), sliced_wasserstein(ours.samples, ref)
    assert d_ours < 0.6 * d_loop, (d_ours, d_loop)


def test_solver_requests_that_make_no_sense_fail_clearly():
    prior = random_mixture(4, 2, seed=0, sde=VPSDE())
    op = Mask(half_mask((4,), "lower-half"))
    y = torch.zeros(1, 2, dtype=torch.float64)
    kw = dict(method="pigdm", n=2, nfe=4)
    with pytest.raises(ValueError, match="eta is the DDIM loop's noise"):
        solve_inverse(prior, op, y, solver="ddim", eta=0.5, **kw)
    with pytest.raises(ValueError, match="guidance='score'"):
        solve_inverse(prior, op, y, solver="ddim", guidance="paper", **kw)
    with pytest.raises(ValueError, match="solver_options need a solver"):
        solve_inverse(prior, op, y, solver_options={"eta": 1.0}, **kw)
    with pytest.raises(ValueError, match="unknown solver"):
        solve_inverse(prior, op, y, solver="nope", **kw)


def test_a_diverging_network_names_the_way_out():
    """The untrained float32 network of test_pigdm.py (its Jacobian far from the data's, as a
    trained network's at high noise) makes the guided score blow up: the NaN error names the
    step, the time and solver=None."""
    torch.manual_seed(0)
    model = ScoreModel(TimeMLP(8, hidden=32, depth=2), VPSDE(), "eps")
    op = Mask(half_mask((8,)))
    with pytest.raises(NonFiniteError, match=r"at step \d+ .*t=.*solver=None"):
        solve_inverse(model, op, torch.full((4,), 0.5), method="pigdm", solver="sde_dpm_solver++",
                      n=16, nfe=50, generator=0)
