"""The solver comparison's uncertainty: bootstrap standard errors of the sliced Wasserstein
distance (issue 10, item 10)."""
import pytest
import torch

from sde_diffusion import data
from sde_diffusion.experiments import (SlicedWBootstrap, compare_solvers, named_oracle,
                                       parse_solver_list)
from sde_diffusion.metrics import sliced_wasserstein
from sde_diffusion.models import OracleModel
from sde_diffusion.sdes import VPSDE


def test_bootstrap_standard_error_matches_the_spread_over_fresh_sets():
    """The bootstrap's standard error of SW(samples, reference) is of the size of the actual spread
    of that distance over fresh sample and reference sets (measured on two moons, 500 points: a
    spread of 0.0137 over 40 fresh pairs; bootstrap errors of 0.013 to 0.021, mean 0.016, over 10
    pairs: on the cautious side), and the same for every call (paired resamples)."""
    n = 500
    gen = torch.Generator().manual_seed(0)
    fresh = [sliced_wasserstein(data.get_dataset("moons", n=n, generator=gen),
                                data.get_dataset("moons", n=n, generator=gen)) for _ in range(40)]
    spread = float(torch.tensor(fresh).std())
    x = data.get_dataset("moons", n=n, seed=101).double()
    ref = data.get_dataset("moons", n=n, seed=102).double()
    boot = SlicedWBootstrap(ref, resamples=40, seed=3)
    se = boot.standard_error(x)
    assert 0.6 * spread < se < 2.0 * spread, (se, spread)
    assert boot.standard_error(x) == se
    # resamples of unequal sizes take the general formula
    assert 0.6 * spread < boot.standard_error(x[:400]) < 2.5 * spread
    with pytest.raises(ValueError, match="resamples must be an integer >= 2"):
        SlicedWBootstrap(ref, resamples=1)


def test_compare_solvers_adds_standard_errors_when_asked():
    sde = VPSDE()
    mix = named_oracle("gmm2d", sde)
    ref = mix.sample(300, t=sde.eps, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    specs = parse_solver_list("ddim,ddim:eta=1")
    rows = compare_solvers(OracleModel(mix), specs, [10], 300, reference=ref, bootstrap=20,
                           flow_reference=False)
    assert all(r["sliced_w_se"] > 0 for r in rows)
    plain = compare_solvers(OracleModel(mix), specs, [10], 300, reference=ref, flow_reference=False)
    assert all("sliced_w_se" not in r for r in plain)
    assert [r["sliced_w"] for r in rows] == [r["sliced_w"] for r in plain]
    with pytest.raises(ValueError, match="bootstrap must be 0"):
        compare_solvers(OracleModel(mix), specs, [10], 300, reference=ref, bootstrap=1)


def test_edm_churn_makes_a_solver_stochastic():
    """edm_heun with churn is stochastic: no flow-map error, kind 'stochastic' (its option is
    S_churn; compare used to look for 'churn' and scored it as deterministic)."""
    sde = VPSDE()
    mix = named_oracle("gmm2d", sde)
    rows = compare_solvers(OracleModel(mix), parse_solver_list("edm_heun,edm_heun:S_churn=40"),
                           [10], 64, sample_shape=(2,))
    assert [r["kind"] for r in rows] == ["deterministic", "stochastic"]
    assert "flow_rmse" in rows[0] and "flow_rmse" not in rows[1]


def test_compare_scores_exactly_the_configurations_the_registry_declares_deterministic():
    """The kind of every row is the registry's is_deterministic with the spec's options: DDIM at
    eta=0.5 is stochastic, PC without corrector steps and with the DDIM predictor at eta=0 is
    deterministic and gets a flow-map error."""
    sde = VPSDE()
    mix = named_oracle("gmm2d", sde)
    specs = parse_solver_list("ddim:eta=0.5,pc:predictor=ddim:corrector=none,pc")
    assert [s.deterministic for s in specs] == [False, True, False]
    rows = compare_solvers(OracleModel(mix), specs, [10], 32, sample_shape=(2,))
    assert [r["kind"] for r in rows] == ["stochastic", "deterministic", "stochastic"]
    assert ["flow_rmse" in r for r in rows] == [False, True, False]


def test_compare_solvers_spends_a_budget_as_sample_does():
    """A budget goes through the solver's own plan, as sample(nfe=...) does: dpm_solver spends
    exactly 10 NFE with DPM-Solver-fast's orders (it spent 9: three third-order steps), and PC's
    options count in its cost (its n_steps were ignored)."""
    sde = VPSDE()
    mix = named_oracle("gmm2d", sde)
    rows = compare_solvers(OracleModel(mix, sde), parse_solver_list("dpm_solver,pc:n_steps=2"),
                           [10], 64, oracle=mix, flow_reference=False)
    got = {r["solver"]: (r["nfe"], r["steps"]) for r in rows}
    assert got["dpm_solver"] == (10, 4)
    assert got["pc:n_steps=2"] == (9, 3)


@pytest.mark.parametrize("labelled, plain", [("ring8c", "ring8"), ("gmm64c", "gmm64")])
def test_labelled_oracles_are_the_plain_ones_with_classes(labelled, plain):
    """ring8c / gmm64c: the components of ring8 / gmm64 (same samples without a class), paired
    into 4 classes; the plain oracles stay unlabelled."""
    from sde_diffusion.experiments import PAIR_LABELS

    sde = VPSDE()
    a, b = named_oracle(labelled, sde), named_oracle(plain, sde)
    assert b.labels is None and a.n_classes == 4 and a.labels.tolist() == list(PAIR_LABELS)
    for name in ("weights", "means", "stds"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    gen = lambda: torch.Generator().manual_seed(5)          # noqa: E731
    assert torch.equal(a.sample(64, generator=gen()), b.sample(64, generator=gen()))
    # class 1 = components 2 and 3, weights renormalised within the class
    sub = a.conditional(1)
    assert torch.equal(sub.means, b.means[2:4])
    assert torch.allclose(sub.weights, b.weights[2:4] / b.weights[2:4].sum())
