"""DDNM's time travel (Wang, Yu & Zhang 2023, Sec. 3.3 / Alg. 2) on ddnm and ddnm_plus: the schedule
is RePaint's (with an interval), the NFE reported is the count of network calls the schedule makes,
and against the exact posterior (8-d Gaussian mixture, half mask, VP, 500 samples; the problems of
test_replacement_methods.py) time travel at EQUAL NFE helps from 50 NFE on. Measured (seed 0; seeds 1
and 2 within 0.01), travel_length/travel_repeat/travel_interval = 1/1/1 vs off:

    ddnm_plus, sigma_y 0.2 (prior 0.284):  NFE 20 0.156 vs 0.097 (worse: half the grid steps),
                                            NFE 50 0.078 vs 0.098, NFE 100 0.060 vs 0.110
    ddnm_plus, noiseless (prior 0.289):    NFE 20 0.108 vs 0.105, NFE 50 0.058 vs 0.084,
                                            NFE 100 0.056 vs 0.077 (1/3/1: 0.039)
    ddnm (DDIM eta 0.85), noiseless:       NFE 50 0.069 vs 0.100, NFE 100 0.061 vs 0.092

At NFE 100 on the noisy problem every setting tried (l/r/s 1/1/1, 2/1/2, 5/1/5, 5/3/5, 10/1/10,
10/3/10, 3/1/1, 1/3/1) is below the plain 0.110 (0.060 to 0.098); on a noisy 2 x 4 projection
(sigma_y 0.1, prior 0.325) all stay at 0.20-0.23 with or without travel.
"""
import pytest
import torch

from sde_diffusion import solve_inverse
from sde_diffusion.inverse.methods.repaint import repaint_schedule, schedule_cost
from sde_diffusion.metrics import sliced_wasserstein

from helpers import operator_problem  # noqa: E402

N = 500


def _problem(sigma_y: float):
    """test_replacement_methods' half-mask 8-d VP problem (the same seeds)."""
    return operator_problem("vp", "mask", (8,), sigma_y)


def _run(method, nfe, sigma_y=0.0, n=N, **options):
    prior, op, y, ref, _ = _problem(sigma_y)
    r = solve_inverse(prior, op, y, method=method, n=n, nfe=nfe, sigma_y=sigma_y, generator=0, **options)
    return r, sliced_wasserstein(r.samples, ref)


def _travel(length, repeat, interval=0):
    return dict(travel_length=length, travel_repeat=repeat, travel_interval=interval)


def test_schedule_with_an_interval():
    # RePaint's schedule is the interval = jump_length case
    assert repaint_schedule(6, 2, 2) == repaint_schedule(6, 2, 2, interval=2) == \
        [0, 1, 2, 3, 4, 3, 2, 3, 4, 5, 6, 5, 4, 5, 6]
    # every step from index 2 on jumps one back once
    assert repaint_schedule(4, 1, 2, interval=1) == [0, 1, 2, 1, 2, 3, 2, 3, 4, 3, 4]
    for args in [(6, 2, 2, None), (4, 1, 2, 1), (30, 5, 4, 3), (30, 1, 3, 1), (7, 10, 3, None)]:
        path = repaint_schedule(*args)
        assert path[0] == 0 and path[-1] == args[0]
        assert all(abs(b - a) == 1 and 0 <= b <= args[0] for a, b in zip(path[:-1], path[1:]))
        assert schedule_cost(*args) == sum(b == a + 1 for a, b in zip(path[:-1], path[1:]))


@pytest.mark.parametrize("method", ["ddnm", "ddnm_plus"])
@pytest.mark.parametrize("nfe,travel", [(20, (1, 1, 0)), (37, (2, 3, 1)), (50, (5, 1, 5)), (50, (3, 2, 7)),
                                        (8, (10, 1, 0))])
def test_nfe_is_the_schedules_count(method, nfe, travel):
    """solve_inverse's nfe is the model wrapper's count; it equals the schedule's cost on the grid
    the budget bought, the method's own count, and the largest grid that fits."""
    length, repeat, interval = travel
    r, _ = _run(method, nfe, n=3, **_travel(length, repeat, interval))
    steps = r.info["steps"]
    cost = schedule_cost(steps, length, repeat + 1, interval or length)
    assert r.nfe == cost == r.info["reverse_steps"] <= nfe
    assert steps == nfe or schedule_cost(steps + 1, length, repeat + 1, interval or length) > nfe
    if method == "ddnm":            # the observation is met exactly, as without travel
        prior, op, y, _, _ = _problem(0.0)
        assert float((op.A(r.samples) - y).abs().max()) < 1e-10


def test_off_by_default_and_unchanged():
    plain, _ = _run("ddnm_plus", 10, n=4)
    off, _ = _run("ddnm_plus", 10, n=4, **_travel(0, 0, 0))
    assert torch.equal(plain.samples, off.samples) and plain.nfe == off.nfe == 10


def test_travel_helps_ddnm_plus_on_a_noisy_mask_at_equal_nfe():
    plain100 = _run("ddnm_plus", 100, 0.2)[1]                                      # 0.110
    for travel in [(1, 1, 1), (2, 1, 2), (5, 1, 5)]:                               # 0.060 0.066 0.081
        assert _run("ddnm_plus", 100, 0.2, **_travel(*travel))[1] < plain100
    assert _run("ddnm_plus", 100, 0.2, **_travel(1, 1, 1))[1] < 0.75 * plain100
    plain50 = _run("ddnm_plus", 50, 0.2)[1]                                        # 0.098
    assert _run("ddnm_plus", 50, 0.2, **_travel(1, 1, 1))[1] < 0.9 * plain50       # 0.078


def test_travel_lowers_ddnms_plateau_on_a_noiseless_mask():
    """DDNM is not asymptotically exact (test_replacement_methods: it plateaus near 0.08 in 8-d);
    time travel at the same NFE lowers that."""
    assert _run("ddnm", 100, **_travel(1, 1))[1] < 0.8 * _run("ddnm", 100)[1]     # 0.061 vs 0.092
    assert _run("ddnm_plus", 50, **_travel(1, 1))[1] < 0.8 * _run("ddnm_plus", 50)[1]  # 0.058 / 0.084


def test_bad_travel_options_are_named():
    prior, op, y, _, _ = _problem(0.0)
    with pytest.raises(ValueError, match="both travel_length and travel_repeat"):
        solve_inverse(prior, op, y, method="ddnm_plus", nfe=10, travel_length=2)
    with pytest.raises(ValueError, match="travel_repeat must be an integer >= 0"):
        solve_inverse(prior, op, y, method="ddnm_plus", nfe=10, travel_length=2, travel_repeat=-1)
    with pytest.raises(ValueError, match="travel_interval 3 needs"):
        solve_inverse(prior, op, y, method="ddnm", nfe=10, travel_interval=3)
    with pytest.raises(ValueError, match="cannot travel"):
        solve_inverse(prior, op, y, method="ddnm", nfe=10, solver="edm_heun", travel_length=1, travel_repeat=1)
