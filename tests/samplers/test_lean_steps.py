"""The sampler loop is lean (issue 18): the tensor operations a step makes outside the network are
counted (``torch.overrides.TorchFunctionMode``) and do not depend on the number of steps; DDIM's
step is a multiply and an add on the model's own output (coefficients computed once per grid), the
ODE samplers and DPM-Solver's stages no longer recompute the SDE's scales per call, and the
model's per-output finiteness reduction is left to the loop's state flags."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sde_diffusion import VPSDE, sample
from sde_diffusion.models import ScoreModel


class _Counter(TorchFunctionMode):
    """Counts torch functions and tensor methods called while ``active`` (not inside the net)."""

    def __init__(self):
        super().__init__()
        self.n, self.active = 0, True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.active and getattr(func, "__name__", "") not in ("__get__", "__set__"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(solver: str, parameterization: str, **options) -> float:
    counter = _Counter()

    def net(x, t):
        counter.active = False
        try:
            return 0.1 * x
        finally:
            counter.active = True
    model = ScoreModel(net, VPSDE(), parameterization)
    counts = []
    for steps in (10, 20):
        counter.n = 0
        with counter:
            sample(model, x_T=torch.ones(3, 2), solver=solver, steps=steps,
                   generator=torch.Generator().manual_seed(0), **options)
        counts.append(counter.n)
    return (counts[1] - counts[0]) / 10


# Counted for an eps / an x0 network. Before issue 18's lean steps (commit bc180bd): ddim 20 / 23,
# ddim eta=1 23 / 26, euler_maruyama 28 / 30, ode_euler 85 / 88, ode_heun 156 / 162, dpm_solver_2
# 36 / 77; after: 7, 9, 9, 8, 13 and 15 / 21 (the state flag and the (batch,) time tensor included).
@pytest.mark.parametrize("solver, options, most", [
    ("ddim", {}, 8), ("ddim", {"eta": 1.0}, 10), ("euler_maruyama", {}, 10),
    ("ode_euler", {}, 9), ("ode_heun", {}, 14), ("dpm_solver_2", {}, 22),
])
@pytest.mark.parametrize("parameterization", ["eps", "x0"])
def test_a_step_makes_a_few_tensor_operations_outside_the_network(solver, options, most,
                                                                   parameterization):
    per_step = _ops_per_step(solver, parameterization, **options)
    assert per_step <= most, (solver, parameterization, per_step)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "score"])
def test_linear_in_view_rewrites_every_view_through_the_native_one(parameterization):
    from sde_diffusion.models import TimeMLP
    from sde_diffusion.models.wrapper import linear_in_view, native_view
    sde = VPSDE()
    torch.manual_seed(0)
    model = ScoreModel(TimeMLP(2, hidden=8, depth=1).double(), sde, parameterization)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.full((5,), 0.37, dtype=torch.float64)
    _, log_a, log_s = sde.log_scales(torch.tensor([0.37], dtype=torch.float64))
    a, s = float(log_a.exp()), float(log_s.exp())
    view = native_view(model)
    assert view == (parameterization if parameterization != "v" else "eps")
    with torch.no_grad():
        m = getattr(model, view)(x, t)
        for want in ("eps", "x0", "score"):
            p, q = linear_in_view(want, view, a, s)
            torch.testing.assert_close(p * x + q * m, getattr(model, want)(x, t), rtol=1e-12,
                                       atol=1e-12)
    with pytest.raises(ValueError, match="want and view must be eps, x0 or score, got 'v'"):
        linear_in_view("v", "eps", a, s)


def test_native_view_of_a_subclass_is_a_view_it_overrides():
    from sde_diffusion.models.wrapper import native_view

    class EpsOnly(ScoreModel):
        def eps(self, x, t, **kwargs):
            return super().eps(x, t, **kwargs)
    assert native_view(EpsOnly(lambda x, t: x, VPSDE(), "x0")) == "eps"
    assert native_view(EpsOnly(lambda x, t: x, VPSDE(), "eps")) == "eps"
    assert native_view(ScoreModel(lambda x, t: x, VPSDE(), "x0")) == "x0"
