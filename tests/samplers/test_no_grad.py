"""Sampling keeps no autograd graph by default (issue 18): a network with trainable parameters gives
samples without a ``grad_fn`` under every registered solver, and the intermediate states are freed
as the loop goes (memory does not grow with the number of steps); ``grad=True`` builds the graph."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from sde_diffusion import VPSDE, sample
from sde_diffusion.models import ScoreModel, TimeMLP
from sde_diffusion.samplers import available_solvers, get_solver

SOLVER_NAMES = sorted(available_solvers())


def _model(seed: int = 0) -> ScoreModel:
    torch.manual_seed(seed)
    net = TimeMLP(2, hidden=8, depth=1).double()
    with torch.no_grad():                    # the output layer starts at zero: make it do something
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert all(p.requires_grad for p in net.parameters())
    return ScoreModel(net, VPSDE(), "eps")


def _x_T(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _steps(solver: str, n: int) -> int:
    return min(n, 3) if get_solver(solver).adaptive else n


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_samples_of_a_trainable_network_carry_no_graph(solver):
    out = sample(_model(), x_T=_x_T(), solver=solver, steps=_steps(solver, 4), generator=0,
                 denoise=True, return_trajectory=True)
    assert out.samples.grad_fn is None and not out.samples.requires_grad, solver
    assert out.trajectory.grad_fn is None, solver
    assert not out.samples.is_inference(), solver     # usable in a loss later (no_grad, not inference_mode)
    assert torch.isfinite(out.samples).all()


def _live_states(solver: str, steps: int, **kw) -> int:
    """How many of the states the loop passed through are still alive after sampling."""
    refs = []
    out = sample(_model(), x_T=_x_T(), solver=solver, steps=steps, generator=0,
                 callback=lambda s, t, x: refs.append(weakref.ref(x)), **kw)
    gc.collect()
    alive = sum(r() is not None for r in refs)
    del out
    return alive


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_the_states_of_past_steps_are_freed(solver):
    """Only the result is alive afterwards: nothing that grows with the number of steps is kept."""
    steps = _steps(solver, 12)
    assert _live_states(solver, steps) <= 1, solver


def test_grad_true_builds_the_graph_through_the_network():
    model = _model()
    out = sample(model, x_T=_x_T(), solver="dpm_solver++_2m", steps=6, grad=True)
    assert out.samples.grad_fn is not None
    out.samples.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.net.parameters())
    # the graph holds the past states: the check above would fail with grad=True
    assert _live_states("dpm_solver++_2m", 12, grad=True) > 1


def test_grad_must_be_a_bool():
    with pytest.raises(ValueError, match="grad must be True or False, got 'yes'"):
        sample(_model(), x_T=_x_T(), solver="ddim", steps=2, grad="yes")
