"""DiscreteVPSDE and EDMSDE (models.adapters) have no name in SDE_NAMES, on purpose
(docs/models.md): naming them is refused in one message that lists the valid names and says why,
and the one file that records an SDE -- the grid file -- keeps them by their repr and checks it."""
from __future__ import annotations

import copy

import pytest
import torch

from sde_diffusion import random_mixture
from sde_diffusion.config import build_sde, toy_config
from sde_diffusion.models.adapters import DiscreteVPSDE, EDMSDE, diffusers_alphas_cumprod
from sde_diffusion.samplers import optimize_grid
from sde_diffusion.samplers.tuning import OptimizedGrid
from sde_diffusion.sdes import make_sde, sde_name

VALID = r"valid: vp, vp_cosine, subvp, ve \(or score_sde's vpsde, vpsde_cosine, subvpsde, vesde\)"


def _discrete(**kw) -> DiscreteVPSDE:
    return DiscreteVPSDE(diffusers_alphas_cumprod({"beta_schedule": "linear", "beta_start": 1e-4,
                                                   "beta_end": 0.02, "num_train_timesteps": 100, **kw}))


@pytest.mark.parametrize("name, cls", [("edm", "EDMSDE"), ("EDMSDE", "EDMSDE"), ("edm_sde", "EDMSDE"),
                                       ("discrete_vp", "DiscreteVPSDE"),
                                       ("DiscreteVPSDE", "DiscreteVPSDE")])
def test_naming_them_says_why_not(name, cls):
    with pytest.raises(ValueError, match=rf"unknown SDE '{name}'; {VALID}; '{name}' is {cls}, which "
                                         rf"has no name on purpose: .*model"):
        make_sde(name)
    config = copy.deepcopy(toy_config("moons", "vp"))
    config.training.sde = name
    with pytest.raises(ValueError, match=rf"config.training.sde must be one of .*{cls}, which has no "
                                         rf"name on purpose"):
        build_sde(config)


def test_an_unrelated_unknown_name_keeps_the_plain_message():
    with pytest.raises(ValueError) as err:
        make_sde("edmx")
    assert "on purpose" not in str(err.value) and "valid: vp, vp_cosine" in str(err.value)


@pytest.mark.parametrize("sde, why", [(_discrete(), "its schedule is an array of N alphas_cumprod"),
                                      (EDMSDE(), "it serves denoisers trained elsewhere")])
def test_to_dict_says_why_not(sde, why):
    for call in (lambda: sde_name(sde), sde.to_dict):
        with pytest.raises(ValueError, match=rf"{type(sde).__name__} has no name in SDE_NAMES \(vp, "
                                             rf"vp_cosine, subvp, ve\), on purpose: {why}"):
            call()


@pytest.mark.parametrize("make, other", [(_discrete, _discrete(beta_end=0.021)),
                                         (EDMSDE, EDMSDE(sigma_max=81.0))])
def test_grid_file_keeps_them_by_repr(tmp_path, make, other):
    sde = make()
    mix = random_mixture(dim=2, n_components=3, seed=0, sde=sde)
    fit = optimize_grid(mix, solver="ddim", nfe=4, shape=(16, 2), max_evals=3)
    fit.save(tmp_path / "g.json")
    back = OptimizedGrid.load(tmp_path / "g.json")
    assert back.sde is None and back.legacy_sde == repr(sde)
    assert torch.equal(back.times_for(make()), fit.times)        # an equal SDE built anew
    with pytest.raises(ValueError, match="fitted under"):
        back.times_for(other)
