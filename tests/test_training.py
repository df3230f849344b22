"""The training loop: logging, exact resumption, signals, NaN handling, DDP equivalence."""
import csv
import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sde_diffusion.checkpoints import load_checkpoint, model_from_checkpoint
from sde_diffusion.config import apply_overrides, load_config
from sde_diffusion.evaluation import evaluate_model
from sde_diffusion.training import NonFiniteLossError, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOONS = os.path.join(ROOT, "configs", "toy", "moons_vp.py")
DIGITS = os.path.join(ROOT, "configs", "digits", "vp.py")

TINY = {"training.batch_size": 32, "training.log_freq": 5, "training.snapshot_freq_for_preemption": 7,
        "model.hidden": 16, "model.depth": 2, "model.embed_dim": 16, "data.n_train": 256,
        "optim.warmup": 4, "sampling.steps": 8}
TINY_UNET = {"training.batch_size": 8, "training.log_freq": 2, "training.snapshot_freq_for_preemption": 3,
             "training.sample_freq": 0, "model.base_channels": 8, "model.channel_mults": (1,),
             "model.num_res_blocks": 1, "model.attn_resolutions": (), "model.dropout": 0.3,
             "optim.warmup": 2}



def tiny(n_iters, path=MOONS, base=TINY, **over):
    c = load_config(path)
    apply_overrides(c, {**base, "training.n_iters": n_iters, **over})
    return c


def _overrides_as_args(over):
    out = []
    for k, v in over.items():
        out.append(f"--config.{k}={v!r}" if isinstance(v, (str, tuple)) else f"--config.{k}={v}")
    return out


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _read_log(workdir):
    with open(os.path.join(workdir, "loss_log.csv")) as f:
        return list(csv.DictReader(f))


def _assert_same_state(a, b, exact=True):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_short_run_writes_log_checkpoint_and_config(tmp_path):
    result = train(tiny(20), tmp_path, quiet=True)
    assert result.step == 20 and result.interrupted is None and result.resumed_from is None
    rows = _read_log(tmp_path)
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    assert [s for s, _ in result.losses] == [5, 10, 15, 20]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["lr"]) == pytest.approx(load_config(MOONS).optim.lr)
    assert os.path.isfile(tmp_path / "config.json")
    ckpt = load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert ckpt["step"] == 20 and ckpt["config"].model.hidden == 16
    model, sde, cfg = model_from_checkpoint(tmp_path)
    _assert_same_state(model.net, result.ema_net)
    # the EMA differs from the raw weights, and training again does nothing
    assert any(not torch.equal(p, q) for p, q in zip(result.net.parameters(), result.ema_net.parameters()))
    again = train(tiny(20), tmp_path, quiet=True)
    assert again.step == 20 and again.resumed_from == 20 and again.losses == []


def _scramble_global_rngs():
    torch.manual_seed(12345), random.seed(12345), np.random.seed(12345)


@pytest.mark.parametrize("kind", ["mlp", "unet_dropout"])
def test_resume_is_bit_for_bit(tmp_path, kind):
    """N steps straight == N/2 steps, a fresh reload from the checkpoint, N/2 more steps."""
    make = (lambda n: tiny(n)) if kind == "mlp" else (lambda n: tiny(n, DIGITS, TINY_UNET))
    n = 12 if kind == "mlp" else 6
    straight = train(make(n), tmp_path / "a", quiet=True)
    train(make(n // 2), tmp_path / "b", quiet=True)
    _scramble_global_rngs()                       # a fresh process would start elsewhere
    resumed = train(make(n), tmp_path / "b", quiet=True)
    assert resumed.resumed_from == n // 2 and resumed.step == n
    _assert_same_state(straight.net, resumed.net)
    _assert_same_state(straight.ema_net, resumed.ema_net)
    a = load_checkpoint(tmp_path / "a" / "checkpoint_last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint_last.pt")
    for k, v in a["optimizer"]["state"].items():
        for name in v:
            assert torch.equal(v[name], b["optimizer"]["state"][k][name])
    # the log: the same rows at multiples of log_freq, plus the first run's final row
    la, lb = _read_log(tmp_path / "a"), _read_log(tmp_path / "b")
    assert {r["step"] for r in lb} == {r["step"] for r in la} | {str(n // 2)}
    assert la[0] == {**lb[0], "elapsed_s": la[0]["elapsed_s"]}


def test_resume_from_a_periodic_checkpoint_after_a_crash(tmp_path):
    """A run killed without a final checkpoint resumes from the last periodic one; log rows
    written after that checkpoint are dropped and rewritten."""
    straight = train(tiny(16), tmp_path / "a", quiet=True)
    train(tiny(14), tmp_path / "b", quiet=True)
    # simulate a crash after step 14: the last periodic checkpoint is step 7
    ckpt = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["step"] == 14
    train(tiny(7), tmp_path / "c", quiet=True)
    os.replace(tmp_path / "c" / "checkpoint_last.pt", tmp_path / "b" / "checkpoint_last.pt")
    resumed = train(tiny(16), tmp_path / "b", quiet=True)
    assert resumed.resumed_from == 7
    _assert_same_state(straight.net, resumed.net)
    assert [r["step"] for r in _read_log(tmp_path / "b")] == ["5", "10", "15", "16"]


def test_sigterm_checkpoints_and_resumes(tmp_path):
    over = {**TINY, "training.n_iters": 100000, "training.log_freq": 1,
            "training.snapshot_freq_for_preemption": 0}
    cmd = [sys.executable, "-m", "sde_diffusion.training", "--config", MOONS, "--workdir",
           str(tmp_path), "--quiet"] + _overrides_as_args(over)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        log = tmp_path / "loss_log.csv"
        deadline = time.time() + 60
        while time.time() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= 4:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    step = load_checkpoint(tmp_path / "checkpoint_last.pt")["step"]
    assert step >= 3
    result = train(tiny(step + 3), tmp_path, quiet=True)
    assert result.resumed_from == step and result.step == step + 3


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from sde_diffusion import training
    real = training.get_loss_fn

    def poisoned(config, sde):
        fn, calls = real(config, sde), [0]

        def loss_fn(*a, **k):
            calls[0] += 1
            loss = fn(*a, **k)
            return loss * float("nan") if calls[0] == 10 else loss
        return loss_fn

    monkeypatch.setattr(training, "get_loss_fn", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 10") as info:
        train(tiny(40, **{"training.log_freq": 3, "training.snapshot_freq_for_preemption": 4}),
              tmp_path, quiet=True)
    assert info.value.step == 10
    assert info.value.checkpoint.endswith("checkpoint_last.pt")
    ckpt = load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert ckpt["step"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_ddp_with_two_gloo_processes_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo), interrupted and resumed, == one process with the same
    global batch. Equality is up to float rounding: the gradient all-reduce sums in another order
    than one process."""
    for n in (6, 10):   # 6 steps, then resumed (by both ranks) to 10
        over = {**TINY, "training.n_iters": n, "training.batch_size": 32}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "sde_diffusion.training", "--config", MOONS, "--workdir", str(tmp_path / "ddp"),
               "--quiet", "--config.device=cpu"] + _overrides_as_args(over)
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoint_last.pt")
    assert ckpt["step"] == 10 and len(ckpt["rng_per_rank"]) == 2
    single = train(tiny(10, **{"training.batch_size": 32}), tmp_path / "one", quiet=True)
    ddp_model, _, _ = model_from_checkpoint(tmp_path / "ddp", use_ema=False)
    _assert_same_state(single.net, ddp_model.net, exact=False)
    ddp_ema, _, _ = model_from_checkpoint(tmp_path / "ddp")
    _assert_same_state(single.ema_net, ddp_ema.net, exact=False)
    la, lb = _read_log(tmp_path / "one"), _read_log(tmp_path / "ddp")
    assert [r["step"] for r in la] == ["5", "10"] and [r["step"] for r in lb] == ["5", "6", "10"]
    np.testing.assert_allclose(float(la[0]["loss"]), float(lb[0]["loss"]), rtol=1e-5)


def test_previews_and_evaluation(tmp_path):
    """``sde_diffusion.train`` (and ``sde-diffusion train``) draw previews by default."""
    import sde_diffusion as sd
    result = sd.train(tiny(6, **{"training.sample_freq": 3, "training.n_preview": 16}), tmp_path,
                      quiet=True)
    assert [os.path.basename(p) for p in result.sample_paths] == ["step_3.png", "step_6.png"]
    assert all(os.path.getsize(p) > 0 for p in result.sample_paths)
    scores = evaluate_model(result.model, result.config, n_samples=200)
    assert scores["sw"] > 0 and scores["sw_baseline"] > 0 and scores["n"] == 200


def test_previews_do_not_change_the_training(tmp_path):
    import sde_diffusion as sd
    a = train(tiny(6), tmp_path / "a", quiet=True)
    b = sd.train(tiny(6, **{"training.sample_freq": 2, "training.n_preview": 8}), tmp_path / "b",
                 quiet=True)
    assert len(b.sample_paths) == 3
    _assert_same_state(a.net, b.net)


def test_the_training_job_previews_through_the_hook_it_is_given(tmp_path):
    """The job never samples itself: every sample_freq steps rank 0 calls the hook with the step,
    a ScoreModel of the EMA weights and the training set; without a hook it warns and draws
    nothing."""
    from sde_diffusion.models import ScoreModel
    calls = []

    def hook(step, model, data):
        calls.append((step, model, data.shape))
        return f"preview-{step}" if step == 4 else None

    result = train(tiny(5, **{"training.sample_freq": 2}), tmp_path / "a", quiet=True, preview=hook)
    assert [c[0] for c in calls] == [2, 4] and result.sample_paths == ["preview-4"]
    assert all(isinstance(m, ScoreModel) and not m.net.training and shape == (256, 2)
               for _, m, shape in calls)
    assert calls[-1][1].net is result.ema_net and calls[-1][1].parameterization == "eps"
    with pytest.warns(UserWarning, match="sample_freq=2 but no preview hook"):
        plain = train(tiny(5, **{"training.sample_freq": 2}), tmp_path / "b", quiet=True)
    assert plain.sample_paths == [] and not (tmp_path / "b" / "samples").exists()


def test_mixed_precision_on_cpu_warns_and_trains_in_float32(tmp_path):
    with pytest.warns(UserWarning, match="for GPUs"):
        result = train(tiny(3, **{"training.mixed_precision": "bf16"}), tmp_path, quiet=True)
    assert result.step == 3 and next(result.net.parameters()).dtype == torch.float32


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        train(tiny(3, **{"training.mixed_precision": "fp8"}), tmp_path / "a", quiet=True)
    with pytest.raises(ValueError, match="optimizer"):
        train(tiny(3, **{"optim.optimizer": "SGD"}), tmp_path / "b", quiet=True)
    with pytest.raises(ValueError, match="ema_rate"):
        train(tiny(3, **{"model.ema_rate": 1.5}), tmp_path / "c", quiet=True)


@pytest.mark.gpu
def test_cuda_training_with_bf16(tmp_path):
    result = train(tiny(10, **{"training.mixed_precision": "bf16", "device": "cuda"}), tmp_path,
                   quiet=True)
    assert result.step == 10 and next(result.net.parameters()).is_cuda
    assert all(np.isfinite(loss) for _, loss in result.losses)


def test_your_own_network_and_data(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x, t, y=None):
            return self.lin(torch.cat([x, t[:, None]], 1))

    points = torch.randn(100, 3, generator=torch.Generator().manual_seed(0)) * 0.5
    net = Tiny()
    before = net.lin.weight.detach().clone()
    result = train(tiny(5), tmp_path, quiet=True, net=net, data=points)
    assert result.step == 5 and result.net is net and not torch.equal(before, net.lin.weight)
    ckpt = load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert ckpt["data_shape"] == [3]
    fresh = Tiny()
    fresh.load_state_dict(ckpt["ema"])
    _assert_same_state(fresh, result.ema_net)


def test_digits_evaluation_reports_fd_with_baselines(tmp_path):
    result = train(tiny(2, DIGITS, TINY_UNET, **{"sampling.steps": 4, "eval.batch_size": 64}),
                   tmp_path, quiet=True)
    scores = evaluate_model(result.model, result.config, n_samples=64)
    assert scores["n"] == 64
    assert scores["fd_real_vs_real"] < scores["fd_real_vs_noise"]
    assert scores["fd"] > scores["fd_real_vs_real"]   # an untrained model is far from the data


# ---- the workdir: one run at a time, checked before any work ---------------------------------------
HOLD_WORKDIR = """
import sys, time
from sde_diffusion.training import _lock_workdir
_lock_workdir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def _cli_train(workdir, *extra, config=MOONS, base=TINY):
    from sde_diffusion.cli import main
    return main(["train", "--config", config, "--workdir", str(workdir), "--quiet",
                 *_overrides_as_args(base), *extra])


def _tree(folder, ignore=()):
    """Every file under ``folder`` with its mtime and content hash: to see that nothing changed."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if name in ignore:
                continue
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = (os.stat(p).st_mtime_ns, hash(f.read()))
    return out


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("sde-diffusion: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_a_second_run_on_a_workdir_in_use_fails_at_once_naming_the_first(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _cli_train(workdir, "--config.training.n_iters=3") == 0    # a finished run to resume
    capsys.readouterr()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WORKDIR, str(workdir)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(workdir)
        assert _cli_train(workdir, "--config.training.n_iters=6", "--seed", "3") == 2
        line = _one_error_line(capsys)
        assert "in use by another training run" in line and f"pid {holder.pid}" in line
        assert "started" in line and str(workdir) in line
        assert _tree(workdir) == before                               # wrote nothing
    finally:
        holder.kill()                                                 # a crash: no clean-up
        holder.wait()
    # the dead holder's lock does not block the next run
    assert _cli_train(workdir, "--config.training.n_iters=6") == 0
    assert load_checkpoint(workdir / "checkpoint_last.pt")["step"] == 6


def test_the_lock_is_released_after_a_run_and_after_an_error(tmp_path):
    train(tiny(2), tmp_path, quiet=True)
    with pytest.raises(ValueError):
        train(tiny(4, **{"model.hidden": 8}), tmp_path, quiet=True)   # refused (another network)
    assert train(tiny(4), tmp_path, quiet=True).step == 4               # not blocked by a lock
    assert os.path.getsize(tmp_path / ".lock") == 0


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "run"
    path.write_text("not a folder")
    assert _cli_train(path, "--config.training.n_iters=2") == 2
    assert "is an existing file, not a folder" in _one_error_line(capsys)
    assert path.read_text() == "not a folder"


def test_a_read_only_workdir_fails_before_the_data_is_loaded(tmp_path, capsys, monkeypatch):
    from sde_diffusion import _files, training
    workdir = tmp_path / "run"
    workdir.mkdir()
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(workdir)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a, **k)

    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the workdir was checked")

    monkeypatch.setattr(_files.os, "open", read_only)
    monkeypatch.setattr(training, "load_data", no_data)
    assert _cli_train(workdir, "--config.training.n_iters=2") == 2
    line = _one_error_line(capsys)
    assert "Read-only file system" in line and str(workdir) in line
    assert os.listdir(workdir) == []


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    from sde_diffusion import checkpoints
    train(tiny(7), tmp_path, quiet=True)

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(OSError, match="No space left on device") as info:
        train(tiny(14), tmp_path, quiet=True)
    assert "checkpoint_last.pt" in str(info.value) and "unchanged" in str(info.value)
    assert _cli_train(tmp_path, "--config.training.n_iters=14") == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and str(tmp_path / "checkpoint_last.pt") in line
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint_last.pt")["step"] == 7
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]   # no temporary file left


def test_stale_temporary_files_in_the_workdir_are_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from sde_diffusion._files import _host
    (tmp_path / "samples").mkdir()
    stale = [tmp_path / f".checkpoint_last.pt.{dead.pid}@{_host()}.0123abcd.tmp",
             tmp_path / "samples" / f".step_3.png.{dead.pid}@{_host()}.89abcdef.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    train(tiny(0), tmp_path, quiet=True)
    assert not any(p.exists() for p in stale)


# ---- resuming: refused when the network or the SDE changed ------------------------------------------
def _resume_is_refused(tmp_path, capsys, change, field, *phrases):
    """Resuming a 3-step run with ``change`` raises a ValueError naming ``field``, the phrases and
    ``--no-resume``, leaves every file as it was, and ``sde-diffusion train`` says the same in one
    line (exit 2). Returns the command-line arguments of the change."""
    train(tiny(3), tmp_path, quiet=True)
    before = _tree(tmp_path, ignore=(".lock",))
    with pytest.raises(ValueError) as info:
        train(tiny(6, **change), tmp_path, quiet=True)
    msg = str(info.value)
    assert field in msg and "--no-resume" in msg and all(p in msg for p in phrases), msg
    assert _tree(tmp_path, ignore=(".lock",)) == before
    key, value = next(iter(change.items()))
    args = ("--config.training.n_iters=6", f"--config.{key}={value}")
    assert _cli_train(tmp_path, *args) == 2
    assert field in _one_error_line(capsys)
    return args


@pytest.mark.parametrize("change, field", [
    ({"model.hidden": 32}, "model.hidden: 16 -> 32"),
    ({"model.depth": 3}, "model.depth: 2 -> 3"),
    ({"model.parameterization": "x0"}, "model.parameterization: 'eps' -> 'x0'"),
])
def test_resuming_with_another_network_is_refused_naming_the_fields(tmp_path, capsys, change, field):
    _resume_is_refused(tmp_path, capsys, change, field, "another network", "new workdir")
    assert train(tiny(6, **change), tmp_path, quiet=True, resume=False).step == 6   # starting over


@pytest.mark.parametrize("change, field", [
    ({"training.sde": "vesde"}, "training.sde: 'vpsde' -> 'vesde'"),
    ({"model.beta_max": 10.0}, "model.beta_max: 20.0 -> 10.0"),
    ({"training.sde": "vpsde_cosine"}, "training.sde: 'vpsde' -> 'vpsde_cosine'"),
])
def test_resuming_with_another_sde_is_refused(tmp_path, capsys, change, field):
    args = _resume_is_refused(tmp_path, capsys, change, field, "trained under VPSDE(")
    assert _cli_train(tmp_path, *args, "--no-resume") == 0


def test_changes_that_leave_the_model_and_the_sde_alone_resume_with_a_warning(tmp_path):
    train(tiny(3), tmp_path, quiet=True)
    # the sampling end of the SDE, and a cosine parameter of a linear schedule, change no weights
    with pytest.warns(UserWarning, match="optim.lr") as record:
        result = train(tiny(6, **{"optim.lr": 1e-4, "model.sde_eps": 1e-4, "model.cosine_s": 0.01}),
                       tmp_path, quiet=True)
    assert result.resumed_from == 3 and result.step == 6
    assert "model.sde_eps" in str(record[0].message)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_resuming_from_an_unreadable_checkpoint_is_one_line(tmp_path, capsys, damage):
    train(tiny(3), tmp_path, quiet=True)
    path = tmp_path / "checkpoint_last.pt"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 3], "empty": b"",
                      "text": b"hello\n"}[damage])
    with pytest.raises(ValueError, match="--no-resume") as info:
        train(tiny(6), tmp_path, quiet=True)
    assert str(path) in str(info.value)
    assert _cli_train(tmp_path, "--config.training.n_iters=6") == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "--no-resume" in line and "weights_only" not in line
    assert _cli_train(tmp_path, "--config.training.n_iters=6", "--no-resume") == 0
    assert load_checkpoint(path)["step"] == 6


def test_resuming_your_own_network_that_changed_is_one_sentence(tmp_path):
    def make(width):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 2))

    class Net(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.body = make(width)

        def forward(self, x, t, y=None):
            return self.body(torch.cat([x, t[:, None]], 1))

    train(tiny(3), tmp_path, quiet=True, net=Net(8))
    with pytest.raises(ValueError, match="its network does not fit this run's") as info:
        train(tiny(6), tmp_path, quiet=True, net=Net(16))
    assert "\n" not in str(info.value) and "--no-resume" in str(info.value)


# ---- optional packages: checked first ---------------------------------------------------------------
def test_digits_without_scikit_learn_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)          # "import sklearn" now fails
    workdir = tmp_path / "run"
    assert _cli_train(workdir, "--config.training.n_iters=1", config=DIGITS, base=TINY_UNET) == 2
    line = _one_error_line(capsys)
    assert "pip install scikit-learn" in line
    assert not workdir.exists()
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        train(tiny(1, DIGITS, TINY_UNET), workdir, quiet=True)
    assert not workdir.exists()


def test_previews_without_matplotlib_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import sde_diffusion as sd
    for name in [m for m in sys.modules if m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)              # "import matplotlib..." now fails
    workdir = tmp_path / "run"
    assert _cli_train(workdir, "--config.training.n_iters=2", "--config.training.sample_freq=1") == 2
    assert "pip install matplotlib" in _one_error_line(capsys)
    assert not workdir.exists()
    with pytest.raises(ImportError, match="pip install matplotlib"):
        sd.train(tiny(2, **{"training.sample_freq": 1}), workdir, quiet=True)
    assert not workdir.exists()
    assert _cli_train(workdir, "--config.training.n_iters=2") == 0   # no previews: no matplotlib needed


def test_settings_are_checked_before_the_workdir_is_made(tmp_path):
    for bad in ({"optim.optimizer": "SGD"}, {"model.ema_rate": 1.5},
                {"training.mixed_precision": "fp8"}, {"training.sde": "nope"}):
        with pytest.raises(ValueError):
            train(tiny(3, **bad), tmp_path / "never", quiet=True)
        assert not (tmp_path / "never").exists(), bad
