"""optimize_grid: a grid fitted on pilot noise generalises to fresh noise (checked against the exact
flow map), keeps its ends, and plugs into sample(); bad requests fail clearly."""
import pytest
import numpy as np
import torch

from sde_diffusion import VESDE, VPSDE, optimize_grid, random_mixture, sample
from sde_diffusion.samplers import NoiseSource, get_solver
from sde_diffusion.samplers.reference import exact_flow_map

SDES = {"vp": VPSDE(), "ve": VESDE()}
DIM = 8


@pytest.fixture(scope="module")
def held_out():
    """Fresh noise (not the pilot's) and its exact flow map, per SDE."""
    out = {}
    for name, sde in SDES.items():
        mix = random_mixture(DIM, 4, seed=3, sde=sde)
        x = torch.randn(256, DIM, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        x = x * sde.prior_std
        out[name] = (mix, x, exact_flow_map(mix, x))
    return out


def _rms(mix, sde, x, ref, solver, grid, **options):
    got = sample(mix, sde, x_T=x, solver=solver, grid=grid, **options).samples
    return float((got - ref).pow(2).mean().sqrt())


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("solver,steps", [("ddim", 6), ("dpm_solver++_2m", 6)])
def test_optimized_grid_beats_its_start_on_fresh_noise(held_out, name, solver, steps):
    """Fitted on 384 pilot trajectories (128 more held out for early stopping), the grid lowers the
    error against the exact flow map of *other* noise (measured 9-43% lower)."""
    sde = SDES[name]
    mix, x, ref = held_out[name]
    res = optimize_grid(mix, sde, solver, steps, shape=(512, DIM), generator=5, max_evals=200,
                        dtype=torch.float64, grid=get_solver(solver).grid)
    assert res.pilot_error < res.initial_error
    assert res.validation_error < res.initial_validation_error and res.validation_size == 128
    assert res.teacher_error < 1e-3 * res.initial_error
    before = _rms(mix, sde, x, ref, solver, res.initial_times)
    after = _rms(mix, sde, x, ref, solver, res.times)
    assert after < 0.95 * before, (before, after)


@pytest.mark.parametrize("name", sorted(SDES))
def test_default_start_is_the_best_named_grid_on_the_pilot(held_out, name):
    """grid=None starts the search from whichever of the solver's own grid and START_GRIDS fits the
    pilot best (one run each), and the result beats the solver's own grid on fresh noise."""
    from sde_diffusion.samplers.tuning import START_GRIDS

    sde = SDES[name]
    mix, x, ref = held_out[name]
    fit = dict(shape=(512, DIM), generator=5, dtype=torch.float64, method="gradient")
    res = optimize_grid(mix, sde, "ddim", 6, **fit)
    own = get_solver("ddim").grid
    start_errors = {g: optimize_grid(mix, sde, "ddim", 6, grid=g, max_evals=1, **fit).initial_error
                    for g in dict.fromkeys((own,) + START_GRIDS)}
    assert res.start_grid == min(start_errors, key=start_errors.get)
    assert res.initial_error == pytest.approx(min(start_errors.values()), rel=1e-12)
    plain = sample(mix, sde, x_T=x, solver="ddim", steps=6).samples
    before = float((plain - ref).pow(2).mean().sqrt())
    assert _rms(mix, sde, x, ref, "ddim", res.times) < 0.95 * before


def test_smooth_density_parameterisation(held_out):
    """knots=4: four numbers shape the whole grid, and it still generalises."""
    sde = SDES["vp"]
    mix, x, ref = held_out["vp"]
    res = optimize_grid(mix, sde, "ddim", 6, shape=(512, DIM), generator=5, knots=4, max_evals=200,
                        dtype=torch.float64, grid=get_solver("ddim").grid)
    before = _rms(mix, sde, x, ref, "ddim", res.initial_times)
    after = _rms(mix, sde, x, ref, "ddim", res.times)
    assert after < 0.7 * before, (before, after)


def test_result_is_a_valid_grid_for_sample():
    sde = VPSDE()
    mix = random_mixture(2, 3, seed=0, sde=sde)
    res = optimize_grid(mix, sde, "dpm_solver_2", nfe=8, shape=(64, 2), max_evals=40,
                        t_start=0.9, t_end=0.01, grid="logsnr")
    times = res.times
    assert times.dtype == torch.float64 and times.shape == (5,)          # 8 NFE = 4 two-stage steps
    assert bool((times[1:] < times[:-1]).all())
    assert (float(times[0]), float(times[-1])) == (0.9, 0.01)
    assert res.nfe == 8 and res.solver == "dpm_solver_2" and res.pilot_size == 64
    assert res.evaluations <= 40 + 1 and res.model_calls > 0
    out = sample(mix, sde, shape=(16, 2), solver="dpm_solver_2", grid=times, generator=0)
    assert out.nfe == res.nfe


def test_step_ratio_bound_holds():
    """Consecutive log-SNR steps of the fitted grid differ by at most max_ratio."""
    sde = VPSDE()
    mix = random_mixture(DIM, 4, seed=3, sde=sde)
    for bound in (1.5, 3.0):
        res = optimize_grid(mix, sde, "dpm_solver++_2m", 8, shape=(128, DIM), generator=5,
                            max_evals=150, max_ratio=bound, validation=0, grid="logsnr")
        h = sde.lambda_(res.times).diff()
        ratio = h[1:] / h[:-1]
        assert float(ratio.max()) <= bound * (1 + 1e-9) and float(ratio.min()) >= 1 / bound / (1 + 1e-9)
        assert not torch.equal(res.times, res.initial_times)   # it did move


def test_ratio_bound_is_relative_to_a_start_that_exceeds_it():
    """The focus grid at 4 steps has a first step ratio of ~0.45, beyond a factor 2: the search
    starts from that grid exactly (its first run has the start's error) and every ratio of the
    fit stays within a factor 2 of the start's."""
    from sde_diffusion.samplers import make_grid
    from sde_diffusion.samplers.tuning import _free_points

    sde = VPSDE()
    start = make_grid(sde, 4, "focus", sigma_data=0.34)
    lam = sde.lambda_(start).numpy()
    h0 = np.diff(lam)
    assert (h0[1:] / h0[:-1]).min() < 0.5                        # the start exceeds the bound
    lam_of, z0 = _free_points(lam, 2.0)
    np.testing.assert_allclose(lam_of(z0), lam, rtol=0, atol=1e-12)
    mix = random_mixture(DIM, 4, seed=3, sde=sde)
    res = optimize_grid(mix, sde, "ipndm", 4, order=3, shape=(128, DIM), generator=5,
                        grid="focus", sigma_data=0.34, max_evals=60, validation=0)
    assert res.pilot_error < res.initial_error                    # it did move, and helped
    h = sde.lambda_(res.times).diff().numpy()
    change = (h[1:] / h[:-1]) / (h0[1:] / h0[:-1])
    assert change.max() <= 2 * (1 + 1e-9) and change.min() >= 0.5 / (1 + 1e-9)


def test_same_inputs_same_grid():
    sde = VPSDE()
    mix = random_mixture(2, 3, seed=0, sde=sde)
    runs = [optimize_grid(mix, sde, "unipc", 4, shape=(32, 2), generator=7, max_evals=30).times
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("kwargs,message", [
    (dict(solver="ddim", steps=4, eta=1.0), "stochastic"),
    (dict(solver="euler_maruyama", steps=4), "stochastic"),
    (dict(solver="edm_heun", steps=4, S_churn=40.0), "stochastic"),
    (dict(solver="pc", steps=4, predictor="ddim", n_steps=1), "stochastic"),
    (dict(solver="ode", steps=4), "adaptive"),
    (dict(solver="ddim", steps=1), "at least 2 steps"),
    (dict(solver="ddim"), "steps or nfe"),
    (dict(solver="ddim", steps=4, nfe=4), "not both"),
    (dict(solver="ddim", steps=4, teacher_steps=5), "teacher_steps"),
    (dict(solver="ddim", steps=4, knots=1), "knots"),
    (dict(solver="ddim", steps=4, max_evals=0), "max_evals"),
    (dict(solver="ddim", steps=4, max_ratio=1.0), "max_ratio"),
    (dict(solver="ddim", steps=4, validation=1.0), "validation"),
    (dict(solver="ddim", steps=4, validation=0.01), "leaves no"),
    (dict(solver="ddim", steps=4, grid=torch.tensor([1.0, 0.5, 0.001])), "2 steps, but steps=4"),
    (dict(solver="nope", steps=4), "valid solvers"),
    (dict(solver="ddim", steps=4, order=2), "has no option"),
    (dict(solver="ddim", steps=2, grid=torch.tensor([1.0, 0.5, 0.6])), "decreasing"),
])
def test_bad_requests_fail_clearly(kwargs, message):
    sde = VPSDE()
    mix = random_mixture(2, 3, seed=0, sde=sde)
    kwargs = {"max_evals": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        optimize_grid(mix, sde, shape=(8, 2), **kwargs)


def test_pilot_given_as_x_T_equals_pilot_drawn_from_shape():
    """``x_T=`` takes the pilot states themselves: the prior noise of the same seed gives the same grid."""
    sde = VPSDE()
    mix = random_mixture(2, 3, seed=0, sde=sde)
    drawn = optimize_grid(mix, sde, "ddim", 4, shape=(32, 2), generator=3, max_evals=30)
    x_T = NoiseSource(3, (32, 2), torch.float32, "cpu").prior() * sde.prior_std   # seed 3's x_T
    given = optimize_grid(mix, sde, "ddim", 4, x_T=x_T, max_evals=30)
    assert torch.equal(drawn.times, given.times) and given.pilot_size == 32


def test_pilot_needs_exactly_one_of_shape_and_x_T():
    sde = VPSDE()
    mix = random_mixture(2, 3, seed=0, sde=sde)
    with pytest.raises(ValueError, match="exactly one of shape"):
        optimize_grid(mix, sde, "ddim", 4)
    with pytest.raises(ValueError, match="exactly one of shape"):
        optimize_grid(mix, sde, "ddim", 4, shape=(4, 2), x_T=torch.zeros(4, 2))


@pytest.mark.parametrize("solver, options", [("edm_heun", {}), ("edm_euler", {"S_churn": 0.0}),
                                             ("ddim", {"eta": 0.0}),
                                             ("pc", {"predictor": "ddim", "corrector": "none"})])
def test_deterministic_configurations_of_stochastic_capable_solvers_are_accepted(solver, options):
    """The registry's declaration decides: EDM without churn, DDIM at eta=0 and PC without
    corrector steps and with a deterministic predictor are deterministic (optimize_grid refused
    edm_heun without churn before its determinism was declared with the solver)."""
    from sde_diffusion.samplers.tuning import check_grid_request

    assert check_grid_request(solver, steps=4, **options) == 4
    sde = VPSDE()
    fit = optimize_grid(random_mixture(2, 3, seed=0, sde=sde), sde, solver, 3, shape=(16, 2),
                        generator=7, max_evals=6, teacher_steps=12, **options)
    assert len(fit.times) == 4 and fit.nfe == get_solver(solver).cost(3, **options)


def test_grid_file_round_trips(tmp_path):
    """save/load keep every field (times bit for bit, the SDE by its parameters); a loaded grid
    samples as the fitted one and refuses another SDE."""
    from sde_diffusion.samplers.tuning import OptimizedGrid

    mix = random_mixture(dim=2, n_components=3, seed=0, sde=VPSDE(schedule="cosine"))
    fit = optimize_grid(mix, solver="unipc", order=3, nfe=5, shape=(32, 2), max_evals=5,
                        dtype=torch.float64)
    path = tmp_path / "g.json"
    fit.save(path)
    back = OptimizedGrid.load(path)
    assert torch.equal(back.times, fit.times) and torch.equal(back.initial_times, fit.initial_times)
    assert back.sde == mix.sde and back.start_grid == fit.start_grid != "custom"
    for name in ("solver", "options", "nfe", "pilot_error", "validation_error", "evaluations",
                 "model_calls", "pilot_size", "validation_size"):
        assert getattr(back, name) == getattr(fit, name), name
    assert back.effective_options() == {**get_solver("unipc").defaults(), "order": 3}
    assert torch.equal(back.times_for(mix.sde), fit.times)
    with pytest.raises(ValueError, match="fitted under VPSDE.*cosine_s=0.008.*cosine_s=0.01"):
        back.times_for(VPSDE(schedule="cosine", cosine_s=0.01))
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError, match="is not a grid file: its format is 'x'"):
        OptimizedGrid.load(tmp_path / "bad.json")


def test_grid_file_of_an_sde_without_a_name(tmp_path):
    """A user's own SDE class has no name in SDE_NAMES: its grid file records the repr and is
    checked by it."""
    from sde_diffusion.samplers.tuning import OptimizedGrid

    class MyVP(VPSDE):
        pass

    mix = random_mixture(dim=2, n_components=3, seed=0, sde=MyVP())
    fit = optimize_grid(mix, solver="ddim", nfe=4, shape=(16, 2), max_evals=3)
    fit.save(tmp_path / "g.json")
    back = OptimizedGrid.load(tmp_path / "g.json")
    assert back.sde is None and back.legacy_sde == repr(MyVP())
    assert torch.equal(back.times_for(MyVP()), fit.times)
    with pytest.raises(ValueError, match="fitted under"):
        back.times_for(VPSDE(beta_max=10.0))
