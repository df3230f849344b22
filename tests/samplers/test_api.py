"""The entry point ``sample`` and what every registered solver owes it: shapes, dtypes, devices,
seeding, per-sample generators, NaN reporting, NFE accounting, progress, callback, trajectory."""
import math

import pytest
import torch

from sde_diffusion import ScoreModel, VPSDE, random_mixture, sample
from sde_diffusion.models import NonFiniteError
from sde_diffusion.samplers import available_solvers, get_solver, make_grid

SDE = VPSDE()
MIX = random_mixture((2, 3), 3, seed=1, sde=SDE)          # event shape (2, 3): "batch of any shape"
SOLVERS = sorted(available_solvers())
STEPS = 4
# options that make a solver's samples independent of their batch companions
BATCH_FREE = {"ode": {"per_sample": True}, "ode_scipy": {"per_sample": True},
              "pc": {"snr_norm": "sample"}}


def _gens(seeds, device="cpu"):
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", SOLVERS)
def test_shape_dtype_device_and_nfe(solver, dtype):
    info = get_solver(solver)
    steps = None if info.adaptive else STEPS
    result = sample(MIX, shape=(3, 2, 3), solver=solver, steps=steps, generator=0, dtype=dtype,
                    device="cpu")
    assert result.samples.shape == (3, 2, 3)
    assert result.samples.dtype == dtype and result.samples.device.type == "cpu"
    assert bool(torch.isfinite(result.samples).all())
    assert result.solver == solver and result.trajectory is None
    if not info.adaptive:
        assert result.nfe == info.cost(STEPS), "the registry's NFE cost must match the real count"
        assert len(result.times) == STEPS + 1
    else:
        assert result.nfe > 0 and len(result.times) == 2    # default grid: one interval
    x_T = torch.randn(3, 2, 3, dtype=dtype, generator=torch.Generator().manual_seed(3))
    again = sample(MIX, x_T=x_T, solver=solver, steps=steps, generator=0)
    assert again.samples.shape == x_T.shape and again.samples.dtype == dtype


@pytest.mark.parametrize("solver", SOLVERS)
def test_seeds_reproduce(solver):
    info = get_solver(solver)
    kw = dict(shape=(4, 2, 3), solver=solver, steps=STEPS, dtype=torch.float64)
    a = sample(MIX, generator=7, **kw).samples
    assert torch.equal(a, sample(MIX, generator=7, **kw).samples)
    # a torch.Generator draws batch-level noise (an int seed indexed noise): reproducible too
    b = sample(MIX, generator=torch.Generator().manual_seed(7), **kw).samples
    assert torch.equal(b, sample(MIX, generator=torch.Generator().manual_seed(7), **kw).samples)
    c = sample(MIX, generator=8, **kw).samples
    assert not torch.equal(a, c)
    x_T = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d = sample(MIX, x_T=x_T, solver=solver, steps=STEPS, generator=1).samples
    e = sample(MIX, x_T=x_T, solver=solver, steps=STEPS, generator=2).samples
    if info.is_deterministic():
        assert torch.equal(d, e), "a deterministic solver must not draw noise"


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_generators_make_samples_batch_independent(solver):
    options = BATCH_FREE.get(solver, {})
    kw = dict(solver=solver, steps=STEPS, dtype=torch.float64, **options)
    big = sample(MIX, shape=(5, 2, 3), generator=_gens([10, 11, 12, 13, 14]), **kw).samples
    small = sample(MIX, shape=(2, 2, 3), generator=_gens([10, 11]), **kw).samples
    torch.testing.assert_close(small, big[:2], rtol=0, atol=1e-12)
    alone = sample(MIX, shape=(1, 2, 3), generator=_gens([12]), **kw).samples
    torch.testing.assert_close(alone, big[2:3], rtol=0, atol=1e-12)


# options that make a stochastic solver draw noise (DDIM's default eta=0 and EDM's samplers
# without churn draw none)
NOISY = {"ddim": {"eta": 1.0}, "edm_heun": {"S_churn": 10.0}, "edm_euler": {"S_churn": 10.0}}
STOCHASTIC = [name for name, info in available_solvers().items()
              if not info.is_deterministic(**NOISY.get(name, {}))]


# configurations whose determinism depends on the options, with the declared answer
DECLARED = [("ddim", {}, True), ("ddim", {"eta": 0.5}, False), ("edm_heun", {}, True),
            ("edm_heun", {"S_churn": 10.0}, False), ("edm_euler", {"S_churn": 10.0, "S_noise": 0.0}, True),
            ("pc", {}, False), ("pc", {"corrector": "none"}, False),
            ("pc", {"corrector": "none", "predictor": "ddim"}, True),
            ("pc", {"n_steps": 0, "predictor": "dpm_solver_2"}, True),
            ("pc", {"corrector": "none", "predictor": "ddim", "eta": 1.0}, False)]


@pytest.mark.parametrize("solver, options, declared",
                         DECLARED + [(n, {}, get_solver(n).is_deterministic()) for n in SOLVERS
                                     if n not in {d[0] for d in DECLARED}])
def test_determinism_is_declared_honestly(solver, options, declared):
    """SolverInfo.is_deterministic(**options), the one answer compare, optimize_grid, the CLI and
    the benchmarks use, says whether two noise seeds give the same samples."""
    assert get_solver(solver).is_deterministic(**options) is declared
    with pytest.raises(ValueError, match="has no option 'etta'"):
        get_solver("ddim").is_deterministic(etta=1.0)        # a typo is not read as the default
    steps = None if get_solver(solver).adaptive else STEPS
    x_T = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = (sample(MIX, x_T=x_T, solver=solver, steps=steps, generator=g, **options).samples
            for g in (1, 2))
    assert torch.equal(a, b) is declared


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_integer_seed_noise_follows_the_sample_index_not_the_batch_size(solver):
    """Same seed, different batch size: the same samples (x_T from the seed and every step's
    noise); disjoint index_offset slices make up the full batch; the solver's noise does not
    depend on whether x_T came from the seed or was given."""
    options = {**BATCH_FREE.get(solver, {}), **NOISY.get(solver, {})}
    kw = dict(solver=solver, steps=STEPS, dtype=torch.float64, generator=0, **options)
    full = sample(MIX, shape=(16, 2, 3), return_trajectory=True, **kw)
    first = sample(MIX, shape=(8, 2, 3), return_trajectory=True, **kw)
    torch.testing.assert_close(first.trajectory, full.trajectory[:, :8], rtol=0, atol=1e-12)
    parts = [sample(MIX, shape=(n, 2, 3), index_offset=offset, **kw).samples
             for offset, n in [(0, 3), (3, 6), (9, 7)]]
    torch.testing.assert_close(torch.cat(parts), full.samples, rtol=0, atol=1e-12)
    x_T = full.trajectory[0]
    given = sample(MIX, x_T=x_T, **kw).samples
    torch.testing.assert_close(given, full.samples, rtol=0, atol=1e-12)
    other_seed = sample(MIX, x_T=x_T, **{**kw, "generator": 1}).samples
    assert not torch.allclose(other_seed, full.samples), "the solver must draw noise"


def test_indexed_noise_chunks_and_offsets():
    """The noise source itself, over chunk boundaries (whole chunks drawn in place, partial ones
    through the scratch chunk): rows depend on (seed, index, draw) only; chunks and draws differ."""
    from sde_diffusion.samplers import NoiseSource
    from sde_diffusion.samplers.base import chunk_size

    event = (4, 32, 32)
    assert chunk_size(event) == 64 and chunk_size((2,)) == 256 and chunk_size((3, 256, 256)) == 1
    ref = NoiseSource(5, (300,) + event, torch.float32, "cpu")
    draws = [ref.prior()] + [ref.randn() for _ in range(3)]
    for offset, n in [(0, 64), (0, 200), (37, 100), (64, 128), (250, 50), (299, 1)]:
        part = NoiseSource(5, (n,) + event, torch.float32, "cpu", index_offset=offset)
        got = [part.prior()] + [part.randn() for _ in range(3)]
        for k, (a, b) in enumerate(zip(got, draws)):
            assert torch.equal(a, b[offset:offset + n]), (offset, n, k)
    z = torch.stack(draws)
    assert abs(float(z.mean())) < 5e-3 and abs(float(z.std()) - 1) < 5e-3
    assert not torch.equal(draws[1][:64], draws[1][64:128])      # chunks differ
    assert not torch.equal(draws[1], draws[2])                   # draws differ
    assert not torch.equal(draws[0], draws[1])                   # x_T's stream is another
    with pytest.raises(ValueError, match="index_offset=3 needs an integer seed"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", steps=2, index_offset=3,
               generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="index_offset must be an integer >= 0, got -1"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", steps=2, index_offset=-1, generator=0)


def _float32_mlp_model():
    """A float32 TimeMLP (random output layer, as a trained checkpoint) and a float64 copy."""
    import copy

    from sde_diffusion.models import TimeMLP

    torch.manual_seed(0)
    net = TimeMLP(3, hidden=16, depth=1)
    torch.nn.init.normal_(net.out.weight, std=0.3)
    net.eval()
    return ScoreModel(net, SDE, "x0"), ScoreModel(copy.deepcopy(net).double(), SDE, "x0")


@pytest.mark.parametrize("solver,options,noise", [
    ("ddim", {}, False), ("dpm_solver", {}, False), ("dpm_solver++", {}, False),
    ("unipc", {}, False), ("edm_heun", {}, False), ("ode", {}, False),
    ("euler_maruyama", {}, True), ("sde_dpm_solver++", {}, True), ("ddim", {"eta": 1.0}, True)])
def test_float32_network_samples_float64_x_T(solver, options, noise):
    """The documented promise: samples keep x_T's dtype, also for a float32 network (a float32
    checkpoint sampled from float64 noise crashed with 'mat1 and mat2 must have the same
    dtype'). The float64 run agrees with the float32 run (deterministic solvers) and with a
    float64 copy of the network (same float64 noise) to float32 accuracy."""
    model, model64 = _float32_mlp_model()
    steps = None if get_solver(solver).adaptive else 6
    x_T = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = sample(model, x_T=x_T, solver=solver, steps=steps, generator=5, **options).samples
        assert out.dtype == torch.float64 and bool(torch.isfinite(out).all())
        ref64 = sample(model64, x_T=x_T, solver=solver, steps=steps, generator=5, **options).samples
        torch.testing.assert_close(out, ref64, rtol=1e-4, atol=1e-4)
        if not noise:   # float32 noise differs from float64 noise: compare deterministic runs
            out32 = sample(model, x_T=x_T.float(), solver=solver, steps=steps, **options).samples
            assert out32.dtype == torch.float32
            torch.testing.assert_close(out, out32.double(), rtol=1e-4, atol=1e-4)


def _nan_below(t_bad: float) -> ScoreModel:
    """The score of N(0, I) that turns NaN for t < t_bad."""
    def net(x, t):
        bad = (t < t_bad).reshape((-1,) + (1,) * (x.ndim - 1))
        return torch.where(bad, torch.full_like(x, math.nan), -x)
    return ScoreModel(net, SDE, parameterization="score")


@pytest.mark.parametrize("solver", SOLVERS)
def test_nonfinite_model_output_names_step_and_time(solver):
    with pytest.raises(NonFiniteError) as info:
        sample(_nan_below(0.5), shape=(3, 2), solver=solver, steps=10, generator=0)
    err = info.value
    message = str(err)
    assert solver in message and "step" in message and "t=" in message
    assert err.step is not None and 1 <= err.step <= 10
    assert err.t is not None and err.t < 0.5


def test_nonfinite_step_and_time_are_the_failing_ones():
    # check_every=1: each model output is checked, so the failing call's time is named
    with pytest.raises(NonFiniteError, match=r"ode_euler: step 7 of 10 \(from t=0\.4006") as info:
        sample(_nan_below(0.5), shape=(3, 2), solver="ode_euler", steps=10, generator=0,
               check_every=1)
    assert info.value.step == 7 and math.isclose(info.value.t, 1 - 6 * (1 - 1e-3) / 10, rel_tol=1e-6)


@pytest.mark.parametrize("solver", ["ode", "ode_scipy"])
def test_adaptive_solver_nonfinite_error_names_the_time_not_a_step_count(solver):
    """An adaptive solver takes its own steps inside a grid interval: 'step 1 of 1' said nothing;
    the message names the time of the failing call and the interval integrated."""
    with pytest.raises(NonFiniteError) as info:
        sample(_nan_below(0.5), shape=(3, 2), solver=solver, generator=0)
    message, err = str(info.value), info.value
    assert "step 1 of 1" not in message
    assert message.startswith(f"{solver} (adaptive step size, integrating from t=1 to t=0.001): "
                              f"the model returned NaN/Inf at t="), message
    assert err.t < 0.5 and f"t={err.t:.6g}" in message and err.step == 1
    with pytest.raises(NonFiniteError, match=r"integrating from t=0\.667 to t=0\.334, grid "
                                             r"interval 2 of 3\): the model returned NaN/Inf at t=0\.4"):
        sample(_nan_below(0.5), shape=(3, 2), solver=solver, steps=3, generator=0)


def test_unknown_solver_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown solver 'rk45'; valid solvers: ") as info:
        sample(MIX, shape=(2, 2, 3), solver="rk45")
    for name in ("euler_maruyama", "reverse_diffusion", "ancestral", "pc", "ddim", "ode", "ode_heun"):
        assert name in str(info.value)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match="solver 'ddim' has no option 'order'; its options: eta"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", steps=3, order=2)
    with pytest.raises(ValueError, match="its options: none"):
        sample(MIX, shape=(2, 2, 3), solver="ode_euler", steps=3, eta=1.0)
    with pytest.raises(ValueError, match="predictor, corrector, snr, n_steps, snr_norm, eta"):
        sample(MIX, shape=(2, 2, 3), solver="pc", steps=3, corector="langevin")


def test_argument_errors():
    with pytest.raises(ValueError, match="exactly one of shape and x_T"):
        sample(MIX, solver="ddim", steps=3)
    with pytest.raises(ValueError, match="exactly one of shape and x_T"):
        sample(MIX, shape=(2, 2, 3), x_T=torch.zeros(2, 2, 3), solver="ddim", steps=3)
    with pytest.raises(ValueError, match="floating-point"):
        sample(MIX, x_T=torch.zeros(2, 2, 3, dtype=torch.long), solver="ddim", steps=3)
    with pytest.raises(ValueError, match="steps or nfe, not both"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", steps=3, nfe=3)
    with pytest.raises(ValueError, match="positive sizes"):
        sample(MIX, shape=(0, 2, 3), solver="ddim", steps=3)


def test_progress_bar_off_without_terminal_on_when_forced(monkeypatch):
    import tqdm.auto

    made = []
    real = tqdm.auto.tqdm

    def recording(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    sample(MIX, shape=(2, 2, 3), solver="ddim", steps=3, generator=0)
    assert made == []                                  # not a terminal: silent
    result = sample(MIX, shape=(2, 2, 3), solver="ddim", steps=3, generator=0, progress=True)
    assert len(made) == 1 and made[0]["total"] == 3 and made[0]["desc"] == "ddim"
    assert result.samples.shape == (2, 2, 3)
    sample(MIX, shape=(2, 2, 3), solver="ode", generator=0, progress=True)   # adaptive: no crash
    assert made[-1]["total"] == 1
    sample(MIX, shape=(2, 2, 3), solver="ddim", steps=3, generator=0, progress=False)
    assert len(made) == 2


@pytest.mark.parametrize("solver", ["ode_euler", "pc", "ode"])
def test_callback_and_trajectory(solver):
    steps = 1 if solver == "ode" else 5
    seen = []
    result = sample(MIX, shape=(3, 2, 3), solver=solver, steps=steps, generator=0,
                    dtype=torch.float64, return_trajectory=True,
                    callback=lambda i, t, x: seen.append((i, t, x.clone())))
    traj = result.trajectory
    assert traj.shape == (steps + 1, 3, 2, 3) and traj.dtype == torch.float64
    assert torch.equal(traj[-1], result.samples)
    assert [i for i, _, _ in seen] == list(range(1, steps + 1))
    assert [t for _, t, _ in seen] == [float(v) for v in result.times[1:]]
    for i, _, x in seen:
        assert torch.equal(x, traj[i])
    if solver != "pc":
        again = sample(MIX, x_T=traj[0], solver=solver, steps=steps)
        assert torch.equal(again.samples, result.samples)


def test_adaptive_solver_reports_at_every_grid_time():
    grid = make_grid(SDE, 3, "uniform")
    result = sample(MIX, shape=(2, 2, 3), solver="ode", steps=3, dtype=torch.float64, generator=0,
                    return_trajectory=True, rtol=1e-8, atol=1e-8)
    assert result.trajectory.shape[0] == 4 and torch.equal(result.times, grid)
    one = sample(MIX, x_T=result.trajectory[0], solver="ode", rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(one.samples, result.samples, rtol=0, atol=1e-5)


def test_nfe_budget_picks_the_largest_grid_within_it():
    r = sample(MIX, shape=(2, 2, 3), solver="ode_heun", nfe=11, generator=0)
    assert r.nfe == 10 and len(r.times) == 6
    r = sample(MIX, shape=(2, 2, 3), solver="ode_rk4", nfe=12, generator=0)
    assert r.nfe == 12 and len(r.times) == 4
    # the cost depends on the options: PC with 2 corrector steps spends 3 NFE per step
    r = sample(MIX, shape=(2, 2, 3), solver="pc", nfe=31, n_steps=2, generator=0)
    assert r.nfe == 30 and len(r.times) == 11
    r = sample(MIX, shape=(2, 2, 3), solver="pc", nfe=9, predictor="none", n_steps=3, generator=0)
    assert r.nfe == 9 and len(r.times) == 4
    r = sample(MIX, shape=(2, 2, 3), solver="pc", nfe=5, corrector="none", generator=0)
    assert r.nfe == 5
    with pytest.raises(ValueError, match="needs at least 2 NFE, got 1"):
        sample(MIX, shape=(2, 2, 3), solver="ode_heun", nfe=1)
    with pytest.raises(ValueError, match="adaptive"):
        sample(MIX, shape=(2, 2, 3), solver="ode", nfe=100)


def test_absurd_step_counts_are_refused_up_front():
    """sample(steps=1_000_000_000) allocated a grid of that size and grew by hundreds of MB per
    second; now any count above MAX_STEPS is refused before any allocation, naming both."""
    from sde_diffusion.samplers.grids import MAX_STEPS

    assert MAX_STEPS == 100_000
    with pytest.raises(ValueError, match=r"steps=1000000000 exceeds the maximum of 100000 grid steps"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", steps=1_000_000_000)
    with pytest.raises(ValueError, match=r"steps=100001 exceeds the maximum of 100000"):
        make_grid(SDE, MAX_STEPS + 1)
    with pytest.raises(ValueError, match=r"nfe=1000000000000 buys solver 'ode_heun' more than the "
                                         r"maximum of 100000 grid steps"):
        sample(MIX, shape=(2, 2, 3), solver="ode_heun", nfe=10 ** 12)
    with pytest.raises(ValueError, match=r"100001 steps; steps=100001 exceeds the maximum"):
        sample(MIX, shape=(2, 2, 3), solver="ddim",
               grid=torch.linspace(1.0, 1e-3, MAX_STEPS + 2, dtype=torch.float64))
    # the budget search is a bisection now, not a loop over every grid size
    assert get_solver("ode_heun").steps_for_nfe(2 * MAX_STEPS + 1) == MAX_STEPS
    assert get_solver("pc").steps_for_nfe(3 * 777 + 2, n_steps=2) == 777


def test_memory_does_not_grow_with_the_number_of_steps():
    """The per-grid-point cache of (batch,) time tensors kept one tensor per step for the whole
    run; now at most two are alive at any time."""
    import weakref

    from sde_diffusion.samplers import register
    from sde_diffusion.samplers.registry import SOLVERS

    refs, alive = [], []

    def probe(ctx, x):
        for i in range(ctx.steps):
            refs.append(weakref.ref(ctx.t(i)))      # freed by reference counting once dropped
            alive.append(sum(r() is not None for r in refs))
            yield x

    register("_probe_times", deterministic=True, order=1)(probe)
    try:
        sample(MIX, shape=(2, 2, 3), solver="_probe_times", steps=200)
    finally:
        SOLVERS.pop("_probe_times")
    assert len(refs) == 200 and max(alive) <= 2, max(alive)


@pytest.mark.parametrize("as_type", [list, tuple, "numpy", "tensor"])
def test_custom_grid_as_a_sequence_sets_the_steps(as_type):
    times = [1.0, 0.4, 0.05, 1e-3]
    if as_type == "numpy":
        import numpy as np
        grid = np.array(times)
    elif as_type == "tensor":
        grid = torch.tensor(times, dtype=torch.float64)
    else:
        grid = as_type(times)
    r = sample(MIX, shape=(2, 2, 3), solver="ode_heun", grid=grid, generator=0)
    assert r.nfe == 6 and r.times.tolist() == times
    assert sample(MIX, shape=(2, 2, 3), solver="ode_heun", grid=grid, steps=3).nfe == 6
    assert sample(MIX, shape=(2, 2, 3), solver="ode_heun", grid=grid, nfe=6).nfe == 6
    assert sample(MIX, shape=(2, 2, 3), solver="ode_heun", grid=grid, nfe=7).nfe == 6


def test_custom_grid_with_other_steps_or_nfe_is_an_error():
    """sample(steps=5, grid=<3 points>) ignored steps silently."""
    grid = [1.0, 0.5, 1e-3]
    with pytest.raises(ValueError, match=r"steps=5 disagrees with the custom grid, which has 2 "
                                         r"steps \(3 times\): leave steps out"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", steps=5, grid=grid)
    with pytest.raises(ValueError, match=r"nfe=8 gives solver 'ode_heun' a grid of 4 steps, but the "
                                         r"custom grid has 2 steps \(on it 'ode_heun' spends 4 NFE\)"):
        sample(MIX, shape=(2, 2, 3), solver="ode_heun", nfe=8, grid=torch.tensor(grid))
    with pytest.raises(ValueError, match="t_start and t_end shape a named grid"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", grid=grid, t_end=0.01)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", grid=[1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="must be a grid name .* or a decreasing sequence of times"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", grid=0.5)
    with pytest.raises(ValueError, match="sequence of numbers"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", grid=[1.0, "half", 0.1])
    with pytest.raises(ValueError, match=r"must lie in \(0, T=1\.0\]"):
        sample(MIX, shape=(2, 2, 3), solver="ddim", grid=[2.0, 0.5])


def test_denoise_adds_one_tweedie_step():
    x_T = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = sample(MIX, x_T=x_T, solver="ddim", steps=5)
    den = sample(MIX, x_T=x_T, solver="ddim", steps=5, denoise=True)
    assert den.nfe == plain.nfe + 1
    torch.testing.assert_close(den.samples, MIX.x0(plain.samples, SDE.eps))


def test_model_and_sde_must_agree():
    from sde_diffusion import OracleModel, VESDE

    with pytest.raises(ValueError, match="does not match the model.s SDE"):
        sample(OracleModel(MIX), VESDE(), shape=(2, 2, 3), solver="ddim", steps=2)
    with pytest.raises(ValueError, match="ScoreModel, an OracleModel or a GaussianMixture"):
        sample(lambda x, t: x, SDE, shape=(2, 2, 3), solver="ddim", steps=2)


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["ddim", "ode_heun", "ode", "euler_maruyama", "pc", "ancestral"])
def test_cuda_matches_cpu(solver):
    """On CUDA with CPU per-sample generators (the same noise), every solver gives the CPU
    samples to float64 round-off, on the device of the input."""
    x_T = torch.randn(6, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    options = {"rtol": 1e-9, "atol": 1e-9} if solver == "ode" else {}
    cpu = sample(MIX, x_T=x_T, solver=solver, steps=20, generator=_gens(range(6)), **options)
    gpu = sample(MIX, x_T=x_T.cuda(), solver=solver, steps=20, generator=_gens(range(6)), **options)
    assert gpu.samples.device.type == "cuda" and gpu.samples.dtype == torch.float64
    assert gpu.nfe == cpu.nfe or solver == "ode"
    torch.testing.assert_close(gpu.samples.cpu(), cpu.samples, rtol=1e-7, atol=1e-7)
    seeded = sample(MIX, shape=(6, 2, 3), solver=solver, steps=5, device="cuda", generator=3,
                    dtype=torch.float32, **options)
    assert seeded.samples.device.type == "cuda" and seeded.samples.dtype == torch.float32
    again = sample(MIX, shape=(6, 2, 3), solver=solver, steps=5, device="cuda", generator=3,
                   dtype=torch.float32, **options)
    assert torch.equal(seeded.samples, again.samples)
