"""DPM-Solver, DPM-Solver++ (2M/3M), SDE-DPM-Solver++, the UniPC-style predictor-corrector and the
focus grid: equivalences to round-off, convergence orders against the exact flow map, and the
statistics of the stochastic solver. Everything is seeded and float64 on small mixtures."""
import math

import pytest
import torch

from sde_diffusion import VPSDE, GaussianMixture, random_mixture, sample
from sde_diffusion.metrics import mode_statistics
from sde_diffusion.samplers import available_solvers, make_grid
from sde_diffusion.samplers.grids import focus_grid
from sde_diffusion.samplers.reference import exact_flow_map
from sde_diffusion.samplers._exp_integrator import exp_weights

from helpers import SDE_CLASSES as SDES  # noqa: E402
from helpers import convergence_slope as _slope  # noqa: E402
from helpers import flow_reference as _reference  # noqa: E402
from helpers import mixture_problem as _problem  # noqa: E402
from helpers import rms as _rms  # noqa: E402


# ---- equivalences -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("grid", ["logsnr", "karras"])
def test_ddim_equals_first_order_dpm_solver(kind, grid):
    sde, mix, x_T = _problem(kind)
    ddim = sample(mix, sde, x_T=x_T, solver="ddim", steps=9, grid=grid).samples
    scale = float(ddim.abs().max())
    for solver, options in [("dpm_solver", {"order": 1}), ("dpm_solver_1", {}),
                            ("dpm_solver++", {"order": 1}),
                            ("unipc", {"order": 1, "corrector": False})]:
        other = sample(mix, sde, x_T=x_T, solver=solver, steps=9, grid=grid, **options)
        assert other.nfe == 9
        assert torch.allclose(other.samples, ddim, rtol=0, atol=1e-12 * scale), (solver, kind)


@pytest.mark.parametrize("grid", ["karras", "quadratic"])
def test_unipc_predictor_is_dpm_solver_pp_on_any_grid(grid):
    """Two derivations -- divided differences (DPM-Solver++) and exact integration of the Lagrange
    interpolant (unipc without corrector) -- agree to round-off on non-uniform grids too; this pins
    the 3M coefficient of D_2."""
    sde, mix, x_T = _problem("vp")
    for order in (2, 3):
        a = sample(mix, sde, x_T=x_T, solver="unipc", steps=11, grid=grid, order=order,
                   corrector=False).samples
        b = sample(mix, sde, x_T=x_T, solver="dpm_solver++", steps=11, grid=grid, order=order).samples
        assert torch.allclose(a, b, rtol=0, atol=1e-13), order


def test_sde_dpm_solver_first_order_is_ddim_eta_one():
    sde, mix, x_T = _problem("vp")
    a = sample(mix, sde, x_T=x_T, solver="sde_dpm_solver++", steps=7, grid="logsnr", order=1,
               generator=3).samples
    b = sample(mix, sde, x_T=x_T, solver="ddim", steps=7, grid="logsnr", eta=1.0, generator=3).samples
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_exp_weights_integrate_polynomials_exactly():
    for h in (1e-3, 0.3, 1.0, 3.0):
        nodes = [-1.3 * h, -0.6 * h, 0.0, h]
        w = exp_weights(nodes, h)
        for j in range(4):
            # int_0^h e^{u-h} u^j du by the trapezoidal rule on a fine grid
            us = torch.linspace(0, h, 200001, dtype=torch.float64)
            f = torch.exp(us - h) * us ** j
            exact = float(torch.trapezoid(f, us))
            got = sum(wk * u ** j for wk, u in zip(w.tolist(), nodes))
            assert got == pytest.approx(exact, rel=1e-7, abs=1e-14), (h, j)


# ---- convergence orders against the exact flow map ------------------------------------------------
ORDER_CASES = [
    # solver, options, steps (asymptotic range), expected order, tolerance
    ("dpm_solver", {"order": 2}, [40, 80, 160], 2.0, 0.3),
    ("dpm_solver", {"order": 3}, [40, 80, 160], 3.0, 0.4),
    ("dpm_solver++", {"order": 2}, [40, 80, 160], 2.0, 0.3),
    ("dpm_solver++", {"order": 3}, [40, 80, 160], 3.0, 0.4),
    ("unipc", {"order": 2}, [40, 80, 160], 3.0, 0.5),
    ("unipc", {"order": 3}, [40, 80, 160], 4.0, 0.6),
]


@pytest.mark.parametrize("solver,options,steps,order,tol", ORDER_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in ORDER_CASES])
def test_convergence_order_vp(solver, options, steps, order, tol):
    sde, mix, x_T, ref = _reference("vp")
    errors = [_rms(sample(mix, sde, x_T=x_T, solver=solver, steps=n, grid="logsnr",
                          **options).samples, ref) for n in steps]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert abs(_slope(errors, steps) - order) < tol, errors


@pytest.mark.parametrize("kind", ["subvp", "ve"])
def test_third_order_on_other_sdes(kind):
    sde, mix, x_T, ref = _reference(kind)
    steps = [40, 80, 160]
    for solver, options in [("dpm_solver++", {"order": 3}), ("dpm_solver", {"order": 3})]:
        errors = [_rms(sample(mix, sde, x_T=x_T, solver=solver, steps=n, grid="logsnr",
                              **options).samples, ref) for n in steps]
        assert abs(_slope(errors, steps) - 3.0) < 0.5, (solver, errors)


def test_nfe_accounting_and_budget():
    sde, mix, x_T = _problem("vp")
    assert sample(mix, sde, x_T=x_T, solver="dpm_solver", steps=5, order=2).nfe == 10
    assert sample(mix, sde, x_T=x_T, solver="dpm_solver", steps=5).nfe == 15
    assert sample(mix, sde, x_T=x_T, solver="dpm_solver", nfe=20, order=2).nfe == 20
    assert sample(mix, sde, x_T=x_T, solver="dpm_solver_3", nfe=20).nfe == 18
    for solver in ("dpm_solver++", "dpm_solver++_2m", "dpm_solver++_3m", "unipc", "sde_dpm_solver++"):
        assert sample(mix, sde, x_T=x_T, solver=solver, steps=6, generator=0).nfe == 6, solver


def test_fast_order_schedule():
    """DPM-Solver-fast (Lu et al. 2022, Sec. 3.4): the orders spend exactly the budget."""
    from sde_diffusion.samplers.dpm_solver import fast_orders

    assert fast_orders(3) == [2, 1] and fast_orders(4) == [3, 1] and fast_orders(5) == [3, 2]
    assert fast_orders(9) == [3, 3, 2, 1] and fast_orders(10) == [3, 3, 3, 1]
    assert fast_orders(11) == [3, 3, 3, 2] and fast_orders(2) == [1, 1] and fast_orders(1) == [1]
    assert fast_orders(7, order=2) == [2, 2, 2, 1] and fast_orders(8, order=2) == [2] * 4
    assert fast_orders(4, order=1) == [1] * 4
    for order in (1, 2, 3):
        for nfe in range(1, 40):
            orders = fast_orders(nfe, order)
            assert sum(orders) == nfe and max(orders) <= order and (nfe < 3 or len(orders) >= 2)
    with pytest.raises(ValueError, match="nfe must be an integer >= 1, got 0"):
        fast_orders(0)


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
def test_dpm_solver_spends_every_nfe_and_is_stable_at_low_budgets(kind):
    """dpm_solver (order 3) at NFE 3-5 took one third-order step over the whole range (RMS error
    8-17 against the exact flow map) and NFE 4 and 5 spent 3. With DPM-Solver-fast's orders
    every NFE is spent and the error stays bounded (measured on three mixtures: at most 1.1 at
    NFE 3, 2.1 at any NFE in 2..10, the worst being NFE 5 = orders [3, 2] on sub-VP) and falls."""
    sde, mix, x_T, ref = _reference(kind)
    errors = {}
    for nfe in range(2, 11):
        r = sample(mix, sde, x_T=x_T, solver="dpm_solver", nfe=nfe)
        assert r.nfe == nfe and len(r.times) == len(fast_orders_of(nfe)) + 1, nfe
        errors[nfe] = _rms(r.samples, ref)
    assert all(math.isfinite(e) for e in errors.values()), errors
    assert errors[3] < 1.5, errors
    assert max(errors.values()) < 2.5, errors
    assert errors[10] < 0.3 and errors[10] < errors[3] / 2, errors
    # the same with order 2 (pairs of second-order steps, a first-order one for odd budgets)
    for nfe in (3, 6, 9):
        r = sample(mix, sde, x_T=x_T, solver="dpm_solver", order=2, nfe=nfe)
        assert r.nfe == nfe and _rms(r.samples, ref) < 1.5


def fast_orders_of(nfe):
    from sde_diffusion.samplers.dpm_solver import fast_orders
    return fast_orders(nfe)


def test_dpm_solver_orders_option_and_cost():
    sde, mix, x_T = _problem("vp")
    info = available_solvers()["dpm_solver"]
    assert info.cost(4, orders=[3, 3, 2, 1]) == 9 and info.cost(4) == 12
    assert info.for_nfe(10) == (4, {"orders": [3, 3, 3, 1]})
    planned = sample(mix, sde, x_T=x_T, solver="dpm_solver", nfe=9)
    explicit = sample(mix, sde, x_T=x_T, solver="dpm_solver", steps=4, orders=[3, 3, 2, 1])
    assert planned.nfe == explicit.nfe == 9 and torch.equal(planned.samples, explicit.samples)
    # orders [k] * steps is the fixed-order solver
    fixed = sample(mix, sde, x_T=x_T, solver="dpm_solver_2", steps=5).samples
    same = sample(mix, sde, x_T=x_T, solver="dpm_solver", steps=5, orders=[2] * 5).samples
    assert torch.equal(fixed, same)
    with pytest.raises(ValueError, match="orders has 3 entries for a grid of 4 steps"):
        sample(mix, sde, x_T=x_T, solver="dpm_solver", steps=4, orders=[3, 2, 1])
    with pytest.raises(ValueError, match="each 1, 2 or 3"):
        sample(mix, sde, x_T=x_T, solver="dpm_solver", steps=2, orders=[4, 1])
    with pytest.raises(ValueError, match="give nfe or orders, not both"):
        sample(mix, sde, x_T=x_T, solver="dpm_solver", nfe=6, orders=[3, 2, 1])
    # a custom grid with a budget: the budget's schedule must have the grid's steps
    grid = make_grid(sde, 4, "logsnr")
    on_grid = sample(mix, sde, x_T=x_T, solver="dpm_solver", nfe=10, grid=grid)
    assert on_grid.nfe == 10
    with pytest.raises(ValueError, match="nfe=6 gives solver 'dpm_solver' a grid of 3 steps"):
        sample(mix, sde, x_T=x_T, solver="dpm_solver", nfe=6, grid=grid)


def test_float32_keeps_dtype_and_is_close_to_float64():
    sde, mix, x_T = _problem("vp")
    for solver in ("dpm_solver", "dpm_solver++", "unipc", "sde_dpm_solver++"):
        a = sample(mix, sde, x_T=x_T.float(), solver=solver, steps=10, grid="logsnr", generator=1)
        b = sample(mix, sde, x_T=x_T, solver=solver, steps=10, grid="logsnr", generator=1)
        assert a.samples.dtype == torch.float32
        if solver != "sde_dpm_solver++":
            assert torch.allclose(a.samples.double(), b.samples, atol=1e-4), solver


def test_invalid_options_are_rejected():
    sde, mix, x_T = _problem("vp")
    with pytest.raises(ValueError, match="order"):
        sample(mix, sde, x_T=x_T, solver="dpm_solver", steps=3, order=4)
    with pytest.raises(ValueError, match="order"):
        sample(mix, sde, x_T=x_T, solver="dpm_solver++", steps=3, order=5)
    with pytest.raises(ValueError, match="solver_type"):
        sample(mix, sde, x_T=x_T, solver="dpm_solver++", steps=3, solver_type="heun")
    with pytest.raises(ValueError, match="r1"):
        sample(mix, sde, x_T=x_T, solver="dpm_solver", steps=3, order=2, r1=1.5)
    with pytest.raises(ValueError, match="no option"):
        sample(mix, sde, x_T=x_T, solver="dpm_solver++_3m", steps=3, order=2)
    with pytest.raises(ValueError, match="order"):
        sample(mix, sde, x_T=x_T, solver="unipc", steps=3, order=5)
    info = available_solvers()
    assert info["dpm_solver++"].is_deterministic() and not info["sde_dpm_solver++"].is_deterministic()


def test_nonfinite_model_output_names_step_and_time():
    from sde_diffusion import ScoreModel
    from sde_diffusion.models.wrapper import NonFiniteError
    sde = VPSDE()

    def net(x, t):
        out = torch.zeros_like(x)
        out[t < 0.5] = float("nan")
        return out

    model = ScoreModel(net, sde, parameterization="eps")
    for solver in ("dpm_solver", "dpm_solver++", "unipc", "sde_dpm_solver++"):
        with pytest.raises(NonFiniteError, match=r"step \d+ of 10"):
            sample(model, shape=(3, 2), solver=solver, steps=10, grid="logsnr", generator=0)


# ---- the stochastic high-order solver reproduces the mixture ------------------------------------------
def _separated_mixture(sde):
    means = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    return GaussianMixture([0.1, 0.2, 0.3, 0.4], means, [0.08, 0.1, 0.12, 0.1], sde)


def p_at(mix, t):
    tt = torch.tensor(t, dtype=torch.float64)
    _, log_a, log_s = mix.sde.log_scales(tt)
    a, s = float(log_a.exp()), float(log_s.exp())
    return GaussianMixture(mix.weights, a * mix.means, (a * a * mix.stds ** 2 + s * s).sqrt())


def assert_mode_statistics(samples, target, slack=0.02):
    """Weights, per-mode means and variances within 4.5 standard errors (plus a small slack for
    discretisation bias)."""
    st = mode_statistics(samples, target)
    n = samples.shape[0]
    w, w_true = st["weights"], st["true_weights"]
    assert bool(((w - w_true).abs() <= 4.5 * (w_true * (1 - w_true) / n).sqrt() + slack).all()), (w, w_true)
    counts = st["counts"]
    se_mean = (st["true_variances"] / counts[:, None]).sqrt()
    assert bool(((st["means"] - st["true_means"]).abs() <= 4.5 * se_mean + slack * st["true_variances"].sqrt()).all())
    se_var = (2.0 / (counts - 1)).sqrt()
    ratio = st["variances"] / st["true_variances"]
    assert bool(((ratio - 1).abs() <= 4.5 * se_var[:, None] + 2 * slack).all()), ratio


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_sde_dpm_solver_reproduces_mode_statistics(kind):
    sde = SDES[kind]()
    mix = _separated_mixture(sde)
    out = sample(mix, sde, shape=(4000, 2), solver="sde_dpm_solver++", steps=100, grid="logsnr",
                 generator=11, dtype=torch.float64)
    assert_mode_statistics(out.samples, p_at(mix, sde.eps))


def test_sde_dpm_solver_seeds():
    sde = VPSDE()
    mix = _separated_mixture(sde)
    a = sample(mix, sde, shape=(5, 2), solver="sde_dpm_solver++", steps=8, generator=1).samples
    b = sample(mix, sde, shape=(5, 2), solver="sde_dpm_solver++", steps=8, generator=1).samples
    c = sample(mix, sde, shape=(5, 2), solver="sde_dpm_solver++", steps=8, generator=2).samples
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per-sample generators: a sample does not depend on its batch companions
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(5))
    big = sample(mix, sde, x_T=x_T, solver="sde_dpm_solver++", steps=8, generator=gens([7, 8, 9])).samples
    one = sample(mix, sde, x_T=x_T[1:2], solver="sde_dpm_solver++", steps=8, generator=gens([8])).samples
    assert torch.allclose(big[1:2], one, atol=1e-6)


# ---- focus grid -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
def test_focus_grid_shape_and_density(kind):
    sde = SDES[kind]()
    g = focus_grid(sde, 20, sigma_data=0.5)
    assert g.dtype == torch.float64 and g.shape == (21,)
    assert float(g[0]) == sde.T and float(g[-1]) == sde.eps
    assert bool((g[1:] < g[:-1]).all())
    lam = sde.lambda_(g)
    steps = lam[1:] - lam[:-1]
    mid = (lam[1:] + lam[:-1]) / 2
    near = steps[(mid - math.log(2)).abs() < 1].mean()
    assert float(near) < float((lam[-1] - lam[0]) / 20)   # denser than log-SNR uniform near sigma_data
    # all uniform share: the log-SNR-uniform grid
    u = focus_grid(sde, 20, uniform_share=1.0)
    assert torch.allclose(u, make_grid(sde, 20, "logsnr"), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError):
        focus_grid(sde, 0)
    with pytest.raises(ValueError):
        focus_grid(sde, 5, sigma_data=-1)


def test_focus_grid_beats_logsnr_at_few_steps():
    """The reason the grid exists, on a mixture other than the benchmark's."""
    sde = VPSDE()
    mix = random_mixture(16, 8, seed=5, sde=sde)
    x_T = torch.randn(64, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = exact_flow_map(mix, x_T)
    sd = float(mix.covariance().diagonal().mean().sqrt())
    for steps in (10, 20):
        focus = _rms(sample(mix, sde, x_T=x_T, solver="unipc", steps=steps,
                            grid=focus_grid(sde, steps, sigma_data=sd)).samples, ref)
        plain = _rms(sample(mix, sde, x_T=x_T, solver="unipc", steps=steps, grid="logsnr").samples, ref)
        assert focus < plain, (steps, focus, plain)
