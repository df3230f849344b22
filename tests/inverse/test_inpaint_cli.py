"""``sde-diffusion inpaint`` (sde_diffusion/inverse/cli.py): every method on a built-in oracle and
on a freshly trained tiny float32 digits U-Net, the outputs, agreement with ``solve_inverse``
called directly, and the one-line errors."""
import json
import subprocess

import numpy as np
import pytest
import torch

from sde_diffusion.cli import main
from sde_diffusion.experiments import named_oracle
from sde_diffusion.inverse import (BlockAverage, Colorization, Mask, available_methods, box_mask,
                                   observe, solve_inverse)
from sde_diffusion.inverse.cli import build_operator, parse_method_spec
from sde_diffusion.sdes import VPSDE

from helpers import assert_one_line_error  # noqa: E402

METHODS = {  # small settings, so that each run takes well under a second on the oracle
    "ddnm": "ddnm", "ddnm_plus": "ddnm_plus", "ddrm": "ddrm", "dps": "dps:zeta=0.1",
    "mcgdiff": "mcgdiff:particles=4", "pigdm": "pigdm", "repaint": "repaint:jump_length=2:resample=2",
    "score_sde": "score_sde", "sdedit": "sdedit", "tds": "tds:particles=4"}
#: methods whose samples meet a noiseless observation exactly (known part replaced or projected)
EXACT_ON_Y = {"ddnm", "ddrm", "mcgdiff", "repaint", "score_sde", "sdedit", "tds"}


def test_every_registered_method_is_covered():
    assert set(METHODS) == set(available_methods())


def _run(capsys, *args):
    code = main(["inpaint", *args, "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def _one_line_error(capsys, args, *fragments):
    code = main(["inpaint", *args, "--quiet"])
    return assert_one_line_error(code, capsys.readouterr().err, *fragments)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_on_the_image_oracle(name, tmp_path, capsys):
    out = tmp_path / "x.npz"
    info = _run(capsys, "--oracle", "image16", "--mask", "box", "--method", METHODS[name],
                "--nfe", "8", "--n", "3", "--out", str(out))
    assert info["samples"] == str(out) and info["picture"] == str(tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 500
    assert 1 <= info["nfe"] <= 8 and info["nfe_budget"] == 8 and info["n"] == 3
    with np.load(out) as f:
        x, y, truth = f["samples"], f["observed"], f["truth"]
        assert int(f["nfe"]) == info["nfe"] and str(f["method"]) == METHODS[name]
    assert x.shape == truth.shape == (3, 1, 16, 16) and np.isfinite(x).all()
    op = Mask(box_mask((1, 16, 16)))
    np.testing.assert_allclose(y, op.A(torch.from_numpy(truth).double()).float().numpy(), atol=1e-6)
    if name in EXACT_ON_Y:
        assert info["residual_rms"] < 1e-5, info
    assert info["mse_to_truth"] < 1.0


def test_cli_equals_solve_inverse_called_directly(tmp_path, capsys):
    """The command observes the data with sigma_y, passes method options, solver and seed through:
    its samples are solve_inverse's (a noisy observation, an option and a solver option)."""
    out = tmp_path / "x.npz"
    _run(capsys, "--oracle", "gmm2d", "--mask", "lower-half", "--method", "ddnm",
         "--solver", "ddim:eta=0.5", "--sigma-y", "0.1", "--nfe", "12", "--n", "5",
         "--seed", "4", "--out", str(out))
    mix = named_oracle("gmm2d", VPSDE())
    truth = mix.sample(5, t=mix.sde.eps, generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64)
    op = Mask(torch.tensor([True, False]))
    y = observe(op, truth, 0.1, generator=6)
    want = solve_inverse(mix, op, y, method="ddnm", sigma_y=0.1, nfe=12, solver="ddim",
                         generator=4, solver_options={"eta": 0.5}).samples
    with np.load(out) as f:
        np.testing.assert_allclose(f["truth"], truth.float().numpy())
        np.testing.assert_allclose(f["observed"], y.float().numpy())
        np.testing.assert_allclose(f["samples"], want.float().numpy(), rtol=1e-6, atol=1e-6)
    # a sample depends on the seed and its index only: --n 3 gives the first 3 of --n 5 (held-out
    # data from a file, whose first rows do not depend on --n)
    data = tmp_path / "held_out.npy"
    np.save(data, truth.numpy())
    common = ["--oracle", "gmm2d", "--data", str(data), "--method", "ddnm", "--solver",
              "ddim:eta=0.5", "--sigma-y", "0.1", "--nfe", "12", "--seed", "4"]
    _run(capsys, *common, "--n", "5", "--out", str(tmp_path / "b"))
    _run(capsys, *common, "--n", "3", "--out", str(tmp_path / "a"))
    with np.load(tmp_path / "b.npz") as f, np.load(tmp_path / "a.npz") as g:
        np.testing.assert_array_equal(g["samples"], f["samples"][:3])


@pytest.mark.parametrize("args, shape", [
    (["--operator", "downsample:2"], (1, 8, 8)),
    (["--operator", "downsample:4"], (1, 4, 4)),
    (["--mask", "random:0.3"], None),
    (["--mask", "box:6"], None),
    (["--mask", "left-half"], None),
])
def test_operators_on_the_image_oracle(args, shape, tmp_path, capsys):
    info = _run(capsys, "--oracle", "image16", *args, "--method", "ddrm", "--nfe", "6", "--n", "2",
                "--out", str(tmp_path / "x"))
    with np.load(tmp_path / "x.npz") as f:
        if shape is not None:
            assert f["observed"].shape == (2,) + shape
    assert info["residual_rms"] < 1e-5 and info["operator"] == args[1] if "downsample" in args[1] \
        else info["operator"] == "mask:" + args[1]


def test_build_operator():
    assert isinstance(build_operator(None, "colorization", (3, 8, 8)), Colorization)
    assert isinstance(build_operator(None, "downsample", (1, 8, 8)), BlockAverage)
    op = build_operator("box:2", None, (1, 8, 8))
    assert isinstance(op, Mask) and op.out_dim == 60
    op = build_operator("random:0.25", None, (3, 8, 8), seed=1)
    assert op.out_dim == 3 * 16
    assert build_operator("lower-half", None, (4,)).out_dim == 2
    assert parse_method_spec("dps:zeta=0.1:eta=0") == ("dps", {"zeta": 0.1, "eta": 0})


@pytest.mark.parametrize("args, fragments", [
    (["--oracle", "image16", "--method", "bogus"], ["unknown inverse method 'bogus'", "repaint", "ddnm"]),
    (["--oracle", "image16", "--method", "dps:wobble=1"], ["no option 'wobble'", "zeta"]),
    (["--oracle", "image16", "--method", "dps:zeta=fast"], ["method option zeta='fast'", "a number"]),
    (["--oracle", "image16", "--method", "dps:zeta"], ["key=value"]),
    (["--oracle", "image16", "--mask", "circle"], ["--mask 'circle' is not a mask", "lower-half", "random:P"]),
    (["--oracle", "image16", "--mask", "random:half"], ["--mask random:half", "not a number"]),
    (["--oracle", "image16", "--mask", "random:1.5"], ["--mask random:1.5 does not fit", "keep"]),
    (["--oracle", "image16", "--mask", "box:20"], ["--mask box:20 does not fit data of shape (1, 16, 16)"]),
    (["--oracle", "gmm2d", "--mask", "box"], ["--mask box does not fit data of shape (2,)", "image shape"]),
    (["--oracle", "image16", "--operator", "colorization"],
     ["--operator colorization does not fit data of shape (1, 16, 16)", "C >= 2"]),
    (["--oracle", "image16", "--operator", "downsample:3"], ["does not fit", "factor 3 must divide"]),
    (["--oracle", "image16", "--operator", "blur"], ["--operator 'blur' is not an operator", "colorization"]),
    (["--oracle", "image16", "--mask", "box", "--operator", "colorization"], ["not allowed with"]),
    (["--oracle", "image16", "--method", "repaint", "--solver", "ddim"],
     ["method 'repaint' runs its own loop", "ddnm"]),
    (["--oracle", "image16", "--method", "ddnm", "--solver", "nope"], ["unknown solver 'nope'"]),
    (["--oracle", "image16", "--sigma-y", "-1"], ["--sigma-y must be a finite number >= 0"]),
    (["--oracle", "image16", "--nfe", "0"], ["--nfe must be >= 1"]),
    (["--oracle", "image16", "--n", "0"], ["--n must be >= 1"]),
    (["--oracle", "image16", "--data", "moons"], ["its samples have shape (2,)", "(1, 16, 16)"]),
    (["--oracle", "nope"], ["unknown oracle 'nope'"]),
    (["--checkpoint", "/no/such/run", "--data", "digits"], ["no such file"]),
    (["--oracle", "image16", "--bogus"], ["unrecognized arguments"]),
])
def test_user_errors_are_one_line(args, fragments, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, args, *fragments)
    assert not (tmp_path / "inpaint.npz").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "x.npz"
    args = ["--oracle", "gmm2d", "--method", "ddnm", "--nfe", "4", "--n", "2", "--out", str(out)]
    _run(capsys, *args)
    _one_line_error(capsys, args, "exists; pass --overwrite")
    _run(capsys, *args, "--overwrite")


def test_help_names_every_method(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["inpaint", "--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and "usage: sde-diffusion inpaint" in text
    for name in available_methods():
        assert name in text


# ---- a freshly trained tiny float32 digits U-Net ----------------------------------------------------
TINY_UNET = ["--config.training.batch_size=8", "--config.training.log_freq=1",
             "--config.training.sample_freq=0", "--config.model.base_channels=8",
             "--config.model.channel_mults=(1,)", "--config.model.num_res_blocks=1",
             "--config.model.attn_resolutions=()", "--config.optim.warmup=1",
             "--config.training.n_iters=2", "--config.device=cpu"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    import os

    pytest.importorskip("sklearn")
    from sde_diffusion.checkpoints import load_checkpoint

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "digits", "vp.py")
    workdir = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", "--config", config, "--workdir", str(workdir), *TINY_UNET, "--quiet"]) == 0
    ema = load_checkpoint(workdir / "checkpoint_last.pt")["ema"]
    assert all(v.dtype == torch.float32 for v in ema.values() if v.is_floating_point())
    return workdir


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_on_a_trained_checkpoint(digits_run, name, tmp_path, capsys):
    info = _run(capsys, "--checkpoint", str(digits_run), "--data", "digits", "--mask", "lower-half",
                "--method", METHODS[name], "--nfe", "4", "--n", "2", "--out", str(tmp_path / "x"))
    with np.load(tmp_path / "x.npz") as f:
        x, truth = f["samples"], f["truth"]
    assert x.dtype == np.float32 and x.shape == truth.shape == (2, 1, 8, 8) and np.isfinite(x).all()
    assert 1 <= info["nfe"] <= 4 and (tmp_path / "x.png").stat().st_size > 500
    if name in EXACT_ON_Y:
        assert info["residual_rms"] < 1e-5, info


def test_checkpoint_errors(digits_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, ["--checkpoint", str(digits_run)], "--data is needed with --checkpoint")
    _one_line_error(capsys, ["--checkpoint", str(digits_run), "--data", "moons"],
                    "--data moons: its samples have shape (2,) but the model's have shape (1, 8, 8)")
    _one_line_error(capsys, ["--checkpoint", str(digits_run), "--data", "digits", "--n", "1000"],
                    "--n 1000: --data digits holds only 360 examples")
    _one_line_error(capsys, ["--checkpoint", str(digits_run), "--data", "digits", "--operator",
                             "colorization"], "--operator colorization does not fit")


def test_subprocess_entry_point(tmp_path):
    import os
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "sde_diffusion", "inpaint", "--oracle", "image16",
                           "--method", "bogus"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("sde-diffusion: error: unknown inverse")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_pigdm_through_a_solver_and_its_nan_as_one_line(tmp_path, capsys, monkeypatch):
    """--method pigdm --solver NAME runs PiGDM's guided score through that solver; a NaN on the way
    (a network whose Jacobian the guided score amplifies) is a one-line error naming the step, the
    time and the way out, exit status 1, no traceback."""
    info = _run(capsys, "--oracle", "image16", "--mask", "box", "--method", "pigdm", "--solver",
                "sde_dpm_solver++", "--nfe", "8", "--n", "3", "--out", str(tmp_path / "x"))
    assert info["solver"] == "sde_dpm_solver++" and info["nfe"] == 8
    from sde_diffusion.models.wrapper import NonFiniteError
    import sde_diffusion.inverse.api as api

    def diverge(*args, **kwargs):
        raise NonFiniteError("sde_dpm_solver++: the state became NaN/Inf at step 7 of 50 (t=0.855); "
                             "... use solver=None (the paper's update)")
    monkeypatch.setattr(api, "solve_inverse", diverge)
    code = main(["inpaint", "--oracle", "image16", "--mask", "box", "--method", "pigdm", "--solver",
                 "sde_dpm_solver++", "--n", "2", "--out", str(tmp_path / "y"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("sde-diffusion: error: sde_dpm_solver++: the state became NaN/Inf at step 7")
    assert "solver=None" in err
