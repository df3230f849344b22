"""The automatic choice of ``sample(model, nfe=N)`` (issue 15) and the gradient grid fit: the
choice is what the rule says and what the result records, deterministic, finite at NFE 2-10 on VP,
sub-VP and VE; a named solver and ``steps=`` calls are untouched; the gradient fit beats the
untuned grid on held-out noise with few network calls."""
import math

import pytest
import torch

from sde_diffusion import VESDE, VPSDE, optimize_grid, random_mixture, sample
from sde_diffusion.samplers.api import auto_config, data_scale
from sde_diffusion.samplers.reference import exact_flow_map
from sde_diffusion.samplers.tuning import OptimizedGrid
from sde_diffusion.sdes import SubVPSDE

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}


@pytest.mark.parametrize("nfe,solver,options", [
    (2, "unipc", {"order": 2, "lower_order_final": True}),
    (3, "unipc", {"order": 2, "lower_order_final": True}),
    (4, "ipndm", {"order": 3}), (5, "ipndm", {"order": 3}), (7, "ipndm", {"order": 3}),
    (8, "ipndm", {"order": 4}), (12, "ipndm", {"order": 4}), (13, "ipndm", {"order": 4}),
    (15, "ipndm", {"order": 4}),
    (16, "unipc", {"order": 3, "lower_order_final": True}),
    (100, "unipc", {"order": 3, "lower_order_final": True})])
def test_rule(nfe, solver, options):
    for sde in (SubVPSDE(), VESDE(), VPSDE(schedule="cosine"), VPSDE()):
        mix = random_mixture(4, 3, seed=0, sde=sde)
        cfg = auto_config(mix, nfe)
        assert cfg["solver"] == solver and cfg["options"] == options
        quadratic = isinstance(sde, VPSDE) and sde.schedule == "linear" and 5 <= nfe <= 15
        assert cfg["grid"] == ("quadratic" if quadratic else "focus"), (sde, nfe)
        assert ("quadratic grid" in cfg["rule"]) == quadratic
        shape = (2.0, 0.2) if nfe == 4 or (nfe == 5 and not quadratic) else \
            (1.5, 0.4) if 13 <= nfe <= 15 and not quadratic else (2.0, 0.4)
        assert (cfg["focus_width"], cfg["focus_share"]) == shape, (sde, nfe)
        assert ("uniform share" in cfg["rule"]) == (shape != (2.0, 0.4) and not quadratic)
    assert cfg["sigma_data"] == pytest.approx(data_scale(mix))
    assert auto_config(None, nfe)["sigma_data"] == 0.5          # data scale unknown
    assert auto_config(mix, nfe, sigma_data=0.2)["sigma_data"] == 0.2


def _network_model(sde):
    """A small untrained MLP score model: what the network rule sees (no exact score, no scale)."""
    from sde_diffusion.config import load_config
    from sde_diffusion.models import model_from_config
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = load_config(os.path.join(root, "configs", "toy", "moons_vp.py"))
    config.model.hidden, config.model.depth, config.model.embed_dim = 16, 2, 16
    torch.manual_seed(0)
    _, model = model_from_config(config, data_shape=(2,), sde=sde)
    return model


@pytest.mark.parametrize("nfe,solver,options", [
    (2, "unipc", {"order": 2, "lower_order_final": True}),
    (4, "ipndm", {"order": 3}),
    (5, "ipndm", {"order": 3}),
    (10, "ipndm", {"order": 3}),
    (11, "unipc", {"order": 2, "lower_order_final": True}),
    (15, "unipc", {"order": 2, "lower_order_final": True}),
    (16, "unipc", {"order": 3, "lower_order_final": True})])
def test_rule_for_a_learned_network(nfe, solver, options):
    """A model without an exact score (a network, or None) gets the network rule; an oracle wrapped
    in OracleModel is still exact."""
    from sde_diffusion.models import OracleModel

    sde = VPSDE()
    for model in (_network_model(sde), None):
        cfg = auto_config(model, nfe)
        assert cfg["kind"] == "network" and cfg["solver"] == solver and cfg["options"] == options
        assert cfg["grid"] == "focus" and cfg["sigma_data"] == 0.5
        assert (cfg["focus_width"], cfg["focus_share"]) == (2.0, 0.4)   # the exact rule's shapes only
        assert ("learned network" in cfg["rule"]) == (4 <= nfe <= 15)
    exact = auto_config(OracleModel(random_mixture(4, 3, seed=0, sde=sde)), nfe)
    assert exact["kind"] == "exact"
    assert exact["solver"] == ("ipndm" if 4 <= nfe <= 15 else "unipc")


def test_a_network_default_records_its_rule():
    sde = VESDE()
    model = _network_model(sde)
    with torch.no_grad():
        out = sample(model, shape=(16, 2), nfe=6, generator=0)
    assert out.nfe == 6 and out.solver == "ipndm" and out.config["kind"] == "network"
    assert out.config["options"] == {"order": 3}
    assert out.config["analytic_first_step"] and out.config["steps"] == 7   # VE sigma_max 50
    with torch.no_grad():
        again = sample(model, shape=(16, 2), generator=0, **out.config["call"])
    assert torch.equal(again.samples, out.samples)


def test_data_scale_is_the_rms_std_of_the_data():
    for kw in ({}, {"diagonal": True}, {"full": True}):
        mix = random_mixture(5, 3, seed=1, **kw)
        want = float(mix.covariance().diagonal().mean().sqrt())
        assert data_scale(mix) == pytest.approx(want, rel=1e-12)
    assert data_scale(object()) is None


def test_default_is_the_rule_and_records_it():
    """``sample(model, nfe=N)`` equals the rule's configuration spelled out, bit for bit, and its
    ``config['call']`` reproduces it."""
    sde = VPSDE()
    mix = random_mixture(6, 4, seed=2, sde=sde)
    for nfe in (5, 12):
        out = sample(mix, shape=(64, 6), nfe=nfe, generator=3)
        cfg = auto_config(mix, nfe)
        spelled = sample(mix, shape=(64, 6), solver=cfg["solver"], nfe=nfe, grid=cfg["grid"],
                         sigma_data=cfg["sigma_data"], generator=3,
                         analytic_first_step=cfg["analytic_first_step"], **cfg["options"])
        assert torch.equal(out.samples, spelled.samples) and out.nfe == nfe
        assert out.config["auto"] and out.config["rule"] == cfg["rule"]
        assert out.solver == cfg["solver"] and out.config["options"] == cfg["options"]
        again = sample(mix, shape=(64, 6), generator=3, **out.config["call"])
        assert torch.equal(again.samples, out.samples)
        assert torch.equal(sample(mix, shape=(64, 6), solver="auto", nfe=nfe, generator=3).samples,
                           out.samples)


def test_focus_shape_reaches_the_grid_and_the_record():
    """``focus_width``/``focus_share`` shape the focus grid exactly as ``focus_grid``'s ``width`` and
    ``uniform_share``; the rule's shape is recorded and reproduced, and a given one replaces it."""
    from sde_diffusion.samplers.grids import focus_grid

    sde = SubVPSDE()
    mix = random_mixture(6, 4, seed=2, sde=sde)
    out = sample(mix, shape=(8, 6), solver="ipndm", nfe=6, grid="focus", sigma_data=0.3,
                 focus_width=1.5, focus_share=0.1, generator=0)
    assert torch.equal(out.times, focus_grid(sde, 6, 0.3, width=1.5, uniform_share=0.1))
    assert out.config["call"]["focus_width"] == 1.5 and out.config["call"]["focus_share"] == 0.1
    auto = sample(mix, shape=(8, 6), nfe=13, generator=0)
    assert auto.config["focus_width"] == 1.5 and auto.config["focus_share"] == 0.4
    assert torch.equal(auto.times, focus_grid(sde, 13, data_scale(mix), width=1.5))
    assert torch.equal(sample(mix, shape=(8, 6), generator=0, **auto.config["call"]).samples,
                       auto.samples)
    mine = sample(mix, shape=(8, 6), nfe=13, focus_width=3.0, generator=0)
    assert mine.config["focus_width"] == 3.0 and mine.config["focus_share"] == 0.4
    with pytest.raises(ValueError, match="width must be > 0"):
        sample(mix, shape=(8, 6), nfe=12, focus_width=0.0)
    with pytest.raises(ValueError, match=r"uniform_share must lie in \[0, 1\]"):
        sample(mix, shape=(8, 6), nfe=12, focus_share=1.5)


def test_deterministic():
    mix = random_mixture(4, 3, seed=0, sde=VESDE())
    a = sample(mix, shape=(32, 4), nfe=6, generator=1).samples
    b = sample(mix, shape=(32, 4), nfe=6, generator=1).samples
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_never_nan_at_low_nfe(name, dtype):
    """NFE 2..10, also down to a tiny t_end (log-SNR far beyond the default eps) and with the final
    Tweedie step: finite samples, exactly the budget spent."""
    sde = SDES[name]
    mix = random_mixture(16, 4, seed=4, sde=sde)
    for nfe in range(2, 11):
        for extra in ({}, {"t_end": 1e-6}, {"denoise": True}):
            out = sample(mix, shape=(128, 16), nfe=nfe, generator=nfe, dtype=dtype, **extra)
            assert bool(torch.isfinite(out.samples).all()), (name, nfe, extra)
            assert out.nfe == nfe + (1 if extra.get("denoise") else 0)


@pytest.mark.parametrize("name", sorted(SDES))
def test_default_beats_plain_choices_at_low_nfe(name):
    """Against the exact flow map at 3, 4 and 8 NFE the default beats DPM-Solver++(2M) and UniPC
    order 3 on the log-SNR grid (Lu et al.'s and the previous recommendations)."""
    sde = SDES[name]
    mix = random_mixture(16, 6, seed=7, sde=sde)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * sde.prior_std
    ref = exact_flow_map(mix, x)

    def err(**kw):
        return float((sample(mix, x_T=x, **kw).samples - ref).pow(2).mean().sqrt())

    for nfe in (3, 4, 8):
        auto = err(nfe=nfe)
        assert auto < err(solver="dpm_solver++", order=2, grid="logsnr", nfe=nfe), (name, nfe)
        assert auto < err(solver="unipc", order=3, grid="logsnr", nfe=nfe), (name, nfe)


@pytest.mark.parametrize("name", sorted(SDES))
def test_lower_order_final_steps_help_where_the_default_uses_them(name):
    """At 3 NFE (the default: UniPC with lower-order final steps) the last steps of lower order
    are more accurate than full-order extrapolation over the old points, on VP, sub-VP and VE."""
    sde = SDES[name]
    mix = random_mixture(16, 6, seed=7, sde=sde)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * sde.prior_std
    ref = exact_flow_map(mix, x)
    assert auto_config(mix, 3)["options"]["lower_order_final"] is True

    def err(lof):
        out = sample(mix, x_T=x, solver="unipc", order=2, lower_order_final=lof, nfe=3,
                     grid="focus", sigma_data=data_scale(mix))
        return float((out.samples - ref).pow(2).mean().sqrt())

    assert err(True) < err(False), name


def test_named_solver_and_steps_untouched():
    """A named solver runs exactly as before (its own grid and options); ``steps=`` without a
    solver keeps score_sde's euler_maruyama."""
    sde = VPSDE()
    mix = random_mixture(4, 3, seed=0, sde=sde)
    out = sample(mix, shape=(16, 4), solver="dpm_solver++", nfe=6, generator=0)
    assert out.config["grid"] == "logsnr" and not out.config["auto"]
    assert out.config["options"] == {}
    em = sample(mix, shape=(16, 4), steps=5, generator=0)
    assert em.solver == "euler_maruyama" and em.config["grid"] == "uniform" and em.nfe == 5
    # an explicit option or grid replaces the rule's
    over = sample(mix, shape=(16, 4), nfe=6, order=4, grid="logsnr", generator=0)
    assert over.config["options"] == {"order": 4} and over.solver == "ipndm"
    assert over.config["grid"] == "logsnr"


def test_auto_needs_a_budget():
    mix = random_mixture(4, 3, seed=0, sde=VPSDE())
    with pytest.raises(ValueError, match="budget"):
        sample(mix, shape=(4, 4), solver="auto")
    with pytest.raises(ValueError, match="nfe must be"):
        auto_config(mix, 0)


# ---- the gradient grid fit -------------------------------------------------------------------------
def test_gradient_fit_beats_untuned_grid_with_few_calls(tmp_path):
    """On fresh noise against the exact flow map the gradient fit lowers UniPC's error at 6 NFE
    (measured 0.87x), within its default budget of 5 solver runs per grid step: 30 runs, about 300
    network calls with the teacher's, where Nelder-Mead's default is 150 runs per step."""
    sde = VPSDE()
    mix = random_mixture(8, 4, seed=3, sde=sde)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    ref = exact_flow_map(mix, x)
    kw = dict(nfe=6, order=2, lower_order_final=True, shape=(512, 8), generator=5,
              dtype=torch.float64, grid="focus", sigma_data=data_scale(mix), teacher_steps=60)
    fit = optimize_grid(mix, sde, "unipc", method="gradient", **kw)
    assert fit.method == "gradient"
    assert fit.validation_error < fit.initial_validation_error

    def err(times):
        out = sample(mix, sde, x_T=x, solver="unipc", order=2, lower_order_final=True, grid=times)
        return float((out.samples - ref).pow(2).mean().sqrt())

    assert err(fit.times) < 0.9 * err(fit.initial_times), (err(fit.times), err(fit.initial_times))
    assert fit.evaluations <= 5 * 6 and fit.model_calls <= 90 + 6 * (fit.evaluations + fit.candidates + 1)
    # the grid file keeps its format and records the method; old files read as nelder-mead
    path = fit.save(tmp_path / "g.json")
    back = OptimizedGrid.load(path)
    assert back.method == "gradient" and torch.equal(back.times, fit.times)
    import json
    raw = json.loads(open(path).read())
    del raw["method"]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    assert OptimizedGrid.load(tmp_path / "old.json").method == "nelder-mead"


def test_gradient_fit_respects_ratio_bound_and_budget():
    sde = VPSDE()
    mix = random_mixture(8, 4, seed=3, sde=sde)
    fit = optimize_grid(mix, sde, "dpm_solver++_2m", 8, shape=(128, 8), generator=5, max_evals=20,
                        max_ratio=1.5, validation=0, method="gradient", grid="logsnr")
    h = sde.lambda_(fit.times).diff()
    ratio = h[1:] / h[:-1]
    assert float(ratio.max()) <= 1.5 * (1 + 1e-9) and float(ratio.min()) >= 1 / 1.5 / (1 + 1e-9)
    assert fit.evaluations <= 20 and math.isfinite(fit.pilot_error)
    with pytest.raises(ValueError, match="method must be"):
        optimize_grid(mix, sde, "ddim", 4, shape=(8, 8), method="adam")


def test_the_rule_starts_with_the_analytical_first_step_up_to_its_budget():
    """At NFE <= AUTO_AFS_MAX_NFE the rule starts with the analytical first step, for an exact
    score and for a network (docs/samplers.md); not above, not where the start's alpha/sigma is too
    large (a VE sigma_max of 4, a late t_start), and not without a model (no SDE to check)."""
    from sde_diffusion.samplers.api import AUTO_AFS_MAX_NFE

    top = AUTO_AFS_MAX_NFE
    mix = random_mixture(6, 4, seed=2, sde=VPSDE())
    low = sample(mix, shape=(8, 6), nfe=top, generator=0)
    assert low.config["analytic_first_step"] and "analytical first step" in low.config["rule"]
    assert low.nfe == top and low.config["steps"] == top + 1
    high = sample(mix, shape=(8, 6), nfe=top + 1, generator=0)
    assert "analytic_first_step" not in high.config
    assert not auto_config(random_mixture(6, 4, seed=2, sde=VESDE(sigma_max=4.0)), 5)["analytic_first_step"]
    late = sample(mix, shape=(8, 6), nfe=5, t_start=0.3, generator=0)
    assert "analytic_first_step" not in late.config and late.nfe == 5
    assert not auto_config(None, 5)["analytic_first_step"]   # no model: no SDE to check
    bare = random_mixture(6, 4, seed=2)                      # an oracle without an SDE of its own
    given = sample(bare, VPSDE(), shape=(8, 6), nfe=5, generator=0)
    assert given.config["analytic_first_step"] and given.config["steps"] == 6
