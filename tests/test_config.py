"""Config files, overrides with type checking, the SDE builder, JSON round trips."""
import copy
import glob
import os

import ml_collections
import pytest
import torch

from sde_diffusion import SubVPSDE, VESDE, VPSDE
from sde_diffusion.config import (apply_overrides, build_sde, config_from_json, config_to_json,
                                  default_config, flatten, load_config, network_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))


def test_the_required_configs_exist():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIG_FILES}
    for required in ("toy/moons_vp.py", "toy/moons_ve.py", "toy/moons_subvp.py", "digits/vp.py"):
        assert required in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_file_loads_and_builds(path):
    from sde_diffusion.models import build_network
    config = load_config(path)
    for section in ("training", "sampling", "eval", "data", "model", "optim"):
        assert isinstance(config[section], ml_collections.ConfigDict)
    # every field the training loop reads is present
    missing = set(flatten(default_config())) - set(flatten(config))
    assert not missing, missing
    sde = build_sde(config)
    shape = ((2,) if config.model.name.startswith("mlp")
             else (1, config.data.image_size, config.data.image_size))
    net = build_network(network_config(config.model), shape)
    x = torch.zeros((2,) + shape)
    y = None if config.model.get("num_classes") is None else torch.tensor([0, 1])
    if config.training.task == "classifier":     # logits over the classes
        assert net(x, torch.full((2,), 0.5)).shape == (2, config.model.num_classes)
    else:
        assert net(x, torch.full((2,), 0.5), y=y).shape == x.shape
    assert sde.N == config.model.num_scales


def test_overrides_from_the_command_line():
    c = load_config(os.path.join(ROOT, "configs", "digits", "vp.py"))
    apply_overrides(c, ["--config.optim.lr=1e-3", "config.training.n_iters=1e4",
                        "training.continuous=false", "--config.model.channel_mults", "(1, 2, 2)",
                        "--config.model.attn_resolutions=8,4", "--config.training.sde='vesde'",
                        "--config.model.num_classes=10", "--config.model.ema_rate=1",
                        "--config.data.dataset=npz", "--config.training.likelihood_weighting=1"])
    assert c.optim.lr == 1e-3 and isinstance(c.optim.lr, float)
    assert c.training.n_iters == 10000 and isinstance(c.training.n_iters, int)
    assert c.training.continuous is False and c.training.likelihood_weighting is True
    assert c.model.channel_mults == (1, 2, 2) and c.model.attn_resolutions == (8, 4)
    assert c.training.sde == "vesde" and c.data.dataset == "npz"
    assert c.model.num_classes == 10
    assert c.model.ema_rate == 1.0 and isinstance(c.model.ema_rate, float)
    # a None field can be set back to None and retyped
    apply_overrides(c, ["model.num_classes=None"])
    assert c.model.num_classes is None


def test_overrides_from_a_mapping():
    c = default_config()
    apply_overrides(c, {"optim.lr": 3, "training.batch_size": 64, "model.parameterization": "v"})
    assert c.optim.lr == 3.0 and c.training.batch_size == 64 and c.model.parameterization == "v"


@pytest.mark.parametrize("override,match", [
    (["optim.lrr=1e-3"], r"unknown config key 'optim.lrr'; did you mean optim.lr"),
    (["--config.training.n_iter=5"], r"did you mean training.n_iters"),
    (["model.nonsense=1"], r"unknown config key 'model.nonsense'"),
    (["optim=1"], r"'optim' is a section"),
    (["optim.lr=fast"], r"'optim.lr' expects a float, got 'fast'"),
    (["training.n_iters=1.5"], r"'training.n_iters' expects an int, got '1.5'"),
    (["training.n_iters=True"], r"'training.n_iters' expects an int"),
    (["training.continuous=maybe"], r"'training.continuous' expects a bool \(true/false\), got 'maybe'"),
    (["optim.lr=None"], r"'optim.lr' expects a value of type float"),
    (["optim.lr"], r"has no value"),
    ({"optim.lr": "1e-3"}, r"'optim.lr' expects a float, got '1e-3' \(str\)"),
    ({"training.n_iters": 2.0}, r"'training.n_iters' expects an int, got 2.0 \(float\)"),
    ({"training.continuous": 1}, r"'training.continuous' expects a bool, got 1 \(int\)"),
])
def test_override_errors_are_clear(override, match):
    c = default_config()
    with pytest.raises(ValueError, match=match):
        apply_overrides(c, override)


def test_tuple_elements_are_type_checked():
    c = load_config(os.path.join(ROOT, "configs", "digits", "vp.py"))
    with pytest.raises(ValueError, match=r"model.channel_mults\[1\]"):
        apply_overrides(c, ["model.channel_mults=(1, 'a')"])
    with pytest.raises(ValueError, match="expects a tuple"):
        apply_overrides(c, {"model.channel_mults": 3})


def test_build_sde():
    c = default_config()
    apply_overrides(c, {"model.beta_min": 0.2, "model.beta_max": 10.0, "model.num_scales": 50})
    sde = build_sde(c)
    assert isinstance(sde, VPSDE) and sde.schedule == "linear"
    assert (sde.beta_min, sde.beta_max, sde.N, sde.eps) == (0.2, 10.0, 50, 1e-3)
    c.training.sde = "vpsde_cosine"
    assert build_sde(c).schedule == "cosine"
    c.training.sde = "subvpsde"
    assert isinstance(build_sde(c), SubVPSDE)
    c.training.sde = "vesde"
    c.model.sigma_max, c.model.sde_eps = 7.0, 1e-4
    sde = build_sde(c)
    assert isinstance(sde, VESDE) and sde.sigma_max == 7.0 and sde.eps == 1e-4
    c.training.sde = "edm"
    with pytest.raises(ValueError, match="config.training.sde must be one of"):
        build_sde(c)


def test_config_sde_names_come_from_the_one_table():
    """``training.sde`` takes every name of ``sdes.SDE_NAMES`` and score_sde's spellings (old
    checkpoints hold those), and builds the same SDE as ``make_sde`` with the config's parameters."""
    from sde_diffusion.sdes import SDE_NAMES, make_sde
    from sde_diffusion.config import toy_config
    c = default_config()
    apply_overrides(c, {"model.beta_max": 10.0, "model.sigma_max": 7.0, "model.num_scales": 50,
                        "model.cosine_s": 0.01})
    expected = {"vp": make_sde("vp", beta_max=10.0, N=50),
                "vp_cosine": make_sde("vp_cosine", beta_max=10.0, N=50, cosine_s=0.01),
                "subvp": make_sde("subvp", beta_max=10.0, N=50),
                "ve": make_sde("ve", sigma_max=7.0, N=50)}
    assert set(expected) == set(SDE_NAMES)
    aliases = {"vpsde": "vp", "vpsde_cosine": "vp_cosine", "subvpsde": "subvp", "vesde": "ve"}
    for name, canonical in [*((n, n) for n in SDE_NAMES), *aliases.items()]:
        c.training.sde = name
        assert build_sde(c) == expected[canonical], name
        assert toy_config("moons", name).training.sde == name
    c.training.sde = "vp_cosine"
    other = copy.deepcopy(c)
    other.model.cosine_s = 0.02
    assert build_sde(c) != build_sde(other)          # by parameters, not by name or repr
    with pytest.raises(ValueError, match="unknown SDE 'edm'; valid: vp, vp_cosine"):
        toy_config("moons", "edm")


def test_fields_nothing_reads_are_gone():
    """sampling.n_samples and eval.metric were never read (evaluate_model takes eval.n_samples and
    picks its metric from data.dataset): setting them is an unknown key, not a silent no-op."""
    from sde_diffusion.config import digits_config, toy_config
    for config in (default_config(), toy_config(), digits_config()):
        for key in ("sampling.n_samples", "eval.metric"):
            assert key not in flatten(config)
            with pytest.raises(ValueError, match=f"unknown config key '{key}'"):
                apply_overrides(config, [f"{key}=1"])


def test_json_round_trip():
    c = load_config(os.path.join(ROOT, "configs", "digits", "vp.py"))
    back = config_from_json(config_to_json(c))
    assert flatten(back) == flatten(c)
    assert isinstance(back.model.channel_mults, tuple)


def test_network_config_drops_non_network_keys():
    c = load_config(os.path.join(ROOT, "configs", "toy", "moons_vp.py"))
    net = network_config(c.model)
    assert "beta_min" not in net and "ema_rate" not in net and net.hidden == c.model.hidden


def test_load_config_errors(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        load_config(bad)


def test_command_line_rejects_bad_overrides(tmp_path, capsys):
    from sde_diffusion.training.__main__ import main
    code = main(["--config", os.path.join(ROOT, "configs", "toy", "moons_vp.py"),
                 "--workdir", str(tmp_path), "--config.optim.lrr=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("sde-diffusion: error:") and "did you mean optim.lr" in err
