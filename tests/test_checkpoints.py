"""Checkpoints: atomic writes, loading without code execution, RNG states, model rebuilding."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from sde_diffusion import checkpoints
from sde_diffusion.checkpoints import (CheckpointError, atomic_torch_save, capture_rng_states,
                                       latest_checkpoint, load_checkpoint, model_from_checkpoint, restore_rng_states,
                                       save_checkpoint)
from sde_diffusion.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(path, step=3, **kw):
    net = torch.nn.Linear(2, 2)
    return save_checkpoint(path, step=step, config=default_config(), data_shape=(2,),
                           model_state=net.state_dict(), ema_state=net.state_dict(),
                           optimizer_state=None, rng=capture_rng_states(), **kw)


def test_round_trip_and_no_temporary_files(tmp_path):
    path = tmp_path / "run" / "checkpoint_last.pt"
    _save(path, step=7)
    assert os.listdir(tmp_path / "run") == ["checkpoint_last.pt"]
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and ckpt["data_shape"] == [2]
    assert ckpt["config"].optim.lr == default_config().optim.lr
    assert isinstance(ckpt["config_json"], str)


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    _save(path, step=1)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save(path, step=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint_last.pt"]


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_loading_never_executes_code(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"format": checkpoints.FORMAT, "version": 1, "config": "{}",
                "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="not loaded since loading them could run code") as info:
        load_checkpoint(path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)   # the unpickler refused
    assert not marker.exists()
    assert "weights_only" not in str(info.value)


def _real_checkpoint_bytes(tmp_path):
    _save(tmp_path / "real.pt")
    return (tmp_path / "real.pt").read_bytes()


def _bad_files(tmp_path):
    """Files a user may point --checkpoint at by mistake, or that a crash or a full disk left."""
    real = _real_checkpoint_bytes(tmp_path)
    files = {
        "empty": b"",
        "truncated": real[: len(real) // 2],
        "cut near the end": real[:-10],
        "text": b"step,loss\n1,0.5\n",
        "pickled list": pickle.dumps([1, 2, 3]),
        "numpy array via torch.save": None,
        "another program's torch.save": None,
    }
    paths = {}
    for name, content in files.items():
        path = tmp_path / (name.replace(" ", "_").replace("'", "") + ".pt")
        if name == "numpy array via torch.save":
            torch.save(np.zeros(3), path)
        elif name == "another program's torch.save":
            torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
        else:
            path.write_bytes(content)
        paths[name] = path
    return paths


def test_unreadable_checkpoints_are_one_sentence_naming_the_file(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        for load in (load_checkpoint, model_from_checkpoint):
            with pytest.raises(CheckpointError) as info:
                load(path)
            msg = str(info.value)
            assert str(path) in msg and "\n" not in msg, (name, msg)
            assert "weights_only" not in msg and len(msg) < 400, (name, msg)
            assert isinstance(info.value, ValueError)


def test_the_cli_reports_an_unreadable_checkpoint_in_one_line(tmp_path, capsys):
    from sde_diffusion.cli import main
    for name, path in _bad_files(tmp_path).items():
        for command in (["sample", "--checkpoint", str(path), "--n", "4", "--steps", "2",
                         "--out", str(tmp_path / "s.npz")],
                        ["likelihood", "--checkpoint", str(path), "--data", "moons", "--n", "4"]):
            code = main(command)
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, (name, command[0], err)
            assert lines[0].startswith("sde-diffusion: error: ") and str(path) in lines[0]
            assert "weights_only" not in err


def test_not_a_checkpoint(tmp_path):
    atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an sde_diffusion checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_states_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    states = capture_rng_states(noise=g)
    atomic_torch_save({"rng": states}, tmp_path / "rng.pt")
    first = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=g))
    torch.manual_seed(9), random.seed(9), np.random.seed(9), g.manual_seed(9)
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    restore_rng_states(loaded, noise=g)
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=g))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and first[2] == again[2]
    assert torch.equal(first[3], again[3])
    with pytest.raises(ValueError, match="no state for generator 'data'"):
        restore_rng_states(loaded, data=torch.Generator())


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _save(tmp_path / "checkpoint_10.pt")
    _save(tmp_path / "checkpoint_200.pt")
    _save(tmp_path / "checkpoint_30.pt")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_200.pt")
    _save(tmp_path / "checkpoint_last.pt")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_last.pt")


def test_model_from_checkpoint(tmp_path):
    from sde_diffusion.config import load_config
    from sde_diffusion.models import ScoreModel, build_network
    from sde_diffusion.config import network_config
    config = load_config(os.path.join(ROOT, "configs", "toy", "moons_ve.py"))
    config.model.hidden, config.model.parameterization = 8, "x0"
    torch.manual_seed(0)
    net, ema = (build_network(network_config(config.model), (2,)) for _ in range(2))
    path = save_checkpoint(tmp_path / "checkpoint_last.pt", step=1, config=config, data_shape=(2,),
                           model_state=net.state_dict(), ema_state=ema.state_dict())
    model, sde, cfg = model_from_checkpoint(path)
    assert isinstance(model, ScoreModel) and model.parameterization == "x0"
    assert type(sde).__name__ == "VESDE" and sde.sigma_max == 4.0
    assert cfg.model.hidden == 8
    for k, v in ema.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v)
    raw, _, _ = model_from_checkpoint(tmp_path, use_ema=False)   # a workdir works too
    for k, v in net.state_dict().items():
        assert torch.equal(raw.net.state_dict()[k], v)
    assert not any(p.requires_grad for p in model.net.parameters()) and not model.net.training
    x = torch.zeros(4, 2)
    assert model.score(x, 0.5).shape == x.shape


def test_checkpoints_record_the_task_and_the_label_range(tmp_path):
    from sde_diffusion.config import load_config
    config = load_config(os.path.join(ROOT, "configs", "toy", "8gaussians_cond.py"))
    path = save_checkpoint(tmp_path / "c.pt", step=1, config=config, data_shape=(2,), model_state={})
    ckpt = load_checkpoint(path)
    assert ckpt["task"] == "score" and ckpt["num_classes"] == 8
    config = load_config(os.path.join(ROOT, "configs", "toy", "moons_vp.py"))
    old = save_checkpoint(tmp_path / "old.pt", step=1, config=config, data_shape=(2,), model_state={})
    payload = torch.load(old, weights_only=True)
    del payload["task"], payload["num_classes"]                     # written before these keys
    torch.save(payload, old)
    ckpt = load_checkpoint(old)
    assert ckpt["task"] == "score" and ckpt["num_classes"] is None
