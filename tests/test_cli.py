"""The sde-diffusion command, end to end in subprocesses on tiny settings, error paths included."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sde_diffusion.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(REPO, "configs", "toy", "moons_vp.py")


def run(*args, cwd=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "sde_diffusion", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("sde-diffusion: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("sub", ["", "demo", "train", "sample", "likelihood", "compare",
                                 "optimize-grid"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*([sub] if sub else []), "--help"])
    assert stop.value.code == 0 and "usage: sde-diffusion" in capsys.readouterr().out


def test_python_m_entry_point():
    proc = run("--help")
    assert proc.returncode == 0 and "usage: sde-diffusion" in proc.stdout


def test_sample_oracle_writes_npz_and_scatter(tmp_path):
    out = tmp_path / "s.npz"
    proc = run("sample", "--oracle", "ring8", "--solver", "ddim:eta=1", "--steps", "40", "--n", "300",
               "--seed", "3", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["nfe"] == 40 and info["solver"] == "ddim:eta=1"
    x = np.load(out)["samples"]
    assert x.shape == (300, 2) and np.isfinite(x).all()
    assert (tmp_path / "s.png").stat().st_size > 1000
    again = tmp_path / "again.npz"
    run("sample", "--oracle", "ring8", "--solver", "ddim:eta=1", "--steps", "40", "--n", "300",
        "--seed", "3", "--out", str(again), "--quiet")
    np.testing.assert_array_equal(np.load(again)["samples"], x)


def test_sample_images_write_grid(tmp_path):
    proc = run("sample", "--oracle", "image16", "--solver", "ddim", "--steps", "10", "--n", "16",
               "--out", str(tmp_path / "img"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "img.npz")["samples"].shape == (16, 1, 16, 16)
    assert (tmp_path / "img.png").exists()


def test_likelihood_oracle_matches_exact_density():
    proc = run("likelihood", "--oracle", "gmm2d", "--data", "oracle", "--n", "32", "--exact",
               "--rtol", "1e-7", "--atol", "1e-7")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["divergence"] == "exact" and info["n"] == 32 and info["dim"] == 2
    assert abs(info["nll_nats"] - info["exact_nll_nats"]) < 1e-3
    assert info["max_abs_error_nats"] < 5e-3
    assert info["bpd_ci95"] > 0


def test_compare_oracle_table_csv_plot(tmp_path):
    proc = run("compare", "--oracle", "gmm2d", "--solvers", "ddim:eta=0,ddim:eta=1,euler_maruyama",
               "--nfe", "10,40", "--metric", "flow_rmse", "--n", "400", "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "compare.md").read_text()
    assert "| solver |" in md and "ddim:eta=1" in md and "flow_rmse" in md
    csv_lines = (tmp_path / "compare.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 3 * 2
    assert (tmp_path / "flow_rmse_vs_nfe.png").stat().st_size > 1000
    rows = [line.split(",") for line in csv_lines[1:]]
    header = csv_lines[0].split(",")
    err = {(r[0], int(r[header.index("nfe")])): r[header.index("flow_rmse")] for r in rows}
    # the deterministic solver converges: 4x the NFE, smaller error to the exact flow map
    assert float(err[("ddim:eta=0", 40)]) < float(err[("ddim:eta=0", 10)]) / 2


def test_train_then_sample_and_likelihood_from_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    proc = run("train", "--config", TOY_CONFIG, "--workdir", str(workdir), "--quiet",
               "--config.training.n_iters=30", "--config.training.batch_size=64",
               "--config.model.hidden=32", "--config.training.snapshot_freq_for_preemption=30")
    assert proc.returncode == 0, proc.stderr
    assert any(name.endswith(".pt") for name in os.listdir(workdir))
    proc = run("sample", "--checkpoint", str(workdir), "--solver", "ddim", "--steps", "5", "--n", "50",
               "--out", str(tmp_path / "x.npz"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "x.npz")["samples"].shape == (50, 2)
    proc = run("likelihood", "--checkpoint", str(workdir), "--data", "moons", "--n", "8", "--probes", "2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["divergence"] == "hutchinson"


# ---- train: one command, two spellings (sde-diffusion train / python -m sde_diffusion.training) ----
def _train_entry(spelling):
    """The train command as a function of its arguments, in either spelling."""
    if spelling == "sde-diffusion train":
        return lambda args: main(["train", *args])
    from sde_diffusion.training import main as module_main
    return module_main


TINY_TRAIN = ["--config.training.batch_size=32", "--config.model.hidden=16",
              "--config.model.depth=2", "--config.model.embed_dim=16", "--config.data.n_train=256",
              "--config.training.log_freq=2", "--config.optim.warmup=2", "--config.sampling.steps=5",
              "--config.eval.n_samples=64"]
SPELLINGS = ["sde-diffusion train", "python -m sde_diffusion.training"]


def test_train_help_is_the_same_in_both_spellings(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")       # argparse wraps to the terminal width
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    cli_help = capsys.readouterr().out
    for option in ("--config", "--workdir", "--no-resume", "--eval", "--device", "--seed", "--quiet"):
        assert option in cli_help, option
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "sde_diffusion.training", "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == cli_help


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_train_eval_then_no_resume(spelling, tmp_path, capsys):
    train_cmd = _train_entry(spelling)
    workdir = tmp_path / "run"
    base = ["--config", TOY_CONFIG, "--workdir", str(workdir), "--quiet", *TINY_TRAIN]
    assert train_cmd([*base, "--config.training.n_iters=4", "--eval"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads((workdir / "eval.json").read_text())
    assert printed == written and written["n"] == 64 and written["sw"] > 0 and "sw_ratio" in written
    from sde_diffusion.checkpoints import load_checkpoint
    assert load_checkpoint(workdir / "checkpoint_last.pt")["step"] == 4
    # resumed, 2 < 4 iterations is nothing to do; --no-resume starts again from step 0
    assert train_cmd([*base, "--config.training.n_iters=2"]) == 0
    assert load_checkpoint(workdir / "checkpoint_last.pt")["step"] == 4
    assert train_cmd([*base, "--config.training.n_iters", "2", "--no-resume", "--seed", "7",
                      "--device", "cpu"]) == 0
    assert load_checkpoint(workdir / "checkpoint_last.pt")["step"] == 2
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["seed"] == 7 and saved["device"] == "cpu"
    log_steps = [line.split(",")[0] for line in (workdir / "loss_log.csv").read_text().splitlines()]
    assert log_steps == ["step", "2"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_train_nan_loss_exits_3_with_one_line(spelling, tmp_path, capsys):
    code = _train_entry(spelling)(["--config", TOY_CONFIG, "--workdir", str(tmp_path), "--quiet",
                                   *TINY_TRAIN, "--config.training.n_iters=20",
                                   "--config.optim.lr=1e30", "--config.optim.warmup=0"])
    err = capsys.readouterr().err
    assert code == 3, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("sde-diffusion: error: the training loss became")
    assert "Traceback" not in err and "Last good checkpoint" in lines[0]


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("args, fragments", [
    (["--config", TOY_CONFIG, "--workdir", "w", "--quite"], ["unrecognized arguments: --quite"]),
    (["--config", TOY_CONFIG, "--workdir", "w", "--config.optim.lrr=1"], ["did you mean optim.lr"]),
    (["--config", TOY_CONFIG, "--workdir", "w", "--config.optim.lr"], ["has no value"]),
    (["--config", TOY_CONFIG, "--workdir", "w", "--seed", "x"], ["--seed", "invalid int"]),
])
def test_train_user_errors_are_the_same_in_both_spellings(spelling, args, fragments, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _train_entry(spelling)(args)
    captured = capsys.readouterr()
    assert_user_error(subprocess.CompletedProcess(args, code, captured.out, captured.err), *fragments)


def test_demo_report_has_every_section_and_picture(tmp_path):
    out = tmp_path / "demo"
    proc = run("demo", "--out", str(out), "--iters", "40", "--n", "200", "--nfe", "10,20", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(str(out / "report.md"))
    report = (out / "report.md").read_text()
    for section in ("## Training", "## Samplers", "## Likelihood", "### Trajectories"):
        assert section in report
    for solver in ("ancestral", "reverse_diffusion", "euler_maruyama", "pc", "ddim:eta=0",
                   "ddim:eta=1", "ode", "dpm_solver++"):
        assert f"| {solver} |" in report, solver
    for picture in ("samples.png", "sliced_w_vs_nfe.png", "flow_error_vs_nfe.png", "trajectories.png"):
        assert f"({picture})" in report and (out / picture).stat().st_size > 1000, picture
    for table in ("samplers.csv", "likelihood.csv"):
        assert (out / table).exists()


@pytest.mark.parametrize("args, fragments", [
    (["sample", "--oracle", "nope"], ["unknown oracle 'nope'", "ring8"]),
    (["sample", "--oracle", "ring8", "--solver", "bogus"], ["unknown solver 'bogus'", "ddim"]),
    (["sample", "--oracle", "ring8", "--solver", "ddim:eta"], ["key=value"]),
    (["sample", "--oracle", "ring8", "--solver", "ddim:wobble=1"], ["no option 'wobble'"]),
    (["sample", "--oracle", "ring8", "--n", "0"], ["--n must be >= 1"]),
    (["sample", "--checkpoint", "/no/such/file.pt"], ["no such file"]),
    (["sample", "--oracle", "ring8", "--bogus-flag"], ["unrecognized arguments"]),
    (["train", "--config", "/no/such/config.py", "--workdir", "w"], ["no such file"]),
    (["train", "--config", TOY_CONFIG, "--workdir", "w", "--config.optim.nope=1"], ["nope"]),
    (["train", "--config", TOY_CONFIG, "--workdir", "w", "--config.optim.lr=fast"], ["optim.lr"]),
    (["likelihood", "--oracle", "gmm2d", "--data", "/no/such.npz"], ["no such file"]),
    (["likelihood", "--oracle", "gmm2d", "--data", "digits"], ["shape"]),
    (["compare", "--oracle", "gmm2d", "--nfe", "ten"], ["--nfe must be"]),
    (["nonsense"], ["invalid choice"]),
])
def test_user_errors_are_one_line(args, fragments, tmp_path, monkeypatch, capsys):
    """In-process for speed; test_user_error_in_a_subprocess checks the process-level behaviour."""
    monkeypatch.chdir(tmp_path)
    code = main(args)
    captured = capsys.readouterr()
    assert_user_error(subprocess.CompletedProcess(args, code, captured.out, captured.err), *fragments)


def test_user_error_in_a_subprocess(tmp_path):
    assert_user_error(run("sample", "--oracle", "ring8", "--solver", "bogus", cwd=tmp_path),
                      "unknown solver 'bogus'")


def test_device_cuda_without_cuda_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code = main(["sample", "--oracle", "ring8", "--device", "cuda"])
    err = capsys.readouterr().err
    assert_user_error(subprocess.CompletedProcess([], code, "", err), "CUDA is not available")


# ---- optimize-grid writes a grid file; sample --grid FILE.json uses it ---------------------------
FIT = ["optimize-grid", "--oracle", "ring8", "--nfe", "6", "--pilot", "64", "--max-evals", "20",
       "--quiet"]


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "grid.json"
    assert main([*FIT, "--out", str(path)]) == 0
    return path


def _one_line_error(code, capsys, *fragments):
    captured = capsys.readouterr()
    assert_user_error(subprocess.CompletedProcess([], code, captured.out, captured.err), *fragments)


def test_optimize_grid_writes_a_valid_file(tmp_path, capsys):
    out = tmp_path / "sub" / "g.json"
    assert main([*FIT, "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "->" in line and "20 evaluations" in line and str(out) in line
    saved = json.loads(out.read_text())
    assert saved["format"] == "sde_diffusion.grid/1"
    assert saved["solver"] == "unipc" and saved["options"] == {"order": 3}
    assert saved["nfe"] == 6 and saved["pilot_size"] == 64 and saved["start_grid"] == "logsnr"
    assert 1 <= saved["evaluations"] <= 25 and saved["model_calls"] > 0
    times = saved["times"]
    assert len(times) == 7 and all(b < a for a, b in zip(times, times[1:]))
    assert times[0] == 1.0 and times[-1] == pytest.approx(1e-3)
    assert saved["pilot_error"] <= saved["initial_error"] and saved["teacher_error"] < 1e-3
    assert saved["validation_size"] == 16   # a quarter of the pilot held out for early stopping
    assert saved["validation_error"] <= saved["initial_validation_error"]
    assert not [p for p in os.listdir(out.parent) if p != "g.json"]   # no temporary left behind
    # the same seed gives the same grid, to the last digit
    again = tmp_path / "again.json"
    assert main([*FIT, "--out", str(again)]) == 0
    assert json.loads(again.read_text())["times"] == times


def test_sample_with_a_grid_file_uses_its_times(grid_file, tmp_path, capsys):
    import torch

    from sde_diffusion import sample
    from sde_diffusion.experiments import named_oracle
    from sde_diffusion.sdes import VPSDE

    out = tmp_path / "s.npz"
    assert main(["sample", "--oracle", "ring8", "--grid", str(grid_file), "--n", "50",
                 "--out", str(out), "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    saved = json.loads(grid_file.read_text())
    assert info["nfe"] == saved["nfe"] == 6 and info["solver"] == "unipc:order=3"
    times = torch.tensor(saved["times"], dtype=torch.float64)
    expected = sample(named_oracle("ring8", VPSDE()), shape=(50, 2), solver="unipc", order=3,
                      grid=times, generator=torch.Generator().manual_seed(0)).samples
    np.testing.assert_array_equal(np.load(out)["samples"], expected.numpy())
    # the same solver spelled out, and --steps equal to the file's, are accepted
    assert main(["sample", "--oracle", "ring8", "--grid", str(grid_file), "--solver",
                 "unipc:order=3", "--steps", "6", "--n", "10", "--out", str(out), "--quiet"]) == 0


@pytest.mark.parametrize("args, fragments", [
    (["--solver", "ddim"], ["fitted for solver unipc:order=3", "--solver ddim"]),
    (["--solver", "unipc"], ["fitted for solver unipc:order=3", "--solver unipc"]),  # order=2
    (["--steps", "5"], ["--steps 5", "6 steps"]),
    (["--sde", "ve"], ["VPSDE", "VESDE"]),
])
def test_sample_grid_file_mismatch_is_one_line(grid_file, args, fragments, tmp_path, monkeypatch,
                                               capsys):
    monkeypatch.chdir(tmp_path)
    _one_line_error(main(["sample", "--oracle", "ring8", "--grid", str(grid_file), *args]), capsys,
                    *fragments)


GOOD = {"format": "sde_diffusion.grid/1", "solver": "unipc", "options": {"order": 3}, "nfe": 2,
        "times": [1.0, 0.5, 0.001]}


@pytest.mark.parametrize("content, fragments", [
    ("{not json", ["is not a JSON file"]),
    ("[1, 2]", ["is not a grid file"]),
    (json.dumps({**GOOD, "format": "other/1"}), ["'other/1'", "sde_diffusion.grid/1"]),
    (json.dumps({**GOOD, "solver": "nope"}), ["unknown solver 'nope'"]),
    (json.dumps({**GOOD, "options": [3]}), ["'options'"]),
    (json.dumps({**GOOD, "times": [0.001, 0.5, 1.0]}), ["strictly decreasing"]),
    (json.dumps({**GOOD, "times": [1.0, 0.5, 0.5, 0.001]}), ["strictly decreasing"]),
    (json.dumps({**GOOD, "times": [2.0, 0.5, 0.001]}), ["(0, T=1.0]"]),
    (json.dumps({**GOOD, "times": [1.0, 0.5, 0.0]}), ["(0, T=1.0]"]),
    (json.dumps({**GOOD, "times": [1.0]}), ["at least two finite numbers"]),
    (json.dumps({**GOOD, "times": [1.0, "0.5", 0.001]}), ["at least two finite numbers"]),
    (json.dumps({**GOOD, "times": [1.0, float("nan"), 0.001]}), ["finite numbers"]),
    (None, ["no such file"]),
])
def test_sample_malformed_grid_file_is_one_line(content, fragments, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "g.json").write_text(content)
    _one_line_error(main(["sample", "--oracle", "ring8", "--grid", "g.json", "--n", "5"]), capsys,
                    *fragments)
    assert not (tmp_path / "samples.npz").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--nfe", "6", "--solver", "ddim:eta=1"], ["stochastic"]),
    (["--nfe", "6", "--solver", "ode"], ["adaptive"]),
    (["--pilot", "8"], ["--nfe --steps is required"]),
    (["--nfe", "6", "--steps", "6"], ["not allowed with"]),
    (["--steps", "1"], ["at least 2 steps"]),
    (["--nfe", "6", "--pilot", "0"], ["--pilot must be >= 1"]),
    (["--nfe", "6", "--knots", "1"], ["--knots must be >= 2"]),
    (["--nfe", "6", "--validation", "1"], ["--validation must lie in [0, 1)"]),
    (["--nfe", "6", "--grid", "old.json"], ["grid name", "not a grid file"]),
    (["--nfe", "6", "--grid", "wiggly"], ["wiggly"]),
])
def test_optimize_grid_user_errors_are_one_line(args, fragments, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _one_line_error(main(["optimize-grid", "--oracle", "ring8", "--quiet", *args]), capsys,
                    *fragments)
    assert not (tmp_path / "grid.json").exists()
