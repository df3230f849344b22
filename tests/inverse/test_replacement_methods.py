"""score_sde's PC inpainting, DDNM, DDNM+, RePaint and SDEdit against the exact posterior of a
Gaussian-mixture prior (sliced Wasserstein between 500 method samples and 500 exact-posterior
samples): far closer than the prior on a noiseless mask for every SDE, close to the posterior at
high NFE where the method converges there (score_sde PC, DDNM in 2-d; score_sde PC and RePaint in
8-d), RePaint improving with NFE and with resampling, DDNM+ beating DDNM on noisy data, and better
than the prior for colorization, block averages and noisy random projections. Measured values are
in the comments; the bounds leave margin on them."""
import pytest
import torch

from sde_diffusion import solve_inverse
from sde_diffusion.metrics import sliced_wasserstein

from helpers import SDE_CLASSES, operator_problem  # noqa: E402

N = 500


_problem = operator_problem


def _distance(problem, method, nfe, sigma_y=0.0, **options):
    prior, op, y, ref, _ = problem
    r = solve_inverse(prior, op, y, method=method, n=N, nfe=nfe, sigma_y=sigma_y, generator=0, **options)
    return sliced_wasserstein(r.samples, ref)


# measured (2-d, lower half observed, prior at 0.463):
#   vp: score_sde 0.012, ddnm 0.013, ddnm_plus 0.022, repaint 0.031, sdedit 0.012
#   ve: 0.013, 0.009, 0.019, 0.015, 0.016;   subvp: 0.015, 0.009, 0.020, 0.023, 0.011
# (a DDNM whose projection moves only half-way measures 0.034 here, 0.14 in the 8-d VE test)
@pytest.mark.parametrize("sde", sorted(SDE_CLASSES))
@pytest.mark.parametrize("method,nfe,bound", [("score_sde", 200, 0.03), ("ddnm", 100, 0.03),
                                              ("ddnm_plus", 100, 0.045), ("repaint", 200, 0.06),
                                              ("sdedit", 100, 0.035)])
def test_far_closer_than_the_prior_on_a_noiseless_mask(sde, method, nfe, bound):
    problem = _problem(sde, "mask", (2,), 0.0)
    assert problem[4] > 0.4
    assert _distance(problem, method, nfe) < bound


def test_close_to_the_exact_posterior_at_high_nfe():
    # 2-d VP: floor (two exact sample sets) 0.009; measured score_sde 0.011, ddnm 0.016 at 500 NFE
    p2 = _problem("vp", "mask", (2,), 0.0)
    assert _distance(p2, "score_sde", 500) < 0.03
    assert _distance(p2, "ddnm", 500) < 0.03
    # 8-d VE: floor 0.007, prior 0.289; measured score_sde 0.008 at 600 NFE
    p8 = _problem("ve", "mask", (8,), 0.0)
    assert _distance(p8, "score_sde", 600) < 0.02


@pytest.mark.slow
def test_repaint_close_to_the_exact_posterior_at_high_nfe():
    p8 = _problem("ve", "mask", (8,), 0.0)
    assert _distance(p8, "repaint", 600) < 0.025          # measured 0.010 (floor 0.007)


def test_ddnm_stays_biased_in_8d_but_beats_the_prior():
    """DDNM is not asymptotically exact: in 8-d (VP) it plateaus near 0.087 (100 and 1000 NFE,
    n=1000) while the prior is at 0.29 -- a property of the method (DDNM+ at sigma_y = 0, a
    separate implementation, plateaus at 0.077 too)."""
    p8 = _problem("vp", "mask", (8,), 0.0)
    assert _distance(p8, "ddnm", 100) < 0.5 * p8[4]


def test_repaint_improves_with_nfe_and_resampling():
    p8 = _problem("vp", "mask", (8,), 0.0)
    low = _distance(p8, "repaint", 50, jump_length=5, resample=5)            # measured 0.119
    high = _distance(p8, "repaint", 500, jump_length=5, resample=5)          # measured 0.023
    plain = _distance(p8, "repaint", 500, resample=1)                        # measured 0.068
    assert high < 0.5 * low and high < 0.6 * plain


def test_ddnm_plus_handles_observation_noise_better_than_ddnm():
    p8 = _problem("vp", "mask", (8,), 0.2)          # prior 0.284
    plus = _distance(p8, "ddnm_plus", 100, sigma_y=0.2)                      # measured 0.110
    plain = _distance(p8, "ddnm", 100, sigma_y=0.2)                          # measured 0.168
    assert plus < 0.8 * plain


# measured distance / prior distance: colorization (3,1,2) 0.53-0.67 (prior 0.359), block average
# (2,2,4), seed 5: 0.72-0.80 (prior 0.268), random 2 x 4 projection, sigma_y = 0.1: 0.61-0.72 (0.320)
@pytest.mark.parametrize("op_name,shape,sigma_y,seed,bound", [("color", (3, 1, 2), 0.0, 3, 0.8),
                                                              ("block", (2, 2, 4), 0.0, 5, 0.9),
                                                              ("dense", (4,), 0.1, 3, 0.85)])
@pytest.mark.parametrize("method,nfe", [("score_sde", 100), ("ddnm", 50), ("ddnm_plus", 50),
                                        ("repaint", 100), ("sdedit", 50)])
def test_closer_than_the_prior_for_other_operators(op_name, shape, sigma_y, seed, bound, method, nfe):
    problem = _problem("vp", op_name, shape, sigma_y, seed)
    assert _distance(problem, method, nfe, sigma_y=sigma_y) < bound * problem[4]


def test_sdedit_follows_its_guide_at_small_t0():
    prior, op, y, ref, _ = _problem("vp", "mask", (2,), 0.0)
    guide = torch.tensor([[0.0, 0.45]], dtype=torch.float64)
    near = solve_inverse(prior, op, y, method="sdedit", n=200, nfe=20, t0=0.01, guide=guide).samples
    far = solve_inverse(prior, op, y, method="sdedit", n=200, nfe=20, t0=1.0, guide=guide).samples
    assert float((near[:, 1] - 0.45).abs().mean()) < 0.5 * float((far[:, 1] - 0.45).abs().mean())
    with pytest.raises(ValueError, match="guide must have shape"):
        solve_inverse(prior, op, y, method="sdedit", n=2, guide=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="t0 must lie in"):
        solve_inverse(prior, op, y, method="sdedit", n=2, t0=2.0)
