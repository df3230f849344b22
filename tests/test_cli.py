"""The sde-diffusion command, end to end in subprocesses on tiny settings, error paths included."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from sde_diffusion.cli import build_parser, main
from sde_diffusion.samplers.tuning import START_GRIDS

from helpers import assert_one_line_error  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(REPO, "configs", "toy", "moons_vp.py")


def run(*args, cwd=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "sde_diffusion", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def assert_user_error(proc, *fragments):
    assert_one_line_error(proc.returncode, proc.stderr, *fragments)


@pytest.mark.parametrize("sub", ["", "demo", "train", "sample", "likelihood", "compare",
                                 "optimize-grid"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*([sub] if sub else []), "--help"])
    assert stop.value.code == 0 and "usage: sde-diffusion" in capsys.readouterr().out


def test_python_m_entry_point():
    proc = run("--help")
    assert proc.returncode == 0 and "usage: sde-diffusion" in proc.stdout


def test_a_torchrun_rank_leaves_without_the_interpreter_teardown():
    """Under torchrun (WORLD_SIZE > 1) main ends the process with its status once the command is
    done: atexit handlers (the teardown where gloo's threads can abort) never run, and what the
    command printed is flushed first. An error path is enough to see it: no group is joined."""
    script = ("import atexit, sys\n"
              "from sde_diffusion.cli import main\n"
              "atexit.register(lambda: print('TEARDOWN', flush=True))\n"
              "print('before', end='')\n"
              "main(['sample', '--oracle', 'ring8', '--n', '0', '--out', 'x.npz'])\n"
              "print('RETURNED')\n")
    env = dict(os.environ, WORLD_SIZE="2", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "before" and "--n must be >= 1, got 0" in proc.stderr
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={k: v for k, v in env.items() if k != "WORLD_SIZE"}, timeout=120)
    assert plain.returncode == 0 and plain.stdout.endswith("RETURNED\nTEARDOWN\n")


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


def test_sample_seed_gives_each_sample_its_own_noise(tmp_path):
    """An integer --seed means what it means in sample(): sample i depends on (seed, i) only, so
    --n 8 gives the first 8 samples of --n 16 (a stochastic solver: noise at every step too)."""
    args = ["sample", "--oracle", "ring8", "--solver", "ddim:eta=1", "--steps", "10", "--seed", "4",
            "--quiet"]
    assert main([*args, "--n", "8", "--out", str(tmp_path / "a.npz")]) == 0
    assert main([*args, "--n", "16", "--out", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz")["samples"], np.load(tmp_path / "b.npz")["samples"]
    np.testing.assert_array_equal(a, b[:8])


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
    from sde_diffusion.training.__main__ import main as module_main
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
    # item 10: error bars, the floor at the table's sample size, robust likelihood, provenance
    assert "| sliced_w | sliced_w_se |" in report and "bootstrap standard error" in report
    assert "Floor: a fresh data set of the same size, 200 points" in report
    assert "nll_median" in report and "latent_outliers" in report
    record = json.loads((out / "provenance.json").read_text())
    for key in ("date_utc", "command", "seed", "sde_diffusion", "torch", "numpy", "python",
                "git_commit"):
        assert key in record and f"- {key}: `" in report, key
    assert record["seed"] == 0 and record["command"].startswith("sde-diffusion demo --out")
    rows = (out / "samplers.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert all(float(r.split(",")[header.index("sliced_w_se")]) > 0 for r in rows[1:])


def test_demo_rerun_reuses_the_finished_training(tmp_path, capsys):
    """Item 1: a rerun must not retrain from scratch; --retrain does; another config does."""
    from sde_diffusion.config import apply_overrides, toy_config
    from sde_diffusion.demo import _training_plan

    out = tmp_path / "demo"
    base = ["demo", "--out", str(out), "--iters", "6", "--n", "64", "--nfe", "10"]
    assert main(base) == 0
    assert ": training\n" in capsys.readouterr().out
    ckpt = out / "train" / "checkpoint_last.pt"
    before = (ckpt.stat().st_mtime_ns, ckpt.read_bytes())
    assert main(base) == 0
    assert "reusing the finished training in" in capsys.readouterr().out
    assert (ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == before
    assert "reused (`--retrain` trains again)" in (out / "report.md").read_text()
    assert json.loads((out / "provenance.json").read_text())["training_reused"] is True
    # the plans of other runs (without running them): --retrain, another config
    config = toy_config("moons", "vpsde")
    apply_overrides(config, {"seed": 0, "device": "cpu", "training.n_iters": 6,
                             "optim.warmup": 1})
    assert _training_plan(str(out / "train"), config, False)[0] is True
    resume, message = _training_plan(str(out / "train"), config, True)
    assert resume is False and "training afresh (--retrain" in message
    assert build_parser().parse_args([*base, "--retrain"]).retrain is True
    apply_overrides(config, {"seed": 1})
    resume, message = _training_plan(str(out / "train"), config, False)
    assert resume is False and "another config: seed differ" in message


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
    (["train", "--config", TOY_CONFIG.replace("moons_vp", "8gaussians_classifier"), "--workdir", "w",
      "--eval"], ["--eval", "classifier", "drop --eval"]),
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
    assert saved["nfe"] == 6 and saved["pilot_size"] == 64
    assert saved["start_grid"] in ("logsnr",) + START_GRIDS     # the scan's pick (its own test: test_tuning)
    assert f"from the {saved['start_grid']} grid" in line
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


def test_optimize_grid_takes_a_solver_that_its_options_make_deterministic(tmp_path, capsys):
    """edm_heun without churn is deterministic (the registry's declaration), so it has a grid to
    fit; with churn it is refused (test_cheap_inputs_are_checked_before_loading_or_work)."""
    out = tmp_path / "edm.json"
    args = [a for a in FIT if a not in ("--max-evals", "20")]
    assert main([*args, "--max-evals", "4", "--solver", "edm_heun", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["solver"] == "edm_heun" and saved["nfe"] == 6 and len(saved["times"]) == 4


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
                      grid=times, generator=0).samples
    np.testing.assert_array_equal(np.load(out)["samples"], expected.numpy())
    # the same solver spelled out, and --steps equal to the file's, are accepted
    assert main(["sample", "--oracle", "ring8", "--grid", str(grid_file), "--solver",
                 "unipc:order=3", "--steps", "6", "--n", "10", "--out", str(out), "--quiet",
                 "--overwrite"]) == 0


def test_analytic_first_step_through_a_grid_file(tmp_path, capsys):
    """optimize-grid --analytic-first-step records it; sample --grid FILE applies it (the file's
    NFE, one step more than without it); the flag with a file fitted without it is refused."""
    path = tmp_path / "afs.json"
    assert main([*FIT, "--analytic-first-step", "--out", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["analytic_first_step"] is True and saved["nfe"] == 6 and len(saved["times"]) == 8
    capsys.readouterr()
    out = tmp_path / "s.npz"
    assert main(["sample", "--oracle", "ring8", "--grid", str(path), "--n", "20", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 6
    # a named solver with the flag and a budget: one step more for the same NFE
    assert main(["sample", "--oracle", "ring8", "--solver", "ipndm", "--nfe", "5",
                 "--analytic-first-step", "--n", "20", "--out", str(out), "--quiet",
                 "--overwrite"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nfe"] == 5 and info["analytic_first_step"] is True


def test_analytic_first_step_with_a_grid_file_fitted_without_it_is_one_line(grid_file, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _one_line_error(main(["sample", "--oracle", "ring8", "--grid", str(grid_file),
                          "--analytic-first-step"]), capsys, "fitted without it")


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


@pytest.mark.parametrize("sde, accepted", [
    ({"name": "vp_cosine", "cosine_s": 0.01}, False),   # equal reprs before: equality by parameters
    ({"name": "vp_cosine"}, True),
    ("VPSDE(beta_min=0.1, beta_max=20.0, schedule='linear', N=1000, T=1.0, eps=0.001)", False),
])
def test_grid_file_sde_is_compared_by_parameters(sde, accepted, tmp_path, monkeypatch, capsys):
    """A grid fitted under one SDE is refused for a model under another, even where their reprs
    agreed (cosine VP SDEs with different cosine_s); files of the earlier format, whose SDE is a
    repr string, are compared by repr."""
    from sde_diffusion.sdes import make_sde

    monkeypatch.chdir(tmp_path)
    if isinstance(sde, dict):
        sde = make_sde(sde.pop("name"), **sde).to_dict()
    (tmp_path / "g.json").write_text(json.dumps({**GOOD, "sde": sde}))
    code = main(["sample", "--oracle", "ring8", "--sde", "vp_cosine", "--grid", "g.json",
                 "--n", "5", "--quiet"])
    if accepted:
        assert code == 0
    else:
        _one_line_error(code, capsys, "fitted under", "cosine")


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


# ---- nothing that fails late may cost minutes: dependencies and inputs checked first (issue 10) ----
def test_matplotlib_is_a_core_dependency():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    required = [line.split(">")[0].split("=")[0].strip()
                for line in cfg["options"]["install_requires"].strip().splitlines()]
    assert "matplotlib" in required


@pytest.mark.parametrize("args", [
    ["demo", "--iters", "2", "--n", "50", "--nfe", "10"],
    ["compare", "--oracle", "gmm2d", "--solvers", "ddim", "--nfe", "10", "--n", "50"],
    ["sample", "--oracle", "ring8", "--steps", "5", "--n", "10"],       # a 2-D scatter picture
])
def test_missing_matplotlib_fails_before_any_work(args, tmp_path, monkeypatch, capsys):
    """Without matplotlib the demo used to train for minutes, then fail (item 1)."""
    import sde_diffusion.demo as demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib fails
    started = []
    monkeypatch.setattr(demo, "_run_demo", lambda *a, **k: started.append(a) or "report.md")
    _one_line_error(main([*args, "--out", str(tmp_path / "out")]), capsys, "needs matplotlib",
                    "pip install matplotlib")
    assert not started and sorted(os.listdir(tmp_path)) == []      # no training, no file


def test_sample_without_matplotlib_is_fine_for_data_without_a_picture(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "g.npz"
    assert main(["sample", "--oracle", "gmm64", "--solver", "ddim", "--steps", "3", "--n", "4",
                 "--out", str(out), "--quiet"]) == 0
    assert np.load(out)["samples"].shape == (4, 64)


def _no_loading(monkeypatch):
    """Make loading a model (or an oracle) fail loudly: the error must come before it."""
    import sde_diffusion.cli as cli

    def refuse(args):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load_model", refuse)


@pytest.mark.parametrize("args, fragments", [
    (["sample", "--oracle", "ring8", "--solver", "ddim:eta=abc"], ["eta='abc'", "a number"]),
    (["sample", "--oracle", "ring8", "--solver", "unipc:corrector=1"], ["True or False"]),
    (["sample", "--oracle", "ring8", "--solver", "ddim:wobble=1"], ["no option 'wobble'"]),
    (["sample", "--oracle", "ring8", "--grid", "wiggly"], ["--grid 'wiggly'", "logsnr"]),
    (["sample", "--oracle", "ring8", "--out", "taken.npz"], ["exists", "--overwrite"]),
    (["sample", "--oracle", "ring8", "--out", "afile/x.npz"], ["cannot write", "afile"]),
    (["sample", "--oracle", "ring8", "--out", "adir"], ["--out 'adir.npz' is a folder"]),
    (["compare", "--oracle", "gmm2d", "--metric", "fid"], ["--metric 'fid'", "sliced_w"]),
    (["compare", "--checkpoint", "run", "--metric", "weight_tv"], ["needs --oracle"]),
    (["compare", "--oracle", "gmm2d", "--solvers", "ancestral,pc", "--metric", "flow_rmse"],
     ["deterministic"]),
    (["compare", "--oracle", "gmm2d", "--solvers", "ddim:eta=x"], ["a number"]),
    (["compare", "--oracle", "gmm2d", "--n", "1"], ["--n must be >= 2"]),
    (["compare", "--oracle", "gmm2d", "--bootstrap", "1"], ["--bootstrap must be 0"]),
    (["compare", "--oracle", "gmm2d", "--grid", "g.json"], ["grid name"]),
    (["compare", "--oracle", "gmm2d", "--out", "taken.npz"], ["is a file"]),
    (["compare", "--oracle", "gmm2d", "--out", "old"], ["compare.md", "exists", "--overwrite"]),
    (["optimize-grid", "--oracle", "ring8", "--nfe", "6", "--solver", "ddim:eta=1"], ["stochastic"]),
    (["optimize-grid", "--oracle", "ring8", "--nfe", "6", "--solver", "edm_heun:S_churn=40"],
     ["stochastic"]),
    (["compare", "--oracle", "gmm2d", "--solvers", "edm_heun:S_churn=40,pc", "--metric", "flow_rmse"],
     ["deterministic"]),
    (["optimize-grid", "--oracle", "ring8", "--nfe", "6", "--solver", "unipc:order=x"],
     ["an integer"]),
    (["optimize-grid", "--oracle", "ring8", "--steps", "1"], ["at least 2 steps"]),
    (["optimize-grid", "--oracle", "ring8", "--nfe", "6", "--out", "taken.npz"], ["--overwrite"]),
    (["likelihood", "--oracle", "gmm2d", "--data", "moon"], ["--data 'moon'", "moons"]),
    (["likelihood", "--checkpoint", "run", "--data", "oracle"], ["needs --oracle"]),
    (["likelihood", "--oracle", "gmm2d", "--data", "oracle", "--rtol", "0"], ["--rtol"]),
    (["likelihood", "--oracle", "gmm2d", "--data", "oracle", "--atol", "nan"], ["--atol"]),
    (["sample", "--oracle", "ring8", "--steps", "1000000000"], ["--steps=1000000000", "100000"]),
    (["optimize-grid", "--oracle", "ring8", "--steps", "1000000000"], ["maximum of 100000"]),
    (["optimize-grid", "--oracle", "ring8", "--nfe", "1000000000"], ["maximum of 100000"]),
    (["compare", "--oracle", "gmm2d", "--nfe", "10,1000000000"], ["--nfe 1000000000", "100000"]),
    (["demo", "--out", "taken.npz"], ["is a file"]),
    (["demo", "--nfe", "0"], ["--nfe must be"]),
    (["demo", "--n", "1"], ["--n must be >= 2"]),
])
def test_cheap_inputs_are_checked_before_loading_or_work(args, fragments, tmp_path, monkeypatch,
                                                         capsys):
    """Item 7: output writable and not silently replaced, metric, solver and options, sizes and
    grids are checked before a model is loaded (and long before sampling or training)."""
    import sde_diffusion.demo as demo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.npz").write_bytes(b"keep me")
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "adir.npz").mkdir()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "compare.md").write_text("an earlier study")
    _no_loading(monkeypatch)
    monkeypatch.setattr(demo, "_run_demo", lambda *a, **k: pytest.fail("the demo started"))
    _one_line_error(main(args), capsys, *fragments)
    assert (tmp_path / "taken.npz").read_bytes() == b"keep me"
    assert (tmp_path / "old" / "compare.md").read_text() == "an earlier study"


@pytest.mark.parametrize("args", [
    ["sample", "--oracle", "gmm64", "--n", "1000000000000"],
    ["likelihood", "--oracle", "gmm64", "--data", "oracle", "--n", "1000000000000"],
    ["optimize-grid", "--oracle", "gmm64", "--nfe", "10", "--pilot", "1000000000000"],
])
def test_a_batch_larger_than_memory_is_refused_before_work(args, tmp_path, monkeypatch, capsys):
    """Item 6: 10^12 samples of 64 numbers (256 TB) are refused at once, naming the option."""
    monkeypatch.chdir(tmp_path)
    option = [a for a in args if a in ("--n", "--pilot")][0]
    _one_line_error(main(args), capsys, f"{option} 1000000000000", "GiB")
    assert os.listdir(tmp_path) == []


def test_sample_refuses_to_replace_its_output_unless_overwrite(tmp_path, monkeypatch, capsys):
    """Item 8: `sample` used to replace ./samples.npz silently; now it refuses, and --overwrite
    replaces it (the picture beside it too)."""
    monkeypatch.chdir(tmp_path)
    base = ["sample", "--oracle", "ring8", "--solver", "ddim", "--steps", "4", "--quiet"]
    assert main([*base, "--n", "10"]) == 0
    assert np.load(tmp_path / "samples.npz")["samples"].shape == (10, 2)
    capsys.readouterr()
    _one_line_error(main([*base, "--n", "20"]), capsys, "'samples.npz' exists", "--overwrite")
    assert np.load(tmp_path / "samples.npz")["samples"].shape == (10, 2)
    (tmp_path / "samples.npz").unlink()            # the picture alone is protected as well
    _one_line_error(main([*base, "--n", "20"]), capsys, "samples.png", "--overwrite")
    assert main([*base, "--n", "20", "--overwrite"]) == 0
    assert np.load(tmp_path / "samples.npz")["samples"].shape == (20, 2)


def _strict_json(text):
    """Parse JSON as a strict parser would: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not valid JSON")
    return json.loads(text, parse_constant=refuse)


def test_json_outputs_are_valid_json(tmp_path, monkeypatch, capsys):
    """Item 8: one point has no spread (bpd_ci95 is NaN): printed as null, not NaN."""
    from sde_diffusion.cli import _write_json

    assert main(["likelihood", "--oracle", "gmm2d", "--data", "oracle", "--n", "1"]) == 0
    info = _strict_json(capsys.readouterr().out)
    assert info["n"] == 1 and info["bpd_ci95"] is None and math.isfinite(info["bpd"])
    path = tmp_path / "scores.json"
    _write_json(str(path), {"sw": float("nan"), "all": [1.0, float("inf")], "n": 3})
    assert _strict_json(path.read_text()) == {"sw": None, "all": [1.0, None], "n": 3}


def test_likelihood_reports_robust_statistics_and_warns_of_far_latents(tmp_path, capsys):
    """Item 9: two points far from the data drag the mean NLL; the JSON gives the median, the 10%
    trimmed mean and the count of latents far outside the prior, with one warning line."""
    import torch

    from sde_diffusion.experiments import named_oracle
    from sde_diffusion.sdes import VPSDE

    sde = VPSDE()
    mix = named_oracle("gmm2d", sde)
    x = mix.sample(18, t=sde.eps, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = torch.cat([x, torch.tensor([[3.0, 3.0], [-4.0, 2.0]], dtype=torch.float64)])
    np.savez(tmp_path / "pts.npz", x=x.numpy())
    assert main(["likelihood", "--oracle", "gmm2d", "--data", str(tmp_path / "pts.npz"),
                 "--n", "20"]) == 0
    captured = capsys.readouterr()
    info = _strict_json(captured.out)
    exact = -mix.log_prob(x, sde.eps)
    assert info["latent_outliers"] == 2 and info["outlier_tail"] == 1e-6 and info["trim"] == 0.1
    assert info["nll_median_nats"] == pytest.approx(float(exact.quantile(0.5)), abs=1e-2)
    assert info["nll_trimmed_mean_nats"] == pytest.approx(float(exact.sort().values[2:18].mean()),
                                                          abs=1e-2)
    assert info["nll_nats"] > info["nll_median_nats"] + 10
    lines = [line for line in captured.err.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("sde-diffusion: warning: 2 of 20 points")
    # in-distribution points: no warning
    assert main(["likelihood", "--oracle", "gmm2d", "--data", "oracle", "--n", "16"]) == 0
    captured = capsys.readouterr()
    assert _strict_json(captured.out)["latent_outliers"] == 0 and "warning" not in captured.err


def test_optimize_grid_prints_progress_lines_when_not_on_a_terminal(tmp_path, monkeypatch, capsys):
    """Item 11: off a terminal (CI, logs) optimize-grid reported nothing for minutes; now a line
    every PROGRESS_EVERY seconds (0 here: every evaluation) with elapsed time and an estimate."""
    import sde_diffusion.samplers.tuning as tuning

    monkeypatch.setattr(tuning, "PROGRESS_EVERY", 0.0)
    loud = [a for a in FIT if a != "--quiet"]
    assert main([*loud, "--out", str(tmp_path / "g.json")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "evaluations" in line]
    assert len(lines) == json.loads((tmp_path / "g.json").read_text())["evaluations"] > 5
    assert lines[0].startswith("optimize_grid: 1/20 evaluations, 0:0")
    assert "elapsed, at most ~" in lines[-1] and lines[-1].endswith("left (the search may stop sooner)")
    assert main([*FIT, "--out", str(tmp_path / "h.json")]) == 0      # --quiet: nothing
    assert capsys.readouterr().err == ""


# ---- every command on a real trained checkpoint: a float32 TimeMLP (issue 10, item 2) -----------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """`sde-diffusion train --config configs/toy/moons_vp.py --workdir DIR
    --config.training.n_iters=10`, as the README has it: a float32 network."""
    import torch

    from sde_diffusion.checkpoints import load_checkpoint

    workdir = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", "--config", TOY_CONFIG, "--workdir", str(workdir),
                 "--config.training.n_iters=10", "--quiet"]) == 0
    ckpt = load_checkpoint(workdir / "checkpoint_last.pt")
    assert ckpt["step"] == 10 and all(v.dtype == torch.float32 for v in ckpt["ema"].values()
                                      if v.is_floating_point())
    return workdir


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver++", "euler_maruyama", "ode", "unipc:order=3"])
def test_sample_on_a_trained_checkpoint(trained_run, solver, tmp_path, capsys):
    out = tmp_path / "x.npz"
    assert main(["sample", "--checkpoint", str(trained_run), "--solver", solver, "--steps", "8",
                 "--n", "32", "--out", str(out), "--quiet"]) == 0
    info = _strict_json(capsys.readouterr().out)
    x = np.load(out)["samples"]
    assert x.shape == (32, 2) and np.isfinite(x).all() and info["n"] == 32
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_likelihood_on_a_trained_checkpoint(trained_run, capsys):
    assert main(["likelihood", "--checkpoint", str(trained_run), "--data", "moons", "--n", "16",
                 "--exact"]) == 0
    info = _strict_json(capsys.readouterr().out)
    assert info["n"] == 16 and info["dim"] == 2 and math.isfinite(info["nll_nats"])
    assert math.isfinite(info["nll_median_nats"]) and info["latent_outliers"] >= 0


def test_compare_on_a_trained_checkpoint(trained_run, tmp_path, capsys):
    """The README's `compare --checkpoint runs/r --solvers ddim --nfe 10` (float64 x_T into a
    float32 network used to crash: mat1 and mat2 must have the same dtype)."""
    out = tmp_path / "study"
    assert main(["compare", "--checkpoint", str(trained_run), "--solvers", "ddim,ddim:eta=1",
                 "--nfe", "10", "--n", "200", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    csv_lines = (out / "compare.csv").read_text().strip().splitlines()
    header = csv_lines[0].split(",")
    assert len(csv_lines) == 3 and "sliced_w" in header
    for row in csv_lines[1:]:       # a distance with its bootstrap standard error (default 30)
        values = row.split(",")
        assert 0 < float(values[header.index("sliced_w_se")]) < float(values[header.index("sliced_w")])
    assert (out / "sliced_w_vs_nfe.png").stat().st_size > 1000
    assert main(["compare", "--checkpoint", str(trained_run), "--solvers", "ddim,dpm_solver++",
                 "--nfe", "10", "--n", "64", "--metric", "flow_rmse", "--out", str(out),
                 "--quiet", "--overwrite"]) == 0
    assert (out / "flow_rmse_vs_nfe.png").stat().st_size > 1000


def test_optimize_grid_then_sample_on_a_trained_checkpoint(trained_run, tmp_path, capsys):
    grid = tmp_path / "grid.json"
    assert main(["optimize-grid", "--checkpoint", str(trained_run), "--nfe", "6", "--pilot", "64",
                 "--max-evals", "10", "--out", str(grid), "--quiet"]) == 0
    saved = _strict_json(grid.read_text())
    assert saved["nfe"] == 6 and len(saved["times"]) == 7 and saved["sde"]["name"] == "vp"
    capsys.readouterr()
    out = tmp_path / "fitted.npz"
    assert main(["sample", "--checkpoint", str(trained_run), "--grid", str(grid), "--n", "32",
                 "--out", str(out), "--quiet"]) == 0
    info = _strict_json(capsys.readouterr().out)
    assert info["nfe"] == 6 and info["solver"] == "unipc:order=3"
    assert np.isfinite(np.load(out)["samples"]).all()


def test_closed_stdout_stops_quietly(tmp_path, monkeypatch, capsys):
    """`sde-diffusion ... | head`: a reader that closes the pipe early ends the command with
    SIGPIPE's status and no traceback."""
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    code = main(["sample", "--oracle", "ring8", "--solver", "ddim", "--steps", "2", "--n", "4",
                 "--quiet"])
    assert code == 141 and "Traceback" not in capsys.readouterr().err


def test_a_storage_error_while_writing_is_one_line(tmp_path, monkeypatch, capsys):
    """No space left while `sample` writes its output: one line naming the file, exit 2."""
    import errno

    from sde_diffusion import _files

    def full(path, write, fsync=False):
        raise _files.OutputError(str(path), OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_files, "atomic_write", full)
    _one_line_error(main(["sample", "--oracle", "ring8", "--solver", "ddim", "--steps", "2",
                          "--n", "4", "--quiet"]), capsys, "No space left", "samples.npz")


# ---- classes and guidance (issue 12): sample --class / --guidance / --classifier --------------
RING = ["sample", "--oracle", "ring8c", "--n", "400", "--quiet"]


def _sample(capsys, tmp_path, name, *args):
    out = tmp_path / f"{name}.npz"
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    info = _strict_json(capsys.readouterr().out)
    with np.load(out) as archive:
        return info, {k: archive[k] for k in archive.files}


def _classes_of(x):
    """The class of each sample: its most responsible ring8c component's."""
    import torch

    from sde_diffusion.experiments import named_oracle

    mix = named_oracle("ring8c")
    return mix.labels[mix.responsibilities(torch.as_tensor(x, dtype=torch.float64), None).argmax(1)]


def test_sample_help_lists_the_guidance_flags(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    for flag in ("--class", "--guidance ", "--guidance-interval", "--guidance-rescale",
                 "--classifier", "--nfe"):
        assert flag in text, flag


def test_sample_class_on_the_labelled_oracle_lands_in_the_class(tmp_path, capsys):
    """--class all: sample i gets class i mod 4 (stored as y), and lands in that class's modes;
    scale 1 (--guidance 1) is the conditional model itself: the same samples, one evaluation per
    call."""
    args = [*RING, "--solver", "dpm_solver++", "--steps", "20", "--seed", "2"]
    info, got = _sample(capsys, tmp_path, "all", *args, "--class", "all")
    assert info["classes"] == [0, 1, 2, 3] and info["nfe"] == 20 and info["network_calls"] == 20
    assert got["y"].tolist() == [i % 4 for i in range(400)]
    assert (_classes_of(got["samples"]).numpy() == got["y"]).mean() > 0.99
    info1, one = _sample(capsys, tmp_path, "one", *args, "--class", "1", "--guidance", "1")
    assert info1["guidance"] == {"method": "classifier-free", "scale": 1.0, "w": 0.0,
                                 "interval": None, "rescale": 0.0, "batched": True}
    assert info1["nfe"] == 20 and info1["network_calls"] == 20
    _, plain = _sample(capsys, tmp_path, "plain", *args, "--class", "1")
    np.testing.assert_array_equal(one["samples"], plain["samples"])
    assert (_classes_of(one["samples"]) == 1).double().mean() > 0.99
    # the exact classifier at scale 1 is the exact conditional score: the same samples to round-off
    info_c, exact = _sample(capsys, tmp_path, "exact", *args, "--class", "1", "--classifier",
                            "exact", "--guidance", "1")
    assert info_c["guidance"]["method"] == "classifier" and info_c["nfe"] == 40
    assert info_c["network_calls"] == 40 and info_c["classifier_calls"] == 20
    np.testing.assert_allclose(exact["samples"], plain["samples"], atol=1e-4)


def test_guided_sampling_reports_evaluations_and_network_calls(tmp_path, capsys):
    """Classifier-free guidance: 2 evaluations per guided call in one batched network call;
    outside the interval 1; --nfe N is a budget of evaluations (N // 2 guided calls)."""
    args = [*RING, "--class", "2", "--guidance", "3", "--seed", "1"]
    info, got = _sample(capsys, tmp_path, "g", *args, "--solver", "ddim", "--steps", "10")
    assert info["nfe"] == 20 and info["network_calls"] == 10 and info["evaluations_per_call"] == 2
    assert int(got["nfe"]) == 20 and int(got["network_calls"]) == 10
    assert (_classes_of(got["samples"]) == 2).double().mean() > 0.99
    info, _ = _sample(capsys, tmp_path, "i", *args, "--solver", "ddim", "--steps", "10",
                      "--guidance-interval", "0.3,3", "--guidance-rescale", "0.5")
    assert 10 < info["nfe"] < 20 and info["network_calls"] == 10
    assert info["guidance"]["interval"] == [0.3, 3.0] and info["guidance"]["rescale"] == 0.5
    info, _ = _sample(capsys, tmp_path, "n", *args, "--nfe", "20")
    assert info["nfe"] == 20 and info["network_calls"] == 10 and info["nfe_budget"] == 20
    assert "auto" in info and info["grid"] == "focus"


def test_sample_nfe_without_solver_is_the_automatic_choice(tmp_path, capsys):
    """`sample --nfe 10` = sd.sample(model, nfe=10) (solver 'auto'), sample for sample."""
    from sde_diffusion import sample
    from sde_diffusion.experiments import named_oracle
    from sde_diffusion.models import OracleModel
    from sde_diffusion.sdes import VPSDE

    info, got = _sample(capsys, tmp_path, "auto", "sample", "--oracle", "ring8", "--nfe", "10",
                        "--n", "64", "--seed", "3", "--quiet")
    ref = sample(OracleModel(named_oracle("ring8", VPSDE())), shape=(64, 2), nfe=10, generator=3)
    np.testing.assert_array_equal(got["samples"], ref.samples.float().numpy())
    assert info["nfe"] == ref.nfe == 10 and info["auto"] == ref.config["rule"]
    assert info["solver"].startswith(ref.config["solver"]) and info["grid"] == ref.config["grid"]


@pytest.mark.parametrize("args, fragments", [
    (["--oracle", "ring8c", "--class", "4"], ["--class 4", "classes 0..3"]),
    (["--oracle", "ring8c", "--class", "0,7", "--guidance", "2"], ["--class 7", "0..3"]),
    (["--oracle", "ring8", "--class", "1"], ["--class", "class-conditional", "ring8"]),
    (["--oracle", "ring8", "--class", "1", "--guidance", "2"], ["--guidance", "class-conditional"]),
    (["--oracle", "ring8c", "--guidance", "2"], ["--guidance needs --class"]),
    (["--oracle", "ring8c", "--classifier", "exact"], ["--classifier needs --class"]),
    (["--oracle", "ring8c", "--class", "1", "--guidance", "2", "--guidance-interval", "3,1"],
     ["--guidance-interval '3,1'", "LO < HI"]),
    (["--oracle", "ring8c", "--class", "1", "--guidance", "2", "--guidance-interval", "1"],
     ["--guidance-interval"]),
    (["--oracle", "ring8c", "--class", "1", "--guidance-interval", "0.1,1"], ["--guidance S"]),
    (["--oracle", "ring8c", "--class", "1", "--guidance", "-1"], ["--guidance", ">= 0"]),
    (["--oracle", "ring8c", "--class", "1", "--guidance", "2", "--guidance-rescale", "1.5"],
     ["--guidance-rescale", "[0, 1]"]),
    (["--oracle", "ring8c", "--class", "1", "--classifier", "exact", "--guidance-rescale", "0.5"],
     ["--guidance-rescale", "classifier-free"]),
    (["--oracle", "ring8c", "--class", "-1"], ["--class '-1'"]),
    (["--oracle", "ring8c", "--class", "two"], ["--class 'two'"]),
    (["--oracle", "ring8c", "--class", "1", "--classifier", "no/such.pt"], ["no such file"]),
    (["--oracle", "ring8", "--class", "1", "--classifier", "exact"], ["ring8c", "has none"]),
    (["--oracle", "ring8c", "--class", "1", "--guidance", "2", "--nfe", "1"], ["--nfe 1", "2"]),
    (["--oracle", "ring8c", "--nfe", "4", "--steps", "4"], ["--steps", "--nfe"]),
])
def test_guidance_user_errors_are_one_line(args, fragments, tmp_path, capsys):
    code = main(["sample", *args, "--n", "8", "--out", str(tmp_path / "x.npz"), "--quiet"])
    _one_line_error(code, capsys, *fragments)
    assert not (tmp_path / "x.npz").exists()


def test_class_rows_put_one_class_per_row():
    import torch

    from sde_diffusion.guidance_cli import class_rows

    x = torch.arange(10.0)[:, None, None, None].expand(10, 1, 2, 2)
    labels = torch.tensor([0, 1, 2] * 3 + [0])
    rows, per_row = class_rows(x, labels, [0, 1, 2])
    assert per_row == 3 and rows[:, 0, 0, 0].tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]


# ---- on trained float32 checkpoints: a conditional 8gaussians model and its classifier ---------
COND_CONFIG = os.path.join(REPO, "configs", "toy", "8gaussians_cond.py")
CLF_CONFIG = os.path.join(REPO, "configs", "toy", "8gaussians_classifier.py")
TINY_TOY = ["--config.training.n_iters=20", "--config.training.batch_size=64",
            "--config.model.hidden=32", "--config.model.depth=2", "--config.optim.warmup=2",
            "--config.training.snapshot_freq_for_preemption=20", "--quiet"]


@pytest.fixture(scope="module")
def conditional_runs(tmp_path_factory):
    """`sde-diffusion train` of configs/toy/8gaussians_cond.py (num_classes 8, p_uncond 0.1) and
    of 8gaussians_classifier.py, 20 steps each (float32 networks), and a classifier under VE."""
    root = tmp_path_factory.mktemp("cond")
    runs = {"cond": root / "cond", "clf": root / "clf", "clf_ve": root / "clf_ve"}
    assert main(["train", "--config", COND_CONFIG, "--workdir", str(runs["cond"]), *TINY_TOY]) == 0
    assert main(["train", "--config", CLF_CONFIG, "--workdir", str(runs["clf"]), *TINY_TOY]) == 0
    assert main(["train", "--config", CLF_CONFIG, "--workdir", str(runs["clf_ve"]), *TINY_TOY,
                 "--config.training.n_iters=2", "--config.training.sde=vesde"]) == 0
    return runs


def test_guidance_on_a_trained_conditional_checkpoint(conditional_runs, tmp_path, capsys):
    cond, clf = str(conditional_runs["cond"]), str(conditional_runs["clf"])
    base = ["sample", "--checkpoint", cond, "--n", "32", "--quiet", "--solver", "ddim",
            "--steps", "6"]
    info, got = _sample(capsys, tmp_path, "cfg", *base, "--class", "3", "--guidance", "2")
    assert info["nfe"] == 12 and info["network_calls"] == 6 and got["samples"].dtype == np.float32
    assert np.isfinite(got["samples"]).all() and got["y"].tolist() == [3] * 32
    info, got = _sample(capsys, tmp_path, "cg", *base, "--class", "0,1", "--classifier", clf,
                        "--guidance", "2", "--guidance-interval", "0.1,inf")
    assert info["guidance"]["method"] == "classifier" and info["guidance"]["interval"][1] is None
    assert np.isfinite(got["samples"]).all() and info["classifier_calls"] <= 6
    info, _ = _sample(capsys, tmp_path, "nfe", *base[:-4], "--class", "all", "--guidance", "4",
                      "--nfe", "10")
    assert info["classes"] == list(range(8)) and info["nfe"] == 10 and info["network_calls"] == 5
    for args, fragments in [
            (["--class", "8", "--guidance", "2"], ["--class 8", "classes 0..7"]),
            (["--class", "1", "--classifier", cond], ["--classifier", "score model"]),
            (["--class", "1", "--classifier", str(conditional_runs["clf_ve"])],
             ["--classifier", "SDE"])]:
        code = main([*base, *args, "--out", str(tmp_path / "e.npz")])
        _one_line_error(code, capsys, *fragments)


def test_guidance_on_an_unconditional_checkpoint_is_refused(trained_run, conditional_runs,
                                                            tmp_path, capsys):
    base = ["sample", "--checkpoint", str(trained_run), "--n", "8", "--quiet", "--steps", "4",
            "--out", str(tmp_path / "u.npz")]
    _one_line_error(main([*base, "--class", "1", "--guidance", "2"]), capsys,
                    "--guidance needs a class-conditional model", "num_classes")
    _one_line_error(main([*base, "--class", "1"]), capsys, "--class needs a class-conditional")
    # a classifier guides an unconditional model (its classes decide the range)
    _one_line_error(main([*base, "--class", "9", "--classifier",
                          str(conditional_runs["clf"])]), capsys, "classifier's classes 0..7")


def test_guidance_without_label_dropout_warns(conditional_runs):
    """A model trained with p_uncond = 0 never learned the null label: guidance says so."""
    import argparse

    from sde_diffusion.checkpoints import model_from_checkpoint
    from sde_diffusion.guidance_cli import guided_model

    model, sde, config = model_from_checkpoint(str(conditional_runs["cond"]))
    args = argparse.Namespace(classes="1", guidance=2.0, guidance_interval=None,
                              guidance_rescale=None, classifier=None, checkpoint="c", oracle=None)
    assert guided_model(args, model, sde, None, config, 4, "cpu").warnings == []
    config.training.p_uncond = 0.0
    warned = guided_model(args, model, sde, None, config, 4, "cpu").warnings
    assert len(warned) == 1 and "p_uncond = 0" in warned[0]
    args.guidance = 1.0
    assert guided_model(args, model, sde, None, config, 4, "cpu").warnings == []
