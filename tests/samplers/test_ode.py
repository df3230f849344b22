"""Probability-flow ODE solvers against the exact flow map (float64 scipy DOP853 reference):
convergence orders of the fixed-step solvers (and DDIM), the adaptive solvers' tolerance, backends
and per-sample error control."""
import math

import numpy as np
import pytest
import torch

from sde_diffusion import GaussianMixture, VESDE, VPSDE, SubVPSDE, sample
from sde_diffusion.samplers.reference import exact_flow_map

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def separated_mixture(sde, stds=(0.06, 0.08, 0.1, 0.07)):
    """Four separated modes in 2-D with unequal weights and widths."""
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    means = torch.tensor([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]], dtype=torch.float64)
    return GaussianMixture(weights, means, torch.tensor(stds, dtype=torch.float64), sde)


@pytest.fixture(scope="module", params=sorted(SDES))
def case(request):
    """Wider modes than the samplers' statistics tests use: the flow map is smoother, so the
    solvers reach their asymptotic order at fewer NFE (a cheap test)."""
    sde = SDES[request.param]()
    mix = separated_mixture(sde, stds=(0.15, 0.2, 0.25, 0.18))
    x_T = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sde.prior_std
    ref = exact_flow_map(mix, x_T, rtol=1e-12, atol=1e-12)
    return request.param, mix, x_T, ref


def _rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


def fitted_order(mix, x_T, ref, solver, steps, **options):
    """Slope of log(error) against log(NFE) (least squares) on the log-SNR grid; the error is the
    median over samples of each sample's error norm (robust to one sample that, starting near a
    boundary between modes, reaches the asymptotic regime later than the others)."""
    nfes, errors = [], []
    for n in steps:
        result = sample(mix, x_T=x_T, solver=solver, steps=n, grid="logsnr", **options)
        nfes.append(result.nfe)
        errors.append(float((result.samples - ref).norm(dim=1).median()))
    assert all(b < a for a, b in zip(errors, errors[1:])), (solver, errors)
    return -float(np.polyfit(np.log(nfes), np.log(errors), 1)[0]), errors


@pytest.mark.parametrize("solver, steps, lo, hi", [
    ("ode_euler", (50, 100, 200, 400), 0.85, 1.15),
    ("ddim", (25, 50, 100, 200), 0.85, 1.15),
    ("ode_heun", (20, 40, 80, 160), 1.75, 2.25),
    ("ode_rk4", (10, 20, 40, 80), 3.3, 4.6),
])
def test_convergence_order(case, solver, steps, lo, hi):
    name, mix, x_T, ref = case
    order, errors = fitted_order(mix, x_T, ref, solver, steps)
    assert lo < order < hi, f"{solver} under {name}: fitted order {order:.2f}, errors {errors}"


def test_reference_is_converged(case):
    """The reference at rtol 1e-12 agrees with the default 1e-10 one and with a fine RK4 in t."""
    name, mix, x_T, ref = case
    coarse = exact_flow_map(mix, x_T[:4])
    assert _rms(coarse, ref[:4]) < 1e-8
    rk4 = sample(mix, x_T=x_T[:4], solver="ode_rk4", steps=100, grid="logsnr").samples
    assert _rms(rk4, ref[:4]) < 1e-5


def test_adaptive_error_shrinks_with_rtol(case):
    name, mix, x_T, ref = case
    errors, nfes = [], []
    for tol in (1e-3, 1e-5, 1e-7):
        result = sample(mix, x_T=x_T, solver="ode", rtol=tol, atol=tol)
        errors.append(_rms(result.samples, ref))
        nfes.append(result.nfe)
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-5 and nfes[0] < nfes[1] < nfes[2]


def test_scipy_backend_agrees_with_torchdiffeq(case):
    name, mix, x_T, ref = case
    tdq = sample(mix, x_T=x_T[:4], solver="ode", rtol=1e-6, atol=1e-6)
    sci = sample(mix, x_T=x_T[:4], solver="ode_scipy", rtol=1e-6, atol=1e-6)
    assert sci.nfe > 0 and tdq.nfe > 0
    assert _rms(sci.samples, ref[:4]) < 1e-4 and _rms(tdq.samples, ref[:4]) < 1e-4
    torch.testing.assert_close(sci.samples, tdq.samples, rtol=0, atol=1e-4)


@pytest.mark.parametrize("solver, options", [
    ("ode", {}), ("ode", {"method": "bosh3", "rtol": 1e-3}), ("ode_scipy", {})])
def test_per_sample_error_control_is_independent_of_the_batch(solver, options):
    sde = VPSDE()
    mix = separated_mixture(sde)
    x_T = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kw = dict(solver=solver, per_sample=True, **{"rtol": 1e-4, "atol": 1e-4, **options})
    batch = sample(mix, x_T=x_T, **kw)
    alone = sample(mix, x_T=x_T[1:2], **kw)
    torch.testing.assert_close(alone.samples, batch.samples[1:2], rtol=0, atol=1e-12)
    with_others = sample(mix, x_T=torch.cat([x_T[1:2], -3 * x_T[:3]]), **kw)
    torch.testing.assert_close(with_others.samples[:1], batch.samples[1:2], rtol=0, atol=1e-12)
    ref = exact_flow_map(mix, x_T)
    assert _rms(batch.samples, ref) < 1e-2


def test_adaptive_options_are_checked():
    sde = VPSDE()
    mix = separated_mixture(sde)
    with pytest.raises(ValueError, match="rtol must be a finite number > 0"):
        sample(mix, shape=(2, 2), solver="ode", rtol=0.0)
    with pytest.raises(ValueError, match="method must be one of .*dopri5.* got 'rk45'"):
        sample(mix, shape=(2, 2), solver="ode", method="rk45")
    with pytest.raises(ValueError, match="per_sample must be True or False"):
        sample(mix, shape=(2, 2), solver="ode_scipy", per_sample=1)


def test_float32_adaptive_and_fixed_step():
    sde = VPSDE()
    mix = separated_mixture(sde)
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    ref = exact_flow_map(mix, x_T.double())
    for solver, steps in (("ode", None), ("ode_scipy", None), ("ode_heun", 50), ("ode_rk4", 25)):
        result = sample(mix, x_T=x_T, solver=solver, steps=steps, grid="logsnr")
        assert result.samples.dtype == torch.float32
        assert _rms(result.samples.double(), ref) < 2e-3, solver
    assert exact_flow_map(mix, x_T).dtype == torch.float32


def test_exact_flow_map_checks_and_options():
    sde = VESDE()
    mix = separated_mixture(sde)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    from sde_diffusion import OracleModel

    model = OracleModel(mix)
    whole = exact_flow_map(model, x, t_start=0.6, t_end=0.1)
    assert model.nfe == 0, "the reference does not count as sampling work"
    torch.testing.assert_close(exact_flow_map(mix, x, 0.6, 0.1, per_sample=True), whole,
                               rtol=0, atol=1e-8)
    # the map composes: 0.6 -> 0.3 -> 0.1 equals 0.6 -> 0.1
    half = exact_flow_map(mix, x, 0.6, 0.3)
    torch.testing.assert_close(exact_flow_map(mix, half, 0.3, 0.1), whole, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="0 < t_end < t_start"):
        exact_flow_map(mix, x, 0.1, 0.6)
    with pytest.raises(ValueError, match="floating-point tensor"):
        exact_flow_map(mix, x.long())
    assert math.isfinite(float(exact_flow_map(mix, x[:1]).sum()))
