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


# ---- the model's own per-output check inside sample() (issue 18) -----------------------------------
def _counting_checks(monkeypatch):
    """Count the model wrapper's per-output finiteness checks (each one a reduction and a host
    read: a device sync per network call on a GPU)."""
    from sde_diffusion.models import wrapper
    calls = []
    orig = wrapper.all_finite
    monkeypatch.setattr(wrapper, "all_finite", lambda x: calls.append(1) or orig(x))
    return calls


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver_3", "edm_heun", "ode_rk4", "euler_maruyama", "pc"])
def test_the_models_output_check_is_left_to_the_state_flags_by_default(monkeypatch, solver):
    calls = _counting_checks(monkeypatch)
    model = ScoreModel(lambda x, t: 0.1 * x, VPSDE(), "eps")
    out = sample(model, x_T=torch.ones(3, 2), solver=solver, steps=8, generator=0)
    assert out.nfe > 0 and calls == []
    sample(model, x_T=torch.ones(3, 2), solver=solver, steps=8, generator=0, check_every=1)
    assert len(calls) == out.nfe                 # strict: every output checked
    calls.clear()
    model.eps(torch.ones(3, 2), 0.5)             # outside sampling: checked as before
    assert calls == [1]


def test_adaptive_solvers_keep_the_models_output_check(monkeypatch):
    """A NaN inside an adaptive step-size controller would not surface as the state's NaN."""
    calls = _counting_checks(monkeypatch)
    model = ScoreModel(lambda x, t: 0.1 * x, VPSDE(), "eps")
    out = sample(model, x_T=torch.ones(3, 2), solver="ode", generator=0)
    assert len(calls) == out.nfe > 0


def test_a_nan_output_is_still_named_by_its_step_and_the_checks_come_back_after_sampling():
    times = make_grid(VPSDE(), STEPS, "uniform")
    net = _nan_after(float(times[BAD - 1]) + 1e-9).net
    model = ScoreModel(net, VPSDE(), "eps")              # check_finite=True
    with pytest.raises(NonFiniteError, match=rf"ddim: the state became NaN/Inf at step {BAD} of {STEPS}"):
        sample(model, x_T=torch.ones(3, 2), solver="ddim", grid=times)
    with pytest.raises(NonFiniteError, match=rf"ddim: step {BAD} of {STEPS} \(from t=.*the model "
                                             rf"returned NaN/Inf"):
        sample(model, x_T=torch.ones(3, 2), solver="ddim", grid=times, check_every=1)
    # after a run that raised, the model checks its outputs again
    with pytest.raises(NonFiniteError, match="the model returned NaN/Inf at t="):
        model.eps(torch.ones(3, 2), float(times[-1]))


def test_a_callback_calling_the_model_keeps_its_check():
    probe = ScoreModel(lambda x, t: torch.full_like(x, float("nan")), VPSDE(), "eps")
    with pytest.raises(NonFiniteError, match="the model returned NaN/Inf"):
        sample(ScoreModel(lambda x, t: 0.1 * x, VPSDE(), "eps"), x_T=torch.ones(3, 2), solver="ddim",
               steps=4, callback=lambda s, t, x: probe.eps(x, t))
