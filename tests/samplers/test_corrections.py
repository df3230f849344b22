"""Corrections between steps, ``sample(..., correct=fn)``: applied after every step of every
registered solver, single-step and multistep alike; the solver continues from the corrected state;
an identity correction changes nothing, bit for bit; multistep solvers stay accurate against the
exact flow when a known coordinate is prescribed (their history holds model outputs at corrected
states); a solver that is not two-way refuses corrections instead of dropping them."""
import math

import pytest
import torch
from scipy.integrate import solve_ivp

from sde_diffusion import VPSDE, random_mixture, sample
from sde_diffusion.models import NonFiniteError
from sde_diffusion.samplers import available_solvers, get_solver, register
from sde_diffusion.samplers.reference import exact_flow_map
from sde_diffusion.samplers.registry import SOLVERS

SDE = VPSDE()
MIX = random_mixture(3, 4, seed=5, sde=SDE)     # isotropic modes: the coordinates are coupled
SOLVER_NAMES = sorted(available_solvers())
STEPS = 5
BOX = 0.2          # coordinate 1 is clamped to [-BOX, BOX]
KNOWN = 0.3        # coordinate 0 is fixed to KNOWN


def _x_T(batch=6, seed=0):
    return torch.randn(batch, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _fix_and_clamp(calls):
    """Fix coordinate 0, clamp coordinate 1 (a solver-independent correction); records its calls."""
    def correct(step, t, x):
        calls.append((step, t, x.clone()))
        y = x.clone()
        y[:, 0] = KNOWN
        y[:, 1] = y[:, 1].clamp(-BOX, BOX)
        return y
    return correct


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_correction_is_applied_after_every_step_of_every_solver(solver):
    """After every step (every grid interval of an adaptive solver), the last included, the state
    goes through the correction with the step's number and the time it reached; the trajectory,
    the callback and the result hold the corrected states."""
    info = get_solver(solver)
    steps = 3 if info.adaptive else STEPS
    calls, seen = [], []
    out = sample(MIX, x_T=_x_T(), solver=solver, steps=steps, generator=1, return_trajectory=True,
                 correct=_fix_and_clamp(calls), callback=lambda s, t, x: seen.append((s, t, x)))
    assert [c[0] for c in calls] == list(range(1, steps + 1))
    assert [c[1] for c in calls] == [float(t) for t in out.times[1:]]
    for k, state in enumerate(out.trajectory[1:]):
        assert bool((state[:, 0] == KNOWN).all()), (solver, k)
        assert bool((state[:, 1].abs() <= BOX).all()), (solver, k)
        assert torch.equal(state, seen[k][2])
    assert torch.equal(out.samples, out.trajectory[-1])
    # what the solver produced before a correction is not already corrected: the correction
    # does work at every step
    assert all(bool((c[2][:, 0] != KNOWN).any()) for c in calls), solver


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_the_solver_continues_from_the_corrected_state(solver):
    """A solver that dropped the corrections would compute its free coordinates as if it had not
    been corrected; the modes couple the coordinates, so the free coordinates of a solver that
    continues from the corrected state differ from those of the uncorrected run."""
    info = get_solver(solver)
    steps = 3 if info.adaptive else STEPS
    kw = dict(x_T=_x_T(), solver=solver, steps=steps, generator=1, dtype=torch.float64)
    plain = sample(MIX, return_trajectory=True, **kw)
    fixed = sample(MIX, return_trajectory=True, correct=_fix_and_clamp([]), **kw)
    # coordinate 2 is neither fixed nor clamped
    assert not torch.allclose(fixed.trajectory[2:, :, 2], plain.trajectory[2:, :, 2],
                              rtol=0, atol=1e-9), solver


ONE_STEP_DETERMINISTIC = [n for n in SOLVER_NAMES
                          if get_solver(n).is_deterministic() and get_solver(n).step is not None]


@pytest.mark.parametrize("solver", ONE_STEP_DETERMINISTIC + ["ode_euler", "ode_heun", "ode_rk4"])
def test_a_one_step_solver_restarts_exactly_from_the_corrected_state(solver):
    """For a deterministic one-step solver (no history), replacing the state after step k by y
    gives exactly the run started from y on the rest of the grid."""
    x_T = _x_T()
    full = sample(MIX, x_T=x_T, solver=solver, steps=STEPS, dtype=torch.float64)
    k = 2
    y = 0.5 * _x_T(seed=9)
    corrected = sample(MIX, x_T=x_T, solver=solver, grid=full.times,
                       correct=lambda step, t, x: y if step == k else x).samples
    rest = sample(MIX, x_T=y, solver=solver, grid=full.times[k:]).samples
    torch.testing.assert_close(corrected, rest, rtol=0, atol=0)


# The exponential integrators and EDM's samplers are exact for data at one point m0 (a model whose
# data prediction is m0 whatever x): the exact flow from y at t_k is sigma(t)/sigma_k (y - alpha_k m0)
# + alpha(t) m0. So after the state is replaced by y at step k, the result must be that flow of y.
EXACT_FOR_A_POINT = [("ddim", {}), ("dpm_solver", {}), ("dpm_solver_2", {}), ("dpm_solver++", {}),
                     ("dpm_solver++_2m", {}), ("unipc", {}), ("unipc", {"order": 3}),
                     ("unipc", {"corrector": False}), ("edm_euler", {}), ("edm_heun", {})]


@pytest.mark.parametrize("solver, options", EXACT_FOR_A_POINT)
def test_multistep_and_one_step_solvers_continue_from_a_replaced_state(solver, options):
    """Multistep solvers too continue from the corrected state: their history holds model
    outputs, not states. (A unipc that recomputed its corrected step from the state before the
    correction, as before corrections existed, ends on the uncorrected path here.)"""
    from sde_diffusion import ScoreModel

    m0 = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    model = ScoreModel(lambda x, t: m0.expand_as(x).clone(), SDE, parameterization="x0")
    x_T, y = _x_T(), 0.5 * _x_T(seed=9)
    steps = 8
    for k in (2, 5):
        out = sample(model, x_T=x_T, solver=solver, steps=steps,
                     correct=lambda step, t, x: y if step == k else x, **options)
        t_k, t_end = out.times[k], out.times[-1]
        a_k, s_k = SDE.alpha(t_k), SDE.sigma(t_k)
        exact = SDE.sigma(t_end) / s_k * (y - a_k * m0) + SDE.alpha(t_end) * m0
        torch.testing.assert_close(out.samples, exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_identity_correction_changes_nothing_bit_for_bit(solver):
    info = get_solver(solver)
    steps = 3 if info.adaptive else STEPS
    for dtype in (torch.float32, torch.float64):
        kw = dict(shape=(7, 3), solver=solver, steps=steps, generator=4, dtype=dtype,
                  return_trajectory=True)
        plain = sample(MIX, **kw)
        same = sample(MIX, correct=lambda step, t, x: x, **kw)
        assert torch.equal(plain.samples, same.samples) and torch.equal(plain.trajectory, same.trajectory)
        assert plain.nfe == same.nfe


def test_every_registered_solver_is_two_way():
    assert [n for n, info in available_solvers().items() if not info.two_way] == []


def test_a_solver_that_is_not_two_way_refuses_corrections():
    """An unconverted generator (``yield x``, registered without two_way) would ignore the state it
    is sent: a correction is refused up front instead of being dropped silently."""
    def one_way(ctx, x):
        for i in range(ctx.steps):
            x = x * 0.9
            yield x

    SOLVERS.pop("_one_way", None)
    register("_one_way", deterministic=True, order=1)(one_way)
    try:
        out = sample(MIX, x_T=_x_T(), solver="_one_way", steps=3)      # fine without a correction
        torch.testing.assert_close(out.samples, _x_T() * 0.9 ** 3)
        with pytest.raises(ValueError, match=r"solver '_one_way' is not two-way [(]registered "
                                             r"without two_way=True[)].*x = yield x"):
            sample(MIX, x_T=_x_T(), solver="_one_way", steps=3, correct=lambda s, t, x: x)
    finally:
        SOLVERS.pop("_one_way", None)


def test_bad_corrections_are_named():
    kw = dict(x_T=_x_T(), solver="ddim", steps=3)
    with pytest.raises(ValueError, match=r"correct must be a callable correct\(step, t, x\)"):
        sample(MIX, correct=3, **kw)
    with pytest.raises(ValueError, match=r"must return a tensor of x's shape \(6, 3\), dtype "
                                         r"torch.float64.* at step 1 .* returned shape \(6, 2\)"):
        sample(MIX, correct=lambda s, t, x: x[:, :2], **kw)
    with pytest.raises(ValueError, match="returned NoneType"):
        sample(MIX, correct=lambda s, t, x: None, **kw)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        sample(MIX, correct=lambda s, t, x: x.float(), **kw)
    with pytest.raises(NonFiniteError, match=r"correct\(step, t, x\) returned NaN/Inf at step 2 of 3"):
        sample(MIX, correct=lambda s, t, x: x * math.nan if s == 2 else x, **kw)


# ---- accuracy after corrections, against exact flows --------------------------------------------
B = 12


def _lam(t):
    return float(SDE.lambda_(torch.tensor(t, dtype=torch.float64)))


def _alpha(t):
    return float(SDE.log_alpha(torch.tensor(t, dtype=torch.float64)).exp())


def _rate(errors):
    """Observed order between the last two halvings of the step."""
    return math.log2(errors[-2] / errors[-1])


MULTISTEP = [("dpm_solver++", {"order": 2}, 2), ("dpm_solver++", {"order": 3}, 3),
             ("unipc", {"order": 1}, 2), ("unipc", {"order": 2}, 3),
             ("unipc", {"order": 2, "corrector": False}, 2)]


@pytest.mark.parametrize("solver, options, order", MULTISTEP)
def test_multistep_solver_keeps_its_order_with_a_prescribed_known_coordinate(solver, options, order):
    """Coordinate 0 is prescribed on the smooth path ``c(t) = alpha(t) x0k + sigma(t) zk`` (the
    replacement step of inpainting with fixed noise); the free coordinates then solve the
    probability-flow ODE of the mixture with that coordinate given, which scipy solves here at a
    tight tolerance. A multistep solver whose history holds the model outputs at the corrected
    states is a consistent method for that problem and converges with its order; one whose
    history (or corrector node) were evaluated before the correction converges at order ~0.3
    (measured when unipc evaluated its next data prediction before the correction)."""
    g = torch.Generator().manual_seed(0)
    x0k = 0.5 * torch.randn(B, dtype=torch.float64, generator=g)
    zk = torch.randn(B, dtype=torch.float64, generator=g)
    x_T = torch.randn(B, 3, dtype=torch.float64, generator=g)

    def known(t):
        t = torch.tensor(t, dtype=torch.float64)
        return SDE.log_alpha(t).exp() * x0k + SDE.log_sigma(t).exp() * zk

    x_T[:, 0] = known(SDE.T)

    def field(lam, y_free):         # d y_free / d lambda = x0_free(alpha y) - y_free, y = x / alpha
        t = SDE.t_of_lambda(torch.tensor(lam, dtype=torch.float64))
        a = float(SDE.log_alpha(t).exp())
        y = torch.cat([(x0k + math.exp(-lam) * zk)[:, None],
                       torch.from_numpy(y_free).reshape(B, 2)], 1)
        return (MIX.x0(a * y, float(t))[:, 1:] - y[:, 1:]).reshape(-1).numpy()

    sol = solve_ivp(field, (_lam(SDE.T), _lam(SDE.eps)),
                    (x_T[:, 1:] / _alpha(SDE.T)).reshape(-1).numpy(), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    exact_free = torch.from_numpy(sol.y[:, -1]).reshape(B, 2) * _alpha(SDE.eps)

    def prescribe(step, t, x):
        x = x.clone()
        x[:, 0] = known(t)
        return x

    errors = []
    for n in (20, 40, 80):
        out = sample(MIX, x_T=x_T, solver=solver, steps=n, grid="logsnr", correct=prescribe,
                     **options).samples
        assert torch.equal(out[:, 0], known(SDE.eps))
        errors.append(float((out[:, 1:] - exact_free).pow(2).mean().sqrt()))
    assert errors[-1] < 3e-3, errors
    assert _rate(errors) > order - 0.35, (errors, _rate(errors))


@pytest.mark.parametrize("solver, options, order", MULTISTEP + [("dpm_solver_3", {}, 3),
                                                                ("edm_heun", {}, 2)])
def test_correcting_to_the_exact_path_keeps_the_solvers_accuracy(solver, options, order):
    """Fixing coordinate 0 to the exact flow's own values at every grid time: the free
    coordinates match the exact flow map with the solver's order, as without corrections."""
    x_T = _x_T(B, seed=3)
    errors, plain_errors = [], []
    for n in (10, 20, 40):
        times = sample(MIX, x_T=x_T, solver=solver, steps=n, grid="logsnr", **options).times
        path = [x_T]
        for k in range(n):
            path.append(exact_flow_map(MIX, path[-1], t_start=float(times[k]),
                                       t_end=float(times[k + 1]), rtol=1e-12, atol=1e-12))

        def on_path(step, t, x, path=path):
            x = x.clone()
            x[:, 0] = path[step][:, 0]
            return x

        out = sample(MIX, x_T=x_T, solver=solver, grid=times, correct=on_path, **options).samples
        plain = sample(MIX, x_T=x_T, solver=solver, grid=times, **options).samples
        errors.append(float((out[:, 1:] - path[-1][:, 1:]).pow(2).mean().sqrt()))
        plain_errors.append(float((plain[:, 1:] - path[-1][:, 1:]).pow(2).mean().sqrt()))
    assert _rate(errors) > order - 0.35, (errors, _rate(errors))
    assert errors[-1] < 2 * plain_errors[-1], (errors, plain_errors)
