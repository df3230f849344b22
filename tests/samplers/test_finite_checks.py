"""The state's finiteness is checked cheaply (issue 18): one device flag per step, read every
``check_every`` steps and at the end, still naming the first step whose state was NaN/Inf and its
time; ``check_every=1`` is strict (the error at that step)."""
from __future__ import annotations

import re

import pytest
import torch

from sde_diffusion import VPSDE, sample
from sde_diffusion.models import NonFiniteError, ScoreModel
from sde_diffusion.samplers import base, make_grid

STEPS, BAD = 40, 7


def _nan_after(t_bad: float):
    """A network (its wrapper not checking outputs) returning NaN at times <= t_bad: one-call
    steps get a NaN state first at the step that starts at t_bad."""
    def net(x, t):
        out = 0.1 * x
        return torch.where((t <= t_bad)[:, None], torch.full_like(out, float("nan")), out)
    return ScoreModel(net, VPSDE(), "eps", check_finite=False)


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver++_2m", "euler_maruyama"])
@pytest.mark.parametrize("check_every", [None, 1, 5])
def test_a_nan_state_is_reported_at_its_step_and_time(solver, check_every):
    times = make_grid(VPSDE(), STEPS, "uniform")
    model = _nan_after(float(times[BAD - 1]) + 1e-9)
    seen = []
    kw = {} if check_every is None else {"check_every": check_every}
    with pytest.raises(NonFiniteError, match=re.escape(solver) + rf": the state became NaN/Inf at step {BAD} "
                                             rf"of {STEPS} \(t={float(times[BAD]):.6g}\)") as info:
        sample(model, x_T=torch.ones(3, 2), solver=solver, grid=times, generator=0,
               callback=lambda s, t, x: seen.append(s), **kw)
    assert info.value.step == BAD and info.value.t == pytest.approx(float(times[BAD]))
    if check_every == 1:
        assert seen == list(range(1, BAD))          # strict: no later state was handed on


def test_the_state_is_read_back_every_check_every_steps_not_every_step(monkeypatch):
    reads = []
    orig = torch.stack

    def counting_stack(tensors, *a, **k):
        reads.append(len(tensors))
        return orig(tensors, *a, **k)
    monkeypatch.setattr(base.torch, "stack", counting_stack)
    model = ScoreModel(lambda x, t: 0.1 * x, VPSDE(), "eps")
    sample(model, x_T=torch.ones(3, 2), solver="ddim", steps=STEPS)
    assert base.CHECK_EVERY == 16 and reads == [16, 16, 8]


def test_check_every_is_checked():
    model = ScoreModel(lambda x, t: 0.1 * x, VPSDE(), "eps")
    for bad in (0, -1, 2.5, True, "1"):
        with pytest.raises(ValueError, match="check_every must be an integer >= 1"):
            sample(model, x_T=torch.ones(3, 2), solver="ddim", steps=4, check_every=bad)
